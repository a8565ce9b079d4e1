//! The HTTP/2 client against a scripted server: each test plays the
//! server over an in-memory stream, frame by frame, and checks both what
//! the client writes and what its callers get. These are the protocol
//! edge cases the simulator (an h2-crate server) never produces.
//!
//! Ordering without clocks: the server sends a PING and reads until its
//! ACK (`Server::barrier`); by then the client has processed everything
//! sent before the PING and written everything that made it queue.

use super::super::conn::REFUSED_STREAM;
use super::super::hpack::{Decoder, Encoder};
use super::*;
use crate::core::wns::headers::{MS_CV, X_WNS_CACHE_POLICY, X_WNS_TYPE};
use futures_util::FutureExt;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use std::time::Duration;
use tokio::io::{duplex, DuplexStream};
use tokio::task::JoinHandle;

/// The bound on every wait: a bug fails its test instead of hanging it.
const WAIT: Duration = Duration::from_secs(5);
const AUTHORITY: &str = "db5.notify.windows.com";
const TOKEN: &str = "Bearer EgAcAQMAAAAALYAAY/c+Huwi3Fv4Ck10UrKNmtxRO6Njk2MgA=\
                     EgAcAQMAAAAALYAAY/c+Huwi3Fv4Ck10UrKNmtxRO6Njk2MgA=\
                     EgAcAQMAAAAALYAAY/c+Huwi3Fv4Ck10UrKNmtxRO6Njk2MgA=";
/// The opaque bytes of the server's barrier PING.
const BARRIER: [u8; 8] = *b"barrier!";

async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(WAIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    fn u32_at(&self, at: usize) -> u32 {
        u32::from_be_bytes(self.payload[at..at + 4].try_into().expect("4 bytes"))
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn settings_frame(pairs: &[(u16, u32)]) -> Vec<u8> {
    let mut p = Vec::new();
    for (id, value) in pairs {
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&value.to_be_bytes());
    }
    frame(SETTINGS, 0, 0, &p)
}

fn settings_pairs(payload: &[u8]) -> Vec<(u16, u32)> {
    payload
        .chunks_exact(6)
        .map(|p| {
            (
                u16::from_be_bytes([p[0], p[1]]),
                u32::from_be_bytes([p[2], p[3], p[4], p[5]]),
            )
        })
        .collect()
}

fn goaway_frame(last: u32, code: u32) -> Vec<u8> {
    let mut p = last.to_be_bytes().to_vec();
    p.extend_from_slice(&code.to_be_bytes());
    frame(GOAWAY, 0, 0, &p)
}

/// A header block of plain literals, never indexed by either side.
fn block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        Encoder::literal(&mut out, name.as_bytes(), value.as_bytes(), false);
    }
    out
}

/// A HEADERS frame ending both the header block and the stream.
fn answer(stream: u32, fields: &[(&str, &str)]) -> Vec<u8> {
    frame(HEADERS, END_HEADERS | END_STREAM, stream, &block(fields))
}

/// A padded payload: pad length, data, `pad` zero bytes.
fn padded(data: &[u8], pad: u8) -> Vec<u8> {
    let mut p = vec![pad];
    p.extend_from_slice(data);
    p.extend(std::iter::repeat_n(0u8, pad as usize));
    p
}

type Fields = Vec<(String, String)>;

fn fields(list: &[(&str, &str)]) -> Fields {
    list.iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

/// What a client request looked like on the wire.
struct Req {
    head: Frame,
    fields: Fields,
    /// The DATA frame, when HEADERS did not end the stream.
    data: Option<Frame>,
}

/// The scripted server end of the connection.
struct Server {
    io: DuplexStream,
    /// Decodes the client's request header blocks, in order.
    dec: Decoder,
}

impl Server {
    fn new(io: DuplexStream) -> Server {
        Server {
            io,
            dec: Decoder::new(H2_HEADER_LIST_BYTES_MAX),
        }
    }

    async fn write(&mut self, bytes: &[u8]) {
        within("a server write", self.io.write_all(bytes))
            .await
            .expect("server write");
    }

    async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        within("client bytes", self.io.read_exact(&mut buf))
            .await
            .expect("the client closed the connection");
        buf
    }

    /// The client's next frame, or `None` once it closed the connection.
    async fn next(&mut self) -> Option<Frame> {
        let mut head = [0u8; 9];
        let mut got = 0;
        while got < head.len() {
            let n = within("a client frame", self.io.read(&mut head[got..]))
                .await
                .expect("server read");
            if n == 0 {
                assert_eq!(got, 0, "the client closed the connection mid-frame");
                return None;
            }
            got += n;
        }
        let len = (head[0] as usize) << 16 | (head[1] as usize) << 8 | head[2] as usize;
        let payload = self.read_exact(len).await;
        Some(Frame {
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]),
            payload,
        })
    }

    async fn frame(&mut self) -> Frame {
        self.next().await.expect("the client closed the connection")
    }

    /// Every frame the client writes until it closes the connection.
    async fn until_closed(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(f) = self.next().await {
            frames.push(f);
        }
        frames
    }

    /// Sends a PING and returns what the client wrote before its ACK.
    async fn barrier(&mut self) -> Vec<Frame> {
        self.write(&frame(PING, 0, 0, &BARRIER)).await;
        let mut before = Vec::new();
        loop {
            let f = self.frame().await;
            if f.kind == PING && f.flags == ACK && f.payload == BARRIER {
                return before;
            }
            before.push(f);
        }
    }

    fn decode(&mut self, block: &[u8]) -> Fields {
        let mut got = Vec::new();
        self.dec
            .decode(block, |n, v| {
                got.push((
                    String::from_utf8(n.to_vec()).expect("utf-8 name"),
                    String::from_utf8(v.to_vec()).expect("utf-8 value"),
                ))
            })
            .expect("the client's header block decodes");
        got
    }

    /// Reads a request's HEADERS frame (one frame: our blocks are small).
    async fn request_head(&mut self) -> (Frame, Fields) {
        let head = self.frame().await;
        assert_eq!(head.kind, HEADERS, "expected HEADERS, got {head:?}");
        assert_ne!(head.flags & END_HEADERS, 0, "the block fits one frame");
        let fields = self.decode(&head.payload);
        (head, fields)
    }

    /// Reads a whole request: HEADERS, then its DATA unless HEADERS
    /// ended the stream.
    async fn request(&mut self) -> Req {
        let (head, fields) = self.request_head().await;
        let data = if head.flags & END_STREAM == 0 {
            let d = self.frame().await;
            assert_eq!((d.kind, d.stream), (DATA, head.stream), "got {d:?}");
            Some(d)
        } else {
            None
        };
        Req { head, fields, data }
    }
}

/// An open connection: the client, the server end, the driver task.
struct Open {
    client: H2Client,
    srv: Server,
    driver: JoinHandle<Result<(), ConnError>>,
}

