//! Checksummed, length-prefixed frames: how the embedded backend lays its
//! log and snapshots on disk, and how a reader tells a torn tail from
//! damage.
//!
//! A frame is
//!
//! ```text
//! u32  len          payload length, little-endian, at most FRAME_PAYLOAD_BYTES_MAX
//! u32  len_check    low 32 bits of XXH3-64 of the four len bytes (seed FRAME_SEED)
//! u32  checksum     low 32 bits of XXH3-64 of the four len bytes, then the payload
//! [u8] payload
//! ```
//!
//! The length has a check of its own, so a damaged length is never taken
//! for a frame that runs past the end of the file (which would drop the
//! frames after it as if they were a torn tail).
//!
//! One frame is written with one write, so a crash can cut short only the
//! frames of the last write, which was never acknowledged. Reading a file
//! frame by frame, a frame that does not check out is:
//! - a **torn tail** when no whole frame follows it anywhere in the file:
//!   its header is cut short, it reaches past the end of the file, or what
//!   follows is garbage or zeros (a file system may extend a file with
//!   zeros before the data reaches the disk). Recovery drops it and
//!   truncates there; that is normal.
//! - **damage** otherwise: a frame written after it, so acknowledged after
//!   it, is there. The reader refuses, naming the offset.
//!
//! Telling the two apart looks for a whole frame at every later offset. It
//! runs only when a frame does not check out, once, at recovery.

use xxhash_rust::xxh3::Xxh3;

/// Bytes of a frame's header.
pub const FRAME_HEADER_BYTES: usize = 12;
/// The seed of a frame's length check: a constant, part of the format.
pub const FRAME_SEED: u64 = 0x7773_6761_7465_0002;
/// The largest payload a frame may carry.
pub const FRAME_PAYLOAD_BYTES_MAX: usize = 64 * 1024 * 1024;

/// The check of a frame's length bytes.
fn len_check(len: [u8; 4]) -> u32 {
    xxhash_rust::xxh3::xxh3_64_with_seed(&len, FRAME_SEED) as u32
}

/// The checksum of a frame with payload `payload`.
fn checksum(len: [u8; 4], payload: &[u8]) -> u32 {
    let mut h = Xxh3::new();
    h.update(&len);
    h.update(payload);
    h.digest() as u32
}

