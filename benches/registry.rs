//! Registry map choice: papaya (lock-free) against dashmap (sharded
//! RwLocks), holding the same compact records, and the chosen `Registry`.
//!
//! `cargo bench --bench registry` prints, for each:
//! - memory: VmRSS growth after inserting N records (36-character UUID ids,
//!   ~190-byte channel URIs), divided by N, measured in a fresh child
//!   process per map so that one map's freed memory cannot hide another's;
//! - upserts/s and lookups/s with two threads (both cores busy), median of
//!   three runs;
//!
//! then runs the same operations under criterion.
//!
//! N is 1,000,000 (`WNSGATE_BENCH_N` overrides it). With
//! `WNSGATE_BENCH_QUICK=1`, N is 50,000 and criterion runs briefly, so the
//! whole bench takes a few seconds (a CI smoke run).
//!
//! The global allocator is mimalloc, as in the gateway binary.

// Measures its own waits and hang guards on the real clock; the rule that
// time is read only through `wnsgate::clock` (clippy.toml) is the gateway's.
#![allow(clippy::disallowed_methods)]

use criterion::{BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use wnsgate::core::{
    ChannelUri, DeadMark, DeadReason, DeviceId, DeviceRecord, Pfn, ProviderId, UnixTime,
};
use wnsgate::registry::{CompactRecord, KeyBuf, RecordCodec, RecordKey, Registry};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CHILD_ENV: &str = "WNSGATE_BENCH_MEMORY_CHILD";
const THREADS: usize = 2;
const ROUNDS: usize = 5;

fn quick() -> bool {
    std::env::var("WNSGATE_BENCH_QUICK").is_ok_and(|v| v == "1")
}

fn n_records() -> usize {
    std::env::var("WNSGATE_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick() { 50_000 } else { 1_000_000 })
}

// ---------------------------------------------------------------------------
// Realistic records, generated deterministically from an index.

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn device_id(i: u64) -> String {
    let (a, b) = (mix(i), mix(i ^ 0x5555_0000_0000_0000));
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | (b >> 48) & 0x3fff,
        b & 0xffff_ffff_ffff
    )
}

const HOSTS: [&str; 6] = [
    "db5.notify.windows.com",
    "bn2.notify.windows.com",
    "bn3p.notify.windows.com",
    "am3p.notify.windows.com",
    "sg2p.notify.windows.com",
    "wns2-by3p.notify.windows.com",
];

/// `https://<host>/?token=<base64 of 104 bytes, + / = percent-escaped>`,
/// 190 bytes on average.
fn channel_uri(i: u64) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut raw = [0u8; 104];
    raw[..5].copy_from_slice(&[3, 6, 0, 0, 0]);
    for (j, chunk) in raw[5..].chunks_mut(8).enumerate() {
        let r = mix(i.wrapping_mul(31).wrapping_add(j as u64)).to_le_bytes();
        chunk.copy_from_slice(&r[..chunk.len()]);
    }
    let mut uri = format!(
        "https://{}/?token=",
        HOSTS[(mix(i ^ 0xabc) % HOSTS.len() as u64) as usize]
    );
    for c in raw.chunks(3) {
        let v = c
            .iter()
            .enumerate()
            .fold(0u32, |v, (k, &b)| v | u32::from(b) << (16 - 8 * k));
        for k in 0..4 {
            if k > c.len() {
                uri.push_str("%3d");
                continue;
            }
            match B64[(v >> (18 - 6 * k) & 63) as usize] {
                b'+' => uri.push_str("%2b"),
                b'/' => uri.push_str("%2f"),
                ch => uri.push(char::from(ch)),
            }
        }
    }
    uri
}

fn record(i: u64) -> DeviceRecord {
    let r = mix(i ^ 0x1234_5678);
    DeviceRecord {
        device_id: DeviceId::parse(&device_id(i)).expect("generated id is valid"),
        pfn: Pfn::parse(if r.is_multiple_of(5) {
            "Fabrikam.Agent_8wekyb3d8bbwe"
        } else {
            "Contoso.MDM_8wekyb3d8bbwe"
        })
        .expect("valid pfn"),
        channel_uri: ChannelUri::from_trusted(channel_uri(i)).expect("generated uri is https"),
        provider_id: (!r.is_multiple_of(10))
            .then(|| ProviderId::parse("Contoso-MDM").expect("valid")),
        issued_at: UnixTime(1_795_000_000 - (r >> 8) as u32 % (30 * 86_400)),
        dead: (r.is_multiple_of(50)).then_some(DeadMark {
            reason: DeadReason::Wns410,
            at: UnixTime(1_795_000_000),
        }),
        refresh: None,
    }
}

