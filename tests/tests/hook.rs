//! The real `pinner-hook` binary against the hook contract: what libvirt
//! sees (exit status, stdout) and what the daemon receives.

use pinner_e2e::{bin_dir, missing_requirement, wait_for, with_private_run, PrivateRun};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const XML: &str = "<domain type='qemu'>\n  <name>web-1</name>\n  <uuid>c7a5fdbd-edaf-9455-926a-d65c16db1809</uuid>\n  <vcpu placement='static' current='2'>4</vcpu>\n  <cputune><vcpupin vcpu='0' cpuset='3'/></cputune>\n</domain>\n";

fn hook() -> PathBuf {
    bin_dir().join("pinner-hook")
}

/// Runs the hook as libvirt does: args, XML on stdin, in a private /run.
fn run_hook(run: &PrivateRun, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = with_private_run(run.path(), &hook())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hook");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn skip(test: &str) -> bool {
    match missing_requirement() {
        Some(reason) if std::env::var_os("CI").is_some() => panic!("{test}: {reason}"),
        Some(reason) => {
            eprintln!("SKIPPED {test}: {reason}");
            true
        }
        None => false,
    }
}

/// Reads the one frame a hook run sent: [u32 BE length][version][postcard].
fn received_frame(listener: &UnixListener) -> Vec<u8> {
    let (mut conn, _) = listener.accept().unwrap();
    let mut bytes = Vec::new();
    conn.read_to_end(&mut bytes).unwrap();
    bytes
}

#[test]
fn by_hand_without_arguments_is_a_usage_error() {
    let out = Command::new(hook()).stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage: pinner-hook DOMAIN OPERATION"));
}

#[test]
fn event_reaches_the_daemon_socket() {
    if skip("event_reaches_the_daemon_socket") {
        return;
    }
    let run = PrivateRun::new("hook-deliver");
    let listener = UnixListener::bind(run.socket()).unwrap();
    let out = run_hook(&run, &["web-1", "started", "begin", "-"], XML.as_bytes());
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty(), "started must print nothing");
    let frame = received_frame(&listener);
    let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
    assert_eq!(len, frame.len() - 4, "one whole frame");
    assert_eq!(frame[4], 1, "protocol version");
    let body = String::from_utf8_lossy(&frame[5..]);
    for needle in ["web-1", "c7a5fdbd-edaf-9455-926a-d65c16db1809", "begin"] {
        assert!(body.contains(needle), "{needle} missing from {body:?}");
    }
    // postcard: Request::Event = variant 0, HookOp::Started = variant 2.
    assert_eq!(&frame[5..7], &[0, 2]);
}

