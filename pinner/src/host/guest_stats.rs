//! What pinning does for a guest, measured from `/proc` and sysfs (the real
//! ones, or fixtures laid out like them): how long its vCPU threads wait for
//! a CPU (steal, as the guest sees it), where its memory is, and the host's
//! NUMA hit/miss counters.

use crate::host::file::{read_bytes, read_text, FileError};
use crate::host::procs::{ProcFs, CMDLINE_CAP};
use pinner_shared::protocol::NodeNumaStatus;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

/// The qemu process running the guest with `uuid`: its command line carries
/// `-uuid UUID` and it runs in a machine cgroup libvirt made. Anyone can
/// start a process with that command line; only root can put one in
/// libvirt's cgroups, so a local user cannot pass theirs off as a guest's
/// (to have its pages moved, its figures reported). `hint` (a pid found
/// before) is checked first.
pub fn qemu_pid(procfs: &ProcFs, uuid: &str, hint: Option<u32>) -> Option<u32> {
    if uuid.is_empty() {
        return None;
    }
    let runs_guest = |pid: u32| in_machine_cgroup(procfs, pid) && has_uuid(procfs, pid, uuid);
    hint.filter(|&pid| runs_guest(pid))
        .or_else(|| procfs.pids().into_iter().find(|&pid| runs_guest(pid)))
}

/// libvirt's machine cgroups: `/machine/qemu-1-NAME.libvirt-qemu` (its
/// own, v1 or v2) or `/machine.slice/machine-qemu…scope` (systemd's). A
/// user's delegated cgroups live under /user.slice, whatever their names.
fn in_machine_cgroup(procfs: &ProcFs, pid: u32) -> bool {
    let path = procfs.path(&format!("{pid}/cgroup"));
    let Ok(text) = read_text(&path, 64 * 1024) else {
        return false;
    };
    text.lines()
        .filter_map(|line| line.splitn(3, ':').nth(2))
        .any(|group| {
            group.starts_with("/machine.slice/machine-qemu")
                || (group.starts_with("/machine/") && group.contains(".libvirt-qemu"))
        })
}

fn has_uuid(procfs: &ProcFs, pid: u32, uuid: &str) -> bool {
    read_bytes(&procfs.path(&format!("{pid}/cmdline")), CMDLINE_CAP)
        .map(|raw| {
            let mut args = raw.split(|b| *b == 0);
            while let Some(arg) = args.next() {
                if arg == b"-uuid" {
                    return args.next() == Some(uuid.as_bytes());
                }
            }
            false
        })
        .unwrap_or(false)
}

/// The guest's vCPU threads: (vCPU index, thread id), from qemu's thread
/// names ("CPU 3/KVM", "CPU 3/TCG"), read from each thread's `comm` (the
/// `procfs` crate has it only inside the whole stat line).
pub fn vcpu_threads(procfs: &ProcFs, pid: u32) -> Vec<(u32, u32)> {
    let mut threads: Vec<(u32, u32)> = procfs
        .threads(pid)
        .into_iter()
        .filter_map(|tid| {
            let comm = read_text(&procfs.path(&format!("{pid}/task/{tid}/comm")), 256).ok()?;
            let vcpu = comm.trim().strip_prefix("CPU ")?.split('/').next()?;
            Some((vcpu.parse().ok()?, tid))
        })
        .collect();
    threads.sort_unstable();
    threads
}

/// numa_maps of a qemu: a few hundred lines.
const NUMA_MAPS_CAP: u64 = 8 << 20;

/// One mapping of numa_maps: its resident pages per node, its page size,
/// and whether it is the guest's own memory.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MappingPages {
    pub nodes: BTreeMap<u32, u64>,
    pub page_size: u64,
    /// Anonymous, hugetlbfs or memfd: the guest's own. A mapped file
    /// (qemu's binary, its libraries) is page cache shared with every
    /// process that maps it; it stays where it was first read and says
    /// nothing of where the guest's memory is.
    pub guest_memory: bool,
}

