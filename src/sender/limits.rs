//! The sender's limits, in one place, units last in their names. The
//! relations between them are checked when the crate compiles.

use std::time::Duration;

/// Connections one pool (one shard, one WNS authority) keeps open or
/// opening at once.
pub const POOL_CONNECTIONS_MAX: usize = 4;
/// Streams one HTTP/2 connection carries at once (the peer's
/// SETTINGS_MAX_CONCURRENT_STREAMS applies too).
pub const H2_STREAMS_PER_CONNECTION_MAX: usize = 100;
/// Opening a TCP connection.
pub const CONNECT_MS_MAX: u64 = 5_000;
/// The TLS handshake.
pub const TLS_HANDSHAKE_MS_MAX: u64 = 5_000;
/// From sending a request to its answer's head.
pub const REQUEST_MS_MAX: u64 = 15_000;
/// Times one push may be sent again because it got no answer (its stream
/// or connection died first), whether or not the server may have
/// processed it; these resends do not count as attempts.
pub const LOST_RESENDS_MAX: u32 = 5;
/// Largest answer body read on HTTP/1.1.
pub const H1_REPLY_BODY_BYTES_MAX: usize = 64 * 1024;
/// Our SETTINGS_INITIAL_WINDOW_SIZE: answers are small, but a peer must
/// never stall on us.
pub const H2_STREAM_WINDOW_BYTES: u32 = 1 << 20;
/// Our connection receive window.
pub const H2_CONNECTION_WINDOW_BYTES: u32 = 1 << 24;
/// The largest frame we accept (the protocol's default; we never raise it).
pub const H2_FRAME_BYTES_MAX: usize = 16_384;
/// Largest decoded header list of one answer.
pub const H2_HEADER_LIST_BYTES_MAX: usize = 64 * 1024;
/// Largest header block (all its CONTINUATIONs) we buffer.
pub const H2_HEADER_BLOCK_BYTES_MAX: usize = 64 * 1024;
/// Bytes of answer header values buffered at a time (many answers' worth).
pub const H2_VALUES_CHUNK_BYTES: usize = 16 * 1024;
/// Read buffer of one HTTP/2 connection.
pub const H2_READ_CHUNK_BYTES: usize = 64 * 1024;
/// How long a connection that ended may take to deliver its last frames
/// (a GOAWAY) before its socket is dropped.
pub const H2_CLOSE_MS_MAX: u64 = 5_000;

/// [`H2_CLOSE_MS_MAX`] as a duration.
pub const H2_CLOSE_WITHIN: Duration = Duration::from_millis(H2_CLOSE_MS_MAX);

const _: () = {
    assert!(H2_STREAM_WINDOW_BYTES <= H2_CONNECTION_WINDOW_BYTES);
    // RFC 9113 6.5.2: at least 16 KiB, at most 2^31 - 1.
    assert!(H2_STREAM_WINDOW_BYTES < 1 << 31 && H2_CONNECTION_WINDOW_BYTES < 1 << 31);
    assert!(H2_FRAME_BYTES_MAX == 16_384);
    // A whole frame fits the read buffer.
    assert!(H2_FRAME_BYTES_MAX + 9 <= H2_READ_CHUNK_BYTES);
    assert!(H2_HEADER_BLOCK_BYTES_MAX >= H2_FRAME_BYTES_MAX);
    // Opening a connection takes no longer than one request may.
    assert!(CONNECT_MS_MAX + TLS_HANDSHAKE_MS_MAX <= REQUEST_MS_MAX);
    assert!(POOL_CONNECTIONS_MAX >= 1 && H2_STREAMS_PER_CONNECTION_MAX >= 1);
};
