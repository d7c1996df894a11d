//! Every subcommand run with hostile arguments and hostile files: numbers
//! that are not numbers, paths to FIFOs, devices, directories and huge
//! files, names with control characters, bytes that are not UTF-8. Each
//! run must end on its own (no hang, no endless read) with an exit code of
//! its own, never a panic's 101. Nothing here may change this host: the
//! commands that would (`daemon`, `isolate`) only get configurations they
//! must refuse.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pinner-cli-hostile-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Hostile things on disk: a FIFO no one writes, a link to /dev/zero, a
/// directory, a 100 MB file (sparse), a socket-less path.
struct Hostile {
    dir: PathBuf,
}

impl Hostile {
    fn new(tag: &str) -> Hostile {
        let dir = scratch(tag);
        let fifo = |p: &Path| {
            nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap()
        };
        fifo(&dir.join("fifo"));
        std::os::unix::fs::symlink("/dev/zero", dir.join("zero")).unwrap();
        std::fs::create_dir(dir.join("directory")).unwrap();
        std::fs::File::create(dir.join("huge"))
            .unwrap()
            .set_len(100 << 20)
            .unwrap();
        // A sysfs snapshot whose files are FIFOs and devices.
        let cpu = dir.join("sysfs/sys/devices/system/cpu");
        std::fs::create_dir_all(cpu.join("cpu0/topology")).unwrap();
        fifo(&cpu.join("online"));
        fifo(&cpu.join("cpu0/topology/core_id"));
        std::os::unix::fs::symlink("/dev/zero", cpu.join("possible")).unwrap();
        let node = dir.join("sysfs/sys/devices/system/node/node0");
        std::fs::create_dir_all(&node).unwrap();
        fifo(&node.join("meminfo"));
        std::os::unix::fs::symlink("/dev/zero", node.join("cpulist")).unwrap();
        // A directory of domain dumps that are not files.
        let domains = dir.join("domains");
        std::fs::create_dir(&domains).unwrap();
        fifo(&domains.join("a.xml"));
        std::os::unix::fs::symlink("/dev/zero", domains.join("b.xml")).unwrap();
        std::fs::write(dir.join("empty.toml"), "").unwrap();
        Hostile { dir }
    }

    fn path(&self, name: &str) -> OsString {
        self.dir.join(name).into_os_string()
    }

