//! The daemon at node scale: full reconcile passes over 250 to 2,000
//! running guests on libvirt's test driver (a 256-CPU, 8-node host), with
//! the real control loop, libvirt client and placement. Prints, per guest
//! count: the first pass (every guest placed), the pass after it (what the
//! first changed is read back), a steady pass (nothing to change), a pass
//! after one guest is added, the libvirt calls of each, and the process's
//! RSS. `cargo bench -p pinner --bench scale [-- COUNTS]`
//!
//! The test driver keeps its domains per connection, so the bench opens
//! the connection, starts the guests on it, and hands the daemon that one.

use pinner::config::Config;
use pinner::daemon::control::{Daemon, Setup};
use pinner::daemon::session::{Connection, Connector};
use pinner::daemon::{HostPaths, Work};
use pinner::engine::cpuset::CpuSet;
use pinner::engine::hypervisor::{HvError, Hypervisor, Listed, Listing};
use pinner::engine::topology::Topology;
use pinner::libvirt::events::{EventsError, Sink};
use pinner::libvirt::Libvirt;
use pinner_shared::log::{Level, Logger};
use pinner_shared::protocol::Response;
use std::collections::BTreeMap;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use virt::connect::Connect;

/// libvirt calls by kind, shared with the bench.
type Calls = Arc<Mutex<BTreeMap<&'static str, u64>>>;

/// The daemon's connection, counting what it asks of libvirt. Listing the
/// running domains is one call to list them plus one XML read per domain.
struct Counted {
    libvirt: Libvirt,
    calls: Calls,
}

impl Counted {
    fn count(&self, kind: &'static str, n: u64) {
        *self.calls.lock().unwrap().entry(kind).or_default() += n;
    }
}

impl Hypervisor for Counted {
    fn list_running(&mut self, read: &dyn Fn(&Listed) -> bool) -> Result<Listing, HvError> {
        let listing = self.libvirt.list_running(read)?;
        self.count("list", 1);
        self.count(
            "xml",
            (listing.read.len() + listing.unreadable.len()) as u64,
        );
        Ok(listing)
    }
    fn set_metadata(&mut self, uuid: &str, element: &str, persistent: bool) -> Result<(), HvError> {
        self.count("metadata", 1);
        self.libvirt.set_metadata(uuid, element, persistent)
    }
    fn pin_vcpu(&mut self, uuid: &str, vcpu: u32, cpus: &CpuSet) -> Result<(), HvError> {
        self.count("pin", 1);
        self.libvirt.pin_vcpu(uuid, vcpu, cpus)
    }
    fn pin_emulator(&mut self, uuid: &str, cpus: &CpuSet) -> Result<(), HvError> {
        self.count("pin", 1);
        self.libvirt.pin_emulator(uuid, cpus)
    }
    fn pin_iothread(&mut self, uuid: &str, iothread: u32, cpus: &CpuSet) -> Result<(), HvError> {
        self.count("pin", 1);
        self.libvirt.pin_iothread(uuid, iothread, cpus)
    }
    fn set_memory_nodes(
        &mut self,
        uuid: &str,
        nodes: &CpuSet,
        restrictive: bool,
    ) -> Result<(), HvError> {
        self.count("memory", 1);
        self.libvirt.set_memory_nodes(uuid, nodes, restrictive)
    }
    fn job_active(&mut self, uuid: &str) -> Result<bool, HvError> {
        self.count("job", 1);
        self.libvirt.job_active(uuid)
    }
}

impl Connection for Counted {
    fn subscribe(&mut self, _: Sink) -> Result<(), EventsError> {
        Ok(())
    }
}

/// Hands the daemon the bench's connection.
struct Shared {
    conn: Connect,
    calls: Calls,
}

impl Connector for Shared {
    fn connect(&mut self, uri: &str, cpumap_width: u32) -> Result<Box<dyn Connection>, HvError> {
        Ok(Box::new(Counted {
            libvirt: Libvirt::wrap(self.conn.clone(), uri, cpumap_width),
            calls: self.calls.clone(),
        }))
    }
}

/// The test driver's host: 256 CPUs.
fn host_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("host.xml");
    let xml = "<node><cpu><mhz>2000</mhz><model>x86_64</model><active>256</active>\
               <max>256</max><nodes>8</nodes><sockets>2</sockets><cores>64</cores>\
               <threads>2</threads></cpu><memory>536870912</memory></node>";
    std::fs::write(&path, xml).unwrap();
    path
}

