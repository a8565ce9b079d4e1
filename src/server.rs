//! Starting and stopping a gateway: the composition root. Open the store,
//! start the group-commit thread, build the services, bind the shards with
//! the API as their handler, load the store into the registry, turn ready;
//! and on shutdown, the ordered sequence of [`Running::shutdown`].

use crate::config::Settings;
use crate::gateway::Gateway;
use crate::registry::Registry;
use crate::shard::{ShardOptions, ShardSet};
use crate::store::committer::{Committer, CommitterConfig, CommitterJoin};
use crate::store::{Mutation, Store};
use crate::telemetry::metrics as m;
use crate::wake::nudge::Nudger;
use crate::wake::WakeService;
use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Shutdown's steps, in order, each with the most it may take. Their sum
/// is held to [`SHUTDOWN_MS_MAX`] when the crate compiles.
///
/// 1. Stop accepting: `/readyz` fails, API calls get 503, the listeners
///    close (immediate).
/// 2. Stop the producers: bulk wakes are cancelled, nudges stop being
///    taken, the lifecycle thread ends its current step.
pub const STOP_PRODUCERS_MS_MAX: u64 = 4_000;
/// 3. Drain the wakes in flight: they reach their final result, which is
///    kept (a dead channel's mark with the store flush). A wake waiting
///    for a retry (a back-off, its authority's circuit breaker) goes on
///    waiting only until [`RETRIES_STOP_MS`] into this step, then ends
///    with its last failure.
pub const DRAIN_WAKES_MS_MAX: u64 = 10_000;
/// How far into step 3 wakes may still wait for a retry: early enough that
/// a request sent then ends (or times out) before the step's budget does
/// not matter much; what matters is that waiting wakes end within it.
pub const RETRIES_STOP_MS: u64 = 8_000;
/// 4. Drain the connections: open ones finish their requests (a
///    `?wait=true` push answers with the result of step 3).
pub const DRAIN_CONNECTIONS_MS_MAX: u64 = 10_000;
/// 5. Flush the store: everything queued is applied and synced.
pub const FLUSH_STORE_MS_MAX: u64 = 5_000;
/// The most a whole shutdown may take. Past it the process exits with
/// status 1 (`wnsgate serve`'s watchdog).
pub const SHUTDOWN_MS_MAX: u64 = 30_000;

const _: () = assert!(
    STOP_PRODUCERS_MS_MAX + DRAIN_WAKES_MS_MAX + DRAIN_CONNECTIONS_MS_MAX + FLUSH_STORE_MS_MAX
        <= SHUTDOWN_MS_MAX
);
const _: () = assert!(RETRIES_STOP_MS < DRAIN_WAKES_MS_MAX);

/// [`SHUTDOWN_MS_MAX`] as a duration.
pub const SHUTDOWN_LIMIT: Duration = Duration::from_millis(SHUTDOWN_MS_MAX);

/// A running gateway.
pub struct Running {
    pub gateway: Arc<Gateway>,
    pub local_addr: SocketAddr,
    shards: ShardSet,
    committer: CommitterJoin,
    lifecycle: Option<crate::lifecycle::LifecycleThread>,
    nudger: Option<Nudger>,
    /// Kept alive for the store, which holds it weakly.
    _host: Arc<dyn crate::store::PartitionHost>,
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
            Mutation::Guard { .. } | Mutation::PutJob(_) | Mutation::DeleteJob(_) => {}
        }
    }
}

