//! Host isolation on this machine's real cgroup v1: dummy daemons confined
//! to the reserved CPU (every thread), a guest left on its own, PID 1 and
//! kernel threads untouched, a restarted daemon caught from its pid file,
//! and everything put back by `--undo` and by the daemon's exit.
//!
//! Only the test's own dummies are ever moved: they run in a process group
//! of their own, and `PINNER_TEST_ONLY_PROCESS_GROUP` restricts
//! isolation to it.

use pinner_e2e::{bin_dir, online_cpus, sandbox_or_skip, wait_for, Sandbox};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Restricts isolation to one process group: the test's own dummies.
const SCOPE_ENV: &str = "PINNER_TEST_ONLY_PROCESS_GROUP";

/// The test's dummy daemons, in one process group; killed (and isolation
/// undone) however the test ends.
struct Dummies {
    dir: PathBuf,
    pgrp: u32,
    children: Vec<Child>,
    config: PathBuf,
}

impl Dummies {
    fn new(dir: &Path) -> Dummies {
        std::fs::create_dir_all(dir.join("pids")).unwrap();
        let leader = Command::new(bin_dir().join("dummy-daemon"))
            .process_group(0)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn dummy-daemon");
        Dummies {
            dir: dir.to_path_buf(),
            pgrp: leader.id(),
            children: vec![leader],
            config: dir.join("pinner.toml"),
        }
    }

    /// Starts a dummy named `name` with `threads` extra threads; with a pid
    /// file when `pid_file` is set, as a daemon started by init would.
    fn spawn(&mut self, name: &str, threads: u32, pid_file: bool) -> u32 {
        let program = self.dir.join(name);
        if !program.exists() {
            std::fs::copy(bin_dir().join("dummy-daemon"), &program).unwrap();
        }
        let child = Command::new(&program)
            .arg(threads.to_string())
            .process_group(self.pgrp as i32)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let pid = child.id();
        self.children.push(child);
        if pid_file {
            let path = self.dir.join(format!("pids/{name}.pid"));
            std::fs::write(path, format!("{pid}\n")).unwrap();
        }
        pid
    }

