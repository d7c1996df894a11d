//! Pid-file directories watched with inotify, so a (re)started daemon is
//! confined at once rather than at the next sweep.

use crate::host::file;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A pid file holds a number and a newline; the directory one sits in may
/// belong to the service's own user, who could put a FIFO or a huge file
/// there instead.
const PID_FILE_CAP: u64 = 64;

/// Watches pid-file directories (and their subdirectories) for daemons
/// that (re)start, so they are confined at once rather than at the next
/// sweep.
pub struct PidFileWatch {
    inotify: Inotify,
    /// Watched directories; true for the configured ones (whose new
    /// subdirectories are watched too).
    dirs: Vec<(WatchDescriptor, PathBuf, bool)>,
}

impl PidFileWatch {
    pub fn new(dirs: &[PathBuf]) -> Result<PidFileWatch, nix::Error> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        let mut watch = PidFileWatch {
            inotify,
            dirs: Vec::new(),
        };
        for dir in dirs {
            if watch.add(dir, true) {
                for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        watch.add(&entry.path(), false);
                    }
                }
            }
        }
        Ok(watch)
    }

    /// Watches `dir` unless it is watched already (/var/run is usually
    /// /run); false when it cannot be.
    fn add(&mut self, dir: &Path, top: bool) -> bool {
        let flags = AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_ONLYDIR;
        match self.inotify.add_watch(dir, flags) {
            Ok(wd) => {
                if !self.dirs.iter().any(|(w, _, _)| *w == wd) {
                    self.dirs.push((wd, dir.to_path_buf(), top));
                }
                true
            }
            Err(_) => false,
        }
    }

    /// Waits up to `timeout` for pid files to be written; returns the pids
    /// they name (empty on timeout). Directories created in a watched one
    /// are watched from then on.
    pub fn wait(&mut self, timeout: Duration) -> Vec<u32> {
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN)];
        if !matches!(poll(&mut fds, PollTimeout::from(ms)), Ok(n) if n > 0) {
            return Vec::new();
        }
        let mut pids = Vec::new();
        while let Ok(events) = self.inotify.read_events() {
            if events.is_empty() {
                break;
            }
            for event in events {
                let Some((_, dir, top)) = self.dirs.iter().find(|(w, _, _)| *w == event.wd) else {
                    continue;
                };
                let Some(name) = event.name.as_ref() else {
                    continue;
                };
                let path = dir.join(name);
                if event.mask.contains(AddWatchFlags::IN_ISDIR) {
                    // Only one level down from the configured directories.
                    if *top {
                        self.add(&path, false);
                    }
                    continue;
                }
                let is_pid_file = path.extension().is_some_and(|e| e == "pid");
                if let Some(pid) = is_pid_file
                    .then(|| file::read_text(&path, PID_FILE_CAP).ok())
                    .flatten()
                    .and_then(|text| text.trim().parse::<u32>().ok())
                {
                    pids.push(pid);
                }
            }
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }
}
