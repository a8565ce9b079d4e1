//! Device endpoints: register, read, delete, list, stats.

use super::body::{read_limited, require_content_type};
use super::error::{json_error, ApiError};
use super::limits::{
    CLOCK_SKEW_SECS_MAX, LIST_PAGE_DEVICES_DEFAULT, LIST_PAGE_DEVICES_MAX,
    LIST_PAGE_SCAN_RECORDS_MAX,
};
use super::response::{json_response, no_content, Resp};
use super::view::DeviceView;
use crate::core::{ChannelUri, DeviceId, LifecycleState, Pfn, ProviderId, Registration, UnixTime};
use crate::gateway::Gateway;
use crate::registration::Registered;
use crate::registry::{Cursor, Marks};
use http::{HeaderMap, StatusCode};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// The body of `PUT /v1/devices/{id}/channel`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChannelBody {
    pub pfn: String,
    pub channel_uri: String,
    #[serde(default)]
    pub issued_at: Option<String>,
    #[serde(default)]
    pub provider_id: Option<String>,
}

/// Validates a registration for `device_id` at `now`.
pub(crate) fn validate_registration(
    gw: &Gateway,
    device_id: &str,
    body: ChannelBody,
    now: UnixTime,
) -> Result<Registration, ApiError> {
    let device_id = parse_device_id(device_id)?;
    let pfn =
        Pfn::parse(&body.pfn).map_err(|e| ApiError::unprocessable("invalid_pfn", e.to_string()))?;
    // A PFN with no [[wns.apps]] entry could never be woken (every wake
    // would end no_credentials): refused when no app is configured too.
    let known = &gw.settings.known_pfns;
    if !known.iter().any(|k| k == pfn.as_str()) {
        let configured = if known.is_empty() {
            "none is configured: add a [[wns.apps]] entry for it".to_owned()
        } else {
            known.join(", ")
        };
        return Err(ApiError::unprocessable(
            "unknown_pfn",
            format!(
                "pfn {} is not one of the configured WNS apps ({configured})",
                pfn.as_str(),
            ),
        ));
    }
    let channel_uri = ChannelUri::parse(&body.channel_uri, &gw.settings.uri_policy)
        .map_err(|e| ApiError::unprocessable("invalid_channel_uri", e.to_string()))?;
    let provider_id = body
        .provider_id
        .as_deref()
        .map(ProviderId::parse)
        .transpose()
        .map_err(|e| ApiError::unprocessable("invalid_provider_id", e.to_string()))?;
    let issued_at = match body.issued_at.as_deref() {
        None => None,
        Some(s) => {
            let t = UnixTime::parse_rfc3339(s).map_err(|e| {
                ApiError::unprocessable("invalid_issued_at", format!("issued_at: {e}"))
            })?;
            if t.secs() > now.secs().saturating_add(CLOCK_SKEW_SECS_MAX) {
                return Err(ApiError::unprocessable(
                    "issued_at_in_future",
                    format!("issued_at {s} is in the future (now is {now})"),
                ));
            }
            Some(t)
        }
    };
    Ok(Registration {
        device_id,
        pfn,
        channel_uri,
        provider_id,
        issued_at,
    })
}

pub(crate) fn parse_device_id(s: &str) -> Result<DeviceId, ApiError> {
    DeviceId::parse(s).map_err(|e| ApiError::bad_request("invalid_device_id", e.to_string()))
}

/// `PUT /v1/devices/{id}/channel`: answers once the record is durable.
pub(crate) async fn put_channel(
    gw: Arc<Gateway>,
    device_id: String,
    headers: HeaderMap,
    mut body: Incoming,
) -> Result<Resp, ApiError> {
    parse_device_id(&device_id)?;
    require_content_type(&headers, &["application/json"])?;
    let idle = Duration::from_secs(gw.settings.request_timeout_secs);
    let bytes = read_limited(&mut body, &headers, gw.settings.max_body_bytes, idle).await?;
    let parsed: ChannelBody = serde_json::from_slice(&bytes).map_err(|e| json_error(&e))?;
    let now = gw.now();
    let reg = validate_registration(&gw, &device_id, parsed, now)?;
    let Registered { record, created } = gw.registrar.register(reg, now).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json_response(
        status,
        &DeviceView::new(&record, &gw.settings.thresholds, now),
    ))
}

