//! Snapshots of the embedded backend: every partition's records in the
//! registry's own encoding, the dictionary they refer to, and the refresh
//! jobs, as of a log position.
//!
//! A snapshot is one file, `<replay_from, 20 digits>.snap`, a sequence of
//! [frames](super::frame) whose payloads start with a kind byte
//! (integers little-endian, `leb` unsigned LEB128):
//!
//! ```text
//! 1 header      u8 version (= 1), u16 partitions, u64 replay_from
//! 2 records     u16 partition, leb count, count x (leb len, compact record)
//! 3 dictionary  3 x (leb n, n x (leb len, UTF-8)): PFNs, provider ids,
//!               channel URI prefixes, in dictionary id order
//! 4 jobs        leb count, count x (u64 job id, leb len, job value)
//! 5 end         u64 records, u64 jobs, u64 dictionary offset,
//!               u64 jobs offset, (partitions + 1) x u64 partition offsets
//! ```
//!
//! The header comes first and the end frame last; between them each
//! partition's record frames in partition order (a partition with no
//! device has none), then the dictionary, then the job frames. The end
//! frame's offsets let a loader read the dictionary first and then the
//! partitions in parallel, and its size follows from the partition count.
//!
//! Loading copies records as they are (the registry checks their
//! structure): that is what makes a restart close to reading the file.
//!
//! A snapshot is cut from memory while writes go on, so it may hold some
//! effects of batches after `replay_from`; every mutation replays to the
//! same result applied twice (a put overwrites, a delete removes), so
//! loading the snapshot and then replaying the log from `replay_from` on is
//! exact. It is written to a `.tmp` file, synced, and only then renamed:
//! a `.snap` file is always whole, so any frame that does not check out in
//! one is damage, never a torn tail.

use super::codec::put_leb;
use super::frame::{self, Found, FRAME_HEADER_BYTES};
use super::{Dictionary, SnapshotSource, StoreError};
use crate::core::Partitioning;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The format this build writes and reads.
pub const SNAPSHOT_VERSION: u8 = 1;

const KIND_HEADER: u8 = 1;
const KIND_RECORDS: u8 = 2;
const KIND_DICTIONARY: u8 = 3;
const KIND_JOBS: u8 = 4;
const KIND_END: u8 = 5;

/// Payload bytes a records or jobs frame is filled to.
const FRAME_FILL_BYTES: usize = 1 << 20;
/// Bytes after which a snapshot's written data is sent to the disk while
/// it is cut, so the cut never piles up gigabytes of dirty pages in front
/// of the log's syncs. Each such range is started with `sync_file_range`
/// (data only: no journal commit for the log's syncs to queue behind), and
/// the range before it is waited for, so at most two are in flight.
const SYNC_EVERY_BYTES: u64 = 8 << 20;

/// The file name of the snapshot that replays the log from `replay_from`.
pub fn file_name(replay_from: u64) -> String {
    format!("{replay_from:020}.snap")
}

/// The `replay_from` of a snapshot file name; `None` for other names.
pub fn parse_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".snap")?;
    (digits.len() == 20).then(|| digits.parse().ok()).flatten()
}

/// Calls its argument with every refresh job: id and stored value.
pub type JobsVisit<'a> = &'a dyn Fn(&mut dyn FnMut(u64, &[u8]));
/// Visits one job (id and stored value) of a snapshot being read.
pub type JobVisitor<'a> = &'a mut dyn FnMut(u64, &[u8]) -> Result<(), StoreError>;

/// Visits one records frame of a partition: its records and their count.
pub type RecordsVisitor<'a> = &'a mut dyn FnMut(&[u8], u64) -> Result<(), String>;

/// What a cut wrote (`path`: the file, or empty for a backend that
/// writes no file).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written {
    pub path: PathBuf,
    pub bytes: u64,
    pub records: u64,
    pub jobs: u64,
}

/// Counts bytes as they go to the file, and sends them to the disk every
/// [`SYNC_EVERY_BYTES`].
struct Out {
    w: BufWriter<File>,
    written: u64,
    synced: u64,
    frame: Vec<u8>,
    /// The rate to keep, and when writing started.
    pace: Option<(u64, std::time::Instant)>,
}

impl Out {
    fn frame(&mut self, payload: &[u8]) -> std::io::Result<()> {
        self.frame.clear();
        frame::encode(payload, &mut self.frame);
        self.w.write_all(&self.frame)?;
        self.written += self.frame.len() as u64;
        if self.written - self.synced >= SYNC_EVERY_BYTES {
            self.w.flush()?;
            write_behind(self.w.get_ref(), self.synced, self.written - self.synced)?;
            self.synced = self.written;
            if let Some((rate, started)) = self.pace {
                let due = std::time::Duration::from_secs_f64(self.written as f64 / rate as f64);
                if let Some(ahead) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(ahead);
                }
            }
        }
        Ok(())
    }
}

