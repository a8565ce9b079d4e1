//! The shards' limits, in one place, units last in their names. The
//! relations between them are checked when the crate compiles.

use std::time::Duration;

/// Pending connections per listener.
pub const LISTEN_BACKLOG_CONNECTIONS: i32 = 4096;
/// Most concurrent HTTP/2 streams a client may open on one connection.
pub const H2_STREAMS_PER_CONNECTION_MAX: u32 = 256;
/// How long the accept loop pauses after a failed accept (out of file
/// descriptors and the like) before trying again.
pub const ACCEPT_BACKOFF_MS: u64 = 50;
/// Submission queue entries of each io_uring shard's ring (the completion
/// queue gets twice as many).
pub const URING_RING_ENTRIES: u32 = 1024;
/// Bytes one io_uring read asks for; the buffer is owned by the connection
/// and reused for every read.
pub const URING_READ_CHUNK_BYTES: usize = 16 * 1024;
/// Most bytes one io_uring write takes from the caller; the buffer is
/// owned by the connection and reused for every write.
pub const URING_WRITE_CHUNK_BYTES: usize = 64 * 1024;
/// Socket-opening jobs waiting for an io_uring shard's local task set.
pub const URING_LOCAL_JOBS_MAX: usize = 1024;
/// How long the io_uring probe waits for its no-op to complete.
pub const URING_PROBE_MS_MAX: u64 = 2_000;

/// [`ACCEPT_BACKOFF_MS`] as a duration.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(ACCEPT_BACKOFF_MS);
/// [`URING_PROBE_MS_MAX`] as a duration.
pub const URING_PROBE_TIMEOUT: Duration = Duration::from_millis(URING_PROBE_MS_MAX);

const _: () = {
    assert!(LISTEN_BACKLOG_CONNECTIONS > 0);
    assert!(H2_STREAMS_PER_CONNECTION_MAX >= 1);
    // A ring is a power of two.
    assert!(URING_RING_ENTRIES.is_power_of_two());
    assert!(URING_READ_CHUNK_BYTES > 0 && URING_WRITE_CHUNK_BYTES > 0);
};
