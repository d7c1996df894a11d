//! `/etc/pinner/pinner.toml`. Every error names the file, line and column,
//! and the key where one is at fault.

use crate::cpuset::CpuSet;
use crate::placement::HostPolicy;
use crate::topology::Topology;
use pinner_shared::log::Level;
use pinner_shared::paths::{DEFAULT_CONFIG, DEFAULT_SOCKET};
use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Housekeeping CPUs: never given to guests.
    pub reserved_cpus: CpuSet,
    /// Shared-mode capacity = |pool| × ratio; beyond it pinner warns.
    pub cpu_allocation_ratio: f64,
    pub socket: PathBuf,
    pub reconcile_interval: Duration,
    pub log_level: Level,
    pub libvirt_uri: String,
    /// The file this came from (None: built-in defaults).
    pub source: Option<PathBuf>,
    /// Line of `reserved_cpus` in the file, for errors found later.
    reserved_cpus_line: Option<usize>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            reserved_cpus: CpuSet::new(),
            cpu_allocation_ratio: 1.0,
            socket: PathBuf::from(DEFAULT_SOCKET),
            reconcile_interval: Duration::from_secs(10),
            log_level: Level::Info,
            libvirt_uri: "qemu:///system".into(),
            source: None,
            reserved_cpus_line: None,
        }
    }
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
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    reserved_cpus: Option<Spanned<String>>,
    cpu_allocation_ratio: Option<Spanned<f64>>,
    socket: Option<Spanned<String>>,
    reconcile_interval_secs: Option<Spanned<u64>>,
    log_level: Option<Spanned<String>>,
    libvirt: Option<RawLibvirt>,
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
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Config::parse(&text, &path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                Ok(Config::default())
            }
            Err(e) => Err(ConfigError {
                file: path.display().to_string(),
                line: None,
                column: None,
                message: format!("cannot read: {e}"),
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
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| err_at(e.span().map(|s| s.start), e.message().trim().to_string()))?;

        let mut config = Config {
            source: Some(path.to_path_buf()),
            ..Config::default()
        };
        if let Some(v) = raw.reserved_cpus {
            config.reserved_cpus = CpuSet::parse(v.get_ref())
                .map_err(|e| err_at(Some(v.span().start), format!("reserved_cpus: {e}")))?;
            config.reserved_cpus_line = Some(line_col(text, v.span().start).0);
        }
        if let Some(v) = raw.cpu_allocation_ratio {
            let ratio = *v.get_ref();
            if !(ratio.is_finite() && ratio > 0.0) {
                return Err(err_at(
                    Some(v.span().start),
                    format!("cpu_allocation_ratio must be a number above 0, not {ratio}"),
                ));
            }
            config.cpu_allocation_ratio = ratio;
        }
        if let Some(v) = raw.socket {
            if !v.get_ref().starts_with('/') {
                return Err(err_at(
                    Some(v.span().start),
                    "socket must be an absolute path".into(),
                ));
            }
            config.socket = PathBuf::from(v.into_inner());
        }
        if let Some(v) = raw.reconcile_interval_secs {
            let secs = *v.get_ref();
            if !(1..=3600).contains(&secs) {
                return Err(err_at(
                    Some(v.span().start),
                    format!("reconcile_interval_secs must be 1 to 3600, not {secs}"),
                ));
            }
            config.reconcile_interval = Duration::from_secs(secs);
        }
        if let Some(v) = raw.log_level {
            config.log_level = match v.get_ref().as_str() {
                "error" => Level::Error,
                "warning" => Level::Warning,
                "info" => Level::Info,
                "debug" => Level::Debug,
                other => {
                    return Err(err_at(
                        Some(v.span().start),
                        format!("log_level must be error, warning, info or debug, not \"{other}\""),
                    ))
                }
            };
        }
        if let Some(uri) = raw.libvirt.and_then(|l| l.uri) {
            if uri.get_ref().trim().is_empty() {
                return Err(err_at(
                    Some(uri.span().start),
                    "libvirt.uri is empty".into(),
                ));
            }
            config.libvirt_uri = uri.into_inner();
        }
        Ok(config)
    }

    /// What placement needs of this configuration.
    pub fn host_policy(&self) -> HostPolicy {
        HostPolicy {
            cpu_allocation_ratio: self.cpu_allocation_ratio,
            ..HostPolicy::with_reserved(self.reserved_cpus.clone())
        }
    }

    /// Checks what only the host can tell: reserved CPUs must exist and be
    /// online, and must leave CPUs for guests.
    pub fn check_against(&self, topology: &Topology) -> Result<(), ConfigError> {
        let error = |message: String| ConfigError {
            file: self
                .source
                .as_ref()
                .map_or_else(|| "(built-in defaults)".into(), |p| p.display().to_string()),
            line: self.reserved_cpus_line,
            column: None,
            message,
        };
        let offline = self.reserved_cpus.difference(&topology.online);
        if !offline.is_empty() {
            return Err(error(format!(
                "reserved_cpus: CPUs {offline} are not online on this host (online: {})",
                topology.online
            )));
        }
        if topology.online.difference(&self.reserved_cpus).is_empty() {
            return Err(error(format!(
                "reserved_cpus: \"{}\" reserves every online CPU, leaving none for guests",
                self.reserved_cpus
            )));
        }
        Ok(())
    }
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
        let text = include_str!("../../packaging/pinner.toml");
        let config = parse(text).unwrap();
        assert_eq!(
            config,
            Config {
                source: config.source.clone(),
                reserved_cpus_line: config.reserved_cpus_line,
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
        let e = config.check_against(&topo).unwrap_err();
        assert!(
            e.to_string()
                .contains(":1: reserved_cpus: CPUs 4-5 are not online"),
            "{e}"
        );
        let e = parse("reserved_cpus = \"0-3\"")
            .unwrap()
            .check_against(&topo)
            .unwrap_err();
        assert!(e.message.contains("leaving none for guests"), "{e}");
        parse("reserved_cpus = \"0\"")
            .unwrap()
            .check_against(&topo)
            .unwrap();
    }
}
