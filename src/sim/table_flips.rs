//! Header table size flips for `header_table_flip_every`: a layer between
//! the `h2` crate and the socket that sends SETTINGS_HEADER_TABLE_SIZE 0,
//! then 4096, and checks that the client's next header block signals them
//! as RFC 7541 section 4.2 requires. The crate can send no SETTINGS after
//! its first, so the layer sends them itself and hides their
//! acknowledgements from the crate.

use super::stats::{ConnEvent, ThreadCounters};
use std::cell::Cell;
use std::collections::VecDeque;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the serve loop and a [`TableFlips`] layer share.
pub(super) struct FlipCtl {
    /// Flips asked for and not yet sent.
    pub(super) due: Cell<u32>,
    /// Set when the client's header block broke RFC 7541 section 4.2.
    pub(super) violation: Cell<bool>,
    /// Where the layer counts the header blocks it checked.
    counters: Arc<ThreadCounters>,
}

impl FlipCtl {
    pub(super) fn new(counters: Arc<ThreadCounters>) -> FlipCtl {
        FlipCtl {
            due: Cell::new(0),
            violation: Cell::new(false),
            counters,
        }
    }
}

/// Frame types and flags the layer looks at.
const SETTINGS: u8 = 0x4;
const HEADERS: u8 = 0x1;
const ACK: u8 = 0x1;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
const PREFACE_LEN: usize = 24;
/// The table sizes one flip announces, in order.
const FLIP_SIZES: [u32; 2] = [0, 4096];
/// Bytes the layer holds for the socket before it pushes back.
const FLIPS_OUT_BYTES_MAX: usize = 256 * 1024;

/// Whose SETTINGS frame an acknowledgement from the client answers.
enum SettingsFrom {
    Crate,
    /// Ours, announcing this header table size.
    Flip(u32),
}

/// The layer between the `h2` crate and the socket for
/// `header_table_flip_every`.
///
/// Outgoing: it follows the crate's frames and, at a frame boundary when
/// a flip is due, adds SETTINGS_HEADER_TABLE_SIZE 0 and 4096 (two
/// frames). Incoming: it drops the client's acknowledgements of those
/// (the crate would take them for its own) and checks the client's next
/// header block: after the client acknowledged a size below the one its
/// table had, that block must start with a size update no larger than the
/// smallest size acknowledged. A block that does not is a compression
/// error: the layer fails the connection (see [`FlipCtl::violation`]).
pub(super) struct TableFlips<T> {
    io: T,
    ctl: Rc<FlipCtl>,
    /// Outgoing bytes not yet written, and where the current frame ends
    /// in the crate's output (`out_head` collects a split frame head).
    out: Vec<u8>,
    out_head: Vec<u8>,
    out_left: usize,
    /// Settings frames sent, in order, not yet acknowledged.
    sent: VecDeque<SettingsFrom>,
    /// Incoming bytes not yet whole frames, and bytes checked and ready
    /// for the crate.
    raw: Vec<u8>,
    ready: Vec<u8>,
    preface_left: usize,
    eof: bool,
    /// The client's table size as its blocks last signalled it, and the
    /// smallest size it acknowledged since its last block.
    table: u32,
    smallest_acked: Option<u32>,
}

impl<T> TableFlips<T> {
    pub(super) fn new(io: T, ctl: Rc<FlipCtl>) -> TableFlips<T> {
        TableFlips {
            io,
            ctl,
            out: Vec::new(),
            out_head: Vec::with_capacity(9),
            out_left: 0,
            sent: VecDeque::new(),
            raw: Vec::new(),
            ready: Vec::new(),
            preface_left: PREFACE_LEN,
            eof: false,
            table: 4096,
            smallest_acked: None,
        }
    }

