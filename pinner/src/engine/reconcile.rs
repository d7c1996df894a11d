//! One reconcile: read the running domains, plan, apply only what differs.
//! Level-triggered: it needs no memory of earlier events, so a missed event
//! or a daemon restart costs nothing but a delay.

use crate::engine::cpuset::CpuSet;
use crate::engine::domain::DomainSpec;
use crate::engine::hypervisor::{HvError, Hypervisor};
use crate::engine::memory::PageKind;
use crate::engine::placement::{
    self, Guest, GuestPlan, HostPolicy, LeftAlone, Load, Placement, Plan, Role, Warning,
};
use crate::engine::policy::Decision;
use crate::engine::topology::Topology;
use pinner_shared::log::Level;
use pinner_shared::protocol::{
    DomainStatus, NodeMemoryStatus, PendingChange, RangeStatus, VcpuStatus,
};
use std::collections::{BTreeMap, HashMap};

/// One change to make on a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Marks the domain as pinner's before any pin, so pins survive a crash
    /// mid-apply as recognisably ours rather than someone else's.
    SetMetadata {
        element: String,
    },
    PinVcpu {
        vcpu: u32,
        cpus: CpuSet,
    },
    PinEmulator {
        cpus: CpuSet,
    },
    PinIothread {
        iothread: u32,
        cpus: CpuSet,
    },
    /// numatune nodeset. `restrictive`: the guest has no binding yet, so
    /// it gets mode `restrictive` with it, the one mode whose nodeset
    /// libvirt changes live; a `strict` binding could never follow its
    /// vCPUs to another node.
    SetMemoryNodes {
        nodes: CpuSet,
        restrictive: bool,
    },
}

impl Action {
    /// The pin this action sets, named as libvirt's `tunable` event names
    /// it (`cputune.vcpupin3`), so that event can be told from a change by
    /// someone else.
    pub fn pin_field(&self) -> Option<(String, &CpuSet)> {
        match self {
            Action::PinVcpu { vcpu, cpus } => Some((format!("cputune.vcpupin{vcpu}"), cpus)),
            Action::PinEmulator { cpus } => Some(("cputune.emulatorpin".into(), cpus)),
            Action::PinIothread { iothread, cpus } => {
                Some((format!("cputune.iothreadpin{iothread}"), cpus))
            }
            Action::SetMetadata { .. } | Action::SetMemoryNodes { .. } => None,
        }
    }

