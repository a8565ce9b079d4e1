//! The WNS simulator against real clients: rustls with the simulator's CA
//! and SNI `db5.notify.windows.com`, h2 (the `h2` crate) and HTTP/1.1 (raw
//! bytes, so header case and `Expect`/chunked requests are under our
//! control), plus h2c and the `wnsgate sim` command.

use bytes::{Bytes, BytesMut};
use futures_util::future::join_all;
use http::{HeaderMap, Method, Request};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use wnsgate::sim::{self, Behaviour, Faults, Mode, SimConfig, SimHandle, SimStats};

const HOST: &str = "db5.notify.windows.com";
const CLASSIC_FORM: &str = "grant_type=client_credentials&client_id=ms-app%3A%2F%2FS-1-15-2-111&client_secret=secret-1&scope=notify.windows.com";
const SID: &str = "ms-app://S-1-15-2-111";

fn start(cfg: SimConfig) -> SimHandle {
    sim::start(cfg).expect("simulator starts")
}

fn channel(token: &str) -> String {
    format!("https://{HOST}/?token={token}")
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Connects to the simulator: TLS with the simulator's CA, `sni` and
/// `alpn`, or plain TCP in h2c mode. Answers the negotiated ALPN.
async fn connect(sim: &SimHandle, sni: &str, alpn: &[&[u8]]) -> (Box<dyn Io>, Option<Vec<u8>>) {
    let tcp = TcpStream::connect(sim.addr).await.expect("connect");
    tcp.set_nodelay(true).unwrap();
    if sim.mode == Mode::H2c {
        return (Box::new(tcp), None);
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(sim.ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let name = ServerName::try_from(sni.to_owned()).unwrap();
    let tls = connector.connect(name, tcp).await.expect("TLS handshake");
    let negotiated = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    (Box::new(tls), negotiated)
}

/// An answer, from either client.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

/// An h2 client connection; the connection task runs in the background.
#[derive(Clone)]
struct H2 {
    send: h2::client::SendRequest<Bytes>,
}

impl H2 {
    async fn connect(sim: &SimHandle) -> H2 {
        let (io, alpn) = connect(sim, HOST, &[b"h2", b"http/1.1"]).await;
        if sim.mode != Mode::H2c {
            assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
        }
        let (send, conn) = h2::client::handshake(io).await.expect("h2 handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        H2 { send }
    }

    async fn send(&self, req: Request<()>, body: Bytes) -> Result<Resp, h2::Error> {
        let mut send = self.send.clone().ready().await?;
        let end = body.is_empty();
        let (resp, mut stream) = send.send_request(req, end)?;
        if !end {
            stream.send_data(body, true)?;
        }
        let resp = resp.await?;
        let (parts, mut body) = resp.into_parts();
        let mut buf = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            buf.extend_from_slice(&chunk);
        }
        Ok(Resp {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: buf.freeze(),
        })
    }

    async fn req(&self, req: Request<()>, body: &str) -> Resp {
        self.send(req, Bytes::from(body.to_owned()))
            .await
            .expect("h2 request")
    }

    async fn classic_token(&self) -> String {
        let r = self
            .req(token_request("/accesstoken.srf"), CLASSIC_FORM)
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.json()["access_token"].as_str().unwrap().to_owned()
    }

    async fn token_for(&self, sid: &str) -> String {
        let form = format!(
            "grant_type=client_credentials&client_id={sid}&client_secret=s&scope=notify.windows.com"
        );
        let r = self.req(token_request("/accesstoken.srf"), &form).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.json()["access_token"].as_str().unwrap().to_owned()
    }

    async fn push(&self, uri: &str, token: &str) -> Resp {
        self.req(Push::new(uri, token).build(), "wake").await
    }

    async fn control(&self, method: Method, path: &str, body: &str) -> Resp {
        let req = Request::builder()
            .method(method)
            .uri(format!("https://127.0.0.1{path}"))
            .header("content-type", "application/json")
            .body(())
            .unwrap();
        self.req(req, body).await
    }
}

fn token_request(path: &str) -> Request<()> {
    Request::builder()
        .method(Method::POST)
        .uri(format!("https://login.live.com{path}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(())
        .unwrap()
}

/// A push request: valid by default, editable.
struct Push {
    method: Method,
    uri: String,
    headers: Vec<(&'static str, String)>,
}

impl Push {
    fn new(uri: &str, token: &str) -> Push {
        Push {
            method: Method::POST,
            uri: uri.to_owned(),
            headers: vec![
                ("authorization", format!("Bearer {token}")),
                ("x-wns-type", "wns/raw".into()),
                ("content-type", "application/octet-stream".into()),
                ("x-wns-cache-policy", "cache".into()),
            ],
        }
    }
    fn set(mut self, name: &'static str, value: &str) -> Push {
        self.headers.retain(|(n, _)| *n != name);
        self.headers.push((name, value.to_owned()));
        self
    }
    fn without(mut self, name: &'static str) -> Push {
        self.headers.retain(|(n, _)| *n != name);
        self
    }
    fn method(mut self, m: Method) -> Push {
        self.method = m;
        self
    }
    fn build(self) -> Request<()> {
        let mut b = Request::builder().method(self.method).uri(self.uri);
        for (n, v) in self.headers {
            b = b.header(n, v);
        }
        b.body(()).unwrap()
    }
}

/// A raw HTTP/1.1 client: writes bytes as given, reads answers keeping the
/// header names exactly as sent.
struct H1 {
    io: Box<dyn Io>,
    buf: Vec<u8>,
}

#[derive(Debug)]
struct RawResp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl H1 {
    async fn connect(sim: &SimHandle, alpn: &[&[u8]]) -> (H1, Option<Vec<u8>>) {
        let (io, negotiated) = connect(sim, HOST, alpn).await;
        (
            H1 {
                io,
                buf: Vec::new(),
            },
            negotiated,
        )
    }

    async fn roundtrip(&mut self, raw: &[u8]) -> std::io::Result<RawResp> {
        self.io.write_all(raw).await?;
        self.io.flush().await?;
        self.read_response().await
    }

    async fn read_response(&mut self) -> std::io::Result<RawResp> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(len) = parsed.parse(&self.buf).unwrap() {
                let status = parsed.code.unwrap();
                let headers: Vec<(String, String)> = parsed
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_owned(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                let body_len: usize = headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                    .map_or(0, |(_, v)| v.parse().unwrap());
                while self.buf.len() < len + body_len {
                    self.fill().await?;
                }
                let body = self.buf[len..len + body_len].to_vec();
                self.buf.drain(..len + body_len);
                return Ok(RawResp {
                    status,
                    headers,
                    body,
                });
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 16384];
        let n = self.io.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

fn h1_token_request() -> Vec<u8> {
    format!(
        "POST /accesstoken.srf HTTP/1.1\r\nHost: login.live.com\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{CLASSIC_FORM}",
        CLASSIC_FORM.len()
    )
    .into_bytes()
}

fn h1_push(token_param: &str, bearer: &str, extra: &str, body: &str) -> Vec<u8> {
    format!(
        "POST /?token={token_param} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {bearer}\r\nX-WNS-Type: wns/raw\r\nContent-Type: application/octet-stream\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn h1_token(c: &mut H1) -> String {
    let r = c.roundtrip(&h1_token_request()).await.unwrap();
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    v["access_token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn classic_token_then_push_is_received_over_h2() {
    let sim = start(SimConfig::default());
    let c = H2::connect(&sim).await;
    let r = c.req(token_request("/accesstoken.srf"), CLASSIC_FORM).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["token_type"], "bearer");
    assert_eq!(v["expires_in"], 86400);
    let token = v["access_token"].as_str().unwrap();

    let req = Push::new(&channel("AwYAAAD1"), token)
        .set("ms-cv", "xyz123.1")
        .set("x-wns-requestforstatus", "true")
        .build();
    let r = c.req(req, "wake").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-wns-status"), Some("received"));
    assert_eq!(r.header("x-wns-deviceconnectionstatus"), Some("connected"));
    assert_eq!(r.header("ms-cv"), Some("xyz123.1"));
    let id = r.header("x-wns-msg-id").unwrap();
    assert!(
        id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    assert!(!r.header("x-wns-debug-trace").unwrap().is_empty());

    let r = c.push(&channel("AwYAAAD2"), token).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-wns-deviceconnectionstatus"), None);
    assert_ne!(r.header("x-wns-msg-id").unwrap(), id);
    let s = sim.stats();
    assert_eq!((s.token_requests, s.tokens_issued), (1, 1));
    assert_eq!(s.outcome("received"), 2);
    assert_eq!(s.h2_connections, 1);
}

#[tokio::test]
async fn entra_token_has_a_string_expires_in_and_pushes() {
    let sim = start(SimConfig {
        token_lifetime: Duration::from_secs(3599),
        ..SimConfig::default()
    });
    let c = H2::connect(&sim).await;
    let form = "grant_type=client_credentials&client_id=ms-app%3A%2F%2FS-1-15-2-9&client_secret=x&scope=https%3A%2F%2Fwns.windows.com%2F.default";
    let r = c
        .req(
            token_request("/contoso.onmicrosoft.com/oauth2/v2.0/token"),
            form,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let v = r.json();
    assert_eq!(v["expires_in"], "3599");
    assert!(v["token_type"]
        .as_str()
        .unwrap()
        .eq_ignore_ascii_case("bearer"));
    let token = v["access_token"].as_str().unwrap();
    assert_eq!(c.push(&channel("AwYAAAD1"), token).await.status, 200);

    // The classic scope is refused on the Entra endpoint, and vice versa.
    let r = c
        .req(
            token_request("/contoso.onmicrosoft.com/oauth2/v2.0/token"),
            CLASSIC_FORM,
        )
        .await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("invalid_scope"))
    );
    let r = c.req(token_request("/accesstoken.srf"), form).await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("invalid_scope"))
    );
}

#[tokio::test]
async fn token_errors_are_oauth_json() {
    let sim = start(SimConfig {
        apps: vec![format!("{SID}=secret-1").parse().unwrap()],
        ..SimConfig::default()
    });
    let c = H2::connect(&sim).await;
    let form = |f: &str| f.to_owned();
    let cases = [
        (
            form("grant_type=client_credentials&client_id=ms-app%3A%2F%2FS-1-15-2-111&client_secret=wrong&scope=notify.windows.com"),
            "invalid_client",
        ),
        (
            form("grant_type=client_credentials&client_id=ms-app%3A%2F%2FS-1-15-2-222&client_secret=secret-1&scope=notify.windows.com"),
            "invalid_client",
        ),
        (
            form("client_id=ms-app%3A%2F%2FS-1-15-2-111&client_secret=secret-1&scope=notify.windows.com"),
            "invalid_request",
        ),
        (
            form("grant_type=client_credentials&client_secret=secret-1&scope=notify.windows.com"),
            "invalid_request",
        ),
        (
            form("grant_type=client_credentials&client_id=ms-app%3A%2F%2FS-1-15-2-111&scope=notify.windows.com"),
            "invalid_request",
        ),
        (
            form("grant_type=client_credentials&client_id=ms-app%3A%2F%2FS-1-15-2-111&client_secret=secret-1"),
            "invalid_request",
        ),
        (
            form("grant_type=authorization_code&client_id=ms-app%3A%2F%2FS-1-15-2-111&client_secret=secret-1&scope=notify.windows.com"),
            "unsupported_grant_type",
        ),
        (
            form("grant_type=client_credentials&client_id=ms-app%3A%2F%2FS-1-15-2-111&client_secret=secret-1&scope=wns"),
            "invalid_scope",
        ),
    ];
    for (body, error) in &cases {
        let r = c.req(token_request("/accesstoken.srf"), body).await;
        assert_eq!(r.status, 400, "{body}");
        let v = r.json();
        assert_eq!(v["error"], *error, "{body}");
        assert!(v["error_description"].is_string());
    }
    let json_ct = Request::builder()
        .method(Method::POST)
        .uri("https://login.live.com/accesstoken.srf")
        .header("content-type", "application/json")
        .body(())
        .unwrap();
    let r = c.req(json_ct, CLASSIC_FORM).await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("invalid_request"))
    );
    let get = Request::builder()
        .uri("https://login.live.com/accesstoken.srf")
        .body(())
        .unwrap();
    assert_eq!(c.req(get, "").await.status, 405);
    // The configured credential works.
    c.classic_token().await;
    let s = sim.stats();
    assert_eq!(s.token_requests, cases.len() as u64 + 3);
    assert_eq!(s.tokens_issued, 1);
}

#[tokio::test]
async fn push_needs_a_known_unexpired_bearer() {
    let sim = start(SimConfig {
        token_lifetime: Duration::from_secs(1),
        ..SimConfig::default()
    });
    let c = H2::connect(&sim).await;
    let token = c.classic_token().await;
    let uri = channel("AwYAAAD1");
    let missing = Push::new(&uri, &token).without("authorization").build();
    let r = c.req(missing, "wake").await;
    assert_eq!(r.status, 401);
    assert!(r.header("x-wns-msg-id").is_some());
    let basic = Push::new(&uri, &token)
        .set("authorization", "Basic dXNlcjpwYXNz")
        .build();
    assert_eq!(c.req(basic, "wake").await.status, 401);
    assert_eq!(c.push(&uri, "EgAnot-a-token").await.status, 401);
    // Past its one-second lifetime the token is refused.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = c.push(&uri, &token).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("x-wns-error-description"), Some("Token expired"));
    assert_eq!(sim.stats().outcome("unauthorized"), 4);
}

#[tokio::test]
async fn push_header_body_and_method_rules() {
    let sim = start(SimConfig::default());
    let c = H2::connect(&sim).await;
    let t = c.classic_token().await;
    let uri = channel("AwYAAAD1");
    let big = |n: usize| "x".repeat(n);
    let cases: Vec<(Request<()>, String, u16)> = vec![
        (
            Push::new(&uri, &t).without("x-wns-type").build(),
            "w".into(),
            400,
        ),
        (
            Push::new(&uri, &t).set("x-wns-type", "wns/push").build(),
            "w".into(),
            400,
        ),
        (
            Push::new(&uri, &t).set("content-type", "text/xml").build(),
            "w".into(),
            400,
        ),
        (
            Push::new(&uri, &t).without("content-type").build(),
            "w".into(),
            400,
        ),
        (
            Push::new(&uri, &t)
                .set("x-wns-cache-policy", "always")
                .build(),
            "w".into(),
            400,
        ),
        (
            Push::new(&uri, &t).set("x-wns-ttl", "soon").build(),
            "w".into(),
            400,
        ),
        (Push::new(&uri, &t).build(), String::new(), 400),
        (Push::new(&uri, &t).build(), big(5001), 413),
        (Push::new(&uri, &t).build(), big(70_000), 413),
        (Push::new(&uri, &t).build(), big(5000), 200),
        (
            Push::new(&uri, &t).method(Method::GET).build(),
            String::new(),
            405,
        ),
        (
            Push::new(&uri, &t).method(Method::PUT).build(),
            "w".into(),
            405,
        ),
        (
            Push::new(&uri, &t)
                .set("x-wns-type", "wns/toast")
                .set("content-type", "text/xml")
                .build(),
            "<toast/>".into(),
            200,
        ),
        (
            Push::new(&format!("https://{HOST}/"), &t).build(),
            "w".into(),
            404,
        ),
        (
            Push::new(&format!("https://{HOST}/?id=1"), &t).build(),
            "w".into(),
            404,
        ),
    ];
    let n = cases.len();
    for (req, body, want) in cases {
        let what = format!("{} {:?}", req.method(), req.headers());
        let r = c.req(req, &body).await;
        assert_eq!(r.status, want, "{what} body {}", body.len());
        assert!(r.header("x-wns-debug-trace").is_some());
    }
    let s = sim.stats();
    assert_eq!(s.pushes_total, n as u64);
    assert_eq!(s.outcome("too_large"), 2);
    assert_eq!(s.outcome("method_not_allowed"), 2);
    assert_eq!(s.outcome("bad_request"), 7);
}

#[tokio::test]
async fn http1_push_with_title_case_headers_and_keep_alive() {
    let sim = start(SimConfig::default());
    let (mut c, alpn) = H1::connect(&sim, &[b"http/1.1"]).await;
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    let token = h1_token(&mut c).await;
    let r = c
        .roundtrip(&h1_push(
            "AwYAAAD1",
            &token,
            "MS-CV: cv.7\r\nX-WNS-RequestForStatus: true\r\n",
            "wake",
        ))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    // Header names arrive in mixed case; clients must not care.
    let names: Vec<&str> = r.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"X-Wns-Status"), "{names:?}");
    assert_eq!(r.header("x-wns-status"), Some("received"));
    assert_eq!(r.header("ms-cv"), Some("cv.7"));
    assert_eq!(r.header("X-WNS-DeviceConnectionStatus"), Some("connected"));
    assert_eq!(r.header("x-wns-msg-id").map(str::len), Some(16));
    // Same connection, a scripted channel.
    let r = c
        .roundtrip(&h1_push("x410gone", &token, "", "wake"))
        .await
        .unwrap();
    assert_eq!(r.status, 410);
    let s = sim.stats();
    assert_eq!((s.http1_connections, s.connections), (1, 1));
}

#[tokio::test]
async fn http1_refuses_expect_and_chunked_bodies() {
    let sim = start(SimConfig::default());
    let (mut c2, alpn) = H1::connect(&sim, &[b"http/1.1"]).await;
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    let token = h1_token(&mut c2).await;
    let r = c2
        .roundtrip(&h1_push(
            "AwYAAAD1",
            &token,
            "Expect: 100-continue\r\n",
            "wake",
        ))
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(r
        .header("x-wns-error-description")
        .unwrap()
        .contains("Expect"));

    let (mut c, _) = H1::connect(&sim, &[b"http/1.1"]).await;
    let chunked = format!(
        "POST /?token=AwYAAAD1 HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}\r\nX-WNS-Type: wns/raw\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwake\r\n0\r\n\r\n"
    );
    let r = c.roundtrip(chunked.as_bytes()).await.unwrap();
    assert_eq!(r.status, 400);
    assert!(r
        .header("x-wns-error-description")
        .unwrap()
        .contains("Chunked"));

    // No body at all (no Content-Length) is an empty payload.
    let (mut c, _) = H1::connect(&sim, &[b"http/1.1"]).await;
    let no_body = format!(
        "POST /?token=AwYAAAD1 HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {token}\r\nX-WNS-Type: wns/raw\r\nContent-Type: application/octet-stream\r\n\r\n"
    );
    assert_eq!(c.roundtrip(no_body.as_bytes()).await.unwrap().status, 400);
    // Nor without a Host header.
    let no_host = format!(
        "POST /?token=AwYAAAD1 HTTP/1.1\r\nAuthorization: Bearer {token}\r\nX-WNS-Type: wns/raw\r\nContent-Type: application/octet-stream\r\nContent-Length: 1\r\n\r\nw"
    );
    assert_eq!(c.roundtrip(no_host.as_bytes()).await.unwrap().status, 400);
    assert_eq!(sim.stats().outcome("bad_request"), 4);
}

#[tokio::test]
async fn h1_mode_is_http1_only() {
    let sim = start(SimConfig {
        mode: Mode::H1,
        ..SimConfig::default()
    });
    let (mut c, alpn) = H1::connect(&sim, &[b"h2", b"http/1.1"]).await;
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    let token = h1_token(&mut c).await;
    let r = c
        .roundtrip(&h1_push("AwYAAAD1", &token, "", "wake"))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(sim.stats().h2_connections, 0);
}

#[tokio::test]
async fn certificate_covers_the_wns_and_login_names() {
    let sim = start(SimConfig::default());
    for name in [
        "bn1.notify.windows.com",
        "wns2-by3p.notify.windows.com",
        "notify.windows.com",
        "login.live.com",
        "login.microsoftonline.com",
        "localhost",
        "127.0.0.1",
    ] {
        let (_io, alpn) = connect(&sim, name, &[b"h2"]).await;
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]), "{name}");
    }
    assert_eq!(
        std::fs::read_to_string(&sim.ca_pem_path).unwrap(),
        sim.ca_pem
    );
}

