//! `pinner-hook`: libvirt's qemu hook. libvirt runs it holding the domain's
//! job lock, so it never calls libvirt: it reads the event, hands it to the
//! daemon over the unix socket within a hard deadline, and exits 0 whatever
//! the daemon's state (a non-zero exit would abort the guest's start).

mod domain_xml;
mod rewrite;
mod send;
mod stdin;

use pinner_shared::log::{Level, Logger};
use pinner_shared::paths::{DEFAULT_SOCKET, HOOK_DROPS_FILE};
use pinner_shared::protocol::{HookEvent, HookOp, Request};
use pinner_shared::wire;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Budget for handing the event over; the whole run must stay under 50 ms.
const SEND_BUDGET: Duration = Duration::from_millis(30);
/// How long stdin may keep the hook waiting for more XML (libvirt writes
/// it whole and closes the pipe at once). An event without its XML still
/// names the domain; the XML of `migrate`/`restore` is echoed back as the
/// guest's definition, so it gets longer than any real write pause.
const STDIN_BUDGET: Duration = Duration::from_millis(15);
const ECHO_STDIN_BUDGET: Duration = Duration::from_secs(2);

const USAGE: &str = "usage: pinner-hook DOMAIN OPERATION SUB-OPERATION EXTRA < domain.xml

libvirt runs this as its qemu hook (/etc/libvirt/hooks/qemu.d/50-pinner).
It forwards the event to the pinner daemon and never blocks libvirt.";

/// Appends one byte to the drop counter beside `socket`, if its directory
/// exists (the daemon or the package made it); never follows a link, never
/// waits on a FIFO planted there.
fn count_drop(socket: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let Some(dir) = socket.parent().filter(|d| d.is_dir()) else {
        return;
    };
    let _ = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(dir.join(HOOK_DROPS_FILE))
        .and_then(|mut f| f.write_all(b"."));
}

fn main() -> ExitCode {
    let started = Instant::now();
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if args.len() < 2 {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    }
    // Opened only when there is something to log: most runs log nothing.
    let logger = || Logger::new("pinner-hook", Level::Info);
    let (arg_name, op_word) = (&args[0], &args[1]);
    let sub_op = args.get(2).cloned().unwrap_or_default();

    let op = HookOp::parse(op_word);
    // Always drain stdin: libvirt writes the whole XML before waiting on us.
    // Bounded, so no stdin can hold the hook.
    let budget = match op {
        Some(op) if op.echoes_xml() => ECHO_STDIN_BUDGET,
        _ => STDIN_BUDGET,
    };
    let input = stdin::read_bounded(std::io::stdin().as_fd(), started + budget);
    if input.truncated {
        logger().warn(
            &format!(
                "stdin cut off after {} bytes (over {} or still open after {budget:?})",
                input.xml.len(),
                stdin::MAX_XML
            ),
            &[("OP", op_word)],
        );
    }
    let xml = input.xml;

    let Some(op) = op else {
        // A newer libvirt may send ops we do not know; they are not ours to fail.
        logger().debug("ignoring unknown hook operation", &[("OP", op_word)]);
        return ExitCode::SUCCESS;
    };
    if op.echoes_xml() {
        // libvirt uses our stdout as the XML to start from: the same, but
        // without the placement pinner chose for another host or time.
        let mut out = std::io::stdout().lock();
        let _ = out
            .write_all(&rewrite::strip_placement(&xml))
            .and_then(|_| out.flush());
    }

    let facts = domain_xml::read(&xml);
    let event = HookEvent {
        op,
        sub_op,
        name: facts.name.unwrap_or_else(|| arg_name.clone()),
        uuid: facts.uuid.unwrap_or_default(),
        vcpus: facts.vcpus.unwrap_or(0),
        sent_at_unix_ns: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    };
    let deadline = Instant::now() + SEND_BUDGET;
    let outcome = wire::encode(&Request::Event(event.clone()))
        .map_err(|e| e.to_string())
        .and_then(|frame| {
            send::deliver(Path::new(DEFAULT_SOCKET), &frame, deadline).map_err(|e| e.to_string())
        });
    if let Err(reason) = outcome {
        // Not lost: the daemon reconciles the whole host at start and on a timer.
        logger().warn(
            &format!("event not delivered to pinner daemon: {reason}"),
            &[("DOMAIN", &event.name), ("OP", op.as_str())],
        );
        count_drop(Path::new(DEFAULT_SOCKET));
    }
    ExitCode::SUCCESS
}
