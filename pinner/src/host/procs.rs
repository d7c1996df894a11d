//! The process table, read from a `/proc` tree (the real one, or a fixture
//! laid out like it): what isolation needs to decide whether a process may
//! be moved, and to check afterwards where its threads may run.

use crate::engine::cpuset::CpuSet;
use std::path::{Path, PathBuf};

/// PF_KTHREAD in /proc/PID/stat's flags: a kernel thread.
const PF_KTHREAD: u64 = 0x0020_0000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub ppid: u32,
    /// Process group.
    pub pgrp: u32,
    /// The kernel's short name (at most 15 bytes).
    pub comm: String,
    /// Base name of argv[0], for names longer than comm keeps.
    pub program: String,
    pub kernel_thread: bool,
    /// Start time in clock ticks since boot: with the pid, names a process
    /// across pid reuse.
    pub start_time: u64,
    /// (controllers, path) per hierarchy, from /proc/PID/cgroup; the
    /// controllers of the unified hierarchy are "".
    pub cgroups: Vec<(String, String)>,
}

impl Process {
    /// This process's group in the hierarchy carrying `controller` ("" for
    /// the unified one).
    pub fn cgroup(&self, controller: &str) -> Option<&str> {
        self.cgroups
            .iter()
            .find(|(controllers, _)| {
                if controller.is_empty() {
                    controllers.is_empty()
                } else {
                    controllers.split(',').any(|c| c == controller)
                }
            })
            .map(|(_, path)| path.as_str())
    }
}

/// A `/proc` tree.
#[derive(Debug, Clone)]
pub struct ProcFs {
    root: PathBuf,
}

impl ProcFs {
    pub fn new(root: impl Into<PathBuf>) -> ProcFs {
        ProcFs { root: root.into() }
    }

    pub fn path(&self, rest: &str) -> PathBuf {
        self.root.join(rest)
    }

