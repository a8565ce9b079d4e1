//! Counters for tests and load tests: answers by status and by push outcome,
//! tokens, connections, and pushes per channel.
//!
//! Each worker thread writes only its own block of counters (no shared cache
//! line on the hot path); a snapshot sums the blocks. A reset records a
//! baseline instead of zeroing, so it never races with a writer. Per-channel
//! counts live in a sharded map keyed by a 64-bit hash of the channel
//! identity, and can be switched off.

use super::hash::BuildIdentity;
use super::push::{Outcome, OUTCOMES};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// Status codes counted individually (0..STATUS_SLOTS).
pub const STATUS_SLOTS: usize = 600;
/// Shards of the per-channel map (a power of two).
pub const CHANNEL_SHARDS: usize = 64;
/// Channels tracked at most; pushes to further channels are only counted in
/// `untracked_pushes`.
pub const MAX_TRACKED_CHANNELS: usize = 20_000_000;

/// Connection-level events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnEvent {
    /// A TCP connection was accepted.
    Accepted,
    /// It started speaking h2.
    H2,
    /// It started speaking HTTP/1.1.
    Http1,
    /// A GOAWAY (or `Connection: close`) was sent for `goaway_every`.
    GoAway,
    /// It was reset for `reset_every`.
    Reset,
    /// It took a request (any path; answered or not).
    Request,
    /// A stream was refused for `refused_stream_every`.
    StreamRefused,
    /// A stream was reset with INTERNAL_ERROR for `internal_error_every`.
    StreamReset,
    /// The header table size was flipped for `header_table_flip_every`.
    TableFlip,
    /// A header block did not signal a table size change as RFC 7541
    /// requires; the connection was dropped.
    TableSizeViolation,
    /// A header block signalled a table size change as RFC 7541 requires.
    TableFlipSignalled,
    /// A connection was reset by an outage window (`reset_window_ms` after
    /// reading a push, `refuse_window_ms` on a request).
    OutageReset,
    /// A new connection was refused (reset at accept) by `refuse_window_ms`.
    OutageRefused,
    /// A push was read and processed, then left unanswered because
    /// `reset_window_ms` reset its connection.
    OutageUnanswered,
}

const N_CONN: usize = 14;

/// Adds one to a counter that only the calling thread writes: a plain load
/// and store, no locked instruction.
#[inline]
fn bump(c: &AtomicU64) {
    c.store(c.load(Relaxed) + 1, Relaxed);
}

/// One worker thread's counters. Only that thread writes them.
#[repr(align(128))]
pub struct ThreadCounters {
    status: [AtomicU64; STATUS_SLOTS],
    outcome: [AtomicU64; OUTCOMES.len()],
    conn: [AtomicU64; N_CONN],
    token_requests: AtomicU64,
    tokens_issued: AtomicU64,
    untracked: AtomicU64,
    /// Valid pushes carrying `X-WNS-TTL`, and asking for status.
    with_ttl: AtomicU64,
    status_requested: AtomicU64,
}

impl ThreadCounters {
    fn new() -> ThreadCounters {
        ThreadCounters {
            status: std::array::from_fn(|_| AtomicU64::new(0)),
            outcome: std::array::from_fn(|_| AtomicU64::new(0)),
            conn: std::array::from_fn(|_| AtomicU64::new(0)),
            token_requests: AtomicU64::new(0),
            tokens_issued: AtomicU64::new(0),
            untracked: AtomicU64::new(0),
            with_ttl: AtomicU64::new(0),
            status_requested: AtomicU64::new(0),
        }
    }

    /// Counts the optional WNS headers of a push that passed the header
    /// checks.
    pub fn options(&self, ttl: bool, request_for_status: bool) {
        if ttl {
            bump(&self.with_ttl);
        }
        if request_for_status {
            bump(&self.status_requested);
        }
    }

    /// Counts an answer with this status.
    #[inline]
    pub fn answered(&self, status: u16) {
        bump(&self.status[usize::from(status).min(STATUS_SLOTS - 1)]);
    }

    /// Counts a push outcome.
    #[inline]
    pub fn outcome(&self, o: Outcome) {
        bump(&self.outcome[o as usize]);
    }

    /// Counts a connection event.
    pub fn conn(&self, e: ConnEvent) {
        bump(&self.conn[e as usize]);
    }

    /// Counts a token request, and whether a token was issued.
    pub fn token_request(&self, issued: bool) {
        bump(&self.token_requests);
        if issued {
            bump(&self.tokens_issued);
        }
    }

