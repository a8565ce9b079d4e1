//! An append-only log of frames in segment files: what the embedded backend
//! makes durable before it answers.
//!
//! A log is a directory of files named by the log position (LSN) of their
//! first frame, `00000000000000000001.log`, each a sequence of
//! [frames](super::frame). One [`SegmentLog::append`] writes one frame and
//! syncs it: the committer appends one frame per batch, so one sync covers
//! everything queued. A segment grows to about `segment_bytes_max`, then
//! the next append starts a new one; [`SegmentLog::drop_before`] deletes
//! the segments a snapshot covers.
//!
//! Opening reads every segment in order. A torn tail of the last segment is
//! truncated (normal recovery after a crash); damage anywhere else refuses
//! to open, naming the file and the offset, unless the caller accepts the
//! loss from that point ([`Recovery::TruncateDamage`]).
//!
//! A failed write (a full disk) leaves the log as it was before it: the
//! file is cut back to its last whole frame, so the next append, once
//! there is room again, continues cleanly.
//!
//! A new segment is a file already written with zeros to its full size,
//! prepared in the background ([`SPARE`]) and renamed into place. An
//! append then overwrites blocks that are allocated and written, so its
//! sync flushes only its own data: it waits for no file-system journal
//! commit, and so for no other file's data that such a commit must write
//! first (on ext4, a snapshot being written). Appending into blocks merely
//! reserved (`fallocate`) changes their extent state at every sync, and
//! that sync then waits on the journal: with a 3 GB write beside it, its
//! worst case was 65-410 ms here against 17-18 ms into written zeros
//! (`loadtest/fsync.py DIR 4000 3000` makes the same comparison).

use super::frame::{self, Found};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// How damage found while opening is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Refuse to open.
    Refuse,
    /// Drop everything from the damaged frame on (the operator accepted
    /// the loss of that tail).
    TruncateDamage,
}

