//! The `pinner` command line, as a definition the binary parses and the
//! packaging generates man pages and shell completions from.

use super::map::MapFormat;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

const LONG_ABOUT: &str = "pinner places the vCPUs, emulator threads and memory of running \
libvirt/KVM guests on a host's CPUs and NUMA nodes and keeps them there: each vCPU on a \
physical CPU of its own while they fit (dedicated), guests bound to the least loaded range \
of one node or L3 when the host is overcommitted (shared), memory only on nodes that hold \
it, emulator threads and host daemons on reserved housekeeping CPUs. The daemon (pinner \
daemon, run by pinner.service) takes domain events from libvirt's qemu hook (pinner-hook), \
which never calls libvirt and returns within milliseconds, and acts after libvirt has \
released the domain; it reconciles the whole host at start, when libvirt comes back and \
periodically. The other subcommands read by default and change the host only when their \
verb says so: status, plan, topology, doctor and metrics read; reconcile, isolate apply, \
isolate undo and release act.";

#[derive(Parser)]
#[command(
    name = "pinner",
    version,
    propagate_version = true,
    about = "Keeps libvirt guests' vCPUs and memory on the right CPUs and NUMA nodes",
    long_about = LONG_ABOUT
)]
pub struct Cli {
    /// Configuration file (default /etc/pinner/pinner.toml).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// `--socket`, on the subcommands that talk to the daemon.
#[derive(Args, Clone, Default)]
pub struct DaemonSocket {
    /// The daemon's socket (default: from the configuration).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

/// `--root`, on the subcommands that can read another machine's files.
#[derive(Args, Clone)]
pub struct Root {
    /// Read another machine's /sys (and /proc, /etc) instead of this
    /// host's: the directory that holds sys, sys itself, or a .tar.bz2
    /// snapshot as hwloc-gather-topology writes it.
    #[arg(long, value_name = "PATH", default_value = "/")]
    pub root: PathBuf,
}

/// `--json`, the same on every subcommand that prints a result.
#[derive(Args, Clone, Copy)]
pub struct Json {
    /// Machine-readable output: JSON, in the shapes docs/monitoring.md
    /// describes.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the daemon: take hook events, place guests, keep them placed.
    Daemon,
    /// Each running guest's policy and vCPU pins against the plan, its
    /// steal and memory locality, and the host's NUMA counters.
    Status {
        #[command(flatten)]
        json: Json,
        /// A map of the host: packages, NUMA nodes, L3, cores and threads,
        /// each CPU marked with its guest, reserved, isolated or free
        /// (`--map=svg`: as SVG).
        #[arg(long, value_name = "FORMAT", num_args = 0..=1, require_equals = true,
              default_missing_value = "text", conflicts_with_all = ["json", "watch"])]
        map: Option<MapFormat>,
        /// Refresh every SECONDS (default 2) until interrupted.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2",
              conflicts_with = "json")]
        watch: Option<u64>,
        #[command(flatten)]
        socket: DaemonSocket,
    },
    /// The daemon's status as metrics: Prometheus text, as the daemon
    /// writes its metrics file for node_exporter's textfile collector.
    Metrics {
        /// OpenMetrics text instead (counters declared by family name).
        #[arg(long)]
        openmetrics: bool,
        #[command(flatten)]
        socket: DaemonSocket,
    },
    /// Audit the host and its running guests: each finding with severity,
    /// evidence and the exact fix. Exit 2 when something needs fixing.
    Doctor {
        /// Read the guests from this libvirt, read-only (default: the
        /// configuration's URI).
        #[arg(long, value_name = "URI")]
        connect: Option<String>,
        /// Only this guest (and the host).
        #[arg(long, value_name = "NAME")]
        domain: Option<String>,
        #[command(flatten)]
        json: Json,
        #[command(flatten)]
        root: Root,
        /// How long to sample steal, interrupts and softirqs (seconds, 0
        /// to 60).
        #[arg(long, value_name = "SECONDS", default_value = "1", value_parser = sample_seconds)]
        sample: f64,
    },
    /// Reconcile now and wait for the result.
    Reconcile {
        #[command(flatten)]
        json: Json,
        #[command(flatten)]
        socket: DaemonSocket,
    },
    /// Take pinner's vCPU, emulator and IOThread pins, its memory binding
    /// and its placement off running guests: they float on every CPU
    /// again, and are marked policy none, so the daemon leaves them alone
    /// until they stop. Through the daemon; directly when it is stopped.
    Release {
        /// Guests by their exact libvirt names.
        #[arg(value_name = "DOMAIN", required_unless_present = "all")]
        domains: Vec<String>,
        /// Every running guest pinner placed.
        #[arg(long)]
        all: bool,
        /// Also mark each guest's persistent definition policy none, so it
        /// stays left alone after it restarts.
        #[arg(long)]
        persistent: bool,
        /// With the daemon stopped: the libvirt to release guests on
        /// (default: the configuration's URI).
        #[arg(long, value_name = "URI")]
        connect: Option<String>,
        #[command(flatten)]
        json: Json,
        #[command(flatten)]
        socket: DaemonSocket,
    },
    /// The placement the daemon would apply, with reasons; changes nothing.
    Plan {
        #[command(flatten)]
        root: Root,
        /// One libvirt domain XML per running guest (live pins and pinner
        /// metadata included) instead of asking libvirt.
        #[arg(long, value_name = "DIR", conflicts_with = "connect")]
        domains: Option<PathBuf>,
        /// Read the running guests from this libvirt, read-only (default:
        /// the configuration's URI).
        #[arg(long, value_name = "URI")]
        connect: Option<String>,
        /// Plan with this demand instead of the prior: a JSON object of
        /// guest name or UUID to CPUs of demand (`{"web-1": 3.5}`); guests
        /// it leaves out count at `demand_prior_per_vcpu`.
        #[arg(long, value_name = "FILE")]
        demand: Option<PathBuf>,
        #[command(flatten)]
        json: Json,
        /// The plan as a map of the host (see `status --map`).
        #[arg(long, value_name = "FORMAT", num_args = 0..=1, require_equals = true,
              default_missing_value = "text", conflicts_with = "json")]
        map: Option<MapFormat>,
    },
    /// Host processes and IRQs kept on the reserved CPUs: what is
    /// confined, excluded, or could not be moved, and why; `apply` and
    /// `undo` change it.
    Isolate {
        #[command(subcommand)]
        action: Option<IsolateAction>,
        /// Machine-readable output: JSON, in the shapes docs/monitoring.md
        /// describes.
        #[arg(long, global = true)]
        json: bool,
    },
    /// The host's CPUs, caches and NUMA nodes (with their memory) as
    /// pinner reads them from sysfs.
    Topology {
        #[command(flatten)]
        root: Root,
        #[command(flatten)]
        json: Json,
    },
}

/// What `pinner isolate` changes.
#[derive(Subcommand, Clone, Copy)]
pub enum IsolateAction {
    /// Confine host processes and steer IRQs to the reserved CPUs now (the
    /// daemon does this itself when isolation is enabled).
    Apply,
    /// Put every process and IRQ back where it was and remove pinner's
    /// groups; the daemon then leaves isolation alone until `apply` or its
    /// next start.
    Undo,
}

/// Why a `--sample` value was refused.
#[derive(Debug, thiserror::Error)]
pub enum SampleSecondsError {
    #[error("{0} is not a number of seconds from 0 to 60")]
    OutOfRange(f64),
    #[error("{0:?} is not a number of seconds")]
    NotANumber(String),
}

/// `--sample`: a number of seconds from 0 to 60 (not NaN, not infinite).
fn sample_seconds(text: &str) -> Result<f64, SampleSecondsError> {
    match text.trim().parse::<f64>() {
        Ok(s) if s.is_finite() && (0.0..=60.0).contains(&s) => Ok(s),
        Ok(s) => Err(SampleSecondsError::OutOfRange(s)),
        Err(_) => Err(SampleSecondsError::NotANumber(text.to_string())),
    }
}