// ---------------------------------------------------------------------------
// The two candidate maps, used the way the registry uses them: an upsert
// hands back the replaced record (the registry reads its histogram bucket).

trait Map: Sync + Sized {
    const NAME: &'static str;
    fn with_capacity(n: usize) -> Self;
    /// Inserts or replaces; returns the replaced record's issued_at.
    fn upsert(&self, rec: CompactRecord) -> Option<u32>;
    /// Finds a record and reads a field of it.
    fn lookup(&self, key: &RecordKey) -> Option<u32>;
    fn len(&self) -> usize;
}

struct Dash(dashmap::DashMap<CompactRecord, ()>);

impl Map for Dash {
    const NAME: &'static str = "dashmap";
    fn with_capacity(n: usize) -> Self {
        Dash(dashmap::DashMap::with_capacity(n))
    }
    fn upsert(&self, rec: CompactRecord) -> Option<u32> {
        match self.0.entry(rec) {
            dashmap::Entry::Occupied(e) => Some(e.replace_entry(()).0.issued_at().0),
            dashmap::Entry::Vacant(e) => {
                e.insert(());
                None
            }
        }
    }
    fn lookup(&self, key: &RecordKey) -> Option<u32> {
        self.0.get(key).map(|e| e.key().issued_at().0)
    }
    fn len(&self) -> usize {
        self.0.len()
    }
}

/// papaya with `ResizeMode::Blocking`: the configuration a registry would
/// use. With the default incremental resizing, a map grown to 1M entries
/// stayed about three times slower to read (see `PapayaIncremental`).
struct Papaya(papaya::HashMap<CompactRecord, ()>);

fn papaya_upsert(map: &papaya::HashMap<CompactRecord, ()>, rec: CompactRecord) -> Option<u32> {
    let map = map.pin();
    match map.compute(rec, |_| papaya::Operation::<(), ()>::Insert(())) {
        papaya::Compute::Updated { old, .. } => Some(old.0.issued_at().0),
        _ => None,
    }
}

fn papaya_lookup(map: &papaya::HashMap<CompactRecord, ()>, key: &RecordKey) -> Option<u32> {
    map.pin().get_key_value(key).map(|(k, _)| k.issued_at().0)
}

impl Map for Papaya {
    const NAME: &'static str = "papaya";
    fn with_capacity(n: usize) -> Self {
        Papaya(
            papaya::HashMap::builder()
                .capacity(n)
                .resize_mode(papaya::ResizeMode::Blocking)
                .build(),
        )
    }
    fn upsert(&self, rec: CompactRecord) -> Option<u32> {
        papaya_upsert(&self.0, rec)
    }
    fn lookup(&self, key: &RecordKey) -> Option<u32> {
        papaya_lookup(&self.0, key)
    }
    fn len(&self) -> usize {
        self.0.len()
    }
}

/// papaya with its default, incremental resizing.
struct PapayaIncremental(papaya::HashMap<CompactRecord, ()>);

impl Map for PapayaIncremental {
    const NAME: &'static str = "papaya (incremental resize)";
    fn with_capacity(n: usize) -> Self {
        PapayaIncremental(papaya::HashMap::with_capacity(n))
    }
    fn upsert(&self, rec: CompactRecord) -> Option<u32> {
        papaya_upsert(&self.0, rec)
    }
    fn lookup(&self, key: &RecordKey) -> Option<u32> {
        papaya_lookup(&self.0, key)
    }
    fn len(&self) -> usize {
        self.0.len()
    }
}

// ---------------------------------------------------------------------------
// Memory, in a child process per variant.

fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Runs in the child: inserts `n` records into a fresh variant and prints
/// `rss_before rss_after`.
fn memory_child(variant: &str, n: usize) {
    let presize = variant.ends_with("+cap");
    let cap = if presize { n } else { 0 };
    let codec = RecordCodec::new();
    // Warm the generator and the codec so their own allocations are in the
    // baseline.
    for i in 0..1000u64 {
        drop(codec.encode(&record(u64::MAX - i)));
    }
    let before = rss_bytes();
    let keep: Box<dyn std::any::Any> = match variant.trim_end_matches("+cap") {
        "dashmap" => {
            let m = Dash::with_capacity(cap);
            (0..n as u64).for_each(|i| {
                m.upsert(codec.encode(&record(i)));
            });
            assert_eq!(m.len(), n);
            Box::new(m)
        }
        "papaya" => {
            let m = Papaya::with_capacity(cap);
            (0..n as u64).for_each(|i| {
                m.upsert(codec.encode(&record(i)));
            });
            assert_eq!(m.len(), n);
            Box::new(m)
        }
        "registry" => {
            let r = Registry::with_capacity(cap);
            (0..n as u64).for_each(|i| {
                r.upsert(&record(i));
            });
            assert_eq!(r.len(), n);
            Box::new(r)
        }
        other => panic!("unknown variant {other}"),
    };
    let after = rss_bytes();
    println!("{before} {after}");
    drop(keep);
}

