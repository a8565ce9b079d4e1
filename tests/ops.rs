//! Operations files checked against the real thing: the metrics catalogue
//! in the README, the alert rules and the dashboard against a live
//! `/metrics` scrape of a gateway that has woken devices through the
//! simulator, and of two gateways in cluster mode on a one-server NATS;
//! promtool on the rules and the scrapes; systemd-analyze on the unit;
//! check-config on the shipped configurations; the local 3 + 3 cluster
//! script's own check.
//!
//! promtool, systemd-analyze and nats-server are skipped with a note on a
//! workstation without them; with `CI=true` a missing tool fails the test
//! (`.ci/run` installs them). kubectl, which renders the cluster overlay,
//! is optional everywhere.

// The cluster scrape waits for partitions to settle on the real clock; the
// rule that time is read only through `wnsgate::clock` (clippy.toml) is the
// gateway's.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use wnsgate::sim::SimConfig;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn repo_file(rel: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The path of `tool` on PATH; `None` (after a note) when it is missing
/// outside CI. In CI a missing tool is a failure.
fn tool(tool: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{tool} is required in CI (.ci/run installs it)"
        );
        eprintln!("NOTE: {tool} is not installed; this check did not run");
    }
    found
}

/// A `/metrics` scrape of a gateway that has registered and imported
/// devices, woken them one by one and in bulk through the simulator (one
/// channel answered 410), and served API errors.
fn scrape() -> &'static str {
    static SCRAPE: OnceLock<String> = OnceLock::new();
    SCRAPE.get_or_init(|| {
        let (_dir, _sim, gw) = common::start_with_sim(SimConfig::default());
        let mut c = gw.client();
        for (id, token) in [("m1", "AwYAAADm1"), ("m2", "x410m2")] {
            let r = c
                .send_json(
                    "PUT",
                    &format!("/v1/devices/{id}/channel"),
                    &common::channel_body(&common::uri(token)),
                )
                .unwrap();
            assert_eq!(r.status, 201, "{}", r.text());
        }
        let accepted = common::import_tokens(
            &gw,
            "db5.notify.windows.com",
            (0..20).map(|i| (format!("imp{i}"), format!("AwYAAADimp{i}"))),
        );
        assert_eq!(accepted, 20);
        for id in ["m1", "m2"] {
            let r = c
                .request(
                    "POST",
                    &format!("/v1/devices/{id}/push?wait=true"),
                    None,
                    b"",
                )
                .unwrap();
            assert_eq!(r.status, 200, "{}", r.text());
        }
        let job = c
            .send_json("POST", "/v1/pushes", &serde_json::json!({"all": true}))
            .unwrap()
            .json();
        let id = job["job_id"].as_str().expect("job id").to_owned();
        let done = common::wait_job(&gw, &id, Duration::from_secs(60));
        assert_eq!(done["received"], 21, "{done}");
        assert_eq!(c.get("/v1/devices/nobody").unwrap().status, 404);
        let r = c.get("/metrics").unwrap();
        assert_eq!(r.status, 200);
        r.text()
    })
}

