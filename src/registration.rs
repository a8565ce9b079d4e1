//! Registering and removing devices, below the API: the registration merge
//! rule applied over the device's record, the record made durable, and the
//! lifecycle told what it must know (an aged channel goes back to the sweep
//! or is offered a nudge; a new channel closes an open refresh job).
//!
//! Owns: the order of those steps, for one device ([`Registrar::register`])
//! and for many ([`Import`], chunked submissions with a bounded number
//! awaiting their sync).
//! Must not touch: HTTP types (the API parses and validates, then calls in
//! here), the disk (it goes through the store's commit handle).

use crate::core::{merge_registration, DeviceId, DeviceRecord, Registration, UnixTime};
use crate::lifecycle::Lifecycle;
use crate::registry::Registry;
use crate::store::committer::{CommitHandle, SubmitError, Ticket};
use crate::store::{Mutation, StoreError};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

/// How long an import waits before it tries a full store queue again when
/// none of its own submissions is in flight.
const FULL_QUEUE_RETRY: Duration = Duration::from_millis(2);

/// Why a write was not made durable. Nothing of it was changed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Submit(#[from] SubmitError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A device as it stands after a registration.
pub struct Registered {
    pub record: DeviceRecord,
    /// It was not registered before.
    pub created: bool,
}

/// Registers and removes devices.
pub struct Registrar {
    registry: Arc<Registry>,
    commits: CommitHandle,
    lifecycle: Arc<Lifecycle>,
}

impl Registrar {
    pub fn new(
        registry: Arc<Registry>,
        commits: CommitHandle,
        lifecycle: Arc<Lifecycle>,
    ) -> Registrar {
        Registrar {
            registry,
            commits,
            lifecycle,
        }
    }

    /// Registers one device at `now`; answers once its record is durable.
    pub async fn register(
        &self,
        reg: Registration,
        now: UnixTime,
    ) -> Result<Registered, WriteError> {
        let existing = self.registry.get(reg.device_id.as_str());
        let record = merge_registration(existing.as_ref(), reg, now);
        self.commits
            .submit(vec![Mutation::Put(record.clone())])?
            .await?;
        self.lifecycle.registered_aged(&record, now);
        if closes_a_job(existing.as_ref(), &record) {
            self.lifecycle
                .registered(record.device_id.as_str(), now)
                .await;
        }
        Ok(Registered {
            record,
            created: existing.is_none(),
        })
    }

    /// Removes a device at `now`; answers once the removal is durable.
    /// False when it was not registered.
    pub async fn remove(&self, id: &DeviceId, now: UnixTime) -> Result<bool, WriteError> {
        if self.registry.get(id.as_str()).is_none() {
            return Ok(false);
        }
        self.commits
            .submit(vec![Mutation::Delete(id.clone())])?
            .await?;
        self.lifecycle.removed(id.as_str(), now).await;
        Ok(true)
    }

    /// A bulk registration: records go to the store `chunk_lines` at a
    /// time, with at most `inflight_max` chunks awaiting their sync.
    pub fn import(self: &Arc<Self>, chunk_lines: usize, inflight_max: usize) -> Import {
        Import {
            registrar: self.clone(),
            chunk_lines,
            inflight_max,
            chunk: Vec::with_capacity(chunk_lines),
            inflight: VecDeque::new(),
            closes: Vec::new(),
            accepted: 0,
        }
    }
}

/// A registration over `existing` that leaves no refresh mark closes the
/// device's open refresh job.
fn closes_a_job(existing: Option<&DeviceRecord>, record: &DeviceRecord) -> bool {
    existing.is_some_and(|e| e.refresh.is_some() && record.refresh.is_none())
}

/// A bulk registration in progress. An import slows down rather than fails
/// when the store's queue is full.
pub struct Import {
    registrar: Arc<Registrar>,
    chunk_lines: usize,
    inflight_max: usize,
    chunk: Vec<Mutation>,
    /// Submitted chunks awaiting their sync, with their sizes.
    inflight: VecDeque<(Ticket, u64)>,
    /// Devices whose new channel URI closes an open refresh job, told to
    /// the lifecycle once everything is durable.
    closes: Vec<DeviceId>,
    accepted: u64,
}

impl Import {
    /// Registrations durable so far.
    pub fn accepted(&self) -> u64 {
        self.accepted
    }

    /// Adds one registration at `now`; it is durable once a later call
    /// says so through [`Import::accepted`].
    pub async fn add(&mut self, reg: Registration, now: UnixTime) -> Result<(), WriteError> {
        let r = &self.registrar;
        let existing = r.registry.get(reg.device_id.as_str());
        let rec = merge_registration(existing.as_ref(), reg, now);
        if closes_a_job(existing.as_ref(), &rec) {
            self.closes.push(rec.device_id.clone());
        }
        r.lifecycle.registered_aged(&rec, now);
        self.chunk.push(Mutation::Put(rec));
        if self.chunk.len() >= self.chunk_lines {
            self.flush().await?;
        }
        Ok(())
    }

