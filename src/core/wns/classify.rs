//! Reading WNS's answer to a push.
//!
//! [`classify`] is a total function from a response's status code and headers
//! to an [`Outcome`] plus the diagnostic headers Microsoft support asks for
//! ([`WnsMeta`]). It never looks at the body: WNS error bodies may be empty,
//! and every decision in section 3 is made from status and headers alone. It
//! never reads the clock: an HTTP-date `Retry-After` is measured from the
//! `now` the caller passes in.
//!
//! This module decides what the answer *means*. What to do about it (retry,
//! back off, mark the channel dead) is [`super::retry`]'s job.

use crate::core::lifecycle::DeadReason;
use crate::core::time::UnixTime;
use http::header::{HeaderMap, HeaderName, RETRY_AFTER};
use std::time::Duration;

/// Longest header value kept in [`WnsMeta`], in bytes. Longer values are
/// truncated: they are for logs and support tickets, and a response must not
/// be able to make us hold unbounded text.
pub const MAX_META_LEN: usize = 256;

/// Longest wait a `Retry-After` (or `X-WNS-CONTINUE-AFTER`) can ask for;
/// longer requests are clamped to this. Keeps later `Instant + Duration`
/// arithmetic far from overflow whatever the server sends.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(86_400);

use super::headers::{
    MS_CV, X_WNS_CONTINUE_AFTER, X_WNS_DEBUG_TRACE, X_WNS_DEVICE_CONNECTION_STATUS,
    X_WNS_ERROR_DESCRIPTION, X_WNS_MSG_ID, X_WNS_NOTIFICATION_STATUS, X_WNS_STATUS,
};

/// What one WNS response means for the push that caused it.
///
/// Every `u16` status maps to exactly one variant; see [`classify`] for the
/// table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// 200, `X-WNS-Status: received` (or no status header): WNS took the
    /// notification for delivery.
    Received,
    /// 200, `X-WNS-Status: dropped`: accepted but explicitly not delivered.
    Dropped,
    /// 200, `X-WNS-Status: channelthrottled`: this channel is over its rate;
    /// back off the channel, not the credential.
    ChannelThrottled,
    /// 400: bad or conflicting request headers. A bug on our side.
    BadRequest,
    /// 401: the access token is invalid or expired.
    TokenRejected,
    /// 403: the token's app does not own this channel (PFN / credential
    /// mismatch).
    CredentialMismatch,
    /// 404: the channel is unknown or malformed: it is dead.
    ChannelNotFound,
    /// 405: wrong HTTP method. A bug on our side.
    MethodNotAllowed,
    /// 406 (and 429): this sender is throttled; slow the whole credential.
    /// `retry_after` is the server's advice when it gave one, clamped to
    /// [`MAX_RETRY_AFTER`].
    SenderThrottled {
        /// The wait WNS asked for, if it said.
        retry_after: Option<Duration>,
    },
    /// 410: the channel expired, or was revoked (`X-WNS-Error-Description:
    /// Revoked channel URL`). Either way it is dead.
    ChannelExpired {
        /// The description said the channel was revoked.
        revoked: bool,
    },
    /// 410 with `X-WNS-Error-Description` saying `Domain Blocked`: WNS has
    /// blocked this sender. Stop and alert; the channel itself may be fine.
    DomainBlocked,
    /// 413: body over 5000 bytes. A bug on our side.
    PayloadTooLarge,
    /// 500 to 599: WNS failed or is unavailable; worth retrying.
    /// `retry_after` as for [`Outcome::SenderThrottled`].
    ServerError {
        /// The 5xx status, for logs.
        status: u16,
        /// The wait WNS asked for, if it said.
        retry_after: Option<Duration>,
    },
    /// Any other status (1xx, 2xx other than 200, 3xx, other 4xx, >= 600).
    /// Not documented by WNS, so never retried.
    Unexpected {
        /// The status received.
        status: u16,
    },
}

