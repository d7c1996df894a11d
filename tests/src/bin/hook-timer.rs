//! Runs a hook and logs how long it took, apart from waiting for a CPU:
//!
//!     hook-timer LOG HOOK ARGS...   (stdin, stdout and exit status pass through)
//!
//! appends "OP WALL_NS HOOK_QUEUE_NS OWN_QUEUE_NS" to LOG, OP being the
//! hook's second argument. The queue figures are run-queue waits from
//! schedstat: the hook's (read from its zombie before it is reaped) and this
//! timer's own across the run (its wake-up once the hook has exited). On a
//! 2-CPU test machine starting 30 guests at once, a new process can wait
//! 100+ ms for a CPU whatever it runs; `WALL - both waits` is the time the
//! hook itself spent running or blocked, which is what its budget is about.

use std::fs::OpenOptions;
use std::io::Write;
use std::process::Command;
use std::time::Instant;

/// The run-queue wait (ns) in a schedstat file: "ON_CPU_NS WAIT_NS SLICES".
fn queue_wait(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [log, hook, hook_args @ ..] = args.as_slice() else {
        eprintln!("usage: hook-timer LOG HOOK ARGS...");
        std::process::exit(2);
    };
    let own_before = queue_wait("/proc/thread-self/schedstat");
    let start = Instant::now();
    let mut child = match Command::new(hook).args(hook_args).spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("hook-timer: {hook}: {e}");
            std::process::exit(1);
        }
    };
    // Wait for the exit but leave the zombie, whose schedstat still holds
    // its totals; reaping it comes after.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let waited = unsafe {
        libc::waitid(
            libc::P_PID,
            child.id(),
            &mut info,
            libc::WEXITED | libc::WNOWAIT,
        )
    };
    let hook_queue = if waited == 0 {
        queue_wait(&format!("/proc/{}/schedstat", child.id()))
    } else {
        0
    };
    let status = child.wait().expect("reap the hook");
    let wall = start.elapsed().as_nanos();
    let own_queue = queue_wait("/proc/thread-self/schedstat").saturating_sub(own_before);
    let op = hook_args.get(1).map_or("-", String::as_str);
    if let Ok(mut file) = OpenOptions::new().create(true).append(true).open(log) {
        let _ = file.write_all(format!("{op} {wall} {hook_queue} {own_queue}\n").as_bytes());
    }
    std::process::exit(status.code().unwrap_or(1));
}
