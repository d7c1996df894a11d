//! The fleet side, for real: the shipped alert rules pass `promtool`, and
//! so does the daemon's metrics file (`promtool check metrics`);
//! node_exporter's textfile collector reads it, every family typed, two
//! guests named apart by a trailing space as two sets of series;
//! Prometheus scrapes it, has every series the rules and the Grafana
//! dashboard use, and fires `PinnerGuestOutOfSync` (and `PinnerApplyErrors`)
//! for a guest whose cgroup someone restricted so its pin cannot be applied.

use pinner_e2e::{reserve_all_but, sandbox_or_skip, serial, wait_for};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn have(program: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{program} missing under CI (scripts/setup installs it)"
        );
        eprintln!("SKIPPED: {program} not installed");
    }
    found
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills the child when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(program: &str, args: &[String], log: &Path) -> Killed {
    let log = std::fs::File::create(log).unwrap();
    Killed(
        Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{program}: {e}")),
    )
}

/// An HTTP GET on localhost: the status line and the body.
fn get(port: u16, path: &str) -> Result<(String, String), String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").map_err(|e| e.to_string())?;
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .map_err(|e| e.to_string())?;
    let (head, body) = reply.split_once("\r\n\r\n").ok_or("no HTTP reply")?;
    Ok((head.lines().next().unwrap_or("").to_string(), body.into()))
}

fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Prometheus's API answer for `path` (its `data`).
fn api(port: u16, path: &str) -> Result<serde_json::Value, String> {
    let (status, body) = get(port, path)?;
    if !status.contains(" 200") {
        return Err(format!("{status}: {body}"));
    }
    let value: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    Ok(value["data"].clone())
}

/// Metric names a PromQL text uses (pinner's and node_exporter's).
fn metric_names(promql: &str) -> BTreeSet<String> {
    promql
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("pinner_") || w.starts_with("node_textfile"))
        .map(String::from)
        .collect()
}

/// The shipped dashboard's queries, `$instance` meaning every host.
fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_file("packaging/monitoring/pinner-dashboard.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or("").to_string();
            p["targets"].as_array().unwrap().iter().map(move |t| {
                let expr = t["expr"].as_str().unwrap().replace("$instance", ".*");
                (title.clone(), expr)
            })
        })
        .collect()
}

/// Every metric the shipped rules and dashboard refer to.
fn names_used() -> BTreeSet<String> {
    let rules =
        std::fs::read_to_string(repo_file("packaging/monitoring/pinner.rules.yml")).unwrap();
    dashboard_queries()
        .into_iter()
        .flat_map(|(_, e)| metric_names(&e))
        .chain(metric_names(&rules))
        .collect()
}

