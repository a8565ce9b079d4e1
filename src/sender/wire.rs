//! The sender's own HTTP/2 client connection (RFC 9113), built for one
//! job: many small POSTs to WNS on few connections.
//!
//! A request is encoded by the caller, straight into the connection's
//! output buffer (HEADERS, then its body: one DATA frame when the flow
//! control windows allow, as many as they make necessary otherwise),
//! under a short lock; the connection's task writes whatever accumulated
//! in one TLS write, reads the answers and hands each to its waiting
//! caller. So a batch of wakes started in one pass of a shard costs one
//! write, and no request or header map object is built on the way out.
//!
//! What it does of the protocol: the preface and SETTINGS exchange (it
//! waits for the server's SETTINGS before the first request, so the
//! stream limit is known), stream ids, the peer's
//! SETTINGS_MAX_CONCURRENT_STREAMS, flow control both ways, HPACK with
//! its dynamic tables, CONTINUATION, padding, PING, RST_STREAM (it ends
//! its stream only, with [`ConnError::Reset`]), GOAWAY (streams above its
//! last id fail as never processed; the rest finish), and a cancelled
//! request resets its stream. Server push is disabled.
//!
//! Request deadlines share one timer per connection. A request past its
//! deadline fails with [`ConnError::Timeout`] and its stream is reset;
//! if the server sent nothing at all since that request was queued, the
//! connection is presumed dead instead and every stream on it fails as
//! lost, to be sent again elsewhere. When a connection is lost, a request
//! none of whose bytes the socket took fails as
//! [`ConnError::Unwritten`], the others as [`ConnError::Lost`] (they may
//! have been processed); the connection then reads as
//! [`failed`](H2Client::failed).

use super::conn::{ConnError, Reply};
use super::hpack::{Decoder, Encoder, HpackError};
use super::limits::{
    H2_CLOSE_WITHIN, H2_CONNECTION_WINDOW_BYTES, H2_FRAME_BYTES_MAX, H2_HEADER_BLOCK_BYTES_MAX,
    H2_HEADER_LIST_BYTES_MAX, H2_READ_CHUNK_BYTES, H2_STREAM_WINDOW_BYTES, H2_VALUES_CHUNK_BYTES,
};
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

const NO_ERROR: u32 = 0x0;
const PROTOCOL_ERROR: u32 = 0x1;
const FLOW_CONTROL_ERROR: u32 = 0x3;
const FRAME_SIZE_ERROR: u32 = 0x6;
const CANCEL: u32 = 0x8;
const COMPRESSION_ERROR: u32 = 0x9;

/// Highest client stream id.
const MAX_STREAM_ID: u32 = (1 << 31) - 1;

/// A request to send: the target and headers, encoded by the client.
pub struct Request<'a> {
    /// `:authority`.
    pub authority: &'a str,
    /// `:path`, with the query.
    pub path: &'a str,
    /// Regular headers; one whose value is marked sensitive is sent
    /// never-indexed, the others are indexed (they repeat on every wake).
    pub headers: &'a [(HeaderName, HeaderValue)],
    pub body: Bytes,
    /// How long the answer's head may take; past it the caller gets
    /// [`ConnError::Timeout`] and the stream is reset.
    pub timeout: Duration,
}

/// What the server said in its SETTINGS.
#[derive(Debug, Clone, Copy)]
struct Peer {
    max_streams: u32,
    initial_window: i64,
    max_frame: usize,
}

/// One open stream: the answer as it arrives.
struct Stream {
    /// When the request was queued.
    opened: Instant,
    /// When the caller stops waiting for the answer's head.
    deadline: Instant,
    status: Option<u16>,
    headers: HeaderMap,
    /// Our send window on this stream.
    window: i64,
    /// What the caller gets; set once.
    done: Option<Result<Reply, ConnError>>,
    waker: Option<Waker>,
    /// Where to report the end instead of waking `waker` (requests sent
    /// with [`H2Client::send_to`]), with the caller's tag.
    sink: Option<(Arc<Sink>, u64)>,
    /// Bytes received and not yet returned by WINDOW_UPDATE.
    unacked: u32,
    /// Where its HEADERS start in everything the connection has queued
    /// (see [`State::out_taken`]): once the socket took more than this,
    /// the server may have the request.
    head_at: u64,
}

impl Stream {
    fn finish(&mut self, r: Result<Reply, ConnError>) {
        if self.done.is_none() {
            self.done = Some(r);
            if let Some((sink, tag)) = &self.sink {
                sink.push(*tag);
            } else if let Some(w) = self.waker.take() {
                w.wake();
            }
        }
    }
}

/// Where connections report the requests of one caller that ended, by the
/// caller's tags: one waker for many requests, where a
/// [`ResponseFuture`] costs a future and a waker per request.
#[derive(Default)]
pub struct Sink {
    inner: Mutex<SinkInner>,
}

#[derive(Default)]
struct SinkInner {
    ended: Vec<u64>,
    waker: Option<Waker>,
}

impl Sink {
    pub fn new() -> Arc<Sink> {
        Arc::default()
    }

    fn push(&self, tag: u64) {
        let mut g = self.inner.lock();
        g.ended.push(tag);
        if let Some(w) = g.waker.take() {
            drop(g);
            w.wake();
        }
    }

    /// Moves the tags of the requests that ended into `out`; `Pending`
    /// when there are none yet (the task is woken when one ends).
    pub fn poll_ended(&self, cx: &mut Context<'_>, out: &mut Vec<u64>) -> Poll<()> {
        let mut g = self.inner.lock();
        if g.ended.is_empty() {
            match &g.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => g.waker = Some(cx.waker().clone()),
            }
            return Poll::Pending;
        }
        out.append(&mut g.ended);
        Poll::Ready(())
    }
}

