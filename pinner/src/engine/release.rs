//! `pinner release`: the way back. A guest pinner placed is marked
//! `policy="none"` first (so no pass places it again meanwhile), then its
//! vCPUs, emulator and I/O threads float on every online CPU again and its
//! memory may be on every node with memory: as libvirt had it before
//! pinner. Its persistent definition is marked too only when asked.

use crate::engine::cpuset::CpuSet;
use crate::engine::domain::{DomainSpec, PinnerMetadata, Policy};
use crate::engine::hypervisor::{HvError, Hypervisor};
use crate::engine::reconcile::{apply, Action, DomainActions};
use pinner_shared::protocol::{ReleaseRequest, Released};

/// Where a released guest may run and keep memory: the host's online CPUs
/// and its nodes with memory.
pub struct Everywhere {
    pub cpus: CpuSet,
    pub nodes: CpuSet,
}

impl Everywhere {
    pub fn of(topology: &crate::engine::topology::Topology) -> Everywhere {
        let nodes: CpuSet = topology
            .numa_nodes
            .iter()
            .filter(|n| n.memory_mib != Some(0))
            .map(|n| n.id)
            .collect();
        Everywhere {
            cpus: topology.online.clone(),
            nodes: if nodes.is_empty() {
                [0].into_iter().collect()
            } else {
                nodes
            },
        }
    }
}

/// The metadata element a released guest carries: opted out, with no
/// placement recorded.
pub fn released_element() -> String {
    PinnerMetadata {
        policy: Some(Policy::None),
        ..PinnerMetadata::default()
    }
    .to_xml("none")
}

/// The guests `request` names (each named one that is not running is
/// reported as such), with what is left as it is.
fn targets<'a>(
    specs: &'a [DomainSpec],
    request: &ReleaseRequest,
) -> (Vec<&'a DomainSpec>, Vec<Released>) {
    let placed = |s: &DomainSpec| {
        s.metadata
            .as_ref()
            .is_some_and(|m| m.policy != Some(Policy::None))
    };
    let mut chosen: Vec<&DomainSpec> = Vec::new();
    let mut reports = Vec::new();
    if request.all {
        chosen.extend(specs.iter().filter(|s| placed(s)));
    }
    for name in &request.domains {
        match specs.iter().find(|s| &s.name == name) {
            Some(spec) if placed(spec) => {
                if !chosen.iter().any(|c| c.uuid == spec.uuid) {
                    chosen.push(spec);
                }
            }
            Some(spec) => {
                let why = match &spec.metadata {
                    Some(_) => "already left alone (policy none); nothing to release",
                    None => "not placed by pinner (no pinner metadata); left as it is",
                };
                reports.push(report(spec, Vec::new(), vec![why.into()]));
            }
            None => reports.push(Released {
                name: name.clone(),
                error: Some(format!("no running guest named {name:?}")),
                ..Released::default()
            }),
        }
    }
    (chosen, reports)
}

fn report(spec: &DomainSpec, changes: Vec<String>, notes: Vec<String>) -> Released {
    Released {
        name: spec.name.clone(),
        uuid: spec.uuid.clone(),
        changes,
        notes,
        error: None,
    }
}

/// The changes that release `spec`, each with its words, and what stays.
fn release_actions(
    spec: &DomainSpec,
    everywhere: &Everywhere,
) -> (Vec<(Action, String)>, Vec<String>) {
    let all = &everywhere.cpus;
    let shown = |set: Option<&CpuSet>| set.map_or("any CPU".to_string(), CpuSet::to_string);
    let mut actions = vec![(
        Action::SetMetadata {
            element: released_element(),
        },
        "marked policy none: left alone until it stops".to_string(),
    )];
    for vcpu in 0..spec.vcpus {
        let now = spec.vcpu_pin(vcpu);
        if now != Some(all) {
            let words = format!("vCPU {vcpu}: {} -> {all}", shown(now));
            actions.push((
                Action::PinVcpu {
                    vcpu,
                    cpus: all.clone(),
                },
                words,
            ));
        }
    }
    if spec.emulator_pin.as_ref().is_some_and(|p| p != all) {
        let words = format!("emulator: {} -> {all}", shown(spec.emulator_pin.as_ref()));
        actions.push((Action::PinEmulator { cpus: all.clone() }, words));
    }
    for (&iothread, pin) in spec.iothread_pins.iter().filter(|(_, p)| *p != all) {
        let words = format!("IOThread {iothread}: {pin} -> {all}");
        actions.push((
            Action::PinIothread {
                iothread,
                cpus: all.clone(),
            },
            words,
        ));
    }
    let mut notes = Vec::new();
    match (&spec.memory_nodes, spec.memory_mode.as_deref()) {
        (Some(nodes), _) if nodes == &everywhere.nodes => {}
        (Some(nodes), None | Some("restrictive")) => {
            let words = format!("memory: nodes {nodes} -> {}", everywhere.nodes);
            let nodes = everywhere.nodes.clone();
            actions.push((Action::SetMemoryNodes { nodes, restrictive: false }, words));
        }
        (Some(nodes), Some(mode)) => notes.push(format!(
            "memory binding to nodes {nodes} in mode {mode} left: libvirt cannot change it while the guest runs"
        )),
        (None, _) => {}
    }
    (actions, notes)
}

