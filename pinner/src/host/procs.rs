//! The process table, read from a `/proc` tree (the real one, or a fixture
//! laid out like it): what isolation needs to decide whether a process may
//! be moved, and to check afterwards where its threads may run.

use crate::engine::cpuset::CpuSet;
use std::path::{Path, PathBuf};

/// The most of a command line read (the kernel gives at most ARG_MAX, 2 MiB
/// by default): a fixture's file may be anything.
pub const CMDLINE_CAP: u64 = 4 * 1024 * 1024;

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

/// A `/proc` tree, read through the `procfs` crate where it covers the file
/// (stat, cgroup, status, tasks, schedstat). `cmdline` is read by hand:
/// `procfs` takes it as UTF-8 and fails on anything else, and a process may
/// put any bytes there.
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

    /// One process of this tree; Err when it has gone.
    fn open(&self, pid: u32) -> Option<procfs::process::Process> {
        procfs::process::Process::new_with_root(self.root.join(pid.to_string())).ok()
    }

    /// Every pid present now, ascending.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = procfs::process::all_processes_with_root(&self.root)
            .map(|all| all.flatten().map(|p| p.pid() as u32).collect())
            .unwrap_or_default();
        pids.sort_unstable();
        pids
    }

    /// The process, or None when it has gone (or its files are unreadable).
    pub fn process(&self, pid: u32) -> Option<Process> {
        let process = self.open(pid)?;
        let stat = process.stat().ok()?;
        let cgroups = process
            .cgroups()
            .map(|groups| {
                groups
                    .0
                    .into_iter()
                    .map(|g| (g.controllers.join(","), g.pathname))
                    .collect()
            })
            .unwrap_or_default();
        let program =
            crate::host::file::read_bytes(&self.root.join(format!("{pid}/cmdline")), CMDLINE_CAP)
                .ok()
                .and_then(|raw| {
                    let argv0 = raw.split(|b| *b == 0).next()?;
                    let name = String::from_utf8_lossy(argv0);
                    let base = name.rsplit('/').next()?.to_string();
                    (!base.is_empty()).then_some(base)
                })
                .unwrap_or_else(|| stat.comm.clone());
        Some(Process {
            pid,
            ppid: stat.ppid as u32,
            pgrp: stat.pgrp as u32,
            comm: stat.comm,
            program,
            kernel_thread: u64::from(stat.flags) & PF_KTHREAD != 0,
            start_time: stat.starttime,
            cgroups,
        })
    }

    /// The thread ids of `pid`.
    pub fn threads(&self, pid: u32) -> Vec<u32> {
        self.open(pid)
            .and_then(|p| p.tasks().ok())
            .map(|tasks| tasks.flatten().map(|t| t.tid as u32).collect())
            .unwrap_or_default()
    }

    fn task(&self, pid: u32, tid: u32) -> Option<procfs::process::Task> {
        self.open(pid)?.task_from_tid(tid as i32).ok()
    }

    /// Where a thread may run: `Cpus_allowed_list` of its status.
    pub fn cpus_allowed(&self, pid: u32, tid: u32) -> Option<CpuSet> {
        let ranges = self.task(pid, tid)?.status().ok()?.cpus_allowed_list?;
        Some(ranges.into_iter().flat_map(|(lo, hi)| lo..=hi).collect())
    }

    /// Nanoseconds the thread has waited on a run queue (schedstat's
    /// second field): time it was runnable but another task had its CPU.
    /// A thread's time on a CPU and waiting on a run queue (ns), from its
    /// schedstat.
    pub fn schedstat_ns(&self, pid: u32, tid: u32) -> Option<(u64, u64)> {
        let stat = self.task(pid, tid)?.schedstat().ok()?;
        Some((stat.sum_exec_runtime, stat.run_delay))
    }

    /// The process's supplementary groups (`Groups:`; empty when unreadable).
    pub fn groups(&self, pid: u32) -> Vec<u32> {
        self.open(pid)
            .and_then(|p| p.status().ok())
            .map(|s| s.groups)
            .unwrap_or_default()
    }
}

/// Writes a fake process into a fixture `/proc` tree (tests only, but shared
/// by unit and integration tests): stat, status and schedstat as the kernel
/// writes them (all 52 stat fields), its cgroups, its command line.
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
    let start = 1000 + pid;
    let stat = format!(
        "{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 {flags} 100 0 0 0 5 3 0 0 20 0 1 0 {start} \
         10000000 500 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0 \
         0 0 0 0 0 0 0 0\n"
    );
    let status = format!(
        "Name:\t{comm}\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t{pid}\nNgid:\t0\n\
         Pid:\t{pid}\nPPid:\t{ppid}\nTracerPid:\t0\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n\
         FDSize:\t64\nGroups:\t4 27 \nThreads:\t1\nSigQ:\t0/63429\nSigPnd:\t0000000000000000\n\
         ShdPnd:\t0000000000000000\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000001000\n\
         SigCgt:\t0000000000004002\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
         CapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n\
         Cpus_allowed:\tf\nCpus_allowed_list:\t0-3\nMems_allowed:\t1\n\
         Mems_allowed_list:\t0\nvoluntary_ctxt_switches:\t10\nnonvoluntary_ctxt_switches:\t1\n"
    );
    for file in [dir.clone(), dir.join(format!("task/{pid}"))] {
        std::fs::write(file.join("stat"), &stat)?;
        std::fs::write(file.join("status"), &status)?;
        std::fs::write(file.join("schedstat"), "5000000 200000 10\n")?;
    }
    std::fs::write(dir.join("cgroup"), cgroups)?;
    let cmdline = if kernel_thread {
        String::new()
    } else {
        format!("/usr/sbin/{comm}\0--flag\0")
    };
    std::fs::write(dir.join("cmdline"), cmdline)
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
        assert_eq!(
            procs.schedstat_ns(40, 40).map(|(_, wait)| wait),
            Some(200000)
        );
        assert_eq!(procs.groups(40), [4, 27]);
        assert_eq!(procs.threads(40), [40]);
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
        assert!(procs.pids().contains(&me.pid));
    }
}