/// Runs a child for `variant`; returns (baseline RSS, bytes per record).
fn measure_memory(variant: &str, n: usize) -> (usize, f64) {
    let out = Command::new(std::env::current_exe().expect("own path"))
        .env(CHILD_ENV, variant)
        .env("WNSGATE_BENCH_N", n.to_string())
        .output()
        .expect("run memory child");
    let text = String::from_utf8_lossy(&out.stdout);
    let nums: Vec<usize> = text
        .lines()
        .last()
        .unwrap_or("")
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    assert!(
        out.status.success() && nums.len() == 2,
        "memory child for {variant} failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (nums[0], (nums[1] - nums[0]) as f64 / n as f64)
}

// ---------------------------------------------------------------------------
// Rates with two threads.

/// Ops per second of `THREADS` threads each calling `op(thread, j)` for
/// `j in 0..per_thread`.
fn rate(per_thread: usize, op: impl Fn(usize, usize) + Sync) -> f64 {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let op = &op;
            s.spawn(move || (0..per_thread).for_each(|j| op(t, j)));
        }
    });
    (per_thread * THREADS) as f64 / start.elapsed().as_secs_f64()
}

struct Inputs {
    records: Vec<DeviceRecord>,
    /// Device ids in a shuffled order, for lookups.
    lookup_ids: Vec<String>,
}

fn inputs(n: usize) -> Inputs {
    let records: Vec<DeviceRecord> = (0..n as u64).map(record).collect();
    let mut lookup_ids: Vec<String> = records
        .iter()
        .map(|r| r.device_id.as_str().to_owned())
        .collect();
    for i in (1..lookup_ids.len()).rev() {
        lookup_ids.swap(i, (mix(i as u64 ^ 77) % (i as u64 + 1)) as usize);
    }
    Inputs {
        records,
        lookup_ids,
    }
}

/// Upserts and lookups per second of one map, two threads, each over its
/// half of the keys. The map already holds every key, so upserts replace.
/// Upserts include encoding the record; lookups include encoding the id on
/// the stack and reading a field of the record.
type RateFn<'a> = Box<dyn Fn() -> (f64, f64) + 'a>;

fn map_rates<'a, M: Map + 'a>(inp: &'a Inputs, codec: &'a RecordCodec) -> RateFn<'a> {
    let m = M::with_capacity(0);
    for r in &inp.records {
        m.upsert(codec.encode(r));
    }
    let half = inp.records.len() / THREADS;
    Box::new(move || {
        let upserts = rate(half, |t, j| {
            black_box(m.upsert(codec.encode(&inp.records[t * half + j])));
        });
        let lookups = rate(half, |t, j| {
            let k = KeyBuf::encode(&inp.lookup_ids[t * half + j]).expect("short id");
            black_box(m.lookup(k.as_key()));
        });
        (upserts, lookups)
    })
}

