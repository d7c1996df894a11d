//! The daemon at node scale against a real libvirtd: a sandboxed libvirtd
//! with hundreds of paused TCG guests (2 vCPUs, 16 MiB each), the real
//! daemon and CLI. Per guest count it prints what an operator would see:
//!
//! - the first pass (daemon start: every guest read and placed anew),
//! - a steady pass (`pinner reconcile`, nothing changed), timed from the CLI,
//! - one guest added (its start → pinned, and the pass that did it),
//! - the pass after one pin moved by hand (libvirt's event → put back),
//! - `pinner status --json`, timed from the CLI,
//! - the libvirt calls of each pass, the /proc observation, and the
//!   daemon's RSS.
//!
//! `node-scale-bench [COUNTS]` (default 50 150 300; guests are added
//! between counts). Build with `--release` for figures worth quoting.

use pinner_e2e::{median, missing_requirement, online_cpus, wait_for, Sandbox};
use serde_json::Value;
use std::fs;
use std::time::{Duration, Instant};

fn main() {
    if let Some(reason) = missing_requirement() {
        eprintln!("node-scale-bench: {reason}");
        std::process::exit(1);
    }
    let counts: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("guest counts are numbers"))
        .collect();
    let counts = if counts.is_empty() {
        vec![50, 150, 300]
    } else {
        counts
    };
    let mut sb = Sandbox::start();
    // Only what the bench asks for runs: no periodic pass, no full re-read
    // on an interval, in the middle of a measurement.
    sb.reconcile_interval_secs = 3600;
    sb.extra_config = "full_read_interval_secs = 3600".into();
    println!(
        "guests | first pass ms (reads) | steady pass ms: CLI (daemon) | steady calls | added: pinned after ms (pass reads, calls) | hand-moved pin: pass ms (reads, calls) | status ms (guests with a qemu found) | /proc observation | RSS MiB"
    );
    let mut started = 0;
    for (stage, &count) in counts.iter().enumerate() {
        sb.stop_daemon();
        start_guests(&sb, started, count);
        started = count;
        // Every other stage reserves CPU 0: every guest's placement changes,
        // so the first pass places all of them, not only the new ones.
        sb.start_daemon(if stage % 2 == 0 { "" } else { "0" });
        let row = measure(&mut sb, count);
        println!("{row}");
    }
    sb.stop_daemon();
    // The sandbox destroys what is left one guest at a time; in parallel
    // it takes a fraction of that.
    for_each_guest(0, started, |short| {
        let name = sb.name(short);
        sb.virsh_ok(&["destroy", &name]);
        sb.virsh_ok(&["undefine", &name]);
    });
}

/// Runs `f` on the short names of guests `from..to`, four at a time.
fn for_each_guest(from: usize, to: usize, f: impl Fn(&str) + Sync) {
    let indexes: Vec<usize> = (from..to).collect();
    for chunk in indexes.chunks(4) {
        std::thread::scope(|scope| {
            for &i in chunk {
                let f = &f;
                scope.spawn(move || f(&format!("n{i}")));
            }
        });
    }
}

/// 2 vCPUs, 16 MiB: as small as qemu starts, so hundreds fit.
fn define(sb: &Sandbox, short: &str) -> String {
    let name = sb.name(short);
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>16</memory>\
         <vcpu>2</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>\
         <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>\
         <memballoon model='none'/></devices></domain>"
    );
    let path = sb.dir.join(format!("{short}.xml"));
    fs::write(&path, xml).unwrap();
    sb.virsh_ok(&["define", path.to_str().unwrap()]);
    name
}

/// Defines and starts (paused) guests `from..to`, four at a time.
fn start_guests(sb: &Sandbox, from: usize, to: usize) {
    let began = Instant::now();
    for_each_guest(from, to, |short| {
        let name = define(sb, short);
        sb.virsh_ok(&["start", "--paused", &name]);
    });
    eprintln!(
        "started guests {from}..{to} in {:.0} s",
        began.elapsed().as_secs_f64()
    );
}

/// What a `pinner reconcile --json` (or a status's `last_pass`) reports.
struct Pass {
    ms: f64,
    read: u64,
    calls: u64,
}

impl Pass {
    fn of(report: &Value) -> Pass {
        Pass {
            ms: report["seconds"].as_f64().unwrap_or(0.0) * 1e3,
            read: report["domains_read"].as_u64().unwrap_or(0),
            calls: report["libvirt_calls"].as_u64().unwrap_or(0),
        }
    }
}

fn last_pass(sb: &Sandbox) -> Pass {
    Pass::of(&sb.status_json()["last_pass"])
}

