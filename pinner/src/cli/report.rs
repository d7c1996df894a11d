//! Human-readable renderings: the daemon's answers, plans, isolation and
//! the host's topology.

use crate::engine::cpuset::CpuSet;
use crate::engine::domain::DomainSpec;
use crate::engine::memory::{human, page_size_label};
use crate::engine::placement::Plan;
use crate::engine::reconcile::{self, node_memory};
use crate::engine::topology::{Cpu, CpuKind, Topology};
use pinner_shared::protocol::{
    CellStatus, DomainStatus, NodeMemoryStatus, RangeStatus, RebalanceStatus, ReconcileReport,
    Released, StatusReport,
};
use pinner_shared::text::printable as shown;
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
    let mut out = status_header(report);
    if report.domains.is_empty() {
        let _ = writeln!(out, "\nno running guests");
    }
    let name_width = report
        .domains
        .iter()
        .map(|d| shown(&d.name).chars().count())
        .max()
        .unwrap_or(0)
        .max(6);
    for d in &report.domains {
        guest_status(&mut out, d, name_width);
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
    out.push_str(&memory_text(&report.memory));
    out.push_str(&ranges_text(&report.ranges));
    out.push_str(&rebalanced_text(&report.rebalanced));
    if let Some(count) = report.isolated_processes {
        let _ = writeln!(out, "host processes on the reserved CPUs: {count}");
    }
    for w in &report.warnings {
        let _ = writeln!(out, "warning: {}", shown(&w.to_string()));
    }
    out
}

/// The mode, pool and connection, the counters and the pin latency.
fn status_header(report: &StatusReport) -> String {
    let mut out = String::new();
    if report.enforcement == "observe" {
        let _ = writeln!(
            out,
            "OBSERVE MODE: the plan is shown, nothing is applied (mode = \"enforce\" and `systemctl reload pinner` apply it)"
        );
    }
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
    if let Some(last) = &report.last_pass {
        let _ = writeln!(
            out,
            "last pass: {}   full reads: {} (changes no event announced: {})   libvirt calls: {}",
            pass_cost(last),
            c.full_reads,
            c.changes_found_by_full_read,
            c.libvirt_calls
        );
    }
    let l = &report.pin_latency;
    if l.count > 0 {
        let _ = writeln!(
            out,
            "started → pinned: median {:.1} ms   p99 {:.1} ms   max {:.1} ms   ({} guests)",
            l.median_ms, l.p99_ms, l.max_ms, l.count
        );
    }
    out
}

/// One guest: its line, each vCPU's and the emulator's CPUs (with the plan
/// where it differs), memory, and what was measured.
fn guest_status(out: &mut String, d: &DomainStatus, name_width: usize) {
    let _ = writeln!(
        out,
        "\n{:<name_width$}  {:<9}  {}  {}",
        shown(&d.name),
        d.policy,
        if d.in_sync { "in sync" } else { "PENDING" },
        shown(&d.reason)
    );
    if !d.pending.is_empty() {
        let texts: Vec<&str> = d.pending.iter().map(|p| p.text.as_str()).collect();
        let _ = writeln!(out, "  {}", texts.join("; "));
    }
    let planned = |out: &mut String, now: String, plan: Option<String>| {
        out.push_str(&now);
        if let Some(plan) = plan {
            let _ = write!(out, "   (plan: {plan})");
        }
        out.push('\n');
    };
    let differs =
        |now: &[u32], plan: &[u32], show: fn(&[u32]) -> String| (now != plan).then(|| show(plan));
    for v in &d.vcpus {
        let now = format!("  vcpu {:<3} -> {}", v.vcpu, cpus(&v.cpus));
        planned(out, now, differs(&v.cpus, &v.planned, cpus));
    }
    let now = format!("  emulator -> {}", cpus(&d.emulator));
    planned(out, now, differs(&d.emulator, &d.planned_emulator, cpus));
    if !d.memory_nodes.is_empty() || !d.planned_memory_nodes.is_empty() {
        let now = format!(
            "  memory   -> {}{}",
            nodes(&d.memory_nodes),
            guest_memory_size(d.memory_kib, d.hugepage_kib)
        );
        planned(
            out,
            now,
            differs(&d.memory_nodes, &d.planned_memory_nodes, nodes),
        );
    }
    if !d.memory_note.is_empty() {
        let _ = writeln!(out, "  memory: {}", d.memory_note);
    }
    if let Some(line) = measured_line(d) {
        let _ = writeln!(out, "  {line}");
    }
    for cell in &d.cells {
        let _ = writeln!(out, "  {}", cell_line(cell));
    }
}

