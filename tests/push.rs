//! Waking devices end to end: a gateway process sends to the WNS simulator
//! over real TLS, and every outcome lands on the device record.

// Measures its own waits and hang guards on the real clock; the rule that
// time is read only through `wnsgate::clock` (clippy.toml) is the gateway's.
#![allow(clippy::disallowed_methods)]

mod common;

use common::{OneConnection, Server, PFN};
use serde_json::{json, Value};
use std::time::Duration;
use wnsgate::sim::{self, Faults, SimConfig};

fn start() -> (tempfile::TempDir, sim::SimHandle, Server) {
    common::start_with_sim(SimConfig::default())
}

fn register(gw: &Server, id: &str, token: &str) {
    let uri = format!("https://db5.notify.windows.com/?token={token}");
    let r = gw
        .client()
        .send_json(
            "PUT",
            &format!("/v1/devices/{id}/channel"),
            &json!({"pfn": PFN, "channel_uri": uri}),
        )
        .unwrap();
    assert!(r.status == 201 || r.status == 200, "{}", r.text());
}

/// Makes the simulator hold every answer for `ms` milliseconds.
fn slow_answers(s: &sim::SimHandle, ms: u64) {
    s.set_faults(Faults {
        latency_ms: Some(sim::LatencyRange {
            min_ms: ms,
            max_ms: ms,
        }),
        ..Faults::default()
    })
    .unwrap();
}

#[test]
fn every_wns_answer_lands_on_the_device() {
    let (_d, s, gw) = start();
    let cases = [
        ("ok", "AwYAAADgood", "delivered", "received", "active", None),
        (
            "gone",
            "x410AwYAAAD",
            "channel_dead",
            "channel_expired",
            "refresh_pending",
            Some("wns410"),
        ),
        (
            "revoked",
            "xrevokedAwY",
            "channel_dead",
            "channel_expired",
            "refresh_pending",
            Some("wns410"),
        ),
        (
            "unknown",
            "x404AwYAAAD",
            "channel_dead",
            "channel_not_found",
            "refresh_pending",
            Some("wns404"),
        ),
        (
            "wrongapp",
            "x403AwYAAAD",
            "channel_dead",
            "credential_mismatch",
            "refresh_pending",
            Some("credential_mismatch"),
        ),
        (
            "dropped",
            "xdropAwYAAA",
            "dropped",
            "dropped",
            "active",
            None,
        ),
    ];
    for (id, token, result, outcome, state, reason) in cases {
        register(&gw, id, token);
        let r = common::push_wait(&gw, id);
        assert_eq!(r["result"], result, "{id}: {r}");
        assert_eq!(r["wns_outcome"], outcome, "{id}: {r}");
        assert_eq!(r["attempts"], 1, "{id}: {r}");
        assert!(
            r["msg_id"].as_str().is_some_and(|m| m.len() == 16),
            "{id}: {r}"
        );
        assert!(r["ms_cv"].as_str().is_some(), "{id}: {r}");
        let dev = gw
            .client()
            .get(&format!("/v1/devices/{id}"))
            .unwrap()
            .json();
        assert_eq!(dev["state"], state, "{id}: {dev}");
        assert_eq!(dev["last_push"]["result"], result, "{id}: {dev}");
        assert_eq!(dev["last_push"]["wns_outcome"], outcome, "{id}: {dev}");
        assert_eq!(dev["last_push"]["status"], r["status"], "{id}: {dev}");
        assert_eq!(
            dev["state_reason"],
            reason.map_or(Value::Null, Value::from),
            "{id}: {dev}"
        );
    }
    // A dead mark is durable and cleared by a new channel URI.
    register(&gw, "gone", "AwYAAADfresh");
    let dev = gw.client().get("/v1/devices/gone").unwrap().json();
    assert_eq!(dev["state"], "active");
    assert_eq!(s.stats().pushes_total, 6);
    assert_eq!(s.stats().tokens_issued, 1, "one token serves every push");
}