#[test]
fn daemon_absent_exits_zero_and_logs_the_drop() {
    if skip("daemon_absent_exits_zero_and_logs_the_drop") {
        return;
    }
    let run = PrivateRun::new("hook-absent");
    let out = run_hook(&run, &["web-1", "prepare", "begin", "-"], XML.as_bytes());
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("event not delivered to pinner daemon"),
        "{stderr}"
    );
    assert!(
        stderr.contains("DOMAIN=\"web-1\"") && stderr.contains("OP=\"prepare\""),
        "{stderr}"
    );

    // A regular file where the socket should be: same outcome.
    std::fs::write(run.socket(), b"junk").unwrap();
    let out = run_hook(&run, &["web-1", "stopped", "end", "-"], XML.as_bytes());
    assert_eq!(out.status.code(), Some(0));
    // Each drop is counted, one byte each, beside the socket.
    let drops = run.socket().with_file_name("hook-dropped");
    assert_eq!(std::fs::metadata(&drops).unwrap().len(), 2);

    // A link planted as the counter is not followed: its target stays as
    // it was. A FIFO there is not waited on.
    let victim = run.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    std::fs::remove_file(&drops).unwrap();
    std::os::unix::fs::symlink(&victim, &drops).unwrap();
    let out = run_hook(&run, &["web-1", "stopped", "end", "-"], XML.as_bytes());
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    std::fs::remove_file(&drops).unwrap();
    assert!(Command::new("mkfifo")
        .arg(&drops)
        .status()
        .unwrap()
        .success());
    let mut child = with_private_run(run.path(), &hook())
        .args(["web-1", "stopped", "end", "-"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ended = wait_for(Duration::from_secs(5), || match child.try_wait() {
        Ok(Some(status)) => Ok(status),
        _ => Err("still running".to_string()),
    });
    let _ = child.kill();
    assert!(
        ended.is_ok_and(|s| s.success()),
        "the hook waited on a FIFO counter"
    );
    std::fs::remove_file(&drops).unwrap();

    // A socket the hook may not open (a hook run unprivileged): same.
    std::fs::remove_file(run.socket()).unwrap();
    let _listener = UnixListener::bind(run.socket()).unwrap();
    std::fs::set_permissions(run.socket(), std::fs::Permissions::from_mode(0o600)).unwrap();
    let hook_copy = run.path().join("pinner-hook-copy");
    std::fs::copy(hook(), &hook_copy).unwrap();
    std::fs::set_permissions(&hook_copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = with_private_run(run.path(), std::path::Path::new("/usr/bin/setpriv"))
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&hook_copy)
        .args(["web-1", "started", "begin", "-"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("event not delivered") && stderr.contains("ermission denied"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "logged once: {stderr}");
}

/// libvirt reads the hook's stdout on migrate and restore as the XML to
/// start from: unchanged for guests pinner does not manage (their pins are
/// someone else's), without pinner's pins and numatune for those it does.
#[test]
fn migrate_and_restore_echo_the_xml_without_pinners_placement() {
    if skip("migrate_and_restore_echo_the_xml_without_pinners_placement") {
        return;
    }
    let run = PrivateRun::new("hook-echo");
    let listener = UnixListener::bind(run.socket()).unwrap();
    let managed = XML.replace(
        "  <cputune>",
        "  <metadata><pinner:state xmlns:pinner=\"urn:pinner:1\" policy=\"auto\" mode=\"shared\"/></metadata>\n  <numatune>\n    <memory mode='strict' nodeset='0'/>\n  </numatune>\n  <cputune>",
    );
    let stripped = managed
        .replace("<vcpupin vcpu='0' cpuset='3'/>", "")
        .replace(
            "  <numatune>\n    <memory mode='strict' nodeset='0'/>\n  </numatune>\n",
            "",
        );
    for op in ["migrate", "restore"] {
        for (input, expected) in [(XML, XML.to_string()), (managed.as_str(), stripped.clone())] {
            let out = run_hook(&run, &["web-1", op, "begin", "-"], input.as_bytes());
            assert_eq!(out.status.code(), Some(0));
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                expected,
                "{op}: libvirt reads stdout as the XML"
            );
            assert!(
                !received_frame(&listener).is_empty(),
                "{op}: event still sent"
            );
        }
    }
}

#[test]
fn hostile_input_still_exits_zero_with_the_name_as_data() {
    if skip("hostile_input_still_exits_zero_with_the_name_as_data") {
        return;
    }
    let run = PrivateRun::new("hook-hostile");
    let daemon = acking_daemon(UnixListener::bind(run.socket()).unwrap(), 1, true);
    let name = "../../etc/passwd\n$(reboot)";
    let bomb = "<!DOCTYPE d [<!ENTITY a \"aaaaaaaaaa\"><!ENTITY b \"&a;&a;&a;&a;&a;&a;\">]><domain><name>&b;</name></domain>";
    let out = run_hook(&run, &[name, "started", "begin", "-"], bomb.as_bytes());
    assert_eq!(out.status.code(), Some(0));
    let frame = daemon.join().unwrap().remove(0);
    assert!(
        String::from_utf8_lossy(&frame).contains(name),
        "unreadable XML: the name comes from libvirt's argument, as data"
    );
    // Unknown operations (a newer libvirt) are not ours to fail.
    let out = run_hook(&run, &["web-1", "future-op", "begin", "-"], XML.as_bytes());
    assert_eq!(out.status.code(), Some(0));
    assert!(
        std::fs::read_dir(run.path().join("pinner"))
            .unwrap()
            .count()
            == 1,
        "nothing but the socket created"
    );
}

/// Names libvirt may hand over (quotes, newlines, 1,000+ characters, bytes
/// that are not UTF-8) and XML that is huge or cut short: the hook exits 0,
/// forwards the name as data, and echoes what it cannot parse unchanged.
#[test]
fn odd_names_and_huge_or_truncated_xml_are_data() {
    if skip("odd_names_and_huge_or_truncated_xml_are_data") {
        return;
    }
    let run = PrivateRun::new("hook-odd");
    let listener = UnixListener::bind(run.socket()).unwrap();
    let long = "g".repeat(1500);
    for name in ["it's \"quoted\"\nand/new..lined", long.as_str()] {
        let out = run_hook(&run, &[name, "started", "begin", "-"], b"<domain><na");
        assert_eq!(out.status.code(), Some(0), "{name:.40}");
        let frame = received_frame(&listener);
        assert!(
            String::from_utf8_lossy(&frame).contains(name),
            "{name:.40}: forwarded as given"
        );
    }

    // Not UTF-8: forwarded lossily, never interpreted.
    let mut child = with_private_run(run.path(), &hook())
        .arg(std::ffi::OsStr::from_bytes(b"bad\xff\xfename"))
        .args(["started", "begin", "-"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let frame = received_frame(&listener);
    assert!(String::from_utf8_lossy(&frame).contains("bad\u{fffd}\u{fffd}name"));

    // 10 MB of XML on restore: echoed byte for byte (too large to rewrite).
    let huge = format!("{}<!-- {} -->\n", XML.trim_end(), "x".repeat(10 << 20));
    let out = run_hook(&run, &["web-1", "restore", "begin", "-"], huge.as_bytes());
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout == huge.as_bytes(), "huge XML echoed unchanged");
    received_frame(&listener);

    // Cut short: echoed unchanged, the event still sent with the argv name.
    let cut = &XML.as_bytes()[..XML.len() / 2];
    let out = run_hook(&run, &["web-1", "migrate", "begin", "-"], cut);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, cut);
    assert!(String::from_utf8_lossy(&received_frame(&listener)).contains("web-1"));
}

/// A stand-in daemon that reads each event and acknowledges it (or not);
/// returns the frames it read.
fn acking_daemon(
    listener: UnixListener,
    runs: usize,
    ack: bool,
) -> std::thread::JoinHandle<Vec<Vec<u8>>> {
    std::thread::spawn(move || {
        let mut frames = Vec::new();
        for conn in listener.incoming().take(runs) {
            let mut conn = conn.unwrap();
            let mut frame = Vec::new();
            conn.read_to_end(&mut frame).unwrap();
            assert!(!frame.is_empty(), "an event came");
            if ack {
                conn.write_all(&pinner_e2e::accepted_frame()).unwrap();
            }
            frames.push(frame);
        }
        frames
    })
}

/// An event counts as delivered only once the daemon acknowledged it: one
/// it read but never answered is counted as dropped, never lost silently.
#[test]
fn only_an_acknowledged_event_counts_as_delivered() {
    if skip("only_an_acknowledged_event_counts_as_delivered") {
        return;
    }
    let run = PrivateRun::new("hook-ack");
    let drops = run.socket().with_file_name("hook-dropped");
    let daemon = acking_daemon(UnixListener::bind(run.socket()).unwrap(), 1, true);
    let out = run_hook(&run, &["web-1", "started", "begin", "-"], XML.as_bytes());
    daemon.join().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!drops.exists(), "an acknowledged event is no drop");

    std::fs::remove_file(run.socket()).unwrap();
    let daemon = acking_daemon(UnixListener::bind(run.socket()).unwrap(), 1, false);
    let out = run_hook(&run, &["web-1", "started", "begin", "-"], XML.as_bytes());
    daemon.join().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("did not acknowledge"), "{stderr}");
    assert_eq!(std::fs::metadata(&drops).unwrap().len(), 1);
}

