//! systemd's readiness protocol (sd_notify(3)): a datagram to
//! $NOTIFY_SOCKET. A no-op when not started by systemd with Type=notify.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET {path}: {source}")]
    Address {
        path: String,
        source: std::io::Error,
    },
    #[error("notify socket: {0}")]
    Socket(std::io::Error),
    #[error("notify {path}: {source}")]
    Send {
        path: String,
        source: std::io::Error,
    },
}

/// Sends `state` ("READY=1", "STOPPING=1", "RELOADING=1", ...); errors are
/// returned for logging, never fatal.
pub fn notify(state: &str) -> Result<(), NotifyError> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(path) => notify_to(&path.to_string_lossy(), state),
        None => Ok(()),
    }
}

/// Sends `state` to the notify socket at `path` ("@name": abstract).
fn notify_to(path: &str, state: &str) -> Result<(), NotifyError> {
    let address = match path.strip_prefix('@') {
        // An abstract socket: '@' stands for the leading NUL byte.
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(path),
    }
    .map_err(|source| NotifyError::Address {
        path: path.to_string(),
        source,
    })?;
    let socket = UnixDatagram::unbound().map_err(NotifyError::Socket)?;
    socket
        .send_to_addr(state.as_bytes(), &address)
        .map(|_| ())
        .map_err(|source| NotifyError::Send {
            path: path.to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_the_state_to_the_notify_socket() {
        let dir = crate::test_support::scratch_dir("notify");
        let path = dir.join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        notify_to(&path.to_string_lossy(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        assert!(notify_to("@pinner-test-nobody-listens", "READY=1").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
