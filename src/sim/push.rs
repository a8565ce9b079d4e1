//! The push endpoint's rules, as WNS enforces them: what a request must
//! carry, and how each outcome is answered.
//! Pure functions of the request and of decisions made elsewhere (token
//! lookup, behaviour, faults), so every rule is tested without a socket.

use super::behaviour::Behaviour;
use super::faults::{ServerError, SERVER_ERROR_RETRY_AFTER_SECS};
use super::token::TokenInfo;
use http::header::{HeaderMap, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::Method;
use std::sync::Arc;
use std::time::Instant;

/// Largest payload WNS accepts; larger answers 413.
pub(crate) use crate::core::wns::headers::{
    MS_CV, X_WNS_CACHE_POLICY, X_WNS_DEBUG_TRACE, X_WNS_DEVICE_CONNECTION_STATUS,
    X_WNS_ERROR_DESCRIPTION, X_WNS_MSG_ID, X_WNS_REQUEST_FOR_STATUS, X_WNS_STATUS, X_WNS_TTL,
    X_WNS_TYPE,
};

pub const MAX_PAYLOAD_BYTES: usize = 5000;

/// The notification types WNS knows.
pub const WNS_TYPES: [&str; 4] = ["wns/raw", "wns/toast", "wns/tile", "wns/badge"];

/// The result of one request to the push endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// 200 `received`.
    Received,
    /// 200 `dropped`.
    Dropped,
    /// 200 `channelthrottled`.
    ChannelThrottled,
    /// 410 expired.
    Expired,
    /// 410 revoked.
    Revoked,
    /// 410 domain blocked.
    DomainBlocked,
    /// 404.
    NotFound,
    /// 403.
    WrongApp,
    /// 401.
    Unauthorized,
    /// 400.
    BadRequest,
    /// 413.
    TooLarge,
    /// 405.
    MethodNotAllowed,
    /// 406.
    SenderThrottled,
    /// Injected 500.
    ServerError,
    /// Injected 503.
    Unavailable,
}

/// Every outcome, in counter order.
pub const OUTCOMES: [Outcome; 15] = [
    Outcome::Received,
    Outcome::Dropped,
    Outcome::ChannelThrottled,
    Outcome::Expired,
    Outcome::Revoked,
    Outcome::DomainBlocked,
    Outcome::NotFound,
    Outcome::WrongApp,
    Outcome::Unauthorized,
    Outcome::BadRequest,
    Outcome::TooLarge,
    Outcome::MethodNotAllowed,
    Outcome::SenderThrottled,
    Outcome::ServerError,
    Outcome::Unavailable,
];

impl Outcome {
    /// The name used in `by_outcome`.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Received => "received",
            Outcome::Dropped => "dropped",
            Outcome::ChannelThrottled => "channel_throttled",
            Outcome::Expired => "expired",
            Outcome::Revoked => "revoked",
            Outcome::DomainBlocked => "domain_blocked",
            Outcome::NotFound => "not_found",
            Outcome::WrongApp => "wrong_app",
            Outcome::Unauthorized => "unauthorized",
            Outcome::BadRequest => "bad_request",
            Outcome::TooLarge => "too_large",
            Outcome::MethodNotAllowed => "method_not_allowed",
            Outcome::SenderThrottled => "sender_throttled",
            Outcome::ServerError => "server_error",
            Outcome::Unavailable => "unavailable",
        }
    }
}

impl Outcome {
    /// The HTTP status WNS answers with.
    pub fn status(self) -> u16 {
        match self {
            Outcome::Received | Outcome::Dropped | Outcome::ChannelThrottled => 200,
            Outcome::Expired | Outcome::Revoked | Outcome::DomainBlocked => 410,
            Outcome::NotFound => 404,
            Outcome::WrongApp => 403,
            Outcome::Unauthorized => 401,
            Outcome::BadRequest => 400,
            Outcome::TooLarge => 413,
            Outcome::MethodNotAllowed => 405,
            Outcome::SenderThrottled => 406,
            Outcome::ServerError => 500,
            Outcome::Unavailable => 503,
        }
    }

    /// `X-WNS-Status` of a 200 answer.
    pub fn wns_status(self) -> Option<&'static str> {
        match self {
            Outcome::Received => Some("received"),
            Outcome::Dropped => Some("dropped"),
            Outcome::ChannelThrottled => Some("channelthrottled"),
            _ => None,
        }
    }

    /// `X-WNS-DeviceConnectionStatus` of a 200 answer, when asked for.
    fn device_status(self) -> Option<&'static str> {
        match self {
            Outcome::Received | Outcome::ChannelThrottled => Some("connected"),
            Outcome::Dropped => Some("disconnected"),
            _ => None,
        }
    }
}

