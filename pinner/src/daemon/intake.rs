//! The socket intake: binding the socket, accepting connections, checking
//! each peer, reading one framed request and handing it to the control
//! loop. One short-lived thread per connection, so a slow client cannot
//! stall others.

use super::Work;
use crate::config::SocketGroup;
use crate::host::procs::ProcFs;
use pinner_shared::log::Logger;
use pinner_shared::protocol::{Request, Response};
use pinner_shared::wire::{self, WireError};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::Duration;

/// Connections served at once; more are closed at once (hooks retry nothing,
/// the periodic reconcile covers them).
const MAX_CONNECTIONS: usize = 64;
/// A client must send its whole request within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// A CLI request waits this long for the reconcile loop.
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("cannot create {}: {source}", path.display())]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("another pinner daemon is listening on {}", .0.display())]
    AlreadyRunning(PathBuf),
    #[error("{}: {source}", path.display())]
    Inspect { path: PathBuf, source: io::Error },
    #[error("{} exists and is not a socket; refusing to replace it", .0.display())]
    NotASocket(PathBuf),
    #[error("cannot remove stale {}: {source}", path.display())]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("cannot listen on {}: {source}", path.display())]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot give {} to group {group}: {source}", path.display())]
    Chown {
        path: PathBuf,
        group: String,
        source: io::Error,
    },
    #[error("cannot restrict {}: {source}", path.display())]
    Chmod { path: PathBuf, source: io::Error },
}

/// Why a peer may not use the socket.
#[derive(Debug, thiserror::Error)]
pub enum PeerRefusal {
    #[error("cannot read peer credentials: {0}")]
    NoCredentials(nix::Error),
    #[error("permission denied for uid {uid} (pid {pid}): only {who} may use the pinner socket")]
    NotAllowed {
        uid: u32,
        pid: i32,
        who: &'static str,
    },
}

/// Binds the socket: mode 0600, or 0660 owned by `group` when one is set.
pub fn bind_socket(path: &Path, group: Option<&SocketGroup>) -> Result<UnixListener, IntakeError> {
    let at = || path.to_path_buf();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| IntakeError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(IntakeError::AlreadyRunning(at()));
        }
        // A stale socket from a daemon that died; anything else is not ours.
        let meta = std::fs::symlink_metadata(path)
            .map_err(|source| IntakeError::Inspect { path: at(), source })?;
        if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
            return Err(IntakeError::NotASocket(at()));
        }
        std::fs::remove_file(path)
            .map_err(|source| IntakeError::RemoveStale { path: at(), source })?;
    }
    let listener =
        UnixListener::bind(path).map_err(|source| IntakeError::Bind { path: at(), source })?;
    let mode = match group {
        Some(group) => {
            std::os::unix::fs::chown(path, None, Some(group.gid)).map_err(|source| {
                IntakeError::Chown {
                    path: at(),
                    group: group.name.clone(),
                    source,
                }
            })?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|source| IntakeError::Chmod { path: at(), source })?;
    Ok(listener)
}

/// What every connection thread shares.
#[derive(Clone)]
pub struct Intake {
    pub work: Sender<Work>,
    pub logger: Arc<Logger>,
    pub allowed_gid: Option<u32>,
    /// Requests refused (read by status).
    pub refused: Arc<AtomicU64>,
    pub proc_root: PathBuf,
}

impl Intake {
    pub fn accept_loop(self, listener: UnixListener) {
        let active = Arc::new(AtomicUsize::new(0));
        for conn in listener.incoming() {
            let Ok(stream) = conn else { continue };
            if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                active.fetch_sub(1, Ordering::SeqCst);
                self.refused.fetch_add(1, Ordering::Relaxed);
                self.logger.warn("too many connections; closing one", &[]);
                continue;
            }
            let (intake, conn_active) = (self.clone(), active.clone());
            let spawned = std::thread::Builder::new()
                .name("conn".into())
                .spawn(move || {
                    if !intake.serve(stream) {
                        intake.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    conn_active.fetch_sub(1, Ordering::SeqCst);
                });
            if spawned.is_err() {
                active.fetch_sub(1, Ordering::SeqCst);
                self.logger.warn("cannot start a connection thread", &[]);
            }
        }
    }

    /// Reads one request; events are queued without an answer, CLI requests
    /// are answered once the control loop has handled them. Returns false
    /// when the request was refused.
    fn serve(&self, mut stream: UnixStream) -> bool {
        if let Err(reason) = self.check_peer(&stream) {
            let reason = reason.to_string();
            self.logger
                .warn(&format!("refused connection: {reason}"), &[]);
            let _ = wire::write_message(&mut stream, &Response::Error(reason));
            close_after_error(stream);
            return false;
        }
        let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
        let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
        let request = match wire::read_message::<Request>(&mut stream) {
            Ok(r) => r,
            Err(e) => {
                let message = format!("bad request: {e}");
                if matches!(e, WireError::Truncated) {
                    self.logger.debug(&message, &[]);
                } else {
                    self.logger.warn(&message, &[]);
                }
                let _ = wire::write_message(&mut stream, &Response::Error(message));
                close_after_error(stream);
                return false;
            }
        };
        let (reply_tx, reply_rx) = mpsc::channel();
        let work = match request {
            Request::Event(event) => {
                let _ = self.work.send(Work::Event(event));
                return true;
            }
            Request::Status => Work::Status(reply_tx),
            Request::Reconcile => Work::Reconcile(reply_tx),
        };
        if self.work.send(work).is_err() {
            return true;
        }
        let response = reply_rx
            .recv_timeout(REPLY_TIMEOUT)
            .unwrap_or_else(|_| Response::Error("daemon did not answer in time".into()));
        let _ = stream.set_write_timeout(Some(REPLY_TIMEOUT));
        let _ = wire::write_message(&mut stream, &response);
        true
    }

    /// Only root, the daemon's own user and members of `allowed_gid` may
    /// talk to the daemon, whatever the socket file's mode says.
    fn check_peer(&self, stream: &UnixStream) -> Result<(), PeerRefusal> {
        use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
        let creds = getsockopt(stream, PeerCredentials).map_err(PeerRefusal::NoCredentials)?;
        let own = nix::unistd::geteuid().as_raw();
        if creds.uid() == 0 || creds.uid() == own {
            return Ok(());
        }
        if let Some(gid) = self.allowed_gid {
            // SO_PEERCRED carries the primary group only; the supplementary
            // ones are read from the peer process (still connected, so
            // still there).
            let groups = ProcFs::new(&self.proc_root).groups(creds.pid() as u32);
            if creds.gid() == gid || groups.contains(&gid) {
                return Ok(());
            }
        }
        Err(PeerRefusal::NotAllowed {
            uid: creds.uid(),
            pid: creds.pid(),
            who: if self.allowed_gid.is_some() {
                "root and the socket_group"
            } else {
                "root"
            },
        })
    }
}

/// Closes a connection whose request was refused so that the client can
/// read the error: unread input at close would reset the connection and
/// discard the answer. What is drained is bounded in bytes and time.
fn close_after_error(mut stream: UnixStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < wire::MAX_FRAME {
        match io::Read::read(&mut stream, &mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}
