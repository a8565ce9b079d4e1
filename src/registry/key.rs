//! The compact, injective encoding of device ids used as the map key.
//!
//! A canonical UUID (`8-4-4-4-12` hex digits with hyphens, all lowercase or
//! all uppercase) is stored as a tag byte and its 16 bytes; any other id is
//! stored as a tag byte and its raw bytes. The encoding is a function of the
//! id and decoding gives the id back byte for byte, so two ids are equal
//! exactly when their encodings are: hashing and comparing encoded keys is
//! hashing and comparing ids.

use crate::core::ids::MAX_DEVICE_ID_LEN;
use std::hash::{Hash, Hasher};

/// Longest encoded key: a tag byte and the longest raw device id.
pub const MAX_KEY_LEN: usize = 1 + MAX_DEVICE_ID_LEN;

const TAG_RAW: u8 = 0;
const TAG_UUID_LOWER: u8 = 1;
const TAG_UUID_UPPER: u8 = 2;

const UUID_LEN: usize = 36;
const HYPHENS: [usize; 4] = [8, 13, 18, 23];

/// An encoded device id, borrowed from a record or from a [`KeyBuf`].
///
/// `Hash` and `Eq` are those of the encoded bytes, identical whether the key
/// is borrowed from a stored record or built on the stack for a lookup.
#[derive(PartialEq, Eq)]
#[repr(transparent)]
pub struct RecordKey([u8]);

impl RecordKey {
    pub(crate) fn from_bytes(b: &[u8]) -> &RecordKey {
        // Safety: `RecordKey` is `repr(transparent)` over `[u8]`, so the two
        // references have the same layout and metadata (the length).
        unsafe { &*(b as *const [u8] as *const RecordKey) }
    }

    /// The encoded bytes (tag first).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The device id this key encodes. `None` only for bytes that no
    /// [`KeyBuf::encode`] produced.
    pub fn decode(&self) -> Option<String> {
        let (&tag, body) = self.0.split_first()?;
        match tag {
            TAG_RAW => String::from_utf8(body.to_vec()).ok(),
            TAG_UUID_LOWER | TAG_UUID_UPPER => {
                let raw: &[u8; 16] = body.try_into().ok()?;
                let digits: &[u8; 16] = if tag == TAG_UUID_LOWER {
                    b"0123456789abcdef"
                } else {
                    b"0123456789ABCDEF"
                };
                let mut s = String::with_capacity(UUID_LEN);
                for (i, b) in raw.iter().enumerate() {
                    if matches!(i, 4 | 6 | 8 | 10) {
                        s.push('-');
                    }
                    s.push(char::from(digits[usize::from(b >> 4)]));
                    s.push(char::from(digits[usize::from(b & 0x0f)]));
                }
                Some(s)
            }
            _ => None,
        }
    }

    /// Whether these bytes are a key [`KeyBuf::encode`] could have written
    /// (checked without building the id).
    pub fn is_well_formed(&self) -> bool {
        match self.0.split_first() {
            Some((&TAG_RAW, body)) => {
                !body.is_empty()
                    && body.len() <= MAX_DEVICE_ID_LEN
                    && std::str::from_utf8(body).is_ok()
            }
            Some((&(TAG_UUID_LOWER | TAG_UUID_UPPER), body)) => body.len() == 16,
            _ => false,
        }
    }

    /// A small hash of the key, independent of the map's hasher, used to
    /// spread bookkeeping over shards. Not for the map itself.
    pub(crate) fn spread(&self) -> u32 {
        let h = self.0.iter().fold(0x811c_9dc5_u32, |h, &b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        h ^ (h >> 16)
    }
}

impl Hash for RecordKey {
    /// One write of the encoded bytes, nothing else: the registry's map
    /// hasher hashes exactly those (keys are never hashed together with
    /// anything, so no length prefix is needed).
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(&self.0)
    }
}

/// An encoded device id on the stack, for lookups without a heap allocation.
pub struct KeyBuf {
    len: u8,
    buf: [u8; MAX_KEY_LEN],
}

impl KeyBuf {
    /// Encodes `id`. `None` when `id` is longer than any device id can be
    /// (such an id cannot be in the registry).
    pub fn encode(id: &str) -> Option<KeyBuf> {
        let b = id.as_bytes();
        if b.len() > MAX_DEVICE_ID_LEN {
            return None;
        }
        let mut out = KeyBuf {
            len: 0,
            buf: [0; MAX_KEY_LEN],
        };
        if let Some((tag, raw)) = parse_uuid(b) {
            out.buf[0] = tag;
            out.buf[1..17].copy_from_slice(&raw);
            out.len = 17;
        } else {
            out.buf[0] = TAG_RAW;
            out.buf[1..1 + b.len()].copy_from_slice(b);
            // At most 1 + MAX_DEVICE_ID_LEN = 129, which fits a u8.
            out.len = (1 + b.len()) as u8;
        }
        Some(out)
    }

    pub fn as_key(&self) -> &RecordKey {
        RecordKey::from_bytes(&self.buf[..usize::from(self.len)])
    }
}

/// Bytes [`write_key`] appends for `id`.
pub(crate) fn encoded_len(id: &str) -> usize {
    match parse_uuid(id.as_bytes()) {
        Some(_) => 17,
        None => 1 + id.len(),
    }
}

