//! Memory during one plan: every node's capacity of each kind against the
//! guests placed there ([`Ledger`]), what each guest holds ([`Claim`]), and
//! which guests no longer fit where they run. The node choosers ask a
//! [`Fit`] whether a set of nodes holds a guest's memory.
//!
//! Order, so that running guests keep their memory where it is:
//!  1. guests pinner leaves alone take theirs where it is bound, else where
//!     their CPUs are, else spread over every node;
//!  2. each managed guest takes its memory where it runs now: bound guests
//!     first, those on one node (their memory has nowhere else to be), then
//!     those on several, spread over their nodes as the room allows (an
//!     assignment that moves earlier ones within their nodes, so none is
//!     turned away that could fit); a bound guest that no longer fits where
//!     it runs (hugepages took the node, a reload raised the reserve) is
//!     displaced and placed afresh;
//!  3. each guest placed keeps what it holds when its memory stays within
//!     its nodes, else hands it back and takes anew where it goes.

use super::layout::{join_nodes, Layout};
use super::{Current, Guest, Locality, Role};
use crate::engine::cpuset::CpuSet;
use crate::engine::memory::{
    by_kind, human, place_bound, Claim, Ledger, MemoryPart, MemoryReserve, PageKind,
};
use crate::engine::topology::Topology;
use std::borrow::Cow;
use std::collections::HashMap;

/// Nodes and their weights (the share of a guest's memory each takes).
pub(super) type Weights = Vec<(u32, u64)>;

pub(super) struct Memory {
    pub(super) ledger: Ledger,
    /// Where the plan's guests lie in memory: a guest's slot below is its
    /// index in that slice (every `&Guest` placement sees is one of them),
    /// cheaper than looking up its UUID for each of a thousand guests.
    base: usize,
    /// What each guest holds (empty: nothing), by slot.
    claims: Vec<Claim>,
    /// Why guests whose memory no longer fits where they run must move.
    displaced: Vec<Option<String>>,
    /// Guests whose memory fits no set of nodes: (name, KiB).
    pub(super) unbound: Vec<(String, u64)>,
}

/// Where a guest's memory goes once its CPUs are chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Target {
    /// It follows the vCPUs: their nodes, and `extra` nodes (a span's, or
    /// where it is bound now), the roomiest taking it first.
    Cpus { extra: Vec<u32> },
    /// Shares chosen for memory: a span made because no node holds it.
    Nodes(Weights),
    /// No set of nodes holds it: it is left unbound.
    Unfit,
}

impl Target {
    pub(super) fn cpus() -> Target {
        Target::Cpus { extra: Vec::new() }
    }
}

/// A guest on the way to its home: its memory, where it runs, the nodes.
type Home<'g> = (u64, &'g Guest, Vec<u32>);

impl Memory {
    /// The ledger of `topo` less `reserve`, for placing `guests`.
    pub(super) fn new(topo: &Topology, reserve: &MemoryReserve, guests: &[Guest]) -> Memory {
        Memory {
            ledger: Ledger::new(topo, reserve),
            base: guests.as_ptr() as usize,
            claims: vec![Claim::new(); guests.len()],
            displaced: vec![None; guests.len()],
            unbound: Vec::new(),
        }
    }

    /// `g`'s index in the plan's guests.
    fn slot(&self, g: &Guest) -> usize {
        let slot = (g as *const Guest as usize - self.base) / std::mem::size_of::<Guest>();
        assert!(slot < self.claims.len(), "a guest from outside the plan");
        slot
    }

    /// Step 1: the memory of guests pinner leaves alone, where it is.
    pub(super) fn take_unmanaged(&mut self, layout: &Layout, guests: &[Guest]) {
        for g in guests {
            let weights = match (&g.role, &g.memory_nodes) {
                (Role::Managed { .. }, _) => continue,
                (_, Some(bound)) => even(bound.iter()),
                (Role::Foreign { taken }, None) => by_node(layout, taken),
                (Role::OptedOut, None) => even(self.ledger.nodes().iter().copied()),
            };
            let claim = self.ledger.take(&weights, &g.memory_parts());
            let slot = self.slot(g);
            self.claims[slot] = claim;
        }
    }

