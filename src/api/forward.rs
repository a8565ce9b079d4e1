//! A call for a device on another node's partition, forwarded to that node
//! (cluster mode), so any node answers any call.
//!
//! The call goes on as it came (method, path, query, body, the client's
//! token and content type) over a keep-alive HTTP/1.1 connection to the
//! owner's `cluster.advertise_url`, from a small pool per shard thread, and
//! the owner's answer comes back unchanged. A forwarded call carries
//! `X-Wnsgate-Forwarded`; a node that is not the owner of such a call
//! answers 503 rather than forwarding it again, so a call never loops
//! while partitions move.

use super::body::read_limited;
use super::error::ApiError;
use super::response::Resp;
use crate::gateway::Gateway;
use crate::store::Placement;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Duration;

/// The header a forwarded call carries: the forwarding node's id.
pub(crate) const FORWARDED: &str = "x-wnsgate-forwarded";
/// Idle connections kept per owner on one shard thread.
const POOL_PER_OWNER: usize = 16;
/// The longest a forwarded call may take (a wake with `wait=true` waits
/// out its retries).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(150);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest a peer may take to answer its share of a call that spans
/// the fleet.
const FAN_OUT_TIMEOUT: Duration = Duration::from_secs(5);

use crate::telemetry::metrics::CLUSTER_FORWARDED as METRIC_FORWARDED;

thread_local! {
    static POOL: RefCell<HashMap<String, Vec<SendRequest<Full<Bytes>>>>> = RefCell::new(HashMap::new());
}

/// Where a call for `device_id` is answered: `None` here, or the owner's
/// API address. A call that was forwarded already is never forwarded
/// again.
pub(crate) fn owner_of(
    gw: &Gateway,
    device_id: &str,
    headers: &http::HeaderMap,
) -> Result<Option<String>, ApiError> {
    owner_of_part(gw, gw.registry.partitioning().of(device_id), headers)
}

/// Where a call for partition `part` is answered, as [`owner_of`].
pub(crate) fn owner_of_part(
    gw: &Gateway,
    part: u16,
    headers: &http::HeaderMap,
) -> Result<Option<String>, ApiError> {
    match gw.store.placement(part) {
        Placement::Local => Ok(None),
        Placement::Remote { url, .. } if !headers.contains_key(FORWARDED) => Ok(Some(url)),
        Placement::Remote { node, .. } => Err(ApiError::unavailable(
            "partition_unavailable",
            format!("partition {part} of this device is moving to node {node}; retry shortly"),
        )),
        Placement::Unavailable => Err(ApiError::unavailable(
            "partition_unavailable",
            format!("partition {part} of this device is being taken over; retry shortly"),
        )),
    }
}

fn authority(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("http://")?;
    Some(rest.split('/').next().unwrap_or(rest))
}

