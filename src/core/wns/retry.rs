//! What to do after each WNS answer: retry, back off, give up, or declare the
//! channel dead, for each answer [`classify`](mod@super::classify) tells apart.
//!
//! Independent pieces of state, all fed caller-supplied time and
//! randomness:
//!
//! - [`PushAttempt`]: one push's budgets (requests answered, requests
//!   resent without an answer, and the time window they all fall in) and
//!   its single token-refresh retry; turns each [`Outcome`] into a
//!   [`Verdict`], and each request without an answer into a [`Resend`].
//! - [`CredentialThrottle`]: one app credential's pause after 406/429, and
//!   its stop after 410 Domain Blocked.
//! - [`Pacer`]: a token bucket for bulk wake-ups, so a fleet-wide wake never
//!   arrives at WNS (or at the MDM tier it triggers) as one burst.
//!
//! The back-off a retry waits comes from the level of the shared
//! [`RetryGate`](super::backoff::RetryGate) of the push's WNS authority and
//! credential, handed in with the push's place in its window as a
//! [`RetryContext`].
//!
//! Times for the credential pieces are caller-supplied monotonic
//! milliseconds (`u64`); the push machine deals only in durations.

use super::backoff::backoff;
use super::classify::Outcome;
use crate::core::lifecycle::DeadReason;
use std::time::Duration;

/// Limits for retrying one push. Every wait the machine asks for is bounded
/// by one of these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Most requests sent for one push, first one and token-refresh retry
    /// included. Default 4. A value of 0 behaves as 1 (the first request
    /// has already been sent when the machine is first asked).
    pub max_attempts: u32,
    /// First back-off step after a 5xx, a lost connection or a failed
    /// connect. Default 200 ms; doubles per level of the authority and
    /// credential's [`RetryGate`](super::backoff::RetryGate).
    pub base: Duration,
    /// Cap on the exponential back-off. Default 30 s. A server's
    /// `Retry-After` may ask for longer, up to `max_retry_after`.
    pub max_backoff: Duration,
    /// How long to leave a channel alone after `channelthrottled`.
    /// Default 60 s: an MDM wake-up that is a minute late is still useful,
    /// one that keeps a throttled channel hot is not.
    pub channel_throttle_backoff: Duration,
    /// Credential pause after a 406/429 without `Retry-After`. Default 60 s.
    pub sender_throttle_default: Duration,
    /// Longest server-requested wait a push will sit through. Default
    /// 10 minutes. When WNS asks for more, the push fails with
    /// [`FinalFailure::RetryAfterTooLong`] instead of being retried early
    /// (against the server's word) or held for a long time (against the
    /// bounded-queue rule); the credential pause still takes the full wait.
    pub max_retry_after: Duration,
    /// Most times one push is sent again because a request got no answer
    /// (its stream or connection died first, or its connect failed).
    /// Default 5. These resends do not count in `max_attempts`.
    pub max_unanswered_resends: u32,
    /// The time budget of one push: no retry is sent, and no wait for one
    /// is begun, that would go out later than this after the push
    /// started. Default 60 s. Applies to retries after a lost connection,
    /// a failed connect, a 5xx and a 406; a channel's own throttle
    /// (`channelthrottled`) keeps `channel_throttle_backoff` under the
    /// attempt budget alone.
    pub window: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            base: Duration::from_millis(200),
            max_backoff: Duration::from_secs(30),
            channel_throttle_backoff: Duration::from_secs(60),
            sender_throttle_default: Duration::from_secs(60),
            max_retry_after: Duration::from_secs(600),
            max_unanswered_resends: 5,
            window: Duration::from_secs(60),
        }
    }
}

/// Why a push ended without a delivery, when the channel is not dead.
/// Each cause is distinguishable for metrics and alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinalFailure {
    /// 200 `dropped`: WNS accepted but did not deliver.
    Dropped,
    /// 400: our request was malformed. Alert: a bug.
    BadRequest,
    /// 405: wrong method. Alert: a bug.
    MethodNotAllowed,
    /// 413: body too large. Alert: a bug.
    PayloadTooLarge,
    /// A status WNS does not document.
    Unexpected {
        /// The status received.
        status: u16,
    },
    /// 401 again after the one token refresh.
    TokenRejectedTwice,
    /// 410 Domain Blocked: WNS blocked this sender. Alert.
    DomainBlocked,
    /// The attempt budget ran out; `last` is the label of the final outcome.
    AttemptsExhausted {
        /// [`Outcome::label`] of the last answer.
        last: &'static str,
    },
    /// WNS asked for a wait longer than [`RetryPolicy::max_retry_after`].
    RetryAfterTooLong {
        /// The wait WNS asked for.
        retry_after: Duration,
    },
    /// The next retry would go out after [`RetryPolicy::window`]; `last`
    /// is the label of the final outcome.
    RetryWindowExhausted {
        /// [`Outcome::label`] of the last answer.
        last: &'static str,
    },
}

