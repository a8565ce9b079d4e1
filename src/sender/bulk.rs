//! Many wakes driven by one task, without a future per wake: the path of
//! bulk wakes.
//!
//! A wake that can go out at once (its authority's circuit breaker closed,
//! the credential not paused, a valid token, a free HTTP/2 stream) is
//! encoded straight onto a connection with the batch's [`Sink`] and the
//! wake's slot as its tag. The connection reports the stream's end to the
//! sink; the batch takes the answer and judges it exactly as
//! [`WnsSender::wake`] does. Whatever needs waiting (a retry after a
//! back-off, the breaker, a token refresh, a resend after a lost
//! connection, a connection still to open, HTTP/1.1) goes on as an
//! ordinary wake future, so the rare paths have one implementation. Those
//! futures are polled by the batch's task among its other work: a wake
//! waiting for its retry holds up no other wake of the batch.

use super::conn::Protocol;
use super::pool::{AuthorityPool, H2Sent, TryLease};
use super::wake::{Step, Times, Tries, WakeReport, WnsSender};
use super::wire::Sink;
use crate::core::wns::request::{MAX_WAKE_HEADERS, WAKE_BODY};
use crate::core::wns::AccessToken;
use crate::core::{ChannelUri, UnixTime};
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::{HeaderName, HeaderValue};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

/// What a batch wakes: a device's channel URI and app.
pub trait WakeTarget: Send + 'static {
    fn uri(&self) -> &ChannelUri;
    fn pfn(&self) -> &str;
}

type Slow<T> = Pin<Box<dyn Future<Output = (T, WakeReport)> + Send>>;

/// A wake on the wire.
struct Flight<T> {
    target: T,
    pool: Arc<AuthorityPool>,
    sent: H2Sent,
    token: AccessToken,
    tries: Tries,
    /// When the wake started (and this request was sent).
    started: Instant,
}

/// The wakes one task drives: see the module documentation.
pub struct WakeBatch<T> {
    sender: Arc<WnsSender>,
    shard: usize,
    sink: Arc<Sink>,
    /// Wakes on the wire, by tag.
    flights: Vec<Option<Flight<T>>>,
    free: Vec<usize>,
    /// Tags the sink reported.
    ended: Vec<u64>,
    /// Wakes going on as futures.
    slow: FuturesUnordered<Slow<T>>,
    /// Final results not yet handed out.
    done: Vec<(T, WakeReport)>,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// The pool of the last wake's authority (a fleet mostly shares one).
    pool: Option<Arc<AuthorityPool>>,
}

impl<T: WakeTarget> WakeBatch<T> {
    /// An empty batch sending from `shard`'s connections.
    pub fn new(sender: Arc<WnsSender>, shard: usize) -> WakeBatch<T> {
        WakeBatch {
            sender,
            shard,
            sink: Sink::new(),
            flights: Vec::new(),
            free: Vec::new(),
            ended: Vec::new(),
            slow: FuturesUnordered::new(),
            done: Vec::new(),
            headers: Vec::with_capacity(MAX_WAKE_HEADERS),
            pool: None,
        }
    }

