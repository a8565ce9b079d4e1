//! The group-commit thread: the only place that writes and syncs the store.
//!
//! Shards hand mutations to a [`CommitHandle`] (never blocking: a full queue
//! is an immediate [`SubmitError::Overloaded`], which the API answers with
//! 503) and get a [`Ticket`] that resolves once the mutations are durable.
//! The thread takes the first queued submission, drains whatever else is
//! queued up to [`CommitterConfig::max_batch_mutations`], applies the whole
//! batch with one [`Store::apply`] (one sync), calls `on_durable` with the
//! batch (the caller updates the in-memory registry there), and only then
//! completes every ticket of the batch. So a caller that sees its ticket
//! resolve `Ok` also sees its change in the registry.
//!
//! A submission is all-or-nothing: it is never split across two syncs, even
//! when it alone is larger than `max_batch_mutations` (it is then applied as
//! a batch of its own). If `apply` fails, every ticket of that batch gets the
//! error and `on_durable` is not called.
//!
//! Metrics (handles are taken when the thread starts, so install the
//! recorder before [`Committer::start`]):
//! - `wnsgate_store_batch_mutations` (histogram): mutations per batch;
//! - `wnsgate_store_sync_seconds` (histogram): time in `Store::apply`,
//!   that is writing the batch and syncing it;
//! - `wnsgate_store_batches_total` (counter): batches applied (ok or not);
//! - `wnsgate_store_errors_total` (counter): batches whose apply failed;
//! - `wnsgate_store_queue_depth` (gauge): submissions waiting, sampled each
//!   time a batch is taken.

use super::{Mutation, Store, StoreError};
use crate::core::{ChannelUri, DeviceId};
use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use tokio::sync::oneshot;

/// Default bound of the submission queue, in submissions
/// (`store.queue_capacity`). fjall stalls writes for 100 ms at a time when
/// its flushes fall behind; 4096 queued single-record submissions ride out
/// about 0.4 s of that at 10k PUT/s (a bench run at 1024 refused some), and
/// the default leaves room for bursts sixteen times that.
pub const QUEUE_SUBMISSIONS_DEFAULT: usize = 65_536;
/// Default bound of mutations applied (and synced) together
/// (`store.max_batch_mutations`).
pub const BATCH_MUTATIONS_DEFAULT: usize = 4_096;
/// Default bound on how long a new submission may expect to wait for the
/// store (`store.max_commit_wait_ms`): past it, `submit` answers
/// [`SubmitError::Overloaded`] at once rather than queueing.
pub const COMMIT_WAIT_MS_DEFAULT: u64 = 10;
/// Default shortest time between the starts of two syncs
/// (`store.min_sync_interval_us`): at most 1,000 syncs a second, each
/// write waiting at most this much longer for the batch it joins.
pub const SYNC_INTERVAL_US_DEFAULT: u64 = 1_000;

/// Suggested histogram buckets for `wnsgate_store_sync_seconds`.
pub const SYNC_SECONDS_BUCKETS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0,
];
/// Suggested histogram buckets for `wnsgate_store_batch_mutations`.
pub const BATCH_MUTATIONS_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];

pub const METRIC_BATCH_MUTATIONS: &str = "wnsgate_store_batch_mutations";
const METRIC_SYNC_SECONDS: &str = "wnsgate_store_sync_seconds";
const METRIC_BATCHES: &str = "wnsgate_store_batches_total";
const METRIC_ERRORS: &str = "wnsgate_store_errors_total";
const METRIC_QUEUE_DEPTH: &str = "wnsgate_store_queue_depth";

/// Registers help texts and units of the committer's metrics with the
/// installed recorder.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_histogram!(
        METRIC_BATCH_MUTATIONS,
        Unit::Count,
        "Mutations applied by one store batch (one sync)"
    );
    describe_histogram!(
        METRIC_SYNC_SECONDS,
        Unit::Seconds,
        "Time to write and sync one store batch"
    );
    describe_counter!(METRIC_BATCHES, "Store batches applied");
    describe_counter!(METRIC_ERRORS, "Store batches that failed to apply");
    describe_gauge!(
        METRIC_QUEUE_DEPTH,
        "Submissions waiting for the store committer (sampled)"
    );
}

/// Bounds of the committer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitterConfig {
    /// Submissions that may wait in the queue before `submit` answers
    /// [`SubmitError::Overloaded`]. The memory this bounds is
    /// `queue_capacity` times the largest submission the API accepts.
    pub queue_capacity: usize,
    /// Mutations applied together in one batch and one sync (a single
    /// larger submission is applied alone, never split).
    pub max_batch_mutations: usize,
    /// The longest a new submission may expect to wait behind those
    /// already queued, by the committer's recent pace; past it, `submit`
    /// answers [`SubmitError::Overloaded`] at once. `None`: no bound but
    /// `queue_capacity`.
    pub max_wait: Option<std::time::Duration>,
    /// The shortest time between the starts of two batches: a submission
    /// that comes sooner after the last batch started waits for the rest
    /// of it, with whatever else comes meanwhile, and they share one sync.
    /// A submission after a quiet spell is not delayed. Zero: a batch
    /// starts as soon as the last one is done.
    pub min_sync_interval: std::time::Duration,
}

impl Default for CommitterConfig {
    fn default() -> Self {
        CommitterConfig {
            max_wait: Some(std::time::Duration::from_millis(COMMIT_WAIT_MS_DEFAULT)),
            min_sync_interval: std::time::Duration::from_micros(SYNC_INTERVAL_US_DEFAULT),
            queue_capacity: QUEUE_SUBMISSIONS_DEFAULT,
            max_batch_mutations: BATCH_MUTATIONS_DEFAULT,
        }
    }
}

/// Why a submission was not queued. Nothing was changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The store is not keeping up: the write would wait longer than the
    /// bound, or the queue is full. Answer 503.
    #[error("the store is overloaded: a write would wait too long for it")]
    Overloaded,
    /// The committer has shut down (or died).
    #[error("the store is shut down")]
    Closed,
}

