//! `pinner daemon`: the socket intake, the coalescing queue and the
//! reconcile loop that owns the libvirt connection.
//!
//! Threads: one accepts connections (and one short-lived thread per
//! connection, so a slow client cannot stall others), one turns signals into
//! messages, and the main thread reconciles. Events are only queued; all
//! libvirt work happens on the main thread, after the hook has returned and
//! libvirt has released the domain's job lock.

use crate::coalesce::Coalescer;
use crate::config::{Config, SocketGroup};
use crate::cpuset::CpuSet;
use crate::guest_stats::{self, GuestSample, StealTracker};
use crate::hypervisor::{HvError, Hypervisor, Libvirt};
use crate::isolation::{self, PidFileWatch, Settings, Sweep, System};
use crate::libvirt_events::{self, LibvirtEvent};
use crate::placement::HostPolicy;
use crate::procs::ProcFs;
use crate::reconcile::{self, Action};
use crate::topology::Topology;
use pinner_shared::log::Logger;
use pinner_shared::paths::HOOK_DROPS_FILE;
use pinner_shared::protocol::{
    Counters, DomainStatus, HookEvent, HookOp, LatencySummary, ReconcileReport, Request, Response,
    StatusReport,
};
use pinner_shared::wire::{self, WireError};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Connections served at once; more are closed at once (hooks retry nothing,
/// the periodic reconcile covers them).
const MAX_CONNECTIONS: usize = 64;
/// A client must send its whole request within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// A CLI request waits this long for the reconcile loop.
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);
const RECONNECT_MIN: Duration = Duration::from_millis(250);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// "cannot acquire state change lock": retry after this, doubling up to the
/// maximum while the domain stays busy.
const BUSY_RETRY_MIN: Duration = Duration::from_millis(100);
const BUSY_RETRY_MAX: Duration = Duration::from_millis(500);
/// The longest a started guest waits for a pass while other starts are
/// still under way (see `coalesce`).
const BURST_MAX_WAIT: Duration = Duration::from_secs(2);

enum Work {
    Event(HookEvent),
    Libvirt(LibvirtEvent),
    Status(Sender<Response>),
    Reconcile(Sender<Response>),
    Reload,
    Stop,
}

pub fn run(config_path: Option<PathBuf>) -> Result<(), String> {
    let config = Config::load(config_path.as_deref()).map_err(|e| e.to_string())?;
    let topology = Topology::read(Path::new("/"))?;
    let host = config.resolve(&topology).map_err(|e| e.to_string())?;
    let logger = Arc::new(Logger::new("pinner", config.log_level));

    let listener = bind_socket(&config.socket, config.socket_group.as_ref())?;
    let allowed_gid = config.socket_group.as_ref().map(|g| g.gid);
    let refused = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel();
    spawn_signal_thread(tx.clone())?;
    {
        let (tx, logger, refused) = (tx.clone(), logger.clone(), refused.clone());
        std::thread::Builder::new()
            .name("intake".into())
            .spawn(move || accept_loop(listener, tx, logger, allowed_gid, refused))
            .map_err(|e| format!("cannot start intake thread: {e}"))?;
    }
    logger.info(
        &format!(
            "pinner daemon started: socket {}, libvirt {}, reserved CPUs \"{}\", online {}",
            config.socket.display(),
            config.libvirt_uri,
            config.reserved_cpus,
            topology.online
        ),
        &[],
    );
    // Without libvirt's events, hand-made pin changes wait for the periodic
    // reconcile, and a closed connection for the next call.
    if let Err(e) = libvirt_events::start_event_loop() {
        logger.warn(&e, &[]);
    }
    let socket = config.socket.clone();
    let mut daemon = Daemon::new(
        config,
        host,
        config_path,
        topology,
        logger.clone(),
        tx,
        refused,
    );
    daemon.update_isolation(false);
    // Ready: the socket takes events (the first reconcile follows at once).
    if let Err(e) = crate::notify::notify("READY=1") {
        logger.warn(&format!("cannot tell systemd we are ready: {e}"), &[]);
    }
    daemon.run(&rx);
    let _ = crate::notify::notify("STOPPING=1");
    if daemon.config.isolation.enabled && daemon.config.isolation.restore_on_exit {
        daemon.undo_isolation();
    }
    let _ = std::fs::remove_file(&socket);
    logger.info("pinner daemon stopped", &[]);
    Ok(())
}

