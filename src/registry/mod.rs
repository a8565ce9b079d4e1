//! Every device's channel record in memory, shared by all shards.
//!
//! Owns: the concurrent map from device id to a compact record, the string
//! interners that keep records small, and the issued-at histogram that
//! answers "how many devices are in each state" without a scan.
//! Must not touch: the disk, the network, the clock (time is passed in).
//!
//! # Layout
//!
//! Each device is one [`CompactRecord`]: an 8-byte thin pointer to a single
//! allocation holding the encoded device id (17 bytes for a UUID), issued-at,
//! dead mark, refresh mark, interned PFN, provider id and channel URI prefix (2 bytes
//! each), and the rest of the URI (the token, packed at 6 bits per
//! character). A UUID device with a 190-byte URI takes 148 bytes, served
//! from the allocator's 160-byte class; `record.rs` has the byte layout.
//!
//! The map is a `DashMap<CompactRecord, u64>`: a record hashes and compares
//! by its encoded id and borrows as a [`RecordKey`], so a table slot is the
//! thin pointer plus the device's last push outcome packed into 8 bytes
//! ([`LastPush`]; 16 bytes plus hashbrown's 1 control byte), and a lookup by
//! `&str` encodes the id on the stack. The last push lives in the slot, not
//! in the record, so recording one is an in-place write under the shard's
//! lock, without re-encoding the record; it is kept in memory only (a
//! restart forgets it), while everything the lifecycle needs (dead marks,
//! refresh marks) is in the record and in the store.
//!
//! # Why dashmap, not papaya
//!
//! Measured with `cargo bench --bench registry` (2 cores, mimalloc, 1M
//! records with UUID ids and 190-byte URIs, the same compact records in both
//! maps; RSS growth per record; two-thread rates as the median of 5
//! interleaved rounds, two runs on a shared, noisy VM):
//!
//! | map | bytes/record (grown / presized) | upserts/s (run 1, 2) | lookups/s (run 1, 2) |
//! |---|---|---|---|
//! | dashmap | 182.5 / 182.5 | 2.16M, 1.21M | 3.17M, 1.78M |
//! | papaya, blocking resize | 216.1 / 188.8 | 1.28M, 1.32M | 3.01M, 1.52M |
//! | papaya, default incremental resize | | 0.55M, 0.40M | 1.01M, 0.49M |
//!
//! Memory weighs most, and dashmap is smaller: papaya puts every entry in
//! its own boxed `Entry` (one more allocation per device) behind the table
//! pointer, and a grown papaya map kept more memory. The rates were within
//! this machine's noise of each other (papaya lock-free; dashmap one
//! uncontended shard lock per operation, 8 shards on 2 cores), dashmap
//! ahead on lookups in both runs. The papaya figures need its blocking
//! resize mode: a map grown with the default incremental mode stayed two
//! to three times slower.
//!
//! The whole registry (map, interners, histogram) measured 186.7 bytes of
//! RSS per device at 1M and 177.5 at 10M with 8-byte slots, and 209.8 at
//! 1M with the 16-byte slots that hold the last push (P3's bound is 256).
//!
//! What dashmap costs: [`Registry::for_each`] holds a shard's read lock
//! while it calls back, so the callback must not upsert or remove.
//! [`Registry::record_pushes`] reads the shards' hashbrown tables through
//! dashmap's `raw-api`, to prefetch what a batch of lookups will touch.
mod histogram;
pub mod interner;
pub mod key;
pub mod record;
#[cfg(test)]
mod tests;
mod uri;

pub use key::{KeyBuf, RecordKey};
pub use record::{CompactRecord, RecordCodec};

use crate::core::wns::{Outcome, PushResult};
use crate::core::{DeviceRecord, Thresholds, UnixTime};
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use histogram::{Bucket, Histogram};
use std::hash::RandomState;

/// A device's last push outcome, packed into the map slot: when, the final
/// result ([`PushResult::code`]), the last WNS outcome ([`LastPush::outcome_code`]),
/// and the HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastPush {
    pub at: UnixTime,
    pub result: u8,
    pub outcome: u8,
    /// 0 when WNS gave no answer.
    pub status: u16,
}

impl LastPush {
    /// The last push of a wake that ended with `result` at `at`, after
    /// WNS answered `outcome` with `status` (none when it did not answer).
    pub fn new(
        at: UnixTime,
        result: PushResult,
        outcome: Option<&Outcome>,
        status: Option<u16>,
    ) -> LastPush {
        LastPush {
            at,
            result: result.code(),
            outcome: LastPush::outcome_code(outcome),
            status: status.unwrap_or(0),
        }
    }

    /// The code kept for a WNS outcome: 0 for no answer, else one more than
    /// its place in [`Outcome::LABELS`].
    pub fn outcome_code(outcome: Option<&Outcome>) -> u8 {
        outcome.map_or(0, |o| o.index() as u8 + 1)
    }

    /// The final result; `None` for a code this version does not know.
    pub fn result(&self) -> Option<PushResult> {
        PushResult::from_code(self.result)
    }

    /// The label of the last WNS outcome; `None` when WNS did not answer,
    /// `Some("other")` for a code this version does not know.
    pub fn outcome_label(&self) -> Option<&'static str> {
        let code = self.outcome.checked_sub(1)?;
        Some(
            Outcome::LABELS
                .get(usize::from(code))
                .copied()
                .unwrap_or("other"),
        )
    }

    /// `at` in the high 32 bits, then status, `result + 1` (so that 0
    /// means "no push"; result codes stop at 254), outcome.
    fn pack(self) -> u64 {
        u64::from(self.at.0) << 32
            | u64::from(self.status) << 16
            | u64::from(self.result.min(254) + 1) << 8
            | u64::from(self.outcome)
    }

    fn unpack(v: u64) -> Option<LastPush> {
        let result = ((v >> 8) as u8).checked_sub(1)?;
        Some(LastPush {
            at: UnixTime((v >> 32) as u32),
            status: (v >> 16) as u16,
            result,
            outcome: v as u8,
        })
    }
}

