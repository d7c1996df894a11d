//! Non-blocking hand-over to the daemon. A blocking connect on a unix socket
//! waits while the listener's backlog is full and a blocking write waits while
//! its buffer is, so both are non-blocking here, bounded by a deadline.

use pinner_shared::protocol::Response;
use pinner_shared::wire;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Instant;

/// The daemon's answer to an event is a few bytes; anything longer is not
/// an answer.
const MAX_ANSWER: usize = 4096;

/// Why an event was not handed over; each is logged once by the caller.
#[derive(Debug)]
pub enum SendError {
    NotRunning(io::Error),
    Busy,
    DeadlineExceeded,
    /// Sent, but the daemon did not say it took the event in time.
    NotAcknowledged,
    /// The daemon answered with an error (busy, refused).
    Refused(String),
    Io(io::Error),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::NotRunning(e) => write!(f, "daemon not reachable ({e})"),
            SendError::Busy => write!(f, "daemon's socket backlog is full"),
            SendError::DeadlineExceeded => write!(f, "daemon did not take the event in time"),
            SendError::NotAcknowledged => write!(f, "daemon did not acknowledge the event in time"),
            SendError::Refused(m) => write!(f, "daemon refused the event: {m}"),
            SendError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Sends `frame` and waits for the daemon's acknowledgement, all by
/// `deadline`: an event counts as delivered only once the daemon said so.
pub fn deliver(path: &Path, frame: &[u8], deadline: Instant) -> Result<(), SendError> {
    let mut stream = connect_nonblocking(path)?;
    send_frame(&mut stream, frame, deadline)?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    match read_answer(&mut stream, deadline)? {
        Response::Accepted => Ok(()),
        Response::Error(message) => Err(SendError::Refused(message)),
        _ => Err(SendError::NotAcknowledged),
    }
}

/// The daemon's one answer frame, read without blocking past `deadline`.
fn read_answer(stream: &mut UnixStream, deadline: Instant) -> Result<Response, SendError> {
    let mut answer = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        if answer.len() >= 4 {
            let len = u32::from_be_bytes(answer[..4].try_into().expect("4 bytes")) as usize;
            if len > MAX_ANSWER {
                return Err(SendError::NotAcknowledged);
            }
            if answer.len() >= 4 + len {
                return wire::decode(&answer[4..4 + len]).map_err(|_| SendError::NotAcknowledged);
            }
        }
        match stream.read(&mut buf) {
            Ok(0) => return Err(SendError::NotAcknowledged),
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_for(stream, libc::POLLIN, deadline).map_err(|e| match e {
                    SendError::DeadlineExceeded => SendError::NotAcknowledged,
                    other => other,
                })?
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(SendError::Io(e)),
        }
    }
}

fn send_frame(stream: &mut UnixStream, frame: &[u8], deadline: Instant) -> Result<(), SendError> {
    let mut rest = frame;
    while !rest.is_empty() {
        match stream.write(rest) {
            Ok(0) => return Err(SendError::Io(io::ErrorKind::WriteZero.into())),
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_for(stream, libc::POLLOUT, deadline)?
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(SendError::Io(e)),
        }
    }
    Ok(())
}

fn connect_nonblocking(path: &Path) -> Result<UnixStream, SendError> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(SendError::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        )));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain syscall; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(SendError::Io(io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: addr is initialised and len is within its size.
    let rc = unsafe {
        libc::connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len as libc::socklen_t,
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        return Err(match err.raw_os_error() {
            Some(libc::EAGAIN) => SendError::Busy,
            Some(libc::ENOENT | libc::ECONNREFUSED | libc::ENOTSOCK | libc::EACCES) => {
                SendError::NotRunning(err)
            }
            _ => SendError::Io(err),
        });
    }
    Ok(UnixStream::from(fd))
}

/// Waits until `stream` is ready for `events` (POLLIN, POLLOUT).
fn wait_for(
    stream: &UnixStream,
    events: libc::c_short,
    deadline: Instant,
) -> Result<(), SendError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(SendError::DeadlineExceeded);
    }
    let mut pfd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(stream),
        events,
        revents: 0,
    };
    // Round up so a sub-millisecond remainder still waits.
    let timeout_ms = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
    // SAFETY: pfd is a valid pollfd for the duration of the call.
    match unsafe { libc::poll(&mut pfd, 1, timeout_ms) } {
        0 => Err(SendError::DeadlineExceeded),
        n if n > 0 => Ok(()),
        _ => {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(SendError::Io(err))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixListener;
    use std::time::Duration;

    fn temp_socket(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("pinner-hook-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("s.sock")
    }

    /// A daemon that reads the whole request and answers `answer`.
    fn fake_daemon(
        path: &std::path::Path,
        answer: Option<Response>,
    ) -> std::thread::JoinHandle<Vec<u8>> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            conn.read_to_end(&mut got).unwrap();
            if let Some(answer) = answer {
                wire::write_message(&mut conn, &answer).unwrap();
            }
            got
        })
    }

    #[test]
    fn delivered_once_the_daemon_acknowledges() {
        let path = temp_socket("ok");
        let daemon = fake_daemon(&path, Some(Response::Accepted));
        deliver(&path, b"hello", Instant::now() + Duration::from_secs(5)).unwrap();
        assert_eq!(daemon.join().unwrap(), b"hello");
    }

    #[test]
    fn an_event_without_acknowledgement_is_not_delivered() {
        let path = temp_socket("silent");
        let daemon = fake_daemon(&path, None);
        let err = deliver(&path, b"x", Instant::now() + Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, SendError::NotAcknowledged), "{err:?}");
        daemon.join().unwrap();
        let path = temp_socket("busy");
        let busy = Response::Error("busy (too many connections), retry".into());
        let daemon = fake_daemon(&path, Some(busy));
        let err = deliver(&path, b"x", Instant::now() + Duration::from_secs(5)).unwrap_err();
        assert!(err.to_string().contains("refused the event: busy"), "{err}");
        daemon.join().unwrap();
    }

    #[test]
    fn a_daemon_that_never_answers_costs_the_deadline_only() {
        let path = temp_socket("mute");
        let _listener = UnixListener::bind(&path).unwrap();
        let err = deliver(&path, b"x", Instant::now() + Duration::from_millis(20)).unwrap_err();
        assert!(matches!(err, SendError::NotAcknowledged), "{err:?}");
    }

    #[test]
    fn missing_socket_is_not_running() {
        let path = temp_socket("missing");
        let err = deliver(&path, b"x", Instant::now() + Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, SendError::NotRunning(_)), "{err:?}");
    }

    #[test]
    fn regular_file_at_socket_path_is_not_running() {
        let path = temp_socket("file");
        std::fs::write(&path, b"not a socket").unwrap();
        let err = deliver(&path, b"x", Instant::now() + Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, SendError::NotRunning(_)), "{err:?}");
    }

    #[test]
    fn reader_that_never_reads_hits_the_deadline() {
        let path = temp_socket("stall");
        let _listener = UnixListener::bind(&path).unwrap();
        // Larger than any socket buffer, so the write must wait for a reader.
        let frame = vec![0u8; 8 << 20];
        let deadline = Instant::now() + Duration::from_millis(20);
        let err = deliver(&path, &frame, deadline).unwrap_err();
        assert!(matches!(err, SendError::DeadlineExceeded), "{err:?}");
    }
}
