//! The io_uring backend: each shard thread runs tokio-uring, a current-thread
//! tokio runtime whose sockets do their reads, writes, accepts and connects
//! through an io_uring ring. hyper, h2, tokio-rustls and tokio timers keep
//! working inside it; sockets reach them through [`UringIo`], which
//! implements tokio's `AsyncRead`/`AsyncWrite` over tokio-uring's
//! owned-buffer operations.
//!
//! Owns: the probe, the shard runtime, the adapter, and the shard's local
//! task queue that lets any task of the shard open a (`!Send`) io_uring
//! socket. Everything else is shared with the epoll backend
//! ([`super::serve`], [`super::connect`]).

use super::serve::ConnServer;
use super::{NewHandler, OnConnect, ShardStart, Unavailable};
use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio_uring::buf::{BoundedBuf, Slice};
use tokio_uring::net::TcpStream;

use super::limits::{
    URING_LOCAL_JOBS_MAX, URING_PROBE_TIMEOUT, URING_READ_CHUNK_BYTES, URING_RING_ENTRIES,
    URING_WRITE_CHUNK_BYTES,
};

/// Sets up a ring and runs a no-op through it, on a thread of its own (a
/// ring whose submissions are blocked would otherwise hang the caller).
pub fn probe() -> Result<(), Unavailable> {
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("wnsgate-uring-probe".into())
        .spawn(move || {
            let result = tokio_uring::Runtime::new(&tokio_uring::builder())
                .and_then(|rt| rt.block_on(tokio_uring::no_op()));
            let _ = tx.send(result);
        });
    if let Err(e) = spawned {
        return Err(Unavailable(format!("cannot start the probe thread: {e}")));
    }
    match rx.recv_timeout(URING_PROBE_TIMEOUT) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Unavailable(explain(&e))),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(Unavailable(format!(
            "a no-op submitted to io_uring did not complete within {URING_PROBE_TIMEOUT:?}"
        ))),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(Unavailable(
            "the io_uring probe failed (tokio-uring panicked)".into(),
        )),
    }
}

/// Linux errno values the probe tells apart.
const EPERM: i32 = 1;
const ENOSYS: i32 = 38;

/// Says why setting up io_uring failed, in the terms an operator can act on.
fn explain(e: &io::Error) -> String {
    let sysctl = match std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        Ok(v) => format!("kernel.io_uring_disabled = {}", v.trim()),
        Err(_) => "kernel.io_uring_disabled is not readable".into(),
    };
    match e.raw_os_error() {
        Some(EPERM) => format!(
            "io_uring_setup was refused (EPERM; {sysctl}): a seccomp profile (containers' default one blocks io_uring) or the sysctl forbids it"
        ),
        Some(ENOSYS) => format!(
            "the kernel has no io_uring (ENOSYS: older than 5.1 or built without it, or a seccomp profile answers ENOSYS; {sysctl})"
        ),
        _ => format!("setting up io_uring failed: {e} ({sysctl})"),
    }
}

type LocalJob = Box<dyn FnOnce() + Send>;

thread_local! {
    /// Set on an io_uring shard's thread while its runtime runs.
    static LOCAL_JOBS: RefCell<Option<mpsc::Sender<LocalJob>>> = const { RefCell::new(None) };
}

/// True on the thread of a running io_uring shard.
pub fn on_uring_shard() -> bool {
    LOCAL_JOBS.with(|j| j.borrow().is_some())
}

/// Runs one shard until the shards stop serving, then drains its
/// connections.
pub(super) fn run_shard<N: NewHandler>(start: ShardStart<N>) {
    let index = start.index;
    let rt = match tokio_uring::Runtime::new(tokio_uring::builder().entries(URING_RING_ENTRIES)) {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(shard = index, error = %e, "cannot start the io_uring shard runtime");
            return;
        }
    };
    rt.block_on(async move {
        let (jobs, queue) = mpsc::channel(URING_LOCAL_JOBS_MAX);
        LOCAL_JOBS.with(|j| *j.borrow_mut() = Some(jobs));
        tokio_uring::spawn(run_local_jobs(queue));
        serve(start).await;
        LOCAL_JOBS.with(|j| *j.borrow_mut() = None);
    });
}

