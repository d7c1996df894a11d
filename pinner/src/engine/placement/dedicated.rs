//! Dedicated placement: one pCPU per vCPU, kept pins first, then the best
//! nodes (by CPUs and memory), L3 domains and whole cores for the rest.

use super::cells::{describe, place_cells};
use super::layout::{join_nodes, kind_rank, L3Key, Layout};
use super::memory::{Fit, Memory, Target};
use super::region::{choose_nodes, Region};
use super::{
    guest_plan, Current, EmulatorPolicy, Guest, GuestPlan, HostPolicy, Locality, Placement,
};
use crate::engine::cpuset::CpuSet;
use crate::engine::topology::CpuKind;
use std::collections::{BTreeSet, HashMap};

/// Places guests one pCPU per vCPU from `free`; returns a plan for each,
/// None for those that could not be placed (not enough free CPUs of one
/// kind). Each guest's memory is taken on its nodes as it is placed.
pub(super) fn place_dedicated(
    layout: &Layout,
    host: &HostPolicy,
    reserved: &CpuSet,
    guests: &[(&Guest, Current)],
    free: &mut CpuSet,
    memory: &mut Memory,
) -> Vec<Option<GuestPlan>> {
    let mut kept = keep_free_pins(layout, guests, free, memory);
    // Then fill the rest, larger guests first (they are the hardest to fit).
    let mut order: Vec<usize> = (0..guests.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(guests[i].0.vcpus));
    let mut plans = vec![None; guests.len()];
    // Guests that keep all their pins share a reason per node list.
    let mut kept_reasons: HashMap<Vec<Option<u32>>, String> = HashMap::new();
    for i in order {
        let (g, current) = guests[i];
        let Some(placed) = place_one(layout, g, current, &mut kept[i], free, memory) else {
            continue;
        };
        let nodes = layout.nodes_opt(&placed.cpus);
        let mut reason = placed.reason.unwrap_or_else(|| {
            kept_reasons
                .entry(nodes.clone())
                .or_insert_with(|| format!("dedicated: kept pins on node {}", join_nodes(&nodes)))
                .clone()
        });
        if let Some(why) = memory.displaced(g) {
            reason = format!("{reason}; {why}");
        }
        let emulator = match host.emulator {
            EmulatorPolicy::Housekeeping if !reserved.is_empty() => reserved.clone(),
            _ => placed.cpus,
        };
        let vcpus: Vec<CpuSet> = kept[i]
            .iter()
            .map(|s| s.map(|c| std::iter::once(c).collect()).unwrap_or_default())
            .collect();
        let mut plan = guest_plan(
            g,
            Placement::Dedicated,
            vcpus,
            emulator,
            placed.locality,
            reason,
        );
        plan.cells = placed.cells;
        plans[i] = Some(plan);
    }
    plans
}

/// One guest placed one-to-one: its CPUs, why (None: it kept every pin),
/// its cells, and where its memory is bound.
struct Placed {
    cpus: CpuSet,
    reason: Option<String>,
    cells: Vec<super::CellPlan>,
    locality: Locality,
}

/// Fills `g`'s `slots` from `free` (by cells when it has them) and settles
/// its memory; None when it does not fit.
fn place_one(
    layout: &Layout,
    g: &Guest,
    current: Current,
    slots: &mut [Option<u32>],
    free: &mut CpuSet,
    memory: &mut Memory,
) -> Option<Placed> {
    if let Some(groups) = g.cell_groups(layout) {
        // Cells take their memory cell by cell, each where it goes.
        memory.release(g);
        let parts = g.cell_memory(groups.len());
        let fits: Vec<Fit> = parts.iter().map(|p| memory.fit_parts(p)).collect();
        let cells = place_cells(layout, &groups, &fits, current, slots, free)?;
        let cpus: CpuSet = slots.iter().flatten().copied().collect();
        let per_cell: Vec<(CpuSet, Vec<_>)> = groups
            .iter()
            .zip(parts)
            .map(|(cell, parts)| {
                (
                    cell.iter().filter_map(|v| slots[v as usize]).collect(),
                    parts,
                )
            })
            .collect();
        let locality = memory.settle_cells(layout, g, &per_cell);
        let reason = format!("dedicated: {}", describe(&cells));
        return Some(Placed {
            cpus,
            reason: Some(reason),
            cells,
            locality,
        });
    }
    let (cpus, reason, mut target) = fill_slots(layout, current, slots, free, &memory.fit(g))?;
    if reason.is_none() {
        // It keeps every pin: its memory stays bound where it is.
        let bound = g.memory_nodes.iter().flat_map(CpuSet::iter).collect();
        target = Target::Cpus { extra: bound };
    }
    let locality = memory.settle(g, &layout.nodes_opt(&cpus), &target);
    Some(Placed {
        cpus,
        reason,
        cells: Vec::new(),
        locality,
    })
}

