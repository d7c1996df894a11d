//! Where qemu keeps each guest NUMA cell's RAM, and moving those pages to a
//! host node with move_pages(2).
//!
//! libvirt gives each cell a memory backend object `ram-node<cell>` on
//! qemu's command line; qemu maps it into its address space and says where
//! only on its monitor (`gpa2hva`), which pinner does not use: libvirt marks
//! a domain whose monitor someone else spoke to as tainted. The mapping is
//! found in /proc/PID/maps instead: a file backing by the name qemu gives its
//! file (`qemu_back_mem._objects_ram-node0.XXXXXX`); anonymous and memfd
//! backings by their exact size, and when several cells have the same size,
//! by the order qemu allocates them (command-line order) against the order
//! Linux places mappings (top down: each next one lower). Any doubt (another
//! mapping of the same size, say) leaves the cell unlocated rather than
//! guessed.

use crate::host::file::{self, FileError};
use crate::host::guest_stats;
use crate::host::procs::ProcFs;
use std::collections::{BTreeMap, HashMap};

/// /proc/PID/maps: a few hundred lines for qemu.
const MAPS_CAP: u64 = 8 << 20;
/// The base page size pagemap counts in (x86-64, arm64 with 4 KiB pages).
const BASE_PAGE: u64 = 4096;
/// Pages handed to one move_pages(2) call.
const BATCH_PAGES: usize = 16 * 1024;

/// One guest cell's RAM in qemu's address space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellRam {
    /// The cell's id (`<cell id>`, qemu's `-numa node,nodeid`).
    pub cell: u32,
    pub start: u64,
    pub len: u64,
}

/// What kept the cells' RAM from being located.
#[derive(Debug, thiserror::Error)]
pub enum GuestRamError {
    /// a file of qemu's under /proc could not be read
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: FileError,
    },
}

/// How a backend object holds its memory.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Backing {
    Anonymous,
    Memfd,
    /// memory-backend-file, with its `mem-path`.
    File(String),
}

/// A cell's memory backend as qemu's command line declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Backend {
    cell: u32,
    id: String,
    backing: Backing,
    size: u64,
}

/// One line of /proc/PID/maps.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping {
    start: u64,
    end: u64,
    writable: bool,
    path: String,
}

/// The cells' RAM of qemu process `pid`, from its cmdline and maps.
pub fn cell_ram(procfs: &ProcFs, pid: u32) -> Result<Vec<CellRam>, GuestRamError> {
    let cmdline = read(procfs, pid, "cmdline", crate::host::procs::CMDLINE_CAP)?;
    let args: Vec<&str> = cmdline.split('\0').collect();
    let maps = read(procfs, pid, "maps", MAPS_CAP)?;
    Ok(locate(&backends(&args), &mappings(&maps)))
}

