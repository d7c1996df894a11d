//! Each guest NUMA cell's memory on its cell's node. libvirt can bind a
//! running guest's memory only as a whole (to the union of its cells'
//! nodes), and a cgroup's cpuset.mems moves the whole process's pages, so
//! after a pass placed the cells' vCPUs the pages of each cell's RAM that
//! sit on another node are moved with move_pages(2): a bounded range per
//! pass, so a large guest never stalls the daemon, the next pass going on
//! where this one stopped; later passes move pages that drifted there
//! (first touched by another cell's vCPU).

use super::control::Daemon;
use crate::engine::domain::DomainSpec;
use crate::engine::placement::{GuestPlan, Plan};
use crate::host::guest_ram::{self, CellRam, PageMover};
use crate::host::guest_stats::{self, memory_split, GuestSample, MappingPages};
use crate::host::procs::ProcFs;
use pinner_shared::log::Level;
use pinner_shared::protocol::CellStatus;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

/// Address range handed to move_pages(2) in one pass, all guests together:
/// about a second of page copying at worst.
const PASS_BUDGET: u64 = 1 << 30;
/// A pass that left a cell half moved asks for the next this soon.
const GO_ON_AFTER: Duration = Duration::from_secs(1);

/// One cell's move in progress, across passes.
#[derive(Debug, Default, Clone)]
struct Round {
    /// The qemu and the cell's RAM it began on: a guest started again
    /// meanwhile begins anew.
    pid: u32,
    ram: (u64, u64),
    /// Where the next pass goes on.
    at: u64,
    /// Pages on other nodes when the round began (numa_maps).
    off_node: u64,
    /// Pages the kernel refused to move so far, by status.
    refused: BTreeMap<i32, u64>,
    /// Pages faulted in first (hidden by NUMA balancing).
    faulted_in: u64,
}

/// What one pass did with one cell's memory.
enum Step {
    /// Nothing to move.
    Idle,
    /// Moved part of it; the next pass goes on.
    Going,
    Failed(std::io::Error),
    /// The round is done.
    Done(Round),
}

/// What cell memory placement remembers between passes.
pub struct CellMemory {
    mover: Box<dyn PageMover + Send>,
    /// (guest UUID, cell) → its unfinished move.
    rounds: HashMap<(String, u32), Round>,
    /// (guest UUID, cell) moved once: later rounds (drift) log at debug.
    moved_before: HashSet<(String, u32)>,
    /// (guest UUID, cell) → its qemu and the pages still elsewhere after
    /// its last round (the kernel would not move them): a new round starts
    /// only for more.
    left_elsewhere: HashMap<(String, u32), (u32, u64)>,
    /// Guests whose cells could not be located or moved: logged once.
    failing: HashSet<String>,
}

impl CellMemory {
    pub fn new(mover: Box<dyn PageMover + Send>) -> CellMemory {
        CellMemory {
            mover,
            rounds: HashMap::new(),
            moved_before: HashSet::new(),
            left_elsewhere: HashMap::new(),
            failing: HashSet::new(),
        }
    }

    /// One pass's part of a cell's move: goes on with the round begun
    /// before (same qemu, same RAM), or begins one when numa_maps shows
    /// pages elsewhere (more than the last round left there), within
    /// `budget`, which it spends.
    fn step(
        &mut self,
        key: &(String, u32),
        pid: u32,
        (ram, node): (&CellRam, u32),
        pages: Option<&MappingPages>,
        budget: &mut u64,
    ) -> Step {
        let ram_span = (ram.start, ram.len);
        let begun = self.rounds.remove(key);
        let left = match self.left_elsewhere.get(key) {
            Some(&(left_pid, off)) if left_pid == pid => off,
            _ => 0,
        };
        let mut round = match begun.filter(|r| r.pid == pid && r.ram == ram_span) {
            Some(round) => round,
            None => match pages.map_or(0, |p| memory_split(&p.nodes, &[node]).1) {
                off if off <= left => return Step::Idle,
                off_node => Round {
                    pid,
                    ram: ram_span,
                    at: ram.start,
                    off_node,
                    ..Round::default()
                },
            },
        };
        let end = ram.start + ram.len;
        let page_size = pages.map_or(4096, |p| p.page_size);
        let span = (round.at, end);
        let tally =
            match guest_ram::move_range(&mut *self.mover, pid, span, page_size, node, *budget) {
                Ok(tally) => tally,
                Err(e) => return Step::Failed(e),
            };
        *budget = budget.saturating_sub(tally.resume_at.unwrap_or(end) - round.at);
        round.faulted_in += tally.faulted_in;
        for (status, count) in tally.refused {
            *round.refused.entry(status).or_insert(0) += count;
        }
        match tally.resume_at {
            Some(at) => {
                round.at = at;
                self.rounds.insert(key.clone(), round);
                Step::Going
            }
            None => Step::Done(round),
        }
    }

