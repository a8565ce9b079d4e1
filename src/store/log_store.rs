//! The embedded backend: a log of committed batches in segment files, and
//! snapshots cut from memory in the background.
//!
//! A data directory holds:
//!
//! ```text
//! wnsgate.state      format version and partition count (one frame)
//! LOCK               held while a process has the directory open
//! log/               segment files: one frame per committed batch
//! snapshots/         the latest snapshot: <replay_from>.snap
//! ```
//!
//! - **Writes.** [`Store::apply`] encodes the batch ([`batch_codec`]) as
//!   one frame, appends it and syncs once: group commit on the store
//!   thread, one sync per batch. Nothing is read back from disk while the
//!   gateway runs; the registry is the state in memory.
//! - **Snapshots.** A background thread cuts one once the log since the
//!   last has grown past `snapshot_log_bytes` (and past a quarter of the
//!   last snapshot's size, so a big fleet is not rewritten for a small
//!   tail). The snapshot replays from the last appended batch, which the
//!   registry may not have applied yet when the cut starts; every earlier
//!   one it has. The cut reads the registry one partition at a time while
//!   writes go on (see [`snapshot`] for why that is exact). Once the
//!   snapshot is durable, the log segments and the snapshot before it are
//!   deleted.
//! - **Loading.** The snapshot's partitions are read in parallel straight
//!   into the registry, then the log from `replay_from` on is replayed.
//! - **Damage.** A torn last frame of the log is dropped (normal after a
//!   crash); any other frame that does not check out, in the log or in a
//!   snapshot, refuses to start and names the file and offset, unless
//!   [`Recovery::TruncateDamage`] accepts losing the data from there.
//! - **A full disk.** A failed append leaves the log as it was and fails
//!   the batch (503 `store_unavailable` to its callers); the store is then
//!   not [`Store::writable`] (readiness turns 503). The background thread
//!   probes every second by writing and syncing a file as large as the
//!   batch that failed (at least 256 KiB), and the store is writable again
//!   once that works, or once an append does.

use super::segments::{LogError, Recovery, SegmentLog};
use super::snapshot::{self, Snapshot};
use super::{
    apply_jobs, batch_codec, check_writable, job_codec, JobSource, Loaded, Mutation, Restore,
    SnapshotSource, Sources, Store, StoreError,
};
use crate::core::refresh::Job;
use crate::core::Partitioning;
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The state file's name.
const STATE_FILE: &str = "wnsgate.state";
/// What the state file's payload starts with.
const STATE_MAGIC: &[u8; 14] = b"wnsgate-state\0";
/// The data directory format this build writes and reads.
pub const DATA_FORMAT_VERSION: u8 = 1;

/// Default size a log segment grows to before the next starts.
pub const SEGMENT_BYTES_DEFAULT: u64 = 64 << 20;
/// Default log bytes since the last snapshot before the next is cut.
pub const SNAPSHOT_LOG_BYTES_DEFAULT: u64 = 256 << 20;
/// How fast a snapshot is written by default, so the log's syncs beside it
/// keep their pace (`store.snapshot_write_mb_per_s`). On the 2-core test
/// machine, whose disk takes an unpaced 10M-device snapshot (1.5 GB) at
/// about 450 MB/s, PUTs at 10k/s during the cut had a p99 of 1.7 s
/// unpaced, 574 ms at 128 MiB/s and 27 ms at 64 MiB/s.
pub const SNAPSHOT_BYTES_PER_SECOND_DEFAULT: u64 = 64 << 20;
/// How often an unwritable store probes whether it can write again.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// The smallest probe of free space after a failed write.
const PROBE_BYTES_MIN: u64 = 256 << 10;
/// How long after a failed cut the next is tried.
const CUT_RETRY_AFTER: Duration = Duration::from_secs(30);

const METRIC_SNAPSHOT_SECONDS: &str = "wnsgate_store_snapshot_seconds";
const METRIC_SNAPSHOT_BYTES: &str = "wnsgate_store_snapshot_bytes";
const METRIC_LOG_BYTES: &str = "wnsgate_store_log_bytes";
const METRIC_WRITABLE: &str = "wnsgate_store_writable";

/// Registers help texts and units of the backend's metrics.
pub fn describe_metrics() {
    use metrics::{describe_gauge, describe_histogram, Unit};
    describe_histogram!(
        METRIC_SNAPSHOT_SECONDS,
        Unit::Seconds,
        "Time to cut one snapshot of the durable state"
    );
    describe_gauge!(
        METRIC_SNAPSHOT_BYTES,
        Unit::Bytes,
        "Size of the latest snapshot"
    );
    describe_gauge!(
        METRIC_LOG_BYTES,
        Unit::Bytes,
        "Log bytes appended since the latest snapshot"
    );
    describe_gauge!(
        METRIC_WRITABLE,
        "1 while the store can write, 0 while writes fail (a full disk)"
    );
}