async fn connect(authority: &str) -> Result<SendRequest<Full<Bytes>>, String> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(authority))
        .await
        .map_err(|_| format!("connecting to {authority} took over {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("{authority}: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Sends `req` to `authority` over a pooled connection and reads the whole
/// answer.
async fn exchange(
    authority: &str,
    req: Request<Full<Bytes>>,
) -> Result<(http::response::Parts, Bytes), String> {
    let pooled = POOL.with(|p| p.borrow_mut().get_mut(authority).and_then(Vec::pop));
    let mut sender = match pooled {
        Some(s) if !s.is_closed() => s,
        _ => connect(authority).await?,
    };
    if sender.ready().await.is_err() {
        sender = connect(authority).await?;
    }
    let answer = tokio::time::timeout(FORWARD_TIMEOUT, async {
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let (head, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok::<_, String>((head, body))
    })
    .await
    .map_err(|_| format!("no answer within {FORWARD_TIMEOUT:?}"))??;
    if !sender.is_closed() {
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            let idle = p.entry(authority.to_owned()).or_default();
            if idle.len() < POOL_PER_OWNER {
                idle.push(sender);
            }
        });
    }
    Ok(answer)
}

/// A call marked as forwarded, for the node at `authority`: `method path`
/// with `body`, and of `headers` those named in `keep` (the caller's token
/// and content type).
fn outbound(
    authority: &str,
    method: http::Method,
    path: &str,
    body: Bytes,
    headers: &http::HeaderMap,
    keep: &[http::header::HeaderName],
) -> Result<Request<Full<Bytes>>, String> {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    for name in keep {
        if let Some(v) = headers.get(name) {
            req.headers_mut().insert(name.clone(), v.clone());
        }
    }
    req.headers_mut().insert(
        http::header::HOST,
        HeaderValue::from_str(authority).map_err(|e| e.to_string())?,
    );
    req.headers_mut()
        .insert(FORWARDED, HeaderValue::from_static("1"));
    Ok(req)
}

/// `GET path` on the node at `url`, marked as forwarded, with the caller's
/// token: its JSON body, or why there is none.
pub(crate) async fn get_json(
    url: &str,
    path: &str,
    headers: &http::HeaderMap,
) -> Result<serde_json::Value, String> {
    let authority = authority(url).ok_or_else(|| format!("{url} is not http://"))?;
    let req = outbound(
        authority,
        http::Method::GET,
        path,
        Bytes::new(),
        headers,
        &[http::header::AUTHORIZATION],
    )?;
    let (head, body) = tokio::time::timeout(FAN_OUT_TIMEOUT, exchange(authority, req))
        .await
        .map_err(|_| format!("no answer within {FAN_OUT_TIMEOUT:?}"))??;
    if head.status != StatusCode::OK {
        return Err(format!(
            "answered {}: {}",
            head.status,
            String::from_utf8_lossy(&body)
        ));
    }
    serde_json::from_slice(&body).map_err(|e| e.to_string())
}

/// `GET path` on every peer (the other live nodes), marked as forwarded so
/// each answers for itself only, with the caller's token. Answers each
/// peer's node id and its JSON body, or why it gave none.
pub(crate) async fn ask_peers(
    gw: &Gateway,
    path: &str,
    headers: &http::HeaderMap,
) -> Vec<(String, Result<serde_json::Value, String>)> {
    let asks = gw.store.peers().into_iter().map(|(node, url)| async move {
        let r = get_json(&url, path, headers).await;
        (node, r)
    });
    futures_util::future::join_all(asks).await
}

/// `POST path` with `body` to the node at `url`, marked as forwarded, with
/// the caller's token: its status and body.
pub(crate) async fn post_to(
    url: &str,
    path: &str,
    content_type: &'static str,
    body: Bytes,
    headers: &http::HeaderMap,
) -> Result<(StatusCode, Bytes), ApiError> {
    let unreachable = |why: String| {
        metrics::counter!(METRIC_FORWARDED, "result" => "unreachable").increment(1);
        tracing::warn!(owner = url, error = %why, "a call could not be forwarded");
        ApiError::unavailable(
            "owner_unreachable",
            "a node that serves some of these devices cannot be reached just now; retry shortly",
        )
    };
    let authority = authority(url).ok_or_else(|| unreachable(format!("{url} is not http://")))?;
    let mut with_type = headers.clone();
    with_type.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    let req = outbound(
        authority,
        http::Method::POST,
        path,
        body,
        &with_type,
        &[http::header::AUTHORIZATION, http::header::CONTENT_TYPE],
    )
    .map_err(&unreachable)?;
    let (head, body) = exchange(authority, req).await.map_err(&unreachable)?;
    metrics::counter!(METRIC_FORWARDED, "result" => "answered").increment(1);
    Ok((head.status, body))
}

/// Sends the call to the node at `url` and answers what it answers.
pub(crate) async fn forward(
    gw: &Gateway,
    url: &str,
    parts: http::request::Parts,
    mut body: Incoming,
) -> Result<Resp, ApiError> {
    let unreachable = |why: String| {
        metrics::counter!(METRIC_FORWARDED, "result" => "unreachable").increment(1);
        tracing::warn!(owner = url, error = %why, "a call could not be forwarded");
        ApiError::unavailable(
            "owner_unreachable",
            "the node that serves this device cannot be reached just now; retry shortly",
        )
    };
    let Some(authority) = authority(url) else {
        return Err(unreachable(format!("{url} is not an http:// address")));
    };
    let idle = Duration::from_secs(gw.settings.request_timeout_secs);
    let limit = gw.settings.max_body_bytes;
    let bytes = read_limited(&mut body, &parts.headers, limit, idle).await?;
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let req = outbound(
        authority,
        parts.method.clone(),
        &path,
        bytes,
        &parts.headers,
        &[
            http::header::AUTHORIZATION,
            http::header::CONTENT_TYPE,
            http::header::ACCEPT,
        ],
    )
    .map_err(&unreachable)?;
    let (head, body) = exchange(authority, req).await.map_err(&unreachable)?;
    metrics::counter!(METRIC_FORWARDED, "result" => "answered").increment(1);
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = head.status;
    for name in [
        http::header::CONTENT_TYPE,
        http::header::RETRY_AFTER,
        http::header::LOCATION,
    ] {
        if let Some(v) = head.headers.get(&name) {
            resp.headers_mut().insert(name, v.clone());
        }
    }
    if head.status == StatusCode::SERVICE_UNAVAILABLE {
        tracing::debug!(owner = url, "the owner answered 503");
    }
    Ok(resp)
}
