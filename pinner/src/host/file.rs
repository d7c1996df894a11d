//! Reading a small file that someone else may have replaced with something
//! hostile: a FIFO (an open or read that never returns), a device such as
//! /dev/zero (endless), a directory, or a file far larger than any real one.
//! Only a regular file is read, and only up to a cap, so a read is bounded in
//! time and memory.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

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
    fn refuses_binary_content() {
        let dir = scratch("binary");
        std::fs::write(dir.join("bin"), [0xff, 0xfe, 0x00]).unwrap();
        assert!(matches!(
            read_text(&dir.join("bin"), 64),
            Err(FileError::NotText)
        ));
    }
}