    /// How the change is logged once made: its message and its journald
    /// fields (OP first; the caller adds DOMAIN).
    pub fn describe(&self) -> (String, Vec<(&'static str, String)>) {
        let cpus = |cpus: &CpuSet| ("CPUS", cpus.to_string());
        match self {
            Action::SetMetadata { element } => (
                format!("marked as managed: {element}"),
                vec![("OP", "metadata".into())],
            ),
            Action::PinVcpu { vcpu, cpus: set } => (
                format!("pinned vCPU {vcpu} to CPUs {set}"),
                vec![
                    ("OP", "pin_vcpu".into()),
                    ("VCPU", vcpu.to_string()),
                    cpus(set),
                ],
            ),
            Action::PinEmulator { cpus: set } => (
                format!("pinned emulator threads to CPUs {set}"),
                vec![("OP", "pin_emulator".into()), cpus(set)],
            ),
            Action::PinIothread {
                iothread,
                cpus: set,
            } => (
                format!("pinned IOThread {iothread} to CPUs {set}"),
                vec![("OP", "pin_iothread".into()), cpus(set)],
            ),
            Action::SetMemoryNodes { nodes, restrictive } => (
                format!(
                    "bound memory to NUMA nodes {nodes}{}",
                    if *restrictive {
                        " (mode restrictive)"
                    } else {
                        ""
                    }
                ),
                vec![("OP", "memory".into()), ("NODES", nodes.to_string())],
            ),
        }
    }

    /// The change as still to make on `spec`, for status and the
    /// observe-mode journal ("would move vCPU 2 from 4-7 to 9"); None for
    /// marking, which is bookkeeping.
    pub fn pending(&self, spec: &DomainSpec) -> Option<PendingChange> {
        let list = |set: Option<&CpuSet>| set.map(CpuSet::to_vec).unwrap_or_default();
        let (op, id, from, to, what) = match self {
            Action::SetMetadata { .. } => return None,
            Action::PinVcpu { vcpu, cpus } => {
                let from = spec.vcpu_pin(*vcpu);
                ("pin_vcpu", Some(*vcpu), from, cpus, format!("vCPU {vcpu}"))
            }
            Action::PinEmulator { cpus } => (
                "pin_emulator",
                None,
                spec.emulator_pin.as_ref(),
                cpus,
                "emulator threads".to_string(),
            ),
            Action::PinIothread { iothread, cpus } => (
                "pin_iothread",
                Some(*iothread),
                spec.iothread_pins.get(iothread),
                cpus,
                format!("IOThread {iothread}"),
            ),
            Action::SetMemoryNodes { nodes, .. } => {
                let from = spec.memory_nodes.as_ref();
                let text = match from {
                    Some(now) => format!(
                        "would move memory from {} to {}",
                        nodes_word(now),
                        nodes_word(nodes)
                    ),
                    None => format!("would bind memory to {}", nodes_word(nodes)),
                };
                return Some(PendingChange {
                    op: "memory".into(),
                    id: None,
                    from: list(from),
                    to: nodes.to_vec(),
                    text,
                });
            }
        };
        let text = match from {
            Some(now) => format!("would move {what} from {now} to {to}"),
            None => format!("would pin {what} (now on any CPU) to {to}"),
        };
        Some(PendingChange {
            op: op.into(),
            id,
            from: list(from),
            to: to.to_vec(),
            text,
        })
    }

    /// Marking a domain is bookkeeping; every other change is news.
    pub fn log_level(&self) -> Level {
        match self {
            Action::SetMetadata { .. } => Level::Debug,
            _ => Level::Info,
        }
    }
}

/// A change libvirt did not make.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("{domain}: busy, will retry: {message}")]
    Busy { domain: String, message: String },
    #[error("{domain}: {message}")]
    Failed { domain: String, message: String },
}

/// "node 1", "nodes 0-1".
fn nodes_word(nodes: &CpuSet) -> String {
    match nodes.len() {
        1 => format!("node {nodes}"),
        _ => format!("nodes {nodes}"),
    }
}

/// The changes for one domain, in the order they must be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainActions {
    pub name: String,
    pub uuid: String,
    pub actions: Vec<Action>,
}

/// What placement sees of each running domain (`default_hugepage_kib`:
/// the host's default huge page size, for guests that name none), each
/// given its role by the host's rules.
pub fn guests_of(
    specs: &[DomainSpec],
    default_hugepage_kib: Option<u64>,
    host: &HostPolicy,
) -> Vec<Guest> {
    specs
        .iter()
        .map(|spec| {
            let role = match host.rules.decide(spec, host.nova_pins()) {
                Decision::Place(policy) => Role::Managed {
                    policy,
                    current: (0..spec.vcpus).map(|v| spec.vcpu_pin(v).cloned()).collect(),
                },
                Decision::Foreign { taken } => Role::Foreign { taken },
                Decision::NovaFloating => Role::Foreign {
                    taken: CpuSet::new(),
                },
                Decision::LeftAlone(_) => Role::OptedOut,
            };
            Guest {
                name: spec.name.clone(),
                uuid: spec.uuid.clone(),
                vcpus: spec.vcpus,
                cells: spec.cells.clone(),
                memory: spec.memory_by_cell(default_hugepage_kib),
                memory_nodes: spec.memory_nodes.clone(),
                role,
            }
        })
        .collect()
}

