//! Live migration for real: two sandboxed libvirtds on this machine, each a
//! host of its own (mount and UTS namespace, hostname, host UUID, hook and
//! pinner daemon), a managed guest pinned on the first migrated live to the
//! second, which reserves the very CPU it used; a guest pinned by hand
//! migrated beside it; and a migration that fails and rolls back.

use pinner_e2e::{online_cpus, sandbox_or_skip, serial, wait_for, Sandbox};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

const DEDICATED: &str =
    "<metadata><pinner:state xmlns:pinner=\"urn:pinner:1\" policy=\"dedicated\"/></metadata>";

/// vCPU pins of the domain `name` (its full name) on `sb`'s libvirtd.
fn pins_of(sb: &Sandbox, name: &str) -> Vec<String> {
    sb.virsh_ok(&["vcpupin", name])
        .lines()
        .filter_map(|l| {
            let mut cols = l.split_whitespace();
            cols.next()?.parse::<u32>().ok()?;
            cols.next().map(String::from)
        })
        .collect()
}

fn running(sb: &Sandbox, name: &str) -> bool {
    String::from_utf8_lossy(&sb.virsh(&["list", "--name"]).stdout)
        .lines()
        .any(|l| l.trim() == name)
}

/// `virsh migrate --live` from `from` to `to`, the data over `data_uri`;
/// given a minute, so a hung migration fails the test instead of holding it.
fn migrate(from: &Sandbox, to: &Sandbox, name: &str, data_uri: &str) -> std::process::Output {
    Command::new("timeout")
        .args([
            "60",
            "virsh",
            "-q",
            "-c",
            &from.uri(),
            "migrate",
            "--live",
            name,
        ])
        .args([&to.uri(), "--migrateuri", data_uri])
        .output()
        .expect("run virsh migrate")
}

#[test]
fn live_migration_to_another_host_is_placed_by_its_daemon() {
    let _serial = serial();
    let Some(mut source) =
        sandbox_or_skip("live_migration_to_another_host_is_placed_by_its_daemon")
    else {
        return;
    };
    let mut destination = Sandbox::start();
    let online = online_cpus();
    let (first, last) = (online[0].to_string(), online[online.len() - 1].to_string());
    // The source keeps the first CPU for itself; the destination reserves
    // the last, the one the guest is pinned to on the source.
    source.start_daemon(&first);
    destination.start_daemon(&last);
    source.define_guest("mig", 1, DEDICATED);
    source.start_guest("mig");
    let mig = source.name("mig");
    source.await_pins("mig", Duration::from_secs(5), "pinned on the source", |p| {
        p == [vec![online[online.len() - 1]]]
    });

    // Both sandboxes share this machine's cgroupfs, where libvirt names a
    // guest's group by its id and name: a guest opted out of pinner runs
    // first on the destination, so the incoming one gets another id.
    let opted_out =
        "<metadata><pinner:state xmlns:pinner=\"urn:pinner:1\" policy=\"none\"/></metadata>";
    destination.define_guest("placeholder", 1, opted_out);
    destination.start_guest("placeholder");

    // A migration that fails: another hook on the destination refuses it
    // (libvirt aborts when any qemu hook fails `migrate`). Rolled back, the
    // guest still runs on the source with its pin.
    let refuser = destination
        .hook_path()
        .with_file_name("60-refuse-migrations");
    std::fs::write(
        &refuser,
        "#!/bin/sh\n[ \"$2\" = migrate ] && exit 1\nexit 0\n",
    )
    .unwrap();
    std::fs::set_permissions(&refuser, std::fs::Permissions::from_mode(0o755)).unwrap();
    let failed = migrate(&source, &destination, &mig, "tcp://127.0.0.1:49251");
    std::fs::remove_file(&refuser).unwrap();
    assert!(
        !failed.status.success(),
        "a migration the destination refused succeeded"
    );
    assert!(running(&source, &mig), "the source lost the guest");
    assert_eq!(
        pins_of(&source, &mig),
        std::slice::from_ref(&last),
        "source pin after the rollback"
    );
    assert!(!running(&destination, &mig));

    let moved = migrate(&source, &destination, &mig, "tcp://127.0.0.1:49252");
    assert!(
        moved.status.success(),
        "migration failed: {}",
        String::from_utf8_lossy(&moved.stderr)
    );
    assert!(!running(&source, &mig));
    // The destination's daemon places it by its own config: off the CPU
    // it reserves, so no pin of the source's survives.
    let placed = wait_for(Duration::from_secs(10), || {
        match pins_of(&destination, &mig) {
            pins if pins == [first.clone()] => Ok(pins),
            pins => Err(format!("pins on the destination: {pins:?}")),
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", destination.daemon_log()));
    // "*: 1", or just "1" under `virsh -q`: on the destination's reserved CPU.
    let emulator = destination.virsh_ok(&["emulatorpin", &mig]);
    let emulator = emulator
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    assert_eq!(emulator, last, "emulator threads on the destination");
    println!("migrated {mig}: pinned to {placed:?} on the destination, emulator {emulator:?}");

    // A guest pinned by hand is not pinner's: its pin travels unchanged.
    destination.virsh_ok(&["destroy", &mig]);
    let hand_pin = format!("<cputune><vcpupin vcpu='0' cpuset='{first}'/></cputune>");
    source.define_guest("hand", 1, &hand_pin);
    source.start_guest("hand");
    let hand = source.name("hand");
    let moved = migrate(&source, &destination, &hand, "tcp://127.0.0.1:49253");
    assert!(
        moved.status.success(),
        "{}",
        String::from_utf8_lossy(&moved.stderr)
    );
    assert_eq!(pins_of(&destination, &hand), std::slice::from_ref(&first));
    let xml = destination.virsh_ok(&["dumpxml", "--inactive", &hand]);
    assert!(
        xml.contains(&format!("<vcpupin vcpu='0' cpuset='{first}'/>")),
        "{xml}"
    );
    let status = destination.status_json();
    let foreign = status["domains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == hand.as_str())
        .cloned()
        .unwrap_or_default();
    assert_eq!(foreign["policy"], "foreign", "{status}");
    assert!(destination.stop_daemon().is_some_and(|s| s.success()));
    assert!(source.stop_daemon().is_some_and(|s| s.success()));
}