impl FinalFailure {
    /// A stable snake_case name for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            FinalFailure::Dropped => "dropped",
            FinalFailure::BadRequest => "bad_request",
            FinalFailure::MethodNotAllowed => "method_not_allowed",
            FinalFailure::PayloadTooLarge => "payload_too_large",
            FinalFailure::Unexpected { .. } => "unexpected",
            FinalFailure::TokenRejectedTwice => "token_rejected_twice",
            FinalFailure::DomainBlocked => "domain_blocked",
            FinalFailure::AttemptsExhausted { .. } => "attempts_exhausted",
            FinalFailure::RetryAfterTooLong { .. } => "retry_after_too_long",
            FinalFailure::RetryWindowExhausted { .. } => "retry_window_exhausted",
        }
    }

    /// True for failures that mean our own request is wrong (400, 405, 413):
    /// count and alert, they will not go away by themselves.
    pub fn is_our_bug(&self) -> bool {
        matches!(
            self,
            FinalFailure::BadRequest
                | FinalFailure::MethodNotAllowed
                | FinalFailure::PayloadTooLarge
        )
    }
}

/// What to do next with one push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// WNS accepted the wake-up. Done.
    Delivered,
    /// Done, not delivered, never to be retried.
    Failed(FinalFailure),
    /// The channel is dead (404, 410 expired/revoked, 403): mark it with this
    /// reason and schedule a PFN replacement. Done.
    ChannelDead(DeadReason),
    /// First 401: invalidate the token that was used, get a fresh one (one
    /// refresh in flight per credential) and resend now.
    RefreshTokenThenRetry,
    /// Resend after this wait (5xx, `channelthrottled`, 406/429).
    RetryAfter(Duration),
}

impl Decision {
    /// True when the caller must send the push again.
    pub fn is_retry(&self) -> bool {
        matches!(
            self,
            Decision::RefreshTokenThenRetry | Decision::RetryAfter(_)
        )
    }
}

/// Something the answer says about the whole credential, not just this push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialSignal {
    /// 406/429: pause every push under this credential for `pause` (feed it
    /// to [`CredentialThrottle::on_sender_throttled`]).
    Throttle {
        /// How long: `Retry-After`, or the policy's default.
        pause: Duration,
    },
    /// 410 Domain Blocked: stop sending under this credential and alert
    /// ([`CredentialThrottle::on_blocked`]).
    Blocked,
}

/// The machine's answer to one outcome: what to do with this push, and
/// what to do with its credential.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The push's next step.
    pub decision: Decision,
    /// Set for 406/429 and 410 Domain Blocked, even when the push itself
    /// fails: the credential must be slowed or stopped either way.
    pub credential: Option<CredentialSignal>,
}

impl Verdict {
    fn push(decision: Decision) -> Verdict {
        Verdict {
            decision,
            credential: None,
        }
    }
}

/// Where a push stands when a retry is decided: how long ago it started
/// (its place in [`RetryPolicy::window`]), the back-off level of its WNS
/// authority and credential, and a random draw for the jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetryContext {
    /// Time since the push started (its first request, or the wait for
    /// it).
    pub elapsed: Duration,
    /// The level of the push's [`RetryGate`](super::backoff::RetryGate)
    /// after this failure was recorded (at least 1 for a failure; 0 is
    /// read as 1).
    pub level: u32,
    /// A uniformly random `u64` from the caller (so tests are
    /// deterministic).
    pub jitter: u64,
}

/// Why a request got no answer, as far as the resend rule cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoAnswer {
    /// Its stream was refused or reset, or its connection went away
    /// gracefully (a GOAWAY) before processing it: the front end is
    /// working, so it is sent again at once.
    Retired,
    /// Its connect failed, or its connection died before answering: the
    /// front end is in trouble, so it is sent again after a back-off.
    ConnectionFailed,
}

/// What to do with a push whose request got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resend {
    /// Send it again now.
    Now,
    /// Send it again after this wait.
    After(Duration),
    /// [`RetryPolicy::max_unanswered_resends`] are spent: the push fails.
    Exhausted,
    /// The resend would go out after [`RetryPolicy::window`]: the push
    /// fails.
    WindowExhausted,
}

/// Retry state of one push: how many requests were sent and answered, how
/// many were sent again without an answer, whether the one token-refresh
/// retry was used, and whether it is finished.
///
/// Guarantees, whatever sequence of outcomes it is fed: permanent outcomes
/// end the push at once; the number of answered requests the caller is told
/// to send (the first plus every retry decision) never exceeds
/// [`RetryPolicy::max_attempts`], and the resends after no answer never
/// exceed [`RetryPolicy::max_unanswered_resends`]; no wait is asked for that
/// would end past [`RetryPolicy::window`] (but after `channelthrottled`);
/// the token-refresh retry is granted at most once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushAttempt {
    attempts: u32,
    unanswered: u32,
    token_refreshed: bool,
    finished: bool,
}

impl PushAttempt {
    /// A push about to be sent for the first time.
    pub fn new() -> PushAttempt {
        PushAttempt::default()
    }

    /// Requests sent and answered so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Requests sent again after no answer so far.
    pub fn unanswered_resends(&self) -> u32 {
        self.unanswered
    }

    /// Whether the one token-refresh retry has been used.
    pub fn token_refreshed(&self) -> bool {
        self.token_refreshed
    }

