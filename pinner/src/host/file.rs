//! Reading a small file that someone else may have replaced with something
//! hostile: a FIFO (an open or read that never returns), a device such as
//! /dev/zero (endless), a directory, or a file far larger than any real one.
//! Only a regular file is read, and only up to a cap, so a read is bounded in
//! time and memory.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// What was found at a path instead of a regular file of a readable size.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// the path could not be opened or read
    #[error("cannot read: {0}")]
    Io(#[from] io::Error),
    /// the path is not a regular file
    #[error("not a regular file but {kind}; refused")]
    NotRegular { kind: &'static str },
    /// the file is larger than any real one
    #[error("{size} bytes, over the {cap}-byte limit; refused")]
    TooLarge { size: u64, cap: u64 },
    /// the file is not UTF-8 text
    #[error("not UTF-8 text")]
    NotText,
    /// the file is another user's, or others may write it
    #[error("owned by uid {uid} with mode {mode:04o}: only a file of root's that no one else may write is trusted; refused")]
    NotTrusted { uid: u32, mode: u32 },
}

impl FileError {
    /// True when nothing is at the path (as opposed to something unreadable).
    pub fn is_not_found(&self) -> bool {
        matches!(self, FileError::Io(e) if e.kind() == io::ErrorKind::NotFound)
    }
}

/// Reads `path` as text when it is a regular file (symlinks followed) of at
/// most `cap` bytes. The open never blocks: O_NONBLOCK makes opening a FIFO
/// return at once, and its type is then refused before any read.
pub fn read_text(path: &Path, cap: u64) -> Result<String, FileError> {
    String::from_utf8(read_bytes(path, cap)?).map_err(|_| FileError::NotText)
}

/// As [`read_text`], for a file pinner wrote itself and acts on (its
/// isolation state): not through a link, and only when it is root's (this
/// process's) and no one else may write it.
pub fn read_trusted(path: &Path, cap: u64) -> Result<String, FileError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY | nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(nix::libc::ELOOP) => FileError::NotRegular {
                kind: "a symbolic link",
            },
            _ => FileError::Io(e),
        })?;
    let meta = file.metadata()?;
    let me = nix::unistd::geteuid().as_raw();
    if (meta.uid() != me && meta.uid() != 0) || meta.mode() & 0o022 != 0 {
        return Err(FileError::NotTrusted {
            uid: meta.uid(),
            mode: meta.mode() & 0o7777,
        });
    }
    if !meta.file_type().is_file() {
        return Err(FileError::NotRegular {
            kind: describe(&meta.file_type()),
        });
    }
    if meta.len() > cap {
        return Err(FileError::TooLarge {
            size: meta.len(),
            cap,
        });
    }
    String::from_utf8(read_capped(file, cap)?).map_err(|_| FileError::NotText)
}

/// Why a file was not written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// the directory is not one a root process may write into safely
    #[error("{}: {why}; not written there (a directory only root may write to, or a sticky one, will do)", dir.display())]
    UnsafeDirectory { dir: PathBuf, why: String },
    /// the file could not be written or put in place
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// Temporary files of this process, numbered: never the same name twice.
static TEMPORARY: AtomicU32 = AtomicU32::new(0);

/// Replaces `path` with `contents` (mode `mode`) so that no one can make a
/// root process write elsewhere: the directory must be one only root may
/// write to, or sticky with `path` (if there) ours; the new content goes
/// into a temporary file beside it that existed nowhere before and follows
/// no link (O_CREAT | O_EXCL | O_NOFOLLOW), and is then renamed over
/// `path` (a rename replaces a link, never its target). A reader never sees
/// half a file.
pub fn replace(path: &Path, contents: &[u8], mode: u32) -> Result<(), WriteError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    check_directory(dir, path)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| WriteError::Io { path, source }
    };
    let (tmp, mut file) = loop {
        let n = TEMPORARY.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(file) => break (tmp, file),
            // Someone else's file by that name: take the next.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n % 1024 != 1023 => continue,
            Err(e) => return Err(io(&tmp)(e)),
        }
    };
    let written = file
        .write_all(contents)
        .map_err(io(&tmp))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(io(path)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Whether a root process may put files in `dir`: a directory that only
/// root (this process's user) may write to, or a sticky one in which
/// `target`, if there, is ours.
fn check_directory(dir: &Path, target: &Path) -> Result<(), WriteError> {
    let unsafe_dir = |why: String| WriteError::UnsafeDirectory {
        dir: dir.to_path_buf(),
        why,
    };
    let meta = std::fs::metadata(dir).map_err(|source| WriteError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(unsafe_dir("not a directory".into()));
    }
    let me = nix::unistd::geteuid().as_raw();
    let others_write = meta.mode() & 0o022 != 0;
    if meta.uid() != me && meta.uid() != 0 {
        return Err(unsafe_dir(format!(
            "owned by uid {}, who may write to it",
            meta.uid()
        )));
    }
    if !others_write {
        return Ok(());
    }
    if meta.mode() & 0o1000 == 0 {
        return Err(unsafe_dir(format!(
            "mode {:04o}: others may write to it",
            meta.mode() & 0o7777
        )));
    }
    match std::fs::symlink_metadata(target) {
        Ok(t) if t.uid() != me => Err(unsafe_dir(format!(
            "sticky, but {} is uid {}'s",
            target.display(),
            t.uid()
        ))),
        _ => Ok(()),
    }
}

/// As [`read_text`], the bytes as they are (sysfs files may hold NUL
/// padding or other junk their readers skip).
pub fn read_bytes(path: &Path, cap: u64) -> Result<Vec<u8>, FileError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    let kind = meta.file_type();
    if !kind.is_file() {
        return Err(FileError::NotRegular {
            kind: describe(&kind),
        });
    }
    if meta.len() > cap {
        return Err(FileError::TooLarge {
            size: meta.len(),
            cap,
        });
    }
    read_capped(file, cap)
}

