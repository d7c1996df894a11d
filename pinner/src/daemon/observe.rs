//! What the daemon observes and reports: how long started guests waited
//! for their pins, each guest's steal and memory locality, the status
//! answer and the metrics file.

use super::control::Daemon;
use crate::config::MetricsFile;
use crate::engine::cpuset::CpuSet;
use crate::engine::domain::DomainSpec;
use crate::engine::hypervisor::HvError;
use crate::engine::reconcile;
use crate::host::file::WriteError;
use crate::host::guest_stats::{self, GuestSample, StealTracker};
use crate::host::procs::ProcFs;
use crate::isolation::{self, Settings, System};
use pinner_shared::paths::HOOK_DROPS_FILE;
use pinner_shared::protocol::{DomainStatus, HookEvent, LatencySummary, Response, StatusReport};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::time::Instant;

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
/// A started event whose guest never shows up is forgotten after this.
const AWAIT_LIMIT_NS: u64 = 60_000_000_000;

fn unix_now_ns() -> u64 {
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

/// Per-guest measurements kept between passes, and the metrics file's clock.
pub struct Observer {
    pub latency: PinLatency,
    steal: StealTracker,
    /// Guest UUID → its qemu pid, found once and checked on each use.
    qemu_pids: HashMap<String, u32>,
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
            steal: StealTracker::default(),
            qemu_pids: HashMap::new(),
            next_metrics: metrics_on.then(Instant::now),
            metrics_failing: false,
        }
    }

    /// Samples one guest from /proc (its qemu pid remembered for the next
    /// time) and records it for steal; returns the sample and the steal of
    /// the last interval.
    fn sample_guest(
        &mut self,
        procfs: &ProcFs,
        uuid: &str,
        now: Instant,
    ) -> Option<(GuestSample, Option<f64>)> {
        let hint = self.qemu_pids.get(uuid).copied();
        let sample = guest_stats::sample(procfs, uuid, hint)?;
        self.qemu_pids.insert(uuid.to_string(), sample.pid);
        let steal = self.steal.record(uuid, now, &sample);
        Some((sample, steal))
    }

    /// Samples every running guest's steal, so each figure covers at most a
    /// reconcile interval whenever status is asked; returns the samples by
    /// guest UUID (the pass places cells' memory from them).
    pub fn sample_guests(
        &mut self,
        procfs: &ProcFs,
        specs: &[DomainSpec],
    ) -> HashMap<String, GuestSample> {
        self.qemu_pids
            .retain(|uuid, _| specs.iter().any(|s| &s.uuid == uuid));
        self.steal
            .retain(|uuid| specs.iter().any(|s| s.uuid == uuid));
        let now = Instant::now();
        specs
            .iter()
            .filter_map(|spec| {
                let (sample, _) = self.sample_guest(procfs, &spec.uuid, now)?;
                Some((spec.uuid.clone(), sample))
            })
            .collect()
    }
}

impl Daemon {
    /// Fills in a guest's steal and memory locality from /proc; returns
    /// the sample (None: its qemu was not found).
    fn measure(&mut self, domain: &mut DomainStatus) -> Option<GuestSample> {
        let procfs = ProcFs::new(&self.paths.proc);
        let (sample, steal) = self
            .observer
            .sample_guest(&procfs, &domain.uuid, Instant::now())?;
        domain.qemu_pid = Some(sample.pid);
        domain.steal_pct = steal;
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
        counters.hook_events_dropped =
            std::fs::symlink_metadata(self.paths.state_dir.join(HOOK_DROPS_FILE))
                .map_or(0, |m| m.len());
        let reserved = self.config.reserved_cpus.to_vec();
        let observed = match self.connection() {
            Some(libvirt) => libvirt.running_domains(),
            // Not connected now (never, or reconnecting): "cannot connect".
            None => Err(HvError::Unreachable(self.config.libvirt_uri.clone())),
        };
        let (specs, unreadable) = match observed {
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
                    ..StatusReport::default()
                }));
            }
        };
        let plan = self.plan(&specs);
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
        }))
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
