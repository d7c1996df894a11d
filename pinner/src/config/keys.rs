//! Every configuration key, its default and an example: the one source the
//! shipped `pinner.toml`, `docs/configuration.md` and `pinner.toml(5)` are
//! generated from, and that the tests hold against the parser.

/// What a key is when the file does not set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultValue {
    /// This TOML value; the shipped file sets it.
    Set(&'static str),
    /// This TOML value; the shipped file leaves the line commented out
    /// (nova.conf may decide it instead).
    Commented(&'static str),
    /// No value: the sentence says what happens then; the shipped file
    /// shows the example, commented out.
    Unset(&'static str),
}

/// One key of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// `""` for the top level, else the table (`isolation`).
    pub table: &'static str,
    pub name: &'static str,
    pub default: DefaultValue,
    /// A value an operator might set, as TOML.
    pub example: &'static str,
    /// What it does, in sentences.
    pub about: &'static str,
}

impl Key {
    /// `isolation.enabled`, as errors name it.
    pub fn path(&self) -> String {
        match self.table {
            "" => self.name.to_string(),
            table => format!("{table}.{}", self.name),
        }
    }

    /// The default as a reader of the docs wants it.
    pub fn default_text(&self) -> &'static str {
        match self.default {
            DefaultValue::Set(v) | DefaultValue::Commented(v) | DefaultValue::Unset(v) => v,
        }
    }
}

const fn key(
    table: &'static str,
    name: &'static str,
    default: DefaultValue,
    example: &'static str,
    about: &'static str,
) -> Key {
    Key {
        table,
        name,
        default,
        example,
        about,
    }
}

use DefaultValue::{Commented, Set, Unset};

/// `[[openstack.flavor_policy]]` is an array of tables, not a key: the
/// shipped file shows it as this commented example.
pub const FLAVOR_POLICY_EXAMPLE: &str =
    "[[openstack.flavor_policy]]\nflavor = \"cpu.*\"\npolicy = \"dedicated\"";

