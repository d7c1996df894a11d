//! cgroupfs as isolation uses it: which hierarchies a host mounts, and
//! pinner's housekeeping group in them (create, move processes in and
//! back, remove). Paths come from the mount table, so tests point it at a
//! temporary directory laid out like cgroupfs v1 or v2.

use crate::engine::cpuset::CpuSet;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A cgroupfs operation that failed, with the file or directory it
/// concerns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot create {}: {reason}", path.display())]
    Create { path: PathBuf, reason: String },
    #[error("cannot remove {}: {reason}", path.display())]
    Remove { path: PathBuf, reason: String },
    #[error("cannot read {}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("cannot write {value:?} to {}: {reason}", path.display())]
    Write {
        path: PathBuf,
        value: String,
        reason: String,
    },
    /// The process is gone: nothing to move.
    #[error("exited")]
    Exited,
    #[error("cannot read the memory nodes of {}", .0.display())]
    NoMems(PathBuf),
}

/// One mounted hierarchy: where, and the controller that names it in
/// /proc/PID/cgroup ("" for the unified hierarchy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    pub mount: PathBuf,
    pub controller: &'static str,
}

impl Hierarchy {
    /// The directory of group `path` ("/a/b") in this hierarchy.
    pub fn dir(&self, path: &str) -> PathBuf {
        self.mount.join(path.trim_start_matches('/'))
    }
}

/// The cgroup layout of a host, as far as isolation cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Legacy or hybrid: a cpuset hierarchy of its own (and memory).
    V1 {
        cpuset: Hierarchy,
        memory: Option<Hierarchy>,
    },
    /// Unified only.
    V2 { root: Hierarchy },
}

impl Layout {
    /// From /proc/mounts text. A v1 cpuset hierarchy wins over the unified
    /// one (hybrid hosts mount both; cpuset is only controllable in v1 there).
    pub fn detect(mounts: &str) -> Option<Layout> {
        let mut cpuset = None;
        let mut memory = None;
        let mut unified = None;
        for line in mounts.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [_, mount, fstype, options, ..] = fields[..] else {
                continue;
            };
            let mount = PathBuf::from(unescape_mount(mount));
            match fstype {
                "cgroup" => {
                    for option in options.split(',') {
                        match option {
                            "cpuset" => cpuset = Some(mount.clone()),
                            "memory" => memory = Some(mount.clone()),
                            _ => {}
                        }
                    }
                }
                "cgroup2" => unified = unified.or(Some(mount)),
                _ => {}
            }
        }
        match (cpuset, unified) {
            (Some(cpuset), _) => Some(Layout::V1 {
                cpuset: Hierarchy {
                    mount: cpuset,
                    controller: "cpuset",
                },
                memory: memory.map(|mount| Hierarchy {
                    mount,
                    controller: "memory",
                }),
            }),
            (None, Some(root)) => Some(Layout::V2 {
                root: Hierarchy {
                    mount: root,
                    controller: "",
                },
            }),
            (None, None) => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Layout::V1 { .. } => "cgroup-v1",
            Layout::V2 { .. } => "cgroup-v2",
        }
    }

    /// The hierarchy whose group decides where a process may run.
    pub fn cpu_hierarchy(&self) -> &Hierarchy {
        match self {
            Layout::V1 { cpuset, .. } => cpuset,
            Layout::V2 { root } => root,
        }
    }
}

/// /proc/mounts escapes spaces and a few other bytes as \ooo.
fn unescape_mount(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let text = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What the housekeeping group holds to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub cpus: CpuSet,
    /// Memory nodes; empty: the parent's.
    pub mems: CpuSet,
    pub memory_bytes: Option<u64>,
}

/// pinner's housekeeping group `name`, in each hierarchy it lives in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    /// (hierarchy, group directory).
    pub parts: Vec<(Hierarchy, PathBuf)>,
}