/// Settings of the embedded backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogOptions {
    /// Partitions of new data; `None` takes the data's own count, or
    /// [`Partitioning::default`] for new data. Given and different from
    /// the data's, opening is refused.
    pub partitions: Option<Partitioning>,
    /// Size a log segment grows to before the next starts.
    pub segment_bytes: u64,
    /// Log bytes since the last snapshot before the next is cut.
    pub snapshot_log_bytes: u64,
    /// The rate a snapshot is written at, bytes a second (`None`: as fast
    /// as the disk takes it).
    pub snapshot_bytes_per_second: Option<u64>,
    /// What opening does with damaged data.
    pub recovery: Recovery,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            partitions: None,
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            snapshot_log_bytes: SNAPSHOT_LOG_BYTES_DEFAULT,
            snapshot_bytes_per_second: Some(SNAPSHOT_BYTES_PER_SECOND_DEFAULT),
            recovery: Recovery::Refuse,
        }
    }
}

/// What opening read, until `load` takes it.
struct Opened {
    snapshot: Option<Snapshot>,
    /// Log frames from the snapshot's `replay_from` on.
    frames: Vec<(u64, Vec<u8>)>,
}

struct LogState {
    log: SegmentLog,
    scratch: Vec<u8>,
}

struct Inner {
    dir: PathBuf,
    partitioning: Partitioning,
    opts: LogOptions,
    log: Mutex<LogState>,
    /// The refresh jobs loaded at start (the snapshot's, with the log's
    /// changes after it), until [`Store::scan_jobs`] hands them to the
    /// refresh queue; `None` after. No copy is kept: snapshots take the
    /// jobs from the queue.
    loaded_jobs: Mutex<Option<HashMap<u64, Job>>>,
    source: OnceLock<Sources>,
    opened: Mutex<Option<Opened>>,
    /// Log bytes appended since opening, and their count at the start of
    /// the latest cut.
    log_bytes: AtomicU64,
    cut_at_bytes: AtomicU64,
    snapshot_bytes: AtomicU64,
    approximate_len: AtomicU64,
    writable: AtomicBool,
    /// Bytes of the last batch that failed to append.
    failed_batch_bytes: AtomicU64,
    /// Held while a snapshot is cut: one at a time.
    cutting: Mutex<()>,
    stop: Mutex<bool>,
    wake: Condvar,
}

/// The embedded [`Store`]: see the module docs.
pub struct LogStore {
    inner: Arc<Inner>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Held (locked) while the store is open.
    _lock: File,
}

fn io_at(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |e| StoreError::Io(format!("{}: {e}", path.display()))
}

fn log_error(e: LogError) -> StoreError {
    match e {
        LogError::Io { path, source } => StoreError::Io(format!("{}: {source}", path.display())),
        LogError::Damaged { path, offset, why } => StoreError::Damaged {
            file: path.display().to_string(),
            offset: offset as u64,
            why: why.to_owned(),
        },
    }
}

/// Log batches decoded and applied at a time while the log is replayed.
const REPLAY_WINDOW: usize = 256;

impl LogStore {
    /// Opens (or creates) the store in directory `path`, reading its
    /// snapshot's header and its log; [`Store::load`] then loads them.
    ///
    /// Fails with a message naming the path when the directory cannot be
    /// created, is not writable, is locked by another process, holds data
    /// of another format or partition count, or is damaged.
    pub fn open(path: impl AsRef<Path>, opts: LogOptions) -> Result<LogStore, StoreError> {
        let dir = path.as_ref().to_owned();
        let shown = dir.display().to_string();
        std::fs::create_dir_all(&dir)
            .map_err(|e| StoreError::Io(format!("cannot create data directory {shown}: {e}")))?;
        check_writable(&dir)?;
        let lock_path = dir.join("LOCK");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_at(&lock_path))?;
        if lock.try_lock().is_err() {
            return Err(StoreError::Io(format!(
                "data directory {shown} is locked by another process \
                 (is another wnsgate using the same store path?)"
            )));
        }
        let partitioning = read_or_create_state(&dir, opts.partitions)?;

