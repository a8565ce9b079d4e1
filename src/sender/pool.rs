//! Connections to one WNS authority (one front-end host), owned by one
//! shard: HTTP/2 connections carrying many streams each, bounded by the
//! peer's SETTINGS_MAX_CONCURRENT_STREAMS and our own limit, or HTTP/1.1
//! keep-alive connections carrying one request at a time.
//!
//! A connection that takes no new streams (GOAWAY, a connection error, a
//! closed or silent socket) is retired; the requests it carried fail with
//! the reason, and the caller decides whether to send them again (see
//! [`ConnError`]). A stream the server resets ends only that request: the
//! connection stays in the pool and goes on serving the others.
//!
//! Every pool of one authority reports to that authority's
//! [`AuthorityHealth`]: each answer, each failed connect, and each
//! connection retired because it died with requests unanswered (once per
//! connection, however many requests it carried). While the authority's
//! circuit breaker is not closed, a pool opens a connection only for the
//! breaker's probe.

use super::conn::{self, Conn, ConnError, Protocol, Reply, Timeouts};
use super::health::AuthorityHealth;
use super::wire::{self, H2Client, Sink};
use bytes::Bytes;
use http::uri::{Authority, Parts, PathAndQuery, Scheme};
use http::{HeaderName, HeaderValue, Uri};
use http_body_util::Full;
use parking_lot::Mutex;
use rustls::ClientConfig;
use std::sync::Arc;
use tokio::sync::Notify;

/// Bounds of one pool.
#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    /// Connections open or opening at once.
    pub max_connections: usize,
    /// Streams per HTTP/2 connection at once (the peer's limit also applies).
    pub max_streams_per_conn: usize,
}

impl Default for PoolLimits {
    fn default() -> Self {
        PoolLimits {
            max_connections: super::limits::POOL_CONNECTIONS_MAX,
            max_streams_per_conn: super::limits::H2_STREAMS_PER_CONNECTION_MAX,
        }
    }
}

type H1Send = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

struct H2Slot {
    id: u64,
    send: Arc<H2Client>,
    inflight: usize,
}

#[derive(Default)]
struct Inner {
    h2: Vec<H2Slot>,
    h1_idle: Vec<H1Send>,
    h1_busy: usize,
    connecting: usize,
    next_id: u64,
}

impl Inner {
    fn open(&self) -> usize {
        self.h2.len() + self.h1_idle.len() + self.h1_busy + self.connecting
    }
}

/// What [`AuthorityPool::try_lease`] found.
pub enum TryLease {
    /// A free stream on an HTTP/2 connection.
    Stream(StreamLease),
    /// Every HTTP/2 stream is taken and no more connections may open:
    /// one must end first.
    Busy,
    /// Not without waiting for a connection to open, or not on HTTP/2:
    /// use [`AuthorityPool::post`].
    Unavailable,
}

/// A stream taken from a pool: send on it, or give it back.
pub struct StreamLease {
    conn: u64,
    send: Arc<H2Client>,
}

impl StreamLease {
    /// POSTs on the leased stream; its end is reported to `sink` with
    /// `tag`. `None` when the connection took no new stream after all
    /// (the lease is then given back).
    pub fn send(
        self,
        pool: &AuthorityPool,
        path_and_query: &str,
        headers: &[(HeaderName, HeaderValue)],
        body: Bytes,
        sink: &Arc<Sink>,
        tag: u64,
    ) -> Option<H2Sent> {
        let req = wire::Request {
            authority: &pool.authority,
            path: path_and_query,
            headers,
            body,
            timeout: pool.timeouts.request,
        };
        match self.send.send_to(req, sink, tag) {
            Ok(sent) => Some(H2Sent {
                conn: self.conn,
                sent,
            }),
            Err(_) => {
                // Retired if it closed meanwhile.
                pool.release_h2(self.conn);
                None
            }
        }
    }
}

/// A request sent on a [`StreamLease`]; hand it back with
/// [`AuthorityPool::ended`] once its answer is taken.
pub struct H2Sent {
    conn: u64,
    pub sent: wire::Sent,
}

enum Lease {
    H2 { id: u64, send: Arc<H2Client> },
    Http1(H1Send),
    Connect,
    Wait,
}

/// The connections of one shard to one authority.
pub struct AuthorityPool {
    /// Host presented as SNI and `:authority` (the channel URI's host).
    authority: Arc<str>,
    /// The same, parsed once for the request URIs; `None` if it does not
    /// parse (every push to it then fails as a bad channel URI).
    uri_authority: Option<Authority>,
    /// `host:port` dialled.
    dial: Arc<str>,
    tls: Arc<ClientConfig>,
    limits: PoolLimits,
    timeouts: Timeouts,
    inner: Mutex<Inner>,
    freed: Notify,
    health: Arc<AuthorityHealth>,
}

