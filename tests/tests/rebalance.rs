//! Placement that follows load, on the sandboxed libvirtd with real TCG
//! guests: the machine's two CPUs made two L3 ranges (in the sandbox's
//! mount namespace only, where the daemon runs), shared guests balanced by
//! their measured demand and rebalanced when it drifts.

use pinner_e2e::{online_cpus, reserve_all_but, sandbox_or_skip, serial, wait_for, Sandbox};
use std::time::Duration;

/// A disk whose boot code spins (`spin`) or that does not boot (idle).
fn disk(sb: &Sandbox, short: &str, spin: bool) -> String {
    format!(
        "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='hda' bus='ide'/></disk>",
        sb.disk_image(short, spin).display()
    )
}

/// The one CPU each guest's vCPU is bound to.
fn cpu_of(sb: &Sandbox, short: &str) -> Vec<u32> {
    sb.vcpu_pins(short).concat()
}

/// Four 1-vCPU shared guests start paused, so they idle; by count they go
/// two to a CPU. The two on one CPU are then resumed and spin: placement
/// keeps them (the counts are even), and after `samples` observations of
/// the gap rebalancing moves one of them to the other CPU (and by count an
/// idle guest the other way), once: the cool-down and the narrowed gap
/// leave it there. Status shows the move and each range's demand.
#[test]
fn a_busy_pair_on_one_range_is_split_by_rebalancing_once() {
    let _serial = serial();
    let Some(mut sb) = sandbox_or_skip("a_busy_pair_on_one_range_is_split_by_rebalancing_once")
    else {
        return;
    };
    assert!(online_cpus().len() >= 2, "needs two CPUs");
    sb.split_l3();
    sb.daemon_wrapper = sb.in_namespace();
    sb.reconcile_interval_secs = 1;
    sb.extra_config =
        "default_policy = \"shared\"\n[rebalance]\nsamples = 2\ncooldown_secs = 3600\n".into();
    sb.start_daemon(&reserve_all_but(2));
    let guests = ["a", "b", "c", "d"];
    for g in guests {
        sb.define_guest_with_devices(g, 1, "", &disk(&sb, g, true));
        sb.virsh_ok(&["start", "--paused", &sb.name(g)]);
        wait_for(Duration::from_secs(10), || sb.all_in_sync()).unwrap();
    }
    let first = cpu_of(&sb, "a");
    let pair: Vec<&str> = guests
        .into_iter()
        .filter(|g| cpu_of(&sb, g) == first)
        .collect();
    assert_eq!(pair.len(), 2, "two guests per CPU by count: {first:?}");
    for g in &pair {
        sb.virsh_ok(&["resume", &sb.name(g)]);
    }
    // A guest's demand counts once measured for its half-life (60 s).
    let moved = wait_for(Duration::from_secs(150), || {
        let s = sb.status_json();
        match s["rebalanced"].as_array().map(Vec::len) {
            Some(n) if n > 0 => Ok(s),
            _ => Err(format!("no move yet: {}", s["ranges"])),
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sb.daemon_log()));
    let entry = &moved["rebalanced"][0];
    assert!(
        pair.iter().any(|g| entry["domain"] == sb.name(g)),
        "{entry}"
    );
    assert_eq!(entry["across_nodes"], false, "two L3 ranges of one node");
    assert!(entry["busy"].as_f64().unwrap() > entry["idle"].as_f64().unwrap() + 0.1);
    wait_for(Duration::from_secs(10), || {
        sb.all_in_sync()?;
        let (x, y) = (cpu_of(&sb, pair[0]), cpu_of(&sb, pair[1]));
        if x != y {
            Ok(())
        } else {
            Err(format!("both busy guests on {x:?}"))
        }
    })
    .unwrap();
    sb.await_log("rebalancing: moving to CPUs");
    // Settled: more observations make no further move.
    std::thread::sleep(Duration::from_secs(6));
    let status = sb.status_json();
    assert_eq!(status["counters"]["rebalance_moves"], 1, "{status}");
    let ranges = status["ranges"].as_array().unwrap();
    assert_eq!(ranges.len(), 2, "{status}");
    for r in ranges {
        let demand = r["demand_cpus"].as_f64().unwrap();
        assert!(demand > 0.05 && demand <= 1.05, "one busy guest each: {r}");
        assert_eq!(r["unmeasured"], 0, "{r}");
    }
    let text = String::from_utf8(sb.pinner(&["status"]).stdout).unwrap();
    assert!(
        text.contains("shared ranges (demand against CPUs):"),
        "{text}"
    );
    assert!(
        text.contains(&format!("rebalanced {}", entry["domain"].as_str().unwrap())),
        "{text}"
    );
    let map = String::from_utf8(sb.pinner(&["status", "--map"]).stdout).unwrap();
    assert!(
        map.contains("demand ") && map.contains(" per pCPU"),
        "{map}"
    );
}
