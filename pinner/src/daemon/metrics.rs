//! The daemon's status as metrics text, in the two formats that disagree
//! on one thing: a counter's name. Prometheus text (what node_exporter's
//! textfile collector and `promtool` read) declares a counter by its
//! sample's name, `# TYPE x_total counter`; OpenMetrics declares the
//! family, `# TYPE x counter`, whose sample is `x_total`. Each parser takes
//! the other's counters for untyped series (or refuses them), so the
//! metrics file and `pinner metrics` are Prometheus text, and `pinner
//! metrics --openmetrics` gives OpenMetrics. Only counter, gauge and
//! summary types are used.

use crate::host::file::{self, WriteError};
use pinner_shared::protocol::{
    Counters, DomainStatus, LatencySummary, NodeNumaStatus, StatusReport,
};
use std::fmt::Write;
use std::path::Path;

/// A label value with `\`, `"` and newlines escaped: domain names are
/// whatever the operator (or a tenant) chose.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Which of the two text formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text 0.0.4: node_exporter's textfile collector, promtool.
    Prometheus,
    /// OpenMetrics 1.0 text.
    OpenMetrics,
}

struct Out(String, Format);

impl Out {
    /// Declares a family; a counter's `name` is its family's (the sample
    /// is `name_total`), declared as the format wants it.
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let declared = match (kind, self.1) {
            ("counter", Format::Prometheus) => format!("{name}_total"),
            _ => name.to_string(),
        };
        let _ = writeln!(self.0, "# HELP {declared} {help}\n# TYPE {declared} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            let inner: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", label(v)))
                .collect();
            let _ = write!(self.0, "{{{}}}", inner.join(","));
        }
        let _ = writeln!(self.0, " {value}");
    }

    /// A counter family with a sample per guest that has a `value`.
    fn guest_counter(
        &mut self,
        report: &StatusReport,
        name: &str,
        help: &str,
        value: impl Fn(&DomainStatus) -> Option<f64>,
    ) {
        self.family(name, "counter", help);
        let sample = format!("{name}_total");
        for d in &report.domains {
            if let Some(v) = value(d) {
                self.sample(&sample, &guest_labels(d), v);
            }
        }
    }

    /// A gauge family whose samples carry a guest's labels and one more:
    /// `samples` gives each guest's (label value, sample value) pairs.
    fn guest_gauge(
        &mut self,
        report: &StatusReport,
        name: &str,
        help: &str,
        extra: &str,
        samples: impl Fn(&DomainStatus) -> Vec<(String, f64)>,
    ) {
        self.family(name, "gauge", help);
        for d in &report.domains {
            for (value, sample) in samples(d) {
                let [domain, uuid] = guest_labels(d);
                self.sample(name, &[domain, uuid, (extra, value.as_str())], sample);
            }
        }
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, "counter", help);
        self.sample(&format!("{name}_total"), &[], value as f64);
    }
}

/// A guest's labels: its name and its UUID (names need not be unique, and
/// nova's instance id is the UUID).
fn guest_labels(d: &DomainStatus) -> [(&str, &str); 2] {
    [("domain", d.name.as_str()), ("uuid", d.uuid.as_str())]
}

/// The daemon's counters: family name, help, value.
type CounterFamily = (&'static str, &'static str, fn(&Counters) -> u64);

const COUNTERS: [CounterFamily; 4] = [
    ("pinner_hook_events", "Hook events received.", |c| {
        c.events_received
    }),
    (
        "pinner_hook_events_dropped",
        "Hook events the hook could not hand over to the daemon (since boot).",
        |c| c.hook_events_dropped,
    ),
    (
        "pinner_requests_refused",
        "Socket requests refused or dropped (bad frames, peers not allowed, too many connections).",
        |c| c.requests_refused,
    ),
    (
        "pinner_outside_pin_changes",
        "Pin changes libvirt reported that pinner did not make.",
        |c| c.outside_pin_changes,
    ),
];

