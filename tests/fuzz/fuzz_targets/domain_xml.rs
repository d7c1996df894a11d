//! The daemon's domain XML model: any input parses or is an error, never a
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = pinner::engine::domain::DomainSpec::parse(text);
    }
});