/// " (4 GiB)", " (4 GiB in 2M pages)"; empty when the size is not known.
fn guest_memory_size(kib: u64, hugepage_kib: Option<u64>) -> String {
    match (kib, hugepage_kib) {
        (0, _) => String::new(),
        (kib, None) => format!(" ({})", human(kib)),
        (kib, Some(page)) => format!(" ({} in {} pages)", human(kib), page_size_label(page)),
    }
}

/// The nodes' guest memory against their room, one line per node:
/// "node 1: 12 of 15.5 GiB, 2M pages 256 of 1024".
/// A shared range in words: "CPUs 4-7 (node 1): 2 guests, 8 vCPUs,
/// demand 1.90 CPUs on 4 (0.47 per pCPU; 1 unmeasured)".
pub fn range_line(r: &RangeStatus) -> String {
    let cpus: CpuSet = r.cpus.iter().copied().collect();
    let nodes: Vec<String> = r.nodes.iter().map(ToString::to_string).collect();
    let unmeasured = match r.unmeasured {
        0 => String::new(),
        n => format!("; {n} unmeasured"),
    };
    format!(
        "CPUs {cpus} (node {}): {} guests, {} vCPUs, demand {:.2} CPUs on {} ({:.2} per pCPU{unmeasured})",
        nodes.join(","),
        r.guests,
        r.vcpus,
        r.demand_cpus,
        r.cpus.len(),
        r.demand_cpus / r.cpus.len().max(1) as f64
    )
}

/// The shared ranges, a line each (nothing when there are none).
pub fn ranges_text(ranges: &[RangeStatus]) -> String {
    if ranges.is_empty() {
        return String::new();
    }
    let mut out = String::from("\nshared ranges (demand against CPUs):\n");
    for r in ranges {
        let _ = writeln!(out, "  {}", range_line(r));
    }
    out
}

pub fn memory_text(pools: &[NodeMemoryStatus]) -> String {
    if pools
        .iter()
        .all(|p| p.committed_kib == 0 && p.capacity_kib.is_none())
    {
        return String::new();
    }
    let mut out = String::from("\nguest memory per node (committed of room):\n");
    let mut by_node: std::collections::BTreeMap<u32, Vec<NodeMemoryStatus>> = Default::default();
    for pool in pools {
        by_node.entry(pool.node).or_default().push(pool.clone());
    }
    let by_node = by_node
        .into_iter()
        .map(|(node, pools)| (node, pool_figures(&pools)));
    for (node, figures) in by_node {
        let _ = writeln!(out, "  node {node}: {}", figures.join(", "));
    }
    out
}

/// One node's pools in words: "12 of 15.5 GiB", "2M pages 256 of 1024"
/// (a pool of no pages that nothing uses says nothing: sysfs lists every
/// size the CPU has).
pub fn pool_figures(pools: &[NodeMemoryStatus]) -> Vec<String> {
    pools
        .iter()
        .filter(|p| p.committed_kib > 0 || p.capacity_kib != Some(0))
        .map(|pool| match (pool.page_size_kib, pool.capacity_kib) {
            (None, Some(room)) => format!(
                "{} of {}",
                human_short(pool.committed_kib, room),
                human(room)
            ),
            (None, None) => format!(
                "{} (the node's size is not known)",
                human(pool.committed_kib)
            ),
            (Some(page), room) => format!(
                "{} pages {} of {}",
                page_size_label(page),
                pool.committed_kib / page,
                room.unwrap_or(0) / page
            ),
        })
        .collect()
}

/// `kib` as [`human`] does, without the unit when it is `of`'s ("12" of
/// "16 GiB").
fn human_short(kib: u64, of: u64) -> String {
    let (part, whole) = (human(kib), human(of));
    match (part.strip_suffix(" GiB"), whole.ends_with(" GiB")) {
        (Some(number), true) => number.to_string(),
        _ => part,
    }
}

