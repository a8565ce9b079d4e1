//! The durable state in NATS JetStream: one log subject per partition,
//! snapshots in the object store.
//!
//! - **Subjects and streams.** Partition `p` appends to
//!   `wnsgate.log.<p mod S>.<p>`, in stream `WNSGATE_LOG_<p mod S>` (S is
//!   `cluster.stream_count`; each stream is one Raft group, replicated
//!   `cluster.replicas` times). The partition and stream counts are kept in
//!   the key-value bucket `wnsgate-meta` when the data is created; a node
//!   configured with other counts refuses to start.
//! - **Writes.** [`Store::apply`] splits a committed batch by partition
//!   and appends each partition's share as one message (or a few, for a
//!   share above [`MESSAGE_BYTES`]), all partitions at once. JetStream
//!   acknowledges a message once a quorum of the stream's replicas has it.
//! - **Fencing.** Every append carries
//!   `Nats-Expected-Last-Subject-Sequence`: the sequence of the last
//!   message this node appended to (or loaded from) the partition. When
//!   another writer appended in between, JetStream refuses the message,
//!   and this node stops writing the partition at once (its writes answer
//!   503 and readiness turns 503). That is the engine's guarantee of one
//!   writer per partition, not ours.
//! - **Lost answers.** An append that gets no answer (a NATS server died,
//!   a stream leader moved) is sent again, with the same `Nats-Msg-Id`, for
//!   up to [`APPEND_DEADLINE`]. JetStream drops the copy it already has (its
//!   duplicate window), and a refusal for the sequence is checked against
//!   the subject's last message: when that message is this append, the
//!   append succeeded. An append still unanswered at the deadline leaves
//!   the partition unwritable until the background thread finds that the
//!   message never arrived; if it did arrive, a restart loads it.
//! - **Snapshots.** A background thread cuts one once the log since the
//!   last has grown past `store.snapshot_log_mb` (and past a quarter of the
//!   last snapshots' size): every partition written since its own last
//!   snapshot goes to the object store `wnsgate-snapshots` as object
//!   `p<partition>` ([`super::snapshot`]), then the partition's messages
//!   before the snapshot's replay point are purged. The message at that
//!   point is kept: it may not be in memory yet when the cut reads the
//!   partition, and replaying it twice changes nothing. Keeping one message
//!   also keeps the subject's last sequence, which fencing compares.
//! - **Loading.** A node loads only the partitions it takes the lease of
//!   ([`super::leases`]), at start and whenever one moves to it: the
//!   partition's snapshot (whose records may come from another node, so
//!   they are read with the snapshot's own dictionary), then the
//!   partition's log messages after it. A partition that moves away leaves
//!   memory once its last append is acknowledged.

use super::leases;
use super::snapshot as psnap;
use crate::config::{ClusterSettings, NatsAuth};
use crate::core::refresh::Job;
use crate::core::Partitioning;
use crate::store::{
    batch_codec, job_codec, JobSource, Loaded, Mutation, PartitionHost, Restore, SnapshotSource,
    Sources, Store, StoreError,
};
use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::{Condvar, Mutex, RwLock};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The key-value bucket holding the data's partition and stream counts.
pub const META_BUCKET: &str = "wnsgate-meta";
/// The object store holding one snapshot per partition.
pub const SNAPSHOT_BUCKET: &str = "wnsgate-snapshots";
/// Streams are named this and their index.
pub const STREAM_PREFIX: &str = "WNSGATE_LOG_";
/// The key in [`META_BUCKET`] with the data's layout.
const LAYOUT_KEY: &str = "layout";
/// The largest message a partition's share of a batch is split into
/// (NATS refuses messages above its `max_payload`, 1 MiB by default).
pub const MESSAGE_BYTES: usize = 256 << 10;
/// How long an append is retried while it gets no answer.
pub const APPEND_DEADLINE: Duration = Duration::from_secs(10);
/// How long opening waits for NATS and JetStream to be ready.
pub const OPEN_DEADLINE: Duration = Duration::from_secs(60);
/// How long one JetStream request may take before it is retried.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// JetStream's duplicate window on the log streams: a re-sent append is
/// recognised within it.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Partitions read from JetStream at once while taking them over.
const TAKE_WINDOW: usize = 32;
const CUT_RETRY_AFTER: Duration = Duration::from_secs(30);

const METRIC_APPEND_SECONDS: &str = "wnsgate_cluster_append_seconds";
const METRIC_APPEND_ERRORS: &str = "wnsgate_cluster_append_errors_total";
const METRIC_PARTITIONS_OWNED: &str = "wnsgate_cluster_partitions_owned";
const METRIC_OWNERSHIP_CHANGES: &str = "wnsgate_cluster_ownership_changes_total";
const METRIC_TAKEOVER_SECONDS: &str = "wnsgate_cluster_takeover_seconds";
const METRIC_SNAPSHOT_SECONDS: &str = "wnsgate_store_snapshot_seconds";
const METRIC_SNAPSHOT_BYTES: &str = "wnsgate_store_snapshot_bytes";
const METRIC_LOG_BYTES: &str = "wnsgate_store_log_bytes";
const METRIC_WRITABLE: &str = "wnsgate_store_writable";

/// Registers help texts and units of the backend's own metrics (the
/// snapshot and log series are shared with the embedded backend).
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_histogram!(
        METRIC_APPEND_SECONDS,
        Unit::Seconds,
        "Time from a committed batch's first JetStream append to its last acknowledgement"
    );
    describe_gauge!(
        METRIC_PARTITIONS_OWNED,
        "Partitions this node holds the lease of and serves"
    );
    describe_counter!(
        METRIC_OWNERSHIP_CHANGES,
        "Partitions taken over, handed over to another node, or lost (a lease not renewed in time), by change"
    );
    describe_histogram!(
        METRIC_TAKEOVER_SECONDS,
        Unit::Seconds,
        "Time to load the partitions taken over in one round (snapshot and log tail)"
    );
    describe_counter!(
        METRIC_APPEND_ERRORS,
        "JetStream appends that failed, by reason (fenced: another writer; unanswered; refused)"
    );
}

/// The partition's subject.
pub fn subject(streams: u16, part: u16) -> String {
    format!("wnsgate.log.{}.{}", part % streams, part)
}

fn object_name(part: u16) -> String {
    format!("p{part:04}")
}

/// A partition's write state.
const OPEN: u8 = 0;
/// Another writer appended: this node must not write it again.
const FENCED: u8 = 1;
/// An append's outcome is unknown: writes wait until it is known.
const UNCERTAIN: u8 = 2;

/// Why one partition's append failed.
enum AppendFailure {
    Fenced,
    Unanswered(String),
    Refused(String),
}

