//! A bulk wake as it is kept durably, so that it survives a restart (and,
//! in cluster mode, the death of the node running it): what it selects,
//! and how far it got.
//!
//! A job walks its devices partition by partition, in the order listings
//! use. Its checkpoint says which partitions are done (every device has
//! its result), where the walk stands inside the partition it is in, and
//! what the devices before that point came to. A job resumed from a
//! checkpoint starts at that point with those counts: the devices after
//! it that had already been woken are woken again (at most one checkpoint
//! interval's worth), and none is skipped or counted twice.
//!
//! Where the records live is the backend's business ([`JobBook`]): files
//! beside the embedded store, a KV bucket in cluster mode.

use serde::{Deserialize, Serialize};

/// What a bulk wake was asked to do; written once, when it starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobDef {
    pub id: String,
    pub created_at: String,
    pub selection: SelectionDef,
    pub rate_per_second: Option<u32>,
    pub include_dead: bool,
    pub expected_total: u64,
}

/// Which devices a stored job wakes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectionDef {
    /// The ids stored beside the definition ([`JobBook::ids`]).
    Ids,
    /// Every device in this lifecycle state (its name) when its page is
    /// read.
    State(String),
    /// Every device.
    All,
}

/// How the devices a job has counted ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub received: u64,
    pub dropped: u64,
    pub throttled: u64,
    pub expired: u64,
    pub failed: u64,
    pub not_sent: u64,
    pub skipped_dead: u64,
}

impl Counts {
    /// Every device counted.
    pub fn done(&self) -> u64 {
        self.received
            + self.dropped
            + self.throttled
            + self.expired
            + self.failed
            + self.not_sent
            + self.skipped_dead
    }

    /// Adds `other` in.
    pub fn add(&mut self, other: &Counts) {
        self.received += other.received;
        self.dropped += other.dropped;
        self.throttled += other.throttled;
        self.expired += other.expired;
        self.failed += other.failed;
        self.not_sent += other.not_sent;
        self.skipped_dead += other.skipped_dead;
    }
}

/// Where a walk stands inside a partition that is not done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub part: u16,
    #[serde(flatten)]
    pub within: Within,
}

/// The point inside a partition after which the walk goes on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Within {
    /// After this registry key (hex), for a selection by state or of all.
    Key { after_key: String },
    /// At this index of the partition's listed ids, for a selection by ids.
    Index { next_index: u64 },
}

/// How far a job got: everything up to its position has its result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Cancelled through the API: it is not resumed.
    pub cancelled: bool,
    /// Every partition it covers is done (or it was cancelled and its
    /// wakes in flight ended): it is not resumed.
    pub finished: bool,
    /// Devices selected up to the position.
    pub selected: u64,
    /// How the devices up to the position ended.
    pub counts: Counts,
    /// Partitions whose every selected device has its result, as
    /// inclusive ranges in ascending order.
    pub done: Vec<(u16, u16)>,
    /// Where the walk stands inside a partition it has begun.
    pub at: Option<Position>,
}

impl Checkpoint {
    /// Whether partition `part` is done.
    pub fn is_done(&self, part: u16) -> bool {
        self.done.iter().any(|&(a, b)| (a..=b).contains(&part))
    }

    /// Marks partitions `from..to` (exclusive) done, keeping the ranges
    /// sorted and merged.
    pub fn mark_done(&mut self, from: u16, to: u16) {
        if from >= to {
            return;
        }
        self.done.push((from, to - 1));
        self.done.sort_unstable();
        let mut merged: Vec<(u16, u16)> = Vec::with_capacity(self.done.len());
        for &(a, b) in &self.done {
            match merged.last_mut() {
                Some(last) if u32::from(a) <= u32::from(last.1) + 1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        self.done = merged;
    }
}

/// A job as it was loaded: its definition, whether it was cancelled, and
/// the last checkpoint of each walk over its partitions (one walk in
/// embedded mode; in cluster mode one per node and partition set that ran
/// it, named after them). Listed ids are read with [`JobBook::ids`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredJob {
    pub def: JobDef,
    pub cancelled: bool,
    pub walks: Vec<(String, Checkpoint)>,
}

impl StoredJob {
    /// Whether a walk wrote its last checkpoint as the job ended.
    pub fn finished(&self) -> bool {
        self.walks.iter().any(|(_, c)| c.finished)
    }
}

/// Where walks over a job go on from: the partitions some walk finished,
/// and in each partition begun and not done, the furthest position any
/// walk reached; with every walk's counts added up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resume {
    pub done: Checkpoint,
    pub at: std::collections::BTreeMap<u16, Within>,
    pub selected: u64,
    pub counts: Counts,
}

impl Resume {
    /// The walks' checkpoints merged.
    pub fn merge<'a>(walks: impl IntoIterator<Item = &'a Checkpoint>) -> Resume {
        let mut r = Resume::default();
        for c in walks {
            for &(a, b) in &c.done {
                // Partitions number at most 4096: `b + 1` fits.
                r.done.mark_done(a, b.saturating_add(1));
            }
            r.selected += c.selected;
            r.counts.add(&c.counts);
            if let Some(p) = &c.at {
                let further = match (r.at.get(&p.part), &p.within) {
                    (None, _) => true,
                    (Some(Within::Key { after_key: old }), Within::Key { after_key: new }) => {
                        new > old
                    }
                    (
                        Some(Within::Index { next_index: old }),
                        Within::Index { next_index: new },
                    ) => new > old,
                    _ => false,
                };
                if further {
                    r.at.insert(p.part, p.within.clone());
                }
            }
        }
        let done = r.done.clone();
        r.at.retain(|part, _| !done.is_done(*part));
        r
    }

    /// Whether partition `part` is done.
    pub fn is_done(&self, part: u16) -> bool {
        self.done.is_done(part)
    }
}

