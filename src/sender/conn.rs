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
///
/// What a resend risks follows from the variant: [`ConnError::Unprocessed`],
/// [`ConnError::Unwritten`], a stream refused with REFUSED_STREAM, and a
/// failed connect or TLS handshake never reached the application, so
/// sending them again is safe; any other [`ConnError::Reset`], and
/// [`ConnError::Lost`], may have been processed, so a resend may wake the
/// device twice ([`ConnError::may_have_been_processed`]).
///
/// Whether a resend waits follows from it too: a failed connect or
/// handshake and a connection that died ([`ConnError::is_connection_failure`])
/// are signs of a front end in trouble, counted by the authority's circuit
/// breaker and resent after a back-off; a refused or reset stream, or a
/// connection going away gracefully, are resent at once.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnError {
    #[error("connect to {0} failed: {1}")]
    Connect(String, String),
    #[error("TLS handshake with {0} failed: {1}")]
    Tls(String, String),
    #[error("{0} timed out")]
    Timeout(&'static str),
    /// The server did not process the request: its stream was above a
    /// GOAWAY's last stream id (RFC 9113 section 8.7), or it was never
    /// written because the connection was closing or had no free stream.
    #[error("not processed by the server: {0}")]
    Unprocessed(String),
    /// The connection died (reset, closed, silent) before any of the
    /// request was written: not processed, but its front end is failing.
    #[error("connection lost before the request was written: {0}")]
    Unwritten(String),
    /// Not sent: the circuit breaker of this authority is open, and this
    /// request was not its probe. Nothing was tried.
    #[error("not sent: the circuit to {0} is open")]
    CircuitOpen(String),
    /// The server reset this request's stream with this HTTP/2 error code.
    /// REFUSED_STREAM means it was not processed (RFC 9113 section 8.7);
    /// after any other code it may have been. The connection goes on
    /// serving other streams.
    #[error("stream reset by the server ({})", h2_code_name(*.0))]
    Reset(u32),
    /// The connection closed, failed or went silent after the request was
    /// written, before its answer: it may have been processed.
    #[error("connection lost before an answer: {0}")]
    Lost(String),
    #[error("HTTP protocol error: {0}")]
    Protocol(String),
}

impl ConnError {
    /// True when the request may be sent again, on this connection or
    /// another: it never reached the application ([`ConnError::Connect`],
    /// [`ConnError::Tls`], [`ConnError::Unprocessed`], a refused stream),
    /// or it may have and its answer was lost (another
    /// [`ConnError::Reset`], [`ConnError::Lost`]; see
    /// [`ConnError::may_have_been_processed`]). A timeout is final: the
    /// server was seen alive and still did not answer.
    pub fn is_retryable_elsewhere(&self) -> bool {
        matches!(
            self,
            ConnError::Unprocessed(_)
                | ConnError::Unwritten(_)
                | ConnError::Reset(_)
                | ConnError::Lost(_)
                | ConnError::Connect(..)
                | ConnError::Tls(..)
        )
    }

    /// True when the connection itself failed: it could not be opened
    /// (connect, TLS or HTTP/2 handshake), or it died with this request
    /// unanswered. A resend waits a back-off, and the authority's breaker
    /// counts the connection as failed.
    pub fn is_connection_failure(&self) -> bool {
        matches!(
            self,
            ConnError::Connect(..)
                | ConnError::Tls(..)
                | ConnError::Lost(_)
                | ConnError::Unwritten(_)
        )
    }

    /// True when the server may have processed the request although no
    /// answer came: a resend may then deliver it twice.
    pub fn may_have_been_processed(&self) -> bool {
        match self {
            ConnError::Reset(code) => *code != REFUSED_STREAM,
            ConnError::Lost(_) => true,
            _ => false,
        }
    }
}

/// The HTTP/2 error code a server refuses a stream with, before doing
/// anything with it (RFC 9113 section 8.7).
pub const REFUSED_STREAM: u32 = 0x7;

/// The name of an HTTP/2 error code (RFC 9113 section 7).
pub fn h2_code_name(code: u32) -> std::borrow::Cow<'static, str> {
    const NAMES: [&str; 14] = [
        "NO_ERROR",
        "PROTOCOL_ERROR",
        "INTERNAL_ERROR",
        "FLOW_CONTROL_ERROR",
        "SETTINGS_TIMEOUT",
        "STREAM_CLOSED",
        "FRAME_SIZE_ERROR",
        "REFUSED_STREAM",
        "CANCEL",
        "COMPRESSION_ERROR",
        "CONNECT_ERROR",
        "ENHANCE_YOUR_CALM",
        "INADEQUATE_SECURITY",
        "HTTP_1_1_REQUIRED",
    ];
    match NAMES.get(code as usize) {
        Some(name) => (*name).into(),
        None => format!("code {code:#x}").into(),
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
        dial: dial.to_owned(),
        sni: sni.to_owned(),
        name,
        tls,
        timeouts: *t,
        counted,
    };
    match crate::shard::connect(dial, t.connect, handshake).await {
        Ok(opened) => opened,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Err(ConnError::Connect(
            dial.to_owned(),
            format!("no connection within {} ms", t.connect.as_millis()),
        )),
        Err(e) => Err(ConnError::Connect(dial.to_owned(), e.to_string())),
    }
}

/// TLS and the HTTP handshake on a connected socket, for either backend.
struct Handshake {
    /// `host:port` dialled, for errors.
    dial: String,
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
        // A handshake the socket failed (reset, closed, silent) is a
        // connection that could not be opened; one that TLS itself
        // refused (a certificate, an alert) is a TLS failure.
        let stream =
            tokio::time::timeout(t.tls, TlsConnector::from(self.tls).connect(self.name, io))
                .await
                .map_err(|_| {
                    ConnError::Connect(
                        self.dial.clone(),
                        format!("no TLS handshake within {} ms", t.tls.as_millis()),
                    )
                })?
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::InvalidData => {
                        ConnError::Tls(self.sni.clone(), e.to_string())
                    }
                    _ => ConnError::Connect(
                        self.dial.clone(),
                        format!("during the TLS handshake: {e}"),
                    ),
                })?;
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        if h2 {
            let (client, conn) = tokio::time::timeout(t.tls, super::wire::handshake(stream))
                .await
                .map_err(|_| {
                    ConnError::Connect(
                        self.dial.clone(),
                        format!("no HTTP/2 handshake within {} ms", t.tls.as_millis()),
                    )
                })?
                .map_err(|e| match e {
                    ConnError::Unprocessed(why) | ConnError::Lost(why) => ConnError::Connect(
                        self.dial.clone(),
                        format!("during the HTTP/2 handshake: {why}"),
                    ),
                    other => other,
                })?;
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
    // Closed before anything was written: nothing was processed.
    send.ready()
        .await
        .map_err(|e| ConnError::Unprocessed(e.to_string()))?;
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
    let resp = tokio::time::timeout(timeout, send.try_send_request(req))
        .await
        .map_err(|_| ConnError::Timeout("WNS request"))?
        .map_err(|e| {
            // hyper gives the request back when it failed before writing
            // any of it.
            let error = e.error().to_string();
            match e.message() {
                Some(_) => ConnError::Unprocessed(error),
                None => ConnError::Lost(error),
            }
        })?;
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
