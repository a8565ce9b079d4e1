//! The wake service in-process, with paused time and a stand-in transport
//! in place of WNS: coalescing, a single wake joining a bulk claim, quiet
//! claims, abandonment, cancel, and a dead channel's mark durable before
//! its result is published. The registry, store, committer and lifecycle
//! are the real ones, on a temporary directory.

use super::limits::JOB_WAKES_INFLIGHT_MAX;
use super::transport::{Batch, Transport, WakeTarget};
use super::*;
use crate::core::wns::{Outcome, PushResult};
use crate::core::{ChannelUri, DeadReason, LifecycleState};
use crate::store::Mutation;
use crate::testing::{registration, Services};
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use parking_lot::Mutex;
use std::future::Future;
use std::pin::Pin;

/// How long the stand-in takes to answer.
const ANSWER_AFTER: Duration = Duration::from_secs(5);

/// A transport that answers every wake after [`ANSWER_AFTER`]: 410 for a
/// channel token starting `x410`, else 200 `received`. It counts what it
/// was asked to send.
#[derive(Default)]
struct StandIn {
    sent: Mutex<Vec<String>>,
}

impl StandIn {
    fn answer(&self, uri: &ChannelUri) -> impl Future<Output = WakeReport> + Send + 'static {
        self.sent.lock().push(uri.as_str().to_owned());
        let dead = uri.as_str().contains("token=x410");
        async move {
            tokio::time::sleep(ANSWER_AFTER).await;
            let at = crate::clock::now();
            if dead {
                WakeReport::answered(
                    PushResult::ChannelDead,
                    Outcome::ChannelExpired { revoked: false },
                    410,
                    Some(DeadReason::Wns410),
                    at,
                )
            } else {
                WakeReport::answered(PushResult::Delivered, Outcome::Received, 200, None, at)
            }
        }
    }

    fn sent(&self) -> usize {
        self.sent.lock().len()
    }
}

type Answer<T> = Pin<Box<dyn Future<Output = (T, WakeReport)> + Send>>;

struct StandInBatch<T> {
    transport: Arc<StandIn>,
    flying: FuturesUnordered<Answer<T>>,
}

impl Transport for StandIn {
    type Batch<T: WakeTarget> = StandInBatch<T>;

    fn send_wake(
        &self,
        _shard: usize,
        uri: &ChannelUri,
        _pfn: &str,
    ) -> impl Future<Output = WakeReport> + Send {
        self.answer(uri)
    }

    fn batch<T: WakeTarget>(self: &Arc<Self>, _shard: usize) -> StandInBatch<T> {
        StandInBatch {
            transport: self.clone(),
            flying: FuturesUnordered::new(),
        }
    }
}

impl<T: WakeTarget> Batch<T> for StandInBatch<T> {
    fn start(&mut self, target: T) -> Result<(), T> {
        let answer = self.transport.answer(target.uri());
        self.flying
            .push(Box::pin(async move { (target, answer.await) }));
        Ok(())
    }

    async fn finished(&mut self, out: &mut Vec<(T, WakeReport)>) {
        if let Some(first) = self.flying.next().await {
            out.push(first);
        }
        while let Some(Some(more)) = self.flying.next().now_or_never() {
            out.push(more);
        }
    }

    fn is_empty(&self) -> bool {
        self.flying.is_empty()
    }
}

/// A wake service over the stand-in, with the real services below it.
struct Rig {
    wakes: Arc<WakeService<StandIn>>,
    transport: Arc<StandIn>,
    registry: Arc<Registry>,
    lifecycle: Arc<Lifecycle>,
    services: Services,
}

impl Rig {
    fn new() -> Rig {
        let services = Services::new();
        let transport = Arc::new(StandIn::default());
        let wakes = Arc::new(WakeService::new(
            transport.clone(),
            services.registry.clone(),
            services.lifecycle.clone(),
            services.settings.thresholds,
            1,
        ));
        Rig {
            wakes,
            transport,
            registry: services.registry.clone(),
            lifecycle: services.lifecycle.clone(),
            services,
        }
    }

    /// Registers `id` durably with a channel token, issued now.
    async fn register(&self, id: &str, token: &str) -> DeviceRecord {
        let mut rec =
            crate::core::merge_registration(None, registration(id, token), crate::clock::now());
        rec.issued_at = crate::clock::now();
        self.services
            .commits
            .submit(vec![Mutation::Put(rec.clone())])
            .unwrap()
            .await
            .unwrap();
        rec
    }