/// A `/metrics` scrape of a gateway in cluster mode: two gateways on a
/// one-server NATS JetStream share 16 partitions, and devices of both are
/// registered through the first, so its appends are timed and some calls
/// are forwarded. `None` (after a note) where nats-server is missing
/// outside CI.
fn cluster_scrape() -> Option<&'static str> {
    static SCRAPE: OnceLock<Option<String>> = OnceLock::new();
    SCRAPE
        .get_or_init(|| {
            if std::env::var_os("WNSGATE_NATS_SERVER").is_none() {
                tool("nats-server")?;
            }
            let dir = tempfile::tempdir().unwrap();
            let nats = common::nats::NatsCluster::start(dir.path(), 1);
            let urls = nats.urls_toml();
            let gateway = |node: &str| {
                common::Server::start(
                    &dir.path().join(node),
                    &[
                        ("WNSGATE_CLUSTER__NATS_URLS", urls.as_str()),
                        ("WNSGATE_CLUSTER__NODE_ID", node),
                        ("WNSGATE_CLUSTER__REPLICAS", "1"),
                        ("WNSGATE_CLUSTER__PARTITIONS", "16"),
                        ("WNSGATE_CLUSTER__STREAM_COUNT", "1"),
                        ("WNSGATE_CLUSTER__LEASE_TTL", "2s"),
                    ],
                )
            };
            let a = gateway("ops-a");
            let b = gateway("ops-b");
            // Until b has taken its share from a.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let owned: Vec<f64> = [&a, &b]
                    .iter()
                    .map(|g| {
                        sample_sum(
                            &g.client().get("/metrics").unwrap().text(),
                            "wnsgate_cluster_partitions_owned",
                        )
                    })
                    .collect();
                if owned.iter().all(|&n| n > 0.0) && owned.iter().sum::<f64>() == 16.0 {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "partitions never settled: {owned:?}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            let mut c = a.client();
            for i in 0..48 {
                let (id, token) = (format!("c{i}"), format!("AwYAAADc{i}"));
                // A partition still moving answers 503 for a moment.
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    let r = c
                        .send_json(
                            "PUT",
                            &format!("/v1/devices/{id}/channel"),
                            &common::channel_body(&common::uri(&token)),
                        )
                        .unwrap();
                    if r.status == 201 {
                        break;
                    }
                    assert!(
                        r.status == 503 && Instant::now() < deadline,
                        "{}: {}",
                        r.status,
                        r.text()
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            let r = c.get("/metrics").unwrap();
            assert_eq!(r.status, 200);
            let text = r.text();
            assert!(
                sample_sum(&text, "wnsgate_cluster_forwarded_total") > 0.0,
                "no call was forwarded:\n{text}"
            );
            drop((a, b, nats));
            Some(text)
        })
        .as_deref()
}

/// The sum of the samples of `name` (every label set) in an exposition.
fn sample_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Metric families of an exposition: name -> (type, label names, `le`
/// bounds of a histogram).
#[derive(Debug, Default)]
struct Family {
    kind: String,
    labels: BTreeSet<String>,
    buckets: Vec<f64>,
}

fn families(text: &str) -> BTreeMap<String, Family> {
    let mut out: BTreeMap<String, Family> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE line");
            out.entry(name.to_owned()).or_default().kind = kind.to_owned();
        }
    }
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, _value) = line.rsplit_once(' ').expect("sample line");
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| out.get(*f).is_some_and(|f| f.kind == "histogram"))
            })
            .unwrap_or(name);
        let fam = out
            .get_mut(family)
            .unwrap_or_else(|| panic!("sample without a TYPE line: {line}"));
        for pair in split_labels(labels) {
            let (k, v) = pair.split_once('=').expect("label pair");
            if k == "le" {
                if v != "\"+Inf\"" {
                    let b: f64 = v.trim_matches('"').parse().expect("le value");
                    if !fam.buckets.contains(&b) {
                        fam.buckets.push(b);
                    }
                }
            } else {
                fam.labels.insert(k.to_owned());
            }
        }
    }
    out
}

/// `a="x",b="y,z"` split at the commas between pairs.
fn split_labels(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, ch) in s.char_indices() {
        match ch {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
    out
}

/// Every `wnsgate_...` name in `text`.
fn metric_names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("wnsgate_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

/// Sample names in the scrape (`_bucket`, `_sum`, `_count` included).
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or("").to_owned())
        .collect()
}

/// `promtool check metrics` on an exposition.
fn promtool_check_metrics(text: &str) {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_scrape_passes_promtool_check_metrics() {
    promtool_check_metrics(scrape());
}

#[test]
fn the_cluster_scrape_passes_promtool_check_metrics() {
    let Some(text) = cluster_scrape() else {
        return;
    };
    promtool_check_metrics(text);
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let dir = Path::new(ROOT).join("deploy/prometheus");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn alert_rules_and_the_dashboard_use_only_exported_metrics() {
    // Sample names (`_bucket` ...) in queries, family names in prose; of
    // the embedded gateway and of one in cluster mode. A counter with a
    // label appears once incremented: the cluster ones no scrape shows
    // are taken from the README's cluster metrics table.
    let mut exported = sample_names(scrape());
    exported.extend(families(scrape()).into_keys());
    match cluster_scrape() {
        Some(text) => {
            exported.extend(sample_names(text));
            let live = families(text);
            exported.extend(live.keys().cloned());
            exported.extend(
                cluster_documented_metrics()
                    .into_iter()
                    .filter(|(name, doc)| {
                        !live.contains_key(name) && doc.kind == "counter" && !doc.labels.is_empty()
                    })
                    .map(|(name, _)| name),
            );
        }
        None => exported.extend(cluster_documented_metrics().into_keys()),
    }
    for file in [
        "deploy/prometheus/alerts.yml",
        "deploy/grafana/wnsgate.json",
    ] {
        let used = metric_names_in(&repo_file(file));
        assert!(used.len() >= 10, "{file} uses only {used:?}");
        let missing: Vec<_> = used.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "{file} uses metrics the gateway does not export: {missing:?}"
        );
    }
    let dash: serde_json::Value = serde_json::from_str(&repo_file("deploy/grafana/wnsgate.json"))
        .expect("the dashboard is JSON");
    let panels = dash["panels"].as_array().expect("panels");
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let targets = p["targets"].as_array().expect("targets");
        assert!(
            !targets.is_empty() && targets.iter().all(|t| t["expr"].is_string()),
            "panel {} has no query",
            p["title"]
        );
    }
}

