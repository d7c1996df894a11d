//! `pinner doctor`: audits a host and its running guests for what costs
//! guests speed — the checks tuning guides do by hand with virsh, sar,
//! numastat and /proc/interrupts — and prints each finding with its
//! evidence and the exact fix. The checks are pure functions of [`Host`] and
//! [`Guest`] facts; reading those facts is separate, so every check runs
//! against fixtures.

pub mod facts;
pub mod guest;
pub mod host;
pub mod memory;

pub use facts::{Disk, Guest, Host, Nic};

use crate::engine::domain::DomainError;
use pinner_shared::text::printable;
use serde::Serialize;

/// Every finding's stable id, as the README's table lists them.
pub mod ids {
    pub const CPU_MODEL: &str = "PIN001";
    pub const SINGLE_CORE_SOCKETS: &str = "PIN002";
    pub const NO_NUMA_CELLS: &str = "PIN003";
    pub const L3_HIDDEN: &str = "PIN004";
    pub const UNPINNED: &str = "PIN005";
    pub const ACROSS_NODES: &str = "PIN006";
    pub const MEMORY_UNBOUND: &str = "PIN007";
    pub const EMULATOR_ON_DEDICATED: &str = "PIN008";
    pub const EMULATED_NIC: &str = "PIN010";
    pub const NO_VHOST: &str = "PIN011";
    pub const ONE_QUEUE: &str = "PIN012";
    pub const TOO_MANY_QUEUES: &str = "PIN013";
    pub const EMULATED_DISK: &str = "PIN020";
    pub const PAGE_CACHE: &str = "PIN021";
    pub const THREAD_POOL_IO: &str = "PIN022";
    pub const THP_OFF: &str = "PIN030";
    pub const KSM: &str = "PIN031";
    pub const NUMA_BALANCING: &str = "PIN032";
    pub const NUMAD: &str = "PIN033";
    pub const IRQBALANCE: &str = "PIN034";
    pub const IDLE_ISOLATED: &str = "PIN035";
    pub const STEAL: &str = "PIN036";
    pub const SOFTIRQ_SATURATED: &str = "PIN037";
    pub const MEMORY_BEYOND_NODES: &str = "PIN040";
    pub const UNUSED_HUGEPAGES: &str = "PIN041";
}

#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    #[error(transparent)]
    Domain(#[from] DomainError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
    Info,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Stable id (`PIN001`…), documented in the README.
    pub id: &'static str,
    pub severity: Severity,
    /// The guest it is about; None for the host.
    pub domain: Option<String>,
    pub title: String,
    pub evidence: String,
    pub fix: String,
}

/// Steal above this (percent of a vCPU's time) is reported.
pub const STEAL_THRESHOLD_PCT: f64 = 10.0;

pub(crate) fn finding(
    id: &'static str,
    severity: Severity,
    domain: Option<&str>,
    title: impl Into<String>,
    evidence: impl Into<String>,
    fix: impl Into<String>,
) -> Finding {
    Finding {
        id,
        severity,
        domain: domain.map(str::to_string),
        title: title.into(),
        evidence: evidence.into(),
        fix: fix.into(),
    }
}

/// Every finding for the host and `guests` (only the guest named `only`,
/// when given; the others still count for shared facts such as dedicated
/// CPUs), host first, then by guest.
pub fn audit(host: &Host, guests: &[Guest], only: Option<&str>) -> Vec<Finding> {
    let dedicated = facts::dedicated_cpus(guests);
    let mut out = Vec::new();
    for check in host::CHECKS {
        check(host, &dedicated, &mut out);
    }
    memory::check(host, guests, only, &mut out);
    for guest in guests
        .iter()
        .filter(|g| only.is_none_or(|n| g.spec.name == n))
    {
        let facts = guest::GuestFacts {
            host,
            guest,
            dedicated: &dedicated,
        };
        for check in guest::CHECKS {
            check(&facts, &mut out);
        }
    }
    out
}

