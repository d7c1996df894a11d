//! Per-CPU facts of a host, indexed for fast lookups while placing.

use crate::engine::cpuset::CpuSet;
use crate::engine::topology::{CpuKind, Topology};
use std::collections::BTreeMap;

/// (NUMA node, L3 id) of a CPU.
pub(super) type L3Key = (Option<u32>, Option<u32>);

/// Per-CPU facts, indexed by CPU id, for fast lookups while placing.
pub(super) struct Layout<'a> {
    pub(super) topo: &'a Topology,
    pub(super) node: Vec<Option<u32>>,
    pub(super) l3: Vec<Option<u32>>,
    pub(super) kind: Vec<Option<CpuKind>>,
    /// Position of each CPU in `topo.cpus`, for its SMT siblings.
    pub(super) position: Vec<Option<usize>>,
    /// Online CPUs by node, by (node, L3) and by kind rank, so grouping a
    /// set is a few word-wise intersections rather than a scan.
    pub(super) node_masks: BTreeMap<Option<u32>, CpuSet>,
    pub(super) l3_masks: BTreeMap<L3Key, CpuSet>,
    pub(super) kind_masks: BTreeMap<u8, CpuSet>,
}

impl<'a> Layout<'a> {
    pub(super) fn new(topo: &'a Topology) -> Layout<'a> {
        let width = topo.cpus.iter().map(|c| c.id + 1).max().unwrap_or(0) as usize;
        let mut layout = Layout {
            topo,
            node: vec![None; width],
            l3: vec![None; width],
            kind: vec![None; width],
            position: vec![None; width],
            node_masks: BTreeMap::new(),
            l3_masks: BTreeMap::new(),
            kind_masks: BTreeMap::new(),
        };
        for (position, cpu) in topo.cpus.iter().enumerate().filter(|(_, c)| c.online) {
            let i = cpu.id as usize;
            layout.position[i] = Some(position);
            layout.node[i] = cpu.numa_node;
            layout.l3[i] = cpu.l3;
            layout.kind[i] = cpu.kind;
        }
        let online = || topo.cpus.iter().filter(|c| c.online);
        layout.node_masks = masks(online().map(|c| (c.numa_node, c.id)));
        layout.l3_masks = masks(online().map(|c| (layout.l3_key(c.id), c.id)));
        layout.kind_masks = masks(online().map(|c| (kind_rank(c.kind), c.id)));
        layout
    }

    /// An L3 domain is only meaningful within its node.
    pub(super) fn l3_key(&self, cpu: u32) -> L3Key {
        (
            self.node_of(cpu),
            self.l3.get(cpu as usize).copied().flatten(),
        )
    }

    pub(super) fn node_of(&self, cpu: u32) -> Option<u32> {
        self.node.get(cpu as usize).copied().flatten()
    }

    pub(super) fn kind_of(&self, cpu: u32) -> Option<CpuKind> {
        self.kind.get(cpu as usize).copied().flatten()
    }

    /// `cpus` split by precomputed `masks`, empty parts left out.
    pub(super) fn split<K: Ord + Clone>(
        cpus: &CpuSet,
        masks: &BTreeMap<K, CpuSet>,
    ) -> BTreeMap<K, CpuSet> {
        masks
            .iter()
            .map(|(k, m)| (k.clone(), cpus.intersection(m)))
            .filter(|(_, part)| !part.is_empty())
            .collect()
    }

    pub(super) fn by_node(&self, cpus: &CpuSet) -> BTreeMap<Option<u32>, CpuSet> {
        Layout::split(cpus, &self.node_masks)
    }

    pub(super) fn by_l3(&self, cpus: &CpuSet) -> BTreeMap<L3Key, CpuSet> {
        Layout::split(cpus, &self.l3_masks)
    }

    pub(super) fn by_kind(&self, cpus: &CpuSet) -> BTreeMap<u8, CpuSet> {
        Layout::split(cpus, &self.kind_masks)
    }

    /// The CPUs sharing `cpu`'s core (itself alone when its core is unknown).
    pub(super) fn core_of(&self, cpu: u32) -> CpuSet {
        match self.position.get(cpu as usize).copied().flatten() {
            Some(p) if !self.topo.cpus[p].smt_siblings.is_empty() => {
                self.topo.cpus[p].smt_siblings.iter().copied().collect()
            }
            _ => std::iter::once(cpu).collect(),
        }
    }

    /// The distinct nodes of `cpus` (None for CPUs without one), sorted.
    /// Deduplicated as found (a node's CPUs mostly come in a row), so the
    /// list stays as short as the answer.
    pub(super) fn nodes_opt(&self, cpus: &CpuSet) -> Vec<Option<u32>> {
        let mut nodes: Vec<Option<u32>> = Vec::new();
        for node in cpus.iter().map(|c| self.node_of(c)) {
            if nodes.last() != Some(&node) && !nodes.contains(&node) {
                nodes.push(node);
            }
        }
        nodes.sort_unstable();
        nodes
    }

    pub(super) fn distance(&self, a: Option<u32>, b: Option<u32>) -> u32 {
        match (a, b) {
            (Some(a), Some(b)) => self.topo.distance(a, b),
            _ => 20,
        }
    }

    /// Kinds present among `cpus`: performance first, unknown last.
    pub(super) fn kinds_in(&self, cpus: &CpuSet) -> Vec<Option<CpuKind>> {
        self.kind_masks
            .iter()
            .filter(|(_, m)| m.overlap(cpus) > 0)
            .map(|(rank, _)| kind_of_rank(*rank))
            .collect()
    }
}

/// CPUs grouped by key. A key's CPUs mostly come in runs (a node's, an
/// L3's), so a run is gathered before the map is looked up.
pub(super) fn masks<K: Ord + Copy>(cpus: impl Iterator<Item = (K, u32)>) -> BTreeMap<K, CpuSet> {
    let mut masks: BTreeMap<K, CpuSet> = BTreeMap::new();
    let mut cpus = cpus.peekable();
    while let Some((key, cpu)) = cpus.next() {
        let mut run: CpuSet = std::iter::once(cpu).collect();
        while let Some((_, next)) = cpus.next_if(|(k, _)| *k == key) {
            run.insert(next);
        }
        let mask = masks.entry(key).or_default();
        *mask = mask.union(&run);
    }
    masks
}

pub(super) fn kind_rank(kind: Option<CpuKind>) -> u8 {
    match kind {
        Some(CpuKind::Performance) => 0,
        Some(CpuKind::Efficiency) => 1,
        None => 2,
    }
}

pub(super) fn kind_of_rank(rank: u8) -> Option<CpuKind> {
    match rank {
        0 => Some(CpuKind::Performance),
        1 => Some(CpuKind::Efficiency),
        _ => None,
    }
}

pub(super) fn node_label(node: Option<u32>) -> String {
    node.map_or_else(|| "-".to_string(), |n| n.to_string())
}

pub(super) fn join_nodes(nodes: &[Option<u32>]) -> String {
    let mut out = String::new();
    for (i, node) in nodes.iter().enumerate() {
        if i > 0 {
            out.push('+');
        }
        out.push_str(&node_label(*node));
    }
    out
}