    /// Wakes started and not yet handed out by [`WakeBatch::finished`].
    pub fn len(&self) -> usize {
        self.flights.len() - self.free.len() + self.slow.len() + self.done.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts waking `target`. Gives it back when every HTTP/2 stream is
    /// taken while this batch has requests on the wire: start it again
    /// after [`WakeBatch::finished`] returned.
    pub fn start(&mut self, target: T) -> Result<(), T> {
        let started = crate::clock::instant();
        let sender = self.sender.clone();
        let Some(app) = sender.app(target.pfn()) else {
            sender.begun();
            self.go_slow(target, Tries::new(), None, started);
            return Ok(());
        };
        let uri = target.uri();
        let pool = match &self.pool {
            Some(p) if p.authority() == uri.host() => p.clone(),
            _ => {
                let p = sender.pool(self.shard, uri.host());
                self.pool = Some(p.clone());
                p
            }
        };
        let path = uri.path_and_query();
        let token = match sender.credential_wait(app) {
            None if pool.accepts(path) && pool.health().is_closed() => app.tokens.try_token(),
            _ => None,
        };
        let Some(token) = token else {
            // Paused, the breaker not closed, no token at hand, or a URI
            // the slow path refuses.
            sender.begun();
            self.go_slow(target, Tries::new(), None, started);
            return Ok(());
        };
        let lease = match pool.try_lease() {
            TryLease::Stream(lease) => lease,
            TryLease::Busy if self.on_wire() > 0 => return Err(target),
            TryLease::Busy | TryLease::Unavailable => {
                sender.begun();
                self.go_slow(target, Tries::new(), None, started);
                return Ok(());
            }
        };
        let body = Bytes::from_static(WAKE_BODY);
        sender.write_headers(&mut self.headers, &token, body.len());
        let slot = self.free.pop().unwrap_or(self.flights.len());
        let Some(sent) = lease.send(&pool, path, &self.headers, body, &self.sink, slot as u64)
        else {
            self.give_back(slot);
            sender.begun();
            self.go_slow(target, Tries::new(), None, started);
            return Ok(());
        };
        sender.begun();
        let flight = Flight {
            target,
            pool,
            sent,
            token,
            tries: Tries::new(),
            started,
        };
        if slot == self.flights.len() {
            self.flights.push(Some(flight));
        } else {
            self.flights[slot] = Some(flight);
        }
        Ok(())
    }

    /// Waits until at least one wake has its final result and moves the
    /// results into `out`; returns at once when the batch is empty.
    pub async fn finished(&mut self, out: &mut Vec<(T, WakeReport)>) {
        poll_fn(|cx| loop {
            if !self.done.is_empty() {
                out.append(&mut self.done);
                return Poll::Ready(());
            }
            if self.is_empty() {
                return Poll::Ready(());
            }
            let mut progressed = false;
            if self.on_wire() > 0 && self.sink.poll_ended(cx, &mut self.ended).is_ready() {
                progressed = true;
                let mut ended = std::mem::take(&mut self.ended);
                // One clock reading for all the answers a drain finds:
                // they came in the same read or so.
                let (got, at) = (crate::clock::instant(), crate::clock::now());
                for tag in ended.drain(..) {
                    self.answered(tag as usize, got, at);
                }
                self.ended = ended;
            }
            while let Poll::Ready(Some(r)) = self.slow.poll_next_unpin(cx) {
                progressed = true;
                self.done.push(r);
            }
            if !progressed {
                return Poll::Pending;
            }
        })
        .await
    }

    /// Requests of this batch on the wire.
    fn on_wire(&self) -> usize {
        self.flights.len() - self.free.len()
    }

    fn give_back(&mut self, slot: usize) {
        if slot < self.flights.len() {
            self.free.push(slot);
        }
    }

    /// The sink reported the request in `slot` by `got` (wall time `at`):
    /// judge its answer.
    fn answered(&mut self, slot: usize, got: Instant, at: UnixTime) {
        let Some(Some(mut flight)) = self.flights.get_mut(slot).map(Option::take) else {
            return;
        };
        let result = match flight.sent.sent.take() {
            Some(r) => r,
            None => {
                // Not ended after all: keep waiting for it.
                self.flights[slot] = Some(flight);
                return;
            }
        };
        self.free.push(slot);
        flight.pool.ended(&flight.sent, &result);
        let sender = self.sender.clone();
        let Some(app) = sender.app(flight.target.pfn()) else {
            // Not reached: the wake was sent with this app's token.
            return self.go_slow(flight.target, flight.tries, None, flight.started);
        };
        let mut answered = None;
        let times = Times {
            started: flight.started,
            sent: flight.started,
            got,
        };
        let step = sender.judge(
            app,
            flight.pool.health(),
            &mut flight.tries,
            &flight.token,
            result.map(|r| (r, Protocol::H2)),
            times,
            &mut answered,
            &|| at,
        );
        match step {
            Step::Done(report) => {
                let t = &flight.target;
                sender.finished(t.uri(), t.pfn(), &report, flight.started, answered);
                self.done.push((flight.target, report));
            }
            Step::Again(wait) => self.go_slow(flight.target, flight.tries, wait, flight.started),
        }
    }

    /// Goes on with a wake (counted in flight since `started`) as a future.
    fn go_slow(
        &mut self,
        target: T,
        tries: Tries,
        wait: Option<std::time::Duration>,
        started: Instant,
    ) {
        let (sender, shard) = (self.sender.clone(), self.shard);
        self.slow.push(Box::pin(async move {
            let report = sender
                .wake_on(shard, target.uri(), target.pfn(), tries, wait, started)
                .await;
            (target, report)
        }));
    }
}
