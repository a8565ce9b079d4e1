//! Channel lifecycle and the refresh queue, wired to the registry and the
//! store: expiry sweeps, WNS verdicts, PFN-replacement jobs and their
//! hand-out (check-in, lease, webhook).
//!
//! Owns: the in-memory [`RefreshQueue`] (the core state machine) behind one
//! lock, the sweep cursor over the store's issued-at index, and the
//! lifecycle thread (sweep, tick, webhook).
//! Must not touch: sockets of the API (handlers call in here), the clock
//! (callers pass `now`).
//!
//! # Consistency
//!
//! The device record carries its refresh mark (`refresh_pending` with the
//! job id, or `unreachable`); the job is a mutation of its own in the
//! store, and the queue in memory is what snapshots take the jobs from
//! ([`crate::store::JobSource`]). Both change in one durable batch. Every batch that changes a device from
//! here is guarded by the channel URI it was computed from
//! ([`Mutation::Guard`]): if the device registered a new URI meanwhile, the
//! batch applies nothing and the job opened for it is discarded. Queue
//! changes are submitted while the queue lock is held, so the store sees
//! them in the order the queue made them.
//!
//! Invariants (checked by `tests/refresh.rs` and the queue's own tests): at
//! most one open job per device; a `refresh_pending` device has an open
//! job; jobs survive a crash and restart as they were last acknowledged.

pub mod webhook;

use crate::config::RefreshSettings;
use crate::core::refresh::{
    pfn_to_send, Change, CompleteOutcome, Handout, Job, JobId, PfnChoice, QueueError, QueueStats,
    RefreshQueue,
};
use crate::core::syncml::{pfn_replacement, PfnCommand, PfnVerb};
use crate::core::{
    DeadMark, DeadReason, DeviceId, DeviceRecord, LeaveReason, Pfn, RefreshMark, RefreshState,
    Thresholds, UnixTime,
};
use crate::registry::Registry;
use crate::store::committer::{CommitHandle, Ticket};
use crate::store::{Mutation, Store, StoreError};
use crate::telemetry::metrics as m;
use parking_lot::Mutex;
use serde::Serialize;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// Sweep submissions waiting to be durable at once (well under the store's
/// queue capacity, so a sweep never makes API writes see 503).
const SWEEP_SUBMISSIONS_INFLIGHT_MAX: usize = 8192;
const _: () = assert!(
    SWEEP_SUBMISSIONS_INFLIGHT_MAX * 4 <= crate::store::committer::QUEUE_SUBMISSIONS_DEFAULT
);

/// What a sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    /// Devices read from the issued-at index (those issued in the swept
    /// range).
    pub examined: u64,
    /// Refresh jobs opened for devices expired by age.
    pub opened: u64,
}

/// A job as the API shows it, with its SyncML.
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    pub job_id: String,
    pub device_id: String,
    pub pfn: String,
    pub provider_id: String,
    pub reason: LeaveReason,
    pub expired_at: String,
    pub created_at: String,
    pub attempts: u16,
    pub state: &'static str,
    /// Lease end (leased), end of the wait for a new URI (delivered), or
    /// when a job queued again after a failure is due (queued).
    pub until: Option<String>,
    pub handed_out_via: Option<Handout>,
    /// The commands to put into the device's OMA-DM session.
    pub syncml: String,
    pub cmd_ids: Vec<u32>,
}

/// The lifecycle engine. One per gateway.
pub struct Lifecycle {
    queue: Mutex<RefreshQueue>,
    settings: RefreshSettings,
    thresholds: Thresholds,
    /// PFNs of the configured WNS apps, for `pfn_choice = rotate`.
    apps: Vec<Pfn>,
    registry: Arc<Registry>,
    store: Arc<dyn Store>,
    commits: CommitHandle,
    /// The sweep has opened jobs for every device issued before this time
    /// (seconds; the next sweep starts here).
    swept_to: AtomicU32,
    /// Lowest issued-at registered behind `swept_to` since the last sweep
    /// (an aged channel imported late); `u32::MAX` when none.
    rewind_to: AtomicU32,
    /// Where devices turning `renewal_due` are offered a nudge wake, when
    /// nudges are on (the wake service takes them from there).
    nudges: Mutex<Option<tokio::sync::mpsc::Sender<DeviceId>>>,
    /// Devices issued before this time have been offered a nudge.
    nudged_to: AtomicU32,
    /// Cluster mode: job ids carry their partition
    /// ([`RefreshQueue::ids_carry_partitions`]).
    ids_carry_partitions: std::sync::atomic::AtomicBool,
    /// Cluster mode: which partitions this node serves, so that its pace
    /// is its share of `refresh.jobs_per_second`; with the ownership epoch
    /// the share was last worked out at.
    owner: std::sync::OnceLock<Arc<dyn crate::core::bulk::Owner>>,
    share_epoch: std::sync::atomic::AtomicU64,
}

/// The lowest job id any run issues: a run's ids start at its start time
/// (seconds) shifted left by 24 bits ([`Lifecycle::restore`]), and no run
/// started before 2026-01-01.
pub const FIRST_ISSUED_ID: JobId = 1_767_225_600 << 24;

/// Formats a job id for the API.
pub fn job_id_string(id: JobId) -> String {
    format!("r{id}")
}

/// Parses a job id from the API.
pub fn parse_job_id(s: &str) -> Option<JobId> {
    s.strip_prefix('r')?.parse().ok()
}

impl Lifecycle {
    pub fn new(
        settings: RefreshSettings,
        thresholds: Thresholds,
        apps: Vec<Pfn>,
        registry: Arc<Registry>,
        store: Arc<dyn Store>,
        commits: CommitHandle,
    ) -> Lifecycle {
        describe_metrics();
        Lifecycle {
            queue: Mutex::new(RefreshQueue::new(settings.policy.clone())),
            settings,
            thresholds,
            apps,
            registry,
            store,
            commits,
            swept_to: AtomicU32::new(0),
            rewind_to: AtomicU32::new(u32::MAX),
            nudges: Mutex::new(None),
            nudged_to: AtomicU32::new(0),
            ids_carry_partitions: std::sync::atomic::AtomicBool::new(false),
            owner: std::sync::OnceLock::new(),
            share_epoch: std::sync::atomic::AtomicU64::new(u64::MAX),
        }
    }

