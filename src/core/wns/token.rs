//! WNS access tokens: the token request, parsing the answer, and the
//! per-credential [`TokenCache`] state machine.
//!
//! The cache owns the rules that a well-known .NET sender got wrong: refresh
//! ahead of expiry (at 80% of the lifetime by default), one refresh in flight
//! per credential, a burst of 401s invalidates a token once, a failing token
//! endpoint is retried with exponential backoff, a refresh that never reports
//! back does not block forever, and renewal keeps working across any number
//! of expiries. It performs no I/O: the caller runs the HTTP exchange when
//! told to and reports the result.
//!
//! Secrets never appear in `Debug` output: [`AccessToken`] and
//! [`TokenRequest`] redact themselves.

use http::HeaderValue;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Token endpoint of the classic (Live) flow.
pub const CLASSIC_TOKEN_URL: &str = "https://login.live.com/accesstoken.srf";
/// Scope of the classic flow.
pub const CLASSIC_SCOPE: &str = "notify.windows.com";
/// Scope of the Entra flow.
pub const ENTRA_SCOPE: &str = "https://wns.windows.com/.default";
/// Content type of every token request.
pub const FORM_CONTENT_TYPE: &str = "application/x-www-form-urlencoded";
/// Lifetime assumed when a successful answer has no `expires_in`: the value
/// in every documented example. Older WNS documentation shows answers without
/// the field; should the real lifetime be shorter, the 401 path
/// ([`TokenCache::invalidate`]) recovers.
pub const DEFAULT_EXPIRES_IN: Duration = Duration::from_secs(86_400);
/// Longest text kept from an error answer (OAuth fields), in bytes.
pub const MAX_ERROR_TEXT: usize = 256;

/// Which token endpoint and scope an app credential uses.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TokenFlow {
    /// `login.live.com` with scope `notify.windows.com`; `client_id` is the
    /// package SID (`ms-app://S-1-15-2-...`).
    Classic,
    /// Microsoft Entra ID for `tenant` with scope
    /// `https://wns.windows.com/.default`; `client_id` is the Entra
    /// application id.
    Entra {
        /// Tenant id or domain, e.g. `contoso.onmicrosoft.com`.
        tenant: String,
    },
}

impl TokenFlow {
    /// The URL to POST the token request to. The Entra tenant is
    /// percent-encoded as a path segment.
    pub fn endpoint(&self) -> String {
        match self {
            TokenFlow::Classic => CLASSIC_TOKEN_URL.to_owned(),
            TokenFlow::Entra { tenant } => {
                let mut url = String::from("https://login.microsoftonline.com/");
                percent_encode(tenant, &mut url);
                url.push_str("/oauth2/v2.0/token");
                url
            }
        }
    }

    /// The `scope` form value.
    pub fn scope(&self) -> &'static str {
        match self {
            TokenFlow::Classic => CLASSIC_SCOPE,
            TokenFlow::Entra { .. } => ENTRA_SCOPE,
        }
    }
}

/// A token request body, ready to POST to [`TokenFlow::endpoint`].
/// `Debug` hides the body, which contains the client secret.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// Always [`FORM_CONTENT_TYPE`].
    pub content_type: &'static str,
    /// `grant_type=client_credentials&client_id=...&client_secret=...&scope=...`,
    /// every value form-encoded.
    pub body: String,
}

impl fmt::Debug for TokenRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenRequest")
            .field("content_type", &self.content_type)
            .field(
                "body",
                &format_args!("<redacted, {} bytes>", self.body.len()),
            )
            .finish()
    }
}

/// Builds the client-credentials token request for `flow`.
///
/// For [`TokenFlow::Classic`], a bare package SID (`S-1-15-2-...`) gets the
/// `ms-app://` prefix the endpoint expects (Partner Center shows the SID
/// both ways); any other `client_id` is sent as given.
pub fn token_request(flow: &TokenFlow, client_id: &str, client_secret: &str) -> TokenRequest {
    let mut body = String::with_capacity(96 + 3 * (client_id.len() + client_secret.len()));
    body.push_str("grant_type=client_credentials&client_id=");
    let bare_sid = client_id
        .get(..9)
        .is_some_and(|p| p.eq_ignore_ascii_case("S-1-15-2-"));
    if matches!(flow, TokenFlow::Classic) && bare_sid {
        form_urlencode("ms-app://", &mut body);
    }
    form_urlencode(client_id, &mut body);
    body.push_str("&client_secret=");
    form_urlencode(client_secret, &mut body);
    body.push_str("&scope=");
    form_urlencode(flow.scope(), &mut body);
    TokenRequest {
        content_type: FORM_CONTENT_TYPE,
        body,
    }
}

/// Appends `s` encoded as an `application/x-www-form-urlencoded` value
/// (WHATWG URL standard): ASCII alphanumerics and `*-._` as is, space as
/// `+`, every other byte of the UTF-8 encoding as `%XX` (uppercase hex).
pub fn form_urlencode(s: &str, out: &mut String) {
    for b in s.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => push_pct(b, out),
        }
    }
}

