//! The facts doctor checks, gathered once: each running guest from its
//! live XML (and its steal from /proc), the host from /proc, /sys and /etc
//! under a root.

use super::DoctorError;
use crate::engine::cpuset::CpuSet;
use crate::engine::domain::DomainSpec;
use crate::engine::memory::MemoryReserve;
use crate::engine::topology::Topology;
use crate::host::file::{read_bytes, read_text};
use crate::host::procs::ProcFs;
use crate::isolation::irqs::irqbalance_ban;
use std::collections::BTreeMap;
use std::path::Path;

/// A running guest, as its live XML (and /proc) describe it.
#[derive(Debug, Clone, Default)]
pub struct Guest {
    pub spec: DomainSpec,
    /// `<cpu mode=…>` (None: no `<cpu>` element).
    pub cpu_mode: Option<String>,
    /// `<cpu><topology sockets cores threads>`.
    pub topology: Option<(u32, u32, u32)>,
    pub numa_cells: usize,
    /// `<cpu><cache mode=… level=…>`.
    pub cache: Option<(String, Option<u32>)>,
    pub nics: Vec<Nic>,
    pub disks: Vec<Disk>,
    /// Models of `<controller type='scsi'>`.
    pub scsi_models: Vec<String>,
    /// Steal over the sample, percent (None: not measured).
    pub steal_pct: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Nic {
    /// The guest-visible name: its MAC address, else its position.
    pub id: String,
    pub model: Option<String>,
    /// `<driver name=…>` (vhost, qemu).
    pub driver: Option<String>,
    pub queues: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Disk {
    /// `<target dev=…>`.
    pub target: String,
    pub device: String,
    pub bus: Option<String>,
    pub cache: Option<String>,
    pub io: Option<String>,
}

impl Nic {
    /// An `<interface>`, the `index`th of its guest.
    fn from_node(nic: roxmltree::Node, index: usize) -> Nic {
        let driver = child(nic, "driver");
        Nic {
            id: child(nic, "mac")
                .and_then(|m| m.attribute("address"))
                .map_or_else(|| format!("interface {index}"), str::to_string),
            model: child(nic, "model")
                .and_then(|m| m.attribute("type"))
                .map(str::to_string),
            driver: driver.and_then(|d| d.attribute("name")).map(str::to_string),
            queues: driver.and_then(|d| attr_u32(d, "queues")),
        }
    }
}

impl Disk {
    fn from_node(disk: roxmltree::Node) -> Disk {
        let target = child(disk, "target");
        let driver = child(disk, "driver");
        Disk {
            target: target
                .and_then(|t| t.attribute("dev"))
                .unwrap_or("?")
                .to_string(),
            device: disk.attribute("device").unwrap_or("disk").to_string(),
            bus: target.and_then(|t| t.attribute("bus")).map(str::to_string),
            cache: driver
                .and_then(|d| d.attribute("cache"))
                .map(str::to_string),
            io: driver.and_then(|d| d.attribute("io")).map(str::to_string),
        }
    }
}

impl Guest {
    /// Reads the facts doctor needs from a domain's live XML.
    pub fn from_xml(xml: &str) -> Result<Guest, DoctorError> {
        let spec = DomainSpec::parse(xml)?;
        let doc =
            roxmltree::Document::parse(xml).map_err(crate::engine::domain::DomainError::from)?;
        let root = doc.root_element();
        let cpu = child(root, "cpu");
        let mut guest = Guest {
            cpu_mode: cpu.map(|c| c.attribute("mode").unwrap_or("custom").to_string()),
            topology: cpu.and_then(|c| child(c, "topology")).map(|t| {
                (
                    attr_u32(t, "sockets").unwrap_or(1),
                    attr_u32(t, "cores").unwrap_or(1),
                    attr_u32(t, "threads").unwrap_or(1),
                )
            }),
            numa_cells: cpu.and_then(|c| child(c, "numa")).map_or(0, |n| {
                n.children().filter(|c| c.has_tag_name("cell")).count()
            }),
            cache: cpu.and_then(|c| child(c, "cache")).map(|c| {
                (
                    c.attribute("mode").unwrap_or("").to_string(),
                    attr_u32(c, "level"),
                )
            }),
            spec,
            ..Guest::default()
        };
        let Some(devices) = child(root, "devices") else {
            return Ok(guest);
        };
        guest.nics = devices
            .children()
            .filter(|c| c.has_tag_name("interface"))
            .enumerate()
            .map(|(index, nic)| Nic::from_node(nic, index))
            .collect();
        guest.disks = devices
            .children()
            .filter(|c| c.has_tag_name("disk"))
            .map(Disk::from_node)
            .collect();
        guest.scsi_models = devices
            .children()
            .filter(|c| c.has_tag_name("controller") && c.attribute("type") == Some("scsi"))
            .map(|c| c.attribute("model").unwrap_or("default").to_string())
            .collect();
        Ok(guest)
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Every vCPU's CPUs (its `<vcpupin>`, else `<vcpu cpuset>`), when
    /// every vCPU has some.
    pub fn vcpu_cpus(&self) -> Option<Vec<&CpuSet>> {
        (0..self.spec.vcpus)
            .map(|v| self.spec.vcpu_pin(v))
            .collect()
    }

    /// Its vCPUs' CPUs, leaving out vCPUs without any.
    pub fn pins(&self) -> impl Iterator<Item = &CpuSet> + '_ {
        (0..self.spec.vcpus).filter_map(|v| self.spec.vcpu_pin(v))
    }
}

/// Per guest UUID, the CPUs one of its vCPUs has to itself: pinned to that
/// CPU alone, and no other vCPU of any guest may run there.
pub fn dedicated_cpus(guests: &[Guest]) -> BTreeMap<&str, CpuSet> {
    let mut users: BTreeMap<u32, usize> = BTreeMap::new();
    for cpu in guests
        .iter()
        .flat_map(|g| g.pins())
        .flat_map(|p| p.to_vec())
    {
        *users.entry(cpu).or_insert(0) += 1;
    }
    guests
        .iter()
        .map(|g| {
            let own = g
                .pins()
                .filter(|p| p.len() == 1 && p.iter().all(|cpu| users.get(&cpu) == Some(&1)))
                .flat_map(|p| p.to_vec())
                .collect();
            (g.spec.uuid.as_str(), own)
        })
        .collect()
}

fn child<'a, 'input>(
    node: roxmltree::Node<'a, 'input>,
    name: &str,
) -> Option<roxmltree::Node<'a, 'input>> {
    node.children().find(|c| c.has_tag_name(name))
}

fn attr_u32(node: roxmltree::Node, name: &str) -> Option<u32> {
    node.attribute(name)?.parse().ok()
}

/// The host, as /proc, /sys and /etc describe it.
#[derive(Debug, Clone)]
pub struct Host {
    pub topology: Topology,
    /// pinner's pool of guest CPUs (None: no usable configuration).
    pub pool: Option<CpuSet>,
    /// What the host keeps for itself on each node (the configuration's,
    /// or none when it does not resolve).
    pub memory_reserve: MemoryReserve,
    /// The selected value of transparent_hugepage/enabled.
    pub thp: Option<String>,
    pub ksm_run: Option<u32>,
    pub ksm_merge_across_nodes: Option<u32>,
    pub numa_balancing: Option<u32>,
    /// Names (comm and program) of running processes.
    pub processes: Vec<String>,
    /// irqbalance's banned CPUs and the file that sets them.
    pub irqbalance_banned: Option<(CpuSet, String)>,
    /// Per CPU: softirq share of its time over the sample, percent.
    pub softirq_pct: BTreeMap<u32, f64>,
    /// Per CPU: network interrupts over the sample.
    pub nic_irqs: BTreeMap<u32, u64>,
}

/// Cores in the host's largest package.
pub fn cores_per_package(topo: &Topology) -> usize {
    let mut cores: BTreeMap<Option<u32>, std::collections::BTreeSet<Option<u32>>> = BTreeMap::new();
    for cpu in topo.cpus.iter().filter(|c| c.online) {
        cores.entry(cpu.package).or_default().insert(cpu.core);
    }
    cores.values().map(|c| c.len()).max().unwrap_or(0)
}

/// One reading of the counters doctor samples twice.
#[derive(Default)]
pub struct Counters {
    /// Per CPU: (softirq ticks, all ticks), from /proc/stat.
    pub ticks: BTreeMap<u32, (u64, u64)>,
    /// Per CPU: network interrupts, from /proc/interrupts.
    pub nic_irqs: BTreeMap<u32, u64>,
}

/// The largest /proc table read (/proc/interrupts of a host of thousands
/// of CPUs is some MiB); `--root` may hold anything another machine had.
const PROC_TABLE_CAP: u64 = 64 * 1024 * 1024;

/// The largest single-value file read (sysfs, /proc/sys).
const SMALL_FILE_CAP: u64 = 64 * 1024;

/// A /proc table as text; empty when it is missing, or is not a regular
/// file of a sane size.
fn proc_text(path: &Path) -> String {
    read_bytes(path, PROC_TABLE_CAP)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

pub fn read_counters(root: &Path) -> Counters {
    let mut counters = Counters::default();
    let stat = proc_text(&root.join("proc/stat"));
    for line in stat.lines() {
        let mut cols = line.split_whitespace();
        let Some(cpu) = cols.next().and_then(|c| c.strip_prefix("cpu")) else {
            continue;
        };
        let Ok(cpu) = cpu.parse::<u32>() else {
            continue;
        };
        let values: Vec<u64> = cols.filter_map(|v| v.parse().ok()).collect();
        // user nice system idle iowait irq softirq steal …
        let softirq = values.get(6).copied().unwrap_or(0);
        let total = values.iter().take(8).sum();
        counters.ticks.insert(cpu, (softirq, total));
    }
    let interrupts = proc_text(&root.join("proc/interrupts"));
    let mut lines = interrupts.lines();
    let cpus: Vec<u32> = lines
        .next()
        .unwrap_or("")
        .split_whitespace()
        .filter_map(|c| c.strip_prefix("CPU")?.parse().ok())
        .collect();
    for line in lines {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let name = cols.last().copied().unwrap_or("");
        if cols.len() <= cpus.len() || !is_nic_interrupt(name) {
            continue;
        }
        for (i, cpu) in cpus.iter().enumerate() {
            let count: u64 = cols[1 + i].parse().unwrap_or(0);
            *counters.nic_irqs.entry(*cpu).or_insert(0) += count;
        }
    }
    counters
}

/// Interrupt names of network queues: virtio-net's input/output queues and
/// the usual drivers' per-queue vectors.
pub fn is_nic_interrupt(name: &str) -> bool {
    if name.starts_with("virtio") {
        return name.contains("-input") || name.contains("-output");
    }
    [
        "eth", "ens", "eno", "enp", "mlx", "i40e", "ice", "ixgbe", "igb", "bnxt", "-TxRx-", "-rx-",
        "-tx-",
    ]
    .iter()
    .any(|p| name.contains(p))
}

impl Host {
    /// Reads the host under `root`, sampling interrupts and softirqs over
    /// `sample`. `pool` is pinner's pool, when its configuration resolves.
    pub fn read(
        root: &Path,
        topology: Topology,
        (pool, memory_reserve): (Option<CpuSet>, MemoryReserve),
        sample: std::time::Duration,
    ) -> Host {
        let read = |rest: &str| read_text(&root.join(rest), SMALL_FILE_CAP).ok();
        let read_u32 = |rest: &str| read(rest).and_then(|t| t.trim().parse().ok());
        let thp = read("sys/kernel/mm/transparent_hugepage/enabled").and_then(|t| {
            let start = t.find('[')?;
            let end = t[start..].find(']')?;
            Some(t[start + 1..start + end].to_string())
        });
        let procfs = ProcFs::new(root.join("proc"));
        let mut processes: Vec<String> = procfs
            .pids()
            .into_iter()
            .filter_map(|pid| procfs.process(pid))
            .filter(|p| !p.kernel_thread)
            .flat_map(|p| [p.comm, p.program])
            .collect();
        processes.sort();
        processes.dedup();
        let irqbalance_banned = irqbalance_ban(root);
        let before = read_counters(root);
        std::thread::sleep(sample);
        let after = read_counters(root);
        let softirq_pct = after
            .ticks
            .iter()
            .filter_map(|(cpu, (soft, total))| {
                let (soft0, total0) = before.ticks.get(cpu)?;
                let span = total.saturating_sub(*total0);
                (span > 0).then(|| {
                    (
                        *cpu,
                        100.0 * soft.saturating_sub(*soft0) as f64 / span as f64,
                    )
                })
            })
            .collect();
        let nic_irqs = after
            .nic_irqs
            .iter()
            .map(|(cpu, n)| {
                (
                    *cpu,
                    n.saturating_sub(before.nic_irqs.get(cpu).copied().unwrap_or(0)),
                )
            })
            .collect();
        Host {
            topology,
            pool,
            memory_reserve,
            thp,
            ksm_run: read_u32("sys/kernel/mm/ksm/run"),
            ksm_merge_across_nodes: read_u32("sys/kernel/mm/ksm/merge_across_nodes"),
            numa_balancing: read_u32("proc/sys/kernel/numa_balancing"),
            processes,
            irqbalance_banned,
            softirq_pct,
            nic_irqs,
        }
    }
}
