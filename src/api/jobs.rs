//! Bulk wakes: `POST /v1/pushes`, `GET /v1/pushes`, `GET /v1/pushes/{id}`,
//! `GET /v1/pushes/{id}/failures`, `DELETE /v1/pushes/{id}`: the request,
//! its checks, the progress and the failed devices as JSON. The job itself runs in [`crate::wake::bulk`].

use super::body::{read_limited, require_content_type};
use super::devices::parse_device_id;
use super::error::{json_error, ApiError};
use super::limits::JOB_BODY_BYTES_MAX;
use super::response::{json_response, Resp};
use crate::core::LifecycleState;
use crate::gateway::Gateway;
use crate::wake::limits::JOB_IDS_MAX;

/// Failures per page when no `limit` is given.
const FAILURES_PAGE_DEFAULT: usize = 100;
/// Largest `limit` of a failures page.
const FAILURES_PAGE_MAX: usize = 1000;
use crate::wake::{Job, Selection, StartError};
use http::{HeaderMap, StatusCode};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobRequest {
    #[serde(default)]
    device_ids: Option<Vec<String>>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    all: Option<bool>,
    #[serde(default)]
    rate_per_second: Option<u32>,
    /// Wake devices whose channel WNS declared dead (404, 410) too.
    #[serde(default)]
    include_dead: bool,
}

#[derive(Serialize)]
struct JobView<'a> {
    job_id: &'a str,
    state: &'static str,
    created_at: &'a str,
    rate_per_second: Option<u32>,
    include_dead: bool,
    /// Devices in the selection when the job started, known up front.
    expected_total: u64,
    /// Devices selected so far (final once `state` is not `selecting`).
    total: u64,
    pending: u64,
    received: u64,
    dropped: u64,
    throttled: u64,
    expired: u64,
    failed: u64,
    not_sent: u64,
    skipped_dead: u64,
    done: u64,
    /// Every device is selected: `total` is final.
    selection_done: bool,
}

fn view(gw: &Gateway, job: &Job) -> Resp {
    json_response(StatusCode::OK, &job_view(gw, job))
}

/// A job as the API shows it: in cluster mode with every node's share.
fn job_view<'a>(gw: &Gateway, job: &'a Job) -> JobView<'a> {
    let p = gw.wakes.progress(job);
    JobView {
        job_id: job.id(),
        state: p.state.as_str(),
        created_at: job.created_at(),
        rate_per_second: job.rate_per_second(),
        include_dead: job.include_dead(),
        expected_total: job.expected_total(),
        total: p.total,
        pending: p.pending,
        received: p.received,
        dropped: p.dropped,
        throttled: p.throttled,
        expired: p.expired,
        failed: p.failed,
        not_sent: p.not_sent,
        skipped_dead: p.skipped_dead,
        done: p.done,
        selection_done: job.selection_done(),
    }
}

/// `GET /v1/pushes`: every bulk wake running or remembered, newest first.
pub(crate) fn list(gw: &Gateway) -> Resp {
    let jobs = gw.wakes.jobs();
    let views: Vec<JobView<'_>> = jobs.iter().map(|j| job_view(gw, j)).collect();
    json_response(StatusCode::OK, &serde_json::json!({ "jobs": views }))
}

