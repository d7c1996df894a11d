//! Isolation's persisted state: a JSON file beside the daemon's socket
//! (groups, where each moved process came from, failures) and the lock
//! every operation holds, so the daemon's keeper and the CLI never
//! interleave. The file's presence is what "isolation is active" means.

use super::irqs::IrqState;
use super::{Failure, System};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::path::PathBuf;

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
    #[error("{}: unreadable isolation state: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot remove {}: {source}", path.display())]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
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
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| StateError::Open {
                path: path.clone(),
                source,
            })?;
        Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, source)| StateError::Lock { path, source })
    }

    pub fn load_state(&self) -> Result<Option<State>, StateError> {
        let path = self.state_path();
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|source| StateError::Unreadable { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Read { path, source }),
        }
    }

    pub fn save_state(&self, state: &State) -> Result<(), StateError> {
        let path = self.state_path();
        let partial = path.with_extension("json.new");
        let text = serde_json::to_string_pretty(state).expect("state serializes");
        std::fs::write(&partial, text)
            .and_then(|()| std::fs::rename(&partial, &path))
            .map_err(|source| StateError::Write { path, source })
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