    fn add_to(&self, raw: &mut Raw) {
        for (r, c) in raw.status.iter_mut().zip(&self.status) {
            *r += c.load(Relaxed);
        }
        for (r, c) in raw.outcome.iter_mut().zip(&self.outcome) {
            *r += c.load(Relaxed);
        }
        for (r, c) in raw.conn.iter_mut().zip(&self.conn) {
            *r += c.load(Relaxed);
        }
        raw.token_requests += self.token_requests.load(Relaxed);
        raw.tokens_issued += self.tokens_issued.load(Relaxed);
        raw.untracked += self.untracked.load(Relaxed);
        raw.with_ttl += self.with_ttl.load(Relaxed);
        raw.status_requested += self.status_requested.load(Relaxed);
    }
}

/// Plain sums of all threads' counters.
#[derive(Clone)]
struct Raw {
    status: Vec<u64>,
    outcome: [u64; OUTCOMES.len()],
    conn: [u64; N_CONN],
    token_requests: u64,
    tokens_issued: u64,
    untracked: u64,
    with_ttl: u64,
    status_requested: u64,
}

impl Default for Raw {
    fn default() -> Self {
        Raw {
            status: vec![0; STATUS_SLOTS],
            outcome: [0; OUTCOMES.len()],
            conn: [0; N_CONN],
            token_requests: 0,
            tokens_issued: 0,
            untracked: 0,
            with_ttl: 0,
            status_requested: 0,
        }
    }
}

#[repr(align(128))]
struct Shard(Mutex<HashMap<u64, Counts, BuildIdentity>>);

/// Pushes and deliveries of one channel.
#[derive(Clone, Copy, Default)]
struct Counts {
    pushes: u32,
    delivered: u32,
}

/// Pushes per channel, by hash of the channel identity.
struct ChannelCounts {
    shards: Box<[Shard]>,
}

/// Distinct channels, the largest count, and `count -> channels`.
type Histogram = (u64, u64, BTreeMap<u64, u64>);

impl ChannelCounts {
    fn new() -> ChannelCounts {
        ChannelCounts {
            shards: (0..CHANNEL_SHARDS)
                .map(|_| Shard(Mutex::new(HashMap::default())))
                .collect(),
        }
    }

    /// Records one push; false when the channel could not be tracked.
    fn record(&self, hash: u64, delivered: bool) -> bool {
        // Middle bits pick the shard: the map inside uses the low bits for
        // the bucket and the top bits for its tag, so those must still vary.
        let shard = &self.shards[(hash >> 32) as usize % CHANNEL_SHARDS];
        let mut map = shard.0.lock();
        let full = map.len() >= MAX_TRACKED_CHANNELS / CHANNEL_SHARDS;
        let c = match map.get_mut(&hash) {
            Some(c) => c,
            None if full => return false,
            None => map.entry(hash).or_default(),
        };
        c.pushes = c.pushes.saturating_add(1);
        if delivered {
            c.delivered = c.delivered.saturating_add(1);
        }
        true
    }

    fn clear(&self) {
        for s in self.shards.iter() {
            *s.0.lock() = HashMap::default();
        }
    }

    fn summary(&self) -> (Histogram, Histogram) {
        let mut pushes = (0u64, 0u64, BTreeMap::new());
        let mut delivered = (0u64, 0u64, BTreeMap::new());
        for s in self.shards.iter() {
            let map = s.0.lock();
            for c in map.values() {
                for (h, n) in [(&mut pushes, c.pushes), (&mut delivered, c.delivered)] {
                    if n > 0 {
                        let n = u64::from(n);
                        h.0 += 1;
                        h.1 = h.1.max(n);
                        *h.2.entry(n).or_insert(0) += 1;
                    }
                }
            }
        }
        (pushes, delivered)
    }
}

/// All counters of one simulator.
pub struct Stats {
    threads: Mutex<Vec<Arc<ThreadCounters>>>,
    baseline: Mutex<Raw>,
    channels: Option<ChannelCounts>,
}

impl Stats {
    /// Counters, with per-channel counting when `channel_stats`.
    pub fn new(channel_stats: bool) -> Stats {
        Stats {
            threads: Mutex::new(Vec::new()),
            baseline: Mutex::new(Raw::default()),
            channels: channel_stats.then(ChannelCounts::new),
        }
    }

    /// Whether per-channel counting is on.
    pub fn channel_stats(&self) -> bool {
        self.channels.is_some()
    }

    /// A counter block for a new worker thread.
    pub fn register_thread(&self) -> Arc<ThreadCounters> {
        let t = Arc::new(ThreadCounters::new());
        self.threads.lock().push(t.clone());
        t
    }

