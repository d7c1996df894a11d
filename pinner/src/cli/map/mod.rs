//! A map of the host for `pinner status --map` and `pinner plan --map`:
//! packages → NUMA nodes → L3 domains → cores → SMT threads, each CPU
//! marked with what is on it. Pure: a topology and an occupancy in, text
//! (or SVG, `svg`) out.

use crate::engine::cpuset::CpuSet;
use crate::engine::placement::Plan;
use crate::engine::topology::Topology;
use pinner_shared::protocol::{NodeMemoryStatus, RangeStatus, StatusReport};
use std::collections::BTreeMap;
use std::fmt::Write;

mod svg;

/// `--map` (text) or `--map=svg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MapFormat {
    Text,
    Svg,
}

/// The map in `format`; text in colour when `colour`.
pub fn render_as(
    format: MapFormat,
    topology: &Topology,
    occupancy: &Occupancy,
    colour: bool,
) -> String {
    match format {
        MapFormat::Text => render(topology, occupancy, colour),
        MapFormat::Svg => svg::render_svg(topology, occupancy),
    }
}

/// What is placed where: each guest's CPUs (its vCPUs', in order), the
/// host's reserved CPUs, and the guests' memory on each node.
#[derive(Debug, Clone, Default)]
pub struct Occupancy {
    pub guests: Vec<(String, CpuSet)>,
    pub reserved: CpuSet,
    pub memory: Vec<NodeMemoryStatus>,
    /// The shared ranges' demand against their CPUs.
    pub ranges: Vec<RangeStatus>,
}

impl Occupancy {
    /// A plan's guests (their planned CPUs), reserved CPUs and ranges.
    pub fn of_plan(plan: &Plan, ranges: &[RangeStatus]) -> Occupancy {
        let guests = plan.guests.iter().map(|g| (g.name.clone(), g.vcpu_cpus()));
        Occupancy {
            guests: guests.collect(),
            reserved: plan.reserved.clone(),
            memory: crate::engine::reconcile::node_memory(plan),
            ranges: ranges.to_vec(),
        }
    }

    /// The daemon's status: each guest's CPUs as libvirt reports them.
    pub fn of_status(report: &StatusReport) -> Occupancy {
        let guests = report.domains.iter().map(|d| {
            let cpus = d
                .vcpus
                .iter()
                .flat_map(|v| v.cpus.iter().copied())
                .collect();
            (d.name.clone(), cpus)
        });
        Occupancy {
            guests: guests.collect(),
            reserved: report.reserved.iter().copied().collect(),
            memory: report.memory.clone(),
            ranges: report.ranges.clone(),
        }
    }
}

/// One CPU's mark.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mark {
    /// One guest, by its index in the legend.
    Guest(usize),
    /// Several guests share it (range binding).
    Shared,
    Reserved,
    /// `isolcpus=`: the scheduler keeps away from it.
    Isolated,
    Free,
    Offline,
}

/// Guest letters, in legend order; guests beyond them are shown as `?`.
const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
/// ANSI colours (SGR codes) the guests cycle through.
const COLOURS: [&str; 6] = ["32", "34", "35", "36", "33", "31"];

impl Mark {
    fn symbol(self) -> char {
        match self {
            Mark::Guest(i) => LETTERS.get(i).map_or('?', |&b| b as char),
            Mark::Shared => '*',
            Mark::Reserved => '#',
            Mark::Isolated => '~',
            Mark::Free => '.',
            Mark::Offline => 'x',
        }
    }

    /// The SGR code on a terminal.
    fn colour(self) -> &'static str {
        match self {
            Mark::Guest(i) => COLOURS[i % COLOURS.len()],
            Mark::Shared => "1;31",
            Mark::Reserved => "1;37",
            Mark::Isolated => "90",
            Mark::Free | Mark::Offline => "2",
        }
    }
}

/// Cores per row before wrapping: keeps 256 CPUs readable.
const CORES_PER_ROW: usize = 8;

/// What the legend says of the marks that are not guests.
const LEGEND: &str = "# reserved  ~ isolcpus  . free  x offline  * shared by several guests";

