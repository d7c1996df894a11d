//! Rebalancing: a running shared guest moves when the demand per pCPU of
//! its range stays well above another range's. Placement keeps running
//! guests where they are (within one CPU of demand per pCPU); this step
//! decides the few moves that pay, from one observation to the next:
//!
//!  1. each guest's demand: the highest of its last `2 × samples`
//!     observations, so a guest busy in bursts weighs as busy and a lull
//!     never makes it look light enough to move; each L3 range's demand
//!     (a guest on a larger range spreads its demand over the L3 ranges
//!     it covers, by CPUs), and each node's;
//!  2. the gap: the largest difference in demand per pCPU between two L3
//!     ranges of one node, or two nodes of one core kind. Below the
//!     threshold the host is balanced and the count of imbalanced samples
//!     starts again; otherwise it grows, and nothing moves before it
//!     reaches `samples`;
//!  3. the best move within a node (between its L3 ranges: no memory
//!     moves), else across nodes (only to a node whose free memory holds
//!     the guest): from the busiest range to the least busy one, the guest
//!     whose move narrows that gap most, by at least the threshold, and
//!     that has not moved within the cool-down, nor left that range since
//!     the host was last balanced;
//!  4. repeated, each move counted in, up to `max_moves`; after a move the
//!     count starts again, so the next decision waits for demand measured
//!     since.
//!
//! A move must narrow its gap by the threshold, so the sum over ranges of
//! demand² / CPUs falls by a fixed amount with each: under steady demand
//! moves stop, and two guests never trade places. Taking the peak keeps
//! demand steady for a guest whose load flips faster than the window, and
//! barring the way back keeps a small guest from evening out a node's L3
//! ranges one way and, once a bigger guest has left, the other: while an
//! imbalance lasts, no guest goes back and forth. (The property test found
//! that guest; a bar for a time instead only put the move back off until
//! it ran out, under steady demand.)

use crate::engine::cpuset::CpuSet;
use std::collections::{HashMap, HashSet, VecDeque};

/// When and how much rebalancing moves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rules {
    /// The difference in demand per pCPU (CPUs of demand per CPU: 0.1 is
    /// 10%) that counts as imbalance, and the least a move must remove.
    pub threshold: f64,
    /// Consecutive imbalanced observations before anything moves.
    pub samples: u32,
    /// A guest moved is not moved again for this long (seconds).
    pub cooldown_secs: f64,
    /// Guests moved per observation at most (0: rebalancing off).
    pub max_moves: u32,
}

impl Default for Rules {
    fn default() -> Rules {
        Rules {
            threshold: 0.10,
            samples: 3,
            cooldown_secs: 600.0,
            max_moves: 2,
        }
    }
}

/// One NUMA node's share of the shared pool (of one core kind), and its
/// L3 ranges (one, equal to `cpus`, when the node has one L3).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeShare {
    pub node: Option<u32>,
    pub kind: u8,
    pub cpus: CpuSet,
    pub l3s: Vec<CpuSet>,
}

/// A shared guest as rebalancing sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    pub uuid: String,
    pub name: String,
    /// The CPUs all its vCPUs are bound to.
    pub range: CpuSet,
    pub vcpus: u32,
    /// CPUs of demand.
    pub demand: f64,
    /// Bound to one L3 range or node share as a whole (not a span of
    /// nodes, not cell by cell), its demand measured long enough: only
    /// such a guest is moved.
    pub movable: bool,
    /// The nodes whose free memory holds its memory beside what is there.
    pub fits: Vec<u32>,
}

/// The shared pool and its guests, at one observation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostLoad {
    pub nodes: Vec<NodeShare>,
    pub tenants: Vec<Tenant>,
}

/// One guest moved: the range it leaves, the one it goes to, and the gap
/// it narrows.
#[derive(Debug, Clone, PartialEq)]
pub struct Move {
    pub uuid: String,
    pub name: String,
    pub from: CpuSet,
    pub to: CpuSet,
    /// Within a node (no memory moves) or across nodes.
    pub across_nodes: bool,
    /// Demand per pCPU of the busy and the idle range before the move.
    pub busy: f64,
    pub idle: f64,
}

