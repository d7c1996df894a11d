//! Gentle adoption. Binding a running guest's memory to other nodes makes
//! the kernel move all of it at once, the guest stalled on whatever page it
//! touches meanwhile. So when a pass would bind a guest whose memory is
//! mostly elsewhere (pinner taking over a busy host, observe turned to
//! enforce, a reload that moves guests), its binding waits while its pages
//! are moved there with move_pages(2) at `memory_move_mib_per_sec` for the
//! whole host, one guest at a time, in a thread of its own; the binding,
//! applied after, has nothing left to move. The vCPU pins go at once.

use super::control::Daemon;
use super::Work;
use crate::engine::cpuset::CpuSet;
use crate::engine::reconcile::{Action, DomainActions};
use crate::host::guest_ram::{self, GuestRamError, KernelPageMover, MemoryRange, RatePacer};
use crate::host::guest_stats;
use crate::host::procs::ProcFs;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Below this much memory elsewhere a binding goes at once: the kernel
/// moves that in a blink.
const AT_ONCE_BYTES: u64 = 64 << 20;

const MIB: f64 = (1u64 << 20) as f64;

/// Why a guest's paced memory move stopped (its binding then goes at once).
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("cannot start the mover: {0}")]
    Spawn(std::io::Error),
    #[error("{0}")]
    Pages(std::io::Error),
    #[error("{0}")]
    Elsewhere(#[from] GuestRamError),
}

/// A guest whose memory is to be moved before its binding.
#[derive(Debug, Clone)]
struct Waiting {
    uuid: String,
    name: String,
    nodes: CpuSet,
}

/// The move in progress.
struct Moving {
    guest: Waiting,
    total: u64,
    done: Arc<AtomicU64>,
    started: Instant,
}

/// What adoption remembers between passes.
#[derive(Default)]
pub struct Adoption {
    moving: Option<Moving>,
    waiting: VecDeque<Waiting>,
    /// Guests whose memory is on these nodes now, or could not be moved
    /// there: their binding goes at the next pass.
    settled: HashMap<String, CpuSet>,
}

impl Adoption {
    /// How far a guest's adoption is, for status; None when it has none.
    pub fn note(&self, uuid: &str) -> Option<String> {
        if let Some(m) = self.moving.as_ref().filter(|m| m.guest.uuid == uuid) {
            let done = m.done.load(Ordering::Relaxed) as f64 / MIB;
            return Some(format!(
                "moving its memory to nodes {} before binding it: {done:.0} of {:.0} MiB",
                m.guest.nodes,
                m.total as f64 / MIB
            ));
        }
        let place = self.waiting.iter().position(|w| w.uuid == uuid)?;
        Some(format!(
            "its memory waits to be moved before binding it ({} guests ahead)",
            place + usize::from(self.moving.is_some())
        ))
    }

    /// Forgets guests no longer running.
    pub fn retain(&mut self, running: impl Fn(&str) -> bool) {
        self.waiting.retain(|w| running(&w.uuid));
        self.settled.retain(|uuid, _| running(uuid));
    }

    fn busy_with(&self, uuid: &str) -> bool {
        self.moving.as_ref().is_some_and(|m| m.guest.uuid == uuid)
            || self.waiting.iter().any(|w| w.uuid == uuid)
    }
}

/// Rounds of paced moves, at most: pages the guest was writing (EBUSY) or
/// that moved back meanwhile get another round while over
/// [`AT_ONCE_BYTES`] are still elsewhere.
const ROUNDS: usize = 3;

/// Moves `pid`'s memory elsewhere onto `targets` at `rate` bytes per
/// second, round after round while much is left; says what the kernel
/// would not move in the last round.
fn move_rounds(
    proc: &std::path::Path,
    pid: u32,
    (mut ranges, targets): (Vec<MemoryRange>, &[u32]),
    rate: u64,
    done: &AtomicU64,
) -> Result<String, MoveError> {
    let mut mover = KernelPageMover::new(proc);
    let mut pacer = RatePacer::new(rate);
    let mut summary = String::new();
    for round in 1..=ROUNDS {
        let tally = guest_ram::move_paced(&mut mover, pid, &ranges, targets, &mut pacer, done)
            .map_err(MoveError::Pages)?;
        let (left, bytes) = guest_ram::memory_elsewhere(&ProcFs::new(proc), pid, targets)?;
        summary = format!(
            "{round} rounds; pages the last would not move: {}; {:.0} MiB still elsewhere",
            guest_ram::describe_refused(&tally.refused),
            bytes as f64 / MIB
        );
        if bytes < AT_ONCE_BYTES {
            break;
        }
        ranges = left;
    }
    Ok(summary)
}

