//! Bulk wakes through a faulty WNS: server errors, sender throttling,
//! GOAWAYs and connection resets. Every device ends with a final outcome,
//! and no channel is pushed more often than the retry policy allows.

mod common;

use serde_json::{json, Value};
use std::time::Duration;
use wnsgate::sim::{self, Faults, Mode, SimConfig};

const DEVICES: u64 = 20_000;
/// Requests one push may cost: 4 attempts plus 5 resends of requests whose
/// connection died before answering.
const MAX_PER_CHANNEL: u64 = 9;

/// 10% server errors and a sender rate limit, plus `goaway_every` and
/// `reset_every` (counted per connection, so whichever is smaller decides).
fn run(mode: Mode, goaway_every: Option<u64>, reset_every: Option<u64>) -> (Value, sim::SimStats) {
    let (_dir, s, gw) = common::start_with_sim(SimConfig {
        mode,
        faults: Faults {
            error_ratio: 0.1,
            sender_rate: Some(20_000),
            goaway_every,
            reset_every,
            ..Faults::default()
        },
        ..SimConfig::default()
    });
    let devices = (0..DEVICES).map(|i| (format!("f{i:06}"), format!("AwYAAADf{i}")));
    assert_eq!(
        common::import_tokens(&gw, "bn1.notify.windows.com", devices),
        DEVICES
    );
    let r = gw
        .client()
        .send_json("POST", "/v1/pushes", &json!({"all": true}))
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["job_id"].as_str().unwrap().to_owned();
    let mut job = common::wait_job(&gw, &id, Duration::from_secs(300));
    // The gateway's own account, for a failure message.
    let metrics = gw.client().get("/metrics").unwrap().text();
    job["gateway_results"] = metrics
        .lines()
        .filter(|l| {
            l.starts_with("wnsgate_pushes_total") || l.starts_with("wnsgate_wns_resends_total")
        })
        .collect::<Vec<_>>()
        .into();
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