/// Handshakes with a server announcing `settings` and spawns the
/// connection's driver; the client's SETTINGS ACK is already read.
async fn open(settings: &[(u16, u32)]) -> Open {
    open_with(settings, 1 << 20).await
}

/// [`open`] over a pipe that holds `capacity` bytes each way.
async fn open_with(settings: &[(u16, u32)], capacity: usize) -> Open {
    let (client_io, server_io) = duplex(capacity);
    let hs = tokio::spawn(handshake(client_io));
    let mut srv = Server::new(server_io);
    assert_eq!(srv.read_exact(PREFACE.len()).await, PREFACE);
    assert_eq!(srv.frame().await.kind, SETTINGS);
    assert_eq!(srv.frame().await.kind, WINDOW_UPDATE);
    srv.write(&settings_frame(settings)).await;
    let (client, conn) = within("the handshake", hs)
        .await
        .expect("handshake task")
        .expect("handshake");
    let driver = tokio::spawn(conn);
    let ack = srv.frame().await;
    assert_eq!((ack.kind, ack.flags, ack.stream), (SETTINGS, ACK, 0));
    Open {
        client,
        srv,
        driver,
    }
}

/// The headers of a wake, the correlation vector marked sensitive.
fn wake_headers(cv: &str) -> Vec<(HeaderName, HeaderValue)> {
    let mut cv = HeaderValue::from_str(cv).expect("valid value");
    cv.set_sensitive(true);
    vec![
        (AUTHORIZATION, HeaderValue::from_static(TOKEN)),
        (
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        ),
        (X_WNS_TYPE, HeaderValue::from_static("wns/raw")),
        (X_WNS_CACHE_POLICY, HeaderValue::from_static("cache")),
        (MS_CV, cv),
    ]
}

fn wake_fields(path: &str, cv: &str) -> Fields {
    fields(&[
        (":method", "POST"),
        (":scheme", "https"),
        (":authority", AUTHORITY),
        (":path", path),
        ("authorization", TOKEN),
        ("content-type", "application/octet-stream"),
        ("x-wns-type", "wns/raw"),
        ("x-wns-cache-policy", "cache"),
        ("ms-cv", cv),
    ])
}

fn post(client: &H2Client, path: &str, body: &[u8]) -> ResponseFuture {
    let headers = wake_headers("cv");
    client.send(Request {
        authority: AUTHORITY,
        path,
        headers: &headers,
        body: Bytes::copy_from_slice(body),
        timeout: Duration::from_secs(15),
    })
}

/// The answer if it is already there, without waiting.
fn ready(f: &mut ResponseFuture) -> Option<Result<Reply, ConnError>> {
    f.now_or_never()
}

fn lost(r: Result<Reply, ConnError>) -> String {
    match r {
        Err(ConnError::Lost(why)) => why,
        other => panic!("expected ConnError::Lost, got {other:?}"),
    }
}

fn unprocessed(r: Result<Reply, ConnError>) -> String {
    match r {
        Err(ConnError::Unprocessed(why)) => why,
        other => panic!("expected ConnError::Unprocessed, got {other:?}"),
    }
}

/// The code of a stream reset by the server.
fn reset_code(r: Result<Reply, ConnError>) -> u32 {
    match r {
        Err(ConnError::Reset(code)) => code,
        other => panic!("expected ConnError::Reset, got {other:?}"),
    }
}

fn ok(r: Result<Reply, ConnError>) -> Reply {
    r.unwrap_or_else(|e| panic!("expected an answer, got {e}"))
}

fn header<'a>(reply: &'a Reply, name: &str) -> Option<&'a str> {
    reply.headers.get(name).map(|v| v.to_str().expect("ascii"))
}

#[tokio::test]
async fn handshake_sends_preface_settings_and_window_then_acks_the_servers_settings() {
    let (client_io, server_io) = duplex(1 << 16);
    let hs = tokio::spawn(handshake(client_io));
    let mut srv = Server::new(server_io);
    assert_eq!(
        srv.read_exact(24).await,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    );
    let settings = srv.frame().await;
    assert_eq!(
        (settings.kind, settings.flags, settings.stream),
        (SETTINGS, 0, 0)
    );
    // ENABLE_PUSH = 0, INITIAL_WINDOW_SIZE = ours.
    assert_eq!(
        settings_pairs(&settings.payload),
        vec![(0x2, 0), (0x4, H2_STREAM_WINDOW_BYTES)]
    );
    let wu = srv.frame().await;
    assert_eq!((wu.kind, wu.flags, wu.stream), (WINDOW_UPDATE, 0, 0));
    assert_eq!(wu.u32_at(0), H2_CONNECTION_WINDOW_BYTES - 65_535);

    // Without the server's SETTINGS the handshake does not complete.
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert!(!hs.is_finished(), "the handshake must wait for SETTINGS");

    srv.write(&settings_frame(&[(0x3, 7), (0x4, 1 << 16)]))
        .await;
    let (client, conn) = within("the handshake", hs).await.unwrap().unwrap();
    assert_eq!(client.max_streams(), 7);
    let driver = tokio::spawn(conn);
    let ack = srv.frame().await;
    assert_eq!(
        (ack.kind, ack.flags, ack.stream, ack.payload.len()),
        (SETTINGS, ACK, 0, 0)
    );

    // Later SETTINGS are applied and acknowledged too.
    srv.write(&settings_frame(&[(0x3, 2)])).await;
    let before = srv.barrier().await;
    assert_eq!(
        before,
        vec![Frame {
            kind: SETTINGS,
            flags: ACK,
            stream: 0,
            payload: vec![]
        }]
    );
    assert_eq!(client.max_streams(), 2);
    assert!(!client.is_closed());
    drop(client);
    within("the driver", driver).await.unwrap().unwrap();
}

#[tokio::test]
async fn handshake_fails_unless_the_server_starts_with_settings() {
    let not_settings = [
        frame(PING, 0, 0, &[0; 8]),
        frame(SETTINGS, ACK, 0, &[]),
        frame(WINDOW_UPDATE, 0, 0, &1000u32.to_be_bytes()),
    ];
    for first in not_settings {
        let (client_io, server_io) = duplex(1 << 16);
        let hs = tokio::spawn(handshake(client_io));
        let mut srv = Server::new(server_io);
        srv.read_exact(24 + 9 + 12 + 9 + 4).await;
        srv.write(&first).await;
        srv.write(&settings_frame(&[])).await;
        match within("the handshake", hs).await.unwrap() {
            Err(ConnError::Protocol(_)) => {}
            Err(e) => panic!("first frame {first:?}: wrong error {e}"),
            Ok(_) => panic!("first frame {first:?}: the handshake succeeded"),
        }
    }
    // A server that hangs up before its SETTINGS: no request was sent.
    let (client_io, server_io) = duplex(1 << 16);
    let hs = tokio::spawn(handshake(client_io));
    let mut srv = Server::new(server_io);
    srv.read_exact(24 + 9 + 12 + 9 + 4).await;
    drop(srv);
    assert!(matches!(
        within("the handshake", hs).await.unwrap(),
        Err(ConnError::Unprocessed(_))
    ));
}