/// `GET /v1/devices/{id}`.
pub(crate) fn get_device(gw: &Gateway, device_id: &str) -> Result<Resp, ApiError> {
    parse_device_id(device_id)?;
    let rec = gw
        .registry
        .get(device_id)
        .ok_or_else(|| unknown_device(device_id))?;
    Ok(json_response(
        StatusCode::OK,
        &DeviceView::new(&rec, &gw.settings.thresholds, gw.now())
            .with_push(gw.registry.last_push(device_id))
            .with_job(gw.lifecycle.job_of(device_id)),
    ))
}

/// `DELETE /v1/devices/{id}`: 204 once the removal is durable.
pub(crate) async fn delete_device(gw: Arc<Gateway>, device_id: String) -> Result<Resp, ApiError> {
    let id = parse_device_id(&device_id)?;
    if !gw.registrar.remove(&id, gw.now()).await? {
        return Err(unknown_device(&device_id));
    }
    Ok(no_content())
}

pub(crate) fn unknown_device(device_id: &str) -> ApiError {
    ApiError::not_found(
        "unknown_device",
        format!("no device {device_id:?} is registered"),
    )
}

#[derive(Serialize)]
struct PageView<'a> {
    devices: Vec<DeviceView<'a>>,
    next_cursor: Option<String>,
}

/// `GET /v1/devices?state=&limit=&cursor=`: pages in device-id order.
///
/// In cluster mode the listing walks the partitions in order across the
/// nodes: a run of partitions served here is read from memory, a run
/// served by another node is asked of it (bounded to the run), until the
/// page is full. A page may end early at the end of a run; the cursor
/// goes on from there.
pub(crate) async fn list_devices(
    gw: Arc<Gateway>,
    query: Option<String>,
    headers: &HeaderMap,
) -> Result<Resp, ApiError> {
    let forwarded = headers.contains_key(super::forward::FORWARDED);
    let mut state = None;
    let mut limit = LIST_PAGE_DEVICES_DEFAULT;
    let mut after = None;
    let mut until = usize::from(gw.registry.partitioning().count());
    for (k, v) in super::query_pairs(query.as_deref().unwrap_or("")) {
        match k.as_str() {
            "state" => {
                state = Some(LifecycleState::parse(&v).ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_state",
                        format!(
                            "state must be one of {}",
                            LifecycleState::ALL.map(|s| s.as_str()).join(", ")
                        ),
                    )
                })?)
            }
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=LIST_PAGE_DEVICES_MAX).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "invalid_limit",
                            format!("limit must be 1 to {LIST_PAGE_DEVICES_MAX}"),
                        )
                    })?
            }
            "cursor" => after = Some(decode_cursor(&v)?),
            // A run of partitions another node asks this one for.
            "until" if forwarded => {
                until = v.parse().map_err(|_| {
                    ApiError::bad_request("invalid_parameter", "until is a partition number")
                })?
            }
            other => {
                return Err(ApiError::bad_request(
                    "unknown_parameter",
                    format!("unknown query parameter {other:?}"),
                ))
            }
        }
    }
    if !forwarded && !gw.store.peers().is_empty() {
        return list_across(gw, state, limit, after, headers).await;
    }
    let page = local_page(&gw, state, limit, after, until).await?;
    let th = gw.settings.thresholds;
    let now = gw.now();
    let view = PageView {
        devices: page
            .records
            .iter()
            .map(|r| DeviceView::new(r, &th, now))
            .collect(),
        next_cursor: page.next.as_ref().map(encode_cursor),
    };
    Ok(json_response(StatusCode::OK, &view))
}