    /// Hands the current chunk to the store, waiting for room when the
    /// store's queue is full.
    pub async fn flush(&mut self) -> Result<(), WriteError> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::take(&mut self.chunk);
        let n = chunk.len() as u64;
        let mut pending = Some(chunk);
        while let Some(chunk) = pending.take() {
            match self.registrar.commits.try_submit_bulk(chunk) {
                Ok(ticket) => self.inflight.push_back((ticket, n)),
                Err((SubmitError::Overloaded, chunk)) => {
                    pending = Some(chunk);
                    if !self.settle_oldest().await? {
                        tokio::time::sleep(FULL_QUEUE_RETRY).await;
                    }
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
        while self.inflight.len() > self.inflight_max {
            self.settle_oldest().await?;
        }
        Ok(())
    }

    /// Waits for the oldest submission to be durable. False when none was
    /// in flight.
    pub async fn settle_oldest(&mut self) -> Result<bool, WriteError> {
        let Some((ticket, n)) = self.inflight.pop_front() else {
            return Ok(false);
        };
        ticket.await?;
        self.accepted += n;
        Ok(true)
    }

    /// Makes everything added durable, then closes the refresh jobs the new
    /// channels end. Returns how many registrations are durable.
    pub async fn finish(&mut self, now: UnixTime) -> Result<u64, WriteError> {
        self.flush().await?;
        while self.settle_oldest().await? {}
        for id in std::mem::take(&mut self.closes) {
            self.registrar.lifecycle.registered(id.as_str(), now).await;
        }
        Ok(self.accepted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::DeadReason;
    use crate::testing::{registration, Services};

    fn registrar(s: &Services) -> Arc<Registrar> {
        Arc::new(Registrar::new(
            s.registry.clone(),
            s.commits.clone(),
            s.lifecycle.clone(),
        ))
    }

    #[tokio::test]
    async fn a_registration_is_durable_when_answered_and_idempotent() {
        let s = Services::new();
        let r = registrar(&s);
        let now = crate::clock::now();
        let first = r
            .register(registration("dev-1", "AwYAAAD1"), now)
            .await
            .unwrap();
        assert!(first.created);
        assert_eq!(s.registry.get("dev-1").unwrap(), first.record);
        let later = UnixTime(now.0 + 60);
        let again = r
            .register(registration("dev-1", "AwYAAAD1"), later)
            .await
            .unwrap();
        assert!(!again.created);
        assert_eq!(again.record.issued_at, now, "same channel: same life");
        let fresh = r
            .register(registration("dev-1", "AwYAAAD2"), later)
            .await
            .unwrap();
        assert_eq!(fresh.record.issued_at, later, "new channel: new life");
    }

    #[tokio::test]
    async fn a_new_channel_closes_the_open_refresh_job() {
        let s = Services::new();
        let r = registrar(&s);
        let now = crate::clock::now();
        let rec = r
            .register(registration("dev-1", "AwYAAAD1"), now)
            .await
            .unwrap()
            .record;
        s.lifecycle
            .channel_dead(&rec, DeadReason::Wns410, now)
            .await;
        assert!(s.lifecycle.job_of("dev-1").is_some());
        // The dead channel reported again keeps its job.
        r.register(registration("dev-1", "AwYAAAD1"), now)
            .await
            .unwrap();
        assert!(s.lifecycle.job_of("dev-1").is_some());
        let fresh = r
            .register(registration("dev-1", "AwYAAAD2"), now)
            .await
            .unwrap();
        assert!(fresh.record.refresh.is_none() && fresh.record.dead.is_none());
        assert!(s.lifecycle.job_of("dev-1").is_none(), "job closed");
    }

    #[tokio::test]
    async fn removal_is_durable_and_says_whether_there_was_a_device() {
        let s = Services::new();
        let r = registrar(&s);
        let now = crate::clock::now();
        r.register(registration("dev-1", "AwYAAAD1"), now)
            .await
            .unwrap();
        let id = DeviceId::parse("dev-1").unwrap();
        assert!(r.remove(&id, now).await.unwrap());
        assert!(s.registry.get("dev-1").is_none());
        assert!(!r.remove(&id, now).await.unwrap());
    }

    #[tokio::test]
    async fn an_import_stores_every_chunk_and_closes_jobs_at_the_end() {
        let s = Services::new();
        let r = registrar(&s);
        let now = crate::clock::now();
        let rec = r
            .register(registration("dev-0", "AwYAAAD0"), now)
            .await
            .unwrap()
            .record;
        s.lifecycle
            .channel_dead(&rec, DeadReason::Wns404, now)
            .await;
        let mut import = r.import(100, 2);
        for i in 0..1050 {
            let token = format!("AwYAAAE{i}");
            import
                .add(registration(&format!("dev-{i}"), &token), now)
                .await
                .unwrap();
            // Never more than the bound of chunks awaiting their sync.
            assert!(import.inflight.len() <= 2);
        }
        assert!(import.accepted() >= 800, "earlier chunks are durable");
        assert!(
            s.lifecycle.job_of("dev-0").is_some(),
            "closed only at the end"
        );
        assert_eq!(import.finish(now).await.unwrap(), 1050);
        assert_eq!(s.registry.len(), 1050);
        assert!(s.lifecycle.job_of("dev-0").is_none());
    }
}
