//! Every device's channel record in memory, shared by all shards.
//!
//! Owns: the concurrent map from device id to a compact record, the string
//! interners that keep records small, the issued-at histogram that
//! answers "how many devices are in each state" without a scan, and the
//! index of devices with a dead or refresh mark that lists the states only
//! they can be in (`marked.rs`: a map hash and a count per marked device, a
//! 16-byte slot and a control byte in a hash table at most 7/8 full, so 17
//! to 36 MB at a million open refresh jobs).
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
mod durable;
mod histogram;
pub mod interner;
mod issued;
pub mod key;
mod marked;
pub mod record;
#[cfg(test)]
mod tests;
mod uri;

pub use key::{KeyBuf, RecordKey};
pub use record::{CompactRecord, RecordCodec};

use crate::core::partition::PARTITIONS_MAX;
use crate::core::wns::{Outcome, PushResult};
use crate::core::{DeadMark, DeviceRecord, Partitioning, RefreshMark, Thresholds, UnixTime};
use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use histogram::{Bucket, Histogram};
use issued::IssuedIndex;
use marked::MarkedIndex;
use std::collections::BinaryHeap;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use xxhash_rust::xxh3::xxh3_64_with_seed;

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

/// Bits of a map hash that carry the device's partition (see
/// [`PartHasher`]). Below hashbrown's 7-bit tag (bits 57..64) and
/// dashmap's shard bits (the few just below it), above any bucket index a
/// table of under 2^40 slots uses.
const PART_SHIFT: u32 = 40;
const PART_MASK: u64 = 0xfff << PART_SHIFT;
const _: () = assert!(PARTITIONS_MAX as u64 <= (PART_MASK >> PART_SHIFT) + 1);
/// Lock shards of one partition's map (dashmap's minimum).
const PART_SHARDS: usize = 2;

/// The map hasher of one partition: XXH3-64 of the encoded key with a seed
/// drawn once per registry, so no one can choose ids that collide, with the
/// partition in bits 40..52. From any device's hash, then, the registry
/// finds its partition and its slot: the issued-at index keeps nothing
/// else.
#[derive(Clone)]
pub(crate) struct PartHasher {
    seed: u64,
    part: u64,
}

impl BuildHasher for PartHasher {
    type Hasher = PartHash;
    fn build_hasher(&self) -> PartHash {
        PartHash {
            seed: self.seed,
            part: self.part,
            h: 0,
        }
    }
}

pub(crate) struct PartHash {
    seed: u64,
    part: u64,
    h: u64,
}

impl Hasher for PartHash {
    fn write(&mut self, bytes: &[u8]) {
        self.h = xxh3_64_with_seed(bytes, self.seed ^ self.h);
    }
    fn finish(&self) -> u64 {
        (self.h & !PART_MASK) | (self.part << PART_SHIFT)
    }
}

type Part = DashMap<CompactRecord, u64, PartHasher>;

/// A device id encoded for the map, with its partition: what
/// [`Registry::record_pushes`] takes.
pub struct DeviceKey {
    part: u16,
    key: KeyBuf,
}

/// The lifecycle fields of a record, read without decoding it: what a
/// listing filters on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marks {
    pub issued_at: UnixTime,
    pub dead: Option<DeadMark>,
    pub refresh: Option<RefreshMark>,
}

impl Marks {
    fn of(rec: &CompactRecord) -> Marks {
        Marks {
            issued_at: rec.issued_at(),
            dead: rec.dead(),
            refresh: rec.refresh(),
        }
    }
}

/// The in-memory registry of device records, one map per partition.
pub struct Registry {
    parts: Box<[Part]>,
    partitioning: Partitioning,
    codec: RecordCodec,
    histogram: Histogram,
    issued: IssuedIndex,
    /// The devices with a dead or refresh mark, by partition.
    marked: MarkedIndex,
    /// Issued-at entries gathered while a snapshot loads.
    loading: parking_lot::Mutex<Loading>,
    len: AtomicUsize,
}