/// A page of the devices served here, from `after`, stopping before
/// partition `until`.
async fn local_page(
    gw: &Arc<Gateway>,
    state: Option<LifecycleState>,
    limit: usize,
    after: Option<Cursor>,
    until: usize,
) -> Result<crate::registry::Page, ApiError> {
    let now = gw.now();
    let th = gw.settings.thresholds;
    let registry = gw.registry.clone();
    tokio::task::spawn_blocking(move || {
        let filter = move |m: &Marks| {
            state.is_none_or(|s| {
                th.state_with_refresh(m.issued_at, m.dead, m.refresh, now)
                    .state
                    == s
            })
        };
        match state {
            // Only marked devices can be in these states: read the index
            // of marked devices, not the whole fleet.
            Some(LifecycleState::RefreshPending | LifecycleState::Unreachable) => {
                registry.page_marked_until(after.as_ref(), limit, until, &filter)
            }
            _ => registry.page_until(
                after.as_ref(),
                limit,
                LIST_PAGE_SCAN_RECORDS_MAX,
                until,
                &filter,
            ),
        }
    })
    .await
    .map_err(|_| ApiError::unavailable("internal", "listing task failed"))
}

/// Runs of partitions a listing page reads at most, so one page's
/// latency stays bounded however the partitions interleave.
const LIST_RUNS_PER_PAGE_MAX: usize = 64;

/// A listing page across the cluster's nodes (see [`list_devices`]).
async fn list_across(
    gw: Arc<Gateway>,
    state: Option<LifecycleState>,
    limit: usize,
    after: Option<Cursor>,
    headers: &HeaderMap,
) -> Result<Resp, ApiError> {
    use crate::store::Placement;
    let count = gw.registry.partitioning().count();
    let th = gw.settings.thresholds;
    let now = gw.now();
    let mut cursor = after.unwrap_or_else(|| Cursor::start_of(0));
    let mut devices: Vec<serde_json::Value> = Vec::new();
    let mut next: Option<Cursor> = None;
    for _ in 0..LIST_RUNS_PER_PAGE_MAX {
        let p = cursor.part();
        if p >= count || devices.len() >= limit {
            break;
        }
        let placement = gw.store.placement(p);
        let mut end = p + 1;
        while end < count && gw.store.placement(end) == placement {
            end += 1;
        }
        let want = limit - devices.len();
        let run_next: Option<Cursor> = match placement {
            Placement::Local => {
                let page =
                    local_page(&gw, state, want, Some(cursor.clone()), usize::from(end)).await?;
                devices.extend(page.records.iter().map(|r| {
                    serde_json::to_value(DeviceView::new(r, &th, now)).expect("views serialize")
                }));
                page.next
            }
            Placement::Remote { url, node } => {
                let mut path = format!(
                    "/v1/devices?limit={want}&cursor={}&until={end}",
                    encode_cursor(&cursor)
                );
                if let Some(s) = state {
                    path.push_str(&format!("&state={}", s.as_str()));
                }
                let answer = super::forward::get_json(&url, &path, headers)
                    .await
                    .map_err(|why| {
                        ApiError::unavailable(
                            "owner_unreachable",
                            format!("node {node}, which serves partitions {p} to {}, did not answer: {why}; retry shortly", end - 1),
                        )
                    })?;
                if let Some(list) = answer["devices"].as_array() {
                    devices.extend(list.iter().cloned());
                }
                match answer["next_cursor"].as_str() {
                    Some(c) => Some(decode_cursor(c)?),
                    None => None,
                }
            }
            Placement::Unavailable => {
                return Err(ApiError::unavailable(
                    "partition_unavailable",
                    format!("partition {p} is being taken over; retry shortly"),
                ))
            }
        };
        match run_next {
            // The run is not finished: the page is full inside it.
            Some(c) if c.part() < end => {
                next = Some(c);
                break;
            }
            _ => cursor = Cursor::start_of(end),
        }
    }
    if next.is_none() && cursor.part() < count {
        next = Some(cursor);
    }
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({
            "devices": devices,
            "next_cursor": next.as_ref().map(encode_cursor),
        }),
    ))
}

