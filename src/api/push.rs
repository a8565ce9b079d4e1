//! `POST /v1/devices/{id}/push`: wake one device.
//!
//! A wake already pending for the device is coalesced: the caller gets the
//! same push id (and, with `?wait=true`, the same final result). A channel
//! WNS declares dead is marked so durably before the result is published.

use super::devices::{parse_device_id, unknown_device};
use super::error::ApiError;
use super::response::{json_response, Resp};
use crate::core::DeviceRecord;
use crate::gateway::Gateway;
use crate::sender::wake::WakeReport;
use http::StatusCode;
use serde::Serialize;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use tokio::sync::Notify;

/// A wake in progress for one device.
#[derive(Clone)]
pub struct PendingWake {
    pub push_id: PushId,
    /// Where the result is published. A bulk wake's claim has none until
    /// somebody joins it (most never are: see [`claim_quietly`]); every
    /// handle given out has one.
    slot: Option<Arc<WakeSlot>>,
}

/// A push id, `p<hex>-<n>`: formatted only when someone asks for it, so
/// bulk wakes, which never show theirs, do not pay for the text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PushId {
    salt: u32,
    n: u64,
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

/// Where a wake's final result is published once, for whoever joined it.
/// Cheaper than a channel per push: one allocation, and nothing to wake
/// when nobody waits (bulk wakes).
#[derive(Default)]
pub struct WakeSlot {
    report: OnceLock<WakeReport>,
    /// Set when the wake ended without a result (its task was dropped).
    abandoned: AtomicBool,
    changed: Notify,
}

/// Publishes a claimed wake's result, or marks the wake abandoned if
/// dropped first.
pub struct Publisher(Arc<WakeSlot>);

impl Publisher {
    fn publish(&self, report: WakeReport) -> &WakeReport {
        let published = self.0.report.get_or_init(|| report);
        self.0.changed.notify_waiters();
        published
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if self.0.report.get().is_none() {
            self.0.abandoned.store(true, Ordering::Release);
            self.0.changed.notify_waiters();
        }
    }
}

#[derive(Serialize)]
struct Accepted<'a> {
    push_id: PushId,
    device_id: &'a str,
    /// True when this request joined a wake already pending.
    coalesced: bool,
}

#[derive(Serialize)]
struct Finished<'a> {
    push_id: PushId,
    device_id: &'a str,
    coalesced: bool,
    #[serde(flatten)]
    report: super::view::ReportView<'a>,
}

fn next_push_id() -> PushId {
    static SALT: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(1);
    PushId {
        salt: *SALT.get_or_init(rand::random::<u32>),
        n: NEXT.fetch_add(1, Ordering::Relaxed),
    }
}

/// `POST /v1/devices/{id}/push[?wait=true]`.
pub async fn push_device(
    gw: Arc<Gateway>,
    shard: usize,
    device_id: String,
    query: Option<String>,
) -> Result<Resp, ApiError> {
    let id = parse_device_id(&device_id)?;
    let mut wait = false;
    for (k, v) in super::query_pairs(query.as_deref().unwrap_or("")) {
        match (k.as_str(), v.as_str()) {
            ("wait", "true" | "1") => wait = true,
            ("wait", "false" | "0") => wait = false,
            ("wait", _) => {
                return Err(ApiError::bad_request(
                    "invalid_wait",
                    "wait must be true or false",
                ))
            }
            (other, _) => {
                return Err(ApiError::bad_request(
                    "unknown_parameter",
                    format!("unknown query parameter {other:?}"),
                ))
            }
        }
    }
    let record = gw
        .registry
        .get(id.as_str())
        .ok_or_else(|| unknown_device(&device_id))?;
    let (pending, coalesced) = join_or_start(&gw, shard, record);
    if !wait {
        return Ok(json_response(
            StatusCode::ACCEPTED,
            &Accepted {
                push_id: pending.push_id,
                device_id: id.as_str(),
                coalesced,
            },
        ));
    }
    let Some(report) = pending.result().await else {
        return Err(ApiError::unavailable(
            "push_abandoned",
            "the wake-up was abandoned (shutting down)",
        ));
    };
    Ok(json_response(
        StatusCode::OK,
        &Finished {
            push_id: pending.push_id,
            device_id: id.as_str(),
            coalesced,
            report: report.into(),
        },
    ))
}