/// Appends `s` with every byte outside RFC 3986 "unreserved" percent-encoded.
fn percent_encode(s: &str, out: &mut String) {
    for b in s.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => push_pct(b, out),
        }
    }
}

fn push_pct(b: u8, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(HEX[usize::from(b >> 4)] as char);
    out.push(HEX[usize::from(b & 0xf)] as char);
}

/// A WNS bearer token and how long it was said to live.
///
/// Cheap to clone (one shared allocation: a clone is a pointer and a
/// reference count), compared by value, and never printed: `Debug` shows
/// only its length and lifetime. The `Authorization` header value is built
/// once here, not per request.
#[derive(Clone)]
pub struct AccessToken(Arc<TokenParts>);

struct TokenParts {
    value: Box<str>,
    authorization: HeaderValue,
    wire_authorization: HeaderValue,
    lifetime: Duration,
}

impl AccessToken {
    /// A token with the given value and lifetime. The value must be
    /// non-empty visible ASCII (it goes into a header); the lifetime must
    /// be non-zero.
    pub fn new(value: &str, lifetime: Duration) -> Result<AccessToken, TokenError> {
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::BadAccessToken);
        }
        if lifetime.is_zero() {
            return Err(TokenError::BadExpiresIn);
        }
        let mut authorization = HeaderValue::from_str(&format!("Bearer {value}"))
            .map_err(|_| TokenError::BadAccessToken)?;
        let wire_authorization = authorization.clone();
        authorization.set_sensitive(true);
        Ok(AccessToken(Arc::new(TokenParts {
            value: Box::from(value),
            authorization,
            wire_authorization,
            lifetime,
        })))
    }

    /// The secret token value. Do not log it.
    pub fn secret(&self) -> &str {
        &self.0.value
    }

    /// The lifetime the token endpoint announced.
    pub fn lifetime(&self) -> Duration {
        self.0.lifetime
    }

    /// `Bearer <token>`, marked sensitive (redacted in `Debug`, never
    /// indexed by HPACK). Cloning it does not allocate.
    pub fn authorization(&self) -> &HeaderValue {
        &self.0.authorization
    }

    /// The same `Bearer <token>`, not marked sensitive, for the requests
    /// that carry it to WNS: HPACK may index it, so on h2 it crosses the
    /// wire once per connection instead of once per push. Safe because a
    /// WNS connection carries only headers this gateway chose (no
    /// attacker-controlled value shares the compression context), so no
    /// compression oracle can be built against it. Never log it.
    pub fn wire_authorization(&self) -> &HeaderValue {
        &self.0.wire_authorization
    }
}

impl PartialEq for AccessToken {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.value == other.0.value
    }
}

impl Eq for AccessToken {}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field(
                "value",
                &format_args!("<redacted, {} bytes>", self.0.value.len()),
            )
            .field("lifetime", &self.0.lifetime)
            .finish()
    }
}

/// Why no token came out of a token exchange.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The endpoint answered an OAuth error (`error`, `error_description`).
    #[error("token endpoint refused (HTTP {status}): {error}{}", description.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    OAuth {
        /// HTTP status of the answer.
        status: u16,
        /// The OAuth `error` code, e.g. `invalid_client` (bounded text).
        error: String,
        /// `error_description`, when given (bounded text).
        description: Option<String>,
    },
    /// A non-success status without OAuth error fields.
    #[error("token endpoint answered HTTP {status}")]
    Http {
        /// HTTP status of the answer.
        status: u16,
    },
    /// A success status whose body is not a JSON object.
    #[error("token endpoint answered HTTP {status} with a body that is not a JSON object")]
    NotJson {
        /// HTTP status of the answer.
        status: u16,
    },
    /// `access_token` missing, empty, or not usable in a header.
    #[error("token answer has no usable access_token")]
    BadAccessToken,
    /// `token_type` present but not `bearer`.
    #[error("token_type is {0:?}, expected bearer")]
    BadTokenType(String),
    /// `expires_in` not a positive number of seconds.
    #[error("expires_in is not a positive number of seconds")]
    BadExpiresIn,
    /// The exchange failed below HTTP (connect, TLS, I/O); reported by the
    /// caller.
    #[error("token request failed: {0}")]
    Transport(String),
    /// A refresh did not report back within the refresh timeout.
    #[error("token refresh timed out")]
    TimedOut,
}

impl TokenError {
    /// A stable snake_case name for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            TokenError::OAuth { .. } => "oauth",
            TokenError::Http { .. } => "http",
            TokenError::NotJson { .. } => "not_json",
            TokenError::BadAccessToken => "bad_access_token",
            TokenError::BadTokenType(_) => "bad_token_type",
            TokenError::BadExpiresIn => "bad_expires_in",
            TokenError::Transport(_) => "transport",
            TokenError::TimedOut => "timed_out",
        }
    }

    /// True when the credential itself is refused (OAuth error on 400/401,
    /// e.g. `invalid_client`): retrying will not help until configuration
    /// changes, so alert. Everything else may be transient.
    pub fn is_credential_error(&self) -> bool {
        matches!(
            self,
            TokenError::OAuth {
                status: 400 | 401,
                ..
            }
        )
    }
}

