//! systemd's side of isolation on unified hosts: runtime `AllowedCPUs=`
//! (and memory) properties on the slices host processes live in.

use super::Settings;

/// systemd units confined on unified hosts run by systemd.
pub const SYSTEMD_UNITS: [&str; 3] = ["system.slice", "user.slice", "init.scope"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SystemdError {
    #[error("cannot run systemctl: {0}")]
    Spawn(String),
    #[error("systemctl set-property {unit} {properties}: {stderr}")]
    Refused {
        unit: String,
        properties: String,
        stderr: String,
    },
}

/// Sets runtime properties of systemd units.
pub trait Systemd {
    fn set_properties(&mut self, unit: &str, properties: &[String]) -> Result<(), SystemdError>;
}

/// Through `systemctl set-property --runtime` (nothing persists a reboot).
pub struct Systemctl;

impl Systemd for Systemctl {
    fn set_properties(&mut self, unit: &str, properties: &[String]) -> Result<(), SystemdError> {
        let output = std::process::Command::new("systemctl")
            .args(["set-property", "--runtime", unit])
            .args(properties)
            .output()
            .map_err(|e| SystemdError::Spawn(e.to_string()))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(SystemdError::Refused {
                unit: unit.to_string(),
                properties: properties.join(" "),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            })
        }
    }
}

pub fn properties(settings: &Settings) -> Vec<String> {
    let mut properties = vec![format!("AllowedCPUs={}", settings.reserved)];
    if !settings.mems.is_empty() {
        properties.push(format!("AllowedMemoryNodes={}", settings.mems));
    }
    if let Some(bytes) = settings.config.memory_limit {
        properties.push(format!("MemoryMax={bytes}"));
    }
    properties
}

pub fn reset() -> Vec<String> {
    ["AllowedCPUs=", "AllowedMemoryNodes=", "MemoryMax=infinity"]
        .map(String::from)
        .to_vec()
}
