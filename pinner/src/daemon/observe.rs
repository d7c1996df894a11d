//! What the daemon observes and reports: how long started guests waited
//! for their pins, each guest's steal and memory locality, the status
//! answer and the metrics file.

use super::control::Daemon;
use crate::config::MetricsFile;
use crate::engine::cpuset::CpuSet;
use crate::engine::domain::DomainSpec;
use crate::engine::hypervisor::{HvError, Running};
use crate::engine::reconcile;
use crate::host::file::WriteError;
use crate::host::guest_stats::{self, GuestSample, RateTracker, Rates};
use crate::host::procs::ProcFs;
use crate::isolation::{self, Settings, System};
use pinner_shared::paths::HOOK_DROPS_FILE;
use pinner_shared::protocol::{DomainStatus, HookEvent, LatencySummary, Response, StatusReport};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Started guests kept waiting for their pins: per guest, and the last
/// `RECENT_LATENCIES` for the summary.
#[derive(Default)]
pub struct PinLatency {
    /// Hook `started` events not yet followed by applied pins: domain UUID
    /// (or name, when the hook could not read the UUID) → sent at (ns).
    awaiting: HashMap<String, u64>,
    pub by_domain: HashMap<String, f64>,
    recent: VecDeque<f64>,
}

const RECENT_LATENCIES: usize = 1000;
/// The longest the control loop reads /proc at a time; as long again
/// passes before the next slice, for events and requests.
const OBSERVATION_SLICE: Duration = Duration::from_millis(10);
/// A started event whose guest never shows up is forgotten after this.
const AWAIT_LIMIT_NS: u64 = 60_000_000_000;