#[tokio::test]
async fn a_request_is_headers_in_order_then_its_body_with_end_stream() {
    let Open {
        client,
        mut srv,
        driver,
    } = open(&[]).await;
    let headers = wake_headers("cv-1");
    let f = client.send(Request {
        authority: AUTHORITY,
        path: "/?token=AwYAAAB",
        headers: &headers,
        body: Bytes::from_static(b"wake"),
        timeout: Duration::from_secs(15),
    });
    let req = srv.request().await;
    assert_eq!(req.head.stream, 1);
    assert_eq!(
        req.head.flags, END_HEADERS,
        "the body follows: no END_STREAM"
    );
    assert_eq!(req.fields, wake_fields("/?token=AwYAAAB", "cv-1"));
    // The sensitive value is a never-indexed literal with a literal name:
    // 0x10, name length, name, value length, value.
    let mut never = vec![0x10, 5];
    never.extend_from_slice(b"ms-cv");
    never.push(4);
    never.extend_from_slice(b"cv-1");
    assert!(
        req.head.payload.windows(never.len()).any(|w| w == never),
        "ms-cv is not encoded never-indexed: {:02x?}",
        req.head.payload
    );
    let data = req.data.expect("a DATA frame");
    assert_eq!(
        (data.flags, data.payload.as_slice()),
        (END_STREAM, &b"wake"[..])
    );

    srv.write(&answer(
        1,
        &[(":status", "200"), ("x-wns-status", "received")],
    ))
    .await;
    let reply = ok(within("the answer", f).await);
    assert_eq!(reply.status, 200);
    assert_eq!(header(&reply, "x-wns-status"), Some("received"));
    drop(client);
    within("the driver", driver).await.unwrap().unwrap();
}

#[tokio::test]
async fn stream_ids_go_up_by_two_and_repeated_headers_are_indexed() {
    let Open {
        client,
        mut srv,
        driver: _driver,
    } = open(&[]).await;
    let mut futures = Vec::new();
    let mut reqs = Vec::new();
    for (i, path) in ["/?token=A1", "/?token=B22", "/?token=C333"]
        .iter()
        .enumerate()
    {
        // The last one has no body: its HEADERS end the stream.
        let body: &[u8] = if i < 2 { b"wake" } else { b"" };
        futures.push(post(&client, path, body));
        let req = srv.request().await;
        assert_eq!(req.fields, wake_fields(path, "cv"));
        reqs.push(req);
    }
    let ids: Vec<u32> = reqs.iter().map(|r| r.head.stream).collect();
    assert_eq!(ids, vec![1, 3, 5]);
    assert!(reqs[0].data.is_some() && reqs[1].data.is_some());
    assert!(reqs[2].data.is_none());
    assert_eq!(reqs[2].head.flags, END_HEADERS | END_STREAM);
    let (first, second) = (reqs[0].head.payload.len(), reqs[1].head.payload.len());
    assert!(
        second * 4 < first,
        "repeated headers are not indexed: {first} then {second} bytes"
    );
    for (id, f) in [1, 3, 5].into_iter().zip(futures) {
        srv.write(&answer(id, &[(":status", "200")])).await;
        assert_eq!(ok(within("an answer", f).await).status, 200);
    }
}

#[tokio::test]
async fn an_answer_over_headers_and_continuations_keeps_only_the_wns_headers() {
    let Open {
        client,
        mut srv,
        driver: _driver,
    } = open(&[]).await;
    let f = post(&client, "/?token=a", b"wake");
    srv.request().await;
    let b = block(&[
        (":status", "200"),
        ("x-wns-status", "received"),
        ("server", "Microsoft-HTTPAPI/2.0"),
        ("x-wns-msg-id", "1A2B3C4D5E6F"),
        ("date", "Mon, 01 Jan 2024 00:00:00 GMT"),
        ("x-wns-debug-trace", "DB5SCH101"),
        ("content-length", "0"),
        ("ms-cv", "abc.0"),
        ("x-powered-by", "ASP.NET"),
    ]);
    // Cut mid-string, in three frames.
    let (a, rest) = b.split_at(b.len() / 3);
    let (c, d) = rest.split_at(rest.len() / 2);
    srv.write(&frame(HEADERS, END_STREAM, 1, a)).await;
    srv.write(&frame(CONTINUATION, 0, 1, c)).await;
    // (No barrier here: a PING inside a header block is a protocol error.)
    srv.write(&frame(CONTINUATION, END_HEADERS, 1, d)).await;
    let reply = ok(within("the answer", f).await);
    assert_eq!(reply.status, 200);
    assert_eq!(header(&reply, "x-wns-status"), Some("received"));
    assert_eq!(header(&reply, "x-wns-msg-id"), Some("1A2B3C4D5E6F"));
    assert_eq!(header(&reply, "x-wns-debug-trace"), Some("DB5SCH101"));
    assert_eq!(header(&reply, "ms-cv"), Some("abc.0"));
    assert_eq!(reply.headers.len(), 4, "kept {:?}", reply.headers);
    assert!(reply.body.is_empty());
}

#[tokio::test]
async fn padded_headers_with_priority_are_read() {
    let Open {
        client,
        mut srv,
        driver: _driver,
    } = open(&[]).await;
    let f = post(&client, "/?token=a", b"wake");
    srv.request().await;
    let b = block(&[
        (":status", "410"),
        ("x-wns-error-description", "Revoked channel URL"),
        ("x-wns-msg-id", "77"),
    ]);
    // Pad length, exclusive dependency on stream 0, weight, block, padding.
    let mut p = vec![6, 0x80, 0, 0, 0, 15];
    p.extend_from_slice(&b);
    p.extend_from_slice(&[0; 6]);
    srv.write(&frame(
        HEADERS,
        PADDED | PRIORITY | END_HEADERS | END_STREAM,
        1,
        &p,
    ))
    .await;
    let reply = ok(within("the answer", f).await);
    assert_eq!(reply.status, 410);
    assert_eq!(
        header(&reply, "x-wns-error-description"),
        Some("Revoked channel URL")
    );
    assert_eq!(header(&reply, "x-wns-msg-id"), Some("77"));
    assert_eq!(reply.headers.len(), 2);
}