fn read(procfs: &ProcFs, pid: u32, name: &str, cap: u64) -> Result<String, GuestRamError> {
    let path = procfs.path(&format!("{pid}/{name}"));
    file::read_text(&path, cap).map_err(|source| GuestRamError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// The memory backends of guest cells: `-numa node,nodeid=N,memdev=ID` and
/// the `-object` of that ID (JSON, as libvirt writes it, or key=value).
fn backends(args: &[&str]) -> Vec<Backend> {
    let mut objects: Vec<(String, Backing, u64)> = Vec::new();
    let mut cells: Vec<(u32, String)> = Vec::new();
    for pair in args.windows(2) {
        match pair[0] {
            "-object" => objects.extend(parse_object(pair[1])),
            "-numa" => {
                let fields = key_values(pair[1]);
                let cell = fields.get("nodeid").and_then(|v| v.parse().ok());
                if let (Some(cell), Some(memdev)) = (cell, fields.get("memdev")) {
                    cells.push((cell, memdev.clone()));
                }
            }
            _ => {}
        }
    }
    // In the objects' order: the order qemu allocates them in.
    objects
        .into_iter()
        .filter_map(|(id, backing, size)| {
            let &(cell, _) = cells.iter().find(|(_, memdev)| *memdev == id)?;
            Some(Backend {
                cell,
                id,
                backing,
                size,
            })
        })
        .collect()
}

/// A memory backend object: (id, backing, size in bytes).
fn parse_object(arg: &str) -> Option<(String, Backing, u64)> {
    let (kind, id, size, path) = if arg.starts_with('{') {
        let value: serde_json::Value = serde_json::from_str(arg).ok()?;
        let text = |key: &str| value.get(key)?.as_str().map(str::to_string);
        let size = match value.get("size")? {
            serde_json::Value::Number(n) => n.as_u64()?,
            other => parse_size(other.as_str()?)?,
        };
        (text("qom-type")?, text("id")?, size, text("mem-path"))
    } else {
        let kind = arg.split(',').next()?.to_string();
        let mut fields = key_values(arg);
        let size = parse_size(fields.get("size")?)?;
        (kind, fields.remove("id")?, size, fields.remove("mem-path"))
    };
    let backing = match kind.as_str() {
        "memory-backend-ram" => Backing::Anonymous,
        "memory-backend-memfd" => Backing::Memfd,
        "memory-backend-file" => Backing::File(path?),
        _ => return None,
    };
    Some((id, backing, size))
}

/// `a=1,b=2` (qemu's `,,` escape for a comma in a value is not needed for
/// the fields read here: ids, numbers, paths libvirt chose).
fn key_values(arg: &str) -> HashMap<String, String> {
    arg.split(',')
        .filter_map(|field| field.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// qemu's sizes: bytes, or with a K/M/G/T suffix (powers of 1024).
fn parse_size(text: &str) -> Option<u64> {
    let (digits, shift) = match text.char_indices().last()? {
        (i, 'k' | 'K') => (&text[..i], 10),
        (i, 'm' | 'M') => (&text[..i], 20),
        (i, 'g' | 'G') => (&text[..i], 30),
        (i, 't' | 'T') => (&text[..i], 40),
        _ => (text, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

fn mappings(maps: &str) -> Vec<Mapping> {
    maps.lines()
        .filter_map(|line| {
            let mut words = line.splitn(6, ' ');
            let (start, end) = words.next()?.split_once('-')?;
            let perms = words.next()?;
            let path = words.nth(3).unwrap_or("").trim_start().to_string();
            Some(Mapping {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                writable: perms.starts_with("rw"),
                path,
            })
        })
        .collect()
}

/// Matches each backend to the one mapping that can be its RAM.
fn locate(backends: &[Backend], mappings: &[Mapping]) -> Vec<CellRam> {
    let mut found = Vec::new();
    for backend in backends {
        let candidates = candidates(backend, mappings);
        let rank = match &backend.backing {
            // A file has a name of its own: exactly one mapping, or doubt.
            Backing::File(_) => (candidates.len() == 1).then_some(0),
            // Same-sized twins: the rank-th allocated is the rank-th from
            // the top, when there are as many mappings as twins.
            _ => {
                let twins: Vec<&Backend> =
                    backends.iter().filter(|b| same_kind(b, backend)).collect();
                (twins.len() == candidates.len())
                    .then(|| twins.iter().position(|b| b.id == backend.id))
                    .flatten()
            }
        };
        if let Some(m) = rank.and_then(|r| candidates.get(r)) {
            found.push(CellRam {
                cell: backend.cell,
                start: m.start,
                len: m.end - m.start,
            });
        }
    }
    found.sort_by_key(|r| r.cell);
    found
}

fn same_kind(a: &Backend, b: &Backend) -> bool {
    a.size == b.size && a.backing == b.backing
}

/// The writable mappings of the backend's size and kind, highest first.
fn candidates<'m>(backend: &Backend, mappings: &'m [Mapping]) -> Vec<&'m Mapping> {
    let file_name = format!("qemu_back_mem._objects_{}.", backend.id);
    let mut found: Vec<&Mapping> = mappings
        .iter()
        .filter(|m| m.writable && m.end - m.start == backend.size)
        .filter(|m| match &backend.backing {
            Backing::Anonymous => m.path.is_empty(),
            Backing::Memfd => m.path.starts_with("/memfd:"),
            Backing::File(path) => {
                let path_of = m.path.trim_end_matches(" (deleted)");
                path_of == path || path_of.contains(&file_name)
            }
        })
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.start));
    found
}

/// Moves pages of another process to a node: move_pages(2), behind a trait
/// so the batching runs against a recorder in unit tests.
pub trait PageMover {
    /// Asks for each page at `pages` of `pid` to be on `node`; returns the
    /// kernel's per-page status (the node, or a negative errno).
    fn move_to(&mut self, pid: u32, pages: &[u64], node: u32) -> std::io::Result<Vec<i32>>;
    /// Reads one byte of each page at `pages` of `pid`, and drops it. The
    /// read faults a page back in that automatic NUMA balancing had mapped
    /// PROT_NONE (its scanner does that to every page in turn); Linux 6.1
    /// (measured; 6.5 fixed it) answers move_pages(2) for such a page with
    /// EFAULT, as if it were not there. Returns how many pages were read.
    fn fault_in(&mut self, pid: u32, pages: &[u64]) -> usize;
    /// Whether each of `count` base pages from `first` is mapped (NUMA
    /// balancing's PROT_NONE pages are), from /proc/PID/pagemap: pages
    /// never touched are left alone rather than faulted in for nothing.
    fn present(&mut self, pid: u32, first: u64, count: usize) -> Vec<bool>;
    /// The node each page at `pages` of `pid` is on (or a negative errno:
    /// ENOENT never touched, EFAULT not there or hidden), moving nothing.
    fn where_are(&mut self, pid: u32, pages: &[u64]) -> std::io::Result<Vec<i32>>;
}

/// The kernel's move_pages(2), process_vm_readv(2), and the pagemap
/// under its /proc.
pub struct KernelPageMover {
    proc: std::path::PathBuf,
}

impl KernelPageMover {
    pub fn new(proc: &std::path::Path) -> KernelPageMover {
        KernelPageMover {
            proc: proc.to_path_buf(),
        }
    }
}

/// A page status move_pages(2) did not write.
pub const NOT_REPORTED: i32 = i32::MIN;

/// Also moves pages other processes map (a memfd or file backing shared
/// with vhost-user, say); pinner runs as root, which this needs.
const MPOL_MF_MOVE_ALL: libc::c_int = 1 << 2;

/// move_pages(2) of `pid`'s `pages`: onto `nodes` (one per page), or with
/// None only asking where each page is.
fn move_pages(pid: u32, pages: &[u64], nodes: Option<&[libc::c_int]>) -> std::io::Result<Vec<i32>> {
    // A status the kernel leaves unwritten (it stops early when pages fail
    // to migrate, returning their count) reads as not moved.
    let mut status = vec![NOT_REPORTED; pages.len()];
    let nodes_ptr = nodes.map_or(std::ptr::null(), |n| n.as_ptr());
    // SAFETY: `pages`, `status` and (when given) `nodes` hold pages.len()
    // elements each and outlive the call; the kernel only reads `pages`
    // and `nodes` (as addresses in the other process, never dereferenced
    // here) and writes `status`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            pid as libc::c_long,
            pages.len() as libc::c_ulong,
            pages.as_ptr(),
            nodes_ptr,
            status.as_mut_ptr(),
            MPOL_MF_MOVE_ALL,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(status)
}

impl PageMover for KernelPageMover {
    fn move_to(&mut self, pid: u32, pages: &[u64], node: u32) -> std::io::Result<Vec<i32>> {
        let nodes = vec![node as libc::c_int; pages.len()];
        move_pages(pid, pages, Some(&nodes))
    }

    fn where_are(&mut self, pid: u32, pages: &[u64]) -> std::io::Result<Vec<i32>> {
        move_pages(pid, pages, None)
    }

    fn fault_in(&mut self, pid: u32, pages: &[u64]) -> usize {
        use nix::sys::uio::{process_vm_readv, RemoteIoVec};
        // The kernel's IOV_MAX: remote ranges per call.
        const IOV_MAX: usize = 1024;
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let mut read = 0;
        let mut rest = pages;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(IOV_MAX)];
            let remote: Vec<RemoteIoVec> = chunk
                .iter()
                .map(|&base| RemoteIoVec {
                    base: base as usize,
                    len: 1,
                })
                .collect();
            let mut bytes = [0u8; IOV_MAX];
            let mut local = [std::io::IoSliceMut::new(&mut bytes[..chunk.len()])];
            // The read stops at the first page it cannot read: skip that
            // one and go on after it.
            let done = process_vm_readv(pid, &mut local, &remote).unwrap_or(0);
            read += done;
            rest = &rest[(done + 1).min(rest.len())..];
        }
        read
    }

    fn present(&mut self, pid: u32, first: u64, count: usize) -> Vec<bool> {
        use std::os::unix::fs::FileExt;
        // One 64-bit entry per base page; bit 63: present.
        let mut raw = vec![0u8; count * 8];
        let path = self.proc.join(format!("{pid}/pagemap"));
        let read = std::fs::File::open(path)
            .and_then(|file| file.read_exact_at(&mut raw, first / BASE_PAGE * 8));
        if read.is_err() {
            return vec![false; count];
        }
        raw.chunks_exact(8)
            .map(|entry| u64::from_le_bytes(entry.try_into().expect("8 bytes")) >> 63 == 1)
            .collect()
    }
}

/// What moving one range did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MoveTally {
    /// Pages now on the node (moved, or there already).
    pub on_node: u64,
    /// Pages the kernel could not move, by their status: -errno (EBUSY;
    /// ENOMEM: no room on the node), another node, or [`NOT_REPORTED`].
    pub refused: BTreeMap<i32, u64>,
    /// Pages NUMA balancing had hidden, faulted in to be moved.
    pub faulted_in: u64,
    /// Where the next call should go on: None when the range is done.
    pub resume_at: Option<u64>,
}