    /// Takes the crate's outgoing bytes, adding due flips at frame
    /// boundaries.
    fn take_out(&mut self, mut buf: &[u8]) {
        while !buf.is_empty() {
            if self.out_left == 0 && self.out_head.is_empty() {
                self.flip_if_due();
            }
            if self.out_left > 0 {
                let n = self.out_left.min(buf.len());
                self.out.extend_from_slice(&buf[..n]);
                self.out_left -= n;
                buf = &buf[n..];
                continue;
            }
            let n = (9 - self.out_head.len()).min(buf.len());
            self.out_head.extend_from_slice(&buf[..n]);
            self.out.extend_from_slice(&buf[..n]);
            buf = &buf[n..];
            if self.out_head.len() == 9 {
                let h = &self.out_head;
                self.out_left = (h[0] as usize) << 16 | (h[1] as usize) << 8 | h[2] as usize;
                if h[3] == SETTINGS && h[4] & ACK == 0 {
                    self.sent.push_back(SettingsFrom::Crate);
                }
                self.out_head.clear();
            }
        }
        if self.out_left == 0 && self.out_head.is_empty() {
            self.flip_if_due();
        }
    }

    fn flip_if_due(&mut self) {
        while self.ctl.due.get() > 0 {
            self.ctl.due.set(self.ctl.due.get() - 1);
            for size in FLIP_SIZES {
                self.out
                    .extend_from_slice(&[0, 0, 6, SETTINGS, 0, 0, 0, 0, 0]);
                self.out.extend_from_slice(&1u16.to_be_bytes());
                self.out.extend_from_slice(&size.to_be_bytes());
                self.sent.push_back(SettingsFrom::Flip(size));
            }
        }
    }

    /// Moves the whole frames in `raw` to `ready`, dropping the
    /// acknowledgements of our flips and checking header blocks. `false`
    /// on a compression error.
    fn check_in(&mut self) -> bool {
        let skip = self.preface_left.min(self.raw.len());
        self.ready.extend_from_slice(&self.raw[..skip]);
        self.raw.drain(..skip);
        self.preface_left -= skip;
        let mut at = 0;
        while self.raw.len() - at >= 9 {
            let h = &self.raw[at..at + 9];
            let len = (h[0] as usize) << 16 | (h[1] as usize) << 8 | h[2] as usize;
            if self.raw.len() - at < 9 + len {
                break;
            }
            let (kind, flags) = (h[3], h[4]);
            let end = at + 9 + len;
            let mut pass = true;
            if kind == SETTINGS && flags & ACK != 0 {
                if let Some(SettingsFrom::Flip(size)) = self.sent.pop_front() {
                    pass = false;
                    let smallest = self.smallest_acked.map_or(size, |s| s.min(size));
                    self.smallest_acked = Some(smallest);
                }
            } else if kind == HEADERS {
                let updates = block_size_updates(&self.raw[at + 9..end], flags);
                if !self.block_signals_flips(&updates) {
                    return false;
                }
            }
            if pass {
                self.ready.extend_from_slice(&self.raw[at..end]);
            }
            at = end;
        }
        self.raw.drain(..at);
        true
    }

    /// Checks the size updates a header block starts with against the
    /// sizes the client acknowledged since its last block.
    fn block_signals_flips(&mut self, updates: &[u32]) -> bool {
        if let Some(smallest) = self.smallest_acked.take() {
            if smallest < self.table {
                if updates.first().is_none_or(|&u| u > smallest) {
                    self.ctl.violation.set(true);
                    self.ctl.counters.conn(ConnEvent::TableSizeViolation);
                    return false;
                }
                self.ctl.counters.conn(ConnEvent::TableFlipSignalled);
            }
        }
        if let Some(&last) = updates.last() {
            self.table = last;
        }
        true
    }

