//! Rolling pinner out and back, on the sandboxed libvirtd with the real
//! hook, daemon and CLI: observe mode (the plan shown, nothing written,
//! then enforce applies it), an opt-in host (`default_policy = "none"`),
//! policies by nova flavor, and `pinner release` through the daemon and
//! without it.

use pinner_e2e::{online_cpus, reserve_all_but, sandbox_or_skip, serial, wait_for, Sandbox};
use std::time::Duration;

fn domain<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["domains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in status: {status}"))
}

fn ok(sb: &Sandbox, args: &[&str]) -> String {
    let out = sb.pinner(args);
    assert!(
        out.status.success(),
        "pinner {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Where a guest floats when nothing pins it: every online CPU.
fn floating() -> Vec<Vec<u32>> {
    vec![online_cpus()]
}

#[test]
fn observe_shows_the_plan_and_writes_nothing_until_enforce_applies_it() {
    let _serial = serial();
    let test = "observe_shows_the_plan_and_writes_nothing_until_enforce_applies_it";
    let Some(mut sb) = sandbox_or_skip(test) else {
        return;
    };
    let reserved = reserve_all_but(1);
    sb.extra_config = "mode = \"observe\"".into();
    sb.start_daemon(&reserved);
    sb.define_guest("g", 1, "");
    sb.start_guest("g");
    let name = sb.name("g");
    let status = wait_for(Duration::from_secs(5), || {
        let status = sb.status_json();
        match domain(&status, &name)["pending"].as_array().map(Vec::len) {
            Some(3) => Ok(status),
            other => Err(format!("pending: {other:?}")),
        }
    })
    .unwrap();
    assert_eq!(status["enforcement"], "observe");
    let g = domain(&status, &name);
    let pool = *online_cpus().last().unwrap();
    let pending: Vec<(String, serde_json::Value)> = g["pending"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["op"].as_str().unwrap().to_string(), p["to"].clone()))
        .collect();
    assert_eq!(
        pending,
        [
            ("pin_vcpu".to_string(), serde_json::json!([pool])),
            (
                "pin_emulator".to_string(),
                serde_json::json!(online_cpus()[..1])
            ),
            ("memory".to_string(), serde_json::json!([0])),
        ]
    );
    // Nothing written: no pin, binding, metadata or cgroup change.
    for _ in 0..2 {
        ok(&sb, &["reconcile"]);
    }
    assert_eq!(sb.vcpu_pins("g"), floating());
    assert!(!sb.has_live_vcpupin("g"));
    assert_eq!(sb.metadata("g"), None);
    assert!(sb.memory_nodes("g").is_empty());
    assert_eq!(sb.vcpu_cgroup("g", 0).0, online_cpus());
    // Said once, as the real line would be but with "would".
    let log = sb.daemon_log();
    let said = format!("would pin vCPU 0 (now on any CPU) to {pool}");
    assert_eq!(log.matches(&said).count(), 1, "{log}");
    assert!(log.contains("ENFORCEMENT=\"observe\""), "{log}");
    let text = ok(&sb, &["status"]);
    assert!(text.starts_with("OBSERVE MODE"), "{text}");
    assert!(text.contains(&said), "{text}");
    let metrics = ok(&sb, &["metrics"]);
    assert!(metrics.contains("pinner_enforcing 0\n"), "{metrics}");
    assert!(metrics.contains("pinner_pending_changes 3\n"), "{metrics}");

    // Enforce: the plan that was shown is applied.
    sb.extra_config = "mode = \"enforce\"".into();
    sb.write_config(&reserved);
    sb.signal_daemon(libc::SIGHUP);
    sb.await_pins(
        "g",
        Duration::from_secs(5),
        "the shown plan applied",
        |pins| pins == [vec![pool]],
    );
    let status = wait_for(Duration::from_secs(5), || sb.all_in_sync()).unwrap();
    assert_eq!(status["enforcement"], "enforce");
    assert_eq!(sb.memory_nodes("g"), [0]);
    assert!(domain(&status, &name)["pending"]
        .as_array()
        .unwrap()
        .is_empty());
}

/// `<pinner:state policy="…"/>` as an owner writes it.
fn owner_policy(policy: &str) -> String {
    format!("<metadata><pinner:state xmlns:pinner='urn:pinner:1' policy='{policy}'/></metadata>")
}

/// nova's metadata with a flavor.
fn nova_flavor(flavor: &str) -> String {
    format!(
        "<metadata><nova:instance xmlns:nova='http://openstack.org/xmlns/libvirt/nova/1.1'>\
         <nova:flavor name='{flavor}'/></nova:instance></metadata>"
    )
}

#[test]
fn an_opt_in_host_leaves_guests_alone_until_their_metadata_asks() {
    let _serial = serial();
    let test = "an_opt_in_host_leaves_guests_alone_until_their_metadata_asks";
    let Some(mut sb) = sandbox_or_skip(test) else {
        return;
    };
    sb.extra_config = "default_policy = \"none\"".into();
    sb.start_daemon(&reserve_all_but(1));
    sb.define_guest("plain", 1, "");
    sb.define_guest("asks", 1, &owner_policy("shared"));
    sb.start_guest("plain");
    sb.start_guest("asks");
    let pool = *online_cpus().last().unwrap();
    sb.await_pins("asks", Duration::from_secs(5), "placed", |p| {
        p == [vec![pool]]
    });
    ok(&sb, &["reconcile"]);
    let status = sb.status_json();
    let plain = domain(&status, &sb.name("plain"));
    assert_eq!(plain["policy"], "none");
    assert!(
        plain["reason"]
            .as_str()
            .unwrap()
            .starts_with("default_policy is none"),
        "{plain}"
    );
    assert_eq!(sb.vcpu_pins("plain"), floating());
    assert_eq!(sb.metadata("plain"), None, "nothing written to it");

    // Its owner asks: it is placed at the next pass.
    let name = sb.name("plain");
    let element = "<state policy='dedicated'/>";
    sb.virsh_ok(&[
        "metadata",
        &name,
        "--live",
        "--uri",
        "urn:pinner:1",
        "--key",
        "pinner",
        "--set",
        element,
    ]);
    ok(&sb, &["reconcile"]);
    assert_ne!(sb.vcpu_pins("plain"), floating());
    assert!(sb
        .metadata("plain")
        .unwrap()
        .contains("policy=\"dedicated\""));
}

#[test]
fn nova_flavors_map_to_policies() {
    let _serial = serial();
    let Some(mut sb) = sandbox_or_skip("nova_flavors_map_to_policies") else {
        return;
    };
    sb.extra_config = "default_policy = \"none\"\n[openstack]\n\
         [[openstack.flavor_policy]]\nflavor = \"cpu.*\"\npolicy = \"dedicated\"\n\
         [[openstack.flavor_policy]]\nflavor = \"m?.small\"\npolicy = \"shared\"\n"
        .into();
    sb.start_daemon(&reserve_all_but(2));
    for (short, flavor) in [
        ("pinned", "cpu.large"),
        ("small", "m1.small"),
        ("other", "x1.huge"),
    ] {
        sb.define_guest(short, 1, &nova_flavor(flavor));
        sb.start_guest(short);
    }
    let status = wait_for(Duration::from_secs(5), || {
        let status = sb.all_in_sync()?;
        match domain(&status, &sb.name("small"))["policy"].as_str() {
            Some("shared") => Ok(status),
            other => Err(format!("small: {other:?}")),
        }
    })
    .unwrap();
    let policy = |short: &str| domain(&status, &sb.name(short))["policy"].clone();
    assert_eq!(policy("pinned"), "dedicated");
    assert_eq!(policy("small"), "shared");
    assert_eq!(policy("other"), "none");
    let pinned = sb.vcpu_pins("pinned");
    assert_eq!(pinned[0].len(), 1, "one-to-one: {pinned:?}");
    assert!(
        !sb.vcpu_pins("small")[0].contains(&pinned[0][0]),
        "dedicated is its own"
    );
    assert_eq!(sb.vcpu_pins("other"), floating());
    let config = sb.config_path();
    let plan = ok(
        &sb,
        &[
            "plan",
            "--config",
            config.to_str().unwrap(),
            "--connect",
            &sb.uri(),
        ],
    );
    assert!(plan.contains("default_policy is none"), "{plan}");
}

#[test]
fn release_floats_guests_and_the_daemon_leaves_them_alone() {
    let _serial = serial();
    let test = "release_floats_guests_and_the_daemon_leaves_them_alone";
    let Some(mut sb) = sandbox_or_skip(test) else {
        return;
    };
    let reserved = reserve_all_but(1);
    sb.start_daemon(&reserved);
    for g in ["a", "b"] {
        sb.define_guest(g, 1, "");
        sb.start_guest(g);
    }
    wait_for(Duration::from_secs(5), || sb.all_in_sync()).unwrap();
    let pool = *online_cpus().last().unwrap();
    assert_eq!(sb.vcpu_pins("a"), [vec![pool]]);

    // Through the daemon: a is floating again, marked none, left alone.
    let said = ok(&sb, &["release", &sb.name("a")]);
    let all = online_cpus().iter().map(u32::to_string).collect::<Vec<_>>();
    assert!(said.contains(&format!("vCPU 0: {pool} -> ")), "{said}");
    assert!(said.contains("marked policy none"), "{said}");
    assert_eq!(sb.vcpu_pins("a"), floating(), "{all:?}");
    assert_eq!(sb.emulator_pin("a"), online_cpus());
    assert_eq!(sb.vcpu_cgroup("a", 0).0, online_cpus());
    assert!(sb.metadata("a").unwrap().contains("policy=\"none\""));
    ok(&sb, &["reconcile"]);
    assert_eq!(sb.vcpu_pins("a"), floating(), "the daemon left it alone");
    let status = sb.status_json();
    assert_eq!(domain(&status, &sb.name("a"))["policy"], "none");
    assert_eq!(sb.vcpu_pins("b"), [vec![pool]], "b untouched");
    assert_eq!(
        status["counters"]["outside_pin_changes"], 0,
        "release pins are pinner's own"
    );
    // An unknown name is an error; the persistent definition is untouched.
    let out = sb.pinner(&["release", "nosuch"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no running guest named \"nosuch\""));
    let config = sb.virsh_ok(&["dumpxml", "--inactive", &sb.name("a")]);
    assert!(!config.contains("urn:pinner:1"), "{config}");

    // A restarted guest is placed again per policy.
    sb.destroy_guest("a");
    sb.start_guest("a");
    sb.await_pins("a", Duration::from_secs(5), "placed again", |p| {
        p.len() == 1 && p[0].len() == 1
    });

    // Without the daemon: done directly on libvirt, --all, JSON.
    sb.stop_daemon();
    let out = ok(&sb, &["release", "--all", "--json", "--connect", &sb.uri()]);
    let reports: serde_json::Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = reports
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [sb.name("a"), sb.name("b")]);
    for g in ["a", "b"] {
        assert_eq!(sb.vcpu_pins(g), floating(), "{g}");
        assert_eq!(sb.memory_nodes(g), [0], "{g}: every node with memory");
    }
}

