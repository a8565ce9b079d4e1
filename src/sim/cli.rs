//! `wnsgate sim`: the command line of the simulator.

use super::config::{AppCredential, Mode, SimConfig};
use super::faults::{Faults, LatencyRange, WindowMs};
use anyhow::Context;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Arguments of `wnsgate sim`.
#[derive(clap::Args, Debug, Clone)]
pub struct SimArgs {
    /// Address to listen on (port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:9443")]
    pub listen: SocketAddr,
    /// tls: ALPN h2 and http/1.1; h1: TLS, http/1.1 only; h2c: plain-text h2 (prior knowledge).
    #[arg(long, value_enum, default_value_t = Mode::Tls)]
    pub mode: Mode,
    /// Where to write the generated CA certificate (PEM) for clients to trust.
    #[arg(long, default_value = "sim-ca.pem")]
    pub ca_out: PathBuf,
    /// Worker threads, each with its own listener (SO_REUSEPORT).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Lifetime of issued access tokens, in seconds.
    #[arg(long, default_value_t = 86_400)]
    pub token_expires_in: u64,
    /// Accepted credential SID=SECRET (repeatable); with none, any non-empty pair is accepted.
    #[arg(long = "app", value_name = "SID=SECRET")]
    pub apps: Vec<AppCredential>,
    /// Share of pushes answered 500 or 503 (half each), 0.0..=1.0.
    #[arg(long, default_value_t = 0.0)]
    pub error_ratio: f64,
    /// Pushes per second one sender (app SID) may make before getting 406.
    #[arg(long, value_name = "N")]
    pub sender_rate: Option<u32>,
    /// Uniform delay before answering each push, MIN-MAX milliseconds.
    #[arg(long, value_name = "MIN-MAX")]
    pub latency_ms: Option<LatencyRange>,
    /// Retire each connection gracefully (GOAWAY / Connection: close) after N requests.
    #[arg(long, value_name = "N")]
    pub goaway_every: Option<u64>,
    /// Reset each connection abruptly when its Nth request arrives.
    #[arg(long, value_name = "N")]
    pub reset_every: Option<u64>,
    /// h2: refuse every Nth stream of a connection with RST_STREAM REFUSED_STREAM, unread.
    #[arg(long, value_name = "N")]
    pub refused_stream_every: Option<u64>,
    /// h2: process every Nth stream of a connection, then reset it with INTERNAL_ERROR instead of answering.
    #[arg(long, value_name = "N")]
    pub internal_error_every: Option<u64>,
    /// h2: advertise this SETTINGS_INITIAL_WINDOW_SIZE (bytes) and open stream windows only by what was read.
    #[arg(long, value_name = "BYTES")]
    pub h2_stream_window: Option<u32>,
    /// h2: after every Nth stream of a connection, send SETTINGS_HEADER_TABLE_SIZE 0 then 4096.
    #[arg(long, value_name = "N")]
    pub header_table_flip_every: Option<u64>,
    /// An outage from FROM to TO ms after start (N: 0-N): every connection carrying a push is reset (TCP RST) after the push was read, before it is answered.
    #[arg(long, value_name = "FROM-TO")]
    pub reset_window: Option<WindowMs>,
    /// An outage from FROM to TO ms after start (N: 0-N): new connections are reset as soon as accepted, requests on open ones reset unread.
    #[arg(long, value_name = "FROM-TO")]
    pub refuse_window: Option<WindowMs>,
    /// Do not count pushes per channel (for pure throughput runs).
    #[arg(long)]
    pub no_channel_stats: bool,
    /// SETTINGS_MAX_CONCURRENT_STREAMS advertised on h2 connections.
    #[arg(long, default_value_t = 100)]
    pub max_concurrent_streams: u32,
}

impl SimArgs {
    /// The configuration these arguments describe.
    pub fn config(&self) -> SimConfig {
        SimConfig {
            listen: self.listen,
            mode: self.mode,
            threads: self.threads,
            ca_out: Some(self.ca_out.clone()),
            token_lifetime: Duration::from_secs(self.token_expires_in),
            apps: self.apps.clone(),
            faults: Faults {
                error_ratio: self.error_ratio,
                sender_rate: self.sender_rate,
                latency_ms: self.latency_ms,
                goaway_every: self.goaway_every,
                reset_every: self.reset_every,
                refused_stream_every: self.refused_stream_every,
                internal_error_every: self.internal_error_every,
                h2_stream_window: self.h2_stream_window,
                header_table_flip_every: self.header_table_flip_every,
                reset_window_ms: self.reset_window,
                refuse_window_ms: self.refuse_window,
            },
            max_concurrent_streams: self.max_concurrent_streams,
            channel_stats: !self.no_channel_stats,
        }
    }
}

/// Runs the simulator until SIGINT or SIGTERM, then drains open connections
/// (a second signal exits at once). Prints one line,
/// `sim listening on ADDR (MODE, CA in FILE)`, once it accepts connections.
pub fn run(args: SimArgs) -> anyhow::Result<()> {
    crate::telemetry::logging::init(crate::config::LogFormat::Text, "warn");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("cannot start the signal watcher")?;
    let signals = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        Ok::<_, std::io::Error>((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        ))
    });
    let (mut term, mut int) = signals.context("cannot watch signals")?;
    let sim = super::start(args.config())?;
    println!(
        "sim listening on {} ({}, CA in {})",
        sim.addr,
        sim.mode.name(),
        sim.ca_pem_path.display()
    );
    rt.block_on(async {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    });
    // Drain in the background; a second signal exits at once.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("wnsgate-sim-stop".into())
        .spawn(move || {
            sim.shutdown();
            let _ = done_tx.send(());
        })
        .context("cannot start the shutdown thread")?;
    rt.block_on(async {
        tokio::select! {
            _ = done_rx => {}
            _ = term.recv() => std::process::exit(130),
            _ = int.recv() => std::process::exit(130),
        }
    });
    Ok(())
}
