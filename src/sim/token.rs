//! The token endpoint: form parsing, the OAuth client-credentials checks of
//! the classic (`login.live.com/accesstoken.srf`) and Entra
//! (`login.microsoftonline.com/{tenant}/oauth2/v2.0/token`) flows, and the
//! store of issued tokens that the push endpoint checks bearers against.

use super::config::AppCredential;
use super::hash::{hash64, BuildIdentity};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `scope` of the classic flow.
pub const CLASSIC_SCOPE: &str = "notify.windows.com";
/// `scope` of the Entra flow.
pub const ENTRA_SCOPE: &str = "https://wns.windows.com/.default";
/// Largest token request body read.
pub const MAX_TOKEN_REQUEST_BYTES: usize = 16 * 1024;
/// Issued tokens kept at once; expired ones are pruned when this is reached,
/// and the endpoint answers `temporarily_unavailable` if that is not enough.
pub const MAX_LIVE_TOKENS: usize = 100_000;

/// Which token flow a request came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// `POST /accesstoken.srf`.
    Classic,
    /// `POST /{tenant}/oauth2/v2.0/token`.
    Entra,
}

impl Flow {
    fn scope(self) -> &'static str {
        match self {
            Flow::Classic => CLASSIC_SCOPE,
            Flow::Entra => ENTRA_SCOPE,
        }
    }
}

/// An OAuth error answer (status 400 unless stated).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OAuthError {
    /// The OAuth `error` code.
    pub error: &'static str,
    /// Human text for `error_description`.
    pub description: String,
}

impl OAuthError {
    fn new(error: &'static str, description: impl Into<String>) -> OAuthError {
        OAuthError {
            error,
            description: description.into(),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "error": self.error,
            "error_description": self.description,
        }))
        .unwrap_or_default()
    }
}

/// Decodes one `application/x-www-form-urlencoded` component.
fn decode_component(s: &[u8]) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Parses a form body into name/value pairs. Errors on bad escapes, bad
/// UTF-8 and repeated names (OAuth forbids repeating a parameter).
pub fn parse_form(body: &[u8]) -> Result<Vec<(String, String)>, OAuthError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for pair in body.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
        let (k, v) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &b""[..]),
        };
        let bad = || OAuthError::new("invalid_request", "malformed form body");
        let k = decode_component(k).ok_or_else(bad)?;
        let v = decode_component(v).ok_or_else(bad)?;
        if out.iter().any(|(n, _)| *n == k) {
            return Err(OAuthError::new(
                "invalid_request",
                format!("parameter {k} repeated"),
            ));
        }
        out.push((k, v));
    }
    Ok(out)
}

/// Whether a Content-Type header names the form media type.
fn is_form(content_type: Option<&[u8]>) -> bool {
    let Some(ct) = content_type else {
        return false;
    };
    let media = ct.split(|&b| b == b';').next().unwrap_or_default();
    media
        .trim_ascii()
        .eq_ignore_ascii_case(b"application/x-www-form-urlencoded")
}

