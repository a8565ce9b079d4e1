//! Channel URI validation.
//!
//! A channel URI is kept byte-exact: WNS answers 404 to a re-encoded or
//! normalised URI, so nothing here rewrites it. Validation only decides
//! whether the gateway may ever POST to it: `https`, a host equal to or under
//! the allowed suffix (`notify.windows.com` by default), the default port, no
//! userinfo, no fragment, visible ASCII only, and a length bound.

use std::fmt;

/// Longest channel URI accepted, in bytes. Real ones are about 190 to 250.
pub const DEFAULT_MAX_URI_LEN: usize = 2048;

/// What a channel URI must satisfy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UriPolicy {
    /// Lowercase host suffix; the host must equal it or end with `.` + it.
    pub allowed_host_suffix: String,
    /// Length bound in bytes.
    pub max_len: usize,
}

impl Default for UriPolicy {
    fn default() -> Self {
        UriPolicy {
            allowed_host_suffix: "notify.windows.com".to_owned(),
            max_len: DEFAULT_MAX_URI_LEN,
        }
    }
}

/// Why a channel URI was refused. The message is shown to API callers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelUriError {
    #[error("channel_uri is empty")]
    Empty,
    #[error("channel_uri is longer than {0} bytes")]
    TooLong(usize),
    #[error("channel_uri must use https")]
    NotHttps,
    #[error("channel_uri must not contain user information")]
    UserInfo,
    #[error("channel_uri must not name a port")]
    Port,
    #[error("channel_uri host must be {0} or a subdomain of it")]
    Host(String),
    #[error("channel_uri must have a path after the host")]
    NoPath,
    #[error("channel_uri must not have a fragment")]
    Fragment,
    #[error("channel_uri may only contain visible ASCII characters")]
    Chars,
    #[error("channel_uri is not a valid URI: {0}")]
    Syntax(String),
}

/// A validated channel URI, byte-exact as the device reported it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ChannelUri {
    raw: String,
    /// Byte offset where the host ends and the path begins.
    path_start: u16,
}

impl ChannelUri {
    /// Validates `s` against `policy`.
    pub fn parse(s: &str, policy: &UriPolicy) -> Result<ChannelUri, ChannelUriError> {
        if s.is_empty() {
            return Err(ChannelUriError::Empty);
        }
        let max = policy.max_len.min(u16::MAX as usize);
        if s.len() > max {
            return Err(ChannelUriError::TooLong(max));
        }
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ChannelUriError::Chars);
        }
        const SCHEME: &str = "https://";
        if s.len() < SCHEME.len() || !s[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
            return Err(ChannelUriError::NotHttps);
        }
        let rest = &s[SCHEME.len()..];
        let auth_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let authority = &rest[..auth_len];
        if authority.contains('@') {
            return Err(ChannelUriError::UserInfo);
        }
        if authority.contains(':') {
            return Err(ChannelUriError::Port);
        }
        if !host_allowed(authority, &policy.allowed_host_suffix) {
            return Err(ChannelUriError::Host(policy.allowed_host_suffix.clone()));
        }
        let tail = &rest[auth_len..];
        if !tail.starts_with('/') {
            return Err(ChannelUriError::NoPath);
        }
        if tail.contains('#') {
            return Err(ChannelUriError::Fragment);
        }
        // The sender hands the URI to an HTTP stack as it is; refuse here
        // what that stack would refuse at send time (e.g. `{`, `|`, `"`).
        if let Err(e) = http::Uri::try_from(s) {
            return Err(ChannelUriError::Syntax(e.to_string()));
        }
        Ok(ChannelUri {
            raw: s.to_owned(),
            path_start: (SCHEME.len() + auth_len) as u16,
        })
    }

    /// Rebuilds a URI that was validated before (for example when loading
    /// from the store) without checking it against a policy again.
    ///
    /// Returns `None` if `s` is not even shaped like an https URI.
    pub fn from_trusted(s: String) -> Option<ChannelUri> {
        let rest = s.get(8..)?;
        let auth_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let path_start = u16::try_from(8 + auth_len).ok()?;
        Some(ChannelUri { raw: s, path_start })
    }

    /// The URI exactly as the device reported it.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    pub fn into_string(self) -> String {
        self.raw
    }

    /// The host (the `:authority` to send), as written.
    pub fn host(&self) -> &str {
        &self.raw[8..self.path_start as usize]
    }

    /// Path and query, as written (starts with `/`).
    pub fn path_and_query(&self) -> &str {
        &self.raw[self.path_start as usize..]
    }

    /// A form safe for logs: host and the first characters of the token.
    pub fn redacted(&self) -> String {
        redact_uri(&self.raw)
    }
}

