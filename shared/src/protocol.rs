//! Messages on the daemon socket: hook events and CLI requests/responses.

use serde::{Deserialize, Serialize};

/// The operations libvirt passes to a qemu hook as its second argument.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HookOp {
    Prepare,
    Start,
    Started,
    Stopped,
    Release,
    Migrate,
    Restore,
    Reconnect,
    Attach,
}

impl HookOp {
    pub const ALL: [HookOp; 9] = [
        HookOp::Prepare,
        HookOp::Start,
        HookOp::Started,
        HookOp::Stopped,
        HookOp::Release,
        HookOp::Migrate,
        HookOp::Restore,
        HookOp::Reconnect,
        HookOp::Attach,
    ];

    pub fn parse(word: &str) -> Option<HookOp> {
        HookOp::ALL.into_iter().find(|op| op.as_str() == word)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HookOp::Prepare => "prepare",
            HookOp::Start => "start",
            HookOp::Started => "started",
            HookOp::Stopped => "stopped",
            HookOp::Release => "release",
            HookOp::Migrate => "migrate",
            HookOp::Restore => "restore",
            HookOp::Reconnect => "reconnect",
            HookOp::Attach => "attach",
        }
    }

    /// Whether the set of running guests (and so the placement) may have
    /// changed once libvirt finishes this operation. `prepare`/`start` come
    /// before the guest runs and `migrate`/`restore` before `started`, so only
    /// the others trigger a reconcile.
    pub fn changes_placement(self) -> bool {
        matches!(
            self,
            HookOp::Started
                | HookOp::Stopped
                | HookOp::Release
                | HookOp::Reconnect
                | HookOp::Attach
        )
    }

    /// libvirt reads the hook's stdout as the domain XML for these.
    pub fn echoes_xml(self) -> bool {
        matches!(self, HookOp::Migrate | HookOp::Restore)
    }
}

/// One domain event, as the hook hands it to the daemon.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct HookEvent {
    pub op: HookOp,
    pub sub_op: String,
    /// Domain name; data only, never a path or shell word.
    pub name: String,
    /// Domain UUID from the XML; empty when the XML could not be read.
    pub uuid: String,
    /// vCPUs online at start (`<vcpu current=…>` or its text); 0 if unknown.
    pub vcpus: u32,
    /// When the hook ran, nanoseconds since the Unix epoch.
    pub sent_at_unix_ns: u64,
}

impl HookEvent {
    /// Which guest it is about: its UUID, else (XML unreadable) its name.
    pub fn guest_key(&self) -> &str {
        if self.uuid.is_empty() {
            &self.name
        } else {
            &self.uuid
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Request {
    /// From the hook; the daemon sends no answer.
    Event(HookEvent),
    /// Current pins against the plan, without changing anything.
    Status,
    /// Reconcile now and report what was done.
    Reconcile,
    /// Take pinner's pins, binding and metadata off running guests.
    Release(ReleaseRequest),
}

/// `pinner release`: which guests, and whether their persistent
/// definitions are marked too.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct ReleaseRequest {
    /// Exact libvirt names.
    pub domains: Vec<String>,
    /// Every running guest pinner placed.
    pub all: bool,
    /// Also mark the persistent definition `policy="none"`, so the guest
    /// stays left alone after it restarts.
    pub persistent: bool,
}

/// What `pinner release` did to one guest.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Released {
    pub name: String,
    /// Empty when no running guest has the name.
    pub uuid: String,
    /// Each change made, for a person ("vCPU 0: 4 -> 0-7").
    pub changes: Vec<String>,
    /// What was left as it was, and why.
    pub notes: Vec<String>,
    /// The change libvirt refused, if one was (the rest were not tried).
    pub error: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Response {
    /// Boxed: a status is large beside the other answers.
    Status(Box<StatusReport>),
    Reconciled(ReconcileReport),
    Released(Vec<Released>),
    Error(String),
    /// A hook event was queued: the hook counts an event as delivered only
    /// on this answer.
    Accepted,
}

/// What the daemon knows of the host and every running guest.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct StatusReport {
    /// `dedicated` (one-to-one) or `shared` (range binding).
    pub mode: String,
    /// `enforce` (the plan is applied) or `observe` (only shown).
    #[serde(default)]
    pub enforcement: String,
    pub pool: Vec<u32>,
    pub reserved: Vec<u32>,
    /// vCPUs per pool CPU the host allows (pinner.toml or nova.conf).
    #[serde(default)]
    pub cpu_allocation_ratio: f64,
    pub libvirt_connected: bool,
    pub domains: Vec<DomainStatus>,
    pub warnings: Vec<String>,
    pub counters: Counters,
    /// How long started guests ran before their last pin was applied.
    pub pin_latency: LatencySummary,
    /// The host's NUMA allocation counters per node (pages since boot).
    pub numa: Vec<NodeNumaStatus>,
    /// Host processes pinner keeps on the reserved CPUs (None: isolation
    /// off).
    pub isolated_processes: Option<u64>,
    /// Each node's guest memory of each kind against what guests may take.
    #[serde(default)]
    pub memory: Vec<NodeMemoryStatus>,
    /// The last reconcile pass, as `pinner reconcile` reports one (None:
    /// none yet).
    #[serde(default)]
    pub last_pass: Option<ReconcileReport>,
    /// Each range shared guests are bound to: its demand against its CPUs.
    #[serde(default)]
    pub ranges: Vec<RangeStatus>,
    /// Running shared guests moved by rebalancing, newest last (at most
    /// the last few).
    #[serde(default)]
    pub rebalanced: Vec<RebalanceStatus>,
}

/// One range shared guests are bound to (`pinner status --json` and
/// `pinner plan --json` alike).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct RangeStatus {
    pub cpus: Vec<u32>,
    pub nodes: Vec<u32>,
    pub guests: u32,
    pub vcpus: u32,
    /// The guests' demand summed, in CPUs: measured (or given to `plan
    /// --demand`), else the prior per vCPU.
    pub demand_cpus: f64,
    /// Guests counted at the prior: not measured yet.
    pub unmeasured: u32,
}

