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
        Command::Status { .. } | Command::Reconcile { .. } => {}
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
    let (request, json) = match cli.command {
        Command::Status { json } => (Request::Status, json),
        Command::Reconcile { json } => (Request::Reconcile, json),
        Command::Daemon
        | Command::Topology { .. }
        | Command::Plan { .. }
        | Command::Isolate { .. } => {
            unreachable!("handled above")
        }
    };
    let response = daemon::request(&socket, &request, Duration::from_secs(150))?;
    let text = match &response {
        Response::Error(message) => return Err(format!("daemon: {message}")),
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

fn to_json(value: &impl serde::Serialize) -> Result<String, String> {
    serde_json::to_string_pretty(value)
        .map(|s| s + "\n")
        .map_err(|e| format!("cannot render JSON: {e}"))
}