/// The process's mappings by start address, from /proc/PID/numa_maps (by
/// hand: the `procfs` crate does not read it).
pub fn numa_mappings(procfs: &ProcFs, pid: u32) -> Result<HashMap<u64, MappingPages>, FileError> {
    let text = read_text(&procfs.path(&format!("{pid}/numa_maps")), NUMA_MAPS_CAP)?;
    Ok(text.lines().filter_map(parse_numa_line).collect())
}

/// "7f00 default anon=100 N0=60 N1=40 kernelpagesize_kB=4".
fn parse_numa_line(line: &str) -> Option<(u64, MappingPages)> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let start = u64::from_str_radix(words.first()?, 16).ok()?;
    let mut pages = MappingPages {
        page_size: 4096,
        guest_memory: match words.iter().find_map(|w| w.strip_prefix("file=")) {
            None => true,
            Some(file) => file.starts_with("/memfd:") || words.contains(&"huge"),
        },
        ..MappingPages::default()
    };
    for word in &words[1..] {
        if let Some(kb) = word.strip_prefix("kernelpagesize_kB=") {
            pages.page_size = kb.parse::<u64>().map_or(4096, |kb| kb * 1024);
        } else if let Some((node, count)) = word.strip_prefix('N').and_then(|w| w.split_once('=')) {
            if let (Ok(node), Ok(count)) = (node.parse(), count.parse()) {
                pages.nodes.insert(node, count);
            }
        }
    }
    Some((start, pages))
}

/// `/sys/devices/system/node/node*/numastat` under `sysfs_root`.
pub fn host_numastat(sysfs_root: &Path) -> Vec<NodeNumaStatus> {
    let dir = sysfs_root.join("sys/devices/system/node");
    let mut nodes: Vec<NodeNumaStatus> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    let node = e.file_name().to_str()?.strip_prefix("node")?.parse().ok()?;
                    let text = read_text(&e.path().join("numastat"), 64 * 1024).ok()?;
                    let mut stat = NodeNumaStatus {
                        node,
                        ..NodeNumaStatus::default()
                    };
                    for line in text.lines() {
                        let mut cols = line.split_whitespace();
                        let (Some(key), Some(value)) = (cols.next(), cols.next()) else {
                            continue;
                        };
                        let value = value.parse().unwrap_or(0);
                        match key {
                            "numa_hit" => stat.numa_hit = value,
                            "numa_miss" => stat.numa_miss = value,
                            "numa_foreign" => stat.numa_foreign = value,
                            "local_node" => stat.local_node = value,
                            "other_node" => stat.other_node = value,
                            _ => {}
                        }
                    }
                    Some(stat)
                })
                .collect()
        })
        .unwrap_or_default();
    nodes.sort_by_key(|n| n.node);
    nodes
}

/// One guest's figures at one moment.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GuestSample {
    pub pid: u32,
    pub vcpu_threads: usize,
    /// Run-queue wait of all its vCPU threads, summed.
    pub run_delay_ns: u64,
    /// Run time of all its vCPU threads, summed.
    pub run_ns: u64,
    /// Its own memory's mappings with resident pages, by start address
    /// (numa_maps; the rest is kept by nobody: a sample is kept per guest).
    pub mappings: HashMap<u64, MappingPages>,
}

impl GuestSample {
    /// The guest's own resident pages per NUMA node.
    pub fn pages(&self) -> BTreeMap<u32, u64> {
        let mut pages = BTreeMap::new();
        for mapping in self.mappings.values() {
            for (&node, &count) in &mapping.nodes {
                *pages.entry(node).or_insert(0) += count;
            }
        }
        pages
    }
}