/// The plan for the running domains `specs`, shared guests weighed (and
/// moved) by `load`.
pub fn plan_for(topology: &Topology, host: &HostPolicy, specs: &[DomainSpec], load: &Load) -> Plan {
    let guests = guests_of(specs, topology.default_hugepage_kib, host);
    let mut plan = placement::plan_loaded(topology, host, &guests, load);
    plan.left_alone = specs
        .iter()
        .filter_map(|spec| {
            let (policy, why) = host.rules.decide(spec, host.nova_pins()).left_alone()?;
            Some(LeftAlone {
                uuid: spec.uuid.clone(),
                name: spec.name.clone(),
                policy,
                why,
            })
        })
        .collect();
    for spec in specs {
        if let Some(word) = spec
            .metadata
            .as_ref()
            .and_then(|m| m.unknown_policy.as_deref())
        {
            plan.warnings.push(Warning::UnknownPolicy {
                guest: spec.name.clone(),
                word: word.to_string(),
            });
        }
    }
    plan
}

/// Domains whose memory binding libvirt refused, by uuid, with its reason:
/// not retried on every pass, and shown in status.
pub type MemoryRefusals = BTreeMap<String, String>;

/// Why pinner will not touch a domain's memory binding, if it will not.
fn memory_hold(spec: &DomainSpec, refused: &MemoryRefusals) -> Option<String> {
    if let Some(reason) = refused.get(&spec.uuid) {
        let advice = if spec.memory_mode.as_deref() == Some("strict") {
            "; libvirt moves a running guest's memory only in mode restrictive: \
             start it with <memory mode='restrictive'/> (or without <numatune>) \
             to let its memory follow its vCPUs"
        } else {
            ""
        };
        return Some(format!(
            "libvirt refused the memory binding: {reason}{advice}"
        ));
    }
    match spec.memory_mode.as_deref() {
        None | Some("strict") | Some("restrictive") => None,
        Some(mode) => Some(format!(
            "memory mode {mode:?} cannot change while running; left as it is"
        )),
    }
}

/// The difference between what libvirt holds and the plan.
pub fn diff(specs: &[DomainSpec], plan: &Plan, refused: &MemoryRefusals) -> Vec<DomainActions> {
    let by_uuid: HashMap<&str, &DomainSpec> = specs.iter().map(|s| (s.uuid.as_str(), s)).collect();
    plan.guests
        .iter()
        .filter_map(|gp| {
            let spec = *by_uuid.get(gp.uuid.as_str())?;
            let mut actions = Vec::new();
            let recorded_mode = spec.metadata.as_ref().and_then(|m| m.mode.as_deref());
            if recorded_mode != Some(gp.placement.as_str()) {
                let meta = spec.metadata.clone().unwrap_or_default();
                actions.push(Action::SetMetadata {
                    element: meta.to_xml(gp.placement.as_str()),
                });
            }
            for (vcpu, cpus) in gp.vcpus.iter().enumerate() {
                if spec.vcpu_pin(vcpu as u32) != Some(cpus) {
                    actions.push(Action::PinVcpu {
                        vcpu: vcpu as u32,
                        cpus: cpus.clone(),
                    });
                }
            }
            if spec.emulator_pin.as_ref() != Some(&gp.emulator) {
                actions.push(Action::PinEmulator {
                    cpus: gp.emulator.clone(),
                });
            }
            for &iothread in &spec.iothreads {
                if spec.iothread_pins.get(&iothread) != Some(&gp.emulator) {
                    actions.push(Action::PinIothread {
                        iothread,
                        cpus: gp.emulator.clone(),
                    });
                }
            }
            if let Some(nodes) = planned_memory(gp) {
                if spec.memory_nodes.as_ref() != Some(&nodes)
                    && memory_hold(spec, refused).is_none()
                {
                    actions.push(Action::SetMemoryNodes {
                        nodes,
                        restrictive: spec.memory_mode.is_none(),
                    });
                }
            }
            (!actions.is_empty()).then(|| DomainActions {
                name: gp.name.clone(),
                uuid: gp.uuid.clone(),
                actions,
            })
        })
        .collect()
}

