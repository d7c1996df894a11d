//! The few facts the hook needs from libvirt's domain XML.

/// Larger documents are not parsed (the event still goes out, by name).
const MAX_PARSED_XML: usize = 4 << 20;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct DomainFacts {
    pub name: Option<String>,
    pub uuid: Option<String>,
    pub vcpus: Option<u32>,
}

/// Runs `f` on the text and root `<domain>` element of `xml`; None when it
/// is larger than `limit`, not UTF-8, not XML or not a domain. DTDs are
/// refused by the parser, so entity expansion cannot happen.
pub fn with_domain<T>(
    xml: &[u8],
    limit: usize,
    f: impl FnOnce(&str, roxmltree::Node) -> Option<T>,
) -> Option<T> {
    if xml.len() > limit {
        return None;
    }
    let text = std::str::from_utf8(xml).ok()?;
    let doc = roxmltree::Document::parse(text).ok()?;
    let root = doc.root_element();
    if !root.has_tag_name("domain") {
        return None;
    }
    f(text, root)
}

/// Reads `<name>`, `<uuid>` and `<vcpu>` (its `current` attribute when set)
/// from the root `<domain>`. Anything unreadable gives empty facts.
pub fn read(xml: &[u8]) -> DomainFacts {
    with_domain(xml, MAX_PARSED_XML, |_, root| Some(facts(root))).unwrap_or_default()
}

fn facts(root: roxmltree::Node) -> DomainFacts {
    let child_text = |tag: &str| {
        root.children()
            .find(|n| n.has_tag_name(tag))
            .and_then(|n| n.text())
            .map(|t| t.trim().to_string())
    };
    let vcpus = root
        .children()
        .find(|n| n.has_tag_name("vcpu"))
        .and_then(|n| {
            n.attribute("current")
                .or(n.text())
                .and_then(|v| v.trim().parse().ok())
        });
    DomainFacts {
        name: child_text("name"),
        uuid: child_text("uuid"),
        vcpus,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_top_level_facts_only() {
        let xml = br#"<domain type='kvm' id='3'>
  <name>web-1</name>
  <uuid>c7a5fdbd-edaf-9455-926a-d65c16db1809</uuid>
  <metadata><nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1"><nova:name>other</nova:name></nova:instance></metadata>
  <vcpu placement='static' current='2'>4</vcpu>
</domain>"#;
        assert_eq!(
            read(xml),
            DomainFacts {
                name: Some("web-1".into()),
                uuid: Some("c7a5fdbd-edaf-9455-926a-d65c16db1809".into()),
                vcpus: Some(2),
            }
        );
    }

    #[test]
    fn vcpu_text_when_no_current() {
        assert_eq!(read(b"<domain><vcpu>8</vcpu></domain>").vcpus, Some(8));
    }

    #[test]
    fn hostile_or_broken_input_gives_no_facts() {
        let bomb = br#"<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>
<domain><name>&lol2;</name></domain>"#;
        for xml in [
            &bomb[..],
            b"<domain><name>trunc",
            b"\xff\xfe<domain/>",
            b"<other><name>x</name></other>",
            b"",
        ] {
            assert_eq!(
                read(xml),
                DomainFacts::default(),
                "{:?}",
                String::from_utf8_lossy(xml)
            );
        }
    }
}
