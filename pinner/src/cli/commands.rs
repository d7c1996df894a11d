//! The body of each `pinner` subcommand. Each returns the exit code or a
//! typed error; `main` prints the error as the one line the user sees.

use super::args::{Cli, Command, DaemonSocket, IsolateAction};
use super::client::{self, ClientError};
use super::map::{self, MapFormat, Occupancy};
use super::report;
use crate::config::{group_socket_of, Config, ConfigError};
use crate::daemon::{self, DaemonError};
use crate::doctor::{self, DoctorError};
use crate::engine::domain::{DomainError, DomainSpec};
use crate::engine::hypervisor::{HvError, Hypervisor};
use crate::engine::placement::Load;
use crate::engine::reconcile;
use crate::engine::release::{self, Everywhere};
use crate::host::guest_stats::{self, RateTracker};
use crate::host::procs::ProcFs;
use crate::host::snapshot::{Root, SnapshotError};
use crate::host::sysfs::{self, SysfsError};
use crate::isolation::{self, IsolationError};
use crate::libvirt::Libvirt;
use pinner_shared::paths::DEFAULT_SOCKET;
use pinner_shared::protocol::{ReleaseRequest, Request, Response, StatusReport};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// The largest domain XML read from a file (libvirt's own XML of a large
/// guest is some hundred KiB).
const DOMAIN_XML_CAP: u64 = 16 * 1024 * 1024;

/// How long the CLI waits for the daemon's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(150);

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Topology(#[from] SysfsError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Isolation(#[from] IsolationError),
    #[error(transparent)]
    Doctor(#[from] DoctorError),
    #[error("{}: {source}", path.display())]
    DomainFile { path: PathBuf, source: DomainError },
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        source: crate::host::file::FileError,
    },
    #[error("libvirt at {uri}: {source}")]
    Libvirt { uri: String, source: HvError },
    /// `plan` needs the running guests: from libvirt, or from dumps.
    #[error("cannot connect to libvirt at {uri}: {message}\nto plan without libvirt, give one `virsh dumpxml` file per running guest: pinner plan --domains DIR")]
    PlanWithoutLibvirt { uri: String, message: String },
    #[error("daemon: {0}")]
    Refused(String),
    #[error("daemon: unexpected answer")]
    UnexpectedAnswer,
    #[error("no running guest named {name:?} at {uri}")]
    NoSuchGuest { name: String, uri: String },
    #[error("cannot render JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Demand(#[from] super::demand::DemandFileError),
}

