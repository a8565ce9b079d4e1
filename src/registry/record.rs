//! The compact record: one heap allocation per device behind a thin pointer.
//!
//! Layout of the allocation (all integers little-endian, `leb` is unsigned
//! LEB128):
//!
//! ```text
//! leb   key_len          encoded device id length (17 for a UUID)
//! [u8]  key              see `key.rs`
//! leb   fields_len       length of everything that follows
//! u32   issued_at
//! u8    dead_code        0: not dead; else DeadReason::code()
//! u32   dead_at          only when dead_code != 0
//! u8    refresh_code     0: none; else RefreshState::code()
//! u32   refresh_since    only when refresh_code != 0
//! leb   refresh_job      only when refresh_code != 0
//! u16   pfn              interned id, or INLINE
//! u16   provider         interned id, INLINE, or NONE
//! u16   prefix           interned channel URI prefix id, or INLINE
//! leb   rest_word        (rest length in characters << 1) | packed
//! [u8]  rest             6-bit packed or raw, see `uri.rs`
//! then, for each of pfn, provider, prefix that is INLINE, in that order:
//! leb   len, [u8] bytes
//! ```
//!
//! A device with a UUID id, no dead mark, and a 190-byte channel URI whose
//! prefix is the usual 38-byte `https://<host>/?token=` takes
//! 1 + 17 + 2 + (4 + 1 + 1 + 6 + 2 + 114) = 148 bytes (152 token characters
//! packed into 114 bytes), which the allocator serves from its 160-byte size
//! class.

use super::interner::{Interner, DEFAULT_CAPACITY};
use super::key::{self, RecordKey};
use super::uri;
use crate::core::{
    ChannelUri, DeadMark, DeadReason, DeviceId, DeviceRecord, Pfn, ProviderId, RefreshMark,
    RefreshState, UnixTime,
};
use std::borrow::Borrow;
use std::cell::RefCell;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ptr::NonNull;

/// Marks a string stored in the record because its interner was full.
const INLINE: u16 = u16::MAX - 1;
/// Marks an absent provider id.
const NONE: u16 = u16::MAX;
const _: () = assert!(DEFAULT_CAPACITY <= INLINE);

/// A record checked and copied by [`RecordCodec::restore`], with what its
/// fields say about its state, read on the way.
pub struct Restored {
    pub rec: CompactRecord,
    pub issued_at: UnixTime,
    pub dead: bool,
    pub refresh: Option<RefreshState>,
}

/// One device's record, compactly encoded in a single allocation.
///
/// The pointer is thin (8 bytes); the allocation describes its own length.
/// `Hash`, `Eq` and `Borrow<RecordKey>` go by the encoded device id only, so
/// a set of records is a map from device id to record.
pub struct CompactRecord {
    /// Invariant: points to the start of a leaked `Box<[u8]>` whose bytes
    /// begin with two LEB128 lengths as laid out in the module docs, and
    /// whose length is exactly `described_len` of those bytes. The bytes are
    /// never written after construction.
    ptr: NonNull<u8>,
}

// Safety: a `CompactRecord` uniquely owns an immutable byte buffer, like a
// `Box<[u8]>`, which is `Send` and `Sync`. There is no interior mutability.
unsafe impl Send for CompactRecord {}
unsafe impl Sync for CompactRecord {}

impl CompactRecord {
    /// Takes ownership of an encoded record.
    ///
    /// Panics if `bytes` does not describe its own length: that would be a
    /// bug in `RecordCodec::encode`, whatever the input, and going on would
    /// free the allocation with the wrong size.
    fn from_vec(bytes: Vec<u8>) -> CompactRecord {
        assert_eq!(described_len(&bytes), Some(bytes.len()));
        let leaked: &'static mut [u8] = Box::leak(bytes.into_boxed_slice());
        CompactRecord {
            ptr: NonNull::from(leaked).cast::<u8>(),
        }
    }

    /// Where the allocation starts (the key comes first).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// The whole allocation.
    pub fn as_bytes(&self) -> &[u8] {
        let p = self.ptr.as_ptr();
        // Safety: by the type invariant the allocation starts with a
        // well-formed LEB128 key length followed by that many key bytes and a
        // well-formed LEB128 fields length, then that many bytes; every read
        // below stays inside it and nothing writes to it.
        unsafe {
            let (key_len, a) = read_leb_raw(p);
            let (fields_len, b) = read_leb_raw(p.add(a + key_len));
            std::slice::from_raw_parts(p, a + key_len + b + fields_len)
        }
    }

