//! One reconcile pass as the daemon runs it: read the running guests, plan,
//! apply the difference (`crate::engine::reconcile`), then account for it:
//! counters, logs, latency, busy retries, a lost connection.

use super::control::Daemon;
use super::inventory::Refreshed;
use crate::config::Enforcement;
use crate::engine::cpuset::CpuSet;
use crate::engine::domain::DomainSpec;
use crate::engine::hypervisor::{HvError, Unreadable};
use crate::engine::placement::{Plan, Warning};
use crate::engine::reconcile::{self, Action, ApplyOutcome, DomainActions, MemoryRefusals};
use pinner_shared::log::Logger;
use pinner_shared::protocol::{PendingChange, ReconcileReport};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// "cannot acquire state change lock": retry after this, doubling up to the
/// maximum while the domain stays busy.
const BUSY_RETRY_MIN: Duration = Duration::from_millis(100);
const BUSY_RETRY_MAX: Duration = Duration::from_millis(500);
/// How long after writing a guest's metadata its metadata events are taken
/// for the echo of that write.
const OWN_ECHO_WINDOW: Duration = Duration::from_secs(5);

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
    /// When pinner last wrote each guest's metadata, by UUID: libvirt
    /// echoes that too, and the echo needs no pass of its own.
    pub own_metadata: HashMap<String, Instant>,
    busy_delay: Duration,
    /// The last pass's report (`pinner status` shows it).
    pub last: Option<ReconcileReport>,
}

impl Default for PassMemory {
    fn default() -> Self {
        PassMemory {
            last_warnings: Vec::new(),
            refused: MemoryRefusals::new(),
            own_pins: HashMap::new(),
            own_metadata: HashMap::new(),
            announced: HashMap::new(),
            busy_delay: BUSY_RETRY_MIN,
            last: None,
        }
    }
}

impl PassMemory {
    /// Whether a metadata change of `uuid` is likely pinner's own, echoed:
    /// it wrote the guest's metadata within the last `OWN_ECHO_WINDOW`. (An
    /// operator's change in that window waits for the periodic pass.)
    pub fn is_own_metadata(&self, uuid: &str) -> bool {
        self.own_metadata
            .get(uuid)
            .is_some_and(|at| at.elapsed() < OWN_ECHO_WINDOW)
    }

    /// Remembers a change pinner just made to guest `uuid`, so libvirt's
    /// echo of it is not taken for someone else's.
    pub fn applied(&mut self, uuid: &str, action: &Action) {
        if let Some((field, cpus)) = action.pin_field() {
            self.own_pins
                .entry(uuid.to_string())
                .or_default()
                .insert(field, cpus.clone());
        }
        if matches!(action, Action::SetMetadata { .. }) {
            self.own_metadata.insert(uuid.to_string(), Instant::now());
        }
    }

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
        self.own_metadata.retain(|uuid, _| running(uuid));
        self.announced.retain(|uuid, _| running(uuid));
    }
}

/// Logs a change just made to `domain`, DOMAIN first among its fields.
/// One `by_release` is prefixed `release:`, carries RELEASE=1 and is said
/// at info level whatever it is: an operator asked for it.
pub(super) fn log_applied(
    logger: &Logger,
    domain: &DomainActions,
    action: &Action,
    by_release: bool,
) {
    let (message, fields) = action.describe();
    let mut fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    fields.insert(0, ("DOMAIN", &domain.name));
    if by_release {
        fields.push(("RELEASE", "1"));
        logger.info(&format!("release: {message}"), &fields);
    } else {
        logger.log(action.log_level(), &message, &fields);
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
        let mut report = self.reconcile_attempts(events);
        report.seconds = now.elapsed().as_secs_f64();
        self.counters.reconcile_seconds += report.seconds;
        self.memory.last = Some(report.clone());
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
        if self.connection().is_none() {
            return Err(HvError::Other(format!("libvirt not reachable at {uri}")));
        }
        let calls_before = self.session.calls();
        let full = self.full_read_due(Instant::now());
        let libvirt = self.session.current().expect("connected above");
        let refreshed = self.inventory.refresh(libvirt, full)?;
        if full {
            self.full_read_done(&refreshed);
        }
        let (specs, unreadable) = (refreshed.specs, refreshed.unreadable);
        self.memory.retain_running(&specs);
        // Hugepage pools and hot-plugged memory change while the host runs.
        crate::host::sysfs::refresh_memory(&self.paths.sysfs_root, &mut self.topology);
        let (plan, load) = self.plan(&specs);
        let plan = match self.config.enforcement {
            // Nothing moves in observe mode: rebalancing waits for enforce.
            Enforcement::Observe => plan,
            Enforcement::Enforce => self.rebalanced(plan, &specs, load),
        };
        let mut work = reconcile::diff(&specs, &plan, &self.memory.refused);
        let mut report = if self.config.enforcement == Enforcement::Observe {
            self.announce_pending(&specs, &work);
            self.counters.reconciles += 1;
            self.log_new_warnings(&plan.warnings);
            pass_report(&specs, &plan, 0, Vec::new(), &unreadable)
        } else {
            self.adoption
                .retain(|uuid| specs.iter().any(|s| s.uuid == uuid));
            self.hold_bindings(&mut work);
            self.apply_pass(&specs, &plan, &work, &unreadable, events)?
        };
        report.domains_read = refreshed.read;
        report.full_read = full;
        report.libvirt_calls = self.session.calls() - calls_before;
        Ok(report)
    }

    /// Applies `work`, accounts for it and places guest cells' memory.
    fn apply_pass(
        &mut self,
        specs: &[DomainSpec],
        plan: &Plan,
        work: &[DomainActions],
        unreadable: &[Unreadable],
        events: u32,
    ) -> Result<ReconcileReport, HvError> {
        let logger = self.logger.clone();
        let memory = &mut self.memory;
        let libvirt = self.session.current().expect("connected above");
        let outcome = reconcile::apply(libvirt, work, |domain, action| {
            memory.applied(&domain.uuid, action);
            log_applied(&logger, domain, action, false);
        })?;
        // What was changed (or tried) is read back at the next pass.
        for domain in work {
            self.inventory.mark_stale(&domain.uuid);
        }
        let managed = |uuid: &str| plan.guests.iter().any(|g| g.uuid == uuid);
        self.observer
            .latency
            .settle(specs, &managed, &outcome.unsettled);
        self.account(specs, plan, &outcome, unreadable, events);
        self.place_cell_memory(specs, plan);
        let errors = outcome.errors.iter().map(ToString::to_string).collect();
        Ok(pass_report(
            specs,
            plan,
            outcome.changed,
            errors,
            unreadable,
        ))
    }

    /// Whether this pass reads every guest: its interval is up, the
    /// connection is new (events were lost meanwhile), or events are not
    /// coming at all.
    fn full_read_due(&self, now: Instant) -> bool {
        now >= self.schedule.next_full_read
            || self.schedule.full_read_serial != self.session.serial
            || !self.session.events_live
    }

    /// Schedules the next full read; logs and counts the changes it found
    /// that no event had announced.
    fn full_read_done(&mut self, refreshed: &Refreshed) {
        self.schedule.next_full_read = Instant::now() + self.config.full_read_interval;
        self.schedule.full_read_serial = self.session.serial;
        self.counters.full_reads += 1;
        self.counters.changes_found_by_full_read += refreshed.changed_unannounced.len() as u64;
        for name in &refreshed.changed_unannounced {
            self.logger.info(
                "full re-read: the guest changed with no event announcing it",
                &[("DOMAIN", name)],
            );
        }
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
        ..ReconcileReport::default()
    }
}