type Completion = Result<(), StoreError>;

/// Called on the committer thread with each batch once it is durable.
pub type OnDurable = Box<dyn FnMut(&[Mutation]) + Send>;

/// Answers a device's current channel URI (`None`: absent) for
/// [`Mutation::Guard`]s, from state that reflects every batch already made
/// durable (the registry, which `on_durable` updates).
pub type Lookup = Box<dyn Fn(&DeviceId) -> Option<ChannelUri> + Send>;

struct Submission {
    mutations: Vec<Mutation>,
    done: oneshot::Sender<Completion>,
}

enum Msg {
    Submit(Submission),
    Shutdown,
}

impl Msg {
    fn into_mutations(self) -> Vec<Mutation> {
        match self {
            Msg::Submit(s) => s.mutations,
            Msg::Shutdown => Vec::new(),
        }
    }
}

/// The committer's pace, learnt as it goes, and what waits: how a
/// submission is refused when the store is not keeping up, before it would
/// wait longer than `max_wait`.
///
/// A batch costs about a fixed part (the sync) plus a part per mutation
/// (encoding, writing, the registry). Both are moving averages of what the
/// committer measured. The next batch is a wait no submission can avoid
/// (a slow disk makes it long for everyone alike), so what is bounded is
/// the wait beyond it: `fixed x (queued / max_batch) + per_mutation x
/// queued`, with `queued` counting the new submission.
struct Admission {
    /// Mutations queued and not yet taken by the committer.
    queued: AtomicU64,
    /// Moving averages, in nanoseconds.
    fixed_ns: AtomicU64,
    per_mutation_ns: AtomicU64,
    max_batch: u64,
    max_wait_ns: Option<u64>,
    /// [`CommitterConfig::min_sync_interval`]: the next batch may start
    /// this much after the last one did.
    interval_ns: u64,
    /// When the batch being applied started, in nanoseconds after `base`
    /// plus one; 0 while none is. And its mutations.
    applying_since: AtomicU64,
    applying_len: AtomicU64,
    base: std::time::Instant,
}

/// Batches of at least this many mutations teach the per-mutation cost;
/// smaller ones the fixed cost.
const LEARN_PER_MUTATION_FROM: u64 = 64;

impl Admission {
    fn new(max_batch: usize, max_wait: Option<std::time::Duration>) -> Admission {
        Admission {
            queued: AtomicU64::new(0),
            // Until measured: a 1 ms sync and 2 us per mutation.
            fixed_ns: AtomicU64::new(1_000_000),
            per_mutation_ns: AtomicU64::new(2_000),
            max_batch: max_batch.max(1) as u64,
            max_wait_ns: max_wait.map(|d| d.as_nanos().min(u128::from(u64::MAX)) as u64),
            interval_ns: 0,
            applying_since: AtomicU64::new(0),
            applying_len: AtomicU64::new(0),
            // An origin an hour back, so every offset from it is large
            // (tests backdate the start of a batch).
            base: {
                let now = crate::clock::instant();
                now.checked_sub(std::time::Duration::from_secs(3600))
                    .unwrap_or(now)
            },
        }
    }

    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos().min(u128::from(u64::MAX - 1)) as u64 + 1
    }

    /// The committer starts applying a batch of `n` mutations (`Some`),
    /// or is done (`None`).
    fn applying(&self, n: Option<u64>) {
        self.applying_len.store(n.unwrap_or(0), Ordering::Relaxed);
        let v = if n.is_some() { self.now_ns() } else { 0 };
        self.applying_since.store(v, Ordering::Relaxed);
    }

    /// Whether a submission of `n` mutations may queue now. Bulk work
    /// (imports, sweeps) gets half the bound, so it always leaves room for
    /// single writes.
    fn admits(&self, n: u64, bulk: bool) -> bool {
        let Some(max) = self.max_wait_ns else {
            return true;
        };
        let max = if bulk { max / 2 } else { max };
        let queued = self.queued.load(Ordering::Relaxed);
        // A batch being applied for over twice what its size should take
        // (a stalled disk) is expected to take as long again: what queues
        // now waits for it first.
        let since = self.applying_since.load(Ordering::Relaxed);
        let applying = if since == 0 {
            0
        } else {
            self.now_ns().saturating_sub(since)
        };
        let fixed = self.fixed_ns.load(Ordering::Relaxed);
        let per = self.per_mutation_ns.load(Ordering::Relaxed);
        let expected =
            fixed.saturating_add(per.saturating_mul(self.applying_len.load(Ordering::Relaxed)));
        let stalled = applying > expected.saturating_mul(2);
        if queued == 0 && !stalled {
            // Nothing waits: the submission goes in the next batch however
            // large it is.
            return true;
        }
        let ahead = queued + n;
        let wait = fixed
            .max(self.interval_ns)
            .saturating_mul(ahead / self.max_batch)
            .saturating_add(self.interval_ns)
            .saturating_add(per.saturating_mul(ahead))
            .saturating_add(if stalled { applying } else { 0 });
        wait <= max
    }

    /// Learns from a batch of `mutations` that took `ns`.
    fn learn(&self, mutations: u64, ns: u64) {
        let avg = |a: &AtomicU64, sample: u64| {
            let old = a.load(Ordering::Relaxed);
            a.store(old - old / 8 + sample / 8, Ordering::Relaxed);
        };
        if mutations >= LEARN_PER_MUTATION_FROM {
            let fixed = self.fixed_ns.load(Ordering::Relaxed);
            avg(&self.per_mutation_ns, ns.saturating_sub(fixed) / mutations);
        } else {
            avg(&self.fixed_ns, ns);
        }
    }
}

/// The group-commit thread's entry point.
pub struct Committer;

