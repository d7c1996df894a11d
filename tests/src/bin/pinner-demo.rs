//! The quick-start demo: a sandboxed libvirtd with a few TCG guests, the real
//! hook and daemon, showing one-to-one placement, range binding once the
//! guests outgrow the pool, and the return to one-to-one, each as the
//! status and as a map of the host.

use pinner_e2e::{missing_requirement, online_cpus, wait_for, Sandbox};
use std::time::Duration;

fn show(sb: &Sandbox, title: &str) {
    println!("\n==== {title}");
    for args in [&["status"][..], &["status", "--map"]] {
        println!("$ pinner {}", args.join(" "));
        let out = sb.pinner(args);
        print!("{}", String::from_utf8_lossy(&out.stdout));
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
    }
}

fn settle(sb: &Sandbox) {
    if let Err(e) = wait_for(Duration::from_secs(10), || sb.all_in_sync()) {
        eprintln!("warning: not settled: {e}");
    }
}

fn main() {
    if let Some(reason) = missing_requirement() {
        eprintln!("pinner-demo: {reason}");
        std::process::exit(1);
    }
    let online = online_cpus();
    // Keep a pool of two CPUs so the demo looks the same on any host.
    let reserved: Vec<String> = online[..online.len().saturating_sub(2)]
        .iter()
        .map(u32::to_string)
        .collect();
    println!(
        "Starting a private libvirtd (own mount namespace; the host's libvirt is not touched)..."
    );
    let mut sb = Sandbox::start();
    sb.start_daemon(&reserved.join(","));
    println!("pinner daemon running; hook installed as the sandbox's /etc/libvirt/hooks/qemu.d/50-pinner");
    for g in ["web", "db", "batch"] {
        sb.define_guest(g, 1, "");
    }
    for g in ["web", "db"] {
        let took = sb.start_guest(g);
        println!("virsh start {} ({took:.0?})", sb.name(g));
    }
    settle(&sb);
    show(
        &sb,
        "two 1-vCPU guests on a 2-CPU pool: one pCPU each (dedicated)",
    );

    let took = sb.start_guest("batch");
    println!("\nvirsh start {} ({took:.0?})", sb.name("batch"));
    settle(&sb);
    show(
        &sb,
        "a third guest: more vCPUs than pCPUs, so guests share a range (shared)",
    );

    sb.destroy_guest("batch");
    settle(&sb);
    show(&sb, "batch stopped: back to one-to-one");
    println!("\nDaemon log (what journald would hold):");
    for line in sb.daemon_log().lines().filter(|l| !l.contains("debug:")) {
        println!("  {line}");
    }
}
