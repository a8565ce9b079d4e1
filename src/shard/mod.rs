//! Shards: one thread per core, each with its own current-thread runtime and
//! its own listening socket on the shared address (SO_REUSEPORT), so the
//! kernel spreads connections across shards and nothing on the request path
//! crosses threads except the registry and the store's commit queue.
//!
//! Owns: threads, runtimes, listeners, connection serving and draining, and
//! the sockets the shard dials (WNS connections go through [`connect`], so
//! they ride the shard's backend too). The network backend is chosen per
//! process at start ([`choose_backend`]); each backend is one module
//! exposing `run_shard`, and both serve connections with [`serve`], so
//! adding one does not touch the API.
//!
//! Must not touch: the application. What a shard serves comes from the
//! composition root as a [`NewHandler`], which builds each shard's
//! [`Handler`] on that shard's runtime as the shard starts.

pub mod epoll;
pub mod limits;
pub mod listener;
pub mod serve;
#[cfg(feature = "io-uring")]
pub mod uring;

use crate::config::IoBackend;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

/// Every answer a handler gives has a fully buffered body.
pub type Response = http::Response<http_body_util::Full<bytes::Bytes>>;

/// What a shard runs for each request.
pub trait Handler: Clone + Send + Sync + 'static {
    /// Answers one request. Never fails: errors are answers too.
    fn call(
        &self,
        req: http::Request<hyper::body::Incoming>,
    ) -> impl Future<Output = Response> + Send + 'static + use<Self>;
}

/// Builds each shard's [`Handler`]: called once per shard, on that shard's
/// runtime, before the shard accepts a connection (a handler that hands
/// work to every shard may register the runtime then).
pub trait NewHandler: Send + Sync + 'static {
    type Handler: Handler;
    fn new_handler(&self, shard: usize) -> Self::Handler;
}

impl<F, H> NewHandler for F
where
    F: Fn(usize) -> H + Send + Sync + 'static,
    H: Handler,
{
    type Handler = H;

    fn new_handler(&self, shard: usize) -> H {
        self(shard)
    }
}

/// What every shard needs besides its handler.
#[derive(Debug, Clone, Copy)]
pub struct ShardOptions {
    /// A connection must send a request's first byte, and its headers,
    /// within this.
    pub request_timeout: Duration,
    /// How long [`ShardSet::drain`] lets open connections finish their
    /// requests.
    pub drain_connections: Duration,
}

/// Where the shards are in their life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Accepting and serving.
    Serving,
    /// Listeners closed; open connections still served.
    Closed,
    /// Open connections told to finish; the shards end once they have.
    Draining,
}

/// The backend `--io auto` runs when both are usable: the faster one in
/// `loadtest/io.sh` on this kind of machine (`docs/performance.md`, P6 and P7).
pub const AUTO_PREFERS: Backend = Backend::Epoll;

/// Environment variable that makes the io_uring probe fail as if the
/// kernel refused io_uring (value `fail`). A test hook: it lets the
/// fallback be tested on machines where io_uring works.
pub const PROBE_HOOK_ENV: &str = "WNSGATE_IO_URING_PROBE";

/// A network backend the shards can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Epoll,
    Uring,
}

impl Backend {
    /// The name shown in logs and in `wnsgate_build_info{io=...}`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Epoll => "epoll",
            Backend::Uring => "uring",
        }
    }
}

/// Why io_uring cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// Whether io_uring works here: sets up a ring and runs a no-op through it.
pub fn probe_uring() -> Result<(), Unavailable> {
    if std::env::var(PROBE_HOOK_ENV).as_deref() == Ok("fail") {
        return Err(Unavailable(format!(
            "the io_uring probe was told to fail ({PROBE_HOOK_ENV}=fail)"
        )));
    }
    #[cfg(feature = "io-uring")]
    {
        uring::probe()
    }
    #[cfg(not(feature = "io-uring"))]
    {
        Err(Unavailable(
            "this build has no io_uring backend (built without the `io-uring` feature)".into(),
        ))
    }
}