impl AuthorityPool {
    /// A pool with a health of its own (default breaker policy, one
    /// credential): for a pool used alone.
    pub fn new(
        authority: &str,
        dial: &str,
        tls: Arc<ClientConfig>,
        limits: PoolLimits,
        timeouts: Timeouts,
    ) -> AuthorityPool {
        let health = Arc::new(AuthorityHealth::new(
            authority,
            1,
            Default::default(),
            Default::default(),
        ));
        AuthorityPool::with_health(authority, dial, tls, limits, timeouts, health)
    }

    /// A pool reporting to `health`, which the authority's other pools
    /// share.
    pub fn with_health(
        authority: &str,
        dial: &str,
        tls: Arc<ClientConfig>,
        limits: PoolLimits,
        timeouts: Timeouts,
        health: Arc<AuthorityHealth>,
    ) -> AuthorityPool {
        AuthorityPool {
            authority: authority.into(),
            uri_authority: Authority::try_from(authority).ok(),
            dial: dial.into(),
            tls,
            limits,
            timeouts,
            inner: Mutex::new(Inner::default()),
            freed: Notify::new(),
            health,
        }
    }

    /// The host this pool's connections present as SNI and `:authority`.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// The health of this pool's authority, shared with its other pools.
    pub fn health(&self) -> &Arc<AuthorityHealth> {
        &self.health
    }

