//! Bulk wakes: a job selects devices (listed ids, a lifecycle state, or
//! all), paces itself, keeps a bounded number of wakes in flight, and counts
//! outcomes. Memory does not grow with the number of devices selected.
//!
//! The job streams through the store in device-id order a page at a time
//! (or through the ids it was given) and deals the pages to the shards in
//! turn ([`Dealer`]); each shard sends its share from one task for the
//! whole job ([`super::send`]).

use super::limits::{
    JOBS_REMEMBERED_MAX, JOBS_RUNNING_MAX, JOB_WAKES_INFLIGHT_MAX, PAGES_AHEAD_MAX, PAGE_DEVICES,
    PAGE_SCAN_RECORDS_MAX,
};
use super::send::{send_batches, Batch};
use super::transport::Transport;
use super::{WakeReport, WakeService};
use crate::clock;
use crate::core::wns::retry::Pacer;
use crate::core::wns::{Outcome, PushResult};
use crate::core::{DeviceRecord, LifecycleState};
use crate::telemetry::metrics as m;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Which devices a bulk wake wakes.
pub enum Selection {
    /// These ids, in this order (ids not registered count as failed).
    Ids(Vec<String>),
    /// Every device in this lifecycle state when its page is read, or
    /// every device.
    Filter(Option<LifecycleState>),
}

/// Why a bulk wake was not started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{JOBS_RUNNING_MAX} bulk wakes are already running")]
    TooManyJobs,
}

/// One bulk wake, running or finished: its progress is read while it runs.
pub struct Job {
    id: String,
    created_at: String,
    rate_per_second: Option<u32>,
    selected: AtomicU64,
    received: AtomicU64,
    dropped: AtomicU64,
    throttled: AtomicU64,
    expired: AtomicU64,
    failed: AtomicU64,
    /// Selected but not sent because the job was cancelled.
    not_sent: AtomicU64,
    selection_done: AtomicBool,
    cancelled: AtomicBool,
    finished: AtomicBool,
    /// Held while cancelling and while finishing, so a job is either
    /// cancelled before it finished or answered as it finished.
    ending: Mutex<()>,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Still reading the devices it selects.
    Selecting,
    /// Every device selected; wakes going out.
    Running,
    /// Cancelled; the wakes in flight are finishing.
    Cancelling,
    Done,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Selecting => "selecting",
            JobState::Running => "running",
            JobState::Cancelling => "cancelling",
            JobState::Done => "done",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// A job's progress at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub state: JobState,
    /// Devices selected so far (final once the state is not `Selecting`).
    pub total: u64,
    pub pending: u64,
    pub received: u64,
    pub dropped: u64,
    pub throttled: u64,
    pub expired: u64,
    pub failed: u64,
    pub not_sent: u64,
    pub done: u64,
}

