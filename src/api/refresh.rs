//! The refresh queue's API: hand-out at check-in, leases, completion.
//!
//! - `GET /v1/devices/{id}/refresh[?first_cmd_id=N]`: the device opened an
//!   OMA-DM session; answers its PFN-replacement job with the SyncML to put
//!   into that session (`CmdID`s from `first_cmd_id`, default 1), and counts
//!   the hand-out. 404 `no_refresh_job` when the device needs none.
//! - `POST /v1/refresh:lease` `{"max": 1..1000, "lease_seconds": n}`: up to
//!   `max` due jobs, oldest expiry first, within the configured pace and
//!   bound on outstanding jobs; a lease that runs out returns its jobs to
//!   the queue.
//! - `POST /v1/refresh/{job_id}:complete` `{"outcome": "delivered" |
//!   "failed", "status": DMClient Push/Status}`: records what happened.
//! - `GET /v1/refresh/{job_id}`: one open job.

use super::body::{read_limited, require_content_type};
use super::devices::{parse_device_id, unknown_device};
use super::error::{json_error, ApiError};
use super::limits::{LEASE_JOBS_MAX, REFRESH_BODY_BYTES_MAX};
use super::response::{json_response, Resp};
use crate::core::refresh::{CompleteOutcome, Handout, QueueError};
use crate::gateway::Gateway;
use crate::lifecycle::parse_job_id;
use http::{HeaderMap, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

fn no_job(device_id: &str) -> ApiError {
    ApiError::not_found(
        "no_refresh_job",
        format!("device {device_id} has no open refresh job"),
    )
}

fn unknown_job(job_id: &str) -> ApiError {
    ApiError::not_found(
        "unknown_refresh_job",
        format!("no open refresh job {job_id} (it may have closed or given up)"),
    )
}

/// `GET /v1/devices/{id}/refresh`.
pub(crate) async fn check_in(
    gw: Arc<Gateway>,
    device_id: String,
    query: Option<String>,
) -> Result<Resp, ApiError> {
    let id = parse_device_id(&device_id)?;
    let mut first_cmd_id = 1u32;
    for (k, v) in super::query_pairs(query.as_deref().unwrap_or("")) {
        match k.as_str() {
            "first_cmd_id" => {
                first_cmd_id = v.parse().ok().filter(|&n| n >= 1).ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_query",
                        "first_cmd_id must be a positive integer",
                    )
                })?
            }
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!("unknown query parameter {k:?}"),
                ))
            }
        }
    }
    if gw.registry.get(id.as_str()).is_none() {
        return Err(unknown_device(&device_id));
    }
    match gw
        .lifecycle
        .check_in(id.as_str(), first_cmd_id, gw.now())
        .await?
    {
        Some(view) => Ok(json_response(StatusCode::OK, &view)),
        None => Err(no_job(&device_id)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseRequest {
    #[serde(default)]
    max: Option<u32>,
    #[serde(default)]
    lease_seconds: Option<u32>,
}

/// Where a call for refresh job `job_id` is answered in cluster mode: the
/// owner of the partition its id carries (`None`: here).
pub(crate) fn owner_of_job(
    gw: &Gateway,
    job_id: &str,
    headers: &HeaderMap,
) -> Result<Option<String>, ApiError> {
    if gw.settings.cluster.is_none() {
        return Ok(None);
    }
    let Some(id) = parse_job_id(job_id) else {
        return Ok(None);
    };
    let part = crate::core::refresh::partition_of_id(id);
    if part >= gw.registry.partitioning().count() {
        return Ok(None);
    }
    super::forward::owner_of_part(gw, part, headers)
}

/// `POST /v1/refresh:lease`. In cluster mode, jobs due on this node come
/// first, and the other nodes are asked in turn for the rest (each within
/// its share of the pace).
pub(crate) async fn lease(
    gw: Arc<Gateway>,
    headers: HeaderMap,
    mut body: Incoming,
) -> Result<Resp, ApiError> {
    require_content_type(&headers, &["application/json"])?;
    let idle = Duration::from_secs(gw.settings.request_timeout_secs);
    let bytes = read_limited(&mut body, &headers, REFRESH_BODY_BYTES_MAX, idle).await?;
    let req: LeaseRequest = if bytes.is_empty() {
        LeaseRequest {
            max: None,
            lease_seconds: None,
        }
    } else {
        serde_json::from_slice(&bytes).map_err(|e| json_error(&e))?
    };
    let max = req.max.unwrap_or(100);
    if !(1..=LEASE_JOBS_MAX).contains(&max) {
        return Err(ApiError::bad_request(
            "invalid_lease",
            format!("max must be between 1 and {LEASE_JOBS_MAX}"),
        ));
    }
    let policy = &gw.lifecycle.settings().policy;
    if let Some(s) = req.lease_seconds {
        if s == 0 || s > policy.max_lease {
            return Err(ApiError::bad_request(
                "invalid_lease",
                format!(
                    "lease_seconds must be between 1 and {} (refresh.max_lease)",
                    policy.max_lease
                ),
            ));
        }
    }
    let jobs = gw
        .lifecycle
        .lease(max, req.lease_seconds, Handout::Lease, gw.now())
        .await?;
    let mut jobs: Vec<serde_json::Value> = jobs
        .into_iter()
        .map(|j| serde_json::to_value(j).expect("a job serializes"))
        .collect();
    if !headers.contains_key(super::forward::FORWARDED) {
        for (node, url) in gw.store.peers() {
            let want = max as usize - jobs.len();
            if want == 0 {
                break;
            }
            let mut ask = serde_json::json!({ "max": want });
            if let Some(s) = req.lease_seconds {
                ask["lease_seconds"] = s.into();
            }
            let answer = super::forward::post_to(
                &url,
                "/v1/refresh:lease",
                "application/json",
                bytes::Bytes::from(ask.to_string()),
                &headers,
            )
            .await;
            match answer {
                Ok((StatusCode::OK, body)) => {
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    if let Some(more) = v["jobs"].as_array() {
                        jobs.extend(more.iter().take(want).cloned());
                    }
                }
                Ok((status, _)) => {
                    tracing::warn!(node = %node, %status, "a node did not lease its refresh jobs");
                }
                // Its jobs wait for the next lease.
                Err(_) => {}
            }
        }
    }
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "jobs": jobs }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompleteRequest {
    outcome: String,
    #[serde(default)]
    status: Option<u8>,
}

/// `POST /v1/refresh/{job_id}:complete`.
pub(crate) async fn complete(
    gw: Arc<Gateway>,
    job_id: String,
    headers: HeaderMap,
    mut body: Incoming,
) -> Result<Resp, ApiError> {
    let id = parse_job_id(&job_id).ok_or_else(|| unknown_job(&job_id))?;
    require_content_type(&headers, &["application/json"])?;
    let idle = Duration::from_secs(gw.settings.request_timeout_secs);
    let bytes = read_limited(&mut body, &headers, REFRESH_BODY_BYTES_MAX, idle).await?;
    let req: CompleteRequest = serde_json::from_slice(&bytes).map_err(|e| json_error(&e))?;
    let outcome = match req.outcome.as_str() {
        "delivered" => CompleteOutcome::Delivered,
        "failed" => CompleteOutcome::Failed { status: req.status },
        other => {
            return Err(ApiError::unprocessable(
                "invalid_request",
                format!("outcome must be delivered or failed, not {other:?}"),
            ))
        }
    };
    match gw.lifecycle.complete(id, outcome, gw.now()).await? {
        Ok(Some(view)) => Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({ "job": view, "closed": false }),
        )),
        Ok(None) => Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({ "job": null, "closed": true,
                "message": "the job gave up: the device is unreachable" }),
        )),
        Err(QueueError::UnknownJob) if gw.lifecycle.was_closed(id) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "job_closed",
            format!("refresh job {job_id} is already closed (a new channel URI arrived, the device was deleted, or refresh gave up)"),
        )),
        Err(QueueError::UnknownJob) => Err(unknown_job(&job_id)),
        Err(QueueError::NotHandedOut) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_handed_out",
            format!("refresh job {job_id} is queued, not handed out: nothing to complete"),
        )),
    }
}

/// `GET /v1/refresh/{job_id}`.
pub(crate) fn get(gw: &Gateway, job_id: &str) -> Result<Resp, ApiError> {
    let id = parse_job_id(job_id).ok_or_else(|| unknown_job(job_id))?;
    match gw.lifecycle.job(id) {
        Some(view) => Ok(json_response(StatusCode::OK, &view)),
        None => Err(unknown_job(job_id)),
    }
}
