//! The network backends: choosing one (`--io auto|uring|epoll`), falling
//! back when io_uring is unusable, and serving the same bytes over each; on
//! io_uring every byte goes through the AsyncRead/AsyncWrite adapter, so
//! the checks here are byte-exact.

// Measures its own waits and hang guards on the real clock; the rule that
// time is read only through `wnsgate::clock` (clippy.toml) is the gateway's.
#![allow(clippy::disallowed_methods)]

mod common;

use common::{Server, PFN};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use wnsgate::shard::PROBE_HOOK_ENV;

fn metrics(gw: &Server) -> String {
    gw.client().get("/metrics").expect("metrics").text()
}

/// The backends this build can run.
fn backends() -> Vec<&'static str> {
    let mut v = vec!["epoll"];
    if cfg!(feature = "io-uring") {
        v.push("uring");
    }
    v
}

/// The startup log line that names the backend.
fn listening_line(gw: &Server) -> String {
    gw.stderr()
        .lines()
        .find(|l| l.contains("listening; loading the store"))
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn uring_refuses_to_start_when_io_uring_is_unusable() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut child = Command::new(env!("CARGO_BIN_EXE_wnsgate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--io",
            "uring",
            "--data",
        ])
        .arg(&data)
        .env(PROBE_HOOK_ENV, "fail")
        .env_remove("WNSGATE_SERVER__IO")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("--io uring kept running although io_uring is unusable");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "exit status {status}");
    assert!(
        err.contains("--io uring: io_uring cannot be used"),
        "stderr: {err}"
    );
    assert!(
        err.contains("WNSGATE_IO_URING_PROBE=fail"),
        "the reason is given: {err}"
    );
    assert!(
        !data.exists(),
        "nothing is opened before the backend is known"
    );
}

