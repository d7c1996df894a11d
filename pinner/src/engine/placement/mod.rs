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
use crate::engine::memory::{
    by_kind, human, Claim, MemoryPart, MemoryReserve, PageKind, PoolFigures,
};
use crate::engine::policy::PolicyRules;
use crate::engine::topology::Topology;
use std::collections::{HashMap, HashSet};

mod cells;
mod dedicated;
pub mod layout;
mod load;
mod memory;
mod region;
mod shared;

use dedicated::place_dedicated;
use layout::Layout;
pub use load::host_load;
use memory::Memory;
use shared::place_shared;

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
    /// The guest's own NUMA cells: the vCPUs of each (empty: none).
    pub cells: Vec<CpuSet>,
    /// Its memory: one entry per cell of `cells`, else one for the whole
    /// guest (empty: not known, so placed as if it took none).
    pub memory: Vec<Vec<MemoryPart>>,
    /// The nodes its memory is bound to now (None: not bound).
    pub memory_nodes: Option<CpuSet>,
    pub role: Role,
}

/// What placement knows of the running guests beyond their XML (by
/// default: nothing measured, the default prior).
#[derive(Debug, Clone, PartialEq)]
pub struct Load {
    /// Guest UUID → its measured demand (CPUs); a guest not here weighs
    /// the host's `demand_prior_per_vcpu` per vCPU.
    pub demand: HashMap<String, f64>,
    /// Guests whose demand has been measured too briefly to move them for
    /// it (a booting guest looks idle): rebalancing counts each at least
    /// at the prior and leaves it where it is.
    pub settling: HashSet<String>,
    /// Guest UUID → the range rebalancing moves it to now.
    pub moves: HashMap<String, CpuSet>,
    /// `demand_prior_per_vcpu`.
    pub prior_per_vcpu: f64,
}

/// `demand_prior_per_vcpu` unless set: a guest not yet measured is taken
/// for busy, so it goes where the measured guests leave most room.
pub const DEFAULT_DEMAND_PRIOR_PER_VCPU: f64 = 1.0;

impl Default for Load {
    fn default() -> Load {
        Load::prior(DEFAULT_DEMAND_PRIOR_PER_VCPU)
    }
}

impl Load {
    /// No measurements, no moves: guests weigh the prior.
    pub fn prior(prior_per_vcpu: f64) -> Load {
        Load {
            demand: HashMap::new(),
            settling: HashSet::new(),
            moves: HashMap::new(),
            prior_per_vcpu,
        }
    }

    /// Guest `uuid`'s demand (CPUs): measured, else the prior for its
    /// `vcpus`.
    pub fn demand_of(&self, uuid: &str, vcpus: u32) -> f64 {
        self.demand
            .get(uuid)
            .copied()
            .unwrap_or(self.prior_per_vcpu * f64::from(vcpus))
    }

    /// What `g` adds to the range it goes to.
    fn weight(&self, g: &Guest) -> shared::Weight {
        shared::Weight {
            vcpus: g.vcpus,
            demand: self.demand_of(&g.uuid, g.vcpus),
        }
    }
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

/// `capacity_hysteresis_percent` unless set.
pub const DEFAULT_CAPACITY_HYSTERESIS_PERCENT: u32 = 10;

/// The host-wide inputs of placement, from the config (and nova.conf).
#[derive(Debug, Clone, PartialEq)]
pub struct HostPolicy {
    pub reserved: CpuSet,
    pub cpu_allocation_ratio: f64,
    /// nova's `cpu_dedicated_set`: the CPUs nova pins its guests to, never
    /// given to a guest nova did not pin.
    pub dedicated_set: Option<CpuSet>,
    /// nova's `cpu_shared_set`: where nova floats its guests, and the only
    /// CPUs pinner places guests on where nova pins.
    pub shared_set: Option<CpuSet>,
    pub emulator: EmulatorPolicy,
    /// Memory the host keeps for itself on each node.
    pub memory_reserve: MemoryReserve,
    /// Which guests pinner places, and under which policy.
    pub rules: PolicyRules,
    /// Auto guests range-bound now go back to one-to-one only once their
    /// vCPUs leave this share of the pool free (percent): one guest
    /// starting and stopping at the capacity line then moves its own pins,
    /// not every guest's.
    pub capacity_hysteresis_percent: u32,
}

impl HostPolicy {
    pub fn with_reserved(reserved: CpuSet) -> HostPolicy {
        HostPolicy {
            reserved,
            cpu_allocation_ratio: 1.0,
            dedicated_set: None,
            shared_set: None,
            emulator: EmulatorPolicy::Housekeeping,
            memory_reserve: MemoryReserve::default(),
            rules: PolicyRules::default(),
            capacity_hysteresis_percent: DEFAULT_CAPACITY_HYSTERESIS_PERCENT,
        }
    }

    /// A node where nova pins: its dedicated or shared set is known.
    pub fn nova_pins(&self) -> bool {
        self.dedicated_set.is_some() || self.shared_set.is_some()
    }

    /// What of `pool` pinner's guests may have: where nova pins, its
    /// shared set (else what its dedicated set leaves).
    fn guest_cpus(&self, pool: CpuSet) -> CpuSet {
        match (&self.shared_set, &self.dedicated_set) {
            (Some(shared), _) => pool.intersection(shared),
            (None, Some(dedicated)) => pool.difference(dedicated),
            (None, None) => pool,
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
    /// Memory binding to these nodes; None when it is left alone: some of
    /// the guest's CPUs belong to no node, or its memory fits no set of
    /// nodes (a guest bound before is then bound to every node).
    pub memory_nodes: Option<Vec<u32>>,
    /// What its memory takes on each node: (node, kind, KiB).
    pub memory: Claim,
    /// Its memory fits no set of nodes: it is left unbound (or widened to
    /// every node), and nothing moves it.
    pub memory_unbound: bool,
    /// Where each of the guest's NUMA cells went (empty: it has none, or
    /// the host has one node).
    pub cells: Vec<CellPlan>,
    pub reason: String,
}

impl GuestPlan {
    /// Every CPU its vCPUs may run on: a shared guest's range.
    pub fn vcpu_cpus(&self) -> CpuSet {
        self.vcpus.iter().flat_map(CpuSet::iter).collect()
    }
}

/// Where one of a guest's NUMA cells went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellPlan {
    /// The cell's position in cell id order.
    pub cell: u32,
    /// The host nodes of its CPUs: one, unless no node had room.
    pub nodes: Vec<u32>,
    /// Why that node, when it is not simply the first choice.
    pub reason: String,
}

impl Guest {
    /// Its memory summed by kind (borrowed for the usual guest: one entry).
    pub fn memory_parts(&self) -> std::borrow::Cow<'_, [MemoryPart]> {
        match self.memory.as_slice() {
            [one] => by_kind(one),
            _ => std::borrow::Cow::Owned(by_kind(&self.memory.concat()).into_owned()),
        }
    }

