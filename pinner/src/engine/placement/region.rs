//! Which nodes a guest (or a cell) takes its CPUs from: where it is if that
//! still holds it, else the node that fits it most tightly by CPUs among
//! those whose memory holds it, else the fewest closest nodes that hold its
//! CPUs and memory together, else (memory fits no set of nodes) the nodes
//! its CPUs alone would get, its memory then left unbound.

use super::layout::{join_nodes, node_label, Layout};
use super::memory::{Fit, Target, Weights};
use crate::engine::cpuset::CpuSet;
use crate::engine::memory::human;
use std::cmp::Reverse;
use std::collections::BTreeMap;

/// The CPUs to pick from, why, and where the memory goes.
pub(super) struct Region {
    pub(super) cpus: CpuSet,
    pub(super) reason: String,
    /// What the reason adds about memory, after any L3 or core kind note:
    /// " (memory 12 of 16 GiB left)", "; memory not bound: …".
    pub(super) note: String,
    /// vCPUs per node, for a span chosen for memory (vCPUs spread as the
    /// memory is); empty: anywhere in `cpus`.
    pub(super) quotas: Vec<(Option<u32>, usize)>,
    pub(super) target: Target,
}

impl Region {
    fn on(cpus: CpuSet, reason: String) -> Region {
        Region {
            cpus,
            reason,
            note: String::new(),
            quotas: Vec::new(),
            target: Target::cpus(),
        }
    }
}

/// The nodes to take `need` CPUs from `candidates` for a guest that runs
/// on `home` now (its pins, or the range it shared: its memory is there).
pub(super) fn choose_nodes(
    layout: &Layout,
    candidates: &CpuSet,
    home: &CpuSet,
    need: usize,
    fit: &Fit,
) -> Region {
    let by_node = layout.by_node(candidates);
    let home_nodes = layout.nodes_opt(home);
    let room = home_nodes
        .iter()
        .filter_map(|n| by_node.get(n))
        .fold(CpuSet::new(), |acc, s| acc.union(s));
    if !home.is_empty() && room.len() >= need && fit.holds(&home_nodes) {
        return Region::on(room, format!("stays on node {}", join_nodes(&home_nodes)));
    }
    if let Some((node, cpus)) = by_node
        .iter()
        .filter(|(node, cpus)| cpus.len() >= need && fit.holds(&[**node]))
        .min_by_key(|(node, cpus)| (cpus.len(), **node))
    {
        let mut region = Region::on(cpus.clone(), format!("fits node {}", node_label(*node)));
        region.note = fit.note_after(*node);
        return region;
    }
    if let Some(region) = span(layout, &by_node, need, fit) {
        return region;
    }
    if !fit.matters() {
        // Fewer CPUs than asked for (callers see to it that never happens).
        let nodes: Vec<Option<u32>> = by_node.keys().copied().collect();
        return Region::on(
            candidates.clone(),
            format!("spans nodes {}", join_nodes(&nodes)),
        );
    }
    // No set of nodes holds its memory: its CPUs as if memory did not count.
    let mut region = choose_nodes(layout, candidates, home, need, &Fit::any());
    // (The plan's reason says so: see `plan`.)
    region.target = Target::Unfit;
    region
}

/// A node a span may take: its free CPUs and its room for the memory.
struct Candidate {
    node: Option<u32>,
    cpus: usize,
    memory: u64,
}

/// The fewest closest nodes that together hold `need` CPUs and the memory
/// `fit` asks for: from the node with most room, the closest that adds
/// what is still short, until nothing is. None when no set holds it.
fn span(
    layout: &Layout,
    by_node: &BTreeMap<Option<u32>, CpuSet>,
    need: usize,
    fit: &Fit,
) -> Option<Region> {
    let mut candidates: Vec<Candidate> = by_node
        .iter()
        .map(|(node, cpus)| Candidate {
            node: *node,
            cpus: cpus.len(),
            memory: fit.room(*node),
        })
        .collect();
    // Nodes with no CPU to spare can still hold memory.
    for node in fit.memory_nodes() {
        if !by_node.contains_key(&Some(node)) {
            candidates.push(Candidate {
                node: Some(node),
                cpus: 0,
                memory: fit.room(Some(node)),
            });
        }
    }
    let selected = select(layout, &candidates, need, fit)?;
    let cpus = selected
        .iter()
        .filter_map(|n| by_node.get(n))
        .fold(CpuSet::new(), |acc, s| acc.union(s));
    let farthest = selected
        .iter()
        .flat_map(|a| selected.iter().map(move |b| layout.distance(*a, *b)))
        .max()
        .unwrap_or(10);
    let mut sorted = selected.clone();
    sorted.sort();
    let across = join_nodes(&sorted);
    if by_node.values().any(|c| c.len() >= need) {
        // CPUs fit one node, memory does not: spread as the memory is.
        let weights = memory_shares(&selected, fit);
        let room = |node: Option<u32>| by_node.get(&node).map_or(0, CpuSet::len);
        return Some(Region {
            cpus,
            reason: format!(
                "spans nodes {across}: {} fits no single node (distance {farthest})",
                human(fit.kib())
            ),
            note: String::new(),
            quotas: quotas(need, &selected, &weights, room),
            target: Target::Nodes(weights),
        });
    }
    // Memory goes with the vCPUs, and what their nodes cannot hold to the
    // nodes taken for it (the vCPUs need not land on every node taken).
    let extra = sorted.iter().flatten().copied().collect();
    Some(Region {
        cpus,
        reason: format!("no node has {need} free CPUs; spans nodes {across} (distance {farthest})"),
        note: String::new(),
        quotas: Vec::new(),
        target: Target::Cpus { extra },
    })
}