/// Counters listed after the reconcile summary.
const PASS_COUNTERS: [CounterFamily; 8] = [
    (
        "pinner_event_reconciles",
        "Reconcile passes that served events.",
        |c| c.event_passes,
    ),
    ("pinner_pins_applied", "Pins changed.", |c| c.pins_applied),
    ("pinner_apply_errors", "Changes libvirt refused.", |c| {
        c.apply_errors
    }),
    (
        "pinner_libvirt_reconnects",
        "Reconnections to libvirt.",
        |c| c.libvirt_reconnects,
    ),
    (
        "pinner_libvirt_calls",
        "Calls made to libvirt (each a round trip to libvirtd): passes, status, releases.",
        |c| c.libvirt_calls,
    ),
    (
        "pinner_full_reads",
        "Passes that read every guest's XML, not only those events said changed.",
        |c| c.full_reads,
    ),
    (
        "pinner_changes_found_by_full_read",
        "Guest changes a full read found that no libvirt event had announced.",
        |c| c.changes_found_by_full_read,
    ),
    (
        "pinner_rebalance_moves",
        "Running shared guests moved by rebalancing (demand per pCPU out of balance).",
        |c| c.rebalance_moves,
    ),
];

/// The host's NUMA counters: family name, help, value.
type NumaFamily = (&'static str, &'static str, fn(&NodeNumaStatus) -> u64);

const NUMA_COUNTERS: [NumaFamily; 3] = [
    (
        "pinner_numa_hit_pages",
        "Allocations served from the intended node.",
        |n| n.numa_hit,
    ),
    (
        "pinner_numa_miss_pages",
        "Allocations meant for another node that landed on this one.",
        |n| n.numa_miss,
    ),
    (
        "pinner_numa_foreign_pages",
        "Allocations meant for this node that landed elsewhere.",
        |n| n.numa_foreign,
    ),
];

pub fn render(report: &StatusReport, format: Format) -> String {
    let mut out = Out(String::new(), format);
    daemon_families(&mut out, report);
    latency_family(&mut out, &report.pin_latency);
    guest_families(&mut out, report);
    host_families(&mut out, report);
    if format == Format::OpenMetrics {
        out.0.push_str("# EOF\n");
    }
    out.0
}

/// The connection and the daemon's counters.
fn daemon_families(out: &mut Out, report: &StatusReport) {
    let pending: usize = report.domains.iter().map(|d| d.pending.len()).sum();
    let gauges = [
        (
            "pinner_libvirt_connected",
            "1 when the daemon is connected to libvirt.",
            f64::from(u8::from(report.libvirt_connected)),
        ),
        (
            "pinner_enforcing",
            "1 when the daemon applies its plan (mode enforce), 0 when it only shows it (observe).",
            f64::from(u8::from(report.enforcement != "observe")),
        ),
        (
            "pinner_cpu_allocation_ratio",
            "vCPUs per pool CPU the host allows; shared guests' steal is judged against it.",
            report.cpu_allocation_ratio,
        ),
        (
            "pinner_pending_changes",
            "Pins and memory bindings the plan asks for that are not made yet (all of them in observe mode).",
            pending as f64,
        ),
    ];
    for (name, help, value) in gauges {
        out.family(name, "gauge", help);
        out.sample(name, &[], value);
    }
    let c = &report.counters;
    for (name, help, value) in COUNTERS {
        out.counter(name, help, value(c));
    }
    out.family(
        "pinner_reconcile_seconds",
        "summary",
        "Reconcile passes: how many, and the time they took in all.",
    );
    out.sample("pinner_reconcile_seconds_count", &[], c.reconciles as f64);
    out.sample("pinner_reconcile_seconds_sum", &[], c.reconcile_seconds);
    for (name, help, value) in PASS_COUNTERS {
        out.counter(name, help, value(c));
    }
}