/// Why a log could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: damaged frame at byte {offset} ({why}); the log after it cannot be trusted")]
    Damaged {
        path: PathBuf,
        offset: usize,
        why: &'static str,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What opening a log found.
#[derive(Debug, Default)]
pub struct Opened {
    /// Every frame's payload, in log order, with its LSN.
    pub frames: Vec<(u64, Vec<u8>)>,
    /// Bytes dropped from the end as a torn tail.
    pub torn_bytes: u64,
}

/// The next segment, zero-filled and synced, ready to be renamed into
/// place; written under [`SPARE_PARTIAL`] and renamed once whole.
const SPARE: &str = "spare.zeroed";
const SPARE_PARTIAL: &str = "spare.partial";

/// An open log, appended to by one writer.
pub struct SegmentLog {
    dir: PathBuf,
    segment_bytes_max: u64,
    /// The segment appended to, its first LSN, and its length (bytes of
    /// whole frames).
    current: Option<(File, u64, u64)>,
    /// The LSN the next frame gets.
    next_lsn: u64,
    /// First LSNs of the segments on disk, in order.
    segments: Vec<u64>,
    /// The next append starts a new segment (after [`SegmentLog::skip_to`]).
    start_new: bool,
    /// The thread preparing the next segment's file, if one was started.
    spare: Option<std::thread::JoinHandle<()>>,
}

fn segment_name(first_lsn: u64) -> String {
    format!("{first_lsn:020}.log")
}

impl SegmentLog {
    /// Opens (creating if needed) the log in `dir` and reads it whole.
    pub fn open(
        dir: &Path,
        segment_bytes_max: u64,
        recovery: Recovery,
    ) -> Result<(SegmentLog, Opened), LogError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut segments: Vec<u64> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".log")?.parse::<u64>().ok()
            })
            .collect();
        segments.sort_unstable();
        let mut opened = Opened::default();
        let mut next_lsn = segments.first().copied().unwrap_or(1);
        let mut keep = segments.len();
        for (i, &first) in segments.iter().enumerate() {
            let path = dir.join(segment_name(first));
            let bytes = std::fs::read(&path).map_err(io(&path))?;
            let last = i + 1 == segments.len();
            let mut offset = 0;
            let mut lsn = first;
            let cut = loop {
                match frame::read_at(&bytes, offset) {
                    Ok(Found::Frame { payload, next }) => {
                        opened.frames.push((lsn, payload.to_vec()));
                        lsn += 1;
                        offset = next;
                    }
                    Ok(Found::End) => break None,
                    // A torn tail anywhere but in the last segment is
                    // damage: later segments were written after it.
                    Ok(Found::TornTail { at }) if last => break Some(at),
                    Ok(Found::TornTail { at }) | Err(frame::Damage { offset: at, .. })
                        if recovery == Recovery::TruncateDamage =>
                    {
                        keep = i + 1;
                        break Some(at);
                    }
                    Ok(Found::TornTail { at }) => {
                        return Err(LogError::Damaged {
                            path,
                            offset: at,
                            why: "a frame cut short before the last segment",
                        })
                    }
                    Err(d) => {
                        return Err(LogError::Damaged {
                            path,
                            offset: d.offset,
                            why: d.why,
                        })
                    }
                }
            };
            next_lsn = lsn;
            if let Some(at) = cut {
                // Zeros to the end are a preallocated segment's unwritten
                // part, not a torn write.
                let written = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
                opened.torn_bytes += written.saturating_sub(at) as u64;
                truncate(&path, at as u64)?;
            }
            if keep == i + 1 {
                break;
            }
        }
        // Segments after accepted damage go: they were written after it.
        for &first in &segments[keep..] {
            let path = dir.join(segment_name(first));
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
        segments.truncate(keep);
        // A spare cut short by a crash is redone; a whole one is used.
        let _ = std::fs::remove_file(dir.join(SPARE_PARTIAL));
        let log = SegmentLog {
            dir: dir.to_owned(),
            segment_bytes_max,
            current: None,
            next_lsn,
            segments,
            start_new: false,
            spare: None,
        };
        Ok((log, opened))
    }

    /// The LSN the next appended frame gets.
    pub fn next_lsn(&self) -> u64 {
        self.next_lsn
    }

    /// Appends one frame carrying `payload` and syncs it; returns its LSN.
    /// On error nothing of it remains and the log can be appended to again.
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, LogError> {
        let mut buf = Vec::with_capacity(frame::FRAME_HEADER_BYTES + payload.len());
        frame::encode(payload, &mut buf);
        self.open_segment()?;
        let (file, first, len) = self.current.as_mut().expect("a segment is open");
        // At the end of the frames, not of the file: a new segment is
        // preallocated.
        let written = file
            .write_all_at(&buf, *len)
            .and_then(|()| file.sync_data());
        if let Err(e) = written {
            // Cut back to the last whole frame, so a later append after the
            // disk has room again does not follow half a frame.
            let _ = file.set_len(*len).and_then(|()| file.sync_data());
            let path = self.dir.join(segment_name(*first));
            self.current = None;
            return Err(LogError::Io { path, source: e });
        }
        *len += buf.len() as u64;
        let lsn = self.next_lsn;
        self.next_lsn += 1;
        Ok(lsn)
    }

    /// Opens the segment to append to, unless the current one has room.
    fn open_segment(&mut self) -> Result<(), LogError> {
        let reopen = match &self.current {
            Some((_, _, len)) => *len >= self.segment_bytes_max,
            None => true,
        };
        if reopen {
            let last = self.segments.last().copied();
            let (first, len) = match (&self.current, last) {
                // Continue the last segment after a restart or a failed
                // write, unless it is full.
                (None, Some(first)) if !self.start_new => {
                    let path = self.dir.join(segment_name(first));
                    let len = std::fs::metadata(&path).map_err(io(&path))?.len();
                    if len < self.segment_bytes_max {
                        (first, len)
                    } else {
                        (self.next_lsn, 0)
                    }
                }
                _ => (self.next_lsn, 0),
            };
            let path = self.dir.join(segment_name(first));
            let fresh = len == 0 && last != Some(first);
            let spare = fresh && self.take_spare(&path);
            let file = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .open(&path)
                .map_err(io(&path))?;
            if !spare {
                preallocate(&file, self.segment_bytes_max);
            }
            if fresh {
                self.prepare_spare();
            }
            if len == 0 && last != Some(first) {
                // A new file: its directory entry must be durable too.
                sync_dir(&self.dir)?;
                self.segments.push(first);
            }
            self.current = Some((file, first, len));
            self.start_new = false;
        }
        Ok(())
    }

    /// Renames a whole spare to `path`; false when none is ready (the
    /// thread making it is still at work, or it could not be made).
    fn take_spare(&mut self, path: &Path) -> bool {
        if self.spare.as_ref().is_some_and(|t| !t.is_finished()) {
            return false;
        }
        if let Some(t) = self.spare.take() {
            let _ = t.join();
        }
        let spare = self.dir.join(SPARE);
        match std::fs::metadata(&spare) {
            Ok(m) if m.len() == self.segment_bytes_max => std::fs::rename(&spare, path).is_ok(),
            Ok(_) => {
                // Made for another segment size.
                let _ = std::fs::remove_file(&spare);
                false
            }
            Err(_) => false,
        }
    }

    /// Starts making the next spare in the background, unless one is being
    /// made or is ready. Best effort: where it fails (no room), the next
    /// segment is reserved with `fallocate` and grows as written.
    fn prepare_spare(&mut self) {
        if self.spare.is_some() || self.dir.join(SPARE).exists() {
            return;
        }
        let (dir, len) = (self.dir.clone(), self.segment_bytes_max);
        let made = std::thread::Builder::new()
            .name("wnsgate-log-spare".into())
            .spawn(move || {
                // Never the last free space: the log's own appends need it
                // more than a spare does.
                if free_bytes(&dir).is_some_and(|free| free < len.saturating_mul(4)) {
                    return;
                }
                let partial = dir.join(SPARE_PARTIAL);
                if write_zeros(&partial, len)
                    .and_then(|()| std::fs::rename(&partial, dir.join(SPARE)))
                    .is_err()
                {
                    let _ = std::fs::remove_file(&partial);
                }
            });
        self.spare = made.ok();
    }

    /// Makes `lsn` the next LSN when it is ahead (a snapshot covers LSNs the
    /// log no longer holds): the next append starts a new segment there.
    pub fn skip_to(&mut self, lsn: u64) {
        if lsn > self.next_lsn {
            self.next_lsn = lsn;
            self.current = None;
            self.start_new = true;
        }
    }

    /// Deletes every segment whose frames all come before `lsn` (a
    /// snapshot covers them). The segment being appended to stays.
    pub fn drop_before(&mut self, lsn: u64) -> Result<usize, LogError> {
        let mut dropped = 0;
        while self.segments.len() > 1 && self.segments[1] <= lsn {
            let first = self.segments.remove(0);
            let path = self.dir.join(segment_name(first));
            std::fs::remove_file(&path).map_err(io(&path))?;
            dropped += 1;
        }
        if dropped > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(dropped)
    }

    /// First LSNs of the segments on disk.
    pub fn segments(&self) -> &[u64] {
        &self.segments
    }
}

