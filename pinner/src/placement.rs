//! The placement engine: a pure function of topology × guests × config →
//! plan. No I/O, so it can be tested and benchmarked on any machine.
//!
//! Policy (see DESIGN.md): pool = online − reserved − CPUs pinned by others.
//! While the dedicated demand fits the pool every vCPU gets a pCPU of its own,
//! a guest kept within one NUMA node when it fits one; beyond that guests are
//! range-bound to a NUMA node's pool CPUs (or the whole pool), balancing
//! vCPUs per pCPU. Existing pins that still satisfy the rules are kept.

use crate::cpuset::CpuSet;
use crate::domain::Policy;
use crate::topology::Topology;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// pinner places it, per its policy (never `Policy::None`).
    Managed {
        policy: Policy,
        /// Current pin of each vCPU (None: unpinned).
        current: Vec<Option<CpuSet>>,
    },
    /// Pinned by someone else: left alone, its CPUs taken from the pool.
    Foreign { taken: CpuSet },
    /// Opted out through its metadata: left alone.
    OptedOut,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guest {
    pub name: String,
    pub uuid: String,
    pub vcpus: u32,
    pub role: Role,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// One pCPU per vCPU, not shared with any other vCPU.
    Dedicated,
    /// vCPUs range-bound to a set of pCPUs shared with other guests.
    Shared,
}

