//! Human-readable renderings of the daemon's answers.

use crate::cpuset::CpuSet;
use crate::domain::DomainSpec;
use crate::placement::Plan;
use pinner_shared::protocol::{DomainStatus, ReconcileReport, StatusReport};
use std::fmt::Write;

fn cpus(list: &[u32]) -> String {
    if list.is_empty() {
        "-".into()
    } else {
        list.iter().copied().collect::<CpuSet>().to_string()
    }
}

/// "node 1", "nodes 0-1".
fn nodes(list: &[u32]) -> String {
    let noun = if list.len() > 1 { "nodes" } else { "node" };
    format!("{noun} {}", cpus(list))
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
        "events: {} hook ({} dropped by the hook), {} outside pin changes   reconciles: {} ({} for events)   pins applied: {}   apply errors: {}   libvirt reconnects: {}",
        c.events_received,
        c.hook_events_dropped,
        c.outside_pin_changes,
        c.reconciles,
        c.event_passes,
        c.pins_applied,
        c.apply_errors,
        c.libvirt_reconnects
    );
    let l = &report.pin_latency;
    if l.count > 0 {
        let _ = writeln!(
            out,
            "started → pinned: median {:.1} ms   p99 {:.1} ms   max {:.1} ms   ({} guests)",
            l.median_ms, l.p99_ms, l.max_ms, l.count
        );
    }
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
        if !d.memory_nodes.is_empty() || !d.planned_memory_nodes.is_empty() {
            let _ = write!(out, "  memory   -> {}", nodes(&d.memory_nodes));
            if d.memory_nodes != d.planned_memory_nodes {
                let _ = write!(out, "   (plan: {})", nodes(&d.planned_memory_nodes));
            }
            out.push('\n');
        }
        if !d.memory_note.is_empty() {
            let _ = writeln!(out, "  memory: {}", d.memory_note);
        }
        if let Some(line) = measured_line(d) {
            let _ = writeln!(out, "  {line}");
        }
    }
    if !report.numa.is_empty() {
        let _ = writeln!(out);
        for n in &report.numa {
            let total = n.numa_hit + n.numa_miss;
            let _ = writeln!(
                out,
                "node {}: numa_hit {}  numa_miss {} ({})  numa_foreign {}",
                n.node,
                n.numa_hit,
                n.numa_miss,
                percent(n.numa_miss, total),
                n.numa_foreign
            );
        }
    }
    if let Some(count) = report.isolated_processes {
        let _ = writeln!(out, "host processes on the reserved CPUs: {count}");
    }
    for w in &report.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}

fn percent(part: u64, total: u64) -> String {
    if total == 0 {
        "-".into()
    } else {
        format!("{:.1}%", 100.0 * part as f64 / total as f64)
    }
}

/// "steal 0.4% (12.3 s)   memory 99.8% local (16384 of 16420 pages)".
fn measured_line(d: &DomainStatus) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(seconds) = d.steal_seconds {
        let share = d
            .steal_pct
            .map_or_else(|| "-".into(), |p| format!("{p:.1}%"));
        parts.push(format!("steal {share} ({seconds:.1} s in all)"));
    }
    if let (Some(local), Some(remote)) = (d.memory_pages_local, d.memory_pages_remote) {
        parts.push(format!(
            "memory {} local ({local} of {} pages)",
            percent(local, local + remote),
            local + remote
        ));
    }
    (!parts.is_empty()).then(|| parts.join("   "))
}

/// Running guests the plan leaves alone, with why.
fn left_alone<'a>(plan: &Plan, specs: &'a [DomainSpec]) -> Vec<(&'a str, &'static str)> {
    specs
        .iter()
        .filter(|s| {
            !plan
                .guests
                .iter()
                .any(|g| g.uuid == s.uuid && g.name == s.name)
        })
        .map(|s| {
            let why = if s.is_foreign() {
                "pinned by someone else"
            } else if s
                .metadata
                .as_ref()
                .is_some_and(|m| m.policy == crate::domain::Policy::None)
            {
                "opted out (policy none)"
            } else {
                "no vCPUs"
            };
            (s.name.as_str(), why)
        })
        .collect()
}

/// `pinner plan --json`, in the format DESIGN.md documents.
pub fn plan_json(plan: &Plan, specs: &[DomainSpec]) -> serde_json::Value {
    let domains: Vec<serde_json::Value> = plan
        .guests
        .iter()
        .map(|g| {
            serde_json::json!({
                "name": g.name,
                "uuid": g.uuid,
                "policy": g.placement.as_str(),
                "vcpus": g.vcpus.iter().enumerate()
                    .map(|(i, c)| serde_json::json!({"vcpu": i, "cpus": c.to_vec()}))
                    .collect::<Vec<_>>(),
                "emulator": g.emulator.to_vec(),
                "numa_nodes": g.numa_nodes,
                "memory_mode": g.memory_nodes.as_ref().map(|_| "strict"),
                "reason": g.reason,
            })
        })
        .collect();
    let alone: Vec<serde_json::Value> = left_alone(plan, specs)
        .into_iter()
        .map(|(name, why)| serde_json::json!({"name": name, "reason": why}))
        .collect();
    serde_json::json!({
        "mode": plan.mode.as_str(),
        "pool": plan.pool.to_vec(),
        "reserved": plan.reserved.to_vec(),
        "domains": domains,
        "left_alone": alone,
        "pins_moved": plan.pins_moved,
        "warnings": plan.warnings,
    })
}

