//! Shared placement: each guest bound to one range (an L3 domain, a node,
//! or a span of nodes), balancing demand per pCPU (a guest's measured
//! demand, else the prior per vCPU), vCPUs per pCPU breaking ties.

use super::cells::describe;
use super::layout::{join_nodes, node_label, Layout};
use super::memory::{Fit, Memory, Target};
use super::region::{choose_nodes, Region};
use super::{guest_plan, CellPlan, Current, Guest, GuestPlan, Load, Locality, Placement};
use crate::engine::cpuset::CpuSet;
use crate::engine::memory::human;
use std::collections::{BTreeMap, HashMap};

/// The ranges shared guests can be bound to, with the load on each (the
/// sum over its CPUs of vCPUs per pCPU, and of demand per pCPU), kept up
/// to date through the ranges' overlaps so judging a candidate costs O(1).
pub(super) struct Ranges {
    pub(super) sets: Vec<CpuSet>,
    pub(super) size: Vec<usize>,
    /// 0: an L3 domain of a node, 1: a node, 2: a span of nodes.
    pub(super) level: Vec<u8>,
    pub(super) load: Vec<f64>,
    /// Like `load`, in CPUs of demand.
    pub(super) demand: Vec<f64>,
    /// For each range: every range it overlaps, and by how many CPUs.
    pub(super) overlaps: Vec<Vec<(usize, usize)>>,
    pub(super) index: HashMap<CpuSet, usize>,
    /// The nodes of each range (memory bound to a range goes there).
    pub(super) nodes: Vec<Vec<Option<u32>>>,
}

impl Ranges {
    pub(super) fn new() -> Ranges {
        Ranges {
            sets: Vec::new(),
            size: Vec::new(),
            level: Vec::new(),
            load: Vec::new(),
            demand: Vec::new(),
            overlaps: Vec::new(),
            index: HashMap::new(),
            nodes: Vec::new(),
        }
    }

    /// Adds a range (or finds the equal one) and returns its index.
    pub(super) fn add(&mut self, layout: &Layout, set: CpuSet, level: u8) -> usize {
        if let Some(&i) = self.index.get(&set) {
            return i;
        }
        let i = self.sets.len();
        let mut mine = Vec::new();
        for (j, other) in self.sets.iter().enumerate() {
            let shared = set.overlap(other);
            if shared > 0 {
                mine.push((j, shared));
                self.overlaps[j].push((i, shared));
            }
        }
        mine.push((i, set.len()));
        // A new range starts with the load its CPUs already carry. L3
        // ranges partition the pool and every range is a union of them, so
        // load is even within each L3 range and summing theirs is exact.
        let inherited = |of: &[f64]| {
            mine.iter()
                .filter(|&&(j, _)| j != i && self.level[j] == 0)
                .map(|&(j, shared)| of[j] / self.size[j] as f64 * shared as f64)
                .sum::<f64>()
        };
        let (load, demand) = (inherited(&self.load), inherited(&self.demand));
        self.index.insert(set.clone(), i);
        self.nodes.push(layout.nodes_opt(&set));
        self.size.push(set.len());
        self.sets.push(set);
        self.level.push(level);
        self.load.push(load);
        self.demand.push(demand);
        self.overlaps.push(mine);
        i
    }

    /// vCPUs per pCPU of range `r` once `w` is on it.
    fn mean_after(&self, r: usize, w: Weight) -> f64 {
        (self.load[r] + f64::from(w.vcpus)) / self.size[r] as f64
    }

    /// Demand per pCPU of range `r` once `w` is on it.
    fn demand_after(&self, r: usize, w: Weight) -> f64 {
        (self.demand[r] + w.demand) / self.size[r] as f64
    }

    pub(super) fn assign(&mut self, r: usize, w: Weight) {
        self.add_load(r, w, 1.0);
    }

    /// Takes back what [`Ranges::assign`] added.
    fn unassign(&mut self, r: usize, w: Weight) {
        self.add_load(r, w, -1.0);
    }

    fn add_load(&mut self, r: usize, w: Weight, sign: f64) {
        let (share, demand) = (
            sign * f64::from(w.vcpus) / self.size[r] as f64,
            sign * w.demand / self.size[r] as f64,
        );
        for &(other, shared) in &self.overlaps[r] {
            self.load[other] += share * shared as f64;
            self.demand[other] += demand * shared as f64;
        }
    }
}