impl Outcome {
    /// Every metric label [`Outcome::label`] can return, in a stable order,
    /// so metrics can be pre-registered.
    pub const LABELS: [&'static str; 14] = [
        "received",
        "dropped",
        "channel_throttled",
        "bad_request",
        "token_rejected",
        "credential_mismatch",
        "channel_not_found",
        "method_not_allowed",
        "sender_throttled",
        "channel_expired",
        "domain_blocked",
        "payload_too_large",
        "server_error",
        "unexpected",
    ];

    /// The position of [`Outcome::label`] in [`Outcome::LABELS`], for
    /// tables indexed by outcome.
    pub fn index(&self) -> usize {
        match self {
            Outcome::Received => 0,
            Outcome::Dropped => 1,
            Outcome::ChannelThrottled => 2,
            Outcome::BadRequest => 3,
            Outcome::TokenRejected => 4,
            Outcome::CredentialMismatch => 5,
            Outcome::ChannelNotFound => 6,
            Outcome::MethodNotAllowed => 7,
            Outcome::SenderThrottled { .. } => 8,
            Outcome::ChannelExpired { .. } => 9,
            Outcome::DomainBlocked => 10,
            Outcome::PayloadTooLarge => 11,
            Outcome::ServerError { .. } => 12,
            Outcome::Unexpected { .. } => 13,
        }
    }

    /// A stable snake_case name for metrics (`outcome` label). Bounded: one
    /// of [`Outcome::LABELS`], never a status code or header text.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Received => "received",
            Outcome::Dropped => "dropped",
            Outcome::ChannelThrottled => "channel_throttled",
            Outcome::BadRequest => "bad_request",
            Outcome::TokenRejected => "token_rejected",
            Outcome::CredentialMismatch => "credential_mismatch",
            Outcome::ChannelNotFound => "channel_not_found",
            Outcome::MethodNotAllowed => "method_not_allowed",
            Outcome::SenderThrottled { .. } => "sender_throttled",
            Outcome::ChannelExpired { .. } => "channel_expired",
            Outcome::DomainBlocked => "domain_blocked",
            Outcome::PayloadTooLarge => "payload_too_large",
            Outcome::ServerError { .. } => "server_error",
            Outcome::Unexpected { .. } => "unexpected",
        }
    }

    /// Why this answer proves the *channel* dead, if it does: 404 gives
    /// [`DeadReason::Wns404`], 410 expired or revoked gives
    /// [`DeadReason::Wns410`], 403 gives [`DeadReason::CredentialMismatch`].
    /// `None` for everything else, including 410 Domain Blocked (the sender
    /// is blocked, not the channel).
    pub fn dead_reason(&self) -> Option<DeadReason> {
        match self {
            Outcome::ChannelNotFound => Some(DeadReason::Wns404),
            Outcome::ChannelExpired { .. } => Some(DeadReason::Wns410),
            Outcome::CredentialMismatch => Some(DeadReason::CredentialMismatch),
            _ => None,
        }
    }

    /// True only for [`Outcome::Received`]: the one outcome that counts as a
    /// delivered wake-up.
    pub fn is_delivered(&self) -> bool {
        matches!(self, Outcome::Received)
    }
}

/// `X-WNS-DeviceConnectionStatus`, sent when the request asked for status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceConnection {
    /// `connected`.
    Connected,
    /// `disconnected`.
    Disconnected,
    /// `tempdisconnected`, or the older spelling `tempconnected`.
    TempDisconnected,
}

impl DeviceConnection {
    /// Parses a header value, ignoring case and surrounding whitespace.
    /// Unknown values give `None`.
    pub fn parse(s: &str) -> Option<DeviceConnection> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("connected") {
            Some(DeviceConnection::Connected)
        } else if s.eq_ignore_ascii_case("disconnected") {
            Some(DeviceConnection::Disconnected)
        } else if s.eq_ignore_ascii_case("tempdisconnected")
            || s.eq_ignore_ascii_case("tempconnected")
        {
            Some(DeviceConnection::TempDisconnected)
        } else {
            None
        }
    }

    /// A stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceConnection::Connected => "connected",
            DeviceConnection::Disconnected => "disconnected",
            DeviceConnection::TempDisconnected => "temp_disconnected",
        }
    }
}