    /// Remembers what a finished round left elsewhere (`now`: pages on the
    /// node, elsewhere), so those alone start no new round.
    fn settle(&mut self, key: &(String, u32), pid: u32, now: Option<(u64, u64)>) {
        match now {
            Some((_, off)) if off > 0 => self.left_elsewhere.insert(key.clone(), (pid, off)),
            _ => self.left_elsewhere.remove(key),
        };
    }

    fn retain_running(&mut self, specs: &[DomainSpec]) {
        let running = |uuid: &String| specs.iter().any(|s| &s.uuid == uuid);
        self.rounds.retain(|(uuid, _), _| running(uuid));
        self.moved_before.retain(|(uuid, _)| running(uuid));
        self.left_elsewhere.retain(|(uuid, _), _| running(uuid));
        self.failing.retain(running);
    }
}

/// The cells whose memory goes to one node: (cell, node). Only for a guest
/// whose memory binding is pinner's whole-guest one (not bound cell by cell
/// by its owner, not interleaved or preferred: those modes say where pages
/// go themselves), and only to nodes the live binding already allows (the
/// kernel refuses others).
pub fn cell_targets(spec: &DomainSpec, gp: &GuestPlan) -> Vec<(u32, u32)> {
    let whole_binding = matches!(
        spec.memory_mode.as_deref(),
        None | Some("strict" | "restrictive")
    );
    let Some(bound) = spec.memory_nodes.as_ref() else {
        return Vec::new();
    };
    // Memory no set of nodes holds is not pushed onto the cells' nodes.
    if gp.cells.len() < 2 || spec.cell_memory_bound || !whole_binding || gp.memory_unbound {
        return Vec::new();
    }
    gp.cells
        .iter()
        .filter_map(|c| match c.nodes[..] {
            [node] if bound.contains(node) => Some((cell_id(spec, c.cell), node)),
            _ => None,
        })
        .collect()
}

impl Daemon {
    /// Moves the cells' off-node pages of every guest the plan placed cell
    /// by cell, within the pass's budget; each such guest is read from
    /// /proc afresh (a move in progress changes where its pages are).
    pub(super) fn place_cell_memory(&mut self, specs: &[DomainSpec], plan: &Plan) {
        self.cells.retain_running(specs);
        if !self.config.move_cell_memory {
            return;
        }
        let procfs = ProcFs::new(&self.paths.proc);
        let mut budget = PASS_BUDGET;
        for gp in &plan.guests {
            let Some(spec) = specs.iter().find(|s| s.uuid == gp.uuid) else {
                continue;
            };
            let targets = cell_targets(spec, gp);
            if targets.is_empty() || budget == 0 {
                continue;
            }
            let Some(sample) = self.observer.sample_fresh(&procfs, &gp.uuid) else {
                continue;
            };
            let Some(rams) = self.located(&procfs, spec, sample.pid) else {
                continue;
            };
            for (cell, node) in targets {
                if let Some(ram) = rams.iter().find(|r| r.cell == cell) {
                    let pages = sample.mappings.get(&ram.start);
                    budget = self.move_cell(spec, sample.pid, (ram, node), pages, budget);
                }
            }
        }
        if !self.cells.rounds.is_empty() {
            let now = Instant::now();
            self.schedule.coalescer.retry_at(now + GO_ON_AFTER, now);
        }
    }

