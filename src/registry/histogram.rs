//! Devices counted by the minute their channel was issued, so that the
//! number of devices in each age-based state is a walk over minutes, not
//! over devices.
//!
//! Records with a dead mark are counted apart: they are `expired` whatever
//! their age. The counts are split over shards chosen by a hash of the
//! device id, so concurrent upserts of different devices rarely meet on a
//! lock, and a device's own increments and decrements always land on the
//! same shard (at rest, every count is then the true number of devices).

use super::record::CompactRecord;
use super::StateCounts;
use crate::core::{LifecycleState, RefreshState, Thresholds, UnixTime};
use parking_lot::Mutex;
use std::collections::HashMap;

/// Shards: twice the cores, at least 4 and at most 32. Every shard holds
/// its own entry for each minute its devices were issued in, so more shards
/// cost memory (about 20 bytes per minute per shard) as well as saving
/// contention.
fn shard_count() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (2 * cores).next_power_of_two().clamp(4, 32)
}

/// Where one record is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bucket {
    /// No dead mark: counted under the minute of `issued_at`.
    Live { minute: u32 },
    /// Dead-marked: counted as expired.
    Dead,
    /// In the refresh queue, or given up: counted by that state.
    Refresh(RefreshState),
}

impl Bucket {
    /// The bucket of a record with these marks.
    pub(crate) fn from_marks(
        issued_at: UnixTime,
        dead: bool,
        refresh: Option<RefreshState>,
    ) -> Bucket {
        match (refresh, dead) {
            (Some(state), _) => Bucket::Refresh(state),
            (None, true) => Bucket::Dead,
            (None, false) => Bucket::Live {
                minute: issued_at.0 / 60,
            },
        }
    }

    pub(crate) fn of(rec: &CompactRecord) -> Bucket {
        if let Some(m) = rec.refresh() {
            return Bucket::Refresh(m.state);
        }
        match rec.dead() {
            Some(_) => Bucket::Dead,
            None => Bucket::Live {
                minute: rec.issued_at().0 / 60,
            },
        }
    }
}

#[derive(Default)]
struct Shard {
    /// Devices per minute; signed because a racing remove's decrement may
    /// be applied before the matching insert's increment. Zero counts are
    /// removed. Hashed, not ordered: every registration updates it, and
    /// the counts walk all of it in any order.
    minutes: HashMap<u32, i64, foldhash::fast::FixedState>,
    dead: i64,
    pending: i64,
    unreachable: i64,
}

impl Shard {
    fn add(&mut self, b: Bucket, n: i64) {
        match b {
            Bucket::Dead => self.dead += n,
            Bucket::Refresh(RefreshState::Pending) => self.pending += n,
            Bucket::Refresh(RefreshState::Unreachable) => self.unreachable += n,
            Bucket::Live { minute } => {
                let c = self.minutes.entry(minute).or_insert(0);
                *c += n;
                if *c == 0 {
                    self.minutes.remove(&minute);
                }
            }
        }
    }
}

impl Shard {
    fn merge(&mut self, other: Shard) {
        self.dead += other.dead;
        self.pending += other.pending;
        self.unreachable += other.unreachable;
        for (minute, n) in other.minutes {
            self.add(Bucket::Live { minute }, n);
        }
    }
}

/// Keeps the line between shards' locks off one cache line each.
#[repr(align(128))]
struct Padded(Mutex<Shard>);

pub(crate) struct Histogram {
    shards: Box<[Padded]>,
}

impl Histogram {
    pub(crate) fn new() -> Histogram {
        Histogram {
            shards: (0..shard_count())
                .map(|_| Padded(Mutex::new(Shard::default())))
                .collect(),
        }
    }

    /// Moves a device from bucket `from` (where it was counted before, if
    /// anywhere) to `to` (where it is counted now, if anywhere). `spread` is
    /// the device's [`RecordKey::spread`](super::RecordKey::spread).
    pub(crate) fn shift(&self, spread: u32, from: Option<Bucket>, to: Option<Bucket>) {
        if from == to {
            return;
        }
        let mut shard = self.shards[spread as usize % self.shards.len()].0.lock();
        if let Some(b) = from {
            shard.add(b, -1);
        }
        if let Some(b) = to {
            shard.add(b, 1);
        }
    }

    /// Counts many devices at once (loading at start): each `(spread,
    /// bucket)` is added to the shard `shift` would add it to, one lock per
    /// shard.
    pub(crate) fn add_many(&self, adds: impl IntoIterator<Item = (u32, Bucket)>) {
        let mut local: Vec<Shard> = (0..self.shards.len()).map(|_| Shard::default()).collect();
        for (spread, b) in adds {
            local[spread as usize % self.shards.len()].add(b, 1);
        }
        for (shard, counted) in self.shards.iter().zip(local) {
            shard.0.lock().merge(counted);
        }
    }

    /// Devices by state at `now`. Each minute is classified by its first
    /// second, so a device is counted exactly unless a threshold falls
    /// between the start of its minute and its `issued_at`.
    pub(crate) fn counts(&self, th: &Thresholds, now: UnixTime) -> StateCounts {
        let mut sums = [0i64; 5];
        for shard in self.shards.iter() {
            let shard = shard.0.lock();
            sums[index(LifecycleState::Expired)] += shard.dead;
            sums[index(LifecycleState::RefreshPending)] += shard.pending;
            sums[index(LifecycleState::Unreachable)] += shard.unreachable;
            for (&minute, &n) in &shard.minutes {
                let start = UnixTime(minute * 60);
                sums[index(th.state_at(start, None, now).state)] += n;
            }
        }
        sums.map(|n| u64::try_from(n).unwrap_or(0))
    }
}

fn index(s: LifecycleState) -> usize {
    LifecycleState::ALL
        .iter()
        .position(|&x| x == s)
        .unwrap_or(0)
}