    /// Cluster mode: job ids carry their partition, so any node routes a
    /// call for a job to its owner; set before [`Lifecycle::restore`].
    pub fn set_ids_carry_partitions(&self) {
        self.ids_carry_partitions
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Cluster mode: lease and webhook hand-outs are paced at this node's
    /// share of `refresh.jobs_per_second`, the share of the partitions it
    /// serves, so that the nodes together keep the configured pace.
    pub fn set_owner(&self, owner: Arc<dyn crate::core::bulk::Owner>) {
        let _ = self.owner.set(owner);
    }

    /// Brings the queue's pace share up to date with the partitions served.
    fn update_share(&self, q: &mut RefreshQueue) {
        use std::sync::atomic::Ordering;
        let Some(owner) = self.owner.get() else {
            return;
        };
        let epoch = owner.epoch();
        if self.share_epoch.swap(epoch, Ordering::AcqRel) == epoch {
            return;
        }
        let all = self.registry.partitioning().count();
        let owned = (0..all).filter(|p| owner.owns(*p)).count();
        q.set_pace_share(owned as u32, u32::from(all));
    }

    /// Turns nudge wakes on: devices are offered on `queue`. Devices that
    /// turned `renewal_due` up to a day before `now` are caught up; older
    /// ones are not nudged.
    pub fn set_nudges(&self, queue: tokio::sync::mpsc::Sender<DeviceId>, now: UnixTime) {
        let from = now
            .0
            .saturating_sub(self.thresholds.renewal_due_after)
            .saturating_sub(86_400);
        self.nudged_to.store(from, Ordering::Relaxed);
        *self.nudges.lock() = Some(queue);
    }

    /// Stops offering nudges.
    pub fn stop_nudges(&self) {
        self.nudges.lock().take();
    }

    /// Offers every device that turned `renewal_due` since the last call to
    /// the nudge thread, reading only those index entries. Returns how many
    /// were offered.
    pub fn offer_nudges(&self, now: UnixTime) -> Result<u64, StoreError> {
        let guard = self.nudges.lock();
        let Some(nudges) = guard.as_ref() else {
            return Ok(0);
        };
        let due_before = now.0.saturating_sub(self.thresholds.renewal_due_after);
        // Channels already past expiry are the sweep's, not the nudge's.
        let expired_before = now.0.saturating_sub(self.thresholds.expire_after);
        let from = UnixTime(
            self.nudged_to
                .load(Ordering::Relaxed)
                .max(expired_before + 1),
        );
        let to = UnixTime(due_before.saturating_add(1));
        let mut pages = self
            .registry
            .issued_between(from, to, self.settings.sweep_batch);
        let mut offered = 0;
        while let Some(page) = pages.next_page() {
            for r in page {
                if r.dead.is_some() || r.refresh.is_some() {
                    continue;
                }
                let at = r.issued_at;
                if nudges.try_send(r.device_id).is_err() {
                    // The queue is full: the next run starts again at this
                    // minute (the index is read a minute at a time, in no
                    // order within one), so a few devices may be offered
                    // twice; the nudge thread joins wakes already pending.
                    self.nudged_to
                        .store((at.0 - at.0 % 60).max(from.0), Ordering::Relaxed);
                    return Ok(offered);
                }
                offered += 1;
            }
        }
        self.nudged_to.store(to.0, Ordering::Relaxed);
        Ok(offered)
    }

    pub fn settings(&self) -> &RefreshSettings {
        &self.settings
    }

    /// Loads the stored jobs into the queue (at start, after the registry
    /// is loaded). Returns how many were loaded.
    ///
    /// Job ids continue from `now << 24` (about 16 million ids per second of
    /// wall time), or above the highest stored id, so that an id is never
    /// reused across restarts even when no job survived to be restored.
    pub fn restore(&self, now: UnixTime) -> Result<u64, StoreError> {
        let mut q = self.queue.lock();
        if self
            .ids_carry_partitions
            .load(std::sync::atomic::Ordering::Acquire)
        {
            // About a million ids per second of wall time, above the
            // partition's bits.
            q.ids_carry_partitions(self.registry.partitioning());
            q.ids_from(u64::from(now.0) << 20);
        } else {
            q.ids_from(u64::from(now.0) << 24);
        }
        let mut jobs = Vec::new();
        let n = self.store.scan_jobs(&mut |job| jobs.push(job))?;
        let fixes = q.restore_all(jobs);
        let tickets = self.persist_locked(&mut q, fixes, UnixTime(0));
        drop(q);
        for t in tickets {
            t.wait_blocking()?;
        }
        self.publish_stats(UnixTime(0));
        Ok(n)
    }

    /// Takes over stored jobs of devices this node now serves (cluster mode:
    /// a partition moved here). A device holding a job already keeps it; the
    /// other is closed, as at start.
    pub fn adopt(&self, jobs: Vec<Job>) -> Result<(), StoreError> {
        let mut q = self.queue.lock();
        let fixes: Vec<_> = jobs.into_iter().filter_map(|j| q.restore(j)).collect();
        let tickets = self.persist_locked(&mut q, fixes, UnixTime(0));
        drop(q);
        for t in tickets {
            t.wait_blocking()?;
        }
        self.publish_stats(UnixTime(0));
        Ok(())
    }

    /// Lets go of the jobs of devices `leaves` picks, without closing them
    /// (cluster mode: their partition moved to another node, which restores
    /// them). Returns how many.
    pub fn release(&self, leaves: impl FnMut(&str) -> bool) -> usize {
        let n = self.queue.lock().release(leaves);
        self.publish_stats(UnixTime(0));
        n
    }

    /// Queue counts at `now`.
    pub fn stats(&self, now: UnixTime) -> QueueStats {
        self.queue.lock().stats(now)
    }

    /// Tells the lifecycle about a registration whose channel is already
    /// old: past the expiry age, the next sweep goes back for it (an aged
    /// fleet imported late); already `renewal_due` (and not dead), it is
    /// offered a nudge at once when nudges are on, since the nudge cursor
    /// has passed its issue time.
    pub fn registered_aged(&self, rec: &DeviceRecord, now: UnixTime) {
        let issued_at = rec.issued_at;
        let expire_limit = now.0.saturating_sub(self.thresholds.expire_after);
        if issued_at.0 <= expire_limit {
            self.rewind_to.fetch_min(issued_at.0, Ordering::Relaxed);
            return;
        }
        let due_limit = now.0.saturating_sub(self.thresholds.renewal_due_after);
        if issued_at.0 <= due_limit
            && rec.dead.is_none()
            && issued_at.0 < self.nudged_to.load(Ordering::Relaxed)
        {
            if let Some(n) = self.nudges.lock().as_ref() {
                let _ = n.try_send(rec.device_id.clone());
            }
        }
    }

    /// A device registered a new channel URI (its record, already durable,
    /// has no refresh mark): its open job closes.
    pub async fn registered(&self, device_id: &str, now: UnixTime) {
        let tickets = self.close_part(device_id, now);
        for t in tickets {
            if let Err(e) = t.await {
                tracing::error!(device = device_id, error = %e, "could not close a refresh job");
            }
        }
    }

    /// A device was deleted: its open job goes.
    pub async fn removed(&self, device_id: &str, now: UnixTime) {
        let tickets = self.close_part(device_id, now);
        for t in tickets {
            let _ = t.await;
        }
    }

    fn close_part(&self, device_id: &str, now: UnixTime) -> Vec<Ticket> {
        let mut q = self.queue.lock();
        match q.registered(device_id, now) {
            Some(c) => self.persist_locked(&mut q, vec![c], now),
            None => Vec::new(),
        }
    }

    /// WNS declared the channel `pushed` dead: marks the device (unless it
    /// registered a new URI meanwhile) and opens its refresh job, in one
    /// durable batch.
    pub async fn channel_dead(&self, pushed: &DeviceRecord, reason: DeadReason, now: UnixTime) {
        let Some(current) = self.registry.get(pushed.device_id.as_str()) else {
            return;
        };
        if current.channel_uri != pushed.channel_uri {
            return;
        }
        let mut rec = current;
        let newly_dead = rec.dead.is_none();
        if newly_dead {
            rec.dead = Some(DeadMark { reason, at: now });
        }
        let Some((ticket, opened)) = self.dead_part(&mut rec, reason, newly_dead, pushed, now)
        else {
            return;
        };
        let result = match ticket {
            Ok(t) => t.await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                if newly_dead {
                    metrics::counter!(m::LIFECYCLE_TRANSITIONS, "to" => "expired", "reason" => reason_label(reason.into())).increment(1);
                }
                if opened.is_some() {
                    metrics::counter!(m::REFRESH_OPENED, "reason" => reason_label(reason.into()))
                        .increment(1);
                }
            }
            Err(e) => {
                self.discard(opened.as_ref());
                if !matches!(e, StoreError::Conflict(_)) {
                    tracing::error!(device = %pushed.device_id, error = %e, "could not record a dead channel");
                }
            }
        }
    }

