//! The daemon as an operator runs it: signals, config reloads, the CLI.

use pinner_e2e::{bin_dir, online_cpus, sandbox_or_skip, wait_for};
use std::process::Command;
use std::time::Duration;

#[test]
fn cli_says_clearly_when_the_daemon_is_not_running() {
    let out = Command::new(bin_dir().join("pinner"))
        .args(["status", "--socket", "/nonexistent/pinner.sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "pinner: pinner daemon is not running (no socket at /nonexistent/pinner.sock)\n"
    );
}

#[test]
fn daemon_refuses_a_broken_config_with_file_and_line() {
    let dir = std::env::temp_dir().join(format!("pinner-badconf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("pinner.toml");
    std::fs::write(&config, "# comment\ncpu_allocation_ratio = -2\n").unwrap();
    let out = Command::new(bin_dir().join("pinner"))
        .args(["daemon", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(&format!(
            "pinner: {}:2:24: cpu_allocation_ratio must be a number above 0",
            config.display()
        )),
        "{stderr}"
    );
}

/// SIGHUP with a broken config keeps the running one (and says where the
/// file is wrong); with a good one, the new reserved set is applied at once.
/// SIGTERM stops the daemon cleanly and removes its socket.
#[test]
fn sighup_reloads_and_sigterm_stops_cleanly() {
    let Some(mut sb) = sandbox_or_skip("sighup_reloads_and_sigterm_stops_cleanly") else {
        return;
    };
    let online = online_cpus();
    let (first, last) = (online[online.len() - 2], online[online.len() - 1]);
    let keep_last_two = online[..online.len() - 2]
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    sb.start_daemon(&keep_last_two);
    sb.define_guest("g", 1, "");
    sb.start_guest("g");
    wait_for(Duration::from_secs(5), || sb.all_in_sync()).unwrap();
    assert_eq!(
        sb.vcpu_pins("g"),
        vec![vec![first]],
        "lowest free CPU first"
    );

    std::fs::write(sb.config_path(), "reserved_cpus = \"0-\"\n").unwrap();
    sb.signal_daemon(libc::SIGHUP);
    sb.await_log(&format!(
        "configuration not reloaded, keeping the running one: {}:1:17: reserved_cpus",
        sb.config_path().display()
    ));
    let status = sb.all_in_sync().expect("still running on the old config");
    assert_eq!(status["pool"], serde_json::json!([first, last]));

    // Reserve the guest's CPU: it must move to the other one.
    let reserve_first = online[..online.len() - 1]
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    sb.write_config(&reserve_first);
    sb.signal_daemon(libc::SIGHUP);
    sb.await_pins(
        "g",
        Duration::from_secs(5),
        "reload re-placed the guest",
        |pins| pins == vec![vec![last]],
    );
    sb.await_log("configuration reloaded");

    let status = sb.stop_daemon().expect("daemon exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(!sb.socket().exists(), "socket removed on exit");
    sb.await_log("pinner daemon stopped");
    assert_eq!(
        sb.vcpu_pins("g"),
        vec![vec![last]],
        "pins stay when the daemon stops"
    );
}