/// The same through `Registry::upsert` and `Registry::get` (which decodes
/// the whole record into owned strings).
fn registry_rates(inp: &Inputs) -> RateFn<'_> {
    let reg = Registry::new();
    for r in &inp.records {
        reg.upsert(r);
    }
    let half = inp.records.len() / THREADS;
    Box::new(move || {
        let upserts = rate(half, |t, j| {
            black_box(reg.upsert(&inp.records[t * half + j]));
        });
        let gets = rate(half, |t, j| {
            black_box(reg.get(&inp.lookup_ids[t * half + j]));
        });
        (upserts, gets)
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

// ---------------------------------------------------------------------------
// Criterion: the same two-thread operations, for a statistical view.

fn criterion_benches(c: &mut Criterion, inp: &Inputs) {
    let codec = RecordCodec::new();
    let dash = Dash::with_capacity(0);
    let papaya = Papaya::with_capacity(0);
    let reg = Registry::new();
    for r in &inp.records {
        dash.upsert(codec.encode(r));
        papaya.upsert(codec.encode(r));
        reg.upsert(r);
    }
    let n = inp.records.len();
    let cursor = AtomicUsize::new(0);
    // Each iteration is one operation on each of two threads; the threads
    // walk disjoint halves of the keys, continuing where the last call
    // stopped.
    let two_threads = |iters: u64, op: &(dyn Fn(usize) + Sync)| {
        let iters = iters as usize;
        let base = cursor.fetch_add(iters, Ordering::Relaxed);
        let start = Instant::now();
        std::thread::scope(|s| {
            for t in 0..THREADS {
                s.spawn(move || {
                    let first = base + t * (n / THREADS);
                    (first..first + iters).for_each(|i| op(i % n));
                });
            }
        });
        start.elapsed()
    };

    let mut g = c.benchmark_group("upsert_2_threads");
    g.throughput(Throughput::Elements(THREADS as u64));
    g.bench_function(BenchmarkId::from_parameter("dashmap"), |b| {
        b.iter_custom(|iters| {
            two_threads(iters, &|i| {
                black_box(dash.upsert(codec.encode(&inp.records[i])));
            })
        })
    });
    g.bench_function(BenchmarkId::from_parameter("papaya"), |b| {
        b.iter_custom(|iters| {
            two_threads(iters, &|i| {
                black_box(papaya.upsert(codec.encode(&inp.records[i])));
            })
        })
    });
    g.bench_function(BenchmarkId::from_parameter("registry"), |b| {
        b.iter_custom(|iters| {
            two_threads(iters, &|i| {
                black_box(reg.upsert(&inp.records[i]));
            })
        })
    });
    g.finish();

    let mut g = c.benchmark_group("lookup_2_threads");
    g.throughput(Throughput::Elements(THREADS as u64));
    let key = |i: usize| KeyBuf::encode(&inp.lookup_ids[i]).expect("short id");
    g.bench_function(BenchmarkId::from_parameter("dashmap"), |b| {
        b.iter_custom(|iters| {
            two_threads(iters, &|i| {
                black_box(dash.lookup(key(i).as_key()));
            })
        })
    });
    g.bench_function(BenchmarkId::from_parameter("papaya"), |b| {
        b.iter_custom(|iters| {
            two_threads(iters, &|i| {
                black_box(papaya.lookup(key(i).as_key()));
            })
        })
    });
    g.bench_function(BenchmarkId::from_parameter("registry_get_decoded"), |b| {
        b.iter_custom(|iters| {
            two_threads(iters, &|i| {
                black_box(reg.get(&inp.lookup_ids[i]));
            })
        })
    });
    g.finish();
}

fn main() {
    if let Ok(variant) = std::env::var(CHILD_ENV) {
        memory_child(&variant, n_records());
        return;
    }
    let n = n_records();
    let avg_uri = (0..1000u64).map(|i| channel_uri(i).len()).sum::<usize>() as f64 / 1000.0;
    println!(
        "registry bench: {n} records, 36-char UUID ids, channel URIs of {avg_uri:.0} bytes on average, {THREADS} threads, mimalloc{}",
        if quick() { ", QUICK mode" } else { "" }
    );

    println!("\nmemory: VmRSS growth / records, fresh process per row");
    println!("| map | presized | bytes/record | baseline RSS |");
    println!("|---|---|---|---|");
    for variant in [
        "dashmap",
        "papaya",
        "registry",
        "dashmap+cap",
        "papaya+cap",
        "registry+cap",
    ] {
        let (base, per) = measure_memory(variant, n);
        println!(
            "| {} | {} | {per:.1} | {:.1} MiB |",
            variant.trim_end_matches("+cap"),
            if variant.ends_with("+cap") {
                "yes"
            } else {
                "no"
            },
            base as f64 / 1048576.0
        );
    }

    let inp = inputs(n);
    let codec = RecordCodec::new();
    let variants: Vec<(&str, RateFn)> = vec![
        (Dash::NAME, map_rates::<Dash>(&inp, &codec)),
        (Papaya::NAME, map_rates::<Papaya>(&inp, &codec)),
        (
            PapayaIncremental::NAME,
            map_rates::<PapayaIncremental>(&inp, &codec),
        ),
        ("Registry (upsert / get, decoded)", registry_rates(&inp)),
    ];
    // Rounds interleave the variants so that the machine's noise hits all.
    let rounds: Vec<Vec<(f64, f64)>> = (0..ROUNDS)
        .map(|_| variants.iter().map(|(_, f)| f()).collect())
        .collect();
    println!(
        "\nrates: {THREADS} threads, median of {ROUNDS} interleaved rounds, map already holding all {n} keys"
    );
    println!("| map | upserts/s (replacing, incl. encode) | lookups/s |");
    println!("|---|---|---|");
    for (i, (name, _)) in variants.iter().enumerate() {
        let u = median(rounds.iter().map(|r| r[i].0).collect());
        let l = median(rounds.iter().map(|r| r[i].1).collect());
        println!("| {name} | {u:.0} | {l:.0} |");
    }
    drop(variants);
    println!();

    let mut c = Criterion::default().configure_from_args();
    c = if quick() {
        c.sample_size(10)
            .nresamples(1000)
            .warm_up_time(Duration::from_millis(50))
            .measurement_time(Duration::from_millis(150))
    } else {
        c.sample_size(20)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3))
    };
    criterion_benches(&mut c, &inp);
    c.final_summary();
}
