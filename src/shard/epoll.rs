//! The epoll backend: a plain tokio current-thread runtime per shard.

use super::serve::ConnServer;
use super::Starting;
use crate::gateway::Gateway;
use std::sync::Arc;
use tokio::sync::watch;

/// Runs one shard until `stop` turns true, then drains its connections.
pub fn run_shard(
    index: usize,
    listener: std::net::TcpListener,
    gw: Arc<Gateway>,
    stop: watch::Receiver<bool>,
    started: Starting,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(shard = index, error = %e, "cannot start shard runtime");
            return;
        }
    };
    rt.block_on(serve(index, listener, gw, stop, started));
}

async fn serve(
    index: usize,
    listener: std::net::TcpListener,
    gw: Arc<Gateway>,
    stop: watch::Receiver<bool>,
    started: Starting,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(shard = index, error = %e, "cannot register listener");
            return;
        }
    };
    let server = ConnServer::new(index, gw, started);
    server
        .accept_loop(
            stop,
            || async {
                let (stream, _peer) = listener.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok(stream)
            },
            |server, stream| {
                tokio::spawn(server.connection(stream));
            },
        )
        .await;
    drop(listener);
    server.drain().await;
}