/// "cell 1 -> node 1: memory 99.2% there (8130 of 8192 pages)".
fn cell_line(cell: &CellStatus) -> String {
    let node = cell
        .node
        .map_or_else(|| "several nodes".to_string(), |n| format!("node {n}"));
    let memory = match (cell.pages_on_node, cell.pages_elsewhere) {
        (Some(on), Some(off)) if cell.node.is_some() => format!(
            "memory {} there ({on} of {} pages)",
            percent(on, on + off),
            on + off
        ),
        (Some(_), Some(_)) => "memory left where it is".to_string(),
        _ => "memory not located in qemu".to_string(),
    };
    format!("cell {} -> {node}: {memory}", cell.cell)
}

fn percent(part: u64, total: u64) -> String {
    if total == 0 {
        "-".into()
    } else {
        format!("{:.1}%", 100.0 * part as f64 / total as f64)
    }
}

/// "steal 0.4% (12.3 s in all)   demand 1.73 CPUs   memory 99.8% local
/// (16384 of 16420 pages)".
fn measured_line(d: &DomainStatus) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(seconds) = d.steal_seconds {
        let share = d
            .steal_pct
            .map_or_else(|| "-".into(), |p| format!("{p:.1}%"));
        parts.push(format!("steal {share} ({seconds:.1} s in all)"));
    }
    if let Some(cpus) = d.demand_cpus {
        parts.push(format!("demand {cpus:.2} CPUs"));
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

/// Running guests the plan does not place, with why.
fn left_alone<'a>(plan: &Plan, specs: &'a [DomainSpec]) -> Vec<(&'a str, String)> {
    specs
        .iter()
        .filter(|s| !plan.guests.iter().any(|g| g.uuid == s.uuid))
        .map(|s| {
            (
                s.name.as_str(),
                reconcile::policy_and_reason(s, plan, None).1,
            )
        })
        .collect()
}

/// The memory mode the daemon binds a guest's memory in: the one it has,
/// else `restrictive` (the one mode libvirt lets follow the vCPUs live).
fn memory_mode<'a>(specs: &'a [DomainSpec], uuid: &str) -> &'a str {
    specs
        .iter()
        .find(|s| s.uuid == uuid)
        .and_then(|s| s.memory_mode.as_deref())
        .unwrap_or("restrictive")
}

