//! The socket intake: binding the socket, accepting connections, checking
//! each peer, reading one framed request and handing it to the control
//! loop. One short-lived thread per connection, so a slow client cannot
//! stall others.

use super::ratelimit::LogLimiter;
use super::Work;
use crate::config::SocketGroup;
use crate::host::procs::ProcFs;
use pinner_shared::log::{Level, Logger};
use pinner_shared::protocol::{Request, Response};
use pinner_shared::wire::{self, WireError};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Connections served at once; more get a "busy" answer and the close
/// (hooks count the event as dropped, the periodic reconcile covers it).
const MAX_CONNECTIONS: usize = 64;
/// Descriptors kept for everything but connections: libvirt, inotify,
/// logs, cgroup and /proc files, the metrics file.
const RESERVED_DESCRIPTORS: u64 = 32;
/// At least this many connections, however low the descriptor limit.
const MIN_CONNECTIONS: usize = 4;
/// A client must send its whole request within this; a drain after a
/// refusal shares the same deadline.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long group members are turned away after descriptors ran out.
const SCARCE_HOLD: Duration = Duration::from_secs(5);
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
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

/// Binds a socket: mode 0600 (root's and the hook's), or 0660 owned by
/// `group` (the `socket_group` members' own socket).
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
    pub limiter: Arc<LogLimiter>,
    pub allowed_gid: Option<u32>,
    /// Requests refused (read by status).
    pub refused: Arc<AtomicU64>,
    pub proc_root: PathBuf,
}

/// Who is on the other end, as far as capacity goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    /// Root or the daemon's own user: the hook and the operator's CLI.
    Privileged,
    /// A member of `socket_group`.
    Group,
}

/// Connections in service, by kind of peer, and how many of each fit.
pub struct Slots {
    all: AtomicUsize,
    group: AtomicUsize,
    max_all: usize,
    max_group: usize,
}

impl Slots {
    /// Caps that fit `file_limit` descriptors (RLIMIT_NOFILE), so
    /// connections alone never exhaust them; `socket_group` members get at
    /// most three quarters, so the hook and root's CLI always have room.
    pub fn for_file_limit(file_limit: u64) -> Slots {
        let room = usize::try_from(file_limit.saturating_sub(RESERVED_DESCRIPTORS))
            .unwrap_or(MAX_CONNECTIONS);
        let max_all = room.clamp(MIN_CONNECTIONS, MAX_CONNECTIONS);
        Slots {
            all: AtomicUsize::new(0),
            group: AtomicUsize::new(0),
            max_all,
            max_group: max_all * 3 / 4,
        }
    }

