//! The `pinner` command line, as a definition the binary parses and the
//! packaging generates man pages and shell completions from.

use super::map::MapFormat;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "pinner",
    version,
    about = "Keeps libvirt guests' vCPUs on the right physical CPUs"
)]
pub struct Cli {
    /// Configuration file (default /etc/pinner/pinner.toml).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The daemon's socket (default: from the configuration).
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the daemon: take hook events, place guests, keep them placed.
    Daemon,
    /// Each running guest's policy and vCPU pins against the plan, its
    /// steal and memory locality, and the host's NUMA counters.
    Status {
        /// Machine-readable output.
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// A map of the host: packages, NUMA nodes, L3, cores and threads,
        /// each CPU marked with its guest, reserved, isolated or free
        /// (`--map=svg`: as SVG).
        #[arg(long, value_name = "FORMAT", num_args = 0..=1, require_equals = true,
              default_missing_value = "text", conflicts_with_all = ["json", "watch"])]
        map: Option<MapFormat>,
        /// Refresh every SECONDS (default 2) until interrupted.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<u64>,
    },
    /// The daemon's status as metrics: Prometheus text, as the daemon
    /// writes its metrics file for node_exporter's textfile collector.
    Metrics {
        /// OpenMetrics text instead (counters declared by family name).
        #[arg(long)]
        openmetrics: bool,
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
        #[arg(long)]
        json: bool,
        /// Read /proc, /sys and /etc under this root (a fixture or a copy
        /// of another host's files).
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
        /// How long to sample steal, interrupts and softirqs (seconds, 0
        /// to 60).
        #[arg(long, value_name = "SECONDS", default_value = "1", value_parser = sample_seconds)]
        sample: f64,
    },
    /// Reconcile now and wait for the result.
    Reconcile {
        #[arg(long)]
        json: bool,
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
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// The placement the daemon would apply, with reasons; changes nothing.
    Plan {
        #[arg(long, value_name = "DIR", default_value = "/")]
        sysfs_root: PathBuf,
        /// One libvirt domain XML per running guest (live pins and pinner
        /// metadata included) instead of asking libvirt.
        #[arg(long, value_name = "DIR", conflicts_with = "connect")]
        domains: Option<PathBuf>,
        /// Read the running guests from this libvirt, read-only (default:
        /// the configuration's URI).
        #[arg(long, value_name = "URI")]
        connect: Option<String>,
        #[arg(long)]
        json: bool,
        /// The plan as a map of the host (see `status --map`).
        #[arg(long, value_name = "FORMAT", num_args = 0..=1, require_equals = true,
              default_missing_value = "text", conflicts_with = "json")]
        map: Option<MapFormat>,
    },
    /// Confine host processes to the reserved CPUs (cgroups), undo it, or
    /// show where things stand.
    Isolate {
        /// Put every process back where it was and remove pinner's groups.
        #[arg(long, conflicts_with = "status")]
        undo: bool,
        /// What is confined, excluded, or could not be moved, and why.
        #[arg(long)]
        status: bool,
        #[arg(long)]
        json: bool,
    },
    /// The host's CPUs as pinner reads them from sysfs.
    Topology {
        /// Read sysfs under this root (e.g. an extracted snapshot).
        #[arg(long, value_name = "DIR", default_value = "/")]
        sysfs_root: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

/// `--sample`: a number of seconds from 0 to 60 (not NaN, not infinite).
fn sample_seconds(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(s) if s.is_finite() && (0.0..=60.0).contains(&s) => Ok(s),
        Ok(s) => Err(format!("{s} is not a number of seconds from 0 to 60")),
        Err(_) => Err(format!("{text:?} is not a number of seconds")),
    }
}