#[test]
fn where_nova_pins_pinner_keeps_off_its_dedicated_set() {
    let _serial = serial();
    let test = "where_nova_pins_pinner_keeps_off_its_dedicated_set";
    let Some(mut sb) = sandbox_or_skip(test) else {
        return;
    };
    let (shared, dedicated) = {
        let online = online_cpus();
        (online[0], *online.last().unwrap())
    };
    let nova_conf = sb.dir.join("nova.conf");
    std::fs::write(
        &nova_conf,
        format!("[compute]\ncpu_shared_set = {shared}\ncpu_dedicated_set = {dedicated}\n"),
    )
    .unwrap();
    sb.extra_config = format!("[openstack]\nnova_conf = \"{}\"\n", nova_conf.display());
    sb.start_daemon("");
    // Started outside nova, asking for dedicated CPUs: shared on the
    // shared set all the same. nova's floating guest: left alone.
    sb.define_guest("outside", 1, &owner_policy("dedicated"));
    sb.define_guest("floats", 1, &nova_flavor("m1.small"));
    sb.virsh_ok(&["start", &sb.name("outside")]);
    let name = sb.name("floats");
    // nova's XML floats it with <vcpu cpuset>: set it the same way.
    let xml = sb.virsh_ok(&["dumpxml", "--inactive", &name]).replace(
        "<vcpu placement='static'>1</vcpu>",
        &format!("<vcpu placement='static' cpuset='{shared}'>1</vcpu>"),
    );
    let path = sb.dir.join("floats-nova.xml");
    std::fs::write(&path, xml).unwrap();
    sb.virsh_ok(&["define", path.to_str().unwrap()]);
    sb.start_guest("floats");
    sb.await_pins(
        "outside",
        Duration::from_secs(5),
        "on the shared set",
        |p| p == [vec![shared]],
    );
    ok(&sb, &["reconcile"]);
    let status = sb.status_json();
    let outside = domain(&status, &sb.name("outside"));
    assert_eq!(outside["policy"], "shared");
    assert!(
        status["warnings"].to_string().contains("dedicated asked"),
        "{status}"
    );
    let floats = domain(&status, &name);
    assert_eq!(floats["policy"], "foreign");
    assert!(
        floats["reason"]
            .as_str()
            .unwrap()
            .contains("floated by nova"),
        "{floats}"
    );
    assert_eq!(sb.metadata("floats"), None);

    // place_floating: pinner range-binds it within the shared set.
    sb.extra_config += "place_floating = true\n";
    sb.write_config("");
    sb.signal_daemon(libc::SIGHUP);
    sb.await_pins("floats", Duration::from_secs(5), "placed", |p| {
        p == [vec![shared]]
    });
    wait_for(Duration::from_secs(5), || {
        let status = sb.all_in_sync()?;
        match domain(&status, &name)["policy"].as_str() {
            Some("shared") => Ok(()),
            other => Err(format!("floats: {other:?}")),
        }
    })
    .unwrap();
    // Its one-CPU shared set is its range already: marked, memory bound.
    assert!(sb.metadata("floats").unwrap().contains("mode=\"shared\""));
    assert_eq!(sb.memory_nodes("floats"), [0]);
}
