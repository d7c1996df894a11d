//! Host isolation on this machine's real cgroup v1: dummy daemons confined
//! to the reserved CPU (every thread), a guest left on its own, PID 1 and
//! kernel threads untouched, a restarted daemon caught from its pid file,
//! and everything put back by `undo` and by the daemon's exit.
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
        let _ = self.pinner_isolate(&["undo"]);
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

/// The cgroup group the dummies of `dummies` are confined in.
fn group_of(dummies: &Dummies) -> String {
    format!("pinner-e2e-{}", dummies.pgrp)
}

/// Starts the sandbox's daemon isolating `dummies` on the first online CPU,
/// with `extra` lines in `[isolation]`.
fn isolating_daemon(sb: &mut Sandbox, dummies: &mut Dummies, extra: &str) {
    sb.extra_config = format!(
        "[isolation]\nenabled = true\nrestore_on_exit = true\ngroup = \"{}\"\n\
         pid_dirs = [\"{}\"]\n{extra}\n",
        group_of(dummies),
        dummies.dir.join("pids").display()
    );
    sb.daemon_env = vec![(SCOPE_ENV.into(), dummies.pgrp.to_string())];
    sb.start_daemon(&online_cpus()[0].to_string());
    dummies.config = sb.config_path();
}

#[test]
fn host_daemons_confined_kept_and_put_back() {
    let Some(mut sb) = sandbox_or_skip("host_daemons_confined_kept_and_put_back") else {
        return;
    };
    let online = online_cpus();
    let reserved = vec![online[0]];
    let mut dummies = Dummies::new(&sb.dir.join("isolation"));
    let group = group_of(&dummies);
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
    isolating_daemon(
        &mut sb,
        &mut dummies,
        "memory_limit = \"512M\"\nsweep_interval_secs = 600",
    );

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

    let out = dummies.pinner_isolate(&["--json"]);
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

    // One started without a pid file waits for a sweep; `pinner isolate
    // apply` is one.
    let stray = dummies.spawn("dummy-stray", 0, false);
    assert_eq!(thread_cpus(stray), vec![online.clone()]);
    let out = dummies.pinner_isolate(&["apply"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("dummy-stray[{stray}]")));
    confined_to(stray, &reserved).unwrap();

    // --undo puts everything back and removes the groups; the daemon keeps
    // out of it afterwards.
    let out = dummies.pinner_isolate(&["undo"]);
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
    let out = dummies.pinner_isolate(&["apply"]);
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
        .args(["isolate", "apply"])
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

/// Any user names their own processes: a name that clears the screen and
/// one that forges a log line are shown escaped by `pinner isolate`, by
/// `isolate` and in the keeper's log.
#[test]
fn hostile_process_names_are_shown_escaped() {
    let Some(mut sb) = sandbox_or_skip("hostile_process_names_are_shown_escaped") else {
        return;
    };
    let mut dummies = Dummies::new(&sb.dir.join("isolation"));
    isolating_daemon(&mut sb, &mut dummies, "sweep_interval_secs = 600");
    // Caught from its pid file; the keeper's line stays one line.
    let forger = dummies.spawn("x\nerror: FAKE", 0, true);
    let log = sb.await_log(&format!("confined x\\nerror: FAKE[{forger}]"));
    assert!(!log.lines().any(|l| l.starts_with("error: FAKE")), "{log}");
    // No pid file: not confined until a sweep, and listed so.
    let clearer = dummies.spawn("\u{1b}[2Jclear", 0, false);
    let shown = format!("\\x1b[2Jclear[{clearer}]");
    for args in [&[][..], &["apply"]] {
        let out = dummies.pinner_isolate(args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            text.contains(&shown),
            "isolate {args:?} lacks {shown}:\n{text}"
        );
        assert!(!text.contains('\u{1b}'), "isolate {args:?}: raw escape");
    }
    confined_to(clearer, &online_cpus()[..1]).unwrap();
}

/// Replaces `path` in one step: a sweep every second must never read it
/// half-written (a different refusal, logged once more).
fn replace_with_file(path: &Path, bytes: &[u8]) {
    let next = path.with_extension("next");
    std::fs::write(&next, bytes).unwrap();
    std::fs::rename(&next, path).unwrap();
}

/// The isolation state truncated, then replaced by a link: each refused
/// with one error that says what to do, sweeps quiet meanwhile, the link's
/// target untouched; the way out the error names works.
#[test]
fn an_unusable_state_is_refused_once_with_the_way_out() {
    let Some(mut sb) = sandbox_or_skip("an_unusable_state_is_refused_once_with_the_way_out") else {
        return;
    };
    let online = online_cpus();
    let mut dummies = Dummies::new(&sb.dir.join("isolation"));
    isolating_daemon(&mut sb, &mut dummies, "sweep_interval_secs = 1");
    let plain = dummies.spawn("dummy-sshd", 0, true);
    wait_for(Duration::from_secs(5), || confined_to(plain, &online[..1])).unwrap();
    let state = sb.socket().with_file_name("isolation.json");
    // The sweep that confined it records it after: tampering before that
    // record would be undone by it.
    let recorded = |pid: u32| {
        let text = std::fs::read_to_string(&state).unwrap_or_default();
        if text.contains(&format!("\"pid\": {pid},")) {
            Ok(())
        } else {
            Err(format!("{pid} not recorded yet"))
        }
    };
    wait_for(Duration::from_secs(5), || recorded(plain)).unwrap();
    let good = std::fs::read(&state).unwrap();
    let refusals = |sb: &Sandbox| {
        sb.daemon_log()
            .lines()
            .filter(|l| l.contains("not a usable isolation state"))
            .map(String::from)
            .collect::<Vec<_>>()
    };

    replace_with_file(&state, &good[..good.len() / 2]);
    sb.await_log("not a usable isolation state");
    std::thread::sleep(Duration::from_secs(3));
    let said = refusals(&sb);
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(
        said[0].contains(&format!("mv {0} {0}.bad", state.display())),
        "{}",
        said[0]
    );
    assert!(said[0].contains("pinner isolate undo"), "{}", said[0]);
    assert_eq!(std::fs::read(&state).unwrap(), &good[..good.len() / 2]);
    replace_with_file(&state, &good);
    sb.await_log("isolation sweeps work again");

    let victim = sb.dir.join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    let link = state.with_extension("link");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    std::fs::rename(&link, &state).unwrap();
    wait_for(Duration::from_secs(5), || match refusals(&sb).len() {
        2 => Ok(()),
        n => Err(format!("{n} refusals")),
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(refusals(&sb).len(), 2);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert!(std::fs::symlink_metadata(&state)
        .unwrap()
        .file_type()
        .is_symlink());

    // As the error says: move it away, then undo.
    std::fs::rename(&state, state.with_extension("json.bad")).unwrap();
    let out = dummies.pinner_isolate(&["undo"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(thread_cpus(plain).iter().all(|t| t == &online));
    let group = group_of(&dummies);
    assert!(!Path::new(&format!("/sys/fs/cgroup/cpuset/{group}")).exists());
}

/// The state directory full (a one-page tmpfs, filled, in a mount namespace
/// of the command's own): `pinner isolate` moves the processes, cannot
/// record it, and so puts them back, saying exactly that.
#[test]
fn a_round_that_cannot_be_recorded_is_taken_back() {
    let online = online_cpus();
    let mut dummies =
        Dummies::new(&std::env::temp_dir().join(format!("pinner-iso-full-{}", std::process::id())));
    let plain = dummies.spawn("dummy-sshd", 0, true);
    let state_dir = dummies.dir.join("run");
    std::fs::create_dir_all(&state_dir).unwrap();
    std::fs::write(
        &dummies.config,
        format!(
            "reserved_cpus = \"{}\"\nsocket = \"{}/pinner.sock\"\n[isolation]\nenabled = true\n\
             group = \"{}\"\n",
            online[0],
            state_dir.display(),
            group_of(&dummies)
        ),
    )
    .unwrap();
    let script = format!(
        "mount -t tmpfs -o size=4k,nr_inodes=16 pinner-full {dir} && \
         head -c 4096 /dev/zero >{dir}/filler 2>/dev/null; \
         exec \"$0\" --config \"$1\" isolate apply",
        dir = state_dir.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .arg(bin_dir().join("pinner"))
        .arg(&dummies.config)
        .env(SCOPE_ENV, dummies.pgrp.to_string())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not recorded, so taken back"), "{stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert!(stderr.contains("put back"), "{stderr}");
    assert!(thread_cpus(plain).iter().all(|t| t == &online));
    assert!(cgroup_line(plain, "cpuset").ends_with(":cpuset:/"));
    let group = group_of(&dummies);
    assert!(!Path::new(&format!("/sys/fs/cgroup/cpuset/{group}")).exists());
    let _ = std::fs::remove_dir_all(&dummies.dir);
}
