//! One shard's share of a bulk wake: the batches dealt to it, sent from one
//! task for the whole job.
//!
//! The task drives every wake it starts through a [`Batch`](super::transport::Batch) (no future
//! per wake), claims each device's wake quietly so that a single-device
//! wake arriving meanwhile joins it, and ends its wakes together
//! ([`WakeService::conclude_live`]); a dead channel's wake is concluded on
//! its own, its mark durable before its result counts.

use super::job::{Job, PageTrack};
use super::outcome::HoldsClaim;
use super::pending::Claim;
use super::transport::{Batch as _, Transport, WakeTarget};
use super::WakeService;
use crate::clock;
use crate::core::wns::retry::Pacer;
use crate::core::{ChannelUri, DeviceRecord};
use crate::telemetry::metrics as m;
use futures_util::stream::{FuturesUnordered, StreamExt};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::task::task_tracker::TaskTrackerToken;

/// What a job's senders share: the job, its in-flight bound and its pace.
pub(super) struct Sending<S> {
    pub(super) wakes: Arc<WakeService<S>>,
    pub(super) job: Arc<Job>,
    /// [`JOB_WAKES_INFLIGHT_MAX`](super::limits::JOB_WAKES_INFLIGHT_MAX) permits; one held by each wake in flight.
    pub(super) permits: Arc<Semaphore>,
    pub(super) pacer: Option<Mutex<Pacer>>,
    /// Whether the walk these senders serve stops sending at once: the
    /// job was cancelled or stops with the gateway.
    pub(super) halted: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Whether the senders take no further batch, but finish the one each
    /// is in (cluster mode: the partitions this node owns changed; a
    /// batch once begun ends, so its devices count in the checkpoint and
    /// the next walk does not wake them again).
    pub(super) closing: Arc<dyn Fn() -> bool + Send + Sync>,
}

/// A batch of a job's devices, handed to one shard to send: one page.
pub(super) struct Batch {
    pub(super) devices: Selected,
    pub(super) page: Arc<PageTrack>,
}

/// A page's devices.
pub(super) enum Selected {
    Ids(Vec<String>),
    Records(Vec<DeviceRecord>),
}