    fn dead_part(
        &self,
        rec: &mut DeviceRecord,
        reason: DeadReason,
        newly_dead: bool,
        pushed: &DeviceRecord,
        now: UnixTime,
    ) -> Option<(Result<Ticket, StoreError>, Option<Job>)> {
        let mut q = self.queue.lock();
        let opened = if rec.refresh.is_none() {
            self.open_locked(&mut q, rec, reason.into(), now, now)
        } else {
            None
        };
        if !newly_dead && opened.is_none() {
            return None;
        }
        let ticket = self.submit_device(rec, opened.as_ref(), &pushed.channel_uri);
        Some((ticket, opened))
    }

    /// Opens a job for `rec` and sets its refresh mark. `None` if the queue
    /// already has one for the device.
    fn open_locked(
        &self,
        q: &mut RefreshQueue,
        rec: &mut DeviceRecord,
        reason: LeaveReason,
        expired_at: UnixTime,
        now: UnixTime,
    ) -> Option<Job> {
        let choice = if self.settings.rotate_pfn {
            PfnChoice::Rotate
        } else {
            PfnChoice::Same
        };
        let pfn = pfn_to_send(choice, &rec.pfn, &self.apps, 0);
        let provider = rec
            .provider_id
            .clone()
            .or_else(|| Some(self.settings.provider_id.clone()));
        match q.open(
            rec.device_id.clone(),
            pfn,
            provider,
            reason,
            expired_at,
            now,
        )? {
            Change::Put(job) => {
                rec.refresh = Some(RefreshMark {
                    state: RefreshState::Pending,
                    since: now,
                    job: job.id,
                });
                Some(job)
            }
            _ => None,
        }
    }

    /// Submits `rec` (and the job opened for it) guarded by `uri`.
    fn submit_device(
        &self,
        rec: &DeviceRecord,
        job: Option<&Job>,
        uri: &crate::core::ChannelUri,
    ) -> Result<Ticket, StoreError> {
        self.commits
            .submit(self.device_mutations(rec, job, uri))
            .map_err(|e| StoreError::Io(e.to_string()))
    }

    /// Sweep submissions allowed to wait at once: a quarter of the store's
    /// queue, at most [`SWEEP_SUBMISSIONS_INFLIGHT_MAX`], so API writes keep room.
    fn max_sweep_inflight(&self) -> usize {
        (self.commits.capacity() / 4).clamp(1, SWEEP_SUBMISSIONS_INFLIGHT_MAX)
    }

    /// Submits for the sweep; when the store's queue is full, waits for the
    /// sweep's own oldest submission (or briefly, for others') and tries
    /// again, for up to 30 s: a sweep slows down rather than fails.
    fn submit_with_backpressure(
        &self,
        mut muts: Vec<Mutation>,
        inflight: &mut std::collections::VecDeque<(Ticket, Option<(Job, LeaveReason)>)>,
        report: &mut SweepReport,
    ) -> Result<Ticket, StoreError> {
        let deadline = crate::clock::instant() + std::time::Duration::from_secs(30);
        loop {
            match self.commits.try_submit_bulk(muts) {
                Ok(t) => return Ok(t),
                Err((crate::store::SubmitError::Overloaded, back))
                    if crate::clock::instant() < deadline =>
                {
                    muts = back;
                    match inflight.pop_front() {
                        Some((t, opened)) => self.settle_sweep_ticket(t, opened, report)?,
                        None => std::thread::sleep(std::time::Duration::from_millis(2)),
                    }
                }
                Err((e, _)) => return Err(StoreError::Io(e.to_string())),
            }
        }
    }