/// Open streams by id: ids only grow and answers come back roughly in
/// order, so a window of slots from the oldest open id does it without
/// hashing.
#[derive(Default)]
struct Streams {
    /// Id of `slots[0]`.
    base: u32,
    slots: VecDeque<Option<Stream>>,
    open: usize,
}

impl Streams {
    fn new() -> Streams {
        Streams {
            base: 1,
            slots: VecDeque::new(),
            open: 0,
        }
    }

    fn slot(&self, id: u32) -> Option<usize> {
        if id < self.base || id.is_multiple_of(2) {
            return None;
        }
        let i = ((id - self.base) / 2) as usize;
        (i < self.slots.len()).then_some(i)
    }

    fn get(&mut self, id: u32) -> Option<&mut Stream> {
        let i = self.slot(id)?;
        self.slots[i].as_mut()
    }

    fn insert(&mut self, id: u32, s: Stream) {
        if self.slots.is_empty() {
            self.base = id;
        }
        debug_assert_eq!(self.base + 2 * self.slots.len() as u32, id);
        self.slots.push_back(Some(s));
        self.open += 1;
    }

    fn remove(&mut self, id: u32) -> Option<Stream> {
        let i = self.slot(id)?;
        let s = self.slots[i].take()?;
        self.open -= 1;
        while let Some(None) = self.slots.front() {
            self.slots.pop_front();
            self.base += 2;
        }
        Some(s)
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = (u32, &mut Stream)> {
        let base = self.base;
        self.slots
            .iter_mut()
            .enumerate()
            .filter_map(move |(i, s)| s.as_mut().map(|s| (base + 2 * i as u32, s)))
    }
}

struct State {
    enc: Encoder,
    /// Frames not yet handed to the connection's task.
    out: Vec<u8>,
    /// Bytes handed to the connection's task so far: `out[0]` is byte
    /// `out_taken` of everything queued on this connection.
    out_taken: u64,
    /// Bodies, or what is left of them, waiting for send window: stream
    /// id and bytes, oldest first.
    blocked: VecDeque<(u32, Bytes)>,
    streams: Streams,
    next_id: u32,
    peer: Peer,
    /// Our send window on the connection.
    window: i64,
    /// Set once the connection can take no new streams: its error, or
    /// "going away".
    closed: Option<ConnError>,
    /// The connection's task, to wake when there is something to write.
    io_waker: Option<Waker>,
    /// No client handle is left: finish the open streams and close.
    released: bool,
    /// The connection was lost with requests on it.
    failed: bool,
}

impl State {
    fn frame_head(&mut self, len: usize, kind: u8, flags: u8, stream: u32) {
        let len = len as u32;
        self.out
            .extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
        self.out.extend_from_slice(&stream.to_be_bytes());
    }

    fn wake_io(&mut self) {
        if let Some(w) = &self.io_waker {
            w.wake_by_ref();
        }
    }

    /// A caller took its stream: when it was the last of a connection
    /// that takes no new ones, the connection's task must run to end it.
    fn wake_if_last(&mut self) {
        if self.streams.open == 0 && (self.released || self.closed.is_some()) {
            self.wake_io();
        }
    }

    /// Sends what DATA the windows allow, oldest body first.
    ///
    /// A body goes out in as many DATA frames as the windows and the
    /// peer's frame size make necessary (RFC 9113 section 6.9): a stream
    /// whose window is smaller than its body sends what the window allows
    /// and the rest as WINDOW_UPDATEs come. A body waiting for its own
    /// stream's window does not hold back the bodies behind it; one
    /// waiting for the connection's window does (they all draw on it,
    /// oldest first). A body whose stream ended meanwhile (reset, or
    /// failed by GOAWAY) is dropped.
    fn flush_blocked(&mut self) {
        let mut i = 0;
        while i < self.blocked.len() && self.window > 0 {
            let id = self.blocked[i].0;
            let stream_window = match self.streams.get(id) {
                Some(s) if s.done.is_none() => s.window,
                _ => {
                    self.blocked.remove(i);
                    continue;
                }
            };
            if stream_window <= 0 {
                i += 1;
                continue;
            }
            let left = self.blocked[i].1.len();
            let n = (left as i64)
                .min(stream_window)
                .min(self.window)
                .min(self.peer.max_frame as i64) as usize;
            let chunk = self.blocked[i].1.split_to(n);
            let last = n == left;
            if let Some(s) = self.streams.get(id) {
                s.window -= n as i64;
            }
            self.window -= n as i64;
            self.frame_head(n, DATA, if last { END_STREAM } else { 0 }, id);
            self.out.extend_from_slice(&chunk);
            if last {
                self.blocked.remove(i);
            }
        }
    }

    /// Ends every stream, and the connection for new ones, with `err`.
    ///
    /// `written`: bytes of this connection's output the socket took. When
    /// the connection is lost ([`ConnError::Lost`]), a request none of
    /// which the socket took fails as [`ConnError::Unwritten`] instead:
    /// the server cannot have seen it. A connection lost with requests
    /// still waiting for their answers is marked failed.
    fn fail_all(&mut self, err: ConnError, written: u64) {
        if self.closed.is_none() {
            self.closed = Some(err.clone());
        }
        let lost = matches!(err, ConnError::Lost(_));
        let mut unanswered = false;
        for (_, s) in self.streams.iter_mut() {
            unanswered |= s.done.is_none();
            match &err {
                ConnError::Lost(why) if s.head_at >= written => {
                    s.finish(Err(ConnError::Unwritten(why.clone())))
                }
                _ => s.finish(Err(err.clone())),
            }
        }
        self.failed |= lost && unanswered;
        self.blocked.clear();
    }

    fn goaway(&mut self, last: u32, code: u32) {
        self.frame_head(8, GOAWAY, 0, 0);
        self.out.extend_from_slice(&last.to_be_bytes());
        self.out.extend_from_slice(&code.to_be_bytes());
    }