impl Placement {
    pub fn as_str(self) -> &'static str {
        match self {
            Placement::Dedicated => "dedicated",
            Placement::Shared => "shared",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestPlan {
    pub name: String,
    pub uuid: String,
    pub placement: Placement,
    /// CPUs for each vCPU, by vCPU number.
    pub vcpus: Vec<CpuSet>,
    pub emulator: CpuSet,
    pub numa_nodes: Vec<u32>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Dedicated unless any guest is range-bound.
    pub mode: Placement,
    pub pool: CpuSet,
    pub reserved: CpuSet,
    pub guests: Vec<GuestPlan>,
    pub warnings: Vec<String>,
}

pub struct HostPolicy<'a> {
    pub topology: &'a Topology,
    pub reserved: &'a CpuSet,
    pub cpu_allocation_ratio: f64,
}

pub fn plan(host: &HostPolicy, guests: &[Guest]) -> Plan {
    let topo = host.topology;
    let reserved = host.reserved.intersection(&topo.online);
    let taken = guests.iter().fold(CpuSet::new(), |acc, g| match &g.role {
        Role::Foreign { taken } => acc.union(taken),
        _ => acc,
    });
    let pool = topo.online.difference(&reserved).difference(&taken);
    let mut warnings = Vec::new();

    // Managed guests in a stable order: by name, then uuid.
    let mut managed: Vec<(&Guest, Policy, &[Option<CpuSet>])> = guests
        .iter()
        .filter_map(|g| match &g.role {
            Role::Managed { policy, current } if g.vcpus > 0 => {
                Some((g, *policy, current.as_slice()))
            }
            _ => None,
        })
        .collect();
    managed.sort_by(|a, b| (&a.0.name, &a.0.uuid).cmp(&(&b.0.name, &b.0.uuid)));

    let dedicated_demand: usize = managed
        .iter()
        .filter(|(_, p, _)| *p != Policy::Shared)
        .map(|(g, _, _)| g.vcpus as usize)
        .sum();
    let all_fit = dedicated_demand <= pool.len();

    // Who gets CPUs of their own: everyone not asking for shared while all
    // fit; otherwise only guests that ask for dedicated, while they fit.
    let mut dedicated: Vec<(&Guest, &[Option<CpuSet>])> = Vec::new();
    let mut shared: Vec<(&Guest, &[Option<CpuSet>])> = Vec::new();
    let mut explicit_room = pool.len();
    for &(g, policy, current) in &managed {
        let wants_dedicated = match policy {
            Policy::Dedicated => {
                let fits = g.vcpus as usize <= explicit_room;
                if fits {
                    explicit_room -= g.vcpus as usize;
                } else {
                    warnings.push(format!(
                        "{}: asks for {} dedicated CPUs but only {explicit_room} are free; shared instead",
                        g.name, g.vcpus
                    ));
                }
                fits
            }
            Policy::Auto => all_fit,
            Policy::Shared | Policy::None => false,
        };
        if wants_dedicated {
            dedicated.push((g, current));
        } else {
            shared.push((g, current));
        }
    }

    let mut free = pool.clone();
    let mut plans = place_dedicated(topo, &reserved, &dedicated, &mut free);
    let shared_pool = if free.is_empty() && !shared.is_empty() {
        warnings
            .push("no CPUs left beside dedicated guests; shared guests use the whole pool".into());
        pool.clone()
    } else {
        free
    };
    plans.extend(place_shared(topo, &shared_pool, &shared));

    let shared_demand: u32 = shared.iter().map(|(g, _)| g.vcpus).sum();
    let capacity = shared_pool.len() as f64 * host.cpu_allocation_ratio;
    if !shared.is_empty() && f64::from(shared_demand) > capacity {
        warnings.push(format!(
            "overcommitted: {shared_demand} shared vCPUs on {} pCPUs exceed cpu_allocation_ratio {} (capacity {capacity})",
            shared_pool.len(),
            host.cpu_allocation_ratio
        ));
    }
    plans.sort_by(|a, b| (&a.name, &a.uuid).cmp(&(&b.name, &b.uuid)));
    let mode = if plans.iter().any(|p| p.placement == Placement::Shared) {
        Placement::Shared
    } else {
        Placement::Dedicated
    };
    Plan {
        mode,
        pool,
        reserved,
        guests: plans,
        warnings,
    }
}

fn place_dedicated(
    topo: &Topology,
    reserved: &CpuSet,
    guests: &[(&Guest, &[Option<CpuSet>])],
    free: &mut CpuSet,
) -> Vec<GuestPlan> {
    // First keep every single-CPU pin that is still free, so a replan moves
    // nothing that need not move.
    let mut kept: Vec<Vec<Option<u32>>> = Vec::with_capacity(guests.len());
    for (g, current) in guests {
        let mut slots = vec![None; g.vcpus as usize];
        for (vcpu, slot) in slots.iter_mut().enumerate() {
            if let Some(Some(pin)) = current.get(vcpu) {
                if let (1, Some(cpu)) = (pin.len(), pin.first()) {
                    if free.contains(cpu) {
                        free.remove(cpu);
                        *slot = Some(cpu);
                    }
                }
            }
        }
        kept.push(slots);
    }
    // Then fill the rest, larger guests first (they are the hardest to fit).
    let mut order: Vec<usize> = (0..guests.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(guests[i].0.vcpus));
    let mut plans = vec![None; guests.len()];
    for i in order {
        let (g, _) = guests[i];
        let slots = &mut kept[i];
        let missing = slots.iter().filter(|s| s.is_none()).count();
        let already: CpuSet = slots.iter().flatten().copied().collect();
        let (chosen, reason) = pick_dedicated(topo, free, &already, missing);
        let mut fresh = chosen.iter();
        for slot in slots.iter_mut().filter(|s| s.is_none()) {
            *slot = fresh.next();
        }
        for cpu in chosen.iter() {
            free.remove(cpu);
        }
        let vcpus: Vec<CpuSet> = slots
            .iter()
            .map(|s| s.map(|c| std::iter::once(c).collect()).unwrap_or_default())
            .collect();
        let own = vcpus.iter().fold(CpuSet::new(), |acc, s| acc.union(s));
        let numa_nodes = topo.nodes_of(&own);
        let reason = if missing == 0 {
            format!("dedicated: kept pins on node {}", join_ids(&numa_nodes))
        } else {
            reason
        };
        plans[i] = Some(GuestPlan {
            name: g.name.clone(),
            uuid: g.uuid.clone(),
            placement: Placement::Dedicated,
            // Emulator threads stay off dedicated CPUs when there is a
            // housekeeping set to put them on.
            emulator: if reserved.is_empty() {
                own.clone()
            } else {
                reserved.clone()
            },
            vcpus,
            numa_nodes,
            reason,
        });
    }
    plans.into_iter().flatten().collect()
}

/// `count` free CPUs for one guest: the node already holding its kept pins
/// if it has room, else the fullest node that fits them all (best fit keeps
/// large holes for large guests), else spread over the nodes with most room.
fn pick_dedicated(
    topo: &Topology,
    free: &CpuSet,
    already: &CpuSet,
    count: usize,
) -> (CpuSet, String) {
    if count == 0 {
        return (CpuSet::new(), String::new());
    }
    let free_in = |cpus: &CpuSet| cpus.intersection(free);
    let home = topo
        .numa_nodes
        .iter()
        .find(|n| !n.cpus.intersection(already).is_empty() && free_in(&n.cpus).len() >= count);
    let best_fit = || {
        topo.numa_nodes
            .iter()
            .filter(|n| free_in(&n.cpus).len() >= count)
            .min_by_key(|n| (free_in(&n.cpus).len(), n.id))
    };
    if let Some(node) = home.or_else(best_fit) {
        let cpus = free_in(&node.cpus).iter().take(count).collect();
        return (cpus, format!("dedicated: fits node {}", node.id));
    }
    let mut nodes: Vec<_> = topo.numa_nodes.iter().collect();
    nodes.sort_by_key(|n| (std::cmp::Reverse(free_in(&n.cpus).len()), n.id));
    let cpus: CpuSet = nodes
        .iter()
        .flat_map(|n| free_in(&n.cpus).to_vec())
        .take(count)
        .collect();
    let spanned = topo.nodes_of(&cpus);
    (
        cpus,
        format!(
            "dedicated: larger than any node's free CPUs, spans nodes {}",
            join_ids(&spanned)
        ),
    )
}

fn place_shared(
    topo: &Topology,
    shared_pool: &CpuSet,
    guests: &[(&Guest, &[Option<CpuSet>])],
) -> Vec<GuestPlan> {
    // Ranges a shared guest can be bound to: each node's share of the pool.
    let ranges: Vec<(u32, CpuSet)> = topo
        .numa_nodes
        .iter()
        .map(|n| (n.id, n.cpus.intersection(shared_pool)))
        .filter(|(_, cpus)| !cpus.is_empty())
        .collect();
    let mut load = vec![0u32; ranges.len()];
    let mut order: Vec<usize> = (0..guests.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(guests[i].0.vcpus));
    let mut plans = vec![None; guests.len()];
    let mut range_of = vec![None; guests.len()];
    for i in order {
        let (g, current) = guests[i];
        let ratio = |r: usize| f64::from(load[r] + g.vcpus) / ranges[r].1.len() as f64;
        let fitting: Vec<usize> = (0..ranges.len())
            .filter(|&r| ranges[r].1.len() >= g.vcpus as usize)
            .collect();
        let least = fitting.iter().copied().min_by(|&a, &b| {
            ratio(a)
                .total_cmp(&ratio(b))
                .then(ranges[a].0.cmp(&ranges[b].0))
        });
        // Stay where the guest already is unless another node is lighter by
        // a whole vCPU per pCPU.
        let here = (0..ranges.len()).find(|&r| {
            fitting.contains(&r)
                && current.len() == g.vcpus as usize
                && current.iter().all(|c| c.as_ref() == Some(&ranges[r].1))
        });
        let chosen = match (here, least) {
            (Some(h), Some(l)) if ratio(h) - ratio(l) < 1.0 => Some(h),
            (_, l) => l,
        };
        let cpus = match chosen {
            Some(r) => {
                load[r] += g.vcpus;
                ranges[r].1.clone()
            }
            None => shared_pool.clone(),
        };
        plans[i] = Some(GuestPlan {
            name: g.name.clone(),
            uuid: g.uuid.clone(),
            placement: Placement::Shared,
            vcpus: vec![cpus.clone(); g.vcpus as usize],
            emulator: cpus.clone(),
            numa_nodes: topo.nodes_of(&cpus),
            reason: String::new(),
        });
        range_of[i] = chosen;
    }
    // Reasons name each range's final load, the same for all who share it.
    for (plan, range) in plans.iter_mut().zip(&range_of) {
        let Some(plan) = plan else { continue };
        plan.reason = match *range {
            Some(r) => format!(
                "shared: node {} ({} vCPUs on {} pCPUs)",
                ranges[r].0,
                load[r],
                ranges[r].1.len()
            ),
            None => "shared: larger than any node, bound to the whole pool".to_string(),
        };
    }
    plans.into_iter().flatten().collect()
}

fn join_ids(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join("+")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(text: &str) -> CpuSet {
        CpuSet::parse(text).unwrap()
    }

    fn guest(name: &str, vcpus: u32) -> Guest {
        managed(name, vcpus, Policy::Auto, vec![])
    }

    fn managed(name: &str, vcpus: u32, policy: Policy, current: Vec<Option<CpuSet>>) -> Guest {
        Guest {
            name: name.into(),
            uuid: format!("uuid-{name}"),
            vcpus,
            role: Role::Managed { policy, current },
        }
    }

    /// 2 nodes × 4 CPUs (0-3, 4-7), CPU 0 reserved.
    fn host_plan(guests: &[Guest]) -> Plan {
        let topo = Topology::uniform(&set("0-7"), 2);
        let reserved = set("0");
        plan(
            &HostPolicy {
                topology: &topo,
                reserved: &reserved,
                cpu_allocation_ratio: 1.0,
            },
            guests,
        )
    }

    fn by_name<'a>(plan: &'a Plan, name: &str) -> &'a GuestPlan {
        plan.guests.iter().find(|g| g.name == name).unwrap()
    }

    fn current_of(p: &GuestPlan) -> Vec<Option<CpuSet>> {
        p.vcpus.iter().cloned().map(Some).collect()
    }

    #[test]
    fn dedicated_while_it_fits_one_cpu_per_vcpu_within_a_node() {
        let plan = host_plan(&[guest("a", 3), guest("b", 4)]);
        assert_eq!(plan.mode, Placement::Dedicated);
        assert_eq!(plan.pool, set("1-7"));
        let mut used = CpuSet::new();
        for g in &plan.guests {
            assert_eq!(g.placement, Placement::Dedicated);
            assert_eq!(
                g.numa_nodes.len(),
                1,
                "{} should fit one node: {:?}",
                g.name,
                g.vcpus
            );
            for cpus in &g.vcpus {
                assert_eq!(cpus.len(), 1);
                assert!(!used.contains(cpus.first().unwrap()), "pCPU given twice");
                used = used.union(cpus);
            }
            assert_eq!(g.emulator, set("0"), "emulator goes to the reserved CPUs");
        }
        assert!(!used.contains(0), "reserved CPU used");
        assert_eq!(
            by_name(&plan, "b")
                .vcpus
                .iter()
                .fold(CpuSet::new(), |a, s| a.union(s)),
            set("4-7")
        );
    }

    #[test]
    fn beyond_the_pool_guests_share_a_node_range_balanced() {
        let guests: Vec<Guest> = (0..6).map(|i| guest(&format!("g{i}"), 2)).collect();
        let plan = host_plan(&guests);
        assert_eq!(plan.mode, Placement::Shared);
        let mut load = std::collections::BTreeMap::new();
        for g in &plan.guests {
            assert_eq!(g.placement, Placement::Shared);
            let range = &g.vcpus[0];
            assert!(g.vcpus.iter().all(|c| c == range), "one range per guest");
            assert!(range == &set("1-3") || range == &set("4-7"), "{range}");
            assert_eq!(&g.emulator, range);
            *load.entry(range.to_string()).or_insert(0u32) += 2;
        }
        // 12 vCPUs on 3 + 4 pCPUs: per-pCPU loads within one of each other.
        let per_cpu: Vec<f64> = load
            .iter()
            .map(|(r, l)| f64::from(*l) / set(r).len() as f64)
            .collect();
        assert!((per_cpu[0] - per_cpu[1]).abs() <= 1.0, "{load:?}");
        assert!(
            plan.warnings.iter().any(|w| w.contains("overcommitted")),
            "{:?}",
            plan.warnings
        );
    }

    #[test]
    fn guest_larger_than_a_node_spans_nodes() {
        let plan = host_plan(&[guest("big", 6)]);
        let g = by_name(&plan, "big");
        assert_eq!(g.placement, Placement::Dedicated);
        assert_eq!(g.numa_nodes, vec![0, 1]);
        assert!(g.reason.contains("spans nodes 0+1"), "{}", g.reason);
    }

    #[test]
    fn foreign_pins_are_taken_and_opted_out_guests_ignored() {
        let foreign = Guest {
            name: "nova".into(),
            uuid: "n".into(),
            vcpus: 2,
            role: Role::Foreign { taken: set("4-5") },
        };
        let opted = Guest {
            name: "mine".into(),
            uuid: "m".into(),
            vcpus: 2,
            role: Role::OptedOut,
        };
        let plan = host_plan(&[foreign, opted, guest("a", 5)]);
        assert_eq!(plan.pool, set("1-3,6-7"));
        assert_eq!(plan.guests.len(), 1, "only managed guests are planned");
        let a = by_name(&plan, "a");
        let used = a.vcpus.iter().fold(CpuSet::new(), |acc, s| acc.union(s));
        assert_eq!(used, set("1-3,6-7"));
    }

    #[test]
    fn adding_a_guest_moves_no_existing_pin() {
        let first = host_plan(&[guest("a", 2), guest("b", 3)]);
        let settled: Vec<Guest> = first
            .guests
            .iter()
            .map(|p| managed(&p.name, p.vcpus.len() as u32, Policy::Auto, current_of(p)))
            .collect();
        let mut more = settled.clone();
        more.push(guest("c", 2));
        let second = host_plan(&more);
        for before in &first.guests {
            assert_eq!(
                by_name(&second, &before.name).vcpus,
                before.vcpus,
                "{} moved",
                before.name
            );
        }
        assert_eq!(second.mode, Placement::Dedicated);
    }

    #[test]
    fn shared_guests_stay_on_their_node_when_balanced() {
        let guests: Vec<Guest> = (0..6).map(|i| guest(&format!("g{i}"), 2)).collect();
        let first = host_plan(&guests);
        let settled: Vec<Guest> = first
            .guests
            .iter()
            .map(|p| managed(&p.name, 2, Policy::Auto, current_of(p)))
            .collect();
        assert_eq!(host_plan(&settled).guests, first.guests);
    }

    #[test]
    fn explicit_policies() {
        let plan = host_plan(&[
            managed("d", 2, Policy::Dedicated, vec![]),
            managed("s", 1, Policy::Shared, vec![]),
            guest("a", 2),
        ]);
        assert_eq!(by_name(&plan, "d").placement, Placement::Dedicated);
        assert_eq!(by_name(&plan, "s").placement, Placement::Shared);
        assert_eq!(by_name(&plan, "a").placement, Placement::Dedicated);
        let d_cpus = by_name(&plan, "d")
            .vcpus
            .iter()
            .fold(CpuSet::new(), |a, s| a.union(s));
        assert!(d_cpus
            .intersection(&by_name(&plan, "s").vcpus[0])
            .is_empty());

        // A dedicated request that cannot fit is shared, with a warning.
        let plan = host_plan(&[managed("huge", 9, Policy::Dedicated, vec![])]);
        assert_eq!(by_name(&plan, "huge").placement, Placement::Shared);
        assert!(
            plan.warnings.iter().any(|w| w.contains("huge")),
            "{:?}",
            plan.warnings
        );
    }

    #[test]
    fn stale_pins_to_reserved_or_taken_cpus_are_replaced() {
        let stale = managed("a", 2, Policy::Auto, vec![Some(set("0")), Some(set("5"))]);
        let plan = host_plan(&[stale]);
        let a = by_name(&plan, "a");
        assert_eq!(a.vcpus[1], set("5"), "valid pin kept");
        assert_ne!(a.vcpus[0], set("0"), "reserved CPU replaced");
        assert_eq!(
            a.numa_nodes,
            vec![1],
            "replacement joins the kept pin's node"
        );
    }
}
