//! The process lifecycle an operator sees: signals drain wake-ups in flight
//! and flush their verdicts, a second signal exits at once, start-up
//! problems are named on stderr with a non-zero exit, and logs never carry
//! secrets or whole channel tokens.

// Measures its own waits and hang guards on the real clock; the rule that
// time is read only through `wnsgate::clock` (clippy.toml) is the gateway's.
#![allow(clippy::disallowed_methods)]

mod common;

use common::{channel_body, uri, Server, PFN};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use wnsgate::sim::{self, Faults, SimConfig};

fn send_signal(pid: u32, sig: i32) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{sig} {pid}");
}

/// Waits for the process to exit (a hang guard, not a timing assertion).
fn wait_exit(gw: &mut Server) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(st) = gw.child.try_wait().expect("wait") {
            return st;
        }
        assert!(Instant::now() < deadline, "gateway did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for_log(gw: &Server, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !gw.stderr().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log: {}",
            gw.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn slow_sim(ms: u64) -> Faults {
    Faults {
        latency_ms: Some(sim::LatencyRange {
            min_ms: ms,
            max_ms: ms,
        }),
        ..Faults::default()
    }
}

/// A wake accepted (202) just before the signal is still sent, its 410
/// verdict is stored, and the process exits 0.
fn signal_drains_wakes_in_flight(sig: i32) {
    let (_dir, s, mut gw) = common::start_with_sim(SimConfig::default());
    let mut c = gw.client();
    let r = c
        .send_json(
            "PUT",
            "/v1/devices/dying/channel",
            &channel_body(&uri("x410dying")),
        )
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    s.set_faults(slow_sim(1500)).unwrap();
    let r = c
        .request("POST", "/v1/devices/dying/push", None, b"")
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.text());

    send_signal(gw.child.id(), sig);
    let status = wait_exit(&mut gw);
    assert!(
        status.success(),
        "exit after signal {sig}: {status:?}\n{}",
        gw.stderr()
    );
    assert_eq!(
        s.stats().by_outcome.get("expired").copied(),
        Some(1),
        "the wake in flight was not sent to the end"
    );

    let data = gw.data.clone();
    drop(gw);
    let gw = Server::start(&data, &[]);
    let d = gw.client().get("/v1/devices/dying").unwrap().json();
    assert_eq!(d["state"], "refresh_pending", "{d}");
    assert_eq!(d["refresh_job"]["reason"], "wns410", "{d}");
    assert_eq!(d["state_reason"], "wns410", "{d}");
}

#[test]
fn sigterm_drains_wakes_in_flight_and_flushes_their_verdicts() {
    signal_drains_wakes_in_flight(15);
}

#[test]
fn sigint_drains_wakes_in_flight_and_flushes_their_verdicts() {
    signal_drains_wakes_in_flight(2);
}

#[test]
fn a_second_signal_exits_at_once() {
    let (_dir, s, mut gw) = common::start_with_sim(SimConfig::default());
    let mut c = gw.client();
    let r = c
        .send_json(
            "PUT",
            "/v1/devices/slow/channel",
            &channel_body(&uri("AwYAAADslow")),
        )
        .unwrap();
    assert_eq!(r.status, 201);
    // The wake stays in flight far longer than the test runs.
    s.set_faults(slow_sim(60_000)).unwrap();
    let r = c
        .request("POST", "/v1/devices/slow/push", None, b"")
        .unwrap();
    assert_eq!(r.status, 202);

    send_signal(gw.child.id(), 15);
    wait_for_log(&gw, "waiting for wake-ups in flight");
    send_signal(gw.child.id(), 15);
    let status = wait_exit(&mut gw);
    assert_eq!(status.code(), Some(130), "{}", gw.stderr());
    assert!(gw.stderr().contains("second signal"), "{}", gw.stderr());
}