/// What loading partitions gathers for the issued-at index: the entries
/// added, a chunk per partition, and those a record met twice replaced.
#[derive(Default)]
struct Loading {
    added: Vec<Vec<(u32, u64)>>,
    removed: Vec<(u32, u64)>,
}

impl Registry {
    /// An empty registry with the default partition count.
    pub fn new() -> Registry {
        Self::with_capacity(0)
    }

    /// An empty registry with the default partition count, sized for about
    /// `n` devices.
    pub fn with_capacity(n: usize) -> Registry {
        Self::with_partitions(Partitioning::default(), n)
    }

    /// An empty registry over `partitioning`, sized for about `n` devices.
    pub fn with_partitions(partitioning: Partitioning, n: usize) -> Registry {
        Self::with_codec(partitioning, n, RecordCodec::new())
    }

    fn with_codec(partitioning: Partitioning, n: usize, codec: RecordCodec) -> Registry {
        let count = usize::from(partitioning.count());
        let seed = RandomState::new().hash_one(0x7773_6761_7465_u64);
        let per_part = n.div_ceil(count);
        Registry {
            parts: (0..count)
                .map(|p| {
                    Part::with_capacity_and_hasher_and_shard_amount(
                        per_part,
                        PartHasher {
                            seed,
                            part: p as u64,
                        },
                        PART_SHARDS,
                    )
                })
                .collect(),
            partitioning,
            codec,
            histogram: Histogram::new(),
            issued: IssuedIndex::default(),
            marked: MarkedIndex::new(count),
            loading: Default::default(),
            len: AtomicUsize::new(0),
        }
    }

    /// How devices are split into partitions.
    pub fn partitioning(&self) -> Partitioning {
        self.partitioning
    }

    /// The listing cursor that stands just after `device_id` (the next
    /// page starts after it); `None` when no device can have that id.
    pub fn cursor_after(&self, device_id: &str) -> Option<Cursor> {
        let key = self.key(device_id)?;
        Some(Cursor {
            part: key.part,
            key: key.key.as_key().as_bytes().to_vec(),
        })
    }

    /// The map key of `device_id`; `None` when no device can have that id.
    pub fn key(&self, device_id: &str) -> Option<DeviceKey> {
        Some(DeviceKey {
            part: self.partitioning.of(device_id),
            key: KeyBuf::encode(device_id)?,
        })
    }

    fn part(&self, key: &DeviceKey) -> &Part {
        &self.parts[usize::from(key.part)]
    }

