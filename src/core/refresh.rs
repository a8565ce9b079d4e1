//! The PFN-refresh queue: one open job per device whose channel died, handed
//! out to the MDM tier, retried until a new channel URI arrives or the policy
//! gives up (the README's "Refresh queue").
//!
//! [`RefreshQueue`] is a plain state machine: every method takes the current
//! time and returns the store mutations ([`Change`]) the caller must make
//! durable. It never reads a clock, never touches the store and never
//! spawns anything; the caller owns persistence, the HTTP API, the webhook
//! and the periodic [`RefreshQueue::tick`].
//!
//! A job moves through three states ([`JobState`]):
//!
//! ```text
//!            open                  lease / webhook              complete(Delivered)
//!   (none) ───────▶ Queued ───────────────────────▶ Leased ─────────────────────▶ Delivered
//!                    ▲  │ check-in (unpaced)          │ lease expires               │
//!                    │  └─────────────────────────────┼─────────────────────────────▶│
//!                    │◀───────── (no attempt) ────────┘                              │
//!                    │◀──── complete(Failed) / no new URI within confirm_within ─────┘
//!                    │        (backoff, or GaveUp when the budget is spent)
//!   registered (new channel URI) or remove_device from any state: Closed
//! ```
//!
//! Counting: `attempts` counts deliveries, i.e. transitions into
//! `Delivered` (a check-in hand-out, or a lease completed as delivered). A
//! `Failed` completion of a lease also counts, because the MDM server did
//! try the command on the device. A lease that expires without a completion
//! does not count: nothing says the command reached a device (the MDM server
//! may have crashed before opening a session). A broken MDM server cannot
//! keep a job alive forever that way, because `give_up_after` is measured
//! from the job's creation whatever happens.
//!
//! Indexes keep every operation proportional to what is due: queued jobs
//! wait in `waiting` ordered by `next_at`; once their time has come they move
//! to `due`, ordered by `expired_at`, so that a lease after a mass expiry
//! hands out the oldest dead channels first. Leased and delivered jobs sit in
//! `deadlines` by `next_at`, and every job's give-up time is in `give_up`.

use super::ids::{DeviceId, Pfn, ProviderId};
use super::lifecycle::LeaveReason;
use super::time::UnixTime;
use serde::Serialize;
use std::collections::{BTreeSet, HashMap};

/// The queue's maps hash with foldhash, seeded per process: device ids come
/// from clients, and SipHash cost most of a restart's queue load.
type Hashed = foldhash::fast::RandomState;

/// Open jobs, boxed: a job is larger than a pointer, and a hash table keeps
/// up to twice its length in slots.
type Jobs = HashMap<JobId, Box<Stored>, Hashed>;

/// A job as the queue keeps it: 56 bytes (see the `stored_job_is_small`
/// test) and its device id's bytes. The PFN and the provider id, which
/// many jobs share, are kept once each in the queue ([`Shared`]); a
/// [`Job`] is made from it when asked for.
#[derive(Debug)]
struct Stored {
    id: JobId,
    device_id: Box<str>,
    /// Index in the queue's PFNs.
    pfn: u32,
    /// Index in the queue's provider ids; [`NO_PROVIDER`] for none.
    provider_id: u32,
    reason: LeaveReason,
    expired_at: UnixTime,
    created_at: UnixTime,
    attempts: u16,
    state: JobState,
    next_at: UnixTime,
}

const NO_PROVIDER: u32 = u32::MAX;

/// Strings many jobs share, each kept once with a count of the jobs that
/// use it, and dropped with the last of them.
#[derive(Debug)]
struct Shared<T> {
    slots: Vec<Option<(T, u32)>>,
    ids: HashMap<Box<str>, u32, Hashed>,
    free: Vec<u32>,
}

impl<T> Default for Shared<T> {
    fn default() -> Self {
        Shared {
            slots: Vec::new(),
            ids: HashMap::default(),
            free: Vec::new(),
        }
    }
}

/// What [`Shared`] keeps: a validated id with its text.
trait Text: Clone {
    fn text(&self) -> &str;
}

impl Text for Pfn {
    fn text(&self) -> &str {
        self.as_str()
    }
}

impl Text for ProviderId {
    fn text(&self) -> &str {
        self.as_str()
    }
}

impl<T: Text> Shared<T> {
    /// Counts one more job using `v`; answers its index.
    fn add(&mut self, v: &T) -> u32 {
        if let Some(&i) = self.ids.get(v.text()) {
            if let Some((_, n)) = &mut self.slots[i as usize] {
                *n += 1;
            }
            return i;
        }
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some((v.clone(), 1));
                i
            }
            None => {
                self.slots.push(Some((v.clone(), 1)));
                u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 distinct strings")
            }
        };
        self.ids.insert(v.text().into(), i);
        i
    }

    /// One job fewer uses the string at `i`.
    fn release(&mut self, i: u32) {
        let Some(slot) = self.slots.get_mut(i as usize) else {
            return;
        };
        let last = match slot {
            Some((_, n)) => {
                *n -= 1;
                *n == 0
            }
            None => false,
        };
        if last {
            if let Some((v, _)) = slot.take() {
                self.ids.remove(v.text());
            }
            self.free.push(i);
        }
    }

    fn get(&self, i: u32) -> &T {
        match &self.slots[i as usize] {
            Some((v, _)) => v,
            None => unreachable!("a job refers to a string it holds a count on"),
        }
    }

    /// Distinct strings held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.ids.len()
    }
}

/// Open jobs by device: job ids hashed by their job's device id, so the id
/// string is stored once, in the job.
#[derive(Default, Debug)]
struct ByDevice {
    table: hashbrown::HashTable<JobId>,
    hasher: Hashed,
}

impl ByDevice {
    fn hash(&self, device_id: &str) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(device_id)
    }

    fn len(&self) -> usize {
        self.table.len()
    }

    fn get(&self, jobs: &Jobs, device_id: &str) -> Option<JobId> {
        self.table
            .find(self.hash(device_id), |id| {
                jobs.get(id).is_some_and(|j| &*j.device_id == device_id)
            })
            .copied()
    }

    /// Adds `id` for `device_id`, which has no entry; every other entry's
    /// job is in `jobs`.
    fn insert(&mut self, jobs: &Jobs, device_id: &str, id: JobId) {
        let h = self.hash(device_id);
        let hasher = &self.hasher;
        self.table.insert_unique(h, id, |other| {
            use std::hash::BuildHasher;
            jobs.get(other)
                .map_or(0, |j| hasher.hash_one(&*j.device_id))
        });
    }

    fn remove(&mut self, device_id: &str, id: JobId) {
        if let Ok(e) = self.table.find_entry(self.hash(device_id), |&x| x == id) {
            e.remove();
        }
    }

    fn reserve(&mut self, jobs: &Jobs, n: usize) {
        let hasher = &self.hasher;
        self.table.reserve(n, |other| {
            use std::hash::BuildHasher;
            jobs.get(other)
                .map_or(0, |j| hasher.hash_one(&*j.device_id))
        });
    }
}

/// Identifies a refresh job. Allocated by the queue, increasing, never reused
/// within a store's life (restored ids keep the counter above them).
pub type JobId = u64;

/// How a job's command reached the MDM server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Handout {
    /// The device opened a session and the MDM server asked for its job.
    CheckIn,
    /// An MDM server leased it through `POST /v1/refresh:lease`.
    Lease,
    /// The gateway posted it to the MDM server's webhook.
    Webhook,
}

/// Where a job stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobState {
    /// Waiting to be handed out; eligible from `job.next_at`.
    Queued,
    /// Leased by an MDM server (a lease or a webhook in flight) until
    /// `until` (also `job.next_at`).
    Leased { until: UnixTime, via: Handout },
    /// Handed to, or run by, the MDM server at `at`; waiting for a new
    /// channel URI until `job.next_at`.
    Delivered { at: UnixTime, via: Handout },
}

/// One open PFN-replacement job.
///
/// 104 bytes inline on 64-bit targets (see the `job_is_small` test) plus
/// the heap bytes of the device id, PFN and provider id strings. The queue
/// keeps each open job in a smaller form (`Stored`: 56 bytes and the
/// device id, the PFN and provider id kept once for all jobs) and makes a
/// `Job` when one is asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub id: JobId,
    pub device_id: DeviceId,
    /// The PFN to send (see [`pfn_to_send`] for rotation).
    pub pfn: Pfn,
    pub provider_id: Option<ProviderId>,
    /// Why the device left `active`.
    pub reason: LeaveReason,
    /// When the channel died. Hand-out priority: oldest first.
    pub expired_at: UnixTime,
    pub created_at: UnixTime,
    /// Deliveries so far (see the module documentation for what counts).
    pub attempts: u16,
    pub state: JobState,
    /// Queued: when it may be handed out. Leased: when the lease ends.
    /// Delivered: when to stop waiting for a new channel URI.
    pub next_at: UnixTime,
}

