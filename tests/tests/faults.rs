//! Faults and bursts on the sandboxed libvirtd: concurrent starts, the
//! daemon killed mid-apply, guests vanishing under it, libvirtd killed with
//! events queued, and changes no hook announces (vCPU hot-add, pins moved by
//! hand). Results are read back from libvirt and the daemon's status.

use pinner_e2e::{bin_dir, online_cpus, sandbox_or_skip, serial, wait_for, Sandbox};
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

/// Per-guest policy metadata, as an operator (or nova's flavor tooling)
/// would put it in the domain XML.
fn policy(policy: &str) -> String {
    format!(
        "<metadata><pinner:state xmlns:pinner=\"urn:pinner:1\" policy=\"{policy}\"/></metadata>"
    )
}

fn counter(sb: &Sandbox, name: &str) -> u64 {
    sb.status_json()["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name}"))
}

/// Wraps the sandbox's hook in a script that appends each run's op and
/// duration (ns) to `hook-times`, so what libvirt waits for is measured.
fn time_the_hook(sb: &Sandbox) -> std::path::PathBuf {
    let hook = sb.hook_path();
    let real = hook.with_file_name("../pinner-hook.real");
    fs::rename(&hook, &real).unwrap();
    let times = hook.with_file_name("../hook-times");
    fs::write(
        &hook,
        format!(
            "#!/bin/sh\nexec {} {} {} \"$@\"\n",
            bin_dir().join("hook-timer").display(),
            times.display(),
            real.display(),
        ),
    )
    .unwrap();
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
    times
}

/// One hook run as `hook-timer` logged it.
struct HookRun {
    op: String,
    wall_ns: u64,
    /// Run-queue waits: the hook's, and the timer's own wake-up after it.
    queue_ns: u64,
}

impl HookRun {
    /// What the hook itself spent, running or blocked.
    fn own_ns(&self) -> u64 {
        self.wall_ns.saturating_sub(self.queue_ns)
    }
}

fn hook_runs(log: &std::path::Path) -> Vec<HookRun> {
    fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let op = fields.next()?.to_string();
            let mut ns = || fields.next()?.parse::<u64>().ok();
            let (wall_ns, hook_queue, own_queue) = (ns()?, ns()?, ns()?);
            Some(HookRun {
                op,
                wall_ns,
                queue_ns: hook_queue + own_queue,
            })
        })
        .collect()
}

