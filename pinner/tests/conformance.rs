//! Topology conformance: for every sysfs snapshot in `../shared/topologies`
//! (real machines gathered by hwloc), `pinner topology --json` must group the
//! online CPUs into packages, NUMA nodes, cores and L3 domains exactly as
//! hwloc's own reading (`NAME.console`) does, with the exceptions that
//! folder's README documents. Ids are labels; only the groupings count.

mod common;

use common::{extract, topologies_dir};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Package,
    NumaNode,
    Core,
    L3,
}

const LEVELS: [Level; 4] = [Level::Package, Level::NumaNode, Level::Core, Level::L3];

/// CPU → (level → group label); None where the level is absent.
type Reading = BTreeMap<u32, BTreeMap<Level, Option<String>>>;

/// hwloc's `lstopo -v` tree: two spaces of indentation per level, NUMA
/// nodes listed as memory children of the object they attach to.
fn parse_console(text: &str) -> Reading {
    struct Obj {
        depth: usize,
        kind: String,
        label: String,
        numa: Option<String>,
    }
    let mut stack: Vec<Obj> = Vec::new();
    let mut reading = Reading::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        if !(trimmed.contains(" L#") || trimmed.starts_with("Machine (")) {
            continue;
        }
        let depth = (line.len() - trimmed.len()) / 2;
        let kind = trimmed.split([' ', '(']).next().unwrap_or("").to_string();
        let label = trimmed
            .split(" L#")
            .nth(1)
            .map(|rest| rest.split_whitespace().next().unwrap_or("").to_string())
            .unwrap_or_default();
        let os_index = trimmed
            .split("(P#")
            .nth(1)
            .and_then(|r| r.split([' ', ')']).next())
            .map(str::to_string);
        while stack.last().is_some_and(|o| o.depth >= depth) {
            stack.pop();
        }
        match kind.as_str() {
            "NUMANode" => {
                if let Some(parent) = stack.last_mut() {
                    parent.numa.get_or_insert(os_index.unwrap_or(label));
                }
            }
            "PU" => {
                let cpu: u32 = os_index.expect("PU without P#").parse().unwrap();
                let of = |k: &str| {
                    stack
                        .iter()
                        .rev()
                        .find(|o| o.kind == k)
                        .map(|o| o.label.clone())
                };
                let numa = stack.iter().rev().find_map(|o| o.numa.clone());
                let groups = BTreeMap::from([
                    (Level::Package, of("Package")),
                    (Level::NumaNode, numa),
                    (Level::Core, of("Core")),
                    (Level::L3, of("L3Cache")),
                ]);
                reading.insert(cpu, groups);
            }
            _ => stack.push(Obj {
                depth,
                kind,
                label,
                numa: None,
            }),
        }
    }
    reading
}

