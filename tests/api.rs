//! The HTTP API end to end: a real `wnsgate serve` process, real sockets,
//! a real data directory.

// Measures its own waits and hang guards on the real clock; the rule that
// time is read only through `wnsgate::clock` (clippy.toml) is the gateway's.
#![allow(clippy::disallowed_methods)]

mod common;

use common::{channel_body, uri, Server, PFN};
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn start() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    // No expiry sweep during a test: these tests look at devices that are
    // `expired` by age, before any refresh job (tests/refresh.rs covers
    // the sweep).
    let server = Server::start(
        &dir.path().join("data"),
        &[("WNSGATE_REFRESH__SWEEP_INTERVAL", "1d")],
    );
    (dir, server)
}

fn days_ago(d: i64) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        - d * 86_400;
    wnsgate::core::UnixTime(t as u32).to_rfc3339()
}

#[test]
fn health_readiness_and_metrics() {
    let (_d, s) = start();
    let mut c = s.client();
    assert_eq!(c.get("/healthz").unwrap().status, 200);
    assert_eq!(c.get("/readyz").unwrap().json()["status"], "ready");
    c.send_json("PUT", "/v1/devices/m1/channel", &channel_body(&uri("m1")))
        .unwrap();
    let m = c.get("/metrics").unwrap();
    assert_eq!(m.status, 200);
    let text = m.text();
    for name in [
        "wnsgate_api_requests_total",
        "wnsgate_api_request_duration_seconds_bucket",
        "wnsgate_devices{state=\"active\"} 1",
        "wnsgate_store_sync_seconds_bucket",
        "wnsgate_store_batch_mutations_bucket",
        "wnsgate_build_info",
    ] {
        assert!(text.contains(name), "metrics lack {name}:\n{text}");
    }
    assert!(
        !text.contains("token=m1"),
        "a channel URI leaked into metrics"
    );
}

