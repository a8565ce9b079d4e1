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
pub mod bulk_jobs;
pub mod codec;
pub mod committer;
pub mod fjall_store;
pub mod frame;
pub mod job_codec;
pub mod log_store;
pub mod segments;
pub mod snapshot;

pub use committer::{
    CommitHandle, Committer, CommitterConfig, CommitterJoin, OnDurable, SubmitError, Ticket,
};
pub use fjall_store::{FjallOptions, FjallStore};
pub use log_store::{LogOptions, LogStore};

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
    /// The batch touched a partition this node may no longer write: another
    /// node writes it now (cluster mode). Nothing of the batch is answered
    /// as done.
    #[error("{0}")]
    NotOwner(String),
    /// Stored data that does not check out, where it is not a torn tail.
    #[error("{file}: damaged at byte {offset}: {why}")]
    Damaged {
        file: String,
        offset: u64,
        why: String,
    },
}

/// The strings compact records refer to by id: PFNs, provider ids and
/// channel URI prefixes, each list in id order.
pub type Dictionary = [Vec<String>; 3];

/// What a backend cuts snapshots from: the registry, in memory, in its own
/// encoding.
pub trait SnapshotSource: Send + Sync {
    /// Appends every record of partition `part` to `out`, each as its
    /// LEB128 length and then its bytes; returns how many.
    fn encoded_partition(&self, part: u16, out: &mut Vec<u8>) -> u64;
    /// The dictionary the records refer to; read after the records, it
    /// covers every one of them.
    fn dictionary(&self) -> Dictionary;
}

/// What a backend cuts snapshots' refresh jobs from: the refresh queue,
/// which holds every open job in memory.
///
/// A job the queue holds is written even if its own mutation is not yet
/// durable: it is in a batch after the snapshot's replay point, or it was
/// never made durable and the queue had moved on from the store already
/// (a job opened for a device that changed meanwhile is closed when it is
/// next handed out, as after any restart).
pub trait JobSource: Send + Sync {
    /// Visits every open job. Must not hold a lock the committer needs
    /// while `visit` runs: a snapshot paces its writes inside it.
    fn jobs(&self, visit: &mut dyn FnMut(&Job));
}

/// Where loading puts the durable state: the registry.
pub trait Restore: Sync {
    /// Called first, once, with the dictionary of the snapshot's records.
    fn seed(&self, dictionary: &Dictionary) -> Result<(), String>;
    /// The records of partition `part` as [`SnapshotSource::encoded_partition`]
    /// wrote them, `count` of them. May be called from several threads at
    /// once, for different partitions.
    fn restore_partition(&self, part: u16, records: &[u8], count: u64) -> Result<u64, String>;
    /// Called once every partition of the snapshot is restored, before the
    /// log is replayed: what was gathered over all partitions is put in
    /// place.
    fn snapshot_restored(&self) {}
    /// A device written after the snapshot (log replay).
    fn put(&self, rec: &DeviceRecord);
    /// A device deleted after the snapshot (log replay).
    fn delete(&self, id: &DeviceId);
}

/// Where a partition is served, as this node knows it (cluster mode moves
/// partitions between nodes; the embedded store serves every one here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Here.
    Local,
    /// On another node, whose API is at `url`.
    Remote { node: String, url: String },
    /// Nowhere just now: it is being taken over, or this node's hold on it
    /// is in doubt. Callers answer 503 and retry.
    Unavailable,
}

/// Where a backend that moves partitions in and out while running puts
/// them: the registry and the refresh queue.
pub trait PartitionHost: Send + Sync {
    /// The registry, to load a partition taken over into.
    fn as_restore(&self) -> &dyn Restore;
    /// The refresh jobs of the partitions taken over.
    fn adopt_jobs(&self, jobs: Vec<Job>);
    /// Forgets partition `part`'s devices and jobs in memory (it moved to
    /// another node); nothing is written.
    fn drop_partition(&self, part: u16);
}

/// What loading found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Loaded {
    /// Devices read from the snapshot.
    pub snapshot_records: u64,
    /// Log batches replayed after it, and the mutations in them.
    pub replayed_batches: u64,
    pub replayed_mutations: u64,
    /// Seconds spent loading the snapshot, and replaying the log after it.
    pub snapshot_seconds: f64,
    pub replay_seconds: f64,
}