fn settled(sb: &Sandbox, count: usize) -> Value {
    wait_for(Duration::from_secs(120), || {
        let status = sb.all_in_sync()?;
        let listed = status["domains"].as_array().map_or(0, Vec::len);
        if listed == count {
            Ok(status)
        } else {
            Err(format!("{listed} of {count} guests listed"))
        }
    })
    .unwrap_or_else(|e| panic!("not settled: {e}\n{}", sb.daemon_log()))
}

/// Runs the CLI as an operator would: how long it took, what it printed.
fn timed_pinner(sb: &Sandbox, args: &[&str]) -> (Duration, Vec<u8>) {
    let t = Instant::now();
    let out = sb.pinner(args);
    (t.elapsed(), out.stdout)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn measure(sb: &mut Sandbox, count: usize) -> String {
    let began = Instant::now();
    settled(sb, count);
    eprintln!("  settled after {:.1} s", began.elapsed().as_secs_f64());
    let first = last_pass(sb);
    // pinner's own changes are read back once; then nothing changes.
    sb.pinner(&["reconcile"]);
    let mut steady_times = Vec::new();
    let mut steady = Pass::of(&Value::Null);
    for _ in 0..5 {
        let (took, out) = timed_pinner(sb, &["reconcile", "--json"]);
        steady_times.push(took);
        steady = Pass::of(&serde_json::from_slice(&out).expect("reconcile JSON"));
    }
    eprintln!(
        "  steady passes done at {:.1} s",
        began.elapsed().as_secs_f64()
    );
    let (added_ms, added) = add_one(sb, count);
    eprintln!("  one added at {:.1} s", began.elapsed().as_secs_f64());
    let hand = move_one_pin(sb);
    eprintln!("  hand-moved pin at {:.1} s", began.elapsed().as_secs_f64());
    let mut status_times: Vec<Duration> = (0..5)
        .map(|_| timed_pinner(sb, &["status", "--json"]).0)
        .collect();
    let sampled = sb.status_json()["domains"]
        .as_array()
        .map_or(0, |d| d.iter().filter(|d| d["qemu_pid"].is_u64()).count());
    format!(
        "{count} | {:.0} ({}) | {:.1} ({:.1}) | {} | {:.1} ({}, {}) | {:.1} ({}, {}) | {:.1} ({sampled}) | {} | {:.1}",
        first.ms,
        first.read,
        ms(median(&mut steady_times)),
        steady.ms,
        steady.calls,
        added_ms,
        added.read,
        added.calls,
        hand.ms,
        hand.read,
        hand.calls,
        ms(median(&mut status_times)),
        observation(sb),
        rss_mib(sb),
    )
}

/// Starts one more guest: its start-to-pinned latency (the daemon's
/// figure), and the pass that pinned it. The guest is destroyed after.
fn add_one(sb: &Sandbox, count: usize) -> (f64, Pass) {
    let name = define(sb, "added");
    sb.virsh_ok(&["start", "--paused", &name]);
    let status = settled(sb, count + 1);
    let latency = status["domains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name.as_str())
        .and_then(|d| d["pin_latency_ms"].as_f64())
        .unwrap_or(f64::NAN);
    let pass = Pass::of(&status["last_pass"]);
    sb.virsh_ok(&["destroy", &name]);
    sb.virsh_ok(&["undefine", &name]);
    settled(sb, count);
    (latency, pass)
}

/// Moves one vCPU pin by hand: libvirt's event brings a pass that puts it
/// back; that pass.
fn move_one_pin(sb: &Sandbox) -> Pass {
    let guest = "n0";
    let before = sb.vcpu_pins(guest);
    let elsewhere = online_cpus()
        .iter()
        .find(|c| before[0] != [**c])
        .copied()
        .unwrap_or(0);
    let passes = sb.status_json()["counters"]["reconciles"].as_u64().unwrap();
    sb.virsh_ok(&[
        "vcpupin",
        &sb.name(guest),
        "0",
        &elsewhere.to_string(),
        "--live",
    ]);
    sb.await_pins(
        guest,
        Duration::from_secs(10),
        "hand-moved pin put back",
        |p| p == before,
    );
    wait_for(Duration::from_secs(5), || {
        let status = sb.status_json();
        let now = status["counters"]["reconciles"].as_u64().unwrap();
        if now > passes {
            Ok(Pass::of(&status["last_pass"]))
        } else {
            Err("no pass yet".to_string())
        }
    })
    .unwrap()
}

/// The daemon's last observation of every guest from /proc, as it logged
/// it: "12.3 ms (2 slices)".
fn observation(sb: &Sandbox) -> String {
    sb.daemon_log()
        .lines()
        .rev()
        .find_map(|l| Some(l.split("guests from /proc in ").nth(1)?.to_string()))
        .unwrap_or_else(|| "-".into())
}

fn rss_mib(sb: &Sandbox) -> f64 {
    let pid = sb.daemon_pid().expect("daemon running");
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}