/// How one push is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// What happened.
    pub outcome: Outcome,
    /// `X-WNS-Error-Description`, if any.
    pub description: Option<&'static str>,
    /// `Retry-After` in seconds, if any.
    pub retry_after: Option<u64>,
}

impl Verdict {
    fn new(outcome: Outcome, description: &'static str) -> Verdict {
        Verdict {
            outcome,
            description: Some(description),
            retry_after: None,
        }
    }

    /// 200 received.
    pub const RECEIVED: Verdict = Verdict {
        outcome: Outcome::Received,
        description: None,
        retry_after: None,
    };

    /// The answer for a channel's behaviour.
    pub fn of_behaviour(b: Behaviour) -> Verdict {
        match b {
            Behaviour::Received => Verdict::RECEIVED,
            Behaviour::Dropped => Verdict {
                outcome: Outcome::Dropped,
                ..Verdict::RECEIVED
            },
            Behaviour::Throttled => Verdict {
                outcome: Outcome::ChannelThrottled,
                ..Verdict::RECEIVED
            },
            Behaviour::Expired => Verdict::new(Outcome::Expired, "Channel expired"),
            Behaviour::Revoked => Verdict::new(Outcome::Revoked, "Revoked channel URL"),
            Behaviour::DomainBlocked => Verdict::new(Outcome::DomainBlocked, "Domain Blocked"),
            Behaviour::NotFound => Verdict::new(Outcome::NotFound, "Channel not found"),
            Behaviour::WrongApp => Verdict::wrong_app(),
        }
    }

    /// 403: the token's app does not own the channel.
    pub fn wrong_app() -> Verdict {
        Verdict::new(
            Outcome::WrongApp,
            "The access token's app does not own this channel",
        )
    }

    /// 406 with `Retry-After`.
    pub fn sender_throttled(retry_after: u64) -> Verdict {
        Verdict {
            outcome: Outcome::SenderThrottled,
            description: Some("Sender throttled"),
            retry_after: Some(retry_after),
        }
    }

    /// An injected 500 or 503 with `Retry-After`.
    pub fn server_error(e: ServerError) -> Verdict {
        let (outcome, description) = match e {
            ServerError::Internal => (Outcome::ServerError, "Internal server error"),
            ServerError::Unavailable => (Outcome::Unavailable, "Service unavailable"),
        };
        Verdict {
            outcome,
            description: Some(description),
            retry_after: Some(SERVER_ERROR_RETRY_AFTER_SECS),
        }
    }

    /// 413: payload above [`MAX_PAYLOAD_BYTES`].
    pub fn too_large() -> Verdict {
        Verdict::new(Outcome::TooLarge, "Payload larger than 5000 bytes")
    }

    /// 404 for a path without a `token` parameter.
    pub fn malformed_channel() -> Verdict {
        Verdict::new(Outcome::NotFound, "Malformed channel URL")
    }
}

/// The push options read from the request headers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PushOptions {
    /// `X-WNS-RequestForStatus: true`.
    pub request_for_status: bool,
    /// `X-WNS-TTL`, seconds.
    pub ttl_secs: Option<u64>,
}

/// 405 unless POST.
pub fn check_method(method: &Method) -> Result<(), Verdict> {
    if method == Method::POST {
        Ok(())
    } else {
        Err(Verdict::new(
            Outcome::MethodNotAllowed,
            "Method not allowed",
        ))
    }
}

/// 401 unless the bearer names a known token that has not expired.
/// `had_authorization` says whether the request carried an `Authorization`
/// header at all; `token` is the store's entry for its bearer, if any.
pub fn check_token(
    had_authorization: bool,
    token: Option<Arc<TokenInfo>>,
    now: Instant,
) -> Result<Arc<TokenInfo>, Verdict> {
    match token {
        _ if !had_authorization => Err(Verdict::new(Outcome::Unauthorized, "Missing access token")),
        None => Err(Verdict::new(Outcome::Unauthorized, "Invalid access token")),
        Some(t) if now >= t.expires_at => Err(Verdict::new(Outcome::Unauthorized, "Token expired")),
        Some(t) => Ok(t),
    }
}

fn bad(description: &'static str) -> Verdict {
    Verdict::new(Outcome::BadRequest, description)
}

