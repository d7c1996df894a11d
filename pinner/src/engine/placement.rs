//! The placement engine: a pure function of topology × guests × host policy
//! (× the guests' current pins) → plan. No I/O.
//!
//! Pool = online − reserved − isolated − CPUs pinned by others. While the
//! guests that may have CPUs of their own fit the pool, every vCPU gets a
//! pCPU of its own (dedicated); beyond, guests are range-bound (shared),
//! balancing vCPUs per pCPU. Locality, in order: one NUMA node if the guest
//! fits, else the fewest and closest nodes; one L3 domain inside it if it
//! fits; whole SMT cores, no core split between two guests while avoidable;
//! never performance and efficiency cores in one guest. Memory follows the
//! vCPUs. Pins that still satisfy the rules are kept.

use crate::engine::cpuset::CpuSet;
use crate::engine::domain::Policy;
use crate::engine::topology::{CpuKind, Topology};
use std::collections::{BTreeMap, BTreeSet, HashMap};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// pinner places it, per its policy (never `Policy::None`).
    Managed {
        policy: Policy,
        /// Current pin of each vCPU (None: unpinned).
        current: Vec<Option<CpuSet>>,
    },
    /// Pinned by someone else: left alone, its CPUs taken from the pool.
    Foreign { taken: CpuSet },
    /// Opted out through its metadata: left alone.
    OptedOut,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guest {
    pub name: String,
    pub uuid: String,
    pub vcpus: u32,
    pub role: Role,
}

/// Where emulator (and I/O) threads of dedicated guests run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EmulatorPolicy {
    /// On the reserved CPUs (the guest's own CPUs when none are reserved).
    #[default]
    Housekeeping,
    /// On the guest's own CPUs.
    Guest,
}

/// The host-wide inputs of placement, from the config (and nova.conf).
#[derive(Debug, Clone, PartialEq)]
pub struct HostPolicy {
    pub reserved: CpuSet,
    pub cpu_allocation_ratio: f64,
    /// nova's `cpu_dedicated_set`: the only CPUs dedicated guests may get.
    pub dedicated_set: Option<CpuSet>,
    /// nova's `cpu_shared_set`: the only CPUs shared guests may float on.
    pub shared_set: Option<CpuSet>,
    pub emulator: EmulatorPolicy,
}

