//! The HTTP API (the README's "API" section lists every route).
//!
//! Owns: routing, authentication, parsing and validation, body limits, JSON
//! views and errors, request metrics. Each shard serves requests through
//! its own [`ShardApi`].
//! Must not touch: sockets (the shard hands it requests), the disk (it goes
//! through the registry and the store's commit handle), the work behind a
//! request (wakes are the [wake service](crate::wake)'s, the refresh queue
//! the [lifecycle](crate::lifecycle)'s).

pub(crate) mod body;
pub(crate) mod devices;
pub(crate) mod error;
pub(crate) mod forward;
pub(crate) mod import;
pub(crate) mod jobs;
pub(crate) mod limits;
pub(crate) mod push;
pub(crate) mod refresh;
pub(crate) mod response;
pub(crate) mod view;

use crate::gateway::Gateway;
use crate::telemetry::metrics as m;
use error::ApiError;
use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use response::{json_response, text_response, Resp};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Requests a shard is serving at once, for its overload limit.
#[derive(Debug, Default)]
pub(crate) struct InflightGauge(AtomicUsize);

struct InflightGuard<'a>(&'a InflightGauge);

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The API as one shard serves it.
#[derive(Clone)]
pub(crate) struct ShardApi {
    gw: Arc<Gateway>,
    shard: usize,
    inflight: Arc<InflightGauge>,
}

impl ShardApi {
    /// The API of shard `shard`, with its own overload limit.
    pub(crate) fn new(gw: Arc<Gateway>, shard: usize) -> ShardApi {
        ShardApi {
            gw,
            shard,
            inflight: Arc::default(),
        }
    }
}

impl crate::shard::Handler for ShardApi {
    fn call(&self, req: Request<Incoming>) -> impl Future<Output = Resp> + Send + 'static + use<> {
        serve(self.gw.clone(), self.shard, self.inflight.clone(), req)
    }
}

/// Serves one request. Never fails: every error becomes a JSON response.
async fn serve(
    gw: Arc<Gateway>,
    shard: usize,
    inflight: Arc<InflightGauge>,
    req: Request<Incoming>,
) -> Resp {
    let started = crate::clock::instant();
    let n = inflight.0.fetch_add(1, Ordering::Relaxed);
    let _guard = InflightGuard(&inflight);
    let route = route_name(req.method(), req.uri().path());
    let resp = if n >= gw.settings.max_inflight_per_shard {
        metrics::counter!(m::API_OVERLOAD).increment(1);
        ApiError::unavailable(
            "overloaded",
            "the gateway is at its concurrent request limit; retry shortly",
        )
        .into_response()
    } else {
        match dispatch(gw, shard, req).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        }
    };
    metrics::counter!(m::API_REQUESTS, "route" => route, "status" => m::status_label(resp.status().as_u16()))
        .increment(1);
    metrics::histogram!(m::API_DURATION, "route" => route).record(started.elapsed().as_secs_f64());
    resp
}

/// The route a request matches, as a bounded metric label.
fn route_name(method: &Method, path: &str) -> &'static str {
    match (method, split_route(path)) {
        (_, Route::Health) => "healthz",
        (_, Route::Ready) => "readyz",
        (_, Route::Metrics) => "metrics",
        (_, Route::Stats) => "stats",
        (_, Route::Import) => "import",
        (_, Route::Devices) => "list_devices",
        (&Method::PUT, Route::Channel(_)) => "put_channel",
        (&Method::DELETE, Route::Device(_)) => "delete_device",
        (_, Route::Push(_)) => "push_device",
        (&Method::GET, Route::Jobs) => "list_jobs",
        (_, Route::Jobs) => "create_job",
        (_, Route::Job(_)) => "job",
        (_, Route::JobFailures(_)) => "job_failures",
        (_, Route::CheckIn(_)) => "refresh_check_in",
        (_, Route::Lease) => "refresh_lease",
        (_, Route::Complete(_)) => "refresh_complete",
        (_, Route::RefreshJob(_)) => "refresh_job",
        (_, Route::Device(_)) => "get_device",
        (_, Route::Snapshot) => "store_snapshot",
        _ => "other",
    }
}

enum Route {
    Health,
    Ready,
    Metrics,
    Stats,
    Devices,
    Import,
    Device(String),
    Channel(String),
    Push(String),
    Jobs,
    Job(String),
    JobFailures(String),
    CheckIn(String),
    Lease,
    Complete(String),
    RefreshJob(String),
    Snapshot,
    Unknown,
}