/// Runs socket-opening jobs sent by tasks that cannot spawn local tasks
/// themselves (tasks started with `tokio::spawn` run outside the local set).
async fn run_local_jobs(mut queue: mpsc::Receiver<LocalJob>) {
    while let Some(job) = queue.recv().await {
        job();
    }
}

async fn serve<N: NewHandler>(start: ShardStart<N>) {
    let ShardStart {
        index,
        listener,
        new_handler,
        options,
        mut phase,
        started,
    } = start;
    // io_uring accepts on a blocking socket by arming a poll; a
    // non-blocking one may answer EAGAIN instead.
    if let Err(e) = listener.set_nonblocking(false) {
        tracing::error!(shard = index, error = %e, "cannot prepare the listener");
        return;
    }
    let listener = tokio_uring::net::TcpListener::from_std(listener);
    let server = ConnServer::new(index, &*new_handler, options, started);
    server
        .accept_loop(
            &mut phase,
            || async {
                let (stream, _peer) = listener.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok(UringIo::new(stream))
            },
            |server, io| {
                tokio::task::spawn_local(server.connection(io));
            },
        )
        .await;
    drop(listener);
    server.drain(&mut phase).await;
}

/// Connects to the first of `addrs` that answers, on this shard's ring, and
/// runs `work` on the connection in the shard's local task set.
pub(super) async fn connect<W: OnConnect>(
    addrs: Vec<SocketAddr>,
    timeout: Duration,
    work: W,
) -> io::Result<W::Output> {
    let queue = LOCAL_JOBS
        .with(|j| j.borrow().clone())
        .ok_or_else(|| io::Error::other("not on an io_uring shard"))?;
    let (tx, rx) = oneshot::channel();
    let job: LocalJob = Box::new(move || {
        tokio::task::spawn_local(async move {
            let out = match dial(&addrs, timeout).await {
                Ok(stream) => Ok(work.uring(UringIo::new(stream)).await),
                Err(e) => Err(e),
            };
            let _ = tx.send(out);
        });
    });
    queue
        .send(job)
        .await
        .map_err(|_| io::Error::other("the shard is stopping"))?;
    rx.await
        .map_err(|_| io::Error::other("the shard stopped while connecting"))?
}

async fn dial(addrs: &[SocketAddr], timeout: Duration) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address to connect to");
    for &addr in addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => last = e,
            Err(_) => last = io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
        }
    }
    Err(last)
}

type WriteOp = tokio_uring::InFlightOneshot<
    tokio_uring::WriteData<Slice<Vec<u8>>>,
    tokio_uring::WriteTransform<Slice<Vec<u8>>>,
>;

/// One read into the connection's buffer. A named function, so that all
/// reads of a connection are futures of one type, kept in one box.
async fn read_op(stream: Rc<TcpStream>, buf: Vec<u8>) -> tokio_uring::BufResult<usize, Vec<u8>> {
    stream.read(buf).await
}

/// A tokio-uring TCP stream as a tokio `AsyncRead + AsyncWrite`.
///
/// Reads: one read of up to [`URING_READ_CHUNK_BYTES`] bytes is in flight at a time,
/// into a buffer the connection owns; what the caller cannot take yet stays
/// in the buffer for the next call. Writes are buffered: `poll_write`
/// copies up to [`URING_WRITE_CHUNK_BYTES`] bytes into the connection's write buffer,
/// submits the write and returns; the next write, `poll_flush` or
/// `poll_shutdown` first waits for it (re-submitting what a short write
/// left) and reports its error if it failed.
///
/// An operation in flight is kept across polls until it completes:
/// dropping a tokio-uring operation does not cancel it in the kernel, so
/// re-creating one per poll would lose data or hang. Buffers travel to the
/// kernel and back and are reused, never allocated per call; the read
/// future lives in a box allocated once per connection and refilled in
/// place for each read.
pub struct UringIo<R> {
    stream: Rc<TcpStream>,
    make_read: fn(Rc<TcpStream>, Vec<u8>) -> R,
    /// The read buffer while no read is in flight; `read_pos..len` is data
    /// not yet handed out.
    read_buf: Option<Vec<u8>>,
    read_pos: usize,
    read_op: Pin<Box<Option<R>>>,
    /// The write buffer while no write is in flight.
    write_buf: Option<Vec<u8>>,
    /// Bytes of the in-flight write's buffer already written.
    write_pos: usize,
    write_op: Option<WriteOp>,
}