/// The narrow interface every durable backend implements.
pub trait Store: Send + Sync + 'static {
    /// Applies `batch` atomically, in order, and returns once it is durable
    /// (synced to stable storage). An empty batch only syncs.
    ///
    /// Only the [`Committer`] thread calls this: it is the one place that
    /// may block on a sync.
    fn apply(&self, batch: &[Mutation]) -> Result<(), StoreError>;

    /// Loads every stored device into `into`, using up to `threads`
    /// threads. Called once, at start, before any `apply`.
    fn load(&self, threads: usize, into: &dyn Restore) -> Result<Loaded, StoreError>;

    /// About how many records the store holds (cheap; used to size the
    /// registry before recovery). The provided implementation says 0.
    fn approximate_len(&self) -> usize {
        0
    }

    /// How the stored devices are split into partitions, when the data
    /// records it.
    fn partitioning(&self) -> Option<crate::core::Partitioning> {
        None
    }

    /// Gives a backend that cuts snapshots the memory to cut them from:
    /// the devices and the refresh jobs (after `load` and after the jobs
    /// were taken with [`Store::scan_jobs`]). The provided implementation
    /// ignores them.
    fn attach(
        &self,
        devices: std::sync::Arc<dyn SnapshotSource>,
        jobs: std::sync::Arc<dyn JobSource>,
    ) {
        let _ = (devices, jobs);
    }

    /// Cuts a snapshot now and returns once it is durable (for a backup,
    /// or before a planned restart); `None` when the backend cuts none.
    fn snapshot_now(&self) -> Result<Option<snapshot::Written>, StoreError> {
        Ok(None)
    }

    /// Where partition `part` is served. The provided implementation: here.
    fn placement(&self, part: u16) -> Placement {
        let _ = part;
        Placement::Local
    }

    /// The other live nodes that serve partitions of the same data, as
    /// (node id, API address): calls that span the fleet ask them too. The
    /// provided implementation: none.
    fn peers(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// Where this backend keeps bulk wakes shared between nodes, and which
    /// partitions this node owns, when it keeps them. The provided
    /// implementation: nowhere.
    #[allow(clippy::type_complexity)]
    fn job_book(
        &self,
    ) -> Option<(
        std::sync::Arc<dyn crate::core::bulk::JobBook>,
        std::sync::Arc<dyn crate::core::bulk::Owner>,
    )> {
        None
    }

    /// Gives a backend that moves partitions while running the registry
    /// and refresh queue to move them in and out of (held weakly: they hold
    /// the store). The provided implementation ignores it.
    fn attach_host(&self, host: std::sync::Weak<dyn PartitionHost>) {
        let _ = host;
    }

    /// False while writes fail (a full disk): readiness reports it. The
    /// backend probes and turns true again on its own once a write works.
    fn writable(&self) -> bool {
        true
    }

    /// Visits every stored refresh job. Returns the count. A backend that
    /// cuts snapshots hands the loaded jobs over once, at start, and keeps
    /// no copy: the refresh queue holds them from then on, and snapshots
    /// take them from it ([`JobSource`]); later calls visit none.
    fn scan_jobs(&self, visit: &mut dyn FnMut(Job)) -> Result<u64, StoreError>;
}

/// What a backend cuts snapshots from, once attached. The jobs' source (the
/// lifecycle) holds the store, so the store holds it weakly.
pub(crate) struct Sources {
    pub(crate) devices: std::sync::Arc<dyn SnapshotSource>,
    pub(crate) jobs: std::sync::Weak<dyn JobSource>,
}

/// Applies the job mutations of `batch` to `jobs`, in order (loaded jobs
/// follow the log until the refresh queue takes them).
pub(crate) fn apply_jobs(jobs: &mut std::collections::HashMap<u64, Job>, batch: &[Mutation]) {
    for m in batch {
        match m {
            Mutation::PutJob(job) => {
                jobs.insert(job.id, job.clone());
            }
            Mutation::DeleteJob(id) => {
                jobs.remove(id);
            }
            Mutation::Put(_) | Mutation::Delete(_) | Mutation::Guard { .. } => {}
        }
    }
}

/// Hands the jobs loaded at start to `visit`, once ([`Store::scan_jobs`]);
/// nothing is kept.
pub(crate) fn hand_over_jobs(
    loaded: &parking_lot::Mutex<Option<std::collections::HashMap<u64, Job>>>,
    visit: &mut dyn FnMut(Job),
) -> u64 {
    let jobs = loaded.lock().take().unwrap_or_default();
    let n = jobs.len() as u64;
    for job in jobs.into_values() {
        visit(job);
    }
    n
}

/// Starts a backend's background thread `name`; logs, and answers `None`,
/// when it cannot (`what` says what is then not done).
pub(crate) fn spawn_background(
    name: &str,
    what: &str,
    run: impl FnOnce() + Send + 'static,
) -> Option<std::thread::JoinHandle<()>> {
    match std::thread::Builder::new().name(name.into()).spawn(run) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::error!(error = %e, thread = name, "cannot start a thread; {what}");
            None
        }
    }
}

/// Creates and removes a probe file so an unwritable directory fails here,
/// with its path, rather than deep inside a backend.
pub(crate) fn check_writable(dir: &std::path::Path) -> Result<(), StoreError> {
    let probe = dir.join(".wnsgate-write-probe");
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| {
            StoreError::Io(format!(
                "data directory {} is not writable: {e}",
                dir.display()
            ))
        })
}
