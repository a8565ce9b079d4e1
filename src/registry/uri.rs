//! Splitting a channel URI into an internable prefix and a per-device rest,
//! and packing the rest at 6 bits per character when it allows.
//!
//! WNS tokens are base64 with `+ / =` percent-escaped, so the rest of a real
//! URI is drawn from `[A-Za-z0-9%]`: 63 symbols, 6 bits each. Anything else
//! is kept as raw bytes. Either way the URI comes back byte-exact.

use crate::core::ChannelUri;

const TOKEN_MARK: &str = "?token=";

/// The prefix to intern and the rest to store in the record: the prefix runs
/// up to and including the first `?token=`, or up to the path when there is
/// none. `prefix + rest` is the URI.
pub(crate) fn split(uri: &ChannelUri) -> (&str, &str) {
    let s = uri.as_str();
    let at = match s.find(TOKEN_MARK) {
        Some(i) => i + TOKEN_MARK.len(),
        None => s.len() - uri.path_and_query().len(),
    };
    s.split_at(at)
}

const SYMBOLS: &[u8; 63] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789%";

/// The 6-bit code of `b`, or 64 when `b` cannot be packed.
const CODES: [u8; 256] = {
    let mut t = [64u8; 256];
    let mut i = 0;
    while i < SYMBOLS.len() {
        t[SYMBOLS[i] as usize] = i as u8;
        i += 1;
    }
    t
};

/// Whether every byte of `rest` has a 6-bit code.
pub(crate) fn packable(rest: &[u8]) -> bool {
    rest.iter().all(|&b| CODES[usize::from(b)] < 64)
}

/// Bytes taken by `chars` packed characters.
pub(crate) fn packed_len(chars: usize) -> usize {
    (chars / 4) * 3 + (chars % 4 * 6).div_ceil(8)
}

/// Appends `rest` packed (4 characters in 3 bytes, little-endian bit order).
/// `rest` must be [`packable`].
pub(crate) fn pack(rest: &[u8], out: &mut Vec<u8>) {
    let mut chunks = rest.chunks_exact(4);
    for c in &mut chunks {
        let v = code(c[0]) | code(c[1]) << 6 | code(c[2]) << 12 | code(c[3]) << 18;
        out.extend_from_slice(&v.to_le_bytes()[..3]);
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        let v = tail
            .iter()
            .enumerate()
            .fold(0u32, |v, (i, &b)| v | code(b) << (6 * i));
        out.extend_from_slice(&v.to_le_bytes()[..packed_len(tail.len())]);
    }
}

fn code(b: u8) -> u32 {
    u32::from(CODES[usize::from(b)] & 63)
}

/// Appends the `chars` characters packed in `bytes`. `None` when `bytes` is
/// not exactly their packed length or holds an unused code.
pub(crate) fn unpack(bytes: &[u8], chars: usize, out: &mut String) -> Option<()> {
    if bytes.len() != packed_len(chars) {
        return None;
    }
    out.reserve(chars);
    let mut left = chars;
    for c in bytes.chunks(3) {
        let mut w = [0u8; 4];
        w[..c.len()].copy_from_slice(c);
        let v = u32::from_le_bytes(w);
        for i in 0..left.min(4) {
            let sym = *SYMBOLS.get(((v >> (6 * i)) & 63) as usize)?;
            out.push(char::from(sym));
        }
        left = left.saturating_sub(4);
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::UriPolicy;
    use proptest::prelude::*;

    fn uri(s: &str) -> ChannelUri {
        ChannelUri::parse(s, &UriPolicy::default()).unwrap()
    }

    #[test]
    fn splits_at_token_or_path() {
        let u = uri("https://db5.notify.windows.com/?token=AwYAAAD%2b");
        assert_eq!(
            split(&u),
            ("https://db5.notify.windows.com/?token=", "AwYAAAD%2b")
        );
        let u = uri("https://db5.notify.windows.com/w/x?other=1");
        assert_eq!(
            split(&u),
            ("https://db5.notify.windows.com", "/w/x?other=1")
        );
    }

    #[test]
    fn packs_every_length() {
        for n in 0..=9 {
            let s: String = SYMBOLS
                .iter()
                .cycle()
                .skip(n * 7)
                .take(n)
                .map(|&b| char::from(b))
                .collect();
            let mut packed = Vec::new();
            pack(s.as_bytes(), &mut packed);
            assert_eq!(packed.len(), packed_len(n));
            let mut back = String::new();
            unpack(&packed, n, &mut back).unwrap();
            assert_eq!(back, s);
        }
        assert!(!packable(b"abc+"));
        assert!(packable(b"AwYAAAD%2b%3d"));
    }

    #[test]
    fn rejects_unused_code_and_wrong_length() {
        let mut s = String::new();
        assert!(unpack(&[0xff], 1, &mut s).is_none());
        assert!(unpack(&[0, 0], 1, &mut s).is_none());
    }

    proptest! {
        #[test]
        fn pack_round_trips(s in "[A-Za-z0-9%]{0,300}") {
            prop_assert!(packable(s.as_bytes()));
            let mut packed = Vec::new();
            pack(s.as_bytes(), &mut packed);
            prop_assert_eq!(packed.len(), packed_len(s.len()));
            let mut back = String::new();
            prop_assert!(unpack(&packed, s.len(), &mut back).is_some());
            prop_assert_eq!(back, s);
        }
    }
}