    /// Records a push to the channel with this identity hash (no-op when
    /// per-channel counting is off).
    pub fn channel_push(&self, t: &ThreadCounters, hash: u64, delivered: bool) {
        if let Some(c) = &self.channels {
            if !c.record(hash, delivered) {
                bump(&t.untracked);
            }
        }
    }

    fn sum(&self) -> Raw {
        let mut raw = Raw::default();
        for t in self.threads.lock().iter() {
            t.add_to(&mut raw);
        }
        raw
    }

    /// Everything counted since start or the last reset.
    pub fn snapshot(&self) -> SimStats {
        let now = self.sum();
        let base = self.baseline.lock().clone();
        let d = |a: u64, b: u64| a.saturating_sub(b);
        let mut s = SimStats {
            channel_stats: self.channels.is_some(),
            token_requests: d(now.token_requests, base.token_requests),
            tokens_issued: d(now.tokens_issued, base.tokens_issued),
            untracked_pushes: d(now.untracked, base.untracked),
            pushes_with_ttl: d(now.with_ttl, base.with_ttl),
            pushes_requesting_status: d(now.status_requested, base.status_requested),
            connections: d(now.conn[0], base.conn[0]),
            h2_connections: d(now.conn[1], base.conn[1]),
            http1_connections: d(now.conn[2], base.conn[2]),
            goaways_sent: d(now.conn[3], base.conn[3]),
            connection_resets: d(now.conn[4], base.conn[4]),
            requests_received: d(now.conn[5], base.conn[5]),
            streams_refused: d(now.conn[6], base.conn[6]),
            streams_reset: d(now.conn[7], base.conn[7]),
            header_table_flips: d(now.conn[8], base.conn[8]),
            table_size_violations: d(now.conn[9], base.conn[9]),
            table_flips_signalled: d(now.conn[10], base.conn[10]),
            outage_resets: d(now.conn[11], base.conn[11]),
            outage_refusals: d(now.conn[12], base.conn[12]),
            outage_unanswered_pushes: d(now.conn[13], base.conn[13]),
            ..SimStats::default()
        };
        for (code, (a, b)) in now.status.iter().zip(&base.status).enumerate() {
            let n = d(*a, *b);
            if n > 0 {
                s.requests_total += n;
                s.by_status.insert(code as u16, n);
            }
        }
        for (i, o) in OUTCOMES.iter().enumerate() {
            let n = d(now.outcome[i], base.outcome[i]);
            if n > 0 {
                s.pushes_total += n;
                s.by_outcome.insert(o.name().to_owned(), n);
            }
        }
        if let Some(c) = &self.channels {
            let (p, dl) = c.summary();
            (
                s.distinct_channels,
                s.max_pushes_per_channel,
                s.pushes_histogram,
            ) = p;
            (
                s.delivered_channels,
                s.max_deliveries_per_channel,
                s.deliveries_histogram,
            ) = dl;
        }
        s
    }

    /// Starts counting from zero again.
    pub fn reset(&self) {
        let mut base = self.baseline.lock();
        *base = self.sum();
        if let Some(c) = &self.channels {
            c.clear();
        }
    }
}

