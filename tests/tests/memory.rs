//! Guest memory placed as a capacity, end to end: the real daemon, hook
//! and a sandboxed libvirtd on this machine's NUMA node, its room cut down
//! by the host reserve so that 64 MiB TCG guests fill it. What is read
//! back: libvirt's numatune, `pinner status` (text and JSON), the metrics
//! and `pinner doctor`.

use pinner_e2e::{reserve_all_but, sandbox_or_skip, serial, wait_for, Sandbox};
use std::time::Duration;

/// Node 0's MemTotal in MiB, as sysfs gives it.
fn node0_mib() -> u64 {
    let meminfo = std::fs::read_to_string("/sys/devices/system/node/node0/meminfo")
        .expect("node 0's meminfo");
    let kib: u64 = meminfo
        .lines()
        .find(|l| l.contains("MemTotal:"))
        .and_then(|l| l.split_whitespace().rev().nth(1)?.parse().ok())
        .expect("MemTotal");
    kib / 1024
}

fn domain<'a>(status: &'a serde_json::Value, sb: &Sandbox, short: &str) -> &'a serde_json::Value {
    status["domains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == sb.name(short))
        .unwrap_or_else(|| panic!("{short} not in {status:#}"))
}

/// A pinner.toml beside the sandbox's that leaves `room` MiB of node 0
/// for guests.
fn config_with_room(sb: &Sandbox, room: u64, tag: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(sb.config_path()).unwrap().replace(
        &format!("reserved_memory_mib = {}", node0_mib() - 100),
        &format!("reserved_memory_mib = {}", node0_mib() - room),
    );
    let path = sb.dir.join(format!("{tag}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Room for one 64 MiB guest on the node: the first is bound there, the
/// second's memory stays unbound (never bound beyond the node), and the
/// status, the metrics and the doctor all say so.
#[test]
fn memory_the_node_cannot_hold_is_left_unbound_and_said_so() {
    let _serial = serial();
    let Some(mut sb) = sandbox_or_skip("memory_the_node_cannot_hold_is_left_unbound_and_said_so")
    else {
        return;
    };
    sb.extra_config = format!("reserved_memory_mib = {}", node0_mib() - 100);
    sb.start_daemon(&reserve_all_but(1));
    for g in ["a", "b"] {
        sb.define_guest(g, 1, "");
    }
    sb.start_guest("a");
    wait_for(Duration::from_secs(5), || sb.all_in_sync()).unwrap();
    assert_eq!(sb.memory_nodes("a"), [0], "64 of 100 MiB: bound to node 0");
    sb.start_guest("b");
    let status = wait_for(Duration::from_secs(5), || {
        let status = sb.all_in_sync()?;
        match domain(&status, &sb, "b")["vcpus"][0]["cpus"].as_array() {
            Some(cpus) if !cpus.is_empty() => Ok(status),
            _ => Err("b not pinned yet".into()),
        }
    })
    .unwrap();
    assert!(
        sb.memory_nodes("b").is_empty(),
        "b left unbound: {:?}",
        sb.memory_nodes("b")
    );
    assert_eq!(sb.memory_nodes("a"), [0]);
    let b = domain(&status, &sb, "b");
    assert!(
        b["reason"]
            .as_str()
            .unwrap()
            .ends_with("; memory not bound: 64 MiB fits no set of nodes"),
        "{b:#}"
    );
    assert_eq!(b["memory_kib"], 65536);
    let warning = format!(
        "{}: memory not bound: 64 MiB fits no set of nodes",
        sb.name("b")
    );
    assert!(
        status["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w == &warning),
        "{status:#}"
    );
    let normal = status["memory"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"] == 0 && p["kind"] == "normal")
        .unwrap_or_else(|| panic!("{status:#}"));
    assert_eq!(
        (
            normal["capacity_kib"].as_u64(),
            normal["committed_kib"].as_u64()
        ),
        (Some(102400), Some(65536))
    );

    let text = String::from_utf8(sb.pinner(&["status"]).stdout).unwrap();
    assert!(
        text.contains("guest memory per node (committed of room):\n  node 0: 64 MiB of 100 MiB\n"),
        "{text}"
    );
    assert!(
        text.contains("  memory: fits no set of nodes: left unbound (64 MiB of it)"),
        "{text}"
    );
    let metrics = String::from_utf8(sb.pinner(&["metrics"]).stdout).unwrap();
    for line in [
        "pinner_node_memory_capacity_bytes{node=\"0\",kind=\"normal\"} 104857600",
        "pinner_node_memory_committed_bytes{node=\"0\",kind=\"normal\"} 67108864",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}:\n{metrics}");
    }

    // The doctor reads the same room: a's binding holds; with 32 MiB of
    // room it would not.
    let doctor = |config: &std::path::Path| {
        let uri = sb.uri();
        let args = [
            "--config",
            config.to_str().unwrap(),
            "doctor",
            "--connect",
            &uri,
            "--json",
            "--sample",
            "0",
        ];
        let out = sb.pinner(&args);
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
    };
    let beyond = |report: &serde_json::Value| -> Vec<String> {
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["id"] == "PIN040")
            .map(|f| f["domain"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(beyond(&doctor(&config_with_room(&sb, 100, "room-100"))).is_empty());
    let report = doctor(&config_with_room(&sb, 32, "room-32"));
    assert_eq!(beyond(&report), [sb.name("a")], "{report:#}");
}
