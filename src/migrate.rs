//! Converting a data directory written by the fjall store (wnsgate 0.x)
//! to the partition log layout, on the first start or by `wnsgate migrate`.
//!
//! The old files (`version`, `lock`, `keyspaces/`, `journals/`, ...) stay
//! where they are, untouched, until the operator removes them. The devices
//! and refresh jobs are read into memory, counted, and written as a first
//! snapshot into `<data>/migrating/`; the snapshot is read back and its
//! counts checked; then its files move into the data directory, the state
//! file last. A run cut short leaves no state file, so the next start
//! simply migrates again.

use crate::config::StoreConfig;
use crate::core::Partitioning;
use crate::registry::Registry;
use crate::store::fjall_store::{FjallOptions, FjallStore};
use crate::store::log_store::{LogOptions, LogStore};
use crate::store::snapshot::{self, Snapshot};
use anyhow::Context;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// What a migration did.
#[derive(Debug, Clone, PartialEq)]
pub struct Migrated {
    pub devices: u64,
    pub jobs: u64,
    pub snapshot_bytes: u64,
    pub seconds: f64,
}

/// Whether `data` holds a fjall store and no partition log yet.
pub fn needed(data: &Path) -> bool {
    data.join("version").is_file()
        && data.join("keyspaces").is_dir()
        && !data.join("wnsgate.state").exists()
}