    /// Every pid present now, ascending.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = std::fs::read_dir(&self.root)
            .map(|dir| {
                dir.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        pids.sort_unstable();
        pids
    }

    /// The process, or None when it has gone (or its files are unreadable).
    pub fn process(&self, pid: u32) -> Option<Process> {
        let dir = self.root.join(pid.to_string());
        let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
        let (comm, fields) = parse_stat(&stat)?;
        // Fields after "(comm)": state is index 0, so field N of proc(5)
        // is index N-3.
        let ppid = fields.get(1)?.parse().ok()?;
        let pgrp = fields.get(2)?.parse().ok()?;
        let flags: u64 = fields.get(6)?.parse().ok()?;
        let start_time = fields.get(19)?.parse().ok()?;
        let cgroups = std::fs::read_to_string(dir.join("cgroup"))
            .map(|text| parse_cgroups(&text))
            .unwrap_or_default();
        let program = std::fs::read(dir.join("cmdline"))
            .ok()
            .and_then(|raw| {
                let argv0 = raw.split(|b| *b == 0).next()?;
                let name = String::from_utf8_lossy(argv0);
                let base = name.rsplit('/').next()?.to_string();
                (!base.is_empty()).then_some(base)
            })
            .unwrap_or_else(|| comm.clone());
        Some(Process {
            pid,
            ppid,
            pgrp,
            comm,
            program,
            kernel_thread: flags & PF_KTHREAD != 0,
            start_time,
            cgroups,
        })
    }

    /// The thread ids of `pid`.
    pub fn threads(&self, pid: u32) -> Vec<u32> {
        std::fs::read_dir(self.root.join(format!("{pid}/task")))
            .map(|dir| {
                dir.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A field of a `status` file (`rest`: "PID/status" or
    /// "PID/task/TID/status"), without its "Key:".
    fn status_field(&self, rest: &str, key: &str) -> Option<String> {
        let status = std::fs::read_to_string(self.root.join(rest)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':').map(str::to_string))
    }

    /// Where a thread may run: `Cpus_allowed_list` of its status.
    pub fn cpus_allowed(&self, pid: u32, tid: u32) -> Option<CpuSet> {
        self.status_field(&format!("{pid}/task/{tid}/status"), "Cpus_allowed_list")
            .and_then(|v| CpuSet::parse(&v).ok())
    }

    /// The process's supplementary groups (`Groups:`; empty when unreadable).
    pub fn groups(&self, pid: u32) -> Vec<u32> {
        self.status_field(&format!("{pid}/status"), "Groups")
            .map(|g| {
                g.split_whitespace()
                    .filter_map(|g| g.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Splits /proc/PID/stat into comm and the fields after it. comm may hold
/// spaces and parentheses, so it ends at the last ')'.
fn parse_stat(stat: &str) -> Option<(String, Vec<&str>)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    let fields = stat.get(close + 1..)?.split_whitespace().collect();
    Some((comm, fields))
}

/// "4:memory:/a" lines into (controllers, path); v1's named hierarchies
/// ("name=systemd") are kept as they are.
fn parse_cgroups(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?.to_string();
            let path = parts.next()?.to_string();
            Some((controllers, path))
        })
        .collect()
}

/// Writes a fake process into a fixture `/proc` tree (tests only, but shared
/// by unit and integration tests).
pub fn write_fixture_process(
    root: &Path,
    pid: u32,
    ppid: u32,
    comm: &str,
    kernel_thread: bool,
    cgroups: &str,
) -> std::io::Result<()> {
    let dir = root.join(pid.to_string());
    std::fs::create_dir_all(dir.join(format!("task/{pid}")))?;
    let flags = if kernel_thread { PF_KTHREAD } else { 0x400000 };
    std::fs::write(
        dir.join("stat"),
        format!(
            "{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 {flags} 0 0 0 0 0 0 0 0 20 0 1 0 {} 1000 100\n",
            1000 + pid
        ),
    )?;
    std::fs::write(dir.join("cgroup"), cgroups)?;
    let cmdline = if kernel_thread {
        String::new()
    } else {
        format!("/usr/sbin/{comm}\0--flag\0")
    };
    std::fs::write(dir.join("cmdline"), cmdline)?;
    std::fs::write(
        dir.join(format!("task/{pid}/status")),
        format!("Name:\t{comm}\nCpus_allowed_list:\t0-3\n"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_names_flags_and_cgroups_from_a_fixture_tree() {
        let dir = crate::test_support::scratch_dir("procs");
        write_fixture_process(&dir, 1, 0, "init", false, "1:cpuset:/\n0::/init.scope\n").unwrap();
        write_fixture_process(&dir, 2, 0, "kthreadd", true, "1:cpuset:/\n").unwrap();
        write_fixture_process(&dir, 40, 1, "my (odd) name", false, "1:cpu,cpuacct:/x\n").unwrap();
        let procs = ProcFs::new(&dir);
        assert_eq!(procs.pids(), vec![1, 2, 40]);
        let init = procs.process(1).unwrap();
        assert!(!init.kernel_thread);
        assert_eq!(init.cgroup("cpuset"), Some("/"));
        assert_eq!(init.cgroup(""), Some("/init.scope"));
        assert!(procs.process(2).unwrap().kernel_thread);
        let odd = procs.process(40).unwrap();
        assert_eq!(odd.comm, "my (odd) name");
        assert_eq!(odd.ppid, 1);
        assert_eq!(odd.pgrp, 40);
        assert_eq!(odd.start_time, 1040);
        assert_eq!(odd.cgroup("cpuacct"), Some("/x"));
        assert_eq!(odd.cgroup("cpuset"), None);
        assert_eq!(procs.cpus_allowed(40, 40).unwrap().to_string(), "0-3");
        assert!(procs.process(99).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_real_proc_knows_this_process() {
        let procs = ProcFs::new("/proc");
        let me = procs.process(std::process::id()).unwrap();
        assert!(!me.kernel_thread);
        assert!(procs.threads(me.pid).contains(&me.pid));
        assert!(procs.cpus_allowed(me.pid, me.pid).is_some());
    }
}
