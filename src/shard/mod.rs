//! Shards: one thread per core, each with its own current-thread runtime and
//! its own listening socket on the shared address (SO_REUSEPORT), so the
//! kernel spreads connections across shards and nothing on the request path
//! crosses threads except the registry and the store's commit queue.
//!
//! Owns: threads, runtimes, listeners, connection serving and draining.
//! The network backend is chosen per process at start; each backend is one
//! module exposing `run_shard`, so adding one does not touch the API.

pub mod epoll;
pub mod listener;

use crate::gateway::Gateway;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::watch;

/// How long shutdown waits for open connections to finish their requests.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The running shards.
pub struct ShardSet {
    threads: Vec<JoinHandle<()>>,
    stop: watch::Sender<bool>,
    /// The address every shard listens on (the real port when 0 was asked).
    pub local_addr: SocketAddr,
}

impl ShardSet {
    /// Binds `count` listeners on `addr` and starts one shard thread for
    /// each. Bind errors (address in use, permission) are returned here,
    /// before any thread starts.
    pub fn start(gw: Arc<Gateway>, addr: SocketAddr, count: usize) -> std::io::Result<ShardSet> {
        let listeners = listener::bind_reuseport(addr, count.max(1))?;
        let local_addr = listeners[0].local_addr()?;
        let (stop, stop_rx) = watch::channel(false);
        let mut threads = Vec::with_capacity(listeners.len());
        for (i, l) in listeners.into_iter().enumerate() {
            let gw = gw.clone();
            let rx = stop_rx.clone();
            let t = std::thread::Builder::new()
                .name(format!("wnsgate-shard-{i}"))
                .spawn(move || epoll::run_shard(i, l, gw, rx))?;
            threads.push(t);
        }
        Ok(ShardSet {
            threads,
            stop,
            local_addr,
        })
    }

    /// Stops accepting, lets open connections finish (up to
    /// [`DRAIN_TIMEOUT`]), and joins the shard threads.
    pub fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.threads {
            let _ = t.join();
        }
    }
}
