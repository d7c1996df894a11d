//! Reads the host's [`Topology`] from sysfs under a root directory (`/` on
//! a host, an extracted snapshot in tests).
//!
//! Missing files degrade to "unknown" (None), never to an error, except the
//! CPU list itself. Real sysfs files may hold NUL padding or trailing junk;
//! readers take what parses.

use crate::engine::cpuset::CpuSet;
use crate::engine::topology::{Cpu, CpuKind, HugePages, NumaNode, Topology};
use crate::host::file;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The largest sysfs file read: a distance row of 1,024 nodes is 4 KiB; a
/// snapshot's file far larger (or a FIFO, a device) is not sysfs's.
const SYSFS_FILE_CAP: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    #[error("{}: {source}", path.display())]
    CpuDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: no online CPUs", .0.display())]
    NoOnlineCpus(PathBuf),
}

/// Reads a file as trimmed text, NUL padding removed; None when absent,
/// not a regular file, or larger than any sysfs file (snapshots come from
/// other machines: a FIFO there must not hang the reader).
fn read_text(path: &Path) -> Option<String> {
    let bytes = file::read_bytes(path, SYSFS_FILE_CAP).ok()?;
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

/// The host's topology from sysfs under `sysfs_root`.
pub fn read_topology(sysfs_root: &Path) -> Result<Topology, SysfsError> {
    let cpu_dir = sysfs_root.join("sys/devices/system/cpu");
    let present = cpu_dirs(&cpu_dir)?;
    let online = read_online(&cpu_dir, &present);
    if online.is_empty() {
        return Err(SysfsError::NoOnlineCpus(cpu_dir));
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
    let keys = CpuKeys::read(&cpu_dir, &ids, &online, &node_of);
    let cores = machine_wide_ids(&keys.cores);
    let l2 = machine_wide_ids(&keys.l2);
    let l3 = machine_wide_ids(&keys.l3);
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
            package: keys.packages[i],
            die: keys.dies[i],
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
        default_hugepage_kib: default_hugepage_kib(sysfs_root),
        cpumap_width,
    })
}

/// Reads each node's memory again (MemTotal and hugepage pools): they
/// change while the host runs (`nr_hugepages` written, memory hot-plugged).
pub fn refresh_memory(sysfs_root: &Path, topology: &mut Topology) {
    let node_dir = sysfs_root.join("sys/devices/system/node");
    for node in topology.numa_nodes.iter_mut() {
        let dir = node_dir.join(format!("node{}", node.id));
        if dir.is_dir() {
            node.memory_mib = read_mem_total(&dir);
            node.hugepages = read_hugepages(&dir);
        }
    }
}

