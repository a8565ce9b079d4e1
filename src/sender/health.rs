//! How one WNS authority is doing, shared by every shard's pool for it:
//! its circuit breaker, and the back-off level of each credential sending
//! to it. The decisions are the core's ([`Breaker`], [`RetryGate`]); this
//! holds them behind locks, mirrors what the hot path reads in atomics,
//! wakes the wakes waiting on a change, and logs and exports every change
//! of the breaker's state.
//!
//! The hot path pays one atomic load per wake ([`AuthorityHealth::is_closed`])
//! and one or two per answer ([`AuthorityHealth::on_answer`],
//! [`AuthorityHealth::gate_success`]) while all is well; the locks are
//! taken only while something is failing.

use crate::core::wns::{
    Admit, Breaker, BreakerPolicy, BreakerState, RetryGate, RetryPolicy, Transition,
};
use crate::telemetry::metrics as m;
use metrics::{Counter, Gauge};
use parking_lot::Mutex;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use tokio::sync::Notify;

/// One credential's back-off level at this authority.
struct Gate {
    gate: Mutex<RetryGate>,
    /// The gate's level, readable without the lock.
    level: AtomicU32,
}

/// The breaker and back-off levels of one WNS authority.
pub struct AuthorityHealth {
    authority: Box<str>,
    policy: BreakerPolicy,
    retry: RetryPolicy,
    breaker: Mutex<Breaker>,
    /// [`BreakerState::code`] of the breaker, readable without the lock.
    state: AtomicU8,
    /// Connection failures in a row are being counted: an answer must take
    /// the lock to reset them.
    failing: AtomicBool,
    /// Notified on every change of the breaker's state, and when a
    /// half-open breaker's probe ended without a verdict.
    changed: Notify,
    /// By app index (the order of `[[wns.apps]]`).
    gates: Box<[Gate]>,
    gauge: Gauge,
    opened: Counter,
}

/// What `GET /v1/stats` shows of one authority.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HealthView {
    /// `closed`, `half_open` or `open`.
    pub state: &'static str,
    /// Connection failures in a row.
    pub consecutive_failures: u32,
    /// Times the breaker opened since the start.
    pub times_opened: u64,
    /// While open: milliseconds until a probe may go (0 once due).
    pub probe_in_ms: Option<u64>,
}

impl AuthorityHealth {
    /// A closed breaker for `authority`, with one back-off gate for each
    /// of `apps` credentials; its metric series start at closed and 0.
    pub fn new(
        authority: &str,
        apps: usize,
        policy: BreakerPolicy,
        retry: RetryPolicy,
    ) -> AuthorityHealth {
        let labels = [("authority", authority.to_owned())];
        let gauge = metrics::gauge!(m::WNS_BREAKER_STATE, &labels);
        gauge.set(f64::from(BreakerState::Closed.code()));
        let opened = metrics::counter!(m::WNS_BREAKER_OPENED, &labels);
        opened.increment(0);
        AuthorityHealth {
            authority: authority.into(),
            breaker: Mutex::new(Breaker::new(&policy)),
            policy,
            retry,
            state: AtomicU8::new(BreakerState::Closed.code()),
            failing: AtomicBool::new(false),
            changed: Notify::new(),
            gates: (0..apps.max(1))
                .map(|_| Gate {
                    gate: Mutex::new(RetryGate::new()),
                    level: AtomicU32::new(0),
                })
                .collect(),
            gauge,
            opened,
        }
    }

    /// The authority (host) this is about.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// The breaker's state now.
    pub fn state(&self) -> BreakerState {
        BreakerState::from_code(self.state.load(Ordering::Acquire))
    }

    /// Whether the breaker is closed: wakes go without asking
    /// [`AuthorityHealth::admit`].
    pub fn is_closed(&self) -> bool {
        self.state.load(Ordering::Acquire) == BreakerState::Closed.code()
    }

    /// An answer came from this authority (any status, or a stream
    /// reset).
    pub fn on_answer(&self) {
        if !self.failing.load(Ordering::Relaxed) && self.is_closed() {
            return;
        }
        let mut b = self.breaker.lock();
        let t = b.on_answer(&self.policy);
        self.failing.store(false, Ordering::Relaxed);
        self.apply(&b, t, None);
    }

    /// A connect to this authority failed, or a connection to it died
    /// with requests unanswered, at `now_ms`; `why` is logged when it
    /// changes the breaker's state.
    pub fn on_connection_failed(&self, now_ms: u64, why: &str) {
        let mut b = self.breaker.lock();
        let t = b.on_failure(now_ms, &self.policy);
        self.failing.store(true, Ordering::Relaxed);
        self.apply(&b, t, Some(why));
    }

    /// Whether a wake may go at `now_ms` (see [`Breaker::admit`]).
    pub fn admit(&self, now_ms: u64) -> Admit {
        if self.is_closed() {
            return Admit::Go;
        }
        let mut b = self.breaker.lock();
        let (admit, t) = b.admit(now_ms, &self.policy);
        self.apply(&b, t, None);
        admit
    }

