//! What pinner does for a busy guest, measured on the sandboxed libvirtd.
//! As root:
//!
//!     cargo build --release --workspace --bins && target/release/effect-bench [ROUNDS] [SECONDS] [BURNERS]
//!
//! Guest A's vCPU runs flat out (TCG executing a boot sector that spins),
//! so does its neighbour B's, and BURNERS (default 4) CPU burners play the
//! host's daemons, in the bench's own process group. Two conditions,
//! interleaved over ROUNDS (default 3) of SECONDS (default 30) each:
//!
//! - floating: no pinner; every thread may run anywhere;
//! - pinner: the daemon with the first CPU reserved for housekeeping,
//!   isolation confined to the bench's burners, A `dedicated`.
//!
//! Measured for A's vCPU thread every second from its schedstat: the share
//! of the second it ran, and the share it waited runnable in the run queue
//! (what the guest sees as steal); with pinner, cross-checked against
//! `pinner status`'s steal for A.

use pinner_e2e::{
    allowed_cpus, cpu_list, online_cpus, reserve_all_but, sandbox_or_skip, wait_for, Sandbox,
};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SCOPE_ENV: &str = "PINNER_TEST_ONLY_PROCESS_GROUP";

#[derive(Clone, Copy, PartialEq)]
enum Condition {
    Floating,
    Pinner,
}

impl Condition {
    fn name(self) -> &'static str {
        match self {
            Condition::Floating => "floating",
            Condition::Pinner => "pinner",
        }
    }
}

/// One condition's run: A's per-second run and wait shares, B's run share,
/// and the steal `pinner status` reported for A (pinner only).
struct Run {
    condition: Condition,
    a_ran: Vec<f64>,
    a_waited: Vec<f64>,
    /// None: no neighbour in this setup.
    b_ran: Option<f64>,
    status_steal: Option<f64>,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("burn") {
        burn();
    }
    let number =
        |i: usize, default: u64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (rounds, seconds, burners) = (number(1, 3), number(2, 30), number(3, 4));
    let Some(mut sb) = sandbox_or_skip("effect-bench") else {
        std::process::exit(1);
    };
    let reserved = reserve_all_but(online_cpus().len() - 1);
    let burners = Burners::start(burners as usize);
    define_guests(&sb);
    sb.extra_config = "[isolation]\nenabled = true\nrestore_on_exit = true\n\
        group = \"pinner-effect-bench\"\npid_dirs = []\nsweep_interval_secs = 1\n"
        .to_string();
    sb.daemon_env = vec![(SCOPE_ENV.into(), burners.groups())];
    for neighbour in [true, false] {
        let runs = rounds_of(&mut sb, neighbour, &reserved, &burners, (rounds, seconds));
        let setup = if neighbour {
            "A with a busy neighbour B"
        } else {
            "A alone"
        };
        summary(&runs, setup, burners.children.len(), seconds);
    }
}

/// `rounds` of both conditions, interleaved, the order alternating so drift
/// hits both alike.
fn rounds_of(
    sb: &mut Sandbox,
    neighbour: bool,
    reserved: &str,
    burners: &Burners,
    (rounds, seconds): (u64, u64),
) -> Vec<Run> {
    let mut runs = Vec::new();
    for round in 0..rounds {
        let mut order = [Condition::Floating, Condition::Pinner];
        if round % 2 == 1 {
            order.reverse();
        }
        for condition in order {
            let run = measure(sb, condition, neighbour, reserved, burners, seconds);
            report_run(round, &run);
            runs.push(run);
        }
    }
    runs
}

fn burn() -> ! {
    let mut x = 0u64;
    loop {
        x = std::hint::black_box(x.wrapping_add(1));
    }
}

/// The host's "daemons": CPU burners, each in a session (and so a process
/// group and a scheduler autogroup) of its own, as daemonized services
/// are. Isolation is scoped to exactly their process groups.
struct Burners {
    children: Vec<Child>,
}

impl Burners {
    fn start(count: usize) -> Burners {
        let me = std::env::current_exe().unwrap();
        let spawn = || {
            let mut cmd = Command::new(&me);
            cmd.arg("burn").stdin(Stdio::null());
            // SAFETY: setsid(2) is async-signal-safe; nothing else runs
            // between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    libc::setsid();
                    Ok(())
                });
            }
            cmd.spawn().expect("spawn a burner")
        };
        Burners {
            children: (0..count).map(|_| spawn()).collect(),
        }
    }

    /// Their process groups, for the isolation scope.
    fn groups(&self) -> String {
        let ids: Vec<String> = self.children.iter().map(|c| c.id().to_string()).collect();
        ids.join(",")
    }

    fn confined_to(&self, cpus: &[u32]) -> bool {
        self.children
            .iter()
            .all(|c| allowed_cpus(format!("/proc/{}/status", c.id())).as_deref() == Some(cpus))
    }
}

