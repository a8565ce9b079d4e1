//! The issued-at index: which devices had their channel issued in each
//! minute, so that an expiry sweep reads only the minutes that came due
//! (P8), never the whole fleet.
//!
//! An entry is a device's map hash (see `parts.rs`): 8 bytes, from which
//! the registry finds the device's partition and its slot. Entries are kept
//! exact: the registry moves a device's entry under the same lock that
//! changes its record, so the index never holds a stale entry and never
//! misses one.
//!
//! A minute holds a plain vector while it is small (a linear search to
//! remove is a few cache lines), and a hash set once it is large: a
//! million-device import stamps every device with the same few minutes,
//! and re-registering them must not search millions of entries each.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// A minute holding more entries than this is a hash set.
const SMALL_MAX: usize = 1024;

/// Hashes a map hash by itself: it is already uniformly random.
#[derive(Default)]
pub(crate) struct Identity(u64);

impl Hasher for Identity {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type Large = HashSet<u64, BuildHasherDefault<Identity>>;

enum Minute {
    Small(Vec<u64>),
    /// A set, and the entries that met an equal one already in it.
    Large(Large, Vec<u64>),
}

impl Minute {
    fn len(&self) -> usize {
        match self {
            Minute::Small(v) => v.len(),
            Minute::Large(s, dups) => s.len() + dups.len(),
        }
    }

    fn insert(&mut self, h: u64) {
        match self {
            Minute::Small(v) if v.len() < SMALL_MAX => {
                if v.len() == v.capacity() {
                    // Grow by an eighth, not double: the index is 8 bytes
                    // per device and slack is most of what it could waste.
                    v.reserve_exact((v.len() / 8).max(4));
                }
                v.push(h);
            }
            Minute::Small(v) => {
                let mut s = Large::with_capacity_and_hasher(2 * v.len(), Default::default());
                let mut dups = Vec::new();
                for x in v.drain(..).chain(std::iter::once(h)) {
                    if !s.insert(x) {
                        dups.push(x);
                    }
                }
                *self = Minute::Large(s, dups);
            }
            Minute::Large(s, dups) => {
                if !s.insert(h) {
                    dups.push(h);
                }
            }
        }
    }

    /// A minute of exactly these entries.
    fn of(hs: &[u64]) -> Minute {
        if hs.len() <= SMALL_MAX {
            return Minute::Small(hs.to_vec());
        }
        let mut s = Large::with_capacity_and_hasher(hs.len(), Default::default());
        let mut dups = Vec::new();
        for &h in hs {
            if !s.insert(h) {
                dups.push(h);
            }
        }
        Minute::Large(s, dups)
    }

    /// Removes one entry `h`; false when there was none.
    fn remove(&mut self, h: u64) -> bool {
        match self {
            Minute::Small(v) => match v.iter().position(|&x| x == h) {
                Some(i) => {
                    v.swap_remove(i);
                    if v.capacity() > 2 * v.len() + 8 {
                        v.shrink_to(v.len() + v.len() / 8);
                    }
                    true
                }
                None => false,
            },
            Minute::Large(s, dups) => {
                let removed = match dups.iter().position(|&x| x == h) {
                    Some(i) => {
                        dups.swap_remove(i);
                        true
                    }
                    None => s.remove(&h),
                };
                if s.len() < SMALL_MAX / 2 {
                    *self = Minute::Small(s.drain().chain(dups.drain(..)).collect());
                }
                removed
            }
        }
    }

    fn copy_into(&self, out: &mut Vec<u64>) {
        match self {
            Minute::Small(v) => out.extend_from_slice(v),
            Minute::Large(s, dups) => {
                out.extend(s.iter().copied());
                out.extend_from_slice(dups);
            }
        }
    }
}

/// Device map hashes by the minute their channel was issued.
///
/// Two devices may share a map hash (a 1 in 2^54 chance per pair); each
/// then has its own entry, and a minute is a multiset.
#[derive(Default)]
pub(crate) struct IssuedIndex {
    minutes: Mutex<BTreeMap<u32, Minute>>,
}

impl IssuedIndex {
    /// Moves one entry `h` from minute `from` to minute `to` (`None`: not
    /// indexed before / after).
    pub(crate) fn shift(&self, h: u64, from: Option<u32>, to: Option<u32>) {
        if from == to {
            return;
        }
        let mut minutes = self.minutes.lock();
        if let Some(f) = from {
            if let Some(m) = minutes.get_mut(&f) {
                let removed = m.remove(h);
                debug_assert!(removed, "the issued-at index lost an entry");
                if m.len() == 0 {
                    minutes.remove(&f);
                }
            }
        }
        if let Some(t) = to {
            minutes
                .entry(t)
                .or_insert_with(|| Minute::Small(Vec::new()))
                .insert(h);
        }
    }

