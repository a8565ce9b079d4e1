//! Which node serves which partition: heartbeats, leases and rendezvous
//! hashing over the live nodes.
//!
//! - **Heartbeats.** Every node puts its id and API address into the
//!   key-value bucket `wnsgate-nodes` every third of `cluster.lease_ttl`.
//!   The bucket keeps a value for `lease_ttl` only, so a node that stops
//!   renewing drops out of it.
//! - **Who should own what.** Partition `p` belongs to the live node with
//!   the highest `XXH3-64(node id, seed p)`: rendezvous hashing, so a node
//!   joining or leaving moves only its own share.
//! - **Leases.** A node serves a partition only while it holds the key
//!   `p<partition>` in the bucket `wnsgate-leases`. It takes a free key with
//!   create, renews it with compare-and-set on its revision, and the bucket
//!   drops a key not renewed within `lease_ttl`. A node that should own a
//!   partition another node holds waits: the holder lets go once it sees
//!   the new owner live (after its last append is acknowledged), or its
//!   lease lapses.
//! - **No stale answers.** A node answers for its partitions only until
//!   0.8 of `lease_ttl` after the start of its last round of renewals that
//!   succeeded. A node that was paused longer (SIGSTOP, a long GC-like
//!   stall of the VM) serves nothing until its next round finds out what
//!   it still holds; its appends are refused by JetStream meanwhile anyway
//!   (the expected last sequence).

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The bucket of heartbeats: node id -> API address.
pub const NODES_BUCKET: &str = "wnsgate-nodes";
/// The bucket of leases: `p<partition>` -> node id.
pub const LEASES_BUCKET: &str = "wnsgate-leases";

/// The live node that should own `part`: the highest rendezvous weight.
pub fn rendezvous<'a>(nodes: impl IntoIterator<Item = &'a str>, part: u16) -> Option<&'a str> {
    nodes
        .into_iter()
        .max_by_key(|n| (xxh3_64_with_seed(n.as_bytes(), u64::from(part)), *n))
}

/// The lease key of a partition.
pub fn lease_key(part: u16) -> String {
    format!("p{part:04}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_leaving_moves_only_its_own_partitions() {
        let three = ["gw-0", "gw-1", "gw-2"];
        let two = ["gw-0", "gw-2"];
        let mut counts = [0usize; 3];
        for p in 0..1024u16 {
            let before = rendezvous(three, p).unwrap();
            counts[three.iter().position(|n| *n == before).unwrap()] += 1;
            let after = rendezvous(two, p).unwrap();
            if before != "gw-1" {
                assert_eq!(before, after, "partition {p} moved without cause");
            }
        }
        // Each node gets about a third.
        assert!(
            counts.iter().all(|&c| (250..430).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn every_node_computes_the_same_owner_whatever_the_order() {
        for p in 0..64u16 {
            assert_eq!(
                rendezvous(["a", "b", "c"], p),
                rendezvous(["c", "a", "b"], p)
            );
        }
        assert_eq!(rendezvous([], 3), None);
        assert_eq!(lease_key(7), "p0007");
    }
}
