//! Bulk wakes: `POST /v1/pushes`, `GET /v1/pushes/{id}`, `DELETE /v1/pushes/{id}`.
//!
//! A job streams through the store in device-id order a page at a time (or
//! through the ids it was given), paces itself, keeps a bounded number of
//! wakes in flight, and counts outcomes. Memory does not grow with the
//! number of devices selected.
//!
//! The pages are dealt to the shards in turn; each shard sends its share
//! from one task for the whole job, which drives every wake it starts
//! through a [`WakeBatch`] (no future per wake), records the outcomes on
//! the devices together ([`crate::registry::Registry::record_pushes`]), and
//! claims each device's wake quietly, so that a single-device wake arriving
//! meanwhile joins it ([`claim_quietly`]).

use super::body::{read_limited, require_content_type};
use super::devices::parse_device_id;
use super::error::{json_error, ApiError};
use super::push::{claim_quietly, last_push, mark_dead, record_push, settle, unclaim, Settled};
use super::response::{json_response, Resp};
use crate::core::wns::retry::Pacer;
use crate::core::{ChannelUri, DeviceRecord, LifecycleState};
use crate::gateway::Gateway;
use crate::registry::KeyBuf;
use crate::sender::bulk::{WakeBatch, WakeTarget};
use crate::sender::tokens::monotonic_ms;
use crate::sender::wake::WakeReport;
use crate::telemetry::metrics as m;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::{HeaderMap, StatusCode};
use hyper::body::Incoming;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Largest `POST /v1/pushes` body, bytes.
pub const MAX_JOB_BODY: u64 = 8 * 1024 * 1024;
/// Most device ids one job may list.
pub const MAX_JOB_IDS: usize = 100_000;
/// Jobs running at once; more get 429.
pub const MAX_RUNNING_JOBS: usize = 8;
/// Wakes one job keeps in flight.
pub const JOB_INFLIGHT: usize = 2048;
/// Finished jobs remembered for `GET /v1/pushes/{id}`.
pub const MAX_REMEMBERED_JOBS: usize = 1000;
/// Devices read from the store per page, and listed ids per batch: a job
/// hands the shards one batch per page.
pub const PAGE: usize = 1024;
/// Pages of one job read but not yet sent: the job reads ahead of its
/// senders by at most this many pages, whatever the number of devices.
pub const PAGES_AHEAD: usize = 4;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobRequest {
    #[serde(default)]
    device_ids: Option<Vec<String>>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    all: Option<bool>,
    #[serde(default)]
    rate_per_second: Option<u32>,
}

enum Selection {
    Ids(Vec<String>),
    Filter(Option<LifecycleState>),
}

/// Progress of one bulk wake.
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

#[derive(Serialize)]
struct JobView<'a> {
    job_id: &'a str,
    state: &'static str,
    created_at: &'a str,
    rate_per_second: Option<u32>,
    /// Devices selected so far (final once `state` is not `selecting`).
    total: u64,
    pending: u64,
    received: u64,
    dropped: u64,
    throttled: u64,
    expired: u64,
    failed: u64,
    not_sent: u64,
    done: u64,
}

