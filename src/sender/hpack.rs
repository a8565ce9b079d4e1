//! HPACK (RFC 7541) for the sender's own HTTP/2 client: a decoder for the
//! answers WNS sends (static and dynamic table, Huffman strings) and an
//! encoder for the requests we send.
//!
//! The encoder indexes the header fields that repeat on every wake (the
//! authority, the access token, the WNS headers), so after a connection's
//! first request each of them costs a byte or two; a field whose value is
//! marked sensitive (the per-request `MS-CV`) is sent as never-indexed,
//! and the `:path` (a channel, different on every request) is a literal
//! that is never indexed. Strings are sent as plain literals: Huffman
//! coding would save a quarter of the path's bytes at more CPU than the
//! TLS record of those bytes costs.

use std::collections::VecDeque;
use std::sync::OnceLock;

/// Why a header block could not be decoded. Any of these is a connection
/// error (COMPRESSION_ERROR): the two sides' tables no longer agree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    #[error("header block truncated")]
    Truncated,
    #[error("integer too large")]
    Overflow,
    #[error("index {0} is in neither table")]
    BadIndex(usize),
    #[error("invalid Huffman string")]
    Huffman,
    #[error("table size update to {0} exceeds the allowed {1}")]
    TableSize(usize, usize),
    #[error("table size update after the first field")]
    LateSizeUpdate,
    #[error("header list larger than {0} bytes")]
    ListTooLarge(usize),
}

/// The size HPACK counts for one entry (RFC 7541 section 4.1).
fn entry_size(name: &[u8], value: &[u8]) -> usize {
    name.len() + value.len() + 32
}

/// The default and our advertised SETTINGS_HEADER_TABLE_SIZE.
pub const DEFAULT_TABLE_SIZE: usize = 4096;

/// A dynamic table entry: name and value.
type Entry = (Box<[u8]>, Box<[u8]>);

/// A dynamic table: newest entry first (HPACK index 62).
#[derive(Default)]
struct Table {
    entries: VecDeque<Entry>,
    size: usize,
    max: usize,
}

impl Table {
    fn new(max: usize) -> Table {
        Table {
            entries: VecDeque::new(),
            size: 0,
            max,
        }
    }

    fn evict_to(&mut self, limit: usize) {
        while self.size > limit {
            match self.entries.pop_back() {
                Some((n, v)) => self.size -= entry_size(&n, &v),
                None => break,
            }
        }
    }

    fn set_max(&mut self, max: usize) {
        self.max = max;
        self.evict_to(max);
    }