    /// Whether a final decision (delivered, failed, dead) has been given.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Records the answer to the request just sent and decides what next.
    ///
    /// 5xx waits are "equal jitter" on the level of the authority and
    /// credential (`ctx.level`): half of
    /// `min(base * 2^(level-1), max_backoff)` fixed plus a random part of
    /// the other half, so retries spread out but never come back
    /// instantly. A `Retry-After` wins over that: WNS's word is the wait.
    /// A 5xx or 406 retry that would go out after the window fails the
    /// push instead ([`FinalFailure::RetryWindowExhausted`]).
    ///
    /// Calling this again after a final decision is a caller bug: it answers
    /// `Failed(AttemptsExhausted)` and never asks for another send.
    pub fn on_outcome(
        &mut self,
        outcome: &Outcome,
        policy: &RetryPolicy,
        ctx: RetryContext,
    ) -> Verdict {
        if self.finished {
            return Verdict::push(Decision::Failed(FinalFailure::AttemptsExhausted {
                last: outcome.label(),
            }));
        }
        self.attempts = self.attempts.saturating_add(1);
        let verdict = self.decide(outcome, policy, ctx);
        self.finished = !verdict.decision.is_retry();
        verdict
    }

    /// Records a request that got no answer, for the reason `why`, and
    /// decides whether and when it is sent again. A resend after a
    /// connection failure waits the back-off of `ctx.level` (equal
    /// jitter, as for a 5xx); one after a retired stream goes at once.
    /// Either must go out within the window, and within
    /// [`RetryPolicy::max_unanswered_resends`].
    ///
    /// After a final decision it answers [`Resend::Exhausted`].
    pub fn on_no_answer(
        &mut self,
        why: NoAnswer,
        policy: &RetryPolicy,
        ctx: RetryContext,
    ) -> Resend {
        if self.finished || self.unanswered >= policy.max_unanswered_resends {
            self.finished = true;
            return Resend::Exhausted;
        }
        let wait = match why {
            NoAnswer::Retired => Duration::ZERO,
            NoAnswer::ConnectionFailed => backoff(policy, ctx.level.max(1), ctx.jitter),
        };
        if !within_window(policy, ctx.elapsed, wait) {
            self.finished = true;
            return Resend::WindowExhausted;
        }
        self.unanswered += 1;
        if wait.is_zero() {
            Resend::Now
        } else {
            Resend::After(wait)
        }
    }

    fn decide(&mut self, outcome: &Outcome, policy: &RetryPolicy, ctx: RetryContext) -> Verdict {
        use Decision::*;
        let fail = |f| Verdict::push(Failed(f));
        match *outcome {
            Outcome::Received => Verdict::push(Delivered),
            Outcome::Dropped => fail(FinalFailure::Dropped),
            Outcome::BadRequest => fail(FinalFailure::BadRequest),
            Outcome::MethodNotAllowed => fail(FinalFailure::MethodNotAllowed),
            Outcome::PayloadTooLarge => fail(FinalFailure::PayloadTooLarge),
            Outcome::Unexpected { status } => fail(FinalFailure::Unexpected { status }),
            Outcome::DomainBlocked => Verdict {
                decision: Failed(FinalFailure::DomainBlocked),
                credential: Some(CredentialSignal::Blocked),
            },
            Outcome::ChannelNotFound => Verdict::push(ChannelDead(DeadReason::Wns404)),
            Outcome::ChannelExpired { .. } => Verdict::push(ChannelDead(DeadReason::Wns410)),
            Outcome::CredentialMismatch => {
                Verdict::push(ChannelDead(DeadReason::CredentialMismatch))
            }
            Outcome::TokenRejected if self.token_refreshed => {
                fail(FinalFailure::TokenRejectedTwice)
            }
            Outcome::TokenRejected => {
                self.token_refreshed = true;
                self.retry(outcome, policy, RefreshTokenThenRetry)
            }
            Outcome::ChannelThrottled => {
                self.retry(outcome, policy, RetryAfter(policy.channel_throttle_backoff))
            }
            Outcome::SenderThrottled { retry_after } => {
                let pause = retry_after.unwrap_or(policy.sender_throttle_default);
                let decision = if pause > policy.max_retry_after {
                    Failed(FinalFailure::RetryAfterTooLong { retry_after: pause })
                } else {
                    self.retry_within(outcome, policy, ctx, pause).decision
                };
                Verdict {
                    decision,
                    credential: Some(CredentialSignal::Throttle { pause }),
                }
            }
            Outcome::ServerError { retry_after, .. } => match retry_after {
                Some(ra) if ra > policy.max_retry_after => {
                    fail(FinalFailure::RetryAfterTooLong { retry_after: ra })
                }
                _ => {
                    let wait = retry_after
                        .unwrap_or_else(|| backoff(policy, ctx.level.max(1), ctx.jitter));
                    self.retry_within(outcome, policy, ctx, wait)
                }
            },
        }
    }

