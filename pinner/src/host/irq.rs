//! Device interrupts as /proc/irq shows them: each IRQ's
//! `smp_affinity_list` and the `default_smp_affinity` new IRQs start with.
//! The root is a path, so tests point it at a fixture tree; the suite never
//! writes this machine's own IRQs.

use super::file::read_text;
use crate::engine::cpuset::CpuSet;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// An IRQ file that could not be read or written, with its path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IrqError {
    #[error("cannot read {}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    /// The kernel keeps this IRQ's affinity itself (a managed interrupt,
    /// spread over the CPUs by its driver) and refuses any other.
    #[error("IRQ {irq}: affinity kept by the kernel (managed interrupt)")]
    Managed { irq: u32 },
    #[error("cannot write {value:?} to {}: {reason}", path.display())]
    Write {
        path: PathBuf,
        value: String,
        reason: String,
    },
}

/// One IRQ and the CPUs it was allowed before pinner steered it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IrqAffinity {
    pub irq: u32,
    pub cpus: String,
}

/// `/proc/irq` under a root.
#[derive(Debug, Clone)]
pub struct IrqTable {
    dir: PathBuf,
}

/// Reads at most this much of an IRQ file: they are one short line.
const MAX_FILE: u64 = 4096;

impl IrqTable {
    /// The table at `dir` (the host's is `/proc/irq`).
    pub fn new(dir: &Path) -> IrqTable {
        IrqTable {
            dir: dir.to_path_buf(),
        }
    }

    /// The IRQ numbers, ascending: the numeric directories.
    pub fn irqs(&self) -> Vec<u32> {
        let mut irqs: Vec<u32> = std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        irqs.sort_unstable();
        irqs
    }

    /// The CPUs IRQ `irq` may be delivered to.
    pub fn affinity(&self, irq: u32) -> Result<CpuSet, IrqError> {
        let path = self.list_path(irq);
        let text = read_small(&path)?;
        CpuSet::parse(&text).map_err(|e| IrqError::Read {
            path,
            reason: e.to_string(),
        })
    }

    /// Sets IRQ `irq`'s CPUs to `cpus` (a list as the kernel prints it).
    pub fn set_affinity(&self, irq: u32, cpus: &str) -> Result<(), IrqError> {
        let path = self.list_path(irq);
        std::fs::write(&path, format!("{cpus}\n")).map_err(|e| match e.raw_os_error() {
            // EIO: a managed interrupt (or a per-CPU one) keeps its CPUs.
            Some(libc::EIO) => IrqError::Managed { irq },
            _ => IrqError::Write {
                path,
                value: cpus.to_string(),
                reason: e.to_string(),
            },
        })
    }

    /// `default_smp_affinity` as the kernel prints it (a hex mask).
    pub fn default_mask(&self) -> Result<String, IrqError> {
        read_small(&self.dir.join("default_smp_affinity"))
    }

    /// Sets `default_smp_affinity` to `mask` (a hex mask).
    pub fn set_default_mask(&self, mask: &str) -> Result<(), IrqError> {
        let path = self.dir.join("default_smp_affinity");
        std::fs::write(&path, format!("{mask}\n")).map_err(|e| IrqError::Write {
            path,
            value: mask.to_string(),
            reason: e.to_string(),
        })
    }

    fn list_path(&self, irq: u32) -> PathBuf {
        self.dir.join(irq.to_string()).join("smp_affinity_list")
    }
}

/// A regular file of at most `MAX_FILE` bytes, trimmed.
fn read_small(path: &Path) -> Result<String, IrqError> {
    read_text(path, MAX_FILE)
        .map(|text| text.trim().to_string())
        .map_err(|e| IrqError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::scratch_dir;

    #[test]
    fn reads_and_writes_a_fixture_table() {
        let root = scratch_dir("irq-table");
        for (irq, cpus) in [(9, "0-3"), (24, "2")] {
            std::fs::create_dir_all(root.join(irq.to_string())).unwrap();
            std::fs::write(root.join(format!("{irq}/smp_affinity_list")), cpus).unwrap();
        }
        std::fs::write(root.join("default_smp_affinity"), "f\n").unwrap();
        // Not IRQs: a file with a numeric name, a named directory.
        std::fs::write(root.join("7"), "").unwrap();
        std::fs::create_dir_all(root.join("power")).unwrap();
        let table = IrqTable::new(&root);
        assert_eq!(table.irqs(), vec![9, 24]);
        assert_eq!(table.affinity(9).unwrap(), CpuSet::parse("0-3").unwrap());
        table.set_affinity(9, "0-1").unwrap();
        assert_eq!(table.affinity(9).unwrap(), CpuSet::parse("0-1").unwrap());
        assert_eq!(table.default_mask().unwrap(), "f");
        assert!(matches!(table.affinity(5), Err(IrqError::Read { .. })));
    }
}