/// 30 concurrent `virsh start`s: every start succeeds, the hook stays within
/// its 100 ms budget (its wall time less its run-queue wait, as `hook-timer`
/// reads them: one CI run saw a 165 ms wall time that was the scheduler's),
/// all guests are pinned within 5 s of the last start,
/// the dedicated guest's CPU is nobody else's, and the events share passes.
/// The guests start paused: 30 TCG guests emulating their firmware would
/// saturate this machine's 2 CPUs (KVM guests do not), and a process that
/// needs a few ms of CPU then waits 100+ ms for it, whatever it is. The
/// latency bench runs the same burst with running guests.
#[test]
fn burst_of_30_concurrent_starts() {
    let _serial = serial();
    let Some(mut sb) = sandbox_or_skip("burst_of_30_concurrent_starts") else {
        return;
    };
    let hook_times = time_the_hook(&sb);
    sb.start_daemon("");
    sb.define_guest("ded", 1, &policy("dedicated"));
    let shared: Vec<String> = (0..29).map(|i| format!("s{i}")).collect();
    for g in &shared {
        sb.define_guest(g, 1, "");
    }
    let events_before = counter(&sb, "events_received");
    let passes_before = counter(&sb, "event_passes");

    let failures: Vec<String> = std::thread::scope(|scope| {
        let starts: Vec<_> = std::iter::once("ded")
            .chain(shared.iter().map(String::as_str))
            .map(|g| {
                let sb = &sb;
                scope.spawn(move || {
                    let out = sb.virsh(&["start", "--paused", &sb.name(g)]);
                    (!out.status.success())
                        .then(|| format!("{g}: {}", String::from_utf8_lossy(&out.stderr)))
                })
            })
            .collect();
        starts
            .into_iter()
            .filter_map(|s| s.join().unwrap())
            .collect()
    });
    let last_start = Instant::now();
    assert!(failures.is_empty(), "starts failed: {failures:?}");

    let status = wait_for(Duration::from_secs(5), || {
        let status = sb.all_in_sync()?;
        let guests = status["domains"].as_array().map_or(0, Vec::len);
        if guests == 30 {
            Ok(status)
        } else {
            Err(format!("{guests} guests in status"))
        }
    })
    .unwrap_or_else(|e| panic!("not all pinned within 5 s of the last start: {e}"));
    let settled_after = last_start.elapsed();

    let pool: BTreeSet<u32> = online_cpus().into_iter().collect();
    let dedicated = sb.vcpu_pins("ded").concat();
    assert_eq!(dedicated.len(), 1, "one CPU of its own: {dedicated:?}");
    for g in &shared {
        let pins = sb.vcpu_pins(g).concat();
        assert!(!pins.is_empty(), "{g} unpinned");
        assert!(pins.iter().all(|c| pool.contains(c)), "{g}: {pins:?}");
        assert!(
            !pins.contains(&dedicated[0]),
            "{g} shares the dedicated CPU {}: {pins:?}",
            dedicated[0]
        );
    }
    assert_eq!(status["mode"], "mixed", "{status}");

    let runs = hook_runs(&hook_times);
    // prepare, start and started for each guest.
    assert!(runs.len() >= 30 * 3, "hook runs: {}", runs.len());
    let slowest = runs.iter().max_by_key(|r| r.own_ns()).unwrap();
    assert!(
        slowest.own_ns() < 100_000_000,
        "the hook took {:.1} ms on {} apart from {:.1} ms waiting for a CPU (budget 100 ms)",
        slowest.own_ns() as f64 / 1e6,
        slowest.op,
        slowest.queue_ns as f64 / 1e6,
    );
    let longest_wall = runs.iter().map(|r| r.wall_ns).max().unwrap_or(0);

    let events = counter(&sb, "events_received") - events_before;
    let passes = counter(&sb, "event_passes") - passes_before;
    assert!(events >= 30 * 3, "hook events: {events}");
    assert!(
        passes * 3 <= 30,
        "{passes} passes for 30 concurrent starts: not coalesced"
    );
    eprintln!(
        "burst of 30: settled {settled_after:?} after the last start; {passes} passes for {events} hook events; slowest hook {:.1} ms ({}) besides waiting for a CPU; longest wall time {:.1} ms",
        slowest.own_ns() as f64 / 1e6,
        slowest.op,
        longest_wall as f64 / 1e6
    );
}

/// A pin moved by hand is put back at once, through libvirt's own event:
/// the reconcile interval (60 s) is too long to be what catches it.
#[test]
fn pin_moved_by_hand_is_corrected_by_libvirts_event() {
    let _serial = serial();
    let Some(mut sb) = sandbox_or_skip("pin_moved_by_hand_is_corrected_by_libvirts_event") else {
        return;
    };
    let online = online_cpus();
    let (reserved, pool) = (online[online.len() - 2], online[online.len() - 1]);
    sb.reconcile_interval_secs = 60;
    sb.start_daemon(&reserved.to_string());
    sb.define_guest("g", 1, "");
    sb.start_guest("g");
    wait_for(Duration::from_secs(5), || sb.all_in_sync()).unwrap();
    assert_eq!(sb.vcpu_pins("g"), vec![vec![pool]]);
    let reconciles = counter(&sb, "reconciles");
    let full_reads = counter(&sb, "full_reads");

    sb.virsh_ok(&[
        "vcpupin",
        &sb.name("g"),
        "0",
        &reserved.to_string(),
        "--live",
    ]);
    let moved = Instant::now();
    sb.await_pins(
        "g",
        Duration::from_secs(3),
        "hand-made pin corrected through the tunable event",
        |pins| pins == [vec![pool]],
    );
    let corrected_in = moved.elapsed();
    assert_eq!(counter(&sb, "outside_pin_changes"), 1);
    // pinner's own correction echoes back as an event too; it is not taken
    // for another outside change.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(counter(&sb, "outside_pin_changes"), 1);
    assert!(counter(&sb, "reconciles") > reconciles);
    assert_eq!(
        counter(&sb, "full_reads"),
        full_reads,
        "caught by the event: no full re-read ran"
    );
    assert_eq!(counter(&sb, "changes_found_by_full_read"), 0);
    sb.await_log("pins changed outside pinner: cputune.vcpupin0=");
    eprintln!("hand-made pin corrected in {corrected_in:?}");
}