fn latency_family(out: &mut Out, l: &LatencySummary) {
    out.family(
        "pinner_pin_latency_seconds",
        "summary",
        "From a guest's started event to its last pin, over the last guests started.",
    );
    if l.count > 0 {
        for (q, ms) in [("0.5", l.median_ms), ("0.99", l.p99_ms), ("1", l.max_ms)] {
            out.sample("pinner_pin_latency_seconds", &[("quantile", q)], ms / 1e3);
        }
    }
    out.sample("pinner_pin_latency_seconds_count", &[], l.count as f64);
}

fn guest_families(out: &mut Out, report: &StatusReport) {
    out.guest_gauge(
        report,
        "pinner_guest_in_sync",
        "1 when every pin of the guest matches the plan.",
        "policy",
        |d| vec![(d.policy.clone(), f64::from(u8::from(d.in_sync)))],
    );
    vcpu_families(out, report);
    out.guest_counter(
        report,
        "pinner_guest_steal_seconds",
        "Time the guest's vCPU threads waited for a host CPU, summed.",
        |d| d.steal_seconds,
    );
    // With the policy: a dedicated guest's steal pages, a shared one's is
    // judged against the allocation ratio.
    out.guest_gauge(
        report,
        "pinner_guest_steal_ratio",
        "Share of each vCPU's wall time spent waiting for a host CPU over the last interval.",
        "policy",
        |d| with_policy(d, d.steal_pct.map(|pct| pct / 100.0)),
    );
    out.guest_gauge(
        report,
        "pinner_guest_demand_cpus",
        "What the guest's vCPUs ran or waited runnable, in CPUs, smoothed over a 60 s half-life.",
        "policy",
        |d| with_policy(d, d.demand_cpus),
    );
    out.guest_gauge(
        report,
        "pinner_guest_memory_pages",
        "Resident pages on the guest's own NUMA nodes (local) and elsewhere (remote).",
        "locality",
        |d| match (d.memory_pages_local, d.memory_pages_remote) {
            (Some(local), Some(remote)) => vec![
                ("local".into(), local as f64),
                ("remote".into(), remote as f64),
            ],
            _ => Vec::new(),
        },
    );
}

/// A guest's sample labelled with its policy, when it has a value.
fn with_policy(d: &DomainStatus, value: Option<f64>) -> Vec<(String, f64)> {
    value.map(|v| (d.policy.clone(), v)).into_iter().collect()
}

/// Where each vCPU may run, as values: labels that changed with every pin
/// would make a new series each time.
fn vcpu_families(out: &mut Out, report: &StatusReport) {
    out.guest_gauge(
        report,
        "pinner_guest_vcpu_cpus",
        "How many host CPUs a vCPU may run on, as libvirt reports it (1: pinned one-to-one).",
        "vcpu",
        |d| {
            d.vcpus
                .iter()
                .map(|v| (v.vcpu.to_string(), v.cpus.len() as f64))
                .collect()
        },
    );
    out.guest_gauge(
        report,
        "pinner_guest_vcpu_cpu",
        "The host CPU of a vCPU pinned one-to-one (no sample for a vCPU with a range).",
        "vcpu",
        |d| {
            d.vcpus
                .iter()
                .filter_map(|v| match v.cpus.as_slice() {
                    [cpu] => Some((v.vcpu.to_string(), f64::from(*cpu))),
                    _ => None,
                })
                .collect()
        },
    );
}

/// The host's NUMA counters and isolation.
fn host_families(out: &mut Out, report: &StatusReport) {
    for (name, help, value) in NUMA_COUNTERS {
        out.family(name, "counter", help);
        for n in &report.numa {
            let node = n.node.to_string();
            out.sample(
                &format!("{name}_total"),
                &[("node", &node)],
                value(n) as f64,
            );
        }
    }
    memory_families(out, report);
    if let Some(count) = report.isolated_processes {
        out.family(
            "pinner_isolated_processes",
            "gauge",
            "Host processes kept on the reserved CPUs.",
        );
        out.sample("pinner_isolated_processes", &[], count as f64);
    }
}