impl Committer {
    /// Starts the committer thread on `store`. `on_durable` is called on
    /// that thread with every batch after it is durable and before its
    /// tickets complete, in submission order.
    ///
    /// # Panics
    ///
    /// If the thread cannot be spawned.
    pub fn start(
        store: Arc<dyn Store>,
        on_durable: OnDurable,
        cfg: CommitterConfig,
    ) -> (CommitHandle, CommitterJoin) {
        Self::start_with_lookup(store, on_durable, Box::new(|_| None), cfg)
    }

    /// [`Committer::start`] with the lookup that evaluates guards.
    ///
    /// # Panics
    ///
    /// If the thread cannot be spawned.
    pub fn start_with_lookup(
        store: Arc<dyn Store>,
        on_durable: OnDurable,
        lookup: Lookup,
        cfg: CommitterConfig,
    ) -> (CommitHandle, CommitterJoin) {
        let (tx, rx) = crossbeam_channel::bounded(cfg.queue_capacity.max(1));
        let closed = Arc::new(AtomicBool::new(false));
        let max_batch = cfg.max_batch_mutations.max(1);
        let mut admission = Admission::new(max_batch, cfg.max_wait);
        admission.interval_ns = cfg.min_sync_interval.as_nanos().min(u128::from(u64::MAX)) as u64;
        let admission = Arc::new(admission);
        let pace = admission.clone();
        let thread = std::thread::Builder::new()
            .name("wnsgate-store-commit".into())
            .spawn(move || {
                CommitLoop::new(store, on_durable, lookup, max_batch, pace)
                    .spaced(cfg.min_sync_interval)
                    .run(&rx)
            })
            .expect("spawning the store committer thread");
        (
            CommitHandle {
                tx: tx.clone(),
                closed: closed.clone(),
                admission,
            },
            CommitterJoin {
                tx,
                closed,
                thread: Some(thread),
            },
        )
    }
}

/// How a submission is admitted.
#[derive(Clone, Copy)]
enum Class {
    /// An API write: refused when it would wait past the bound.
    Single,
    /// An import's or a sweep's: refused at half the bound (it waits for
    /// room and tries again).
    Bulk,
    /// The store side of a change already made in memory: refused only by
    /// a full queue.
    FollowUp,
}

/// Submits mutations to the committer. Cheap to clone; usable from any
/// thread or task.
#[derive(Clone)]
pub struct CommitHandle {
    tx: Sender<Msg>,
    closed: Arc<AtomicBool>,
    admission: Arc<Admission>,
}

impl CommitHandle {
    /// Queues `mutations` to be applied atomically and durably. Never
    /// blocks. The returned ticket resolves once they are synced (and
    /// `on_durable` has seen them), or with the store's error.
    pub fn submit(&self, mutations: Vec<Mutation>) -> Result<Ticket, SubmitError> {
        self.try_submit(mutations).map_err(|(e, _)| e)
    }

    /// Like [`CommitHandle::submit`], but a refused submission hands the
    /// mutations back so the caller can retry without copying them.
    pub fn try_submit(
        &self,
        mutations: Vec<Mutation>,
    ) -> Result<Ticket, (SubmitError, Vec<Mutation>)> {
        self.try_submit_as(mutations, Class::Single)
    }

    /// [`CommitHandle::try_submit`] for bulk work that waits for room when
    /// refused (an import, a sweep): it is refused at half the wait bound,
    /// so single writes queued behind it are never refused because of it.
    pub fn try_submit_bulk(
        &self,
        mutations: Vec<Mutation>,
    ) -> Result<Ticket, (SubmitError, Vec<Mutation>)> {
        self.try_submit_as(mutations, Class::Bulk)
    }

    /// [`CommitHandle::submit`] for the store side of a change already
    /// made in memory (the refresh queue's), which must not be lost to the
    /// wait bound: it is refused only when the queue is full or closed.
    /// For small, infrequent submissions only: it does not wait its turn.
    pub fn submit_follow_up(&self, mutations: Vec<Mutation>) -> Result<Ticket, SubmitError> {
        self.try_submit_as(mutations, Class::FollowUp)
            .map_err(|(e, _)| e)
    }

    fn try_submit_as(
        &self,
        mutations: Vec<Mutation>,
        class: Class,
    ) -> Result<Ticket, (SubmitError, Vec<Mutation>)> {
        if self.closed.load(Ordering::Acquire) {
            return Err((SubmitError::Closed, mutations));
        }
        let n = mutations.len() as u64;
        let admitted = match class {
            Class::Single => self.admission.admits(n, false),
            Class::Bulk => self.admission.admits(n, true),
            Class::FollowUp => true,
        };
        if !admitted {
            return Err((SubmitError::Overloaded, mutations));
        }
        let (done, rx) = oneshot::channel();
        // Counted before it is visible to the committer, which subtracts it.
        self.admission.queued.fetch_add(n, Ordering::Relaxed);
        match self
            .tx
            .try_send(Msg::Submit(Submission { mutations, done }))
        {
            Ok(()) => Ok(Ticket { rx }),
            Err(TrySendError::Full(msg)) => {
                self.admission.queued.fetch_sub(n, Ordering::Relaxed);
                Err((SubmitError::Overloaded, msg.into_mutations()))
            }
            Err(TrySendError::Disconnected(msg)) => {
                self.admission.queued.fetch_sub(n, Ordering::Relaxed);
                Err((SubmitError::Closed, msg.into_mutations()))
            }
        }
    }

    /// Submissions the queue holds before `submit` answers
    /// [`SubmitError::Overloaded`].
    pub fn capacity(&self) -> usize {
        self.tx.capacity().unwrap_or(usize::MAX)
    }

    /// Submissions currently waiting in the queue.
    pub fn queue_len(&self) -> usize {
        self.tx.len()
    }
}

/// Resolves when a submission is durable (`Ok`) or failed (`Err`; nothing
/// of it was applied).
///
/// Await it from async code, or call [`Ticket::wait_blocking`] from a plain
/// thread.
#[must_use = "a ticket tells whether the mutations became durable"]
pub struct Ticket {
    rx: oneshot::Receiver<Completion>,
}