/// Appends one frame carrying `payload` to `out`.
///
/// Panics if `payload` is larger than [`FRAME_PAYLOAD_BYTES_MAX`]: callers
/// split what they write well below it.
pub fn encode(payload: &[u8], out: &mut Vec<u8>) {
    assert!(
        payload.len() <= FRAME_PAYLOAD_BYTES_MAX,
        "a frame payload of {} bytes",
        payload.len()
    );
    let len = (payload.len() as u32).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&len_check(len).to_le_bytes());
    out.extend_from_slice(&checksum(len, payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// What is found at one offset of a file's bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Found<'a> {
    /// A whole frame; the next one starts at `next`.
    Frame { payload: &'a [u8], next: usize },
    /// The end of the file, exactly.
    End,
    /// A frame cut short by a crash: the valid data ends at `at`.
    TornTail { at: usize },
}

/// A frame that does not check out, with valid data after it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("damaged frame at byte {offset}: {why}")]
pub struct Damage {
    /// Where the frame starts, from the start of the bytes read.
    pub offset: usize,
    pub why: &'static str,
}

/// Reads the frame at `offset` of `bytes` (a whole file's contents).
pub fn read_at(bytes: &[u8], offset: usize) -> Result<Found<'_>, Damage> {
    let rest = bytes.get(offset..).unwrap_or_default();
    if rest.is_empty() {
        return Ok(Found::End);
    }
    let torn = Ok(Found::TornTail { at: offset });
    if rest.len() < FRAME_HEADER_BYTES {
        return torn;
    }
    let word = |i: usize| -> [u8; 4] { rest[i..i + 4].try_into().expect("four bytes") };
    let len_bytes = word(0);
    let sum = u32::from_le_bytes(word(8));
    let len = u32::from_le_bytes(len_bytes) as usize;
    let damage = |why| Err(Damage { offset, why });
    if u32::from_le_bytes(word(4)) != len_check(len_bytes) || len > FRAME_PAYLOAD_BYTES_MAX {
        return if frame_after(bytes, offset + 1) {
            damage("length check mismatch")
        } else {
            torn
        };
    }
    let end = FRAME_HEADER_BYTES + len;
    if end > rest.len() {
        return torn;
    }
    let payload = &rest[FRAME_HEADER_BYTES..end];
    if checksum(len_bytes, payload) == sum {
        return Ok(Found::Frame {
            payload,
            next: offset + end,
        });
    }
    if frame_after(bytes, offset + 1) {
        damage("checksum mismatch")
    } else {
        torn
    }
}

/// Whether a whole frame starts anywhere at or after `from`.
fn frame_after(bytes: &[u8], from: usize) -> bool {
    let last = bytes.len().saturating_sub(FRAME_HEADER_BYTES);
    (from..=last).any(|o| {
        let rest = &bytes[o..];
        // Zeros (a preallocated file's unwritten end) are never a frame.
        if rest[..FRAME_HEADER_BYTES].iter().all(|&b| b == 0) {
            return false;
        }
        let len_bytes: [u8; 4] = rest[..4].try_into().expect("four bytes");
        let check = u32::from_le_bytes(rest[4..8].try_into().expect("four bytes"));
        let len = u32::from_le_bytes(len_bytes) as usize;
        if check != len_check(len_bytes) || len > rest.len() - FRAME_HEADER_BYTES {
            return false;
        }
        let sum = u32::from_le_bytes(rest[8..12].try_into().expect("four bytes"));
        checksum(
            len_bytes,
            &rest[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len],
        ) == sum
    })
}

/// Every frame of a file's bytes, in order, and where its valid data ends.
#[derive(Debug, PartialEq, Eq)]
pub struct Frames<'a> {
    pub payloads: Vec<&'a [u8]>,
    /// The length of the valid data: the file's length, or where a torn
    /// tail starts.
    pub valid_len: usize,
    /// True when a torn tail was found (and is to be truncated).
    pub torn: bool,
}

