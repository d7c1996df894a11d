//! The host's CPUs as pinner models them: online and offline CPUs,
//! packages, dies, cores and SMT siblings, L2/L3 cache domains, NUMA nodes
//! with memory and distances, hybrid core kinds, isolated and nohz_full
//! CPUs. `crate::host::sysfs` reads one from sysfs.

use crate::engine::cpuset::CpuSet;
use serde::Serialize;

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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaNode {
    pub id: u32,
    /// Online CPUs of this node (empty for memory-only nodes).
    pub cpus: CpuSet,
    /// MemTotal: every page the node has, hugepage pools included.
    pub memory_mib: Option<u64>,
    /// The node's hugetlb pools, by page size.
    pub hugepages: Vec<HugePages>,
    /// Distance to every node, in the order of `Topology::nodes`.
    pub distances: Vec<u32>,
}

impl NumaNode {
    /// MemTotal less the hugepage pools: what normal pages can use.
    pub fn normal_memory_mib(&self) -> Option<u64> {
        let huge_kib: u64 = self.hugepages.iter().map(|p| p.size_kib * p.total).sum();
        self.memory_mib
            .map(|mib| mib.saturating_sub(huge_kib.div_ceil(1024)))
    }
}

/// The JSON of a node: its fields, and its normal memory beside MemTotal.
impl Serialize for NumaNode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut node = s.serialize_struct("NumaNode", 6)?;
        node.serialize_field("id", &self.id)?;
        node.serialize_field("cpus", &self.cpus.to_vec())?;
        node.serialize_field("memory_mib", &self.memory_mib)?;
        node.serialize_field("normal_memory_mib", &self.normal_memory_mib())?;
        node.serialize_field("hugepages", &self.hugepages)?;
        node.serialize_field("distances", &self.distances)?;
        node.end()
    }
}

/// One hugetlb pool of a node (`…/nodeN/hugepages/hugepages-<size>kB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HugePages {
    pub size_kib: u64,
    /// `nr_hugepages`: pages in the pool.
    pub total: u64,
    /// `free_hugepages`: not in use now.
    pub free: u64,
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
    /// The host's default huge page size (`Hugepagesize` in /proc/meminfo):
    /// what a guest asking for huge pages without a size gets.
    pub default_hugepage_kib: Option<u64>,
    /// Highest possible CPU id + 1: the width of libvirt's cpumaps.
    #[serde(skip)]
    pub cpumap_width: u32,
}

fn as_list<S: serde::Serializer>(set: &CpuSet, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(set.iter())
}

impl Topology {
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
                hugepages: Vec::new(),
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
            default_hugepage_kib: Some(2048),
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
                hugepages: Vec::new(),
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
            default_hugepage_kib: Some(2048),
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
}
