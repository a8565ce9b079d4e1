//! The circuit breaker of one WNS authority (one front-end host): after
//! consecutive connection failures it opens, and wakes wait for it instead
//! of spending their retry budget on a front end that is down; once its
//! open time has passed, one wake at a time goes through as a probe, and
//! the first answer closes it again.
//!
//! States and transitions ([`BreakerState`]):
//!
//! - **closed**: every wake goes. [`BreakerPolicy::failures_to_open`]
//!   connection failures in a row (a connect that failed, a connection
//!   that died with requests unanswered; no answer in between) open it.
//! - **open**: wakes wait until [`Breaker::open_until`]. Failures of
//!   requests sent before it opened change nothing.
//! - **half-open**: the first wake to ask after the open time is the
//!   probe; the others wait. An answer closes the breaker; a connection
//!   failure opens it again for twice as long (up to
//!   [`BreakerPolicy::open_for_max`]). A probe that ends with neither
//!   (it never reached the network) lets the next wake probe, as does one
//!   that has not ended after [`BreakerPolicy::probe_timeout`].
//!
//! An answer in any state closes the breaker: the authority is answering.
//!
//! Times are caller-supplied monotonic milliseconds.

use std::time::Duration;

/// When a breaker opens and how long it stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Connection failures in a row that open the breaker; 0 never opens
    /// it. Default 3.
    pub failures_to_open: u32,
    /// How long it stays open the first time. Default 1 s.
    pub open_for: Duration,
    /// The longest it stays open: each probe that fails doubles the open
    /// time up to this. Default 5 s.
    pub open_for_max: Duration,
    /// How long a probe may take before another wake may probe. Default
    /// 25 s (a connect, a TLS handshake and a request, each at its time
    /// limit).
    pub probe_timeout: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            failures_to_open: 3,
            open_for: Duration::from_secs(1),
            open_for_max: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(25),
        }
    }
}

/// Where a breaker is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Wakes go.
    Closed,
    /// One probe goes; the others wait.
    HalfOpen,
    /// Wakes wait.
    Open,
}

impl BreakerState {
    /// Every state, by [`BreakerState::code`].
    pub const ALL: [BreakerState; 3] = [
        BreakerState::Closed,
        BreakerState::HalfOpen,
        BreakerState::Open,
    ];

    /// The stable snake_case name (`closed`, `half_open`, `open`).
    pub fn label(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Open => "open",
        }
    }

    /// 0 closed, 1 half-open, 2 open: the gauge's value, ordered by how
    /// little gets through.
    pub fn code(self) -> u8 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }

    /// The state with `code`; anything above 2 reads as open.
    pub fn from_code(code: u8) -> BreakerState {
        match code {
            0 => BreakerState::Closed,
            1 => BreakerState::HalfOpen,
            _ => BreakerState::Open,
        }
    }
}

/// A change of state, for the caller to log and export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The state before.
    pub from: BreakerState,
    /// The state after.
    pub to: BreakerState,
    /// Connection failures in a row when it happened.
    pub failures: u32,
    /// When the state is now open: for how long.
    pub open_for: Option<Duration>,
}

/// Whether a wake may go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// The breaker is closed.
    Go,
    /// Go as the probe of a half-open breaker; report the end with
    /// [`Breaker::probe_ended`].
    Probe,
    /// Wait until this millisecond, or until the state changes.
    Wait {
        /// When to ask again.
        until_ms: u64,
    },
}