/// The span's nodes in the order taken; None when all of them together
/// still lack CPUs or room for the memory.
fn select(
    layout: &Layout,
    candidates: &[Candidate],
    need: usize,
    fit: &Fit,
) -> Option<Vec<Option<u32>>> {
    let mut selected: Vec<Option<u32>> = Vec::new();
    let mut cpus = 0;
    let mut memory = 0u64;
    while cpus < need || !fit.holds(&selected) {
        let cpus_short = need.saturating_sub(cpus);
        let memory_short = if fit.holds(&selected) {
            0
        } else {
            fit.kib().saturating_sub(memory).max(1)
        };
        let next = candidates
            .iter()
            .filter(|c| !selected.contains(&c.node))
            .filter(|c| (cpus_short > 0 && c.cpus > 0) || (memory_short > 0 && c.memory > 0))
            .min_by_key(|c| {
                let distance: u32 = selected.iter().map(|s| layout.distance(*s, c.node)).sum();
                // Without memory to place: the most CPUs first, as ever.
                let useful = if fit.matters() {
                    (c.cpus.min(cpus_short) as u64 * 1000) / need.max(1) as u64
                        + c.memory.min(memory_short) * 1000 / memory_short.max(1)
                } else {
                    0
                };
                (distance, Reverse(useful), Reverse(c.cpus), c.node)
            })?;
        selected.push(next.node);
        cpus += next.cpus;
        memory = memory.saturating_add(next.memory);
    }
    Some(selected)
}

/// How much of the memory each node of a span takes: each its room in the
/// order taken, until all is placed.
fn memory_shares(selected: &[Option<u32>], fit: &Fit) -> Weights {
    let mut left = fit.kib();
    let mut out = Weights::new();
    for node in selected.iter().flatten() {
        let share = fit.room(Some(*node)).min(left);
        left -= share;
        if share > 0 {
            out.push((*node, share));
        }
    }
    out
}

/// `need` vCPUs over the `selected` nodes in proportion to their share of
/// the memory (`weights`), within each node's free CPUs (`room`); nodes
/// taken for CPUs alone get what the others cannot take.
fn quotas(
    need: usize,
    selected: &[Option<u32>],
    weights: &Weights,
    room: impl Fn(Option<u32>) -> usize,
) -> Vec<(Option<u32>, usize)> {
    let total: u64 = weights.iter().map(|(_, w)| *w).sum::<u64>().max(1);
    let weight = |node: Option<u32>| {
        weights
            .iter()
            .find(|(n, _)| Some(*n) == node)
            .map_or(0, |(_, w)| *w)
    };
    let mut out: Vec<(Option<u32>, usize)> = selected
        .iter()
        .map(|&node| {
            let share = (need as u64 * weight(node) / total) as usize;
            (node, share.min(room(node)))
        })
        .collect();
    // What rounding left over goes round the nodes, most memory first.
    let mut order: Vec<usize> = (0..out.len()).collect();
    order.sort_by_key(|&i| Reverse(weight(out[i].0)));
    let mut given: usize = out.iter().map(|(_, q)| q).sum();
    let (mut turn, mut stalled) = (0, 0);
    while given < need && stalled < order.len() {
        let i = order[turn % order.len()];
        turn += 1;
        if out[i].1 < room(out[i].0) {
            out[i].1 += 1;
            given += 1;
            stalled = 0;
        } else {
            stalled += 1;
        }
    }
    out.retain(|(_, q)| *q > 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_follow_the_memory_within_each_nodes_room() {
        let nodes = [Some(0), Some(1)];
        let weights = vec![(0, 8), (1, 24)];
        let room = |_: Option<u32>| 16;
        assert_eq!(
            quotas(4, &nodes, &weights, room),
            vec![(Some(0), 1), (Some(1), 3)]
        );
        // Node 1 has one CPU free: the rest go to node 0.
        let tight = |n: Option<u32>| if n == Some(1) { 1 } else { 16 };
        assert_eq!(
            quotas(4, &nodes, &weights, tight),
            vec![(Some(0), 3), (Some(1), 1)]
        );
        // One vCPU over two nodes: it goes where most of the memory is.
        assert_eq!(quotas(1, &nodes, &weights, room), vec![(Some(1), 1)]);
        // Node 2 was taken for its CPUs alone: it gets what node 0 cannot.
        let three = [Some(0), Some(2)];
        let memory_on_0 = vec![(0, 5)];
        let short = |n: Option<u32>| if n == Some(0) { 3 } else { 8 };
        assert_eq!(
            quotas(4, &three, &memory_on_0, short),
            vec![(Some(0), 3), (Some(2), 1)]
        );
    }
}