#[tokio::test]
async fn an_informational_head_is_skipped_and_padded_data_ends_the_answer() {
    let Open {
        client,
        mut srv,
        driver: _driver,
    } = open(&[]).await;
    let mut f = post(&client, "/?token=a", b"wake");
    srv.request().await;
    srv.write(&frame(
        HEADERS,
        END_HEADERS,
        1,
        &block(&[(":status", "100"), ("x-wns-msg-id", "from-the-100")]),
    ))
    .await;
    assert!(srv.barrier().await.is_empty());
    assert!(ready(&mut f).is_none(), "a 100 is not the answer");
    srv.write(&frame(
        HEADERS,
        END_HEADERS,
        1,
        &block(&[
            (":status", "200"),
            ("x-wns-status", "received"),
            ("content-length", "3"),
        ]),
    ))
    .await;
    srv.write(&frame(DATA, PADDED, 1, &padded(b"abc", 4))).await;
    assert!(srv.barrier().await.is_empty());
    assert!(ready(&mut f).is_none(), "answered before END_STREAM");
    srv.write(&frame(DATA, PADDED | END_STREAM, 1, &padded(b"", 2)))
        .await;
    let reply = ok(within("the answer", f).await);
    assert_eq!(reply.status, 200);
    assert_eq!(header(&reply, "x-wns-status"), Some("received"));
    assert_eq!(
        header(&reply, "x-wns-msg-id"),
        None,
        "the 100's headers leaked"
    );
    assert_eq!(reply.headers.len(), 1);
}

#[tokio::test]
async fn trailers_end_the_answer_without_changing_its_headers() {
    let Open {
        client,
        mut srv,
        driver: _driver,
    } = open(&[]).await;
    let mut f = post(&client, "/?token=a", b"wake");
    srv.request().await;
    srv.write(&frame(
        HEADERS,
        END_HEADERS,
        1,
        &block(&[(":status", "200"), ("x-wns-status", "received")]),
    ))
    .await;
    srv.write(&frame(DATA, 0, 1, b"some body")).await;
    assert!(srv.barrier().await.is_empty());
    assert!(ready(&mut f).is_none(), "answered before END_STREAM");
    srv.write(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &block(&[("x-wns-status", "dropped"), ("grpc-status", "0")]),
    ))
    .await;
    let reply = ok(within("the answer", f).await);
    assert_eq!(reply.status, 200);
    let status: Vec<_> = reply.headers.get_all("x-wns-status").iter().collect();
    assert_eq!(status, vec!["received"]);
    assert_eq!(reply.headers.len(), 1);
}

#[tokio::test]
async fn a_long_answer_body_gets_window_updates() {
    let Open {
        client,
        mut srv,
        driver: _driver,
    } = open(&[]).await;
    let f = post(&client, "/?token=a", b"wake");
    srv.request().await;
    srv.write(&frame(
        HEADERS,
        END_HEADERS,
        1,
        &block(&[(":status", "200")]),
    ))
    .await;
    let chunk = vec![7u8; H2_FRAME_BYTES_MAX];
    for _ in 0..40 {
        srv.write(&frame(DATA, 0, 1, &chunk)).await;
    }
    let before = srv.barrier().await;
    // The stream's window is returned once half of it is used; the
    // connection's (16 MiB) not yet.
    let half = H2_STREAM_WINDOW_BYTES / 2;
    assert_eq!(
        before,
        vec![Frame {
            kind: WINDOW_UPDATE,
            flags: 0,
            stream: 1,
            payload: half.to_be_bytes().to_vec(),
        }]
    );
    srv.write(&frame(DATA, END_STREAM, 1, b"")).await;
    assert_eq!(ok(within("the answer", f).await).status, 200);
}

#[tokio::test]
async fn a_ping_is_acked_with_the_same_bytes() {
    let Open {
        client: _client,
        mut srv,
        driver: _driver,
    } = open(&[]).await;
    srv.write(&frame(PING, 0, 0, &[1, 2, 3, 4, 5, 6, 7, 8]))
        .await;
    let ack = srv.frame().await;
    assert_eq!(
        ack,
        Frame {
            kind: PING,
            flags: ACK,
            stream: 0,
            payload: vec![1, 2, 3, 4, 5, 6, 7, 8],
        }
    );
    // A PING ACK from the server is not answered.
    srv.write(&frame(PING, ACK, 0, &[9; 8])).await;
    assert!(srv.barrier().await.is_empty());
}

#[tokio::test]
async fn frames_sent_along_with_the_servers_settings_are_handled() {
    let (client_io, server_io) = duplex(1 << 16);
    let hs = tokio::spawn(handshake(client_io));
    let mut srv = Server::new(server_io);
    srv.read_exact(24 + 9 + 12 + 9 + 4).await;
    // One write: the client reads both frames during its handshake.
    let mut first = settings_frame(&[(0x3, 100)]);
    first.extend_from_slice(&frame(PING, 0, 0, b"together"));
    srv.write(&first).await;
    let (_client, conn) = within("the handshake", hs).await.unwrap().unwrap();
    let _driver = tokio::spawn(conn);
    assert_eq!(srv.frame().await.kind, SETTINGS);
    let ack = srv.frame().await;
    assert_eq!(
        (ack.kind, ack.flags, ack.payload.as_slice()),
        (PING, ACK, &b"together"[..])
    );
}

#[tokio::test]
async fn goaway_fails_streams_above_its_last_id_and_lets_the_rest_finish() {
    let Open {
        client,
        mut srv,
        driver,
    } = open(&[]).await;
    let mut f1 = post(&client, "/?token=a", b"one");
    let mut f3 = post(&client, "/?token=b", b"two");
    srv.request().await;
    srv.request().await;
    srv.write(&goaway_frame(1, NO_ERROR)).await;
    assert!(srv.barrier().await.is_empty());
    let why = unprocessed(ready(&mut f3).expect("stream 3 fails at once"));
    assert!(why.contains("GOAWAY"), "{why}");
    assert!(ready(&mut f1).is_none(), "stream 1 was processed: it waits");
    assert!(client.is_closed());
    let why = unprocessed(within("a refused send", post(&client, "/?token=c", b"x")).await);
    assert!(why.starts_with("not sent"), "{why}");

    srv.write(&answer(1, &[(":status", "200")])).await;
    assert_eq!(ok(within("stream 1", f1).await).status, 200);
    // Nothing is left open: the connection says goodbye and ends.
    let rest = srv.until_closed().await;
    assert_eq!(
        rest.iter().map(|f| f.kind).collect::<Vec<_>>(),
        vec![GOAWAY]
    );
    assert_eq!(rest[0].u32_at(4), NO_ERROR);
    within("the driver", driver).await.unwrap().unwrap();
}