/// (channel token, status, X-WNS-Status, X-WNS-Error-Description)
const PREFIX_CASES: [(&str, u16, Option<&str>, Option<&str>); 8] = [
    ("AwYAAAD1", 200, Some("received"), None),
    ("x410-1", 410, None, Some("Channel expired")),
    ("xrevoked-1", 410, None, Some("Revoked channel URL")),
    ("x404-1", 404, None, None),
    ("x403-1", 403, None, None),
    ("xdrop-1", 200, Some("dropped"), None),
    ("xthrottle-1", 200, Some("channelthrottled"), None),
    ("xblocked-1", 410, None, Some("Domain Blocked")),
];

#[tokio::test]
async fn channel_token_prefixes_script_the_answers() {
    let sim = start(SimConfig::default());
    let c = H2::connect(&sim).await;
    let t = c.classic_token().await;
    for (tok, status, wns, desc) in PREFIX_CASES {
        let r = c.push(&channel(tok), &t).await;
        assert_eq!(r.status, status, "{tok}");
        assert_eq!(r.header("x-wns-status"), wns, "{tok}");
        if desc.is_some() {
            assert_eq!(r.header("x-wns-error-description"), desc, "{tok}");
        }
        assert!(r.header("x-wns-msg-id").is_some());
    }
    let s = sim.stats();
    for name in [
        "received",
        "expired",
        "revoked",
        "not_found",
        "wrong_app",
        "dropped",
        "channel_throttled",
        "domain_blocked",
    ] {
        assert_eq!(s.outcome(name), 1, "{name}");
    }
}