/// A move rebalancing made.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct RebalanceStatus {
    pub domain: String,
    pub uuid: String,
    pub from: Vec<u32>,
    pub to: Vec<u32>,
    pub across_nodes: bool,
    /// Demand per pCPU of the range it left and the one it went to,
    /// before the move.
    pub busy: f64,
    pub idle: f64,
    pub at_unix_secs: u64,
}

/// One node's memory of one kind (`pinner status --json` and `pinner plan
/// --json` alike): what guests may take there, and what the guests placed
/// there (and those pinner leaves alone) commit.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct NodeMemoryStatus {
    pub node: u32,
    /// "normal", or a hugetlb pool as sysfs names it ("hugepages-2048kB").
    pub kind: String,
    /// The pool's page size in KiB (None: normal pages).
    pub page_size_kib: Option<u64>,
    /// MemTotal less the hugepage pools and the host's reserve, or the
    /// pool less its reserved pages, in KiB (None: the node's size is not
    /// known, and nothing limits it).
    pub capacity_kib: Option<u64>,
    /// What guests take there, in KiB.
    pub committed_kib: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct NodeNumaStatus {
    pub node: u32,
    /// Allocations served from this node as intended.
    pub numa_hit: u64,
    /// Allocations meant for another node that landed here.
    pub numa_miss: u64,
    /// Allocations meant for this node that landed elsewhere.
    pub numa_foreign: u64,
    pub local_node: u64,
    pub other_node: u64,
}

/// Hook `started` event to pins applied, over the last guests started.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct LatencySummary {
    pub count: u64,
    pub median_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct DomainStatus {
    pub name: String,
    pub uuid: String,
    /// `dedicated`, `shared`, `none` (opted out) or `foreign` (pinned by
    /// someone else; left alone).
    pub policy: String,
    pub vcpus: Vec<VcpuStatus>,
    /// Emulator threads' CPUs as libvirt reports them (empty: unpinned).
    pub emulator: Vec<u32>,
    pub planned_emulator: Vec<u32>,
    /// Every pin matches the plan.
    pub in_sync: bool,
    pub reason: String,
    /// NUMA nodes the guest's memory is bound to (empty: not bound).
    pub memory_nodes: Vec<u32>,
    pub planned_memory_nodes: Vec<u32>,
    /// Why the memory binding is left as it is, if it is.
    pub memory_note: String,
    /// The guest's memory (`<memory>`), in KiB.
    #[serde(default)]
    pub memory_kib: u64,
    /// The huge page size its memory is made of, in KiB (None: normal pages).
    #[serde(default)]
    pub hugepage_kib: Option<u64>,
    /// From the hook's `started` event to the guest's last pin applied, in
    /// milliseconds (None: not started while this daemon ran).
    pub pin_latency_ms: Option<f64>,
    /// The guest's qemu process (None: not found in /proc).
    pub qemu_pid: Option<u32>,
    /// Share of its vCPUs' wall time spent waiting for a host CPU over the
    /// last interval, in percent: the steal the guest sees.
    pub steal_pct: Option<f64>,
    /// That wait summed over its vCPU threads since they started, seconds.
    pub steal_seconds: Option<f64>,
    /// What its vCPUs ran or waited runnable, in CPUs, smoothed (a 60 s
    /// half-life): its demand, whatever it was given.
    #[serde(default)]
    pub demand_cpus: Option<f64>,
    /// Resident pages on the guest's own NUMA nodes (its memory nodes, else
    /// its vCPUs' nodes) and elsewhere, from /proc/PID/numa_maps.
    pub memory_pages_local: Option<u64>,
    pub memory_pages_remote: Option<u64>,
    /// The guest's NUMA cells pinner placed one by one, with where their
    /// memory is (empty: no cells, or one host node).
    #[serde(default)]
    pub cells: Vec<CellStatus>,
    /// What the daemon would change to make the plan true: all of it in
    /// observe mode, what is still to do in enforce mode.
    #[serde(default)]
    pub pending: Vec<PendingChange>,
}