impl Ranges {
    /// The L3 domains and nodes of the shared pool, per core kind: the
    /// ranges every guest may pick from (spans are added per guest).
    pub(super) fn of_pool(layout: &Layout, by_kind: &BTreeMap<u8, CpuSet>) -> Ranges {
        let mut ranges = Ranges::new();
        for cpus in by_kind.values() {
            for l3 in layout.by_l3(cpus).into_values() {
                ranges.add(layout, l3, 0);
            }
        }
        for cpus in by_kind.values() {
            for node in layout.by_node(cpus).into_values() {
                ranges.add(layout, node, 1);
            }
        }
        ranges
    }

    /// Where a guest of `need` vCPUs may go, into `out`: the L3 ranges it
    /// fits whose node holds its memory, else such nodes (both among the
    /// first `fixed`), else a span made for it. Returns where its memory
    /// goes.
    pub(super) fn candidates(
        &mut self,
        layout: &Layout,
        span: impl FnOnce() -> Region,
        fixed: usize,
        (need, fit): (usize, &Fit),
        out: &mut Vec<usize>,
    ) -> Target {
        out.clear();
        for level in [0, 1] {
            out.extend((0..fixed).filter(|&r| {
                self.level[r] == level && self.size[r] >= need && fit.holds(&self.nodes[r])
            }));
            if !out.is_empty() {
                return Target::cpus();
            }
        }
        let region = span();
        out.push(self.add(layout, region.cpus, 2));
        region.target
    }

    /// The candidate least busy after adding `w` (demand per pCPU; within
    /// [`DEMAND_TIE`] of each other, the fewest vCPUs per pCPU, then the
    /// first), unless `here`, the candidate the guest is on now, is within
    /// one vCPU per pCPU of the candidate with the fewest: a running guest
    /// leaves its range for demand only when rebalancing moves it, with its
    /// samples and cool-down. Unmeasured guests weigh one CPU per vCPU at
    /// the default prior, so then this is balancing vCPUs per pCPU.
    pub(super) fn choose(&self, candidates: &[usize], here: Option<usize>, w: Weight) -> usize {
        let by = |key: &dyn Fn(usize) -> f64| {
            candidates
                .iter()
                .map(|&r| key(r))
                .min_by(f64::total_cmp)
                .expect("at least one candidate")
        };
        let least_demand = by(&|r| self.demand_after(r, w));
        let fewest_vcpus = by(&|r| self.mean_after(r, w));
        if let Some(h) = here.filter(|&h| self.mean_after(h, w) - fewest_vcpus < 1.0) {
            return h;
        }
        candidates
            .iter()
            .copied()
            .filter(|&r| self.demand_after(r, w) - least_demand < DEMAND_TIE)
            .min_by(|&a, &b| self.mean_after(a, w).total_cmp(&self.mean_after(b, w)))
            .expect("the least busy is within the tie")
    }

    /// The candidate every one of `pins` (a vCPU each) is pinned to now.
    pub(super) fn held(&self, candidates: &[usize], pins: &[Option<CpuSet>]) -> Option<usize> {
        let first = pins.first()?.as_ref()?;
        if pins.iter().any(|p| p.as_ref() != Some(first)) {
            return None;
        }
        candidates.iter().copied().find(|&r| self.sets[r] == *first)
    }

    /// Range `r`'s reason.
    pub(super) fn describe(&self, layout: &Layout, r: usize) -> String {
        let set = &self.sets[r];
        let nodes = layout.nodes_opt(set);
        let where_ = match (self.level[r], layout.l3_key(set.first().unwrap_or(0))) {
            (0, (_, Some(l3))) if layout.l3_masks.len() > layout.node_masks.len() => {
                format!("node {} L3 {l3}", node_label(nodes[0]))
            }
            _ if nodes.len() == 1 => format!("node {}", node_label(nodes[0])),
            _ => format!("nodes {}", join_nodes(&nodes)),
        };
        format!(
            "shared: {where_} ({:.2} vCPUs per pCPU)",
            self.load[r] / self.size[r] as f64
        )
    }
}

/// Demand per pCPU closer than this counts as equal: measured demand is
/// never exact, and noise must not decide where an idle guest goes.
const DEMAND_TIE: f64 = 0.05;

/// What a guest adds to a range.
#[derive(Debug, Clone, Copy)]
pub(super) struct Weight {
    pub(super) vcpus: u32,
    /// CPUs: measured, else the prior per vCPU times its vCPUs.
    pub(super) demand: f64,
}