impl Ticket {
    /// Blocks the current thread until the submission completes.
    ///
    /// # Panics
    ///
    /// If called from within an asynchronous execution context (await the
    /// ticket there instead).
    pub fn wait_blocking(self) -> Result<(), StoreError> {
        self.rx.blocking_recv().unwrap_or_else(|_| Err(stopped()))
    }
}

impl Future for Ticket {
    type Output = Result<(), StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or_else(|_| Err(stopped())))
    }
}

/// The error of a ticket whose submission was dropped unapplied: the
/// committer stopped (it died, or the submission raced with shutdown).
fn stopped() -> StoreError {
    StoreError::Io("the store committer stopped before applying the mutation".into())
}

/// Owns the committer thread. [`CommitterJoin::shutdown`] stops it cleanly;
/// dropping it does the same.
pub struct CommitterJoin {
    tx: Sender<Msg>,
    closed: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl CommitterJoin {
    /// Stops accepting submissions (`submit` answers
    /// [`SubmitError::Closed`]), applies and syncs everything already
    /// queued, completing its tickets, and joins the thread.
    ///
    /// Fails only if the committer thread panicked (for example inside
    /// `on_durable`); tickets it left behind resolve with an error.
    pub fn shutdown(mut self) -> Result<(), StoreError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), StoreError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.closed.store(true, Ordering::Release);
        // Blocks while the queue is full; the thread is draining it. Fails
        // only if the thread is gone, which the join reports.
        let _ = self.tx.send(Msg::Shutdown);
        thread
            .join()
            .map_err(|_| StoreError::Io("the store committer thread panicked".into()))
    }
}

impl Drop for CommitterJoin {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// State of the committer thread.
struct CommitLoop {
    store: Arc<dyn Store>,
    on_durable: OnDurable,
    lookup: Lookup,
    max_batch: usize,
    pace: Arc<Admission>,
    /// [`CommitterConfig::min_sync_interval`], and when the last batch
    /// started.
    min_interval: std::time::Duration,
    last_start: Option<std::time::Instant>,
    /// A submission taken from the queue that did not fit the last batch.
    carried: Option<Submission>,
    shutting_down: bool,
    /// Reused across batches.
    batch: Vec<Mutation>,
    subs: Vec<Submission>,
    m_batch_mutations: metrics::Histogram,
    m_sync_seconds: metrics::Histogram,
    m_batches: metrics::Counter,
    m_errors: metrics::Counter,
    m_queue_depth: metrics::Gauge,
}

impl CommitLoop {
    fn new(
        store: Arc<dyn Store>,
        on_durable: OnDurable,
        lookup: Lookup,
        max_batch: usize,
        pace: Arc<Admission>,
    ) -> CommitLoop {
        CommitLoop {
            store,
            on_durable,
            lookup,
            max_batch,
            pace,
            min_interval: std::time::Duration::ZERO,
            last_start: None,
            carried: None,
            shutting_down: false,
            batch: Vec::new(),
            subs: Vec::new(),
            m_batch_mutations: metrics::histogram!(METRIC_BATCH_MUTATIONS),
            m_sync_seconds: metrics::histogram!(METRIC_SYNC_SECONDS),
            m_batches: metrics::counter!(METRIC_BATCHES),
            m_errors: metrics::counter!(METRIC_ERRORS),
            m_queue_depth: metrics::gauge!(METRIC_QUEUE_DEPTH),
        }
    }

    /// Sets the shortest time between the starts of two batches.
    fn spaced(mut self, min_interval: std::time::Duration) -> CommitLoop {
        self.min_interval = min_interval;
        self
    }

    fn run(mut self, rx: &Receiver<Msg>) {
        while let Some(first) = self.next_first(rx) {
            self.space_out();
            self.gather(first, rx);
            self.m_queue_depth.set(rx.len() as f64);
            self.commit();
        }
        // Returning drops `rx`: a submission that raced with shutdown past
        // the last drain is dropped, and its ticket resolves with an error.
    }

    /// The first submission of the next batch; `None` once shut down and
    /// drained (or every sender is gone).
    fn next_first(&mut self, rx: &Receiver<Msg>) -> Option<Submission> {
        if let Some(s) = self.carried.take() {
            return Some(s);
        }
        loop {
            let msg = if self.shutting_down {
                rx.try_recv().ok()?
            } else {
                rx.recv().ok()?
            };
            match msg {
                Msg::Submit(s) => return Some(s),
                Msg::Shutdown => self.shutting_down = true,
            }
        }
    }

    /// Waits until the minimum interval since the last batch started has
    /// passed (not while shutting down), so that what comes meanwhile
    /// shares the next sync; then marks the new batch's start.
    fn space_out(&mut self) {
        if let Some(last) = self.last_start {
            let since = crate::clock::instant().saturating_duration_since(last);
            if since < self.min_interval && !self.shutting_down {
                std::thread::sleep(self.min_interval - since);
            }
        }
        self.last_start = Some(crate::clock::instant());
    }

