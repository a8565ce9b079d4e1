//! Bulk wakes: a job selects devices (listed ids, a lifecycle state, or
//! all), paces itself, keeps a bounded number of wakes in flight, and counts
//! outcomes. Memory does not grow with the number of devices selected.
//!
//! The job streams through the store in device-id order a page at a time
//! (or through the ids it was given) and deals the pages to the shards in
//! turn ([`Dealer`]); each shard sends its share from one task for the
//! whole job ([`super::send`]).

use super::job::Job;
use super::limits::{
    JOBS_REMEMBERED_MAX, JOBS_RUNNING_MAX, JOB_WAKES_INFLIGHT_MAX, PAGES_AHEAD_MAX, PAGE_DEVICES,
    PAGE_SCAN_RECORDS_MAX,
};
use super::send::{send_batches, Batch, Sending};
use super::transport::Transport;
use super::WakeService;
use crate::clock;
use crate::core::wns::retry::Pacer;
use crate::core::LifecycleState;
use crate::registry::{Cursor, Marks};
use crate::telemetry::metrics as m;
use parking_lot::Mutex;
use std::sync::atomic::Ordering;
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

impl<S: Transport> WakeService<S> {
    /// Starts a bulk wake on the calling runtime; `shard` is where its pages
    /// go when no shard has registered its runtime (in-process tests).
    /// Devices whose channel WNS declared dead (404, 410) are skipped
    /// unless `include_dead`.
    pub fn start_job(
        self: &Arc<Self>,
        shard: usize,
        selection: Selection,
        rate_per_second: Option<u32>,
        include_dead: bool,
    ) -> Result<Arc<Job>, StartError> {
        let running = self.jobs.iter().filter(|j| !j.is_finished()).count();
        if running >= JOBS_RUNNING_MAX {
            return Err(StartError::TooManyJobs);
        }
        self.forget_old_jobs();
        let expected = match &selection {
            Selection::Ids(ids) => ids.len() as u64,
            Selection::Filter(None) => self.registry.len() as u64,
            Selection::Filter(Some(state)) => {
                let counts = self.registry.state_counts(&self.thresholds, clock::now());
                LifecycleState::ALL
                    .iter()
                    .position(|s| s == state)
                    .map_or(0, |i| counts[i])
            }
        };
        let job = Arc::new(Job::new(rate_per_second, include_dead, expected));
        self.jobs.insert(job.id().to_owned(), job.clone());
        let token = self.inflight.token();
        tokio::spawn(run(self.clone(), shard, job.clone(), selection, token));
        Ok(job)
    }

    /// Every bulk wake running or remembered, newest first.
    pub fn jobs(&self) -> Vec<Arc<Job>> {
        let mut jobs: Vec<Arc<Job>> = self.jobs.iter().map(|j| j.clone()).collect();
        jobs.sort_by(|a, b| b.created_at().cmp(a.created_at()).then(b.id().cmp(a.id())));
        jobs
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
            .map(|j| (j.created_at().to_owned(), j.id().to_owned()))
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
        pacer: job.rate_per_second().map(|r| {
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
            let mut after: Option<Cursor> = None;
            let th = wakes.thresholds;
            while !job.is_cancelled() {
                let now = clock::now();
                let registry = wakes.registry.clone();
                let cursor = after.take();
                let page = tokio::task::spawn_blocking(move || {
                    let filter = move |m: &Marks| {
                        state.is_none_or(|s| {
                            th.state_with_refresh(m.issued_at, m.dead, m.refresh, now)
                                .state
                                == s
                        })
                    };
                    match state {
                        // As for listings: only marked devices can be in
                        // these states.
                        Some(LifecycleState::RefreshPending | LifecycleState::Unreachable) => {
                            registry.page_marked(cursor.as_ref(), PAGE_DEVICES, &filter)
                        }
                        _ => registry.page(
                            cursor.as_ref(),
                            PAGE_DEVICES,
                            PAGE_SCAN_RECORDS_MAX,
                            &filter,
                        ),
                    }
                })
                .await;
                let Ok(page) = page else {
                    tracing::error!(job = %job.id(), "bulk wake stopped: its selection task failed");
                    break;
                };
                job.selected
                    .fetch_add(page.records.len() as u64, Ordering::AcqRel);
                if !page.records.is_empty() {
                    dealer.deal(Batch::Records(page.records)).await;
                }
                match page.next {
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
    let p = job.progress();
    tracing::info!(
        job = %job.id(),
        state = p.state.as_str(),
        total = p.total,
        received = p.received,
        dropped = p.dropped,
        throttled = p.throttled,
        expired = p.expired,
        failed = p.failed,
        not_sent = p.not_sent,
        skipped_dead = p.skipped_dead,
        "bulk wake finished"
    );
}