/// Binds each shared guest to one range: an L3 domain of a node if the guest
/// fits one, else a node, else the fewest closest nodes, else the whole
/// shared pool (each where its memory fits too); the least busy candidate
/// (demand per pCPU, see [`Ranges::choose`]), unless the guest's current
/// range is within one vCPU per pCPU of the least loaded, or rebalancing
/// moves it.
pub(super) fn place_shared(
    layout: &Layout,
    shared_pool: &CpuSet,
    guests: &[(&Guest, Current)],
    (memory, load): (&mut Memory, &Load),
) -> Vec<GuestPlan> {
    let by_kind = layout.by_kind(shared_pool);
    let mut ranges = Ranges::of_pool(layout, &by_kind);
    let fixed = ranges.sets.len();
    let mut order: Vec<usize> = (0..guests.len()).collect();
    // Guests already pinned first, so a new guest sees every range's load;
    // larger guests before smaller ones.
    order.sort_by_key(|&i| {
        let unpinned = guests[i].1.iter().all(Option::is_none);
        (unpinned, std::cmp::Reverse(guests[i].0.vcpus))
    });
    let mut chosen: Vec<usize> = vec![0; guests.len()];
    let mut cells: Vec<Option<Vec<(CpuSet, usize)>>> = vec![None; guests.len()];
    let mut placed: Vec<Option<(Locality, String)>> = vec![None; guests.len()];
    // Each node's share of the pool, per kind: the ranges cells bind to
    // (an L3 range when the node has one L3).
    let node_ranges: Vec<usize> = by_kind
        .values()
        .flat_map(|cpus| layout.by_node(cpus).into_values())
        .filter_map(|set| ranges.index.get(&set).copied())
        .collect();
    let pool = Pool::new(layout, &by_kind, shared_pool, fixed);
    let held = pool.hold_running(&mut ranges, guests, load);
    // One buffer for every guest's candidates.
    let mut candidates: Vec<usize> = Vec::with_capacity(fixed + 1);
    for i in order {
        let (g, current) = guests[i];
        let weight = load.weight(g);
        let here = held[i];
        if let Some(r) = here {
            ranges.unassign(r, weight);
        }
        if let Some(groups) = g.cell_groups(layout) {
            memory.release(g);
            let (bound, locality) = bind_cells(
                layout,
                &mut ranges,
                (&node_ranges, &groups),
                (current, weight),
                (g, memory),
            );
            (placed[i], cells[i]) = (Some((locality, String::new())), Some(bound));
            continue;
        }
        let fit = memory.fit(g);
        let moved_to = load.moves.get(&g.uuid);
        let asked = Asked {
            g,
            weight,
            here,
            moved_to,
        };
        let (range, target) = pool.range_for(&mut ranges, asked, &fit, &mut candidates);
        let note = memory_note(&target, fit.kib());
        ranges.assign(range, weight);
        chosen[i] = range;
        placed[i] = Some((memory.settle(g, &ranges.nodes[range], &target), note));
    }
    let placed = Placed {
        chosen,
        cells,
        placed,
    };
    placed.plans(layout, &ranges, guests, memory)
}

/// Where [`place_shared`] put each guest, by its index: its range (or its
/// cells' ranges), its locality and the note its reason adds.
struct Placed {
    chosen: Vec<usize>,
    cells: Vec<Option<Vec<(CpuSet, usize)>>>,
    placed: Vec<Option<(Locality, String)>>,
}

impl Placed {
    fn plans(
        self,
        layout: &Layout,
        ranges: &Ranges,
        guests: &[(&Guest, Current)],
        memory: &Memory,
    ) -> Vec<GuestPlan> {
        // Guests of one range share its reason: work it out once.
        let mut described: Vec<Option<String>> = vec![None; ranges.sets.len()];
        guests
            .iter()
            .zip(self.chosen)
            .zip(self.cells.into_iter().zip(self.placed))
            .map(|(((g, _), r), (cells, placed))| {
                let (locality, note) = placed.expect("every guest placed");
                let displaced = memory
                    .displaced(g)
                    .map(|why| format!("; {why}"))
                    .unwrap_or_default();
                if let Some(cells) = cells {
                    return cell_plan(layout, ranges, g, &cells, locality, &displaced);
                }
                let set = &ranges.sets[r];
                let reason = described[r].get_or_insert_with(|| ranges.describe(layout, r));
                let reason = format!("{reason}{note}{displaced}");
                guest_plan(
                    g,
                    Placement::Shared,
                    vec![set.clone(); g.vcpus as usize],
                    set.clone(),
                    locality,
                    reason,
                )
            })
            .collect()
    }
}

/// One guest as its range is chosen: its weight, the range it is
/// held on now (see [`Pool::hold_running`]) and where rebalancing moves it.
struct Asked<'a> {
    g: &'a Guest,
    weight: Weight,
    here: Option<usize>,
    moved_to: Option<&'a CpuSet>,
}