impl Drop for Burners {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn define_guests(sb: &Sandbox) {
    for (short, extra) in [
        ("a", "<metadata><pinner:state xmlns:pinner=\"urn:pinner:1\" policy=\"dedicated\"/></metadata>"),
        ("b", ""),
    ] {
        let disk = format!(
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/>\
             <target dev='hda' bus='ide'/></disk>",
            sb.disk_image(short, true).display()
        );
        sb.define_guest_with_devices(short, 1, extra, &disk);
    }
}

fn measure(
    sb: &mut Sandbox,
    condition: Condition,
    neighbour: bool,
    reserved: &str,
    burners: &Burners,
    seconds: u64,
) -> Run {
    let reserved_cpus = cpu_list(reserved);
    if condition == Condition::Pinner {
        sb.start_daemon(reserved);
    }
    sb.start_guest("a");
    if neighbour {
        sb.start_guest("b");
    }
    if condition == Condition::Pinner {
        let pool: Vec<u32> = online_cpus()
            .into_iter()
            .filter(|c| !reserved_cpus.contains(c))
            .collect();
        sb.await_pins("a", Duration::from_secs(10), "A dedicated", |p| {
            p.len() == 1 && p[0].len() == 1
        });
        wait_for(Duration::from_secs(10), || {
            burners
                .confined_to(&reserved_cpus)
                .then_some(())
                .ok_or_else(|| "burners not confined yet".to_string())
        })
        .unwrap();
        assert!(pool.contains(&sb.vcpu_pins("a")[0][0]));
    } else {
        assert!(
            !burners.confined_to(&reserved_cpus),
            "burners still confined"
        );
    }
    // Let both guests reach their spinning boot sector.
    std::thread::sleep(Duration::from_secs(3));
    let a = vcpu_thread(sb, "a");
    let b = neighbour.then(|| vcpu_thread(sb, "b"));
    let b_before = b.map(schedstat);
    let (a_ran, a_waited) = sample(a, seconds);
    let b_ran = b
        .zip(b_before)
        .map(|(b, before)| share(schedstat(b).0 - before.0, Duration::from_secs(seconds)));
    let status_steal = (condition == Condition::Pinner).then(|| {
        let status = sb.status_json();
        let name = sb.name("a");
        let domain = status["domains"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == name.as_str())
            .cloned();
        domain
            .and_then(|d| d["steal_pct"].as_f64())
            .unwrap_or(f64::NAN)
    });
    sb.destroy_guest("a");
    if neighbour {
        sb.destroy_guest("b");
    }
    if condition == Condition::Pinner {
        assert!(sb.stop_daemon().is_some_and(|s| s.success()));
    }
    Run {
        condition,
        a_ran,
        a_waited,
        b_ran,
        status_steal,
    }
}

/// The guest's vCPU 0 thread, from its vCPU cgroup (libvirt makes one
/// with or without pinner).
fn vcpu_thread(sb: &Sandbox, short: &str) -> u32 {
    sb.cgroup_file(short, "vcpu0/tasks")
        .lines()
        .next()
        .and_then(|t| t.trim().parse().ok())
        .expect("a vCPU thread")
}

/// Run and run-queue wait of a thread so far (ns), from its schedstat.
fn schedstat(tid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{tid}/schedstat")).unwrap_or_default();
    let mut fields = text.split_whitespace().map(|f| f.parse().unwrap_or(0));
    (fields.next().unwrap_or(0), fields.next().unwrap_or(0))
}

fn share(ns: u64, over: Duration) -> f64 {
    ns as f64 / over.as_nanos() as f64
}

/// Per-second run and wait shares of `tid` over `seconds`.
fn sample(tid: u32, seconds: u64) -> (Vec<f64>, Vec<f64>) {
    let (mut ran, mut waited) = (Vec::new(), Vec::new());
    let (mut last, mut at) = (schedstat(tid), Instant::now());
    for _ in 0..seconds {
        std::thread::sleep(Duration::from_secs(1));
        let (now, now_at) = (schedstat(tid), Instant::now());
        let span = now_at - at;
        ran.push(share(now.0 - last.0, span));
        waited.push(share(now.1 - last.1, span));
        (last, at) = (now, now_at);
    }
    (ran, waited)
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

fn range(values: &[f64]) -> (f64, f64) {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn report_run(round: u64, run: &Run) {
    let (lo, hi) = range(&run.a_ran);
    let steal = run
        .status_steal
        .map_or_else(|| "-".into(), |s| format!("{s:.1}%"));
    println!(
        "round {} {:<9} A ran {} (per second {}–{}), waited {}; B ran {}; pinner status steal for A {steal}",
        round + 1,
        run.condition.name(),
        pct(mean(&run.a_ran)),
        pct(lo),
        pct(hi),
        pct(mean(&run.a_waited)),
        run.b_ran.map_or_else(|| "-".into(), pct),
    );
}

fn summary(runs: &[Run], setup: &str, burners: usize, seconds: u64) {
    let cpus = online_cpus().len();
    println!(
        "\n{setup}: {cpus} CPUs, {burners} burners, {} rounds of {seconds} s (mean [range over rounds]):",
        runs.len() / 2
    );
    println!("| condition | A's vCPU ran | A waited in the run queue (steal) | B ran | `pinner status` steal for A |");
    println!("| --- | --- | --- | --- | --- |");
    for condition in [Condition::Floating, Condition::Pinner] {
        let mine: Vec<&Run> = runs.iter().filter(|r| r.condition == condition).collect();
        let ran: Vec<f64> = mine.iter().map(|r| mean(&r.a_ran)).collect();
        let waited: Vec<f64> = mine.iter().map(|r| mean(&r.a_waited)).collect();
        let b: Vec<f64> = mine.iter().filter_map(|r| r.b_ran).collect();
        let steal: Vec<f64> = mine.iter().filter_map(|r| r.status_steal).collect();
        println!(
            "| {} | {} | {} | {} | {} |",
            condition.name(),
            spread(&ran),
            spread(&waited),
            spread(&b),
            spread_of_percent(&steal)
        );
    }
}

/// `mean [min–max]` of shares, or `-` for none.
fn spread(values: &[f64]) -> String {
    if values.is_empty() {
        return "-".into();
    }
    let (lo, hi) = range(values);
    format!("{} [{}–{}]", pct(mean(values)), pct(lo), pct(hi))
}

fn spread_of_percent(values: &[f64]) -> String {
    let shares: Vec<f64> = values.iter().map(|v| v / 100.0).collect();
    spread(&shares)
}
