//! Bulk wakes: a job selects devices (listed ids, a lifecycle state, or
//! all), paces itself, keeps a bounded number of wakes in flight, and counts
//! outcomes. Memory does not grow with the number of devices selected.
//!
//! The job walks its partitions in listing order a page at a time (or
//! through the ids it was given, [`super::walk`]) and deals batches to the
//! shards in turn ([`Dealer`]); each shard sends its share from one task
//! for the whole job ([`super::send`]).
//!
//! With a [`JobBook`] attached, jobs are durable: recorded before they are
//! answered, checkpointed as they go, and resumed from their checkpoints
//! at the next start. A book shared between nodes (cluster mode) has every
//! node run every job over the partitions it owns, and walk again from the
//! merged checkpoints whenever that set changes.

use super::job::Job;
use super::job::Progress;
use super::limits::{
    BATCHES_AHEAD_MAX, JOBS_REMEMBERED_MAX, JOBS_RUNNING_MAX, JOB_WAKES_INFLIGHT_MAX,
};
use super::send::{send_batches, Batch, Sending};
use super::transport::Transport;
use super::walk::{deal_filter, deal_ids, group_ids};
use super::WakeService;
use crate::clock;
use crate::core::bulk::{
    BookError, Checkpoint, JobBook, JobDef, Owner, Resume, SelectionDef, StoredJob,
};
use crate::core::wns::retry::Pacer;
use crate::core::LifecycleState;
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

/// A book attached to the wake service: where jobs are kept, how often a
/// running one is checkpointed, and for a shared book, which partitions
/// this node owns.
pub struct Attached {
    pub book: Arc<dyn JobBook>,
    pub every: Duration,
    pub owner: Option<Arc<dyn Owner>>,
}

/// How long what a node serves must hold still before a walk starts again
/// (cluster mode), and at most how many such waits.
const SETTLE: Duration = Duration::from_millis(500);
const SETTLE_ROUNDS_MAX: usize = 20;

/// How often a node looks for jobs started on other nodes, and for
/// cancels, in cluster mode; and how often an idle walk looks again at the
/// partitions it owns.
const SHARED_POLL: Duration = Duration::from_millis(250);

impl<S: Transport> WakeService<S> {
    /// Keeps bulk wakes in `attached.book` from now on; jobs started
    /// before are not kept.
    pub fn attach_book(&self, attached: Attached) {
        let _ = self.book.set(attached);
    }

    fn owner(&self) -> Option<&Arc<dyn Owner>> {
        self.book.get()?.owner.as_ref()
    }

    fn shared(&self) -> bool {
        self.book
            .get()
            .is_some_and(|b| b.book.shared() && b.owner.is_some())
    }

    /// Starts a bulk wake on the calling runtime; `shard` is where its pages
    /// go when no shard has registered its runtime (in-process tests).
    /// Devices whose channel WNS declared dead (404, 410) are skipped
    /// unless `include_dead`. With a book attached, the job is durable
    /// before this returns. `elsewhere` is how many devices of the
    /// selection other nodes hold (cluster mode), for the expected total.
    pub async fn start_job(
        self: &Arc<Self>,
        shard: usize,
        selection: Selection,
        rate_per_second: Option<u32>,
        include_dead: bool,
        elsewhere: u64,
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
        let def = JobDef {
            id: Job::new_id(),
            created_at: clock::now().to_rfc3339(),
            selection: selection.def(),
            rate_per_second,
            include_dead,
            expected_total: expected + elsewhere,
        };
        let shared = self.shared();
        // Known here before it is recorded: a shared book's other readers
        // (this node's own look for new jobs among them) must find it
        // taken up already.
        let job = Arc::new(Job::from_def(&def, None, shared));
        self.jobs.insert(job.id().to_owned(), job.clone());
        if let Some(attached) = self.book.get() {
            let ids = match &selection {
                Selection::Ids(ids) => ids.clone(),
                Selection::Filter(_) => Vec::new(),
            };
            let (book, d) = (attached.book.clone(), def.clone());
            let recorded = tokio::task::spawn_blocking(move || book.create(&d, &ids))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            if let Err(e) = recorded {
                self.jobs.remove(job.id());
                return Err(StartError::NotRecorded(e));
            }
        }
        let token = self.inflight.token();
        tokio::spawn(run(self.clone(), shard, job.clone(), selection, token));
        Ok(job)
    }

