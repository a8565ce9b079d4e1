//! The embedded store: fjall keyspaces for device records and refresh jobs.
//!
//! - `devices`: keys are device ids and values the [`codec`]
//!   encoding, so fjall's key order is device-id order and `page` is a range
//!   scan.
//! - `jobs`: keys are refresh job ids (u64 big-endian), values the
//!   [`job_codec`] encoding.
//!
//! Memory: fjall's footprint is bounded by [`FjallOptions`] and does not grow
//! with the number of devices except for the block indexes it keeps pinned:
//! - the block cache (`cache_bytes`, default 64 MiB);
//! - the write buffer: one active memtable of up to `memtable_bytes` (default
//!   16 MiB) plus at most 4 sealed ones waiting for flush (fjall stalls
//!   writers beyond that), so at most 5 x 16 = 80 MiB, normally 16-32 MiB;
//! - pinned index blocks of the first two levels and filters of level 0 (no
//!   bloom filters are built at all: the store never does point reads);
//! - up to 900 cached file descriptors.
//!
//! Keyspace settings (`memtable_bytes`, `data_block_bytes`) are fixed when the
//! store is created; later opens use the stored values. `cache_bytes`,
//! `max_journal_bytes` and `worker_threads` apply on every open.

use super::{check_writable, codec, job_codec, Loaded, Mutation, Restore, Store, StoreError};
use crate::core::refresh::Job;
use crate::core::DeviceRecord;
use fjall::config::{BlockSizePolicy, FilterPolicy};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable, Snapshot};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Name of the keyspace holding device records.
const DEVICES_KEYSPACE: &str = "devices";
/// Name of the keyspace holding refresh jobs.
const JOBS_KEYSPACE: &str = "jobs";

/// Default block cache size: 64 MiB.
pub const DEFAULT_CACHE_BYTES: u64 = 64 << 20;
/// Default memtable size: 16 MiB (fjall's default is 64 MiB).
pub const DEFAULT_MEMTABLE_BYTES: u64 = 16 << 20;
/// Default bound on journal files on disk: 64 MiB, fjall's minimum. It also
/// bounds how much journal a restart replays.
pub const DEFAULT_MAX_JOURNAL_BYTES: u64 = 64 << 20;
/// Default data block size: 16 KiB. The store is read by scans, never by
/// point lookups, and larger blocks scan faster and compress better.
pub const DEFAULT_DATA_BLOCK_BYTES: u32 = 16 << 10;

/// Ranges per scan thread in [`FjallStore::scan_all_parallel`]: threads take
/// ranges from a shared queue, so more, smaller ranges balance skewed key
/// distributions (for example hex ids, which use 16 of the 94 possible
/// first bytes).
const RANGES_PER_THREAD: usize = 64;

/// Tuning of the embedded store. See the module docs for the memory bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FjallOptions {
    /// Block cache capacity in bytes.
    pub cache_bytes: u64,
    /// Size at which a memtable is sealed and flushed (creation only).
    pub memtable_bytes: u64,
    /// Journal bytes on disk before fjall forces memtables to flush
    /// (at least 64 MiB; smaller values are raised to it).
    pub max_journal_bytes: u64,
    /// Background flush and compaction threads; `None` keeps fjall's
    /// default of min(cores, 4).
    pub worker_threads: Option<usize>,
    /// Uncompressed data block size in bytes (creation only; 1 KiB to 1 MiB).
    pub data_block_bytes: u32,
}

impl Default for FjallOptions {
    fn default() -> Self {
        FjallOptions {
            cache_bytes: DEFAULT_CACHE_BYTES,
            memtable_bytes: DEFAULT_MEMTABLE_BYTES,
            max_journal_bytes: DEFAULT_MAX_JOURNAL_BYTES,
            worker_threads: None,
            data_block_bytes: DEFAULT_DATA_BLOCK_BYTES,
        }
    }
}

/// The fjall-backed [`Store`].
pub struct FjallStore {
    db: Database,
    devices: Keyspace,
    jobs: Keyspace,
    path: PathBuf,
}

