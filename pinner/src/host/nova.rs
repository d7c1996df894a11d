//! The CPU and memory settings of an OpenStack compute node's nova.conf, so
//! pinner and nova never disagree: `[DEFAULT] cpu_allocation_ratio`,
//! `initial_cpu_allocation_ratio`, `reserved_host_cpus`,
//! `reserved_host_memory_mb`, `reserved_huge_pages`, and `[compute]
//! cpu_dedicated_set`, `cpu_shared_set`.

use crate::engine::cpuset::{CpuListError, CpuSet};
use crate::host::file::{self, FileError};
use std::path::Path;

/// What is wrong with nova.conf; every variant but `Read` has its line.
#[derive(Debug, thiserror::Error)]
pub enum NovaError {
    #[error("{0}")]
    Read(#[from] FileError),
    #[error("{key}: \"{value}\" is not a number")]
    NotANumber {
        line: usize,
        key: String,
        value: String,
    },
    #[error("reserved_host_cpus: \"{value}\" is not a count")]
    NotACount { line: usize, value: String },
    #[error("{key}: {error}")]
    CpuList {
        line: usize,
        key: &'static str,
        error: CpuListError,
    },
    #[error("reserved_host_memory_mb: \"{value}\" is not a number of MiB")]
    HostMemory { line: usize, value: String },
    #[error("reserved_huge_pages: {error}")]
    HugePages {
        line: usize,
        error: HugePageReserveError,
    },
    #[error("cpu_shared_set and cpu_dedicated_set (line {dedicated_line}) overlap on CPUs {both}")]
    Overlap {
        line: usize,
        dedicated_line: usize,
        both: CpuSet,
    },
}

impl NovaError {
    /// The 1-based line at fault (None: the file as a whole).
    pub fn line(&self) -> Option<usize> {
        match self {
            NovaError::Read(_) => None,
            NovaError::NotANumber { line, .. }
            | NovaError::NotACount { line, .. }
            | NovaError::CpuList { line, .. }
            | NovaError::HostMemory { line, .. }
            | NovaError::HugePages { line, .. }
            | NovaError::Overlap { line, .. } => Some(*line),
        }
    }
}

/// A value and the 1-based line it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Located<T> {
    pub value: T,
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct NovaConf {
    pub cpu_allocation_ratio: Option<Located<f64>>,
    pub reserved_host_cpus: Option<Located<u32>>,
    pub cpu_dedicated_set: Option<Located<CpuSet>>,
    pub cpu_shared_set: Option<Located<CpuSet>>,
    /// Memory for the host as a whole, in MiB (nova's default when unset).
    pub reserved_host_memory_mb: Option<Located<u64>>,
    /// Huge pages kept from guests: one per `reserved_huge_pages` line.
    pub reserved_huge_pages: Vec<Located<HugePageReserve>>,
}

/// `node:0,size:2048,count:64`: pages of a size kept on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HugePageReserve {
    pub node: u32,
    pub size_kib: u64,
    pub count: u64,
}

/// nova's default when neither ratio is set (`initial_cpu_allocation_ratio`).
const NOVA_INITIAL_RATIO: f64 = 4.0;

/// nova's `reserved_host_memory_mb` when nova.conf does not set it.
const NOVA_RESERVED_HOST_MEMORY_MB: u64 = 512;

/// Why a `reserved_huge_pages` value is not `node:N,size:S,count:C`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HugePageReserveError {
    #[error("{part:?} is not key:value (node:0,size:2048,count:64)")]
    NotKeyValue { part: String },
    #[error("{text:?} has no {key} (node:0,size:2048,count:64)")]
    Missing { text: String, key: &'static str },
    #[error("{key} {value:?} is not a number")]
    NotANumber { key: &'static str, value: String },
    #[error("size {size:?}: unit {unit:?} is not KB, MB or GB")]
    Unit { size: String, unit: String },
    #[error("node {0} is not a node")]
    Node(u64),
}

/// Parses nova's `node:N,size:S,count:C` (S in KiB, or with a unit: "2MB",
/// "1GB", "1G"; page sizes are binary).
pub fn parse_huge_page_reserve(text: &str) -> Result<HugePageReserve, HugePageReserveError> {
    let mut fields = std::collections::BTreeMap::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) =
            part.split_once(':')
                .ok_or_else(|| HugePageReserveError::NotKeyValue {
                    part: part.to_string(),
                })?;
        fields.insert(key.trim().to_ascii_lowercase(), value.trim());
    }
    let field = |key: &'static str| {
        fields
            .get(key)
            .copied()
            .ok_or_else(|| HugePageReserveError::Missing {
                text: text.to_string(),
                key,
            })
    };
    let number = |key: &'static str, value: &str| {
        value
            .parse::<u64>()
            .map_err(|_| HugePageReserveError::NotANumber {
                key,
                value: value.to_string(),
            })
    };
    let node = number("node", field("node")?)?;
    let size = field("size")?;
    let digits = size.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let scale = match size[digits.len()..].to_ascii_lowercase().as_str() {
        "" | "k" | "kb" | "kib" => 1,
        "m" | "mb" | "mib" => 1 << 10,
        "g" | "gb" | "gib" => 1 << 20,
        unit => {
            return Err(HugePageReserveError::Unit {
                size: size.to_string(),
                unit: unit.to_string(),
            })
        }
    };
    Ok(HugePageReserve {
        node: u32::try_from(node).map_err(|_| HugePageReserveError::Node(node))?,
        size_kib: number("size", digits)?.saturating_mul(scale),
        count: number("count", field("count")?)?,
    })
}