        let snap_dir = dir.join("snapshots");
        std::fs::create_dir_all(&snap_dir).map_err(io_at(&snap_dir))?;
        let snapshot = latest_snapshot(&snap_dir)?;
        if let Some(s) = &snapshot {
            if s.partitions != partitioning.count() {
                return Err(StoreError::Damaged {
                    file: s.path().display().to_string(),
                    offset: 0,
                    why: format!(
                        "the snapshot has {} partitions, the data directory {}",
                        s.partitions,
                        partitioning.count()
                    ),
                });
            }
        }
        let replay_from = snapshot.as_ref().map_or(1, |s| s.replay_from);
        let (mut log, found) =
            SegmentLog::open(&dir.join("log"), opts.segment_bytes, opts.recovery)
                .map_err(log_error)?;
        if found.torn_bytes > 0 {
            tracing::warn!(
                bytes = found.torn_bytes,
                "dropped a torn last log frame (a write cut short by a crash; it was never acknowledged)"
            );
        }
        if let Some(&(first, _)) = found.frames.first() {
            if first > replay_from {
                return Err(StoreError::Damaged {
                    file: dir.join("log").display().to_string(),
                    offset: 0,
                    why: format!(
                        "the log starts at batch {first}, but the snapshot needs it from {replay_from}: segments are missing"
                    ),
                });
            }
        }
        log.skip_to(replay_from);
        let frames: Vec<(u64, Vec<u8>)> = found
            .frames
            .into_iter()
            .filter(|(lsn, _)| *lsn >= replay_from)
            .collect();
        let approximate = snapshot.as_ref().map_or(0, |s| s.records) + frames.len() as u64;
        let snapshot_bytes = snapshot.as_ref().map_or(0, |s| s.bytes);
        let inner = Arc::new(Inner {
            dir,
            partitioning,
            opts,
            log: Mutex::new(LogState {
                log,
                scratch: Vec::new(),
            }),
            loaded_jobs: Mutex::new(Some(HashMap::new())),
            source: OnceLock::new(),
            opened: Mutex::new(Some(Opened { snapshot, frames })),
            log_bytes: AtomicU64::new(0),
            cut_at_bytes: AtomicU64::new(0),
            snapshot_bytes: AtomicU64::new(snapshot_bytes),
            approximate_len: AtomicU64::new(approximate),
            writable: AtomicBool::new(true),
            failed_batch_bytes: AtomicU64::new(0),
            cutting: Mutex::new(()),
            stop: Mutex::new(false),
            wake: Condvar::new(),
        });
        metrics::gauge!(METRIC_WRITABLE).set(1.0);
        // Registered now, so the series is exported before the first cut.
        let _ = metrics::histogram!(METRIC_SNAPSHOT_SECONDS);
        metrics::gauge!(METRIC_SNAPSHOT_BYTES).set(snapshot_bytes as f64);
        metrics::gauge!(METRIC_LOG_BYTES).set(0.0);
        Ok(LogStore {
            inner,
            thread: Mutex::new(None),
            _lock: lock,
        })
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.inner.dir
    }

    /// Cuts a snapshot now, from the attached source; `None` when no source
    /// is attached yet.
    pub fn cut_snapshot(&self) -> Result<Option<snapshot::Written>, StoreError> {
        match self.inner.source.get() {
            Some(source) => self.inner.cut(source).map(Some),
            None => Ok(None),
        }
    }

    /// Log segments on disk (for tests and tools).
    pub fn log_segments(&self) -> usize {
        self.inner.log.lock().log.segments().len()
    }
}

impl Inner {
    /// Writes a snapshot of `source` and drops what it covers.
    fn cut(&self, source: &Sources) -> Result<snapshot::Written, StoreError> {
        let _one = self.cutting.lock();
        let started = crate::clock::instant();
        // The last appended batch may not be in the registry yet (the
        // committer applies it after `apply` returns); every earlier one is.
        let replay_from = {
            let st = self.log.lock();
            self.cut_at_bytes
                .store(self.log_bytes.load(Ordering::Relaxed), Ordering::Relaxed);
            st.log.next_lsn().saturating_sub(1).max(1)
        };
        let snap_dir = self.dir.join("snapshots");
        // The jobs come from the refresh queue, which copies them out a
        // few at a time (no lock held while the snapshot writes and paces
        // itself). A job that comes or goes meanwhile is in a batch after
        // `replay_from`, which a restart replays.
        let Some(job_source) = source.jobs.upgrade() else {
            return Err(StoreError::Io(
                "the refresh queue is gone (shutting down): no snapshot is cut".into(),
            ));
        };
        let jobs = |visit: &mut dyn FnMut(u64, &[u8])| {
            let mut encoded = Vec::with_capacity(256);
            job_source.jobs(&mut |job| {
                encoded.clear();
                job_codec::encode_into(job, &mut encoded);
                visit(job.id, &encoded);
            });
        };
        let written = snapshot::write(
            &snap_dir,
            replay_from,
            self.partitioning,
            &*source.devices,
            &jobs,
            self.opts.snapshot_bytes_per_second,
        )
        .map_err(|e| {
            let _ = std::fs::remove_file(snap_dir.join(format!("{replay_from:020}.tmp")));
            StoreError::Io(format!("cutting a snapshot in {}: {e}", snap_dir.display()))
        })?;
        self.log
            .lock()
            .log
            .drop_before(replay_from)
            .map_err(log_error)?;
        for old in snapshot_files(&snap_dir)? {
            if old < replay_from {
                let path = snap_dir.join(snapshot::file_name(old));
                std::fs::remove_file(&path).map_err(io_at(&path))?;
            }
        }
        self.snapshot_bytes.store(written.bytes, Ordering::Relaxed);
        let elapsed = started.elapsed();
        metrics::histogram!(METRIC_SNAPSHOT_SECONDS).record(elapsed.as_secs_f64());
        metrics::gauge!(METRIC_SNAPSHOT_BYTES).set(written.bytes as f64);
        tracing::info!(
            devices = written.records,
            jobs = written.jobs,
            bytes = written.bytes,
            seconds = elapsed.as_secs_f64(),
            replay_from,
            "snapshot cut"
        );
        Ok(written)
    }