#[test]
fn register_read_update_list_delete() {
    let (_d, s) = start();
    let mut c = s.client();
    let u1 = uri("AwYAAAD%2bfirst%3d");
    let r = c
        .send_json(
            "PUT",
            "/v1/devices/dev-1/channel",
            &json!({"pfn": PFN, "channel_uri": u1, "provider_id": "Contoso-MDM", "issued_at": "2026-01-01T00:00:00.500Z"}),
        )
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let rec = r.json();
    assert_eq!(rec["channel_uri"], u1.as_str());
    assert_eq!(rec["issued_at"], "2026-01-01T00:00:00Z");
    assert_eq!(rec["renewal_due_at"], "2026-01-16T00:00:00Z");
    assert_eq!(rec["expires_at"], "2026-01-31T00:00:00Z");
    assert_eq!(rec["provider_id"], "Contoso-MDM");

    let got = c.get("/v1/devices/dev-1").unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(
        got.json()["channel_uri"],
        u1.as_str(),
        "URI must come back byte-exact"
    );

    // A new URI: fresh life, active.
    let u2 = uri("second");
    let r = c
        .send_json("PUT", "/v1/devices/dev-1/channel", &channel_body(&u2))
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["state"], "active");
    assert_eq!(r.json()["channel_uri"], u2.as_str());

    // States by age.
    for (id, age, state) in [
        ("old", 40, "expired"),
        ("mid", 20, "renewal_due"),
        ("new", 1, "active"),
    ] {
        let r = c
            .send_json(
                "PUT",
                &format!("/v1/devices/{id}/channel"),
                &json!({"pfn": PFN, "channel_uri": uri(id), "issued_at": days_ago(age)}),
            )
            .unwrap();
        assert_eq!(r.status, 201);
        assert_eq!(r.json()["state"], state, "{id}");
        if state != "active" {
            assert_eq!(r.json()["state_reason"], "age");
        }
    }
    let stats = c.get("/v1/stats").unwrap().json();
    assert_eq!(stats["devices"], 4);
    assert_eq!(stats["by_state"]["active"], 2);
    assert_eq!(stats["by_state"]["renewal_due"], 1);
    assert_eq!(stats["by_state"]["expired"], 1);

    // Listing: filter and paging.
    let expired = c.get("/v1/devices?state=expired").unwrap().json();
    let ids: Vec<_> = expired["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].clone())
        .collect();
    assert_eq!(ids, vec![json!("old")]);
    let mut seen = Vec::new();
    let mut path = "/v1/devices?limit=1".to_owned();
    loop {
        let page = c.get(&path).unwrap().json();
        for d in page["devices"].as_array().unwrap() {
            seen.push(d["device_id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(cur) => path = format!("/v1/devices?limit=1&cursor={cur}"),
            None => break,
        }
    }
    // Listing order is the partition, then the id within it: each device
    // once.
    seen.sort();
    assert_eq!(seen, vec!["dev-1", "mid", "new", "old"]);

    assert_eq!(
        c.request("DELETE", "/v1/devices/mid", None, b"")
            .unwrap()
            .status,
        204
    );
    assert_eq!(c.get("/v1/devices/mid").unwrap().status, 404);
    let again = c.request("DELETE", "/v1/devices/mid", None, b"").unwrap();
    assert_eq!(again.status, 404);
    assert_eq!(again.json()["error"]["code"], "unknown_device");
    assert_eq!(c.get("/v1/stats").unwrap().json()["devices"], 3);
}

#[test]
fn percent_encoded_guid_ids() {
    let (_d, s) = start();
    let mut c = s.client();
    let r = c
        .send_json(
            "PUT",
            "/v1/devices/%7B6F1C2A9E-3B1D-4C55-9A0E-2F6F0D7B8C11%7D/channel",
            &channel_body(&uri("g")),
        )
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        r.json()["device_id"],
        "{6F1C2A9E-3B1D-4C55-9A0E-2F6F0D7B8C11}"
    );
    assert_eq!(
        c.get("/v1/devices/%7B6F1C2A9E-3B1D-4C55-9A0E-2F6F0D7B8C11%7D")
            .unwrap()
            .status,
        200
    );
}

/// Sends `body` raw and returns (status, error code).
fn put_raw(
    c: &mut wnsgate::client::Client,
    id: &str,
    ct: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    let r = c
        .request("PUT", &format!("/v1/devices/{id}/channel"), ct, body)
        .unwrap();
    let code = r.json()["error"]["code"].as_str().unwrap_or("").to_owned();
    if r.status >= 400 {
        assert!(
            !r.json()["error"]["message"]
                .as_str()
                .unwrap_or("")
                .is_empty(),
            "error without a message"
        );
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
    (r.status, code)
}

#[test]
fn bad_input_gets_a_clear_4xx_and_changes_nothing() {
    let (_d, s) = start();
    let mut c = s.client();
    let json_ct = Some("application/json");
    let good = uri("good");
    let long_id = "x".repeat(129);
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("d1", b"not json".to_vec(), 400, "invalid_json"),
        (
            "d1",
            br#"{"pfn": "Contoso.MDM_8wekyb3d8bbwe", "channel_uri": "#.to_vec(),
            400,
            "invalid_json",
        ),
        (
            "d1",
            br#"{"pfn": "Contoso.MDM_8wekyb3d8bbwe"}"#.to_vec(),
            422,
            "invalid_request",
        ),
        (
            "d1",
            json!({"pfn": PFN, "channel_uri": good, "chanel": 1})
                .to_string()
                .into_bytes(),
            422,
            "invalid_request",
        ),
        (
            "d1",
            json!({"pfn": 5, "channel_uri": good})
                .to_string()
                .into_bytes(),
            422,
            "invalid_request",
        ),
        (
            "d1",
            json!({"pfn": "nope", "channel_uri": good})
                .to_string()
                .into_bytes(),
            422,
            "invalid_pfn",
        ),
        (
            "d1",
            json!({"pfn": PFN, "channel_uri": "http://db5.notify.windows.com/?token=a"})
                .to_string()
                .into_bytes(),
            422,
            "invalid_channel_uri",
        ),
        (
            "d1",
            json!({"pfn": PFN, "channel_uri": "https://evil.example/"})
                .to_string()
                .into_bytes(),
            422,
            "invalid_channel_uri",
        ),
        (
            "d1",
            json!({"pfn": PFN, "channel_uri": "https://notify.windows.com.evil.example/"})
                .to_string()
                .into_bytes(),
            422,
            "invalid_channel_uri",
        ),
        (
            "d1",
            json!({"pfn": PFN, "channel_uri": "https://u:p@db5.notify.windows.com/"})
                .to_string()
                .into_bytes(),
            422,
            "invalid_channel_uri",
        ),
        (
            "d1",
            json!({"pfn": PFN, "channel_uri": "https://db5.notify.windows.com:8443/"})
                .to_string()
                .into_bytes(),
            422,
            "invalid_channel_uri",
        ),
        (
            "d1",
            json!({"pfn": PFN, "channel_uri": uri(&"A".repeat(3000))})
                .to_string()
                .into_bytes(),
            422,
            "invalid_channel_uri",
        ),
        (
            "d1",
            json!({"pfn": PFN, "channel_uri": good, "issued_at": "yesterday"})
                .to_string()
                .into_bytes(),
            422,
            "invalid_issued_at",
        ),
        (
            "d1",
            json!({"pfn": PFN, "channel_uri": good, "issued_at": "2999-01-01T00:00:00Z"})
                .to_string()
                .into_bytes(),
            422,
            "invalid_issued_at",
        ),
        (
            "d1",
            json!({"pfn": PFN, "channel_uri": good, "provider_id": "a/b"})
                .to_string()
                .into_bytes(),
            422,
            "invalid_provider_id",
        ),
        (
            "",
            json!({"pfn": PFN, "channel_uri": good})
                .to_string()
                .into_bytes(),
            400,
            "invalid_device_id",
        ),
        (
            &long_id,
            json!({"pfn": PFN, "channel_uri": good})
                .to_string()
                .into_bytes(),
            400,
            "invalid_device_id",
        ),
        (
            "a%20b",
            json!({"pfn": PFN, "channel_uri": good})
                .to_string()
                .into_bytes(),
            400,
            "invalid_device_id",
        ),
    ];
    for (id, body, status, code) in &cases {
        let got = put_raw(&mut c, id, json_ct, body);
        assert_eq!(
            got,
            (*status, code.to_string()),
            "id {id:?} body {}",
            String::from_utf8_lossy(body)
        );
    }
    let future = json!({"pfn": PFN, "channel_uri": good, "issued_at": days_ago(-1)}).to_string();
    assert_eq!(
        put_raw(&mut c, "d1", json_ct, future.as_bytes()),
        (422, "issued_at_in_future".into())
    );
    let form = json!({"pfn": PFN, "channel_uri": good}).to_string();
    assert_eq!(
        put_raw(
            &mut c,
            "d1",
            Some("application/x-www-form-urlencoded"),
            form.as_bytes()
        ),
        (415, "unsupported_media_type".into())
    );
    assert_eq!(
        c.get("/v1/stats").unwrap().json()["devices"],
        0,
        "a bad request changed state"
    );

    assert_eq!(
        c.get("/v1/devices/nobody").unwrap().json()["error"]["code"],
        "unknown_device"
    );
    assert_eq!(
        c.get("/v1/devices?state=zombie").unwrap().json()["error"]["code"],
        "invalid_state"
    );
    assert_eq!(
        c.get("/v1/devices?limit=0").unwrap().json()["error"]["code"],
        "invalid_limit"
    );
    assert_eq!(
        c.get("/v1/devices?cursor=zz").unwrap().json()["error"]["code"],
        "invalid_cursor"
    );
    assert_eq!(c.get("/v1/nothing").unwrap().status, 404);
    assert_eq!(
        c.request("POST", "/v1/devices/d1", None, b"")
            .unwrap()
            .status,
        405
    );
}

#[test]
fn a_100_mb_body_is_refused_without_reading_it() {
    let (_d, s) = start();
    let mut stream = TcpStream::connect(&s.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let head = format!(
        "PUT /v1/devices/big/channel HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        100 * 1024 * 1024
    );
    stream.write_all(head.as_bytes()).unwrap();
    let _ = stream.write_all(&vec![b' '; 64 * 1024]);
    let mut buf = vec![0u8; 4096];
    let n = stream.read(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("body_too_large"), "{text}");

    // The same without a declared length (chunked): cut off at the limit.
    let mut c = s.client();
    let mut big = std::io::repeat(b' ').take(10 * 1024 * 1024);
    let r = c
        .request_streaming(
            "PUT",
            "/v1/devices/big/channel",
            "application/json",
            &mut big,
            &mut |_| {},
        )
        .map(|r| r.status);
    assert!(matches!(r, Ok(413)) || r.is_err(), "{r:?}");
    assert_eq!(s.client().get("/v1/devices/big").unwrap().status, 404);
}

#[test]
fn ndjson_import_stores_good_lines_and_reports_bad_ones() {
    let (_d, s) = start();
    let mut c = s.client();
    let mut body = String::new();
    for i in 0..2500 {
        match i {
            10 => body.push_str("{not json"),
            20 => body.push_str(&json!({"device_id": "x", "pfn": PFN, "channel_uri": "https://evil.example/"}).to_string()),
            30 => body.push_str(&json!({"device_id": "", "pfn": PFN, "channel_uri": uri("e")}).to_string()),
            40 => body.push('\r'),
            _ => body.push_str(&json!({"device_id": format!("imp-{i}"), "pfn": PFN, "channel_uri": uri(&format!("t{i}"))}).to_string()),
        }
        body.push('\n');
    }
    body.push_str(&format!(
        "{{\"device_id\":\"long\",\"pfn\":\"{}\",\"channel_uri\":\"{}\"}}\n",
        "p".repeat(20_000),
        uri("l")
    ));
    body.push_str(
        &json!({"device_id": "last-no-newline", "pfn": PFN, "channel_uri": uri("last")})
            .to_string(),
    );
    let r = c
        .request(
            "POST",
            "/v1/devices:import",
            Some("application/x-ndjson"),
            body.as_bytes(),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let rep = r.json();
    assert_eq!(rep["accepted"], 2497, "{rep}");
    assert_eq!(rep["rejected"], 4, "{rep}");
    let lines: Vec<_> = rep["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["line"].as_u64().unwrap(),
                e["code"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        lines,
        vec![
            (11, "invalid_json".to_owned()),
            (21, "invalid_channel_uri".to_owned()),
            (31, "invalid_device_id".to_owned()),
            (2501, "line_too_long".to_owned())
        ]
    );
    assert_eq!(c.get("/v1/stats").unwrap().json()["devices"], 2497);
    assert_eq!(
        c.get("/v1/devices/imp-2499").unwrap().json()["channel_uri"],
        uri("t2499").as_str()
    );
    assert_eq!(c.get("/v1/devices/last-no-newline").unwrap().status, 200);
}

#[test]
fn import_over_the_size_limit_is_413() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(
        &dir.path().join("data"),
        &[("WNSGATE_API__MAX_IMPORT_BYTES", "100000")],
    );
    // A declared length over the limit is refused before anything is read.
    let mut stream = TcpStream::connect(&s.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"POST /v1/devices:import HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\nContent-Length: 200000\r\n\r\n")
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = stream.read(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("body_too_large"), "{text}");
    assert_eq!(s.client().get("/v1/stats").unwrap().json()["devices"], 0);
}

#[test]
fn bearer_tokens_are_required_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let token = "0123456789abcdef-secret";
    let s = Server::start(
        &dir.path().join("data"),
        &[("WNSGATE_API__TOKENS", &format!("[\"{token}\"]"))],
    );
    let mut anon = s.client();
    assert_eq!(anon.get("/healthz").unwrap().status, 200);
    let r = anon.get("/v1/stats").unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let mut wrong = s
        .client()
        .with_token(Some("0123456789abcdef-wrong!".into()));
    assert_eq!(wrong.get("/v1/stats").unwrap().status, 401);
    let mut ok = s.client().with_token(Some(token.into()));
    assert_eq!(ok.get("/v1/stats").unwrap().status, 200);
    assert!(!s.stderr().contains(token), "the token was logged");
}

#[test]
fn refuses_to_listen_publicly_without_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wnsgate"))
        .args(["serve", "--listen", "0.0.0.0:0", "--data"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("api.tokens"), "{err}");
}

#[test]
fn check_config_reports_the_key_at_fault() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.toml");
    std::fs::write(&f, "[lifecycle]\nexpire_after = \"banana\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wnsgate"))
        .arg("check-config")
        .arg(&f)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("lifecycle.expire_after"));
    std::fs::write(&f, "[api]\nlisten = \"127.0.0.1:9999\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wnsgate"))
        .arg("check-config")
        .arg(&f)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("127.0.0.1:9999"));
}