fn split_route(path: &str) -> Route {
    match path {
        "/healthz" => return Route::Health,
        "/readyz" => return Route::Ready,
        "/metrics" => return Route::Metrics,
        "/v1/stats" => return Route::Stats,
        "/v1/devices" => return Route::Devices,
        "/v1/devices:import" => return Route::Import,
        "/v1/pushes" => return Route::Jobs,
        "/v1/refresh:lease" => return Route::Lease,
        "/v1/store:snapshot" => return Route::Snapshot,
        _ => {}
    }
    if let Some(rest) = path.strip_prefix("/v1/refresh/") {
        return match rest.strip_suffix(":complete") {
            Some(id) => Route::Complete(percent_decode(id)),
            None if !rest.contains('/') => Route::RefreshJob(percent_decode(rest)),
            None => Route::Unknown,
        };
    }
    if let Some(id) = path.strip_prefix("/v1/pushes/") {
        return match id.strip_suffix("/failures") {
            Some(id) => Route::JobFailures(percent_decode(id)),
            None => Route::Job(percent_decode(id)),
        };
    }
    let Some(rest) = path.strip_prefix("/v1/devices/") else {
        return Route::Unknown;
    };
    match rest.split_once('/') {
        None => Route::Device(percent_decode(rest)),
        Some((id, "channel")) => Route::Channel(percent_decode(id)),
        Some((id, "push")) => Route::Push(percent_decode(id)),
        Some((id, "refresh")) => Route::CheckIn(percent_decode(id)),
        _ => Route::Unknown,
    }
}

async fn dispatch(
    gw: Arc<Gateway>,
    shard: usize,
    req: Request<Incoming>,
) -> Result<Resp, ApiError> {
    let route = split_route(req.uri().path());
    let method = req.method().clone();
    // HEAD is GET without the body (hyper leaves the body out); probes and
    // load balancers use it.
    let get = method == Method::GET || method == Method::HEAD;
    match (&method, &route) {
        (_, Route::Health) if get => {
            return Ok(json_response(
                StatusCode::OK,
                &serde_json::json!({"status": "ok"}),
            ))
        }
        (_, Route::Ready) if get => {
            return Ok(if !gw.is_ready() {
                ApiError::unavailable("not_ready", "the gateway is starting or shutting down")
                    .into_response()
            } else if !gw.store.writable() {
                // Reads and wakes still work; writes do not until the disk
                // has room again (the store probes every second).
                ApiError::unavailable(
                    "store_unavailable",
                    "the store cannot write (is the disk full?); it retries every second",
                )
                .into_response()
            } else {
                json_response(StatusCode::OK, &serde_json::json!({"status": "ready"}))
            });
        }
        (_, Route::Metrics) if get => {
            return Ok(text_response(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                render_metrics(&gw),
            ))
        }
        (_, Route::Health | Route::Ready | Route::Metrics) => {
            return Err(method_not_allowed("GET, HEAD"))
        }
        _ => {}
    }
    if matches!(route, Route::Unknown) {
        return Err(ApiError::not_found(
            "not_found",
            format!("no such endpoint: {}", req.uri().path()),
        ));
    }
    authorize(&gw, req.headers())?;
    if !gw.is_ready() {
        return Err(ApiError::unavailable(
            "not_ready",
            "the gateway is starting or shutting down",
        ));
    }
    // A call for one device goes to the node that serves its partition.
    if let Route::Device(id) | Route::Channel(id) | Route::Push(id) | Route::CheckIn(id) = &route {
        if let Some(owner) = forward::owner_of(&gw, id, req.headers())? {
            let (parts, body) = req.into_parts();
            return forward::forward(&gw, &owner, parts, body).await;
        }
    }
    // So does a call for one refresh job: in cluster mode its id carries
    // its device's partition.
    if let Route::Complete(id) | Route::RefreshJob(id) = &route {
        if let Some(owner) = refresh::owner_of_job(&gw, id, req.headers())? {
            let (parts, body) = req.into_parts();
            return forward::forward(&gw, &owner, parts, body).await;
        }
    }
    let query = req.uri().query().map(str::to_owned);
    let (parts, body) = req.into_parts();
    match (parts.method, route) {
        (Method::GET, Route::Stats) => Ok(devices::stats(&gw, &parts.headers).await),
        (Method::GET, Route::Devices) => devices::list_devices(gw, query, &parts.headers).await,
        (Method::POST, Route::Import) => import::import(gw, parts.headers, body).await,
        (Method::GET, Route::Device(id)) => devices::get_device(&gw, &id),
        (Method::DELETE, Route::Device(id)) => devices::delete_device(gw, id).await,
        (Method::PUT, Route::Channel(id)) => {
            devices::put_channel(gw, id, parts.headers, body).await
        }
        (_, Route::Stats | Route::Devices) => Err(method_not_allowed("GET")),
        (_, Route::Import) => Err(method_not_allowed("POST")),
        (_, Route::Device(_)) => Err(method_not_allowed("GET, DELETE")),
        (_, Route::Channel(_)) => Err(method_not_allowed("PUT")),
        (Method::POST, Route::Push(id)) => push::push_device(gw, shard, id, query).await,
        (_, Route::Push(_)) => Err(method_not_allowed("POST")),
        (Method::POST, Route::Jobs) => jobs::create(gw, shard, parts.headers, body).await,
        (Method::GET, Route::Jobs) => Ok(jobs::list(&gw)),
        (_, Route::Jobs) => Err(method_not_allowed("GET, POST")),
        (Method::GET, Route::Job(id)) => jobs::get(&gw, &id),
        (Method::DELETE, Route::Job(id)) => jobs::cancel(&gw, &id).await,
        (_, Route::Job(_)) => Err(method_not_allowed("GET, DELETE")),
        (Method::GET, Route::JobFailures(id)) => {
            jobs::failures(&gw, &id, query, &parts.headers).await
        }
        (_, Route::JobFailures(_)) => Err(method_not_allowed("GET")),
        (Method::GET, Route::CheckIn(id)) => refresh::check_in(gw, id, query).await,
        (_, Route::CheckIn(_)) => Err(method_not_allowed("GET")),
        (Method::POST, Route::Lease) => refresh::lease(gw, parts.headers, body).await,
        (_, Route::Lease) => Err(method_not_allowed("POST")),
        (Method::POST, Route::Complete(id)) => refresh::complete(gw, id, parts.headers, body).await,
        (_, Route::Complete(_)) => Err(method_not_allowed("POST")),
        (Method::GET, Route::RefreshJob(id)) => refresh::get(&gw, &id),
        (_, Route::RefreshJob(_)) => Err(method_not_allowed("GET")),
        (Method::POST, Route::Snapshot) => devices::snapshot(gw).await,
        (_, Route::Snapshot) => Err(method_not_allowed("POST")),
        _ => Err(ApiError::not_found("not_found", "no such endpoint")),
    }
}