    fn rst(&mut self, id: u32, code: u32) {
        self.frame_head(4, RST_STREAM, 0, id);
        self.out.extend_from_slice(&code.to_be_bytes());
    }

    fn window_update(&mut self, stream: u32, inc: u32) {
        self.frame_head(4, WINDOW_UPDATE, 0, stream);
        self.out.extend_from_slice(&inc.to_be_bytes());
    }
}

struct Shared {
    state: Mutex<State>,
}

/// The handle to one connection: sends requests on it. Dropping the last
/// handle lets the connection finish its open streams and close.
pub struct H2Client {
    shared: Arc<Shared>,
}

impl Drop for H2Client {
    fn drop(&mut self) {
        let mut st = self.shared.state.lock();
        st.released = true;
        st.wake_io();
    }
}

impl H2Client {
    /// Streams the peer lets us open at once.
    pub fn max_streams(&self) -> usize {
        self.shared.state.lock().peer.max_streams as usize
    }

    /// True once the connection takes no new requests.
    pub fn is_closed(&self) -> bool {
        self.shared.state.lock().closed.is_some()
    }

    /// True when the connection was lost (reset, closed by the server,
    /// silent past a deadline, a write failed) with requests still
    /// waiting for their answers: a failure of its front end, not a
    /// graceful close.
    pub fn failed(&self) -> bool {
        self.shared.state.lock().failed
    }

    /// Sends a request; the future resolves with the answer's head (the
    /// body is read and dropped). Dropping the future before that resets
    /// the stream.
    pub fn send(&self, req: Request<'_>) -> ResponseFuture {
        match self.start(req, None) {
            Ok(id) => ResponseFuture {
                shared: Some(self.shared.clone()),
                id,
                err: None,
            },
            Err(e) => ResponseFuture {
                shared: None,
                id: 0,
                err: Some(e),
            },
        }
    }

    /// Sends a request whose end is reported to `sink` with `tag`; the
    /// answer is then taken with [`Sent::take`]. Fails at once, sending
    /// nothing, when the connection takes no new stream.
    pub fn send_to(&self, req: Request<'_>, sink: &Arc<Sink>, tag: u64) -> Result<Sent, ConnError> {
        let id = self.start(req, Some((sink.clone(), tag)))?;
        Ok(Sent {
            shared: self.shared.clone(),
            id,
        })
    }

    fn start(&self, req: Request<'_>, sink: Option<(Arc<Sink>, u64)>) -> Result<u32, ConnError> {
        let mut st = self.shared.state.lock();
        if let Some(e) = &st.closed {
            return Err(ConnError::Unprocessed(format!("not sent: {e}")));
        }
        if st.streams.open >= st.peer.max_streams as usize {
            return Err(ConnError::Unprocessed(
                "not sent: the connection has no free stream".into(),
            ));
        }
        let id = st.next_id;
        if id > MAX_STREAM_ID {
            st.closed = Some(ConnError::Lost("stream ids exhausted".into()));
            return Err(ConnError::Unprocessed(
                "not sent: stream ids exhausted".into(),
            ));
        }
        st.next_id += 2;
        let was_empty = st.out.is_empty();
        let st = &mut *st;
        // The header block goes straight after a frame head written once
        // its length is known.
        let head_at = st.out.len();
        st.out.extend_from_slice(&[0; 9]);
        let block_at = st.out.len();
        st.enc.begin(&mut st.out);
        Encoder::indexed_static(&mut st.out, 3); // :method POST
        Encoder::indexed_static(&mut st.out, 7); // :scheme https
        st.enc
            .indexed(&mut st.out, b":authority", req.authority.as_bytes());
        Encoder::literal(&mut st.out, b":path", req.path.as_bytes(), false);
        for (name, value) in req.headers {
            if value.is_sensitive() {
                Encoder::literal(
                    &mut st.out,
                    name.as_str().as_bytes(),
                    value.as_bytes(),
                    true,
                );
            } else {
                st.enc
                    .indexed(&mut st.out, name.as_str().as_bytes(), value.as_bytes());
            }
        }
        let block_len = st.out.len() - block_at;
        let end = if req.body.is_empty() { END_STREAM } else { 0 };
        if block_len <= st.peer.max_frame {
            let len = block_len as u32;
            st.out[head_at..head_at + 9].copy_from_slice(&[
                (len >> 16) as u8,
                (len >> 8) as u8,
                len as u8,
                HEADERS,
                END_HEADERS | end,
                (id >> 24) as u8,
                (id >> 16) as u8,
                (id >> 8) as u8,
                id as u8,
            ]);
        } else {
            // Rare: split into HEADERS + CONTINUATION frames.
            let block = st.out.split_off(block_at);
            st.out.truncate(head_at);
            let mut chunks = block.chunks(st.peer.max_frame).peekable();
            let mut first = true;
            while let Some(chunk) = chunks.next() {
                let last = chunks.peek().is_none();
                let kind = if first { HEADERS } else { CONTINUATION };
                let flags = if last { END_HEADERS } else { 0 } | if first { end } else { 0 };
                st.frame_head(chunk.len(), kind, flags, id);
                st.out.extend_from_slice(chunk);
                first = false;
            }
        }
        let window = st.peer.initial_window;
        let opened = crate::clock::tokio_instant();
        let head_at = st.out_taken + head_at as u64;
        st.streams.insert(
            id,
            Stream {
                opened,
                deadline: opened + req.timeout,
                status: None,
                headers: HeaderMap::new(),
                window,
                done: None,
                waker: None,
                sink,
                unacked: 0,
                head_at,
            },
        );
        if !req.body.is_empty() {
            let len = req.body.len() as i64;
            if st.blocked.is_empty()
                && len <= st.window
                && len <= window
                && req.body.len() <= st.peer.max_frame
            {
                // The usual case: nothing waits for a window, so the body
                // follows its HEADERS at once.
                st.window -= len;
                if let Some(s) = st.streams.get(id) {
                    s.window -= len;
                }
                st.frame_head(req.body.len(), DATA, END_STREAM, id);
                st.out.extend_from_slice(&req.body);
            } else {
                st.blocked.push_back((id, req.body));
                st.flush_blocked();
            }
        }
        if was_empty {
            st.wake_io();
        }
        Ok(id)
    }
}

/// The answer to one request.
pub struct ResponseFuture {
    shared: Option<Arc<Shared>>,
    id: u32,
    /// Set when the request could not even be sent.
    err: Option<ConnError>,
}

impl Future for ResponseFuture {
    type Output = Result<Reply, ConnError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(e) = self.err.take() {
            return Poll::Ready(Err(e));
        }
        let Some(shared) = self.shared.clone() else {
            return Poll::Ready(Err(ConnError::Protocol("polled after completion".into())));
        };
        let mut st = shared.state.lock();
        let id = self.id;
        let Some(s) = st.streams.get(id) else {
            drop(st);
            self.shared = None;
            return Poll::Ready(Err(ConnError::Lost("stream vanished".into())));
        };
        if s.done.is_some() {
            let s = st.streams.remove(id).expect("stream exists");
            st.wake_if_last();
            drop(st);
            self.shared = None;
            return Poll::Ready(s.done.expect("done is set"));
        }
        match &s.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => s.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for ResponseFuture {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            abandon(&shared, self.id);
        }
    }
}