#[test]
fn graceful_restart_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = Server::start(&data, &[]);
    let mut c = s.client();
    for i in 0..50 {
        let r = c
            .send_json(
                "PUT",
                &format!("/v1/devices/g{i}/channel"),
                &channel_body(&uri(&format!("g{i}"))),
            )
            .unwrap();
        assert_eq!(r.status, 201);
    }
    let status = s.terminate();
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    let s = Server::start(&data, &[]);
    let mut c = s.client();
    assert_eq!(c.get("/v1/stats").unwrap().json()["devices"], 50);
    assert_eq!(
        c.get("/v1/devices/g49").unwrap().json()["channel_uri"],
        uri("g49").as_str()
    );
}

#[test]
fn port_in_use_is_a_clear_error() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wnsgate"))
        .args(["serve", "--listen", &addr, "--data"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&addr) && err.to_lowercase().contains("in use"),
        "{err}"
    );
}

#[test]
fn the_example_config_is_valid() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wnsgate"))
        .arg("check-config")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/wnsgate.example.toml"
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `.` and `..` (and ids of only dots, however encoded) are path segments
/// that clients and proxies rewrite: they are refused with a reason, and
/// nothing is registered.
#[test]
fn device_ids_of_only_dots_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Server::start(&dir.path().join("data"), &[]);
    let mut c = gw.client();
    let body = json!({"pfn": PFN, "channel_uri": uri("AwYAAADdots")})
        .to_string()
        .into_bytes();
    let json_ct = Some("application/json");
    for id in [".", "..", "...", "%2e%2e", "%2E"] {
        let r = c
            .request("PUT", &format!("/v1/devices/{id}/channel"), json_ct, &body)
            .unwrap();
        assert_eq!(r.status, 400, "{id}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "invalid_device_id", "{id}");
        let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(message.contains("dots"), "{id}: {message}");
        let r = c.get(&format!("/v1/devices/{id}")).unwrap();
        assert_eq!(r.status, 400, "{id}: {}", r.text());
    }
    // Dots inside an id are fine.
    assert_eq!(put_raw(&mut c, "a.b", json_ct, &body).0, 201);
    assert_eq!(put_raw(&mut c, "..a", json_ct, &body).0, 201);
    let stats = c.get("/v1/stats").unwrap().json();
    assert_eq!(stats["devices"], 2, "{stats}");
}

