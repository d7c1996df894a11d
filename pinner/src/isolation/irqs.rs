//! Device interrupts off the guests' CPUs: with isolation on, every host IRQ
//! the kernel lets move is steered to the reserved CPUs, and new IRQs start
//! there (`default_smp_affinity`), as tuned's cpu-partitioning profile does.
//! Each IRQ's CPUs before its first move are kept in the isolation state,
//! so undo puts every one back exactly. IRQs the kernel manages itself
//! (multi-queue devices spread by their driver) refuse; they are reported.

use crate::engine::cpuset::CpuSet;
use crate::host::file::read_text;
use crate::host::irq::{IrqAffinity, IrqError, IrqTable};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where steering reads and writes: `/proc/irq`, and the root under which
/// irqbalance's environment files are (`/` on a host).
#[derive(Debug, Clone)]
pub struct IrqHost {
    pub table: IrqTable,
    pub etc_root: PathBuf,
}

impl IrqHost {
    pub fn host() -> IrqHost {
        IrqHost {
            table: IrqTable::new(Path::new("/proc/irq")),
            etc_root: PathBuf::from("/"),
        }
    }
}

/// What steering changed, kept in the isolation state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IrqState {
    /// `default_smp_affinity` before pinner set it.
    pub default_mask: Option<String>,
    /// Each steered IRQ's CPUs before its first move.
    pub origins: Vec<IrqAffinity>,
    /// IRQs whose affinity the kernel keeps (not retried every sweep).
    pub managed: Vec<u32>,
}

/// One round of steering.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Steered {
    /// IRQs moved to the reserved CPUs for the first time this round.
    pub moved: Vec<u32>,
    /// Steered IRQs something (irqbalance) had moved back, steered again.
    pub again: Vec<u32>,
    /// IRQs the kernel refused to move, found this round.
    pub managed: Vec<u32>,
    pub failed: Vec<String>,
}

/// Steers every IRQ that may reach a CPU outside `reserved` to `reserved`,
/// and new IRQs' default with it, recording originals in `state` (an IRQ
/// moved back by someone else keeps its first original).
pub fn steer(table: &IrqTable, reserved: &CpuSet, state: &mut IrqState) -> Steered {
    let mut round = Steered::default();
    match table.default_mask() {
        Ok(mask) if CpuSet::from_hex_mask(&mask).as_ref() == Some(reserved) => {}
        Ok(mask) => match table.set_default_mask(&reserved.to_hex_mask()) {
            Ok(()) => {
                state.default_mask.get_or_insert(mask);
            }
            Err(e) => round.failed.push(e.to_string()),
        },
        Err(e) => round.failed.push(e.to_string()),
    }
    for irq in table.irqs() {
        if state.managed.contains(&irq) {
            continue;
        }
        let current = match table.affinity(irq) {
            Ok(cpus) if cpus.is_subset(reserved) => continue,
            Ok(cpus) => cpus,
            Err(e) => {
                round.failed.push(e.to_string());
                continue;
            }
        };
        match table.set_affinity(irq, &reserved.to_string()) {
            Ok(()) if state.origins.iter().any(|o| o.irq == irq) => round.again.push(irq),
            Ok(()) => {
                state.origins.push(IrqAffinity {
                    irq,
                    cpus: current.to_string(),
                });
                round.moved.push(irq);
            }
            Err(IrqError::Managed { .. }) => {
                state.managed.push(irq);
                round.managed.push(irq);
            }
            Err(e) => round.failed.push(e.to_string()),
        }
    }
    round
}

/// IRQ numbers joined by `separator` ("9, 24" for people, "9,24" in a
/// journal field).
pub fn irq_list(irqs: &[u32], separator: &str) -> String {
    irqs.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(separator)
}

/// What undo did to the IRQs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Restored {
    pub restored: usize,
    /// Steered IRQs that no longer exist (their device went).
    pub gone: usize,
    pub failed: Vec<String>,
}

/// Puts every steered IRQ and the default back as `state` recorded them.
pub fn restore(table: &IrqTable, state: &IrqState) -> Restored {
    let mut result = Restored::default();
    let present = table.irqs();
    for origin in &state.origins {
        if !present.contains(&origin.irq) {
            result.gone += 1;
            continue;
        }
        match table.set_affinity(origin.irq, &origin.cpus) {
            Ok(()) => result.restored += 1,
            Err(e) => result.failed.push(e.to_string()),
        }
    }
    if let Some(mask) = &state.default_mask {
        if let Err(e) = table.set_default_mask(mask) {
            result.failed.push(e.to_string());
        }
    }
    result
}

