//! SIGKILL at an arbitrary moment loses no acknowledged registration: not
//! while writes flow, not while snapshots are cut, not while the log
//! rotates to a new segment. A bulk wake goes on from its checkpoint after
//! SIGKILL or SIGTERM.

// Measures its own waits and hang guards on the real clock; the rule that
// time is read only through `wnsgate::clock` (clippy.toml) is the gateway's.
#![allow(clippy::disallowed_methods)]

mod common;

use common::{channel_body, uri, Server};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Per device: every URI sent, in order, and how many of them were acked.
type Log = HashMap<String, (Vec<String>, usize)>;

/// One writer thread's history, kept across kill/restart rounds.
#[derive(Default)]
struct Writer {
    log: Log,
    /// Writes sent so far (the next write's number).
    sent: u64,
}

/// How the kill/restart rounds are run.
struct Plan<'a> {
    /// Environment the gateway is started with, every time.
    env: &'a [(&'a str, &'a str)],
    /// Kill/restart rounds.
    rounds: usize,
    /// Writer threads.
    writers: usize,
    /// Acknowledged writes per round before the kill.
    acks_per_round: usize,
    /// After those, the moment of each round's kill (cycled through).
    kill_at: &'a [Moment],
    /// Bytes of padding in each channel URI's token, so the log grows fast.
    uri_padding: usize,
}

/// When, after a round's acknowledged writes, the gateway is killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Moment {
    /// At once.
    Now,
    /// While a snapshot is being written (a `.tmp` file is in
    /// `<data>/snapshots/`).
    SnapshotBeingWritten,
    /// Right after a snapshot was cut (a `.snap` file not there before
    /// appeared; the log it covers and the snapshot before it are being
    /// deleted).
    SnapshotJustCut,
    /// Right after the log started a new segment file.
    SegmentJustStarted,
}

