//! The gateway's only readings of time, and its only source of randomness.
//!
//! Everything else is handed `now` (see the core's style: time is a value
//! passed in), or calls one of these. A `clippy.toml` at the repository's
//! root forbids the standard library's, tokio's and rand's readers
//! elsewhere, so a test that fixes these fixes them for the whole gateway.
//!
//! - [`now`]: wall-clock time, whole seconds, for records and answers;
//! - [`instant`] (and [`tokio_instant`]): a monotonic instant, for
//!   deadlines and durations. It is tokio's clock, so a test on a runtime
//!   with paused time (`tokio::time::pause`) controls it;
//! - [`monotonic_ms`]: milliseconds on the same clock since the process
//!   first asked, for the core's state machines that count in integers;
//! - [`random`]: a random value from this thread's generator, seeded from
//!   the process seed ([`seed`]), or fixed by a test ([`seed_this_thread`]).

#![allow(clippy::disallowed_methods)]

use crate::core::UnixTime;
use rand::distr::{Distribution, StandardUniform};
use rand::{Rng, SeedableRng, TryRngCore};
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The current wall-clock time. A clock before 1970 reads as 0, one past
/// 2106 as [`UnixTime::MAX`].
pub fn now() -> UnixTime {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    UnixTime(u32::try_from(secs).unwrap_or(u32::MAX))
}

/// The current monotonic instant (tokio's clock: paused time applies).
pub fn instant() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// [`instant`] as tokio's type, for deadlines of tokio timers.
pub fn tokio_instant() -> tokio::time::Instant {
    tokio::time::Instant::now()
}

/// Milliseconds on the monotonic clock since the process first read it.
pub fn monotonic_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(instant);
    instant().saturating_duration_since(start).as_millis() as u64
}

/// The process seed, set by [`seed`] or drawn from the operating system at
/// the first random draw.
static SEED: OnceLock<u64> = OnceLock::new();
/// Threads that drew a random number so far: each gets its own stream.
static STREAMS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static RNG: RefCell<rand::rngs::StdRng> = RefCell::new({
        // Without an operating-system generator the seed is 0: still
        // correct, only predictable.
        let seed = *SEED.get_or_init(|| rand::rngs::OsRng.try_next_u64().unwrap_or(0));
        let stream = STREAMS.fetch_add(1, Ordering::Relaxed);
        rand::rngs::StdRng::seed_from_u64(seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    });
}

/// Fixes the process seed, so that the same threads draw the same numbers
/// in the same order. Takes effect only before the first random draw;
/// returns whether it did.
pub fn seed(seed: u64) -> bool {
    SEED.set(seed).is_ok()
}

/// Replaces the calling thread's generator with one seeded from `seed`:
/// what this thread draws from now on is fixed (a test's single-threaded
/// runtime draws on the test's thread).
pub fn seed_this_thread(seed: u64) {
    RNG.with(|r| *r.borrow_mut() = rand::rngs::StdRng::seed_from_u64(seed));
}

/// A random value from the calling thread's generator.
pub fn random<T>() -> T
where
    StandardUniform: Distribution<T>,
{
    RNG.with(|r| r.borrow_mut().random())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_clock_is_after_2026() {
        assert!(now().0 > 1_767_225_600);
    }

    #[tokio::test(start_paused = true)]
    async fn paused_time_moves_the_monotonic_clock() {
        let (a, ms) = (instant(), monotonic_ms());
        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
        assert_eq!(instant().duration_since(a).as_secs(), 3600);
        assert_eq!(monotonic_ms() - ms, 3_600_000);
    }

    #[test]
    fn a_seeded_thread_draws_the_same_numbers() {
        seed_this_thread(7);
        let first: [u64; 3] = [random(), random(), random()];
        seed_this_thread(7);
        let again: [u64; 3] = [random(), random(), random()];
        assert_eq!(first, again);
        seed_this_thread(8);
        assert_ne!(random::<u64>(), first[0]);
    }

    #[test]
    fn threads_draw_different_numbers() {
        let here: u64 = random();
        let there: u64 = std::thread::spawn(random::<u64>).join().unwrap();
        assert_ne!(here, there);
    }
}