impl HostPolicy {
    pub fn with_reserved(reserved: CpuSet) -> HostPolicy {
        HostPolicy {
            reserved,
            cpu_allocation_ratio: 1.0,
            dedicated_set: None,
            shared_set: None,
            emulator: EmulatorPolicy::Housekeeping,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// One pCPU per vCPU, not shared with any other vCPU.
    Dedicated,
    /// vCPUs range-bound to a set of pCPUs shared with other guests.
    Shared,
}

impl Placement {
    pub fn as_str(self) -> &'static str {
        match self {
            Placement::Dedicated => "dedicated",
            Placement::Shared => "shared",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Dedicated,
    Shared,
    /// Some guests dedicated, some shared.
    Mixed,
}

impl Mode {
    /// Dedicated when every guest is, shared when none is, else mixed.
    fn of(plans: &[GuestPlan]) -> Mode {
        let dedicated = plans
            .iter()
            .filter(|p| p.placement == Placement::Dedicated)
            .count();
        match (dedicated, plans.len() - dedicated) {
            (_, 0) => Mode::Dedicated,
            (0, _) => Mode::Shared,
            _ => Mode::Mixed,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Dedicated => "dedicated",
            Mode::Shared => "shared",
            Mode::Mixed => "mixed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestPlan {
    pub name: String,
    pub uuid: String,
    pub placement: Placement,
    /// CPUs for each vCPU, by vCPU number.
    pub vcpus: Vec<CpuSet>,
    /// Emulator and I/O threads.
    pub emulator: CpuSet,
    /// Nodes of the guest's vCPUs.
    pub numa_nodes: Vec<u32>,
    /// Memory binding (strict) to these nodes; None when some of the
    /// guest's CPUs belong to no node, so memory is left alone.
    pub memory_nodes: Option<Vec<u32>>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub mode: Mode,
    pub pool: CpuSet,
    pub reserved: CpuSet,
    pub guests: Vec<GuestPlan>,
    pub warnings: Vec<Warning>,
    /// vCPUs whose existing pin the plan changes.
    pub pins_moved: u32,
}

/// Why no CPU is left for guests.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("online {online}, reserved {reserved}, isolated {isolated}, pinned by others {taken}")]
pub struct NoCpus {
    pub online: CpuSet,
    pub reserved: CpuSet,
    pub isolated: CpuSet,
    pub taken: CpuSet,
}

/// What a plan could not do as asked; never a refusal.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Warning {
    /// Nothing to pin to: every guest is left as it is.
    #[error("no CPUs left for guests: {0}")]
    NoCpus(Box<NoCpus>),
    #[error("{guest}: {vcpus} dedicated CPUs of one core kind are not free; shared instead")]
    NoDedicatedRoom { guest: String, vcpus: u32 },
    #[error("no CPUs left beside dedicated guests; shared guests use the whole pool")]
    NoSharedRoom,
    #[error("overcommitted: {vcpus} shared vCPUs on {pcpus} pCPUs exceed cpu_allocation_ratio {ratio} (capacity {capacity})")]
    Overcommitted {
        vcpus: u32,
        pcpus: usize,
        ratio: f64,
        capacity: f64,
    },
    #[error("{guest}: unknown pinner policy {word:?}, treated as auto")]
    UnknownPolicy { guest: String, word: String },
}

/// (NUMA node, L3 id) of a CPU.
type L3Key = (Option<u32>, Option<u32>);

/// Per-CPU facts, indexed by CPU id, for fast lookups while placing.
struct Layout<'a> {
    topo: &'a Topology,
    node: Vec<Option<u32>>,
    l3: Vec<Option<u32>>,
    kind: Vec<Option<CpuKind>>,
    /// Position of each CPU in `topo.cpus`, for its SMT siblings.
    position: Vec<Option<usize>>,
    /// Online CPUs by node, by (node, L3) and by kind rank, so grouping a
    /// set is a few word-wise intersections rather than a scan.
    node_masks: BTreeMap<Option<u32>, CpuSet>,
    l3_masks: BTreeMap<L3Key, CpuSet>,
    kind_masks: BTreeMap<u8, CpuSet>,
}

impl<'a> Layout<'a> {
    fn new(topo: &'a Topology) -> Layout<'a> {
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
    fn l3_key(&self, cpu: u32) -> L3Key {
        (
            self.node_of(cpu),
            self.l3.get(cpu as usize).copied().flatten(),
        )
    }

    fn node_of(&self, cpu: u32) -> Option<u32> {
        self.node.get(cpu as usize).copied().flatten()
    }

    fn kind_of(&self, cpu: u32) -> Option<CpuKind> {
        self.kind.get(cpu as usize).copied().flatten()
    }

    /// `cpus` split by precomputed `masks`, empty parts left out.
    fn split<K: Ord + Clone>(cpus: &CpuSet, masks: &BTreeMap<K, CpuSet>) -> BTreeMap<K, CpuSet> {
        masks
            .iter()
            .map(|(k, m)| (k.clone(), cpus.intersection(m)))
            .filter(|(_, part)| !part.is_empty())
            .collect()
    }

    fn by_node(&self, cpus: &CpuSet) -> BTreeMap<Option<u32>, CpuSet> {
        Layout::split(cpus, &self.node_masks)
    }

    fn by_l3(&self, cpus: &CpuSet) -> BTreeMap<L3Key, CpuSet> {
        Layout::split(cpus, &self.l3_masks)
    }

    fn by_kind(&self, cpus: &CpuSet) -> BTreeMap<u8, CpuSet> {
        Layout::split(cpus, &self.kind_masks)
    }

    /// The CPUs sharing `cpu`'s core (itself alone when its core is unknown).
    fn core_of(&self, cpu: u32) -> CpuSet {
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
    fn nodes_opt(&self, cpus: &CpuSet) -> Vec<Option<u32>> {
        let mut nodes: Vec<Option<u32>> = Vec::new();
        for node in cpus.iter().map(|c| self.node_of(c)) {
            if nodes.last() != Some(&node) && !nodes.contains(&node) {
                nodes.push(node);
            }
        }
        nodes.sort_unstable();
        nodes
    }

    fn distance(&self, a: Option<u32>, b: Option<u32>) -> u32 {
        match (a, b) {
            (Some(a), Some(b)) => self.topo.distance(a, b),
            _ => 20,
        }
    }

    /// Kinds present among `cpus`: performance first, unknown last.
    fn kinds_in(&self, cpus: &CpuSet) -> Vec<Option<CpuKind>> {
        self.kind_masks
            .iter()
            .filter(|(_, m)| m.overlap(cpus) > 0)
            .map(|(rank, _)| kind_of_rank(*rank))
            .collect()
    }
}

/// CPUs grouped by key. A key's CPUs mostly come in runs (a node's, an
/// L3's), so a run is gathered before the map is looked up.
fn masks<K: Ord + Copy>(cpus: impl Iterator<Item = (K, u32)>) -> BTreeMap<K, CpuSet> {
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

fn kind_rank(kind: Option<CpuKind>) -> u8 {
    match kind {
        Some(CpuKind::Performance) => 0,
        Some(CpuKind::Efficiency) => 1,
        None => 2,
    }
}

fn kind_of_rank(rank: u8) -> Option<CpuKind> {
    match rank {
        0 => Some(CpuKind::Performance),
        1 => Some(CpuKind::Efficiency),
        _ => None,
    }
}

fn node_label(node: Option<u32>) -> String {
    node.map_or_else(|| "-".to_string(), |n| n.to_string())
}

fn join_nodes(nodes: &[Option<u32>]) -> String {
    let mut out = String::new();
    for (i, node) in nodes.iter().enumerate() {
        if i > 0 {
            out.push('+');
        }
        out.push_str(&node_label(*node));
    }
    out
}

type Current<'g> = &'g [Option<CpuSet>];

/// A managed guest as planning sees it: the guest, its policy, its pins.
type Managed<'g> = (&'g Guest, Policy, Current<'g>);

/// What the steps of [`plan`] build up, indexed like the managed guests.
struct Planning<'g> {
    managed: Vec<Managed<'g>>,
    placed: Vec<Option<GuestPlan>>,
    warnings: Vec<Warning>,
}

impl<'g> Planning<'g> {
    /// The managed guests with the given indices, as the placers take them.
    fn inputs(&self, indices: &[usize]) -> Vec<(&'g Guest, Current<'g>)> {
        indices
            .iter()
            .map(|&i| (self.managed[i].0, self.managed[i].2))
            .collect()
    }
}

/// The plan for `guests` on `topo`:
///  1. the pool: online − reserved − isolated − CPUs pinned by others;
///  2. the managed guests, by name;
///  3. one-to-one for guests that ask for it, and for auto guests while all
///     of them fit the (dedicated) pool;
///  4. range binding for every other guest on what is left;
///  5. the mode, and how many existing pins moved.
pub fn plan(topo: &Topology, host: &HostPolicy, guests: &[Guest]) -> Plan {
    let layout = Layout::new(topo);
    let reserved = host.reserved.intersection(&topo.online);
    let taken = guests.iter().fold(CpuSet::new(), |acc, g| match &g.role {
        Role::Foreign { taken } => acc.union(taken),
        _ => acc,
    });
    let pool = topo
        .online
        .difference(&reserved)
        .difference(&topo.isolated)
        .difference(&taken);
    if pool.is_empty() {
        // Nothing to pin to: leave every guest as it is rather than pin to nothing.
        let why = NoCpus {
            online: topo.online.clone(),
            reserved: reserved.clone(),
            isolated: topo.isolated.clone(),
            taken,
        };
        return Plan {
            mode: Mode::Dedicated,
            pool,
            reserved,
            guests: Vec::new(),
            warnings: vec![Warning::NoCpus(Box::new(why))],
            pins_moved: 0,
        };
    }
    let mut planning = Planning {
        managed: managed_guests(guests),
        placed: Vec::new(),
        warnings: Vec::new(),
    };
    planning.placed = vec![None; planning.managed.len()];
    let used = plan_dedicated(&layout, host, &reserved, &pool, &mut planning);
    plan_shared(&layout, host, &pool, &used, &mut planning);
    let pins_moved = moved_pins(&planning);
    // Already in name order: `managed` is. Every managed guest has a plan
    // by now; the capacity saves regrowing (and copying) the list.
    let mut plans: Vec<GuestPlan> = Vec::with_capacity(planning.placed.len());
    plans.extend(planning.placed.into_iter().flatten());
    Plan {
        mode: Mode::of(&plans),
        pool,
        reserved,
        guests: plans,
        warnings: planning.warnings,
        pins_moved,
    }
}

/// Managed guests with vCPUs, in a stable order: by name, then uuid.
fn managed_guests(guests: &[Guest]) -> Vec<Managed<'_>> {
    let mut managed: Vec<Managed> = guests
        .iter()
        .filter_map(|g| match &g.role {
            Role::Managed { policy, current } if g.vcpus > 0 => {
                Some((g, *policy, current.as_slice()))
            }
            _ => None,
        })
        .collect();
    managed.sort_by(|a, b| (&a.0.name, &a.0.uuid).cmp(&(&b.0.name, &b.0.uuid)));
    managed
}

/// Step 3: who may have CPUs of their own gets them; returns the CPUs they
/// took.
fn plan_dedicated(
    layout: &Layout,
    host: &HostPolicy,
    reserved: &CpuSet,
    pool: &CpuSet,
    planning: &mut Planning,
) -> CpuSet {
    let dedicated_pool = host
        .dedicated_set
        .as_ref()
        .map_or_else(|| pool.clone(), |s| s.intersection(pool));
    let managed = &planning.managed;
    let dedicated_demand: usize = managed
        .iter()
        .filter(|(_, p, _)| *p != Policy::Shared)
        .map(|(g, _, _)| g.vcpus as usize)
        .sum();
    let all_fit = dedicated_demand <= dedicated_pool.len();
    // Guests asking for it, and auto guests when all fit. Indices into
    // `managed`, so its name order carries over.
    let wanting: Vec<usize> = (0..managed.len())
        .filter(|&i| match managed[i].1 {
            Policy::Dedicated => true,
            Policy::Auto => all_fit,
            _ => false,
        })
        .collect();
    let input = planning.inputs(&wanting);
    let mut free = dedicated_pool.clone();
    let plans = place_dedicated(layout, host, reserved, &input, &mut free);
    for (&i, plan) in wanting.iter().zip(plans) {
        match plan {
            Some(plan) => planning.placed[i] = Some(plan),
            None => planning.warnings.push(Warning::NoDedicatedRoom {
                guest: planning.managed[i].0.name.clone(),
                vcpus: planning.managed[i].0.vcpus,
            }),
        }
    }
    dedicated_pool.difference(&free)
}

/// Step 4: every guest without a plan yet is bound to a range of what the
/// dedicated guests left (`used` is theirs).
fn plan_shared(
    layout: &Layout,
    host: &HostPolicy,
    pool: &CpuSet,
    used: &CpuSet,
    planning: &mut Planning,
) {
    let shared_index: Vec<usize> = (0..planning.managed.len())
        .filter(|&i| planning.placed[i].is_none())
        .collect();
    if shared_index.is_empty() {
        return;
    }
    let shared = planning.inputs(&shared_index);
    let shared_base = host
        .shared_set
        .as_ref()
        .map_or_else(|| pool.clone(), |s| s.intersection(pool));
    let mut shared_pool = shared_base.difference(used);
    if shared_pool.is_empty() {
        planning.warnings.push(Warning::NoSharedRoom);
        shared_pool = pool.clone();
    }
    for (&i, plan) in shared_index
        .iter()
        .zip(place_shared(layout, &shared_pool, &shared))
    {
        planning.placed[i] = Some(plan);
    }
    let shared_demand: u32 = shared.iter().map(|(g, _)| g.vcpus).sum();
    let capacity = shared_pool.len() as f64 * host.cpu_allocation_ratio;
    if f64::from(shared_demand) > capacity {
        planning.warnings.push(Warning::Overcommitted {
            vcpus: shared_demand,
            pcpus: shared_pool.len(),
            ratio: host.cpu_allocation_ratio,
            capacity,
        });
    }
}

/// Step 5: vCPUs whose existing pin the plan changes.
fn moved_pins(planning: &Planning) -> u32 {
    planning
        .managed
        .iter()
        .zip(&planning.placed)
        .filter_map(|((_, _, current), plan)| {
            let plan = plan.as_ref()?;
            Some(
                current
                    .iter()
                    .zip(&plan.vcpus)
                    .filter(|(cur, new)| cur.as_ref().is_some_and(|c| c != *new))
                    .count() as u32,
            )
        })
        .sum()
}

/// Where a guest's CPUs are, and the memory binding that follows from it.
#[derive(Clone)]
struct Locality {
    numa_nodes: Vec<u32>,
    memory_nodes: Option<Vec<u32>>,
}

impl Locality {
    /// From the guest's nodes (`Layout::nodes_opt`): memory is bound
    /// (strict) to them unless some of its CPUs belong to no node, in which
    /// case it is left alone.
    fn of(nodes: &[Option<u32>]) -> Locality {
        let numa_nodes: Vec<u32> = nodes.iter().flatten().copied().collect();
        let bound = !nodes.contains(&None) && !numa_nodes.is_empty();
        Locality {
            memory_nodes: bound.then(|| numa_nodes.clone()),
            numa_nodes,
        }
    }
}

fn guest_plan(
    g: &Guest,
    placement: Placement,
    vcpus: Vec<CpuSet>,
    emulator: CpuSet,
    locality: Locality,
    reason: String,
) -> GuestPlan {
    GuestPlan {
        name: g.name.clone(),
        uuid: g.uuid.clone(),
        placement,
        vcpus,
        emulator,
        numa_nodes: locality.numa_nodes,
        memory_nodes: locality.memory_nodes,
        reason,
    }
}

/// Places guests one pCPU per vCPU from `free`; returns a plan for each,
/// None for those that could not be placed (not enough free CPUs of one kind).
fn place_dedicated(
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
        let Some((own, reason)) = fill_slots(layout, current, slots, free) else {
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
        plans[i] = Some(guest_plan(
            g,
            Placement::Dedicated,
            vcpus,
            emulator,
            locality,
            reason,
        ));
    }
    plans
}

/// Per guest, per vCPU: the single-CPU pin it keeps, taken out of `free`.
/// A pin is kept while its CPU is free and of the kind the guest's first
/// kept pin has, so a replan moves nothing it need not.
fn keep_free_pins(
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
fn fill_slots(
    layout: &Layout,
    current: Current,
    slots: &mut [Option<u32>],
    free: &mut CpuSet,
) -> Option<(CpuSet, Option<String>)> {
    let mine: CpuSet = slots.iter().flatten().copied().collect();
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
    let Some((chosen, reason)) = pick_dedicated(layout, free, &mine, &home, missing) else {
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

/// `need` free CPUs for a guest that already holds `mine`: one core kind,
/// the best nodes, then L3 and SMT locality inside them.
fn pick_dedicated(
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
fn choose_nodes(
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
fn pick_in_region(
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
fn pick_cores(layout: &Layout, cpus: &CpuSet, free: &CpuSet, mine: &CpuSet, want: usize) -> CpuSet {
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

/// The ranges shared guests can be bound to, with the load on each (the
/// sum over its CPUs of vCPUs per pCPU), kept up to date through the
/// ranges' overlaps so judging a candidate costs O(1).
struct Ranges {
    sets: Vec<CpuSet>,
    size: Vec<usize>,
    /// 0: an L3 domain of a node, 1: a node, 2: a span of nodes.
    level: Vec<u8>,
    load: Vec<f64>,
    /// For each range: every range it overlaps, and by how many CPUs.
    overlaps: Vec<Vec<(usize, usize)>>,
    index: HashMap<CpuSet, usize>,
}

impl Ranges {
    fn new() -> Ranges {
        Ranges {
            sets: Vec::new(),
            size: Vec::new(),
            level: Vec::new(),
            load: Vec::new(),
            overlaps: Vec::new(),
            index: HashMap::new(),
        }
    }

    /// Adds a range (or finds the equal one) and returns its index.
    fn add(&mut self, set: CpuSet, level: u8) -> usize {
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
        let load = mine
            .iter()
            .filter(|&&(j, _)| j != i && self.level[j] == 0)
            .map(|&(j, shared)| self.load[j] / self.size[j] as f64 * shared as f64)
            .sum();
        self.index.insert(set.clone(), i);
        self.size.push(set.len());
        self.sets.push(set);
        self.level.push(level);
        self.load.push(load);
        self.overlaps.push(mine);
        i
    }

    fn mean_after(&self, r: usize, vcpus: u32) -> f64 {
        (self.load[r] + f64::from(vcpus)) / self.size[r] as f64
    }

    fn assign(&mut self, r: usize, vcpus: u32) {
        let share = f64::from(vcpus) / self.size[r] as f64;
        for &(other, shared) in &self.overlaps[r] {
            self.load[other] += share * shared as f64;
        }
    }
}

impl Ranges {
    /// The L3 domains and nodes of the shared pool, per core kind: the
    /// ranges every guest may pick from (spans are added per guest).
    fn of_pool(layout: &Layout, by_kind: &BTreeMap<u8, CpuSet>) -> Ranges {
        let mut ranges = Ranges::new();
        for cpus in by_kind.values() {
            for l3 in layout.by_l3(cpus).into_values() {
                ranges.add(l3, 0);
            }
        }
        for cpus in by_kind.values() {
            for node in layout.by_node(cpus).into_values() {
                ranges.add(node, 1);
            }
        }
        ranges
    }

    /// Where a guest of `need` vCPUs may go, into `out`: the L3 ranges it
    /// fits, else the nodes it fits (both among the first `fixed`), else a
    /// span made for it.
    fn candidates(
        &mut self,
        span: impl FnOnce() -> CpuSet,
        fixed: usize,
        need: usize,
        out: &mut Vec<usize>,
    ) {
        out.clear();
        for level in [0, 1] {
            out.extend((0..fixed).filter(|&r| self.level[r] == level && self.size[r] >= need));
            if !out.is_empty() {
                return;
            }
        }
        out.push(self.add(span(), 2));
    }

    /// The least loaded candidate after adding `vcpus`, unless the range
    /// the guest is on now is within one vCPU per pCPU of it.
    fn choose(&self, candidates: &[usize], current: Current, vcpus: u32) -> usize {
        let best = candidates
            .iter()
            .map(|&r| (r, self.mean_after(r, vcpus)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(r, _)| r)
            .expect("at least one candidate");
        let here = match current.first() {
            Some(Some(first))
                if current.len() == vcpus as usize
                    && current.iter().all(|c| c.as_ref() == Some(first)) =>
            {
                candidates.iter().copied().find(|&r| self.sets[r] == *first)
            }
            _ => None,
        };
        match here {
            Some(h) if self.mean_after(h, vcpus) - self.mean_after(best, vcpus) < 1.0 => h,
            _ => best,
        }
    }

    /// Range `r`'s reason and locality.
    fn describe(&self, layout: &Layout, r: usize) -> (String, Locality) {
        let set = &self.sets[r];
        let nodes = layout.nodes_opt(set);
        let where_ = match (self.level[r], layout.l3_key(set.first().unwrap_or(0))) {
            (0, (_, Some(l3))) if layout.l3_masks.len() > layout.node_masks.len() => {
                format!("node {} L3 {l3}", node_label(nodes[0]))
            }
            _ if nodes.len() == 1 => format!("node {}", node_label(nodes[0])),
            _ => format!("nodes {}", join_nodes(&nodes)),
        };
        let reason = format!(
            "shared: {where_} ({:.2} vCPUs per pCPU)",
            self.load[r] / self.size[r] as f64
        );
        (reason, Locality::of(&nodes))
    }
}

/// Binds each shared guest to one range: an L3 domain of a node if the guest
/// fits one, else a node, else the fewest closest nodes, else the whole
/// shared pool; always the least loaded candidate (vCPUs per pCPU), unless
/// the guest's current range is within one vCPU per pCPU of it.
fn place_shared(
    layout: &Layout,
    shared_pool: &CpuSet,
    guests: &[(&Guest, Current)],
) -> Vec<GuestPlan> {
    let by_kind = layout.by_kind(shared_pool);
    let mut ranges = Ranges::of_pool(layout, &by_kind);
    let fixed = ranges.sets.len();
    // Larger than any node: the fewest closest nodes of the largest kind,
    // else the whole pool.
    let span = |need: usize| {
        let largest = by_kind
            .values()
            .max_by_key(|s| s.len())
            .cloned()
            .unwrap_or_default();
        if largest.len() >= need {
            choose_nodes(layout, &largest, &CpuSet::new(), need).0
        } else {
            shared_pool.clone()
        }
    };
    let mut order: Vec<usize> = (0..guests.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(guests[i].0.vcpus));
    let mut chosen: Vec<usize> = vec![0; guests.len()];
    // One buffer for every guest's candidates.
    let mut candidates: Vec<usize> = Vec::with_capacity(fixed + 1);
    for i in order {
        let (g, current) = guests[i];
        let need = g.vcpus as usize;
        ranges.candidates(|| span(need), fixed, need, &mut candidates);
        let range = ranges.choose(&candidates, current, g.vcpus);
        ranges.assign(range, g.vcpus);
        chosen[i] = range;
    }
    // Guests of one range share its reason and locality: work them out once.
    let mut described: Vec<Option<(String, Locality)>> = vec![None; ranges.sets.len()];
    guests
        .iter()
        .zip(chosen)
        .map(|((g, _), r)| {
            let set = &ranges.sets[r];
            let (reason, locality) = described[r]
                .get_or_insert_with(|| ranges.describe(layout, r))
                .clone();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn set(text: &str) -> CpuSet {
        CpuSet::parse(text).unwrap()
    }

    fn guest(name: &str, vcpus: u32) -> Guest {
        managed(name, vcpus, Policy::Auto, vec![])
    }

    fn managed(name: &str, vcpus: u32, policy: Policy, current: Vec<Option<CpuSet>>) -> Guest {
        Guest {
            name: name.into(),
            uuid: format!("uuid-{name}"),
            vcpus,
            role: Role::Managed { policy, current },
        }
    }

    /// 2 nodes × 4 CPUs (0-3, 4-7), one core each, CPU 0 reserved.
    fn host_plan(guests: &[Guest]) -> Plan {
        let topo = Topology::uniform(&set("0-7"), 2);
        plan(&topo, &HostPolicy::with_reserved(set("0")), guests)
    }

    fn by_name<'a>(plan: &'a Plan, name: &str) -> &'a GuestPlan {
        plan.guests.iter().find(|g| g.name == name).unwrap()
    }

    fn current_of(p: &GuestPlan) -> Vec<Option<CpuSet>> {
        p.vcpus.iter().cloned().map(Some).collect()
    }

    fn settled(plan: &Plan) -> Vec<Guest> {
        plan.guests
            .iter()
            .map(|p| managed(&p.name, p.vcpus.len() as u32, Policy::Auto, current_of(p)))
            .collect()
    }

    fn all_cpus(p: &GuestPlan) -> CpuSet {
        p.vcpus.iter().fold(CpuSet::new(), |a, s| a.union(s))
    }

    #[test]
    fn dedicated_while_it_fits_one_cpu_per_vcpu_within_a_node() {
        let plan = host_plan(&[guest("a", 3), guest("b", 4)]);
        assert_eq!(plan.mode, Mode::Dedicated);
        assert_eq!(plan.pool, set("1-7"));
        let mut used = CpuSet::new();
        for g in &plan.guests {
            assert_eq!(g.placement, Placement::Dedicated);
            assert_eq!(
                g.numa_nodes.len(),
                1,
                "{} should fit one node: {:?}",
                g.name,
                g.vcpus
            );
            assert_eq!(
                g.memory_nodes.as_ref(),
                Some(&g.numa_nodes),
                "memory follows the vCPUs"
            );
            for cpus in &g.vcpus {
                assert_eq!(cpus.len(), 1);
                assert!(!used.contains(cpus.first().unwrap()), "pCPU given twice");
                used = used.union(cpus);
            }
            assert_eq!(g.emulator, set("0"), "emulator goes to the reserved CPUs");
        }
        assert_eq!(all_cpus(by_name(&plan, "b")), set("4-7"));
    }

    #[test]
    fn beyond_the_pool_guests_share_a_node_range_balanced() {
        let guests: Vec<Guest> = (0..6).map(|i| guest(&format!("g{i}"), 2)).collect();
        let plan = host_plan(&guests);
        assert_eq!(plan.mode, Mode::Shared);
        let mut load = BTreeMap::new();
        for g in &plan.guests {
            let range = &g.vcpus[0];
            assert!(g.vcpus.iter().all(|c| c == range), "one range per guest");
            assert!(range == &set("1-3") || range == &set("4-7"), "{range}");
            assert_eq!(&g.emulator, range);
            *load.entry(range.to_string()).or_insert(0u32) += 2;
        }
        let per_cpu: Vec<f64> = load
            .iter()
            .map(|(r, l)| f64::from(*l) / set(r).len() as f64)
            .collect();
        assert!((per_cpu[0] - per_cpu[1]).abs() <= 1.0, "{load:?}");
        assert!(
            plan.warnings
                .iter()
                .any(|w| w.to_string().contains("overcommitted")),
            "{:?}",
            plan.warnings
        );
    }

    #[test]
    fn guest_larger_than_a_node_spans_the_closest_nodes() {
        let topo = Topology::synthetic(4, 1, 4, 1);
        // Node 0 is full; 6 vCPUs need two nodes: 1, and its pair 0 is
        // full, so the closest with room to 1 at distance 32 is 2.
        let plan = plan(
            &topo,
            &HostPolicy::with_reserved(set("0-3")),
            &[guest("big", 6)],
        );
        let g = by_name(&plan, "big");
        assert_eq!(g.placement, Placement::Dedicated);
        assert_eq!(g.numa_nodes.len(), 2, "{:?}", g.vcpus);
        assert!(g.reason.contains("spans nodes"), "{}", g.reason);
        let topo = Topology::synthetic(4, 1, 4, 1);
        let plan = super::plan(
            &topo,
            &HostPolicy::with_reserved(CpuSet::new()),
            &[guest("big", 6)],
        );
        let g = by_name(&plan, "big");
        assert_eq!(
            g.numa_nodes,
            vec![0, 1],
            "a node and its close pair (16), not a far one (32)"
        );
        assert!(g.reason.contains("distance 16"), "{}", g.reason);
    }

    #[test]
    fn whole_cores_and_one_l3_per_guest() {
        // 1 node, 2 L3 × 4 cores × 2 threads: CPUs c and c+8 share a core.
        let topo = Topology::synthetic(1, 2, 4, 2);
        let plan = plan(
            &topo,
            &HostPolicy::with_reserved(CpuSet::new()),
            &[guest("a", 4), guest("b", 4), guest("c", 2)],
        );
        for g in &plan.guests {
            let cpus = all_cpus(g);
            let l3s: BTreeSet<_> = cpus.iter().map(|c| (c % 8) / 4).collect();
            assert_eq!(l3s.len(), 1, "{} spans L3 domains: {cpus}", g.name);
            for c in cpus.iter() {
                let sibling = if c < 8 { c + 8 } else { c - 8 };
                assert!(
                    cpus.contains(sibling),
                    "{} has half of core {c}/{sibling}: {cpus}",
                    g.name
                );
            }
        }
    }

    #[test]
    fn odd_sizes_complete_half_used_cores_before_breaking_whole_ones() {
        let topo = Topology::synthetic(1, 1, 4, 2);
        let first = plan(
            &topo,
            &HostPolicy::with_reserved(CpuSet::new()),
            &[guest("a", 3)],
        );
        let mut guests = settled(&first);
        guests.push(guest("b", 3));
        let second = plan(&topo, &HostPolicy::with_reserved(CpuSet::new()), &guests);
        let split_cores = (0..4u32)
            .filter(|core| {
                let owners: BTreeSet<_> = second
                    .guests
                    .iter()
                    .filter(|g| all_cpus(g).contains(*core) || all_cpus(g).contains(core + 4))
                    .map(|g| g.name.clone())
                    .collect();
                owners.len() > 1
            })
            .count();
        assert_eq!(
            split_cores, 1,
            "3+3 threads on 2-thread cores need exactly one shared core: {:?}",
            second.guests
        );
    }

    #[test]
    fn never_mixes_core_kinds() {
        let mut topo = Topology::synthetic(1, 1, 6, 1);
        for cpu in topo.cpus.iter_mut() {
            cpu.kind = Some(if cpu.id < 2 {
                CpuKind::Performance
            } else {
                CpuKind::Efficiency
            });
        }
        let plan = plan(
            &topo,
            &HostPolicy::with_reserved(CpuSet::new()),
            &[guest("p", 2), guest("e", 3)],
        );
        assert_eq!(
            all_cpus(by_name(&plan, "p")),
            set("0-1"),
            "the larger guest does not fit P-cores"
        );
        assert_eq!(all_cpus(by_name(&plan, "e")), set("2-4"));
        assert!(
            by_name(&plan, "e").reason.contains("efficiency"),
            "{}",
            by_name(&plan, "e").reason
        );
    }

    #[test]
    fn foreign_pins_reserved_and_isolated_cpus_are_never_used() {
        let foreign = Guest {
            name: "nova".into(),
            uuid: "n".into(),
            vcpus: 2,
            role: Role::Foreign { taken: set("4-5") },
        };
        let opted = Guest {
            name: "mine".into(),
            uuid: "m".into(),
            vcpus: 2,
            role: Role::OptedOut,
        };
        let mut topo = Topology::uniform(&set("0-7"), 2);
        topo.isolated = set("7");
        let plan = plan(
            &topo,
            &HostPolicy::with_reserved(set("0")),
            &[foreign, opted, guest("a", 4)],
        );
        assert_eq!(plan.pool, set("1-3,6"));
        assert_eq!(plan.guests.len(), 1, "only managed guests are planned");
        assert_eq!(all_cpus(by_name(&plan, "a")), set("1-3,6"));
    }

    #[test]
    fn adding_a_guest_moves_no_existing_pin() {
        let first = host_plan(&[guest("a", 2), guest("b", 3)]);
        let mut more = settled(&first);
        more.push(guest("c", 2));
        let second = host_plan(&more);
        for before in &first.guests {
            assert_eq!(
                by_name(&second, &before.name).vcpus,
                before.vcpus,
                "{} moved",
                before.name
            );
        }
        assert_eq!(second.pins_moved, 0);
    }

    #[test]
    fn shared_guests_stay_on_their_range_when_balanced() {
        let guests: Vec<Guest> = (0..6).map(|i| guest(&format!("g{i}"), 2)).collect();
        let first = host_plan(&guests);
        let second = host_plan(&settled(&first));
        assert_eq!(second.guests, first.guests);
        assert_eq!(second.pins_moved, 0);
    }

    #[test]
    fn explicit_policies_and_mixed_mode() {
        let plan = host_plan(&[
            managed("d", 2, Policy::Dedicated, vec![]),
            managed("s", 1, Policy::Shared, vec![]),
            guest("a", 2),
        ]);
        assert_eq!(plan.mode, Mode::Mixed);
        assert_eq!(by_name(&plan, "d").placement, Placement::Dedicated);
        assert_eq!(by_name(&plan, "s").placement, Placement::Shared);
        assert_eq!(by_name(&plan, "a").placement, Placement::Dedicated);
        assert!(all_cpus(by_name(&plan, "d"))
            .intersection(&by_name(&plan, "s").vcpus[0])
            .is_empty());

        let plan = host_plan(&[managed("huge", 9, Policy::Dedicated, vec![])]);
        assert_eq!(by_name(&plan, "huge").placement, Placement::Shared);
        assert!(
            plan.warnings.iter().any(|w| w.to_string().contains("huge")),
            "{:?}",
            plan.warnings
        );
    }

    #[test]
    fn nova_sets_split_dedicated_and_shared_pools() {
        let topo = Topology::uniform(&set("0-7"), 1);
        let host = HostPolicy {
            dedicated_set: Some(set("4-7")),
            shared_set: Some(set("1-3")),
            ..HostPolicy::with_reserved(set("0"))
        };
        let plan = plan(
            &topo,
            &host,
            &[
                managed("d", 2, Policy::Dedicated, vec![]),
                managed("s", 2, Policy::Shared, vec![]),
            ],
        );
        assert!(all_cpus(by_name(&plan, "d")).is_subset(&set("4-7")));
        assert_eq!(by_name(&plan, "s").vcpus[0], set("1-3"));
    }

    #[test]
    fn stale_pins_to_reserved_or_taken_cpus_are_replaced() {
        let stale = managed("a", 2, Policy::Auto, vec![Some(set("0")), Some(set("5"))]);
        let plan = host_plan(&[stale]);
        let a = by_name(&plan, "a");
        assert_eq!(a.vcpus[1], set("5"), "valid pin kept");
        assert_ne!(a.vcpus[0], set("0"), "reserved CPU replaced");
        assert_eq!(
            a.numa_nodes,
            vec![1],
            "replacement joins the kept pin's node"
        );
        assert_eq!(plan.pins_moved, 1);
    }

    #[test]
    fn back_from_shared_guests_stay_on_the_node_they_shared() {
        // Node 0: 0-3, node 1: 4-7. Both guests shared node 1's range; now
        // they fit one-to-one and must stay on node 1, where their memory is.
        let shared_on_1 = |name: &str| {
            managed(
                name,
                2,
                Policy::Auto,
                vec![Some(set("4-7")), Some(set("4-7"))],
            )
        };
        let plan = plan(
            &Topology::uniform(&set("0-7"), 2),
            &HostPolicy::with_reserved(CpuSet::new()),
            &[shared_on_1("a"), shared_on_1("b")],
        );
        assert_eq!(plan.mode, Mode::Dedicated);
        for g in &plan.guests {
            assert_eq!(
                g.numa_nodes,
                vec![1],
                "{} left its node: {:?}",
                g.name,
                g.vcpus
            );
            assert!(g.reason.contains("stays on node 1"), "{}", g.reason);
        }
    }

    #[test]
    fn an_empty_pool_places_nothing_and_says_why() {
        let foreign = Guest {
            name: "nova".into(),
            uuid: "n".into(),
            vcpus: 2,
            role: Role::Foreign { taken: set("2-3") },
        };
        let topo = Topology::uniform(&set("0-3"), 1);
        let plan = plan(
            &topo,
            &HostPolicy::with_reserved(set("0-1")),
            &[foreign, guest("a", 1)],
        );
        assert!(plan.guests.is_empty());
        assert!(
            plan.warnings[0]
                .to_string()
                .contains("no CPUs left for guests"),
            "{:?}",
            plan.warnings
        );
    }

    #[test]
    fn cpus_without_a_node_leave_memory_alone() {
        let mut topo = Topology::uniform(&set("0-3"), 1);
        for cpu in topo.cpus.iter_mut() {
            cpu.numa_node = None;
        }
        topo.numa_nodes.clear();
        let plan = plan(
            &topo,
            &HostPolicy::with_reserved(CpuSet::new()),
            &[guest("a", 2)],
        );
        let a = by_name(&plan, "a");
        assert_eq!(a.memory_nodes, None);
        assert_eq!(all_cpus(a).len(), 2);
    }
}