/// Parses the token endpoint's answer. Never panics, whatever the bytes.
///
/// Success needs a 2xx status and a JSON object with a non-empty
/// `access_token`; `token_type`, when present, must be `bearer` in any case;
/// `expires_in` may be a number or a numeric string (absent:
/// [`DEFAULT_EXPIRES_IN`]). Any status whose body carries an OAuth `error`
/// gives [`TokenError::OAuth`] with the fields bounded to
/// [`MAX_ERROR_TEXT`] printable bytes.
pub fn parse_token_response(status: u16, body: &[u8]) -> Result<AccessToken, TokenError> {
    let json = serde_json::from_slice::<serde_json::Value>(body).ok();
    let obj = json.as_ref().and_then(|v| v.as_object());
    if let Some(error) = obj.and_then(|o| o.get("error")) {
        return Err(TokenError::OAuth {
            status,
            error: bounded_text(&json_text(error)),
            description: obj
                .and_then(|o| o.get("error_description"))
                .map(|d| bounded_text(&json_text(d))),
        });
    }
    if !(200..300).contains(&status) {
        return Err(TokenError::Http { status });
    }
    let obj = obj.ok_or(TokenError::NotJson { status })?;
    let value = obj
        .get("access_token")
        .and_then(|v| v.as_str())
        .ok_or(TokenError::BadAccessToken)?;
    match obj.get("token_type") {
        None => {}
        Some(serde_json::Value::String(t)) if t.eq_ignore_ascii_case("bearer") => {}
        Some(other) => return Err(TokenError::BadTokenType(bounded_text(&json_text(other)))),
    }
    let lifetime = match obj.get("expires_in") {
        None => DEFAULT_EXPIRES_IN,
        Some(v) => Duration::from_secs(expires_in_secs(v).ok_or(TokenError::BadExpiresIn)?),
    };
    AccessToken::new(value, lifetime)
}

/// `expires_in` as whole positive seconds, from a number or a string.
fn expires_in_secs(v: &serde_json::Value) -> Option<u64> {
    let secs = match v {
        serde_json::Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && *f >= 1.0 && *f < 1e15)
                .map(|f| f as u64)
        }),
        serde_json::Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    }?;
    (secs > 0).then_some(secs)
}

fn json_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Printable ASCII (others as `?`), at most [`MAX_ERROR_TEXT`] bytes.
fn bounded_text(s: &str) -> String {
    s.bytes()
        .take(MAX_ERROR_TEXT)
        .map(|b| {
            if (0x20..=0x7e).contains(&b) {
                b as char
            } else {
                '?'
            }
        })
        .collect()
}

/// Timing rules of a [`TokenCache`]. Times are milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenCacheConfig {
    /// Refresh once this percentage of the lifetime has passed. Default 80;
    /// clamped to 1..=100.
    pub refresh_at_percent: u8,
    /// A refresh that has not reported back after this long is abandoned
    /// and another may start. Default 30 s.
    pub refresh_timeout_ms: u64,
    /// Wait after the first failed refresh; doubles per consecutive
    /// failure. Default 1 s.
    pub backoff_base_ms: u64,
    /// Cap on that wait. Default 60 s.
    pub backoff_max_ms: u64,
}

impl Default for TokenCacheConfig {
    fn default() -> Self {
        TokenCacheConfig {
            refresh_at_percent: 80,
            refresh_timeout_ms: 30_000,
            backoff_base_ms: 1_000,
            backoff_max_ms: 60_000,
        }
    }
}

/// Proof that the caller was told to run one particular refresh. Hand it
/// back with the result, so a late answer from an abandoned refresh cannot
/// be mistaken for the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RefreshTicket {
    id: u64,
    started_ms: u64,
}

impl RefreshTicket {
    /// When the refresh was handed out. A token's lifetime is counted from
    /// here, not from when the answer arrived: the endpoint started the
    /// clock no later than that.
    pub fn started_ms(&self) -> u64 {
        self.started_ms
    }
}

/// What a caller that wants to send under this credential should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenPoll {
    /// Use this token.
    Ready(AccessToken),
    /// Use this token, and start the refresh for this ticket: the token is
    /// past its refresh point. Given to exactly one caller per refresh.
    ReadyRefreshDue(AccessToken, RefreshTicket),
    /// No valid token and no refresh running: start the refresh for this
    /// ticket, then poll again. Given to exactly one caller per refresh.
    MustRefresh(RefreshTicket),
    /// No valid token; a refresh is running. Poll again when it reports, or
    /// at `until_ms` at the latest (when it would be abandoned).
    WaitForRefresh {
        /// When the running refresh will be abandoned.
        until_ms: u64,
    },
    /// No valid token; the last refresh failed. No new refresh before
    /// `retry_at_ms`; see [`TokenCache::last_error`].
    Backoff {
        /// Earliest time of the next refresh.
        retry_at_ms: u64,
    },
}

