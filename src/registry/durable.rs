//! The registry as the store sees it: what snapshots are cut from, and
//! where loading puts the durable state, both in the registry's own record
//! encoding, so a restart copies records rather than re-encoding them.

use super::record::write_leb;
use super::{minute, Bucket, Registry};
use crate::core::{DeviceId, DeviceRecord};
use crate::store::{Dictionary, Restore, SnapshotSource};
use dashmap::mapref::entry::Entry;
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
        let mut index = Vec::with_capacity(list.len());
        for bytes in list {
            let rec = self
                .codec
                .restore(bytes)
                .ok_or("a record does not check out")?;
            debug_assert_eq!(
                rec.key().decode().map(|id| self.partitioning.of(&id)),
                Some(part),
                "a record stored under another partition"
            );
            let (to, spread) = (Bucket::of(&rec), rec.key().spread());
            let hash = p.hash_usize(&rec.key()) as u64;
            let at = minute(rec.issued_at());
            let from = match p.entry(rec) {
                Entry::Occupied(e) => {
                    // Not in a well-formed snapshot (a partition lists a
                    // device once); stay exact anyway.
                    self.issued.extend(std::mem::take(&mut index));
                    self.issued
                        .shift(hash, Some(minute(e.key().issued_at())), Some(at));
                    let (old, _) = e.replace_entry(0);
                    Some(Bucket::of(&old))
                }
                Entry::Vacant(e) => {
                    e.insert(0);
                    self.len.fetch_add(1, Ordering::Relaxed);
                    index.push((at, hash));
                    None
                }
            };
            self.histogram.shift(spread, from, Some(to));
        }
        let n = count;
        self.issued.extend(index);
        Ok(n)
    }

    fn put(&self, rec: &DeviceRecord) {
        self.upsert(rec);
    }

    fn delete(&self, id: &DeviceId) {
        self.remove(id.as_str());
    }
}