/// Each node's memory of each kind, as status and `plan --json` show it.
pub fn node_memory(plan: &Plan) -> Vec<NodeMemoryStatus> {
    plan.memory
        .iter()
        .map(|pool| NodeMemoryStatus {
            node: pool.node,
            kind: pool.kind.metric_label(),
            page_size_kib: match pool.kind {
                PageKind::Huge(kib) => Some(kib),
                PageKind::Normal => None,
            },
            capacity_kib: pool.capacity_kib,
            committed_kib: pool.committed_kib,
        })
        .collect()
}

/// Each range the plan binds shared guests to, with their demand (from
/// `load`, else its prior), by CPUs.
pub fn range_status(topology: &Topology, plan: &Plan, load: &Load) -> Vec<RangeStatus> {
    let mut ranges: BTreeMap<Vec<u32>, RangeStatus> = BTreeMap::new();
    let shared = plan
        .guests
        .iter()
        .filter(|g| g.placement == Placement::Shared);
    for g in shared {
        let cpus = g.vcpu_cpus();
        let vcpus = g.vcpus.len() as u32;
        let range = ranges.entry(cpus.to_vec()).or_insert_with(|| RangeStatus {
            cpus: cpus.to_vec(),
            nodes: topology.nodes_of(&cpus),
            ..RangeStatus::default()
        });
        range.guests += 1;
        range.vcpus += vcpus;
        range.demand_cpus += load.demand_of(&g.uuid, vcpus);
        range.unmeasured += u32::from(!load.demand.contains_key(&g.uuid));
    }
    ranges.into_values().collect()
}

fn planned_memory(gp: &crate::engine::placement::GuestPlan) -> Option<CpuSet> {
    gp.memory_nodes
        .as_ref()
        .map(|n| n.iter().copied().collect())
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    pub changed: u32,
    pub errors: Vec<ApplyError>,
    /// Some domain was busy with another libvirt job: try again soon.
    pub busy: bool,
    /// Memory bindings libvirt refused: (uuid, reason).
    pub memory_refused: Vec<(String, String)>,
    /// Domains whose actions did not all apply (busy, gone, failed).
    pub unsettled: Vec<String>,
}

/// Applies the actions; a domain that is busy or gone is skipped (its
/// remaining actions with it), a lost connection stops everything.
pub fn apply(
    hv: &mut dyn Hypervisor,
    work: &[DomainActions],
    mut on_applied: impl FnMut(&DomainActions, &Action),
) -> Result<ApplyOutcome, HvError> {
    let mut outcome = ApplyOutcome::default();
    for domain in work {
        if domain.actions.is_empty() {
            continue;
        }
        match hv.job_active(&domain.uuid) {
            Ok(false) => {}
            Ok(true) => {
                outcome.busy = true;
                outcome.unsettled.push(domain.uuid.clone());
                continue;
            }
            Err(HvError::Disconnected(m)) => return Err(HvError::Disconnected(m)),
            Err(HvError::Gone(_)) => {
                outcome.unsettled.push(domain.uuid.clone());
                continue;
            }
            // Unknown: try the changes; they report for themselves.
            Err(_) => {}
        }
        for action in &domain.actions {
            let result = match action {
                Action::SetMetadata { element } => hv.set_metadata(&domain.uuid, element, false),
                Action::PinVcpu { vcpu, cpus } => hv.pin_vcpu(&domain.uuid, *vcpu, cpus),
                Action::PinEmulator { cpus } => hv.pin_emulator(&domain.uuid, cpus),
                Action::PinIothread { iothread, cpus } => {
                    hv.pin_iothread(&domain.uuid, *iothread, cpus)
                }
                Action::SetMemoryNodes { nodes, restrictive } => {
                    hv.set_memory_nodes(&domain.uuid, nodes, *restrictive)
                }
            };
            match result {
                Ok(()) => {
                    if !matches!(action, Action::SetMetadata { .. }) {
                        outcome.changed += 1;
                    }
                    on_applied(domain, action);
                }
                Err(e @ (HvError::Disconnected(_) | HvError::Unreachable(_))) => return Err(e),
                // Stopped meanwhile: nothing to do, and no error to report.
                Err(HvError::Gone(_)) => {
                    outcome.unsettled.push(domain.uuid.clone());
                    break;
                }
                Err(HvError::Busy(m)) => {
                    outcome.busy = true;
                    outcome.errors.push(ApplyError::Busy {
                        domain: domain.name.clone(),
                        message: m,
                    });
                    outcome.unsettled.push(domain.uuid.clone());
                    break;
                }
                // Memory is the one change libvirt may refuse for good
                // (e.g. a mode it cannot change live); the pins stand.
                Err(HvError::Other(m)) if matches!(action, Action::SetMemoryNodes { .. }) => {
                    outcome.memory_refused.push((domain.uuid.clone(), m));
                }
                Err(HvError::Other(m)) => {
                    outcome.errors.push(ApplyError::Failed {
                        domain: domain.name.clone(),
                        message: m,
                    });
                    outcome.unsettled.push(domain.uuid.clone());
                    break;
                }
            }
        }
    }
    Ok(outcome)
}