    /// `decision` if the budget allows one more request, else exhaustion.
    fn retry(&self, outcome: &Outcome, policy: &RetryPolicy, decision: Decision) -> Verdict {
        if self.attempts >= policy.max_attempts.max(1) {
            Verdict::push(Decision::Failed(FinalFailure::AttemptsExhausted {
                last: outcome.label(),
            }))
        } else {
            Verdict::push(decision)
        }
    }

    /// A retry after `wait`, if the budget allows one more request and it
    /// would go out within the window.
    fn retry_within(
        &self,
        outcome: &Outcome,
        policy: &RetryPolicy,
        ctx: RetryContext,
        wait: Duration,
    ) -> Verdict {
        let verdict = self.retry(outcome, policy, Decision::RetryAfter(wait));
        if verdict.decision.is_retry() && !within_window(policy, ctx.elapsed, wait) {
            Verdict::push(Decision::Failed(FinalFailure::RetryWindowExhausted {
                last: outcome.label(),
            }))
        } else {
            verdict
        }
    }
}

/// Whether a request sent after waiting `wait`, `elapsed` into its push,
/// falls within the push's window.
fn within_window(policy: &RetryPolicy, elapsed: Duration, wait: Duration) -> bool {
    elapsed.saturating_add(wait) <= policy.window
}

/// Per-credential pause state after WNS throttled or blocked the sender.
///
/// Concurrent 406s from many in-flight pushes do not compound: the pause
/// ends at the latest `now + pause` reported, never later.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CredentialThrottle {
    paused_until_ms: u64,
    blocked: bool,
    throttle_events: u64,
}

impl CredentialThrottle {
    /// A credential that is neither paused nor blocked.
    pub fn new() -> CredentialThrottle {
        CredentialThrottle::default()
    }

    /// Records a 406/429 at `now_ms` asking for `pause`. Returns whether the
    /// pause was extended.
    pub fn on_sender_throttled(&mut self, now_ms: u64, pause: Duration) -> bool {
        self.throttle_events = self.throttle_events.saturating_add(1);
        let pause_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX);
        let until = now_ms.saturating_add(pause_ms);
        if until > self.paused_until_ms {
            self.paused_until_ms = until;
            true
        } else {
            false
        }
    }

    /// Records a 410 Domain Blocked: no sending until [`Self::unblock`].
    pub fn on_blocked(&mut self) {
        self.blocked = true;
    }

    /// Lifts a block (an operator decision, never automatic).
    pub fn unblock(&mut self) {
        self.blocked = false;
    }

    /// Whether WNS blocked this credential.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// First millisecond at which sending may resume; `u64::MAX` while
    /// blocked, `0` if never throttled.
    pub fn ready_at(&self) -> u64 {
        if self.blocked {
            u64::MAX
        } else {
            self.paused_until_ms
        }
    }

    /// Whether a push under this credential must wait at `now_ms`.
    pub fn is_paused(&self, now_ms: u64) -> bool {
        now_ms < self.ready_at()
    }

    /// How many 406/429 answers this credential has received in total.
    pub fn throttle_events(&self) -> u64 {
        self.throttle_events
    }
}

/// Token bucket for pacing bulk wake-ups: at most `burst` at once, then
/// `rate_per_sec` per second on average.
///
/// Integer arithmetic in thousandths of a token, so it is exact and never
/// drifts. Over any run of `take` calls between `t0` and `t1`, at most
/// `burst + floor(rate_per_sec * (t1 - t0) / 1000)` succeed. Time going backwards is treated as no time passing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pacer {
    rate_per_sec: u64,
    capacity: u64,
    level: u64,
    last_ms: u64,
}

/// One token in the pacer's internal units.
const UNIT: u64 = 1000;

impl Pacer {
    /// A full bucket at `now_ms`. `rate_per_sec` and `burst` below 1 are
    /// raised to 1: a pacer that never lets anything through is a
    /// configuration error better caught at config time.
    pub fn new(rate_per_sec: u32, burst: u32, now_ms: u64) -> Pacer {
        let capacity = u64::from(burst.max(1)) * UNIT;
        Pacer {
            rate_per_sec: u64::from(rate_per_sec.max(1)),
            capacity,
            level: capacity,
            last_ms: now_ms,
        }
    }

    /// Takes one token at `now_ms`, or says how many milliseconds (at least
    /// one) to wait before one will be available.
    pub fn take(&mut self, now_ms: u64) -> Result<(), u64> {
        self.refill(now_ms);
        if self.level >= UNIT {
            self.level -= UNIT;
            Ok(())
        } else {
            let missing = UNIT - self.level;
            Err(missing.div_ceil(self.rate_per_sec).max(1))
        }
    }

    /// Changes the rate from `now_ms` on, keeping the tokens already earned.
    pub fn set_rate(&mut self, rate_per_sec: u32, now_ms: u64) {
        self.refill(now_ms);
        self.rate_per_sec = u64::from(rate_per_sec.max(1));
    }

    /// The configured rate.
    pub fn rate_per_sec(&self) -> u32 {
        u32::try_from(self.rate_per_sec).unwrap_or(u32::MAX)
    }