/// One authority's breaker. See the module documentation.
///
/// Guarantees, whatever it is fed: it opens only after
/// `failures_to_open` (> 0) failures in a row in the closed state, or a
/// failure in the half-open state; it admits no wake while open and
/// before `open_until`; while half-open it admits one probe at a time
/// (another only once that one ended or its `probe_timeout` passed); its
/// open time is within `open_for..=open_for_max`; an answer closes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breaker {
    state: BreakerState,
    failures: u32,
    open_until_ms: u64,
    /// The open time of the last (or next) opening.
    open_for: Duration,
    /// When the probe in flight was admitted, while half-open.
    probe_since_ms: Option<u64>,
    opened: u64,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(policy: &BreakerPolicy) -> Breaker {
        Breaker {
            state: BreakerState::Closed,
            failures: 0,
            open_until_ms: 0,
            open_for: policy.open_for,
            probe_since_ms: None,
            opened: 0,
        }
    }

    /// The state now (an open breaker whose time has passed reads as open
    /// until a wake asks).
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Connection failures in a row.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// How many times it opened (from closed or half-open).
    pub fn times_opened(&self) -> u64 {
        self.opened
    }

    /// While open: the first millisecond a probe may go.
    pub fn open_until(&self) -> Option<u64> {
        (self.state == BreakerState::Open).then_some(self.open_until_ms)
    }

    /// A connect failed, or a connection died with requests unanswered,
    /// at `now_ms`.
    pub fn on_failure(&mut self, now_ms: u64, policy: &BreakerPolicy) -> Option<Transition> {
        self.failures = self.failures.saturating_add(1);
        match self.state {
            BreakerState::Closed
                if policy.failures_to_open > 0 && self.failures >= policy.failures_to_open =>
            {
                self.open_for = clamp(policy.open_for, policy);
                Some(self.open(now_ms))
            }
            BreakerState::HalfOpen => {
                self.open_for = clamp(self.open_for.saturating_mul(2), policy);
                Some(self.open(now_ms))
            }
            BreakerState::Closed | BreakerState::Open => None,
        }
    }

    /// An answer came from the authority (any HTTP status, or a stream
    /// reset: the front end is talking).
    pub fn on_answer(&mut self, policy: &BreakerPolicy) -> Option<Transition> {
        let failures = self.failures;
        self.failures = 0;
        if self.state == BreakerState::Closed {
            return None;
        }
        let from = self.state;
        self.state = BreakerState::Closed;
        self.probe_since_ms = None;
        self.open_for = clamp(policy.open_for, policy);
        Some(Transition {
            from,
            to: BreakerState::Closed,
            failures,
            open_for: None,
        })
    }

    /// Whether a wake may go at `now_ms`. The transition is set when the
    /// question moved an open breaker to half-open.
    pub fn admit(&mut self, now_ms: u64, policy: &BreakerPolicy) -> (Admit, Option<Transition>) {
        match self.state {
            BreakerState::Closed => (Admit::Go, None),
            BreakerState::Open if now_ms < self.open_until_ms => (
                Admit::Wait {
                    until_ms: self.open_until_ms,
                },
                None,
            ),
            BreakerState::Open => {
                self.state = BreakerState::HalfOpen;
                self.probe_since_ms = Some(now_ms);
                let t = Transition {
                    from: BreakerState::Open,
                    to: BreakerState::HalfOpen,
                    failures: self.failures,
                    open_for: None,
                };
                (Admit::Probe, Some(t))
            }
            BreakerState::HalfOpen => {
                let timeout = u64::try_from(policy.probe_timeout.as_millis()).unwrap_or(u64::MAX);
                match self.probe_since_ms {
                    Some(since) if now_ms < since.saturating_add(timeout) => (
                        Admit::Wait {
                            until_ms: since.saturating_add(timeout),
                        },
                        None,
                    ),
                    _ => {
                        self.probe_since_ms = Some(now_ms);
                        (Admit::Probe, None)
                    }
                }
            }
        }
    }

    /// The probe admitted ended without a verdict of its own (no answer
    /// and no connection failure reached the breaker: it was never sent,
    /// or its request timed out on a live connection). While still
    /// half-open, the next wake may probe. Returns whether that changed
    /// anything.
    pub fn probe_ended(&mut self) -> bool {
        if self.state == BreakerState::HalfOpen && self.probe_since_ms.is_some() {
            self.probe_since_ms = None;
            true
        } else {
            false
        }
    }

    fn open(&mut self, now_ms: u64) -> Transition {
        let from = self.state;
        self.state = BreakerState::Open;
        self.probe_since_ms = None;
        self.opened = self.opened.saturating_add(1);
        let ms = u64::try_from(self.open_for.as_millis()).unwrap_or(u64::MAX);
        self.open_until_ms = now_ms.saturating_add(ms);
        Transition {
            from,
            to: BreakerState::Open,
            failures: self.failures,
            open_for: Some(self.open_for),
        }
    }
}

