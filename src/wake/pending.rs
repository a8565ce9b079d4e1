//! Wakes in flight, one per device: claiming a device's wake, joining the
//! one pending, and ending it with a result or without one.
//!
//! A device has at most one wake in flight. Whoever claims it sends it and
//! must end the [`Claim`] with [`Claim::settle`]; dropping a claim instead
//! (its task was dropped) ends the wake as abandoned. Everyone else joins:
//! they get the same push id and, through [`PendingWake::result`], the same
//! final result.
//!
//! A bulk wake claims millions of devices and almost none is ever joined,
//! so a claim made [quietly](Pending::claim_quietly) makes no place for a
//! result: that place is made when somebody joins.

use super::WakeReport;
use crate::core::DeviceRecord;
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use serde::Serialize;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use tokio::sync::Notify;

/// A push id, `p<hex>-<n>`: formatted only when someone asks for it, so
/// bulk wakes, which never show theirs, do not pay for the text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PushId {
    salt: u32,
    n: u64,
}

impl PushId {
    fn next() -> PushId {
        static SALT: OnceLock<u32> = OnceLock::new();
        static NEXT: AtomicU64 = AtomicU64::new(1);
        PushId {
            salt: *SALT.get_or_init(crate::clock::random::<u32>),
            n: NEXT.fetch_add(1, Ordering::Relaxed),
        }
    }
}

impl fmt::Display for PushId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p{:x}-{}", self.salt, self.n)
    }
}

impl Serialize for PushId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A wake in progress for one device, as a caller holds it.
#[derive(Clone)]
pub struct PendingWake {
    pub push_id: PushId,
    /// Where the result is published. A quiet claim's entry has none until
    /// somebody joins; every handle given out has one.
    slot: Option<Arc<WakeSlot>>,
}

impl PendingWake {
    /// Waits for the final result; `None` if the wake was abandoned.
    pub async fn result(&self) -> Option<&WakeReport> {
        let slot = self.slot.as_ref()?;
        loop {
            // Registered before the check, so a result published in
            // between still wakes this waiter.
            let changed = slot.changed.notified();
            if let Some(r) = slot.report.get() {
                return Some(r);
            }
            if slot.abandoned.load(Ordering::Acquire) {
                return None;
            }
            changed.await;
        }
    }
}

/// Where a wake's final result is published once, for whoever joined.
/// Cheaper than a channel per push: one allocation, and nothing to wake
/// when nobody waits.
#[derive(Default)]
pub(crate) struct WakeSlot {
    report: OnceLock<WakeReport>,
    /// Set when the wake ended without a result.
    abandoned: AtomicBool,
    changed: Notify,
}

impl WakeSlot {
    fn publish(&self, report: WakeReport) {
        let _ = self.report.set(report);
        self.changed.notify_waiters();
    }

    fn abandon(&self) {
        self.abandoned.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }
}

/// Wakes in flight, by device id. Hashed with foldhash: every push inserts
/// and removes an entry, and the ids come from the MDM server, not from
/// the open internet.
#[derive(Default)]
pub(crate) struct Pending {
    wakes: DashMap<String, PendingWake, foldhash::fast::RandomState>,
}

/// How a claim went.
pub(crate) enum Claimed {
    /// The wake is ours to send; the handle is for the caller to wait on.
    Mine(Claim, PendingWake),
    /// One was already pending: the caller joined it.
    Joined(PendingWake),
}

impl Pending {
    /// Wakes in flight.
    pub(crate) fn len(&self) -> usize {
        self.wakes.len()
    }

    /// Claims the wake of `rec`'s device, with a place for its result, or
    /// joins the one pending.
    pub(crate) fn claim(self: &Arc<Self>, rec: DeviceRecord) -> Claimed {
        match self.wakes.entry(rec.device_id.as_str().to_owned()) {
            Entry::Occupied(mut e) => Claimed::Joined(joined(e.get_mut())),
            Entry::Vacant(e) => {
                let pending = e
                    .insert(PendingWake {
                        push_id: PushId::next(),
                        slot: Some(Arc::default()),
                    })
                    .clone();
                Claimed::Mine(self.owned(rec), pending)
            }
        }
    }

    /// Claims the wake of `rec`'s device without a place for its result:
    /// the claim, or the wake already pending (joined).
    pub(crate) fn claim_quietly(self: &Arc<Self>, rec: DeviceRecord) -> Result<Claim, PendingWake> {
        match self.wakes.entry(rec.device_id.as_str().to_owned()) {
            Entry::Occupied(mut e) => Err(joined(e.get_mut())),
            Entry::Vacant(e) => {
                e.insert(PendingWake {
                    push_id: PushId::next(),
                    slot: None,
                });
                Ok(self.owned(rec))
            }
        }
    }

    fn owned(self: &Arc<Self>, rec: DeviceRecord) -> Claim {
        Claim {
            pending: self.clone(),
            rec,
            ended: false,
        }
    }

    /// Removes the device's entry: its slot, if somebody joined.
    fn release(&self, device_id: &str) -> Option<Arc<WakeSlot>> {
        self.wakes.remove(device_id).and_then(|(_, p)| p.slot)
    }
}

/// A handle on `pending` for someone joining it.
fn joined(pending: &mut PendingWake) -> PendingWake {
    pending.slot.get_or_insert_with(Arc::default);
    pending.clone()
}

/// A device's wake, claimed: nobody else sends it until this ends.
/// Dropping it unsettled ends the wake as abandoned.
pub(crate) struct Claim {
    pending: Arc<Pending>,
    rec: DeviceRecord,
    ended: bool,
}

/// A settled wake's result: published to whoever joined, or kept here.
pub(crate) enum Settled {
    Published(Arc<WakeSlot>),
    Kept(WakeReport),
}

impl Settled {
    pub(crate) fn report(&self) -> &WakeReport {
        match self {
            Settled::Published(slot) => slot.report.get().expect("published before it was kept"),
            Settled::Kept(r) => r,
        }
    }
}

impl Claim {
    /// The device being woken.
    pub(crate) fn record(&self) -> &DeviceRecord {
        &self.rec
    }

    /// Ends the wake with its final result, publishing it to whoever
    /// joined. Only [`super::outcome`] calls this, after the outcome is
    /// kept and a dead channel marked.
    pub(super) fn settle(mut self, report: WakeReport) -> Settled {
        self.ended = true;
        match self.pending.release(self.rec.device_id.as_str()) {
            Some(slot) => {
                slot.publish(report);
                Settled::Published(slot)
            }
            None => Settled::Kept(report),
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.ended {
            if let Some(slot) = self.pending.release(self.rec.device_id.as_str()) {
                slot.abandon();
            }
        }
    }
}