    fn refill(&mut self, now_ms: u64) {
        let elapsed = now_ms.saturating_sub(self.last_ms);
        self.last_ms = self.last_ms.max(now_ms);
        let earned = elapsed.saturating_mul(self.rate_per_sec);
        self.level = self.level.saturating_add(earned).min(self.capacity);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: fn(u64) -> Duration = Duration::from_secs;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn server_error(retry_after: Option<Duration>) -> Outcome {
        Outcome::ServerError {
            status: 503,
            retry_after,
        }
    }

    /// A push `level` failures into its gate, early in its window.
    fn ctx(level: u32, jitter: u64) -> RetryContext {
        RetryContext {
            elapsed: Duration::ZERO,
            level,
            jitter,
        }
    }

    fn first(outcome: Outcome) -> Verdict {
        PushAttempt::new().on_outcome(&outcome, &RetryPolicy::default(), ctx(1, 0))
    }

    #[test]
    fn received_is_delivered() {
        assert_eq!(first(Outcome::Received).decision, Decision::Delivered);
    }

    #[test]
    fn permanent_outcomes_fail_at_once_and_distinctly() {
        let cases = [
            (Outcome::Dropped, FinalFailure::Dropped),
            (Outcome::BadRequest, FinalFailure::BadRequest),
            (Outcome::MethodNotAllowed, FinalFailure::MethodNotAllowed),
            (Outcome::PayloadTooLarge, FinalFailure::PayloadTooLarge),
            (
                Outcome::Unexpected { status: 402 },
                FinalFailure::Unexpected { status: 402 },
            ),
        ];
        let mut labels = std::collections::HashSet::new();
        for (o, f) in cases {
            let v = first(o);
            assert_eq!(v, Verdict::push(Decision::Failed(f)), "{o:?}");
            labels.insert(f.label());
        }
        assert_eq!(labels.len(), cases.len());
        assert!(FinalFailure::BadRequest.is_our_bug());
        assert!(!FinalFailure::Dropped.is_our_bug());
    }

    #[test]
    fn dead_channels() {
        let dead = |o| first(o).decision;
        assert_eq!(
            dead(Outcome::ChannelNotFound),
            Decision::ChannelDead(DeadReason::Wns404)
        );
        assert_eq!(
            dead(Outcome::ChannelExpired { revoked: false }),
            Decision::ChannelDead(DeadReason::Wns410)
        );
        assert_eq!(
            dead(Outcome::ChannelExpired { revoked: true }),
            Decision::ChannelDead(DeadReason::Wns410)
        );
        assert_eq!(
            dead(Outcome::CredentialMismatch),
            Decision::ChannelDead(DeadReason::CredentialMismatch)
        );
    }

    #[test]
    fn domain_blocked_fails_and_stops_the_credential() {
        assert_eq!(
            first(Outcome::DomainBlocked),
            Verdict {
                decision: Decision::Failed(FinalFailure::DomainBlocked),
                credential: Some(CredentialSignal::Blocked),
            }
        );
    }

    #[test]
    fn one_token_refresh_then_second_401_fails() {
        let p = RetryPolicy::default();
        let mut a = PushAttempt::new();
        assert_eq!(
            a.on_outcome(&Outcome::TokenRejected, &p, ctx(0, 0))
                .decision,
            Decision::RefreshTokenThenRetry
        );
        assert!(a.token_refreshed());
        assert!(a
            .on_outcome(&server_error(None), &p, ctx(1, 0))
            .decision
            .is_retry());
        assert_eq!(
            a.on_outcome(&Outcome::TokenRejected, &p, ctx(0, 0))
                .decision,
            Decision::Failed(FinalFailure::TokenRejectedTwice)
        );
        assert!(a.is_finished());
    }

    #[test]
    fn server_errors_back_off_by_the_gate_level_within_bounds() {
        let p = RetryPolicy {
            max_attempts: 10,
            window: S(3600),
            ..RetryPolicy::default()
        };
        let mut a = PushAttempt::new();
        // jitter 0 gives the lower bound (half), u64::MAX-ish the upper.
        let expected_low = [100, 200, 400, 800, 1600, 3200, 6400, 12800, 15000];
        for (level, low) in (1..).zip(expected_low) {
            let v = a.on_outcome(&server_error(None), &p, ctx(level, 0));
            let Decision::RetryAfter(d) = v.decision else {
                panic!("expected a retry");
            };
            assert_eq!(d, MS(low));
        }
        assert_eq!(
            a.on_outcome(&server_error(None), &p, ctx(10, 0)).decision,
            Decision::Failed(FinalFailure::AttemptsExhausted {
                last: "server_error"
            })
        );
        let mut b = PushAttempt::new();
        let top = b
            .on_outcome(&server_error(None), &p, ctx(1, 100_000_000))
            .decision;
        assert_eq!(top, Decision::RetryAfter(MS(200)));
        // The level is the gate's, not the push's own count: a push's
        // first 5xx in a long episode waits long.
        let mut c = PushAttempt::new();
        let late = c.on_outcome(&server_error(None), &p, ctx(6, 0)).decision;
        assert_eq!(late, Decision::RetryAfter(MS(3200)));
    }

    #[test]
    fn retry_after_wins_for_server_errors() {
        // Below the back-off: WNS's word is the wait.
        let v = PushAttempt::new().on_outcome(
            &server_error(Some(MS(50))),
            &RetryPolicy::default(),
            ctx(8, 0),
        );
        assert_eq!(v.decision, Decision::RetryAfter(MS(50)));
        let v = first(server_error(Some(S(20))));
        assert_eq!(v.decision, Decision::RetryAfter(S(20)));
        // Above max_backoff but within max_retry_after and the window:
        // honoured.
        let v = PushAttempt::new().on_outcome(
            &server_error(Some(S(120))),
            &RetryPolicy {
                window: S(600),
                ..RetryPolicy::default()
            },
            ctx(1, 0),
        );
        assert_eq!(v.decision, Decision::RetryAfter(S(120)));
        // Within max_retry_after but past the window: the push fails.
        let v = first(server_error(Some(S(120))));
        assert_eq!(
            v.decision,
            Decision::Failed(FinalFailure::RetryWindowExhausted {
                last: "server_error"
            })
        );
        // Above max_retry_after: not waited for, not retried early.
        let v = first(server_error(Some(S(3600))));
        assert_eq!(
            v.decision,
            Decision::Failed(FinalFailure::RetryAfterTooLong {
                retry_after: S(3600)
            })
        );
    }

    #[test]
    fn channel_throttled_backs_off_the_channel() {
        let v = first(Outcome::ChannelThrottled);
        assert_eq!(v.decision, Decision::RetryAfter(S(60)));
        assert_eq!(v.credential, None);
    }

    #[test]
    fn sender_throttled_pauses_the_credential() {
        let v = first(Outcome::SenderThrottled {
            retry_after: Some(S(5)),
        });
        assert_eq!(v.decision, Decision::RetryAfter(S(5)));
        assert_eq!(
            v.credential,
            Some(CredentialSignal::Throttle { pause: S(5) })
        );
        let v = PushAttempt::new().on_outcome(
            &Outcome::SenderThrottled { retry_after: None },
            &RetryPolicy::default(),
            ctx(1, 0),
        );
        // The default pause fills the whole window: allowed at the start.
        assert_eq!(v.decision, Decision::RetryAfter(S(60)));
        assert_eq!(
            v.credential,
            Some(CredentialSignal::Throttle { pause: S(60) })
        );
        // Too long for this push, but the credential still pauses.
        let v = first(Outcome::SenderThrottled {
            retry_after: Some(S(7200)),
        });
        assert_eq!(
            v.decision,
            Decision::Failed(FinalFailure::RetryAfterTooLong {
                retry_after: S(7200)
            })
        );
        assert_eq!(
            v.credential,
            Some(CredentialSignal::Throttle { pause: S(7200) })
        );
    }

    #[test]
    fn throttle_signal_survives_exhaustion() {
        let p = RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        };
        let v = PushAttempt::new().on_outcome(
            &Outcome::SenderThrottled { retry_after: None },
            &p,
            ctx(1, 0),
        );
        assert_eq!(
            v.decision,
            Decision::Failed(FinalFailure::AttemptsExhausted {
                last: "sender_throttled"
            })
        );
        assert!(v.credential.is_some());
    }