#[tokio::test]
async fn control_api_binds_channels_to_behaviours() {
    let sim = start(SimConfig::default());
    let c = H2::connect(&sim).await;
    let t = c.classic_token().await;
    let cases = [
        ("received", 200, Some("received")),
        ("expired", 410, None),
        ("revoked", 410, None),
        ("not_found", 404, None),
        ("wrong_app", 403, None),
        ("dropped", 200, Some("dropped")),
        ("throttled", 200, Some("channelthrottled")),
        ("domain_blocked", 410, None),
    ];
    for (i, (behaviour, status, wns)) in cases.iter().enumerate() {
        // A token with no prefix: only the binding makes it special.
        let uri = channel(&format!("AwYAAAD{i}"));
        let body = serde_json::json!({"channel_uri": uri, "behaviour": behaviour}).to_string();
        let r = c.control(Method::PUT, "/_sim/channels", &body).await;
        assert_eq!(r.status, 204, "{:?}", r.body);
        let r = c.push(&uri, &t).await;
        assert_eq!(
            (r.status, r.header("x-wns-status")),
            (*status, *wns),
            "{behaviour}"
        );
    }
    // A binding overrides the prefix convention.
    let uri = channel("x410-but-bound");
    sim.set_behaviour(&uri, Behaviour::Received, None).unwrap();
    assert_eq!(c.push(&uri, &t).await.status, 200);

    // A channel bound to an app refuses other apps' tokens with 403.
    let owned = channel("AwYAAAD-owned");
    let body = serde_json::json!({"channel_uri": owned, "behaviour": "received", "app_sid": SID})
        .to_string();
    assert_eq!(
        c.control(Method::PUT, "/_sim/channels", &body).await.status,
        204
    );
    assert_eq!(c.push(&owned, &t).await.status, 200);
    let other = c.token_for("ms-app://S-1-15-2-999").await;
    let r = c.push(&owned, &other).await;
    assert_eq!(r.status, 403);

    // Bad input is refused with a reason.
    for bad in [
        r#"{"channel_uri": "db5.notify.windows.com/?token=a", "behaviour": "expired"}"#,
        r#"{"channel_uri": "https://db5.notify.windows.com/?token=a", "behaviour": "gone"}"#,
        r#"{"channel_uri": "https://db5.notify.windows.com/?token=a"}"#,
        "not json",
    ] {
        let r = c.control(Method::PUT, "/_sim/channels", bad).await;
        assert_eq!(r.status, 400, "{bad}");
        assert!(r.json()["error"].is_string());
    }
    assert_eq!(
        c.control(Method::GET, "/_sim/channels", "").await.status,
        405
    );
    assert_eq!(
        c.control(Method::GET, "/_sim/nothing", "").await.status,
        404
    );

    // DELETE forgets them all: the x410 prefix applies again.
    assert_eq!(
        c.control(Method::DELETE, "/_sim/channels", "").await.status,
        204
    );
    assert_eq!(c.push(&uri, &t).await.status, 410);
    assert_eq!(c.push(&owned, &other).await.status, 200);
}