pub(super) fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl PinLatency {
    pub fn started(&mut self, event: &HookEvent) {
        self.awaiting
            .insert(event.guest_key().to_string(), event.sent_at_unix_ns);
    }

    /// After a reconcile pass: every awaited guest now running and settled
    /// has its latency; guests pinner does not manage are dropped.
    pub fn settle(
        &mut self,
        specs: &[crate::engine::domain::DomainSpec],
        managed: &dyn Fn(&str) -> bool,
        unsettled: &[String],
    ) {
        let now = unix_now_ns();
        self.by_domain
            .retain(|uuid, _| specs.iter().any(|s| &s.uuid == uuid));
        for spec in specs {
            let key = [&spec.uuid, &spec.name]
                .into_iter()
                .find(|k| self.awaiting.contains_key(k.as_str()));
            let Some(key) = key else { continue };
            if unsettled.contains(&spec.uuid) {
                continue;
            }
            let sent = self.awaiting.remove(key.as_str()).unwrap_or(now);
            if managed(&spec.uuid) {
                let ms = now.saturating_sub(sent) as f64 / 1e6;
                self.by_domain.insert(spec.uuid.clone(), ms);
                if self.recent.len() == RECENT_LATENCIES {
                    self.recent.pop_front();
                }
                self.recent.push_back(ms);
            }
        }
        self.awaiting
            .retain(|_, sent| now.saturating_sub(*sent) < AWAIT_LIMIT_NS);
    }

    pub fn summary(&self) -> LatencySummary {
        let mut sorted: Vec<f64> = self.recent.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let pick = |q: f64| {
            sorted
                .get(((sorted.len().saturating_sub(1)) as f64 * q).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        LatencySummary {
            count: sorted.len() as u64,
            median_ms: pick(0.5),
            p99_ms: pick(0.99),
            max_ms: sorted.last().copied().unwrap_or(0.0),
        }
    }
}

/// One guest as last read from /proc, and its steal and demand so far.
pub struct Observed {
    pub sample: GuestSample,
    pub rates: Rates,
}

/// Per-guest measurements kept between passes, and the clocks of the
/// observation (every guest read from /proc) and the metrics file.
pub struct Observer {
    pub latency: PinLatency,
    rates: RateTracker,
    /// Guest UUID → its qemu pid, found once and checked on each use.
    qemu_pids: HashMap<String, u32>,
    /// Guest UUID → when it was last read from /proc and what was read
    /// (None: its qemu was not found), shared by passes, status, metrics.
    samples: HashMap<String, (Instant, Option<Observed>)>,
    /// When every guest is next read from /proc.
    pub next_observation: Instant,
    /// Observations completed (every guest read): one rebalancing sample
    /// each.
    pub observations: u64,
    /// The /proc reading of the observation under way so far: time, slices.
    cycle: (Duration, u32),
    /// When the metrics file is next rewritten (None: no file configured).
    pub next_metrics: Option<Instant>,
    /// Set while the metrics file cannot be written, so that is logged once.
    metrics_failing: bool,
}

impl Observer {
    /// `metrics_on`: a metrics file is configured, or may appear (`Auto`).
    pub fn new(metrics_on: bool) -> Observer {
        Observer {
            latency: PinLatency::default(),
            rates: RateTracker::default(),
            qemu_pids: HashMap::new(),
            samples: HashMap::new(),
            next_observation: Instant::now(),
            observations: 0,
            cycle: (Duration::ZERO, 0),
            next_metrics: metrics_on.then(Instant::now),
            metrics_failing: false,
        }
    }

    /// Samples one guest from /proc now (its qemu pid remembered for the
    /// next time), records it for steal and keeps it.
    fn sample_guest(&mut self, procfs: &ProcFs, uuid: &str) -> Option<&Observed> {
        let hint = self.qemu_pids.get(uuid).copied();
        let now = Instant::now();
        let observed = guest_stats::sample(procfs, uuid, hint).map(|sample| {
            self.qemu_pids.insert(uuid.to_string(), sample.pid);
            let rates = self.rates.record(uuid, now, &sample);
            Observed { sample, rates }
        });
        let entry = self.samples.entry(uuid.to_string()).or_insert((now, None));
        *entry = (now, observed);
        entry.1.as_ref()
    }

    /// The guest's last sample, or one taken now if it was never read.
    pub fn observed(&mut self, procfs: &ProcFs, uuid: &str) -> Option<&Observed> {
        if self.samples.contains_key(uuid) {
            return self.samples.get(uuid).and_then(|(_, o)| o.as_ref());
        }
        self.sample_guest(procfs, uuid)
    }

    /// The observation: every running guest read from /proc once per
    /// `interval`, so each steal figure covers one interval; guests gone
    /// are forgotten. Reads the guests read longest ago first and stops
    /// after `budget` (a numa_maps read is about a millisecond, and hook
    /// events wait meanwhile); returns whether every guest is now current.
    pub fn observe<'a>(
        &mut self,
        procfs: &ProcFs,
        specs: impl Iterator<Item = &'a DomainSpec>,
        interval: Duration,
        budget: Duration,
    ) -> bool {
        let began = Instant::now();
        let uuids: HashSet<String> = specs.map(|s| s.uuid.clone()).collect();
        self.qemu_pids.retain(|uuid, _| uuids.contains(uuid));
        self.samples.retain(|uuid, _| uuids.contains(uuid));
        self.rates.retain(|uuid| uuids.contains(uuid));
        let mut due: Vec<(Option<Instant>, String)> = uuids
            .into_iter()
            .map(|uuid| (self.samples.get(&uuid).map(|(at, _)| *at), uuid))
            .filter(|(at, _)| at.is_none_or(|at| began.saturating_duration_since(at) >= interval))
            .collect();
        due.sort();
        for (_, uuid) in due {
            if began.elapsed() >= budget {
                return false;
            }
            self.sample_guest(procfs, &uuid);
        }
        true
    }

    /// Each guest's demand as last measured (CPUs), by UUID, and the
    /// guests whose demand has been measured for less than its half-life.
    pub fn demand(&self) -> (HashMap<String, f64>, HashSet<String>) {
        let mut settling = HashSet::new();
        let demand = self
            .samples
            .iter()
            .filter_map(|(uuid, (_, o))| {
                let rates = o.as_ref()?.rates;
                if rates.measured_secs < guest_stats::DEMAND_HALF_LIFE.as_secs_f64() {
                    settling.insert(uuid.clone());
                }
                Some((uuid.clone(), rates.demand_cpus?))
            })
            .collect();
        (demand, settling)
    }

    /// A fresh sample of `uuid` (a guest whose cells' memory the pass
    /// places: where its pages are now).
    pub fn sample_fresh(&mut self, procfs: &ProcFs, uuid: &str) -> Option<GuestSample> {
        Some(self.sample_guest(procfs, uuid)?.sample.clone())
    }
}

impl Daemon {
    /// Reads the known guests from /proc, each once per reconcile interval
    /// and outside passes, a slice at a time: status, metrics and passes
    /// share what it read.
    pub(super) fn observe(&mut self) {
        let began = Instant::now();
        let procfs = ProcFs::new(&self.paths.proc);
        let interval = self.config.reconcile_interval;
        let done =
            self.observer
                .observe(&procfs, self.inventory.known(), interval, OBSERVATION_SLICE);
        let cycle = &mut self.observer.cycle;
        *cycle = (cycle.0 + began.elapsed(), cycle.1 + 1);
        self.observer.next_observation = if done {
            self.observer.observations += 1;
            let (spent, slices) = std::mem::take(&mut self.observer.cycle);
            self.logger.debug(
                &format!(
                    "observed {} guests from /proc in {:.1} ms ({slices} slices)",
                    self.inventory.known().count(),
                    spent.as_secs_f64() * 1e3
                ),
                &[],
            );
            began + interval
        } else {
            began + OBSERVATION_SLICE
        };
    }

    /// Fills in a guest's steal and memory locality from /proc; returns
    /// the sample (None: its qemu was not found).
    fn measure(&mut self, domain: &mut DomainStatus) -> Option<GuestSample> {
        let procfs = ProcFs::new(&self.paths.proc);
        let observed = self.observer.observed(&procfs, &domain.uuid)?;
        let (sample, rates) = (observed.sample.clone(), observed.rates);
        domain.qemu_pid = Some(sample.pid);
        domain.steal_pct = rates.steal_pct;
        domain.demand_cpus = rates.demand_cpus;
        domain.steal_seconds = Some(sample.run_delay_ns as f64 / 1e9);
        // Local means on the nodes its vCPUs run on, whatever the binding
        // says (a binding left behind by a move is exactly what to show);
        // the bound nodes only for a guest whose vCPUs float.
        let cpus: CpuSet = domain.vcpus.iter().flat_map(|v| v.cpus.clone()).collect();
        let own = if cpus.is_empty() {
            domain.memory_nodes.clone()
        } else {
            self.topology.nodes_of(&cpus)
        };
        let (local, remote) = guest_stats::memory_split(&sample.pages(), &own);
        domain.memory_pages_local = Some(local);
        domain.memory_pages_remote = Some(remote);
        Some(sample)
    }

    /// Rewrites the metrics file from a fresh status.
    pub(super) fn write_metrics(&mut self) {
        if self.config.metrics_file == MetricsFile::Off {
            self.observer.next_metrics = None;
            return;
        }
        self.observer.next_metrics = Some(Instant::now() + self.config.metrics_interval);
        let Some(path) = self.config.metrics_path(&self.paths.textfile_dir) else {
            return;
        };
        let Response::Status(report) = self.status() else {
            return;
        };
        let text = super::metrics::render(&report, super::metrics::Format::Prometheus);
        match super::metrics::write_file(&path, &text) {
            Ok(()) => {
                if std::mem::take(&mut self.observer.metrics_failing) {
                    self.logger
                        .info(&format!("metrics written to {} again", path.display()), &[]);
                }
            }
            Err(e) => {
                if !std::mem::replace(&mut self.observer.metrics_failing, true) {
                    self.logger.warn(
                        &format!("metrics not written: {e}{}", read_only_hint(&e)),
                        &[],
                    );
                }
            }
        }
    }

    fn isolated_processes(&self) -> Option<u64> {
        if !self.config.isolation.enabled {
            return None;
        }
        let settings = Settings::new(&self.config.isolation, &self.host.reserved, &self.topology);
        isolation::status(&System::host(&self.paths.state_dir), &settings)
            .ok()
            .map(|s| s.confined as u64)
    }

    /// The answer to `pinner status`.
    pub(super) fn status(&mut self) -> Response {
        let mut counters = self.counters.clone();
        counters.requests_refused = self.refused.load(Ordering::Relaxed);
        counters.libvirt_reconnects = self.session.reconnects;
        counters.libvirt_calls = self.session.calls();
        counters.hook_events_dropped =
            std::fs::symlink_metadata(self.paths.state_dir.join(HOOK_DROPS_FILE))
                .map_or(0, |m| m.len());
        let reserved = self.config.reserved_cpus.to_vec();
        let (specs, unreadable) = match self.known_guests() {
            Ok(observed) => observed,
            Err(e) => {
                if matches!(e, HvError::Disconnected(_)) {
                    self.session.drop_connection();
                }
                return Response::Status(Box::new(StatusReport {
                    mode: "unknown".into(),
                    enforcement: self.config.enforcement.as_str().into(),
                    reserved,
                    libvirt_connected: false,
                    warnings: vec![e.to_string()],
                    counters,
                    last_pass: self.memory.last.clone(),
                    ..StatusReport::default()
                }));
            }
        };
        let (plan, load) = self.plan(&specs);
        let mut warnings: Vec<String> = plan.warnings.iter().map(ToString::to_string).collect();
        warnings.extend(unreadable.iter().map(ToString::to_string));
        let mut domains = reconcile::domain_status(
            &specs,
            &plan,
            &self.memory.refused,
            self.topology.default_hugepage_kib,
        );
        for domain in &mut domains {
            if let Some(note) = self.adoption.note(&domain.uuid) {
                domain.memory_note = note;
            }
            domain.pin_latency_ms = self.observer.latency.by_domain.get(&domain.uuid).copied();
            let sample = self.measure(domain);
            let spec = specs.iter().find(|s| s.uuid == domain.uuid);
            if let (Some(spec), Some(gp)) =
                (spec, plan.guests.iter().find(|g| g.uuid == domain.uuid))
            {
                domain.cells = self.cell_status(spec, gp, sample.as_ref());
            }
        }
        Response::Status(Box::new(StatusReport {
            mode: plan.mode.as_str().into(),
            enforcement: self.config.enforcement.as_str().into(),
            pool: plan.pool.to_vec(),
            reserved,
            cpu_allocation_ratio: self.host.cpu_allocation_ratio,
            libvirt_connected: true,
            domains,
            warnings,
            counters,
            pin_latency: self.observer.latency.summary(),
            numa: guest_stats::host_numastat(&self.paths.sysfs_root),
            isolated_processes: self.isolated_processes(),
            memory: reconcile::node_memory(&plan),
            last_pass: self.memory.last.clone(),
            ranges: reconcile::range_status(&self.topology, &plan, &load),
            rebalanced: self.rebalancing.recent.iter().cloned().collect(),
        }))
    }

    /// The running guests as the daemon knows them, brought up to date
    /// with one listing (and a read of each guest changed since).
    fn known_guests(&mut self) -> Result<Running, HvError> {
        if self.connection().is_none() {
            // Not connected now (never, or reconnecting): "cannot connect".
            return Err(HvError::Unreachable(self.config.libvirt_uri.clone()));
        }
        let libvirt = self.session.current().expect("connected above");
        let refreshed = self.inventory.refresh(libvirt, false)?;
        Ok((refreshed.specs, refreshed.unreadable))
    }
}

/// What to do when the unit's sandbox (ProtectSystem=strict) keeps the
/// metrics file's directory read-only.
fn read_only_hint(error: &WriteError) -> String {
    match error {
        WriteError::Io { path, source } if source.raw_os_error() == Some(nix::libc::EROFS) => {
            let dir = path.parent().unwrap_or(path);
            format!(
                " (read-only here: under systemd, allow it with `systemctl edit pinner`: [Service] ReadWritePaths={})",
                dir.display()
            )
        }
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pinner_shared::protocol::HookOp;

    fn started(name: &str, uuid: &str, sent_at_unix_ns: u64) -> HookEvent {
        HookEvent {
            op: HookOp::Started,
            sub_op: "begin".into(),
            name: name.into(),
            uuid: uuid.into(),
            vcpus: 1,
            sent_at_unix_ns,
        }
    }

    fn spec(name: &str, uuid: &str) -> DomainSpec {
        DomainSpec {
            name: name.into(),
            uuid: uuid.into(),
            ..DomainSpec::default()
        }
    }

    /// qemu processes for guests `u-0`.. in a /proc fixture: pid 400 + i,
    /// one vCPU thread each.
    fn proc_fixture(guests: u32) -> ProcFs {
        let root = crate::test_support::scratch_dir("observe-proc");
        for i in 0..guests {
            let pid = 400 + i;
            let files = [
                ("cmdline".to_string(), format!("qemu\0-uuid\0u-{i}\0")),
                (
                    "cgroup".into(),
                    "0::/machine.slice/machine-qemu-x.scope\n".into(),
                ),
                (format!("task/{}/comm", pid + 1000), "CPU 0/KVM\n".into()),
                (format!("task/{}/schedstat", pid + 1000), "5 3 1\n".into()),
                (
                    "numa_maps".into(),
                    "7f00 default anon=10 N0=10 kernelpagesize_kB=4\n".into(),
                ),
            ];
            for (rest, text) in files {
                let path = root.join(format!("{pid}/{rest}"));
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(path, text).unwrap();
            }
        }
        ProcFs::new(&root)
    }

    /// Each guest is read once per interval, the longest unread first, a
    /// budget's worth at a time; one whose qemu is missing is not looked
    /// for again on every status.
    #[test]
    fn the_observation_reads_each_guest_once_per_interval_a_slice_at_a_time() {
        let procfs = proc_fixture(3);
        let specs: Vec<DomainSpec> = (0..4).map(|i| spec("g", &format!("u-{i}"))).collect();
        let mut observer = Observer::new(false);
        let hour = Duration::from_secs(3600);
        assert!(!observer.observe(&procfs, specs.iter(), hour, Duration::ZERO));
        assert!(observer.samples.is_empty(), "no budget, nothing read");
        assert!(observer.observe(&procfs, specs.iter(), hour, hour));
        assert_eq!(observer.samples.len(), 4);
        assert!(observer.samples["u-3"].1.is_none(), "u-3 has no qemu");
        let read_at: Vec<Instant> = specs.iter().map(|s| observer.samples[&s.uuid].0).collect();
        // Within the interval nothing is read again, by status either.
        assert!(observer.observe(&procfs, specs.iter(), hour, hour));
        assert!(observer.observed(&procfs, "u-3").is_none());
        assert_eq!(observer.observed(&procfs, "u-1").unwrap().sample.pid, 401);
        let again: Vec<Instant> = specs.iter().map(|s| observer.samples[&s.uuid].0).collect();
        assert_eq!(read_at, again);
        // Past it, all are; a guest gone is forgotten.
        assert!(observer.observe(&procfs, specs[1..].iter(), Duration::ZERO, hour));
        assert!(!observer.samples.contains_key("u-0"));
        assert!(specs[1..]
            .iter()
            .all(|s| observer.samples[&s.uuid].0 > read_at[1]));
    }

    #[test]
    fn latency_runs_from_started_to_a_settled_pass_of_a_managed_guest() {
        let mut latency = PinLatency::default();
        let now = unix_now_ns();
        latency.started(&started("a", "u-a", now - 40_000_000));
        latency.started(&started("b", "u-b", now - 10_000_000));
        // The hook could not read c's UUID: matched by name.
        latency.started(&started("c", "", now - 20_000_000));
        latency.started(&started("foreign", "u-f", now));
        let specs = [
            spec("a", "u-a"),
            spec("b", "u-b"),
            spec("c", "u-c"),
            spec("foreign", "u-f"),
        ];
        let managed = |uuid: &str| uuid != "u-f";
        // b was busy: it keeps waiting.
        latency.settle(&specs, &managed, &["u-b".to_string()]);
        assert!((40.0..1000.0).contains(&latency.by_domain["u-a"]));
        assert!((20.0..1000.0).contains(&latency.by_domain["u-c"]));
        assert!(!latency.by_domain.contains_key("u-b"));
        assert!(!latency.by_domain.contains_key("u-f"));
        assert_eq!(latency.awaiting.keys().collect::<Vec<_>>(), ["u-b"]);
        latency.settle(&specs, &managed, &[]);
        assert!(latency.by_domain["u-b"] >= 10.0);
        let summary = latency.summary();
        assert_eq!(summary.count, 3);
        assert!(summary.max_ms >= summary.p99_ms && summary.p99_ms >= summary.median_ms);
        // A guest that stopped is forgotten.
        latency.settle(&specs[..1], &managed, &[]);
        assert_eq!(latency.by_domain.len(), 1);
    }
}