/// Diagnostic headers kept with every outcome. All optional.
///
/// Text fields hold printable ASCII only (bytes outside `0x20..=0x7e` become
/// `?`), trimmed, at most [`MAX_META_LEN`] bytes; empty values are `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WnsMeta {
    /// `X-WNS-Msg-ID`.
    pub msg_id: Option<String>,
    /// `X-WNS-Debug-Trace`.
    pub debug_trace: Option<String>,
    /// `MS-CV`, as echoed by WNS.
    pub ms_cv: Option<String>,
    /// `X-WNS-Error-Description`.
    pub error_description: Option<String>,
    /// `X-WNS-DeviceConnectionStatus`, when present and recognised.
    pub device_connection: Option<DeviceConnection>,
}

impl WnsMeta {
    /// Extracts the diagnostic headers from a response.
    pub fn from_headers(headers: &HeaderMap) -> WnsMeta {
        WnsMeta {
            msg_id: header_text(headers, &X_WNS_MSG_ID),
            debug_trace: header_text(headers, &X_WNS_DEBUG_TRACE),
            ms_cv: header_text(headers, &MS_CV),
            error_description: header_text(headers, &X_WNS_ERROR_DESCRIPTION),
            device_connection: headers
                .get(&X_WNS_DEVICE_CONNECTION_STATUS)
                .and_then(|v| v.to_str().ok())
                .and_then(DeviceConnection::parse),
        }
    }
}

/// A classified response: what it means, and the headers to log with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    /// What the response means.
    pub outcome: Outcome,
    /// Diagnostic headers, for logs and support.
    pub meta: WnsMeta,
}

/// Classifies a WNS push response from its status and headers.
///
/// Total over every `u16` status and every header map; never panics. Header
/// names are matched case-insensitively (that is `HeaderMap`'s contract),
/// header values case-insensitively where they are keywords. When a header
/// repeats, its first value counts.
///
/// | status | outcome |
/// |---|---|
/// | 200 | by `X-WNS-Status`, else `X-WNS-NotificationStatus`: `received` → `Received`, `dropped` → `Dropped`, `channelthrottled` → `ChannelThrottled`; neither header, or no recognised value → `Received` |
/// | 400 | `BadRequest` |
/// | 401 | `TokenRejected` |
/// | 403 | `CredentialMismatch` |
/// | 404 | `ChannelNotFound` |
/// | 405 | `MethodNotAllowed` |
/// | 406, 429 | `SenderThrottled` with `Retry-After`, else `X-WNS-CONTINUE-AFTER` |
/// | 410 | `DomainBlocked` if the error description contains "Domain Blocked", else `ChannelExpired { revoked }` with `revoked` when it contains "Revoked" |
/// | 413 | `PayloadTooLarge` |
/// | 500..=599 | `ServerError` with `Retry-After` as for 406 |
/// | anything else | `Unexpected` |
///
/// 429 is not in WNS's documentation; it is the generic HTTP "too many
/// requests", which in front of WNS can only mean this sender is going too
/// fast, so it is treated exactly like 406 (slow the credential, honour
/// `Retry-After`) rather than as an unexplained permanent failure.
///
/// A 200 whose status header carries a value we do not know is `Received`:
/// WNS accepted the request, and retrying an accepted wake-up would only
/// duplicate it.
pub fn classify(status: u16, headers: &HeaderMap, now: UnixTime) -> Classified {
    Classified {
        outcome: outcome(status, headers, now),
        meta: WnsMeta::from_headers(headers),
    }
}

