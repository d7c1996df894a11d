//! Checks of one guest, each a small function over the facts; their
//! findings' ids are the constants in `super::ids`.

use super::facts::{cores_per_package, Guest, Host};
use super::{finding, ids, join, Finding, Severity, STEAL_THRESHOLD_PCT};
use crate::engine::cpuset::CpuSet;
use std::collections::BTreeMap;

/// The kernel's limit on tap queues per device (MAX_TAP_QUEUES).
const TAP_QUEUE_LIMIT: u32 = 256;

/// What a guest check looks at.
pub struct GuestFacts<'a> {
    pub host: &'a Host,
    pub guest: &'a Guest,
    /// Per guest UUID, its dedicated CPUs (see `facts::dedicated_cpus`).
    pub dedicated: &'a BTreeMap<&'a str, CpuSet>,
}

type GuestCheck = fn(&GuestFacts, &mut Vec<Finding>);

/// Every guest check, in the order their findings are listed.
pub const CHECKS: &[GuestCheck] = &[
    cpu_model, sockets, numa_cells, l3, unpinned, nodes, emulator, nics, disks, steal,
];

/// PIN001: a CPU model that hides the host's features.
fn cpu_model(c: &GuestFacts, out: &mut Vec<Finding>) {
    let g = c.guest;
    let name = Some(g.name());
    match g.cpu_mode.as_deref() {
        Some("host-passthrough" | "host-model" | "maximum") => {}
        mode => out.push(finding(
            ids::CPU_MODEL,
            Severity::Warning,
            name,
            "guest CPU model hides the host's features",
            format!("<cpu mode='{}'>", mode.unwrap_or("(none: qemu's default model)")),
            "<cpu mode='host-passthrough' check='none' migratable='on'/> (host-model where guests migrate between different CPUs)",
        )),
    }
}

/// PIN002: many single-core sockets where the host has multi-core packages.
fn sockets(c: &GuestFacts, out: &mut Vec<Finding>) {
    let g = c.guest;
    let name = Some(g.name());
    let topo = &c.host.topology;
    let host_cores_per_package = cores_per_package(topo);
    let vcpus = g.spec.vcpus;
    let (sockets, cores, threads) = g.topology.unwrap_or((vcpus.max(1), 1, 1));
    if vcpus > 1 && sockets > 1 && cores == 1 && host_cores_per_package > 1 {
        let evidence = match g.topology {
            Some(_) => format!("<topology sockets='{sockets}' cores='1' threads='{threads}'/>"),
            None => format!("no <topology>: libvirt starts qemu with {vcpus} sockets of 1 core"),
        };
        out.push(finding(
            ids::SINGLE_CORE_SOCKETS,
            Severity::Warning,
            name,
            "guest sees many single-core sockets",
            evidence,
            format!("<cpu …><topology sockets='1' dies='1' cores='{vcpus}' threads='1'/></cpu> (the guest scheduler then balances within a package, as on the host)"),
        ));
    }
}

/// PIN003: a guest larger than a host node without NUMA cells.
fn numa_cells(c: &GuestFacts, out: &mut Vec<Finding>) {
    let g = c.guest;
    let name = Some(g.name());
    let topo = &c.host.topology;
    let vcpus = g.spec.vcpus;
    let biggest_node = topo
        .numa_nodes
        .iter()
        .map(|n| (n.cpus.len() as u32, n.memory_mib.unwrap_or(u64::MAX)))
        .max();
    if let Some((node_cpus, node_mib)) = biggest_node {
        let too_big = vcpus > node_cpus || g.spec.memory_kib / 1024 > node_mib;
        if topo.numa_nodes.len() > 1 && too_big && g.numa_cells == 0 {
            out.push(finding(
                ids::NO_NUMA_CELLS,
                Severity::Warning,
                name,
                "guest larger than a host NUMA node has no NUMA cells",
                format!(
                    "{vcpus} vCPUs, {} MiB; the largest host node has {node_cpus} CPUs{}",
                    g.spec.memory_kib / 1024,
                    if node_mib == u64::MAX { String::new() } else { format!(", {node_mib} MiB") }
                ),
                "<cpu …><numa><cell id='0' cpus='0-(N/2-1)' memory='M/2' unit='KiB'/><cell id='1' cpus='N/2-(N-1)' memory='M/2' unit='KiB'/></numa></cpu>, matching the host nodes it is pinned to",
            ));
        }
    }
}

