//! The final result of one wake-up, as one typed value.
//!
//! [`PushResult`] is what a wake ends with, from the retry machine's
//! verdict ([`Decision`](super::Decision)) or from a failure before or
//! outside WNS (no credentials, a transport error). Everything that shows
//! a result derives from it here and nowhere else: the metric label
//! (`wnsgate_pushes_total{result}`), the JSON value (`result` in `?wait=true`
//! answers and in a device's `last_push`), and the one-byte code the
//! registry keeps for a device's last push ([`PushResult::code`], pinned by
//! a test: a code once given never changes meaning).

use super::retry::FinalFailure;

/// How a wake-up ended.
///
/// The discriminant is the registry's code for the result. New results are
/// added at the end with the next free code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PushResult {
    /// WNS answered 200 `received`.
    Delivered = 0,
    /// WNS declared the channel dead (404, 410 expired or revoked, 403).
    ChannelDead = 1,
    /// WNS answered 200 `dropped`.
    Dropped = 2,
    /// The attempt budget ran out on retryable answers.
    AttemptsExhausted = 3,
    /// WNS asked for a wait longer than the policy allows.
    RetryAfterTooLong = 4,
    /// 401 again after the one token refresh.
    TokenRejectedTwice = 5,
    /// 410 Domain Blocked: WNS blocked this sender.
    DomainBlocked = 6,
    /// 400: our request was malformed.
    BadRequest = 7,
    /// 405: wrong method.
    MethodNotAllowed = 8,
    /// 413: body too large.
    PayloadTooLarge = 9,
    /// A status WNS does not document.
    Unexpected = 10,
    /// The credential is paused by WNS for longer than a wake may wait.
    CredentialThrottled = 11,
    /// No access token could be had.
    TokenUnavailable = 12,
    /// No `[[wns.apps]]` entry for the device's PFN.
    NoCredentials = 13,
    /// The channel URI does not parse as a WNS target.
    BadChannelUri = 14,
    /// The connection to WNS could not be opened.
    ConnectFailed = 15,
    /// The TLS handshake with WNS failed.
    TlsFailed = 16,
    /// WNS did not answer in time.
    Timeout = 17,
    /// The connection died before answering, more often than a wake may
    /// be resent.
    ConnectionLost = 18,
    /// WNS broke the HTTP protocol.
    ProtocolError = 19,
    /// The next retry would have gone out after `wns.retry_window`: WNS
    /// failed (5xx, 406, lost connections, failed connects, its
    /// authority's circuit open) for the wake's whole window.
    RetryWindowExhausted = 20,
}

impl PushResult {
    /// Every result, in code order.
    pub const ALL: [PushResult; 21] = [
        PushResult::Delivered,
        PushResult::ChannelDead,
        PushResult::Dropped,
        PushResult::AttemptsExhausted,
        PushResult::RetryAfterTooLong,
        PushResult::TokenRejectedTwice,
        PushResult::DomainBlocked,
        PushResult::BadRequest,
        PushResult::MethodNotAllowed,
        PushResult::PayloadTooLarge,
        PushResult::Unexpected,
        PushResult::CredentialThrottled,
        PushResult::TokenUnavailable,
        PushResult::NoCredentials,
        PushResult::BadChannelUri,
        PushResult::ConnectFailed,
        PushResult::TlsFailed,
        PushResult::Timeout,
        PushResult::ConnectionLost,
        PushResult::ProtocolError,
        PushResult::RetryWindowExhausted,
    ];

