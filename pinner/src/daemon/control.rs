//! The control loop: it owns the libvirt session and everything passes
//! remember, waits for work or the next deadline, and decides when a pass
//! runs. All libvirt work happens here, on one thread, after the hook has
//! returned and libvirt has released the domain's job lock.

use super::adopt::Adoption;
use super::cells::CellMemory;
use super::inventory::Inventory;
use super::observe::Observer;
use super::pass::PassMemory;
use super::rebalance::Rebalancing;
use super::session::{Connection, Connector, Session};
use super::{HostPaths, Work};
use crate::config::{Config, Enforcement, MetricsFile};
use crate::engine::coalesce::Coalescer;
use crate::engine::hypervisor::HvError;
use crate::engine::placement::HostPolicy;
use crate::engine::release::{self, Everywhere};
use crate::engine::topology::Topology;
use crate::host::guest_ram::KernelPageMover;
use crate::isolation::keeper::Keeper;
use crate::libvirt::events::{Change, LibvirtEvent};
use pinner_shared::log::Logger;
use pinner_shared::protocol::{Counters, HookEvent, HookOp, ReleaseRequest, Response};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest a started guest waits for a pass while other starts are
/// still under way (see `coalesce`).
const BURST_MAX_WAIT: Duration = Duration::from_secs(2);

/// When the next pass is due.
pub struct Schedule {
    pub next_periodic: Instant,
    /// A pass that failed (libvirt unreachable) is tried again then.
    pub retry_at: Option<Instant>,
    pub coalescer: Coalescer,
    /// When a pass next reads every guest's XML (see `inventory`).
    pub next_full_read: Instant,
    /// The session's connection serial at the last full read.
    pub full_read_serial: u64,
}

/// What the daemon is started with.
pub struct Setup {
    pub config: Config,
    pub host: HostPolicy,
    pub config_path: Option<PathBuf>,
    pub topology: Topology,
    pub paths: HostPaths,
    pub logger: Arc<Logger>,
    pub connector: Box<dyn Connector>,
    /// Where libvirt's events are queued (a clone per connection).
    pub work_tx: Sender<Work>,
    /// Requests the intake refused (shared with its threads).
    pub refused: Arc<AtomicU64>,
}

pub struct Daemon {
    pub(super) config: Config,
    /// The config resolved against the host (and nova.conf).
    pub(super) host: HostPolicy,
    config_path: Option<PathBuf>,
    pub(super) topology: Topology,
    pub(super) paths: HostPaths,
    pub(super) logger: Arc<Logger>,
    pub(super) session: Session,
    pub(super) counters: Counters,
    pub(super) schedule: Schedule,
    pub(super) memory: PassMemory,
    pub(super) inventory: Inventory,
    pub(super) observer: Observer,
    pub(super) cells: CellMemory,
    pub(super) adoption: Adoption,
    pub(super) rebalancing: Rebalancing,
    keeper: Keeper,
    pub(super) refused: Arc<AtomicU64>,
    pub(super) work_tx: Sender<Work>,
}

/// One wake-up's work, sorted by what it asks for.
#[derive(Default)]
struct Batch {
    pass_needed: bool,
    reconcile_replies: Vec<Sender<Response>>,
    status_replies: Vec<Sender<Response>>,
    /// Served before the pass, so it sees the guests released.
    releases: Vec<(ReleaseRequest, Sender<Response>)>,
    stop: bool,
}