#[tokio::test]
async fn rst_stream_fails_only_its_stream() {
    let Open {
        client,
        mut srv,
        driver: _driver,
    } = open(&[]).await;
    let mut f1 = post(&client, "/?token=a", b"one");
    let f3 = post(&client, "/?token=b", b"two");
    srv.request().await;
    srv.request().await;
    srv.write(&frame(RST_STREAM, 0, 3, &REFUSED_STREAM.to_be_bytes()))
        .await;
    assert!(srv.barrier().await.is_empty(), "no reply to a reset");
    let refused = within("stream 3", f3).await;
    assert!(matches!(&refused, Err(e) if !e.may_have_been_processed()));
    assert_eq!(reset_code(refused), REFUSED_STREAM);
    assert!(ready(&mut f1).is_none());
    assert!(!client.is_closed());
    srv.write(&answer(1, &[(":status", "200")])).await;
    assert_eq!(ok(within("stream 1", f1).await).status, 200);
    // And the connection takes new requests.
    let f5 = post(&client, "/?token=c", b"three");
    assert_eq!(srv.request().await.head.stream, 5);
    srv.write(&frame(RST_STREAM, 0, 5, &CANCEL.to_be_bytes()))
        .await;
    let reset = within("stream 5", f5).await;
    assert!(matches!(&reset, Err(e) if e.may_have_been_processed()));
    assert_eq!(reset_code(reset), CANCEL);
    // Still open: a reset ends its stream only.
    assert!(!client.is_closed());
    let f7 = post(&client, "/?token=d", b"four");
    assert_eq!(srv.request().await.head.stream, 7);
    srv.write(&answer(7, &[(":status", "200")])).await;
    assert_eq!(ok(within("stream 7", f7).await).status, 200);
}

/// Asserts `f` is a DATA frame of stream `stream` carrying `len` bytes,
/// ending the stream or not.
fn assert_data(f: &Frame, stream: u32, len: usize, end: bool) {
    assert_eq!(
        (f.kind, f.flags, f.stream, f.payload.len()),
        (DATA, if end { END_STREAM } else { 0 }, stream, len),
        "{f:?}"
    );
}

#[tokio::test]
async fn a_body_goes_out_as_far_as_the_stream_window_allows_and_the_rest_as_it_opens() {
    let Open {
        client,
        mut srv,
        driver: _driver,
    } = open(&[(0x4, 0)]).await;
    let f1 = post(&client, "/?token=a", &[b'a'; 100]);
    let (head, _) = srv.request_head().await;
    assert_eq!(head.flags, END_HEADERS);
    assert!(srv.barrier().await.is_empty(), "DATA sent without window");
    // The connection's window is not the stream's.
    srv.write(&frame(WINDOW_UPDATE, 0, 0, &1000u32.to_be_bytes()))
        .await;
    assert!(srv.barrier().await.is_empty(), "DATA sent without window");
    // 40 bytes of window: 40 bytes go, the stream stays open.
    srv.write(&frame(WINDOW_UPDATE, 0, 1, &40u32.to_be_bytes()))
        .await;
    let data = srv.frame().await;
    assert_data(&data, 1, 40, false);
    assert_eq!(data.payload, [b'a'; 40]);
    assert!(srv.barrier().await.is_empty(), "DATA beyond the window");
    srv.write(&frame(WINDOW_UPDATE, 0, 1, &100u32.to_be_bytes()))
        .await;
    assert_data(&srv.frame().await, 1, 60, true);
    // A new INITIAL_WINDOW_SIZE opens waiting streams too, as far as it
    // goes.
    let f3 = post(&client, "/?token=b", &[b'b'; 50]);
    srv.request_head().await;
    assert!(srv.barrier().await.is_empty(), "DATA sent without window");
    srv.write(&settings_frame(&[(0x4, 30)])).await;
    let ack = srv.frame().await;
    assert_eq!((ack.kind, ack.flags), (SETTINGS, ACK));
    assert_data(&srv.frame().await, 3, 30, false);
    assert!(srv.barrier().await.is_empty(), "DATA beyond the window");
    srv.write(&settings_frame(&[(0x4, 50)])).await;
    let ack = srv.frame().await;
    assert_eq!((ack.kind, ack.flags), (SETTINGS, ACK));
    assert_data(&srv.frame().await, 3, 20, true);
    for (id, f) in [(1, f1), (3, f3)] {
        srv.write(&answer(id, &[(":status", "200")])).await;
        assert_eq!(ok(within("an answer", f).await).status, 200);
    }
}

/// A server whose stream window is `window` bytes and which opens it
/// again only by what it has read, as RFC 9113 allows: two wakes in
/// flight each send what the window allows, never more, and their bodies
/// arrive whole.
async fn tiny_window_reopened_only_as_data_arrives(window: u32) {
    let Open {
        client,
        mut srv,
        driver: _driver,
    } = open(&[(0x4, window)]).await;
    let f1 = post(&client, "/?token=a", b"wake");
    let f3 = post(&client, "/?token=b", b"WAKE");
    let mut bodies: [Vec<u8>; 2] = Default::default();
    let mut frames = [0; 2];
    let mut ended = [false; 2];
    let mut heads = Vec::new();
    while ended != [true, true] {
        // What the client sent before the barrier: at most one window's
        // worth per stream, since the server opened nothing since.
        let sent = srv.barrier().await;
        assert!(!sent.is_empty(), "the client stalled: {bodies:?}");
        let mut read = [0u32; 2];
        for f in sent {
            if f.kind == HEADERS {
                heads.push((f.stream, f.flags));
                continue;
            }
            assert_eq!(f.kind, DATA, "{f:?}");
            let i = (f.stream as usize - 1) / 2;
            read[i] += f.payload.len() as u32;
            assert!(read[i] <= window, "{} bytes beyond the window", read[i]);
            assert!(!ended[i], "DATA after END_STREAM");
            bodies[i].extend_from_slice(&f.payload);
            frames[i] += 1;
            ended[i] = f.flags & END_STREAM != 0;
        }
        // Open each stream and the connection by what was read.
        for (i, n) in read.into_iter().enumerate() {
            if n > 0 && !ended[i] {
                let id = 2 * i as u32 + 1;
                srv.write(&frame(WINDOW_UPDATE, 0, id, &n.to_be_bytes()))
                    .await;
            }
        }
        let total: u32 = read.iter().sum();
        if total > 0 {
            srv.write(&frame(WINDOW_UPDATE, 0, 0, &total.to_be_bytes()))
                .await;
        }
    }
    assert_eq!(heads, [(1, END_HEADERS), (3, END_HEADERS)]);
    assert_eq!(bodies, [b"wake".to_vec(), b"WAKE".to_vec()]);
    let per_body = 4usize.div_ceil(window as usize);
    assert_eq!(frames, [per_body, per_body]);
    for (id, f) in [(1, f1), (3, f3)] {
        srv.write(&answer(id, &[(":status", "200")])).await;
        assert_eq!(ok(within("an answer", f).await).status, 200);
    }
}

#[tokio::test]
async fn a_one_byte_window_reopened_only_as_data_arrives_carries_whole_bodies() {
    tiny_window_reopened_only_as_data_arrives(1).await;
}

#[tokio::test]
async fn a_two_byte_window_reopened_only_as_data_arrives_carries_whole_bodies() {
    tiny_window_reopened_only_as_data_arrives(2).await;
}

