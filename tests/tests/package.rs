//! The packages as operators get them: what the .deb and the .rpm hold, and
//! the .deb's install → use → reinstall → remove → purge cycle on this
//! machine inside a private mount namespace (overlays over /etc, /usr and
//! /var record every change; the host is never touched).
//!
//! Needs the packages built by `scripts/package` (scripts/test does it).

use pinner_e2e::missing_requirement;
use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The built package ending in `suffix`, or None (with a reason) outside CI.
fn package(suffix: &str) -> Option<PathBuf> {
    let dir = workspace().join("target/packages");
    let found = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(suffix));
    if found.is_none() {
        let reason = format!("no *{suffix} in {}: run scripts/package", dir.display());
        assert!(std::env::var_os("CI").is_none(), "{reason}");
        eprintln!("SKIPPED: {reason}");
    }
    found
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const FILES: [&str; 13] = [
    "/usr/bin/pinner",
    "/usr/libexec/pinner/pinner-hook",
    "/usr/libexec/pinner/pinner-maint",
    "/usr/share/pinner/pinner.toml",
    "/usr/share/man/man8/pinner.8.gz",
    "/usr/share/man/man8/pinner-hook.8.gz",
    "/usr/share/man/man8/pinner-isolate.8.gz",
    "/usr/share/man/man8/pinner-isolate-undo.8.gz",
    "/usr/share/man/man5/pinner.toml.5.gz",
    "/usr/share/bash-completion/completions/pinner",
    "/usr/share/fish/vendor_completions.d/pinner.fish",
    "/usr/share/pinner/pinner.rules.yml",
    "/usr/share/pinner/pinner-dashboard.json",
];

#[test]
fn deb_holds_binaries_hook_config_unit_docs_and_scripts() {
    let Some(deb) = package(".deb") else { return };
    let deb = deb.to_str().unwrap();
    let listing = run("dpkg-deb", &["-c", deb]);
    for file in FILES.iter().chain(&["/lib/systemd/system/pinner.service"]) {
        assert!(
            listing.contains(&format!(".{file}")),
            "{file} not in the .deb:\n{listing}"
        );
    }
    // The qemu.d entry is made by the scripts, so purge can take it away.
    assert!(!listing.contains("hooks"), "{listing}");
    let info = run("dpkg-deb", &["-I", deb]);
    assert!(
        info.contains("Depends:") && info.contains("libvirt0"),
        "{info}"
    );
    let scratch = std::env::temp_dir().join(format!("pinner-deb-{}", std::process::id()));
    run("dpkg-deb", &["-e", deb, scratch.to_str().unwrap()]);
    // No conffile: a configuration placed before the install is used as
    // it is, without a dpkg prompt (pinner-maint installs the shipped one
    // when there is none).
    let conffiles = std::fs::read_to_string(scratch.join("conffiles")).unwrap_or_default();
    assert_eq!(conffiles.trim(), "");
    for (script, calls) in [
        ("postinst", "pinner-maint configure"),
        ("prerm", "pinner-maint remove"),
        ("postrm", "rm -rf /etc/pinner /run/pinner"),
    ] {
        let text = std::fs::read_to_string(scratch.join(script)).unwrap();
        assert!(text.contains(calls), "{script}: {text}");
    }
    std::fs::remove_dir_all(&scratch).unwrap();
}

#[test]
fn rpm_holds_the_same_files_and_scriptlets() {
    let Some(rpm) = package(".rpm") else { return };
    let rpm = rpm.to_str().unwrap();
    let listing = run("rpm", &["-qlp", rpm]);
    for file in FILES
        .iter()
        .chain(&["/usr/lib/systemd/system/pinner.service"])
    {
        assert!(
            listing.lines().any(|l| l == *file),
            "{file} not in the .rpm:\n{listing}"
        );
    }
    assert_eq!(run("rpm", &["-qcp", rpm]).trim(), "/etc/pinner/pinner.toml");
    let scripts = run("rpm", &["-qp", "--scripts", rpm]);
    for expected in [
        "postinstall scriptlet",
        "pinner-maint configure",
        "preuninstall scriptlet",
        "pinner-maint remove",
        "postuninstall scriptlet",
    ] {
        assert!(scripts.contains(expected), "{expected}:\n{scripts}");
    }
    let version = run("rpm", &["-qp", "--queryformat", "%{VERSION}", rpm]);
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
}

#[test]
fn deb_install_use_remove_purge_leaves_nothing_behind() {
    let Some(deb) = package(".deb") else { return };
    if let Some(reason) = missing_requirement() {
        assert!(std::env::var_os("CI").is_none(), "{reason}");
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let work = std::env::temp_dir().join(format!("pinner-pkg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let guest = format!("pkg{}", std::process::id());
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--"])
        .arg(workspace().join("tests/package-cycle.sh"))
        .arg(&deb)
        .arg(&work)
        .arg(&guest)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    let _ = std::fs::remove_dir_all(&work);
    assert!(out.status.success(), "cycle failed:\n{stdout}\n{stderr}");
    for check in [
        "ok: files installed",
        "ok: hook linked into /etc/libvirt/hooks/qemu.d",
        "ok: config installed by configure, not as a conffile",
        "ok: installed hook delivered events; guest pinned",
        "ok: reinstall and repeated configure change nothing",
        "ok: an operator's hook in pinner's place is left alone",
        "ok: with systemd: enabled, restarted, libvirtd reloaded only for a new hook",
        "ok: libvirt < 6.5: hooks/qemu used when free",
        "ok: remove undid host isolation",
        "ok: remove: hook and binaries gone, config kept",
        "ok: purge leaves nothing behind",
    ] {
        assert!(
            stdout.contains(check),
            "missing \"{check}\":\n{stdout}\n{stderr}"
        );
    }
}

/// `pinner-maint configure` in a scratch tree: the shipped configuration
/// when there is none, a configuration placed before kept as it is, and one
/// line saying what the daemon does from now on in either mode.
#[test]
fn configure_installs_the_config_only_when_absent_and_says_the_mode() {
    let scratch = std::env::temp_dir().join(format!("pinner-maint-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let config = scratch.join("etc/pinner.toml");
    let configure = || {
        let out = Command::new(repo.join("packaging/pinner-maint"))
            .arg("configure")
            .env("PINNER_HOOKS_DIR", scratch.join("hooks"))
            .env("PINNER_SYSTEMD_DIR", scratch.join("no-systemd"))
            .env("PINNER_CONFIG", &config)
            .env("PINNER_SHIPPED_CONFIG", repo.join("packaging/pinner.toml"))
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let said = configure();
    assert!(
        said.contains("installed the default configuration"),
        "{said}"
    );
    assert!(
        said.contains(
            "mode enforce: running guests are placed now, their memory moved at 256 MiB/s"
        ),
        "{said}"
    );
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        std::fs::read_to_string(repo.join("packaging/pinner.toml")).unwrap()
    );
    let placed = "mode = \"observe\"\n";
    std::fs::write(&config, placed).unwrap();
    let said = configure();
    assert!(
        !said.contains("installed the default configuration"),
        "{said}"
    );
    assert!(
        said.contains("mode observe: nothing is changed on this host"),
        "{said}"
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), placed);
    std::fs::remove_dir_all(&scratch).unwrap();
}