    /// Loads the jobs kept in the attached book: finished ones are
    /// remembered, the others go on from their checkpoints, on `rt`. With
    /// a shared book, also looks for jobs started or cancelled on other
    /// nodes from now on. Returns how many were resumed.
    pub fn restore_jobs(self: &Arc<Self>, rt: &Handle) -> Result<usize, BookError> {
        let Some(attached) = self.book.get() else {
            return Ok(0);
        };
        let book = attached.book.clone();
        let mut stored = book.load()?;
        stored.sort_by(|a, b| (&a.def.created_at, &a.def.id).cmp(&(&b.def.created_at, &b.def.id)));
        // The oldest finished ones beyond what is remembered are dropped.
        let finished = stored.iter().filter(|j| j.finished()).count();
        let mut excess = (finished + JOBS_RUNNING_MAX).saturating_sub(JOBS_REMEMBERED_MAX);
        let mut resumed = 0;
        for job in stored {
            if job.finished() && excess > 0 {
                excess -= 1;
                if let Err(e) = book.forget(&job.def.id) {
                    tracing::warn!(job = %job.def.id, error = %e, "cannot drop a finished bulk wake");
                }
                continue;
            }
            if self.adopt(&job, rt) {
                resumed += 1;
            }
        }
        if self.shared() {
            let me = self.clone();
            rt.spawn(async move {
                loop {
                    tokio::time::sleep(SHARED_POLL).await;
                    let (w, b, rt) = (me.clone(), book.clone(), Handle::current());
                    // Only a job not known here yet is read whole.
                    let _ = tokio::task::spawn_blocking(move || {
                        for (id, cancelled) in b.ids_cancelled().unwrap_or_default() {
                            let known = w.jobs.get(&id).map(|j| j.clone());
                            match known {
                                Some(known) if cancelled => known.cancel(),
                                Some(_) => {}
                                None => {
                                    if let Ok(Some(stored)) = b.job(&id) {
                                        w.adopt(&stored, &rt);
                                    }
                                }
                            }
                        }
                    })
                    .await;
                }
            });
        }
        Ok(resumed)
    }