#[tokio::test]
async fn channel_identity_is_byte_exact() {
    let sim = start(SimConfig::default());
    let c = H2::connect(&sim).await;
    let t = c.classic_token().await;
    let uri = channel("AwYAAAD%2bAb");
    sim.set_behaviour(&uri, Behaviour::Dropped, None).unwrap();
    let status = |r: &Resp| r.header("x-wns-status").map(str::to_owned);
    assert_eq!(status(&c.push(&uri, &t).await).as_deref(), Some("dropped"));
    let other_case = channel("AwYAAAD%2BAb");
    assert_eq!(
        status(&c.push(&other_case, &t).await).as_deref(),
        Some("received")
    );
    let other_host = "https://bn1.notify.windows.com/?token=AwYAAAD%2bAb";
    assert_eq!(
        status(&c.push(other_host, &t).await).as_deref(),
        Some("received")
    );
    assert_eq!(sim.stats().distinct_channels, 3);
}

#[tokio::test]
async fn error_ratio_injects_500_and_503_in_proportion() {
    let sim = start(SimConfig {
        faults: Faults {
            error_ratio: 0.5,
            ..Faults::default()
        },
        ..SimConfig::default()
    });
    let c = H2::connect(&sim).await;
    let t = c.classic_token().await;
    let results = join_all((0..400).map(|i| {
        let (c, t) = (c.clone(), t.clone());
        async move { c.push(&channel(&format!("AwYAAAD{i}")), &t).await }
    }))
    .await;
    let count = |s: u16| results.iter().filter(|r| r.status == s).count();
    let (ok, e500, e503) = (count(200), count(500), count(503));
    assert_eq!(ok + e500 + e503, 400);
    // Expected 200 errors, 100 of each; the bands are many deviations wide.
    assert!((120..=280).contains(&(e500 + e503)), "{e500} + {e503}");
    assert!(e500 >= 40 && e503 >= 40, "{e500} / {e503}");
    for r in results.iter().filter(|r| r.status != 200) {
        assert_eq!(r.header("retry-after"), Some("1"));
    }
    let s = sim.stats();
    assert_eq!(s.outcome("server_error") as usize, e500);
    assert_eq!(s.outcome("unavailable") as usize, e503);

    // Turned off through the control API.
    let r = c.control(Method::PUT, "/_sim/faults", "{}").await;
    assert_eq!(r.status, 204);
    for i in 0..20 {
        assert_eq!(
            c.push(&channel(&format!("AwYAAAE{i}")), &t).await.status,
            200
        );
    }
}

