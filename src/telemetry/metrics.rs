//! The Prometheus recorder and the metric names used across the gateway.
//!
//! Names follow Prometheus conventions: a `wnsgate_` prefix, `_total` for
//! counters, `_seconds` and `_bytes` units, and no unbounded label values
//! (never a device id or a channel URI).

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

/// API requests, by `route` and `status`.
pub(crate) const API_REQUESTS: &str = "wnsgate_api_requests_total";
/// API request latency, by `route`.
pub(crate) const API_DURATION: &str = "wnsgate_api_request_duration_seconds";
/// Requests refused because a shard was at its in-flight limit.
pub(crate) const API_OVERLOAD: &str = "wnsgate_api_overload_total";
/// API calls forwarded to the node serving the partition (cluster mode).
pub(crate) const CLUSTER_FORWARDED: &str = "wnsgate_cluster_forwarded_total";
/// Devices in the registry, by `state`.
pub(crate) const DEVICES: &str = "wnsgate_devices";
/// Registrations imported through NDJSON, by `result` (accepted, rejected).
pub(crate) const IMPORT_LINES: &str = "wnsgate_import_lines_total";
/// Seconds the last start spent loading the store into the registry.
pub(crate) const RECOVERY_SECONDS: &str = "wnsgate_recovery_seconds";
/// Connections opened to WNS, by `protocol` (h2, http1) and `io` (the
/// socket backend: epoll, uring).
pub(crate) const WNS_CONNECTIONS_OPENED: &str = "wnsgate_wns_connections_opened_total";
/// Connections to WNS open now, by `protocol` (h2, http1).
pub(crate) const WNS_CONNECTIONS_OPEN: &str = "wnsgate_wns_connections_open";
/// Bulk wakes (`POST /v1/pushes` jobs) running now.
pub(crate) const BULK_JOBS_RUNNING: &str = "wnsgate_bulk_jobs_running";
/// Batches of bulk wakes each shard took on to send, by `shard` (its index).
pub(crate) const BULK_BATCHES: &str = "wnsgate_bulk_batches_total";
/// Bulk wake checkpoints written, by `result` (ok, error).
pub(crate) const BULK_CHECKPOINTS: &str = "wnsgate_bulk_checkpoints_total";
/// WNS token refreshes, by `result` (ok, or the error kind).
pub(crate) const WNS_TOKEN_REFRESHES: &str = "wnsgate_wns_token_refreshes_total";
/// Wake-ups finished, by `result` (delivered, channel_dead, dropped, ...).
pub(crate) const PUSHES: &str = "wnsgate_pushes_total";
/// Time from the start of a wake-up to its final result, retries included.
pub(crate) const PUSH_DURATION: &str = "wnsgate_push_duration_seconds";
/// WNS answers, by `outcome` and HTTP `status`.
pub(crate) const WNS_RESPONSES: &str = "wnsgate_wns_responses_total";
/// WNS request latency (request sent to answer head).
pub(crate) const WNS_LATENCY: &str = "wnsgate_wns_request_duration_seconds";
/// Wake-ups in progress.
pub(crate) const WNS_INFLIGHT: &str = "wnsgate_wns_inflight_pushes";
/// Requests sent again, by `reason`.
pub(crate) const WNS_RESENDS: &str = "wnsgate_wns_resends_total";
/// Resends of requests WNS may have processed, by `reason` (stream_reset,
/// connection_lost): each may wake a device twice.
pub(crate) const PUSH_POSSIBLE_DUPLICATES: &str = "wnsgate_push_possible_duplicates_total";
/// The circuit breaker of each WNS authority, by `authority`: 0 closed, 1
/// half-open, 2 open.
pub(crate) const WNS_BREAKER_STATE: &str = "wnsgate_wns_breaker_state";
/// Times each WNS authority's circuit breaker opened, by `authority`.
pub(crate) const WNS_BREAKER_OPENED: &str = "wnsgate_wns_breaker_opened_total";
/// Open refresh jobs, by `state` (queued, leased, delivered).
pub(crate) const REFRESH_JOBS: &str = "wnsgate_refresh_jobs";
/// Queued refresh jobs due now (the backlog the MDM tier has not taken).
pub(crate) const REFRESH_DUE: &str = "wnsgate_refresh_queue_due";
/// Age of the oldest channel expiry among due refresh jobs, seconds.
pub(crate) const REFRESH_OLDEST_SECONDS: &str = "wnsgate_refresh_queue_oldest_seconds";
/// Refresh jobs opened, by `reason` (age, wns_404, wns_410, credential_mismatch).
pub(crate) const REFRESH_OPENED: &str = "wnsgate_refresh_jobs_opened_total";
/// Refresh jobs closed (a new channel URI, or the device deleted).
pub(crate) const REFRESH_CLOSED: &str = "wnsgate_refresh_jobs_closed_total";
/// Refresh jobs given up: the device became unreachable.
pub(crate) const REFRESH_GIVEUPS: &str = "wnsgate_refresh_giveups_total";
/// Refresh jobs handed out, by `via` (check_in, lease, webhook).
pub(crate) const REFRESH_HANDOUTS: &str = "wnsgate_refresh_handouts_total";
/// Webhook calls, by `result` (ok, error).
pub(crate) const REFRESH_WEBHOOK_CALLS: &str = "wnsgate_refresh_webhook_calls_total";
/// Devices leaving `active`, by `to` (expired, unreachable) and `reason`.
pub(crate) const LIFECYCLE_TRANSITIONS: &str = "wnsgate_lifecycle_transitions_total";
/// Nudge wakes sent to devices turning `renewal_due`.
pub(crate) const LIFECYCLE_NUDGES: &str = "wnsgate_lifecycle_nudges_total";
/// Duration of one expiry sweep.
pub(crate) const LIFECYCLE_SWEEP_SECONDS: &str = "wnsgate_lifecycle_sweep_seconds";
/// Issued-at index entries read by expiry sweeps.
pub(crate) const LIFECYCLE_SWEEP_EXAMINED: &str = "wnsgate_lifecycle_sweep_examined_total";
/// Build information (`version`) and the network backend in use (`io`).
pub(crate) const BUILD_INFO: &str = "wnsgate_build_info";
/// 1 when the gateway is ready to serve.
pub(crate) const READY: &str = "wnsgate_ready";