/// One change between what libvirt holds and the plan.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct PendingChange {
    /// `pin_vcpu`, `pin_emulator`, `pin_iothread` or `memory`: the OP of
    /// the journal line the change is logged with once made.
    pub op: String,
    /// The vCPU or IOThread (None: the emulator threads, the memory).
    pub id: Option<u32>,
    /// CPUs (nodes, for memory) now; empty: not pinned (bound) at all.
    pub from: Vec<u32>,
    pub to: Vec<u32>,
    /// For a person: "would move vCPU 2 from 4-7 to 9".
    pub text: String,
}

/// One guest NUMA cell: its host node and its RAM's pages.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct CellStatus {
    pub cell: u32,
    /// The host node of its vCPUs (None: it spans nodes).
    pub node: Option<u32>,
    /// Where qemu holds the cell's RAM: its host virtual address and size
    /// (None: not located in the qemu process).
    pub ram_address: Option<u64>,
    pub ram_bytes: Option<u64>,
    /// Resident pages of that RAM on the cell's node, and elsewhere.
    pub pages_on_node: Option<u64>,
    pub pages_elsewhere: Option<u64>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct VcpuStatus {
    pub vcpu: u32,
    /// CPUs as libvirt reports them (empty: unpinned, may run anywhere).
    pub cpus: Vec<u32>,
    pub planned: Vec<u32>,
}

/// Running totals since the daemon started.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Counters {
    /// Hook events received.
    pub events_received: u64,
    /// Hook events the hook could not hand over (daemon down, socket
    /// missing, deadline), counted by the hook beside the socket since boot.
    pub hook_events_dropped: u64,
    /// Connections refused or requests dropped: bad frames, peers not
    /// allowed, too many connections at once.
    pub requests_refused: u64,
    /// Pin changes libvirt reported that pinner did not make (by hand,
    /// another tool): each asks for a reconcile.
    pub outside_pin_changes: u64,
    pub reconciles: u64,
    /// Time spent in reconcile passes, summed (seconds).
    pub reconcile_seconds: f64,
    /// Reconciles that served events (hook or libvirt): fewer than the
    /// events when a burst shares passes.
    pub event_passes: u64,
    pub pins_applied: u64,
    pub apply_errors: u64,
    pub libvirt_reconnects: u64,
    /// Calls made to libvirt (each a round trip to libvirtd): passes,
    /// status answers, releases.
    pub libvirt_calls: u64,
    /// Passes that read every guest's XML, not only the changed ones.
    pub full_reads: u64,
    /// Guests a full read found changed though no event had said so.
    pub changes_found_by_full_read: u64,
    /// Running shared guests rebalancing moved.
    #[serde(default)]
    pub rebalance_moves: u64,
}

/// The outcome of one reconcile.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct ReconcileReport {
    pub mode: String,
    pub domains: u32,
    /// vCPU and emulator pins changed by this reconcile.
    pub pins_changed: u32,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    /// Guests whose XML the pass read (the others were known unchanged).
    pub domains_read: u32,
    /// Whether it read every guest (its interval, a new connection, no
    /// events).
    pub full_read: bool,
    pub libvirt_calls: u64,
    /// How long the pass took.
    pub seconds: f64,
}
