//! The daemon's socket under hostile or careless clients: garbage, wrong
//! versions, oversized and empty frames, clients that connect and say
//! nothing, and users who are not allowed. Each gets an error (or the door)
//! and the daemon keeps serving everyone else.

use pinner_e2e::{sandbox_or_skip, serial, wait_for};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

/// Sends `bytes`, then reads whatever the daemon answers until it closes.
fn exchange(socket: &Path, bytes: &[u8]) -> Vec<u8> {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(bytes).unwrap();
    let mut reply = Vec::new();
    stream
        .read_to_end(&mut reply)
        .expect("the daemon answers and closes");
    reply
}

fn assert_refused(socket: &Path, what: &str, bytes: &[u8], expected: &str) {
    let reply = exchange(socket, bytes);
    let text = String::from_utf8_lossy(&reply);
    assert!(
        text.contains(expected),
        "{what}: expected an error containing {expected:?}, got {text:?}"
    );
}

/// A 4-byte big-endian length and that body.
fn frame(body: &[u8]) -> Vec<u8> {
    let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(body);
    bytes
}

#[test]
fn bad_frames_get_an_error_and_a_silent_client_stalls_nobody() {
    let _serial = serial();
    let Some(mut sb) = sandbox_or_skip("bad_frames_get_an_error_and_a_silent_client_stalls_nobody")
    else {
        return;
    };
    sb.start_daemon("");
    let socket = sb.socket();

    // Clients that connect and send nothing: the daemon still serves others
    // meanwhile, and closes them after its request timeout.
    let silent: Vec<UnixStream> = (0..8)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    let status = sb.pinner(&["status"]);
    assert!(
        status.status.success(),
        "status while 8 clients hang: {}",
        String::from_utf8_lossy(&status.stderr)
    );

    assert_refused(
        &socket,
        "HTTP request",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        "exceeds the 65536-byte limit",
    );
    let mut oversized = (10u32 * 1024 * 1024).to_be_bytes().to_vec();
    oversized.extend_from_slice(&[1; 1024]);
    assert_refused(
        &socket,
        "10 MB frame",
        &oversized,
        "exceeds the 65536-byte limit",
    );
    assert_refused(
        &socket,
        "wrong version",
        &frame(&[9, 0]),
        "protocol version 9 not supported",
    );
    assert_refused(&socket, "empty frame", &frame(&[]), "empty frame");
    assert_refused(
        &socket,
        "garbage payload",
        &frame(&[1, 0xff, 0xff, 0xff, 0xff, 0xff]),
        "malformed message",
    );
    assert_refused(
        &socket,
        "trailing bytes",
        &frame(&[1, 1, 0, 0, 0]),
        "trailing bytes",
    );
    // Half a frame, then the client goes away: nothing to answer.
    let mut half = UnixStream::connect(&socket).unwrap();
    half.write_all(&[0, 0, 0, 100, 1, 2, 3]).unwrap();
    drop(half);

    for (i, mut stream) in silent.into_iter().enumerate() {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut rest = Vec::new();
        let closed = stream.read_to_end(&mut rest);
        assert!(closed.is_ok(), "silent client {i} not closed: {closed:?}");
    }

    let status = sb.status_json();
    assert_eq!(status["libvirt_connected"], true, "{status}");
    let log = sb.await_log("bad request: protocol version 9 not supported");
    assert!(!log.contains("panicked"), "{log}");
    assert!(sb.stop_daemon().is_some_and(|s| s.success()));
}

/// `pinner status` as `uid`/`gid` with the supplementary `groups`.
fn status_as(pinner: &Path, socket: &Path, uid: u32, gid: u32, groups: &str) -> Output {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"));
    if groups.is_empty() {
        cmd.arg("--clear-groups");
    } else {
        cmd.arg(format!("--groups={groups}"));
    }
    cmd.arg(pinner)
        .arg("status")
        .arg("--socket")
        .arg(socket)
        .output()
        .expect("run setpriv")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Only root, or the configured socket_group, gets in: by the socket's mode
/// first, and by the peer's credentials (SO_PEERCRED) even when the mode
/// would let anyone in.
#[test]
fn only_root_and_the_socket_group_may_connect() {
    let _serial = serial();
    let Some(mut sb) = sandbox_or_skip("only_root_and_the_socket_group_may_connect") else {
        return;
    };
    const NOBODY: u32 = 65534;
    const NOGROUP: u32 = 65534;
    sb.start_daemon("");
    let pinner = sb.world_runnable("pinner");
    let socket = sb.socket();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let out = status_as(&pinner, &socket, NOBODY, NOGROUP, "");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("permission denied on"),
        "{}",
        stderr(&out)
    );

    // A careless chmod does not open the door: the daemon checks the peer.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = status_as(&pinner, &socket, NOBODY, NOGROUP, "");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("permission denied for uid 65534")
            && stderr(&out).contains("only root may use the pinner socket"),
        "{}",
        stderr(&out)
    );
    sb.await_log("refused connection: permission denied for uid 65534");
    assert!(sb.stop_daemon().is_some_and(|s| s.success()));

    // With socket_group: members get in through a socket of their own (by
    // primary or supplementary group), others are kept out by its mode and
    // by the check; the main socket stays root's and the hook's.
    sb.extra_config = "socket_group = \"nogroup\"".into();
    sb.start_daemon("");
    assert_eq!(
        std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let group_socket = sb.group_socket();
    let meta = std::fs::metadata(&group_socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), NOGROUP);
    let out = status_as(&pinner, &group_socket, NOBODY, NOGROUP, "");
    assert!(
        out.status.success(),
        "primary group member: {}",
        stderr(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("libvirt"));
    let out = status_as(&pinner, &group_socket, NOBODY, 1, &NOGROUP.to_string());
    assert!(
        out.status.success(),
        "supplementary group member: {}",
        stderr(&out)
    );
    let out = status_as(&pinner, &group_socket, NOBODY, 1, "");
    assert_eq!(out.status.code(), Some(1), "not a member");
    std::fs::set_permissions(&group_socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = status_as(&pinner, &group_socket, NOBODY, 1, "");
    assert!(
        stderr(&out).contains("only root and the socket_group may use the pinner socket"),
        "{}",
        stderr(&out)
    );
    // A member on the main socket (made world-writable by mistake) is still
    // refused: that one is root's and the hook's.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = status_as(&pinner, &socket, NOBODY, NOGROUP, "");
    assert!(
        stderr(&out).contains("only root may use the pinner socket"),
        "{}",
        stderr(&out)
    );
    // A member's CLI finds its socket by itself (no --socket).
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOGROUP}"),
            "--clear-groups",
        ])
        .arg(&pinner)
        .arg("--config")
        .arg(sb.config_path())
        .arg("status")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "member without --socket: {}",
        stderr(&out)
    );
    wait_for(Duration::from_secs(2), || {
        sb.status_json()["libvirt_connected"]
            .as_bool()
            .filter(|c| *c)
            .map(|_| ())
            .ok_or_else(|| "daemon not connected".to_string())
    })
    .unwrap();
}