/// A snapshot of the counters, as served by `GET /_sim/stats`. Control-API
/// requests (`/_sim/...`) are counted only in `requests_received`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimStats {
    /// Requests answered (token and push endpoints), = the sum of `by_status`.
    pub requests_total: u64,
    /// Answers by HTTP status.
    pub by_status: BTreeMap<u16, u64>,
    /// Requests answered by the push endpoint, = the sum of `by_outcome`.
    pub pushes_total: u64,
    /// Push answers by outcome (`received`, `dropped`, `channel_throttled`,
    /// `expired`, `revoked`, `domain_blocked`, `not_found`, `wrong_app`,
    /// `unauthorized`, `bad_request`, `too_large`, `method_not_allowed`,
    /// `sender_throttled`, `server_error`, `unavailable`).
    pub by_outcome: BTreeMap<String, u64>,
    /// Requests to the token endpoints.
    pub token_requests: u64,
    /// Tokens issued.
    pub tokens_issued: u64,
    /// TCP connections accepted.
    pub connections: u64,
    /// Connections that spoke h2.
    pub h2_connections: u64,
    /// Connections that spoke HTTP/1.1.
    pub http1_connections: u64,
    /// Connections retired by `goaway_every`.
    pub goaways_sent: u64,
    /// Connections reset by `reset_every`.
    pub connection_resets: u64,
    /// Requests taken off connections, answered or not, control API
    /// included: what `goaway_every` and `reset_every` count. Minus the
    /// answered ones, it shows requests in flight or dropped by a reset.
    pub requests_received: u64,
    /// Whether the per-channel figures below are counted.
    pub channel_stats: bool,
    /// Channels that got at least one push (any answer).
    pub distinct_channels: u64,
    /// The most pushes any one channel got.
    pub max_pushes_per_channel: u64,
    /// `times pushed -> number of channels`.
    pub pushes_histogram: BTreeMap<u64, u64>,
    /// Channels that got at least one push answered 200 `received`.
    pub delivered_channels: u64,
    /// The most `received` answers any one channel got.
    pub max_deliveries_per_channel: u64,
    /// `times delivered -> number of channels`.
    pub deliveries_histogram: BTreeMap<u64, u64>,
    /// Pushes not tracked per channel because the map was full.
    pub untracked_pushes: u64,
    /// h2 streams refused with REFUSED_STREAM by `refused_stream_every`
    /// (counted in `requests_received`, not answered).
    #[serde(default)]
    pub streams_refused: u64,
    /// h2 streams processed, then reset with INTERNAL_ERROR by
    /// `internal_error_every` (their answers are counted as if sent).
    #[serde(default)]
    pub streams_reset: u64,
    /// Header table size flips (SETTINGS 0, then 4096) sent by
    /// `header_table_flip_every`.
    #[serde(default)]
    pub header_table_flips: u64,
    /// Header blocks that did not signal a flipped table size as RFC 7541
    /// section 4.2 requires (each dropped its connection).
    #[serde(default)]
    pub table_size_violations: u64,
    /// Header blocks that followed a flip the client acknowledged and
    /// signalled it as RFC 7541 section 4.2 requires (the smallest size
    /// first).
    #[serde(default)]
    pub table_flips_signalled: u64,
    /// Pushes with valid headers that carried `X-WNS-TTL`.
    #[serde(default)]
    pub pushes_with_ttl: u64,
    /// Pushes with valid headers that carried `X-WNS-RequestForStatus: true`.
    #[serde(default)]
    pub pushes_requesting_status: u64,
    /// Connections reset by an outage window: by `reset_window_ms` after
    /// reading a push, by `refuse_window_ms` when a request arrived.
    #[serde(default)]
    pub outage_resets: u64,
    /// New connections refused (reset as soon as accepted) by
    /// `refuse_window_ms`; not in `connections`.
    #[serde(default)]
    pub outage_refusals: u64,
    /// Pushes read and processed, then left unanswered by
    /// `reset_window_ms` (counted in `pushes_total` and per channel as the
    /// answer they would have had).
    #[serde(default)]
    pub outage_unanswered_pushes: u64,
}

impl SimStats {
    /// Answers with this status.
    pub fn status(&self, code: u16) -> u64 {
        self.by_status.get(&code).copied().unwrap_or(0)
    }

    /// Push answers with this outcome name.
    pub fn outcome(&self, name: &str) -> u64 {
        self.by_outcome.get(name).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_sums_threads_and_reset_starts_from_zero() {
        let s = Stats::new(true);
        let a = s.register_thread();
        let b = s.register_thread();
        a.answered(200);
        b.answered(200);
        b.answered(410);
        a.outcome(Outcome::Received);
        b.outcome(Outcome::Expired);
        s.channel_push(&a, 1, true);
        s.channel_push(&b, 1, true);
        s.channel_push(&b, 2, false);
        a.token_request(true);
        b.token_request(false);
        let snap = s.snapshot();
        assert_eq!(snap.requests_total, 3);
        assert_eq!(snap.status(200), 2);
        assert_eq!(snap.status(410), 1);
        assert_eq!(snap.pushes_total, 2);
        assert_eq!(snap.outcome("expired"), 1);
        assert_eq!(snap.token_requests, 2);
        assert_eq!(snap.tokens_issued, 1);
        assert_eq!(snap.distinct_channels, 2);
        assert_eq!(snap.max_pushes_per_channel, 2);
        assert_eq!(snap.pushes_histogram, BTreeMap::from([(1, 1), (2, 1)]));
        assert_eq!(snap.delivered_channels, 1);
        assert_eq!(snap.deliveries_histogram, BTreeMap::from([(2, 1)]));
        s.reset();
        assert_eq!(
            s.snapshot(),
            SimStats {
                channel_stats: true,
                ..SimStats::default()
            }
        );
        a.answered(404);
        assert_eq!(s.snapshot().status(404), 1);
    }

    #[test]
    fn stats_json_round_trips() {
        let s = Stats::new(false);
        let t = s.register_thread();
        t.answered(503);
        let snap = s.snapshot();
        let json = serde_json::to_string(&snap).unwrap();
        assert!(json.contains("\"503\":1"), "{json}");
        assert_eq!(serde_json::from_str::<SimStats>(&json).unwrap(), snap);
    }
}