/// PIN004: L3 sharing hidden from the guest.
fn l3(c: &GuestFacts, out: &mut Vec<Finding>) {
    let g = c.guest;
    let name = Some(g.name());
    let vcpus = g.spec.vcpus;
    let l3_visible = match (&g.cache, g.cpu_mode.as_deref()) {
        (Some((mode, _)), _) if mode == "passthrough" => true,
        (Some((mode, Some(3))), _) if mode == "emulate" => true,
        (Some((mode, _)), _) if mode == "disable" => false,
        (None, Some("host-passthrough")) => true,
        _ => false,
    };
    if vcpus > 1 && !l3_visible {
        out.push(finding(
            ids::L3_HIDDEN,
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
}

/// PIN005: vCPUs that may run anywhere.
fn unpinned(c: &GuestFacts, out: &mut Vec<Finding>) {
    let g = c.guest;
    let name = Some(g.name());
    let vcpus = g.spec.vcpus;
    let managed_elsewhere = g.spec.auto_placement;
    let unpinned: Vec<u32> = (0..vcpus)
        .filter(|v| g.spec.vcpu_pin(*v).is_none())
        .collect();
    if !unpinned.is_empty() && !managed_elsewhere {
        out.push(finding(
            ids::UNPINNED,
            Severity::Warning,
            name,
            "vCPUs may run on any host CPU",
            format!("vCPUs {} have no <vcpupin> and <vcpu> no cpuset", join(&unpinned)),
            "let pinner place the guest (is the daemon running? `pinner status`), or <cputune><vcpupin vcpu='0' cpuset='…'/>…</cputune>",
        ));
    }
}

/// PIN006, PIN007: vCPUs across nodes, memory off their nodes.
fn nodes(c: &GuestFacts, out: &mut Vec<Finding>) {
    let g = c.guest;
    let name = Some(g.name());
    let topo = &c.host.topology;
    let vcpus = g.spec.vcpus;
    if let Some(sets) = g.vcpu_cpus() {
        let cpus: CpuSet = sets.iter().flat_map(|s| s.iter()).collect();
        let nodes = topo.nodes_of(&cpus);
        let fits_one_node = topo.numa_nodes.iter().any(|n| n.cpus.len() as u32 >= vcpus);
        if nodes.len() > 1 && fits_one_node {
            out.push(finding(
                ids::ACROSS_NODES,
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
                ids::MEMORY_UNBOUND,
                Severity::Warning,
                name,
                "memory not bound to the vCPUs' NUMA nodes",
                format!(
                    "vCPUs on nodes {node_list}; memory {}",
                    bound.map_or("not bound (no <numatune>)".into(), |b| format!("on nodes {}", join(&b)))
                ),
                format!("let pinner place it; or <numatune><memory mode='restrictive' nodeset='{node_list}'/></numatune> (restrictive: the one mode libvirt lets follow the vCPUs when they move), live: virsh numatune {} --nodeset {node_list} --live", g.name()),
            ));
        }
    }
}

/// PIN008: emulator threads on dedicated CPUs.
fn emulator(c: &GuestFacts, out: &mut Vec<Finding>) {
    let g = c.guest;
    let name = Some(g.name());
    let topo = &c.host.topology;
    let dedicated = c.dedicated;
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
            ids::EMULATOR_ON_DEDICATED,
            severity,
            name,
            "emulator threads share dedicated vCPUs' CPUs",
            format!(
                "emulator threads may run on CPUs {emulator}, including {whose}"
            ),
            format!("<cputune><emulatorpin cpuset='RESERVED'/></cputune>; live: virsh emulatorpin {} RESERVED --live (pinner does this with reserved_cpus set and emulator_threads = \"housekeeping\")", g.name()),
        ));
    }
}

/// PIN010-PIN013: emulated NICs, no vhost, too few or too many queues.
fn nics(c: &GuestFacts, out: &mut Vec<Finding>) {
    let g = c.guest;
    let name = Some(g.name());
    let vcpus = g.spec.vcpus;
    for nic in &g.nics {
        let model = nic.model.as_deref().unwrap_or("(default: rtl8139)");
        if model != "virtio" && !model.starts_with("virtio-") {
            out.push(finding(
                ids::EMULATED_NIC,
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
                ids::NO_VHOST,
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
                ids::ONE_QUEUE,
                Severity::Info,
                name,
                "one network queue for several vCPUs",
                format!("{}: {queues} queue, {vcpus} vCPUs: one vCPU takes every packet's interrupt", nic.id),
                format!("<driver name='vhost' queues='{wanted}'/> (at most the vCPUs, and the host's {TAP_QUEUE_LIMIT} tap queues; it takes {} MSI-X vectors), then in the guest: ethtool -L eth0 combined {wanted}", 2 * wanted + 2),
            ));
        } else if queues > vcpus {
            out.push(finding(
                ids::TOO_MANY_QUEUES,
                Severity::Warning,
                name,
                "more network queues than vCPUs",
                format!("{}: {queues} queues, {vcpus} vCPUs: {} MSI-X vectors for queues no vCPU can serve alone", nic.id, 2 * queues + 2),
                format!("<driver name='vhost' queues='{wanted}'/>"),
            ));
        }
    }
}

/// PIN020-PIN022: emulated disk buses, the page cache, thread-pool I/O.
fn disks(c: &GuestFacts, out: &mut Vec<Finding>) {
    let g = c.guest;
    let name = Some(g.name());
    let virtio_scsi = g.scsi_models.iter().any(|m| m == "virtio-scsi");
    for disk in g.disks.iter().filter(|d| d.device == "disk") {
        let bus = disk.bus.as_deref().unwrap_or("(default)");
        if bus != "virtio" && !(bus == "scsi" && virtio_scsi) {
            out.push(finding(
                ids::EMULATED_DISK,
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
                ids::PAGE_CACHE,
                Severity::Warning,
                name,
                "disk goes through the host's page cache",
                format!("{}: cache='{cache}'", disk.target),
                "<driver name='qemu' type='raw' cache='none' io='native'/>",
            ));
        } else if !matches!(disk.io.as_deref(), Some("native" | "io_uring")) {
            out.push(finding(
                ids::THREAD_POOL_IO,
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
}

/// PIN036: steal above the threshold.
fn steal(c: &GuestFacts, out: &mut Vec<Finding>) {
    let g = c.guest;
    let name = Some(g.name());
    if let Some(steal) = g.steal_pct.filter(|s| *s > STEAL_THRESHOLD_PCT) {
        out.push(finding(
            ids::STEAL,
            Severity::Warning,
            name,
            "vCPUs wait for host CPUs (steal)",
            format!("{steal:.1}% of each vCPU's time waiting on a run queue (threshold {STEAL_THRESHOLD_PCT}%)"),
            "give it dedicated CPUs (<pinner:state policy='dedicated'/> in its metadata), lower cpu_allocation_ratio, or move guests off this host; `pinner status` shows who shares its CPUs",
        ));
    }
}