fn clamp(d: Duration, policy: &BreakerPolicy) -> Duration {
    d.max(policy.open_for)
        .min(policy.open_for_max.max(policy.open_for))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use BreakerState::*;

    fn policy() -> BreakerPolicy {
        BreakerPolicy::default()
    }

    #[test]
    fn opens_after_failures_in_a_row_and_an_answer_resets_the_count() {
        let p = policy();
        let mut b = Breaker::new(&p);
        assert_eq!(b.on_failure(0, &p), None);
        assert_eq!(b.on_failure(1, &p), None);
        assert_eq!(b.on_answer(&p), None);
        assert_eq!(b.failures(), 0);
        assert_eq!(b.on_failure(2, &p), None);
        assert_eq!(b.on_failure(3, &p), None);
        let t = b
            .on_failure(10, &p)
            .expect("the third failure in a row opens it");
        assert_eq!(
            t,
            Transition {
                from: Closed,
                to: Open,
                failures: 3,
                open_for: Some(Duration::from_secs(1)),
            }
        );
        assert_eq!(b.open_until(), Some(1_010));
        assert_eq!(b.times_opened(), 1);
        // Stragglers from before the opening change nothing.
        assert_eq!(b.on_failure(11, &p), None);
        assert_eq!(b.open_until(), Some(1_010));
    }

    #[test]
    fn wakes_wait_while_open_then_one_probe_goes() {
        let p = policy();
        let mut b = Breaker::new(&p);
        for t in 0..3 {
            let _ = b.on_failure(t, &p);
        }
        assert_eq!(b.admit(500, &p), (Admit::Wait { until_ms: 1_002 }, None));
        let (admit, t) = b.admit(1_002, &p);
        assert_eq!(admit, Admit::Probe);
        assert_eq!(t.map(|t| (t.from, t.to)), Some((Open, HalfOpen)));
        // Everyone else waits for the probe, at most its timeout.
        assert_eq!(b.admit(1_003, &p), (Admit::Wait { until_ms: 26_002 }, None));
        // The probe never reached the network: the next wake probes.
        assert!(b.probe_ended());
        assert!(!b.probe_ended());
        assert_eq!(b.admit(1_004, &p), (Admit::Probe, None));
        // A probe that hangs past its timeout lets another one go.
        assert_eq!(b.admit(26_004, &p), (Admit::Probe, None));
    }

    #[test]
    fn a_failed_probe_doubles_the_open_time_up_to_the_cap_and_an_answer_closes() {
        let p = policy();
        let mut b = Breaker::new(&p);
        for t in 0..3 {
            let _ = b.on_failure(t, &p);
        }
        let mut now = 2;
        let mut opens = Vec::new();
        for _ in 0..5 {
            now = b.open_until().unwrap();
            assert_eq!(b.admit(now, &p).0, Admit::Probe);
            let t = b.on_failure(now + 5, &p).expect("a failed probe opens it");
            assert_eq!((t.from, t.to), (HalfOpen, Open));
            opens.push(t.open_for.unwrap().as_secs());
        }
        assert_eq!(opens, [2, 4, 5, 5, 5]);
        assert_eq!(b.times_opened(), 6);
        let until = b.open_until().unwrap();
        assert_eq!(b.admit(until, &p).0, Admit::Probe);
        let t = b.on_answer(&p).expect("an answer closes it");
        assert_eq!((t.from, t.to), (HalfOpen, Closed));
        assert_eq!(b.admit(now, &p), (Admit::Go, None));
        // Closed again: the next opening starts from the first open time.
        for t in 0..3 {
            let _ = b.on_failure(until + t, &p);
        }
        assert_eq!(b.open_until(), Some(until + 2 + 1_000));
    }

    #[test]
    fn an_answer_while_open_closes_it() {
        let p = policy();
        let mut b = Breaker::new(&p);
        for t in 0..3 {
            let _ = b.on_failure(t, &p);
        }
        let t = b.on_answer(&p).unwrap();
        assert_eq!((t.from, t.to, t.failures), (Open, Closed, 3));
        assert_eq!(b.state(), Closed);
    }

    #[test]
    fn zero_failures_to_open_never_opens() {
        let p = BreakerPolicy {
            failures_to_open: 0,
            ..policy()
        };
        let mut b = Breaker::new(&p);
        for t in 0..1000 {
            assert_eq!(b.on_failure(t, &p), None);
        }
        assert_eq!(b.admit(1000, &p), (Admit::Go, None));
    }

    #[test]
    fn states_have_stable_labels_and_codes() {
        for s in BreakerState::ALL {
            assert_eq!(BreakerState::from_code(s.code()), s);
        }
        assert_eq!(
            BreakerState::ALL.map(BreakerState::label),
            ["closed", "half_open", "open"]
        );
    }

    #[derive(Debug, Clone)]
    enum Event {
        Failure,
        Answer,
        Admit,
        ProbeEnded,
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            3 => Just(Event::Failure),
            1 => Just(Event::Answer),
            3 => Just(Event::Admit),
            1 => Just(Event::ProbeEnded),
        ]
    }

    proptest! {
        #[test]
        fn invariants_hold_whatever_happens(
            steps in proptest::collection::vec((0u64..3_000, event()), 1..400),
            failures_to_open in 0u32..6,
        ) {
            let p = BreakerPolicy { failures_to_open, ..policy() };
            let mut b = Breaker::new(&p);
            let mut now = 0u64;
            let mut in_a_row = 0u32;
            // A probe admitted and not yet ended, while half-open.
            let mut probing: Option<u64> = None;
            for (dt, e) in steps {
                now += dt;
                let before = b.state();
                match e {
                    Event::Failure => {
                        in_a_row += 1;
                        let t = b.on_failure(now, &p);
                        if let Some(t) = t {
                            prop_assert_eq!(t.to, Open);
                            prop_assert!(before == HalfOpen
                                || (failures_to_open > 0 && in_a_row >= failures_to_open));
                            let open = t.open_for.unwrap();
                            prop_assert!(open >= p.open_for && open <= p.open_for_max);
                            probing = None;
                        }
                        if failures_to_open == 0 {
                            prop_assert_eq!(b.state(), Closed);
                        }
                    }
                    Event::Answer => {
                        in_a_row = 0;
                        let _ = b.on_answer(&p);
                        prop_assert_eq!(b.state(), Closed);
                        probing = None;
                    }
                    Event::Admit => {
                        let open_until = b.open_until();
                        let (admit, _) = b.admit(now, &p);
                        match admit {
                            Admit::Go => prop_assert_eq!(before, Closed),
                            Admit::Probe => {
                                prop_assert_ne!(before, Closed);
                                if let Some(until) = open_until {
                                    prop_assert!(now >= until);
                                }
                                if let Some(since) = probing {
                                    prop_assert!(now >= since + 25_000);
                                }
                                probing = Some(now);
                            }
                            Admit::Wait { until_ms } => {
                                prop_assert_ne!(before, Closed);
                                prop_assert!(until_ms > now);
                            }
                        }
                    }
                    Event::ProbeEnded => {
                        if b.probe_ended() {
                            probing = None;
                        }
                    }
                }
            }
        }
    }
}