    /// The batch that writes `rec` (and the job opened for it), guarded by
    /// the channel URI it was computed from.
    fn device_mutations(
        &self,
        rec: &DeviceRecord,
        job: Option<&Job>,
        uri: &crate::core::ChannelUri,
    ) -> Vec<Mutation> {
        let mut muts = vec![
            Mutation::Guard {
                device_id: rec.device_id.clone(),
                channel_uri: Some(uri.clone()),
            },
            Mutation::Put(rec.clone()),
        ];
        if let Some(j) = job {
            muts.push(Mutation::PutJob(j.clone()));
        }
        muts
    }

    /// Drops a job that never became durable.
    fn discard(&self, job: Option<&Job>) {
        if let Some(j) = job {
            let mut q = self.queue.lock();
            if q.job_for_device(j.device_id.as_str()).map(|x| x.id) == Some(j.id) {
                q.remove_device(j.device_id.as_str());
            }
        }
    }

    /// Submits the store side of queue changes; call with the queue locked.
    fn persist_locked(
        &self,
        _q: &mut RefreshQueue,
        changes: Vec<Change>,
        now: UnixTime,
    ) -> Vec<Ticket> {
        let mut plain = Vec::new();
        let mut tickets = Vec::new();
        for c in changes {
            match c {
                Change::Put(job) => plain.push(Mutation::PutJob(job)),
                Change::Closed { id, .. } => {
                    plain.push(Mutation::DeleteJob(id));
                    metrics::counter!(m::REFRESH_CLOSED).increment(1);
                }
                Change::GaveUp { id, device_id } => {
                    metrics::counter!(m::REFRESH_GIVEUPS).increment(1);
                    let device = self.registry.get(device_id.as_str());
                    match device {
                        Some(mut rec) if rec.refresh.is_some_and(|r| r.job == id) => {
                            let uri = rec.channel_uri.clone();
                            rec.refresh = Some(RefreshMark {
                                state: RefreshState::Unreachable,
                                since: now,
                                job: id,
                            });
                            let muts = vec![
                                Mutation::Guard {
                                    device_id: device_id.clone(),
                                    channel_uri: Some(uri),
                                },
                                Mutation::DeleteJob(id),
                                Mutation::Put(rec),
                            ];
                            match self.commits.submit_follow_up(muts) {
                                Ok(t) => tickets.push(t),
                                Err(_) => plain.push(Mutation::DeleteJob(id)),
                            }
                            metrics::counter!(m::LIFECYCLE_TRANSITIONS, "to" => "unreachable", "reason" => "gave_up").increment(1);
                        }
                        _ => plain.push(Mutation::DeleteJob(id)),
                    }
                }
            }
        }
        if !plain.is_empty() {
            match self.commits.submit_follow_up(plain) {
                Ok(t) => tickets.push(t),
                Err(e) => tracing::error!(error = %e, "could not persist refresh queue changes"),
            }
        }
        tickets
    }

    /// Checks the job against the device's refresh mark; closes it if the
    /// device moved on (registered meanwhile). True when the job is valid.
    fn valid_locked(&self, q: &mut RefreshQueue, job: &Job, now: UnixTime) -> (bool, Vec<Ticket>) {
        let ok = self
            .registry
            .get(job.device_id.as_str())
            .and_then(|r| r.refresh)
            .is_some_and(|m| m.state == RefreshState::Pending && m.job == job.id);
        if ok {
            return (true, Vec::new());
        }
        let changes = q
            .remove_device(job.device_id.as_str())
            .into_iter()
            .collect();
        (false, self.persist_locked(q, changes, now))
    }

    /// The device opened an OMA-DM session: its job, handed out now.
    ///
    /// A device whose channel is dead but that has no job yet (the sweep
    /// has not reached it, or refresh gave up on it and it came back) gets
    /// one opened now: it is in a session, the best moment there is.
    pub async fn check_in(
        &self,
        device_id: &str,
        first_cmd_id: u32,
        now: UnixTime,
    ) -> Result<Option<JobView>, StoreError> {
        if let Some((ticket, job)) = self.open_for_session(device_id, now) {
            match ticket {
                Ok(t) => match t.await {
                    Ok(()) => {}
                    Err(StoreError::Conflict(_)) => self.discard(Some(&job)),
                    Err(e) => {
                        self.discard(Some(&job));
                        return Err(e);
                    }
                },
                Err(e) => {
                    self.discard(Some(&job));
                    return Err(e);
                }
            }
        }
        let (job, tickets) = self.check_in_part(device_id, now);
        for t in tickets {
            t.await?;
        }
        Ok(job.map(|j| self.view(&j, first_cmd_id)))
    }

    /// Opens a job for a device in session whose channel is dead (by age or
    /// WNS) or that refresh gave up on, if it has none.
    #[allow(clippy::type_complexity)]
    fn open_for_session(
        &self,
        device_id: &str,
        now: UnixTime,
    ) -> Option<(Result<Ticket, StoreError>, Job)> {
        let mut rec = self.registry.get(device_id)?;
        let pending = rec
            .refresh
            .is_some_and(|m| m.state == RefreshState::Pending);
        let st = self.thresholds.state_at(rec.issued_at, rec.dead, now);
        if pending || st.state != crate::core::LifecycleState::Expired {
            return None;
        }
        let (reason, expired_at) = st.since.unwrap_or((LeaveReason::Age, now));
        let uri = rec.channel_uri.clone();
        let mut q = self.queue.lock();
        let job = self.open_locked(&mut q, &mut rec, reason, expired_at, now)?;
        metrics::counter!(m::REFRESH_OPENED, "reason" => reason_label(reason)).increment(1);
        Some((self.submit_device(&rec, Some(&job), &uri), job))
    }

    fn check_in_part(&self, device_id: &str, now: UnixTime) -> (Option<Job>, Vec<Ticket>) {
        let mut q = self.queue.lock();
        let Some(job) = q.job_for_device(device_id) else {
            return (None, Vec::new());
        };
        let (valid, tickets) = self.valid_locked(&mut q, &job, now);
        if !valid {
            return (None, tickets);
        }
        match q.check_in(device_id, now) {
            Some((job, change)) => {
                if change.is_some() {
                    metrics::counter!(m::REFRESH_HANDOUTS, "via" => "check_in").increment(1);
                }
                let tickets = self.persist_locked(&mut q, change.into_iter().collect(), now);
                (Some(job), tickets)
            }
            None => (None, Vec::new()),
        }
    }

