//! `/etc/pinner/pinner.toml`. Every error names the file, line and column,
//! and the key where one is at fault.

use crate::engine::cpuset::CpuSet;
use crate::engine::domain::Policy;
use crate::engine::memory::MemoryReserve;
use crate::engine::placement::{
    EmulatorPolicy, HostPolicy, DEFAULT_CAPACITY_HYSTERESIS_PERCENT, DEFAULT_DEMAND_PRIOR_PER_VCPU,
};
use crate::engine::policy::{FlavorRule, PolicyRules};
use crate::engine::rebalance::Rules as RebalanceRules;
use crate::engine::topology::Topology;
use crate::host::{file, nova};
use pinner_shared::log::Level;
use pinner_shared::paths::{DEFAULT_CONFIG, DEFAULT_SOCKET};
use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

pub mod keys;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Housekeeping CPUs: never given to guests.
    pub reserved_cpus: CpuSet,
    /// Shared-mode capacity = |pool| × ratio; beyond it pinner warns.
    pub cpu_allocation_ratio: f64,
    pub socket: PathBuf,
    /// A group whose members may use the daemon too, through a socket of
    /// their own ([`Config::group_socket`]), besides root.
    pub socket_group: Option<SocketGroup>,
    pub reconcile_interval: Duration,
    /// How often a pass reads every guest's XML again, not only those
    /// libvirt's events said changed (`full_read_interval_secs`).
    pub full_read_interval: Duration,
    pub log_level: Level,
    pub libvirt_uri: String,
    pub emulator_threads: EmulatorPolicy,
    /// Move each guest NUMA cell's resident memory to its cell's node
    /// (move_pages(2)); off: cells' memory lands where it is first touched.
    pub move_cell_memory: bool,
    /// Normal memory the host keeps for itself on each NUMA node, in MiB.
    pub reserved_memory_mib: u64,
    /// Huge pages kept from guests (nova's syntax, one entry per pool).
    pub reserved_huge_pages: Vec<nova::HugePageReserve>,
    /// An OpenStack compute node's nova.conf to take CPU settings from.
    pub nova_conf: Option<PathBuf>,
    /// `mode`: act on the plan, or only show it.
    pub enforcement: Enforcement,
    /// `default_policy`, `[[openstack.flavor_policy]]`, `[openstack]
    /// place_floating`: which guests are placed, and how.
    pub policy_rules: PolicyRules,
    /// `memory_move_mib_per_sec`: how fast running guests' memory is moved
    /// to new nodes (0: at once, as libvirt's binding moves it).
    pub memory_move_mib_per_sec: u64,
    /// Free share of the pool range-bound auto guests need to go back to
    /// one-to-one (percent).
    pub capacity_hysteresis_percent: u32,
    /// What an unmeasured shared guest weighs, in CPUs per vCPU.
    pub demand_prior_per_vcpu: f64,
    /// `shared_balance`: what shared guests are balanced by.
    pub shared_balance: SharedBalance,
    /// `[rebalance]`: when running shared guests move.
    pub rebalance: RebalanceRules,
    pub isolation: IsolationConfig,
    /// `[metrics] file`: a metrics file (Prometheus text) the daemon keeps
    /// current; see [`Config::metrics_path`].
    pub metrics_file: MetricsFile,
    pub metrics_interval: Duration,
    /// The file this came from (None: built-in defaults).
    pub source: Option<PathBuf>,
    /// Lines of keys in the file, for errors found later (None: not set).
    reserved_cpus_line: Option<usize>,
    ratio_line: Option<usize>,
    reserved_memory_line: Option<usize>,
    reserved_huge_pages_line: Option<usize>,
}

/// `[metrics] file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsFile {
    /// Unset: `pinner.prom` in node_exporter's textfile directory, while
    /// that directory exists.
    Auto,
    /// `""`: no file.
    Off,
    At(PathBuf),
}

/// node_exporter's textfile directory as Debian and Ubuntu package it.
pub const NODE_EXPORTER_TEXTFILE_DIR: &str = "/var/lib/prometheus/node-exporter";

/// `mode`: whether the daemon acts on its plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    /// Pins, binds, marks, confines, moves memory: the plan made true.
    Enforce,
    /// Plans on every event and interval and shows what it would change;
    /// writes nothing to libvirt, cgroups, IRQs or memory.
    Observe,
}

impl Enforcement {
    pub fn as_str(self) -> &'static str {
        match self {
            Enforcement::Enforce => "enforce",
            Enforcement::Observe => "observe",
        }
    }
}

/// `shared_balance`: what shared guests are balanced by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedBalance {
    /// Measured demand per pCPU (the prior until measured), and
    /// rebalancing.
    Demand,
    /// vCPUs per pCPU, as before demand was measured; no rebalancing.
    Vcpus,
}

/// `memory_move_mib_per_sec` when the file does not set it (see
/// docs/measurements.md for the stall it keeps guests under).
pub const DEFAULT_MEMORY_MOVE_MIB_PER_SEC: u64 = 256;

/// `reserved_memory_mib` when the file does not set it: what the host's
/// own daemons, and qemu beside each guest's RAM, take on a node.
pub const DEFAULT_RESERVED_MEMORY_MIB: u64 = 512;