    /// Step 2: each managed guest's memory where it runs now (its pins on
    /// `pool` CPUs, and the nodes its memory is bound to); see the module.
    pub(super) fn take_homes(
        &mut self,
        layout: &Layout,
        managed: &[(&Guest, Current)],
        pool: &CpuSet,
    ) {
        // Shared guests come a hundred to a range: its nodes are worked out once.
        let mut nodes_of: HashMap<&CpuSet, Vec<u32>> = HashMap::new();
        let mut order: Vec<Home> = managed
            .iter()
            .map(|(g, current)| {
                let home = home_nodes(layout, g, current, pool, &mut nodes_of);
                (need_kib(g), *g, home)
            })
            .filter(|(kib, _, home)| *kib > 0 && !home.is_empty())
            .collect();
        // Stable: guests come in name order, and stay so among equals.
        order.sort_by_key(|(kib, g, home)| {
            (
                g.memory_nodes.is_none(),
                home.len() > 1,
                std::cmp::Reverse(*kib),
            )
        });
        let mut homeless = Vec::new();
        // Bound guests first (libvirt holds them where they are), then
        // the unbound.
        let (bound, unbound): (Vec<Home>, Vec<Home>) = order
            .into_iter()
            .partition(|(_, g, _)| g.memory_nodes.is_some());
        for group in [bound, unbound] {
            let parts: Vec<_> = group.iter().map(|(_, g, _)| g.memory_parts()).collect();
            let homes: Vec<(&[u32], &[MemoryPart])> = group
                .iter()
                .zip(&parts)
                .map(|((_, _, home), parts)| (home.as_slice(), &**parts))
                .collect();
            let claims = place_bound(&mut self.ledger, &homes);
            for (home, claim) in group.iter().zip(claims) {
                match claim {
                    Some(claim) => {
                        let slot = self.slot(home.1);
                        self.claims[slot] = claim;
                    }
                    None => homeless.push(home.clone()),
                }
            }
        }
        self.displace(homeless);
    }

    /// Once every guest that fits where it runs is in: a bound guest whose
    /// binding no longer holds it moves, unless its memory fits nowhere
    /// (moving would gain nothing); an unbound one stays.
    fn displace(&mut self, homeless: Vec<Home>) {
        for (kib, g, nodes) in homeless {
            let parts = g.memory_parts();
            if g.memory_nodes.is_none() || !self.ledger.holds(self.ledger.nodes(), &parts) {
                continue;
            }
            let kind = by_kind(&parts).first().map(|p| p.kind);
            let left: u64 = nodes
                .iter()
                .filter_map(|&n| self.ledger.room(n, kind?))
                .sum();
            let on = join_nodes(&nodes.iter().map(|n| Some(*n)).collect::<Vec<_>>());
            let why = format!(
                "moved: its {} no longer fits node {on} ({} left)",
                human(kib),
                human(left)
            );
            let slot = self.slot(g);
            self.displaced[slot] = Some(why);
        }
    }

    /// Why `g` must leave where it runs, if it must.
    pub(super) fn displaced(&self, g: &Guest) -> Option<&str> {
        self.displaced[self.slot(g)].as_deref()
    }

    /// Hands back what `g` holds.
    pub(super) fn release(&mut self, g: &Guest) {
        let slot = self.slot(g);
        let claim = std::mem::take(&mut self.claims[slot]);
        self.ledger.give_back(&claim);
    }

    /// What placement asks of `g`'s memory as a whole (what it holds now
    /// counts as room: it is its own).
    pub(super) fn fit<'a>(&'a self, g: &'a Guest) -> Fit<'a> {
        Fit {
            ledger: Some(&self.ledger),
            parts: g.memory_parts(),
            own: Some(&self.claims[self.slot(g)]),
        }
    }

    /// What placement asks of `parts` (one NUMA cell's memory).
    pub(super) fn fit_parts<'a>(&'a self, parts: &'a [MemoryPart]) -> Fit<'a> {
        Fit {
            ledger: Some(&self.ledger),
            parts: by_kind(parts),
            own: None,
        }
    }

    /// Settles `g`'s memory once its CPUs are chosen (on `nodes`, as
    /// `Layout::nodes_opt` gives them): where it goes, and where it is
    /// bound. What it holds stays when that is within the nodes it is
    /// bound to now.
    pub(super) fn settle(&mut self, g: &Guest, nodes: &[Option<u32>], target: &Target) -> Locality {
        let mut locality = Locality::of(nodes);
        let parts = g.memory_parts();
        if locality.memory_nodes.is_none() || parts.is_empty() {
            self.release(g);
            return locality;
        }
        let targets: &[u32] = match target {
            Target::Unfit => {
                self.release(g);
                self.unbind(g, &mut locality);
                return locality;
            }
            Target::Nodes(_) => &[],
            Target::Cpus { extra } => extra,
        };
        let mut bound = locality.numa_nodes.clone();
        if let Target::Nodes(weights) = target {
            bound.extend(weights.iter().map(|(n, _)| *n));
        }
        bound.extend(targets);
        bound.sort_unstable();
        bound.dedup();
        if !self.keeps(g, &bound) {
            self.release(g);
            let weights = match target {
                Target::Nodes(weights) => weights.clone(),
                // Roomiest first: only the nodes count.
                _ => self.roomiest_first(&bound.iter().map(|n| (*n, 0)).collect(), &parts),
            };
            let ids: Vec<u32> = weights.iter().map(|(n, _)| *n).collect();
            if !self.ledger.holds(&ids, &parts) {
                self.unbind(g, &mut locality);
                return locality;
            }
            self.take(g, &weights, &parts);
        }
        locality.memory_nodes = Some(bound);
        locality
    }