    /// Leases up to `max` due jobs (paced; oldest expiry first).
    pub async fn lease(
        &self,
        max: u32,
        lease_secs: Option<u32>,
        via: Handout,
        now: UnixTime,
    ) -> Result<Vec<JobView>, StoreError> {
        let (jobs, tickets) = self.lease_blocking_part(max, lease_secs, via, now);
        for t in tickets {
            t.await?;
        }
        Ok(jobs.iter().map(|j| self.view(j, 1)).collect())
    }

    fn lease_blocking_part(
        &self,
        max: u32,
        lease_secs: Option<u32>,
        via: Handout,
        now: UnixTime,
    ) -> (Vec<Job>, Vec<Ticket>) {
        let mut q = self.queue.lock();
        self.update_share(&mut q);
        let (jobs, changes) = q.lease_via(via, max, lease_secs, now);
        let mut tickets = self.persist_locked(&mut q, changes, now);
        let mut valid = Vec::with_capacity(jobs.len());
        for job in jobs {
            let (ok, t) = self.valid_locked(&mut q, &job, now);
            tickets.extend(t);
            if ok {
                valid.push(job);
            }
        }
        let label = match via {
            Handout::Lease => "lease",
            Handout::Webhook => "webhook",
            Handout::CheckIn => "check_in",
        };
        metrics::counter!(m::REFRESH_HANDOUTS, "via" => label).increment(valid.len() as u64);
        (valid, tickets)
    }

    /// The MDM server reports a handed-out job's outcome.
    pub async fn complete(
        &self,
        id: JobId,
        outcome: CompleteOutcome,
        now: UnixTime,
    ) -> Result<Result<Option<JobView>, QueueError>, StoreError> {
        let (result, tickets) = self.complete_part(id, outcome, now);
        for t in tickets {
            t.await?;
        }
        Ok(result)
    }

    fn complete_part(
        &self,
        id: JobId,
        outcome: CompleteOutcome,
        now: UnixTime,
    ) -> (Result<Option<JobView>, QueueError>, Vec<Ticket>) {
        let mut q = self.queue.lock();
        match q.complete(id, outcome, now) {
            Err(e) => (Err(e), Vec::new()),
            Ok(change) => {
                let view = match &change {
                    Change::Put(job) => Some(self.view(job, 1)),
                    _ => None,
                };
                let tickets = self.persist_locked(&mut q, vec![change], now);
                (Ok(view), tickets)
            }
        }
    }

    /// One webhook round: leases due jobs for the webhook, posts them, and
    /// records them delivered when the MDM server accepted them. A failed
    /// call leaves them leased; the lease runs out and they are queued again.
    /// Returns how many jobs were delivered.
    pub fn webhook_round(&self, hook: &crate::config::WebhookSettings, now: UnixTime) -> usize {
        // A failed call leaves the jobs leased: they come back soon after
        // the call's timeout, and the next round retries them.
        let lease = hook.timeout_secs.saturating_add(2);
        let (jobs, tickets) = self.lease_blocking_part(100, Some(lease), Handout::Webhook, now);
        for t in tickets {
            if t.wait_blocking().is_err() {
                return 0;
            }
        }
        if jobs.is_empty() {
            return 0;
        }
        let views: Vec<JobView> = jobs.iter().map(|j| self.view(j, 1)).collect();
        match webhook::post(hook, &views, now) {
            Ok(()) => {
                metrics::counter!(m::REFRESH_WEBHOOK_CALLS, "result" => "ok").increment(1);
                let mut done = 0;
                for j in &jobs {
                    let (r, tickets) = self.complete_part(j.id, CompleteOutcome::Delivered, now);
                    let durable = tickets.into_iter().all(|t| t.wait_blocking().is_ok());
                    if r.is_ok() && durable {
                        done += 1;
                    }
                }
                done
            }
            Err(e) => {
                metrics::counter!(m::REFRESH_WEBHOOK_CALLS, "result" => "error").increment(1);
                tracing::warn!(error = %e, jobs = jobs.len(), "refresh webhook call failed; the jobs return to the queue when their lease ends");
                0
            }
        }
    }

    /// The open job of a device, if any (no hand-out).
    pub fn job_of(&self, device_id: &str) -> Option<JobView> {
        let q = self.queue.lock();
        q.job_for_device(device_id).map(|j| self.view(&j, 1))
    }

    /// True when job `id` existed and is closed (or gave up). Ids from before
    /// the last restart that are not open count as closed too; an id no run
    /// can have issued (below [`FIRST_ISSUED_ID`]) never does.
    pub fn was_closed(&self, id: JobId) -> bool {
        id >= FIRST_ISSUED_ID && self.queue.lock().was_closed(id)
    }

    /// The job with `id`, if open.
    pub fn job(&self, id: JobId) -> Option<JobView> {
        let q = self.queue.lock();
        q.get(id).map(|j| self.view(&j, 1))
    }

    fn view(&self, job: &Job, first_cmd_id: u32) -> JobView {
        use crate::core::refresh::JobState;
        let provider = job
            .provider_id
            .as_ref()
            .unwrap_or(&self.settings.provider_id)
            .as_str()
            .to_owned();
        let frag = pfn_replacement(&PfnCommand {
            provider_id: &provider,
            pfn: job.pfn.as_str(),
            verb: if self.settings.verb_add {
                PfnVerb::Add
            } else {
                PfnVerb::Replace
            },
            first_cmd_id,
        });
        let (state, until, via) = match job.state {
            // Queued again after a failure: when it is due next.
            JobState::Queued if job.next_at > job.created_at => ("queued", Some(job.next_at), None),
            JobState::Queued => ("queued", None, None),
            JobState::Leased { until, via } => ("leased", Some(until), Some(via)),
            JobState::Delivered { via, .. } => ("delivered", Some(job.next_at), Some(via)),
        };
        JobView {
            job_id: job_id_string(job.id),
            device_id: job.device_id.as_str().to_owned(),
            pfn: job.pfn.as_str().to_owned(),
            provider_id: provider,
            reason: job.reason,
            expired_at: job.expired_at.to_rfc3339(),
            created_at: job.created_at.to_rfc3339(),
            attempts: job.attempts,
            state,
            until: until.map(|u| u.to_rfc3339()),
            handed_out_via: via,
            syncml: frag.xml,
            cmd_ids: frag.cmd_ids,
        }
    }

