//! What a simulator is started with: address, transport mode, threads,
//! credentials, token lifetime and the initial faults.

use super::faults::Faults;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Upper bound on worker threads (`--threads`).
pub const MAX_THREADS: usize = 256;

/// How the simulator speaks on its one port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// TLS; ALPN offers `h2` and `http/1.1` and serves whichever the client picks
    /// (HTTP/1.1 when the client offers no ALPN).
    Tls,
    /// TLS with ALPN `http/1.1` only: a WNS that does not speak h2.
    H1,
    /// Plain-text h2 with prior knowledge (for benchmarks). A connection that
    /// does not start with the h2 preface is served as plain HTTP/1.1, so
    /// `curl http://.../_sim/stats` works.
    H2c,
}

impl Mode {
    /// The name used on the command line and in the start-up line.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Tls => "tls",
            Mode::H1 => "h1",
            Mode::H2c => "h2c",
        }
    }

    /// `https` for the TLS modes, `http` for h2c.
    pub fn scheme(self) -> &'static str {
        match self {
            Mode::H2c => "http",
            Mode::Tls | Mode::H1 => "https",
        }
    }
}

/// One WNS app credential the token endpoint accepts: the package SID
/// (`ms-app://S-1-15-2-...`) used as `client_id`, and its secret.
#[derive(Clone, PartialEq, Eq)]
pub struct AppCredential {
    /// The package SID, sent as `client_id`.
    pub sid: String,
    /// The client secret.
    pub secret: String,
}

impl std::fmt::Debug for AppCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppCredential")
            .field("sid", &self.sid)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl std::str::FromStr for AppCredential {
    type Err = String;

    /// Parses `SID=SECRET`, split at the first `=` (package SIDs have none;
    /// a secret may).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('=') {
            Some((sid, secret)) if !sid.is_empty() && !secret.is_empty() => Ok(AppCredential {
                sid: sid.to_owned(),
                secret: secret.to_owned(),
            }),
            _ => Err("expected SID=SECRET with both parts non-empty".to_owned()),
        }
    }
}

/// Everything a simulator is started with. The `Default` suits tests:
/// `127.0.0.1:0`, TLS mode, one thread, tokens valid for a day, any
/// credentials accepted, no faults.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Transport.
    pub mode: Mode,
    /// Worker threads, each with its own current-thread runtime and its own
    /// SO_REUSEPORT listener.
    pub threads: usize,
    /// Where to write the CA certificate (PEM). `None`: a temporary file that
    /// lives as long as the [`SimHandle`](super::SimHandle).
    pub ca_out: Option<PathBuf>,
    /// Lifetime of issued access tokens.
    pub token_lifetime: Duration,
    /// Accepted credentials; empty accepts any non-empty SID and secret.
    pub apps: Vec<AppCredential>,
    /// Faults in force from the start (changeable later).
    pub faults: Faults,
    /// SETTINGS_MAX_CONCURRENT_STREAMS advertised on h2 connections.
    pub max_concurrent_streams: u32,
    /// Count pushes per channel (distinct channels, histogram). Costs a hash
    /// and a sharded map update per push.
    pub channel_stats: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            mode: Mode::Tls,
            threads: 1,
            ca_out: None,
            token_lifetime: Duration::from_secs(86_400),
            apps: Vec::new(),
            faults: Faults::default(),
            max_concurrent_streams: 100,
            channel_stats: true,
        }
    }
}

impl SimConfig {
    /// Checks the values that cannot be expressed in the types.
    pub fn validate(&self) -> Result<(), String> {
        if self.threads == 0 || self.threads > MAX_THREADS {
            return Err(format!("threads must be 1..={MAX_THREADS}"));
        }
        if self.max_concurrent_streams == 0 {
            return Err("max_concurrent_streams must be at least 1".to_owned());
        }
        self.faults.validate()
    }
}
