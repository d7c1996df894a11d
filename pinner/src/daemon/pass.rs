//! One reconcile pass as the daemon runs it: read the running guests, plan,
//! apply the difference (`crate::engine::reconcile`), then account for it:
//! counters, logs, latency, busy retries, a lost connection.

use super::control::Daemon;
use crate::config::Enforcement;
use crate::engine::cpuset::CpuSet;
use crate::engine::domain::DomainSpec;
use crate::engine::hypervisor::{HvError, Unreadable};
use crate::engine::placement::{Plan, Warning};
use crate::engine::reconcile::{self, ApplyOutcome, DomainActions, MemoryRefusals};
use crate::host::procs::ProcFs;
use pinner_shared::protocol::{PendingChange, ReconcileReport};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// "cannot acquire state change lock": retry after this, doubling up to the
/// maximum while the domain stays busy.
const BUSY_RETRY_MIN: Duration = Duration::from_millis(100);
const BUSY_RETRY_MAX: Duration = Duration::from_millis(500);

/// What passes remember of each other.
pub struct PassMemory {
    /// The last pass's plan warnings: each is logged when it first appears.
    last_warnings: Vec<Warning>,
    /// Memory bindings libvirt refused, kept while their guest runs.
    pub refused: MemoryRefusals,
    /// Observe mode: the changes last logged as "would …", per domain
    /// UUID, so each is logged once, not every pass.
    pub announced: HashMap<String, Vec<PendingChange>>,
    /// The pins pinner set last, per domain UUID and libvirt field name
    /// (`cputune.vcpupin0`): libvirt echoes them as events, which must not
    /// count as someone else's change.
    pub own_pins: HashMap<String, HashMap<String, CpuSet>>,
    busy_delay: Duration,
}

impl Default for PassMemory {
    fn default() -> Self {
        PassMemory {
            last_warnings: Vec::new(),
            refused: MemoryRefusals::new(),
            own_pins: HashMap::new(),
            announced: HashMap::new(),
            busy_delay: BUSY_RETRY_MIN,
        }
    }
}

impl PassMemory {
    /// Whether pinner itself set `field` of domain `uuid` to `cpus`.
    pub fn is_own_pin(&self, uuid: &str, field: &str, cpus: &str) -> bool {
        let own = self.own_pins.get(uuid).and_then(|o| o.get(field));
        own.is_some() && CpuSet::parse(cpus).ok().as_ref() == own
    }

    /// Forgets what concerns guests no longer running.
    fn retain_running(&mut self, specs: &[DomainSpec]) {
        let running = |uuid: &String| specs.iter().any(|s| &s.uuid == uuid);
        self.refused.retain(|uuid, _| running(uuid));
        self.own_pins.retain(|uuid, _| running(uuid));
        self.announced.retain(|uuid, _| running(uuid));
    }
}

impl Daemon {
    /// Runs a pass now and reports it.
    pub(super) fn reconcile(&mut self) -> ReconcileReport {
        let now = Instant::now();
        self.schedule.next_periodic = now + self.config.reconcile_interval;
        self.schedule.retry_at = None;
        let events = self.schedule.coalescer.ran(now);
        if events > 0 {
            self.counters.event_passes += 1;
        }
        let report = self.reconcile_attempts(events);
        self.counters.reconcile_seconds += now.elapsed().as_secs_f64();
        report
    }

    fn reconcile_attempts(&mut self, events: u32) -> ReconcileReport {
        // A connection found dead is replaced and the pass tried once more:
        // after a libvirtd restart the first call is what notices it.
        for _attempt in 0..2 {
            match self.reconcile_pass(events) {
                Err(HvError::Disconnected(m)) => {
                    self.logger
                        .warn(&format!("lost libvirt connection: {m}"), &[]);
                    self.session.drop_connection();
                }
                Err(e) => return self.failed_report(e.to_string()),
                Ok(report) => return report,
            }
        }
        self.failed_report("libvirt not reachable".into())
    }

    fn failed_report(&mut self, error: String) -> ReconcileReport {
        if self.schedule.retry_at.is_none() {
            self.schedule.retry_at = Some(Instant::now() + self.session.retry_delay());
        }
        ReconcileReport {
            errors: vec![error],
            ..ReconcileReport::default()
        }
    }

