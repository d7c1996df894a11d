//! The config parser: any file is a config or an error naming a line,
//! never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = pinner::config::Config::parse(text, Path::new("/etc/pinner/pinner.toml")) {
            assert!(e.to_string().starts_with("/etc/pinner/pinner.toml"));
        }
    }
});
