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

    /// Takes pinner's properties off `unit`: the limits lifted, and the
    /// runtime drop-ins `set-property` wrote gone, so the unit is as it was.
    fn reset(&mut self, unit: &str) -> Result<(), SystemdError> {
        self.set_properties(unit, &reset())
    }
}

/// Through `systemctl set-property --runtime` (nothing persists a reboot).
pub struct Systemctl;

/// Where `systemctl set-property --runtime` writes its drop-ins.
const RUNTIME_CONTROL_DIR: &str = "/run/systemd/system.control";

/// Where systemd's units have their cgroups on unified hosts.
const UNIFIED_ROOT: &str = "/sys/fs/cgroup";

/// The properties pinner sets, as named in their drop-in files.
const PROPERTY_NAMES: [&str; 3] = ["AllowedCPUs", "AllowedMemoryNodes", "MemoryMax"];

fn systemctl(args: &[&str], unit: &str, properties: &[String]) -> Result<(), SystemdError> {
    let output = std::process::Command::new("systemctl")
        .args(args)
        .args(properties)
        .output()
        .map_err(|e| SystemdError::Spawn(e.to_string()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(SystemdError::Refused {
            unit: unit.to_string(),
            properties: format!("{} {}", args.join(" "), properties.join(" ")),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

impl Systemd for Systemctl {
    fn set_properties(&mut self, unit: &str, properties: &[String]) -> Result<(), SystemdError> {
        systemctl(&["set-property", "--runtime", unit], unit, properties)
    }

    fn reset(&mut self, unit: &str) -> Result<(), SystemdError> {
        self.set_properties(unit, &reset())?;
        // Resetting leaves drop-ins that set the properties to nothing;
        // they go too, then systemd forgets them.
        let dir = std::path::Path::new(RUNTIME_CONTROL_DIR).join(format!("{unit}.d"));
        for name in PROPERTY_NAMES {
            let _ = std::fs::remove_file(dir.join(format!("50-{name}.conf")));
        }
        let _ = std::fs::remove_dir(&dir);
        let _ = std::fs::remove_dir(RUNTIME_CONTROL_DIR);
        systemctl(&["daemon-reload"], unit, &[])?;
        // systemd stops writing a cpuset it no longer manages but leaves
        // the last value while the controller stays on for others
        // (libvirt's machine.slice); empty means the parent's CPUs again.
        let dir = std::path::Path::new(UNIFIED_ROOT).join(unit);
        for file in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(f) = std::fs::OpenOptions::new().write(true).open(dir.join(file)) {
                let _ = std::io::Write::write_all(&mut &f, b"\n");
            }
        }
        Ok(())
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
