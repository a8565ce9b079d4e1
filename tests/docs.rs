//! The documentation holds together: every relative link in the README and
//! `docs/` reaches a file of this repository (and a heading of it, when the
//! link names one), and nothing points outside the repository.

use std::collections::BTreeSet;
use std::path::PathBuf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// README.md, every Markdown file under docs/, and the READMEs of deploy/
/// and loadtest/.
fn documents() -> Vec<PathBuf> {
    let root = repo();
    let mut docs = vec![
        root.join("README.md"),
        root.join("deploy/README.md"),
        root.join("loadtest/README.md"),
    ];
    let mut under_docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("a docs/ folder")
        .map(|e| e.expect("a docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    under_docs.sort();
    assert!(!under_docs.is_empty(), "no Markdown file in docs/");
    docs.extend(under_docs);
    docs
}

/// The lines of `text` outside fenced code blocks.
fn prose(text: &str) -> Vec<&str> {
    let mut fenced = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push(line);
        }
    }
    out
}

/// The anchors GitHub gives the headings of `text`: lower case, spaces to
/// hyphens, punctuation other than `-` and `_` dropped, `-1`, `-2` ...
/// appended to repeats.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for line in prose(text) {
        let Some(title) = line
            .strip_prefix('#')
            .map(|l| l.trim_start_matches('#'))
            .filter(|l| l.starts_with(' '))
        else {
            continue;
        };
        let slug: String = title
            .trim()
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        let mut anchor = slug.clone();
        let mut n = 0;
        while seen.contains(&anchor) {
            n += 1;
            anchor = format!("{slug}-{n}");
        }
        seen.insert(anchor);
    }
    seen
}

/// Every `[text](target)` link target in the prose of `text`.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in prose(text) {
        let mut rest = line;
        while let Some(i) = rest.find("](") {
            rest = &rest[i + 2..];
            let Some(end) = rest.find(')') else { break };
            out.push(rest[..end].trim().to_owned());
            rest = &rest[end..];
        }
    }
    out
}

#[test]
fn every_relative_link_reaches_a_file_and_heading_of_the_repository() {
    let root = repo().canonicalize().unwrap();
    let mut checked = 0;
    let mut broken = Vec::new();
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        let name = doc.strip_prefix(repo()).unwrap().display().to_string();
        for target in links(&text) {
            if target.starts_with("https://") || target.starts_with("http://") {
                continue;
            }
            checked += 1;
            let (file, anchor) = match target.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (target.as_str(), None),
            };
            let path = if file.is_empty() {
                doc.clone()
            } else {
                doc.parent().unwrap().join(file)
            };
            let Ok(resolved) = path.canonicalize() else {
                broken.push(format!("{name}: {target}: no such file"));
                continue;
            };
            if !resolved.starts_with(&root) {
                broken.push(format!("{name}: {target}: outside the repository"));
                continue;
            }
            if let Some(anchor) = anchor {
                let heads = std::fs::read_to_string(&resolved)
                    .map(|t| anchors(&t))
                    .unwrap_or_default();
                if !heads.contains(anchor) {
                    broken.push(format!("{name}: {target}: no heading with that anchor"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    assert!(checked >= 20, "only {checked} relative links found");
}

#[test]
fn no_document_refers_to_files_users_do_not_have() {
    let needles = ["shared/design", "protocol.md", "product.md", "style.md"];
    let mut found = Vec::new();
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        for (n, line) in text.lines().enumerate() {
            for needle in needles {
                if line.contains(needle) {
                    found.push(format!("{}:{}: {line}", doc.display(), n + 1));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "references outside the repository:\n{}",
        found.join("\n")
    );
}

#[test]
fn anchors_follow_github() {
    let heads = anchors(
        "# A b\n## P6, P7: io_uring vs epoll (2026-11-25)\n```\n# not a heading\n```\n## A b\n",
    );
    let want: BTreeSet<String> = ["a-b", "p6-p7-io_uring-vs-epoll-2026-11-25", "a-b-1"]
        .map(str::to_owned)
        .into();
    assert_eq!(heads, want);
    assert_eq!(
        links("see [x](a.md#b) and [y](../c) `[z](d)`"),
        vec!["a.md#b", "../c", "d"]
    );
}

/// The `sh` blocks between `<!-- walkthrough:begin -->` and
/// `<!-- walkthrough:end -->` in `text`, joined.
fn walkthrough(text: &str) -> String {
    let start = text
        .find("<!-- walkthrough:begin -->")
        .expect("a walkthrough:begin marker");
    let end = text
        .find("<!-- walkthrough:end -->")
        .expect("a walkthrough:end marker");
    let mut script = String::new();
    let mut in_block = false;
    for line in text[start..end].lines() {
        match (in_block, line.trim_end()) {
            (false, "```sh") => in_block = true,
            (true, "```") => in_block = false,
            (true, l) => {
                script.push_str(l);
                script.push('\n');
            }
            _ => {}
        }
    }
    assert!(!in_block, "an unclosed sh block in the walkthrough");
    script
}

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// docs/integration.md's walkthrough, run with bash as it is written,
/// against a simulator and a gateway it starts itself: every `expect` in
/// it must hold, and it must reach its end.
#[test]
#[allow(clippy::disallowed_methods)] // a hang guard on the real clock
fn the_integration_walkthrough_runs_as_written() {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let doc = std::fs::read_to_string(repo().join("docs/integration.md")).unwrap();
    let script = walkthrough(&doc);
    assert!(script.matches("expect '").count() >= 10, "{script}");
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_wnsgate"));
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = tempfile::tempdir().unwrap();
    let (stdout, stderr) = (out.path().join("stdout"), out.path().join("stderr"));
    let mut child = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .env("PATH", path)
        .env("GW", format!("127.0.0.1:{}", free_port()))
        .env("SIM", format!("127.0.0.1:{}", free_port()))
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        // Its own process group, so that whatever it started in the
        // background can be stopped with it if it fails half-way.
        .process_group(0)
        .spawn()
        .expect("run bash");
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stderr(Stdio::null())
        .status();
    let _ = child.wait();
    let (stdout, stderr) = (
        std::fs::read_to_string(stdout).unwrap(),
        std::fs::read_to_string(stderr).unwrap(),
    );
    let status = status.unwrap_or_else(|| panic!("still running after 120 s:\n{stdout}\n{stderr}"));
    assert!(
        status.success(),
        "the walkthrough failed ({status}):\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.ends_with("walkthrough complete\n"),
        "{stdout}\n{stderr}"
    );
    // The answers it checked went to stderr, in order.
    for seen in [
        "\"result\":\"channel_dead\"",
        "<Replace><CmdID>4</CmdID>",
        "\"code\":\"job_closed\"",
        "\"state\":\"queued\"",
    ] {
        assert!(stderr.contains(seen), "{seen} not seen:\n{stderr}");
    }
}