/// Checks a token request and answers the app SID it authenticates.
/// `apps` empty accepts any non-empty `client_id` and `client_secret`.
pub fn check_request(
    flow: Flow,
    content_type: Option<&[u8]>,
    body: &[u8],
    apps: &[AppCredential],
) -> Result<String, OAuthError> {
    if !is_form(content_type) {
        return Err(OAuthError::new(
            "invalid_request",
            "Content-Type must be application/x-www-form-urlencoded",
        ));
    }
    let form = parse_form(body)?;
    let get = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    let missing = |name: &str| OAuthError::new("invalid_request", format!("missing {name}"));
    let grant = get("grant_type").ok_or_else(|| missing("grant_type"))?;
    if grant != "client_credentials" {
        return Err(OAuthError::new(
            "unsupported_grant_type",
            format!("grant_type {grant:?} is not supported"),
        ));
    }
    let client_id = get("client_id").ok_or_else(|| missing("client_id"))?;
    let secret = get("client_secret").ok_or_else(|| missing("client_secret"))?;
    let scope = get("scope").ok_or_else(|| missing("scope"))?;
    if scope != flow.scope() {
        return Err(OAuthError::new(
            "invalid_scope",
            format!("scope must be {}", flow.scope()),
        ));
    }
    let known = apps.is_empty()
        || apps.iter().any(|a| {
            a.sid == client_id && constant_time_eq(a.secret.as_bytes(), secret.as_bytes())
        });
    if !known {
        return Err(OAuthError::new(
            "invalid_client",
            "client authentication failed",
        ));
    }
    Ok(client_id.to_owned())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The JSON answer to a successful token request. Entra sends `expires_in`
/// as a string (and `token_type` as `Bearer`), the classic flow a number.
pub fn success_body(flow: Flow, token: &str, lifetime: Duration) -> Vec<u8> {
    let secs = lifetime.as_secs();
    let v = match flow {
        Flow::Classic => serde_json::json!({
            "token_type": "bearer",
            "access_token": token,
            "expires_in": secs,
        }),
        Flow::Entra => serde_json::json!({
            "token_type": "Bearer",
            "expires_in": secs.to_string(),
            "ext_expires_in": secs.to_string(),
            "access_token": token,
        }),
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

/// The bearer token of an `Authorization` header value, if it is one.
pub fn bearer(authorization: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = authorization.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let t = rest.trim_ascii();
    (!t.is_empty()).then_some(t)
}

/// What the store knows of an issued token.
#[derive(Debug)]
pub struct TokenInfo {
    /// The token text.
    pub token: Box<str>,
    /// The app (package SID) it was issued to.
    pub app_sid: Arc<str>,
    /// When it stops being accepted.
    pub expires_at: Instant,
}

/// Issued tokens, by hash of the token text. Read on every push (through a
/// per-thread cache), written on every issue.
#[derive(Debug, Default)]
pub struct TokenStore {
    map: RwLock<HashMap<u64, Arc<TokenInfo>, BuildIdentity>>,
}

impl TokenStore {
    /// Issues a token for `app_sid`, valid for `lifetime` from `now`.
    pub fn issue(
        &self,
        app_sid: &str,
        lifetime: Duration,
        now: Instant,
    ) -> Result<Arc<TokenInfo>, OAuthError> {
        let mut raw = [0u8; 32];
        raw.iter_mut()
            .for_each(|b| *b = crate::clock::random::<u8>());
        let mut token = String::with_capacity(3 + 64);
        token.push_str("EgA");
        for b in raw {
            token.push_str(&format!("{b:02x}"));
        }
        let info = Arc::new(TokenInfo {
            token: token.into_boxed_str(),
            app_sid: Arc::from(app_sid),
            expires_at: now + lifetime,
        });
        let mut map = self.map.write();
        if map.len() >= MAX_LIVE_TOKENS {
            map.retain(|_, t| t.expires_at > now);
            if map.len() >= MAX_LIVE_TOKENS {
                return Err(OAuthError::new(
                    "temporarily_unavailable",
                    format!("{MAX_LIVE_TOKENS} live tokens already issued"),
                ));
            }
        }
        map.insert(hash64(&[info.token.as_bytes()]), info.clone());
        Ok(info)
    }

    /// The token with this text, whether expired or not.
    pub fn lookup(&self, hash: u64, token: &[u8]) -> Option<Arc<TokenInfo>> {
        self.map
            .read()
            .get(&hash)
            .filter(|t| t.token.as_bytes() == token)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORM: Option<&[u8]> = Some(b"application/x-www-form-urlencoded");

    fn classic(body: &str, apps: &[AppCredential]) -> Result<String, OAuthError> {
        check_request(Flow::Classic, FORM, body.as_bytes(), apps)
    }

    fn encode_component(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                    (b as char).to_string()
                }
                b' ' => "+".to_owned(),
                _ => format!("%{b:02X}"),
            })
            .collect()
    }

    proptest::proptest! {
        #[test]
        fn form_round_trips(pairs in proptest::collection::btree_map("\\PC{1,12}", "\\PC{0,24}", 0..6)) {
            let body = pairs
                .iter()
                .map(|(k, v)| format!("{}={}", encode_component(k), encode_component(v)))
                .collect::<Vec<_>>()
                .join("&");
            let parsed = parse_form(body.as_bytes()).unwrap();
            let want: Vec<(String, String)> = pairs.into_iter().collect();
            proptest::prop_assert_eq!(parsed, want);
        }

        #[test]
        fn form_parser_never_panics(body in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = parse_form(&body);
        }
    }

    #[test]
    fn form_decoding() {
        let f = parse_form(b"a=b%3Dc&d=e+f&g=&h").unwrap();
        assert_eq!(
            f,
            vec![
                ("a".into(), "b=c".into()),
                ("d".into(), "e f".into()),
                ("g".into(), "".into()),
                ("h".into(), "".into())
            ]
        );
        assert!(parse_form(b"a=%4").is_err());
        assert!(parse_form(b"a=%zz").is_err());
        assert!(parse_form(b"a=%ff").is_err());
        assert!(parse_form(b"a=1&a=2").is_err());
    }

    #[test]
    fn classic_request_accepts_any_credentials_when_none_configured() {
        let body = "grant_type=client_credentials&client_id=ms-app%3a%2f%2fS-1-15-2-1&client_secret=s&scope=notify.windows.com";
        assert_eq!(classic(body, &[]), Ok("ms-app://S-1-15-2-1".to_owned()));
    }

    #[test]
    fn request_errors_have_oauth_codes() {
        let apps = [AppCredential {
            sid: "ms-app://a".into(),
            secret: "right".into(),
        }];
        let code = |body: &str| classic(body, &apps).unwrap_err().error;
        assert_eq!(
            code("client_id=ms-app://a&client_secret=right&scope=notify.windows.com"),
            "invalid_request"
        );
        assert_eq!(
            code("grant_type=password&client_id=ms-app://a&client_secret=right&scope=notify.windows.com"),
            "unsupported_grant_type"
        );
        assert_eq!(
            code("grant_type=client_credentials&client_secret=right&scope=notify.windows.com"),
            "invalid_request"
        );
        assert_eq!(
            code("grant_type=client_credentials&client_id=ms-app://a&client_secret=wrong&scope=notify.windows.com"),
            "invalid_client"
        );
        assert_eq!(
            code("grant_type=client_credentials&client_id=ms-app://b&client_secret=right&scope=notify.windows.com"),
            "invalid_client"
        );
        assert_eq!(
            code("grant_type=client_credentials&client_id=ms-app://a&client_secret=right&scope=https://wns.windows.com/.default"),
            "invalid_scope"
        );
        assert_eq!(
            classic(
                "grant_type=client_credentials&client_id=ms-app://a&client_secret=right&scope=notify.windows.com",
                &apps
            ),
            Ok("ms-app://a".to_owned())
        );
        let no_form = check_request(Flow::Classic, Some(b"application/json"), b"", &apps);
        assert_eq!(no_form.unwrap_err().error, "invalid_request");
    }

    #[test]
    fn entra_expires_in_is_a_string() {
        let v: serde_json::Value =
            serde_json::from_slice(&success_body(Flow::Entra, "t", Duration::from_secs(5)))
                .unwrap();
        assert_eq!(v["expires_in"], "5");
        let v: serde_json::Value =
            serde_json::from_slice(&success_body(Flow::Classic, "t", Duration::from_secs(5)))
                .unwrap();
        assert_eq!(v["expires_in"], 5);
        assert_eq!(v["token_type"], "bearer");
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Bearer"), None);
    }

    #[test]
    fn store_remembers_app_and_expiry() {
        let s = TokenStore::default();
        let now = crate::clock::instant();
        let t = s.issue("ms-app://a", Duration::from_secs(2), now).unwrap();
        let h = hash64(&[t.token.as_bytes()]);
        let found = s.lookup(h, t.token.as_bytes()).unwrap();
        assert_eq!(&*found.app_sid, "ms-app://a");
        assert_eq!(found.expires_at, now + Duration::from_secs(2));
        assert!(s.lookup(h, b"other").is_none());
    }
}
