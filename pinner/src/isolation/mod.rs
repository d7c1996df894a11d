//! Host isolation: host processes confined to the reserved (housekeeping)
//! CPUs, so guests' CPUs are theirs alone.
//!
//! Two mechanisms. A housekeeping cgroup of pinner's (cgroup v1's cpuset and,
//! with a memory limit, memory hierarchy; or the unified hierarchy when no
//! systemd runs) into which host processes are moved, their original groups
//! recorded so `undo` can put them back. Or, on a unified hierarchy run by
//! systemd, `AllowedCPUs=` (and `MemoryMax=`) on `system.slice`,
//! `user.slice` and `init.scope` as runtime properties, which services
//! started later inherit.
//!
//! With `steer_irqs`, device interrupts go to the reserved CPUs as well
//! (`irqs`), each IRQ's CPUs recorded so undo restores them exactly.
//!
//! Every operation takes a lock file, so the daemon's keeper and the CLI
//! never interleave, and keeps its state (groups, origins, failures) in a
//! JSON file beside the daemon's socket: its presence is what "isolation
//! is active" means.

pub mod classify;
pub mod irqs;
pub mod keeper;
pub mod pidwatch;
pub mod state;
pub mod systemd;

pub use classify::{classify, Verdict};
pub use pidwatch::PidFileWatch;
pub use systemd::{Systemctl, Systemd, SYSTEMD_UNITS};

use crate::config::IsolationConfig;
use crate::engine::cpuset::CpuSet;
use crate::engine::topology::Topology;
use crate::host::cgroupfs::{self, CgroupError, Group, Layout, Limits};
use crate::host::procs::{ProcFs, Process};
use irqs::{IrqHost, IrqState, IrqStatus, Restored, Steered};
use serde::{Deserialize, Serialize};
use state::{Origin, State, StateError};
use std::path::{Path, PathBuf};
use systemd::SystemdError;

/// Moving processes out of a group while they fork may need a few rounds.
const UNDO_ROUNDS: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    #[error("isolation needs reserved_cpus: the CPUs host processes are confined to")]
    NoReservedCpus,
    #[error("no cgroup hierarchy with the cpuset controller is mounted")]
    NoCpusetHierarchy,
    #[error("isolation was set through systemd, which is not running now")]
    SystemdGone,
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Systemd(#[from] SystemdError),
    #[error(transparent)]
    State(#[from] StateError),
    /// The group could not be removed after every round of moving its
    /// processes out.
    #[error("{0} (processes keep entering it; state kept, run again)")]
    StillInUse(CgroupError),
    /// The state could not be saved, so what this round did was taken
    /// back: the host stays as the recorded state says.
    #[error("not recorded, so taken back: {error}; {undone}{}", left_text(.left))]
    NotRecorded {
        error: StateError,
        /// What was put back, in words ("3 processes confined and IRQs 9, 24 steered just now put back").
        undone: String,
        /// What could not be put back.
        left: Vec<String>,
    },
}

fn left_text(left: &[String]) -> String {
    if left.is_empty() {
        String::new()
    } else {
        format!("; could not put back: {}", left.join(", "))
    }
}

/// What isolation touches: the process table, the cgroup layout, systemd
/// (when it runs the host) and where state is kept.
pub struct System {
    pub procs: ProcFs,
    pub layout: Option<Layout>,
    pub systemd: Option<Box<dyn Systemd + Send>>,
    /// /proc/irq (None: IRQs are not this system's to steer).
    pub irqs: Option<IrqHost>,
    pub state_dir: PathBuf,
}

impl System {
    /// This host, with state kept in `state_dir` (the socket's directory).
    pub fn host(state_dir: &Path) -> System {
        let layout = std::fs::read_to_string("/proc/mounts")
            .ok()
            .and_then(|m| Layout::detect(&m));
        // sd_booted(3): systemd runs this host.
        let systemd: Option<Box<dyn Systemd + Send>> = Path::new("/run/systemd/system")
            .is_dir()
            .then(|| Box::new(Systemctl) as Box<dyn Systemd + Send>);
        System {
            procs: ProcFs::new("/proc"),
            layout,
            systemd,
            irqs: Some(IrqHost::host()),
            state_dir: state_dir.to_path_buf(),
        }
    }

    fn mechanism(&self) -> Result<Mechanism<'_>, IsolationError> {
        match (&self.layout, &self.systemd) {
            (Some(Layout::V2 { .. }), Some(_)) => Ok(Mechanism::Systemd),
            (Some(layout), _) => Ok(Mechanism::Group(layout)),
            (None, _) => Err(IsolationError::NoCpusetHierarchy),
        }
    }
}

enum Mechanism<'a> {
    Group(&'a Layout),
    Systemd,
}

/// Isolation settings resolved against the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub config: IsolationConfig,
    pub reserved: CpuSet,
    /// Memory nodes of the reserved CPUs (empty when the host has none).
    pub mems: CpuSet,
    /// The online CPUs outside the reserved ones: the guests'.
    pub guest_cpus: CpuSet,
}

