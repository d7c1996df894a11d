//! What rebalancing sees of a plan: the shared pool's node shares and L3
//! ranges, and each shared guest's range, demand and where its memory fits.

use super::layout::Layout;
use super::{GuestPlan, Load, Placement, Plan};
use crate::engine::cpuset::CpuSet;
use crate::engine::memory::{PageKind, PoolFigures};
use crate::engine::rebalance::{HostLoad, NodeShare, Tenant};
use crate::engine::topology::Topology;
use std::collections::BTreeMap;

/// The shared guests of `plan` on `topo`, weighed by `load`.
pub fn host_load(topo: &Topology, plan: &Plan, load: &Load) -> HostLoad {
    let layout = Layout::new(topo);
    let dedicated = plan
        .guests
        .iter()
        .filter(|g| g.placement == Placement::Dedicated)
        .flat_map(|g| g.vcpus.iter().flat_map(CpuSet::iter))
        .collect::<CpuSet>();
    let shared_pool = plan.pool.difference(&dedicated);
    let mut nodes = Vec::new();
    for (kind, cpus) in layout.by_kind(&shared_pool) {
        for (node, share) in layout.by_node(&cpus) {
            let l3s = layout.by_l3(&share).into_values().collect();
            nodes.push(NodeShare {
                node,
                kind,
                cpus: share,
                l3s,
            });
        }
    }
    let tenants = plan
        .guests
        .iter()
        .filter(|g| g.placement == Placement::Shared)
        .map(|g| tenant(g, &nodes, load, &plan.memory))
        .collect();
    HostLoad { nodes, tenants }
}

fn tenant(g: &GuestPlan, nodes: &[NodeShare], load: &Load, memory: &[PoolFigures]) -> Tenant {
    let range = g.vcpu_cpus();
    let whole = g.cells.is_empty() && g.vcpus.iter().all(|v| *v == range);
    let placed = nodes
        .iter()
        .any(|n| n.cpus == range || n.l3s.contains(&range));
    let vcpus = g.vcpus.len() as u32;
    let measured = load.demand.contains_key(&g.uuid);
    let settling = load.settling.contains(&g.uuid);
    let demand = load.demand_of(&g.uuid, vcpus);
    // Not known well yet: taken for at least as busy as the prior.
    let demand = if settling {
        demand.max(load.prior_per_vcpu * f64::from(vcpus))
    } else {
        demand
    };
    Tenant {
        uuid: g.uuid.clone(),
        name: g.name.clone(),
        // Moved only for a demand measured long enough to go by.
        movable: whole && placed && !g.memory_unbound && measured && !settling,
        range,
        vcpus,
        demand,
        fits: fitting_nodes(g, memory),
    }
}

/// The nodes whose room holds all of `g`'s memory beside what the plan
/// commits there (its own memory there counted as room).
fn fitting_nodes(g: &GuestPlan, memory: &[PoolFigures]) -> Vec<u32> {
    let mut need: BTreeMap<PageKind, u64> = BTreeMap::new();
    for (_, kind, kib) in &g.memory {
        *need.entry(*kind).or_default() += kib;
    }
    let mut nodes: Vec<u32> = memory.iter().map(|f| f.node).collect();
    nodes.sort_unstable();
    nodes.dedup();
    nodes.retain(|&node| {
        need.iter().all(|(kind, kib)| {
            let own: u64 = g
                .memory
                .iter()
                .filter(|(n, k, _)| *n == node && k == kind)
                .map(|(_, _, kib)| kib)
                .sum();
            memory
                .iter()
                .find(|f| f.node == node && f.kind == *kind)
                .is_some_and(|f| {
                    f.capacity_kib
                        .is_none_or(|cap| f.committed_kib.saturating_sub(own) + kib <= cap)
                })
        })
    });
    nodes
}
