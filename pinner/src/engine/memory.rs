//! Guest memory as placement accounts it: sizes in libvirt's units, the
//! kind of page a guest's memory is made of (normal, or huge pages of one
//! size), and a [`Ledger`] of each NUMA node's capacity of each kind
//! against what guests placed there take. Pure: capacities come in from
//! the topology and the config.

use crate::engine::topology::Topology;
use serde::Serialize;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// The largest guest memory taken (4 PiB, in KiB): far beyond any host,
/// small enough that sums over thousands of guests never overflow.
pub const MAX_MEMORY_KIB: u64 = 1 << 42;

/// What a guest's memory (or one of its NUMA cells' memory) is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PageKind {
    /// The kernel's normal pages (transparent huge pages included).
    Normal,
    /// Huge pages of this size, in KiB, from the node's hugetlb pool.
    Huge(u64),
}

impl PageKind {
    /// "normal", "2M pages", "1G pages".
    pub fn label(self) -> String {
        match self {
            PageKind::Normal => "normal".into(),
            PageKind::Huge(kib) => format!("{} pages", page_size_label(kib)),
        }
    }

    /// The metric label: "normal", "hugepages-2048kB" (sysfs's name).
    pub fn metric_label(self) -> String {
        match self {
            PageKind::Normal => "normal".into(),
            PageKind::Huge(kib) => format!("hugepages-{kib}kB"),
        }
    }
}

/// "2M", "1G", "64K".
pub fn page_size_label(kib: u64) -> String {
    match kib {
        k if k >= 1 << 20 && k.is_multiple_of(1 << 20) => format!("{}G", k >> 20),
        k if k >= 1 << 10 && k.is_multiple_of(1 << 10) => format!("{}M", k >> 10),
        k => format!("{k}K"),
    }
}

/// An amount of memory of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemoryPart {
    pub kib: u64,
    pub kind: PageKind,
}

/// `parts` summed by kind, in kind order (normal first); borrowed as they
/// are when there is nothing to sum (one part: most guests, placed in a
/// loop over a thousand).
pub fn by_kind(parts: &[MemoryPart]) -> Cow<'_, [MemoryPart]> {
    if let [one] = parts {
        if one.kib > 0 {
            return Cow::Borrowed(parts);
        }
    }
    let mut sums: BTreeMap<PageKind, u64> = BTreeMap::new();
    for p in parts.iter().filter(|p| p.kib > 0) {
        *sums.entry(p.kind).or_default() += p.kib;
    }
    Cow::Owned(
        sums.into_iter()
            .map(|(kind, kib)| MemoryPart { kib, kind })
            .collect(),
    )
}

/// A size for people: "512 MiB", "1.5 GiB", "24 GiB".
pub fn human(kib: u64) -> String {
    const GIB: u64 = 1 << 20;
    if kib >= GIB {
        let tenths = (kib * 10 + GIB / 2) / GIB;
        if tenths.is_multiple_of(10) {
            format!("{} GiB", tenths / 10)
        } else {
            format!("{}.{} GiB", tenths / 10, tenths % 10)
        }
    } else {
        format!("{} MiB", kib.div_ceil(1024))
    }
}

/// Why a libvirt size is not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("{0:?} is not a size")]
    NotANumber(String),
    #[error("unit {0:?} is not one libvirt knows")]
    Unit(String),
    #[error("{0} is more than the 4 PiB pinner handles")]
    TooLarge(String),
}