/// `virsh setvcpus --live` has no hook and no libvirt event: passes that
/// read only what changed do not see it, the full re-read pins the new
/// vCPU within its interval, and says it found a change no event announced.
#[test]
fn hot_added_vcpu_is_pinned_by_the_full_reread() {
    let _serial = serial();
    let Some(mut sb) = sandbox_or_skip("hot_added_vcpu_is_pinned_by_the_full_reread") else {
        return;
    };
    sb.reconcile_interval_secs = 1;
    sb.extra_config = "full_read_interval_secs = 4".into();
    sb.start_daemon("");
    let name = sb.define_guest("hot", 2, "");
    let xml = sb.virsh_ok(&["dumpxml", &name]).replace(
        "<vcpu placement='static'>2</vcpu>",
        "<vcpu placement='static' current='1'>2</vcpu>",
    );
    assert!(xml.contains("current='1'"), "{xml}");
    let path = std::env::temp_dir().join(format!("{name}.xml"));
    fs::write(&path, xml).unwrap();
    sb.virsh_ok(&["define", path.to_str().unwrap()]);
    let _ = fs::remove_file(&path);
    sb.start_guest("hot");
    wait_for(Duration::from_secs(5), || sb.all_in_sync()).unwrap();
    let before = sb.status_json();
    let guest = &before["domains"][0];
    assert_eq!(guest["vcpus"].as_array().map(Vec::len), Some(1), "{guest}");

    sb.virsh_ok(&["setvcpus", &name, "2", "--live"]);
    let added = Instant::now();
    let found_before = counter(&sb, "changes_found_by_full_read");
    let status = wait_for(Duration::from_secs(8), || {
        let status = sb.all_in_sync()?;
        let vcpus = status["domains"][0]["vcpus"].as_array().map_or(0, Vec::len);
        if vcpus == 2 {
            Ok(status)
        } else {
            Err(format!("{vcpus} vCPUs in status"))
        }
    })
    .unwrap();
    let pins = sb.vcpu_pins("hot");
    assert_eq!(pins.len(), 2, "{pins:?}");
    let planned: Vec<Vec<u32>> = status["domains"][0]["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| serde_json::from_value(v["planned"].clone()).unwrap())
        .collect();
    assert_eq!(pins, planned, "both vCPUs pinned as planned");
    let counters = &status["counters"];
    assert_eq!(
        counters["changes_found_by_full_read"].as_u64(),
        Some(found_before + 1),
        "caught by the full re-read: {counters}"
    );
    sb.await_log("full re-read: the guest changed with no event announcing it");
    eprintln!("hot-added vCPU pinned {:?} after setvcpus", added.elapsed());
}

/// Defines and starts, with no daemon running, one dedicated guest and
/// `shared` guests of automatic policy: all unpinned, waiting for a daemon.
fn unpinned_guests(sb: &Sandbox, shared: usize) -> Vec<String> {
    sb.define_guest("ded", 1, &policy("dedicated"));
    sb.start_guest("ded");
    let mut guests = vec!["ded".to_string()];
    for i in 0..shared {
        let g = format!("s{i}");
        sb.define_guest(&g, 1, "");
        sb.start_guest(&g);
        guests.push(g);
    }
    guests
}

/// Waits until the daemon's log says it applied its first vCPU pin.
fn await_first_pin(sb: &Sandbox) {
    wait_for(Duration::from_secs(10), || {
        if sb.daemon_log().contains("pinned vCPU") {
            Ok(())
        } else {
            Err("no pin applied yet".to_string())
        }
    })
    .unwrap();
}

/// Waits until all `count` guests are in the daemon's status, all in sync.
fn await_settled(sb: &Sandbox, count: usize, timeout: Duration) -> serde_json::Value {
    wait_for(timeout, || {
        let status = sb.all_in_sync()?;
        let guests = status["domains"].as_array().map_or(0, Vec::len);
        if guests == count {
            Ok(status)
        } else {
            Err(format!("{guests} guests in status, expected {count}"))
        }
    })
    .unwrap()
}

/// The dedicated guest's CPU, checked to be nobody else's.
fn assert_dedicated_cpu_unique(sb: &Sandbox, guests: &[String]) -> u32 {
    let dedicated = sb.vcpu_pins("ded").concat();
    assert_eq!(dedicated.len(), 1, "ded: {dedicated:?}");
    for g in guests.iter().filter(|g| *g != "ded") {
        let pins = sb.vcpu_pins(g).concat();
        assert!(
            !pins.contains(&dedicated[0]),
            "{g} pinned onto the dedicated guest's CPU {}: {pins:?}",
            dedicated[0]
        );
    }
    dedicated[0]
}

/// `kill -9` of the daemon in the middle of applying a plan: the next
/// daemon converges, and no guest keeps a pin onto the dedicated guest's CPU.
#[test]
fn daemon_killed_mid_apply_converges_after_restart() {
    let _serial = serial();
    let Some(mut sb) = sandbox_or_skip("daemon_killed_mid_apply_converges_after_restart") else {
        return;
    };
    let guests = unpinned_guests(&sb, 10);
    sb.start_daemon("");
    await_first_pin(&sb);
    sb.kill_daemon();
    let marked = guests.iter().filter(|g| sb.metadata(g).is_some()).count();
    assert!(
        marked > 0 && marked < guests.len(),
        "killed mid-apply: {marked} of {} guests marked",
        guests.len()
    );

    sb.start_daemon("");
    let status = await_settled(&sb, guests.len(), Duration::from_secs(5));
    assert_eq!(status["mode"], "mixed", "{status}");
    // Whatever happened while no daemon ran, the new one read every guest.
    assert_eq!(status["counters"]["full_reads"], 1, "{status}");
    assert_dedicated_cpu_unique(&sb, &guests);
    eprintln!(
        "killed with {marked} of {} guests marked; converged",
        guests.len()
    );
}

/// Guests destroyed while the daemon applies their pins are dropped
/// cleanly: no errors counted or logged, no stale guests in the status.
#[test]
fn guests_stopping_mid_apply_are_dropped_cleanly() {
    let _serial = serial();
    let Some(mut sb) = sandbox_or_skip("guests_stopping_mid_apply_are_dropped_cleanly") else {
        return;
    };
    let guests = unpinned_guests(&sb, 10);
    sb.start_daemon("");
    await_first_pin(&sb);
    let doomed: Vec<&String> = guests.iter().rev().take(5).collect();
    std::thread::scope(|scope| {
        for g in &doomed {
            let sb = &sb;
            scope.spawn(move || sb.destroy_guest(g));
        }
    });
    let status = await_settled(&sb, guests.len() - doomed.len(), Duration::from_secs(5));
    let listed: Vec<&str> = status["domains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    for g in &doomed {
        assert!(!listed.contains(&sb.name(g).as_str()), "{g} still listed");
    }
    assert_eq!(status["counters"]["apply_errors"], 0, "{status}");
    let log = sb.daemon_log();
    let noisy: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("warning:") || l.contains("error:"))
        // The plan's own warning: 10 guests share one CPU by design here.
        .filter(|l| !l.contains("overcommitted"))
        .collect();
    assert!(noisy.is_empty(), "warnings or errors logged: {noisy:#?}");
    assert_dedicated_cpu_unique(&sb, &guests[..guests.len() - doomed.len()]);
}

