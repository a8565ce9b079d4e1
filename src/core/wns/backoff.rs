//! How long a retry waits: exponential back-off with jitter, its level
//! shared by every push to one WNS authority under one credential.
//!
//! A push that meets a 5xx, a lost connection or a failed connect waits
//! before it is sent again. The wait grows with how long its authority and
//! credential have been failing ([`RetryGate`]), not with how many
//! requests failed: a thousand pushes failing in the same second raise the
//! level once, as one push failing once would, and the level climbs by one
//! only after the shortest wait at the current level has passed. An answer
//! that is not such a failure ends the episode and the level drops to 0.
//!
//! Times are caller-supplied monotonic milliseconds; randomness is a
//! caller-supplied `u64`.

use super::retry::RetryPolicy;
use std::time::Duration;

/// Highest level a gate reaches. With the default policy the back-off is
/// capped from level 9 on (200 ms * 2^8 > 30 s); the bound only keeps the
/// arithmetic finite.
pub const MAX_LEVEL: u32 = 32;

/// The "equal jitter" back-off at `level` (>= 1): half of
/// `min(base * 2^(level-1), max_backoff)` fixed plus `jitter` spread over
/// the other half, so waits spread out but never come back instantly.
pub fn backoff(policy: &RetryPolicy, level: u32, jitter: u64) -> Duration {
    let exp = ceiling(policy, level);
    let half = exp / 2;
    let spread = u64::try_from((exp - half).as_nanos()).unwrap_or(u64::MAX);
    let random = match spread.checked_add(1) {
        Some(n) => jitter % n,
        None => jitter,
    };
    half + Duration::from_nanos(random)
}

/// The shortest back-off at `level`: the fixed half of [`backoff`].
pub fn shortest_backoff(policy: &RetryPolicy, level: u32) -> Duration {
    ceiling(policy, level) / 2
}

/// `min(base * 2^(level-1), max_backoff)` for `level` >= 1.
fn ceiling(policy: &RetryPolicy, level: u32) -> Duration {
    let shift = level.max(1).saturating_sub(1).min(31);
    policy
        .base
        .checked_mul(1u32 << shift)
        .unwrap_or(policy.max_backoff)
        .min(policy.max_backoff)
}

/// The back-off level of one WNS authority under one credential: how long
/// they have been failing, in doublings of the base wait.
///
/// Guarantees: the level is 0 until a failure; a failure raises it by at
/// most one, and only once the shortest wait at the current level
/// ([`shortest_backoff`]) has passed since the last raise, so a burst of
/// failures raises it once; it never exceeds [`MAX_LEVEL`]; a success sets
/// it to 0.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryGate {
    level: u32,
    raised_at_ms: u64,
}

impl RetryGate {
    /// A gate that has seen no failure.
    pub fn new() -> RetryGate {
        RetryGate::default()
    }

    /// The current level (0: not failing).
    pub fn level(&self) -> u32 {
        self.level
    }

    /// Records a failure at `now_ms` (a 5xx, a 406, a lost connection, a
    /// failed connect) and returns the level the failed push backs off at.
    pub fn on_failure(&mut self, now_ms: u64, policy: &RetryPolicy) -> u32 {
        let due = self.level == 0
            || now_ms
                >= self.raised_at_ms.saturating_add(
                    u64::try_from(shortest_backoff(policy, self.level).as_millis())
                        .unwrap_or(u64::MAX),
                );
        if due && self.level < MAX_LEVEL {
            self.level += 1;
            self.raised_at_ms = now_ms;
        }
        self.level
    }

    /// Records an answer that is not a failure: the episode is over.
    /// Returns whether the gate was failing.
    pub fn on_success(&mut self) -> bool {
        let was = self.level > 0;
        self.level = 0;
        was
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn backoff_doubles_per_level_with_equal_jitter_and_a_cap() {
        let p = RetryPolicy::default();
        let low: Vec<Duration> = (1..=10).map(|l| backoff(&p, l, 0)).collect();
        assert_eq!(
            low,
            [100, 200, 400, 800, 1600, 3200, 6400, 12800, 15000, 15000].map(MS)
        );
        // The largest draw gives the whole ceiling.
        assert_eq!(backoff(&p, 1, 100_000_000), MS(200));
        assert!(backoff(&p, 20, u64::MAX) <= Duration::from_secs(30));
        assert_eq!(backoff(&p, 0, 0), backoff(&p, 1, 0));
        assert_eq!(shortest_backoff(&p, 3), MS(400));
    }

    #[test]
    fn a_burst_of_failures_raises_the_level_once() {
        let p = RetryPolicy::default();
        let mut g = RetryGate::new();
        assert_eq!(g.level(), 0);
        // A thousand pushes failing within the same 99 ms.
        for i in 0..1000 {
            assert_eq!(g.on_failure(1_000 + i / 10, &p), 1);
        }
        // The shortest wait at level 1 (100 ms) has passed.
        assert_eq!(g.on_failure(1_100, &p), 2);
        assert_eq!(g.on_failure(1_299, &p), 2);
        assert_eq!(g.on_failure(1_300, &p), 3);
        assert!(g.on_success());
        assert!(!g.on_success());
        assert_eq!(g.on_failure(1_301, &p), 1);
    }

    #[test]
    fn the_level_follows_the_length_of_the_failure() {
        // One failure every 10 ms for a minute: the level is about
        // log2(elapsed / base) + 1, whatever the number of failures.
        let p = RetryPolicy::default();
        let mut g = RetryGate::new();
        let mut level_at = Vec::new();
        for t in (0..=60_000u64).step_by(10) {
            let l = g.on_failure(t, &p);
            if t % 2_000 == 0 {
                level_at.push((t, l));
            }
        }
        assert_eq!(level_at[0], (0, 1));
        assert_eq!(level_at[1], (2_000, 5));
        // Capped waits from level 9 on: one more level per 15 s.
        assert!(level_at.last().unwrap().1 <= 12, "{level_at:?}");
    }

    proptest! {
        #[test]
        fn the_gate_never_jumps_or_overflows(
            steps in proptest::collection::vec((0u64..5_000, any::<bool>()), 1..300),
        ) {
            let p = RetryPolicy::default();
            let mut g = RetryGate::new();
            let mut now = 0u64;
            for (dt, ok) in steps {
                now += dt;
                let before = g.level();
                if ok {
                    g.on_success();
                    prop_assert_eq!(g.level(), 0);
                } else {
                    let l = g.on_failure(now, &p);
                    prop_assert!(l == before || l == before + 1);
                    prop_assert!((1..=MAX_LEVEL).contains(&l));
                }
            }
        }

        #[test]
        fn backoff_stays_within_half_and_the_ceiling(level in 0u32..64, jitter in any::<u64>()) {
            let p = RetryPolicy::default();
            let d = backoff(&p, level, jitter);
            let ceiling = ceiling(&p, level);
            prop_assert!(d >= ceiling / 2 && d <= ceiling);
            prop_assert!(d <= p.max_backoff);
        }
    }
}