/// The largest nova.conf read (a real one, comments and all, is ~200 KiB).
const NOVA_CONF_SIZE_CAP: u64 = 4 * 1024 * 1024;

/// Reads `path`; errors carry the line (None: the file as a whole).
pub fn read(path: &Path) -> Result<NovaConf, NovaError> {
    parse(&file::read_text(path, NOVA_CONF_SIZE_CAP)?)
}

/// Parses oslo.config's INI dialect: `[section]`, `key = value`, `#`/`;`
/// comments. Only the keys above are looked at.
pub fn parse(text: &str) -> Result<NovaConf, NovaError> {
    let mut out = NovaConf::default();
    let mut ratio = None;
    let mut initial_ratio = None;
    for (section, key, value, line) in entries(text) {
        let float = |v: &str| {
            v.parse::<f64>().map_err(|_| NovaError::NotANumber {
                line,
                key: key.to_string(),
                value: v.to_string(),
            })
        };
        let cpus = |key: &'static str| {
            parse_spec(value).map_err(|error| NovaError::CpuList { line, key, error })
        };
        match (section.as_str(), key) {
            ("default", "cpu_allocation_ratio") if !value.is_empty() => {
                ratio = Some(Located {
                    value: float(value)?,
                    line,
                })
            }
            ("default", "initial_cpu_allocation_ratio") => {
                initial_ratio = Some(Located {
                    value: float(value)?,
                    line,
                })
            }
            ("default", "reserved_host_cpus") => {
                let count = value.parse().map_err(|_| NovaError::NotACount {
                    line,
                    value: value.to_string(),
                })?;
                out.reserved_host_cpus = Some(Located { value: count, line });
            }
            ("default", "reserved_host_memory_mb" | "reserved_huge_pages") => {
                memory_key(&mut out, key, value, line)?
            }
            ("compute", "cpu_dedicated_set") if !value.is_empty() => {
                out.cpu_dedicated_set = Some(Located {
                    value: cpus("cpu_dedicated_set")?,
                    line,
                })
            }
            ("compute", "cpu_shared_set") if !value.is_empty() => {
                out.cpu_shared_set = Some(Located {
                    value: cpus("cpu_shared_set")?,
                    line,
                })
            }
            _ => {}
        }
    }
    // 0.0 is nova's old spelling of "unset".
    out.cpu_allocation_ratio =
        ratio
            .filter(|r| r.value > 0.0)
            .or(initial_ratio)
            .or(Some(Located {
                value: NOVA_INITIAL_RATIO,
                line: 0,
            }));
    out.reserved_host_memory_mb.get_or_insert(Located {
        value: NOVA_RESERVED_HOST_MEMORY_MB,
        line: 0,
    });
    if let (Some(d), Some(s)) = (&out.cpu_dedicated_set, &out.cpu_shared_set) {
        let both = d.value.intersection(&s.value);
        if !both.is_empty() {
            return Err(NovaError::Overlap {
                line: s.line,
                dedicated_line: d.line,
                both,
            });
        }
    }
    Ok(out)
}

/// `[DEFAULT] reserved_host_memory_mb` and `reserved_huge_pages` (one
/// pool per line, as oslo.config's MultiOpt has it).
fn memory_key(out: &mut NovaConf, key: &str, value: &str, line: usize) -> Result<(), NovaError> {
    if key == "reserved_host_memory_mb" {
        let mb = value.parse().map_err(|_| NovaError::HostMemory {
            line,
            value: value.to_string(),
        })?;
        out.reserved_host_memory_mb = Some(Located { value: mb, line });
    } else if !value.is_empty() {
        let reserve =
            parse_huge_page_reserve(value).map_err(|error| NovaError::HugePages { line, error })?;
        out.reserved_huge_pages.push(Located {
            value: reserve,
            line,
        });
    }
    Ok(())
}