/// Limits of the refresh queue. Every wait and every bound is here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshPolicy {
    /// Seconds after a delivery to wait for a new channel URI before trying
    /// again. Default 1 day: the device retries WNS registration on its own
    /// schedule and reports the URI in a later session.
    pub confirm_within: u32,
    /// First retry backoff after a failed or unconfirmed attempt, seconds.
    /// Default 1 hour; doubles per attempt, jittered by +-25%.
    pub backoff_base: u32,
    /// Cap on the backoff, seconds. Default 1 day.
    pub backoff_cap: u32,
    /// Deliveries before giving up. Default 5.
    pub max_attempts: u16,
    /// Seconds since the job was opened after which it is given up, whatever
    /// its attempts. Default 14 days.
    pub give_up_after: u32,
    /// Lease length when the caller does not ask for one. Default 300 s.
    pub default_lease: u32,
    /// Longest lease granted. Default 3600 s.
    pub max_lease: u32,
    /// Pace of lease and webhook hand-outs (token bucket, burst of one
    /// second's worth). Check-ins are not paced: the device is already in a
    /// session. Default 50; 0 behaves as 1.
    pub jobs_per_second: u32,
    /// Most jobs leased at once. Default 1000.
    pub max_outstanding: u32,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        RefreshPolicy {
            confirm_within: 86_400,
            backoff_base: 3_600,
            backoff_cap: 86_400,
            max_attempts: 5,
            give_up_after: 14 * 86_400,
            default_lease: 300,
            max_lease: 3_600,
            jobs_per_second: 50,
            max_outstanding: 1_000,
        }
    }
}

impl RefreshPolicy {
    /// The wait before the next try of job `id` after its `attempts`-th
    /// attempt: `backoff_base * 2^(attempts-1)`, jittered by +-25% with a
    /// value derived from the job id (reproducible, yet spreading a mass
    /// expiry's retries), capped at `backoff_cap`.
    pub fn backoff(&self, id: JobId, attempts: u16) -> u32 {
        let exp = u32::from(attempts.saturating_sub(1)).min(31);
        let raw = u64::from(self.backoff_base) << exp;
        let delay = raw.min(u64::from(self.backoff_cap));
        let spread = delay / 2;
        let jitter = if spread == 0 {
            0
        } else {
            splitmix64(id ^ (u64::from(attempts) << 48)) % (spread + 1)
        };
        let jittered = delay - delay / 4 + jitter;
        u32::try_from(jittered.min(u64::from(self.backoff_cap))).unwrap_or(u32::MAX)
    }

    fn lease_secs(&self, asked: Option<u32>) -> u32 {
        asked
            .unwrap_or(self.default_lease)
            .clamp(1, self.max_lease.max(1))
    }

    fn rate(&self) -> u64 {
        u64::from(self.jobs_per_second.max(1))
    }
}

/// Bits of a job id that carry its partition, when ids carry partitions
/// ([`RefreshQueue::ids_carry_partitions`]): partitions number at most 4096.
pub const PARTITION_BITS: u32 = 12;

/// The partition a job id carries, when ids carry partitions.
pub fn partition_of_id(id: JobId) -> u16 {
    (id & ((1 << PARTITION_BITS) - 1)) as u16
}

/// A store mutation the caller must make durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Persist this job (insert or overwrite); the device is `refresh_pending`.
    Put(Job),
    /// Delete the job; the device is active again (or was deleted).
    Closed { id: JobId, device_id: DeviceId },
    /// Delete the job; the device becomes `unreachable`.
    GaveUp { id: JobId, device_id: DeviceId },
}

/// What the MDM server reports after handling a job's command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompleteOutcome {
    /// The device accepted the command; a new URI should follow.
    Delivered,
    /// The command could not be run, or the device refused it.
    Failed {
        /// The DMClient `Push/Status` code, when known.
        status: Option<u8>,
    },
}

/// Why a queue operation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("no open refresh job with this id")]
    UnknownJob,
    #[error("the refresh job has not been handed out")]
    NotHandedOut,
}

/// Counts for `/v1/stats` and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct QueueStats {
    pub queued: u64,
    pub leased: u64,
    pub delivered: u64,
    /// The oldest `expired_at` among the jobs due now (the next to go).
    pub oldest_expired_at: Option<UnixTime>,
    /// Queued jobs whose `next_at` has come.
    pub due_now: u64,
}

/// Which PFN a refresh sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PfnChoice {
    /// The device's own PFN again: the documented fix for failed renewals.
    Same,
    /// Cycle through the configured apps, starting after the device's one.
    Rotate,
}

/// The PFN to send for a job's next attempt.
///
/// `Same` answers `current`. `Rotate` answers the app after `current` in
/// `apps` for attempt 0, the one after that for attempt 1, and so on,
/// wrapping around; when `current` is not among `apps` it starts at the
/// first app; with no apps it answers `current`.
pub fn pfn_to_send(policy: PfnChoice, current: &Pfn, apps: &[Pfn], attempts: u16) -> Pfn {
    match policy {
        PfnChoice::Same => current.clone(),
        PfnChoice::Rotate => {
            if apps.is_empty() {
                return current.clone();
            }
            let start = apps.iter().position(|a| a == current).map_or(0, |i| i + 1);
            apps[(start + usize::from(attempts)) % apps.len()].clone()
        }
    }
}

/// The refresh queue. See the module documentation.
#[derive(Debug)]
pub struct RefreshQueue {
    policy: RefreshPolicy,
    jobs: Jobs,
    by_device: ByDevice,
    pfns: Shared<Pfn>,
    providers: Shared<ProviderId>,
    /// Queued jobs with `next_at > promoted_to`: (next_at, expired_at, id).
    waiting: BTreeSet<(UnixTime, UnixTime, JobId)>,
    /// Queued jobs with `next_at <= promoted_to`: (expired_at, id).
    due: BTreeSet<(UnixTime, JobId)>,
    /// Leased and delivered jobs: (next_at, id).
    deadlines: BTreeSet<(UnixTime, JobId)>,
    /// (created_at + give_up_after, id) for every job whose give-up time is
    /// after `give_up_swept_to`.
    give_up: BTreeSet<(UnixTime, JobId)>,
    promoted_to: UnixTime,
    give_up_swept_to: UnixTime,
    /// The next id's counter (the id itself unless ids carry partitions).
    next_id: JobId,
    /// When set, an id carries its device's partition in its low
    /// [`PARTITION_BITS`] bits above a counter (cluster mode: any node
    /// routes a call for a job to its partition's owner, and the owners'
    /// counters never collide).
    id_partitions: Option<crate::core::Partitioning>,
    leased: u64,
    delivered: u64,
    tokens: u64,
    refilled_at: Option<UnixTime>,
    /// This queue's share of the pace, `(numerator, denominator)`: the
    /// share of the partitions its node serves (cluster mode); `(1, 1)`.
    pace_share: (u32, u32),
}

impl RefreshQueue {
    pub fn new(policy: RefreshPolicy) -> Self {
        let tokens = policy.rate();
        RefreshQueue {
            policy,
            jobs: Jobs::default(),
            by_device: ByDevice::default(),
            pfns: Shared::default(),
            providers: Shared::default(),
            waiting: BTreeSet::new(),
            due: BTreeSet::new(),
            deadlines: BTreeSet::new(),
            give_up: BTreeSet::new(),
            promoted_to: UnixTime(0),
            give_up_swept_to: UnixTime(0),
            next_id: 1,
            id_partitions: None,
            pace_share: (1, 1),
            leased: 0,
            delivered: 0,
            tokens,
            refilled_at: None,
        }
    }

    pub fn policy(&self) -> &RefreshPolicy {
        &self.policy
    }

    /// Loads a job from the store at start. Keeps new ids above every
    /// restored one. When the device already has a job (a store holding two,
    /// which the queue never produces), the one restored first stays and the
    /// other is answered as a [`Change::Closed`] for the caller to delete.
    /// Restoring an id twice replaces the earlier copy.
    pub fn restore(&mut self, job: Job) -> Option<Change> {
        self.next_id = self.next_id.max(self.counter_of(job.id).saturating_add(1));
        if self.jobs.contains_key(&job.id) {
            self.remove(job.id);
        }
        if self.job_id_of(job.device_id.as_str()).is_some() {
            return Some(Change::Closed {
                id: job.id,
                device_id: job.device_id,
            });
        }
        self.insert(job);
        None
    }

    /// Lets go of the jobs `leaves` picks by device id, without closing
    /// them: they stay stored, and the node that takes their devices over
    /// restores them (cluster mode, a partition moving). Returns how many.
    pub fn release(&mut self, mut leaves: impl FnMut(&str) -> bool) -> usize {
        let ids: Vec<JobId> = self
            .jobs()
            .filter(|j| leaves(j.device_id.as_str()))
            .map(|j| j.id)
            .collect();
        for &id in &ids {
            self.remove(id);
        }
        ids.len()
    }