impl UringIo<()> {
    /// Wraps a connected tokio-uring stream.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(
        stream: TcpStream,
    ) -> UringIo<impl Future<Output = tokio_uring::BufResult<usize, Vec<u8>>>> {
        UringIo::with_reader(stream, read_op)
    }
}

impl<R> UringIo<R>
where
    R: Future<Output = tokio_uring::BufResult<usize, Vec<u8>>>,
{
    fn with_reader(stream: TcpStream, make_read: fn(Rc<TcpStream>, Vec<u8>) -> R) -> Self {
        UringIo {
            stream: Rc::new(stream),
            make_read,
            read_buf: Some(Vec::with_capacity(URING_READ_CHUNK_BYTES)),
            read_pos: 0,
            read_op: Box::pin(None),
            write_buf: Some(Vec::new()),
            write_pos: 0,
            write_op: None,
        }
    }

    /// Drives the write in flight, if any, to completion, re-submitting
    /// the rest after a short write.
    fn poll_write_done(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(op) = self.write_op.as_mut() {
            let (res, slice) = ready!(Pin::new(op).poll(cx));
            self.write_op = None;
            let buf = slice.into_inner();
            match res {
                Ok(n) if n > 0 => {
                    self.write_pos += n;
                    if self.write_pos < buf.len() {
                        self.submit_write(buf);
                        continue;
                    }
                    self.return_write_buf(buf);
                }
                Ok(_) => {
                    self.return_write_buf(buf);
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Err(e) => {
                    self.return_write_buf(buf);
                    return Poll::Ready(Err(e));
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    fn return_write_buf(&mut self, mut buf: Vec<u8>) {
        buf.clear();
        self.write_pos = 0;
        self.write_buf = Some(buf);
    }

    fn submit_write(&mut self, buf: Vec<u8>) {
        let len = buf.len();
        self.write_op = Some(self.stream.write(buf.slice(self.write_pos..len)).submit());
    }

    /// Copies what fits of `bufs` into the write buffer and submits it.
    fn start_write(&mut self, cx: &mut Context<'_>, bufs: &[&[u8]]) -> Poll<io::Result<usize>> {
        ready!(self.poll_write_done(cx))?;
        let mut buf = self.write_buf.take().unwrap_or_default();
        for b in bufs {
            let room = URING_WRITE_CHUNK_BYTES - buf.len();
            if room == 0 {
                break;
            }
            buf.extend_from_slice(&b[..b.len().min(room)]);
        }
        let n = buf.len();
        if n == 0 {
            self.write_buf = Some(buf);
            return Poll::Ready(Ok(0));
        }
        self.write_pos = 0;
        self.submit_write(buf);
        // Poll once so the waker is registered and an error already known
        // surfaces; the bytes are accepted either way.
        if let Poll::Ready(Err(e)) = self.poll_write_done(cx) {
            // Nothing was reported written yet: report the error instead.
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }
}

impl<R> AsyncRead for UringIo<R>
where
    R: Future<Output = tokio_uring::BufResult<usize, Vec<u8>>>,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if let Some(buf) = this.read_buf.as_ref() {
                if this.read_pos < buf.len() {
                    let n = (buf.len() - this.read_pos).min(dst.remaining());
                    dst.put_slice(&buf[this.read_pos..this.read_pos + n]);
                    this.read_pos += n;
                    return Poll::Ready(Ok(()));
                }
            }
            if this.read_op.is_none() {
                let mut buf = this.read_buf.take().unwrap_or_default();
                buf.clear();
                buf.reserve(URING_READ_CHUNK_BYTES);
                this.read_pos = 0;
                let op = (this.make_read)(this.stream.clone(), buf);
                this.read_op.set(Some(op));
            }
            let op = this
                .read_op
                .as_mut()
                .as_pin_mut()
                .expect("a read is in flight");
            let (res, buf) = ready!(op.poll(cx));
            this.read_op.set(None);
            this.read_buf = Some(buf);
            match res {
                // End of stream: nothing added to `dst`.
                Ok(0) => return Poll::Ready(Ok(())),
                Ok(_) => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl<R> AsyncWrite for UringIo<R>
where
    R: Future<Output = tokio_uring::BufResult<usize, Vec<u8>>>,
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.start_write(cx, &[buf])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut slices: [&[u8]; 16] = [&[]; 16];
        let count = bufs.len().min(slices.len());
        for (s, b) in slices.iter_mut().zip(bufs) {
            *s = b;
        }
        self.start_write(cx, &slices[..count])
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_write_done(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_write_done(cx))?;
        match self.stream.shutdown(Shutdown::Write) {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(())),
        }
    }
}

impl<R> Drop for UringIo<R> {
    fn drop(&mut self) {
        // A read in flight holds the socket open until it completes, which
        // for an idle peer is never: shutting the read side down completes
        // it, so the socket closes once the operations in flight are done.
        if self.read_op.is_some() {
            let _ = self.stream.shutdown(Shutdown::Read);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Liveness bound for steps that would hang if the adapter lost an
    /// operation; not a performance figure.
    const HANG: Duration = Duration::from_secs(30);

    /// A connected pair of tokio-uring streams over loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = std_listener.local_addr().unwrap();
        let listener = tokio_uring::net::TcpListener::from_std(std_listener);
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    }

    #[test]
    fn probe_failures_are_explained() {
        let eperm = explain(&io::Error::from_raw_os_error(EPERM));
        assert!(eperm.contains("EPERM"), "{eperm}");
        assert!(eperm.contains("seccomp"), "{eperm}");
        assert!(eperm.contains("kernel.io_uring_disabled"), "{eperm}");
        let enosys = explain(&io::Error::from_raw_os_error(ENOSYS));
        assert!(enosys.contains("ENOSYS"), "{enosys}");
        let other = explain(&io::Error::from_raw_os_error(12));
        assert!(other.starts_with("setting up io_uring failed"), "{other}");
    }

    #[test]
    fn bytes_pass_through_unchanged_in_any_split() {
        tokio_uring::start(async {
            let (a, b) = pair().await;
            let (mut a, mut b) = (UringIo::new(a), UringIo::new(b));
            let data = pattern(3_000_000);
            let writer = async {
                let mut rest = &data[..];
                let mut size = 1;
                while !rest.is_empty() {
                    let n = size.min(rest.len());
                    if size % 3 == 0 {
                        // Vectored, split in two.
                        let (x, y) = rest[..n].split_at(n / 2);
                        let slices = [io::IoSlice::new(x), io::IoSlice::new(y)];
                        let written = a.write_vectored(&slices).await.unwrap();
                        rest = &rest[written..];
                    } else {
                        a.write_all(&rest[..n]).await.unwrap();
                        rest = &rest[n..];
                    }
                    size = size * 7 % 100_003 + 1;
                }
                a.shutdown().await.unwrap();
            };
            let reader = async {
                let mut got = Vec::with_capacity(data.len());
                let mut buf = vec![0u8; 777];
                loop {
                    let n = b.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break got;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
            };
            let ((), got) = tokio::time::timeout(HANG, async { tokio::join!(writer, reader) })
                .await
                .expect("the transfer finished");
            assert_eq!(got.len(), data.len());
            assert!(got == data, "bytes changed on the way");
        });
    }

    #[test]
    fn an_interrupted_read_keeps_its_operation_and_loses_nothing() {
        tokio_uring::start(async {
            let (a, b) = pair().await;
            let (mut a, mut b) = (UringIo::new(a), UringIo::new(b));
            let mut buf = [0u8; 64];
            // Give up on a read while nothing has arrived: its operation
            // stays in flight inside the adapter.
            let early = tokio::time::timeout(Duration::from_millis(20), b.read(&mut buf)).await;
            assert!(early.is_err(), "nothing was sent yet");
            a.write_all(b"first").await.unwrap();
            a.flush().await.unwrap();
            let n = tokio::time::timeout(HANG, b.read(&mut buf))
                .await
                .expect("the pending read completed")
                .unwrap();
            assert_eq!(&buf[..n], b"first");
            // Dropping the adapter with a read in flight closes the socket.
            let _ = tokio::time::timeout(Duration::from_millis(20), b.read(&mut buf)).await;
            drop(b);
            let n = tokio::time::timeout(HANG, a.read(&mut buf))
                .await
                .expect("the peer saw the close")
                .unwrap();
            assert_eq!(n, 0, "end of stream");
        });
    }
}