#[tokio::test]
async fn sender_rate_throttles_one_sender_with_406() {
    let sim = start(SimConfig::default());
    let c = H2::connect(&sim).await;
    let r = c
        .control(Method::PUT, "/_sim/faults", r#"{"sender_rate": 2}"#)
        .await;
    assert_eq!(r.status, 204);
    let v = c.control(Method::GET, "/_sim/faults", "").await.json();
    assert_eq!(v["sender_rate"], 2);
    let t = c.classic_token().await;
    let results = join_all((0..30).map(|i| {
        let (c, t) = (c.clone(), t.clone());
        async move { c.push(&channel(&format!("AwYAAAD{i}")), &t).await }
    }))
    .await;
    let throttled: Vec<&Resp> = results.iter().filter(|r| r.status == 406).collect();
    assert!(throttled.len() >= 10, "{} throttled", throttled.len());
    assert!(results.iter().any(|r| r.status == 200));
    for r in throttled {
        let after: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!(after >= 1);
    }
    // Another sender has its own budget.
    let other = c.token_for("ms-app://S-1-15-2-777").await;
    assert_eq!(c.push(&channel("AwYAAAD1"), &other).await.status, 200);
    // Bad faults are refused.
    for bad in [
        r#"{"error_ratio": 2}"#,
        r#"{"latency_ms": "9-1"}"#,
        r#"{"nope": 1}"#,
    ] {
        assert_eq!(
            c.control(Method::PUT, "/_sim/faults", bad).await.status,
            400,
            "{bad}"
        );
    }
}

#[tokio::test]
async fn latency_delays_answers_but_all_arrive() {
    let sim = start(SimConfig::default());
    sim.set_faults(Faults {
        latency_ms: Some("20-60".parse().unwrap()),
        ..Faults::default()
    })
    .unwrap();
    let c = H2::connect(&sim).await;
    let v = c.control(Method::GET, "/_sim/faults", "").await.json();
    assert_eq!(v["latency_ms"], "20-60");
    let t = c.classic_token().await;
    let results = join_all((0..150).map(|i| {
        let (c, t) = (c.clone(), t.clone());
        async move { c.push(&channel(&format!("AwYAAAD{i}")), &t).await.status }
    }))
    .await;
    assert!(results.iter().all(|s| *s == 200));
}

#[tokio::test]
async fn goaway_every_n_retires_h2_connections_gracefully() {
    let sim = start(SimConfig {
        faults: Faults {
            goaway_every: Some(5),
            latency_ms: Some("10-30".parse().unwrap()),
            ..Faults::default()
        },
        ..SimConfig::default()
    });
    let (io, _) = connect(&sim, HOST, &[b"h2"]).await;
    let (send, conn) = h2::client::handshake(io).await.unwrap();
    let conn = tokio::spawn(conn);
    let c = H2 { send };
    // The token request is stream 1 of 5.
    let t = c.classic_token().await;
    let results = join_all((0..20).map(|i| {
        let (c, t) = (c.clone(), t.clone());
        async move {
            let req = Push::new(&channel(&format!("AwYAAAD{i}")), &t).build();
            c.send(req, Bytes::from_static(b"wake")).await
        }
    }))
    .await;
    // The client saw the GOAWAY: the connection ended cleanly.
    tokio::time::timeout(Duration::from_secs(30), conn)
        .await
        .expect("the server retires the connection")
        .unwrap()
        .expect("connection closes without error");
    let answered = results.iter().filter(|r| r.is_ok()).count();
    for r in &results {
        match r {
            Ok(resp) => assert_eq!(resp.status, 200),
            Err(e) => assert!(
                e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM),
                "{e:?}"
            ),
        }
    }
    assert!(answered >= 4, "{answered} answered");
    // Every stream the server accepted was answered.
    let s = sim.stats();
    assert_eq!(s.requests_received, s.requests_total);
    assert_eq!(s.goaways_sent, 1);
    assert_eq!(s.outcome("received") as usize, answered);
    assert_eq!(s.status(200) as usize, answered + 1);
    // New streams on it are refused; a new connection works.
    let req = Push::new(&channel("AwYAAAD1"), &t).build();
    assert!(c.send(req, Bytes::from_static(b"wake")).await.is_err());
    let c2 = H2::connect(&sim).await;
    assert_eq!(c2.push(&channel("AwYAAAD1"), &t).await.status, 200);
}

