//! The h2 server, on the `h2` crate directly: each connection is one task
//! that accepts streams and polls their handlers itself (no task per
//! stream), so many streams share one wake-up and one flush.
//!
//! The h2 faults are applied here: outage windows (a connection reset
//! after reading a push, or a request reset unread), streams refused or
//! reset by code,
//! a small SETTINGS_INITIAL_WINDOW_SIZE (the crate opens a stream's window
//! again only as its handler reads the body), and header table size flips,
//! which the `h2` crate cannot send: a [`TableFlips`] layer between the
//! crate and the socket sends them and checks the client's answer.

use super::faults::{
    conn_action, flips_table_after, stream_action, ConnAction, Outage, StreamAction,
};
use super::server::{ConnCtl, HANDSHAKE_TIMEOUT};
use super::service::{self, BodySource, Head, Route};
use super::state::Worker;
use super::stats::ConnEvent;
use super::table_flips::{FlipCtl, TableFlips};
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Request, Response};
use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::rc::Rc;
use std::task::Poll;
use tokio::io::{AsyncRead, AsyncWrite};

/// Serves one h2 connection until it closes, is retired by GOAWAY, or is
/// reset by a fault.
pub(crate) async fn serve<T>(io: T, w: &Worker, ctl: &ConnCtl)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    w.counters.conn(ConnEvent::H2);
    let faults = w.faults();
    if faults.header_table_flip_every.is_some() {
        let flips = Rc::new(FlipCtl::new(w.counters.clone()));
        serve_h2(TableFlips::new(io, flips.clone()), w, ctl, Some(&flips)).await;
        if flips.violation.get() {
            ctl.reset();
        }
    } else {
        serve_h2(io, w, ctl, None).await;
    }
}

async fn serve_h2<T>(io: T, w: &Worker, ctl: &ConnCtl, flips: Option<&FlipCtl>)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut builder = h2::server::Builder::new();
    builder.max_concurrent_streams(w.shared.max_concurrent_streams);
    if let Some(window) = w.faults().h2_stream_window {
        builder.initial_window_size(window);
    }
    let Ok(Ok(mut conn)) =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, builder.handshake::<_, Bytes>(io)).await
    else {
        return;
    };
    // Set by a stream whose push an outage leaves unanswered: the
    // connection is then reset.
    let kill = Cell::new(false);
    let mut inflight = FuturesUnordered::new();
    let mut taken = 0u64;
    let mut goaway_sent = false;
    let mut stopping = std::pin::pin!(ctl.stopping());
    let mut draining = false;
    // One poll: take every stream that is ready, then run the handlers, and
    // drive the connection again only if some answered, so answers to many
    // streams leave in one write.
    let end = poll_fn(|cx| loop {
        if !draining && stopping.as_mut().poll(cx).is_ready() {
            draining = true;
            conn.graceful_shutdown();
        }
        loop {
            match conn.poll_accept(cx) {
                Poll::Ready(Some(Ok((req, mut respond)))) => {
                    taken += 1;
                    w.counters.conn(ConnEvent::Request);
                    if w.outage() == Some(Outage::Refuse) {
                        return Poll::Ready(End::Outage);
                    }
                    let faults = w.faults();
                    match conn_action(&faults, taken, goaway_sent) {
                        ConnAction::Reset => return Poll::Ready(End::Reset),
                        ConnAction::ServeThenGoAway => {
                            goaway_sent = true;
                            w.counters.conn(ConnEvent::GoAway);
                            conn.graceful_shutdown();
                        }
                        ConnAction::Serve => {}
                    }
                    if let Some(flips) = flips {
                        if flips_table_after(&faults, taken) {
                            w.counters.conn(ConnEvent::TableFlip);
                            flips.due.set(flips.due.get() + 1);
                        }
                    }
                    match stream_action(&faults, taken) {
                        StreamAction::Refuse => {
                            w.counters.conn(ConnEvent::StreamRefused);
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                        }
                        StreamAction::ServeThenReset => {
                            w.counters.conn(ConnEvent::StreamReset);
                            inflight.push(stream(w, req, respond, true, &kill));
                        }
                        StreamAction::Serve => inflight.push(stream(w, req, respond, false, &kill)),
                    }
                }
                // Closed, or a connection error: streams still in flight
                // die with it.
                Poll::Ready(_) => return Poll::Ready(End::Closed),
                Poll::Pending => break,
            }
        }
        let mut answered = false;
        while let Poll::Ready(Some(())) = inflight.poll_next_unpin(cx) {
            answered = true;
        }
        if kill.get() {
            return Poll::Ready(End::Outage);
        }
        if !answered {
            return Poll::Pending;
        }
    })
    .await;
    match end {
        End::Closed => {}
        End::Reset => {
            w.counters.conn(ConnEvent::Reset);
            ctl.reset();
        }
        End::Outage => {
            w.counters.conn(ConnEvent::OutageReset);
            ctl.reset();
        }
    }
}

/// Why a connection's loop ended.
#[derive(PartialEq, Eq)]
enum End {
    Closed,
    /// `reset_every`.
    Reset,
    /// An outage window.
    Outage,
}

/// Serves one stream; with `reset`, the answer is dropped and the stream
/// reset with INTERNAL_ERROR instead. A push read while `reset_window_ms`
/// is in force is left unanswered and sets `kill`: its connection is reset.
async fn stream(
    w: &Worker,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    reset: bool,
    kill: &Cell<bool>,
) {
    let (parts, body) = req.into_parts();
    let head = Head::new(&parts, false);
    let Some(reply) = service::serve(w, &head, &mut H2Body(body)).await else {
        return;
    };
    if service::route(head.path) == Route::Push && w.outage() == Some(Outage::ResetAfterRead) {
        w.counters.conn(ConnEvent::OutageUnanswered);
        kill.set(true);
        return;
    }
    if reset {
        respond.send_reset(h2::Reason::INTERNAL_ERROR);
        return;
    }
    let mut resp = Response::new(());
    *resp.status_mut() = reply.status;
    *resp.headers_mut() = reply.headers;
    if reply.body.is_empty() {
        let _ = respond.send_response(resp, true);
    } else if let Ok(mut send) = respond.send_response(resp, false) {
        let _ = send.send_data(reply.body, true);
    }
}

struct H2Body(RecvStream);

impl BodySource for H2Body {
    async fn chunk(&mut self) -> Option<Result<Bytes, ()>> {
        if self.0.is_end_stream() {
            return None;
        }
        match self.0.data().await? {
            Ok(b) => {
                let _ = self.0.flow_control().release_capacity(b.len());
                Some(Ok(b))
            }
            Err(_) => Some(Err(())),
        }
    }
}