/// Probes and load balancers send HEAD: `/healthz`, `/readyz` and
/// `/metrics` answer it as GET without the body; other methods get 405.
#[test]
fn head_on_the_probes_and_metrics_answers_without_a_body() {
    let (_d, s) = start();
    for path in ["/healthz", "/readyz", "/metrics"] {
        let mut stream = TcpStream::connect(&s.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        write!(
            stream,
            "HEAD {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
        let body = answer.split_once("\r\n\r\n").map(|(_, b)| b);
        assert_eq!(body, Some(""), "{path}: {answer}");
        let mut c = s.client();
        let r = c.request("DELETE", path, None, b"").unwrap();
        assert_eq!(r.status, 405, "{path}");
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("HEAD"),
            "{path}"
        );
    }
}

/// A job id that no run can have issued is unknown (404), not "already
/// closed" (409).
#[test]
fn completing_a_never_issued_refresh_job_is_404() {
    let (_d, s) = start();
    let mut c = s.client();
    let r = c
        .send_json(
            "POST",
            "/v1/refresh/r123:complete",
            &json!({"outcome": "delivered"}),
        )
        .unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "unknown_refresh_job");
}

#[test]
fn a_snapshot_on_demand_holds_every_device_and_a_restart_loads_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &[]);
    let mut c = server.client();
    for i in 0..50 {
        let r = c
            .send_json(
                "PUT",
                &format!("/v1/devices/snap-{i}/channel"),
                &channel_body(&uri(&format!("snap-{i}"))),
            )
            .unwrap();
        assert_eq!(r.status, 201, "{}", r.text());
    }
    assert_eq!(c.get("/v1/store:snapshot").unwrap().status, 405);
    let r = c.request("POST", "/v1/store:snapshot", None, b"").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let cut = r.json();
    assert_eq!(cut["devices"], 50);
    assert!(cut["bytes"].as_u64().unwrap() > 50 * 100, "{cut}");
    let snaps: Vec<_> = std::fs::read_dir(data.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert!(snaps[0].ends_with(".snap"), "{snaps:?}");
    // One more write after the cut, then a restart: snapshot plus tail.
    let r = c
        .send_json(
            "PUT",
            "/v1/devices/after/channel",
            &channel_body(&uri("after")),
        )
        .unwrap();
    assert_eq!(r.status, 201);
    server.kill();
    let server = Server::start(&data, &[]);
    let mut c = server.client();
    assert_eq!(c.get("/v1/stats").unwrap().json()["devices"], 51);
    for id in ["snap-0", "snap-49", "after"] {
        let d = c.get(&format!("/v1/devices/{id}")).unwrap().json();
        let token = if id == "after" { "after" } else { id };
        assert_eq!(d["channel_uri"], uri(token));
    }
}