#[test]
fn the_dashboard_queries_are_valid_promql() {
    let dash: serde_json::Value =
        serde_json::from_str(&repo_file("deploy/grafana/wnsgate.json")).unwrap();
    // Every query as a recording rule, so promtool parses it; Grafana's
    // variables are replaced by what they expand to.
    let rules: Vec<serde_json::Value> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["targets"].as_array())
        .flatten()
        .enumerate()
        .map(|(i, t)| {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "5m")
                .replace("$instance", ".*");
            serde_json::json!({"record": format!("dashboard:query{i}"), "expr": expr})
        })
        .collect();
    assert!(rules.len() >= 20, "{} queries", rules.len());
    let Some(promtool) = tool("promtool") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-queries.json");
    let doc = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    std::fs::write(&file, doc.to_string()).unwrap();
    let out = Command::new(promtool)
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "a dashboard query does not parse:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The README's metrics catalogue (the `## Metrics` table): name ->
/// (type, labels, buckets).
fn documented_metrics() -> BTreeMap<String, Family> {
    metrics_table(&readme_section("\n## Metrics\n", "\n## "))
}

/// The README's cluster metrics table (in "Cluster mode", under Operate).
fn cluster_documented_metrics() -> BTreeMap<String, Family> {
    let table = metrics_table(&readme_section("\n### Cluster mode", "\n##"));
    assert!(table.len() >= 6, "the cluster metrics table: {table:?}");
    table
}

/// The README from the heading `start` to the next line starting with
/// `next`.
fn readme_section(start: &str, next: &str) -> String {
    let readme = repo_file("README.md");
    let at = readme
        .find(start)
        .unwrap_or_else(|| panic!("the README has no {start:?}"));
    let section = &readme[at + 1..];
    let end = section[3..].find(next).map_or(section.len(), |i| i + 3);
    section[..end].to_owned()
}

/// The rows of the metrics tables in `section`.
fn metrics_table(section: &str) -> BTreeMap<String, Family> {
    let mut out = BTreeMap::new();
    for row in section.lines().filter(|l| l.starts_with("| `wnsgate_")) {
        let cols: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        assert_eq!(cols.len(), 5, "a metrics row needs 5 columns: {row}");
        let name = cols[0].trim_matches('`').to_owned();
        let labels = cols[2]
            .split(',')
            .map(|l| l.trim().trim_matches('`'))
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        let buckets = cols[4]
            .split(',')
            .map(str::trim)
            .filter(|b| !b.is_empty())
            .map(|b| {
                b.parse()
                    .unwrap_or_else(|_| panic!("bucket {b:?} in {row}"))
            })
            .collect();
        let prev = out.insert(
            name.clone(),
            Family {
                kind: cols[1].to_owned(),
                labels,
                buckets,
            },
        );
        assert!(prev.is_none(), "{name} is documented twice");
    }
    out
}

/// A documented metric against its live family: type, labels, buckets,
/// and the `_total` naming rule.
fn assert_matches(name: &str, doc: &Family, live: &Family) {
    assert_eq!(doc.kind, live.kind, "{name}: type");
    assert_eq!(doc.labels, live.labels, "{name}: labels");
    let mut live_buckets = live.buckets.clone();
    live_buckets.sort_by(f64::total_cmp);
    assert_eq!(doc.buckets, live_buckets, "{name}: buckets");
    assert!(
        name.ends_with("_total") == (live.kind == "counter"),
        "{name}: counters and only counters end in _total"
    );
}