    /// Each cell's memory, for `groups` (its cells, as placement keeps
    /// them): the cells' own entries when they line up, else nothing.
    fn cell_memory(&self, groups: usize) -> Vec<Vec<MemoryPart>> {
        if self.memory.len() == groups {
            self.memory.clone()
        } else {
            vec![Vec::new(); groups]
        }
    }

    /// The vCPU groups to keep node-aligned: the cells, when there are two
    /// or more and the host has two or more nodes; vCPUs no cell names go
    /// with the last cell.
    fn cell_groups(&self, layout: &Layout) -> Option<Vec<CpuSet>> {
        if self.cells.len() < 2 || layout.node_masks.keys().flatten().count() < 2 {
            return None;
        }
        let mut groups = self.cells.clone();
        let named = groups.iter().fold(CpuSet::new(), |acc, c| acc.union(c));
        let last = groups.last_mut().expect("two or more cells");
        for vcpu in (0..self.vcpus).filter(|v| !named.contains(*v)) {
            last.insert(vcpu);
        }
        Some(groups)
    }
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
    /// Every node's memory of each kind: what guests may take and what
    /// the plan (and the guests it leaves alone) commits there.
    pub memory: Vec<PoolFigures>,
    /// Running guests pinner leaves alone, with why (filled in by
    /// `reconcile::plan_for`, which sees their XML).
    pub left_alone: Vec<LeftAlone>,
}

/// A running guest pinner does not place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeftAlone {
    pub uuid: String,
    pub name: String,
    /// `foreign` (pinned by someone else) or `none`.
    pub policy: &'static str,
    pub why: String,
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
    #[error("{guest}: dedicated asked, but where nova pins, pinner places guests only on cpu_shared_set, which nova's floating guests share; shared instead")]
    NovaShares { guest: String },
    #[error("{guest}: unknown pinner policy {word:?}, treated as auto")]
    UnknownPolicy { guest: String, word: String },
    #[error("{guest}: memory not bound: {} fits no set of nodes", human(*kib))]
    MemoryUnbound { guest: String, kib: u64 },
    #[error("node {node}: {} of guest memory ({}) committed on {} of room; guests pinner leaves alone hold it", human(*committed_kib), kind.label(), human(*capacity_kib))]
    MemoryOvercommitted {
        node: u32,
        kind: PageKind,
        committed_kib: u64,
        capacity_kib: u64,
    },
}

type Current<'g> = &'g [Option<CpuSet>];

/// A managed guest as planning sees it: the guest, its policy, its pins.
type Managed<'g> = (&'g Guest, Policy, Current<'g>);

/// What the steps of [`plan`] build up, indexed like the managed guests.
struct Planning<'g> {
    managed: Vec<Managed<'g>>,
    placed: Vec<Option<GuestPlan>>,
    warnings: Vec<Warning>,
    memory: Memory,
    held_shared: Option<HeldShared>,
    load: &'g Load,
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
///  1. the pool: online − reserved − isolated − CPUs pinned by others
///     (where nova pins, only its shared set);
///  2. the managed guests, by name, and memory: the guests left alone
///     take theirs where it is, then each managed guest where it runs now
///     (see [`memory`]);
///  3. one-to-one for guests that ask for it, and for auto guests while all
///     of them fit the (dedicated) pool;
///  4. range binding for every other guest on what is left;
///  5. the mode, how many existing pins moved, and each node's memory.
pub fn plan(topo: &Topology, host: &HostPolicy, guests: &[Guest]) -> Plan {
    plan_loaded(topo, host, guests, &Load::default())
}

/// [`plan`], shared guests weighed by `load`'s demand and moved where it
/// says.
pub fn plan_loaded(topo: &Topology, host: &HostPolicy, guests: &[Guest], load: &Load) -> Plan {
    let layout = Layout::new(topo);
    let reserved = host.reserved.intersection(&topo.online);
    let taken = guests.iter().fold(CpuSet::new(), |acc, g| match &g.role {
        Role::Foreign { taken } => acc.union(taken),
        _ => acc,
    });
    let pool = host.guest_cpus(
        topo.online
            .difference(&reserved)
            .difference(&topo.isolated)
            .difference(&taken),
    );
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
            memory: Memory::new(topo, &host.memory_reserve, guests)
                .ledger
                .figures(),
            left_alone: Vec::new(),
        };
    }
    let mut planning = Planning {
        managed: managed_guests(guests),
        placed: Vec::new(),
        warnings: Vec::new(),
        memory: Memory::new(topo, &host.memory_reserve, guests),
        held_shared: None,
        load,
    };
    planning.placed = vec![None; planning.managed.len()];
    planning.memory.take_unmanaged(&layout, guests);
    let all: Vec<usize> = (0..planning.managed.len()).collect();
    planning
        .memory
        .take_homes(&layout, &planning.inputs(&all), &pool);
    let used = plan_dedicated(&layout, host, &reserved, &pool, &mut planning);
    plan_shared(&layout, host, &pool, &used, &mut planning);
    let pins_moved = moved_pins(&planning);
    memory_warnings(&mut planning);
    // Already in name order: `managed` is. Every managed guest has a plan
    // by now; the capacity saves regrowing (and copying) the list.
    let mut plans: Vec<GuestPlan> = Vec::with_capacity(planning.placed.len());
    for (plan, (g, _, _)) in planning.placed.into_iter().zip(&planning.managed) {
        if let Some(mut plan) = plan {
            plan.memory = planning.memory.claim_of(g);
            if plan.memory_unbound {
                let kib = g.memory_parts().iter().map(|p| p.kib).sum();
                plan.reason += &format!("; memory not bound: {} fits no set of nodes", human(kib));
            }
            plans.push(plan);
        }
    }
    Plan {
        mode: Mode::of(&plans),
        pool,
        reserved,
        guests: plans,
        warnings: planning.warnings,
        pins_moved,
        memory: planning.memory.ledger.figures(),
        left_alone: Vec::new(),
    }
}

