//! How a channel answers a valid push: by the convention on its token's
//! prefix (so fleets need no set-up) or by a binding made through the
//! control API, which also may tie the channel to one app.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Channel bindings kept at once (`PUT /_sim/channels`).
pub const MAX_BINDINGS: usize = 1_000_000;

/// What WNS does with a valid push to a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Behaviour {
    /// 200, `X-WNS-Status: received`.
    Received,
    /// 410: the channel expired.
    Expired,
    /// 410 with `X-WNS-Error-Description: Revoked channel URL`.
    Revoked,
    /// 404: the channel is unknown.
    NotFound,
    /// 403: the token's app does not own the channel.
    WrongApp,
    /// 200, `X-WNS-Status: dropped`.
    Dropped,
    /// 200, `X-WNS-Status: channelthrottled`.
    Throttled,
    /// 410 with `X-WNS-Error-Description: Domain Blocked`: WNS blocked the sender.
    DomainBlocked,
}

/// Channel-token prefixes and the behaviour each selects. No prefix is a
/// prefix of another.
pub const PREFIXES: [(&str, Behaviour); 7] = [
    ("x410", Behaviour::Expired),
    ("xrevoked", Behaviour::Revoked),
    ("x404", Behaviour::NotFound),
    ("x403", Behaviour::WrongApp),
    ("xdrop", Behaviour::Dropped),
    ("xthrottle", Behaviour::Throttled),
    ("xblocked", Behaviour::DomainBlocked),
];

impl Behaviour {
    /// The behaviour a channel token selects by its prefix; `Received` when
    /// none matches.
    pub fn from_channel_token(token: &[u8]) -> Behaviour {
        // Every convention starts with 'x'; real tokens (base64) rarely do.
        if token.first() != Some(&b'x') {
            return Behaviour::Received;
        }
        PREFIXES
            .iter()
            .find(|(p, _)| token.starts_with(p.as_bytes()))
            .map_or(Behaviour::Received, |(_, b)| *b)
    }
}

/// The value of the `token` query parameter of a channel's path-and-query,
/// raw (not percent-decoded). `None` when there is no such parameter.
pub fn channel_token(path_and_query: &[u8]) -> Option<&[u8]> {
    let q = path_and_query.iter().position(|&b| b == b'?')?;
    path_and_query[q + 1..]
        .split(|&b| b == b'&')
        .find_map(|p| p.strip_prefix(b"token="))
}

/// A control-API binding of one channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The channel identity (`authority` + `path?query`), kept to rule out
    /// hash collisions.
    pub identity: Box<[u8]>,
    /// How the channel answers.
    pub behaviour: Behaviour,
    /// When set, a push whose token belongs to another app gets 403.
    pub app_sid: Option<String>,
}

/// Bindings by the 64-bit hash of the channel identity.
#[derive(Clone, Debug, Default)]
pub struct Bindings {
    map: HashMap<u64, Binding, super::hash::BuildIdentity>,
}

impl Bindings {
    /// Adds or replaces a binding. Errors when the table is full.
    pub fn insert(&mut self, hash: u64, binding: Binding) -> Result<(), String> {
        if self.map.len() >= MAX_BINDINGS && !self.map.contains_key(&hash) {
            return Err(format!("at most {MAX_BINDINGS} channel bindings"));
        }
        self.map.insert(hash, binding);
        Ok(())
    }

    /// The binding of a channel, if any, by hash and identity (authority,
    /// then path and query).
    pub fn get(&self, hash: u64, authority: &[u8], path_and_query: &[u8]) -> Option<&Binding> {
        self.map.get(&hash).filter(|b| {
            let id = &b.identity;
            id.len() == authority.len() + path_and_query.len()
                && id.starts_with(authority)
                && id.ends_with(path_and_query)
        })
    }

    /// Whether there are none (the common case, which skips the lookup).
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.map.len()
    }
}

/// The identity of a channel URI given to the control API: everything after
/// `https://` (or `http://`), byte for byte: `authority/path?query`.
pub fn identity_of_uri(uri: &str) -> Result<&str, String> {
    let rest = uri
        .strip_prefix("https://")
        .or_else(|| uri.strip_prefix("http://"))
        .ok_or_else(|| "channel_uri must start with https://".to_owned())?;
    match rest.find('/') {
        Some(i) if i > 0 => Ok(rest),
        _ => Err("channel_uri must have a host and a path".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_select_behaviours() {
        let cases: [(&[u8], Behaviour); 10] = [
            (b"x410abc", Behaviour::Expired),
            (b"xrevoked1", Behaviour::Revoked),
            (b"x404", Behaviour::NotFound),
            (b"x403-7", Behaviour::WrongApp),
            (b"xdropme", Behaviour::Dropped),
            (b"xthrottle", Behaviour::Throttled),
            (b"xblocked", Behaviour::DomainBlocked),
            (b"AwYAAAD", Behaviour::Received),
            (b"x41", Behaviour::Received),
            (b"", Behaviour::Received),
        ];
        for (t, b) in cases {
            assert_eq!(Behaviour::from_channel_token(t), b, "{t:?}");
        }
    }

    #[test]
    fn channel_token_is_the_raw_token_parameter() {
        assert_eq!(channel_token(b"/?token=AwY%2bAA"), Some(&b"AwY%2bAA"[..]));
        assert_eq!(channel_token(b"/p?a=1&token=x410"), Some(&b"x410"[..]));
        assert_eq!(channel_token(b"/p?tokens=1"), None);
        assert_eq!(channel_token(b"/p"), None);
    }

    #[test]
    fn identity_strips_only_the_scheme() {
        assert_eq!(
            identity_of_uri("https://db5.notify.windows.com/?token=Aw%3d"),
            Ok("db5.notify.windows.com/?token=Aw%3d")
        );
        assert!(identity_of_uri("db5.notify.windows.com/?token=a").is_err());
        assert!(identity_of_uri("https://db5.notify.windows.com").is_err());
    }

    #[test]
    fn bindings_check_the_identity_not_just_the_hash() {
        let mut b = Bindings::default();
        b.insert(
            7,
            Binding {
                identity: b"h/?token=a".to_vec().into(),
                behaviour: Behaviour::Dropped,
                app_sid: None,
            },
        )
        .unwrap();
        assert!(b.get(7, b"h", b"/?token=a").is_some());
        assert!(b.get(7, b"h", b"/?token=b").is_none());
        assert!(
            b.get(7, b"h/", b"?token=a").is_some(),
            "the split does not matter"
        );
        assert!(b.get(8, b"h", b"/?token=a").is_none());
    }

    #[test]
    fn behaviour_names_are_snake_case() {
        let b: Behaviour = serde_json::from_str("\"domain_blocked\"").unwrap();
        assert_eq!(b, Behaviour::DomainBlocked);
        assert_eq!(
            serde_json::to_string(&Behaviour::WrongApp).unwrap(),
            "\"wrong_app\""
        );
    }
}
