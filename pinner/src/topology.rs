//! The host's CPUs and NUMA nodes, read from sysfs under a root directory
//! (`/` on a host, an extracted snapshot in tests).

use crate::cpuset::CpuSet;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaNode {
    pub id: u32,
    /// Online CPUs of this node.
    pub cpus: CpuSet,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub online: CpuSet,
    /// Nodes holding at least one online CPU, by id.
    pub nodes: Vec<NumaNode>,
    /// Highest possible CPU id + 1: the width of libvirt's cpumaps.
    pub cpumap_width: u32,
}

impl Topology {
    pub fn read(sysfs_root: &Path) -> Result<Topology, String> {
        let cpu_dir = sysfs_root.join("sys/devices/system/cpu");
        let online = read_list(&cpu_dir.join("online"))?;
        if online.is_empty() {
            return Err(format!(
                "{}: no online CPUs",
                cpu_dir.join("online").display()
            ));
        }
        let possible = read_list(&cpu_dir.join("possible")).unwrap_or_else(|_| online.clone());
        let width = possible.union(&online).iter().max().map_or(1, |m| m + 1);

        let mut nodes = Vec::new();
        let node_dir = sysfs_root.join("sys/devices/system/node");
        if let Ok(entries) = std::fs::read_dir(&node_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(id) = name
                    .strip_prefix("node")
                    .and_then(|n| n.parse::<u32>().ok())
                else {
                    continue;
                };
                let cpus = read_list(&entry.path().join("cpulist"))?.intersection(&online);
                if !cpus.is_empty() {
                    nodes.push(NumaNode { id, cpus });
                }
            }
        }
        nodes.sort_by_key(|n| n.id);
        // Hosts without NUMA in sysfs are one node; CPUs in no node join node 0's.
        let covered = nodes
            .iter()
            .fold(CpuSet::new(), |acc, n| acc.union(&n.cpus));
        let orphans = online.difference(&covered);
        if !orphans.is_empty() {
            match nodes.first_mut() {
                Some(first) => first.cpus = first.cpus.union(&orphans),
                None => nodes.push(NumaNode {
                    id: 0,
                    cpus: orphans,
                }),
            }
        }
        Ok(Topology {
            online,
            nodes,
            cpumap_width: width,
        })
    }

    /// A synthetic host: `online` split evenly over `node_count` nodes.
    #[cfg(test)]
    pub fn uniform(online: &CpuSet, node_count: u32) -> Topology {
        let cpus = online.to_vec();
        let per_node = cpus.len().div_ceil(node_count.max(1) as usize).max(1);
        let nodes = cpus
            .chunks(per_node)
            .enumerate()
            .map(|(i, chunk)| NumaNode {
                id: i as u32,
                cpus: chunk.iter().copied().collect(),
            })
            .collect();
        Topology {
            online: online.clone(),
            nodes,
            cpumap_width: online.iter().max().map_or(1, |m| m + 1),
        }
    }

    /// The ids of the nodes holding any of `cpus`.
    pub fn nodes_of(&self, cpus: &CpuSet) -> Vec<u32> {
        self.nodes
            .iter()
            .filter(|n| !n.cpus.intersection(cpus).is_empty())
            .map(|n| n.id)
            .collect()
    }
}

fn read_list(path: &PathBuf) -> Result<CpuSet, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    CpuSet::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_sysfs(tag: &str, files: &[(&str, &str)]) -> PathBuf {
        let root = std::env::temp_dir().join(format!("pinner-topo-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (path, text) in files {
            let full = root.join(path);
            std::fs::create_dir_all(full.parent().unwrap()).unwrap();
            std::fs::write(full, text).unwrap();
        }
        root
    }

    #[test]
    fn reads_nodes_and_drops_offline_cpus() {
        let root = fake_sysfs(
            "two-nodes",
            &[
                ("sys/devices/system/cpu/online", "0-2,4-7\n"),
                ("sys/devices/system/cpu/possible", "0-7\n"),
                ("sys/devices/system/node/node0/cpulist", "0-3\n"),
                ("sys/devices/system/node/node1/cpulist", "4-7\n"),
                ("sys/devices/system/node/node2/cpulist", "\n"),
            ],
        );
        let topo = Topology::read(&root).unwrap();
        assert_eq!(topo.online.to_string(), "0-2,4-7");
        assert_eq!(topo.nodes.len(), 2, "memory-only node2 has no CPUs");
        assert_eq!(topo.nodes[0].cpus.to_string(), "0-2");
        assert_eq!(topo.nodes[1].cpus.to_string(), "4-7");
        assert_eq!(topo.cpumap_width, 8);
        assert_eq!(topo.nodes_of(&CpuSet::parse("2,5").unwrap()), vec![0, 1]);
    }

    #[test]
    fn host_without_numa_is_one_node() {
        let root = fake_sysfs("flat", &[("sys/devices/system/cpu/online", "0-3")]);
        let topo = Topology::read(&root).unwrap();
        assert_eq!(
            topo.nodes,
            vec![NumaNode {
                id: 0,
                cpus: CpuSet::parse("0-3").unwrap()
            }]
        );
    }

    #[test]
    fn missing_sysfs_is_a_clear_error() {
        let e = Topology::read(Path::new("/nonexistent-root")).unwrap_err();
        assert!(
            e.contains("/nonexistent-root/sys/devices/system/cpu/online"),
            "{e}"
        );
    }
}
