//! Logging for both binaries without extra crates: journald's native protocol
//! (structured fields such as `DOMAIN=`), else syslog on `/dev/log`, else
//! stderr. The first sink that works is kept for the process's life.

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::Path;

const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";
const SYSLOG_SOCKET: &str = "/dev/log";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error = 3,
    Warning = 4,
    Info = 6,
    Debug = 7,
}

impl Level {
    fn word(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warning => "warning",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }
}

enum Sink {
    Journal(UnixDatagram),
    Syslog(UnixDatagram),
    Stderr,
}

pub struct Logger {
    identifier: &'static str,
    sink: Sink,
    max_level: Level,
}

impl Logger {
    /// Picks journald when its socket accepts us, then syslog, then stderr.
    /// `PINNER_LOG=stderr` forces stderr (tests, foreground runs).
    pub fn new(identifier: &'static str, max_level: Level) -> Logger {
        let forced_stderr = std::env::var_os("PINNER_LOG").is_some_and(|v| v == "stderr");
        let sink = if forced_stderr {
            Sink::Stderr
        } else {
            connect(JOURNAL_SOCKET)
                .map(Sink::Journal)
                .or_else(|| connect(SYSLOG_SOCKET).map(Sink::Syslog))
                .unwrap_or(Sink::Stderr)
        };
        Logger {
            identifier,
            sink,
            max_level,
        }
    }

    /// Logs `message` with extra journald fields (upper-case names, e.g.
    /// `("DOMAIN", "vm1")`); on syslog and stderr they are appended as
    /// `KEY=value`.
    pub fn log(&self, level: Level, message: &str, fields: &[(&str, &str)]) {
        if level > self.max_level {
            return;
        }
        let delivered = match &self.sink {
            Sink::Journal(sock) => sock
                .send(&journal_datagram(self.identifier, level, message, fields))
                .is_ok(),
            Sink::Syslog(sock) => sock
                .send(syslog_line(self.identifier, level, message, fields).as_bytes())
                .is_ok(),
            Sink::Stderr => false,
        };
        if !delivered {
            let line = plain_line(level, message, fields);
            let _ = writeln!(std::io::stderr().lock(), "{}: {line}", self.identifier);
        }
    }

    pub fn error(&self, message: &str, fields: &[(&str, &str)]) {
        self.log(Level::Error, message, fields)
    }
    pub fn warn(&self, message: &str, fields: &[(&str, &str)]) {
        self.log(Level::Warning, message, fields)
    }
    pub fn info(&self, message: &str, fields: &[(&str, &str)]) {
        self.log(Level::Info, message, fields)
    }
    pub fn debug(&self, message: &str, fields: &[(&str, &str)]) {
        self.log(Level::Debug, message, fields)
    }
}

fn connect(path: &str) -> Option<UnixDatagram> {
    if !Path::new(path).exists() {
        return None;
    }
    let sock = UnixDatagram::unbound().ok()?;
    sock.connect(path).ok()?;
    Some(sock)
}

/// journald's native protocol: `NAME=value\n`, or for values holding a
/// newline `NAME\n<u64 LE length><value>\n`.
fn journal_datagram(
    identifier: &str,
    level: Level,
    message: &str,
    fields: &[(&str, &str)],
) -> Vec<u8> {
    let priority = (level as u8).to_string();
    let mut out = Vec::with_capacity(128 + message.len());
    let base = [
        ("PRIORITY", priority.as_str()),
        ("SYSLOG_IDENTIFIER", identifier),
        ("MESSAGE", message),
    ];
    for (name, value) in base.iter().chain(fields) {
        out.extend_from_slice(name.as_bytes());
        if value.contains('\n') {
            out.push(b'\n');
            out.extend_from_slice(&(value.len() as u64).to_le_bytes());
        } else {
            out.push(b'=');
        }
        out.extend_from_slice(value.as_bytes());
        out.push(b'\n');
    }
    out
}

/// RFC 3164 line for /dev/log, facility daemon (3).
fn syslog_line(identifier: &str, level: Level, message: &str, fields: &[(&str, &str)]) -> String {
    let pri = 3 * 8 + level as u8;
    format!(
        "<{pri}>{identifier}[{}]: {}",
        std::process::id(),
        plain_line(level, message, fields)
    )
}

/// One line whatever the message holds: its control characters escaped
/// (a process name with a newline must not forge a second line), field
/// values quoted.
fn plain_line(level: Level, message: &str, fields: &[(&str, &str)]) -> String {
    let mut line = format!("{}: {}", level.word(), crate::text::printable(message));
    for (name, value) in fields {
        line.push_str(&format!(" {name}={value:?}"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_datagram_uses_binary_form_for_multiline_values() {
        let d = journal_datagram("pinner", Level::Info, "two\nlines", &[("DOMAIN", "vm1")]);
        let mut expected = b"PRIORITY=6\nSYSLOG_IDENTIFIER=pinner\nMESSAGE\n".to_vec();
        expected.extend_from_slice(&9u64.to_le_bytes());
        expected.extend_from_slice(b"two\nlines\nDOMAIN=vm1\n");
        assert_eq!(d, expected);
    }

    #[test]
    fn plain_lines_quote_field_values() {
        // Quoting keeps hostile domain names (newlines, spaces) on one line.
        let line = plain_line(Level::Warning, "dropped", &[("DOMAIN", "a\nb c")]);
        assert_eq!(line, "warning: dropped DOMAIN=\"a\\nb c\"");
        assert!(
            syslog_line("pinner-hook", Level::Warning, "x", &[]).starts_with("<28>pinner-hook[")
        );
        let forged = plain_line(Level::Info, "confined x\nerror: FAKE[12]", &[]);
        assert_eq!(forged, "info: confined x\\nerror: FAKE[12]");
    }
}