/// The [`Outcome`] part of [`classify`] alone, without copying the
/// diagnostic headers: the sender's hot path, which keeps the header map
/// and reads [`WnsMeta`] from it only when a report is logged or shown.
pub fn outcome(status: u16, headers: &HeaderMap, now: UnixTime) -> Outcome {
    match status {
        200 => notification_status(headers),
        400 => Outcome::BadRequest,
        401 => Outcome::TokenRejected,
        403 => Outcome::CredentialMismatch,
        404 => Outcome::ChannelNotFound,
        405 => Outcome::MethodNotAllowed,
        406 | 429 => Outcome::SenderThrottled {
            retry_after: retry_after(headers, now),
        },
        410 => gone(header_text(headers, &X_WNS_ERROR_DESCRIPTION).as_deref()),
        413 => Outcome::PayloadTooLarge,
        500..=599 => Outcome::ServerError {
            status,
            retry_after: retry_after(headers, now),
        },
        _ => Outcome::Unexpected { status },
    }
}

/// The outcome of a 200, from the first status header with a known value.
fn notification_status(headers: &HeaderMap) -> Outcome {
    [&X_WNS_STATUS, &X_WNS_NOTIFICATION_STATUS]
        .into_iter()
        .filter_map(|name| headers.get(name))
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| {
            let v = v.trim();
            if v.eq_ignore_ascii_case("received") {
                Some(Outcome::Received)
            } else if v.eq_ignore_ascii_case("dropped") {
                Some(Outcome::Dropped)
            } else if v.eq_ignore_ascii_case("channelthrottled") {
                Some(Outcome::ChannelThrottled)
            } else {
                None
            }
        })
        .unwrap_or(Outcome::Received)
}

/// The outcome of a 410, from `X-WNS-Error-Description`.
fn gone(description: Option<&str>) -> Outcome {
    let d = description.unwrap_or("");
    if contains_ignore_case(d, "domain blocked") {
        Outcome::DomainBlocked
    } else {
        Outcome::ChannelExpired {
            revoked: contains_ignore_case(d, "revoked"),
        }
    }
}

fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    let (h, n) = (haystack.as_bytes(), needle.as_bytes());
    n.is_empty() || h.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
}

/// `Retry-After`, falling back to `X-WNS-CONTINUE-AFTER`, in either HTTP form
/// (delta-seconds or HTTP-date relative to `now`), clamped to
/// [`MAX_RETRY_AFTER`]. A date in the past means "now": zero.
fn retry_after(headers: &HeaderMap, now: UnixTime) -> Option<Duration> {
    [&RETRY_AFTER, &X_WNS_CONTINUE_AFTER]
        .into_iter()
        .filter_map(|name| headers.get(name))
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| parse_retry_after(v, now))
}

/// Parses one `Retry-After` value: delta-seconds or an HTTP-date.
pub fn parse_retry_after(value: &str, now: UnixTime) -> Option<Duration> {
    let v = value.trim();
    let secs = if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // Overlong digit strings saturate rather than fail: "a very long time".
        v.parse::<u64>().unwrap_or(u64::MAX)
    } else {
        let at = parse_http_date(v)?;
        u64::try_from(at.saturating_sub(i64::from(now.secs()))).unwrap_or(0)
    };
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