/// Latency buckets for API requests and store syncs, seconds.
pub(crate) const LATENCY_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Buckets for a whole wake-up, seconds: retries after throttling and
/// `Retry-After` waits take a wake-up from milliseconds to minutes.
pub(crate) const PUSH_DURATION_BUCKETS: &[f64] = &[
    0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Every value [`status_label`] returns, in [`status_index`] order.
pub(crate) const STATUS_LABELS: [&str; 21] = [
    "200", "201", "202", "204", "400", "401", "403", "404", "405", "406", "408", "409", "410",
    "413", "415", "422", "429", "500", "503", "5xx", "other",
];

/// An HTTP status as a bounded label value: the statuses the API and WNS
/// use by name, other 5xx as `5xx`, anything else as `other`.
pub(crate) fn status_label(status: u16) -> &'static str {
    STATUS_LABELS[status_index(status)]
}

/// The position of [`status_label`]'s value in [`STATUS_LABELS`], for
/// tables of metric handles indexed by status.
pub(crate) fn status_index(status: u16) -> usize {
    match status {
        200 => 0,
        201 => 1,
        202 => 2,
        204 => 3,
        400 => 4,
        401 => 5,
        403 => 6,
        404 => 7,
        405 => 8,
        406 => 9,
        408 => 10,
        409 => 11,
        410 => 12,
        413 => 13,
        415 => 14,
        422 => 15,
        429 => 16,
        500 => 17,
        503 => 18,
        501..=599 => 19,
        _ => 20,
    }
}

