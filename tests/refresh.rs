//! The refresh queue end to end, in a real gateway process: expiry found by
//! age (sweep) and by WNS (410), jobs handed out at check-in, by lease and
//! by webhook, closed by a new registration, and kept across SIGKILL.

// Measures its own waits and hang guards on the real clock; the rule that
// time is read only through `wnsgate::clock` (clippy.toml) is the gateway's.
#![allow(clippy::disallowed_methods)]

mod common;

use common::{Server, PFN};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use wnsgate::sim::SimConfig;

const FAST: &[(&str, &str)] = &[
    ("WNSGATE_REFRESH__SWEEP_INTERVAL", "1s"),
    ("WNSGATE_REFRESH__PROVIDER_ID", "Contoso-MDM"),
];

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn days_ago(d: u64) -> String {
    wnsgate::core::UnixTime((now() - d * 86_400) as u32).to_rfc3339()
}

fn register(gw: &Server, id: &str, token: &str, issued_at: Option<String>) -> Value {
    let mut body = json!({"pfn": PFN, "channel_uri": format!("https://db5.notify.windows.com/?token={token}")});
    if let Some(t) = issued_at {
        body["issued_at"] = json!(t);
    }
    let r = gw
        .client()
        .send_json("PUT", &format!("/v1/devices/{id}/channel"), &body)
        .unwrap();
    assert!(r.status == 200 || r.status == 201, "{}", r.text());
    r.json()
}

