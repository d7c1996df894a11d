//! Dedicated placement: one pCPU per vCPU, kept pins first, then the best
//! nodes, L3 domains and whole cores for the rest.

use super::cells::{describe, place_cells};
use super::layout::{join_nodes, kind_rank, node_label, L3Key, Layout};
use super::{
    guest_plan, Current, EmulatorPolicy, Guest, GuestPlan, HostPolicy, Locality, Placement,
};
use crate::engine::cpuset::CpuSet;
use crate::engine::topology::CpuKind;
use std::collections::{BTreeSet, HashMap};

/// Places guests one pCPU per vCPU from `free`; returns a plan for each,
/// None for those that could not be placed (not enough free CPUs of one kind).
pub(super) fn place_dedicated(
    layout: &Layout,
    host: &HostPolicy,
    reserved: &CpuSet,
    guests: &[(&Guest, Current)],
    free: &mut CpuSet,
) -> Vec<Option<GuestPlan>> {
    let mut kept = keep_free_pins(layout, guests, free);
    // Then fill the rest, larger guests first (they are the hardest to fit).
    let mut order: Vec<usize> = (0..guests.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(guests[i].0.vcpus));
    let mut plans = vec![None; guests.len()];
    // Guests that keep all their pins share a reason per node list.
    let mut kept_reasons: HashMap<Vec<Option<u32>>, String> = HashMap::new();
    for i in order {
        let (g, current) = guests[i];
        let slots = &mut kept[i];
        let (placed, cells) = match g.cell_groups(layout) {
            Some(groups) => match place_cells(layout, &groups, current, slots, free) {
                Some(plans) => {
                    let own: CpuSet = slots.iter().flatten().copied().collect();
                    let reason = format!("dedicated: {}", describe(&plans));
                    (Some((own, Some(reason))), plans)
                }
                None => (None, Vec::new()),
            },
            None => (fill_slots(layout, current, slots, free), Vec::new()),
        };
        let Some((own, reason)) = placed else {
            continue;
        };
        let vcpus: Vec<CpuSet> = slots
            .iter()
            .map(|s| s.map(|c| std::iter::once(c).collect()).unwrap_or_default())
            .collect();
        let nodes = layout.nodes_opt(&own);
        let reason = reason.unwrap_or_else(|| {
            kept_reasons
                .entry(nodes.clone())
                .or_insert_with(|| format!("dedicated: kept pins on node {}", join_nodes(&nodes)))
                .clone()
        });
        let emulator = match host.emulator {
            EmulatorPolicy::Housekeeping if !reserved.is_empty() => reserved.clone(),
            _ => own,
        };
        let locality = Locality::of(&nodes);
        let mut plan = guest_plan(g, Placement::Dedicated, vcpus, emulator, locality, reason);
        plan.cells = cells;
        plans[i] = Some(plan);
    }
    plans
}

