//! Nudge wakes: one wake to each device whose channel turns `renewal_due`
//! (`lifecycle.nudge_renewal_due`), paced at `lifecycle.nudge_per_second`,
//! so the MDM server gets a session in which to read the renewed channel
//! URI (a device renews its channel on its own; the server learns the new
//! URI only in a session).
//!
//! The lifecycle's sweep offers devices over a bounded queue
//! ([`NUDGE_QUEUE_DEVICES_MAX`]): when it is full the sweep stops advancing
//! and offers the rest on its next run. A dedicated thread with its own
//! current-thread runtime and its own slot of WNS connection pools sends
//! the wakes, so nudges never take a shard's connections or time.

use super::limits::NUDGE_QUEUE_DEVICES_MAX;
use super::transport::Transport;
use super::WakeService;
use crate::clock;
use crate::core::{DeviceId, LifecycleState};
use crate::telemetry::metrics as m;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// The nudge thread.
pub struct Nudger {
    /// Turns true to stop taking devices.
    stop: watch::Sender<bool>,
    /// Sent (or dropped) to end the thread, and with it the wakes still in
    /// flight on its runtime.
    exit: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Nudger {
    /// Starts the thread, sending from the sender's pool slot `slot`, and
    /// returns it with the queue to offer devices on.
    pub fn start<S: Transport>(
        wakes: Arc<WakeService<S>>,
        slot: usize,
        per_second: u32,
    ) -> std::io::Result<(Nudger, mpsc::Sender<DeviceId>)> {
        let (tx, mut rx) = mpsc::channel::<DeviceId>(NUDGE_QUEUE_DEVICES_MAX);
        let (stop, mut stopped) = watch::channel(false);
        let (exit, exited) = oneshot::channel::<()>();
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
                    loop {
                        let id = tokio::select! {
                            biased;
                            _ = stopped.wait_for(|s| *s) => break,
                            id = rx.recv() => match id {
                                Some(id) => id,
                                None => break,
                            },
                        };
                        let Some(rec) = wakes.registry.get(id.as_str()) else {
                            continue;
                        };
                        if rec.state_at(&wakes.thresholds, clock::now()).state
                            != LifecycleState::RenewalDue
                        {
                            continue;
                        }
                        tokio::select! {
                            biased;
                            _ = stopped.wait_for(|s| *s) => break,
                            _ = tick.tick() => {}
                        }
                        metrics::counter!(m::LIFECYCLE_NUDGES).increment(1);
                        let _ = wakes.start_or_join(slot, rec);
                    }
                    // The wakes in flight run on this runtime until the
                    // shutdown's wake drain is over.
                    let _ = exited.await;
                })
            })?;
        let nudger = Nudger {
            stop,
            exit: Some(exit),
            thread: Some(thread),
        };
        Ok((nudger, tx))
    }

    /// Stops taking devices; wakes in flight go on.
    pub fn stop_taking(&self) {
        let _ = self.stop.send(true);
    }

    /// Stops taking devices, ends the thread (a wake still in flight is
    /// abandoned) and joins it.
    pub fn join(mut self) {
        self.stop_taking();
        drop(self.exit.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Nudger {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        drop(self.exit.take());
    }
}