#[tokio::test]
async fn a_body_larger_than_the_peers_frame_size_is_split_into_frames() {
    let Open {
        client,
        mut srv,
        driver: _driver,
    } = open(&[]).await;
    let body: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
    let f1 = post(&client, "/?token=a", &body);
    srv.request_head().await;
    let mut got = Vec::new();
    for (len, end) in [(16_384, false), (16_384, false), (7_232, true)] {
        let data = srv.frame().await;
        assert_data(&data, 1, len, end);
        got.extend_from_slice(&data.payload);
    }
    assert_eq!(got, body);
    srv.write(&answer(1, &[(":status", "200")])).await;
    assert_eq!(ok(within("stream 1", f1).await).status, 200);
}

#[tokio::test]
async fn data_waits_for_the_connection_window() {
    let Open {
        client,
        mut srv,
        driver: _driver,
    } = open(&[]).await;
    // 4 x 16000 bytes fit the initial 65,535; of the fifth, the 1,535
    // bytes left go at once and the rest waits for the connection.
    let mut futures = Vec::new();
    for i in 0..5 {
        futures.push(post(&client, &format!("/?token={i}"), &[b'x'; 16_000]));
    }
    for id in [1, 3, 5, 7] {
        let req = srv.request().await;
        assert_eq!(req.head.stream, id);
        assert_eq!(req.data.expect("DATA").payload.len(), 16_000);
    }
    let (head, _) = srv.request_head().await;
    assert_eq!(head.stream, 9);
    assert_data(&srv.frame().await, 9, 1_535, false);
    assert!(srv.barrier().await.is_empty(), "DATA beyond the window");
    // The stream's own window has room: only the connection's held it.
    srv.write(&frame(WINDOW_UPDATE, 0, 0, &16_000u32.to_be_bytes()))
        .await;
    assert_data(&srv.frame().await, 9, 14_465, true);
    for (id, f) in [1, 3, 5, 7, 9].into_iter().zip(futures) {
        srv.write(&answer(id, &[(":status", "200")])).await;
        assert_eq!(ok(within("an answer", f).await).status, 200);
    }
}

#[tokio::test]
async fn a_dropped_answer_future_resets_its_stream_and_its_late_answer_is_ignored() {
    let Open {
        client,
        mut srv,
        driver: _driver,
    } = open(&[]).await;
    let f1 = post(&client, "/?token=a", b"one");
    srv.request().await;
    drop(f1);
    let rst = srv.frame().await;
    assert_eq!(
        rst,
        Frame {
            kind: RST_STREAM,
            flags: 0,
            stream: 1,
            payload: CANCEL.to_be_bytes().to_vec(),
        }
    );
    // The late answer enters a header in the dynamic table; the next
    // answer refers to it, so the client must have decoded the first.
    let mut enc = Encoder::default();
    let mut late = Vec::new();
    enc.begin(&mut late);
    Encoder::indexed_static(&mut late, 8); // :status 200
    enc.indexed(&mut late, b"x-wns-debug-trace", b"DB5SCH101");
    srv.write(&frame(HEADERS, END_HEADERS, 1, &late)).await;
    srv.write(&frame(DATA, END_STREAM, 1, b"late body")).await;
    assert!(srv.barrier().await.is_empty());
    assert!(!client.is_closed());

    let f3 = post(&client, "/?token=b", b"two");
    assert_eq!(srv.request().await.head.stream, 3);
    let mut next = Vec::new();
    enc.begin(&mut next);
    Encoder::indexed_static(&mut next, 8);
    enc.indexed(&mut next, b"x-wns-debug-trace", b"DB5SCH101");
    assert_eq!(next.len(), 2, "the second block is two indexes");
    srv.write(&frame(HEADERS, END_HEADERS | END_STREAM, 3, &next))
        .await;
    let reply = ok(within("stream 3", f3).await);
    assert_eq!(reply.status, 200);
    assert_eq!(header(&reply, "x-wns-debug-trace"), Some("DB5SCH101"));

    // A future dropped after its answer came resets nothing.
    let f5 = post(&client, "/?token=c", b"three");
    srv.request().await;
    srv.write(&answer(5, &[(":status", "200")])).await;
    assert!(srv.barrier().await.is_empty());
    drop(f5);
    assert!(srv.barrier().await.is_empty(), "reset an answered stream");
}

/// Opens streams 1 and 3, sends `bad`, and checks the connection ends:
/// both callers fail, the client says GOAWAY with `code`, the driver
/// resolves and new sends are refused.
async fn connection_error(bad: Vec<u8>, code: u32) {
    let Open {
        client,
        mut srv,
        driver,
    } = open(&[]).await;
    let f1 = post(&client, "/?token=a", b"one");
    let f3 = post(&client, "/?token=b", b"two");
    srv.request().await;
    srv.request().await;
    srv.write(&bad).await;
    for f in [f1, f3] {
        match within("a failed stream", f).await {
            Err(ConnError::Protocol(_)) => {}
            other => panic!("expected ConnError::Protocol, got {other:?}"),
        }
    }
    let rest = srv.until_closed().await;
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert_eq!((rest[0].kind, rest[0].stream), (GOAWAY, 0));
    assert_eq!(rest[0].u32_at(4), code, "GOAWAY error code");
    match within("the driver", driver).await.unwrap() {
        Err(ConnError::Protocol(_)) => {}
        other => panic!("the driver ended with {other:?}"),
    }
    assert!(client.is_closed());
    let why = unprocessed(within("a refused send", post(&client, "/?token=c", b"x")).await);
    assert!(why.starts_with("not sent"), "{why}");
}

#[tokio::test]
async fn a_frame_over_16384_bytes_is_a_frame_size_error() {
    connection_error(
        frame(DATA, 0, 1, &vec![0; H2_FRAME_BYTES_MAX + 1]),
        FRAME_SIZE_ERROR,
    )
    .await;
}

#[tokio::test]
async fn a_bad_hpack_block_is_a_compression_error() {
    // Index 70: past the static table, and the dynamic one is empty.
    connection_error(
        frame(HEADERS, END_HEADERS, 1, &[0x80 | 70]),
        COMPRESSION_ERROR,
    )
    .await;
}

#[tokio::test]
async fn a_frame_inside_a_header_block_is_a_protocol_error() {
    let mut bad = frame(HEADERS, 0, 1, &block(&[(":status", "200")]));
    bad.extend_from_slice(&frame(PING, 0, 0, &[0; 8]));
    connection_error(bad, PROTOCOL_ERROR).await;
}

#[tokio::test]
async fn a_push_promise_is_a_protocol_error() {
    let mut p = 2u32.to_be_bytes().to_vec();
    p.extend_from_slice(&block(&[(":method", "GET"), (":path", "/")]));
    connection_error(frame(PUSH_PROMISE, END_HEADERS, 1, &p), PROTOCOL_ERROR).await;
}

