//! One request, whatever the transport: routing by path to the push
//! endpoint, the token endpoints or the control API, and the glue that
//! applies the rules of [`super::push`] and [`super::token`]
//! with the worker's state. The h2 and HTTP/1.1 servers only move bytes in
//! and a [`Reply`] out.

use super::behaviour::{channel_token, Behaviour};
use super::push::{self, PushHeaders, PushOptions, Verdict, MAX_PAYLOAD_BYTES};
use super::state::{channel_hash, Worker};
use super::token::{self, Flow, TokenInfo, MAX_TOKEN_REQUEST_BYTES};
use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use http::{Method, StatusCode};
use std::sync::Arc;
use std::time::Instant;

/// The parts of a request the simulator looks at.
pub(crate) struct Head<'a> {
    pub method: &'a Method,
    /// `:authority`, or the `Host` header; empty when neither.
    pub authority: &'a [u8],
    /// Path and query, byte for byte.
    pub path_and_query: &'a [u8],
    /// Path alone.
    pub path: &'a [u8],
    pub headers: &'a HeaderMap,
    /// HTTP/1.1 (where `Expect` and chunked bodies are refused).
    pub http1: bool,
}

impl<'a> Head<'a> {
    pub(crate) fn new(parts: &'a http::request::Parts, http1: bool) -> Head<'a> {
        let authority = match parts.uri.authority() {
            Some(a) => a.as_str().as_bytes(),
            None => parts.headers.get(HOST).map_or(&b""[..], |h| h.as_bytes()),
        };
        let (path_and_query, path) = match parts.uri.path_and_query() {
            Some(pq) => (pq.as_str().as_bytes(), pq.path().as_bytes()),
            None => (&b"/"[..], &b"/"[..]),
        };
        Head {
            method: &parts.method,
            authority,
            path_and_query,
            path,
            headers: &parts.headers,
            http1,
        }
    }
}

/// An answer, ready for either transport.
pub(crate) struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// A JSON answer.
    pub(crate) fn json(status: StatusCode, body: Vec<u8>) -> Reply {
        let mut headers = HeaderMap::with_capacity(4);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        headers.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
        Reply {
            status,
            headers,
            body: Bytes::from(body),
        }
    }

    /// An answer with no body.
    pub(crate) fn empty(status: StatusCode) -> Reply {
        let mut headers = HeaderMap::with_capacity(1);
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
        Reply {
            status,
            headers,
            body: Bytes::new(),
        }
    }
}

/// A request body, read chunk by chunk.
pub(crate) trait BodySource {
    /// The next chunk; `None` at the end; `Err` when the peer aborted.
    async fn chunk(&mut self) -> Option<Result<Bytes, ()>>;
}

/// A body read up to a limit.
pub(crate) enum BodyRead {
    Done(Bytes),
    TooLarge,
    Aborted,
}

/// Reads a whole body, stopping as soon as it exceeds `limit` bytes.
pub(crate) async fn read_body<B: BodySource>(body: &mut B, limit: usize) -> BodyRead {
    let mut first: Option<Bytes> = None;
    let mut more: Option<BytesMut> = None;
    let mut total = 0usize;
    loop {
        match body.chunk().await {
            None => break,
            Some(Err(())) => return BodyRead::Aborted,
            Some(Ok(c)) => {
                total += c.len();
                if total > limit {
                    return BodyRead::TooLarge;
                }
                if let Some(m) = more.as_mut() {
                    m.extend_from_slice(&c);
                } else if let Some(f) = first.take() {
                    let mut m = BytesMut::with_capacity(total);
                    m.extend_from_slice(&f);
                    m.extend_from_slice(&c);
                    more = Some(m);
                } else {
                    first = Some(c);
                }
            }
        }
    }
    BodyRead::Done(match more {
        Some(m) => m.freeze(),
        None => first.unwrap_or_default(),
    })
}

/// Where a request goes, by path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// `/_sim/...`.
    Control,
    /// `/accesstoken.srf` or `/{tenant}/oauth2/v2.0/token`.
    Token(Flow),
    /// Anything else: a channel.
    Push,
}

/// Routes by path.
pub(crate) fn route(path: &[u8]) -> Route {
    if path.starts_with(b"/_sim/") {
        return Route::Control;
    }
    if path == b"/accesstoken.srf" {
        return Route::Token(Flow::Classic);
    }
    if let Some(tenant) = path
        .strip_prefix(b"/")
        .and_then(|p| p.strip_suffix(b"/oauth2/v2.0/token"))
    {
        if !tenant.is_empty() && !tenant.contains(&b'/') {
            return Route::Token(Flow::Entra);
        }
    }
    Route::Push
}

/// Answers one request; `None` when the peer went away mid-request.
pub(crate) async fn serve<B: BodySource>(
    w: &Worker,
    head: &Head<'_>,
    body: &mut B,
) -> Option<Reply> {
    match route(head.path) {
        Route::Push => push(w, head, body).await,
        Route::Token(flow) => token(w, head, flow, body).await,
        Route::Control => super::control::serve(&w.shared, head, body).await,
    }
}

/// The checks that need no body: method, token, headers.
fn before_body(
    w: &Worker,
    head: &Head<'_>,
    headers: &PushHeaders<'_>,
    now: Instant,
) -> Result<(PushOptions, Arc<TokenInfo>), Verdict> {
    push::check_method(head.method)?;
    let info = headers
        .authorization
        .and_then(|v| token::bearer(v.as_bytes()))
        .and_then(|b| w.token(b));
    let info = push::check_token(headers.authorization.is_some(), info, now)?;
    let opts = push::check_headers(headers, !head.authority.is_empty(), head.http1)?;
    Ok((opts, info))
}

