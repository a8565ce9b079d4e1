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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

/// A wake in progress for one device.
#[derive(Clone)]
pub struct PendingWake {
    pub push_id: String,
    result: watch::Receiver<Option<Arc<WakeReport>>>,
}

#[derive(Serialize)]
struct Accepted<'a> {
    push_id: &'a str,
    device_id: &'a str,
    /// True when this request joined a wake already pending.
    coalesced: bool,
}

#[derive(Serialize)]
struct Finished<'a> {
    push_id: &'a str,
    device_id: &'a str,
    coalesced: bool,
    #[serde(flatten)]
    report: &'a WakeReport,
}

fn next_push_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("p{:x}-{n}", rand::random::<u32>())
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
                push_id: &pending.push_id,
                device_id: id.as_str(),
                coalesced,
            },
        ));
    }
    let mut rx = pending.result.clone();
    let report = loop {
        if let Some(r) = rx.borrow_and_update().clone() {
            break r;
        }
        if rx.changed().await.is_err() {
            return Err(ApiError::unavailable(
                "push_abandoned",
                "the wake-up was abandoned (shutting down)",
            ));
        }
    };
    Ok(json_response(
        StatusCode::OK,
        &Finished {
            push_id: &pending.push_id,
            device_id: id.as_str(),
            coalesced,
            report: &report,
        },
    ))
}

impl PendingWake {
    /// Waits for the final result; `None` if the wake was abandoned.
    pub async fn result(&self) -> Option<Arc<WakeReport>> {
        let mut rx = self.result.clone();
        loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                return Some(r);
            }
            rx.changed().await.ok()?;
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
    use dashmap::mapref::entry::Entry;
    let key = record.device_id.as_str().to_owned();
    let pending = match gw.pending_wakes.entry(key.clone()) {
        Entry::Occupied(e) => {
            let pending = e.get().clone();
            drop(e);
            if let Some(done) = on_done {
                let joined = pending.clone();
                tokio::spawn(async move { done(joined.result().await.as_deref()) });
            }
            return (pending, true);
        }
        Entry::Vacant(e) => {
            let (tx, rx) = watch::channel(None);
            let pending = PendingWake {
                push_id: next_push_id(),
                result: rx,
            };
            e.insert(pending.clone());
            (pending, tx)
        }
    };
    let (pending, tx) = pending;
    let gw = gw.clone();
    tokio::spawn(async move {
        let report = gw
            .sender
            .wake(shard, &record.channel_uri, record.pfn.as_str(), || gw.now())
            .await;
        record_push(&gw, &record, &report);
        if let Some(reason) = report.dead {
            mark_dead(&gw, &record, reason).await;
        }
        gw.pending_wakes.remove(&key);
        if let Some(done) = on_done {
            done(Some(&report));
        }
        let _ = tx.send(Some(Arc::new(report)));
    });
    (pending, false)
}

/// Keeps the outcome on the device (in memory, in place).
fn record_push(gw: &Gateway, record: &DeviceRecord, report: &WakeReport) {
    use super::view::{label_code, PUSH_RESULTS, WNS_OUTCOMES};
    gw.registry.record_push(
        record.device_id.as_str(),
        crate::registry::LastPush {
            at: gw.now(),
            result: label_code(PUSH_RESULTS, report.result),
            outcome: report
                .wns_outcome
                .map_or(0, |o| label_code(WNS_OUTCOMES, o)),
            status: report.status.unwrap_or(0),
        },
    );
}

/// Marks the channel dead and opens its refresh job, durably, unless the
/// device registered a new channel URI meanwhile.
async fn mark_dead(gw: &Gateway, pushed: &DeviceRecord, reason: crate::core::DeadReason) {
    gw.lifecycle.channel_dead(pushed, reason, gw.now()).await;
}