fn device(gw: &Server, id: &str) -> Value {
    let r = gw.client().get(&format!("/v1/devices/{id}")).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// Polls until the device is in `state` (at most 20 s).
fn wait_state(gw: &Server, id: &str, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let d = device(gw, id);
        if d["state"] == state {
            return d;
        }
        assert!(Instant::now() < deadline, "{id} never became {state}: {d}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn lease(gw: &Server, body: Value) -> Vec<Value> {
    let r = gw
        .client()
        .send_json("POST", "/v1/refresh:lease", &body)
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["jobs"].as_array().unwrap().clone()
}

fn complete(gw: &Server, job: &str, body: Value) -> wnsgate::client::HttpResponse {
    gw.client()
        .send_json("POST", &format!("/v1/refresh/{job}:complete"), &body)
        .unwrap()
}

/// Parses the SyncML fragment and returns (element, CmdID, LocURIs, Data).
fn commands(xml: &str) -> Vec<(String, u32, Vec<String>, Option<String>)> {
    let wrapped = format!("<SyncBody>{xml}</SyncBody>");
    let doc = roxmltree::Document::parse(&wrapped).expect("the SyncML parses");
    doc.root_element()
        .children()
        .filter(|n| n.is_element())
        .map(|cmd| {
            let id = cmd
                .children()
                .find(|c| c.has_tag_name("CmdID"))
                .and_then(|c| c.text())
                .unwrap()
                .parse()
                .unwrap();
            let locs = cmd
                .descendants()
                .filter(|c| c.has_tag_name("LocURI"))
                .map(|c| c.text().unwrap().to_owned())
                .collect();
            let data = cmd
                .descendants()
                .find(|c| c.has_tag_name("Data"))
                .and_then(|c| c.text())
                .map(str::to_owned);
            (cmd.tag_name().name().to_owned(), id, locs, data)
        })
        .collect()
}

#[test]
fn aged_channel_gets_one_job_handed_out_at_check_in_and_closed_by_a_new_uri() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Server::start(&dir.path().join("data"), FAST);
    register(&gw, "aged-1", "AAA", Some(days_ago(31)));
    register(&gw, "fresh-1", "BBB", None);

    let d = wait_state(&gw, "aged-1", "refresh_pending");
    assert_eq!(d["state_reason"], "age");
    assert_eq!(d["refresh_job"]["state"], "queued");
    assert_eq!(device(&gw, "fresh-1")["state"], "active");
    // A repeated sweep does not open a second job.
    std::thread::sleep(Duration::from_millis(2500));
    let again = device(&gw, "aged-1");
    assert_eq!(again["refresh_job"]["job_id"], d["refresh_job"]["job_id"]);

    // No job for a healthy device; unknown device is 404 too, by its code.
    let r = gw.client().get("/v1/devices/fresh-1/refresh").unwrap();
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (404, json!("no_refresh_job"))
    );
    let r = gw.client().get("/v1/devices/nobody/refresh").unwrap();
    assert_eq!(r.json()["error"]["code"], "unknown_device");

    // Check-in: the SyncML for the session, CmdIDs from 5.
    let r = gw
        .client()
        .get("/v1/devices/aged-1/refresh?first_cmd_id=5")
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let job = r.json();
    assert_eq!(job["state"], "delivered");
    assert_eq!(job["handed_out_via"], "check_in");
    assert_eq!(job["attempts"], 1);
    let cmds = commands(job["syncml"].as_str().unwrap());
    let base = "./Vendor/MSFT/DMClient/Provider/Contoso-MDM/Push";
    assert_eq!(cmds[0].0, "Replace");
    assert_eq!(cmds[0].1, 5);
    assert_eq!(cmds[0].2, vec![format!("{base}/PFN")]);
    assert_eq!(cmds[0].3.as_deref(), Some(PFN));
    assert_eq!(
        cmds[1..]
            .iter()
            .map(|c| (c.0.as_str(), c.1))
            .collect::<Vec<_>>(),
        vec![("Get", 6), ("Get", 7)]
    );
    assert_eq!(cmds[1].2, vec![format!("{base}/ChannelURI")]);
    assert_eq!(cmds[2].2, vec![format!("{base}/Status")]);

    // The same session asking again gets the same job, no extra attempt.
    let r = gw.client().get("/v1/devices/aged-1/refresh").unwrap();
    assert_eq!(r.json()["attempts"], 1);

    // The device registers a fresh URI: active, no job.
    register(&gw, "aged-1", "NEW", None);
    let d = device(&gw, "aged-1");
    assert_eq!(d["state"], "active");
    assert!(d["refresh_job"].is_null(), "{d}");
    let r = gw.client().get("/v1/devices/aged-1/refresh").unwrap();
    assert_eq!(r.status, 404);
    let job_id = job["job_id"].as_str().unwrap();
    let r = gw.client().get(&format!("/v1/refresh/{job_id}")).unwrap();
    assert_eq!(r.status, 404);
    let r = complete(&gw, job_id, json!({"outcome": "delivered"}));
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (409, json!("job_closed"))
    );

    let stats = gw.client().get("/v1/stats").unwrap().json();
    assert_eq!(stats["by_state"]["refresh_pending"], 0, "{stats}");
    assert_eq!(stats["by_state"]["active"], 2, "{stats}");
    let metrics = gw.client().get("/metrics").unwrap().text();
    assert!(
        metrics.contains("wnsgate_refresh_handouts_total{via=\"check_in\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("wnsgate_refresh_jobs_opened_total{reason=\"age\"} 1"));
}

