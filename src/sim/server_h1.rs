//! The HTTP/1.1 server, on hyper. Header names go out in title case
//! (`X-Wns-Status`), so clients that depend on the case of header names
//! fail here rather than against WNS.

use super::faults::{conn_action, ConnAction, Outage};
use super::server::ConnCtl;
use super::service::{self, BodySource, Head, Reply, Route};
use super::state::Worker;
use super::stats::ConnEvent;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::cell::Cell;
use std::convert::Infallible;
use std::rc::Rc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;

/// Time allowed for a client to send a request's headers.
pub(super) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Per-connection fault state.
#[derive(Default)]
struct ConnState {
    taken: Cell<u64>,
    goaway_sent: Cell<bool>,
    kill: Notify,
}

/// Serves one HTTP/1.1 connection until it closes or a fault resets it.
pub(crate) async fn serve<T>(io: T, w: &Rc<Worker>, ctl: &ConnCtl)
where
    T: AsyncRead + AsyncWrite + Unpin + 'static,
{
    w.counters.conn(ConnEvent::Http1);
    let state = Rc::new(ConnState::default());
    let svc = {
        let (w, state) = (w.clone(), state.clone());
        hyper::service::service_fn(move |req| {
            let (w, state) = (w.clone(), state.clone());
            async move { Ok::<_, Infallible>(answer(&w, &state, req).await) }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .title_case_headers(true)
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(io), svc);
    let mut conn = std::pin::pin!(conn);
    let mut stopping = std::pin::pin!(ctl.stopping());
    let mut draining = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = state.kill.notified() => return ctl.reset(),
            _ = stopping.as_mut(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

async fn answer(w: &Worker, state: &ConnState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let n = state.taken.get() + 1;
    state.taken.set(n);
    w.counters.conn(ConnEvent::Request);
    if w.outage() == Some(Outage::Refuse) {
        w.counters.conn(ConnEvent::OutageReset);
        state.kill.notify_one();
        return std::future::pending().await;
    }
    let action = conn_action(&w.faults(), n, state.goaway_sent.get());
    if action == ConnAction::Reset {
        w.counters.conn(ConnEvent::Reset);
        state.kill.notify_one();
        return std::future::pending().await;
    }
    let (parts, body) = req.into_parts();
    let head = Head::new(&parts, true);
    let reply = service::serve(w, &head, &mut H1Body(body))
        .await
        .unwrap_or_else(|| Reply::empty(StatusCode::BAD_REQUEST));
    if service::route(head.path) == Route::Push && w.outage() == Some(Outage::ResetAfterRead) {
        w.counters.conn(ConnEvent::OutageUnanswered);
        w.counters.conn(ConnEvent::OutageReset);
        state.kill.notify_one();
        return std::future::pending().await;
    }
    let mut resp = Response::new(Full::new(reply.body));
    *resp.status_mut() = reply.status;
    *resp.headers_mut() = reply.headers;
    if action == ConnAction::ServeThenGoAway {
        state.goaway_sent.set(true);
        w.counters.conn(ConnEvent::GoAway);
        resp.headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

struct H1Body(Incoming);

impl BodySource for H1Body {
    async fn chunk(&mut self) -> Option<Result<Bytes, ()>> {
        loop {
            match self.0.frame().await? {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        return Some(Ok(data));
                    }
                }
                Err(_) => return Some(Err(())),
            }
        }
    }
}
