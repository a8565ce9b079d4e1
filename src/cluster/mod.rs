//! Cluster mode on NATS JetStream: the durable state as partition logs and
//! snapshots that JetStream replicates, so no single node holds the only
//! copy.
//!
//! Owns: the JetStream backend of [`crate::store::Store`] ([`jetstream`]),
//! and the snapshot objects it writes ([`snapshot`]).
//! Must not touch: the registry or the API; like the embedded backend, it
//! is handed the registry through the store's traits.
//!
//! The layout, the fencing of a stale writer and what an unanswered append
//! does are in [`jetstream`]'s docs.

pub mod jetstream;
pub mod snapshot;

pub use jetstream::JetStreamStore;
