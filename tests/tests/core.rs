//! The working core, end to end: a private libvirtd with TCG guests, the real
//! `pinner-hook` as its qemu hook and the real daemon. Results are read back
//! from libvirt (`virsh vcpupin`/`emulatorpin`/`metadata`) and cgroupfs.

use pinner_e2e::{
    median, online_cpus, reserve_all_but, sandbox_or_skip, serial, wait_for, Sandbox,
};
use std::time::Duration;

/// The two CPUs the tests place guests on: the machine's last two.
fn two_cpus() -> (u32, u32) {
    let online = online_cpus();
    assert!(
        online.len() >= 2,
        "end-to-end tests need 2 online CPUs, have {online:?}"
    );
    (online[online.len() - 2], online[online.len() - 1])
}

fn assert_pinned(sb: &Sandbox, guest: &str, expected: &[Vec<u32>]) {
    assert_eq!(
        sb.vcpu_pins(guest),
        expected,
        "{guest}: libvirt's vCPU pins"
    );
    for (vcpu, cpus) in expected.iter().enumerate() {
        let (cgroup, threads) = sb.vcpu_cgroup(guest, vcpu as u32);
        assert_eq!(&cgroup, cpus, "{guest} vcpu{vcpu}: cgroup cpuset.cpus");
        assert!(
            !threads.is_empty(),
            "{guest} vcpu{vcpu}: no thread in its cgroup"
        );
        for affinity in threads {
            assert_eq!(&affinity, cpus, "{guest} vcpu{vcpu}: thread affinity");
        }
    }
}