    fn cut_due(&self) -> bool {
        let since = self
            .log_bytes
            .load(Ordering::Relaxed)
            .saturating_sub(self.cut_at_bytes.load(Ordering::Relaxed));
        since
            >= self
                .opts
                .snapshot_log_bytes
                .max(self.snapshot_bytes.load(Ordering::Relaxed) / 4)
    }

    /// Learns whether the disk takes writes again: writes and syncs a
    /// probe file as large as the batch that failed (at least
    /// [`PROBE_BYTES_MIN`]), then removes it. A tiny write would fit in
    /// the slack of a file's last block on a disk that is still full.
    fn probe(&self) {
        let len = self
            .failed_batch_bytes
            .load(Ordering::Relaxed)
            .max(PROBE_BYTES_MIN);
        let path = self.dir.join(".wnsgate-space-probe");
        let written = File::create(&path).and_then(|mut f| {
            std::io::Write::write_all(&mut f, &vec![0u8; len as usize])?;
            f.sync_data()
        });
        let _ = std::fs::remove_file(&path);
        if written.is_ok() {
            self.set_writable(true);
            tracing::info!("the store can write again");
        }
    }

    fn set_writable(&self, ok: bool) {
        if self.writable.swap(ok, Ordering::Relaxed) != ok {
            metrics::gauge!(METRIC_WRITABLE).set(if ok { 1.0 } else { 0.0 });
        }
    }

    /// The background thread: probes while unwritable, cuts snapshots when
    /// due.
    fn run(&self) {
        let mut next_cut = crate::clock::instant();
        loop {
            {
                let mut stop = self.stop.lock();
                if !*stop {
                    self.wake.wait_for(&mut stop, PROBE_EVERY);
                }
                if *stop {
                    return;
                }
            }
            if !self.writable.load(Ordering::Relaxed) {
                self.probe();
                continue;
            }
            let Some(source) = self.source.get() else {
                continue;
            };
            if self.cut_due() && crate::clock::instant() >= next_cut {
                if let Err(e) = self.cut(source) {
                    tracing::error!(error = %e, "snapshot cut failed; the log is kept and the cut is tried again later");
                    next_cut = crate::clock::instant() + CUT_RETRY_AFTER;
                }
            }
        }
    }
}

impl Store for LogStore {
    fn apply(&self, batch: &[Mutation]) -> Result<(), StoreError> {
        if batch.is_empty() {
            // Every append is synced: nothing waits for a sync.
            return Ok(());
        }
        let inner = &*self.inner;
        let appended = {
            let mut st = inner.log.lock();
            let st = &mut *st;
            st.scratch.clear();
            batch_codec::encode_into(batch, &mut st.scratch);
            let len = st.scratch.len();
            let r = st.log.append(&st.scratch).map(|_| len).inspect_err(|_| {
                inner
                    .failed_batch_bytes
                    .store(len as u64, Ordering::Relaxed);
            });
            if st.scratch.capacity() > 16 << 20 {
                st.scratch = Vec::new();
            }
            r
        };
        let len = match appended {
            Ok(len) => len,
            Err(e) => {
                inner.set_writable(false);
                return Err(log_error(e));
            }
        };
        inner.set_writable(true);
        // Until the refresh queue has taken the loaded jobs, they follow
        // the log (a write between loading and taking them).
        if batch.iter().any(is_job_mutation) {
            if let Some(jobs) = inner.loaded_jobs.lock().as_mut() {
                apply_jobs(jobs, batch);
            }
        }
        let total = inner.log_bytes.fetch_add(len as u64, Ordering::Relaxed) + len as u64;
        metrics::gauge!(METRIC_LOG_BYTES)
            .set(total.saturating_sub(inner.cut_at_bytes.load(Ordering::Relaxed)) as f64);
        if inner.cut_due() {
            inner.wake.notify_one();
        }
        Ok(())
    }