pub fn plan_text(plan: &Plan, specs: &[DomainSpec]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "mode: {}   pool: {}   reserved: {}",
        plan.mode.as_str(),
        plan.pool,
        if plan.reserved.is_empty() {
            "-".to_string()
        } else {
            plan.reserved.to_string()
        }
    );
    for g in &plan.guests {
        let _ = writeln!(out, "\n{}  {}", g.name, g.reason);
        for (vcpu, cpus) in g.vcpus.iter().enumerate() {
            let _ = writeln!(out, "  vcpu {vcpu:<3} -> {cpus}");
        }
        let _ = writeln!(out, "  emulator -> {}", g.emulator);
        if let Some(memory) = &g.memory_nodes {
            let _ = writeln!(out, "  memory   -> {} (strict)", nodes(memory));
        }
    }
    for (name, why) in left_alone(plan, specs) {
        let _ = writeln!(out, "\n{name}  left alone: {why}");
    }
    for w in &plan.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    let _ = writeln!(out, "\n{} existing pins would move", plan.pins_moved);
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

/// "sshd[812], cron[90] and 3 more".
fn process_list<'a>(processes: impl Iterator<Item = &'a crate::isolation::ProcessRef>) -> String {
    const SHOWN: usize = 8;
    let all: Vec<String> = processes
        .map(|p| format!("{}[{}]", p.name, p.pid))
        .collect();
    let mut text = all
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if all.len() > SHOWN {
        let _ = write!(text, " and {} more", all.len() - SHOWN);
    }
    text
}

pub fn sweep_text(
    sweep: &crate::isolation::Sweep,
    settings: &crate::isolation::Settings,
    kept_by_daemon: bool,
) -> String {
    let mut out = format!(
        "confined {} processes to housekeeping CPUs {}",
        sweep.moved.len(),
        settings.reserved
    );
    if !sweep.moved.is_empty() {
        let _ = write!(out, ": {}", process_list(sweep.moved.iter()));
    }
    out.push('\n');
    for f in &sweep.failed {
        let _ = writeln!(out, "could not move {}[{}]: {}", f.name, f.pid, f.error);
    }
    if !kept_by_daemon {
        out.push_str(
            "note: processes started from now on are confined only by the daemon with [isolation] enabled = true\n",
        );
    }
    out
}

pub fn undo_text(undo: &crate::isolation::Undo) -> String {
    let mut out = format!("put {} processes back", undo.restored);
    if !undo.removed_groups.is_empty() {
        let _ = write!(out, "; removed {}", undo.removed_groups.join(", "));
    }
    if !undo.reset_units.is_empty() {
        let _ = write!(
            out,
            "; reset AllowedCPUs of {}",
            undo.reset_units.join(", ")
        );
    }
    out.push('\n');
    out
}

pub fn isolation_status_text(status: &crate::isolation::Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "isolation: {} ({}), reserved CPUs {}",
        if status.active { "active" } else { "off" },
        status.mechanism,
        status.reserved_cpus
    );
    if let Some(group) = &status.group {
        let _ = writeln!(out, "group: {group}");
    }
    if !status.units.is_empty() {
        let _ = writeln!(out, "units: {}", status.units.join(", "));
    }
    let _ = writeln!(
        out,
        "confined: {}; guests (left on their CPUs): {}; kernel threads (never moved): {}",
        status.confined,
        status.guests.len(),
        status.kernel_threads
    );
    if !status.not_confined.is_empty() {
        let _ = writeln!(
            out,
            "not confined yet: {}",
            process_list(status.not_confined.iter())
        );
    }
    for (p, why) in &status.excluded {
        let _ = writeln!(out, "excluded: {}[{}]: {why}", p.name, p.pid);
    }
    for (p, path) in &status.other_groups {
        let _ = writeln!(
            out,
            "left alone: {}[{}] is in cpuset group {path} of another tool",
            p.name, p.pid
        );
    }
    for f in &status.failed {
        let _ = writeln!(out, "could not move: {}[{}]: {}", f.name, f.pid, f.error);
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
                memory_nodes: vec![],
                planned_memory_nodes: vec![0],
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
        assert!(
            text.contains("  memory   -> node -   (plan: node 0)\n"),
            "{text}"
        );
    }
}