/// The metrics file passes `promtool check metrics` (format and lint), and
/// node_exporter's textfile collector takes it without error, every pinner
/// family typed and with pinner's own help text.
fn exposition_is_typed_and_accepted(file: &Path, exporter_port: u16) {
    let text = std::fs::read(file).unwrap();
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool.stdin.take().unwrap().write_all(&text).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, exported) = get(exporter_port, "/metrics").unwrap();
    assert!(
        exported.contains("node_textfile_scrape_error 0"),
        "the textfile collector failed: {}",
        exported
            .lines()
            .filter(|l| l.starts_with("node_textfile"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let declared = |prefix: &str| -> Vec<String> {
        exported
            .lines()
            .filter_map(|l| l.strip_prefix(prefix))
            .filter(|l| l.starts_with("pinner_"))
            .map(String::from)
            .collect()
    };
    let types = declared("# TYPE ");
    let helps = declared("# HELP ");
    assert!(
        types.len() >= 20,
        "{} pinner families exported",
        types.len()
    );
    let untyped: Vec<&String> = types.iter().filter(|t| t.ends_with(" untyped")).collect();
    assert!(
        untyped.is_empty(),
        "untyped through node_exporter: {untyped:?}"
    );
    let generic: Vec<&String> = helps
        .iter()
        .filter(|h| h.contains("Metric read from"))
        .collect();
    assert!(
        generic.is_empty(),
        "generic help through node_exporter: {generic:?}"
    );
    println!(
        "node_exporter exports {} pinner families, all typed, with pinner's help text",
        types.len()
    );
}

#[test]
fn prometheus_scrapes_the_metrics_and_fires_for_a_guest_out_of_sync() {
    let _serial = serial();
    let test = "prometheus_scrapes_the_metrics_and_fires_for_a_guest_out_of_sync";
    if !(have("prometheus") && have("promtool") && have("prometheus-node-exporter")) {
        return;
    }
    let rules = repo_file("packaging/monitoring/pinner.rules.yml");
    let check = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&rules)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success() && said.contains("SUCCESS: 9 rules found"),
        "{said}"
    );
    let Some(mut sb) = sandbox_or_skip(test) else {
        return;
    };
    // No `[metrics] file`: the daemon finds node_exporter's textfile
    // directory by itself; in the sandbox that is this directory, bound
    // over the host's /var/lib/prometheus/node-exporter.
    let textfiles = sb.dir.join("textfile");
    sb.extra_config = "[metrics]\ninterval_secs = 1\n".into();
    sb.daemon_wrapper = sb.in_namespace();
    sb.start_daemon(&reserve_all_but(1));
    let (exporter_port, prometheus_port) = (free_port(), free_port());
    let _exporter = spawn(
        "prometheus-node-exporter",
        &[
            "--collector.disable-defaults".into(),
            "--collector.textfile".into(),
            format!("--collector.textfile.directory={}", textfiles.display()),
            format!("--web.listen-address=127.0.0.1:{exporter_port}"),
        ],
        &sb.dir.join("node-exporter.log"),
    );
    // The shipped rules with their `for:` waits cut to nothing: what is
    // tested here is that the expressions fire on pinner's real series;
    // promtool checked the file as shipped.
    let fast_rules = sb.dir.join("pinner.rules.yml");
    let shipped = std::fs::read_to_string(&rules).unwrap();
    let fast: Vec<String> = shipped
        .lines()
        .map(|l| match l.trim_start().strip_prefix("for:") {
            Some(_) => l.replace(l.trim_start(), "for: 0s"),
            None => l.to_string(),
        })
        .collect();
    std::fs::write(&fast_rules, fast.join("\n")).unwrap();
    let config = sb.dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: node\n    static_configs:\n      - targets: ['127.0.0.1:{exporter_port}']\n",
            fast_rules.display()
        ),
    )
    .unwrap();
    let _prometheus = spawn(
        "prometheus",
        &[
            format!("--config.file={}", config.display()),
            format!("--storage.tsdb.path={}", sb.dir.join("tsdb").display()),
            format!("--web.listen-address=127.0.0.1:{prometheus_port}"),
        ],
        &sb.dir.join("prometheus.log"),
    );
    let prometheus_log = sb.dir.join("prometheus.log");
    wait_for(Duration::from_secs(30), || {
        get(prometheus_port, "/-/ready")
            .and_then(|(status, _)| status.contains(" 200").then_some(()).ok_or(status))
    })
    .unwrap_or_else(|e| {
        panic!(
            "prometheus not ready: {e}\n{}",
            std::fs::read_to_string(&prometheus_log).unwrap_or_default()
        )
    });

    sb.define_guest("watched", 1, "");
    sb.start_guest("watched");
    let guest = sb.name("watched");
    // Its twin by a trailing space: another guest to libvirt, so other
    // series, never a duplicate node_exporter would reject.
    sb.define_guest("watched ", 1, "");
    sb.start_guest("watched ");
    let in_sync = format!("pinner_guest_in_sync{{domain=\"{guest}\"}}");
    let query = |q: &str| {
        api(
            prometheus_port,
            &format!("/api/v1/query?query={}", encode(q)),
        )
    };
    let value_of = |q: &str| -> Result<String, String> {
        let data = query(q)?;
        data["result"][0]["value"][1]
            .as_str()
            .map(String::from)
            .ok_or(format!("{q}: {data}"))
    };
    wait_for(Duration::from_secs(30), || match value_of(&in_sync)? {
        v if v == "1" => Ok(()),
        v => Err(format!("{in_sync} = {v}")),
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sb.daemon_log()));

    exposition_is_typed_and_accepted(&textfiles.join("pinner.prom"), exporter_port);

    // Every series the rules and the dashboard use is there.
    let names = wait_for(Duration::from_secs(30), || {
        let data = api(prometheus_port, "/api/v1/label/__name__/values")?;
        let have: BTreeSet<String> = data
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        let missing: Vec<String> = names_used().difference(&have).cloned().collect();
        if missing.is_empty() {
            Ok(have)
        } else {
            Err(format!("series missing in Prometheus: {missing:?}"))
        }
    })
    .unwrap();
    println!(
        "Prometheus has {} pinner series names; rules and dashboard use {}",
        names.iter().filter(|n| n.starts_with("pinner_")).count(),
        names_used().len()
    );

    // Someone restricts the guest's cgroup to the reserved CPU and moves
    // its vCPU there: libvirt can no longer apply the planned pin, so the
    // guest stays out of sync and every retry is an apply error.
    let cgroup = sb.cgroup_dir("watched");
    let reserved = reserve_all_but(1);
    // Children first: a parent's cpuset may not shrink below theirs.
    for child in ["vcpu0", "emulator"] {
        std::fs::write(cgroup.join(child).join("cpuset.cpus"), &reserved).unwrap();
    }
    std::fs::write(cgroup.join("cpuset.cpus"), &reserved).unwrap();
    sb.virsh_ok(&["vcpupin", &guest, "0", &reserved, "--live"]);
    let firing = wait_for(Duration::from_secs(60), || {
        let data = api(prometheus_port, "/api/v1/alerts")?;
        let alerts = data["alerts"].as_array().cloned().unwrap_or_default();
        let fired = |name: &str| {
            alerts.iter().any(|a| {
                a["labels"]["alertname"] == name
                    && a["state"] == "firing"
                    && (name != "PinnerGuestOutOfSync" || a["labels"]["domain"] == guest.as_str())
            })
        };
        if fired("PinnerGuestOutOfSync") && fired("PinnerApplyErrors") {
            Ok(alerts)
        } else {
            Err(format!("not firing yet: {alerts:?}"))
        }
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sb.daemon_log()));
    println!("firing: {}", serde_json::Value::Array(firing));

    // Every dashboard panel shows data: no query left empty by a renamed
    // metric or a label that is not there.
    for (title, expr) in dashboard_queries() {
        let answered = wait_for(Duration::from_secs(30), || {
            let data = query(&expr)?;
            match data["result"].as_array() {
                Some(series) if !series.is_empty() => Ok(series.len()),
                _ => Err(format!("panel \"{title}\": {expr} returns nothing: {data}")),
            }
        })
        .unwrap();
        println!("panel \"{title}\": {answered} series");
    }
    assert!(sb.stop_daemon().is_some_and(|s| s.success()));
}

/// Each shipped alert fires on synthetic series where it must and stays
/// silent where it must not (`promtool test rules`).
#[test]
fn shipped_alerts_pass_their_rule_tests() {
    if !have("promtool") {
        return;
    }
    let out = Command::new("promtool")
        .args(["test", "rules"])
        .arg(repo_file("tests/monitoring/pinner.rules.test.yml"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("SUCCESS"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every alert in the file has a test that expects it to fire.
    let rules =
        std::fs::read_to_string(repo_file("packaging/monitoring/pinner.rules.yml")).unwrap();
    let tests =
        std::fs::read_to_string(repo_file("tests/monitoring/pinner.rules.test.yml")).unwrap();
    for alert in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        let fires = tests.split("alertname: ").skip(1).any(|t| {
            t.starts_with(alert) && t.lines().nth(1).is_some_and(|l| l.trim() == "exp_alerts:")
        });
        assert!(fires, "no test where {alert} fires");
    }
}
