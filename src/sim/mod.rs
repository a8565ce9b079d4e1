//! `wnsgate sim`: a WNS stand-in for tests, the demo and load tests.
//!
//! One port serves everything, routed by path:
//!
//! - **Token endpoints**: `POST /accesstoken.srf` (classic, scope
//!   `notify.windows.com`, `expires_in` a number) and
//!   `POST /{tenant}/oauth2/v2.0/token` (Entra, scope
//!   `https://wns.windows.com/.default`, `expires_in` a string). Form body
//!   `grant_type=client_credentials`, `client_id` (package SID),
//!   `client_secret`, `scope`. Errors are 400 with OAuth JSON
//!   (`invalid_request`, `unsupported_grant_type`, `invalid_scope`,
//!   `invalid_client`). With no `--app` configured, any non-empty SID and
//!   secret is accepted. Each token remembers its app and its expiry.
//! - **Control API** under `/_sim/` (see [`control`]).
//! - **Push endpoint**: anything else. The channel is the authority plus
//!   path and query, byte for byte. Rules, in order: 405 unless POST; 401
//!   unless `Authorization: Bearer` names an issued, unexpired token; 400
//!   for a missing host, a missing, repeated or unknown `X-WNS-Type`, a raw
//!   push whose `Content-Type` is not `application/octet-stream`, bad
//!   `X-WNS-Cache-Policy`/`X-WNS-TTL`/`X-WNS-RequestForStatus` values, and
//!   on HTTP/1.1 any `Expect` or `Transfer-Encoding`; 413 above 5000 bytes
//!   (declared or read); 400 for an empty body; 404 when the query has no
//!   `token` parameter. Then faults (406 sender rate, injected 500/503), then
//!   the channel's behaviour ([`Behaviour`]): bound through the control API,
//!   or by the token prefix convention (`x410`, `xrevoked`, `x404`, `x403`,
//!   `xdrop`, `xthrottle`, `xblocked`; see [`behaviour::PREFIXES`]); a
//!   binding with an `app_sid` answers 403 to tokens of other apps. Every
//!   push answer carries `X-WNS-Msg-ID` (16 hex digits),
//!   `X-WNS-Debug-Trace` and the request's `MS-CV`; 200s carry
//!   `X-WNS-Status`, and `X-WNS-DeviceConnectionStatus` when
//!   `X-WNS-RequestForStatus: true`.
//!
//! Connection-level faults ([`Faults`]) act around those rules: GOAWAY
//! and TCP resets after N requests, outage windows (connections reset
//! after reading a push, or refused), and on h2 streams refused or reset
//! by code, tiny flow control windows and header table size flips.
//!
//! Transports ([`Mode`]): TLS with ALPN h2 + http/1.1, TLS with http/1.1
//! only, or h2c. The CA is generated at start ([`cert`]). h2 is served with
//! the `h2` crate on a current-thread runtime per thread; HTTP/1.1 with
//! hyper.
//!
//! This module owns the simulator and nothing else: it shares no state with
//! the gateway, and the gateway must not depend on it.

pub mod behaviour;
pub mod cert;
pub mod cli;
pub mod config;
pub mod control;
pub mod faults;
mod hash;
pub mod push;
mod server;
mod server_h1;
mod server_h2;
mod service;
mod state;
pub mod stats;
mod table_flips;
pub mod token;

pub use behaviour::Behaviour;
pub use config::{AppCredential, Mode, SimConfig};
pub use control::ChannelBehaviour;
pub use faults::{Faults, LatencyRange, WindowMs};
pub use server::SHUTDOWN_DRAIN;
pub use stats::SimStats;

use anyhow::Context;
use state::Shared;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// A running simulator. Dropping it stops the simulator too.
pub struct SimHandle {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The transport.
    pub mode: Mode,
    /// The CA certificate, PEM.
    pub ca_pem: String,
    /// A file holding [`ca_pem`](Self::ca_pem): `SimConfig::ca_out`, or a
    /// temporary file removed with the handle.
    pub ca_pem_path: PathBuf,
    shared: Arc<Shared>,
    workers: Option<server::Workers>,
    _ca_dir: Option<tempfile::TempDir>,
}