/// `yes | pinner-hook vm1 started begin -`, and a stdin that never closes:
/// the hook still hands the event over and exits 0, its memory bounded.
#[test]
fn endless_or_never_closing_stdin_does_not_hold_the_hook() {
    if skip("endless_or_never_closing_stdin_does_not_hold_the_hook") {
        return;
    }
    let run = PrivateRun::new("hook-stdin");
    let daemon = acking_daemon(UnixListener::bind(run.socket()).unwrap(), 2, true);
    let started = std::time::Instant::now();
    let mut child = with_private_run(run.path(), &hook())
        .args(["vm1", "started", "begin", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        let chunk = vec![b'y'; 1 << 16];
        while stdin.write_all(&chunk).is_ok() {}
    });
    let status = wait_or_kill(&mut child, Duration::from_secs(10));
    feeder.join().unwrap();
    let endless = started.elapsed();
    assert_eq!(status, Some(0), "endless stdin: the hook must come back");

    // A writer that keeps the pipe open and sends nothing more.
    let mut child = with_private_run(run.path(), &hook())
        .args(["vm1", "started", "begin", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"<domain><name>vm1</name>").unwrap();
    let started = std::time::Instant::now();
    let status = wait_or_kill(&mut child, Duration::from_secs(10));
    let open = started.elapsed();
    drop(stdin);
    assert_eq!(
        status,
        Some(0),
        "never-closing stdin: the hook must come back"
    );
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(stderr.contains("stdin cut off"), "{stderr}");
    daemon.join().unwrap();
    eprintln!("endless stdin: back in {endless:?}; never-closing stdin: back in {open:?}");
}

/// The child's exit code, or None after killing it when it outlives `limit`.
fn wait_or_kill(child: &mut std::process::Child, limit: Duration) -> Option<i32> {
    let until = std::time::Instant::now() + limit;
    while std::time::Instant::now() < until {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}
