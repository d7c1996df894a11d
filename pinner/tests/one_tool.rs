//! The CLI as one tool: one `--root` for another machine's files (the
//! directory holding `sys`, `sys` itself, or a `.tar.bz2` snapshot),
//! `--json` documented everywhere, `--socket` only where the daemon is
//! asked, and the commands that can work without libvirt doing so.

mod common;

use common::topologies_dir;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn pinner(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pinner"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run pinner")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn snapshot() -> PathBuf {
    topologies_dir().join("16amd64-8n2c.tar.bz2")
}

/// Nothing left in /tmp by an unpacked snapshot.
fn unpacked_dirs() -> usize {
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("pinner-snapshot.")
        })
        .count()
}

#[test]
fn root_takes_a_snapshot_archive_its_directory_or_sys_itself() {
    if !common::have_topologies() {
        return;
    }
    let before = unpacked_dirs();
    let from_archive = pinner(&["topology", "--json", "--root", snapshot().to_str().unwrap()]);
    assert!(from_archive.status.success(), "{}", text(&from_archive));
    assert_eq!(unpacked_dirs(), before, "the unpacked snapshot is removed");

    let dir = std::env::temp_dir().join(format!("pinner-one-tool-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let unpacked = common::extract(&snapshot(), &dir);
    let from_dir = pinner(&["topology", "--json", "--root", unpacked.to_str().unwrap()]);
    let sys = unpacked.join("sys");
    let from_sys = pinner(&["topology", "--json", "--root", sys.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(from_dir.stdout, from_archive.stdout, "{}", text(&from_dir));
    assert_eq!(from_sys.stdout, from_archive.stdout, "{}", text(&from_sys));

    let not_one = pinner(&["topology", "--root", "/etc/hostname"]);
    assert_eq!(not_one.status.code(), Some(1));
    assert!(
        text(&not_one).contains(
            "/etc/hostname: not a directory holding sys, nor sys itself, nor a .tar.bz2 snapshot"
        ),
        "{}",
        text(&not_one)
    );
}

#[test]
fn every_subcommand_spells_its_options_one_way() {
    for sub in [
        "status",
        "plan",
        "topology",
        "doctor",
        "reconcile",
        "release",
        "isolate",
    ] {
        let help = text(&pinner(&[sub, "--help"]));
        let json = help.lines().find(|l| l.contains("--json")).unwrap_or("");
        assert!(
            json.contains("Machine-readable"),
            "{sub} --help: --json undocumented:\n{help}"
        );
        assert!(!help.contains("--sysfs-root"), "{sub}: old spelling");
    }
    for sub in ["plan", "topology", "doctor"] {
        assert!(
            text(&pinner(&[sub, "--help"])).contains("--root <PATH>"),
            "{sub}"
        );
    }
    let topology = pinner(&["topology", "--socket", "/x"]);
    assert_eq!(
        topology.status.code(),
        Some(2),
        "topology takes no socket: {}",
        text(&topology)
    );
    let isolate = pinner(&["isolate", "--undo"]);
    assert_eq!(
        isolate.status.code(),
        Some(2),
        "changing needs a verb: {}",
        text(&isolate)
    );
    let version = text(&pinner(&["status", "--version"]));
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
}

fn no_libvirt(dir: &Path) -> String {
    format!(
        "qemu+unix:///system?socket={}/no-libvirt.sock",
        dir.display()
    )
}

#[test]
fn without_libvirt_doctor_audits_the_host_and_plan_says_how() {
    let dir = std::env::temp_dir().join(format!("pinner-no-libvirt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("pinner.toml");
    std::fs::write(&config, "").unwrap();
    let uri = no_libvirt(&dir);
    let config = config.to_str().unwrap();

    let doctor = pinner(&[
        "--config",
        config,
        "doctor",
        "--sample",
        "0",
        "--connect",
        &uri,
        "--json",
    ]);
    let report: serde_json::Value =
        serde_json::from_slice(&doctor.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&doctor)));
    assert_ne!(doctor.status.code(), Some(1), "{}", text(&doctor));
    let ids: Vec<&str> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    let skipped = &report["findings"][ids.iter().position(|i| *i == "PIN000").expect("PIN000")];
    assert!(
        skipped["evidence"].as_str().unwrap().contains(&uri),
        "{skipped}"
    );
    assert!(
        skipped["title"]
            .as_str()
            .unwrap()
            .contains("host checks ran"),
        "{skipped}"
    );

    let plan = pinner(&["--config", config, "plan", "--connect", &uri]);
    let said = text(&plan);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(plan.status.code(), Some(1), "{said}");
    assert!(said.contains("cannot connect to libvirt at"), "{said}");
    assert!(
        !said.contains("lost"),
        "never connected, so nothing was lost: {said}"
    );
    assert!(said.contains("pinner plan --domains DIR"), "{said}");
}