#[test]
fn the_readme_metrics_catalogue_matches_a_live_scrape() {
    let exported = families(scrape());
    let documented = documented_metrics();
    let exported_names: BTreeSet<_> = exported.keys().collect();
    let documented_names: BTreeSet<_> = documented.keys().collect();
    let undocumented: Vec<_> = exported_names.difference(&documented_names).collect();
    let absent: Vec<_> = documented_names.difference(&exported_names).collect();
    assert!(
        undocumented.is_empty(),
        "exported but not in the README's metrics table: {undocumented:?}"
    );
    assert!(
        absent.is_empty(),
        "in the README's metrics table but not exported: {absent:?}"
    );
    for (name, doc) in &documented {
        assert_matches(name, doc, &exported[name]);
    }
}

#[test]
fn the_readme_cluster_metrics_table_matches_a_cluster_scrape() {
    let cluster = cluster_documented_metrics();
    let Some(text) = cluster_scrape() else {
        return;
    };
    let exported = families(text);
    let main = documented_metrics();
    // Everything a gateway in cluster mode exports is documented, in the
    // catalogue or in the cluster table.
    let undocumented: Vec<_> = exported
        .keys()
        .filter(|n| !main.contains_key(*n) && !cluster.contains_key(*n))
        .collect();
    assert!(
        undocumented.is_empty(),
        "exported in cluster mode but in neither README metrics table: {undocumented:?}"
    );
    for (name, doc) in &cluster {
        assert!(!main.contains_key(name), "{name} is in both metrics tables");
        match exported.get(name) {
            Some(live) => assert_matches(name, doc, live),
            // Only a counter with a label may be missing: its series appear
            // at the first increment.
            None => assert!(
                doc.kind == "counter" && !doc.labels.is_empty(),
                "in the README's cluster metrics table but not exported in cluster mode: {name}"
            ),
        }
    }
    for must in [
        "wnsgate_cluster_append_seconds",
        "wnsgate_cluster_partitions_owned",
        "wnsgate_cluster_ownership_changes_total",
        "wnsgate_cluster_takeover_seconds",
        "wnsgate_cluster_forwarded_total",
        "wnsgate_store_writable",
    ] {
        assert!(
            exported.contains_key(must),
            "the cluster scrape lacks {must}"
        );
    }
    // Cluster series are the cluster mode's only.
    let embedded = families(scrape());
    let leaked: Vec<_> = cluster
        .keys()
        .filter(|n| embedded.contains_key(*n))
        .collect();
    assert!(leaked.is_empty(), "exported in embedded mode: {leaked:?}");
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let Some(analyze) = tool("systemd-analyze") else {
        return;
    };
    // verify needs ExecStart's binary to exist: point it at the one built.
    let unit = repo_file("deploy/wnsgate.service")
        .replace("/usr/bin/wnsgate", env!("CARGO_BIN_EXE_wnsgate"));
    assert!(unit.contains("NoNewPrivileges=yes") && unit.contains("StateDirectory=wnsgate"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wnsgate.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {err}");
    assert!(
        !err.contains("wnsgate.service"),
        "systemd-analyze warns about the unit: {err}"
    );
}

/// The `wnsgate.toml` of a ConfigMap manifest.
fn configmap_toml(rel: &str) -> String {
    let manifest = repo_file(rel);
    let start = manifest
        .find("wnsgate.toml: |\n")
        .unwrap_or_else(|| panic!("{rel}: the ConfigMap holds no wnsgate.toml"));
    manifest[start..]
        .lines()
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect()
}

/// `wnsgate check-config` on `toml` with the Secret's files in place and
/// `env` set; its standard output.
fn check_config(toml: &str, env: &[(&str, &str)]) -> String {
    assert!(toml.contains("[[wns.apps]]"), "{toml}");
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    std::fs::write(secrets.join("api-tokens"), "a-long-random-api-token-0001\n").unwrap();
    std::fs::write(secrets.join("contoso-client-secret"), "secret\n").unwrap();
    let file = dir.path().join("wnsgate.toml");
    std::fs::write(
        &file,
        toml.replace("/etc/wnsgate/secrets", secrets.to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wnsgate"))
        .arg("check-config")
        .arg(&file)
        .env("WNSGATE_STORE__PATH", dir.path().join("data"))
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stdout.contains("1 API token(s), 1 WNS app(s)"), "{stdout}");
    stdout
}

#[test]
fn the_kubernetes_config_passes_check_config() {
    check_config(&configmap_toml("deploy/kubernetes/configmap.yaml"), &[]);
}

/// The value of the container environment variable `name` in a manifest.
fn manifest_env(manifest: &str, name: &str) -> String {
    let at = manifest
        .find(&format!("- name: {name}\n"))
        .unwrap_or_else(|| panic!("no environment variable {name}"));
    let value = manifest[at..]
        .lines()
        .nth(1)
        .and_then(|l| l.trim().strip_prefix("value: "))
        .unwrap_or_else(|| panic!("{name} has no value"));
    value.trim_matches('"').to_owned()
}

#[test]
fn the_kubernetes_cluster_config_passes_check_config() {
    let toml = configmap_toml("deploy/kubernetes-cluster/configmap.yaml");
    let table: toml::Table = toml.parse().unwrap();
    let cluster = table["cluster"].as_table().expect("a [cluster] section");
    assert!(cluster["nats_urls"]
        .as_array()
        .is_some_and(|u| !u.is_empty()));
    // What the StatefulSet gives the first pod: its name as the node id,
    // its stable DNS name under the headless Service as the address.
    let sts = repo_file("deploy/kubernetes-cluster/statefulset.yaml");
    assert!(
        sts.contains("- name: WNSGATE_CLUSTER__NODE_ID\n              valueFrom:\n                fieldRef:\n                  fieldPath: metadata.name\n"),
        "the node id is not the pod's name"
    );
    let advertise = manifest_env(&sts, "WNSGATE_CLUSTER__ADVERTISE_URL")
        .replace("$(WNSGATE_CLUSTER__NODE_ID)", "wnsgate-0")
        .replace("$(POD_NAMESPACE)", "wnsgate");
    assert_eq!(
        advertise,
        "http://wnsgate-0.wnsgate-headless.wnsgate.svc.cluster.local:8080"
    );
    let said = check_config(
        &toml,
        &[
            ("WNSGATE_CLUSTER__NODE_ID", "wnsgate-0"),
            ("WNSGATE_CLUSTER__ADVERTISE_URL", advertise.as_str()),
        ],
    );
    // It says how the node joins the cluster.
    assert!(
        said.contains("cluster mode: NATS ")
            && said.contains(", node wnsgate-0, ")
            && said.contains(&format!("advertised as {advertise}, "))
            && said.contains(", checkpoint_every "),
        "{said}"
    );
    // A wrong address is refused, so the check above checked it.
    let bad = Command::new(env!("CARGO_BIN_EXE_wnsgate"))
        .arg("check-config")
        .env("WNSGATE_CLUSTER__NATS_URLS", r#"["nats://nats:4222"]"#)
        .env("WNSGATE_CLUSTER__ADVERTISE_URL", "wnsgate-0:8080")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("cluster.advertise_url"));
}

/// `kubectl kustomize` of the cluster overlay (kubectl is optional: the
/// check is skipped with a note where it is missing, CI included).
#[test]
fn the_kubernetes_cluster_overlay_renders_three_named_replicas() {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("kubectl"))
            .find(|p| p.is_file())
    });
    let Some(kubectl) = found else {
        eprintln!("NOTE: kubectl is not installed; the overlay was not rendered");
        return;
    };
    let out = Command::new(kubectl)
        .args(["kustomize", "deploy/kubernetes-cluster"])
        .current_dir(ROOT)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<&str> = text.split("\n---\n").collect();
    let find = |kind: &str| {
        docs.iter()
            .find(|d| {
                d.contains(&format!("\nkind: {kind}\n"))
                    || d.starts_with(&format!("kind: {kind}\n"))
            })
            .unwrap_or_else(|| panic!("no {kind} in:\n{text}"))
    };
    let sts = find("StatefulSet");
    assert!(sts.contains("\n  replicas: 3\n"), "{sts}");
    assert!(sts.contains("fieldPath: metadata.name"), "{sts}");
    assert!(sts.contains("serviceName: wnsgate-headless"), "{sts}");
    assert!(!sts.contains("volumeClaimTemplates"), "{sts}");
    assert!(!sts.contains("mountPath: /var/lib/wnsgate"), "{sts}");
    assert!(find("PodDisruptionBudget").contains("maxUnavailable: 1"));
    assert!(find("ConfigMap").contains("[cluster]"));
    assert!(find("Service").contains("name: wnsgate"));
}

