//! The placement engine applied on a real libvirtd: memory bound to the
//! guest's NUMA node, emulator and IOThreads placed per `emulator_threads`.

use pinner_e2e::{cpu_list, online_cpus, sandbox_or_skip, Sandbox};
use std::time::Duration;

/// The node of `cpu` as sysfs tells it.
fn node_of(cpu: u32) -> u32 {
    std::fs::read_dir("/sys/devices/system/node")
        .unwrap()
        .flatten()
        .find_map(|e| {
            let id: u32 = e.file_name().to_str()?.strip_prefix("node")?.parse().ok()?;
            let cpus = std::fs::read_to_string(e.path().join("cpulist")).ok()?;
            cpu_list(&cpus).contains(&cpu).then_some(id)
        })
        .unwrap_or(0)
}

/// Starts a 1-vCPU guest with an IOThread on a pool of the last CPU, and
/// waits until pinner has placed it.
fn placed_guest(sb: &mut Sandbox) -> (u32, Vec<u32>) {
    let online = online_cpus();
    let last = *online.last().unwrap();
    let reserved: Vec<u32> = online[..online.len() - 1].to_vec();
    let reserved_text = reserved
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    sb.start_daemon(&reserved_text);
    sb.define_guest("io", 1, "<iothreads>1</iothreads>");
    sb.start_guest("io");
    sb.await_pins("io", Duration::from_secs(5), "guest placed", |p| {
        p == [vec![last]]
    });
    pinner_e2e::wait_for(Duration::from_secs(5), || sb.all_in_sync()).unwrap();
    (last, reserved)
}

#[test]
fn memory_follows_the_vcpus_and_helper_threads_go_to_housekeeping() {
    let Some(mut sb) =
        sandbox_or_skip("memory_follows_the_vcpus_and_helper_threads_go_to_housekeeping")
    else {
        return;
    };
    let (last, reserved) = placed_guest(&mut sb);
    let node = node_of(last);
    assert_eq!(
        sb.memory_nodes("io"),
        vec![node],
        "numatune follows the vCPU's node"
    );
    assert!(
        sb.virsh_ok(&["dumpxml", &sb.name("io")])
            .contains(&format!("nodeset='{node}'")),
        "live numatune set"
    );
    assert_eq!(
        cpu_list(&sb.cgroup_file("io", "vcpu0/cpuset.mems")),
        vec![node],
        "cgroup memory nodes"
    );
    assert_eq!(
        sb.emulator_pin("io"),
        reserved,
        "emulator threads on the reserved CPUs"
    );
    assert_eq!(
        sb.iothread_pins("io"),
        vec![(1, reserved.clone())],
        "IOThreads with them"
    );
    assert_eq!(
        cpu_list(&sb.cgroup_file("io", "emulator/cpuset.cpus")),
        reserved
    );
    assert_eq!(
        cpu_list(&sb.cgroup_file("io", "iothread1/cpuset.cpus")),
        reserved
    );
    let status = sb.status_json();
    assert_eq!(
        status["domains"][0]["memory_nodes"],
        serde_json::json!([node])
    );
    sb.await_log("bound memory to NUMA nodes");
}

#[test]
fn emulator_threads_guest_keeps_helpers_on_the_guests_cpus() {
    let Some(mut sb) = sandbox_or_skip("emulator_threads_guest_keeps_helpers_on_the_guests_cpus")
    else {
        return;
    };
    sb.extra_config = "emulator_threads = \"guest\"".into();
    let (last, _) = placed_guest(&mut sb);
    assert_eq!(sb.emulator_pin("io"), vec![last]);
    assert_eq!(sb.iothread_pins("io"), vec![(1, vec![last])]);
    assert_eq!(
        cpu_list(&sb.cgroup_file("io", "emulator/cpuset.cpus")),
        vec![last]
    );
}
