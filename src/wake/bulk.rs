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
    BATCHES_AHEAD_MAX, DEAL_DEVICES, JOBS_REMEMBERED_MAX, JOBS_RUNNING_MAX, JOB_WAKES_INFLIGHT_MAX,
    PAGE_DEVICES, PAGE_SCAN_RECORDS_MAX,
};
use super::send::{send_batches, Batch, Selected, Sending};
use super::transport::Transport;
use super::WakeService;
use crate::clock;
use crate::core::bulk::{BookError, Checkpoint, JobBook, JobDef, Position, SelectionDef, Within};
use crate::core::wns::retry::Pacer;
use crate::core::{DeviceRecord, LifecycleState};
use crate::registry::{Cursor, Marks};
use crate::telemetry::metrics as m;
use parking_lot::Mutex;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Which devices a bulk wake wakes.
pub enum Selection {
    /// These ids (ids not registered count as failed), taken partition by
    /// partition and in the given order within each.
    Ids(Vec<String>),
    /// Every device in this lifecycle state when its page is read, or
    /// every device.
    Filter(Option<LifecycleState>),
}

impl Selection {
    fn def(&self) -> SelectionDef {
        match self {
            Selection::Ids(_) => SelectionDef::Ids,
            Selection::Filter(Some(s)) => SelectionDef::State(s.as_str().to_owned()),
            Selection::Filter(None) => SelectionDef::All,
        }
    }
}

/// Why a bulk wake was not started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{JOBS_RUNNING_MAX} bulk wakes are already running")]
    TooManyJobs,
    /// The job could not be written durably, so it was not started.
    #[error("the bulk wake could not be recorded: {0}")]
    NotRecorded(String),
}

impl<S: Transport> WakeService<S> {
    /// Keeps bulk wakes in `book` from now on, checkpointing each running
    /// one every `every`; jobs started before are not kept.
    pub fn attach_book(&self, book: Arc<dyn JobBook>, every: Duration) {
        let _ = self.book.set((book, every));
    }

    /// Starts a bulk wake on the calling runtime; `shard` is where its pages
    /// go when no shard has registered its runtime (in-process tests).
    /// Devices whose channel WNS declared dead (404, 410) are skipped
    /// unless `include_dead`. With a book attached, the job is durable
    /// before this returns.
    pub async fn start_job(
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
        if let Some((book, _)) = self.book.get() {
            let def = JobDef {
                id: job.id().to_owned(),
                created_at: job.created_at().to_owned(),
                selection: selection.def(),
                rate_per_second,
                include_dead,
                expected_total: expected,
            };
            let ids = match &selection {
                Selection::Ids(ids) => ids.clone(),
                Selection::Filter(_) => Vec::new(),
            };
            let book = book.clone();
            tokio::task::spawn_blocking(move || book.create(&def, &ids))
                .await
                .map_err(|e| StartError::NotRecorded(e.to_string()))?
                .map_err(|e| StartError::NotRecorded(e.to_string()))?;
        }
        self.jobs.insert(job.id().to_owned(), job.clone());
        let token = self.inflight.token();
        tokio::spawn(run(self.clone(), shard, job.clone(), selection, token));
        Ok(job)
    }