    /// The encoded device id.
    pub fn key(&self) -> &RecordKey {
        let p = self.ptr.as_ptr();
        // Safety: as in `as_bytes`, the key bytes follow its length.
        let key = unsafe {
            let (key_len, a) = read_leb_raw(p);
            std::slice::from_raw_parts(p.add(a), key_len)
        };
        RecordKey::from_bytes(key)
    }

    /// Heap bytes used by this record, before allocator rounding.
    pub fn heap_len(&self) -> usize {
        self.as_bytes().len()
    }

    pub fn issued_at(&self) -> UnixTime {
        UnixTime(self.fields().map_or(0, |mut c| c.u32().unwrap_or(0)))
    }

    /// The dead mark, if WNS declared the channel dead.
    pub fn dead(&self) -> Option<DeadMark> {
        let mut c = self.fields()?;
        c.u32()?;
        let code = c.u8()?;
        if code == 0 {
            return None;
        }
        let at = UnixTime(c.u32()?);
        let reason = DeadReason::from_code(code)?;
        Some(DeadMark { reason, at })
    }

    /// The refresh mark, if the device is in the refresh queue or gave up.
    pub fn refresh(&self) -> Option<RefreshMark> {
        let mut c = self.fields()?;
        c.u32()?;
        if c.u8()? != 0 {
            c.u32()?;
        }
        read_refresh(&mut c)?
    }

    /// A cursor at `issued_at`.
    fn fields(&self) -> Option<Cursor<'_>> {
        let mut c = Cursor(self.as_bytes());
        let key_len = c.leb()?;
        c.take(key_len)?;
        c.leb()?;
        Some(c)
    }
}

impl Drop for CompactRecord {
    fn drop(&mut self) {
        let len = self.as_bytes().len();
        let slice = std::ptr::slice_from_raw_parts_mut(self.ptr.as_ptr(), len);
        // Safety: by the type invariant `ptr` came from leaking a
        // `Box<[u8]>` of exactly `len` bytes, and this is its only owner.
        drop(unsafe { Box::from_raw(slice) });
    }
}

impl Clone for CompactRecord {
    fn clone(&self) -> Self {
        CompactRecord::from_vec(self.as_bytes().to_vec())
    }
}

impl Hash for CompactRecord {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key().hash(state)
    }
}

impl PartialEq for CompactRecord {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for CompactRecord {}

impl Borrow<RecordKey> for CompactRecord {
    fn borrow(&self) -> &RecordKey {
        self.key()
    }
}

impl fmt::Debug for CompactRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // No channel URI: it carries the device's token.
        f.debug_struct("CompactRecord")
            .field("device_id", &self.key().decode())
            .field("heap_len", &self.heap_len())
            .finish()
    }
}

/// Encodes and decodes records against a set of interners.
///
/// Records encoded by one codec must be decoded by the same codec.
pub struct RecordCodec {
    pfns: Interner,
    providers: Interner,
    prefixes: Interner,
}

