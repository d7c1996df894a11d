//! Guest names exactly as libvirt keeps them, on a sandboxed libvirtd with
//! the real daemon: `twin`, ` twin` and `twin ` are three guests, and a name
//! holding a carriage return (`&#13;` in the XML; libvirt refuses a newline
//! but takes this) cannot forge a line in what pinner prints. Status lists
//! the exact names, `doctor --domain` finds a blank-led one, every text
//! output shows the carriage return as `\r`, and the metrics file has no
//! duplicate series.

use pinner_e2e::{reserve_all_but, sandbox_or_skip, serial, wait_for, Sandbox};
use std::collections::BTreeSet;
use std::time::Duration;

/// The forged line a raw carriage return would draw over a status row.
const FORGED: &str = "  vcpu 1 -> 0 (FORGED)";

/// The hostile guests: (name as libvirt has it, the same as XML text).
fn hostile_names(sb: &Sandbox) -> Vec<(String, String)> {
    let twin = sb.name("twin");
    vec![
        (twin.clone(), twin.clone()),
        (format!(" {twin}"), format!(" {twin}")),
        (format!("{twin} "), format!("{twin} ")),
        (
            format!("{}\r{FORGED}", sb.name("web")),
            format!("{}&#13;{}", sb.name("web"), FORGED.replace('>', "&gt;")),
        ),
    ]
}

fn text_of(sb: &Sandbox, args: &[&str]) -> String {
    let out = sb.pinner(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code().is_some_and(|c| c <= 2),
        "pinner {args:?}: {stderr}"
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// No raw carriage return, and no line a hostile name drew.
fn assert_not_forged(what: &str, text: &str) {
    assert!(
        !text.contains('\r'),
        "{what}: raw carriage return in {text:?}"
    );
    assert!(
        !text
            .lines()
            .any(|l| l.trim_start().starts_with("vcpu 1 -> 0 (FORGED)")),
        "{what}: forged line in\n{text}"
    );
}

#[test]
fn names_are_exactly_libvirts_and_printed_escaped() {
    let _serial = serial();
    let Some(mut sb) = sandbox_or_skip("names_are_exactly_libvirts_and_printed_escaped") else {
        return;
    };
    let metrics = sb.dir.join("pinner.prom");
    sb.extra_config = format!(
        "[metrics]\nfile = \"{}\"\ninterval_secs = 1\n",
        metrics.display()
    );
    sb.start_daemon(&reserve_all_but(1));
    let names = hostile_names(&sb);
    for (i, (name, xml_name)) in names.iter().enumerate() {
        sb.define_domain(xml_name, &format!("hostile{i}"), 1, "", "");
        sb.virsh_ok(&["start", name]);
    }
    let status = wait_for(Duration::from_secs(20), || sb.all_in_sync())
        .unwrap_or_else(|e| panic!("{e}\n{}", sb.daemon_log()));

    // Four guests, four exact names, four UUIDs.
    let domains = status["domains"].as_array().unwrap();
    let listed: BTreeSet<&str> = domains
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    let expected: BTreeSet<&str> = names.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(listed, expected);
    let uuids: BTreeSet<&str> = domains
        .iter()
        .map(|d| d["uuid"].as_str().unwrap())
        .collect();
    assert_eq!(uuids.len(), 4);

    // Every text output: the carriage return shown as \r, nothing forged.
    let uri = sb.uri();
    let escaped = format!("{}\\r{FORGED}", sb.name("web"));
    for args in [
        &["status"][..],
        &["status", "--map"],
        &["plan", "--connect", &uri],
        &["plan", "--connect", &uri, "--map"],
        &["doctor", "--connect", &uri, "--sample", "0"],
    ] {
        let text = text_of(&sb, args);
        assert_not_forged(&format!("{args:?}"), &text);
        if args[0] != "doctor" {
            assert!(
                text.contains(&escaped),
                "{args:?} lacks {escaped:?}:\n{text}"
            );
        }
    }

    // doctor finds each twin by its exact name, and speaks of it alone.
    for (name, _) in &names[..3] {
        let out = sb.pinner(&[
            "doctor",
            "--connect",
            &uri,
            "--sample",
            "0",
            "--json",
            "--domain",
            name,
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            matches!(out.status.code(), Some(0 | 2)),
            "{name:?}: {stderr}"
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("doctor JSON");
        let about: BTreeSet<&str> = report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|f| f["domain"].as_str())
            .collect();
        eprintln!("doctor --domain {name:?}: findings about {about:?}");
        assert_eq!(about, BTreeSet::from([name.as_str()]), "{name:?}");
    }

    // The metrics file: every guest's series apart, none twice.
    let text = wait_for(Duration::from_secs(5), || {
        let text = std::fs::read_to_string(&metrics).map_err(|e| e.to_string())?;
        match uuids.iter().all(|u| text.contains(u)) {
            true => Ok(text),
            false => Err("not every guest in the metrics file yet".to_string()),
        }
    })
    .unwrap();
    let mut seen = BTreeSet::new();
    for series in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let key = series.rsplit_once(' ').map_or(series, |(k, _)| k);
        assert!(seen.insert(key.to_string()), "series twice: {key}");
    }
    // The exposition formats escape only \\, \" and \n in a label: the
    // carriage return is the name's own byte, inside its quotes.
    let label = format!("domain=\"{}\"", names[3].0);
    assert!(text.contains(&label), "no {label:?} in\n{text}");
    // The daemon's own log (stderr here) keeps the name on its line.
    assert_not_forged("daemon log", &sb.daemon_log());
}