#[tokio::test]
async fn the_server_closing_the_socket_fails_every_open_stream() {
    let Open {
        client,
        mut srv,
        driver,
    } = open(&[]).await;
    let f1 = post(&client, "/?token=a", b"one");
    let f3 = post(&client, "/?token=b", b"two");
    srv.request().await;
    srv.request().await;
    drop(srv);
    for f in [f1, f3] {
        lost(within("a failed stream", f).await);
    }
    within("the driver", driver).await.unwrap().unwrap();
    assert!(client.is_closed());
    let why = unprocessed(within("a refused send", post(&client, "/?token=c", b"x")).await);
    assert!(why.starts_with("not sent"), "{why}");
}

#[tokio::test]
async fn a_lost_connection_fails_written_requests_as_lost_and_the_rest_as_unprocessed() {
    let Open {
        client,
        mut srv,
        driver,
    } = open_with(&[], 1024).await;
    // Far more than the pipe holds: the server reads the first request's
    // HEADERS and no more, so the socket takes only the first requests.
    let futures: Vec<_> = (0..8)
        .map(|i| post(&client, &format!("/?token={i}"), &[b'x'; 1000]))
        .collect();
    assert_eq!(srv.request_head().await.0.stream, 1);
    drop(srv);
    let mut results = Vec::new();
    for f in futures {
        results.push(within("a failed stream", f).await);
    }
    within("the driver", driver).await.unwrap().ok();
    // What the socket took may have reached the server; what it never
    // took cannot have.
    let maybe: Vec<bool> = results
        .iter()
        .map(|r| match r {
            Err(ConnError::Lost(_)) => true,
            Err(ConnError::Unwritten(_)) => false,
            other => panic!("expected Lost or Unwritten, got {other:?}"),
        })
        .collect();
    assert!(maybe[0], "stream 1 was read by the server: {results:?}");
    assert!(!maybe[7], "the last cannot have been written: {results:?}");
    let written = maybe.iter().filter(|m| **m).count();
    assert!(
        maybe[..written].iter().all(|m| *m),
        "written requests are the oldest: {results:?}"
    );
}

#[tokio::test]
async fn dropping_the_idle_client_sends_goaway_and_ends_the_connection() {
    let Open {
        client,
        mut srv,
        driver,
    } = open(&[]).await;
    drop(client);
    assert_eq!(
        srv.until_closed().await,
        vec![Frame {
            kind: GOAWAY,
            flags: 0,
            stream: 0,
            payload: vec![0; 8],
        }]
    );
    within("the driver", driver).await.unwrap().unwrap();
}

#[tokio::test]
async fn dropping_the_client_with_a_stream_open_waits_for_its_answer() {
    let Open {
        client,
        mut srv,
        driver,
    } = open(&[]).await;
    let f1 = post(&client, "/?token=a", b"one");
    let f3 = post(&client, "/?token=b", b"two");
    srv.request().await;
    srv.request().await;
    drop(client);
    assert!(srv.barrier().await.is_empty(), "closed with streams open");
    assert!(!driver.is_finished());
    srv.write(&answer(1, &[(":status", "200")])).await;
    assert_eq!(ok(within("the answer", f1).await).status, 200);
    assert!(srv.barrier().await.is_empty(), "closed with a stream open");
    assert!(!driver.is_finished());
    // The last answer is dropped unread: that ends the connection too.
    srv.write(&answer(3, &[(":status", "200")])).await;
    assert!(srv.barrier().await.is_empty());
    drop(f3);
    let rest = srv.until_closed().await;
    assert_eq!(
        rest.iter()
            .map(|f| (f.kind, f.u32_at(4)))
            .collect::<Vec<_>>(),
        vec![(GOAWAY, NO_ERROR)]
    );
    within("the driver", driver).await.unwrap().unwrap();
}

#[tokio::test]
async fn max_concurrent_streams_bounds_the_open_streams() {
    let Open {
        client,
        mut srv,
        driver: _driver,
    } = open(&[(0x3, 1)]).await;
    assert_eq!(client.max_streams(), 1);
    let f1 = post(&client, "/?token=a", b"one");
    let why = unprocessed(within("a refused send", post(&client, "/?token=b", b"two")).await);
    assert!(
        why.starts_with("not sent") && why.contains("no free stream"),
        "{why}"
    );
    assert_eq!(srv.request().await.head.stream, 1);
    assert!(
        srv.barrier().await.is_empty(),
        "the refused request was written"
    );
    srv.write(&answer(1, &[(":status", "200")])).await;
    assert_eq!(ok(within("stream 1", f1).await).status, 200);
    // The stream is free again; the refused one used no id.
    let f3 = post(&client, "/?token=c", b"three");
    assert_eq!(srv.request().await.head.stream, 3);
    srv.write(&answer(3, &[(":status", "200")])).await;
    assert_eq!(ok(within("stream 3", f3).await).status, 200);
}

#[tokio::test(start_paused = true)]
async fn an_unanswered_request_times_out_at_its_deadline_and_is_reset() {
    let Open {
        client,
        mut srv,
        driver: _driver,
    } = open(&[]).await;
    let headers = wake_headers("cv");
    let send = |path, secs| {
        client.send(Request {
            authority: AUTHORITY,
            path,
            headers: &headers,
            body: Bytes::from_static(b"wake"),
            timeout: Duration::from_secs(secs),
        })
    };
    let started = crate::clock::tokio_instant();
    let f1 = send("/?token=a", 2);
    srv.request().await;
    let f3 = send("/?token=b", 60);
    srv.request().await;
    // Nothing answers stream 1: at its deadline (virtual time) its caller
    // gets a timeout and the server a reset; stream 3 keeps waiting.
    let r = within("stream 1", f1).await;
    assert!(matches!(r, Err(ConnError::Timeout(_))), "{r:?}");
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(
        srv.frame().await,
        Frame {
            kind: RST_STREAM,
            flags: 0,
            stream: 1,
            payload: CANCEL.to_be_bytes().to_vec(),
        }
    );
    srv.write(&answer(3, &[(":status", "200")])).await;
    assert_eq!(ok(within("stream 3", f3).await).status, 200);
    assert!(!client.is_closed());
}