impl PendingWake {
    /// Waits for the final result; `None` if the wake was abandoned.
    pub async fn result(&self) -> Option<&WakeReport> {
        loop {
            // Registered before the check, so a result published in
            // between still wakes this waiter.
            let slot = self.slot.as_ref()?;
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

/// Called once with the final result of a wake.
pub type OnDone = Box<dyn FnOnce(Option<&WakeReport>) + Send>;

/// The pending wake for the device, or a new one started now. The flag
/// says whether it was already pending (coalesced).
pub fn join_or_start(gw: &Arc<Gateway>, shard: usize, record: DeviceRecord) -> (PendingWake, bool) {
    start_or_join(gw, shard, record, None)
}

/// Like [`join_or_start`], and calls `on_done` with the final result: from
/// the task that sends the wake (no extra task) when this call started it,
/// or from a small waiting task when it joined a pending one.
pub fn start_or_join(
    gw: &Arc<Gateway>,
    shard: usize,
    record: DeviceRecord,
    on_done: Option<OnDone>,
) -> (PendingWake, bool) {
    start_or_join_with(gw, shard, record, on_done)
}

/// [`start_or_join`] for any callback type, so a caller with a concrete
/// closure does not box one per push.
pub fn start_or_join_with<F>(
    gw: &Arc<Gateway>,
    shard: usize,
    record: DeviceRecord,
    on_done: Option<F>,
) -> (PendingWake, bool)
where
    F: FnOnce(Option<&WakeReport>) + Send + 'static,
{
    let (pending, wake) = start_or_join_inline(gw, shard, record, on_done);
    let coalesced = wake.is_none();
    if let Some(wake) = wake {
        tokio::spawn(wake);
    }
    (pending, coalesced)
}

/// Like [`start_or_join_with`], but a wake started by this call is
/// returned for the caller to drive (it must be polled to completion;
/// dropping it abandons the wake) instead of running as a task of its own.
/// `None` when the call joined a pending wake (`on_done` then runs from a
/// small waiting task).
pub fn start_or_join_inline<F>(
    gw: &Arc<Gateway>,
    shard: usize,
    record: DeviceRecord,
    on_done: Option<F>,
) -> (
    PendingWake,
    Option<impl Future<Output = ()> + Send + 'static>,
)
where
    F: FnOnce(Option<&WakeReport>) + Send + 'static,
{
    let (pending, publisher) = match claim(gw, record.device_id.as_str()) {
        Claim::Joined(pending) => {
            if let Some(done) = on_done {
                let joined = pending.clone();
                tokio::spawn(async move { done(joined.result().await) });
            }
            return (pending, None);
        }
        Claim::Mine(pending, publisher) => (pending, publisher),
    };
    let gw = gw.clone();
    let wake = async move {
        let report = gw
            .sender
            .wake(shard, &record.channel_uri, record.pfn.as_str(), || gw.now())
            .await;
        let report = conclude(&gw, &record, &publisher, report).await;
        if let Some(done) = on_done {
            done(Some(report));
        }
    };
    (pending, Some(wake))
}

/// Whose wake of a device it is.
pub enum Claim {
    /// Nobody else's: the claimant sends it, then [`conclude`]s it.
    Mine(PendingWake, Publisher),
    /// One is already pending.
    Joined(PendingWake),
}

/// Claims the wake of `device_id`, or joins the one pending.
pub fn claim(gw: &Gateway, device_id: &str) -> Claim {
    use dashmap::mapref::entry::Entry;
    match gw.pending_wakes.entry(device_id.to_owned()) {
        Entry::Occupied(mut e) => Claim::Joined(joined(e.get_mut())),
        Entry::Vacant(e) => {
            let slot = Arc::<WakeSlot>::default();
            let pending = e
                .insert(PendingWake {
                    push_id: next_push_id(),
                    slot: Some(slot.clone()),
                })
                .clone();
            Claim::Mine(pending, Publisher(slot))
        }
    }
}

/// Claims the wake of `device_id` like [`claim`], without preparing for
/// anyone to join it: `None` when claimed, the pending wake when one was
/// already pending. A bulk wake claims millions, and nearly none is ever
/// joined, so the place for the result is made only when somebody joins.
/// A claim made here must end in [`settle`] or [`unclaim`].
pub fn claim_quietly(gw: &Gateway, device_id: &str) -> Option<PendingWake> {
    use dashmap::mapref::entry::Entry;
    match gw.pending_wakes.entry(device_id.to_owned()) {
        Entry::Occupied(mut e) => Some(joined(e.get_mut())),
        Entry::Vacant(e) => {
            e.insert(PendingWake {
                push_id: next_push_id(),
                slot: None,
            });
            None
        }
    }
}

/// A handle on `pending` for someone joining it.
fn joined(pending: &mut PendingWake) -> PendingWake {
    pending.slot.get_or_insert_with(Arc::default);
    pending.clone()
}

/// The result of a wake claimed with [`claim_quietly`], once settled.
pub enum Settled {
    /// Somebody joined: the result is published where they wait.
    Published(Arc<WakeSlot>),
    Kept(WakeReport),
}

impl Settled {
    pub fn report(&self) -> &WakeReport {
        match self {
            Settled::Published(slot) => slot.report.get().expect("published"),
            Settled::Kept(r) => r,
        }
    }
}

/// Ends a wake claimed with [`claim_quietly`] with its final result (kept on
/// the device beforehand, and a dead channel marked), publishing it to
/// whoever joined.
pub fn settle(gw: &Gateway, device_id: &str, report: WakeReport) -> Settled {
    match gw.pending_wakes.remove(device_id).and_then(|(_, p)| p.slot) {
        Some(slot) => {
            Publisher(slot.clone()).publish(report);
            Settled::Published(slot)
        }
        None => Settled::Kept(report),
    }
}

/// Ends a wake claimed with [`claim_quietly`] without a result: whoever
/// joined is told it was abandoned.
pub fn unclaim(gw: &Gateway, device_id: &str) {
    if let Some(slot) = gw.pending_wakes.remove(device_id).and_then(|(_, p)| p.slot) {
        drop(Publisher(slot));
    }
}

/// Ends a claimed wake with its final result: kept on the device, the
/// channel marked dead durably if WNS said so, then published to whoever
/// joined.
pub async fn conclude<'p>(
    gw: &Gateway,
    record: &DeviceRecord,
    publisher: &'p Publisher,
    report: WakeReport,
) -> &'p WakeReport {
    record_push(gw, record, &report);
    if let Some(reason) = report.dead {
        // Boxed: a durable store write is a large future, and every
        // wake in flight would otherwise carry it inline.
        Box::pin(mark_dead(gw, record, reason)).await;
    }
    gw.pending_wakes.remove(record.device_id.as_str());
    publisher.publish(report)
}

/// The outcome of a wake as the device record keeps it.
pub fn last_push(report: &WakeReport) -> crate::registry::LastPush {
    crate::registry::LastPush::new(
        report.at,
        report.result,
        report.wns_outcome.as_ref(),
        report.status,
    )
}

/// Keeps the outcome on the device (in memory, in place).
pub fn record_push(gw: &Gateway, record: &DeviceRecord, report: &WakeReport) {
    gw.registry
        .record_push(record.device_id.as_str(), last_push(report));
}

/// Marks the channel dead and opens its refresh job, durably, unless the
/// device registered a new channel URI meanwhile.
pub async fn mark_dead(gw: &Gateway, pushed: &DeviceRecord, reason: crate::core::DeadReason) {
    gw.lifecycle.channel_dead(pushed, reason, gw.now()).await;
}