impl fmt::Debug for ChannelUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Shortens any URI for logging: keeps the scheme, host and path, and at most
/// six characters of the query, so channel tokens never reach a log whole.
pub fn redact_uri(s: &str) -> String {
    match s.find('?') {
        Some(q) => {
            let keep: String = s[q..].chars().take(7 + "token=".len()).collect();
            format!("{}{}…", &s[..q], keep)
        }
        None => s.to_owned(),
    }
}

fn host_allowed(host: &str, suffix: &str) -> bool {
    if host.is_empty() || host.len() > 253 || host.ends_with('.') {
        return false;
    }
    let labels_ok = host.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    });
    if !labels_ok {
        return false;
    }
    let host = host.to_ascii_lowercase();
    host == suffix
        || (host.len() > suffix.len()
            && host.ends_with(suffix)
            && host.as_bytes()[host.len() - suffix.len() - 1] == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GOOD: &str =
        "https://db5.notify.windows.com/?token=AwYAAAD8sUbJZq5PGQ2%2bT4nW1yZ3kJc8H0fQvUj3X1Y%3d";

    fn p(s: &str) -> Result<ChannelUri, ChannelUriError> {
        ChannelUri::parse(s, &UriPolicy::default())
    }

    #[test]
    fn accepts_real_shapes_byte_exact() {
        let u = p(GOOD).unwrap();
        assert_eq!(u.as_str(), GOOD);
        assert_eq!(u.host(), "db5.notify.windows.com");
        assert!(u.path_and_query().starts_with("/?token=AwYAAAD8"));
        for ok in [
            "https://notify.windows.com/?token=abc",
            "https://wns2-by3p.notify.windows.com/w/?token=BQYAAAA",
            "https://cloud.notify.windows.com/?token=AQE%3d",
            "HTTPS://DB5.Notify.Windows.Com/?token=x",
        ] {
            assert_eq!(p(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn refuses_what_would_be_ssrf() {
        use ChannelUriError::*;
        let cases: &[(&str, ChannelUriError)] = &[
            ("", Empty),
            ("http://db5.notify.windows.com/?token=a", NotHttps),
            ("ftp://db5.notify.windows.com/", NotHttps),
            (
                "https://evil.example/?token=a",
                Host("notify.windows.com".into()),
            ),
            (
                "https://notify.windows.com.evil.example/",
                Host("notify.windows.com".into()),
            ),
            (
                "https://evilnotify.windows.com/",
                Host("notify.windows.com".into()),
            ),
            (
                "https://db5.notify.windows.com./",
                Host("notify.windows.com".into()),
            ),
            ("https://127.0.0.1/", Host("notify.windows.com".into())),
            ("https://user:pw@db5.notify.windows.com/", UserInfo),
            ("https://evil.example@db5.notify.windows.com/", UserInfo),
            ("https://db5.notify.windows.com:8443/?token=a", Port),
            ("https://db5.notify.windows.com:443/?token=a", Port),
            ("https://db5.notify.windows.com", NoPath),
            ("https://db5.notify.windows.com?token=a", NoPath),
            ("https://db5.notify.windows.com/#frag", Fragment),
            ("https://db5.notify.windows.com/?token=a b", Chars),
            ("https://db5.notify.windows.com/?token=é", Chars),
            (
                "https://db5.notify.windows.com/?token=<a>",
                Syntax("invalid uri character".into()),
            ),
        ];
        for (uri, want) in cases {
            assert_eq!(p(uri).unwrap_err(), *want, "{uri}");
        }
        let long = format!("https://db5.notify.windows.com/?token={}", "A".repeat(3000));
        assert_eq!(p(&long).unwrap_err(), TooLong(DEFAULT_MAX_URI_LEN));
    }

    #[test]
    fn custom_suffix() {
        let policy = UriPolicy {
            allowed_host_suffix: "wns.test".into(),
            max_len: 300,
        };
        assert!(ChannelUri::parse("https://a.wns.test/?t=1", &policy).is_ok());
        assert!(ChannelUri::parse("https://db5.notify.windows.com/?t=1", &policy).is_err());
    }

    #[test]
    fn redaction_hides_the_token() {
        let r = p(GOOD).unwrap().redacted();
        assert!(r.starts_with("https://db5.notify.windows.com/?token=AwYAAA"));
        assert!(!r.contains("Z3kJc8"));
    }

    proptest! {
        #[test]
        fn anything_accepted_targets_an_allowed_host(s in "https://[a-z0-9.@:-]{0,40}(/[ -~]{0,40})?") {
            if let Ok(u) = p(&s) {
                prop_assert_eq!(u.as_str(), s.as_str());
                let host = u.host().to_ascii_lowercase();
                prop_assert!(host == "notify.windows.com" || host.ends_with(".notify.windows.com"));
                prop_assert!(!u.host().contains('@') && !u.host().contains(':'));
                prop_assert_eq!(format!("https://{}{}", u.host(), u.path_and_query()), s);
            }
        }

        #[test]
        fn never_panics(s in "\\PC{0,300}") {
            let _ = p(&s);
        }
    }
}