impl Job {
    fn view(&self) -> JobView<'_> {
        let get = |a: &AtomicU64| a.load(Ordering::Acquire);
        let done = get(&self.received)
            + get(&self.dropped)
            + get(&self.throttled)
            + get(&self.expired)
            + get(&self.failed)
            + get(&self.not_sent);
        let total = get(&self.selected);
        let state = if self.finished.load(Ordering::Acquire) {
            if self.cancelled.load(Ordering::Acquire) {
                "cancelled"
            } else {
                "done"
            }
        } else if self.cancelled.load(Ordering::Acquire) {
            "cancelling"
        } else if self.selection_done.load(Ordering::Acquire) {
            "running"
        } else {
            "selecting"
        };
        JobView {
            job_id: &self.id,
            state,
            created_at: &self.created_at,
            rate_per_second: self.rate_per_second,
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

    fn count(&self, report: Option<&WakeReport>) {
        use crate::core::wns::{Outcome, PushResult};
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
}

/// `POST /v1/pushes`.
pub async fn create(
    gw: Arc<Gateway>,
    shard: usize,
    headers: HeaderMap,
    mut body: Incoming,
) -> Result<Resp, ApiError> {
    require_content_type(&headers, &["application/json"])?;
    let idle = Duration::from_secs(gw.settings.request_timeout_secs);
    let bytes = read_limited(&mut body, &headers, MAX_JOB_BODY, idle).await?;
    let req: JobRequest = serde_json::from_slice(&bytes).map_err(|e| json_error(&e))?;
    let selection = match (req.device_ids, req.state, req.all) {
        (Some(ids), None, None | Some(false)) => {
            if ids.is_empty() {
                return Err(ApiError::unprocessable("empty_job", "device_ids is empty"));
            }
            if ids.len() > MAX_JOB_IDS {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "job_too_large",
                    format!("a job may list at most {MAX_JOB_IDS} device ids; use \"state\" or \"all\" for more"),
                ));
            }
            for id in &ids {
                parse_device_id(id).map_err(|e| {
                    ApiError::unprocessable("invalid_device_id", format!("{id:?}: {}", e.message))
                })?;
            }
            Selection::Ids(ids)
        }
        (None, Some(state), None | Some(false)) => {
            Selection::Filter(Some(LifecycleState::parse(&state).ok_or_else(|| {
                ApiError::unprocessable(
                    "invalid_state",
                    format!(
                        "state must be one of {}",
                        LifecycleState::ALL.map(|s| s.as_str()).join(", ")
                    ),
                )
            })?))
        }
        (None, None, Some(true)) => Selection::Filter(None),
        _ => {
            return Err(ApiError::unprocessable(
                "invalid_selection",
                "give exactly one of \"device_ids\", \"state\" or \"all\": true",
            ))
        }
    };
    if req.rate_per_second == Some(0) {
        return Err(ApiError::unprocessable(
            "invalid_rate",
            "rate_per_second must be positive",
        ));
    }
    let running = gw
        .jobs
        .iter()
        .filter(|j| !j.finished.load(Ordering::Acquire))
        .count();
    if running >= MAX_RUNNING_JOBS {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_jobs",
            format!("{MAX_RUNNING_JOBS} bulk wakes are already running"),
        ));
    }
    forget_old_jobs(&gw);
    let job = Arc::new(Job {
        id: format!("j{:x}{:x}", monotonic_ms(), rand::random::<u32>()),
        created_at: gw.now().to_rfc3339(),
        rate_per_second: req.rate_per_second,
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
    });
    gw.jobs.insert(job.id.clone(), job.clone());
    tokio::spawn(run(gw, shard, job.clone(), selection));
    Ok(json_response(StatusCode::ACCEPTED, &job.view()))
}

/// `GET /v1/pushes/{id}`.
pub fn get(gw: &Gateway, id: &str) -> Result<Resp, ApiError> {
    let job = gw.jobs.get(id).ok_or_else(|| unknown_job(id))?;
    Ok(json_response(StatusCode::OK, &job.view()))
}

/// `DELETE /v1/pushes/{id}`: stops sending; wakes in flight finish. A job
/// that already finished is answered as it is.
pub fn cancel(gw: &Gateway, id: &str) -> Result<Resp, ApiError> {
    let job = gw.jobs.get(id).ok_or_else(|| unknown_job(id))?;
    {
        let _ending = job.ending.lock();
        if !job.finished.load(Ordering::Acquire) {
            job.cancelled.store(true, Ordering::Release);
        }
    }
    Ok(json_response(StatusCode::OK, &job.view()))
}

fn unknown_job(id: &str) -> ApiError {
    ApiError::not_found("unknown_job", format!("no bulk wake {id:?}"))
}