/// Converts the fjall store in `data`. `progress` is called now and then
/// with the devices read so far and the store's estimate of the total.
pub fn migrate(
    data: &Path,
    cfg: &StoreConfig,
    threads: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> anyhow::Result<Migrated> {
    let started = crate::clock::instant();
    // Leftovers of a run cut short: without the state file they are
    // incomplete.
    for leftover in ["migrating", "log", "snapshots"] {
        let p = data.join(leftover);
        if p.exists() {
            std::fs::remove_dir_all(&p)
                .with_context(|| format!("cannot remove {} left by an earlier run", p.display()))?;
        }
    }
    let old = FjallStore::open(
        data,
        FjallOptions {
            cache_bytes: cfg.cache_mb.saturating_mul(1 << 20),
            memtable_bytes: cfg.memtable_mb.saturating_mul(1 << 20),
            worker_threads: (cfg.background_threads > 0).then_some(cfg.background_threads),
            ..FjallOptions::default()
        },
    )
    .with_context(|| format!("cannot open the 0.x store in {}", data.display()))?;
    let partitioning = match cfg.partitions {
        0 => Partitioning::default(),
        n => Partitioning::new(n)?,
    };
    let estimate = crate::store::Store::approximate_len(&old) as u64;
    let registry = Registry::with_partitions(partitioning, estimate as usize);
    let read = AtomicU64::new(0);
    let devices = old
        .scan_all_parallel(threads, &|rec| {
            registry.upsert(&rec);
            let n = read.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_multiple_of(100_000) {
                progress(n, estimate);
            }
        })
        .context("cannot read the devices of the 0.x store")?;
    progress(devices, devices);
    anyhow::ensure!(
        registry.len() as u64 == devices,
        "read {devices} devices but hold {}: the 0.x store lists a device twice",
        registry.len()
    );
    let mut jobs = Vec::new();
    crate::store::Store::scan_jobs(&old, &mut |j| jobs.push(j))
        .context("cannot read the refresh jobs of the 0.x store")?;
    drop(old);

    let staging = data.join("migrating");
    let store = LogStore::open(
        &staging,
        LogOptions {
            partitions: Some(partitioning),
            ..LogOptions::default()
        },
    )
    .with_context(|| format!("cannot create {}", staging.display()))?;
    drop(store);
    let encoded: Vec<(u64, Vec<u8>)> = jobs
        .iter()
        .map(|j| (j.id, crate::store::job_codec::encode(j)))
        .collect();
    let visit_jobs = |visit: &mut dyn FnMut(u64, &[u8])| {
        for (id, v) in &encoded {
            visit(*id, v);
        }
    };
    let snap_dir = staging.join("snapshots");
    let written = snapshot::write(&snap_dir, 1, partitioning, &registry, &visit_jobs, None)
        .with_context(|| format!("cannot write the first snapshot in {}", snap_dir.display()))?;
    drop(registry);
    // The count check, on what is on disk.
    let back = Snapshot::open(&written.path)?;
    anyhow::ensure!(
        back.records == devices && back.jobs == jobs.len() as u64,
        "the snapshot holds {} devices and {} jobs, but {devices} devices and {} jobs were read",
        back.records,
        back.jobs,
        jobs.len()
    );
    drop(back);
    for name in ["log", "snapshots"] {
        std::fs::rename(staging.join(name), data.join(name))
            .with_context(|| format!("cannot move {name} into {}", data.display()))?;
    }
    // The commit point.
    std::fs::rename(staging.join("wnsgate.state"), data.join("wnsgate.state"))
        .with_context(|| format!("cannot move the state file into {}", data.display()))?;
    std::fs::File::open(data)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", data.display()))?;
    let _ = std::fs::remove_dir_all(&staging);
    Ok(Migrated {
        devices,
        jobs: jobs.len() as u64,
        snapshot_bytes: written.bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The 0.x files left in `data` after a migration, for the operator to
/// remove.
pub fn leftovers(data: &Path) -> Vec<String> {
    let ours = ["wnsgate.state", "LOCK", "log", "snapshots"];
    let mut names: Vec<String> = std::fs::read_dir(data)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !ours.contains(&n.as_str()))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Mutation, Store};
    use crate::testing::arb_record;
    use proptest::strategy::{Strategy, ValueTree};

    #[test]
    fn a_fjall_directory_is_converted_with_every_device_and_job() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let mut recs = std::collections::BTreeMap::new();
        while recs.len() < 500 {
            let r = arb_record().new_tree(&mut runner).unwrap().current();
            recs.insert(r.device_id.as_str().to_owned(), r);
        }
        {
            let old = FjallStore::open(&data, FjallOptions::default()).unwrap();
            let batch: Vec<Mutation> = recs.values().cloned().map(Mutation::Put).collect();
            old.apply(&batch).unwrap();
        }
        assert!(needed(&data));
        let calls = AtomicU64::new(0);
        let done = migrate(&data, &StoreConfig::default(), 2, &|n, total| {
            calls.fetch_add(1, Ordering::Relaxed);
            assert!(n <= total.max(n));
        })
        .unwrap();
        assert_eq!(done.devices, 500);
        assert!(calls.load(Ordering::Relaxed) >= 1);
        assert!(!needed(&data));
        assert!(leftovers(&data).contains(&"keyspaces".to_owned()));

        let store = LogStore::open(&data, LogOptions::default()).unwrap();
        let registry = Registry::with_partitions(store.partitioning().unwrap(), 0);
        let loaded = store.load(2, &registry).unwrap();
        assert_eq!(loaded.snapshot_records, 500);
        for (id, r) in &recs {
            assert_eq!(registry.get(id).as_ref(), Some(r));
        }
    }

    #[test]
    fn a_run_cut_short_is_done_again() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        {
            let old = FjallStore::open(&data, FjallOptions::default()).unwrap();
            let mut runner = proptest::test_runner::TestRunner::deterministic();
            let r = arb_record().new_tree(&mut runner).unwrap().current();
            old.apply(&[Mutation::Put(r)]).unwrap();
        }
        // What a crash after moving the log but before the state file
        // leaves.
        std::fs::create_dir_all(data.join("log")).unwrap();
        std::fs::create_dir_all(data.join("migrating/snapshots")).unwrap();
        assert!(needed(&data));
        let done = migrate(&data, &StoreConfig::default(), 1, &|_, _| {}).unwrap();
        assert_eq!(done.devices, 1);
        assert!(!data.join("migrating").exists());
    }
}