#[test]
fn server_errors_are_retried_within_the_attempt_budget() {
    let (_d, s, gw) = start();
    register(&gw, "flaky", "AwYAAADflaky");
    s.set_faults(Faults {
        error_ratio: 1.0,
        ..Faults::default()
    })
    .unwrap();
    let r = common::push_wait(&gw, "flaky");
    assert_eq!(r["result"], "attempts_exhausted", "{r}");
    assert_eq!(r["attempts"], 4, "{r}");
    assert_eq!(
        s.stats().pushes_total,
        4,
        "sent more often than the retry policy allows"
    );
    s.set_faults(Faults::default()).unwrap();
    let r = common::push_wait(&gw, "flaky");
    assert_eq!(r["result"], "delivered", "{r}");
}

#[test]
fn pending_wakes_for_one_device_are_coalesced() {
    let (_d, s, gw) = start();
    register(&gw, "slow", "AwYAAADslow");
    slow_answers(&s, 800);
    let mut c = gw.client();
    let first = c
        .request("POST", "/v1/devices/slow/push", None, b"")
        .unwrap();
    assert_eq!(first.status, 202, "{}", first.text());
    let second = c
        .request("POST", "/v1/devices/slow/push", None, b"")
        .unwrap();
    assert_eq!(second.status, 202);
    assert_eq!(first.json()["coalesced"], false);
    assert_eq!(second.json()["coalesced"], true);
    assert_eq!(first.json()["push_id"], second.json()["push_id"]);
    let waited = common::push_wait(&gw, "slow");
    assert_eq!(waited["push_id"], first.json()["push_id"]);
    assert_eq!(waited["result"], "delivered");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        s.stats().pushes_total,
        1,
        "coalesced wakes were sent more than once"
    );
}

#[test]
fn a_single_wake_joins_the_bulk_wake_pending_for_its_device() {
    let (_d, s, gw) = start();
    register(&gw, "slow", "AwYAAADslow");
    register(&gw, "slowgone", "x410AwYAAADslow");
    slow_answers(&s, 3000);
    let r = create_job(&gw, &json!({"device_ids": ["slow", "slowgone"]}));
    assert_eq!(r.status, 202, "{}", r.text());
    let job = r.json()["job_id"].as_str().unwrap().to_owned();
    // Both bulk wakes are on the wire (the simulator holds each answer).
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while !gw
        .client()
        .get("/metrics")
        .unwrap()
        .text()
        .lines()
        .any(|l| l == "wnsgate_wns_inflight_pushes 2")
    {
        assert!(
            std::time::Instant::now() < until,
            "the bulk wakes never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let answers: Vec<Value> = std::thread::scope(|scope| {
        let joiners: Vec<_> = ["slow", "slowgone"]
            .map(|id| scope.spawn(|| common::push_wait(&gw, id)))
            .into_iter()
            .collect();
        joiners.into_iter().map(|j| j.join().unwrap()).collect()
    });
    assert_eq!(answers[0]["coalesced"], true, "{}", answers[0]);
    assert_eq!(answers[0]["result"], "delivered", "{}", answers[0]);
    assert_eq!(answers[1]["coalesced"], true, "{}", answers[1]);
    assert_eq!(answers[1]["result"], "channel_dead", "{}", answers[1]);
    // The joiner answered once the dead mark was durable.
    let dev = gw.client().get("/v1/devices/slowgone").unwrap().json();
    assert_eq!(dev["state"], "refresh_pending", "{dev}");
    let view = wait_job(&gw, &job);
    assert_eq!(
        (view["received"].as_u64(), view["expired"].as_u64()),
        (Some(1), Some(1)),
        "{view}"
    );
    assert_eq!(s.stats().pushes_total, 2, "a joined wake was sent again");
    // Settled: the next wake is a new one.
    s.set_faults(Faults::default()).unwrap();
    let again = common::push_wait(&gw, "slow");
    assert_eq!(again["coalesced"], false, "{again}");
    assert_ne!(again["push_id"], answers[0]["push_id"]);
}