impl Default for RecordCodec {
    fn default() -> Self {
        Self::new()
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl RecordCodec {
    pub fn new() -> RecordCodec {
        Self::with_interner_capacity(DEFAULT_CAPACITY)
    }

    /// A codec whose interners each hold at most `capacity` strings.
    pub fn with_interner_capacity(capacity: u16) -> RecordCodec {
        RecordCodec {
            pfns: Interner::new(capacity),
            providers: Interner::new(capacity),
            prefixes: Interner::new(capacity),
        }
    }

    /// Encodes `rec` into one allocation, interning what it can.
    pub fn encode(&self, rec: &DeviceRecord) -> CompactRecord {
        SCRATCH.with(|s| match s.try_borrow_mut() {
            Ok(mut fields) => self.encode_with(rec, &mut fields),
            // Only reachable if encoding re-entered itself; stay correct.
            Err(_) => self.encode_with(rec, &mut Vec::new()),
        })
    }

    fn encode_with(&self, rec: &DeviceRecord, fields: &mut Vec<u8>) -> CompactRecord {
        fields.clear();
        fields.extend_from_slice(&rec.issued_at.0.to_le_bytes());
        match rec.dead {
            None => fields.push(0),
            Some(d) => {
                fields.push(d.reason.code());
                fields.extend_from_slice(&d.at.0.to_le_bytes());
            }
        }
        match rec.refresh {
            None => fields.push(0),
            Some(m) => {
                fields.push(m.state.code());
                fields.extend_from_slice(&m.since.0.to_le_bytes());
                write_leb(fields, m.job as usize);
            }
        }
        let (prefix, rest) = uri::split(&rec.channel_uri);
        let pfn = rec.pfn.as_str();
        let provider = rec.provider_id.as_ref().map(|p| p.as_str());
        let pfn_ref = self.pfns.intern(pfn).unwrap_or(INLINE);
        let provider_ref = match provider {
            None => NONE,
            Some(p) => self.providers.intern(p).unwrap_or(INLINE),
        };
        let prefix_ref = self.prefixes.intern(prefix).unwrap_or(INLINE);
        for r in [pfn_ref, provider_ref, prefix_ref] {
            fields.extend_from_slice(&r.to_le_bytes());
        }
        let packed = uri::packable(rest.as_bytes());
        write_leb(fields, rest.len() << 1 | usize::from(packed));
        if packed {
            uri::pack(rest.as_bytes(), fields);
        } else {
            fields.extend_from_slice(rest.as_bytes());
        }
        let inline = [
            (pfn_ref, Some(pfn)),
            (provider_ref, provider),
            (prefix_ref, Some(prefix)),
        ];
        for (r, s) in inline {
            if let (INLINE, Some(s)) = (r, s) {
                write_leb(fields, s.len());
                fields.extend_from_slice(s.as_bytes());
            }
        }

        let id = rec.device_id.as_str();
        let key_len = key::encoded_len(id);
        let mut out =
            Vec::with_capacity(leb_len(key_len) + key_len + leb_len(fields.len()) + fields.len());
        write_leb(&mut out, key_len);
        key::write_key(id, &mut out);
        write_leb(&mut out, fields.len());
        out.extend_from_slice(fields);
        CompactRecord::from_vec(out)
    }

    /// Decodes a record encoded by this codec. `None` only if `rec` was not.
    pub fn decode(&self, rec: &CompactRecord) -> Option<DeviceRecord> {
        let device_id = DeviceId::parse_stored(&rec.key().decode()?).ok()?;
        let mut c = rec.fields()?;
        let issued_at = UnixTime(c.u32()?);
        let dead = match c.u8()? {
            0 => None,
            code => {
                let at = UnixTime(c.u32()?);
                Some(DeadMark {
                    reason: DeadReason::from_code(code)?,
                    at,
                })
            }
        };
        let refresh = read_refresh(&mut c)?;
        let (pfn_ref, provider_ref, prefix_ref) = (c.u16()?, c.u16()?, c.u16()?);
        let rest_word = c.leb()?;
        let (rest_chars, packed) = (rest_word >> 1, rest_word & 1 == 1);
        let rest = c.take(if packed {
            uri::packed_len(rest_chars)
        } else {
            rest_chars
        })?;

        // What is left are the inline strings, in encoding order.
        let pfn = Pfn::parse(self.pfns.lookup(pfn_ref, &mut c)?).ok()?;
        let provider_id = match provider_ref {
            NONE => None,
            r => Some(ProviderId::parse(self.providers.lookup(r, &mut c)?).ok()?),
        };
        let prefix = self.prefixes.lookup(prefix_ref, &mut c)?;
        let mut s = String::with_capacity(prefix.len() + rest_chars);
        s.push_str(prefix);
        if packed {
            uri::unpack(rest, rest_chars, &mut s)?;
        } else {
            s.push_str(std::str::from_utf8(rest).ok()?);
        }
        Some(DeviceRecord {
            device_id,
            pfn,
            channel_uri: ChannelUri::from_trusted(s)?,
            provider_id,
            issued_at,
            dead,
            refresh,
        })
    }

    /// The interned strings, in id order: PFNs, provider ids, channel URI
    /// prefixes. Interners only grow, so a record encoded before this call
    /// refers only to strings in it.
    pub fn dictionary(&self) -> [Vec<String>; 3] {
        [&self.pfns, &self.providers, &self.prefixes].map(|i| {
            (0..i.len())
                .map_while(|id| i.resolve(id as u16).map(str::to_owned))
                .collect()
        })
    }

    /// Interns `dict` (a [`RecordCodec::dictionary`]) so that every string
    /// gets the id it had there: then records encoded against that
    /// dictionary can be taken as they are ([`RecordCodec::restore`]).
    /// Fails when an interner already holds other strings or is too small.
    pub fn seed(&self, dict: &[Vec<String>; 3]) -> Result<(), String> {
        let names = ["PFN", "provider id", "channel URI prefix"];
        for ((interner, strings), name) in [&self.pfns, &self.providers, &self.prefixes]
            .into_iter()
            .zip(dict)
            .zip(names)
        {
            for (want, s) in strings.iter().enumerate() {
                match interner.intern(s) {
                    Some(got) if usize::from(got) == want => {}
                    _ => {
                        return Err(format!(
                            "the {name} dictionary does not fit this registry at entry {want}"
                        ))
                    }
                }
            }
        }
        Ok(())
    }

    /// A record as [`CompactRecord::as_bytes`] gave it, encoded against
    /// this codec's dictionary, taken as it is after a check of its
    /// structure (lengths, codes, dictionary references; no string is
    /// built). `None` when the bytes are not such a record.
    pub fn restore(&self, bytes: &[u8]) -> Option<Restored> {
        let mut c = Cursor(bytes);
        let key_len = c.leb()?;
        let key = RecordKey::from_bytes(c.take(key_len)?);
        if !key.is_well_formed() {
            return None;
        }
        if c.leb()? != c.0.len() {
            return None;
        }
        let issued_at = UnixTime(c.u32()?);
        let dead = match c.u8()? {
            0 => false,
            code => {
                DeadReason::from_code(code)?;
                c.u32()?;
                true
            }
        };
        let refresh = read_refresh(&mut c)?.map(|m| m.state);
        let refs = [c.u16()?, c.u16()?, c.u16()?];
        let rest_word = c.leb()?;
        let rest_chars = rest_word >> 1;
        c.take(if rest_word & 1 == 1 {
            uri::packed_len(rest_chars)
        } else {
            rest_chars
        })?;
        let interners = [&self.pfns, &self.providers, &self.prefixes];
        for (i, (r, interner)) in refs.into_iter().zip(interners).enumerate() {
            match r {
                INLINE => {
                    let n = c.leb()?;
                    std::str::from_utf8(c.take(n)?).ok()?;
                }
                NONE if i == 1 => {}
                id => {
                    interner.resolve(id)?;
                }
            }
        }
        if !c.0.is_empty() {
            return None;
        }
        let leaked: &'static mut [u8] = Box::leak(Box::from(bytes));
        Some(Restored {
            // The bytes describe their own length: checked above.
            rec: CompactRecord {
                ptr: NonNull::from(leaked).cast::<u8>(),
            },
            issued_at,
            dead,
            refresh,
        })
    }

    /// Strings held by the PFN, provider id and URI prefix interners.
    pub fn interned(&self) -> [usize; 3] {
        [self.pfns.len(), self.providers.len(), self.prefixes.len()]
    }
}

impl Interner {
    /// The string for a record's reference: interned, or next inline.
    fn lookup<'a>(&'a self, r: u16, inline: &mut Cursor<'a>) -> Option<&'a str> {
        match r {
            INLINE => {
                let n = inline.leb()?;
                std::str::from_utf8(inline.take(n)?).ok()
            }
            id => self.resolve(id),
        }
    }
}

/// Reads a refresh mark: `Some(None)` for none, `None` if malformed.
fn read_refresh(c: &mut Cursor<'_>) -> Option<Option<RefreshMark>> {
    match c.u8()? {
        0 => Some(None),
        code => {
            let since = UnixTime(c.u32()?);
            let job = u64::try_from(c.leb()?).ok()?;
            Some(Some(RefreshMark {
                state: RefreshState::from_code(code)?,
                since,
                job,
            }))
        }
    }
}

/// Reads through a record's bytes; every read is bounds-checked.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn leb(&mut self) -> Option<usize> {
        let mut v = 0usize;
        for i in 0..LEB_MAX {
            let b = self.u8()?;
            v |= usize::from(b & 0x7f).checked_shl(7 * i as u32)?;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
}

/// Longest LEB128 encoding of a `usize`.
const LEB_MAX: usize = 10;

pub(super) fn write_leb(out: &mut Vec<u8>, mut v: usize) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn leb_len(v: usize) -> usize {
    let bits = usize::BITS - v.leading_zeros();
    (bits as usize).div_ceil(7).max(1)
}

/// The length a record's bytes describe, if they are well formed up to it.
fn described_len(b: &[u8]) -> Option<usize> {
    let mut c = Cursor(b);
    let key_len = c.leb()?;
    c.take(key_len)?;
    let fields_len = c.leb()?;
    c.take(fields_len)?;
    Some(b.len() - c.0.len())
}

/// Reads a LEB128 value at `p`, returning it and its length in bytes.
///
/// # Safety
/// `p` must point to a well-formed LEB128 encoding (as written by
/// `write_leb`) inside one allocation.
unsafe fn read_leb_raw(p: *const u8) -> (usize, usize) {
    let mut v = 0usize;
    let mut i = 0;
    loop {
        // Safety: the caller guarantees the encoding, terminated by a byte
        // without the high bit, lies inside the allocation.
        let b = unsafe { *p.add(i) };
        v |= usize::from(b & 0x7f) << (7 * i);
        i += 1;
        if b & 0x80 == 0 {
            return (v, i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::UriPolicy;

    pub(crate) fn record(id: &str, uri: &str, provider: Option<&str>) -> DeviceRecord {
        DeviceRecord {
            device_id: DeviceId::parse(id).unwrap(),
            pfn: Pfn::parse("Contoso.MDM_8wekyb3d8bbwe").unwrap(),
            channel_uri: ChannelUri::parse(uri, &UriPolicy::default()).unwrap(),
            provider_id: provider.map(|p| ProviderId::parse(p).unwrap()),
            issued_at: UnixTime(1_700_000_123),
            dead: None,
            refresh: None,
        }
    }

    const UUID: &str = "6f1c2a9e-3b1d-4c55-9a0e-2f6f0d7b8c11";

    fn real_uri() -> String {
        // 38-character prefix and a 152-character token: 190 bytes.
        let mut token = String::from("AwYAAAD");
        while token.len() < 143 {
            token.push_str("q5PGQ2%2bT4nW1yZ3kJc8H0f%2f");
        }
        token.truncate(149);
        token.push_str("%3d");
        format!("https://db5.notify.windows.com/?token={token}")
    }

    #[test]
    fn typical_record_is_small() {
        let uri = real_uri();
        assert_eq!(uri.len(), 190);
        let codec = RecordCodec::new();
        let r = record(UUID, &uri, None);
        let c = codec.encode(&r);
        assert_eq!(c.heap_len(), 148);
        assert_eq!(std::mem::size_of::<CompactRecord>(), 8);
        assert_eq!(std::mem::size_of::<Option<CompactRecord>>(), 8);
        assert_eq!(codec.decode(&c), Some(r));
    }

    #[test]
    fn every_field_round_trips() {
        let codec = RecordCodec::new();
        let mut r = record(
            "not-a-uuid",
            "https://db5.notify.windows.com/w/x?a=b+c",
            Some("Contoso"),
        );
        r.dead = Some(DeadMark {
            reason: DeadReason::CredentialMismatch,
            at: UnixTime(u32::MAX),
        });
        r.issued_at = UnixTime(0);
        r.refresh = Some(RefreshMark {
            state: RefreshState::Unreachable,
            since: UnixTime(77),
            job: u64::from(u32::MAX) + 5,
        });
        let c = codec.encode(&r);
        assert_eq!(c.issued_at(), r.issued_at);
        assert_eq!(c.dead(), r.dead);
        assert_eq!(c.refresh(), r.refresh);
        assert_eq!(codec.decode(&c), Some(r.clone()));
        let c2 = c.clone();
        assert_eq!(c2.as_bytes(), c.as_bytes());
        assert_eq!(c2, c);
        assert_eq!(codec.decode(&c2), Some(r));
    }

    #[test]
    fn full_interners_store_strings_inline() {
        let codec = RecordCodec::with_interner_capacity(1);
        let a = record(
            UUID,
            "https://db5.notify.windows.com/?token=AAA",
            Some("P1"),
        );
        let mut b = record("b", "https://bn2.notify.windows.com/?token=BBB", Some("P2"));
        b.pfn = Pfn::parse("Fabrikam.Agent_8wekyb3d8bbwe").unwrap();
        let (ca, cb) = (codec.encode(&a), codec.encode(&b));
        assert_eq!(codec.interned(), [1, 1, 1]);
        assert!(cb.heap_len() > ca.heap_len() + 40);
        assert_eq!(codec.decode(&ca), Some(a));
        assert_eq!(codec.decode(&cb), Some(b));
    }

    #[test]
    fn leb_lengths() {
        for v in [0usize, 1, 127, 128, 300, 16_383, 16_384, usize::MAX] {
            let mut out = Vec::new();
            write_leb(&mut out, v);
            assert_eq!(out.len(), leb_len(v), "{v}");
            assert_eq!(Cursor(&out).leb(), Some(v));
            assert_eq!(unsafe { read_leb_raw(out.as_ptr()) }, (v, out.len()));
        }
    }

    #[test]
    fn huge_uri_from_trusted_round_trips() {
        let codec = RecordCodec::new();
        let mut r = record(UUID, "https://db5.notify.windows.com/?token=a", None);
        r.channel_uri = ChannelUri::from_trusted(format!(
            "https://db5.notify.windows.com/?token={}",
            "Z".repeat(70_000)
        ))
        .unwrap();
        let c = codec.encode(&r);
        assert_eq!(codec.decode(&c), Some(r));
    }
}