    /// Advances the queue to `now`: expired leases, deliveries that saw no
    /// new URI, give-ups. Blocks until durable.
    pub fn tick(&self, now: UnixTime) -> Result<usize, StoreError> {
        let tickets = {
            let mut q = self.queue.lock();
            let changes = q.tick(now);
            if changes.is_empty() {
                Vec::new()
            } else {
                self.persist_locked(&mut q, changes, now)
            }
        };
        let n = tickets.len();
        for t in tickets {
            t.wait_blocking()?;
        }
        self.publish_stats(now);
        Ok(n)
    }

    /// Opens a refresh job for every device whose channel expired by age
    /// since the last sweep, reading only the issued-at index entries that
    /// came due (P8). Blocks until durable.
    pub fn sweep(&self, now: UnixTime) -> Result<SweepReport, StoreError> {
        let started = crate::clock::instant();
        let to = UnixTime(
            now.0
                .saturating_sub(self.thresholds.expire_after)
                .saturating_add(1),
        );
        let rewind = self.rewind_to.swap(u32::MAX, Ordering::Relaxed);
        let from = UnixTime(self.swept_to.load(Ordering::Relaxed).min(rewind));
        let mut report = SweepReport::default();
        let mut pages = self
            .registry
            .issued_between(from, to, self.settings.sweep_batch);
        let mut inflight = std::collections::VecDeque::new();
        while let Some(page) = pages.next_page() {
            report.examined += page.len() as u64;
            // The jobs are opened under the queue's lock, and submitted
            // after it is released: waiting for room in the store settles
            // earlier submissions, and settling one that conflicted takes
            // the lock again.
            let opened: Vec<(Job, LeaveReason, Vec<Mutation>)> = {
                let mut q = self.queue.lock();
                page.into_iter()
                    .filter(|rec| rec.refresh.is_none())
                    .filter_map(|mut rec| {
                        let (reason, expired_at) = match rec.dead {
                            Some(d) => (LeaveReason::from(d.reason), d.at),
                            None => (LeaveReason::Age, self.thresholds.expires_at(rec.issued_at)),
                        };
                        let uri = rec.channel_uri.clone();
                        let job = self.open_locked(&mut q, &mut rec, reason, expired_at, now)?;
                        let muts = self.device_mutations(&rec, Some(&job), &uri);
                        Some((job, reason, muts))
                    })
                    .collect()
            };
            let mut opened = opened.into_iter();
            while let Some((job, reason, muts)) = opened.next() {
                match self.submit_with_backpressure(muts, &mut inflight, &mut report) {
                    Ok(t) => inflight.push_back((t, Some((job, reason)))),
                    Err(e) => {
                        let mut q = self.queue.lock();
                        q.remove_device(job.device_id.as_str());
                        for (rest, _, _) in opened {
                            q.remove_device(rest.device_id.as_str());
                        }
                        return Err(e);
                    }
                }
            }
            // Keep the store busy with the next page while this one syncs,
            // within a bound on what waits.
            let bound = self.max_sweep_inflight();
            while inflight.len() > bound {
                if let Some((t, opened)) = inflight.pop_front() {
                    self.settle_sweep_ticket(t, opened, &mut report)?;
                }
            }
        }
        while let Some((t, opened)) = inflight.pop_front() {
            self.settle_sweep_ticket(t, opened, &mut report)?;
        }
        self.swept_to.store(to.0, Ordering::Relaxed);
        metrics::histogram!(m::LIFECYCLE_SWEEP_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::counter!(m::LIFECYCLE_SWEEP_EXAMINED).increment(report.examined);
        self.publish_stats(now);
        Ok(report)
    }

    /// Waits for one sweep submission and accounts for it.
    fn settle_sweep_ticket(
        &self,
        t: Ticket,
        opened: Option<(Job, LeaveReason)>,
        report: &mut SweepReport,
    ) -> Result<(), StoreError> {
        match (t.wait_blocking(), opened) {
            (Ok(()), Some((_, reason))) => {
                report.opened += 1;
                metrics::counter!(m::REFRESH_OPENED, "reason" => reason_label(reason)).increment(1);
                if reason == LeaveReason::Age {
                    metrics::counter!(m::LIFECYCLE_TRANSITIONS, "to" => "expired", "reason" => "age")
                        .increment(1);
                }
                Ok(())
            }
            (Ok(()), None) => Ok(()),
            (Err(StoreError::Conflict(_)), opened) => {
                self.discard(opened.as_ref().map(|(j, _)| j));
                Ok(())
            }
            (Err(e), opened) => {
                self.discard(opened.as_ref().map(|(j, _)| j));
                Err(e)
            }
        }
    }

    fn publish_stats(&self, now: UnixTime) {
        let s = self.queue.lock().stats(now);
        metrics::gauge!(m::REFRESH_JOBS, "state" => "queued").set(s.queued as f64);
        metrics::gauge!(m::REFRESH_JOBS, "state" => "leased").set(s.leased as f64);
        metrics::gauge!(m::REFRESH_JOBS, "state" => "delivered").set(s.delivered as f64);
        metrics::gauge!(m::REFRESH_DUE).set(s.due_now as f64);
        let oldest = s
            .oldest_expired_at
            .map_or(0.0, |t| f64::from(now.0.saturating_sub(t.0)));
        metrics::gauge!(m::REFRESH_OLDEST_SECONDS).set(if now.0 == 0 { 0.0 } else { oldest });
    }
}

/// Jobs copied out of the queue at a time for a snapshot: the queue's lock
/// is held only while a chunk is copied.
const SNAPSHOT_JOBS_CHUNK: usize = 1024;

impl crate::store::JobSource for Lifecycle {
    fn jobs(&self, visit: &mut dyn FnMut(&Job)) {
        let ids: Vec<JobId> = self.queue.lock().job_ids().collect();
        let mut chunk = Vec::with_capacity(SNAPSHOT_JOBS_CHUNK);
        for ids in ids.chunks(SNAPSHOT_JOBS_CHUNK) {
            {
                let q = self.queue.lock();
                chunk.extend(ids.iter().filter_map(|id| q.get(*id)));
            }
            for job in chunk.drain(..) {
                visit(&job);
            }
        }
    }
}

/// A bounded label for a leave reason.
pub fn reason_label(r: LeaveReason) -> &'static str {
    match r {
        LeaveReason::Age => "age",
        LeaveReason::Wns404 => "wns_404",
        LeaveReason::Wns410 => "wns_410",
        LeaveReason::CredentialMismatch => "credential_mismatch",
    }
}

