//! One walk of a bulk wake: its devices in the partitions it covers, read a
//! page at a time (or taken from the listed ids) in listing order and dealt
//! to the shards as batches, each batch a unit of the job's checkpoint.
//!
//! A walk starts where earlier walks of the job left off ([`Resume`]): it
//! skips the partitions they finished and goes on in a begun partition
//! after the furthest position reached. In embedded mode a job has one
//! walk over every partition; in cluster mode each node walks the
//! partitions it owns, and walks again when that set changes.

use super::bulk::Dealer;
use super::job::Job;
use super::limits::{DEAL_DEVICES, PAGE_DEVICES, PAGE_SCAN_RECORDS_MAX};
use super::send::{Batch, Selected};
use super::transport::Transport;
use super::WakeService;
use crate::clock;
use crate::core::bulk::{Position, Resume, Within};
use crate::core::{DeviceRecord, LifecycleState};
use crate::registry::{Cursor, Marks};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub(super) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The runs `from..to` of consecutive partitions of `parts` (ascending)
/// to read, each starting at its first partition: a partition with a
/// position to go on from starts a run of its own.
fn runs(parts: &[u16], resume: &Resume) -> Vec<(u16, u16)> {
    let mut runs: Vec<(u16, u16)> = Vec::new();
    for &p in parts {
        match runs.last_mut() {
            Some(run) if run.1 == p && !resume.at.contains_key(&p) => run.1 = p + 1,
            _ => runs.push((p, p + 1)),
        }
    }
    runs
}

/// Where a run starting at partition `from` starts reading.
fn start_cursor(resume: &Resume, from: u16) -> Cursor {
    match resume.at.get(&from) {
        Some(Within::Key { after_key }) => {
            let mut bytes = from.to_be_bytes().to_vec();
            bytes.extend(unhex(after_key).unwrap_or_default());
            Cursor::from_bytes(&bytes).unwrap_or_else(|| Cursor::start_of(from))
        }
        _ => Cursor::start_of(from),
    }
}

fn key_position(c: &Cursor) -> Position {
    Position {
        part: c.part(),
        within: Within::Key {
            after_key: hex(c.key_bytes()),
        },
    }
}

/// Deals the devices of partitions `parts` (ascending, none done) that are
/// in `state` (or all) when their page is read, until `halted`.
pub(super) async fn deal_filter<S: Transport>(
    wakes: &Arc<WakeService<S>>,
    job: &Arc<Job>,
    dealer: &mut Dealer<S>,
    state: Option<LifecycleState>,
    parts: &[u16],
    resume: &Resume,
    halted: &(dyn Fn() -> bool + Sync),
) {
    let th = wakes.thresholds;
    for (from, to) in runs(parts, resume) {
        let mut cursor = start_cursor(resume, from);
        loop {
            if halted() {
                return;
            }
            let now = clock::now();
            let registry = wakes.registry.clone();
            let after = cursor.clone();
            let page = tokio::task::spawn_blocking(move || {
                let filter = move |m: &Marks| {
                    state.is_none_or(|s| {
                        th.state_with_refresh(m.issued_at, m.dead, m.refresh, now)
                            .state
                            == s
                    })
                };
                let until = usize::from(to);
                match state {
                    // As for listings: only marked devices can be in
                    // these states.
                    Some(LifecycleState::RefreshPending | LifecycleState::Unreachable) => {
                        registry.page_marked_until(Some(&after), PAGE_DEVICES, until, &filter)
                    }
                    _ => registry.page_until(
                        Some(&after),
                        PAGE_DEVICES,
                        PAGE_SCAN_RECORDS_MAX,
                        until,
                        &filter,
                    ),
                }
            })
            .await;
            let Ok(page) = page else {
                tracing::error!(job = %job.id(), "bulk wake stopped: its selection task failed");
                job.cancel();
                return;
            };
            // Once this page is counted, the partitions it passed are done
            // and the walk stands where it ends.
            let next = page.next.filter(|c| c.part() < to);
            let (done_to, at) = match &next {
                Some(c) if c.key_bytes().is_empty() => (c.part(), None),
                Some(c) => (c.part(), Some(key_position(c))),
                None => (to, None),
            };
            job.selected
                .fetch_add(page.records.len() as u64, Ordering::AcqRel);
            // Dealt a batch at a time; a batch's checkpoint stands after
            // its last device, the page's end after the page's last batch.
            let mut records = page.records.into_iter().peekable();
            let mut from = cursor.part();
            loop {
                let batch: Vec<DeviceRecord> = records.by_ref().take(DEAL_DEVICES).collect();
                let track = if records.peek().is_none() {
                    job.new_page(batch.len(), vec![(from, done_to)], at.clone())
                } else {
                    let last = batch.last().map(|r| r.device_id.as_str());
                    match last.and_then(|id| wakes.registry.cursor_after(id)) {
                        Some(c) => {
                            let track = job.new_page(
                                batch.len(),
                                vec![(from, c.part())],
                                Some(key_position(&c)),
                            );
                            from = c.part();
                            track
                        }
                        // Never for a registered id; a position at the
                        // partition's start wakes again, never skips.
                        None => job.new_page(batch.len(), Vec::new(), None),
                    }
                };
                if batch.is_empty() {
                    break;
                }
                dealer
                    .deal(Batch {
                        devices: Selected::Records(batch),
                        page: track,
                    })
                    .await;
                if records.peek().is_none() {
                    break;
                }
            }
            match next {
                Some(c) => cursor = c,
                None => break,
            }
        }
    }
}

