//! `pinner`: the daemon and its command-line client.

use pinner::hypervisor::{Hypervisor, Libvirt};
use pinner::{config, daemon, domain, isolation, reconcile, report, topology};

use clap::Parser;
use pinner::cli::{Cli, Command};
use pinner_shared::paths::DEFAULT_SOCKET;
use pinner_shared::protocol::{Request, Response};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("pinner: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    match &cli.command {
        Command::Daemon => {
            daemon::run(cli.config)?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Topology { sysfs_root, json } => {
            let topo = topology::Topology::read(sysfs_root)?;
            print!(
                "{}",
                if *json {
                    topo.to_json()
                } else {
                    topology::render_tree(&topo)
                }
            );
            return Ok(ExitCode::SUCCESS);
        }
        Command::Plan {
            sysfs_root,
            domains,
            connect,
            json,
        } => {
            let topo = topology::Topology::read(sysfs_root)?;
            let config = config::Config::load(cli.config.as_deref()).map_err(|e| e.to_string())?;
            let host = config.resolve(&topo).map_err(|e| e.to_string())?;
            let specs = match domains {
                Some(dir) => domain::read_dir(dir)?,
                None => {
                    let uri = connect.as_deref().unwrap_or(&config.libvirt_uri);
                    let mut libvirt = Libvirt::connect_read_only(uri)
                        .map_err(|e| format!("libvirt at {uri}: {e}"))?;
                    let (specs, unreadable) =
                        libvirt.running_domains().map_err(|e| e.to_string())?;
                    for problem in unreadable {
                        eprintln!("pinner: skipped a domain: {problem}");
                    }
                    specs
                }
            };
            let plan = reconcile::plan_for(&topo, &host, &specs);
            let text = if *json {
                to_json(&report::plan_json(&plan, &specs))?
            } else {
                report::plan_text(&plan, &specs)
            };
            print!("{text}");
            return Ok(ExitCode::SUCCESS);
        }
        Command::Isolate { undo, status, json } => {
            let config = config::Config::load(cli.config.as_deref()).map_err(|e| e.to_string())?;
            let state_dir = config
                .socket
                .parent()
                .unwrap_or(std::path::Path::new("/run/pinner"));
            let mut system = isolation::System::host(state_dir);
            // Undo needs only the recorded state: it works with a config
            // that no longer resolves (e.g. reserved CPUs gone offline).
            if *undo {
                let undo = isolation::undo(&mut system, &config.isolation)?;
                print!(
                    "{}",
                    if *json {
                        to_json(&undo)?
                    } else {
                        report::undo_text(&undo)
                    }
                );
                return Ok(ExitCode::SUCCESS);
            }
            let topo = topology::Topology::read(std::path::Path::new("/"))?;
            let host = config.resolve(&topo).map_err(|e| e.to_string())?;
            let settings = isolation::Settings::new(&config.isolation, &host.reserved, &topo);
            let (text, ok) = if *status {
                let status = isolation::status(&system, &settings)?;
                let text = if *json {
                    to_json(&status)?
                } else {
                    report::isolation_status_text(&status)
                };
                (text, true)
            } else {
                let sweep = isolation::isolate(&mut system, &settings)?;
                let text = if *json {
                    to_json(&sweep)?
                } else {
                    report::sweep_text(&sweep, &settings, config.isolation.enabled)
                };
                (text, sweep.failed.is_empty())
            };
            print!("{text}");
            return Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        Command::Doctor {
            connect,
            domain,
            json,
            root,
            sample,
        } => {
            return doctor(
                cli.config.as_deref(),
                connect.as_deref(),
                domain.as_deref(),
                *json,
                root,
                *sample,
            );
        }
        Command::Status { .. } | Command::Reconcile { .. } | Command::Metrics => {}
    }
    let socket = match (cli.socket, &cli.config) {
        (Some(socket), _) => socket,
        (None, Some(path)) => {
            config::Config::load(Some(path))
                .map_err(|e| e.to_string())?
                .socket
        }
        (None, None) => config::Config::load(None)
            .map(|c| c.socket)
            .unwrap_or_else(|_| PathBuf::from(DEFAULT_SOCKET)),
    };
    let (request, json, metrics) = match cli.command {
        Command::Status {
            watch: Some(seconds),
            ..
        } => return watch_status(&socket, seconds),
        Command::Status { json, watch: None } => (Request::Status, json, false),
        Command::Metrics => (Request::Status, false, true),
        Command::Reconcile { json } => (Request::Reconcile, json, false),
        Command::Daemon
        | Command::Topology { .. }
        | Command::Plan { .. }
        | Command::Isolate { .. }
        | Command::Doctor { .. } => {
            unreachable!("handled above")
        }
    };
    let response = daemon::request(&socket, &request, Duration::from_secs(150))?;
    let text = match &response {
        Response::Error(message) => return Err(format!("daemon: {message}")),
        Response::Status(report) if metrics => pinner::metrics::render(report),
        Response::Status(report) if json => to_json(report)?,
        Response::Reconciled(report) if json => to_json(report)?,
        Response::Status(report) => report::status_text(report),
        Response::Reconciled(report) => report::reconcile_text(report),
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

/// `pinner status --watch`: the status, redrawn every `seconds` until
/// interrupted (or the daemon goes away).
fn watch_status(socket: &std::path::Path, seconds: u64) -> Result<ExitCode, String> {
    let every = Duration::from_secs(seconds.max(1));
    loop {
        let text = match daemon::request(socket, &Request::Status, Duration::from_secs(150))? {
            Response::Status(report) => report::status_text(&report),
            Response::Error(message) => return Err(format!("daemon: {message}")),
            Response::Reconciled(_) => return Err("daemon: unexpected answer".into()),
        };
        // Home and clear, then the status: a terminal shows one screen.
        print!(
            "\x1b[H\x1b[2J{text}\nevery {}s; Ctrl-C to stop\n",
            every.as_secs()
        );
        let _ = std::io::Write::flush(&mut std::io::stdout());
        std::thread::sleep(every);
    }
}

/// `pinner doctor`: host and guest findings; exit 2 when any needs fixing.
fn doctor(
    config_path: Option<&std::path::Path>,
    connect: Option<&str>,
    only: Option<&str>,
    json: bool,
    root: &std::path::Path,
    sample_secs: f64,
) -> Result<ExitCode, String> {
    use pinner::{doctor, guest_stats, procs::ProcFs};
    let config = config::Config::load(config_path).map_err(|e| e.to_string())?;
    let topo = topology::Topology::read(root)?;
    // Without a configuration that fits this host, the pool checks are skipped.
    let pool = config
        .resolve(&topo)
        .ok()
        .map(|host| reconcile::plan_for(&topo, &host, &[]).pool);
    let uri = connect.unwrap_or(&config.libvirt_uri);
    let libvirt = Libvirt::connect_read_only(uri).map_err(|e| format!("libvirt at {uri}: {e}"))?;
    let (xmls, unreadable) = libvirt.running_xml().map_err(|e| e.to_string())?;
    for problem in unreadable {
        eprintln!("pinner: skipped a domain: {problem}");
    }
    let mut guests = xmls
        .iter()
        .map(|xml| doctor::Guest::from_xml(xml))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(name) = only {
        if !guests.iter().any(|g| g.spec.name == name) {
            return Err(format!("no running guest named {name:?} at {uri}"));
        }
    }
    // Steal over the sample: each guest's vCPU run-queue wait before and after.
    let procfs = ProcFs::new(root.join("proc"));
    let sample = Duration::from_secs_f64(sample_secs.clamp(0.0, 60.0));
    let started = std::time::Instant::now();
    let before: Vec<_> = guests
        .iter()
        .map(|g| guest_stats::sample(&procfs, &g.spec.uuid, None))
        .collect();
    let host = doctor::Host::read(root, pool, sample)?;
    let mut steal = guest_stats::StealTracker::default();
    for (guest, first) in guests.iter_mut().zip(before) {
        let Some(first) = first else { continue };
        steal.record(&guest.spec.uuid, started, &first);
        if let Some(second) = guest_stats::sample(&procfs, &guest.spec.uuid, Some(first.pid)) {
            guest.steal_pct = steal.record(&guest.spec.uuid, std::time::Instant::now(), &second);
        }
    }
    let findings = doctor::audit(&host, &guests, only);
    if json {
        let count = |s: doctor::Severity| findings.iter().filter(|f| f.severity == s).count();
        print!(
            "{}",
            to_json(&serde_json::json!({
                "findings": findings,
                "errors": count(doctor::Severity::Error),
                "warnings": count(doctor::Severity::Warning),
                "notes": count(doctor::Severity::Info),
            }))?
        );
    } else {
        print!("{}", doctor::render_text(&findings));
    }
    Ok(if doctor::needs_fixing(&findings) {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

fn to_json(value: &impl serde::Serialize) -> Result<String, String> {
    serde_json::to_string_pretty(value)
        .map(|s| s + "\n")
        .map_err(|e| format!("cannot render JSON: {e}"))
}