#[tokio::test]
async fn goaway_every_n_closes_http1_connections() {
    let sim = start(SimConfig {
        faults: Faults {
            goaway_every: Some(2),
            ..Faults::default()
        },
        ..SimConfig::default()
    });
    let (mut c, _) = H1::connect(&sim, &[b"http/1.1"]).await;
    let token = h1_token(&mut c).await;
    let r = c
        .roundtrip(&h1_push("AwYAAAD1", &token, "", "wake"))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c
        .roundtrip(&h1_push("AwYAAAD1", &token, "", "wake"))
        .await
        .is_err());
    assert_eq!(sim.stats().goaways_sent, 1);
}

#[tokio::test]
async fn reset_every_n_drops_connections_with_requests_unanswered() {
    let sim = start(SimConfig::default());
    let c = H2::connect(&sim).await;
    let t = c.classic_token().await;
    sim.set_faults(Faults {
        reset_every: Some(6),
        latency_ms: Some("500-500".parse().unwrap()),
        ..Faults::default()
    })
    .unwrap();
    let results = join_all((0..10).map(|i| {
        let (c, t) = (c.clone(), t.clone());
        async move {
            let req = Push::new(&channel(&format!("AwYAAAD{i}")), &t).build();
            c.send(req, Bytes::from_static(b"wake")).await
        }
    }))
    .await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    // The token request was the first on this connection; the sixth (the
    // fifth push) arrives while the pushes before it wait out their
    // latency: none of the ten is answered.
    assert!(failed >= 6, "{failed} failed");
    let s = sim.stats();
    assert_eq!(s.connection_resets, 1);
    assert_eq!(s.pushes_total as usize, 10 - failed);
    assert_eq!(s.requests_received, 6);

    // HTTP/1.1: the third request on a connection gets no answer.
    sim.set_faults(Faults {
        reset_every: Some(3),
        ..Faults::default()
    })
    .unwrap();
    let (mut h1, _) = H1::connect(&sim, &[b"http/1.1"]).await;
    for _ in 0..2 {
        let r = h1
            .roundtrip(&h1_push("AwYAAAD1", &t, "", "wake"))
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    assert!(h1
        .roundtrip(&h1_push("AwYAAAD1", &t, "", "wake"))
        .await
        .is_err());
    assert_eq!(sim.stats().connection_resets, 2);
}

/// Waits (on the real clock, the simulator's) until `ms` milliseconds
/// have passed since `since`.
async fn until_ms_after(since: std::time::Instant, ms: u64) {
    let at = since + Duration::from_millis(ms);
    tokio::time::sleep_until(at.into()).await;
}

#[tokio::test]
async fn a_reset_window_reads_pushes_then_drops_their_connections_until_it_ends() {
    let sim = start(SimConfig::default());
    let c = H2::connect(&sim).await;
    let t = c.classic_token().await;
    let (mut h1, _) = H1::connect(&sim, &[b"http/1.1"]).await;
    // Through the control API: the window starts with the PUT.
    let set = wnsgate::clock::instant();
    let r = c
        .control(
            Method::PUT,
            "/_sim/faults",
            r#"{"reset_window_ms":"0-1500"}"#,
        )
        .await;
    assert_eq!(r.status, 204);
    let v = c.control(Method::GET, "/_sim/faults", "").await.json();
    assert_eq!(v["reset_window_ms"], "0-1500");
    assert_eq!(v["refuse_window_ms"], serde_json::Value::Null);
    // Token requests are served during the outage; pushes are read and
    // processed, then their connection dies unanswered.
    let c2 = H2::connect(&sim).await;
    let t2 = c2.classic_token().await;
    assert!(!t2.is_empty());
    let results = join_all((0..5).map(|i| {
        let (c, t) = (c.clone(), t.clone());
        async move {
            let req = Push::new(&channel(&format!("AwYAAADo{i}")), &t).build();
            c.send(req, Bytes::from_static(b"wake")).await
        }
    }))
    .await;
    assert!(results.iter().all(|r| r.is_err()), "{results:?}");
    assert!(h1
        .roundtrip(&h1_push("AwYAAADo9", &t, "", "wake"))
        .await
        .is_err());
    let s = sim.stats();
    assert_eq!(s.outage_resets, 2, "{s:?}");
    assert!(s.outage_unanswered_pushes >= 2, "{s:?}");
    // What was read was processed: each channel saw it.
    assert_eq!(s.pushes_total, s.outage_unanswered_pushes, "{s:?}");
    assert_eq!(s.distinct_channels, s.outage_unanswered_pushes, "{s:?}");
    assert_eq!(s.outage_refusals, 0, "{s:?}");
    // Once the window is over, the same push is answered.
    until_ms_after(set, 2000).await;
    let c3 = H2::connect(&sim).await;
    assert_eq!(c3.push(&channel("AwYAAADo0"), &t).await.status, 200);
    let (mut h1, _) = H1::connect(&sim, &[b"http/1.1"]).await;
    let r = h1
        .roundtrip(&h1_push("AwYAAADo9", &t, "", "wake"))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(sim.stats().outage_resets, 2);
}

#[tokio::test]
async fn a_refuse_window_resets_new_connections_and_requests_unread() {
    let sim = start(SimConfig::default());
    let c = H2::connect(&sim).await;
    let t = c.classic_token().await;
    sim.set_faults(Faults {
        refuse_window_ms: Some("0-60000".parse().unwrap()),
        ..Faults::default()
    })
    .unwrap();
    // A new connection is reset before TLS completes (the connect itself
    // may see the reset).
    async fn tls_connect(sim: &SimHandle) -> std::io::Result<()> {
        let tcp = TcpStream::connect(sim.addr).await?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(sim.ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from(HOST.to_owned()).unwrap(), tcp)
            .await
            .map(drop)
    }
    assert!(tls_connect(&sim).await.is_err(), "a refused connection");
    // A request on a connection opened before is reset unread.
    let req = Push::new(&channel("AwYAAADr1"), &t).build();
    assert!(c.send(req, Bytes::from_static(b"wake")).await.is_err());
    let s = sim.stats();
    assert!(s.outage_refusals >= 1, "{s:?}");
    assert_eq!(s.outage_resets, 1, "{s:?}");
    assert_eq!((s.pushes_total, s.distinct_channels), (0, 0), "{s:?}");
    // The outage ends when the faults are replaced.
    sim.set_faults(Faults::default()).unwrap();
    let c = H2::connect(&sim).await;
    assert_eq!(c.push(&channel("AwYAAADr1"), &t).await.status, 200);
    assert_eq!(sim.stats().outage_refusals, s.outage_refusals);
}

#[tokio::test]
async fn stats_are_exact_for_a_known_sequence() {
    let sim = start(SimConfig::default());
    let c = H2::connect(&sim).await;
    let t = c.classic_token().await;
    let bad = c
        .req(
            token_request("/accesstoken.srf"),
            "grant_type=client_credentials",
        )
        .await;
    assert_eq!(bad.status, 400);
    let (a, b, x) = (
        channel("AwYAAAD-a"),
        channel("AwYAAAD-b"),
        channel("x410-c"),
    );
    for _ in 0..3 {
        assert_eq!(c.push(&a, &t).await.status, 200);
    }
    assert_eq!(c.push(&b, &t).await.status, 200);
    assert_eq!(c.push(&x, &t).await.status, 410);
    assert_eq!(c.push(&channel("AwYAAAD-d"), "nope").await.status, 401);

    let want = SimStats {
        requests_total: 8,
        by_status: BTreeMap::from([(200, 5), (400, 1), (401, 1), (410, 1)]),
        pushes_total: 6,
        by_outcome: BTreeMap::from([
            ("received".to_owned(), 4),
            ("expired".to_owned(), 1),
            ("unauthorized".to_owned(), 1),
        ]),
        token_requests: 2,
        tokens_issued: 1,
        connections: 1,
        h2_connections: 1,
        http1_connections: 0,
        goaways_sent: 0,
        connection_resets: 0,
        requests_received: 8,
        channel_stats: true,
        distinct_channels: 4,
        max_pushes_per_channel: 3,
        pushes_histogram: BTreeMap::from([(1, 3), (3, 1)]),
        delivered_channels: 2,
        max_deliveries_per_channel: 3,
        deliveries_histogram: BTreeMap::from([(1, 1), (3, 1)]),
        untracked_pushes: 0,
        pushes_with_ttl: 0,
        pushes_requesting_status: 0,
        streams_refused: 0,
        streams_reset: 0,
        header_table_flips: 0,
        table_size_violations: 0,
        table_flips_signalled: 0,
        outage_resets: 0,
        outage_refusals: 0,
        outage_unanswered_pushes: 0,
    };
    assert_eq!(sim.stats(), want);
    // The same over HTTP: control requests are not answers of WNS, only
    // requests the connection received.
    let r = c.control(Method::GET, "/_sim/stats", "").await;
    assert_eq!(r.status, 200);
    let served: SimStats = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        served,
        SimStats {
            requests_received: 9,
            ..want
        }
    );

    assert_eq!(c.control(Method::POST, "/_sim/reset", "").await.status, 204);
    let s = sim.stats();
    assert_eq!(
        s,
        SimStats {
            channel_stats: true,
            ..SimStats::default()
        }
    );
    // Tokens survive a reset.
    assert_eq!(c.push(&a, &t).await.status, 200);
    assert_eq!(sim.stats().pushes_histogram, BTreeMap::from([(1, 1)]));
}

