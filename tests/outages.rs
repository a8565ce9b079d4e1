//! Wakes through WNS outages, played by the simulator's outage windows: a
//! front end that resets every connection after reading its pushes and
//! before answering, or one that refuses connections. Bulk and single
//! wakes started in a two-second outage must all end `received`, each
//! channel sent no more often than the resend budget allows; in a
//! thirty-second outage, wakes end `failed` once their retry window runs
//! out, and the authority's circuit breaker opens and then closes.
//!
//! Outcomes and counts are asserted; the times are printed (run with
//! `--nocapture`), never asserted.

// Measures the times it prints on the real clock.
#![allow(clippy::disallowed_methods)]

mod common;

use common::Server;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use wnsgate::sender::limits::LOST_RESENDS_MAX;
use wnsgate::sim::{Faults, Mode, SimConfig, SimHandle, SimStats};

const AUTHORITY: &str = "db5.notify.windows.com";
/// The most requests one channel may see for one wake: the first and every
/// resend after no answer (no WNS answer in these outages asks for a retry).
const SENDS_PER_WAKE_MAX: u64 = 1 + LOST_RESENDS_MAX as u64;

/// Which outage.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// Connections reset after the pushes were read, before answering.
    Reset,
    /// Connections refused.
    Refuse,
}

impl Kind {
    fn faults(self, ms: u64) -> Faults {
        let window = Some(format!("0-{ms}").parse().unwrap());
        match self {
            Kind::Reset => Faults {
                reset_window_ms: window,
                ..Faults::default()
            },
            Kind::Refuse => Faults {
                refuse_window_ms: window,
                ..Faults::default()
            },
        }
    }
}

/// A gateway sending to a simulator, with its token fetched and a
/// connection open before any outage (the simulator also serves the
/// tokens: a refused port would refuse them too).
fn start(env: &[(&str, &str)]) -> (tempfile::TempDir, SimHandle, Server) {
    start_in(Mode::Tls, env)
}

/// [`start`] with the simulator speaking `mode`.
fn start_in(mode: Mode, env: &[(&str, &str)]) -> (tempfile::TempDir, SimHandle, Server) {
    let cfg = SimConfig {
        mode,
        ..SimConfig::default()
    };
    let (dir, sim, gw) = common::start_with_sim_env(cfg, env);
    register(&gw, "warm", "AwYAAADwarm");
    let r = common::push_wait(&gw, "warm");
    assert_eq!(r["result"], "delivered", "{r}");
    (dir, sim, gw)
}

fn register(gw: &Server, id: &str, token: &str) {
    let r = gw
        .client()
        .send_json(
            "PUT",
            &format!("/v1/devices/{id}/channel"),
            &common::channel_body(&common::uri(token)),
        )
        .unwrap();
    assert!(r.status == 201 || r.status == 200, "{}", r.text());
}

/// `n` devices, `o00000`..., registered through the import.
fn fleet(gw: &Server, n: u64) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|i| format!("o{i:05}")).collect();
    let list = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.clone(), format!("AwYAAADout{i}")));
    assert_eq!(common::import_tokens(gw, AUTHORITY, list), n);
    ids
}

/// Starts a bulk wake of `ids`; answers its job id.
fn start_bulk(gw: &Server, ids: &[String]) -> String {
    let r = gw
        .client()
        .send_json("POST", "/v1/pushes", &json!({ "device_ids": ids }))
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    r.json()["job_id"].as_str().unwrap().to_owned()
}

fn bulk(gw: &Server, ids: &[String]) -> Value {
    let id = start_bulk(gw, ids);
    common::wait_job(gw, &id, Duration::from_secs(180))
}

fn metrics(gw: &Server) -> String {
    gw.client().get("/metrics").unwrap().text()
}

/// One series of a scrape (`name{labels}` as rendered); 0 when absent.
fn metric(scrape: &str, series: &str) -> u64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// The authority's breaker in `GET /v1/stats`.
fn breaker(gw: &Server) -> Value {
    let stats = gw.client().get("/v1/stats").unwrap().json();
    stats["wns_breakers"][AUTHORITY].clone()
}

fn breaker_series(name: &str) -> String {
    format!("{name}{{authority=\"{AUTHORITY}\"}}")
}

