//! Restore-safe XML on the sandboxed libvirtd: a guest pinner placed is
//! saved, its CPU is then reserved, and `virsh restore` must still succeed:
//! the hook takes pinner's old pins out of the XML libvirt restores from,
//! and the daemon places the guest again on a CPU it may have.

use pinner_e2e::{online_cpus, sandbox_or_skip, wait_for};
use std::time::Duration;

#[test]
fn restored_guest_drops_old_pins_and_is_placed_again() {
    let Some(mut sb) = sandbox_or_skip("restored_guest_drops_old_pins_and_is_placed_again") else {
        return;
    };
    let online = online_cpus();
    let (first, last) = (online[0], online[online.len() - 1]);
    let all_but = |keep: u32| {
        online
            .iter()
            .filter(|c| **c != keep)
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    sb.start_daemon(&all_but(last));
    let name = sb.define_guest("r", 1, "");
    sb.start_guest("r");
    sb.await_pins("r", Duration::from_secs(5), "pinned to the last CPU", |p| {
        p == [vec![last]]
    });
    let live = sb.virsh_ok(&["dumpxml", &name]);
    assert!(
        live.contains("<vcpupin") && live.contains("urn:pinner:1"),
        "{live}"
    );

    let image = sb.dir.join("r.save");
    sb.virsh_ok(&["save", &name, image.to_str().unwrap()]);
    // The guest's CPU becomes the host's, and nothing places guests while
    // libvirt restores: what it restores from is what the hook printed.
    sb.stop_daemon();
    sb.virsh_ok(&["restore", image.to_str().unwrap()]);
    let restored = sb.virsh_ok(&["dumpxml", &name]);
    assert!(
        !restored.contains("<vcpupin"),
        "old pins restored:\n{restored}"
    );
    assert!(
        !restored.contains("<numatune"),
        "old memory binding restored:\n{restored}"
    );
    assert!(restored.contains("urn:pinner:1"), "metadata kept");
    assert_eq!(
        sb.vcpu_pins("r"),
        vec![online.clone()],
        "unpinned until placed"
    );

    sb.start_daemon(&all_but(first));
    sb.await_pins(
        "r",
        Duration::from_secs(5),
        "placed again on a CPU it may have",
        |p| p == [vec![first]],
    );
    wait_for(Duration::from_secs(5), || sb.all_in_sync()).unwrap();
}