    /// Adds queued submissions to `first` while they fit `max_batch`.
    fn gather(&mut self, first: Submission, rx: &Receiver<Msg>) {
        let mut n = first.mutations.len();
        self.subs.push(first);
        while n < self.max_batch {
            match rx.try_recv() {
                Ok(Msg::Submit(s)) => {
                    if n + s.mutations.len() > self.max_batch {
                        self.carried = Some(s);
                        break;
                    }
                    n += s.mutations.len();
                    self.subs.push(s);
                }
                Ok(Msg::Shutdown) => self.shutting_down = true,
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
    }

    /// Applies the gathered submissions as one batch and completes them.
    fn commit(&mut self) {
        self.batch.clear();
        let taken: u64 = self.subs.iter().map(|s| s.mutations.len() as u64).sum();
        self.pace.queued.fetch_sub(taken, Ordering::Relaxed);
        let cycle = crate::clock::instant();
        let conflicts = self.check_guards();
        for s in &mut self.subs {
            self.batch.append(&mut s.mutations);
        }
        let result = if self.batch.is_empty() {
            // Only empty submissions: everything before them is already
            // durable, so there is nothing to sync.
            Ok(())
        } else {
            let started = crate::clock::instant();
            self.pace.applying(Some(self.batch.len() as u64));
            let result = self.store.apply(&self.batch);
            self.pace.applying(None);
            self.m_sync_seconds.record(started.elapsed().as_secs_f64());
            self.m_batch_mutations.record(self.batch.len() as f64);
            self.m_batches.increment(1);
            result
        };
        match result {
            Ok(()) => {
                if !self.batch.is_empty() {
                    (self.on_durable)(&self.batch);
                    let ns = cycle.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
                    self.pace.learn(self.batch.len() as u64, ns);
                }
                for (i, s) in self.subs.drain(..).enumerate() {
                    let result = match conflicts.iter().find(|(at, _)| *at == i) {
                        Some((_, id)) => Err(StoreError::Conflict(id.clone())),
                        None => Ok(()),
                    };
                    // The submitter may have stopped waiting; that is fine.
                    let _ = s.done.send(result);
                }
            }
            Err(e) => {
                self.m_errors.increment(1);
                tracing::error!(
                    error = %e,
                    mutations = self.batch.len(),
                    submissions = self.subs.len(),
                    "store batch failed; its submissions are refused"
                );
                for s in self.subs.drain(..) {
                    let _ = s.done.send(Err(e.clone()));
                }
            }
        }
        self.batch.clear();
        // One oversized submission must not pin its memory forever.
        self.batch.shrink_to(self.max_batch);
    }
}

impl CommitLoop {
    /// Evaluates the guard of every gathered submission that starts with
    /// one, in order, against the durable state plus the submissions before
    /// it in this batch. A submission whose guard fails is emptied. Returns
    /// the failed submissions' indexes with their device ids.
    fn check_guards(&mut self) -> Vec<(usize, String)> {
        let guarded = |s: &Submission| matches!(s.mutations.first(), Some(Mutation::Guard { .. }));
        if !self.subs.iter().any(guarded) {
            return Vec::new();
        }
        // Channel URIs written by earlier submissions of this batch.
        let mut overlay: HashMap<DeviceId, Option<ChannelUri>> = HashMap::new();
        let mut conflicts = Vec::new();
        for (i, s) in self.subs.iter_mut().enumerate() {
            if let Some(Mutation::Guard {
                device_id,
                channel_uri,
            }) = s.mutations.first()
            {
                let current = match overlay.get(device_id) {
                    Some(c) => c.clone(),
                    None => (self.lookup)(device_id),
                };
                if current != *channel_uri {
                    conflicts.push((i, device_id.as_str().to_owned()));
                    s.mutations.clear();
                    continue;
                }
            }
            for m in &s.mutations {
                match m {
                    Mutation::Put(r) => {
                        overlay.insert(r.device_id.clone(), Some(r.channel_uri.clone()));
                    }
                    Mutation::Delete(id) => {
                        overlay.insert(id.clone(), None);
                    }
                    _ => {}
                }
            }
        }
        conflicts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{ChannelUri, DeviceId, DeviceRecord, Pfn, UnixTime};
    use crate::store::{FjallOptions, FjallStore};
    use crossbeam_channel as chan;
    use std::collections::HashSet;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;
    use std::time::Duration;

    fn put(id: &str) -> Mutation {
        Mutation::Put(DeviceRecord {
            device_id: DeviceId::parse(id).unwrap(),
            pfn: Pfn::parse("Contoso.MDM_8wekyb3d8bbwe").unwrap(),
            channel_uri: ChannelUri::from_trusted(format!(
                "https://db5.notify.windows.com/?token=AwYAAAD{id}"
            ))
            .unwrap(),
            provider_id: None,
            issued_at: UnixTime(1_800_000_000),
            dead: None,
            refresh: None,
        })
    }

    fn id_of(m: &Mutation) -> &str {
        match m {
            Mutation::Put(r) => r.device_id.as_str(),
            Mutation::Delete(id) => id.as_str(),
            Mutation::Guard { device_id, .. } => device_id.as_str(),
            Mutation::PutJob(j) => j.device_id.as_str(),
            Mutation::DeleteJob(_) => "",
        }
    }

    /// A store that records batch sizes and can block or fail on demand,
    /// optionally writing through to a real store.
    #[derive(Default)]
    struct TestStore {
        inner: Option<FjallStore>,
        batches: Mutex<Vec<usize>>,
        /// When set, `apply` reports entering and then waits for a permit.
        gate: Option<(chan::Sender<()>, chan::Receiver<()>)>,
        fail: bool,
        delay: Option<Duration>,
    }

    impl Store for TestStore {
        fn apply(&self, batch: &[Mutation]) -> Result<(), StoreError> {
            self.batches.lock().unwrap().push(batch.len());
            if let Some((entered, permit)) = &self.gate {
                entered.send(()).unwrap();
                permit.recv().unwrap();
            }
            if let Some(d) = self.delay {
                std::thread::sleep(d);
            }
            if self.fail {
                return Err(StoreError::Io("disk on fire".into()));
            }
            match &self.inner {
                Some(s) => s.apply(batch),
                None => Ok(()),
            }
        }
        fn load(
            &self,
            threads: usize,
            into: &dyn crate::store::Restore,
        ) -> Result<crate::store::Loaded, StoreError> {
            self.inner.as_ref().unwrap().load(threads, into)
        }
        fn scan_jobs(
            &self,
            _: &mut dyn FnMut(crate::core::refresh::Job),
        ) -> Result<u64, StoreError> {
            unimplemented!()
        }
    }

    fn gated() -> (TestStore, chan::Receiver<()>, chan::Sender<()>) {
        let (entered_tx, entered_rx) = chan::unbounded();
        let (permit_tx, permit_rx) = chan::unbounded();
        let store = TestStore {
            gate: Some((entered_tx, permit_rx)),
            ..TestStore::default()
        };
        (store, entered_rx, permit_tx)
    }

    type Log = Arc<Mutex<Vec<String>>>;

    fn logging() -> (Log, OnDurable) {
        let log: Log = Arc::default();
        let l = log.clone();
        let f = Box::new(move |b: &[Mutation]| {
            l.lock()
                .unwrap()
                .extend(b.iter().map(|m| id_of(m).to_owned()));
        });
        (log, f)
    }

    fn cfg(queue_capacity: usize, max_batch_mutations: usize) -> CommitterConfig {
        CommitterConfig {
            max_wait: None,
            queue_capacity,
            max_batch_mutations,
            min_sync_interval: Duration::ZERO,
        }
    }

    #[test]
    fn writes_that_come_within_the_sync_interval_share_the_next_batch() {
        let store = Arc::new(TestStore::default());
        let (log, on_durable) = logging();
        let config = CommitterConfig {
            // Long enough that every submission below comes within it.
            min_sync_interval: Duration::from_secs(2),
            ..cfg(1000, 1000)
        };
        let (handle, join) = Committer::start(store.clone(), on_durable, config);
        // After a quiet spell the first write goes alone, at once.
        handle
            .submit(vec![put("first")])
            .unwrap()
            .wait_blocking()
            .unwrap();
        // The committer takes the next one, then waits out the interval;
        // the rest come meanwhile and share its sync.
        let tickets: Vec<_> = (0..10)
            .map(|i| handle.submit(vec![put(&format!("d{i}"))]).unwrap())
            .collect();
        for t in tickets {
            t.wait_blocking().unwrap();
        }
        join.shutdown().unwrap();
        assert_eq!(*store.batches.lock().unwrap(), vec![1, 10]);
        assert_eq!(log.lock().unwrap().len(), 11);
    }

    #[test]
    fn concurrent_submitters_are_group_committed_in_order() {
        const THREADS: usize = 6;
        const SUBMISSIONS: usize = 150;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(TestStore {
            inner: Some(FjallStore::open(dir.path(), FjallOptions::default()).unwrap()),
            ..TestStore::default()
        });
        let durable: Arc<Mutex<HashSet<String>>> = Arc::default();
        let (log, log_fn) = logging();
        let d = durable.clone();
        let mut log_fn = log_fn;
        let on_durable = Box::new(move |b: &[Mutation]| {
            d.lock()
                .unwrap()
                .extend(b.iter().map(|m| id_of(m).to_owned()));
            log_fn(b);
        });
        let (handle, join) = Committer::start(store.clone(), on_durable, cfg(4096, 500));
        let submitted = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (handle, durable, submitted) = (handle.clone(), &durable, &submitted);
                s.spawn(move || {
                    // Even threads submit everything, then wait; odd threads
                    // wait for each ticket before the next submission.
                    let mut pending = Vec::new();
                    for i in 0..SUBMISSIONS {
                        let ids: Vec<String> =
                            (0..1 + i % 3).map(|k| format!("t{t}-{i:04}-{k}")).collect();
                        let ticket = handle
                            .submit(ids.iter().map(|id| put(id)).collect())
                            .unwrap();
                        submitted.fetch_add(1, Ordering::Relaxed);
                        if t % 2 == 0 {
                            pending.push((ids, ticket));
                        } else {
                            ticket.wait_blocking().unwrap();
                            let d = durable.lock().unwrap();
                            assert!(ids.iter().all(|id| d.contains(id)));
                        }
                    }
                    for (ids, ticket) in pending {
                        ticket.wait_blocking().unwrap();
                        let d = durable.lock().unwrap();
                        assert!(
                            ids.iter().all(|id| d.contains(id)),
                            "acked before on_durable"
                        );
                    }
                });
            }
        });
        join.shutdown().unwrap();

        let log = log.lock().unwrap();
        let total: usize = (0..SUBMISSIONS).map(|i| 1 + i % 3).sum::<usize>() * THREADS;
        assert_eq!(log.len(), total, "every mutation exactly once");
        assert_eq!(log.iter().collect::<HashSet<_>>().len(), total);
        for t in 0..THREADS {
            let mine: Vec<&String> = log
                .iter()
                .filter(|id| id.starts_with(&format!("t{t}-")))
                .collect();
            assert!(mine.windows(2).all(|w| w[0] < w[1]), "order of t{t}");
        }
        let syncs = store.batches.lock().unwrap().len();
        let submissions = submitted.into_inner();
        assert!(syncs < submissions, "{syncs} syncs for {submissions}");
        assert!(store.batches.lock().unwrap().iter().all(|&n| n <= 500));

        // And it is all on disk.
        let mut n = 0;
        store
            .inner
            .as_ref()
            .unwrap()
            .scan_all(&mut |_| n += 1)
            .unwrap();
        assert_eq!(n, total);
    }