/// Releases the guests `request` names from `hv`: marks each, then unpins
/// it; reports per guest what changed, and each change made to
/// `on_applied` as it is made. A lost connection stops it all.
pub fn release(
    hv: &mut dyn Hypervisor,
    everywhere: &Everywhere,
    request: &ReleaseRequest,
    mut on_applied: impl FnMut(&DomainActions, &Action),
) -> Result<Vec<Released>, HvError> {
    let (specs, _) = hv.running_domains()?;
    let (chosen, mut reports) = targets(&specs, request);
    for spec in chosen {
        let (actions, mut notes) = release_actions(spec, everywhere);
        let work = DomainActions {
            name: spec.name.clone(),
            uuid: spec.uuid.clone(),
            actions: actions.iter().map(|(a, _)| a.clone()).collect(),
        };
        let mut changes = Vec::new();
        let outcome = apply(hv, std::slice::from_ref(&work), |domain, done| {
            if let Some((_, words)) = actions.iter().find(|(a, _)| a == done) {
                changes.push(words.clone());
            }
            on_applied(domain, done);
        })?;
        let mut released = report(spec, changes, Vec::new());
        released.error = outcome
            .errors
            .first()
            .map(ToString::to_string)
            .or_else(|| outcome.memory_refused.first().map(|(_, why)| why.clone()));
        if released.error.is_none() && request.persistent {
            match hv.set_metadata(&spec.uuid, &released_element(), true) {
                Ok(()) => released
                    .changes
                    .push("persistent definition marked policy none".into()),
                Err(e) => notes.push(format!("persistent definition not marked: {e}")),
            }
        }
        released.notes = notes;
        reports.push(released);
    }
    reports.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::hypervisor::fake::FakeHypervisor;

    fn set(text: &str) -> CpuSet {
        CpuSet::parse(text).unwrap()
    }

    fn host() -> FakeHypervisor {
        let mut hv = FakeHypervisor::default();
        let ours = |name: &str, extra: &str| {
            format!(
                "<domain><name>{name}</name><uuid>u-{name}</uuid><vcpu>2</vcpu>\
                 <metadata><p:state xmlns:p=\"urn:pinner:1\" mode=\"dedicated\"/></metadata>{extra}</domain>"
            )
        };
        let pins = "<cputune><vcpupin vcpu='0' cpuset='2'/><vcpupin vcpu='1' cpuset='3'/>\
                    <emulatorpin cpuset='0'/></cputune>";
        hv.add(&ours(
            "web",
            &format!("{pins}<numatune><memory mode='restrictive' nodeset='1'/></numatune>"),
        ));
        hv.add(&ours(
            "db",
            &format!("{pins}<numatune><memory mode='strict' nodeset='1'/></numatune>"),
        ));
        hv.add("<domain><name>nova</name><uuid>u-nova</uuid><vcpu cpuset='4-5'>2</vcpu></domain>");
        hv
    }

    fn everywhere() -> Everywhere {
        Everywhere {
            cpus: set("0-7"),
            nodes: set("0-1"),
        }
    }

    #[test]
    fn release_floats_the_guest_and_marks_it_left_alone() {
        let mut hv = host();
        let request = ReleaseRequest {
            domains: vec!["web".into(), "nova".into(), "gone".into()],
            ..ReleaseRequest::default()
        };
        let reports = release(&mut hv, &everywhere(), &request, |_, _| {}).unwrap();
        let names: Vec<&str> = reports.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["gone", "nova", "web"]);
        assert_eq!(
            reports[0].error.as_deref(),
            Some("no running guest named \"gone\"")
        );
        assert!(reports[1].notes[0].starts_with("not placed by pinner"));
        assert!(reports[1].changes.is_empty());
        let web = &reports[2];
        assert_eq!(
            web.changes,
            [
                "marked policy none: left alone until it stops",
                "vCPU 0: 2 -> 0-7",
                "vCPU 1: 3 -> 0-7",
                "emulator: 0 -> 0-7",
                "memory: nodes 1 -> 0-1",
            ]
        );
        let spec = &hv.domains["u-web"];
        assert_eq!(spec.vcpu_pin(0), Some(&set("0-7")));
        assert_eq!(spec.memory_nodes, Some(set("0-1")));
        assert_eq!(spec.metadata.as_ref().unwrap().policy, Some(Policy::None));
        assert!(
            hv.persistent_metadata.is_empty(),
            "persistent only when asked"
        );
        // The nova guest was not touched.
        assert_eq!(hv.domains["u-nova"].vcpu_default, Some(set("4-5")));
        // Released once, there is nothing more to release.
        let again = release(&mut hv, &everywhere(), &request, |_, _| {}).unwrap();
        assert!(again[2].notes[0].starts_with("already left alone"));
    }

    #[test]
    fn all_releases_every_placed_guest_and_says_what_it_could_not() {
        let mut hv = host();
        let request = ReleaseRequest {
            all: true,
            persistent: true,
            ..ReleaseRequest::default()
        };
        let reports = release(&mut hv, &everywhere(), &request, |_, _| {}).unwrap();
        let names: Vec<&str> = reports.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["db", "web"], "the nova guest is not pinner's");
        assert!(
            reports[0].notes[0].contains("mode strict left"),
            "{:?}",
            reports[0]
        );
        assert_eq!(hv.domains["u-db"].memory_nodes, Some(set("1")));
        assert_eq!(hv.persistent_metadata.len(), 2);
        assert!(reports[1]
            .changes
            .last()
            .unwrap()
            .starts_with("persistent definition"));
    }
}
