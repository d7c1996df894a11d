//! The engine on real machines (`../shared/topologies`) with realistic guest
//! mixes: many 2-vCPU guests, a few large ones, odd sizes. Expectations are
//! derived from each machine's own topology.

mod common;

use pinner::engine::cpuset::CpuSet;
use pinner::engine::domain::Policy;
use pinner::engine::memory::{MemoryPart, MemoryReserve, PageKind};
use pinner::engine::placement::{plan, Guest, GuestPlan, HostPolicy, Mode, Placement, Plan, Role};
use pinner::engine::topology::{Cpu, Topology};
use std::collections::{BTreeMap, BTreeSet};

fn machine(name: &str) -> Option<Topology> {
    if !common::have_topologies() {
        return None;
    }
    let archive = std::fs::read_dir(common::topologies_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name().unwrap().to_string_lossy().starts_with(name)
                && p.to_string_lossy().ends_with(".tar.bz2")
        })
        .unwrap_or_else(|| panic!("no snapshot {name}"));
    // Tests run in parallel and may read the same machine: each its own copy.
    static COPIES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let copy = COPIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let scratch = std::env::temp_dir().join(format!(
        "pinner-scenario-{name}-{}-{copy}",
        std::process::id()
    ));
    let root = common::extract(&archive, &scratch);
    let topo = pinner::host::sysfs::read_topology(&root).unwrap();
    let _ = std::fs::remove_dir_all(&scratch);
    Some(topo)
}

fn guests(sizes: &[u32]) -> Vec<Guest> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &vcpus)| Guest {
            name: format!("vm{i:03}"),
            uuid: format!("uuid-{i:03}"),
            vcpus,
            cells: vec![],
            memory: vec![],
            memory_nodes: None,
            role: Role::Managed {
                policy: Policy::Auto,
                current: vec![],
            },
        })
        .collect()
}

fn cpus_of(g: &GuestPlan) -> CpuSet {
    g.vcpus.iter().fold(CpuSet::new(), |a, s| a.union(s))
}

fn info(topo: &Topology, cpu: u32) -> &Cpu {
    topo.cpus.iter().find(|c| c.id == cpu).unwrap()
}

/// Every dedicated guest no larger than a node's free share sits in one
/// node, and in one L3 when its node has an L3 domain big enough.
fn assert_local(topo: &Topology, p: &Plan) {
    let l3_size: BTreeMap<Option<u32>, usize> =
        topo.cpus
            .iter()
            .filter(|c| c.online)
            .fold(BTreeMap::new(), |mut m, c| {
                *m.entry(c.l3).or_insert(0) += 1;
                m
            });
    for g in p
        .guests
        .iter()
        .filter(|g| g.placement == Placement::Dedicated)
    {
        let l3s: BTreeSet<_> = cpus_of(g).iter().map(|c| info(topo, c).l3).collect();
        if g.numa_nodes.len() == 1 && l3s.len() > 1 {
            let biggest = l3_size.values().max().copied().unwrap_or(0);
            assert!(
                g.vcpus.len() > biggest,
                "{} spans L3s {l3s:?} though one has {biggest} CPUs",
                g.name
            );
        }
    }
}

/// Cores whose online threads went to more than one guest.
fn split_cores(topo: &Topology, p: &Plan) -> usize {
    let mut owners: BTreeMap<u32, BTreeSet<&str>> = BTreeMap::new();
    for g in p
        .guests
        .iter()
        .filter(|g| g.placement == Placement::Dedicated)
    {
        for cpu in cpus_of(g).iter() {
            owners
                .entry(info(topo, cpu).core.unwrap())
                .or_default()
                .insert(&g.name);
        }
    }
    owners.values().filter(|o| o.len() > 1).count()
}