/// The shared pool as one guest's range is chosen from it.
struct Pool<'a> {
    layout: &'a Layout<'a>,
    by_kind: &'a BTreeMap<u8, CpuSet>,
    /// Each kind's share of every node: what a span is made of.
    kind_nodes: Vec<BTreeMap<Option<u32>, CpuSet>>,
    cpus: &'a CpuSet,
    /// The pool's own ranges (L3 domains and nodes) come first in `Ranges`.
    fixed: usize,
}

impl<'a> Pool<'a> {
    fn new(
        layout: &'a Layout<'a>,
        by_kind: &'a BTreeMap<u8, CpuSet>,
        cpus: &'a CpuSet,
        fixed: usize,
    ) -> Pool<'a> {
        Pool {
            layout,
            by_kind,
            kind_nodes: by_kind.values().map(|set| layout.by_node(set)).collect(),
            cpus,
            fixed,
        }
    }

    /// Counts each running guest (not cell by cell) on the range it is
    /// bound to now, so whether it stays is judged against all the others
    /// where they are, whatever order guests are placed in; returns each
    /// guest's range so held.
    fn hold_running(
        &self,
        ranges: &mut Ranges,
        guests: &[(&Guest, Current)],
        load: &Load,
    ) -> Vec<Option<usize>> {
        guests
            .iter()
            .map(|&(g, current)| {
                if g.cell_groups(self.layout).is_some() {
                    return None;
                }
                let set = here_range(current, g.vcpus, self.cpus)
                    .filter(|set| self.is_placed_range(ranges, set))?;
                let r = ranges.add(self.layout, set, 2);
                ranges.assign(r, load.weight(g));
                Some(r)
            })
            .collect()
    }

    /// A guest's range (see [`place_shared`]) and where its memory goes:
    /// the one rebalancing moves it to while that is a candidate. The range
    /// it is on now stays a candidate while it holds it, also when it is a
    /// span (its memory is there; nothing moves to look tidy).
    fn range_for(
        &self,
        ranges: &mut Ranges,
        asked: Asked,
        fit: &Fit,
        candidates: &mut Vec<usize>,
    ) -> (usize, Target) {
        let Asked {
            g,
            weight,
            here,
            moved_to,
        } = asked;
        let need = g.vcpus as usize;
        let span = || self.span(need, fit);
        let target = ranges.candidates(self.layout, span, self.fixed, (need, fit), candidates);
        // Where it is, its memory may also be on nodes bound for memory alone.
        let holds_here = |h: usize| {
            fit.holds(&ranges.nodes[h]) || {
                let mut nodes = ranges.nodes[h].clone();
                nodes.extend(g.memory_nodes.iter().flat_map(CpuSet::iter).map(Some));
                fit.holds(&nodes)
            }
        };
        if let Some(h) = here.filter(|h| !candidates.contains(h) && holds_here(*h)) {
            candidates.push(h);
        }
        let range = moved_to
            .and_then(|set| ranges.index.get(set))
            .copied()
            .filter(|r| candidates.contains(r))
            .unwrap_or_else(|| {
                let here = here.filter(|h| candidates.contains(h));
                ranges.choose(candidates, here, weight)
            });
        if Some(range) == here && holds_here(range) {
            // It stays: its memory stays bound where it is.
            let bound = g.memory_nodes.iter().flat_map(CpuSet::iter).collect();
            return (range, Target::Cpus { extra: bound });
        }
        (range, target)
    }

    /// Whether `set` is a range placement makes: one of the pool's own (an
    /// L3 domain, a node) or a span of one kind's share of whole nodes. A
    /// dedicated guest's pin is neither, so it is not kept as a range when
    /// the host turns shared.
    fn is_placed_range(&self, ranges: &Ranges, set: &CpuSet) -> bool {
        if ranges.index.get(set).is_some_and(|&r| r < self.fixed) {
            return true;
        }
        let parts = self.layout.by_node(set);
        self.kind_nodes.iter().any(|nodes| {
            parts
                .iter()
                .all(|(node, part)| nodes.get(node) == Some(part))
        })
    }

    /// Larger than any node's share (or no node holds its memory): the
    /// fewest closest nodes of the largest kind, else the whole pool.
    fn span(&self, need: usize, fit: &Fit) -> Region {
        let largest = self
            .by_kind
            .values()
            .max_by_key(|s| s.len())
            .cloned()
            .unwrap_or_default();
        if largest.len() >= need {
            return choose_nodes(self.layout, &largest, &CpuSet::new(), need, fit);
        }
        let target = if fit.holds(&self.layout.nodes_opt(self.cpus)) {
            Target::cpus()
        } else {
            Target::Unfit
        };
        Region {
            cpus: self.cpus.clone(),
            reason: String::new(),
            note: String::new(),
            quotas: Vec::new(),
            target,
        }
    }
}