/// `POST /v1/pushes`.
pub(crate) async fn create(
    gw: Arc<Gateway>,
    shard: usize,
    headers: HeaderMap,
    mut body: Incoming,
) -> Result<Resp, ApiError> {
    require_content_type(&headers, &["application/json"])?;
    let idle = Duration::from_secs(gw.settings.request_timeout_secs);
    let bytes = read_limited(&mut body, &headers, JOB_BODY_BYTES_MAX, idle).await?;
    let req: JobRequest = serde_json::from_slice(&bytes).map_err(|e| json_error(&e))?;
    let selection = match (req.device_ids, req.state, req.all) {
        (Some(ids), None, None | Some(false)) => {
            if ids.is_empty() {
                return Err(ApiError::unprocessable("empty_job", "device_ids is empty"));
            }
            if ids.len() > JOB_IDS_MAX {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "job_too_large",
                    format!("a job may list at most {JOB_IDS_MAX} device ids; use \"state\" or \"all\" for more"),
                ));
            }
            for id in &ids {
                parse_device_id(id).map_err(|e| {
                    ApiError::unprocessable("invalid_device_id", format!("{id:?}: {}", e.message))
                })?;
            }
            Selection::Ids(ids)
        }
        (None, Some(state), None | Some(false)) => {
            Selection::Filter(Some(LifecycleState::parse(&state).ok_or_else(|| {
                ApiError::unprocessable(
                    "invalid_state",
                    format!(
                        "state must be one of {}",
                        LifecycleState::ALL.map(|s| s.as_str()).join(", ")
                    ),
                )
            })?))
        }
        (None, None, Some(true)) => Selection::Filter(None),
        _ => {
            return Err(ApiError::unprocessable(
                "invalid_selection",
                "give exactly one of \"device_ids\", \"state\" or \"all\": true",
            ))
        }
    };
    if req.rate_per_second == Some(0) {
        return Err(ApiError::unprocessable(
            "invalid_rate",
            "rate_per_second must be positive",
        ));
    }
    // In cluster mode the devices a selection holds are counted on every
    // node; a node that does not answer counts none.
    let elsewhere = match &selection {
        Selection::Filter(state) if !gw.store.peers().is_empty() => {
            let answers = super::forward::ask_peers(&gw, "/v1/stats", &headers).await;
            answers
                .iter()
                .filter_map(|(_, a)| a.as_ref().ok())
                .map(|v| match state {
                    None => v["devices"].as_u64().unwrap_or(0),
                    Some(s) => v["by_state"][s.as_str()].as_u64().unwrap_or(0),
                })
                .sum()
        }
        _ => 0,
    };
    let job = gw
        .wakes
        .start_job(
            shard,
            selection,
            req.rate_per_second,
            req.include_dead,
            elsewhere,
        )
        .await
        .map_err(|e| match e {
            StartError::TooManyJobs => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_jobs",
                e.to_string(),
            ),
            StartError::NotRecorded(_) => ApiError::unavailable("store_unavailable", e.to_string()),
        })?;
    let mut resp = view(&gw, &job);
    *resp.status_mut() = StatusCode::ACCEPTED;
    Ok(resp)
}

/// `GET /v1/pushes/{id}`.
pub(crate) fn get(gw: &Gateway, id: &str) -> Result<Resp, ApiError> {
    let job = gw.wakes.job(id).ok_or_else(|| unknown_job(id))?;
    Ok(view(gw, &job))
}

