//! Placement time at scale: 2,048 CPUs (16 NUMA nodes × 2 L3 × 32 cores ×
//! 2 threads, 64 GiB each) and 1,000 guests, from scratch and incrementally
//! (one guest added to a settled host), in dedicated and in overcommitted
//! (shared) mode, with every guest's memory accounted: the mixes fill the
//! nodes' memory to ~98%, so memory decides where guests go as much as
//! CPUs do. Targets: incremental under 1 ms, from scratch under 20 ms.
//! First it prints the pins moved by a guest cycling at the capacity line,
//! with and without the hysteresis. Then a rebalancing decision over the
//! 1,000 shared guests settled, with uneven demand (target under 5 ms):
//! what a pass adds when an observation is new.
//!
//!     cargo bench -p pinner --bench placement

use criterion::{criterion_group, criterion_main, Criterion};
use pinner::engine::cpuset::CpuSet;
use pinner::engine::domain::Policy;
use pinner::engine::memory::{MemoryPart, PageKind};
use pinner::engine::placement::{host_load, plan, plan_loaded, Guest, HostPolicy, Load, Role};
use pinner::engine::rebalance::{Rebalancer, Rules};
use pinner::engine::topology::Topology;
use std::hint::black_box;

/// `count` guests of `sizes` vCPUs, each with `mib_per_vcpu` MiB a vCPU.
fn guests(count: usize, sizes: &[u32], mib_per_vcpu: u64) -> Vec<Guest> {
    (0..count)
        .map(|i| Guest {
            name: format!("instance-{i:08x}"),
            uuid: format!("00000000-0000-0000-0000-{i:012}"),
            vcpus: sizes[i % sizes.len()],
            cells: vec![],
            memory: vec![vec![MemoryPart {
                kib: u64::from(sizes[i % sizes.len()]) * mib_per_vcpu * 1024,
                kind: PageKind::Normal,
            }]],
            memory_nodes: None,
            role: Role::Managed {
                policy: Policy::Auto,
                current: vec![],
            },
        })
        .collect()
}

/// The same guests with their planned pins as current pins.
fn settled(topo: &Topology, host: &HostPolicy, guests: &[Guest]) -> Vec<Guest> {
    let p = plan(topo, host, guests);
    guests
        .iter()
        .map(|g| {
            let gp = p.guests.iter().find(|x| x.uuid == g.uuid).expect("planned");
            Guest {
                memory_nodes: gp
                    .memory_nodes
                    .as_ref()
                    .map(|n| n.iter().copied().collect()),
                role: Role::Managed {
                    policy: Policy::Auto,
                    current: gp.vcpus.iter().cloned().map(Some).collect(),
                },
                ..g.clone()
            }
        })
        .collect()
}

/// The capacity line: 64 CPUs, 4 reserved, fifteen 4-vCPU guests
/// one-to-one; a sixteenth starts and stops ten times. Prints the pins each
/// start and stop moved, without hysteresis and with the default.
fn capacity_line() {
    let topo = Topology::synthetic(2, 1, 16, 2);
    assert_eq!(topo.online.len(), 64);
    for percent in [0, 10] {
        let host = HostPolicy {
            capacity_hysteresis_percent: percent,
            ..HostPolicy::with_reserved(CpuSet::parse("0-3").unwrap())
        };
        let mut running = settled(&topo, &host, &guests(15, &[4], 256));
        let mut moved = Vec::new();
        for _ in 0..10 {
            let mut started = running.clone();
            started.push(guests(16, &[4], 256).pop().expect("the 16th"));
            moved.push(plan(&topo, &host, &started).pins_moved);
            let started = settled(&topo, &host, &started);
            running = started[..15].to_vec();
            moved.push(plan(&topo, &host, &running).pins_moved);
            running = settled(&topo, &host, &running);
        }
        println!(
            "capacity line, capacity_hysteresis_percent = {percent}: {} pins moved over 10 start/stop cycles ({moved:?})",
            moved.iter().sum::<u32>()
        );
    }
}