    /// Values no argument should take without a clear refusal.
    fn values(&self) -> Vec<OsString> {
        let mut values: Vec<OsString> = [
            "",
            "nan",
            "NaN",
            "inf",
            "-inf",
            "-1",
            "1e308",
            "18446744073709551616",
            "0x10",
            "\u{1b}[2J",
            "a\nb",
            "../../../etc/shadow",
            "test:///default",
            "qemu:///system?socket=/dev/zero",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        values.push(OsString::from_vec(vec![0xff, 0xfe, b'x']));
        values.push(OsString::from("x".repeat(100_000)));
        for name in [
            "fifo",
            "zero",
            "directory",
            "huge",
            "sysfs",
            "domains",
            "absent",
        ] {
            values.push(self.path(name));
        }
        values
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `pinner ARGS` under a 20 s limit; fails the test on a panic or a
/// hang, and returns the exit code.
fn run(args: &[OsString]) -> i32 {
    let out = Command::new("timeout")
        .arg("20")
        .arg(env!("CARGO_BIN_EXE_pinner"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run pinner");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let shown: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().chars().take(60).collect())
        .collect();
    let code = out.status.code().unwrap_or(-1);
    assert_ne!(code, 124, "pinner {shown:?} hung");
    assert_ne!(code, 101, "pinner {shown:?} panicked: {stderr}");
    assert!(!stderr.contains("panicked"), "pinner {shown:?}: {stderr}");
    // Whatever it says, it says on lines of its own: no terminal escape
    // from an argument reaches the screen raw.
    assert!(
        !stderr.contains('\u{1b}'),
        "pinner {shown:?}: raw escape in {stderr:?}"
    );
    code
}

fn os(parts: &[&str]) -> Vec<OsString> {
    parts.iter().map(OsString::from).collect()
}

#[test]
fn every_subcommand_refuses_hostile_arguments_without_a_panic_or_a_hang() {
    let hostile = Hostile::new("arguments");
    let config = hostile.path("empty.toml");
    // (subcommand words, options that take a value)
    let commands: &[(&[&str], &[&str])] = &[
        (&["topology"], &["--root"]),
        (&["topology", "--json"], &["--root"]),
        (&["plan"], &["--root", "--domains"]),
        (&["plan", "--json"], &["--domains"]),
        (
            &["doctor", "--connect", "test:///default", "--sample", "0"],
            &["--root", "--domain"],
        ),
        (&["doctor", "--connect", "test:///default"], &["--sample"]),
        (&["status"], &["--watch"]),
        (&["status", "--json"], &[]),
        (&["metrics"], &[]),
        (&["reconcile"], &[]),
    ];
    let mut runs = 0;
    for (words, options) in commands {
        for value in hostile.values() {
            // Every command also meets a hostile socket (the daemon's
            // commands connect to it; the others ignore it).
            let mut args = vec![OsString::from("--config"), config.clone()];
            args.extend(os(words));
            if ["status", "metrics", "reconcile", "release"].contains(&words[0]) {
                args.push("--socket".into());
                args.push(value.clone());
            }
            run(&args);
            runs += 1;
            for option in *options {
                let mut args = vec![OsString::from("--config"), config.clone()];
                args.extend(os(words));
                args.push(OsString::from(*option));
                args.push(value.clone());
                if words[0] == "plan" && *option == "--domains" {
                    args.push("--root".into());
                    args.push("/".into());
                }
                run(&args);
                runs += 1;
            }
        }
    }
    // The configuration itself, for every command, `daemon` and `isolate`
    // too: all of these must be refused before anything is touched.
    for value in hostile.values().into_iter().filter(|v| !v.is_empty()) {
        for words in [
            &["daemon"][..],
            &["isolate"],
            &["isolate", "apply"],
            &["plan"],
            &["doctor"],
        ] {
            let mut args = vec![OsString::from("--config"), value.clone()];
            args.extend(os(words));
            let code = run(&args);
            assert_ne!(code, 0, "pinner --config {value:?} {words:?} took it");
            runs += 1;
        }
    }
    assert_eq!(runs, 547, "every command, option and value");
}

#[test]
fn hostile_files_in_snapshots_and_dumps_are_named_and_refused() {
    let hostile = Hostile::new("files");
    let pinner = |args: &[&str]| {
        Command::new("timeout")
            .arg("20")
            .arg(env!("CARGO_BIN_EXE_pinner"))
            .args(["--config", hostile.path("empty.toml").to_str().unwrap()])
            .args(args)
            .output()
            .unwrap()
    };
    let sysfs = hostile.path("sysfs").into_string().unwrap();
    let domains = hostile.path("domains").into_string().unwrap();
    // cpu/online a FIFO, cpu0's core_id too, node0's cpulist /dev/zero:
    // each is passed over at once, as a file the kernel did not offer (the
    // CPU directory alone says cpu0 is there; the node has no CPU list).
    let out = pinner(&["topology", "--root", &sysfs]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("1 CPU online (0)"), "{stdout}");
    assert!(stdout.contains("memory-only numa node 0"), "{stdout}");
    // A FIFO named a.xml, /dev/zero named b.xml: the first is named.
    let out = pinner(&["plan", "--root", "/", "--domains", &domains]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("domains/a.xml: not a regular file but a FIFO; refused"),
        "{stderr}"
    );
    std::fs::remove_file(hostile.dir.join("domains/a.xml")).unwrap();
    let out = pinner(&["plan", "--root", "/", "--domains", &domains]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("domains/b.xml: not a regular file but a character device; refused"),
        "{stderr}"
    );
}