struct Inner {
    handle: tokio::runtime::Handle,
    client: async_nats::Client,
    js: jetstream::Context,
    streams: Vec<jetstream::stream::Stream>,
    snapshots: jetstream::object_store::ObjectStore,
    partitioning: Partitioning,
    stream_count: u16,
    /// Unique to this process: the prefix of every append's message id.
    instance: String,
    /// Per partition: the stream sequence of its last message this node
    /// appended or loaded (0: none).
    last_seq: Vec<AtomicU64>,
    /// Per partition: the `replay_from` of its latest snapshot (0: none).
    snapshot_seq: Vec<AtomicU64>,
    state: Vec<AtomicU8>,
    /// The partition of every open job, for its delete (which names only
    /// the job).
    job_parts: Mutex<HashMap<u64, u16>>,
    loaded_jobs: Mutex<Option<HashMap<u64, Job>>>,
    source: OnceLock<Sources>,
    snapshot_log_bytes: u64,
    log_bytes: AtomicU64,
    cut_at_bytes: AtomicU64,
    snapshot_bytes: AtomicU64,
    loaded: AtomicBool,
    node_id: String,
    advertise_url: String,
    lease_ttl: Duration,
    nodes_kv: jetstream::kv::Store,
    leases_kv: jetstream::kv::Store,
    /// Per partition: served here (its lease held and its state loaded).
    served: Vec<AtomicBool>,
    /// Counts the partitions taken and left (for bulk wakes' walks).
    ownership: AtomicU64,
    /// The revision of every lease this node holds.
    held: Mutex<HashMap<u16, u64>>,
    /// The live nodes of the last round: id -> API address.
    live: RwLock<HashMap<String, String>>,
    /// Until when (nanoseconds after `epoch`) the held leases stand.
    valid_until: AtomicU64,
    epoch: std::time::Instant,
    /// Held while a batch is appended, so a partition handed over has no
    /// append still in flight.
    apply_lock: Mutex<()>,
    host: OnceLock<std::sync::Weak<dyn PartitionHost>>,
    cutting: Mutex<()>,
    stop: Mutex<bool>,
    wake: Condvar,
    wake_leases: Condvar,
}

