//! Durability: every device mutation is on disk before it is acknowledged.
//!
//! Owns: the [`Store`] interface (apply a batch durably; read everything
//! back at start), its embedded fjall implementation, the on-disk record
//! encoding, and the group-commit thread that batches mutations from every
//! shard into one sync.
//! Must not touch: the registry (the committer calls back after a batch is
//! durable), the network. Nothing reads the store after the start:
//! listings, sweeps and bulk wakes read the registry.
//!
//! Files: [`codec`] (record encoding), [`fjall_store`] (the embedded
//! backend), [`committer`] (the group-commit thread, the only caller of
//! [`Store::apply`] and so the only place that syncs). The durable state
//! as partition logs and snapshots is built from
//! [`crate::core::partition`] (which partition a device belongs to, stable
//! across versions and machines), [`frame`] (checksummed frames, and a torn tail told from damage),
//! [`segments`] (an append-only log of frames in segment files that heals
//! after a failed write) and [`batch_codec`] (one committed batch of
//! mutations as one frame's payload).

pub mod batch_codec;
pub mod codec;
pub mod committer;
pub mod fjall_store;
pub mod frame;
pub mod job_codec;
pub mod segments;

pub use committer::{
    CommitHandle, Committer, CommitterConfig, CommitterJoin, OnDurable, SubmitError, Ticket,
};
pub use fjall_store::{FjallOptions, FjallStore};

use crate::core::refresh::{Job, JobId};
use crate::core::{ChannelUri, DeviceId, DeviceRecord};

/// One change to the durable state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    /// Writes a device record.
    Put(DeviceRecord),
    /// Forgets a device.
    Delete(DeviceId),
    /// A precondition, first in a submission: the rest of the submission
    /// applies only if the device's current channel URI is `channel_uri`
    /// (`None`: the device is absent). Otherwise nothing of it applies and
    /// its ticket fails with [`StoreError::Conflict`]. Evaluated by the
    /// committer, the one writer, so no other write can slip in between.
    Guard {
        device_id: DeviceId,
        channel_uri: Option<ChannelUri>,
    },
    /// Writes a refresh job.
    PutJob(Job),
    /// Deletes a refresh job.
    DeleteJob(JobId),
}

/// A store failure. Callers answer 503 and change nothing.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O failed: {0}")]
    Io(String),
    #[error("stored record {key:?} is corrupt: {why}")]
    Corrupt { key: String, why: String },
    /// A [`Mutation::Guard`] did not hold: the device changed meanwhile.
    #[error("device {0} changed meanwhile; nothing was applied")]
    Conflict(String),
}

/// The narrow interface every durable backend implements.
pub trait Store: Send + Sync + 'static {
    /// Applies `batch` atomically, in order, and returns once it is durable
    /// (synced to stable storage). An empty batch only syncs.
    ///
    /// Only the [`Committer`] thread calls this: it is the one place that
    /// may block on a sync.
    fn apply(&self, batch: &[Mutation]) -> Result<(), StoreError>;

    /// Visits every stored record, in any order. Returns the count.
    fn scan_all(&self, visit: &mut dyn FnMut(DeviceRecord)) -> Result<u64, StoreError>;

    /// About how many records the store holds (cheap; used to size the
    /// registry before recovery). The provided implementation says 0.
    fn approximate_len(&self) -> usize {
        0
    }

    /// Visits every stored record using up to `threads` threads, calling
    /// `visit` concurrently from them, in any order. Returns the count.
    ///
    /// This is what recovery uses to load the registry at start (P5 asks
    /// for 10M devices in 10 s). The provided implementation runs
    /// [`Store::scan_all`] on the calling thread; backends that can split
    /// their key space override it.
    fn scan_all_parallel(
        &self,
        threads: usize,
        visit: &(dyn Fn(DeviceRecord) + Sync),
    ) -> Result<u64, StoreError> {
        let _ = threads;
        self.scan_all(&mut |r| visit(r))
    }

    /// Visits every stored refresh job. Returns the count.
    fn scan_jobs(&self, visit: &mut dyn FnMut(Job)) -> Result<u64, StoreError>;
}