/// `pinner isolate`'s IRQ part.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct IrqStatus {
    pub steered: Vec<SteeredIrq>,
    pub managed: Vec<u32>,
    /// IRQs that can reach guest CPUs now (moved back, or new and not yet
    /// swept), managed ones aside.
    pub on_guest_cpus: Vec<u32>,
    /// What irqbalance needs, when it runs without banning the guests' CPUs.
    pub irqbalance: Option<String>,
}

/// An IRQ pinner steered: its CPUs before, and now (None: its device went).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SteeredIrq {
    pub irq: u32,
    pub before: Vec<u32>,
    pub now: Option<Vec<u32>>,
}

pub fn status(
    host: &IrqHost,
    state: &IrqState,
    reserved: &CpuSet,
    guest_cpus: &CpuSet,
    irqbalance_runs: bool,
) -> IrqStatus {
    // Each IRQ's CPUs, read once.
    let now: BTreeMap<u32, CpuSet> = host
        .table
        .irqs()
        .into_iter()
        .filter_map(|irq| Some((irq, host.table.affinity(irq).ok()?)))
        .collect();
    let on_guest_cpus = now
        .iter()
        .filter(|(irq, cpus)| !state.managed.contains(irq) && !cpus.is_subset(reserved))
        .map(|(irq, _)| *irq)
        .collect();
    IrqStatus {
        steered: state
            .origins
            .iter()
            .map(|o| SteeredIrq {
                irq: o.irq,
                before: CpuSet::parse(&o.cpus)
                    .map(|c| c.to_vec())
                    .unwrap_or_default(),
                now: now.get(&o.irq).map(CpuSet::to_vec),
            })
            .collect(),
        managed: state.managed.clone(),
        on_guest_cpus,
        irqbalance: irqbalance_runs
            .then(|| irqbalance_advice(&host.etc_root, guest_cpus))
            .flatten(),
    }
}

/// irqbalance rewrites IRQ affinities every few seconds: unless its banned
/// CPUs cover the guests' CPUs it moves IRQs back onto them. pinner does not
/// edit irqbalance's configuration (it is the operator's); it says what to set.
pub fn irqbalance_advice(etc_root: &Path, guest_cpus: &CpuSet) -> Option<String> {
    let ban = irqbalance_ban(etc_root);
    let banned = ban.as_ref().map(|(b, _)| b.clone()).unwrap_or_default();
    (!guest_cpus.is_subset(&banned)).then(|| {
        format!(
            "irqbalance runs and may move IRQs back onto guest CPUs {}: set {}",
            guest_cpus.difference(&banned),
            irqbalance_fix(
                &banned.union(guest_cpus),
                ban.as_ref().map(|(_, f)| f.as_str())
            )
        )
    })
}

/// irqbalance's environment files: Debian's, then RHEL's.
const IRQBALANCE_FILES: [&str; 2] = ["etc/default/irqbalance", "etc/sysconfig/irqbalance"];

/// The CPUs irqbalance is told to leave alone under `etc_root`, and the
/// file that says so.
pub fn irqbalance_ban(etc_root: &Path) -> Option<(CpuSet, String)> {
    IRQBALANCE_FILES.iter().find_map(|f| {
        let text = read_text(&etc_root.join(f), 64 * 1024).ok()?;
        Some((irqbalance_banned(&text)?, format!("/{f}")))
    })
}

/// What to set so that irqbalance leaves `cpus` alone, in `file` (or the
/// usual ones when none bans anything yet).
pub fn irqbalance_fix(cpus: &CpuSet, file: Option<&str>) -> String {
    let file = file.unwrap_or("/etc/default/irqbalance (/etc/sysconfig/irqbalance on RHEL)");
    format!("IRQBALANCE_BANNED_CPULIST={cpus} in {file}, then systemctl restart irqbalance")
}