    /// Inserts an entry; one larger than the whole table empties it.
    fn insert(&mut self, name: &[u8], value: &[u8]) {
        let size = entry_size(name, value);
        if size > self.max {
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.evict_to(self.max - size);
        self.entries.push_front((name.into(), value.into()));
        self.size += size;
    }

    fn get(&self, index: usize) -> Option<(&[u8], &[u8])> {
        if index == 0 {
            return None;
        }
        if index <= STATIC.len() {
            return Some(STATIC[index - 1]);
        }
        self.entries
            .get(index - STATIC.len() - 1)
            .map(|(n, v)| (&n[..], &v[..]))
    }
}

/// Reads an HPACK integer with an `n`-bit prefix from `buf[*pos..]`.
fn read_int(buf: &[u8], pos: &mut usize, n: u8) -> Result<usize, HpackError> {
    let mask = (1u16 << n) as usize - 1;
    let first = *buf.get(*pos).ok_or(HpackError::Truncated)? as usize & mask;
    *pos += 1;
    if first < mask {
        return Ok(first);
    }
    let mut value = mask;
    let mut shift = 0u32;
    loop {
        let b = *buf.get(*pos).ok_or(HpackError::Truncated)?;
        *pos += 1;
        if shift > 28 {
            return Err(HpackError::Overflow);
        }
        value += ((b & 0x7f) as usize) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
}

/// Writes an HPACK integer with an `n`-bit prefix, `flags` in the bits
/// above the prefix of the first byte.
pub fn write_int(out: &mut Vec<u8>, flags: u8, n: u8, mut value: usize) {
    let mask = (1usize << n) - 1;
    if value < mask {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | mask as u8);
    value -= mask;
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Decodes the header blocks of one connection, in order.
pub struct Decoder {
    table: Table,
    /// The most a size update may ask for: what we advertised.
    allowed: usize,
    /// Largest decoded header list accepted (names + values + 32 each).
    max_list: usize,
    name: Vec<u8>,
    value: Vec<u8>,
}

/// Where a literal's string ended up: in the input, or decoded into one
/// of the decoder's scratch buffers.
#[derive(Clone, Copy)]
enum Str {
    Input(usize, usize),
    Scratch,
}

impl Decoder {
    pub fn new(max_list: usize) -> Decoder {
        Decoder {
            table: Table::new(DEFAULT_TABLE_SIZE),
            allowed: DEFAULT_TABLE_SIZE,
            max_list,
            name: Vec::new(),
            value: Vec::new(),
        }
    }

    /// Decodes one whole header block, calling `field` with each name and
    /// value in order.
    pub fn decode(
        &mut self,
        block: &[u8],
        mut field: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), HpackError> {
        let mut pos = 0;
        let mut list = 0usize;
        let mut seen_field = false;
        while pos < block.len() {
            let b = block[pos];
            if b & 0x80 != 0 {
                let index = read_int(block, &mut pos, 7)?;
                let (n, v) = self.table.get(index).ok_or(HpackError::BadIndex(index))?;
                list += entry_size(n, v);
                if list > self.max_list {
                    return Err(HpackError::ListTooLarge(self.max_list));
                }
                field(n, v);
                seen_field = true;
                continue;
            }
            if b & 0xe0 == 0x20 {
                if seen_field {
                    return Err(HpackError::LateSizeUpdate);
                }
                let size = read_int(block, &mut pos, 5)?;
                if size > self.allowed {
                    return Err(HpackError::TableSize(size, self.allowed));
                }
                self.table.set_max(size);
                continue;
            }
            // A literal: with incremental indexing (01), without (0000) or
            // never indexed (0001).
            let (prefix, indexing) = if b & 0xc0 == 0x40 {
                (6, true)
            } else {
                (4, false)
            };
            let index = read_int(block, &mut pos, prefix)?;
            let name = if index == 0 {
                Some(read_str(block, &mut pos, &mut self.name)?)
            } else {
                let (n, _) = self.table.get(index).ok_or(HpackError::BadIndex(index))?;
                self.name.clear();
                self.name.extend_from_slice(n);
                None
            };
            let value = read_str(block, &mut pos, &mut self.value)?;
            let n = match name {
                Some(Str::Input(a, z)) => &block[a..z],
                _ => &self.name[..],
            };
            let v = match value {
                Str::Input(a, z) => &block[a..z],
                Str::Scratch => &self.value[..],
            };
            list += entry_size(n, v);
            if list > self.max_list {
                return Err(HpackError::ListTooLarge(self.max_list));
            }
            field(n, v);
            seen_field = true;
            if indexing {
                self.table.insert(n, v);
            }
        }
        Ok(())
    }
}

/// Reads a string literal: borrowed from `buf` when plain, Huffman-decoded
/// into `scratch` otherwise.
fn read_str(buf: &[u8], pos: &mut usize, scratch: &mut Vec<u8>) -> Result<Str, HpackError> {
    let huffman = *buf.get(*pos).ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = read_int(buf, pos, 7)?;
    let end = pos.checked_add(len).ok_or(HpackError::Truncated)?;
    if end > buf.len() {
        return Err(HpackError::Truncated);
    }
    let s = *pos;
    *pos = end;
    if !huffman {
        return Ok(Str::Input(s, end));
    }
    scratch.clear();
    huffman_decode(&buf[s..end], scratch)?;
    Ok(Str::Scratch)
}

/// Encodes one connection's request header blocks, in order.
pub struct Encoder {
    table: Table,
    /// The table size updates owed at the start of the next block: the
    /// smallest size the table had since the last block, and the size it
    /// has now (RFC 7541 section 4.2).
    pending_update: Option<SizeUpdate>,
}

/// Table size changes since the last header block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SizeUpdate {
    smallest: usize,
    last: usize,
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder {
            table: Table::new(DEFAULT_TABLE_SIZE),
            pending_update: None,
        }
    }
}

impl Encoder {
    /// Applies the peer's SETTINGS_HEADER_TABLE_SIZE. We never use more
    /// than the default, so only a smaller value changes anything.
    ///
    /// When it changes more than once before the next header block, that
    /// block signals the smallest size it went through first, then the
    /// last (RFC 7541 section 4.2): the peer's decoder evicts as ours did.
    pub fn set_peer_max(&mut self, peer: usize) {
        let max = peer.min(DEFAULT_TABLE_SIZE);
        if max == self.table.max {
            return;
        }
        // Evicting to each new size as it comes leaves the table as if it
        // had shrunk to the smallest one: what the peer does on reading
        // the two updates.
        self.table.set_max(max);
        self.pending_update = Some(match self.pending_update {
            Some(p) => SizeUpdate {
                smallest: p.smallest.min(max),
                last: max,
            },
            None => SizeUpdate {
                smallest: max,
                last: max,
            },
        });
    }