/// With no `[[wns.apps]]` every PFN is unknown: a registration is refused
/// as for a PFN missing from a configured list (no device is stored that
/// no wake could reach), and the start says so.
#[test]
fn with_no_wns_app_a_registration_is_refused_as_unknown_pfn() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Server::start(&dir.path().join("data"), &[("WNSGATE_WNS__APPS", "[]")]);
    let r = gw
        .client()
        .send_json(
            "PUT",
            "/v1/devices/d1/channel",
            &channel_body(&uri("AwYAAAD1")),
        )
        .unwrap();
    assert_eq!(r.status, 422, "{}", r.text());
    let err = r.json();
    assert_eq!(err["error"]["code"], "unknown_pfn", "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("none is configured"),
        "{err}"
    );
    assert_eq!(gw.client().get("/v1/devices/d1").unwrap().status, 404);
    assert!(
        gw.stderr().contains("no [[wns.apps]] configured"),
        "{}",
        gw.stderr()
    );

    // With an app, only its PFN is taken.
    let dir = tempfile::tempdir().unwrap();
    let gw = Server::start(&dir.path().join("data"), &[]);
    let r = gw
        .client()
        .send_json(
            "PUT",
            "/v1/devices/d1/channel",
            &channel_body(&uri("AwYAAAD1")),
        )
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let other = json!({"pfn": "Fabrikam.MDM_8wekyb3d8bbwe", "channel_uri": uri("AwYAAAD2")});
    let r = gw
        .client()
        .send_json("PUT", "/v1/devices/d2/channel", &other)
        .unwrap();
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains(PFN), "{}", r.text());
}