/// Reads at most `cap` bytes; a file that grew past the cap since fstat is
/// refused rather than cut.
fn read_capped(file: File, cap: u64) -> Result<Vec<u8>, FileError> {
    let mut bytes = Vec::new();
    file.take(cap + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(FileError::TooLarge {
            size: bytes.len() as u64,
            cap,
        });
    }
    Ok(bytes)
}

fn describe(kind: &std::fs::FileType) -> &'static str {
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("pinner-file-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn reads_a_regular_file_and_follows_symlinks() {
        let dir = scratch("regular");
        std::fs::write(dir.join("a.toml"), "x = 1\n").unwrap();
        std::os::unix::fs::symlink(dir.join("a.toml"), dir.join("link")).unwrap();
        assert_eq!(read_text(&dir.join("a.toml"), 64).unwrap(), "x = 1\n");
        assert_eq!(read_text(&dir.join("link"), 64).unwrap(), "x = 1\n");
        assert!(read_text(&dir.join("missing"), 64)
            .unwrap_err()
            .is_not_found());
    }

    #[test]
    fn refuses_fifos_devices_directories_and_big_files_at_once() {
        let dir = scratch("hostile");
        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.join("zero")).unwrap();
        std::fs::write(dir.join("big"), vec![b'#'; 100]).unwrap();
        let started = Instant::now();
        let refused = |name: &str| read_text(&dir.join(name), 64).unwrap_err().to_string();
        assert_eq!(refused("fifo"), "not a regular file but a FIFO; refused");
        assert_eq!(
            refused("zero"),
            "not a regular file but a character device; refused"
        );
        assert_eq!(refused("."), "not a regular file but a directory; refused");
        assert_eq!(refused("big"), "100 bytes, over the 64-byte limit; refused");
        // No writer ever opens the FIFO: a blocking open would hang here.
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_planted_link_is_replaced_never_followed() {
        let dir = scratch("replace-link");
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        let target = dir.join("pinner.prom");
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        // The fixed temporary name an older writer used, planted too.
        std::os::unix::fs::symlink(&victim, dir.join("pinner.prom.tmp")).unwrap();
        replace(&target, b"metrics\n", 0o644).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        assert!(!std::fs::symlink_metadata(&target)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "metrics\n");
        let mode = std::fs::metadata(&target).unwrap().mode() & 0o777;
        assert_eq!(mode & 0o644, 0o644, "{mode:o}");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 3, "no temporary file left behind: {left:?}");
    }

    #[test]
    fn a_directory_others_may_write_to_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("replace-dir");
        let open = dir.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = replace(&open.join("f"), b"x", 0o644)
            .unwrap_err()
            .to_string();
        assert!(e.contains("mode 0777: others may write to it"), "{e}");
        // Sticky (as /tmp): our own file may be replaced.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        replace(&open.join("f"), b"x", 0o644).unwrap();
        assert!(!open.join("f").is_dir());
        let owned = dir.join("owned");
        std::fs::create_dir(&owned).unwrap();
        nix::unistd::chown(&owned, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        let e = replace(&owned.join("f"), b"x", 0o644)
            .unwrap_err()
            .to_string();
        assert!(e.contains("owned by uid 65534"), "{e}");
        let e = replace(&dir.join("absent/f"), b"x", 0o644)
            .unwrap_err()
            .to_string();
        assert!(e.contains("absent"), "{e}");
    }

    #[test]
    fn a_trusted_file_is_roots_and_no_one_elses() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("trusted");
        let state = dir.join("isolation.json");
        std::fs::write(&state, "{}").unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_trusted(&state, 64).unwrap(), "{}");
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(matches!(
            read_trusted(&state, 64),
            Err(FileError::NotTrusted { .. })
        ));
        let link = dir.join("link.json");
        std::os::unix::fs::symlink(&state, &link).unwrap();
        let e = read_trusted(&link, 64).unwrap_err();
        assert_eq!(
            e.to_string(),
            "not a regular file but a symbolic link; refused"
        );
    }

    #[test]
    fn refuses_binary_content() {
        let dir = scratch("binary");
        std::fs::write(dir.join("bin"), [0xff, 0xfe, 0x00]).unwrap();
        assert!(matches!(
            read_text(&dir.join("bin"), 64),
            Err(FileError::NotText)
        ));
    }
}