#[tokio::test]
async fn channel_stats_can_be_turned_off() {
    let sim = start(SimConfig {
        channel_stats: false,
        ..SimConfig::default()
    });
    let c = H2::connect(&sim).await;
    let t = c.classic_token().await;
    for i in 0..5 {
        assert_eq!(
            c.push(&channel(&format!("AwYAAAD{i}")), &t).await.status,
            200
        );
    }
    let s = sim.stats();
    assert!(!s.channel_stats);
    assert_eq!((s.outcome("received"), s.distinct_channels), (5, 0));
    assert!(s.pushes_histogram.is_empty());
}

#[tokio::test]
async fn h2c_serves_h2_prior_knowledge_and_plain_http1() {
    let sim = start(SimConfig {
        mode: Mode::H2c,
        ..SimConfig::default()
    });
    assert!(sim.token_url().starts_with("http://127.0.0.1:"));
    let c = H2::connect(&sim).await;
    let t = c.classic_token().await;
    assert_eq!(c.push(&channel("AwYAAAD1"), &t).await.status, 200);
    let (mut h1, _) = H1::connect(&sim, &[]).await;
    let r = h1
        .roundtrip(b"GET /_sim/stats HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let s: SimStats = serde_json::from_slice(&r.body).unwrap();
    assert_eq!((s.h2_connections, s.http1_connections), (1, 1));
    assert_eq!(s.outcome("received"), 1);
}

#[tokio::test]
async fn advertises_max_concurrent_streams() {
    let sim = start(SimConfig {
        max_concurrent_streams: 7,
        ..SimConfig::default()
    });
    let (io, _) = connect(&sim, HOST, &[b"h2"]).await;
    let (send, mut conn) = h2::client::handshake(io).await.unwrap();
    let c = H2 { send };
    tokio::select! {
        r = &mut conn => panic!("connection ended: {r:?}"),
        _ = c.classic_token() => {}
    }
    assert_eq!(conn.max_concurrent_send_streams(), 7);
}

#[tokio::test]
async fn threads_share_the_port() {
    let sim = start(SimConfig {
        threads: 2,
        ..SimConfig::default()
    });
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(H2::connect(&sim).await);
    }
    let t = clients[0].classic_token().await;
    for (i, c) in clients.iter().enumerate() {
        // Tokens issued on one thread are honoured on all.
        assert_eq!(
            c.push(&channel(&format!("AwYAAAD{i}")), &t).await.status,
            200
        );
    }
    let s = sim.stats();
    assert_eq!((s.connections, s.outcome("received")), (8, 8));
}