#[test]
fn the_example_config_mentions_every_key() {
    let example = repo_file("deploy/wnsgate.example.toml");
    let defaults = toml::Table::try_from(wnsgate::config::Config::default()).unwrap();
    let app = toml::Table::try_from(wnsgate::config::WnsApp::default()).unwrap();
    let mut keys: Vec<String> = Vec::new();
    for (section, table) in &defaults {
        let table = table.as_table().expect("a section");
        keys.extend(
            table
                .keys()
                .filter(|k| format!("{section}.{k}") != "wns.apps")
                .map(|k| format!("{section}.{k}")),
        );
    }
    keys.extend(app.keys().map(|k| format!("wns.apps.{k}")));
    let cluster = toml::Table::try_from(wnsgate::config::ClusterConfig::default()).unwrap();
    keys.extend(cluster.keys().map(|k| format!("cluster.{k}")));
    keys.push("api.tokens_file".into());
    for key in keys {
        let (_, name) = key.rsplit_once('.').unwrap();
        let written = example.lines().any(|l| {
            let l = l.trim_start_matches(['#', ' ']);
            l.strip_prefix(name)
                .is_some_and(|r| r.trim_start().starts_with('='))
        });
        assert!(
            written,
            "deploy/wnsgate.example.toml does not document {key}"
        );
    }
}