/// Reads one guest's sample, or None when its qemu process is not found.
pub fn sample(procfs: &ProcFs, uuid: &str, hint: Option<u32>) -> Option<GuestSample> {
    let pid = qemu_pid(procfs, uuid, hint)?;
    let threads = vcpu_threads(procfs, pid);
    let (run_ns, run_delay_ns) = threads
        .iter()
        .filter_map(|&(_, tid)| procfs.schedstat_ns(pid, tid))
        .fold((0, 0), |(run, wait), (r, w)| (run + r, wait + w));
    Some(GuestSample {
        pid,
        vcpu_threads: threads.len(),
        run_delay_ns,
        run_ns,
        mappings: numa_mappings(procfs, pid)
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, m)| m.guest_memory && !m.nodes.is_empty())
            .collect(),
    })
}

/// Pages on `own` nodes and elsewhere.
pub fn memory_split(pages: &BTreeMap<u32, u64>, own: &[u32]) -> (u64, u64) {
    pages.iter().fold((0, 0), |(local, remote), (node, count)| {
        if own.contains(node) {
            (local + count, remote)
        } else {
            (local, remote + count)
        }
    })
}

/// How long a guest's demand takes to count half: a guest that turns busy
/// weighs as busy after a few minutes, and a spike of a few seconds hardly
/// moves it.
pub const DEMAND_HALF_LIFE: Duration = Duration::from_secs(60);

/// What one guest's vCPU threads did between two samples.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    /// Steal over the last interval: the growth of its vCPU threads'
    /// run-queue wait, as a share of the wall time each vCPU had (percent).
    pub steal_pct: Option<f64>,
    /// Demand: the time its vCPU threads ran or waited runnable, per
    /// second of wall time (CPUs: one vCPU always busy is 1.0), smoothed
    /// with a half-life of [`DEMAND_HALF_LIFE`].
    pub demand_cpus: Option<f64>,
    /// How long the demand has been measured (seconds): under
    /// [`DEMAND_HALF_LIFE`] it still mostly tells how the guest started
    /// (a booting guest looks idle).
    pub measured_secs: f64,
}

/// Steal and demand per guest, from its samples over time.
#[derive(Default)]
pub struct RateTracker {
    /// Per guest UUID: when the interval began, its vCPU threads' wait and
    /// run time then (ns), and the rates so far.
    guests: HashMap<String, (Instant, u64, u64, Rates)>,
}

/// Shorter spans are too noisy to report; the previous figures stand.
const MIN_INTERVAL_SECS: f64 = 0.5;

impl RateTracker {
    /// Records `sample` taken at `now`; returns the rates as of the last
    /// complete interval.
    pub fn record(&mut self, uuid: &str, now: Instant, sample: &GuestSample) -> Rates {
        let entry = self.guests.entry(uuid.to_string()).or_insert((
            now,
            sample.run_delay_ns,
            sample.run_ns,
            Rates::default(),
        ));
        let span = now.saturating_duration_since(entry.0).as_secs_f64();
        if span >= MIN_INTERVAL_SECS && sample.vcpu_threads > 0 {
            let vcpus = sample.vcpu_threads as f64;
            let waited = sample.run_delay_ns.saturating_sub(entry.1) as f64 / 1e9;
            let ran = sample.run_ns.saturating_sub(entry.2) as f64 / 1e9;
            let busy = ((waited + ran) / span).min(vcpus);
            let weight = 1.0 - 0.5f64.powf(span / DEMAND_HALF_LIFE.as_secs_f64());
            let rates = Rates {
                steal_pct: Some((100.0 * waited / (span * vcpus)).min(100.0)),
                demand_cpus: Some(
                    entry
                        .3
                        .demand_cpus
                        .map_or(busy, |d| d + weight * (busy - d)),
                ),
                measured_secs: entry.3.measured_secs + span,
            };
            *entry = (now, sample.run_delay_ns, sample.run_ns, rates);
        }
        entry.3
    }

