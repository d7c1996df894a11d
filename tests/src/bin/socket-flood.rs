//! A hostile local user against the daemon's socket, for the end-to-end
//! tests:
//!
//! - `socket-flood silent SOCKET CLIENTS SECONDS`: CLIENTS connections that
//!   say nothing, each reopened as soon as the daemon closes it;
//! - `socket-flood drip SOCKET CLIENTS SECONDS`: CLIENTS connections that
//!   announce a 64 KiB frame and send one byte of it every 500 ms, reopened
//!   when closed;
//! - `socket-flood hooks HOOK COUNT`: runs the real hook COUNT times, 32 at
//!   a time, each with a forged `started` event for domain `forged-N`;
//! - `socket-flood event SOCKET`: sends one forged `started` event itself
//!   and prints the daemon's answer.
//!
//! Prints one JSON line: for the floods, connections made, answers saying
//! busy, closes without an answer, other answers, failed connects and the
//! longest a connection stayed open; for the hooks, runs and failed runs.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Default)]
struct Tally {
    connects: AtomicU64,
    busy: AtomicU64,
    closed_silently: AtomicU64,
    other_answers: AtomicU64,
    connect_failures: AtomicU64,
    longest_open_ms: AtomicU64,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Silent,
    Drip,
}

const USAGE: &str =
    "usage: socket-flood silent|drip SOCKET CLIENTS SECONDS | hooks HOOK COUNT | event SOCKET";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["silent", socket, clients, seconds] => flood(Mode::Silent, socket, clients, seconds),
        ["drip", socket, clients, seconds] => flood(Mode::Drip, socket, clients, seconds),
        ["hooks", hook, count] => hooks(Path::new(hook), count.parse().expect("COUNT")),
        ["event", socket] => forged_event(Path::new(socket)),
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    }
}

fn flood(mode: Mode, socket: &str, clients: &str, seconds: &str) {
    let clients: usize = clients.parse().expect("CLIENTS is a number");
    let until = Instant::now() + Duration::from_secs(seconds.parse().expect("SECONDS"));
    raise_file_limit();
    let tally = Arc::new(Tally::default());
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (socket, tally) = (PathBuf::from(socket), tally.clone());
            std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || client(&socket, mode, until, &tally))
                .expect("spawn a client thread")
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    println!(
        "{{\"connects\":{},\"busy\":{},\"closed_silently\":{},\"other_answers\":{},\"connect_failures\":{},\"longest_open_ms\":{}}}",
        get(&tally.connects),
        get(&tally.busy),
        get(&tally.closed_silently),
        get(&tally.other_answers),
        get(&tally.connect_failures),
        get(&tally.longest_open_ms)
    );
}

/// One forged event, sent as the hook would; prints the answer as JSON.
fn forged_event(socket: &Path) {
    use pinner_shared::protocol::{HookEvent, HookOp, Request, Response};
    let event = HookEvent {
        op: HookOp::Started,
        sub_op: "begin".into(),
        name: "forged".into(),
        uuid: String::new(),
        vcpus: 1,
        sent_at_unix_ns: 0,
    };
    let mut stream = UnixStream::connect(socket).expect("connect");
    pinner_shared::wire::write_message(&mut stream, &Request::Event(event)).expect("send");
    let answer: Response = pinner_shared::wire::read_message(&mut stream).expect("an answer");
    println!("{}", serde_json::to_string(&answer).expect("JSON"));
}

/// Runs the hook `count` times from 32 threads, as libvirt would for as
/// many domain events at once.
fn hooks(hook: &Path, count: u64) {
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..32)
        .map(|_| {
            let (hook, next, failed) = (hook.to_path_buf(), next.clone(), failed.clone());
            std::thread::spawn(move || loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= count {
                    break;
                }
                let ok = std::process::Command::new(&hook)
                    .args([&format!("forged-{n}"), "started", "begin", "-"])
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
    println!(
        "{{\"runs\":{count},\"failed\":{}}}",
        failed.load(Ordering::Relaxed)
    );
}

/// One client, reconnecting until `until`.
fn client(socket: &Path, mode: Mode, until: Instant, tally: &Tally) {
    while Instant::now() < until {
        let Ok(mut stream) = UnixStream::connect(socket) else {
            tally.connect_failures.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        tally.connects.fetch_add(1, Ordering::Relaxed);
        let opened = Instant::now();
        let mut answer = Vec::new();
        if mode == Mode::Drip && stream.write_all(&65536u32.to_be_bytes()).is_ok() {
            while Instant::now() < until && stream.write_all(&[1]).is_ok() {
                if answered(&mut stream, Duration::from_millis(500), &mut answer) {
                    break;
                }
            }
        }
        let left = until.saturating_duration_since(Instant::now());
        let _ = stream.set_read_timeout(Some(left.max(Duration::from_millis(1))));
        let _ = stream.read_to_end(&mut answer);
        let open_ms = opened.elapsed().as_millis() as u64;
        tally.longest_open_ms.fetch_max(open_ms, Ordering::Relaxed);
        let counter = match String::from_utf8_lossy(&answer) {
            text if text.contains("busy") => &tally.busy,
            _ if answer.is_empty() => &tally.closed_silently,
            _ => &tally.other_answers,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Waits up to `wait` for the daemon to answer or close; what it says is
/// kept in `answer`.
fn answered(stream: &mut UnixStream, wait: Duration, answer: &mut Vec<u8>) -> bool {
    let _ = stream.set_read_timeout(Some(wait));
    let mut buf = [0u8; 512];
    match stream.read(&mut buf) {
        Ok(n) => {
            answer.extend_from_slice(&buf[..n]);
            true
        }
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// Every client is a descriptor.
fn raise_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write and read the one struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
