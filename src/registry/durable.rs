//! The registry as the store sees it: what snapshots are cut from, and
//! where loading puts the durable state, both in the registry's own record
//! encoding, so a restart copies records rather than re-encoding them.

use super::record::write_leb;
use super::{is_marked, minute, Bucket, Registry, PART_SHARDS};
use crate::core::{DeviceId, DeviceRecord};
use crate::store::{Dictionary, Restore, SnapshotSource};
use dashmap::SharedValue;
use std::sync::atomic::Ordering;

impl SnapshotSource for Registry {
    /// Copies the partition's records shard by shard, each under its read
    /// lock (a memory copy), so that writing them out never holds a lock.
    fn encoded_partition(&self, part: u16, out: &mut Vec<u8>) -> u64 {
        let Some(p) = self.parts.get(usize::from(part)) else {
            return 0;
        };
        let mut n = 0;
        for shard in p.shards() {
            let table = shard.read();
            // Safety: the shard is read-locked while its buckets are read.
            unsafe {
                for bucket in table.iter() {
                    let (rec, _) = bucket.as_ref();
                    let b = rec.as_bytes();
                    write_leb(out, b.len());
                    out.extend_from_slice(b);
                    n += 1;
                }
            }
        }
        n
    }

    fn dictionary(&self) -> Dictionary {
        self.codec.dictionary()
    }
}

impl Restore for Registry {
    fn seed(&self, dictionary: &Dictionary) -> Result<(), String> {
        self.codec.seed(dictionary)
    }

    fn restore_partition(&self, part: u16, records: &[u8], count: u64) -> Result<u64, String> {
        let p = self
            .parts
            .get(usize::from(part))
            .ok_or_else(|| format!("partition {part} is beyond this registry's"))?;
        let list = crate::store::snapshot::split_records(records, count)
            .ok_or("the record lengths do not add up")?;
        // Nothing else touches the registry while it loads: each shard of
        // the partition is locked once, sized for its share at once (no
        // table doubles while it loads), and records go in with the hash
        // already computed.
        let mut shards: Vec<_> = p.shards().iter().map(|s| s.write()).collect();
        let per_shard = list.len() / PART_SHARDS + list.len() / 16 + 1;
        for t in &mut shards {
            t.reserve(per_shard, |(k, _)| p.hash_usize(k) as u64);
        }
        // The issued-at index is built once every partition is in (see
        // `snapshot_restored`); the counts are added once per partition.
        let mut index = Vec::with_capacity(list.len());
        let mut counted = Vec::with_capacity(list.len());
        let mut added = 0;
        for bytes in list {
            let r = self
                .codec
                .restore(bytes)
                .ok_or("a record does not check out")?;
            let key = r.rec.key();
            debug_assert_eq!(
                key.decode().map(|id| self.partitioning.of(&id)),
                Some(part),
                "a record stored under another partition"
            );
            let (to, spread) = (
                Bucket::from_marks(r.issued_at, r.dead, r.refresh),
                key.spread(),
            );
            let hash = p.hash_usize(&key) as u64;
            let at = minute(r.issued_at);
            let table = &mut shards[p.determine_shard(hash as usize)];
            match table.find(hash, |(k, _)| k.key() == key) {
                Some(slot) => {
                    // Not in a well-formed snapshot (a partition lists a
                    // device once); stay exact anyway.
                    // Safety: the slot was just found in this table, which
                    // is write-locked.
                    let (rec, push) = unsafe { slot.as_mut() };
                    self.marked
                        .shift(usize::from(part), hash, is_marked(rec), is_marked(&r.rec));
                    let old = std::mem::replace(rec, r.rec);
                    *push = SharedValue::new(0);
                    self.histogram
                        .shift(spread, Some(Bucket::of(&old)), Some(to));
                    let mut loading = self.loading.lock();
                    loading.removed.push((minute(old.issued_at()), hash));
                    loading.added.push(vec![(at, hash)]);
                }
                None => {
                    self.marked
                        .shift(usize::from(part), hash, false, is_marked(&r.rec));
                    table.insert(hash, (r.rec, SharedValue::new(0)), |(k, _)| {
                        p.hash_usize(k) as u64
                    });
                    added += 1;
                    index.push((at, hash));
                    counted.push((spread, to));
                }
            }
        }
        drop(shards);
        self.len.fetch_add(added, Ordering::Relaxed);
        self.histogram.add_many(counted);
        self.loading.lock().added.push(index);
        Ok(count)
    }

    fn snapshot_restored(&self) {
        let loading = std::mem::take(&mut *self.loading.lock());
        self.issued.extend(loading.added);
        for (minute, hash) in loading.removed {
            self.issued.shift(hash, Some(minute), None);
        }
    }

    fn put(&self, rec: &DeviceRecord) {
        self.upsert(rec);
    }

    fn delete(&self, id: &DeviceId) {
        self.remove(id.as_str());
    }
}
