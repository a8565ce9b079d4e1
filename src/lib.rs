//! wnsgate: a push gateway for Windows device management.
//!
//! Layers, from the inside out (see `docs/design.md`, "Layout"):
//! - [`core`]: protocol and lifecycle logic with no I/O and no clock;
//! - [`registry`]: every device's channel record in memory, shared by all shards;
//! - [`store`]: durability on disk, group-committed on a dedicated thread;
//! - [`migrate`]: converting a 0.x (fjall) data directory;
//! - [`shard`]: one thread and runtime per core, each accepting its own connections;
//! - [`registration`]: registering and removing devices, below the API;
//! - [`wake`]: waking devices, one or many, and what a wake leaves behind;
//! - [`api`]: the HTTP API served by every shard;
//! - [`sim`]: a WNS simulator (`wnsgate sim`) for tests, the demo and load tests;
//! - [`config`], [`telemetry`]: configuration, metrics and logs;
//! - [`clock`]: the only readings of time, and the only randomness.

#![deny(unreachable_pub)]
// The documentation is for the people who work on the gateway, built with
// `cargo doc --document-private-items`: it links to private items freely.
#![allow(rustdoc::private_intra_doc_links)]

pub(crate) mod api;
pub mod cli;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod core;
pub mod demo;
pub mod fleet;
pub(crate) mod gateway;
pub mod lifecycle;
pub mod migrate;
pub mod registration;
pub mod registry;
pub mod sender;
pub mod server;
pub mod shard;
pub mod sim;
pub mod store;
pub(crate) mod telemetry;
#[cfg(test)]
mod testing;
pub mod wake;
