//! What becomes of each process: confined, moved, or left alone and why.

use crate::config::IsolationConfig;
use crate::host::cgroupfs::Group;
use crate::host::procs::Process;
use serde::Serialize;

/// What becomes of a process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "detail", rename_all = "snake_case")]
pub enum Verdict {
    /// A host process not confined yet.
    Move,
    Confined,
    Init,
    KernelThread,
    /// In libvirt's machine cgroups: a guest, its emulator and vhost threads.
    Guest,
    Excluded(String),
    /// In a cpuset group of someone else's (a container, a tool's own).
    OtherGroup(String),
    /// Outside the process group a test restricted isolation to.
    OutOfScope,
}

pub fn classify(p: &Process, config: &IsolationConfig, group: &Group) -> Verdict {
    if p.pid == 1 {
        return Verdict::Init;
    }
    if p.kernel_thread {
        return Verdict::KernelThread;
    }
    let in_machine = |path: &str| {
        path.trim_start_matches('/')
            .split('/')
            .next()
            .is_some_and(|top| top == "machine" || top == "machine.slice")
    };
    if p.cgroups.iter().any(|(_, path)| in_machine(path)) {
        return Verdict::Guest;
    }
    for entry in &config.exclude {
        if entry.starts_with('/') {
            let under = |path: &str| {
                path == entry
                    || path
                        .strip_prefix(entry.as_str())
                        .is_some_and(|rest| rest.starts_with('/'))
            };
            if let Some((_, path)) = p.cgroups.iter().find(|(_, path)| under(path)) {
                return Verdict::Excluded(format!("cgroup {path} is excluded ({entry})"));
            }
        } else if p.comm == *entry || p.program == *entry {
            return Verdict::Excluded(format!("name {entry} is excluded"));
        }
    }
    if config
        .test_only_process_group
        .as_ref()
        .is_some_and(|groups| !groups.contains(&p.pgrp))
    {
        return Verdict::OutOfScope;
    }
    let ours = group.path();
    let mut everywhere = true;
    for (hierarchy, _) in &group.parts {
        match p.cgroup(hierarchy.controller) {
            Some(path) if path == ours => {}
            // Only the cpu hierarchy decides whether a process is the host's:
            // in v1's memory hierarchy systemd puts every service in a group.
            Some(path) if path != "/" && hierarchy == &group.parts[0].0 => {
                return Verdict::OtherGroup(path.to_string());
            }
            _ => everywhere = false,
        }
    }
    if everywhere {
        Verdict::Confined
    } else {
        Verdict::Move
    }
}