pub(crate) fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Findings as text: one block per finding, errors first, then a summary.
pub fn render_text(findings: &[Finding]) -> String {
    let mut sorted: Vec<&Finding> = findings.iter().collect();
    sorted.sort_by_key(|f| (f.severity, f.domain.clone(), f.id));
    let mut out = String::new();
    for f in &sorted {
        let severity = match f.severity {
            Severity::Error => "ERROR",
            Severity::Warning => "WARNING",
            Severity::Info => "info",
        };
        let subject = f
            .domain
            .as_deref()
            .map_or("host".to_string(), |d| format!("guest {}", printable(d)));
        out.push_str(&format!(
            "{} {severity} [{subject}] {}\n  evidence: {}\n  fix: {}\n\n",
            f.id,
            f.title,
            printable(&f.evidence),
            printable(&f.fix)
        ));
    }
    let count = |s: Severity| findings.iter().filter(|f| f.severity == s).count();
    out.push_str(&format!(
        "{} errors, {} warnings, {} notes\n",
        count(Severity::Error),
        count(Severity::Warning),
        count(Severity::Info)
    ));
    out
}

/// PIN000: the guests could not be read (libvirt unreachable), so only
/// the host was audited. A note: the host's findings decide the exit.
pub fn guests_skipped(uri: &str, why: &str) -> Finding {
    finding(
        "PIN000",
        Severity::Info,
        None,
        "guest checks skipped: libvirt unreachable; host checks ran".to_string(),
        format!("{uri}: {why}"),
        "start libvirtd (or virtqemud), or name another with --connect URI".to_string(),
    )
}

/// Whether anything needs fixing (exit 2).
pub fn needs_fixing(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.severity != Severity::Info)
}

/// `pinner doctor --json`: the findings and their counts by severity.
pub fn findings_json(findings: &[Finding]) -> serde_json::Value {
    let count = |s: Severity| findings.iter().filter(|f| f.severity == s).count();
    serde_json::json!({
        "findings": findings,
        "errors": count(Severity::Error),
        "warnings": count(Severity::Warning),
        "notes": count(Severity::Info),
    })
}

#[cfg(test)]
mod tests {
    use super::facts::{is_nic_interrupt, read_counters};
    use super::*;
    use crate::engine::cpuset::CpuSet;
    use crate::engine::topology::Topology;
    use crate::isolation::irqs::irqbalance_banned;
    use std::collections::BTreeMap;

    /// A guest that does everything right on the host below: pinned one to
    /// one in node 0, memory bound there, emulator on CPU 0, virtio with
    /// vhost and 2 queues, a raw disk with cache none and native I/O.
    const GOOD: &str = "<domain type='kvm'><name>good</name><uuid>u-good</uuid>
<memory unit='MiB'>1024</memory><vcpu placement='static'>2</vcpu>
<cputune><vcpupin vcpu='0' cpuset='1'/><vcpupin vcpu='1' cpuset='2'/><emulatorpin cpuset='0'/></cputune>
<numatune><memory mode='strict' nodeset='0'/></numatune>
<cpu mode='host-passthrough'><topology sockets='1' cores='2' threads='1'/><cache mode='passthrough'/></cpu>
<devices>
<interface type='bridge'><mac address='52:54:00:00:00:01'/><model type='virtio'/><driver name='vhost' queues='2'/></interface>
<disk type='block' device='disk'><driver name='qemu' type='raw' cache='none' io='native'/><target dev='vda' bus='virtio'/></disk>
<disk type='file' device='cdrom'><target dev='hdc' bus='ide'/></disk>
</devices></domain>";

    /// 8 CPUs in 2 nodes (0-3, 4-7) of one package; nothing misconfigured.
    fn good_host() -> Host {
        Host {
            topology: Topology::synthetic(2, 1, 4, 1),
            pool: Some(CpuSet::parse("1-7").unwrap()),
            memory_reserve: Default::default(),
            thp: Some("madvise".into()),
            ksm_run: Some(0),
            ksm_merge_across_nodes: Some(1),
            numa_balancing: Some(0),
            processes: vec!["irqbalance".into(), "sshd".into()],
            irqbalance_banned: Some((
                CpuSet::parse("1-7").unwrap(),
                "/etc/default/irqbalance".into(),
            )),
            softirq_pct: BTreeMap::from([(0, 2.0), (1, 40.0)]),
            nic_irqs: BTreeMap::from([(0, 500), (1, 480)]),
        }
    }

    fn guest(xml: &str) -> Guest {
        Guest::from_xml(xml).unwrap()
    }

