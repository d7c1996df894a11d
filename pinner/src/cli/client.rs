//! The CLI's side of the socket: one request, one answer.

use pinner_shared::protocol::{Request, Response};
use pinner_shared::wire::{self, WireError};
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("pinner daemon is not running (no socket at {})", .0.display())]
    NotRunning(PathBuf),
    #[error("pinner daemon is not running (stale socket at {})", .0.display())]
    StaleSocket(PathBuf),
    #[error("permission denied on {}: run as root or as a member of the daemon's socket_group", .0.display())]
    PermissionDenied(PathBuf),
    #[error("cannot connect to {}: {source}", path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("sending to the daemon: {0}")]
    Send(WireError),
    #[error("reading the daemon's answer: {0}")]
    Receive(WireError),
}

/// Sends `request` to the daemon at `socket` and waits up to `timeout` for
/// its answer.
pub fn request(
    socket: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<Response, ClientError> {
    let path = socket.to_path_buf();
    let mut stream = UnixStream::connect(socket).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => ClientError::NotRunning(path.clone()),
        io::ErrorKind::ConnectionRefused => ClientError::StaleSocket(path.clone()),
        io::ErrorKind::PermissionDenied => ClientError::PermissionDenied(path.clone()),
        _ => ClientError::Connect {
            path: path.clone(),
            source,
        },
    })?;
    let _ = stream.set_read_timeout(Some(timeout));
    if let Err(e) = wire::write_message(&mut stream, request) {
        // A daemon that refused at once (busy, not allowed) answered and
        // closed before reading: its answer says more than the broken pipe.
        return wire::read_message(&mut stream).map_err(|_| ClientError::Send(e));
    }
    wire::read_message(&mut stream).map_err(ClientError::Receive)
}