/// Appends the encoding of `id`, of any length (the same bytes as
/// [`KeyBuf::encode`] for ids it accepts).
pub(crate) fn write_key(id: &str, out: &mut Vec<u8>) {
    match parse_uuid(id.as_bytes()) {
        Some((tag, raw)) => {
            out.push(tag);
            out.extend_from_slice(&raw);
        }
        None => {
            out.push(TAG_RAW);
            out.extend_from_slice(id.as_bytes());
        }
    }
}

/// The tag and 16 bytes of a canonical UUID, or `None` for any other id.
/// An id with no hex letters at all is canonical in both cases; it gets the
/// lowercase tag so that the choice is a function of the id.
fn parse_uuid(b: &[u8]) -> Option<(u8, [u8; 16])> {
    /// The hex digit runs of `8-4-4-4-12`, all of even length.
    const RUNS: [(usize, usize); 5] = [(0, 8), (9, 13), (14, 18), (19, 23), (24, 36)];
    if b.len() != UUID_LEN || HYPHENS.iter().any(|&i| b[i] != b'-') {
        return None;
    }
    // Bit 0: a lowercase letter was seen; bit 1: an uppercase one.
    let mut cases = 0u8;
    let mut raw = [0u8; 16];
    let mut n = 0;
    for (start, end) in RUNS {
        for pair in b[start..end].chunks_exact(2) {
            let (hi, lo) = (HEX[pair[0] as usize], HEX[pair[1] as usize]);
            if hi == NOT_HEX || lo == NOT_HEX {
                return None;
            }
            cases |= (hi | lo) >> 4;
            raw[n] = (hi & 0xf) << 4 | (lo & 0xf);
            n += 1;
        }
    }
    match cases {
        3 => None,
        2 => Some((TAG_UUID_UPPER, raw)),
        _ => Some((TAG_UUID_LOWER, raw)),
    }
}

/// Not a hex digit, in [`HEX`].
const NOT_HEX: u8 = 0xff;

/// Each byte's hex value in the low nibble, with 0x10 for a lowercase
/// letter and 0x20 for an uppercase one; [`NOT_HEX`] for the rest. One
/// lookup per digit keeps parsing ids (every registry lookup does it) off
/// the profile.
static HEX: [u8; 256] = {
    let mut t = [NOT_HEX; 256];
    let mut c = 0;
    while c < 256 {
        t[c] = match c as u8 {
            b'0'..=b'9' => c as u8 - b'0',
            b'a'..=b'f' => (c as u8 - b'a' + 10) | 0x10,
            b'A'..=b'F' => (c as u8 - b'A' + 10) | 0x20,
            _ => NOT_HEX,
        };
        c += 1;
    }
    t
};

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(id: &str) -> usize {
        let k = KeyBuf::encode(id).unwrap();
        assert_eq!(k.as_key().decode().as_deref(), Some(id));
        let mut v = Vec::new();
        write_key(id, &mut v);
        assert_eq!(v, k.as_key().as_bytes());
        assert_eq!(encoded_len(id), v.len());
        k.as_key().as_bytes().len()
    }

    #[test]
    fn uuids_are_compact_and_exact() {
        assert_eq!(round_trip("6f1c2a9e-3b1d-4c55-9a0e-2f6f0d7b8c11"), 17);
        assert_eq!(round_trip("6F1C2A9E-3B1D-4C55-9A0E-2F6F0D7B8C11"), 17);
        assert_eq!(round_trip("00000000-0000-0000-0000-000000000000"), 17);
        // Mixed case, braces, wrong hyphens, non-hex: stored raw.
        assert_eq!(round_trip("6f1c2a9e-3b1d-4c55-9a0e-2F6F0D7B8C11"), 37);
        assert_eq!(round_trip("{6f1c2a9e-3b1d-4c55-9a0e-2f6f0d7b8c11}"), 39);
        assert_eq!(round_trip("6f1c2a9e33b1d-4c55-9a0e-2f6f0d7b8c11"), 37);
        assert_eq!(round_trip("6f1c2a9g-3b1d-4c55-9a0e-2f6f0d7b8c11"), 37);
        assert_eq!(round_trip("x"), 2);
        assert_eq!(round_trip(&"a".repeat(128)), 129);
        assert!(KeyBuf::encode(&"a".repeat(129)).is_none());
    }

    #[test]
    fn case_variants_are_distinct_keys() {
        let a = KeyBuf::encode("6f1c2a9e-3b1d-4c55-9a0e-2f6f0d7b8c11").unwrap();
        let b = KeyBuf::encode("6F1C2A9E-3B1D-4C55-9A0E-2F6F0D7B8C11").unwrap();
        assert!(a.as_key() != b.as_key());
    }

    fn any_id() -> impl Strategy<Value = String> {
        prop_oneof![
            "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
            "[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}",
            "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
            "[0-9a-fA-F-]{36}",
            "[!-~]{1,128}",
        ]
    }

    proptest! {
        #[test]
        fn encoding_round_trips(id in any_id()) {
            let k = KeyBuf::encode(&id).unwrap();
            prop_assert_eq!(k.as_key().decode(), Some(id));
        }

        #[test]
        fn encoding_is_injective(a in any_id(), b in any_id()) {
            let (ka, kb) = (KeyBuf::encode(&a).unwrap(), KeyBuf::encode(&b).unwrap());
            prop_assert_eq!(a == b, ka.as_key() == kb.as_key());
        }
    }
}
