//! The wake-up request: its body and headers.
//!
//! A wake-up is a raw notification whose content does not matter: the tap
//! alone makes the device open an OMA-DM session. The headers are exactly
//! the required four (`Authorization`, `Content-Type`, `Content-Length`,
//! `X-WNS-Type`) plus the ones recommended for MDM wakes
//! (`X-WNS-Cache-Policy: cache`, optional `X-WNS-TTL`, optional
//! `X-WNS-RequestForStatus`, a fresh `MS-CV`), and nothing else: no
//! `Expect`, no `Transfer-Encoding`, which WNS does not support.
//!
//! This is the hot path (hundreds of thousands of requests a second), so the
//! constant names and values are `const` (no allocation to build them), the
//! `Authorization` value is built once per token ([`AccessToken`]), and
//! [`write_wake_headers`] fills a reused `HeaderMap` in place.

use super::headers::MS_CV;
pub use super::headers::{X_WNS_CACHE_POLICY, X_WNS_REQUEST_FOR_STATUS, X_WNS_TTL, X_WNS_TYPE};
use super::token::AccessToken;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};

/// The wake-up body: small, non-empty, meaningless to the device.
pub const WAKE_BODY: &[u8] = b"wake";
/// Largest body WNS accepts, in bytes (it answers 413 above).
pub const MAX_BODY: usize = 5000;

const OCTET_STREAM: HeaderValue = HeaderValue::from_static("application/octet-stream");
const WNS_RAW: HeaderValue = HeaderValue::from_static("wns/raw");
const CACHE: HeaderValue = HeaderValue::from_static("cache");
const TRUE: HeaderValue = HeaderValue::from_static("true");
const WAKE_BODY_LEN: HeaderValue = HeaderValue::from_static("4");

/// Most headers a wake-up carries.
pub const MAX_WAKE_HEADERS: usize = 8;

/// Why a body cannot be sent as a raw notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Zero bytes.
    #[error("a raw notification body must not be empty")]
    Empty,
    /// More than [`MAX_BODY`] bytes (the length is given).
    #[error("a raw notification body must be at most {MAX_BODY} bytes, got {0}")]
    TooLarge(usize),
}

/// Checks a body against WNS's limits: non-empty, at most [`MAX_BODY`].
pub fn check_body(body: &[u8]) -> Result<(), BodyError> {
    match body.len() {
        0 => Err(BodyError::Empty),
        n if n > MAX_BODY => Err(BodyError::TooLarge(n)),
        _ => Ok(()),
    }
}

/// The headers of one wake-up, in this order and no others:
/// `Authorization: Bearer <token>`, `Content-Type: application/octet-stream`,
/// `Content-Length: <body_len>`, `X-WNS-Type: wns/raw`,
/// `X-WNS-Cache-Policy: cache`, `X-WNS-TTL` when `ttl_secs` is set,
/// `X-WNS-RequestForStatus: true` when `request_status`, and `MS-CV`.
///
/// `MS-CV` is left out if `ms_cv` is not a valid header value (it is
/// recommended, not required; [`new_cv`] always produces a valid one).
/// The body length is not checked here: see [`check_body`].
pub fn wake_headers(
    token: &AccessToken,
    ttl_secs: Option<u32>,
    request_status: bool,
    ms_cv: &str,
    body_len: usize,
) -> Vec<(HeaderName, HeaderValue)> {
    let cv = HeaderValue::from_str(ms_cv).ok();
    let mut out = Vec::with_capacity(MAX_WAKE_HEADERS);
    out.extend(entries(token, ttl_secs, request_status, cv, body_len));
    out
}

/// Replaces the contents of `headers` with exactly the wake-up headers of
/// [`wake_headers`], reusing the list's storage. With a reused list, the
/// standard body length and a prepared `ms_cv` value, nothing is allocated
/// except for `X-WNS-TTL`'s digits.
pub fn write_wake_headers(
    headers: &mut Vec<(HeaderName, HeaderValue)>,
    token: &AccessToken,
    ttl_secs: Option<u32>,
    request_status: bool,
    ms_cv: HeaderValue,
    body_len: usize,
) {
    headers.clear();
    headers.extend(entries(
        token,
        ttl_secs,
        request_status,
        Some(ms_cv),
        body_len,
    ));
}