    /// Forgets guests no longer running.
    pub fn retain(&mut self, running: impl Fn(&str) -> bool) {
        self.guests.retain(|uuid, _| running(uuid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::scratch_dir;
    use std::time::Duration;

    fn write(root: &Path, rest: &str, text: &str) {
        let path = root.join(rest);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// A qemu process (pid 400) for guest `u-1` with two vCPU threads and a
    /// helper thread, and an unrelated process.
    fn fixture() -> (std::path::PathBuf, ProcFs) {
        let root = scratch_dir("guest-stats");
        write(
            &root,
            "400/cmdline",
            "/usr/bin/qemu-system-x86_64\0-name\0guest=a\0-uuid\0u-1\0-smp\x002\0",
        );
        write(&root, "400/task/400/comm", "qemu-system-x86\n");
        write(&root, "400/task/401/comm", "CPU 0/KVM\n");
        write(&root, "400/task/402/comm", "CPU 1/KVM\n");
        write(
            &root,
            "400/task/401/schedstat",
            "5000000000 300000000 1000\n",
        );
        write(
            &root,
            "400/task/402/schedstat",
            "5000000000 100000000 1000\n",
        );
        write(
            &root,
            "400/numa_maps",
            "7f00 default anon=100 dirty=100 N0=60 N1=40 kernelpagesize_kB=4\n\
             7f10 bind:0 file=/x mapped=5 N0=5 kernelpagesize_kB=4\n\
             7f20 default file=/memfd:pc.ram\\040(deleted) dirty=3 N1=3 kernelpagesize_kB=4\n\
             7f30 bind:1 file=/dev/hugepages/libvirt/qemu/1-g/ram huge dirty=2 N1=2 kernelpagesize_kB=2048\n",
        );
        write(&root, "500/cmdline", "sshd\0-uuid-like\0u-1\0");
        write(
            &root,
            "400/cgroup",
            "4:cpuset:/machine/qemu-1-g.libvirt-qemu/emulator\n",
        );
        // A user's process with the guest's command line, in a cgroup of
        // its own naming: not the guest.
        write(&root, "300/cmdline", "qemu\0-uuid\0u-1\0");
        write(
            &root,
            "300/cgroup",
            "0::/user.slice/user-1000.slice/x/machine/y.libvirt-qemu\n",
        );
        let procfs = ProcFs::new(&root);
        (root, procfs)
    }

    #[test]
    fn numa_maps_give_pages_per_node_and_page_size() {
        let text = "\
7f5699e00000 bind:0-1 anon=300 dirty=300 N0=100 N1=200 kernelpagesize_kB=4
7f0000400000 default file=/dev/hugepages/x huge dirty=1 N1=1 kernelpagesize_kB=2048
";
        let pages: HashMap<u64, MappingPages> = text.lines().filter_map(parse_numa_line).collect();
        assert_eq!(
            memory_split(&pages[&0x7f5699e00000].nodes, &[1]),
            (200, 100)
        );
        assert_eq!(pages[&0x7f5699e00000].page_size, 4096);
        assert_eq!(pages[&0x7f0000400000].page_size, 2 << 20);
    }

    #[test]
    fn finds_the_guests_qemu_and_its_vcpu_threads() {
        let (_root, procfs) = fixture();
        assert_eq!(qemu_pid(&procfs, "u-1", None), Some(400));
        assert_eq!(qemu_pid(&procfs, "u-1", Some(500)), Some(400), "wrong hint");
        assert_eq!(
            qemu_pid(&procfs, "u-1", Some(300)),
            Some(400),
            "a user's own"
        );
        assert_eq!(qemu_pid(&procfs, "u-2", None), None);
        assert_eq!(qemu_pid(&procfs, "", None), None);
        assert_eq!(vcpu_threads(&procfs, 400), vec![(0, 401), (1, 402)]);
        let sample = sample(&procfs, "u-1", None).unwrap();
        assert_eq!(sample.run_delay_ns, 400_000_000);
        // The mapped file (5 pages on node 0) is not the guest's memory.
        assert_eq!(sample.pages(), BTreeMap::from([(0, 60), (1, 45)]));
        assert_eq!(memory_split(&sample.pages(), &[0]), (60, 45));
    }

    #[test]
    fn steal_is_the_wait_growth_per_vcpu_over_the_interval() {
        let mut tracker = RateTracker::default();
        let t0 = Instant::now();
        let mut s = GuestSample {
            pid: 1,
            vcpu_threads: 2,
            run_delay_ns: 1_000_000_000,
            run_ns: 0,
            mappings: HashMap::new(),
        };
        let steal = |r: Rates| r.steal_pct;
        assert_eq!(steal(tracker.record("u", t0, &s)), None, "no interval yet");
        s.run_delay_ns += 500_000_000;
        assert_eq!(
            steal(tracker.record("u", t0 + Duration::from_millis(100), &s)),
            None
        );
        // 0.5 s of waiting over 2 s on 2 vCPUs: 12.5 %.
        let share = steal(tracker.record("u", t0 + Duration::from_secs(2), &s)).unwrap();
        assert!((share - 12.5).abs() < 1e-9, "{share}");
        // Too short a span since: the last figure stands.
        assert_eq!(
            steal(tracker.record("u", t0 + Duration::from_millis(2100), &s)),
            Some(share)
        );
        tracker.retain(|_| false);
        assert_eq!(
            steal(tracker.record("u", t0 + Duration::from_secs(3), &s)),
            None
        );
    }

    /// Demand: run time and run-queue wait per second, in CPUs, smoothed
    /// with a 60 s half-life; never above the vCPU count.
    #[test]
    fn demand_is_busy_time_per_second_smoothed_by_its_half_life() {
        let mut tracker = RateTracker::default();
        let t0 = Instant::now();
        let mut s = GuestSample {
            vcpu_threads: 2,
            ..GuestSample::default()
        };
        let demand = |r: Rates| r.demand_cpus.unwrap();
        tracker.record("u", t0, &s);
        // 10 s: one vCPU ran 8 s and waited 2 s: 1 CPU of demand.
        s.run_ns += 8_000_000_000;
        s.run_delay_ns += 2_000_000_000;
        let first = demand(tracker.record("u", t0 + Duration::from_secs(10), &s));
        assert!((first - 1.0).abs() < 1e-9, "{first}");
        // Idle for one half-life: halfway to 0.
        let idle = demand(tracker.record("u", t0 + Duration::from_secs(70), &s));
        assert!((idle - 0.5).abs() < 1e-9, "{idle}");
        // Counters that jump past the vCPUs (a thread id reused) cap at 2.
        s.run_ns += 1_000_000_000_000;
        let capped = demand(tracker.record("u", t0 + Duration::from_secs(130), &s));
        assert!((capped - (0.5 + 0.5 * 1.5)).abs() < 1e-9, "{capped}");
    }

    #[test]
    fn reads_numastat_per_node() {
        let root = scratch_dir("numastat");
        write(
            &root,
            "sys/devices/system/node/node1/numastat",
            "numa_hit 10\nnuma_miss 2\nnuma_foreign 3\ninterleave_hit 1\nlocal_node 9\nother_node 1\n",
        );
        write(
            &root,
            "sys/devices/system/node/node0/numastat",
            "numa_hit 5\n",
        );
        write(&root, "sys/devices/system/node/possible", "0-1\n");
        let stats = host_numastat(&root);
        assert_eq!(stats.len(), 2);
        assert_eq!(stats[0].numa_hit, 5);
        assert_eq!(
            stats[1],
            NodeNumaStatus {
                node: 1,
                numa_hit: 10,
                numa_miss: 2,
                numa_foreign: 3,
                local_node: 9,
                other_node: 1
            }
        );
        assert!(host_numastat(&root.join("absent")).is_empty());
    }
}