/// A size in one of libvirt's units (`unit` attribute; KiB when absent),
/// in KiB rounded up.
pub fn to_kib(value: &str, unit: Option<&str>) -> Result<u64, SizeError> {
    let number: u64 = value
        .trim()
        .parse()
        .map_err(|_| SizeError::NotANumber(value.trim().to_string()))?;
    let unit = unit.unwrap_or("KiB");
    let bytes_per: u128 = match unit.to_ascii_lowercase().as_str() {
        "b" | "bytes" => 1,
        "k" | "kib" => 1 << 10,
        "kb" => 1_000,
        "m" | "mib" => 1 << 20,
        "mb" => 1_000_000,
        "g" | "gib" => 1 << 30,
        "gb" => 1_000_000_000,
        "t" | "tib" => 1 << 40,
        "tb" => 1_000_000_000_000,
        "p" | "pib" => 1 << 50,
        "pb" => 1_000_000_000_000_000,
        _ => return Err(SizeError::Unit(unit.to_string())),
    };
    let kib = (u128::from(number) * bytes_per).div_ceil(1024);
    if kib > u128::from(MAX_MEMORY_KIB) {
        return Err(SizeError::TooLarge(format!("{number} {unit}")));
    }
    Ok(kib as u64)
}

/// What the host keeps for itself on each node, from the config (and
/// nova.conf): normal memory in KiB, and huge pages by node and size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryReserve {
    pub normal_kib_per_node: u64,
    /// (node, page size in KiB) → pages.
    pub huge_pages: BTreeMap<(u32, u64), u64>,
}

/// One pool of a node: its capacity (None: unknown, so unlimited) and what
/// the guests placed on it take, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pool {
    capacity: Option<u64>,
    used: u64,
}

impl Pool {
    fn room(&self) -> Option<u64> {
        self.capacity.map(|c| c.saturating_sub(self.used))
    }
}

/// What one guest took where: (node, kind, KiB), to hand back if it moves.
pub type Claim = Vec<(u32, PageKind, u64)>;

/// Every node's capacity of each kind against what guests take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ledger {
    /// Normal memory by node id (None: no such node). A vector, not a map:
    /// placement asks for room thousands of times a plan.
    normal: Vec<Option<Pool>>,
    /// Hugepage pools: (node, page size in KiB, pool), by node and size.
    huge: Vec<(u32, u64, Pool)>,
    /// Nodes with memory (or of unknown size), in id order.
    nodes: Vec<u32>,
}

/// One node's figures of one kind, for plans, status and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolFigures {
    pub node: u32,
    pub kind: PageKind,
    /// What guests may take there (None: not known; not limited).
    pub capacity_kib: Option<u64>,
    /// What the guests placed (and those pinner leaves alone) take.
    pub committed_kib: u64,
}

impl Ledger {
    /// Every node's normal memory (MemTotal − hugepage pools − reserve)
    /// and hugepage pools (pages − reserved pages) as capacities. A node
    /// whose size sysfs does not give has no limit.
    pub fn new(topo: &Topology, reserve: &MemoryReserve) -> Ledger {
        let mut ledger = Ledger {
            normal: Vec::new(),
            huge: Vec::new(),
            nodes: Vec::new(),
        };
        for node in &topo.numa_nodes {
            let huge_kib: u64 = node.hugepages.iter().map(|p| p.size_kib * p.total).sum();
            let normal = node.memory_mib.map(|mib| {
                (mib * 1024)
                    .saturating_sub(huge_kib)
                    .saturating_sub(reserve.normal_kib_per_node)
            });
            if normal != Some(0) || huge_kib > 0 || node.memory_mib.is_none() {
                ledger.nodes.push(node.id);
            }
            *ledger.pool_mut(node.id, PageKind::Normal) = Pool {
                capacity: normal,
                used: 0,
            };
            for p in &node.hugepages {
                let kept = reserve
                    .huge_pages
                    .get(&(node.id, p.size_kib))
                    .copied()
                    .unwrap_or(0);
                let capacity = p.total.saturating_sub(kept) * p.size_kib;
                ledger
                    .pool_mut(node.id, PageKind::Huge(p.size_kib))
                    .capacity = Some(capacity);
            }
        }
        ledger
    }

    fn pool(&self, node: u32, kind: PageKind) -> Option<&Pool> {
        match kind {
            PageKind::Normal => self.normal.get(node as usize)?.as_ref(),
            PageKind::Huge(size) => self
                .huge
                .iter()
                .find(|(n, s, _)| *n == node && *s == size)
                .map(|(_, _, pool)| pool),
        }
    }