/// IRQBALANCE_BANNED_CPULIST (a list) or IRQBALANCE_BANNED_CPUS (hex mask)
/// from an irqbalance environment file.
pub fn irqbalance_banned(text: &str) -> Option<CpuSet> {
    let value = |key: &str| {
        text.lines().find_map(|l| {
            let v = l.trim().strip_prefix(key)?.strip_prefix('=')?;
            Some(v.trim().trim_matches('"').to_string())
        })
    };
    if let Some(list) = value("IRQBALANCE_BANNED_CPULIST") {
        return CpuSet::parse(&list).ok();
    }
    CpuSet::from_hex_mask(&value("IRQBALANCE_BANNED_CPUS")?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::scratch_dir;

    fn set(s: &str) -> CpuSet {
        CpuSet::parse(s).unwrap()
    }

    /// A /proc/irq of four IRQs: one already on the reserved CPUs, two on
    /// every CPU, one whose file is a directory (a hostile or odd tree).
    fn fixture(root: &Path) -> IrqTable {
        let dir = root.join("irq");
        for (irq, cpus) in [(1, "0-1"), (9, "0-7"), (24, "4-5")] {
            std::fs::create_dir_all(dir.join(irq.to_string())).unwrap();
            std::fs::write(
                dir.join(format!("{irq}/smp_affinity_list")),
                format!("{cpus}\n"),
            )
            .unwrap();
        }
        std::fs::create_dir_all(dir.join("30/smp_affinity_list")).unwrap();
        std::fs::write(dir.join("default_smp_affinity"), "ff\n").unwrap();
        IrqTable::new(&dir)
    }

    fn read(table_root: &Path, irq: u32) -> String {
        std::fs::read_to_string(table_root.join(format!("irq/{irq}/smp_affinity_list")))
            .unwrap()
            .trim()
            .to_string()
    }

    #[test]
    fn steers_what_reaches_guest_cpus_and_undo_restores_each_exactly() {
        let root = scratch_dir("irq-steer");
        let table = fixture(&root);
        let reserved = set("0-1");
        let mut state = IrqState::default();
        let first = steer(&table, &reserved, &mut state);
        assert_eq!(first.moved, vec![9, 24]);
        assert_eq!(
            first.failed.len(),
            1,
            "IRQ 30 is no file: {:?}",
            first.failed
        );
        assert!(
            first.failed[0].contains("30/smp_affinity_list"),
            "{:?}",
            first.failed
        );
        assert_eq!(read(&root, 9), "0-1");
        assert_eq!(read(&root, 24), "0-1");
        assert_eq!(
            read(&root, 1),
            "0-1",
            "already there: untouched, not recorded"
        );
        let default = std::fs::read_to_string(root.join("irq/default_smp_affinity")).unwrap();
        assert_eq!(default.trim(), "00000003");
        assert_eq!(state.default_mask.as_deref(), Some("ff"));

        // irqbalance moves 24 back; the next sweep steers it again and
        // keeps the first original.
        std::fs::write(root.join("irq/24/smp_affinity_list"), "6\n").unwrap();
        let status_now = status(
            &IrqHost {
                table: table.clone(),
                etc_root: root.clone(),
            },
            &state,
            &reserved,
            &set("2-7"),
            false,
        );
        assert_eq!(status_now.on_guest_cpus, vec![24]);
        assert_eq!(
            status_now.steered[1],
            SteeredIrq {
                irq: 24,
                before: vec![4, 5],
                now: Some(vec![6])
            }
        );
        let second = steer(&table, &reserved, &mut state);
        assert_eq!((second.moved, second.again), (vec![], vec![24]));
        assert_eq!(
            state.origins,
            vec![
                IrqAffinity {
                    irq: 9,
                    cpus: "0-7".into()
                },
                IrqAffinity {
                    irq: 24,
                    cpus: "4-5".into()
                }
            ]
        );

        // IRQ 9's device goes before undo: counted as gone.
        std::fs::remove_dir_all(root.join("irq/9")).unwrap();
        let undone = restore(&table, &state);
        assert_eq!((undone.restored, undone.gone), (1, 1));
        assert!(undone.failed.is_empty(), "{:?}", undone.failed);
        assert_eq!(read(&root, 24), "4-5");
        let default = std::fs::read_to_string(root.join("irq/default_smp_affinity")).unwrap();
        assert_eq!(default.trim(), "ff");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn irqbalance_is_told_what_to_ban() {
        let root = scratch_dir("irq-balance");
        let guests = set("2-7");
        std::fs::create_dir_all(root.join("etc/default")).unwrap();
        let advice = irqbalance_advice(&root, &guests).unwrap();
        assert!(
            advice.contains("IRQBALANCE_BANNED_CPULIST=2-7 in /etc/default/irqbalance"),
            "{advice}"
        );
        std::fs::write(
            root.join("etc/default/irqbalance"),
            "IRQBALANCE_BANNED_CPULIST=\"2-3\"\n",
        )
        .unwrap();
        let advice = irqbalance_advice(&root, &guests).unwrap();
        assert!(advice.contains("guest CPUs 4-7"), "{advice}");
        std::fs::write(
            root.join("etc/default/irqbalance"),
            "IRQBALANCE_BANNED_CPUS=000000fc\n",
        )
        .unwrap();
        assert_eq!(irqbalance_advice(&root, &guests), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
