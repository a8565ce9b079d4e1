//! `POST /v1/devices/{id}/push[?wait=true]`: wake one device.
//!
//! A wake already pending for the device is joined: the caller gets the
//! same push id (and, with `?wait=true`, the same final result). See
//! [`crate::wake`] for what a wake does.

use super::devices::{parse_device_id, unknown_device};
use super::error::ApiError;
use super::response::{json_response, Resp};
use super::view::ReportView;
use crate::gateway::Gateway;
use crate::wake::PushId;
use http::StatusCode;
use serde::Serialize;
use std::sync::Arc;

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
    report: ReportView<'a>,
}

/// `POST /v1/devices/{id}/push[?wait=true]`.
pub(crate) async fn push_device(
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
    let (pending, coalesced) = gw.wakes.start_or_join(shard, record);
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