fn forget_old_jobs(gw: &Gateway) {
    if gw.jobs.len() < MAX_REMEMBERED_JOBS {
        return;
    }
    let mut finished: Vec<(String, String)> = gw
        .jobs
        .iter()
        .filter(|j| j.finished.load(Ordering::Acquire))
        .map(|j| (j.created_at.clone(), j.id.clone()))
        .collect();
    finished.sort();
    for (_, id) in finished
        .iter()
        .take(gw.jobs.len() + 1 - MAX_REMEMBERED_JOBS)
    {
        gw.jobs.remove(id);
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

/// A batch of a job's devices, handed to one shard to send.
enum Batch {
    Ids(Vec<String>),
    Records(Vec<DeviceRecord>),
}

/// What a job's senders share: the job, its in-flight bound and its pace.
struct Sending {
    gw: Arc<Gateway>,
    job: Arc<Job>,
    /// [`JOB_INFLIGHT`] permits; one held by each wake in flight.
    wakes: Arc<Semaphore>,
    pacer: Option<Mutex<Pacer>>,
}

/// Hands a job's batches to the shards in turn, at most [`PAGES_AHEAD`]
/// not yet taken up. Each shard sends its share from one task for the
/// whole job (see [`send_batches`]).
struct Dealer {
    sending: Arc<Sending>,
    shards: Vec<mpsc::Sender<(Batch, OwnedSemaphorePermit)>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    next: usize,
    pages: Arc<Semaphore>,
}

impl Dealer {
    fn new(sending: Arc<Sending>, runtimes: Vec<(usize, Handle)>) -> Dealer {
        let (mut shards, mut tasks) = (Vec::new(), Vec::new());
        for (shard, rt) in runtimes {
            let (tx, rx) = mpsc::channel(PAGES_AHEAD);
            tasks.push(rt.spawn(send_batches(sending.clone(), shard, rx)));
            shards.push(tx);
        }
        Dealer {
            sending,
            shards,
            tasks,
            next: 0,
            pages: Arc::new(Semaphore::new(PAGES_AHEAD)),
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
        let _wakes = self.sending.wakes.acquire_many(JOB_INFLIGHT as u32).await;
    }
}

async fn run(gw: Arc<Gateway>, shard: usize, job: Arc<Job>, selection: Selection) {
    let running = RunningGauge::new();
    let mut shards = gw.shard_runtimes();
    if shards.is_empty() {
        shards.push((shard, Handle::current()));
    }
    let sending = Arc::new(Sending {
        gw: gw.clone(),
        job: job.clone(),
        wakes: Arc::new(Semaphore::new(JOB_INFLIGHT)),
        pacer: job
            .rate_per_second
            .map(|r| Mutex::new(Pacer::new(r, (r / 10).clamp(1, 1000), monotonic_ms()))),
    });
    let mut dealer = Dealer::new(sending, shards);
    let th = gw.settings.thresholds;
    match selection {
        Selection::Ids(ids) => {
            job.selected.store(ids.len() as u64, Ordering::Release);
            job.selection_done.store(true, Ordering::Release);
            let mut ids = ids.into_iter();
            loop {
                let batch: Vec<String> = ids.by_ref().take(PAGE).collect();
                if batch.is_empty() || job.cancelled.load(Ordering::Acquire) {
                    break;
                }
                dealer.deal(Batch::Ids(batch)).await;
            }
        }
        Selection::Filter(state) => {
            let mut after: Option<String> = None;
            loop {
                if job.cancelled.load(Ordering::Acquire) {
                    break;
                }
                let now = gw.now();
                let store = gw.store.clone();
                let cursor = after.clone();
                let page = tokio::task::spawn_blocking(move || {
                    let filter = move |r: &DeviceRecord| {
                        state.is_none_or(|s| r.state_at(&th, now).state == s)
                    };
                    store.page(cursor.as_deref(), PAGE, PAGE * 16, &filter)
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
    {
        let _ending = job.ending.lock();
        if job.cancelled.load(Ordering::Acquire) {
            let v = job.view();
            job.not_sent.fetch_add(v.pending, Ordering::AcqRel);
        }
        job.finished.store(true, Ordering::Release);
    }
    tracing::info!(job = %job.id, done = job.view().done, "bulk wake finished");
}

/// Sends the batches dealt to one shard, driving their wakes from this one
/// task (see [`WakeBatch`]). A batch's page is released once all its
/// devices are started; the task ends when the dealer is done (or the job
/// cancelled) and every wake it started has its result.
async fn send_batches(
    sending: Arc<Sending>,
    shard: usize,
    mut batches: mpsc::Receiver<(Batch, OwnedSemaphorePermit)>,
) {
    let batches_counter = metrics::counter!(m::BULK_BATCHES, "shard" => shard.to_string());
    let gw = sending.gw.clone();
    let job = sending.job.clone();
    let now = {
        let gw = gw.clone();
        move || gw.now()
    };
    let mut wakes = WakeBatch::new(gw.sender.clone(), shard, now);
    // The batch being started, with its page.
    let mut current: Option<(Devices, OwnedSemaphorePermit)> = None;
    let mut dealing = true;
    let mut results = Vec::new();
    let mut outcomes = Vec::new();
    // Dead channels being marked durably before their results count.
    let mut concluding = FuturesUnordered::new();
    // A claimed wake waiting for a free stream.
    let mut parked: Option<JobWake> = None;
    // A device waiting for an in-flight permit or for the pace.
    let mut staged: Option<DeviceRecord> = None;
    // An in-flight permit taken while the pace said wait.
    let mut held: Option<OwnedSemaphorePermit> = None;
    loop {
        let cancelled = job.cancelled.load(Ordering::Acquire);
        // Start every wake that may start now.
        let mut wait = Wait::Nothing;
        loop {
            let w = match parked.take() {
                Some(w) => w,
                None if cancelled => break,
                None => {
                    let rec = match staged.take() {
                        Some(rec) => rec,
                        None => match current.as_mut().and_then(|(d, _)| d.next(&gw)) {
                            Some(Some(rec)) => rec,
                            Some(None) => {
                                // A listed id that is not registered.
                                job.count(None);
                                continue;
                            }
                            None => {
                                // The batch is all started: its page goes
                                // back, and the next one comes.
                                current = None;
                                match batches.try_recv() {
                                    Ok((batch, page)) => {
                                        batches_counter.increment(1);
                                        current = Some((Devices::new(batch), page));
                                        continue;
                                    }
                                    Err(mpsc::error::TryRecvError::Empty) => {
                                        wait = Wait::Batch;
                                    }
                                    Err(mpsc::error::TryRecvError::Disconnected) => {
                                        dealing = false;
                                    }
                                }
                                break;
                            }
                        },
                    };
                    let Some(permit) = held
                        .take()
                        .or_else(|| sending.wakes.clone().try_acquire_owned().ok())
                    else {
                        staged = Some(rec);
                        wait = Wait::Permit;
                        break;
                    };
                    if let Some(p) = &sending.pacer {
                        if let Err(ms) = p.lock().take(monotonic_ms()) {
                            held = Some(permit);
                            staged = Some(rec);
                            wait = Wait::Pace(Duration::from_millis(ms));
                            break;
                        }
                    }
                    if let Some(pending) = claim_quietly(&gw, rec.device_id.as_str()) {
                        // Joined a wake already pending.
                        let job = job.clone();
                        tokio::spawn(async move {
                            job.count(pending.result().await);
                            drop(permit);
                        });
                        continue;
                    }
                    JobWake {
                        gw: gw.clone(),
                        rec,
                        settled: false,
                        _permit: permit,
                    }
                }
            };
            if let Err(w) = wakes.start(w) {
                parked = Some(w);
                break;
            }
        }
        let starting = !cancelled && (dealing || current.is_some() || staged.is_some());
        if wakes.is_empty() && concluding.is_empty() && parked.is_none() && !starting {
            break;
        }
        tokio::select! {
            biased;
            _ = wakes.finished(&mut results), if !wakes.is_empty() => {
                // The outcomes go onto the devices together (see
                // `Registry::record_pushes`); a dead channel's is kept
                // when its mark is durable.
                outcomes.clear();
                outcomes.extend(results.iter().filter(|(_, r)| r.dead.is_none()).filter_map(
                    |(w, r)| Some((KeyBuf::encode(w.rec.device_id.as_str())?, last_push(r))),
                ));
                gw.registry.record_pushes(&outcomes);
                for (mut w, report) in results.drain(..) {
                    if report.dead.is_none() {
                        job.count(Some(w.settle(report).report()));
                        continue;
                    }
                    let job = job.clone();
                    concluding.push(async move {
                        record_push(&w.gw, &w.rec, &report);
                        if let Some(reason) = report.dead {
                            mark_dead(&w.gw, &w.rec, reason).await;
                        }
                        job.count(Some(w.settle(report).report()));
                    });
                }
            }
            Some(()) = concluding.next(), if !concluding.is_empty() => {}
            // Async blocks: a disabled branch's future is still built.
            p = async { sending.wakes.clone().acquire_owned().await }, if matches!(wait, Wait::Permit) => {
                // The semaphore is never closed.
                held = p.ok();
            }
            _ = async { tokio::time::sleep(wait.pace()).await }, if matches!(wait, Wait::Pace(_)) => {}
            b = batches.recv(), if matches!(wait, Wait::Batch) => match b {
                Some((batch, page)) => {
                    batches_counter.increment(1);
                    current = Some((Devices::new(batch), page));
                }
                None => dealing = false,
            },
            else => {}
        }
    }
}

/// Why a batch stopped starting wakes for now.
enum Wait {
    Nothing,
    /// The next batch has not come yet.
    Batch,
    /// The job has its most wakes in flight.
    Permit,
    /// The job's pace allows the next wake after this long.
    Pace(Duration),
}

impl Wait {
    fn pace(&self) -> Duration {
        match self {
            Wait::Pace(d) => *d,
            _ => Duration::ZERO,
        }
    }
}

/// A batch's devices, in order: records, or listed ids looked up as they
/// come (`Some(None)` for one not registered).
enum Devices {
    Ids(std::vec::IntoIter<String>),
    Records(std::vec::IntoIter<DeviceRecord>),
}

impl Devices {
    fn new(batch: Batch) -> Devices {
        match batch {
            Batch::Ids(ids) => Devices::Ids(ids.into_iter()),
            Batch::Records(recs) => Devices::Records(recs.into_iter()),
        }
    }

    fn next(&mut self, gw: &Gateway) -> Option<Option<DeviceRecord>> {
        match self {
            Devices::Ids(ids) => ids.next().map(|id| gw.registry.get(&id)),
            Devices::Records(recs) => recs.next().map(Some),
        }
    }
}

/// One device of a batch, from its claimed wake to the result counted;
/// its in-flight permit is released when it is dropped, and so is its
/// claim if it was never settled (the batch's task was dropped).
struct JobWake {
    gw: Arc<Gateway>,
    rec: DeviceRecord,
    settled: bool,
    _permit: OwnedSemaphorePermit,
}

impl JobWake {
    fn settle(&mut self, report: WakeReport) -> Settled {
        self.settled = true;
        settle(&self.gw, self.rec.device_id.as_str(), report)
    }
}

impl Drop for JobWake {
    fn drop(&mut self) {
        if !self.settled {
            unclaim(&self.gw, self.rec.device_id.as_str());
        }
    }
}

impl WakeTarget for JobWake {
    fn uri(&self) -> &ChannelUri {
        &self.rec.channel_uri
    }

    fn pfn(&self) -> &str {
        self.rec.pfn.as_str()
    }
}
