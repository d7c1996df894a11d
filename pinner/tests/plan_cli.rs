//! `pinner plan` as an operator runs it: a sysfs tree and a directory of
//! domain XMLs in, the design's JSON (or text) out, nothing changed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pinner-plan-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// 2 nodes × 4 CPUs, no SMT.
fn host(root: &Path) {
    write(&root.join("sys/devices/system/cpu/online"), "0-7\n");
    for node in 0..2 {
        let base = root.join(format!("sys/devices/system/node/node{node}"));
        write(
            &base.join("cpulist"),
            &format!("{}-{}\n", node * 4, node * 4 + 3),
        );
        write(
            &base.join("distance"),
            if node == 0 { "10 21\n" } else { "21 10\n" },
        );
    }
}

fn plan(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pinner"))
        .arg("--config")
        .arg(dir.join("pinner.toml"))
        .args(["plan", "--root"])
        .arg(dir.join("root"))
        .arg("--domains")
        .arg(dir.join("domains"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn plan_prints_the_design_json_for_a_domains_directory() {
    let dir = scratch("json");
    host(&dir.join("root"));
    write(&dir.join("pinner.toml"), "reserved_cpus = \"0\"\n");
    write(
        &dir.join("domains/a.xml"),
        "<domain><name>a</name><uuid>ua</uuid><vcpu>3</vcpu></domain>",
    );
    write(
        &dir.join("domains/nova.xml"),
        "<domain><name>nova</name><uuid>un</uuid><vcpu>1</vcpu><cputune><vcpupin vcpu='0' cpuset='5'/></cputune></domain>",
    );
    let out = plan(&dir, &["--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["mode"], "dedicated");
    assert_eq!(v["reserved"], serde_json::json!([0]));
    assert_eq!(v["pool"], serde_json::json!([1, 2, 3, 4, 6, 7]));
    let a = &v["domains"][0];
    assert_eq!(a["name"], "a");
    assert_eq!(a["policy"], "dedicated");
    assert_eq!(a["vcpus"][2], serde_json::json!({"vcpu": 2, "cpus": [3]}));
    assert_eq!(a["emulator"], serde_json::json!([0]));
    assert_eq!(a["numa_nodes"], serde_json::json!([0]));
    assert_eq!(
        a["memory_mode"], "restrictive",
        "the mode the daemon binds in"
    );
    assert_eq!(a["reason"], "dedicated: fits node 0");
    assert_eq!(v["left_alone"][0]["name"], "nova");
    assert_eq!(
        v["left_alone"][0]["reason"],
        "pinned by someone else; left alone"
    );
    assert_eq!(v["pins_moved"], 0);

    let text = String::from_utf8(plan(&dir, &[]).stdout).unwrap();
    assert!(
        text.contains("a  dedicated: fits node 0\n  vcpu 0   -> 1\n"),
        "{text}"
    );
    assert!(
        text.contains("nova  pinned by someone else; left alone"),
        "{text}"
    );

    // The same plan as a map: guest a on 1-3, the reserved 0; nova is left
    // alone, so not part of the plan's guests.
    let map = String::from_utf8(plan(&dir, &["--map"]).stdout).unwrap();
    let expected = "\
package -
  node 0
    L3 -    [0#] [1a] [2a] [3a]
  node 1
    L3 -    [4.] [5.] [6.] [7.]
legend: # reserved  ~ isolcpus  . free  x offline  * shared by several guests
  a a (CPUs 1-3)
";
    assert_eq!(map, expected);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn plan_names_the_file_of_a_broken_domain_and_config() {
    let dir = scratch("broken");
    host(&dir.join("root"));
    write(&dir.join("pinner.toml"), "reserved_cpus = \"0-9\"\n");
    write(
        &dir.join("domains/bad.xml"),
        "<domain><name>bad</name><vcpu>x</vcpu></domain>",
    );
    let out = plan(&dir, &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("pinner.toml:1: reserved_cpus: CPUs 8-9 are not online"),
        "{stderr}"
    );

    write(&dir.join("pinner.toml"), "");
    let out = plan(&dir, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("domains/bad.xml: domain \"bad\": <vcpu> \"x\" is not a count"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
