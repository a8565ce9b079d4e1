//! What carries wakes to WNS, as the wake service sees it: one wake sent
//! and followed to its final result, or many driven together by one task.
//!
//! [`WnsSender`] is the transport of a running gateway (TLS, HTTP/2 or
//! HTTP/1.1, tokens, retries). Tests of the wake service put a stand-in in
//! its place, so that coalescing, bulk claims, cancel and outcome recording
//! are tested in-process, with paused time.

use super::WakeReport;
use crate::core::ChannelUri;
use crate::sender::bulk::WakeBatch;
pub use crate::sender::bulk::WakeTarget;
use crate::sender::wake::WnsSender;
use std::future::Future;
use std::sync::Arc;

/// Sends wakes and reports their final results.
pub trait Transport: Send + Sync + 'static {
    /// Many wakes driven by one task.
    type Batch<T: WakeTarget>: Batch<T>;

    /// Sends one wake to `uri` with the credentials of `pfn`, from
    /// `shard`'s connections, and reports its final result.
    fn send_wake(
        &self,
        shard: usize,
        uri: &ChannelUri,
        pfn: &str,
    ) -> impl Future<Output = WakeReport> + Send;

    /// An empty batch sending from `shard`'s connections.
    fn batch<T: WakeTarget>(self: &Arc<Self>, shard: usize) -> Self::Batch<T>;
}

/// Wakes driven together by one task, without a future per wake.
pub trait Batch<T>: Send + 'static {
    /// Starts waking `target`; gives it back when it cannot start before
    /// some of the batch's wakes end (start it again after
    /// [`Batch::finished`] returned).
    fn start(&mut self, target: T) -> Result<(), T>;

    /// Waits until at least one wake has its final result and moves the
    /// results into `out`; returns at once when the batch is empty.
    fn finished(&mut self, out: &mut Vec<(T, WakeReport)>) -> impl Future<Output = ()> + Send;

    /// Wakes started and not yet handed out.
    fn is_empty(&self) -> bool;
}

impl Transport for WnsSender {
    type Batch<T: WakeTarget> = WakeBatch<T>;

    fn send_wake(
        &self,
        shard: usize,
        uri: &ChannelUri,
        pfn: &str,
    ) -> impl Future<Output = WakeReport> + Send {
        self.wake(shard, uri, pfn)
    }

    fn batch<T: WakeTarget>(self: &Arc<Self>, shard: usize) -> Self::Batch<T> {
        WakeBatch::new(self.clone(), shard)
    }
}

impl<T: WakeTarget> Batch<T> for WakeBatch<T> {
    fn start(&mut self, target: T) -> Result<(), T> {
        WakeBatch::start(self, target)
    }

    fn finished(&mut self, out: &mut Vec<(T, WakeReport)>) -> impl Future<Output = ()> + Send {
        WakeBatch::finished(self, out)
    }

    fn is_empty(&self) -> bool {
        WakeBatch::is_empty(self)
    }
}