/// The lifecycle thread: ticks the queue every second, sweeps every
/// `refresh.sweep_interval`, and runs the webhook when one is configured.
pub struct LifecycleThread {
    stop: crossbeam_channel::Sender<()>,
    /// Disconnected when the thread ends.
    ended: crossbeam_channel::Receiver<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LifecycleThread {
    /// Starts the thread. `now` reads the wall clock.
    pub fn start(
        lc: Arc<Lifecycle>,
        now: impl Fn() -> UnixTime + Send + 'static,
    ) -> std::io::Result<LifecycleThread> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(1);
        let (ending, ended) = crossbeam_channel::bounded::<()>(0);
        let thread = std::thread::Builder::new()
            .name("wnsgate-lifecycle".into())
            .spawn(move || {
                let _ending = ending;
                let interval = lc.settings.sweep_interval_secs.max(1);
                let mut next_sweep = 0u32;
                loop {
                    let t = now();
                    if t.0 >= next_sweep {
                        match lc.sweep(t) {
                            Ok(r) if r.opened > 0 => tracing::info!(
                                examined = r.examined,
                                opened = r.opened,
                                "expiry sweep"
                            ),
                            Ok(_) => {}
                            Err(e) => tracing::error!(error = %e, "expiry sweep failed"),
                        }
                        next_sweep = t.0.saturating_add(interval);
                    }
                    if let Err(e) = lc.offer_nudges(t) {
                        tracing::error!(error = %e, "offering nudge wakes failed");
                    }
                    if let Err(e) = lc.tick(t) {
                        tracing::error!(error = %e, "refresh queue tick failed");
                    }
                    if let Some(hook) = lc.settings.webhook.clone() {
                        while lc.webhook_round(&hook, now()) > 0 {
                            if stopped.try_recv().is_ok() {
                                return;
                            }
                        }
                    }
                    match stopped.recv_timeout(std::time::Duration::from_secs(1)) {
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                }
            })?;
        Ok(LifecycleThread {
            stop,
            ended,
            thread: Some(thread),
        })
    }

    /// Stops the thread after its current step, waiting at most `budget`
    /// for it (a webhook call may take its whole timeout). Returns whether
    /// it ended; if not, it is left to end on its own.
    pub fn stop_within(mut self, budget: std::time::Duration) -> bool {
        let _ = self.stop.try_send(());
        let ended = matches!(
            self.ended.recv_timeout(budget),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected)
        );
        if let (true, Some(t)) = (ended, self.thread.take()) {
            let _ = t.join();
        }
        ended
    }
}

impl Drop for LifecycleThread {
    fn drop(&mut self) {
        let _ = self.stop.try_send(());
    }
}