/// Starts writing `len` bytes at `from` to the disk, after waiting for the
/// range of the same length before it. Not a durability point: the
/// snapshot is synced whole before it counts.
fn write_behind(file: &File, from: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let (Ok(from), Ok(len)) = (libc::off64_t::try_from(from), libc::off64_t::try_from(len)) else {
        return Ok(());
    };
    // Safety: plain system calls on a descriptor borrowed for their
    // duration; no memory is shared with the kernel.
    unsafe {
        if from >= len {
            let wait = libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER;
            if libc::sync_file_range(fd, from - len, len, wait) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        if libc::sync_file_range(fd, from, len, libc::SYNC_FILE_RANGE_WRITE) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Writes a snapshot of `source` and `jobs` into `dir`, replaying from
/// `replay_from`, and makes it durable. `jobs` calls its argument with
/// every job (id and value).
pub fn write(
    dir: &Path,
    replay_from: u64,
    partitions: Partitioning,
    source: &dyn SnapshotSource,
    jobs: JobsVisit<'_>,
    bytes_per_second: Option<u64>,
) -> std::io::Result<Written> {
    let tmp = dir.join(format!("{replay_from:020}.tmp"));
    let path = dir.join(file_name(replay_from));
    let mut out = Out {
        w: BufWriter::with_capacity(1 << 20, File::create(&tmp)?),
        written: 0,
        synced: 0,
        frame: Vec::with_capacity(FRAME_FILL_BYTES + 64),
        pace: bytes_per_second.map(|r| (r.max(1), crate::clock::instant())),
    };
    let mut payload = Vec::with_capacity(FRAME_FILL_BYTES + 64);
    payload.push(KIND_HEADER);
    payload.push(SNAPSHOT_VERSION);
    payload.extend_from_slice(&partitions.count().to_le_bytes());
    payload.extend_from_slice(&replay_from.to_le_bytes());
    out.frame(&payload)?;

    let mut offsets = Vec::with_capacity(usize::from(partitions.count()) + 1);
    let mut records = 0u64;
    let mut encoded = Vec::new();
    for part in 0..partitions.count() {
        offsets.push(out.written);
        encoded.clear();
        source.encoded_partition(part, &mut encoded);
        // Split the partition's records into frames of about
        // FRAME_FILL_BYTES, at record boundaries.
        let mut rest = encoded.as_slice();
        while !rest.is_empty() {
            let mut taken = 0;
            let mut count = 0u64;
            while taken < rest.len() && (taken < FRAME_FILL_BYTES || count == 0) {
                let (len, n) = read_leb(&rest[taken..]).ok_or_else(|| {
                    std::io::Error::other("the registry gave a malformed record list")
                })?;
                taken += n + len as usize;
                count += 1;
            }
            payload.clear();
            payload.push(KIND_RECORDS);
            payload.extend_from_slice(&part.to_le_bytes());
            put_leb(&mut payload, count);
            payload.extend_from_slice(&rest[..taken]);
            out.frame(&payload)?;
            records += count;
            rest = &rest[taken..];
        }
    }
    offsets.push(out.written);
    drop(encoded);

    // After the records: a record refers only to strings interned before
    // it was encoded, and interners only grow.
    let dictionary_offset = out.written;
    payload.clear();
    payload.push(KIND_DICTIONARY);
    for strings in source.dictionary() {
        put_leb(&mut payload, strings.len() as u64);
        for s in strings {
            put_leb(&mut payload, s.len() as u64);
            payload.extend_from_slice(s.as_bytes());
        }
    }
    out.frame(&payload)?;

    let jobs_offset = out.written;
    let mut job_count = 0u64;
    let mut body = Vec::new();
    let mut in_frame = 0u64;
    let mut failed = None;
    jobs(&mut |id, value| {
        if failed.is_some() {
            return;
        }
        body.extend_from_slice(&id.to_le_bytes());
        put_leb(&mut body, value.len() as u64);
        body.extend_from_slice(value);
        in_frame += 1;
        job_count += 1;
        if body.len() >= FRAME_FILL_BYTES {
            if let Err(e) = write_jobs(&mut out, &mut payload, &mut body, &mut in_frame) {
                failed = Some(e);
            }
        }
    });
    if let Some(e) = failed {
        return Err(e);
    }
    write_jobs(&mut out, &mut payload, &mut body, &mut in_frame)?;

    payload.clear();
    payload.push(KIND_END);
    for v in [records, job_count, dictionary_offset, jobs_offset] {
        payload.extend_from_slice(&v.to_le_bytes());
    }
    for o in &offsets {
        payload.extend_from_slice(&o.to_le_bytes());
    }
    out.frame(&payload)?;
    out.w.flush()?;
    let file = out.w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, &path)?;
    File::open(dir)?.sync_all()?;
    Ok(Written {
        path,
        bytes: out.written,
        records,
        jobs: job_count,
    })
}

fn write_jobs(
    out: &mut Out,
    payload: &mut Vec<u8>,
    body: &mut Vec<u8>,
    count: &mut u64,
) -> std::io::Result<()> {
    if *count == 0 {
        return Ok(());
    }
    payload.clear();
    payload.push(KIND_JOBS);
    put_leb(payload, *count);
    payload.extend_from_slice(body);
    out.frame(payload)?;
    body.clear();
    *count = 0;
    Ok(())
}

/// Reads a LEB128 number at the start of `b`: its value and length.
fn read_leb(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f).checked_shl(7 * i as u32)?;
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// Reads through a frame's payload; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        (n <= self.0.len()).then(|| {
            let (head, tail) = self.0.split_at(n);
            self.0 = tail;
            head
        })
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn leb(&mut self) -> Option<u64> {
        let (v, n) = read_leb(self.0)?;
        self.0 = &self.0[n..];
        Some(v)
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.leb()?).ok()?;
        self.take(n)
    }
}

