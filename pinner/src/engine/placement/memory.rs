//! Memory during one plan: every node's capacity of each kind against the
//! guests placed there ([`Ledger`]), what each guest took ([`Claim`]), and
//! which guests no longer fit where they run. The node choosers ask a
//! [`Fit`] whether a set of nodes holds a guest's memory.
//!
//! Order, so that running guests keep their memory where it is:
//!  1. guests pinner leaves alone take theirs where it is bound, else where
//!     their CPUs are, else spread over every node;
//!  2. each managed guest takes its memory where it runs now, largest
//!     first; one that no longer fits there (hugepages took the node, a
//!     reload raised the reserve) is displaced and placed afresh;
//!  3. each guest placed hands back what it held and takes anew where it
//!     goes (the same nodes, for a guest that stays).

use super::layout::{join_nodes, Layout};
use super::{Current, Guest, Locality, Role};
use crate::engine::cpuset::CpuSet;
use crate::engine::memory::{by_kind, human, Claim, Ledger, MemoryPart, MemoryReserve};
use crate::engine::topology::Topology;
use std::collections::{BTreeMap, HashMap};

/// Nodes and their weights (the share of a guest's memory each takes).
pub(super) type Weights = Vec<(u32, u64)>;

pub(super) struct Memory {
    pub(super) ledger: Ledger,
    /// What each guest holds, by UUID.
    claims: HashMap<String, Claim>,
    /// Guests whose memory no longer fits where they run, with why.
    displaced: HashMap<String, String>,
    /// Guests whose memory fits no set of nodes: (name, KiB).
    pub(super) unbound: Vec<(String, u64)>,
}

impl Memory {
    pub(super) fn new(topo: &Topology, reserve: &MemoryReserve) -> Memory {
        Memory {
            ledger: Ledger::new(topo, reserve),
            claims: HashMap::new(),
            displaced: HashMap::new(),
            unbound: Vec::new(),
        }
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
            self.claims.insert(g.uuid.clone(), claim);
        }
    }

    /// Step 2: each managed guest's memory where it runs now (its pins on
    /// `pool` CPUs), the largest first; the others are displaced.
    pub(super) fn take_homes(
        &mut self,
        layout: &Layout,
        managed: &[(&Guest, Current)],
        pool: &CpuSet,
    ) {
        let mut order: Vec<(u64, &Guest, Weights)> = managed
            .iter()
            .map(|(g, current)| {
                let home = current
                    .iter()
                    .flatten()
                    .fold(CpuSet::new(), |acc, pin| acc.union(&pin.intersection(pool)));
                (need_kib(g), *g, by_node(layout, &home))
            })
            .filter(|(kib, _, home)| *kib > 0 && !home.is_empty())
            .collect();
        order.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.name.cmp(&b.1.name)));
        for (kib, g, home) in order {
            let nodes: Vec<u32> = home.iter().map(|(n, _)| *n).collect();
            let parts = g.memory_parts();
            if self.ledger.holds(&nodes, &parts) {
                let claim = self.ledger.take(&home, &parts);
                self.claims.insert(g.uuid.clone(), claim);
                continue;
            }
            let left: u64 = nodes
                .iter()
                .filter_map(|&n| {
                    by_kind(&parts)
                        .first()
                        .and_then(|p| self.ledger.room(n, p.kind))
                })
                .sum();
            let on = join_nodes(&nodes.iter().map(|n| Some(*n)).collect::<Vec<_>>());
            let why = format!(
                "moved: its {} no longer fits node {on} ({} left)",
                human(kib),
                human(left)
            );
            self.displaced.insert(g.uuid.clone(), why);
        }
    }

    /// Why `g` must leave where it runs, if it must.
    pub(super) fn displaced(&self, g: &Guest) -> Option<&str> {
        self.displaced.get(&g.uuid).map(String::as_str)
    }

    /// Hands back what `g` holds, before it is placed again.
    pub(super) fn release(&mut self, g: &Guest) {
        if let Some(claim) = self.claims.remove(&g.uuid) {
            self.ledger.give_back(&claim);
        }
    }

    /// What placement asks of `g`'s memory (its memory as a whole).
    pub(super) fn fit<'a>(&'a self, g: &Guest) -> Fit<'a> {
        Fit {
            ledger: Some(&self.ledger),
            parts: g.memory_parts(),
        }
    }

    /// What placement asks of `parts` (one NUMA cell's memory).
    pub(super) fn fit_parts<'a>(&'a self, parts: &[MemoryPart]) -> Fit<'a> {
        Fit {
            ledger: Some(&self.ledger),
            parts: by_kind(parts),
        }
    }

    /// Takes `parts` of `g` on `weights`; adds to what `g` holds.
    pub(super) fn take(&mut self, g: &Guest, weights: &[(u32, u64)], parts: &[MemoryPart]) {
        let claim = self.ledger.take(weights, parts);
        self.claims.entry(g.uuid.clone()).or_default().extend(claim);
    }

    /// `g`'s memory fits no set of nodes: it stays unbound, and is said so.
    pub(super) fn leave_unbound(&mut self, g: &Guest) {
        self.unbound.push((g.name.clone(), need_kib(g)));
    }

    /// What `g` holds where (empty: nothing, or unbound).
    pub(super) fn claim_of(&self, g: &Guest) -> Claim {
        self.claims.get(&g.uuid).cloned().unwrap_or_default()
    }
}