#[test]
fn amd_8_nodes_many_small_guests_and_a_large_one() {
    let Some(topo) = machine("64amd64-4s2n4ca2co") else {
        return;
    };
    // One CPU per package reserved; 12 × 2, one 16, odd 3 and 5 vCPUs.
    let reserved = CpuSet::parse("0,16,32,48").unwrap();
    let mut sizes = vec![2; 12];
    sizes.extend([16, 3, 5]);
    let p = plan(&topo, &HostPolicy::with_reserved(reserved), &guests(&sizes));
    assert_eq!(p.mode, Mode::Dedicated);
    assert_local(&topo, &p);
    let node_size = topo.numa_nodes[0].cpus.len();
    for g in &p.guests {
        if g.vcpus.len() < node_size {
            assert_eq!(
                g.numa_nodes.len(),
                1,
                "{} ({} vCPUs) should fit one node: {:?}",
                g.name,
                g.vcpus.len(),
                g.numa_nodes
            );
        }
        assert_eq!(g.memory_nodes.as_ref(), Some(&g.numa_nodes));
    }
    let big = p.guests.iter().find(|g| g.vcpus.len() == 16).unwrap();
    assert_eq!(
        big.numa_nodes.len(),
        2,
        "16 vCPUs on 8-CPU nodes: the fewest nodes"
    );
    let d = topo.distance(big.numa_nodes[0], big.numa_nodes[1]);
    let closest = topo
        .numa_nodes
        .iter()
        .flat_map(|a| topo.numa_nodes.iter().map(move |b| (a.id, b.id)))
        .filter(|(a, b)| a != b)
        .map(|(a, b)| topo.distance(a, b))
        .min()
        .unwrap();
    assert_eq!(
        d, closest,
        "{}: spans nodes at distance {d}, closest pair is {closest}",
        big.reason
    );
}

#[test]
fn intel_smt_guests_take_whole_cores() {
    let Some(topo) = machine("32intel64-2p8co2t+8ve") else {
        return;
    };
    let mut sizes = vec![2; 8];
    sizes.extend([4, 4, 3, 1]);
    let p = plan(
        &topo,
        &HostPolicy::with_reserved(CpuSet::parse("0,16").unwrap()),
        &guests(&sizes),
    );
    assert_eq!(p.mode, Mode::Dedicated);
    assert_local(&topo, &p);
    for g in p.guests.iter().filter(|g| g.vcpus.len() % 2 == 0) {
        for cpu in cpus_of(g).iter() {
            let siblings = &info(&topo, cpu).smt_siblings;
            let whole = siblings
                .iter()
                .all(|s| cpus_of(g).contains(*s) || p.reserved.contains(*s));
            assert!(
                whole,
                "{} holds half of core {siblings:?}: {}",
                g.name,
                cpus_of(g)
            );
        }
    }
    // The reserved CPUs break two cores; the odd guests (3 and 1) complete
    // them or each other: no other core is shared.
    let odd = sizes.iter().filter(|s| *s % 2 == 1).count();
    assert!(
        split_cores(&topo, &p) <= odd,
        "split cores {}",
        split_cores(&topo, &p)
    );
}

#[test]
fn hybrid_guests_never_mix_core_kinds() {
    let Some(topo) = machine("20em64t-hybrid") else {
        return;
    };
    let p = plan(
        &topo,
        &HostPolicy::with_reserved(CpuSet::new()),
        &guests(&[4, 4, 2, 3, 2]),
    );
    assert_eq!(p.mode, Mode::Dedicated);
    for g in &p.guests {
        let kinds: BTreeSet<_> = cpus_of(g).iter().map(|c| info(&topo, c).kind).collect();
        assert_eq!(kinds.len(), 1, "{} mixes kinds: {}", g.name, cpus_of(g));
    }
    // Largest guests first, on performance cores first.
    let first = p.guests.iter().find(|g| g.name == "vm000").unwrap();
    assert!(first.reason.contains("performance"), "{}", first.reason);
}

#[test]
fn arm_128_cores_large_guests_fill_nodes() {
    let Some(topo) = machine("128arm-2pa2n8cluster4co") else {
        return;
    };
    let mut sizes = vec![30, 30, 30];
    sizes.extend(vec![2; 15]);
    let p = plan(
        &topo,
        &HostPolicy::with_reserved(CpuSet::parse("0-1").unwrap()),
        &guests(&sizes),
    );
    assert_eq!(p.mode, Mode::Dedicated);
    assert_local(&topo, &p);
    for g in &p.guests {
        assert_eq!(g.numa_nodes.len(), 1, "{}: {:?}", g.name, g.numa_nodes);
    }
    let big_nodes: BTreeSet<_> = p
        .guests
        .iter()
        .filter(|g| g.vcpus.len() == 30)
        .map(|g| g.numa_nodes[0])
        .collect();
    assert_eq!(
        big_nodes.len(),
        3,
        "each 30-vCPU guest gets a node of its own"
    );
}

#[test]
fn offline_cpus_and_missing_node() {
    let Some(topo) = machine("offline-cpu0-node0") else {
        return;
    };
    let p = plan(
        &topo,
        &HostPolicy::with_reserved(CpuSet::new()),
        &guests(&[2, 2, 4]),
    );
    for g in &p.guests {
        assert!(
            cpus_of(g).is_subset(&topo.online),
            "{}: offline CPU used",
            g.name
        );
        let nodeless = cpus_of(g)
            .iter()
            .any(|c| info(&topo, c).numa_node.is_none());
        assert_eq!(
            g.memory_nodes.is_none(),
            nodeless,
            "{}: memory left alone exactly when a CPU has no node",
            g.name
        );
    }
}