#[test]
fn cli_prints_its_address_and_stops_on_sigterm() {
    use std::io::{BufRead, BufReader, Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_wnsgate"))
        .args([
            "sim",
            "--listen",
            "127.0.0.1:0",
            "--mode",
            "h2c",
            "--ca-out",
        ])
        .arg(&ca)
        .args(["--app", "ms-app://S-1-15-2-5=s3cret", "--error-ratio", "0"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let rest = line.strip_prefix("sim listening on ").expect(&line);
    let (addr, tail) = rest.split_once(' ').unwrap();
    assert_eq!(tail.trim(), format!("(h2c, CA in {})", ca.display()));
    assert!(std::fs::read_to_string(&ca)
        .unwrap()
        .starts_with("-----BEGIN CERTIFICATE-----"));
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /_sim/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    assert!(child.wait().unwrap().success());
}

#[tokio::test]
async fn shutdown_answers_what_it_took_then_closes() {
    let sim = start(SimConfig::default());
    let (io, _) = connect(&sim, HOST, &[b"h2"]).await;
    let (send, conn) = h2::client::handshake(io).await.unwrap();
    let conn = tokio::spawn(conn);
    let c = H2 { send };
    let t = c.classic_token().await;
    sim.set_faults(Faults {
        latency_ms: Some("300-300".parse().unwrap()),
        ..Faults::default()
    })
    .unwrap();
    let push = {
        let (c, t) = (c.clone(), t.clone());
        tokio::spawn(async move {
            let req = Push::new(&channel("AwYAAAD1"), &t).build();
            c.send(req, Bytes::from_static(b"wake")).await
        })
    };
    // Once the simulator has taken the push, stop it while the push waits.
    while sim.stats().requests_received < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stopped = tokio::task::spawn_blocking(move || sim.shutdown());
    let r = push
        .await
        .unwrap()
        .expect("the push taken before the stop is answered");
    assert_eq!(r.status, 200);
    tokio::time::timeout(Duration::from_secs(30), conn)
        .await
        .expect("the connection is retired")
        .unwrap()
        .expect("with a GOAWAY, not an error");
    stopped.await.unwrap();
}

/// Pushes to channels `AwYAAADs0`, `AwYAAADs1`, ... one after another on
/// one h2 connection: the status, or the reset code.
async fn pushes_in_turn(c: &H2, token: &str, n: usize) -> Vec<Result<u16, h2::Reason>> {
    let mut out = Vec::new();
    for i in 0..n {
        let req = Push::new(&channel(&format!("AwYAAADs{i}")), token).build();
        out.push(match c.send(req, Bytes::from_static(b"wake")).await {
            Ok(r) => Ok(r.status),
            Err(e) => Err(e.reason().expect("a stream reset")),
        });
    }
    out
}

#[tokio::test]
async fn h2_streams_are_refused_or_reset_by_code_and_the_connection_goes_on() {
    let sim = start(SimConfig::default());
    let c = H2::connect(&sim).await;
    // The token request is the connection's stream 1.
    let t = c.classic_token().await;
    sim.set_faults(Faults {
        refused_stream_every: Some(3),
        internal_error_every: Some(4),
        ..Faults::default()
    })
    .unwrap();
    use h2::Reason;
    assert_eq!(
        pushes_in_turn(&c, &t, 7).await,
        [
            Ok(200),
            Err(Reason::REFUSED_STREAM),
            Err(Reason::INTERNAL_ERROR),
            Ok(200),
            Err(Reason::REFUSED_STREAM),
            Ok(200),
            Err(Reason::INTERNAL_ERROR),
        ]
    );
    let s = sim.stats();
    assert_eq!((s.streams_refused, s.streams_reset), (2, 2));
    assert_eq!(s.connections, 1);
    // The refused pushes never reached a channel; the reset ones did.
    assert_eq!(s.pushes_total, 5);
    assert_eq!(s.distinct_channels, 5);
    assert_eq!(s.requests_received, 8);
}

#[tokio::test]
async fn h2_stream_window_of_one_byte_still_carries_whole_requests() {
    let sim = start(SimConfig {
        faults: Faults {
            h2_stream_window: Some(1),
            ..Faults::default()
        },
        ..SimConfig::default()
    });
    let c = H2::connect(&sim).await;
    // A token form of 130 bytes and a 4-byte wake, one byte a window.
    let t = c.classic_token().await;
    assert_eq!(pushes_in_turn(&c, &t, 3).await, [Ok(200), Ok(200), Ok(200)]);
    assert_eq!(sim.stats().outcome("received"), 3);
}

#[tokio::test]
async fn header_table_flips_are_signalled_by_a_conforming_client() {
    let sim = start(SimConfig {
        faults: Faults {
            header_table_flip_every: Some(2),
            ..Faults::default()
        },
        ..SimConfig::default()
    });
    let c = H2::connect(&sim).await;
    let t = c.classic_token().await;
    // The h2 crate's encoder signals the smallest size, then the last.
    assert!(pushes_in_turn(&c, &t, 8)
        .await
        .iter()
        .all(|r| *r == Ok(200)));
    let s = sim.stats();
    assert_eq!(s.header_table_flips, 4);
    assert!(s.table_flips_signalled >= 3, "{s:?}");
    assert_eq!(s.table_size_violations, 0, "{s:?}");
    assert_eq!(s.connections, 1);
}