    #[test]
    fn full_queue_is_overloaded_not_blocking() {
        let (store, entered, permit) = gated();
        let store = Arc::new(store);
        let (log, on_durable) = logging();
        let (handle, join) = Committer::start(store.clone(), on_durable, cfg(2, 100));
        let first = handle.submit(vec![put("a")]).unwrap();
        entered.recv().unwrap(); // the thread holds "a" inside apply
        let queued: Vec<Ticket> = ["b", "c"]
            .iter()
            .map(|id| handle.submit(vec![put(id)]).unwrap())
            .collect();
        assert_eq!(handle.queue_len(), 2);
        assert_eq!(
            handle.submit(vec![put("d")]).err(),
            Some(SubmitError::Overloaded)
        );
        permit.send(()).unwrap();
        first.wait_blocking().unwrap();
        entered.recv().unwrap();
        permit.send(()).unwrap();
        for t in queued {
            t.wait_blocking().unwrap();
        }
        join.shutdown().unwrap();
        assert_eq!(*log.lock().unwrap(), ["a", "b", "c"]);
        assert_eq!(*store.batches.lock().unwrap(), [1, 2]);
    }

    #[test]
    fn failed_apply_fails_every_ticket_and_skips_on_durable() {
        let (mut store, entered, permit) = gated();
        store.fail = true;
        let (log, on_durable) = logging();
        let (handle, join) = Committer::start(Arc::new(store), on_durable, cfg(16, 100));
        let first = handle.submit(vec![put("a")]).unwrap();
        entered.recv().unwrap();
        let rest: Vec<Ticket> = ["b", "c"]
            .iter()
            .map(|id| handle.submit(vec![put(id)]).unwrap())
            .collect();
        permit.send(()).unwrap();
        permit.send(()).unwrap();
        for t in std::iter::once(first).chain(rest) {
            let err = t.wait_blocking().unwrap_err();
            assert!(err.to_string().contains("disk on fire"), "{err}");
        }
        join.shutdown().unwrap();
        assert!(log.lock().unwrap().is_empty());
    }