/// `(section, key, value, line)` of each `key = value` line, the section
/// lower-cased, comments and blank lines skipped.
fn entries(text: &str) -> Vec<(String, &str, &str, usize)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
            continue;
        }
        if let Some(name) = trimmed.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            section = name.trim().to_ascii_lowercase();
            continue;
        }
        if let Some((key, value)) = trimmed.split_once('=') {
            out.push((section.clone(), key.trim(), value.trim(), i + 1));
        }
    }
    out
}

/// nova's CPU spec: the kernel list syntax plus `^N` / `^N-M` exclusions.
pub fn parse_spec(spec: &str) -> Result<CpuSet, CpuListError> {
    let (mut include, mut exclude) = (Vec::new(), Vec::new());
    for part in spec.split(',').map(str::trim) {
        match part.strip_prefix('^') {
            Some(rest) => exclude.push(rest),
            None => include.push(part),
        }
    }
    let included = CpuSet::parse(&include.join(","))?;
    let excluded = CpuSet::parse(&exclude.join(","))?;
    Ok(included.difference(&excluded))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOVA: &str = "[DEFAULT]
# pinned compute node
cpu_allocation_ratio = 2.0
reserved_host_cpus = 0

[compute]
cpu_dedicated_set = 4-15,^8
cpu_shared_set = 2-3, 8
";

    #[test]
    fn reads_the_cpu_settings_with_their_lines() {
        let nova = parse(NOVA).unwrap();
        assert_eq!(
            nova.cpu_allocation_ratio,
            Some(Located {
                value: 2.0,
                line: 3
            })
        );
        assert_eq!(
            nova.cpu_dedicated_set.unwrap().value.to_string(),
            "4-7,9-15"
        );
        let shared = nova.cpu_shared_set.unwrap();
        assert_eq!(
            (shared.value.to_string(), shared.line),
            ("2-3,8".to_string(), 8)
        );
    }

    #[test]
    fn reads_the_memory_reserves() {
        let nova = parse(
            "[DEFAULT]\nreserved_host_memory_mb = 4096\n\
             reserved_huge_pages = node:0,size:2048,count:64\n\
             reserved_huge_pages = node:1,size:1GB,count:4\n",
        )
        .unwrap();
        assert_eq!(nova.reserved_host_memory_mb.unwrap().value, 4096);
        let pages: Vec<_> = nova
            .reserved_huge_pages
            .iter()
            .map(|r| (r.value, r.line))
            .collect();
        assert_eq!(
            pages,
            vec![
                (
                    HugePageReserve {
                        node: 0,
                        size_kib: 2048,
                        count: 64
                    },
                    3
                ),
                (
                    HugePageReserve {
                        node: 1,
                        size_kib: 1 << 20,
                        count: 4
                    },
                    4
                ),
            ]
        );
        assert_eq!(
            parse("").unwrap().reserved_host_memory_mb,
            Some(Located {
                value: 512,
                line: 0
            }),
            "nova's default"
        );
        let e = parse("[DEFAULT]\nreserved_huge_pages = node:0,size:2TB,count:1\n").unwrap_err();
        assert_eq!(e.line(), Some(2));
        assert!(e.to_string().contains("unit \"tb\""), "{e}");
        assert_eq!(
            parse_huge_page_reserve("node:0,count:1"),
            Err(HugePageReserveError::Missing {
                text: "node:0,count:1".into(),
                key: "size"
            })
        );
    }

    #[test]
    fn unset_ratio_is_novas_initial_ratio() {
        let nova = parse("[DEFAULT]\ncpu_allocation_ratio = 0.0\n").unwrap();
        assert_eq!(nova.cpu_allocation_ratio.unwrap().value, 4.0);
        let nova = parse("[DEFAULT]\ninitial_cpu_allocation_ratio = 8.0\n").unwrap();
        assert_eq!(nova.cpu_allocation_ratio.unwrap().value, 8.0);
    }

    #[test]
    fn errors_name_the_line() {
        assert_eq!(
            parse("[compute]\n\ncpu_shared_set = 1-x\n")
                .unwrap_err()
                .line(),
            Some(3)
        );
        let error =
            parse("[compute]\ncpu_dedicated_set = 1-4\ncpu_shared_set = 4-5\n").unwrap_err();
        assert_eq!(error.line(), Some(3));
        let message = error.to_string();
        assert!(message.contains("overlap on CPUs 4"), "{message}");
        assert!(parse("[DEFAULT]\ncpu_allocation_ratio = lots\n")
            .unwrap_err()
            .to_string()
            .contains("not a number"));
    }
}