/// One line of a map, text or SVG: a package (depth 0) or node (depth 1)
/// heading, or a row of cores with its L3's label (empty on a wrapped row).
enum Line {
    Heading(u32, String),
    Cores(String, Vec<Vec<u32>>),
}

/// The tree flattened into lines, long L3 rows wrapped.
fn lines(topology: &Topology, memory: &[NodeMemoryStatus]) -> Vec<Line> {
    let mut lines = Vec::new();
    for (package, nodes) in tree(topology) {
        lines.push(Line::Heading(0, format!("package {}", label(package))));
        for (node, l3s) in nodes {
            lines.push(Line::Heading(1, node_heading(topology, node, memory)));
            for (l3, cores) in l3s {
                for (i, row) in cores.chunks(CORES_PER_ROW).enumerate() {
                    let name = if i == 0 {
                        format!("L3 {}", label(l3))
                    } else {
                        String::new()
                    };
                    lines.push(Line::Cores(name, row.to_vec()));
                }
            }
        }
    }
    lines
}

/// Renders the map with its legend; `colour` adds ANSI colours.
pub fn render(topology: &Topology, occupancy: &Occupancy, colour: bool) -> String {
    let marks = marks(topology, occupancy);
    let mut out = String::new();
    for line in lines(topology, &occupancy.memory) {
        match line {
            Line::Heading(depth, text) => {
                let _ = writeln!(out, "{:indent$}{text}", "", indent = 2 * depth as usize);
            }
            Line::Cores(l3, cores) => {
                let _ = write!(out, "    {l3:<7}");
                for core in &cores {
                    out.push(' ');
                    out.push_str(&core_cell(core, &marks, colour));
                }
                out.push('\n');
            }
        }
    }
    out.push_str(&legend(occupancy));
    out
}

/// Cores as lists of CPU ids, by L3, by node, by package (None: unknown).
type Tree = BTreeMap<Option<u32>, BTreeMap<Option<u32>, BTreeMap<Option<u32>, Vec<Vec<u32>>>>>;

/// Package, node, L3 and core of a CPU: the map's order.
type CoreKey = (Option<u32>, Option<u32>, Option<u32>, u32);

fn tree(topology: &Topology) -> Tree {
    let mut cores: BTreeMap<CoreKey, Vec<u32>> = BTreeMap::new();
    for cpu in &topology.cpus {
        // A CPU without a core id is a core of its own.
        let core = cpu.core.unwrap_or(u32::MAX - cpu.id);
        let key = (cpu.package, cpu.numa_node, cpu.l3, core);
        cores.entry(key).or_default().push(cpu.id);
    }
    let mut tree = Tree::new();
    for ((package, node, l3, _), cpus) in cores {
        let by_node = tree.entry(package).or_default();
        by_node
            .entry(node)
            .or_default()
            .entry(l3)
            .or_default()
            .push(cpus);
    }
    tree
}

fn label(id: Option<u32>) -> String {
    id.map_or_else(|| "-".into(), |i| i.to_string())
}

/// "node 1 (65280 MiB)", and what guests hold there once they hold any:
/// "node 1 (65280 MiB; guests 12 of 63.3 GiB, 2M pages 64 of 512)".
fn node_heading(topology: &Topology, node: Option<u32>, memory: &[NodeMemoryStatus]) -> String {
    let total = node
        .and_then(|n| topology.numa_nodes.iter().find(|m| m.id == n))
        .and_then(|m| m.memory_mib);
    let (Some(n), Some(mib)) = (node, total) else {
        return format!("node {}", label(node));
    };
    let pools: Vec<&NodeMemoryStatus> = memory.iter().filter(|p| p.node == n).collect();
    if pools
        .iter()
        .all(|p| p.committed_kib == 0 && p.page_size_kib.is_none_or(|_| p.capacity_kib == Some(0)))
    {
        return format!("node {n} ({mib} MiB)");
    }
    let owned: Vec<NodeMemoryStatus> = pools.into_iter().cloned().collect();
    let figures = crate::cli::report::pool_figures(&owned);
    format!("node {n} ({mib} MiB; guests {})", figures.join(", "))
}

