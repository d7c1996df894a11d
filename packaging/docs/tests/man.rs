//! The man pages as an admin meets them: every page passes groff's checks
//! (`man --warnings`), has the sections Debian and RHEL pages have, its
//! version in the footer, and pinner.toml(5) names every key.

use std::path::{Path, PathBuf};
use std::process::Command;

fn generated() -> PathBuf {
    let out = std::env::temp_dir().join(format!("pinner-docs-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let status = Command::new(env!("CARGO_BIN_EXE_pinner-docs"))
        .arg(&out)
        .status()
        .expect("run pinner-docs");
    assert!(status.success());
    out
}

/// What `man` says about a page on stderr, and the page as text.
fn render(page: &Path) -> (String, String) {
    let out = Command::new("man")
        .args(["--warnings", "-E", "UTF-8", "-l"])
        .arg(page)
        .env("MANWIDTH", "80")
        .env("MAN_KEEP_FORMATTING", "")
        .output()
        .expect("man (man-db) and groff are installed by scripts/setup");
    assert!(out.status.success(), "{}", page.display());
    (
        String::from_utf8_lossy(&out.stderr).into_owned(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn every_page_is_clean_and_complete() {
    let out = generated();
    let pages: Vec<PathBuf> = std::fs::read_dir(out.join("man"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(pages.len() >= 10, "{pages:?}");
    let version = env!("CARGO_PKG_VERSION");
    for page in &pages {
        let (warnings, text) = render(page);
        assert!(warnings.is_empty(), "{}: {warnings}", page.display());
        for section in ["NAME", "SYNOPSIS", "DESCRIPTION", "FILES", "SEE ALSO"] {
            assert!(
                text.contains(&format!("\n{section}\n")),
                "{}: no {section}",
                page.display()
            );
        }
        let footer = text.trim_end().lines().last().unwrap_or("");
        assert!(
            footer.contains(&format!("pinner {version}")),
            "{}: footer {footer:?}",
            page.display()
        );
    }
    let (_, pinner) = render(&out.join("man/pinner.8"));
    for section in ["EXIT STATUS", "ENVIRONMENT", "EXAMPLES", "SUBCOMMANDS"] {
        assert!(
            pinner.contains(&format!("\n{section}\n")),
            "pinner(8): no {section}"
        );
    }
    let name = pinner.split("\nSYNOPSIS\n").next().unwrap();
    let description = pinner.split("\nDESCRIPTION\n").nth(1).unwrap();
    assert!(
        description.len() > 4 * name.len(),
        "pinner(8) repeats its NAME as its DESCRIPTION"
    );
    let (_, config) = render(&out.join("man/pinner.toml.5"));
    for section in ["KEYS", "[isolation]", "[metrics]", "EXAMPLES"] {
        assert!(
            config.contains(&format!("\n{section}\n")),
            "pinner.toml(5): no {section}"
        );
    }
    for key in pinner::config::keys::KEYS {
        assert!(
            config.contains(key.name),
            "pinner.toml(5) lacks {}",
            key.name
        );
    }
    std::fs::remove_dir_all(&out).unwrap();
}
