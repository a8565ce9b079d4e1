//! Nudge wakes: one wake to each device whose channel turns `renewal_due`
//! (`lifecycle.nudge_renewal_due`), paced at `lifecycle.nudge_per_second`,
//! so the MDM server gets a session in which to read the renewed channel
//! URI (protocol.md section 6).
//!
//! The sweep offers devices; a dedicated thread with its own current-thread
//! runtime and its own slot of WNS connection pools sends the wakes, so
//! nudges never take a shard's connections or time. The queue between them
//! is bounded: when it is full the sweep stops advancing and offers the rest
//! on its next run.

use crate::api::push::start_or_join;
use crate::core::{DeviceId, LifecycleState};
use crate::gateway::Gateway;
use crate::telemetry::metrics as m;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Devices waiting to be nudged.
const QUEUE: usize = 10_000;
/// How long stopping waits for nudges in flight.
const DRAIN: Duration = Duration::from_secs(10);

/// The nudge thread.
pub struct Nudger {
    tx: mpsc::Sender<DeviceId>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Nudger {
    /// Starts the thread; its wakes use the sender's pool slot `slot`.
    pub fn start(gw: Arc<Gateway>, slot: usize, per_second: u32) -> std::io::Result<Nudger> {
        let (tx, mut rx) = mpsc::channel::<DeviceId>(QUEUE);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("wnsgate-nudge".into())
            .spawn(move || {
                rt.block_on(async move {
                    let gap = Duration::from_secs_f64(1.0 / f64::from(per_second.max(1)));
                    let mut tick = tokio::time::interval(gap);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    while let Some(id) = rx.recv().await {
                        let Some(rec) = gw.registry.get(id.as_str()) else {
                            continue;
                        };
                        let th = &gw.settings.thresholds;
                        if rec.state_at(th, gw.now()).state != LifecycleState::RenewalDue {
                            continue;
                        }
                        tick.tick().await;
                        metrics::counter!(m::LIFECYCLE_NUDGES).increment(1);
                        let _ = start_or_join(&gw, slot, rec, None);
                    }
                    // Stopping: let the wakes in flight finish (bounded).
                    let until = Instant::now() + DRAIN;
                    while !gw.pending_wakes.is_empty() && Instant::now() < until {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
            })?;
        Ok(Nudger {
            tx,
            thread: Some(thread),
        })
    }

    /// Queues a device for a nudge; false when the queue is full.
    pub fn offer(&self, id: DeviceId) -> bool {
        self.tx.try_send(id).is_ok()
    }

    /// Stops taking devices, waits for nudges in flight (bounded), joins.
    pub fn stop(mut self) {
        let (tx, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
