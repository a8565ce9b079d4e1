//! Starting and stopping a gateway: open the store, start the group-commit
//! thread, bind the shards, load the store into the registry, turn ready;
//! and in reverse on shutdown.

use crate::config::Settings;
use crate::gateway::Gateway;
use crate::registry::Registry;
use crate::shard::ShardSet;
use crate::store::committer::{Committer, CommitterConfig, CommitterJoin};
use crate::store::fjall_store::{FjallOptions, FjallStore};
use crate::store::{Mutation, Store};
use crate::telemetry::metrics as m;
use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long shutdown waits for wake-ups already handed to WNS to reach
/// their final result (their verdicts are then flushed with the store).
pub const WAKE_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The most a whole shutdown may take: wake-ups ([`WAKE_DRAIN_TIMEOUT`]),
/// open connections ([`crate::shard::DRAIN_TIMEOUT`]) and the final store
/// flush. Past it the process exits with status 1.
pub const SHUTDOWN_LIMIT: Duration = Duration::from_secs(30);

/// A running gateway.
pub struct Running {
    pub gateway: Arc<Gateway>,
    pub local_addr: SocketAddr,
    shards: ShardSet,
    committer: CommitterJoin,
    lifecycle: Option<crate::lifecycle::LifecycleThread>,
}

/// Applies a durable batch to the registry, in order.
pub fn apply_to_registry(registry: &Registry, batch: &[Mutation]) {
    for m in batch {
        match m {
            Mutation::Put(rec) => {
                registry.upsert(rec);
            }
            Mutation::Delete(id) => {
                registry.remove(id.as_str());
            }
            Mutation::Guard { .. }
            | Mutation::Unindex { .. }
            | Mutation::PutJob(_)
            | Mutation::DeleteJob(_) => {}
        }
    }
}

/// Flush and compaction threads for the store: the configured number, or
/// half the cores (1 to 4). Compaction on every core starves the shards: on
/// 2 cores with 2 compaction threads, PUT p99 at 10k/s rose from about 8 ms
/// to over 100 ms (`loadtest/registry.sh`).
fn store_background_threads(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / 2).clamp(1, 4)
}

/// Called once the registry is loaded at start, before the gateway is
/// ready. The `wnsgate` binary sets it to hand the allocator's free memory
/// back: loading decodes every record into short-lived buffers beside the
/// long-lived registry entries, and without a collection the process keeps
/// those pages (at 2M devices the collection gives back about 150 MB).
pub static AFTER_LOAD: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Starts a gateway and returns once it is ready (store loaded).
pub fn start(settings: Settings) -> anyhow::Result<Running> {
    // First, so `--io uring` on a machine without io_uring fails before
    // anything is opened.
    let backend = crate::shard::choose_backend(settings.io)?;
    let metrics = crate::telemetry::metrics::install();
    let path = settings.store.path.clone();
    std::fs::create_dir_all(&path)
        .with_context(|| format!("cannot create the data directory {}", path.display()))?;
    let store = FjallStore::open(
        &path,
        FjallOptions {
            cache_bytes: settings.store.cache_mb.saturating_mul(1024 * 1024),
            memtable_bytes: settings.store.memtable_mb.saturating_mul(1024 * 1024),
            worker_threads: Some(store_background_threads(settings.store.background_threads)),
            ..FjallOptions::default()
        },
    )
    .with_context(|| format!("cannot open the store in {}", path.display()))?;
    let store: Arc<dyn Store> = Arc::new(store);
    let registry = Arc::new(Registry::with_capacity(store.approximate_len()));
    let reg = registry.clone();
    let reg_lookup = registry.clone();
    let (commits, committer) = Committer::start_with_lookup(
        store.clone(),
        Box::new(move |batch: &[Mutation]| apply_to_registry(&reg, batch)),
        Box::new(move |id| reg_lookup.get(id.as_str()).map(|r| r.channel_uri)),
        CommitterConfig {
            queue_capacity: settings.store.queue_capacity,
            max_batch_mutations: settings.store.max_batch_mutations,
        },
    );
    let io = backend.name();
    let listen = settings.listen;
    let shard_count = settings.shard_count();
    let sender = Arc::new(
        // One pool slot per shard, and one for the nudge thread.
        crate::sender::wake::WnsSender::new(&settings, shard_count + 1)
            .context("cannot set up the WNS sender")?,
    );
    let apps = settings
        .wns
        .apps
        .iter()
        .filter_map(|a| crate::core::Pfn::parse(&a.pfn).ok())
        .collect();
    let lifecycle = Arc::new(crate::lifecycle::Lifecycle::new(
        settings.refresh.clone(),
        settings.thresholds,
        apps,
        registry.clone(),
        store.clone(),
        commits.clone(),
    ));
    let gateway = Arc::new(Gateway::new(
        settings,
        registry.clone(),
        store.clone(),
        commits,
        metrics,
        io,
        sender,
        lifecycle.clone(),
    ));
    let shards = ShardSet::start(gateway.clone(), listen, shard_count, backend)
        .context("cannot start the API listeners")?;
    let local_addr = shards.local_addr;
    tracing::info!(%local_addr, shards = shard_count, io, data = %path.display(), "listening; loading the store");

    let t = Instant::now();
    let loaded = store
        .scan_all_parallel(shard_count, &|rec| {
            registry.upsert(&rec);
        })
        .context("cannot load the store")?;
    if let Some(release) = AFTER_LOAD.get() {
        release();
    }
    let jobs = lifecycle
        .restore(gateway.now())
        .context("cannot load the refresh queue")?;
    let secs = t.elapsed().as_secs_f64();
    metrics::gauge!(m::RECOVERY_SECONDS).set(secs);
    if let Some(rate) = gateway.settings.nudge_per_second {
        let n = crate::lifecycle::nudge::Nudger::start(gateway.clone(), shard_count, rate)
            .context("cannot start the nudge thread")?;
        lifecycle.set_nudger(n, gateway.now());
    }
    let gw = gateway.clone();
    let lifecycle_thread = crate::lifecycle::LifecycleThread::start(lifecycle, move || gw.now())
        .context("cannot start the lifecycle thread")?;
    gateway.set_ready();
    tracing::info!(
        devices = loaded,
        refresh_jobs = jobs,
        seconds = format!("{secs:.2}"),
        "ready"
    );
    Ok(Running {
        gateway,
        local_addr,
        shards,
        committer,
        lifecycle: Some(lifecycle_thread),
    })
}

