//! Metrics and logs.
//!
//! Owns: the Prometheus recorder (histograms with explicit buckets, never
//! summaries), the names of the gateway's metrics, and log set-up with
//! secrets and channel tokens kept out of log lines.

pub(crate) mod logging;
pub(crate) mod metrics;