impl FjallStore {
    /// Opens (or creates) the store in directory `path`.
    ///
    /// Fails with a message naming the path when the directory cannot be
    /// created, is not writable, or is locked by another process.
    pub fn open(path: impl AsRef<Path>, opts: FjallOptions) -> Result<FjallStore, StoreError> {
        let path = path.as_ref();
        let shown = path.display();
        std::fs::create_dir_all(path)
            .map_err(|e| StoreError::Io(format!("cannot create data directory {shown}: {e}")))?;
        check_writable(path)?;

        let mut builder = Database::builder(path)
            .cache_size(opts.cache_bytes)
            .max_journaling_size(opts.max_journal_bytes.max(DEFAULT_MAX_JOURNAL_BYTES));
        if let Some(n) = opts.worker_threads {
            builder = builder.worker_threads(n.max(1));
        }
        let db = builder.open().map_err(|e| match e {
            fjall::Error::Locked => StoreError::Io(format!(
                "data directory {shown} is locked by another process \
                 (is another wnsgate using the same store path?)"
            )),
            e => StoreError::Io(format!("cannot open store in {shown}: {e}")),
        })?;

        let block = opts.data_block_bytes.clamp(1 << 10, 1 << 20);
        let devices = db
            .keyspace(DEVICES_KEYSPACE, || {
                KeyspaceCreateOptions::default()
                    .max_memtable_size(opts.memtable_bytes.max(1 << 20))
                    .data_block_size_policy(BlockSizePolicy::all(block))
                    .filter_policy(FilterPolicy::disabled())
            })
            .map_err(|e| StoreError::Io(format!("cannot open keyspace in {shown}: {e}")))?;
        let small = || {
            KeyspaceCreateOptions::default()
                .max_memtable_size((opts.memtable_bytes / 4).max(1 << 20))
                .filter_policy(FilterPolicy::disabled())
        };
        let jobs = db
            .keyspace(JOBS_KEYSPACE, small)
            .map_err(|e| StoreError::Io(format!("cannot open keyspace in {shown}: {e}")))?;

        let store = FjallStore {
            db,
            devices,
            jobs,
            path: path.to_owned(),
        };
        Ok(store)
    }

    /// Visits every stored record, in id order. Returns the count.
    pub fn scan_all(&self, visit: &mut dyn FnMut(DeviceRecord)) -> Result<u64, StoreError> {
        let snapshot = self.db.snapshot();
        scan_range(
            &snapshot,
            &self.devices,
            Bound::Unbounded,
            Bound::Unbounded,
            visit,
            None,
        )
    }

    /// Visits every stored record using up to `threads` threads, calling
    /// `visit` concurrently from them, in any order. Returns the count.
    pub fn scan_all_parallel(
        &self,
        threads: usize,
        visit: &(dyn Fn(DeviceRecord) + Sync),
    ) -> Result<u64, StoreError> {
        self.scan_parallel(threads, visit)
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Memtable flushes queued plus compactions running in fjall's
    /// background threads (zero when the store is idle).
    pub fn background_jobs(&self) -> usize {
        self.db.outstanding_flushes() + self.db.active_compactions()
    }

    /// Bytes on disk (tables and journals).
    pub fn disk_space(&self) -> Result<u64, StoreError> {
        self.db.disk_space().map_err(io("disk space"))
    }

    /// [`FjallStore::scan_all_parallel`]: the calling thread and
    /// `threads - 1` scoped threads read one snapshot. The key space between the first and last id is cut into
    /// `threads x 64` ranges by interpolating the ids' bytes, and threads
    /// take ranges from a shared queue until none is left, so a skewed id
    /// distribution still keeps every thread busy. On the first error every
    /// thread stops and that error is returned.
    fn scan_parallel(
        &self,
        threads: usize,
        visit: &(dyn Fn(DeviceRecord) + Sync),
    ) -> Result<u64, StoreError> {
        let snapshot = self.db.snapshot();
        let threads = threads.max(1);
        if threads == 1 {
            return scan_range(
                &snapshot,
                &self.devices,
                Bound::Unbounded,
                Bound::Unbounded,
                &mut |r| visit(r),
                None,
            );
        }
        let (Some(first), Some(last)) = (
            snapshot.first_key_value(&self.devices),
            snapshot.last_key_value(&self.devices),
        ) else {
            return Ok(0);
        };
        let first = first.key().map_err(io("scan"))?;
        let last = last.key().map_err(io("scan"))?;
        let splits = split_points(&first, &last, threads * RANGES_PER_THREAD);

        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let failure: Mutex<Option<StoreError>> = Mutex::new(None);
        let total = AtomicUsize::new(0);
        // Takes ranges from the shared queue until none is left.
        let worker = || loop {
            let r = next.fetch_add(1, Ordering::Relaxed);
            if r > splits.len() || stop.load(Ordering::Relaxed) {
                return;
            }
            let lo = match r {
                0 => Bound::Unbounded,
                _ => Bound::Included(splits[r - 1].as_slice()),
            };
            let hi = match splits.get(r) {
                Some(s) => Bound::Excluded(s.as_slice()),
                None => Bound::Unbounded,
            };
            match scan_range(
                &snapshot,
                &self.devices,
                lo,
                hi,
                &mut |r| visit(r),
                Some(&stop),
            ) {
                Ok(n) => {
                    total.fetch_add(n as usize, Ordering::Relaxed);
                }
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    failure
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(e);
                    return;
                }
            }
        };
        std::thread::scope(|s| {
            // The calling thread is one of the `threads`; if a thread cannot
            // be spawned the scan goes on with those that were.
            for i in 1..threads {
                let spawned = std::thread::Builder::new()
                    .name(format!("wnsgate-scan-{i}"))
                    .spawn_scoped(s, worker);
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "store scan runs with {i} threads");
                    break;
                }
            }
            worker();
        });
        match failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(total.into_inner() as u64),
        }
    }
}