/// The checks `wnsgate check-config` adds to [`Settings::resolve`]: the WNS
/// sender is built exactly as `serve` builds it (CA file parsed, secrets
/// read, token endpoints checked; no network I/O), and an existing data
/// directory must be a writable directory. Returns notes for the operator.
pub fn preflight(settings: &Settings) -> anyhow::Result<Vec<String>> {
    crate::sender::wake::WnsSender::new(settings, 1).context("cannot set up the WNS sender")?;
    let mut notes = Vec::new();
    let path = &settings.store.path;
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_dir() => {
            anyhow::bail!("store.path: {} is not a directory", path.display())
        }
        Ok(_) => {
            let probe = path.join(".wnsgate-check-config");
            std::fs::write(&probe, b"")
                .with_context(|| format!("store.path: {} is not writable", path.display()))?;
            let _ = std::fs::remove_file(&probe);
        }
        Err(_) => notes.push(format!(
            "data directory {} does not exist yet; serve creates it",
            path.display()
        )),
    }
    Ok(notes)
}

impl Running {
    /// Stops taking work (`/readyz` fails, API calls get 503), stops bulk
    /// wakes from sending more, waits for the wake-ups in flight (up to
    /// [`WAKE_DRAIN_TIMEOUT`]), stops accepting and drains open
    /// connections, then flushes the store.
    pub fn shutdown(mut self) {
        self.gateway.begin_drain();
        if let Some(l) = self.lifecycle.take() {
            l.stop();
        }
        self.gateway.lifecycle.stop_nudger();
        let jobs: Vec<String> = self.gateway.jobs.iter().map(|j| j.key().clone()).collect();
        for id in &jobs {
            let _ = crate::api::jobs::cancel(&self.gateway, id);
        }
        let wakes = self.gateway.pending_wakes.len();
        if wakes > 0 {
            tracing::info!(wakes, "waiting for wake-ups in flight");
        }
        let deadline = Instant::now() + WAKE_DRAIN_TIMEOUT;
        while !self.gateway.pending_wakes.is_empty() {
            if Instant::now() >= deadline {
                tracing::warn!(
                    wakes = self.gateway.pending_wakes.len(),
                    "wake-ups still in flight after the drain timeout; their results are lost"
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.shards.shutdown();
        match self.committer.shutdown() {
            Ok(()) => tracing::info!("stopped"),
            Err(e) => tracing::error!(error = %e, "the final store flush failed"),
        }
    }
}
