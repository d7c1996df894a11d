//! `pinner plan --demand FILE`: demand given per guest, for planning what
//! would happen at that load. The file is a JSON object of guest name or
//! UUID to CPUs of demand: `{"web-1": 3.5, "6f0c…": 0.2}`.

use crate::engine::domain::DomainSpec;
use crate::host::file::{read_text, FileError};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The largest demand file read: a few dozen bytes per guest.
const DEMAND_FILE_CAP: u64 = 4 * 1024 * 1024;

/// What is wrong with a demand file; each names it.
#[derive(Debug, thiserror::Error)]
pub enum DemandFileError {
    /// the file is unreadable, not a regular file, or too large
    #[error("{}: {source}", path.display())]
    File { path: PathBuf, source: FileError },
    /// the file is not the JSON object asked for
    #[error("{}: not a JSON object of guest name or UUID to CPUs of demand: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// a key names no running guest (printed escaped, as every error is)
    #[error("{}: {guest}: no running guest has this name or UUID", path.display())]
    UnknownGuest { path: PathBuf, guest: String },
    /// a value is outside what the guest can demand
    #[error("{}: {guest}: demand must be 0 to its {vcpus} vCPUs (CPUs), not {value}", path.display())]
    OutOfRange {
        path: PathBuf,
        guest: String,
        vcpus: u32,
        value: f64,
    },
}

/// The demand `path` gives, by guest UUID.
pub fn read(path: &Path, specs: &[DomainSpec]) -> Result<HashMap<String, f64>, DemandFileError> {
    let text = read_text(path, DEMAND_FILE_CAP).map_err(|source| DemandFileError::File {
        path: path.to_path_buf(),
        source,
    })?;
    let given: HashMap<String, f64> =
        serde_json::from_str(&text).map_err(|source| DemandFileError::Json {
            path: path.to_path_buf(),
            source,
        })?;
    let mut demand = HashMap::with_capacity(given.len());
    for (key, value) in given {
        let spec = specs
            .iter()
            .find(|s| s.uuid == key)
            .or_else(|| specs.iter().find(|s| s.name == key))
            .ok_or_else(|| DemandFileError::UnknownGuest {
                path: path.to_path_buf(),
                guest: key.clone(),
            })?;
        if !(0.0..=f64::from(spec.vcpus)).contains(&value) {
            return Err(DemandFileError::OutOfRange {
                path: path.to_path_buf(),
                guest: key.clone(),
                vcpus: spec.vcpus,
                value,
            });
        }
        demand.insert(spec.uuid.clone(), value);
    }
    Ok(demand)
}
