//! Rebalancing as the daemon runs it: each completed observation of the
//! guests' demand is one sample for [`crate::engine::rebalance`]; the moves
//! it decides are planned in (placement honours them where the guest
//! fits), logged, counted and shown in status.

use super::control::Daemon;
use super::observe::unix_now_ns;
use crate::config::SharedBalance;
use crate::engine::domain::DomainSpec;
use crate::engine::placement::{self, Load, Plan};
use crate::engine::rebalance::{Move, Rebalancer};
use crate::engine::reconcile;
use pinner_shared::protocol::RebalanceStatus;
use std::collections::{HashMap, VecDeque};
use std::time::Instant;

/// Moves status keeps, newest last.
const RECENT_MOVES: usize = 10;

/// What rebalancing remembers.
pub struct Rebalancing {
    rebalancer: Rebalancer,
    /// The observation the last sample came from.
    sampled: u64,
    /// The rebalancer's clock starts here.
    epoch: Instant,
    pub recent: VecDeque<RebalanceStatus>,
}

impl Default for Rebalancing {
    fn default() -> Self {
        Rebalancing {
            rebalancer: Rebalancer::default(),
            sampled: 0,
            epoch: Instant::now(),
            recent: VecDeque::new(),
        }
    }
}

impl Daemon {
    /// What plans weigh shared guests by: their measured demand and the
    /// configured prior, or (`shared_balance = "vcpus"`) one per vCPU.
    pub(super) fn load(&self) -> Load {
        match self.config.shared_balance {
            SharedBalance::Demand => {
                let (demand, settling) = self.observer.demand();
                Load {
                    demand,
                    settling,
                    moves: HashMap::new(),
                    prior_per_vcpu: self.config.demand_prior_per_vcpu,
                }
            }
            SharedBalance::Vcpus => Load::prior(1.0),
        }
    }

    /// The plan for `specs` as things stand, and the load it weighed
    /// shared guests by.
    pub(super) fn plan(&self, specs: &[DomainSpec]) -> (Plan, Load) {
        let load = self.load();
        let plan = reconcile::plan_for(&self.topology, &self.host, specs, &load);
        (plan, load)
    }

    /// `plan`, with the moves rebalancing decides on a fresh observation
    /// planned in (the plan as it was when there are none).
    pub(super) fn rebalanced(&mut self, plan: Plan, specs: &[DomainSpec], mut load: Load) -> Plan {
        let observation = self.observer.observations;
        if observation == self.rebalancing.sampled
            || self.config.shared_balance == SharedBalance::Vcpus
        {
            return plan;
        }
        self.rebalancing.sampled = observation;
        let host_load = placement::host_load(&self.topology, &plan, &load);
        let now = self.rebalancing.epoch.elapsed().as_secs_f64();
        let rules = self.config.rebalance;
        let moves = self.rebalancing.rebalancer.step(&rules, &host_load, now);
        if moves.is_empty() {
            return plan;
        }
        for m in &moves {
            self.note_move(m);
            load.moves.insert(m.uuid.clone(), m.to.clone());
        }
        reconcile::plan_for(&self.topology, &self.host, specs, &load)
    }

    /// Logs, counts and keeps one move for status.
    fn note_move(&mut self, m: &Move) {
        let (from, to) = (m.from.to_string(), m.to.to_string());
        let (busy, idle) = (format!("{:.2}", m.busy), format!("{:.2}", m.idle));
        let message = format!(
            "rebalancing: moving to CPUs {to}{}: its range carries {busy} CPUs of demand per pCPU, CPUs {to}'s range {idle}",
            if m.across_nodes { " on another node (its memory follows, paced)" } else { "" },
        );
        let fields = [
            ("DOMAIN", m.name.as_str()),
            ("OP", "rebalance"),
            ("FROM", &from),
            ("TO", &to),
        ];
        self.logger.info(&message, &fields);
        self.counters.rebalance_moves += 1;
        let recent = &mut self.rebalancing.recent;
        if recent.len() == RECENT_MOVES {
            recent.pop_front();
        }
        recent.push_back(RebalanceStatus {
            domain: m.name.clone(),
            uuid: m.uuid.clone(),
            from: m.from.to_vec(),
            to: m.to.to_vec(),
            across_nodes: m.across_nodes,
            busy: m.busy,
            idle: m.idle,
            at_unix_secs: unix_now_ns() / 1_000_000_000,
        });
    }
}
