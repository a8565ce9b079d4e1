//! Reading request bodies within a size limit and a time limit.

use super::error::ApiError;
use bytes::{Bytes, BytesMut};
use http::StatusCode;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::time::Duration;

/// Checks `Content-Type` when present: `expected` (parameters such as
/// `charset` are allowed) or 415.
pub(crate) fn require_content_type(
    headers: &http::HeaderMap,
    expected: &[&str],
) -> Result<(), ApiError> {
    let Some(v) = headers.get(http::header::CONTENT_TYPE) else {
        return Ok(());
    };
    let mime = v
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if expected.contains(&mime.as_str()) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("Content-Type must be {}", expected.join(" or ")),
        ))
    }
}

/// Refuses a declared `Content-Length` over `limit` before reading anything.
pub(crate) fn check_declared_length(headers: &http::HeaderMap, limit: u64) -> Result<(), ApiError> {
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit => Err(ApiError::body_too_large(limit)),
        _ => Ok(()),
    }
}

/// Reads the whole body, refusing more than `limit` bytes and giving up when
/// a frame takes longer than `idle`.
pub(crate) async fn read_limited(
    body: &mut Incoming,
    headers: &http::HeaderMap,
    limit: u64,
    idle: Duration,
) -> Result<Bytes, ApiError> {
    check_declared_length(headers, limit)?;
    let mut buf = BytesMut::new();
    while let Some(chunk) = next_chunk(body, idle).await? {
        if buf.len() as u64 + chunk.len() as u64 > limit {
            return Err(ApiError::body_too_large(limit));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// The next data chunk of `body`, `None` at the end.
pub(crate) async fn next_chunk(
    body: &mut Incoming,
    idle: Duration,
) -> Result<Option<Bytes>, ApiError> {
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    format!("no request body data for {} seconds", idle.as_secs()),
                ))
            }
            Ok(None) => return Ok(None),
            Ok(Some(Err(e))) => {
                return Err(ApiError::bad_request(
                    "body_read_failed",
                    format!("could not read the request body: {e}"),
                ))
            }
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            return Ok(Some(data));
        }
    }
}