/// The policy status shows for a domain, and why.
pub fn policy_and_reason(
    spec: &DomainSpec,
    plan: &Plan,
    gp: Option<&GuestPlan>,
) -> (String, String) {
    if let Some(g) = gp {
        return (g.placement.as_str().to_string(), g.reason.clone());
    }
    if let Some(alone) = plan.left_alone.iter().find(|a| a.uuid == spec.uuid) {
        return (alone.policy.to_string(), alone.why.clone());
    }
    let why = match spec.vcpus {
        0 => "no vCPUs to place",
        _ => "not placed: no CPUs left for guests (see warnings)",
    };
    ("none".to_string(), why.to_string())
}

/// Per-domain status: what libvirt holds next to what the plan says
/// (`default_hugepage_kib`: the host's, for guests that name no size).
pub fn domain_status(
    specs: &[DomainSpec],
    plan: &Plan,
    refused: &MemoryRefusals,
    default_hugepage_kib: Option<u64>,
) -> Vec<DomainStatus> {
    let planned: HashMap<&str, &crate::engine::placement::GuestPlan> =
        plan.guests.iter().map(|g| (g.uuid.as_str(), g)).collect();
    let mut out: Vec<DomainStatus> = specs
        .iter()
        .map(|spec| {
            let gp = planned.get(spec.uuid.as_str()).copied();
            let current = |v: u32| spec.vcpu_pin(v).map(CpuSet::to_vec).unwrap_or_default();
            let vcpus = (0..spec.vcpus)
                .map(|v| VcpuStatus {
                    vcpu: v,
                    cpus: current(v),
                    planned: gp.map_or_else(|| current(v), |g| g.vcpus[v as usize].to_vec()),
                })
                .collect::<Vec<_>>();
            let emulator = spec
                .emulator_pin
                .as_ref()
                .map(CpuSet::to_vec)
                .unwrap_or_default();
            let planned_emulator = gp.map_or_else(|| emulator.clone(), |g| g.emulator.to_vec());
            let (policy, reason) = policy_and_reason(spec, plan, gp);
            let memory_nodes: Vec<u32> = spec
                .memory_nodes
                .as_ref()
                .map(CpuSet::to_vec)
                .unwrap_or_default();
            let hold = memory_hold(spec, refused);
            let planned_memory_nodes = match gp.and_then(planned_memory) {
                Some(nodes) if hold.is_none() => nodes.to_vec(),
                _ => memory_nodes.clone(),
            };
            let in_sync = vcpus.iter().all(|v| v.cpus == v.planned)
                && emulator == planned_emulator
                && memory_nodes == planned_memory_nodes;
            DomainStatus {
                name: spec.name.clone(),
                uuid: spec.uuid.clone(),
                policy,
                vcpus,
                emulator,
                planned_emulator,
                in_sync,
                reason,
                memory_nodes,
                planned_memory_nodes,
                memory_note: match gp {
                    Some(g) if g.memory_unbound => format!(
                        "fits no set of nodes: left unbound ({} of it)",
                        crate::engine::memory::human(spec.memory_kib)
                    ),
                    Some(_) => hold.unwrap_or_default(),
                    None => String::new(),
                },
                memory_kib: spec.memory_kib,
                hugepage_kib: match spec.page_kind(None, default_hugepage_kib) {
                    PageKind::Huge(kib) => Some(kib),
                    PageKind::Normal => None,
                },
                ..DomainStatus::default()
            }
        })
        .collect();
    fill_pending(&mut out, specs, plan, refused);
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Each domain's changes still to make, from the same diff a pass applies.
fn fill_pending(
    domains: &mut [DomainStatus],
    specs: &[DomainSpec],
    plan: &Plan,
    refused: &MemoryRefusals,
) {
    for work in diff(specs, plan, refused) {
        let spec = specs.iter().find(|s| s.uuid == work.uuid);
        let domain = domains.iter_mut().find(|d| d.uuid == work.uuid);
        if let (Some(spec), Some(domain)) = (spec, domain) {
            domain.pending = work
                .actions
                .iter()
                .filter_map(|a| a.pending(spec))
                .collect();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::hypervisor::fake::FakeHypervisor;

    fn reconcile(hv: &mut FakeHypervisor) -> Result<(Plan, ApplyOutcome), HvError> {
        let topo = Topology::uniform(&CpuSet::parse("0-3").unwrap(), 1);
        let policy = HostPolicy::with_reserved(CpuSet::parse("0").unwrap());
        let (specs, _) = hv.running_domains()?;
        let plan = plan_for(&topo, &policy, &specs, &Load::default());
        let work = diff(&specs, &plan, &MemoryRefusals::new());
        let outcome = apply(hv, &work, |_, _| {})?;
        Ok((plan, outcome))
    }

    fn vm(name: &str, vcpus: u32, extra: &str) -> String {
        format!(
            "<domain><name>{name}</name><uuid>u-{name}</uuid><vcpu>{vcpus}</vcpu>{extra}</domain>"
        )
    }

    #[test]
    fn converges_and_then_changes_nothing() {
        let mut hv = FakeHypervisor::default();
        hv.add(&vm("a", 2, ""));
        let (plan, outcome) = reconcile(&mut hv).unwrap();
        assert_eq!(
            outcome.changed, 4,
            "two vCPU pins, the emulator pin, memory"
        );
        let a = &hv.domains["u-a"];
        assert_eq!(
            a.metadata.as_ref().unwrap().mode.as_deref(),
            Some("dedicated")
        );
        assert_eq!(a.emulator_pin, Some(CpuSet::parse("0").unwrap()));
        assert_eq!(
            a.memory_nodes.as_ref().unwrap().to_string(),
            "0",
            "memory on the vCPUs' node"
        );
        let status = domain_status(std::slice::from_ref(a), &plan, &MemoryRefusals::new(), None);
        assert!(status[0].in_sync);

        let calls = hv.calls;
        let (_, again) = reconcile(&mut hv).unwrap();
        assert_eq!(again, ApplyOutcome::default());
        assert_eq!(hv.calls, calls, "a settled host costs no libvirt writes");
    }

    #[test]
    fn foreign_and_opted_out_domains_are_never_touched() {
        let mut hv = FakeHypervisor::default();
        hv.add(&vm(
            "nova",
            1,
            "<cputune><vcpupin vcpu='0' cpuset='1'/></cputune>",
        ));
        hv.add(&vm(
            "optout",
            1,
            r#"<metadata><p:state xmlns:p="urn:pinner:1" policy="none"/></metadata>"#,
        ));
        hv.add(&vm("a", 1, ""));
        let before_nova = hv.domains["u-nova"].clone();
        let before_optout = hv.domains["u-optout"].clone();
        let (plan, _) = reconcile(&mut hv).unwrap();
        assert_eq!(hv.domains["u-nova"], before_nova);
        assert_eq!(hv.domains["u-optout"], before_optout);
        assert!(
            !hv.domains["u-a"].vcpu_pins[&0].contains(1),
            "CPU 1 is nova's"
        );
        let specs: Vec<_> = hv.domains.values().cloned().collect();
        let status = domain_status(&specs, &plan, &MemoryRefusals::new(), None);
        let policies: Vec<_> = status
            .iter()
            .map(|s| (s.name.as_str(), s.policy.as_str()))
            .collect();
        assert_eq!(
            policies,
            vec![("a", "dedicated"), ("nova", "foreign"), ("optout", "none")]
        );
    }

    #[test]
    fn errors_are_classified() {
        let mut hv = FakeHypervisor::default();
        hv.add(&vm("a", 1, ""));
        hv.fail_with = Some(HvError::Busy("cannot acquire state change lock".into()));
        let (_, outcome) = reconcile(&mut hv).unwrap();
        assert!(outcome.busy);
        assert_eq!(
            outcome.errors.len(),
            1,
            "one error per domain, not per action"
        );

        hv.fail_with = Some(HvError::Gone("domain is not running".into()));
        let (_, outcome) = reconcile(&mut hv).unwrap();
        assert_eq!(
            outcome,
            ApplyOutcome {
                unsettled: vec!["u-a".into()],
                ..ApplyOutcome::default()
            },
            "a guest that stopped is no error"
        );

        hv.fail_with = Some(HvError::Disconnected("eof".into()));
        assert!(matches!(reconcile(&mut hv), Err(HvError::Disconnected(_))));
    }

    #[test]
    fn a_guest_in_a_libvirt_job_waits_and_holds_up_nobody() {
        let mut hv = FakeHypervisor::default();
        hv.add(&vm("a", 1, ""));
        hv.add(&vm("b", 1, ""));
        hv.in_job = vec!["u-a".into()];
        let (_, outcome) = reconcile(&mut hv).unwrap();
        assert!(outcome.busy, "retried soon");
        assert_eq!(outcome.unsettled, ["u-a"]);
        assert!(outcome.errors.is_empty(), "a job is no error");
        assert!(hv.domains["u-a"].vcpu_pins.is_empty());
        assert!(!hv.domains["u-b"].vcpu_pins.is_empty());
        hv.in_job.clear();
        let (_, outcome) = reconcile(&mut hv).unwrap();
        assert!(!outcome.busy && outcome.unsettled.is_empty());
        assert!(!hv.domains["u-a"].vcpu_pins.is_empty());
    }
}

#[cfg(test)]
mod memory_tests {
    use super::*;
    use crate::engine::topology::Topology;

    #[test]
    fn iothreads_follow_the_emulator_and_memory_modes_are_respected() {
        let xml = "<domain><name>io</name><uuid>u-io</uuid><vcpu>1</vcpu><iothreads>2</iothreads>\
                   <numatune><memory mode='interleave' nodeset='0'/></numatune></domain>";
        let specs = vec![DomainSpec::parse(xml).unwrap()];
        let topo = Topology::uniform(&CpuSet::parse("0-3").unwrap(), 1);
        let plan = plan_for(
            &topo,
            &HostPolicy::with_reserved(CpuSet::parse("0").unwrap()),
            &specs,
            &Load::default(),
        );
        let work = diff(&specs, &plan, &MemoryRefusals::new());
        let iothreads: Vec<_> = work[0]
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::PinIothread { iothread, cpus } => Some((*iothread, cpus.to_string())),
                _ => None,
            })
            .collect();
        assert_eq!(iothreads, vec![(1, "0".to_string()), (2, "0".to_string())]);
        assert!(
            !work[0]
                .actions
                .iter()
                .any(|a| matches!(a, Action::SetMemoryNodes { .. })),
            "an interleave mode set by the operator cannot change live"
        );
        let status = domain_status(&specs, &plan, &MemoryRefusals::new(), None);
        assert!(
            status[0].memory_note.contains("interleave"),
            "{}",
            status[0].memory_note
        );
    }

    #[test]
    fn a_refused_memory_binding_is_remembered_not_retried() {
        let xml = "<domain><name>m</name><uuid>u-m</uuid><vcpu>1</vcpu></domain>";
        let specs = vec![DomainSpec::parse(xml).unwrap()];
        let topo = Topology::uniform(&CpuSet::parse("0-3").unwrap(), 1);
        let plan = plan_for(
            &topo,
            &HostPolicy::with_reserved(CpuSet::new()),
            &specs,
            &Load::default(),
        );
        let mut refused = MemoryRefusals::new();
        assert!(diff(&specs, &plan, &refused)[0]
            .actions
            .iter()
            .any(|a| matches!(a, Action::SetMemoryNodes { .. })));
        refused.insert("u-m".into(), "unsupported".into());
        assert!(!diff(&specs, &plan, &refused)[0]
            .actions
            .iter()
            .any(|a| matches!(a, Action::SetMemoryNodes { .. })));
        let status = domain_status(&specs, &plan, &refused, None);
        assert!(status[0].memory_note.contains("refused"));
    }

    /// The memory action planned for a one-vCPU guest with `numatune` on
    /// a two-node host whose node 0 is reserved (so it goes to node 1).
    fn memory_action(numatune: &str) -> (Option<Action>, String) {
        let xml =
            format!("<domain><name>m</name><uuid>u-m</uuid><vcpu>1</vcpu>{numatune}</domain>");
        let specs = vec![DomainSpec::parse(&xml).unwrap()];
        let topo = Topology::uniform(&CpuSet::parse("0-3").unwrap(), 2);
        let plan = plan_for(
            &topo,
            &HostPolicy::with_reserved(CpuSet::parse("0-1").unwrap()),
            &specs,
            &Load::default(),
        );
        let action = diff(&specs, &plan, &MemoryRefusals::new())[0]
            .actions
            .iter()
            .find(|a| matches!(a, Action::SetMemoryNodes { .. }))
            .cloned();
        let mut refused = MemoryRefusals::new();
        refused.insert("u-m".into(), "requires restrictive numa mode".into());
        (
            action,
            domain_status(&specs, &plan, &refused, None)[0]
                .memory_note
                .clone(),
        )
    }

    #[test]
    fn memory_is_bound_so_that_it_can_follow_the_vcpus_later() {
        let nodes = CpuSet::parse("1").unwrap();
        let (unbound, _) = memory_action("");
        assert_eq!(
            unbound,
            Some(Action::SetMemoryNodes {
                nodes: nodes.clone(),
                restrictive: true
            }),
            "a guest without a binding gets mode restrictive, whose nodeset libvirt changes live"
        );
        let (restrictive, _) =
            memory_action("<numatune><memory mode='restrictive' nodeset='0'/></numatune>");
        assert_eq!(
            restrictive,
            Some(Action::SetMemoryNodes {
                nodes: nodes.clone(),
                restrictive: false
            }),
            "a restrictive binding moves with its vCPUs, mode unchanged"
        );
        let (strict, note) =
            memory_action("<numatune><memory mode='strict' nodeset='0'/></numatune>");
        assert_eq!(
            strict,
            Some(Action::SetMemoryNodes {
                nodes,
                restrictive: false
            })
        );
        assert!(
            note.contains("mode='restrictive'"),
            "a strict binding libvirt refuses to move says what to do: {note}"
        );
    }
}
