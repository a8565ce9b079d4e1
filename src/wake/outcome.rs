//! What a finished wake leaves behind, written once for single wakes, bulk
//! wakes and nudges alike: the outcome kept on the device (its last push),
//! a dead channel marked and its refresh job opened, and only then the
//! result published to whoever joined.
//!
//! The rule this module exists for: **a dead channel's mark is durable
//! before its result is published.** A caller that reads `channel_dead`
//! from a `?wait=true` push, or from a bulk wake's progress, finds the
//! device already `refresh_pending` with its job, even after a crash.

use super::pending::{Claim, Settled};
use super::transport::Transport;
use super::{WakeReport, WakeService};
use crate::core::wns::PushResult;
use crate::registry::{DeviceKey, LastPush};

/// The outcome of a wake as the device record keeps it.
pub(crate) fn last_push(report: &WakeReport) -> LastPush {
    LastPush::new(
        report.at,
        report.result,
        report.wns_outcome.as_ref(),
        report.status,
    )
}

/// Something that holds a claimed wake, and gives it up to be settled
/// with what its caller keeps beside it (its tag).
pub(crate) trait HoldsClaim {
    type Tag;
    fn claim(&self) -> &Claim;
    fn into_parts(self) -> (Claim, Self::Tag);
}

impl HoldsClaim for Claim {
    type Tag = ();

    fn claim(&self) -> &Claim {
        self
    }

    fn into_parts(self) -> (Claim, ()) {
        (self, ())
    }
}

impl<S: Transport> WakeService<S> {
    /// Ends a claimed wake with its final result: the outcome kept on the
    /// device, the channel marked dead durably if WNS said so (unless the
    /// device registered a new channel meanwhile), then the result
    /// published.
    pub(crate) async fn conclude(&self, claim: Claim, report: WakeReport) -> Settled {
        let rec = claim.record();
        self.registry
            .record_push(rec.device_id.as_str(), last_push(&report));
        if let Some(reason) = report.dead {
            // Boxed: a durable store write is a large future, and every
            // wake in flight would otherwise carry it inline.
            Box::pin(
                self.lifecycle
                    .channel_dead(rec, reason, crate::clock::now()),
            )
            .await;
        }
        claim.settle(report)
    }

    /// Ends many wakes at once (a bulk wake's drain of answers). The
    /// outcomes of live channels are kept together
    /// ([`crate::registry::Registry::record_pushes`], which overlaps the
    /// lookups' cache misses) and their results handed to `settled` at
    /// once, with the wake's tag and the device id when the wake did not
    /// end `received`.
    /// Wakes whose channel WNS declared dead are left in `results`,
    /// for [`WakeService::conclude`]: their mark must be durable first.
    pub(crate) fn conclude_live<C: HoldsClaim>(
        &self,
        results: &mut Vec<(C, WakeReport)>,
        scratch: &mut Vec<(DeviceKey, LastPush)>,
        mut settled: impl FnMut(C::Tag, Option<&str>, Settled),
    ) {
        scratch.clear();
        scratch.extend(
            results
                .iter()
                .filter(|(_, r)| r.dead.is_none())
                .filter_map(|(c, r)| {
                    let id = c.claim().record().device_id.as_str();
                    Some((self.registry.key(id)?, last_push(r)))
                }),
        );
        self.registry.record_pushes(scratch);
        let mut i = 0;
        while i < results.len() {
            if results[i].1.dead.is_some() {
                i += 1;
                continue;
            }
            let (c, report) = results.swap_remove(i);
            let (claim, tag) = c.into_parts();
            // The id is copied only for a wake that did not end `received`:
            // the one case its caller keeps it.
            let id =
                (report.result != PushResult::Delivered).then(|| claim.record().device_id.clone());
            settled(tag, id.as_ref().map(|id| id.as_str()), claim.settle(report));
        }
    }
}