/// `pinner plan --json`, in the format DESIGN.md documents.
pub fn plan_json(plan: &Plan, specs: &[DomainSpec], ranges: &[RangeStatus]) -> serde_json::Value {
    let domains: Vec<serde_json::Value> = plan
        .guests
        .iter()
        .map(|g| {
            let memory: Vec<serde_json::Value> = g
                .memory
                .iter()
                .map(|(node, kind, kib)| serde_json::json!({"node": node, "kind": kind.metric_label(), "kib": kib}))
                .collect();
            serde_json::json!({
                "name": g.name,
                "uuid": g.uuid,
                "policy": g.placement.as_str(),
                "vcpus": g.vcpus.iter().enumerate()
                    .map(|(i, c)| serde_json::json!({"vcpu": i, "cpus": c.to_vec()}))
                    .collect::<Vec<_>>(),
                "emulator": g.emulator.to_vec(),
                "numa_nodes": g.numa_nodes,
                "memory_mode": g.memory_nodes.as_ref().map(|_| memory_mode(specs, &g.uuid)),
                "memory": memory,
                "cells": g.cells.iter()
                    .map(|c| serde_json::json!({"cell": c.cell, "nodes": c.nodes, "reason": c.reason}))
                    .collect::<Vec<_>>(),
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
        "memory": node_memory(plan),
        "warnings": plan.warnings.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "ranges": ranges,
    })
}

/// The moves rebalancing made, a line each.
fn rebalanced_text(moves: &[RebalanceStatus]) -> String {
    let mut out = String::new();
    for m in moves {
        let (from, to): (CpuSet, CpuSet) = (
            m.from.iter().copied().collect(),
            m.to.iter().copied().collect(),
        );
        let _ = writeln!(
            out,
            "rebalanced {}: CPUs {from} -> {to}{} ({:.2} vs {:.2} demand per pCPU)",
            shown(&m.domain),
            if m.across_nodes { ", across nodes" } else { "" },
            m.busy,
            m.idle
        );
    }
    out
}

pub fn plan_text(plan: &Plan, specs: &[DomainSpec], ranges: &[RangeStatus]) -> String {
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
        let _ = writeln!(out, "\n{}  {}", shown(&g.name), shown(&g.reason));
        for (vcpu, cpus) in g.vcpus.iter().enumerate() {
            let _ = writeln!(out, "  vcpu {vcpu:<3} -> {cpus}");
        }
        let _ = writeln!(out, "  emulator -> {}", g.emulator);
        if let Some(memory) = &g.memory_nodes {
            let size: u64 = g.memory.iter().map(|(_, _, kib)| kib).sum();
            let size = if size > 0 {
                format!("{}, ", human(size))
            } else {
                String::new()
            };
            let mode = memory_mode(specs, &g.uuid);
            let _ = writeln!(out, "  memory   -> {} ({size}{mode})", nodes(memory));
        }
    }
    for (name, why) in left_alone(plan, specs) {
        let _ = writeln!(out, "\n{}  {}", shown(name), shown(&why));
    }
    out.push_str(&memory_text(&node_memory(plan)));
    out.push_str(&ranges_text(ranges));
    for w in &plan.warnings {
        let _ = writeln!(out, "warning: {}", shown(&w.to_string()));
    }
    let _ = writeln!(out, "\n{} existing pins would move", plan.pins_moved);
    out
}

pub fn reconcile_text(report: &ReconcileReport) -> String {
    let mut out = format!(
        "reconciled {} domains ({} mode): {} pins changed\n{}\n",
        report.domains,
        report.mode,
        report.pins_changed,
        pass_cost(report)
    );
    for w in &report.warnings {
        let _ = writeln!(out, "warning: {}", shown(&w.to_string()));
    }
    for e in &report.errors {
        let _ = writeln!(out, "error: {}", shown(e));
    }
    out
}

/// "read 2 of 300 guests (those changed) in 3.1 ms, 3 libvirt calls".
fn pass_cost(report: &ReconcileReport) -> String {
    format!(
        "read {} of {} guests ({}) in {:.1} ms, {} libvirt calls",
        report.domains_read,
        report.domains,
        if report.full_read {
            "full read"
        } else {
            "those changed"
        },
        report.seconds * 1e3,
        report.libvirt_calls
    )
}

/// "sshd[812], cron[90] and 3 more".
fn process_list<'a>(processes: impl Iterator<Item = &'a crate::isolation::ProcessRef>) -> String {
    const SHOWN: usize = 8;
    let all: Vec<String> = processes
        .map(|p| format!("{}[{}]", shown(&p.name), p.pid))
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
    out.push_str(&not_moved_text(&sweep.failed));
    out.push_str(&steered_text(&sweep.irqs, &settings.reserved));
    if !kept_by_daemon {
        out.push_str(
            "note: processes started from now on are confined only by the daemon with [isolation] enabled = true\n",
        );
    }
    out
}

/// The IRQ lines of a sweep: what moved, what the kernel keeps, what failed.
fn steered_text(irqs: &crate::isolation::irqs::Steered, reserved: &CpuSet) -> String {
    let mut out = String::new();
    let mut moved = [&irqs.moved[..], &irqs.again[..]].concat();
    moved.sort_unstable();
    if !moved.is_empty() {
        let _ = writeln!(out, "steered IRQs {} to CPUs {reserved}", irq_list(&moved));
    }
    if !irqs.managed.is_empty() {
        let _ = writeln!(
            out,
            "IRQs {} keep their CPUs: managed by the kernel",
            irq_list(&irqs.managed)
        );
    }
    for e in &irqs.failed {
        let _ = writeln!(out, "could not steer: {}", shown(&e.to_string()));
    }
    out
}

/// "9, 24, 25".
fn irq_list(irqs: &[u32]) -> String {
    crate::isolation::irqs::irq_list(irqs, ", ")
}

pub fn undo_text(undo: &crate::isolation::Undo) -> String {
    let mut out = format!("{}\n", undo.summary());
    for e in &undo.irqs.failed {
        let _ = writeln!(out, "could not restore: {}", shown(&e.to_string()));
    }
    out
}