impl Daemon {
    pub fn new(setup: Setup) -> Daemon {
        let now = Instant::now();
        let config = setup.config;
        Daemon {
            session: Session::new(
                setup.connector,
                &config.libvirt_uri,
                setup.topology.cpumap_width,
            ),
            schedule: Schedule {
                next_periodic: now + config.reconcile_interval,
                retry_at: None,
                coalescer: Coalescer::new(BURST_MAX_WAIT),
                next_full_read: now,
                full_read_serial: 0,
            },
            observer: Observer::new(config.metrics_file != MetricsFile::Off),
            cells: CellMemory::new(Box::new(KernelPageMover::new(&setup.paths.proc))),
            config,
            host: setup.host,
            config_path: setup.config_path,
            topology: setup.topology,
            paths: setup.paths,
            logger: setup.logger,
            counters: Counters::default(),
            memory: PassMemory::default(),
            inventory: Inventory::default(),
            adoption: Adoption::default(),
            rebalancing: Rebalancing::default(),
            keeper: Keeper::default(),
            refused: setup.refused,
            work_tx: setup.work_tx,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Serves work until told to stop; guests started while the daemon was
    /// down get pinned by the first pass.
    pub fn run(&mut self, rx: &Receiver<Work>) {
        self.reconcile();
        while self.step(rx) {}
    }

    /// One wake-up: waits for work or the next deadline, serves everything
    /// queued meanwhile with at most one pass. Returns false when told to
    /// stop or when nothing can send work any more.
    pub fn step(&mut self, rx: &Receiver<Work>) -> bool {
        let now = Instant::now();
        let mut queued = Vec::new();
        match rx.recv_timeout(self.next_wake(now).saturating_duration_since(now)) {
            Ok(work) => queued.push(work),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return false,
        }
        // Coalesce: everything queued meanwhile is served by one pass.
        queued.extend(rx.try_iter());
        let batch = self.sort(queued);
        if batch.stop {
            let releases = batch.releases.iter().map(|(_, reply)| reply);
            for reply in batch
                .reconcile_replies
                .iter()
                .chain(&batch.status_replies)
                .chain(releases)
            {
                let _ = reply.send(Response::Error("daemon is stopping".into()));
            }
            return false;
        }
        for (request, reply) in batch.releases {
            let _ = reply.send(self.release(&request));
        }
        if batch.pass_needed || self.pass_due(Instant::now()) {
            let report = self.reconcile();
            for reply in batch.reconcile_replies {
                let _ = reply.send(Response::Reconciled(report.clone()));
            }
        }
        if Instant::now() >= self.observer.next_observation {
            self.observe();
        }
        for reply in batch.status_replies {
            let _ = reply.send(self.status());
        }
        if self
            .observer
            .next_metrics
            .is_some_and(|t| Instant::now() >= t)
        {
            self.write_metrics();
        }
        true
    }

    fn next_wake(&self, now: Instant) -> Instant {
        let s = &self.schedule;
        let observation = Some(self.observer.next_observation);
        [
            s.retry_at,
            s.coalescer.due(now),
            self.observer.next_metrics,
            observation,
        ]
        .into_iter()
        .flatten()
        .fold(s.next_periodic, Instant::min)
    }

    fn pass_due(&self, now: Instant) -> bool {
        let s = &self.schedule;
        now >= s.next_periodic
            || s.retry_at.is_some_and(|r| now >= r)
            || s.coalescer.due(now).is_some_and(|d| now >= d)
    }

    fn sort(&mut self, queued: Vec<Work>) -> Batch {
        let mut batch = Batch::default();
        for work in queued {
            match work {
                Work::Event(event) => self.note_event(&event),
                Work::Libvirt(event) => batch.pass_needed |= self.note_libvirt_event(event),
                Work::Reconcile(reply) => {
                    batch.pass_needed = true;
                    batch.reconcile_replies.push(reply);
                }
                Work::Status(reply) => batch.status_replies.push(reply),
                Work::Release(request, reply) => batch.releases.push((request, reply)),
                Work::MemoryMoved { uuid, result } => {
                    self.memory_moved(&uuid, result);
                    batch.pass_needed = true;
                }
                Work::Reload => batch.pass_needed |= self.reload(),
                Work::Stop => {
                    batch.stop = true;
                    break;
                }
            }
        }
        batch
    }

    fn note_event(&mut self, event: &HookEvent) {
        self.counters.events_received += 1;
        // Whatever the hook announced, the guest is read anew.
        self.inventory.mark_stale(&event.uuid);
        if event.op == HookOp::Started {
            self.observer.latency.started(event);
        }
        self.logger.debug(
            &format!("hook event {} {}", event.op.as_str(), event.sub_op),
            &[("DOMAIN", &event.name), ("OP", event.op.as_str())],
        );
        self.schedule
            .coalescer
            .hook_event(event.op, event.guest_key(), Instant::now());
    }

    /// A pin change that is not pinner's own asks for a pass; a closed
    /// connection is dropped at once (and reconnected with backoff). Returns
    /// whether a pass must run now.
    fn note_libvirt_event(&mut self, event: LibvirtEvent) -> bool {
        match event {
            LibvirtEvent::ConnectionClosed(reason) => {
                if self.session.drop_connection() {
                    self.logger
                        .warn(&format!("lost libvirt connection: {reason}"), &[]);
                }
                true
            }
            LibvirtEvent::Changed { uuid, what } => {
                self.inventory.mark_stale(&uuid);
                // Starts and stops come with hook events; a changed
                // description may change the plan (a policy set in the
                // metadata, a device added), unless it is pinner's own.
                let own = what == Change::Metadata && self.memory.is_own_metadata(&uuid);
                if what != Change::Lifecycle && !own {
                    self.schedule.coalescer.changed(Instant::now());
                }
                false
            }
            LibvirtEvent::PinsChanged { uuid, name, pins } => {
                self.inventory.mark_stale(&uuid);
                let outside: Vec<String> = pins
                    .iter()
                    .filter(|(field, cpus)| !self.memory.is_own_pin(&uuid, field, cpus))
                    .map(|(field, cpus)| format!("{field}={cpus}"))
                    .collect();
                if !outside.is_empty() {
                    self.counters.outside_pin_changes += 1;
                    self.logger.info(
                        &format!("pins changed outside pinner: {}", outside.join(" ")),
                        &[("DOMAIN", &name)],
                    );
                    self.schedule.coalescer.changed(Instant::now());
                }
                false
            }
        }
    }

    /// Re-reads the config; a broken one is reported and the old one kept.
    /// Returns whether a pass must run for the new one.
    fn reload(&mut self) -> bool {
        let loaded = Config::load(self.config_path.as_deref()).and_then(|c| {
            let host = c.resolve(&self.topology)?;
            Ok((c, host))
        });
        let (config, host) = match loaded {
            Ok(loaded) => loaded,
            Err(e) => {
                self.logger.error(
                    &format!("configuration not reloaded, keeping the running one: {e}"),
                    &[],
                );
                return false;
            }
        };
        let was_isolating = self.isolating();
        self.host = host;
        if config.socket != self.config.socket || config.socket_group != self.config.socket_group {
            self.logger.warn(
                "socket or socket_group changed in the config; it takes effect at the next restart",
                &[],
            );
        }
        self.session.set_uri(&config.libvirt_uri);
        self.observer.next_metrics = (config.metrics_file != MetricsFile::Off).then(Instant::now);
        self.config = config;
        // A reload is also how an operator has every guest read again now.
        self.schedule.next_full_read = Instant::now();
        self.logger.info("configuration reloaded", &[]);
        self.update_isolation(was_isolating);
        true
    }

    /// Whether isolation is on and kept: enabled, and in enforce mode.
    pub fn isolating(&self) -> bool {
        self.config.isolation.enabled && self.config.enforcement == Enforcement::Enforce
    }

    /// Isolates (or re-isolates with new settings) when enabled; undoes it
    /// when it was enabled and no longer is. In observe mode it neither
    /// applies nor keeps it, and leaves the host as it is.
    pub fn update_isolation(&mut self, was_enabled: bool) {
        let observe = self.config.enforcement == Enforcement::Observe;
        self.keeper.pause(observe);
        if observe {
            if self.config.isolation.enabled {
                self.logger.info(
                    "observe mode: host isolation is neither applied nor kept (enforce applies it)",
                    &[],
                );
            }
            return;
        }
        self.keeper.update(
            &self.config.isolation,
            &self.host.reserved,
            &self.topology,
            &self.paths.state_dir,
            &self.logger,
            was_enabled,
        );
    }

    /// Puts every confined process back (the daemon stopping with
    /// `restore_on_exit`).
    pub fn undo_isolation(&mut self) {
        Keeper::undo(&self.config.isolation, &self.paths.state_dir, &self.logger);
    }

    /// `pinner release`: through the daemon's connection, between passes,
    /// each change logged as it is made and known as pinner's own when
    /// libvirt echoes it.
    fn release(&mut self, request: &ReleaseRequest) -> Response {
        if self.connection().is_none() {
            return Response::Error(format!(
                "libvirt not reachable at {}",
                self.config.libvirt_uri
            ));
        }
        let everywhere = Everywhere::of(&self.topology);
        let logger = self.logger.clone();
        let memory = &mut self.memory;
        let inventory = &mut self.inventory;
        let libvirt = self.session.current().expect("connected above");
        let released = release::release(libvirt, &everywhere, request, |domain, action| {
            inventory.mark_stale(&domain.uuid);
            memory.applied(&domain.uuid, action);
            super::pass::log_applied(&logger, domain, action, true);
        });
        match released {
            Ok(reports) => {
                // The released guests leave the plan; the others may
                // take their CPUs (libvirt's echo of the metadata is
                // known as pinner's own and asks for no pass).
                self.schedule.coalescer.changed(Instant::now());
                Response::Released(reports)
            }
            Err(e) => {
                if matches!(e, HvError::Disconnected(_)) {
                    self.session.drop_connection();
                }
                Response::Error(e.to_string())
            }
        }
    }

    /// The libvirt connection, (re)connecting with backoff; None while
    /// libvirt is unreachable (a pass is then due when the next connect is).
    pub(super) fn connection(&mut self) -> Option<&mut dyn Connection> {
        let tx = self.work_tx.clone();
        let sink = move || -> crate::libvirt::events::Sink {
            Arc::new(move |event| {
                let _ = tx.send(Work::Libvirt(event));
            })
        };
        match self.session.get(&self.logger, sink) {
            Ok(conn) => Some(conn),
            Err(unreachable) => {
                self.schedule.retry_at = Some(unreachable.retry_at);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpuset::CpuSet;
    use crate::engine::hypervisor::fake::FakeHypervisor;
    use crate::engine::hypervisor::{HvError, Hypervisor, Listed, Listing};
    use crate::libvirt::events::{EventsError, Sink};
    use crate::test_support::scratch_dir;
    use pinner_shared::log::Level;
    use std::sync::mpsc;
    use std::sync::Mutex;

    /// libvirt as a test sees it: the fake hypervisor the daemon talks to,
    /// whether libvirtd is up, how often the daemon connected, and where
    /// the last connection sends libvirt's events.
    #[derive(Default)]
    struct World {
        hv: FakeHypervisor,
        down: bool,
        connects: u32,
        sink: Option<Sink>,
    }

    type Shared = Arc<Mutex<World>>;

    struct FakeConnector(Shared);

    impl Connector for FakeConnector {
        fn connect(&mut self, _: &str, _: u32) -> Result<Box<dyn Connection>, HvError> {
            let mut world = self.0.lock().unwrap();
            world.connects += 1;
            if world.down {
                return Err(HvError::Disconnected("connection refused".into()));
            }
            Ok(Box::new(FakeConnection(self.0.clone())))
        }
    }

    /// One connection: every call fails as a lost connection while
    /// libvirtd is down.
    struct FakeConnection(Shared);

    impl FakeConnection {
        fn call<T>(
            &self,
            f: impl FnOnce(&mut FakeHypervisor) -> Result<T, HvError>,
        ) -> Result<T, HvError> {
            let mut world = self.0.lock().unwrap();
            if world.down {
                return Err(HvError::Disconnected("libvirtd went away".into()));
            }
            f(&mut world.hv)
        }
    }

    impl Hypervisor for FakeConnection {
        fn list_running(&mut self, read: &dyn Fn(&Listed) -> bool) -> Result<Listing, HvError> {
            self.call(|hv| hv.list_running(read))
        }
        fn set_metadata(
            &mut self,
            uuid: &str,
            element: &str,
            persistent: bool,
        ) -> Result<(), HvError> {
            self.call(|hv| hv.set_metadata(uuid, element, persistent))
        }
        fn pin_vcpu(&mut self, uuid: &str, vcpu: u32, cpus: &CpuSet) -> Result<(), HvError> {
            self.call(|hv| hv.pin_vcpu(uuid, vcpu, cpus))
        }
        fn pin_emulator(&mut self, uuid: &str, cpus: &CpuSet) -> Result<(), HvError> {
            self.call(|hv| hv.pin_emulator(uuid, cpus))
        }
        fn pin_iothread(&mut self, uuid: &str, id: u32, cpus: &CpuSet) -> Result<(), HvError> {
            self.call(|hv| hv.pin_iothread(uuid, id, cpus))
        }
        fn set_memory_nodes(
            &mut self,
            uuid: &str,
            nodes: &CpuSet,
            restrictive: bool,
        ) -> Result<(), HvError> {
            self.call(|hv| hv.set_memory_nodes(uuid, nodes, restrictive))
        }
        fn job_active(&mut self, uuid: &str) -> Result<bool, HvError> {
            self.call(|hv| hv.job_active(uuid))
        }
    }

    impl Connection for FakeConnection {
        fn subscribe(&mut self, sink: Sink) -> Result<(), EventsError> {
            self.0.lock().unwrap().sink = Some(sink);
            Ok(())
        }
    }

    struct Harness {
        world: Shared,
        daemon: Daemon,
        rx: Receiver<Work>,
        tx: Sender<Work>,
        config_file: PathBuf,
    }

    /// A daemon on a 4-CPU host with CPU 0 reserved, its config in a file
    /// of its own, talking to an empty fake libvirt.
    fn harness(tag: &str) -> Harness {
        let dir = scratch_dir(&format!("control-{tag}"));
        let config_file = dir.join("pinner.toml");
        std::fs::write(&config_file, "reserved_cpus = \"0\"\n").unwrap();
        let config = Config::load(Some(&config_file)).unwrap();
        let topology = Topology::uniform(&CpuSet::parse("0-3").unwrap(), 1);
        let host = config.resolve(&topology).unwrap();
        let world = Shared::default();
        let (tx, rx) = mpsc::channel();
        let daemon = Daemon::new(Setup {
            config,
            host,
            config_path: Some(config_file.clone()),
            topology,
            paths: HostPaths {
                proc: dir.join("proc"),
                sysfs_root: dir.clone(),
                state_dir: dir.join("run"),
                textfile_dir: dir.join("textfile"),
            },
            logger: Arc::new(Logger::new("pinner-test", Level::Debug)),
            connector: Box::new(FakeConnector(world.clone())),
            work_tx: tx.clone(),
            refused: Arc::default(),
        });
        Harness {
            world,
            daemon,
            rx,
            tx,
            config_file,
        }
    }

    impl Harness {
        fn add_guest(&self, name: &str, vcpus: u32) {
            let xml = format!(
                "<domain><name>{name}</name><uuid>u-{name}</uuid><vcpu>{vcpus}</vcpu></domain>"
            );
            self.world.lock().unwrap().hv.add(&xml);
        }

        fn hook(&self, op: HookOp, name: &str) {
            let event = HookEvent {
                op,
                sub_op: "begin".into(),
                name: name.into(),
                uuid: format!("u-{name}"),
                vcpus: 1,
                sent_at_unix_ns: 0,
            };
            self.tx.send(Work::Event(event)).unwrap();
        }

        /// libvirt's event, through the sink the daemon subscribed.
        fn libvirt_event(&self, event: LibvirtEvent) {
            let sink = self.world.lock().unwrap().sink.clone();
            sink.expect("the daemon subscribed to libvirt's events")(event);
        }

        fn step(&mut self) {
            assert!(self.daemon.step(&self.rx), "the loop must keep running");
        }

        fn pins(&self, name: &str) -> Vec<String> {
            let world = self.world.lock().unwrap();
            let spec = &world.hv.domains[&format!("u-{name}")];
            (0..spec.vcpus)
                .map(|v| spec.vcpu_pin(v).map_or("-".into(), ToString::to_string))
                .collect()
        }

        fn connects(&self) -> u32 {
            self.world.lock().unwrap().connects
        }
    }

    /// No `[metrics] file`: pinner.prom in node_exporter's directory while
    /// that directory exists, nothing while it does not.
    #[test]
    fn metrics_go_to_the_textfile_directory_only_while_it_exists() {
        let mut h = harness("textfile");
        let dir = h.daemon.paths.textfile_dir.clone();
        h.daemon.write_metrics();
        assert!(!dir.exists(), "no directory made for node_exporter");
        std::fs::create_dir(&dir).unwrap();
        h.daemon.write_metrics();
        let text = std::fs::read_to_string(dir.join("pinner.prom")).unwrap();
        assert!(text.contains("pinner_libvirt_connected "), "{text}");
    }

    #[test]
    fn a_started_event_runs_a_pass_that_pins_the_guest() {
        let mut h = harness("event");
        h.add_guest("a", 2);
        assert_eq!(h.pins("a"), ["-", "-"]);
        h.hook(HookOp::Started, "a");
        h.step();
        assert_eq!(h.pins("a"), ["1", "2"], "one-to-one, off reserved CPU 0");
        assert_eq!(h.daemon.counters.events_received, 1);
        assert_eq!(h.daemon.counters.event_passes, 1);
        assert_eq!(
            h.daemon.counters.pins_applied, 4,
            "2 vCPUs, emulator, memory"
        );
    }

    #[test]
    fn starts_under_way_hold_the_pass_so_a_burst_shares_one() {
        let mut h = harness("burst");
        for name in ["a", "b", "c"] {
            h.add_guest(name, 1);
            h.hook(HookOp::Prepare, name);
        }
        h.hook(HookOp::Started, "a");
        h.step();
        assert_eq!(
            h.daemon.counters.reconciles, 0,
            "b and c are still starting"
        );
        assert_eq!(h.pins("a"), ["-"]);
        h.hook(HookOp::Started, "b");
        h.hook(HookOp::Started, "c");
        h.step();
        assert_eq!(h.daemon.counters.reconciles, 1);
        assert_eq!(h.daemon.counters.event_passes, 1);
        assert_eq!(h.daemon.counters.events_received, 6);
        for name in ["a", "b", "c"] {
            assert_ne!(h.pins(name), ["-"], "{name} pinned by the shared pass");
        }
    }

    #[test]
    fn a_lost_libvirt_is_reconnected_with_backoff_and_fully_reconciled() {
        let mut h = harness("outage");
        h.add_guest("a", 1);
        h.daemon.reconcile();
        assert_eq!((h.connects(), h.pins("a")), (1, vec!["1".to_string()]));

        // libvirtd stops; a guest starts meanwhile.
        h.world.lock().unwrap().down = true;
        h.add_guest("b", 1);
        h.libvirt_event(LibvirtEvent::ConnectionClosed(
            "libvirtd closed the connection",
        ));
        h.step();
        assert_eq!(h.connects(), 2, "one reconnect tried at once");
        assert_eq!(h.pins("b"), ["-"]);
        let Response::Status(status) = h.daemon.status() else {
            panic!("status must answer while libvirt is down")
        };
        assert!(!status.libvirt_connected);
        let first_retry = h.daemon.schedule.retry_at.expect("a retry is scheduled");

        // Still down: the next try waits for the backoff, then doubles it.
        h.step();
        assert_eq!(h.connects(), 3);
        assert!(Instant::now() >= first_retry);
        let second_retry = h.daemon.schedule.retry_at.expect("another retry");
        assert!(second_retry - first_retry > Duration::from_millis(250));

        // Back: the retry reconnects and places what started meanwhile.
        h.world.lock().unwrap().down = false;
        h.step();
        assert_eq!(h.connects(), 4);
        assert_eq!(h.pins("b"), ["2"]);
        assert_eq!(h.pins("a"), ["1"], "a keeps its pin");
        assert_eq!(h.daemon.session.reconnects, 1);
        let last = h.daemon.memory.last.clone().unwrap();
        assert!(
            last.full_read,
            "events may have been lost: every guest read"
        );
    }

    /// A steady pass lists and reads nothing; a guest libvirt's events say
    /// changed is read again; a change no event announces waits for the
    /// full read, which says it found one.
    #[test]
    fn passes_read_only_what_changed_and_the_full_read_catches_the_rest() {
        let mut h = harness("incremental");
        h.add_guest("a", 1);
        h.add_guest("b", 1);
        let first = h.daemon.reconcile();
        assert_eq!((first.full_read, first.domains_read), (true, 2));
        // pinner's own changes are read back once.
        let echo = h.daemon.reconcile();
        assert_eq!((echo.full_read, echo.domains_read), (false, 2));
        let steady = h.daemon.reconcile();
        assert_eq!((steady.full_read, steady.domains_read), (false, 0));
        assert_eq!(steady.domains, 2);
        assert_eq!(h.world.lock().unwrap().hv.reads, 4);

        // The echo of pinner's own metadata write asks for no pass...
        let passes = h.daemon.counters.reconciles;
        let metadata_event = || LibvirtEvent::Changed {
            uuid: "u-b".into(),
            what: Change::Metadata,
        };
        h.libvirt_event(metadata_event());
        h.step();
        assert_eq!(h.daemon.counters.reconciles, passes, "no pass for an echo");
        // ...a policy set in b's metadata later does, reading b.
        h.daemon.memory.own_metadata.clear();
        h.libvirt_event(metadata_event());
        h.step();
        assert_eq!(h.daemon.counters.reconciles, passes + 1);
        assert_eq!(h.daemon.memory.last.as_ref().unwrap().domains_read, 1);

        // b gets a vCPU with no event: passes do not see it...
        h.world
            .lock()
            .unwrap()
            .hv
            .domains
            .get_mut("u-b")
            .unwrap()
            .vcpus = 2;
        h.daemon.reconcile();
        assert_eq!(h.pins("b"), ["2", "-"]);
        // ...until the full read, due on its interval.
        h.daemon.schedule.next_full_read = Instant::now();
        let full = h.daemon.reconcile();
        assert_eq!((full.full_read, full.domains_read), (true, 2));
        assert_eq!(h.pins("b"), ["2", "3"]);
        assert_eq!(h.daemon.counters.changes_found_by_full_read, 1);
        assert_eq!(h.daemon.counters.full_reads, 2);
        let Response::Status(status) = h.daemon.status() else {
            panic!("status answers")
        };
        assert_eq!(status.last_pass.unwrap().domains_read, 2);
    }

    #[test]
    fn a_broken_reload_keeps_the_running_config() {
        let mut h = harness("reload");
        h.add_guest("a", 1);
        h.daemon.reconcile();
        assert_eq!(h.pins("a"), ["1"]);
        let passes = h.daemon.counters.reconciles;

        std::fs::write(&h.config_file, "reserved_cpus = [\n").unwrap();
        h.tx.send(Work::Reload).unwrap();
        h.step();
        assert_eq!(h.daemon.config().reserved_cpus.to_string(), "0");
        assert_eq!(
            h.daemon.counters.reconciles, passes,
            "no pass for a refused config"
        );

        // A config that parses but does not fit the host is refused too.
        std::fs::write(&h.config_file, "reserved_cpus = \"0-7\"\n").unwrap();
        h.tx.send(Work::Reload).unwrap();
        h.step();
        assert_eq!(h.daemon.config().reserved_cpus.to_string(), "0");

        std::fs::write(&h.config_file, "reserved_cpus = \"0-1\"\n").unwrap();
        h.tx.send(Work::Reload).unwrap();
        h.step();
        assert_eq!(h.daemon.config().reserved_cpus.to_string(), "0-1");
        assert_eq!(h.pins("a"), ["2"], "moved off the newly reserved CPU");
        let last = h.daemon.memory.last.as_ref().unwrap();
        assert!(last.full_read, "a reload reads every guest again");
    }

    #[test]
    fn pins_libvirt_echoes_back_are_not_outside_changes() {
        let mut h = harness("echo");
        h.add_guest("a", 1);
        h.daemon.reconcile();
        let echoed = vec![
            ("cputune.vcpupin0".to_string(), "1".to_string()),
            ("cputune.emulatorpin".to_string(), "0".to_string()),
        ];
        h.libvirt_event(LibvirtEvent::PinsChanged {
            uuid: "u-a".into(),
            name: "a".into(),
            pins: echoed,
        });
        h.step();
        assert_eq!(h.daemon.counters.outside_pin_changes, 0);
        let passes = h.daemon.counters.reconciles;

        // Someone pins vCPU 0 onto the reserved CPU by hand: counted, and
        // the pass it asks for puts it back.
        h.world
            .lock()
            .unwrap()
            .hv
            .pin_vcpu("u-a", 0, &CpuSet::parse("0").unwrap())
            .unwrap();
        h.libvirt_event(LibvirtEvent::PinsChanged {
            uuid: "u-a".into(),
            name: "a".into(),
            pins: vec![("cputune.vcpupin0".into(), "0".into())],
        });
        h.step();
        assert_eq!(h.daemon.counters.outside_pin_changes, 1);
        assert_eq!(h.daemon.counters.reconciles, passes + 1);
        assert_eq!(h.pins("a"), ["1"]);
    }

    #[test]
    fn stop_answers_waiting_requests_and_ends_the_loop() {
        let mut h = harness("stop");
        let (reply_tx, reply_rx) = mpsc::channel();
        h.tx.send(Work::Status(reply_tx)).unwrap();
        h.tx.send(Work::Stop).unwrap();
        assert!(!h.daemon.step(&h.rx));
        assert!(matches!(reply_rx.recv().unwrap(), Response::Error(m) if m.contains("stopping")));
    }
}
