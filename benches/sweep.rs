//! Expiry sweep cost (P8): a sweep with 1% of the fleet due against a full
//! scan of the same store, in the same run.
//!
//! ```text
//! cargo bench --bench sweep
//! WNSGATE_BENCH_QUICK=1 ...   # 50k devices, a few seconds (CI smoke run)
//! WNSGATE_BENCH_N=10000000 ... # device count (default 1M)
//! WNSGATE_BENCH_DUE_PERMILLE=10 ... # share due, per mille (default 10 = 1%)
//! ```
//!
//! Three figures, each the best of three:
//! - the reference: a full scan of the registry (visit and decode every
//!   record in memory), which is what a sweep without an index would cost;
//! - reading the due devices through the in-memory issued-at index (what
//!   the sweep's reading is proportional to);
//! - a whole sweep: index pages and one refresh job opened per due device
//!   and made durable (the jobs are written and synced, which dominates).

// Measures its own waits and hang guards on the real clock; the rule that
// time is read only through `wnsgate::clock` (clippy.toml) is the gateway's.
#![allow(clippy::disallowed_methods)]

use std::sync::Arc;
use std::time::{Duration, Instant};
use wnsgate::config::{Config, Settings};
use wnsgate::core::{ChannelUri, DeviceId, DeviceRecord, Pfn, UnixTime};
use wnsgate::lifecycle::Lifecycle;
use wnsgate::registry::Registry;
use wnsgate::server::apply_to_registry;
use wnsgate::store::{Committer, CommitterConfig, LogOptions, LogStore, Mutation, Store};

const DAY: u32 = 86_400;

fn main() {
    let quick = std::env::var("WNSGATE_BENCH_QUICK").is_ok_and(|v| v == "1");
    let n: u64 = std::env::var("WNSGATE_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 50_000 } else { 1_000_000 });
    let due_permille: u64 = std::env::var("WNSGATE_BENCH_DUE_PERMILLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
        .clamp(1, 1000);
    let dir = tempfile::tempdir().expect("bench directory");
    println!(
        "wnsgate sweep bench (P8): N={n}, {}% due, machine: {} cores",
        due_permille as f64 / 10.0,
        std::thread::available_parallelism().map_or(0, |c| c.get())
    );

    // Devices issued evenly over 30 days ending at `now - 30d + window`, so
    // that exactly `due_permille` of them are past 30 days at `now`.
    let now = UnixTime(1_800_000_000);
    let span = 30 * DAY;
    let first = now.0 - 30 * DAY - (u64::from(span) * due_permille / 1000) as u32;
    let issued = |i: u64| UnixTime(first + (u64::from(span) * i / n) as u32);
    let due = (0..n).filter(|&i| issued(i).0 <= now.0 - 30 * DAY).count() as u64;

    let store: Arc<dyn Store> = Arc::new(
        LogStore::open(dir.path().join("store"), LogOptions::default()).expect("open store"),
    );
    let registry = Arc::new(Registry::with_capacity(n as usize));
    let t = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(4096) {
        let batch: Vec<Mutation> = chunk
            .iter()
            .map(|&i| Mutation::Put(record(i, issued(i))))
            .collect();
        store.apply(&batch).expect("write");
        apply_to_registry(&registry, &batch);
    }
    println!(
        "loaded {n} devices in {:.2} s ({due} due)",
        t.elapsed().as_secs_f64()
    );

    // Reference: a full scan.
    let full = best_of(3, || {
        let mut k = 0u64;
        registry.for_each(|_| k += 1);
        assert_eq!(k, n);
    });
    // The devices that are due, through the issued-at index.
    let index = best_of(3, || {
        let mut pages = registry.issued_between(UnixTime(0), UnixTime(now.0 - 30 * DAY + 1), 1024);
        let mut k = 0u64;
        while let Some(page) = pages.next_page() {
            k += page.len() as u64;
        }
        assert_eq!(k, due);
    });
    // Whole sweeps, each on a fresh queue over the same data: the first
    // sweep of a gateway reads every due entry and opens every job.
    let settings = Settings::resolve(&Config::default()).expect("default settings");
    let mut sweep_times = Vec::new();
    for _ in 0..3 {
        let reg = registry.clone();
        let reg2 = registry.clone();
        let (commits, join) = Committer::start_with_lookup(
            store.clone(),
            Box::new(move |b: &[Mutation]| apply_to_registry(&reg, b)),
            Box::new(move |id| reg2.get(id.as_str()).map(|r| r.channel_uri)),
            CommitterConfig::default(),
        );
        let lc = Lifecycle::new(
            settings.refresh.clone(),
            settings.thresholds,
            Vec::new(),
            registry.clone(),
            store.clone(),
            commits,
        );
        let t = Instant::now();
        let report = lc.sweep(now).expect("sweep");
        sweep_times.push(t.elapsed());
        assert_eq!(report.opened, due, "{report:?}");
        join.shutdown().expect("committer");
        // Undo: clear the refresh marks and jobs so the next round starts
        // from the same state.
        let mut undo = Vec::new();
        store
            .scan_jobs(&mut |j| undo.push(Mutation::DeleteJob(j.id)))
            .expect("jobs");
        for i in 0..n {
            if issued(i).0 <= now.0 - 30 * DAY {
                undo.push(Mutation::Put(record(i, issued(i))));
            }
        }
        for b in undo.chunks(4096) {
            store.apply(b).expect("undo");
            apply_to_registry(&registry, b);
        }
    }
    let sweep = sweep_times.into_iter().min().unwrap_or_default();

    let pct = |d: Duration| 100.0 * d.as_secs_f64() / full.as_secs_f64();
    println!("full scan of {n} records (reference): {:>9.1} ms", ms(full));
    println!(
        "reading the {due} due index entries:   {:>9.1} ms = {:.2}% of the full scan",
        ms(index),
        pct(index)
    );
    println!(
        "whole sweep, {due} jobs opened durably:   {:>9.1} ms = {:.2}% of the full scan",
        ms(sweep),
        pct(sweep)
    );
}

fn best_of(k: usize, mut f: impl FnMut()) -> Duration {
    (0..k)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn record(i: u64, issued_at: UnixTime) -> DeviceRecord {
    let id = format!(
        "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
        wnsgate::fleet::mix(i) >> 32,
        i & 0xffff,
        (i >> 16) & 0xfff,
        (i >> 28) & 0xfff,
        wnsgate::fleet::mix(i ^ 0xabc) & 0xffff_ffff_ffff
    );
    DeviceRecord {
        device_id: DeviceId::parse(&id).expect("valid id"),
        pfn: Pfn::parse(wnsgate::fleet::DEMO_PFN).expect("valid pfn"),
        channel_uri: ChannelUri::from_trusted(wnsgate::fleet::channel_uri(i, 0))
            .expect("valid uri"),
        provider_id: None,
        issued_at,
        dead: None,
        refresh: None,
    }
}
