//! Cluster mode on NATS JetStream: the durable state as partition logs and
//! snapshots that JetStream replicates, so no single node holds the only
//! copy.
//!
//! Owns: the JetStream backend of [`crate::store::Store`] ([`jetstream`]),
//! which node serves which partition ([`leases`]), the snapshot objects
//! ([`snapshot`]), and bulk wakes shared by the nodes ([`jobs`]).
//! Must not touch: the API (it forwards calls by
//! [`crate::store::Store::placement`]); the registry and the refresh queue
//! are handed to it through the store's traits
//! ([`crate::store::Restore`], [`crate::store::PartitionHost`]).
//!
//! The layout, the fencing of a stale writer and what an unanswered append
//! does are in [`jetstream`]'s docs; heartbeats, leases and takeover in
//! [`leases`]'.

pub mod jetstream;
pub mod jobs;
pub mod leases;
pub mod snapshot;

pub use jetstream::JetStreamStore;