/// Binds the socket: mode 0600, or 0660 owned by `group` when one is set.
fn bind_socket(path: &Path, group: Option<&SocketGroup>) -> Result<UnixListener, String> {
    let shown = path.display();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(format!("another pinner daemon is listening on {shown}"));
        }
        // A stale socket from a daemon that died; anything else is not ours.
        let meta = std::fs::symlink_metadata(path).map_err(|e| format!("{shown}: {e}"))?;
        if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
            return Err(format!(
                "{shown} exists and is not a socket; refusing to replace it"
            ));
        }
        std::fs::remove_file(path).map_err(|e| format!("cannot remove stale {shown}: {e}"))?;
    }
    let listener =
        UnixListener::bind(path).map_err(|e| format!("cannot listen on {shown}: {e}"))?;
    let mode = match group {
        Some(group) => {
            std::os::unix::fs::chown(path, None, Some(group.gid))
                .map_err(|e| format!("cannot give {shown} to group {}: {e}", group.name))?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot restrict {shown}: {e}"))?;
    Ok(listener)
}

fn spawn_signal_thread(tx: Sender<Work>) -> Result<(), String> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGTERM])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                let work = if signal == SIGHUP {
                    Work::Reload
                } else {
                    Work::Stop
                };
                if tx.send(work).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| format!("cannot start signal thread: {e}"))?;
    Ok(())
}

fn accept_loop(
    listener: UnixListener,
    tx: Sender<Work>,
    logger: Arc<Logger>,
    allowed_gid: Option<u32>,
    refused: Arc<AtomicU64>,
) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            refused.fetch_add(1, Ordering::Relaxed);
            logger.warn("too many connections; closing one", &[]);
            continue;
        }
        let (conn_tx, conn_logger, conn_active) = (tx.clone(), logger.clone(), active.clone());
        let conn_refused = refused.clone();
        let spawned = std::thread::Builder::new()
            .name("conn".into())
            .spawn(move || {
                if !serve_connection(stream, &conn_tx, &conn_logger, allowed_gid) {
                    conn_refused.fetch_add(1, Ordering::Relaxed);
                }
                conn_active.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
            logger.warn("cannot start a connection thread", &[]);
        }
    }
}

/// Reads one request; events are queued without an answer, CLI requests are
/// answered once the reconcile loop has handled them. Returns false when
/// the request was refused.
fn serve_connection(
    mut stream: UnixStream,
    tx: &Sender<Work>,
    logger: &Logger,
    allowed_gid: Option<u32>,
) -> bool {
    if let Err(reason) = check_peer(&stream, allowed_gid) {
        logger.warn(&format!("refused connection: {reason}"), &[]);
        let _ = wire::write_message(&mut stream, &Response::Error(reason));
        close_after_error(stream);
        return false;
    }
    let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
    let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
    let request = match wire::read_message::<Request>(&mut stream) {
        Ok(r) => r,
        Err(e) => {
            let level_is_quiet = matches!(e, WireError::Truncated);
            let message = format!("bad request: {e}");
            if level_is_quiet {
                logger.debug(&message, &[]);
            } else {
                logger.warn(&message, &[]);
            }
            let _ = wire::write_message(&mut stream, &Response::Error(message));
            close_after_error(stream);
            return false;
        }
    };
    let (reply_tx, reply_rx) = mpsc::channel();
    let work = match request {
        Request::Event(event) => {
            let _ = tx.send(Work::Event(event));
            return true;
        }
        Request::Status => Work::Status(reply_tx),
        Request::Reconcile => Work::Reconcile(reply_tx),
    };
    if tx.send(work).is_err() {
        return true;
    }
    let response = reply_rx
        .recv_timeout(REPLY_TIMEOUT)
        .unwrap_or_else(|_| Response::Error("daemon did not answer in time".into()));
    let _ = stream.set_write_timeout(Some(REPLY_TIMEOUT));
    let _ = wire::write_message(&mut stream, &response);
    true
}