/// Sends the batches dealt to one shard, driving their wakes from this one
/// task (see [`super::transport::Batch`]). A batch's page is released once all its
/// devices are started; the task ends when the dealer is done (or the job
/// cancelled) and every wake it started has its result.
pub(super) async fn send_batches<S: Transport>(
    sending: Arc<Sending<S>>,
    shard: usize,
    mut batches: mpsc::Receiver<(Batch, OwnedSemaphorePermit)>,
    _inflight: TaskTrackerToken,
) {
    let batches_counter = metrics::counter!(m::BULK_BATCHES, "shard" => shard.to_string());
    let service = sending.wakes.clone();
    let job = sending.job.clone();
    let mut wakes = service.sender.batch::<JobWake>(shard);
    // The batch being started, with its page.
    let mut current: Option<(Devices, Arc<PageTrack>, OwnedSemaphorePermit)> = None;
    let mut dealing = true;
    let mut results = Vec::new();
    let mut outcomes = Vec::new();
    // Dead channels being marked durably before their results count.
    let mut concluding = FuturesUnordered::new();
    // A claimed wake waiting for a free stream.
    let mut parked: Option<JobWake> = None;
    // A device waiting for an in-flight permit or for the pace, with its
    // page.
    let mut staged: Option<(DeviceRecord, Arc<PageTrack>)> = None;
    // An in-flight permit taken while the pace said wait.
    let mut held: Option<OwnedSemaphorePermit> = None;
    loop {
        let cancelled = (sending.halted)();
        // Start every wake that may start now.
        let mut wait = Wait::Nothing;
        loop {
            let w = match parked.take() {
                Some(w) => w,
                None if cancelled => break,
                None => {
                    let (rec, page) = match staged.take() {
                        Some(staged) => staged,
                        None => match current
                            .as_mut()
                            .and_then(|(d, page, _)| Some((d.next(&service)?, page)))
                        {
                            Some((Ok(rec), page)) if job.skips(rec.dead) => {
                                job.count_skipped_dead(page);
                                continue;
                            }
                            Some((Ok(rec), page)) => (rec, page.clone()),
                            Some((Err(id), page)) => {
                                // A listed id that is not registered.
                                job.count(page, &id, None);
                                continue;
                            }
                            None => {
                                // The batch is all started: its page goes
                                // back, and the next one comes.
                                current = None;
                                if (sending.closing)() {
                                    dealing = false;
                                    break;
                                }
                                match batches.try_recv() {
                                    Ok((batch, permit)) => {
                                        batches_counter.increment(1);
                                        current =
                                            Some((Devices::new(batch.devices), batch.page, permit));
                                        continue;
                                    }
                                    Err(mpsc::error::TryRecvError::Empty) => {
                                        wait = Wait::Batch;
                                    }
                                    Err(mpsc::error::TryRecvError::Disconnected) => {
                                        dealing = false;
                                    }
                                }
                                break;
                            }
                        },
                    };
                    let Some(permit) = held
                        .take()
                        .or_else(|| sending.permits.clone().try_acquire_owned().ok())
                    else {
                        staged = Some((rec, page));
                        wait = Wait::Permit;
                        break;
                    };
                    if let Some(p) = &sending.pacer {
                        if let Err(ms) = p.lock().take(clock::monotonic_ms()) {
                            held = Some(permit);
                            staged = Some((rec, page));
                            wait = Wait::Pace(Duration::from_millis(ms));
                            break;
                        }
                    }
                    // Kept only for a wake joined: a claimed one holds its record.
                    let id = rec.device_id.clone();
                    match service.pending.claim_quietly(rec) {
                        Ok(claim) => JobWake {
                            claim,
                            page,
                            _permit: permit,
                        },
                        Err(pending) => {
                            // Joined a wake already pending.
                            let job = job.clone();
                            tokio::spawn(async move {
                                job.count(&page, id.as_str(), pending.result().await);
                                drop(permit);
                            });
                            continue;
                        }
                    }
                }
            };
            if let Err(w) = wakes.start(w) {
                parked = Some(w);
                break;
            }
        }
        let starting = !cancelled && (dealing || current.is_some() || staged.is_some());
        if wakes.is_empty() && concluding.is_empty() && parked.is_none() && !starting {
            break;
        }
        tokio::select! {
            biased;
            _ = wakes.finished(&mut results), if !wakes.is_empty() => {
                service.conclude_live(&mut results, &mut outcomes, |page, id, settled| {
                    job.count(&page, id.unwrap_or_default(), Some(settled.report()));
                });
                for (w, report) in results.drain(..) {
                    let (service, job) = (service.clone(), job.clone());
                    concluding.push(async move {
                        // The permit is held until the result counts.
                        let JobWake { claim, page, _permit } = w;
                        let id = claim.record().device_id.clone();
                        let settled = service.conclude(claim, report).await;
                        job.count(&page, id.as_str(), Some(settled.report()));
                    });
                }
            }
            Some(()) = concluding.next(), if !concluding.is_empty() => {}
            // Async blocks: a disabled branch's future is still built.
            p = async { sending.permits.clone().acquire_owned().await }, if matches!(wait, Wait::Permit) => {
                // The semaphore is never closed.
                held = p.ok();
            }
            _ = async { tokio::time::sleep(wait.pace()).await }, if matches!(wait, Wait::Pace(_)) => {}
            b = batches.recv(), if matches!(wait, Wait::Batch) && !(sending.closing)() => match b {
                Some((batch, permit)) => {
                    batches_counter.increment(1);
                    current = Some((Devices::new(batch.devices), batch.page, permit));
                }
                None => dealing = false,
            },
            else => {}
        }
    }
}

/// Why a batch stopped starting wakes for now.
enum Wait {
    Nothing,
    /// The next batch has not come yet.
    Batch,
    /// The job has its most wakes in flight.
    Permit,
    /// The job's pace allows the next wake after this long.
    Pace(Duration),
}

impl Wait {
    fn pace(&self) -> Duration {
        match self {
            Wait::Pace(d) => *d,
            _ => Duration::ZERO,
        }
    }
}

/// A batch's devices, in order: records, or listed ids looked up as they
/// come (`Some(Err(id))` for one not registered).
enum Devices {
    Ids(std::vec::IntoIter<String>),
    Records(std::vec::IntoIter<DeviceRecord>),
}

impl Devices {
    fn new(devices: Selected) -> Devices {
        match devices {
            Selected::Ids(ids) => Devices::Ids(ids.into_iter()),
            Selected::Records(recs) => Devices::Records(recs.into_iter()),
        }
    }

    fn next<S: Transport>(
        &mut self,
        service: &WakeService<S>,
    ) -> Option<Result<DeviceRecord, String>> {
        match self {
            Devices::Ids(ids) => ids.next().map(|id| service.registry.get(&id).ok_or(id)),
            Devices::Records(recs) => recs.next().map(Ok),
        }
    }
}

/// One device of a batch, from its claimed wake to the result counted in
/// its page; its in-flight permit is released with it, and its claim ends
/// as abandoned if it was never settled (the batch's task was dropped).
struct JobWake {
    claim: Claim,
    page: Arc<PageTrack>,
    _permit: OwnedSemaphorePermit,
}

impl HoldsClaim for JobWake {
    type Tag = Arc<PageTrack>;

    fn claim(&self) -> &Claim {
        &self.claim
    }

    fn into_parts(self) -> (Claim, Arc<PageTrack>) {
        (self.claim, self.page)
    }
}

impl WakeTarget for JobWake {
    fn uri(&self) -> &ChannelUri {
        &self.claim.record().channel_uri
    }

    fn pfn(&self) -> &str {
        self.claim.record().pfn.as_str()
    }
}