#[test]
fn overcommitted_opterons_share_node_ranges_evenly() {
    let Some(topo) = machine("16amd64-8n2c") else {
        return;
    };
    // 2 CPUs per node; 14 × 2-vCPU guests on 15 pool CPUs.
    let p = plan(
        &topo,
        &HostPolicy::with_reserved(CpuSet::parse("0").unwrap()),
        &guests(&[2; 14]),
    );
    assert_eq!(p.mode, Mode::Shared);
    let mut load: BTreeMap<String, usize> = BTreeMap::new();
    for g in &p.guests {
        assert_eq!(
            g.numa_nodes.len(),
            1,
            "{} range-bound within one node",
            g.name
        );
        *load.entry(g.vcpus[0].to_string()).or_insert(0) += g.vcpus.len();
    }
    let per_cpu: Vec<f64> = load
        .iter()
        .map(|(r, v)| *v as f64 / CpuSet::parse(r).unwrap().len() as f64)
        .collect();
    let spread = per_cpu.iter().cloned().fold(f64::MIN, f64::max)
        - per_cpu.iter().cloned().fold(f64::MAX, f64::min);
    assert!(spread <= 1.0, "loads per pCPU {load:?}");
    assert!(p
        .warnings
        .iter()
        .any(|w| w.to_string().contains("overcommitted")));
}

/// `plan --map` and `--map=svg` on a snapshot: the expected drawings are
/// in `tests/maps/`
/// (PINNER_BLESS=1 rewrites it after a deliberate change; review the diff).
fn assert_map(name: &str, reserved: &str, sizes: &[u32]) {
    use pinner::cli::map::{render_as, MapFormat, Occupancy};
    let Some(topo) = machine(name) else {
        return;
    };
    let reserved = CpuSet::parse(reserved).unwrap();
    let p = plan(&topo, &HostPolicy::with_reserved(reserved), &guests(sizes));
    let occupancy = Occupancy::of_plan(&p, &[]);
    for (format, ext) in [(MapFormat::Text, "txt"), (MapFormat::Svg, "svg")] {
        let drawn = render_as(format, &topo, &occupancy, false);
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("tests/maps/{name}.{ext}"));
        if std::env::var_os("PINNER_BLESS").is_some() {
            std::fs::write(&path, &drawn).unwrap();
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(
            drawn,
            expected,
            "map of {name} differs from {}",
            path.display()
        );
    }
}

#[test]
fn map_of_an_8_node_amd_host() {
    assert_map("16amd64-8n2c", "0", &[2, 2, 2, 4, 3]);
}

#[test]
fn map_of_a_256_cpu_power_host_stays_readable() {
    let mut sizes = vec![4; 20];
    sizes.extend([32, 16, 8, 2]);
    assert_map("256ppc-8n8s4t", "0-3", &sizes);
    if let Some(line) = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/maps/256ppc-8n8s4t.txt"),
    )
    .unwrap()
    .lines()
    .map(str::len)
    .max()
    {
        assert!(line <= 120, "a map line of {line} characters");
    }
}

/// `g`'s cells, each as the set of host nodes its CPUs are on.
fn cell_nodes(topo: &Topology, g: &GuestPlan, cells: &[CpuSet]) -> Vec<BTreeSet<u32>> {
    cells
        .iter()
        .map(|cell| {
            cell.iter()
                .flat_map(|v| g.vcpus[v as usize].iter())
                .filter_map(|cpu| info(topo, cpu).numa_node)
                .collect()
        })
        .collect()
}

/// A guest of `cells` cells of `size` vCPUs each, interleaved (vCPU v in
/// cell v mod cells), so that placing vCPUs in order without regard to
/// cells would split every cell.
fn celled(name: &str, cells: u32, size: u32) -> Guest {
    let mut g = guests(&[cells * size]).remove(0);
    g.name = name.into();
    g.uuid = name.into();
    g.cells = (0..cells)
        .map(|c| (0..cells * size).filter(|v| v % cells == c).collect())
        .collect();
    g
}

/// Every cell in one node, no two cells of a guest on one node; returns
/// the guest's nodes.
fn assert_cells_node_aligned(topo: &Topology, g: &GuestPlan, cells: &[CpuSet]) -> Vec<u32> {
    let nodes = cell_nodes(topo, g, cells);
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(
            n.len(),
            1,
            "{}: cell {i} split over {n:?}: {}",
            g.name,
            g.reason
        );
    }
    let flat: Vec<u32> = nodes.iter().flatten().copied().collect();
    let distinct: BTreeSet<u32> = flat.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        flat.len(),
        "{}: two cells share a node: {}",
        g.name,
        g.reason
    );
    flat
}