#[derive(Debug, Clone)]
struct Held {
    token: AccessToken,
    obtained_ms: u64,
    refresh_at_ms: u64,
    expires_at_ms: u64,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    id: u64,
    until_ms: u64,
}

/// The token of one app credential over time.
///
/// Guarantees, for any sequence of calls with non-decreasing `now_ms`:
/// at most one refresh is in flight (a refresh counts until it reports or
/// its timeout passes); while a valid token is held, `poll` never answers
/// `MustRefresh`, `WaitForRefresh` or `Backoff`; each refresh is handed to
/// exactly one caller; a token is used only before its expiry.
#[derive(Debug, Clone)]
pub struct TokenCache {
    config: TokenCacheConfig,
    held: Option<Held>,
    in_flight: Option<InFlight>,
    next_id: u64,
    failures: u32,
    retry_at_ms: u64,
    last_error: Option<TokenError>,
    refreshes_started: u64,
}

impl TokenCache {
    /// An empty cache: the first poll answers `MustRefresh`.
    pub fn new(config: TokenCacheConfig) -> TokenCache {
        TokenCache {
            config,
            held: None,
            in_flight: None,
            next_id: 0,
            failures: 0,
            retry_at_ms: 0,
            last_error: None,
            refreshes_started: 0,
        }
    }

    /// What to do at `now_ms`. May hand out a refresh (see [`TokenPoll`]).
    pub fn poll(&mut self, now_ms: u64) -> TokenPoll {
        if let Some(f) = self.in_flight {
            if now_ms >= f.until_ms {
                // Abandon it: the timeout already spaced the attempts, so no
                // extra backoff, but it counts as a failure for the next one.
                self.in_flight = None;
                self.failures = self.failures.saturating_add(1);
                self.last_error = Some(TokenError::TimedOut);
            }
        }
        if self
            .held
            .as_ref()
            .is_some_and(|h| now_ms >= h.expires_at_ms)
        {
            self.held = None;
        }
        match (&self.held, self.in_flight) {
            (Some(h), Some(_)) => TokenPoll::Ready(h.token.clone()),
            (Some(h), None) if now_ms < h.refresh_at_ms || now_ms < self.retry_at_ms => {
                TokenPoll::Ready(h.token.clone())
            }
            (Some(h), None) => {
                let token = h.token.clone();
                TokenPoll::ReadyRefreshDue(token, self.start(now_ms))
            }
            (None, Some(f)) => TokenPoll::WaitForRefresh {
                until_ms: f.until_ms,
            },
            (None, None) if now_ms < self.retry_at_ms => TokenPoll::Backoff {
                retry_at_ms: self.retry_at_ms,
            },
            (None, None) => TokenPoll::MustRefresh(self.start(now_ms)),
        }
    }

    fn start(&mut self, now_ms: u64) -> RefreshTicket {
        let id = self.next_id;
        self.next_id += 1;
        self.refreshes_started += 1;
        self.in_flight = Some(InFlight {
            id,
            until_ms: now_ms.saturating_add(self.config.refresh_timeout_ms),
        });
        RefreshTicket {
            id,
            started_ms: now_ms,
        }
    }

    /// Reports a successful refresh. The token's lifetime counts from the
    /// ticket's start. A late success from an abandoned refresh is still
    /// used if it is newer than the token held; it does not end a newer
    /// refresh in flight.
    pub fn on_refreshed(&mut self, ticket: RefreshTicket, token: AccessToken, now_ms: u64) {
        if self.in_flight.is_some_and(|f| f.id == ticket.id) {
            self.in_flight = None;
        }
        // The ticket's start is the conservative anchor; never the future.
        let anchor = ticket.started_ms.min(now_ms);
        if self.held.as_ref().is_some_and(|h| h.obtained_ms > anchor) {
            return;
        }
        let lifetime_ms = u64::try_from(token.lifetime().as_millis()).unwrap_or(u64::MAX);
        let pct = u64::from(self.config.refresh_at_percent.clamp(1, 100));
        let refresh_after = lifetime_ms / 100 * pct + lifetime_ms % 100 * pct / 100;
        self.held = Some(Held {
            token,
            obtained_ms: anchor,
            refresh_at_ms: anchor.saturating_add(refresh_after),
            expires_at_ms: anchor.saturating_add(lifetime_ms),
        });
        self.failures = 0;
        self.retry_at_ms = 0;
        self.last_error = None;
    }

    /// Reports a failed refresh: backs off `backoff_base_ms * 2^(n-1)` (capped)
    /// after the n-th consecutive failure. A failure for an abandoned ticket
    /// is ignored.
    pub fn on_refresh_failed(&mut self, ticket: RefreshTicket, now_ms: u64, err: TokenError) {
        if self.in_flight.is_none_or(|f| f.id != ticket.id) {
            return;
        }
        self.in_flight = None;
        self.failures = self.failures.saturating_add(1);
        let shift = (self.failures - 1).min(32);
        let wait = self
            .config
            .backoff_base_ms
            .saturating_mul(1u64 << shift)
            .min(self.config.backoff_max_ms);
        self.retry_at_ms = now_ms.saturating_add(wait);
        self.last_error = Some(err);
    }