/// Step 5's warnings: guests whose memory fits no set of nodes, and pools
/// committed beyond their room (only guests pinner leaves alone can do that).
fn memory_warnings(planning: &mut Planning) {
    for (guest, kib) in std::mem::take(&mut planning.memory.unbound) {
        planning
            .warnings
            .push(Warning::MemoryUnbound { guest, kib });
    }
    for pool in planning.memory.ledger.figures() {
        match pool.capacity_kib {
            Some(capacity) if pool.committed_kib > capacity => {
                planning.warnings.push(Warning::MemoryOvercommitted {
                    node: pool.node,
                    kind: pool.kind,
                    committed_kib: pool.committed_kib,
                    capacity_kib: capacity,
                })
            }
            _ => {}
        }
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
    let managed = &planning.managed;
    let dedicated_demand: usize = managed
        .iter()
        .filter(|(_, p, _)| *p != Policy::Shared)
        .map(|(g, _, _)| g.vcpus as usize)
        .sum();
    let headroom = return_headroom(host, pool, managed);
    let all_fit = dedicated_demand + headroom <= pool.len();
    if !all_fit && dedicated_demand <= pool.len() {
        planning.held_shared = Some(HeldShared {
            vcpus: dedicated_demand,
            pcpus: pool.len(),
            headroom,
        });
    }
    // Guests asking for it, and auto guests when all fit; none where nova
    // pins, whose shared set nova's guests may float over. Indices into
    // `managed`, so its name order carries over.
    let wanting: Vec<usize> = (0..managed.len())
        .filter(|&i| match managed[i].1 {
            Policy::Dedicated => true,
            Policy::Auto => all_fit,
            _ => false,
        })
        .collect();
    let wanting = if host.nova_pins() {
        for &i in wanting
            .iter()
            .filter(|&&i| managed[i].1 == Policy::Dedicated)
        {
            planning.warnings.push(Warning::NovaShares {
                guest: managed[i].0.name.clone(),
            });
        }
        Vec::new()
    } else {
        wanting
    };
    let input = planning.inputs(&wanting);
    let mut free = pool.clone();
    let memory = &mut planning.memory;
    let plans = place_dedicated(layout, host, reserved, &input, &mut free, memory);
    for (&i, plan) in wanting.iter().zip(plans) {
        match plan {
            Some(plan) => planning.placed[i] = Some(plan),
            None => planning.warnings.push(Warning::NoDedicatedRoom {
                guest: planning.managed[i].0.name.clone(),
                vcpus: planning.managed[i].0.vcpus,
            }),
        }
    }
    pool.difference(&free)
}

/// Hysteresis at the capacity line: while the auto guests are range-bound
/// (every one that has pins has a pin of more than one CPU: they crossed
/// the line, not one guest that found no room of its own), the CPUs they
/// must leave free to go back to one-to-one (the percentage of the pool,
/// rounded down: a pool too small for a band flips, at the cost of a few
/// pins); else none.
fn return_headroom(host: &HostPolicy, pool: &CpuSet, managed: &[Managed]) -> usize {
    let mut pinned = managed
        .iter()
        .filter(|(_, policy, current)| {
            *policy == Policy::Auto && current.iter().any(Option::is_some)
        })
        .peekable();
    let range_bound = pinned.peek().is_some()
        && pinned.all(|(_, _, current)| current.iter().flatten().any(|pin| pin.len() > 1));
    match range_bound {
        true => pool.len() * host.capacity_hysteresis_percent as usize / 100,
        false => 0,
    }
}

/// Auto guests kept range-bound by the hysteresis though they would fit
/// one-to-one: said in their reasons.
#[derive(Debug, Clone, Copy)]
struct HeldShared {
    vcpus: usize,
    pcpus: usize,
    headroom: usize,
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
    let mut shared_pool = pool.difference(used);
    if shared_pool.is_empty() {
        planning.warnings.push(Warning::NoSharedRoom);
        shared_pool = pool.clone();
    }
    let placed = place_shared(
        layout,
        &shared_pool,
        &shared,
        (&mut planning.memory, planning.load),
    );
    for (&i, mut plan) in shared_index.iter().zip(placed) {
        if let (Some(held), Policy::Auto) = (planning.held_shared, planning.managed[i].1) {
            plan.reason += &format!(
                "; one-to-one again once the auto guests' {} vCPUs leave {} of the pool's {} CPUs free (capacity_hysteresis_percent)",
                held.vcpus, held.headroom, held.pcpus
            );
        }
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
pub(super) struct Locality {
    numa_nodes: Vec<u32>,
    memory_nodes: Option<Vec<u32>>,
    /// No set of nodes holds the guest's memory.
    unbound: bool,
}

impl Locality {
    /// From the guest's nodes (`Layout::nodes_opt`): memory is bound to
    /// them unless some of its CPUs belong to no node, in which case it is
    /// left alone.
    fn of(nodes: &[Option<u32>]) -> Locality {
        let numa_nodes: Vec<u32> = nodes.iter().flatten().copied().collect();
        let bound = !nodes.contains(&None) && !numa_nodes.is_empty();
        Locality {
            memory_nodes: bound.then(|| numa_nodes.clone()),
            numa_nodes,
            unbound: false,
        }
    }
}

pub(super) fn guest_plan(
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
        memory: Claim::new(),
        memory_unbound: locality.unbound,
        cells: Vec::new(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::topology::CpuKind;
    use std::collections::{BTreeMap, BTreeSet};

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
            cells: vec![],
            memory: vec![],
            memory_nodes: None,
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

    /// 16 auto guests of 4 vCPUs fill a 64-CPU pool one-to-one; a 17th
    /// starts and stops ten times. The pins each plan moves, and the plans.
    fn cycle_at_the_capacity_line(percent: u32) -> (Vec<u32>, Vec<Plan>) {
        let topo = Topology::uniform(&set("0-63"), 2);
        let host = HostPolicy {
            capacity_hysteresis_percent: percent,
            ..HostPolicy::with_reserved(CpuSet::new())
        };
        let mut guests: Vec<Guest> = (0..16).map(|i| guest(&format!("g{i:02}"), 4)).collect();
        let run = |guests: &mut Vec<Guest>| {
            let plan = plan(&topo, &host, guests);
            for g in guests.iter_mut() {
                g.role = Role::Managed {
                    policy: Policy::Auto,
                    current: current_of(by_name(&plan, &g.name)),
                };
            }
            plan
        };
        let mut plans = vec![run(&mut guests)];
        for _ in 0..10 {
            guests.push(guest("zz", 4));
            plans.push(run(&mut guests));
            guests.pop();
            plans.push(run(&mut guests));
        }
        (plans.iter().map(|p| p.pins_moved).collect(), plans)
    }

    #[test]
    fn a_guest_cycling_at_the_capacity_line_moves_its_own_pins_not_every_guests() {
        let (before, plans) = cycle_at_the_capacity_line(0);
        assert_eq!(plans[1].mode, Mode::Shared);
        assert_eq!(
            plans[2].mode,
            Mode::Dedicated,
            "no hysteresis: back at once"
        );
        assert!(
            before.iter().sum::<u32>() >= 20 * 60,
            "every cycle flips all: {before:?}"
        );

        let (after, plans) = cycle_at_the_capacity_line(10);
        assert_eq!(plans[0].mode, Mode::Dedicated);
        assert!(plans[1..].iter().all(|p| p.mode == Mode::Shared));
        // The first start flips the 64 pins once; then the cycling guest
        // moves at most a few others'.
        assert!(after[1] >= 60, "{after:?}");
        assert!(after[2..].iter().sum::<u32>() <= 16, "{after:?}");
        let reason = &by_name(&plans[2], "g00").reason;
        assert!(
            reason.contains("leave 6 of the pool's 64 CPUs free"),
            "{reason}"
        );
    }

    /// Range-bound auto guests go back to one-to-one once they leave the
    /// headroom free: 56 vCPUs on 64 CPUs with 6 to spare.
    #[test]
    fn range_bound_guests_return_to_one_to_one_with_room_to_spare() {
        let topo = Topology::uniform(&set("0-63"), 2);
        let host = HostPolicy::with_reserved(CpuSet::new());
        let range = |i: u32| Some(set(if i.is_multiple_of(2) { "0-31" } else { "32-63" }));
        let shared_now = |count: u32| -> Vec<Guest> {
            (0..count)
                .map(|i| managed(&format!("g{i:02}"), 4, Policy::Auto, vec![range(i); 4]))
                .collect()
        };
        assert_eq!(plan(&topo, &host, &shared_now(15)).mode, Mode::Shared);
        assert_eq!(plan(&topo, &host, &shared_now(14)).mode, Mode::Dedicated);
        // Never range-bound: one-to-one up to the last CPU.
        let fresh: Vec<Guest> = (0..16).map(|i| guest(&format!("g{i:02}"), 4)).collect();
        assert_eq!(plan(&topo, &host, &fresh).mode, Mode::Dedicated);
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
        p.vcpu_cpus()
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
            cells: vec![],
            memory: vec![],
            memory_nodes: None,
            role: Role::Foreign { taken: set("4-5") },
        };
        let opted = Guest {
            name: "mine".into(),
            uuid: "m".into(),
            vcpus: 2,
            cells: vec![],
            memory: vec![],
            memory_nodes: None,
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
    fn a_guest_whose_kept_pins_would_span_nodes_moves_whole_to_one() {
        // 2 nodes x 2 cores x 2 threads; node 0 is CPUs 0,1,4,5 (cores 0-4, 1-5).
        let topo = Topology::synthetic(2, 1, 2, 2);
        let first = plan(
            &topo,
            &HostPolicy::with_reserved(CpuSet::new()),
            &[guest("g", 4)],
        );
        assert_eq!(all_cpus(by_name(&first, "g")), set("0-1,4-5"));
        // Reserving core 0 leaves the guest half a node where it is.
        let second = plan(
            &topo,
            &HostPolicy::with_reserved(set("0,4")),
            &settled(&first),
        );
        let g = by_name(&second, "g");
        assert_eq!(all_cpus(g), set("2-3,6-7"), "{}", g.reason);
        assert!(g.reason.contains("moved whole"), "{}", g.reason);
        assert_eq!(second.pins_moved, 4);
    }

    fn with_cells(mut g: Guest, cells: &[&str]) -> Guest {
        g.cells = cells.iter().map(|c| set(c)).collect();
        g
    }

    /// The host node of every CPU `cell` of `g` runs on.
    fn cell_nodes(topo: &Topology, g: &GuestPlan, cell: &str) -> BTreeSet<u32> {
        set(cell)
            .iter()
            .flat_map(|v| g.vcpus[v as usize].iter())
            .filter_map(|cpu| topo.cpus.iter().find(|c| c.id == cpu)?.numa_node)
            .collect()
    }

    #[test]
    fn each_cell_on_a_node_of_its_own_and_kept_on_replan() {
        // 2 nodes x 4 cores x 2 threads; a cell-less guest would fit one node.
        let topo = Topology::synthetic(2, 1, 4, 2);
        let host = HostPolicy::with_reserved(CpuSet::new());
        let g = with_cells(guest("big", 8), &["0-3", "4-7"]);
        let first = plan(&topo, &host, std::slice::from_ref(&g));
        let p = by_name(&first, "big");
        let (a, b) = (cell_nodes(&topo, p, "0-3"), cell_nodes(&topo, p, "4-7"));
        assert_eq!((a.len(), b.len()), (1, 1), "{}", p.reason);
        assert_ne!(a, b, "{}", p.reason);
        assert_eq!(p.cells.len(), 2);
        assert_eq!(p.memory_nodes, Some(vec![0, 1]));
        assert!(
            p.reason.contains("cell 0 → node 0") && p.reason.contains("cell 1 → node 1"),
            "{}",
            p.reason
        );
        // Settled, it moves nothing.
        let mut again = with_cells(settled(&first).remove(0), &["0-3", "4-7"]);
        again.name = "big".into();
        let second = plan(&topo, &host, &[again]);
        assert_eq!(second.pins_moved, 0, "{}", by_name(&second, "big").reason);
    }

    #[test]
    fn cells_take_the_closest_nodes_and_share_one_only_when_none_is_free() {
        // 4 nodes of 2 CPUs: 0-1 and 2-3 close (12), the pairs far (32).
        let mut topo = Topology::synthetic(4, 1, 2, 1);
        for node in topo.numa_nodes.iter_mut() {
            node.distances = (0..4)
                .map(|other| match (node.id / 2 == other / 2, node.id == other) {
                    (_, true) => 10,
                    (true, false) => 12,
                    _ => 32,
                })
                .collect();
        }
        let host = HostPolicy::with_reserved(CpuSet::new());
        // "a" keeps node 0 (CPUs 0-1); "b"'s two cells then want a close
        // pair: nodes 2 and 3, not 1 and a far one.
        let a = managed("a", 2, Policy::Auto, vec![Some(set("0")), Some(set("1"))]);
        let guests = [a, with_cells(guest("b", 4), &["0-1", "2-3"])];
        let p = plan(&topo, &host, &guests);
        let b = by_name(&p, "b");
        let nodes: BTreeSet<u32> = b.cells.iter().flat_map(|c| c.nodes.clone()).collect();
        assert_eq!(nodes, BTreeSet::from([2, 3]), "{}", b.reason);
        // Three cells on two free nodes: one shares, and says so.
        let topo = Topology::synthetic(2, 1, 4, 1);
        let g = with_cells(guest("c", 6), &["0-1", "2-3", "4-5"]);
        let p = plan(&topo, &host, &[g]);
        let c = by_name(&p, "c");
        for cell in ["0-1", "2-3", "4-5"] {
            assert_eq!(cell_nodes(&topo, c, cell).len(), 1, "{}", c.reason);
        }
        assert!(c.reason.contains("shares node"), "{}", c.reason);
    }

    #[test]
    fn shared_guests_keep_their_cells_node_aligned() {
        let topo = Topology::synthetic(2, 1, 4, 1);
        let host = HostPolicy::with_reserved(CpuSet::new());
        // Interleaved cells: in vCPU order every cell would span both nodes.
        let s = with_cells(managed("s", 6, Policy::Shared, vec![]), &["0,2,4", "1,3,5"]);
        let p = plan(&topo, &host, &[s, managed("t", 2, Policy::Shared, vec![])]);
        let s = by_name(&p, "s");
        assert_eq!(s.placement, Placement::Shared);
        let (a, b) = (cell_nodes(&topo, s, "0,2,4"), cell_nodes(&topo, s, "1,3,5"));
        assert_eq!((a.len(), b.len()), (1, 1), "{}", s.reason);
        assert_ne!(a, b, "{}", s.reason);
        assert_eq!(s.vcpus[0], s.vcpus[2], "a cell floats on one range");
        assert!(
            s.reason.starts_with("shared: cell 0 → node"),
            "{}",
            s.reason
        );
    }

    #[test]
    fn shared_guests_stay_on_their_range_when_balanced() {
        let guests: Vec<Guest> = (0..6).map(|i| guest(&format!("g{i}"), 2)).collect();
        let first = host_plan(&guests);
        let second = host_plan(&settled(&first));
        assert_eq!(second.guests, first.guests);
        assert_eq!(second.pins_moved, 0);
    }

    /// 2 nodes × 4 CPUs, nobody reserved: busy and idle 4-vCPU shared
    /// guests, the busy one on node 0, the idle one on node 1.
    fn busy_and_idle() -> (Topology, HostPolicy, Vec<Guest>) {
        let topo = Topology::uniform(&set("0-7"), 2);
        let pinned =
            |name: &str, cpus: &str| managed(name, 4, Policy::Shared, vec![Some(set(cpus)); 4]);
        let guests = vec![pinned("busy", "0-3"), pinned("idle", "4-7")];
        (topo, HostPolicy::with_reserved(CpuSet::new()), guests)
    }

    fn measured(pairs: &[(&str, f64)]) -> Load {
        Load {
            demand: pairs
                .iter()
                .map(|(n, d)| (format!("uuid-{n}"), *d))
                .collect(),
            ..Load::default()
        }
    }

    #[test]
    fn a_new_shared_guest_goes_where_measured_demand_leaves_room() {
        let (topo, host, mut guests) = busy_and_idle();
        guests.push(managed("new", 4, Policy::Shared, vec![]));
        // By vCPU count both nodes hold 4: the first wins.
        let counted = plan(&topo, &host, &guests);
        assert_eq!(all_cpus(by_name(&counted, "new")), set("0-3"));
        let load = measured(&[("busy", 3.9), ("idle", 0.1)]);
        let weighed = plan_loaded(&topo, &host, &guests, &load);
        assert_eq!(all_cpus(by_name(&weighed, "new")), set("4-7"));
        // The running guests stay: within one vCPU per pCPU.
        assert_eq!(all_cpus(by_name(&weighed, "busy")), set("0-3"));
        assert_eq!(weighed.pins_moved, 0);
    }

    #[test]
    fn a_guest_measured_too_briefly_counts_at_least_the_prior_and_stays() {
        let (topo, host, guests) = busy_and_idle();
        let mut load = measured(&[("busy", 3.9), ("idle", 0.1)]);
        load.settling.insert("uuid-idle".into());
        let plan = plan_loaded(&topo, &host, &guests, &load);
        let view = host_load(&topo, &plan, &load);
        let tenant = |name: &str| view.tenants.iter().find(|t| t.name == name).unwrap();
        assert_eq!(
            (tenant("idle").demand, tenant("idle").movable),
            (4.0, false)
        );
        assert_eq!((tenant("busy").demand, tenant("busy").movable), (3.9, true));
        let unmeasured = host_load(&topo, &plan, &Load::default());
        assert!(unmeasured.tenants.iter().all(|t| !t.movable));
    }

    #[test]
    fn rebalancing_never_sees_a_dedicated_guest_or_its_cpus() {
        let topo = Topology::uniform(&set("0-7"), 2);
        let guests = vec![
            managed("own", 2, Policy::Dedicated, vec![]),
            managed("shared", 2, Policy::Shared, vec![]),
        ];
        let host = HostPolicy::with_reserved(CpuSet::new());
        let plan = plan(&topo, &host, &guests);
        let own = all_cpus(by_name(&plan, "own"));
        let view = host_load(&topo, &plan, &Load::default());
        assert_eq!(view.tenants.len(), 1);
        assert_eq!(view.tenants[0].name, "shared");
        for share in &view.nodes {
            assert!(share.cpus.intersection(&own).is_empty(), "{share:?}");
        }
    }

    #[test]
    fn running_guests_leave_their_range_for_demand_only_through_rebalancing() {
        // Two busy guests stacked on node 0, two idle ones on node 1: by
        // count every range is even, so placement keeps them all.
        let topo = Topology::uniform(&set("0-7"), 2);
        let pinned =
            |name: &str, cpus: &str| managed(name, 4, Policy::Shared, vec![Some(set(cpus)); 4]);
        let guests = vec![
            pinned("busy1", "0-3"),
            pinned("busy2", "0-3"),
            pinned("idle1", "4-7"),
            pinned("idle2", "4-7"),
        ];
        let load = measured(&[
            ("busy1", 4.0),
            ("busy2", 4.0),
            ("idle1", 0.0),
            ("idle2", 0.0),
        ]);
        let host = HostPolicy::with_reserved(CpuSet::new());
        let kept = plan_loaded(&topo, &host, &guests, &load);
        assert_eq!(kept.pins_moved, 0);
        let host_load = host_load(&topo, &kept, &load);
        let demand_on = |cpus: &str| -> f64 {
            host_load
                .tenants
                .iter()
                .filter(|t| t.range == set(cpus))
                .map(|t| t.demand)
                .sum()
        };
        assert_eq!((demand_on("0-3"), demand_on("4-7")), (8.0, 0.0));
        assert!(host_load.tenants.iter().all(|t| t.movable));
    }

    #[test]
    fn measurement_noise_between_idle_ranges_leaves_vcpu_count_to_decide() {
        let (topo, host, mut guests) = busy_and_idle();
        guests.push(managed(
            "third",
            2,
            Policy::Shared,
            vec![Some(set("4-7")); 2],
        ));
        guests.push(managed("new", 2, Policy::Shared, vec![]));
        // Node 1 carries 0.04 CPUs less demand (within the tie) but 6
        // vCPUs to node 0's 4: count decides, node 0.
        let load = measured(&[("busy", 0.06), ("idle", 0.01), ("third", 0.01)]);
        let weighed = plan_loaded(&topo, &host, &guests, &load);
        assert_eq!(all_cpus(by_name(&weighed, "new")), set("0-3"));
    }

    #[test]
    fn a_rebalancing_move_is_honoured_where_the_guest_fits() {
        let (topo, host, guests) = busy_and_idle();
        let mut load = measured(&[("busy", 3.9), ("idle", 0.1)]);
        load.moves.insert("uuid-busy".into(), set("4-7"));
        let moved = plan_loaded(&topo, &host, &guests, &load);
        assert_eq!(all_cpus(by_name(&moved, "busy")), set("4-7"));
        assert_eq!(by_name(&moved, "busy").memory_nodes, Some(vec![1]));
        // Node 1 would hold 8 vCPUs to node 0's none: by count the idle
        // guest goes the other way, as it would for any placement.
        assert_eq!(all_cpus(by_name(&moved, "idle")), set("0-3"));
        assert_eq!(moved.pins_moved, 8);
        // A move to a range that is no candidate (not a range placement
        // makes) is ignored.
        load.moves.insert("uuid-busy".into(), set("2-5"));
        let kept = plan_loaded(&topo, &host, &guests, &load);
        assert_eq!(all_cpus(by_name(&kept, "busy")), set("0-3"));
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
    fn where_nova_pins_pinner_places_only_on_the_shared_set() {
        // nova pins its own guests on 4-7 and floats others over 1-3;
        // pinner's guests (nova did not pin them) never get 4-7, and share
        // 1-3, a dedicated one too, with a warning saying why.
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
                guest("a", 1),
            ],
        );
        for g in &plan.guests {
            assert_eq!(g.placement, Placement::Shared, "{}", g.name);
            assert!(
                all_cpus(g).is_subset(&set("1-3")),
                "{}: {:?}",
                g.name,
                g.vcpus
            );
        }
        let said: Vec<String> = plan.warnings.iter().map(ToString::to_string).collect();
        assert!(
            said.iter().any(|w| w.starts_with("d: dedicated asked")),
            "{said:?}"
        );
        // Only cpu_dedicated_set known: everything but it.
        let host = HostPolicy {
            shared_set: None,
            ..host
        };
        let only_dedicated_known = super::plan(&topo, &host, &[guest("a", 2)]);
        assert!(all_cpus(&only_dedicated_known.guests[0]).is_subset(&set("1-3")));
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
    fn into_shared_dedicated_pins_are_not_kept_as_ranges() {
        // One node 0-1: a and b pinned one-to-one, then c arrives and the
        // host turns shared. Each must float on the node, not keep the one
        // CPU it had (a dedicated pin is no range).
        let one_to_one =
            |name: &str, cpu: &str| managed(name, 1, Policy::Auto, vec![Some(set(cpu))]);
        let plan = plan(
            &Topology::uniform(&set("0-1"), 1),
            &HostPolicy::with_reserved(CpuSet::new()),
            &[one_to_one("a", "0"), one_to_one("b", "1"), guest("c", 1)],
        );
        assert_eq!(plan.mode, Mode::Shared);
        for g in &plan.guests {
            assert_eq!(g.vcpus, vec![set("0-1")], "{}: {}", g.name, g.reason);
        }
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
            cells: vec![],
            memory: vec![],
            memory_nodes: None,
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

#[cfg(test)]
mod memory_tests {
    use super::*;
    use crate::engine::topology::HugePages;
    use std::collections::BTreeMap;

    const GIB: u64 = 1 << 20;

    fn set(text: &str) -> CpuSet {
        CpuSet::parse(text).unwrap()
    }

    /// `nodes` nodes of `cpus` CPUs (one core each) and `gib` GiB each.
    fn host(nodes: u32, cpus: u32, gib: u64) -> Topology {
        let mut topo = Topology::synthetic(nodes, 1, cpus, 1);
        for node in topo.numa_nodes.iter_mut() {
            node.memory_mib = Some(gib * 1024);
        }
        topo
    }

    fn sized(name: &str, vcpus: u32, gib: u64, kind: PageKind) -> Guest {
        Guest {
            name: name.into(),
            uuid: format!("uuid-{name}"),
            vcpus,
            cells: vec![],
            memory: vec![vec![MemoryPart {
                kib: gib * GIB,
                kind,
            }]],
            memory_nodes: None,
            role: Role::Managed {
                policy: Policy::Auto,
                current: vec![],
            },
        }
    }

    fn normal(name: &str, vcpus: u32, gib: u64) -> Guest {
        sized(name, vcpus, gib, PageKind::Normal)
    }

    fn nobody_reserved() -> HostPolicy {
        HostPolicy::with_reserved(CpuSet::new())
    }

    fn by_name<'a>(plan: &'a Plan, name: &str) -> &'a GuestPlan {
        plan.guests.iter().find(|g| g.name == name).unwrap()
    }

    /// Every pool's commitment within its capacity.
    fn assert_within_capacity(plan: &Plan) {
        for pool in &plan.memory {
            if let Some(capacity) = pool.capacity_kib {
                assert!(
                    pool.committed_kib <= capacity,
                    "node {} {:?}: {} KiB committed on {capacity}",
                    pool.node,
                    pool.kind,
                    pool.committed_kib
                );
            }
        }
    }

    /// A guest's planned pins as its current ones.
    fn settled(plan: &Plan, g: &Guest) -> Guest {
        let p = by_name(plan, &g.name);
        Guest {
            memory_nodes: p.memory_nodes.as_ref().map(|n| n.iter().copied().collect()),
            role: Role::Managed {
                policy: Policy::Auto,
                current: p.vcpus.iter().cloned().map(Some).collect(),
            },
            ..g.clone()
        }
    }

    #[test]
    fn small_guests_fill_a_node_only_as_far_as_its_memory() {
        // The case: nine 1-vCPU guests of 7 GiB on 16 GiB nodes;
        // by CPUs alone eight went to node 0.
        let topo = host(8, 8, 16);
        let guests: Vec<Guest> = (0..9).map(|i| normal(&format!("g{i}"), 1, 7)).collect();
        let plan = plan(&topo, &nobody_reserved(), &guests);
        assert_within_capacity(&plan);
        let mut per_node = BTreeMap::new();
        for g in &plan.guests {
            assert_eq!(g.numa_nodes.len(), 1, "{}: {}", g.name, g.reason);
            assert_eq!(g.memory_nodes.as_ref(), Some(&g.numa_nodes));
            assert_eq!(g.memory, vec![(g.numa_nodes[0], PageKind::Normal, 7 * GIB)]);
            *per_node.entry(g.numa_nodes[0]).or_insert(0) += 1;
        }
        assert!(per_node.values().all(|&n| n <= 2), "{per_node:?}");
        let first = by_name(&plan, "g0");
        assert!(
            first.reason.contains("(memory 9 of 16 GiB left)"),
            "{}",
            first.reason
        );
    }

    #[test]
    fn a_guest_no_node_holds_spans_the_fewest_closest_nodes_that_do() {
        // Two 4-vCPU guests of 24 GiB on 16 GiB nodes: by CPUs alone both
        // went to node 0, 48 GiB bound to 16.
        let topo = host(4, 8, 16);
        let plan = plan(
            &topo,
            &nobody_reserved(),
            &[normal("a", 4, 24), normal("b", 4, 24)],
        );
        assert_within_capacity(&plan);
        for name in ["a", "b"] {
            let g = by_name(&plan, name);
            assert_eq!(g.numa_nodes.len(), 2, "{}", g.reason);
            assert_eq!(g.memory_nodes.as_ref(), Some(&g.numa_nodes));
            assert!(
                topo.distance(g.numa_nodes[0], g.numa_nodes[1]) == 16,
                "the close pair: {:?}",
                g.numa_nodes
            );
            assert!(
                g.reason.contains("24 GiB fits no single node"),
                "{}",
                g.reason
            );
            // The vCPUs are spread as the memory is: 16 GiB and 8 GiB,
            // three vCPUs and one.
            let mut spread: Vec<(u64, usize)> = g
                .memory
                .iter()
                .map(|&(node, _, kib)| {
                    let here = g.vcpus.iter().filter(|c| topo.nodes_of(c) == vec![node]);
                    (kib / GIB, here.count())
                })
                .collect();
            spread.sort();
            assert_eq!(spread, vec![(8, 1), (16, 3)], "{name}: {:?}", g.vcpus);
        }
    }

    #[test]
    fn memory_that_fits_no_set_of_nodes_stays_unbound_with_a_warning() {
        let topo = host(2, 4, 16);
        let huge = normal("huge", 2, 600);
        let p = plan(&topo, &nobody_reserved(), std::slice::from_ref(&huge));
        let g = by_name(&p, "huge");
        assert_eq!(g.memory_nodes, None);
        assert_eq!(g.vcpus.iter().filter(|c| c.len() == 1).count(), 2);
        assert!(
            g.reason
                .contains("memory not bound: 600 GiB fits no set of nodes"),
            "{}",
            g.reason
        );
        assert!(p.warnings.contains(&Warning::MemoryUnbound {
            guest: "huge".into(),
            kib: 600 * GIB
        }));
        assert!(g.memory.is_empty(), "nothing committed for it");
        assert!(g.memory_unbound);
        // One bound before (by someone) is bound to every node instead.
        let bound = Guest {
            memory_nodes: Some(set("0")),
            ..huge
        };
        let p = plan(&topo, &nobody_reserved(), &[bound]);
        assert_eq!(by_name(&p, "huge").memory_nodes, Some(vec![0, 1]));
    }

    #[test]
    fn hugepage_guests_go_where_their_pages_are() {
        let mut topo = host(2, 4, 16);
        topo.numa_nodes[1].hugepages = vec![HugePages {
            size_kib: 2048,
            total: 2048,
            free: 2048,
        }];
        // Node 1 has fewer free CPUs: by CPUs alone the tightest fit.
        let taken = Guest {
            role: Role::Foreign { taken: set("0") },
            ..normal("nova", 1, 1)
        };
        let huge = sized("nfv", 2, 2, PageKind::Huge(2048));
        let p = plan(&topo, &nobody_reserved(), &[taken.clone(), huge.clone()]);
        let g = by_name(&p, "nfv");
        assert_eq!(g.numa_nodes, vec![1], "{}", g.reason);
        assert_eq!(g.memory, vec![(1, PageKind::Huge(2048), 2 * GIB)]);
        assert!(
            g.reason.contains("2M pages: 1024 of 2048 left"),
            "{}",
            g.reason
        );
        // More than the pool holds: unbound, never bound beyond it.
        let big = sized("big", 2, 5, PageKind::Huge(2048));
        let p = plan(&topo, &nobody_reserved(), &[taken, big]);
        assert_eq!(by_name(&p, "big").memory_nodes, None);
        assert_within_capacity(&p);
    }

    #[test]
    fn running_guests_keep_their_node_and_newcomers_go_around_them() {
        // Node 0 is CPU 0-3, node 1 CPUs 4-7; 16 GiB each.
        let topo = host(2, 4, 16);
        let a = normal("a", 2, 10);
        let first = plan(&topo, &nobody_reserved(), std::slice::from_ref(&a));
        let a = settled(&first, &a);
        let home = by_name(&first, "a").numa_nodes.clone();
        // By CPUs b fits a's node most tightly; its 8 GiB do not.
        let p = plan(&topo, &nobody_reserved(), &[a, normal("b", 2, 8)]);
        assert_eq!(by_name(&p, "a").numa_nodes, home);
        assert_eq!(p.pins_moved, 0);
        assert_ne!(by_name(&p, "b").numa_nodes, home);
        assert_within_capacity(&p);
    }

    #[test]
    fn a_guest_whose_node_no_longer_holds_it_moves_with_a_reason() {
        let topo = host(2, 4, 16);
        let guests = [normal("a", 1, 7), normal("b", 1, 6)];
        let first = plan(&topo, &nobody_reserved(), &guests);
        let node = by_name(&first, "a").numa_nodes.clone();
        assert_eq!(by_name(&first, "b").numa_nodes, node, "packed by CPUs");
        let running: Vec<Guest> = guests.iter().map(|g| settled(&first, g)).collect();
        // A reload raises the reserve: the node now holds 8 GiB.
        let mut host = nobody_reserved();
        host.memory_reserve.normal_kib_per_node = 8 * GIB;
        let p = plan(&topo, &host, &running);
        assert_within_capacity(&p);
        assert_eq!(by_name(&p, "a").numa_nodes, node, "the larger stays");
        let b = by_name(&p, "b");
        assert_ne!(b.numa_nodes, node);
        assert!(
            b.reason.contains("moved: its 6 GiB no longer fits node"),
            "{}",
            b.reason
        );
    }

    #[test]
    fn shared_guests_are_bound_only_where_their_memory_fits() {
        let topo = host(2, 2, 16);
        let guests: Vec<Guest> = (0..6).map(|i| normal(&format!("s{i}"), 2, 5)).collect();
        let p = plan(&topo, &nobody_reserved(), &guests);
        assert_eq!(p.mode, Mode::Shared);
        assert_within_capacity(&p);
        for g in &p.guests {
            assert_eq!(
                g.memory_nodes.as_ref().map(Vec::len),
                Some(1),
                "{}",
                g.reason
            );
        }
    }

    #[test]
    fn each_cell_goes_to_a_node_that_holds_its_memory() {
        let topo = host(3, 4, 16);
        // Node 0's memory is taken by a guest pinner leaves alone.
        let other = Guest {
            memory_nodes: Some(set("0")),
            role: Role::OptedOut,
            ..normal("other", 1, 14)
        };
        let cells = Guest {
            cells: vec![set("0-1"), set("2-3")],
            memory: vec![
                vec![MemoryPart {
                    kib: 6 * GIB,
                    kind: PageKind::Normal,
                }];
                2
            ],
            ..normal("cells", 4, 12)
        };
        let p = plan(&topo, &nobody_reserved(), &[other, cells]);
        let g = by_name(&p, "cells");
        let nodes: Vec<u32> = g.cells.iter().flat_map(|c| c.nodes.clone()).collect();
        assert_eq!(nodes, vec![1, 2], "{}", g.reason);
        assert_eq!(g.memory_nodes, Some(vec![1, 2]));
        assert_within_capacity(&p);
    }
}