    #[test]
    fn zero_max_attempts_behaves_as_one() {
        let p = RetryPolicy {
            max_attempts: 0,
            ..RetryPolicy::default()
        };
        let v = PushAttempt::new().on_outcome(&Outcome::TokenRejected, &p, ctx(0, 0));
        assert!(!v.decision.is_retry());
    }

    #[test]
    fn after_a_final_decision_nothing_is_retried() {
        let p = RetryPolicy::default();
        let mut a = PushAttempt::new();
        assert_eq!(
            a.on_outcome(&Outcome::Received, &p, ctx(0, 0)).decision,
            Decision::Delivered
        );
        let again = a.on_outcome(&server_error(None), &p, ctx(1, 0)).decision;
        assert!(!again.is_retry());
        assert_eq!(a.attempts(), 1);
    }

    #[test]
    fn credential_throttle_takes_the_latest_end() {
        let mut t = CredentialThrottle::new();
        assert!(!t.is_paused(0));
        assert!(t.on_sender_throttled(1_000, S(5)));
        assert!(!t.on_sender_throttled(2_000, S(1)));
        assert_eq!(t.ready_at(), 6_000);
        assert!(t.is_paused(5_999));
        assert!(!t.is_paused(6_000));
        assert!(t.on_sender_throttled(3_000, S(10)));
        assert_eq!(t.ready_at(), 13_000);
        assert_eq!(t.throttle_events(), 3);
        assert!(t.on_sender_throttled(u64::MAX - 1, Duration::MAX));
        assert_eq!(t.ready_at(), u64::MAX);
    }

    #[test]
    fn credential_block_is_sticky_until_lifted() {
        let mut t = CredentialThrottle::new();
        t.on_blocked();
        assert!(t.is_blocked());
        assert!(t.is_paused(u64::MAX - 1));
        assert_eq!(t.ready_at(), u64::MAX);
        t.unblock();
        assert!(!t.is_paused(0));
    }

