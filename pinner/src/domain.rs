//! The parts of a running domain's live XML that placement needs: its vCPUs,
//! the pins libvirt holds for them, and pinner's own metadata.

use crate::cpuset::CpuSet;
use pinner_shared::paths::METADATA_URI;
use std::collections::BTreeMap;

/// What an operator (or pinner) asked for in the domain's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Dedicated while the host has room, shared beyond.
    Auto,
    Dedicated,
    Shared,
    /// Opted out: pinner leaves the guest alone.
    None,
}

impl Policy {
    pub fn parse(word: &str) -> Option<Policy> {
        match word {
            "auto" => Some(Policy::Auto),
            "dedicated" => Some(Policy::Dedicated),
            "shared" => Some(Policy::Shared),
            "none" => Some(Policy::None),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Auto => "auto",
            Policy::Dedicated => "dedicated",
            Policy::Shared => "shared",
            Policy::None => "none",
        }
    }
}

/// Reads every `*.xml` in `dir` (sorted by file name) as a running domain;
/// an error names the file.
pub fn read_dir(dir: &std::path::Path) -> Result<Vec<DomainSpec>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut files: Vec<std::path::PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "xml"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            let xml = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
            DomainSpec::parse(&xml).map_err(|e| format!("{}: {e}", f.display()))
        })
        .collect()
}

/// `<pinner:state xmlns:pinner="urn:pinner:1" policy="…"/>` in `<metadata>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnerMetadata {
    pub policy: Policy,
    /// The policy word when it was not one pinner knows (treated as auto).
    pub unknown_policy: Option<String>,
    /// The placement pinner last applied (`dedicated`/`shared`).
    pub mode: Option<String>,
}