/// Parses an HTTP-date (RFC 9110 section 5.6.7) in any of its three forms to
/// seconds since the epoch: IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`),
/// RFC 850 (`Sunday, 06-Nov-94 08:49:37 GMT`) and asctime
/// (`Sun Nov  6 08:49:37 1994`). The weekday is not checked.
pub fn parse_http_date(s: &str) -> Option<i64> {
    let mut parts = s.split_ascii_whitespace();
    let first = parts.next()?;
    let rest: Vec<&str> = parts.collect();
    let (day, month, year, hms) = match rest.as_slice() {
        // IMF-fixdate: "Sun," "06" "Nov" "1994" "08:49:37" "GMT"
        [d, m, y, hms, "GMT"] if first.ends_with(',') => (num(d)?, month(m)?, year_full(y)?, *hms),
        // RFC 850: "Sunday," "06-Nov-94" "08:49:37" "GMT"
        [dmy, hms, "GMT"] if first.ends_with(',') => {
            let mut it = dmy.split('-');
            let (d, m, y) = (it.next()?, it.next()?, it.next()?);
            if it.next().is_some() || y.len() != 2 {
                return None;
            }
            let yy = num(y)?;
            let year = if yy < 70 { 2000 + yy } else { 1900 + yy };
            (num(d)?, month(m)?, year as i32, *hms)
        }
        // asctime: "Sun" "Nov" "6" "08:49:37" "1994"
        [m, d, hms, y] => (num(d)?, month(m)?, year_full(y)?, *hms),
        _ => return None,
    };
    let mut t = hms.split(':');
    let (h, mi, sec) = (num(t.next()?)?, num(t.next()?)?, num(t.next()?)?);
    if t.next().is_some() {
        return None;
    }
    let byte = |n: u32| u8::try_from(n).ok();
    let date = time::Date::from_calendar_date(year, month, byte(day)?).ok()?;
    let dt = date.with_hms(byte(h)?, byte(mi)?, byte(sec)?).ok()?;
    Some(dt.assume_utc().unix_timestamp())
}

/// A one- to four-digit decimal number.
fn num(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 4 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn year_full(s: &str) -> Option<i32> {
    if s.len() != 4 {
        return None;
    }
    num(s).map(|y| y as i32)
}

fn month(s: &str) -> Option<time::Month> {
    use time::Month::*;
    const MONTHS: [(&str, time::Month); 12] = [
        ("Jan", January),
        ("Feb", February),
        ("Mar", March),
        ("Apr", April),
        ("May", May),
        ("Jun", June),
        ("Jul", July),
        ("Aug", August),
        ("Sep", September),
        ("Oct", October),
        ("Nov", November),
        ("Dec", December),
    ];
    MONTHS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(s))
        .map(|(_, m)| *m)
}