pub fn run(cli: Cli) -> Result<ExitCode, CliError> {
    let config = cli.config.as_deref();
    match &cli.command {
        Command::Daemon => {
            daemon::run(cli.config.clone())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Topology { root, json } => {
            let root = Root::open(&root.root)?;
            let topo = sysfs::read_topology(root.path())?;
            emit(json.json, &topo, report::topology_tree)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan {
            root,
            domains,
            connect,
            demand,
            json,
            map,
        } => plan(
            config,
            &root.root,
            (domains.as_deref(), connect.as_deref()),
            demand.as_deref(),
            Output::of(json.json, *map),
        ),
        Command::Isolate { action, json } => isolate(config, *action, *json),
        Command::Doctor {
            connect,
            domain,
            json,
            root,
            sample,
        } => doctor(
            config,
            connect.as_deref(),
            domain.as_deref(),
            json.json,
            &root.root,
            *sample,
        ),
        Command::Release {
            domains,
            all,
            persistent,
            connect,
            json,
            socket,
        } => {
            let request = ReleaseRequest {
                domains: domains.clone(),
                all: *all,
                persistent: *persistent,
            };
            let socket = socket_of(config, socket)?;
            release(config, &socket, &request, connect.as_deref(), json.json)
        }
        command => ask_daemon(config, command),
    }
}

/// The subcommands that are one request to the daemon.
fn ask_daemon(config: Option<&Path>, command: &Command) -> Result<ExitCode, CliError> {
    match command {
        Command::Status {
            watch: Some(s),
            socket,
            ..
        } => watch_status(&socket_of(config, socket)?, *s),
        Command::Status {
            map: Some(format),
            socket,
            ..
        } => status_map(&socket_of(config, socket)?, *format),
        Command::Status { json, socket, .. } => ask(
            &socket_of(config, socket)?,
            Request::Status,
            Shown::json_or_text(json.json),
        ),
        Command::Metrics {
            openmetrics,
            socket,
        } => {
            let format = if *openmetrics {
                daemon::metrics::Format::OpenMetrics
            } else {
                daemon::metrics::Format::Prometheus
            };
            ask(
                &socket_of(config, socket)?,
                Request::Status,
                Shown::Metrics(format),
            )
        }
        Command::Reconcile { json, socket } => ask(
            &socket_of(config, socket)?,
            Request::Reconcile,
            Shown::json_or_text(json.json),
        ),
        _ => unreachable!("run() dispatches every other subcommand"),
    }
}

/// The daemon's socket: `--socket`, else the configuration's (a missing
/// default configuration means the default socket). A user other than root
/// uses the `socket_group` members' socket when there is one.
fn socket_of(config: Option<&Path>, socket: &DaemonSocket) -> Result<PathBuf, CliError> {
    let main = match (&socket.socket, config) {
        (Some(socket), _) => return Ok(socket.clone()),
        (None, Some(path)) => Config::load(Some(path))?.socket,
        (None, None) => Config::load(None)
            .map(|c| c.socket)
            .unwrap_or_else(|_| PathBuf::from(DEFAULT_SOCKET)),
    };
    let group = group_socket_of(&main);
    let member = !nix::unistd::geteuid().is_root();
    Ok(if member && group.exists() {
        group
    } else {
        main
    })
}

/// How an answer of the daemon's is printed.
#[derive(Clone, Copy)]
enum Shown {
    Text,
    Json,
    Metrics(daemon::metrics::Format),
}

impl Shown {
    fn json_or_text(json: bool) -> Shown {
        if json {
            Shown::Json
        } else {
            Shown::Text
        }
    }
}

/// `pinner status`, `metrics` and `reconcile`: one request to the daemon.
fn ask(socket: &Path, request: Request, shown: Shown) -> Result<ExitCode, CliError> {
    let response = client::request(socket, &request, ANSWER_TIMEOUT)?;
    let text = match (&response, shown) {
        (Response::Error(message), _) => return Err(CliError::Refused(message.clone())),
        (Response::Status(report), Shown::Metrics(format)) => {
            daemon::metrics::render(report, format)
        }
        (Response::Status(report), Shown::Json) => to_json(report)?,
        (Response::Reconciled(report), Shown::Json) => to_json(report)?,
        (Response::Status(report), _) => report::status_text(report),
        (Response::Reconciled(report), _) => report::reconcile_text(report),
        (Response::Accepted | Response::Released(_), _) => return Err(CliError::UnexpectedAnswer),
    };
    print!("{text}");
    // A reconcile that hit errors is a failure for scripts.
    let failed = matches!(&response, Response::Reconciled(r) if !r.errors.is_empty());
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// How a command prints its result.
#[derive(Clone, Copy)]
enum Output {
    Text,
    Json,
    Map(MapFormat),
}

impl Output {
    fn of(json: bool, map: Option<MapFormat>) -> Output {
        match (json, map) {
            (true, _) => Output::Json,
            (_, Some(format)) => Output::Map(format),
            _ => Output::Text,
        }
    }
}

/// Colour on a terminal, unless NO_COLOR (no-color.org) says otherwise.
fn colour_wanted() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// `pinner status --map`: the daemon's view of the guests' CPUs on this
/// host's topology.
fn status_map(socket: &Path, format: MapFormat) -> Result<ExitCode, CliError> {
    let report = status_report(socket)?;
    let topo = sysfs::read_topology(Path::new("/"))?;
    let occupancy = Occupancy::of_status(&report);
    print!(
        "{}",
        map::render_as(format, &topo, &occupancy, colour_wanted())
    );
    Ok(ExitCode::SUCCESS)
}

fn status_report(socket: &Path) -> Result<StatusReport, CliError> {
    match client::request(socket, &Request::Status, ANSWER_TIMEOUT)? {
        Response::Status(report) => Ok(*report),
        Response::Error(message) => Err(CliError::Refused(message)),
        _ => Err(CliError::UnexpectedAnswer),
    }
}

/// `pinner release`: asked of the daemon, so no pass of its races it; done
/// here, on the configuration's (or `--connect`'s) libvirt, when the
/// daemon is not running. Fails when any guest could not be released.
fn release(
    config: Option<&Path>,
    socket: &Path,
    request: &ReleaseRequest,
    connect: Option<&str>,
    json: bool,
) -> Result<ExitCode, CliError> {
    let reports = match client::request(socket, &Request::Release(request.clone()), ANSWER_TIMEOUT)
    {
        Ok(Response::Released(reports)) => reports,
        Ok(Response::Error(message)) => return Err(CliError::Refused(message)),
        Ok(_) => return Err(CliError::UnexpectedAnswer),
        Err(ClientError::NotRunning(_) | ClientError::StaleSocket(_)) => {
            let config = Config::load(config)?;
            let topo = sysfs::read_topology(Path::new("/"))?;
            let uri = connect.unwrap_or(&config.libvirt_uri);
            let mut libvirt = Libvirt::connect(uri, topo.cpumap_width)
                .map_err(|source| libvirt_error(uri, source))?;
            release::release(&mut libvirt, &Everywhere::of(&topo), request, |_, _| {})
                .map_err(|source| libvirt_error(uri, source))?
        }
        Err(e) => return Err(e.into()),
    };
    let text = match json {
        true => to_json(&reports)?,
        false => report::release_text(&reports),
    };
    print!("{text}");
    Ok(match reports.iter().any(|r| r.error.is_some()) {
        true => ExitCode::FAILURE,
        false => ExitCode::SUCCESS,
    })
}

/// `pinner status --watch`: the status, redrawn every `seconds` until
/// interrupted (or the daemon goes away).
fn watch_status(socket: &Path, seconds: u64) -> Result<ExitCode, CliError> {
    let every = Duration::from_secs(seconds.max(1));
    loop {
        let text = report::status_text(&status_report(socket)?);
        // Home and clear, then the status: a terminal shows one screen.
        print!(
            "\x1b[H\x1b[2J{text}\nevery {}s; Ctrl-C to stop\n",
            every.as_secs()
        );
        let _ = std::io::Write::flush(&mut std::io::stdout());
        std::thread::sleep(every);
    }
}

/// `pinner plan`: the placement for the running guests (from libvirt, or
/// from domain XML files), with reasons.
fn plan(
    config_path: Option<&Path>,
    root: &Path,
    (domains, connect): (Option<&Path>, Option<&str>),
    demand: Option<&Path>,
    output: Output,
) -> Result<ExitCode, CliError> {
    let root = Root::open(root)?;
    let topo = sysfs::read_topology(root.path())?;
    let config = Config::load(config_path)?;
    let host = config.resolve(&topo)?;
    let specs = match domains {
        Some(dir) => read_domain_dir(dir)?,
        None => {
            let uri = connect.unwrap_or(&config.libvirt_uri);
            let mut libvirt = read_only(uri).map_err(|e| match e {
                CliError::Libvirt {
                    uri,
                    source: HvError::Unreachable(message),
                } => CliError::PlanWithoutLibvirt { uri, message },
                other => other,
            })?;
            let (specs, unreadable) = libvirt
                .running_domains()
                .map_err(|source| libvirt_error(uri, source))?;
            report_skipped(&unreadable);
            specs
        }
    };
    let load = Load {
        demand: match demand {
            Some(path) => super::demand::read(path, &specs)?,
            None => HashMap::new(),
        },
        ..Load::prior(config.demand_prior_per_vcpu)
    };
    let plan = reconcile::plan_for(&topo, &host, &specs, &load);
    let ranges = reconcile::range_status(&topo, &plan, &load);
    let text = match output {
        Output::Json => to_json(&report::plan_json(&plan, &specs, &ranges))?,
        Output::Text => report::plan_text(&plan, &specs, &ranges),
        Output::Map(format) => {
            let occupancy = Occupancy::of_plan(&plan, &ranges);
            map::render_as(format, &topo, &occupancy, colour_wanted())
        }
    };
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}

/// Domains libvirt listed but could not describe, said on stderr (their
/// names escaped: they are whatever the guest's owner chose).
fn report_skipped<P: std::fmt::Display>(unreadable: &[P]) {
    for problem in unreadable {
        eprintln!(
            "pinner: skipped a domain: {}",
            pinner_shared::text::printable(&problem.to_string())
        );
    }
}

fn read_only(uri: &str) -> Result<Libvirt, CliError> {
    Libvirt::connect_read_only(uri).map_err(|source| libvirt_error(uri, source))
}

fn libvirt_error(uri: &str, source: HvError) -> CliError {
    CliError::Libvirt {
        uri: uri.to_string(),
        source,
    }
}

/// Reads every `*.xml` in `dir` (sorted by file name) as a running domain;
/// an error names the file.
fn read_domain_dir(dir: &Path) -> Result<Vec<DomainSpec>, CliError> {
    let read_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CliError::Read { path, source }
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read_error(dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "xml"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            // Dumps come from other machines: a FIFO or /dev/zero there is
            // refused, not waited on or read forever.
            let xml = crate::host::file::read_text(f, DOMAIN_XML_CAP).map_err(|source| {
                CliError::File {
                    path: f.clone(),
                    source,
                }
            })?;
            DomainSpec::parse(&xml).map_err(|source| CliError::DomainFile {
                path: f.clone(),
                source,
            })
        })
        .collect()
}

/// `pinner isolate`: the state; `apply` confines host processes, `undo`
/// puts them back.
fn isolate(
    config_path: Option<&Path>,
    action: Option<IsolateAction>,
    json: bool,
) -> Result<ExitCode, CliError> {
    let config = Config::load(config_path)?;
    let state_dir = daemon::HostPaths::system(&config.socket).state_dir;
    let mut system = isolation::System::host(&state_dir);
    // Undo needs only the recorded state: it works with a config that no
    // longer resolves (e.g. reserved CPUs gone offline).
    if let Some(IsolateAction::Undo) = action {
        emit(
            json,
            &isolation::undo(&mut system, &config.isolation)?,
            report::undo_text,
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    let topo = sysfs::read_topology(Path::new("/"))?;
    let host = config.resolve(&topo)?;
    let settings = isolation::Settings::new(&config.isolation, &host.reserved, &topo);
    if action.is_none() {
        let status = isolation::status(&system, &settings)?;
        emit(json, &status, report::isolation_status_text)?;
        return Ok(ExitCode::SUCCESS);
    }
    let sweep = isolation::isolate(&mut system, &settings)?;
    emit(json, &sweep, |sweep| {
        report::sweep_text(sweep, &settings, config.isolation.enabled)
    })?;
    Ok(if sweep.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `pinner doctor`: host and guest findings; exit 2 when any needs fixing.
fn doctor(
    config_path: Option<&Path>,
    connect: Option<&str>,
    only: Option<&str>,
    json: bool,
    root: &Path,
    sample_secs: f64,
) -> Result<ExitCode, CliError> {
    let config = Config::load(config_path)?;
    let root = Root::open(root)?;
    let root = root.path();
    let topo = sysfs::read_topology(root)?;
    let uri = connect.unwrap_or(&config.libvirt_uri);
    let (mut guests, skipped) = match running_guests(uri) {
        Ok(guests) => (guests, None),
        Err(CliError::Libvirt { source, .. }) if !matches!(source, HvError::Other(_)) => (
            Vec::new(),
            Some(doctor::guests_skipped(uri, &source.to_string())),
        ),
        Err(e) => return Err(e),
    };
    if let Some(name) =
        only.filter(|n| skipped.is_none() && !guests.iter().any(|g| g.spec.name == *n))
    {
        return Err(CliError::NoSuchGuest {
            name: name.to_string(),
            uri: uri.to_string(),
        });
    }
    // Without a configuration that fits this host, the pool checks are
    // skipped and the nodes' memory counted without a host reserve.
    let resolved = config.resolve(&topo).ok();
    let pool = resolved
        .as_ref()
        .map(|host| reconcile::plan_for(&topo, host, &[], &Load::default()).pool);
    let reserve = resolved.map(|host| host.memory_reserve).unwrap_or_default();
    let sample = Duration::from_secs_f64(sample_secs.clamp(0.0, 60.0));
    let host = sample_steal(root, &mut guests, |root| {
        doctor::Host::read(root, topo, (pool, reserve), sample)
    });
    let mut findings = doctor::audit(&host, &guests, only);
    findings.extend(skipped);
    if json {
        print!("{}", to_json(&doctor::findings_json(&findings))?);
    } else {
        print!("{}", doctor::render_text(&findings));
    }
    Ok(if doctor::needs_fixing(&findings) {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

/// The running guests doctor audits, read-only; those libvirt cannot
/// describe are said on stderr.
fn running_guests(uri: &str) -> Result<Vec<doctor::Guest>, CliError> {
    let listing = read_only(uri)?
        .running_xml(&|_| true)
        .map_err(|source| libvirt_error(uri, source))?;
    report_skipped(&listing.unreadable);
    let mut guests = Vec::with_capacity(listing.read.len());
    for live in listing.read {
        let mut guest = doctor::Guest::from_xml(&live.xml)?;
        if !live.name.is_empty() {
            guest.spec.name = live.name;
        }
        guests.push(guest);
    }
    Ok(guests)
}

/// Each guest's steal over the host sample `read_host` takes: its vCPUs'
/// run-queue wait before and after.
fn sample_steal<T>(
    root: &Path,
    guests: &mut [doctor::Guest],
    read_host: impl FnOnce(&Path) -> T,
) -> T {
    let procfs = ProcFs::new(root.join("proc"));
    let started = Instant::now();
    let before: Vec<_> = guests
        .iter()
        .map(|g| guest_stats::sample(&procfs, &g.spec.uuid, None))
        .collect();
    let host = read_host(root);
    let mut rates = RateTracker::default();
    for (guest, first) in guests.iter_mut().zip(before) {
        let Some(first) = first else { continue };
        rates.record(&guest.spec.uuid, started, &first);
        if let Some(second) = guest_stats::sample(&procfs, &guest.spec.uuid, Some(first.pid)) {
            guest.steal_pct = rates
                .record(&guest.spec.uuid, Instant::now(), &second)
                .steal_pct;
        }
    }
    host
}

/// Prints `value` as JSON, or as the text `text` renders.
fn emit<T: serde::Serialize>(
    json: bool,
    value: &T,
    text: impl FnOnce(&T) -> String,
) -> Result<(), CliError> {
    print!("{}", if json { to_json(value)? } else { text(value) });
    Ok(())
}

fn to_json(value: &impl serde::Serialize) -> Result<String, CliError> {
    Ok(serde_json::to_string_pretty(value)? + "\n")
}