/// What rebalancing remembers between observations.
#[derive(Debug, Clone, Default)]
pub struct Rebalancer {
    /// Consecutive observations whose gap was over the threshold.
    imbalanced: u32,
    /// Guest UUID → when it was last moved (seconds, the caller's clock).
    moved_at: HashMap<String, f64>,
    /// Guest UUID → the ranges it left since the host was last balanced.
    left: HashMap<String, Vec<CpuSet>>,
    /// Guest UUID → its demand at the last observations, newest last.
    seen: HashMap<String, VecDeque<f64>>,
    /// The gap at the last observation (demand per pCPU).
    pub last_gap: f64,
}

/// Each L3 range's demand, by node share.
type L3Demand = Vec<Vec<f64>>;

impl Rebalancer {
    /// The moves this observation (`now`: seconds) makes; see the module.
    pub fn step(&mut self, rules: &Rules, host: &HostLoad, now: f64) -> Vec<Move> {
        let host = &self.steady(rules, host);
        let mut demand = l3_demand(host);
        self.last_gap = worst_gap(host, &demand);
        if rules.max_moves == 0 || self.last_gap < rules.threshold {
            self.imbalanced = 0;
            self.left.clear();
            return Vec::new();
        }
        self.imbalanced += 1;
        if self.imbalanced < rules.samples {
            return Vec::new();
        }
        self.moved_at
            .retain(|_, at| now - *at < rules.cooldown_secs);
        let mut tenants: Vec<Tenant> = host.tenants.clone();
        let mut moves = Vec::new();
        while moves.len() < rules.max_moves as usize {
            let barred = |t: &Tenant, to: &CpuSet| self.barred(t, to);
            let Some((i, next)) = best_move(rules, host, &demand, &tenants, &barred) else {
                break;
            };
            spread(host, &mut demand, &tenants[i], -1.0);
            tenants[i].range = next.to.clone();
            spread(host, &mut demand, &tenants[i], 1.0);
            self.moved_at.insert(next.uuid.clone(), now);
            let left = self.left.entry(next.uuid.clone()).or_default();
            left.push(next.from.clone());
            moves.push(next);
        }
        if !moves.is_empty() {
            self.imbalanced = 0;
        }
        moves
    }

    /// Whether guest `t` may not go to `to` now: it is cooling down, or
    /// left `to` since the host was last balanced.
    fn barred(&self, t: &Tenant, to: &CpuSet) -> bool {
        self.moved_at.contains_key(&t.uuid)
            || self
                .left
                .get(&t.uuid)
                .is_some_and(|ranges| ranges.contains(to))
    }

    /// `host` with each guest's demand the peak of its recent ones (this
    /// observation's recorded); guests gone are forgotten.
    fn steady(&mut self, rules: &Rules, host: &HostLoad) -> HostLoad {
        let window = 2 * rules.samples.max(1) as usize;
        let present: HashSet<&str> = host.tenants.iter().map(|t| t.uuid.as_str()).collect();
        self.seen.retain(|uuid, _| present.contains(uuid.as_str()));
        self.moved_at
            .retain(|uuid, _| present.contains(uuid.as_str()));
        self.left.retain(|uuid, _| present.contains(uuid.as_str()));
        let mut steady = host.clone();
        for t in &mut steady.tenants {
            let seen = self.seen.entry(t.uuid.clone()).or_default();
            seen.push_back(t.demand);
            while seen.len() > window {
                seen.pop_front();
            }
            t.demand = seen.iter().copied().fold(0.0, f64::max);
        }
        steady
    }
}

/// Step 1: each L3 range's demand.
fn l3_demand(host: &HostLoad) -> L3Demand {
    let mut demand: L3Demand = host.nodes.iter().map(|n| vec![0.0; n.l3s.len()]).collect();
    for t in &host.tenants {
        spread(host, &mut demand, t, 1.0);
    }
    demand
}

