//! Checks of the host, each a small function over the facts; their
//! findings' ids are the constants in `super::ids`.

use super::facts::Host;
use super::{finding, ids, Finding, Severity};
use crate::engine::cpuset::CpuSet;
use crate::isolation::irqs::irqbalance_fix;
use std::collections::BTreeMap;

/// A CPU spending this share of its time in softirqs is saturated.
const SOFTIRQ_SATURATED_PCT: f64 = 30.0;

type HostCheck = fn(&Host, &BTreeMap<&str, CpuSet>, &mut Vec<Finding>);

/// Every host check, in the order their findings are listed; each also
/// sees the guests' dedicated CPUs by guest UUID.
pub const CHECKS: &[HostCheck] = &[
    thp,
    ksm,
    numa_balancing,
    numad,
    irqbalance,
    idle_isolated,
    softirq,
];

/// PIN030: transparent hugepages off.
fn thp(host: &Host, _: &BTreeMap<&str, CpuSet>, out: &mut Vec<Finding>) {
    if host.thp.as_deref() == Some("never") {
        out.push(finding(
            ids::THP_OFF,
            Severity::Warning,
            None,
            "transparent hugepages are off",
            "/sys/kernel/mm/transparent_hugepage/enabled: [never]",
            "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled (persist: transparent_hugepage=madvise on the kernel command line); qemu asks for them, or give guests <memoryBacking><hugepages/></memoryBacking>",
        ));
    }
}

/// PIN031: KSM merging guest memory.
fn ksm(host: &Host, _: &BTreeMap<&str, CpuSet>, out: &mut Vec<Finding>) {
    if host.ksm_run == Some(1) {
        let across = host.ksm_merge_across_nodes == Some(1);
        let ksmtuned = host.processes.iter().any(|p| p == "ksmtuned");
        out.push(finding(
            ids::KSM,
            Severity::Warning,
            None,
            "KSM merges guest memory",
            format!(
                "/sys/kernel/mm/ksm/run = 1{}{}",
                if across { ", merge_across_nodes = 1 (pages shared across NUMA nodes)" } else { "" },
                if ksmtuned { "; ksmtuned is running" } else { "" }
            ),
            "systemctl disable --now ksmtuned ksm; echo 2 > /sys/kernel/mm/ksm/run (unmerges); if KSM must stay: echo 0 > /sys/kernel/mm/ksm/merge_across_nodes while run = 0",
        ));
    }
}

/// PIN032: automatic NUMA balancing.
fn numa_balancing(host: &Host, _: &BTreeMap<&str, CpuSet>, out: &mut Vec<Finding>) {
    if host.numa_balancing.is_some_and(|v| v != 0) {
        out.push(finding(
            ids::NUMA_BALANCING,
            Severity::Warning,
            None,
            "automatic NUMA balancing moves pinned guests' memory",
            format!("kernel.numa_balancing = {}", host.numa_balancing.unwrap_or(0)),
            "sysctl -w kernel.numa_balancing=0, and persist it: echo kernel.numa_balancing=0 > /etc/sysctl.d/90-pinner.conf",
        ));
    }
}

/// PIN033: numad placing guests too.
fn numad(host: &Host, _: &BTreeMap<&str, CpuSet>, out: &mut Vec<Finding>) {
    if host.processes.iter().any(|p| p == "numad") {
        out.push(finding(
            ids::NUMAD,
            Severity::Warning,
            None,
            "numad places guests too",
            "numad is running; it moves guests' memory and CPUs behind pinner",
            "systemctl disable --now numad",
        ));
    }
}

/// PIN034: irqbalance free to use dedicated CPUs.
fn irqbalance(host: &Host, dedicated: &BTreeMap<&str, CpuSet>, out: &mut Vec<Finding>) {
    let dedicated: CpuSet = dedicated.values().flat_map(CpuSet::to_vec).collect();
    if host.processes.iter().any(|p| p == "irqbalance") && !dedicated.is_empty() {
        let banned = host
            .irqbalance_banned
            .as_ref()
            .map_or_else(CpuSet::new, |(b, _)| b.clone());
        let exposed = dedicated.difference(&banned);
        if !exposed.is_empty() {
            out.push(finding(
                ids::IRQBALANCE,
                Severity::Warning,
                None,
                "irqbalance may route interrupts to dedicated CPUs",
                format!(
                    "irqbalance is running; dedicated CPUs {exposed} are not banned{}",
                    host.irqbalance_banned
                        .as_ref()
                        .map_or(String::new(), |(b, file)| format!(" ({file} bans {b})"))
                ),
                irqbalance_fix(&banned.union(&dedicated), None),
            ));
        }
    }
}

/// PIN035: isolated CPUs no guest may use.
fn idle_isolated(host: &Host, _: &BTreeMap<&str, CpuSet>, out: &mut Vec<Finding>) {
    if let Some(pool) = &host.pool {
        let idle = host.topology.isolated.difference(pool);
        if !idle.is_empty() {
            out.push(finding(
                ids::IDLE_ISOLATED,
                Severity::Info,
                None,
                "isolated CPUs that no guest may use",
                format!("isolcpus {} includes {idle}, outside pinner's pool {pool}: the scheduler puts nothing there and pinner places no guest there", host.topology.isolated),
                "drop them from isolcpus=, or take them out of reserved_cpus so guests get them",
            ));
        }
    }
}

/// PIN037: one CPU taking every network interrupt, saturated.
fn softirq(host: &Host, _: &BTreeMap<&str, CpuSet>, out: &mut Vec<Finding>) {
    let total_nic: u64 = host.nic_irqs.values().sum();
    if total_nic > 0 && host.topology.online.len() > 1 {
        if let Some((&cpu, &count)) = host.nic_irqs.iter().max_by_key(|(_, c)| **c) {
            let softirq = host.softirq_pct.get(&cpu).copied().unwrap_or(0.0);
            if count * 10 >= total_nic * 9 && softirq >= SOFTIRQ_SATURATED_PCT {
                out.push(finding(
                    ids::SOFTIRQ_SATURATED,
                    Severity::Warning,
                    None,
                    "one CPU takes every network interrupt and is saturated by softirqs",
                    format!("CPU {cpu}: {count} of {total_nic} network interrupts in the sample, {softirq:.0}% of its time in softirq"),
                    "spread the NIC's queues: enable more queues (ethtool -L DEV combined N), run irqbalance (banning dedicated CPUs), or set /proc/irq/N/smp_affinity_list per queue; RPS (/sys/class/net/DEV/queues/rx-*/rps_cpus) for single-queue NICs",
                ));
            }
        }
    }
}