/// The partitions of listed ids, each with its ids in the given order.
pub(super) fn group_ids(
    ids: Vec<String>,
    partitioning: crate::core::Partitioning,
) -> BTreeMap<u16, Vec<String>> {
    let mut groups: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for id in ids {
        groups.entry(partitioning.of(&id)).or_default().push(id);
    }
    groups
}

/// Deals the listed ids of the partitions `groups` holds for which `mine`
/// is true and that are not done, partition by partition, until `halted`.
/// With `count_selected`, the ids dealt count into the job's `selected`
/// (otherwise the caller counted every listed id up front).
pub(super) async fn deal_ids<S: Transport>(
    job: &Arc<Job>,
    dealer: &mut Dealer<S>,
    groups: &BTreeMap<u16, Vec<String>>,
    mine: &(dyn Fn(u16) -> bool + Sync),
    resume: &Resume,
    halted: &(dyn Fn() -> bool + Sync),
    count_selected: bool,
) {
    let count = |n: usize| {
        if count_selected {
            job.selected.fetch_add(n as u64, Ordering::AcqRel);
        }
    };
    let mut page: Vec<String> = Vec::with_capacity(DEAL_DEVICES);
    // The partitions whose last ids are in the page.
    let mut done: Vec<(u16, u16)> = Vec::new();
    let left = groups
        .iter()
        .filter(|(part, _)| mine(**part) && !resume.is_done(**part));
    for (&part, list) in left {
        let mut i = match resume.at.get(&part) {
            Some(Within::Index { next_index }) => usize::try_from(*next_index)
                .unwrap_or(usize::MAX)
                .min(list.len()),
            _ => 0,
        };
        if i == list.len() {
            done.push((part, part + 1));
        }
        while i < list.len() {
            if halted() {
                return;
            }
            let take = (DEAL_DEVICES - page.len()).min(list.len() - i);
            page.extend_from_slice(&list[i..i + take]);
            i += take;
            let at = if i < list.len() {
                Some(Position {
                    part,
                    within: Within::Index {
                        next_index: i as u64,
                    },
                })
            } else {
                done.push((part, part + 1));
                None
            };
            if page.len() < DEAL_DEVICES {
                continue;
            }
            count(page.len());
            let track = job.new_page(page.len(), std::mem::take(&mut done), at);
            let ids = std::mem::replace(&mut page, Vec::with_capacity(DEAL_DEVICES));
            dealer
                .deal(Batch {
                    devices: Selected::Ids(ids),
                    page: track,
                })
                .await;
        }
    }
    if !page.is_empty() || !done.is_empty() {
        count(page.len());
        let track = job.new_page(page.len(), done, None);
        if !page.is_empty() {
            dealer
                .deal(Batch {
                    devices: Selected::Ids(page),
                    page: track,
                })
                .await;
        }
    }
}