    /// Loads every stored job at start, as [`restore`](Self::restore) would
    /// one by one in id order, but with the ordered indexes built once at
    /// the end rather than a tree insert per job. On a queue that already
    /// holds jobs it restores them one by one.
    pub fn restore_all(&mut self, mut jobs: Vec<Job>) -> Vec<Change> {
        // Stable, so of a stored id given twice the later copy stays.
        jobs.sort_by_key(|j| j.id);
        // A stored id twice: the later copy replaces the earlier.
        jobs.reverse();
        jobs.dedup_by_key(|j| j.id);
        jobs.reverse();
        if !self.jobs.is_empty() {
            return jobs.into_iter().filter_map(|j| self.restore(j)).collect();
        }
        self.jobs.reserve(jobs.len());
        self.by_device.reserve(&self.jobs, jobs.len());
        let mut closed = Vec::new();
        let (mut waiting, mut due, mut deadlines, mut give_up) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::with_capacity(jobs.len()),
        );
        for job in jobs {
            self.next_id = self.next_id.max(self.counter_of(job.id).saturating_add(1));
            if self.job_id_of(job.device_id.as_str()).is_some() {
                closed.push(Change::Closed {
                    id: job.id,
                    device_id: job.device_id,
                });
                continue;
            }
            let id = job.id;
            self.by_device
                .insert(&self.jobs, job.device_id.as_str(), id);
            let gu = self.give_up_at(job.created_at);
            if gu > self.give_up_swept_to {
                give_up.push((gu, id));
            }
            match job.state {
                JobState::Queued if job.next_at <= self.promoted_to => {
                    due.push((job.expired_at, id))
                }
                JobState::Queued => waiting.push((job.next_at, job.expired_at, id)),
                JobState::Leased { .. } => {
                    self.leased += 1;
                    deadlines.push((job.next_at, id));
                }
                JobState::Delivered { .. } => {
                    self.delivered += 1;
                    deadlines.push((job.next_at, id));
                }
            }
            let stored = self.keep(job);
            self.jobs.insert(id, Box::new(stored));
        }
        // From sorted input a set is built in one pass.
        fn build<T: Ord>(mut v: Vec<T>) -> BTreeSet<T> {
            v.sort_unstable();
            v.into_iter().collect()
        }
        self.waiting = build(waiting);
        self.due = build(due);
        self.deadlines = build(deadlines);
        self.give_up = build(give_up);
        self.debug_check();
        closed
    }

    /// Opens a job for a device whose channel died. `None` when the device
    /// already has an open job (one job per device; the first reason stays).
    pub fn open(
        &mut self,
        device_id: DeviceId,
        pfn: Pfn,
        provider_id: Option<ProviderId>,
        reason: LeaveReason,
        expired_at: UnixTime,
        now: UnixTime,
    ) -> Option<Change> {
        if self.job_id_of(device_id.as_str()).is_some() {
            return None;
        }
        let id = match self.id_partitions {
            Some(p) => (self.next_id << PARTITION_BITS) | u64::from(p.of(device_id.as_str())),
            None => self.next_id,
        };
        self.next_id += 1;
        let job = Job {
            id,
            device_id,
            pfn,
            provider_id,
            reason,
            expired_at,
            created_at: now,
            attempts: 0,
            state: JobState::Queued,
            next_at: now,
        };
        self.insert(job.clone());
        self.debug_check();
        Some(Change::Put(job))
    }

    /// New jobs get ids from at least `floor` on. The caller passes a floor
    /// that grows across restarts (for example from the start time), so an
    /// id is never handed out twice even when every job closed before a
    /// restart and none is left to restore.
    pub fn ids_from(&mut self, floor: JobId) {
        self.next_id = self.next_id.max(floor);
    }

    /// From now on, ids carry their device's partition (see
    /// [`partition_of_id`]); set before any job is opened or restored.
    pub fn ids_carry_partitions(&mut self, partitioning: crate::core::Partitioning) {
        self.id_partitions = Some(partitioning);
    }

    /// The counter part of `id`.
    fn counter_of(&self, id: JobId) -> JobId {
        match self.id_partitions {
            Some(_) => id >> PARTITION_BITS,
            None => id,
        }
    }

    /// True when `id` was allocated by this queue (or restored) and is no
    /// longer open: the job closed or gave up.
    pub fn was_closed(&self, id: JobId) -> bool {
        id >= 1 && self.counter_of(id) < self.next_id && !self.jobs.contains_key(&id)
    }

    /// The open job of a device.
    pub fn job_for_device(&self, device_id: &str) -> Option<Job> {
        self.job_id_of(device_id)
            .and_then(|id| self.jobs.get(&id))
            .map(|j| self.view(j))
    }

    fn job_id_of(&self, device_id: &str) -> Option<JobId> {
        self.by_device.get(&self.jobs, device_id)
    }

    /// A job by id.
    pub fn get(&self, id: JobId) -> Option<Job> {
        self.jobs.get(&id).map(|j| self.view(j))
    }

    /// The device opened a session: hand its job out now, whatever its
    /// state, without pacing. The job becomes `Delivered { via: CheckIn }`
    /// and counts an attempt, except when it was already delivered and
    /// `confirm_within` has not run out: the same command is handed again
    /// (the MDM server may ask twice within a session, or the device's
    /// registration is still running) with no attempt counted and no
    /// [`Change`]. The same holds once the confirmation wait has run out
    /// when the job's budget is spent (`max_attempts` or `give_up_after`):
    /// the device still gets the command, and the next
    /// [`RefreshQueue::tick`] gives the job up, as it would have without
    /// the check-in. A lease in flight is superseded; its later completion
    /// is accepted as a report on this delivery.
    pub fn check_in(&mut self, device_id: &str, now: UnixTime) -> Option<(Job, Option<Change>)> {
        let id = self.job_id_of(device_id)?;
        let job = self.jobs.get(&id)?;
        if let JobState::Delivered { .. } = job.state {
            let spent =
                job.attempts >= self.policy.max_attempts || self.too_old(job.created_at, now);
            if now < job.next_at || spent {
                return Some((self.view(job), None));
            }
        }
        let confirm = self.policy.confirm_within;
        let job = self.update(id, |job| {
            job.attempts = job.attempts.saturating_add(1);
            job.state = JobState::Delivered {
                at: now,
                via: Handout::CheckIn,
            };
            job.next_at = now.saturating_add(u64::from(confirm));
        })?;
        self.debug_check();
        Some((job.clone(), Some(Change::Put(job))))
    }

    /// Leases up to `max` due jobs for `lease_secs` (default and cap from the
    /// policy), oldest `expired_at` first, within the pacing budget and
    /// `max_outstanding`.
    pub fn lease(
        &mut self,
        max: u32,
        lease_secs: Option<u32>,
        now: UnixTime,
    ) -> (Vec<Job>, Vec<Change>) {
        self.lease_via(Handout::Lease, max, lease_secs, now)
    }

    /// Like [`RefreshQueue::lease`], recording how the jobs go out (a
    /// webhook delivery leases its jobs for the length of the call).
    pub fn lease_via(
        &mut self,
        via: Handout,
        max: u32,
        lease_secs: Option<u32>,
        now: UnixTime,
    ) -> (Vec<Job>, Vec<Change>) {
        self.promote(now);
        self.refill(now);
        let room = u64::from(self.policy.max_outstanding).saturating_sub(self.leased);
        let n = u64::from(max).min(room).min(self.tokens);
        let until = now.saturating_add(u64::from(self.policy.lease_secs(lease_secs)));
        let picked: Vec<(UnixTime, JobId)> = self
            .due
            .iter()
            .take(usize::try_from(n).unwrap_or(usize::MAX))
            .copied()
            .collect();
        let mut jobs = Vec::with_capacity(picked.len());
        let mut changes = Vec::with_capacity(picked.len());
        for (_, id) in picked {
            if let Some(job) = self.update(id, |job| {
                job.state = JobState::Leased { until, via };
                job.next_at = until;
            }) {
                jobs.push(job.clone());
                changes.push(Change::Put(job));
            }
        }
        self.tokens -= jobs.len() as u64;
        debug_assert!(jobs.is_empty() || self.leased <= u64::from(self.policy.max_outstanding));
        self.debug_check();
        (jobs, changes)
    }

    /// The MDM server reports what happened to a handed-out job.
    ///
    /// - `Delivered` on a leased job: `Delivered { via }` as leased, one
    ///   attempt counted, a new URI awaited until `now + confirm_within`.
    /// - `Delivered` on an already delivered job (handed at check-in, or a
    ///   repeated report): the wait for a new URI restarts from `now`, no
    ///   attempt counted.
    /// - `Failed` on a leased job counts an attempt; on a delivered job the
    ///   attempt was already counted. Then the job is queued again after the
    ///   backoff, or given up when `max_attempts` or `give_up_after` is spent.
    pub fn complete(
        &mut self,
        id: JobId,
        outcome: CompleteOutcome,
        now: UnixTime,
    ) -> Result<Change, QueueError> {
        let job = self.jobs.get(&id).ok_or(QueueError::UnknownJob)?;
        let was_leased = match job.state {
            JobState::Queued => return Err(QueueError::NotHandedOut),
            JobState::Leased { .. } => true,
            JobState::Delivered { .. } => false,
        };
        let confirm = self.policy.confirm_within;
        let change = match outcome {
            CompleteOutcome::Delivered => {
                let job = self
                    .update(id, |job| {
                        let via = match job.state {
                            JobState::Leased { via, .. } | JobState::Delivered { via, .. } => via,
                            JobState::Queued => Handout::Lease,
                        };
                        if was_leased {
                            job.attempts = job.attempts.saturating_add(1);
                        }
                        job.state = JobState::Delivered { at: now, via };
                        job.next_at = now.saturating_add(u64::from(confirm));
                    })
                    .ok_or(QueueError::UnknownJob)?;
                Change::Put(job)
            }
            CompleteOutcome::Failed { .. } => {
                if was_leased {
                    if let Some(job) = self.jobs.get_mut(&id) {
                        job.attempts = job.attempts.saturating_add(1);
                    }
                }
                self.retry_or_give_up(id, now)
                    .ok_or(QueueError::UnknownJob)?
            }
        };
        self.debug_check();
        Ok(change)
    }

    /// A new channel URI arrived for the device: its job is done.
    pub fn registered(&mut self, device_id: &str, _now: UnixTime) -> Option<Change> {
        self.close(device_id)
    }

    /// The device was deleted: its job goes without a new URI.
    pub fn remove_device(&mut self, device_id: &str) -> Option<Change> {
        self.close(device_id)
    }

    /// Advances time: expired leases go back to the queue (no attempt
    /// counted, due at once), deliveries that saw no new URI within
    /// `confirm_within` are queued after the backoff, and jobs past
    /// `give_up_after` or out of attempts are given up. Costs what is due.
    pub fn tick(&mut self, now: UnixTime) -> Vec<Change> {
        let mut changes = Vec::new();
        while let Some(&(at, id)) = self.deadlines.first() {
            if at > now {
                break;
            }
            let Some(job) = self.jobs.get(&id) else {
                // Unreachable by the index invariant; drop the stray entry.
                self.deadlines.pop_first();
                continue;
            };
            let old = self.too_old(job.created_at, now);
            let change = match job.state {
                JobState::Leased { .. } => {
                    if old {
                        self.give_up_job(id)
                    } else {
                        self.update(id, |job| {
                            job.state = JobState::Queued;
                            job.next_at = now;
                        })
                        .map(Change::Put)
                    }
                }
                JobState::Delivered { .. } => self.retry_or_give_up(id, now),
                JobState::Queued => {
                    self.deadlines.pop_first();
                    None
                }
            };
            changes.extend(change);
        }
        while let Some(&(at, id)) = self.give_up.first() {
            if at > now {
                break;
            }
            self.give_up.pop_first();
            let queued = self
                .jobs
                .get(&id)
                .is_some_and(|j| j.state == JobState::Queued);
            if queued {
                changes.extend(self.give_up_job(id));
            }
        }
        self.give_up_swept_to = self.give_up_swept_to.max(now);
        self.promote(now);
        self.debug_check();
        changes
    }

    /// The earliest time at which [`RefreshQueue::tick`] has work to do.
    pub fn next_deadline(&self) -> Option<UnixTime> {
        let a = self.deadlines.first().map(|d| d.0);
        let b = self.give_up.first().map(|d| d.0);
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Counts by state and the due backlog at `now`.
    pub fn stats(&self, now: UnixTime) -> QueueStats {
        let ripe = self
            .waiting
            .range(..(now.saturating_add(1), UnixTime(0), 0));
        let mut due_now = self.due.len() as u64;
        let mut oldest = self.due.first().map(|d| d.0);
        for &(_, expired_at, _) in ripe {
            due_now += 1;
            oldest = Some(oldest.map_or(expired_at, |o| o.min(expired_at)));
        }
        QueueStats {
            queued: (self.waiting.len() + self.due.len()) as u64,
            leased: self.leased,
            delivered: self.delivered,
            oldest_expired_at: oldest,
            due_now,
        }
    }

    /// Number of open jobs.
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Iterates over all open jobs, in no particular order.
    pub fn jobs(&self) -> impl Iterator<Item = Job> + '_ {
        self.jobs.values().map(|j| self.view(j))
    }

    /// The ids of all open jobs, in no particular order.
    pub fn job_ids(&self) -> impl Iterator<Item = JobId> + '_ {
        self.jobs.keys().copied()
    }

    /// Distinct PFNs and provider ids the open jobs refer to.
    #[cfg(test)]
    fn shared_strings(&self) -> (usize, usize) {
        (self.pfns.len(), self.providers.len())
    }

    /// Checks every internal invariant; O(jobs). For tests and debugging.
    ///
    /// One job per device; every index entry points at a job in the matching
    /// state with the matching keys, and every job is in exactly the indexes
    /// its state requires; the leased and delivered counters are exact.
    pub fn check_invariants(&self) -> Result<(), String> {
        if self.jobs.len() != self.by_device.len() {
            return Err(format!(
                "{} jobs but {} devices",
                self.jobs.len(),
                self.by_device.len()
            ));
        }
        let (mut leased, mut delivered, mut queued, mut with_deadline, mut with_give_up) =
            (0u64, 0u64, 0usize, 0usize, 0usize);
        for (id, job) in &self.jobs {
            if *id != job.id || self.counter_of(*id) >= self.next_id {
                return Err(format!(
                    "job {id} has id {} (next {})",
                    job.id, self.next_id
                ));
            }
            if self.job_id_of(&job.device_id) != Some(*id) {
                return Err(format!("job {id} missing from the device map"));
            }
            match job.state {
                JobState::Queued => {
                    queued += 1;
                    let w = self.waiting.contains(&(job.next_at, job.expired_at, *id));
                    let d = self.due.contains(&(job.expired_at, *id));
                    if w == d {
                        return Err(format!("queued job {id}: waiting {w}, due {d}"));
                    }
                    if w && job.next_at <= self.promoted_to || d && job.next_at > self.promoted_to {
                        return Err(format!("queued job {id} in the wrong set"));
                    }
                }
                JobState::Leased { until, .. } => {
                    leased += 1;
                    with_deadline += 1;
                    if until != job.next_at || !self.deadlines.contains(&(job.next_at, *id)) {
                        return Err(format!("leased job {id} without its deadline"));
                    }
                }
                JobState::Delivered { .. } => {
                    delivered += 1;
                    with_deadline += 1;
                    if !self.deadlines.contains(&(job.next_at, *id)) {
                        return Err(format!("delivered job {id} without its deadline"));
                    }
                }
            }
            let gu = self.give_up_at(job.created_at);
            if gu > self.give_up_swept_to {
                with_give_up += 1;
                if !self.give_up.contains(&(gu, *id)) {
                    return Err(format!("job {id} missing from the give-up index"));
                }
            }
        }
        if queued != self.waiting.len() + self.due.len()
            || with_deadline != self.deadlines.len()
            || with_give_up != self.give_up.len()
        {
            return Err("index holds entries for no job".to_owned());
        }
        if leased != self.leased || delivered != self.delivered {
            return Err(format!(
                "counters leased {} delivered {} but jobs say {leased} and {delivered}",
                self.leased, self.delivered
            ));
        }
        Ok(())
    }

    // ---- internals ------------------------------------------------------

    fn debug_check(&self) {
        debug_assert_eq!(self.jobs.len(), self.by_device.len());
        debug_assert!(
            self.waiting.len() + self.due.len() + self.deadlines.len() == self.jobs.len()
        );
    }

    fn give_up_at(&self, created_at: UnixTime) -> UnixTime {
        created_at.saturating_add(u64::from(self.policy.give_up_after))
    }

    fn too_old(&self, created_at: UnixTime, now: UnixTime) -> bool {
        now.saturating_since(created_at) >= self.policy.give_up_after
    }

    /// The stored form of `job`, counting its shared strings.
    fn keep(&mut self, job: Job) -> Stored {
        Stored {
            id: job.id,
            pfn: self.pfns.add(&job.pfn),
            provider_id: job
                .provider_id
                .as_ref()
                .map_or(NO_PROVIDER, |p| self.providers.add(p)),
            device_id: job.device_id.into_string().into_boxed_str(),
            reason: job.reason,
            expired_at: job.expired_at,
            created_at: job.created_at,
            attempts: job.attempts,
            state: job.state,
            next_at: job.next_at,
        }
    }

    /// The job `s` stands for.
    fn view(&self, s: &Stored) -> Job {
        Job {
            id: s.id,
            device_id: DeviceId::from_valid(String::from(&*s.device_id)),
            pfn: self.pfns.get(s.pfn).clone(),
            provider_id: (s.provider_id != NO_PROVIDER)
                .then(|| self.providers.get(s.provider_id).clone()),
            reason: s.reason,
            expired_at: s.expired_at,
            created_at: s.created_at,
            attempts: s.attempts,
            state: s.state,
            next_at: s.next_at,
        }
    }

    /// Drops `s`'s counts on its shared strings (it is leaving the queue).
    fn forget(&mut self, s: &Stored) {
        self.pfns.release(s.pfn);
        if s.provider_id != NO_PROVIDER {
            self.providers.release(s.provider_id);
        }
    }

    /// Moves queued jobs whose time has come from `waiting` to `due`.
    fn promote(&mut self, now: UnixTime) {
        if now <= self.promoted_to {
            return;
        }
        self.promoted_to = now;
        while let Some(&(next_at, expired_at, id)) = self.waiting.first() {
            if next_at > now {
                break;
            }
            self.waiting.pop_first();
            self.due.insert((expired_at, id));
        }
    }

    /// Sets the share of `refresh.jobs_per_second` this queue hands out:
    /// `owned` of `all` partitions (at least one job a second while it owns
    /// any).
    pub fn set_pace_share(&mut self, owned: u32, all: u32) {
        self.pace_share = (owned, all.max(1));
        self.tokens = self.tokens.min(self.rate());
    }

    /// Hand-outs a second, this queue's share.
    fn rate(&self) -> u64 {
        let (owned, all) = self.pace_share;
        (self.policy.rate() * u64::from(owned) / u64::from(all)).max(1)
    }

    fn refill(&mut self, now: UnixTime) {
        let rate = self.rate();
        match self.refilled_at {
            Some(at) if now > at => {
                let add = u64::from(now.saturating_since(at)).saturating_mul(rate);
                self.tokens = self.tokens.saturating_add(add).min(rate);
                self.refilled_at = Some(now);
            }
            Some(_) => {}
            None => {
                self.tokens = rate;
                self.refilled_at = Some(now);
            }
        }
    }

    /// Adds a job and its index entries.
    fn insert(&mut self, job: Job) {
        let id = job.id;
        self.by_device
            .insert(&self.jobs, job.device_id.as_str(), id);
        let gu = self.give_up_at(job.created_at);
        if gu > self.give_up_swept_to {
            self.give_up.insert((gu, id));
        }
        let stored = self.keep(job);
        self.index(&stored);
        self.jobs.insert(id, Box::new(stored));
    }

    /// Removes a job and its index entries.
    fn remove(&mut self, id: JobId) -> Option<Job> {
        let stored = self.jobs.remove(&id)?;
        self.unindex(&stored);
        self.by_device.remove(&stored.device_id, id);
        let gu = self.give_up_at(stored.created_at);
        self.give_up.remove(&(gu, id));
        let job = self.view(&stored);
        self.forget(&stored);
        Some(job)
    }

    /// Adds the state-dependent index entries of a job.
    fn index(&mut self, job: &Stored) {
        match job.state {
            JobState::Queued => {
                if job.next_at <= self.promoted_to {
                    self.due.insert((job.expired_at, job.id));
                } else {
                    self.waiting.insert((job.next_at, job.expired_at, job.id));
                }
            }
            JobState::Leased { .. } => {
                self.leased += 1;
                self.deadlines.insert((job.next_at, job.id));
            }
            JobState::Delivered { .. } => {
                self.delivered += 1;
                self.deadlines.insert((job.next_at, job.id));
            }
        }
    }

    /// Removes the state-dependent index entries of a job.
    fn unindex(&mut self, job: &Stored) {
        match job.state {
            JobState::Queued => {
                if !self.waiting.remove(&(job.next_at, job.expired_at, job.id)) {
                    self.due.remove(&(job.expired_at, job.id));
                }
            }
            JobState::Leased { .. } => {
                self.leased -= 1;
                self.deadlines.remove(&(job.next_at, job.id));
            }
            JobState::Delivered { .. } => {
                self.delivered -= 1;
                self.deadlines.remove(&(job.next_at, job.id));
            }
        }
    }

    /// Applies `f` to a job, keeping the indexes in step; answers the
    /// updated job.
    fn update(&mut self, id: JobId, f: impl FnOnce(&mut Stored)) -> Option<Job> {
        let mut job = self.jobs.remove(&id)?;
        self.unindex(&job);
        f(&mut job);
        self.index(&job);
        let copy = self.view(&job);
        self.jobs.insert(id, job);
        Some(copy)
    }

    /// After a failed or unconfirmed attempt: queue again after the backoff,
    /// or give up when the attempt or age budget is spent.
    fn retry_or_give_up(&mut self, id: JobId, now: UnixTime) -> Option<Change> {
        let job = self.jobs.get(&id)?;
        if job.attempts >= self.policy.max_attempts || self.too_old(job.created_at, now) {
            return self.give_up_job(id);
        }
        let wait = self.policy.backoff(id, job.attempts);
        self.update(id, |job| {
            job.state = JobState::Queued;
            job.next_at = now.saturating_add(u64::from(wait));
        })
        .map(Change::Put)
    }

    fn give_up_job(&mut self, id: JobId) -> Option<Change> {
        let job = self.remove(id)?;
        Some(Change::GaveUp {
            id,
            device_id: job.device_id,
        })
    }

    fn close(&mut self, device_id: &str) -> Option<Change> {
        let id = self.job_id_of(device_id)?;
        let job = self.remove(id)?;
        self.debug_check();
        Some(Change::Closed {
            id,
            device_id: job.device_id,
        })
    }
}

