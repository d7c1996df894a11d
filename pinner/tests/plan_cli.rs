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

/// A shared guest of 4 vCPUs pinner placed on `cpus`, or a new one (None).
fn shared_guest(name: &str, cpus: Option<&str>) -> String {
    let pins: String = cpus
        .map(|c| {
            (0..4)
                .map(|v| format!("<vcpupin vcpu='{v}' cpuset='{c}'/>"))
                .collect()
        })
        .unwrap_or_default();
    let state = match cpus {
        Some(_) => "<metadata><pinner:state xmlns:pinner=\"urn:pinner:1\" policy=\"shared\" mode=\"shared\"/></metadata>",
        None => "<metadata><pinner:state xmlns:pinner=\"urn:pinner:1\" policy=\"shared\"/></metadata>",
    };
    format!("<domain><name>{name}</name><uuid>u-{name}</uuid><vcpu>4</vcpu><cputune>{pins}</cputune>{state}</domain>")
}

/// `plan --demand`: a busy guest on node 0 and an idle one on node 1 are
/// even by count, so a new guest goes to node 0; with their demand given
/// it goes to node 1, and the ranges show that demand.
#[test]
fn plan_with_demand_places_a_new_guest_where_demand_leaves_room() {
    let dir = scratch("demand");
    host(&dir.join("root"));
    write(&dir.join("pinner.toml"), "reserved_cpus = \"\"\n");
    write(
        &dir.join("domains/busy.xml"),
        &shared_guest("busy", Some("0-3")),
    );
    write(
        &dir.join("domains/idle.xml"),
        &shared_guest("idle", Some("4-7")),
    );
    write(&dir.join("domains/new.xml"), &shared_guest("new", None));
    let cpus_of_new = |args: &[&str]| {
        let out = plan(&dir, &[&["--json"], args].concat());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let new = v["domains"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == "new")
            .cloned();
        (
            new.unwrap()["vcpus"][0]["cpus"].clone(),
            v["ranges"].clone(),
        )
    };
    let (counted, ranges) = cpus_of_new(&[]);
    assert_eq!(counted, serde_json::json!([0, 1, 2, 3]));
    assert_eq!(ranges[0]["unmeasured"], 2, "{ranges}");
    // By name for one, by UUID for the other.
    let file = dir.join("demand.json");
    write(&file, r#"{"busy": 3.8, "u-idle": 0.2}"#);
    let (weighed, ranges) = cpus_of_new(&["--demand", file.to_str().unwrap()]);
    assert_eq!(weighed, serde_json::json!([4, 5, 6, 7]));
    assert_eq!(ranges[0]["cpus"], serde_json::json!([0, 1, 2, 3]));
    assert_eq!(
        (
            ranges[0]["guests"].clone(),
            ranges[0]["demand_cpus"].clone()
        ),
        (1.into(), 3.8.into())
    );
    // The new guest counts at the prior (1.0 per vCPU) beside idle's 0.2.
    assert_eq!(ranges[1]["demand_cpus"], 4.2);
    assert_eq!(ranges[1]["unmeasured"], 1);
    let text = String::from_utf8(plan(&dir, &["--demand", file.to_str().unwrap()]).stdout).unwrap();
    assert!(
        text.contains("CPUs 4-7 (node 1): 2 guests, 8 vCPUs, demand 4.20 CPUs on 4 (1.05 per pCPU; 1 unmeasured)"),
        "{text}"
    );
    let map = String::from_utf8(plan(&dir, &["--map", "--demand", file.to_str().unwrap()]).stdout)
        .unwrap();
    assert!(
        map.contains("CPUs 0-3 (node 0): 1 guests, 4 vCPUs, demand 3.80 CPUs on 4"),
        "{map}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A demand file that is not what `--demand` asks for is refused with the
/// file and the guest named, and nothing is planned.
#[test]
fn plan_refuses_a_bad_demand_file_naming_it() {
    let dir = scratch("bad-demand");
    host(&dir.join("root"));
    write(&dir.join("pinner.toml"), "");
    write(
        &dir.join("domains/busy.xml"),
        &shared_guest("busy", Some("0-3")),
    );
    let file = dir.join("demand.json");
    let path = file.display().to_string();
    for (text, message) in [
        (
            r#"{"nobody": 1.0}"#,
            format!("{path}: nobody: no running guest has this name or UUID"),
        ),
        (
            r#"{"busy": 5}"#,
            format!("{path}: busy: demand must be 0 to its 4 vCPUs (CPUs), not 5"),
        ),
        (
            r#"{"busy": -1}"#,
            format!("{path}: busy: demand must be 0 to its 4 vCPUs (CPUs), not -1"),
        ),
        (
            r#"["busy"]"#,
            format!("{path}: not a JSON object of guest name or UUID to CPUs of demand"),
        ),
        (
            "{\"\\u001b[2Jx\": 1}",
            format!("{path}: \\x1b[2Jx: no running guest"),
        ),
    ] {
        write(&file, text);
        let out = plan(&dir, &["--demand", &path]);
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(out.stdout.is_empty(), "{text}: nothing planned");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&message), "{text}: {stderr}");
    }
    // Not a regular file: refused before reading.
    let out = plan(&dir, &["--demand", dir.join("domains").to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("domains: not a regular file"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