/// Device counts indexed by [`LifecycleState`](crate::core::LifecycleState)
/// in the order of `LifecycleState::ALL`.
pub type StateCounts = [u64; 5];

/// The in-memory registry of device records.
pub struct Registry {
    map: DashMap<CompactRecord, u64, RandomState>,
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
        let issued = new.issued_at();
        let (from, old) = match self.map.entry(new) {
            Entry::Occupied(e) => {
                // The last push outlives an update of the same channel life
                // (a dead or refresh mark), not a new channel.
                let push = if e.key().issued_at() == issued {
                    *e.get()
                } else {
                    0
                };
                let (old, _) = e.replace_entry(push);
                (Some(Bucket::of(&old)), Some(old))
            }
            Entry::Vacant(e) => {
                e.insert(0);
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

    /// Records the outcome of a push to `device_id`, in place. False when the
    /// device is gone.
    pub fn record_push(&self, device_id: &str, push: LastPush) -> bool {
        let Some(key) = KeyBuf::encode(device_id) else {
            return false;
        };
        match self.map.get_mut(key.as_key()) {
            Some(mut slot) => {
                *slot = push.pack();
                true
            }
            None => false,
        }
    }

    /// Records the outcomes of many pushes at once, in place, skipping
    /// devices that are gone; returns how many were recorded.
    ///
    /// Cheaper per push than [`Registry::record_push`]: a lookup in a map of
    /// millions misses the CPU cache three times in a row (control bytes,
    /// slot, record), and one at a time each miss waits for the one before.
    /// Here the lookups go in three passes, each prefetching what the next
    /// reads, so their misses overlap.
    pub fn record_pushes(&self, pushes: &[(KeyBuf, LastPush)]) -> usize {
        let mut order: Vec<(usize, u64, usize)> = pushes
            .iter()
            .enumerate()
            .map(|(i, (key, _))| {
                let hash = self.map.hash_usize(&key.as_key()) as u64;
                (self.map.determine_shard(hash as usize), hash, i)
            })
            .collect();
        // By shard, and in order within one: of two pushes to one device,
        // the later is kept.
        order.sort_unstable_by_key(|&(shard, _, i)| (shard, i));
        // Pass 1, over every push: where each probe starts (hashbrown's
        // layout: control bytes from `data_end`, slot `i` at
        // `data_end - (i + 1)`). The tables' addresses are read under their
        // locks, and may be stale by the time they are prefetched: that is
        // harmless, a prefetch is a hint and never faults.
        let mut tables: Vec<Option<(*const u8, usize)>> = vec![None; self.map.shards().len()];
        for &(shard, hash, _) in &order {
            let (ctrl, mask) = *tables[shard].get_or_insert_with(|| {
                let table = self.map.shards()[shard].read();
                (table.data_end().as_ptr() as *const u8, table.buckets() - 1)
            });
            let pos = hash as usize & mask;
            prefetch(ctrl.wrapping_add(pos));
            // The probe's first slot, and the slots after it.
            let first = ctrl.wrapping_sub((pos + 1) * SLOT);
            prefetch(first);
            prefetch(first.wrapping_sub(4 * SLOT));
        }
        // Pass 2: each probe's first candidate's record.
        for group in order.chunk_by(|a, b| a.0 == b.0) {
            let table = self.map.shards()[group[0].0].read();
            for &(_, hash, _) in group {
                // Safety: the shard is locked, and the bucket is only read.
                unsafe {
                    if let Some(bucket) = table.iter_hash(hash).next() {
                        let (rec, _) = bucket.as_ref();
                        prefetch(rec.as_ptr());
                    }
                }
            }
        }
        // Pass 3: the writes.
        let mut recorded = 0;
        for group in order.chunk_by(|a, b| a.0 == b.0) {
            let mut table = self.map.shards()[group[0].0].write();
            for &(_, hash, i) in group {
                let (key, push) = &pushes[i];
                let key = key.as_key();
                if let Some((_, slot)) = table.get_mut(hash, |(rec, _)| rec.key() == key) {
                    *slot.get_mut() = push.pack();
                    recorded += 1;
                }
            }
        }
        recorded
    }

    /// The last push outcome recorded for `device_id`, if any.
    pub fn last_push(&self, device_id: &str) -> Option<LastPush> {
        let key = KeyBuf::encode(device_id)?;
        LastPush::unpack(*self.map.get(key.as_key())?)
    }

    /// Removes a device. Returns true when it was present.
    pub fn remove(&self, device_id: &str) -> bool {
        let Some(key) = KeyBuf::encode(device_id) else {
            return false;
        };
        match self.map.remove(key.as_key()) {
            Some((old, _)) => {
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
    /// A device with a refresh mark counts as `refresh_pending` or
    /// `unreachable`; one with a dead mark as `expired`; any other by its
    /// age, classified by the first second of the minute its channel was
    /// issued in.
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

/// Bytes of one map slot: a record pointer and a packed [`LastPush`].
const SLOT: usize = 16;
const _: () = assert!(std::mem::size_of::<(CompactRecord, dashmap::SharedValue<u64>)>() == SLOT);

/// Asks the CPU to fetch the cache line at `p`; a hint, never a fault.
#[inline(always)]
fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // Safety: a prefetch reads nothing architecturally and cannot fault.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}
