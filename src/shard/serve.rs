//! Serving the API on accepted connections, the same for every backend: the
//! hyper-util auto builder (HTTP/1.1 and h2c), graceful shutdown and the
//! drain. A backend supplies the accept loop's source of sockets and how a
//! connection's task is spawned; everything else is here.

use super::{Handler, NewHandler, Phase, ShardOptions, Starting};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Sleep;

/// What one shard needs to serve its connections.
pub struct ConnServer<H> {
    index: usize,
    handler: H,
    options: ShardOptions,
    builder: auto::Builder<TokioExecutor>,
    graceful: GracefulShutdown,
}

impl<H: Handler> ConnServer<H> {
    /// The server of shard `index`. Called on the shard's runtime as the
    /// shard starts: builds the shard's handler there, then reports
    /// `started` done.
    pub fn new<N: NewHandler<Handler = H>>(
        index: usize,
        new_handler: &N,
        options: ShardOptions,
        started: Starting,
    ) -> ConnServer<H> {
        let handler = new_handler.new_handler(index);
        started.done();
        ConnServer {
            index,
            handler,
            options,
            builder: http_builder(options.request_timeout),
            graceful: GracefulShutdown::new(),
        }
    }

    /// The future that serves one accepted connection until it closes or
    /// the drain ends it. It is `Send` exactly when `io` is, so a backend
    /// whose sockets are `!Send` spawns it on its local task set.
    pub fn connection<IO>(&self, io: IO) -> impl Future<Output = ()> + 'static
    where
        IO: AsyncRead + AsyncWrite + Unpin + 'static,
    {
        let handler = self.handler.clone();
        let svc = service_fn(move |req| {
            let answer = handler.call(req);
            async move { Ok::<_, Infallible>(answer.await) }
        });
        let io = FirstByteWithin::new(io, self.options.request_timeout);
        let conn = self
            .builder
            .serve_connection(TokioIo::new(io), svc)
            .into_owned();
        let conn = self.graceful.watch(conn);
        async move {
            let _ = conn.await;
        }
    }

    /// Accepts connections from `accept` and hands each to `spawn` until
    /// the phase leaves [`Phase::Serving`]. Accept errors are logged and
    /// retried after [`super::limits::ACCEPT_BACKOFF`].
    pub(super) async fn accept_loop<IO, A, F>(
        &self,
        phase: &mut watch::Receiver<Phase>,
        mut accept: A,
        mut spawn: impl FnMut(&ConnServer<H>, IO),
    ) where
        A: FnMut() -> F,
        F: Future<Output = std::io::Result<IO>>,
    {
        loop {
            tokio::select! {
                accepted = accept() => match accepted {
                    Ok(io) => spawn(self, io),
                    Err(e) => {
                        tracing::warn!(shard = self.index, error = %e, "accept failed");
                        tokio::time::sleep(super::limits::ACCEPT_BACKOFF).await;
                    }
                },
                _ = phase.wait_for(|p| *p != Phase::Serving) => break,
            }
        }
    }

    /// Once the phase is [`Phase::Draining`] (or the shard set is gone),
    /// lets open connections finish their requests, up to
    /// [`ShardOptions::drain_connections`].
    pub(super) async fn drain(self, phase: &mut watch::Receiver<Phase>) {
        let _ = phase.wait_for(|p| *p == Phase::Draining).await;
        tokio::select! {
            _ = self.graceful.shutdown() => {}
            _ = tokio::time::sleep(self.options.drain_connections) => {
                tracing::warn!(shard = self.index, "connections still open after the drain timeout");
            }
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
        .max_concurrent_streams(super::limits::H2_STREAMS_PER_CONNECTION_MAX)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// A connection that must send its first byte within a limit.
///
/// The auto builder reads a new connection's first bytes to tell HTTP/1.1
/// from h2c before any of hyper's own timeouts start, so a client that
/// connects and sends nothing would hold its socket (and a slot of the
/// file-descriptor limit) forever. Until the first byte arrives, a read
/// that is still waiting at the limit fails with `TimedOut`, which ends
/// the connection; after it, this is a plain pass-through and the HTTP
/// layers' own timeouts apply.
struct FirstByteWithin<IO> {
    io: IO,
    /// Set until the first byte is read.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<IO> FirstByteWithin<IO> {
    fn new(io: IO, limit: Duration) -> FirstByteWithin<IO> {
        FirstByteWithin {
            io,
            deadline: Some(Box::pin(tokio::time::sleep(limit))),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for FirstByteWithin<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.deadline = None;
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let expired = self
                    .deadline
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if !expired {
                    return Poll::Pending;
                }
                tracing::debug!("closing a connection that sent no request");
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no request within the request timeout",
                )))
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for FirstByteWithin<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