    /// `node`'s pool of `kind`, made when it has none yet (normal memory of
    /// a node sysfs did not size: unlimited; a pool of pages: empty).
    fn pool_mut(&mut self, node: u32, kind: PageKind) -> &mut Pool {
        match kind {
            PageKind::Normal => {
                let i = node as usize;
                if self.normal.len() <= i {
                    self.normal.resize(i + 1, None);
                }
                self.normal[i].get_or_insert(Pool {
                    capacity: None,
                    used: 0,
                })
            }
            PageKind::Huge(size) => {
                let at = self
                    .huge
                    .iter()
                    .position(|(n, s, _)| (*n, *s) >= (node, size));
                let at = match at {
                    Some(i) if (self.huge[i].0, self.huge[i].1) == (node, size) => i,
                    at => {
                        let i = at.unwrap_or(self.huge.len());
                        let empty = Pool {
                            capacity: Some(0),
                            used: 0,
                        };
                        self.huge.insert(i, (node, size, empty));
                        i
                    }
                };
                &mut self.huge[at].2
            }
        }
    }

    /// The nodes that hold memory, in id order.
    pub fn nodes(&self) -> &[u32] {
        &self.nodes
    }

    /// Room left of `kind` on `node` (None: unlimited). A node without a
    /// pool of that kind has none.
    pub fn room(&self, node: u32, kind: PageKind) -> Option<u64> {
        match self.pool(node, kind) {
            Some(pool) => pool.room(),
            None if kind == PageKind::Normal => None,
            None => Some(0),
        }
    }

    /// Whether `nodes` together hold `parts` beside what is placed.
    pub fn holds(&self, nodes: &[u32], parts: &[MemoryPart]) -> bool {
        by_kind(parts).iter().all(|part| {
            let mut room = 0u64;
            for &node in nodes {
                match self.room(node, part.kind) {
                    None => return true,
                    Some(r) => room += r,
                }
            }
            room >= part.kib
        })
    }

    /// Takes `parts` on `nodes`, each node's share by its weight (its
    /// vCPUs there), a share a node has no room for spilling to the others;
    /// what no node has room for stays on the first (over capacity: the
    /// memory is there whether pinner likes it or not).
    pub fn take(&mut self, nodes: &[(u32, u64)], parts: &[MemoryPart]) -> Claim {
        let mut claim = Claim::new();
        if nodes.is_empty() {
            return claim;
        }
        let total: u64 = nodes.iter().map(|(_, w)| *w).sum::<u64>().max(1);
        for &part in by_kind(parts).iter() {
            let unit = match part.kind {
                PageKind::Huge(kib) => kib.max(1),
                PageKind::Normal => 1,
            };
            let mut left = part.kib;
            let mut shares: Vec<u64> = match nodes {
                // One node: no share to work out.
                [_] => vec![part.kib],
                _ => nodes
                    .iter()
                    .map(|(_, w)| (part.kib * w / total).div_ceil(unit) * unit)
                    .collect(),
            };
            // Within each node's room first, then whatever room is left.
            for pass in 0..2 {
                for (i, &(node, _)) in nodes.iter().enumerate() {
                    let want = if pass == 0 { shares[i] } else { left };
                    let room = self.room(node, part.kind).unwrap_or(u64::MAX);
                    let got = want.min(left).min(room);
                    if got > 0 {
                        self.add(&mut claim, node, part.kind, got);
                        left -= got;
                        shares[i] -= got.min(shares[i]);
                    }
                }
            }
            if left > 0 {
                self.add(&mut claim, nodes[0].0, part.kind, left);
            }
        }
        claim
    }

    fn add(&mut self, claim: &mut Claim, node: u32, kind: PageKind, kib: u64) {
        self.pool_mut(node, kind).used += kib;
        match claim.iter_mut().find(|(n, k, _)| *n == node && *k == kind) {
            Some(entry) => entry.2 += kib,
            None => claim.push((node, kind, kib)),
        }
    }