/// Allocates a new segment's blocks up front (the file reads as zeros
/// after its frames, which opening treats as the end): a sync after an
/// append then changes no block allocation, only the data, which on ext4
/// made `fdatasync` of a 300-byte append about 35% cheaper at the median
/// (`loadtest/fsync.py` measures both ways)
/// and cut its worst case from milliseconds to a fraction of one. Best
/// effort: where it fails (no room, no support) the file grows as written.
fn preallocate(file: &File, len: u64) {
    use std::os::fd::AsRawFd;
    let Ok(len) = libc::off_t::try_from(len) else {
        return;
    };
    // Safety: a plain system call on a file descriptor this function
    // borrows for its duration; no memory is shared with the kernel.
    let _ = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
}

/// Bytes free for an unprivileged writer on the file system of `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // Safety: `path` is a valid C string for the duration of the call, and
    // `st` is written in full by a successful call before it is read.
    let st = unsafe {
        if libc::statvfs(path.as_ptr(), st.as_mut_ptr()) != 0 {
            return None;
        }
        st.assume_init()
    };
    #[allow(clippy::useless_conversion)] // the field types differ between targets
    Some(u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize)))
}

/// Writes `len` zero bytes to a new file at `path` and syncs them.
fn write_zeros(path: &Path, len: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)?;
    let zeros = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    f.sync_all()
}