impl Group {
    /// The group `name` under `layout`, in the hierarchies `limits` needs.
    pub fn new(layout: &Layout, name: &str, with_memory: bool) -> Group {
        let hierarchies: Vec<Hierarchy> = match layout {
            Layout::V1 { cpuset, memory } => std::iter::once(cpuset.clone())
                .chain(memory.clone().filter(|_| with_memory))
                .collect(),
            Layout::V2 { root } => vec![root.clone()],
        };
        Group {
            name: name.to_string(),
            parts: hierarchies
                .into_iter()
                .map(|h| {
                    let dir = h.dir(name);
                    (h, dir)
                })
                .collect(),
        }
    }

    /// This group's path as /proc/PID/cgroup shows it.
    pub fn path(&self) -> String {
        format!("/{}", self.name)
    }

    pub fn exists(&self) -> bool {
        self.parts.iter().any(|(_, dir)| dir.is_dir())
    }

    /// Creates the group (or updates an existing one) with `limits`. On
    /// failure, directories this call created are removed again.
    pub fn create(&self, layout: &Layout, limits: &Limits) -> Result<(), CgroupError> {
        let mut created = Vec::new();
        let result = self.create_parts(layout, limits, &mut created);
        if result.is_err() {
            for dir in created.iter().rev() {
                let _ = std::fs::remove_dir(dir);
            }
        }
        result
    }

    fn create_parts(
        &self,
        layout: &Layout,
        limits: &Limits,
        created: &mut Vec<PathBuf>,
    ) -> Result<(), CgroupError> {
        if let Layout::V2 { root } = layout {
            // Controllers must be enabled in the parent for the child to get
            // its cpuset.* (and memory.*) files.
            let mut wanted = vec!["+cpuset"];
            if limits.memory_bytes.is_some() {
                wanted.push("+memory");
            }
            write_file(
                &root.mount.join("cgroup.subtree_control"),
                &wanted.join(" "),
            )?;
        }
        // Everything that can be found out is, before anything is created.
        let mems = match limits.mems.is_empty() {
            true => parent_mems(layout, &self.parts[0].0.mount)?,
            false => limits.mems.to_string(),
        };
        for (hierarchy, dir) in &self.parts {
            if !dir.is_dir() {
                std::fs::create_dir(dir).map_err(|e| CgroupError::Create {
                    path: dir.clone(),
                    reason: e.to_string(),
                })?;
                created.push(dir.clone());
            }
            match (layout, hierarchy.controller) {
                (Layout::V1 { .. }, "cpuset") | (Layout::V2 { .. }, _) => {
                    write_file(&dir.join("cpuset.cpus"), &limits.cpus.to_string())?;
                    write_file(&dir.join("cpuset.mems"), &mems)?;
                }
                _ => {}
            }
            if let Some(bytes) = limits.memory_bytes {
                match (layout, hierarchy.controller) {
                    (Layout::V1 { .. }, "memory") => {
                        write_file(&dir.join("memory.limit_in_bytes"), &bytes.to_string())?
                    }
                    (Layout::V2 { .. }, _) => {
                        write_file(&dir.join("memory.max"), &bytes.to_string())?
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Moves process `pid` (all its threads) into the group.
    pub fn admit(&self, pid: u32) -> Result<(), CgroupError> {
        for (_, dir) in &self.parts {
            add_process(dir, pid)?;
        }
        Ok(())
    }

    /// The processes in the group, in any of its hierarchies.
    pub fn members(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .parts
            .iter()
            .flat_map(|(_, dir)| read_pids(&dir.join("cgroup.procs")))
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Removes the group's directories; fails while processes remain.
    pub fn remove(&self) -> Result<(), CgroupError> {
        for (_, dir) in &self.parts {
            match std::fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(CgroupError::Remove {
                        path: dir.clone(),
                        reason: e.to_string(),
                    })
                }
            }
        }
        Ok(())
    }
}

/// Moves process `pid` into the group at `dir`. cgroup.procs takes one pid
/// per write and moves the whole thread group.
pub fn add_process(dir: &Path, pid: u32) -> Result<(), CgroupError> {
    let path = dir.join("cgroup.procs");
    OpenOptions::new()
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(format!("{pid}\n").as_bytes()))
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ESRCH) => CgroupError::Exited,
            _ => CgroupError::Write {
                value: pid.to_string(),
                path,
                reason: e.to_string(),
            },
        })
}

