//! `--root`: another machine's files, as an operator has them at hand: the
//! directory that holds `sys` (and `proc`, `etc`), `sys` itself, or the
//! `.tar.bz2` that `hwloc-gather-topology` writes.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The most a snapshot may unpack to: hwloc's are well under a MiB; a
/// larger one is refused before anything is written.
const UNPACKED_CAP: u64 = 256 * 1024 * 1024;
const ENTRIES_CAP: usize = 200_000;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Neither a directory holding `sys`, nor `sys` itself, nor a snapshot.
    #[error("{}: not a directory holding sys, nor sys itself, nor a .tar.bz2 snapshot", path.display())]
    NotASnapshot { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// tar refused the archive.
    #[error("{}: cannot unpack: {message}", path.display())]
    Unpack { path: PathBuf, message: String },
    #[error("{}: unpacks to {bytes} bytes in {entries} entries, over the {UNPACKED_CAP}-byte / {ENTRIES_CAP}-entry limit; refused", path.display())]
    TooLarge {
        path: PathBuf,
        bytes: u64,
        entries: usize,
    },
}

/// The root to read `sys`, `proc` and `etc` under; an unpacked snapshot
/// is removed when this is dropped.
#[derive(Debug)]
pub struct Root {
    path: PathBuf,
    unpacked: Option<PathBuf>,
}

impl Root {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn open(given: &Path) -> Result<Root, SnapshotError> {
        let io = |source| SnapshotError::Io {
            path: given.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(given).map_err(io)?;
        if meta.is_file() && is_archive(given) {
            return unpack(given);
        }
        if !meta.is_dir() {
            return Err(SnapshotError::NotASnapshot {
                path: given.to_path_buf(),
            });
        }
        let path = holder_of_sys(given).ok_or_else(|| SnapshotError::NotASnapshot {
            path: given.to_path_buf(),
        })?;
        Ok(Root {
            path,
            unpacked: None,
        })
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        if let Some(dir) = &self.unpacked {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn is_archive(path: &Path) -> bool {
    let name = path.to_string_lossy();
    name.ends_with(".tar.bz2") || name.ends_with(".tbz2")
}

/// `dir` when it holds `sys`; its parent when it is `sys` itself.
fn holder_of_sys(dir: &Path) -> Option<PathBuf> {
    if dir.join("sys").is_dir() {
        return Some(dir.to_path_buf());
    }
    let is_sys =
        dir.join("devices/system/cpu").is_dir() && dir.file_name().is_some_and(|n| n == "sys");
    is_sys
        .then(|| dir.parent().map(Path::to_path_buf))
        .flatten()
}

/// Lists the archive first (its size and entry count checked), then
/// unpacks it into a private directory of its own.
fn unpack(archive: &Path) -> Result<Root, SnapshotError> {
    let listing = tar(&["-tvjf"], archive, None)?;
    let (bytes, entries) = unpacked_size(&listing);
    if bytes > UNPACKED_CAP || entries > ENTRIES_CAP {
        return Err(SnapshotError::TooLarge {
            path: archive.to_path_buf(),
            bytes,
            entries,
        });
    }
    let template = std::env::temp_dir().join("pinner-snapshot.XXXXXX");
    let dir = nix::unistd::mkdtemp(&template).map_err(|e| SnapshotError::Io {
        path: template.clone(),
        source: e.into(),
    })?;
    let mut root = Root {
        path: dir.clone(),
        unpacked: Some(dir.clone()),
    };
    tar(&["-xjf"], archive, Some(&dir))?;
    root.path = single_holder(&dir).ok_or_else(|| SnapshotError::NotASnapshot {
        path: archive.to_path_buf(),
    })?;
    Ok(root)
}

/// hwloc's archives hold one directory named after the machine.
fn single_holder(dir: &Path) -> Option<PathBuf> {
    holder_of_sys(dir).or_else(|| {
        let mut entries = std::fs::read_dir(dir).ok()?.flatten();
        let only = entries.next()?.path();
        entries
            .next()
            .is_none()
            .then(|| holder_of_sys(&only))
            .flatten()
    })
}

/// Runs tar on `archive` (into `into` when unpacking); its stdout.
fn tar(mode: &[&str], archive: &Path, into: Option<&Path>) -> Result<String, SnapshotError> {
    let failed = |message: String| SnapshotError::Unpack {
        path: archive.to_path_buf(),
        message,
    };
    let mut command = Command::new("tar");
    command.args(mode).arg(archive).arg("--no-same-owner");
    if let Some(dir) = into {
        command.arg("--no-same-permissions").arg("-C").arg(dir);
    }
    let output = command.output().map_err(|e| failed(format!("tar: {e}")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(failed(
            pinner_shared::text::printable(stderr.trim()).into_owned(),
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The bytes and entries `tar -tv` lists (its third column is the size).
fn unpacked_size(listing: &str) -> (u64, usize) {
    let sizes = listing.lines().map(|line| {
        line.split_whitespace()
            .nth(2)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
    });
    sizes.fold((0, 0), |(bytes, entries), size| {
        (bytes.saturating_add(size), entries + 1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_sizes_add_up() {
        let listing = "drwxr-xr-x a/b 0 2009-05-13 08:10 x/\n-rw-r--r-- a/b 3379 2009-01-17 12:42 x/proc/stat\n";
        assert_eq!(unpacked_size(listing), (3379, 2));
    }

    #[test]
    fn a_directory_holding_sys_or_sys_itself() {
        let dir = std::env::temp_dir().join(format!("pinner-root-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sys/devices/system/cpu")).unwrap();
        assert_eq!(Root::open(&dir).unwrap().path(), dir);
        assert_eq!(Root::open(&dir.join("sys")).unwrap().path(), dir);
        let error = Root::open(&dir.join("sys/devices"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("not a directory holding sys"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
