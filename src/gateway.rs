//! The state every shard's API shares: settings, the registry, the store
//! and its group-commit handle, the services (registrations, the
//! lifecycle, wakes), and readiness.
//!
//! Owns: readiness and the drain flag. It holds the services the API calls
//! into and no API type of its own.

use crate::config::Settings;
use crate::core::UnixTime;
use crate::lifecycle::Lifecycle;
use crate::registration::Registrar;
use crate::registry::Registry;
use crate::store::committer::CommitHandle;
use crate::store::Store;
use crate::wake::WakeService;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// Shared gateway state, behind an `Arc`.
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
    /// Single wakes, bulk wakes and nudges.
    pub wakes: Arc<WakeService>,
    /// Registrations and removals.
    pub registrar: Arc<Registrar>,
    /// NDJSON imports running now (bounded by the API's import limit).
    pub imports_running: AtomicUsize,
    /// Expiry sweeps and the refresh queue.
    pub lifecycle: Arc<Lifecycle>,
}

/// The parts a [`Gateway`] shares, built by `server::start`.
pub struct Parts {
    pub settings: Settings,
    pub registry: Arc<Registry>,
    pub store: Arc<dyn Store>,
    pub commits: CommitHandle,
    pub metrics: &'static PrometheusHandle,
    pub io_backend: &'static str,
    pub wakes: Arc<WakeService>,
    pub registrar: Arc<Registrar>,
    pub lifecycle: Arc<Lifecycle>,
}

impl Gateway {
    pub fn new(p: Parts) -> Gateway {
        Gateway {
            settings: p.settings,
            registry: p.registry,
            store: p.store,
            commits: p.commits,
            metrics: p.metrics,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            io_backend: p.io_backend,
            wakes: p.wakes,
            registrar: p.registrar,
            imports_running: AtomicUsize::new(0),
            lifecycle: p.lifecycle,
        }
    }

    /// The current wall-clock time.
    pub fn now(&self) -> UnixTime {
        crate::clock::now()
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