/// Every key, in the order of the shipped file.
pub const KEYS: &[Key] = &[
    key("", "mode", Set("\"enforce\""), "\"observe\"",
        "\"enforce\": pin, bind memory, mark guests, confine host daemons, move memory: the plan made true. \"observe\": plan on every event and interval and show what would change (`pinner status`, the journal's \"would ...\" lines, pinner_pending_changes) while writing nothing. Switch with `systemctl reload pinner`; enforce then applies the plan that was shown."),
    key("", "default_policy", Set("\"auto\""), "\"none\"",
        "The policy of a guest whose metadata names none: \"auto\" (one-to-one while the guests fit, range-bound beyond), \"dedicated\", \"shared\", or \"none\" (an opt-in host: guests are left alone until their metadata asks). A guest's own <pinner:state policy=...> always wins."),
    key("", "memory_move_mib_per_sec", Set("256"), "128",
        "How fast a running guest's memory is moved to the nodes it is placed on when pinner takes it over (first start on a busy host, observe to enforce, a reload that moves guests): MiB per second for the whole host, one guest at a time, so a takeover never takes the host's memory bandwidth at once (it does not shorten the moved guest's own stalls: docs/measurements.md). 0: at once, as libvirt's binding moves it."),
    key("", "reserved_cpus", Commented("\"\""), "\"0-1\"",
        "Housekeeping CPUs, in the kernel's list syntax (\"0-1\", \"0,24\"): never given to guests; emulator threads of dedicated guests run here. \"\": none. Must be online and must leave CPUs for guests. On OpenStack nodes nova.conf's CPU sets decide."),
    key("", "cpu_allocation_ratio", Commented("1.0"), "4.0",
        "Overcommit ratio, as nova calls it. While the guests' vCPUs fit the pool (online CPUs less reserved ones), each vCPU gets a pCPU of its own; beyond that guests are range-bound (\"shared\"), and a warning is logged once their vCPUs exceed pool size x this ratio. Must be above 0. On OpenStack nodes nova.conf decides."),
    key("", "emulator_threads", Set("\"housekeeping\""), "\"guest\"",
        "Where emulator and I/O threads of dedicated guests run: \"housekeeping\" (the reserved CPUs; the guest's own CPUs when none are reserved) or \"guest\" (always the guest's own CPUs). Shared guests keep them on their range."),
    key("", "move_cell_memory", Commented("true"), "false",
        "A guest with NUMA cells (<cpu><numa><cell .../>) has each cell's vCPUs on a host node of its own; this also moves each cell's resident memory there (move_pages(2), at most 1 GiB per pass, again when pages drift). Off: the guest's memory is bound to its cells' nodes together and each page stays where it was first touched."),
    key("", "capacity_hysteresis_percent", Commented("10"), "20",
        "Auto guests go one-to-one while all their vCPUs fit the pool, and are range-bound once they do not. Once range-bound they return to one-to-one only when their vCPUs leave this share of the pool free (percent, 0-50, rounded down to whole CPUs: a pool under 10 CPUs has no band at 10), so one guest starting and stopping at the capacity line moves its own pins, not every guest's each time. 0: no hysteresis."),
    key("", "shared_balance", Set("\"demand\""), "\"vcpus\"",
        "What shared (range-bound) guests are balanced by: \"demand\" (what their vCPUs ran or waited runnable, measured; running guests moved by [rebalance]) or \"vcpus\" (vCPU count per pCPU only, nothing measured decides, no rebalancing)."),
    key("", "demand_prior_per_vcpu", Commented("1.0"), "0.5",
        "Shared guests are balanced by demand: what their vCPUs ran or waited runnable, measured from /proc and smoothed (60 s half-life), in CPUs per pCPU of each range. A guest not measured yet counts as this many CPUs per vCPU (0.0-1.0; 1.0: taken for busy, so it goes where the measured guests leave most room). With every guest unmeasured this is balancing by vCPU count."),
    key("", "reserved_memory_mib", Commented("512"), "2048",
        "Normal memory the host keeps for itself on each NUMA node, in MiB: its daemons, and qemu's own memory beside each guest's RAM. Guests are placed only where their memory fits within MemTotal less the hugepage pools less this. On OpenStack nodes nova.conf's reserved_host_memory_mb decides (spread evenly over the nodes)."),
    key("", "reserved_huge_pages", Commented("[]"), "[\"node:0,size:1G,count:4\"]",
        "Huge pages kept from guests (OVS-DPDK's, say), in nova's syntax: one \"node:N,size:S,count:C\" per pool, S in KiB or with a unit (\"2M\", \"1G\"). On OpenStack nodes nova.conf's reserved_huge_pages decides."),
    key("", "socket", Set("\"/run/pinner/pinner.sock\""), "\"/run/pinner/pinner.sock\"",
        "Unix socket for hook events and CLI requests (root only, mode 0600). The hook always uses the default; change it only inside a private /run."),
    key("", "socket_group", Unset("none"), "\"pinner\"",
        "A group whose members may also use the daemon (status, metrics, reconcile for monitoring agents; not hook events), through a socket of their own beside the main one: pinner-group.sock, mode 0660 owned by the group. The main socket stays root's and the hook's, so a member flooding theirs never delays a hook event. Every peer is checked by its credentials (SO_PEERCRED), not only by the mode; `pinner` run by a member finds the members' socket by itself."),
    key("", "reconcile_interval_secs", Set("10"), "30",
        "Reconcile every running guest this often (seconds, 1-3600), on top of the reconciles hook and libvirt events trigger; also how often guests' steal and memory are read from /proc. A pass lists the guests (one libvirt call) and reads the XML of only those new, restarted or changed since it last read them (libvirt's events say which)."),
    key("", "full_read_interval_secs", Set("60"), "300",
        "Read every running guest's XML again this often (seconds, 1-3600), not only those events said changed: the net under a change no event announces (a vCPU hot-added with setvcpus, numatune changed by hand). Also done after every (re)connection to libvirt, after `systemctl reload pinner`, and on every pass while libvirt's events cannot be subscribed."),
    key("", "log_level", Set("\"info\""), "\"debug\"",
        "\"error\", \"warning\", \"info\" (every pinning decision) or \"debug\" (every event)."),
    key("libvirt", "uri", Set("\"qemu:///system\""), "\"qemu:///system\"",
        "The libvirt connection the daemon manages."),
    key("openstack", "nova_conf", Set("\"\""), "\"/etc/nova/nova.conf\"",
        "On an OpenStack compute node: the nova.conf to take cpu_allocation_ratio, reserved_host_cpus, cpu_dedicated_set, cpu_shared_set and the memory reserves from, so pinner and nova never disagree. With either set given, nova pins: the guests it pins are left alone, cpu_dedicated_set is never given to a guest nova did not pin, pinner's guests are range-bound on cpu_shared_set, and every other CPU is reserved. Setting the same values in this file to other numbers is refused. \"\": not an OpenStack node."),
    key("openstack", "place_floating", Set("false"), "true",
        "Where nova pins: also range-bind the guests nova floats over cpu_shared_set (node- and L3-aware, their memory with them) instead of leaving them alone."),
    key("openstack", "flavor_policy", Unset("none"), FLAVOR_POLICY_EXAMPLE,
        "Policies by nova flavor name, for nova's guests whose metadata names no policy (where nova does not pin them itself), as [[openstack.flavor_policy]] tables of flavor and policy: the first pattern that matches wins (\"*\" any characters, \"?\" one)."),
    key("isolation", "enabled", Set("false"), "true",
        "Keep host processes (sshd, libvirtd, agents, ...) on reserved_cpus so the guests' CPUs are theirs alone. Needs reserved_cpus. cgroup v1 hosts get a housekeeping cpuset group; cgroup v2 hosts run by systemd get AllowedCPUs= on system.slice, user.slice and init.scope (runtime only). Never moved: PID 1, kernel threads, guests (libvirt's machine cgroups), the exclude list, and processes in other tools' cpuset groups (containers). `pinner isolate undo` puts everything back."),
    key("isolation", "exclude", Set("[\"ovs-vswitchd\", \"ovsdb-server\"]"), "[\"ovs-vswitchd\", \"/system.slice/dpdk.service\"]",
        "Process names (as in /proc/PID/comm, or argv[0]'s base name) and cgroup paths (starting with \"/\") never moved."),
    key("isolation", "memory_limit", Unset("none"), "\"4G\"",
        "Memory limit of the housekeeping group: bytes, or \"512M\", \"4G\"."),
    key("isolation", "restore_on_exit", Set("false"), "true",
        "Put everything back when the daemon stops (systemctl stop pinner)."),
    key("isolation", "steer_irqs", Set("true"), "false",
        "Steer device interrupts (/proc/irq) to the reserved CPUs too; undo puts each one back. irqbalance must ban the guests' CPUs or it moves them back (`pinner isolate` says what to set)."),
    key("isolation", "pid_dirs", Set("[\"/run\", \"/var/run\"]"), "[\"/run\"]",
        "Daemons that (re)start and write a pid file here (or one directory below) are confined at once."),
    key("isolation", "sweep_interval_secs", Set("2"), "5",
        "Every other new process is confined by a /proc sweep this often (seconds, 1-3600)."),
    key("isolation", "group", Set("\"pinner-housekeeping\""), "\"housekeeping\"",
        "Name of pinner's cgroup (cgroup v1, and v2 without systemd)."),
    key("rebalance", "threshold_percent", Commented("10"), "20",
        "A running shared guest moves when one range's demand per pCPU stays above another's by this much (percent of a CPU per pCPU, 1-100): two L3 ranges of one node, or two nodes. A move must also narrow that gap by as much. Within a node first (no memory moves); across nodes only to a node whose free memory holds the guest, its memory then moved at memory_move_mib_per_sec before it is bound."),
    key("rebalance", "samples", Commented("3"), "5",
        "Consecutive observations (one per reconcile interval) the gap must last before anything moves (1-100); a guest's demand for this is its highest over twice as many, so a burst or a lull moves nothing."),
    key("rebalance", "cooldown_secs", Commented("600"), "1800",
        "A guest moved is not moved again for this long (seconds, 1-86400)."),
    key("rebalance", "max_moves", Commented("2"), "0",
        "Guests moved per observation at most (0-64). 0: no rebalancing; shared guests stay where they were placed."),
    key("metrics", "file", Unset("/var/lib/prometheus/node-exporter/pinner.prom when that directory exists, else none"), "\"/var/lib/node_exporter/textfile/pinner.prom\"",
        "A metrics file (Prometheus text) the daemon keeps current for node_exporter's textfile collector: written as a new file renamed into place, never through a link, only in a directory no other user may write. Unset: node_exporter's textfile directory as Debian and Ubuntu package it, when it exists. \"\": no file; `pinner metrics` prints the same text on demand. The unit may write only there, under /var/lib/prometheus and /var/lib/node_exporter: another directory needs ReadWritePaths= in a drop-in (`systemctl edit pinner`)."),
    key("metrics", "interval_secs", Set("15"), "60",
        "How often the metrics file is rewritten (seconds, 1-3600)."),
];