/// Called once the registry and the refresh queue are loaded at start,
/// before the gateway is ready. The `wnsgate` binary sets it to hand the
/// allocator's free memory back: loading decodes every record into
/// short-lived buffers beside the long-lived registry entries and jobs,
/// and without a collection the process keeps those pages (at 2M devices
/// the collection gives back about 150 MB).
pub static AFTER_LOAD: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Opens the embedded store in `store.path`, converting a 0.x data
/// directory first.
fn open_embedded(settings: &Settings) -> anyhow::Result<crate::store::LogStore> {
    let path = settings.store.path.clone();
    std::fs::create_dir_all(&path)
        .with_context(|| format!("cannot create the data directory {}", path.display()))?;
    if crate::migrate::needed(&path) {
        tracing::info!(data = %path.display(), "converting a 0.x (fjall) data directory; the old files are kept");
        let last = std::sync::Mutex::new(crate::clock::instant());
        let done = crate::migrate::migrate(
            &path,
            &settings.store,
            settings.shard_count(),
            &|n, total| {
                let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
                if last.elapsed() >= Duration::from_secs(2) {
                    *last = crate::clock::instant();
                    tracing::info!(devices = n, of_about = total, "converting");
                }
            },
        )
        .with_context(|| format!("cannot convert the data directory {}", path.display()))?;
        tracing::info!(
            devices = done.devices,
            refresh_jobs = done.jobs,
            seconds = format!("{:.1}", done.seconds),
            remove_when_satisfied = crate::migrate::leftovers(&path).join(" "),
            "converted; the 0.x files listed are no longer read"
        );
    }
    crate::store::LogStore::open(
        &path,
        crate::store::LogOptions {
            // Validated with the configuration.
            partitions: crate::core::Partitioning::new(settings.store.partitions).ok(),
            snapshot_log_bytes: settings.store.snapshot_log_mb.saturating_mul(1 << 20),
            snapshot_bytes_per_second: match settings.store.snapshot_write_mb_per_s {
                0 => None,
                mb => Some(mb.saturating_mul(1 << 20)),
            },
            segment_bytes: settings.store.log_segment_mb.saturating_mul(1 << 20),
            recovery: if settings.store.accept_damage {
                crate::store::segments::Recovery::TruncateDamage
            } else {
                crate::store::segments::Recovery::Refuse
            },
        },
    )
    .with_context(|| format!("cannot open the store in {}", path.display()))
}

/// Where partitions taken over while running go, and where those handed
/// over leave from (cluster mode): the registry and the refresh queue.
struct Host {
    registry: Arc<Registry>,
    lifecycle: Arc<crate::lifecycle::Lifecycle>,
}

impl crate::store::PartitionHost for Host {
    fn as_restore(&self) -> &dyn crate::store::Restore {
        &*self.registry
    }

    fn adopt_jobs(&self, jobs: Vec<crate::core::refresh::Job>) {
        if let Err(e) = self.lifecycle.adopt(jobs) {
            tracing::error!(error = %e, "the refresh jobs of a partition taken over could not all be settled");
        }
    }

    fn drop_partition(&self, part: u16) {
        let partitioning = self.registry.partitioning();
        let jobs = self.lifecycle.release(|id| partitioning.of(id) == part);
        let devices = self.registry.drop_partition(part);
        tracing::debug!(partition = part, devices, jobs, "partition left memory");
    }
}

/// How often a running bulk wake is checkpointed in embedded mode.
const CHECKPOINT_EVERY_EMBEDDED: Duration = Duration::from_secs(2);

/// Where bulk wakes are kept: files in the data directory in embedded
/// mode, the backend's own place in cluster mode.
fn job_book(
    settings: &Settings,
    store: &dyn Store,
) -> anyhow::Result<Option<crate::wake::Attached>> {
    Ok(match &settings.cluster {
        None => Some(crate::wake::Attached {
            book: Arc::new(
                crate::store::bulk_jobs::FileJobBook::open(&settings.store.path)
                    .context("cannot open the bulk wakes' directory")?,
            ),
            every: CHECKPOINT_EVERY_EMBEDDED,
            owner: None,
        }),
        Some(c) => store.job_book().map(|(book, owner)| crate::wake::Attached {
            book,
            every: c.checkpoint_every,
            owner: Some(owner),
        }),
    })
}