    /// Inserts or replaces the record for `rec.device_id`. Returns true when
    /// the device was not present before.
    pub fn upsert(&self, rec: &DeviceRecord) -> bool {
        let pi = usize::from(self.partitioning.of(rec.device_id.as_str()));
        let part = &self.parts[pi];
        let new = self.codec.encode(rec);
        let (to, spread) = (Bucket::of(&new), new.key().spread());
        let marked = is_marked(&new);
        let issued = new.issued_at();
        let hash = part.hash_usize(&new.key()) as u64;
        let (from, old) = match part.entry(new) {
            Entry::Occupied(e) => {
                // The last push outlives an update of the same channel life
                // (a dead or refresh mark), not a new channel.
                let was = e.key().issued_at();
                let push = if was == issued { *e.get() } else { 0 };
                // Under the entry's lock, so the index moves in the same
                // order as the record.
                self.issued
                    .shift(hash, Some(minute(was)), Some(minute(issued)));
                self.marked.shift(pi, hash, is_marked(e.key()), marked);
                let (old, _) = e.replace_entry(push);
                (Some(Bucket::of(&old)), Some(old))
            }
            Entry::Vacant(e) => {
                self.issued.shift(hash, None, Some(minute(issued)));
                self.marked.shift(pi, hash, false, marked);
                e.insert(0);
                self.len.fetch_add(1, Ordering::Relaxed);
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
        let key = self.key(device_id)?;
        let entry = self.part(&key).get(key.key.as_key())?;
        self.decode(entry.key())
    }

    /// Records the outcome of a push to `device_id`, in place. False when the
    /// device is gone.
    pub fn record_push(&self, device_id: &str, push: LastPush) -> bool {
        let Some(key) = self.key(device_id) else {
            return false;
        };
        match self.part(&key).get_mut(key.key.as_key()) {
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
    pub fn record_pushes(&self, pushes: &[(DeviceKey, LastPush)]) -> usize {
        let mut order: Vec<(u16, usize, u64, usize)> = pushes
            .iter()
            .enumerate()
            .map(|(i, (key, _))| {
                let part = self.part(key);
                let hash = part.hash_usize(&key.key.as_key()) as u64;
                (key.part, part.determine_shard(hash as usize), hash, i)
            })
            .collect();
        // By shard, and in order within one: of two pushes to one device,
        // the later is kept.
        order.sort_unstable_by_key(|&(part, shard, _, i)| (part, shard, i));
        let table_of = |part: u16, shard: usize| &self.parts[usize::from(part)].shards()[shard];
        // Pass 1, over every push: where each probe starts (hashbrown's
        // layout: control bytes from `data_end`, slot `i` at
        // `data_end - (i + 1)`). The tables' addresses are read under their
        // locks, and may be stale by the time they are prefetched: that is
        // harmless, a prefetch is a hint and never faults.
        for group in order.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
            let (ctrl, mask) = {
                let table = table_of(group[0].0, group[0].1).read();
                (table.data_end().as_ptr() as *const u8, table.buckets() - 1)
            };
            for &(_, _, hash, _) in group {
                let pos = hash as usize & mask;
                prefetch(ctrl.wrapping_add(pos));
                // The probe's first slot, and the slots after it.
                let first = ctrl.wrapping_sub((pos + 1) * SLOT);
                prefetch(first);
                prefetch(first.wrapping_sub(4 * SLOT));
            }
        }
        // Pass 2: each probe's first candidate's record.
        for group in order.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
            let table = table_of(group[0].0, group[0].1).read();
            for &(_, _, hash, _) in group {
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
        for group in order.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
            let mut table = table_of(group[0].0, group[0].1).write();
            for &(_, _, hash, i) in group {
                let (key, push) = &pushes[i];
                let key = key.key.as_key();
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
        let key = self.key(device_id)?;
        LastPush::unpack(*self.part(&key).get(key.key.as_key())?)
    }

    /// Removes a device. Returns true when it was present.
    pub fn remove(&self, device_id: &str) -> bool {
        let Some(key) = self.key(device_id) else {
            return false;
        };
        let part = self.part(&key);
        let hash = part.hash_usize(&key.key.as_key()) as u64;
        let removed = part.remove_if(key.key.as_key(), |rec, _| {
            // Under the entry's lock, as in `upsert`.
            self.issued.shift(hash, Some(minute(rec.issued_at())), None);
            self.marked
                .shift(usize::from(key.part), hash, is_marked(rec), false);
            true
        });
        match removed {
            Some((old, _)) => {
                self.len.fetch_sub(1, Ordering::Relaxed);
                let spread = key.key.as_key().spread();
                self.histogram.shift(spread, Some(Bucket::of(&old)), None);
                true
            }
            None => false,
        }
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
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

    /// Calls `f` with every record, decoded, partition by partition.
    ///
    /// Devices upserted or removed meanwhile may or may not be seen. `f` runs
    /// while part of the map is read-locked: it must not call `upsert` or
    /// `remove` on this registry (that would deadlock); `get` is fine.
    pub fn for_each(&self, mut f: impl FnMut(&DeviceRecord)) {
        for part in self.parts.iter() {
            for entry in part.iter() {
                if let Some(rec) = self.decode(entry.key()) {
                    f(&rec);
                }
            }
        }
    }

    /// Removes every device of partition `part` from memory (cluster mode:
    /// the partition moved to another node, which holds it from now on).
    /// Nothing is written. Returns how many were removed.
    pub fn drop_partition(&self, part: u16) -> usize {
        let Some(p) = self.parts.get(usize::from(part)) else {
            return 0;
        };
        let ids: Vec<String> = p
            .iter()
            .filter_map(|entry| entry.key().key().decode())
            .collect();
        ids.iter().filter(|id| self.remove(id)).count()
    }

    /// Up to `limit` records after `after` that pass `filter`, in listing
    /// order: by partition, then by encoded device id within one. Reads
    /// memory only.
    ///
    /// A page stops at `limit` records, or at the end of the first
    /// partition that brings the records examined to `budget`, so one page
    /// costs at most a partition more than `budget`. `next` is where the
    /// following page starts, `None` once every partition is read; passing
    /// it back continues without skipping or repeating a device that stayed
    /// registered meanwhile. A `limit` or `budget` of 0 is treated as 1.
    pub fn page(
        &self,
        after: Option<&Cursor>,
        limit: usize,
        budget: usize,
        filter: &dyn Fn(&Marks) -> bool,
    ) -> Page {
        self.page_until(after, limit, budget, self.parts.len(), filter)
    }

    /// [`Registry::page`] that stops before partition `until`: its `next`
    /// is then a cursor at the start of `until` (or `None` when that is the
    /// last partition's end). Cluster mode lists a run of partitions served
    /// here this way, and asks other nodes for theirs.
    pub fn page_until(
        &self,
        after: Option<&Cursor>,
        limit: usize,
        budget: usize,
        until: usize,
        filter: &dyn Fn(&Marks) -> bool,
    ) -> Page {
        let until = until.min(self.parts.len());
        let (limit, budget) = (limit.max(1), budget.max(1));
        let (mut p, mut after_key) = match after {
            Some(c) => (usize::from(c.part), c.key.clone()),
            None => (0, Vec::new()),
        };
        let mut page = Page::default();
        let mut examined = 0;
        while p < until {
            let need = limit - page.records.len();
            let (keys, more, seen) = self.smallest_keys_after(p, &after_key, need, filter);
            examined += seen;
            for k in &keys {
                let key = RecordKey::from_bytes(k);
                if let Some(entry) = self.parts[p].get(key) {
                    if filter(&Marks::of(entry.key())) {
                        if let Some(rec) = self.decode(entry.key()) {
                            page.records.push(rec);
                        }
                    }
                }
            }
            if more {
                // The page is full inside this partition.
                let last = keys.last().map(|k| k.to_vec()).unwrap_or_default();
                page.next = Some(Cursor {
                    part: p as u16,
                    key: last,
                });
                return page;
            }
            p += 1;
            after_key.clear();
            if page.records.len() >= limit || examined >= budget {
                break;
            }
        }
        page.next = (p < self.parts.len()).then(|| Cursor {
            part: p as u16,
            key: Vec::new(),
        });
        page
    }

    /// Like [`Registry::page`], for a filter that only devices with a dead
    /// or refresh mark can pass (`refresh_pending`, `unreachable`): reads
    /// the index of marked devices and the records it points to, never the
    /// others, so a listing costs what it finds, however large the fleet.
    /// The order and the cursors are [`Registry::page`]'s; a page stops at
    /// `limit` records or the end of the partitions.
    pub fn page_marked(
        &self,
        after: Option<&Cursor>,
        limit: usize,
        filter: &dyn Fn(&Marks) -> bool,
    ) -> Page {
        self.page_marked_until(after, limit, self.parts.len(), filter)
    }

    /// [`Registry::page_marked`] that stops before partition `until`, as
    /// [`Registry::page_until`] does.
    pub fn page_marked_until(
        &self,
        after: Option<&Cursor>,
        limit: usize,
        until: usize,
        filter: &dyn Fn(&Marks) -> bool,
    ) -> Page {
        let until = until.min(self.parts.len());
        let limit = limit.max(1);
        let (mut p, mut after_key) = match after {
            Some(c) => (usize::from(c.part), c.key.clone()),
            None => (0, Vec::new()),
        };
        let mut page = Page::default();
        let mut hashes = Vec::new();
        while p < until {
            hashes.clear();
            self.marked.hashes(p, &mut hashes);
            let mut found = self.marked_in(p, &hashes, &after_key, filter);
            found.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            let need = limit - page.records.len();
            if found.len() > need {
                // The page is full inside this partition.
                found.truncate(need);
                let last = found.last().map(|(k, _)| k.to_vec()).unwrap_or_default();
                page.records.extend(found.into_iter().map(|(_, r)| r));
                page.next = Some(Cursor {
                    part: p as u16,
                    key: last,
                });
                return page;
            }
            page.records.extend(found.into_iter().map(|(_, r)| r));
            p += 1;
            after_key.clear();
            if page.records.len() >= limit {
                break;
            }
        }
        page.next = (p < self.parts.len()).then(|| Cursor {
            part: p as u16,
            key: Vec::new(),
        });
        page
    }

    /// The records of partition `p` with a map hash in `hashes`, a key after
    /// `after` and marks that pass `filter`, with their keys, unordered.
    fn marked_in(
        &self,
        p: usize,
        hashes: &[u64],
        after: &[u8],
        filter: &dyn Fn(&Marks) -> bool,
    ) -> Vec<(Box<[u8]>, DeviceRecord)> {
        let part = &self.parts[p];
        let mut found = Vec::new();
        for &hash in hashes {
            let table = part.shards()[part.determine_shard(hash as usize)].read();
            // Safety: the shard is read-locked while its buckets are read.
            unsafe {
                for bucket in table.iter_hash(hash) {
                    let (rec, _) = bucket.as_ref();
                    let k = rec.key().as_bytes();
                    if part.hash_usize(&rec.key()) as u64 != hash
                        || k <= after
                        || !filter(&Marks::of(rec))
                    {
                        continue;
                    }
                    if let Some(r) = self.decode(rec) {
                        found.push((k.into(), r));
                    }
                }
            }
        }
        found
    }

    /// The (at most) `need` smallest keys of partition `p` after `after`
    /// whose marks pass `filter`, ascending; whether more such keys follow;
    /// and how many records were examined.
    fn smallest_keys_after(
        &self,
        p: usize,
        after: &[u8],
        need: usize,
        filter: &dyn Fn(&Marks) -> bool,
    ) -> (Vec<Box<[u8]>>, bool, usize) {
        let mut heap: BinaryHeap<Box<[u8]>> = BinaryHeap::with_capacity(need + 1);
        let mut passing = 0usize;
        let mut seen = 0usize;
        for shard in self.parts[p].shards() {
            let table = shard.read();
            // Safety: the shard is read-locked while its buckets are read.
            unsafe {
                for bucket in table.iter() {
                    let (rec, _) = bucket.as_ref();
                    seen += 1;
                    let k = rec.key().as_bytes();
                    if k <= after || !filter(&Marks::of(rec)) {
                        continue;
                    }
                    passing += 1;
                    if heap.len() < need {
                        heap.push(k.into());
                    } else if heap.peek().is_some_and(|top| k < &top[..]) {
                        heap.pop();
                        heap.push(k.into());
                    }
                }
            }
        }
        let more = passing > need;
        (heap.into_sorted_vec(), more, seen)
    }

    /// Pages through the devices whose channel was issued in `from..to`,
    /// reading only the minutes of the issued-at index in that range (P8).
    pub fn issued_between(&self, from: UnixTime, to: UnixTime, batch: usize) -> IssuedPager<'_> {
        IssuedPager {
            registry: self,
            from,
            to,
            next_minute: minute(from),
            pending: Vec::new(),
            batch: batch.max(1),
        }
    }

    /// Devices with map hash `hash` issued in `from..to`, appended to `out`.
    fn resolve(&self, hash: u64, from: UnixTime, to: UnixTime, out: &mut Vec<DeviceRecord>) {
        let Some(part) = self.parts.get(((hash & PART_MASK) >> PART_SHIFT) as usize) else {
            return;
        };
        let table = part.shards()[part.determine_shard(hash as usize)].read();
        // Safety: the shard is read-locked while its buckets are read.
        unsafe {
            for bucket in table.iter_hash(hash) {
                let (rec, _) = bucket.as_ref();
                let at = rec.issued_at();
                if (from..to).contains(&at) && part.hash_usize(&rec.key()) as u64 == hash {
                    if let Some(r) = self.decode(rec) {
                        out.push(r);
                    }
                }
            }
        }
    }

    /// Entries of the issued-at index (one per device).
    pub fn issued_len(&self) -> usize {
        self.issued.len()
    }

    fn decode(&self, rec: &CompactRecord) -> Option<DeviceRecord> {
        let out = self.codec.decode(rec);
        debug_assert!(out.is_some(), "a stored record failed to decode");
        out
    }
}

/// Whether a record is in the marked index: it has a dead or a refresh mark.
fn is_marked(rec: &CompactRecord) -> bool {
    rec.dead().is_some() || rec.refresh().is_some()
}

/// The issued-at minute of a time.
fn minute(t: UnixTime) -> u32 {
    t.0 / 60
}

/// Where a listing goes on: a partition, and the last encoded id examined
/// in it (empty: from the partition's start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    part: u16,
    key: Vec<u8>,
}

impl Cursor {
    /// Where partition `part`'s listing starts.
    pub fn start_of(part: u16) -> Cursor {
        Cursor {
            part,
            key: Vec::new(),
        }
    }

    /// The partition the cursor is in.
    pub fn part(&self) -> u16 {
        self.part
    }

    /// The key the cursor stands after in its partition; empty at the
    /// partition's start.
    pub fn key_bytes(&self) -> &[u8] {
        &self.key
    }

    /// Two bytes of partition (big-endian), then the key.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + self.key.len());
        out.extend_from_slice(&self.part.to_be_bytes());
        out.extend_from_slice(&self.key);
        out
    }

    /// The cursor [`Cursor::to_bytes`] wrote; `None` for bytes it cannot
    /// have written.
    pub fn from_bytes(b: &[u8]) -> Option<Cursor> {
        let (part, key) = b.split_first_chunk::<2>()?;
        (key.len() <= key::MAX_KEY_LEN).then(|| Cursor {
            part: u16::from_be_bytes(*part),
            key: key.to_vec(),
        })
    }
}

/// One page of a listing.
#[derive(Debug, Default)]
pub struct Page {
    pub records: Vec<DeviceRecord>,
    /// Where the next page starts; `None` once the listing is complete.
    pub next: Option<Cursor>,
}

/// Devices issued in a time range, a batch at a time
/// ([`Registry::issued_between`]).
pub struct IssuedPager<'a> {
    registry: &'a Registry,
    from: UnixTime,
    to: UnixTime,
    next_minute: u32,
    pending: Vec<u64>,
    batch: usize,
}

impl IssuedPager<'_> {
    /// The next batch of devices; `None` once the range is read. A device
    /// re-registered or removed meanwhile may be missing, and one
    /// re-registered into the range may appear: the caller checks what it
    /// acts on.
    pub fn next_page(&mut self) -> Option<Vec<DeviceRecord>> {
        if self.to <= self.from {
            return None;
        }
        let last = minute(UnixTime(self.to.0 - 1));
        let mut out = Vec::new();
        while out.is_empty() {
            if self.pending.is_empty() {
                let m = self.registry.issued.next_minute(self.next_minute, last)?;
                self.registry.issued.entries(m, &mut self.pending);
                // Devices sharing a hash are found by one resolve.
                self.pending.sort_unstable();
                self.pending.dedup();
                self.next_minute = m + 1;
            }
            let take = self.pending.len().saturating_sub(self.batch);
            for h in self.pending.drain(take..) {
                self.registry.resolve(h, self.from, self.to, &mut out);
            }
        }
        Some(out)
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
