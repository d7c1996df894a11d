//! The host's CPUs, read from sysfs under a root directory (`/` on a host,
//! an extracted snapshot in tests): online and offline CPUs, packages, dies,
//! cores and SMT siblings, L2/L3 cache domains, NUMA nodes with memory and
//! distances, hybrid core kinds, isolated and nohz_full CPUs.
//!
//! Missing files degrade to "unknown" (None), never to an error, except the
//! CPU list itself. Real sysfs files may hold NUL padding or trailing junk;
//! readers take what parses.

use crate::cpuset::CpuSet;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuKind {
    Performance,
    Efficiency,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cpu {
    pub id: u32,
    pub online: bool,
    pub package: Option<u32>,
    pub die: Option<u32>,
    pub numa_node: Option<u32>,
    /// Machine-wide core id (cores numbered in order of their first CPU).
    pub core: Option<u32>,
    /// Machine-wide L2 / L3 domain ids (null where sysfs has no such cache).
    pub l2: Option<u32>,
    pub l3: Option<u32>,
    /// The online CPUs of this CPU's core, itself included.
    pub smt_siblings: Vec<u32>,
    /// On hybrid CPUs; None elsewhere.
    pub kind: Option<CpuKind>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NumaNode {
    pub id: u32,
    /// Online CPUs of this node (empty for memory-only nodes).
    #[serde(serialize_with = "as_list")]
    pub cpus: CpuSet,
    pub memory_mib: Option<u64>,
    /// Distance to every node, in the order of `Topology::nodes`.
    pub distances: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Topology {
    /// Every CPU sysfs knows of, online or not, by id.
    pub cpus: Vec<Cpu>,
    #[serde(skip)]
    pub online: CpuSet,
    /// Every NUMA node, by id.
    pub numa_nodes: Vec<NumaNode>,
    /// `isolcpus=` CPUs (kernel scheduler isolation).
    #[serde(serialize_with = "as_list")]
    pub isolated: CpuSet,
    #[serde(serialize_with = "as_list")]
    pub nohz_full: CpuSet,
    /// Highest possible CPU id + 1: the width of libvirt's cpumaps.
    #[serde(skip)]
    pub cpumap_width: u32,
}

fn as_list<S: serde::Serializer>(set: &CpuSet, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(set.iter())
}

/// Reads a file as trimmed text, NUL padding removed; None when absent.
fn read_text(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    Some(
        text.trim_matches(|c: char| c.is_whitespace() || c == '\0')
            .to_string(),
    )
}

/// The first whitespace-separated word that parses as a number.
fn read_number<T: std::str::FromStr>(path: &Path) -> Option<T> {
    read_text(path)?.split_whitespace().next()?.parse().ok()
}

/// A CPU list file, or (when only the mask form exists) its mask twin:
/// `shared_cpu_list` → `shared_cpu_map`, node `cpulist` → `cpumap`.
fn read_cpus(list: &Path) -> Option<CpuSet> {
    if let Some(text) = read_text(list) {
        // Take the first line only: some snapshots hold trailing junk.
        if let Ok(set) = CpuSet::parse(text.lines().next().unwrap_or("")) {
            return Some(set);
        }
    }
    let name = list.file_name()?.to_str()?;
    let mask = name
        .strip_suffix("_list")
        .map(|stem| format!("{stem}_map"))
        .or_else(|| name.strip_suffix("list").map(|stem| format!("{stem}map")))?;
    parse_mask(&read_text(&list.with_file_name(mask))?)
}

/// The kernel's hex mask syntax: "00000000,0000ff0f" (highest word first).
fn parse_mask(text: &str) -> Option<CpuSet> {
    let mut set = CpuSet::new();
    let mut bit = 0u32;
    for word in text.lines().next()?.rsplit(',') {
        let word = word.trim();
        for digit in word.chars().rev() {
            let nibble = digit.to_digit(16)?;
            for b in 0..4 {
                if nibble & (1 << b) != 0 {
                    set = set.union(&std::iter::once(bit + b).collect());
                }
            }
            bit += 4;
        }
    }
    Some(set)
}

/// Numbers the distinct keys in order of first appearance (CPUs by id).
fn machine_wide_ids<K: Ord + Clone>(keys: &[Option<K>]) -> Vec<Option<u32>> {
    let mut ids = BTreeMap::new();
    keys.iter()
        .map(|k| {
            k.as_ref().map(|k| {
                let next = ids.len() as u32;
                *ids.entry(k.clone()).or_insert(next)
            })
        })
        .collect()
}

impl Topology {
    pub fn read(sysfs_root: &Path) -> Result<Topology, String> {
        let cpu_dir = sysfs_root.join("sys/devices/system/cpu");
        let present = cpu_dirs(&cpu_dir)?;
        let online = match read_cpus(&cpu_dir.join("online")).filter(|s| !s.is_empty()) {
            Some(set) => set,
            // Older kernels: cpuN/online per CPU (cpu0 often has none).
            None => present
                .iter()
                .filter(|&id| {
                    read_text(&cpu_dir.join(format!("cpu{id}/online")))
                        .is_none_or(|t| t.starts_with('1'))
                })
                .collect(),
        };
        if online.is_empty() {
            return Err(format!("{}: no online CPUs", cpu_dir.display()));
        }
        let all = present.union(&online);
        let possible = read_cpus(&cpu_dir.join("possible")).unwrap_or_default();
        let cpumap_width = possible.union(&all).iter().max().map_or(1, |m| m + 1);

        let numa_nodes = read_nodes(sysfs_root, &online);
        let node_of: BTreeMap<u32, u32> = numa_nodes
            .iter()
            .flat_map(|n| n.cpus.iter().map(move |c| (c, n.id)))
            .collect();
        let kinds = read_kinds(sysfs_root, &cpu_dir, &online);

        let ids: Vec<u32> = all.iter().collect();
        let topo_file = |id: u32, name: &str| cpu_dir.join(format!("cpu{id}/topology/{name}"));
        let signed = |id: u32, name: &str| {
            read_number::<i64>(&topo_file(id, name))
                .filter(|v| *v >= 0)
                .map(|v| v as u32)
        };
        let mut packages = Vec::new();
        let mut dies = Vec::new();
        let mut core_keys = Vec::new();
        let mut l2_keys = Vec::new();
        let mut l3_keys = Vec::new();
        for &id in &ids {
            let is_online = online.contains(id);
            let package = signed(id, "physical_package_id").filter(|_| is_online);
            let die = signed(id, "die_id").filter(|_| is_online);
            let cluster = signed(id, "cluster_id");
            let siblings =
                read_cpus(&topo_file(id, "thread_siblings_list")).map(|s| s.intersection(&online));
            // SMT siblings share all of these, so each splits only what is
            // really apart: AMD Bulldozer lists a module's two cores as thread
            // siblings but gives each its own core_id; ia64 gives every CPU
            // core_id 0 with itself as its only thread sibling; some AMD
            // packages reuse core_ids on each of their two dies/nodes.
            let node = node_of.get(&id).copied();
            let core = signed(id, "core_id")
                .filter(|_| is_online)
                .map(|c| (package, die, cluster, node, siblings, c));
            packages.push(package);
            dies.push(die);
            let own_core = (None, None, None, None, None, u32::MAX - id);
            core_keys.push(core.or(is_online.then_some(own_core)));
            l2_keys.push(cache_domain(&cpu_dir, id, 2).filter(|_| is_online));
            l3_keys.push(cache_domain(&cpu_dir, id, 3).filter(|_| is_online));
        }
        let cores = machine_wide_ids(&core_keys);
        let l2 = machine_wide_ids(&l2_keys);
        let l3 = machine_wide_ids(&l3_keys);
        let mut members: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for (i, &id) in ids.iter().enumerate() {
            if let Some(core) = cores[i] {
                members.entry(core).or_default().push(id);
            }
        }
        let cpus = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| Cpu {
                id,
                online: online.contains(id),
                package: packages[i],
                die: dies[i],
                numa_node: node_of.get(&id).copied(),
                core: cores[i],
                l2: l2[i],
                l3: l3[i],
                smt_siblings: cores[i].map(|c| members[&c].clone()).unwrap_or_default(),
                kind: kinds.get(&id).copied(),
            })
            .collect();
        Ok(Topology {
            cpus,
            online,
            numa_nodes,
            isolated: read_cpus(&cpu_dir.join("isolated")).unwrap_or_default(),
            nohz_full: read_cpus(&cpu_dir.join("nohz_full")).unwrap_or_default(),
            cpumap_width,
        })
    }

    /// A synthetic host: `online` split evenly over `node_count` nodes, one
    /// core per CPU, no caches (tests).
    pub fn uniform(online: &CpuSet, node_count: u32) -> Topology {
        let ids = online.to_vec();
        let per_node = ids.len().div_ceil(node_count.max(1) as usize).max(1);
        let numa_nodes: Vec<NumaNode> = ids
            .chunks(per_node)
            .enumerate()
            .map(|(i, chunk)| NumaNode {
                id: i as u32,
                cpus: chunk.iter().copied().collect(),
                memory_mib: None,
                distances: Vec::new(),
            })
            .collect();
        let cpus = ids
            .iter()
            .map(|&id| Cpu {
                id,
                online: true,
                package: Some(0),
                die: None,
                numa_node: numa_nodes
                    .iter()
                    .find(|n| n.cpus.contains(id))
                    .map(|n| n.id),
                core: Some(id),
                l2: None,
                l3: None,
                smt_siblings: vec![id],
                kind: None,
            })
            .collect();
        Topology {
            cpus,
            online: online.clone(),
            numa_nodes,
            isolated: CpuSet::new(),
            nohz_full: CpuSet::new(),
            cpumap_width: online.iter().max().map_or(1, |m| m + 1),
        }
    }

    /// A synthetic host laid out like a real x86 server, for property tests
    /// and benchmarks: `nodes` × `l3_per_node` × `cores_per_l3` cores of
    /// `threads` each, numbered as Linux does (all first threads, then all
    /// second threads). Distances: 10 local, 16 to the node's pair, 32 beyond.
    pub fn synthetic(nodes: u32, l3_per_node: u32, cores_per_l3: u32, threads: u32) -> Topology {
        let cores = nodes * l3_per_node * cores_per_l3;
        let mut cpus = Vec::new();
        for thread in 0..threads {
            for core in 0..cores {
                let node = core / (l3_per_node * cores_per_l3);
                cpus.push(Cpu {
                    id: thread * cores + core,
                    online: true,
                    package: Some(node / 2),
                    die: None,
                    numa_node: Some(node),
                    core: Some(core),
                    l2: Some(core),
                    l3: Some(core / cores_per_l3),
                    smt_siblings: (0..threads).map(|t| t * cores + core).collect(),
                    kind: None,
                });
            }
        }
        cpus.sort_by_key(|c| c.id);
        let numa_nodes = (0..nodes)
            .map(|n| NumaNode {
                id: n,
                cpus: cpus
                    .iter()
                    .filter(|c| c.numa_node == Some(n))
                    .map(|c| c.id)
                    .collect(),
                memory_mib: Some(65536),
                distances: (0..nodes)
                    .map(|m| {
                        if m == n {
                            10
                        } else if m / 2 == n / 2 {
                            16
                        } else {
                            32
                        }
                    })
                    .collect(),
            })
            .collect();
        let online: CpuSet = cpus.iter().map(|c| c.id).collect();
        Topology {
            cpumap_width: cores * threads,
            cpus,
            online,
            numa_nodes,
            isolated: CpuSet::new(),
            nohz_full: CpuSet::new(),
        }
    }

    /// Distance between two nodes (10 for a node to itself; 20 where sysfs
    /// gives none, as the kernel assumes for remote nodes).
    pub fn distance(&self, a: u32, b: u32) -> u32 {
        if a == b {
            return 10;
        }
        let index = self.numa_nodes.iter().position(|n| n.id == b);
        self.numa_nodes
            .iter()
            .find(|n| n.id == a)
            .and_then(|n| n.distances.get(index?))
            .copied()
            .unwrap_or(20)
    }

    /// The ids of the nodes holding any of `cpus`.
    pub fn nodes_of(&self, cpus: &CpuSet) -> Vec<u32> {
        self.numa_nodes
            .iter()
            .filter(|n| !n.cpus.intersection(cpus).is_empty())
            .map(|n| n.id)
            .collect()
    }

    /// JSON in the format DESIGN.md documents (`pinner topology --json`).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }
}

/// The CPU ids that have a `cpuN` directory.
fn cpu_dirs(cpu_dir: &Path) -> Result<CpuSet, String> {
    let entries = std::fs::read_dir(cpu_dir).map_err(|e| format!("{}: {e}", cpu_dir.display()))?;
    Ok(entries
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("cpu")?
                .parse::<u32>()
                .ok()
        })
        .collect())
}