/// `GET /v1/pushes/{id}/failures?limit=&cursor=`: the devices whose wake
/// did not end `received`, in the order their results came, with how each
/// ended. The cursor is the position to go on from. In cluster mode the
/// nodes are walked in the order of their ids, each node's failures in
/// turn: the cursor is then `<node index>.<position>`.
pub(crate) async fn failures(
    gw: &Gateway,
    id: &str,
    query: Option<String>,
    headers: &HeaderMap,
) -> Result<Resp, ApiError> {
    let job = gw.wakes.job(id).ok_or_else(|| unknown_job(id))?;
    let mut limit = FAILURES_PAGE_DEFAULT;
    let mut cursor: Option<String> = None;
    for (k, v) in super::query_pairs(query.as_deref().unwrap_or("")) {
        match k.as_str() {
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=FAILURES_PAGE_MAX).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "invalid_limit",
                            format!("limit must be 1 to {FAILURES_PAGE_MAX}"),
                        )
                    })?
            }
            "cursor" => cursor = Some(v),
            other => {
                return Err(ApiError::bad_request(
                    "unknown_parameter",
                    format!("unknown query parameter {other:?}"),
                ))
            }
        }
    }
    let bad_cursor =
        || ApiError::bad_request("invalid_cursor", "cursor is not one this gateway returned");
    let peers = gw.store.peers();
    if headers.contains_key(super::forward::FORWARDED) || peers.is_empty() {
        let from = match &cursor {
            Some(c) => c.parse::<usize>().map_err(|_| bad_cursor())?,
            None => 0,
        };
        return Ok(json_response(
            StatusCode::OK,
            &local_failures(&job, from, limit),
        ));
    }
    // Every node, in the order of their ids; `None` is this one.
    let me = gw
        .settings
        .cluster
        .as_ref()
        .map_or_else(String::new, |c| c.node_id.clone());
    let mut nodes: Vec<(String, Option<String>)> = peers
        .into_iter()
        .map(|(node, url)| (node, Some(url)))
        .collect();
    nodes.push((me, None));
    nodes.sort();
    let (node, from) = match &cursor {
        None => (0usize, 0usize),
        Some(c) => {
            let (n, f) = c.split_once('.').ok_or_else(bad_cursor)?;
            (
                n.parse().map_err(|_| bad_cursor())?,
                f.parse().map_err(|_| bad_cursor())?,
            )
        }
    };
    let mut page: Vec<serde_json::Value> = Vec::new();
    let mut not_kept = 0u64;
    let mut next_cursor: Option<String> = None;
    // Every node is asked, for its count of failures not kept; the nodes
    // from the cursor's on fill the page, and the first one with more
    // gives the next cursor.
    for (i, (_, url)) in nodes.iter().enumerate() {
        let filling = i >= node && next_cursor.is_none() && page.len() < limit;
        let want = if filling { limit - page.len() } else { 1 };
        let at = if filling && i == node { from } else { 0 };
        let answer = match url {
            None => local_failures(&job, at, want),
            Some(url) => {
                let path = format!("/v1/pushes/{id}/failures?limit={want}&cursor={at}");
                // A node that does not know the job (yet) has no failures.
                super::forward::get_json(url, &path, headers)
                    .await
                    .unwrap_or_default()
            }
        };
        not_kept += answer["failures_not_kept"].as_u64().unwrap_or(0);
        let got = answer["failures"].as_array().cloned().unwrap_or_default();
        if filling {
            page.extend(got.into_iter().take(want));
            if let Some(next) = answer["next_cursor"].as_str() {
                next_cursor = Some(format!("{i}.{next}"));
            }
        } else if i >= node && next_cursor.is_none() && !got.is_empty() {
            next_cursor = Some(format!("{i}.0"));
        }
    }
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({
            "job_id": job.id(),
            "failures": page,
            "next_cursor": next_cursor,
            "failures_not_kept": not_kept,
        }),
    ))
}

/// This node's page of `job`'s failures: `limit` from position `from`.
fn local_failures(job: &Job, from: usize, limit: usize) -> serde_json::Value {
    let (page, kept, not_kept) = job.failures(from, limit);
    let next = from.saturating_add(page.len());
    serde_json::json!({
        "job_id": job.id(),
        "failures": page,
        "next_cursor": (!page.is_empty() && next < kept).then(|| next.to_string()),
        "failures_not_kept": not_kept,
    })
}

/// `DELETE /v1/pushes/{id}`: stops sending (on every node, in cluster
/// mode); wakes in flight finish. A job that already finished is answered
/// as it is.
pub(crate) async fn cancel(gw: &Gateway, id: &str) -> Result<Resp, ApiError> {
    let job = gw
        .wakes
        .cancel_job(id)
        .await
        .ok_or_else(|| unknown_job(id))?;
    Ok(view(gw, &job))
}

fn unknown_job(id: &str) -> ApiError {
    ApiError::not_found("unknown_job", format!("no bulk wake {id:?}"))
}