impl MoveTally {
    /// Adds move_pages(2)'s statuses, those of pages asked onto `node`.
    fn count(&mut self, statuses: &[i32], node: u32) {
        for &status in statuses {
            match status {
                s if s == node as i32 => self.on_node += 1,
                // Never touched (ENOENT) or not a page at all (EFAULT):
                // nothing to move.
                s if s == -libc::ENOENT || s == -libc::EFAULT => {}
                s => *self.refused.entry(s).or_insert(0) += 1,
            }
        }
    }
}

/// "3 EBUSY, 1 still on node 0", from [`MoveTally::refused`].
pub fn describe_refused(refused: &BTreeMap<i32, u64>) -> String {
    let words: Vec<String> = refused
        .iter()
        .map(|(&status, count)| match status {
            NOT_REPORTED => format!("{count} without a status"),
            s if s < 0 => format!("{count} {:?}", nix::errno::Errno::from_raw(-s)),
            node => format!("{count} still on node {node}"),
        })
        .collect();
    if words.is_empty() {
        "none".into()
    } else {
        words.join(", ")
    }
}

/// Moves the pages of `pid` in `[from, end)` to `node`, `page_size` apart,
/// at most `budget` bytes of address range this call.
pub fn move_range(
    mover: &mut dyn PageMover,
    pid: u32,
    (from, end): (u64, u64),
    page_size: u64,
    node: u32,
    budget: u64,
) -> std::io::Result<MoveTally> {
    let mut tally = MoveTally::default();
    let stop = end.min(from.saturating_add(budget));
    let mut at = from;
    while at < stop {
        let count = ((stop - at).div_ceil(page_size) as usize).min(BATCH_PAGES);
        let pages: Vec<u64> = (0..count as u64).map(|i| at + i * page_size).collect();
        let statuses = mover.move_to(pid, &pages, node)?;
        tally.count(&statuses, node);
        // EFAULT: never touched, or hidden by NUMA balancing (base pages
        // only: it does not scan hugetlbfs); fault the mapped ones in and
        // ask again.
        if page_size == BASE_PAGE && statuses.contains(&-libc::EFAULT) {
            let present = mover.present(pid, at, count);
            let hidden: Vec<u64> = (0..count)
                .filter(|&i| statuses[i] == -libc::EFAULT && present[i])
                .map(|i| pages[i])
                .collect();
            let faulted = if hidden.is_empty() {
                0
            } else {
                mover.fault_in(pid, &hidden)
            };
            if faulted > 0 {
                tally.faulted_in += faulted as u64;
                tally.count(&mover.move_to(pid, &hidden, node)?, node);
            }
        }
        at += count as u64 * page_size;
    }
    tally.resume_at = (at < end).then_some(at);
    Ok(tally)
}