fn total_distance(topo: &Topology, nodes: &[u32]) -> u32 {
    let mut sum = 0;
    for (i, a) in nodes.iter().enumerate() {
        for b in &nodes[i + 1..] {
            sum += topo.distance(*a, *b);
        }
    }
    sum
}

/// The least total distance of any `k` distinct nodes.
fn closest_set(topo: &Topology, k: usize) -> u32 {
    let ids: Vec<u32> = topo.numa_nodes.iter().map(|n| n.id).collect();
    let mut best = u32::MAX;
    for mask in 0u32..(1 << ids.len()) {
        if mask.count_ones() as usize == k {
            let chosen: Vec<u32> = (0..ids.len())
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| ids[i])
                .collect();
            best = best.min(total_distance(topo, &chosen));
        }
    }
    best
}

#[test]
fn cells_on_the_closest_distinct_nodes_of_an_8_node_amd_host() {
    let Some(topo) = machine("64amd64-4s2n4ca2co") else {
        return;
    };
    // A 2-cell and a 4-cell guest of whole-node and half-node cells, beside
    // small guests without cells.
    let two = celled("a-two", 2, 8);
    let four = celled("b-four", 4, 4);
    let mut all = vec![two.clone(), four.clone()];
    all.extend(guests(&[2; 6]));
    let p = plan(&topo, &HostPolicy::with_reserved(CpuSet::new()), &all);
    assert_eq!(p.mode, Mode::Dedicated);
    let plan_of = |name: &str| p.guests.iter().find(|g| g.name == name).unwrap();
    let nodes = assert_cells_node_aligned(&topo, plan_of("a-two"), &two.cells);
    assert_eq!(
        total_distance(&topo, &nodes),
        closest_set(&topo, 2),
        "{}",
        plan_of("a-two").reason
    );
    assert_cells_node_aligned(&topo, plan_of("b-four"), &four.cells);
    assert_eq!(plan_of("b-four").cells.len(), 4);
    for g in &p.guests {
        assert_eq!(g.memory_nodes.as_ref(), Some(&g.numa_nodes));
    }
}

#[test]
fn four_cells_on_a_16_cpu_8_node_host_take_the_closest_four_nodes() {
    let Some(topo) = machine("16amd64-8n2c") else {
        return;
    };
    let g = celled("wide", 4, 2);
    let p = plan(
        &topo,
        &HostPolicy::with_reserved(CpuSet::new()),
        std::slice::from_ref(&g),
    );
    let nodes = assert_cells_node_aligned(&topo, &p.guests[0], &g.cells);
    assert_eq!(
        total_distance(&topo, &nodes),
        closest_set(&topo, 4),
        "{}",
        p.guests[0].reason
    );
    // Settled and planned again: no cell moves.
    let mut settled = g.clone();
    settled.role = Role::Managed {
        policy: Policy::Auto,
        current: p.guests[0].vcpus.iter().cloned().map(Some).collect(),
    };
    let again = plan(&topo, &HostPolicy::with_reserved(CpuSet::new()), &[settled]);
    assert_eq!(again.pins_moved, 0, "{}", again.guests[0].reason);
}

// ---------------------------------------------------------------- memory

const GIB: u64 = 1 << 20;

/// Guests of (vCPUs, GiB, page kind), named vm000….
fn with_memory(specs: &[(u32, u64, PageKind)]) -> Vec<Guest> {
    let sizes: Vec<u32> = specs.iter().map(|s| s.0).collect();
    guests(&sizes)
        .into_iter()
        .zip(specs)
        .map(|(g, &(_, gib, kind))| Guest {
            memory: vec![vec![MemoryPart {
                kib: gib * GIB,
                kind,
            }]],
            ..g
        })
        .collect()
}

/// The host's default reserve (512 MiB a node), as the daemon runs.
fn default_host(reserved: &str) -> HostPolicy {
    let mut host = HostPolicy::with_reserved(CpuSet::parse(reserved).unwrap());
    host.memory_reserve = MemoryReserve {
        normal_kib_per_node: 512 * 1024,
        huge_pages: Default::default(),
    };
    host
}

/// No pool of any node holds more than its room.
fn assert_within_capacity(p: &Plan) {
    for pool in &p.memory {
        if let Some(room) = pool.capacity_kib {
            assert!(
                pool.committed_kib <= room,
                "node {} {:?}: {} KiB on {room}",
                pool.node,
                pool.kind,
                pool.committed_kib
            );
        }
    }
}