/// Starts a gateway and returns once it is ready (store loaded).
pub fn start(settings: Settings) -> anyhow::Result<Running> {
    // First, so `--io uring` on a machine without io_uring fails before
    // anything is opened.
    let backend = crate::shard::choose_backend(settings.io)?;
    // Then the listeners: an address in use is refused before the data
    // directory is created or opened.
    let bound = ShardSet::bind(settings.listen, settings.shard_count())
        .context("cannot start the API listeners")?;
    let metrics = crate::telemetry::metrics::install();
    let data = match &settings.cluster {
        Some(c) => format!("NATS JetStream at {}", c.nats_urls.join(",")),
        None => settings.store.path.display().to_string(),
    };
    let store: Arc<dyn Store> = match &settings.cluster {
        Some(cluster) => Arc::new(
            crate::cluster::JetStreamStore::open(
                cluster,
                &cluster.advertise_url.clone().unwrap_or_else(|| {
                    let ip = bound.local_addr.ip();
                    let host = if ip.is_unspecified() {
                        crate::config::host_name()
                    } else if ip.is_ipv6() {
                        format!("[{ip}]")
                    } else {
                        ip.to_string()
                    };
                    format!("http://{host}:{}", bound.local_addr.port())
                }),
                settings.store.snapshot_log_mb.saturating_mul(1 << 20),
            )
            .context("cannot open the durable state in NATS JetStream")?,
        ),
        None => Arc::new(open_embedded(&settings)?),
    };
    let registry = Arc::new(Registry::with_partitions(
        store.partitioning().unwrap_or_default(),
        store.approximate_len(),
    ));
    let reg = registry.clone();
    let reg_lookup = registry.clone();
    let (commits, committer) = Committer::start_with_lookup(
        store.clone(),
        Box::new(move |batch: &[Mutation]| apply_to_registry(&reg, batch)),
        Box::new(move |id| reg_lookup.get(id.as_str()).map(|r| r.channel_uri)),
        CommitterConfig {
            queue_capacity: settings.store.queue_capacity,
            max_batch_mutations: settings.store.max_batch_mutations,
            max_wait: (settings.store.max_commit_wait_ms > 0)
                .then(|| Duration::from_millis(settings.store.max_commit_wait_ms)),
            min_sync_interval: Duration::from_micros(settings.store.min_sync_interval_us),
        },
    );
    let io = backend.name();
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
    let wakes = Arc::new(WakeService::new(
        sender,
        registry.clone(),
        lifecycle.clone(),
        settings.thresholds,
        shard_count,
    ));
    let options = ShardOptions {
        request_timeout: Duration::from_secs(settings.request_timeout_secs),
        drain_connections: Duration::from_millis(DRAIN_CONNECTIONS_MS_MAX),
    };
    let commits_for_api = commits.clone();
    let gateway = Arc::new(Gateway::new(crate::gateway::Parts {
        settings,
        registry: registry.clone(),
        store: store.clone(),
        commits,
        metrics,
        io_backend: io,
        wakes: wakes.clone(),
        registrar: Arc::new(crate::registration::Registrar::new(
            registry.clone(),
            commits_for_api,
            lifecycle.clone(),
        )),
        lifecycle: lifecycle.clone(),
    }));
    let gw = gateway.clone();
    // Each shard, as it starts and before it accepts: its runtime is where
    // bulk wakes deal pages (whether or not the shard ever serves a
    // request), its metric series exist, and it serves the API.
    let api = move |shard: usize| {
        gw.wakes
            .register_shard_runtime(shard, tokio::runtime::Handle::current());
        crate::telemetry::metrics::init_shard_series(shard);
        crate::api::ShardApi::new(gw.clone(), shard)
    };
    let shards = bound
        .start(Arc::new(api), backend, options)
        .context("cannot start the API listeners")?;
    let local_addr = shards.local_addr;
    tracing::info!(%local_addr, shards = shard_count, io, %data, "listening; loading the store");

    let t = crate::clock::instant();
    let loaded = store
        .load(shard_count, &*registry)
        .context("cannot load the store")?;
    let t_queue = crate::clock::instant();
    let attached = job_book(&gateway.settings, &*store)?;
    if let Some(owner) = attached.as_ref().and_then(|a| a.owner.clone()) {
        // Cluster mode: refresh job ids name their partition, and the
        // refresh pace is this node's share.
        lifecycle.set_ids_carry_partitions();
        lifecycle.set_owner(owner);
    }
    let jobs = lifecycle
        .restore(gateway.now())
        .context("cannot load the refresh queue")?;
    if let Some(release) = AFTER_LOAD.get() {
        release();
    }
    // Snapshots are cut from the registry and the refresh queue, once both
    // hold what was loaded.
    store.attach(registry.clone(), lifecycle.clone());
    let host: Arc<dyn crate::store::PartitionHost> = Arc::new(Host {
        registry: registry.clone(),
        lifecycle: lifecycle.clone(),
    });
    store.attach_host(Arc::downgrade(&host));
    let queue_secs = t_queue.elapsed().as_secs_f64();
    let secs = t.elapsed().as_secs_f64();
    metrics::gauge!(m::RECOVERY_SECONDS).set(secs);
    let nudger = match gateway.settings.nudge_per_second {
        Some(rate) => {
            // The nudge thread sends from the sender's last pool slot.
            let (n, queue) =
                Nudger::start(wakes, shard_count, rate).context("cannot start the nudge thread")?;
            lifecycle.set_nudges(queue, crate::clock::now());
            Some(n)
        }
        None => None,
    };
    let lifecycle_thread = crate::lifecycle::LifecycleThread::start(lifecycle, crate::clock::now)
        .context("cannot start the lifecycle thread")?;
    let resumed_jobs = match attached {
        Some(attached) => {
            gateway.wakes.attach_book(attached);
            let rt = gateway
                .wakes
                .shard_runtime(0)
                .context("no shard runtime to resume bulk wakes on")?;
            gateway
                .wakes
                .restore_jobs(&rt)
                .context("cannot load the bulk wakes")?
        }
        None => 0,
    };
    gateway.set_ready();
    let s = &gateway.settings;
    if s.wns.apps.is_empty() {
        tracing::warn!(
            "no [[wns.apps]] configured: every registration is refused with unknown_pfn until one is"
        );
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        devices = registry.len(),
        replayed_batches = loaded.replayed_batches,
        refresh_jobs = jobs,
        seconds = format!("{secs:.2}"),
        snapshot_seconds = format!("{:.2}", loaded.snapshot_seconds),
        replay_seconds = format!("{:.2}", loaded.replay_seconds),
        queue_seconds = format!("{queue_secs:.2}"),
        resumed_bulk_wakes = resumed_jobs,
        wns_apps = s.wns.apps.len(),
        wns_target = if s.wns.connect_to.trim().is_empty() {
            "WNS (notify.windows.com)"
        } else {
            s.wns.connect_to.trim()
        },
        "ready"
    );
    Ok(Running {
        gateway,
        local_addr,
        shards,
        committer,
        lifecycle: Some(lifecycle_thread),
        nudger,
        _host: host,
    })
}

