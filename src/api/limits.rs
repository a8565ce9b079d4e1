//! The API's limits, in one place, units last in their names. The
//! relations between them, and with the layers below, are checked when the
//! crate compiles.

use crate::store::committer::BATCH_MUTATIONS_DEFAULT;

/// How far in the future a registration's `issued_at` may be (clock
/// skew), seconds.
pub(crate) const CLOCK_SKEW_SECS_MAX: u32 = 300;
/// Largest page of `GET /v1/devices`.
pub(crate) const LIST_PAGE_DEVICES_MAX: usize = 1000;
/// Default page size of `GET /v1/devices`.
pub(crate) const LIST_PAGE_DEVICES_DEFAULT: usize = 100;
/// Records one listing request examines at most before it answers with a
/// cursor, so a rare state filter cannot turn one request into a full scan.
pub(crate) const LIST_PAGE_SCAN_RECORDS_MAX: usize = 20_000;
/// Registrations per store submission of an NDJSON import.
pub(crate) const IMPORT_CHUNK_LINES: usize = 1024;
/// Submissions of one import awaiting their sync at once.
pub(crate) const IMPORT_CHUNKS_INFLIGHT_MAX: usize = 8;
/// Longest NDJSON line, bytes.
pub(crate) const IMPORT_LINE_BYTES_MAX: usize = 16 * 1024;
/// Imports the gateway runs at once; more get 429. Each holds at most
/// `IMPORT_CHUNK_LINES * (IMPORT_CHUNKS_INFLIGHT_MAX + 1)` registrations in
/// memory.
pub(crate) const IMPORTS_RUNNING_MAX: usize = 4;
/// Line errors an import reports in its answer (all are counted).
pub(crate) const IMPORT_ERRORS_REPORTED_MAX: usize = 100;
/// Largest `POST /v1/pushes` body, bytes.
pub(crate) const JOB_BODY_BYTES_MAX: u64 = 8 * 1024 * 1024;
/// Largest `POST /v1/refresh:lease` batch, jobs.
pub(crate) const LEASE_JOBS_MAX: u32 = 1000;
/// Largest body of the refresh queue's calls, bytes.
pub(crate) const REFRESH_BODY_BYTES_MAX: u64 = 4096;

const _: () = {
    assert!(LIST_PAGE_DEVICES_DEFAULT <= LIST_PAGE_DEVICES_MAX);
    assert!(LIST_PAGE_DEVICES_MAX <= LIST_PAGE_SCAN_RECORDS_MAX);
    // One import chunk is applied and synced in one store batch.
    assert!(IMPORT_CHUNK_LINES <= BATCH_MUTATIONS_DEFAULT);
    assert!(IMPORT_ERRORS_REPORTED_MAX >= 1 && IMPORTS_RUNNING_MAX >= 1);
    assert!(IMPORT_CHUNKS_INFLIGHT_MAX >= 1);
};
