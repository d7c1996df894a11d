//! The XML libvirt starts an incoming migration or a restore from, with the
//! placement pinner set taken out: pins chosen for another host (or for
//! this one before its CPUs changed) must not follow the guest. The daemon
//! places it again once it runs.
//!
//! Only domains carrying pinner's metadata are changed, and in them only
//! `<cputune>`'s `<vcpupin>`, `<emulatorpin>` and `<iothreadpin>` and the
//! `<numatune>` element; every other byte is passed through as it came.
//! Anything that cannot be read safely is passed through unchanged.

use std::borrow::Cow;
use std::ops::Range;

const PINNER_NS: &str = "urn:pinner:1";
/// Larger documents pass through unchanged (libvirt's own limit is 10 MB).
const MAX_REWRITTEN_XML: usize = 10 << 20;

pub fn strip_placement(xml: &[u8]) -> Cow<'_, [u8]> {
    match removals(xml) {
        Some(ranges) if !ranges.is_empty() => {
            let mut out = Vec::with_capacity(xml.len());
            let mut at = 0;
            for range in ranges {
                out.extend_from_slice(&xml[at..range.start]);
                at = range.end;
            }
            out.extend_from_slice(&xml[at..]);
            Cow::Owned(out)
        }
        _ => Cow::Borrowed(xml),
    }
}

/// Byte ranges to cut, ascending and disjoint; None when the XML is not a
/// domain pinner manages (or not readable).
fn removals(xml: &[u8]) -> Option<Vec<Range<usize>>> {
    crate::domain_xml::with_domain(xml, MAX_REWRITTEN_XML, |text, root| {
        placement_ranges(text, root)
    })
}

fn placement_ranges(text: &str, root: roxmltree::Node) -> Option<Vec<Range<usize>>> {
    let managed = root
        .children()
        .filter(|n| n.has_tag_name("metadata"))
        .flat_map(|m| m.children())
        .any(|n| {
            n.tag_name().namespace() == Some(PINNER_NS)
                && n.tag_name().name() == "state"
                && n.attribute("policy") != Some("none")
        });
    if !managed {
        return None;
    }
    let pins = root
        .children()
        .filter(|n| n.has_tag_name("cputune"))
        .flat_map(|t| t.children())
        .filter(|n| {
            n.is_element()
                && ["vcpupin", "emulatorpin", "iothreadpin"].contains(&n.tag_name().name())
        });
    let numatune = root.children().filter(|n| n.has_tag_name("numatune"));
    let mut ranges: Vec<Range<usize>> = pins
        .chain(numatune)
        .map(|n| whole_lines(text, n.range()))
        .collect();
    ranges.sort_by_key(|r| r.start);
    Some(ranges)
}

/// Widens an element's range to its whole line(s) when nothing else is on
/// them, so no blank line is left behind.
fn whole_lines(text: &str, range: Range<usize>) -> Range<usize> {
    let bytes = text.as_bytes();
    let mut start = range.start;
    while start > 0 && matches!(bytes[start - 1], b' ' | b'\t') {
        start -= 1;
    }
    let mut end = range.end;
    while end < bytes.len() && matches!(bytes[end], b' ' | b'\t' | b'\r') {
        end += 1;
    }
    let alone = (start == 0 || bytes[start - 1] == b'\n') && bytes.get(end) == Some(&b'\n');
    if alone {
        start..end + 1
    } else {
        range
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of `virsh dumpxml --migratable` of a guest pinner placed.
    const MANAGED: &str = r#"<domain type='kvm'>
  <name>web-1</name>
  <uuid>c7a5fdbd-edaf-9455-926a-d65c16db1809</uuid>
  <metadata>
    <pinner:state xmlns:pinner="urn:pinner:1" policy="auto" mode="dedicated"/>
  </metadata>
  <memory unit='KiB'>4194304</memory>
  <vcpu placement='static'>2</vcpu>
  <iothreads>1</iothreads>
  <cputune>
    <shares>2048</shares>
    <vcpupin vcpu='0' cpuset='4'/>
    <vcpupin vcpu='1' cpuset='36'/>
    <emulatorpin cpuset='0-1'/>
    <iothreadpin iothread='1' cpuset='0-1'/>
  </cputune>
  <numatune>
    <memory mode='strict' nodeset='1'/>
  </numatune>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
  </os>
</domain>
"#;

    #[test]
    fn takes_out_only_the_placement_pinner_set() {
        let out = strip_placement(MANAGED.as_bytes());
        let expected = MANAGED
            .lines()
            .filter(|l| {
                ![
                    "vcpupin",
                    "emulatorpin",
                    "iothreadpin",
                    "numatune",
                    "<memory mode",
                ]
                .iter()
                .any(|w| l.contains(w))
            })
            .map(|l| format!("{l}\n"))
            .collect::<String>();
        assert_eq!(String::from_utf8_lossy(&out), expected);
        assert!(expected.contains("<shares>2048</shares>"));
        assert!(roxmltree::Document::parse(&expected).is_ok());
    }

    #[test]
    fn nova_pins_and_opted_out_guests_are_left_byte_for_byte() {
        // nova's dedicated guest: pins, numatune and nova's metadata only.
        let nova = r#"<domain type="kvm">
  <name>instance-0000002a</name>
  <metadata>
    <nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1">
      <nova:flavor name="pinned.large"/>
    </nova:instance>
  </metadata>
  <vcpu cpuset="2-3">2</vcpu>
  <cputune>
    <vcpupin vcpu="0" cpuset="2"/>
    <vcpupin vcpu="1" cpuset="3"/>
    <emulatorpin cpuset="2-3"/>
  </cputune>
  <numatune><memory mode="strict" nodeset="0"/><memnode cellid="0" mode="strict" nodeset="0"/></numatune>
</domain>"#;
        let opted_out = MANAGED.replace("policy=\"auto\"", "policy=\"none\"");
        for xml in [nova, opted_out.as_str()] {
            assert!(matches!(strip_placement(xml.as_bytes()), Cow::Borrowed(_)));
        }
    }

    #[test]
    fn elements_sharing_a_line_are_cut_exactly() {
        let xml = "<domain><metadata><p:state xmlns:p='urn:pinner:1' policy='dedicated'/></metadata>\
                   <cputune><vcpupin vcpu='0' cpuset='1'/><period>100</period></cputune><numatune><memory nodeset='0'/></numatune></domain>";
        let out = String::from_utf8(strip_placement(xml.as_bytes()).into_owned()).unwrap();
        assert_eq!(
            out,
            "<domain><metadata><p:state xmlns:p='urn:pinner:1' policy='dedicated'/></metadata>\
             <cputune><period>100</period></cputune></domain>"
        );
    }

    #[test]
    fn unreadable_or_hostile_input_passes_through_unchanged() {
        let bomb = r#"<?xml version="1.0"?>
<!DOCTYPE d [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;&a;">]>
<domain><metadata><p:state xmlns:p='urn:pinner:1' policy='auto'/></metadata>
<cputune><vcpupin vcpu='0' cpuset='&b;'/></cputune></domain>"#;
        let huge = format!("{}{}", MANAGED, " ".repeat(MAX_REWRITTEN_XML));
        let truncated = &MANAGED[..MANAGED.len() / 2];
        for xml in [
            bomb.as_bytes(),
            huge.as_bytes(),
            truncated.as_bytes(),
            b"\xff<domain/>",
            b"",
        ] {
            assert!(matches!(strip_placement(xml), Cow::Borrowed(b) if b == xml));
        }
    }
}
