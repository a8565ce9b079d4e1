//! Every device's channel record in memory, shared by all shards.
//!
//! Owns: the concurrent map from device id to a compact record, the string
//! interners that keep records small, and the issued-at histogram that
//! answers "how many devices are in each state" without a scan.
//! Must not touch: the disk, the network, the clock (time is passed in).

mod histogram;
pub mod interner;
pub mod key;
pub mod record;
#[cfg(test)]
mod tests;
mod uri;

pub use key::{KeyBuf, RecordKey};
pub use record::{CompactRecord, RecordCodec};

use crate::core::{DeviceRecord, Thresholds, UnixTime};
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use histogram::{Bucket, Histogram};
use std::hash::RandomState;

/// Device counts indexed by [`LifecycleState`](crate::core::LifecycleState)
/// in the order of `LifecycleState::ALL`.
pub type StateCounts = [u64; 5];

/// The in-memory registry of device records.
pub struct Registry {
    map: DashMap<CompactRecord, (), RandomState>,
    codec: RecordCodec,
    histogram: Histogram,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Self::with_capacity(0)
    }

    /// An empty registry sized for about `n` devices.
    pub fn with_capacity(n: usize) -> Registry {
        Self::with_parts(n, RecordCodec::new())
    }

    fn with_parts(n: usize, codec: RecordCodec) -> Registry {
        Registry {
            map: DashMap::with_capacity_and_hasher(n, RandomState::new()),
            codec,
            histogram: Histogram::new(),
        }
    }

    /// Inserts or replaces the record for `rec.device_id`. Returns true when
    /// the device was not present before.
    pub fn upsert(&self, rec: &DeviceRecord) -> bool {
        let new = self.codec.encode(rec);
        let (to, spread) = (Bucket::of(&new), new.key().spread());
        let (from, old) = match self.map.entry(new) {
            Entry::Occupied(e) => {
                let (old, ()) = e.replace_entry(());
                (Some(Bucket::of(&old)), Some(old))
            }
            Entry::Vacant(e) => {
                e.insert(());
                (None, None)
            }
        };
        self.histogram.shift(spread, from, Some(to));
        // The old record is freed here, outside the map's lock.
        drop(old);
        from.is_none()
    }

    /// The record for `device_id`, decoded.
    pub fn get(&self, device_id: &str) -> Option<DeviceRecord> {
        let key = KeyBuf::encode(device_id)?;
        let entry = self.map.get(key.as_key())?;
        self.decode(entry.key())
    }

    /// Removes a device. Returns true when it was present.
    pub fn remove(&self, device_id: &str) -> bool {
        let Some(key) = KeyBuf::encode(device_id) else {
            return false;
        };
        match self.map.remove(key.as_key()) {
            Some((old, ())) => {
                let spread = key.as_key().spread();
                self.histogram.shift(spread, Some(Bucket::of(&old)), None);
                true
            }
            None => false,
        }
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Devices by state at `now`, exact to the minute, without visiting
    /// every record.
    ///
    /// Counts `active`, `renewal_due` and `expired` (age, or a dead mark);
    /// `refresh_pending` and `unreachable` are 0 until the lifecycle
    /// component owns them. A device is counted by the first second of the
    /// minute its channel was issued in.
    pub fn state_counts(&self, th: &Thresholds, now: UnixTime) -> StateCounts {
        self.histogram.counts(th, now)
    }

    /// Calls `f` with every record, decoded, in no particular order.
    ///
    /// Devices upserted or removed meanwhile may or may not be seen. `f` runs
    /// while part of the map is read-locked: it must not call `upsert` or
    /// `remove` on this registry (that would deadlock); `get` is fine.
    pub fn for_each(&self, mut f: impl FnMut(&DeviceRecord)) {
        for entry in self.map.iter() {
            if let Some(rec) = self.decode(entry.key()) {
                f(&rec);
            }
        }
    }

    fn decode(&self, rec: &CompactRecord) -> Option<DeviceRecord> {
        let out = self.codec.decode(rec);
        debug_assert!(out.is_some(), "a stored record failed to decode");
        out
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}