/// The range all of a guest's vCPUs are bound to now, when it lies within
/// the shared `pool`.
fn here_range(current: Current, vcpus: u32, pool: &CpuSet) -> Option<CpuSet> {
    let first = current.first()?.as_ref()?;
    let same = current.len() == vcpus as usize && current.iter().all(|c| c.as_ref() == Some(first));
    (same && first.is_subset(pool) && first.len() >= vcpus as usize).then(|| first.clone())
}

/// What a guest's reason adds about its memory beyond its range's own.
fn memory_note(target: &Target, kib: u64) -> String {
    match target {
        Target::Nodes(_) => format!("; {} fits no single node", human(kib)),
        Target::Unfit | Target::Cpus { .. } => String::new(),
    }
}

/// Binds each cell (`groups`, vCPU sets) of one guest to a node range of its
/// own whose node holds the cell's memory while there are such nodes left,
/// the least loaded (or the one the cell is on, within one vCPU per pCPU
/// of it); returns each cell's vCPUs and range, and where the guest's
/// memory is bound.
fn bind_cells(
    layout: &Layout,
    ranges: &mut Ranges,
    (nodes, groups): (&[usize], &[CpuSet]),
    (current, weight): (Current, Weight),
    (g, memory): (&Guest, &mut Memory),
) -> (Vec<(CpuSet, usize)>, Locality) {
    let parts = g.cell_memory(groups.len());
    let mut used: Vec<usize> = Vec::with_capacity(groups.len());
    let mut out = Vec::with_capacity(groups.len());
    for (cell, parts) in groups.iter().zip(&parts) {
        let fit = memory.fit_parts(parts);
        let unused: Vec<usize> = nodes
            .iter()
            .copied()
            .filter(|r| !used.contains(r))
            .collect();
        let holding: Vec<usize> = unused
            .iter()
            .copied()
            .filter(|r| fit.holds(&ranges.nodes[*r]))
            .collect();
        let candidates = [&holding[..], &unused[..], nodes]
            .into_iter()
            .find(|c| !c.is_empty())
            .unwrap_or(nodes);
        let pins: Vec<Option<CpuSet>> = cell
            .iter()
            .map(|v| current.get(v as usize).cloned().flatten())
            .collect();
        let vcpus = cell.len() as u32;
        // The guest's demand is shared out by its cells' vCPUs.
        let cell_weight = Weight {
            vcpus,
            demand: weight.demand * f64::from(vcpus) / f64::from(weight.vcpus.max(1)),
        };
        let range = ranges.choose(candidates, ranges.held(candidates, &pins), cell_weight);
        ranges.assign(range, cell_weight);
        used.push(range);
        out.push((cell.clone(), range));
    }
    let per_cell: Vec<(CpuSet, _)> = out
        .iter()
        .zip(parts)
        .map(|((_, r), parts)| (ranges.sets[*r].clone(), parts))
        .collect();
    let locality = memory.settle_cells(layout, g, &per_cell);
    (out, locality)
}

/// The plan of a guest whose cells are each bound to a node range.
fn cell_plan(
    layout: &Layout,
    ranges: &Ranges,
    g: &Guest,
    cells: &[(CpuSet, usize)],
    locality: Locality,
    displaced: &str,
) -> GuestPlan {
    let mut vcpus = vec![CpuSet::new(); g.vcpus as usize];
    let mut all = CpuSet::new();
    let mut plans = Vec::with_capacity(cells.len());
    for (i, (cell, r)) in cells.iter().enumerate() {
        let set = &ranges.sets[*r];
        for v in cell.iter() {
            vcpus[v as usize] = set.clone();
        }
        all = all.union(set);
        let reason = format!(
            "{:.2} vCPUs per pCPU",
            ranges.load[*r] / ranges.size[*r] as f64
        );
        plans.push(CellPlan {
            cell: i as u32,
            nodes: layout.nodes_opt(set).into_iter().flatten().collect(),
            reason,
        });
    }
    let reason = format!("shared: {}{displaced}", describe(&plans));
    let mut plan = guest_plan(g, Placement::Shared, vcpus, all, locality, reason);
    plan.cells = plans;
    plan
}