/// A restarted daemon recovers the placement from libvirt and keeps it:
/// same pins, same memory binding, nothing applied.
#[test]
fn daemon_restart_keeps_every_pin() {
    let _serial = serial();
    let Some(mut sb) = sandbox_or_skip("daemon_restart_keeps_every_pin") else {
        return;
    };
    sb.start_daemon("");
    let mut guests = vec!["ded".to_string()];
    sb.define_guest("ded", 1, &policy("dedicated"));
    sb.start_guest("ded");
    for g in ["a", "b", "c"] {
        sb.define_guest(g, 1, "");
        sb.start_guest(g);
        guests.push(g.to_string());
    }
    await_settled(&sb, guests.len(), Duration::from_secs(5));
    // Per guest: vCPU pins, emulator pin, memory nodes, as text.
    let placement = |sb: &Sandbox| -> Vec<String> {
        guests
            .iter()
            .map(|g| {
                format!(
                    "{g}: {:?} {:?} {:?}",
                    sb.vcpu_pins(g),
                    sb.emulator_pin(g),
                    sb.memory_nodes(g)
                )
            })
            .collect()
    };
    let before = placement(&sb);

    assert!(sb.stop_daemon().is_some_and(|s| s.success()));
    sb.start_daemon("");
    let status = await_settled(&sb, guests.len(), Duration::from_secs(5));
    assert_eq!(placement(&sb), before, "placement after the restart");
    assert_eq!(status["counters"]["pins_applied"], 0, "{status}");
    assert!(status["counters"]["reconciles"].as_u64().unwrap() >= 1);
}