/// The checks `wnsgate check-config` adds to [`Settings::resolve`]: the WNS
/// sender is built exactly as `serve` builds it (CA file parsed, secrets
/// read, token endpoints checked; no network I/O), and an existing data
/// directory must be a writable directory. Returns notes for the operator.
pub fn preflight(settings: &Settings) -> anyhow::Result<Vec<String>> {
    crate::sender::wake::WnsSender::new(settings, 1).context("cannot set up the WNS sender")?;
    let b = &settings.wns_breaker;
    let mut notes = vec![format!(
        "WNS retries: within {} s of a wake's start (wns.retry_window); each authority's circuit breaker {}",
        settings.wns_retry_window.as_secs(),
        match b.failures_to_open {
            0 => "never opens (wns.breaker_failures = 0)".to_owned(),
            n => format!(
                "opens after {n} connection failures in a row, for {} s to {} s",
                b.open_for.as_secs(),
                b.open_for_max.as_secs()
            ),
        }
    )];
    if settings.wns.apps.is_empty() {
        notes.push(
            "no [[wns.apps]] configured: every registration will be refused with unknown_pfn"
                .to_owned(),
        );
    }
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
    /// Shuts down in the order of the steps above ([`STOP_PRODUCERS_MS_MAX`]
    /// and after), each within its budget; a step that runs out of it is
    /// logged and the next one starts.
    pub fn shutdown(mut self) {
        // 1. Stop accepting.
        self.gateway.begin_drain();
        self.shards.stop_accepting();
        // 2. Stop the producers.
        let wakes = self.gateway.wakes.clone();
        wakes.stop_jobs();
        if let Some(n) = &self.nudger {
            n.stop_taking();
        }
        self.gateway.lifecycle.stop_nudges();
        if let Some(l) = self.lifecycle.take() {
            if !l.stop_within(Duration::from_millis(STOP_PRODUCERS_MS_MAX)) {
                tracing::warn!("the lifecycle thread is still in its step; going on without it");
            }
        }
        // 3. Drain the wakes in flight; those waiting for a retry wait no
        // longer than the step allows.
        wakes
            .sender()
            .stop_retrying_within(Duration::from_millis(RETRIES_STOP_MS));
        let inflight = wakes.inflight();
        if inflight > 0 {
            tracing::info!(wakes = inflight, "waiting for wake-ups in flight");
        }
        let drained = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map(|rt| rt.block_on(wakes.drain(Duration::from_millis(DRAIN_WAKES_MS_MAX))));
        if !matches!(drained, Ok(true)) {
            tracing::warn!(
                wakes = wakes.inflight(),
                "wake-ups still in flight after the drain budget; their results are lost"
            );
        }
        if let Some(n) = self.nudger.take() {
            n.join();
        }
        // 4. Drain the connections.
        self.shards.drain();
        // 5. Flush the store.
        match self.committer.shutdown() {
            Ok(()) => tracing::info!("stopped"),
            Err(e) => tracing::error!(error = %e, "the final store flush failed"),
        }
    }
}
