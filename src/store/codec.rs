//! The on-disk encoding of a [`DeviceRecord`].
//!
//! Key: the device id's bytes, so the store's key order is device-id order
//! (byte-wise, which for the ASCII ids we accept is also `str` order).
//!
//! Value, format version 1:
//!
//! ```text
//! version:u8 (= 1)  field_count:u8  field*
//! field = tag:u8  len:varint  payload[len]
//! ```
//!
//! Fields appear in strictly ascending tag order, each at most once; the
//! value ends exactly after the last of `field_count` fields. Lengths are
//! unsigned LEB128, at most three bytes (values up to 65 535).
//!
//! | tag | field         | payload                                   | presence |
//! |-----|---------------|-------------------------------------------|----------|
//! | 1   | `pfn`         | UTF-8 bytes                               | required |
//! | 2   | `channel_uri` | the URI's bytes, byte-exact               | required |
//! | 3   | `provider_id` | UTF-8 bytes                               | optional |
//! | 4   | `issued_at`   | u32 little-endian, seconds since epoch    | required |
//! | 5   | `dead`        | reason code u8, then u32 LE time          | optional |
//! | 6   | `refresh`     | state code u8, u32 LE since, u64 LE job   | optional |
//!
//! Every field says what it is and how long it is, so a value can be read
//! (and dumped) without knowing the record layout, and a later version can
//! add an optional field with a new tag: version-1 readers skip tags they do
//! not know. A change that old readers must not ignore bumps the version
//! byte, which version-1 readers refuse.
//!
//! The field count makes every strict prefix of a valid value invalid, so a
//! torn or truncated value is reported as corrupt rather than read as a record
//! with its optional fields missing. Decoding never panics: every malformed
//! input is a [`StoreError::Corrupt`] naming the key and what was wrong.

use super::StoreError;
use crate::core::{
    ChannelUri, DeadMark, DeadReason, DeviceId, DeviceRecord, Pfn, ProviderId, RefreshMark,
    RefreshState, UnixTime,
};

/// The value format this build writes.
pub const FORMAT_VERSION: u8 = 1;

const TAG_PFN: u8 = 1;
const TAG_CHANNEL_URI: u8 = 2;
const TAG_PROVIDER_ID: u8 = 3;
const TAG_ISSUED_AT: u8 = 4;
const TAG_DEAD: u8 = 5;
const TAG_REFRESH: u8 = 6;

/// Largest field payload the format can describe (three LEB128 bytes capped
/// at `u16::MAX`; channel URIs are bounded far below this).
pub const MAX_FIELD_LEN: usize = u16::MAX as usize;

/// The key under which `id` is stored.
pub fn key(id: &DeviceId) -> &[u8] {
    id.as_str().as_bytes()
}

/// Appends the value encoding of `rec` to `out` (the device id is the key and
/// is not repeated).
///
/// # Panics
///
/// If a string field is longer than [`MAX_FIELD_LEN`], which validated
/// records never are (ids are at most 128 bytes and URIs at most 65 535).
pub fn encode_value_into(rec: &DeviceRecord, out: &mut Vec<u8>) {
    let count = 3
        + u8::from(rec.provider_id.is_some())
        + u8::from(rec.dead.is_some())
        + u8::from(rec.refresh.is_some());
    out.push(FORMAT_VERSION);
    out.push(count);
    put_field(out, TAG_PFN, rec.pfn.as_str().as_bytes());
    put_field(out, TAG_CHANNEL_URI, rec.channel_uri.as_str().as_bytes());
    if let Some(p) = &rec.provider_id {
        put_field(out, TAG_PROVIDER_ID, p.as_str().as_bytes());
    }
    put_field(out, TAG_ISSUED_AT, &rec.issued_at.secs().to_le_bytes());
    if let Some(d) = rec.dead {
        let mut payload = [0u8; 5];
        payload[0] = d.reason.code();
        payload[1..].copy_from_slice(&d.at.secs().to_le_bytes());
        put_field(out, TAG_DEAD, &payload);
    }
    if let Some(m) = rec.refresh {
        let mut payload = [0u8; 13];
        payload[0] = m.state.code();
        payload[1..5].copy_from_slice(&m.since.secs().to_le_bytes());
        payload[5..].copy_from_slice(&m.job.to_le_bytes());
        put_field(out, TAG_REFRESH, &payload);
    }
}