    /// Hands back what `claim` took.
    pub fn give_back(&mut self, claim: &Claim) {
        for &(node, kind, kib) in claim {
            let pool = self.pool_mut(node, kind);
            pool.used = pool.used.saturating_sub(kib);
        }
    }

    /// Capacity and commitment of every pool, by node then kind.
    pub fn figures(&self) -> Vec<PoolFigures> {
        let normal = self
            .normal
            .iter()
            .enumerate()
            .filter_map(|(node, pool)| Some((node as u32, PageKind::Normal, (*pool)?)));
        let huge = self
            .huge
            .iter()
            .map(|&(node, size, pool)| (node, PageKind::Huge(size), pool));
        let mut figures: Vec<PoolFigures> = normal
            .chain(huge)
            .map(|(node, kind, pool)| PoolFigures {
                node,
                kind,
                capacity_kib: pool.capacity,
                committed_kib: pool.used,
            })
            .collect();
        figures.sort_by_key(|f| (f.node, f.kind));
        figures
    }

    /// "memory 12 of 15.5 GiB left", "2M pages: 448 of 512 left": the room
    /// left on `node` for the kinds of `parts` (empty: nothing to say).
    pub fn left_note(&self, node: u32, parts: &[MemoryPart]) -> String {
        by_kind(parts)
            .iter()
            .filter_map(|part| {
                let pool = self.pool(node, part.kind)?;
                let capacity = pool.capacity?;
                let left = pool.room().unwrap_or(0);
                Some(match part.kind {
                    PageKind::Normal => format!(
                        "memory {} of {} left",
                        human(left).trim_end_matches(" GiB"),
                        human(capacity)
                    ),
                    PageKind::Huge(size) => format!(
                        "{} pages: {} of {} left",
                        page_size_label(size),
                        left / size,
                        capacity / size
                    ),
                })
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Takes memory that is bound to nodes already (each: its nodes, its
/// memory) where the room allows: that on one node first (it has nowhere
/// else to be), then that on several, each kind assigned over its nodes so
/// that none is turned away that could fit (see [`assign`]). Returns each
/// one's claim, None for those the room does not hold.
pub fn place_bound(ledger: &mut Ledger, homes: &[(&[u32], &[MemoryPart])]) -> Vec<Option<Claim>> {
    let mut claims: Vec<Option<Claim>> = vec![None; homes.len()];
    for (i, (nodes, parts)) in homes.iter().enumerate() {
        if let [node] = nodes {
            if ledger.holds(nodes, parts) {
                claims[i] = Some(ledger.take(&[(*node, 1)], parts));
            }
        }
    }
    let several: Vec<usize> = (0..homes.len()).filter(|&i| homes[i].0.len() > 1).collect();
    let spread: Vec<(&[u32], &[MemoryPart])> = several.iter().map(|&i| homes[i]).collect();
    for (&i, claim) in several.iter().zip(place_spread(ledger, &spread)) {
        claims[i] = claim;
    }
    claims
}

/// What one bound memory takes of each kind: (kind, KiB by node).
type KindShares = Vec<(PageKind, Vec<(u32, u64)>)>;

/// [`place_bound`] for memory bound to several nodes: each kind assigned
/// over the room at once.
fn place_spread(ledger: &mut Ledger, homes: &[(&[u32], &[MemoryPart])]) -> Vec<Option<Claim>> {
    let mut kinds: Vec<PageKind> = homes
        .iter()
        .flat_map(|(_, parts)| by_kind(parts).iter().map(|p| p.kind).collect::<Vec<_>>())
        .collect();
    kinds.sort();
    kinds.dedup();
    let mut shares: Vec<Option<KindShares>> = vec![Some(Vec::new()); homes.len()];
    for kind in kinds {
        let room: BTreeMap<u32, u64> = ledger
            .nodes()
            .iter()
            .map(|&n| (n, ledger.room(n, kind).unwrap_or(u64::MAX / 4)))
            .collect();
        let demands: Vec<(Vec<u32>, u64)> = homes
            .iter()
            .map(|(nodes, parts)| {
                let kib = parts.iter().filter(|p| p.kind == kind).map(|p| p.kib).sum();
                (nodes.to_vec(), kib)
            })
            .collect();
        for (j, placed) in assign(&room, &demands).into_iter().enumerate() {
            match (placed, &mut shares[j]) {
                (Some(on), Some(taken)) if demands[j].1 > 0 => taken.push((kind, on)),
                (Some(_), _) => {}
                (None, taken) => *taken = None,
            }
        }
    }
    shares
        .into_iter()
        .map(|taken| {
            let mut claim = Claim::new();
            for (kind, on) in taken? {
                let kib = on.iter().map(|(_, kib)| kib).sum();
                claim.extend(ledger.take(&on, &[MemoryPart { kib, kind }]));
            }
            Some(claim)
        })
        .collect()
}

/// Places demands (each: the nodes it may use, and KiB) on nodes within
/// their `room`, in order, each whole or not at all: a demand that finds
/// no room moves earlier ones within their own nodes to make some (an
/// augmenting path, as in a max-flow). Returns each demand's KiB by node,
/// None for one that does not fit.
pub fn assign(
    room: &BTreeMap<u32, u64>,
    demands: &[(Vec<u32>, u64)],
) -> Vec<Option<Vec<(u32, u64)>>> {
    let mut flow: Vec<BTreeMap<u32, u64>> = vec![BTreeMap::new(); demands.len()];
    let mut used: BTreeMap<u32, u64> = BTreeMap::new();
    let mut placed = vec![false; demands.len()];
    for d in 0..demands.len() {
        let saved = (flow.clone(), used.clone());
        let mut left = demands[d].1;
        while left > 0 {
            let Some(path) = augmenting_path(room, demands, &flow, &used, d) else {
                break;
            };
            left -= push(&path, left, room, &mut flow, &mut used);
        }
        if left == 0 {
            placed[d] = true;
        } else {
            (flow, used) = saved;
        }
    }
    flow.into_iter()
        .zip(placed)
        .map(|(f, ok)| ok.then(|| f.into_iter().filter(|(_, kib)| *kib > 0).collect()))
        .collect()
}

/// A path from demand `from` to a node with room: demand, node, demand
/// (one with flow on that node, which moves it), node, …, node.
fn augmenting_path(
    room: &BTreeMap<u32, u64>,
    demands: &[(Vec<u32>, u64)],
    flow: &[BTreeMap<u32, u64>],
    used: &BTreeMap<u32, u64>,
    from: usize,
) -> Option<Vec<(usize, u32)>> {
    // Breadth-first over nodes; each node remembers (demand, previous node).
    let mut came: BTreeMap<u32, (usize, Option<u32>)> = BTreeMap::new();
    let mut queue: std::collections::VecDeque<(usize, Option<u32>)> = [(from, None)].into();
    while let Some((d, prev)) = queue.pop_front() {
        for &node in &demands[d].0 {
            if came.contains_key(&node) || !room.contains_key(&node) {
                continue;
            }
            came.insert(node, (d, prev));
            let free = room[&node].saturating_sub(used.get(&node).copied().unwrap_or(0));
            if free > 0 {
                let mut path = Vec::new();
                let mut at = Some(node);
                while let Some(n) = at {
                    let (d, prev) = came[&n];
                    path.push((d, n));
                    at = prev;
                }
                path.reverse();
                return Some(path);
            }
            for (other, f) in flow.iter().enumerate() {
                if other != from && f.get(&node).is_some_and(|kib| *kib > 0) {
                    queue.push_back((other, Some(node)));
                }
            }
        }
    }
    None
}

/// Sends up to `want` along `path`: each demand on it takes more on its
/// node, each but the first giving as much back on the node before.
fn push(
    path: &[(usize, u32)],
    want: u64,
    room: &BTreeMap<u32, u64>,
    flow: &mut [BTreeMap<u32, u64>],
    used: &mut BTreeMap<u32, u64>,
) -> u64 {
    let (_, last) = path[path.len() - 1];
    let mut amount = want.min(room[&last].saturating_sub(used.get(&last).copied().unwrap_or(0)));
    for pair in path.windows(2) {
        let (d, node_before) = (pair[1].0, pair[0].1);
        amount = amount.min(flow[d].get(&node_before).copied().unwrap_or(0));
    }
    for (i, &(d, node)) in path.iter().enumerate() {
        *flow[d].entry(node).or_default() += amount;
        if i > 0 {
            *flow[d].entry(path[i - 1].1).or_default() -= amount;
        }
    }
    *used.entry(last).or_default() += amount;
    amount
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpuset::CpuSet;
    use crate::engine::topology::HugePages;

    const GIB: u64 = 1 << 20;

    /// 2 nodes of 16 GiB (MemTotal), node 1 with 512 2M pages.
    fn topo() -> Topology {
        let mut topo = Topology::uniform(&CpuSet::parse("0-7").unwrap(), 2);
        for node in topo.numa_nodes.iter_mut() {
            node.memory_mib = Some(16 * 1024);
        }
        topo.numa_nodes[1].hugepages = vec![HugePages {
            size_kib: 2048,
            total: 512,
            free: 512,
        }];
        topo
    }

    fn normal(gib: u64) -> MemoryPart {
        MemoryPart {
            kib: gib * GIB,
            kind: PageKind::Normal,
        }
    }

    #[test]
    fn sizes_in_libvirt_units() {
        assert_eq!(to_kib("1024", None), Ok(1024));
        assert_eq!(to_kib("2", Some("GiB")), Ok(2 * GIB));
        assert_eq!(to_kib("2", Some("G")), Ok(2 * GIB));
        assert_eq!(to_kib("1", Some("GB")), Ok(976_563));
        assert_eq!(to_kib("1", Some("bytes")), Ok(1), "rounded up");
        assert_eq!(to_kib("512", Some("M")), Ok(512 * 1024));
        assert!(matches!(to_kib("x", None), Err(SizeError::NotANumber(_))));
        assert!(matches!(
            to_kib("1", Some("parsec")),
            Err(SizeError::Unit(_))
        ));
        assert!(matches!(
            to_kib("99999999", Some("PiB")),
            Err(SizeError::TooLarge(_))
        ));
        assert_eq!(human(512 * 1024), "512 MiB");
        assert_eq!(human(3 * GIB / 2), "1.5 GiB");
        assert_eq!(human(24 * GIB), "24 GiB");
        assert_eq!(page_size_label(2048), "2M");
        assert_eq!(page_size_label(1 << 20), "1G");
    }

    #[test]
    fn capacity_is_memtotal_less_hugepage_pools_and_the_reserve() {
        let reserve = MemoryReserve {
            normal_kib_per_node: GIB,
            huge_pages: BTreeMap::from([((1, 2048), 12)]),
        };
        let ledger = Ledger::new(&topo(), &reserve);
        assert_eq!(ledger.room(0, PageKind::Normal), Some(15 * GIB));
        assert_eq!(ledger.room(1, PageKind::Normal), Some(14 * GIB));
        assert_eq!(ledger.room(1, PageKind::Huge(2048)), Some(500 * 2048));
        assert_eq!(ledger.room(0, PageKind::Huge(2048)), Some(0), "no pool");
        assert_eq!(ledger.room(0, PageKind::Huge(1 << 20)), Some(0));
    }

    #[test]
    fn a_set_holds_what_its_nodes_hold_together() {
        let mut ledger = Ledger::new(&topo(), &MemoryReserve::default());
        assert!(ledger.holds(&[0], &[normal(16)]));
        assert!(!ledger.holds(&[0], &[normal(17)]));
        assert!(ledger.holds(&[0, 1], &[normal(20)]));
        let claim = ledger.take(&[(0, 1), (1, 1)], &[normal(20)]);
        assert_eq!(
            claim,
            vec![
                (0, PageKind::Normal, 10 * GIB),
                (1, PageKind::Normal, 10 * GIB)
            ]
        );
        assert!(!ledger.holds(&[0], &[normal(7)]));
        ledger.give_back(&claim);
        assert!(ledger.holds(&[0], &[normal(16)]));
    }

    #[test]
    fn a_share_a_node_cannot_hold_spills_to_the_others() {
        let mut ledger = Ledger::new(&topo(), &MemoryReserve::default());
        ledger.take(&[(0, 1)], &[normal(12)]);
        // Half each would put 9.5 GiB on node 0, which has 4 left (node 1
        // has 15 beside its hugepage pool).
        let claim = ledger.take(&[(0, 1), (1, 1)], &[normal(19)]);
        assert_eq!(
            claim,
            vec![
                (0, PageKind::Normal, 4 * GIB),
                (1, PageKind::Normal, 15 * GIB)
            ]
        );
        // What fits nowhere is still recorded, on the first node.
        let over = ledger.take(&[(0, 1)], &[normal(1)]);
        assert_eq!(over, vec![(0, PageKind::Normal, GIB)]);
        let node0 = &ledger.figures()[0];
        assert_eq!(node0.committed_kib, 17 * GIB);
        assert_eq!(node0.capacity_kib, Some(16 * GIB));
    }

    #[test]
    fn huge_pages_come_only_from_their_pool_in_whole_pages() {
        let mut ledger = Ledger::new(&topo(), &MemoryReserve::default());
        let huge = MemoryPart {
            kib: 3 * 2048,
            kind: PageKind::Huge(2048),
        };
        assert!(!ledger.holds(&[0], &[huge]));
        assert!(ledger.holds(&[1], &[huge]));
        let claim = ledger.take(&[(0, 1), (1, 1)], &[huge]);
        assert_eq!(claim, vec![(1, PageKind::Huge(2048), 3 * 2048)]);
        assert_eq!(ledger.left_note(1, &[huge]), "2M pages: 509 of 512 left");
        assert_eq!(
            ledger.left_note(0, &[normal(4)]),
            "memory 16 of 16 GiB left"
        );
    }

    #[test]
    fn assignment_moves_earlier_demands_to_make_room() {
        // Node 3 has most room, so a greedy fill would put the first
        // demand there and leave the second (nodes 0, 1, 3) short.
        let room = BTreeMap::from([(0, 2), (1, 3), (2, 7), (3, 13)]);
        let demands = vec![(vec![2, 3], 14), (vec![0, 1, 3], 5), (vec![0], 9)];
        let placed = assign(&room, &demands);
        let first = placed[0].clone().unwrap();
        let second = placed[1].clone().unwrap();
        assert_eq!(first.iter().map(|(_, k)| k).sum::<u64>(), 14);
        assert_eq!(second.iter().map(|(_, k)| k).sum::<u64>(), 5);
        assert_eq!(placed[2], None, "9 on a node of 2: it does not fit");
        let mut on = BTreeMap::new();
        for (node, kib) in first.iter().chain(&second) {
            *on.entry(*node).or_insert(0) += kib;
        }
        for (node, kib) in on {
            assert!(kib <= room[&node], "node {node}: {kib}");
        }
        // A demand that cannot fit leaves the others as they were.
        let placed = assign(&room, &[(vec![0], 2), (vec![0, 1], 4)]);
        assert_eq!(placed, vec![Some(vec![(0, 2)]), None]);
    }

    #[test]
    fn unknown_sizes_limit_nothing() {
        let topo = Topology::uniform(&CpuSet::parse("0-3").unwrap(), 2);
        let ledger = Ledger::new(&topo, &MemoryReserve::default());
        assert!(ledger.holds(&[0], &[normal(1 << 20)]));
        assert_eq!(ledger.nodes(), &[0, 1]);
    }
}