/// A range of a process's memory, and its page size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryRange {
    pub start: u64,
    pub end: u64,
    pub page_size: u64,
}

/// The guest's own memory of qemu process `pid` (anonymous, memfd and
/// hugetlbfs mappings, as numa_maps tells them) with resident pages on a
/// node other than `targets`, and those pages' bytes.
pub fn memory_elsewhere(
    procfs: &ProcFs,
    pid: u32,
    targets: &[u32],
) -> Result<(Vec<MemoryRange>, u64), GuestRamError> {
    let maps = read(procfs, pid, "maps", MAPS_CAP)?;
    let numa = guest_stats::numa_mappings(procfs, pid).map_err(|source| GuestRamError::Read {
        path: procfs
            .path(&format!("{pid}/numa_maps"))
            .display()
            .to_string(),
        source,
    })?;
    let mut ranges = Vec::new();
    let mut bytes = 0;
    for mapping in mappings(&maps).into_iter().filter(|m| m.writable) {
        let Some(pages) = numa.get(&mapping.start).filter(|p| p.guest_memory) else {
            continue;
        };
        let elsewhere = guest_stats::memory_split(&pages.nodes, targets).1;
        if elsewhere > 0 {
            bytes += elsewhere * pages.page_size;
            ranges.push(MemoryRange {
                start: mapping.start,
                end: mapping.end,
                page_size: pages.page_size,
            });
        }
    }
    Ok((ranges, bytes))
}