/// Per guest, per vCPU: the single-CPU pin it keeps, taken out of `free`.
/// A pin is kept while its CPU is free and of the kind the guest's first
/// kept pin has, so a replan moves nothing it need not.
pub(super) fn keep_free_pins(
    layout: &Layout,
    guests: &[(&Guest, Current)],
    free: &mut CpuSet,
) -> Vec<Vec<Option<u32>>> {
    let mut kept = Vec::with_capacity(guests.len());
    for (g, current) in guests {
        let mut slots = vec![None; g.vcpus as usize];
        let mut kind = None;
        for (vcpu, slot) in slots.iter_mut().enumerate() {
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

/// Fills a guest's empty `slots` from `free`. Returns its CPUs and the
/// reason for fresh picks (None: it kept every pin), or None when it does
/// not fit, its kept pins then handed back to `free`.
pub(super) fn fill_slots(
    layout: &Layout,
    current: Current,
    slots: &mut [Option<u32>],
    free: &mut CpuSet,
) -> Option<(CpuSet, Option<String>)> {
    let mut mine: CpuSet = slots.iter().flatten().copied().collect();
    let missing = slots.iter().filter(|s| s.is_none()).count();
    if missing == 0 {
        return Some((mine, None));
    }
    // Where the guest runs now (kept pins, or the range it shared) is home:
    // its memory is there. Pins on CPUs it can no longer have (reserved,
    // taken) are no home.
    let usable = free.union(&mine);
    let home = current.iter().flatten().fold(mine.clone(), |acc, pin| {
        acc.union(&pin.intersection(&usable))
    });
    let mut picked = pick_dedicated(layout, free, &mine, &home, missing);
    if let Some(regrouped) = regroup(layout, &usable, &mine, &home, slots.len(), &picked) {
        // The whole guest moves: its memory follows it to one node.
        slots.fill(None);
        *free = usable;
        mine = CpuSet::new();
        picked = Some(regrouped);
    }
    let Some((chosen, reason)) = picked else {
        for cpu in mine.iter() {
            free.insert(cpu);
        }
        return None;
    };
    let mut fresh = chosen.iter();
    for slot in slots.iter_mut().filter(|s| s.is_none()) {
        *slot = fresh.next();
    }
    for cpu in chosen.iter() {
        free.remove(cpu);
    }
    Some((mine.union(&chosen), Some(reason)))
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
    picked: &Option<(CpuSet, String)>,
) -> Option<(CpuSet, String)> {
    if mine.is_empty() {
        return None;
    }
    let kept_nodes = picked
        .as_ref()
        .map(|(chosen, _)| layout.nodes_opt(&chosen.union(mine)));
    let (cpus, reason) = pick_dedicated(layout, usable, &CpuSet::new(), home, vcpus)?;
    match kept_nodes {
        Some(nodes) if layout.nodes_opt(&cpus).len() >= nodes.len() => None,
        Some(nodes) => Some((
            cpus,
            format!(
                "{reason}; moved whole (its kept pins would span nodes {})",
                join_nodes(&nodes)
            ),
        )),
        None => Some((cpus, reason)),
    }
}

/// `need` free CPUs for a guest that already holds `mine`: one core kind,
/// the best nodes, then L3 and SMT locality inside them.
pub(super) fn pick_dedicated(
    layout: &Layout,
    free: &CpuSet,
    mine: &CpuSet,
    home: &CpuSet,
    need: usize,
) -> Option<(CpuSet, String)> {
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
        let (region, where_) = choose_nodes(layout, &candidates, home, need);
        let (cpus, l3_note) = pick_in_region(layout, &region, free, mine, home, need);
        let kind_note = match kind {
            Some(CpuKind::Performance) => ", performance cores",
            Some(CpuKind::Efficiency) => ", efficiency cores",
            None => "",
        };
        return Some((cpus, format!("dedicated: {where_}{l3_note}{kind_note}")));
    }
    None
}

/// The nodes to take `need` CPUs from: where the guest already is (`home`:
/// its pins or the range it shared) if that has room, else the node that fits it most tightly, else the fewest nodes,
/// closest by the distance matrix. Returns their candidate CPUs and a reason.
pub(super) fn choose_nodes(
    layout: &Layout,
    candidates: &CpuSet,
    home: &CpuSet,
    need: usize,
) -> (CpuSet, String) {
    let by_node = layout.by_node(candidates);
    let home_nodes = layout.nodes_opt(home);
    let room = home_nodes
        .iter()
        .filter_map(|n| by_node.get(n))
        .fold(CpuSet::new(), |acc, s| acc.union(s));
    if !home.is_empty() && room.len() >= need {
        return (room, format!("stays on node {}", join_nodes(&home_nodes)));
    }
    if let Some((node, cpus)) = by_node
        .iter()
        .filter(|(_, cpus)| cpus.len() >= need)
        .min_by_key(|(node, cpus)| (cpus.len(), **node))
    {
        return (cpus.clone(), format!("fits node {}", node_label(*node)));
    }
    // Start from the node with most room, add the closest until it fits.
    let mut selected: Vec<Option<u32>> = Vec::new();
    let mut total = 0;
    while total < need {
        let next = by_node
            .iter()
            .filter(|(n, _)| !selected.contains(n))
            .min_by_key(|(n, cpus)| {
                let distance: u32 = selected.iter().map(|s| layout.distance(*s, **n)).sum();
                (distance, std::cmp::Reverse(cpus.len()), **n)
            });
        let Some((node, cpus)) = next else { break };
        selected.push(*node);
        total += cpus.len();
    }
    let farthest = selected
        .iter()
        .flat_map(|a| selected.iter().map(move |b| (*a, *b)))
        .map(|(a, b)| layout.distance(a, b))
        .max()
        .unwrap_or(10);
    let region = selected
        .iter()
        .filter_map(|n| by_node.get(n))
        .fold(CpuSet::new(), |acc, s| acc.union(s));
    selected.sort();
    (
        region,
        format!(
            "no node has {need} free CPUs; spans nodes {} (distance {farthest})",
            join_nodes(&selected)
        ),
    )
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