fn start_guest(conn: &Connect, i: usize) {
    let vcpus = [1, 2, 2, 4][i % 4];
    let xml = format!(
        "<domain type='test'><name>g{i:05}</name><memory>1048576</memory>\
         <vcpu>{vcpus}</vcpu><os><type>hvm</type></os></domain>"
    );
    conn.create_domain_xml(&xml, 0).expect("start a test guest");
}

fn vm_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// One pass asked for as `pinner reconcile` would: its time and calls.
fn pass(
    daemon: &mut Daemon,
    tx: &mpsc::Sender<Work>,
    rx: &mpsc::Receiver<Work>,
    calls: &Calls,
) -> (Duration, BTreeMap<&'static str, u64>, u32) {
    calls.lock().unwrap().clear();
    let (reply_tx, reply_rx) = mpsc::channel();
    tx.send(Work::Reconcile(reply_tx)).unwrap();
    let started = Instant::now();
    daemon.step(rx);
    let took = started.elapsed();
    let changed = match reply_rx.recv().unwrap() {
        Response::Reconciled(report) => report.pins_changed,
        other => panic!("unexpected answer {other:?}"),
    };
    (took, calls.lock().unwrap().clone(), changed)
}

fn describe(calls: &BTreeMap<&'static str, u64>) -> String {
    let total: u64 = calls.values().sum();
    let parts: Vec<String> = calls.iter().map(|(k, v)| format!("{k} {v}")).collect();
    format!("{total} ({})", parts.join(", "))
}

fn run(count: usize) {
    let dir = std::env::temp_dir().join(format!("pinner-scale-{}-{count}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let uri = format!("test://{}", host_file(&dir).display());
    virt::error::clear_error_callback();
    let conn = Connect::open(Some(&uri)).expect("the test driver");
    for i in 0..count {
        start_guest(&conn, i);
    }
    let mut config = Config::default();
    config.reserved_cpus = CpuSet::parse("0-3").unwrap();
    config.libvirt_uri = uri;
    config.reconcile_interval = Duration::from_secs(3600);
    let topology = Topology::synthetic(8, 2, 8, 2);
    let host = config.resolve(&topology).expect("config fits");
    let calls = Calls::default();
    let (tx, rx) = mpsc::channel();
    let mut daemon = Daemon::new(Setup {
        config,
        host,
        config_path: None,
        topology,
        paths: HostPaths {
            proc: dir.join("proc"),
            sysfs_root: dir.join("sys"),
            state_dir: dir.clone(),
            textfile_dir: dir.join("textfile"),
        },
        logger: Arc::new(Logger::new("pinner-scale", Level::Error)),
        connector: Box::new(Shared {
            conn: conn.clone(),
            calls: calls.clone(),
        }),
        work_tx: tx.clone(),
        refused: Arc::default(),
    });
    let (first, first_calls, first_changed) = pass(&mut daemon, &tx, &rx, &calls);
    // What the first pass changed is read back once.
    let (readback, readback_calls, readback_changed) = pass(&mut daemon, &tx, &rx, &calls);
    let (steady, steady_calls, steady_changed) = pass(&mut daemon, &tx, &rx, &calls);
    start_guest(&conn, count);
    let (added, added_calls, added_changed) = pass(&mut daemon, &tx, &rx, &calls);
    println!("{count} guests (RSS {:.1} MiB):", vm_rss_mib());
    let row = |name: &str, took: Duration, calls: &BTreeMap<&'static str, u64>, changed: u32| {
        println!(
            "  {name:<16} {:>9.1} ms  {:>5} pins changed  libvirt calls {}",
            took.as_secs_f64() * 1000.0,
            changed,
            describe(calls)
        );
    };
    row("first pass", first, &first_calls, first_changed);
    row(
        "read-back pass",
        readback,
        &readback_calls,
        readback_changed,
    );
    row("steady pass", steady, &steady_calls, steady_changed);
    row("one guest added", added, &added_calls, added_changed);
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    let counts: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let counts = if counts.is_empty() {
        vec![250, 500, 1000, 2000]
    } else {
        counts
    };
    for count in counts {
        run(count);
    }
}
