//! Non-blocking hand-over to the daemon. A blocking connect on a unix socket
//! waits while the listener's backlog is full and a blocking write waits while
//! its buffer is, so both are non-blocking here, bounded by a deadline.

use std::io::{self, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Instant;

/// Why an event was not handed over; each is logged once by the caller.
#[derive(Debug)]
pub enum SendError {
    NotRunning(io::Error),
    Busy,
    DeadlineExceeded,
    Io(io::Error),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::NotRunning(e) => write!(f, "daemon not reachable ({e})"),
            SendError::Busy => write!(f, "daemon's socket backlog is full"),
            SendError::DeadlineExceeded => write!(f, "daemon did not take the event in time"),
            SendError::Io(e) => write!(f, "{e}"),
        }
    }
}

pub fn send_frame(path: &Path, frame: &[u8], deadline: Instant) -> Result<(), SendError> {
    let mut stream = connect_nonblocking(path)?;
    let mut rest = frame;
    while !rest.is_empty() {
        match stream.write(rest) {
            Ok(0) => return Err(SendError::Io(io::ErrorKind::WriteZero.into())),
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_writable(&stream, deadline)?,
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

fn wait_writable(stream: &UnixStream, deadline: Instant) -> Result<(), SendError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(SendError::DeadlineExceeded);
    }
    let mut pfd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(stream),
        events: libc::POLLOUT,
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

    #[test]
    fn delivers_frame_to_listener() {
        let path = temp_socket("ok");
        let listener = UnixListener::bind(&path).unwrap();
        send_frame(&path, b"hello", Instant::now() + Duration::from_millis(100)).unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        conn.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"hello");
    }

    #[test]
    fn missing_socket_is_not_running() {
        let path = temp_socket("missing");
        let err = send_frame(&path, b"x", Instant::now() + Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, SendError::NotRunning(_)), "{err:?}");
    }

    #[test]
    fn regular_file_at_socket_path_is_not_running() {
        let path = temp_socket("file");
        std::fs::write(&path, b"not a socket").unwrap();
        let err = send_frame(&path, b"x", Instant::now() + Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, SendError::NotRunning(_)), "{err:?}");
    }

    #[test]
    fn reader_that_never_reads_hits_the_deadline() {
        let path = temp_socket("stall");
        let _listener = UnixListener::bind(&path).unwrap();
        // Larger than any socket buffer, so the write must wait for a reader.
        let frame = vec![0u8; 8 << 20];
        let deadline = Instant::now() + Duration::from_millis(20);
        let err = send_frame(&path, &frame, deadline).unwrap_err();
        assert!(matches!(err, SendError::DeadlineExceeded), "{err:?}");
    }
}