/// Resolves `--io`: `epoll` as asked; `uring` only if the probe passes
/// (the error says why not); `auto` the preferred backend when usable, with
/// the reason logged when io_uring is not.
pub fn choose_backend(requested: IoBackend) -> Result<Backend, Unavailable> {
    match requested {
        IoBackend::Epoll => Ok(Backend::Epoll),
        IoBackend::Uring => probe_uring().map(|()| Backend::Uring).map_err(|e| {
            Unavailable(format!(
                "--io uring: io_uring cannot be used: {e}; run with --io epoll or --io auto"
            ))
        }),
        IoBackend::Auto => match AUTO_PREFERS {
            Backend::Epoll => {
                // Still probed, so the log says whether uring was an option.
                match probe_uring() {
                    Ok(()) => tracing::info!(
                        "io_uring is usable; auto prefers epoll (faster in loadtest/io.sh)"
                    ),
                    Err(e) => tracing::info!(reason = %e, "io_uring is not usable"),
                }
                Ok(Backend::Epoll)
            }
            Backend::Uring => match probe_uring() {
                Ok(()) => Ok(Backend::Uring),
                Err(e) => {
                    tracing::warn!(reason = %e, "io_uring is not usable; falling back to epoll");
                    Ok(Backend::Epoll)
                }
            },
        },
    }
}

/// The backend of the calling thread: `Uring` on an io_uring shard's
/// thread, `Epoll` elsewhere (epoll shards, and threads that are no shard).
pub fn current_backend() -> Backend {
    #[cfg(feature = "io-uring")]
    if uring::on_uring_shard() {
        return Backend::Uring;
    }
    Backend::Epoll
}

/// Work to do on a freshly connected socket, written once for any socket
/// type (usually by calling one generic function from both methods) so the
/// same code runs over either backend.
pub trait OnConnect: Send + 'static {
    type Output: Send + 'static;

    /// Runs over a tokio socket (epoll backend), in the calling task.
    fn epoll(self, io: tokio::net::TcpStream) -> impl Future<Output = Self::Output> + Send;

    /// Runs over an io_uring socket behind the AsyncRead/AsyncWrite
    /// adapter. It runs on the shard's local task set, where `!Send`
    /// values may be held and tasks spawned with
    /// `tokio::task::spawn_local`.
    fn uring<IO>(self, io: IO) -> impl Future<Output = Self::Output>
    where
        IO: AsyncRead + AsyncWrite + Unpin + 'static;
}

/// Connects to `addr` (`host:port`) on the calling shard's backend, with
/// TCP_NODELAY, and runs `work` on the connection, returning its output.
/// Connecting is bounded by `timeout` (an error of kind `TimedOut`).
pub async fn connect<W: OnConnect>(
    addr: &str,
    timeout: Duration,
    work: W,
) -> std::io::Result<W::Output> {
    let addrs: Vec<SocketAddr> = tokio::time::timeout(timeout, tokio::net::lookup_host(addr))
        .await
        .map_err(|_| timed_out("resolve"))??
        .collect();
    if addrs.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{addr} resolves to no address"),
        ));
    }
    #[cfg(feature = "io-uring")]
    if uring::on_uring_shard() {
        return uring::connect(addrs, timeout, work).await;
    }
    let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&addrs[..]))
        .await
        .map_err(|_| timed_out("connect"))??;
    let _ = tcp.set_nodelay(true);
    Ok(work.epoll(tcp).await)
}

fn timed_out(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{what} timed out"))
}

/// Held by a shard thread while it starts. The shard reports [`done`]
/// once its runtime is registered with the gateway
/// ([`serve::ConnServer::new`]); a shard that fails to start drops it as
/// it gives up. [`Bound::start`] returns once every shard has done one
/// or the other.
///
/// [`done`]: Starting::done
pub struct Starting(std::sync::mpsc::Sender<()>);