impl Job {
    fn new(rate_per_second: Option<u32>) -> Job {
        Job {
            id: format!("j{:x}{:x}", clock::monotonic_ms(), clock::random::<u32>()),
            created_at: clock::now().to_rfc3339(),
            rate_per_second,
            selected: AtomicU64::new(0),
            received: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            not_sent: AtomicU64::new(0),
            selection_done: AtomicBool::new(false),
            cancelled: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            ending: Mutex::new(()),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn created_at(&self) -> &str {
        &self.created_at
    }

    pub fn rate_per_second(&self) -> Option<u32> {
        self.rate_per_second
    }

    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    pub(super) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// The job's progress now.
    pub fn progress(&self) -> Progress {
        let get = |a: &AtomicU64| a.load(Ordering::Acquire);
        let done = get(&self.received)
            + get(&self.dropped)
            + get(&self.throttled)
            + get(&self.expired)
            + get(&self.failed)
            + get(&self.not_sent);
        let total = get(&self.selected);
        let state = if self.finished.load(Ordering::Acquire) {
            if self.is_cancelled() {
                JobState::Cancelled
            } else {
                JobState::Done
            }
        } else if self.is_cancelled() {
            JobState::Cancelling
        } else if self.selection_done.load(Ordering::Acquire) {
            JobState::Running
        } else {
            JobState::Selecting
        };
        Progress {
            state,
            total,
            pending: total.saturating_sub(done),
            received: get(&self.received),
            dropped: get(&self.dropped),
            throttled: get(&self.throttled),
            expired: get(&self.expired),
            failed: get(&self.failed),
            not_sent: get(&self.not_sent),
            done,
        }
    }

    /// Stops sending; wakes in flight finish. A job that already finished
    /// stays as it finished.
    pub fn cancel(&self) {
        let _ending = self.ending.lock();
        if !self.finished.load(Ordering::Acquire) {
            self.cancelled.store(true, Ordering::Release);
        }
    }

    /// Counts one device's final result (`None`: no result, as for a
    /// listed id that is not registered or an abandoned wake).
    pub(super) fn count(&self, report: Option<&WakeReport>) {
        let counter = match report.map(|r| (r.result, r.wns_outcome)) {
            Some((PushResult::Delivered, _)) => &self.received,
            Some((PushResult::Dropped, _)) => &self.dropped,
            Some((_, Some(Outcome::ChannelThrottled | Outcome::SenderThrottled { .. }))) => {
                &self.throttled
            }
            Some((PushResult::ChannelDead, _)) => &self.expired,
            _ => &self.failed,
        };
        counter.fetch_add(1, Ordering::AcqRel);
    }

    fn finish(&self) {
        let _ending = self.ending.lock();
        if self.is_cancelled() {
            let pending = self.progress().pending;
            self.not_sent.fetch_add(pending, Ordering::AcqRel);
        }
        self.finished.store(true, Ordering::Release);
    }
}

impl<S: Transport> WakeService<S> {
    /// Starts a bulk wake on the calling runtime; `shard` is where its pages
    /// go when no shard has registered its runtime (in-process tests).
    pub fn start_job(
        self: &Arc<Self>,
        shard: usize,
        selection: Selection,
        rate_per_second: Option<u32>,
    ) -> Result<Arc<Job>, StartError> {
        let running = self.jobs.iter().filter(|j| !j.is_finished()).count();
        if running >= JOBS_RUNNING_MAX {
            return Err(StartError::TooManyJobs);
        }
        self.forget_old_jobs();
        let job = Arc::new(Job::new(rate_per_second));
        self.jobs.insert(job.id.clone(), job.clone());
        let token = self.inflight.token();
        tokio::spawn(run(self.clone(), shard, job.clone(), selection, token));
        Ok(job)
    }

    /// The bulk wake `id`, running or remembered.
    pub fn job(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs.get(id).map(|j| j.clone())
    }

    /// Cancels every running bulk wake (shutting down).
    pub fn cancel_jobs(&self) {
        for job in self.jobs.iter() {
            job.cancel();
        }
    }

    fn forget_old_jobs(&self) {
        if self.jobs.len() < JOBS_REMEMBERED_MAX {
            return;
        }
        let mut finished: Vec<(String, String)> = self
            .jobs
            .iter()
            .filter(|j| j.is_finished())
            .map(|j| (j.created_at.clone(), j.id.clone()))
            .collect();
        finished.sort();
        let excess = self.jobs.len() + 1 - JOBS_REMEMBERED_MAX;
        for (_, id) in finished.iter().take(excess) {
            self.jobs.remove(id);
        }
    }
}

/// Counts a running job in `wnsgate_bulk_jobs_running` while it lives.
struct RunningGauge;

impl RunningGauge {
    fn new() -> RunningGauge {
        metrics::gauge!(m::BULK_JOBS_RUNNING).increment(1.0);
        RunningGauge
    }
}

impl Drop for RunningGauge {
    fn drop(&mut self) {
        metrics::gauge!(m::BULK_JOBS_RUNNING).decrement(1.0);
    }
}

/// What a job's senders share: the job, its in-flight bound and its pace.
pub(super) struct Sending<S> {
    pub(super) wakes: Arc<WakeService<S>>,
    pub(super) job: Arc<Job>,
    /// [`JOB_WAKES_INFLIGHT_MAX`] permits; one held by each wake in flight.
    pub(super) permits: Arc<Semaphore>,
    pub(super) pacer: Option<Mutex<Pacer>>,
}

/// Hands a job's batches to the shards in turn, at most
/// [`PAGES_AHEAD_MAX`] not yet taken up.
struct Dealer<S> {
    sending: Arc<Sending<S>>,
    shards: Vec<mpsc::Sender<(Batch, OwnedSemaphorePermit)>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    next: usize,
    pages: Arc<Semaphore>,
}

impl<S: Transport> Dealer<S> {
    fn new(sending: Arc<Sending<S>>, runtimes: Vec<(usize, Handle)>) -> Dealer<S> {
        let (mut shards, mut tasks) = (Vec::new(), Vec::new());
        for (shard, rt) in runtimes {
            let (tx, rx) = mpsc::channel(PAGES_AHEAD_MAX);
            let token = sending.wakes.inflight.token();
            tasks.push(rt.spawn(send_batches(sending.clone(), shard, rx, token)));
            shards.push(tx);
        }
        Dealer {
            sending,
            shards,
            tasks,
            next: 0,
            pages: Arc::new(Semaphore::new(PAGES_AHEAD_MAX)),
        }
    }

    async fn deal(&mut self, batch: Batch) {
        let Ok(permit) = self.pages.clone().acquire_owned().await else {
            return;
        };
        let shard = &self.shards[self.next % self.shards.len()];
        self.next += 1;
        // Fails only when that shard's task ended early: the job was
        // cancelled.
        let _ = shard.send((batch, permit)).await;
    }

    /// Waits until every batch is sent and every wake has its result.
    async fn finish(self) {
        drop(self.shards);
        for task in self.tasks {
            let _ = task.await;
        }
        let _all = self
            .sending
            .permits
            .acquire_many(JOB_WAKES_INFLIGHT_MAX as u32)
            .await;
    }
}

async fn run<S: Transport>(
    wakes: Arc<WakeService<S>>,
    shard: usize,
    job: Arc<Job>,
    selection: Selection,
    _inflight: tokio_util::task::task_tracker::TaskTrackerToken,
) {
    let running = RunningGauge::new();
    let mut shards = wakes.shard_runtimes();
    if shards.is_empty() {
        shards.push((shard, Handle::current()));
    }
    let sending = Arc::new(Sending {
        wakes: wakes.clone(),
        job: job.clone(),
        permits: Arc::new(Semaphore::new(JOB_WAKES_INFLIGHT_MAX)),
        pacer: job.rate_per_second.map(|r| {
            Mutex::new(Pacer::new(
                r,
                (r / 10).clamp(1, 1000),
                clock::monotonic_ms(),
            ))
        }),
    });
    let mut dealer = Dealer::new(sending, shards);
    match selection {
        Selection::Ids(ids) => {
            job.selected.store(ids.len() as u64, Ordering::Release);
            job.selection_done.store(true, Ordering::Release);
            let mut ids = ids.into_iter();
            loop {
                let batch: Vec<String> = ids.by_ref().take(PAGE_DEVICES).collect();
                if batch.is_empty() || job.is_cancelled() {
                    break;
                }
                dealer.deal(Batch::Ids(batch)).await;
            }
        }
        Selection::Filter(state) => {
            let mut after: Option<String> = None;
            let th = wakes.thresholds;
            while !job.is_cancelled() {
                let now = clock::now();
                let store = wakes.store.clone();
                let cursor = after.clone();
                let page = tokio::task::spawn_blocking(move || {
                    let filter = move |r: &DeviceRecord| {
                        state.is_none_or(|s| r.state_at(&th, now).state == s)
                    };
                    store.page(
                        cursor.as_deref(),
                        PAGE_DEVICES,
                        PAGE_SCAN_RECORDS_MAX,
                        &filter,
                    )
                })
                .await;
                let page = match page {
                    Ok(Ok(p)) => p,
                    Ok(Err(e)) => {
                        tracing::error!(job = %job.id, error = %e, "bulk wake stopped: the store could not be read");
                        break;
                    }
                    Err(_) => break,
                };
                job.selected
                    .fetch_add(page.records.len() as u64, Ordering::AcqRel);
                if !page.records.is_empty() {
                    dealer.deal(Batch::Records(page.records)).await;
                }
                match page.next_after {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            job.selection_done.store(true, Ordering::Release);
        }
    }
    dealer.finish().await;
    // Counted out before the job shows as finished, so a scrape after
    // `GET /v1/pushes/{id}` says finished never counts it as running.
    drop(running);
    job.finish();
    tracing::info!(job = %job.id, done = job.progress().done, "bulk wake finished");
}