fn pinner_reading(root: &Path) -> Reading {
    let out = Command::new(env!("CARGO_BIN_EXE_pinner"))
        .args(["topology", "--json", "--root"])
        .arg(root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pinner topology failed on {}: {}",
        root.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let label = |v: &serde_json::Value| v.as_u64().map(|n| n.to_string());
    json["cpus"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["online"] == true)
        .map(|c| {
            let groups = BTreeMap::from([
                (Level::Package, label(&c["package"])),
                (Level::NumaNode, label(&c["numa_node"])),
                (Level::Core, label(&c["core"])),
                (Level::L3, label(&c["l3"])),
            ]);
            (c["id"].as_u64().unwrap() as u32, groups)
        })
        .collect()
}

/// The partition of `cpus` by `level`; CPUs without a label stand alone.
fn partition(reading: &Reading, cpus: &BTreeSet<u32>, level: Level) -> BTreeSet<BTreeSet<u32>> {
    let mut groups: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    for &cpu in cpus {
        let key = reading[&cpu][&level]
            .clone()
            .unwrap_or_else(|| format!("alone-{cpu}"));
        groups.entry(key).or_default().insert(cpu);
    }
    groups.into_values().collect()
}

/// The levels the folder's README exempts for a snapshot.
fn exempt(name: &str) -> Vec<Level> {
    if name.starts_with("256ppc-") || name.starts_with("16ia64-") {
        vec![Level::Package]
    } else if name.starts_with("40intel64-4n10c+pci-conflicts") {
        vec![Level::Package, Level::L3]
    } else {
        vec![]
    }
}

#[test]
fn pinner_agrees_with_hwloc_on_every_snapshot() {
    if !common::have_topologies() {
        return;
    }
    let dir = topologies_dir();
    let scratch = std::env::temp_dir().join(format!("pinner-conformance-{}", std::process::id()));
    let mut archives: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".tar.bz2"))
        .collect();
    archives.sort();
    assert!(
        archives.len() >= 10,
        "expected the shared snapshots, found {}",
        archives.len()
    );

    let mut failures = Vec::new();
    for archive in &archives {
        let name = archive
            .file_name()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches(".tar.bz2")
            .to_string();
        let console = std::fs::read_to_string(dir.join(format!("{name}.console"))).unwrap();
        let hwloc = parse_console(&console);
        let root = extract(archive, &scratch.join(&name));
        let ours = pinner_reading(&root);

        let hwloc_cpus: BTreeSet<u32> = hwloc.keys().copied().collect();
        let our_cpus: BTreeSet<u32> = ours.keys().copied().collect();
        // hwloc hides CPUs outside the gathering process's cpuset; pinner
        // places guests on every online CPU, so it must see a superset.
        let cpus_agree = if name.ends_with("-cpusets") {
            hwloc_cpus.is_subset(&our_cpus)
        } else {
            hwloc_cpus == our_cpus
        };
        if !cpus_agree {
            failures.push(format!(
                "{name}: online CPUs: hwloc {hwloc_cpus:?}, pinner {our_cpus:?}"
            ));
            continue;
        }
        let mut checked = Vec::new();
        for level in LEVELS.into_iter().filter(|l| !exempt(&name).contains(l)) {
            // That snapshot's hwloc also hides NUMA nodes outside the
            // process's cpuset: compare nodes only where hwloc shows one.
            let cpus: BTreeSet<u32> = hwloc_cpus
                .iter()
                .copied()
                .filter(|c| {
                    !(name.ends_with("-cpusets")
                        && level == Level::NumaNode
                        && hwloc[c][&level].is_none())
                })
                .collect();
            let (theirs, mine) = (
                partition(&hwloc, &cpus, level),
                partition(&ours, &cpus, level),
            );
            if theirs != mine {
                failures.push(format!(
                    "{name}: {level:?} groups differ\n  hwloc:  {theirs:?}\n  pinner: {mine:?}"
                ));
            }
            checked.push(format!("{level:?}={}", theirs.len()));
        }
        eprintln!("{name}: {} CPUs, {}", hwloc_cpus.len(), checked.join(" "));
    }
    let _ = std::fs::remove_dir_all(&scratch);
    assert!(
        failures.is_empty(),
        "{} disagreements:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn console_parser_reads_nesting_and_memory_children() {
    let console = "Machine (P#0 total=16GiB)
  NUMANode L#0 (P#0 local=16GiB total=16GiB)
  Package L#0 (P#0)
    L3Cache L#0 (size=8MiB)
      Core L#0 (P#0)
        PU L#0 (P#0)
        PU L#1 (P#4)
  Package L#1 (P#1)
    Core L#1 (P#0)
      PU L#2 (P#1)
depth 0:           1 Machine (type #0)
";
    let r = parse_console(console);
    assert_eq!(r.len(), 3);
    assert_eq!(r[&4][&Level::Core], Some("0".into()));
    assert_eq!(r[&4][&Level::L3], Some("0".into()));
    assert_eq!(r[&1][&Level::Package], Some("1".into()));
    assert_eq!(r[&1][&Level::L3], None);
    assert_eq!(
        r[&1][&Level::NumaNode],
        Some("0".into()),
        "node attached to Machine covers all"
    );
}