fn truncate(path: &Path, len: u64) -> Result<(), LogError> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io(path))?;
    f.set_len(len).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(i: u64) -> Vec<u8> {
        format!("frame {i} ")
            .repeat(1 + (i % 7) as usize)
            .into_bytes()
    }

    fn lsns(o: &Opened) -> Vec<u64> {
        o.frames.iter().map(|(l, _)| *l).collect()
    }

    #[test]
    fn frames_come_back_in_order_across_segments_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, opened) = SegmentLog::open(dir.path(), 200, Recovery::Refuse).unwrap();
        assert!(opened.frames.is_empty());
        for i in 1..=20 {
            assert_eq!(log.append(&payload(i)).unwrap(), i);
        }
        assert!(log.segments().len() > 3, "{:?}", log.segments());
        drop(log);
        let (mut log, opened) = SegmentLog::open(dir.path(), 200, Recovery::Refuse).unwrap();
        assert_eq!(lsns(&opened), (1..=20).collect::<Vec<_>>());
        for (lsn, p) in &opened.frames {
            assert_eq!(p, &payload(*lsn));
        }
        assert_eq!(log.append(b"more").unwrap(), 21);
        let (_, opened) = SegmentLog::open(dir.path(), 200, Recovery::Refuse).unwrap();
        assert_eq!(opened.frames.last().unwrap(), &(21, b"more".to_vec()));
    }

    #[test]
    fn new_segments_are_spares_written_with_zeros_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = SegmentLog::open(dir.path(), 4096, Recovery::Refuse).unwrap();
        let mut i = 0;
        let mut spares_used = 0;
        while spares_used < 3 {
            // The spare for the next segment is whole before it is needed.
            if let Some(t) = log.spare.take() {
                t.join().unwrap();
            }
            let before = log.segments().len();
            i += 1;
            assert_eq!(log.append(&payload(i)).unwrap(), i);
            if log.segments().len() > before && before > 0 {
                let newest = dir
                    .path()
                    .join(segment_name(*log.segments().last().unwrap()));
                // Renamed from the spare: full length, the frame at its start.
                assert_eq!(std::fs::metadata(&newest).unwrap().len(), 4096);
                spares_used += 1;
            }
        }
        if let Some(t) = log.spare.take() {
            t.join().unwrap();
        }
        assert!(dir.path().join(SPARE).exists());
        drop(log);
        // A crash while a spare was written leaves a partial file: opening
        // removes it; the spare does not count as a segment.
        std::fs::write(dir.path().join(SPARE_PARTIAL), b"\0\0").unwrap();
        let (mut log, opened) = SegmentLog::open(dir.path(), 4096, Recovery::Refuse).unwrap();
        assert!(!dir.path().join(SPARE_PARTIAL).exists());
        assert_eq!(lsns(&opened), (1..=i).collect::<Vec<_>>());
        assert_eq!(log.append(b"more").unwrap(), i + 1);
    }

    #[test]
    fn a_torn_tail_is_truncated_and_the_log_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = SegmentLog::open(dir.path(), 1 << 20, Recovery::Refuse).unwrap();
        for i in 1..=3 {
            log.append(&payload(i)).unwrap();
        }
        let seg = dir.path().join(segment_name(1));
        // The frames' end; the file itself is preallocated past it.
        let good: u64 = (1..=3)
            .map(|i| (frame::FRAME_HEADER_BYTES + payload(i).len()) as u64)
            .sum();
        assert!(std::fs::metadata(&seg).unwrap().len() >= good);
        drop(log);
        // What a crash leaves of a fourth write: half a frame, where the
        // frames end.
        let mut half = Vec::new();
        frame::encode(&payload(4), &mut half);
        half.truncate(half.len() / 2);
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .write_all_at(&half, good)
            .unwrap();
        let (mut log, opened) = SegmentLog::open(dir.path(), 1 << 20, Recovery::Refuse).unwrap();
        assert_eq!(lsns(&opened), vec![1, 2, 3]);
        assert_eq!(opened.torn_bytes, half.len() as u64);
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), good);
        assert_eq!(log.append(b"four").unwrap(), 4);
        let (_, opened) = SegmentLog::open(dir.path(), 1 << 20, Recovery::Refuse).unwrap();
        assert_eq!(lsns(&opened), vec![1, 2, 3, 4]);
    }

    #[test]
    fn damage_refuses_to_open_unless_the_loss_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = SegmentLog::open(dir.path(), 100, Recovery::Refuse).unwrap();
        for i in 1..=12 {
            log.append(&payload(i)).unwrap();
        }
        let segments = log.segments().to_vec();
        drop(log);
        assert!(segments.len() >= 3);
        // One byte of the second segment's first frame goes bad.
        let seg = dir.path().join(segment_name(segments[1]));
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes[frame::FRAME_HEADER_BYTES + 1] ^= 0x20;
        std::fs::write(&seg, &bytes).unwrap();
        match SegmentLog::open(dir.path(), 100, Recovery::Refuse) {
            Err(LogError::Damaged { path, offset, .. }) => {
                assert_eq!((path, offset), (seg.clone(), 0));
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("opened a damaged log"),
        }
        let (mut log, opened) =
            SegmentLog::open(dir.path(), 100, Recovery::TruncateDamage).unwrap();
        let kept: Vec<u64> = (1..segments[1]).collect();
        assert_eq!(lsns(&opened), kept);
        assert_eq!(log.segments(), &segments[..2]);
        assert_eq!(log.append(b"after").unwrap(), segments[1]);
        let (_, opened) = SegmentLog::open(dir.path(), 100, Recovery::Refuse).unwrap();
        assert_eq!(opened.frames.len(), kept.len() + 1);
    }

    #[test]
    fn segments_a_snapshot_covers_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = SegmentLog::open(dir.path(), 100, Recovery::Refuse).unwrap();
        for i in 1..=12 {
            log.append(&payload(i)).unwrap();
        }
        let before = log.segments().to_vec();
        // Everything up to the third segment's first frame is covered.
        let dropped = log.drop_before(before[2]).unwrap();
        assert_eq!(dropped, 2);
        assert_eq!(log.segments(), &before[2..]);
        // Covering everything still keeps the segment being written.
        log.drop_before(u64::MAX).unwrap();
        assert_eq!(log.segments().len(), 1);
        let (_, opened) = SegmentLog::open(dir.path(), 100, Recovery::Refuse).unwrap();
        assert_eq!(opened.frames.last().unwrap().0, 12);
    }

    /// On a full disk an append fails and leaves nothing behind; once there
    /// is room again the log goes on, and every acknowledged frame reads
    /// back. Needs root to mount a small tmpfs (CI runs as root).
    #[test]
    fn a_full_disk_fails_an_append_and_the_log_heals() {
        let Some(dir) = crate::testing::Tmpfs::mount("64k") else {
            return;
        };
        let filler = dir.path().join("filler");
        std::fs::write(&filler, vec![7u8; 24 * 1024]).unwrap();
        let logdir = dir.path().join("log");
        let (mut log, _) = SegmentLog::open(&logdir, 1 << 20, Recovery::Refuse).unwrap();
        let big = vec![0x5au8; 3000];
        assert_eq!(log.append(&big).unwrap(), 1);
        // No spare on a disk this small: it would take the log's room.
        if let Some(t) = log.spare.take() {
            t.join().unwrap();
        }
        assert!(!logdir.join(SPARE).exists() && !logdir.join(SPARE_PARTIAL).exists());
        let mut acked = 1u64;
        let failed = loop {
            match log.append(&big) {
                Ok(lsn) => acked = lsn,
                Err(e) => break e,
            }
            assert!(acked < 1000, "the tmpfs never filled up");
        };
        assert!(
            matches!(&failed, LogError::Io { source, .. } if source.raw_os_error() == Some(28)),
            "{failed}"
        );
        // Still full: it fails again, cleanly.
        assert!(log.append(&big).is_err());
        std::fs::remove_file(&filler).unwrap();
        assert_eq!(log.append(&big).unwrap(), acked + 1);
        drop(log);
        let (_, opened) = SegmentLog::open(&logdir, 1 << 20, Recovery::Refuse).unwrap();
        assert_eq!(opened.torn_bytes, 0);
        assert_eq!(lsns(&opened), (1..=acked + 1).collect::<Vec<_>>());
    }
}
