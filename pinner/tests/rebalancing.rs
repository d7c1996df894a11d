//! Rebalancing over synthetic demand traces: bounded moves, no
//! oscillation, no ping-pong, balanced hosts left alone.

use pinner::engine::cpuset::CpuSet;
use pinner::engine::rebalance::{HostLoad, Move, NodeShare, Rebalancer, Rules, Tenant};
use proptest::prelude::*;

/// Seconds between observations (the reconcile interval).
const INTERVAL: f64 = 30.0;

fn rules() -> Rules {
    Rules {
        threshold: 0.10,
        samples: 2,
        cooldown_secs: 5.0 * INTERVAL,
        max_moves: 2,
    }
}

/// `nodes` nodes of `l3s` L3 ranges of `size` CPUs each.
fn shape(nodes: u32, l3s: u32, size: u32) -> Vec<NodeShare> {
    (0..nodes)
        .map(|n| {
            let first = n * l3s * size;
            let l3: Vec<CpuSet> = (0..l3s)
                .map(|l| (first + l * size..first + (l + 1) * size).collect())
                .collect();
            NodeShare {
                node: Some(n),
                kind: 0,
                cpus: l3.iter().flat_map(CpuSet::iter).collect(),
                l3s: l3,
            }
        })
        .collect()
}

/// A host and its guests: each on one L3 range, with a demand up to its
/// vCPUs; every node holds every guest's memory unless `tight`.
fn host() -> impl Strategy<Value = HostLoad> {
    (2u32..=4, 1u32..=2, 2u32..=8).prop_flat_map(|(nodes, l3s, size)| {
        let ranges = (nodes * l3s) as usize;
        let tenant = (0..ranges, 1..=size, 0.0..1.0f64, any::<bool>());
        proptest::collection::vec(tenant, 1..=16).prop_map(move |specs| {
            let nodes_ = shape(nodes, l3s, size);
            let all: Vec<(u32, CpuSet)> = nodes_
                .iter()
                .flat_map(|n| n.l3s.iter().map(|l| (n.node.unwrap(), l.clone())))
                .collect();
            let tenants = specs
                .into_iter()
                .enumerate()
                .map(|(i, (r, vcpus, busy, tight))| Tenant {
                    uuid: format!("uuid-{i}"),
                    name: format!("g{i:02}"),
                    range: all[r].1.clone(),
                    vcpus,
                    demand: busy * f64::from(vcpus),
                    movable: true,
                    fits: if tight {
                        vec![all[r].0]
                    } else {
                        (0..nodes).collect()
                    },
                })
                .collect();
            HostLoad {
                nodes: nodes_,
                tenants,
            }
        })
    })
}

/// Runs `observations` observations, applying each move as placement
/// would; `demand(i, t)` is guest t's demand at observation i (None: as
/// generated). Returns every move with the observation it came at.
fn simulate(
    mut host: HostLoad,
    observations: u32,
    demand: impl Fn(u32, usize) -> Option<f64>,
) -> Vec<(u32, Move)> {
    let mut r = Rebalancer::default();
    let mut all = Vec::new();
    for i in 0..observations {
        for t in 0..host.tenants.len() {
            if let Some(d) = demand(i, t) {
                host.tenants[t].demand = d;
            }
        }
        for m in r.step(&rules(), &host, f64::from(i) * INTERVAL) {
            let t = host.tenants.iter_mut().find(|t| t.uuid == m.uuid).unwrap();
            assert_eq!(t.range, m.from);
            assert!(t.vcpus as usize <= m.to.len(), "{m:?}");
            t.range = m.to.clone();
            all.push((i, m));
        }
    }
    all
}

/// The first move that takes a guest back to a range it left earlier in
/// the trace. Under steady demand (or a peak held steady) the host is never
/// balanced between two moves, so the way back stays barred throughout.
fn first_return(moves: &[(u32, Move)]) -> Option<&Move> {
    moves.iter().enumerate().find_map(|(k, (_, m))| {
        moves[..k]
            .iter()
            .any(|(_, before)| before.uuid == m.uuid && before.from == m.to)
            .then_some(m)
    })
}