/// Per guest, per vCPU: the single-CPU pin it keeps, taken out of `free`.
/// A pin is kept while its CPU is free and of the kind the guest's first
/// kept pin has, so a replan moves nothing it need not; a guest whose
/// memory no longer fits where it runs keeps none.
pub(super) fn keep_free_pins(
    layout: &Layout,
    guests: &[(&Guest, Current)],
    free: &mut CpuSet,
    memory: &Memory,
) -> Vec<Vec<Option<u32>>> {
    let mut kept = Vec::with_capacity(guests.len());
    for (g, current) in guests {
        let mut slots = vec![None; g.vcpus as usize];
        let mut kind = None;
        let keeps = memory.displaced(g).is_none();
        for (vcpu, slot) in slots.iter_mut().enumerate().filter(|_| keeps) {
            let Some(Some(pin)) = current.get(vcpu) else {
                continue;
            };
            let (1, Some(cpu)) = (pin.len(), pin.first()) else {
                continue;
            };
            let same_kind = kind.is_none_or(|k| k == layout.kind_of(cpu));
            if free.contains(cpu) && same_kind {
                kind = Some(layout.kind_of(cpu));
                free.remove(cpu);
                *slot = Some(cpu);
            }
        }
        kept.push(slots);
    }
    kept
}

/// A fresh pick: the CPUs, why, and where the memory goes.
pub(super) struct Pick {
    cpus: CpuSet,
    reason: String,
    target: Target,
}

/// Fills a guest's empty `slots` from `free`. Returns its CPUs, the reason
/// for fresh picks (None: it kept every pin) and where its memory goes, or
/// None when it does not fit, its kept pins then handed back to `free`.
fn fill_slots(
    layout: &Layout,
    current: Current,
    slots: &mut [Option<u32>],
    free: &mut CpuSet,
    fit: &Fit,
) -> Option<(CpuSet, Option<String>, Target)> {
    let mut mine: CpuSet = slots.iter().flatten().copied().collect();
    let missing = slots.iter().filter(|s| s.is_none()).count();
    if missing == 0 {
        return Some((mine, None, Target::cpus()));
    }
    // Where the guest runs now (kept pins, or the range it shared) is home:
    // its memory is there. Pins on CPUs it can no longer have (reserved,
    // taken) are no home.
    let usable = free.union(&mine);
    let home = current.iter().flatten().fold(mine.clone(), |acc, pin| {
        acc.union(&pin.intersection(&usable))
    });
    let mut picked = pick_dedicated(layout, free, &mine, &home, missing, fit);
    if let Some(regrouped) = regroup(layout, &usable, &mine, &home, slots.len(), &picked, fit) {
        // The whole guest moves: its memory follows it to one node.
        slots.fill(None);
        *free = usable;
        mine = CpuSet::new();
        picked = Some(regrouped);
    }
    let Some(pick) = picked else {
        for cpu in mine.iter() {
            free.insert(cpu);
        }
        return None;
    };
    let mut fresh = pick.cpus.iter();
    for slot in slots.iter_mut().filter(|s| s.is_none()) {
        *slot = fresh.next();
    }
    for cpu in pick.cpus.iter() {
        free.remove(cpu);
    }
    Some((mine.union(&pick.cpus), Some(pick.reason), pick.target))
}

/// A fresh pick of all `vcpus` from `usable` when it spans fewer nodes than
/// keeping the pins `mine` and adding `picked` would (when reserved CPUs
/// take half of a guest's node, its kept half must not pin it across two).
fn regroup(
    layout: &Layout,
    usable: &CpuSet,
    mine: &CpuSet,
    home: &CpuSet,
    vcpus: usize,
    picked: &Option<Pick>,
    fit: &Fit,
) -> Option<Pick> {
    if mine.is_empty() {
        return None;
    }
    let kept_nodes = picked
        .as_ref()
        .map(|p| layout.nodes_opt(&p.cpus.union(mine)));
    let mut fresh = pick_dedicated(layout, usable, &CpuSet::new(), home, vcpus, fit)?;
    match kept_nodes {
        Some(nodes) if layout.nodes_opt(&fresh.cpus).len() >= nodes.len() => None,
        Some(nodes) => {
            fresh.reason = format!(
                "{}; moved whole (its kept pins would span nodes {})",
                fresh.reason,
                join_nodes(&nodes)
            );
            Some(fresh)
        }
        None => Some(fresh),
    }
}