    /// The guest's cells' RAM; a failure is logged once per guest.
    fn located(&mut self, procfs: &ProcFs, spec: &DomainSpec, pid: u32) -> Option<Vec<CellRam>> {
        match guest_ram::cell_ram(procfs, pid) {
            Ok(rams) => Some(rams),
            Err(e) => {
                self.warn_once(spec, &format!("cells' memory not moved: {e}"));
                None
            }
        }
    }

    fn warn_once(&mut self, spec: &DomainSpec, message: &str) {
        if self.cells.failing.insert(spec.uuid.clone()) {
            let fields = [("DOMAIN", spec.name.as_str()), ("OP", "move_memory")];
            self.logger.warn(message, &fields);
        }
    }

    /// Moves one cell's pages to `node` (see [`CellMemory::step`]), and
    /// when its round is done logs it with where the pages are now.
    /// Returns the budget left.
    fn move_cell(
        &mut self,
        spec: &DomainSpec,
        pid: u32,
        (ram, node): (&CellRam, u32),
        pages: Option<&MappingPages>,
        mut budget: u64,
    ) -> u64 {
        let key = (spec.uuid.clone(), ram.cell);
        match self.cells.step(&key, pid, (ram, node), pages, &mut budget) {
            Step::Idle | Step::Going => {}
            Step::Failed(e) => {
                let message = format!("cell {}'s memory not moved to node {node}: {e}", ram.cell);
                self.warn_once(spec, &message);
            }
            Step::Done(round) => {
                let procfs = ProcFs::new(&self.paths.proc);
                let now = guest_stats::numa_mappings(&procfs, pid)
                    .ok()
                    .and_then(|m| m.get(&ram.start).map(|p| memory_split(&p.nodes, &[node])));
                self.cells.settle(&key, pid, now);
                self.log_moved(spec, key, node, &round, now);
            }
        }
        budget
    }

    /// Logs a finished round with where the cell's pages are now (on the
    /// node, elsewhere), read back from numa_maps.
    fn log_moved(
        &mut self,
        spec: &DomainSpec,
        key: (String, u32),
        node: u32,
        round: &Round,
        now: Option<(u64, u64)>,
    ) {
        let cell = key.1;
        let level = if self.cells.moved_before.insert(key) {
            Level::Info
        } else {
            Level::Debug
        };
        let now = now.map_or_else(
            || "where they are now is unknown".to_string(),
            |(on, off)| format!("now {on} there and {off} elsewhere"),
        );
        let message = format!(
            "cell {cell}'s memory moved to node {node}: {} pages were elsewhere, {now}; \
             faulted in first (hidden by NUMA balancing): {}; addresses the kernel refused: {}",
            round.off_node,
            round.faulted_in,
            guest_ram::describe_refused(&round.refused)
        );
        let (cell, node) = (cell.to_string(), node.to_string());
        let fields = [
            ("DOMAIN", spec.name.as_str()),
            ("OP", "move_memory"),
            ("CELL", cell.as_str()),
            ("NODE", node.as_str()),
        ];
        self.logger.log(level, &message, &fields);
    }

    /// What status shows of a guest's cells (two or more): each one's
    /// node and where its RAM's pages are.
    pub(super) fn cell_status(
        &self,
        spec: &DomainSpec,
        gp: &GuestPlan,
        sample: Option<&GuestSample>,
    ) -> Vec<CellStatus> {
        if spec.cells.len() < 2 {
            return Vec::new();
        }
        let procfs = ProcFs::new(&self.paths.proc);
        let rams = sample
            .and_then(|s| guest_ram::cell_ram(&procfs, s.pid).ok())
            .unwrap_or_default();
        (0..spec.cells.len() as u32)
            .map(|position| {
                let (cell, node) = (cell_id(spec, position), cell_node(gp, position));
                let mut status = CellStatus {
                    cell,
                    node,
                    ..CellStatus::default()
                };
                if let Some(ram) = rams.iter().find(|r| r.cell == cell) {
                    let pages = sample.and_then(|s| s.mappings.get(&ram.start));
                    let (on, off) =
                        pages.map_or((0, 0), |p| memory_split(&p.nodes, node.as_slice()));
                    status.ram_address = Some(ram.start);
                    status.ram_bytes = Some(ram.len);
                    status.pages_on_node = Some(on);
                    status.pages_elsewhere = Some(off);
                }
                status
            })
            .collect()
    }
}