impl Daemon {
    /// Holds back the memory binding of each guest in `work` whose memory
    /// is mostly elsewhere, queueing its move; others go as they are.
    pub(super) fn hold_bindings(&mut self, work: &mut [DomainActions]) {
        let rate = self.config.memory_move_mib_per_sec;
        let procfs = ProcFs::new(&self.paths.proc);
        for domain in work.iter_mut() {
            let Some(at) = domain
                .actions
                .iter()
                .position(|a| matches!(a, Action::SetMemoryNodes { .. }))
            else {
                continue;
            };
            let Action::SetMemoryNodes { nodes, .. } = &domain.actions[at] else {
                continue;
            };
            let adoption = &mut self.adoption;
            if adoption.settled.get(&domain.uuid) == Some(nodes) || rate == 0 {
                adoption.settled.remove(&domain.uuid);
                continue;
            }
            if !adoption.busy_with(&domain.uuid) {
                let targets: Vec<u32> = nodes.iter().collect();
                let elsewhere = guest_stats::qemu_pid(&procfs, &domain.uuid, None)
                    .and_then(|pid| guest_ram::memory_elsewhere(&procfs, pid, &targets).ok())
                    .map_or(0, |(_, bytes)| bytes);
                if elsewhere < AT_ONCE_BYTES {
                    continue;
                }
                adoption.waiting.push_back(Waiting {
                    uuid: domain.uuid.clone(),
                    name: domain.name.clone(),
                    nodes: nodes.clone(),
                });
            }
            domain.actions.remove(at);
        }
        self.move_next();
    }

    /// Starts the next waiting guest's move when none is under way.
    fn move_next(&mut self) {
        if self.adoption.moving.is_some() {
            return;
        }
        let procfs = ProcFs::new(&self.paths.proc);
        while let Some(guest) = self.adoption.waiting.pop_front() {
            let targets: Vec<u32> = guest.nodes.iter().collect();
            let found = guest_stats::qemu_pid(&procfs, &guest.uuid, None).and_then(|pid| {
                Some((
                    pid,
                    guest_ram::memory_elsewhere(&procfs, pid, &targets).ok()?,
                ))
            });
            let Some((pid, (ranges, total))) = found else {
                continue;
            };
            let rate = self.config.memory_move_mib_per_sec;
            self.logger.info(
                &format!(
                    "moving {:.0} MiB of its memory to nodes {} at {rate} MiB/s before binding it ({} guests waiting)",
                    total as f64 / MIB,
                    guest.nodes,
                    self.adoption.waiting.len()
                ),
                &[("DOMAIN", &guest.name), ("OP", "memory_move")],
            );
            let done = Arc::new(AtomicU64::new(0));
            self.spawn_move(&guest, pid, (ranges, targets), done.clone());
            self.adoption.moving = Some(Moving {
                guest,
                total,
                done,
                started: Instant::now(),
            });
            return;
        }
    }

    fn spawn_move(
        &self,
        guest: &Waiting,
        pid: u32,
        (ranges, targets): (Vec<MemoryRange>, Vec<u32>),
        done: Arc<AtomicU64>,
    ) {
        let (tx, uuid, proc) = (
            self.work_tx.clone(),
            guest.uuid.clone(),
            self.paths.proc.clone(),
        );
        let rate = self.config.memory_move_mib_per_sec << 20;
        let body = move || {
            let result = move_rounds(&proc, pid, (ranges, &targets), rate, &done);
            let _ = tx.send(Work::MemoryMoved { uuid, result });
        };
        if let Err(e) = std::thread::Builder::new()
            .name("memory-move".into())
            .spawn(body)
        {
            let _ = self.work_tx.send(Work::MemoryMoved {
                uuid: guest.uuid.clone(),
                result: Err(MoveError::Spawn(e)),
            });
        }
    }

    /// A move ended: its guest's binding goes at the next pass (also when
    /// the move failed: then as libvirt moves it), and the next move starts.
    pub(super) fn memory_moved(&mut self, uuid: &str, result: Result<String, MoveError>) {
        let Some(moving) = self.adoption.moving.take_if(|m| m.guest.uuid == uuid) else {
            return;
        };
        let moved = moving.done.load(Ordering::Relaxed) as f64 / MIB;
        let seconds = moving.started.elapsed().as_secs_f64();
        let fields = [
            ("DOMAIN", moving.guest.name.as_str()),
            ("OP", "memory_move"),
        ];
        match result {
            Ok(summary) => self.logger.info(
                &format!(
                    "moved {moved:.0} MiB of its memory to nodes {} in {seconds:.1} s ({summary}); binding it",
                    moving.guest.nodes
                ),
                &fields,
            ),
            Err(e) => self.logger.warn(
                &format!("moving its memory stopped after {moved:.0} MiB: {e}; binding it at once"),
                &fields,
            ),
        }
        self.adoption
            .settled
            .insert(moving.guest.uuid.clone(), moving.guest.nodes.clone());
        self.schedule.coalescer.changed(Instant::now());
    }
}
