//! Waking devices: everything between "wake this device" (or these
//! devices) and the result kept on the device.
//!
//! Owns:
//! - wakes in flight and their coalescing: one wake per device at a time,
//!   every other caller joins it ([`pending`]);
//! - single wakes ([`WakeService::start_or_join`]);
//! - bulk wakes: selection, dealing pages to the shards, per-shard sending,
//!   pace, cancel, progress and limits ([`bulk`], [`send`], [`job`],
//!   [`limits`]);
//! - nudges, the wakes the lifecycle asks for ([`nudge`]);
//! - what a finished wake leaves behind, written once for all three
//!   ([`outcome`]): the last push, a dead channel's durable mark and its
//!   refresh job, then the published result.
//!
//! Must not touch: HTTP types or the [`Gateway`](crate::gateway::Gateway)
//! (the API calls in here; nothing here calls out to it), sockets (the
//! [sender](crate::sender) moves the bytes), the clock other than through
//! [`crate::clock`].

pub mod bulk;
pub mod job;
pub mod limits;
pub mod nudge;
mod outcome;
pub mod pending;
mod send;
#[cfg(test)]
mod tests;
pub mod transport;
mod walk;

pub use crate::sender::wake::WakeReport;
pub use bulk::{Attached, Selection, StartError};
pub use job::{Job, JobState, Progress};
pub use pending::{PendingWake, PushId};

use crate::core::{DeviceRecord, Thresholds};
use crate::lifecycle::Lifecycle;
use crate::registry::Registry;
use crate::sender::wake::WnsSender;
use dashmap::DashMap;
use pending::{Claimed, Pending};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::runtime::Handle;
use tokio_util::task::TaskTracker;
use transport::Transport;

/// The wake service shared by every shard, sending through `S` (WNS, in a
/// running gateway).
pub struct WakeService<S = WnsSender> {
    sender: Arc<S>,
    registry: Arc<Registry>,
    lifecycle: Arc<Lifecycle>,
    thresholds: Thresholds,
    pending: Arc<Pending>,
    /// Bulk wakes, running and recently finished.
    jobs: DashMap<String, Arc<Job>>,
    /// Each shard's runtime, registered as the shard starts: where bulk
    /// wakes deal their pages so every shard sends.
    shard_runtimes: Vec<OnceLock<Handle>>,
    /// Held by every task that has wakes in flight: shutdown waits for it
    /// to empty.
    inflight: TaskTracker,
    /// Where bulk wakes are kept durably, and how often a running one is
    /// checkpointed; none in in-process tests.
    book: OnceLock<bulk::Attached>,
}

impl<S: Transport> WakeService<S> {
    /// A service sending through `sender` from up to `shards` shards.
    pub fn new(
        sender: Arc<S>,
        registry: Arc<Registry>,
        lifecycle: Arc<Lifecycle>,
        thresholds: Thresholds,
        shards: usize,
    ) -> WakeService<S> {
        WakeService {
            sender,
            registry,
            lifecycle,
            thresholds,
            pending: Arc::default(),
            jobs: DashMap::new(),
            shard_runtimes: (0..shards).map(|_| OnceLock::new()).collect(),
            inflight: TaskTracker::new(),
            book: OnceLock::new(),
        }
    }

    /// Registers `rt` as the runtime of `shard`; each shard does it once,
    /// as it starts, before it accepts a connection.
    pub fn register_shard_runtime(&self, shard: usize, rt: Handle) {
        let slot = &self.shard_runtimes[shard];
        assert!(slot.set(rt).is_ok(), "shard {shard} registered twice");
    }

    /// Shard `shard`'s runtime, once registered.
    pub fn shard_runtime(&self, shard: usize) -> Option<Handle> {
        self.shard_runtimes.get(shard)?.get().cloned()
    }

    /// The shards whose runtime is registered, with their handles.
    fn shard_runtimes(&self) -> Vec<(usize, Handle)> {
        self.shard_runtimes
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.get().map(|h| (i, h.clone())))
            .collect()
    }

    /// Wakes `rec`'s device from `shard`'s WNS connections, on the calling
    /// runtime, or joins the wake already pending for it. The flag says
    /// whether it joined (coalesced).
    pub fn start_or_join(self: &Arc<Self>, shard: usize, rec: DeviceRecord) -> (PendingWake, bool) {
        match self.pending.claim(rec) {
            Claimed::Joined(pending) => (pending, true),
            Claimed::Mine(claim, pending) => {
                let (me, inflight) = (self.clone(), self.inflight.token());
                tokio::spawn(async move {
                    let report = {
                        let rec = claim.record();
                        me.sender
                            .send_wake(shard, &rec.channel_uri, rec.pfn.as_str())
                            .await
                    };
                    me.conclude(claim, report).await;
                    drop(inflight);
                });
                (pending, false)
            }
        }
    }

    /// The transport wakes go through.
    pub fn sender(&self) -> &Arc<S> {
        &self.sender
    }

    /// Wakes in flight now, single and bulk.
    pub fn inflight(&self) -> usize {
        self.pending.len()
    }

    /// Waits, at most `budget`, until every task with wakes in flight has
    /// ended; new wakes may still start (a caller stops its producers
    /// first). Returns whether they all ended.
    pub async fn drain(&self, budget: Duration) -> bool {
        self.inflight.close();
        tokio::time::timeout(budget, self.inflight.wait())
            .await
            .is_ok()
    }
}