/// libvirtd killed while the daemon has events queued that it has not
/// served: the daemon reports the outage once, reconnects with backoff
/// when libvirtd is back, and pins the guests those events were about.
#[test]
fn libvirtd_killed_with_events_queued() {
    let _serial = serial();
    let Some(mut sb) = sandbox_or_skip("libvirtd_killed_with_events_queued") else {
        return;
    };
    sb.start_daemon("");
    // Two guests: one CPU each (dedicated mode), as the placement says.
    let guests = ["q0", "q1"];
    for g in guests {
        sb.define_guest(g, 1, "");
    }
    // A stopped daemon still takes the hook's connections (the listen
    // backlog): the events wait, unserved.
    sb.signal_daemon(libc::SIGSTOP);
    for g in guests {
        sb.start_guest(g);
    }
    sb.kill_libvirtd();
    sb.signal_daemon(libc::SIGCONT);
    std::thread::sleep(Duration::from_secs(2));
    for g in guests {
        let domain = format!("DOMAIN=\"{}\"", sb.name(g));
        assert!(
            !sb.daemon_log()
                .lines()
                .any(|l| l.contains("pinned vCPU") && l.contains(&domain)),
            "{g} pinned while libvirtd was down?"
        );
    }

    sb.start_libvirtd();
    let back = Instant::now();
    let status = await_settled(&sb, guests.len(), Duration::from_secs(10));
    let settled_in = back.elapsed();
    assert!(status["counters"]["events_received"].as_u64().unwrap() >= 6);
    assert!(status["counters"]["libvirt_reconnects"].as_u64().unwrap() >= 1);
    // Events were lost with the connection: the pass after it read every
    // guest (the first connection's full read, and the reconnect's).
    assert!(
        status["counters"]["full_reads"].as_u64().unwrap() >= 2,
        "{status}"
    );
    assert_eq!(status["mode"], "dedicated", "{status}");
    let (a, b) = (sb.vcpu_pins("q0").concat(), sb.vcpu_pins("q1").concat());
    assert!(a.len() == 1 && b.len() == 1 && a != b, "q0 {a:?}, q1 {b:?}");
    let log = sb.daemon_log();
    let outage_warnings = log
        .lines()
        .filter(|l| l.contains("warning: cannot reach libvirt"))
        .count();
    assert_eq!(outage_warnings, 1, "the outage is logged once:\n{log}");
    eprintln!("libvirtd back → all pinned in {settled_in:?}");
}
