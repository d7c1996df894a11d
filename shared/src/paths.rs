//! Well-known paths. The hook reads no configuration, so its socket path is
//! fixed here; the daemon may listen elsewhere only inside a private /run
//! (tests), where this path is bind-mounted.

/// The daemon's unix socket: hook events and CLI requests.
pub const DEFAULT_SOCKET: &str = "/run/pinner/pinner.sock";
/// Beside the socket: one byte appended per event the hook could not hand
/// over, so its size counts them (since boot: /run is a tmpfs). Appends of
/// one byte are atomic, so concurrent hooks need no lock.
pub const HOOK_DROPS_FILE: &str = "hook-dropped";
/// The daemon's configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/pinner/pinner.toml";
/// libvirt metadata namespace URI that marks what pinner manages.
pub const METADATA_URI: &str = "urn:pinner:1";
/// libvirt metadata key (XML prefix) for pinner's element.
pub const METADATA_KEY: &str = "pinner";