/// Adds (`sign` 1) or takes away (-1) a guest's demand, shared out over
/// the L3 ranges its range covers by CPUs.
fn spread(host: &HostLoad, demand: &mut L3Demand, t: &Tenant, sign: f64) {
    let size = t.range.len().max(1) as f64;
    for (n, node) in host.nodes.iter().enumerate() {
        for (l, l3) in node.l3s.iter().enumerate() {
            let shared = l3.overlap(&t.range);
            if shared > 0 {
                demand[n][l] += sign * t.demand * shared as f64 / size;
            }
        }
    }
}

/// Demand per pCPU of a range's (demand, CPUs).
fn per_cpu((demand, cpus): (f64, usize)) -> f64 {
    demand / cpus.max(1) as f64
}

/// The busiest and least busy of `items` (index, demand per pCPU).
fn extremes(items: impl Iterator<Item = (usize, f64)>) -> Option<((usize, f64), (usize, f64))> {
    let mut out: Option<((usize, f64), (usize, f64))> = None;
    for (i, x) in items {
        out = Some(match out {
            None => ((i, x), (i, x)),
            Some((hi, lo)) => (
                if x > hi.1 { (i, x) } else { hi },
                if x < lo.1 { (i, x) } else { lo },
            ),
        });
    }
    out
}

/// The L3 ranges of node share `n`: busiest and least busy, per pCPU.
fn l3_extremes(
    host: &HostLoad,
    demand: &L3Demand,
    n: usize,
) -> Option<((usize, f64), (usize, f64))> {
    let l3s = &host.nodes[n].l3s;
    extremes((0..l3s.len()).map(|l| (l, per_cpu((demand[n][l], l3s[l].len())))))
}

/// The node shares of core kind `kind`: busiest and least busy, per pCPU.
fn node_extremes(
    host: &HostLoad,
    demand: &L3Demand,
    kind: u8,
) -> Option<((usize, f64), (usize, f64))> {
    extremes(
        (0..host.nodes.len())
            .filter(|&n| host.nodes[n].kind == kind)
            .map(|n| {
                (
                    n,
                    per_cpu((demand[n].iter().sum(), host.nodes[n].cpus.len())),
                )
            }),
    )
}

fn kinds(host: &HostLoad) -> Vec<u8> {
    let mut kinds: Vec<u8> = host.nodes.iter().map(|n| n.kind).collect();
    kinds.sort_unstable();
    kinds.dedup();
    kinds
}

/// Step 2: the largest gap between two L3 ranges of a node or two nodes
/// of a kind.
fn worst_gap(host: &HostLoad, demand: &L3Demand) -> f64 {
    let within = (0..host.nodes.len()).filter_map(|n| l3_extremes(host, demand, n));
    let across = kinds(host)
        .into_iter()
        .filter_map(|k| node_extremes(host, demand, k));
    within
        .chain(across)
        .map(|(hi, lo)| hi.1 - lo.1)
        .fold(0.0, f64::max)
}

/// A candidate move and what it leaves of its gap.
struct Candidate {
    tenant: usize,
    to: CpuSet,
    across_nodes: bool,
    gap_after: f64,
    busy: f64,
    idle: f64,
}

/// Step 3: the best move within a node, else across nodes.
fn best_move(
    rules: &Rules,
    host: &HostLoad,
    demand: &L3Demand,
    tenants: &[Tenant],
    barred: &dyn Fn(&Tenant, &CpuSet) -> bool,
) -> Option<(usize, Move)> {
    let free = |t: &Tenant, to: &CpuSet| t.movable && t.demand > 0.0 && !barred(t, to);
    let pick = |found: Vec<Candidate>| {
        found.into_iter().min_by(|a, b| {
            a.gap_after
                .total_cmp(&b.gap_after)
                .then_with(|| tenants[a.tenant].name.cmp(&tenants[b.tenant].name))
        })
    };
    let search = Search {
        rules,
        host,
        demand,
        tenants,
        free: &free,
    };
    let within = (0..host.nodes.len())
        .flat_map(|n| search.within_node(n))
        .collect();
    let chosen = pick(within).or_else(|| {
        let across = kinds(host)
            .into_iter()
            .flat_map(|k| search.across_nodes(k))
            .collect();
        pick(across)
    })?;
    let t = &tenants[chosen.tenant];
    Some((
        chosen.tenant,
        Move {
            uuid: t.uuid.clone(),
            name: t.name.clone(),
            from: t.range.clone(),
            to: chosen.to,
            across_nodes: chosen.across_nodes,
            busy: chosen.busy,
            idle: chosen.idle,
        },
    ))
}