    /// Settles a guest's NUMA cells' memory, each cell's on the nodes of
    /// its CPUs (`cells`: each cell's CPUs and memory); the guest's memory
    /// is left unbound when one cell's does not fit there.
    pub(super) fn settle_cells(
        &mut self,
        layout: &Layout,
        g: &Guest,
        cells: &[(CpuSet, Vec<MemoryPart>)],
    ) -> Locality {
        let all = cells.iter().fold(CpuSet::new(), |acc, (c, _)| acc.union(c));
        let mut locality = Locality::of(&layout.nodes_opt(&all));
        self.release(g);
        if locality.memory_nodes.is_none() {
            return locality;
        }
        for (cpus, parts) in cells.iter().filter(|(_, p)| !p.is_empty()) {
            let weights = by_node(layout, cpus);
            let nodes: Vec<u32> = weights.iter().map(|(n, _)| *n).collect();
            if !self.ledger.holds(&nodes, parts) {
                self.release(g);
                self.unbind(g, &mut locality);
                return locality;
            }
            self.take(g, &weights, parts);
        }
        locality
    }

    /// Whether what `g` holds (all of its memory) lies within `nodes`.
    fn keeps(&self, g: &Guest, nodes: &[u32]) -> bool {
        let claim = &self.claims[self.slot(g)];
        !claim.is_empty() && claim.iter().all(|(n, _, _)| nodes.contains(n))
    }

    /// Several nodes as weights that fill the roomiest first: within a
    /// binding of several nodes the kernel puts pages where there is room,
    /// and counting them so leaves the most for the guests that follow.
    fn roomiest_first(&self, weights: &Weights, parts: &[MemoryPart]) -> Weights {
        if weights.len() < 2 {
            return weights.clone();
        }
        let kind = by_kind(parts).first().map(|p| p.kind);
        let room = |n: u32| {
            kind.and_then(|k| self.ledger.room(n, k))
                .unwrap_or(u64::MAX)
        };
        let mut nodes: Vec<u32> = weights.iter().map(|(n, _)| *n).collect();
        nodes.sort_by_key(|&n| (std::cmp::Reverse(room(n)), n));
        nodes
            .iter()
            .enumerate()
            .map(|(i, &n)| (n, u64::from(i == 0)))
            .collect()
    }

    /// Takes `parts` of `g` on `weights`; adds to what `g` holds.
    fn take(&mut self, g: &Guest, weights: &[(u32, u64)], parts: &[MemoryPart]) {
        let claim = self.ledger.take(weights, parts);
        let slot = self.slot(g);
        self.claims[slot].extend(claim);
    }

    /// `g` stays unbound: said so, and a binding it has now is widened to
    /// every node (a binding beyond its nodes' room is an OOM kill waiting).
    fn unbind(&mut self, g: &Guest, locality: &mut Locality) {
        self.unbound.push((g.name.clone(), need_kib(g)));
        locality.unbound = true;
        locality.memory_nodes = g
            .memory_nodes
            .as_ref()
            .map(|_| self.ledger.nodes().to_vec());
    }

    /// What `g` holds where (empty: nothing, or unbound).
    pub(super) fn claim_of(&self, g: &Guest) -> Claim {
        self.claims[self.slot(g)].clone()
    }
}

/// Whether node sets hold one guest's (or cell's) memory beside what is
/// placed; [`Fit::any`] holds everywhere (memory not considered).
#[derive(Clone)]
pub(super) struct Fit<'a> {
    ledger: Option<&'a Ledger>,
    /// Summed by kind.
    parts: Cow<'a, [MemoryPart]>,
    /// What the guest holds already: room for itself.
    own: Option<&'a Claim>,
}

impl Fit<'static> {
    pub(super) fn any() -> Fit<'static> {
        Fit {
            ledger: None,
            parts: Cow::Borrowed(&[]),
            own: None,
        }
    }
}