/// Why a job could not be written or read.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BookError(pub String);

/// Where bulk wakes are kept durably. Calls block; callers run them off
/// the runtimes that serve requests.
pub trait JobBook: Send + Sync + 'static {
    /// Records a new job and its listed ids; returns once it is durable.
    fn create(&self, def: &JobDef, ids: &[String]) -> Result<(), BookError>;

    /// Replaces the checkpoint of job `id`'s walk `walk`; returns once it
    /// is durable.
    fn checkpoint(&self, id: &str, walk: &str, checkpoint: &Checkpoint) -> Result<(), BookError>;

    /// Every job kept, in no particular order.
    fn load(&self) -> Result<Vec<StoredJob>, BookError>;

    /// Job `id` as kept, if it is. The provided implementation looks
    /// through [`JobBook::load`].
    fn job(&self, id: &str) -> Result<Option<StoredJob>, BookError> {
        Ok(self.load()?.into_iter().find(|j| j.def.id == id))
    }

    /// The id of every job kept, and whether it was cancelled: what a node
    /// looking for jobs started or cancelled elsewhere reads often. The
    /// provided implementation looks through [`JobBook::load`].
    fn ids_cancelled(&self) -> Result<Vec<(String, bool)>, BookError> {
        Ok(self
            .load()?
            .into_iter()
            .map(|j| (j.def.id, j.cancelled))
            .collect())
    }

    /// Job `id`'s listed ids, in the order given.
    fn ids(&self, id: &str) -> Result<Vec<String>, BookError>;

    /// Records that job `id` was cancelled, for every node running it.
    /// The provided implementation records nothing: the job's own last
    /// checkpoint says so.
    fn cancel(&self, id: &str) -> Result<(), BookError> {
        let _ = id;
        Ok(())
    }

    /// Drops job `id` (it is no longer remembered).
    fn forget(&self, id: &str) -> Result<(), BookError>;

    /// Whether several nodes run the jobs of this book, each over the
    /// partitions it owns ([`Owner`]). The provided implementation: no.
    fn shared(&self) -> bool {
        false
    }
}

/// Which partitions this node serves, for jobs shared between nodes.
pub trait Owner: Send + Sync + 'static {
    /// Whether this node serves partition `part` now.
    fn owns(&self, part: u16) -> bool;

    /// A number that changes whenever this node takes or leaves a
    /// partition.
    fn epoch(&self) -> u64;

    /// A name for this node's run, unique to the process.
    fn instance(&self) -> String;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_ranges_merge_and_answer() {
        let mut c = Checkpoint::default();
        c.mark_done(5, 8);
        c.mark_done(0, 2);
        c.mark_done(2, 5);
        c.mark_done(10, 10);
        assert_eq!(c.done, vec![(0, 7)]);
        c.mark_done(9, 12);
        assert_eq!(c.done, vec![(0, 7), (9, 11)]);
        assert!(c.is_done(0) && c.is_done(7) && c.is_done(11));
        assert!(!c.is_done(8) && !c.is_done(12));
        c.mark_done(8, 9);
        assert_eq!(c.done, vec![(0, 11)]);
        c.mark_done(65534, 65535);
        assert!(c.is_done(65534) && !c.is_done(65535));
    }

    #[test]
    fn walks_merge_into_the_furthest_point_of_each_partition() {
        let key = |part, k: &str| Position {
            part,
            within: Within::Key {
                after_key: k.into(),
            },
        };
        let a = Checkpoint {
            selected: 10,
            counts: Counts {
                received: 10,
                ..Counts::default()
            },
            done: vec![(0, 2)],
            at: Some(key(3, "0a")),
            ..Checkpoint::default()
        };
        let b = Checkpoint {
            selected: 5,
            counts: Counts {
                failed: 5,
                ..Counts::default()
            },
            done: vec![(5, 6)],
            at: Some(key(3, "0b01")),
            ..Checkpoint::default()
        };
        let c = Checkpoint {
            done: vec![(7, 7)],
            at: Some(key(6, "ff")),
            ..Checkpoint::default()
        };
        let r = Resume::merge([&a, &b, &c]);
        assert_eq!(r.done.done, vec![(0, 2), (5, 7)]);
        assert_eq!(r.at.len(), 1, "a position in a done partition is dropped");
        assert_eq!(
            r.at[&3],
            Within::Key {
                after_key: "0b01".into()
            }
        );
        assert_eq!((r.selected, r.counts.done()), (15, 15));
        assert!(r.is_done(6) && !r.is_done(3) && !r.is_done(4));
    }

    #[test]
    fn a_checkpoint_reads_back_as_written() {
        let c = Checkpoint {
            cancelled: false,
            finished: false,
            selected: 9,
            counts: Counts {
                received: 7,
                failed: 2,
                ..Counts::default()
            },
            done: vec![(0, 3)],
            at: Some(Position {
                part: 4,
                within: Within::Key {
                    after_key: "0a0b".into(),
                },
            }),
        };
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains("\"after_key\":\"0a0b\""), "{json}");
        assert_eq!(serde_json::from_str::<Checkpoint>(&json).unwrap(), c);
        let ids = Checkpoint {
            at: Some(Position {
                part: 1,
                within: Within::Index { next_index: 3 },
            }),
            ..c
        };
        let json = serde_json::to_string(&ids).unwrap();
        assert_eq!(serde_json::from_str::<Checkpoint>(&json).unwrap(), ids);
        assert_eq!(ids.counts.done(), 9);
    }
}
