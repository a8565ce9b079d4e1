//! Bulk wakes through a faulty WNS: server errors, sender throttling,
//! GOAWAYs and connection resets. Every device ends with a final outcome,
//! and no channel is pushed more often than the retry policy allows.

mod common;

use common::{Server, PFN};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use wnsgate::sim::{self, Faults, Mode, SimConfig};

const DEVICES: u64 = 20_000;
/// Requests one push may cost: 4 attempts plus 3 resends of requests whose
/// connection died before answering.
const MAX_PER_CHANNEL: u64 = 7;

/// 10% server errors and a sender rate limit, plus `goaway_every` and
/// `reset_every` (counted per connection, so whichever is smaller decides).
fn run(mode: Mode, goaway_every: Option<u64>, reset_every: Option<u64>) -> (Value, sim::SimStats) {
    let dir = tempfile::tempdir().unwrap();
    let s = sim::start(SimConfig {
        mode,
        faults: Faults {
            error_ratio: 0.1,
            sender_rate: Some(20_000),
            goaway_every,
            reset_every,
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .unwrap();
    let apps = format!(
        "[{{pfn = \"{PFN}\", package_sid = \"ms-app://S-1-15-2-9\", client_secret = \"s\"}}]"
    );
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
        ],
    );
    let mut body = String::new();
    for i in 0..DEVICES {
        let line = json!({"device_id": format!("f{i:06}"), "pfn": PFN, "channel_uri": format!("https://bn1.notify.windows.com/?token=AwYAAADf{i}")});
        body.push_str(&line.to_string());
        body.push('\n');
    }
    let r = gw
        .client()
        .request(
            "POST",
            "/v1/devices:import",
            Some("application/x-ndjson"),
            body.as_bytes(),
        )
        .unwrap();
    assert_eq!(r.json()["accepted"], DEVICES);
    let r = gw
        .client()
        .send_json("POST", "/v1/pushes", &json!({"all": true}))
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["job_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(300);
    let job = loop {
        let v = gw.client().get(&format!("/v1/pushes/{id}")).unwrap().json();
        if v["state"] == "done" {
            break v;
        }
        assert!(Instant::now() < deadline, "bulk wake did not finish: {v}");
        std::thread::sleep(Duration::from_millis(100));
    };
    (job, s.stats())
}

fn check(job: &Value, st: &sim::SimStats) {
    assert_eq!(job["total"], DEVICES, "{job}");
    assert_eq!(
        job["done"], DEVICES,
        "every device needs a final outcome: {job}"
    );
    assert_eq!(job["pending"], 0, "{job}");
    // 10% errors and 4 attempts: all but about 1 in 10,000 get through.
    assert!(job["received"].as_u64().unwrap() >= DEVICES - 50, "{job}");
    assert_eq!(
        st.distinct_channels, DEVICES,
        "the simulator did not see every channel: {st:?}\njob: {job}"
    );
    assert!(
        st.max_pushes_per_channel <= MAX_PER_CHANNEL,
        "a channel was pushed {} times",
        st.max_pushes_per_channel
    );
    assert!(
        st.by_status.get(&503).copied().unwrap_or(0) + st.by_status.get(&500).copied().unwrap_or(0)
            > 0
    );
}

#[test]
fn bulk_wake_through_errors_and_goaways_over_h2() {
    let (job, st) = run(Mode::Tls, Some(997), None);
    check(&job, &st);
    assert!(st.goaways_sent > 0, "{st:?}");
    assert!(st.h2_connections > 0, "{st:?}");
}

#[test]
fn bulk_wake_through_errors_and_resets_over_h2() {
    let (job, st) = run(Mode::Tls, None, Some(1_499));
    check(&job, &st);
    assert!(st.connection_resets > 0, "{st:?}");
}

#[test]
fn bulk_wake_through_faults_over_http1_only() {
    let (job, st) = run(Mode::H1, Some(997), Some(1_499));
    check(&job, &st);
    assert!(st.http1_connections > 0 && st.h2_connections == 0, "{st:?}");
    assert!(st.goaways_sent + st.connection_resets > 0, "{st:?}");
}