/// `need` free CPUs for a guest that already holds `mine`: one core kind,
/// the best nodes (where its memory fits too), then L3 and SMT locality
/// inside them.
fn pick_dedicated(
    layout: &Layout,
    free: &CpuSet,
    mine: &CpuSet,
    home: &CpuSet,
    need: usize,
    fit: &Fit,
) -> Option<Pick> {
    let kinds = match mine.first() {
        Some(cpu) => vec![layout.kind_of(cpu)],
        None => layout.kinds_in(free),
    };
    for kind in kinds {
        let candidates = match layout.kind_masks.get(&kind_rank(kind)) {
            Some(mask) if layout.kind_masks.len() > 1 => free.intersection(mask),
            _ => free.clone(),
        };
        if candidates.len() < need {
            continue;
        }
        let region = choose_nodes(layout, &candidates, home, need, fit);
        let (cpus, l3_note) = pick_from(layout, &region, free, mine, home, need);
        let kind_note = match kind {
            Some(CpuKind::Performance) => ", performance cores",
            Some(CpuKind::Efficiency) => ", efficiency cores",
            None => "",
        };
        return Some(Pick {
            cpus,
            reason: format!(
                "dedicated: {}{l3_note}{kind_note}{}",
                region.reason, region.note
            ),
            target: region.target,
        });
    }
    None
}

/// `need` CPUs from a region: as [`pick_in_region`], or node by node by
/// its quotas (a span made for memory spreads the vCPUs as the memory).
pub(super) fn pick_from(
    layout: &Layout,
    region: &Region,
    free: &CpuSet,
    mine: &CpuSet,
    home: &CpuSet,
    need: usize,
) -> (CpuSet, String) {
    if region.quotas.is_empty() {
        return pick_in_region(layout, &region.cpus, free, mine, home, need);
    }
    let mut picked = CpuSet::new();
    for (node, quota) in &region.quotas {
        let part = layout
            .node_masks
            .get(node)
            .map(|m| m.intersection(&region.cpus))
            .unwrap_or_default();
        picked = picked.union(&pick_in_region(layout, &part, free, mine, home, *quota).0);
    }
    (picked, String::new())
}

/// `need` CPUs from `region`: the L3 domain of the guest's pins if it has
/// room, else the tightest L3 that fits, else the roomiest L3s in turn; and
/// inside each, whole cores first.
pub(super) fn pick_in_region(
    layout: &Layout,
    region: &CpuSet,
    free: &CpuSet,
    mine: &CpuSet,
    home: &CpuSet,
    need: usize,
) -> (CpuSet, String) {
    let by_l3 = layout.by_l3(region);
    let mine_l3: BTreeSet<L3Key> = home.iter().map(|c| layout.l3_key(c)).collect();
    let mut domains: Vec<(&L3Key, &CpuSet)> = by_l3.iter().collect();
    let single = domains
        .iter()
        .filter(|(k, s)| s.len() >= need && mine_l3.contains(*k))
        .min_by_key(|(_, s)| s.len())
        .or_else(|| {
            domains
                .iter()
                .filter(|(_, s)| s.len() >= need)
                .min_by_key(|(k, s)| (s.len(), **k))
        })
        .copied();
    let note = match single {
        Some(((_, Some(l3)), _))
            if by_l3.len() > 1 || layout.l3.iter().flatten().any(|l| l != l3) =>
        {
            format!(", L3 {l3}")
        }
        _ => String::new(),
    };
    match single {
        Some(domain) => domains = vec![domain],
        None => {
            domains.sort_by_key(|(k, s)| (!mine_l3.contains(*k), std::cmp::Reverse(s.len()), **k))
        }
    }
    let mut picked = CpuSet::new();
    for (_, cpus) in domains {
        let want = need - picked.len();
        if want == 0 {
            break;
        }
        picked = picked.union(&pick_cores(layout, cpus, free, mine, want));
    }
    (picked, note)
}

/// `want` CPUs from `cpus` by whole cores: first the free threads of cores
/// the guest already uses, then whole free cores that fit entirely, then
/// threads of cores another guest already uses, and only then breaks a
/// whole free core (leaving a half core another guest may get).
pub(super) fn pick_cores(
    layout: &Layout,
    cpus: &CpuSet,
    free: &CpuSet,
    mine: &CpuSet,
    want: usize,
) -> CpuSet {
    let mut own = Vec::new();
    let mut whole = Vec::new();
    let mut partial = Vec::new();
    let mut seen = BTreeSet::new();
    for cpu in cpus.iter() {
        let core = layout.core_of(cpu);
        if !seen.insert(core.first()) {
            continue;
        }
        let threads = core.intersection(cpus);
        if !core.intersection(mine).is_empty() {
            own.push(threads);
        } else if core.difference(free).is_empty() {
            whole.push(threads);
        } else {
            partial.push(threads);
        }
    }
    let mut picked = Vec::with_capacity(want);
    let take = |set: &CpuSet, picked: &mut Vec<u32>| {
        for cpu in set.iter() {
            if picked.len() < want && !picked.contains(&cpu) {
                picked.push(cpu);
            }
        }
    };
    for core in &own {
        take(core, &mut picked);
    }
    for core in &whole {
        if want - picked.len() >= core.len() {
            take(core, &mut picked);
        }
    }
    for core in partial.iter().chain(&whole) {
        take(core, &mut picked);
    }
    picked.into_iter().collect()
}