    #[test]
    fn submissions_are_never_split_across_batches() {
        let (store, entered, permit) = gated();
        let store = Arc::new(store);
        let (log, on_durable) = logging();
        let (handle, join) = Committer::start(store.clone(), on_durable, cfg(16, 10));
        let many = |p: &str, n: usize| (0..n).map(|i| put(&format!("{p}{i:02}"))).collect();
        let a = handle.submit(many("a", 3)).unwrap();
        entered.recv().unwrap();
        let tickets = [
            handle.submit(many("b", 25)).unwrap(),
            handle.submit(many("c", 4)).unwrap(),
            handle.submit(many("d", 4)).unwrap(),
            handle.submit(many("e", 3)).unwrap(),
        ];
        for _ in 0..4 {
            permit.send(()).unwrap();
        }
        a.wait_blocking().unwrap();
        for t in tickets {
            t.wait_blocking().unwrap();
        }
        join.shutdown().unwrap();
        // [a], then b alone (over the limit), then c+d (8), then e (8+3 > 10).
        assert_eq!(*store.batches.lock().unwrap(), [3, 25, 8, 3]);
        assert_eq!(log.lock().unwrap().len(), 39);
    }

    #[test]
    fn a_write_that_would_wait_too_long_is_refused_at_once() {
        let (store, entered, permit) = gated();
        let (_log, on_durable) = logging();
        let config = CommitterConfig {
            max_wait: Some(Duration::from_millis(1)),
            ..cfg(1_000_000, 100_000)
        };
        let (handle, join) = Committer::start(Arc::new(store), on_durable, config);
        let many = |p: &str| (0..100).map(|i| put(&format!("{p}{i:03}"))).collect();
        // The first goes straight in (nothing waits ahead of it), however
        // large, and holds the committer.
        let first = handle.submit(many("a")).unwrap();
        entered.recv().unwrap();
        // The held batch counts as a sync under way, not a stalled one
        // (a stall is below), whatever time this test takes.
        handle.admission.applying(None);
        // At the assumed 2 us per mutation, 1 ms is 500 mutations ahead.
        let mut queued = Vec::new();
        let refused = loop {
            match handle.submit(many(&format!("q{}-", queued.len()))) {
                Ok(t) => queued.push(t),
                Err(e) => break Some(e),
            }
            if queued.len() == 100 {
                break None;
            }
        };
        let waiting = handle.queue_len();
        // A batch applied for 50 ms: even one mutation waits too long.
        let a = &handle.admission;
        a.applying_since
            .store(a.now_ns().saturating_sub(50_000_000), Ordering::Relaxed);
        let stalled = handle.submit(vec![put("s")]).err();
        // The store side of a change already made in memory still goes in.
        let follow_up = handle.submit_follow_up(vec![put("f")]);
        // Let the committer go before anything can fail.
        drop(permit);
        assert_eq!(stalled, Some(SubmitError::Overloaded));
        assert!(
            follow_up.is_ok(),
            "a follow-up is refused only by a full queue"
        );
        assert_eq!(refused, Some(SubmitError::Overloaded));
        assert_eq!(queued.len(), 5, "500 mutations ahead admitted, 600 not");
        // Far below the queue's capacity.
        assert_eq!(waiting, 5);
        let _ = first.wait_blocking();
        drop(queued);
        drop(join);
    }

    #[test]
    fn the_pace_is_learnt_from_batches() {
        let a = Admission::new(1000, Some(Duration::from_millis(10)));
        a.queued.store(1, Ordering::Relaxed);
        // 3001 mutations ahead: 3 more syncs of 1 ms and 3001 x 2 us.
        assert!(a.admits(3000, false));
        assert!(!a.admits(4000, false));
        // Bulk work gets half: 1001 x 2 us + 1 ms = 3 ms, 3001 not.
        assert!(a.admits(1000, true));
        assert!(!a.admits(3000, true));
        // Batches that take 100 us per mutation: 10 ms is 100 mutations.
        for _ in 0..64 {
            a.learn(1000, 100_000_000);
        }
        assert!(!a.admits(200, false));
        assert!(a.admits(50, false));
        // Nothing queued: always admitted.
        a.queued.store(0, Ordering::Relaxed);
        assert!(a.admits(1_000_000, true));
        // A batch applied for longer than twice a sync (a stalled disk)
        // counts as much again: past the bound, even an empty queue refuses.
        let a = Admission::new(1000, Some(Duration::from_millis(10)));
        a.applying_since
            .store(a.now_ns() - 1_500_000, Ordering::Relaxed);
        assert!(a.admits(1, false));
        a.applying_since
            .store(a.now_ns() - 3_000_000, Ordering::Relaxed);
        assert!(a.admits(1, false));
        a.applying_since
            .store(a.now_ns() - 6_000_000, Ordering::Relaxed);
        assert!(a.admits(1, false));
        assert!(!a.admits(1, true), "6 ms of stall is past bulk's 5 ms");
        a.applying_since
            .store(a.now_ns().saturating_sub(11_000_000), Ordering::Relaxed);
        assert!(!a.admits(1, false));
        a.applying(None);
        assert!(a.admits(1, false));
        // A large batch takes longer before it counts as stalled: 2000
        // mutations at 2 us and 1 ms are 5 ms, so 6 ms is not a stall.
        a.applying(Some(2000));
        a.applying_since
            .store(a.now_ns() - 6_000_000, Ordering::Relaxed);
        assert!(a.admits(1, false));
        a.applying_since
            .store(a.now_ns() - 11_000_000, Ordering::Relaxed);
        assert!(!a.admits(1, false));
        // No bound.
        let free = Admission::new(10, None);
        free.queued.store(1_000_000, Ordering::Relaxed);
        assert!(free.admits(1_000_000, false));
    }

