//! The parts of a running domain's live XML that placement needs: its vCPUs,
//! the pins libvirt holds for them, and pinner's own metadata.

use crate::engine::cpuset::{CpuListError, CpuSet};
use crate::engine::memory::{self, MemoryPart, PageKind, SizeError};
use pinner_shared::paths::METADATA_URI;
use std::collections::BTreeMap;

/// What an operator (or pinner) asked for in the domain's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Dedicated while the host has room, shared beyond.
    #[default]
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

/// `<pinner:state xmlns:pinner="urn:pinner:1" policy="…" mode="…"/>` in
/// `<metadata>`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PinnerMetadata {
    /// The policy the guest's owner asked for (None: no `policy`, so the
    /// host's rules decide; an unknown word counts as auto).
    pub policy: Option<Policy>,
    /// The policy word when it was not one pinner knows (treated as auto).
    pub unknown_policy: Option<String>,
    /// The placement pinner last applied (`dedicated`/`shared`).
    pub mode: Option<String>,
}

impl PinnerMetadata {
    /// The element pinner writes (libvirt adds the namespace prefix): the
    /// owner's policy word kept as it was (an unknown one too), none added.
    pub fn to_xml(&self, mode: &str) -> String {
        let policy = self
            .unknown_policy
            .as_deref()
            .or(self.policy.map(Policy::as_str));
        match policy {
            Some(policy) => format!(
                "<state policy=\"{}\" mode=\"{}\"/>",
                xml_escape(policy),
                xml_escape(mode)
            ),
            None => format!("<state mode=\"{}\"/>", xml_escape(mode)),
        }
    }
}

/// What nova's `<nova:instance>` metadata says of a guest it started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NovaInstance {
    /// `<nova:flavor name=…>`.
    pub flavor: Option<String>,
}

/// nova's metadata namespaces (`…/nova/1.0`, `…/nova/1.1`) start so.
const NOVA_URI_PREFIX: &str = "http://openstack.org/xmlns/libvirt/nova/";

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
    /// `<numatune><memnode>`: the owner bound cells' memory one by one.
    pub cell_memory_bound: bool,
    /// `<cpu><numa><cell cpus=…>`: the guest's own NUMA cells, by cell id,
    /// each the vCPUs it holds (online ones only; empty cells dropped).
    pub cells: Vec<CpuSet>,
    /// The `<cell id>` of each of `cells` (an id is skipped where a cell
    /// was dropped; qemu names a cell's memory by its id).
    pub cell_ids: Vec<u32>,
    /// `<memory>`, in KiB: the most the guest can hold (a balloon may give
    /// some back for a while; it can always take it again).
    pub memory_kib: u64,
    /// `<cell memory>` of every cell by id, those without an online vCPU too.
    pub cell_memory_kib: BTreeMap<u32, u64>,
    /// `<memoryBacking><hugepages>`: None when the guest uses normal pages.
    pub hugepages: Option<HugepageBacking>,
    pub metadata: Option<PinnerMetadata>,
    /// nova's metadata, when nova started the guest.
    pub nova: Option<NovaInstance>,
}

/// `<memoryBacking><hugepages>`: the page size of each guest cell.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HugepageBacking {
    /// A `<page>` without `nodeset` (KiB); None: the host's default size.
    pub default_kib: Option<u64>,
    /// `<page size nodeset>`: the size for the guest cells in the set.
    pub per_cell: Vec<(CpuSet, u64)>,
}

/// Why a domain's XML is not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("domain XML: {0}")]
    Xml(#[from] roxmltree::Error),
    #[error("domain XML: root element is <{0}>, not <domain>")]
    NotADomain(String),
    #[error("domain XML: no <name>")]
    NoName,
    #[error("domain {domain:?}: {problem}")]
    Invalid { domain: String, problem: Problem },
}