    fn load(&self, threads: usize, into: &dyn Restore) -> Result<Loaded, StoreError> {
        let Some(opened) = self.inner.opened.lock().take() else {
            return Err(StoreError::Io("the store was loaded already".into()));
        };
        let mut loaded = Loaded::default();
        let t = crate::clock::instant();
        if let Some(snap) = &opened.snapshot {
            loaded.snapshot_records = self.load_snapshot(snap, threads, into)?;
        }
        into.snapshot_restored();
        loaded.snapshot_seconds = t.elapsed().as_secs_f64();
        let t = crate::clock::instant();
        // The log in windows of batches: each window decoded on all
        // threads, then its device mutations applied on all threads, a
        // partition's always on the same thread and in log order. Jobs are
        // applied in order here. A window bounds what is held decoded.
        let threads = threads.max(1);
        let partitioning = self.inner.partitioning;
        for window in opened.frames.chunks(REPLAY_WINDOW) {
            let decoded = std::thread::scope(|s| {
                let parts: Vec<_> = window
                    .chunks(window.len().div_ceil(threads))
                    .map(|frames| {
                        s.spawn(move || {
                            frames
                                .iter()
                                .map(|(lsn, payload)| {
                                    batch_codec::decode(payload).map_err(|e| (*lsn, e))
                                })
                                .collect::<Result<Vec<_>, _>>()
                        })
                    })
                    .collect();
                let mut all = Vec::with_capacity(window.len());
                for p in parts {
                    all.extend(p.join().expect("a replay thread panicked")?);
                }
                Ok(all)
            })
            .map_err(|(lsn, e): (u64, _)| StoreError::Damaged {
                file: self.inner.dir.join("log").display().to_string(),
                offset: 0,
                why: format!("batch {lsn} does not decode: {e}"),
            })?;
            {
                let mut jobs = self.inner.loaded_jobs.lock();
                let jobs = jobs.get_or_insert_with(HashMap::new);
                for batch in &decoded {
                    loaded.replayed_batches += 1;
                    loaded.replayed_mutations += batch.len() as u64;
                    apply_jobs(jobs, batch);
                }
            }
            std::thread::scope(|s| {
                for t in 0..threads {
                    let decoded = &decoded;
                    s.spawn(move || {
                        let mine = |id: &crate::core::DeviceId| {
                            usize::from(partitioning.of(id.as_str())) % threads == t
                        };
                        for m in decoded.iter().flatten() {
                            match m {
                                Mutation::Put(rec) if mine(&rec.device_id) => into.put(rec),
                                Mutation::Delete(id) if mine(id) => into.delete(id),
                                _ => {}
                            }
                        }
                    });
                }
            });
        }
        loaded.replay_seconds = t.elapsed().as_secs_f64();
        // The tail replayed counts toward the next cut.
        let tail: u64 = opened.frames.iter().map(|(_, p)| p.len() as u64).sum();
        self.inner.log_bytes.store(tail, Ordering::Relaxed);
        Ok(loaded)
    }

    fn approximate_len(&self) -> usize {
        self.inner.approximate_len.load(Ordering::Relaxed) as usize
    }

    fn partitioning(&self) -> Option<Partitioning> {
        Some(self.inner.partitioning)
    }

    fn attach(&self, devices: Arc<dyn SnapshotSource>, jobs: Arc<dyn JobSource>) {
        let jobs = Arc::downgrade(&jobs);
        if self.inner.source.set(Sources { devices, jobs }).is_err() {
            return;
        }
        let inner = self.inner.clone();
        *self.thread.lock() =
            super::spawn_background("wnsgate-snapshot", "no snapshot will be cut", move || {
                inner.run()
            });
    }

    fn writable(&self) -> bool {
        self.inner.writable.load(Ordering::Relaxed)
    }

    fn snapshot_now(&self) -> Result<Option<snapshot::Written>, StoreError> {
        self.cut_snapshot()
    }

    fn scan_jobs(&self, visit: &mut dyn FnMut(Job)) -> Result<u64, StoreError> {
        Ok(super::hand_over_jobs(&self.inner.loaded_jobs, visit))
    }
}

impl LogStore {
    /// Loads `snap` into `into`: the dictionary, then the partitions on
    /// `threads` threads, then the jobs.
    fn load_snapshot(
        &self,
        snap: &Snapshot,
        threads: usize,
        into: &dyn Restore,
    ) -> Result<u64, StoreError> {
        let dictionary = snap.dictionary()?;
        into.seed(&dictionary).map_err(|why| StoreError::Damaged {
            file: snap.path().display().to_string(),
            offset: 0,
            why,
        })?;
        let next = std::sync::atomic::AtomicU32::new(0);
        let total = AtomicU64::new(0);
        let failure: Mutex<Option<StoreError>> = Mutex::new(None);
        let truncate = self.inner.opts.recovery == Recovery::TruncateDamage;
        let worker = || loop {
            let p = next.fetch_add(1, Ordering::Relaxed);
            if p >= u32::from(snap.partitions) || failure.lock().is_some() {
                return;
            }
            let part = p as u16;
            let r = snap.partition(part, &mut |records, count| {
                let n = into.restore_partition(part, records, count)?;
                total.fetch_add(n, Ordering::Relaxed);
                Ok(())
            });
            match r {
                Ok(()) => {}
                Err(e @ StoreError::Damaged { .. }) if truncate => {
                    tracing::error!(error = %e, partition = part, "accepted the loss of the rest of this partition's snapshot");
                }
                Err(e) => {
                    failure.lock().get_or_insert(e);
                    return;
                }
            }
        };
        std::thread::scope(|s| {
            for i in 1..threads.max(1) {
                let spawned = std::thread::Builder::new()
                    .name(format!("wnsgate-load-{i}"))
                    .spawn_scoped(s, worker);
                if spawned.is_err() {
                    break;
                }
            }
            worker();
        });
        if let Some(e) = failure.into_inner() {
            return Err(e);
        }
        let mut jobs = self.inner.loaded_jobs.lock();
        let jobs = jobs.get_or_insert_with(HashMap::new);
        jobs.reserve(usize::try_from(snap.jobs).unwrap_or(0));
        snap.jobs(&mut |id, value| {
            jobs.insert(id, job_codec::decode(&id.to_be_bytes(), value)?);
            Ok(())
        })?;
        Ok(total.into_inner())
    }
}

