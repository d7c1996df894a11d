//! Measures what `pinner-hook` costs libvirt per event: its release binary
//! size, and start-to-exit wall time (spawn, XML on stdin, wait) against a
//! compiled `exit 0` (/bin/true) and a typical shell hook, with the daemon
//! absent, listening, accepting but never reading, and hung (never
//! accepting). Runs in a private mount namespace so the hook's fixed
//! `/run/pinner/pinner.sock` is the bench's own. As root:
//!
//!     scripts/package && target/release/hook-bench [RUNS]
//!
//! (`scripts/package` builds the release binaries and the statically linked
//! hook the packages ship; both hooks are measured.)

use pinner_e2e::{bin_dir, with_private_run, PrivateRun};
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const IN_NAMESPACE: &str = "PINNER_HOOK_BENCH_INNER";

/// A domain XML of realistic size (~3 KB, like a small nova guest's).
fn domain_xml() -> String {
    let mut xml = String::from("<domain type='kvm' id='7'>\n  <name>instance-0000002a</name>\n  <uuid>c7a5fdbd-edaf-9455-926a-d65c16db1809</uuid>\n  <memory unit='KiB'>4194304</memory>\n  <vcpu placement='static'>4</vcpu>\n  <devices>\n");
    for i in 0..24 {
        xml += &format!("    <disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none' io='native'/><source file='/var/lib/nova/instances/x/disk{i}'/><target dev='vd{i}' bus='virtio'/></disk>\n");
    }
    xml + "  </devices>\n</domain>\n"
}

fn time_runs(program: &Path, args: &[&str], stdin: &[u8], runs: usize) -> Vec<Duration> {
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            let mut child = Command::new(program)
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn");
            let _ = child.stdin.take().unwrap().write_all(stdin);
            let status = child.wait().unwrap();
            assert!(status.success(), "{} exited {status}", program.display());
            start.elapsed()
        })
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn report(label: &str, mut samples: Vec<Duration>, floor: Option<f64>) -> f64 {
    samples.sort();
    let pick = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    let median = ms(pick(0.5));
    let ratio = floor.map_or(String::new(), |f| format!("{:>6.2}x", median / f));
    println!(
        "{label:<52} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {ratio}",
        ms(samples[0]),
        median,
        ms(pick(0.99)),
        ms(samples[samples.len() - 1])
    );
    median
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(300);
    if std::env::var_os(IN_NAMESPACE).is_none() {
        let run = PrivateRun::new("hook-bench");
        let me = std::env::current_exe().unwrap();
        let status = with_private_run(run.path(), &me)
            .arg(runs.to_string())
            .env(IN_NAMESPACE, "1")
            .status()
            .expect("unshare (run as root)");
        std::process::exit(status.code().unwrap_or(1));
    }

    // The workspace build (dynamically linked) and, once `scripts/package`
    // has run, the statically linked hook the packages ship.
    let mut hooks = vec![("dynamic", bin_dir().join("pinner-hook"))];
    let packaged = bin_dir()
        .parent()
        .map(|target| target.join("packaging/pinner-hook"))
        .unwrap_or_default();
    if packaged.exists() {
        hooks.push(("static", packaged));
    }
    for (kind, hook) in &hooks {
        let size = std::fs::metadata(hook).map(|m| m.len()).unwrap_or(0);
        println!(
            "pinner-hook ({kind}): {} ({:.0} KiB)",
            hook.display(),
            size as f64 / 1024.0
        );
    }
    let cpu = pinner_e2e::cpu_model();
    println!(
        "machine: {} CPUs, {cpu}; {runs} runs per row, times in ms",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<52} {:>8} {:>8} {:>8} {:>8} {:>7}",
        "scenario", "min", "median", "p99", "max", "/floor"
    );

    let xml = domain_xml();
    let started = ["instance-0000002a", "started", "begin", "-"];
    let sock = Path::new("/run/pinner/pinner.sock");
    let _ = std::fs::remove_file(sock);
    std::fs::create_dir_all("/run/pinner").unwrap();

    let floor = report(
        "floor: /bin/true",
        time_runs(Path::new("/bin/true"), &[], xml.as_bytes(), runs),
        None,
    );
    let sh_hook = std::env::temp_dir().join(format!("sh-hook-{}", std::process::id()));
    std::fs::write(&sh_hook, "#!/bin/sh\ncat >/dev/null\n").unwrap();
    std::fs::set_permissions(
        &sh_hook,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    report(
        "shell hook: sh reading stdin",
        time_runs(&sh_hook, &started, xml.as_bytes(), runs),
        Some(floor),
    );
    let _ = std::fs::remove_file(&sh_hook);

    for (kind, hook) in &hooks {
        report(
            &format!("pinner-hook ({kind}), daemon absent"),
            time_runs(hook, &started, xml.as_bytes(), runs),
            Some(floor),
        );
        with_reader(sock, runs, || {
            report(
                &format!("pinner-hook ({kind}), daemon listening"),
                time_runs(hook, &started, xml.as_bytes(), runs),
                Some(floor),
            );
        });
        {
            let listener = UnixListener::bind(sock).unwrap();
            let holder =
                std::thread::spawn(move || listener.incoming().take(runs).collect::<Vec<_>>());
            report(
                &format!("pinner-hook ({kind}), daemon accepts, never reads"),
                time_runs(hook, &started, xml.as_bytes(), runs),
                Some(floor),
            );
            drop(holder.join());
            std::fs::remove_file(sock).unwrap();
        }
        {
            let _listener = UnixListener::bind(sock).unwrap();
            report(
                &format!("pinner-hook ({kind}), daemon hung (never accepts)"),
                time_runs(hook, &started, xml.as_bytes(), runs),
                Some(floor),
            );
            std::fs::remove_file(sock).unwrap();
        }
    }

    // Every op libvirt sends, daemon listening, the hook the packages ship.
    let (kind, hook) = hooks.last().expect("a hook");
    for op in [
        "prepare",
        "start",
        "started",
        "stopped",
        "release",
        "migrate",
        "restore",
        "reconnect",
        "attach",
    ] {
        let args = ["instance-0000002a", op, "begin", "-"];
        with_reader(sock, runs, || {
            report(
                &format!("pinner-hook ({kind}) {op}"),
                time_runs(hook, &args, xml.as_bytes(), runs),
                Some(floor),
            );
        });
    }
}

/// Runs `body` with a daemon stand-in on `sock` that reads `runs` events
/// and acknowledges each as the daemon does.
fn with_reader(sock: &Path, runs: usize, body: impl FnOnce()) {
    let listener = UnixListener::bind(sock).unwrap();
    let reader = std::thread::spawn(move || {
        for conn in listener.incoming().take(runs) {
            let mut conn = conn.unwrap();
            let mut buf = Vec::new();
            let _ = conn.read_to_end(&mut buf);
            let _ = conn.write_all(&pinner_e2e::accepted_frame());
        }
    });
    body();
    reader.join().unwrap();
    std::fs::remove_file(sock).unwrap();
}