fn names(dir: &Path, ext: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(ext))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Waits (while the writers go on) until `moment` has come; panics when it
/// does not come within 15 s.
fn wait_for(moment: Moment, data: &Path) {
    let (dir, ext) = match moment {
        Moment::Now => return,
        Moment::SnapshotBeingWritten => (data.join("snapshots"), ".tmp"),
        Moment::SnapshotJustCut => (data.join("snapshots"), ".snap"),
        Moment::SegmentJustStarted => (data.join("log"), ".log"),
    };
    let before = names(&dir, ext);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = names(&dir, ext);
        if now.iter().any(|n| !before.contains(n)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{moment:?} did not come within 15 s: no new {ext} file in {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// What was on disk, and in the gateway's metrics, at a kill.
#[derive(Debug)]
struct AtKill {
    /// When the kill came.
    moment: Moment,
    /// `.snap` files in `<data>/snapshots/` (counted right after the kill).
    snapshot_files: usize,
    /// `.log` files in `<data>/log/` (counted right after the kill).
    log_segments: usize,
    /// `.tmp` files in `<data>/snapshots/`: a cut the kill interrupted.
    unfinished_snapshots: usize,
    /// Snapshots the killed process had cut before the round's last
    /// [`Moment`] was waited for (`wnsgate_store_snapshot_seconds_count`).
    snapshots_cut: u64,
}

fn files_ending(dir: &Path, ext: &str) -> usize {
    names(dir, ext).len()
}

/// The value of the unlabelled metric `name` on `/metrics`.
fn metric(server: &Server, name: &str) -> Option<f64> {
    let r = server.client().get("/metrics").ok()?;
    r.text().lines().find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        if n == name {
            v.trim().parse().ok()
        } else {
            None
        }
    })
}

/// Writes from `plan.writers` threads until `plan.acks_per_round` more
/// writes were acknowledged and the round's [`Moment`] has come, then
/// SIGKILLs the gateway; `plan.rounds` times, restarting on the same data
/// directory each time and writing on (later rounds also update devices of
/// earlier ones). After each restart, checks every acknowledged
/// registration byte-exact. Returns what was seen at each kill.
fn survive_sigkills(plan: &Plan) -> Vec<AtKill> {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let padding = "x".repeat(plan.uri_padding);
    let mut writers: Vec<Writer> = (0..plan.writers).map(|_| Writer::default()).collect();
    let mut seen = Vec::new();
    let mut server = Server::start(&data, plan.env);
    for round in 0..plan.rounds {
        let url = server.url();
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = std::mem::take(&mut writers)
            .into_iter()
            .enumerate()
            .map(|(w, mut state)| {
                let (url, stop, acked) = (url.clone(), stop.clone(), acked.clone());
                let padding = padding.clone();
                std::thread::spawn(move || {
                    let mut c = wnsgate::client::Client::new(&url)
                        .unwrap()
                        .with_timeout(Duration::from_secs(5));
                    while !stop.load(Ordering::Relaxed) {
                        let i = state.sent;
                        // Every third write updates an earlier device (from
                        // this round or one before it) with a new URI.
                        let dev = if i % 3 == 2 {
                            format!("w{w}-{}", i / 2)
                        } else {
                            format!("w{w}-{i}")
                        };
                        let u = uri(&format!("{dev}-gen{i}-{padding}"));
                        let entry = state.log.entry(dev.clone()).or_default();
                        entry.0.push(u.clone());
                        state.sent += 1;
                        match c.send_json(
                            "PUT",
                            &format!("/v1/devices/{dev}/channel"),
                            &channel_body(&u),
                        ) {
                            Ok(r) if r.status == 200 || r.status == 201 => {
                                entry.1 = entry.0.len();
                                acked.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(r) => panic!("unexpected answer {}: {}", r.status, r.text()),
                            Err(_) => break, // the server died mid-request
                        }
                    }
                    state
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        while acked.load(Ordering::Relaxed) < plan.acks_per_round {
            assert!(
                threads.iter().any(|t| !t.is_finished()),
                "every writer stopped in round {round}"
            );
            assert!(
                Instant::now() < deadline,
                "round {round}: only {} writes acknowledged within 60 s",
                acked.load(Ordering::Relaxed)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let moment = plan.kill_at[round % plan.kill_at.len()];
        let snapshots_cut =
            metric(&server, "wnsgate_store_snapshot_seconds_count").unwrap_or(0.0) as u64;
        wait_for(moment, &data);
        server.kill();
        seen.push(AtKill {
            moment,
            snapshot_files: files_ending(&data.join("snapshots"), ".snap"),
            log_segments: files_ending(&data.join("log"), ".log"),
            unfinished_snapshots: files_ending(&data.join("snapshots"), ".tmp"),
            snapshots_cut,
        });
        stop.store(true, Ordering::Relaxed);
        writers = threads.into_iter().map(|t| t.join().unwrap()).collect();

        server = Server::start(&data, plan.env);
        check_acknowledged(&server, &writers, round);
    }
    eprintln!("at each kill: {seen:?}");
    seen
}

/// Every acknowledged registration is there with its last acknowledged URI
/// (or one sent after it whose answer was lost to the kill).
fn check_acknowledged(server: &Server, writers: &[Writer], round: usize) {
    let mut c = server.client();
    let mut checked = 0;
    for w in writers {
        for (dev, (sent, acked_n)) in &w.log {
            let r = c.get(&format!("/v1/devices/{dev}")).unwrap();
            if *acked_n == 0 {
                // Never acknowledged: may or may not be there, but if it is,
                // it holds a URI that was sent for it.
                if r.status == 200 {
                    let got = r.json()["channel_uri"].as_str().unwrap().to_owned();
                    assert!(sent.contains(&got), "{dev}: {got} was never sent");
                }
                continue;
            }
            assert_eq!(
                r.status, 200,
                "acknowledged device {dev} is missing after SIGKILL {round}"
            );
            let got = r.json()["channel_uri"].as_str().unwrap().to_owned();
            assert!(
                sent[acked_n - 1..].contains(&got),
                "{dev}: {got} is not the last acknowledged URI (or a later one) after SIGKILL {round}"
            );
            checked += 1;
        }
    }
    let acked_total: usize = writers
        .iter()
        .flat_map(|w| w.log.values())
        .filter(|(_, n)| *n > 0)
        .count();
    assert_eq!(checked, acked_total);
}

#[test]
fn every_acknowledged_registration_survives_sigkill() {
    let seen = survive_sigkills(&Plan {
        env: &[],
        rounds: 1,
        writers: 4,
        acks_per_round: 400,
        kill_at: &[Moment::Now],
        uri_padding: 0,
    });
    assert_eq!(seen.len(), 1);
}

#[test]
fn every_acknowledged_registration_survives_sigkill_during_snapshot_cuts() {
    let seen = survive_sigkills(&Plan {
        env: &[("WNSGATE_STORE__SNAPSHOT_LOG_MB", "1")],
        rounds: 3,
        writers: 8,
        acks_per_round: 3_000,
        kill_at: &[
            Moment::SnapshotBeingWritten,
            Moment::SnapshotJustCut,
            Moment::Now,
        ],
        uri_padding: 1_000,
    });
    assert!(
        seen.iter()
            .all(|s| s.snapshots_cut > 0 && s.snapshot_files > 0),
        "a round ended before a snapshot was cut: {seen:?}"
    );
    assert!(
        seen.iter()
            .any(|s| s.moment == Moment::SnapshotBeingWritten && s.unfinished_snapshots > 0),
        "no kill interrupted a snapshot being written: {seen:?}"
    );
}

#[test]
fn every_acknowledged_registration_survives_sigkill_during_log_rotation() {
    let seen = survive_sigkills(&Plan {
        env: &[
            ("WNSGATE_STORE__LOG_SEGMENT_MB", "1"),
            ("WNSGATE_STORE__SNAPSHOT_LOG_MB", "4096"),
        ],
        rounds: 3,
        writers: 8,
        acks_per_round: 2_000,
        kill_at: &[Moment::SegmentJustStarted, Moment::Now],
        uri_padding: 1_000,
    });
    assert!(
        seen.iter()
            .all(|s| s.snapshots_cut == 0 && s.snapshot_files == 0),
        "a snapshot was cut, the log should only have rotated: {seen:?}"
    );
    for (round, s) in seen.iter().enumerate() {
        assert!(
            s.log_segments > round + 1,
            "round {round}: only {} log segment(s) before the kill; the log did not rotate",
            s.log_segments
        );
    }
}

/// A bulk wake goes on from its checkpoint after the gateway is killed
/// (SIGKILL) and after it is stopped (SIGTERM): every device is woken at
/// least once and at most twice, and the job, known by the same id, ends
/// counting each device once.
#[test]
fn a_bulk_wake_goes_on_after_sigkill_and_after_sigterm() {
    const DEVICES: u64 = 4000;
    for kill in [true, false] {
        let (dir, sim, gw) = common::start_with_sim(wnsgate::sim::SimConfig::default());
        let list = (0..DEVICES).map(|i| (format!("b{i:05}"), format!("AwYAAADb{i}")));
        assert_eq!(
            common::import_tokens(&gw, "db5.notify.windows.com", list),
            DEVICES
        );
        let r = gw
            .client()
            .send_json(
                "POST",
                "/v1/pushes",
                &serde_json::json!({"all": true, "rate_per_second": 800}),
            )
            .unwrap();
        assert_eq!(r.status, 202, "{}", r.text());
        let id = r.json()["job_id"].as_str().unwrap().to_owned();
        // Stopped once a good part is done, with more to go.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = gw.client().get(&format!("/v1/pushes/{id}")).unwrap().json();
            if v["done"].as_u64().unwrap_or(0) >= DEVICES / 2 {
                break;
            }
            assert!(Instant::now() < deadline, "{v}");
            std::thread::sleep(Duration::from_millis(20));
        }
        if kill {
            gw.kill();
        } else {
            assert!(gw.terminate().success());
        }
        let sent_before = sim.stats().pushes_total;
        let gw = common::start_for_sim(&sim, &dir.path().join("data"), &[], Server::start);
        let job = common::wait_job(&gw, &id, Duration::from_secs(60));
        assert_eq!(job["state"], "done", "{job}");
        assert_eq!(job["total"], DEVICES, "{job}");
        assert_eq!(job["received"], DEVICES, "{job}");
        assert_eq!(job["done"], DEVICES, "{job}");
        let st = sim.stats();
        assert_eq!(st.delivered_channels, DEVICES, "{st:?}");
        assert!(st.max_deliveries_per_channel <= 2, "{st:?}");
        eprintln!(
            "{}: {} pushes before the stop, {} in all for {DEVICES} devices",
            if kill { "SIGKILL" } else { "SIGTERM" },
            sent_before,
            st.pushes_total
        );
        drop(gw);
        drop(dir);
    }
}
