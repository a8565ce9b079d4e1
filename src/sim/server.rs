//! Worker threads: each runs a current-thread tokio runtime with its own
//! SO_REUSEPORT listener, accepts connections, completes TLS, and hands
//! each connection to the h2 or HTTP/1.1 server by ALPN (or, in h2c mode,
//! by the client's first bytes).

use super::faults::Outage;
use super::server_h1;
use super::server_h2;
use super::state::{Shared, Worker};
use super::stats::ConnEvent;
use anyhow::Context;
use std::cell::Cell;
use std::os::fd::{AsFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio_rustls::TlsAcceptor;

/// Time allowed for a TLS handshake, the h2 preface and SETTINGS exchange,
/// or (h2c mode) the first bytes that tell h2 from HTTP/1.1.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (for example out of file descriptors).
pub(super) const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// On stop, how long open connections get to finish (h2 GOAWAY, HTTP/1.1
/// close after the current answer) before they are dropped.
pub const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);

/// The worker threads' run state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    /// Serving.
    Running,
    /// Stopping gracefully.
    Drain,
    /// Stopping at once.
    Now,
}

/// The running worker threads.
pub(crate) struct Workers {
    stop: watch::Sender<Stop>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Stops accepting and joins the threads. With [`Stop::Drain`], open
    /// connections first finish what they have taken (up to
    /// [`SHUTDOWN_DRAIN`]); with [`Stop::Now`] they are dropped at once.
    pub(super) fn stop(self, how: Stop) {
        let _ = self.stop.send(how);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Starts one worker thread per listener; returns once all are accepting.
pub(crate) fn spawn(
    listeners: Vec<std::net::TcpListener>,
    shared: Arc<Shared>,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> anyhow::Result<Workers> {
    let (stop_tx, stop_rx) = watch::channel(Stop::Running);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let count = listeners.len();
    let mut workers = Workers {
        stop: stop_tx,
        threads: Vec::with_capacity(count),
    };
    for (index, listener) in listeners.into_iter().enumerate() {
        let (shared, tls, stop, ready) = (
            shared.clone(),
            tls.clone(),
            stop_rx.clone(),
            ready_tx.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name(format!("wnsgate-sim-{index}"))
            .spawn(move || run_worker(index, listener, shared, tls, stop, ready));
        match spawned {
            Ok(t) => workers.threads.push(t),
            Err(e) => {
                workers.stop(Stop::Now);
                return Err(e).context("cannot start a simulator thread");
            }
        }
    }
    drop(ready_tx);
    for _ in 0..count {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                workers.stop(Stop::Now);
                anyhow::bail!("simulator thread failed to start: {e}");
            }
            Err(_) => {
                workers.stop(Stop::Now);
                anyhow::bail!("simulator thread exited during start");
            }
        }
    }
    Ok(workers)
}

fn run_worker(
    index: usize,
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut stop: watch::Receiver<Stop>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(e.to_string()));
                return;
            }
        };
        let worker = Rc::new(Worker::new(index, shared));
        let acceptor = tls.map(TlsAcceptor::from);
        let live = Rc::new(Live::default());
        let _ = ready.send(Ok(()));
        loop {
            tokio::select! {
                biased;
                r = stop.changed() => {
                    if r.is_err() || *stop.borrow() != Stop::Running {
                        break;
                    }
                }
                r = listener.accept() => match r {
                    Ok((tcp, _)) if worker.outage() == Some(Outage::Refuse) => {
                        // Refused: the close is a reset, before TLS.
                        worker.counters.conn(ConnEvent::OutageRefused);
                        let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
                        drop(tcp);
                    }
                    Ok((tcp, _)) => {
                        worker.counters.conn(ConnEvent::Accepted);
                        let ctl = ConnCtl::new(&tcp, stop.clone(), live.clone());
                        tokio::task::spawn_local(serve_connection(
                            tcp,
                            worker.clone(),
                            acceptor.clone(),
                            ctl,
                        ));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "simulator accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    }
                }
            }
        }
        drop(listener);
        if *stop.borrow() == Stop::Drain {
            let _ = tokio::time::timeout(SHUTDOWN_DRAIN, live.idle()).await;
        }
    });
    // Dropping the LocalSet here drops the connections still open.
}

/// Connections open on one worker thread.
#[derive(Default)]
struct Live {
    count: Cell<usize>,
    idle: Notify,
}

impl Live {
    /// Waits until no connection is open.
    async fn idle(&self) {
        while self.count.get() > 0 {
            self.idle.notified().await;
        }
    }
}

/// Per-connection control: a second handle on the socket, so the
/// connection can be ended with a TCP reset whatever layers (TLS, h2) own
/// the stream; the simulator's stop signal; and its place in the count of
/// open connections.
pub(crate) struct ConnCtl {
    fd: Option<OwnedFd>,
    stop: watch::Receiver<Stop>,
    live: Rc<Live>,
}

impl ConnCtl {
    fn new(tcp: &TcpStream, stop: watch::Receiver<Stop>, live: Rc<Live>) -> ConnCtl {
        live.count.set(live.count.get() + 1);
        ConnCtl {
            fd: tcp.as_fd().try_clone_to_owned().ok(),
            stop,
            live,
        }
    }

    /// Makes the coming close of the socket a reset (SO_LINGER 0): the peer
    /// sees the connection die with requests unanswered.
    pub(super) fn reset(&self) {
        if let Some(fd) = &self.fd {
            let _ = socket2::SockRef::from(fd).set_linger(Some(Duration::ZERO));
        }
    }

    /// Resolves when the simulator is stopping: time to retire the
    /// connection gracefully.
    pub(super) fn stopping(&self) -> impl std::future::Future<Output = ()> + 'static {
        let mut stop = self.stop.clone();
        async move {
            while *stop.borrow_and_update() == Stop::Running {
                if stop.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

impl Drop for ConnCtl {
    fn drop(&mut self) {
        let n = self.live.count.get() - 1;
        self.live.count.set(n);
        if n == 0 {
            self.live.idle.notify_waiters();
        }
    }
}

async fn serve_connection(tcp: TcpStream, w: Rc<Worker>, tls: Option<TlsAcceptor>, ctl: ConnCtl) {
    let _ = tcp.set_nodelay(true);
    match tls {
        Some(acceptor) => {
            let Ok(Ok(stream)) =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            else {
                return;
            };
            if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                server_h2::serve(stream, &w, &ctl).await;
            } else {
                server_h1::serve(stream, &w, &ctl).await;
            }
        }
        None => match starts_with_h2_preface(&tcp).await {
            Some(true) => server_h2::serve(tcp, &w, &ctl).await,
            Some(false) => server_h1::serve(tcp, &w, &ctl).await,
            None => {}
        },
    }
}

/// Whether a plain-text client starts with the h2 preface (prior
/// knowledge); `None` when it sends nothing in time.
async fn starts_with_h2_preface(tcp: &TcpStream) -> Option<bool> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0";
    let deadline = crate::clock::tokio_instant() + HANDSHAKE_TIMEOUT;
    let mut buf = [0u8; PREFACE.len()];
    loop {
        let n = tokio::time::timeout_at(deadline, tcp.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        if !PREFACE.starts_with(&buf[..n]) {
            return Some(false);
        }
        if n == PREFACE.len() {
            return Some(true);
        }
        // Part of the preface so far: peek returns at once while data is
        // waiting, so wait a little for the rest.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
