//! The host map as SVG (`--map=svg`), for reports and the README: the same
//! tree and marks as the text map, one box per CPU, cores side by side.

use super::{lines, marks, Line, Mark, Occupancy, LEGEND};
use crate::engine::topology::Topology;
use std::fmt::Write;

const CELL_W: u32 = 44;
const CELL_H: u32 = 24;
const ROW_H: u32 = 30;
const INDENT: u32 = 16;
/// Fill colours the guests cycle through.
const PALETTE: [&str; 8] = [
    "#4e9a06", "#3465a4", "#75507b", "#06989a", "#c4a000", "#ce5c00", "#8f5902", "#204a87",
];

impl Mark {
    /// Fill and text colour of the CPU's box.
    fn fill(self) -> (&'static str, &'static str) {
        match self {
            Mark::Guest(i) => (PALETTE[i % PALETTE.len()], "#ffffff"),
            Mark::Shared => ("#cc0000", "#ffffff"),
            Mark::Reserved => ("#2e3436", "#ffffff"),
            Mark::Isolated => ("#babdb6", "#2e3436"),
            Mark::Free => ("#eeeeec", "#555753"),
            Mark::Offline => ("#ffffff", "#babdb6"),
        }
    }
}

/// Where a row of cores starts: after its L3 label.
const CORES_X: u32 = 2 * INDENT + 64;

pub fn render_svg(topology: &Topology, occupancy: &Occupancy) -> String {
    let marks = marks(topology, occupancy);
    let lines = lines(topology, &occupancy.memory);
    let widest = lines
        .iter()
        .map(|line| match line {
            Line::Heading(..) => 0,
            Line::Cores(_, cores) => CORES_X + row_width(cores),
        })
        .max()
        .unwrap_or(0)
        .max(560);
    let height =
        (lines.len() as u32 + (occupancy.guests.len() + occupancy.ranges.len()) as u32 + 2) * ROW_H;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{widest}\" height=\"{height}\" \
         font-family=\"monospace\" font-size=\"12\">\n"
    );
    let mut y = ROW_H;
    for line in &lines {
        match line {
            Line::Heading(depth, text) => text_at(&mut out, depth * INDENT + 4, y - 10, text),
            Line::Cores(l3, cores) => {
                text_at(&mut out, 2 * INDENT + 4, y - 8, l3);
                draw_cores(&mut out, CORES_X, y, cores, &marks);
            }
        }
        y += ROW_H;
    }
    draw_legend(&mut out, y, occupancy);
    out.push_str("</svg>\n");
    out
}

fn row_width(cores: &[Vec<u32>]) -> u32 {
    cores.iter().map(|c| c.len() as u32 * CELL_W + 8).sum()
}

fn draw_cores(
    out: &mut String,
    x: u32,
    y: u32,
    cores: &[Vec<u32>],
    marks: &std::collections::BTreeMap<u32, Mark>,
) {
    let mut x = x;
    for core in cores {
        let width = core.len() as u32 * CELL_W;
        let _ = writeln!(
            out,
            "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#888a85\"/>",
            x - 2,
            y - CELL_H - 2,
            width + 2,
            CELL_H + 4
        );
        for (i, cpu) in core.iter().enumerate() {
            let mark = marks.get(cpu).copied().unwrap_or(Mark::Offline);
            let (fill, ink) = mark.fill();
            let cx = x + i as u32 * CELL_W;
            let _ = writeln!(
                out,
                "<rect x=\"{cx}\" y=\"{}\" width=\"{}\" height=\"{CELL_H}\" fill=\"{fill}\"/>\
                 <text x=\"{}\" y=\"{}\" fill=\"{ink}\">{cpu}{}</text>",
                y - CELL_H,
                CELL_W - 2,
                cx + 4,
                y - 8,
                mark.symbol()
            );
        }
        x += width + 8;
    }
}

fn draw_legend(out: &mut String, y: u32, occupancy: &Occupancy) {
    text_at(out, 4, y, LEGEND);
    for (index, (name, cpus)) in occupancy.guests.iter().enumerate() {
        let mark = Mark::Guest(index);
        let top = y + (index as u32 + 1) * ROW_H;
        let _ = writeln!(
            out,
            "<rect x=\"4\" y=\"{}\" width=\"16\" height=\"16\" fill=\"{}\"/>",
            top - 13,
            mark.fill().0
        );
        // Escaped for a person first: XML 1.0 has no way to carry most
        // control characters at all.
        let name = pinner_shared::text::printable(name);
        let entry = format!("{} {name} (CPUs {cpus})", mark.symbol());
        text_at(out, 26, top, &entry);
    }
    let below = y + (occupancy.guests.len() as u32 + 1) * ROW_H;
    for (i, range) in occupancy.ranges.iter().enumerate() {
        let line = crate::cli::report::range_line(range);
        text_at(out, 4, below + i as u32 * ROW_H, &line);
    }
}

fn text_at(out: &mut String, x: u32, y: u32, text: &str) {
    let _ = writeln!(out, "<text x=\"{x}\" y=\"{y}\">{}</text>", escape(text));
}

/// Guest names are anyone's text: escaped for XML.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpuset::CpuSet;

    #[test]
    fn every_cpu_is_a_box_and_names_are_escaped() {
        let topology = Topology::synthetic(2, 1, 2, 2);
        let occupancy = Occupancy {
            guests: vec![("<evil & \"name\">".into(), CpuSet::parse("0-1").unwrap())],
            reserved: CpuSet::parse("7").unwrap(),
            memory: Vec::new(),
            ranges: Vec::new(),
        };
        let svg = render_svg(&topology, &occupancy);
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        for cpu in 0..8 {
            assert!(svg.contains(&format!(">{cpu}")), "CPU {cpu} missing");
        }
        assert!(svg.contains(">0a</text>") && svg.contains(">7#</text>"));
        assert!(svg.contains("a &lt;evil &amp; &quot;name&quot;&gt; (CPUs 0-1)"));
        assert!(!svg.contains("<evil"));
        assert_eq!(
            svg.matches("fill=\"#4e9a06\"").count(),
            3,
            "2 CPUs and the legend"
        );
    }
}