/// Words of `text` in lines of at most `width` characters.
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

const SHIPPED_HEADER: &str =
    "# pinner configuration (/etc/pinner/pinner.toml). Every key is optional;
# the values shown are the built-in defaults, and lines commented out are
# keys whose default is no value or that nova.conf decides on OpenStack
# nodes. `systemctl reload pinner` (SIGHUP) re-reads this file; a broken
# file is reported with file:line and the running config is kept.
# Every key: man pinner.toml. Generated from pinner/src/config/keys.rs.
";

/// The configuration file the packages ship.
pub fn shipped_file() -> String {
    let mut out = String::from(SHIPPED_HEADER);
    let mut table = "";
    for key in KEYS {
        if key.table != table {
            table = key.table;
            out += &format!("\n[{table}]\n");
        } else {
            out.push('\n');
        }
        for line in wrap(key.about, 74) {
            out += &format!("# {line}\n");
        }
        out += &match (key.default, key.name) {
            (_, "flavor_policy") => commented(FLAVOR_POLICY_EXAMPLE),
            (Set(v), _) => format!("{} = {v}\n", key.name),
            (Commented(v), _) => format!("#{} = {v}\n", key.name),
            (Unset(_), _) => format!("#{} = {}\n", key.name, key.example),
        };
    }
    out
}

