//! Human-readable renderings of the daemon's answers.

use crate::cpuset::CpuSet;
use pinner_shared::protocol::{ReconcileReport, StatusReport};
use std::fmt::Write;

fn cpus(list: &[u32]) -> String {
    if list.is_empty() {
        "-".into()
    } else {
        list.iter().copied().collect::<CpuSet>().to_string()
    }
}

pub fn status_text(report: &StatusReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "mode: {}   pool: {}   reserved: {}   libvirt: {}",
        report.mode,
        cpus(&report.pool),
        cpus(&report.reserved),
        if report.libvirt_connected {
            "connected"
        } else {
            "NOT CONNECTED"
        }
    );
    let c = &report.counters;
    let _ = writeln!(
        out,
        "events: {}   reconciles: {}   pins applied: {}   apply errors: {}   libvirt reconnects: {}",
        c.events_received, c.reconciles, c.pins_applied, c.apply_errors, c.libvirt_reconnects
    );
    if report.domains.is_empty() {
        let _ = writeln!(out, "\nno running guests");
    }
    let name_width = report
        .domains
        .iter()
        .map(|d| d.name.chars().count())
        .max()
        .unwrap_or(0)
        .max(6);
    for d in &report.domains {
        let _ = writeln!(
            out,
            "\n{:<name_width$}  {:<9}  {}  {}",
            d.name,
            d.policy,
            if d.in_sync { "in sync" } else { "PENDING" },
            d.reason
        );
        for v in &d.vcpus {
            let mark = if v.cpus == v.planned {
                ""
            } else {
                "   (plan: "
            };
            let _ = write!(out, "  vcpu {:<3} -> {}", v.vcpu, cpus(&v.cpus));
            if !mark.is_empty() {
                let _ = write!(out, "{mark}{})", cpus(&v.planned));
            }
            out.push('\n');
        }
        let _ = write!(out, "  emulator -> {}", cpus(&d.emulator));
        if d.emulator != d.planned_emulator {
            let _ = write!(out, "   (plan: {})", cpus(&d.planned_emulator));
        }
        out.push('\n');
    }
    for w in &report.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}

pub fn reconcile_text(report: &ReconcileReport) -> String {
    let mut out = format!(
        "reconciled {} domains ({} mode): {} pins changed\n",
        report.domains, report.mode, report.pins_changed
    );
    for w in &report.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    for e in &report.errors {
        let _ = writeln!(out, "error: {e}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use pinner_shared::protocol::{DomainStatus, VcpuStatus};

    #[test]
    fn status_shows_pins_and_pending_plan() {
        let report = StatusReport {
            mode: "dedicated".into(),
            pool: vec![2, 3, 4],
            reserved: vec![0, 1],
            libvirt_connected: true,
            domains: vec![DomainStatus {
                name: "vm1".into(),
                policy: "dedicated".into(),
                vcpus: vec![
                    VcpuStatus {
                        vcpu: 0,
                        cpus: vec![2],
                        planned: vec![2],
                    },
                    VcpuStatus {
                        vcpu: 1,
                        cpus: vec![],
                        planned: vec![3],
                    },
                ],
                emulator: vec![0, 1],
                planned_emulator: vec![0, 1],
                in_sync: false,
                reason: "dedicated: fits node 0".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = status_text(&report);
        assert!(
            text.starts_with("mode: dedicated   pool: 2-4   reserved: 0-1   libvirt: connected\n"),
            "{text}"
        );
        assert!(
            text.contains("vm1     dedicated  PENDING  dedicated: fits node 0"),
            "{text}"
        );
        assert!(text.contains("  vcpu 0   -> 2\n"), "{text}");
        assert!(text.contains("  vcpu 1   -> -   (plan: 3)\n"), "{text}");
        assert!(text.contains("  emulator -> 0-1\n"), "{text}");
    }
}