impl Starting {
    /// The shard's runtime is registered.
    pub fn done(self) {
        let _ = self.0.send(());
    }
}

/// A shard's share of the start: its index, its listener, the handler
/// factory and options, the phase to follow, and the token to report done.
struct ShardStart<N> {
    index: usize,
    listener: std::net::TcpListener,
    new_handler: Arc<N>,
    options: ShardOptions,
    phase: watch::Receiver<Phase>,
    started: Starting,
}

/// A backend's `run_shard`: serves until the phase leaves
/// [`Phase::Serving`], then drains once it is [`Phase::Draining`].
type RunShard<N> = fn(ShardStart<N>);

/// The running shards.
pub struct ShardSet {
    threads: Vec<JoinHandle<()>>,
    phase: watch::Sender<Phase>,
    /// The address every shard listens on (the real port when 0 was asked).
    pub local_addr: SocketAddr,
}

impl ShardSet {
    /// Binds `count` listeners on `addr` (SO_REUSEPORT), for
    /// [`Bound::start`]: a process binds first, so an address in use is
    /// refused before anything else is opened or created.
    pub fn bind(addr: SocketAddr, count: usize) -> std::io::Result<Bound> {
        let listeners = listener::bind_reuseport(addr, count.max(1))?;
        let local_addr = listeners[0].local_addr()?;
        Ok(Bound {
            listeners,
            local_addr,
        })
    }
}

/// Listeners bound and not yet served.
pub struct Bound {
    listeners: Vec<std::net::TcpListener>,
    /// The address every listener listens on.
    pub local_addr: SocketAddr,
}

impl Bound {
    /// Starts one shard thread per listener, on `backend`. Returns once
    /// every shard has built its handler (or failed to start and logged
    /// why), so work handed to every shard after this reaches them all.
    pub fn start<N: NewHandler>(
        self,
        new_handler: Arc<N>,
        backend: Backend,
        options: ShardOptions,
    ) -> std::io::Result<ShardSet> {
        let Bound {
            listeners,
            local_addr,
        } = self;
        let (phase, phase_rx) = watch::channel(Phase::Serving);
        let (starting, started) = std::sync::mpsc::channel();
        let mut threads = Vec::with_capacity(listeners.len());
        for (i, l) in listeners.into_iter().enumerate() {
            let start = ShardStart {
                index: i,
                listener: l,
                new_handler: new_handler.clone(),
                options,
                phase: phase_rx.clone(),
                started: Starting(starting.clone()),
            };
            let run: RunShard<N> = match backend {
                Backend::Epoll => epoll::run_shard,
                #[cfg(feature = "io-uring")]
                Backend::Uring => uring::run_shard,
                #[cfg(not(feature = "io-uring"))]
                Backend::Uring => {
                    unreachable!("choose_backend never picks uring without the io-uring feature")
                }
            };
            let t = std::thread::Builder::new()
                .name(format!("wnsgate-shard-{i}"))
                .spawn(move || run(start))?;
            threads.push(t);
        }
        drop(starting);
        // Ends once every shard's token is gone: done, or dropped by a
        // shard that could not start.
        while started.recv().is_ok() {}
        Ok(ShardSet {
            threads,
            phase,
            local_addr,
        })
    }
}

impl ShardSet {
    /// Closes the listeners: new connections are refused, open ones are
    /// still served.
    pub fn stop_accepting(&self) {
        self.phase.send_if_modified(|p| {
            let serving = *p == Phase::Serving;
            if serving {
                *p = Phase::Closed;
            }
            serving
        });
    }

    /// Stops accepting, lets open connections finish their requests (up to
    /// [`ShardOptions::drain_connections`]), and joins the shard threads.
    pub fn drain(self) {
        let _ = self.phase.send(Phase::Draining);
        for t in self.threads {
            let _ = t.join();
        }
    }
}
