//! The parts of the man pages clap does not know: exit status, files,
//! environment, examples, see also; and `pinner.toml(5)` from the
//! configuration keys.

use pinner::config::keys::KEYS;

/// Text made safe for roff: backslashes, and a leading dot or quote that
/// would be read as a request.
fn roff(text: &str) -> String {
    let escaped = text.replace('\\', "\\e").replace('-', "\\-");
    match escaped.chars().next() {
        Some('.' | '\'') => format!("\\&{escaped}"),
        _ => escaped,
    }
}

fn section(title: &str, body: &str) -> String {
    format!(".SH {title}\n{body}")
}

/// A tagged paragraph per (tag, text).
fn tagged(items: &[(&str, &str)]) -> String {
    items
        .iter()
        .map(|(tag, text)| format!(".TP\n\\fB{}\\fR\n{}\n", roff(tag), roff(text)))
        .collect()
}

/// Literal lines (commands, file contents).
fn example(lines: &str) -> String {
    let body: String = lines.lines().map(|l| format!("{}\n", roff(l))).collect();
    format!(".PP\n.nf\n.RS 4\n{body}.RE\n.fi\n")
}

const EXIT_STATUS: &[(&str, &str)] = &[
    ("0", "Success; for doctor: nothing needs fixing (notes only)."),
    ("1", "The command failed: the message on standard error says why (the daemon not running, libvirt unreachable, a broken configuration, a guest that could not be changed)."),
    ("2", "A usage error; for doctor: a warning or error needs fixing."),
];

const FILES: &[(&str, &str)] = &[
    (
        "/etc/pinner/pinner.toml",
        "The configuration; see pinner.toml(5).",
    ),
    (
        "/run/pinner/pinner.sock",
        "The daemon's socket (root only); pinner-group.sock beside it for socket_group members.",
    ),
    (
        "/run/pinner/isolation.json",
        "What isolation moved and where from, so undo puts it back.",
    ),
    (
        "/run/pinner/hook-dropped",
        "A byte per event the hook could not hand over.",
    ),
    (
        "/etc/libvirt/hooks/qemu.d/50-pinner",
        "The hook, linked to /usr/libexec/pinner/pinner-hook.",
    ),
    (
        "/var/lib/prometheus/node-exporter/pinner.prom",
        "The metrics file, when that directory exists.",
    ),
    (
        "/usr/share/pinner/",
        "The shipped configuration, Prometheus rules and Grafana dashboard.",
    ),
];

const ENVIRONMENT: &[(&str, &str)] = &[
    (
        "NO_COLOR",
        "Set and not empty: maps are drawn without colour.",
    ),
    (
        "PINNER_LOG",
        "\"stderr\": log to standard error instead of journald or syslog.",
    ),
    (
        "NOTIFY_SOCKET",
        "Set by systemd: the daemon reports readiness there (Type=notify).",
    ),
];

const EXAMPLES: &str = "pinner status
pinner status --map
pinner plan --root snapshot.tar.bz2 --domains /tmp/guests --json
pinner doctor --domain web-1
pinner isolate apply
pinner release --all --persistent
journalctl -t pinner DOMAIN=web-1";

/// The sections after the options of the page `name` ("pinner",
/// "pinner-status", "pinner-hook").
pub fn sections_of(name: &str) -> String {
    let mut out = String::new();
    if name == "pinner-hook" {
        out += &section(
            "EXIT STATUS",
            &tagged(&[(
                "0",
                "Always, whatever state the daemon is in; 2 when run by hand without arguments.",
            )]),
        );
        out += &section("FILES", &tagged(&FILES[1..5]));
        out += &section("SEE ALSO", "pinner(8), pinner.toml(5), journalctl(1)\n");
        return out;
    }
    out += &section("EXIT STATUS", &tagged(EXIT_STATUS));
    out += &section("FILES", &tagged(FILES));
    out += &section("ENVIRONMENT", &tagged(ENVIRONMENT));
    if name == "pinner" {
        out += &section("EXAMPLES", &example(EXAMPLES));
    }
    out += &section(
        "SEE ALSO",
        "pinner(8), pinner.toml(5), pinner\\-hook(8), virsh(1), systemctl(1), journalctl(1), cgroups(7)\n",
    );
    out
}

/// `pinner.toml(5)`.
pub fn config_page() -> String {
    let version = env!("CARGO_PKG_VERSION");
    let mut out = format!(".TH pinner.toml 5 \"\" \"pinner {version}\" \"File Formats\"\n");
    out += &section(
        "NAME",
        "pinner.toml \\- configuration of the pinner daemon\n",
    );
    out += &section("SYNOPSIS", "/etc/pinner/pinner.toml\n");
    out += &section(
        "DESCRIPTION",
        &format!(
            "{}\n",
            roff(
                "A TOML file read by pinner daemon at start and on SIGHUP (systemctl reload pinner), and by the pinner commands that plan. Every key is optional. It must be a regular file (or a symlink to one) of at most 1 MiB. A broken file is refused with its file, line and column; on reload the running configuration is kept."
            )
        ),
    );
    let mut table = None;
    for key in KEYS {
        if table != Some(key.table) {
            table = Some(key.table);
            let title = match key.table {
                "" => "KEYS".to_string(),
                name => format!("[{name}]"),
            };
            out += &section(&title, "");
        }
        out += &format!(
            ".TP\n\\fB{}\\fR (default: {})\n{}\n.RS\nExample: {}\n.RE\n",
            roff(key.name),
            roff(key.default_text()),
            roff(key.about),
            roff(&key.example.replace('\n', "; "))
        );
    }
    out += &section("EXAMPLES", &example("mode = \"observe\"\nreserved_cpus = \"0-1\"\n\n[isolation]\nenabled = true\n\n[openstack]\nnova_conf = \"/etc/nova/nova.conf\""));
    out += &section("FILES", &tagged(&FILES[..1]));
    out += &section("SEE ALSO", "pinner(8), pinner\\-hook(8), nova.conf(5)\n");
    out
}