/// The cluster [`Store`]: see the module docs.
pub struct JetStreamStore {
    inner: Arc<Inner>,
    jobs: Arc<super::jobs::KvJobBook>,
    runtime: Option<tokio::runtime::Runtime>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    lease_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn io(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(format!("{what}: {e}"))
}

async fn connect(settings: &ClusterSettings) -> Result<async_nats::Client, String> {
    let mut opts = async_nats::ConnectOptions::new()
        .name(format!("wnsgate {}", settings.node_id))
        .connection_timeout(REQUEST_TIMEOUT)
        .request_timeout(Some(REQUEST_TIMEOUT));
    match &settings.auth {
        NatsAuth::None => {}
        NatsAuth::Token(t) => opts = opts.token(t.expose().to_owned()),
        NatsAuth::CredentialsFile(path) => {
            opts = opts
                .credentials_file(path)
                .await
                .map_err(|e| format!("cluster.credentials_file {}: {e}", path.display()))?;
        }
    }
    if let Some(ca) = &settings.tls_ca_file {
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    let addrs: Vec<async_nats::ServerAddr> = settings
        .nats_urls
        .iter()
        .map(|u| u.parse().map_err(|e| format!("cluster.nats_urls {u}: {e}")))
        .collect::<Result<_, _>>()?;
    async_nats::connect_with_options(addrs, opts)
        .await
        .map_err(|e| {
            format!(
                "cannot connect to NATS at {}: {e}",
                settings.nats_urls.join(", ")
            )
        })
}

/// The data's layout as kept in [`META_BUCKET`].
fn layout_text(p: Partitioning, streams: u16) -> String {
    format!("format=1 partitions={} streams={streams}", p.count())
}

fn parse_layout(text: &str) -> Option<(u32, u16)> {
    let mut parts = None;
    let mut streams = None;
    for kv in text.split_whitespace() {
        match kv.split_once('=')? {
            ("format", "1") => {}
            ("partitions", v) => parts = v.parse().ok(),
            ("streams", v) => streams = v.parse().ok(),
            _ => return None,
        }
    }
    Some((parts?, streams?))
}

struct Opened {
    client: async_nats::Client,
    js: jetstream::Context,
    streams: Vec<jetstream::stream::Stream>,
    snapshots: jetstream::object_store::ObjectStore,
    partitioning: Partitioning,
    nodes_kv: jetstream::kv::Store,
    leases_kv: jetstream::kv::Store,
}

/// A bucket whose keys lapse `ttl` after their last write.
async fn lapsing_bucket(
    js: &jetstream::Context,
    bucket: &str,
    description: &str,
    ttl: Duration,
    replicas: usize,
) -> Result<jetstream::kv::Store, String> {
    use jetstream::{kv, stream};
    match js.get_key_value(bucket).await {
        Ok(kv) => Ok(kv),
        Err(_) => js
            .create_key_value(kv::Config {
                bucket: bucket.into(),
                description: description.into(),
                history: 1,
                max_age: ttl,
                num_replicas: replicas,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("cannot create the bucket {bucket}: {e}")),
    }
}

/// Connects and makes sure the buckets and streams exist, agreeing on the
/// layout with the data already there.
async fn open_async(settings: &ClusterSettings) -> Result<Opened, String> {
    use jetstream::{kv, object_store, stream};
    let client = connect(settings).await?;
    let mut js = jetstream::new(client.clone());
    js.set_timeout(REQUEST_TIMEOUT);
    let replicas = settings.replicas;
    let meta = match js.get_key_value(META_BUCKET).await {
        Ok(kv) => kv,
        Err(_) => js
            .create_key_value(kv::Config {
                bucket: META_BUCKET.into(),
                description: "wnsgate: the layout of the durable state".into(),
                history: 1,
                num_replicas: replicas,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("cannot create the bucket {META_BUCKET}: {e}"))?,
    };
    let wanted = settings.partitions.unwrap_or_default();
    let streams_wanted = settings.stream_count;
    let (partitioning, stream_count) = match meta
        .get(LAYOUT_KEY)
        .await
        .map_err(|e| format!("cannot read {META_BUCKET}/{LAYOUT_KEY}: {e}"))?
    {
        Some(v) => {
            let text = String::from_utf8_lossy(&v).into_owned();
            let (p, s) = parse_layout(&text).ok_or_else(|| {
                format!("{META_BUCKET}/{LAYOUT_KEY} is {text:?}: not a layout this build reads")
            })?;
            let p = Partitioning::new(p).map_err(|e| format!("{META_BUCKET}/{LAYOUT_KEY}: {e}"))?;
            if settings.partitions.is_some_and(|w| w != p) {
                return Err(format!(
                    "cluster.partitions is {}, but the cluster's data has {} partitions",
                    wanted.count(),
                    p.count()
                ));
            }
            if s != streams_wanted {
                return Err(format!(
                    "cluster.stream_count is {streams_wanted}, but the cluster's data uses {s} streams"
                ));
            }
            (p, s)
        }
        None => {
            let text = layout_text(wanted, streams_wanted);
            match meta.create(LAYOUT_KEY, Bytes::from(text)).await {
                Ok(_) => (wanted, streams_wanted),
                // Another node created it first: read it again next time.
                Err(e) => return Err(format!("cannot record the layout: {e}")),
            }
        }
    };
    let mut streams = Vec::with_capacity(usize::from(stream_count));
    for i in 0..stream_count {
        let config = stream::Config {
            name: format!("{STREAM_PREFIX}{i}"),
            description: Some("wnsgate: partition logs".into()),
            subjects: vec![format!("wnsgate.log.{i}.*")],
            storage: stream::StorageType::File,
            num_replicas: replicas,
            duplicate_window: DUPLICATE_WINDOW,
            allow_direct: true,
            ..Default::default()
        };
        let s = js
            .get_or_create_stream(config)
            .await
            .map_err(|e| format!("cannot create the stream {STREAM_PREFIX}{i}: {e}"))?;
        streams.push(s);
    }
    let snapshots = match js.get_object_store(SNAPSHOT_BUCKET).await {
        Ok(s) => s,
        Err(_) => js
            .create_object_store(object_store::Config {
                bucket: SNAPSHOT_BUCKET.into(),
                description: Some("wnsgate: one snapshot per partition".into()),
                num_replicas: replicas,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("cannot create the object store {SNAPSHOT_BUCKET}: {e}"))?,
    };
    let nodes_kv = lapsing_bucket(
        &js,
        leases::NODES_BUCKET,
        "wnsgate: live nodes and their API addresses",
        settings.lease_ttl,
        replicas,
    )
    .await?;
    let leases_kv = lapsing_bucket(
        &js,
        leases::LEASES_BUCKET,
        "wnsgate: which node serves which partition",
        settings.lease_ttl,
        replicas,
    )
    .await?;
    Ok(Opened {
        client,
        js,
        streams,
        snapshots,
        partitioning,
        nodes_kv,
        leases_kv,
    })
}

impl JetStreamStore {
    /// Connects to NATS, waiting up to [`OPEN_DEADLINE`] for it and for
    /// JetStream to be ready (a cluster that is starting, or electing its
    /// leader), and sets up the streams and buckets.
    pub fn open(
        settings: &ClusterSettings,
        advertise_url: &str,
        snapshot_log_bytes: u64,
    ) -> Result<JetStreamStore, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("wnsgate-nats")
            .enable_all()
            .build()
            .map_err(|e| io("cannot start the NATS client's threads", e))?;
        let deadline = crate::clock::instant() + OPEN_DEADLINE;
        let opened = runtime.block_on(async {
            loop {
                match open_async(settings).await {
                    Ok(o) => return Ok(o),
                    Err(e) if crate::clock::instant() < deadline && !e.starts_with("cluster.") => {
                        tracing::warn!(error = %e, "NATS JetStream is not ready; trying again");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        });
        let o = opened.map_err(StoreError::Io)?;
        let jobs = runtime
            .block_on(super::jobs::KvJobBook::open(
                &o.js,
                o.snapshots.clone(),
                settings.replicas,
                runtime.handle().clone(),
            ))
            .map_err(StoreError::Io)?;
        let n = usize::from(o.partitioning.count());
        let instance = format!(
            "{}.{:016x}",
            settings.node_id,
            crate::clock::random::<u64>()
        );
        let inner = Arc::new(Inner {
            handle: runtime.handle().clone(),
            client: o.client,
            js: o.js,
            stream_count: o.streams.len() as u16,
            streams: o.streams,
            snapshots: o.snapshots,
            partitioning: o.partitioning,
            instance,
            last_seq: (0..n).map(|_| AtomicU64::new(0)).collect(),
            snapshot_seq: (0..n).map(|_| AtomicU64::new(0)).collect(),
            state: (0..n).map(|_| AtomicU8::new(OPEN)).collect(),
            job_parts: Mutex::new(HashMap::new()),
            loaded_jobs: Mutex::new(Some(HashMap::new())),
            source: OnceLock::new(),
            snapshot_log_bytes,
            log_bytes: AtomicU64::new(0),
            cut_at_bytes: AtomicU64::new(0),
            snapshot_bytes: AtomicU64::new(0),
            loaded: AtomicBool::new(false),
            node_id: settings.node_id.clone(),
            advertise_url: advertise_url.to_owned(),
            lease_ttl: settings.lease_ttl,
            nodes_kv: o.nodes_kv,
            leases_kv: o.leases_kv,
            served: (0..n).map(|_| AtomicBool::new(false)).collect(),
            ownership: AtomicU64::new(0),
            held: Mutex::new(HashMap::new()),
            live: RwLock::new(HashMap::new()),
            valid_until: AtomicU64::new(0),
            epoch: crate::clock::instant(),
            apply_lock: Mutex::new(()),
            host: OnceLock::new(),
            cutting: Mutex::new(()),
            stop: Mutex::new(false),
            wake: Condvar::new(),
            wake_leases: Condvar::new(),
        });
        metrics::gauge!(METRIC_WRITABLE).set(1.0);
        let _ = metrics::histogram!(METRIC_APPEND_SECONDS);
        let _ = metrics::histogram!(METRIC_SNAPSHOT_SECONDS);
        tracing::info!(
            nats = %settings.nats_urls.join(","),
            partitions = inner.partitioning.count(),
            streams = inner.stream_count,
            node = %settings.node_id,
            "connected to NATS JetStream"
        );
        Ok(JetStreamStore {
            inner,
            jobs: Arc::new(jobs),
            runtime: Some(runtime),
            thread: Mutex::new(None),
            lease_thread: Mutex::new(None),
        })
    }

    /// Partitions this node no longer writes because another writer
    /// appended to them (for tests and tools).
    pub fn fenced_partitions(&self) -> Vec<u16> {
        self.inner.in_state(FENCED)
    }

    /// Loads partition `part` into `into` and serves it without taking
    /// its lease: what a node whose view of the leases is wrong would do.
    /// Only for tests of the fencing JetStream does below the leases.
    #[doc(hidden)]
    pub fn serve_without_lease(&self, part: u16, into: &dyn Restore) -> Result<(), StoreError> {
        let mut jobs = HashMap::new();
        let data = self
            .inner
            .handle
            .block_on(self.inner.fetch_partition(part))?;
        self.inner.take(part, data, into, &mut jobs).map(|_| ())
    }
}

impl Inner {
    fn in_state(&self, want: u8) -> Vec<u16> {
        self.state
            .iter()
            .enumerate()
            .filter(|(_, s)| s.load(Ordering::Relaxed) == want)
            .map(|(p, _)| p as u16)
            .collect()
    }

    fn stream_of(&self, part: u16) -> &jetstream::stream::Stream {
        &self.streams[usize::from(part % self.stream_count)]
    }

    /// The subject's last message: its sequence and message id (0 and
    /// `None` when the subject has none).
    async fn last_message(&self, part: u16) -> Result<(u64, Option<String>), String> {
        let subject = subject(self.stream_count, part);
        match self
            .stream_of(part)
            .direct_get_last_for_subject(subject)
            .await
        {
            Ok(m) => Ok((
                m.sequence,
                m.headers
                    .get(async_nats::header::NATS_MESSAGE_ID)
                    .map(|v| v.as_str().to_owned()),
            )),
            Err(e) if matches!(e.kind(), jetstream::stream::DirectGetErrorKind::NotFound) => {
                Ok((0, None))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Appends `payloads` to partition `part`, in order; returns the
    /// sequence of the last.
    async fn append(&self, part: u16, payloads: Vec<Bytes>) -> Result<u64, AppendFailure> {
        let subject = subject(self.stream_count, part);
        let mut last = self.last_seq[usize::from(part)].load(Ordering::Relaxed);
        for payload in payloads {
            let msg_id = format!("{}.{part}.{last}", self.instance);
            let deadline = crate::clock::instant() + APPEND_DEADLINE;
            last = loop {
                let publish = PublishMessage::build()
                    .payload(payload.clone())
                    .message_id(&msg_id)
                    .expected_last_subject_sequence(last);
                let outcome = match self.js.send_publish(subject.clone(), publish).await {
                    Ok(ack) => ack.await,
                    Err(e) => Err(e),
                };
                let why = match outcome {
                    Ok(ack) => break ack.sequence,
                    Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                        // Ours, if an earlier copy of this append got in
                        // without its answer reaching us.
                        match self.last_message(part).await {
                            Ok((seq, Some(id))) if id == msg_id => break seq,
                            Ok(_) => return Err(AppendFailure::Fenced),
                            Err(e) => e,
                        }
                    }
                    Err(e) if matches!(e.kind(), PublishErrorKind::MaxPayloadExceeded) => {
                        return Err(AppendFailure::Refused(e.to_string()))
                    }
                    Err(e) => e.to_string(),
                };
                if crate::clock::instant() >= deadline {
                    return Err(AppendFailure::Unanswered(why));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
        }
        Ok(last)
    }

    /// Connected to NATS, no partition fenced or in doubt, and the leases
    /// this node holds still stand (a node whose renewals failed for most
    /// of `cluster.lease_ttl` serves nothing, and says so on `/readyz`).
    fn writable(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
            && self.state.iter().all(|s| s.load(Ordering::Relaxed) == OPEN)
            && (self.held.lock().is_empty()
                || self.now_ns() < self.valid_until.load(Ordering::Acquire))
    }

    /// Clears partitions whose unanswered append turned out never to have
    /// arrived.
    fn settle_uncertain(&self) {
        for part in self.in_state(UNCERTAIN) {
            let expected = self.last_seq[usize::from(part)].load(Ordering::Relaxed);
            match self.handle.block_on(self.last_message(part)) {
                Ok((seq, _)) if seq == expected => {
                    self.state[usize::from(part)].store(OPEN, Ordering::Relaxed);
                    tracing::info!(
                        partition = part,
                        "an unanswered append never arrived; the partition takes writes again"
                    );
                }
                Ok((seq, _)) => {
                    self.state[usize::from(part)].store(FENCED, Ordering::Relaxed);
                    tracing::error!(
                        partition = part,
                        expected,
                        found = seq,
                        "the partition's log moved past what this node holds; it takes no writes here until a restart loads it"
                    );
                }
                Err(_) => {}
            }
        }
        metrics::gauge!(METRIC_WRITABLE).set(if self.writable() { 1.0 } else { 0.0 });
    }

    /// Cuts a snapshot of every partition written since its last one.
    fn cut(&self, source: &Sources) -> Result<crate::store::snapshot::Written, StoreError> {
        let _one = self.cutting.lock();
        let started = crate::clock::instant();
        let replay: Vec<u64> = self
            .last_seq
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .collect();
        self.cut_at_bytes
            .store(self.log_bytes.load(Ordering::Relaxed), Ordering::Relaxed);
        let Some(job_source) = source.jobs.upgrade() else {
            return Err(StoreError::Io(
                "the refresh queue is gone (shutting down): no snapshot is cut".into(),
            ));
        };
        let mut jobs: HashMap<u16, Vec<(u64, Vec<u8>)>> = HashMap::new();
        job_source.jobs(&mut |job| {
            let part = self.partitioning.of(job.device_id.as_str());
            jobs.entry(part)
                .or_default()
                .push((job.id, job_codec::encode(job)));
        });
        let count = self.partitioning.count();
        let mut written = crate::store::snapshot::Written::default();
        let mut records = Vec::new();
        for part in 0..count {
            let p = usize::from(part);
            if self.state[p].load(Ordering::Relaxed) != OPEN
                || !self.served[p].load(Ordering::Acquire)
                || replay[p] == 0
                || replay[p] == self.snapshot_seq[p].load(Ordering::Relaxed)
            {
                continue;
            }
            records.clear();
            let n = source.devices.encoded_partition(part, &mut records);
            let dictionary = source.devices.dictionary();
            let part_jobs = jobs.remove(&part).unwrap_or_default();
            let object =
                psnap::encode(count, part, replay[p], &dictionary, &records, n, &part_jobs);
            let bytes = object.len() as u64;
            self.handle
                .block_on(async {
                    self.snapshots
                        .put(object_name(part).as_str(), &mut object.as_slice())
                        .await
                        .map_err(|e| e.to_string())?;
                    self.stream_of(part)
                        .purge()
                        .filter(subject(self.stream_count, part))
                        .sequence(replay[p])
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>(())
                })
                .map_err(|e| io(&format!("cutting the snapshot of partition {part}"), e))?;
            self.snapshot_seq[p].store(replay[p], Ordering::Relaxed);
            written.records += n;
            written.jobs += part_jobs.len() as u64;
            written.bytes += bytes;
        }
        self.snapshot_bytes
            .fetch_max(written.bytes, Ordering::Relaxed);
        let elapsed = started.elapsed();
        metrics::histogram!(METRIC_SNAPSHOT_SECONDS).record(elapsed.as_secs_f64());
        metrics::gauge!(METRIC_SNAPSHOT_BYTES).set(written.bytes as f64);
        tracing::info!(
            devices = written.records,
            jobs = written.jobs,
            bytes = written.bytes,
            seconds = elapsed.as_secs_f64(),
            "snapshot cut to JetStream"
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
                .snapshot_log_bytes
                .max(self.snapshot_bytes.load(Ordering::Relaxed) / 4)
    }

    fn run(&self) {
        let mut next_cut = crate::clock::instant();
        loop {
            {
                let mut stop = self.stop.lock();
                if !*stop {
                    self.wake.wait_for(&mut stop, CHECK_EVERY);
                }
                if *stop {
                    return;
                }
            }
            self.settle_uncertain();
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

    /// The lease thread: a round every third of the lease time.
    fn run_leases(&self) {
        let every = self.lease_ttl / 3;
        let mut wait = every;
        loop {
            {
                let mut stop = self.stop.lock();
                if !*stop {
                    self.wake_leases.wait_for(&mut stop, wait);
                }
                if *stop {
                    return;
                }
            }
            wait = match self.round(None) {
                Ok(()) => every,
                Err(e) => {
                    tracing::warn!(error = %e, "a lease round failed; trying again shortly");
                    every.min(Duration::from_millis(250))
                }
            };
        }
    }

    /// Reads partition `part` as the cluster holds it: its snapshot, and
    /// the log after it.
    async fn fetch_partition(&self, part: u16) -> Result<PartitionData, StoreError> {
        use jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
        use tokio::io::AsyncReadExt;
        let name = format!("{SNAPSHOT_BUCKET}/{}", object_name(part));
        let mut data = PartitionData::default();
        let bytes = match self.snapshots.get(object_name(part)).await {
            Ok(mut object) => {
                let mut bytes = Vec::new();
                object
                    .read_to_end(&mut bytes)
                    .await
                    .map_err(|e| io(&format!("reading {name}"), e))?;
                Some(bytes)
            }
            Err(e) if e.kind() == jetstream::object_store::GetErrorKind::NotFound => None,
            Err(e) => return Err(io(&format!("reading {name}"), e)),
        };
        if let Some(bytes) = bytes {
            let damaged = |why: String| StoreError::Damaged {
                file: name.clone(),
                offset: 0,
                why,
            };
            let snap = psnap::decode(&bytes).map_err(damaged)?;
            let count = self.partitioning.count();
            if snap.partitions != count || snap.partition != part {
                return Err(damaged(format!(
                    "it holds partition {} of {}, not {part} of {count}",
                    snap.partition, snap.partitions
                )));
            }
            // The snapshot may come from another node, whose dictionary
            // numbers strings its own way: its records are read with a
            // codec of their own and handed over as records.
            let codec = crate::registry::record::RecordCodec::new();
            codec.seed(&snap.dictionary).map_err(damaged)?;
            let list = crate::store::snapshot::split_records(snap.records, snap.record_count)
                .ok_or_else(|| damaged("the record lengths do not add up".into()))?;
            data.records.reserve(list.len());
            for bytes in list {
                let rec = codec
                    .restore(bytes)
                    .and_then(|r| codec.decode(&r.rec))
                    .ok_or_else(|| damaged("a record does not check out".into()))?;
                data.records.push(rec);
            }
            for (id, value) in &snap.jobs {
                data.jobs
                    .insert(*id, job_codec::decode(&id.to_be_bytes(), value)?);
            }
            data.snapshot_seq = snap.replay_from;
            data.snapshot_bytes = bytes.len() as u64;
        }
        let (last, _) = self
            .last_message(part)
            .await
            .map_err(|e| io(&format!("reading the log of partition {part}"), e))?;
        data.last_seq = last.max(data.snapshot_seq);
        let from = data.snapshot_seq.max(1);
        if last < from {
            return Ok(data);
        }
        let stream = self.stream_of(part);
        let what = format!("reading the log of partition {part}");
        let mut ordered = stream
            .create_consumer(OrderedConfig {
                filter_subject: subject(self.stream_count, part),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| io(&what, e))?
            .messages()
            .await
            .map_err(|e| io(&what, e))?;
        loop {
            let msg = tokio::time::timeout(REQUEST_TIMEOUT * 2, ordered.next())
                .await
                .map_err(|_| io(&what, "no message came"))?
                .ok_or_else(|| io(&what, "it ended early"))?
                .map_err(|e| io(&what, e))?;
            let seq = msg.info().map_err(|e| io(&what, e))?.stream_sequence;
            let batch = batch_codec::decode(&msg.payload).map_err(|e| StoreError::Damaged {
                file: subject(self.stream_count, part),
                offset: seq,
                why: format!("message {seq} does not decode: {e}"),
            })?;
            data.tail_messages += 1;
            data.tail_bytes += msg.payload.len() as u64;
            for m in batch {
                match m {
                    Mutation::PutJob(job) => {
                        data.jobs.insert(job.id, job);
                    }
                    Mutation::DeleteJob(id) => {
                        data.jobs.remove(&id);
                    }
                    Mutation::Guard { .. } => {}
                    m @ (Mutation::Put(_) | Mutation::Delete(_)) => data.tail.push(m),
                }
            }
            if seq >= last {
                return Ok(data);
            }
        }
    }

    /// Starts serving partition `part`, whose lease this node holds now:
    /// loads it into `into` (the registry) and keeps its jobs for the
    /// refresh queue (`jobs`).
    fn take(
        &self,
        part: u16,
        data: PartitionData,
        into: &dyn Restore,
        jobs: &mut HashMap<u64, Job>,
    ) -> Result<(u64, u64, u64), StoreError> {
        let p = usize::from(part);
        for rec in &data.records {
            into.put(rec);
        }
        for m in &data.tail {
            match m {
                Mutation::Put(rec) => into.put(rec),
                Mutation::Delete(id) => into.delete(id),
                _ => {}
            }
        }
        {
            let mut job_parts = self.job_parts.lock();
            for id in data.jobs.keys() {
                job_parts.insert(*id, part);
            }
        }
        let counts = (
            data.records.len() as u64,
            data.tail_messages,
            data.tail.len() as u64,
        );
        jobs.extend(data.jobs);
        self.snapshot_seq[p].store(data.snapshot_seq, Ordering::Relaxed);
        self.last_seq[p].store(data.last_seq, Ordering::Relaxed);
        self.state[p].store(OPEN, Ordering::Relaxed);
        self.snapshot_bytes
            .fetch_add(data.snapshot_bytes, Ordering::Relaxed);
        self.log_bytes.fetch_add(data.tail_bytes, Ordering::Relaxed);
        self.served[p].store(true, Ordering::Release);
        self.ownership.fetch_add(1, Ordering::AcqRel);
        Ok(counts)
    }

    /// Stops serving partition `part`: no new append starts, the one in
    /// flight ends, and its devices and jobs leave memory.
    fn leave(&self, part: u16) {
        let p = usize::from(part);
        self.served[p].store(false, Ordering::Release);
        self.ownership.fetch_add(1, Ordering::AcqRel);
        // An append of the partition still in flight ends first.
        drop(self.apply_lock.lock());
        // A fenced or doubtful partition that left is no concern of this
        // node's any more: taken again, it is loaded afresh.
        self.state[p].store(OPEN, Ordering::Relaxed);
        if let Some(host) = self.host.get().and_then(|h| h.upgrade()) {
            host.drop_partition(part);
        }
        let mut job_parts = self.job_parts.lock();
        job_parts.retain(|_, q| *q != part);
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// One round of heartbeats and leases (see [`leases`]). At start,
    /// `initial` is where the partitions taken are loaded; later they go to
    /// the attached host.
    fn round(&self, initial: Option<(&dyn Restore, &mut Loaded)>) -> Result<(), String> {
        let started = self.now_ns();
        let me = self.node_id.as_str();
        let live: Result<HashMap<String, String>, String> = self.handle.block_on(async {
            self.nodes_kv
                .put(me, Bytes::from(self.advertise_url.clone()))
                .await
                .map_err(|e| format!("heartbeat: {e}"))?;
            let mut keys = self
                .nodes_kv
                .keys()
                .await
                .map_err(|e| format!("reading the live nodes: {e}"))?;
            let mut live = HashMap::new();
            while let Some(k) = keys.next().await {
                let k = k.map_err(|e| format!("reading the live nodes: {e}"))?;
                if let Ok(Some(url)) = self.nodes_kv.get(k.as_str()).await {
                    live.insert(k, String::from_utf8_lossy(&url).into_owned());
                }
            }
            Ok::<_, String>(live)
        });
        // Without a fresh view of the live nodes the leases held are still
        // renewed (they are what keeps this node serving); nothing is
        // taken or handed over on a stale view.
        let (live, fresh) = match live {
            Ok(live) => {
                *self.live.write() = live.clone();
                (live, None)
            }
            Err(e) => (self.live.read().clone(), Some(e)),
        };
        let names: Vec<&str> = live.keys().map(String::as_str).collect();
        let owner = |p: u16| leases::rendezvous(names.iter().copied(), p);
        // Renew what this node holds and should keep; let go of what
        // another live node should own.
        let held: Vec<(u16, u64)> = self.held.lock().iter().map(|(p, r)| (*p, *r)).collect();
        let (keep, give): (Vec<_>, Vec<_>) = held
            .into_iter()
            .partition(|(p, _)| fresh.is_some() || owner(*p).is_none_or(|o| o == me));
        let renewed: Vec<(u16, Result<u64, String>)> =
            self.handle
                .block_on(futures_util::future::join_all(keep.iter().map(
                    |&(p, rev)| async move {
                        let r = self
                            .leases_kv
                            .update(leases::lease_key(p), Bytes::from(me.to_owned()), rev)
                            .await
                            .map_err(|e| e.to_string());
                        (p, r)
                    },
                )));
        let mut all_renewed = true;
        for (p, r) in renewed {
            match r {
                Ok(rev) => {
                    self.held.lock().insert(p, rev);
                }
                Err(e) => {
                    all_renewed = false;
                    self.held.lock().remove(&p);
                    tracing::warn!(partition = p, error = %e, "lost the lease of a partition; it is no longer served here");
                    metrics::counter!(METRIC_OWNERSHIP_CHANGES, "change" => "lost").increment(1);
                    self.leave(p);
                }
            }
        }
        let valid = started + (self.lease_ttl.as_nanos() as u64) * 4 / 5;
        self.valid_until.store(valid, Ordering::Release);
        if !all_renewed {
            tracing::warn!("some leases were lost");
        }
        for (p, rev) in give {
            self.held.lock().remove(&p);
            self.leave(p);
            let deleted = self.handle.block_on(
                self.leases_kv
                    .delete_expect_revision(leases::lease_key(p), Some(rev)),
            );
            if let Err(e) = deleted {
                tracing::warn!(partition = p, error = %e, "could not give up a lease; it lapses on its own");
            }
            metrics::counter!(METRIC_OWNERSHIP_CHANGES, "change" => "released").increment(1);
            tracing::info!(
                partition = p,
                to = owner(p).unwrap_or(""),
                "partition handed over"
            );
        }
        if let Some(e) = fresh {
            return Err(e);
        }
        // Take what this node should own and nobody holds.
        let want: Vec<u16> = (0..self.partitioning.count())
            .filter(|&p| owner(p) == Some(me) && !self.held.lock().contains_key(&p))
            .collect();
        let created: Vec<(u16, Option<u64>)> =
            self.handle
                .block_on(futures_util::future::join_all(want.iter().map(
                    |&p| async move {
                        let key = leases::lease_key(p);
                        let r = match self
                            .leases_kv
                            .create(&key, Bytes::from(me.to_owned()))
                            .await
                        {
                            Ok(rev) => Some(rev),
                            // Held under this node's own id: an earlier run of this
                            // node that did not live to let go. Claimed at its
                            // revision, so only one claim wins.
                            Err(_) => match self.leases_kv.entry(&key).await {
                                Ok(Some(e)) if e.value.as_ref() == me.as_bytes() => self
                                    .leases_kv
                                    .update(&key, Bytes::from(me.to_owned()), e.revision)
                                    .await
                                    .ok(),
                                _ => None,
                            },
                        };
                        (p, r)
                    },
                )));
        let mut initial = initial;
        let mut taken = 0u64;
        let t = crate::clock::instant();
        let mut adopted = HashMap::new();
        let acquired: Vec<(u16, u64)> = created
            .into_iter()
            .filter_map(|(p, rev)| rev.map(|r| (p, r)))
            .collect();
        for &(p, rev) in &acquired {
            self.held.lock().insert(p, rev);
        }
        // Partitions are read from JetStream a window at a time, the
        // window's reads at once (each is a few round trips), then put in
        // memory one by one.
        let host = self.host.get().and_then(|h| h.upgrade());
        for window in acquired.chunks(TAKE_WINDOW) {
            let fetched: Vec<(u16, Result<PartitionData, StoreError>)> =
                self.handle.block_on(futures_util::future::join_all(
                    window
                        .iter()
                        .map(|&(p, _)| async move { (p, self.fetch_partition(p).await) }),
                ));
            for ((p, data), &(_, rev)) in fetched.into_iter().zip(window) {
                let result = data.and_then(|data| match initial.as_mut() {
                    Some((into, loaded)) => {
                        let r = self.take(p, data, *into, &mut adopted);
                        if let Ok((records, batches, mutations)) = r {
                            loaded.snapshot_records += records;
                            loaded.replayed_batches += batches;
                            loaded.replayed_mutations += mutations;
                        }
                        r
                    }
                    None => match &host {
                        Some(host) => self.take(p, data, host.as_restore(), &mut adopted),
                        None => Err(StoreError::Io("the registry is not attached yet".into())),
                    },
                });
                match result {
                    Ok(_) => {
                        taken += 1;
                        metrics::counter!(METRIC_OWNERSHIP_CHANGES, "change" => "taken")
                            .increment(1);
                    }
                    Err(e) => {
                        tracing::error!(partition = p, error = %e, "cannot load a partition; its lease is given up");
                        self.held.lock().remove(&p);
                        self.leave(p);
                        let _ = self.handle.block_on(
                            self.leases_kv
                                .delete_expect_revision(leases::lease_key(p), Some(rev)),
                        );
                    }
                }
            }
        }
        if taken > 0 {
            match initial {
                Some(_) => {
                    let mut jobs = self.loaded_jobs.lock();
                    jobs.get_or_insert_with(HashMap::new).extend(adopted);
                }
                None => {
                    if let Some(host) = self.host.get().and_then(|h| h.upgrade()) {
                        host.adopt_jobs(adopted.into_values().collect());
                    }
                }
            }
            let seconds = t.elapsed().as_secs_f64();
            metrics::histogram!(METRIC_TAKEOVER_SECONDS).record(seconds);
            tracing::info!(partitions = taken, seconds, "took partitions over");
        }
        metrics::gauge!(METRIC_PARTITIONS_OWNED).set(self.held.lock().len() as f64);
        Ok(())
    }

    /// Where partition `part` is served, as this node knows it.
    fn placement(&self, part: u16) -> crate::store::Placement {
        use crate::store::Placement;
        let p = usize::from(part);
        if self.served[p].load(Ordering::Acquire)
            && self.now_ns() < self.valid_until.load(Ordering::Acquire)
        {
            return Placement::Local;
        }
        let live = self.live.read();
        match leases::rendezvous(live.keys().map(String::as_str), part) {
            Some(node) if node != self.node_id => Placement::Remote {
                node: node.to_owned(),
                url: live[node].clone(),
            },
            _ => Placement::Unavailable,
        }
    }
}

/// The partitions this node serves, for bulk wakes' walks.
struct Ownership(Arc<Inner>);

impl crate::core::bulk::Owner for Ownership {
    fn owns(&self, part: u16) -> bool {
        self.0
            .served
            .get(usize::from(part))
            .is_some_and(|s| s.load(Ordering::Acquire))
    }

    fn epoch(&self) -> u64 {
        self.0.ownership.load(Ordering::Acquire)
    }

    fn instance(&self) -> String {
        super::jobs::key_safe(&self.0.instance)
    }
}

/// A partition as the cluster holds it.
#[derive(Default)]
struct PartitionData {
    records: Vec<crate::core::DeviceRecord>,
    /// Device mutations after the snapshot, in order.
    tail: Vec<Mutation>,
    jobs: HashMap<u64, Job>,
    snapshot_seq: u64,
    last_seq: u64,
    snapshot_bytes: u64,
    tail_messages: u64,
    tail_bytes: u64,
}

impl Store for JetStreamStore {
    fn apply(&self, batch: &[Mutation]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let inner = &*self.inner;
        let _appending = inner.apply_lock.lock();
        let started = crate::clock::instant();
        // Each partition's share, in batch order.
        let mut index: HashMap<u16, usize> = HashMap::new();
        let mut shares: Vec<(u16, Vec<Mutation>)> = Vec::new();
        {
            let mut job_parts = inner.job_parts.lock();
            for m in batch {
                let part = match m {
                    Mutation::Put(rec) => inner.partitioning.of(rec.device_id.as_str()),
                    Mutation::Delete(id) | Mutation::Guard { device_id: id, .. } => {
                        inner.partitioning.of(id.as_str())
                    }
                    Mutation::PutJob(job) => {
                        let part = inner.partitioning.of(job.device_id.as_str());
                        job_parts.insert(job.id, part);
                        part
                    }
                    // A job this store never held has nothing to delete.
                    Mutation::DeleteJob(id) => match job_parts.get(id) {
                        Some(&part) => part,
                        None => continue,
                    },
                };
                let at = *index.entry(part).or_insert_with(|| {
                    shares.push((part, Vec::new()));
                    shares.len() - 1
                });
                shares[at].1.push(m.clone());
            }
        }
        for (part, _) in &shares {
            if !inner.served[usize::from(*part)].load(Ordering::Acquire) {
                return Err(StoreError::NotOwner(format!(
                    "partition {part} is not served by this node (it moved, or is being taken over)"
                )));
            }
            match inner.state[usize::from(*part)].load(Ordering::Relaxed) {
                OPEN => {}
                FENCED => {
                    return Err(StoreError::NotOwner(format!(
                        "partition {part} is written by another node now; this node takes no writes for it"
                    )))
                }
                _ => {
                    return Err(StoreError::Io(format!(
                        "partition {part} waits to learn whether an unanswered append arrived"
                    )))
                }
            }
        }
        let mut bytes = 0u64;
        let work: Vec<(u16, Vec<Bytes>)> = shares
            .into_iter()
            .map(|(part, ms)| {
                let mut payloads = Vec::new();
                let mut chunk = Vec::new();
                let mut from = 0;
                // Split a large share so each message stays below the cap.
                while from < ms.len() {
                    let mut to = from;
                    let mut size = 0;
                    while to < ms.len() && (to == from || size < MESSAGE_BYTES / 2) {
                        size += approximate_size(&ms[to]);
                        to += 1;
                    }
                    chunk.clear();
                    batch_codec::encode_into(&ms[from..to], &mut chunk);
                    bytes += chunk.len() as u64;
                    payloads.push(Bytes::copy_from_slice(&chunk));
                    from = to;
                }
                (part, payloads)
            })
            .collect();
        let results: Vec<(u16, Result<u64, AppendFailure>)> =
            inner
                .handle
                .block_on(futures_util::future::join_all(work.into_iter().map(
                    |(part, payloads)| async move { (part, inner.append(part, payloads).await) },
                )));
        let mut failed: Vec<String> = Vec::new();
        let mut fenced = false;
        for (part, r) in results {
            let p = usize::from(part);
            match r {
                Ok(seq) => inner.last_seq[p].store(seq, Ordering::Relaxed),
                Err(AppendFailure::Fenced) => {
                    inner.state[p].store(FENCED, Ordering::Relaxed);
                    metrics::counter!(METRIC_APPEND_ERRORS, "reason" => "fenced").increment(1);
                    tracing::error!(
                        partition = part,
                        "another writer appended to this partition; this node stops writing it"
                    );
                    fenced = true;
                    failed.push(format!("partition {part} is written by another node now"));
                }
                Err(AppendFailure::Unanswered(why)) => {
                    inner.state[p].store(UNCERTAIN, Ordering::Relaxed);
                    metrics::counter!(METRIC_APPEND_ERRORS, "reason" => "unanswered").increment(1);
                    failed.push(format!(
                        "partition {part}: no answer from JetStream ({why})"
                    ));
                }
                Err(AppendFailure::Refused(why)) => {
                    metrics::counter!(METRIC_APPEND_ERRORS, "reason" => "refused").increment(1);
                    failed.push(format!("partition {part}: refused ({why})"));
                }
            }
        }
        metrics::histogram!(METRIC_APPEND_SECONDS).record(started.elapsed().as_secs_f64());
        if !failed.is_empty() {
            metrics::gauge!(METRIC_WRITABLE).set(if inner.writable() { 1.0 } else { 0.0 });
            let why = format!("JetStream append failed: {}", failed.join("; "));
            return Err(if fenced {
                StoreError::NotOwner(why)
            } else {
                StoreError::Io(why)
            });
        }
        // The committed jobs' deletes are final now.
        if batch.iter().any(|m| matches!(m, Mutation::DeleteJob(_))) {
            let mut job_parts = inner.job_parts.lock();
            for m in batch {
                if let Mutation::DeleteJob(id) = m {
                    job_parts.remove(id);
                }
            }
        }
        if batch
            .iter()
            .any(|m| matches!(m, Mutation::PutJob(_) | Mutation::DeleteJob(_)))
        {
            if let Some(jobs) = inner.loaded_jobs.lock().as_mut() {
                crate::store::apply_jobs(jobs, batch);
            }
        }
        let total = inner.log_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        metrics::gauge!(METRIC_LOG_BYTES)
            .set(total.saturating_sub(inner.cut_at_bytes.load(Ordering::Relaxed)) as f64);
        if inner.cut_due() {
            inner.wake.notify_one();
        }
        Ok(())
    }

    fn load(&self, _threads: usize, into: &dyn Restore) -> Result<Loaded, StoreError> {
        let inner = &*self.inner;
        if inner.loaded.swap(true, Ordering::Relaxed) {
            return Err(StoreError::Io("the store was loaded already".into()));
        }
        let mut loaded = Loaded::default();
        // The partitions taken at start go into the registry as records
        // (their snapshots may come from other nodes): nothing is restored
        // in the registry's own encoding.
        into.snapshot_restored();
        let t = crate::clock::instant();
        // JetStream may still be electing the leaders of the buckets'
        // streams (a NATS server that just restarted): the first round is
        // tried again until the open deadline.
        let deadline = crate::clock::instant() + OPEN_DEADLINE;
        loop {
            match inner.round(Some((into, &mut loaded))) {
                Ok(()) => break,
                Err(e) if crate::clock::instant() < deadline => {
                    tracing::warn!(error = %e, "cannot take this node's partitions yet; trying again");
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => {
                    return Err(StoreError::Io(format!(
                        "taking this node's partitions: {e}"
                    )))
                }
            }
        }
        loaded.snapshot_seconds = t.elapsed().as_secs_f64();
        let lease_inner = self.inner.clone();
        let spawned = std::thread::Builder::new()
            .name("wnsgate-leases".into())
            .spawn(move || lease_inner.run_leases());
        match spawned {
            Ok(t) => *self.lease_thread.lock() = Some(t),
            Err(e) => {
                return Err(StoreError::Io(format!(
                    "cannot start the lease thread: {e}"
                )))
            }
        }
        Ok(loaded)
    }

    fn placement(&self, part: u16) -> crate::store::Placement {
        self.inner.placement(part)
    }

    fn peers(&self) -> Vec<(String, String)> {
        let live = self.inner.live.read();
        let mut peers: Vec<(String, String)> = live
            .iter()
            .filter(|(node, _)| **node != self.inner.node_id)
            .map(|(n, u)| (n.clone(), u.clone()))
            .collect();
        peers.sort();
        peers
    }

    fn attach_host(&self, host: std::sync::Weak<dyn PartitionHost>) {
        let _ = self.inner.host.set(host);
    }

    fn job_book(
        &self,
    ) -> Option<(
        Arc<dyn crate::core::bulk::JobBook>,
        Arc<dyn crate::core::bulk::Owner>,
    )> {
        Some((self.jobs.clone(), Arc::new(Ownership(self.inner.clone()))))
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
        *self.thread.lock() = crate::store::spawn_background(
            "wnsgate-snapshot",
            "no snapshot will be cut",
            move || inner.run(),
        );
    }

    fn snapshot_now(&self) -> Result<Option<crate::store::snapshot::Written>, StoreError> {
        match self.inner.source.get() {
            Some(source) => self.inner.cut(source).map(Some),
            None => Ok(None),
        }
    }

    fn writable(&self) -> bool {
        self.inner.writable()
    }

    fn scan_jobs(&self, visit: &mut dyn FnMut(Job)) -> Result<u64, StoreError> {
        Ok(crate::store::hand_over_jobs(&self.inner.loaded_jobs, visit))
    }
}

/// About the bytes `m` encodes to, to split large shares.
fn approximate_size(m: &Mutation) -> usize {
    match m {
        Mutation::Put(rec) => 64 + rec.device_id.as_str().len() + rec.channel_uri.as_str().len(),
        Mutation::PutJob(job) => 160 + job.device_id.as_str().len(),
        _ => 80,
    }
}

impl Drop for JetStreamStore {
    fn drop(&mut self) {
        *self.inner.stop.lock() = true;
        self.inner.wake.notify_all();
        self.inner.wake_leases.notify_all();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
        if let Some(t) = self.lease_thread.lock().take() {
            let _ = t.join();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_name_their_stream_and_partition() {
        assert_eq!(subject(4, 9), "wnsgate.log.1.9");
        assert_eq!(object_name(7), "p0007");
    }

    #[test]
    fn the_layout_reads_back() {
        let p = Partitioning::new(64).unwrap();
        assert_eq!(parse_layout(&layout_text(p, 3)), Some((64, 3)));
        assert_eq!(parse_layout("format=2 partitions=64 streams=3"), None);
        assert_eq!(parse_layout("partitions=64"), None);
    }
}