fn commented(lines: &str) -> String {
    lines.lines().map(|l| format!("#{l}\n")).collect()
}

/// `docs/configuration.md`.
pub fn markdown() -> String {
    let mut out = String::from(
        "# Configuration\n\n`/etc/pinner/pinner.toml` (`--config FILE` for another). Every key is\n\
         optional. It must be a regular file (or a symlink to one) of at most 1 MiB;\n\
         `systemctl reload pinner` re-reads it, and a broken file is refused with\n\
         its file, line and column while the running configuration stays. The same\n\
         text is `man pinner.toml`; both are generated from\n\
         `pinner/src/config/keys.rs` (`scripts/generate`).\n\n\
         | key | default | example | meaning |\n| --- | --- | --- | --- |\n",
    );
    for key in KEYS {
        let name = match key.table {
            "" => format!("`{}`", key.name),
            table => format!("`[{table}] {}`", key.name),
        };
        let default = match key.default {
            Unset(text) => text.to_string(),
            _ => format!("`{}`", key.default_text()),
        };
        let example = key.example.replace('\n', " ");
        let about = key.about.replace('|', "\\|");
        out += &format!("| {name} | {default} | `{example}` | {about} |\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn in_table(key: &Key, value: &str) -> String {
        match (key.table, key.name) {
            (_, "flavor_policy") => value.to_string(),
            ("", name) => format!("{name} = {value}\n"),
            (table, name) => format!("[{table}]\n{name} = {value}\n"),
        }
    }

    /// The configuration `text` gives, without the lines its keys were on.
    fn parse(text: &str) -> Config {
        let mut config = Config::parse(text, Path::new("/etc/pinner/pinner.toml"))
            .unwrap_or_else(|e| panic!("{text:?} refused: {e}"));
        config.reserved_cpus_line = None;
        config.ratio_line = None;
        config.reserved_memory_line = None;
        config.reserved_huge_pages_line = None;
        config
    }

    #[test]
    fn every_documented_default_is_the_parsers_default() {
        let defaults = parse("");
        for key in KEYS {
            if let Set(v) | Commented(v) = key.default {
                assert_eq!(parse(&in_table(key, v)), defaults, "{} = {v}", key.path());
            }
        }
    }

    #[test]
    fn every_example_is_accepted_and_changes_something() {
        let defaults = parse("");
        for key in KEYS
            .iter()
            .filter(|k| k.name != "socket" && k.name != "uri")
        {
            let text = in_table(key, key.example);
            let config = if key.name == "socket_group" {
                Config::parse(&text, Path::new("/x"))
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            } else {
                assert_ne!(
                    parse(&text),
                    defaults,
                    "{} = {} changes nothing",
                    key.path(),
                    key.example
                );
                Ok(())
            };
            // A group that does not exist here is refused by name, not by syntax.
            if let Err(e) = config {
                assert!(e.contains("pinner"), "{}: {e}", key.path());
            }
        }
    }

    /// Parsing a key the file does not know lists every key serde knows:
    /// each of them must be documented here.
    #[test]
    fn every_key_the_parser_knows_is_documented() {
        let tables = ["libvirt", "openstack", "isolation", "rebalance", "metrics"];
        for table in std::iter::once("").chain(tables) {
            let text = match table {
                "" => "no_such_key = 1\n".to_string(),
                t => format!("[{t}]\nno_such_key = 1\n"),
            };
            // The message whole: the display caps it.
            let error = Config::parse(&text, Path::new("/x")).unwrap_err().message;
            let known: Vec<&str> = error.split('`').skip(3).step_by(2).collect();
            assert!(!known.is_empty(), "{error}");
            for name in known {
                let documented = KEYS.iter().any(|k| k.table == table && k.name == name)
                    || (table.is_empty() && tables.contains(&name));
                assert!(documented, "[{table}] {name} is parsed but not documented");
            }
        }
    }

    #[test]
    fn the_shipped_file_parses_to_the_defaults() {
        assert_eq!(parse(&shipped_file()), parse(""));
        for line in shipped_file().lines() {
            assert!(line.len() <= 80, "{line:?}");
        }
    }

    #[test]
    fn generated_files_in_the_repository_are_current() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        for (path, text) in [
            ("packaging/pinner.toml", shipped_file()),
            ("docs/configuration.md", markdown()),
        ] {
            let found = std::fs::read_to_string(repo.join(path)).unwrap_or_default();
            assert!(found == text, "{path} is stale: run scripts/generate");
        }
    }
}
