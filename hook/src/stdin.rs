//! Reading the domain XML libvirt writes on stdin, bounded in size and
//! time: libvirt writes it whole and closes the pipe at once, but the hook
//! must come back within milliseconds whatever its stdin does (an endless
//! or never-closing stream included).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Instant;

/// The most XML the hook keeps (and echoes on `migrate`/`restore`): a
/// domain with hundreds of disks and NICs is a few hundred KiB. Beyond it
/// the rest is drained (until the deadline) and not kept.
pub const MAX_XML: usize = 16 << 20;

/// What was read, and whether stdin was cut off (too large, or still open
/// at the deadline).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Input {
    pub xml: Vec<u8>,
    pub truncated: bool,
}

/// Reads `fd` until end of file, or until it has nothing more to give by
/// `deadline`. Data already waiting is read even past the deadline (a hook
/// descheduled mid-read must not cut a domain's XML short), up to `MAX_XML`
/// bytes; beyond that the rest is drained, not kept, until the deadline.
pub fn read_bounded(fd: BorrowedFd, deadline: Instant) -> Input {
    let mut input = Input::default();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let full = input.xml.len() >= MAX_XML;
        // poll with 0 still reports data that is already there.
        let wait_ms = left.as_millis().min(i32::MAX as u128) as libc::c_int;
        if (full && left.is_zero()) || !readable(fd, wait_ms) {
            input.truncated = true;
            return input;
        }
        // SAFETY: buf is a live buffer of the length passed.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            0 => return input,
            n if n > 0 => {
                let room = MAX_XML - input.xml.len();
                let take = (n as usize).min(room);
                input.xml.extend_from_slice(&buf[..take]);
                input.truncated |= take < n as usize;
            }
            _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            // EAGAIN on a non-blocking stdin: poll again.
            _ if io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock => {}
            _ => return input,
        }
    }
}

/// Whether `fd` has data (or end of file) within `timeout_ms`.
fn readable(fd: BorrowedFd, timeout_ms: libc::c_int) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: pfd is a valid pollfd for the duration of the call.
        match unsafe { libc::poll(&mut pfd, 1, timeout_ms) } {
            n if n > 0 => return true,
            0 => return false,
            _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    #[test]
    fn reads_to_the_end_of_a_closed_stream() {
        let (mut w, r) = UnixStream::pair().unwrap();
        w.write_all(b"<domain/>").unwrap();
        drop(w);
        let input = read_bounded(r.as_fd(), Instant::now() + Duration::from_secs(5));
        assert_eq!(
            input,
            Input {
                xml: b"<domain/>".to_vec(),
                truncated: false
            }
        );
    }

    #[test]
    fn a_stream_left_open_is_cut_at_the_deadline() {
        let (mut w, r) = UnixStream::pair().unwrap();
        w.write_all(b"<domain>").unwrap();
        let input = read_bounded(r.as_fd(), Instant::now() + Duration::from_millis(50));
        assert_eq!(input.xml, b"<domain>");
        assert!(input.truncated);
        drop(w);
    }

    #[test]
    fn an_endless_stream_keeps_at_most_the_cap() {
        let (mut w, r) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            let chunk = vec![b'y'; 1 << 16];
            while w.write_all(&chunk).is_ok() {}
        });
        let input = read_bounded(r.as_fd(), Instant::now() + Duration::from_millis(500));
        assert!(input.truncated);
        assert!(input.xml.len() <= MAX_XML);
        drop(r);
        writer.join().unwrap();
    }
}