fn is_job_mutation(m: &Mutation) -> bool {
    matches!(m, Mutation::PutJob(_) | Mutation::DeleteJob(_))
}

impl Drop for LogStore {
    fn drop(&mut self) {
        *self.inner.stop.lock() = true;
        self.inner.wake.notify_all();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

/// The `replay_from` of every snapshot file in `dir`, ascending; removes
/// leftover `.tmp` files of cuts that did not finish.
fn snapshot_files(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io_at(dir))? {
        let e = e.map_err(io_at(dir))?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = snapshot::parse_name(&name) {
            found.push(n);
        } else if name.ends_with(".tmp") {
            let _ = std::fs::remove_file(e.path());
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// The newest snapshot in `dir`, opened; `None` when there is none.
fn latest_snapshot(dir: &Path) -> Result<Option<Snapshot>, StoreError> {
    match snapshot_files(dir)?.last() {
        Some(&n) => Snapshot::open(&dir.join(snapshot::file_name(n))).map(Some),
        None => Ok(None),
    }
}

/// Reads the data directory's state file, or writes one for new data.
fn read_or_create_state(
    dir: &Path,
    wanted: Option<Partitioning>,
) -> Result<Partitioning, StoreError> {
    let path = dir.join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let damaged = |why: &str| StoreError::Damaged {
                file: path.display().to_string(),
                offset: 0,
                why: why.to_owned(),
            };
            let payload = match super::frame::read_at(&bytes, 0) {
                Ok(super::frame::Found::Frame { payload, .. }) => payload,
                _ => return Err(damaged("the state file does not check out")),
            };
            let rest = payload
                .strip_prefix(STATE_MAGIC.as_slice())
                .ok_or_else(|| damaged("not a wnsgate state file"))?;
            let [version, p0, p1, ..] = *rest else {
                return Err(damaged("the state file is cut short"));
            };
            if version != DATA_FORMAT_VERSION {
                return Err(damaged(&format!(
                    "data format version {version}; this build reads {DATA_FORMAT_VERSION}"
                )));
            }
            let stored = Partitioning::new(u32::from(u16::from_le_bytes([p0, p1])))
                .map_err(|e| damaged(&e.to_string()))?;
            if let Some(w) = wanted {
                if w != stored {
                    return Err(StoreError::Io(format!(
                        "the data in {} has {} partitions, but store.partitions is {}; \
                         the partition count is fixed when the data is created",
                        dir.display(),
                        stored.count(),
                        w.count()
                    )));
                }
            }
            Ok(stored)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let p = wanted.unwrap_or_default();
            let mut payload = STATE_MAGIC.to_vec();
            payload.push(DATA_FORMAT_VERSION);
            payload.extend_from_slice(&p.count().to_le_bytes());
            let mut bytes = Vec::new();
            super::frame::encode(&payload, &mut bytes);
            let tmp = dir.join(format!("{STATE_FILE}.tmp"));
            std::fs::write(&tmp, &bytes).map_err(io_at(&tmp))?;
            File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(io_at(&tmp))?;
            std::fs::rename(&tmp, &path).map_err(io_at(&path))?;
            File::open(dir)
                .and_then(|f| f.sync_all())
                .map_err(io_at(dir))?;
            Ok(p)
        }
        Err(e) => Err(io_at(&path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::refresh::JobState;
    use crate::core::{
        ChannelUri, DeadMark, DeadReason, DeviceId, DeviceRecord, LeaveReason, Pfn, UnixTime,
    };
    use crate::registry::Registry;
    use std::collections::BTreeMap;

    fn rec(i: u32, issued: u32) -> DeviceRecord {
        DeviceRecord {
            device_id: DeviceId::parse(&format!("dev-{i:05}")).unwrap(),
            pfn: Pfn::parse(if i.is_multiple_of(3) {
                "Contoso.MDM_8wekyb3d8bbwe"
            } else {
                "Fabrikam.MDM_8wekyb3d8bbwe"
            })
            .unwrap(),
            channel_uri: ChannelUri::from_trusted(format!(
                "https://db5.notify.windows.com/?token=AwYAAAD{i}x{issued}"
            ))
            .unwrap(),
            provider_id: None,
            issued_at: UnixTime(issued),
            dead: i.is_multiple_of(7).then_some(DeadMark {
                reason: DeadReason::Wns410,
                at: UnixTime(issued + 5),
            }),
            refresh: None,
        }
    }

    fn job(id: u64) -> Job {
        Job {
            id,
            device_id: DeviceId::parse(&format!("dev-{id:05}")).unwrap(),
            pfn: Pfn::parse("Contoso.MDM_8wekyb3d8bbwe").unwrap(),
            provider_id: None,
            reason: LeaveReason::Age,
            expired_at: UnixTime(10),
            created_at: UnixTime(11),
            state: JobState::Queued,
            attempts: 0,
            next_at: UnixTime(12),
        }
    }

    /// What the store holds, as a model: devices by id, job ids. `held`
    /// plays the refresh queue: the jobs in memory that snapshots take.
    #[derive(Default, Debug)]
    struct Model {
        devices: BTreeMap<String, DeviceRecord>,
        jobs: Vec<u64>,
        held: Arc<Held>,
    }

    impl PartialEq for Model {
        fn eq(&self, other: &Model) -> bool {
            self.devices == other.devices && self.jobs == other.jobs
        }
    }

    /// Open jobs in memory, as the refresh queue holds them.
    #[derive(Default, Debug)]
    struct Held(Mutex<BTreeMap<u64, Job>>);

    impl JobSource for Held {
        fn jobs(&self, visit: &mut dyn FnMut(&Job)) {
            let jobs: Vec<Job> = self.0.lock().values().cloned().collect();
            for j in &jobs {
                visit(j);
            }
        }
    }

    impl Model {
        fn apply(&mut self, batch: &[Mutation]) {
            {
                let mut held = self.held.0.lock();
                for m in batch {
                    match m {
                        Mutation::PutJob(j) => {
                            held.insert(j.id, j.clone());
                        }
                        Mutation::DeleteJob(id) => {
                            held.remove(id);
                        }
                        _ => {}
                    }
                }
            }
            for m in batch {
                match m {
                    Mutation::Put(r) => {
                        self.devices
                            .insert(r.device_id.as_str().to_owned(), r.clone());
                    }
                    Mutation::Delete(id) => {
                        self.devices.remove(id.as_str());
                    }
                    Mutation::PutJob(j) => {
                        if !self.jobs.contains(&j.id) {
                            self.jobs.push(j.id);
                            self.jobs.sort_unstable();
                        }
                    }
                    Mutation::DeleteJob(id) => self.jobs.retain(|j| j != id),
                    Mutation::Guard { .. } => {}
                }
            }
        }
    }

    /// Opens `dir`, loads it into a new registry, and says what it holds.
    fn reopen(dir: &Path, opts: LogOptions) -> (LogStore, Arc<Registry>, Model, Loaded) {
        let store = LogStore::open(dir, opts).unwrap();
        let registry = Arc::new(Registry::with_partitions(
            store.partitioning().unwrap(),
            store.approximate_len(),
        ));
        let loaded = store.load(2, &*registry).unwrap();
        let mut model = Model::default();
        registry.for_each(|r| {
            model
                .devices
                .insert(r.device_id.as_str().to_owned(), r.clone());
        });
        store
            .scan_jobs(&mut |j| {
                model.jobs.push(j.id);
                model.held.0.lock().insert(j.id, j);
            })
            .unwrap();
        model.jobs.sort_unstable();
        (store, registry, model, loaded)
    }

    fn small() -> LogOptions {
        LogOptions {
            partitions: Some(Partitioning::new(16).unwrap()),
            segment_bytes: 4096,
            ..LogOptions::default()
        }
    }

    /// Applies `batch` as the committer does: durable, then in memory.
    fn commit(store: &LogStore, registry: &Registry, model: &mut Model, batch: &[Mutation]) {
        store.apply(batch).unwrap();
        crate::server::apply_to_registry(registry, batch);
        model.apply(batch);
    }

    fn workload(round: u32) -> Vec<Vec<Mutation>> {
        (0..20)
            .map(|b| {
                let mut batch = Vec::new();
                for i in 0..25 {
                    let n = (b * 25 + i + round * 131) % 400;
                    match (n + round) % 9 {
                        0 => batch.push(Mutation::Delete(rec(n, 1).device_id)),
                        1 => batch.push(Mutation::PutJob(job(u64::from(n)))),
                        2 => batch.push(Mutation::DeleteJob(u64::from(n.saturating_sub(9)))),
                        _ => batch.push(Mutation::Put(rec(n, 1_000 + round * 100 + b))),
                    }
                }
                batch
            })
            .collect()
    }

    #[test]
    fn acknowledged_batches_come_back_from_the_log_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut model = Model::default();
        {
            let (store, registry, empty, _) = reopen(dir.path(), small());
            assert_eq!(empty, Model::default());
            for batch in workload(0) {
                commit(&store, &registry, &mut model, &batch);
            }
            assert!(store.log_segments() > 1, "segments rotate");
        }
        let (store, _, back, loaded) = reopen(dir.path(), small());
        assert_eq!(back, model);
        assert_eq!(loaded.snapshot_records, 0);
        assert_eq!(loaded.replayed_batches, 20);
        drop(store);
        // The partition count was recorded with the data.
        let err = LogStore::open(
            dir.path(),
            LogOptions {
                partitions: Some(Partitioning::new(8).unwrap()),
                ..small()
            },
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("has 16 partitions"), "{err}");
    }

    #[test]
    fn a_snapshot_and_the_tail_after_it_load_exactly_and_the_log_behind_it_goes() {
        let dir = tempfile::tempdir().unwrap();
        let mut model = Model::default();
        {
            let (store, registry, _, _) = reopen(dir.path(), small());
            store.attach(registry.clone(), model.held.clone());
            for batch in workload(1) {
                commit(&store, &registry, &mut model, &batch);
            }
            let before = store.log_segments();
            let written = store.cut_snapshot().unwrap().unwrap();
            assert_eq!(written.records, model.devices.len() as u64);
            assert_eq!(written.jobs, model.jobs.len() as u64);
            assert!(
                store.log_segments() < before,
                "covered segments are dropped"
            );
            for batch in workload(2) {
                commit(&store, &registry, &mut model, &batch);
            }
        }
        let (store, registry, back, loaded) = reopen(dir.path(), small());
        assert_eq!(back, model);
        assert!(loaded.snapshot_records > 0);
        // The last batch before the cut is replayed again, and the 20
        // after it.
        assert_eq!(loaded.replayed_batches, 21);
        // A second cut on the loaded state, then a reopen from it alone.
        store.attach(registry.clone(), back.held.clone());
        store.cut_snapshot().unwrap().unwrap();
        drop(store);
        let snaps = std::fs::read_dir(dir.path().join("snapshots"))
            .unwrap()
            .count();
        assert_eq!(snaps, 1, "the older snapshot is deleted");
        let (_s, _, again, loaded) = reopen(dir.path(), small());
        assert_eq!(again, model);
        assert_eq!(loaded.replayed_batches, 1);
    }

    #[test]
    fn a_torn_last_frame_is_dropped_and_damage_elsewhere_refuses_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut model = Model::default();
        {
            let (store, registry, _, _) = reopen(dir.path(), small());
            store.attach(registry.clone(), model.held.clone());
            for batch in workload(3) {
                commit(&store, &registry, &mut model, &batch);
            }
            store.cut_snapshot().unwrap().unwrap();
            for batch in workload(4).iter().take(3) {
                commit(&store, &registry, &mut model, batch);
            }
        }
        // A crash cut the last write short: half a frame at the end.
        let log = dir.path().join("log");
        let mut segs: Vec<_> = std::fs::read_dir(&log)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        segs.sort();
        let last = segs.last().unwrap();
        let mut f = std::fs::OpenOptions::new().append(true).open(last).unwrap();
        std::io::Write::write_all(&mut f, &[9, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let (store, _, back, _) = reopen(dir.path(), small());
        assert_eq!(back, model);
        drop(store);

        // A flipped byte inside the snapshot's records is damage.
        let snap = std::fs::read_dir(dir.path().join("snapshots"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut bytes = std::fs::read(&snap).unwrap();
        let at = 200;
        bytes[at] ^= 0x40;
        std::fs::write(&snap, &bytes).unwrap();
        let store = LogStore::open(dir.path(), small()).unwrap();
        let registry = Registry::with_partitions(Partitioning::new(16).unwrap(), 0);
        let err = store.load(1, &registry).unwrap_err().to_string();
        assert!(
            err.contains(&snap.display().to_string()) && err.contains("damaged at byte"),
            "{err}"
        );
        drop(store);
        // Accepting the damage loads the rest, and the log replays on top.
        let (_s, _, rest, _) = reopen(
            dir.path(),
            LogOptions {
                recovery: Recovery::TruncateDamage,
                ..small()
            },
        );
        assert!(!rest.devices.is_empty() && rest.devices.len() <= model.devices.len());
        assert!(rest
            .devices
            .values()
            .all(|r| model.devices.get(r.device_id.as_str()) == Some(r)));
    }

    #[test]
    fn a_second_process_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = LogStore::open(dir.path(), small()).unwrap();
        let err = LogStore::open(dir.path(), small())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("locked by another process"), "{err}");
    }

    /// A full disk fails writes and readiness, and both come back on their
    /// own once there is room. Needs root to mount a small tmpfs (CI runs
    /// as root).
    #[test]
    fn a_full_disk_is_survived() {
        let Some(dir) = crate::testing::Tmpfs::mount("2m") else {
            return;
        };
        let data = dir.path().join("data");
        let mut model = Model::default();
        let (store, registry, _, _) = reopen(&data, small());
        store.attach(registry.clone(), model.held.clone());
        let filler = dir.path().join("filler");
        std::fs::write(&filler, vec![7u8; 1800 * 1024]).unwrap();
        let mut n = 0;
        let failed = loop {
            let batch = vec![Mutation::Put(rec(n, 5_000 + n))];
            match store.apply(&batch) {
                Ok(()) => {
                    crate::server::apply_to_registry(&registry, &batch);
                    model.apply(&batch);
                }
                Err(e) => break e,
            }
            n += 1;
            assert!(n < 100_000, "the tmpfs never filled up");
        };
        assert!(failed.to_string().contains("No space left"), "{failed}");
        assert!(!store.writable());
        std::fs::remove_file(&filler).unwrap();
        // The background probe finds room again, with no write from us.
        let mut waited = 0;
        while !store.writable() {
            std::thread::sleep(Duration::from_millis(50));
            waited += 1;
            assert!(waited < 200, "the store never became writable again");
        }
        let batch = vec![Mutation::Put(rec(n, 9_999))];
        commit(&store, &registry, &mut model, &batch);
        drop(store);
        let (_s, _, back, _) = reopen(&data, small());
        assert_eq!(back, model);
    }
}
