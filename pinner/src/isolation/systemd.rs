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
    #[error("systemctl daemon-reload: {0}")]
    Reload(String),
}

/// Sets runtime properties of systemd units.
pub trait Systemd {
    fn set_properties(&mut self, unit: &str, properties: &[String]) -> Result<(), SystemdError>;

    /// Takes pinner's properties off `units`: the limits lifted, and the
    /// runtime drop-ins `set-property` wrote gone, so the units are as they
    /// were.
    fn reset(&mut self, units: &[String]) -> Result<(), SystemdError> {
        units
            .iter()
            .try_for_each(|unit| self.set_properties(unit, &reset()))
    }
}

/// Through `systemctl set-property --runtime` (nothing persists a reboot).
pub struct Systemctl;

/// Where `systemctl set-property --runtime` writes its drop-ins.
const RUNTIME_CONTROL_DIR: &str = "/run/systemd/system.control";

/// The properties pinner sets, as named in their drop-in files.
const PROPERTY_NAMES: [&str; 3] = ["AllowedCPUs", "AllowedMemoryNodes", "MemoryMax"];

/// Runs systemctl with `args`; when it fails, `refused` makes the error
/// from its trimmed stderr.
fn systemctl<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    refused: impl FnOnce(String) -> SystemdError,
) -> Result<(), SystemdError> {
    let output = std::process::Command::new("systemctl")
        .args(args)
        .output()
        .map_err(|e| SystemdError::Spawn(e.to_string()))?;
    match output.status.success() {
        true => Ok(()),
        false => Err(refused(
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        )),
    }
}

impl Systemd for Systemctl {
    fn set_properties(&mut self, unit: &str, properties: &[String]) -> Result<(), SystemdError> {
        let mut args = vec!["set-property".to_string(), "--runtime".into(), unit.into()];
        args.extend_from_slice(properties);
        systemctl(&args, |stderr| SystemdError::Refused {
            unit: unit.to_string(),
            properties: properties.join(" "),
            stderr,
        })
    }

    fn reset(&mut self, units: &[String]) -> Result<(), SystemdError> {
        let control = std::path::Path::new(RUNTIME_CONTROL_DIR);
        for unit in units {
            self.set_properties(unit, &reset())?;
            // Resetting leaves drop-ins that set the properties to nothing;
            // they go too (one reload below makes systemd forget them).
            let dir = control.join(format!("{unit}.d"));
            for name in PROPERTY_NAMES {
                let _ = std::fs::remove_file(dir.join(format!("50-{name}.conf")));
            }
            let _ = std::fs::remove_dir(&dir);
        }
        let _ = std::fs::remove_dir(control);
        systemctl(&["daemon-reload"], SystemdError::Reload)
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
