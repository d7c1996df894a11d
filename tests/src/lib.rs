//! A private libvirtd for end-to-end tests, so nothing touches the host's
//! own libvirt.
//!
//! A holder process (`unshare --mount`, then `sleep`) owns a private mount
//! namespace in which sandbox directories are bind-mounted over `/run`,
//! `/etc/libvirt`, `/var/lib/libvirt`, `/var/log/libvirt` and
//! `/var/cache/libvirt`. libvirtd runs inside it (`nsenter`), and with it the
//! real `pinner-hook` installed as `/etc/libvirt/hooks/qemu.d/50-pinner`,
//! which connects to `/run/pinner/pinner.sock`. Because `/run` is a bind
//! mount of the sandbox's own `run/` directory, the daemon and every client
//! can stay outside: the daemon listens on `<sandbox>/run/pinner/pinner.sock`
//! and reaches libvirt through `qemu:///system?socket=<sandbox>/run/libvirt/libvirt-sock`.
//!
//! Guests are TCG (`type='qemu'`), 64 MiB, no disk. Everything is torn down
//! on drop, also when a test panics.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const SANDBOX_MOUNTS: [(&str, &str); 5] = [
    ("run", "/run"),
    ("etc", "/etc/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("log", "/var/log/libvirt"),
    ("cache", "/var/cache/libvirt"),
];

/// Where the daemon writes metrics by default (config `[metrics] file`
/// unset), masked in every sandbox.
const NODE_EXPORTER_DIR: &str = "/var/lib/prometheus/node-exporter";

static SANDBOX_SEQ: AtomicU32 = AtomicU32::new(0);

pub struct Sandbox {
    pub dir: PathBuf,
    /// Prefix of every guest name, unique per sandbox: libvirt names machine
    /// cgroups after guests, and the host's cgroupfs is shared.
    prefix: String,
    bin_dir: PathBuf,
    holder: Child,
    libvirtd: Option<Child>,
    daemon: Option<Child>,
    /// `reconcile_interval_secs` for the daemon's config.
    pub reconcile_interval_secs: u64,
    /// Top-level TOML lines added to the daemon's config.
    pub extra_config: String,
    /// Environment variables the daemon is started with.
    pub daemon_env: Vec<(String, String)>,
    /// A command the daemon is started under (`prlimit --nofile=…`, say).
    pub daemon_wrapper: Vec<String>,
}

/// Why a sandbox cannot run here, or None when it can.
pub fn missing_requirement() -> Option<String> {
    let uid = fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m));
    if uid.ok() != Some(0) {
        return Some("needs root (mount namespaces, libvirtd)".into());
    }
    for tool in [
        "unshare",
        "nsenter",
        "libvirtd",
        "virsh",
        "qemu-system-x86_64",
    ] {
        if which(tool).is_none() {
            return Some(format!(
                "needs `{tool}` (Debian: libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86)"
            ));
        }
    }
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    if !passwd.lines().any(|l| l.starts_with("libvirt-qemu:")) {
        return Some("needs the libvirt-qemu user, which libvirtd resolves before reading qemu.conf (scripts/setup creates it)".into());
    }
    let bins = bin_dir();
    for bin in ["pinner", "pinner-hook"] {
        if !bins.join(bin).exists() {
            return Some(format!(
                "needs {} built (cargo build --workspace)",
                bins.join(bin).display()
            ));
        }
    }
    None
}

/// Skips (returns None) when the sandbox cannot run here, saying why; under
/// CI a missing requirement is a failure, never a silent skip.
pub fn sandbox_or_skip(test: &str) -> Option<Sandbox> {
    if let Some(reason) = missing_requirement() {
        if std::env::var_os("CI").is_some() {
            panic!("{test}: end-to-end test cannot run: {reason}");
        }
        eprintln!("SKIPPED {test}: {reason}");
        return None;
    }
    Some(Sandbox::start())
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// The daemon's acknowledgement of a hook event, for stand-in daemons.
pub fn accepted_frame() -> Vec<u8> {
    pinner_shared::wire::encode(&pinner_shared::protocol::Response::Accepted).expect("encodes")
}

/// Where the workspace's binaries are: beside this executable (a bin), or
/// one level up (a test, which lives in `deps/`). `PINNER_BIN_DIR` overrides.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PINNER_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current exe");
    let here = exe.parent().expect("exe dir").to_path_buf();
    if here.join("pinner").exists() || here.file_name() != Some("deps".as_ref()) {
        here
    } else {
        here.parent().expect("target dir").to_path_buf()
    }
}