/// The decisions once the request is known valid: the channel's shape,
/// the sender's rate, injected errors, then the channel's behaviour.
fn after_body(
    w: &Worker,
    head: &Head<'_>,
    token: &TokenInfo,
    faults: &super::faults::Faults,
    hash: Option<u64>,
) -> Verdict {
    let Some(channel) = channel_token(head.path_and_query) else {
        return Verdict::malformed_channel();
    };
    if faults.sender_rate.is_some() {
        if let Err(retry_after) = w.shared.admit_sender(&token.app_sid) {
            return Verdict::sender_throttled(retry_after);
        }
    }
    if faults.error_ratio > 0.0 {
        if let Some(e) = faults.server_error(crate::clock::random(), crate::clock::random()) {
            return Verdict::server_error(e);
        }
    }
    let binding = hash.and_then(|h| w.binding(h, head.authority, head.path_and_query));
    match binding {
        Some(b) => {
            if b.app_sid.as_deref().is_some_and(|a| a != &*token.app_sid) {
                Verdict::wrong_app()
            } else {
                Verdict::of_behaviour(b.behaviour)
            }
        }
        None => Verdict::of_behaviour(Behaviour::from_channel_token(channel)),
    }
}

async fn push<B: BodySource>(w: &Worker, head: &Head<'_>, body: &mut B) -> Option<Reply> {
    let now = crate::clock::instant();
    let faults = w.faults();
    let hash = (w.shared.stats.channel_stats() || w.has_bindings())
        .then(|| channel_hash(head.authority, head.path_and_query));
    let headers = PushHeaders::scan(head.headers);
    let (verdict, opts) = match before_body(w, head, &headers, now) {
        Err(v) => (v, PushOptions::default()),
        Ok((opts, token)) => {
            w.counters
                .options(opts.ttl_secs.is_some(), opts.request_for_status);
            let v = match read_body(body, MAX_PAYLOAD_BYTES).await {
                BodyRead::Aborted => return None,
                BodyRead::TooLarge => Verdict::too_large(),
                BodyRead::Done(b) => match push::check_body_len(b.len()) {
                    Err(v) => v,
                    Ok(()) => after_body(w, head, &token, &faults, hash),
                },
            };
            (v, opts)
        }
    };
    if let Some(l) = faults.latency_ms {
        let d = l.pick(crate::clock::random());
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
    }
    let status = verdict.outcome.status();
    w.counters.answered(status);
    w.counters.outcome(verdict.outcome);
    if let Some(h) = hash {
        w.shared
            .stats
            .channel_push(&w.counters, h, verdict.outcome == push::Outcome::Received);
    }
    let headers = push::response_headers(
        &verdict,
        opts,
        headers.ms_cv,
        crate::clock::random(),
        w.debug_trace.clone(),
    );
    Some(Reply {
        status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        headers,
        body: Bytes::new(),
    })
}

async fn token<B: BodySource>(
    w: &Worker,
    head: &Head<'_>,
    flow: Flow,
    body: &mut B,
) -> Option<Reply> {
    let oauth = |status: StatusCode, error: &'static str, description: &str| {
        let e = token::OAuthError {
            error,
            description: description.to_owned(),
        };
        Reply::json(status, e.body())
    };
    let mut issued = false;
    let reply = if head.method != Method::POST {
        let mut r = oauth(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "use POST",
        );
        r.headers
            .insert(http::header::ALLOW, HeaderValue::from_static("POST"));
        r
    } else {
        match read_body(body, MAX_TOKEN_REQUEST_BYTES).await {
            BodyRead::Aborted => return None,
            BodyRead::TooLarge => oauth(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request",
                "request too large",
            ),
            BodyRead::Done(b) => {
                let ct = head.headers.get(CONTENT_TYPE).map(HeaderValue::as_bytes);
                match token::check_request(flow, ct, &b, &w.shared.apps) {
                    Err(e) => Reply::json(StatusCode::BAD_REQUEST, e.body()),
                    Ok(sid) => {
                        let lifetime = w.shared.token_lifetime;
                        match w
                            .shared
                            .tokens
                            .issue(&sid, lifetime, crate::clock::instant())
                        {
                            Ok(t) => {
                                issued = true;
                                let body = token::success_body(flow, &t.token, lifetime);
                                let mut r = Reply::json(StatusCode::OK, body);
                                r.headers.insert(
                                    http::header::PRAGMA,
                                    HeaderValue::from_static("no-cache"),
                                );
                                r
                            }
                            Err(e) => Reply::json(StatusCode::SERVICE_UNAVAILABLE, e.body()),
                        }
                    }
                }
            }
        }
    };
    w.counters.token_request(issued);
    w.counters.answered(reply.status.as_u16());
    Some(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_path() {
        assert_eq!(route(b"/accesstoken.srf"), Route::Token(Flow::Classic));
        assert_eq!(
            route(b"/contoso.onmicrosoft.com/oauth2/v2.0/token"),
            Route::Token(Flow::Entra)
        );
        assert_eq!(route(b"//oauth2/v2.0/token"), Route::Push);
        assert_eq!(route(b"/a/b/oauth2/v2.0/token"), Route::Push);
        assert_eq!(route(b"/_sim/stats"), Route::Control);
        assert_eq!(route(b"/"), Route::Push);
        assert_eq!(route(b"/_simulated"), Route::Push);
    }
}