fn bench(c: &mut Criterion) {
    capacity_line();
    let topo = Topology::synthetic(16, 2, 32, 2);
    assert_eq!(topo.online.len(), 2048);
    let mut host = HostPolicy::with_reserved(CpuSet::parse("0-15").unwrap());
    host.memory_reserve.normal_kib_per_node = 512 * 1024;
    // Average 2 vCPUs: 2,000 vCPUs on 2,032 pool CPUs, all dedicated;
    // 500 MiB a vCPU: 977 of the nodes' 1,016 GiB.
    let dedicated = guests(1000, &[2, 2, 1, 2, 2, 2, 4, 1], 500);
    // Average 4 vCPUs: 4,000 vCPUs, overcommitted, all shared; 250 MiB a
    // vCPU: 977 GiB.
    let shared = guests(1000, &[4, 2, 8, 2], 250);

    let mut group = c.benchmark_group("placement 2048 CPUs, 16 nodes, 1000 guests");
    for (mode, mix) in [("dedicated", &dedicated), ("shared", &shared)] {
        let unbound = plan(&topo, &host, mix)
            .warnings
            .iter()
            .filter(|w| w.to_string().contains("memory not bound"))
            .count();
        println!("{mode}: {unbound} of 1000 guests' memory fits no set of nodes");
        group.bench_function(format!("{mode}: from scratch"), |b| {
            b.iter(|| plan(black_box(&topo), &host, black_box(mix)))
        });
        let mut plus_one = settled(&topo, &host, mix);
        plus_one.push(
            guests(1, &[2], 500)
                .pop()
                .map(|g| Guest {
                    uuid: "new".into(),
                    name: "new".into(),
                    ..g
                })
                .unwrap(),
        );
        group.bench_function(format!("{mode}: one guest added"), |b| {
            b.iter(|| plan(black_box(&topo), &host, black_box(&plus_one)))
        });
    }
    rebalancing(&mut group, &topo, &host, &shared);
    group.finish();
}

/// The shared mix settled, the first eight nodes' guests busy (80% of
/// their vCPUs) and the rest light (10%): one rebalancing decision
/// (the load read from the plan, then the step, allowed to move at once),
/// and the same followed by the plan with its moves.
fn rebalancing(
    group: &mut criterion::BenchmarkGroup<criterion::measurement::WallTime>,
    topo: &Topology,
    host: &HostPolicy,
    mix: &[Guest],
) {
    let settled = settled(topo, host, mix);
    let placed = plan(topo, host, &settled);
    let mut load = Load::default();
    for g in &placed.guests {
        let node = g.numa_nodes.first().copied().unwrap_or(0);
        let share = if node < 8 { 0.8 } else { 0.1 };
        load.demand
            .insert(g.uuid.clone(), share * g.vcpus.len() as f64);
    }
    let rules = Rules {
        samples: 1,
        ..Rules::default()
    };
    let decide = || Rebalancer::default().step(&rules, &host_load(topo, &placed, &load), 0.0);
    let moves = decide();
    println!(
        "rebalancing: {} moves decided over {} shared guests ({:?})",
        moves.len(),
        placed.guests.len(),
        moves
            .iter()
            .map(|m| (&m.name, m.to.to_string()))
            .collect::<Vec<_>>()
    );
    assert!(!moves.is_empty(), "the uneven host is rebalanced");
    group.bench_function("shared: rebalancing decision", |b| {
        b.iter(|| black_box(decide()))
    });
    group.bench_function(
        "shared: rebalancing decision and the plan with its moves",
        |b| {
            b.iter(|| {
                let mut moved = load.clone();
                for m in decide() {
                    moved.moves.insert(m.uuid, m.to);
                }
                plan_loaded(black_box(topo), host, &settled, &moved)
            })
        },
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
