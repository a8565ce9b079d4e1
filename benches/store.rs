//! Store benchmark: durable import rate, ack latency, restart scan rate, with
//! a bare fsync measured on the same disk in the same run as the reference.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-store cargo bench --bench store
//! WNSGATE_BENCH_QUICK=1 ...   # 20k records, a few seconds (CI smoke run)
//! WNSGATE_BENCH_N=10000000 ... # record count (default 1M)
//! WNSGATE_BENCH_DIR=/path ...  # where the store is created (default: temp dir)
//! WNSGATE_BENCH_BLOCK_KIB=64 ... # data block size to try (default: the store's)
//! WNSGATE_BENCH_MEMTABLE_MIB=64 ... # memtable size to try (default: the store's)
//! ```
//!
//! Records look like production: 36-char UUID device ids, ~190-byte channel
//! URIs, a PFN, a provider id on half of them.

// Measures its own waits and hang guards on the real clock; the rule that
// time is read only through `wnsgate::clock` (clippy.toml) is the gateway's.
#![allow(clippy::disallowed_methods)]

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wnsgate::core::{ChannelUri, DeviceId, DeviceRecord, Pfn, ProviderId, UnixTime};
use wnsgate::store::{
    Committer, CommitterConfig, FjallOptions, FjallStore, Mutation, Store, StoreError, Ticket,
};

const SUBMISSION: usize = 1000;
const IMPORT_THREADS: usize = 2;
const LATENCY_SUBMITTERS: usize = 64;
const OPEN_LOOP_RATE: u64 = 10_000;
/// Above this the records are generated while submitting, not beforehand.
const PREGENERATE_MAX: usize = 2_000_000;