/// What is wrong inside a named domain's XML.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("no <vcpu>")]
    NoVcpu,
    #[error("{what} {count} is more than the {MAX_GUEST_THREADS} pinner handles")]
    TooMany { what: &'static str, count: u32 },
    #[error("{what} {value:?} is not a count")]
    NotACount { what: &'static str, value: String },
    #[error("{what}: {error}")]
    CpuList {
        what: &'static str,
        error: CpuListError,
    },
    #[error("{element} without {id} number")]
    NoId {
        element: &'static str,
        id: &'static str,
    },
    #[error("{what}: {error}")]
    Size {
        what: &'static str,
        error: SizeError,
    },
}

/// Reads the parts of one `<domain>` element, its name at hand for errors.
struct Reader<'a, 'input> {
    root: roxmltree::Node<'a, 'input>,
    name: &'a str,
}

impl<'a, 'input> Reader<'a, 'input> {
    fn child(&self, tag: &str) -> Option<roxmltree::Node<'a, 'input>> {
        self.root.children().find(|n| n.has_tag_name(tag))
    }

    fn text(&self, tag: &str) -> Option<String> {
        text_of(self.root, tag)
    }

    fn invalid(&self, problem: Problem) -> DomainError {
        DomainError::Invalid {
            domain: self.name.to_string(),
            problem,
        }
    }

    fn count(&self, value: &str, what: &'static str) -> Result<u32, DomainError> {
        match value.trim().parse::<u32>() {
            Ok(count) if count <= MAX_GUEST_THREADS => Ok(count),
            Ok(count) => Err(self.invalid(Problem::TooMany { what, count })),
            Err(_) => Err(self.invalid(Problem::NotACount {
                what,
                value: value.to_string(),
            })),
        }
    }

    fn cpu_list(
        &self,
        text: Option<&str>,
        what: &'static str,
    ) -> Result<Option<CpuSet>, DomainError> {
        text.map(|s| {
            CpuSet::parse(s).map_err(|error| self.invalid(Problem::CpuList { what, error }))
        })
        .transpose()
    }

    fn cpuset_attr(
        &self,
        node: roxmltree::Node,
        what: &'static str,
    ) -> Result<Option<CpuSet>, DomainError> {
        self.cpu_list(node.attribute("cpuset"), what)
    }

    /// The vCPUs online, the `<vcpu cpuset>` default and numad placement.
    fn vcpus(&self) -> Result<(u32, Option<CpuSet>, bool), DomainError> {
        let vcpu = self
            .child("vcpu")
            .ok_or_else(|| self.invalid(Problem::NoVcpu))?;
        let max = self.count(vcpu.text().unwrap_or(""), "<vcpu>")?;
        let online = match vcpu.attribute("current") {
            Some(c) => self.count(c, "<vcpu current>")?,
            None => max,
        };
        let default = self.cpuset_attr(vcpu, "<vcpu cpuset>")?;
        Ok((online, default, vcpu.attribute("placement") == Some("auto")))
    }

    /// A `<vcpupin>`/`<iothreadpin>`'s id and CPU set.
    fn pin(
        &self,
        node: roxmltree::Node,
        element: &'static str,
        attribute: &str,
        id: &'static str,
    ) -> Result<(u32, Option<CpuSet>), DomainError> {
        let number = node
            .attribute(attribute)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| self.invalid(Problem::NoId { element, id }))?;
        Ok((number, self.cpuset_attr(node, element)?))
    }

    /// `<cputune>`: vCPU pins, the emulator pin, IOThread pins.
    fn cputune(&self, spec: &mut DomainSpec) -> Result<(), DomainError> {
        let Some(cputune) = self.child("cputune") else {
            return Ok(());
        };
        for node in cputune.children().filter(|n| n.is_element()) {
            match node.tag_name().name() {
                "vcpupin" => {
                    if let (id, Some(set)) = self.pin(node, "<vcpupin>", "vcpu", "a vcpu")? {
                        spec.vcpu_pins.insert(id, set);
                    }
                }
                "emulatorpin" => spec.emulator_pin = self.cpuset_attr(node, "<emulatorpin>")?,
                "iothreadpin" => {
                    let (id, set) = self.pin(node, "<iothreadpin>", "iothread", "an iothread")?;
                    if let Some(set) = set {
                        spec.iothread_pins.insert(id, set);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// IOThread ids: `<iothreadids>`, else 1..=`<iothreads>`.
    fn iothreads(&self) -> Result<Vec<u32>, DomainError> {
        let listed: Vec<u32> = self
            .child("iothreadids")
            .map(|ids| {
                ids.children()
                    .filter(|n| n.has_tag_name("iothread"))
                    .filter_map(|n| n.attribute("id")?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        match self.text("iothreads") {
            Some(n) if listed.is_empty() => Ok((1..=self.count(&n, "<iothreads>")?).collect()),
            _ => Ok(listed),
        }
    }

    /// `<numatune><memory nodeset mode>`.
    fn memory(&self) -> Result<(Option<CpuSet>, Option<String>), DomainError> {
        let memory = self
            .child("numatune")
            .and_then(|n| n.children().find(|c| c.has_tag_name("memory")));
        let nodes = self.cpu_list(
            memory.and_then(|m| m.attribute("nodeset")),
            "<numatune><memory nodeset>",
        )?;
        Ok((
            nodes,
            memory.and_then(|m| m.attribute("mode")).map(str::to_string),
        ))
    }

    /// `<cpu><numa><cell id cpus memory>`, ordered by cell id, each cut to
    /// the `online` vCPUs: (id, vCPUs, memory in KiB).
    fn cells(&self, online: u32) -> Result<Vec<(u32, CpuSet, u64)>, DomainError> {
        let Some(numa) = self
            .child("cpu")
            .and_then(|c| c.children().find(|n| n.has_tag_name("numa")))
        else {
            return Ok(Vec::new());
        };
        let mut cells = Vec::new();
        for cell in numa.children().filter(|n| n.has_tag_name("cell")) {
            let id = cell.attribute("id").and_then(|v| v.parse::<u32>().ok());
            let cpus = self
                .cpu_list(cell.attribute("cpus"), "<cpu><numa><cell cpus>")?
                .unwrap_or_default();
            let online: CpuSet = cpus.iter().filter(|&v| v < online).collect();
            let memory = match cell.attribute("memory") {
                Some(size) => self.size(size, cell.attribute("unit"), "<cell memory>")?,
                None => 0,
            };
            cells.push((id.unwrap_or(cells.len() as u32), online, memory));
        }
        cells.sort_by_key(|(id, _, _)| *id);
        Ok(cells)
    }

    fn size(
        &self,
        value: &str,
        unit: Option<&str>,
        what: &'static str,
    ) -> Result<u64, DomainError> {
        memory::to_kib(value, unit).map_err(|error| self.invalid(Problem::Size { what, error }))
    }

    /// `<memory unit>`, in KiB (0 when absent).
    fn memory_size(&self) -> Result<u64, DomainError> {
        match self.child("memory") {
            Some(m) => self.size(m.text().unwrap_or(""), m.attribute("unit"), "<memory>"),
            None => Ok(0),
        }
    }

    /// `<memoryBacking><hugepages>` and its `<page size unit nodeset>`s.
    fn hugepages(&self) -> Result<Option<HugepageBacking>, DomainError> {
        let Some(huge) = self
            .child("memoryBacking")
            .and_then(|b| b.children().find(|n| n.has_tag_name("hugepages")))
        else {
            return Ok(None);
        };
        let mut backing = HugepageBacking::default();
        for page in huge.children().filter(|n| n.has_tag_name("page")) {
            let what = "<hugepages><page size>";
            let size = self.size(
                page.attribute("size").unwrap_or(""),
                page.attribute("unit"),
                what,
            )?;
            match self.cpu_list(page.attribute("nodeset"), "<hugepages><page nodeset>")? {
                Some(cells) => backing.per_cell.push((cells, size)),
                None => backing.default_kib = Some(size),
            }
        }
        Ok(Some(backing))
    }

    /// pinner's `<pinner:state>` in `<metadata>`.
    fn metadata(&self) -> Option<PinnerMetadata> {
        let state = self.child("metadata")?.children().find(|n| {
            n.tag_name().namespace() == Some(METADATA_URI) && n.tag_name().name() == "state"
        })?;
        let word = state.attribute("policy");
        let policy = word.map(|w| Policy::parse(w).unwrap_or(Policy::Auto));
        Some(PinnerMetadata {
            policy,
            unknown_policy: word
                .filter(|w| Policy::parse(w).is_none())
                .map(str::to_string),
            mode: state.attribute("mode").map(str::to_string),
        })
    }

    /// nova's `<nova:instance>` in `<metadata>`, with its flavor's name.
    fn nova(&self) -> Option<NovaInstance> {
        let is_nova = |n: &roxmltree::Node, tag: &str| {
            n.tag_name().name() == tag
                && n.tag_name()
                    .namespace()
                    .is_some_and(|ns| ns.starts_with(NOVA_URI_PREFIX))
        };
        let instance = self
            .child("metadata")?
            .children()
            .find(|n| is_nova(n, "instance"))?;
        let flavor = instance
            .children()
            .find(|n| is_nova(n, "flavor"))
            .and_then(|f| f.attribute("name"))
            .map(str::to_string);
        Some(NovaInstance { flavor })
    }
}

fn text_of(node: roxmltree::Node, tag: &str) -> Option<String> {
    node.children()
        .find(|n| n.has_tag_name(tag))
        .and_then(|n| n.text())
        .map(|t| t.trim().to_string())
}

impl DomainSpec {
    pub fn parse(xml: &str) -> Result<DomainSpec, DomainError> {
        let doc = roxmltree::Document::parse(xml)?;
        let root = doc.root_element();
        if !root.has_tag_name("domain") {
            return Err(DomainError::NotADomain(root.tag_name().name().to_string()));
        }
        // Exactly as written: libvirt keeps `twin`, ` twin` and `twin ` as
        // three guests.
        let name = root
            .children()
            .find(|n| n.has_tag_name("name"))
            .and_then(|n| n.text())
            .map(str::to_string)
            .ok_or(DomainError::NoName)?;
        let reader = Reader { root, name: &name };
        let (vcpus, vcpu_default, auto_placement) = reader.vcpus()?;
        let (memory_nodes, memory_mode) = reader.memory()?;
        let cells = reader.cells(vcpus)?;
        let mut spec = DomainSpec {
            uuid: reader.text("uuid").unwrap_or_default(),
            vcpus,
            vcpu_default,
            auto_placement,
            iothreads: reader.iothreads()?,
            memory_nodes,
            memory_mode,
            cell_memory_bound: reader
                .child("numatune")
                .is_some_and(|n| n.children().any(|c| c.has_tag_name("memnode"))),
            metadata: reader.metadata(),
            nova: reader.nova(),
            memory_kib: reader.memory_size()?,
            hugepages: reader.hugepages()?,
            cell_memory_kib: cells.iter().map(|(id, _, kib)| (*id, *kib)).collect(),
            ..DomainSpec::default()
        };
        (spec.cell_ids, spec.cells) = cells
            .into_iter()
            .filter(|(_, cpus, _)| !cpus.is_empty())
            .map(|(id, cpus, _)| (id, cpus))
            .unzip();
        reader.cputune(&mut spec)?;
        spec.name = name;
        Ok(spec)
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

    /// Floated by nova over `cpu_shared_set`: nova's metadata and a
    /// `<vcpu cpuset>`, no pin of its own per vCPU and no pinner metadata.
    pub fn is_nova_floating(&self) -> bool {
        self.nova.is_some()
            && self.metadata.is_none()
            && self.vcpu_pins.is_empty()
            && self.vcpu_default.is_some()
            && !self.auto_placement
    }

    /// The pages guest cell `cell` (None: the guest as a whole) is made
    /// of; `host_default` is the host's default huge page size.
    pub fn page_kind(&self, cell: Option<u32>, host_default: Option<u64>) -> PageKind {
        let Some(huge) = &self.hugepages else {
            return PageKind::Normal;
        };
        let named = cell.and_then(|c| {
            huge.per_cell
                .iter()
                .find(|(cells, _)| cells.contains(c))
                .map(|(_, size)| *size)
        });
        PageKind::Huge(named.or(huge.default_kib).or(host_default).unwrap_or(2048))
    }

    /// The guest's memory as placement takes it: its NUMA cells' memory,
    /// one entry per cell of `cells` (a cell without an online vCPU goes
    /// with the last), else the whole guest as one entry.
    pub fn memory_by_cell(&self, host_default: Option<u64>) -> Vec<Vec<MemoryPart>> {
        let part = |cell: Option<u32>, kib: u64| MemoryPart {
            kib,
            kind: self.page_kind(cell, host_default),
        };
        if self.cells.is_empty() {
            return vec![vec![part(None, self.memory_kib)]];
        }
        let mut out: Vec<Vec<MemoryPart>> = self
            .cell_ids
            .iter()
            .map(|id| {
                vec![part(
                    Some(*id),
                    self.cell_memory_kib.get(id).copied().unwrap_or(0),
                )]
            })
            .collect();
        let last = out.last_mut().expect("cells");
        for (&id, &kib) in self
            .cell_memory_kib
            .iter()
            .filter(|(id, _)| !self.cell_ids.contains(id))
        {
            last.push(part(Some(id), kib));
        }
        out
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
        assert!(!d.cell_memory_bound);
        let bound = LIVE.replace(
            "</numatune>",
            "<memnode cellid='0' mode='strict' nodeset='1'/></numatune>",
        );
        assert!(DomainSpec::parse(&bound).unwrap().cell_memory_bound);
        assert_eq!(d.metadata.as_ref().unwrap().policy, Some(Policy::Dedicated));
        assert_eq!(d.nova, Some(NovaInstance { flavor: None }));
        assert!(!d.is_foreign());
        assert_eq!(d.pinned_cpus().to_string(), "2-3");
    }

    #[test]
    fn reads_the_guests_numa_cells_in_id_order_cut_to_online_vcpus() {
        let xml = "<domain><name>big</name><vcpu current='6'>8</vcpu><cpu><numa>\
                   <cell id='1' cpus='4-7' memory='1048576'/>\
                   <cell id='0' cpus='0-3' memory='1048576'/></numa></cpu></domain>";
        let d = DomainSpec::parse(xml).unwrap();
        assert_eq!(
            d.cells,
            vec![CpuSet::parse("0-3").unwrap(), CpuSet::parse("4-5").unwrap()]
        );
        assert_eq!(d.cell_ids, [0, 1]);
        // Cell 0's vCPUs all offline: cell 1 keeps its id.
        let offline = xml.replace("cpus='0-3'", "cpus='7'");
        let d = DomainSpec::parse(&offline).unwrap();
        assert_eq!((d.cell_ids, d.cells.len()), (vec![1], 1));
        let bad = xml.replace("cpus='4-7'", "cpus='4-x'");
        let err = DomainSpec::parse(&bad).unwrap_err().to_string();
        assert!(err.contains("big") && err.contains("<cell cpus>"), "{err}");
        let none = "<domain><name>n</name><vcpu>2</vcpu></domain>";
        assert!(DomainSpec::parse(none).unwrap().cells.is_empty());
    }

    #[test]
    fn reads_memory_its_hugepages_and_each_cells_share() {
        let xml = "<domain><name>nfv</name><memory unit='GiB'>6</memory>\
                   <currentMemory unit='GiB'>2</currentMemory><vcpu>4</vcpu>\
                   <memoryBacking><hugepages><page size='1' unit='G' nodeset='1'/></hugepages></memoryBacking>\
                   <cpu><numa><cell id='0' cpus='0-1' memory='2' unit='GiB'/>\
                   <cell id='1' cpus='2-3' memory='4194304'/></numa></cpu></domain>";
        let d = DomainSpec::parse(xml).unwrap();
        assert_eq!(d.memory_kib, 6 << 20, "<memory>, not the balloon's current");
        assert_eq!(d.cell_memory_kib[&0], 2 << 20);
        assert_eq!(d.cell_memory_kib[&1], 4 << 20, "KiB when no unit is named");
        let by_cell = d.memory_by_cell(Some(2048));
        assert_eq!(
            by_cell,
            vec![
                vec![MemoryPart {
                    kib: 2 << 20,
                    kind: PageKind::Huge(2048)
                }],
                vec![MemoryPart {
                    kib: 4 << 20,
                    kind: PageKind::Huge(1 << 20)
                }],
            ],
            "cell 1 names 1G pages; cell 0 takes the host's default size"
        );
        // Cell 0's vCPUs offline: its memory goes with the last cell.
        let offline = xml
            .replace("<vcpu>4</vcpu>", "<vcpu current='2'>4</vcpu>")
            .replace("cpus='0-1'", "cpus='2-3'")
            .replace("cpus='2-3' memory='4194304'", "cpus='0-1' memory='4194304'");
        let d = DomainSpec::parse(&offline).unwrap();
        assert_eq!(d.cell_ids, [1]);
        let parts: u64 = d.memory_by_cell(None).concat().iter().map(|p| p.kib).sum();
        assert_eq!(parts, 6 << 20);
        let plain = DomainSpec::parse(
            "<domain><name>p</name><memory>65536</memory><vcpu>1</vcpu></domain>",
        )
        .unwrap();
        assert_eq!(
            plain.memory_by_cell(None),
            vec![vec![MemoryPart {
                kib: 65536,
                kind: PageKind::Normal
            }]]
        );
        let bad = DomainSpec::parse(
            "<domain><name>b</name><memory unit='parsec'>1</memory><vcpu>1</vcpu></domain>",
        )
        .unwrap_err()
        .to_string();
        assert!(
            bad.contains("\"b\"") && bad.contains("<memory>: unit \"parsec\""),
            "{bad}"
        );
    }

    #[test]
    fn names_are_kept_exactly_as_written() {
        let with = |name: &str| {
            DomainSpec::parse(&format!(
                "<domain><name>{name}</name><vcpu>1</vcpu></domain>"
            ))
            .unwrap()
            .name
        };
        assert_eq!(with(" twin "), " twin ");
        assert_eq!(
            with("web&#13;  vcpu 1"),
            "web\r  vcpu 1",
            "a character reference is the character"
        );
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
        assert_eq!(meta.policy, Some(Policy::Auto));
        assert_eq!(meta.unknown_policy.as_deref(), Some("fastest"));
        assert_eq!(
            meta.to_xml("shared"),
            "<state policy=\"fastest\" mode=\"shared\"/>"
        );
        let odd = PinnerMetadata {
            policy: Some(Policy::Auto),
            unknown_policy: Some("a\"<&".into()),
            mode: None,
        };
        assert_eq!(
            odd.to_xml("shared"),
            "<state policy=\"a&quot;&lt;&amp;\" mode=\"shared\"/>"
        );
        // No policy of the owner's: none written, so the host's rules go on
        // deciding.
        let ruled = PinnerMetadata::default();
        assert_eq!(ruled.to_xml("dedicated"), "<state mode=\"dedicated\"/>");
        let xml = r#"<domain><name>x</name><vcpu>1</vcpu><metadata>
            <p:state xmlns:p="urn:pinner:1" mode="dedicated"/></metadata></domain>"#;
        assert_eq!(
            DomainSpec::parse(xml).unwrap().metadata.unwrap().policy,
            None
        );
    }

    #[test]
    fn reads_novas_instance_and_flavor() {
        let xml = r#"<domain><name>instance-0001</name><vcpu cpuset='4-7'>2</vcpu><metadata>
            <nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1">
              <nova:name>web</nova:name><nova:flavor name="cpu.large"><nova:vcpus>2</nova:vcpus></nova:flavor>
            </nova:instance></metadata></domain>"#;
        let d = DomainSpec::parse(xml).unwrap();
        assert_eq!(
            d.nova.as_ref().unwrap().flavor.as_deref(),
            Some("cpu.large")
        );
        assert!(d.is_nova_floating() && d.is_foreign());
        let pinned = xml.replace(
            "</metadata>",
            "</metadata><cputune><vcpupin vcpu='0' cpuset='4'/></cputune>",
        );
        assert!(!DomainSpec::parse(&pinned).unwrap().is_nova_floating());
        let other = xml.replace("openstack.org/xmlns/libvirt/nova/1.1", "example.org/nova");
        assert_eq!(DomainSpec::parse(&other).unwrap().nova, None);
    }

    #[test]
    fn bad_xml_is_an_error_naming_the_domain() {
        let e = DomainSpec::parse("<domain><name>bad</name><vcpu>two</vcpu></domain>")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"bad\"") && e.contains("<vcpu>"), "{e}");
        assert!(DomainSpec::parse("<domain><name>x").is_err());
        assert!(DomainSpec::parse("<network/>")
            .unwrap_err()
            .to_string()
            .contains("not <domain>"));
        let e = DomainSpec::parse("<domain><name>b</name><vcpu>1</vcpu><cputune><vcpupin vcpu='0' cpuset='9-1'/></cputune></domain>")
            .unwrap_err().to_string();
        assert!(e.contains("backwards"), "{e}");
    }

    #[test]
    fn absurd_thread_counts_are_refused_before_anything_is_sized_by_them() {
        let with =
            |body: &str| DomainSpec::parse(&format!("<domain><name>big</name>{body}</domain>"));
        // The fuzzer's finding: an <iothreads> count that asked for 7 GB.
        let e = with("<vcpu>2</vcpu><iothreads>0001855677348</iothreads>")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"big\"") && e.contains("<iothreads> 1855677348"),
            "{e}"
        );
        let e = with("<vcpu>4294967295</vcpu>").unwrap_err().to_string();
        assert!(e.contains("<vcpu> 4294967295 is more than"), "{e}");
        let e = with("<vcpu current='99999'>2</vcpu>")
            .unwrap_err()
            .to_string();
        assert!(e.contains("<vcpu current> 99999"), "{e}");
        let e = with("<vcpu>1</vcpu><iothreads>many</iothreads>")
            .unwrap_err()
            .to_string();
        assert!(e.contains("<iothreads> \"many\" is not a count"), "{e}");
        let at_limit =
            format!("<vcpu>{MAX_GUEST_THREADS}</vcpu><iothreads>{MAX_GUEST_THREADS}</iothreads>");
        let d = with(&at_limit).unwrap();
        assert_eq!(d.vcpus, MAX_GUEST_THREADS);
        assert_eq!(d.iothreads.len(), MAX_GUEST_THREADS as usize);
    }
}