/// Where a guest's memory goes once its CPUs are chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Target {
    /// It follows the vCPUs: each of their nodes takes a share by its vCPUs
    /// there; `extra` nodes (added for memory alone) take what they cannot.
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

impl Memory {
    /// Settles `g`'s memory once its CPUs are `cpus` (its claim handed back
    /// before it was placed): where it goes, and where it is bound.
    pub(super) fn settle(
        &mut self,
        layout: &Layout,
        g: &Guest,
        cpus: &CpuSet,
        target: &Target,
    ) -> Locality {
        let mut locality = Locality::of(&layout.nodes_opt(cpus));
        if locality.memory_nodes.is_none() || g.memory_parts().is_empty() {
            return locality;
        }
        let mut weights = match target {
            Target::Unfit => {
                self.unbind(g, &mut locality);
                return locality;
            }
            Target::Nodes(weights) => weights.clone(),
            Target::Cpus { .. } => by_node(layout, cpus),
        };
        if let Target::Cpus { extra } = target {
            let more: Vec<u32> = extra
                .iter()
                .filter(|n| !weights.iter().any(|(w, _)| w == *n))
                .copied()
                .collect();
            weights.extend(more.into_iter().map(|n| (n, 0)));
        }
        self.take(g, &weights, &g.memory_parts());
        let mut nodes = locality.numa_nodes.clone();
        nodes.extend(weights.iter().map(|(n, _)| *n));
        nodes.sort_unstable();
        nodes.dedup();
        locality.memory_nodes = Some(nodes);
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

    /// `g` stays unbound: said so, and a binding it has now is widened to
    /// every node (a binding beyond its nodes' room is an OOM kill waiting).
    fn unbind(&mut self, g: &Guest, locality: &mut Locality) {
        self.leave_unbound(g);
        locality.memory_nodes = g
            .memory_nodes
            .as_ref()
            .map(|_| self.ledger.nodes().to_vec());
    }
}

/// Whether node sets hold one guest's (or cell's) memory beside what is
/// placed; [`Fit::any`] holds everywhere (memory not considered).
#[derive(Clone)]
pub(super) struct Fit<'a> {
    ledger: Option<&'a Ledger>,
    /// Summed by kind.
    parts: Vec<MemoryPart>,
}

impl Fit<'static> {
    pub(super) fn any() -> Fit<'static> {
        Fit {
            ledger: None,
            parts: Vec::new(),
        }
    }
}

impl Fit<'_> {
    /// Whether it asks for anything at all.
    pub(super) fn matters(&self) -> bool {
        self.ledger.is_some() && !self.parts.is_empty()
    }

    /// Whether `nodes` hold it (CPUs without a node: memory cannot be bound
    /// there anyway, so it holds).
    pub(super) fn holds(&self, nodes: &[Option<u32>]) -> bool {
        let Some(ledger) = self.ledger.filter(|_| !self.parts.is_empty()) else {
            return true;
        };
        if nodes.contains(&None) {
            return true;
        }
        let ids: Vec<u32> = nodes.iter().flatten().copied().collect();
        ledger.holds(&ids, &self.parts)
    }

    /// Room on `node` for it (the scarcest of its kinds; unlimited: MAX).
    pub(super) fn room(&self, node: Option<u32>) -> u64 {
        match (self.ledger, node) {
            (Some(ledger), Some(node)) => self
                .parts
                .iter()
                .map(|p| ledger.room(node, p.kind).unwrap_or(u64::MAX))
                .min()
                .unwrap_or(u64::MAX),
            _ => u64::MAX,
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

    /// ", memory 12 of 16 GiB left": the room `node` keeps once this is
    /// placed there (empty when memory does not matter or has no limit).
    pub(super) fn note_after(&self, node: Option<u32>) -> String {
        let (Some(ledger), Some(node)) = (self.ledger, node) else {
            return String::new();
        };
        if self.parts.is_empty() {
            return String::new();
        }
        let mut after = ledger.clone();
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
    let mut counts: BTreeMap<u32, u64> = BTreeMap::new();
    for cpu in cpus.iter() {
        if let Some(node) = layout.node_of(cpu) {
            *counts.entry(node).or_default() += 1;
        }
    }
    counts.into_iter().collect()
}

/// Every node of `nodes` weighted alike.
fn even(nodes: impl Iterator<Item = u32>) -> Weights {
    nodes.map(|n| (n, 1)).collect()
}