    /// Starts a header block: the size updates owed, if any.
    pub fn begin(&mut self, out: &mut Vec<u8>) {
        if let Some(u) = self.pending_update.take() {
            if u.smallest < u.last {
                write_int(out, 0x20, 5, u.smallest);
            }
            write_int(out, 0x20, 5, u.last);
        }
    }

    /// A field of the static table, by index.
    pub fn indexed_static(out: &mut Vec<u8>, index: usize) {
        write_int(out, 0x80, 7, index);
    }

    /// A field sent as is, never entered in any table (`never`: marked so
    /// that intermediaries do not index it either).
    pub fn literal(out: &mut Vec<u8>, name: &[u8], value: &[u8], never: bool) {
        let flags = if never { 0x10 } else { 0x00 };
        match static_name(name) {
            Some(i) => write_int(out, flags, 4, i),
            None => {
                out.push(flags);
                write_str(out, name);
            }
        }
        write_str(out, value);
    }

    /// A field that repeats: an index when the table has it, else a
    /// literal that enters it.
    pub fn indexed(&mut self, out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
        if let Some(pos) = self
            .table
            .entries
            .iter()
            .position(|(n, v)| &n[..] == name && &v[..] == value)
        {
            write_int(out, 0x80, 7, STATIC.len() + 1 + pos);
            return;
        }
        if entry_size(name, value) > self.table.max {
            Encoder::literal(out, name, value, false);
            return;
        }
        match static_name(name) {
            Some(i) => write_int(out, 0x40, 6, i),
            None => {
                out.push(0x40);
                write_str(out, name);
            }
        }
        write_str(out, value);
        self.table.insert(name, value);
    }
}

fn write_str(out: &mut Vec<u8>, s: &[u8]) {
    write_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// The static table index of a name, if it has one.
fn static_name(name: &[u8]) -> Option<usize> {
    STATIC.iter().position(|(n, _)| *n == name).map(|i| i + 1)
}

/// Huffman decoding as a state machine over nibbles: a state is an
/// internal node of the code tree, and each (state, nibble) entry says
/// where four more bits lead and which symbol, if any, they complete (no
/// code is shorter than five bits, so at most one). Two table lookups per
/// input byte.
struct Huffman {
    /// `next[state][nibble]`: the state after, the symbol completed
    /// (`NO_SYMBOL` if none), and `FAIL` if the bits reach EOS.
    next: Vec<[(u8, u16); 16]>,
    /// States where a string may end: the bits since the last symbol are
    /// all ones and fewer than eight (valid padding).
    accepting: Vec<bool>,
}

const NO_SYMBOL: u16 = 0xffff;
const FAIL: u16 = 0xfffe;

fn huffman() -> &'static Huffman {
    static H: OnceLock<Huffman> = OnceLock::new();
    H.get_or_init(|| {
        // The code tree: internal nodes, each child a node or a leaf.
        #[derive(Clone, Copy)]
        enum Child {
            Empty,
            Node(u8),
            Leaf(u16),
        }
        let mut children = vec![[Child::Empty; 2]];
        let mut accepting = vec![true];
        for (sym, &(code, len)) in HUFFMAN.iter().enumerate() {
            let mut node = 0usize;
            for i in (0..len).rev() {
                let bit = ((code >> i) & 1) as usize;
                if i == 0 {
                    children[node][bit] = Child::Leaf(sym as u16);
                    break;
                }
                node = match children[node][bit] {
                    Child::Node(n) => n as usize,
                    _ => {
                        let n = children.len();
                        children.push([Child::Empty; 2]);
                        // Depth len - i; all ones so far, under 8 bits.
                        let ones = code >> i == (1 << (len - i)) - 1;
                        accepting.push(ones && len - i < 8);
                        children[node][bit] = Child::Node(n as u8);
                        n
                    }
                };
            }
        }
        let next = (0..children.len())
            .map(|state| {
                let mut row = [(0u8, NO_SYMBOL); 16];
                for (nibble, entry) in row.iter_mut().enumerate() {
                    let (mut node, mut sym) = (state, NO_SYMBOL);
                    for i in (0..4).rev() {
                        match children[node][(nibble >> i) & 1] {
                            Child::Node(n) => node = n as usize,
                            Child::Leaf(256) | Child::Empty => {
                                sym = FAIL;
                                break;
                            }
                            Child::Leaf(s) => {
                                sym = s;
                                node = 0;
                            }
                        }
                    }
                    *entry = (node as u8, sym);
                }
                row
            })
            .collect();
        Huffman { next, accepting }
    })
}

/// Decodes a Huffman-coded string (RFC 7541 section 5.2) onto `out`.
pub fn huffman_decode(input: &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
    let h = huffman();
    let mut state = 0usize;
    out.reserve(input.len() * 8 / 5);
    for &b in input {
        for nibble in [b >> 4, b & 0xf] {
            let (next, sym) = h.next[state][nibble as usize];
            match sym {
                NO_SYMBOL => {}
                FAIL => return Err(HpackError::Huffman),
                s => out.push(s as u8),
            }
            state = next as usize;
        }
    }
    if h.accepting[state] {
        Ok(())
    } else {
        Err(HpackError::Huffman)
    }
}

/// The static table (RFC 7541 Appendix A); index 1 is the first entry.
static STATIC: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// The Huffman code (RFC 7541 Appendix B): code and length in bits, by
/// symbol; symbol 256 is EOS. The code is canonical, which the decoder
/// relies on (a test checks it).
static HUFFMAN: [(u32, u8); 257] = [
    (0x1ff8, 13),
    (0x7fffd8, 23),
    (0xfffffe2, 28),
    (0xfffffe3, 28),
    (0xfffffe4, 28),
    (0xfffffe5, 28),
    (0xfffffe6, 28),
    (0xfffffe7, 28),
    (0xfffffe8, 28),
    (0xffffea, 24),
    (0x3ffffffc, 30),
    (0xfffffe9, 28),
    (0xfffffea, 28),
    (0x3ffffffd, 30),
    (0xfffffeb, 28),
    (0xfffffec, 28),
    (0xfffffed, 28),
    (0xfffffee, 28),
    (0xfffffef, 28),
    (0xffffff0, 28),
    (0xffffff1, 28),
    (0xffffff2, 28),
    (0x3ffffffe, 30),
    (0xffffff3, 28),
    (0xffffff4, 28),
    (0xffffff5, 28),
    (0xffffff6, 28),
    (0xffffff7, 28),
    (0xffffff8, 28),
    (0xffffff9, 28),
    (0xffffffa, 28),
    (0xffffffb, 28),
    (0x14, 6),
    (0x3f8, 10),
    (0x3f9, 10),
    (0xffa, 12),
    (0x1ff9, 13),
    (0x15, 6),
    (0xf8, 8),
    (0x7fa, 11),
    (0x3fa, 10),
    (0x3fb, 10),
    (0xf9, 8),
    (0x7fb, 11),
    (0xfa, 8),
    (0x16, 6),
    (0x17, 6),
    (0x18, 6),
    (0x0, 5),
    (0x1, 5),
    (0x2, 5),
    (0x19, 6),
    (0x1a, 6),
    (0x1b, 6),
    (0x1c, 6),
    (0x1d, 6),
    (0x1e, 6),
    (0x1f, 6),
    (0x5c, 7),
    (0xfb, 8),
    (0x7ffc, 15),
    (0x20, 6),
    (0xffb, 12),
    (0x3fc, 10),
    (0x1ffa, 13),
    (0x21, 6),
    (0x5d, 7),
    (0x5e, 7),
    (0x5f, 7),
    (0x60, 7),
    (0x61, 7),
    (0x62, 7),
    (0x63, 7),
    (0x64, 7),
    (0x65, 7),
    (0x66, 7),
    (0x67, 7),
    (0x68, 7),
    (0x69, 7),
    (0x6a, 7),
    (0x6b, 7),
    (0x6c, 7),
    (0x6d, 7),
    (0x6e, 7),
    (0x6f, 7),
    (0x70, 7),
    (0x71, 7),
    (0x72, 7),
    (0xfc, 8),
    (0x73, 7),
    (0xfd, 8),
    (0x1ffb, 13),
    (0x7fff0, 19),
    (0x1ffc, 13),
    (0x3ffc, 14),
    (0x22, 6),
    (0x7ffd, 15),
    (0x3, 5),
    (0x23, 6),
    (0x4, 5),
    (0x24, 6),
    (0x5, 5),
    (0x25, 6),
    (0x26, 6),
    (0x27, 6),
    (0x6, 5),
    (0x74, 7),
    (0x75, 7),
    (0x28, 6),
    (0x29, 6),
    (0x2a, 6),
    (0x7, 5),
    (0x2b, 6),
    (0x76, 7),
    (0x2c, 6),
    (0x8, 5),
    (0x9, 5),
    (0x2d, 6),
    (0x77, 7),
    (0x78, 7),
    (0x79, 7),
    (0x7a, 7),
    (0x7b, 7),
    (0x7ffe, 15),
    (0x7fc, 11),
    (0x3ffd, 14),
    (0x1ffd, 13),
    (0xffffffc, 28),
    (0xfffe6, 20),
    (0x3fffd2, 22),
    (0xfffe7, 20),
    (0xfffe8, 20),
    (0x3fffd3, 22),
    (0x3fffd4, 22),
    (0x3fffd5, 22),
    (0x7fffd9, 23),
    (0x3fffd6, 22),
    (0x7fffda, 23),
    (0x7fffdb, 23),
    (0x7fffdc, 23),
    (0x7fffdd, 23),
    (0x7fffde, 23),
    (0xffffeb, 24),
    (0x7fffdf, 23),
    (0xffffec, 24),
    (0xffffed, 24),
    (0x3fffd7, 22),
    (0x7fffe0, 23),
    (0xffffee, 24),
    (0x7fffe1, 23),
    (0x7fffe2, 23),
    (0x7fffe3, 23),
    (0x7fffe4, 23),
    (0x1fffdc, 21),
    (0x3fffd8, 22),
    (0x7fffe5, 23),
    (0x3fffd9, 22),
    (0x7fffe6, 23),
    (0x7fffe7, 23),
    (0xffffef, 24),
    (0x3fffda, 22),
    (0x1fffdd, 21),
    (0xfffe9, 20),
    (0x3fffdb, 22),
    (0x3fffdc, 22),
    (0x7fffe8, 23),
    (0x7fffe9, 23),
    (0x1fffde, 21),
    (0x7fffea, 23),
    (0x3fffdd, 22),
    (0x3fffde, 22),
    (0xfffff0, 24),
    (0x1fffdf, 21),
    (0x3fffdf, 22),
    (0x7fffeb, 23),
    (0x7fffec, 23),
    (0x1fffe0, 21),
    (0x1fffe1, 21),
    (0x3fffe0, 22),
    (0x1fffe2, 21),
    (0x7fffed, 23),
    (0x3fffe1, 22),
    (0x7fffee, 23),
    (0x7fffef, 23),
    (0xfffea, 20),
    (0x3fffe2, 22),
    (0x3fffe3, 22),
    (0x3fffe4, 22),
    (0x7ffff0, 23),
    (0x3fffe5, 22),
    (0x3fffe6, 22),
    (0x7ffff1, 23),
    (0x3ffffe0, 26),
    (0x3ffffe1, 26),
    (0xfffeb, 20),
    (0x7fff1, 19),
    (0x3fffe7, 22),
    (0x7ffff2, 23),
    (0x3fffe8, 22),
    (0x1ffffec, 25),
    (0x3ffffe2, 26),
    (0x3ffffe3, 26),
    (0x3ffffe4, 26),
    (0x7ffffde, 27),
    (0x7ffffdf, 27),
    (0x3ffffe5, 26),
    (0xfffff1, 24),
    (0x1ffffed, 25),
    (0x7fff2, 19),
    (0x1fffe3, 21),
    (0x3ffffe6, 26),
    (0x7ffffe0, 27),
    (0x7ffffe1, 27),
    (0x3ffffe7, 26),
    (0x7ffffe2, 27),
    (0xfffff2, 24),
    (0x1fffe4, 21),
    (0x1fffe5, 21),
    (0x3ffffe8, 26),
    (0x3ffffe9, 26),
    (0xffffffd, 28),
    (0x7ffffe3, 27),
    (0x7ffffe4, 27),
    (0x7ffffe5, 27),
    (0xfffec, 20),
    (0xfffff3, 24),
    (0xfffed, 20),
    (0x1fffe6, 21),
    (0x3fffe9, 22),
    (0x1fffe7, 21),
    (0x1fffe8, 21),
    (0x7ffff3, 23),
    (0x3fffea, 22),
    (0x3fffeb, 22),
    (0x1ffffee, 25),
    (0x1ffffef, 25),
    (0xfffff4, 24),
    (0xfffff5, 24),
    (0x3ffffea, 26),
    (0x7ffff4, 23),
    (0x3ffffeb, 26),
    (0x7ffffe6, 27),
    (0x3ffffec, 26),
    (0x3ffffed, 26),
    (0x7ffffe7, 27),
    (0x7ffffe8, 27),
    (0x7ffffe9, 27),
    (0x7ffffea, 27),
    (0x7ffffeb, 27),
    (0xffffffe, 28),
    (0x7ffffec, 27),
    (0x7ffffed, 27),
    (0x7ffffee, 27),
    (0x7ffffef, 27),
    (0x7fffff0, 27),
    (0x3ffffee, 26),
    (0x3fffffff, 30),
];

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn decode_all(d: &mut Decoder, block: &[u8]) -> Vec<(String, String)> {
        let mut got = Vec::new();
        d.decode(block, |n, v| {
            got.push((
                String::from_utf8(n.to_vec()).unwrap(),
                String::from_utf8(v.to_vec()).unwrap(),
            ))
        })
        .unwrap();
        got
    }

