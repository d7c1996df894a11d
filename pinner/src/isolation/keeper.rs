//! The isolation keeper: a thread that keeps host isolation true while the
//! daemon runs, confining daemons whose pid file appears at once and
//! everything else the periodic /proc sweep finds.

use super::irqs::{irq_list, Steered};
use super::{PidFileWatch, Settings, Sweep, System};
use crate::config::IsolationConfig;
use crate::engine::cpuset::CpuSet;
use crate::engine::topology::Topology;
use pinner_shared::log::Logger;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The daemon's side of isolation: the settings it shares with the keeper
/// thread, started the first time isolation is enabled.
#[derive(Default)]
pub struct Keeper {
    shared: Option<Arc<Mutex<Settings>>>,
    /// Observe mode: the keeper thread confines nothing meanwhile.
    paused: Arc<AtomicBool>,
}

impl Keeper {
    /// Isolates (or re-isolates with new settings) when enabled; undoes it
    /// when it was enabled and no longer is.
    pub fn update(
        &mut self,
        config: &IsolationConfig,
        reserved: &CpuSet,
        topology: &Topology,
        state_dir: &Path,
        logger: &Arc<Logger>,
        was_enabled: bool,
    ) {
        if !config.enabled {
            if was_enabled {
                Keeper::undo(config, state_dir, logger);
            }
            return;
        }
        let settings = Settings::new(config, reserved, topology);
        let mut system = System::host(state_dir);
        match super::isolate(&mut system, &settings) {
            Ok(sweep) => {
                logger.info(
                    &format!(
                        "host isolation on CPUs {}: {} processes confined now",
                        settings.reserved,
                        sweep.moved.len()
                    ),
                    &[("CPUS", &settings.reserved.to_string())],
                );
                log_sweep(logger, &sweep, &settings.reserved);
            }
            Err(e) => logger.error(&format!("host isolation not started: {e}"), &[]),
        }
        match &self.shared {
            Some(shared) => *shared.lock().unwrap_or_else(|p| p.into_inner()) = settings,
            None => {
                let shared = Arc::new(Mutex::new(settings));
                let paused = self.paused.clone();
                spawn_keeper(
                    shared.clone(),
                    paused,
                    state_dir.to_path_buf(),
                    logger.clone(),
                );
                self.shared = Some(shared);
            }
        }
    }

    /// Stops (or resumes) keeping isolation true, leaving the host as it
    /// is meanwhile: observe mode writes nothing.
    pub fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    /// Puts every confined process back and removes pinner's groups.
    pub fn undo(config: &IsolationConfig, state_dir: &Path, logger: &Logger) {
        let mut system = System::host(state_dir);
        match super::undo(&mut system, config) {
            Ok(undo) => {
                logger.info(&format!("host isolation undone: {}", undo.summary()), &[]);
                for e in &undo.irqs.failed {
                    logger.warn(&format!("IRQ not restored: {e}"), &[]);
                }
            }
            Err(e) => logger.error(&format!("host isolation not undone: {e}"), &[]),
        }
    }
}

/// Keeps isolation true: confines daemons whose pid file appears at once,
/// and everything else the periodic sweep finds. Does nothing while
/// isolation is not active (no state), so an `isolate undo` holds, and
/// while `paused`.
fn spawn_keeper(
    settings: Arc<Mutex<Settings>>,
    paused: Arc<AtomicBool>,
    state_dir: PathBuf,
    logger: Arc<Logger>,
) {
    let keeper_logger = logger.clone();
    let body = move || {
        let logger = keeper_logger;
        let current = || settings.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let system = System::host(&state_dir);
        let mut watch = match PidFileWatch::new(&current().config.pid_dirs) {
            Ok(watch) => Some(watch),
            Err(e) => {
                logger.warn(&format!("pid files not watched, sweeps only: {e}"), &[]);
                None
            }
        };
        let mut next_sweep = Instant::now();
        let mut failing = None;
        loop {
            let settings = current();
            let wait = next_sweep.saturating_duration_since(Instant::now());
            let started = match watch.as_mut() {
                Some(watch) => watch.wait(wait),
                None => {
                    std::thread::sleep(wait);
                    Vec::new()
                }
            };
            if paused.load(Ordering::Relaxed) {
                next_sweep = Instant::now() + settings.config.sweep_interval;
                continue;
            }
            for pid in started {
                keep_logged(&system, &settings, Some(pid), (&logger, &mut failing));
            }
            if Instant::now() >= next_sweep {
                keep_logged(&system, &settings, None, (&logger, &mut failing));
                next_sweep = Instant::now() + settings.config.sweep_interval;
            }
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("isolation".into())
        .spawn(body)
    {
        logger.error(&format!("cannot start the isolation keeper: {e}"), &[]);
    }
}

/// One keep, logged; a failure is logged when it first appears (or
/// changes) and its end once, not every sweep (`failing`: the last one).
fn keep_logged(
    system: &System,
    settings: &Settings,
    only: Option<u32>,
    (logger, failing): (&Logger, &mut Option<String>),
) {
    match super::keep(system, &settings.config, only) {
        Ok(sweep) => {
            if failing.take().is_some() {
                logger.info("isolation sweeps work again", &[]);
            }
            if let Some(sweep) = sweep {
                log_sweep(logger, &sweep, &settings.reserved);
            }
        }
        Err(e) => {
            let message = e.to_string();
            if failing.as_deref() != Some(message.as_str()) {
                logger.error(
                    &format!("isolation sweep failed (said once, until it changes): {message}"),
                    &[],
                );
                *failing = Some(message);
            }
        }
    }
}

pub fn log_sweep(logger: &Logger, sweep: &Sweep, reserved: &CpuSet) {
    let cpus = reserved.to_string();
    for p in &sweep.moved {
        let pid = p.pid.to_string();
        logger.info(
            &format!("confined {}[{pid}] to housekeeping CPUs {cpus}", p.name),
            &[("PID", &pid), ("COMM", &p.name), ("CPUS", &cpus)],
        );
    }
    for f in &sweep.failed {
        let pid = f.pid.to_string();
        logger.warn(
            &format!("cannot confine {}[{pid}]: {}", f.name, f.error),
            &[("PID", &pid), ("COMM", &f.name)],
        );
    }
    log_irqs(logger, &sweep.irqs, &cpus);
}

/// One line per kind of IRQ outcome, not one per IRQ: a host has hundreds.
fn log_irqs(logger: &Logger, irqs: &Steered, cpus: &str) {
    let list = |irqs: &[u32]| irq_list(irqs, ",");
    if !irqs.moved.is_empty() {
        let moved = list(&irqs.moved);
        logger.info(
            &format!("steered IRQs {moved} to housekeeping CPUs {cpus}"),
            &[("OP", "steer_irq"), ("IRQS", &moved), ("CPUS", cpus)],
        );
    }
    // irqbalance moving them back would repeat this every sweep.
    if !irqs.again.is_empty() {
        logger.debug(
            &format!(
                "steered IRQs {} again (moved back onto guest CPUs)",
                list(&irqs.again)
            ),
            &[("OP", "steer_irq")],
        );
    }
    if !irqs.managed.is_empty() {
        let managed = list(&irqs.managed);
        logger.info(
            &format!("IRQs {managed} keep their CPUs: managed by the kernel"),
            &[("OP", "steer_irq"), ("IRQS", &managed)],
        );
    }
    for e in &irqs.failed {
        logger.warn(&format!("cannot steer: {e}"), &[("OP", "steer_irq")]);
    }
}