#[test]
fn a_caller_waiting_for_a_wake_gets_its_result_during_shutdown() {
    let (_dir, s, mut gw) = common::start_with_sim(SimConfig::default());
    let mut c = gw.client();
    let r = c
        .send_json(
            "PUT",
            "/v1/devices/waiter/channel",
            &channel_body(&uri("AwYAAADwaiter")),
        )
        .unwrap();
    assert_eq!(r.status, 201);
    // A first wake fetches the access token, so the second is the only
    // request in flight.
    let r = c
        .request("POST", "/v1/devices/waiter/push?wait=true", None, b"")
        .unwrap();
    assert_eq!(r.json()["result"], "delivered", "{}", r.text());
    s.set_faults(slow_sim(1500)).unwrap();
    let mut waiting = gw.client();
    let caller = std::thread::spawn(move || {
        waiting
            .request("POST", "/v1/devices/waiter/push?wait=true", None, b"")
            .unwrap()
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = c.get("/metrics").unwrap().text();
        if m.lines().any(|l| l == "wnsgate_wns_inflight_pushes 1") {
            break;
        }
        assert!(Instant::now() < deadline, "the wake never started: {m}");
        std::thread::sleep(Duration::from_millis(10));
    }
    send_signal(gw.child.id(), 15);
    let r = caller.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["result"], "delivered", "{}", r.text());
    assert!(wait_exit(&mut gw).success(), "{}", gw.stderr());
}

/// The value of an unlabelled metric in a `/metrics` scrape, 0 if absent.
fn metric(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Shutdown while a bulk wake runs, nudges are on and a caller waits for a
/// wake, none of which would end soon (WNS answers every one
/// `channelthrottled`, and a throttled channel is retried after a minute):
/// each shutdown step keeps to its budget, so the process exits 0 within
/// the shutdown limit, where the watchdog would exit 1. The wakes waiting
/// for their retry stop waiting within the drain's budget and end with
/// WNS's last answer, which the waiting caller gets.
#[test]
fn shutdown_during_a_bulk_wake_with_nudges_on_exits_zero() {
    let env = [
        ("WNSGATE_REFRESH__SWEEP_INTERVAL", "1s"),
        ("WNSGATE_LIFECYCLE__NUDGE_RENEWAL_DUE", "true"),
        ("WNSGATE_LIFECYCLE__NUDGE_PER_SECOND", "1000"),
    ];
    let (_dir, _sim, mut gw) = common::start_with_sim_env(SimConfig::default(), &env);
    let mut c = gw.client();
    let put = |c: &mut wnsgate::client::Client, id: &str, body: serde_json::Value| {
        let r = c
            .send_json("PUT", &format!("/v1/devices/{id}/channel"), &body)
            .unwrap();
        assert_eq!(r.status, 201, "{}", r.text());
    };
    // A first wake fetches the access token.
    put(&mut c, "warm", channel_body(&uri("AwYAAADwarm")));
    let r = c
        .request("POST", "/v1/devices/warm/push?wait=true", None, b"")
        .unwrap();
    assert_eq!(r.json()["result"], "delivered", "{}", r.text());
    put(&mut c, "waiter", channel_body(&uri("xthrottle-waiter")));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // 15.5 days old: renewal_due, so the sweep offers them a nudge.
    let aged = wnsgate::core::UnixTime((now - 31 * 43_200) as u32).to_rfc3339();
    for i in 0..5 {
        let mut body = channel_body(&uri(&format!("xthrottle-nudge{i}")));
        body["issued_at"] = serde_json::json!(aged);
        put(&mut c, &format!("nudge-{i}"), body);
    }
    let mut waiting = gw.client();
    let caller = std::thread::spawn(move || {
        waiting
            .request("POST", "/v1/devices/waiter/push?wait=true", None, b"")
            .map(|r| (r.status, r.text()))
    });
    let bulk = (0..200).map(|i| (format!("bulk-{i}"), format!("xthrottle-bulk{i}")));
    assert_eq!(
        common::import_tokens(&gw, "db5.notify.windows.com", bulk),
        200
    );
    let r = c
        .send_json("POST", "/v1/pushes", &serde_json::json!({"all": true}))
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = c.get("/metrics").unwrap().text();
        let nudged = metric(&m, "wnsgate_lifecycle_nudges_total");
        let inflight = metric(&m, "wnsgate_wns_inflight_pushes");
        if nudged >= 1.0 && inflight >= 200.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nudges {nudged}, wakes in flight {inflight}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    send_signal(gw.child.id(), 15);
    let status = wait_exit(&mut gw);
    assert_eq!(status.code(), Some(0), "{}", gw.stderr());
    let log = gw.stderr();
    assert!(log.contains("waiting for wake-ups in flight"), "{log}");
    assert!(
        !log.contains("still in flight after the drain budget"),
        "{log}"
    );
    let (status, answer) = caller.join().unwrap().expect("the caller's answer");
    assert_eq!(status, 200, "{answer}");
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["wns_outcome"], "channel_throttled", "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("shutting down")),
        "{answer}"
    );
}