    /// True when a request to `path_and_query` on this authority is a
    /// valid HTTP target: the authority parses, and the path starts with
    /// `/` and is visible ASCII without a fragment.
    pub fn accepts(&self, path_and_query: &str) -> bool {
        self.uri_authority.is_some()
            && path_and_query.starts_with('/')
            && path_and_query
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'#')
    }

    /// The request URI for a channel of this authority: `https://`, the
    /// authority, and `path_and_query` exactly as written. `None` if it is
    /// not a valid URI.
    fn target(&self, path_and_query: &str) -> Option<Uri> {
        let mut parts = Parts::default();
        parts.scheme = Some(Scheme::HTTPS);
        parts.authority = Some(self.uri_authority.clone()?);
        parts.path_and_query = Some(PathAndQuery::try_from(path_and_query).ok()?);
        Uri::from_parts(parts).ok()
    }

    /// Connections currently open, by protocol.
    pub fn open_connections(&self) -> (usize, usize) {
        let g = self.inner.lock();
        (g.h2.len(), g.h1_idle.len() + g.h1_busy)
    }

    fn lease(&self) -> Lease {
        let mut g = self.inner.lock();
        if let Some(lease) = self.free_stream(&mut g) {
            return Lease::H2 {
                id: lease.conn,
                send: lease.send,
            };
        }
        while let Some(send) = g.h1_idle.pop() {
            if !send.is_closed() {
                g.h1_busy += 1;
                return Lease::Http1(send);
            }
        }
        if g.open() < self.limits.max_connections {
            g.connecting += 1;
            return Lease::Connect;
        }
        Lease::Wait
    }

    /// POSTs `body` to `uri` with `headers` on some connection of this pool,
    /// opening one when all are busy and the limit allows, otherwise
    /// waiting for a free stream or connection. While the authority's
    /// breaker is not closed it opens no connection: the request fails
    /// with [`ConnError::CircuitOpen`] instead of waiting for one.
    pub async fn post(
        &self,
        path_and_query: &str,
        headers: &[(HeaderName, HeaderValue)],
        body: Bytes,
    ) -> Result<(Reply, Protocol), ConnError> {
        self.send(path_and_query, headers, body, false).await
    }

    /// [`AuthorityPool::post`]; with `probe`, the request is the probe the
    /// authority's breaker admitted, and may open a connection whatever
    /// the breaker's state.
    pub async fn send(
        &self,
        path_and_query: &str,
        headers: &[(HeaderName, HeaderValue)],
        body: Bytes,
        probe: bool,
    ) -> Result<(Reply, Protocol), ConnError> {
        loop {
            let waiter = self.freed.notified();
            match self.lease() {
                Lease::H2 { id, send } => {
                    let r = conn::post_h2(
                        &send,
                        &self.authority,
                        path_and_query,
                        headers,
                        body,
                        self.timeouts.request,
                    )
                    .await;
                    self.report(&r);
                    self.release_h2(id);
                    return r.map(|reply| (reply, Protocol::H2));
                }
                Lease::Http1(mut send) => {
                    let Some(uri) = self.target(path_and_query) else {
                        self.release_h1(send, true);
                        return Err(ConnError::Protocol(format!(
                            "not a valid request target: {path_and_query:?}"
                        )));
                    };
                    // Boxed to keep the h2 path's futures small: the
                    // HTTP/1.1 exchange is the larger state.
                    let r = Box::pin(conn::post_http1(
                        &mut send,
                        &uri,
                        headers,
                        body,
                        self.timeouts.request,
                    ))
                    .await;
                    self.report(&r);
                    if matches!(&r, Err(e) if e.is_connection_failure()) {
                        // One request per HTTP/1.1 connection: this one died.
                        self.health
                            .on_connection_failed(crate::clock::monotonic_ms(), &describe(&r));
                    }
                    self.release_h1(send, r.is_ok());
                    return r.map(|reply| (reply, Protocol::Http1));
                }
                Lease::Connect if !probe && !self.health.is_closed() => {
                    self.inner.lock().connecting -= 1;
                    self.freed.notify_one();
                    return Err(ConnError::CircuitOpen(self.authority.to_string()));
                }
                Lease::Connect => {
                    // Boxed: connecting (TCP, TLS, HTTP handshakes) is a
                    // large future, rare next to posts, and every push in
                    // flight would otherwise carry it inline.
                    let opened = Box::pin(conn::connect_wns(
                        &self.dial,
                        &self.authority,
                        self.tls.clone(),
                        &self.timeouts,
                    ))
                    .await;
                    let mut g = self.inner.lock();
                    g.connecting -= 1;
                    match opened {
                        Ok(Conn::H2(send)) => {
                            let id = g.next_id;
                            g.next_id += 1;
                            g.h2.push(H2Slot {
                                id,
                                send: Arc::new(send),
                                inflight: 0,
                            });
                            metrics::counter!(crate::telemetry::metrics::WNS_CONNECTIONS_OPENED, "protocol" => "h2", "io" => crate::shard::current_backend().name()).increment(1);
                        }
                        Ok(Conn::Http1(send)) => {
                            g.h1_idle.push(send);
                            metrics::counter!(crate::telemetry::metrics::WNS_CONNECTIONS_OPENED, "protocol" => "http1", "io" => crate::shard::current_backend().name()).increment(1);
                        }
                        Err(e) => {
                            drop(g);
                            self.freed.notify_one();
                            self.health
                                .on_connection_failed(crate::clock::monotonic_ms(), &e.to_string());
                            return Err(e);
                        }
                    }
                    drop(g);
                    self.freed.notify_waiters();
                }
                Lease::Wait => waiter.await,
            }
        }
    }

    /// Takes a free HTTP/2 stream without waiting, for [`StreamLease::send`].
    pub fn try_lease(&self) -> TryLease {
        let mut g = self.inner.lock();
        if let Some(lease) = self.free_stream(&mut g) {
            return TryLease::Stream(lease);
        }
        // No free stream: can a connection still be opened?
        if !g.h2.is_empty() && g.open() >= self.limits.max_connections {
            TryLease::Busy
        } else {
            TryLease::Unavailable
        }
    }

    /// The least busy HTTP/2 connection's free stream, if there is one.
    fn free_stream(&self, g: &mut Inner) -> Option<StreamLease> {
        let cap = self.limits.max_streams_per_conn;
        // A connection going away takes no new streams: retire it (its
        // open streams finish on their own).
        let health = &self.health;
        g.h2.retain(|s| {
            let closed = s.send.is_closed();
            if closed {
                retired(health, s);
            }
            !closed
        });
        let slot =
            g.h2.iter_mut()
                .filter(|s| s.inflight < cap.min(s.send.max_streams()).max(1))
                .min_by_key(|s| s.inflight)?;
        slot.inflight += 1;
        Some(StreamLease {
            conn: slot.id,
            send: slot.send.clone(),
        })
    }

    /// The answer to `sent`, `result`, was taken: its stream is free
    /// again.
    pub fn ended(&self, sent: &H2Sent, result: &Result<Reply, ConnError>) {
        self.report(result);
        self.release_h2(sent.conn);
    }

    /// Tells the authority's health that a request was answered (an HTTP
    /// answer, or a stream the server reset: it is talking). Connection
    /// failures are told once per connection, as it is retired.
    fn report<T>(&self, result: &Result<T, ConnError>) {
        if matches!(result, Ok(_) | Err(ConnError::Reset(_))) {
            self.health.on_answer();
        }
    }

    /// A stream of connection `id` ended. The connection is retired when
    /// it takes no new streams (GOAWAY, a connection error, a lost
    /// socket); its other streams finish or fail on their own, each with
    /// its own reason. A stream the server reset leaves the connection
    /// as it was.
    fn release_h2(&self, id: u64) {
        let mut g = self.inner.lock();
        if let Some(pos) = g.h2.iter().position(|s| s.id == id) {
            if g.h2[pos].send.is_closed() {
                let slot = g.h2.swap_remove(pos);
                retired(&self.health, &slot);
            } else {
                g.h2[pos].inflight -= 1;
            }
        }
        drop(g);
        self.freed.notify_one();
    }

    fn release_h1(&self, send: H1Send, reusable: bool) {
        let mut g = self.inner.lock();
        g.h1_busy -= 1;
        if reusable && !send.is_closed() {
            g.h1_idle.push(send);
        }
        drop(g);
        self.freed.notify_one();
    }
}

/// A connection leaves its pool: when it died with requests unanswered,
/// that is one connection failure of its authority.
fn retired(health: &AuthorityHealth, slot: &H2Slot) {
    if slot.send.failed() {
        health.on_connection_failed(
            crate::clock::monotonic_ms(),
            "the connection was lost with requests unanswered",
        );
    }
}

fn describe<T>(r: &Result<T, ConnError>) -> String {
    match r {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    }
}