#[test]
fn leases_survive_sigkill_and_expire_afterwards() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let gw = Server::start(&data, FAST);
    for i in 0..5 {
        // Older expiry first: dev-0 expired 50 days ago, dev-4 36 days ago.
        register(
            &gw,
            &format!("dev-{i}"),
            &format!("T{i}"),
            Some(days_ago(80 - 4 * i as u64 - 30)),
        );
    }
    for i in 0..5 {
        wait_state(&gw, &format!("dev-{i}"), "refresh_pending");
    }
    // Bad leases are refused with a reason.
    for bad in [
        json!({"max": 0}),
        json!({"max": 1_000_000}),
        json!({"lease_seconds": 0}),
        json!({"lease_seconds": 999_999}),
    ] {
        let r = gw
            .client()
            .send_json("POST", "/v1/refresh:lease", &bad)
            .unwrap();
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "invalid_lease");
    }
    let r = gw
        .client()
        .send_json("POST", "/v1/refresh:lease", &json!({"max": -1}))
        .unwrap();
    assert!(
        r.status == 400 || r.status == 422,
        "a negative count is refused with a reason: {}",
        r.text()
    );
    assert!(r.json()["error"]["message"].is_string());

    let leased = lease(&gw, json!({"max": 2, "lease_seconds": 2}));
    let ids: Vec<&str> = leased
        .iter()
        .map(|j| j["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["dev-0", "dev-1"], "oldest expiry first");
    let long = lease(&gw, json!({"max": 1, "lease_seconds": 3600}));
    assert_eq!(long[0]["device_id"], "dev-2");
    // Completing a queued job is a conflict; an unknown job is 404.
    let queued = device(&gw, "dev-3")["refresh_job"]["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        complete(&gw, &queued, json!({"outcome": "delivered"})).status,
        409
    );
    assert_eq!(
        complete(
            &gw,
            "r18446744073709551000",
            json!({"outcome": "delivered"})
        )
        .status,
        404
    );
    assert_eq!(
        complete(&gw, &queued, json!({"outcome": "maybe"})).status,
        422
    );

    gw.kill();
    let gw = Server::start(&data, FAST);
    let d2 = device(&gw, "dev-2");
    assert_eq!(d2["state"], "refresh_pending");
    assert_eq!(d2["refresh_job"]["state"], "leased", "{d2}");
    // The 2-second leases ran out across the restart: dev-0 and dev-1 are
    // queued again and come back first; dev-2 stays leased.
    std::thread::sleep(Duration::from_millis(3500));
    let again = lease(&gw, json!({"max": 10, "lease_seconds": 60}));
    let ids: Vec<&str> = again
        .iter()
        .map(|j| j["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["dev-0", "dev-1", "dev-3", "dev-4"]);
    // A delivered job waits for a new URI; a failed one is queued again.
    let j0 = again[0]["job_id"].as_str().unwrap();
    let r = complete(&gw, j0, json!({"outcome": "delivered"}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["job"]["state"], "delivered");
    let j1 = again[1]["job_id"].as_str().unwrap();
    let r = complete(&gw, j1, json!({"outcome": "failed", "status": 3}));
    assert_eq!(r.json()["job"]["state"], "queued");
    assert_eq!(r.json()["job"]["attempts"], 1);
}

#[test]
fn snapshots_take_the_jobs_from_the_queue_and_restarts_from_them_keep_every_job() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let snapshot = |gw: &Server| {
        let r = gw
            .client()
            .request("POST", "/v1/store:snapshot", None, b"")
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    };
    let jobs_of = |gw: &Server| -> Vec<(String, String)> {
        (0..5)
            .map(|i| {
                let d = device(gw, &format!("dev-{i}"));
                assert_eq!(d["state"], "refresh_pending", "{d}");
                (
                    d["refresh_job"]["job_id"].as_str().unwrap().to_owned(),
                    d["refresh_job"]["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let gw = Server::start(&data, FAST);
    for i in 0..5 {
        register(
            &gw,
            &format!("dev-{i}"),
            &format!("T{i}"),
            Some(days_ago(60 - i as u64)),
        );
    }
    for i in 0..5 {
        wait_state(&gw, &format!("dev-{i}"), "refresh_pending");
    }
    let leased = lease(&gw, json!({"max": 1, "lease_seconds": 3600}));
    assert_eq!(leased.len(), 1);
    let before = jobs_of(&gw);
    assert_eq!(snapshot(&gw)["refresh_jobs"], 5);
    gw.kill();
    // Twice: the second snapshot is cut from the queue as the first
    // restart loaded it, and the second restart loads that one alone.
    let mut gw = Server::start(&data, FAST);
    for _ in 0..2 {
        assert_eq!(jobs_of(&gw), before);
        assert_eq!(snapshot(&gw)["refresh_jobs"], 5);
        gw.kill();
        gw = Server::start(&data, FAST);
    }
    assert_eq!(jobs_of(&gw), before);
    assert_eq!(
        before.iter().filter(|(_, state)| state == "leased").count(),
        1
    );
}

#[test]
fn wns_410_opens_a_job_with_its_reason_and_the_webhook_delivers_it() {
    // A stand-in MDM webhook: answers 200 and hands back what it got.
    let hook = TcpListener::bind("127.0.0.1:0").unwrap();
    let hook_url = format!("http://{}/hooks/refresh", hook.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel::<(Vec<(String, String)>, Vec<u8>)>();
    std::thread::spawn(move || {
        for conn in hook.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut headers = Vec::new();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            loop {
                line.clear();
                r.read_line(&mut line).unwrap();
                if line.trim().is_empty() {
                    break;
                }
                let (k, v) = line.split_once(':').unwrap();
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
            let len: usize = headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .map(|(_, v)| v.parse().unwrap())
                .unwrap();
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .unwrap();
            let _ = tx.send((headers, body));
        }
    });
    let secret = "webhook-secret-1";
    let env = [
        FAST[0],
        FAST[1],
        ("WNSGATE_REFRESH__WEBHOOK_URL", hook_url.as_str()),
        ("WNSGATE_REFRESH__WEBHOOK_SECRET", secret),
    ];
    let (_dir, _sim, gw) = common::start_with_sim_env(SimConfig::default(), &env);
    register(&gw, "gone-1", "x410-gone", None);
    let r = gw
        .client()
        .request("POST", "/v1/devices/gone-1/push?wait=true", None, b"")
        .unwrap();
    assert_eq!(r.json()["result"], "channel_dead", "{}", r.text());

    let (headers, body) = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("a webhook call");
    let get = |k: &str| {
        headers
            .iter()
            .find(|(h, _)| h == k)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    let ts: u32 = get("x-wnsgate-timestamp").parse().unwrap();
    assert_eq!(
        get("x-wnsgate-signature"),
        wnsgate::lifecycle::webhook::signature(secret.as_bytes(), ts, &body)
    );
    let v: Value = serde_json::from_slice(&body).unwrap();
    let job = &v["jobs"][0];
    assert_eq!(job["device_id"], "gone-1");
    assert_eq!(job["reason"], "wns410");
    assert!(job["syncml"].as_str().unwrap().contains("Push/PFN"));

    let d = wait_state(&gw, "gone-1", "refresh_pending");
    assert_eq!(d["state_reason"], "wns410");
    let deadline = Instant::now() + Duration::from_secs(10);
    while device(&gw, "gone-1")["refresh_job"]["state"] != "delivered" {
        assert!(
            Instant::now() < deadline,
            "the webhook delivery was not recorded"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(device(&gw, "gone-1")["refresh_job"]["attempts"], 1);
}

#[test]
fn a_device_refresh_gave_up_on_is_listed_and_gets_a_new_job_when_it_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        FAST[0],
        FAST[1],
        ("WNSGATE_REFRESH__MAX_ATTEMPTS", "1"),
        ("WNSGATE_REFRESH__CONFIRM_WITHIN", "1s"),
    ];
    let gw = Server::start(&dir.path().join("data"), &env);
    register(&gw, "lost-1", "LOST", Some(days_ago(45)));
    wait_state(&gw, "lost-1", "refresh_pending");
    // Delivered at check-in, then no new URI within confirm_within: with one
    // attempt allowed, refresh gives up.
    let r = gw.client().get("/v1/devices/lost-1/refresh").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let d = wait_state(&gw, "lost-1", "unreachable");
    assert!(d["unreachable_since"].is_string(), "{d}");
    assert!(d["refresh_job"].is_null(), "{d}");
    let listed = gw
        .client()
        .get("/v1/devices?state=unreachable")
        .unwrap()
        .json();
    assert_eq!(listed["devices"][0]["device_id"], "lost-1", "{listed}");
    let metrics = gw.client().get("/metrics").unwrap().text();
    assert!(
        metrics.contains("wnsgate_refresh_giveups_total 1"),
        "{metrics}"
    );

    // It comes back: its session gets a fresh job at once.
    let r = gw.client().get("/v1/devices/lost-1/refresh").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["reason"], "age");
    let d = device(&gw, "lost-1");
    assert_eq!(d["state"], "refresh_pending", "{d}");
    assert!(d["unreachable_since"].is_null(), "{d}");
    register(&gw, "lost-1", "FOUND", None);
    assert_eq!(device(&gw, "lost-1")["state"], "active");
}

#[test]
fn a_webhook_that_times_out_or_fails_gets_the_job_again_until_it_takes_it() {
    // First call: never answered (the gateway's 1 s timeout fires); second:
    // 500; third: 200.
    let hook = TcpListener::bind("127.0.0.1:0").unwrap();
    let hook_url = format!("http://{}/refresh", hook.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for (n, conn) in hook.incoming().enumerate() {
            let Ok(mut conn) = conn else { return };
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut len = 0usize;
            let mut line = String::new();
            loop {
                line.clear();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if line.trim().is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; len];
            if r.read_exact(&mut body).is_err() {
                continue;
            }
            let _ = tx.send(serde_json::from_slice(&body).unwrap());
            match n {
                0 => std::thread::sleep(Duration::from_secs(3)),
                1 => {
                    let _ = conn.write_all(
                        b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n",
                    );
                }
                _ => {
                    let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
                }
            }
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let env = [
        FAST[0],
        FAST[1],
        ("WNSGATE_REFRESH__WEBHOOK_URL", hook_url.as_str()),
        ("WNSGATE_REFRESH__WEBHOOK_SECRET", "k"),
        ("WNSGATE_REFRESH__WEBHOOK_TIMEOUT", "1s"),
    ];
    let gw = Server::start(&dir.path().join("data"), &env);
    register(&gw, "hooked", "HOOK", Some(days_ago(33)));
    let mut seen = Vec::new();
    for _ in 0..3 {
        let call = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no webhook call; the gateway said:\n{}", gw.stderr()));
        seen.push(call["jobs"][0]["job_id"].as_str().unwrap().to_owned());
        assert_eq!(call["jobs"][0]["device_id"], "hooked");
    }
    assert!(
        seen.iter().all(|j| *j == seen[0]),
        "one job, offered again: {seen:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let d = device(&gw, "hooked");
        if d["refresh_job"]["state"] == "delivered" {
            // Failed calls are not attempts: one delivery.
            assert_eq!(d["refresh_job"]["attempts"], 1, "{d}");
            break;
        }
        assert!(Instant::now() < deadline, "never delivered: {d}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let metrics = gw.client().get("/metrics").unwrap().text();
    assert!(
        metrics.contains("wnsgate_refresh_webhook_calls_total{result=\"error\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("wnsgate_refresh_webhook_calls_total{result=\"ok\"} 1"),
        "{metrics}"
    );
}

#[test]
fn nudges_wake_devices_turning_renewal_due_and_no_others() {
    let env = [
        FAST[0],
        FAST[1],
        ("WNSGATE_LIFECYCLE__NUDGE_RENEWAL_DUE", "true"),
        ("WNSGATE_LIFECYCLE__NUDGE_PER_SECOND", "50"),
    ];
    let (_dir, sim, gw) = common::start_with_sim_env(SimConfig::default(), &env);
    let half_day_ago = |d: u64| wnsgate::core::UnixTime((now() - d * 43_200) as u32).to_rfc3339();
    register(&gw, "due", "DUE", Some(half_day_ago(31))); // 15.5 days
    register(&gw, "fresh", "FRESH", Some(half_day_ago(2)));
    register(&gw, "old", "OLD", Some(days_ago(31)));
    let deadline = Instant::now() + Duration::from_secs(20);
    let due = loop {
        let d = device(&gw, "due");
        if !d["last_push"].is_null() {
            break d;
        }
        assert!(Instant::now() < deadline, "no nudge: {d}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(due["state"], "renewal_due");
    assert_eq!(due["last_push"]["result"], "delivered", "{due}");
    // Two more sweeps: nothing else is nudged, and "due" only once.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(device(&gw, "fresh")["last_push"].is_null());
    assert!(device(&gw, "old")["last_push"].is_null());
    assert_eq!(sim.stats().pushes_total, 1);
    let metrics = gw.client().get("/metrics").unwrap().text();
    assert!(
        metrics.contains("wnsgate_lifecycle_nudges_total 1"),
        "{metrics}"
    );
}
