//! How long a guest runs unpinned, what the hook costs `virsh start`, and
//! what the daemon costs at rest, on the sandboxed libvirtd with the real
//! hook and daemon (TCG guests). As root:
//!
//!     cargo build --release --workspace --bins && target/release/latency-bench [STARTS]
//!
//! Event-to-pinned latency is measured by the daemon: the hook stamps its
//! `started` event, the daemon notes when that guest's last pin is applied
//! and reports both in `pinner status` (per guest and as a summary). The
//! bench drives single starts (default 50) and bursts of 10 and 30
//! concurrent starts, and prints median, p99 and range.

use pinner_e2e::{median, online_cpus, sandbox_or_skip, wait_for, Sandbox};
use std::time::{Duration, Instant};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// (median, p99, min, max) of `values`.
fn spread(values: &mut [f64]) -> (f64, f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let pick = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    (pick(0.5), pick(0.99), values[0], values[values.len() - 1])
}

fn print_row(label: &str, values: &mut [f64]) {
    let (median, p99, min, max) = spread(values);
    println!(
        "{label:<44} {:>4} {median:>8.1} {p99:>8.1} {min:>8.1} {max:>8.1}",
        values.len()
    );
}

/// Waits until every guest in `names` is pinned as planned and has its
/// latency; returns those latencies (ms).
fn await_latencies(sb: &Sandbox, names: &[String]) -> Vec<f64> {
    wait_for(Duration::from_secs(30), || {
        // Each status makes the daemon read every guest from libvirt: ask
        // rarely, so the bench does not slow what it measures.
        std::thread::sleep(Duration::from_millis(200));
        let status = sb.status_json();
        let domains = status["domains"].as_array().cloned().unwrap_or_default();
        let mut latencies = Vec::new();
        for name in names {
            let d = domains
                .iter()
                .find(|d| d["name"] == name.as_str())
                .ok_or(format!("{name} not running"))?;
            match (d["in_sync"].as_bool(), d["pin_latency_ms"].as_f64()) {
                (Some(true), Some(latency)) => latencies.push(latency),
                _ => return Err(format!("{name} not pinned yet")),
            }
        }
        Ok(latencies)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sb.daemon_log()))
}

fn reconciles(sb: &Sandbox) -> u64 {
    sb.status_json()["counters"]["reconciles"]
        .as_u64()
        .unwrap_or(0)
}

/// Per-thread context switches and CPU ticks of `pid`, summed.
fn wakeups_and_ticks(pid: u32) -> (u64, u64) {
    let mut switches = 0;
    let mut ticks = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        for line in status.lines() {
            if let Some(v) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                switches += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime: fields 14 and 15 of proc(5), 11 and 12 here.
            ticks += fields
                .get(11)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            ticks += fields
                .get(12)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    (switches, ticks)
}

fn status_field(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

fn main() {
    let starts: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(50);
    let Some(mut sb) = sandbox_or_skip("latency-bench") else {
        std::process::exit(1);
    };
    let cpu = pinner_e2e::cpu_model();
    println!(
        "machine: {} online CPUs, {cpu}; TCG guests of 1 vCPU, 64 MiB",
        online_cpus().len()
    );
    sb.start_daemon("");
    let single = sb.define_guest("single", 1, "");

    // 1. virsh start with and without the hook (daemon up), interleaved.
    let hook = sb.hook_path();
    let parked = sb.dir.join("50-pinner.parked");
    let (mut with_hook, mut without_hook) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        with_hook.push(sb.start_guest("single"));
        sb.destroy_guest("single");
        std::fs::rename(&hook, &parked).unwrap();
        without_hook.push(sb.start_guest("single"));
        sb.destroy_guest("single");
        std::fs::rename(&parked, &hook).unwrap();
    }
    println!(
        "\n{:<44} {:>4} {:>8} {:>8} {:>8} {:>8}",
        "virsh start → running (ms)", "n", "median", "p99", "min", "max"
    );
    let (w, wo) = (
        median(&mut with_hook.clone()),
        median(&mut without_hook.clone()),
    );
    print_row(
        "with pinner-hook (daemon up)",
        &mut with_hook.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
    );
    print_row(
        "without a hook",
        &mut without_hook.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
    );
    println!(
        "ratio of medians: {:.3}",
        w.as_secs_f64() / wo.as_secs_f64()
    );

    // 2. Single starts: started event → last pin applied.
    println!(
        "\n{:<44} {:>4} {:>8} {:>8} {:>8} {:>8}",
        "started → pinned, by the daemon (ms)", "n", "median", "p99", "min", "max"
    );
    let mut singles = Vec::new();
    for _ in 0..starts {
        sb.start_guest("single");
        singles.extend(await_latencies(&sb, std::slice::from_ref(&single)));
        sb.destroy_guest("single");
    }
    print_row(&format!("single starts ({starts})"), &mut singles);

    // 3. Bursts: concurrent `virsh start`s, coalesced by the daemon.
    let burst_names: Vec<String> = (0..30)
        .map(|i| sb.define_guest(&format!("b{i}"), 1, ""))
        .collect();
    let mut burst_summary = Vec::new();
    for size in [10usize, 30] {
        let names = &burst_names[..size];
        let before = reconciles(&sb);
        let started = Instant::now();
        std::thread::scope(|scope| {
            for i in 0..size {
                let sb = &sb;
                scope.spawn(move || sb.start_guest(&format!("b{i}")));
            }
        });
        let all_started = started.elapsed();
        let mut latencies = await_latencies(&sb, names);
        let passes = reconciles(&sb) - before;
        print_row(
            &format!("burst of {size} concurrent starts"),
            &mut latencies,
        );
        burst_summary.push(format!(
            "burst of {size}: all started in {:.0} ms, {passes} reconciles for {size} started events",
            ms(all_started)
        ));
        for i in 0..size {
            sb.destroy_guest(&format!("b{i}"));
        }
    }
    for line in burst_summary {
        println!("{line}");
    }

    // 4. The daemon at rest: memory, and wakeups over 30 s with no events.
    let pid = sb.daemon_pid().expect("daemon running");
    let pss = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    println!(
        "\ndaemon memory after {} guest starts: VmRSS {} (its own, RssAnon {}; pages of shared libraries, RssFile {}), PSS {pss}, peak VmHWM {}",
        40 + starts + 40,
        status_field(pid, "VmRSS:"),
        status_field(pid, "RssAnon:"),
        status_field(pid, "RssFile:"),
        status_field(pid, "VmHWM:")
    );
    std::thread::sleep(Duration::from_secs(2));
    let (s0, t0) = wakeups_and_ticks(pid);
    let idle = Duration::from_secs(30);
    std::thread::sleep(idle);
    let (s1, t1) = wakeups_and_ticks(pid);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    println!(
        "daemon idle over {}s: {} wakeups ({:.2}/s; its reconcile timer is every 10 s), CPU {:.3}%",
        idle.as_secs(),
        s1 - s0,
        (s1 - s0) as f64 / idle.as_secs_f64(),
        (t1 - t0) as f64 / hz / idle.as_secs_f64() * 100.0
    );
    let _ = sb.stop_daemon();
}