/// Σ demand² / CPUs over the node shares: what every move across nodes
/// lowers.
fn node_potential(host: &HostLoad) -> f64 {
    host.nodes
        .iter()
        .map(|n| {
            let d: f64 = host
                .tenants
                .iter()
                .filter(|t| t.range.is_subset(&n.cpus))
                .map(|t| t.demand)
                .sum();
            d * d / n.cpus.len() as f64
        })
        .sum()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn under_steady_demand_moves_stop_and_each_pays(h in host()) {
        let moves = simulate(h.clone(), 120, |_, _| None);
        // Each guest moves at most once per cool-down, and the moves end:
        // none in the second half of the trace.
        prop_assert!(moves.iter().all(|(i, _)| *i < 60), "{moves:?}");
        prop_assert_eq!(first_return(&moves), None, "{:?}", moves);
        // Replay: every move across nodes lowers the nodes' potential.
        let mut replay = h.clone();
        for (_, m) in &moves {
            let before = node_potential(&replay);
            let t = replay.tenants.iter_mut().find(|t| t.uuid == m.uuid).unwrap();
            t.range = m.to.clone();
            let fits = t.fits.clone();
            prop_assert!(
                !m.across_nodes || node_potential(&replay) < before - 1e-9,
                "{m:?}"
            );
            if m.across_nodes {
                let node = h.nodes.iter().find(|n| m.to.is_subset(&n.cpus)).unwrap();
                prop_assert!(fits.contains(&node.node.unwrap()), "memory fits");
            }
        }
    }

    #[test]
    fn a_guest_whose_demand_flips_does_not_ping_pong(h in host(), which in any::<prop::sample::Index>(), low in 0.0..0.3f64, half in 1u32..=2) {
        // Busy for `half` observations, then nearly idle for as many: the
        // window (2 × samples) sees both.
        let t = which.index(h.tenants.len());
        let vcpus = f64::from(h.tenants[t].vcpus);
        let moves = simulate(h, 200, |i, g| {
            (g == t).then(|| if (i / half) % 2 == 0 { vcpus } else { low * vcpus })
        });
        // Moves stop (the window's peak holds its demand steady), and no
        // guest, the flipping one included, goes back to a range it left:
        // no back and forth. (A 1-vCPU guest evening out a busy node's L3
        // ranges one way, then the other once a bigger guest had left for
        // another node, was found here.)
        prop_assert!(moves.iter().all(|(i, _)| *i < 100), "{moves:?}");
        prop_assert_eq!(first_return(&moves), None, "{:?}", moves);
    }

    #[test]
    fn a_host_balanced_within_the_threshold_stays_put(nodes in 2u32..=4, l3s in 1u32..=2, size in 2u32..=8, per_range in 1usize..=3, busy in 0.0..1.0f64, jitter in proptest::collection::vec(0.0..0.05f64, 24)) {
        // Every L3 range holds the same guests; demand per pCPU differs by
        // less than the threshold.
        let shape = shape(nodes, l3s, size);
        let mut tenants = Vec::new();
        for l in shape.iter().flat_map(|n| n.l3s.iter()) {
            for _ in 0..per_range {
                let k = tenants.len();
                tenants.push(Tenant {
                    uuid: format!("uuid-{k}"),
                    name: format!("g{k:02}"),
                    range: l.clone(),
                    vcpus: size,
                    demand: (busy + jitter[k % jitter.len()]) * f64::from(size) / per_range as f64,
                    movable: true,
                    fits: (0..nodes).collect(),
                });
            }
        }
        let moves = simulate(HostLoad { nodes: shape, tenants }, 50, |_, _| None);
        prop_assert!(moves.is_empty(), "{moves:?}");
    }
}