#[test]
fn push_bad_input() {
    let (_d, _s, gw) = start();
    let mut c = gw.client();
    let r = c
        .request("POST", "/v1/devices/nobody/push", None, b"")
        .unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "unknown_device");
    register(&gw, "d", "AwYAAADd");
    let r = c
        .request("POST", "/v1/devices/d/push?wait=maybe", None, b"")
        .unwrap();
    assert_eq!(r.json()["error"]["code"], "invalid_wait");
    let r = c.request("GET", "/v1/devices/d/push", None, b"").unwrap();
    assert_eq!(r.status, 405);
}

fn create_job(gw: &Server, body: &Value) -> wnsgate::client::HttpResponse {
    gw.client().send_json("POST", "/v1/pushes", body).unwrap()
}

fn wait_job(gw: &Server, id: &str) -> Value {
    common::wait_job(gw, id, Duration::from_secs(60))
}

#[test]
fn bulk_wake_counts_every_outcome_and_sends_each_device_once() {
    let (_d, s, gw) = start();
    let devices = (0..300).map(|i| {
        let token = match i % 20 {
            0 => format!("x410b{i}"),
            1 => format!("xdropb{i}"),
            _ => format!("AwYAAADb{i}"),
        };
        (format!("b{i:04}"), token)
    });
    assert_eq!(
        common::import_tokens(&gw, "db5.notify.windows.com", devices),
        300
    );

    let r = create_job(&gw, &json!({"all": true}));
    assert_eq!(r.status, 202, "{}", r.text());
    // Known up front, before any device is selected.
    assert_eq!(r.json()["expected_total"], 300, "{}", r.text());
    let job = wait_job(&gw, r.json()["job_id"].as_str().unwrap());
    assert_eq!(job["total"], 300, "{job}");
    assert_eq!(job["received"], 270, "{job}");
    assert_eq!(job["expired"], 15, "{job}");
    assert_eq!(job["dropped"], 15, "{job}");
    assert_eq!(job["failed"], 0, "{job}");
    assert_eq!(job["pending"], 0, "{job}");
    let st = s.stats();
    assert_eq!(st.pushes_total, 300);
    assert_eq!(st.distinct_channels, 300);
    assert_eq!(st.max_pushes_per_channel, 1);
    let stats = gw.client().get("/v1/stats").unwrap().json();
    // A dead channel is expired and at once in the refresh queue.
    assert_eq!(stats["by_state"]["refresh_pending"], 15, "{stats}");
    assert_eq!(stats["refresh_queue"]["queued"], 15, "{stats}");
    // Listed by state, from the index of marked devices, in pages of 4.
    let mut listed = Vec::new();
    let mut path = "/v1/devices?state=refresh_pending&limit=4".to_owned();
    loop {
        let page = gw.client().get(&path).unwrap().json();
        let devices = page["devices"].as_array().unwrap();
        assert!(devices.len() <= 4, "{page}");
        listed.extend(
            devices
                .iter()
                .map(|d| d["device_id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("/v1/devices?state=refresh_pending&limit=4&cursor={c}"),
            None => break,
        }
    }
    listed.sort();
    let dead: Vec<String> = (0..300).step_by(20).map(|i| format!("b{i:04}")).collect();
    assert_eq!(listed, dead);

    // The failures: the 15 expired and the 15 dropped, each with its
    // outcome, in pages.
    let all_job = job["job_id"].as_str().unwrap().to_owned();
    let mut failures = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            None => format!("/v1/pushes/{all_job}/failures?limit=20"),
            Some(c) => format!("/v1/pushes/{all_job}/failures?limit=20&cursor={c}"),
        };
        let page = gw.client().get(&path).unwrap();
        assert_eq!(page.status, 200, "{}", page.text());
        let page = page.json();
        assert_eq!(page["failures_not_kept"], 0, "{page}");
        failures.extend(page["failures"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(failures.len(), 30);
    let of = |result: &str, outcome: &str, status: u64| {
        failures
            .iter()
            .filter(|f| {
                f["result"] == result && f["wns_outcome"] == outcome && f["status"] == status
            })
            .count()
    };
    assert_eq!(of("channel_dead", "channel_expired", 410), 15);
    assert_eq!(of("dropped", "dropped", 200), 15);
    assert!(failures
        .iter()
        .any(|f| f["device_id"] == "b0000" && f["result"] == "channel_dead"));

    // By state: only the 15 whose channel died, which WNS already declared
    // dead: skipped unless asked for.
    let r = create_job(&gw, &json!({"state": "refresh_pending"}));
    assert_eq!(r.json()["expected_total"], 15, "{}", r.text());
    let job = wait_job(&gw, r.json()["job_id"].as_str().unwrap());
    assert_eq!(
        (
            job["total"].as_u64(),
            job["skipped_dead"].as_u64(),
            job["done"].as_u64()
        ),
        (Some(15), Some(15), Some(15)),
        "{job}"
    );
    assert_eq!(s.stats().pushes_total, 300);
    let r = create_job(
        &gw,
        &json!({"state": "refresh_pending", "include_dead": true}),
    );
    let job = wait_job(&gw, r.json()["job_id"].as_str().unwrap());
    assert_eq!(
        (
            job["total"].as_u64(),
            job["skipped_dead"].as_u64(),
            job["expired"].as_u64()
        ),
        (Some(15), Some(0), Some(15)),
        "{job}"
    );
    assert_eq!(job["include_dead"], true, "{job}");
    assert_eq!(s.stats().pushes_total, 315);

    // By ids, one of them unknown.
    let r = create_job(&gw, &json!({"device_ids": ["b0002", "b0003", "nobody"]}));
    let job = wait_job(&gw, r.json()["job_id"].as_str().unwrap());
    assert_eq!(
        (job["received"].as_u64(), job["failed"].as_u64()),
        (Some(2), Some(1)),
        "{job}"
    );
    let id = job["job_id"].as_str().unwrap();
    let page = gw
        .client()
        .get(&format!("/v1/pushes/{id}/failures"))
        .unwrap()
        .json();
    assert_eq!(
        page["failures"],
        json!([{"device_id": "nobody", "result": "not_registered", "wns_outcome": null, "status": null}]),
        "{page}"
    );
    assert_eq!(page["next_cursor"], Value::Null, "{page}");
    for bad in ["limit=0", "limit=1001", "cursor=x", "sort=1"] {
        let r = gw
            .client()
            .get(&format!("/v1/pushes/{id}/failures?{bad}"))
            .unwrap();
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }
    let r = gw.client().get("/v1/pushes/jnope/failures").unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
}

#[test]
fn bulk_wake_is_paced_and_can_be_cancelled() {
    let (_d, _s, gw) = start();
    for i in 0..40 {
        register(&gw, &format!("c{i}"), &format!("AwYAAADc{i}"));
    }
    let r = create_job(&gw, &json!({"all": true, "rate_per_second": 10}));
    let id = r.json()["job_id"].as_str().unwrap().to_owned();
    std::thread::sleep(Duration::from_millis(700));
    let r = gw
        .client()
        .request("DELETE", &format!("/v1/pushes/{id}"), None, b"")
        .unwrap();
    assert_eq!(r.status, 200);
    let job = wait_job(&gw, &id);
    assert_eq!(job["state"], "cancelled", "{job}");
    let sent = job["received"].as_u64().unwrap();
    assert!(
        (1..=15).contains(&sent),
        "paced at 10/s for 0.7 s but sent {sent}: {job}"
    );
    assert_eq!(job["not_sent"].as_u64().unwrap() + sent, 40, "{job}");
}

#[test]
fn bulk_wake_bad_input() {
    let (_d, _s, gw) = start();
    let cases = [
        (json!({}), 422, "invalid_selection"),
        (
            json!({"all": true, "state": "active"}),
            422,
            "invalid_selection",
        ),
        (json!({"state": "zombie"}), 422, "invalid_state"),
        (json!({"device_ids": []}), 422, "empty_job"),
        (json!({"device_ids": ["a/b"]}), 422, "invalid_device_id"),
        (
            json!({"all": true, "rate_per_second": 0}),
            422,
            "invalid_rate",
        ),
        (json!({"all": true, "colour": 1}), 422, "invalid_request"),
    ];
    for (body, status, code) in cases {
        let r = create_job(&gw, &body);
        assert_eq!(
            (r.status, r.json()["error"]["code"].clone()),
            (status, json!(code)),
            "{body}"
        );
    }
    let ids: Vec<String> = (0..100_001).map(|i| format!("d{i}")).collect();
    let r = create_job(&gw, &json!({ "device_ids": ids }));
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["code"], "job_too_large");
    let r = gw
        .client()
        .request(
            "POST",
            "/v1/pushes",
            Some("application/json"),
            b"{\"all\": tru",
        )
        .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(gw.client().get("/v1/pushes/nope").unwrap().status, 404);
}

#[test]
fn an_entra_app_gets_its_token_from_the_tenant_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let s = sim::start(SimConfig::default()).unwrap();
    let apps = format!(
        "[{{pfn = \"{PFN}\", package_sid = \"ms-app://S-1-15-2-7\", client_id = \"6f1c2a9e-3b1d-4c55-9a0e-2f6f0d7b8c11\", \
         client_secret = \"entra-secret\", entra_tenant = \"contoso.onmicrosoft.com\", token_url = \"{}\"}}]",
        s.entra_token_url("contoso.onmicrosoft.com")
    );
    let (connect_to, ca) = (s.addr.to_string(), s.ca_pem_path.display().to_string());
    let gw = Server::start(
        &dir.path().join("data"),
        &[
            ("WNSGATE_WNS__CONNECT_TO", connect_to.as_str()),
            ("WNSGATE_WNS__CA_FILE", ca.as_str()),
            ("WNSGATE_WNS__APPS", apps.as_str()),
        ],
    );
    register(&gw, "entra", "AwYAAADentra");
    let r = common::push_wait(&gw, "entra");
    assert_eq!(r["result"], "delivered", "{r}");
    let st = s.stats();
    assert_eq!((st.token_requests, st.tokens_issued), (1, 1), "{st:?}");
}

#[test]
fn cancelling_a_finished_bulk_wake_leaves_it_done() {
    let (_d, s, gw) = start();
    for i in 0..5 {
        register(&gw, &format!("f{i}"), &format!("AwYAAADf{i}"));
    }
    let r = create_job(&gw, &json!({"all": true}));
    let id = r.json()["job_id"].as_str().unwrap().to_owned();
    let done = wait_job(&gw, &id);
    assert_eq!(done["state"], "done", "{done}");
    let r = gw
        .client()
        .request("DELETE", &format!("/v1/pushes/{id}"), None, b"")
        .unwrap();
    assert_eq!(r.status, 200);
    let answered = r.json();
    assert_eq!(answered["state"], "done", "{answered}");
    assert_eq!(answered["received"], 5, "{answered}");
    assert_eq!(answered["not_sent"], 0, "{answered}");
    let later = gw.client().get(&format!("/v1/pushes/{id}")).unwrap().json();
    assert_eq!(later, answered);
    assert_eq!(s.stats().pushes_total, 5);
}

#[test]
fn a_cancelled_bulk_wake_starts_no_more_wakes() {
    let (_d, s, gw) = start();
    for i in 0..20 {
        register(&gw, &format!("k{i:02}"), &format!("AwYAAADk{i}"));
    }
    // One wake a second: the first goes at once, the next waits on the
    // pacer, and the cancel below arrives during that wait (it follows the
    // first result directly). Waking from the wait, the job must see the
    // cancel instead of starting the second wake.
    let r = create_job(&gw, &json!({"all": true, "rate_per_second": 1}));
    let id = r.json()["job_id"].as_str().unwrap().to_owned();
    while gw.client().get(&format!("/v1/pushes/{id}")).unwrap().json()["received"] != 1 {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(metric(&gw, "wnsgate_bulk_jobs_running"), 1.0);
    let r = gw
        .client()
        .request("DELETE", &format!("/v1/pushes/{id}"), None, b"")
        .unwrap();
    assert_eq!(r.status, 200);
    let job = wait_job(&gw, &id);
    assert_eq!(job["state"], "cancelled", "{job}");
    assert_eq!(job["received"], 1, "{job}");
    assert_eq!(job["not_sent"], 19, "{job}");
    assert_eq!(s.stats().pushes_total, 1, "{job}");
    assert_eq!(metric(&gw, "wnsgate_bulk_jobs_running"), 0.0);
}

/// Every shard sends a share of a bulk wake from the moment it starts, not
/// only the shard that serves the API: the gateway runs 2 shards and sees
/// one keep-alive connection (so one shard) for everything, from the
/// registrations to the scrape.
#[test]
fn a_bulk_wake_is_sent_from_every_shard_including_one_that_served_no_request() {
    const DEVICES: usize = 5_000;
    // Pages of the registry, each dealt as batches.
    let (page, deal) = (
        wnsgate::wake::limits::PAGE_DEVICES,
        wnsgate::wake::limits::DEAL_DEVICES,
    );
    let batches = DEVICES / page * page.div_ceil(deal) + (DEVICES % page).div_ceil(deal);
    assert!(batches >= 2, "enough devices for a batch per shard");
    let (_d, s, gw) =
        common::launch_with_sim_env(SimConfig::default(), &[("WNSGATE_SERVER__SHARDS", "2")]);
    let mut api = OneConnection::open(&gw.addr);
    let mut lines = String::new();
    for i in 0..DEVICES {
        let line = json!({"device_id": format!("s{i:05}"), "pfn": PFN, "channel_uri": common::uri(&format!("AwYAAADs{i}"))});
        lines.push_str(&format!("{line}\n"));
    }
    let (status, body) = api.request(
        "POST",
        "/v1/devices:import",
        Some("application/x-ndjson"),
        lines.as_bytes(),
    );
    let imported: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 200, "{imported}");
    assert_eq!(imported["accepted"], DEVICES, "{imported}");

    let (status, job) = api.json("POST", "/v1/pushes", &json!({"all": true}));
    assert_eq!(status, 202, "{job}");
    let path = format!("/v1/pushes/{}", job["job_id"].as_str().unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let job = loop {
        let (_, job) = api.json("GET", &path, &Value::Null);
        if job["state"] != "selecting" && job["state"] != "running" {
            break job;
        }
        assert!(std::time::Instant::now() < deadline, "not done: {job}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["received"], DEVICES, "{job}");
    assert_eq!(job["done"], DEVICES, "{job}");
    assert_eq!(s.stats().pushes_total, DEVICES as u64);

    let (_, scrape) = api.request("GET", "/metrics", None, b"");
    let scrape = String::from_utf8(scrape).unwrap();
    let sent_by = |shard: usize| -> usize {
        let series = format!("wnsgate_bulk_batches_total{{shard=\"{shard}\"}} ");
        scrape
            .lines()
            .find_map(|l| l.strip_prefix(&series)?.parse().ok())
            .unwrap_or(0)
    };
    let (first, second) = (sent_by(0), sent_by(1));
    assert!(
        first > 0 && second > 0,
        "batches by shard: {first}, {second}"
    );
    assert_eq!(
        first + second,
        batches,
        "batches by shard: {first}, {second}"
    );
    // The wakes ran on the shards, over the shards' backend.
    let io = scrape
        .lines()
        .find(|l| l.starts_with("wnsgate_build_info{"))
        .and_then(|l| l.split("io=\"").nth(1)?.split('"').next())
        .expect("wnsgate_build_info{io=...}");
    let opened: Vec<&str> = scrape
        .lines()
        .filter(|l| l.starts_with("wnsgate_wns_connections_opened_total{"))
        .collect();
    assert!(!opened.is_empty(), "{scrape}");
    for line in opened {
        assert!(line.contains(&format!("io=\"{io}\"")), "{io}: {line}");
    }
}

/// The value of one series in a `/metrics` scrape (`name` with its labels
/// as rendered, e.g. `x{protocol="h2"}`).
fn metric(gw: &Server, series: &str) -> f64 {
    let text = gw.client().get("/metrics").unwrap().text();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

#[test]
fn open_wns_connections_are_counted_by_protocol() {
    let (_d, _s, gw) = start();
    assert_eq!(
        metric(&gw, "wnsgate_wns_connections_open{protocol=\"h2\"}"),
        0.0
    );
    register(&gw, "conn", "AwYAAADconn");
    common::push_wait(&gw, "conn");
    assert!(metric(&gw, "wnsgate_wns_connections_open{protocol=\"h2\"}") >= 1.0);
    assert_eq!(
        metric(&gw, "wnsgate_wns_connections_open{protocol=\"http1\"}"),
        0.0
    );
}

#[test]
fn wns_request_options_reach_wns() {
    let (_d, s, gw) = common::start_with_sim_env(
        SimConfig::default(),
        &[
            ("WNSGATE_WNS__TTL", "1h"),
            ("WNSGATE_WNS__REQUEST_FOR_STATUS", "true"),
        ],
    );
    register(&gw, "opt", "AwYAAADopt");
    let r = common::push_wait(&gw, "opt");
    assert_eq!(r["result"], "delivered", "{r}");
    // The simulator answers with the connection status only when asked.
    assert_eq!(r["device_connection"], "connected", "{r}");
    let st = s.stats();
    assert_eq!(st.pushes_total, 1);
    assert_eq!(st.pushes_with_ttl, 1);
    assert_eq!(st.pushes_requesting_status, 1);

    // Without them, neither header is sent.
    let (_d2, s2, gw2) = start();
    register(&gw2, "plain", "AwYAAADplain");
    let r = common::push_wait(&gw2, "plain");
    assert_eq!(r["device_connection"], Value::Null, "{r}");
    let st = s2.stats();
    assert_eq!((st.pushes_with_ttl, st.pushes_requesting_status), (0, 0));
}

#[test]
fn final_wns_outcomes_are_logged_with_support_headers_and_no_secrets() {
    let (_d, _s, gw) = common::start_with_sim_env(
        SimConfig::default(),
        &[("WNSGATE_LOG__LEVEL", "info,wnsgate=debug")],
    );
    let channel_token = "AwYAAADlogged0123456789secretpart";
    register(&gw, "logged", channel_token);
    let r = common::push_wait(&gw, "logged");
    let (msg_id, cv) = (r["msg_id"].as_str().unwrap(), r["ms_cv"].as_str().unwrap());
    let logs = gw.stderr();
    let line = logs
        .lines()
        .find(|l| l.contains("WNS wake finished") && l.contains(msg_id))
        .unwrap_or_else(|| panic!("no log line for {msg_id}:\n{logs}"));
    for want in [
        cv,
        "status=200",
        "outcome=\"received\"",
        "debug_trace=",
        "db5.notify.windows.com",
    ] {
        assert!(line.contains(want), "{want} missing: {line}");
    }
    assert!(
        !logs.contains(channel_token),
        "channel token logged:\n{logs}"
    );
    assert!(!logs.contains("Bearer"), "access token logged:\n{logs}");
}

/// `GET /v1/pushes` lists the bulk wakes, newest first, each with
/// `selection_done` once `total` is final.
#[test]
fn bulk_wakes_are_listed_newest_first() {
    let (_d, _s, gw) = start();
    for i in 0..3 {
        register(&gw, &format!("l{i}"), &format!("AwYAAADl{i}"));
    }
    let empty = gw.client().get("/v1/pushes").unwrap();
    assert_eq!(empty.status, 200, "{}", empty.text());
    assert_eq!(empty.json()["jobs"], json!([]));
    let first = create_job(&gw, &json!({"device_ids": ["l0", "l1"]})).json()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_job(&gw, &first);
    // created_at is to the second: the second job is a second younger.
    std::thread::sleep(Duration::from_millis(1100));
    let second = create_job(&gw, &json!({"all": true})).json()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let done = wait_job(&gw, &second);
    assert_eq!(done["selection_done"], true, "{done}");
    assert_eq!(done["total"], 3, "{done}");
    let list = gw.client().get("/v1/pushes").unwrap().json();
    let ids: Vec<&str> = list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![second.as_str(), first.as_str()], "{list}");
    assert_eq!(list["jobs"][1]["received"], 2, "{list}");
    let r = gw.client().request("PUT", "/v1/pushes", None, b"").unwrap();
    assert_eq!(r.status, 405);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("GET, POST"));
}