/// `wnsgate import` against a gateway that wants a token: without one, or
/// with a wrong one, the gateway's 401 is shown (not a broken pipe, however
/// large the file); lines the gateway rejects make the exit status 1 with
/// a count, unless `--warn-only`.
#[test]
fn import_shows_a_refusal_and_fails_on_rejected_lines() {
    let token = "import-test-token-0123456789abcdef";
    let dir = tempfile::tempdir().unwrap();
    let gw = Server::start(
        &dir.path().join("data"),
        &[("WNSGATE_API__TOKENS", &format!("[\"{token}\"]"))],
    );
    // Large enough that sending it all before reading would fill the
    // socket buffers.
    let big = dir.path().join("big.ndjson");
    let mut lines = String::new();
    for i in 0..40_000 {
        let line = serde_json::json!({"device_id": format!("big-{i}"), "pfn": PFN, "channel_uri": uri(&format!("AwYAAADbig{i}"))});
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    std::fs::write(&big, lines).unwrap();
    let url = gw.url();
    let import = |file: &Path, extra: &[&str]| {
        let mut args = vec!["import", file.to_str().unwrap(), "--url", url.as_str()];
        args.extend_from_slice(extra);
        wnsgate(&args, &[])
            .env_remove("WNSGATE_TOKEN")
            .output()
            .expect("run wnsgate import")
    };
    for extra in [&[][..], &["--token", "wrong"][..]] {
        let out = import(&big, extra);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?}: {stderr}");
        assert!(stderr.contains("401"), "{extra:?}: {stderr}");
        assert!(stderr.contains("unauthorized"), "{extra:?}: {stderr}");
        assert!(!stderr.contains("Broken pipe"), "{extra:?}: {stderr}");
    }
    let mixed = dir.path().join("mixed.ndjson");
    std::fs::write(
        &mixed,
        format!(
            "{}\n{}\n{}\n",
            serde_json::json!({"device_id": "good-1", "pfn": PFN, "channel_uri": uri("AwYAAADg1")}),
            serde_json::json!({"device_id": "bad", "pfn": "not a pfn", "channel_uri": uri("AwYAAADb")}),
            serde_json::json!({"device_id": "good-2", "pfn": PFN, "channel_uri": uri("AwYAAADg2")}),
        ),
    )
    .unwrap();
    let out = import(&mixed, &["--token", token]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("imported 2 devices, rejected 1 lines"),
        "{stdout}"
    );
    assert!(stdout.contains("line 2"), "{stdout}");
    assert!(stderr.contains("rejected 1 line"), "{stderr}");
    let out = import(&mixed, &["--token", token, "--warn-only"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = import(&big, &["--token", token]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("imported 40000 devices"));
}

// ---- start-up problems ------------------------------------------------

fn wnsgate(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wnsgate"));
    cmd.args(args).env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn serve(data: &Path, env: &[(&str, &str)]) -> Output {
    let data = data.display().to_string();
    wnsgate(&["serve", "--listen", "127.0.0.1:0", "--data", &data], env)
        .output()
        .expect("run wnsgate serve")
}

fn check_config(env: &[(&str, &str)]) -> Output {
    wnsgate(&["check-config"], env)
        .output()
        .expect("run wnsgate check-config")
}

/// The run failed and its stderr names every one of `needles`.
fn assert_refused(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected a refusal naming {needles:?}, got success: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "stderr does not name {n:?}: {err}");
    }
}

fn app_with(field: &str, value: &str) -> String {
    format!("[{{pfn = \"{PFN}\", package_sid = \"ms-app://S-1-15-2-7\", {field} = \"{value}\"}}]")
}

fn euid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("effective uid")
}

