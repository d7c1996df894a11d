//! Checks of guests' memory against the nodes: bindings the nodes cannot
//! hold (whoever set them), and hugepage pools no guest can use well.

use super::facts::{Guest, Host};
use super::{finding, ids, Finding, Severity};
use crate::engine::memory::{
    by_kind, human, page_size_label, place_bound, Ledger, MemoryPart, PageKind,
};

/// PIN040 and PIN041 for `guests` (`only`: the one guest reported on; the
/// others still take their memory).
pub fn check(host: &Host, guests: &[Guest], only: Option<&str>, out: &mut Vec<Finding>) {
    beyond_nodes(host, guests, only, out);
    if only.is_none() {
        unused_pools(host, guests, out);
    }
}

/// A guest's memory by kind, as the host backs it.
fn parts(host: &Host, g: &Guest) -> Vec<MemoryPart> {
    let cells = g.spec.memory_by_cell(host.topology.default_hugepage_kib);
    by_kind(&cells.concat()).into_owned()
}

/// PIN040: guests bound to nodes whose memory cannot hold them beside the
/// other guests bound there (the largest counted first, those on one node
/// before those on several, which spread as room allows).
fn beyond_nodes(host: &Host, guests: &[Guest], only: Option<&str>, out: &mut Vec<Finding>) {
    let mut bound: Vec<(&Guest, Vec<u32>, Vec<MemoryPart>)> = guests
        .iter()
        .filter_map(|g| {
            let nodes = g.spec.memory_nodes.as_ref()?.to_vec();
            let parts = parts(host, g);
            (!parts.is_empty()).then_some((g, nodes, parts))
        })
        .collect();
    bound.sort_by(|(a, _, pa), (b, _, pb)| {
        let kib = |parts: &[MemoryPart]| parts.iter().map(|p| p.kib).sum::<u64>();
        kib(pb).cmp(&kib(pa)).then_with(|| a.name().cmp(b.name()))
    });
    let mut ledger = Ledger::new(&host.topology, &host.memory_reserve);
    let homes: Vec<(&[u32], &[MemoryPart])> = bound
        .iter()
        .map(|(_, n, p)| (n.as_slice(), p.as_slice()))
        .collect();
    let placed = place_bound(&mut ledger, &homes);
    let empty = Ledger::new(&host.topology, &host.memory_reserve);
    for ((g, nodes, parts), claim) in bound.iter().zip(placed) {
        if claim.is_some() || only.is_some_and(|n| n != g.name()) {
            continue;
        }
        let room: u64 = nodes
            .iter()
            .filter_map(|&n| empty.room(n, parts[0].kind))
            .sum();
        let kind = match parts[0].kind {
            PageKind::Normal => String::new(),
            PageKind::Huge(kib) => format!(" of {} pages", page_size_label(kib)),
        };
        let set = crate::engine::cpuset::CpuSet::from_iter(nodes.iter().copied());
        out.push(finding(
            ids::MEMORY_BEYOND_NODES,
            Severity::Error,
            Some(g.name()),
            "memory bound to nodes that cannot hold it",
            format!(
                "{} bound to node {set} (mode {}); the node has {}{kind} for guests (MemTotal less hugepage pools and the host's reserve), and the guests bound there hold it already: the kernel reclaims, swaps or OOM-kills inside this binding",
                human(parts.iter().map(|p| p.kib).sum()),
                g.spec.memory_mode.as_deref().unwrap_or("strict"),
                human(room),
            ),
            format!(
                "let pinner place it (`pinner plan` shows where its memory fits), or widen the binding: `virsh numatune {} --live --nodeset <nodes that hold it>` (mode restrictive moves live)",
                g.name()
            ),
        ));
    }
}

/// PIN041: hugepage pools on nodes with no CPU for guests (a guest backed
/// by them reads all its memory remotely), and free pages of a size no
/// running guest is backed by (memory taken from normal use).
fn unused_pools(host: &Host, guests: &[Guest], out: &mut Vec<Finding>) {
    let used: Vec<PageKind> = guests
        .iter()
        .flat_map(|g| parts(host, g))
        .map(|p| p.kind)
        .collect();
    for node in &host.topology.numa_nodes {
        let guest_cpus = host.pool.as_ref().map_or(!node.cpus.is_empty(), |pool| {
            !node.cpus.intersection(pool).is_empty()
        });
        for pool in node.hugepages.iter().filter(|p| p.total > 0) {
            let kept = host
                .memory_reserve
                .huge_pages
                .get(&(node.id, pool.size_kib))
                .copied()
                .unwrap_or(0);
            let size = page_size_label(pool.size_kib);
            let path = format!(
                "/sys/devices/system/node/node{}/hugepages/hugepages-{}kB/nr_hugepages",
                node.id, pool.size_kib
            );
            if !guest_cpus {
                out.push(finding(
                    ids::UNUSED_HUGEPAGES,
                    Severity::Warning,
                    None,
                    "hugepage pool on a node with no CPU for guests",
                    format!("node {}: {} {size} pages, and none of its CPUs in pinner's pool: a guest backed by them runs its vCPUs on another node", node.id, pool.total),
                    format!("move the pool to a node with guest CPUs (`echo 0 > {path}`, then the same file of that node), or give this node's CPUs to guests"),
                ));
            } else if !used.contains(&PageKind::Huge(pool.size_kib)) && pool.free > kept {
                let spare = pool.free - kept;
                out.push(finding(
                    ids::UNUSED_HUGEPAGES,
                    Severity::Info,
                    None,
                    "hugepages no running guest uses",
                    format!("node {}: {spare} free {size} pages ({}) and no running guest backed by {size} pages: that memory is kept from every other use", node.id, human(spare * pool.size_kib)),
                    format!("start the guests they are for (<memoryBacking><hugepages><page size='{}' unit='KiB'/></hugepages>), or shrink the pool: `echo {} > {path}`", pool.size_kib, pool.total - spare),
                ));
            }
        }
    }
}