/// The first value of `name` as bounded printable ASCII, or `None` when
/// absent or blank.
fn header_text(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let raw = headers.get(name)?.as_bytes();
    let raw = raw.trim_ascii();
    if raw.is_empty() {
        return None;
    }
    let kept = &raw[..raw.len().min(MAX_META_LEN)];
    Some(
        kept.iter()
            .map(|&b| {
                if (0x20..=0x7e).contains(&b) {
                    b as char
                } else {
                    '?'
                }
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    const NOW: UnixTime = UnixTime(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn outcome(status: u16, pairs: &[(&str, &str)]) -> Outcome {
        classify(status, &headers(pairs), NOW).outcome
    }

    #[test]
    fn row_200_status_values_in_any_case_and_either_header() {
        for name in ["X-WNS-Status", "x-wns-status", "X-Wns-NotificationStatus"] {
            assert_eq!(outcome(200, &[(name, "received")]), Outcome::Received);
            assert_eq!(outcome(200, &[(name, "Received")]), Outcome::Received);
            assert_eq!(outcome(200, &[(name, "DROPPED")]), Outcome::Dropped);
            assert_eq!(
                outcome(200, &[(name, " ChannelThrottled ")]),
                Outcome::ChannelThrottled
            );
        }
    }

    #[test]
    fn row_200_without_status_header_is_received() {
        assert_eq!(outcome(200, &[]), Outcome::Received);
        assert_eq!(outcome(200, &[("X-WNS-Msg-ID", "1")]), Outcome::Received);
    }

    #[test]
    fn row_200_new_header_wins_and_unknown_values_fall_through() {
        assert_eq!(
            outcome(
                200,
                &[
                    ("X-WNS-Status", "dropped"),
                    ("X-WNS-NotificationStatus", "received")
                ]
            ),
            Outcome::Dropped
        );
        assert_eq!(
            outcome(
                200,
                &[
                    ("X-WNS-Status", "something-new"),
                    ("X-WNS-NotificationStatus", "channelthrottled")
                ]
            ),
            Outcome::ChannelThrottled
        );
        assert_eq!(
            outcome(200, &[("X-WNS-Status", "something-new")]),
            Outcome::Received
        );
    }

    #[test]
    fn status_header_is_ignored_on_other_statuses() {
        assert_eq!(
            outcome(404, &[("X-WNS-Status", "received")]),
            Outcome::ChannelNotFound
        );
    }

    #[test]
    fn rows_with_fixed_outcomes() {
        assert_eq!(outcome(400, &[]), Outcome::BadRequest);
        assert_eq!(outcome(401, &[]), Outcome::TokenRejected);
        assert_eq!(outcome(403, &[]), Outcome::CredentialMismatch);
        assert_eq!(outcome(404, &[]), Outcome::ChannelNotFound);
        assert_eq!(outcome(405, &[]), Outcome::MethodNotAllowed);
        assert_eq!(outcome(413, &[]), Outcome::PayloadTooLarge);
    }

    #[test]
    fn row_406_retry_after_seconds() {
        assert_eq!(
            outcome(406, &[("Retry-After", "120")]),
            Outcome::SenderThrottled {
                retry_after: Some(Duration::from_secs(120))
            }
        );
        assert_eq!(
            outcome(406, &[]),
            Outcome::SenderThrottled { retry_after: None }
        );
    }

    #[test]
    fn row_406_retry_after_http_date() {
        assert_eq!(
            outcome(406, &[("retry-after", "Sun, 06 Nov 1994 08:50:37 GMT")]),
            Outcome::SenderThrottled {
                retry_after: Some(Duration::from_secs(60))
            }
        );
        // A date in the past: retry now.
        assert_eq!(
            outcome(406, &[("Retry-After", "Sun, 06 Nov 1994 08:00:00 GMT")]),
            Outcome::SenderThrottled {
                retry_after: Some(Duration::ZERO)
            }
        );
    }

    #[test]
    fn row_406_continue_after_fallback() {
        assert_eq!(
            outcome(406, &[("X-WNS-CONTINUE-AFTER", "30")]),
            Outcome::SenderThrottled {
                retry_after: Some(Duration::from_secs(30))
            }
        );
        // Retry-After wins when both are present.
        assert_eq!(
            outcome(406, &[("X-WNS-Continue-After", "30"), ("Retry-After", "5")]),
            Outcome::SenderThrottled {
                retry_after: Some(Duration::from_secs(5))
            }
        );
        // An unparsable Retry-After falls back too.
        assert_eq!(
            outcome(
                406,
                &[("Retry-After", "soon"), ("X-WNS-Continue-After", "7")]
            ),
            Outcome::SenderThrottled {
                retry_after: Some(Duration::from_secs(7))
            }
        );
    }

    #[test]
    fn retry_after_is_clamped() {
        assert_eq!(
            outcome(406, &[("Retry-After", "99999999999999999999999")]),
            Outcome::SenderThrottled {
                retry_after: Some(MAX_RETRY_AFTER)
            }
        );
    }

    #[test]
    fn row_429_is_sender_throttled() {
        assert_eq!(
            outcome(429, &[("Retry-After", "3")]),
            Outcome::SenderThrottled {
                retry_after: Some(Duration::from_secs(3))
            }
        );
    }

    #[test]
    fn row_410_expired_revoked_and_domain_blocked() {
        assert_eq!(
            outcome(410, &[]),
            Outcome::ChannelExpired { revoked: false }
        );
        assert_eq!(
            outcome(410, &[("X-WNS-Error-Description", "Revoked channel URL")]),
            Outcome::ChannelExpired { revoked: true }
        );
        assert_eq!(
            outcome(410, &[("x-wns-error-description", "revoked channel url")]),
            Outcome::ChannelExpired { revoked: true }
        );
        assert_eq!(
            outcome(410, &[("X-WNS-Error-Description", "Domain Blocked")]),
            Outcome::DomainBlocked
        );
        assert_eq!(
            outcome(410, &[("X-WNS-Error-Description", "The domain blocked.")]),
            Outcome::DomainBlocked
        );
    }

    #[test]
    fn rows_500_and_503_keep_status_and_retry_after() {
        assert_eq!(
            outcome(500, &[]),
            Outcome::ServerError {
                status: 500,
                retry_after: None
            }
        );
        assert_eq!(
            outcome(503, &[("Retry-After", "10")]),
            Outcome::ServerError {
                status: 503,
                retry_after: Some(Duration::from_secs(10))
            }
        );
        assert_eq!(
            outcome(502, &[]),
            Outcome::ServerError {
                status: 502,
                retry_after: None
            }
        );
    }

    #[test]
    fn other_statuses_are_unexpected() {
        for s in [0, 100, 201, 204, 301, 402, 409, 418, 600, u16::MAX] {
            assert_eq!(outcome(s, &[]), Outcome::Unexpected { status: s });
        }
    }

    #[test]
    fn meta_headers_in_any_case() {
        let h = headers(&[
            ("x-WNS-msg-id", "1ACB0D5E2AC9F4E0"),
            ("X-WNS-DEBUG-TRACE", "DB5SCH101111231"),
            ("Ms-Cv", "Yd1z8cOtQkWNA8Ld.0"),
            ("X-WNS-Error-Description", "Revoked channel URL"),
            ("X-WNS-DeviceConnectionStatus", "Connected"),
        ]);
        let c = classify(410, &h, NOW);
        assert_eq!(c.meta.msg_id.as_deref(), Some("1ACB0D5E2AC9F4E0"));
        assert_eq!(c.meta.debug_trace.as_deref(), Some("DB5SCH101111231"));
        assert_eq!(c.meta.ms_cv.as_deref(), Some("Yd1z8cOtQkWNA8Ld.0"));
        assert_eq!(
            c.meta.error_description.as_deref(),
            Some("Revoked channel URL")
        );
        assert_eq!(c.meta.device_connection, Some(DeviceConnection::Connected));
        assert_eq!(
            classify(200, &HeaderMap::new(), NOW).meta,
            WnsMeta::default()
        );
    }

    #[test]
    fn device_connection_values() {
        let dc = |v: &str| DeviceConnection::parse(v);
        assert_eq!(dc("connected"), Some(DeviceConnection::Connected));
        assert_eq!(dc("Disconnected"), Some(DeviceConnection::Disconnected));
        assert_eq!(
            dc("tempdisconnected"),
            Some(DeviceConnection::TempDisconnected)
        );
        assert_eq!(
            dc("TempConnected"),
            Some(DeviceConnection::TempDisconnected)
        );
        assert_eq!(dc("sleeping"), None);
    }

    #[test]
    fn meta_text_is_bounded_and_lossy() {
        let mut h = HeaderMap::new();
        let mut raw = vec![b'a'; 1000];
        raw[0] = 0xff;
        raw[1] = b'\t';
        h.insert(X_WNS_MSG_ID, HeaderValue::from_bytes(&raw).unwrap());
        h.insert(X_WNS_DEBUG_TRACE, HeaderValue::from_static("   "));
        let m = WnsMeta::from_headers(&h);
        let id = m.msg_id.unwrap();
        assert_eq!(id.len(), MAX_META_LEN);
        assert!(id.starts_with("??aaa"));
        assert_eq!(m.debug_trace, None);
    }

    #[test]
    fn http_date_forms() {
        let t = 784_111_777;
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"), Some(t));
        assert_eq!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"), Some(t));
        assert_eq!(parse_http_date("Sun Nov  6 08:49:37 1994"), Some(t));
        assert_eq!(
            parse_http_date("Wed, 25 Nov 2026 10:00:00 GMT"),
            Some(1_795_600_800)
        );
        for bad in [
            "",
            "Sun, 06 Nov 1994 08:49:37 PST",
            "Sun, 31 Feb 1994 08:49:37 GMT",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 25:49:37 GMT",
            "Sun, 06 Nov 1994 08:49 GMT",
            "Sun, 06 Nov 1994 300:49:37 GMT",
            "Sun, 262 Nov 1994 08:49:37 GMT",
            "tomorrow",
        ] {
            assert_eq!(parse_http_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn labels_and_dead_reasons() {
        let all = [
            Outcome::Received,
            Outcome::Dropped,
            Outcome::ChannelThrottled,
            Outcome::BadRequest,
            Outcome::TokenRejected,
            Outcome::CredentialMismatch,
            Outcome::ChannelNotFound,
            Outcome::MethodNotAllowed,
            Outcome::SenderThrottled { retry_after: None },
            Outcome::ChannelExpired { revoked: true },
            Outcome::DomainBlocked,
            Outcome::PayloadTooLarge,
            Outcome::ServerError {
                status: 500,
                retry_after: None,
            },
            Outcome::Unexpected { status: 402 },
        ];
        let labels: Vec<_> = all.iter().map(Outcome::label).collect();
        assert_eq!(labels, Outcome::LABELS);
        for o in &all {
            assert_eq!(Outcome::LABELS[o.index()], o.label());
        }
        assert_eq!(
            Outcome::ChannelNotFound.dead_reason(),
            Some(DeadReason::Wns404)
        );
        assert_eq!(
            Outcome::ChannelExpired { revoked: false }.dead_reason(),
            Some(DeadReason::Wns410)
        );
        assert_eq!(
            Outcome::ChannelExpired { revoked: true }.dead_reason(),
            Some(DeadReason::Wns410)
        );
        assert_eq!(
            Outcome::CredentialMismatch.dead_reason(),
            Some(DeadReason::CredentialMismatch)
        );
        let dead: Vec<_> = all.iter().filter(|o| o.dead_reason().is_some()).collect();
        assert_eq!(dead.len(), 3);
        assert_eq!(Outcome::DomainBlocked.dead_reason(), None);
    }

    proptest! {
        #[test]
        fn classify_is_total(status in any::<u16>(),
                             pairs in proptest::collection::vec(
                                 (prop::sample::select(vec![
                                     "x-wns-status", "x-wns-notificationstatus", "retry-after",
                                     "x-wns-continue-after", "x-wns-error-description",
                                     "x-wns-msg-id", "x-wns-deviceconnectionstatus", "ms-cv"]),
                                  proptest::collection::vec(any::<u8>(), 0..300)), 0..8),
                             now in any::<u32>()) {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                if let Ok(v) = HeaderValue::from_bytes(&v) {
                    h.append(HeaderName::from_static(k), v);
                }
            }
            let c = classify(status, &h, UnixTime(now));
            prop_assert!(Outcome::LABELS.contains(&c.outcome.label()));
            prop_assert_eq!(super::outcome(status, &h, UnixTime(now)), c.outcome);
            for text in [&c.meta.msg_id, &c.meta.debug_trace, &c.meta.ms_cv, &c.meta.error_description]
                .into_iter().flatten() {
                prop_assert!(text.len() <= MAX_META_LEN);
                prop_assert!(text.bytes().all(|b| (0x20..=0x7e).contains(&b)));
            }
            if let Outcome::SenderThrottled { retry_after: Some(d) }
                | Outcome::ServerError { retry_after: Some(d), .. } = c.outcome {
                prop_assert!(d <= MAX_RETRY_AFTER);
            }
        }

        #[test]
        fn http_date_never_panics(s in "\\PC{0,40}") {
            let _ = parse_http_date(&s);
            let _ = parse_retry_after(&s, NOW);
        }
    }
}