/// Installs the process-wide Prometheus recorder once and returns its
/// handle; later calls return the same handle.
pub(crate) fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .expect("latency buckets are non-empty")
            .set_buckets_for_metric(
                Matcher::Full(crate::store::committer::METRIC_BATCH_MUTATIONS.into()),
                crate::store::committer::BATCH_MUTATIONS_BUCKETS,
            )
            .expect("batch buckets are non-empty")
            .set_buckets_for_metric(Matcher::Full(PUSH_DURATION.into()), PUSH_DURATION_BUCKETS)
            .expect("push buckets are non-empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (tests in one process);
        // then this handle renders only what it owns, which is acceptable.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        init_series();
        handle
    })
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(API_REQUESTS, "API requests served, by route and status.");
    describe_histogram!(
        API_DURATION,
        Unit::Seconds,
        "API request latency, by route."
    );
    describe_counter!(
        API_OVERLOAD,
        "API requests refused with 503 because a shard was at its in-flight limit."
    );
    describe_gauge!(DEVICES, "Registered devices, by lifecycle state.");
    describe_counter!(IMPORT_LINES, "NDJSON import lines, by result.");
    crate::store::committer::describe_metrics();
    crate::store::log_store::describe_metrics();
    crate::cluster::jetstream::describe_metrics();
    describe_counter!(
        CLUSTER_FORWARDED,
        "API calls forwarded to the node that serves the device's partition, by result"
    );
    describe_gauge!(
        RECOVERY_SECONDS,
        Unit::Seconds,
        "Time the last start spent loading the store."
    );
    describe_counter!(
        WNS_CONNECTIONS_OPENED,
        "Connections opened to WNS, by protocol and socket backend."
    );
    describe_gauge!(
        WNS_CONNECTIONS_OPEN,
        "Connections to WNS open now, by protocol (h2, http1)."
    );
    describe_gauge!(
        BULK_JOBS_RUNNING,
        "Bulk wakes (POST /v1/pushes jobs) selecting or sending now."
    );
    describe_counter!(
        BULK_BATCHES,
        "Batches of bulk wakes (one store page or one page of listed ids each) taken on to send, by shard."
    );
    describe_counter!(
        BULK_CHECKPOINTS,
        "Bulk wake checkpoints written durably, by result (ok, error)."
    );
    describe_counter!(
        WNS_TOKEN_REFRESHES,
        "WNS access token requests, by result (ok or the error kind)."
    );
    describe_counter!(
        PUSHES,
        "Wake-ups finished, by final result (delivered, channel_dead, dropped, ...)."
    );
    describe_histogram!(
        PUSH_DURATION,
        Unit::Seconds,
        "Time from the start of a wake-up to its final result, retries included."
    );
    describe_counter!(
        WNS_RESPONSES,
        "WNS answers, by classified outcome and HTTP status."
    );
    describe_histogram!(
        WNS_LATENCY,
        Unit::Seconds,
        "Time from sending a WNS request to its answer head."
    );
    describe_gauge!(WNS_INFLIGHT, "Wake-ups in progress.");
    describe_counter!(
        WNS_RESENDS,
        "WNS requests sent again, by reason (connection_lost, token_rejected, or the retried outcome)."
    );
    describe_counter!(
        PUSH_POSSIBLE_DUPLICATES,
        "Resends of WNS requests that may have been processed (stream reset, connection lost after writing), by reason: each may wake a device twice."
    );
    describe_gauge!(
        WNS_BREAKER_STATE,
        "Circuit breaker of each WNS authority: 0 closed, 1 half-open (one probe goes), 2 open (wakes wait)."
    );
    describe_counter!(
        WNS_BREAKER_OPENED,
        "Times the circuit breaker of each WNS authority opened (after connection failures in a row, or a failed probe)."
    );
    describe_gauge!(BUILD_INFO, "Build information; always 1.");
    describe_gauge!(READY, "1 when the gateway serves the API.");
}

/// Creates the series that alerts and dashboards divide by or compare
/// against, at zero, so they exist before the first event: a rate over a
/// series that does not exist yet is "no data", not 0.
fn init_series() {
    metrics::counter!(API_OVERLOAD).increment(0);
    for result in ["accepted", "rejected"] {
        metrics::counter!(IMPORT_LINES, "result" => result).increment(0);
    }
    metrics::counter!(WNS_TOKEN_REFRESHES, "result" => "ok").increment(0);
    metrics::counter!(PUSHES, "result" => "delivered").increment(0);
    for reason in [
        "connection_lost",
        "token_rejected",
        "server_error",
        "sender_throttled",
    ] {
        metrics::counter!(WNS_RESENDS, "reason" => reason).increment(0);
    }
    for reason in ["stream_reset", "connection_lost"] {
        metrics::counter!(PUSH_POSSIBLE_DUPLICATES, "reason" => reason).increment(0);
    }
    metrics::gauge!(WNS_INFLIGHT).set(0.0);
    for protocol in ["h2", "http1"] {
        metrics::gauge!(WNS_CONNECTIONS_OPEN, "protocol" => protocol).set(0.0);
    }
    metrics::gauge!(BULK_JOBS_RUNNING).set(0.0);
    for result in ["ok", "error"] {
        metrics::counter!(BULK_CHECKPOINTS, "result" => result).increment(0);
    }
    metrics::gauge!(READY).set(0.0);
}

/// Creates the series of shard `shard` at zero; each shard calls it as it
/// starts, so a shard that never sends shows as 0 rather than missing.
pub(crate) fn init_shard_series(shard: usize) {
    metrics::counter!(BULK_BATCHES, "shard" => shard.to_string()).increment(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_labels_name_their_status() {
        for status in 0..=u16::MAX {
            let label = status_label(status);
            match label.parse::<u16>() {
                Ok(n) => assert_eq!(n, status),
                Err(_) if label == "5xx" => assert!((501..=599).contains(&status)),
                Err(_) => assert_eq!(label, "other"),
            }
        }
    }

    #[test]
    fn buckets_are_increasing() {
        for b in [
            LATENCY_BUCKETS,
            PUSH_DURATION_BUCKETS,
            crate::store::committer::BATCH_MUTATIONS_BUCKETS,
        ] {
            assert!(b.windows(2).all(|w| w[0] < w[1]), "{b:?}");
        }
    }
}
