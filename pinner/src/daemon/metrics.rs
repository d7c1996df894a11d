//! The daemon's status as OpenMetrics text, for node_exporter's textfile
//! collector (which reads it as Prometheus text: only counter, gauge and
//! summary types are used, so both parsers take it).

use crate::engine::cpuset::CpuSet;
use pinner_shared::protocol::{
    Counters, DomainStatus, LatencySummary, NodeNumaStatus, StatusReport,
};
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// A label value with `\`, `"` and newlines escaped: domain names are
/// whatever the operator (or a tenant) chose.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# TYPE {name} {kind}\n# HELP {name} {help}");
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

    /// A family with one sample per guest that has a `value`.
    fn per_guest(
        &mut self,
        report: &StatusReport,
        name: &str,
        kind: &str,
        help: &str,
        value: impl Fn(&DomainStatus) -> Option<f64>,
    ) {
        self.family(name, kind, help);
        let sample = if kind == "counter" {
            format!("{name}_total")
        } else {
            name.to_string()
        };
        for d in &report.domains {
            if let Some(v) = value(d) {
                self.sample(&sample, &[("domain", &d.name)], v);
            }
        }
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, "counter", help);
        self.sample(&format!("{name}_total"), &[], value as f64);
    }
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
const PASS_COUNTERS: [CounterFamily; 4] = [
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

pub fn render(report: &StatusReport) -> String {
    let mut out = Out(String::new());
    daemon_families(&mut out, report);
    latency_family(&mut out, &report.pin_latency);
    guest_families(&mut out, report);
    host_families(&mut out, report);
    out.0.push_str("# EOF\n");
    out.0
}

/// The connection and the daemon's counters.
fn daemon_families(out: &mut Out, report: &StatusReport) {
    out.family(
        "pinner_libvirt_connected",
        "gauge",
        "1 when the daemon is connected to libvirt.",
    );
    out.sample(
        "pinner_libvirt_connected",
        &[],
        f64::from(u8::from(report.libvirt_connected)),
    );
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
    out.family(
        "pinner_guest_in_sync",
        "gauge",
        "1 when every pin of the guest matches the plan.",
    );
    for d in &report.domains {
        out.sample(
            "pinner_guest_in_sync",
            &[("domain", &d.name), ("policy", &d.policy)],
            f64::from(u8::from(d.in_sync)),
        );
    }
    out.family(
        "pinner_guest_vcpu_pin_info",
        "gauge",
        "A vCPU's host CPUs as libvirt reports them (value 1).",
    );
    for d in &report.domains {
        for v in &d.vcpus {
            let cpus: CpuSet = v.cpus.iter().copied().collect();
            let vcpu = v.vcpu.to_string();
            let labels = [
                ("domain", d.name.as_str()),
                ("vcpu", &vcpu),
                ("cpus", &cpus.to_string()),
            ];
            out.sample("pinner_guest_vcpu_pin_info", &labels, 1.0);
        }
    }
    out.per_guest(
        report,
        "pinner_guest_steal_seconds",
        "counter",
        "Time the guest's vCPU threads waited for a host CPU, summed.",
        |d| d.steal_seconds,
    );
    out.per_guest(
        report,
        "pinner_guest_steal_ratio",
        "gauge",
        "Share of each vCPU's wall time spent waiting for a host CPU over the last interval.",
        |d| d.steal_pct.map(|pct| pct / 100.0),
    );
    out.family(
        "pinner_guest_memory_pages",
        "gauge",
        "Resident pages on the guest's own NUMA nodes (local) and elsewhere (remote).",
    );
    for d in &report.domains {
        if let (Some(local), Some(remote)) = (d.memory_pages_local, d.memory_pages_remote) {
            for (locality, pages) in [("local", local), ("remote", remote)] {
                let labels = [("domain", d.name.as_str()), ("locality", locality)];
                out.sample("pinner_guest_memory_pages", &labels, pages as f64);
            }
        }
    }
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

/// Replaces `path` with `text` atomically: a scraper never reads half a file.
pub fn write_file(path: &Path, text: &str) -> Result<(), MetricsFileError> {
    let tmp = path.with_extension("prom.tmp");
    std::fs::write(&tmp, text).map_err(|source| MetricsFileError::Write {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        MetricsFileError::Replace {
            path: path.to_path_buf(),
            source,
        }
    })
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsFileError {
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot replace {}: {source}", path.display())]
    Replace {
        path: PathBuf,
        source: std::io::Error,
    },
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
                policy: "dedicated".into(),
                in_sync: true,
                vcpus: vec![VcpuStatus {
                    vcpu: 0,
                    cpus: vec![2, 3],
                    planned: vec![2, 3],
                }],
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
    fn renders_every_family_with_escaped_labels_and_eof() {
        let text = render(&report());
        for line in [
            "pinner_hook_events_total 12",
            "pinner_hook_events_dropped_total 0",
            "pinner_reconcile_seconds_count 5",
            "pinner_reconcile_seconds_sum 0.25",
            "pinner_pin_latency_seconds{quantile=\"0.5\"} 0.015",
            "pinner_pin_latency_seconds_count 3",
            "pinner_guest_in_sync{domain=\"web \\\"1\\\"\\nx\\\\y\",policy=\"dedicated\"} 1",
            "pinner_guest_vcpu_pin_info{domain=\"web \\\"1\\\"\\nx\\\\y\",vcpu=\"0\",cpus=\"2-3\"} 1",
            "pinner_guest_steal_seconds_total{domain=\"web \\\"1\\\"\\nx\\\\y\"} 7.25",
            "pinner_guest_steal_ratio{domain=\"web \\\"1\\\"\\nx\\\\y\"} 0.015",
            "pinner_guest_memory_pages{domain=\"web \\\"1\\\"\\nx\\\\y\",locality=\"remote\"} 100",
            "pinner_numa_miss_pages_total{node=\"0\"} 7",
            "pinner_isolated_processes 42",
            "pinner_node_memory_capacity_bytes{node=\"1\",kind=\"hugepages-2048kB\"} 1073741824",
            "pinner_node_memory_committed_bytes{node=\"1\",kind=\"hugepages-2048kB\"} 4194304",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        // Every sample line belongs to a family declared before it.
        let mut declared = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.push(rest.split(' ').next().unwrap().to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(
                    declared.iter().any(|f| name.starts_with(f.as_str())),
                    "{name} undeclared"
                );
            }
        }
    }

    #[test]
    fn file_is_replaced_whole() {
        let dir = crate::test_support::scratch_dir("metrics-file");
        let path = dir.join("pinner.prom");
        write_file(&path, "a 1\n# EOF\n").unwrap();
        write_file(&path, &render(&report())).unwrap();
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .contains("pinner_reconcile_seconds_count 5"));
        assert!(!dir.join("pinner.prom.tmp").exists());
        let e = write_file(&dir.join("absent/pinner.prom"), "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot write"), "{e}");
    }
}