    /// Adds many entries at once (loading at start): sorted by minute in
    /// one pass, each minute then made at its final size.
    pub(crate) fn extend(&self, chunks: Vec<Vec<(u32, u64)>>) {
        let n: usize = chunks.iter().map(Vec::len).sum();
        let (Some(lo), Some(hi)) = (
            chunks.iter().flatten().map(|&(m, _)| m).min(),
            chunks.iter().flatten().map(|&(m, _)| m).max(),
        ) else {
            return;
        };
        let span = (hi - lo) as usize + 1;
        if span <= 4 * n + 1024 {
            // Counting sort: minutes of a fleet are dense.
            let mut start = vec![0usize; span + 1];
            for &(m, _) in chunks.iter().flatten() {
                start[(m - lo) as usize + 1] += 1;
            }
            for i in 1..=span {
                start[i] += start[i - 1];
            }
            let mut hashes = vec![0u64; n];
            let mut at = start.clone();
            for &(m, h) in chunks.iter().flatten() {
                let slot = &mut at[(m - lo) as usize];
                hashes[*slot] = h;
                *slot += 1;
            }
            drop(chunks);
            let mut map = self.minutes.lock();
            for (i, w) in start.windows(2).enumerate() {
                if w[0] < w[1] {
                    Self::add_minute(&mut map, lo + i as u32, &hashes[w[0]..w[1]]);
                }
            }
        } else {
            let mut all: Vec<(u32, u64)> = chunks.into_iter().flatten().collect();
            all.sort_unstable_by_key(|&(m, _)| m);
            let mut map = self.minutes.lock();
            let mut hs = Vec::new();
            for group in all.chunk_by(|a, b| a.0 == b.0) {
                hs.clear();
                hs.extend(group.iter().map(|&(_, h)| h));
                Self::add_minute(&mut map, group[0].0, &hs);
            }
        }
    }

    fn add_minute(map: &mut BTreeMap<u32, Minute>, minute: u32, hs: &[u64]) {
        match map.entry(minute) {
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(Minute::of(hs));
            }
            std::collections::btree_map::Entry::Occupied(mut e) => {
                for &h in hs {
                    e.get_mut().insert(h);
                }
            }
        }
    }

    /// The first minute in `from..=to` that has entries, at or after `from`.
    pub(crate) fn next_minute(&self, from: u32, to: u32) -> Option<u32> {
        if from > to {
            return None;
        }
        self.minutes.lock().range(from..=to).next().map(|(&m, _)| m)
    }

    /// Every entry of `minute`, appended to `out`.
    pub(crate) fn entries(&self, minute: u32, out: &mut Vec<u64>) {
        if let Some(m) = self.minutes.lock().get(&minute) {
            m.copy_into(out);
        }
    }

    /// Entries in all minutes (for tests and bookkeeping).
    pub(crate) fn len(&self) -> usize {
        self.minutes.lock().values().map(Minute::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ix: &IssuedIndex, minute: u32) -> Vec<u64> {
        let mut v = Vec::new();
        ix.entries(minute, &mut v);
        v.sort_unstable();
        v
    }

    #[test]
    fn entries_move_between_minutes_and_leave_no_empty_minute() {
        let ix = IssuedIndex::default();
        ix.shift(7, None, Some(10));
        ix.shift(8, None, Some(10));
        ix.shift(9, None, Some(12));
        assert_eq!(at(&ix, 10), [7, 8]);
        assert_eq!(ix.next_minute(0, 100), Some(10));
        assert_eq!(ix.next_minute(11, 100), Some(12));
        assert_eq!(ix.next_minute(13, 100), None);
        ix.shift(7, Some(10), Some(12));
        ix.shift(8, Some(10), None);
        assert_eq!(at(&ix, 10), Vec::<u64>::new());
        assert_eq!(ix.next_minute(0, 11), None);
        assert_eq!(at(&ix, 12), [7, 9]);
        // A move within one minute changes nothing.
        ix.shift(9, Some(12), Some(12));
        assert_eq!(ix.len(), 2);
    }

    #[test]
    fn a_bulk_load_sorts_entries_into_minutes() {
        // Dense minutes (counting sort) and far-apart ones (a plain sort),
        // onto an index that has entries already.
        for far in [0, 1 << 30] {
            let ix = IssuedIndex::default();
            ix.shift(1, None, Some(10));
            let big: Vec<(u32, u64)> = (0..2 * SMALL_MAX as u64).map(|h| (11, 100 + h)).collect();
            ix.extend(vec![
                vec![(12 + far, 3), (10, 2)],
                big,
                vec![(11, 100), (10, 4)],
            ]);
            assert_eq!(at(&ix, 10), [1, 2, 4]);
            assert_eq!(at(&ix, 11).len(), 2 * SMALL_MAX + 1);
            assert!(matches!(ix.minutes.lock()[&11], Minute::Large(..)));
            assert_eq!(at(&ix, 12 + far), [3]);
            assert_eq!(ix.next_minute(13, u32::MAX), (far > 0).then_some(12 + far));
            // The equal entry is kept apart, and removing it leaves one.
            ix.shift(100, Some(11), None);
            assert_eq!(at(&ix, 11).len(), 2 * SMALL_MAX);
            assert!(at(&ix, 11).contains(&100));
            ix.extend(Vec::new());
            assert_eq!(ix.len(), 3 + 2 * SMALL_MAX + 1);
        }
    }

    #[test]
    fn a_shared_hash_keeps_one_entry_per_device() {
        let ix = IssuedIndex::default();
        ix.shift(5, None, Some(1));
        ix.shift(5, None, Some(1));
        ix.shift(5, Some(1), None);
        assert_eq!(at(&ix, 1), [5]);
    }

    #[test]
    fn a_large_minute_becomes_a_set_and_back() {
        let ix = IssuedIndex::default();
        let n = 3 * SMALL_MAX as u64;
        for h in 0..n {
            ix.shift(h, None, Some(4));
        }
        assert_eq!(ix.len(), n as usize);
        assert!(matches!(ix.minutes.lock()[&4], Minute::Large(..)));
        // Equal hashes in a large minute are kept apart.
        ix.shift(3, None, Some(4));
        ix.shift(3, Some(4), None);
        assert_eq!(ix.len(), n as usize);
        for h in 0..n - 10 {
            ix.shift(h, Some(4), Some(5));
        }
        assert!(matches!(ix.minutes.lock()[&4], Minute::Small(_)));
        assert_eq!(at(&ix, 4), (n - 10..n).collect::<Vec<_>>());
        assert_eq!(at(&ix, 5).len(), (n - 10) as usize);
    }
}