pub fn isolation_status_text(status: &crate::isolation::Status) -> String {
    let mut out = String::new();
    let reserved = match cpu_list(&status.reserved) {
        list if list.is_empty() => "none (reserved_cpus is not set)".to_string(),
        list => list,
    };
    let state = match (status.active, status.enabled) {
        (true, _) => "active",
        (false, true) => {
            "enabled, not applied (the daemon applies it at start; or pinner isolate apply)"
        }
        (false, false) => "off ([isolation] enabled = false; pinner isolate apply confines once)",
    };
    let _ = writeln!(
        out,
        "isolation: {state}\nmechanism: {}\nreserved CPUs: {reserved}",
        status.mechanism
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
    if status.active && !status.not_confined.is_empty() {
        let _ = writeln!(
            out,
            "not confined yet (the next sweep): {}",
            process_list(status.not_confined.iter())
        );
    }
    for (p, why) in &status.excluded {
        let _ = writeln!(
            out,
            "excluded: {}[{}]: {}",
            shown(&p.name),
            p.pid,
            shown(why)
        );
    }
    for (p, path) in &status.other_groups {
        let _ = writeln!(
            out,
            "left alone: {}[{}] is in cpuset group {} of another tool",
            shown(&p.name),
            p.pid,
            shown(path)
        );
    }
    out.push_str(&not_moved_text(&status.failed));
    out.push_str(&irq_status_text(&status.irqs));
    out
}

/// A line per process that could not be moved, with why.
fn not_moved_text(failed: &[crate::isolation::Failure]) -> String {
    failed
        .iter()
        .map(|f| {
            format!(
                "could not move {}[{}]: {}\n",
                shown(&f.name),
                f.pid,
                shown(&f.error)
            )
        })
        .collect()
}

/// A CPU list as the kernel writes one ("0-3,8").
fn cpu_list(cpus: &[u32]) -> String {
    cpus.iter().copied().collect::<CpuSet>().to_string()
}

fn irq_status_text(irqs: &crate::isolation::irqs::IrqStatus) -> String {
    let mut out = String::new();
    if !irqs.steered.is_empty() {
        let moved: Vec<String> = irqs
            .steered
            .iter()
            .map(|s| {
                let now = s.now.as_ref().map_or("gone".into(), |c| cpu_list(c));
                format!("{} ({} → {now})", s.irq, cpu_list(&s.before))
            })
            .collect();
        let _ = writeln!(out, "IRQs steered: {}", moved.join(", "));
    }
    if !irqs.managed.is_empty() {
        let _ = writeln!(
            out,
            "IRQs kept by the kernel (managed): {}",
            irq_list(&irqs.managed)
        );
    }
    if !irqs.on_guest_cpus.is_empty() {
        let _ = writeln!(
            out,
            "IRQs that can reach guest CPUs now: {}",
            irq_list(&irqs.on_guest_cpus)
        );
    }
    if let Some(advice) = &irqs.irqbalance {
        let _ = writeln!(out, "warning: {advice}");
    }
    out
}

/// The readable tree `pinner topology` prints.
pub fn topology_tree(topo: &Topology) -> String {
    let online: Vec<&Cpu> = topo.cpus.iter().filter(|c| c.online).collect();
    let mut out = topology_summary(topo, &online);
    topology_levels(&mut out, topo, &online);
    for node in topo.numa_nodes.iter().filter(|n| n.cpus.is_empty()) {
        let memory = node_memory_text(node);
        let _ = writeln!(out, "memory-only numa node {}{memory}", node.id);
    }
    out
}

/// ", 16384 MiB (15360 normal; 2M pages: 512, 500 free)": MemTotal, then
/// what normal pages have beside the hugepage pools, and each pool.
fn node_memory_text(node: &crate::engine::topology::NumaNode) -> String {
    let Some(total) = node.memory_mib else {
        return String::new();
    };
    let pools: Vec<String> = node
        .hugepages
        .iter()
        .filter(|p| p.total > 0)
        .map(|p| {
            format!(
                "{} pages: {}, {} free",
                page_size_label(p.size_kib),
                p.total,
                p.free
            )
        })
        .collect();
    if pools.is_empty() {
        return format!(", {total} MiB");
    }
    let normal = node.normal_memory_mib().unwrap_or(total);
    format!(", {total} MiB ({normal} normal; {})", pools.join("; "))
}

/// The counts line, and isolated CPUs where there are any.
fn topology_summary(topo: &Topology, online: &[&Cpu]) -> String {
    let count = |f: fn(&Cpu) -> Option<u32>| {
        let mut ids: Vec<u32> = online.iter().filter_map(|c| f(c)).collect();
        ids.sort();
        ids.dedup();
        ids.len()
    };
    let mut out = String::new();
    let offline: CpuSet = topo
        .cpus
        .iter()
        .filter(|c| !c.online)
        .map(|c| c.id)
        .collect();
    let _ = writeln!(
        out,
        "{} online ({}), offline: {}; {}, {}, {}, {}",
        counted(online.len(), "CPU", "CPUs"),
        topo.online,
        if offline.is_empty() {
            "none".into()
        } else {
            offline.to_string()
        },
        counted(count(|c| c.package), "package", "packages"),
        counted(
            topo.numa_nodes
                .iter()
                .filter(|n| !n.cpus.is_empty())
                .count(),
            "NUMA node",
            "NUMA nodes"
        ),
        counted(count(|c| c.core), "core", "cores"),
        counted(count(|c| c.l3), "L3 domain", "L3 domains"),
    );
    if !topo.isolated.is_empty() || !topo.nohz_full.is_empty() {
        let _ = writeln!(
            out,
            "isolated: {}   nohz_full: {}",
            topo.isolated, topo.nohz_full
        );
    }
    out
}

/// package → numa node → L3 → core lines, each level printed where it
/// changes.
fn topology_levels(out: &mut String, topo: &Topology, online: &[&Cpu]) {
    let label = |v: Option<u32>| v.map_or_else(|| "?".to_string(), |v| v.to_string());
    let mut last: (Option<u32>, Option<u32>, Option<u32>) =
        (Some(u32::MAX), Some(u32::MAX), Some(u32::MAX));
    let mut sorted = online.to_vec();
    sorted.sort_by_key(|c| (c.package, c.numa_node, c.l3, c.core, c.id));
    for cpu in sorted {
        if cpu.package != last.0 {
            let _ = writeln!(out, "package {}", label(cpu.package));
            last = (cpu.package, Some(u32::MAX), Some(u32::MAX));
        }
        if cpu.numa_node != last.1 {
            let node = topo.numa_nodes.iter().find(|n| Some(n.id) == cpu.numa_node);
            let memory = node.map_or_else(String::new, node_memory_text);
            let distances = node
                .filter(|n| !n.distances.is_empty())
                .map_or_else(String::new, |n| format!(", distances {:?}", n.distances));
            let _ = writeln!(
                out,
                "  numa node {}{memory}{distances}",
                label(cpu.numa_node)
            );
            last.1 = cpu.numa_node;
            last.2 = Some(u32::MAX);
        }
        if cpu.l3 != last.2 {
            let _ = writeln!(out, "    L3 {}", label(cpu.l3));
            last.2 = cpu.l3;
        }
        if cpu.smt_siblings.first() == Some(&cpu.id) || cpu.smt_siblings.is_empty() {
            let kind = match cpu.kind {
                Some(CpuKind::Performance) => " (performance)",
                Some(CpuKind::Efficiency) => " (efficiency)",
                None => "",
            };
            let siblings: CpuSet = cpu.smt_siblings.iter().copied().collect();
            let _ = writeln!(out, "      core {}: cpus {siblings}{kind}", label(cpu.core));
        }
    }
}

/// "1 core", "14 cores".
fn counted(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `pinner release`: per guest, what changed and what was left.
pub fn release_text(reports: &[Released]) -> String {
    let mut out = String::new();
    if reports.is_empty() {
        out.push_str("no running guest placed by pinner: nothing to release\n");
    }
    for r in reports {
        let _ = writeln!(out, "{}", shown(&r.name));
        for change in &r.changes {
            let _ = writeln!(out, "  {change}");
        }
        for note in &r.notes {
            let _ = writeln!(out, "  left: {}", shown(note));
        }
        if let Some(error) = &r.error {
            let _ = writeln!(out, "  error: {}", shown(error));
        }
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

    #[test]
    fn tree_counts_in_words_and_nests_package_node_l3_core() {
        // 2 nodes of 2 cores, 2 threads each; siblings numbered 4 apart.
        let tree = topology_tree(&Topology::synthetic(2, 1, 2, 2));
        let mut lines = tree.lines();
        assert_eq!(
            lines.next(),
            Some("8 CPUs online (0-7), offline: none; 1 package, 2 NUMA nodes, 4 cores, 2 L3 domains"),
            "{tree}"
        );
        assert!(tree.contains("package 0\n  numa node 0, 65536 MiB, distances [10, 16]\n    L3 0\n      core 0: cpus 0,4\n"), "{tree}");
        let one = topology_tree(&Topology::synthetic(1, 1, 1, 1));
        assert!(
            one.starts_with(
                "1 CPU online (0), offline: none; 1 package, 1 NUMA node, 1 core, 1 L3 domain\n"
            ),
            "{one}"
        );
    }
}
