//! Isolation's persisted state: a JSON file beside the daemon's socket
//! (groups, where each moved process came from, failures) and the lock
//! every operation holds, so the daemon's keeper and the CLI never
//! interleave. The file's presence is what "isolation is active" means.

use super::irqs::IrqState;
use super::{Failure, System, SYSTEMD_UNITS};
use crate::host::file::{self, FileError, WriteError};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

/// The largest state file read: a host of 100,000 processes records ~10 MB.
const STATE_SIZE_CAP: u64 = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot lock {}: {source}", path.display())]
    Lock { path: PathBuf, source: nix::Error },
    #[error("{shown}: not a usable isolation state ({why}): move it away (`mv {shown} {shown}.bad`), then `pinner isolate undo` puts processes still confined back in their hierarchy's root and removes pinner's groups, or `systemctl reload pinner` confines anew", shown = path.display())]
    Unusable { path: PathBuf, why: Unusable },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}", .0)]
    Write(#[from] WriteError),
    #[error("cannot remove {}: {source}", path.display())]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why a state file is not acted on.
#[derive(Debug, thiserror::Error)]
pub enum Unusable {
    #[error("{0}")]
    File(FileError),
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("group {0:?} is not a plain name")]
    Group(String),
    #[error("unit {0:?} is none pinner sets")]
    Unit(String),
    #[error("process {pid}'s group {group:?} leaves its hierarchy")]
    Origin { pid: u32, group: String },
}

/// Where a moved process was, per hierarchy, to put it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub pid: u32,
    pub start_time: u64,
    /// (hierarchy mount, group path).
    pub groups: Vec<(PathBuf, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub mechanism: String,
    pub reserved: String,
    pub group: String,
    pub with_memory: bool,
    /// systemd units given AllowedCPUs=.
    pub units: Vec<String>,
    pub origins: Vec<Origin>,
    /// The last attempt's failures, by pid.
    pub failures: Vec<Failure>,
    /// What IRQ steering changed (absent in state files of older versions).
    #[serde(default)]
    pub irqs: IrqState,
}

impl State {
    /// What pinner acts on: its group's name (it removes that directory),
    /// the units it resets, each process's groups (it writes pids there).
    fn check(&self) -> Result<(), Unusable> {
        if !super::valid_group_name(&self.group) {
            return Err(Unusable::Group(self.group.clone()));
        }
        if let Some(unit) = self
            .units
            .iter()
            .find(|u| !SYSTEMD_UNITS.contains(&u.as_str()))
        {
            return Err(Unusable::Unit(unit.clone()));
        }
        for origin in &self.origins {
            if let Some((_, group)) = origin.groups.iter().find(|(_, g)| !inside_hierarchy(g)) {
                return Err(Unusable::Origin {
                    pid: origin.pid,
                    group: group.clone(),
                });
            }
        }
        Ok(())
    }
}

/// A cgroup path as /proc/PID/cgroup gives it: absolute, no `..` or `.`.
fn inside_hierarchy(group: &str) -> bool {
    let path = Path::new(group);
    group.starts_with('/')
        && !group.contains('\0')
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

impl System {
    pub fn state_path(&self) -> PathBuf {
        self.state_dir.join("isolation.json")
    }

    /// Holds the isolation lock until dropped.
    pub fn lock(&self) -> Result<Flock<File>, StateError> {
        std::fs::create_dir_all(&self.state_dir).map_err(|source| StateError::CreateDir {
            path: self.state_dir.clone(),
            source,
        })?;
        let path = self.state_dir.join("isolation.lock");
        // Never through a link planted in its place.
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|source| StateError::Open {
                path: path.clone(),
                source,
            })?;
        Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, source)| StateError::Lock { path, source })
    }

    /// The recorded state (None: isolation is not active). Trusted only as
    /// root's own file that no one else may write, and every path in it
    /// only inside pinner's own cgroup tree.
    pub fn load_state(&self) -> Result<Option<State>, StateError> {
        let path = self.state_path();
        let unusable = |why: Unusable| StateError::Unusable {
            path: path.clone(),
            why,
        };
        let text = match file::read_trusted(&path, STATE_SIZE_CAP) {
            Ok(text) => text,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(FileError::Io(source)) => return Err(StateError::Read { path, source }),
            Err(e) => return Err(unusable(Unusable::File(e))),
        };
        let state: State = serde_json::from_str(&text).map_err(|e| unusable(e.into()))?;
        state.check().map_err(unusable)?;
        Ok(Some(state))
    }

    pub fn save_state(&self, state: &State) -> Result<(), StateError> {
        let text = serde_json::to_string_pretty(state).expect("state serializes");
        file::replace(&self.state_path(), text.as_bytes(), 0o600)?;
        Ok(())
    }

    /// Forgets the state: isolation is no longer active.
    pub fn remove_state(&self) -> Result<(), StateError> {
        let path = self.state_path();
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Remove { path, source }),
        }
    }
}