impl Fit<'_> {
    /// Whether it asks for anything at all.
    pub(super) fn matters(&self) -> bool {
        self.ledger.is_some() && !self.parts.is_empty()
    }

    /// Room of `kind` on `node` for it (None: unlimited).
    fn room_of(&self, node: u32, kind: PageKind) -> Option<u64> {
        let own: u64 = self
            .own
            .into_iter()
            .flatten()
            .filter(|(n, k, _)| *n == node && *k == kind)
            .map(|(_, _, kib)| kib)
            .sum();
        self.ledger?.room(node, kind).map(|room| room + own)
    }

    /// Whether `nodes` hold it (CPUs without a node: memory cannot be bound
    /// there anyway, so it holds).
    pub(super) fn holds(&self, nodes: &[Option<u32>]) -> bool {
        if !self.matters() || nodes.contains(&None) {
            return true;
        }
        if let ([part], [Some(node)]) = (&*self.parts, nodes) {
            // The usual question (one kind, one node), asked for every
            // range a shared guest may take: no loop.
            return self
                .room_of(*node, part.kind)
                .is_none_or(|room| room >= part.kib);
        }
        self.parts.iter().all(|part| {
            let mut room = 0u64;
            for node in nodes.iter().flatten() {
                match self.room_of(*node, part.kind) {
                    None => return true,
                    Some(r) => room += r,
                }
            }
            room >= part.kib
        })
    }

    /// Room on `node` for it (the scarcest of its kinds; unlimited: MAX).
    pub(super) fn room(&self, node: Option<u32>) -> u64 {
        match node.filter(|_| self.matters()) {
            Some(node) => self
                .parts
                .iter()
                .map(|p| self.room_of(node, p.kind).unwrap_or(u64::MAX))
                .min()
                .unwrap_or(u64::MAX),
            None => u64::MAX,
        }
    }

    /// The nodes that hold memory, when memory matters (else none).
    pub(super) fn memory_nodes(&self) -> Vec<u32> {
        match self.ledger {
            Some(ledger) if self.matters() => ledger.nodes().to_vec(),
            _ => Vec::new(),
        }
    }

    pub(super) fn kib(&self) -> u64 {
        self.parts.iter().map(|p| p.kib).sum()
    }

    /// " (memory 12 of 16 GiB left)": the room `node` keeps once this is
    /// placed there (empty when memory does not matter or has no limit).
    pub(super) fn note_after(&self, node: Option<u32>) -> String {
        let (Some(ledger), Some(node)) = (self.ledger.filter(|_| self.matters()), node) else {
            return String::new();
        };
        let mut after = ledger.clone();
        if let Some(own) = self.own {
            after.give_back(own);
        }
        after.take(&[(node, 1)], &self.parts);
        match after.left_note(node, &self.parts) {
            note if note.is_empty() => note,
            note => format!(" ({note})"),
        }
    }
}

/// A guest's memory in KiB.
pub(super) fn need_kib(g: &Guest) -> u64 {
    g.memory_parts().iter().map(|p| p.kib).sum()
}

/// `cpus` counted by node: the weights of memory that follows them.
pub(super) fn by_node(layout: &Layout, cpus: &CpuSet) -> Weights {
    // Word-wise against each node's mask: a shared range is many CPUs.
    layout
        .node_masks
        .iter()
        .filter_map(|(node, mask)| Some(((*node)?, mask.overlap(cpus) as u64)))
        .filter(|(_, count)| *count > 0)
        .collect()
}

/// The nodes `g` runs on now: those of its pins on `pool` CPUs, and those
/// its memory is bound to beside them (a span made for memory). Empty for
/// a guest not placed yet. `nodes_of` keeps each pin's nodes.
fn home_nodes<'c>(
    layout: &Layout,
    g: &Guest,
    current: &'c [Option<CpuSet>],
    pool: &CpuSet,
    nodes_of: &mut HashMap<&'c CpuSet, Vec<u32>>,
) -> Vec<u32> {
    let mut nodes: Vec<u32> = Vec::new();
    let mut last: Option<&CpuSet> = None;
    for pin in current.iter().flatten() {
        // A shared guest's vCPUs share one range: take it once.
        if last == Some(pin) {
            continue;
        }
        last = Some(pin);
        if let (1, Some(cpu)) = (pin.len(), pin.first()) {
            // A dedicated pin: one CPU, one node.
            nodes.extend(layout.node_of(cpu).filter(|_| pool.contains(cpu)));
            continue;
        }
        let of_pin = nodes_of.entry(pin).or_insert_with(|| {
            let usable = pin.intersection(pool);
            by_node(layout, &usable)
                .into_iter()
                .map(|(n, _)| n)
                .collect()
        });
        nodes.extend(of_pin.iter().copied());
    }
    if !nodes.is_empty() {
        nodes.extend(g.memory_nodes.iter().flat_map(CpuSet::iter));
    }
    nodes.sort_unstable();
    nodes.dedup();
    nodes
}

/// Every node of `nodes` weighted alike.
fn even(nodes: impl Iterator<Item = u32>) -> Weights {
    nodes.map(|n| (n, 1)).collect()
}