/// SplitMix64: a fixed, well-mixed hash for deterministic jitter.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const T0: UnixTime = UnixTime(1_800_000_000);
    const DAY: u32 = 86_400;

    fn at(secs: u32) -> UnixTime {
        UnixTime(T0.0 + secs)
    }

    fn dev(n: u32) -> DeviceId {
        DeviceId::parse(&format!("dev-{n}")).unwrap()
    }

    fn pfn() -> Pfn {
        Pfn::parse("Contoso.MDM_8wekyb3d8bbwe").unwrap()
    }

    fn queue() -> RefreshQueue {
        RefreshQueue::new(RefreshPolicy::default())
    }

    /// Opens a job for `dev(n)` that expired at `expired`.
    fn open(q: &mut RefreshQueue, n: u32, expired: UnixTime, now: UnixTime) -> Job {
        match q.open(dev(n), pfn(), None, LeaveReason::Age, expired, now) {
            Some(Change::Put(job)) => job,
            other => panic!("open answered {other:?}"),
        }
    }

    fn put(c: Option<Change>) -> Job {
        match c {
            Some(Change::Put(job)) => job,
            other => panic!("expected a Put, got {other:?}"),
        }
    }

    #[test]
    fn ids_carry_partitions_and_the_pace_is_a_share() {
        let parts = crate::core::Partitioning::new(16).unwrap();
        let mut a = queue();
        a.ids_carry_partitions(parts);
        a.ids_from(u64::from(T0.0) << 20);
        let mut b = queue();
        b.ids_carry_partitions(parts);
        b.ids_from(u64::from(T0.0) << 20);
        let mut ids = std::collections::BTreeSet::new();
        for n in 0..200 {
            // Two nodes started the same second, each with its devices.
            let q = if parts.of(dev(n).as_str()) < 8 {
                &mut a
            } else {
                &mut b
            };
            let job = open(q, n, T0, T0);
            assert_eq!(partition_of_id(job.id), parts.of(dev(n).as_str()));
            assert!(ids.insert(job.id), "id {} given twice", job.id);
        }
        // A job moved to the other node keeps its id, and that node's
        // next ids stay above it.
        let moved = (0..200)
            .find_map(|n| a.job_for_device(dev(n).as_str()))
            .unwrap();
        b.restore(moved.clone());
        let next = open(&mut b, 1000, T0, T0);
        assert!(next.id >> PARTITION_BITS > moved.id >> PARTITION_BITS);
        a.registered(moved.device_id.as_str(), T0);
        assert!(a.was_closed(moved.id));
        b.check_invariants().unwrap();
        // A node serving a quarter of the partitions hands out a quarter
        // of the pace.
        let mut q = RefreshQueue::new(RefreshPolicy {
            jobs_per_second: 40,
            ..RefreshPolicy::default()
        });
        q.set_pace_share(4, 16);
        for n in 0..100 {
            open(&mut q, n, T0, T0);
        }
        let (jobs, _) = q.lease(100, None, at(1));
        assert_eq!(jobs.len(), 10);
    }

    #[test]
    fn stored_job_is_small() {
        assert_eq!(std::mem::size_of::<Stored>(), 56);
    }

    #[test]
    fn shared_strings_are_kept_once_and_go_with_their_last_job() {
        let mut q = RefreshQueue::new(RefreshPolicy::default());
        let pfns = [
            Pfn::parse("Contoso.MDM_8wekyb3d8bbwe").unwrap(),
            Pfn::parse("Fabrikam.MDM_8wekyb3d8bbwe").unwrap(),
        ];
        let provider = ProviderId::parse("Contoso-MDM").unwrap();
        for i in 0..10u32 {
            let opened = q.open(
                DeviceId::parse(&format!("dev-{i}")).unwrap(),
                pfns[(i % 2) as usize].clone(),
                (i < 3).then(|| provider.clone()),
                LeaveReason::Age,
                T0,
                T0,
            );
            assert!(opened.is_some());
        }
        assert_eq!(q.shared_strings(), (2, 1));
        let job = q.job_for_device("dev-1").unwrap();
        assert_eq!(job.pfn, pfns[1]);
        assert_eq!(job.provider_id, Some(provider.clone()));
        assert_eq!(q.job_for_device("dev-4").unwrap().provider_id, None);
        for i in 0..3 {
            q.registered(&format!("dev-{i}"), T0);
        }
        assert_eq!(
            q.shared_strings(),
            (2, 0),
            "the provider id went with its last job"
        );
        for i in (3..10).step_by(2) {
            q.registered(&format!("dev-{i}"), T0);
        }
        assert_eq!(
            q.shared_strings(),
            (1, 0),
            "Fabrikam went with its last job"
        );
        // A string dropped and used again gets a slot again.
        q.open(
            DeviceId::parse("dev-new").unwrap(),
            pfns[1].clone(),
            Some(provider.clone()),
            LeaveReason::Wns410,
            T0,
            T0,
        )
        .unwrap();
        assert_eq!(q.shared_strings(), (2, 1));
        assert_eq!(q.job_for_device("dev-new").unwrap().pfn, pfns[1]);
        assert_eq!(q.job_for_device("dev-4").unwrap().pfn, pfns[0]);
        q.check_invariants().unwrap();
    }

    #[test]
    fn job_is_small() {
        assert_eq!(std::mem::size_of::<Job>(), 104);
    }

    #[test]
    fn open_queues_once_per_device() {
        let mut q = queue();
        let job = open(&mut q, 1, T0, T0);
        assert_eq!(job.state, JobState::Queued);
        assert_eq!((job.attempts, job.next_at, job.created_at), (0, T0, T0));
        assert_eq!(
            q.open(dev(1), pfn(), None, LeaveReason::Wns410, T0, at(5)),
            None
        );
        assert_eq!(q.len(), 1);
        assert_eq!(q.job_for_device("dev-1"), Some(job.clone()));
        assert_eq!(q.get(job.id), Some(job.clone()));
        q.check_invariants().unwrap();
    }

    #[test]
    fn check_in_hands_out_unpaced_and_counts_once_per_confirm_window() {
        let mut q = RefreshQueue::new(RefreshPolicy {
            jobs_per_second: 1,
            ..RefreshPolicy::default()
        });
        for n in 0..10 {
            open(&mut q, n, T0, T0);
        }
        for n in 0..10 {
            let (job, change) = q.check_in(&format!("dev-{n}"), T0).unwrap();
            assert_eq!(
                job.state,
                JobState::Delivered {
                    at: T0,
                    via: Handout::CheckIn
                }
            );
            assert_eq!(job.attempts, 1);
            assert_eq!(job.next_at, at(DAY));
            assert_eq!(change, Some(Change::Put(job)));
        }
        // Again within confirm_within: same command, nothing to persist.
        let (again, change) = q.check_in("dev-0", at(DAY - 1)).unwrap();
        assert_eq!((again.attempts, change), (1, None));
        // After confirm_within (tick not run yet): a new delivery.
        let (late, change) = q.check_in("dev-0", at(DAY)).unwrap();
        assert_eq!(late.attempts, 2);
        assert_eq!(late.next_at, at(2 * DAY));
        assert!(change.is_some());
        assert!(q.check_in("nobody", T0).is_none());
        q.check_invariants().unwrap();
    }

    #[test]
    fn check_in_after_the_last_attempt_rehands_and_tick_gives_up() {
        let mut q = RefreshQueue::new(RefreshPolicy {
            max_attempts: 1,
            ..RefreshPolicy::default()
        });
        let job = open(&mut q, 1, T0, T0);
        q.check_in("dev-1", T0);
        // Confirmation wait over, tick not run yet: the device still gets
        // the command, no attempt is counted, nothing to persist.
        let (j, change) = q.check_in("dev-1", at(DAY + 1)).unwrap();
        assert_eq!((j.attempts, j.next_at, change), (1, at(DAY), None));
        assert_eq!(
            q.tick(at(DAY + 2)),
            vec![Change::GaveUp {
                id: job.id,
                device_id: dev(1)
            }]
        );
    }

    #[test]
    fn check_in_supersedes_a_lease() {
        let mut q = queue();
        let job = open(&mut q, 1, T0, T0);
        let (leased, _) = q.lease(10, None, T0);
        assert_eq!(leased.len(), 1);
        let (j, _) = q.check_in("dev-1", at(10)).unwrap();
        assert_eq!(j.attempts, 1);
        assert!(matches!(
            j.state,
            JobState::Delivered {
                via: Handout::CheckIn,
                ..
            }
        ));
        // The leaser's later report is accepted, without a second attempt.
        let c = q
            .complete(job.id, CompleteOutcome::Delivered, at(20))
            .unwrap();
        let j = put(Some(c));
        assert_eq!(j.attempts, 1);
        assert_eq!(j.next_at, at(20 + DAY));
        q.check_invariants().unwrap();
    }

    #[test]
    fn lease_orders_by_oldest_expiry_and_sets_the_lease() {
        let mut q = queue();
        let a = open(&mut q, 1, at(300), T0);
        let b = open(&mut q, 2, at(100), T0);
        let c = open(&mut q, 3, at(200), T0);
        let (jobs, changes) = q.lease(2, Some(60), T0);
        let ids: Vec<_> = jobs.iter().map(|j| j.id).collect();
        assert_eq!(ids, vec![b.id, c.id]);
        assert_eq!(changes.len(), 2);
        assert_eq!(
            jobs[0].state,
            JobState::Leased {
                until: at(60),
                via: Handout::Lease
            }
        );
        assert_eq!(jobs[0].next_at, at(60));
        assert_eq!(jobs[0].attempts, 0);
        let (rest, _) = q.lease(10, None, T0);
        assert_eq!(rest.iter().map(|j| j.id).collect::<Vec<_>>(), vec![a.id]);
        assert_eq!(rest[0].next_at, at(300), "default lease");
        let s = q.stats(T0);
        assert_eq!((s.queued, s.leased, s.delivered, s.due_now), (0, 3, 0, 0));
        q.check_invariants().unwrap();
    }

    #[test]
    fn lease_length_is_clamped() {
        let mut q = queue();
        open(&mut q, 1, T0, T0);
        open(&mut q, 2, T0, T0);
        let (j, _) = q.lease(1, Some(1_000_000), T0);
        assert_eq!(j[0].next_at, at(3_600));
        let (j, _) = q.lease(1, Some(0), T0);
        assert_eq!(j[0].next_at, at(1));
    }

    #[test]
    fn lease_only_hands_out_due_jobs() {
        let mut q = queue();
        let job = open(&mut q, 1, T0, T0);
        q.lease(1, None, T0);
        q.complete(job.id, CompleteOutcome::Failed { status: Some(3) }, at(10))
            .unwrap();
        let queued = q.get(job.id).unwrap().clone();
        assert_eq!(queued.state, JobState::Queued);
        assert!(queued.next_at > at(10));
        assert_eq!(q.stats(at(10)).due_now, 0);
        assert!(q.lease(10, None, at(10)).0.is_empty());
        let due = queued.next_at;
        assert_eq!(q.stats(due).due_now, 1);
        assert_eq!(q.stats(due).oldest_expired_at, Some(T0));
        assert_eq!(q.lease(10, None, due).0.len(), 1);
        q.check_invariants().unwrap();
    }

    #[test]
    fn lease_is_paced_by_a_token_bucket() {
        let mut q = RefreshQueue::new(RefreshPolicy {
            jobs_per_second: 5,
            ..RefreshPolicy::default()
        });
        for n in 0..100 {
            open(&mut q, n, T0, T0);
        }
        assert_eq!(q.lease(100, None, T0).0.len(), 5, "burst of one second");
        assert_eq!(q.lease(100, None, T0).0.len(), 0);
        assert_eq!(q.lease(100, None, at(1)).0.len(), 5);
        assert_eq!(q.lease(2, None, at(3)).0.len(), 2, "max bounds the count");
        assert_eq!(q.lease(100, None, at(3)).0.len(), 3, "burst capped at rate");
        assert_eq!(q.lease(100, None, at(100)).0.len(), 5);
        q.check_invariants().unwrap();
    }

    #[test]
    fn lease_respects_max_outstanding() {
        let mut q = RefreshQueue::new(RefreshPolicy {
            max_outstanding: 3,
            ..RefreshPolicy::default()
        });
        for n in 0..10 {
            open(&mut q, n, T0, T0);
        }
        let (jobs, _) = q.lease(10, None, T0);
        assert_eq!(jobs.len(), 3);
        assert!(q.lease(10, None, at(5)).0.is_empty());
        q.complete(jobs[0].id, CompleteOutcome::Delivered, at(5))
            .unwrap();
        assert_eq!(q.lease(10, None, at(6)).0.len(), 1);
        assert_eq!(q.stats(at(6)).leased, 3);
    }

    #[test]
    fn webhook_hand_out_is_recorded() {
        let mut q = queue();
        let job = open(&mut q, 1, T0, T0);
        let (jobs, _) = q.lease_via(Handout::Webhook, 1, Some(30), T0);
        assert!(matches!(
            jobs[0].state,
            JobState::Leased {
                via: Handout::Webhook,
                ..
            }
        ));
        let j = put(Some(
            q.complete(job.id, CompleteOutcome::Delivered, at(3))
                .unwrap(),
        ));
        assert_eq!(
            j.state,
            JobState::Delivered {
                at: at(3),
                via: Handout::Webhook
            }
        );
    }

    #[test]
    fn complete_delivered_counts_an_attempt_and_waits_for_a_uri() {
        let mut q = queue();
        let job = open(&mut q, 1, T0, T0);
        q.lease(1, None, T0);
        let j = put(Some(
            q.complete(job.id, CompleteOutcome::Delivered, at(50))
                .unwrap(),
        ));
        assert_eq!(j.attempts, 1);
        assert_eq!(j.next_at, at(50 + DAY));
        assert_eq!(
            j.state,
            JobState::Delivered {
                at: at(50),
                via: Handout::Lease
            }
        );
        // A repeated report restarts the wait without another attempt.
        let j = put(Some(
            q.complete(job.id, CompleteOutcome::Delivered, at(60))
                .unwrap(),
        ));
        assert_eq!((j.attempts, j.next_at), (1, at(60 + DAY)));
        q.check_invariants().unwrap();
    }

    #[test]
    fn complete_errors() {
        let mut q = queue();
        let job = open(&mut q, 1, T0, T0);
        assert_eq!(
            q.complete(job.id, CompleteOutcome::Delivered, T0),
            Err(QueueError::NotHandedOut)
        );
        assert_eq!(
            q.complete(999, CompleteOutcome::Delivered, T0),
            Err(QueueError::UnknownJob)
        );
        q.check_invariants().unwrap();
    }

    #[test]
    fn failed_completion_backs_off_then_gives_up() {
        let policy = RefreshPolicy::default();
        let mut q = RefreshQueue::new(policy.clone());
        let job = open(&mut q, 1, T0, T0);
        let mut now = T0;
        for attempt in 1..=policy.max_attempts {
            let (jobs, _) = q.lease(1, None, now);
            assert_eq!(jobs.len(), 1, "attempt {attempt}");
            let c = q
                .complete(job.id, CompleteOutcome::Failed { status: Some(1) }, now)
                .unwrap();
            if attempt < policy.max_attempts {
                let j = put(Some(c));
                assert_eq!(j.attempts, attempt);
                assert_eq!(j.state, JobState::Queued);
                let wait = j.next_at.saturating_since(now);
                assert_eq!(wait, policy.backoff(job.id, attempt));
                now = j.next_at;
            } else {
                assert_eq!(
                    c,
                    Change::GaveUp {
                        id: job.id,
                        device_id: dev(1)
                    }
                );
            }
        }
        assert!(q.is_empty());
        q.check_invariants().unwrap();
    }

    #[test]
    fn failed_after_check_in_does_not_count_twice() {
        let mut q = queue();
        let job = open(&mut q, 1, T0, T0);
        q.check_in("dev-1", T0);
        let j = put(Some(
            q.complete(job.id, CompleteOutcome::Failed { status: None }, at(1))
                .unwrap(),
        ));
        assert_eq!(j.attempts, 1);
        assert_eq!(j.state, JobState::Queued);
    }

    #[test]
    fn backoff_grows_is_jittered_and_capped() {
        let p = RefreshPolicy::default();
        for id in 1..200 {
            for attempts in 1..10u16 {
                let b = p.backoff(id, attempts);
                let nominal = (3_600u64 << (attempts - 1)).min(86_400);
                assert!(u64::from(b) >= nominal * 3 / 4, "{id} {attempts} {b}");
                assert!(u64::from(b) <= (nominal * 5 / 4).min(86_400));
                assert_eq!(b, p.backoff(id, attempts), "deterministic");
            }
        }
        let spread: BTreeSet<u32> = (1..100).map(|id| p.backoff(id, 1)).collect();
        assert!(spread.len() > 50, "jitter spreads retries");
    }

    #[test]
    fn registered_and_removed_close_from_any_state() {
        let mut q = queue();
        let a = open(&mut q, 1, T0, T0);
        let b = open(&mut q, 2, T0, T0);
        let c = open(&mut q, 3, T0, T0);
        q.lease(1, None, T0); // a
        q.check_in("dev-2", T0); // b
        assert_eq!(
            q.registered("dev-1", at(1)),
            Some(Change::Closed {
                id: a.id,
                device_id: dev(1)
            })
        );
        assert_eq!(
            q.registered("dev-2", at(1)),
            Some(Change::Closed {
                id: b.id,
                device_id: dev(2)
            })
        );
        assert_eq!(
            q.remove_device("dev-3"),
            Some(Change::Closed {
                id: c.id,
                device_id: dev(3)
            })
        );
        assert_eq!(q.registered("dev-3", at(1)), None);
        assert!(q.is_empty());
        assert_eq!(
            q.complete(a.id, CompleteOutcome::Delivered, at(2)),
            Err(QueueError::UnknownJob)
        );
        q.check_invariants().unwrap();
        // A device may get a new job after its old one closed.
        let d = open(&mut q, 1, at(5), at(5));
        assert!(d.id > c.id);
    }

    #[test]
    fn tick_returns_expired_leases_without_an_attempt() {
        let mut q = queue();
        let job = open(&mut q, 1, T0, T0);
        q.lease(1, Some(60), T0);
        assert!(q.tick(at(59)).is_empty());
        let changes = q.tick(at(60));
        let j = put(changes.into_iter().next());
        assert_eq!(
            (j.state, j.attempts, j.next_at),
            (JobState::Queued, 0, at(60))
        );
        assert_eq!(q.lease(1, None, at(61)).0[0].id, job.id);
        q.check_invariants().unwrap();
    }

    #[test]
    fn tick_retries_unconfirmed_deliveries_then_gives_up() {
        let policy = RefreshPolicy {
            max_attempts: 2,
            ..RefreshPolicy::default()
        };
        let mut q = RefreshQueue::new(policy.clone());
        let job = open(&mut q, 1, T0, T0);
        q.check_in("dev-1", T0);
        assert!(q.tick(at(DAY - 1)).is_empty());
        let j = put(q.tick(at(DAY)).into_iter().next());
        assert_eq!(j.state, JobState::Queued);
        assert_eq!(j.attempts, 1);
        assert_eq!(j.next_at, at(DAY + policy.backoff(job.id, 1)));
        let (j, _) = q.check_in("dev-1", at(DAY + 5)).unwrap();
        assert_eq!(j.attempts, 2);
        assert_eq!(
            q.tick(at(2 * DAY + 5)),
            vec![Change::GaveUp {
                id: job.id,
                device_id: dev(1)
            }]
        );
        assert!(q.is_empty());
        q.check_invariants().unwrap();
    }

    #[test]
    fn tick_gives_up_jobs_never_handed_out() {
        let mut q = queue();
        let job = open(&mut q, 1, T0, T0);
        let other = open(&mut q, 2, T0, at(DAY));
        assert!(q.tick(at(14 * DAY - 1)).is_empty());
        assert_eq!(q.next_deadline(), Some(at(14 * DAY)));
        assert_eq!(
            q.tick(at(14 * DAY)),
            vec![Change::GaveUp {
                id: job.id,
                device_id: dev(1)
            }]
        );
        assert!(q.get(other.id).is_some());
        q.check_invariants().unwrap();
    }

    #[test]
    fn tick_gives_up_old_jobs_when_their_lease_or_delivery_ends() {
        let mut q = queue();
        let a = open(&mut q, 1, T0, T0);
        let b = open(&mut q, 2, T0, T0);
        let now = at(14 * DAY - 10);
        q.lease(1, Some(100), now); // a
        q.check_in("dev-2", now); // b
                                  // Give-up time passes while they are out: they are left alone.
        assert!(q.tick(at(14 * DAY)).is_empty());
        assert_eq!(
            q.tick(at(14 * DAY + 90)),
            vec![Change::GaveUp {
                id: a.id,
                device_id: dev(1)
            }]
        );
        assert_eq!(
            q.tick(now.saturating_add(u64::from(DAY))),
            vec![Change::GaveUp {
                id: b.id,
                device_id: dev(2)
            }]
        );
        q.check_invariants().unwrap();
    }

    #[test]
    fn restoring_all_at_once_equals_restoring_one_by_one() {
        let mut q = queue();
        let a = open(&mut q, 1, T0, T0);
        open(&mut q, 2, T0, T0);
        q.lease(1, None, T0);
        q.check_in("dev-2", T0);
        open(&mut q, 3, at(1), T0);
        open(&mut q, 4, at(5 * DAY), at(DAY));
        let mut jobs: Vec<Job> = q.jobs().collect();
        // A second job for a device, and an id stored twice.
        jobs.push(Job {
            id: 99,
            ..a.clone()
        });
        jobs.push(Job {
            attempts: 3,
            ..jobs[0].clone()
        });
        let mut one = queue();
        let mut by_one: Vec<Change> = Vec::new();
        let mut sorted = jobs.clone();
        sorted.sort_by_key(|j| j.id);
        for j in sorted {
            by_one.extend(one.restore(j));
        }
        let mut all = queue();
        let by_all = all.restore_all(jobs);
        all.check_invariants().unwrap();
        assert_eq!(by_all, by_one);
        assert_eq!(by_all.len(), 1);
        for now in [T0, at(DAY), at(20 * DAY)] {
            assert_eq!(all.stats(now), one.stats(now));
        }
        let mut a_jobs: Vec<Job> = all.jobs().collect();
        let mut o_jobs: Vec<Job> = one.jobs().collect();
        a_jobs.sort_by_key(|j| j.id);
        o_jobs.sort_by_key(|j| j.id);
        assert_eq!(a_jobs, o_jobs);
        assert_eq!(all.next_id, one.next_id);
        assert_eq!(all.tick(at(20 * DAY)), one.tick(at(20 * DAY)));
        // Onto a queue that has jobs, one by one.
        let mut more = queue();
        open(&mut more, 7, T0, T0);
        assert!(more.restore_all(all.jobs().collect()).is_empty());
        more.check_invariants().unwrap();
        assert_eq!(more.len(), all.len() + 1);
    }

    #[test]
    fn restore_rebuilds_and_keeps_ids_above() {
        let mut q = queue();
        let a = open(&mut q, 1, T0, T0);
        open(&mut q, 2, T0, T0);
        q.lease(1, None, T0);
        q.check_in("dev-2", T0);
        open(&mut q, 3, at(1), T0);
        let jobs: Vec<Job> = q.jobs().collect();
        let mut r = queue();
        for j in jobs.iter().cloned() {
            assert_eq!(r.restore(j), None);
        }
        r.check_invariants().unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r.stats(T0).leased, 1);
        assert_eq!(r.stats(T0).delivered, 1);
        assert_eq!(r.stats(T0).queued, 1);
        let d = open(&mut r, 4, T0, T0);
        assert!(jobs.iter().all(|j| j.id < d.id));
        // A second job for a device already loaded is answered as closed.
        let dup = Job {
            id: 99,
            ..a.clone()
        };
        assert_eq!(
            r.restore(dup),
            Some(Change::Closed {
                id: 99,
                device_id: dev(1)
            })
        );
        // Restoring the same id again replaces it.
        let newer = Job {
            attempts: 3,
            ..r.get(a.id).unwrap().clone()
        };
        assert_eq!(r.restore(newer), None);
        assert_eq!(r.get(a.id).unwrap().attempts, 3);
        r.check_invariants().unwrap();
    }

    #[test]
    fn stats_count_due_jobs_not_yet_promoted() {
        let mut q = queue();
        open(&mut q, 1, at(7), T0);
        open(&mut q, 2, at(3), at(10));
        let s = q.stats(at(10));
        assert_eq!(
            (s.queued, s.due_now, s.oldest_expired_at),
            (2, 2, Some(at(3)))
        );
        let s = q.stats(at(5));
        assert_eq!((s.due_now, s.oldest_expired_at), (1, Some(at(7))));
    }

    #[test]
    fn pfn_choice() {
        let apps: Vec<Pfn> = [
            "Aaa_0123456789abc",
            "Bbb_0123456789abc",
            "Ccc_0123456789abc",
        ]
        .iter()
        .map(|s| Pfn::parse(s).unwrap())
        .collect();
        assert_eq!(pfn_to_send(PfnChoice::Same, &apps[1], &apps, 3), apps[1]);
        let seq: Vec<Pfn> = (0..4)
            .map(|a| pfn_to_send(PfnChoice::Rotate, &apps[1], &apps, a))
            .collect();
        assert_eq!(
            seq,
            vec![
                apps[2].clone(),
                apps[0].clone(),
                apps[1].clone(),
                apps[2].clone()
            ]
        );
        let stranger = pfn();
        assert_eq!(pfn_to_send(PfnChoice::Rotate, &stranger, &apps, 0), apps[0]);
        assert_eq!(pfn_to_send(PfnChoice::Rotate, &stranger, &[], 2), stranger);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Open(u8, u16),
        CheckIn(u8),
        Lease(u8, Option<u16>),
        Webhook(u8),
        Complete(u8, bool),
        Registered(u8),
        Remove(u8),
        Tick,
        Advance(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u8..20, any::<u16>()).prop_map(|(d, e)| Op::Open(d, e)),
            2 => (0u8..20).prop_map(Op::CheckIn),
            2 => (0u8..8, proptest::option::of(0u16..5000)).prop_map(|(m, l)| Op::Lease(m, l)),
            1 => (0u8..4).prop_map(Op::Webhook),
            3 => (any::<u8>(), any::<bool>()).prop_map(|(j, d)| Op::Complete(j, d)),
            1 => (0u8..20).prop_map(Op::Registered),
            1 => (0u8..20).prop_map(Op::Remove),
            2 => Just(Op::Tick),
            3 => prop_oneof![0u32..120, 0u32..(3 * DAY)].prop_map(Op::Advance),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn invariants_hold_under_any_sequence(ops in proptest::collection::vec(op(), 1..200)) {
            let policy = RefreshPolicy {
                jobs_per_second: 3,
                max_outstanding: 4,
                max_attempts: 3,
                give_up_after: 5 * DAY,
                ..RefreshPolicy::default()
            };
            let mut q = RefreshQueue::new(policy.clone());
            let mut now = T0;
            // The caller's view of the store, kept from the changes alone.
            let mut store: HashMap<JobId, Job> = HashMap::new();
            let mut issued: Vec<JobId> = Vec::new();
            let apply = |store: &mut HashMap<JobId, Job>, c: Change| match c {
                Change::Put(j) => { store.insert(j.id, j); }
                Change::Closed { id, .. } | Change::GaveUp { id, .. } => {
                    assert!(store.remove(&id).is_some(), "closing a job the store never saw");
                }
            };
            for op in ops {
                match op {
                    Op::Open(d, e) => {
                        let had = q.job_for_device(&format!("dev-{d}")).is_some();
                        let c = q.open(dev(u32::from(d)), pfn(), None, LeaveReason::Wns410, UnixTime(T0.0 - u32::from(e)), now);
                        prop_assert_eq!(had, c.is_none());
                        if let Some(Change::Put(j)) = &c { issued.push(j.id); }
                        if let Some(c) = c { apply(&mut store, c); }
                    }
                    Op::CheckIn(d) => {
                        if let Some((job, c)) = q.check_in(&format!("dev-{d}"), now) {
                            let delivered = matches!(job.state, JobState::Delivered { .. });
                            prop_assert!(delivered);
                            if let Some(c) = c { apply(&mut store, c); }
                        }
                    }
                    Op::Lease(m, l) => {
                        let (jobs, cs) = q.lease(u32::from(m), l.map(u32::from), now);
                        prop_assert!(jobs.len() <= usize::from(m));
                        prop_assert!(q.stats(now).leased <= u64::from(policy.max_outstanding) || jobs.is_empty());
                        prop_assert!(jobs.windows(2).all(|w| w[0].expired_at <= w[1].expired_at));
                        for j in &jobs {
                            prop_assert!(j.next_at > now);
                        }
                        for c in cs { apply(&mut store, c); }
                    }
                    Op::Webhook(m) => {
                        let (_, cs) = q.lease_via(Handout::Webhook, u32::from(m), Some(30), now);
                        for c in cs { apply(&mut store, c); }
                    }
                    Op::Complete(j, delivered) => {
                        if issued.is_empty() { continue; }
                        let id = issued[usize::from(j) % issued.len()];
                        let outcome = if delivered { CompleteOutcome::Delivered } else { CompleteOutcome::Failed { status: Some(3) } };
                        let state = q.get(id).map(|j| j.state);
                        match q.complete(id, outcome, now) {
                            Ok(c) => apply(&mut store, c),
                            Err(QueueError::UnknownJob) => prop_assert!(state.is_none()),
                            Err(QueueError::NotHandedOut) => prop_assert_eq!(state, Some(JobState::Queued)),
                        }
                    }
                    Op::Registered(d) => {
                        if let Some(c) = q.registered(&format!("dev-{d}"), now) { apply(&mut store, c); }
                        let name = format!("dev-{d}");
                        prop_assert!(q.job_for_device(&name).is_none());
                    }
                    Op::Remove(d) => {
                        if let Some(c) = q.remove_device(&format!("dev-{d}")) { apply(&mut store, c); }
                    }
                    Op::Tick => {
                        for c in q.tick(now) { apply(&mut store, c); }
                        for j in q.jobs() {
                            prop_assert!(j.attempts <= policy.max_attempts);
                            let out = !matches!(j.state, JobState::Queued);
                            prop_assert!(out || j.created_at.saturating_add(u64::from(policy.give_up_after)) > now);
                            prop_assert!(j.state == JobState::Queued || j.next_at > now);
                        }
                    }
                    Op::Advance(s) => now = now.saturating_add(u64::from(s)),
                }
                if let Err(e) = q.check_invariants() {
                    return Err(TestCaseError::fail(e));
                }
                // The store, rebuilt from changes only, is exactly the queue.
                prop_assert_eq!(store.len(), q.len());
                for j in q.jobs() {
                    prop_assert_eq!(store.get(&j.id), Some(&j));
                }
            }
        }
    }
}