impl Default for Config {
    fn default() -> Self {
        Config {
            reserved_cpus: CpuSet::new(),
            cpu_allocation_ratio: 1.0,
            socket: PathBuf::from(DEFAULT_SOCKET),
            socket_group: None,
            reconcile_interval: Duration::from_secs(10),
            full_read_interval: Duration::from_secs(60),
            log_level: Level::Info,
            libvirt_uri: "qemu:///system".into(),
            emulator_threads: EmulatorPolicy::Housekeeping,
            move_cell_memory: true,
            reserved_memory_mib: DEFAULT_RESERVED_MEMORY_MIB,
            reserved_huge_pages: Vec::new(),
            nova_conf: None,
            enforcement: Enforcement::Enforce,
            policy_rules: PolicyRules::default(),
            memory_move_mib_per_sec: DEFAULT_MEMORY_MOVE_MIB_PER_SEC,
            capacity_hysteresis_percent: DEFAULT_CAPACITY_HYSTERESIS_PERCENT,
            demand_prior_per_vcpu: DEFAULT_DEMAND_PRIOR_PER_VCPU,
            shared_balance: SharedBalance::Demand,
            rebalance: RebalanceRules::default(),
            isolation: IsolationConfig::default(),
            metrics_file: MetricsFile::Auto,
            metrics_interval: Duration::from_secs(15),
            source: None,
            reserved_cpus_line: None,
            ratio_line: None,
            reserved_memory_line: None,
            reserved_huge_pages_line: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketGroup {
    pub name: String,
    pub gid: u32,
}

/// `[isolation]`: host daemons kept on the reserved CPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsolationConfig {
    pub enabled: bool,
    /// Process names (comm or argv[0]'s base name) and cgroup paths
    /// (starting with '/') never moved.
    pub exclude: Vec<String>,
    /// Memory limit of the housekeeping group, in bytes.
    pub memory_limit: Option<u64>,
    /// Undo isolation when the daemon stops.
    pub restore_on_exit: bool,
    /// Steer device interrupts to the reserved CPUs too.
    pub steer_irqs: bool,
    /// The /proc sweep that catches processes no pid file announced.
    pub sweep_interval: Duration,
    /// Directories whose pid files are watched for (re)started daemons.
    pub pid_dirs: Vec<PathBuf>,
    /// Name of pinner's housekeeping cgroup.
    pub group: String,
    /// Tests only, from [`TEST_PROCESS_GROUP_ENV`] (never the file): move
    /// nothing outside these process groups.
    pub test_only_process_group: Option<Vec<u32>>,
}

impl IsolationConfig {
    /// Steering writes the host's IRQs; a test run confined to its own
    /// processes never does.
    pub fn steers_irqs(&self) -> bool {
        self.steer_irqs && self.test_only_process_group.is_none()
    }
}

impl Default for IsolationConfig {
    fn default() -> Self {
        IsolationConfig {
            enabled: false,
            exclude: vec!["ovs-vswitchd".into(), "ovsdb-server".into()],
            memory_limit: None,
            restore_on_exit: false,
            steer_irqs: true,
            sweep_interval: Duration::from_secs(2),
            pid_dirs: vec![PathBuf::from("/run"), PathBuf::from("/var/run")],
            group: "pinner-housekeeping".into(),
            test_only_process_group: None,
        }
    }
}

/// The largest config file read: the shipped one is ~4 KiB, and anything
/// near this is a mistake or an attack, not a configuration.
pub const CONFIG_SIZE_CAP: u64 = 1024 * 1024;

/// Set by the test suite so that isolation only ever moves its own dummy
/// processes: the process groups to restrict it to (comma-separated; the
/// effect bench's burners are daemons of their own sessions, as real ones
/// are). Not a configuration key, so no operator sets it by accident.
pub const TEST_PROCESS_GROUP_ENV: &str = "PINNER_TEST_ONLY_PROCESS_GROUP";

/// The process groups of [`TEST_PROCESS_GROUP_ENV`], when set.
fn test_process_group() -> Result<Option<Vec<u32>>, ConfigError> {
    let Some(value) = std::env::var_os(TEST_PROCESS_GROUP_ENV) else {
        return Ok(None);
    };
    let text = value.to_string_lossy();
    let groups: Result<Vec<u32>, _> = text.split(',').map(|g| g.trim().parse()).collect();
    groups.map(Some).map_err(|_| ConfigError {
        file: format!("${TEST_PROCESS_GROUP_ENV}"),
        line: None,
        column: None,
        message: format!(
            "{:?} is not a list of process group ids",
            text.chars().take(32).collect::<String>()
        ),
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        write!(f, ": {}", cut(&self.message, MESSAGE_CAP))
    }
}

/// The longest message shown: a value pasted whole into an error (a 100 MB
/// line, say) would otherwise become one log line of that size.
const MESSAGE_CAP: usize = 400;

/// `text` up to `cap` characters, with what was left out counted.
fn cut(text: &str, cap: usize) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(cap) {
        None => text.into(),
        Some((end, _)) => format!("{}… ({} more bytes)", &text[..end], text.len() - end).into(),
    }
}

impl std::error::Error for ConfigError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    reserved_cpus: Option<Spanned<String>>,
    cpu_allocation_ratio: Option<Spanned<f64>>,
    socket: Option<Spanned<String>>,
    socket_group: Option<Spanned<String>>,
    reconcile_interval_secs: Option<Spanned<u64>>,
    full_read_interval_secs: Option<Spanned<u64>>,
    log_level: Option<Spanned<String>>,
    emulator_threads: Option<Spanned<String>>,
    move_cell_memory: Option<bool>,
    reserved_memory_mib: Option<Spanned<i64>>,
    reserved_huge_pages: Option<Vec<Spanned<String>>>,
    mode: Option<Spanned<String>>,
    default_policy: Option<Spanned<String>>,
    memory_move_mib_per_sec: Option<Spanned<i64>>,
    capacity_hysteresis_percent: Option<Spanned<i64>>,
    demand_prior_per_vcpu: Option<Spanned<f64>>,
    shared_balance: Option<Spanned<String>>,
    rebalance: Option<RawRebalance>,
    libvirt: Option<RawLibvirt>,
    openstack: Option<RawOpenstack>,
    isolation: Option<RawIsolation>,
    metrics: Option<RawMetrics>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRebalance {
    threshold_percent: Option<Spanned<i64>>,
    samples: Option<Spanned<i64>>,
    cooldown_secs: Option<Spanned<i64>>,
    max_moves: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    file: Option<Spanned<String>>,
    interval_secs: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIsolation {
    enabled: Option<bool>,
    exclude: Option<Vec<Spanned<String>>>,
    memory_limit: Option<Spanned<toml::Value>>,
    restore_on_exit: Option<bool>,
    steer_irqs: Option<bool>,
    sweep_interval_secs: Option<Spanned<u64>>,
    pid_dirs: Option<Vec<Spanned<String>>>,
    group: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOpenstack {
    nova_conf: Option<Spanned<String>>,
    place_floating: Option<bool>,
    flavor_policy: Option<Vec<RawFlavorPolicy>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlavorPolicy {
    flavor: Spanned<String>,
    policy: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLibvirt {
    uri: Option<Spanned<String>>,
}

impl Config {
    /// Loads `path`, or the default file when `path` is None. A missing
    /// default file means built-in defaults; a missing named file is an error.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut config = Config::read(path)?;
        config.isolation.test_only_process_group = test_process_group()?;
        Ok(config)
    }

    fn read(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        match file::read_text(&path, CONFIG_SIZE_CAP) {
            Ok(text) => Config::parse(&text, &path),
            Err(e) if e.is_not_found() && !explicit => Ok(Config::default()),
            Err(e) => Err(ConfigError {
                file: path.display().to_string(),
                line: None,
                column: None,
                message: e.to_string(),
            }),
        }
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let err_at = |offset: Option<usize>, message: String| {
            let (line, column) = offset.map_or((None, None), |o| {
                let (l, c) = line_col(text, o);
                (Some(l), Some(c))
            });
            ConfigError {
                file: path.display().to_string(),
                line,
                column,
                message,
            }
        };
        let mut raw: RawConfig = toml::from_str(text)
            .map_err(|e| err_at(e.span().map(|s| s.start), e.message().trim().to_string()))?;

        let mut config = Config {
            source: Some(path.to_path_buf()),
            ..Config::default()
        };
        config.shared_keys(&mut raw, &err_at)?;
        config.cpu_keys(raw.reserved_cpus, raw.cpu_allocation_ratio, text, &err_at)?;
        if let Some(v) = raw.socket {
            config.socket = absolute_path(&v, "socket", &err_at)?;
        }
        if let Some(v) = raw.socket_group {
            config.socket_group = Some(socket_group(&v, &err_at)?);
        }
        if let Some(v) = raw.reconcile_interval_secs {
            config.reconcile_interval = interval(&v, "reconcile_interval_secs", &err_at)?;
        }
        if let Some(v) = raw.full_read_interval_secs {
            config.full_read_interval = interval(&v, "full_read_interval_secs", &err_at)?;
        }
        if let Some(v) = raw.log_level {
            let levels = [
                ("error", Level::Error),
                ("warning", Level::Warning),
                ("info", Level::Info),
                ("debug", Level::Debug),
            ];
            let expected = "error, warning, info or debug";
            config.log_level = one_of(&v, "log_level", &levels, expected, &err_at)?;
        }
        if let Some(v) = raw.emulator_threads {
            let policies = [
                ("housekeeping", EmulatorPolicy::Housekeeping),
                ("guest", EmulatorPolicy::Guest),
            ];
            let expected = "\"housekeeping\" or \"guest\"";
            config.emulator_threads = one_of(&v, "emulator_threads", &policies, expected, &err_at)?;
        }
        if let Some(v) = raw.move_cell_memory {
            config.move_cell_memory = v;
        }
        config.memory_keys(
            raw.reserved_memory_mib,
            raw.reserved_huge_pages,
            text,
            &err_at,
        )?;
        config.acting_keys(
            raw.mode,
            raw.default_policy,
            raw.memory_move_mib_per_sec,
            &err_at,
        )?;
        config.tables(
            raw.openstack,
            raw.libvirt,
            raw.isolation,
            raw.metrics,
            &err_at,
        )?;
        Ok(config)
    }

    /// `reserved_cpus` and `cpu_allocation_ratio`, with their lines.
    fn cpu_keys(
        &mut self,
        reserved: Option<Spanned<String>>,
        ratio: Option<Spanned<f64>>,
        text: &str,
        err_at: &dyn Fn(Option<usize>, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        if let Some(v) = reserved {
            self.reserved_cpus = CpuSet::parse(v.get_ref())
                .map_err(|e| err_at(Some(v.span().start), format!("reserved_cpus: {e}")))?;
            self.reserved_cpus_line = Some(line_col(text, v.span().start).0);
        }
        if let Some(v) = ratio {
            let ratio = *v.get_ref();
            if !(ratio.is_finite() && ratio > 0.0) {
                return Err(err_at(
                    Some(v.span().start),
                    format!("cpu_allocation_ratio must be a number above 0, not {ratio}"),
                ));
            }
            self.cpu_allocation_ratio = ratio;
            self.ratio_line = Some(line_col(text, v.span().start).0);
        }
        Ok(())
    }

    /// `reserved_memory_mib` and `reserved_huge_pages`.
    fn memory_keys(
        &mut self,
        mib: Option<Spanned<i64>>,
        huge: Option<Vec<Spanned<String>>>,
        text: &str,
        err_at: &dyn Fn(Option<usize>, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        if let Some(v) = mib {
            // 1 PiB: any node; a larger value is a typo, not a host.
            self.reserved_memory_mib = u64::try_from(*v.get_ref())
                .ok()
                .filter(|m| *m <= 1 << 30)
                .ok_or_else(|| {
                err_at(
                    Some(v.span().start),
                    format!(
                        "reserved_memory_mib must be MiB from 0, not {}",
                        v.get_ref()
                    ),
                )
            })?;
            self.reserved_memory_line = Some(line_col(text, v.span().start).0);
        }
        for entry in huge.into_iter().flatten() {
            let at = Some(entry.span().start);
            let reserve = nova::parse_huge_page_reserve(entry.get_ref())
                .map_err(|e| err_at(at, format!("reserved_huge_pages: {e}")))?;
            self.reserved_huge_pages.push(reserve);
            self.reserved_huge_pages_line
                .get_or_insert(line_col(text, entry.span().start).0);
        }
        Ok(())
    }

    /// `mode`, `default_policy` and `memory_move_mib_per_sec`.
    fn acting_keys(
        &mut self,
        mode: Option<Spanned<String>>,
        default_policy: Option<Spanned<String>>,
        rate: Option<Spanned<i64>>,
        err_at: &dyn Fn(Option<usize>, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        if let Some(v) = mode {
            let modes = [
                ("enforce", Enforcement::Enforce),
                ("observe", Enforcement::Observe),
            ];
            self.enforcement = one_of(&v, "mode", &modes, "\"enforce\" or \"observe\"", err_at)?;
        }
        if let Some(v) = default_policy {
            self.policy_rules.default = policy_word(&v, "default_policy", err_at)?;
        }
        if let Some(v) = rate {
            // 1 TiB/s: no memory moves faster; a larger value is a typo.
            self.memory_move_mib_per_sec = u64::try_from(*v.get_ref())
                .ok()
                .filter(|r| *r <= 1 << 20)
                .ok_or_else(|| {
                    err_at(
                        Some(v.span().start),
                        format!(
                            "memory_move_mib_per_sec must be MiB per second from 0 (0: unpaced), not {}",
                            v.get_ref()
                        ),
                    )
                })?;
        }
        Ok(())
    }

    /// `[openstack]`: nova.conf, floating guests, flavor policies.
    fn openstack_keys(
        &mut self,
        openstack: RawOpenstack,
        err_at: &dyn Fn(Option<usize>, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        if let Some(v) = openstack.nova_conf {
            if !v.get_ref().is_empty() {
                self.nova_conf = Some(absolute_path(&v, "openstack.nova_conf", err_at)?);
            }
        }
        if let Some(v) = openstack.place_floating {
            self.policy_rules.place_floating = v;
        }
        for rule in openstack.flavor_policy.into_iter().flatten() {
            if rule.flavor.get_ref().is_empty() {
                return Err(err_at(
                    Some(rule.flavor.span().start),
                    "openstack.flavor_policy: flavor is empty (\"*\" matches every flavor)".into(),
                ));
            }
            let policy = policy_word(&rule.policy, "openstack.flavor_policy: policy", err_at)?;
            self.policy_rules.flavors.push(FlavorRule {
                pattern: rule.flavor.into_inner(),
                policy,
            });
        }
        Ok(())
    }

    /// How range-bound guests are placed: `capacity_hysteresis_percent`,
    /// `shared_balance`, `demand_prior_per_vcpu` and `[rebalance]`.
    fn shared_keys(
        &mut self,
        raw: &mut RawConfig,
        err_at: &dyn Fn(Option<usize>, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        if let Some(v) = raw.capacity_hysteresis_percent.take() {
            self.capacity_hysteresis_percent =
                percent(&v, "capacity_hysteresis_percent", 50, err_at)?;
        }
        if let Some(v) = raw.shared_balance.take() {
            let choices = [
                ("demand", SharedBalance::Demand),
                ("vcpus", SharedBalance::Vcpus),
            ];
            let expected = "\"demand\" or \"vcpus\"";
            self.shared_balance = one_of(&v, "shared_balance", &choices, expected, err_at)?;
        }
        if let Some(v) = raw.demand_prior_per_vcpu.take() {
            let prior = *v.get_ref();
            if !(0.0..=1.0).contains(&prior) {
                return Err(err_at(
                    Some(v.span().start),
                    format!("demand_prior_per_vcpu must be 0.0 to 1.0, not {prior}"),
                ));
            }
            self.demand_prior_per_vcpu = prior;
        }
        let Some(raw) = raw.rebalance.take() else {
            return Ok(());
        };
        let rules = &mut self.rebalance;
        if let Some(v) = raw.threshold_percent {
            rules.threshold =
                f64::from(whole(&v, "rebalance.threshold_percent", 1..=100, err_at)?) / 100.0;
        }
        if let Some(v) = raw.samples {
            rules.samples = whole(&v, "rebalance.samples", 1..=100, err_at)?;
        }
        if let Some(v) = raw.cooldown_secs {
            rules.cooldown_secs =
                f64::from(whole(&v, "rebalance.cooldown_secs", 1..=86_400, err_at)?);
        }
        if let Some(v) = raw.max_moves {
            rules.max_moves = whole(&v, "rebalance.max_moves", 0..=64, err_at)?;
        }
        Ok(())
    }

    /// `[openstack]`, `[libvirt]`, `[isolation]` and `[metrics]`.
    fn tables(
        &mut self,
        openstack: Option<RawOpenstack>,
        libvirt: Option<RawLibvirt>,
        isolation: Option<RawIsolation>,
        metrics: Option<RawMetrics>,
        err_at: &dyn Fn(Option<usize>, String) -> ConfigError,
    ) -> Result<(), ConfigError> {
        if let Some(openstack) = openstack {
            self.openstack_keys(openstack, err_at)?;
        }
        if let Some(uri) = libvirt.and_then(|l| l.uri) {
            if uri.get_ref().trim().is_empty() {
                return Err(err_at(
                    Some(uri.span().start),
                    "libvirt.uri is empty".into(),
                ));
            }
            self.libvirt_uri = uri.into_inner();
        }
        if let Some(raw) = isolation {
            self.isolation = parse_isolation(raw, err_at)?;
        }
        if let Some(metrics) = metrics {
            if let Some(v) = metrics.file {
                self.metrics_file = if v.get_ref().is_empty() {
                    MetricsFile::Off
                } else {
                    MetricsFile::At(absolute_path(&v, "metrics.file", err_at)?)
                };
            }
            if let Some(v) = metrics.interval_secs {
                self.metrics_interval = interval(&v, "metrics.interval_secs", err_at)?;
            }
        }
        Ok(())
    }

    /// The metrics file to write now, if any: `Auto` follows node_exporter's
    /// directory (`textfile_dir`: [`NODE_EXPORTER_TEXTFILE_DIR`] on a host)
    /// coming and going (installed after pinner, say).
    pub fn metrics_path(&self, textfile_dir: &Path) -> Option<PathBuf> {
        match &self.metrics_file {
            MetricsFile::Auto => textfile_dir
                .is_dir()
                .then(|| textfile_dir.join("pinner.prom")),
            MetricsFile::Off => None,
            MetricsFile::At(path) => Some(path.clone()),
        }
    }

    /// Where `socket_group` members connect: beside the main socket (which
    /// stays root's and the hook's, so a member flooding theirs never
    /// queues ahead of a hook event), when a group is set.
    pub fn group_socket(&self) -> Option<PathBuf> {
        self.socket_group.as_ref()?;
        Some(group_socket_of(&self.socket))
    }

    fn error_in_file(&self, line: Option<usize>, message: String) -> ConfigError {
        ConfigError {
            file: self
                .source
                .as_ref()
                .map_or_else(|| "(built-in defaults)".into(), |p| p.display().to_string()),
            line,
            column: None,
            message,
        }
    }

    /// What placement needs, checked against the host: nova.conf's CPU
    /// settings merged in (a contradiction is refused, naming both files'
    /// lines), reserved CPUs online, and a pool left for guests.
    pub fn resolve(&self, topology: &Topology) -> Result<HostPolicy, ConfigError> {
        let mut host = HostPolicy {
            cpu_allocation_ratio: self.cpu_allocation_ratio,
            emulator: self.emulator_threads,
            memory_reserve: MemoryReserve {
                normal_kib_per_node: self.reserved_memory_mib * 1024,
                huge_pages: huge_page_map(&self.reserved_huge_pages),
            },
            rules: self.policy_rules.clone(),
            capacity_hysteresis_percent: self.capacity_hysteresis_percent,
            ..HostPolicy::with_reserved(self.reserved_cpus.clone())
        };
        if let Some(path) = &self.nova_conf {
            self.merge_nova(path, topology, &mut host)?;
        }
        if self.isolation.enabled && host.reserved.is_empty() {
            return Err(self.error_in_file(
                self.reserved_cpus_line,
                "[isolation] enabled = true needs reserved_cpus: the CPUs host processes are confined to".into(),
            ));
        }
        let offline = host.reserved.difference(&topology.online);
        if !offline.is_empty() {
            return Err(self.error_in_file(
                self.reserved_cpus_line,
                format!(
                    "reserved_cpus: CPUs {offline} are not online on this host (online: {})",
                    topology.online
                ),
            ));
        }
        if topology
            .online
            .difference(&host.reserved)
            .difference(&topology.isolated)
            .is_empty()
        {
            return Err(self.error_in_file(
                self.reserved_cpus_line,
                format!(
                    "reserved_cpus: \"{}\" (with isolated CPUs \"{}\") leaves no CPU for guests",
                    host.reserved, topology.isolated
                ),
            ));
        }
        Ok(host)
    }

    fn merge_nova(
        &self,
        path: &Path,
        topology: &Topology,
        host: &mut HostPolicy,
    ) -> Result<(), ConfigError> {
        let shown = path.display().to_string();
        let nova_error = |line: Option<usize>, message: String| ConfigError {
            file: shown.clone(),
            line,
            column: None,
            message,
        };
        let nova = nova::read(path).map_err(|e| nova_error(e.line(), e.to_string()))?;
        let at = |line: usize| {
            if line == 0 {
                "nova's default".to_string()
            } else {
                format!("{shown}:{line}")
            }
        };
        if let Some(ratio) = &nova.cpu_allocation_ratio {
            if self.ratio_line.is_some() && ratio.value != self.cpu_allocation_ratio {
                return Err(self.error_in_file(
                    self.ratio_line,
                    format!(
                        "cpu_allocation_ratio {} contradicts {} ({}); remove it here, nova.conf decides",
                        self.cpu_allocation_ratio,
                        at(ratio.line),
                        ratio.value
                    ),
                ));
            }
            host.cpu_allocation_ratio = ratio.value;
        }
        for set in [&nova.cpu_dedicated_set, &nova.cpu_shared_set]
            .into_iter()
            .flatten()
        {
            let offline = set.value.difference(&topology.online);
            if !offline.is_empty() {
                return Err(nova_error(
                    Some(set.line),
                    format!("CPUs {offline} are not online on this host"),
                ));
            }
        }
        let nova_reserved = nova_reserved(&nova, topology, host, &at);
        if let Some((reserved, why)) = nova_reserved {
            if self.reserved_cpus_line.is_some() && reserved != self.reserved_cpus {
                return Err(self.error_in_file(
                    self.reserved_cpus_line,
                    format!(
                        "reserved_cpus \"{}\" contradicts nova.conf, which reserves \"{reserved}\" ({why}); remove it here",
                        self.reserved_cpus
                    ),
                ));
            }
            host.reserved = reserved;
        }
        self.merge_nova_memory(&nova, topology, &at, host)
    }

    /// nova.conf's memory reserves: `reserved_host_memory_mb` spread evenly
    /// over the nodes with memory, and `reserved_huge_pages` as they are.
    /// The same keys here with other values are refused.
    fn merge_nova_memory(
        &self,
        nova: &nova::NovaConf,
        topology: &Topology,
        at: &dyn Fn(usize) -> String,
        host: &mut HostPolicy,
    ) -> Result<(), ConfigError> {
        if let Some(mb) = &nova.reserved_host_memory_mb {
            let nodes = topology
                .numa_nodes
                .iter()
                .filter(|n| n.memory_mib != Some(0))
                .count()
                .max(1) as u64;
            let per_node = mb.value.div_ceil(nodes);
            if self.reserved_memory_line.is_some() && self.reserved_memory_mib != per_node {
                return Err(self.error_in_file(
                    self.reserved_memory_line,
                    format!(
                        "reserved_memory_mib {} contradicts {}: reserved_host_memory_mb {} ({per_node} MiB on each of {nodes} nodes); remove it here, nova.conf decides",
                        self.reserved_memory_mib,
                        at(mb.line),
                        mb.value
                    ),
                ));
            }
            host.memory_reserve.normal_kib_per_node = per_node * 1024;
        }
        if let Some(first) = nova.reserved_huge_pages.first() {
            let pages: Vec<_> = nova.reserved_huge_pages.iter().map(|r| r.value).collect();
            if self.reserved_huge_pages_line.is_some()
                && huge_page_map(&pages) != huge_page_map(&self.reserved_huge_pages)
            {
                return Err(self.error_in_file(
                    self.reserved_huge_pages_line,
                    format!(
                        "reserved_huge_pages contradicts {}; remove it here, nova.conf decides",
                        at(first.line)
                    ),
                ));
            }
            host.memory_reserve.huge_pages = huge_page_map(&pages);
        }
        Ok(())
    }
}

/// Huge page reserves by (node, page size): pages kept from guests.
fn huge_page_map(
    reserves: &[nova::HugePageReserve],
) -> std::collections::BTreeMap<(u32, u64), u64> {
    let mut map = std::collections::BTreeMap::new();
    for r in reserves {
        *map.entry((r.node, r.size_kib)).or_default() += r.count;
    }
    map
}

/// The CPUs nova.conf reserves for the host, and how it says so: the CPUs
/// outside its dedicated and shared sets (which `host` then takes), else
/// its lowest `reserved_host_cpus`.
fn nova_reserved(
    nova: &nova::NovaConf,
    topology: &Topology,
    host: &mut HostPolicy,
    at: &dyn Fn(usize) -> String,
) -> Option<(CpuSet, String)> {
    if nova.cpu_dedicated_set.is_some() || nova.cpu_shared_set.is_some() {
        let guests = [&nova.cpu_dedicated_set, &nova.cpu_shared_set]
            .into_iter()
            .flatten()
            .fold(CpuSet::new(), |acc, s| acc.union(&s.value));
        host.dedicated_set = nova.cpu_dedicated_set.as_ref().map(|s| s.value.clone());
        host.shared_set = nova.cpu_shared_set.as_ref().map(|s| s.value.clone());
        Some((
            topology.online.difference(&guests),
            "the CPUs outside cpu_dedicated_set and cpu_shared_set".to_string(),
        ))
    } else {
        nova.reserved_host_cpus
            .as_ref()
            .filter(|r| r.value > 0)
            .map(|r| {
                let lowest: CpuSet = topology.online.iter().take(r.value as usize).collect();
                (
                    lowest,
                    format!(
                        "the lowest {} CPUs (reserved_host_cpus, {})",
                        r.value,
                        at(r.line)
                    ),
                )
            })
    }
}

/// `pinner.sock` → `pinner-group.sock`, in the same directory.
pub fn group_socket_of(socket: &Path) -> PathBuf {
    let stem = socket.file_stem().unwrap_or_default().to_string_lossy();
    socket.with_file_name(format!("{stem}-group.sock"))
}

/// `socket_group`: a group that exists on this host.
fn socket_group(
    v: &Spanned<String>,
    err_at: &dyn Fn(Option<usize>, String) -> ConfigError,
) -> Result<SocketGroup, ConfigError> {
    let name = v.get_ref();
    let at = Some(v.span().start);
    match nix::unistd::Group::from_name(name) {
        Ok(Some(group)) => Ok(SocketGroup {
            name: group.name,
            gid: group.gid.as_raw(),
        }),
        Ok(None) => Err(err_at(
            at,
            format!("socket_group: no group named \"{name}\" on this host"),
        )),
        Err(e) => Err(err_at(
            at,
            format!("socket_group: cannot look up group \"{name}\": {e}"),
        )),
    }
}

/// `key`'s value, one of `choices` (`expected` lists them for the error).
fn one_of<T: Copy>(
    v: &Spanned<String>,
    key: &str,
    choices: &[(&str, T)],
    expected: &str,
    err_at: &dyn Fn(Option<usize>, String) -> ConfigError,
) -> Result<T, ConfigError> {
    let word = v.get_ref().as_str();
    choices
        .iter()
        .find(|(name, _)| *name == word)
        .map(|(_, value)| *value)
        .ok_or_else(|| {
            err_at(
                Some(v.span().start),
                format!("{key} must be {expected}, not \"{word}\""),
            )
        })
}

/// A policy word (`auto`, `dedicated`, `shared`, `none`) for `key`.
fn policy_word(
    v: &Spanned<String>,
    key: &str,
    err_at: &dyn Fn(Option<usize>, String) -> ConfigError,
) -> Result<Policy, ConfigError> {
    let policies = [
        ("auto", Policy::Auto),
        ("dedicated", Policy::Dedicated),
        ("shared", Policy::Shared),
        ("none", Policy::None),
    ];
    let expected = "\"auto\", \"dedicated\", \"shared\" or \"none\"";
    one_of(v, key, &policies, expected, err_at)
}

/// A period in seconds, 1 to 3600, for `key`.
fn interval(
    v: &Spanned<u64>,
    key: &str,
    err_at: &dyn Fn(Option<usize>, String) -> ConfigError,
) -> Result<Duration, ConfigError> {
    let secs = *v.get_ref();
    if !(1..=3600).contains(&secs) {
        return Err(err_at(
            Some(v.span().start),
            format!("{key} must be 1 to 3600, not {secs}"),
        ));
    }
    Ok(Duration::from_secs(secs))
}

/// A whole percentage from 0 to `max` for `key`.
fn percent(
    v: &Spanned<i64>,
    key: &str,
    max: u32,
    err_at: &dyn Fn(Option<usize>, String) -> ConfigError,
) -> Result<u32, ConfigError> {
    whole(v, key, 0..=max, err_at)
}

/// A whole number within `range` for `key`.
fn whole(
    v: &Spanned<i64>,
    key: &str,
    range: std::ops::RangeInclusive<u32>,
    err_at: &dyn Fn(Option<usize>, String) -> ConfigError,
) -> Result<u32, ConfigError> {
    u32::try_from(*v.get_ref())
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| {
            err_at(
                Some(v.span().start),
                format!(
                    "{key} must be {} to {}, not {}",
                    range.start(),
                    range.end(),
                    v.get_ref()
                ),
            )
        })
}

/// An absolute path for `key`.
fn absolute_path(
    v: &Spanned<String>,
    key: &str,
    err_at: &dyn Fn(Option<usize>, String) -> ConfigError,
) -> Result<PathBuf, ConfigError> {
    if !v.get_ref().starts_with('/') {
        return Err(err_at(
            Some(v.span().start),
            format!("{key} must be an absolute path"),
        ));
    }
    Ok(PathBuf::from(v.get_ref()))
}

fn parse_isolation(
    raw: RawIsolation,
    err_at: &dyn Fn(Option<usize>, String) -> ConfigError,
) -> Result<IsolationConfig, ConfigError> {
    let mut isolation = IsolationConfig {
        enabled: raw.enabled.unwrap_or(false),
        restore_on_exit: raw.restore_on_exit.unwrap_or(false),
        steer_irqs: raw.steer_irqs.unwrap_or(true),
        ..IsolationConfig::default()
    };
    if let Some(list) = raw.exclude {
        isolation.exclude = Vec::with_capacity(list.len());
        for entry in list {
            let text = entry.get_ref().trim();
            if text.is_empty() || text.contains('\n') {
                return Err(err_at(
                    Some(entry.span().start),
                    "isolation.exclude: entries are process names or cgroup paths, not empty"
                        .into(),
                ));
            }
            isolation.exclude.push(text.to_string());
        }
    }
    if let Some(v) = raw.memory_limit {
        let bytes = match v.get_ref() {
            toml::Value::Integer(n) if *n > 0 => Some(*n as u64),
            toml::Value::String(text) => parse_size(text),
            _ => None,
        };
        isolation.memory_limit = Some(bytes.filter(|b| *b >= 1 << 20).ok_or_else(|| {
            err_at(
                Some(v.span().start),
                format!(
                    "isolation.memory_limit must be bytes or a size like \"4G\" (K, M, G, T), at least 1M; not {}",
                    v.get_ref()
                ),
            )
        })?);
    }
    if let Some(v) = raw.sweep_interval_secs {
        isolation.sweep_interval = interval(&v, "isolation.sweep_interval_secs", err_at)?;
    }
    if let Some(dirs) = raw.pid_dirs {
        isolation.pid_dirs = Vec::with_capacity(dirs.len());
        for dir in dirs {
            if !dir.get_ref().starts_with('/') {
                return Err(err_at(
                    Some(dir.span().start),
                    "isolation.pid_dirs: paths must be absolute".into(),
                ));
            }
            isolation.pid_dirs.push(PathBuf::from(dir.into_inner()));
        }
    }
    if let Some(v) = raw.group {
        let name = v.get_ref();
        if !crate::isolation::valid_group_name(name) {
            return Err(err_at(
                Some(v.span().start),
                format!("isolation.group must be a plain directory name (letters, digits, - _ .), not \"{name}\""),
            ));
        }
        isolation.group = v.into_inner();
    }
    Ok(isolation)
}

/// "512M", "4G", "1073741824" → bytes (binary units).
fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, ""),
    };
    let shift = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return None,
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/pinner/pinner.toml"))
    }

    #[test]
    fn shipped_default_config_parses_to_the_defaults() {
        let text = include_str!("../../../packaging/pinner.toml");
        let config = parse(text).unwrap();
        assert_eq!(
            config,
            Config {
                source: config.source.clone(),
                ..Config::default()
            }
        );
    }

    #[test]
    fn reads_every_key() {
        let config = parse(
            "reserved_cpus = \"0-1\"\ncpu_allocation_ratio = 4.0\nsocket = \"/tmp/p.sock\"\n\
             reconcile_interval_secs = 3\nlog_level = \"debug\"\n[libvirt]\nuri = \"test:///default\"\n",
        )
        .unwrap();
        assert_eq!(config.reserved_cpus.to_string(), "0-1");
        assert_eq!(config.cpu_allocation_ratio, 4.0);
        assert_eq!(config.socket, PathBuf::from("/tmp/p.sock"));
        assert_eq!(config.reconcile_interval, Duration::from_secs(3));
        assert_eq!(config.log_level, Level::Debug);
        assert_eq!(config.libvirt_uri, "test:///default");
    }

    #[test]
    fn reads_the_mode_the_policies_and_the_memory_rate() {
        let config = parse(
            "mode = \"observe\"\ndefault_policy = \"none\"\nmemory_move_mib_per_sec = 64\n\
             [openstack]\nplace_floating = true\n\
             [[openstack.flavor_policy]]\nflavor = \"cpu.*\"\npolicy = \"dedicated\"\n\
             [[openstack.flavor_policy]]\nflavor = \"*\"\npolicy = \"auto\"\n",
        )
        .unwrap();
        assert_eq!(config.enforcement, Enforcement::Observe);
        assert_eq!(config.memory_move_mib_per_sec, 64);
        let rules = &config.policy_rules;
        assert_eq!(rules.default, Policy::None);
        assert!(rules.place_floating);
        let flavors: Vec<(&str, Policy)> = rules
            .flavors
            .iter()
            .map(|r| (r.pattern.as_str(), r.policy))
            .collect();
        assert_eq!(flavors, [("cpu.*", Policy::Dedicated), ("*", Policy::Auto)]);
        let host = config
            .resolve(&Topology::uniform(&CpuSet::parse("0-3").unwrap(), 1))
            .unwrap();
        assert_eq!(&host.rules, rules);
        for (text, line, says) in [
            (
                "mode = \"watch\"\n",
                1,
                "mode must be \"enforce\" or \"observe\", not \"watch\"",
            ),
            (
                "\ndefault_policy = \"pinned\"\n",
                2,
                "default_policy must be \"auto\"",
            ),
            (
                "memory_move_mib_per_sec = -1\n",
                1,
                "memory_move_mib_per_sec must be MiB per second",
            ),
            (
                "[[openstack.flavor_policy]]\nflavor = \"m1.*\"\npolicy = \"fast\"\n",
                3,
                "openstack.flavor_policy: policy must be",
            ),
            (
                "[[openstack.flavor_policy]]\nflavor = \"\"\npolicy = \"auto\"\n",
                2,
                "flavor is empty",
            ),
            (
                "[[openstack.flavor_policy]]\nflavor = \"x\"\n",
                1,
                "missing field `policy`",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(e.line, Some(line), "{text}: {e}");
            assert!(e.message.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn reads_the_isolation_section() {
        let config = parse(
            "reserved_cpus = \"0\"\n[isolation]\nenabled = true\nexclude = [\"ovs-vswitchd\", \"/system.slice/x.service\"]\n\
             memory_limit = \"2G\"\nrestore_on_exit = true\nsteer_irqs = false\nsweep_interval_secs = 5\npid_dirs = [\"/run\"]\ngroup = \"hk\"\n",
        )
        .unwrap();
        let isolation = &config.isolation;
        assert!(isolation.enabled && isolation.restore_on_exit && !isolation.steer_irqs);
        assert_eq!(
            isolation.exclude,
            ["ovs-vswitchd", "/system.slice/x.service"]
        );
        assert_eq!(isolation.memory_limit, Some(2 << 30));
        assert_eq!(isolation.sweep_interval, Duration::from_secs(5));
        assert_eq!(isolation.pid_dirs, [PathBuf::from("/run")]);
        assert_eq!(isolation.group, "hk");
        assert_eq!(isolation.test_only_process_group, None);
        // The suite's restriction is no key an operator can set.
        let e = parse("[isolation]\ntest_only_process_group = 1\n").unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        for (size, bytes) in [("512M", 512 << 20), ("1GiB", 1 << 30), ("1048576", 1 << 20)] {
            assert_eq!(parse_size(size), Some(bytes), "{size}");
        }
        assert_eq!(parse_size("12X"), None);
    }

    #[test]
    fn isolation_errors_name_the_key() {
        let cases = [
            (
                "[isolation]\nmemory_limit = \"lots\"\n",
                2,
                "isolation.memory_limit must be bytes",
            ),
            ("[isolation]\nmemory_limit = 10\n", 2, "at least 1M"),
            (
                "[isolation]\ngroup = \"../escape\"\n",
                2,
                "isolation.group must be a plain directory name",
            ),
            (
                "[isolation]\npid_dirs = [\"run\"]\n",
                2,
                "isolation.pid_dirs: paths must be absolute",
            ),
            ("[isolation]\nexclude = [\"\"]\n", 2, "isolation.exclude"),
            (
                "[isolation]\nsweep_interval_secs = 0\n",
                2,
                "isolation.sweep_interval_secs must be 1 to 3600",
            ),
            ("[isolation]\nenable = true\n", 2, "unknown field `enable`"),
            (
                "[metrics]\nfile = \"pinner.prom\"\n",
                2,
                "metrics.file must be an absolute path",
            ),
            (
                "[metrics]\ninterval_secs = 0\n",
                2,
                "metrics.interval_secs must be 1 to 3600",
            ),
            ("[metrics]\npath = \"/x\"\n", 2, "unknown field `path`"),
        ];
        for (text, line, message) in cases {
            let e = parse(text).unwrap_err();
            assert_eq!(e.line, Some(line), "{text}: {e}");
            assert!(e.message.contains(message), "{text}: {e}");
        }
        let topo = Topology::uniform(&CpuSet::parse("0-3").unwrap(), 1);
        let e = parse("[isolation]\nenabled = true\n")
            .unwrap()
            .resolve(&topo)
            .unwrap_err();
        assert!(e.message.contains("needs reserved_cpus"), "{e}");
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let e = parse("\n\nreserved_cpus = \"3-1\"\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "/etc/pinner/pinner.toml:3:17: reserved_cpus: range \"3-1\" runs backwards"
        );
        let e = parse("cpu_allocation_ratio = 0.0\n").unwrap_err();
        assert_eq!(e.line, Some(1));
        assert!(e.message.contains("cpu_allocation_ratio"), "{e}");
        let e = parse("reserved_cpu = \"1\"\n").unwrap_err();
        assert_eq!(e.line, Some(1));
        assert!(e.message.contains("unknown field `reserved_cpu`"), "{e}");
        let e = parse("a = [\n").unwrap_err();
        assert_eq!(e.file, "/etc/pinner/pinner.toml");
        assert!(e.line.is_some(), "{e}");
        let e = parse("[libvirt]\nuri = 5\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(parse("socket = \"relative.sock\"")
            .unwrap_err()
            .message
            .contains("absolute"));
        assert!(parse("log_level = \"loud\"")
            .unwrap_err()
            .message
            .contains("log_level"));
        assert!(parse("reconcile_interval_secs = 0").is_err());
        assert!(parse("full_read_interval_secs = 3601").is_err());
        for bad in ["-1", "51"] {
            let e = parse(&format!("\ncapacity_hysteresis_percent = {bad}")).unwrap_err();
            assert_eq!(e.line, Some(2), "{e}");
            assert!(e.message.contains("must be 0 to 50, not"), "{e}");
        }
        let config = parse("capacity_hysteresis_percent = 0\nfull_read_interval_secs = 5").unwrap();
        assert_eq!(config.capacity_hysteresis_percent, 0);
        assert_eq!(config.full_read_interval, Duration::from_secs(5));
        let e = parse("\nsocket_group = \"no-such-group-here\"\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.message.contains("socket_group: no group named"), "{e}");
        let root = parse("socket_group = \"root\"\n").unwrap().socket_group;
        assert_eq!(root.map(|g| g.gid), Some(0));
    }

    #[test]
    fn demand_and_rebalancing_keys_are_read_and_checked() {
        let config = parse(
            "demand_prior_per_vcpu = 0.25\n[rebalance]\nthreshold_percent = 20\n\
             samples = 5\ncooldown_secs = 60\nmax_moves = 0\n",
        )
        .unwrap();
        assert_eq!(config.demand_prior_per_vcpu, 0.25);
        assert_eq!(config.shared_balance, SharedBalance::Demand);
        let by_count = parse("shared_balance = \"vcpus\"").unwrap();
        assert_eq!(by_count.shared_balance, SharedBalance::Vcpus);
        let rules = config.rebalance;
        assert_eq!((rules.threshold, rules.samples), (0.2, 5));
        assert_eq!((rules.cooldown_secs, rules.max_moves), (60.0, 0));
        for (text, message) in [
            (
                "demand_prior_per_vcpu = 1.5",
                "demand_prior_per_vcpu must be 0.0 to 1.0, not 1.5",
            ),
            (
                "[rebalance]\nthreshold_percent = 0",
                "rebalance.threshold_percent must be 1 to 100, not 0",
            ),
            (
                "[rebalance]\nsamples = -1",
                "rebalance.samples must be 1 to 100, not -1",
            ),
            (
                "[rebalance]\nmax_moves = 65",
                "rebalance.max_moves must be 0 to 64, not 65",
            ),
            ("[rebalance]\ncooldown = 5", "unknown field `cooldown`"),
            (
                "shared_balance = \"load\"",
                "shared_balance must be \"demand\" or \"vcpus\"",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.message.contains(message), "{text}: {e}");
            assert_eq!(e.line, Some(text.lines().count()), "{e}");
        }
    }

    #[test]
    fn only_a_small_regular_file_is_read() {
        let dir = std::env::temp_dir().join(format!("pinner-config-kinds-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo.toml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.join("zero.toml")).unwrap();
        let big = vec![b'#'; CONFIG_SIZE_CAP as usize + 1];
        std::fs::write(dir.join("big.toml"), big).unwrap();
        let refused = |name: &str| Config::load(Some(&dir.join(name))).unwrap_err().to_string();
        let at = |name: &str| dir.join(name).display().to_string();
        assert_eq!(
            refused("fifo.toml"),
            format!(
                "{}: not a regular file but a FIFO; refused",
                at("fifo.toml")
            )
        );
        assert_eq!(
            refused("zero.toml"),
            format!(
                "{}: not a regular file but a character device; refused",
                at("zero.toml")
            )
        );
        assert_eq!(
            refused("."),
            format!("{}: not a regular file but a directory; refused", at("."))
        );
        assert_eq!(
            refused("big.toml"),
            format!(
                "{}: 1048577 bytes, over the 1048576-byte limit; refused",
                at("big.toml")
            )
        );
    }

    #[test]
    fn members_have_their_own_socket_beside_the_main_one() {
        let config = parse("socket = \"/run/x/pinner.sock\"\n").unwrap();
        assert_eq!(config.group_socket(), None);
        let config = parse("socket = \"/run/x/pinner.sock\"\nsocket_group = \"root\"\n").unwrap();
        assert_eq!(
            config.group_socket(),
            Some(PathBuf::from("/run/x/pinner-group.sock"))
        );
    }

    #[test]
    fn a_huge_value_is_cut_in_the_message() {
        let value = "x".repeat(100_000);
        let e = parse(&format!("log_level = \"{value}\"\n")).unwrap_err();
        let shown = e.to_string();
        assert!(shown.len() < 1000, "{} bytes", shown.len());
        assert!(shown.contains("more bytes)"), "{shown}");
        assert!(shown.starts_with("/etc/pinner/pinner.toml:1:"), "{shown}");
    }

    #[test]
    fn missing_default_file_is_defaults_but_missing_named_file_is_an_error() {
        let e = Config::load(Some(Path::new("/nonexistent/pinner.toml"))).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/nonexistent/pinner.toml: cannot read"),
            "{e}"
        );
    }

    #[test]
    fn reserved_cpus_checked_against_the_host() {
        let topo = Topology::uniform(&CpuSet::parse("0-3").unwrap(), 1);
        let config = parse("reserved_cpus = \"2-5\"").unwrap();
        let e = config.resolve(&topo).unwrap_err();
        assert!(
            e.to_string()
                .contains(":1: reserved_cpus: CPUs 4-5 are not online"),
            "{e}"
        );
        let e = parse("reserved_cpus = \"0-3\"")
            .unwrap()
            .resolve(&topo)
            .unwrap_err();
        assert!(e.message.contains("leaves no CPU for guests"), "{e}");
        let host = parse("reserved_cpus = \"0\"\nemulator_threads = \"guest\"")
            .unwrap()
            .resolve(&topo)
            .unwrap();
        assert_eq!(host.reserved.to_string(), "0");
        assert_eq!(host.emulator, EmulatorPolicy::Guest);
    }

    fn with_nova(tag: &str, pinner: &str, nova: &str) -> Result<HostPolicy, ConfigError> {
        let dir = std::env::temp_dir().join(format!("pinner-nova-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let nova_path = dir.join("nova.conf");
        std::fs::write(&nova_path, nova).unwrap();
        let text = format!(
            "{pinner}\n[openstack]\nnova_conf = \"{}\"\n",
            nova_path.display()
        );
        let result = parse(&text)
            .and_then(|c| c.resolve(&Topology::uniform(&CpuSet::parse("0-7").unwrap(), 1)));
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    #[test]
    fn nova_conf_decides_and_contradictions_are_refused() {
        let nova = "[DEFAULT]\ncpu_allocation_ratio = 2.0\n[compute]\ncpu_dedicated_set = 4-7\ncpu_shared_set = 2-3\n";
        let host = with_nova("ok", "", nova).unwrap();
        assert_eq!(host.cpu_allocation_ratio, 2.0);
        assert_eq!(host.reserved.to_string(), "0-1");
        assert_eq!(host.dedicated_set.unwrap().to_string(), "4-7");
        assert_eq!(host.shared_set.unwrap().to_string(), "2-3");

        let e = with_nova("ratio", "cpu_allocation_ratio = 3.0", nova).unwrap_err();
        assert_eq!(e.line, Some(1));
        assert!(
            e.message.contains("contradicts") && e.message.contains("nova.conf:2"),
            "{e}"
        );
        let e = with_nova("reserved", "reserved_cpus = \"0\"", nova).unwrap_err();
        assert!(e.message.contains("reserves \"0-1\""), "{e}");
        // The same value in both files is no contradiction.
        with_nova(
            "same",
            "reserved_cpus = \"0-1\"\ncpu_allocation_ratio = 2.0",
            nova,
        )
        .unwrap();

        let host = with_nova("count", "", "[DEFAULT]\nreserved_host_cpus = 2\n").unwrap();
        assert_eq!(host.reserved.to_string(), "0-1");
        assert_eq!(host.cpu_allocation_ratio, 4.0, "nova's initial ratio");
        let e = with_nova("offline", "", "[compute]\ncpu_dedicated_set = 6-9\n").unwrap_err();
        assert!(
            e.to_string()
                .ends_with("nova.conf:2: CPUs 8-9 are not online on this host"),
            "{e}"
        );
    }

    #[test]
    fn memory_reserves_per_node_and_hugepages() {
        let topo = Topology::uniform(&CpuSet::parse("0-3").unwrap(), 2);
        let host = parse("").unwrap().resolve(&topo).unwrap();
        assert_eq!(
            host.memory_reserve.normal_kib_per_node,
            512 * 1024,
            "the default"
        );
        let config = parse(
            "reserved_memory_mib = 2048\nreserved_huge_pages = [\"node:1,size:1G,count:2\"]\n",
        )
        .unwrap();
        let host = config.resolve(&topo).unwrap();
        assert_eq!(host.memory_reserve.normal_kib_per_node, 2048 * 1024);
        assert_eq!(
            host.memory_reserve.huge_pages,
            std::collections::BTreeMap::from([((1, 1 << 20), 2)])
        );
        let e = parse("\nreserved_memory_mib = -1\n").unwrap_err();
        assert_eq!(
            (e.line, e.message.as_str()),
            (Some(2), "reserved_memory_mib must be MiB from 0, not -1")
        );
        let e = parse("reserved_huge_pages = [\"node:x,size:2048,count:1\"]").unwrap_err();
        assert!(e.message.contains("node \"x\" is not a number"), "{e}");
    }

    #[test]
    fn nova_conf_decides_memory_reserves_too() {
        let nova = "[DEFAULT]\nreserved_host_memory_mb = 4096\nreserved_huge_pages = node:0,size:2048,count:64\n";
        let host = with_nova("memory", "", nova).unwrap();
        // One node here: all of it on node 0.
        assert_eq!(host.memory_reserve.normal_kib_per_node, 4096 * 1024);
        assert_eq!(host.memory_reserve.huge_pages[&(0, 2048)], 64);
        let e = with_nova("memory-contradiction", "reserved_memory_mib = 100", nova).unwrap_err();
        assert!(
            e.message.contains("reserved_memory_mib 100 contradicts")
                && e.message.contains("nova.conf:2"),
            "{e}"
        );
        let e = with_nova(
            "pages-contradiction",
            "reserved_huge_pages = []\nreserved_huge_pages = [\"node:0,size:2048,count:1\"]",
            nova,
        );
        assert!(e.is_err(), "a duplicate key is refused by TOML itself");
        let e = with_nova(
            "pages",
            "reserved_huge_pages = [\"node:0,size:2048,count:1\"]",
            nova,
        )
        .unwrap_err();
        assert!(e.message.contains("reserved_huge_pages contradicts"), "{e}");
        // nova's default when nova.conf is silent.
        let host = with_nova("default-memory", "", "[DEFAULT]\n").unwrap();
        assert_eq!(host.memory_reserve.normal_kib_per_node, 512 * 1024);
    }
}
