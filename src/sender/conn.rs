//! One connection to a WNS front end: TCP (on the shard's network backend),
//! TLS with the channel's host as SNI, then HTTP/2 or HTTP/1.1, whichever
//! the server picked by ALPN.

use crate::telemetry::metrics::WNS_CONNECTIONS_OPEN as OPEN;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Time limits of every network step.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub tls: Duration,
    /// From sending a request to its response head.
    pub request: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        use super::limits::{CONNECT_MS_MAX, REQUEST_MS_MAX, TLS_HANDSHAKE_MS_MAX};
        Timeouts {
            connect: Duration::from_millis(CONNECT_MS_MAX),
            tls: Duration::from_millis(TLS_HANDSHAKE_MS_MAX),
            request: Duration::from_millis(REQUEST_MS_MAX),
        }
    }
}

/// The application protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    H2,
    Http1,
}

impl Protocol {
    pub fn label(self) -> &'static str {
        match self {
            Protocol::H2 => "h2",
            Protocol::Http1 => "http1",
        }
    }
}

/// Why a request got no HTTP answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnError {
    #[error("connect to {0} failed: {1}")]
    Connect(String, String),
    #[error("TLS handshake with {0} failed: {1}")]
    Tls(String, String),
    #[error("{0} timed out")]
    Timeout(&'static str),
    /// The connection closed, was reset or sent GOAWAY before answering: the
    /// request may be sent again on another connection.
    #[error("connection lost before an answer: {0}")]
    Lost(String),
    #[error("HTTP protocol error: {0}")]
    Protocol(String),
}

impl ConnError {
    /// True when the request surely or probably never reached the
    /// application, so resending it does not count as an attempt.
    pub fn is_retryable_elsewhere(&self) -> bool {
        matches!(
            self,
            ConnError::Lost(_) | ConnError::Connect(..) | ConnError::Tls(..)
        )
    }
}

/// An answer. Push answers' bodies carry nothing WNS documents, so on h2
/// the body is drained and dropped (`body` is empty); HTTP/1.1 answers keep
/// it (token responses are read from it).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// An open connection.
pub enum Conn {
    H2(super::wire::H2Client),
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
}

impl Conn {
    pub fn protocol(&self) -> Protocol {
        match self {
            Conn::H2(_) => Protocol::H2,
            Conn::Http1(_) => Protocol::Http1,
        }
    }
}

/// Opens a connection to `dial` (`host:port`), presenting `sni` and
/// verifying the certificate for it. The socket is one of the calling
/// shard's backend ([`crate::shard::connect`]): on an io_uring shard, TLS
/// and HTTP run over an io_uring socket.
pub async fn connect(
    dial: &str,
    sni: &str,
    tls: Arc<ClientConfig>,
    t: &Timeouts,
) -> Result<Conn, ConnError> {
    open(dial, sni, tls, t, false).await
}

/// [`connect`] for a connection to WNS: counted in
/// `wnsgate_wns_connections_open{protocol}` from its handshake until it
/// closes.
pub async fn connect_wns(
    dial: &str,
    sni: &str,
    tls: Arc<ClientConfig>,
    t: &Timeouts,
) -> Result<Conn, ConnError> {
    open(dial, sni, tls, t, true).await
}

/// Counts one open WNS connection while it lives.
struct OpenGauge(Option<metrics::Gauge>);

impl OpenGauge {
    fn new(counted: bool, protocol: Protocol) -> OpenGauge {
        OpenGauge(counted.then(|| {
            let g = metrics::gauge!(OPEN, "protocol" => protocol.label());
            g.increment(1.0);
            g
        }))
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        if let Some(g) = &self.0 {
            g.decrement(1.0);
        }
    }
}

async fn open(
    dial: &str,
    sni: &str,
    tls: Arc<ClientConfig>,
    t: &Timeouts,
    counted: bool,
) -> Result<Conn, ConnError> {
    let name = ServerName::try_from(sni.to_owned())
        .map_err(|e| ConnError::Tls(sni.to_owned(), e.to_string()))?;
    let handshake = Handshake {
        sni: sni.to_owned(),
        name,
        tls,
        timeouts: *t,
        counted,
    };
    match crate::shard::connect(dial, t.connect, handshake).await {
        Ok(opened) => opened,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Err(ConnError::Timeout("connect")),
        Err(e) => Err(ConnError::Connect(dial.to_owned(), e.to_string())),
    }
}

/// TLS and the HTTP handshake on a connected socket, for either backend.
struct Handshake {
    sni: String,
    name: ServerName<'static>,
    tls: Arc<ClientConfig>,
    timeouts: Timeouts,
    /// Counted in the open-connections gauge while it lives.
    counted: bool,
}

