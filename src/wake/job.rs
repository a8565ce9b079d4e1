//! One bulk wake's identity and progress: what it selected, how its
//! devices' wakes ended, and whether it was cancelled. Read by the API
//! while the job runs ([`super::bulk`]) and its shards send
//! ([`super::send`]).

use super::WakeReport;
use crate::clock;
use crate::core::wns::{Outcome, PushResult};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// One bulk wake, running or finished: its progress is read while it runs.
pub struct Job {
    id: String,
    created_at: String,
    rate_per_second: Option<u32>,
    pub(super) selected: AtomicU64,
    received: AtomicU64,
    dropped: AtomicU64,
    throttled: AtomicU64,
    expired: AtomicU64,
    failed: AtomicU64,
    /// Selected but not sent because the job was cancelled.
    not_sent: AtomicU64,
    pub(super) selection_done: AtomicBool,
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
    pub(super) fn new(rate_per_second: Option<u32>) -> Job {
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

    /// Marks the job finished; a cancelled job counts what it did not
    /// send.
    pub(super) fn finish(&self) {
        let _ending = self.ending.lock();
        if self.is_cancelled() {
            let pending = self.progress().pending;
            self.not_sent.fetch_add(pending, Ordering::AcqRel);
        }
        self.finished.store(true, Ordering::Release);
    }
}