    #[test]
    fn pacer_allows_burst_then_rate() {
        let mut p = Pacer::new(10, 3, 1_000);
        for _ in 0..3 {
            assert_eq!(p.take(1_000), Ok(()));
        }
        assert_eq!(p.take(1_000), Err(100));
        assert_eq!(p.take(1_050), Err(50));
        assert_eq!(p.take(1_100), Ok(()));
        assert_eq!(p.take(1_100), Err(100));
        // A long idle period refills to burst, not beyond.
        for _ in 0..3 {
            assert_eq!(p.take(100_000), Ok(()));
        }
        assert!(p.take(100_000).is_err());
        p.set_rate(1000, 100_000);
        assert_eq!(p.take(100_000), Err(1));
        assert_eq!(p.take(100_001), Ok(()));
    }

    #[test]
    fn pacer_ignores_time_going_backwards() {
        let mut p = Pacer::new(1, 1, 10_000);
        assert_eq!(p.take(10_000), Ok(()));
        assert!(p.take(5_000).is_err());
        assert_eq!(p.take(10_999), Err(1));
        assert_eq!(p.take(11_000), Ok(()));
    }

    #[test]
    fn no_answer_after_a_connection_failure_waits_the_gate_back_off() {
        let p = RetryPolicy::default();
        let mut a = PushAttempt::new();
        let waits: Vec<Resend> = (1..=5)
            .map(|level| a.on_no_answer(NoAnswer::ConnectionFailed, &p, ctx(level, 0)))
            .collect();
        assert_eq!(
            waits,
            [100, 200, 400, 800, 1600].map(|ms| Resend::After(MS(ms)))
        );
        // The count is spent.
        assert_eq!(
            a.on_no_answer(NoAnswer::ConnectionFailed, &p, ctx(6, 0)),
            Resend::Exhausted
        );
        assert!(a.is_finished());
        assert_eq!(a.unanswered_resends(), 5);
    }

    #[test]
    fn a_retired_stream_is_resent_at_once_within_the_same_count() {
        let p = RetryPolicy::default();
        let mut a = PushAttempt::new();
        for _ in 0..5 {
            assert_eq!(
                a.on_no_answer(NoAnswer::Retired, &p, ctx(9, 0)),
                Resend::Now
            );
        }
        assert_eq!(
            a.on_no_answer(NoAnswer::Retired, &p, ctx(9, 0)),
            Resend::Exhausted
        );
        // Answered attempts are a budget of their own.
        let mut b = PushAttempt::new();
        for _ in 0..5 {
            let _ = b.on_no_answer(NoAnswer::Retired, &p, ctx(1, 0));
        }
        assert_eq!(
            b.on_outcome(&server_error(None), &p, ctx(1, 0)).decision,
            Decision::RetryAfter(MS(100))
        );
    }

    #[test]
    fn no_resend_goes_out_past_the_window() {
        let p = RetryPolicy {
            window: S(5),
            ..RetryPolicy::default()
        };
        let at = |elapsed_ms, level| RetryContext {
            elapsed: MS(elapsed_ms),
            level,
            jitter: 0,
        };
        // 4.9 s in, level 1 (at least 100 ms): it fits exactly.
        let mut a = PushAttempt::new();
        assert_eq!(
            a.on_no_answer(NoAnswer::ConnectionFailed, &p, at(4_900, 1)),
            Resend::After(MS(100))
        );
        // 4.9 s in, level 2 (at least 200 ms): past the window.
        assert_eq!(
            a.on_no_answer(NoAnswer::ConnectionFailed, &p, at(4_900, 2)),
            Resend::WindowExhausted
        );
        assert!(a.is_finished());
        // Even an immediate resend does not go out once the window is over.
        let mut b = PushAttempt::new();
        assert_eq!(
            b.on_no_answer(NoAnswer::Retired, &p, at(5_001, 1)),
            Resend::WindowExhausted
        );
        // Answers too: a 5xx late in the window ends the push.
        let mut c = PushAttempt::new();
        assert_eq!(
            c.on_outcome(&server_error(None), &p, at(4_950, 1)).decision,
            Decision::Failed(FinalFailure::RetryWindowExhausted {
                last: "server_error"
            })
        );
        // A 406 whose pause runs past the window: the push ends, the
        // credential still pauses.
        let v = PushAttempt::new().on_outcome(
            &Outcome::SenderThrottled {
                retry_after: Some(S(10)),
            },
            &p,
            at(0, 1),
        );
        assert_eq!(
            v,
            Verdict {
                decision: Decision::Failed(FinalFailure::RetryWindowExhausted {
                    last: "sender_throttled"
                }),
                credential: Some(CredentialSignal::Throttle { pause: S(10) }),
            }
        );
        // A channel's own throttle is not bound by the window.
        let v = PushAttempt::new().on_outcome(&Outcome::ChannelThrottled, &p, at(4_000, 1));
        assert_eq!(v.decision, Decision::RetryAfter(S(60)));
    }

