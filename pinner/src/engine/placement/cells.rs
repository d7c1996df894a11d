//! Guests with NUMA cells of their own (`<cpu><numa><cell>`, nova's
//! `hw:numa_nodes`): the guest's kernel believes each cell is a node, so each
//! cell's vCPUs go within one host node, distinct cells on distinct nodes
//! while they fit, and the set of nodes the closest by the distance matrix.

use super::dedicated::{pick_from, pick_in_region};
use super::layout::{join_nodes, node_label, Layout};
use super::memory::Fit;
use super::region::choose_nodes;
use super::{CellPlan, Current};
use crate::engine::cpuset::CpuSet;

/// One node choice per cell: the node, and why when it is not simply its
/// own free node.
type Choice = (Option<u32>, Option<String>);

/// A dedicated placement of a guest's `cells` (vCPU sets, in cell order;
/// `fits`: whether nodes hold each cell's memory): one CPU per vCPU in
/// `slots` and a plan per cell; None (its kept pins handed back to `free`)
/// when the guest does not fit. `slots` holds the pins kept so far; they
/// are handed back and preferred, so a valid placement stays.
pub(super) fn place_cells(
    layout: &Layout,
    cells: &[CpuSet],
    fits: &[Fit],
    current: Current,
    slots: &mut [Option<u32>],
    free: &mut CpuSet,
) -> Option<Vec<CellPlan>> {
    let mine: CpuSet = slots.iter().flatten().copied().collect();
    let mut pool = free.union(&mine);
    if pool.len() < slots.len() {
        // Its kept pins go back for the guests placed after it.
        *free = pool;
        return None;
    }
    // 1. Each cell's home: the CPUs its vCPUs hold now.
    let homes: Vec<CpuSet> = cells
        .iter()
        .map(|cell| {
            cell.iter()
                .filter_map(|v| current.get(v as usize).cloned().flatten())
                .fold(CpuSet::new(), |acc, pin| {
                    acc.union(&pin.intersection(&pool))
                })
        })
        .collect();
    // 2. A node per cell.
    let choices = choose_cell_nodes(layout, &pool, cells, fits, &homes);
    // 3. Each cell's CPUs inside its node, whole cores first.
    let mut plans = Vec::with_capacity(cells.len());
    for (i, (cell, (node, why))) in cells.iter().zip(choices).enumerate() {
        let need = cell.len();
        let node_free = layout.node_masks.get(&node).map(|m| m.intersection(&pool));
        let own = homes[i].intersection(&mine);
        let (cpus, why) = match node_free.filter(|f| node.is_some() && f.len() >= need) {
            Some(region) => (
                pick_in_region(layout, &region, &pool, &own, &homes[i], need).0,
                why,
            ),
            None => {
                let region = choose_nodes(layout, &pool, &homes[i], need, &fits[i]);
                let cpus = pick_from(layout, &region, &pool, &own, &homes[i], need).0;
                (cpus, Some(region.reason + &region.note))
            }
        };
        for (vcpu, cpu) in cell.iter().zip(cpus.iter()) {
            slots[vcpu as usize] = Some(cpu);
        }
        for cpu in cpus.iter() {
            pool.remove(cpu);
        }
        let nodes: Vec<u32> = layout.nodes_opt(&cpus).into_iter().flatten().collect();
        plans.push(CellPlan {
            cell: i as u32,
            nodes,
            reason: why.unwrap_or_default(),
        });
    }
    *free = pool;
    Some(plans)
}

/// Steps of the node choice:
///  1. every cell on its home node, when those are distinct and have room
///     (CPUs and memory);
///  2. else, from each node in turn as the anchor of the largest cell, the
///     cells by size each on the unused node closest to those chosen that
///     holds its memory (its home first among equals, then the tightest
///     fit); the anchor whose nodes leave the fewest cells without one and
///     lie closest wins;
///  3. a cell left without a node of its own shares the roomiest chosen
///     one, or (None) spans nodes.
fn choose_cell_nodes(
    layout: &Layout,
    pool: &CpuSet,
    cells: &[CpuSet],
    fits: &[Fit],
    homes: &[CpuSet],
) -> Vec<Choice> {
    let room: Vec<(Option<u32>, usize)> = layout
        .by_node(pool)
        .into_iter()
        .filter(|(node, _)| node.is_some())
        .map(|(node, cpus)| (node, cpus.len()))
        .collect();
    let home_nodes: Vec<Option<u32>> = homes.iter().map(|h| single_node(layout, h)).collect();
    let fits_home = |i: usize| {
        home_nodes[i].is_some_and(|n| {
            room.iter()
                .any(|(node, free)| *node == Some(n) && *free >= cells[i].len())
        }) && fits[i].holds(&[home_nodes[i]])
    };
    let mut distinct: Vec<Option<u32>> = home_nodes.clone();
    distinct.sort();
    distinct.dedup();
    if (0..cells.len()).all(fits_home) && distinct.len() == cells.len() {
        return home_nodes
            .iter()
            .map(|n| (*n, Some(format!("stays on node {}", node_label(*n)))))
            .collect();
    }
    let mut order: Vec<usize> = (0..cells.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(cells[i].len()), i));
    let best = room
        .iter()
        .filter(|(_, free)| *free >= cells[order[0]].len())
        .map(|(anchor, _)| assign_from(layout, &room, cells, fits, &home_nodes, &order, *anchor))
        .min_by_key(|(nodes, score)| (*score, nodes.clone()))
        .map(|(nodes, _)| nodes)
        .unwrap_or_else(|| vec![None; cells.len()]);
    share_or_span(layout, &room, cells, fits, best)
}