/// The id of the cell at `position` in the plan's order (ids, not
/// positions, name a cell's memory in qemu).
fn cell_id(spec: &DomainSpec, position: u32) -> u32 {
    spec.cell_ids
        .get(position as usize)
        .copied()
        .unwrap_or(position)
}

/// The host node of the vCPUs of the cell at `position`: its own in the
/// plan, else the guest's one node (a host of one node places no cells);
/// None when it spans nodes.
fn cell_node(gp: &GuestPlan, position: u32) -> Option<u32> {
    let nodes = match gp.cells.iter().find(|c| c.cell == position) {
        Some(c) => &c.nodes[..],
        None if gp.cells.is_empty() => &gp.numa_nodes[..],
        None => &[],
    };
    match nodes {
        [node] => Some(*node),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpuset::CpuSet;
    use crate::engine::placement::{CellPlan, Placement};

    fn guest(cells: &[&[u32]]) -> GuestPlan {
        GuestPlan {
            cells: cells
                .iter()
                .enumerate()
                .map(|(i, nodes)| CellPlan {
                    cell: i as u32,
                    nodes: nodes.to_vec(),
                    reason: String::new(),
                })
                .collect(),
            name: "g".into(),
            uuid: "u".into(),
            placement: Placement::Dedicated,
            vcpus: Vec::new(),
            emulator: CpuSet::new(),
            numa_nodes: Vec::new(),
            memory_nodes: None,
            memory: Vec::new(),
            memory_unbound: false,
            reason: String::new(),
        }
    }

    fn bound(nodes: &str, mode: Option<&str>) -> DomainSpec {
        DomainSpec {
            memory_nodes: Some(CpuSet::parse(nodes).unwrap()),
            memory_mode: mode.map(str::to_string),
            ..DomainSpec::default()
        }
    }

    /// Moves every page it is asked to; records the pages of each call.
    struct Mover(Calls);

    impl PageMover for Mover {
        fn move_to(&mut self, _pid: u32, pages: &[u64], node: u32) -> std::io::Result<Vec<i32>> {
            self.0.lock().unwrap().push(pages.to_vec());
            Ok(vec![node as i32; pages.len()])
        }
        fn fault_in(&mut self, _pid: u32, _pages: &[u64]) -> usize {
            0
        }
        fn present(&mut self, _pid: u32, _first: u64, count: usize) -> Vec<bool> {
            vec![true; count]
        }
        fn where_are(&mut self, _pid: u32, pages: &[u64]) -> std::io::Result<Vec<i32>> {
            Ok(vec![0; pages.len()])
        }
    }

    type Calls = std::sync::Arc<std::sync::Mutex<Vec<Vec<u64>>>>;

    /// Cell memory with a [`Mover`], and the calls it records.
    fn recording() -> (CellMemory, Calls) {
        let calls = Calls::default();
        (CellMemory::new(Box::new(Mover(calls.clone()))), calls)
    }

    fn ram(cell: u32, start: u64, pages: u64) -> CellRam {
        CellRam {
            cell,
            start,
            len: pages * 4096,
        }
    }

    fn elsewhere(pages: u64) -> MappingPages {
        MappingPages {
            nodes: BTreeMap::from([(0, pages)]),
            page_size: 4096,
            guest_memory: true,
        }
    }

    #[test]
    fn a_move_goes_on_over_passes_and_begins_again_only_for_more_drift() {
        let (mut cells, calls) = recording();
        let key = ("u".to_string(), 1);
        let ram = ram(1, 0x1000_0000, 12);
        let target = (&ram, 1);
        let pages = elsewhere(12);
        let mut budget = 8 * 4096;
        let step = cells.step(&key, 7, target, Some(&pages), &mut budget);
        assert!(matches!(step, Step::Going) && budget == 0);
        let mut budget = 8 * 4096;
        let Step::Done(round) = cells.step(&key, 7, target, Some(&pages), &mut budget) else {
            panic!("the second pass finishes the round");
        };
        assert_eq!((round.off_node, budget), (12, 4 * 4096));
        let moved: Vec<u64> = calls.lock().unwrap().concat();
        let all: Vec<u64> = (0..12).map(|i| ram.start + i * 4096).collect();
        assert_eq!(moved, all, "every page once, in order");
        // Two pages the kernel kept elsewhere begin no new round...
        cells.settle(&key, 7, Some((10, 2)));
        let mut budget = u64::MAX;
        let step = cells.step(&key, 7, target, Some(&elsewhere(2)), &mut budget);
        assert!(matches!(step, Step::Idle));
        // ...a third (drift) does, and so do two in a qemu started again.
        let step = cells.step(&key, 7, target, Some(&elsewhere(3)), &mut budget);
        assert!(matches!(step, Step::Done(_)));
        cells.settle(&key, 7, Some((10, 2)));
        let step = cells.step(&key, 8, target, Some(&elsewhere(2)), &mut budget);
        assert!(matches!(step, Step::Done(_)));
    }

    #[test]
    fn a_round_of_a_guest_started_again_begins_at_its_new_ram() {
        let (mut cells, calls) = recording();
        let key = ("u".to_string(), 0);
        let old = ram(0, 0x7000_0000, 8);
        let mut budget = 4 * 4096;
        let step = cells.step(&key, 7, (&old, 1), Some(&elsewhere(8)), &mut budget);
        assert!(matches!(step, Step::Going));
        // Started again: another qemu, its RAM lower down.
        let new = ram(0, 0x6000_0000, 8);
        let mut budget = u64::MAX;
        let step = cells.step(&key, 9, (&new, 1), Some(&elsewhere(8)), &mut budget);
        assert!(matches!(step, Step::Done(_)));
        let last = calls.lock().unwrap().last().unwrap().clone();
        assert_eq!(last[0], new.start, "from the new RAM's start");
        assert_eq!(last.len(), 8);
    }

    #[test]
    fn each_cell_on_one_node_of_the_binding_is_a_target() {
        let gp = guest(&[&[1], &[0]]);
        assert_eq!(
            cell_targets(&bound("0-1", Some("strict")), &gp),
            [(0, 1), (1, 0)]
        );
        assert_eq!(cell_targets(&bound("0-1", None), &gp), [(0, 1), (1, 0)]);
        // The binding does not allow node 0 yet: only cell 0 moves.
        assert_eq!(cell_targets(&bound("1", Some("strict")), &gp), [(0, 1)]);
        // Cell 0's vCPUs are offline: the plan's first cell is cell 1.
        let mut spec = bound("0-1", None);
        spec.cell_ids = vec![1, 2];
        assert_eq!(cell_targets(&spec, &gp), [(1, 1), (2, 0)]);
    }

    #[test]
    fn cells_spanning_nodes_and_guests_bound_otherwise_are_left_alone() {
        let spanning = guest(&[&[0], &[1, 2]]);
        assert_eq!(cell_targets(&bound("0-2", None), &spanning), [(0, 0)]);
        let gp = guest(&[&[0], &[1]]);
        assert!(cell_targets(&bound("0-1", Some("interleave")), &gp).is_empty());
        assert!(cell_targets(&bound("0-1", Some("preferred")), &gp).is_empty());
        let mut by_owner = bound("0-1", Some("strict"));
        by_owner.cell_memory_bound = true;
        assert!(cell_targets(&by_owner, &gp).is_empty());
        let unbound = GuestPlan {
            memory_unbound: true,
            ..gp.clone()
        };
        assert!(
            cell_targets(&bound("0-1", None), &unbound).is_empty(),
            "memory that fits no set of nodes stays where it is"
        );
        let unbound = DomainSpec::default();
        assert!(cell_targets(&unbound, &gp).is_empty());
        assert!(cell_targets(&bound("0-1", None), &guest(&[&[0]])).is_empty());
    }
}
