//! The wake service's limits, in one place, units last in their names.
//! The relations between them are checked when the crate compiles.

/// Bulk wakes running at once; one more is refused (HTTP 429).
pub const JOBS_RUNNING_MAX: usize = 8;
/// Bulk wakes remembered for `GET /v1/pushes/{id}`, running or finished;
/// the oldest finished ones are forgotten first.
pub const JOBS_REMEMBERED_MAX: usize = 1000;
/// Device ids one bulk wake may list.
pub const JOB_IDS_MAX: usize = 100_000;
/// Failures (devices whose wake did not end `received`) one bulk wake
/// keeps for `GET /v1/pushes/{id}/failures`; later ones are only counted.
/// A kept failure is its device id and about 48 bytes more.
pub const JOB_FAILURES_KEPT_MAX: usize = 10_000;
/// Wakes one bulk wake keeps in flight.
pub const JOB_WAKES_INFLIGHT_MAX: usize = 2048;
/// Devices read from the registry per page.
pub const PAGE_DEVICES: usize = 1024;
/// Devices per batch a job hands a shard (a page is split into batches,
/// dealt to the shards in turn). A batch is also the unit of a job's
/// checkpoint: the shards work on neighbouring batches, so the devices
/// woken past a checkpoint's position are at most about one batch per
/// shard, beside what the checkpoint interval lets through.
pub const DEAL_DEVICES: usize = 128;
/// Records a page read may pass over while looking for devices in the
/// selected state, before it returns what it found.
pub const PAGE_SCAN_RECORDS_MAX: usize = PAGE_DEVICES * 16;
/// Batches of one job dealt but not yet taken up by a shard: the job reads
/// ahead of its senders by at most this many, whatever the number of
/// devices.
pub const BATCHES_AHEAD_MAX: usize = 32;
/// Devices waiting to be nudged; when full, the sweep offers the rest on
/// its next run.
pub const NUDGE_QUEUE_DEVICES_MAX: usize = 10_000;
const _: () = {
    assert!(JOBS_RUNNING_MAX <= JOBS_REMEMBERED_MAX);
    assert!(JOB_IDS_MAX >= PAGE_DEVICES);
    assert!(PAGE_SCAN_RECORDS_MAX >= PAGE_DEVICES);
    assert!(BATCHES_AHEAD_MAX >= 1);
    assert!(DEAL_DEVICES >= 1 && DEAL_DEVICES <= PAGE_DEVICES);
    // The in-flight permits are taken back all at once when a job ends.
    assert!(JOB_WAKES_INFLIGHT_MAX <= u32::MAX as usize);
    assert!(JOB_WAKES_INFLIGHT_MAX >= 1);
};