/// What is left of a gap between `busy` and `idle` (demand, CPUs) once
/// `d` moves from one to the other; None unless that narrows it by the
/// threshold.
fn narrowed(rules: &Rules, busy: (f64, usize), idle: (f64, usize), d: f64) -> Option<f64> {
    let before = per_cpu(busy) - per_cpu(idle);
    let after = (per_cpu((busy.0 - d, busy.1)) - per_cpu((idle.0 + d, idle.1))).abs();
    (before - after >= rules.threshold).then_some(after)
}

/// Two ranges a guest may move between: the busy one's and the idle one's
/// (demand, CPUs).
struct Pair {
    busy: (f64, usize),
    idle: (f64, usize),
    across_nodes: bool,
}

/// One search for moves: the host, its L3 ranges' demand, the guests as
/// moved so far and which of them may go to a range.
struct Search<'a> {
    rules: &'a Rules,
    host: &'a HostLoad,
    demand: &'a L3Demand,
    tenants: &'a [Tenant],
    free: &'a dyn Fn(&Tenant, &CpuSet) -> bool,
}

impl Search<'_> {
    /// The moves over `pair` of every guest `target` finds a range for.
    fn pair_moves(&self, pair: Pair, target: impl Fn(&Tenant) -> Option<CpuSet>) -> Vec<Candidate> {
        let (busy, idle) = (per_cpu(pair.busy), per_cpu(pair.idle));
        if busy - idle < self.rules.threshold {
            return Vec::new();
        }
        self.tenants
            .iter()
            .enumerate()
            .filter_map(|(i, t)| {
                let to = target(t)?;
                let gap_after = narrowed(self.rules, pair.busy, pair.idle, t.demand)?;
                Some(Candidate {
                    tenant: i,
                    to,
                    across_nodes: pair.across_nodes,
                    gap_after,
                    busy,
                    idle,
                })
            })
            .collect()
    }

    /// Moves from node share `n`'s busiest L3 range to its least busy one.
    fn within_node(&self, n: usize) -> Vec<Candidate> {
        let (host, demand) = (self.host, self.demand);
        let l3s = &host.nodes[n].l3s;
        let Some(((hi, _), (lo, _))) = l3_extremes(host, demand, n) else {
            return Vec::new();
        };
        let (from, to) = (&l3s[hi], &l3s[lo]);
        let pair = Pair {
            busy: (demand[n][hi], from.len()),
            idle: (demand[n][lo], to.len()),
            across_nodes: false,
        };
        self.pair_moves(pair, |t| {
            (t.range == *from && t.vcpus as usize <= to.len() && (self.free)(t, to))
                .then(|| to.clone())
        })
    }

    /// Moves from kind `kind`'s busiest node share to its least busy one,
    /// of guests whose memory that node holds: to its least busy L3 range
    /// the guest fits, else to the whole node share.
    fn across_nodes(&self, kind: u8) -> Vec<Candidate> {
        let (host, demand) = (self.host, self.demand);
        let Some(((hi, _), (lo, _))) = node_extremes(host, demand, kind) else {
            return Vec::new();
        };
        let (from, to) = (&host.nodes[hi], &host.nodes[lo]);
        let holds = |t: &Tenant| to.node.is_some_and(|node| t.fits.contains(&node));
        let pair = Pair {
            busy: (demand[hi].iter().sum(), from.cpus.len()),
            idle: (demand[lo].iter().sum(), to.cpus.len()),
            across_nodes: true,
        };
        self.pair_moves(pair, |t| {
            (t.range.is_subset(&from.cpus) && holds(t))
                .then(|| l3_for(to, &demand[lo], t))
                .flatten()
                .filter(|range| (self.free)(t, range))
        })
    }
}