/// Parses the kernel/libvirt list syntax ("0-2,5").
pub fn cpu_list(text: &str) -> Vec<u32> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                cpus.extend(a.trim().parse::<u32>().unwrap()..=b.trim().parse::<u32>().unwrap())
            }
            None => cpus.push(part.trim().parse().unwrap()),
        }
    }
    cpus
}

/// The host's online CPUs.
pub fn online_cpus() -> Vec<u32> {
    cpu_list(&fs::read_to_string("/sys/devices/system/cpu/online").expect("sysfs"))
}

/// Polls `check` until it returns Ok or `timeout` passes; the error says what
/// was last seen.
pub fn wait_for<T>(
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(format!("after {timeout:?}: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

impl Sandbox {
    pub fn start() -> Sandbox {
        let seq = SANDBOX_SEQ.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}{seq}", std::process::id() % 100_000);
        let dir = PathBuf::from(format!("/tmp/pinner-e2e-{tag}"));
        let _ = fs::remove_dir_all(&dir);
        for (sub, _) in SANDBOX_MOUNTS {
            fs::create_dir_all(dir.join(sub)).expect("sandbox dir");
        }
        fs::create_dir_all(dir.join("etc/hooks/qemu.d")).unwrap();
        // libvirtd as root without virtlogd, AppArmor or SELinux labelling.
        fs::write(
            dir.join("etc/qemu.conf"),
            "user = \"root\"\ngroup = \"root\"\nsecurity_driver = \"none\"\nstdio_handler = \"file\"\n",
        )
        .unwrap();
        // A host of its own to libvirt: its own UUID and (below, in its own
        // UTS namespace) hostname, so a migration between two sandboxes is
        // not taken for one to the same host.
        fs::write(
            dir.join("etc/libvirtd.conf"),
            format!(
                "unix_sock_group = \"root\"\nhost_uuid = \"{}\"\n",
                host_uuid(&tag)
            ),
        )
        .unwrap();
        let hook = dir.join("etc/hooks/qemu.d/50-pinner");
        fs::copy(bin_dir().join("pinner-hook"), &hook).expect("install pinner-hook");
        fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();

        // Bind mounts need their mount points; these are the directories the
        // libvirt daemon package owns, created empty when absent.
        let mut script = String::from("set -e\n");
        for (sub, target) in SANDBOX_MOUNTS {
            script += &format!(
                "mkdir -p {target}\nmount --bind {} {target}\n",
                dir.join(sub).display()
            );
        }
        // The daemon writes its metrics to node_exporter's textfile
        // directory when it exists: the sandbox has an empty one of its own
        // there (where the host has one), never the host's.
        fs::create_dir_all(dir.join("textfile")).unwrap();
        script += &format!(
            "if [ -d {NODE_EXPORTER_DIR} ]; then mount --bind {} {NODE_EXPORTER_DIR}; fi\n",
            dir.join("textfile").display()
        );
        script += &format!(
            "hostname pinner-sandbox-{tag}\ntouch {}\nexec sleep 86400\n",
            dir.join("ready").display()
        );
        let holder = Command::new("unshare")
            .args([
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                &script,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                fs::File::create(dir.join("holder.log")).unwrap(),
            ))
            .spawn()
            .expect("spawn unshare");
        let mut sandbox = Sandbox {
            prefix: format!("e{tag}-"),
            dir,
            bin_dir: bin_dir(),
            holder,
            libvirtd: None,
            daemon: None,
            reconcile_interval_secs: 10,
            extra_config: String::new(),
            daemon_env: Vec::new(),
            daemon_wrapper: Vec::new(),
        };
        let ready = sandbox.dir.join("ready");
        if let Err(e) = wait_for(Duration::from_secs(10), || {
            if ready.exists() {
                Ok(())
            } else {
                Err("mount namespace not ready".into())
            }
        }) {
            panic!("{e}: {}", sandbox.read("holder.log"));
        }
        sandbox.start_libvirtd();
        sandbox
    }

    pub fn uri(&self) -> String {
        format!(
            "qemu:///system?socket={}",
            self.dir.join("run/libvirt/libvirt-sock").display()
        )
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("run/pinner/pinner.sock")
    }

    /// Where `socket_group` members connect, when the config sets one.
    pub fn group_socket(&self) -> PathBuf {
        self.dir.join("run/pinner/pinner-group.sock")
    }

    pub fn hook_path(&self) -> PathBuf {
        self.dir.join("etc/hooks/qemu.d/50-pinner")
    }

    fn read(&self, file: &str) -> String {
        fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }

    pub fn daemon_log(&self) -> String {
        self.read("daemon.log")
    }

    /// Waits up to 5 s for `needle` in the daemon's log, and returns the log.
    /// The daemon logs what it did after doing it, so a test that has just
    /// seen the effect may read the log a moment too early.
    pub fn await_log(&self, needle: &str) -> String {
        wait_for(Duration::from_secs(5), || {
            let log = self.daemon_log();
            if log.contains(needle) {
                Ok(log)
            } else {
                Err(format!("no {needle:?} in the daemon's log"))
            }
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", self.daemon_log()))
    }

    pub fn start_libvirtd(&mut self) {
        assert!(self.libvirtd.is_none(), "libvirtd already running");
        let mut cmd = Command::new("nsenter");
        cmd.args([
            "-t",
            &self.holder.id().to_string(),
            "-m",
            "-u",
            "--",
            "libvirtd",
        ]);
        let child = self.spawn_logged(cmd, "libvirtd.log");
        self.libvirtd = Some(child);
        let sock = self.dir.join("run/libvirt/libvirt-sock");
        let result = wait_for(Duration::from_secs(30), || {
            UnixStream::connect(&sock)
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .and_then(|_| {
            wait_for(Duration::from_secs(30), || {
                let out = self.virsh(&["version"]);
                if out.status.success() {
                    Ok(())
                } else {
                    Err(String::from_utf8_lossy(&out.stderr).into_owned())
                }
            })
        });
        if let Err(e) = result {
            panic!(
                "libvirtd did not come up: {e}\n{}",
                self.read("libvirtd.log")
            );
        }
    }

    /// Spawns `cmd` with stdout and stderr appended to the sandbox's `log`.
    fn spawn_logged(&self, mut cmd: Command, log: &str) -> Child {
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(log))
            .unwrap();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
    }

    /// Stops libvirtd the way a service manager does; guests keep running.
    pub fn stop_libvirtd(&mut self) {
        if let Some(mut child) = self.libvirtd.take() {
            let _ = terminate(&mut child, Duration::from_secs(15));
        }
    }

    /// Kills libvirtd outright (SIGKILL), as a crash would; guests keep
    /// running.
    pub fn kill_libvirtd(&mut self) {
        if let Some(mut child) = self.libvirtd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart_libvirtd(&mut self) {
        self.stop_libvirtd();
        self.start_libvirtd();
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("pinner.toml")
    }

    /// Writes the daemon's config: `reserved_cpus`, everything else pointing
    /// into the sandbox.
    pub fn write_config(&self, reserved_cpus: &str) {
        // The daemon runs in the host's mount namespace unless wrapped: an
        // unset `[metrics] file` would write the host's node_exporter
        // directory, so tests that want the default say so themselves.
        let metrics = if self.extra_config.contains("[metrics]") {
            ""
        } else {
            "[metrics]\nfile = \"\"\n"
        };
        fs::write(
            self.config_path(),
            format!(
                "reserved_cpus = \"{reserved_cpus}\"\nsocket = \"{}\"\nreconcile_interval_secs = {}\nlog_level = \"debug\"\n{}\n{metrics}[libvirt]\nuri = \"{}\"\n",
                self.socket().display(),
                self.reconcile_interval_secs,
                self.extra_config,
                self.uri()
            ),
        )
        .unwrap();
    }

    /// Gives each online CPU an L3 cache of its own, as the sandbox's mount
    /// namespace sees sysfs (a file bind-mounted over each CPU's L3
    /// `shared_cpu_list`): a daemon run there (`daemon_wrapper =
    /// in_namespace()`) finds one L3 range per CPU, so two CPUs are two
    /// ranges to balance between. The host's sysfs is not touched.
    pub fn split_l3(&self) {
        for cpu in online_cpus() {
            let list = self.dir.join(format!("l3-of-cpu{cpu}"));
            fs::write(&list, format!("{cpu}\n")).unwrap();
            let target = format!("/sys/devices/system/cpu/cpu{cpu}/cache/index3/shared_cpu_list");
            let mut cmd = Command::new(&self.in_namespace()[0]);
            cmd.args(&self.in_namespace()[1..])
                .args(["mount", "--bind"])
                .arg(&list)
                .arg(&target);
            let out = cmd.output().expect("nsenter mount");
            assert!(
                out.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// A command prefix that runs a program in the sandbox's mount
    /// namespace (where node_exporter's directory is the sandbox's own).
    pub fn in_namespace(&self) -> Vec<String> {
        ["nsenter", "-t", &self.holder.id().to_string(), "-m", "--"]
            .map(String::from)
            .to_vec()
    }

    /// Writes the config and starts `pinner daemon`, waiting for its socket.
    pub fn start_daemon(&mut self, reserved_cpus: &str) {
        assert!(self.daemon.is_none(), "daemon already running");
        self.write_config(reserved_cpus);
        let config = self.config_path();
        let pinner = self.bin_dir.join("pinner");
        let mut cmd = match self.daemon_wrapper.split_first() {
            Some((wrapper, args)) => {
                let mut cmd = Command::new(wrapper);
                cmd.args(args).arg(pinner);
                cmd
            }
            None => Command::new(pinner),
        };
        cmd.args(["daemon", "--config"])
            .arg(&config)
            .env("PINNER_LOG", "stderr")
            .envs(self.daemon_env.iter().map(|(k, v)| (k, v)));
        let child = self.spawn_logged(cmd, "daemon.log");
        self.daemon = Some(child);
        let sock = self.socket();
        if let Err(e) = wait_for(Duration::from_secs(10), || {
            UnixStream::connect(&sock)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }) {
            panic!("pinner daemon did not listen: {e}\n{}", self.daemon_log());
        }
    }

    /// Stops the daemon with SIGTERM; returns its exit status.
    pub fn stop_daemon(&mut self) -> Option<std::process::ExitStatus> {
        self.daemon
            .take()
            .and_then(|mut child| terminate(&mut child, Duration::from_secs(10)))
    }

    /// The running daemon's pid.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// Kills the daemon outright (SIGKILL) and reaps it.
    pub fn kill_daemon(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` to the running daemon.
    pub fn signal_daemon(&self, signal: i32) {
        let pid = self.daemon.as_ref().expect("daemon running").id();
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(pid as i32, signal) };
    }

    pub fn virsh(&self, args: &[&str]) -> Output {
        Command::new("virsh")
            .arg("-q")
            .arg("-c")
            .arg(self.uri())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run virsh")
    }

    /// Runs virsh and returns its stdout, failing the test on error.
    pub fn virsh_ok(&self, args: &[&str]) -> String {
        let out = self.virsh(args);
        assert!(
            out.status.success(),
            "virsh {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The full libvirt name of a test guest.
    pub fn name(&self, short: &str) -> String {
        format!("{}{short}", self.prefix)
    }

    /// Defines a TCG guest with `vcpus` vCPUs; `extra` is domain XML placed
    /// after `<vcpu>` (`<cputune>`, `<iothreads>`, ...).
    pub fn define_guest(&self, short: &str, vcpus: u32, extra: &str) -> String {
        self.define_guest_with_devices(short, vcpus, extra, "")
    }

    /// As [`Sandbox::define_guest`], with `devices` (disks, interfaces)
    /// added to `<devices>`.
    pub fn define_guest_with_devices(
        &self,
        short: &str,
        vcpus: u32,
        extra: &str,
        devices: &str,
    ) -> String {
        let name = self.name(short);
        self.define_domain(&name, short, vcpus, extra, devices);
        name
    }

    /// Defines a TCG guest named `xml_name` (XML text, so `&#13;` is a
    /// carriage return), its XML kept as `<file>.xml`.
    pub fn define_domain(
        &self,
        xml_name: &str,
        file: &str,
        vcpus: u32,
        extra: &str,
        devices: &str,
    ) {
        let xml = format!(
            "<domain type='qemu'>
  <name>{xml_name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>{vcpus}</vcpu>
  {extra}
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {devices}
    <memballoon model='none'/>
  </devices>
</domain>"
        );
        let path = self.dir.join(format!("{file}.xml"));
        fs::write(&path, xml).unwrap();
        self.virsh_ok(&["define", path.to_str().unwrap()]);
    }

    /// A one-sector disk image for guest `short` (qemu locks its images).
    /// `spin`: its boot code is `jmp $`, so a guest booting it keeps its
    /// vCPU busy forever, as a loaded guest would; else it is not bootable
    /// and the guest idles in the firmware.
    pub fn disk_image(&self, short: &str, spin: bool) -> PathBuf {
        let path = self.dir.join(format!("{short}.img"));
        let mut sector = vec![0u8; 512];
        if spin {
            sector[0] = 0xeb; // jmp short
            sector[1] = 0xfe; // to itself
            sector[510] = 0x55;
            sector[511] = 0xaa;
        }
        fs::write(&path, sector).unwrap();
        path
    }

    /// `virsh start`, returning how long it took.
    pub fn start_guest(&self, short: &str) -> Duration {
        let t = Instant::now();
        self.virsh_ok(&["start", &self.name(short)]);
        t.elapsed()
    }

    pub fn destroy_guest(&self, short: &str) {
        self.virsh_ok(&["destroy", &self.name(short)]);
    }

    /// Per-vCPU affinity as libvirt reports it (virDomainGetVcpuPinInfo).
    pub fn vcpu_pins(&self, short: &str) -> Vec<Vec<u32>> {
        self.virsh_ok(&["vcpupin", &self.name(short)])
            .lines()
            .filter_map(|l| {
                let mut cols = l.split_whitespace();
                let _vcpu: u32 = cols.next()?.parse().ok()?;
                Some(cpu_list(cols.next()?))
            })
            .collect()
    }

    /// Waits until the guest's vCPU pins satisfy `accept`; on timeout fails
    /// the test, saying `what` was awaited, with the daemon's log.
    pub fn await_pins(
        &self,
        short: &str,
        timeout: Duration,
        what: &str,
        accept: impl Fn(&[Vec<u32>]) -> bool,
    ) -> Vec<Vec<u32>> {
        wait_for(timeout, || {
            let pins = self.vcpu_pins(short);
            if accept(&pins) {
                Ok(pins)
            } else {
                Err(format!("{short}: {pins:?}"))
            }
        })
        .unwrap_or_else(|e| panic!("{what}: {e}\n{}", self.daemon_log()))
    }

    pub fn emulator_pin(&self, short: &str) -> Vec<u32> {
        let out = self.virsh_ok(&["emulatorpin", &self.name(short)]);
        // "*: 0-1", or just "0-1" under `virsh -q`.
        let line = out
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .expect("emulatorpin output");
        cpu_list(line.trim_start_matches("*:"))
    }

    /// The NUMA nodes the guest's memory is bound to (`virsh numatune`).
    pub fn memory_nodes(&self, short: &str) -> Vec<u32> {
        let out = self.virsh_ok(&["numatune", &self.name(short)]);
        let line = out
            .lines()
            .find(|l| l.starts_with("numa_nodeset"))
            .expect("numatune output");
        cpu_list(line.split(':').nth(1).unwrap_or(""))
    }

    /// Each IOThread's affinity (`virsh iothreadinfo`), by IOThread id.
    pub fn iothread_pins(&self, short: &str) -> Vec<(u32, Vec<u32>)> {
        self.virsh_ok(&["iothreadinfo", &self.name(short)])
            .lines()
            .filter_map(|l| {
                let mut cols = l.split_whitespace();
                Some((cols.next()?.parse().ok()?, cpu_list(cols.next()?)))
            })
            .collect()
    }

    /// A file of the guest's machine cgroup (cgroup v1 cpuset), e.g.
    /// `vcpu0/cpuset.mems`.
    /// The running guest's cpuset cgroup (cgroup v1, as libvirt makes it).
    pub fn cgroup_dir(&self, short: &str) -> PathBuf {
        let name = self.name(short);
        let id = self.virsh_ok(&["domid", &name]).trim().to_string();
        PathBuf::from(format!(
            "/sys/fs/cgroup/cpuset/machine/qemu-{id}-{name}.libvirt-qemu"
        ))
    }

    pub fn cgroup_file(&self, short: &str, file: &str) -> String {
        let path = self.cgroup_dir(short).join(file);
        fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .to_string()
    }

    /// Whether the live XML holds `<vcpupin>` elements (pins set, not just
    /// libvirt's all-CPUs default).
    pub fn has_live_vcpupin(&self, short: &str) -> bool {
        self.virsh_ok(&["dumpxml", &self.name(short)])
            .contains("<vcpupin ")
    }

    /// pinner's live metadata element, if the domain has one.
    pub fn metadata(&self, short: &str) -> Option<String> {
        let out = self.virsh(&[
            "metadata",
            &self.name(short),
            "--live",
            "--uri",
            "urn:pinner:1",
        ]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The guest's vCPU cgroup (cgroup v1 cpuset) and the affinity of every
    /// thread in it: (cpuset.cpus, [Cpus_allowed_list of each thread]).
    pub fn vcpu_cgroup(&self, short: &str, vcpu: u32) -> (Vec<u32>, Vec<Vec<u32>>) {
        let cpus = self.cgroup_file(short, &format!("vcpu{vcpu}/cpuset.cpus"));
        let threads = self
            .cgroup_file(short, &format!("vcpu{vcpu}/tasks"))
            .lines()
            .map(|tid| allowed_cpus(format!("/proc/{tid}/status")).unwrap_or_default())
            .collect();
        (cpu_list(&cpus), threads)
    }

    /// A copy of the workspace binary `name` that any user may run (the
    /// build directory may not be reachable for them).
    pub fn world_runnable(&self, name: &str) -> PathBuf {
        let copy = self.dir.join(format!("run/{name}-copy"));
        fs::copy(self.bin_dir.join(name), &copy).expect("copy a binary");
        fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).unwrap();
        copy
    }

    /// Runs the real `pinner` CLI against this sandbox's daemon (its
    /// socket given to the subcommands that talk to the daemon).
    pub fn pinner(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(self.bin_dir.join("pinner"));
        cmd.args(&args[..1]);
        if ["status", "metrics", "reconcile", "release"].contains(&args[0]) {
            cmd.arg("--socket").arg(self.socket());
        }
        cmd.args(&args[1..])
            .stdin(Stdio::null())
            .output()
            .expect("run pinner")
    }

    pub fn status_json(&self) -> serde_json::Value {
        let out = self.pinner(&["status", "--json"]);
        assert!(
            out.status.success(),
            "pinner status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// Every running test guest, pinned exactly as the daemon's plan says?
    pub fn all_in_sync(&self) -> Result<serde_json::Value, String> {
        let status = self.status_json();
        let domains = status["domains"].as_array().cloned().unwrap_or_default();
        match domains.iter().find(|d| d["in_sync"] != true) {
            None => Ok(status),
            Some(d) => Err(format!("{} not in sync: {d}", d["name"])),
        }
    }

    /// The UUID of every domain of this sandbox's libvirtd: all of them the
    /// tests', also those migrated in from another sandbox. By UUID, as a
    /// name may start or end with blanks.
    fn guests(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.virsh(&["list", "--all", "--uuid"]).stdout)
            .lines()
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(String::from)
            .collect()
    }

    /// Kills whatever still runs in the sandbox's mount namespace (qemu
    /// processes outlive libvirtd by design).
    fn kill_namespace(&mut self) {
        let ns = fs::read_link(format!("/proc/{}/ns/mnt", self.holder.id())).ok();
        if let (Some(ns), Ok(entries)) = (ns, fs::read_dir("/proc")) {
            for entry in entries.flatten() {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                if pid as u32 != self.holder.id()
                    && fs::read_link(format!("/proc/{pid}/ns/mnt")).ok().as_ref() == Some(&ns)
                {
                    // SAFETY: plain kill(2) on a pid in our own namespace.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// SIGTERM, then SIGKILL after `grace`; the exit status if it exited by itself.
fn terminate(child: &mut Child, grace: Duration) -> Option<std::process::ExitStatus> {
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "---- daemon.log ----\n{}", self.daemon_log());
            let log = self.read("libvirtd.log");
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            let _ = writeln!(err, "---- libvirtd.log (last 30 lines) ----");
            for line in tail.iter().rev() {
                let _ = writeln!(err, "{line}");
            }
        }
        let _ = self.stop_daemon();
        if self.libvirtd.is_some() {
            for guest in self.guests() {
                let _ = self.virsh(&["destroy", &guest]);
                let _ = self.virsh(&["undefine", &guest]);
            }
        }
        self.stop_libvirtd();
        self.kill_namespace();
        if std::env::var_os("PINNER_KEEP_SANDBOX").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// One sandbox at a time within a test binary: guests share the machine's
/// cores, and timings and steal figures would otherwise measure each other.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// reserved_cpus leaving exactly `keep` CPUs (the last ones) as the pool.
pub fn reserve_all_but(keep: usize) -> String {
    let online = online_cpus();
    online[..online.len() - keep]
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The CPU model, from /proc/cpuinfo, for benchmark headers.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default()
}

/// Median of durations (the middle one; upper middle for even counts).
pub fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// A command that runs `program` in a private mount namespace whose `/run`
/// is `run_dir`, so the hook's fixed socket path lands in the test's own
/// directory (never the host's `/run`).
pub fn with_private_run(run_dir: &std::path::Path, program: &std::path::Path) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg("mount --bind \"$0\" /run && exec \"$@\"")
        .arg(run_dir)
        .arg(program);
    cmd
}

/// Where a process or thread may run: `Cpus_allowed_list` of its status
/// file (`/proc/PID/status`, `/proc/PID/task/TID/status`); None when gone.
pub fn allowed_cpus(status_file: impl AsRef<std::path::Path>) -> Option<Vec<u32>> {
    let status = fs::read_to_string(status_file).ok()?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
    Some(cpu_list(list))
}

/// A UUID of the sandbox's own, from its tag.
fn host_uuid(tag: &str) -> String {
    let digits: String = tag.chars().filter(char::is_ascii_digit).collect();
    format!(
        "00000000-0000-4000-8000-{:0>12}",
        &digits[digits.len().saturating_sub(12)..]
    )
}

/// A directory under /tmp for one test's private `/run`, removed on drop.
pub struct PrivateRun(PathBuf);

impl PrivateRun {
    pub fn new(tag: &str) -> PrivateRun {
        let dir = PathBuf::from(format!("/tmp/pinner-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("pinner")).expect("temp dir");
        PrivateRun(dir)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }

    /// Where the hook's `/run/pinner/pinner.sock` lands.
    pub fn socket(&self) -> PathBuf {
        self.0.join("pinner/pinner.sock")
    }
}

impl Drop for PrivateRun {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