/// An open snapshot file: its header and end frame have been read and
/// check out.
#[derive(Debug)]
pub struct Snapshot {
    path: PathBuf,
    file: File,
    pub replay_from: u64,
    pub partitions: u16,
    pub records: u64,
    pub jobs: u64,
    pub bytes: u64,
    dictionary_offset: u64,
    jobs_offset: u64,
    /// Where each partition's frames start, and (last) where they end.
    offsets: Vec<u64>,
}

impl Snapshot {
    /// Opens the snapshot at `path`.
    pub fn open(path: &Path) -> Result<Snapshot, StoreError> {
        let file =
            File::open(path).map_err(|e| StoreError::Io(format!("{}: {e}", path.display())))?;
        let len = file
            .metadata()
            .map_err(|e| StoreError::Io(format!("{}: {e}", path.display())))?
            .len();
        let mut s = Snapshot {
            path: path.to_owned(),
            file,
            replay_from: 0,
            partitions: 0,
            records: 0,
            jobs: 0,
            bytes: len,
            dictionary_offset: 0,
            jobs_offset: 0,
            offsets: Vec::new(),
        };
        let header_len = (FRAME_HEADER_BYTES + 12) as u64;
        let header = s.frame_at(0, header_len)?;
        let mut r = Reader(&header);
        let (kind, version) = (r.take(1), r.take(1));
        if kind != Some(&[KIND_HEADER][..]) {
            return Err(s.damaged(0, "no snapshot header"));
        }
        if version != Some(&[SNAPSHOT_VERSION][..]) {
            return Err(s.damaged(
                1,
                &format!(
                    "snapshot format version {:?}; this build reads {SNAPSHOT_VERSION}",
                    version.map(|v| v[0])
                ),
            ));
        }
        s.partitions = r.u16().ok_or_else(|| s.damaged(0, "short header"))?;
        s.replay_from = r.u64().ok_or_else(|| s.damaged(0, "short header"))?;
        let end_len = (FRAME_HEADER_BYTES + 1 + 32 + 8 * (usize::from(s.partitions) + 1)) as u64;
        let end_at = len
            .checked_sub(end_len)
            .filter(|&at| at >= header_len)
            .ok_or_else(|| s.damaged(len, "no end frame: the file is cut short"))?;
        let end = s.frame_at(end_at, end_len)?;
        let mut r = Reader(&end);
        if r.take(1) != Some(&[KIND_END][..]) {
            return Err(s.damaged(end_at, "no end frame"));
        }
        let short = |s: &Snapshot| s.damaged(end_at, "short end frame");
        s.records = r.u64().ok_or_else(|| short(&s))?;
        s.jobs = r.u64().ok_or_else(|| short(&s))?;
        s.dictionary_offset = r.u64().ok_or_else(|| short(&s))?;
        s.jobs_offset = r.u64().ok_or_else(|| short(&s))?;
        for _ in 0..=s.partitions {
            let o = r.u64().ok_or_else(|| short(&s))?;
            s.offsets.push(o);
        }
        let ordered = std::iter::once(header_len)
            .chain(s.offsets.iter().copied())
            .chain([s.dictionary_offset, s.jobs_offset, end_at])
            .collect::<Vec<_>>();
        if ordered.windows(2).any(|w| w[0] > w[1]) || s.offsets.last() != Some(&s.dictionary_offset)
        {
            return Err(s.damaged(end_at, "the end frame's offsets are out of order"));
        }
        Ok(s)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn damaged(&self, offset: u64, why: &str) -> StoreError {
        StoreError::Damaged {
            file: self.path.display().to_string(),
            offset,
            why: why.to_owned(),
        }
    }

    /// Reads `[from, to)` of the file.
    fn read_range(&self, from: u64, to: u64) -> Result<Vec<u8>, StoreError> {
        let mut buf = vec![0; (to - from) as usize];
        self.file
            .read_exact_at(&mut buf, from)
            .map_err(|e| StoreError::Io(format!("{}: {e}", self.path.display())))?;
        Ok(buf)
    }

    /// The payload of the one frame of `len` bytes at `at`.
    fn frame_at(&self, at: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        let bytes = self.read_range(at, at + len)?;
        match frame::read_at(&bytes, 0) {
            Ok(Found::Frame { payload, next }) if next == bytes.len() => Ok(payload.to_vec()),
            _ => Err(self.damaged(at, "a frame does not check out")),
        }
    }

    /// Calls `visit` with the payload of every frame in `[from, to)`.
    fn frames(&self, from: u64, to: u64, visit: JobVisitor<'_>) -> Result<(), StoreError> {
        let bytes = self.read_range(from, to)?;
        let mut offset = 0;
        while offset < bytes.len() {
            match frame::read_at(&bytes, offset) {
                Ok(Found::Frame { payload, next }) => {
                    visit(from + offset as u64, payload)?;
                    offset = next;
                }
                _ => return Err(self.damaged(from + offset as u64, "a frame does not check out")),
            }
        }
        Ok(())
    }

    /// The dictionary the records refer to.
    pub fn dictionary(&self) -> Result<Dictionary, StoreError> {
        let mut dict: Option<Dictionary> = None;
        self.frames(
            self.dictionary_offset,
            self.jobs_offset,
            &mut |at, payload| {
                let bad = || self.damaged(at, "malformed dictionary");
                let mut r = Reader(payload);
                if r.take(1) != Some(&[KIND_DICTIONARY][..]) || dict.is_some() {
                    return Err(bad());
                }
                let mut d: Dictionary = Default::default();
                for list in &mut d {
                    let n = r.leb().ok_or_else(bad)?;
                    for _ in 0..n {
                        let s =
                            std::str::from_utf8(r.bytes().ok_or_else(bad)?).map_err(|_| bad())?;
                        list.push(s.to_owned());
                    }
                }
                dict = Some(d);
                Ok(())
            },
        )?;
        dict.ok_or_else(|| self.damaged(self.dictionary_offset, "no dictionary"))
    }

    /// Calls `visit` with the records of partition `part`: frames of
    /// LEB128-length-prefixed compact records, and their count.
    pub fn partition(&self, part: u16, visit: RecordsVisitor<'_>) -> Result<(), StoreError> {
        let i = usize::from(part);
        let (Some(&from), Some(&to)) = (self.offsets.get(i), self.offsets.get(i + 1)) else {
            return Ok(());
        };
        self.frames(from, to, &mut |at, payload| {
            let bad = |why: &str| self.damaged(at, why);
            let mut r = Reader(payload);
            if r.take(1) != Some(&[KIND_RECORDS][..]) || r.u16() != Some(part) {
                return Err(bad("a records frame of another partition"));
            }
            let count = r.leb().ok_or_else(|| bad("malformed records frame"))?;
            visit(r.0, count).map_err(|why| bad(&why))
        })
    }

    /// Calls `visit` with every job's id and value.
    pub fn jobs(&self, visit: JobVisitor<'_>) -> Result<(), StoreError> {
        let end_at = self.bytes
            - (FRAME_HEADER_BYTES + 1 + 32 + 8 * (usize::from(self.partitions) + 1)) as u64;
        self.frames(self.jobs_offset, end_at, &mut |at, payload| {
            let bad = || self.damaged(at, "malformed jobs frame");
            let mut r = Reader(payload);
            if r.take(1) != Some(&[KIND_JOBS][..]) {
                return Err(bad());
            }
            let n = r.leb().ok_or_else(bad)?;
            for _ in 0..n {
                let id = r.u64().ok_or_else(bad)?;
                let value = r.bytes().ok_or_else(bad)?;
                visit(id, value)?;
            }
            Ok(())
        })
    }
}

/// The records of one records-frame payload (after its count): each
/// LEB128 length, then the record. `None` when the lengths do not add up.
pub fn split_records(mut b: &[u8], count: u64) -> Option<Vec<&[u8]>> {
    let mut out = Vec::with_capacity(usize::try_from(count).ok()?.min(1 << 20));
    for _ in 0..count {
        let (len, n) = read_leb(b)?;
        let len = usize::try_from(len).ok()?;
        let rec = b.get(n..n + len)?;
        out.push(rec);
        b = &b[n + len..];
    }
    b.is_empty().then_some(out)
}