/// Where on node share `to` a guest goes: as placement would put it, the
/// least busy of its L3 ranges the guest fits, else the whole node share.
fn l3_for(to: &NodeShare, demand: &[f64], t: &Tenant) -> Option<CpuSet> {
    let fitting = (0..to.l3s.len()).filter(|&l| to.l3s[l].len() >= t.vcpus as usize);
    let l3 = fitting
        .map(|l| (l, per_cpu((demand[l], to.l3s[l].len()))))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(l, _)| to.l3s[l].clone());
    l3.or_else(|| (to.cpus.len() >= t.vcpus as usize).then(|| to.cpus.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(text: &str) -> CpuSet {
        CpuSet::parse(text).unwrap()
    }

    /// 2 nodes × 8 CPUs, each node two L3 ranges of 4.
    fn host(tenants: &[(&str, &str, f64)]) -> HostLoad {
        let share = |node: u32, cpus: &str, l3s: [&str; 2]| NodeShare {
            node: Some(node),
            kind: 0,
            cpus: set(cpus),
            l3s: l3s.iter().map(|s| set(s)).collect(),
        };
        HostLoad {
            nodes: vec![
                share(0, "0-7", ["0-3", "4-7"]),
                share(1, "8-15", ["8-11", "12-15"]),
            ],
            tenants: tenants
                .iter()
                .map(|(name, range, demand)| Tenant {
                    uuid: format!("uuid-{name}"),
                    name: name.to_string(),
                    range: set(range),
                    vcpus: 4,
                    demand: *demand,
                    movable: true,
                    fits: vec![0, 1],
                })
                .collect(),
        }
    }

    fn run(host: &HostLoad, rules: &Rules, observations: u32) -> Vec<Move> {
        let mut r = Rebalancer::default();
        (0..observations)
            .flat_map(|i| r.step(rules, host, f64::from(i) * 30.0))
            .collect()
    }

    #[test]
    fn a_balanced_host_stays_put() {
        let h = host(&[
            ("a", "0-3", 3.0),
            ("b", "4-7", 3.0),
            ("c", "8-11", 3.0),
            ("d", "12-15", 2.9),
        ]);
        assert!(run(&h, &Rules::default(), 10).is_empty());
    }

    #[test]
    fn within_the_node_first_after_the_samples() {
        // L3 0-3 holds two busy guests; 4-7 is idle, as is node 1.
        let h = host(&[("a", "0-3", 4.0), ("b", "0-3", 4.0), ("c", "8-11", 0.1)]);
        let mut r = Rebalancer::default();
        let rules = Rules::default();
        assert!(r.step(&rules, &h, 0.0).is_empty());
        assert!(r.step(&rules, &h, 30.0).is_empty());
        let moves = r.step(&rules, &h, 60.0);
        assert_eq!(moves.len(), 2, "{moves:?}");
        assert_eq!((moves[0].name.as_str(), &moves[0].to), ("a", &set("4-7")));
        assert!(!moves[0].across_nodes);
        assert_eq!((moves[0].busy, moves[0].idle), (2.0, 0.0));
        // Node 0 then carries 8 CPUs of demand on 8, node 1 0.1: the
        // other busy guest goes to node 1's idle L3 range.
        assert_eq!((moves[1].name.as_str(), &moves[1].to), ("b", &set("12-15")));
        assert!(moves[1].across_nodes);
    }

    #[test]
    fn across_nodes_only_where_memory_fits() {
        // Node 0's two L3 ranges each hold a busy guest: only a move to
        // node 1 helps.
        let mut h = host(&[("a", "0-3", 4.0), ("b", "4-7", 4.0)]);
        let moves = run(&h, &Rules::default(), 3);
        assert_eq!(moves.len(), 1, "{moves:?}");
        assert!(moves[0].across_nodes);
        assert_eq!((moves[0].name.as_str(), &moves[0].to), ("a", &set("8-11")));
        for t in &mut h.tenants {
            t.fits = vec![0];
        }
        assert!(run(&h, &Rules::default(), 10).is_empty());
    }

    #[test]
    fn a_guest_moved_waits_out_its_cool_down_and_moves_are_capped() {
        let h = host(&[
            ("a", "0-3", 4.0),
            ("b", "0-3", 4.0),
            ("c", "0-3", 4.0),
            ("d", "0-3", 4.0),
        ]);
        let rules = Rules {
            samples: 1,
            max_moves: 1,
            ..Rules::default()
        };
        let mut r = Rebalancer::default();
        let first = r.step(&rules, &h, 0.0);
        assert_eq!(first.len(), 1);
        // The caller did not apply the move: the same host is seen again,
        // and the guest moved is cooling down, so another goes.
        let second = r.step(&rules, &h, 30.0);
        assert_eq!(second.len(), 1);
        assert_ne!(first[0].uuid, second[0].uuid);
        let later = r.step(&rules, &h, 30.0 + rules.cooldown_secs);
        assert_eq!(later[0].uuid, first[0].uuid, "its cool-down is over");
    }

    #[test]
    fn a_guest_does_not_go_back_while_the_imbalance_lasts() {
        // One node: its two L3 ranges only.
        let node = |tenants: &[(&str, &str, f64)]| {
            let mut h = host(tenants);
            h.nodes.truncate(1);
            h
        };
        let rules = Rules {
            samples: 1,
            max_moves: 1,
            cooldown_secs: 30.0,
            ..Rules::default()
        };
        // a leaves 0-3 for 4-7; then b goes quiet and c starts beside a:
        // 4-7 is the busy range, and a or c (a first by name) evens it out
        // once b's peak has left the window (two observations).
        let steps = |r: &mut Rebalancer, first: f64| -> Vec<Move> {
            let quiet = node(&[("a", "4-7", 4.0), ("b", "0-3", 0.0), ("c", "4-7", 4.0)]);
            (0..2)
                .flat_map(|k| r.step(&rules, &quiet, first + 30.0 * f64::from(k)))
                .collect()
        };
        let mut r = Rebalancer::default();
        let moved = r.step(&rules, &node(&[("a", "0-3", 4.0), ("b", "0-3", 4.0)]), 0.0);
        assert_eq!((moved[0].name.as_str(), &moved[0].to), ("a", &set("4-7")));
        let moves = steps(&mut r, 60.0);
        assert_eq!(moves.len(), 1, "{moves:?}");
        assert_eq!((moves[0].name.as_str(), &moves[0].to), ("c", &set("0-3")));
        // With the host balanced in between, the way back is open again.
        let mut r = Rebalancer::default();
        r.step(&rules, &node(&[("a", "0-3", 4.0), ("b", "0-3", 4.0)]), 0.0);
        let balanced = node(&[("a", "4-7", 4.0), ("b", "0-3", 4.0)]);
        assert!(r.step(&rules, &balanced, 30.0).is_empty());
        let moves = steps(&mut r, 60.0);
        assert_eq!(moves.len(), 1, "{moves:?}");
        assert_eq!((moves[0].name.as_str(), &moves[0].to), ("a", &set("0-3")));
    }

    #[test]
    fn guests_not_bound_whole_to_a_range_and_idle_ones_stay() {
        let mut h = host(&[("a", "0-3", 4.0), ("b", "0-3", 4.0)]);
        h.tenants[0].movable = false;
        h.tenants[1].demand = 0.0;
        assert!(run(&h, &Rules::default(), 10).is_empty());
        let off = Rules {
            max_moves: 0,
            ..Rules::default()
        };
        assert!(run(&host(&[("a", "0-3", 4.0), ("b", "0-3", 4.0)]), &off, 10).is_empty());
    }
}