/// `wnsgate args`, run as an unprivileged user when the tests run as root
/// (root reads and writes through any permission bits). Its supplementary
/// groups stay, so the files below give their group no more than others.
/// Where that user cannot reach the built binary (a checkout under a
/// private home directory), a copy in `dir` runs instead.
fn unprivileged(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    use std::os::unix::process::CommandExt;
    if euid() != 0 {
        return wnsgate(args, env);
    }
    let mut bin = PathBuf::from(env!("CARGO_BIN_EXE_wnsgate"));
    let reachable = Command::new(&bin)
        .arg("version")
        .uid(65534)
        .gid(65534)
        .output()
        .is_ok_and(|o| o.status.success());
    if !reachable {
        use std::os::unix::fs::PermissionsExt;
        let copy = dir.join("wnsgate-copy");
        if !copy.exists() {
            std::fs::copy(&bin, &copy).unwrap();
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        bin = copy;
    }
    let mut cmd = Command::new(bin);
    cmd.args(args).env_remove("RUST_LOG").uid(65534).gid(65534);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// A directory the unprivileged user can enter but not write.
fn readable_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[test]
fn a_bad_config_names_the_key_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[store]\ncache_mb = \"lots\"\n").unwrap();
    let out = wnsgate(&["serve", "--config", file.to_str().unwrap()], &[])
        .output()
        .unwrap();
    assert_refused(&out, &["cache_mb", "bad.toml"]);

    std::fs::write(&file, "[lifecycle]\nexpire_after = \"10d\"\n").unwrap();
    let out = wnsgate(&["serve", "--config", file.to_str().unwrap()], &[])
        .output()
        .unwrap();
    assert_refused(
        &out,
        &["lifecycle.expire_after", "lifecycle.renewal_due_after"],
    );

    let out = serve(
        &dir.path().join("data"),
        &[("WNSGATE_SERVER__IO", "fastest")],
    );
    assert_refused(&out, &["WNSGATE_SERVER__IO", "fastest"]);
}

#[test]
fn an_unwritable_data_directory_is_named() {
    use std::os::unix::fs::PermissionsExt;
    let dir = readable_tempdir();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o555)).unwrap();
    let data_s = data.display().to_string();
    let args = ["serve", "--listen", "127.0.0.1:0", "--data", &data_s];
    let out = unprivileged(dir.path(), &args, &[]).output().unwrap();
    assert_refused(&out, &[&data_s, "not writable"]);

    // A data directory that cannot be created.
    let below = data.join("below");
    let below_s = below.display().to_string();
    let args = ["serve", "--listen", "127.0.0.1:0", "--data", &below_s];
    let out = unprivileged(dir.path(), &args, &[]).output().unwrap();
    assert_refused(&out, &[&below_s, "cannot create the data directory"]);

    // check-config sees the same problem without starting.
    let out = unprivileged(
        dir.path(),
        &["check-config"],
        &[("WNSGATE_STORE__PATH", &data_s)],
    )
    .output()
    .unwrap();
    assert_refused(&out, &["store.path", &data_s, "not writable"]);
}

#[test]
fn a_port_in_use_is_named() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data").display().to_string();
    let out = wnsgate(&["serve", "--listen", &addr, "--data", &data], &[])
        .output()
        .unwrap();
    assert_refused(&out, &[&addr, "in use"]);
}

/// A port in use is refused before the data directory is created: a
/// failed start leaves nothing behind.
#[test]
fn a_port_in_use_creates_no_data_directory() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = wnsgate(
        &["serve", "--listen", &addr, "--data", data.to_str().unwrap()],
        &[],
    )
    .output()
    .unwrap();
    assert_refused(&out, &[&addr, "in use"]);
    assert!(!data.exists(), "{} was created", data.display());
}

#[test]
fn a_missing_or_unusable_ca_file_is_named_by_serve_and_check_config() {
    let dir = readable_tempdir();
    let data = dir.path().join("data");

    let missing = dir.path().join("missing-ca.pem");
    let missing_s = missing.display().to_string();
    let env = [("WNSGATE_WNS__CA_FILE", missing_s.as_str())];
    assert_refused(&serve(&data, &env), &["wns.ca_file", &missing_s]);
    assert_refused(&check_config(&env), &["wns.ca_file", &missing_s]);

    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let garbage_s = garbage.display().to_string();
    let env = [("WNSGATE_WNS__CA_FILE", garbage_s.as_str())];
    assert_refused(&serve(&data, &env), &["wns.ca_file", &garbage_s]);
    assert_refused(&check_config(&env), &["wns.ca_file", &garbage_s]);

    // Present but unreadable by the gateway's user.
    use std::os::unix::fs::PermissionsExt;
    let locked = dir.path().join("locked.pem");
    std::fs::write(&locked, "-----BEGIN CERTIFICATE-----\n").unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
    let locked_s = locked.display().to_string();
    let out = unprivileged(
        dir.path(),
        &["check-config"],
        &[("WNSGATE_WNS__CA_FILE", &locked_s)],
    )
    .output()
    .unwrap();
    assert_refused(
        &out,
        &["wns.ca_file", &locked_s, "cannot read", "ermission denied"],
    );
}