/// Closes a connection whose request was refused so that the client can
/// read the error: unread input at close would reset the connection and
/// discard the answer. What is drained is bounded in bytes and time.
fn close_after_error(mut stream: UnixStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < wire::MAX_FRAME {
        match io::Read::read(&mut stream, &mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

/// Only root, the daemon's own user and members of `allowed_gid` may talk
/// to the daemon, whatever the socket file's mode says.
fn check_peer(stream: &UnixStream, allowed_gid: Option<u32>) -> Result<(), String> {
    let creds = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| format!("cannot read peer credentials: {e}"))?;
    let own = nix::unistd::geteuid().as_raw();
    if creds.uid() == 0 || creds.uid() == own {
        return Ok(());
    }
    if let Some(gid) = allowed_gid {
        // SO_PEERCRED carries the primary group only; the supplementary ones
        // are read from the peer process (still connected, so still there).
        let groups = ProcFs::new("/proc").groups(creds.pid() as u32);
        if creds.gid() == gid || groups.contains(&gid) {
            return Ok(());
        }
    }
    let who = if allowed_gid.is_some() {
        "root and the socket_group"
    } else {
        "root"
    };
    Err(format!(
        "permission denied for uid {} (pid {}): only {who} may use the pinner socket",
        creds.uid(),
        creds.pid()
    ))
}

struct Daemon {
    config: Config,
    /// The config resolved against the host (and nova.conf).
    host: HostPolicy,
    config_path: Option<PathBuf>,
    topology: Topology,
    logger: Arc<Logger>,
    libvirt: Option<Libvirt>,
    counters: Counters,
    next_periodic: Instant,
    retry_at: Option<Instant>,
    reconnect_delay: Duration,
    busy_delay: Duration,
    next_connect: Instant,
    /// Set while libvirt is unreachable, so the outage is logged once.
    outage_logged: bool,
    ever_connected: bool,
    last_warnings: BTreeSet<String>,
    memory_refused: reconcile::MemoryRefusals,
    /// Shared with the keeper thread once isolation was first enabled.
    isolation: Option<Arc<Mutex<Settings>>>,
    latency: PinLatency,
    steal: StealTracker,
    /// Guest UUID → its qemu pid, found once and checked on each use.
    qemu_pids: HashMap<String, u32>,
    /// Requests the intake refused (shared with its threads).
    refused: Arc<AtomicU64>,
    coalescer: Coalescer,
    /// When the metrics file is next rewritten (None: no file configured).
    next_metrics: Option<Instant>,
    /// Set while the metrics file cannot be written, so that is logged once.
    metrics_failing: bool,
    /// The pins pinner set last, per domain UUID and libvirt field name
    /// (`cputune.vcpupin0`): libvirt echoes them as events, which must not
    /// count as someone else's change.
    own_pins: HashMap<String, HashMap<String, CpuSet>>,
    /// Where libvirt's events are queued (a clone per connection).
    work_tx: Sender<Work>,
}

/// Started guests kept waiting for their pins: per guest, and the last
/// `RECENT_LATENCIES` for the summary.
#[derive(Default)]
struct PinLatency {
    /// Hook `started` events not yet followed by applied pins: domain UUID
    /// (or name, when the hook could not read the UUID) → sent at (ns).
    awaiting: HashMap<String, u64>,
    by_domain: HashMap<String, f64>,
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
    fn started(&mut self, event: &HookEvent) {
        self.awaiting
            .insert(event.guest_key().to_string(), event.sent_at_unix_ns);
    }

    /// After a reconcile pass: every awaited guest now running and settled
    /// has its latency; guests pinner does not manage are dropped.
    fn settle(
        &mut self,
        specs: &[crate::domain::DomainSpec],
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

    fn summary(&self) -> LatencySummary {
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

impl Daemon {
    fn new(
        config: Config,
        host: HostPolicy,
        config_path: Option<PathBuf>,
        topology: Topology,
        logger: Arc<Logger>,
        work_tx: Sender<Work>,
        refused: Arc<AtomicU64>,
    ) -> Daemon {
        let now = Instant::now();
        Daemon {
            next_periodic: now + config.reconcile_interval,
            next_metrics: config.metrics_file.as_ref().map(|_| now),
            metrics_failing: false,
            config,
            host,
            config_path,
            topology,
            logger,
            libvirt: None,
            counters: Counters::default(),
            retry_at: None,
            reconnect_delay: RECONNECT_MIN,
            busy_delay: BUSY_RETRY_MIN,
            next_connect: now,
            outage_logged: false,
            ever_connected: false,
            last_warnings: BTreeSet::new(),
            memory_refused: reconcile::MemoryRefusals::new(),
            isolation: None,
            latency: PinLatency::default(),
            steal: StealTracker::default(),
            qemu_pids: HashMap::new(),
            refused,
            coalescer: Coalescer::new(BURST_MAX_WAIT),
            own_pins: HashMap::new(),
            work_tx,
        }
    }

    fn run(&mut self, rx: &Receiver<Work>) {
        // Guests started while the daemon was down get pinned now.
        self.reconcile();
        loop {
            let now = Instant::now();
            let wake = [self.retry_at, self.coalescer.due(now), self.next_metrics]
                .into_iter()
                .flatten()
                .fold(self.next_periodic, Instant::min);
            let mut batch = Vec::new();
            match rx.recv_timeout(wake.saturating_duration_since(now)) {
                Ok(work) => batch.push(work),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            // Coalesce: everything queued meanwhile is served by one reconcile.
            batch.extend(rx.try_iter());

            let mut needed = false;
            let mut reconcile_replies = Vec::new();
            let mut status_replies = Vec::new();
            for work in batch {
                match work {
                    Work::Event(event) => self.note_event(&event),
                    Work::Libvirt(event) => needed |= self.note_libvirt_event(event),
                    Work::Reconcile(reply) => {
                        needed = true;
                        reconcile_replies.push(reply);
                    }
                    Work::Status(reply) => status_replies.push(reply),
                    Work::Reload => needed |= self.reload(),
                    Work::Stop => {
                        for reply in reconcile_replies.iter().chain(&status_replies) {
                            let _ = reply.send(Response::Error("daemon is stopping".into()));
                        }
                        return;
                    }
                }
            }
            let now = Instant::now();
            if now >= self.next_periodic {
                needed = true;
            }
            if self.retry_at.is_some_and(|r| now >= r)
                || self.coalescer.due(now).is_some_and(|d| now >= d)
            {
                needed = true;
            }
            if needed {
                let report = self.reconcile();
                for reply in reconcile_replies {
                    let _ = reply.send(Response::Reconciled(report.clone()));
                }
            }
            for reply in status_replies {
                let _ = reply.send(self.status());
            }
            if self.next_metrics.is_some_and(|t| Instant::now() >= t) {
                self.write_metrics();
            }
        }
    }

    fn note_event(&mut self, event: &HookEvent) {
        self.counters.events_received += 1;
        if event.op == HookOp::Started {
            self.latency.started(event);
        }
        self.logger.debug(
            &format!("hook event {} {}", event.op.as_str(), event.sub_op),
            &[("DOMAIN", &event.name), ("OP", event.op.as_str())],
        );
        self.coalescer
            .hook_event(event.op, event.guest_key(), Instant::now());
    }

    /// A pin change that is not pinner's own asks for a pass; a closed
    /// connection is dropped at once (and reconnected with backoff). Returns
    /// whether a pass must run now.
    fn note_libvirt_event(&mut self, event: LibvirtEvent) -> bool {
        match event {
            LibvirtEvent::ConnectionClosed(reason) => {
                if self.libvirt.take().is_some() {
                    self.logger
                        .warn(&format!("lost libvirt connection: {reason}"), &[]);
                }
                true
            }
            LibvirtEvent::PinsChanged { uuid, name, pins } => {
                let own = self.own_pins.get(&uuid);
                let outside: Vec<String> = pins
                    .iter()
                    .filter(|(field, cpus)| {
                        let set = own.and_then(|o| o.get(field.as_str()));
                        CpuSet::parse(cpus).ok().as_ref() != set
                    })
                    .map(|(field, cpus)| format!("{field}={cpus}"))
                    .collect();
                if !outside.is_empty() {
                    self.counters.outside_pin_changes += 1;
                    self.logger.info(
                        &format!("pins changed outside pinner: {}", outside.join(" ")),
                        &[("DOMAIN", &name)],
                    );
                    self.coalescer.changed(Instant::now());
                }
                false
            }
        }
    }

    /// Re-reads the config; a broken one is reported and the old one kept.
    fn reload(&mut self) -> bool {
        let loaded = Config::load(self.config_path.as_deref()).and_then(|c| {
            let host = c.resolve(&self.topology)?;
            Ok((c, host))
        });
        match loaded {
            Ok((config, host)) => {
                let was_isolating = self.config.isolation.enabled;
                self.host = host;
                if config.socket != self.config.socket
                    || config.socket_group != self.config.socket_group
                {
                    self.logger.warn(
                        "socket or socket_group changed in the config; it takes effect at the next restart",
                        &[],
                    );
                }
                let uri_changed = config.libvirt_uri != self.config.libvirt_uri;
                self.next_metrics = config.metrics_file.as_ref().map(|_| Instant::now());
                self.config = config;
                if uri_changed {
                    self.libvirt = None;
                }
                self.logger.info("configuration reloaded", &[]);
                self.update_isolation(was_isolating);
                true
            }
            Err(e) => {
                self.logger.error(
                    &format!("configuration not reloaded, keeping the running one: {e}"),
                    &[],
                );
                false
            }
        }
    }

    fn state_dir(&self) -> PathBuf {
        self.config
            .socket
            .parent()
            .map_or_else(|| PathBuf::from("/run/pinner"), Path::to_path_buf)
    }

    /// Isolates (or re-isolates with new settings) when enabled; undoes it
    /// when it was enabled and no longer is.
    fn update_isolation(&mut self, was_enabled: bool) {
        if !self.config.isolation.enabled {
            if was_enabled {
                self.undo_isolation();
            }
            return;
        }
        let settings = Settings::new(&self.config.isolation, &self.host.reserved, &self.topology);
        let mut system = System::host(&self.state_dir());
        match isolation::isolate(&mut system, &settings) {
            Ok(sweep) => {
                self.logger.info(
                    &format!(
                        "host isolation on CPUs {}: {} processes confined now",
                        settings.reserved,
                        sweep.moved.len()
                    ),
                    &[("CPUS", &settings.reserved.to_string())],
                );
                log_sweep(&self.logger, &sweep, &settings.reserved);
            }
            Err(e) => self
                .logger
                .error(&format!("host isolation not started: {e}"), &[]),
        }
        match &self.isolation {
            Some(shared) => {
                *shared.lock().unwrap_or_else(|p| p.into_inner()) = settings;
            }
            None => {
                let shared = Arc::new(Mutex::new(settings));
                spawn_keeper(shared.clone(), self.state_dir(), self.logger.clone());
                self.isolation = Some(shared);
            }
        }
    }

    fn undo_isolation(&mut self) {
        let mut system = System::host(&self.state_dir());
        match isolation::undo(&mut system, &self.config.isolation) {
            Ok(undo) => self.logger.info(
                &format!(
                    "host isolation undone: {} processes put back, groups removed: {}",
                    undo.restored,
                    undo.removed_groups.join(", ")
                ),
                &[],
            ),
            Err(e) => self
                .logger
                .error(&format!("host isolation not undone: {e}"), &[]),
        }
    }

    fn plan(&self, specs: &[crate::domain::DomainSpec]) -> crate::placement::Plan {
        reconcile::plan_for(&self.topology, &self.host, specs)
    }

    /// Returns the connection, (re)connecting with backoff.
    fn connection(&mut self) -> Option<&mut Libvirt> {
        if self.libvirt.is_none() {
            let now = Instant::now();
            if now < self.next_connect {
                return None;
            }
            match Libvirt::connect(&self.config.libvirt_uri, self.topology.cpumap_width) {
                Ok(conn) => {
                    if self.ever_connected {
                        self.counters.libvirt_reconnects += 1;
                    }
                    self.logger.info(
                        &format!("connected to libvirt at {}", self.config.libvirt_uri),
                        &[],
                    );
                    self.ever_connected = true;
                    self.outage_logged = false;
                    self.reconnect_delay = RECONNECT_MIN;
                    let mut conn = conn;
                    let tx = self.work_tx.clone();
                    let sink = Arc::new(move |event| {
                        let _ = tx.send(Work::Libvirt(event));
                    });
                    if let Err(e) = conn.subscribe(sink) {
                        self.logger.warn(
                            &format!("{e}; hand-made pin changes wait for the periodic reconcile"),
                            &[],
                        );
                    }
                    self.libvirt = Some(conn);
                }
                Err(e) => {
                    let message = format!(
                        "cannot reach libvirt at {} ({e}); retrying in {:?}",
                        self.config.libvirt_uri, self.reconnect_delay
                    );
                    if self.outage_logged {
                        self.logger.debug(&message, &[]);
                    } else {
                        self.logger.warn(&message, &[]);
                        self.outage_logged = true;
                    }
                    self.next_connect = now + self.reconnect_delay;
                    self.retry_at = Some(self.next_connect);
                    self.reconnect_delay = (self.reconnect_delay * 2).min(RECONNECT_MAX);
                    return None;
                }
            }
        }
        self.libvirt.as_mut()
    }

    fn reconcile(&mut self) -> ReconcileReport {
        let now = Instant::now();
        self.next_periodic = now + self.config.reconcile_interval;
        self.retry_at = None;
        let events = self.coalescer.ran(now);
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
                    self.libvirt = None;
                }
                Err(e) => return self.failed_report(e.to_string()),
                Ok(report) => return report,
            }
        }
        self.failed_report("libvirt not reachable".into())
    }

    fn failed_report(&mut self, error: String) -> ReconcileReport {
        if self.retry_at.is_none() {
            self.retry_at = Some(Instant::now() + self.reconnect_delay);
        }
        ReconcileReport {
            errors: vec![error],
            ..ReconcileReport::default()
        }
    }

    fn reconcile_pass(&mut self, events: u32) -> Result<ReconcileReport, HvError> {
        let Some(libvirt) = self.connection() else {
            return Err(HvError::Other(format!(
                "libvirt not reachable at {}",
                self.config.libvirt_uri
            )));
        };
        let (specs, unreadable) = libvirt.running_domains()?;
        // A refusal is remembered only while its guest runs.
        self.memory_refused
            .retain(|uuid, _| specs.iter().any(|s| &s.uuid == uuid));
        let plan = self.plan(&specs);
        let work = reconcile::diff(&specs, &plan, &self.memory_refused);
        let logger = self.logger.clone();
        let libvirt = self.libvirt.as_mut().expect("connected above");
        let own_pins = &mut self.own_pins;
        own_pins.retain(|uuid, _| specs.iter().any(|s| &s.uuid == uuid));
        let outcome = reconcile::apply(libvirt as &mut dyn Hypervisor, &work, |domain, action| {
            if let Some((field, cpus)) = action.pin_field() {
                own_pins
                    .entry(domain.uuid.clone())
                    .or_default()
                    .insert(field, cpus.clone());
            }
            log_applied(&logger, &domain.name, action)
        })?;
        let managed = |uuid: &str| plan.guests.iter().any(|g| g.uuid == uuid);
        self.latency.settle(&specs, &managed, &outcome.unsettled);
        self.counters.reconciles += 1;
        self.counters.pins_applied += u64::from(outcome.changed);
        self.counters.apply_errors += outcome.errors.len() as u64;
        for error in outcome.errors.iter().chain(&unreadable) {
            self.logger.warn(error, &[]);
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
            self.memory_refused.insert(uuid.clone(), reason.clone());
        }
        if outcome.busy {
            self.logger.debug(
                &format!(
                    "a domain is busy (libvirt's state change lock); retrying in {:?}",
                    self.busy_delay
                ),
                &[],
            );
            let now = Instant::now();
            self.coalescer.retry_at(now + self.busy_delay, now);
            self.busy_delay = (self.busy_delay * 2).min(BUSY_RETRY_MAX);
        } else {
            self.busy_delay = BUSY_RETRY_MIN;
        }
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
        self.sample_guests(&specs);
        let mut errors = outcome.errors;
        errors.extend(unreadable);
        Ok(ReconcileReport {
            mode: plan.mode.as_str().into(),
            domains: specs.len() as u32,
            pins_changed: outcome.changed,
            errors,
            warnings: plan.warnings,
        })
    }

    /// Warnings repeat every reconcile; log each only when it first appears.
    fn log_new_warnings(&mut self, warnings: &[String]) {
        let current: BTreeSet<String> = warnings.iter().cloned().collect();
        for w in current.difference(&self.last_warnings) {
            self.logger.warn(w, &[]);
        }
        self.last_warnings = current;
    }

    /// Samples one guest from /proc (its qemu pid remembered for the next
    /// time) and records it for steal; returns the sample and the steal of
    /// the last interval.
    fn sample_guest(&mut self, uuid: &str, now: Instant) -> Option<(GuestSample, Option<f64>)> {
        let hint = self.qemu_pids.get(uuid).copied();
        let sample = guest_stats::sample(&ProcFs::new("/proc"), uuid, hint)?;
        self.qemu_pids.insert(uuid.to_string(), sample.pid);
        let steal = self.steal.record(uuid, now, &sample);
        Some((sample, steal))
    }

    /// Fills in a guest's steal and memory locality from /proc.
    fn measure(&mut self, domain: &mut DomainStatus) {
        let Some((sample, steal)) = self.sample_guest(&domain.uuid, Instant::now()) else {
            return;
        };
        domain.qemu_pid = Some(sample.pid);
        domain.steal_pct = steal;
        domain.steal_seconds = Some(sample.run_delay_ns as f64 / 1e9);
        // Its own nodes: where its memory is bound, else where its vCPUs run.
        let own = if domain.memory_nodes.is_empty() {
            let cpus: CpuSet = domain.vcpus.iter().flat_map(|v| v.cpus.clone()).collect();
            self.topology.nodes_of(&cpus)
        } else {
            domain.memory_nodes.clone()
        };
        let (local, remote) = guest_stats::memory_split(&sample.pages, &own);
        domain.memory_pages_local = Some(local);
        domain.memory_pages_remote = Some(remote);
    }

    /// Samples every running guest's steal, so each figure covers at most a
    /// reconcile interval whenever status is asked.
    fn sample_guests(&mut self, specs: &[crate::domain::DomainSpec]) {
        self.qemu_pids
            .retain(|uuid, _| specs.iter().any(|s| &s.uuid == uuid));
        self.steal
            .retain(|uuid| specs.iter().any(|s| s.uuid == uuid));
        let now = Instant::now();
        for spec in specs {
            self.sample_guest(&spec.uuid, now);
        }
    }

    /// Rewrites the metrics file from a fresh status.
    fn write_metrics(&mut self) {
        let Some(path) = self.config.metrics_file.clone() else {
            self.next_metrics = None;
            return;
        };
        self.next_metrics = Some(Instant::now() + self.config.metrics_interval);
        let Response::Status(report) = self.status() else {
            return;
        };
        match crate::metrics::write_file(&path, &crate::metrics::render(&report)) {
            Ok(()) => {
                if std::mem::take(&mut self.metrics_failing) {
                    self.logger
                        .info(&format!("metrics written to {} again", path.display()), &[]);
                }
            }
            Err(e) => {
                if !std::mem::replace(&mut self.metrics_failing, true) {
                    self.logger.warn(&format!("metrics not written: {e}"), &[]);
                }
            }
        }
    }

    fn isolated_processes(&self) -> Option<u64> {
        if !self.config.isolation.enabled {
            return None;
        }
        let settings = Settings::new(&self.config.isolation, &self.host.reserved, &self.topology);
        isolation::status(&System::host(&self.state_dir()), &settings)
            .ok()
            .map(|s| s.confined as u64)
    }

    fn status(&mut self) -> Response {
        let mut counters = self.counters.clone();
        counters.requests_refused = self.refused.load(Ordering::Relaxed);
        counters.hook_events_dropped =
            std::fs::metadata(self.state_dir().join(HOOK_DROPS_FILE)).map_or(0, |m| m.len());
        let reserved = self.config.reserved_cpus.to_vec();
        let observed = match self.connection() {
            Some(libvirt) => libvirt.running_domains(),
            None => Err(HvError::Disconnected(format!(
                "libvirt not reachable at {}",
                self.config.libvirt_uri
            ))),
        };
        match observed {
            Ok((specs, unreadable)) => {
                let plan = self.plan(&specs);
                let mut warnings = plan.warnings.clone();
                warnings.extend(unreadable);
                let mut domains = reconcile::domain_status(&specs, &plan, &self.memory_refused);
                for domain in &mut domains {
                    domain.pin_latency_ms = self.latency.by_domain.get(&domain.uuid).copied();
                    self.measure(domain);
                }
                Response::Status(StatusReport {
                    mode: plan.mode.as_str().into(),
                    pool: plan.pool.to_vec(),
                    reserved,
                    libvirt_connected: true,
                    domains,
                    warnings,
                    counters,
                    pin_latency: self.latency.summary(),
                    numa: guest_stats::host_numastat(Path::new("/")),
                    isolated_processes: self.isolated_processes(),
                })
            }
            Err(e) => {
                if matches!(e, HvError::Disconnected(_)) {
                    self.libvirt = None;
                }
                Response::Status(StatusReport {
                    mode: "unknown".into(),
                    reserved,
                    libvirt_connected: false,
                    warnings: vec![e.to_string()],
                    counters,
                    ..StatusReport::default()
                })
            }
        }
    }
}

/// Keeps isolation true: confines daemons whose pid file appears at once,
/// and everything else the periodic sweep finds. Does nothing while
/// isolation is not active (no state), so an `isolate --undo` holds.
fn spawn_keeper(settings: Arc<Mutex<Settings>>, state_dir: PathBuf, logger: Arc<Logger>) {
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
            for pid in started {
                keep_logged(&system, &settings, Some(pid), &logger);
            }
            if Instant::now() >= next_sweep {
                keep_logged(&system, &settings, None, &logger);
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

fn keep_logged(system: &System, settings: &Settings, only: Option<u32>, logger: &Logger) {
    match isolation::keep(system, &settings.config, only) {
        Ok(Some(sweep)) => log_sweep(logger, &sweep, &settings.reserved),
        Ok(None) => {}
        Err(e) => logger.warn(&format!("isolation sweep failed: {e}"), &[]),
    }
}

fn log_sweep(logger: &Logger, sweep: &Sweep, reserved: &crate::cpuset::CpuSet) {
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
}

fn log_applied(logger: &Logger, domain: &str, action: &Action) {
    match action {
        Action::SetMetadata { element } => logger.debug(
            &format!("marked as managed: {element}"),
            &[("DOMAIN", domain), ("OP", "metadata")],
        ),
        Action::PinVcpu { vcpu, cpus } => logger.info(
            &format!("pinned vCPU {vcpu} to CPUs {cpus}"),
            &[
                ("DOMAIN", domain),
                ("VCPU", &vcpu.to_string()),
                ("CPUS", &cpus.to_string()),
                ("OP", "pin_vcpu"),
            ],
        ),
        Action::PinEmulator { cpus } => logger.info(
            &format!("pinned emulator threads to CPUs {cpus}"),
            &[
                ("DOMAIN", domain),
                ("CPUS", &cpus.to_string()),
                ("OP", "pin_emulator"),
            ],
        ),
        Action::PinIothread { iothread, cpus } => logger.info(
            &format!("pinned IOThread {iothread} to CPUs {cpus}"),
            &[
                ("DOMAIN", domain),
                ("CPUS", &cpus.to_string()),
                ("OP", "pin_iothread"),
            ],
        ),
        Action::SetMemoryNodes { nodes } => logger.info(
            &format!("bound memory to NUMA nodes {nodes}"),
            &[
                ("DOMAIN", domain),
                ("NODES", &nodes.to_string()),
                ("OP", "memory"),
            ],
        ),
    }
}

/// For the CLI: one request, one answer.
pub fn request(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, String> {
    let shown = socket.display();
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => format!("pinner daemon is not running (no socket at {shown})"),
        io::ErrorKind::ConnectionRefused => {
            format!("pinner daemon is not running (stale socket at {shown})")
        }
        io::ErrorKind::PermissionDenied => format!(
            "permission denied on {shown}: run as root or as a member of the daemon's socket_group"
        ),
        _ => format!("cannot connect to {shown}: {e}"),
    })?;
    let _ = stream.set_read_timeout(Some(timeout));
    wire::write_message(&mut stream, request).map_err(|e| format!("sending to the daemon: {e}"))?;
    wire::read_message(&mut stream).map_err(|e| format!("reading the daemon's answer: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::DomainSpec;

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
