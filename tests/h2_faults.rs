//! Bulk wakes through a WNS front end with HTTP/2 behaviours a sender must
//! cope with, played by the simulator's h2 fault modes: stream windows of
//! one or two bytes opened only by what the server read, header table size
//! flips, and streams reset by code. Each checks the outcome counts, the
//! sends each channel saw and the connections the gateway used.

mod common;

use common::Server;
use serde_json::{json, Value};
use std::time::Duration;
use wnsgate::sender::limits::{LOST_RESENDS_MAX, POOL_CONNECTIONS_MAX};
use wnsgate::sim::{Faults, SimConfig, SimStats};

/// Shards of a test gateway (see `common::Server::launch`).
const SHARDS: u64 = 2;
/// The most connections a bulk wake can hold open at once: one pool per
/// shard for the one WNS authority.
const CONNECTIONS_AT_ONCE: u64 = SHARDS * POOL_CONNECTIONS_MAX as u64;

/// A bulk wake of `devices` devices through a simulator with `faults`.
struct Run {
    job: Value,
    sim: SimStats,
    /// The gateway's `/metrics` after the bulk wake.
    metrics: String,
    /// A `?wait=true` wake of one more device, after the bulk wake (not in
    /// `sim` or `metrics`).
    single: Value,
}

fn run(devices: u64, faults: Faults) -> Run {
    run_with(
        devices,
        SimConfig {
            faults,
            ..SimConfig::default()
        },
    )
}

fn run_with(devices: u64, cfg: SimConfig) -> Run {
    let (_dir, s, gw) = common::start_with_sim(cfg);
    let list = (0..devices).map(|i| (format!("h{i:05}"), format!("AwYAAADh2{i}")));
    assert_eq!(
        common::import_tokens(&gw, "db5.notify.windows.com", list),
        devices
    );
    let r = gw
        .client()
        .send_json("POST", "/v1/pushes", &json!({"all": true}))
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["job_id"].as_str().unwrap().to_owned();
    let job = common::wait_job(&gw, &id, Duration::from_secs(120));
    let sim = s.stats();
    let metrics = gw.client().get("/metrics").unwrap().text();
    let single = wake_one(&gw);
    Run {
        job,
        sim,
        metrics,
        single,
    }
}

/// Registers one more device and wakes it with `?wait=true`.
fn wake_one(gw: &Server) -> Value {
    let r = gw
        .client()
        .send_json(
            "PUT",
            "/v1/devices/single/channel",
            &common::channel_body(&common::uri("AwYAAADsingle")),
        )
        .unwrap();
    assert!(r.status == 201 || r.status == 200, "{}", r.text());
    let r = gw
        .client()
        .request("POST", "/v1/devices/single/push?wait=true", None, b"")
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

impl Run {
    /// One series of the gateway's scrape (`name{labels}` as rendered); 0
    /// when the series does not exist.
    fn metric(&self, series: &str) -> u64 {
        self.metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0)
    }

    /// Every device has its final outcome.
    fn check_done(&self, devices: u64) {
        let job = &self.job;
        assert_eq!(job["state"], "done", "{job}");
        assert_eq!(job["total"], devices, "{job}");
        assert_eq!(job["done"], devices, "{job}");
        assert_eq!(job["pending"], 0, "{job}");
    }

    /// Every device woken once: delivered, seen once by its channel, and
    /// nothing sent again.
    fn check_each_delivered_once(&self, devices: u64) {
        self.check_done(devices);
        assert_eq!(self.job["received"], devices, "{}", self.job);
        let st = &self.sim;
        assert_eq!(st.distinct_channels, devices, "{st:?}");
        assert_eq!(st.max_pushes_per_channel, 1, "{st:?}");
        assert_eq!(st.delivered_channels, devices, "{st:?}");
        assert_eq!(st.outcome("received"), devices, "{st:?}");
        for reason in ["connection_lost", "stream_refused", "stream_reset"] {
            let series = format!("wnsgate_wns_resends_total{{reason=\"{reason}\"}}");
            assert_eq!(self.metric(&series), 0, "{series}");
        }
        assert_eq!(
            self.metric("wnsgate_pushes_total{result=\"timeout\"}"),
            0,
            "{}",
            self.metrics
        );
        assert_eq!(self.single["result"], "delivered", "{}", self.single);
    }

    /// The gateway used no more connections than its pools hold at once:
    /// none was given up for a fault that concerned one stream.
    fn check_connections(&self) {
        let st = &self.sim;
        assert!(st.h2_connections >= 1, "{st:?}");
        assert!(
            st.h2_connections <= CONNECTIONS_AT_ONCE,
            "{} h2 connections for one bulk wake: {st:?}",
            st.h2_connections
        );
        assert_eq!(st.connection_resets + st.goaways_sent, 0, "{st:?}");
    }
}