    /// WNS rejected `used` (401). Drops it if it is still the token held, so
    /// a burst of 401s for the same token invalidates once. Returns whether
    /// it did.
    pub fn invalidate(&mut self, used: &AccessToken) -> bool {
        if self.held.as_ref().is_some_and(|h| h.token == *used) {
            self.held = None;
            true
        } else {
            false
        }
    }

    /// The error of the last failed refresh, cleared by a success.
    pub fn last_error(&self) -> Option<&TokenError> {
        self.last_error.as_ref()
    }

    /// Consecutive failed (or abandoned) refreshes.
    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    /// Refreshes handed out since creation.
    pub fn refreshes_started(&self) -> u64 {
        self.refreshes_started
    }

    /// Whether a refresh is in flight (not yet reported, not abandoned).
    pub fn refresh_in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// The next time `poll` may answer differently without any report:
    /// refresh point, expiry, backoff end or refresh timeout, whichever is
    /// first and still ahead. `None` when nothing is scheduled.
    pub fn next_deadline(&self, now_ms: u64) -> Option<u64> {
        let held = self.held.as_ref();
        [
            held.map(|h| h.refresh_at_ms),
            held.map(|h| h.expires_at_ms),
            Some(self.retry_at_ms),
            self.in_flight.map(|f| f.until_ms),
        ]
        .into_iter()
        .flatten()
        .filter(|&t| t > now_ms)
        .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn token(v: &str, secs: u64) -> AccessToken {
        AccessToken::new(v, Duration::from_secs(secs)).unwrap()
    }

    #[test]
    fn classic_request_body() {
        let r = token_request(
            &TokenFlow::Classic,
            "ms-app://S-1-15-2-1",
            "a+b/c=d&e f\u{e9}",
        );
        assert_eq!(r.content_type, "application/x-www-form-urlencoded");
        assert_eq!(
            r.body,
            "grant_type=client_credentials&client_id=ms-app%3A%2F%2FS-1-15-2-1\
             &client_secret=a%2Bb%2Fc%3Dd%26e+f%C3%A9&scope=notify.windows.com"
        );
        assert!(!format!("{r:?}").contains("client_secret"));
    }

    #[test]
    fn classic_bare_sid_gets_the_prefix() {
        let r = token_request(&TokenFlow::Classic, "S-1-15-2-42", "x");
        assert!(r.body.contains("client_id=ms-app%3A%2F%2FS-1-15-2-42&"));
        let r = token_request(&TokenFlow::Classic, "s-1-15-2-42", "x");
        assert!(r.body.contains("client_id=ms-app%3A%2F%2Fs-1-15-2-42&"));
    }

    #[test]
    fn entra_request_and_endpoint() {
        let flow = TokenFlow::Entra {
            tenant: "contoso.onmicrosoft.com".into(),
        };
        let r = token_request(&flow, "0b7e-app", "s~e.c_r-e*t");
        assert_eq!(
            r.body,
            "grant_type=client_credentials&client_id=0b7e-app\
             &client_secret=s%7Ee.c_r-e*t&scope=https%3A%2F%2Fwns.windows.com%2F.default"
        );
        assert_eq!(
            flow.endpoint(),
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        let odd = TokenFlow::Entra {
            tenant: "a/b c".into(),
        };
        assert_eq!(
            odd.endpoint(),
            "https://login.microsoftonline.com/a%2Fb%20c/oauth2/v2.0/token"
        );
        assert_eq!(TokenFlow::Classic.endpoint(), CLASSIC_TOKEN_URL);
    }

    #[test]
    fn form_encoding_escapes_everything_reserved() {
        let mut out = String::new();
        form_urlencode("+/=& ?#%\u{1F600}AZaz09*-._~", &mut out);
        assert_eq!(out, "%2B%2F%3D%26+%3F%23%25%F0%9F%98%80AZaz09*-._%7E");
    }

    #[test]
    fn parses_classic_and_entra_answers() {
        let t = parse_token_response(
            200,
            br#"{"access_token":"EgAcAQMAAAAALYAAY/c+Huwi3Fv4Ck10UrKNmtxRO6Njk2MgA=","token_type":"bearer","expires_in":86400}"#,
        )
        .unwrap();
        assert_eq!(
            t.secret(),
            "EgAcAQMAAAAALYAAY/c+Huwi3Fv4Ck10UrKNmtxRO6Njk2MgA="
        );
        assert_eq!(t.lifetime(), Duration::from_secs(86_400));
        let t = parse_token_response(
            200,
            br#"{"token_type":"Bearer","expires_in":"3599","ext_expires_in":"3599","access_token":"eyJ0"}"#,
        )
        .unwrap();
        assert_eq!(t.lifetime(), Duration::from_secs(3599));
        let t =
            parse_token_response(200, br#"{"access_token":"x","token_type":"BEARER"}"#).unwrap();
        assert_eq!(t.lifetime(), DEFAULT_EXPIRES_IN);
        let t = parse_token_response(200, br#"{"access_token":"x","expires_in":60.0}"#).unwrap();
        assert_eq!(t.lifetime(), Duration::from_secs(60));
    }

    #[test]
    fn refuses_bad_answers() {
        let p = |s: u16, b: &[u8]| parse_token_response(s, b).unwrap_err();
        assert_eq!(p(200, b"<html>"), TokenError::NotJson { status: 200 });
        assert_eq!(p(200, b"[1]"), TokenError::NotJson { status: 200 });
        assert_eq!(p(200, b""), TokenError::NotJson { status: 200 });
        assert_eq!(
            p(200, br#"{"token_type":"bearer"}"#),
            TokenError::BadAccessToken
        );
        assert_eq!(
            p(200, br#"{"access_token":""}"#),
            TokenError::BadAccessToken
        );
        assert_eq!(
            p(200, br#"{"access_token":"a b"}"#),
            TokenError::BadAccessToken
        );
        assert_eq!(
            p(200, br#"{"access_token":"x","token_type":"mac"}"#),
            TokenError::BadTokenType("mac".into())
        );
        for e in [r#""0""#, "0", "-5", r#""soon""#, "null", "1e300"] {
            let body = format!(r#"{{"access_token":"x","expires_in":{e}}}"#);
            assert_eq!(p(200, body.as_bytes()), TokenError::BadExpiresIn, "{e}");
        }
        assert_eq!(p(500, b"oops"), TokenError::Http { status: 500 });
        assert_eq!(p(503, b""), TokenError::Http { status: 503 });
    }

    #[test]
    fn oauth_errors_are_typed() {
        let e = parse_token_response(
            400,
            br#"{"error":"invalid_client","error_description":"Invalid client id"}"#,
        )
        .unwrap_err();
        assert_eq!(
            e,
            TokenError::OAuth {
                status: 400,
                error: "invalid_client".into(),
                description: Some("Invalid client id".into()),
            }
        );
        assert!(e.is_credential_error());
        assert!(e.to_string().contains("invalid_client: Invalid client id"));
        let e = parse_token_response(401, br#"{"error":"unauthorized_client"}"#).unwrap_err();
        assert!(matches!(
            e,
            TokenError::OAuth {
                status: 401,
                description: None,
                ..
            }
        ));
        assert!(!TokenError::Http { status: 503 }.is_credential_error());
    }

    #[test]
    fn secrets_never_in_debug() {
        let t = token("SECRETVALUE", 10);
        let shown = format!("{t:?} {:?}", t.authorization());
        assert!(!shown.contains("SECRETVALUE"), "{shown}");
        assert_eq!(t.authorization().to_str().unwrap(), "Bearer SECRETVALUE");
        assert!(t.authorization().is_sensitive());
    }

    #[test]
    fn first_poll_refreshes_then_others_wait() {
        let mut c = TokenCache::new(TokenCacheConfig::default());
        let TokenPoll::MustRefresh(ticket) = c.poll(0) else {
            panic!()
        };
        assert_eq!(c.poll(1), TokenPoll::WaitForRefresh { until_ms: 30_000 });
        c.on_refreshed(ticket, token("a", 100), 500);
        assert_eq!(c.poll(600), TokenPoll::Ready(token("a", 100)));
    }

    #[test]
    fn refresh_due_is_handed_to_one_caller() {
        let mut c = TokenCache::new(TokenCacheConfig::default());
        let TokenPoll::MustRefresh(t0) = c.poll(0) else {
            panic!()
        };
        c.on_refreshed(t0, token("a", 100), 10);
        // Lifetime counts from the ticket (0), so the refresh point is 80 s.
        assert!(matches!(c.poll(79_999), TokenPoll::Ready(_)));
        let TokenPoll::ReadyRefreshDue(tok, t1) = c.poll(80_000) else {
            panic!()
        };
        assert_eq!(tok.secret(), "a");
        for now in 80_001..80_100 {
            assert_eq!(c.poll(now), TokenPoll::Ready(token("a", 100)));
        }
        c.on_refreshed(t1, token("b", 100), 80_200);
        assert_eq!(c.poll(80_300), TokenPoll::Ready(token("b", 100)));
        assert_eq!(c.refreshes_started(), 2);
    }

    #[test]
    fn burst_of_401s_invalidates_once() {
        let mut c = TokenCache::new(TokenCacheConfig::default());
        let TokenPoll::MustRefresh(t0) = c.poll(0) else {
            panic!()
        };
        c.on_refreshed(t0, token("a", 100), 0);
        let used = token("a", 100);
        assert!(c.invalidate(&used));
        let mut refreshes = 0;
        for now in 1..100 {
            assert!(!c.invalidate(&used));
            match c.poll(now) {
                TokenPoll::MustRefresh(_) => refreshes += 1,
                TokenPoll::WaitForRefresh { .. } => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(refreshes, 1);
        // A 401 for an older token does not drop a newer one.
        let mut c2 = TokenCache::new(TokenCacheConfig::default());
        let TokenPoll::MustRefresh(t) = c2.poll(0) else {
            panic!()
        };
        c2.on_refreshed(t, token("new", 100), 0);
        assert!(!c2.invalidate(&token("old", 100)));
        assert!(matches!(c2.poll(1), TokenPoll::Ready(_)));
    }

    #[test]
    fn failures_back_off_exponentially_and_surface_in_poll() {
        let mut c = TokenCache::new(TokenCacheConfig::default());
        let mut now = 0;
        let mut waits = vec![];
        for _ in 0..8 {
            let TokenPoll::MustRefresh(t) = c.poll(now) else {
                panic!("at {now}: {:?}", c.poll(now))
            };
            c.on_refresh_failed(t, now, TokenError::Http { status: 503 });
            let TokenPoll::Backoff { retry_at_ms } = c.poll(now) else {
                panic!()
            };
            assert_eq!(c.poll(retry_at_ms - 1), TokenPoll::Backoff { retry_at_ms });
            waits.push(retry_at_ms - now);
            now = retry_at_ms;
        }
        assert_eq!(
            waits,
            [1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 60_000]
        );
        assert_eq!(c.consecutive_failures(), 8);
        assert_eq!(c.last_error(), Some(&TokenError::Http { status: 503 }));
        let TokenPoll::MustRefresh(t) = c.poll(now) else {
            panic!()
        };
        c.on_refreshed(t, token("ok", 10), now + 5);
        assert_eq!(c.consecutive_failures(), 0);
        assert_eq!(c.last_error(), None);
        assert!(matches!(c.poll(now + 6), TokenPoll::Ready(_)));
    }

    #[test]
    fn failing_refresh_keeps_the_valid_token_in_use() {
        let mut c = TokenCache::new(TokenCacheConfig::default());
        let TokenPoll::MustRefresh(t) = c.poll(0) else {
            panic!()
        };
        c.on_refreshed(t, token("a", 100), 0);
        let TokenPoll::ReadyRefreshDue(_, t1) = c.poll(80_000) else {
            panic!()
        };
        c.on_refresh_failed(t1, 80_000, TokenError::Transport("reset".into()));
        // Still usable; the next refresh waits for the backoff.
        assert!(matches!(c.poll(80_500), TokenPoll::Ready(_)));
        assert!(matches!(c.poll(81_000), TokenPoll::ReadyRefreshDue(..)));
    }

    #[test]
    fn a_refresh_that_never_reports_is_abandoned() {
        let mut c = TokenCache::new(TokenCacheConfig::default());
        let TokenPoll::MustRefresh(lost) = c.poll(0) else {
            panic!()
        };
        assert_eq!(c.next_deadline(0), Some(30_000));
        assert_eq!(
            c.poll(29_999),
            TokenPoll::WaitForRefresh { until_ms: 30_000 }
        );
        let TokenPoll::MustRefresh(second) = c.poll(30_000) else {
            panic!()
        };
        assert_eq!(c.last_error(), Some(&TokenError::TimedOut));
        // The abandoned one's failure does not end the new one...
        c.on_refresh_failed(lost, 30_001, TokenError::TimedOut);
        assert!(c.refresh_in_flight());
        assert!(matches!(c.poll(30_002), TokenPoll::WaitForRefresh { .. }));
        // ...but its late token is still a token.
        c.on_refreshed(lost, token("late", 100), 30_003);
        assert!(matches!(c.poll(30_004), TokenPoll::Ready(_)));
        assert!(c.refresh_in_flight());
        c.on_refreshed(second, token("fresh", 100), 30_005);
        assert_eq!(c.poll(30_006), TokenPoll::Ready(token("fresh", 100)));
        // An older result arriving after a newer one is not installed.
        c.on_refreshed(lost, token("late", 100), 30_007);
        assert_eq!(c.poll(30_008), TokenPoll::Ready(token("fresh", 100)));
    }

    #[test]
    fn token_is_never_used_past_expiry() {
        let mut c = TokenCache::new(TokenCacheConfig::default());
        let TokenPoll::MustRefresh(t) = c.poll(0) else {
            panic!()
        };
        c.on_refreshed(t, token("a", 2), 0);
        let TokenPoll::ReadyRefreshDue(_, _) = c.poll(1_600) else {
            panic!()
        };
        assert!(matches!(c.poll(1_999), TokenPoll::Ready(_)));
        assert!(matches!(c.poll(2_000), TokenPoll::WaitForRefresh { .. }));
    }

    /// The .NET bug: renewal must keep working over many expiries.
    #[test]
    fn renews_across_a_thousand_expiries() {
        const LIFETIME_S: u64 = 2;
        const LATENCY_MS: u64 = 70;
        const CALLERS: usize = 3;
        let mut c = TokenCache::new(TokenCacheConfig::default());
        let mut pending: Option<(RefreshTicket, u64)> = None;
        let mut installed = 0u64;
        let mut refreshes_for_current = 0;
        let mut now = 0u64;
        while installed <= 1000 {
            if let Some((ticket, done_at)) = pending {
                if now >= done_at {
                    installed += 1;
                    let tok = token(&format!("t{installed}"), LIFETIME_S);
                    c.on_refreshed(ticket, tok, now);
                    pending = None;
                    refreshes_for_current = 0;
                }
            }
            for _ in 0..CALLERS {
                match c.poll(now) {
                    TokenPoll::Ready(_) => assert!(installed > 0),
                    TokenPoll::ReadyRefreshDue(_, t) => {
                        refreshes_for_current += 1;
                        assert_eq!(
                            refreshes_for_current, 1,
                            "two refreshes for one token at {now}"
                        );
                        pending = Some((t, now + LATENCY_MS));
                    }
                    TokenPoll::MustRefresh(t) => {
                        assert_eq!(installed, 0, "MustRefresh with a token held at {now}");
                        assert!(pending.is_none());
                        pending = Some((t, now + LATENCY_MS));
                    }
                    TokenPoll::WaitForRefresh { .. } => {
                        assert_eq!(installed, 0, "no token at {now}")
                    }
                    TokenPoll::Backoff { .. } => panic!("no failure was reported"),
                }
            }
            now += 10;
        }
        assert_eq!(c.refreshes_started(), 1001);
        // One refresh per lifetime-at-80%: every 1.6 s.
        assert_eq!(now / (c.refreshes_started() - 1), 1_600);
    }

    #[derive(Debug, Clone)]
    enum Step {
        Poll,
        Advance(u64),
        Complete { ok: bool, lifetime_s: u64 },
        Invalidate,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => Just(Step::Poll),
            4 => (1u64..5_000).prop_map(Step::Advance),
            2 => (any::<bool>(), 1u64..20).prop_map(|(ok, lifetime_s)| Step::Complete { ok, lifetime_s }),
            1 => Just(Step::Invalidate),
        ]
    }

    proptest! {
        #[test]
        fn cache_invariants_under_random_schedules(steps in proptest::collection::vec(step(), 1..400)) {
            let mut c = TokenCache::new(TokenCacheConfig::default());
            let mut now = 0u64;
            let mut outstanding: Vec<RefreshTicket> = vec![];
            // (token, expires_at) of the token the cache should hold.
            let mut last_used: Option<AccessToken> = None;
            let mut n = 0;
            for s in steps {
                match s {
                    Step::Advance(d) => now += d,
                    Step::Poll => {
                        let live = outstanding
                            .iter()
                            .filter(|t| now < t.started_ms() + 30_000)
                            .count();
                        let poll = c.poll(now);
                        match &poll {
                            TokenPoll::Ready(t) | TokenPoll::ReadyRefreshDue(t, _) => {
                                last_used = Some(t.clone());
                            }
                            _ => {}
                        }
                        if let TokenPoll::ReadyRefreshDue(_, t) | TokenPoll::MustRefresh(t) = poll {
                            prop_assert_eq!(live, 0, "second refresh while one is live");
                            outstanding.push(t);
                        }
                        prop_assert!(c.next_deadline(now).is_none_or(|d| d > now));
                    }
                    Step::Complete { ok, lifetime_s } => {
                        if let Some(t) = outstanding.pop() {
                            if ok {
                                n += 1;
                                c.on_refreshed(t, token(&format!("t{n}"), lifetime_s), now);
                            } else {
                                c.on_refresh_failed(t, now, TokenError::Http { status: 500 });
                            }
                        }
                    }
                    Step::Invalidate => {
                        if let Some(t) = &last_used {
                            c.invalidate(t);
                        }
                    }
                }
                // While a valid token is held, nobody is told to wait.
                if let Some(h) = &c.held {
                    if now < h.expires_at_ms {
                        let mut probe = c.clone();
                        let p = probe.poll(now);
                        let ok = matches!(p, TokenPoll::Ready(_) | TokenPoll::ReadyRefreshDue(..));
                        prop_assert!(ok, "{:?}", p);
                    }
                }
            }
        }

        #[test]
        fn token_parsing_never_panics(status in any::<u16>(), body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_token_response(status, &body);
        }

        #[test]
        fn token_parsing_never_panics_on_jsonish(status in any::<u16>(),
            body in r#"\{("(access_token|token_type|expires_in|error|error_description)":("[ -~]{0,12}"|-?[0-9]{1,25}(\.[0-9]+)?|null|true|\[\]|\{\}),?){0,5}\}"#) {
            let r = parse_token_response(status, body.as_bytes());
            if let Ok(t) = r {
                prop_assert!((200..300).contains(&status));
                prop_assert!(!t.secret().is_empty());
                prop_assert!(!t.lifetime().is_zero());
            }
        }

        #[test]
        fn form_encoding_round_trips(s in "\\PC{0,40}") {
            let mut out = String::new();
            form_urlencode(&s, &mut out);
            prop_assert!(out.bytes().all(|b| b.is_ascii_alphanumeric() || b"*-._+%".contains(&b)));
            prop_assert_eq!(form_decode(&out), s);
        }
    }

    fn form_decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = vec![];
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                    i += 2;
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8(out).unwrap()
    }
}