    /// The stable snake_case name: the metric label and the JSON value.
    pub fn label(self) -> &'static str {
        match self {
            PushResult::Delivered => "delivered",
            PushResult::ChannelDead => "channel_dead",
            PushResult::Dropped => "dropped",
            PushResult::AttemptsExhausted => "attempts_exhausted",
            PushResult::RetryAfterTooLong => "retry_after_too_long",
            PushResult::TokenRejectedTwice => "token_rejected_twice",
            PushResult::DomainBlocked => "domain_blocked",
            PushResult::BadRequest => "bad_request",
            PushResult::MethodNotAllowed => "method_not_allowed",
            PushResult::PayloadTooLarge => "payload_too_large",
            PushResult::Unexpected => "unexpected",
            PushResult::CredentialThrottled => "credential_throttled",
            PushResult::TokenUnavailable => "token_unavailable",
            PushResult::NoCredentials => "no_credentials",
            PushResult::BadChannelUri => "bad_channel_uri",
            PushResult::ConnectFailed => "connect_failed",
            PushResult::TlsFailed => "tls_failed",
            PushResult::Timeout => "timeout",
            PushResult::ConnectionLost => "connection_lost",
            PushResult::ProtocolError => "protocol_error",
            PushResult::RetryWindowExhausted => "retry_window_exhausted",
        }
    }

    /// The code the registry keeps for a device's last push.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The result with `code`; `None` for a code no result has (a newer
    /// version's, shown as `other`).
    pub fn from_code(code: u8) -> Option<PushResult> {
        PushResult::ALL.get(usize::from(code)).copied()
    }

    /// The result of a push that ended on a final failure.
    pub fn from_failure(f: FinalFailure) -> PushResult {
        match f {
            FinalFailure::Dropped => PushResult::Dropped,
            FinalFailure::BadRequest => PushResult::BadRequest,
            FinalFailure::MethodNotAllowed => PushResult::MethodNotAllowed,
            FinalFailure::PayloadTooLarge => PushResult::PayloadTooLarge,
            FinalFailure::Unexpected { .. } => PushResult::Unexpected,
            FinalFailure::TokenRejectedTwice => PushResult::TokenRejectedTwice,
            FinalFailure::DomainBlocked => PushResult::DomainBlocked,
            FinalFailure::AttemptsExhausted { .. } => PushResult::AttemptsExhausted,
            FinalFailure::RetryAfterTooLong { .. } => PushResult::RetryAfterTooLong,
            FinalFailure::RetryWindowExhausted { .. } => PushResult::RetryWindowExhausted,
        }
    }
}

impl std::fmt::Display for PushResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

impl serde::Serialize for PushResult {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The registry's codes, written out: a change here changes what a
    /// stored code means, so it must be on purpose.
    #[test]
    fn codes_are_pinned() {
        let pinned = [
            (0, "delivered"),
            (1, "channel_dead"),
            (2, "dropped"),
            (3, "attempts_exhausted"),
            (4, "retry_after_too_long"),
            (5, "token_rejected_twice"),
            (6, "domain_blocked"),
            (7, "bad_request"),
            (8, "method_not_allowed"),
            (9, "payload_too_large"),
            (10, "unexpected"),
            (11, "credential_throttled"),
            (12, "token_unavailable"),
            (13, "no_credentials"),
            (14, "bad_channel_uri"),
            (15, "connect_failed"),
            (16, "tls_failed"),
            (17, "timeout"),
            (18, "connection_lost"),
            (19, "protocol_error"),
            (20, "retry_window_exhausted"),
        ];
        assert_eq!(pinned.len(), PushResult::ALL.len());
        for (code, label) in pinned {
            let r = PushResult::from_code(code).expect("a result has this code");
            assert_eq!((r.code(), r.label()), (code, label));
        }
        assert_eq!(PushResult::from_code(21), None);
        assert_eq!(PushResult::from_code(255), None);
    }

    #[test]
    fn all_is_in_code_order_and_labels_are_unique() {
        for (i, r) in PushResult::ALL.iter().enumerate() {
            assert_eq!(usize::from(r.code()), i);
        }
        let labels: std::collections::HashSet<_> =
            PushResult::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), PushResult::ALL.len());
    }

    #[test]
    fn final_failures_keep_their_label() {
        use std::time::Duration;
        for f in [
            FinalFailure::Dropped,
            FinalFailure::BadRequest,
            FinalFailure::MethodNotAllowed,
            FinalFailure::PayloadTooLarge,
            FinalFailure::Unexpected { status: 302 },
            FinalFailure::TokenRejectedTwice,
            FinalFailure::DomainBlocked,
            FinalFailure::AttemptsExhausted {
                last: "server_error",
            },
            FinalFailure::RetryAfterTooLong {
                retry_after: Duration::from_secs(9000),
            },
            FinalFailure::RetryWindowExhausted {
                last: "server_error",
            },
        ] {
            assert_eq!(PushResult::from_failure(f).label(), f.label());
        }
    }
}
