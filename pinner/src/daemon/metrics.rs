//! The daemon's status as OpenMetrics text, for node_exporter's textfile
//! collector (which reads it as Prometheus text: only counter, gauge and
//! summary types are used, so both parsers take it).

use crate::engine::cpuset::CpuSet;
use pinner_shared::protocol::{DomainStatus, StatusReport};
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

pub fn render(report: &StatusReport) -> String {
    let mut out = Out(String::new());
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
    out.counter(
        "pinner_hook_events",
        "Hook events received.",
        c.events_received,
    );
    out.counter(
        "pinner_hook_events_dropped",
        "Hook events the hook could not hand over to the daemon (since boot).",
        c.hook_events_dropped,
    );
    out.counter(
        "pinner_requests_refused",
        "Socket requests refused or dropped (bad frames, peers not allowed, too many connections).",
        c.requests_refused,
    );
    out.counter(
        "pinner_outside_pin_changes",
        "Pin changes libvirt reported that pinner did not make.",
        c.outside_pin_changes,
    );
    out.family(
        "pinner_reconcile_seconds",
        "summary",
        "Reconcile passes: how many, and the time they took in all.",
    );
    out.sample("pinner_reconcile_seconds_count", &[], c.reconciles as f64);
    out.sample("pinner_reconcile_seconds_sum", &[], c.reconcile_seconds);
    out.counter(
        "pinner_event_reconciles",
        "Reconcile passes that served events.",
        c.event_passes,
    );
    out.counter("pinner_pins_applied", "Pins changed.", c.pins_applied);
    out.counter(
        "pinner_apply_errors",
        "Changes libvirt refused.",
        c.apply_errors,
    );
    out.counter(
        "pinner_libvirt_reconnects",
        "Reconnections to libvirt.",
        c.libvirt_reconnects,
    );

    let l = &report.pin_latency;
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
            out.sample(
                "pinner_guest_vcpu_pin_info",
                &[
                    ("domain", &d.name),
                    ("vcpu", &v.vcpu.to_string()),
                    ("cpus", &cpus.to_string()),
                ],
                1.0,
            );
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
                out.sample(
                    "pinner_guest_memory_pages",
                    &[("domain", &d.name), ("locality", locality)],
                    pages as f64,
                );
            }
        }
    }
    for (name, help, value) in [
        (
            "pinner_numa_hit_pages",
            "Allocations served from the intended node.",
            (|n: &pinner_shared::protocol::NodeNumaStatus| n.numa_hit) as fn(&_) -> u64,
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
    ] {
        out.family(name, "counter", help);
        for n in &report.numa {
            out.sample(
                &format!("{name}_total"),
                &[("node", &n.node.to_string())],
                value(n) as f64,
            );
        }
    }
    if let Some(count) = report.isolated_processes {
        out.family(
            "pinner_isolated_processes",
            "gauge",
            "Host processes kept on the reserved CPUs.",
        );
        out.sample("pinner_isolated_processes", &[], count as f64);
    }
    out.0.push_str("# EOF\n");
    out.0
}

/// Replaces `path` with `text` atomically: a scraper never reads half a file.
pub fn write_file(path: &Path, text: &str) -> Result<(), String> {
    let shown = path.display();
    let tmp = path.with_extension("prom.tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot replace {shown}: {e}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pinner_shared::protocol::{
        Counters, DomainStatus, LatencySummary, NodeNumaStatus, VcpuStatus,
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
        let e = write_file(&dir.join("absent/pinner.prom"), "x").unwrap_err();
        assert!(e.contains("cannot write"), "{e}");
    }
}