impl Store for FjallStore {
    fn apply(&self, batch: &[Mutation]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return self.db.persist(PersistMode::SyncAll).map_err(io("sync"));
        }
        // The batch is written to the journal, synced, and only then made
        // visible to readers, all under fjall's journal lock.
        let mut wb = fjall::OwnedWriteBatch::with_capacity(self.db.clone(), batch.len())
            .durability(Some(PersistMode::SyncAll));
        let mut scratch = Vec::with_capacity(512);
        for m in batch {
            match m {
                Mutation::Put(rec) => {
                    scratch.clear();
                    codec::encode_value_into(rec, &mut scratch);
                    wb.insert(
                        &self.devices,
                        codec::key(&rec.device_id),
                        scratch.as_slice(),
                    );
                }
                Mutation::Delete(id) => wb.remove(&self.devices, codec::key(id)),
                Mutation::Guard { .. } => {}
                Mutation::PutJob(job) => {
                    scratch.clear();
                    job_codec::encode_into(job, &mut scratch);
                    wb.insert(&self.jobs, job.id.to_be_bytes(), scratch.as_slice());
                }
                Mutation::DeleteJob(id) => wb.remove(&self.jobs, id.to_be_bytes()),
            }
        }
        wb.commit().map_err(io("write batch"))
    }

    fn load(&self, threads: usize, into: &dyn Restore) -> Result<Loaded, StoreError> {
        let n = self.scan_parallel(threads, &|rec| into.put(&rec))?;
        Ok(Loaded {
            snapshot_records: n,
            ..Loaded::default()
        })
    }

    /// Record count, approximate after deletes (O(1)).
    fn approximate_len(&self) -> usize {
        self.devices.approximate_len()
    }

    fn scan_jobs(&self, visit: &mut dyn FnMut(Job)) -> Result<u64, StoreError> {
        let mut n = 0;
        for guard in self.jobs.iter() {
            let (k, v) = guard.into_inner().map_err(io("job scan"))?;
            visit(job_codec::decode(&k, &v)?);
            n += 1;
        }
        Ok(n)
    }
}

/// Scans `[lo, hi)` of `devices` in `snapshot`, decoding and visiting every
/// record; checks `stop` every 1024 records.
fn scan_range(
    snapshot: &Snapshot,
    devices: &Keyspace,
    lo: Bound<&[u8]>,
    hi: Bound<&[u8]>,
    visit: &mut dyn FnMut(DeviceRecord),
    stop: Option<&AtomicBool>,
) -> Result<u64, StoreError> {
    let mut n = 0u64;
    for guard in snapshot.range::<&[u8], _>(devices, (lo, hi)) {
        let (k, v) = guard.into_inner().map_err(io("scan"))?;
        visit(codec::decode(&k, &v)?);
        n += 1;
        if n.is_multiple_of(1024) && stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            break;
        }
    }
    Ok(n)
}

