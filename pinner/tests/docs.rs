//! The operator's page and the docs: every link resolves inside the
//! repository (file and anchor), and the README stays a page an operator
//! reads through.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace holds the pinner crate")
        .to_path_buf()
}

fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![repo().join("README.md")];
    let docs = std::fs::read_dir(repo().join("docs")).expect("docs/ exists");
    for entry in docs {
        let path = entry.expect("readable docs/").path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// GitHub's anchor of a heading: lower case, punctuation dropped, spaces
/// to hyphens.
fn anchor_of(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    let mut in_code = false;
    let mut found = BTreeSet::new();
    for line in text.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with('#') {
            found.insert(anchor_of(line.trim_start_matches('#')));
        }
    }
    found
}

/// Every `](target)` outside code blocks.
fn links(text: &str) -> Vec<String> {
    let mut in_code = false;
    let mut found = Vec::new();
    for line in text.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            let tail = &rest[at + 2..];
            let Some(end) = tail.find(')') else { break };
            found.push(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    found
}

fn broken_link(file: &Path, target: &str) -> Option<String> {
    if target.starts_with("http://") || target.starts_with("https://") {
        return Some(format!("{target}: outside the repository"));
    }
    let (path, anchor) = target.split_once('#').unwrap_or((target, ""));
    let dest = if path.is_empty() {
        file.to_path_buf()
    } else {
        file.parent().expect("a file has a directory").join(path)
    };
    let Ok(dest) = dest.canonicalize() else {
        return Some(format!("{target}: no such file"));
    };
    if !dest.starts_with(repo().canonicalize().expect("the repository exists")) {
        return Some(format!("{target}: outside the repository"));
    }
    if anchor.is_empty() || dest.extension().is_none_or(|e| e != "md") {
        return None;
    }
    let text = std::fs::read_to_string(&dest).expect("a linked page is readable");
    (!anchors(&text).contains(anchor)).then(|| format!("{target}: no heading #{anchor}"))
}

#[test]
fn every_link_resolves_inside_the_repository() {
    let mut broken = Vec::new();
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).expect("readable markdown");
        for target in links(&text) {
            if let Some(why) = broken_link(&file, &target) {
                broken.push(format!("{}: {why}", file.display()));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_readme_is_a_page_an_operator_reads_through() {
    let text = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let lines = text.lines().count();
    assert!(
        lines <= 300,
        "README.md has {lines} lines; depth goes to docs/"
    );
    for section in [
        "What it changes on a host",
        "Install",
        "Configure",
        "Roll out on a fleet",
        "Operate",
        "Debug with journald",
        "Uninstall",
    ] {
        assert!(
            text.contains(&format!("\n## {section}\n")),
            "README.md lacks its section {section:?}"
        );
    }
}

#[test]
fn anchors_follow_headings_as_github_makes_them() {
    assert_eq!(
        anchor_of(" Keep host daemons off the guests' CPUs"),
        "keep-host-daemons-off-the-guests-cpus"
    );
    assert_eq!(
        anchor_of("See the effect: status, metrics, doctor"),
        "see-the-effect-status-metrics-doctor"
    );
    assert!(links("a [b](c.md#d) and [e](f)\n```\n[x](y)\n```") == ["c.md#d", "f"]);
}
