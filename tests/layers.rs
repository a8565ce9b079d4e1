//! The top-level modules of `src/` form layers: no module may reach, through
//! `crate::` or `super::` paths, a module that reaches it back. This test
//! reads every source file (test-only code left out), maps each path to the
//! top-level module it names, and fails on any cycle, naming the modules in
//! it and one file for each edge.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Files under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a file under `src/`, as segments: `src/api/push.rs`
/// is `["api", "push"]`, `src/api/mod.rs` is `["api"]`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("under src");
    let mut segs: Vec<String> = rel
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if segs.last().is_some_and(|s| s == "mod" || s == "lib") {
        segs.pop();
    }
    segs
}

/// The file's text without test-only code: `#[cfg(test)]` items (a module
/// with its braces, or one `use` line) are dropped.
fn without_tests(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() != "#[cfg(test)]" {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        // Skip the item that follows, counting braces when it has a body.
        let mut depth = 0i32;
        let mut opened = false;
        for item in lines.by_ref() {
            for c in item.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            if (opened && depth <= 0) || (!opened && item.trim_end().ends_with(';')) {
                break;
            }
        }
    }
    out
}

/// Strips `//` comments (doc comments included): links in docs are not
/// dependencies.
fn code_only(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Top-level modules a file's code names through `crate::X` or `super::`.
fn targets(module: &[String], code: &str, tops: &BTreeSet<String>) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in code.match_indices("crate::") {
        let before = code[..i].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::c}`: every name at the group's top level.
            let mut depth = 0;
            let mut start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && !c.is_whitespace() => {
                        start = false;
                        let name = ident(&group[j..]);
                        if tops.contains(&name) {
                            found.insert(name);
                        }
                    }
                    _ => {}
                }
            }
            continue;
        }
        let name = ident(rest);
        if tops.contains(&name) {
            found.insert(name);
        }
    }
    // `super::` from a file two levels down or deeper stays in its
    // top-level module; from `src/x/y.rs` it names `x`.
    for (i, _) in code.match_indices("super::") {
        let before = code[..i].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let mut rest = &code[i..];
        let mut up = 0;
        while let Some(r) = rest.strip_prefix("super::") {
            up += 1;
            rest = r;
        }
        if module.len() > up {
            continue;
        }
        if module.len() == up {
            let name = ident(rest);
            if tops.contains(&name) {
                found.insert(name);
            }
        }
    }
    found
}

/// Edges between top-level modules, each with one file that makes it.
fn module_graph() -> BTreeMap<String, BTreeMap<String, PathBuf>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    // Binaries are crates of their own: their `crate::` is not the library.
    files.retain(|f| {
        let m = module_of(&src, f);
        !(m.first().is_some_and(|s| s == "bin") || m == ["main"])
    });
    let tops: BTreeSet<String> = files
        .iter()
        .filter_map(|f| module_of(&src, f).first().cloned())
        .collect();
    let mut graph: BTreeMap<String, BTreeMap<String, PathBuf>> = BTreeMap::new();
    for file in &files {
        let module = module_of(&src, file);
        let Some(top) = module.first().cloned() else {
            continue;
        };
        let name = file.file_name().unwrap().to_string_lossy();
        if name == "tests.rs" || name.ends_with("_tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("read source");
        let code = code_only(&without_tests(&text));
        let edges = graph.entry(top.clone()).or_default();
        for t in targets(&module, &code, &tops) {
            if t != top {
                edges
                    .entry(t)
                    .or_insert_with(|| file.strip_prefix(&src).unwrap().to_path_buf());
            }
        }
    }
    graph
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(graph: &BTreeMap<String, BTreeMap<String, PathBuf>>) -> Vec<Vec<String>> {
    struct State<'g> {
        graph: &'g BTreeMap<String, BTreeMap<String, PathBuf>>,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'g>(s: &mut State<'g>, v: &'g str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        if let Some(edges) = s.graph.get(v) {
            for w in edges.keys() {
                let w = w.as_str();
                if !s.index.contains_key(w) {
                    visit(s, w);
                    let lw = s.low[w];
                    let lv = s.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if s.on_stack.contains(w) {
                    let iw = s.index[w];
                    let lv = s.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                comp.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

#[test]
fn top_level_modules_form_no_cycle() {
    let graph = module_graph();
    let found = cycles(&graph);
    let mut report = String::new();
    for comp in &found {
        report.push_str(&format!("cycle: {}\n", comp.join(", ")));
        for a in comp {
            for (b, file) in &graph[a] {
                if comp.contains(b) {
                    report.push_str(&format!("  {a} -> {b} (src/{})\n", file.display()));
                }
            }
        }
    }
    assert!(found.is_empty(), "{report}");
}

#[test]
fn the_check_sees_a_cycle() {
    // The check itself: two modules that name each other are a cycle.
    let mut graph: BTreeMap<String, BTreeMap<String, PathBuf>> = BTreeMap::new();
    graph
        .entry("a".into())
        .or_default()
        .insert("b".into(), "a.rs".into());
    graph
        .entry("b".into())
        .or_default()
        .insert("a".into(), "b.rs".into());
    graph.entry("c".into()).or_default();
    assert_eq!(cycles(&graph), vec![vec!["a".to_owned(), "b".to_owned()]]);
    let tops: BTreeSet<String> = ["api", "wake", "core", "x", "y"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let code = "use crate::wake::X;\nfn f() { super::api::g() }\nuse crate::{ core, x::{y, z} };";
    let module = vec!["gateway".to_owned()];
    assert_eq!(
        targets(&module, code, &tops),
        ["api", "core", "wake", "x"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
    let stripped =
        without_tests("use a;\n#[cfg(test)]\nmod tests {\n use crate::api;\n}\nuse b;\n");
    assert!(!stripped.contains("crate::api") && stripped.contains("use b;"));
}