#[tokio::test]
async fn a_body_waiting_for_its_stream_window_does_not_hold_back_the_next() {
    let Open {
        client,
        mut srv,
        driver: _driver,
    } = open(&[(0x4, 0)]).await;
    let f1 = post(&client, "/?token=a", &[b'a'; 100]);
    srv.request_head().await;
    let f3 = post(&client, "/?token=b", &[b'b'; 10]);
    srv.request_head().await;
    assert!(srv.barrier().await.is_empty(), "DATA sent without window");
    // Stream 3 gets its window first: its body goes out, stream 1's waits.
    srv.write(&frame(WINDOW_UPDATE, 0, 3, &10u32.to_be_bytes()))
        .await;
    let data = srv.frame().await;
    assert_eq!((data.kind, data.stream, data.payload.len()), (DATA, 3, 10));
    assert!(
        srv.barrier().await.is_empty(),
        "stream 1 sent without window"
    );
    // A body whose stream was reset meanwhile is dropped, not sent.
    srv.write(&frame(RST_STREAM, 0, 1, &REFUSED_STREAM.to_be_bytes()))
        .await;
    srv.write(&frame(WINDOW_UPDATE, 0, 1, &100u32.to_be_bytes()))
        .await;
    assert!(
        srv.barrier().await.is_empty(),
        "DATA sent on a reset stream"
    );
    assert_eq!(reset_code(within("stream 1", f1).await), REFUSED_STREAM);
    srv.write(&answer(3, &[(":status", "200")])).await;
    assert_eq!(ok(within("stream 3", f3).await).status, 200);
}

#[tokio::test(start_paused = true)]
async fn a_connection_silent_past_a_deadline_is_presumed_dead() {
    let Open {
        client,
        mut srv,
        driver,
    } = open(&[]).await;
    tokio::time::advance(Duration::from_millis(1)).await;
    let headers = wake_headers("cv");
    let send = |path, secs| {
        client.send(Request {
            authority: AUTHORITY,
            path,
            headers: &headers,
            body: Bytes::from_static(b"wake"),
            timeout: Duration::from_secs(secs),
        })
    };
    let f1 = send("/?token=a", 2);
    srv.request().await;
    let f3 = send("/?token=b", 60);
    srv.request().await;
    // The server sends nothing at all: at the first deadline every stream
    // fails as lost (to be sent again elsewhere) and the connection ends.
    assert!(lost(within("stream 1", f1).await).contains("silent"));
    assert!(lost(within("stream 3", f3).await).contains("silent"));
    assert!(client.is_closed());
    assert!(unprocessed(within("a late send", send("/?token=c", 2)).await).contains("not sent"));
    let rest = srv.until_closed().await;
    assert_eq!(
        rest.last().map(|f| (f.kind, f.u32_at(4))),
        Some((GOAWAY, NO_ERROR))
    );
    within("the driver", driver).await.ok();
}

#[tokio::test(start_paused = true)]
async fn requests_before_the_servers_last_frame_time_out_and_those_after_are_lost() {
    let Open {
        client,
        mut srv,
        driver: _driver,
    } = open(&[]).await;
    tokio::time::advance(Duration::from_millis(1)).await;
    let headers = wake_headers("cv");
    let send = |path| {
        client.send(Request {
            authority: AUTHORITY,
            path,
            headers: &headers,
            body: Bytes::from_static(b"wake"),
            timeout: Duration::from_secs(2),
        })
    };
    let f1 = send("/?token=a");
    srv.request().await;
    // The server shows it is alive after stream 1 went out...
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(srv.barrier().await.is_empty());
    // ...and sends nothing after stream 3 went out.
    tokio::time::advance(Duration::from_millis(1)).await;
    let f3 = send("/?token=b");
    srv.request().await;
    // Stream 1 was read by a live server: a final timeout, not resent.
    let r = within("stream 1", f1).await;
    assert!(matches!(r, Err(ConnError::Timeout(_))), "{r:?}");
    assert!(!client.is_closed());
    // Nothing came since stream 3 was queued: the connection is presumed
    // dead, and stream 3, which was written, may have been processed.
    let r = within("stream 3", f3).await;
    assert!(matches!(&r, Err(e) if e.is_retryable_elsewhere() && e.may_have_been_processed()));
    assert!(lost(r).contains("silent"));
    assert!(client.is_closed());
}

fn post_to(client: &H2Client, path: &str, sink: &Arc<Sink>, tag: u64) -> Sent {
    let headers = wake_headers("cv");
    client
        .send_to(
            Request {
                authority: AUTHORITY,
                path,
                headers: &headers,
                body: Bytes::from_static(b"wake"),
                timeout: Duration::from_secs(15),
            },
            sink,
            tag,
        )
        .expect("the connection takes the request")
}

/// The tags the sink reported so far, without waiting.
fn ended(sink: &Sink) -> Vec<u64> {
    let mut out = Vec::new();
    let waker = futures_util::task::noop_waker();
    let _ = sink.poll_ended(&mut Context::from_waker(&waker), &mut out);
    out
}

#[tokio::test]
async fn a_sink_gets_the_tags_of_ended_requests_and_each_answer_is_taken_once() {
    let Open {
        client,
        mut srv,
        driver: _driver,
    } = open(&[]).await;
    let sink = Sink::new();
    let mut a = post_to(&client, "/?token=a", &sink, 70);
    let mut b = post_to(&client, "/?token=b", &sink, 71);
    let c = post_to(&client, "/?token=c", &sink, 72);
    for _ in 0..3 {
        srv.request().await;
    }
    assert!(srv.barrier().await.is_empty());
    assert!(ended(&sink).is_empty(), "nothing answered yet");
    assert!(a.take().is_none(), "no answer before the sink says so");

    // Answers out of order; a reset ends a request too.
    srv.write(&answer(3, &[(":status", "410")])).await;
    srv.write(&frame(RST_STREAM, 0, 1, &REFUSED_STREAM.to_be_bytes()))
        .await;
    assert!(srv.barrier().await.is_empty());
    assert_eq!(ended(&sink), vec![71, 70]);
    assert!(ended(&sink).is_empty(), "each tag is reported once");
    assert_eq!(ok(b.take().expect("b ended")).status, 410);
    assert_eq!(reset_code(a.take().expect("a ended")), REFUSED_STREAM);
    assert!(matches!(b.take(), Some(Err(ConnError::Protocol(_)))));

    // A request dropped before its end resets its stream, and its late
    // answer reports nothing.
    drop(c);
    let rst = srv.frame().await;
    assert_eq!(
        (rst.kind, rst.stream, rst.u32_at(0)),
        (RST_STREAM, 5, CANCEL)
    );
    srv.write(&answer(5, &[(":status", "200")])).await;
    assert!(srv.barrier().await.is_empty());
    assert!(ended(&sink).is_empty());

    // A connection that fails reports every open request.
    let _d = post_to(&client, "/?token=d", &sink, 80);
    let _e = post_to(&client, "/?token=e", &sink, 81);
    srv.request().await;
    srv.request().await;
    srv.write(&goaway_frame(0, NO_ERROR)).await;
    assert!(srv.barrier().await.is_empty());
    assert_eq!(ended(&sink), vec![80, 81]);
    assert!(client
        .send_to(
            Request {
                authority: AUTHORITY,
                path: "/?token=f",
                headers: &wake_headers("cv"),
                body: Bytes::from_static(b"wake"),
                timeout: Duration::from_secs(15),
            },
            &sink,
            82,
        )
        .is_err());
}