/// The CPUs sharing this CPU's cache of `level` (unified or data).
fn cache_domain(cpu_dir: &Path, cpu: u32, level: u32) -> Option<CpuSet> {
    let cache = cpu_dir.join(format!("cpu{cpu}/cache"));
    std::fs::read_dir(&cache).ok()?.flatten().find_map(|entry| {
        let dir = entry.path();
        let is_index = entry.file_name().to_string_lossy().starts_with("index");
        let at_level = read_number::<u32>(&dir.join("level")) == Some(level);
        let kind = read_text(&dir.join("type")).unwrap_or_default();
        (is_index && at_level && kind != "Instruction")
            .then(|| read_cpus(&dir.join("shared_cpu_list")))
            .flatten()
            .filter(|s| !s.is_empty())
    })
}

fn read_nodes(root: &Path, online: &CpuSet) -> Vec<NumaNode> {
    let node_dir = root.join("sys/devices/system/node");
    let mut nodes: Vec<(u32, PathBuf)> = std::fs::read_dir(&node_dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    let id = e
                        .file_name()
                        .to_str()?
                        .strip_prefix("node")?
                        .parse::<u32>()
                        .ok()?;
                    Some((id, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    nodes.sort_by_key(|(id, _)| *id);
    let mut out: Vec<NumaNode> = nodes
        .into_iter()
        .map(|(id, path)| NumaNode {
            id,
            cpus: read_cpus(&path.join("cpulist"))
                .unwrap_or_default()
                .intersection(online),
            memory_mib: read_text(&path.join("meminfo")).and_then(|t| {
                let line = t.lines().find(|l| l.contains("MemTotal:"))?;
                let kib: u64 = line.split_whitespace().rev().nth(1)?.parse().ok()?;
                Some(kib / 1024)
            }),
            distances: read_text(&path.join("distance"))
                .map(|t| {
                    t.split_whitespace()
                        .filter_map(|d| d.parse().ok())
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect();
    // A host without NUMA in sysfs is one node. Where nodes exist, CPUs in
    // none of them stay without a node (their node is gone, as hwloc sees it).
    if out.is_empty() {
        out.push(NumaNode {
            id: 0,
            cpus: online.clone(),
            memory_mib: None,
            distances: Vec::new(),
        });
    }
    out
}

/// Performance and efficiency CPUs on hybrid hosts; empty elsewhere. Taken
/// from Intel's `cpu_core`/`cpu_atom` PMUs, else from differing
/// `cpu_capacity` (arm), else from differing cpufreq `base_frequency`. Max
/// frequency is not used: favoured cores (Turbo Boost Max 3.0) differ in max
/// frequency on hosts that are not hybrid.
fn read_kinds(root: &Path, cpu_dir: &Path, online: &CpuSet) -> BTreeMap<u32, CpuKind> {
    let pmu = |name: &str| read_cpus(&root.join(format!("sys/devices/{name}/cpus")));
    if let (Some(p), Some(e)) = (pmu("cpu_core"), pmu("cpu_atom")) {
        return p
            .iter()
            .map(|c| (c, CpuKind::Performance))
            .chain(e.iter().map(|c| (c, CpuKind::Efficiency)))
            .collect();
    }
    for file in ["cpu_capacity", "cpufreq/base_frequency"] {
        let values: BTreeMap<u32, u64> = online
            .iter()
            .filter_map(|c| Some((c, read_number(&cpu_dir.join(format!("cpu{c}/{file}")))?)))
            .collect();
        let top = values.values().max().copied();
        if values.len() == online.len() && values.values().any(|v| Some(*v) != top) {
            return values
                .into_iter()
                .map(|(c, v)| {
                    (
                        c,
                        if Some(v) == top {
                            CpuKind::Performance
                        } else {
                            CpuKind::Efficiency
                        },
                    )
                })
                .collect();
        }
    }
    BTreeMap::new()
}

/// The readable tree `pinner topology` prints.
pub fn render_tree(topo: &Topology) -> String {
    use std::fmt::Write;
    let online: Vec<&Cpu> = topo.cpus.iter().filter(|c| c.online).collect();
    let count = |f: fn(&Cpu) -> Option<u32>| {
        let mut ids: Vec<u32> = online.iter().filter_map(|c| f(c)).collect();
        ids.sort();
        ids.dedup();
        ids.len()
    };
    let mut out = String::new();
    let offline: CpuSet = topo
        .cpus
        .iter()
        .filter(|c| !c.online)
        .map(|c| c.id)
        .collect();
    let _ = writeln!(
        out,
        "{} online ({}), offline: {}; {}, {}, {}, {}",
        counted(online.len(), "CPU", "CPUs"),
        topo.online,
        if offline.is_empty() {
            "none".into()
        } else {
            offline.to_string()
        },
        counted(count(|c| c.package), "package", "packages"),
        counted(
            topo.numa_nodes
                .iter()
                .filter(|n| !n.cpus.is_empty())
                .count(),
            "NUMA node",
            "NUMA nodes"
        ),
        counted(count(|c| c.core), "core", "cores"),
        counted(count(|c| c.l3), "L3 domain", "L3 domains"),
    );
    if !topo.isolated.is_empty() || !topo.nohz_full.is_empty() {
        let _ = writeln!(
            out,
            "isolated: {}   nohz_full: {}",
            topo.isolated, topo.nohz_full
        );
    }
    let label = |v: Option<u32>| v.map_or_else(|| "?".to_string(), |v| v.to_string());
    let mut last: (Option<u32>, Option<u32>, Option<u32>) =
        (Some(u32::MAX), Some(u32::MAX), Some(u32::MAX));
    let mut sorted = online.clone();
    sorted.sort_by_key(|c| (c.package, c.numa_node, c.l3, c.core, c.id));
    for cpu in sorted {
        if cpu.package != last.0 {
            let _ = writeln!(out, "package {}", label(cpu.package));
            last = (cpu.package, Some(u32::MAX), Some(u32::MAX));
        }
        if cpu.numa_node != last.1 {
            let node = topo.numa_nodes.iter().find(|n| Some(n.id) == cpu.numa_node);
            let memory = node
                .and_then(|n| n.memory_mib)
                .map_or_else(String::new, |m| format!(", {m} MiB"));
            let distances = node
                .filter(|n| !n.distances.is_empty())
                .map_or_else(String::new, |n| format!(", distances {:?}", n.distances));
            let _ = writeln!(
                out,
                "  numa node {}{memory}{distances}",
                label(cpu.numa_node)
            );
            last.1 = cpu.numa_node;
            last.2 = Some(u32::MAX);
        }
        if cpu.l3 != last.2 {
            let _ = writeln!(out, "    L3 {}", label(cpu.l3));
            last.2 = cpu.l3;
        }
        if cpu.smt_siblings.first() == Some(&cpu.id) || cpu.smt_siblings.is_empty() {
            let kind = match cpu.kind {
                Some(CpuKind::Performance) => " (performance)",
                Some(CpuKind::Efficiency) => " (efficiency)",
                None => "",
            };
            let siblings: CpuSet = cpu.smt_siblings.iter().copied().collect();
            let _ = writeln!(out, "      core {}: cpus {siblings}{kind}", label(cpu.core));
        }
    }
    for node in topo.numa_nodes.iter().filter(|n| n.cpus.is_empty()) {
        let memory = node
            .memory_mib
            .map_or_else(String::new, |m| format!(" ({m} MiB)"));
        let _ = writeln!(out, "memory-only numa node {}{memory}", node.id);
    }
    out
}

/// "1 core", "14 cores".
fn counted(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_counts_in_words_and_nests_package_node_l3_core() {
        // 2 nodes of 2 cores, 2 threads each; siblings numbered 4 apart.
        let tree = render_tree(&Topology::synthetic(2, 1, 2, 2));
        let mut lines = tree.lines();
        assert_eq!(
            lines.next(),
            Some("8 CPUs online (0-7), offline: none; 1 package, 2 NUMA nodes, 4 cores, 2 L3 domains"),
            "{tree}"
        );
        assert!(tree.contains("package 0\n  numa node 0, 65536 MiB, distances [10, 16]\n    L3 0\n      core 0: cpus 0,4\n"), "{tree}");
        let one = render_tree(&Topology::synthetic(1, 1, 1, 1));
        assert!(
            one.starts_with(
                "1 CPU online (0), offline: none; 1 package, 1 NUMA node, 1 core, 1 L3 domain\n"
            ),
            "{one}"
        );
    }

    /// A sysfs tree of `files` in a directory of its own (tests run in
    /// parallel and may build the same fixture).
    fn fake_sysfs(tag: &str, files: &[(&str, &str)]) -> PathBuf {
        let root = crate::test_support::scratch_dir(&format!("topo-{tag}"));
        for (path, text) in files {
            let full = root.join(path);
            std::fs::create_dir_all(full.parent().unwrap()).unwrap();
            std::fs::write(full, text).unwrap();
        }
        root
    }

    fn cpu_files(cpu: u32, package: i32, core: u32, l3: &str) -> Vec<(String, String)> {
        let base = format!("sys/devices/system/cpu/cpu{cpu}");
        vec![
            (
                format!("{base}/topology/physical_package_id"),
                format!("{package}\n"),
            ),
            (format!("{base}/topology/core_id"), format!("{core}\n")),
            (format!("{base}/cache/index3/level"), "3\n".into()),
            (format!("{base}/cache/index3/type"), "Unified\n".into()),
            (
                format!("{base}/cache/index3/shared_cpu_list"),
                format!("{l3}\n"),
            ),
        ]
    }

    /// 2 packages × 2 cores × 2 threads; CPU 3 offline; node 2 memory-only.
    fn two_socket() -> PathBuf {
        let mut files: Vec<(String, String)> = vec![
            ("sys/devices/system/cpu/online".into(), "0-2,4-7\n".into()),
            ("sys/devices/system/cpu/possible".into(), "0-15\n".into()),
            ("sys/devices/system/cpu/isolated".into(), "\n".into()),
            (
                "sys/devices/system/node/node0/cpulist".into(),
                "0-3\n".into(),
            ),
            (
                "sys/devices/system/node/node1/cpulist".into(),
                "4-7\n".into(),
            ),
            ("sys/devices/system/node/node2/cpulist".into(), "\n".into()),
            (
                "sys/devices/system/node/node0/distance".into(),
                "10 21 17\n".into(),
            ),
            (
                "sys/devices/system/node/node0/meminfo".into(),
                "Node 0 MemTotal:       16777216 kB\nNode 0 MemFree: 1 kB\n".into(),
            ),
        ];
        for cpu in 0..8u32 {
            let package = (cpu / 4) as i32;
            let l3 = if package == 0 { "0-3" } else { "4-7" };
            // Threads of a core are CPU n and n+2 within the package.
            files.extend(cpu_files(cpu, package, cpu % 2, l3));
        }
        files.push(("sys/devices/system/cpu/cpu3/online".into(), "0\n".into()));
        let refs: Vec<(&str, &str)> = files
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        fake_sysfs("two-socket", &refs)
    }

    #[test]
    fn reads_packages_cores_caches_and_nodes() {
        let topo = Topology::read(&two_socket()).unwrap();
        assert_eq!(topo.online.to_string(), "0-2,4-7");
        assert_eq!(topo.cpumap_width, 16);
        let cpu = |id: u32| topo.cpus.iter().find(|c| c.id == id).unwrap();
        assert_eq!(cpu(0).smt_siblings, vec![0, 2]);
        assert_eq!(cpu(1).smt_siblings, vec![1], "sibling 3 is offline");
        assert_eq!(cpu(4).package, Some(1));
        assert_ne!(cpu(4).core, cpu(0).core, "core ids are machine-wide");
        assert_eq!(cpu(5).l3, cpu(7).l3);
        assert_ne!(cpu(0).l3, cpu(4).l3);
        assert!(!cpu(3).online);
        assert_eq!(cpu(3).core, None);
        assert_eq!(topo.numa_nodes.len(), 3);
        assert_eq!(topo.numa_nodes[0].memory_mib, Some(16384));
        assert_eq!(topo.numa_nodes[0].distances, vec![10, 21, 17]);
        assert!(
            topo.numa_nodes[2].cpus.is_empty(),
            "memory-only node kept, without CPUs"
        );
        assert_eq!(topo.nodes_of(&CpuSet::parse("2,5").unwrap()), vec![0, 1]);
    }

    #[test]
    fn json_has_the_documented_fields() {
        let topo = Topology::read(&two_socket()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&topo.to_json()).unwrap();
        let cpu0 = &v["cpus"][0];
        for key in [
            "id",
            "online",
            "package",
            "numa_node",
            "core",
            "l3",
            "smt_siblings",
            "kind",
        ] {
            assert!(cpu0.get(key).is_some(), "cpus[].{key} missing: {cpu0}");
        }
        assert_eq!(cpu0["kind"], serde_json::Value::Null);
        assert_eq!(v["numa_nodes"][0]["cpus"], serde_json::json!([0, 1, 2]));
        assert_eq!(v["numa_nodes"][0]["memory_mib"], 16384);
    }

    #[test]
    fn cpus_of_a_vanished_node_have_no_node() {
        let root = fake_sysfs(
            "vanished-node",
            &[
                ("sys/devices/system/cpu/online", "0-3"),
                ("sys/devices/system/node/node1/cpulist", "1,3"),
            ],
        );
        let topo = Topology::read(&root).unwrap();
        let nodes: Vec<_> = topo.cpus.iter().map(|c| c.numa_node).collect();
        assert_eq!(nodes, vec![None, Some(1), None, Some(1)]);
    }

    #[test]
    fn host_without_numa_or_online_file_still_reads() {
        let root = fake_sysfs(
            "flat",
            &[
                ("sys/devices/system/cpu/cpu0/topology/core_id", "0"),
                ("sys/devices/system/cpu/cpu1/topology/core_id", "1"),
                ("sys/devices/system/cpu/cpu1/online", "1\n"),
                ("sys/devices/system/cpu/cpu2/online", "0\n"),
            ],
        );
        let topo = Topology::read(&root).unwrap();
        assert_eq!(topo.online.to_string(), "0-1");
        assert_eq!(topo.numa_nodes.len(), 1);
        assert_eq!(topo.numa_nodes[0].cpus.to_string(), "0-1");
        assert!(topo
            .cpus
            .iter()
            .all(|c| c.l3.is_none() && c.package.is_none()));
    }

    #[test]
    fn hybrid_kinds_from_pmus_capacity_or_base_frequency() {
        use CpuKind::{Efficiency as E, Performance as P};
        let kinds = |tag: &str, per_cpu_file: &str, values: &[&str], extra: &[(&str, &str)]| {
            let mut files = vec![(
                "sys/devices/system/cpu/online".to_string(),
                format!("0-{}", values.len() - 1),
            )];
            for (cpu, value) in values.iter().enumerate() {
                files.push((
                    format!("sys/devices/system/cpu/cpu{cpu}/{per_cpu_file}"),
                    value.to_string(),
                ));
            }
            files.extend(extra.iter().map(|(a, b)| (a.to_string(), b.to_string())));
            let refs: Vec<(&str, &str)> = files
                .iter()
                .map(|(a, b)| (a.as_str(), b.as_str()))
                .collect();
            let topo = Topology::read(&fake_sysfs(tag, &refs)).unwrap();
            topo.cpus.iter().map(|c| c.kind).collect::<Vec<_>>()
        };
        let freq = "cpufreq/base_frequency";
        assert_eq!(
            kinds("hybrid-freq", freq, &["1900000", "1900000", "1400000"], &[]),
            vec![Some(P), Some(P), Some(E)]
        );
        // arm big.LITTLE: the kernel's capacity classes.
        assert_eq!(
            kinds(
                "hybrid-cap",
                "cpu_capacity",
                &["446", "1024", "1024", "446"],
                &[]
            ),
            vec![Some(E), Some(P), Some(P), Some(E)]
        );
        // Intel's PMUs win over frequencies that say otherwise.
        let pmus = [
            ("sys/devices/cpu_core/cpus", "1-2"),
            ("sys/devices/cpu_atom/cpus", "0"),
        ];
        assert_eq!(
            kinds(
                "hybrid-pmu",
                freq,
                &["1900000", "1900000", "1400000"],
                &pmus
            ),
            vec![Some(E), Some(P), Some(P)]
        );
        // Equal values mean no kinds at all.
        assert_eq!(
            kinds("uniform-cap", "cpu_capacity", &["1024", "1024"], &[]),
            vec![None, None]
        );
    }

    #[test]
    fn masks_and_padding() {
        assert_eq!(parse_mask("00000000,0000000f").unwrap().to_string(), "0-3");
        assert_eq!(parse_mask("1,00000001").unwrap().to_string(), "0,32");
        assert_eq!(parse_mask("zz"), None);
    }

    #[test]
    fn missing_sysfs_is_a_clear_error() {
        let e = Topology::read(Path::new("/nonexistent-root")).unwrap_err();
        assert!(
            e.contains("/nonexistent-root/sys/devices/system/cpu"),
            "{e}"
        );
    }
}
