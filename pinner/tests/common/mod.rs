//! Shared by the integration tests that use `../shared/topologies`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `../shared/topologies`, beside the repository.
pub fn topologies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/topologies")
}

/// Whether the snapshots are here; under CI their absence is a failure.
pub fn have_topologies() -> bool {
    let dir = topologies_dir();
    if dir.exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{} missing under CI",
        dir.display()
    );
    eprintln!(
        "SKIPPED: {} not found (it sits beside the repository)",
        dir.display()
    );
    false
}

/// Extracts a snapshot archive into `into`; returns the machine's root (the
/// one directory the archive holds).
pub fn extract(archive: &Path, into: &Path) -> PathBuf {
    std::fs::create_dir_all(into).unwrap();
    let status = Command::new("tar")
        .arg("xjf")
        .arg(archive)
        .arg("-C")
        .arg(into)
        .status()
        .unwrap();
    assert!(status.success(), "tar failed on {}", archive.display());
    let mut dirs = std::fs::read_dir(into)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir());
    let root = dirs.next().expect("archive holds one directory").path();
    assert!(
        dirs.next().is_none(),
        "{} holds more than one directory",
        archive.display()
    );
    root
}