/// The host's default huge page size: `Hugepagesize` in /proc/meminfo
/// under the root, else the smallest size the kernel offers.
fn default_hugepage_kib(root: &Path) -> Option<u64> {
    let from_meminfo = read_text(&root.join("proc/meminfo")).and_then(|t| {
        let line = t.lines().find(|l| l.starts_with("Hugepagesize:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    });
    from_meminfo.or_else(|| {
        hugepage_sizes(&root.join("sys/kernel/mm/hugepages"))
            .into_iter()
            .map(|(size, _)| size)
            .min()
    })
}

/// The `hugepages-<size>kB` directories under `dir`: (size in KiB, path).
fn hugepage_sizes(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut sizes: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name();
                    let size = name
                        .to_str()?
                        .strip_prefix("hugepages-")?
                        .strip_suffix("kB")?
                        .parse()
                        .ok()?;
                    Some((size, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    sizes.sort();
    sizes
}

/// A node's hugetlb pools (`<node>/hugepages/hugepages-<size>kB`).
fn read_hugepages(node_dir: &Path) -> Vec<HugePages> {
    hugepage_sizes(&node_dir.join("hugepages"))
        .into_iter()
        .map(|(size_kib, dir)| HugePages {
            size_kib,
            total: read_number(&dir.join("nr_hugepages")).unwrap_or(0),
            free: read_number(&dir.join("free_hugepages")).unwrap_or(0),
        })
        .collect()
}

/// A node's MemTotal, in MiB.
fn read_mem_total(node_dir: &Path) -> Option<u64> {
    let text = read_text(&node_dir.join("meminfo"))?;
    let line = text.lines().find(|l| l.contains("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().rev().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// The online CPUs: the `online` list, else (older kernels) each
/// `cpuN/online` (cpu0 often has none).
fn read_online(cpu_dir: &Path, present: &CpuSet) -> CpuSet {
    match read_cpus(&cpu_dir.join("online")).filter(|s| !s.is_empty()) {
        Some(set) => set,
        None => present
            .iter()
            .filter(|&id| {
                read_text(&cpu_dir.join(format!("cpu{id}/online")))
                    .is_none_or(|t| t.starts_with('1'))
            })
            .collect(),
    }
}

/// A core as sysfs tells it apart: (package, die, cluster, node, thread
/// siblings, core_id).
type CoreKey = (
    Option<u32>,
    Option<u32>,
    Option<u32>,
    Option<u32>,
    Option<CpuSet>,
    u32,
);

/// Per CPU (in the order of `ids`), what identifies its package, die,
/// core and caches; None for offline CPUs.
struct CpuKeys {
    packages: Vec<Option<u32>>,
    dies: Vec<Option<u32>>,
    cores: Vec<Option<CoreKey>>,
    l2: Vec<Option<CpuSet>>,
    l3: Vec<Option<CpuSet>>,
}

impl CpuKeys {
    fn read(cpu_dir: &Path, ids: &[u32], online: &CpuSet, node_of: &BTreeMap<u32, u32>) -> CpuKeys {
        let topo_file = |id: u32, name: &str| cpu_dir.join(format!("cpu{id}/topology/{name}"));
        let signed = |id: u32, name: &str| {
            read_number::<i64>(&topo_file(id, name))
                .filter(|v| *v >= 0)
                .map(|v| v as u32)
        };
        let mut keys = CpuKeys {
            packages: Vec::new(),
            dies: Vec::new(),
            cores: Vec::new(),
            l2: Vec::new(),
            l3: Vec::new(),
        };
        for &id in ids {
            let is_online = online.contains(id);
            let package = signed(id, "physical_package_id").filter(|_| is_online);
            let die = signed(id, "die_id").filter(|_| is_online);
            let cluster = signed(id, "cluster_id");
            let siblings =
                read_cpus(&topo_file(id, "thread_siblings_list")).map(|s| s.intersection(online));
            // SMT siblings share all of these, so each splits only what is
            // really apart: AMD Bulldozer lists a module's two cores as thread
            // siblings but gives each its own core_id; ia64 gives every CPU
            // core_id 0 with itself as its only thread sibling; some AMD
            // packages reuse core_ids on each of their two dies/nodes.
            let node = node_of.get(&id).copied();
            let core = signed(id, "core_id")
                .filter(|_| is_online)
                .map(|c| (package, die, cluster, node, siblings, c));
            keys.packages.push(package);
            keys.dies.push(die);
            let own_core = (None, None, None, None, None, u32::MAX - id);
            keys.cores.push(core.or(is_online.then_some(own_core)));
            keys.l2
                .push(cache_domain(cpu_dir, id, 2).filter(|_| is_online));
            keys.l3
                .push(cache_domain(cpu_dir, id, 3).filter(|_| is_online));
        }
        keys
    }
}

/// The CPU ids that have a `cpuN` directory.
fn cpu_dirs(cpu_dir: &Path) -> Result<CpuSet, SysfsError> {
    let entries = std::fs::read_dir(cpu_dir).map_err(|source| SysfsError::CpuDir {
        path: cpu_dir.to_path_buf(),
        source,
    })?;
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
            memory_mib: read_mem_total(&path),
            hugepages: read_hugepages(&path),
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
            hugepages: Vec::new(),
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let topo = read_topology(&two_socket()).unwrap();
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
    fn reads_each_nodes_hugepage_pools_and_the_default_size() {
        let root = two_socket();
        let pool = root.join("sys/devices/system/node/node0/hugepages/hugepages-2048kB");
        std::fs::create_dir_all(&pool).unwrap();
        std::fs::write(pool.join("nr_hugepages"), "512\n").unwrap();
        std::fs::write(pool.join("free_hugepages"), "500\n").unwrap();
        let gig = root.join("sys/devices/system/node/node0/hugepages/hugepages-1048576kB");
        std::fs::create_dir_all(&gig).unwrap();
        std::fs::write(gig.join("nr_hugepages"), "0\n").unwrap();
        std::fs::create_dir_all(root.join("proc")).unwrap();
        std::fs::write(
            root.join("proc/meminfo"),
            "MemTotal: 1 kB\nHugepagesize:       2048 kB\n",
        )
        .unwrap();
        let mut topo = read_topology(&root).unwrap();
        let node0 = &topo.numa_nodes[0];
        assert_eq!(
            node0.hugepages,
            vec![
                HugePages {
                    size_kib: 2048,
                    total: 512,
                    free: 500
                },
                HugePages {
                    size_kib: 1 << 20,
                    total: 0,
                    free: 0
                },
            ]
        );
        assert_eq!(node0.normal_memory_mib(), Some(16384 - 1024));
        assert_eq!(topo.default_hugepage_kib, Some(2048));
        let v = serde_json::to_value(&topo).unwrap();
        assert_eq!(v["numa_nodes"][0]["normal_memory_mib"], 15360);
        assert_eq!(v["numa_nodes"][0]["hugepages"][0]["free"], 500);
        // The pool grows while the host runs: a refresh sees it.
        std::fs::write(pool.join("nr_hugepages"), "1024\n").unwrap();
        refresh_memory(&root, &mut topo);
        assert_eq!(topo.numa_nodes[0].hugepages[0].total, 1024);
    }

    #[test]
    fn a_fifo_in_a_snapshot_is_passed_over_not_waited_on() {
        let root = two_socket();
        let online = root.join("sys/devices/system/cpu/online");
        std::fs::remove_file(&online).unwrap();
        nix::unistd::mkfifo(&online, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // No writer ever opens it: a blocking read would hang here. The
        // per-CPU files say who is online instead.
        let topo = read_topology(&root).unwrap();
        assert_eq!(topo.online.to_string(), "0-2,4-7");
    }

    #[test]
    fn json_has_the_documented_fields() {
        let topo = read_topology(&two_socket()).unwrap();
        let v: serde_json::Value = serde_json::to_value(&topo).unwrap();
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
        let topo = read_topology(&root).unwrap();
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
        let topo = read_topology(&root).unwrap();
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
            let topo = read_topology(&fake_sysfs(tag, &refs)).unwrap();
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
        let e = read_topology(Path::new("/nonexistent-root"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/nonexistent-root/sys/devices/system/cpu"),
            "{e}"
        );
    }
}