const DEVICES: u64 = 300;

/// The stream window is 1 or 2 bytes and the server opens it again only
/// by what it read: every 4-byte body goes out in 2 or 4 DATA frames.
fn tiny_window(bytes: u32) {
    let r = run(
        DEVICES,
        Faults {
            h2_stream_window: Some(bytes),
            ..Faults::default()
        },
    );
    r.check_each_delivered_once(DEVICES);
    r.check_connections();
    eprintln!(
        "{bytes}-byte window: {} h2 connections for {DEVICES} wakes",
        r.sim.h2_connections
    );
}

#[test]
fn bodies_go_through_a_two_byte_window_opened_only_by_what_was_read() {
    tiny_window(2);
}

#[test]
fn bodies_go_through_a_one_byte_window_opened_only_by_what_was_read() {
    tiny_window(1);
}

#[test]
fn header_table_size_flips_are_signalled_smallest_first() {
    // Few streams at once, so most requests go out after the flips that
    // answers to earlier ones brought.
    let r = run_with(
        DEVICES,
        SimConfig {
            faults: Faults {
                header_table_flip_every: Some(10),
                ..Faults::default()
            },
            max_concurrent_streams: 8,
            ..SimConfig::default()
        },
    );
    r.check_each_delivered_once(DEVICES);
    r.check_connections();
    let st = &r.sim;
    // 300 streams over at most 8 connections: dozens of flips, and a
    // checked header block after each one the client acknowledged.
    assert!(
        st.header_table_flips >= DEVICES / 10 - CONNECTIONS_AT_ONCE,
        "{st:?}"
    );
    assert!(
        st.table_flips_signalled >= st.header_table_flips / 2,
        "{st:?}"
    );
    assert_eq!(st.table_size_violations, 0, "{st:?}");
    eprintln!(
        "{} flips, {} header blocks signalled them, {} h2 connections",
        st.header_table_flips, st.table_flips_signalled, st.h2_connections
    );
}

#[test]
fn streams_reset_by_code_fail_only_themselves_and_are_resent_by_the_rule() {
    let base = run(DEVICES, Faults::default());
    base.check_each_delivered_once(DEVICES);
    let r = run(
        DEVICES,
        Faults {
            refused_stream_every: Some(5),
            internal_error_every: Some(7),
            ..Faults::default()
        },
    );
    eprintln!(
        "h2 connections for {DEVICES} wakes: {} without resets, {} with REFUSED_STREAM every 5th and INTERNAL_ERROR every 7th stream",
        base.sim.h2_connections, r.sim.h2_connections
    );
    r.check_done(DEVICES);
    // A reset stream leaves its connection in the pool.
    r.check_connections();
    let (st, job) = (&r.sim, &r.job);
    assert!(st.streams_refused > 0 && st.streams_reset > 0, "{st:?}");
    // A device fails only when its resends run out: a few in a thousand.
    let received = job["received"].as_u64().unwrap();
    assert!(received >= DEVICES - DEVICES / 50, "{job}");
    assert_eq!(received + job["failed"].as_u64().unwrap(), DEVICES, "{job}");
    // Every stream without an answer was either sent again or ended its
    // wake as connection_lost.
    let refused_resends = r.metric("wnsgate_wns_resends_total{reason=\"stream_refused\"}");
    let reset_resends = r.metric("wnsgate_wns_resends_total{reason=\"stream_reset\"}");
    let lost = r.metric("wnsgate_pushes_total{result=\"connection_lost\"}");
    assert_eq!(
        refused_resends + reset_resends + lost,
        st.streams_refused + st.streams_reset,
        "{st:?}\n{}",
        r.metrics
    );
    assert_eq!(lost, DEVICES - received, "{}", r.metrics);
    // Refused streams were never processed; the reset ones were, so each
    // of their resends is a possible duplicate, and counted as one.
    assert_eq!(
        r.metric("wnsgate_push_possible_duplicates_total{reason=\"stream_reset\"}"),
        reset_resends,
        "{}",
        r.metrics
    );
    assert_eq!(
        r.metric("wnsgate_push_possible_duplicates_total{reason=\"connection_lost\"}"),
        0
    );
    // What each channel saw: every processed push was answered or reset,
    // and no device was woken more often than the resend budget allows.
    assert_eq!(st.distinct_channels, DEVICES, "{st:?}");
    assert_eq!(st.pushes_total, received + st.streams_reset, "{st:?}");
    assert!(
        st.max_pushes_per_channel <= 1 + u64::from(LOST_RESENDS_MAX),
        "{st:?}"
    );
    assert!(st.max_pushes_per_channel >= 2, "{st:?}");
    let pushes: u64 = st.pushes_histogram.iter().map(|(n, c)| n * c).sum();
    assert_eq!(pushes, st.pushes_total, "{st:?}");
}