/// 1. A started guest is pinned per the plan within 1 s of `virsh start`
///    returning, its emulator threads on the reserved CPUs, and marked.
#[test]
fn started_guest_is_pinned_within_a_second() {
    let _serial = serial();
    let Some(mut sb) = sandbox_or_skip("started_guest_is_pinned_within_a_second") else {
        return;
    };
    let (_, last) = two_cpus();
    let reserved = reserve_all_but(1);
    sb.start_daemon(&reserved);
    sb.define_guest("solo", 1, "");
    sb.start_guest("solo");
    sb.await_pins(
        "solo",
        Duration::from_secs(1),
        "pinned within 1 s of virsh start",
        |pins| pins == [vec![last]] && sb.emulator_pin("solo") == pinner_e2e::cpu_list(&reserved),
    );
    assert_pinned(&sb, "solo", &[vec![last]]);
    let meta = sb
        .metadata("solo")
        .expect("pinner metadata on the managed guest");
    assert!(meta.contains("mode=\"dedicated\""), "{meta}");

    let status = sb.status_json();
    assert_eq!(status["mode"], "dedicated");
    let domain = &status["domains"][0];
    assert_eq!(domain["name"], sb.name("solo"));
    assert_eq!(domain["in_sync"], true, "{domain}");
    assert!(
        status["counters"]["events_received"].as_u64().unwrap() >= 3,
        "prepare, start, started"
    );

    // The map of this host: the guest's letter on its CPU, the reserved
    // CPUs marked, plain text when not on a terminal.
    let out = sb.pinner(&["status", "--map"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let map = String::from_utf8_lossy(&out.stdout);
    assert!(map.contains(&format!("{last}a]")), "{map}");
    for cpu in pinner_e2e::cpu_list(&reserved) {
        assert!(map.contains(&format!("{cpu}#")), "reserved {cpu}: {map}");
    }
    let legend = format!("  a {} (CPUs {last})", sb.name("solo"));
    assert!(map.lines().any(|l| l == legend), "{map}");
    assert!(!map.contains('\x1b'), "colour off a terminal: {map:?}");
}

/// 2. More vCPUs than the pool → shared mode, every guest range-bound;
///    stopping a guest → back to one-to-one.
#[test]
fn overcommit_switches_to_shared_and_back() {
    let _serial = serial();
    let Some(mut sb) = sandbox_or_skip("overcommit_switches_to_shared_and_back") else {
        return;
    };
    let (a, b) = two_cpus();
    sb.start_daemon(&reserve_all_but(2));
    for g in ["a", "b", "c"] {
        sb.define_guest(g, 1, "");
    }
    sb.start_guest("a");
    sb.start_guest("b");
    wait_for(Duration::from_secs(5), || sb.all_in_sync()).unwrap();
    let mut dedicated: Vec<u32> = ["a", "b"]
        .iter()
        .flat_map(|g| sb.vcpu_pins(g).concat())
        .collect();
    dedicated.sort();
    assert_eq!(dedicated, vec![a, b], "one pCPU each, none shared");

    sb.start_guest("c");
    let status = wait_for(Duration::from_secs(5), || {
        let s = sb.all_in_sync()?;
        if s["mode"] == "shared" {
            Ok(s)
        } else {
            Err(format!("mode {}", s["mode"]))
        }
    })
    .unwrap();
    for g in ["a", "b", "c"] {
        assert_pinned(&sb, g, &[vec![a, b]]);
        assert!(
            sb.has_live_vcpupin(g),
            "{g}: range binding is an explicit pin"
        );
        assert!(sb.metadata(g).unwrap().contains("mode=\"shared\""));
    }
    assert_eq!(status["domains"].as_array().unwrap().len(), 3);

    sb.destroy_guest("c");
    wait_for(Duration::from_secs(5), || {
        let s = sb.all_in_sync()?;
        if s["mode"] == "dedicated" {
            Ok(())
        } else {
            Err(format!("mode {}", s["mode"]))
        }
    })
    .unwrap();
    let pa = sb.vcpu_pins("a");
    let pb = sb.vcpu_pins("b");
    assert_eq!(pa.len(), 1);
    assert_eq!(pa[0].len(), 1, "a is one-to-one again: {pa:?}");
    assert_eq!(pb[0].len(), 1, "b is one-to-one again: {pb:?}");
    assert_ne!(pa, pb, "no pCPU serves two vCPUs");
    assert_pinned(&sb, "a", &pa);
    assert_pinned(&sb, "b", &pb);
}

/// 2b. The capacity line's hysteresis (`capacity_hysteresis_percent = 50`:
///     one of the pool's two CPUs must stay free to go back): a guest
///     started and stopped three times at the line leaves the others on
///     their range; they go one-to-one once one more guest stops.
#[test]
fn a_guest_cycling_at_the_capacity_line_leaves_the_others_range_bound() {
    let _serial = serial();
    let Some(mut sb) =
        sandbox_or_skip("a_guest_cycling_at_the_capacity_line_leaves_the_others_range_bound")
    else {
        return;
    };
    let (a, b) = two_cpus();
    sb.extra_config = "capacity_hysteresis_percent = 50".into();
    sb.start_daemon(&reserve_all_but(2));
    for g in ["a", "b", "c"] {
        sb.define_guest(g, 1, "");
    }
    sb.start_guest("a");
    sb.start_guest("b");
    let running = |count: usize, mode: &str| {
        wait_for(Duration::from_secs(5), || {
            let s = sb.all_in_sync()?;
            let listed = s["domains"].as_array().map_or(0, Vec::len);
            if s["mode"] == mode && listed == count {
                Ok(s)
            } else {
                Err(format!("mode {} with {listed} guests", s["mode"]))
            }
        })
        .unwrap()
    };
    running(2, "dedicated");
    for cycle in 0..3 {
        sb.start_guest("c");
        running(3, "shared");
        sb.destroy_guest("c");
        let status = running(2, "shared");
        for g in ["a", "b"] {
            assert_pinned(&sb, g, &[vec![a, b]]);
            let reason = status["domains"]
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["name"] == sb.name(g))
                .map(|d| d["reason"].to_string())
                .unwrap();
            assert!(
                reason.contains("leave 1 of the pool's 2 CPUs free"),
                "cycle {cycle}, {g}: {reason}"
            );
        }
    }
    sb.destroy_guest("b");
    running(1, "dedicated");
    assert_eq!(sb.vcpu_pins("a")[0].len(), 1, "one-to-one again");
}

/// 3. With the daemon down, starts succeed with the hook in place (its
///    drops counted) and the daemon pins all guests when it starts.
#[test]
fn guests_started_while_daemon_down_are_pinned_at_startup() {
    let _serial = serial();
    let Some(mut sb) = sandbox_or_skip("guests_started_while_daemon_down_are_pinned_at_startup")
    else {
        return;
    };
    let (_, last) = two_cpus();
    let guests = ["d1", "d2", "d3"];
    for g in guests {
        sb.define_guest(g, 1, "");
    }
    // libvirt rescans hooks/qemu.d on every call, so moving the hook aside
    // gives the same libvirtd without it. Interleave to cancel drift.
    let hook = sb.hook_path();
    let parked = sb.dir.join("50-pinner.parked");
    // /run/pinner outlives a stopped daemon (RuntimeDirectoryPreserve): the
    // hook counts what it could not hand over there.
    std::fs::create_dir_all(sb.socket().parent().unwrap()).unwrap();
    let (mut with_hook, mut without_hook) = (Vec::new(), Vec::new());
    for _round in 0..3 {
        for g in guests {
            with_hook.push(sb.start_guest(g));
            sb.destroy_guest(g);
            std::fs::rename(&hook, &parked).unwrap();
            without_hook.push(sb.start_guest(g));
            sb.destroy_guest(g);
            std::fs::rename(&parked, &hook).unwrap();
        }
    }
    // Printed, not asserted: timing goals live in the benchmarks
    // (`hook-bench`, `latency-bench`), where a loaded machine cannot fail a
    // functional test.
    let (w, wo) = (median(&mut with_hook), median(&mut without_hook));
    eprintln!("virsh start median: {w:?} with the hook (daemon down), {wo:?} without");

    for g in guests {
        sb.start_guest(g);
        assert_eq!(
            sb.metadata(g),
            None,
            "nothing pinned while the daemon is down"
        );
    }
    // Pool of one CPU: three 1-vCPU guests share it.
    sb.start_daemon(&reserve_all_but(1));
    let status = wait_for(Duration::from_secs(5), || sb.all_in_sync()).unwrap();
    let dropped = status["counters"]["hook_events_dropped"].as_u64().unwrap();
    // prepare, start, started of the last three starts at least.
    assert!(dropped >= 9, "hook drops counted: {dropped}");
    for g in guests {
        assert_pinned(&sb, g, &[vec![last]]);
        assert_eq!(
            sb.emulator_pin(g),
            vec![last],
            "shared guests keep emulator threads on their range"
        );
        assert!(sb.metadata(g).is_some());
    }
}

/// 4. A guest pinned by someone else (no pinner metadata) is left exactly as
///    it was, and its CPU is not given to others.
#[test]
fn guest_pinned_by_hand_is_left_alone() {
    let _serial = serial();
    let Some(mut sb) = sandbox_or_skip("guest_pinned_by_hand_is_left_alone") else {
        return;
    };
    let (a, b) = two_cpus();
    sb.define_guest(
        "nova",
        1,
        &format!("<cputune><vcpupin vcpu='0' cpuset='{b}'/></cputune>"),
    );
    sb.start_guest("nova");
    let before = sb.virsh_ok(&["dumpxml", &sb.name("nova")]);
    sb.start_daemon(&reserve_all_but(2));
    sb.define_guest("mine", 1, "");
    sb.start_guest("mine");
    wait_for(Duration::from_secs(5), || sb.all_in_sync()).unwrap();
    assert_pinned(&sb, "mine", &[vec![a]]);

    // A reconcile round trip, then the foreign guest must be untouched.
    let out = sb.pinner(&["reconcile"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        sb.virsh_ok(&["dumpxml", &sb.name("nova")]),
        before,
        "foreign guest's XML changed"
    );
    assert_eq!(sb.metadata("nova"), None);
    assert_pinned(&sb, "nova", &[vec![b]]);
    let status = sb.status_json();
    let nova = status["domains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == sb.name("nova"))
        .unwrap();
    assert_eq!(nova["policy"], "foreign");
}

/// 5. libvirtd restarted under a running daemon: the daemon reconnects, pins
///    stay right, and a new guest still gets pinned.
#[test]
fn daemon_survives_libvirtd_restart() {
    let _serial = serial();
    let Some(mut sb) = sandbox_or_skip("daemon_survives_libvirtd_restart") else {
        return;
    };
    let (a, b) = two_cpus();
    sb.start_daemon(&reserve_all_but(2));
    sb.define_guest("before", 1, "");
    sb.define_guest("after", 1, "");
    sb.start_guest("before");
    wait_for(Duration::from_secs(5), || sb.all_in_sync()).unwrap();
    let pinned = sb.vcpu_pins("before");

    sb.restart_libvirtd();
    assert_eq!(
        sb.vcpu_pins("before"),
        pinned,
        "pins survive the libvirtd restart"
    );
    sb.start_guest("after");
    sb.await_pins(
        "after",
        Duration::from_secs(5),
        "new guest pinned after libvirtd restart",
        |pins| pins.len() == 1 && pins[0].len() == 1,
    );
    let status = wait_for(Duration::from_secs(5), || sb.all_in_sync()).unwrap();
    assert_eq!(status["libvirt_connected"], true);
    assert!(
        status["counters"]["libvirt_reconnects"].as_u64().unwrap() >= 1,
        "{status}"
    );
    let mut all: Vec<u32> = ["before", "after"]
        .iter()
        .flat_map(|g| sb.vcpu_pins(g).concat())
        .collect();
    all.sort();
    assert_eq!(all, vec![a, b], "one-to-one across the restart");
    assert_eq!(sb.vcpu_pins("before"), pinned, "existing guest not moved");
}