#[test]
fn a_missing_empty_or_unreadable_secret_file_is_named() {
    let dir = readable_tempdir();
    let data = dir.path().join("data");

    let missing = dir.path().join("no-secret");
    let apps = app_with("client_secret_file", &missing.display().to_string());
    let env = [("WNSGATE_WNS__APPS", apps.as_str())];
    let want = ["wns.apps[0].client_secret_file", "no-secret"];
    assert_refused(&serve(&data, &env), &want);
    assert_refused(&check_config(&env), &want);

    let empty = dir.path().join("empty-secret");
    std::fs::write(&empty, "\n").unwrap();
    let apps = app_with("client_secret_file", &empty.display().to_string());
    let env = [("WNSGATE_WNS__APPS", apps.as_str())];
    let want = ["wns.apps[0].client_secret_file", "empty-secret", "empty"];
    assert_refused(&serve(&data, &env), &want);
    assert_refused(&check_config(&env), &want);

    use std::os::unix::fs::PermissionsExt;
    let locked = dir.path().join("locked-secret");
    std::fs::write(&locked, "s3cr3t-value\n").unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o600)).unwrap();
    let apps = app_with("client_secret_file", &locked.display().to_string());
    let out = unprivileged(
        dir.path(),
        &["check-config"],
        &[("WNSGATE_WNS__APPS", &apps)],
    )
    .output()
    .unwrap();
    assert_refused(
        &out,
        &["wns.apps[0].client_secret_file", "ermission denied"],
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("s3cr3t-value"));

    let apps = app_with("client_secret_env", "WNSGATE_TEST_UNSET_SECRET");
    assert_refused(
        &check_config(&[("WNSGATE_WNS__APPS", &apps)]),
        &["wns.apps[0].client_secret_env", "WNSGATE_TEST_UNSET_SECRET"],
    );
}

// ---- logs ------------------------------------------------------------------

#[test]
fn debug_logs_never_show_secrets_or_channel_tokens() {
    const CLIENT_SECRET: &str = "client-secret-4f1c9e";
    const API_TOKEN: &str = "api-token-0123456789abcdef";
    const CHANNEL_TOKEN: &str = "AwYAAADk3yChannelTokenNeverLogged";
    let s = sim::start(SimConfig::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let apps = app_with("client_secret", CLIENT_SECRET);
    let tokens = format!("[\"{API_TOKEN}\"]");
    let (token_url, connect_to, ca) = (
        s.token_url(),
        s.addr.to_string(),
        s.ca_pem_path.display().to_string(),
    );
    let gw = Server::start(
        &dir.path().join("data"),
        &[
            ("WNSGATE_WNS__TOKEN_URL", token_url.as_str()),
            ("WNSGATE_WNS__CONNECT_TO", connect_to.as_str()),
            ("WNSGATE_WNS__CA_FILE", ca.as_str()),
            ("WNSGATE_WNS__APPS", apps.as_str()),
            ("WNSGATE_API__TOKENS", tokens.as_str()),
            ("WNSGATE_LOG__LEVEL", "debug"),
        ],
    );
    let mut c = gw.client().with_token(Some(API_TOKEN.into()));
    let r = c
        .send_json(
            "PUT",
            "/v1/devices/quiet/channel",
            &channel_body(&uri(CHANNEL_TOKEN)),
        )
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let r = c
        .request("POST", "/v1/devices/quiet/push?wait=true", None, b"")
        .unwrap();
    assert_eq!(r.json()["result"], "delivered", "{}", r.text());
    // A refused registration and a bad token go through the error paths.
    let bad = channel_body(&format!("http://evil.example/?token={CHANNEL_TOKEN}"));
    let r = c
        .send_json("PUT", "/v1/devices/quiet2/channel", &bad)
        .unwrap();
    assert_eq!(r.status, 422);
    let r = gw
        .client()
        .with_token(Some(format!("{API_TOKEN}x")))
        .get("/v1/devices/quiet")
        .unwrap();
    assert_eq!(r.status, 401);
    let data = gw.data.clone();
    let status = gw.terminate();
    assert!(status.success());

    let log = std::fs::read_to_string(data.with_extension("stderr.log")).unwrap();
    assert!(
        log.contains("DEBUG"),
        "debug logging was not on, the check proves nothing: {log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a non-terminal log"
    );
    for (what, secret) in [
        ("the WNS client secret", CLIENT_SECRET),
        ("the API token", API_TOKEN),
        ("a channel token", CHANNEL_TOKEN),
    ] {
        assert!(!log.contains(secret), "{what} is in the log:\n{log}");
    }
    assert!(
        !log.contains("Bearer "),
        "an Authorization value is in the log:\n{log}"
    );
}

// ---- health -------------------------------------------------------------

#[test]
fn health_exits_zero_only_when_the_gateway_is_ready() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Server::start(&dir.path().join("data"), &[]);
    let url = gw.url();
    let out = wnsgate(&["health", "--url", &url], &[]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // From the configuration: a wildcard api.listen is probed on loopback.
    let port = gw.addr.rsplit_once(':').unwrap().1.to_owned();
    let listen = format!("0.0.0.0:{port}");
    let out = wnsgate(&["health"], &[("WNSGATE_API__LISTEN", &listen)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(gw);
    let out = wnsgate(&["health", "--url", &url], &[]).output().unwrap();
    assert_refused(&out, &[&url, "no answer"]);
}

#[test]
fn serve_flags_select_json_logs_and_the_backend() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data").display().to_string();
    let err_path = dir.path().join("stderr.log");
    let mut child = wnsgate(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data",
            &data,
            "--log-format",
            "json",
            "--io",
            "epoll",
        ],
        &[],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::fs::File::create(&err_path).unwrap())
    .spawn()
    .unwrap();
    let first = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .next()
        .and_then(Result::ok)
        .unwrap_or_default();
    let log = || std::fs::read_to_string(&err_path).unwrap_or_default();
    assert!(
        first.starts_with("listening on http://"),
        "{first:?}: {}",
        log()
    );
    send_signal(child.id(), 15);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}: {}", log());
    let log = log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "{log}");
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"message\":\"ready\"") || l.contains("\"message\": \"ready\"")),
        "{log}"
    );
    assert!(log.contains("\"io\":\"epoll\""), "{log}");
}