    /// Takes a slot for `peer`, if one is free for it.
    fn take(&self, peer: Peer) -> bool {
        if peer == Peer::Group && self.group.fetch_add(1, Ordering::SeqCst) >= self.max_group {
            self.group.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        if self.all.fetch_add(1, Ordering::SeqCst) >= self.max_all {
            self.release(peer);
            return false;
        }
        true
    }

    fn release(&self, peer: Peer) {
        self.all.fetch_sub(1, Ordering::SeqCst);
        if peer == Peer::Group {
            self.group.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Intake {
    /// Serves `listener` until it fails; `slots` are shared with the other
    /// socket's loop.
    pub fn accept_loop(self, listener: UnixListener, slots: Arc<Slots>) {
        let mut backoff = AcceptBackoff::default();
        let mut spare = spare_descriptor();
        // Until then, after running out of descriptors, only the hook and
        // root are served: group members' connections time out and give
        // their descriptors back, and new ones are answered busy.
        let mut scarce_until = Instant::now();
        for conn in listener.incoming() {
            match conn {
                Ok(stream) => {
                    backoff.recovered(&self.logger);
                    self.admit(stream, &slots, Instant::now() < scarce_until);
                }
                Err(e) if out_of_descriptors(&e) => {
                    scarce_until = Instant::now() + SCARCE_HOLD;
                    let Some(kept) = spare.take() else {
                        backoff.failed(&e, &self.logger, &self.limiter);
                        spare = spare_descriptor();
                        continue;
                    };
                    // The kept descriptor makes room for one accept, so the
                    // queue drains instead of the loop spinning or waiting.
                    drop(kept);
                    backoff.shedding(&e, &self.logger, &self.limiter);
                    if let Ok((stream, _)) = listener.accept() {
                        self.admit(stream, &slots, true);
                    }
                    spare = spare_descriptor();
                }
                Err(e) => backoff.failed(&e, &self.logger, &self.limiter),
            }
        }
    }

    /// Checks the peer and takes a slot for it, at once and without reading:
    /// a refused or surplus peer gets its error and the close; the others a
    /// thread that serves their one request.
    /// Short of descriptors (`scarce`), only privileged peers are served.
    fn admit(&self, stream: UnixStream, slots: &Arc<Slots>, scarce: bool) {
        let peer = match self.check_peer(&stream) {
            Ok(peer) => peer,
            Err(refusal) => {
                let reason = refusal.to_string();
                self.refuse(stream, "refused connection", &reason);
                return;
            }
        };
        if scarce && peer == Peer::Group {
            let busy = "busy (out of file descriptors), retry";
            self.refuse(stream, "out of file descriptors", busy);
            return;
        }
        if !slots.take(peer) {
            let busy = "busy (too many connections), retry";
            self.refuse(stream, "too many connections", busy);
            return;
        }
        let (intake, slots_held) = (self.clone(), slots.clone());
        let spawned = std::thread::Builder::new()
            .name("conn".into())
            .spawn(move || {
                if !intake.serve(stream, peer, Instant::now() + REQUEST_TIMEOUT) {
                    intake.refused.fetch_add(1, Ordering::Relaxed);
                }
                slots_held.release(peer);
            });
        if spawned.is_err() {
            slots.release(peer);
            self.refused.fetch_add(1, Ordering::Relaxed);
            self.limiter.log(
                &self.logger,
                Level::Warning,
                "connection thread",
                "cannot start a connection thread; connection closed",
            );
        }
    }

    /// Answers `reason` without waiting (the write never blocks: a peer
    /// that does not read loses the answer, not the daemon its thread),
    /// counts the refusal and closes.
    fn refuse(&self, stream: UnixStream, kind: &'static str, reason: &str) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        self.limiter.log(
            &self.logger,
            Level::Warning,
            kind,
            &format!("{kind}: {reason}"),
        );
        if stream.set_nonblocking(true).is_ok() {
            let mut stream = stream;
            let _ = wire::write_message(&mut stream, &Response::Error(reason.to_string()));
        }
    }

    /// Reads one request by `deadline`; an event is queued and
    /// acknowledged, a CLI request answered once the control loop has
    /// handled it. Returns false when the request was refused.
    fn serve(&self, stream: UnixStream, peer: Peer, deadline: Instant) -> bool {
        let mut reader = DeadlineReader {
            stream: &stream,
            deadline,
        };
        let request = match wire::read_message::<Request>(&mut reader) {
            Ok(r) => r,
            Err(e) => {
                let message = format!("bad request: {e}");
                let level = match e {
                    WireError::Truncated => Level::Debug,
                    _ => Level::Warning,
                };
                self.limiter
                    .log(&self.logger, level, "bad request", &message);
                answer(&stream, &Response::Error(message), deadline);
                drain(&mut reader);
                return false;
            }
        };
        let (reply_tx, reply_rx) = mpsc::channel();
        let work = match request {
            Request::Event(_) if peer == Peer::Group => {
                // Events come from the hook, which runs as root; a group
                // member may look (status) and ask (reconcile), not forge.
                let message = "permission denied: only root (libvirt's hook) may send events";
                self.limiter
                    .log(&self.logger, Level::Warning, "forged event", message);
                answer(&stream, &Response::Error(message.into()), deadline);
                return false;
            }
            Request::Event(event) => {
                let taken = self.work.send(Work::Event(event)).is_ok();
                let ack = if taken {
                    Response::Accepted
                } else {
                    Response::Error("daemon is stopping".into())
                };
                answer(&stream, &ack, deadline);
                return true;
            }
            Request::Release(_) if peer == Peer::Group => {
                // Releasing changes guests: root's alone.
                let message = "permission denied: only root may release guests";
                answer(&stream, &Response::Error(message.into()), deadline);
                return false;
            }
            Request::Status => Work::Status(reply_tx),
            Request::Reconcile => Work::Reconcile(reply_tx),
            Request::Release(request) => Work::Release(request, reply_tx),
        };
        if self.work.send(work).is_err() {
            return true;
        }
        let response = reply_rx
            .recv_timeout(REPLY_TIMEOUT)
            .unwrap_or_else(|_| Response::Error("daemon did not answer in time".into()));
        answer(&stream, &response, Instant::now() + REQUEST_TIMEOUT);
        true
    }

    /// Only root, the daemon's own user and members of `allowed_gid` may
    /// talk to the daemon, whatever the socket file's mode says.
    fn check_peer(&self, stream: &UnixStream) -> Result<Peer, PeerRefusal> {
        use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
        let creds = getsockopt(stream, PeerCredentials).map_err(PeerRefusal::NoCredentials)?;
        let own = nix::unistd::geteuid().as_raw();
        if creds.uid() == 0 || creds.uid() == own {
            return Ok(Peer::Privileged);
        }
        if let Some(gid) = self.allowed_gid {
            // SO_PEERCRED carries the primary group only; the supplementary
            // ones are read from the peer process (still connected, so
            // still there).
            if creds.gid() == gid
                || ProcFs::new(&self.proc_root)
                    .groups(creds.pid() as u32)
                    .contains(&gid)
            {
                return Ok(Peer::Group);
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

/// Writes `response` by `deadline` (at least a moment, for answers that
/// come after a long reconcile).
fn answer(stream: &UnixStream, response: &Response, deadline: Instant) {
    let left = deadline.saturating_duration_since(Instant::now());
    let _ = stream.set_write_timeout(Some(left.max(Duration::from_millis(100))));
    let _ = wire::write_message(&mut &*stream, response);
}

/// A stream whose reads share one deadline: a client that sends a byte now
/// and then still has its whole request cut off at the deadline.
struct DeadlineReader<'s> {
    stream: &'s UnixStream,
    deadline: Instant,
}

impl io::Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let timed_out = || {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("request not complete within {REQUEST_TIMEOUT:?}"),
            )
        };
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        self.stream.set_read_timeout(Some(left))?;
        // SO_RCVTIMEO running out shows as EAGAIN.
        match self.stream.read(buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(timed_out())
            }
            read => read,
        }
    }
}

/// `accept` failing (out of file descriptors, say): back off instead of
/// spinning, say so once with a count, and say when it works again.
struct AcceptBackoff {
    failures: u64,
    delay: Duration,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff {
            failures: 0,
            delay: ACCEPT_BACKOFF_MIN,
        }
    }
}

impl AcceptBackoff {
    fn failed(&mut self, error: &io::Error, logger: &Logger, limiter: &LogLimiter) {
        self.failures += 1;
        let message = format!(
            "cannot accept connections: {error} ({} failures so far); retrying in {:?}",
            self.failures, self.delay
        );
        limiter.log(logger, Level::Error, "accept", &message);
        std::thread::sleep(self.delay);
        self.delay = (self.delay * 2).min(ACCEPT_BACKOFF_MAX);
    }