    /// The probe a wake was admitted as has ended; when no verdict of its
    /// own reached the breaker, the next wake may probe.
    pub fn probe_ended(&self) {
        if self.breaker.lock().probe_ended() {
            self.changed.notify_waiters();
        }
    }

    /// A future that resolves at the breaker's next change. Create it
    /// before reading the state that makes the caller wait.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// A request of credential `app` to this authority failed at `now_ms`
    /// in a way worth backing off for (a 5xx, a 406, a lost connection, a
    /// failed connect): the level the push backs off at.
    pub fn gate_failure(&self, app: usize, now_ms: u64) -> u32 {
        let g = &self.gates[app.min(self.gates.len() - 1)];
        let mut gate = g.gate.lock();
        let level = gate.on_failure(now_ms, &self.retry);
        g.level.store(level, Ordering::Relaxed);
        level
    }

    /// A request of credential `app` to this authority was answered
    /// without such a failure: its back-off episode is over.
    pub fn gate_success(&self, app: usize) {
        let g = &self.gates[app.min(self.gates.len() - 1)];
        if g.level.load(Ordering::Relaxed) == 0 {
            return;
        }
        g.gate.lock().on_success();
        g.level.store(0, Ordering::Relaxed);
    }

    /// The back-off level of credential `app` now.
    pub fn gate_level(&self, app: usize) -> u32 {
        self.gates[app.min(self.gates.len() - 1)]
            .level
            .load(Ordering::Relaxed)
    }

    /// What `GET /v1/stats` shows, at `now_ms`.
    pub fn view(&self, now_ms: u64) -> HealthView {
        let b = self.breaker.lock();
        HealthView {
            state: b.state().label(),
            consecutive_failures: b.failures(),
            times_opened: b.times_opened(),
            probe_in_ms: b.open_until().map(|t| t.saturating_sub(now_ms)),
        }
    }

    /// Publishes a change of state: the atomic, the gauge, the counter,
    /// one log line, and the wakes waiting for it. Called with the lock
    /// held, so changes are published in order.
    fn apply(&self, b: &Breaker, t: Option<Transition>, why: Option<&str>) {
        let Some(t) = t else {
            return;
        };
        self.state.store(b.state().code(), Ordering::Release);
        self.gauge.set(f64::from(t.to.code()));
        let authority = &*self.authority;
        match t.to {
            BreakerState::Open => {
                self.opened.increment(1);
                let open_ms = t.open_for.map_or(0, |d| d.as_millis() as u64);
                tracing::warn!(
                    authority,
                    from = t.from.label(),
                    to = t.to.label(),
                    consecutive_failures = t.failures,
                    probe_in_ms = open_ms,
                    last_failure = why.unwrap_or(""),
                    "WNS circuit breaker opened: new wakes to this authority wait for it instead of spending their retries"
                );
            }
            BreakerState::HalfOpen => tracing::info!(
                authority,
                from = t.from.label(),
                to = t.to.label(),
                consecutive_failures = t.failures,
                "WNS circuit breaker half-open: one wake goes as a probe"
            ),
            BreakerState::Closed => tracing::info!(
                authority,
                from = t.from.label(),
                to = t.to.label(),
                consecutive_failures = t.failures,
                "WNS circuit breaker closed: the authority answers again"
            ),
        }
        self.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hot_path_reads_atomics_and_changes_are_published() {
        let h = AuthorityHealth::new(
            "db5.notify.windows.com",
            1,
            BreakerPolicy::default(),
            RetryPolicy::default(),
        );
        assert!(h.is_closed());
        h.on_answer();
        assert_eq!(h.admit(0), Admit::Go);
        for t in 0..3 {
            h.on_connection_failed(t, "refused");
        }
        assert_eq!(h.state(), BreakerState::Open);
        assert!(!h.is_closed());
        assert_eq!(h.admit(10), Admit::Wait { until_ms: 1_002 });
        assert_eq!(h.view(502).probe_in_ms, Some(500));
        assert_eq!(h.admit(1_002), Admit::Probe);
        assert_eq!(h.state(), BreakerState::HalfOpen);
        h.probe_ended();
        assert_eq!(h.admit(1_003), Admit::Probe);
        h.on_answer();
        assert!(h.is_closed());
        let v = h.view(2_000);
        assert_eq!(
            v,
            HealthView {
                state: "closed",
                consecutive_failures: 0,
                times_opened: 1,
                probe_in_ms: None,
            }
        );
    }

    #[test]
    fn gates_are_per_credential() {
        let h = AuthorityHealth::new(
            "db5.notify.windows.com",
            2,
            BreakerPolicy::default(),
            RetryPolicy::default(),
        );
        assert_eq!(h.gate_failure(0, 0), 1);
        assert_eq!(h.gate_failure(0, 100), 2);
        assert_eq!(h.gate_level(1), 0);
        assert_eq!(h.gate_failure(1, 100), 1);
        h.gate_success(0);
        assert_eq!((h.gate_level(0), h.gate_level(1)), (0, 1));
    }
}