    #[test]
    fn shutdown_drains_the_queue_then_refuses() {
        let store = Arc::new(TestStore {
            delay: Some(Duration::from_millis(2)),
            ..TestStore::default()
        });
        let (log, on_durable) = logging();
        let (handle, join) = Committer::start(store.clone(), on_durable, cfg(256, 3));
        let tickets: Vec<Ticket> = (0..60)
            .map(|i| handle.submit(vec![put(&format!("x{i:02}"))]).unwrap())
            .collect();
        join.shutdown().unwrap();
        assert_eq!(log.lock().unwrap().len(), 60);
        for t in tickets {
            t.wait_blocking().unwrap();
        }
        assert_eq!(
            handle.submit(vec![put("late")]).err(),
            Some(SubmitError::Closed)
        );
        assert!(store.batches.lock().unwrap().len() >= 20);
    }

    #[test]
    fn tickets_are_futures_and_empty_submissions_complete() {
        let store = Arc::new(TestStore::default());
        let (log, on_durable) = logging();
        let (handle, join) = Committer::start(store.clone(), on_durable, cfg(8, 8));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            handle.submit(vec![put("a")]).unwrap().await.unwrap();
            handle.submit(Vec::new()).unwrap().await.unwrap();
        });
        drop(join);
        assert_eq!(*log.lock().unwrap(), ["a"]);
        assert_eq!(*store.batches.lock().unwrap(), [1]);
        assert_eq!(handle.submit(vec![]).err(), Some(SubmitError::Closed));
    }

    #[test]
    fn a_panicking_on_durable_closes_the_committer() {
        let store = Arc::new(TestStore::default());
        let (handle, join) = Committer::start(
            store,
            Box::new(|_: &[Mutation]| panic!("registry bug")),
            cfg(8, 8),
        );
        let err = handle.submit(vec![put("a")]).unwrap().wait_blocking();
        assert!(err.is_err());
        assert!(join.shutdown().is_err());
        assert_eq!(handle.submit(vec![]).err(), Some(SubmitError::Closed));
    }

    #[test]
    fn guards_apply_only_when_the_channel_is_unchanged() {
        let (log, log_fn) = logging();
        // The durable state: dev-a has token A.
        let current = put("a");
        let Mutation::Put(rec_a) = current.clone() else {
            unreachable!()
        };
        let uri_a = rec_a.channel_uri.clone();
        let lookup_uri = uri_a.clone();
        let (h, join) = Committer::start_with_lookup(
            Arc::new(TestStore::default()),
            log_fn,
            Box::new(move |id: &DeviceId| (id.as_str() == "a").then(|| lookup_uri.clone())),
            cfg(16, 1024),
        );
        let guard = |uri: Option<ChannelUri>| Mutation::Guard {
            device_id: DeviceId::parse("a").unwrap(),
            channel_uri: uri,
        };
        // Holds against the durable state.
        let ok = h
            .submit(vec![guard(Some(uri_a.clone())), put("x")])
            .unwrap();
        assert!(ok.wait_blocking().is_ok());
        // Fails against it: nothing of the submission applies.
        let bad = h.submit(vec![guard(None), put("y")]).unwrap();
        assert!(matches!(bad.wait_blocking(), Err(StoreError::Conflict(id)) if id == "a"));
        join.shutdown().unwrap();
        let seen: Vec<String> = log.lock().unwrap().clone();
        assert!(seen.contains(&"x".to_owned()), "{seen:?}");
        assert!(!seen.contains(&"y".to_owned()), "{seen:?}");
    }

    #[test]
    fn a_guard_sees_earlier_submissions_of_the_same_batch() {
        let (store, entered, permit) = gated();
        let (log, log_fn) = logging();
        let (h, join) = Committer::start_with_lookup(
            Arc::new(store),
            log_fn,
            Box::new(|_: &DeviceId| None),
            cfg(16, 1024),
        );
        // Hold the committer in a first batch so that the next three
        // submissions are gathered into one batch.
        let first = h.submit(vec![put("first")]).unwrap();
        entered.recv().unwrap();
        let Mutation::Put(rec) = put("a") else {
            unreachable!()
        };
        let uri = rec.channel_uri.clone();
        let t1 = h.submit(vec![Mutation::Put(rec)]).unwrap();
        let guard = |u: Option<ChannelUri>| Mutation::Guard {
            device_id: DeviceId::parse("a").unwrap(),
            channel_uri: u,
        };
        // Absent in the durable state, but written just before: this guard
        // on "absent" fails and the one on the new URI holds.
        let t2 = h.submit(vec![guard(None), put("stale")]).unwrap();
        let t3 = h.submit(vec![guard(Some(uri)), put("fresh")]).unwrap();
        permit.send(()).unwrap();
        permit.send(()).unwrap();
        first.wait_blocking().unwrap();
        t1.wait_blocking().unwrap();
        assert!(matches!(t2.wait_blocking(), Err(StoreError::Conflict(_))));
        t3.wait_blocking().unwrap();
        drop(permit);
        join.shutdown().unwrap();
        let seen: Vec<String> = log.lock().unwrap().clone();
        assert!(seen.contains(&"fresh".to_owned()) && !seen.contains(&"stale".to_owned()));
    }
}