/// The value encoding of `rec`.
pub fn encode_value(rec: &DeviceRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len_hint(rec));
    encode_value_into(rec, &mut out);
    out
}

fn encoded_len_hint(rec: &DeviceRecord) -> usize {
    2 + 3
        + rec.pfn.as_str().len()
        + 4
        + rec.channel_uri.as_str().len()
        + rec.provider_id.as_ref().map_or(0, |p| 3 + p.as_str().len())
        + 7
        + 8
        + 15
}

fn put_field(out: &mut Vec<u8>, tag: u8, payload: &[u8]) {
    assert!(
        payload.len() <= MAX_FIELD_LEN,
        "store field {tag} is {} bytes, over the format's {MAX_FIELD_LEN}",
        payload.len()
    );
    out.push(tag);
    put_leb(out, payload.len() as u64);
    out.extend_from_slice(payload);
}

/// Appends `n` as unsigned LEB128 (the store's lengths).
pub(super) fn put_leb(out: &mut Vec<u8>, mut n: u64) {
    loop {
        let low = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(low);
            return;
        }
        out.push(low | 0x80);
    }
}

/// Why a stored value could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("key is not a valid device id")]
    Key,
    #[error("value is empty")]
    Empty,
    #[error("unknown format version {0} (this build reads {FORMAT_VERSION})")]
    Version(u8),
    #[error("value ends inside {0}")]
    Truncated(&'static str),
    #[error("field length is not a valid varint of at most 65535")]
    Length,
    #[error("field tag {tag} after tag {prev}: tags must ascend")]
    TagOrder { tag: u8, prev: u8 },
    #[error("{0} trailing bytes after the last field")]
    Trailing(usize),
    #[error("required field {0} is missing")]
    Missing(&'static str),
    #[error("field {0} has the wrong length")]
    FieldLen(&'static str),
    #[error("field {0} is not valid")]
    Invalid(&'static str),
}

impl DecodeError {
    /// The store error for this failure at `key`.
    pub fn at_key(self, key: &[u8]) -> StoreError {
        StoreError::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            why: self.to_string(),
        }
    }
}

/// Decodes the record stored under `key` with value `value`.
pub fn decode(key: &[u8], value: &[u8]) -> Result<DeviceRecord, StoreError> {
    decode_record(key, value).map_err(|e| e.at_key(key))
}

/// [`decode`] with the failure reason as a typed error.
pub fn decode_record(key: &[u8], value: &[u8]) -> Result<DeviceRecord, DecodeError> {
    let device_id = std::str::from_utf8(key)
        .ok()
        .and_then(|s| DeviceId::parse_stored(s).ok())
        .ok_or(DecodeError::Key)?;
    let f = decode_fields(value)?;
    let pfn = utf8(f.pfn.ok_or(DecodeError::Missing("pfn"))?, "pfn")?;
    let pfn = Pfn::parse(pfn).map_err(|_| DecodeError::Invalid("pfn"))?;
    let uri = utf8(
        f.channel_uri.ok_or(DecodeError::Missing("channel_uri"))?,
        "channel_uri",
    )?;
    let channel_uri =
        ChannelUri::from_trusted(uri.to_owned()).ok_or(DecodeError::Invalid("channel_uri"))?;
    let provider_id = match f.provider_id {
        None => None,
        Some(b) => Some(
            ProviderId::parse(utf8(b, "provider_id")?)
                .map_err(|_| DecodeError::Invalid("provider_id"))?,
        ),
    };
    let issued_at = f.issued_at.ok_or(DecodeError::Missing("issued_at"))?;
    let issued_at = UnixTime(u32::from_le_bytes(
        issued_at
            .try_into()
            .map_err(|_| DecodeError::FieldLen("issued_at"))?,
    ));
    let dead = match f.dead {
        None => None,
        Some(&[code, a, b, c, d]) => Some(DeadMark {
            reason: DeadReason::from_code(code).ok_or(DecodeError::Invalid("dead"))?,
            at: UnixTime(u32::from_le_bytes([a, b, c, d])),
        }),
        Some(_) => return Err(DecodeError::FieldLen("dead")),
    };
    let refresh = match f.refresh {
        None => None,
        Some(b) => {
            let b: &[u8; 13] = b.try_into().map_err(|_| DecodeError::FieldLen("refresh"))?;
            let mut since = [0u8; 4];
            since.copy_from_slice(&b[1..5]);
            let mut job = [0u8; 8];
            job.copy_from_slice(&b[5..]);
            Some(RefreshMark {
                state: RefreshState::from_code(b[0]).ok_or(DecodeError::Invalid("refresh"))?,
                since: UnixTime(u32::from_le_bytes(since)),
                job: u64::from_le_bytes(job),
            })
        }
    };
    Ok(DeviceRecord {
        device_id,
        pfn,
        channel_uri,
        provider_id,
        issued_at,
        dead,
        refresh,
    })
}

#[derive(Default)]
struct Fields<'a> {
    pfn: Option<&'a [u8]>,
    channel_uri: Option<&'a [u8]>,
    provider_id: Option<&'a [u8]>,
    issued_at: Option<&'a [u8]>,
    dead: Option<&'a [u8]>,
    refresh: Option<&'a [u8]>,
}

fn decode_fields(value: &[u8]) -> Result<Fields<'_>, DecodeError> {
    let (&version, rest) = value.split_first().ok_or(DecodeError::Empty)?;
    if version != FORMAT_VERSION {
        return Err(DecodeError::Version(version));
    }
    let (&count, mut rest) = rest
        .split_first()
        .ok_or(DecodeError::Truncated("the header"))?;
    let mut fields = Fields::default();
    let mut prev = 0u8;
    for _ in 0..count {
        let (&tag, r) = rest
            .split_first()
            .ok_or(DecodeError::Truncated("a field tag"))?;
        if tag <= prev {
            return Err(DecodeError::TagOrder { tag, prev });
        }
        prev = tag;
        let (len, r) = read_len(r)?;
        if r.len() < len {
            return Err(DecodeError::Truncated("a field payload"));
        }
        let (payload, r) = r.split_at(len);
        rest = r;
        let slot = match tag {
            TAG_PFN => &mut fields.pfn,
            TAG_CHANNEL_URI => &mut fields.channel_uri,
            TAG_PROVIDER_ID => &mut fields.provider_id,
            TAG_ISSUED_AT => &mut fields.issued_at,
            TAG_DEAD => &mut fields.dead,
            TAG_REFRESH => &mut fields.refresh,
            // An optional field from a later writer: skip it.
            _ => continue,
        };
        *slot = Some(payload);
    }
    if !rest.is_empty() {
        return Err(DecodeError::Trailing(rest.len()));
    }
    Ok(fields)
}