/// The request headers the push rules look at, gathered in one pass.
#[derive(Clone, Copy, Default)]
pub struct PushHeaders<'a> {
    /// `Authorization`.
    pub authorization: Option<&'a HeaderValue>,
    /// `MS-CV`, echoed in the answer.
    pub ms_cv: Option<&'a HeaderValue>,
    wns_type: Slot<'a>,
    content_type: Slot<'a>,
    content_length: Slot<'a>,
    cache_policy: Slot<'a>,
    ttl: Slot<'a>,
    request_for_status: Slot<'a>,
    expect: bool,
    transfer_encoding: bool,
}

/// A header that may appear once.
#[derive(Clone, Copy, Default)]
enum Slot<'a> {
    #[default]
    Absent,
    One(&'a [u8]),
    Repeated,
}

impl<'a> Slot<'a> {
    fn put(&mut self, v: &'a HeaderValue) {
        *self = match self {
            Slot::Absent => Slot::One(v.as_bytes()),
            _ => Slot::Repeated,
        };
    }
}

impl<'a> PushHeaders<'a> {
    /// Gathers the headers of a request.
    pub fn scan(headers: &'a HeaderMap) -> PushHeaders<'a> {
        let mut h = PushHeaders::default();
        for (name, value) in headers {
            if name == http::header::AUTHORIZATION {
                h.authorization = Some(value);
            } else if name == CONTENT_TYPE {
                h.content_type.put(value);
            } else if name == CONTENT_LENGTH {
                h.content_length.put(value);
            } else if name == http::header::EXPECT {
                h.expect = true;
            } else if name == http::header::TRANSFER_ENCODING {
                h.transfer_encoding = true;
            } else if *name == X_WNS_TYPE {
                h.wns_type.put(value);
            } else if *name == X_WNS_CACHE_POLICY {
                h.cache_policy.put(value);
            } else if *name == X_WNS_TTL {
                h.ttl.put(value);
            } else if *name == X_WNS_REQUEST_FOR_STATUS {
                h.request_for_status.put(value);
            } else if *name == MS_CV {
                h.ms_cv = Some(value);
            }
        }
        h
    }
}

fn media_type(v: &[u8]) -> &[u8] {
    v.split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii()
}

/// The header rules: `X-WNS-Type`, the raw content type, the optional WNS
/// headers' values, a host, and on HTTP/1.1 no `Expect` and no chunked
/// bodies. A declared `Content-Length` above the limit answers 413 before
/// the body is read.
pub fn check_headers(
    h: &PushHeaders<'_>,
    has_authority: bool,
    http1: bool,
) -> Result<PushOptions, Verdict> {
    if !has_authority {
        return Err(bad("Missing host"));
    }
    if http1 && h.expect {
        return Err(bad("Expect is not supported"));
    }
    if http1 && h.transfer_encoding {
        return Err(bad("Chunked transfer encoding is not supported"));
    }
    let wns_type = match h.wns_type {
        Slot::Absent => return Err(bad("Missing X-WNS-Type")),
        Slot::Repeated => return Err(bad("Conflicting X-WNS-Type headers")),
        Slot::One(v) => v,
    };
    if !WNS_TYPES.iter().any(|t| t.as_bytes() == wns_type) {
        return Err(bad("Invalid X-WNS-Type"));
    }
    if wns_type == b"wns/raw" {
        let ok = matches!(h.content_type,
            Slot::One(v) if media_type(v).eq_ignore_ascii_case(b"application/octet-stream"));
        if !ok {
            return Err(bad(
                "Content-Type must be application/octet-stream for wns/raw",
            ));
        }
    }
    match h.cache_policy {
        Slot::Absent => {}
        Slot::One(v) if v.eq_ignore_ascii_case(b"cache") || v.eq_ignore_ascii_case(b"no-cache") => {
        }
        _ => return Err(bad("Invalid X-WNS-Cache-Policy")),
    }
    let ttl_secs = match h.ttl {
        Slot::Absent => None,
        Slot::One(v) if !v.is_empty() && v.len() <= 10 && v.iter().all(u8::is_ascii_digit) => {
            std::str::from_utf8(v).ok().and_then(|t| t.parse().ok())
        }
        _ => return Err(bad("Invalid X-WNS-TTL")),
    };
    let request_for_status = match h.request_for_status {
        Slot::Absent => false,
        Slot::One(v) if v.eq_ignore_ascii_case(b"true") => true,
        Slot::One(v) if v.eq_ignore_ascii_case(b"false") => false,
        _ => return Err(bad("Invalid X-WNS-RequestForStatus")),
    };
    match h.content_length {
        Slot::Absent => {}
        Slot::One(v) => match std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        {
            Some(n) if n > MAX_PAYLOAD_BYTES as u64 => return Err(Verdict::too_large()),
            Some(_) => {}
            None => return Err(bad("Invalid Content-Length")),
        },
        Slot::Repeated => return Err(bad("Conflicting Content-Length")),
    }
    Ok(PushOptions {
        request_for_status,
        ttl_secs,
    })
}

/// 400 for an empty body, 413 above [`MAX_PAYLOAD_BYTES`].
pub fn check_body_len(len: usize) -> Result<(), Verdict> {
    match len {
        0 => Err(bad("Empty payload")),
        n if n > MAX_PAYLOAD_BYTES => Err(Verdict::too_large()),
        _ => Ok(()),
    }
}

/// The response headers of a push answer. Every answer carries
/// `X-WNS-Msg-ID`, `X-WNS-Debug-Trace` and the request's `MS-CV`.
pub fn response_headers(
    v: &Verdict,
    opts: PushOptions,
    ms_cv: Option<&HeaderValue>,
    msg_id: u64,
    debug_trace: HeaderValue,
) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(8);
    h.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
    if let Some(s) = v.outcome.wns_status() {
        h.insert(X_WNS_STATUS.clone(), HeaderValue::from_static(s));
    }
    if opts.request_for_status {
        if let Some(s) = v.outcome.device_status() {
            h.insert(
                X_WNS_DEVICE_CONNECTION_STATUS.clone(),
                HeaderValue::from_static(s),
            );
        }
    }
    // Unique per answer: marked sensitive so the h2 encoder does not churn
    // its dynamic table with it.
    let mut id = hex16(msg_id);
    id.set_sensitive(true);
    h.insert(X_WNS_MSG_ID.clone(), id);
    h.insert(X_WNS_DEBUG_TRACE.clone(), debug_trace);
    if let Some(cv) = ms_cv {
        h.insert(MS_CV.clone(), cv.clone());
    }
    if let Some(d) = v.description {
        h.insert(X_WNS_ERROR_DESCRIPTION.clone(), HeaderValue::from_static(d));
    }
    if let Some(s) = v.retry_after {
        h.insert(http::header::RETRY_AFTER, HeaderValue::from(s));
    }
    if v.outcome == Outcome::MethodNotAllowed {
        h.insert(http::header::ALLOW, HeaderValue::from_static("POST"));
    }
    if v.outcome == Outcome::Unauthorized {
        h.insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
    }
    h
}

