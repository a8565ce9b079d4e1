//! One bulk wake's identity and progress: what it selected, how its
//! devices' wakes ended, and whether it was cancelled. Read by the API
//! while the job runs ([`super::bulk`]) and its shards send
//! ([`super::send`]).

use super::limits::JOB_FAILURES_KEPT_MAX;
use super::WakeReport;
use crate::clock;
use crate::core::bulk::{Checkpoint, Counts, JobDef, Position};
use crate::core::wns::{Outcome, PushResult};
use crate::core::DeadReason;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// One bulk wake, running or finished: its progress is read while it runs.
pub struct Job {
    id: String,
    created_at: String,
    rate_per_second: Option<u32>,
    /// Whether devices whose channel WNS declared dead (404, 410) are
    /// woken too; by default they are skipped.
    include_dead: bool,
    /// Devices the selection held when the job started, known up front:
    /// the listed ids, or the registry's count of the state (or of all).
    expected_total: u64,
    pub(super) selected: AtomicU64,
    received: AtomicU64,
    dropped: AtomicU64,
    throttled: AtomicU64,
    expired: AtomicU64,
    failed: AtomicU64,
    /// Selected but not sent because the job was cancelled.
    not_sent: AtomicU64,
    /// Selected but not sent because WNS already declared the channel dead.
    skipped_dead: AtomicU64,
    /// The first [`JOB_FAILURES_KEPT_MAX`] devices whose wake did not end
    /// `received`, in the order their results came.
    failures: Mutex<Vec<Failure>>,
    /// Failures past [`JOB_FAILURES_KEPT_MAX`], counted only.
    failures_not_kept: AtomicU64,
    pub(super) selection_done: AtomicBool,
    cancelled: AtomicBool,
    /// Run by several nodes, each over the partitions it owns: its counts
    /// here are this process's walks' only.
    pub(super) shared: bool,
    /// Told to stop because the gateway shuts down: it stops sending, and
    /// is resumed from its checkpoint at the next start.
    stopping: AtomicBool,
    finished: AtomicBool,
    /// How far the job got, in the order it selected its devices.
    tracker: Mutex<Tracker>,
    /// What this process's ended walks of a shared job counted, and
    /// selected.
    prior: Mutex<(Counts, u64)>,
    /// Held while a checkpoint is written; set once the last one was.
    pub(super) written_final: Mutex<bool>,
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
    pub skipped_dead: u64,
    pub done: u64,
}

impl Progress {
    /// The outcome counts.
    pub fn counts(&self) -> Counts {
        Counts {
            received: self.received,
            dropped: self.dropped,
            throttled: self.throttled,
            expired: self.expired,
            failed: self.failed,
            not_sent: self.not_sent,
            skipped_dead: self.skipped_dead,
        }
    }

    /// Adds `selected` devices that ended as `c` says (another node's
    /// share of the job).
    pub(super) fn add(&mut self, selected: u64, c: &Counts) {
        self.total += selected;
        self.received += c.received;
        self.dropped += c.dropped;
        self.throttled += c.throttled;
        self.expired += c.expired;
        self.failed += c.failed;
        self.not_sent += c.not_sent;
        self.skipped_dead += c.skipped_dead;
        self.done += c.done();
        self.pending = self.total.saturating_sub(self.done);
    }
}

/// One device of a job whose wake did not end `received`, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    pub device_id: String,
    /// How the wake ended: a push result (`dropped`, `channel_dead`,
    /// `attempts_exhausted`, ...), or `not_registered` for a listed id
    /// the gateway does not know.
    pub result: &'static str,
    /// WNS's last answer, classified (`channel_expired`, `throttled`, ...).
    pub wns_outcome: Option<&'static str>,
    /// WNS's last HTTP status.
    pub status: Option<u16>,
}

impl Failure {
    fn new(device_id: &str, report: Option<&WakeReport>) -> Failure {
        Failure {
            device_id: device_id.to_owned(),
            result: report.map_or("not_registered", |r| r.result.label()),
            wns_outcome: report.and_then(|r| r.wns_outcome.as_ref().map(Outcome::label)),
            status: report.and_then(|r| r.status),
        }
    }
}

impl Job {
    /// A fresh job id.
    pub(super) fn new_id() -> String {
        format!("j{:x}{:x}", clock::monotonic_ms(), clock::random::<u32>())
    }