/// `parts - 1` ascending, distinct keys that cut `[first, last]` into about
/// equal parts of the key space, interpolating the three bytes after the
/// common prefix of `first` and `last`.
fn split_points(first: &[u8], last: &[u8], parts: usize) -> Vec<Vec<u8>> {
    const WIDTH: usize = 3;
    if first >= last {
        return Vec::new();
    }
    let common = first.iter().zip(last).take_while(|(a, b)| a == b).count();
    let window = |key: &[u8], pad: u8| -> u64 {
        (0..WIDTH).fold(0u64, |acc, i| {
            (acc << 8) | u64::from(*key.get(common + i).unwrap_or(&pad))
        })
    };
    let (a, b) = (window(first, 0), window(last, 0xff));
    let mut out: Vec<Vec<u8>> = Vec::with_capacity(parts);
    if b <= a + 1 {
        return out;
    }
    for i in 1..parts as u64 {
        let x = a + (b - a) * i / parts as u64;
        let mut key = first[..common].to_vec();
        key.extend_from_slice(&x.to_be_bytes()[8 - WIDTH..]);
        if out.last().is_none_or(|prev| *prev < key) && key.as_slice() > first {
            out.push(key);
        }
    }
    out
}

fn io(what: &'static str) -> impl Fn(fjall::Error) -> StoreError {
    move |e| StoreError::Io(format!("store {what} failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{ChannelUri, DeadMark, DeadReason, DeviceId, Pfn, ProviderId, UnixTime};

    fn rec(id: &str, issued: u32) -> DeviceRecord {
        DeviceRecord {
            device_id: DeviceId::parse(id).unwrap(),
            pfn: Pfn::parse("Contoso.MDM_8wekyb3d8bbwe").unwrap(),
            channel_uri: ChannelUri::from_trusted(format!(
                "https://db5.notify.windows.com/?token=AwYAAAD{id}"
            ))
            .unwrap(),
            provider_id: issued
                .is_multiple_of(2)
                .then(|| ProviderId::parse("Contoso").unwrap()),
            issued_at: UnixTime(issued),
            dead: issued.is_multiple_of(3).then_some(DeadMark {
                reason: DeadReason::Wns404,
                at: UnixTime(issued + 1),
            }),
            refresh: issued
                .is_multiple_of(5)
                .then_some(crate::core::RefreshMark {
                    state: crate::core::RefreshState::Pending,
                    since: UnixTime(issued + 2),
                    job: u64::from(issued),
                }),
        }
    }

    fn put(r: &DeviceRecord) -> Mutation {
        Mutation::Put(r.clone())
    }

    fn open(dir: &Path) -> FjallStore {
        FjallStore::open(dir, FjallOptions::default()).unwrap()
    }

    fn all(store: &FjallStore) -> Vec<DeviceRecord> {
        let mut v = Vec::new();
        let n = store.scan_all(&mut |r| v.push(r)).unwrap();
        assert_eq!(n as usize, v.len());
        v
    }

    #[test]
    fn applied_batches_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let recs: Vec<_> = (0..100)
            .map(|i| rec(&format!("dev-{i:03}"), 1000 + i))
            .collect();
        {
            let s = open(dir.path());
            s.apply(&recs[..50].iter().map(put).collect::<Vec<_>>())
                .unwrap();
            s.apply(&recs[50..].iter().map(put).collect::<Vec<_>>())
                .unwrap();
            s.apply(&[]).unwrap();
        }
        let s = open(dir.path());
        assert_eq!(all(&s), recs);
        assert_eq!(s.approximate_len(), 100);
    }

    #[test]
    fn later_mutations_in_a_batch_win_and_deletes_stick() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path());
            let a1 = rec("a", 10);
            let a2 = rec("a", 11);
            s.apply(&[put(&a1), put(&rec("b", 10)), put(&rec("c", 10))])
                .unwrap();
            s.apply(&[
                Mutation::Delete(DeviceId::parse("b").unwrap()),
                put(&a2),
                Mutation::Delete(DeviceId::parse("c").unwrap()),
                put(&rec("c", 12)),
                Mutation::Delete(DeviceId::parse("missing").unwrap()),
            ])
            .unwrap();
            assert_eq!(all(&s), vec![a2.clone(), rec("c", 12)]);
        }
        let s = open(dir.path());
        assert_eq!(all(&s), vec![rec("a", 11), rec("c", 12)]);
        s.apply(&[Mutation::Delete(DeviceId::parse("a").unwrap())])
            .unwrap();
        drop(s);
        assert_eq!(all(&open(dir.path())), vec![rec("c", 12)]);
    }

    #[test]
    fn parallel_scan_visits_every_record_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        // Hex ids (a skewed byte range) plus a few outliers at both ends.
        let mut recs: Vec<_> = (0..3000u32)
            .map(|i| rec(&format!("{:08x}-3b1d", i.wrapping_mul(2_654_435_761)), i))
            .collect();
        recs.push(rec("!first", 1));
        recs.push(rec("~~~last", 2));
        recs.push(rec("{6F1C2A9E}", 3));
        s.apply(&recs.iter().map(put).collect::<Vec<_>>()).unwrap();
        recs.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        for threads in [1, 2, 3, 8] {
            let seen = Mutex::new(Vec::new());
            let n = s
                .scan_all_parallel(threads, &|r| seen.lock().unwrap().push(r))
                .unwrap();
            let mut seen = seen.into_inner().unwrap();
            seen.sort_by(|a, b| a.device_id.cmp(&b.device_id));
            assert_eq!(n as usize, recs.len());
            assert_eq!(seen, recs, "threads={threads}");
        }
        // One record, and none.
        let dir2 = tempfile::tempdir().unwrap();
        let s2 = open(dir2.path());
        assert_eq!(s2.scan_all_parallel(4, &|_| panic!("empty")).unwrap(), 0);
        s2.apply(&[put(&rec("only", 1))]).unwrap();
        assert_eq!(s2.scan_all_parallel(4, &|_| ()).unwrap(), 1);
    }

    #[test]
    fn split_points_ascend_inside_the_range() {
        let first = b"0000".as_slice();
        let last = b"ffff".as_slice();
        let s = split_points(first, last, 16);
        assert_eq!(s.len(), 15);
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert!(s
            .iter()
            .all(|k| k.as_slice() > first && k.as_slice() <= last));
        // Common prefix is kept.
        let s = split_points(b"dev-00001", b"dev-99999", 4);
        assert!(s.iter().all(|k| k.starts_with(b"dev-")));
        assert_eq!(s.len(), 3);
        // Equal keys cannot be split; splits always ascend past `first`.
        assert!(split_points(b"abc", b"abc", 4).is_empty());
        let s = split_points(b"a", b"a\x00", 4);
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert!(s.iter().all(|k| k.as_slice() > b"a".as_slice()));
    }

    #[test]
    fn corrupt_values_fail_scans_with_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.apply(&[put(&rec("good", 1))]).unwrap();
        s.devices.insert("bad", [9u8, 9, 9]).unwrap();
        match s.scan_all(&mut |_| ()).unwrap_err() {
            StoreError::Corrupt { key, .. } => assert_eq!(key, "bad"),
            e => panic!("{e}"),
        }
        assert!(s.scan_all_parallel(2, &|_| ()).is_err());
    }

    #[test]
    fn open_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        // A directory below a regular file cannot be created.
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"x").unwrap();
        let bad = file.join("data");
        let err = FjallStore::open(&bad, FjallOptions::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("cannot create data directory"), "{err}");
        assert!(err.contains(&bad.display().to_string()), "{err}");

        // A second open of the same directory is refused while the first lives.
        let path = dir.path().join("db");
        let first = open(&path);
        let err = FjallStore::open(&path, FjallOptions::default())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("locked by another process"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
        drop(first);
        open(&path);
    }

    #[cfg(unix)]
    #[test]
    fn unwritable_directory_is_reported() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro");
        std::fs::create_dir(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o555)).unwrap();
        if std::fs::write(path.join("x"), b"").is_ok() {
            // Running as root: permissions are not enforced; nothing to test.
            return;
        }
        let err = FjallStore::open(&path, FjallOptions::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("not writable") && err.contains(&path.display().to_string()),
            "{err}"
        );
    }
}