/// `check-config --probe-wns` fetches a token for each app: a wrong secret
/// fails there, naming the app and the endpoint's answer, not at the first
/// wake.
#[test]
fn check_config_probe_wns_fetches_a_token_for_each_app() {
    let s = sim::start(SimConfig {
        apps: vec!["ms-app://S-1-15-2-7=right-secret".parse().unwrap()],
        ..SimConfig::default()
    })
    .expect("start the simulator");
    let (token_url, ca) = (s.token_url(), s.ca_pem_path.display().to_string());
    let probe = |secret: &str| {
        let apps = app_with("client_secret", secret);
        wnsgate(
            &["check-config", "--probe-wns"],
            &[
                ("WNSGATE_WNS__TOKEN_URL", token_url.as_str()),
                ("WNSGATE_WNS__CA_FILE", ca.as_str()),
                ("WNSGATE_WNS__APPS", apps.as_str()),
            ],
        )
        .output()
        .expect("run wnsgate check-config --probe-wns")
    };
    let ok = probe("right-secret");
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(out.contains(&format!("wns app {PFN}: token OK")), "{out}");

    let wrong = probe("wrong-secret");
    let out = String::from_utf8_lossy(&wrong.stdout);
    assert!(!wrong.status.success(), "a wrong secret passed: {out}");
    assert!(out.contains(&format!("wns app {PFN}: no token")), "{out}");
    assert!(out.contains("invalid_client"), "{out}");
    assert!(
        !out.contains("wrong-secret"),
        "the secret was printed: {out}"
    );
    assert_refused(&wrong, &["1 WNS app(s) got no token"]);

    // Without the flag no token is asked for: the wrong secret passes.
    let plain = check_config(&[
        ("WNSGATE_WNS__TOKEN_URL", token_url.as_str()),
        ("WNSGATE_WNS__CA_FILE", ca.as_str()),
        (
            "WNSGATE_WNS__APPS",
            app_with("client_secret", "wrong-secret").as_str(),
        ),
    ]);
    assert!(plain.status.success());
    // No app: nothing to probe is an error, not a pass.
    let none = wnsgate(&["check-config", "--probe-wns"], &[])
        .output()
        .unwrap();
    assert_refused(&none, &["no [[wns.apps]]"]);
}