impl Settings {
    pub fn new(config: &IsolationConfig, reserved: &CpuSet, topology: &Topology) -> Settings {
        let mems = topology
            .cpus
            .iter()
            .filter(|c| reserved.contains(c.id))
            .filter_map(|c| c.numa_node)
            .collect();
        let online: CpuSet = topology
            .cpus
            .iter()
            .filter(|c| c.online)
            .map(|c| c.id)
            .collect();
        Settings {
            config: config.clone(),
            reserved: reserved.clone(),
            mems,
            guest_cpus: online.difference(reserved),
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            cpus: self.reserved.clone(),
            mems: self.mems.clone(),
            memory_bytes: self.config.memory_limit,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRef {
    pub pid: u32,
    pub name: String,
}

impl ProcessRef {
    pub fn of(p: &Process) -> ProcessRef {
        ProcessRef {
            pid: p.pid,
            name: p.comm.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub pid: u32,
    pub name: String,
    pub error: String,
}

/// The outcome of confining processes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Sweep {
    pub moved: Vec<ProcessRef>,
    pub failed: Vec<Failure>,
    pub irqs: Steered,
}

/// A group name pinner makes and removes: one plain directory name.
pub fn valid_group_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.')
}

/// Starts (or updates) isolation and confines every host process now.
pub fn isolate(sys: &mut System, settings: &Settings) -> Result<Sweep, IsolationError> {
    if settings.reserved.is_empty() {
        return Err(IsolationError::NoReservedCpus);
    }
    let _lock = sys.lock()?;
    let before = sys.load_state()?;
    let mut state = before.clone().unwrap_or_else(|| State {
        mechanism: String::new(),
        reserved: String::new(),
        group: settings.config.group.clone(),
        with_memory: false,
        units: Vec::new(),
        origins: Vec::new(),
        failures: Vec::new(),
        irqs: Default::default(),
    });
    state.reserved = settings.reserved.to_string();
    state.failures.clear();
    let mut sweep = match sys.mechanism()? {
        Mechanism::Systemd => {
            let properties = systemd::properties(settings);
            let systemd = sys.systemd.as_mut().expect("systemd mechanism has systemd");
            let mut done = Vec::new();
            for unit in SYSTEMD_UNITS {
                if let Err(e) = systemd.set_properties(unit, &properties) {
                    // Nothing half-applied: take back what was set.
                    let _ = reset_units(systemd.as_mut(), sys.layout.as_ref(), &done);
                    return Err(e.into());
                }
                done.push(unit.to_string());
            }
            state.mechanism = "systemd".into();
            state.units = SYSTEMD_UNITS.iter().map(|u| u.to_string()).collect();
            Sweep::default()
        }
        Mechanism::Group(layout) => {
            let group = Group::new(
                layout,
                &settings.config.group,
                settings.config.memory_limit.is_some(),
            );
            group.create(layout, &settings.limits())?;
            state.mechanism = layout.name().into();
            state.group = group.name.clone();
            state.with_memory = settings.config.memory_limit.is_some();
            confine(sys, &settings.config, &group, &mut state, None)
        }
    };
    sweep.irqs = steer_irqs(sys, &settings.config, &settings.reserved, &mut state);
    if let Err(mut e) = record(sys, before.as_ref(), &state, &sweep) {
        let set_now = before.is_none_or(|b| b.mechanism != "systemd");
        if let (true, true, Some(systemd)) =
            (state.mechanism == "systemd", set_now, sys.systemd.as_mut())
        {
            let reset = reset_units(systemd.as_mut(), sys.layout.as_ref(), &state.units);
            if let (Err(failed), IsolationError::NotRecorded { left, .. }) = (reset, &mut e) {
                left.push(format!("systemd's AllowedCPUs ({failed})"));
            }
        }
        return Err(e);
    }
    Ok(sweep)
}

/// Saves `state`. When it cannot be saved, takes back what this round did
/// beyond `before` (the state on disk): the processes it moved and the
/// IRQs it steered first; and says what could not be taken back.
fn record(
    sys: &System,
    before: Option<&State>,
    state: &State,
    sweep: &Sweep,
) -> Result<(), IsolationError> {
    let Err(error) = sys.save_state(state) else {
        return Ok(());
    };
    let mut left = Vec::new();
    let mut undone = 0;
    let group = sys.layout.as_ref().filter(|_| state.mechanism != "systemd");
    if let Some(layout) = group {
        let group = Group::new(layout, &state.group, state.with_memory);
        for p in &sweep.moved {
            if restore(sys, &group, &state.origins, p.pid) {
                undone += 1;
            } else {
                left.push(format!("{}[{}]", p.name, p.pid));
            }
        }
        // No state before: the group is this round's too.
        if before.is_none() {
            if let Err(e) = group.remove() {
                left.push(format!("the group {} ({e})", group.name));
            }
        }
    }
    let before_irqs = before.map(|b| b.irqs.clone()).unwrap_or_default();
    let steered_now = IrqState {
        origins: state
            .irqs
            .origins
            .iter()
            .filter(|o| !before_irqs.origins.iter().any(|b| b.irq == o.irq))
            .cloned()
            .collect(),
        default_mask: before_irqs
            .default_mask
            .is_none()
            .then(|| state.irqs.default_mask.clone())
            .flatten(),
        ..IrqState::default()
    };
    if let Some(host) = &sys.irqs {
        left.extend(irqs::restore(&host.table, &steered_now).failed);
    }
    let irqs: Vec<u32> = steered_now.origins.iter().map(|o| o.irq).collect();
    let processes = if undone == 1 { "process" } else { "processes" };
    let undone = match irqs.as_slice() {
        [] => format!("{undone} {processes} confined just now put back"),
        irqs => format!(
            "{undone} {processes} confined and IRQs {} steered just now put back",
            irqs::irq_list(irqs, ", ")
        ),
    };
    Err(IsolationError::NotRecorded {
        error,
        undone,
        left,
    })
}

/// Steers IRQs when the config says so; when it no longer does, puts back
/// those an earlier run steered.
fn steer_irqs(
    sys: &System,
    config: &IsolationConfig,
    reserved: &CpuSet,
    state: &mut State,
) -> Steered {
    let Some(host) = &sys.irqs else {
        return Steered::default();
    };
    if config.steers_irqs() {
        return irqs::steer(&host.table, reserved, &mut state.irqs);
    }
    if state.irqs != Default::default() {
        let restored = irqs::restore(&host.table, &state.irqs);
        state.irqs = Default::default();
        return Steered {
            failed: restored.failed,
            ..Steered::default()
        };
    }
    Steered::default()
}

/// Confines processes that are not yet (all, or just `only`), when
/// isolation is active; None when it is not. A full sweep (no `only`) also
/// steers IRQs that appeared or were moved back since.
pub fn keep(
    sys: &System,
    config: &IsolationConfig,
    only: Option<u32>,
) -> Result<Option<Sweep>, IsolationError> {
    let _lock = sys.lock()?;
    let Some(mut state) = sys.load_state()? else {
        return Ok(None);
    };
    let layout = sys.layout.as_ref().filter(|_| state.mechanism != "systemd");
    let group = layout.map(|l| Group::new(l, &state.group, state.with_memory));
    if group.as_ref().is_some_and(|g| !g.exists()) {
        return Ok(None);
    }
    let before = state.clone();
    let steered = match (only, CpuSet::parse(&state.reserved)) {
        (None, Ok(reserved)) => steer_irqs(sys, config, &reserved, &mut state),
        _ => Steered::default(),
    };
    let mut sweep = match &group {
        Some(group) => confine(sys, config, group, &mut state, only),
        // systemd's units are inherited by what starts later: nothing to keep.
        None => Sweep::default(),
    };
    sweep.irqs = steered;
    // Written only when something changed: the sweep runs every few seconds.
    if state != before {
        record(sys, Some(&before), &state, &sweep)?;
    }
    Ok(Some(sweep))
}

fn confine(
    sys: &System,
    config: &IsolationConfig,
    group: &Group,
    state: &mut State,
    only: Option<u32>,
) -> Sweep {
    let pids = match only {
        Some(pid) => vec![pid],
        None => sys.procs.pids(),
    };
    let mut sweep = Sweep::default();
    for pid in pids {
        let Some(p) = sys.procs.process(pid) else {
            continue;
        };
        // A process that refused once is reported, not retried every sweep
        // (`pinner isolate` retries it).
        if classify(&p, config, group) != Verdict::Move
            || state.failures.iter().any(|f| f.pid == pid)
        {
            continue;
        }
        if !state
            .origins
            .iter()
            .any(|o| o.pid == pid && o.start_time == p.start_time)
        {
            state.origins.retain(|o| o.pid != pid);
            state.origins.push(Origin {
                pid,
                start_time: p.start_time,
                groups: group
                    .parts
                    .iter()
                    .filter_map(|(h, _)| {
                        Some((h.mount.clone(), p.cgroup(h.controller)?.to_string()))
                    })
                    .collect(),
            });
        }
        match group.admit(pid) {
            Ok(()) => sweep.moved.push(ProcessRef::of(&p)),
            Err(CgroupError::Exited) => {}
            Err(error) => {
                let failure = Failure {
                    pid,
                    name: p.comm.clone(),
                    error: error.to_string(),
                };
                state.failures.push(failure.clone());
                sweep.failed.push(failure);
            }
        }
    }
    if only.is_none() {
        // Forget processes that are gone, so the state stays the host's size.
        state.origins.retain(|o| {
            sys.procs
                .process(o.pid)
                .is_some_and(|p| p.start_time == o.start_time)
        });
        state
            .failures
            .retain(|f| sys.procs.process(f.pid).is_some());
    }
    sweep
}

/// The outcome of undoing isolation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Undo {
    pub restored: usize,
    pub removed_groups: Vec<String>,
    pub reset_units: Vec<String>,
    pub irqs: Restored,
}

impl Undo {
    /// "put 3 processes back; removed /pinner-housekeeping; restored 19 IRQs".
    pub fn summary(&self) -> String {
        let mut out = format!("put {} processes back", self.restored);
        if !self.removed_groups.is_empty() {
            out += &format!("; removed {}", self.removed_groups.join(", "));
        }
        if !self.reset_units.is_empty() {
            out += &format!("; reset AllowedCPUs of {}", self.reset_units.join(", "));
        }
        if self.irqs.restored + self.irqs.gone > 0 {
            out += &format!("; restored {} IRQs", self.irqs.restored);
        }
        if self.irqs.gone > 0 {
            out += &format!(" ({} gone with their device)", self.irqs.gone);
        }
        out
    }
}

/// Puts every confined process back where it was and removes the groups
/// (or resets systemd's properties). Without state, removes a leftover
/// group named in `config` all the same.
pub fn undo(sys: &mut System, config: &IsolationConfig) -> Result<Undo, IsolationError> {
    let _lock = sys.lock()?;
    let state = sys.load_state()?;
    let mut result = Undo::default();
    if let (Some(host), Some(state)) = (&sys.irqs, &state) {
        result.irqs = irqs::restore(&host.table, &state.irqs);
    }
    if let Some(state) = state.as_ref().filter(|s| s.mechanism == "systemd") {
        let systemd = sys.systemd.as_mut().ok_or(IsolationError::SystemdGone)?;
        reset_units(systemd.as_mut(), sys.layout.as_ref(), &state.units)?;
        result.reset_units = state.units.clone();
    } else if let Some(layout) = &sys.layout {
        let (name, with_memory) = state.as_ref().map_or((config.group.as_str(), true), |s| {
            (s.group.as_str(), s.with_memory)
        });
        let group = Group::new(layout, name, with_memory);
        let origins = state.as_ref().map_or(&[][..], |s| &s.origins[..]);
        let mut last_error = None;
        for _ in 0..UNDO_ROUNDS {
            for pid in group.members() {
                if restore(sys, &group, origins, pid) {
                    result.restored += 1;
                }
            }
            match group.remove() {
                Ok(()) => {
                    last_error = None;
                    break;
                }
                Err(e) => last_error = Some(e),
            }
        }
        if let Some(e) = last_error {
            return Err(IsolationError::StillInUse(e));
        }
        result.removed_groups = group
            .parts
            .iter()
            .map(|(_, dir)| dir.display().to_string())
            .collect();
    }
    sys.remove_state()?;
    Ok(result)
}

/// Takes pinner's properties off systemd `units`, then empties the cpusets
/// systemd leaves at their last value once it no longer manages them (it
/// does while libvirt keeps the controller on for machine.slice).
fn reset_units(
    systemd: &mut (dyn Systemd + Send),
    layout: Option<&Layout>,
    units: &[String],
) -> Result<(), IsolationError> {
    systemd.reset(units)?;
    if let Some(Layout::V2 { root }) = layout {
        for unit in units {
            cgroupfs::clear_cpuset(&root.dir(unit))?;
        }
    }
    Ok(())
}

/// Moves `pid` out of `group` in each hierarchy: back to its recorded group
/// when that still exists, else to the hierarchy's root.
fn restore(sys: &System, group: &Group, origins: &[Origin], pid: u32) -> bool {
    let start_time = sys.procs.process(pid).map(|p| p.start_time);
    let origin = origins
        .iter()
        .find(|o| o.pid == pid && Some(o.start_time) == start_time);
    let mut moved = false;
    for (hierarchy, _) in &group.parts {
        let back = origin
            .and_then(|o| o.groups.iter().find(|(mount, _)| *mount == hierarchy.mount))
            .map(|(_, path)| hierarchy.dir(path))
            .filter(|dir| dir.is_dir() && *dir != hierarchy.dir(&group.path()))
            .unwrap_or_else(|| hierarchy.mount.clone());
        moved |= cgroupfs::add_process(&back, pid).is_ok();
    }
    moved
}

/// `pinner isolate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    pub active: bool,
    /// `[isolation] enabled`: whether the daemon applies it.
    pub enabled: bool,
    pub mechanism: String,
    pub reserved: Vec<u32>,
    pub group: Option<String>,
    pub units: Vec<String>,
    pub confined: usize,
    /// Host processes not (yet) in the group.
    pub not_confined: Vec<ProcessRef>,
    pub excluded: Vec<(ProcessRef, String)>,
    pub guests: Vec<ProcessRef>,
    pub other_groups: Vec<(ProcessRef, String)>,
    pub kernel_threads: usize,
    /// Processes that could not be moved, and why.
    pub failed: Vec<Failure>,
    pub irqs: IrqStatus,
}

pub fn status(sys: &System, settings: &Settings) -> Result<Status, IsolationError> {
    let state = {
        let _lock = sys.lock()?;
        sys.load_state()?
    };
    let mechanism = match (&state, sys.mechanism()) {
        (Some(s), _) => s.mechanism.clone(),
        (None, Ok(Mechanism::Systemd)) => "systemd".into(),
        (None, Ok(Mechanism::Group(layout))) => layout.name().into(),
        (None, Err(e)) => format!("none ({e})"),
    };
    let mut status = Status {
        active: state.is_some(),
        mechanism,
        enabled: settings.config.enabled,
        reserved: state
            .as_ref()
            .and_then(|s| CpuSet::parse(&s.reserved).ok())
            .unwrap_or_else(|| settings.reserved.clone())
            .to_vec(),
        group: None,
        units: state.as_ref().map(|s| s.units.clone()).unwrap_or_default(),
        confined: 0,
        not_confined: Vec::new(),
        excluded: Vec::new(),
        guests: Vec::new(),
        other_groups: Vec::new(),
        kernel_threads: 0,
        failed: state
            .as_ref()
            .map(|s| s.failures.clone())
            .unwrap_or_default(),
        irqs: IrqStatus::default(),
    };
    let Some(layout) = &sys.layout else {
        return Ok(status);
    };
    let (name, with_memory) = state.as_ref().map_or(
        (
            settings.config.group.as_str(),
            settings.config.memory_limit.is_some(),
        ),
        |s| (s.group.as_str(), s.with_memory),
    );
    let group = Group::new(layout, name, with_memory);
    if status.mechanism != "systemd" {
        status.group = Some(group.path());
    }
    let mut irqbalance_runs = false;
    for pid in sys.procs.pids() {
        let Some(p) = sys.procs.process(pid) else {
            continue;
        };
        irqbalance_runs |= p.comm == "irqbalance";
        let mut verdict = classify(&p, &settings.config, &group);
        if status.mechanism == "systemd"
            && matches!(verdict, Verdict::Move | Verdict::OtherGroup(_))
        {
            let inherited = p.cgroup("").is_some_and(|path| {
                SYSTEMD_UNITS
                    .iter()
                    .any(|u| path.trim_start_matches('/').split('/').next() == Some(u))
            });
            if inherited && status.active {
                verdict = Verdict::Confined;
            }
        }
        match verdict {
            Verdict::Confined => status.confined += 1,
            Verdict::Move => status.not_confined.push(ProcessRef::of(&p)),
            Verdict::Excluded(why) => status.excluded.push((ProcessRef::of(&p), why)),
            Verdict::Guest => status.guests.push(ProcessRef::of(&p)),
            Verdict::OtherGroup(path) => status.other_groups.push((ProcessRef::of(&p), path)),
            Verdict::KernelThread => status.kernel_threads += 1,
            Verdict::Init | Verdict::OutOfScope => {}
        }
    }
    status.irqs = irq_status(sys, settings, state.as_ref(), irqbalance_runs);
    Ok(status)
}

/// The IRQ part of the status, while isolation is active (`irqbalance_runs`
/// from the status's own walk of the process table).
fn irq_status(
    sys: &System,
    settings: &Settings,
    state: Option<&State>,
    irqbalance_runs: bool,
) -> IrqStatus {
    let (Some(host), Some(state)) = (&sys.irqs, state) else {
        return IrqStatus::default();
    };
    let irqbalance_runs = irqbalance_runs && settings.config.steers_irqs();
    let reserved = CpuSet::parse(&state.reserved).unwrap_or_default();
    irqs::status(
        host,
        &state.irqs,
        &reserved,
        &settings.guest_cpus,
        irqbalance_runs,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::procs::write_fixture_process;
    use crate::test_support::scratch_dir;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// A host: /proc with init, a kernel thread, host daemons, an excluded
    /// one, a guest, a container's process and one already confined.
    fn fixture_proc(root: &Path) -> ProcFs {
        let proc_root = root.join("proc");
        let p = |pid, comm, kthread, cgroups| {
            write_fixture_process(&proc_root, pid, 1, comm, kthread, cgroups).unwrap()
        };
        p(1, "systemd", false, "4:memory:/init.scope\n3:cpuset:/\n");
        p(2, "kthreadd", true, "4:memory:/\n3:cpuset:/\n");
        p(
            100,
            "sshd",
            false,
            "4:memory:/system.slice/ssh.service\n3:cpuset:/\n",
        );
        p(
            101,
            "ovs-vswitchd",
            false,
            "4:memory:/system.slice/ovs.service\n3:cpuset:/\n",
        );
        p(102, "qemu-system-x86", false, "4:memory:/machine/qemu-1-vm.libvirt-qemu\n3:cpuset:/machine/qemu-1-vm.libvirt-qemu/emulator\n");
        p(
            103,
            "nginx",
            false,
            "4:memory:/docker/abc\n3:cpuset:/docker/abc\n",
        );
        p(
            104,
            "cron",
            false,
            "4:memory:/system.slice/cron.service\n3:cpuset:/\n",
        );
        p(
            105,
            "rsyslogd",
            false,
            "4:memory:/\n3:cpuset:/pinner-housekeeping\n",
        );
        ProcFs::new(proc_root)
    }

    fn config() -> IsolationConfig {
        IsolationConfig {
            exclude: vec!["ovs-vswitchd".into(), "/system.slice/cron.service".into()],
            ..IsolationConfig::default()
        }
    }

    /// A host on the cgroup v1 fixture under `root`, its state in `root/run`.
    fn v1_system(root: &Path) -> System {
        System {
            procs: fixture_proc(root),
            layout: Some(fake_v1(root)),
            systemd: None,
            irqs: None,
            state_dir: root.join("run"),
        }
    }

    fn fake_v1(root: &Path) -> Layout {
        for h in ["cpuset", "memory"] {
            std::fs::create_dir_all(root.join("cg").join(h)).unwrap();
            std::fs::write(root.join("cg").join(h).join("cgroup.procs"), "").unwrap();
        }
        std::fs::write(root.join("cg/cpuset/cpuset.effective_mems"), "0").unwrap();
        // cgroupfs makes a group's cgroup.procs with the group; a plain
        // directory needs it made.
        for h in ["cpuset", "memory"] {
            let group = root.join("cg").join(h).join("pinner-housekeeping");
            std::fs::create_dir_all(&group).unwrap();
            std::fs::write(group.join("cgroup.procs"), "").unwrap();
        }
        std::fs::create_dir_all(root.join("cg/memory/system.slice/ssh.service")).unwrap();
        std::fs::write(
            root.join("cg/memory/system.slice/ssh.service/cgroup.procs"),
            "",
        )
        .unwrap();
        Layout::detect(&format!(
            "cgroup {0}/cg/cpuset cgroup rw,cpuset 0 0\ncgroup {0}/cg/memory cgroup rw,memory 0 0\n",
            root.display()
        ))
        .unwrap()
    }

    fn settings(config: IsolationConfig) -> Settings {
        Settings {
            config,
            reserved: CpuSet::parse("0-1").unwrap(),
            mems: CpuSet::parse("0").unwrap(),
            guest_cpus: CpuSet::parse("2-7").unwrap(),
        }
    }

    fn read(path: PathBuf) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    #[test]
    fn classifies_init_kernel_threads_guests_excluded_and_foreign_groups() {
        let root = scratch_dir("iso-classify");
        let procs = fixture_proc(&root);
        let layout = fake_v1(&root);
        let group = Group::new(&layout, "pinner-housekeeping", false);
        let verdict = |pid| classify(&procs.process(pid).unwrap(), &config(), &group);
        assert_eq!(verdict(1), Verdict::Init);
        assert_eq!(verdict(2), Verdict::KernelThread);
        assert_eq!(verdict(100), Verdict::Move);
        assert_eq!(
            verdict(101),
            Verdict::Excluded("name ovs-vswitchd is excluded".into())
        );
        assert_eq!(verdict(102), Verdict::Guest);
        assert_eq!(verdict(103), Verdict::OtherGroup("/docker/abc".into()));
        assert_eq!(
            verdict(104),
            Verdict::Excluded(
                "cgroup /system.slice/cron.service is excluded (/system.slice/cron.service)".into()
            )
        );
        assert_eq!(verdict(105), Verdict::Confined);
        // With a memory limit the group spans memory too: 105 is not in it there.
        let with_memory = Group::new(&layout, "pinner-housekeeping", true);
        assert_eq!(
            classify(&procs.process(105).unwrap(), &config(), &with_memory),
            Verdict::Move
        );
        // The test-only scope leaves everything outside its process group.
        let scoped = IsolationConfig {
            test_only_process_group: Some(vec![4242]),
            ..config()
        };
        assert_eq!(
            classify(&procs.process(100).unwrap(), &scoped, &group),
            Verdict::OutOfScope
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_state_that_cannot_be_written_takes_the_round_back() {
        use std::os::unix::fs::PermissionsExt;
        let root = scratch_dir("iso-unrecorded");
        let mut sys = v1_system(&root);
        // A directory anyone may write to: the state is not written there.
        std::fs::create_dir_all(&sys.state_dir).unwrap();
        std::fs::set_permissions(&sys.state_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = isolate(&mut sys, &settings(config()))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("not recorded, so taken back: cannot write"),
            "{err}"
        );
        assert!(
            err.contains("1 process confined just now put back"),
            "{err}"
        );
        // 105 keeps the group from going: said so.
        assert!(
            err.contains("could not put back: the group pinner-housekeeping"),
            "{err}"
        );
        assert!(!sys.state_path().exists());
        // 100 was moved (105 was in the group already), and went back to
        // where it was: the hierarchy's root.
        assert_eq!(
            read(root.join("cg/cpuset/pinner-housekeeping/cgroup.procs")),
            "100\n"
        );
        assert_eq!(read(root.join("cg/cpuset/cgroup.procs")), "100\n");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_state_file_is_trusted_only_as_roots_and_within_pinners_groups() {
        use std::os::unix::fs::PermissionsExt;
        let root = scratch_dir("iso-trust");
        let sys = v1_system(&root);
        std::fs::create_dir_all(&sys.state_dir).unwrap();
        let good = r#"{"mechanism":"cgroup-v1","reserved":"0-1","group":"pinner-housekeeping","with_memory":false,"units":[],"origins":[{"pid":100,"start_time":1,"groups":[["/cg/cpuset","/system.slice/ssh.service"]]}],"failures":[]}"#;
        let write = |text: &str, mode: u32| {
            std::fs::write(sys.state_path(), text).unwrap();
            std::fs::set_permissions(sys.state_path(), std::fs::Permissions::from_mode(mode))
                .unwrap();
        };
        write(good, 0o600);
        assert!(sys.load_state().unwrap().is_some());
        let refused = |text: &str, mode: u32| {
            write(text, mode);
            sys.load_state().unwrap_err().to_string()
        };
        let e = refused(good, 0o666);
        assert!(
            e.contains("not a usable isolation state") && e.contains("mode 0666"),
            "{e}"
        );
        assert!(
            e.contains("then `pinner isolate undo`"),
            "the error says what to do: {e}"
        );
        let e = refused(
            &good.replace("/system.slice/ssh.service", "/../../../etc"),
            0o600,
        );
        assert!(e.contains("leaves its hierarchy"), "{e}");
        let e = refused(
            &good.replace("\"pinner-housekeeping\"", "\"../../etc\""),
            0o600,
        );
        assert!(e.contains("not a plain name"), "{e}");
        let e = refused(
            &good.replace("\"units\":[]", "\"units\":[\"sshd.service\"]"),
            0o600,
        );
        assert!(e.contains("none pinner sets"), "{e}");
        let e = refused(&good[..good.len() / 2], 0o600);
        assert!(e.contains("EOF while parsing"), "a truncated file: {e}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn v1_isolate_keep_status_and_undo_put_processes_back() {
        let root = scratch_dir("iso-v1");
        let mut sys = v1_system(&root);
        let settings = settings(IsolationConfig {
            memory_limit: Some(1 << 30),
            ..config()
        });
        let sweep = isolate(&mut sys, &settings).unwrap();
        let moved: Vec<u32> = sweep.moved.iter().map(|p| p.pid).collect();
        assert_eq!(moved, vec![100, 105]);
        let cpuset = root.join("cg/cpuset/pinner-housekeeping");
        let memory = root.join("cg/memory/pinner-housekeeping");
        assert_eq!(read(cpuset.join("cpuset.cpus")), "0-1");
        assert_eq!(read(cpuset.join("cpuset.mems")), "0");
        assert_eq!(read(memory.join("memory.limit_in_bytes")), "1073741824");
        assert_eq!(read(cpuset.join("cgroup.procs")), "100\n105\n");
        assert_eq!(read(memory.join("cgroup.procs")), "100\n105\n");

        // What the kernel would show now; then a daemon starts unconfined.
        let proc_root = root.join("proc");
        std::fs::write(
            proc_root.join("100/cgroup"),
            "4:memory:/pinner-housekeeping\n3:cpuset:/pinner-housekeeping\n",
        )
        .unwrap();
        write_fixture_process(
            &proc_root,
            106,
            1,
            "chronyd",
            false,
            "4:memory:/\n3:cpuset:/\n",
        )
        .unwrap();
        let status_now = status(&sys, &settings).unwrap();
        assert!(status_now.active);
        assert_eq!(status_now.mechanism, "cgroup-v1");
        assert_eq!(status_now.confined, 1);
        let waiting: Vec<u32> = status_now.not_confined.iter().map(|p| p.pid).collect();
        assert_eq!(waiting, vec![105, 106]);
        assert_eq!(status_now.excluded.len(), 2);
        assert_eq!(status_now.guests[0].pid, 102);
        assert_eq!(status_now.other_groups[0].1, "/docker/abc");
        assert_eq!(status_now.kernel_threads, 1);

        let kept = keep(&sys, &settings.config, Some(106)).unwrap().unwrap();
        assert_eq!(kept.moved[0].pid, 106);
        assert!(read(cpuset.join("cgroup.procs")).ends_with("106\n"));

        // Undo writes each process back to where it was, per hierarchy. The
        // fake tree cannot drop its control files the way cgroupfs does, so
        // the first rmdir fails and the state is kept for another run.
        std::fs::write(cpuset.join("cgroup.procs"), "100\n106\n").unwrap();
        std::fs::write(memory.join("cgroup.procs"), "100\n106\n").unwrap();
        let err = undo(&mut sys, &settings.config).unwrap_err().to_string();
        assert!(err.contains("run again"), "{err}");
        assert!(sys.state_path().exists());
        assert!(read(root.join("cg/cpuset/cgroup.procs")).contains("100\n"));
        assert!(
            read(root.join("cg/memory/system.slice/ssh.service/cgroup.procs")).contains("100\n")
        );
        assert!(read(root.join("cg/memory/cgroup.procs")).contains("106\n"));
        for dir in [&cpuset, &memory] {
            for entry in std::fs::read_dir(dir).unwrap() {
                std::fs::remove_file(entry.unwrap().path()).unwrap();
            }
        }
        let done = undo(&mut sys, &settings.config).unwrap();
        assert_eq!(done.removed_groups.len(), 2);
        assert!(!cpuset.exists() && !memory.exists());
        assert!(!sys.state_path().exists());
        // Inactive: the keeper leaves new processes alone.
        assert_eq!(keep(&sys, &settings.config, None).unwrap(), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn v2_without_systemd_uses_a_group_in_the_unified_tree() {
        let root = scratch_dir("iso-v2");
        let unified = root.join("cg");
        std::fs::create_dir_all(&unified).unwrap();
        std::fs::write(unified.join("cgroup.subtree_control"), "").unwrap();
        let procs_root = root.join("proc");
        write_fixture_process(&procs_root, 1, 0, "init", false, "0::/\n").unwrap();
        write_fixture_process(&procs_root, 50, 1, "sshd", false, "0::/\n").unwrap();
        write_fixture_process(&procs_root, 51, 1, "qemu", false, "0::/machine/qemu-1\n").unwrap();
        let mut sys = System {
            procs: ProcFs::new(procs_root),
            layout: Layout::detect(&format!("cgroup2 {} cgroup2 rw 0 0\n", unified.display())),
            systemd: None,
            irqs: None,
            state_dir: root.join("run"),
        };
        let group_dir = unified.join("pinner-housekeeping");
        std::fs::create_dir_all(&group_dir).unwrap();
        std::fs::write(group_dir.join("cgroup.procs"), "").unwrap();
        let sweep = isolate(&mut sys, &settings(config())).unwrap();
        assert_eq!(sweep.moved.len(), 1);
        assert_eq!(read(unified.join("cgroup.subtree_control")), "+cpuset");
        assert_eq!(read(group_dir.join("cpuset.cpus")), "0-1");
        assert_eq!(read(group_dir.join("cgroup.procs")), "50\n");
        assert_eq!(
            status(&sys, &settings(config())).unwrap().mechanism,
            "cgroup-v2"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// Records what would be set; fails for one unit when told to.
    struct FakeSystemd {
        calls: Arc<Mutex<Vec<String>>>,
        fail_unit: Option<&'static str>,
    }

    impl Systemd for FakeSystemd {
        fn set_properties(
            &mut self,
            unit: &str,
            properties: &[String],
        ) -> Result<(), SystemdError> {
            if self.fail_unit == Some(unit) {
                return Err(SystemdError::Refused {
                    unit: unit.to_string(),
                    properties: properties.join(" "),
                    stderr: "Access denied".into(),
                });
            }
            self.calls
                .lock()
                .unwrap()
                .push(format!("{unit} {}", properties.join(" ")));
            Ok(())
        }
    }

    fn systemd_host(
        root: &Path,
        fail_unit: Option<&'static str>,
    ) -> (System, Arc<Mutex<Vec<String>>>) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let procs_root = root.join("proc");
        write_fixture_process(&procs_root, 1, 0, "systemd", false, "0::/init.scope\n").unwrap();
        write_fixture_process(
            &procs_root,
            70,
            1,
            "sshd",
            false,
            "0::/system.slice/ssh.service\n",
        )
        .unwrap();
        let sys = System {
            procs: ProcFs::new(procs_root),
            layout: Layout::detect(&format!(
                "cgroup2 {} cgroup2 rw 0 0\n",
                root.join("cgroup").display()
            )),
            systemd: Some(Box::new(FakeSystemd {
                calls: calls.clone(),
                fail_unit,
            })),
            irqs: None,
            state_dir: root.join("run"),
        };
        (sys, calls)
    }

    #[test]
    fn v2_with_systemd_sets_allowed_cpus_on_the_slices_and_resets_them() {
        let root = scratch_dir("iso-systemd");
        let (mut sys, calls) = systemd_host(&root, None);
        let settings = settings(IsolationConfig {
            memory_limit: Some(2 << 30),
            ..config()
        });
        isolate(&mut sys, &settings).unwrap();
        assert_eq!(
            *calls.lock().unwrap(),
            [
                "system.slice AllowedCPUs=0-1 AllowedMemoryNodes=0 MemoryMax=2147483648",
                "user.slice AllowedCPUs=0-1 AllowedMemoryNodes=0 MemoryMax=2147483648",
                "init.scope AllowedCPUs=0-1 AllowedMemoryNodes=0 MemoryMax=2147483648",
            ]
        );
        let now = status(&sys, &settings).unwrap();
        assert_eq!(now.mechanism, "systemd");
        assert_eq!(now.confined, 1, "sshd in system.slice inherits it");
        calls.lock().unwrap().clear();
        let done = undo(&mut sys, &settings.config).unwrap();
        assert_eq!(done.reset_units.len(), 3);
        assert!(calls
            .lock()
            .unwrap()
            .iter()
            .all(|c| c.ends_with("AllowedCPUs= AllowedMemoryNodes= MemoryMax=infinity")));
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// A /proc/irq with IRQ 1 on the reserved CPUs and IRQ 9 on all.
    fn fixture_irqs(root: &Path) -> IrqHost {
        let dir = root.join("proc-irq");
        for (irq, cpus) in [(1, "0-1"), (9, "0-7")] {
            write_irq(&dir, irq, cpus);
        }
        std::fs::write(dir.join("default_smp_affinity"), "ff\n").unwrap();
        IrqHost {
            table: crate::host::irq::IrqTable::new(&dir),
            etc_root: root.to_path_buf(),
        }
    }

    fn write_irq(dir: &Path, irq: u32, cpus: &str) {
        std::fs::create_dir_all(dir.join(irq.to_string())).unwrap();
        std::fs::write(dir.join(format!("{irq}/smp_affinity_list")), cpus).unwrap();
    }

    #[test]
    fn irqs_follow_isolation_on_off_and_undo() {
        let root = scratch_dir("iso-irqs");
        let (mut sys, _) = systemd_host(&root, None);
        sys.irqs = Some(fixture_irqs(&root));
        let dir = root.join("proc-irq");
        let irq = |n: u32| {
            read(dir.join(format!("{n}/smp_affinity_list")))
                .trim()
                .to_string()
        };
        write_fixture_process(
            &root.join("proc"),
            80,
            1,
            "irqbalance",
            false,
            "0::/system.slice/irqbalance.service\n",
        )
        .unwrap();
        let settings = settings(config());
        let sweep = isolate(&mut sys, &settings).unwrap();
        assert_eq!(sweep.irqs.moved, vec![9]);
        assert_eq!((irq(1), irq(9)), ("0-1".into(), "0-1".into()));
        assert_eq!(read(dir.join("default_smp_affinity")), "00000003\n");

        // irqbalance moves IRQ 9 back, a device adds IRQ 40: a pid's own
        // keep leaves IRQs alone, the sweep steers both.
        write_irq(&dir, 9, "5");
        write_irq(&dir, 40, "2-3");
        assert!(keep(&sys, &settings.config, Some(70))
            .unwrap()
            .unwrap()
            .irqs
            .moved
            .is_empty());
        let now = status(&sys, &settings).unwrap();
        assert_eq!(now.irqs.on_guest_cpus, vec![9, 40]);
        let advice = now.irqs.irqbalance.unwrap_or_default();
        assert!(advice.contains("IRQBALANCE_BANNED_CPULIST=2-7"), "{advice}");
        let sweep = keep(&sys, &settings.config, None).unwrap().unwrap();
        assert_eq!((sweep.irqs.moved, sweep.irqs.again), (vec![40], vec![9]));

        // steer_irqs = false on a running isolation puts them back.
        let off = Settings {
            config: IsolationConfig {
                steer_irqs: false,
                ..config()
            },
            ..settings.clone()
        };
        isolate(&mut sys, &off).unwrap();
        assert_eq!((irq(9), irq(40)), ("0-7".into(), "2-3".into()));
        assert_eq!(read(dir.join("default_smp_affinity")), "ff\n");
        assert_eq!(status(&sys, &off).unwrap().irqs.steered, vec![]);

        // On again; undo restores each exactly, even after irqbalance moved one.
        isolate(&mut sys, &settings).unwrap();
        write_irq(&dir, 9, "6");
        let done = undo(&mut sys, &settings.config).unwrap();
        assert_eq!(done.irqs.restored, 2, "{:?}", done.irqs);
        assert_eq!(
            (irq(1), irq(9), irq(40)),
            ("0-1".into(), "0-7".into(), "2-3".into())
        );
        assert_eq!(read(dir.join("default_smp_affinity")), "ff\n");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_test_scoped_run_never_steers_irqs() {
        let root = scratch_dir("iso-irqs-test-scope");
        let (mut sys, _) = systemd_host(&root, None);
        sys.irqs = Some(fixture_irqs(&root));
        let scoped = settings(IsolationConfig {
            test_only_process_group: Some(vec![4242]),
            ..config()
        });
        assert!(isolate(&mut sys, &scoped).unwrap().irqs.moved.is_empty());
        assert_eq!(read(root.join("proc-irq/9/smp_affinity_list")), "0-7");
        assert_eq!(read(root.join("proc-irq/default_smp_affinity")), "ff\n");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_refusing_unit_takes_back_what_was_set() {
        let root = scratch_dir("iso-systemd-fail");
        let (mut sys, calls) = systemd_host(&root, Some("user.slice"));
        let err = isolate(&mut sys, &settings(config()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("user.slice") && err.contains(": Access denied"),
            "{err}"
        );
        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), 2);
        assert!(calls[1].starts_with("system.slice AllowedCPUs= "));
        assert!(!sys.state_path().exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn isolation_without_reserved_cpus_is_refused() {
        let root = scratch_dir("iso-none");
        let mut sys = v1_system(&root);
        let none = Settings {
            reserved: CpuSet::new(),
            ..settings(config())
        };
        assert!(isolate(&mut sys, &none)
            .unwrap_err()
            .to_string()
            .contains("reserved_cpus"));
        assert!(!root
            .join("cg/cpuset/pinner-housekeeping/cpuset.cpus")
            .exists());
        assert!(!sys.state_path().exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn pid_files_written_in_watched_directories_name_their_process() {
        let root = scratch_dir("iso-pidfile");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        let mut watch = PidFileWatch::new(std::slice::from_ref(&root)).unwrap();
        std::fs::write(root.join("a.pid"), "4242\n").unwrap();
        std::fs::write(root.join("sub/b.pid"), "4343").unwrap();
        std::fs::write(root.join("notes.txt"), "99").unwrap();
        std::fs::create_dir(root.join("new")).unwrap();
        let mut seen = watch.wait(Duration::from_secs(2));
        // A directory made later is watched too.
        std::fs::write(root.join("new/c.pid"), "4444").unwrap();
        seen.extend(watch.wait(Duration::from_secs(2)));
        assert_eq!(seen, vec![4242, 4343, 4444]);
        assert!(watch.wait(Duration::from_millis(50)).is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