    /// Lets every task that can run, run, without time passing.
    async fn settle_tasks() {
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_second_wake_of_a_device_joins_the_first() {
    let rig = Rig::new();
    let rec = rig.register("dev-1", "AwYAAAD1").await;
    let (first, joined_first) = rig.wakes.start_or_join(0, rec.clone());
    let (second, joined_second) = rig.wakes.start_or_join(0, rec.clone());
    assert!(!joined_first && joined_second);
    assert_eq!(first.push_id, second.push_id);
    assert_eq!(rig.wakes.inflight(), 1);
    let (a, b) = tokio::join!(first.result(), second.result());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        (a.result, b.result),
        (PushResult::Delivered, PushResult::Delivered)
    );
    assert_eq!(a.at, b.at);
    assert_eq!(rig.transport.sent(), 1, "one wake went out for both");
    // Ended: the next wake is a new one, with its own id.
    assert_eq!(rig.wakes.inflight(), 0);
    let (third, joined) = rig.wakes.start_or_join(0, rec);
    assert!(!joined);
    assert_ne!(third.push_id, first.push_id);
    // The outcome is on the device.
    let last = rig.registry.last_push("dev-1").unwrap();
    assert_eq!(last.result(), Some(PushResult::Delivered));
}

#[tokio::test(start_paused = true)]
async fn a_single_wake_joins_a_bulk_claim_and_gets_its_result() {
    let rig = Rig::new();
    let rec = rig.register("dev-1", "AwYAAAD1").await;
    rig.register("dev-2", "AwYAAAD2").await;
    let job = rig
        .wakes
        .start_job(
            0,
            Selection::Ids(vec!["dev-1".into(), "dev-2".into()]),
            None,
            false,
            0,
        )
        .await
        .unwrap();
    Rig::settle_tasks().await;
    assert_eq!(rig.wakes.inflight(), 2, "the job claimed both devices");
    let (pending, joined) = rig.wakes.start_or_join(0, rec);
    assert!(joined, "the single wake joined the job's claim");
    let report = pending.result().await.expect("the job's result");
    assert_eq!(report.result, PushResult::Delivered);
    assert_eq!(rig.transport.sent(), 2, "no second wake of dev-1");
    while !job.is_finished() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let p = job.progress();
    assert_eq!(
        (p.state, p.total, p.received, p.done),
        (JobState::Done, 2, 2, 2)
    );
}

#[tokio::test(start_paused = true)]
async fn quiet_claims_make_a_place_for_the_result_only_when_joined() {
    let rig = Rig::new();
    let rec = rig.register("dev-1", "AwYAAAD1").await;
    let pending = &rig.wakes.pending;
    // Nobody joins: the result stays with the claimant.
    let claim = pending.claim_quietly(rec.clone()).ok().unwrap();
    let report = rig.transport.answer(&rec.channel_uri).await;
    match rig.wakes.conclude(claim, report).await {
        pending::Settled::Kept(r) => assert_eq!(r.result, PushResult::Delivered),
        pending::Settled::Published(_) => panic!("published with nobody joined"),
    }
    assert_eq!(pending.len(), 0);
    // Somebody joins: the result is published where they wait.
    let claim = pending.claim_quietly(rec.clone()).ok().unwrap();
    let joiner = match pending.claim(rec.clone()) {
        pending::Claimed::Joined(p) => p,
        pending::Claimed::Mine(..) => panic!("claimed twice"),
    };
    assert!(pending.claim_quietly(rec.clone()).is_err(), "claimed twice");
    let report = rig.transport.answer(&rec.channel_uri).await;
    let settled = rig.wakes.conclude(claim, report).await;
    assert!(matches!(settled, pending::Settled::Published(_)));
    let seen = joiner.result().await.expect("published");
    assert_eq!(seen.result, settled.report().result);
}

#[tokio::test(start_paused = true)]
async fn a_claim_dropped_unsettled_is_abandoned_and_released() {
    let rig = Rig::new();
    let rec = rig.register("dev-1", "AwYAAAD1").await;
    let pending = &rig.wakes.pending;
    let (claim, mine) = match pending.claim(rec.clone()) {
        pending::Claimed::Mine(c, p) => (c, p),
        pending::Claimed::Joined(_) => panic!("nothing was pending"),
    };
    let joiner = match pending.claim(rec.clone()) {
        pending::Claimed::Joined(p) => p,
        pending::Claimed::Mine(..) => panic!("claimed twice"),
    };
    let quiet_joiner = pending.claim_quietly(rec.clone()).err().unwrap();
    drop(claim);
    assert!(mine.result().await.is_none());
    assert!(joiner.result().await.is_none());
    assert!(quiet_joiner.result().await.is_none());
    assert_eq!(pending.len(), 0);
    assert!(matches!(pending.claim(rec), pending::Claimed::Mine(..)));
    assert!(rig.registry.last_push("dev-1").is_none(), "no outcome kept");
}

#[tokio::test(start_paused = true)]
async fn a_wake_task_dropped_mid_flight_abandons_its_wake() {
    let rig = Rig::new();
    let rec = rig.register("dev-1", "AwYAAAD1").await;
    let wakes = rig.wakes.clone();
    // The wake starts on a runtime of its own (a shard's), which goes away
    // (the shard ending) before WNS answered.
    let pending = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let pending = rt.block_on(async move {
            let (pending, _) = wakes.start_or_join(0, rec);
            tokio::task::yield_now().await;
            assert_eq!(wakes.inflight(), 1);
            pending
        });
        drop(rt);
        pending
    })
    .join()
    .unwrap();
    assert!(pending.result().await.is_none());
    assert_eq!(rig.wakes.inflight(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_bulk_wake_stops_sending_and_counts_the_rest_not_sent() {
    let rig = Rig::new();
    let mut ids = Vec::new();
    for i in 0..50 {
        let id = format!("dev-{i}");
        rig.register(&id, &format!("AwYAAAD{i}")).await;
        ids.push(id);
    }
    // One wake a second.
    let job = rig
        .wakes
        .start_job(0, Selection::Ids(ids), Some(1), false, 0)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    job.cancel();
    assert_eq!(job.progress().state, JobState::Cancelling);
    while !job.is_finished() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let p = job.progress();
    let sent = rig.transport.sent() as u64;
    assert!(sent < 50, "sent {sent} of 50 after the cancel");
    assert_eq!(p.state, JobState::Cancelled);
    assert_eq!(p.received, sent, "the wakes in flight finished");
    assert_eq!(p.not_sent, 50 - sent);
    assert_eq!((p.total, p.done, p.pending), (50, 50, 0));
    // Cancelling a finished job changes nothing.
    job.cancel();
    assert_eq!(job.progress().state, JobState::Cancelled);
}

#[tokio::test(start_paused = true)]
async fn a_dead_channel_is_marked_durably_before_its_result_is_published() {
    let rig = Rig::new();
    let rec = rig.register("dev-1", "x410dead").await;
    let (pending, _) = rig.wakes.start_or_join(0, rec.clone());
    let report = pending.result().await.expect("a result");
    assert_eq!(report.result, PushResult::ChannelDead);
    // Published, so the mark and the refresh job are already there.
    let now = crate::clock::now();
    let stored = rig.registry.get("dev-1").unwrap();
    let th = rig.services.settings.thresholds;
    assert_eq!(
        stored.state_at(&th, now).state,
        LifecycleState::RefreshPending
    );
    assert!(stored.dead.is_some(), "dead mark kept");
    assert!(rig.lifecycle.job_of("dev-1").is_some(), "refresh job open");

    // The same for a bulk wake: when its progress counts the device as
    // expired, the mark is there.
    let rec2 = rig.register("dev-2", "x410dead2").await;
    let job = rig
        .wakes
        .start_job(
            0,
            Selection::Ids(vec![rec2.device_id.as_str().to_owned()]),
            None,
            false,
            0,
        )
        .await
        .unwrap();
    loop {
        let p = job.progress();
        if p.expired == 1 {
            let stored = rig.registry.get("dev-2").unwrap();
            assert!(stored.dead.is_some() && stored.refresh.is_some());
            assert!(rig.lifecycle.job_of("dev-2").is_some());
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn finished(job: &Job) -> Progress {
    while !job.is_finished() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    job.progress()
}

#[tokio::test(start_paused = true)]
async fn a_bulk_wake_skips_channels_wns_declared_dead_unless_asked_and_keeps_its_failures() {
    let rig = Rig::new();
    rig.register("dev-live", "AwYAAAD1").await;
    let dead = rig.register("dev-dead", "x410dead").await;
    // WNS answers 410 once: the channel is marked dead.
    let (pending, _) = rig.wakes.start_or_join(0, dead);
    assert_eq!(
        pending.result().await.expect("a result").result,
        PushResult::ChannelDead
    );
    assert_eq!(rig.transport.sent(), 1);
    let ids = || {
        Selection::Ids(vec![
            "dev-live".into(),
            "dev-dead".into(),
            "dev-nope".into(),
        ])
    };

    // By default the dead channel is not sent to again.
    let job = rig.wakes.start_job(0, ids(), None, false, 0).await.unwrap();
    assert_eq!(job.expected_total(), 3);
    let p = finished(&job).await;
    assert_eq!(rig.transport.sent(), 2, "only dev-live was sent");
    assert_eq!(
        (
            p.total,
            p.received,
            p.skipped_dead,
            p.failed,
            p.expired,
            p.done
        ),
        (3, 1, 1, 1, 0, 3)
    );
    let (page, kept, not_kept) = job.failures(0, 10);
    assert_eq!((kept, not_kept), (1, 0));
    assert_eq!(page[0].device_id, "dev-nope");
    assert_eq!(page[0].result, "not_registered");

    // Asked to, it is sent again, and its failure says what WNS answered.
    let job = rig.wakes.start_job(0, ids(), None, true, 0).await.unwrap();
    let p = finished(&job).await;
    assert_eq!(rig.transport.sent(), 4, "dev-live and dev-dead were sent");
    assert_eq!(
        (p.received, p.skipped_dead, p.failed, p.expired, p.done),
        (1, 0, 1, 1, 3)
    );
    let (page, kept, _) = job.failures(0, 10);
    assert_eq!(kept, 2);
    let dead = page.iter().find(|f| f.device_id == "dev-dead").unwrap();
    assert_eq!(
        (dead.result, dead.wns_outcome, dead.status),
        ("channel_dead", Some("channel_expired"), Some(410))
    );
    // Pages: from a position, at most a limit.
    let (rest, _, _) = job.failures(1, 10);
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].device_id, page[1].device_id);
    assert!(job.failures(2, 10).0.is_empty());
}

#[tokio::test(start_paused = true)]
async fn drain_ends_when_the_last_wake_in_flight_ends() {
    let rig = Rig::new();
    let rec = rig.register("dev-1", "AwYAAAD1").await;
    let (pending, _) = rig.wakes.start_or_join(0, rec);
    assert!(!rig.wakes.drain(ANSWER_AFTER / 2).await, "still in flight");
    assert!(rig.wakes.drain(ANSWER_AFTER).await);
    assert!(pending.result().await.is_some());
}

/// Bulk wakes kept in memory, as a backend keeps them durably; `shared`
/// as in cluster mode.
#[derive(Default)]
struct MemBook {
    shared: bool,
    jobs: Mutex<std::collections::BTreeMap<String, (StoredJob, Vec<String>)>>,
}

use crate::core::bulk::{BookError, Checkpoint as Cp, JobBook, JobDef, StoredJob};

impl MemBook {
    /// Job `id`'s walk `walk`'s last checkpoint.
    fn walk(&self, id: &str, walk: &str) -> Option<Cp> {
        let jobs = self.jobs.lock();
        let (job, _) = jobs.get(id)?;
        job.walks
            .iter()
            .find(|(w, _)| w == walk)
            .map(|(_, c)| c.clone())
    }
}

impl JobBook for MemBook {
    fn create(&self, def: &JobDef, ids: &[String]) -> Result<(), BookError> {
        let job = StoredJob {
            def: def.clone(),
            cancelled: false,
            walks: Vec::new(),
        };
        self.jobs.lock().insert(def.id.clone(), (job, ids.to_vec()));
        Ok(())
    }

    fn checkpoint(&self, id: &str, walk: &str, checkpoint: &Cp) -> Result<(), BookError> {
        let mut jobs = self.jobs.lock();
        let (job, _) = jobs
            .get_mut(id)
            .ok_or_else(|| BookError(format!("no job {id}")))?;
        job.walks.retain(|(w, _)| w != walk);
        job.walks.push((walk.to_owned(), checkpoint.clone()));
        job.cancelled |= checkpoint.cancelled;
        Ok(())
    }

    fn load(&self) -> Result<Vec<StoredJob>, BookError> {
        Ok(self.jobs.lock().values().map(|(j, _)| j.clone()).collect())
    }

    fn ids(&self, id: &str) -> Result<Vec<String>, BookError> {
        Ok(self
            .jobs
            .lock()
            .get(id)
            .map(|(_, ids)| ids.clone())
            .unwrap_or_default())
    }

    fn cancel(&self, id: &str) -> Result<(), BookError> {
        if let Some((job, _)) = self.jobs.lock().get_mut(id) {
            job.cancelled = true;
        }
        Ok(())
    }

    fn forget(&self, id: &str) -> Result<(), BookError> {
        self.jobs.lock().remove(id);
        Ok(())
    }

    fn shared(&self) -> bool {
        self.shared
    }
}

fn attached(book: &Arc<MemBook>, owner: Option<Arc<dyn crate::core::bulk::Owner>>) -> Attached {
    Attached {
        book: book.clone(),
        every: Duration::from_secs(1),
        owner,
    }
}

/// Starts a bulk wake of `selection` at 400 wakes a second with `book`
/// attached, stops it with the gateway after 4 s, and resumes it in a
/// new wake service over the same registry and transport. Returns the
/// checkpoint it stopped at, the resumed job, and the wakes sent to each
/// channel token.
async fn stop_and_resume(
    rig: &Rig,
    selection: Selection,
) -> (
    crate::core::bulk::Checkpoint,
    Arc<Job>,
    std::collections::HashMap<String, usize>,
) {
    let book = Arc::new(MemBook::default());
    rig.wakes.attach_book(attached(&book, None));
    let job = rig
        .wakes
        .start_job(0, selection, Some(400), false, 0)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    rig.wakes.stop_jobs();
    while !job.is_finished() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Its last checkpoint is written off the runtime.
    let stopped = loop {
        let cp = book.walk(job.id(), "main");
        if let Some(cp) = cp.filter(|c| !c.done.is_empty() || c.at.is_some()) {
            if *job.written_final.lock() {
                break cp;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let again = Arc::new(WakeService::new(
        rig.transport.clone(),
        rig.registry.clone(),
        rig.lifecycle.clone(),
        rig.services.settings.thresholds,
        1,
    ));
    again.attach_book(attached(&book, None));
    assert_eq!(again.restore_jobs(&Handle::current()).unwrap(), 1);
    let resumed = again.job(job.id()).expect("the job is known again");
    while !resumed.is_finished() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while !book.walk(job.id(), "main").is_some_and(|c| c.finished) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut sends = std::collections::HashMap::new();
    for uri in rig.transport.sent.lock().iter() {
        let token = uri.rsplit("token=").next().unwrap_or_default().to_owned();
        *sends.entry(token).or_insert(0) += 1;
    }
    (stopped, resumed, sends)
}

#[tokio::test(start_paused = true)]
async fn a_bulk_wake_stopped_with_the_gateway_goes_on_from_its_checkpoint() {
    let rig = Rig::new();
    const N: usize = 3000;
    for i in 0..N {
        rig.register(&format!("dev-{i}"), &format!("AwYAAAD{i}"))
            .await;
    }
    let (stopped, job, sends) = stop_and_resume(&rig, Selection::Filter(None)).await;
    // The checkpoint counts exactly the devices before its position.
    assert!(!stopped.finished && !stopped.cancelled);
    assert_eq!(stopped.counts.done(), stopped.selected);
    assert!(
        stopped.selected > 0 && (stopped.selected as usize) < N,
        "{stopped:?}"
    );
    // Every device woken at least once and at most twice; the resumed job
    // counts each once.
    assert_eq!(sends.len(), N, "every device was woken");
    let twice = sends.values().filter(|&&n| n == 2).count();
    assert!(sends.values().all(|&n| (1..=2).contains(&n)));
    let p = job.progress();
    assert_eq!(p.state, JobState::Done);
    assert_eq!(
        (p.total, p.received, p.done),
        (N as u64, N as u64, N as u64)
    );
    // At 400 a second, the wakes after the position were at most the ones
    // in flight or not yet checkpointed: a few seconds' worth.
    assert!(
        twice <= 2 * 400 + JOB_WAKES_INFLIGHT_MAX,
        "{twice} woken twice"
    );
}

#[tokio::test(start_paused = true)]
async fn a_bulk_wake_of_listed_ids_goes_on_from_its_checkpoint() {
    let rig = Rig::new();
    const N: usize = 2500;
    let mut ids = Vec::new();
    for i in 0..N {
        let id = format!("dev-{i}");
        rig.register(&id, &format!("AwYAAAD{i}")).await;
        ids.push(id);
    }
    for i in 0..5 {
        ids.push(format!("unknown-{i}"));
    }
    let (stopped, job, sends) = stop_and_resume(&rig, Selection::Ids(ids)).await;
    assert!(!stopped.finished && !stopped.cancelled);
    assert_eq!(stopped.counts.done(), stopped.selected);
    assert!(stopped.at.is_some() || !stopped.done.is_empty());
    assert_eq!(sends.len(), N, "every registered device was woken");
    assert!(sends.values().all(|&n| (1..=2).contains(&n)));
    let p = job.progress();
    assert_eq!(p.state, JobState::Done);
    assert_eq!(p.total, N as u64 + 5);
    assert_eq!((p.received, p.failed, p.done), (N as u64, 5, N as u64 + 5));
}

/// Owns the partitions of one parity, or all of them once told to.
struct Parity {
    name: &'static str,
    odd: bool,
    all: std::sync::atomic::AtomicBool,
    epoch: std::sync::atomic::AtomicU64,
}

impl Parity {
    fn new(name: &'static str, odd: bool) -> Arc<Parity> {
        Arc::new(Parity {
            name,
            odd,
            all: Default::default(),
            epoch: Default::default(),
        })
    }

    fn take_all(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.all.store(true, SeqCst);
        self.epoch.fetch_add(1, SeqCst);
    }
}

impl crate::core::bulk::Owner for Parity {
    fn owns(&self, part: u16) -> bool {
        self.all.load(std::sync::atomic::Ordering::SeqCst) || (part % 2 == 1) == self.odd
    }

    fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn instance(&self) -> String {
        self.name.to_owned()
    }
}

#[tokio::test(start_paused = true)]
async fn a_shared_bulk_wake_runs_on_every_owner_and_the_survivor_finishes_it() {
    let rig = Rig::new();
    const N: usize = 3000;
    for i in 0..N {
        rig.register(&format!("dev-{i}"), &format!("AwYAAAD{i}"))
            .await;
    }
    let book = Arc::new(MemBook {
        shared: true,
        ..MemBook::default()
    });
    let (even, odd) = (Parity::new("a", false), Parity::new("b", true));
    rig.wakes.attach_book(attached(&book, Some(even.clone())));
    rig.wakes.restore_jobs(&Handle::current()).unwrap();
    let other = Arc::new(WakeService::new(
        rig.transport.clone(),
        rig.registry.clone(),
        rig.lifecycle.clone(),
        rig.services.settings.thresholds,
        1,
    ));
    other.attach_book(attached(&book, Some(odd.clone())));
    other.restore_jobs(&Handle::current()).unwrap();
    let job = rig
        .wakes
        .start_job(0, Selection::Filter(None), Some(100), false, 0)
        .await
        .unwrap();
    // The other node takes the job up and walks its own partitions (the
    // stand-in answers after 5 s).
    tokio::time::sleep(Duration::from_secs(7)).await;
    let theirs = other.job(job.id()).expect("the other node runs the job");
    assert!(theirs.progress().done > 0, "{:?}", theirs.progress());
    // The first node goes away; the other takes its partitions over.
    rig.wakes.stop_jobs();
    while !job.is_finished() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    odd.take_all();
    while !theirs.is_finished() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut sends = std::collections::HashMap::new();
    for uri in rig.transport.sent.lock().iter() {
        *sends.entry(uri.clone()).or_insert(0) += 1;
    }
    assert_eq!(sends.len(), N, "every device was woken");
    assert!(sends.values().all(|&n| (1..=2).contains(&n)));
    // Counted once each: this node's walks and the first node's, as its
    // checkpoints say.
    let p = other.progress(&theirs);
    assert_eq!(p.state, JobState::Done);
    assert_eq!(
        (p.total, p.received, p.done),
        (N as u64, N as u64, N as u64)
    );
    assert!(book.jobs.lock()[job.id()].0.finished());
}