/// Cursors are the hex of where the listing stopped (a partition and the
/// last id examined in it): opaque to callers, safe in a query string.
fn encode_cursor(c: &Cursor) -> String {
    c.to_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_cursor(s: &str) -> Result<Cursor, ApiError> {
    let bad = || ApiError::bad_request("invalid_cursor", "cursor is not one this gateway returned");
    if !s.len().is_multiple_of(2) || s.len() > 2 * (2 + crate::registry::key::MAX_KEY_LEN) {
        return Err(bad());
    }
    let bytes = (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(bad)?;
    Cursor::from_bytes(&bytes).ok_or_else(bad)
}

/// `POST /v1/store:snapshot`: cuts a snapshot of the durable state now and
/// answers once it is on disk.
pub(super) async fn snapshot(gw: Arc<Gateway>) -> Result<Resp, ApiError> {
    let store = gw.store.clone();
    let started = crate::clock::instant();
    let cut = tokio::task::spawn_blocking(move || store.snapshot_now())
        .await
        .map_err(|_| ApiError::unavailable("internal", "the snapshot task failed"))?
        .map_err(|e| {
            ApiError::unavailable("store_unavailable", format!("the snapshot failed: {e}"))
        })?;
    let Some(cut) = cut else {
        return Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "not_supported",
            "this store backend cuts no snapshots",
        ));
    };
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({
            "devices": cut.records,
            "refresh_jobs": cut.jobs,
            "bytes": cut.bytes,
            "seconds": (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
        }),
    ))
}

#[derive(Serialize)]
struct StatsView {
    devices: u64,
    by_state: std::collections::BTreeMap<&'static str, u64>,
    store_queue_depth: usize,
    refresh_queue: RefreshStats,
    ready: bool,
    /// The circuit breaker of each WNS authority woken since the start.
    wns_breakers: std::collections::BTreeMap<String, crate::sender::health::HealthView>,
}

#[derive(Serialize)]
struct RefreshStats {
    queued: u64,
    due_now: u64,
    leased: u64,
    delivered: u64,
    /// Seconds since the oldest due job's channel expired.
    oldest_due_age_seconds: Option<u32>,
}

impl RefreshStats {
    fn from(s: crate::core::refresh::QueueStats, now: crate::core::UnixTime) -> RefreshStats {
        RefreshStats {
            queued: s.queued,
            due_now: s.due_now,
            leased: s.leased,
            delivered: s.delivered,
            oldest_due_age_seconds: s.oldest_expired_at.map(|t| now.saturating_since(t)),
        }
    }
}

/// `GET /v1/stats`.
fn local_stats(gw: &Gateway) -> StatsView {
    let counts = gw.registry.state_counts(&gw.settings.thresholds, gw.now());
    let by_state = LifecycleState::ALL
        .iter()
        .zip(counts)
        .map(|(s, n)| (s.as_str(), n))
        .collect();
    StatsView {
        devices: gw.registry.len() as u64,
        by_state,
        store_queue_depth: gw.commits.queue_len(),
        refresh_queue: RefreshStats::from(gw.lifecycle.stats(gw.now()), gw.now()),
        ready: gw.is_ready(),
        wns_breakers: gw.wakes.sender().breakers(),
    }
}

/// `GET /v1/stats`. In cluster mode the other live nodes are asked for
/// their share and the answers are added up (a call forwarded by another
/// node answers for this node only); `nodes` then says what each node
/// holds, or why it did not answer.
pub(crate) async fn stats(gw: &Gateway, headers: &http::HeaderMap) -> Resp {
    let mine = serde_json::to_value(local_stats(gw)).expect("stats serialize");
    if headers.contains_key(super::forward::FORWARDED) || gw.store.peers().is_empty() {
        return json_response(StatusCode::OK, &mine);
    }
    let node = gw
        .settings
        .cluster
        .as_ref()
        .map_or_else(String::new, |c| c.node_id.clone());
    let mut answers = vec![(node, Ok(mine))];
    answers.extend(super::forward::ask_peers(gw, "/v1/stats", headers).await);
    json_response(StatusCode::OK, &merge_stats(answers))
}