/// Starts a simulator on its own threads and returns once it is listening.
pub fn start(cfg: SimConfig) -> anyhow::Result<SimHandle> {
    cfg.validate().map_err(anyhow::Error::msg)?;
    let certs = cert::generate()?;
    let (ca_pem_path, ca_dir) = match &cfg.ca_out {
        Some(p) => (p.clone(), None),
        None => {
            let dir = tempfile::Builder::new()
                .prefix("wnsgate-sim-")
                .tempdir()
                .context("cannot create a directory for the CA file")?;
            (dir.path().join("sim-ca.pem"), Some(dir))
        }
    };
    std::fs::write(&ca_pem_path, &certs.ca_pem)
        .with_context(|| format!("cannot write the CA to {}", ca_pem_path.display()))?;
    let tls = match cfg.mode {
        Mode::Tls => Some(cert::server_config(&certs, &[b"h2", b"http/1.1"])?),
        Mode::H1 => Some(cert::server_config(&certs, &[b"http/1.1"])?),
        Mode::H2c => None,
    };
    let listeners = crate::shard::listener::bind_reuseport(cfg.listen, cfg.threads)?;
    let addr = listeners
        .first()
        .context("no listener")?
        .local_addr()
        .context("listener address")?;
    let shared = Arc::new(Shared::new(&cfg));
    let workers = server::spawn(listeners, shared.clone(), tls)?;
    Ok(SimHandle {
        addr,
        mode: cfg.mode,
        ca_pem: certs.ca_pem,
        ca_pem_path,
        shared,
        workers: Some(workers),
        _ca_dir: ca_dir,
    })
}

impl SimHandle {
    /// The counters since start or the last reset.
    pub fn stats(&self) -> SimStats {
        self.shared.stats.snapshot()
    }

    /// Starts the counters from zero again.
    pub fn reset_stats(&self) {
        self.shared.stats.reset()
    }

    /// Binds a channel (its URI as a device reports it) to a behaviour, and
    /// optionally to the one app whose tokens may push to it.
    pub fn set_behaviour(
        &self,
        channel_uri: &str,
        behaviour: Behaviour,
        app_sid: Option<&str>,
    ) -> anyhow::Result<()> {
        self.shared
            .set_behaviour(channel_uri, behaviour, app_sid.map(str::to_owned))
            .map_err(anyhow::Error::msg)
    }

    /// Forgets every channel binding.
    pub fn clear_behaviours(&self) {
        self.shared.clear_behaviours()
    }

    /// Replaces the faults in force; their outage windows count from now.
    pub fn set_faults(&self, faults: Faults) -> anyhow::Result<()> {
        self.shared.set_faults(faults).map_err(anyhow::Error::msg)
    }

    /// The faults in force.
    pub fn faults(&self) -> Faults {
        self.shared.faults()
    }

    /// `scheme://127.0.0.1:port`: where to dial (`wns.connect_to` is
    /// `127.0.0.1:port`).
    pub fn base_url(&self) -> String {
        format!("{}://{}", self.mode.scheme(), self.addr)
    }

    /// The classic token URL on this simulator (`wns.token_url`).
    pub fn token_url(&self) -> String {
        format!("{}/accesstoken.srf", self.base_url())
    }

    /// The Entra token URL for `tenant` on this simulator.
    pub fn entra_token_url(&self, tenant: &str) -> String {
        format!("{}/{tenant}/oauth2/v2.0/token", self.base_url())
    }

    /// Stops the simulator gracefully: no new connections; open ones finish
    /// what they have taken (h2 GOAWAY, HTTP/1.1 close after the answer),
    /// for at most [`SHUTDOWN_DRAIN`]; then the threads are joined.
    /// Blocks: call it where it does not stall the clients' own I/O (in a
    /// single-threaded test runtime, from `spawn_blocking`), or the drain
    /// waits for its time limit.
    pub fn shutdown(mut self) {
        if let Some(w) = self.workers.take() {
            w.stop(server::Stop::Drain);
        }
    }
}

impl Drop for SimHandle {
    /// Dropping a running simulator stops it at once: open connections are
    /// dropped without GOAWAY.
    fn drop(&mut self) {
        if let Some(w) = self.workers.take() {
            w.stop(server::Stop::Now);
        }
    }
}
