//! `pinner doctor`: audits a host and its running guests for what costs
//! guests speed — the checks tuning guides do by hand with virsh, sar,
//! numastat and /proc/interrupts — and prints each finding with its
//! evidence and the exact fix. The checks are pure functions of [`Host`] and
//! [`Guest`] facts; reading those facts is separate, so every check runs
//! against fixtures.

use crate::cpuset::CpuSet;
use crate::domain::DomainSpec;
use crate::procs::ProcFs;
use crate::topology::Topology;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
    Info,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Stable id (`PIN001`…), documented in the README.
    pub id: &'static str,
    pub severity: Severity,
    /// The guest it is about; None for the host.
    pub domain: Option<String>,
    pub title: String,
    pub evidence: String,
    pub fix: String,
}

/// A running guest, as its live XML (and /proc) describe it.
#[derive(Debug, Clone, Default)]
pub struct Guest {
    pub spec: DomainSpec,
    pub memory_kib: u64,
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

impl Guest {
    /// Reads the facts doctor needs from a domain's live XML.
    pub fn from_xml(xml: &str) -> Result<Guest, String> {
        let spec = DomainSpec::parse(xml)?;
        let doc = roxmltree::Document::parse(xml)
            .map_err(|e| format!("domain {:?}: XML: {e}", spec.name))?;
        let root = doc.root_element();
        let memory_kib = child(root, "memory")
            .and_then(|m| {
                let value: u64 = m.text()?.trim().parse().ok()?;
                let factor = match m.attribute("unit").unwrap_or("KiB") {
                    "b" | "bytes" => return Some(value / 1024),
                    "KiB" | "k" => 1,
                    "MiB" | "M" => 1024,
                    "GiB" | "G" => 1024 * 1024,
                    "TiB" | "T" => 1024 * 1024 * 1024,
                    _ => 1,
                };
                Some(value * factor)
            })
            .unwrap_or(0);
        let cpu = child(root, "cpu");
        let mut guest = Guest {
            memory_kib,
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
        for (index, nic) in devices
            .children()
            .filter(|c| c.has_tag_name("interface"))
            .enumerate()
        {
            let driver = child(nic, "driver");
            guest.nics.push(Nic {
                id: child(nic, "mac")
                    .and_then(|m| m.attribute("address"))
                    .map_or_else(|| format!("interface {index}"), str::to_string),
                model: child(nic, "model")
                    .and_then(|m| m.attribute("type"))
                    .map(str::to_string),
                driver: driver.and_then(|d| d.attribute("name")).map(str::to_string),
                queues: driver.and_then(|d| attr_u32(d, "queues")),
            });
        }
        for disk in devices.children().filter(|c| c.has_tag_name("disk")) {
            let target = child(disk, "target");
            let driver = child(disk, "driver");
            guest.disks.push(Disk {
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
            });
        }
        guest.scsi_models = devices
            .children()
            .filter(|c| c.has_tag_name("controller") && c.attribute("type") == Some("scsi"))
            .map(|c| c.attribute("model").unwrap_or("default").to_string())
            .collect();
        Ok(guest)
    }

    fn name(&self) -> &str {
        &self.spec.name
    }

    /// Every vCPU's CPUs (its `<vcpupin>`, else `<vcpu cpuset>`), when
    /// every vCPU has some.
    fn vcpu_cpus(&self) -> Option<Vec<&CpuSet>> {
        (0..self.spec.vcpus)
            .map(|v| self.spec.vcpu_pin(v))
            .collect()
    }

    /// Its vCPUs' CPUs, leaving out vCPUs without any.
    fn pins(&self) -> impl Iterator<Item = &CpuSet> + '_ {
        (0..self.spec.vcpus).filter_map(|v| self.spec.vcpu_pin(v))
    }
}

/// Per guest UUID, the CPUs one of its vCPUs has to itself: pinned to that
/// CPU alone, and no other vCPU of any guest may run there.
fn dedicated_cpus(guests: &[Guest]) -> BTreeMap<&str, CpuSet> {
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

/// Steal above this (percent of a vCPU's time) is reported.
pub const STEAL_THRESHOLD_PCT: f64 = 10.0;
/// A CPU spending this share of its time in softirqs is saturated.
const SOFTIRQ_SATURATED_PCT: f64 = 30.0;
/// The kernel's limit on tap queues per device (MAX_TAP_QUEUES).
const TAP_QUEUE_LIMIT: u32 = 256;

fn finding(
    id: &'static str,
    severity: Severity,
    domain: Option<&str>,
    title: impl Into<String>,
    evidence: impl Into<String>,
    fix: impl Into<String>,
) -> Finding {
    Finding {
        id,
        severity,
        domain: domain.map(str::to_string),
        title: title.into(),
        evidence: evidence.into(),
        fix: fix.into(),
    }
}

/// Every finding for the host and `guests`, host first, then by guest.
/// Every finding for the host and `guests` (only the guest named `only`,
/// when given; the others still count for shared facts such as dedicated
/// CPUs), host first, then by guest.
pub fn audit(host: &Host, guests: &[Guest], only: Option<&str>) -> Vec<Finding> {
    let dedicated = dedicated_cpus(guests);
    let mut out = check_host(host, &dedicated);
    for guest in guests
        .iter()
        .filter(|g| only.is_none_or(|n| g.spec.name == n))
    {
        out.extend(check_guest(host, guest, &dedicated));
    }
    out
}

/// `dedicated`: per guest UUID, its dedicated CPUs (see `dedicated_cpus`).
fn check_guest(host: &Host, g: &Guest, dedicated: &BTreeMap<&str, CpuSet>) -> Vec<Finding> {
    let mut out = Vec::new();
    let name = Some(g.name());
    let topo = &host.topology;

    // CPU model and topology.
    match g.cpu_mode.as_deref() {
        Some("host-passthrough" | "host-model" | "maximum") => {}
        mode => out.push(finding(
            "PIN001",
            Severity::Warning,
            name,
            "guest CPU model hides the host's features",
            format!("<cpu mode='{}'>", mode.unwrap_or("(none: qemu's default model)")),
            "<cpu mode='host-passthrough' check='none' migratable='on'/> (host-model where guests migrate between different CPUs)",
        )),
    }
    let host_cores_per_package = cores_per_package(topo);
    let vcpus = g.spec.vcpus;
    let (sockets, cores, threads) = g.topology.unwrap_or((vcpus.max(1), 1, 1));
    if vcpus > 1 && sockets > 1 && cores == 1 && host_cores_per_package > 1 {
        let evidence = match g.topology {
            Some(_) => format!("<topology sockets='{sockets}' cores='1' threads='{threads}'/>"),
            None => format!("no <topology>: libvirt starts qemu with {vcpus} sockets of 1 core"),
        };
        out.push(finding(
            "PIN002",
            Severity::Warning,
            name,
            "guest sees many single-core sockets",
            evidence,
            format!("<cpu …><topology sockets='1' dies='1' cores='{vcpus}' threads='1'/></cpu> (the guest scheduler then balances within a package, as on the host)"),
        ));
    }
    let biggest_node = topo
        .numa_nodes
        .iter()
        .map(|n| (n.cpus.len() as u32, n.memory_mib.unwrap_or(u64::MAX)))
        .max();
    if let Some((node_cpus, node_mib)) = biggest_node {
        let too_big = vcpus > node_cpus || g.memory_kib / 1024 > node_mib;
        if topo.numa_nodes.len() > 1 && too_big && g.numa_cells == 0 {
            out.push(finding(
                "PIN003",
                Severity::Warning,
                name,
                "guest larger than a host NUMA node has no NUMA cells",
                format!(
                    "{vcpus} vCPUs, {} MiB; the largest host node has {node_cpus} CPUs{}",
                    g.memory_kib / 1024,
                    if node_mib == u64::MAX { String::new() } else { format!(", {node_mib} MiB") }
                ),
                "<cpu …><numa><cell id='0' cpus='0-(N/2-1)' memory='M/2' unit='KiB'/><cell id='1' cpus='N/2-(N-1)' memory='M/2' unit='KiB'/></numa></cpu>, matching the host nodes it is pinned to",
            ));
        }
    }
    let l3_visible = match (&g.cache, g.cpu_mode.as_deref()) {
        (Some((mode, _)), _) if mode == "passthrough" => true,
        (Some((mode, Some(3))), _) if mode == "emulate" => true,
        (Some((mode, _)), _) if mode == "disable" => false,
        (None, Some("host-passthrough")) => true,
        _ => false,
    };
    if vcpus > 1 && !l3_visible {
        out.push(finding(
            "PIN004",
            Severity::Info,
            name,
            "guest cannot see which vCPUs share an L3 cache",
            match &g.cache {
                Some((mode, level)) => format!(
                    "<cache mode='{mode}'{}>",
                    level.map_or(String::new(), |l| format!(" level='{l}'"))
                ),
                None => format!(
                    "no <cache> with <cpu mode='{}'>",
                    g.cpu_mode.as_deref().unwrap_or("(none)")
                ),
            },
            "<cpu mode='host-passthrough'><cache mode='passthrough'/></cpu>, or <cache level='3' mode='emulate'/> with host-model",
        ));
    }

    // Pinning and memory.
    let managed_elsewhere = g.spec.auto_placement;
    let unpinned: Vec<u32> = (0..vcpus)
        .filter(|v| g.spec.vcpu_pin(*v).is_none())
        .collect();
    if !unpinned.is_empty() && !managed_elsewhere {
        out.push(finding(
            "PIN005",
            Severity::Warning,
            name,
            "vCPUs may run on any host CPU",
            format!("vCPUs {} have no <vcpupin> and <vcpu> no cpuset", join(&unpinned)),
            "let pinner place the guest (is the daemon running? `pinner status`), or <cputune><vcpupin vcpu='0' cpuset='…'/>…</cputune>",
        ));
    }
    if let Some(sets) = g.vcpu_cpus() {
        let cpus: CpuSet = sets.iter().flat_map(|s| s.iter()).collect();
        let nodes = topo.nodes_of(&cpus);
        let fits_one_node = topo.numa_nodes.iter().any(|n| n.cpus.len() as u32 >= vcpus);
        if nodes.len() > 1 && fits_one_node {
            out.push(finding(
                "PIN006",
                Severity::Warning,
                name,
                "vCPUs pinned across NUMA nodes although the guest fits in one",
                format!("vCPUs on CPUs {cpus}: nodes {}", join(&nodes)),
                "pin every vCPU inside one node (pinner does: remove the hand-made <vcpupin>s and let it place the guest)",
            ));
        }
        let bound = g.spec.memory_nodes.as_ref().map(CpuSet::to_vec);
        if topo.numa_nodes.len() > 1 && bound.as_deref() != Some(nodes.as_slice()) {
            let node_list = join(&nodes);
            out.push(finding(
                "PIN007",
                Severity::Warning,
                name,
                "memory not bound to the vCPUs' NUMA nodes",
                format!(
                    "vCPUs on nodes {node_list}; memory {}",
                    bound.map_or("not bound (no <numatune>)".into(), |b| format!("on nodes {}", join(&b)))
                ),
                format!("<numatune><memory mode='strict' nodeset='{node_list}'/></numatune>; live: virsh numatune {} --nodeset {node_list} --live", g.name()),
            ));
        }
    }
    let emulator = g
        .spec
        .emulator_pin
        .clone()
        .unwrap_or_else(|| topo.online.clone());
    let own = dedicated
        .get(g.spec.uuid.as_str())
        .cloned()
        .unwrap_or_default();
    let others: CpuSet = dedicated
        .iter()
        .filter(|(uuid, _)| **uuid != g.spec.uuid)
        .flat_map(|(_, cpus)| cpus.to_vec())
        .collect();
    let on_others = emulator.intersection(&others);
    let on_own = emulator.intersection(&own);
    if !on_others.is_empty() || !on_own.is_empty() {
        // On other guests' dedicated CPUs it steals their time: an error.
        // On its own, it is a choice (emulator_threads = "guest"): a note.
        let (severity, whose) = if on_others.is_empty() {
            (
                Severity::Info,
                format!("its own dedicated CPUs {on_own} (emulator_threads = \"guest\"?)"),
            )
        } else {
            (
                Severity::Error,
                format!("other guests' dedicated CPUs {on_others}"),
            )
        };
        out.push(finding(
            "PIN008",
            severity,
            name,
            "emulator threads share dedicated vCPUs' CPUs",
            format!(
                "emulator threads may run on CPUs {emulator}, including {whose}"
            ),
            format!("<cputune><emulatorpin cpuset='RESERVED'/></cputune>; live: virsh emulatorpin {} RESERVED --live (pinner does this with reserved_cpus set and emulator_threads = \"housekeeping\")", g.name()),
        ));
    }

    // Network.
    for nic in &g.nics {
        let model = nic.model.as_deref().unwrap_or("(default: rtl8139)");
        if model != "virtio" && !model.starts_with("virtio-") {
            out.push(finding(
                "PIN010",
                Severity::Warning,
                name,
                "emulated network card",
                format!("{}: <model type='{model}'/>", nic.id),
                "<model type='virtio'/> (the guest needs virtio-net drivers: every Linux, Windows with virtio-win)",
            ));
            continue;
        }
        if nic.driver.as_deref() == Some("qemu") {
            out.push(finding(
                "PIN011",
                Severity::Warning,
                name,
                "virtio network without vhost",
                format!("{}: <driver name='qemu'/>", nic.id),
                "<driver name='vhost'/> (and `modprobe vhost_net` on the host)",
            ));
        }
        let queues = nic.queues.unwrap_or(1);
        let wanted = vcpus.min(TAP_QUEUE_LIMIT);
        if vcpus > 1 && queues < 2 {
            out.push(finding(
                "PIN012",
                Severity::Info,
                name,
                "one network queue for several vCPUs",
                format!("{}: {queues} queue, {vcpus} vCPUs: one vCPU takes every packet's interrupt", nic.id),
                format!("<driver name='vhost' queues='{wanted}'/> (at most the vCPUs, and the host's {TAP_QUEUE_LIMIT} tap queues; it takes {} MSI-X vectors), then in the guest: ethtool -L eth0 combined {wanted}", 2 * wanted + 2),
            ));
        } else if queues > vcpus {
            out.push(finding(
                "PIN013",
                Severity::Warning,
                name,
                "more network queues than vCPUs",
                format!("{}: {queues} queues, {vcpus} vCPUs: {} MSI-X vectors for queues no vCPU can serve alone", nic.id, 2 * queues + 2),
                format!("<driver name='vhost' queues='{wanted}'/>"),
            ));
        }
    }

    // Disks.
    let virtio_scsi = g.scsi_models.iter().any(|m| m == "virtio-scsi");
    for disk in g.disks.iter().filter(|d| d.device == "disk") {
        let bus = disk.bus.as_deref().unwrap_or("(default)");
        if bus != "virtio" && !(bus == "scsi" && virtio_scsi) {
            out.push(finding(
                "PIN020",
                Severity::Warning,
                name,
                "emulated disk controller",
                format!("{}: <target bus='{bus}'/>", disk.target),
                "<target dev='vda' bus='virtio'/>, or bus='scsi' on <controller type='scsi' model='virtio-scsi'/>",
            ));
        }
        let cache = disk.cache.as_deref().unwrap_or("(default: writeback)");
        if cache != "none" && cache != "directsync" {
            out.push(finding(
                "PIN021",
                Severity::Warning,
                name,
                "disk goes through the host's page cache",
                format!("{}: cache='{cache}'", disk.target),
                "<driver name='qemu' type='raw' cache='none' io='native'/>",
            ));
        } else if !matches!(disk.io.as_deref(), Some("native" | "io_uring")) {
            out.push(finding(
                "PIN022",
                Severity::Info,
                name,
                "disk I/O through qemu's thread pool",
                format!(
                    "{}: cache='{cache}' io='{}'",
                    disk.target,
                    disk.io.as_deref().unwrap_or("threads")
                ),
                "<driver … cache='none' io='native'/> (or io='io_uring' on qemu ≥ 5.0)",
            ));
        }
    }

    if let Some(steal) = g.steal_pct.filter(|s| *s > STEAL_THRESHOLD_PCT) {
        out.push(finding(
            "PIN036",
            Severity::Warning,
            name,
            "vCPUs wait for host CPUs (steal)",
            format!("{steal:.1}% of each vCPU's time waiting on a run queue (threshold {STEAL_THRESHOLD_PCT}%)"),
            "give it dedicated CPUs (<pinner:state policy='dedicated'/> in its metadata), lower cpu_allocation_ratio, or move guests off this host; `pinner status` shows who shares its CPUs",
        ));
    }
    out
}

fn check_host(host: &Host, dedicated: &BTreeMap<&str, CpuSet>) -> Vec<Finding> {
    let mut out = Vec::new();
    if host.thp.as_deref() == Some("never") {
        out.push(finding(
            "PIN030",
            Severity::Warning,
            None,
            "transparent hugepages are off",
            "/sys/kernel/mm/transparent_hugepage/enabled: [never]",
            "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled (persist: transparent_hugepage=madvise on the kernel command line); qemu asks for them, or give guests <memoryBacking><hugepages/></memoryBacking>",
        ));
    }
    if host.ksm_run == Some(1) {
        let across = host.ksm_merge_across_nodes == Some(1);
        let ksmtuned = host.processes.iter().any(|p| p == "ksmtuned");
        out.push(finding(
            "PIN031",
            Severity::Warning,
            None,
            "KSM merges guest memory",
            format!(
                "/sys/kernel/mm/ksm/run = 1{}{}",
                if across { ", merge_across_nodes = 1 (pages shared across NUMA nodes)" } else { "" },
                if ksmtuned { "; ksmtuned is running" } else { "" }
            ),
            "systemctl disable --now ksmtuned ksm; echo 2 > /sys/kernel/mm/ksm/run (unmerges); if KSM must stay: echo 0 > /sys/kernel/mm/ksm/merge_across_nodes while run = 0",
        ));
    }
    if host.numa_balancing.is_some_and(|v| v != 0) {
        out.push(finding(
            "PIN032",
            Severity::Warning,
            None,
            "automatic NUMA balancing moves pinned guests' memory",
            format!("kernel.numa_balancing = {}", host.numa_balancing.unwrap_or(0)),
            "sysctl -w kernel.numa_balancing=0, and persist it: echo kernel.numa_balancing=0 > /etc/sysctl.d/90-pinner.conf",
        ));
    }
    if host.processes.iter().any(|p| p == "numad") {
        out.push(finding(
            "PIN033",
            Severity::Warning,
            None,
            "numad places guests too",
            "numad is running; it moves guests' memory and CPUs behind pinner",
            "systemctl disable --now numad",
        ));
    }
    let dedicated: CpuSet = dedicated.values().flat_map(CpuSet::to_vec).collect();
    if host.processes.iter().any(|p| p == "irqbalance") && !dedicated.is_empty() {
        let banned = host
            .irqbalance_banned
            .as_ref()
            .map_or_else(CpuSet::new, |(b, _)| b.clone());
        let exposed = dedicated.difference(&banned);
        if !exposed.is_empty() {
            out.push(finding(
                "PIN034",
                Severity::Warning,
                None,
                "irqbalance may route interrupts to dedicated CPUs",
                format!(
                    "irqbalance is running; dedicated CPUs {exposed} are not banned{}",
                    host.irqbalance_banned
                        .as_ref()
                        .map_or(String::new(), |(b, file)| format!(" ({file} bans {b})"))
                ),
                format!("IRQBALANCE_BANNED_CPULIST={} in /etc/default/irqbalance (/etc/sysconfig/irqbalance on RHEL), then systemctl restart irqbalance", banned.union(&dedicated)),
            ));
        }
    }
    if let Some(pool) = &host.pool {
        let idle = host.topology.isolated.difference(pool);
        if !idle.is_empty() {
            out.push(finding(
                "PIN035",
                Severity::Info,
                None,
                "isolated CPUs that no guest may use",
                format!("isolcpus {} includes {idle}, outside pinner's pool {pool}: the scheduler puts nothing there and pinner places no guest there", host.topology.isolated),
                "drop them from isolcpus=, or take them out of reserved_cpus so guests get them",
            ));
        }
    }
    let total_nic: u64 = host.nic_irqs.values().sum();
    if total_nic > 0 && host.topology.online.len() > 1 {
        if let Some((&cpu, &count)) = host.nic_irqs.iter().max_by_key(|(_, c)| **c) {
            let softirq = host.softirq_pct.get(&cpu).copied().unwrap_or(0.0);
            if count * 10 >= total_nic * 9 && softirq >= SOFTIRQ_SATURATED_PCT {
                out.push(finding(
                    "PIN037",
                    Severity::Warning,
                    None,
                    "one CPU takes every network interrupt and is saturated by softirqs",
                    format!("CPU {cpu}: {count} of {total_nic} network interrupts in the sample, {softirq:.0}% of its time in softirq"),
                    "spread the NIC's queues: enable more queues (ethtool -L DEV combined N), run irqbalance (banning dedicated CPUs), or set /proc/irq/N/smp_affinity_list per queue; RPS (/sys/class/net/DEV/queues/rx-*/rps_cpus) for single-queue NICs",
                ));
            }
        }
    }
    out
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Cores in the host's largest package.
fn cores_per_package(topo: &Topology) -> usize {
    let mut cores: BTreeMap<Option<u32>, std::collections::BTreeSet<Option<u32>>> = BTreeMap::new();
    for cpu in topo.cpus.iter().filter(|c| c.online) {
        cores.entry(cpu.package).or_default().insert(cpu.core);
    }
    cores.values().map(|c| c.len()).max().unwrap_or(0)
}

/// One reading of the counters doctor samples twice.
#[derive(Default)]
struct Counters {
    /// Per CPU: (softirq ticks, all ticks), from /proc/stat.
    ticks: BTreeMap<u32, (u64, u64)>,
    /// Per CPU: network interrupts, from /proc/interrupts.
    nic_irqs: BTreeMap<u32, u64>,
}

fn read_counters(root: &Path) -> Counters {
    let mut counters = Counters::default();
    let stat = std::fs::read_to_string(root.join("proc/stat")).unwrap_or_default();
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
    let interrupts = std::fs::read_to_string(root.join("proc/interrupts")).unwrap_or_default();
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
fn is_nic_interrupt(name: &str) -> bool {
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
        pool: Option<CpuSet>,
        sample: std::time::Duration,
    ) -> Result<Host, String> {
        let topology = Topology::read(root)?;
        let read = |rest: &str| std::fs::read_to_string(root.join(rest)).ok();
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
        let irqbalance_banned = ["etc/default/irqbalance", "etc/sysconfig/irqbalance"]
            .into_iter()
            .find_map(|file| Some((irqbalance_banned(&read(file)?)?, format!("/{file}"))));
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
        Ok(Host {
            topology,
            pool,
            thp,
            ksm_run: read_u32("sys/kernel/mm/ksm/run"),
            ksm_merge_across_nodes: read_u32("sys/kernel/mm/ksm/merge_across_nodes"),
            numa_balancing: read_u32("proc/sys/kernel/numa_balancing"),
            processes,
            irqbalance_banned,
            softirq_pct,
            nic_irqs,
        })
    }
}

/// IRQBALANCE_BANNED_CPULIST (a list) or IRQBALANCE_BANNED_CPUS (hex mask,
/// 32-bit words separated by commas) from an irqbalance environment file.
fn irqbalance_banned(text: &str) -> Option<CpuSet> {
    let value = |key: &str| {
        text.lines().find_map(|l| {
            let l = l.trim();
            let v = l.strip_prefix(key)?.strip_prefix('=')?;
            Some(v.trim().trim_matches('"').to_string())
        })
    };
    if let Some(list) = value("IRQBALANCE_BANNED_CPULIST") {
        return CpuSet::parse(&list).ok();
    }
    let mask = value("IRQBALANCE_BANNED_CPUS")?;
    let mut set = CpuSet::new();
    for (word_index, word) in mask.rsplit(',').enumerate() {
        let bits = u32::from_str_radix(word.trim(), 16).ok()?;
        for bit in 0..32 {
            if bits & (1 << bit) != 0 {
                set.insert(word_index as u32 * 32 + bit);
            }
        }
    }
    Some(set)
}

/// Findings as text: one block per finding, errors first, then a summary.
pub fn render_text(findings: &[Finding]) -> String {
    let mut sorted: Vec<&Finding> = findings.iter().collect();
    sorted.sort_by_key(|f| (f.severity, f.domain.clone(), f.id));
    let mut out = String::new();
    for f in &sorted {
        let severity = match f.severity {
            Severity::Error => "ERROR",
            Severity::Warning => "WARNING",
            Severity::Info => "info",
        };
        let subject = f
            .domain
            .as_deref()
            .map_or("host".to_string(), |d| format!("guest {d}"));
        out.push_str(&format!(
            "{} {severity} [{subject}] {}\n  evidence: {}\n  fix: {}\n\n",
            f.id, f.title, f.evidence, f.fix
        ));
    }
    let count = |s: Severity| findings.iter().filter(|f| f.severity == s).count();
    out.push_str(&format!(
        "{} errors, {} warnings, {} notes\n",
        count(Severity::Error),
        count(Severity::Warning),
        count(Severity::Info)
    ));
    out
}

/// Whether anything needs fixing (exit 2).
pub fn needs_fixing(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.severity != Severity::Info)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest that does everything right on the host below: pinned one to
    /// one in node 0, memory bound there, emulator on CPU 0, virtio with
    /// vhost and 2 queues, a raw disk with cache none and native I/O.
    const GOOD: &str = "<domain type='kvm'><name>good</name><uuid>u-good</uuid>
<memory unit='MiB'>1024</memory><vcpu placement='static'>2</vcpu>
<cputune><vcpupin vcpu='0' cpuset='1'/><vcpupin vcpu='1' cpuset='2'/><emulatorpin cpuset='0'/></cputune>
<numatune><memory mode='strict' nodeset='0'/></numatune>
<cpu mode='host-passthrough'><topology sockets='1' cores='2' threads='1'/><cache mode='passthrough'/></cpu>
<devices>
<interface type='bridge'><mac address='52:54:00:00:00:01'/><model type='virtio'/><driver name='vhost' queues='2'/></interface>
<disk type='block' device='disk'><driver name='qemu' type='raw' cache='none' io='native'/><target dev='vda' bus='virtio'/></disk>
<disk type='file' device='cdrom'><target dev='hdc' bus='ide'/></disk>
</devices></domain>";

    /// 8 CPUs in 2 nodes (0-3, 4-7) of one package; nothing misconfigured.
    fn good_host() -> Host {
        Host {
            topology: Topology::synthetic(2, 1, 4, 1),
            pool: Some(CpuSet::parse("1-7").unwrap()),
            thp: Some("madvise".into()),
            ksm_run: Some(0),
            ksm_merge_across_nodes: Some(1),
            numa_balancing: Some(0),
            processes: vec!["irqbalance".into(), "sshd".into()],
            irqbalance_banned: Some((
                CpuSet::parse("1-7").unwrap(),
                "/etc/default/irqbalance".into(),
            )),
            softirq_pct: BTreeMap::from([(0, 2.0), (1, 40.0)]),
            nic_irqs: BTreeMap::from([(0, 500), (1, 480)]),
        }
    }

    fn guest(xml: &str) -> Guest {
        Guest::from_xml(xml).unwrap()
    }

    fn ids(findings: &[Finding]) -> Vec<&'static str> {
        findings.iter().map(|f| f.id).collect()
    }

    #[test]
    fn a_well_tuned_host_and_guest_are_quiet() {
        let findings = audit(&good_host(), &[guest(GOOD)], None);
        assert!(findings.is_empty(), "{findings:#?}");
        assert!(!needs_fixing(&findings));
        assert_eq!(render_text(&findings), "0 errors, 0 warnings, 0 notes\n");
    }

    /// Each guest check fires on the good guest with one thing wrong.
    #[test]
    fn each_guest_check_fires_on_its_fault() {
        let cases: &[(&str, &[(&str, &str)])] = &[
            (
                "PIN001",
                &[("mode='host-passthrough'", "mode='custom' match='exact'")],
            ),
            (
                "PIN002",
                &[("sockets='1' cores='2'", "sockets='2' cores='1'")],
            ),
            (
                "PIN003",
                &[(
                    "<memory unit='MiB'>1024</memory>",
                    "<memory unit='GiB'>100</memory>",
                )],
            ),
            (
                "PIN004",
                &[("<cache mode='passthrough'/>", "<cache mode='disable'/>")],
            ),
            ("PIN005", &[("<vcpupin vcpu='1' cpuset='2'/>", "")]),
            (
                "PIN006",
                &[
                    (
                        "<vcpupin vcpu='1' cpuset='2'/>",
                        "<vcpupin vcpu='1' cpuset='5'/>",
                    ),
                    ("nodeset='0'", "nodeset='0-1'"),
                ],
            ),
            ("PIN007", &[("nodeset='0'", "nodeset='1'")]),
            (
                "PIN008",
                &[("<emulatorpin cpuset='0'/>", "<emulatorpin cpuset='0-1'/>")],
            ),
            (
                "PIN010",
                &[("<model type='virtio'/>", "<model type='e1000'/>")],
            ),
            (
                "PIN011",
                &[(
                    "<driver name='vhost' queues='2'/>",
                    "<driver name='qemu' queues='2'/>",
                )],
            ),
            (
                "PIN012",
                &[(
                    "<driver name='vhost' queues='2'/>",
                    "<driver name='vhost'/>",
                )],
            ),
            ("PIN013", &[("queues='2'", "queues='8'")]),
            ("PIN020", &[("bus='virtio'", "bus='sata'")]),
            (
                "PIN021",
                &[("cache='none' io='native'", "cache='writeback'")],
            ),
            ("PIN022", &[("io='native'", "io='threads'")]),
        ];
        for (id, edits) in cases {
            let mut xml = GOOD.to_string();
            for (from, to) in *edits {
                assert!(xml.contains(from), "{id}: fixture lacks {from}");
                xml = xml.replace(from, to);
            }
            let findings = audit(&good_host(), &[guest(&xml)], None);
            assert_eq!(ids(&findings), vec![*id], "{id}: {findings:#?}");
            let f = &findings[0];
            assert_eq!(f.domain.as_deref(), Some("good"));
            assert!(!f.evidence.is_empty() && !f.fix.is_empty(), "{f:?}");
        }
    }

    #[test]
    fn emulator_on_another_guests_dedicated_cpu_is_an_error() {
        let other = GOOD
            .replace(
                "<name>good</name><uuid>u-good</uuid>",
                "<name>other</name><uuid>u-other</uuid>",
            )
            .replace(
                "cpuset='1'/><vcpupin vcpu='1' cpuset='2'",
                "cpuset='3'/><vcpupin vcpu='1' cpuset='4'",
            )
            .replace("<emulatorpin cpuset='0'/>", "<emulatorpin cpuset='0,2'/>")
            .replace("nodeset='0'", "nodeset='0-1'");
        let findings = audit(&good_host(), &[guest(GOOD), guest(&other)], None);
        let pin008: Vec<&Finding> = findings.iter().filter(|f| f.id == "PIN008").collect();
        assert_eq!(pin008.len(), 1, "{findings:#?}");
        assert_eq!(pin008[0].severity, Severity::Error);
        assert_eq!(pin008[0].domain.as_deref(), Some("other"));
        assert!(
            pin008[0]
                .evidence
                .contains("other guests' dedicated CPUs 2"),
            "{:?}",
            pin008[0]
        );
        assert!(needs_fixing(&findings));

        // Two guests on the same single CPU share it: nobody's dedicated.
        let sharing = |name: &str| {
            GOOD.replace(
                "<name>good</name><uuid>u-good</uuid>",
                &format!("<name>{name}</name><uuid>u-{name}</uuid>"),
            )
            .replace(
                "cpuset='1'/><vcpupin vcpu='1' cpuset='2'",
                "cpuset='1'/><vcpupin vcpu='1' cpuset='1'",
            )
            .replace("<emulatorpin cpuset='0'/>", "<emulatorpin cpuset='1'/>")
        };
        let findings = audit(
            &good_host(),
            &[guest(&sharing("x")), guest(&sharing("y"))],
            None,
        );
        assert!(findings.is_empty(), "{findings:#?}");
    }

    #[test]
    fn steal_above_the_threshold_fires() {
        let mut g = guest(GOOD);
        g.steal_pct = Some(STEAL_THRESHOLD_PCT);
        assert!(audit(&good_host(), &[g.clone()], None).is_empty());
        g.steal_pct = Some(25.0);
        assert_eq!(ids(&audit(&good_host(), &[g], None)), vec!["PIN036"]);
    }

    /// Each host check fires on the good host with one thing wrong.
    #[test]
    fn each_host_check_fires_on_its_fault() {
        type Fault = Box<dyn Fn(&mut Host)>;
        let cases: Vec<(&str, Fault)> = vec![
            ("PIN030", Box::new(|h| h.thp = Some("never".into()))),
            ("PIN031", Box::new(|h| h.ksm_run = Some(1))),
            ("PIN032", Box::new(|h| h.numa_balancing = Some(1))),
            ("PIN033", Box::new(|h| h.processes.push("numad".into()))),
            ("PIN034", Box::new(|h| h.irqbalance_banned = None)),
            (
                "PIN035",
                Box::new(|h| h.topology.isolated = CpuSet::parse("0").unwrap()),
            ),
            (
                "PIN037",
                Box::new(|h| h.nic_irqs = BTreeMap::from([(0, 10), (1, 990)])),
            ),
        ];
        for (id, fault) in cases {
            let mut host = good_host();
            fault(&mut host);
            let findings = audit(&host, &[guest(GOOD)], None);
            assert_eq!(ids(&findings), vec![id], "{id}: {findings:#?}");
            assert_eq!(findings[0].domain, None);
        }
    }

    #[test]
    fn quiet_cases_of_conditional_host_checks() {
        // irqbalance with no dedicated guests, or not running: nothing to ban.
        let mut host = good_host();
        host.irqbalance_banned = None;
        let shared = GOOD.replace(
            "cpuset='1'/><vcpupin vcpu='1' cpuset='2'",
            "cpuset='1-2'/><vcpupin vcpu='1' cpuset='1-2'",
        );
        assert!(audit(&host, &[guest(&shared)], None).is_empty());
        host.processes.retain(|p| p != "irqbalance");
        assert!(audit(&host, &[guest(GOOD)], None).is_empty());
        // Network interrupts all on one CPU that is not busy: fine.
        let mut host = good_host();
        host.nic_irqs = BTreeMap::from([(0, 1000)]);
        assert!(audit(&host, &[guest(GOOD)], None).is_empty());
    }

    #[test]
    fn reads_irqbalance_bans_as_list_or_mask() {
        assert_eq!(
            irqbalance_banned("# x\nIRQBALANCE_BANNED_CPULIST=\"2-3,8\"\n"),
            Some(CpuSet::parse("2-3,8").unwrap())
        );
        assert_eq!(
            irqbalance_banned("IRQBALANCE_BANNED_CPUS=00000001,0000000c\n"),
            Some(CpuSet::parse("2-3,32").unwrap())
        );
        assert_eq!(irqbalance_banned("OPTIONS=\"--foreground\"\n"), None);
    }

    #[test]
    fn samples_softirqs_and_network_interrupts_from_proc() {
        let root = crate::test_support::scratch_dir("doctor-proc");
        std::fs::create_dir_all(root.join("proc")).unwrap();
        std::fs::write(
            root.join("proc/stat"),
            "cpu  1 2 3 4 5 6 7 8 0 0\ncpu0 100 0 100 700 0 0 100 0 0 0\ncpu1 1 0 1 1 0 0 0 0 0 0\n",
        )
        .unwrap();
        std::fs::write(
            root.join("proc/interrupts"),
            "           CPU0       CPU1\n  24:         10          0   PCI-MSI 1-edge      virtio0-config\n  25:       900          3   PCI-MSI 2-edge      virtio0-input.0\n  26:         5          7   PCI-MSI 3-edge      eth1-TxRx-0\n  27:        50         50   PCI-MSI 4-edge      virtio1-req.0\nNMI:          0          0   Non-maskable interrupts\n",
        )
        .unwrap();
        let counters = read_counters(&root);
        assert_eq!(counters.ticks[&0], (100, 1000));
        assert_eq!(counters.nic_irqs, BTreeMap::from([(0, 905), (1, 10)]));
        assert!(is_nic_interrupt("virtio2-output.1") && !is_nic_interrupt("virtio0-config"));
    }
}