/// Each node's guest memory of each kind against its room.
fn memory_families(out: &mut Out, report: &StatusReport) {
    out.family(
        "pinner_node_memory_capacity_bytes",
        "gauge",
        "What guests may take on a node, by kind (normal, hugepages-<size>kB): MemTotal less the hugepage pools and the host's reserve, or a pool less its reserved pages.",
    );
    for pool in &report.memory {
        if let Some(capacity) = pool.capacity_kib {
            let node = pool.node.to_string();
            let labels = [("node", node.as_str()), ("kind", pool.kind.as_str())];
            out.sample(
                "pinner_node_memory_capacity_bytes",
                &labels,
                (capacity * 1024) as f64,
            );
        }
    }
    out.family(
        "pinner_node_memory_committed_bytes",
        "gauge",
        "Guest memory placed on a node, by kind (guests pinner leaves alone included).",
    );
    for pool in &report.memory {
        let node = pool.node.to_string();
        let labels = [("node", node.as_str()), ("kind", pool.kind.as_str())];
        out.sample(
            "pinner_node_memory_committed_bytes",
            &labels,
            (pool.committed_kib * 1024) as f64,
        );
    }
}

/// Replaces `path` with `text`: whole (a scraper never reads half a file),
/// and safely in a directory a monitoring user may share (see
/// [`file::replace`]). World-readable: node_exporter runs as its own user.
pub fn write_file(path: &Path, text: &str) -> Result<(), WriteError> {
    file::replace(path, text.as_bytes(), 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pinner_shared::protocol::{
        Counters, DomainStatus, LatencySummary, NodeMemoryStatus, NodeNumaStatus, VcpuStatus,
    };

    fn report() -> StatusReport {
        StatusReport {
            mode: "dedicated".into(),
            cpu_allocation_ratio: 4.0,
            libvirt_connected: true,
            counters: Counters {
                events_received: 12,
                reconciles: 5,
                reconcile_seconds: 0.25,
                ..Counters::default()
            },
            pin_latency: LatencySummary {
                count: 3,
                median_ms: 15.0,
                p99_ms: 24.0,
                max_ms: 24.0,
            },
            domains: vec![DomainStatus {
                name: "web \"1\"\nx\\y".into(),
                uuid: "u-1".into(),
                policy: "dedicated".into(),
                in_sync: true,
                vcpus: vec![
                    VcpuStatus {
                        vcpu: 0,
                        cpus: vec![2, 3],
                        planned: vec![2, 3],
                    },
                    VcpuStatus {
                        vcpu: 1,
                        cpus: vec![5],
                        planned: vec![5],
                    },
                ],
                steal_pct: Some(1.5),
                steal_seconds: Some(7.25),
                memory_pages_local: Some(900),
                memory_pages_remote: Some(100),
                ..DomainStatus::default()
            }],
            numa: vec![NodeNumaStatus {
                node: 0,
                numa_hit: 1000,
                numa_miss: 7,
                ..NodeNumaStatus::default()
            }],
            isolated_processes: Some(42),
            memory: vec![NodeMemoryStatus {
                node: 1,
                kind: "hugepages-2048kB".into(),
                page_size_kib: Some(2048),
                capacity_kib: Some(1 << 20),
                committed_kib: 4096,
            }],
            ..StatusReport::default()
        }
    }

    #[test]
    fn renders_every_family_with_escaped_labels() {
        let text = render(&report(), Format::Prometheus);
        let guest = "domain=\"web \\\"1\\\"\\nx\\\\y\",uuid=\"u-1\"";
        for line in [
            "pinner_hook_events_total 12".to_string(),
            "pinner_hook_events_dropped_total 0".into(),
            "pinner_reconcile_seconds_count 5".into(),
            "pinner_reconcile_seconds_sum 0.25".into(),
            "pinner_pin_latency_seconds{quantile=\"0.5\"} 0.015".into(),
            "pinner_pin_latency_seconds_count 3".into(),
            format!("pinner_guest_in_sync{{{guest},policy=\"dedicated\"}} 1"),
            "pinner_cpu_allocation_ratio 4".into(),
            format!("pinner_guest_vcpu_cpus{{{guest},vcpu=\"0\"}} 2"),
            format!("pinner_guest_vcpu_cpus{{{guest},vcpu=\"1\"}} 1"),
            format!("pinner_guest_vcpu_cpu{{{guest},vcpu=\"1\"}} 5"),
            format!("pinner_guest_steal_seconds_total{{{guest}}} 7.25"),
            format!("pinner_guest_steal_ratio{{{guest},policy=\"dedicated\"}} 0.015"),
            format!("pinner_guest_memory_pages{{{guest},locality=\"remote\"}} 100"),
            "pinner_numa_miss_pages_total{node=\"0\"} 7".into(),
            "pinner_isolated_processes 42".into(),
            "pinner_node_memory_capacity_bytes{node=\"1\",kind=\"hugepages-2048kB\"} 1073741824"
                .into(),
            "pinner_node_memory_committed_bytes{node=\"1\",kind=\"hugepages-2048kB\"} 4194304"
                .into(),
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
        assert!(
            !text.contains("# EOF"),
            "a Prometheus text file ends without one"
        );
        assert!(
            !text.contains(&format!("pinner_guest_vcpu_cpu{{{guest},vcpu=\"0\"}}")),
            "a vCPU with a range has no single CPU:\n{text}"
        );
    }

    /// Each format declares every sample's family by the name its parsers
    /// look for, with help text.
    #[test]
    fn each_format_declares_every_sample_as_its_parsers_expect() {
        for format in [Format::Prometheus, Format::OpenMetrics] {
            let text = render(&report(), format);
            let mut declared: Vec<(String, String)> = Vec::new();
            let mut helped = Vec::new();
            for line in text.lines() {
                if let Some(rest) = line.strip_prefix("# TYPE ") {
                    let (name, kind) = rest.split_once(' ').unwrap();
                    declared.push((name.to_string(), kind.to_string()));
                } else if let Some(rest) = line.strip_prefix("# HELP ") {
                    helped.push(rest.split(' ').next().unwrap().to_string());
                } else if !line.starts_with('#') {
                    let name = line.split(['{', ' ']).next().unwrap();
                    let family =
                        declared
                            .iter()
                            .rev()
                            .find(|(f, kind)| match (kind.as_str(), format) {
                                ("counter", Format::Prometheus) => name == f,
                                ("counter", Format::OpenMetrics) => name == format!("{f}_total"),
                                ("summary", _) => {
                                    [f.clone(), format!("{f}_count"), format!("{f}_sum")]
                                        .contains(&name.to_string())
                                }
                                _ => name == f,
                            });
                    assert!(
                        family.is_some(),
                        "{format:?}: {name} not declared as its family"
                    );
                }
            }
            assert!(
                declared.iter().all(|(f, _)| helped.contains(f)),
                "{format:?}: a family without help"
            );
            assert_eq!(text.ends_with("# EOF\n"), format == Format::OpenMetrics);
        }
        let om = render(&report(), Format::OpenMetrics);
        assert!(om.contains("# TYPE pinner_hook_events counter\n"), "{om}");
        let prom = render(&report(), Format::Prometheus);
        assert!(
            prom.contains("# TYPE pinner_hook_events_total counter\n"),
            "{prom}"
        );
    }

    #[test]
    fn file_is_replaced_whole() {
        let dir = crate::test_support::scratch_dir("metrics-file");
        let path = dir.join("pinner.prom");
        write_file(&path, "a 1\n# EOF\n").unwrap();
        write_file(&path, &render(&report(), Format::Prometheus)).unwrap();
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .contains("pinner_reconcile_seconds_count 5"));
        assert!(!dir.join("pinner.prom.tmp").exists());
        let e = write_file(&dir.join("absent/pinner.prom"), "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("absent"), "{e}");
    }
}
