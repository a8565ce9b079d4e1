//! The state every shard shares: settings, the registry, the store and its
//! group-commit handle, and readiness.

use crate::config::Settings;
use crate::core::UnixTime;
use crate::registry::Registry;
use crate::store::committer::CommitHandle;
use crate::store::Store;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

/// Shared gateway state. Cheap to clone behind an `Arc`.
pub struct Gateway {
    pub settings: Settings,
    pub registry: Arc<Registry>,
    pub store: Arc<dyn Store>,
    pub commits: CommitHandle,
    pub metrics: &'static PrometheusHandle,
    /// Store recovered and listeners up.
    ready: AtomicBool,
    /// Set once shutdown begins: new writes are refused.
    draining: AtomicBool,
    /// Name of the network backend in use, for `/metrics` and logs.
    pub io_backend: &'static str,
    /// The WNS sender.
    pub sender: Arc<crate::sender::wake::WnsSender>,
    /// Wakes in flight by device id, so a second wake joins the first.
    /// Hashed with foldhash: every push inserts and removes an entry, and
    /// the ids come from the MDM server, not from the open internet.
    pub pending_wakes:
        dashmap::DashMap<String, crate::api::push::PendingWake, foldhash::fast::RandomState>,
    /// Bulk wakes, running and recently finished.
    pub jobs: dashmap::DashMap<String, Arc<crate::api::jobs::Job>>,
    /// NDJSON imports running now (bounded by `MAX_CONCURRENT_IMPORTS`).
    pub imports_running: std::sync::atomic::AtomicUsize,
    /// Expiry sweeps and the refresh queue.
    pub lifecycle: Arc<crate::lifecycle::Lifecycle>,
    /// Each shard's runtime, registered as the shard starts: where bulk
    /// wakes hand their pages so every shard sends.
    shard_runtimes: Vec<OnceLock<tokio::runtime::Handle>>,
}

impl Gateway {
    /// Every shared part, built by `server::start`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        settings: Settings,
        registry: Arc<Registry>,
        store: Arc<dyn Store>,
        commits: CommitHandle,
        metrics: &'static PrometheusHandle,
        io_backend: &'static str,
        sender: Arc<crate::sender::wake::WnsSender>,
        lifecycle: Arc<crate::lifecycle::Lifecycle>,
    ) -> Gateway {
        let settings_shards = settings.shard_count();
        Gateway {
            settings,
            registry,
            store,
            commits,
            metrics,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            io_backend,
            imports_running: std::sync::atomic::AtomicUsize::new(0),
            sender,
            pending_wakes: dashmap::DashMap::with_hasher(foldhash::fast::RandomState::default()),
            jobs: dashmap::DashMap::new(),
            shard_runtimes: (0..settings_shards).map(|_| OnceLock::new()).collect(),
            lifecycle,
        }
    }

    /// Registers `rt` as the runtime of `shard`; each shard calls it once,
    /// as it starts, before it accepts a connection.
    pub fn register_shard_runtime(&self, shard: usize, rt: tokio::runtime::Handle) {
        let slot = &self.shard_runtimes[shard];
        assert!(slot.set(rt).is_ok(), "shard {shard} registered twice");
    }

    /// The shards whose runtime is registered, with their handles.
    pub fn shard_runtimes(&self) -> Vec<(usize, tokio::runtime::Handle)> {
        self.shard_runtimes
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.get().map(|h| (i, h.clone())))
            .collect()
    }

    /// The current wall-clock time. The only place the API reads the clock.
    pub fn now(&self) -> UnixTime {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        UnixTime(u32::try_from(secs).unwrap_or(u32::MAX))
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.draining.load(Ordering::Acquire)
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
        metrics::gauge!(crate::telemetry::metrics::READY).set(1.0);
    }

    /// Marks the gateway as shutting down: `/readyz` fails, writes get 503.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Release);
        metrics::gauge!(crate::telemetry::metrics::READY).set(0.0);
    }
}