    /// Writes what is held; `Ready(Ok)` once all of it is written.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>>
    where
        T: AsyncWrite + Unpin,
    {
        while !self.out.is_empty() {
            match Pin::new(&mut self.io).poll_write(cx, &self.out) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => {
                    self.out.drain(..n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// The table size updates at the start of a header block: `payload` of a
/// HEADERS frame with `flags` (its first fragment).
fn block_size_updates(payload: &[u8], flags: u8) -> Vec<u32> {
    let mut p = payload;
    if flags & PADDED != 0 {
        let Some((&pad, rest)) = p.split_first() else {
            return Vec::new();
        };
        p = &rest[..rest.len().saturating_sub(pad as usize)];
    }
    if flags & PRIORITY != 0 {
        p = p.get(5..).unwrap_or_default();
    }
    size_updates(p)
}

/// The table size updates at the start of a header block fragment.
fn size_updates(block: &[u8]) -> Vec<u32> {
    let mut sizes = Vec::new();
    let mut pos = 0;
    while let Some(&b) = block.get(pos) {
        if b & 0xe0 != 0x20 {
            break;
        }
        // A 5-bit prefix integer (RFC 7541 section 5.1).
        let mut value = u64::from(b & 0x1f);
        pos += 1;
        if value == 0x1f {
            let mut shift = 0;
            loop {
                let Some(&b) = block.get(pos) else {
                    return sizes;
                };
                pos += 1;
                value += u64::from(b & 0x7f) << shift;
                shift += 7;
                if b & 0x80 == 0 || shift > 28 {
                    break;
                }
            }
        }
        sizes.push(value.min(u64::from(u32::MAX)) as u32);
    }
    sizes
}

impl<T: AsyncRead + Unpin> AsyncRead for TableFlips<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.drain(..n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                if this.raw.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                // What is left is not a whole frame: the crate judges it.
                this.ready = std::mem::take(&mut this.raw);
                continue;
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.io).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    if rb.filled().is_empty() {
                        this.eof = true;
                    } else {
                        this.raw.extend_from_slice(rb.filled());
                        if !this.check_in() {
                            return Poll::Ready(Err(std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                "header table size change not signalled",
                            )));
                        }
                    }
                }
                other => return other,
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TableFlips<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        if this.out.len() >= FLIPS_OUT_BYTES_MAX {
            match this.poll_drain(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        this.take_out(buf);
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        // A flip asked for while the crate had nothing to write goes now.
        if this.out_left == 0 && this.out_head.is_empty() {
            this.flip_if_due();
        }
        match this.poll_drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.io).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        match this.poll_drain(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.io).poll_shutdown(cx),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn layer() -> TableFlips<tokio::io::Empty> {
        let counters = crate::sim::stats::Stats::new(false).register_thread();
        TableFlips::new(tokio::io::empty(), Rc::new(FlipCtl::new(counters)))
    }

    #[test]
    fn size_updates_are_read_from_the_start_of_a_block() {
        assert_eq!(size_updates(&[0x20, 0x3f, 0xe1, 0x1f, 0x82]), [0, 4096]);
        assert_eq!(size_updates(&[0x82, 0x20]), Vec::<u32>::new());
        assert_eq!(size_updates(&[0x3f]), Vec::<u32>::new());
    }

    #[test]
    fn flips_go_between_frames_and_their_acks_are_hidden_from_the_crate() {
        let mut l = layer();
        let settings = frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]);
        let data = frame(0, 0, 1, b"hello");
        // A flip asked for in the middle of a frame waits for its end.
        l.take_out(&settings[..4]);
        l.ctl.due.set(1);
        l.take_out(&settings[4..]);
        l.take_out(&data);
        let flip0 = frame(SETTINGS, 0, 0, &[0, 1, 0, 0, 0, 0]);
        let flip1 = frame(SETTINGS, 0, 0, &[0, 1, 0, 0, 16, 0]);
        assert_eq!(l.out, [settings, flip0, flip1, data].concat());
        // The client's acks: the crate's passes, ours do not.
        let mut incoming = vec![0u8; PREFACE_LEN];
        let ack = frame(SETTINGS, ACK, 0, &[]);
        for _ in 0..3 {
            incoming.extend_from_slice(&ack);
        }
        // The next block signals 0 then 4096: accepted.
        let good = frame(HEADERS, 0x4, 1, &[0x20, 0x3f, 0xe1, 0x1f, 0x82]);
        incoming.extend_from_slice(&good);
        l.raw = incoming;
        assert!(l.check_in());
        assert_eq!(l.ready, [vec![0u8; PREFACE_LEN], ack, good].concat());
        assert!(!l.ctl.violation.get());
    }

    #[test]
    fn a_block_that_signals_only_the_last_size_is_a_violation() {
        let mut l = layer();
        l.preface_left = 0;
        l.sent.push_back(SettingsFrom::Flip(0));
        l.sent.push_back(SettingsFrom::Flip(4096));
        let ack = frame(SETTINGS, ACK, 0, &[]);
        l.raw = [
            ack.clone(),
            ack,
            frame(HEADERS, 0x4, 1, &[0x3f, 0xe1, 0x1f, 0x82]),
        ]
        .concat();
        assert!(!l.check_in());
        assert!(l.ctl.violation.get());
    }
}