/// Keeps moves at a rate: told the bytes each batch moved, it waits as
/// long as the total takes at that rate.
pub trait Pacer {
    fn moved(&mut self, bytes: u64);
}

/// [`Pacer`] by the clock: `bytes_per_sec` (0: no wait).
pub struct RatePacer {
    bytes_per_sec: u64,
    started: std::time::Instant,
    total: u64,
}

impl RatePacer {
    pub fn new(bytes_per_sec: u64) -> RatePacer {
        RatePacer {
            bytes_per_sec,
            started: std::time::Instant::now(),
            total: 0,
        }
    }
}

impl Pacer for RatePacer {
    fn moved(&mut self, bytes: u64) {
        self.total += bytes;
        if self.bytes_per_sec == 0 {
            return;
        }
        let due = std::time::Duration::from_secs_f64(self.total as f64 / self.bytes_per_sec as f64);
        if let Some(wait) = due.checked_sub(self.started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

/// Pages looked at per paced batch (2 MiB of base pages): the most one
/// pause follows, and the most of the guest's memory in migration at once.
const PACED_BATCH: u64 = 512;

/// Moves the pages of `ranges` of `pid` that sit on a node outside
/// `targets` onto them (by turns, batch by batch, when there are several),
/// telling `pacer` and adding to `moved` the bytes of each batch.
pub fn move_paced(
    mover: &mut dyn PageMover,
    pid: u32,
    ranges: &[MemoryRange],
    targets: &[u32],
    pacer: &mut dyn Pacer,
    moved: &std::sync::atomic::AtomicU64,
) -> std::io::Result<MoveTally> {
    let mut tally = MoveTally::default();
    let mut turn = 0;
    for range in ranges {
        let mut at = range.start;
        while at < range.end {
            let count = ((range.end - at) / range.page_size).clamp(1, PACED_BATCH);
            let pages: Vec<u64> = (0..count).map(|i| at + i * range.page_size).collect();
            let off = off_target(mover, pid, (&pages, range.page_size), targets, &mut tally)?;
            if !off.is_empty() {
                let node = targets[turn % targets.len()];
                turn += 1;
                tally.count(&mover.move_to(pid, &off, node)?, node);
                let bytes = off.len() as u64 * range.page_size;
                moved.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
                pacer.moved(bytes);
            }
            at += count * range.page_size;
        }
    }
    Ok(tally)
}

/// Of `pages` (contiguous, `page_size` apart), those on a node outside
/// `targets`; pages NUMA balancing hid (EFAULT while mapped) are faulted
/// in first, as [`move_range`] does.
fn off_target(
    mover: &mut dyn PageMover,
    pid: u32,
    (pages, page_size): (&[u64], u64),
    targets: &[u32],
    tally: &mut MoveTally,
) -> std::io::Result<Vec<u64>> {
    let mut statuses = mover.where_are(pid, pages)?;
    if page_size == BASE_PAGE && statuses.contains(&-libc::EFAULT) {
        let present = mover.present(pid, pages[0], pages.len());
        let hidden: Vec<usize> = (0..pages.len())
            .filter(|&i| statuses[i] == -libc::EFAULT && present[i])
            .collect();
        if !hidden.is_empty() {
            let addresses: Vec<u64> = hidden.iter().map(|&i| pages[i]).collect();
            tally.faulted_in += mover.fault_in(pid, &addresses) as u64;
            for (i, status) in hidden.into_iter().zip(mover.where_are(pid, &addresses)?) {
                statuses[i] = status;
            }
        }
    }
    Ok(pages
        .iter()
        .zip(statuses)
        .filter(|(_, s)| *s >= 0 && !targets.contains(&(*s as u32)))
        .map(|(&page, _)| page)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// qemu 7.2's own lines (this machine, two cells: ram-node0 32 MiB
    /// anonymous, ram-node1 64 MiB memfd), with a thread stack and vga RAM.
    const MAPS: &str = "\
7f568ee00000-7f568fe00000 rw-p 00000000 00:00 0 
7f5694dfe000-7f56955fe000 rw-p 00000000 00:00 0 
7f56955fe000-7f56955ff000 ---p 00000000 00:00 0 
7f5695dff000-7f5699dff000 rw-s 00000000 00:01 1627                       /memfd:memory-backend-memfd (deleted)
7f5699e00000-7f569be00000 rw-p 00000000 00:00 0 
7f56e0a00000-7f56e1200000 r--p 00000000 08:01 1234                       /usr/lib/x86_64-linux-gnu/libc.so.6
";

    fn args(line: &str) -> Vec<&str> {
        line.split(' ').collect()
    }

    /// qemu's command line for two cells: (backend type, size) each.
    fn two_cells(cell0: (&str, &str), cell1: (&str, &str)) -> String {
        [cell0, cell1]
            .iter()
            .enumerate()
            .map(|(i, (kind, size))| {
                format!("-object {kind},id=ram-node{i},size={size} -numa node,nodeid={i},memdev=ram-node{i}")
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// (cell, start) of each cell found.
    fn starts(cmd: &str, maps: &str) -> Vec<(u32, u64)> {
        let found = locate(&backends(&args(cmd)), &mappings(maps));
        found.iter().map(|r| (r.cell, r.start)).collect()
    }

    #[test]
    fn backends_pair_numa_nodes_with_json_and_key_value_objects() {
        let cmd = args(
            "qemu -object {\"qom-type\":\"memory-backend-ram\",\"id\":\"ram-node0\",\"size\":33554432} \
             -numa node,nodeid=0,cpus=0,memdev=ram-node0 \
             -object memory-backend-memfd,id=ram-node1,size=64M \
             -numa node,nodeid=1,cpus=1,memdev=ram-node1 \
             -object memory-backend-ram,id=unused,size=1G",
        );
        let found = backends(&cmd);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(
            (found[0].cell, found[0].backing.clone(), found[0].size),
            (0, Backing::Anonymous, 32 << 20)
        );
        assert_eq!(
            (found[1].cell, found[1].backing.clone(), found[1].size),
            (1, Backing::Memfd, 64 << 20)
        );
    }

    #[test]
    fn cells_of_distinct_kinds_and_sizes_are_found_exactly() {
        let cmd = two_cells(
            ("memory-backend-ram", "32M"),
            ("memory-backend-memfd", "64M"),
        );
        let found = locate(&backends(&args(&cmd)), &mappings(MAPS));
        let ram = |cell, start, len| CellRam { cell, start, len };
        assert_eq!(
            found,
            [
                ram(0, 0x7f5699e00000, 32 << 20),
                ram(1, 0x7f5695dff000, 64 << 20)
            ]
        );
    }

    #[test]
    fn same_sized_cells_go_top_down_in_allocation_order() {
        // Two 128 MiB cells as qemu 7.2 mapped them here; its monitor's
        // gpa2hva put ram-node0 at the higher address.
        let maps = "\
7fc9b7c00000-7fc9bfc00000 rw-p 00000000 00:00 0 
7fc9bfe00000-7fc9c7e00000 rw-p 00000000 00:00 0 
";
        let cmd = two_cells(
            ("memory-backend-ram", "128M"),
            ("memory-backend-ram", "128M"),
        );
        assert_eq!(
            starts(&cmd, maps),
            [(0, 0x7fc9bfe00000), (1, 0x7fc9b7c00000)]
        );
    }

    #[test]
    fn a_size_shared_with_other_mappings_is_not_guessed() {
        // 8 MiB: the size of a thread stack, which MAPS also has.
        let cmd = two_cells(("memory-backend-ram", "8M"), ("memory-backend-ram", "16M"));
        let maps = format!("{MAPS}7f5600000000-7f5600800000 rw-p 00000000 00:00 0 \n");
        assert_eq!(starts(&cmd, &maps), [(1, 0x7f568ee00000)]);
    }

    #[test]
    fn a_file_backing_is_found_by_qemus_file_name() {
        let cmd = args(
            "qemu -object {\"qom-type\":\"memory-backend-file\",\"id\":\"ram-node1\",\"mem-path\":\"/dev/hugepages/libvirt/qemu/1-g\",\"size\":2097152} \
             -numa node,nodeid=1,memdev=ram-node1",
        );
        let maps = "\
7f0000000000-7f0000200000 rw-s 00000000 00:2e 77   /dev/hugepages/libvirt/qemu/1-g/qemu_back_mem._objects_ram-node10.Xa1b2c (deleted)
7f0000400000-7f0000600000 rw-s 00000000 00:2e 78   /dev/hugepages/libvirt/qemu/1-g/qemu_back_mem._objects_ram-node1.Q9w8e7 (deleted)
";
        let found = locate(&backends(&cmd), &mappings(maps));
        assert_eq!(
            found,
            vec![CellRam {
                cell: 1,
                start: 0x7f0000400000,
                len: 2 << 20
            }]
        );
    }

    /// Records every call; pages below `absent_below` were never touched,
    /// pages at `busy` are refused with EBUSY, pages at `hidden` answer
    /// EFAULT until faulted in (NUMA balancing's PROT_NONE on Linux 6.1,
    /// or, below `absent_below`, an unmapped page).
    struct Recorder {
        calls: Vec<(u32, Vec<u64>, u32)>,
        absent_below: u64,
        busy: Vec<u64>,
        hidden: Vec<u64>,
        faulted: Vec<u64>,
    }

    impl PageMover for Recorder {
        fn move_to(&mut self, pid: u32, pages: &[u64], node: u32) -> std::io::Result<Vec<i32>> {
            self.calls.push((pid, pages.to_vec(), node));
            Ok(pages
                .iter()
                .map(|&p| {
                    if self.hidden.contains(&p) && !self.faulted.contains(&p) {
                        -libc::EFAULT
                    } else if p < self.absent_below {
                        -libc::ENOENT
                    } else if self.busy.contains(&p) {
                        -libc::EBUSY
                    } else {
                        node as i32
                    }
                })
                .collect())
        }

        fn fault_in(&mut self, _pid: u32, pages: &[u64]) -> usize {
            self.faulted.extend(pages);
            pages.len()
        }

        /// Pages at `busy` are on node 1, hidden ones answer EFAULT until
        /// faulted in, the rest are on node 0.
        fn where_are(&mut self, _pid: u32, pages: &[u64]) -> std::io::Result<Vec<i32>> {
            Ok(pages
                .iter()
                .map(|&p| match p {
                    p if self.hidden.contains(&p) && !self.faulted.contains(&p) => -libc::EFAULT,
                    p if p < self.absent_below => -libc::ENOENT,
                    p if self.busy.contains(&p) => 1,
                    _ => 0,
                })
                .collect())
        }

        /// Every page is mapped but those below `absent_below`.
        fn present(&mut self, _pid: u32, first: u64, count: usize) -> Vec<bool> {
            (0..count as u64)
                .map(|i| first + i * BASE_PAGE >= self.absent_below)
                .collect()
        }
    }

    /// Records the bytes of each batch.
    struct Tape(Vec<u64>);

    impl Pacer for Tape {
        fn moved(&mut self, bytes: u64) {
            self.0.push(bytes);
        }
    }

    #[test]
    fn paced_moves_take_only_the_pages_elsewhere_batch_by_batch() {
        // 1,024 pages from 0x100000: the first 100 never touched, two on
        // node 1 already, one hidden by NUMA balancing; target node 1.
        let start = 0x100000;
        let page = |i: u64| start + i * BASE_PAGE;
        let mut mover = recorder(page(100), vec![page(500), page(900)], vec![page(700)]);
        let ranges = [MemoryRange {
            start,
            end: page(1024),
            page_size: BASE_PAGE,
        }];
        let mut tape = Tape(Vec::new());
        let moved = std::sync::atomic::AtomicU64::new(0);
        let tally = move_paced(&mut mover, 7, &ranges, &[1], &mut tape, &moved).unwrap();
        let pages_moved = 1024 - 100 - 2;
        assert_eq!(tally.on_node, pages_moved);
        assert_eq!(tally.faulted_in, 1);
        assert_eq!(moved.into_inner(), pages_moved * BASE_PAGE);
        // Two batches of at most 512 pages, each paced on its own.
        assert_eq!(tape.0, [(512 - 100 - 1) * BASE_PAGE, (512 - 1) * BASE_PAGE]);
        assert!(mover.calls.iter().all(|(pid, pages, node)| *pid == 7
            && *node == 1
            && !pages.contains(&page(500))
            && !pages.contains(&page(50))));
    }

    #[test]
    fn a_rate_pacer_keeps_to_its_rate() {
        let mut pacer = RatePacer::new(64 << 20);
        let started = std::time::Instant::now();
        for _ in 0..4 {
            pacer.moved(4 << 20);
        }
        // 16 MiB at 64 MiB/s: a quarter of a second, not less.
        assert!(started.elapsed() >= std::time::Duration::from_millis(250));
    }

    fn recorder(absent_below: u64, busy: Vec<u64>, hidden: Vec<u64>) -> Recorder {
        Recorder {
            calls: Vec::new(),
            absent_below,
            busy,
            hidden,
            faulted: Vec::new(),
        }
    }

    #[test]
    fn moving_goes_in_batches_within_the_budget_and_says_where_to_go_on() {
        let mut recorder = recorder(0x1000_0000 + 4096 * 10, Vec::new(), Vec::new());
        let start = 0x1000_0000;
        let end = start + 4096 * (BATCH_PAGES as u64 * 3);
        let budget = 4096 * (BATCH_PAGES as u64 * 2);
        let tally = move_range(&mut recorder, 42, (start, end), 4096, 1, budget).unwrap();
        assert_eq!(recorder.calls.len(), 2);
        assert!(recorder
            .calls
            .iter()
            .all(|(pid, pages, node)| *pid == 42 && *node == 1 && pages.len() == BATCH_PAGES));
        assert_eq!(recorder.calls[1].1[0], start + 4096 * BATCH_PAGES as u64);
        assert_eq!(tally.on_node, 2 * BATCH_PAGES as u64 - 10);
        assert_eq!(tally.resume_at, Some(start + budget));
        let rest = move_range(&mut recorder, 42, (start + budget, end), 4096, 1, budget).unwrap();
        assert_eq!(rest.resume_at, None);
        assert_eq!(rest.on_node, BATCH_PAGES as u64);
    }

    #[test]
    fn pages_hidden_by_numa_balancing_are_faulted_in_and_asked_again() {
        // Pages 0 and 1 were never touched (page 1 answers EFAULT as an
        // unmapped page does); 3 and 5 are hidden by NUMA balancing.
        let mut recorder = recorder(2 * 4096, Vec::new(), vec![4096, 3 * 4096, 5 * 4096]);
        let tally = move_range(&mut recorder, 9, (0, 6 * 4096), 4096, 1, u64::MAX).unwrap();
        assert_eq!(recorder.faulted, [3 * 4096, 5 * 4096], "mapped ones only");
        assert_eq!(recorder.calls.len(), 2);
        assert_eq!(recorder.calls[1].1, [3 * 4096, 5 * 4096], "asked again");
        assert_eq!((tally.on_node, tally.faulted_in), (4, 2));
    }

    #[test]
    fn huge_pages_are_moved_one_address_each() {
        let mut recorder = recorder(0, vec![4 << 20], Vec::new());
        let tally = move_range(&mut recorder, 7, (0, 8 << 20), 2 << 20, 0, u64::MAX).unwrap();
        assert_eq!(recorder.calls[0].1, vec![0, 2 << 20, 4 << 20, 6 << 20]);
        assert_eq!(tally.on_node, 3);
        assert_eq!(describe_refused(&tally.refused), "1 EBUSY");
        let mixed = BTreeMap::from([(NOT_REPORTED, 2), (1, 5)]);
        assert_eq!(
            describe_refused(&mixed),
            "2 without a status, 5 still on node 1"
        );
    }
}
