//! `pinner daemon`: the socket intake, the control loop that owns the
//! libvirt session, and what it observes.
//!
//! Threads: one accepts connections (`intake`, one short-lived thread per
//! connection), one turns signals into work, the isolation keeper, and the
//! main thread runs the control loop (`control`), which alone talks to
//! libvirt (`session`), one pass at a time (`pass`), which ends by moving
//! guest cells' memory to their nodes (`cells`); `observe` measures and
//! reports, `metrics` renders Prometheus text (or OpenMetrics).

mod adopt;
pub mod cells;
pub mod control;
pub mod intake;
pub mod inventory;
pub mod metrics;
pub mod observe;
pub mod pass;
pub mod ratelimit;
pub mod rebalance;
pub mod session;

use crate::config::{Config, ConfigError};
use crate::engine::topology::Topology;
use crate::host::sysfs::{self, SysfsError};
use crate::libvirt::events::{self, LibvirtEvent};
use control::{Daemon, Setup};
use intake::{Intake, IntakeError, Slots};
use pinner_shared::log::Logger;
use pinner_shared::protocol::{HookEvent, ReleaseRequest, Response};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;

/// What the control loop is handed, by the intake, libvirt's event thread
/// and the signal thread.
pub enum Work {
    Event(HookEvent),
    Libvirt(LibvirtEvent),
    Status(Sender<Response>),
    Reconcile(Sender<Response>),
    Release(ReleaseRequest, Sender<Response>),
    /// A guest's paced memory move ended: what the kernel would not move,
    /// or why it stopped.
    MemoryMoved {
        uuid: String,
        result: Result<String, adopt::MoveError>,
    },
    Reload,
    Stop,
}

/// Where the daemon reads the host and keeps its state: `/` and the
/// socket's directory on a host, fixture trees in tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPaths {
    /// The /proc to read guests' threads and peers' groups from.
    pub proc: PathBuf,
    /// The root sysfs is read under (`/` on a host).
    pub sysfs_root: PathBuf,
    /// Isolation state, the hook's drop counter.
    pub state_dir: PathBuf,
    /// node_exporter's textfile directory, where an unset `[metrics] file`
    /// goes while it exists.
    pub textfile_dir: PathBuf,
}

impl HostPaths {
    /// This host, with state beside the socket.
    pub fn system(socket: &Path) -> HostPaths {
        HostPaths {
            proc: PathBuf::from("/proc"),
            sysfs_root: PathBuf::from("/"),
            state_dir: socket
                .parent()
                .map_or_else(|| PathBuf::from("/run/pinner"), Path::to_path_buf),
            textfile_dir: PathBuf::from(crate::config::NODE_EXPORTER_TEXTFILE_DIR),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Topology(#[from] SysfsError),
    #[error(transparent)]
    Intake(#[from] IntakeError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("cannot start the {name} thread: {source}")]
    Thread {
        name: &'static str,
        source: std::io::Error,
    },
}

pub fn run(config_path: Option<PathBuf>) -> Result<(), DaemonError> {
    let config = Config::load(config_path.as_deref())?;
    let topology = sysfs::read_topology(Path::new("/"))?;
    let host = config.resolve(&topology)?;
    let logger = Arc::new(Logger::new("pinner", config.log_level));
    let paths = HostPaths::system(&config.socket);
    let file_limit = raise_file_limit(&logger);

    let refused = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel();
    spawn_signal_thread(tx.clone())?;
    let intake = Intake {
        work: tx.clone(),
        logger: logger.clone(),
        limiter: Arc::default(),
        allowed_gid: None,
        refused: refused.clone(),
        proc_root: paths.proc.clone(),
    };
    let slots = Arc::new(Slots::for_file_limit(file_limit));
    // The group's socket first: whoever waits for the main one (systemd's
    // readiness aside, a script, the tests) then finds both ready.
    if let (Some(group), Some(path)) = (&config.socket_group, config.group_socket()) {
        let group_listener = intake::bind_socket(&path, Some(group))?;
        let group_intake = Intake {
            allowed_gid: Some(group.gid),
            ..intake.clone()
        };
        spawn_intake("group intake", group_intake, group_listener, slots.clone())?;
    }
    let listener = intake::bind_socket(&config.socket, None)?;
    spawn_intake("intake", intake, listener, slots)?;
    log_start(&logger, &config, &topology);
    // Without libvirt's events, hand-made pin changes wait for the periodic
    // reconcile, and a closed connection for the next call.
    if let Err(e) = events::start_event_loop() {
        logger.warn(&e.to_string(), &[]);
    }
    let sockets = [Some(config.socket.clone()), config.group_socket()];
    let mut daemon = Daemon::new(Setup {
        config,
        host,
        config_path,
        topology,
        paths,
        logger: logger.clone(),
        connector: Box::new(session::LibvirtConnector),
        work_tx: tx,
        refused,
    });
    daemon.update_isolation(false);
    // Ready: the socket takes events (the first reconcile follows at once).
    if let Err(e) = crate::host::notify::notify("READY=1") {
        logger.warn(&format!("cannot tell systemd we are ready: {e}"), &[]);
    }
    daemon.run(&rx);
    let _ = crate::host::notify::notify("STOPPING=1");
    if daemon.isolating() && daemon.config().isolation.restore_on_exit {
        daemon.undo_isolation();
    }
    for socket in sockets.iter().flatten() {
        let _ = std::fs::remove_file(socket);
    }
    logger.info("pinner daemon stopped", &[]);
    Ok(())
}

fn spawn_intake(
    name: &'static str,
    intake: Intake,
    listener: std::os::unix::net::UnixListener,
    slots: Arc<Slots>,
) -> Result<(), DaemonError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || intake.accept_loop(listener, slots))
        .map_err(|source| DaemonError::Thread { name, source })?;
    Ok(())
}

/// Every connection is a descriptor: take the hard limit, so a flood
/// exhausts it later (and the accept loop backs off when it does).
/// Returns the limit in force.
fn raise_file_limit(logger: &Logger) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft >= hard {
        return soft;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => hard,
        Err(e) => {
            logger.warn(
                &format!("open files stay limited to {soft} (hard limit {hard}): {e}"),
                &[],
            );
            soft
        }
    }
}

fn log_start(logger: &Logger, config: &Config, topology: &Topology) {
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
}

fn spawn_signal_thread(tx: Sender<Work>) -> Result<(), DaemonError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGHUP, SIGINT, SIGTERM])
        .map_err(DaemonError::Signals)?;
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
        .map_err(|source| DaemonError::Thread {
            name: "signal",
            source,
        })?;
    Ok(())
}