/// Reads every frame of `bytes`.
pub fn read_all(bytes: &[u8]) -> Result<Frames<'_>, Damage> {
    let mut payloads = Vec::new();
    let mut offset = 0;
    loop {
        match read_at(bytes, offset)? {
            Found::Frame { payload, next } => {
                payloads.push(payload);
                offset = next;
            }
            Found::End => {
                return Ok(Frames {
                    payloads,
                    valid_len: offset,
                    torn: false,
                })
            }
            Found::TornTail { at } => {
                return Ok(Frames {
                    payloads,
                    valid_len: at,
                    torn: true,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn file(payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in payloads {
            encode(p, &mut out);
        }
        out
    }

    /// A preallocated file's zeros are never read as a frame: the check of
    /// a zero length is not zero.
    #[test]
    fn zeros_are_never_a_frame() {
        assert_ne!(len_check([0; 4]), 0);
        assert_eq!(read_at(&[0u8; 64], 0), Ok(Found::TornTail { at: 0 }));
        let mut b = Vec::new();
        encode(b"abc", &mut b);
        let whole = b.len();
        b.extend_from_slice(&[0u8; 4096]);
        assert_eq!(
            read_at(&b, 0),
            Ok(Found::Frame {
                payload: b"abc",
                next: whole
            })
        );
        assert_eq!(read_at(&b, whole), Ok(Found::TornTail { at: whole }));
    }

    #[test]
    fn frames_round_trip_empty_payloads_included() {
        let bytes = file(&[b"one", b"", b"three"]);
        let f = read_all(&bytes).unwrap();
        assert_eq!(f.payloads, vec![&b"one"[..], b"", b"three"]);
        assert_eq!((f.valid_len, f.torn), (bytes.len(), false));
        assert_eq!(read_all(&[]).unwrap().payloads.len(), 0);
    }

    #[test]
    fn a_cut_short_last_frame_is_a_torn_tail() {
        let whole = file(&[b"first", b"second frame"]);
        let first_len = FRAME_HEADER_BYTES + 5;
        for cut in first_len + 1..whole.len() {
            let f = read_all(&whole[..cut]).unwrap();
            assert_eq!(f.payloads, vec![&b"first"[..]], "cut at {cut}");
            assert_eq!((f.valid_len, f.torn), (first_len, true), "cut at {cut}");
        }
    }

    #[test]
    fn a_last_frame_with_garbage_or_zeros_after_it_is_torn() {
        let mut bytes = file(&[b"first", b"second"]);
        let second = FRAME_HEADER_BYTES + 5;
        // The payload of the last write never reached the disk.
        let n = bytes.len();
        bytes[n - 3..].fill(0);
        bytes.extend_from_slice(&[0; 4096]);
        let f = read_all(&bytes).unwrap();
        assert_eq!((f.payloads.len(), f.valid_len, f.torn), (1, second, true));
        // Only zeros where a frame should start.
        let mut zeros = file(&[b"first"]);
        zeros.extend_from_slice(&[0; 100]);
        let f = read_all(&zeros).unwrap();
        assert_eq!((f.payloads.len(), f.valid_len, f.torn), (1, second, true));
    }

    #[test]
    fn damage_before_valid_data_is_refused_with_its_offset() {
        let mut bytes = file(&[b"first", b"second", b"third"]);
        let second = FRAME_HEADER_BYTES + 5;
        bytes[second + FRAME_HEADER_BYTES] ^= 0x40;
        assert_eq!(
            read_all(&bytes),
            Err(Damage {
                offset: second,
                why: "checksum mismatch"
            })
        );
        let mut bytes = file(&[b"first", b"second"]);
        bytes[3] = 0xff;
        assert_eq!(
            read_all(&bytes),
            Err(Damage {
                offset: 0,
                why: "length check mismatch"
            })
        );
    }

    proptest! {
        /// Whatever a crash leaves of the last write, the frames written
        /// before it read back whole and in order.
        #[test]
        fn every_acknowledged_frame_survives_a_torn_last_write(
            acked in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..8),
            last in prop::collection::vec(any::<u8>(), 1..300),
            keep in 0usize..400,
            zeros in 0usize..64,
        ) {
            let refs: Vec<&[u8]> = acked.iter().map(Vec::as_slice).collect();
            let mut bytes = file(&refs);
            let valid = bytes.len();
            let mut tail = Vec::new();
            encode(&last, &mut tail);
            tail.truncate(keep.min(tail.len() - 1));
            bytes.extend_from_slice(&tail);
            bytes.extend(std::iter::repeat_n(0u8, zeros));
            let f = read_all(&bytes).unwrap();
            if f.payloads.len() == refs.len() + 1 {
                // The zeros after the cut happened to be the payload's own
                // last bytes: the frame is whole after all.
                prop_assert_eq!(f.payloads[refs.len()], &last[..]);
                prop_assert_eq!(&f.payloads[..refs.len()], &refs[..]);
            } else {
                prop_assert_eq!(f.payloads, refs);
                prop_assert_eq!(f.valid_len, valid);
            }
        }

        /// Any one flipped bit is caught: as damage, or as a torn tail when
        /// it is in the last frame, which alone is dropped.
        #[test]
        fn a_flipped_bit_never_reads_as_a_good_frame_nor_drops_another(
            payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 1..6),
            bit in any::<prop::sample::Index>(),
        ) {
            let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            let mut bytes = file(&refs);
            let i = bit.index(bytes.len() * 8);
            bytes[i / 8] ^= 1 << (i % 8);
            match read_all(&bytes) {
                Err(_) => {}
                Ok(f) => {
                    prop_assert!(f.torn);
                    prop_assert_eq!(&f.payloads[..], &refs[..refs.len() - 1]);
                }
            }
        }
    }
}