/// `[0a 4a]`: a core's threads, each with its mark.
fn core_cell(cpus: &[u32], marks: &BTreeMap<u32, Mark>, colour: bool) -> String {
    let threads: Vec<String> = cpus
        .iter()
        .map(|&id| {
            let mark = marks.get(&id).copied().unwrap_or(Mark::Offline);
            let text = format!("{id}{}", mark.symbol());
            if colour {
                format!("\x1b[{}m{text}\x1b[0m", mark.colour())
            } else {
                text
            }
        })
        .collect();
    format!("[{}]", threads.join(" "))
}

fn marks(topology: &Topology, occupancy: &Occupancy) -> BTreeMap<u32, Mark> {
    let mut marks = BTreeMap::new();
    for cpu in &topology.cpus {
        let mark = if !cpu.online {
            Mark::Offline
        } else if occupancy.reserved.contains(cpu.id) {
            Mark::Reserved
        } else if topology.isolated.contains(cpu.id) {
            Mark::Isolated
        } else {
            Mark::Free
        };
        marks.insert(cpu.id, mark);
    }
    for (index, (_, cpus)) in occupancy.guests.iter().enumerate() {
        for cpu in cpus.iter() {
            let mark = marks.entry(cpu).or_insert(Mark::Free);
            *mark = match *mark {
                Mark::Guest(other) if other != index => Mark::Shared,
                Mark::Shared => Mark::Shared,
                _ => Mark::Guest(index),
            };
        }
    }
    marks
}

fn legend(occupancy: &Occupancy) -> String {
    let mut out = format!("legend: {LEGEND}\n");
    for (index, (name, cpus)) in occupancy.guests.iter().enumerate() {
        let _ = writeln!(
            out,
            "  {} {} (CPUs {cpus})",
            Mark::Guest(index).symbol(),
            pinner_shared::text::printable(name)
        );
    }
    out.push_str(&crate::cli::report::ranges_text(&occupancy.ranges));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(text: &str) -> CpuSet {
        CpuSet::parse(text).unwrap()
    }

    #[test]
    fn two_cpus_one_guest_one_reserved() {
        let topology = Topology::uniform(&set("0-1"), 1);
        let occupancy = Occupancy {
            guests: vec![("web".into(), set("1"))],
            reserved: set("0"),
            memory: Vec::new(),
            ranges: Vec::new(),
        };
        let expected = "\
package 0
  node 0
    L3 -    [0#] [1a]
legend: # reserved  ~ isolcpus  . free  x offline  * shared by several guests
  a web (CPUs 1)
";
        assert_eq!(render(&topology, &occupancy, false), expected);
    }

    #[test]
    fn threads_share_a_cell_and_shared_cpus_are_starred() {
        let topology = Topology::synthetic(2, 1, 2, 2);
        let occupancy = Occupancy {
            guests: vec![("a".into(), set("0-1")), ("b".into(), set("1-2"))],
            reserved: CpuSet::new(),
            memory: Vec::new(),
            ranges: Vec::new(),
        };
        let expected = "\
package 0
  node 0 (65536 MiB)
    L3 0    [0a 4.] [1* 5.]
  node 1 (65536 MiB)
    L3 1    [2b 6.] [3. 7.]
legend: # reserved  ~ isolcpus  . free  x offline  * shared by several guests
  a a (CPUs 0-1)
  b b (CPUs 1-2)
";
        assert_eq!(render(&topology, &occupancy, false), expected);
    }

    #[test]
    fn colour_wraps_each_cpu() {
        let topology = Topology::uniform(&set("0-1"), 1);
        let occupancy = Occupancy {
            guests: vec![("web".into(), set("1"))],
            reserved: set("0"),
            memory: Vec::new(),
            ranges: Vec::new(),
        };
        let text = render(&topology, &occupancy, true);
        assert!(text.contains("\x1b[32m1a\x1b[0m"), "{text:?}");
        assert!(text.contains("\x1b[1;37m0#\x1b[0m"), "{text:?}");
    }
}