/// The image's build stage copies what `cargo build` needs: the Docker
/// daemon is not available to the tests, so this checks the Dockerfile's
/// sources against the manifest's targets.
#[test]
fn the_container_build_copies_every_cargo_target() {
    let dockerfile = repo_file("deploy/Dockerfile");
    let ignored = repo_file(".dockerignore");
    let mut copied: Vec<String> = Vec::new();
    for line in dockerfile.lines().filter(|l| l.starts_with("COPY ")) {
        let words: Vec<&str> = line.split_whitespace().skip(1).collect();
        if words.iter().any(|w| w.starts_with("--from")) {
            continue;
        }
        let sources = &words[..words.len() - 1];
        for s in sources.iter().filter(|s| !s.starts_with("--")) {
            assert!(
                Path::new(ROOT).join(s).exists(),
                "the Dockerfile copies {s}, which is not in the repository"
            );
            assert!(
                !ignored.lines().any(|i| i.trim_end_matches('/') == *s),
                ".dockerignore excludes {s}"
            );
            copied.push(s.to_string());
        }
    }
    let manifest: toml::Table = repo_file("Cargo.toml").parse().unwrap();
    let mut needed = vec!["Cargo.toml".to_owned(), "Cargo.lock".to_owned()];
    for bin in manifest["bin"].as_array().unwrap() {
        needed.push(bin["path"].as_str().unwrap().to_owned());
    }
    for bench in manifest["bench"].as_array().unwrap() {
        needed.push(format!("benches/{}.rs", bench["name"].as_str().unwrap()));
    }
    needed.push("src/bin/wnsgate-load.rs".into());
    for path in needed {
        assert!(
            copied
                .iter()
                .any(|c| path == *c || path.starts_with(&format!("{c}/"))),
            "the Dockerfile's build stage does not copy {path}"
        );
    }
    assert!(dockerfile.contains("HEALTHCHECK") && dockerfile.contains("USER 65532"));
}

/// `deploy/local-cluster.sh --check`: 3 NATS servers and 3 gateways come
/// up on loopback, a registration through one is read through the others,
/// and everything stops.
#[test]
fn the_local_cluster_script_check_passes() {
    if std::env::var_os("WNSGATE_NATS_SERVER").is_none() && tool("nats-server").is_none() {
        return;
    }
    let out = Command::new("bash")
        .args(["deploy/local-cluster.sh", "--check"])
        .current_dir(ROOT)
        .env("WNSGATE_BIN", env!("CARGO_BIN_EXE_wnsgate"))
        .env_remove("WNSGATE_WNS__APPS")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("\ngateway gw-").count(), 3, "{stdout}");
    assert!(stdout.contains("check: registered through"), "{stdout}");
}