    /// Loads the jobs kept in the attached book: finished ones are
    /// remembered, the others go on from their checkpoints, on `rt`. Returns
    /// how many were resumed.
    pub fn restore_jobs(self: &Arc<Self>, rt: &Handle) -> Result<usize, BookError> {
        let Some((book, _)) = self.book.get() else {
            return Ok(0);
        };
        let mut stored = book.load()?;
        stored.sort_by(|a, b| (&a.def.created_at, &a.def.id).cmp(&(&b.def.created_at, &b.def.id)));
        // The oldest finished ones beyond what is remembered are dropped.
        let finished = stored
            .iter()
            .filter(|j| j.checkpoint.as_ref().is_some_and(|c| c.finished))
            .count();
        let mut excess = (finished + JOBS_RUNNING_MAX).saturating_sub(JOBS_REMEMBERED_MAX);
        let mut resumed = 0;
        for job in stored {
            let done = job.checkpoint.as_ref().is_some_and(|c| c.finished);
            if done && excess > 0 {
                excess -= 1;
                if let Err(e) = book.forget(&job.def.id) {
                    tracing::warn!(job = %job.def.id, error = %e, "cannot drop a finished bulk wake");
                }
                continue;
            }
            let selection = match &job.def.selection {
                SelectionDef::Ids => Selection::Ids(job.ids),
                SelectionDef::All => Selection::Filter(None),
                SelectionDef::State(s) => match LifecycleState::parse(s) {
                    Some(state) => Selection::Filter(Some(state)),
                    None => {
                        tracing::error!(job = %job.def.id, state = %s, "a kept bulk wake selects an unknown state; it is not resumed");
                        continue;
                    }
                },
            };
            let cancelled = job.checkpoint.as_ref().is_some_and(|c| c.cancelled);
            let j = Arc::new(Job::from_def(&job.def, job.checkpoint));
            self.jobs.insert(j.id().to_owned(), j.clone());
            if done {
                continue;
            }
            if cancelled {
                // Cancelled, and stopped before its wakes in flight ended.
                j.finish();
                self.spawn_final_checkpoint(&j);
                continue;
            }
            let p = j.progress();
            tracing::info!(
                job = %j.id(),
                done = p.done,
                expected_total = j.expected_total(),
                "resuming a bulk wake from its checkpoint"
            );
            let token = self.inflight.token();
            rt.spawn(run(self.clone(), 0, j, selection, token));
            resumed += 1;
        }
        Ok(resumed)
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

    /// Stops every running bulk wake because the gateway shuts down: each
    /// stops sending and, with a book attached, goes on from its
    /// checkpoint at the next start.
    pub fn stop_jobs(&self) {
        for job in self.jobs.iter() {
            job.stop();
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
        let mut gone = Vec::new();
        for (_, id) in finished.into_iter().take(excess) {
            self.jobs.remove(&id);
            gone.push(id);
        }
        if let Some((book, _)) = self.book.get() {
            let book = book.clone();
            tokio::task::spawn_blocking(move || {
                for id in gone {
                    if let Err(e) = book.forget(&id) {
                        tracing::warn!(job = %id, error = %e, "cannot drop a forgotten bulk wake");
                    }
                }
            });
        }
    }

    /// Writes `job`'s checkpoint now, unless its last one was written.
    /// `last` makes this its last one.
    fn write_checkpoint(&self, job: &Job, last: bool) {
        let Some((book, _)) = self.book.get() else {
            return;
        };
        let mut written_final = job.written_final.lock();
        if *written_final {
            return;
        }
        let cp = job.checkpoint();
        match book.checkpoint(job.id(), &cp) {
            Ok(()) => metrics::counter!(m::BULK_CHECKPOINTS, "result" => "ok").increment(1),
            Err(e) => {
                metrics::counter!(m::BULK_CHECKPOINTS, "result" => "error").increment(1);
                tracing::error!(job = %job.id(), error = %e, "cannot write a bulk wake's checkpoint");
            }
        }
        *written_final = last;
    }

    /// Writes `job`'s last checkpoint off the calling runtime.
    fn spawn_final_checkpoint(self: &Arc<Self>, job: &Arc<Job>) {
        if self.book.get().is_none() {
            return;
        }
        let (me, job) = (self.clone(), job.clone());
        std::thread::spawn(move || me.write_checkpoint(&job, true));
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
/// [`BATCHES_AHEAD_MAX`] not yet taken up.
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
            let (tx, rx) = mpsc::channel(BATCHES_AHEAD_MAX);
            let token = sending.wakes.inflight.token();
            tasks.push(rt.spawn(send_batches(sending.clone(), shard, rx, token)));
            shards.push(tx);
        }
        Dealer {
            sending,
            shards,
            tasks,
            next: 0,
            pages: Arc::new(Semaphore::new(BATCHES_AHEAD_MAX)),
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

/// Writes `job`'s checkpoint every checkpoint interval until it ends.
async fn checkpoint_while_running<S: Transport>(wakes: Arc<WakeService<S>>, job: Arc<Job>) {
    let Some((_, every)) = wakes.book.get().map(|(b, e)| (b.clone(), *e)) else {
        return;
    };
    loop {
        tokio::time::sleep(every).await;
        if job.is_finished() {
            return;
        }
        let (w, j) = (wakes.clone(), job.clone());
        let _ = tokio::task::spawn_blocking(move || w.write_checkpoint(&j, false)).await;
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Where a walk over partitions `from..to` (none of them done) starts:
/// the checkpoint's position when it lies there, else `from`'s start.
fn start_cursor(resume: &Checkpoint, from: u16, to: u16) -> Cursor {
    match &resume.at {
        Some(Position {
            part,
            within: Within::Key { after_key },
        }) if (from..to).contains(part) => {
            let mut bytes = part.to_be_bytes().to_vec();
            bytes.extend(unhex(after_key).unwrap_or_default());
            Cursor::from_bytes(&bytes).unwrap_or_else(|| Cursor::start_of(*part))
        }
        _ => Cursor::start_of(from),
    }
}

/// The runs of consecutive partitions, `0..count`, that `resume` does not
/// count as done.
fn runs_not_done(resume: &Checkpoint, count: u16) -> Vec<(u16, u16)> {
    let mut runs = Vec::new();
    let mut p = 0u16;
    while p < count {
        if resume.is_done(p) {
            p += 1;
            continue;
        }
        let from = p;
        while p < count && !resume.is_done(p) {
            p += 1;
        }
        runs.push((from, p));
    }
    runs
}

/// Deals the pages of a selection by state (or of all), partition by
/// partition from the resume point.
async fn deal_filter<S: Transport>(
    wakes: &Arc<WakeService<S>>,
    job: &Arc<Job>,
    dealer: &mut Dealer<S>,
    state: Option<LifecycleState>,
) {
    let th = wakes.thresholds;
    let resume = job.resume_point();
    let count = wakes.registry.partitioning().count();
    for (from, to) in runs_not_done(&resume, count) {
        let mut cursor = start_cursor(&resume, from, to);
        loop {
            if job.is_halted() {
                return;
            }
            let now = clock::now();
            let registry = wakes.registry.clone();
            let after = cursor.clone();
            let page = tokio::task::spawn_blocking(move || {
                let filter = move |m: &Marks| {
                    state.is_none_or(|s| {
                        th.state_with_refresh(m.issued_at, m.dead, m.refresh, now)
                            .state
                            == s
                    })
                };
                let until = usize::from(to);
                match state {
                    // As for listings: only marked devices can be in
                    // these states.
                    Some(LifecycleState::RefreshPending | LifecycleState::Unreachable) => {
                        registry.page_marked_until(Some(&after), PAGE_DEVICES, until, &filter)
                    }
                    _ => registry.page_until(
                        Some(&after),
                        PAGE_DEVICES,
                        PAGE_SCAN_RECORDS_MAX,
                        until,
                        &filter,
                    ),
                }
            })
            .await;
            let Ok(page) = page else {
                tracing::error!(job = %job.id(), "bulk wake stopped: its selection task failed");
                job.cancel();
                return;
            };
            // Once this page is counted, the partitions it passed are done
            // and the walk stands where it ends.
            let next = page.next.filter(|c| c.part() < to);
            let (done_to, at) = match &next {
                Some(c) if c.key_bytes().is_empty() => (c.part(), None),
                Some(c) => (
                    c.part(),
                    Some(Position {
                        part: c.part(),
                        within: Within::Key {
                            after_key: hex(c.key_bytes()),
                        },
                    }),
                ),
                None => (to, None),
            };
            job.selected
                .fetch_add(page.records.len() as u64, Ordering::AcqRel);
            // Dealt a batch at a time; a batch's checkpoint stands after
            // its last device, the page's last one where the page ends.
            let mut records = page.records.into_iter().peekable();
            let mut from = cursor.part();
            loop {
                let batch: Vec<DeviceRecord> = records.by_ref().take(DEAL_DEVICES).collect();
                let track = if records.peek().is_none() {
                    job.new_page(batch.len(), from, done_to, at.clone())
                } else {
                    let last = batch.last().map(|r| r.device_id.as_str());
                    match last.and_then(|id| wakes.registry.cursor_after(id)) {
                        Some(c) => {
                            let at = Position {
                                part: c.part(),
                                within: Within::Key {
                                    after_key: hex(c.key_bytes()),
                                },
                            };
                            let track = job.new_page(batch.len(), from, c.part(), Some(at));
                            from = c.part();
                            track
                        }
                        // Never for a registered id; a position at the
                        // partition's start wakes again, never skips.
                        None => job.new_page(batch.len(), from, from, None),
                    }
                };
                if batch.is_empty() {
                    break;
                }
                dealer
                    .deal(Batch {
                        devices: Selected::Records(batch),
                        page: track,
                    })
                    .await;
                if records.peek().is_none() {
                    break;
                }
            }
            match next {
                Some(c) => cursor = c,
                None => break,
            }
        }
    }
}

/// Deals the pages of a selection by ids: grouped by partition, in the
/// given order within each, from the resume point.
async fn deal_ids<S: Transport>(
    wakes: &Arc<WakeService<S>>,
    job: &Arc<Job>,
    dealer: &mut Dealer<S>,
    ids: Vec<String>,
) {
    let resume = job.resume_point();
    job.selected.store(ids.len() as u64, Ordering::Release);
    let partitioning = wakes.registry.partitioning();
    let mut groups: std::collections::BTreeMap<u16, Vec<String>> = Default::default();
    for id in ids {
        groups.entry(partitioning.of(&id)).or_default().push(id);
    }
    // The ids not yet walked, as (partition, index of the first, ids).
    let mut left: Vec<(u16, usize, Vec<String>)> = Vec::new();
    for (part, list) in groups {
        if resume.is_done(part) {
            continue;
        }
        let first = match &resume.at {
            Some(Position {
                part: p,
                within: Within::Index { next_index },
            }) if *p == part => usize::try_from(*next_index)
                .unwrap_or(usize::MAX)
                .min(list.len()),
            _ => 0,
        };
        left.push((part, first, list));
    }
    job.selection_done.store(true, Ordering::Release);
    let count = partitioning.count();
    let mut page: Vec<String> = Vec::with_capacity(DEAL_DEVICES);
    // The partition the page being filled starts in.
    let mut page_from: Option<u16> = None;
    for (g, (part, first, list)) in left.iter().enumerate() {
        let mut i = *first;
        while i < list.len() {
            if job.is_halted() {
                return;
            }
            page_from.get_or_insert(*part);
            let take = (DEAL_DEVICES - page.len()).min(list.len() - i);
            page.extend_from_slice(&list[i..i + take]);
            i += take;
            if page.len() < DEAL_DEVICES {
                continue;
            }
            // Full: it ends inside this partition, or at its end (then the
            // partitions up to the next one with ids are done too).
            let (done_to, at) = if i < list.len() {
                let within = Within::Index {
                    next_index: i as u64,
                };
                (
                    *part,
                    Some(Position {
                        part: *part,
                        within,
                    }),
                )
            } else {
                (left.get(g + 1).map_or(count, |next| next.0), None)
            };
            let from = page_from.take().unwrap_or(*part);
            let track = job.new_page(page.len(), from, done_to, at);
            let ids = std::mem::replace(&mut page, Vec::with_capacity(DEAL_DEVICES));
            dealer
                .deal(Batch {
                    devices: Selected::Ids(ids),
                    page: track,
                })
                .await;
        }
    }
    if let Some(from) = page_from {
        let track = job.new_page(page.len(), from, count, None);
        dealer
            .deal(Batch {
                devices: Selected::Ids(page),
                page: track,
            })
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
    let checkpoints = tokio::spawn(checkpoint_while_running(wakes.clone(), job.clone()));
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
        Selection::Ids(ids) => deal_ids(&wakes, &job, &mut dealer, ids).await,
        Selection::Filter(state) => deal_filter(&wakes, &job, &mut dealer, state).await,
    }
    job.selection_done.store(true, Ordering::Release);
    dealer.finish().await;
    // Counted out before the job shows as finished, so a scrape after
    // `GET /v1/pushes/{id}` says finished never counts it as running.
    drop(running);
    job.finish();
    checkpoints.abort();
    let w = wakes.clone();
    let j = job.clone();
    let _ = tokio::task::spawn_blocking(move || w.write_checkpoint(&j, true)).await;
    let p = job.progress();
    tracing::info!(
        job = %job.id(),
        state = if job.is_stopping() { "stopped" } else { p.state.as_str() },
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