#[test]
fn auto_falls_back_to_epoll_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Server::start(
        &dir.path().join("data"),
        &[("WNSGATE_SERVER__IO", "auto"), (PROBE_HOOK_ENV, "fail")],
    );
    assert_eq!(gw.client().get("/healthz").unwrap().status, 200);
    let m = metrics(&gw);
    assert!(m.contains(r#"io="epoll""#), "{m}");
    let log = gw.stderr();
    assert!(
        log.contains("io_uring is not usable") && log.contains("WNSGATE_IO_URING_PROBE=fail"),
        "the log says why: {log}"
    );
    assert!(listening_line(&gw).contains("epoll"), "{log}");
}

#[test]
fn each_backend_runs_when_asked_and_shows_in_metrics() {
    for io in backends() {
        let dir = tempfile::tempdir().unwrap();
        let gw = Server::start(&dir.path().join("data"), &[("WNSGATE_SERVER__IO", io)]);
        let m = metrics(&gw);
        assert!(
            m.contains(&format!(
                r#"wnsgate_build_info{{version="{}",io="{io}"}} 1"#,
                env!("CARGO_PKG_VERSION")
            )),
            "{io}: {m}"
        );
        assert!(listening_line(&gw).contains(io), "{io}: {}", gw.stderr());
    }
}

/// Test gateways run what `WNSGATE_TEST_IO` asks for, and the default
/// (`auto`) runs epoll, the faster backend in `loadtest/io.sh`.
#[test]
fn test_gateways_run_the_backend_asked_for() {
    let asked = common::test_io().unwrap_or_else(|| "auto".into());
    let expected = if asked == "auto" {
        "epoll"
    } else {
        asked.as_str()
    };
    let dir = tempfile::tempdir().unwrap();
    let gw = Server::start(&dir.path().join("data"), &[]);
    let m = metrics(&gw);
    assert!(m.contains(&format!(r#"io="{expected}""#)), "{asked}: {m}");
}

#[test]
fn wns_connections_ride_the_shard_backend() {
    for io in backends() {
        let (_d, _sim, gw) = common::start_with_sim_env(
            wnsgate::sim::SimConfig::default(),
            &[("WNSGATE_SERVER__IO", io)],
        );
        let mut c = gw.client();
        let r = c
            .send_json(
                "PUT",
                "/v1/devices/d1/channel",
                &serde_json::json!({"pfn": PFN, "channel_uri": common::uri("wake-me")}),
            )
            .unwrap();
        assert_eq!(r.status, 201, "{}", r.text());
        let r = c
            .request("POST", "/v1/devices/d1/push?wait=true", None, b"")
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["result"], "delivered", "{io}: {}", r.text());
        let m = metrics(&gw);
        let opened: Vec<&str> = m
            .lines()
            .filter(|l| l.starts_with("wnsgate_wns_connections_opened_total{"))
            .collect();
        assert!(!opened.is_empty(), "{io}: {m}");
        for line in opened {
            assert!(line.contains(&format!(r#"io="{io}""#)), "{io}: {line}");
        }
    }
}

/// A channel URI whose token has `len` characters drawn from `rng`.
fn random_uri(rng: &mut impl Rng, len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let token: String = (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    common::uri(&token)
}

/// Devices registered by the large upload.
const UPLOAD_DEVICES: usize = 30_000;
/// Keep-alive connections making requests during the upload.
const WORKERS: usize = 24;
/// Register-and-read rounds per connection.
const ROUNDS: usize = 120;

/// A large NDJSON upload while many keep-alive connections register and
/// read devices; then every device is read back, in pages of up to a
/// megabyte, and compared with what was sent: no byte lost or changed in
/// either direction, on every backend.
#[test]
fn many_connections_and_a_large_upload_lose_no_byte() {
    for io in backends() {
        no_byte_lost(io);
    }
}

fn no_byte_lost(io: &str) {
    let dir = tempfile::tempdir().unwrap();
    let gw = Server::start(&dir.path().join("data"), &[("WNSGATE_SERVER__IO", io)]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut expected: BTreeMap<String, String> = BTreeMap::new();
    let mut body = String::new();
    for i in 0..UPLOAD_DEVICES {
        let id = format!("up-{i:06}");
        let len = rng.random_range(8..1800);
        let uri = random_uri(&mut rng, len);
        body.push_str(
            &serde_json::json!({"device_id": id, "pfn": PFN, "channel_uri": uri}).to_string(),
        );
        body.push('\n');
        expected.insert(id, uri);
    }
    assert!(body.len() > 20_000_000, "the upload is large");

    let worker_results: Vec<BTreeMap<String, String>> = std::thread::scope(|s| {
        let upload = s.spawn(|| {
            gw.client()
                .with_timeout(Duration::from_secs(300))
                .request(
                    "POST",
                    "/v1/devices:import",
                    Some("application/x-ndjson"),
                    body.as_bytes(),
                )
                .expect("import")
        });
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let gw = &gw;
                s.spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(100 + w as u64);
                    let mut c = gw.client().with_timeout(Duration::from_secs(120));
                    let mut mine = BTreeMap::new();
                    for round in 0..ROUNDS {
                        let id = format!("w{w:02}-{round:04}");
                        let len = rng.random_range(1..1900);
                        let uri = random_uri(&mut rng, len);
                        // A write the store cannot take now (the import
                        // beside it fills the group commit) is refused with
                        // 503 store_overloaded and sent again, as a client
                        // does; nothing of it was applied.
                        let mut refused = 0;
                        let r = loop {
                            let r = c
                                .send_json(
                                    "PUT",
                                    &format!("/v1/devices/{id}/channel"),
                                    &serde_json::json!({"pfn": PFN, "channel_uri": uri}),
                                )
                                .expect("put");
                            if r.status != 503 {
                                break r;
                            }
                            assert_eq!(
                                r.json()["error"]["code"],
                                "store_overloaded",
                                "{io} {id}: {}",
                                r.text()
                            );
                            refused += 1;
                            assert!(refused < 1000, "{io} {id}: refused {refused} times");
                            std::thread::sleep(Duration::from_millis(10));
                        };
                        assert_eq!(r.status, 201, "{io} {id}: {}", r.text());
                        assert_eq!(r.json()["channel_uri"], uri.as_str(), "{io} {id}");
                        let got = c.get(&format!("/v1/devices/{id}")).expect("get");
                        assert_eq!(got.status, 200, "{io} {id}");
                        assert_eq!(got.json()["channel_uri"], uri.as_str(), "{io} {id}");
                        mine.insert(id, uri);
                    }
                    mine
                })
            })
            .collect();
        let report = upload.join().expect("upload thread");
        assert_eq!(report.status, 200, "{io}: {}", report.text());
        let rep = report.json();
        assert_eq!(rep["accepted"], UPLOAD_DEVICES as u64, "{io}: {rep}");
        assert_eq!(rep["rejected"], 0, "{io}: {rep}");
        workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .collect()
    });
    for mine in worker_results {
        expected.extend(mine);
    }

    // Read everything back in the largest pages.
    let mut c = gw.client().with_timeout(Duration::from_secs(120));
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut path = "/v1/devices?limit=1000".to_owned();
    let mut largest_page = 0;
    loop {
        let r = c.get(&path).expect("page");
        assert_eq!(r.status, 200, "{io}: {}", r.text());
        largest_page = largest_page.max(r.body.len());
        let page = r.json();
        for d in page["devices"].as_array().expect("devices") {
            seen.insert(
                d["device_id"].as_str().unwrap().to_owned(),
                d["channel_uri"].as_str().unwrap().to_owned(),
            );
        }
        match page["next_cursor"].as_str() {
            Some(cur) => path = format!("/v1/devices?limit=1000&cursor={cur}"),
            None => break,
        }
    }
    assert!(
        largest_page > 256 * 1024,
        "pages span many writes: {largest_page}"
    );
    assert_eq!(seen.len(), expected.len(), "{io}: device count");
    let differing = expected
        .iter()
        .filter(|(id, uri)| seen.get(*id) != Some(*uri))
        .count();
    assert_eq!(differing, 0, "{io}: devices whose URI came back different");
}