    fn kill(&mut self, pid: u32) {
        if let Some(i) = self.children.iter().position(|c| c.id() == pid) {
            let mut child = self.children.remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn pinner_isolate(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin_dir().join("pinner"))
            .env(SCOPE_ENV, self.pgrp.to_string())
            .arg("--config")
            .arg(&self.config)
            .arg("isolate")
            .args(args)
            .output()
            .expect("run pinner isolate")
    }
}

impl Drop for Dummies {
    fn drop(&mut self) {
        let _ = self.pinner_isolate(&["--undo"]);
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Where each thread of `pid` may run.
fn thread_cpus(pid: u32) -> Vec<Vec<u32>> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("process alive");
    tasks
        .flatten()
        .filter_map(|t| pinner_e2e::allowed_cpus(t.path().join("status")))
        .collect()
}

fn confined_to(pid: u32, cpus: &[u32]) -> Result<(), String> {
    let threads = thread_cpus(pid);
    if !threads.is_empty() && threads.iter().all(|t| t == cpus) {
        Ok(())
    } else {
        Err(format!("{pid}'s threads may run on {threads:?}"))
    }
}

fn cgroup_line(pid: u32, controller: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.split(':').nth(1) == Some(controller))
        .unwrap_or_default()
        .to_string()
}

fn qemu_pid(sb: &Sandbox, short: &str) -> u32 {
    let path = sb
        .dir
        .join(format!("run/libvirt/qemu/{}.pid", sb.name(short)));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn host_daemons_confined_kept_and_put_back() {
    let Some(mut sb) = sandbox_or_skip("host_daemons_confined_kept_and_put_back") else {
        return;
    };
    let online = online_cpus();
    let reserved = vec![online[0]];
    let mut dummies = Dummies::new(&sb.dir.join("isolation"));
    let group = format!("pinner-e2e-{}", dummies.pgrp);
    let plain = dummies.spawn("dummy-sshd", 0, true);
    let threaded = dummies.spawn("dummy-threads", 12, false);
    let excluded = dummies.spawn("ovs-vswitchd", 2, true);
    let restarting = dummies.spawn("dummy-restart", 1, true);
    let memory_before = cgroup_line(plain, "memory");
    let (init_before, kthread_before) = (
        std::fs::read_to_string("/proc/1/cgroup").unwrap(),
        std::fs::read_to_string("/proc/2/cgroup").unwrap(),
    );

    sb.define_guest("g", 1, "");
    sb.start_guest("g");
    sb.extra_config = format!(
        "[isolation]\nenabled = true\nrestore_on_exit = true\nmemory_limit = \"512M\"\n\
         group = \"{group}\"\npid_dirs = [\"{}\"]\nsweep_interval_secs = 600\n",
        dummies.dir.join("pids").display()
    );
    sb.daemon_env = vec![(SCOPE_ENV.into(), dummies.pgrp.to_string())];
    sb.start_daemon(&online[0].to_string());
    dummies.config = sb.config_path();

    // The daemon isolates at start: every thread of every dummy is on the
    // reserved CPU, in both the cpuset and the memory group.
    for pid in [dummies.pgrp, plain, threaded, restarting] {
        wait_for(Duration::from_secs(5), || confined_to(pid, &reserved)).unwrap();
        assert!(cgroup_line(pid, "cpuset").ends_with(&format!(":cpuset:/{group}")));
        assert!(cgroup_line(pid, "memory").ends_with(&format!(":memory:/{group}")));
    }
    assert_eq!(thread_cpus(threaded).len(), 13);
    assert_eq!(
        std::fs::read_to_string(format!(
            "/sys/fs/cgroup/memory/{group}/memory.limit_in_bytes"
        ))
        .unwrap()
        .trim(),
        "536870912"
    );
    // Excluded by name, the guest, PID 1 and kernel threads stay put.
    assert_eq!(thread_cpus(excluded), vec![online.clone(); 3]);
    let guest = qemu_pid(&sb, "g");
    let guest_cpu = online[1];
    sb.await_pins("g", Duration::from_secs(5), "guest pinned", |pins| {
        pins == [vec![guest_cpu]]
    });
    // Its vCPU thread runs on the guest's CPU (its emulator thread is on the
    // housekeeping CPU by placement policy, not by isolation).
    assert_eq!(
        sb.vcpu_cgroup("g", 0),
        (vec![guest_cpu], vec![vec![guest_cpu]])
    );
    assert_eq!(
        std::fs::read_to_string("/proc/1/cgroup").unwrap(),
        init_before
    );
    assert_eq!(
        std::fs::read_to_string("/proc/2/cgroup").unwrap(),
        kthread_before
    );

    let out = dummies.pinner_isolate(&["--status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["active"], true);
    assert_eq!(status["mechanism"], "cgroup-v1");
    assert_eq!(status["confined"], 4);
    assert_eq!(status["not_confined"].as_array().unwrap().len(), 0);
    let excluded_pids: Vec<u64> = status["excluded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e[0]["pid"].as_u64().unwrap())
        .collect();
    assert!(excluded_pids.contains(&u64::from(excluded)));
    let guest_pids: Vec<u64> = status["guests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["pid"].as_u64().unwrap())
        .collect();
    assert!(guest_pids.contains(&u64::from(guest)), "{status}");

    // A daemon restarted by init (here: by the unconfined test) is caught
    // from its pid file, long before the 600 s sweep.
    dummies.kill(restarting);
    let started = Instant::now();
    let restarted = dummies.spawn("dummy-restart", 1, true);
    wait_for(Duration::from_secs(2), || confined_to(restarted, &reserved))
        .unwrap_or_else(|e| panic!("restarted dummy not confined within 2 s: {e}"));
    eprintln!("restarted dummy confined after {:?}", started.elapsed());
    sb.await_log(&format!("confined dummy-restart[{restarted}]"));

    // One started without a pid file waits for a sweep; `pinner isolate`
    // is one.
    let stray = dummies.spawn("dummy-stray", 0, false);
    assert_eq!(thread_cpus(stray), vec![online.clone()]);
    let out = dummies.pinner_isolate(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("dummy-stray[{stray}]")));
    confined_to(stray, &reserved).unwrap();

    // --undo puts everything back and removes the groups; the daemon keeps
    // out of it afterwards.
    let out = dummies.pinner_isolate(&["--undo"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for pid in [plain, threaded, restarted, stray] {
        assert!(thread_cpus(pid).iter().all(|t| t == &online), "{pid}");
        assert!(cgroup_line(pid, "cpuset").ends_with(":cpuset:/"));
    }
    assert_eq!(cgroup_line(plain, "memory"), memory_before);
    for hierarchy in ["cpuset", "memory"] {
        assert!(!Path::new(&format!("/sys/fs/cgroup/{hierarchy}/{group}")).exists());
    }
    let after_undo = dummies.spawn("dummy-late", 0, true);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(thread_cpus(after_undo), vec![online.clone()]);

    // restore_on_exit: isolate again, stop the daemon, everything is back.
    let out = dummies.pinner_isolate(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    confined_to(plain, &reserved).unwrap();
    assert!(sb.stop_daemon().is_some_and(|s| s.success()));
    assert!(thread_cpus(plain).iter().all(|t| t == &online));
    assert!(!Path::new(&format!("/sys/fs/cgroup/cpuset/{group}")).exists());
    sb.await_log("host isolation undone");
}

#[test]
fn isolation_refuses_a_config_without_reserved_cpus_and_changes_nothing() {
    let dir = std::env::temp_dir().join(format!("pinner-iso-conf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("pinner.toml");
    std::fs::write(
        &config,
        format!(
            "socket = \"{}/pinner.sock\"\n[isolation]\nenabled = true\ngroup = \"pinner-refused\"\n",
            dir.display()
        ),
    )
    .unwrap();
    // Scoped to a process group that does not exist, should the refusal fail.
    let out = Command::new(bin_dir().join("pinner"))
        .env(SCOPE_ENV, u32::MAX.to_string())
        .arg("--config")
        .arg(&config)
        .arg("isolate")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("[isolation] enabled = true needs reserved_cpus"),
        "{stderr}"
    );
    assert!(!Path::new("/sys/fs/cgroup/cpuset/pinner-refused").exists());
}
