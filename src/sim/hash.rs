//! A fast 64-bit hash for channel identities and tokens, and a hasher that
//! passes such hashes through, so maps keyed by them hash only once.

use std::hash::{BuildHasherDefault, Hasher};

const S0: u64 = 0x243f_6a88_85a3_08d3;
const S1: u64 = 0x1319_8a2e_0370_7344;
const S2: u64 = 0xa409_3822_299f_31d0;

/// Multiplies as 128 bits and folds the halves: the mixing step of
/// foldhash and wyhash.
#[inline]
fn fold_mul(a: u64, b: u64) -> u64 {
    let r = u128::from(a) * u128::from(b);
    (r as u64) ^ ((r >> 64) as u64)
}

#[inline]
fn word(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w[..b.len()].copy_from_slice(b);
    u64::from_le_bytes(w)
}

/// Hashes a sequence of byte strings (the boundaries between parts count),
/// seeded with their total length. Not for adversarial input: the simulator only counts with it, and checks
/// identities where a collision would change an answer.
pub(super) fn hash64(parts: &[&[u8]]) -> u64 {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut h = S0 ^ len as u64;
    for part in parts {
        let mut chunks = part.chunks_exact(16);
        for c in &mut chunks {
            h = fold_mul(word(&c[..8]) ^ h ^ S1, word(&c[8..]) ^ S2);
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let (a, b) = rest.split_at(rest.len().min(8));
            h = fold_mul(word(a) ^ h ^ S1, word(b) ^ S2 ^ rest.len() as u64);
        }
    }
    fold_mul(h ^ S2, S1)
}

/// A `Hasher` for keys that already are 64-bit hashes.
#[derive(Default, Clone, Copy)]
pub(super) struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are expected; fold anything else in.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// Builds [`IdentityHasher`]s.
pub(super) type BuildIdentity = BuildHasherDefault<IdentityHasher>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn distinct_channels_hash_apart() {
        let mut seen = HashSet::new();
        for i in 0..200_000u32 {
            let pq = format!("/?token=AwYAAAD{i:08}");
            assert!(seen.insert(hash64(&[b"db5.notify.windows.com", pq.as_bytes()])));
        }
    }

    #[test]
    fn length_and_content_matter() {
        assert_eq!(hash64(&[b"ab", b"cdef"]), hash64(&[b"ab", b"cdef"]));
        assert_ne!(hash64(&[b"ab", b"cdef"]), hash64(&[b"ab", b"cdeg"]));
        assert_ne!(hash64(&[b""]), hash64(&[b"\0"]));
        assert_ne!(hash64(&[b"a"]), hash64(&[b"a\0"]));
    }
}