/// Empties a unified group's `cpuset.cpus` and `cpuset.mems` where it has
/// them: the group then has its parent's CPUs and nodes again. Kernels
/// before 6.12 refuse an empty set on a populated group (ENOSPC, a rule
/// kept from cgroup v1); there the group gets its parent's effective set,
/// which restricts nothing, and loses it when the controller is next
/// dropped from the tree.
pub fn clear_cpuset(dir: &Path) -> Result<(), CgroupError> {
    for name in ["cpuset.cpus", "cpuset.mems"] {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        match std::fs::write(&path, "\n") {
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                let parent = dir.parent().unwrap_or(dir);
                let effective = read_trimmed(&parent.join(format!("{name}.effective")))?;
                write_file(&path, &effective)?;
            }
            result => result.map_err(|e| CgroupError::Write {
                path: path.clone(),
                value: String::new(),
                reason: e.to_string(),
            })?,
        }
    }
    Ok(())
}

/// A small cgroup file's value (a regular file, at most 64 KiB).
fn read_trimmed(path: &Path) -> Result<String, CgroupError> {
    super::file::read_text(path, 64 * 1024)
        .map(|text| text.trim().to_string())
        .map_err(|e| CgroupError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

fn read_pids(path: &Path) -> Vec<u32> {
    std::fs::read_to_string(path)
        .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|e| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        reason: e.to_string(),
    })
}