/// Step 2 from one anchor: the nodes per cell, and the score (cells left
/// without a node, sum of distances between the chosen nodes, cells moved
/// off their home).
fn assign_from(
    layout: &Layout,
    room: &[(Option<u32>, usize)],
    cells: &[CpuSet],
    fits: &[Fit],
    home_nodes: &[Option<u32>],
    order: &[usize],
    anchor: Option<u32>,
) -> (Vec<Option<u32>>, (usize, u32, usize)) {
    let mut nodes: Vec<Option<u32>> = vec![None; cells.len()];
    let mut chosen: Vec<Option<u32>> = Vec::new();
    for (step, &i) in order.iter().enumerate() {
        let need = cells[i].len();
        let pick = room
            .iter()
            .filter(|(node, free)| *free >= need && !chosen.contains(node))
            .filter(|(node, _)| fits[i].holds(&[*node]))
            .filter(|(node, _)| step > 0 || *node == anchor)
            .min_by_key(|(node, free)| {
                let distance: u32 = chosen.iter().map(|c| layout.distance(*c, *node)).sum();
                (distance, home_nodes[i] != *node, free - need, *node)
            })
            .map(|(node, _)| *node);
        if let Some(node) = pick {
            chosen.push(node);
            nodes[i] = Some(node).flatten();
        }
    }
    let unplaced = nodes.iter().filter(|n| n.is_none()).count();
    let distance = chosen
        .iter()
        .enumerate()
        .flat_map(|(a, x)| chosen[a + 1..].iter().map(move |y| (*x, *y)))
        .map(|(x, y)| layout.distance(x, y))
        .sum();
    let moved = (0..cells.len())
        .filter(|&i| nodes[i] != home_nodes[i])
        .count();
    (nodes, (unplaced, distance, moved))
}

/// Step 3, and the reasons: each cell's node (None: span), with why.
fn share_or_span(
    layout: &Layout,
    room: &[(Option<u32>, usize)],
    cells: &[CpuSet],
    fits: &[Fit],
    nodes: Vec<Option<u32>>,
) -> Vec<Choice> {
    let first = nodes.iter().flatten().next().copied();
    let mut left: Vec<(Option<u32>, usize)> = room
        .iter()
        .map(|(node, free)| {
            let used: usize = (0..cells.len())
                .filter(|&i| nodes[i].is_some() && nodes[i] == *node)
                .map(|i| cells[i].len())
                .sum();
            (*node, free - used.min(*free))
        })
        .collect();
    let mut out = Vec::with_capacity(cells.len());
    for (i, node) in nodes.iter().enumerate() {
        let need = cells[i].len();
        if let Some(node) = node {
            let why = match first {
                Some(f) if f != *node => Some(format!(
                    "closest free node to node {f} (distance {})",
                    layout.distance(Some(f), Some(*node))
                )),
                _ => None,
            };
            out.push((Some(*node), why));
            continue;
        }
        let shared = left
            .iter_mut()
            .filter(|(node, free)| *free >= need && fits[i].holds(&[*node]))
            .max_by_key(|(node, free)| (*free, std::cmp::Reverse(*node)));
        match shared {
            Some((node, free)) => {
                *free -= need;
                let why = format!(
                    "shares node {}: no free node of its own has {need} CPUs",
                    node_label(*node)
                );
                out.push((*node, Some(why)));
            }
            None => out.push((None, None)),
        }
    }
    out
}

/// The node all of `cpus` are on, if one.
fn single_node(layout: &Layout, cpus: &CpuSet) -> Option<u32> {
    match layout.nodes_opt(cpus).as_slice() {
        [node] => *node,
        _ => None,
    }
}

/// "cell 0 → node 2, cell 1 → node 3 (closest free node to node 2 (distance 12))".
pub(super) fn describe(cells: &[CellPlan]) -> String {
    cells
        .iter()
        .map(|c| {
            let nodes: Vec<Option<u32>> = c.nodes.iter().map(|n| Some(*n)).collect();
            let target = if nodes.len() == 1 {
                format!("node {}", join_nodes(&nodes))
            } else {
                format!("nodes {}", join_nodes(&nodes))
            };
            match c.reason.as_str() {
                "" => format!("cell {} → {target}", c.cell),
                why => format!("cell {} → {target} ({why})", c.cell),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}
