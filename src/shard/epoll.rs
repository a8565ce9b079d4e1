//! The epoll backend: a plain tokio current-thread runtime per shard.

use crate::api::{self, InflightGauge};
use crate::gateway::Gateway;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Most concurrent HTTP/2 streams a client may open on one connection.
pub const H2_MAX_STREAMS: u32 = 256;

/// Runs one shard until `stop` turns true, then drains its connections.
pub fn run_shard(
    index: usize,
    listener: std::net::TcpListener,
    gw: Arc<Gateway>,
    stop: watch::Receiver<bool>,
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
    rt.block_on(serve(index, listener, gw, stop));
}

async fn serve(
    index: usize,
    listener: std::net::TcpListener,
    gw: Arc<Gateway>,
    mut stop: watch::Receiver<bool>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(shard = index, error = %e, "cannot register listener");
            return;
        }
    };
    let builder = http_builder(Duration::from_secs(gw.settings.request_timeout_secs));
    let inflight = Arc::new(InflightGauge::default());
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and similar: back off, keep serving.
                        tracing::warn!(shard = index, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let gw = gw.clone();
                let inflight = inflight.clone();
                let svc = service_fn(move |req| api::serve(gw.clone(), index, inflight.clone(), req));
                let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(super::DRAIN_TIMEOUT) => {
            tracing::warn!(shard = index, "connections still open after the drain timeout");
        }
    }
}

/// HTTP/1.1 and HTTP/2 (h2c, prior knowledge) on the same port.
pub fn http_builder(header_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_STREAMS)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}