    /// The job `def` describes, going on from `checkpoint` (its counts and
    /// position) when one was written.
    pub(super) fn from_def(def: &JobDef, checkpoint: Option<Checkpoint>, shared: bool) -> Job {
        let checkpoint = checkpoint.unwrap_or_default();
        let c = checkpoint.counts;
        Job {
            id: def.id.clone(),
            created_at: def.created_at.clone(),
            rate_per_second: def.rate_per_second,
            include_dead: def.include_dead,
            expected_total: def.expected_total,
            selected: AtomicU64::new(checkpoint.selected),
            received: AtomicU64::new(c.received),
            dropped: AtomicU64::new(c.dropped),
            throttled: AtomicU64::new(c.throttled),
            expired: AtomicU64::new(c.expired),
            failed: AtomicU64::new(c.failed),
            not_sent: AtomicU64::new(c.not_sent),
            skipped_dead: AtomicU64::new(c.skipped_dead),
            failures: Mutex::new(Vec::new()),
            failures_not_kept: AtomicU64::new(0),
            selection_done: AtomicBool::new(checkpoint.finished),
            cancelled: AtomicBool::new(checkpoint.cancelled),
            stopping: AtomicBool::new(false),
            finished: AtomicBool::new(checkpoint.finished),
            shared,
            tracker: Mutex::new(Tracker {
                walk: String::new(),
                dealt: 0,
                folded: 0,
                completed: BTreeMap::new(),
                checkpoint,
            }),
            prior: Mutex::new((Counts::default(), 0)),
            written_final: Mutex::new(false),
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

    /// Devices in the selection when the job started. `total` ends near
    /// it: devices registered, removed or changing state meanwhile move it.
    pub fn expected_total(&self) -> u64 {
        self.expected_total
    }

    /// Whether devices whose channel WNS declared dead are woken too.
    pub fn include_dead(&self) -> bool {
        self.include_dead
    }

    /// Whether a device marked `dead` is left out of this job: WNS
    /// answered 404 or 410 for its channel, so a wake would only be
    /// answered the same (a 403 is the credential's, and is sent again).
    pub(super) fn skips(&self, dead: Option<crate::core::DeadMark>) -> bool {
        !self.include_dead
            && matches!(
                dead.map(|d| d.reason),
                Some(DeadReason::Wns404 | DeadReason::Wns410)
            )
    }

    /// Counts one device of `page` left out because its channel is dead.
    pub(super) fn count_skipped_dead(&self, page: &Arc<PageTrack>) {
        self.skipped_dead.fetch_add(1, Ordering::AcqRel);
        page.counts.lock().skipped_dead += 1;
        self.page_counted(page);
    }

    fn page_counted(&self, page: &Arc<PageTrack>) {
        if page.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.page_finished(page);
        }
    }

    /// Up to `limit` failures from position `from`, and how many are kept
    /// in all and were not kept.
    pub fn failures(&self, from: usize, limit: usize) -> (Vec<Failure>, usize, u64) {
        let kept = self.failures.lock();
        let page = kept.iter().skip(from).take(limit).cloned().collect();
        (
            page,
            kept.len(),
            self.failures_not_kept.load(Ordering::Acquire),
        )
    }

    /// Every device the job wakes is selected: `total` is final.
    pub fn selection_done(&self) -> bool {
        self.selection_done.load(Ordering::Acquire)
    }

    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    pub(super) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Whether the job sends no more: cancelled, or stopping with the
    /// gateway.
    pub(super) fn is_halted(&self) -> bool {
        self.is_cancelled() || self.stopping.load(Ordering::Acquire)
    }

    /// Whether the job stopped with the gateway rather than ending: it is
    /// resumed at the next start.
    pub(super) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire) && !self.is_cancelled()
    }

    /// Stops sending because the gateway shuts down; the job is resumed
    /// from its checkpoint at the next start.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// A page of `selected` devices, dealt after every page before it (the
    /// caller counts them into the job's `selected`) in the walk under
    /// way. Once it and every page before it have their results, the
    /// partitions in the ranges `done` (`from..to`) are done and the walk
    /// stands at `at`.
    pub(super) fn new_page(
        self: &Arc<Self>,
        selected: usize,
        done: Vec<(u16, u16)>,
        at: Option<Position>,
    ) -> Arc<PageTrack> {
        let seq = {
            let mut t = self.tracker.lock();
            t.dealt += 1;
            t.dealt - 1
        };
        let page = Arc::new(PageTrack {
            seq,
            done,
            at,
            selected: selected as u64,
            remaining: AtomicUsize::new(selected),
            counts: Mutex::new(Counts::default()),
        });
        if selected == 0 {
            self.page_finished(&page);
        }
        page
    }

    /// Folds the pages that have all their results, in the order they were
    /// dealt, into the checkpoint.
    fn page_finished(&self, page: &Arc<PageTrack>) {
        let mut t = self.tracker.lock();
        t.completed.insert(page.seq, page.clone());
        loop {
            let next = t.folded;
            let Some(p) = t.completed.remove(&next) else {
                break;
            };
            let counts = *p.counts.lock();
            let cp = &mut t.checkpoint;
            cp.counts.add(&counts);
            cp.selected += p.selected;
            for &(from, to) in &p.done {
                cp.mark_done(from, to);
            }
            cp.at = p.at.clone();
            t.folded += 1;
        }
    }

    /// Starts walk `name` from `base` (its counts and position so far):
    /// the pages dealt from now on are its own.
    pub(super) fn begin_walk(&self, name: String, base: Checkpoint) {
        let mut t = self.tracker.lock();
        t.walk = name;
        t.dealt = 0;
        t.folded = 0;
        t.completed.clear();
        t.checkpoint = base;
    }

    /// The walk under way and what a checkpoint of it written now says.
    /// A job shared between nodes keeps the walk's own counts; otherwise
    /// the last one, as the job ends, has the job's final counts.
    pub(super) fn checkpoint(&self) -> (String, Checkpoint) {
        let (walk, mut cp) = {
            let t = self.tracker.lock();
            (t.walk.clone(), t.checkpoint.clone())
        };
        cp.cancelled = self.is_cancelled();
        if self.is_finished() && !self.is_stopping() && self.shared {
            cp.finished = true;
        } else if self.is_finished() && !self.is_stopping() {
            // Ended: the counts are final, whatever was folded.
            let p = self.progress();
            cp.finished = true;
            cp.selected = p.total;
            cp.counts = p.counts();
        }
        (walk, cp)
    }

    /// Ends a walk of a shared job: its counts become what its checkpoint
    /// folded, added to the walks before it. Devices it dealt but did not
    /// start, or counted past its position, are the next walk's.
    pub(super) fn settle_walk(&self) {
        let t = self.tracker.lock();
        let mut prior = self.prior.lock();
        prior.0.add(&t.checkpoint.counts);
        prior.1 += t.checkpoint.selected;
        let (c, selected) = *prior;
        self.selected.store(selected, Ordering::Release);
        self.received.store(c.received, Ordering::Release);
        self.dropped.store(c.dropped, Ordering::Release);
        self.throttled.store(c.throttled, Ordering::Release);
        self.expired.store(c.expired, Ordering::Release);
        self.failed.store(c.failed, Ordering::Release);
        self.not_sent.store(c.not_sent, Ordering::Release);
        self.skipped_dead.store(c.skipped_dead, Ordering::Release);
    }

    /// The checkpoint the job was loaded with, in embedded mode.
    pub(super) fn base(&self) -> Checkpoint {
        self.tracker.lock().checkpoint.clone()
    }

    /// The job's progress now.
    pub fn progress(&self) -> Progress {
        let get = |a: &AtomicU64| a.load(Ordering::Acquire);
        let done = get(&self.received)
            + get(&self.dropped)
            + get(&self.throttled)
            + get(&self.expired)
            + get(&self.failed)
            + get(&self.not_sent)
            + get(&self.skipped_dead);
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
            skipped_dead: get(&self.skipped_dead),
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
    /// listed id that is not registered or an abandoned wake), and keeps
    /// it as a failure unless WNS received the push.
    pub(super) fn count(
        &self,
        page: &Arc<PageTrack>,
        device_id: &str,
        report: Option<&WakeReport>,
    ) {
        if !matches!(report.map(|r| r.result), Some(PushResult::Delivered)) {
            let mut kept = self.failures.lock();
            if kept.len() < JOB_FAILURES_KEPT_MAX {
                kept.push(Failure::new(device_id, report));
            } else {
                self.failures_not_kept.fetch_add(1, Ordering::AcqRel);
            }
        }
        let mut counts = page.counts.lock();
        let (counter, count) = match report.map(|r| (r.result, r.wns_outcome)) {
            Some((PushResult::Delivered, _)) => (&self.received, &mut counts.received),
            Some((PushResult::Dropped, _)) => (&self.dropped, &mut counts.dropped),
            Some((_, Some(Outcome::ChannelThrottled | Outcome::SenderThrottled { .. }))) => {
                (&self.throttled, &mut counts.throttled)
            }
            Some((PushResult::ChannelDead, _)) => (&self.expired, &mut counts.expired),
            _ => (&self.failed, &mut counts.failed),
        };
        counter.fetch_add(1, Ordering::AcqRel);
        *count += 1;
        drop(counts);
        self.page_counted(page);
    }

    /// Marks the job finished; a cancelled job counts what it did not
    /// send (one that stops with the gateway does not: it goes on at the
    /// next start).
    pub(super) fn finish(&self) {
        let _ending = self.ending.lock();
        if self.is_cancelled() {
            let pending = self.progress().pending;
            self.not_sent.fetch_add(pending, Ordering::AcqRel);
        }
        self.finished.store(true, Ordering::Release);
    }
}

/// One page of a job: its devices counted as their results come, and what
/// the checkpoint gains once it and every page before it are counted.
pub(super) struct PageTrack {
    seq: u64,
    done: Vec<(u16, u16)>,
    at: Option<Position>,
    selected: u64,
    /// Devices without their result yet.
    remaining: AtomicUsize,
    counts: Mutex<Counts>,
}

/// A job's pages in the order they were dealt, folded into its checkpoint
/// as the ones at the front complete.
struct Tracker {
    /// The walk's name (see [`crate::core::bulk::StoredJob`]).
    walk: String,
    /// Pages dealt.
    dealt: u64,
    /// Pages folded: every page before this one.
    folded: u64,
    /// Pages complete but behind one that is not.
    completed: BTreeMap<u64, Arc<PageTrack>>,
    checkpoint: Checkpoint,
}