/// Adds up the stats of several nodes: counts are summed, the oldest due
/// age is the largest, `ready` holds when every node answered ready.
fn merge_stats(answers: Vec<(String, Result<serde_json::Value, String>)>) -> serde_json::Value {
    use serde_json::{json, Map, Value};
    fn add(into: &mut Value, from: &Value) {
        match (into, from) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in b {
                    match a.get_mut(k) {
                        Some(mine) => add(mine, v),
                        None => {
                            a.insert(k.clone(), v.clone());
                        }
                    }
                }
            }
            (a @ Value::Number(_), Value::Number(b)) => {
                let sum = a.as_u64().unwrap_or(0) + b.as_u64().unwrap_or(0);
                *a = json!(sum);
            }
            _ => {}
        }
    }
    let mut total = Value::Object(Map::new());
    let mut nodes = Map::new();
    let mut ready = true;
    let mut oldest: Option<u64> = None;
    for (node, answer) in answers {
        match answer {
            Ok(v) => {
                ready &= v["ready"].as_bool().unwrap_or(false);
                if let Some(age) = v["refresh_queue"]["oldest_due_age_seconds"].as_u64() {
                    oldest = Some(oldest.map_or(age, |o| o.max(age)));
                }
                nodes.insert(node, json!({"devices": v["devices"]}));
                add(&mut total, &v);
            }
            Err(why) => {
                ready = false;
                nodes.insert(node, json!({"error": why}));
            }
        }
    }
    total["ready"] = json!(ready);
    if total.get("refresh_queue").is_some() {
        total["refresh_queue"]["oldest_due_age_seconds"] = json!(oldest);
    }
    total["nodes"] = Value::Object(nodes);
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_several_nodes_add_up() {
        let a = serde_json::json!({"devices": 3, "by_state": {"active": 2, "expired": 1},
            "store_queue_depth": 0, "ready": true, "wns_breakers": {},
            "refresh_queue": {"queued": 1, "due_now": 0, "leased": 0, "delivered": 0, "oldest_due_age_seconds": 50}});
        let b = serde_json::json!({"devices": 4, "by_state": {"active": 4, "expired": 0},
            "store_queue_depth": 2, "ready": true, "wns_breakers": {},
            "refresh_queue": {"queued": 2, "due_now": 1, "leased": 0, "delivered": 0, "oldest_due_age_seconds": 70}});
        let m = merge_stats(vec![("n1".into(), Ok(a.clone())), ("n2".into(), Ok(b))]);
        assert_eq!(m["devices"], 7);
        assert_eq!(m["by_state"]["active"], 6);
        assert_eq!(m["store_queue_depth"], 2);
        assert_eq!(m["refresh_queue"]["queued"], 3);
        assert_eq!(m["refresh_queue"]["oldest_due_age_seconds"], 70);
        assert_eq!(m["ready"], true);
        assert_eq!(m["nodes"]["n2"]["devices"], 4);
        let partial = merge_stats(vec![
            ("n1".into(), Ok(a)),
            ("n2".into(), Err("down".into())),
        ]);
        assert_eq!(partial["devices"], 3);
        assert_eq!(partial["ready"], false);
        assert_eq!(partial["nodes"]["n2"]["error"], "down");
    }

    #[test]
    fn cursors_round_trip_and_bad_ones_are_refused() {
        for bytes in [&[0u8, 0][..], &[0, 7, 0, b'a'], &[3, 255, 1, 9, 9]] {
            let c = Cursor::from_bytes(bytes).unwrap();
            assert_eq!(decode_cursor(&encode_cursor(&c)).unwrap(), c);
        }
        for bad in ["zz", "abc", "", "00", "é1", "0é"] {
            assert!(decode_cursor(bad).is_err(), "{bad:?}");
        }
        assert!(decode_cursor(&"00".repeat(2 + crate::registry::key::MAX_KEY_LEN + 1)).is_err());
    }
}