    /// Takes up `stored` if this node does not know it yet: remembers it,
    /// and unless it ended, runs it from its checkpoints on `rt`. A known
    /// job that was cancelled elsewhere is cancelled here. Returns whether
    /// a run started.
    fn adopt(self: &Arc<Self>, stored: &StoredJob, rt: &Handle) -> bool {
        let shared = self.shared();
        if let Some(known) = self.jobs.get(&stored.def.id) {
            if stored.cancelled {
                known.cancel();
            }
            return false;
        }
        let selection = match &stored.def.selection {
            SelectionDef::Ids => None,
            SelectionDef::All => Some(Selection::Filter(None)),
            SelectionDef::State(s) => match LifecycleState::parse(s) {
                Some(state) => Some(Selection::Filter(Some(state))),
                None => {
                    tracing::error!(job = %stored.def.id, state = %s, "a kept bulk wake selects an unknown state; it is not resumed");
                    return false;
                }
            },
        };
        // Embedded: the one walk goes on with its counts. Shared: this
        // process's walks start from nothing; the others are read back.
        let base = if shared {
            Checkpoint {
                finished: stored.finished(),
                cancelled: stored.cancelled,
                ..Checkpoint::default()
            }
        } else {
            stored
                .walks
                .first()
                .map(|(_, c)| c.clone())
                .unwrap_or_default()
        };
        let ended = base.finished;
        let j = Arc::new(Job::from_def(&stored.def, Some(base), shared));
        self.jobs.insert(j.id().to_owned(), j.clone());
        if ended {
            return false;
        }
        if stored.cancelled {
            // Cancelled, and stopped before its wakes in flight ended.
            j.finish();
            self.spawn_final_checkpoint(&j);
            return false;
        }
        let p = j.progress();
        tracing::info!(
            job = %j.id(),
            done = p.done,
            expected_total = j.expected_total(),
            "taking up a bulk wake from its checkpoints"
        );
        let (me, book) = (self.clone(), self.book.get().map(|b| b.book.clone()));
        let token = self.inflight.token();
        let id = j.id().to_owned();
        rt.spawn(async move {
            let selection = match selection {
                Some(s) => s,
                None => {
                    let Some(book) = book else { return };
                    match tokio::task::spawn_blocking(move || book.ids(&id)).await {
                        Ok(Ok(ids)) => Selection::Ids(ids),
                        Ok(Err(e)) => {
                            tracing::error!(job = %j.id(), error = %e, "cannot read a bulk wake's ids; it is not resumed");
                            return;
                        }
                        Err(_) => return,
                    }
                }
            };
            run(me, 0, j, selection, token).await;
        });
        true
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

    /// `job`'s progress: in cluster mode, this node's walks added to the
    /// other nodes' as their last checkpoints say.
    pub fn progress(&self, job: &Job) -> Progress {
        let mut p = job.progress();
        let (Some(attached), Some(owner)) = (self.book.get(), self.owner()) else {
            return p;
        };
        if !job.shared {
            return p;
        }
        let Ok(Some(stored)) = attached.book.job(job.id()) else {
            return p;
        };
        let me = owner.instance();
        for (walk, c) in &stored.walks {
            if walk.starts_with(&me) {
                continue;
            }
            p.add(c.selected, &c.counts);
        }
        p
    }

    /// Cancels bulk wake `id` (on every node, in cluster mode); `None` when
    /// it is unknown.
    pub async fn cancel_job(&self, id: &str) -> Option<Arc<Job>> {
        let job = self.job(id)?;
        job.cancel();
        if let Some(attached) = self.book.get() {
            let (book, id) = (attached.book.clone(), id.to_owned());
            let cancelled = tokio::task::spawn_blocking(move || book.cancel(&id)).await;
            if let Ok(Err(e)) = cancelled {
                tracing::error!(job = %job.id(), error = %e, "cannot record a bulk wake's cancel for the other nodes");
            }
        }
        Some(job)
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
        if let Some(attached) = self.book.get() {
            let book = attached.book.clone();
            tokio::task::spawn_blocking(move || {
                for id in gone {
                    if let Err(e) = book.forget(&id) {
                        tracing::warn!(job = %id, error = %e, "cannot drop a forgotten bulk wake");
                    }
                }
            });
        }
    }

    /// Writes the checkpoint of `job`'s walk under way now, unless the
    /// job's last one was written. `last` makes this its last one.
    fn write_checkpoint(&self, job: &Job, last: bool) {
        let Some(attached) = self.book.get() else {
            return;
        };
        let mut written_final = job.written_final.lock();
        if *written_final {
            return;
        }
        let (walk, cp) = job.checkpoint();
        if walk.is_empty() {
            // No walk began: nothing to record.
            *written_final = last;
            return;
        }
        match attached.book.checkpoint(job.id(), &walk, &cp) {
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

    /// What a job's senders share, for a walk that sends at most `rate`
    /// wakes a second, takes no new batch once `closing` says so, and
    /// stops sending once the job is halted.
    fn sending(
        self: &Arc<Self>,
        job: &Arc<Job>,
        rate: Option<u32>,
        closing: Arc<dyn Fn() -> bool + Send + Sync>,
    ) -> Arc<Sending<S>> {
        let j = job.clone();
        Arc::new(Sending {
            wakes: self.clone(),
            job: job.clone(),
            permits: Arc::new(Semaphore::new(JOB_WAKES_INFLIGHT_MAX)),
            pacer: rate.map(|r| {
                Mutex::new(Pacer::new(
                    r,
                    (r / 10).clamp(1, 1000),
                    clock::monotonic_ms(),
                ))
            }),
            halted: Arc::new(move || j.is_halted()),
            closing,
        })
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
pub(super) struct Dealer<S> {
    sending: Arc<Sending<S>>,
    shards: Vec<mpsc::Sender<(Batch, OwnedSemaphorePermit)>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    next: usize,
    pages: Arc<Semaphore>,
}

impl<S: Transport> Dealer<S> {
    pub(super) fn new(sending: Arc<Sending<S>>, runtimes: Vec<(usize, Handle)>) -> Dealer<S> {
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

    pub(super) async fn deal(&mut self, batch: Batch) {
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
    pub(super) async fn finish(self) {
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
    let Some(every) = wakes.book.get().map(|b| b.every) else {
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
    match wakes.owner().filter(|_| job.shared).cloned() {
        None => walk_everything(&wakes, &job, selection, shards).await,
        Some(owner) => walk_owned(&wakes, &job, selection, shards, owner).await,
    }
    // Counted out before the job shows as finished, so a scrape after
    // `GET /v1/pushes/{id}` says finished never counts it as running.
    drop(running);
    job.finish();
    checkpoints.abort();
    let (w, j) = (wakes.clone(), job.clone());
    let _ = tokio::task::spawn_blocking(move || w.write_checkpoint(&j, true)).await;
    let p = wakes.progress(&job);
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

/// One walk over every partition, from the job's own checkpoint (embedded
/// mode, and in-process tests).
async fn walk_everything<S: Transport>(
    wakes: &Arc<WakeService<S>>,
    job: &Arc<Job>,
    selection: Selection,
    shards: Vec<(usize, Handle)>,
) {
    let base = job.base();
    let resume = Resume::merge([&base]);
    job.begin_walk("main".into(), base);
    let j = job.clone();
    let rate = job.rate_per_second();
    let mut dealer = Dealer::new(
        wakes.sending(job, rate, Arc::new(move || j.is_halted())),
        shards,
    );
    let halted = || job.is_halted();
    match selection {
        Selection::Ids(ids) => {
            job.selected.store(ids.len() as u64, Ordering::Release);
            job.selection_done.store(true, Ordering::Release);
            let groups = group_ids(ids, wakes.registry.partitioning());
            deal_ids(
                job,
                &mut dealer,
                &groups,
                &|_| true,
                &resume,
                &halted,
                false,
            )
            .await;
        }
        Selection::Filter(state) => {
            let count = wakes.registry.partitioning().count();
            let parts: Vec<u16> = (0..count).filter(|p| !resume.is_done(*p)).collect();
            deal_filter(wakes, job, &mut dealer, state, &parts, &resume, &halted).await;
        }
    }
    job.selection_done.store(true, Ordering::Release);
    dealer.finish().await;
}

/// Walks over the partitions this node owns, from the merged checkpoints
/// of every walk so far, again whenever the owned set changes, until every
/// partition with work is done (on any node) or the job is halted.
async fn walk_owned<S: Transport>(
    wakes: &Arc<WakeService<S>>,
    job: &Arc<Job>,
    selection: Selection,
    shards: Vec<(usize, Handle)>,
    owner: Arc<dyn Owner>,
) {
    let Some(book) = wakes.book.get().map(|b| b.book.clone()) else {
        return;
    };
    let partitioning = wakes.registry.partitioning();
    let (state, groups) = match selection {
        Selection::Ids(ids) => (None, Some(group_ids(ids, partitioning))),
        Selection::Filter(state) => (state, None),
    };
    let work: Vec<u16> = match &groups {
        Some(g) => g.keys().copied().collect(),
        None => (0..partitioning.count()).collect(),
    };
    // This process's walks, as they ended: newer than the book's view may
    // be yet.
    let mut mine: Vec<Checkpoint> = Vec::new();
    let instance = owner.instance();
    for n in 0.. {
        if job.is_halted() {
            break;
        }
        // Partitions move a window at a time: a walk starts once what this
        // node serves has held still for a moment, so one takeover ends at
        // most one walk.
        let mut epoch = owner.epoch();
        if n > 0 {
            for _ in 0..SETTLE_ROUNDS_MAX {
                tokio::time::sleep(SETTLE).await;
                let now = owner.epoch();
                if now == epoch || job.is_halted() {
                    break;
                }
                epoch = now;
            }
        }
        let b = book.clone();
        let id = job.id().to_owned();
        let stored = tokio::task::spawn_blocking(move || b.job(&id))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten();
        let walks = stored.iter().flat_map(|s| s.walks.iter().map(|(_, c)| c));
        let resume = Resume::merge(walks.chain(mine.iter()));
        if work.iter().all(|p| resume.is_done(*p)) {
            break;
        }
        let parts: Vec<u16> = work
            .iter()
            .copied()
            .filter(|p| owner.owns(*p) && !resume.is_done(*p))
            .collect();
        if parts.is_empty() {
            tokio::time::sleep(SHARED_POLL).await;
            continue;
        }
        job.begin_walk(format!("{instance}-{n}"), Checkpoint::default());
        let (j, o) = (job.clone(), owner.clone());
        let halted: Arc<dyn Fn() -> bool + Send + Sync> =
            Arc::new(move || j.is_halted() || o.epoch() != epoch);
        // The job's pace is the cluster's: each node takes its share, as
        // the partitions it walks are of all those with work.
        let rate = job.rate_per_second().map(|r| {
            let share = u64::from(r) * parts.len() as u64 / work.len().max(1) as u64;
            u32::try_from(share).unwrap_or(r).max(1)
        });
        let mut dealer = Dealer::new(wakes.sending(job, rate, halted.clone()), shards.clone());
        match &groups {
            Some(groups) => {
                let mine_now = |p: u16| parts.binary_search(&p).is_ok();
                deal_ids(job, &mut dealer, groups, &mine_now, &resume, &*halted, true).await;
            }
            None => deal_filter(wakes, job, &mut dealer, state, &parts, &resume, &*halted).await,
        }
        dealer.finish().await;
        // The walk's end is recorded before the next one reads the book.
        let (w, j) = (wakes.clone(), job.clone());
        let _ = tokio::task::spawn_blocking(move || w.write_checkpoint(&j, false)).await;
        mine.push(job.checkpoint().1);
        job.settle_walk();
    }
    job.selection_done.store(true, Ordering::Release);
    // The job's end, under a walk of its own with nothing counted.
    if !job.is_stopping() {
        job.begin_walk(format!("{instance}-end"), Checkpoint::default());
    }
}