    /// Out of descriptors but with one kept aside: no sleep, since each
    /// round answers one waiting connection.
    fn shedding(&mut self, error: &io::Error, logger: &Logger, limiter: &LogLimiter) {
        self.failures += 1;
        let message = format!(
            "cannot accept connections: {error} ({} times so far); answering busy to all but root",
            self.failures
        );
        limiter.log(logger, Level::Error, "accept", &message);
    }

    fn recovered(&mut self, logger: &Logger) {
        if self.failures > 0 {
            logger.info(
                &format!(
                    "accepting connections again after {} failures",
                    self.failures
                ),
                &[],
            );
            *self = AcceptBackoff::default();
        }
    }
}

/// EMFILE or ENFILE: this process's descriptors or the system's.
fn out_of_descriptors(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(nix::libc::EMFILE | nix::libc::ENFILE)
    )
}

/// A descriptor held in reserve, given up to accept (and answer) one
/// connection when all the others are in use.
fn spare_descriptor() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

/// Reads what the client still sends after its request was refused, so
/// the client can read the error (unread input at close would reset the
/// connection and discard the answer); bounded in bytes and by the
/// request's deadline.
fn drain(reader: &mut DeadlineReader) {
    let _ = reader.stream.shutdown(std::net::Shutdown::Write);
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < wire::MAX_FRAME {
        match io::Read::read(reader, &mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_caps_fit_the_descriptor_limit() {
        let caps = |limit| {
            let slots = Slots::for_file_limit(limit);
            (slots.max_all, slots.max_group)
        };
        assert_eq!(caps(524_288), (64, 48));
        assert_eq!(caps(1024), (64, 48));
        assert_eq!(caps(48), (16, 12));
        assert_eq!(caps(10), (4, 3));
    }

    #[test]
    fn group_peers_never_take_the_last_quarter() {
        let slots = Slots::for_file_limit(48);
        let group = (0..20).filter(|_| slots.take(Peer::Group)).count();
        assert_eq!(group, 12);
        let privileged = (0..20).filter(|_| slots.take(Peer::Privileged)).count();
        assert_eq!(privileged, 4);
        // A slot freed by root stays out of the group's reach.
        slots.release(Peer::Privileged);
        assert!(!slots.take(Peer::Group));
        assert!(slots.take(Peer::Privileged));
    }
}
