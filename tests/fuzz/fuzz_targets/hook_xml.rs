//! The hook's reading of libvirt's XML and its migrate/restore rewrite:
//! never a panic; the rewrite only ever removes bytes, and leaves XML it
//! cannot read as it was.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../../hook/src/domain_xml.rs"]
mod domain_xml;
#[path = "../../../hook/src/rewrite.rs"]
mod rewrite;

fuzz_target!(|data: &[u8]| {
    let _ = domain_xml::read(data);
    let out = rewrite::strip_placement(data);
    assert!(out.len() <= data.len());
    if out.len() < data.len() {
        // Something was cut: the input was a readable domain, and so is
        // what libvirt gets.
        let text = std::str::from_utf8(&out).expect("cut at element bounds");
        assert!(roxmltree::Document::parse(text).is_ok(), "{text}");
    }
});