    fn ids(findings: &[Finding]) -> Vec<&'static str> {
        findings.iter().map(|f| f.id).collect()
    }

    #[test]
    fn a_well_tuned_host_and_guest_are_quiet() {
        let findings = audit(&good_host(), &[guest(GOOD)], None);
        assert!(findings.is_empty(), "{findings:#?}");
        assert!(!needs_fixing(&findings));
        assert_eq!(render_text(&findings), "0 errors, 0 warnings, 0 notes\n");
    }

    /// Each guest check fires on the good guest with one thing wrong.
    #[test]
    fn each_guest_check_fires_on_its_fault() {
        let cases: &[(&str, &[(&str, &str)])] = &[
            (
                "PIN001",
                &[("mode='host-passthrough'", "mode='custom' match='exact'")],
            ),
            (
                "PIN002",
                &[("sockets='1' cores='2'", "sockets='2' cores='1'")],
            ),
            (
                // 100 GiB bound to a 64 GiB node: beyond its memory too.
                "PIN003+PIN040",
                &[(
                    "<memory unit='MiB'>1024</memory>",
                    "<memory unit='GiB'>100</memory>",
                )],
            ),
            (
                "PIN004",
                &[("<cache mode='passthrough'/>", "<cache mode='disable'/>")],
            ),
            ("PIN005", &[("<vcpupin vcpu='1' cpuset='2'/>", "")]),
            (
                "PIN006",
                &[
                    (
                        "<vcpupin vcpu='1' cpuset='2'/>",
                        "<vcpupin vcpu='1' cpuset='5'/>",
                    ),
                    ("nodeset='0'", "nodeset='0-1'"),
                ],
            ),
            ("PIN007", &[("nodeset='0'", "nodeset='1'")]),
            (
                "PIN008",
                &[("<emulatorpin cpuset='0'/>", "<emulatorpin cpuset='0-1'/>")],
            ),
            (
                "PIN010",
                &[("<model type='virtio'/>", "<model type='e1000'/>")],
            ),
            (
                "PIN011",
                &[(
                    "<driver name='vhost' queues='2'/>",
                    "<driver name='qemu' queues='2'/>",
                )],
            ),
            (
                "PIN012",
                &[(
                    "<driver name='vhost' queues='2'/>",
                    "<driver name='vhost'/>",
                )],
            ),
            ("PIN013", &[("queues='2'", "queues='8'")]),
            ("PIN020", &[("bus='virtio'", "bus='sata'")]),
            (
                "PIN021",
                &[("cache='none' io='native'", "cache='writeback'")],
            ),
            ("PIN022", &[("io='native'", "io='threads'")]),
        ];
        for (id, edits) in cases {
            let mut xml = GOOD.to_string();
            for (from, to) in *edits {
                assert!(xml.contains(from), "{id}: fixture lacks {from}");
                xml = xml.replace(from, to);
            }
            let findings = audit(&good_host(), &[guest(&xml)], None);
            let mut found = ids(&findings);
            found.sort();
            assert_eq!(
                found,
                id.split('+').collect::<Vec<_>>(),
                "{id}: {findings:#?}"
            );
            for f in &findings {
                assert_eq!(f.domain.as_deref(), Some("good"));
                assert!(!f.evidence.is_empty() && !f.fix.is_empty(), "{f:?}");
            }
        }
    }

    #[test]
    fn bindings_beyond_the_nodes_memory_are_errors_whoever_set_them() {
        // Two guests of 40 GiB bound to node 0 (64 GiB): the second, by
        // name, no longer fits; bound to both nodes each would.
        let big = |name: &str, nodes: &str| {
            GOOD.replace(
                "<name>good</name><uuid>u-good</uuid>",
                &format!("<name>{name}</name><uuid>u-{name}</uuid>"),
            )
            .replace(
                "<memory unit='MiB'>1024</memory>",
                "<memory unit='GiB'>40</memory>",
            )
            .replace("nodeset='0'", &format!("nodeset='{nodes}'"))
        };
        let findings = audit(
            &good_host(),
            &[guest(&big("a", "0")), guest(&big("b", "0"))],
            None,
        );
        let beyond: Vec<_> = findings.iter().filter(|f| f.id == "PIN040").collect();
        assert_eq!(beyond.len(), 1, "{findings:#?}");
        assert_eq!(beyond[0].domain.as_deref(), Some("b"));
        assert!(
            beyond[0]
                .evidence
                .contains("40 GiB bound to node 0 (mode strict)"),
            "{}",
            beyond[0].evidence
        );
        let findings = audit(
            &good_host(),
            &[guest(&big("a", "0-1")), guest(&big("b", "0-1"))],
            None,
        );
        assert!(findings.iter().all(|f| f.id != "PIN040"), "{findings:#?}");
        // Asked about one guest only: the other still takes its memory.
        let findings = audit(
            &good_host(),
            &[guest(&big("a", "0")), guest(&big("b", "0"))],
            Some("a"),
        );
        assert!(findings.iter().all(|f| f.id != "PIN040"), "{findings:#?}");
    }

    #[test]
    fn hugepage_pools_no_guest_can_use_well_are_reported() {
        use crate::engine::topology::HugePages;
        let mut host = good_host();
        host.topology.numa_nodes[1].hugepages = vec![HugePages {
            size_kib: 2048,
            total: 512,
            free: 512,
        }];
        let findings = audit(&host, &[guest(GOOD)], None);
        assert_eq!(ids(&findings), vec!["PIN041"], "{findings:#?}");
        assert_eq!(findings[0].severity, Severity::Info);
        assert!(
            findings[0]
                .evidence
                .contains("node 1: 512 free 2M pages (1 GiB)"),
            "{}",
            findings[0].evidence
        );
        // A guest backed by 2M pages uses them: quiet.
        let backed = GOOD
            .replace(
                "</numatune>",
                "</numatune><memoryBacking><hugepages/></memoryBacking>",
            )
            .replace("nodeset='0'", "nodeset='1'")
            .replace(
                "cpuset='1'/><vcpupin vcpu='1' cpuset='2'",
                "cpuset='5'/><vcpupin vcpu='1' cpuset='6'",
            );
        let quiet = audit(&host, &[guest(&backed)], None);
        assert!(quiet.iter().all(|f| f.id != "PIN041"), "{quiet:#?}");
        // A pool on a node none of whose CPUs guests may have.
        host.pool = Some(CpuSet::parse("1-3").unwrap());
        let findings = audit(&host, &[guest(GOOD)], None);
        assert_eq!(ids(&findings), vec!["PIN041"], "{findings:#?}");
        assert_eq!(findings[0].severity, Severity::Warning);
    }

    #[test]
    fn emulator_on_another_guests_dedicated_cpu_is_an_error() {
        let other = GOOD
            .replace(
                "<name>good</name><uuid>u-good</uuid>",
                "<name>other</name><uuid>u-other</uuid>",
            )
            .replace(
                "cpuset='1'/><vcpupin vcpu='1' cpuset='2'",
                "cpuset='3'/><vcpupin vcpu='1' cpuset='4'",
            )
            .replace("<emulatorpin cpuset='0'/>", "<emulatorpin cpuset='0,2'/>")
            .replace("nodeset='0'", "nodeset='0-1'");
        let findings = audit(&good_host(), &[guest(GOOD), guest(&other)], None);
        let pin008: Vec<&Finding> = findings.iter().filter(|f| f.id == "PIN008").collect();
        assert_eq!(pin008.len(), 1, "{findings:#?}");
        assert_eq!(pin008[0].severity, Severity::Error);
        assert_eq!(pin008[0].domain.as_deref(), Some("other"));
        assert!(
            pin008[0]
                .evidence
                .contains("other guests' dedicated CPUs 2"),
            "{:?}",
            pin008[0]
        );
        assert!(needs_fixing(&findings));

        // Two guests on the same single CPU share it: nobody's dedicated.
        let sharing = |name: &str| {
            GOOD.replace(
                "<name>good</name><uuid>u-good</uuid>",
                &format!("<name>{name}</name><uuid>u-{name}</uuid>"),
            )
            .replace(
                "cpuset='1'/><vcpupin vcpu='1' cpuset='2'",
                "cpuset='1'/><vcpupin vcpu='1' cpuset='1'",
            )
            .replace("<emulatorpin cpuset='0'/>", "<emulatorpin cpuset='1'/>")
        };
        let findings = audit(
            &good_host(),
            &[guest(&sharing("x")), guest(&sharing("y"))],
            None,
        );
        assert!(findings.is_empty(), "{findings:#?}");
    }

    #[test]
    fn steal_above_the_threshold_fires() {
        let mut g = guest(GOOD);
        g.steal_pct = Some(STEAL_THRESHOLD_PCT);
        assert!(audit(&good_host(), &[g.clone()], None).is_empty());
        g.steal_pct = Some(25.0);
        assert_eq!(ids(&audit(&good_host(), &[g], None)), vec!["PIN036"]);
    }

    /// Each host check fires on the good host with one thing wrong.
    #[test]
    fn each_host_check_fires_on_its_fault() {
        type Fault = Box<dyn Fn(&mut Host)>;
        let cases: Vec<(&str, Fault)> = vec![
            ("PIN030", Box::new(|h| h.thp = Some("never".into()))),
            ("PIN031", Box::new(|h| h.ksm_run = Some(1))),
            ("PIN032", Box::new(|h| h.numa_balancing = Some(1))),
            ("PIN033", Box::new(|h| h.processes.push("numad".into()))),
            ("PIN034", Box::new(|h| h.irqbalance_banned = None)),
            (
                "PIN035",
                Box::new(|h| h.topology.isolated = CpuSet::parse("0").unwrap()),
            ),
            (
                "PIN037",
                Box::new(|h| h.nic_irqs = BTreeMap::from([(0, 10), (1, 990)])),
            ),
        ];
        for (id, fault) in cases {
            let mut host = good_host();
            fault(&mut host);
            let findings = audit(&host, &[guest(GOOD)], None);
            assert_eq!(ids(&findings), vec![id], "{id}: {findings:#?}");
            assert_eq!(findings[0].domain, None);
        }
    }

    #[test]
    fn quiet_cases_of_conditional_host_checks() {
        // irqbalance with no dedicated guests, or not running: nothing to ban.
        let mut host = good_host();
        host.irqbalance_banned = None;
        let shared = GOOD.replace(
            "cpuset='1'/><vcpupin vcpu='1' cpuset='2'",
            "cpuset='1-2'/><vcpupin vcpu='1' cpuset='1-2'",
        );
        assert!(audit(&host, &[guest(&shared)], None).is_empty());
        host.processes.retain(|p| p != "irqbalance");
        assert!(audit(&host, &[guest(GOOD)], None).is_empty());
        // Network interrupts all on one CPU that is not busy: fine.
        let mut host = good_host();
        host.nic_irqs = BTreeMap::from([(0, 1000)]);
        assert!(audit(&host, &[guest(GOOD)], None).is_empty());
    }

    #[test]
    fn reads_irqbalance_bans_as_list_or_mask() {
        assert_eq!(
            irqbalance_banned("# x\nIRQBALANCE_BANNED_CPULIST=\"2-3,8\"\n"),
            Some(CpuSet::parse("2-3,8").unwrap())
        );
        assert_eq!(
            irqbalance_banned("IRQBALANCE_BANNED_CPUS=00000001,0000000c\n"),
            Some(CpuSet::parse("2-3,32").unwrap())
        );
        assert_eq!(irqbalance_banned("OPTIONS=\"--foreground\"\n"), None);
    }

    #[test]
    fn samples_softirqs_and_network_interrupts_from_proc() {
        let root = crate::test_support::scratch_dir("doctor-proc");
        std::fs::create_dir_all(root.join("proc")).unwrap();
        std::fs::write(
            root.join("proc/stat"),
            "cpu  1 2 3 4 5 6 7 8 0 0\ncpu0 100 0 100 700 0 0 100 0 0 0\ncpu1 1 0 1 1 0 0 0 0 0 0\n",
        )
        .unwrap();
        std::fs::write(
            root.join("proc/interrupts"),
            "           CPU0       CPU1\n  24:         10          0   PCI-MSI 1-edge      virtio0-config\n  25:       900          3   PCI-MSI 2-edge      virtio0-input.0\n  26:         5          7   PCI-MSI 3-edge      eth1-TxRx-0\n  27:        50         50   PCI-MSI 4-edge      virtio1-req.0\nNMI:          0          0   Non-maskable interrupts\n",
        )
        .unwrap();
        let counters = read_counters(&root);
        assert_eq!(counters.ticks[&0], (100, 1000));
        assert_eq!(counters.nic_irqs, BTreeMap::from([(0, 905), (1, 10)]));
        assert!(is_nic_interrupt("virtio2-output.1") && !is_nic_interrupt("virtio0-config"));
    }
}