    /// Test-only Huffman encoder, straight from the code table.
    fn huffman_encode(s: &[u8]) -> Vec<u8> {
        let (mut acc, mut n, mut out) = (0u64, 0u32, Vec::new());
        for &b in s {
            let (code, len) = HUFFMAN[b as usize];
            acc = (acc << len) | code as u64;
            n += len as u32;
            while n >= 8 {
                out.push((acc >> (n - 8)) as u8);
                n -= 8;
            }
        }
        if n > 0 {
            out.push(((acc << (8 - n)) as u8) | (0xff >> n));
        }
        out
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_huffman_code_is_canonical() {
        let mut order: Vec<usize> = (0..257).collect();
        order.sort_by_key(|&s| (HUFFMAN[s].1, s));
        for w in order.windows(2) {
            let ((a, la), (b, lb)) = (HUFFMAN[w[0]], HUFFMAN[w[1]]);
            assert_eq!(b, (a + 1) << (lb - la), "symbols {} and {}", w[0], w[1]);
        }
    }

    #[test]
    fn rfc7541_c4_requests_with_huffman_coding() {
        let mut d = Decoder::new(1 << 16);
        assert_eq!(
            decode_all(&mut d, &hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff")),
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ])
        );
        assert_eq!(
            decode_all(&mut d, &hex("8286 84be 5886 a8eb 1064 9cbf")),
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache")
            ])
        );
        assert_eq!(
            decode_all(
                &mut d,
                &hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf")
            ),
            pairs(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value")
            ])
        );
        assert_eq!(d.table.size, 164);
    }

    #[test]
    fn malformed_blocks_are_errors_not_panics() {
        let mut d = Decoder::new(1 << 16);
        // Index 0, an index past both tables, a truncated literal, EOS in
        // a Huffman string, bad padding, a size update above the limit.
        for block in [
            &[0x80][..],
            &[0xff, 0x00],
            &[0x40, 0x05, b'a'],
            &[0x00, 0x81, 0x00, 0x84, 0xff, 0xff, 0xff, 0xff],
            &[0x00, 0x81, 0x1f, 0x81, 0x00],
            &[0x3f, 0xe2, 0x1f],
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
        ] {
            assert!(d.decode(block, |_, _| {}).is_err(), "{block:02x?}");
        }
        let mut small = Decoder::new(40);
        assert_eq!(
            small.decode(&hex("8286"), |_, _| {}),
            Err(HpackError::ListTooLarge(40))
        );
    }

    #[test]
    fn encoder_blocks_decode_in_order_through_evictions() {
        let mut e = Encoder::default();
        let mut d = Decoder::new(1 << 16);
        // The peer allows a small table: the update is sent first and
        // entries are evicted on both sides alike.
        e.set_peer_max(200);
        for round in 0..50 {
            let mut out = Vec::new();
            e.begin(&mut out);
            Encoder::indexed_static(&mut out, 3);
            e.indexed(&mut out, b":authority", b"db5p.notify.windows.com");
            e.indexed(
                &mut out,
                b"authorization",
                format!("Bearer t{}", round / 7).as_bytes(),
            );
            e.indexed(&mut out, b"x-wns-type", b"wns/raw");
            Encoder::literal(
                &mut out,
                b":path",
                format!("/?token={round}").as_bytes(),
                false,
            );
            Encoder::literal(&mut out, b"ms-cv", b"abc.1", true);
            let got = decode_all(&mut d, &out);
            let path = format!("/?token={round}");
            let token = format!("Bearer t{}", round / 7);
            assert_eq!(
                got,
                pairs(&[
                    (":method", "POST"),
                    (":authority", "db5p.notify.windows.com"),
                    ("authorization", &token),
                    ("x-wns-type", "wns/raw"),
                    (":path", &path),
                    ("ms-cv", "abc.1"),
                ])
            );
            assert!(d.table.size <= 200 && e.table.size == d.table.size);
        }
    }

    /// The table size updates at the start of `block`.
    fn size_updates(block: &[u8]) -> Vec<usize> {
        let (mut pos, mut sizes) = (0, Vec::new());
        while pos < block.len() && block[pos] & 0xe0 == 0x20 {
            sizes.push(read_int(block, &mut pos, 5).unwrap());
        }
        sizes
    }

    /// A block of one repeated field (indexed once it entered the table)
    /// and one that enters the table on every call.
    fn some_block(e: &mut Encoder, round: usize) -> Vec<u8> {
        let mut out = Vec::new();
        e.begin(&mut out);
        e.indexed(&mut out, b":authority", b"db5.notify.windows.com");
        e.indexed(
            &mut out,
            b"authorization",
            format!("Bearer t{round}").as_bytes(),
        );
        out
    }

    fn entries(t: &Table) -> Vec<Entry> {
        t.entries.iter().cloned().collect()
    }

    #[test]
    fn a_size_that_went_down_and_up_again_signals_the_smallest_then_the_last() {
        let (mut e, mut d) = (Encoder::default(), Decoder::new(1 << 16));
        decode_all(&mut d, &some_block(&mut e, 0));
        assert_eq!(d.table.entries.len(), 2);
        // SETTINGS_HEADER_TABLE_SIZE 0, then 4096, before the next block.
        e.set_peer_max(0);
        e.set_peer_max(4096);
        let block = some_block(&mut e, 1);
        assert_eq!(size_updates(&block), [0, 4096]);
        let mut want = Vec::new();
        write_int(&mut want, 0x20, 5, 0);
        write_int(&mut want, 0x20, 5, 4096);
        assert_eq!(want, [0x20, 0x3f, 0xe1, 0x1f]);
        assert!(block.starts_with(&want));
        // The peer emptied its table as we did, then grew it back: both
        // hold only what this block entered.
        let got = decode_all(&mut d, &block);
        assert_eq!(got[1], ("authorization".into(), "Bearer t1".into()));
        assert_eq!(entries(&d.table), entries(&e.table));
        assert_eq!((d.table.max, e.table.max), (4096, 4096));
        assert_eq!(d.table.entries.len(), 2);
        // Owed once: the next block starts with a field.
        assert_eq!(size_updates(&some_block(&mut e, 2)), Vec::<usize>::new());
    }

    #[test]
    fn size_changes_signal_the_smallest_size_since_the_last_block_then_the_last() {
        let mut e = Encoder::default();
        // One change: one update.
        e.set_peer_max(100);
        assert_eq!(size_updates(&some_block(&mut e, 0)), [100]);
        // Down, up, down again: the smallest, then the last.
        e.set_peer_max(50);
        e.set_peer_max(4096);
        e.set_peer_max(3000);
        assert_eq!(size_updates(&some_block(&mut e, 1)), [50, 3000]);
        // Up twice: the smaller of the two, then the last, as nghttp2
        // signals it too.
        e.set_peer_max(3500);
        e.set_peer_max(4000);
        assert_eq!(size_updates(&some_block(&mut e, 2)), [3500, 4000]);
        e.set_peer_max(4096);
        assert_eq!(size_updates(&some_block(&mut e, 3)), [4096]);
        // Values at or above the size we use change nothing: no update.
        e.set_peer_max(65_536);
        e.set_peer_max(4096);
        assert_eq!(size_updates(&some_block(&mut e, 3)), Vec::<usize>::new());
        // A change and its reversal still owe both: the peer's table
        // went through the smaller size.
        e.set_peer_max(0);
        e.set_peer_max(4096);
        assert_eq!(size_updates(&some_block(&mut e, 4)), [0, 4096]);
    }

    proptest! {
        #[test]
        fn huffman_round_trips(s in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut out = Vec::new();
            huffman_decode(&huffman_encode(&s), &mut out).unwrap();
            prop_assert_eq!(out, s);
        }

        #[test]
        fn encoder_and_decoder_agree_through_any_size_changes(
            rounds in proptest::collection::vec(
                proptest::collection::vec(0usize..5000, 0..4), 1..20)
        ) {
            let (mut e, mut d) = (Encoder::default(), Decoder::new(1 << 16));
            for (round, sizes) in rounds.iter().enumerate() {
                let before = e.table.max;
                for &size in sizes {
                    e.set_peer_max(size);
                }
                let block = some_block(&mut e, round);
                let updates = size_updates(&block);
                let effective: Vec<usize> =
                    sizes.iter().map(|s| (*s).min(DEFAULT_TABLE_SIZE)).collect();
                let last = e.table.max;
                prop_assert!(updates.len() <= 2, "{:?}", updates);
                match effective.iter().copied().min() {
                    // The peer's table had to shrink: the smallest size
                    // first, and the last.
                    Some(min) if min < before => {
                        prop_assert_eq!(updates.first(), Some(&min));
                        prop_assert_eq!(updates.last(), Some(&last));
                    }
                    _ if last != before => prop_assert_eq!(updates.last(), Some(&last)),
                    _ => {}
                }
                decode_all(&mut d, &block);
                prop_assert_eq!(entries(&d.table), entries(&e.table));
                prop_assert_eq!(d.table.max, e.table.max);
            }
        }

        #[test]
        fn huffman_literals_decode(name in "[a-z-]{1,20}", value in "[ -~]{0,100}") {
            let mut block = vec![0x00];
            let (n, v) = (huffman_encode(name.as_bytes()), huffman_encode(value.as_bytes()));
            write_int(&mut block, 0x80, 7, n.len());
            block.extend_from_slice(&n);
            write_int(&mut block, 0x80, 7, v.len());
            block.extend_from_slice(&v);
            let mut d = Decoder::new(1 << 16);
            prop_assert_eq!(decode_all(&mut d, &block), vec![(name, value)]);
        }
    }
}
