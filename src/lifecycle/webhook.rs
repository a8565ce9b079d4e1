//! Posting due refresh jobs to the MDM server's webhook.
//!
//! `POST {refresh.webhook_url}` with `{"sent_at": ..., "jobs": [...]}` (each
//! job as `GET /v1/devices/{id}/refresh` shows it) and two headers the MDM
//! server checks before trusting the body:
//!
//! - `X-Wnsgate-Timestamp`: Unix seconds when it was sent (reject old ones to
//!   stop replays);
//! - `X-Wnsgate-Signature`: `sha256=` and the lowercase hex HMAC-SHA256,
//!   keyed with `refresh.webhook_secret`, of `{timestamp}.{body}`.
//!
//! Any 2xx answer accepts the jobs. Plain `http://` only: put a TLS proxy in
//! front of an `https://` endpoint.

use super::JobView;
use crate::client::Client;
use crate::config::WebhookSettings;
use crate::core::UnixTime;
use std::time::Duration;

/// The signature header value for `body` sent at `timestamp`.
pub fn signature(secret: &[u8], timestamp: u32, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    let mut out = String::from("sha256=");
    for b in tag.as_ref() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Splits `http://host:port/path` into the base and the path.
fn split_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// webhooks are supported"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let host = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:80")
    };
    Ok((format!("http://{host}"), path.to_owned()))
}

/// Posts `jobs`; `Ok` when the MDM server answered 2xx.
pub fn post(hook: &WebhookSettings, jobs: &[JobView], now: UnixTime) -> Result<(), String> {
    let (base, path) = split_url(&hook.url)?;
    let body = serde_json::to_vec(&serde_json::json!({
        "sent_at": now.to_rfc3339(),
        "jobs": jobs,
    }))
    .map_err(|e| e.to_string())?;
    let mut client = Client::new(&base)
        .map_err(|e| format!("{base}: {e}"))?
        .with_timeout(Duration::from_secs(u64::from(hook.timeout_secs.max(1))));
    client.set_headers(vec![
        ("X-Wnsgate-Timestamp".into(), now.0.to_string()),
        (
            "X-Wnsgate-Signature".into(),
            signature(hook.secret.expose().as_bytes(), now.0, &body),
        ),
    ]);
    let resp = client
        .request("POST", &path, Some("application/json"), &body)
        .map_err(|e| format!("{}: {e}", hook.url))?;
    if (200..300).contains(&resp.status) {
        Ok(())
    } else {
        Err(format!("{} answered {}", hook.url, resp.status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_rfc4231_style_vector() {
        // HMAC-SHA256(key = "key", "The quick brown fox jumps over the lazy dog")
        // is f7bc83f4...; here the message is "{ts}.{body}".
        let s = signature(b"key", 1, b"x");
        assert!(s.starts_with("sha256="));
        assert_eq!(s.len(), 7 + 64);
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"key");
        let tag = ring::hmac::sign(&key, b"1.x");
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(s, format!("sha256={hex}"));
        let fox = ring::hmac::sign(&key, b"The quick brown fox jumps over the lazy dog");
        assert_eq!(
            fox.as_ref()[..4],
            [0xf7, 0xbc, 0x83, 0xf4],
            "ring's HMAC-SHA256 matches the published vector"
        );
    }

    #[test]
    fn urls_split() {
        assert_eq!(
            split_url("http://mdm.local:8081/hooks/refresh").unwrap(),
            ("http://mdm.local:8081".into(), "/hooks/refresh".into())
        );
        assert_eq!(
            split_url("http://127.0.0.1").unwrap(),
            ("http://127.0.0.1:80".into(), "/".into())
        );
        assert!(split_url("https://x/y").is_err());
    }
}