impl crate::shard::OnConnect for Handshake {
    type Output = Result<Conn, ConnError>;

    async fn epoll(self, io: TcpStream) -> Self::Output {
        let counted = self.counted;
        let (conn, driver) = self.establish(io).await?;
        let open = OpenGauge::new(counted, conn.protocol());
        tokio::spawn(async move {
            driver.await;
            drop(open);
        });
        Ok(conn)
    }

    async fn uring<IO>(self, io: IO) -> Self::Output
    where
        IO: AsyncRead + AsyncWrite + Unpin + 'static,
    {
        let counted = self.counted;
        let (conn, driver) = self.establish(io).await?;
        let open = OpenGauge::new(counted, conn.protocol());
        tokio::task::spawn_local(async move {
            driver.await;
            drop(open);
        });
        Ok(conn)
    }
}

impl Handshake {
    /// Returns the connection and the future that drives it, to be spawned
    /// on the socket's thread.
    async fn establish<IO>(self, io: IO) -> Result<(Conn, Driver<IO>), ConnError>
    where
        IO: AsyncRead + AsyncWrite + Unpin + 'static,
    {
        let t = self.timeouts;
        let stream =
            tokio::time::timeout(t.tls, TlsConnector::from(self.tls).connect(self.name, io))
                .await
                .map_err(|_| ConnError::Timeout("TLS handshake"))?
                .map_err(|e| ConnError::Tls(self.sni.clone(), e.to_string()))?;
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        if h2 {
            let (client, conn) = tokio::time::timeout(t.tls, super::wire::handshake(stream))
                .await
                .map_err(|_| ConnError::Timeout("HTTP/2 handshake"))??;
            Ok((Conn::H2(client), Driver::H2(conn)))
        } else {
            let (send, conn) = hyper::client::conn::http1::Builder::new()
                .handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                .await
                .map_err(|e| ConnError::Protocol(e.to_string()))?;
            Ok((Conn::Http1(send), Driver::Http1(conn)))
        }
    }
}

/// The task side of an open connection: reads and writes its socket until
/// the connection ends. Lives in its own task, so the size gap between the
/// variants costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
enum Driver<IO: AsyncRead + AsyncWrite + Unpin> {
    H2(super::wire::Connection<TlsStream<IO>>),
    Http1(hyper::client::conn::http1::Connection<TokioIo<TlsStream<IO>>, Full<Bytes>>),
}

impl<IO> Future for Driver<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin + 'static,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.get_mut() {
            Driver::H2(conn) => Pin::new(conn).poll(cx).map(|r| {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "WNS h2 connection ended");
                }
            }),
            Driver::Http1(conn) => Pin::new(conn).poll(cx).map(|r| {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "WNS HTTP/1.1 connection ended");
                }
            }),
        }
    }
}

/// Sends one POST on an h2 connection and waits for the answer's head;
/// its body is read and dropped.
pub async fn post_h2(
    client: &super::wire::H2Client,
    authority: &str,
    path_and_query: &str,
    headers: &[(HeaderName, HeaderValue)],
    body: Bytes,
    timeout: Duration,
) -> Result<Reply, ConnError> {
    client
        .send(super::wire::Request {
            authority,
            path: path_and_query,
            headers,
            body,
            timeout,
        })
        .await
}

/// Sends one POST on an HTTP/1.1 connection and waits for the answer.
pub async fn post_http1(
    send: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    uri: &Uri,
    headers: &[(HeaderName, HeaderValue)],
    body: Bytes,
    timeout: Duration,
) -> Result<Reply, ConnError> {
    send.ready()
        .await
        .map_err(|e| ConnError::Lost(e.to_string()))?;
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = http::Method::POST;
    // HTTP/1.1 sends origin-form; Host comes from the authority.
    let host = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let mut origin = http::uri::Parts::default();
    origin.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    *req.uri_mut() = Uri::from_parts(origin).unwrap_or_else(|_| Uri::from_static("/"));
    let map = req.headers_mut();
    map.reserve(headers.len() + 1);
    for (name, value) in headers {
        map.append(name, value.clone());
    }
    if let Ok(v) = http::HeaderValue::from_str(&host) {
        req.headers_mut().insert(http::header::HOST, v);
    }
    let resp = tokio::time::timeout(timeout, send.send_request(req))
        .await
        .map_err(|_| ConnError::Timeout("WNS request"))?
        .map_err(|e| ConnError::Lost(e.to_string()))?;
    let (parts, body) = resp.into_parts();
    let body = http_body_util::Limited::new(body, super::limits::H1_REPLY_BODY_BYTES_MAX)
        .collect()
        .await
        .map_err(|e| ConnError::Lost(e.to_string()))?
        .to_bytes();
    Ok(Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    })
}
