//! The WNS sender: connections to WNS front ends, per shard and per
//! authority, over TLS with HTTP/2 or HTTP/1.1.
//!
//! Owns: TLS configuration, connection establishment, connection pools with
//! stream permits, and each WNS authority's health (its circuit breaker
//! and back-off levels, [`health`]). Protocol decisions (how to read an answer, whether to
//! retry, token lifetimes) live in [`crate::core::wns`]; this layer only
//! moves requests and answers.

pub mod bulk;
pub mod conn;
pub mod health;
pub mod hpack;
pub mod limits;
pub mod pool;
pub mod tls;
pub mod tokens;
pub mod wake;
pub mod wire;
