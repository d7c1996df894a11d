//! Text from others (domain names, process names, error messages that
//! quote them) made safe to show a person: a terminal must not obey it, and
//! a log line must stay one line.

use std::borrow::Cow;
use std::fmt::Write;

/// `text` with every control character escaped visibly: `\r`, `\n`, `\t`,
/// `\\x1b` for the other C0 and C1 controls and DEL, `\u{202e}` for the
/// characters that reorder or hide text (bidirectional overrides and
/// isolates). A backslash is doubled, so an escape cannot be forged.
/// Borrowed when there is nothing to escape (the usual name).
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x100 && c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c == '\\'
        || c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_shown_not_obeyed() {
        assert!(matches!(printable("web-1"), Cow::Borrowed("web-1")));
        assert_eq!(
            printable("web\r  vcpu 1 -> 0 (FORGED)"),
            "web\\r  vcpu 1 -> 0 (FORGED)"
        );
        assert_eq!(printable("x\nerror: FAKE"), "x\\nerror: FAKE");
        assert_eq!(printable("\x1b[2Jboom"), "\\x1b[2Jboom");
        assert_eq!(printable("a\u{7f}b\u{85}c"), "a\\x7fb\\x85c");
        assert_eq!(printable("evil\u{202e}txt.exe"), "evil\\u{202e}txt.exe");
        assert_eq!(
            printable("a\\r"),
            "a\\\\r",
            "a backslash cannot forge an escape"
        );
        assert_eq!(
            printable(" twin "),
            " twin ",
            "spaces are kept: they tell guests apart"
        );
    }
}