/// The caller gave up on stream `id`: forget it, and reset it if it is
/// still open.
fn abandon(shared: &Shared, id: u32) {
    let mut st = shared.state.lock();
    if let Some(s) = st.streams.remove(id) {
        if s.done.is_none() && st.closed.is_none() {
            // Cancelled: tell the server to stop.
            let was_empty = st.out.is_empty();
            st.rst(id, CANCEL);
            if was_empty {
                st.wake_io();
            }
        }
        st.wake_if_last();
    }
}

/// A request sent with [`H2Client::send_to`]. Dropping it before its
/// answer was taken resets the stream.
pub struct Sent {
    shared: Arc<Shared>,
    id: u32,
}

impl Sent {
    /// The answer's head, once the sink reported this request's tag;
    /// `None` before that.
    pub fn take(&mut self) -> Option<Result<Reply, ConnError>> {
        if self.id == 0 {
            return Some(Err(ConnError::Protocol("answer taken twice".into())));
        }
        let mut st = self.shared.state.lock();
        let Some(s) = st.streams.get(self.id) else {
            self.id = 0;
            return Some(Err(ConnError::Lost("stream vanished".into())));
        };
        s.done.as_ref()?;
        let s = st.streams.remove(self.id).expect("stream exists");
        st.wake_if_last();
        self.id = 0;
        s.done
    }
}

impl Drop for Sent {
    fn drop(&mut self) {
        // Stream ids are odd: 0 means the answer was taken.
        if self.id != 0 {
            abandon(&self.shared, self.id);
        }
    }
}

/// Opens HTTP/2 on an established TLS stream: our preface and SETTINGS,
/// then the server's SETTINGS. Returns the client handle and the future
/// that drives the connection until it ends.
pub async fn handshake<IO>(mut io: IO) -> Result<(H2Client, Connection<IO>), ConnError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut hello = Vec::with_capacity(64);
    hello.extend_from_slice(PREFACE);
    // SETTINGS: ENABLE_PUSH 0, INITIAL_WINDOW_SIZE.
    hello.extend_from_slice(&[0, 0, 12, SETTINGS, 0, 0, 0, 0, 0]);
    hello.extend_from_slice(&[0, 2, 0, 0, 0, 0]);
    hello.extend_from_slice(&[0, 4]);
    hello.extend_from_slice(&H2_STREAM_WINDOW_BYTES.to_be_bytes());
    hello.extend_from_slice(&[0, 0, 4, WINDOW_UPDATE, 0, 0, 0, 0, 0]);
    hello.extend_from_slice(&(H2_CONNECTION_WINDOW_BYTES - 65_535).to_be_bytes());
    // No request was written yet: none can have been processed.
    let io_err = |e: std::io::Error| ConnError::Unprocessed(e.to_string());
    io.write_all(&hello).await.map_err(io_err)?;
    io.flush().await.map_err(io_err)?;
    // The server's preface is a SETTINGS frame.
    let mut rbuf = Vec::with_capacity(H2_READ_CHUNK_BYTES);
    while rbuf.len() < 9 {
        read_more(&mut io, &mut rbuf).await?;
    }
    let len = (rbuf[0] as usize) << 16 | (rbuf[1] as usize) << 8 | rbuf[2] as usize;
    if rbuf[3] != SETTINGS || rbuf[4] & ACK != 0 || len > H2_FRAME_BYTES_MAX {
        return Err(ConnError::Protocol(
            "the server's preface is not a SETTINGS frame".into(),
        ));
    }
    while rbuf.len() < 9 + len {
        read_more(&mut io, &mut rbuf).await?;
    }
    let mut st = State {
        enc: Encoder::default(),
        out: Vec::with_capacity(H2_READ_CHUNK_BYTES),
        out_taken: 0,
        blocked: VecDeque::new(),
        streams: Streams::new(),
        next_id: 1,
        peer: Peer {
            max_streams: u32::MAX,
            initial_window: 65_535,
            max_frame: H2_FRAME_BYTES_MAX,
        },
        window: 65_535,
        closed: None,
        io_waker: None,
        released: false,
        failed: false,
    };
    apply_settings(&mut st, &rbuf[9..9 + len]).map_err(|Fatal(_, e)| e)?;
    rbuf.drain(..9 + len);
    let shared = Arc::new(Shared {
        state: Mutex::new(st),
    });
    let mut conn = Connection {
        io,
        shared: shared.clone(),
        rbuf,
        rpos: 0,
        wbuf: Vec::with_capacity(H2_READ_CHUNK_BYTES),
        wpos: 0,
        wbuf_at: 0,
        decoder: Decoder::new(H2_HEADER_LIST_BYTES_MAX),
        values: BytesMut::with_capacity(H2_VALUES_CHUNK_BYTES),
        kept_at: Vec::new(),
        block: None,
        conn_unacked: 0,
        timer: None,
        last_read: crate::clock::tokio_instant(),
        closing: None,
        eof: false,
    };
    // Frames that came in the same read as the SETTINGS: the driver
    // dispatches only after a read, which might never come.
    conn.dispatch().map_err(|Fatal(_, e)| e)?;
    Ok((H2Client { shared }, conn))
}