/// 16 upper-case hex digits, like WNS message ids.
fn hex16(v: u64) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = HEX[((v >> (60 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&out).expect("hex digits are a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    const RAW: [(&str, &str); 2] = [
        ("x-wns-type", "wns/raw"),
        ("content-type", "application/octet-stream"),
    ];

    fn code(r: Result<PushOptions, Verdict>) -> u16 {
        r.map_or_else(|v| v.outcome.status(), |_| 200)
    }

    #[test]
    fn header_rules() {
        let ok = |extra: &[(&str, &str)], http1: bool| {
            let mut all = RAW.to_vec();
            all.extend_from_slice(extra);
            code(check_headers(
                &PushHeaders::scan(&headers(&all)),
                true,
                http1,
            ))
        };
        assert_eq!(ok(&[], false), 200);
        assert_eq!(
            ok(
                &[("x-wns-cache-policy", "cache"), ("x-wns-ttl", "60")],
                true
            ),
            200
        );
        assert_eq!(ok(&[("x-wns-cache-policy", "sometimes")], false), 400);
        assert_eq!(ok(&[("x-wns-ttl", "-1")], false), 400);
        let opts = |extra: &[(&str, &str)]| {
            let mut all = RAW.to_vec();
            all.extend_from_slice(extra);
            check_headers(&PushHeaders::scan(&headers(&all)), true, false).unwrap()
        };
        assert_eq!(opts(&[]), PushOptions::default());
        assert_eq!(
            opts(&[("x-wns-ttl", "3600"), ("x-wns-requestforstatus", "true")]),
            PushOptions {
                request_for_status: true,
                ttl_secs: Some(3600),
            }
        );
        assert_eq!(ok(&[("x-wns-requestforstatus", "maybe")], false), 400);
        assert_eq!(
            ok(&[("x-wns-type", "wns/raw")], false),
            400,
            "repeated type"
        );
        assert_eq!(ok(&[("expect", "100-continue")], true), 400);
        assert_eq!(ok(&[("expect", "100-continue")], false), 200);
        assert_eq!(ok(&[("transfer-encoding", "chunked")], true), 400);
        assert_eq!(ok(&[("content-length", "5001")], false), 413);
        assert_eq!(ok(&[("content-length", "5000")], false), 200);
        assert_eq!(
            code(check_headers(
                &PushHeaders::scan(&headers(&RAW)),
                false,
                false
            )),
            400
        );
        let no_type = headers(&[("content-type", "application/octet-stream")]);
        assert_eq!(
            code(check_headers(&PushHeaders::scan(&no_type), true, false)),
            400
        );
        let bad_type = headers(&[("x-wns-type", "wns/push")]);
        assert_eq!(
            code(check_headers(&PushHeaders::scan(&bad_type), true, false)),
            400
        );
        let raw_xml = headers(&[("x-wns-type", "wns/raw"), ("content-type", "text/xml")]);
        assert_eq!(
            code(check_headers(&PushHeaders::scan(&raw_xml), true, false)),
            400
        );
        let toast = headers(&[("x-wns-type", "wns/toast"), ("content-type", "text/xml")]);
        assert_eq!(
            code(check_headers(&PushHeaders::scan(&toast), true, false)),
            200
        );
        let with_params = headers(&[
            ("x-wns-type", "wns/raw"),
            ("content-type", "Application/Octet-Stream; x=1"),
            ("x-wns-requestforstatus", "true"),
        ]);
        assert!(
            check_headers(&PushHeaders::scan(&with_params), true, false)
                .unwrap()
                .request_for_status
        );
    }

    #[test]
    fn token_and_body_rules() {
        let now = crate::clock::instant();
        let t = Arc::new(TokenInfo {
            token: "t".into(),
            app_sid: Arc::from("a"),
            expires_at: now + Duration::from_secs(1),
        });
        assert!(check_token(true, Some(t.clone()), now).is_ok());
        assert_eq!(
            check_token(true, Some(t.clone()), now + Duration::from_secs(1))
                .unwrap_err()
                .description,
            Some("Token expired")
        );
        assert_eq!(
            check_token(false, Some(t), now).unwrap_err().description,
            Some("Missing access token")
        );
        assert_eq!(
            check_token(true, None, now).unwrap_err().outcome.status(),
            401
        );
        assert_eq!(
            check_token(false, None, now).unwrap_err().outcome.status(),
            401
        );
        assert_eq!(check_body_len(0).unwrap_err().outcome.status(), 400);
        assert!(check_body_len(5000).is_ok());
        assert_eq!(check_body_len(5001).unwrap_err().outcome.status(), 413);
        assert_eq!(
            check_method(&Method::GET).unwrap_err().outcome.status(),
            405
        );
    }

    #[test]
    fn answers_carry_the_support_headers() {
        let cv = HeaderValue::from_static("abc.1");
        let opts = PushOptions {
            request_for_status: true,
            ttl_secs: None,
        };
        let h = response_headers(
            &Verdict::RECEIVED,
            opts,
            Some(&cv),
            0x3ce3_8ff1_09e0_3a74,
            HeaderValue::from_static("T"),
        );
        assert_eq!(h["x-wns-status"], "received");
        assert_eq!(h["x-wns-msg-id"], "3CE38FF109E03A74");
        assert_eq!(h["x-wns-debug-trace"], "T");
        assert_eq!(h["ms-cv"], "abc.1");
        assert_eq!(h["x-wns-deviceconnectionstatus"], "connected");
        let revoked = Verdict::of_behaviour(Behaviour::Revoked);
        let h = response_headers(
            &revoked,
            PushOptions::default(),
            None,
            1,
            HeaderValue::from_static("T"),
        );
        assert_eq!(revoked.outcome.status(), 410);
        assert_eq!(h["x-wns-error-description"], "Revoked channel URL");
        assert!(!h.contains_key("x-wns-status"));
        assert!(!h.contains_key("ms-cv"));
        let e = Verdict::server_error(ServerError::Unavailable);
        let h = response_headers(
            &e,
            PushOptions::default(),
            None,
            1,
            HeaderValue::from_static("T"),
        );
        assert_eq!(e.outcome.status(), 503);
        assert_eq!(h["retry-after"], "1");
    }

    #[test]
    fn every_behaviour_has_its_status() {
        let cases = [
            (Behaviour::Received, 200, Some("received")),
            (Behaviour::Dropped, 200, Some("dropped")),
            (Behaviour::Throttled, 200, Some("channelthrottled")),
            (Behaviour::Expired, 410, None),
            (Behaviour::Revoked, 410, None),
            (Behaviour::DomainBlocked, 410, None),
            (Behaviour::NotFound, 404, None),
            (Behaviour::WrongApp, 403, None),
        ];
        for (b, status, wns) in cases {
            let v = Verdict::of_behaviour(b);
            assert_eq!(
                (v.outcome.status(), v.outcome.wns_status()),
                (status, wns),
                "{b:?}"
            );
        }
    }
}
