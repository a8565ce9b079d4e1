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
use std::time::Instant;

/// A running gateway.
pub struct Running {
    pub gateway: Arc<Gateway>,
    pub local_addr: SocketAddr,
    shards: ShardSet,
    committer: CommitterJoin,
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
    let (commits, committer) = Committer::start(
        store.clone(),
        Box::new(move |batch: &[Mutation]| apply_to_registry(&reg, batch)),
        CommitterConfig {
            queue_capacity: settings.store.queue_capacity,
            max_batch_mutations: settings.store.max_batch_mutations,
        },
    );
    let io = backend.name();
    let listen = settings.listen;
    let shard_count = settings.shard_count();
    let sender = Arc::new(
        crate::sender::wake::WnsSender::new(&settings, shard_count)
            .context("cannot set up the WNS sender")?,
    );
    let gateway = Arc::new(Gateway::new(
        settings,
        registry.clone(),
        store.clone(),
        commits,
        metrics,
        io,
        sender,
    ));
    let shards = ShardSet::start(gateway.clone(), listen, shard_count, backend)
        .with_context(|| format!("cannot listen on {listen}"))?;
    let local_addr = shards.local_addr;
    tracing::info!(%local_addr, shards = shard_count, io, data = %path.display(), "listening; loading the store");

    let t = Instant::now();
    let loaded = store
        .scan_all_parallel(shard_count, &|rec| {
            registry.upsert(&rec);
        })
        .context("cannot load the store")?;
    let secs = t.elapsed().as_secs_f64();
    metrics::gauge!(m::RECOVERY_SECONDS).set(secs);
    gateway.set_ready();
    tracing::info!(devices = loaded, seconds = format!("{secs:.2}"), "ready");
    Ok(Running {
        gateway,
        local_addr,
        shards,
        committer,
    })
}

impl Running {
    /// Stops accepting, drains open requests, flushes the store.
    pub fn shutdown(self) {
        self.gateway.begin_drain();
        self.shards.shutdown();
        match self.committer.shutdown() {
            Ok(()) => tracing::info!("stopped"),
            Err(e) => tracing::error!(error = %e, "the final store flush failed"),
        }
    }
}