    fn any_outcome() -> impl Strategy<Value = Outcome> {
        let ra = proptest::option::of((0u64..4000).prop_map(S));
        prop_oneof![
            Just(Outcome::Received),
            Just(Outcome::Dropped),
            Just(Outcome::ChannelThrottled),
            Just(Outcome::BadRequest),
            Just(Outcome::TokenRejected),
            Just(Outcome::CredentialMismatch),
            Just(Outcome::ChannelNotFound),
            Just(Outcome::MethodNotAllowed),
            ra.clone()
                .prop_map(|retry_after| Outcome::SenderThrottled { retry_after }),
            any::<bool>().prop_map(|revoked| Outcome::ChannelExpired { revoked }),
            Just(Outcome::DomainBlocked),
            Just(Outcome::PayloadTooLarge),
            (500u16..600, ra).prop_map(|(status, retry_after)| Outcome::ServerError {
                status,
                retry_after
            }),
            any::<u16>().prop_map(|status| Outcome::Unexpected { status }),
        ]
    }

    fn is_transient(o: &Outcome) -> bool {
        matches!(
            o,
            Outcome::TokenRejected
                | Outcome::ChannelThrottled
                | Outcome::SenderThrottled { .. }
                | Outcome::ServerError { .. }
        )
    }

    proptest! {
        /// Answered and unanswered requests mixed, each a step later in
        /// the window: the budgets in count and in time both hold.
        #[test]
        fn sends_never_exceed_the_budget(
            steps in proptest::collection::vec(
                (proptest::option::of(any_outcome()), any::<bool>(), 0u64..20_000, 0u32..12, any::<u64>()),
                1..40,
            ),
            max_attempts in 0u32..8,
            max_unanswered_resends in 0u32..8,
            window_secs in 1u64..120,
        ) {
            let policy = RetryPolicy {
                max_attempts,
                max_unanswered_resends,
                window: S(window_secs),
                ..RetryPolicy::default()
            };
            let mut push = PushAttempt::new();
            let mut answered = 0u32;
            let mut resent = 0u32;
            let mut refreshes = 0;
            let mut elapsed = Duration::ZERO;
            for (o, connection, dt, level, jitter) in steps {
                elapsed += MS(dt);
                let ctx = RetryContext { elapsed, level, jitter };
                let wait = match o {
                    None => {
                        let why = if connection { NoAnswer::ConnectionFailed } else { NoAnswer::Retired };
                        match push.on_no_answer(why, &policy, ctx) {
                            Resend::Now => {
                                prop_assert_eq!(why, NoAnswer::Retired);
                                Duration::ZERO
                            }
                            Resend::After(d) => {
                                prop_assert_eq!(why, NoAnswer::ConnectionFailed);
                                prop_assert!(d >= backoff(&policy, level.max(1), 0));
                                prop_assert!(d <= policy.max_backoff);
                                d
                            }
                            Resend::Exhausted | Resend::WindowExhausted => {
                                prop_assert!(push.is_finished());
                                break;
                            }
                        }
                    }
                    Some(o) => {
                        answered += 1;
                        let v = push.on_outcome(&o, &policy, ctx);
                        if !is_transient(&o) {
                            prop_assert!(!v.decision.is_retry(), "{o:?} retried");
                        }
                        match v.decision {
                            Decision::RefreshTokenThenRetry => {
                                refreshes += 1;
                                Duration::ZERO
                            }
                            Decision::RetryAfter(d) => {
                                let bound = policy.max_backoff
                                    .max(policy.channel_throttle_backoff)
                                    .max(policy.sender_throttle_default)
                                    .max(policy.max_retry_after);
                                prop_assert!(d <= bound);
                                if let Outcome::ServerError { retry_after: Some(ra), .. } = o {
                                    prop_assert_eq!(d, ra);
                                }
                                if o != Outcome::ChannelThrottled {
                                    prop_assert!(elapsed + d <= policy.window);
                                }
                                d
                            }
                            _ => {
                                prop_assert!(push.is_finished());
                                break;
                            }
                        }
                    }
                };
                if o.is_none() {
                    resent += 1;
                }
                elapsed += wait;
            }
            prop_assert!(answered <= max_attempts.max(1));
            prop_assert!(resent <= max_unanswered_resends);
            prop_assert_eq!(push.unanswered_resends(), resent);
            prop_assert!(refreshes <= 1);
        }

        #[test]
        fn pacer_never_exceeds_burst_plus_rate(
            rate in 1u32..2000, burst in 1u32..50,
            steps in proptest::collection::vec(0u64..50, 1..500),
        ) {
            let t0 = 1_000u64;
            let mut p = Pacer::new(rate, burst, t0);
            let mut now = t0;
            let mut granted = 0u64;
            for step in steps {
                now += step;
                match p.take(now) {
                    Ok(()) => granted += 1,
                    Err(wait) => {
                        prop_assert!(wait >= 1);
                        // Waiting exactly as told is enough.
                        let mut probe = p.clone();
                        prop_assert_eq!(probe.take(now + wait), Ok(()));
                    }
                }
            }
            let allowed = u64::from(burst) + u64::from(rate) * (now - t0) / 1000;
            prop_assert!(granted <= allowed, "{granted} > {allowed}");
        }
    }
}