async fn read_more<IO: AsyncRead + Unpin>(io: &mut IO, buf: &mut Vec<u8>) -> Result<(), ConnError> {
    let mut chunk = [0u8; 4096];
    let n = io
        .read(&mut chunk)
        .await
        .map_err(|e| ConnError::Unprocessed(e.to_string()))?;
    if n == 0 {
        return Err(ConnError::Unprocessed(
            "closed during the HTTP/2 handshake".into(),
        ));
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// Applies a SETTINGS payload and queues its ACK.
fn apply_settings(st: &mut State, payload: &[u8]) -> Result<(), Fatal> {
    if !payload.len().is_multiple_of(6) {
        return Err(Fatal(
            FRAME_SIZE_ERROR,
            ConnError::Protocol("SETTINGS length not a multiple of 6".into()),
        ));
    }
    for p in payload.chunks_exact(6) {
        let value = u32::from_be_bytes([p[2], p[3], p[4], p[5]]);
        match u16::from_be_bytes([p[0], p[1]]) {
            0x1 => st.enc.set_peer_max(value as usize),
            0x3 => st.peer.max_streams = value,
            0x4 => {
                if value > MAX_STREAM_ID {
                    return Err(Fatal(
                        FLOW_CONTROL_ERROR,
                        ConnError::Protocol("INITIAL_WINDOW_SIZE too large".into()),
                    ));
                }
                let delta = value as i64 - st.peer.initial_window;
                st.peer.initial_window = value as i64;
                for (_, s) in st.streams.iter_mut() {
                    s.window += delta;
                }
            }
            0x5 => {
                if !(16_384..=16_777_215).contains(&value) {
                    return Err(protocol("MAX_FRAME_SIZE out of range"));
                }
                st.peer.max_frame = value as usize;
            }
            _ => {}
        }
    }
    st.frame_head(0, SETTINGS, ACK, 0);
    st.flush_blocked();
    Ok(())
}

/// A header block being collected across CONTINUATION frames.
struct Block {
    stream: u32,
    end_stream: bool,
    bytes: Vec<u8>,
}

/// Drives one connection: writes what callers queued, reads and
/// dispatches answers. Resolves when the connection has ended.
pub struct Connection<IO> {
    io: IO,
    shared: Arc<Shared>,
    rbuf: Vec<u8>,
    rpos: usize,
    wbuf: Vec<u8>,
    wpos: usize,
    /// Where `wbuf` starts in everything queued on this connection.
    wbuf_at: u64,
    decoder: Decoder,
    /// Where the kept header values of answers are copied (see
    /// `on_headers`), and the current answer's kept headers.
    values: BytesMut,
    kept_at: Vec<(HeaderName, Kept)>,
    block: Option<Block>,
    /// Connection-level bytes received and not yet returned.
    conn_unacked: u32,
    /// One timer for all the streams' deadlines: set to the earliest open
    /// stream's, and moved on when it fires. Streams are opened in
    /// deadline order, so this costs a timer per request timeout, not a
    /// timer per request.
    timer: Option<Pin<Box<Sleep>>>,
    /// When the server last sent anything.
    last_read: Instant,
    /// Set once the connection is over: the queued frames are being
    /// written before the socket closes, then the future resolves with
    /// this.
    closing: Option<Result<(), ConnError>>,
    eof: bool,
}

/// A connection error: its code for GOAWAY and what the callers are told.
struct Fatal(u32, ConnError);

impl<IO: AsyncRead + AsyncWrite + Unpin> Connection<IO> {
    /// Processes every whole frame in the read buffer.
    fn dispatch(&mut self) -> Result<(), Fatal> {
        let shared = self.shared.clone();
        let mut st = shared.state.lock();
        loop {
            let avail = &self.rbuf[self.rpos..];
            if avail.len() < 9 {
                break;
            }
            let len = (avail[0] as usize) << 16 | (avail[1] as usize) << 8 | avail[2] as usize;
            if len > H2_FRAME_BYTES_MAX {
                return Err(Fatal(
                    FRAME_SIZE_ERROR,
                    ConnError::Protocol(format!("frame of {len} bytes")),
                ));
            }
            if avail.len() < 9 + len {
                break;
            }
            let (kind, flags) = (avail[3], avail[4]);
            let stream =
                u32::from_be_bytes([avail[5], avail[6], avail[7], avail[8]]) & MAX_STREAM_ID;
            let start = self.rpos + 9;
            self.rpos += 9 + len;
            let payload = start..start + len;
            if self.block.is_some() && kind != CONTINUATION {
                return Err(protocol("a header block was interrupted"));
            }
            match kind {
                DATA => self.on_data(&mut st, stream, flags, payload)?,
                HEADERS => {
                    let p = &self.rbuf[payload];
                    let frag = unpad(p, flags)?;
                    let frag = if flags & PRIORITY != 0 {
                        frag.get(5..).ok_or_else(|| protocol("short HEADERS"))?
                    } else {
                        frag
                    };
                    let block = Block {
                        stream,
                        end_stream: flags & END_STREAM != 0,
                        bytes: frag.to_vec(),
                    };
                    if flags & END_HEADERS != 0 {
                        self.on_headers(&mut st, block)?;
                    } else {
                        self.block = Some(block);
                    }
                }
                CONTINUATION => {
                    let Some(mut block) = self.block.take() else {
                        return Err(protocol("CONTINUATION without HEADERS"));
                    };
                    if block.stream != stream {
                        return Err(protocol("CONTINUATION on another stream"));
                    }
                    block.bytes.extend_from_slice(&self.rbuf[payload]);
                    if block.bytes.len() > H2_HEADER_BLOCK_BYTES_MAX {
                        return Err(protocol("header block too large"));
                    }
                    if flags & END_HEADERS != 0 {
                        self.on_headers(&mut st, block)?;
                    } else {
                        self.block = Some(block);
                    }
                }
                RST_STREAM => {
                    let p = &self.rbuf[payload];
                    if p.len() != 4 || stream == 0 {
                        return Err(protocol("bad RST_STREAM"));
                    }
                    let code = u32::from_be_bytes([p[0], p[1], p[2], p[3]]);
                    // The stream alone ends; the connection goes on.
                    // REFUSED_STREAM says the server did nothing with it
                    // (RFC 9113 section 8.7); any other code may come
                    // after the work was done.
                    if let Some(s) = st.streams.get(stream) {
                        s.finish(Err(ConnError::Reset(code)));
                    }
                }
                SETTINGS => {
                    if stream != 0 {
                        return Err(protocol("SETTINGS on a stream"));
                    }
                    if flags & ACK == 0 {
                        let p = self.rbuf[payload].to_vec();
                        apply_settings(&mut st, &p)?;
                    }
                }
                PUSH_PROMISE => return Err(protocol("PUSH_PROMISE with push disabled")),
                PING => {
                    if len != 8 || stream != 0 {
                        return Err(Fatal(
                            FRAME_SIZE_ERROR,
                            ConnError::Protocol("bad PING".into()),
                        ));
                    }
                    if flags & ACK == 0 {
                        let mut opaque = [0u8; 8];
                        opaque.copy_from_slice(&self.rbuf[payload]);
                        st.frame_head(8, PING, ACK, 0);
                        st.out.extend_from_slice(&opaque);
                    }
                }
                GOAWAY => {
                    let p = &self.rbuf[payload];
                    if p.len() < 8 {
                        return Err(protocol("short GOAWAY"));
                    }
                    let last = u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & MAX_STREAM_ID;
                    let code = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
                    let why = format!("GOAWAY (code {code})");
                    if st.closed.is_none() {
                        st.closed = Some(ConnError::Lost(why.clone()));
                    }
                    // Streams above `last` were never processed: sending
                    // them again elsewhere is safe.
                    for (id, s) in st.streams.iter_mut() {
                        if id > last {
                            s.finish(Err(ConnError::Unprocessed(format!(
                                "above the last stream id of a {why}"
                            ))));
                        }
                    }
                }
                WINDOW_UPDATE => {
                    let p = &self.rbuf[payload];
                    if p.len() != 4 {
                        return Err(Fatal(
                            FRAME_SIZE_ERROR,
                            ConnError::Protocol("bad WINDOW_UPDATE".into()),
                        ));
                    }
                    let inc = (u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & MAX_STREAM_ID) as i64;
                    if stream == 0 {
                        st.window += inc;
                        if st.window > MAX_STREAM_ID as i64 {
                            return Err(Fatal(
                                FLOW_CONTROL_ERROR,
                                ConnError::Protocol("connection window overflow".into()),
                            ));
                        }
                    } else if let Some(s) = st.streams.get(stream) {
                        s.window += inc;
                    }
                    st.flush_blocked();
                }
                _ => {} // PRIORITY and unknown frame types are ignored.
            }
        }
        // Keep the unread tail at the front of the buffer.
        if self.rpos > 0 {
            self.rbuf.drain(..self.rpos);
            self.rpos = 0;
        }
        Ok(())
    }

    fn on_data(
        &mut self,
        st: &mut State,
        stream: u32,
        flags: u8,
        payload: std::ops::Range<usize>,
    ) -> Result<(), Fatal> {
        let len = payload.len() as u32;
        unpad(&self.rbuf[payload], flags)?;
        // Flow control counts the whole frame, padding included.
        self.conn_unacked += len;
        if self.conn_unacked >= H2_CONNECTION_WINDOW_BYTES / 2 {
            st.window_update(0, self.conn_unacked);
            self.conn_unacked = 0;
        }
        let end = flags & END_STREAM != 0;
        let mut update = None;
        if let Some(s) = st.streams.get(stream) {
            if end {
                finish_answer(s);
            } else {
                s.unacked += len;
                if s.unacked >= H2_STREAM_WINDOW_BYTES / 2 {
                    update = Some(s.unacked);
                    s.unacked = 0;
                }
            }
        }
        if let Some(inc) = update {
            st.window_update(stream, inc);
        }
        Ok(())
    }

    fn on_headers(&mut self, st: &mut State, block: Block) -> Result<(), Fatal> {
        // Every block is decoded, even one for a stream we cancelled, so
        // the tables stay in step with the server's.
        let mut status: Option<u16> = None;
        let mut bad_status = false;
        let (values, kept_at) = (&mut self.values, &mut self.kept_at);
        kept_at.clear();
        self.decoder
            .decode(&block.bytes, |name, value| {
                if name == b":status" {
                    match std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()) {
                        Some(code) => status = Some(code),
                        None => bad_status = true,
                    }
                } else if let Some(n) = kept(name) {
                    match known_value(value) {
                        Some(v) => kept_at.push((n, Kept::Known(v))),
                        None => {
                            let at = values.len();
                            values.extend_from_slice(value);
                            kept_at.push((n, Kept::At(at, values.len())));
                        }
                    }
                }
            })
            .map_err(|e: HpackError| {
                Fatal(COMPRESSION_ERROR, ConnError::Protocol(e.to_string()))
            })?;
        // This answer's values share one buffer, carved from a chunk that
        // serves many answers: no allocation per value.
        let shared = self.values.split().freeze();
        if self.values.capacity() < H2_VALUES_CHUNK_BYTES / 8 {
            self.values.reserve(H2_VALUES_CHUNK_BYTES);
        }
        let mut headers = HeaderMap::new();
        for (name, value) in self.kept_at.drain(..) {
            let value = match value {
                Kept::Known(v) => v,
                Kept::At(a, b) => match HeaderValue::from_maybe_shared(shared.slice(a..b)) {
                    Ok(v) => v,
                    Err(_) => continue,
                },
            };
            headers.append(name, value);
        }
        let Some(s) = st.streams.get(block.stream) else {
            return Ok(());
        };
        if s.status.is_none() {
            match status {
                Some(code) if (100..200).contains(&code) => return Ok(()),
                Some(code) if !bad_status => {
                    s.status = Some(code);
                    s.headers = headers;
                }
                _ => {
                    s.finish(Err(ConnError::Protocol(
                        "an answer without a valid :status".into(),
                    )));
                    return Ok(());
                }
            }
        }
        // Otherwise these are trailers: nothing WNS sends that we read.
        if block.end_stream {
            finish_answer(s);
        }
        Ok(())
    }

    /// Ends the connection for everyone with `err`, queueing a GOAWAY.
    fn fail(&mut self, code: u32, err: ConnError) {
        let written = self.written();
        let mut st = self.shared.state.lock();
        st.fail_all(err, written);
        st.goaway(0, code);
    }

    /// Writes what is queued; `Ready(Err)` when the socket failed.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        loop {
            if self.wpos == self.wbuf.len() {
                self.wbuf.clear();
                self.wpos = 0;
                let mut st = self.shared.state.lock();
                std::mem::swap(&mut self.wbuf, &mut st.out);
                self.wbuf_at = st.out_taken;
                st.out_taken += self.wbuf.len() as u64;
                if self.wbuf.is_empty() {
                    drop(st);
                    return Pin::new(&mut self.io).poll_flush(cx);
                }
            }
            match Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.wpos..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => self.wpos += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Bytes of this connection's output the socket has taken.
    fn written(&self) -> u64 {
        self.wbuf_at + self.wpos as u64
    }

    /// Reads what the socket has; `Ready(Ok(true))` when something came.
    fn poll_read_in(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<bool>> {
        if self.rbuf.capacity() - self.rbuf.len() < H2_READ_CHUNK_BYTES / 4 {
            self.rbuf.reserve(H2_READ_CHUNK_BYTES);
        }
        let filled = self.rbuf.len();
        let spare = self.rbuf.spare_capacity_mut();
        let mut rb = ReadBuf::uninit(spare);
        match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n > 0 {
                    self.last_read = crate::clock::tokio_instant();
                }
                // SAFETY: `poll_read` initialised the first `n` bytes of
                // the spare capacity.
                unsafe { self.rbuf.set_len(filled + n) };
                if n == 0 {
                    self.eof = true;
                }
                Poll::Ready(Ok(n > 0))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Fails the streams whose deadline passed (resetting them) and keeps
    /// the timer on the earliest deadline still open.
    ///
    /// If the server sent nothing at all since an expired request was
    /// queued, the connection is presumed dead (a peer gone without a FIN
    /// or RST): every stream fails as lost, to be sent again on another
    /// connection, and `true` is returned so the connection closes.
    fn poll_deadlines(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if let Some(t) = self.timer.as_mut() {
                if t.as_mut().poll(cx).is_pending() {
                    return false;
                }
            }
            let now = crate::clock::tokio_instant();
            let last_read = self.last_read;
            let written = self.written();
            let shared = self.shared.clone();
            let mut st = shared.state.lock();
            let mut expired = Vec::new();
            let mut next = None;
            let mut silent = false;
            for (id, s) in st.streams.iter_mut() {
                if s.done.is_some() {
                    continue;
                }
                if s.deadline <= now {
                    if s.opened > last_read {
                        silent = true;
                        break;
                    }
                    s.finish(Err(ConnError::Timeout("WNS request")));
                    expired.push(id);
                } else {
                    next = Some(s.deadline);
                    break;
                }
            }
            if silent {
                tracing::debug!("WNS h2 connection silent past a request deadline: closing it");
                st.fail_all(
                    ConnError::Lost(
                        "the connection went silent: no frame from the server within the request timeout"
                            .into(),
                    ),
                    written,
                );
                st.goaway(0, NO_ERROR);
                self.timer = None;
                return true;
            }
            if !expired.is_empty() {
                for id in expired {
                    st.rst(id, CANCEL);
                }
                st.wake_io();
            }
            drop(st);
            match next {
                Some(at) => match self.timer.as_mut() {
                    Some(t) => t.as_mut().reset(at),
                    None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
                },
                None => {
                    self.timer = None;
                    return false;
                }
            }
        }
    }

    /// Writes what is left and shuts the socket down; resolves with
    /// `result` when done, when the socket fails, or at the close timer.
    fn poll_close(
        &mut self,
        cx: &mut Context<'_>,
        result: Result<(), ConnError>,
    ) -> Poll<Result<(), ConnError>> {
        if let Some(t) = self.timer.as_mut() {
            if t.as_mut().poll(cx).is_ready() {
                return Poll::Ready(result);
            }
        }
        match self.poll_write_out(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(_)) => return Poll::Ready(result),
            Poll::Ready(Ok(())) => {}
        }
        match Pin::new(&mut self.io).poll_shutdown(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(result),
        }
    }

    /// True when nothing can happen on this connection any more.
    fn finished(&self) -> bool {
        let st = self.shared.state.lock();
        let idle_end = (st.released || st.closed.is_some()) && st.streams.open == 0;
        idle_end && st.out.is_empty() && self.wpos == self.wbuf.len()
    }
}

fn protocol(what: &str) -> Fatal {
    Fatal(PROTOCOL_ERROR, ConnError::Protocol(what.to_owned()))
}

/// A frame's payload without its padding.
fn unpad(p: &[u8], flags: u8) -> Result<&[u8], Fatal> {
    if flags & PADDED == 0 {
        return Ok(p);
    }
    let pad = *p.first().ok_or_else(|| protocol("empty padded frame"))? as usize;
    if pad + 1 > p.len() {
        return Err(protocol("padding longer than the frame"));
    }
    Ok(&p[1..p.len() - pad])
}

/// The answer headers a caller reads (the WNS status and diagnostics,
/// the back-off hints, the challenge of a 401); the rest are dropped as
/// they are decoded, so an answer costs no allocation for them.
fn kept(name: &[u8]) -> Option<HeaderName> {
    use crate::core::wns::headers::*;
    use http::header::{CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
    Some(match name {
        b"x-wns-status" => X_WNS_STATUS,
        b"x-wns-notificationstatus" => X_WNS_NOTIFICATION_STATUS,
        b"x-wns-msg-id" => X_WNS_MSG_ID,
        b"x-wns-debug-trace" => X_WNS_DEBUG_TRACE,
        b"x-wns-error-description" => X_WNS_ERROR_DESCRIPTION,
        b"x-wns-deviceconnectionstatus" => X_WNS_DEVICE_CONNECTION_STATUS,
        b"x-wns-continue-after" => X_WNS_CONTINUE_AFTER,
        b"ms-cv" => MS_CV,
        b"retry-after" => RETRY_AFTER,
        b"www-authenticate" => WWW_AUTHENTICATE,
        b"content-type" => CONTENT_TYPE,
        _ => return None,
    })
}

/// A kept answer header's value: one of the usual WNS values, or where it
/// is in the answer's value buffer.
enum Kept {
    Known(HeaderValue),
    At(usize, usize),
}

/// The values WNS status headers usually carry, without allocating.
fn known_value(v: &[u8]) -> Option<HeaderValue> {
    Some(HeaderValue::from_static(match v {
        b"received" => "received",
        b"dropped" => "dropped",
        b"channelthrottled" => "channelthrottled",
        b"connected" => "connected",
        b"disconnected" => "disconnected",
        b"tempconnected" => "tempconnected",
        _ => return None,
    }))
}

/// The answer ended: hand the status and headers to the caller.
fn finish_answer(s: &mut Stream) {
    match s.status {
        Some(status) => {
            let headers = std::mem::take(&mut s.headers);
            s.finish(Ok(Reply {
                status,
                headers,
                body: Bytes::new(),
            }));
        }
        None => s.finish(Err(ConnError::Protocol(
            "stream ended without an answer".into(),
        ))),
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Future for Connection<IO> {
    type Output = Result<(), ConnError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        {
            let mut st = this.shared.state.lock();
            match &st.io_waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => st.io_waker = Some(cx.waker().clone()),
            }
        }
        if let Some(result) = &this.closing {
            let result = result.clone();
            return this.poll_close(cx, result);
        }
        loop {
            // Reads first: they may queue acknowledgements to write.
            let mut progressed = false;
            if !this.eof {
                match this.poll_read_in(cx) {
                    Poll::Ready(Ok(true)) => {
                        progressed = true;
                        if let Err(Fatal(code, e)) = this.dispatch() {
                            tracing::debug!(error = %e, "WNS h2 connection error");
                            this.fail(code, e);
                            this.eof = true;
                        }
                    }
                    Poll::Ready(Ok(false)) => {
                        let written = this.written();
                        this.shared.state.lock().fail_all(
                            ConnError::Lost("the server closed the connection".into()),
                            written,
                        );
                    }
                    Poll::Ready(Err(e)) => {
                        this.eof = true;
                        let written = this.written();
                        this.shared
                            .state
                            .lock()
                            .fail_all(ConnError::Lost(e.to_string()), written);
                    }
                    Poll::Pending => {}
                }
            }
            match this.poll_write_out(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => {
                    let e = ConnError::Lost(e.to_string());
                    let written = this.written();
                    this.shared.state.lock().fail_all(e.clone(), written);
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => {}
            }
            if this.eof || this.finished() {
                let closed = this.shared.state.lock().closed.clone();
                if !this.eof {
                    // Released with nothing open: say goodbye politely.
                    let mut st = this.shared.state.lock();
                    if st.closed.is_none() {
                        st.closed = Some(ConnError::Lost("connection closed".into()));
                    }
                    st.goaway(0, NO_ERROR);
                    drop(st);
                    this.eof = true;
                }
                let result = match closed {
                    Some(ConnError::Protocol(e)) => Err(ConnError::Protocol(e)),
                    _ => Ok(()),
                };
                // Deliver what is queued (our GOAWAY) and close, within
                // a bound: a peer that stops reading cannot keep us.
                this.closing = Some(result.clone());
                this.timer = Some(Box::pin(tokio::time::sleep(H2_CLOSE_WITHIN)));
                return this.poll_close(cx, result);
            }
            if (this.timer.is_none() || !progressed) && this.poll_deadlines(cx) {
                this.eof = true;
                continue;
            }
            if !progressed {
                return Poll::Pending;
            }
        }
    }
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