fn method_not_allowed(allowed: &str) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("this endpoint accepts {allowed}"),
    )
}

/// Checks the bearer token when tokens are configured.
fn authorize(gw: &Gateway, headers: &http::HeaderMap) -> Result<(), ApiError> {
    let tokens = &gw.settings.tokens;
    if tokens.is_empty() {
        return Ok(());
    }
    let presented = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(presented) = presented else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send Authorization: Bearer <token>",
        ));
    };
    let mut ok = false;
    for t in tokens {
        ok |= constant_time_eq(t.expose().as_bytes(), presented.as_bytes());
    }
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the bearer token is not accepted",
        ))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn render_metrics(gw: &Gateway) -> String {
    let counts = gw.registry.state_counts(&gw.settings.thresholds, gw.now());
    for (state, n) in crate::core::LifecycleState::ALL.iter().zip(counts) {
        metrics::gauge!(m::DEVICES, "state" => state.as_str()).set(n as f64);
    }
    metrics::gauge!(m::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "io" => gw.io_backend)
        .set(1.0);
    gw.metrics.render()
}

/// Splits a query string into decoded key/value pairs.
pub(crate) fn query_pairs(q: &str) -> impl Iterator<Item = (String, String)> + '_ {
    q.split('&').filter(|p| !p.is_empty()).map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        (
            percent_decode(&k.replace('+', " ")),
            percent_decode(&v.replace('+', " ")),
        )
    })
}

/// Decodes `%XX` escapes; malformed escapes are kept as written (the id
/// validation then refuses the `%`).
pub(crate) fn percent_decode(s: &str) -> String {
    if !s.contains('%') {
        return s.to_owned();
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if let (Some(h), Some(l)) = (hex(b.get(i + 1)), hex(b.get(i + 2))) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn hex(c: Option<&u8>) -> Option<u8> {
    match c? {
        c @ b'0'..=b'9' => Some(c - b'0'),
        c @ b'a'..=b'f' => Some(c - b'a' + 10),
        c @ b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_percent_escapes() {
        assert_eq!(percent_decode("%7B6F1C%7D"), "{6F1C}");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("a%zz"), "a%zz");
        assert_eq!(percent_decode("plain"), "plain");
    }

    #[test]
    fn routes() {
        assert!(matches!(split_route("/v1/devices/abc"), Route::Device(id) if id == "abc"));
        assert!(
            matches!(split_route("/v1/devices/abc/channel"), Route::Channel(id) if id == "abc")
        );
        assert!(matches!(
            split_route("/v1/devices/abc/other"),
            Route::Unknown
        ));
        assert!(matches!(split_route("/v1/devices/"), Route::Device(id) if id.is_empty()));
        assert!(matches!(split_route("/v1/devices:import"), Route::Import));
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