/// The memory nodes a new group may use when the reserved CPUs have none
/// of their own: its parent's.
fn parent_mems(layout: &Layout, mount: &Path) -> Result<String, CgroupError> {
    let names: &[&str] = match layout {
        Layout::V1 { .. } => &["cpuset.effective_mems", "cpuset.mems"],
        Layout::V2 { .. } => &["cpuset.mems.effective"],
    };
    names
        .iter()
        .find_map(|name| std::fs::read_to_string(mount.join(name)).ok())
        .map(|text| text.trim().to_string())
        .ok_or_else(|| CgroupError::NoMems(mount.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::scratch_dir;

    const HYBRID: &str = "\
sysfs /sys sysfs rw,nosuid 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/cpuset cgroup rw,relatime,cpuset 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";

    #[test]
    fn detects_legacy_hybrid_and_unified_layouts() {
        let Some(Layout::V1 { cpuset, memory }) = Layout::detect(HYBRID) else {
            panic!("hybrid is v1 for cpusets");
        };
        assert_eq!(cpuset.mount, Path::new("/sys/fs/cgroup/cpuset"));
        assert_eq!(memory.unwrap().mount, Path::new("/sys/fs/cgroup/memory"));
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(
            Layout::detect(unified),
            Some(Layout::V2 {
                root: Hierarchy {
                    mount: "/sys/fs/cgroup".into(),
                    controller: ""
                }
            })
        );
        let combined = "cgroup /cg\\040x cgroup rw,cpu,cpuset 0 0\n";
        let Some(Layout::V1 { cpuset, memory }) = Layout::detect(combined) else {
            panic!("v1");
        };
        assert_eq!(cpuset.mount, Path::new("/cg x"));
        assert!(memory.is_none());
        assert_eq!(Layout::detect("proc /proc proc rw 0 0\n"), None);
    }

    fn fake_v1(root: &Path) -> Layout {
        for h in ["cpuset", "memory"] {
            std::fs::create_dir_all(root.join(h)).unwrap();
            std::fs::write(root.join(h).join("cgroup.procs"), "").unwrap();
        }
        std::fs::write(root.join("cpuset/cpuset.effective_mems"), "0\n").unwrap();
        Layout::detect(&format!(
            "cgroup {0}/cpuset cgroup rw,cpuset 0 0\ncgroup {0}/memory cgroup rw,memory 0 0\n",
            root.display()
        ))
        .unwrap()
    }

    /// A created group in a plain directory: its control files are written
    /// by us, so pre-create them as cgroupfs would.
    fn prepare_files(group: &Group) {
        for (_, dir) in &group.parts {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join("cgroup.procs"), "").unwrap();
        }
    }

    #[test]
    fn v1_group_gets_cpus_parent_mems_and_memory_limit() {
        let root = scratch_dir("cg-v1");
        let layout = fake_v1(&root);
        let group = Group::new(&layout, "pinner-housekeeping", true);
        assert_eq!(group.parts.len(), 2);
        assert!(!group.exists());
        prepare_files(&group);
        let limits = Limits {
            cpus: CpuSet::parse("0-1").unwrap(),
            mems: CpuSet::new(),
            memory_bytes: Some(1 << 30),
        };
        group.create(&layout, &limits).unwrap();
        let cpuset = root.join("cpuset/pinner-housekeeping");
        assert_eq!(
            std::fs::read_to_string(cpuset.join("cpuset.cpus")).unwrap(),
            "0-1"
        );
        assert_eq!(
            std::fs::read_to_string(cpuset.join("cpuset.mems")).unwrap(),
            "0"
        );
        let memory = root.join("memory/pinner-housekeeping");
        assert_eq!(
            std::fs::read_to_string(memory.join("memory.limit_in_bytes")).unwrap(),
            "1073741824"
        );
        assert!(!cpuset.join("memory.limit_in_bytes").exists());
        group.admit(42).unwrap();
        group.admit(43).unwrap();
        assert_eq!(group.members(), vec![42, 43]);
        assert_eq!(group.path(), "/pinner-housekeeping");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn v1_without_memory_limit_stays_out_of_the_memory_hierarchy() {
        let root = scratch_dir("cg-v1-nomem");
        let layout = fake_v1(&root);
        let group = Group::new(&layout, "hk", false);
        assert_eq!(group.parts.len(), 1);
        group
            .create(
                &layout,
                &Limits {
                    cpus: CpuSet::parse("0").unwrap(),
                    mems: CpuSet::parse("0").unwrap(),
                    memory_bytes: None,
                },
            )
            .unwrap();
        assert!(root.join("cpuset/hk").is_dir());
        assert!(!root.join("memory/hk").exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn v2_group_enables_controllers_and_sets_memory_max() {
        let root = scratch_dir("cg-v2");
        std::fs::write(root.join("cgroup.subtree_control"), "").unwrap();
        let layout = Layout::detect(&format!("none {} cgroup2 rw 0 0\n", root.display())).unwrap();
        let group = Group::new(&layout, "pinner-housekeeping", true);
        group
            .create(
                &layout,
                &Limits {
                    cpus: CpuSet::parse("0,2").unwrap(),
                    mems: CpuSet::parse("0").unwrap(),
                    memory_bytes: Some(512 << 20),
                },
            )
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("cgroup.subtree_control")).unwrap(),
            "+cpuset +memory"
        );
        let dir = root.join("pinner-housekeeping");
        assert_eq!(
            std::fs::read_to_string(dir.join("cpuset.cpus")).unwrap(),
            "0,2"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("memory.max")).unwrap(),
            "536870912"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_failed_create_leaves_no_directory_behind() {
        let root = scratch_dir("cg-fail");
        // No cpuset.effective_mems and no mems given: the create must fail.
        std::fs::create_dir_all(root.join("cpuset")).unwrap();
        let layout = Layout::detect(&format!(
            "cgroup {}/cpuset cgroup rw,cpuset 0 0\n",
            root.display()
        ))
        .unwrap();
        let group = Group::new(&layout, "hk", false);
        let err = group
            .create(
                &layout,
                &Limits {
                    cpus: CpuSet::parse("0").unwrap(),
                    mems: CpuSet::new(),
                    memory_bytes: None,
                },
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("memory nodes"), "{err}");
        assert!(!group.exists());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
