//! One partition's snapshot as an object in the JetStream object store.
//!
//! ```text
//! magic "wnsgate-psnap\0"  14 bytes
//! version                  u8 (1)
//! partitions, partition    u16 LE each
//! replay_from              u64 LE: the first log sequence to replay on top
//! dictionary               3 lists (PFNs, provider ids, URI prefixes):
//!                          leb count, then each string as leb len + bytes
//! records                  leb count, leb byte length, then the records as
//!                          the registry encodes them (leb len + bytes each)
//! jobs                     leb count, then each: u64 LE id, leb len, bytes
//! checksum                 u64 LE: XXH3-64 of everything before it
//! ```
//!
//! The records are copied into the registry as they are, as from an
//! embedded snapshot ([`crate::store::Restore::restore_partition`]); the
//! whole object is checked before any of it is used.

use crate::store::Dictionary;
use xxhash_rust::xxh3::xxh3_64;

const MAGIC: &[u8; 14] = b"wnsgate-psnap\0";
const VERSION: u8 = 1;

/// A partition's snapshot, decoded (the records stay encoded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionSnapshot<'a> {
    pub partitions: u16,
    pub partition: u16,
    /// Log messages of the partition from this stream sequence on are
    /// replayed on top of the snapshot.
    pub replay_from: u64,
    pub dictionary: Dictionary,
    pub record_count: u64,
    pub records: &'a [u8],
    /// (job id, encoded job) pairs.
    pub jobs: Vec<(u64, &'a [u8])>,
}

fn put_leb(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// The object for one partition: `records` as
/// [`crate::store::SnapshotSource::encoded_partition`] wrote them (`count`
/// of them), the dictionary they refer to, and the partition's jobs.
pub fn encode(
    partitions: u16,
    partition: u16,
    replay_from: u64,
    dictionary: &Dictionary,
    records: &[u8],
    count: u64,
    jobs: &[(u64, Vec<u8>)],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + records.len() + jobs.len() * 96);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&partitions.to_le_bytes());
    out.extend_from_slice(&partition.to_le_bytes());
    out.extend_from_slice(&replay_from.to_le_bytes());
    for list in dictionary {
        put_leb(list.len() as u64, &mut out);
        for s in list {
            put_leb(s.len() as u64, &mut out);
            out.extend_from_slice(s.as_bytes());
        }
    }
    put_leb(count, &mut out);
    put_leb(records.len() as u64, &mut out);
    out.extend_from_slice(records);
    put_leb(jobs.len() as u64, &mut out);
    for (id, bytes) in jobs {
        out.extend_from_slice(&id.to_le_bytes());
        put_leb(bytes.len() as u64, &mut out);
        out.extend_from_slice(bytes);
    }
    let sum = xxh3_64(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("the object ends early".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn leb(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = *self.take(1)?.first().expect("1 byte");
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("a length does not end".into())
    }
    fn len(&mut self) -> Result<usize, String> {
        let n = self.leb()?;
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.0.len())
            .ok_or_else(|| format!("a length of {n} runs past the object's end"))
    }
}

/// Checks and decodes an object [`encode`] wrote; the error says what does
/// not check out.
pub fn decode(bytes: &[u8]) -> Result<PartitionSnapshot<'_>, String> {
    if bytes.len() < MAGIC.len() + 1 + 4 + 8 + 8 {
        return Err(format!(
            "{} bytes are too short for a snapshot",
            bytes.len()
        ));
    }
    let (body, sum) = bytes.split_at(bytes.len() - 8);
    if xxh3_64(body).to_le_bytes() != sum {
        return Err("the checksum does not match".into());
    }
    let mut r = Reader(body);
    if r.take(MAGIC.len())? != MAGIC {
        return Err("not a wnsgate partition snapshot".into());
    }
    let version = r.take(1)?[0];
    if version != VERSION {
        return Err(format!(
            "snapshot format {version}; this build reads {VERSION}"
        ));
    }
    let partitions = r.u16()?;
    let partition = r.u16()?;
    let replay_from = r.u64()?;
    let mut dictionary: Dictionary = Default::default();
    for list in &mut dictionary {
        let n = r.leb()?;
        for _ in 0..n {
            let len = r.len()?;
            let s = std::str::from_utf8(r.take(len)?)
                .map_err(|_| "a dictionary string is not UTF-8".to_owned())?;
            list.push(s.to_owned());
        }
    }
    let record_count = r.leb()?;
    let len = r.len()?;
    let records = r.take(len)?;
    let n = r.leb()?;
    let mut jobs = Vec::with_capacity(usize::try_from(n).unwrap_or(0).min(1 << 16));
    for _ in 0..n {
        let id = r.u64()?;
        let len = r.len()?;
        jobs.push((id, r.take(len)?));
    }
    if !r.0.is_empty() {
        return Err(format!("{} bytes follow the jobs", r.0.len()));
    }
    Ok(PartitionSnapshot {
        partitions,
        partition,
        replay_from,
        dictionary,
        record_count,
        records,
        jobs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dict() -> Dictionary {
        [
            vec!["Contoso.MDM_8wekyb3d8bbwe".into()],
            vec![],
            vec!["https://db5.notify.windows.com/?token=".into(), "x".into()],
        ]
    }

    #[test]
    fn a_snapshot_reads_back_as_written() {
        let records = [3u8, 1, 2, 3, 1, 9];
        let jobs = vec![(7u64, vec![1u8, 2]), (9, vec![])];
        let bytes = encode(64, 5, 1234, &dict(), &records, 2, &jobs);
        let s = decode(&bytes).unwrap();
        assert_eq!(
            (s.partitions, s.partition, s.replay_from, s.record_count),
            (64, 5, 1234, 2)
        );
        assert_eq!(s.dictionary, dict());
        assert_eq!(s.records, &records);
        assert_eq!(s.jobs, vec![(7, &[1u8, 2][..]), (9, &[][..])]);
    }

    #[test]
    fn any_flipped_byte_or_cut_is_refused() {
        let bytes = encode(8, 1, 2, &dict(), &[1, 0], 1, &[(1, vec![4])]);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(decode(&bad).is_err(), "byte {i} flipped was accepted");
        }
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "cut at {n} was accepted");
        }
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }
    }
}