fn read_len(b: &[u8]) -> Result<(usize, &[u8]), DecodeError> {
    let mut n = 0usize;
    for i in 0..3 {
        let &byte = b.get(i).ok_or(DecodeError::Truncated("a field length"))?;
        n |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            // Reject non-minimal encodings (a trailing zero group) so every
            // record has exactly one encoding.
            if i > 0 && byte == 0 {
                return Err(DecodeError::Length);
            }
            if n > MAX_FIELD_LEN {
                return Err(DecodeError::Length);
            }
            return Ok((n, &b[i + 1..]));
        }
    }
    Err(DecodeError::Length)
}

fn utf8<'a>(b: &'a [u8], field: &'static str) -> Result<&'a str, DecodeError> {
    std::str::from_utf8(b).map_err(|_| DecodeError::Invalid(field))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::arb_record;
    use proptest::prelude::*;

    pub(crate) fn sample(id: &str, provider: bool, dead: bool) -> DeviceRecord {
        DeviceRecord {
            device_id: DeviceId::parse(id).unwrap(),
            pfn: Pfn::parse("Contoso.MDM_8wekyb3d8bbwe").unwrap(),
            channel_uri: ChannelUri::from_trusted(
                "https://db5.notify.windows.com/?token=AwYAAAD8sUbJZq5PGQ2%2bT4nW1yZ3kJc8H0fQ"
                    .to_owned(),
            )
            .unwrap(),
            provider_id: provider.then(|| ProviderId::parse("Contoso-MDM.1").unwrap()),
            issued_at: UnixTime(1_795_600_800),
            dead: dead.then_some(DeadMark {
                reason: DeadReason::Wns410,
                at: UnixTime(1_795_700_000),
            }),
            refresh: dead.then_some(RefreshMark {
                state: RefreshState::Pending,
                since: UnixTime(1_795_700_001),
                job: 1 << 40,
            }),
        }
    }

    fn all_samples() -> Vec<DeviceRecord> {
        let mut v = Vec::new();
        for provider in [false, true] {
            for dead in [false, true] {
                v.push(sample(
                    "6f1c2a9e-3b1d-4c55-9a0e-2f6f0d7b8c11",
                    provider,
                    dead,
                ));
            }
        }
        v
    }

    #[test]
    fn round_trips_every_optional_combination() {
        for rec in all_samples() {
            let v = encode_value(&rec);
            assert_eq!(v[0], FORMAT_VERSION);
            let back = decode(key(&rec.device_id), &v).unwrap();
            assert_eq!(back, rec);
            assert_eq!(back.channel_uri.host(), "db5.notify.windows.com");
        }
    }

    #[test]
    fn layout_is_the_documented_one() {
        let rec = sample("d1", false, false);
        let v = encode_value(&rec);
        let pfn = rec.pfn.as_str().as_bytes();
        let uri = rec.channel_uri.as_str().as_bytes();
        let mut want = vec![1, 3, TAG_PFN, pfn.len() as u8];
        want.extend_from_slice(pfn);
        want.extend_from_slice(&[TAG_CHANNEL_URI, uri.len() as u8]);
        want.extend_from_slice(uri);
        want.extend_from_slice(&[TAG_ISSUED_AT, 4]);
        want.extend_from_slice(&1_795_600_800u32.to_le_bytes());
        assert_eq!(v, want);
    }

    #[test]
    fn long_uri_uses_multi_byte_length() {
        let mut rec = sample("d1", true, true);
        let uri = format!(
            "https://db5.notify.windows.com/?token={}",
            "A".repeat(20_000)
        );
        rec.channel_uri = ChannelUri::from_trusted(uri).unwrap();
        let v = encode_value(&rec);
        assert_eq!(decode(b"d1", &v).unwrap(), rec);
    }

    #[test]
    fn every_truncation_fails_cleanly() {
        for rec in all_samples() {
            let v = encode_value(&rec);
            for n in 0..v.len() {
                let err = decode(key(&rec.device_id), &v[..n]).unwrap_err();
                assert!(matches!(err, StoreError::Corrupt { .. }), "prefix {n}");
            }
        }
    }

    #[test]
    fn corrupt_values_are_named_errors() {
        let rec = sample("dev-1", true, true);
        let good = encode_value(&rec);
        let why = |k: &[u8], v: &[u8]| decode_record(k, v).unwrap_err();

        assert_eq!(why(b"dev-1", &[]), DecodeError::Empty);
        assert_eq!(why(b"", &good), DecodeError::Key);
        assert_eq!(why(b"a/b", &good), DecodeError::Key);
        assert_eq!(why(&[0xff], &good), DecodeError::Key);

        let mut v = good.clone();
        v[0] = 2;
        assert_eq!(why(b"dev-1", &v), DecodeError::Version(2));

        let mut v = good.clone();
        v.push(0);
        assert_eq!(why(b"dev-1", &v), DecodeError::Trailing(1));

        // Swap the order of two fields by rewriting the first tag.
        let mut v = good.clone();
        v[2] = TAG_DEAD;
        assert!(matches!(why(b"dev-1", &v), DecodeError::TagOrder { .. }));

        // A count that leaves out the required fields.
        let mut v = vec![1, 1];
        put_field(&mut v, TAG_PFN, b"Contoso.MDM_8wekyb3d8bbwe");
        assert_eq!(why(b"dev-1", &v), DecodeError::Missing("channel_uri"));

        // Wrong payload sizes and invalid contents.
        let mut v = vec![1, 3];
        put_field(&mut v, TAG_PFN, b"Contoso.MDM_8wekyb3d8bbwe");
        put_field(&mut v, TAG_CHANNEL_URI, b"https://x.notify.windows.com/");
        put_field(&mut v, TAG_ISSUED_AT, &[1, 2, 3]);
        assert_eq!(why(b"dev-1", &v), DecodeError::FieldLen("issued_at"));

        let mut v = vec![1, 3];
        put_field(&mut v, TAG_PFN, b"not a pfn");
        put_field(&mut v, TAG_CHANNEL_URI, b"https://x.notify.windows.com/");
        put_field(&mut v, TAG_ISSUED_AT, &[1, 2, 3, 4]);
        assert_eq!(why(b"dev-1", &v), DecodeError::Invalid("pfn"));

        let mut v = vec![1, 3];
        put_field(&mut v, TAG_PFN, b"Contoso.MDM_8wekyb3d8bbwe");
        put_field(&mut v, TAG_CHANNEL_URI, b"https:/");
        put_field(&mut v, TAG_ISSUED_AT, &[1, 2, 3, 4]);
        assert_eq!(why(b"dev-1", &v), DecodeError::Invalid("channel_uri"));

        let mut v = vec![1, 4];
        put_field(&mut v, TAG_PFN, b"Contoso.MDM_8wekyb3d8bbwe");
        put_field(&mut v, TAG_CHANNEL_URI, b"https://x.notify.windows.com/");
        put_field(&mut v, TAG_ISSUED_AT, &[1, 2, 3, 4]);
        put_field(&mut v, TAG_DEAD, &[9, 0, 0, 0, 0]);
        assert_eq!(why(b"dev-1", &v), DecodeError::Invalid("dead"));

        // Over-long and non-minimal lengths.
        assert_eq!(
            why(b"dev-1", &[1, 1, TAG_PFN, 0x80, 0x80, 0x80, 0x01]),
            DecodeError::Length
        );
        assert_eq!(
            why(b"dev-1", &[1, 1, TAG_PFN, 0x85, 0x00]),
            DecodeError::Length
        );
        assert_eq!(
            why(b"dev-1", &[1, 1, TAG_PFN, 0xff, 0xff, 0x7f]),
            DecodeError::Length
        );

        // The store error names the key.
        match decode(b"dev-1", &[7]).unwrap_err() {
            StoreError::Corrupt { key, why } => {
                assert_eq!(key, "dev-1");
                assert!(why.contains("version 7"), "{why}");
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn unknown_optional_fields_are_skipped() {
        let rec = sample("dev-1", true, false);
        let mut v = encode_value(&rec);
        v[1] += 1;
        put_field(&mut v, 200, b"from a later version");
        assert_eq!(decode(b"dev-1", &v).unwrap(), rec);
    }

    proptest! {
        #[test]
        fn round_trip(rec in arb_record()) {
            let v = encode_value(&rec);
            let back = decode(key(&rec.device_id), &v).unwrap();
            prop_assert_eq!(back.channel_uri.as_str(), rec.channel_uri.as_str());
            prop_assert_eq!(back, rec);
        }

        #[test]
        fn truncations_of_any_record_fail(rec in arb_record()) {
            let v = encode_value(&rec);
            for n in 0..v.len() {
                prop_assert!(decode(key(&rec.device_id), &v[..n]).is_err());
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(k in proptest::collection::vec(any::<u8>(), 0..40),
                                       v in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&k, &v);
        }

        #[test]
        fn bit_flips_never_panic(rec in arb_record(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut v = encode_value(&rec);
            let i = pos.index(v.len());
            v[i] ^= 1 << bit;
            let _ = decode(key(&rec.device_id), &v);
        }
    }
}