fn entries(
    token: &AccessToken,
    ttl_secs: Option<u32>,
    request_status: bool,
    ms_cv: Option<HeaderValue>,
    body_len: usize,
) -> impl Iterator<Item = (HeaderName, HeaderValue)> {
    let content_length = if body_len == WAKE_BODY.len() {
        WAKE_BODY_LEN
    } else {
        HeaderValue::from(body_len)
    };
    [
        Some((AUTHORIZATION, token.wire_authorization().clone())),
        Some((CONTENT_TYPE, OCTET_STREAM)),
        Some((CONTENT_LENGTH, content_length)),
        Some((X_WNS_TYPE, WNS_RAW)),
        Some((X_WNS_CACHE_POLICY, CACHE)),
        ttl_secs.map(|t| (X_WNS_TTL, HeaderValue::from(t))),
        request_status.then_some((X_WNS_REQUEST_FOR_STATUS, TRUE)),
        ms_cv.map(|cv| (MS_CV, cv)),
    ]
    .into_iter()
    .flatten()
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// A fresh correlation vector (MS-CV v1) from caller-supplied randomness:
/// the standard base64 of the low 96 bits of `rand` (16 characters) followed
/// by `.0`. Always a valid header value, always 18 bytes.
pub fn new_cv(rand: u128) -> String {
    let bytes = cv_bytes(rand);
    // Only base64 characters and '.', so this is valid UTF-8.
    String::from_utf8_lossy(&bytes).into_owned()
}

/// [`new_cv`] as a ready header value, for [`write_wake_headers`].
pub fn new_cv_header(rand: u128) -> HeaderValue {
    let bytes = cv_bytes(rand);
    HeaderValue::from_bytes(&bytes).unwrap_or(HeaderValue::from_static("AAAAAAAAAAAAAAAA.0"))
}

fn cv_bytes(rand: u128) -> [u8; 18] {
    let raw = rand.to_be_bytes();
    let base = &raw[4..16];
    let mut out = [0u8; 18];
    for (i, chunk) in base.chunks_exact(3).enumerate() {
        let n = (u32::from(chunk[0]) << 16) | (u32::from(chunk[1]) << 8) | u32::from(chunk[2]);
        for j in 0..4 {
            out[i * 4 + j] = BASE64[((n >> (18 - 6 * j)) & 0x3f) as usize];
        }
    }
    out[16] = b'.';
    out[17] = b'0';
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    fn token() -> AccessToken {
        AccessToken::new(
            "EgAcAQMAAAAALYAAY/c+Huwi3Fv4Ck10UrKNmtxRO6Njk2MgA=",
            Duration::from_secs(60),
        )
        .unwrap()
    }

    fn names(h: &[(HeaderName, HeaderValue)]) -> Vec<&str> {
        h.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[test]
    fn body_limits() {
        assert_eq!(check_body(WAKE_BODY), Ok(()));
        assert_eq!(check_body(b""), Err(BodyError::Empty));
        assert_eq!(check_body(&[0; MAX_BODY]), Ok(()));
        assert_eq!(
            check_body(&[0; MAX_BODY + 1]),
            Err(BodyError::TooLarge(5001))
        );
    }

    #[test]
    fn minimal_wake_headers_exactly() {
        let h = wake_headers(&token(), None, false, "Yd1z8cOtQkWNA8Ld.0", WAKE_BODY.len());
        assert_eq!(
            names(&h),
            [
                "authorization",
                "content-type",
                "content-length",
                "x-wns-type",
                "x-wns-cache-policy",
                "ms-cv"
            ]
        );
        let v = |i: usize| h[i].1.to_str().unwrap().to_owned();
        assert_eq!(
            v(0),
            "Bearer EgAcAQMAAAAALYAAY/c+Huwi3Fv4Ck10UrKNmtxRO6Njk2MgA="
        );
        // Indexable by HPACK: sent once per h2 connection, not per push.
        assert!(!h[0].1.is_sensitive());
        assert_eq!(v(1), "application/octet-stream");
        assert_eq!(v(2), "4");
        assert_eq!(v(3), "wns/raw");
        assert_eq!(v(4), "cache");
        assert_eq!(v(5), "Yd1z8cOtQkWNA8Ld.0");
    }

    #[test]
    fn optional_headers() {
        let h = wake_headers(&token(), Some(3600), true, "x.0", 17);
        assert_eq!(
            names(&h),
            [
                "authorization",
                "content-type",
                "content-length",
                "x-wns-type",
                "x-wns-cache-policy",
                "x-wns-ttl",
                "x-wns-requestforstatus",
                "ms-cv"
            ]
        );
        assert_eq!(h[2].1, "17");
        assert_eq!(h[5].1, "3600");
        assert_eq!(h[6].1, "true");
        assert!(h.len() <= MAX_WAKE_HEADERS);
    }

    #[test]
    fn invalid_cv_is_left_out() {
        let h = wake_headers(&token(), None, false, "bad\nvalue", 4);
        assert!(!names(&h).contains(&"ms-cv"));
    }

    #[test]
    fn write_into_a_reused_list_replaces_everything() {
        let mut list = vec![
            (
                HeaderName::from_static("expect"),
                HeaderValue::from_static("100-continue"),
            ),
            (
                HeaderName::from_static("transfer-encoding"),
                HeaderValue::from_static("chunked"),
            ),
        ];
        write_wake_headers(&mut list, &token(), Some(60), false, new_cv_header(7), 4);
        assert_eq!(list, wake_headers(&token(), Some(60), false, &new_cv(7), 4));
    }

    #[test]
    fn cv_is_base64_of_96_bits() {
        assert_eq!(new_cv(0), "AAAAAAAAAAAAAAAA.0");
        let mut raw = [0u8; 16];
        raw[4..].copy_from_slice(b"hello world!");
        assert_eq!(new_cv(u128::from_be_bytes(raw)), "aGVsbG8gd29ybGQh.0");
        assert_eq!(new_cv(u128::MAX), "////////////////.0");
        // The top 32 bits are not used.
        assert_eq!(new_cv(u128::MAX << 96), new_cv(0));
    }

    proptest! {
        #[test]
        fn cv_shape(r in any::<u128>()) {
            let cv = new_cv(r);
            prop_assert_eq!(cv.len(), 18);
            prop_assert!(cv.ends_with(".0"));
            prop_assert!(cv[..16].bytes().all(|b| BASE64.contains(&b)));
            prop_assert_eq!(new_cv_header(r), HeaderValue::from_str(&cv).unwrap());
        }

        #[test]
        fn cv_is_injective_on_96_bits(a in any::<u128>(), b in any::<u128>()) {
            let mask = (1u128 << 96) - 1;
            prop_assert_eq!(new_cv(a) == new_cv(b), a & mask == b & mask);
        }
    }
}