    fn reconcile_pass(&mut self, events: u32) -> Result<ReconcileReport, HvError> {
        let uri = self.config.libvirt_uri.clone();
        let Some(libvirt) = self.connection() else {
            return Err(HvError::Other(format!("libvirt not reachable at {uri}")));
        };
        let (specs, unreadable) = libvirt.running_domains()?;
        self.memory.retain_running(&specs);
        // Hugepage pools and hot-plugged memory change while the host runs.
        crate::host::sysfs::refresh_memory(&self.paths.sysfs_root, &mut self.topology);
        let plan = self.plan(&specs);
        let mut work = reconcile::diff(&specs, &plan, &self.memory.refused);
        if self.config.enforcement == Enforcement::Observe {
            self.announce_pending(&specs, &work);
            self.counters.reconciles += 1;
            self.log_new_warnings(&plan.warnings);
            return Ok(pass_report(&specs, &plan, 0, Vec::new(), &unreadable));
        }
        self.adoption
            .retain(|uuid| specs.iter().any(|s| s.uuid == uuid));
        self.hold_bindings(&mut work);
        let logger = self.logger.clone();
        let own_pins = &mut self.memory.own_pins;
        let libvirt = self.session.current().expect("connected above");
        let outcome = reconcile::apply(libvirt, &work, |domain, action| {
            if let Some((field, cpus)) = action.pin_field() {
                own_pins
                    .entry(domain.uuid.clone())
                    .or_default()
                    .insert(field, cpus.clone());
            }
            let (message, fields) = action.describe();
            let mut fields: Vec<(&str, &str)> =
                fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
            fields.insert(0, ("DOMAIN", &domain.name));
            logger.log(action.log_level(), &message, &fields);
        })?;
        let managed = |uuid: &str| plan.guests.iter().any(|g| g.uuid == uuid);
        self.observer
            .latency
            .settle(&specs, &managed, &outcome.unsettled);
        self.account(&specs, &plan, &outcome, &unreadable, events);
        let samples = self
            .observer
            .sample_guests(&ProcFs::new(&self.paths.proc), &specs);
        self.place_cell_memory(&specs, &plan, &samples);
        let errors = outcome.errors.iter().map(ToString::to_string).collect();
        Ok(pass_report(
            &specs,
            &plan,
            outcome.changed,
            errors,
            &unreadable,
        ))
    }

    /// Observe mode: each change the plan asks for is logged once, as the
    /// line it would be logged with once made but saying "would", with
    /// the same fields; nothing is applied.
    fn announce_pending(&mut self, specs: &[DomainSpec], work: &[DomainActions]) {
        let announced = &mut self.memory.announced;
        announced.retain(|uuid, _| work.iter().any(|w| &w.uuid == uuid));
        for domain in work {
            let Some(spec) = specs.iter().find(|s| s.uuid == domain.uuid) else {
                continue;
            };
            let before = announced.remove(&domain.uuid).unwrap_or_default();
            let mut now = Vec::with_capacity(domain.actions.len());
            for action in &domain.actions {
                let Some(pending) = action.pending(spec) else {
                    continue;
                };
                if !before.contains(&pending) {
                    let (_, fields) = action.describe();
                    let mut fields: Vec<(&str, &str)> =
                        fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
                    fields.insert(0, ("DOMAIN", &domain.name));
                    fields.push(("ENFORCEMENT", "observe"));
                    self.logger.info(&pending.text, &fields);
                }
                now.push(pending);
            }
            announced.insert(domain.uuid.clone(), now);
        }
    }

    /// Counters, logs and retries after a pass applied `outcome`.
    fn account(
        &mut self,
        specs: &[DomainSpec],
        plan: &Plan,
        outcome: &ApplyOutcome,
        unreadable: &[Unreadable],
        events: u32,
    ) {
        self.counters.reconciles += 1;
        self.counters.pins_applied += u64::from(outcome.changed);
        self.counters.apply_errors += outcome.errors.len() as u64;
        for error in &outcome.errors {
            self.logger.warn(&error.to_string(), &[]);
        }
        for problem in unreadable {
            self.logger.warn(&problem.to_string(), &[]);
        }
        for (uuid, reason) in &outcome.memory_refused {
            let name = specs
                .iter()
                .find(|s| &s.uuid == uuid)
                .map_or("", |s| s.name.as_str());
            self.logger.warn(
                &format!("libvirt refused to bind memory, left as it is: {reason}"),
                &[("DOMAIN", name), ("OP", "memory")],
            );
            self.memory.refused.insert(uuid.clone(), reason.clone());
        }
        self.schedule_busy_retry(outcome.busy);
        self.log_new_warnings(&plan.warnings);
        if outcome.changed > 0 {
            self.logger.info(
                &format!(
                    "reconciled {} domains in {} mode for {events} events: {} pins changed",
                    specs.len(),
                    plan.mode.as_str(),
                    outcome.changed
                ),
                &[],
            );
        }
    }

    /// A guest libvirt was busy with is retried soon, backing off while it
    /// stays busy.
    fn schedule_busy_retry(&mut self, busy: bool) {
        let delay = &mut self.memory.busy_delay;
        if !busy {
            *delay = BUSY_RETRY_MIN;
            return;
        }
        self.logger.debug(
            &format!("a domain is busy (libvirt's state change lock); retrying in {delay:?}"),
            &[],
        );
        let now = Instant::now();
        self.schedule.coalescer.retry_at(now + *delay, now);
        *delay = (*delay * 2).min(BUSY_RETRY_MAX);
    }

    /// Warnings repeat every pass; log each only when it first appears.
    fn log_new_warnings(&mut self, warnings: &[Warning]) {
        for w in warnings {
            if !self.memory.last_warnings.contains(w) {
                self.logger.warn(&w.to_string(), &[]);
            }
        }
        self.memory.last_warnings = warnings.to_vec();
    }
}

/// What a pass reports to `pinner reconcile`.
fn pass_report(
    specs: &[DomainSpec],
    plan: &Plan,
    pins_changed: u32,
    mut errors: Vec<String>,
    unreadable: &[Unreadable],
) -> ReconcileReport {
    errors.extend(unreadable.iter().map(ToString::to_string));
    ReconcileReport {
        mode: plan.mode.as_str().into(),
        domains: specs.len() as u32,
        pins_changed,
        errors,
        warnings: plan.warnings.iter().map(ToString::to_string).collect(),
    }
}