fn describe_metrics() {
    // Series alerts and rates divide by start at 0 rather than "no data".
    for via in ["check_in", "lease", "webhook"] {
        metrics::counter!(m::REFRESH_HANDOUTS, "via" => via).increment(0);
    }
    for reason in ["age", "wns_404", "wns_410", "credential_mismatch"] {
        metrics::counter!(m::REFRESH_OPENED, "reason" => reason).increment(0);
    }
    for result in ["ok", "error"] {
        metrics::counter!(m::REFRESH_WEBHOOK_CALLS, "result" => result).increment(0);
    }
    metrics::counter!(m::REFRESH_GIVEUPS).increment(0);
    metrics::counter!(m::REFRESH_CLOSED).increment(0);
    metrics::counter!(m::LIFECYCLE_TRANSITIONS, "to" => "expired", "reason" => "age").increment(0);
    metrics::counter!(m::LIFECYCLE_TRANSITIONS, "to" => "unreachable", "reason" => "gave_up")
        .increment(0);
    metrics::counter!(m::LIFECYCLE_SWEEP_EXAMINED).increment(0);
    metrics::counter!(m::LIFECYCLE_NUDGES).increment(0);
    metrics::describe_counter!(
        m::LIFECYCLE_NUDGES,
        "Nudge wakes sent to devices turning renewal_due"
    );
    metrics::describe_gauge!(m::REFRESH_JOBS, "Open refresh jobs, by state");
    metrics::describe_gauge!(m::REFRESH_DUE, "Queued refresh jobs due now");
    metrics::describe_gauge!(
        m::REFRESH_OLDEST_SECONDS,
        "Age of the oldest expiry among due refresh jobs, seconds"
    );
    metrics::describe_counter!(m::REFRESH_OPENED, "Refresh jobs opened, by reason");
    metrics::describe_counter!(
        m::REFRESH_CLOSED,
        "Refresh jobs closed by a new registration or a deletion"
    );
    metrics::describe_counter!(
        m::REFRESH_GIVEUPS,
        "Refresh jobs given up (device unreachable)"
    );
    metrics::describe_counter!(m::REFRESH_HANDOUTS, "Refresh jobs handed out, by channel");
    metrics::describe_counter!(
        m::LIFECYCLE_TRANSITIONS,
        "Devices leaving active, by new state and reason"
    );
    metrics::describe_histogram!(m::LIFECYCLE_SWEEP_SECONDS, "Duration of one expiry sweep");
    metrics::describe_counter!(m::REFRESH_WEBHOOK_CALLS, "Refresh webhook calls, by result");
    metrics::describe_counter!(
        m::LIFECYCLE_SWEEP_EXAMINED,
        "Issued-at index entries read by expiry sweeps"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Settings};
    use crate::core::{ChannelUri, Pfn};
    use crate::server::apply_to_registry;
    use crate::store::{Committer, CommitterConfig, FjallOptions, FjallStore};

    fn record(i: u32, issued_at: u32) -> DeviceRecord {
        DeviceRecord {
            device_id: DeviceId::parse(&format!("dev-{i}")).unwrap(),
            pfn: Pfn::parse("Contoso.MDM_8wekyb3d8bbwe").unwrap(),
            channel_uri: ChannelUri::from_trusted(format!(
                "https://db5.notify.windows.com/?token=T{i}"
            ))
            .unwrap(),
            provider_id: None,
            issued_at: UnixTime(issued_at),
            dead: None,
            refresh: None,
        }
    }

    /// A lifecycle over `store` and `registry` whose committer queues at
    /// most `queue` submissions of `batch` mutations, with no bound on the
    /// wait: the store is full as soon as a sweep gets going.
    fn small_queue_lifecycle(
        store: &Arc<dyn Store>,
        registry: &Arc<Registry>,
        queue: usize,
        batch: usize,
    ) -> (Arc<Lifecycle>, CommitHandle, crate::store::CommitterJoin) {
        let (reg, reg2) = (registry.clone(), registry.clone());
        let (commits, join) = Committer::start_with_lookup(
            store.clone(),
            Box::new(move |b: &[Mutation]| apply_to_registry(&reg, b)),
            Box::new(move |id| reg2.get(id.as_str()).map(|r| r.channel_uri)),
            CommitterConfig {
                queue_capacity: queue,
                max_batch_mutations: batch,
                max_wait: None,
                min_sync_interval: std::time::Duration::ZERO,
            },
        );
        let settings = Settings::resolve(&Config::default()).unwrap();
        let lc = Arc::new(Lifecycle::new(
            settings.refresh.clone(),
            settings.thresholds,
            Vec::new(),
            registry.clone(),
            store.clone(),
            commits.clone(),
        ));
        (lc, commits, join)
    }

    /// A sweep that opens far more jobs than the store's queue holds slows
    /// down instead of failing, and opens every job exactly once.
    #[test]
    fn a_sweep_larger_than_the_store_queue_waits_and_opens_every_job() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(FjallStore::open(dir.path(), FjallOptions::default()).unwrap());
        let registry = Arc::new(Registry::new());
        let now = 1_800_000_000u32;
        let old = now - 31 * 86_400;
        let batch: Vec<Mutation> = (0..3000)
            .map(|i| Mutation::Put(record(i, if i % 3 == 0 { old } else { now - 60 })))
            .collect();
        store.apply(&batch).unwrap();
        apply_to_registry(&registry, &batch);
        let (lc, _, join) = small_queue_lifecycle(&store, &registry, 8, 16);
        let report = lc.sweep(UnixTime(now)).unwrap();
        assert_eq!((report.examined, report.opened), (1000, 1000));
        // A second sweep finds nothing new.
        assert_eq!(lc.sweep(UnixTime(now + 10)).unwrap().opened, 0);
        join.shutdown().unwrap();
        let mut jobs = 0;
        store.scan_jobs(&mut |_| jobs += 1).unwrap();
        assert_eq!(jobs, 1000);
        let pending = (0..3000)
            .filter(|i| registry.get(&format!("dev-{i}")).unwrap().refresh.is_some())
            .count();
        assert_eq!(pending, 1000);
    }

    /// Devices re-registered while a sweep waits for room in the store:
    /// their submissions conflict, and settling a conflict while waiting
    /// must not need the queue's lock the sweep holds (it once did, and
    /// the sweep, then every registration, hung).
    #[test]
    fn a_sweep_that_waits_for_room_while_devices_re_register_finishes() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(FjallStore::open(dir.path(), FjallOptions::default()).unwrap());
        let registry = Arc::new(Registry::new());
        let now = 1_800_000_000u32;
        let old = now - 31 * 86_400;
        let batch: Vec<Mutation> = (0..2000).map(|i| Mutation::Put(record(i, old))).collect();
        store.apply(&batch).unwrap();
        apply_to_registry(&registry, &batch);
        let (lc, commits, join) = small_queue_lifecycle(&store, &registry, 4, 8);
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let sweeper = lc.clone();
        std::thread::spawn(move || {
            let _ = done_tx.send(sweeper.sweep(UnixTime(now)));
        });
        // New channels for devices the sweep is opening jobs for.
        let mut changed = 0;
        for i in (0..2000).step_by(3) {
            let mut r = record(i, now - 5);
            r.channel_uri =
                ChannelUri::from_trusted(format!("https://db5.notify.windows.com/?token=new{i}"))
                    .unwrap();
            if let Ok(t) = commits.submit(vec![Mutation::Put(r)]) {
                if t.wait_blocking().is_ok() {
                    changed += 1;
                }
            }
        }
        // A hang guard, not a timing: the sweep takes well under a second.
        let report = match done_rx.recv_timeout(std::time::Duration::from_secs(120)) {
            Ok(r) => r.unwrap(),
            Err(_) => {
                // Shutting the committer down would wait on the hung sweep.
                std::mem::forget(join);
                panic!("the sweep hung");
            }
        };
        assert!(changed > 0);
        assert!(
            report.opened <= report.examined && report.examined <= 2000,
            "{report:?}"
        );
        join.shutdown().unwrap();
    }
}

#[cfg(test)]
mod view_tests {
    use super::*;
    use crate::testing::{registration, Services};

    /// A job queued again after a failed hand-out shows when it is due
    /// next; a fresh one is due at once and shows none.
    #[tokio::test]
    async fn a_job_queued_again_shows_when_it_is_due() {
        let s = Services::new();
        let now = crate::clock::now();
        let rec = crate::core::merge_registration(None, registration("dev-1", "T1"), now);
        s.commits
            .submit(vec![Mutation::Put(rec.clone())])
            .unwrap()
            .await
            .unwrap();
        s.lifecycle
            .channel_dead(&rec, DeadReason::Wns410, now)
            .await;
        let fresh = s.lifecycle.job_of("dev-1").unwrap();
        assert_eq!((fresh.state, fresh.until), ("queued", None));
        let leased = s
            .lifecycle
            .lease(10, Some(60), Handout::Lease, now)
            .await
            .unwrap();
        let id = parse_job_id(&leased[0].job_id).unwrap();
        let failed = s
            .lifecycle
            .complete(id, CompleteOutcome::Failed { status: Some(3) }, now)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(failed.state, "queued");
        let due = failed.until.expect("a due time");
        assert!(UnixTime::parse_rfc3339(&due).unwrap() > now, "{due}");
    }
}