impl PinnerMetadata {
    /// The element pinner writes (libvirt adds the namespace prefix).
    /// An operator's unknown policy word is written back as it was.
    pub fn to_xml(&self, mode: &str) -> String {
        let policy = self
            .unknown_policy
            .as_deref()
            .unwrap_or(self.policy.as_str());
        format!(
            "<state policy=\"{}\" mode=\"{}\"/>",
            xml_escape(policy),
            xml_escape(mode)
        )
    }
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

/// vCPU and IOThread counts above this are refused. QEMU starts at most
/// 4,096 vCPUs (q35); the bound keeps a corrupt or hostile count from sizing
/// the per-thread lists placement builds (a fuzzed `<iothreads>` of 1.8
/// billion asked for 7 GB).
pub const MAX_GUEST_THREADS: u32 = 16_384;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainSpec {
    pub name: String,
    pub uuid: String,
    /// vCPUs online now (`<vcpu current=…>`, else the maximum).
    pub vcpus: u32,
    /// `<cputune><vcpupin vcpu=… cpuset=…/>`
    pub vcpu_pins: BTreeMap<u32, CpuSet>,
    /// `<vcpu cpuset=…>`: the default for vCPUs without a vcpupin.
    pub vcpu_default: Option<CpuSet>,
    /// `<vcpu placement='auto'>`: numad decides, so someone else manages it.
    pub auto_placement: bool,
    /// `<cputune><emulatorpin cpuset=…/>`
    pub emulator_pin: Option<CpuSet>,
    /// IOThread ids (`<iothreadids>`, else 1..=`<iothreads>`).
    pub iothreads: Vec<u32>,
    /// `<cputune><iothreadpin iothread=… cpuset=…/>`
    pub iothread_pins: BTreeMap<u32, CpuSet>,
    /// `<numatune><memory mode=… nodeset=…/>`: node ids, and the mode.
    pub memory_nodes: Option<CpuSet>,
    pub memory_mode: Option<String>,
    pub metadata: Option<PinnerMetadata>,
}

impl DomainSpec {
    pub fn parse(xml: &str) -> Result<DomainSpec, String> {
        let doc = roxmltree::Document::parse(xml).map_err(|e| format!("domain XML: {e}"))?;
        let root = doc.root_element();
        if !root.has_tag_name("domain") {
            return Err(format!(
                "domain XML: root element is <{}>, not <domain>",
                root.tag_name().name()
            ));
        }
        let child = |tag: &str| root.children().find(|n| n.has_tag_name(tag));
        let text = |tag: &str| {
            child(tag)
                .and_then(|n| n.text())
                .map(|t| t.trim().to_string())
        };
        let name = text("name").ok_or("domain XML: no <name>")?;
        let uuid = text("uuid").unwrap_or_default();

        let count = |value: &str, what: &str| -> Result<u32, String> {
            match value.trim().parse::<u32>() {
                Ok(n) if n <= MAX_GUEST_THREADS => Ok(n),
                Ok(n) => Err(format!(
                    "domain {name:?}: {what} {n} is more than the {MAX_GUEST_THREADS} pinner handles"
                )),
                Err(_) => Err(format!("domain {name:?}: {what} {value:?} is not a count")),
            }
        };
        let vcpu = child("vcpu").ok_or_else(|| format!("domain {name:?}: no <vcpu>"))?;
        let max = count(vcpu.text().unwrap_or(""), "<vcpu>")?;
        let vcpus = match vcpu.attribute("current") {
            Some(c) => count(c, "<vcpu current>")?,
            None => max,
        };
        let cpuset_attr = |node: roxmltree::Node, what: &str| -> Result<Option<CpuSet>, String> {
            node.attribute("cpuset")
                .map(|s| CpuSet::parse(s).map_err(|e| format!("domain {name:?}: {what}: {e}")))
                .transpose()
        };
        let vcpu_default = cpuset_attr(vcpu, "<vcpu cpuset>")?;
        let auto_placement = vcpu.attribute("placement") == Some("auto");

        let mut vcpu_pins = BTreeMap::new();
        let mut emulator_pin = None;
        let mut iothread_pins = BTreeMap::new();
        if let Some(cputune) = child("cputune") {
            for node in cputune.children().filter(|n| n.is_element()) {
                match node.tag_name().name() {
                    "vcpupin" => {
                        let id: u32 = node
                            .attribute("vcpu")
                            .and_then(|v| v.parse().ok())
                            .ok_or_else(|| {
                                format!("domain {name:?}: <vcpupin> without a vcpu number")
                            })?;
                        if let Some(set) = cpuset_attr(node, "<vcpupin>")? {
                            vcpu_pins.insert(id, set);
                        }
                    }
                    "emulatorpin" => emulator_pin = cpuset_attr(node, "<emulatorpin>")?,
                    "iothreadpin" => {
                        let id: u32 = node
                            .attribute("iothread")
                            .and_then(|v| v.parse().ok())
                            .ok_or_else(|| {
                                format!("domain {name:?}: <iothreadpin> without an iothread number")
                            })?;
                        if let Some(set) = cpuset_attr(node, "<iothreadpin>")? {
                            iothread_pins.insert(id, set);
                        }
                    }
                    _ => {}
                }
            }
        }

        let mut iothreads: Vec<u32> = child("iothreadids")
            .map(|ids| {
                ids.children()
                    .filter(|n| n.has_tag_name("iothread"))
                    .filter_map(|n| n.attribute("id")?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        if iothreads.is_empty() {
            if let Some(n) = text("iothreads") {
                iothreads = (1..=count(&n, "<iothreads>")?).collect();
            }
        }
        let memory =
            child("numatune").and_then(|n| n.children().find(|c| c.has_tag_name("memory")));
        let memory_nodes = memory
            .and_then(|m| m.attribute("nodeset"))
            .map(|s| {
                CpuSet::parse(s)
                    .map_err(|e| format!("domain {name:?}: <numatune><memory nodeset>: {e}"))
            })
            .transpose()?;
        let memory_mode = memory.and_then(|m| m.attribute("mode")).map(str::to_string);

        let metadata = child("metadata")
            .and_then(|m| {
                m.children().find(|n| {
                    n.tag_name().namespace() == Some(METADATA_URI) && n.tag_name().name() == "state"
                })
            })
            .map(|state| {
                let word = state.attribute("policy").unwrap_or("auto");
                let policy = Policy::parse(word);
                PinnerMetadata {
                    policy: policy.unwrap_or(Policy::Auto),
                    unknown_policy: policy.is_none().then(|| word.to_string()),
                    mode: state.attribute("mode").map(str::to_string),
                }
            });

        Ok(DomainSpec {
            name,
            uuid,
            vcpus,
            vcpu_pins,
            vcpu_default,
            auto_placement,
            emulator_pin,
            iothreads,
            iothread_pins,
            memory_nodes,
            memory_mode,
            metadata,
        })
    }

    /// The CPUs libvirt holds for one vCPU; None when it is not pinned.
    pub fn vcpu_pin(&self, vcpu: u32) -> Option<&CpuSet> {
        self.vcpu_pins.get(&vcpu).or(self.vcpu_default.as_ref())
    }

    /// Pinned by someone else: pins (or numad placement) but no pinner
    /// metadata, e.g. nova's dedicated guests.
    pub fn is_foreign(&self) -> bool {
        self.metadata.is_none()
            && (!self.vcpu_pins.is_empty() || self.vcpu_default.is_some() || self.auto_placement)
    }

    /// Every CPU this domain's vCPUs are pinned to.
    pub fn pinned_cpus(&self) -> CpuSet {
        (0..self.vcpus)
            .filter_map(|v| self.vcpu_pin(v))
            .fold(CpuSet::new(), |acc, s| acc.union(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIVE: &str = r#"<domain type='qemu' id='1'>
  <name>web-1</name>
  <uuid>efac9572-ca56-465e-80a1-f32417df0c59</uuid>
  <metadata>
    <nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1"/>
    <pinner:state xmlns:pinner="urn:pinner:1" policy="dedicated" mode="dedicated"/>
  </metadata>
  <vcpu placement='static' current='2'>4</vcpu>
  <iothreads>2</iothreads>
  <cputune>
    <vcpupin vcpu='0' cpuset='2'/>
    <vcpupin vcpu='1' cpuset='3'/>
    <emulatorpin cpuset='0-1'/>
    <iothreadpin iothread='2' cpuset='0'/>
  </cputune>
  <numatune><memory mode='strict' nodeset='1'/></numatune>
</domain>"#;

    #[test]
    fn reads_live_pins_and_metadata() {
        let d = DomainSpec::parse(LIVE).unwrap();
        assert_eq!(d.name, "web-1");
        assert_eq!(d.uuid, "efac9572-ca56-465e-80a1-f32417df0c59");
        assert_eq!(d.vcpus, 2);
        assert_eq!(d.vcpu_pin(0).unwrap().to_string(), "2");
        assert_eq!(d.vcpu_pin(1).unwrap().to_string(), "3");
        assert_eq!(d.emulator_pin.as_ref().unwrap().to_string(), "0-1");
        assert_eq!(d.iothreads, vec![1, 2]);
        assert_eq!(d.iothread_pins[&2].to_string(), "0");
        assert_eq!(d.memory_nodes.as_ref().unwrap().to_string(), "1");
        assert_eq!(d.memory_mode.as_deref(), Some("strict"));
        assert_eq!(d.metadata.as_ref().unwrap().policy, Policy::Dedicated);
        assert!(!d.is_foreign());
        assert_eq!(d.pinned_cpus().to_string(), "2-3");
    }

    #[test]
    fn pins_without_our_metadata_are_foreign() {
        let nova = r#"<domain><name>nova-1</name><vcpu cpuset='4-5'>2</vcpu>
            <metadata><other:state xmlns:other="urn:other"/></metadata></domain>"#;
        let d = DomainSpec::parse(nova).unwrap();
        assert!(d.is_foreign());
        assert_eq!(d.pinned_cpus().to_string(), "4-5");
        let numad = "<domain><name>n</name><vcpu placement='auto'>2</vcpu></domain>";
        assert!(DomainSpec::parse(numad).unwrap().is_foreign());
        let plain = "<domain><name>p</name><vcpu>2</vcpu></domain>";
        let d = DomainSpec::parse(plain).unwrap();
        assert!(!d.is_foreign());
        assert_eq!(d.vcpu_pin(0), None);
    }

    #[test]
    fn unknown_policy_is_kept_for_a_warning() {
        let xml = r#"<domain><name>x</name><vcpu>1</vcpu><metadata>
            <p:state xmlns:p="urn:pinner:1" policy="fastest"/></metadata></domain>"#;
        let meta = DomainSpec::parse(xml).unwrap().metadata.unwrap();
        assert_eq!(meta.policy, Policy::Auto);
        assert_eq!(meta.unknown_policy.as_deref(), Some("fastest"));
        assert_eq!(
            meta.to_xml("shared"),
            "<state policy=\"fastest\" mode=\"shared\"/>"
        );
        let odd = PinnerMetadata {
            policy: Policy::Auto,
            unknown_policy: Some("a\"<&".into()),
            mode: None,
        };
        assert_eq!(
            odd.to_xml("shared"),
            "<state policy=\"a&quot;&lt;&amp;\" mode=\"shared\"/>"
        );
    }

    #[test]
    fn bad_xml_is_an_error_naming_the_domain() {
        let e = DomainSpec::parse("<domain><name>bad</name><vcpu>two</vcpu></domain>").unwrap_err();
        assert!(e.contains("\"bad\"") && e.contains("<vcpu>"), "{e}");
        assert!(DomainSpec::parse("<domain><name>x").is_err());
        assert!(DomainSpec::parse("<network/>")
            .unwrap_err()
            .contains("not <domain>"));
        let e = DomainSpec::parse("<domain><name>b</name><vcpu>1</vcpu><cputune><vcpupin vcpu='0' cpuset='9-1'/></cputune></domain>")
            .unwrap_err();
        assert!(e.contains("backwards"), "{e}");
    }

    #[test]
    fn absurd_thread_counts_are_refused_before_anything_is_sized_by_them() {
        let with =
            |body: &str| DomainSpec::parse(&format!("<domain><name>big</name>{body}</domain>"));
        // The fuzzer's finding: an <iothreads> count that asked for 7 GB.
        let e = with("<vcpu>2</vcpu><iothreads>0001855677348</iothreads>").unwrap_err();
        assert!(
            e.contains("\"big\"") && e.contains("<iothreads> 1855677348"),
            "{e}"
        );
        let e = with("<vcpu>4294967295</vcpu>").unwrap_err();
        assert!(e.contains("<vcpu> 4294967295 is more than"), "{e}");
        let e = with("<vcpu current='99999'>2</vcpu>").unwrap_err();
        assert!(e.contains("<vcpu current> 99999"), "{e}");
        let e = with("<vcpu>1</vcpu><iothreads>many</iothreads>").unwrap_err();
        assert!(e.contains("<iothreads> \"many\" is not a count"), "{e}");
        let at_limit =
            format!("<vcpu>{MAX_GUEST_THREADS}</vcpu><iothreads>{MAX_GUEST_THREADS}</iothreads>");
        let d = with(&at_limit).unwrap();
        assert_eq!(d.vcpus, MAX_GUEST_THREADS);
        assert_eq!(d.iothreads.len(), MAX_GUEST_THREADS as usize);
    }
}