#[test]
fn amd_8_nodes_memory_bounds_what_cpus_alone_overfilled() {
    let Some(topo) = machine("64amd64-4s2n4ca2co") else {
        return;
    };
    // The cases: two 4-vCPU guests of 48 GiB and nine 1-vCPU
    // guests of 7 GiB on eight 16 GiB nodes (node 5: 8 GiB). By CPUs
    // alone both large ones and eight small ones went to node 0.
    let large = plan(
        &topo,
        &default_host(""),
        &with_memory(&[(4, 48, PageKind::Normal); 2]),
    );
    let small = plan(
        &topo,
        &default_host(""),
        &with_memory(&[(1, 7, PageKind::Normal); 9]),
    );
    for p in [&large, &small] {
        assert_within_capacity(p);
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    }
    for g in large.guests.iter().chain(&small.guests) {
        let bound: Vec<u32> = g.memory.iter().map(|(node, _, _)| *node).collect();
        if g.vcpus.len() == 4 {
            assert!(g.numa_nodes.len() >= 2, "{}: {}", g.name, g.reason);
            assert!(
                g.reason.contains("48 GiB fits no single node"),
                "{}",
                g.reason
            );
            assert!(
                bound.len() >= 4,
                "48 GiB needs four 15.5 GiB nodes: {bound:?}"
            );
        } else {
            assert_eq!(g.numa_nodes.len(), 1, "{}: {}", g.name, g.reason);
            assert_eq!(bound, g.numa_nodes, "{}", g.name);
            assert!(g.reason.contains("left)"), "{}", g.reason);
        }
        let nodes: Vec<u32> = g.memory_nodes.clone().unwrap();
        assert!(
            bound.iter().all(|n| nodes.contains(n)),
            "{}: bound to {nodes:?}",
            g.name
        );
    }
}

#[test]
fn intel_hugepage_guests_follow_their_pools() {
    let Some(mut topo) = machine("32intel64-2p8co2t+8ve") else {
        return;
    };
    // The snapshot's pools: 2048 2M pages (4 GiB) on each node. Here node
    // 0's pool is given back, so its pages are on node 1 only.
    topo.numa_nodes[0].hugepages[0].total = 0;
    let two_meg = PageKind::Huge(2048);
    let specs = [(2, 2, two_meg), (2, 1, two_meg), (2, 4, PageKind::Normal)];
    let p = plan(&topo, &default_host("0,16"), &with_memory(&specs));
    assert_within_capacity(&p);
    for name in ["vm000", "vm001"] {
        let g = p.guests.iter().find(|g| g.name == name).unwrap();
        assert_eq!(g.numa_nodes, vec![1], "{name}: {}", g.reason);
        assert!(g
            .memory
            .iter()
            .all(|(n, kind, _)| *n == 1 && *kind == two_meg));
    }
    // A third guest's pages fit the pool no more: unbound, said so.
    let specs = [(2, 2, two_meg), (2, 2, two_meg), (1, 1, two_meg)];
    let p = plan(&topo, &default_host("0,16"), &with_memory(&specs));
    assert_within_capacity(&p);
    let last = p.guests.iter().find(|g| g.name == "vm002").unwrap();
    assert_eq!(last.memory_nodes, None, "{}", last.reason);
    assert!(p
        .warnings
        .iter()
        .any(|w| w.to_string() == "vm002: memory not bound: 1 GiB fits no set of nodes"));
}

#[test]
fn intel_a_pool_taking_most_of_a_node_leaves_normal_guests_the_other() {
    let Some(mut topo) = machine("32intel64-2p8co2t+8ve") else {
        return;
    };
    // 21,000 2M pages (41 GiB) on node 0: its normal memory is ~4.6 GiB.
    topo.numa_nodes[0].hugepages[0].total = 21_000;
    topo.numa_nodes[1].hugepages[0].total = 0;
    let specs = vec![(2, 8, PageKind::Normal); 4];
    let p = plan(&topo, &default_host(""), &with_memory(&specs));
    assert_within_capacity(&p);
    for g in &p.guests {
        assert_eq!(g.numa_nodes, vec![1], "{}: {}", g.name, g.reason);
    }
    // A hugepage guest still goes to node 0, where its pages are.
    let p = plan(
        &topo,
        &default_host(""),
        &with_memory(&[(2, 16, PageKind::Huge(2048))]),
    );
    assert_eq!(p.guests[0].numa_nodes, vec![0], "{}", p.guests[0].reason);
}
