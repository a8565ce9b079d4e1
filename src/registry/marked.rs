//! The map hashes of the devices that carry a dead or a refresh mark, by
//! partition. Only marked devices can be `refresh_pending` or
//! `unreachable`, and they are few beside the fleet, so listings of those
//! states read this index and the records it points to rather than every
//! record ([`super::Registry::page_marked`]).
//!
//! Entries move under the lock of the record's map entry, as the issued-at
//! index's do, so the index and the records agree whenever no upsert or
//! removal of that device is in progress.

use super::issued::Identity;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::hash::BuildHasherDefault;

/// Marked devices per map hash: two devices may share a hash (a 1 in 2^54
/// chance per pair), so each hash counts its devices.
type Counts = HashMap<u64, u32, BuildHasherDefault<Identity>>;

pub(crate) struct MarkedIndex {
    parts: Box<[Mutex<Counts>]>,
}

impl MarkedIndex {
    /// An empty index over `parts` partitions.
    pub(crate) fn new(parts: usize) -> MarkedIndex {
        MarkedIndex {
            parts: (0..parts).map(|_| Mutex::new(Counts::default())).collect(),
        }
    }

    /// One device of partition `part` with map hash `h` went from marked
    /// (`from`) or not to marked (`to`) or not.
    pub(crate) fn shift(&self, part: usize, h: u64, from: bool, to: bool) {
        if from == to {
            return;
        }
        let mut counts = self.parts[part].lock();
        if to {
            *counts.entry(h).or_insert(0) += 1;
        } else if let Some(n) = counts.get_mut(&h) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&h);
            }
        } else {
            debug_assert!(false, "the marked index lost an entry");
        }
    }

    /// The hashes of partition `part`'s marked devices, each once,
    /// appended to `out`.
    pub(crate) fn hashes(&self, part: usize, out: &mut Vec<u64>) {
        out.extend(self.parts[part].lock().keys().copied());
    }

    /// Marked devices in all partitions.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.parts
            .iter()
            .map(|p| p.lock().values().map(|&n| n as usize).sum::<usize>())
            .sum()
    }
}