/// `times pushed -> channels`, as printed.
fn sends(st: &SimStats) -> String {
    st.pushes_histogram
        .iter()
        .map(|(times, channels)| format!("{channels} channel(s) {times}x"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What every run through a short outage must show: the outage happened,
/// each channel saw at most the resend budget, and every push the
/// simulator processed and did not answer was counted as a possible
/// duplicate.
fn check_sends(kind: Kind, wakes: u64, st: &SimStats, scrape: &str) {
    assert!(st.max_pushes_per_channel <= SENDS_PER_WAKE_MAX, "{st:?}");
    assert_eq!(st.delivered_channels, wakes, "{st:?}");
    let duplicates = metric(
        scrape,
        "wnsgate_push_possible_duplicates_total{reason=\"connection_lost\"}",
    );
    match kind {
        Kind::Reset => {
            assert!(st.outage_resets >= 1, "no outage happened: {st:?}");
            // Each channel was answered `received` once; what else it
            // saw were pushes read and left unanswered, each resent as a
            // possible duplicate.
            assert_eq!(
                st.pushes_total,
                wakes + st.outage_unanswered_pushes,
                "{st:?}"
            );
            assert!(
                duplicates >= st.outage_unanswered_pushes,
                "{duplicates} {st:?}"
            );
        }
        Kind::Refuse => {
            assert!(
                st.outage_refusals + st.outage_resets >= 1,
                "no outage happened: {st:?}"
            );
            // Nothing was read during the outage: every channel saw its
            // push once. (A request written on a connection opened before
            // the outage and reset unread is still counted as a possible
            // duplicate: the gateway cannot know it was not read.)
            assert_eq!(st.pushes_total, wakes, "{st:?}");
            assert_eq!(st.max_pushes_per_channel, 1, "{st:?}");
            let _ = duplicates;
        }
    }
}

const FLEET: u64 = 1_000;
const SHORT_OUTAGE_MS: u64 = 2_000;

fn bulk_wake_through_a_short_outage(kind: Kind, mode: Mode, devices: u64) {
    let (_dir, sim, gw) = start_in(mode, &[]);
    let ids = fleet(&gw, devices);
    sim.reset_stats();
    let before = metrics(&gw);
    let t0 = Instant::now();
    sim.set_faults(kind.faults(SHORT_OUTAGE_MS)).unwrap();
    let job = bulk(&gw, &ids);
    let took = t0.elapsed();
    let st = sim.stats();
    let scrape = metrics(&gw);
    let b = breaker(&gw);
    eprintln!(
        "{kind:?} outage of {SHORT_OUTAGE_MS} ms ({}), bulk wake of {devices}: received {}, failed {}, \
         done {:.2} s after the outage began ({:+.2} s after it ended); sends per channel: {}; \
         simulator: {} connections reset, {} refused, {} pushes read and left unanswered; \
         breaker opened {} time(s), now {}; resends: {} connection_lost, possible duplicates {}",
        mode.name(),
        job["received"],
        job["failed"],
        took.as_secs_f64(),
        took.as_secs_f64() - SHORT_OUTAGE_MS as f64 / 1000.0,
        sends(&st),
        st.outage_resets,
        st.outage_refusals,
        st.outage_unanswered_pushes,
        metric(&scrape, &breaker_series("wnsgate_wns_breaker_opened_total")),
        b["state"],
        metric(
            &scrape,
            "wnsgate_wns_resends_total{reason=\"connection_lost\"}"
        ) - metric(
            &before,
            "wnsgate_wns_resends_total{reason=\"connection_lost\"}"
        ),
        metric(
            &scrape,
            "wnsgate_push_possible_duplicates_total{reason=\"connection_lost\"}"
        ),
    );
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["total"], devices, "{job}");
    assert_eq!(job["received"], devices, "{job}");
    assert_eq!(job["failed"], 0, "{job}");
    assert_eq!(st.distinct_channels, devices, "{st:?}");
    check_sends(kind, devices, &st, &scrape);
    assert_eq!(b["state"], "closed", "{b}");
    assert_eq!(
        metric(&scrape, &breaker_series("wnsgate_wns_breaker_state")),
        0
    );
}

#[test]
fn a_bulk_wake_through_two_seconds_of_connection_resets_wakes_every_device() {
    bulk_wake_through_a_short_outage(Kind::Reset, Mode::Tls, FLEET);
}

#[test]
fn a_bulk_wake_through_two_seconds_of_refused_connects_wakes_every_device() {
    bulk_wake_through_a_short_outage(Kind::Refuse, Mode::Tls, FLEET);
}

#[test]
fn a_bulk_wake_over_http1_through_two_seconds_of_connection_resets_wakes_every_device() {
    // One request per connection at a time: every send in the outage is
    // a connection of its own that dies.
    bulk_wake_through_a_short_outage(Kind::Reset, Mode::H1, 300);
}

fn single_wake_through_a_short_outage(kind: Kind) {
    let (_dir, sim, gw) = start(&[]);
    register(&gw, "single", "AwYAAADsingle");
    sim.reset_stats();
    let t0 = Instant::now();
    sim.set_faults(kind.faults(SHORT_OUTAGE_MS)).unwrap();
    let r = common::push_wait(&gw, "single");
    let took = t0.elapsed();
    let st = sim.stats();
    let scrape = metrics(&gw);
    eprintln!(
        "{kind:?} outage of {SHORT_OUTAGE_MS} ms, one ?wait=true wake: {} after {:.2} s ({:+.2} s \
         after the outage ended), attempts {}; sends to its channel: {}; breaker opened {} time(s), now {}",
        r["result"],
        took.as_secs_f64(),
        took.as_secs_f64() - SHORT_OUTAGE_MS as f64 / 1000.0,
        r["attempts"],
        sends(&st),
        metric(&scrape, &breaker_series("wnsgate_wns_breaker_opened_total")),
        breaker(&gw)["state"],
    );
    assert_eq!(r["result"], "delivered", "{r}");
    assert_eq!(r["wns_outcome"], "received", "{r}");
    assert_eq!(st.distinct_channels, 1, "{st:?}");
    check_sends(kind, 1, &st, &scrape);
    assert_eq!(breaker(&gw)["state"], "closed");
}

#[test]
fn a_single_wake_through_two_seconds_of_connection_resets_is_delivered() {
    single_wake_through_a_short_outage(Kind::Reset);
}

#[test]
fn a_single_wake_through_two_seconds_of_refused_connects_is_delivered() {
    single_wake_through_a_short_outage(Kind::Refuse);
}

#[test]
fn wakes_in_a_long_outage_fail_when_their_window_runs_out_and_the_breaker_opens_then_closes() {
    const OUTAGE_MS: u64 = 30_000;
    const DEVICES: u64 = 200;
    let (_dir, sim, gw) = start(&[("WNSGATE_WNS__RETRY_WINDOW", "5s")]);
    let ids = fleet(&gw, DEVICES);
    register(&gw, "single", "AwYAAADsingle");
    sim.reset_stats();
    let t0 = Instant::now();
    sim.set_faults(Kind::Reset.faults(OUTAGE_MS)).unwrap();
    let job = bulk(&gw, &ids);
    let job_took = t0.elapsed();
    let single = common::push_wait(&gw, "single");
    let single_took = t0.elapsed() - job_took;
    let during = breaker(&gw);
    let scrape = metrics(&gw);
    let st = sim.stats();
    let exhausted = metric(
        &scrape,
        "wnsgate_pushes_total{result=\"retry_window_exhausted\"}",
    );
    let lost = metric(&scrape, "wnsgate_pushes_total{result=\"connection_lost\"}");
    eprintln!(
        "{OUTAGE_MS} ms outage, wns.retry_window 5 s: bulk wake of {DEVICES} done after {:.2} s \
         (received {}, failed {}); ?wait=true wake: {} after {:.2} s: {}; results: {exhausted} \
         retry_window_exhausted, {lost} connection_lost; sends per channel: {}; breaker {} after \
         opening {} time(s), {} connection failures in a row",
        job_took.as_secs_f64(),
        job["received"],
        job["failed"],
        single["result"],
        single_took.as_secs_f64(),
        single["error"],
        sends(&st),
        during["state"],
        during["times_opened"],
        during["consecutive_failures"],
    );
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["received"], 0, "{job}");
    assert_eq!(job["failed"], DEVICES, "{job}");
    assert_eq!(single["result"], "retry_window_exhausted", "{single}");
    let error = single["error"].as_str().unwrap_or_default();
    assert!(error.contains("wns.retry_window (5 s)"), "{single}");
    // Every wake ended on its window, or on its resend budget if it went
    // out as the breaker's probe often enough.
    assert_eq!(exhausted + lost, DEVICES + 1, "{scrape}");
    assert!(exhausted >= 1, "{scrape}");
    assert!(st.max_pushes_per_channel <= SENDS_PER_WAKE_MAX, "{st:?}");
    // Most wakes waited for the breaker instead of spending their resends.
    assert!(st.pushes_total < DEVICES * 2, "{st:?}");
    assert_ne!(during["state"], "closed", "{during}");
    assert!(during["times_opened"].as_u64().unwrap() >= 1, "{during}");
    assert!(
        metric(&scrape, &breaker_series("wnsgate_wns_breaker_state")) >= 1,
        "{scrape}"
    );
    assert!(metric(&scrape, &breaker_series("wnsgate_wns_breaker_opened_total")) >= 1);
    // /readyz stays 200: the API works while WNS is out.
    assert_eq!(gw.client().get("/readyz").unwrap().status, 200);

    // The outage ends; the next wake probes, is delivered, and closes the
    // breaker.
    let end = t0 + Duration::from_millis(OUTAGE_MS);
    std::thread::sleep(end.saturating_duration_since(Instant::now()) + Duration::from_millis(200));
    let after = common::push_wait(&gw, "single");
    let recovered = end.elapsed();
    let closed = breaker(&gw);
    let scrape = metrics(&gw);
    eprintln!(
        "after the outage: the next wake {} {:.2} s after its end; breaker {}",
        after["result"],
        recovered.as_secs_f64(),
        closed["state"],
    );
    assert_eq!(after["result"], "delivered", "{after}");
    assert_eq!(closed["state"], "closed", "{closed}");
    assert_eq!(
        metric(&scrape, &breaker_series("wnsgate_wns_breaker_state")),
        0
    );
    let log = gw.stderr();
    assert!(log.contains("WNS circuit breaker opened"), "{log}");
    assert!(log.contains("WNS circuit breaker closed"), "{log}");
}

#[test]
fn a_bulk_wake_goes_on_with_its_other_devices_while_some_wait_for_their_retry() {
    // 20 channels WNS throttles (`channelthrottled`: retried after 60 s)
    // among 500 that it answers: the throttled wakes wait inside the
    // shard's batch, holding their in-flight permits, and every other
    // device is woken meanwhile.
    const WAITING: u64 = 20;
    const OTHERS: u64 = 500;
    let (_dir, sim, gw) = start(&[]);
    let mut ids: Vec<String> = (0..WAITING).map(|i| format!("t{i:03}")).collect();
    let throttled = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.clone(), format!("xthrottle-{i}")));
    assert_eq!(common::import_tokens(&gw, AUTHORITY, throttled), WAITING);
    ids.extend(fleet(&gw, OTHERS));
    sim.reset_stats();
    let t0 = Instant::now();
    let id = start_bulk(&gw, &ids);
    // A hang guard only: the throttled wakes wait a minute, the others are
    // done long before.
    let deadline = t0 + Duration::from_secs(50);
    let job = loop {
        let job = gw.client().get(&format!("/v1/pushes/{id}")).unwrap().json();
        if job["received"] == OTHERS {
            break job;
        }
        assert!(
            Instant::now() < deadline,
            "the other devices are not woken: {job}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let st = sim.stats();
    eprintln!(
        "bulk wake of {} with {WAITING} throttled channels: the {OTHERS} others received after {:.2} s \
         while {} wakes wait for their retry; simulator: {} channelthrottled answers",
        WAITING + OTHERS,
        t0.elapsed().as_secs_f64(),
        job["pending"],
        st.outcome("channel_throttled"),
    );
    assert_eq!(job["state"], "running", "{job}");
    assert_eq!(job["pending"], WAITING, "{job}");
    assert_eq!(job["failed"], 0, "{job}");
    // Each throttled channel was sent its wake once, and waits.
    assert_eq!(st.outcome("channel_throttled"), WAITING, "{st:?}");
    assert_eq!(st.distinct_channels, WAITING + OTHERS, "{st:?}");
    assert_eq!(st.max_pushes_per_channel, 1, "{st:?}");
}