fn main() {
    let quick = std::env::var("WNSGATE_BENCH_QUICK").is_ok_and(|v| v == "1");
    let n: usize = std::env::var("WNSGATE_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 20_000 } else { 1_000_000 });
    let phase = if quick {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(3)
    };
    let base = match std::env::var_os("WNSGATE_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .expect("bench directory");
    let dir = base.path().join("store");

    println!("wnsgate store bench: N={n}, dir={}", base.path().display());
    println!("load average at start: {}", loadavg());
    println!(
        "machine: {} cores, kernel {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let mut opts = FjallOptions::default();
    if let Some(kib) = std::env::var("WNSGATE_BENCH_BLOCK_KIB")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    {
        opts.data_block_bytes = kib << 10;
    }
    if let Some(mib) = std::env::var("WNSGATE_BENCH_MEMTABLE_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        opts.memtable_bytes = mib << 20;
    }
    println!(
        "fjall: cache {} MiB, memtable {} MiB, journal bound {} MiB, data blocks {} KiB",
        opts.cache_bytes >> 20,
        opts.memtable_bytes >> 20,
        opts.max_journal_bytes >> 20,
        opts.data_block_bytes >> 10
    );
    let gen_rate = generation_rate(if quick { 20_000 } else { 200_000 });
    println!("record generation alone (1 thread): {}", per_sec(gen_rate));
    println!();

    fsync_reference(base.path(), if quick { 30 } else { 300 });
    println!();

    let store = Arc::new(Counting::new(
        FjallStore::open(&dir, opts.clone()).expect("open store"),
    ));
    import(&store, n);
    let t = Instant::now();
    while store.inner.background_jobs() > 0 && t.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "  fjall background flushes/compactions after the import took {:.2} s more",
        t.elapsed().as_secs_f64()
    );
    closed_loop_latency(&store, n, phase);
    open_loop_latency(&store, n, phase);
    println!(
        "disk: {:.1} MiB ({:.0} bytes/record)",
        store.inner.disk_space().unwrap() as f64 / (1u64 << 20) as f64,
        store.inner.disk_space().unwrap() as f64 / n as f64
    );
    drop(store);
    println!();

    scans(&dir, &opts, n);
    println!();
    println!("load average at end: {}", loadavg());
}

/// A store that counts `apply` calls (= syncs) and times them.
struct Counting {
    inner: FjallStore,
    applies: AtomicU64,
    apply_times: Mutex<Vec<Duration>>,
}

impl Counting {
    fn new(inner: FjallStore) -> Counting {
        Counting {
            inner,
            applies: AtomicU64::new(0),
            apply_times: Mutex::new(Vec::new()),
        }
    }
    fn syncs(&self) -> u64 {
        self.applies.load(Ordering::Relaxed)
    }
    /// "apply p50/p99/max" since the last call.
    fn take_apply_times(&self) -> String {
        let mut v = std::mem::take(&mut *self.apply_times.lock().unwrap());
        v.sort();
        format!(
            "apply (write + sync) p50 {}, p99 {}, max {}",
            ms(pct(&v, 50.0)),
            ms(pct(&v, 99.0)),
            ms(v.last().copied().unwrap_or_default())
        )
    }
}

impl Store for Counting {
    fn apply(&self, batch: &[Mutation]) -> Result<(), StoreError> {
        self.applies.fetch_add(1, Ordering::Relaxed);
        let t = Instant::now();
        let r = self.inner.apply(batch);
        self.apply_times.lock().unwrap().push(t.elapsed());
        r
    }
    fn load(
        &self,
        threads: usize,
        into: &dyn wnsgate::store::Restore,
    ) -> Result<wnsgate::store::Loaded, StoreError> {
        self.inner.load(threads, into)
    }
    fn scan_jobs(&self, visit: &mut dyn FnMut(wnsgate::core::Job)) -> Result<u64, StoreError> {
        self.inner.scan_jobs(visit)
    }
}

// ---------------------------------------------------------------- records

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn uuid(i: u64) -> String {
    let (a, b) = (splitmix(i), splitmix(i ^ 0x5555_5555_5555_5555));
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        (b >> 48) | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn record(i: u64, version: u64) -> DeviceRecord {
    let mut uri = String::with_capacity(192);
    uri.push_str("https://db5.notify.windows.com/?token=AwYAAAD");
    let mut h = splitmix(i.wrapping_mul(31).wrapping_add(version));
    while uri.len() < 190 {
        if h == 0 {
            h = splitmix(uri.len() as u64 ^ i);
        }
        uri.push(B64[(h & 63) as usize] as char);
        h >>= 6;
    }
    DeviceRecord {
        device_id: DeviceId::parse(&uuid(i)).unwrap(),
        pfn: Pfn::parse("Contoso.MDM_8wekyb3d8bbwe").unwrap(),
        channel_uri: ChannelUri::from_trusted(uri).unwrap(),
        provider_id: i
            .is_multiple_of(2)
            .then(|| ProviderId::parse("Contoso-MDM").unwrap()),
        issued_at: UnixTime(1_780_000_000 + (i % 2_592_000) as u32),
        dead: None,
        refresh: None,
    }
}

fn chunk(start: usize, len: usize) -> Vec<Mutation> {
    (start..start + len)
        .map(|i| Mutation::Put(record(i as u64, 0)))
        .collect()
}

fn generation_rate(n: usize) -> f64 {
    let t = Instant::now();
    let v = chunk(0, n);
    let rate = n as f64 / t.elapsed().as_secs_f64();
    drop(v);
    rate
}

// ---------------------------------------------------------------- phases

/// Bare fsync cost on this disk, two ways: appending to a growing file, and
/// writing into a file whose length was set beforehand (what fjall's journal
/// does: it sets each journal to 64 MiB, then writes into it).
fn fsync_reference(dir: &Path, rounds: usize) {
    use std::io::Write;
    for preallocated in [false, true] {
        for (label, size) in [("4 KiB", 4096usize), ("1 MiB", 1 << 20)] {
            let path = dir.join("fsync-probe");
            let mut f = std::fs::File::create(&path).unwrap();
            if preallocated {
                f.set_len(64 << 20).unwrap();
                f.sync_all().unwrap();
            }
            let buf = vec![0xa5u8; size];
            let rounds = if size > 4096 { rounds / 3 + 1 } else { rounds };
            let mut lat = Vec::with_capacity(rounds);
            let start = Instant::now();
            for _ in 0..rounds {
                let t = Instant::now();
                f.write_all(&buf).unwrap();
                f.sync_all().unwrap();
                lat.push(t.elapsed());
            }
            let total = start.elapsed();
            drop(f);
            std::fs::remove_file(&path).unwrap();
            lat.sort();
            println!(
                "reference: {} {label} + fsync, {rounds} rounds: p50 {}, p99 {}, {:.0} fsyncs/s",
                if preallocated {
                    "write into a set_len(64 MiB) file"
                } else {
                    "append"
                },
                ms(pct(&lat, 50.0)),
                ms(pct(&lat, 99.0)),
                rounds as f64 / total.as_secs_f64()
            );
        }
    }
}

fn import(store: &Arc<Counting>, n: usize) {
    let applied = Arc::new(AtomicU64::new(0));
    let a = applied.clone();
    let (handle, join) = Committer::start(
        store.clone(),
        Box::new(move |b: &[Mutation]| {
            a.fetch_add(b.len() as u64, Ordering::Relaxed);
        }),
        CommitterConfig {
            // Raw throughput: no bound on the wait, only on the queue.
            max_wait: None,
            ..CommitterConfig::default()
        },
    );
    let pregenerated: Option<Vec<Vec<Mutation>>> = (n <= PREGENERATE_MAX).then(|| {
        (0..n)
            .step_by(SUBMISSION)
            .map(|s| chunk(s, SUBMISSION.min(n - s)))
            .collect()
    });
    let chunks = Mutex::new(pregenerated.map(|v| v.into_iter()));
    let syncs0 = store.syncs();
    let cpu0 = cpu_secs();
    let t = Instant::now();
    std::thread::scope(|s| {
        for th in 0..IMPORT_THREADS {
            let (handle, chunks) = (handle.clone(), &chunks);
            s.spawn(move || {
                // Keep a window of tickets in flight, like an importer that
                // streams NDJSON and answers when the last line is durable.
                let mut inflight: VecDeque<Ticket> = VecDeque::new();
                let mut start = th * SUBMISSION;
                loop {
                    let sub = match chunks.lock().unwrap().as_mut() {
                        Some(it) => match it.next() {
                            Some(c) => c,
                            None => break,
                        },
                        None => {
                            if start >= n {
                                break;
                            }
                            let c = chunk(start, SUBMISSION.min(n - start));
                            start += IMPORT_THREADS * SUBMISSION;
                            c
                        }
                    };
                    // The window below keeps at most 2 x 64 submissions in
                    // flight, far under the queue bound, and the committer
                    // has no bound on the wait, so none is refused.
                    match handle.submit(sub) {
                        Ok(ticket) => inflight.push_back(ticket),
                        Err(e) => panic!("import submission refused: {e}"),
                    }
                    while inflight.len() > 64 {
                        inflight.pop_front().unwrap().wait_blocking().unwrap();
                    }
                }
                for t in inflight {
                    t.wait_blocking().unwrap();
                }
            });
        }
    });
    let elapsed = t.elapsed();
    join.shutdown().unwrap();
    let cpu = cpu_secs() - cpu0;
    let syncs = store.syncs() - syncs0;
    assert_eq!(applied.load(Ordering::Relaxed), n as u64);
    println!(
        "import: {n} records, {SUBMISSION}-record submissions from {IMPORT_THREADS} threads{}: \
         {:.2} s, {}, {syncs} syncs ({:.0}/s, {:.0} records/sync), \
         process CPU {:.2} us/record (incl. generation and fjall background work)",
        if n <= PREGENERATE_MAX {
            " (pregenerated)"
        } else {
            " (generated while submitting)"
        },
        elapsed.as_secs_f64(),
        per_sec(n as f64 / elapsed.as_secs_f64()),
        syncs as f64 / elapsed.as_secs_f64(),
        n as f64 / syncs.max(1) as f64,
        cpu * 1e6 / n as f64,
    );
    println!(
        "  {}; RSS after import: {}",
        store.take_apply_times(),
        rss()
    );
}

/// 64 threads, each: submit one record, wait for its ack, repeat.
fn closed_loop_latency(store: &Arc<Counting>, n: usize, phase: Duration) {
    let (handle, join) = Committer::start(
        store.clone(),
        Box::new(|_: &[Mutation]| {}),
        CommitterConfig {
            // Raw throughput: no bound on the wait, only on the queue.
            max_wait: None,
            ..CommitterConfig::default()
        },
    );
    let syncs0 = store.syncs();
    let t = Instant::now();
    let lat = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for th in 0..LATENCY_SUBMITTERS {
            let (handle, lat) = (handle.clone(), &lat);
            s.spawn(move || {
                let mut mine = Vec::new();
                let mut k = th as u64;
                while t.elapsed() < phase {
                    let i = splitmix(k) % n as u64;
                    k += LATENCY_SUBMITTERS as u64;
                    let m = Mutation::Put(record(i, k));
                    let sent = Instant::now();
                    handle.submit(vec![m]).unwrap().wait_blocking().unwrap();
                    mine.push(sent.elapsed());
                }
                lat.lock().unwrap().extend(mine);
            });
        }
    });
    let elapsed = t.elapsed();
    join.shutdown().unwrap();
    let mut lat = lat.into_inner().unwrap();
    report_latency(
        store,
        &format!("single-record PUTs, closed loop, {LATENCY_SUBMITTERS} submitters"),
        &mut lat,
        elapsed,
        store.syncs() - syncs0,
    );
}

/// One current-thread runtime submitting single records at a fixed rate;
/// latency from the scheduled send time (no coordinated omission).
fn open_loop_latency(store: &Arc<Counting>, n: usize, phase: Duration) {
    let (handle, join) = Committer::start(
        store.clone(),
        Box::new(|_: &[Mutation]| {}),
        CommitterConfig::default(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let syncs0 = store.syncs();
    let lat = Arc::new(Mutex::new(Vec::new()));
    let refused = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    rt.block_on(async {
        let per_tick = OPEN_LOOP_RATE / 1000;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut tasks = Vec::new();
        let mut k = 0u64;
        while t.elapsed() < phase {
            let scheduled = tick.tick().await.into_std();
            for _ in 0..per_tick {
                k += 1;
                let m = Mutation::Put(record(splitmix(k ^ 0xabc) % n as u64, k));
                match handle.submit(vec![m]) {
                    Ok(ticket) => {
                        let lat = lat.clone();
                        tasks.push(tokio::spawn(async move {
                            ticket.await.unwrap();
                            lat.lock().unwrap().push(scheduled.elapsed());
                        }));
                    }
                    Err(_) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        for task in tasks {
            task.await.unwrap();
        }
    });
    let elapsed = t.elapsed();
    join.shutdown().unwrap();
    let mut lat = Arc::try_unwrap(lat).unwrap().into_inner().unwrap();
    report_latency(
        store,
        &format!(
            "single-record PUTs, open loop at {OPEN_LOOP_RATE}/s ({} refused)",
            refused.load(Ordering::Relaxed)
        ),
        &mut lat,
        elapsed,
        store.syncs() - syncs0,
    );
}

fn report_latency(
    store: &Counting,
    label: &str,
    lat: &mut [Duration],
    elapsed: Duration,
    syncs: u64,
) {
    lat.sort();
    println!(
        "{label}: {} acks in {:.1} s ({}), ack latency p50 {}, p99 {}, max {}; \
         {:.0} syncs/s, {:.1} records/sync",
        lat.len(),
        elapsed.as_secs_f64(),
        per_sec(lat.len() as f64 / elapsed.as_secs_f64()),
        ms(pct(lat, 50.0)),
        ms(pct(lat, 99.0)),
        ms(lat.last().copied().unwrap_or_default()),
        syncs as f64 / elapsed.as_secs_f64(),
        lat.len() as f64 / syncs.max(1) as f64,
    );
    println!("  {}", store.take_apply_times());
}

fn scans(dir: &Path, opts: &FjallOptions, n: usize) {
    for cold in [false, true] {
        if cold {
            // Evict only this store's files from the page cache, so the
            // scan reads from the disk as after a reboot.
            if !evict_from_page_cache(dir) {
                println!("(could not evict the store from the page cache; cold run skipped)");
                return;
            }
        }
        let label = if cold { "cold" } else { "warm" };
        let rss0 = rss_kib();
        let t = Instant::now();
        let store = FjallStore::open(dir, opts.clone()).expect("reopen");
        let opened = t.elapsed();
        let jobs = store.background_jobs();
        if jobs > 0 {
            println!("  ({jobs} fjall background jobs running during this scan)");
        }

        let (t, cpu0) = (Instant::now(), cpu_secs());
        let mut count = 0u64;
        let mut bytes = 0usize;
        let got = store
            .scan_all(&mut |r| {
                count += 1;
                bytes += r.channel_uri.as_str().len();
            })
            .unwrap();
        let (single, cpu) = (t.elapsed(), cpu_secs() - cpu0);
        assert_eq!((got, count), (n as u64, n as u64));
        println!(
            "{label}: reopen {}; scan_all (1 thread): {} records in {:.2} s, {}, CPU {:.2} us/record",
            ms(opened),
            got,
            single.as_secs_f64(),
            per_sec(n as f64 / single.as_secs_f64()),
            cpu * 1e6 / n as f64
        );
        drop(store);
        if cold && !evict_from_page_cache(dir) {
            return;
        }
        let store = FjallStore::open(dir, opts.clone()).expect("reopen");
        for threads in [2, 4] {
            let (t, cpu0) = (Instant::now(), cpu_secs());
            let got = store
                .scan_all_parallel(threads, &|r| {
                    std::hint::black_box(&r);
                })
                .unwrap();
            let (el, cpu) = (t.elapsed(), cpu_secs() - cpu0);
            assert_eq!(got, n as u64);
            println!(
                "{label}: scan_all_parallel ({threads} threads): {} records in {:.2} s, {}, \
                 CPU {:.2} us/record",
                got,
                el.as_secs_f64(),
                per_sec(n as f64 / el.as_secs_f64()),
                cpu * 1e6 / n as f64
            );
            if cold {
                break; // the second pass would be warm
            }
        }
        println!(
            "  RSS growth from reopen + scans: {:.1} MiB",
            (rss_kib().saturating_sub(rss0)) as f64 / 1024.0
        );
        drop(store);
    }
}

// ---------------------------------------------------------------- helpers

fn evict_from_page_cache(dir: &Path) -> bool {
    fn walk(p: &Path, ok: &mut bool) {
        let Ok(rd) = std::fs::read_dir(p) else {
            *ok = false;
            return;
        };
        for e in rd.flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, ok);
            } else {
                let st = std::process::Command::new("dd")
                    .arg(format!("if={}", path.display()))
                    .args(["iflag=nocache", "count=0", "status=none"])
                    .status();
                *ok &= st.is_ok_and(|s| s.success());
            }
        }
    }
    let mut ok = true;
    walk(dir, &mut ok);
    ok
}

/// User + system CPU seconds of this process, all threads (10 ms ticks).
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 and 15 of proc(5), counted from the state field (3).
    (ticks(11) + ticks(12)) / 100.0
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p / 100.0).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn per_sec(rate: f64) -> String {
    if rate >= 1e6 {
        format!("{:.2}M/s", rate / 1e6)
    } else {
        format!("{:.1}k/s", rate / 1e3)
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn rss() -> String {
    format!("{:.1} MiB", rss_kib() as f64 / 1024.0)
}
