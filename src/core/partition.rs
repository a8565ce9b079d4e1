//! Which partition a device belongs to.
//!
//! The durable state is split into P partitions, fixed when the data is
//! created and recorded with it; a start with another P is refused. A
//! device's partition is
//!
//! ```text
//! XXH3-64(device id bytes, seed 0x7773_6761_7465_0001) mod P
//! ```
//!
//! XXH3's output is frozen by its specification (since xxHash 0.8.0), and
//! the seed is a constant, so the same id maps to the same partition on
//! every version and every machine. (foldhash and the standard library's
//! hashers are seeded per process: never use them for this.) Pinned values
//! in the tests catch any change.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The hash's seed: a constant, part of the on-disk format.
pub const PARTITION_SEED: u64 = 0x7773_6761_7465_0001;
/// Partitions of new data when the configuration names none.
pub const PARTITIONS_DEFAULT: u16 = 1024;
/// The most partitions data may have.
pub const PARTITIONS_MAX: u16 = 4096;

/// Why a partition count is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the partition count must be 1 to {PARTITIONS_MAX}, not {0}")]
pub struct BadCount(pub u32);

/// A fixed number of partitions and the map from device ids onto them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partitioning {
    count: u16,
}

impl Default for Partitioning {
    fn default() -> Partitioning {
        Partitioning {
            count: PARTITIONS_DEFAULT,
        }
    }
}

impl Partitioning {
    /// `count` partitions, 1 to [`PARTITIONS_MAX`].
    pub fn new(count: u32) -> Result<Partitioning, BadCount> {
        match u16::try_from(count) {
            Ok(c) if (1..=PARTITIONS_MAX).contains(&c) => Ok(Partitioning { count: c }),
            _ => Err(BadCount(count)),
        }
    }

    pub fn count(self) -> u16 {
        self.count
    }

    /// The partition of `device_id`, `0..count`.
    pub fn of(self, device_id: &str) -> u16 {
        (xxh3_64_with_seed(device_id.as_bytes(), PARTITION_SEED) % u64::from(self.count)) as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Part of the on-disk format: these must never change. The values
    /// agree with xxHash's reference C implementation (for example
    /// `xxhash.xxh3_64_intdigest(id, seed=PARTITION_SEED) % 64` in Python's
    /// `xxhash` package).
    #[test]
    fn partitions_are_pinned() {
        let p64 = Partitioning::new(64).unwrap();
        let p7 = Partitioning::new(7).unwrap();
        let pinned: [(&str, u16, u16); 4] = [
            ("6f1c2a9e-3b1d-4c55-9a0e-2f6f0d7b8c11", 32, 2),
            ("{6F1C2A9E-3B1D-4C55-9A0E-2F6F0D7B8C11}", 34, 1),
            ("dev-1", 50, 3),
            ("a", 1, 0),
        ];
        let seen: Vec<(&str, u16, u16)> = pinned
            .iter()
            .map(|(id, _, _)| (*id, p64.of(id), p7.of(id)))
            .collect();
        assert_eq!(seen, pinned);
    }

    #[test]
    fn counts_out_of_range_are_refused() {
        assert_eq!(Partitioning::new(0), Err(BadCount(0)));
        assert_eq!(Partitioning::new(4097), Err(BadCount(4097)));
        assert_eq!(Partitioning::new(70_000), Err(BadCount(70_000)));
        assert_eq!(Partitioning::new(1).unwrap().of("anything"), 0);
    }

    #[test]
    fn a_fleet_spreads_evenly() {
        let p = Partitioning::new(64).unwrap();
        let mut counts = [0u32; 64];
        for i in 0..64_000 {
            counts[usize::from(p.of(&format!("device-{i:08}")))] += 1;
        }
        // 1000 expected per partition; a fair hash stays well within 20%.
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }

    proptest! {
        #[test]
        fn every_id_lands_in_range(id in "[ -~]{1,128}", count in 1u32..=4096) {
            let p = Partitioning::new(count).unwrap();
            prop_assert!(u32::from(p.of(&id)) < count);
        }
    }
}
