//! The JSON shape of a device record (product.md, `GET /v1/devices/{id}`).

use crate::core::lifecycle::LeaveReason;
use crate::core::wns::classify::Outcome;
use crate::core::{DeviceRecord, LifecycleState, Thresholds, UnixTime};
use serde::Serialize;

/// A device record as API callers see it.
#[derive(Debug, Serialize)]
pub struct DeviceView<'a> {
    pub device_id: &'a str,
    pub pfn: &'a str,
    pub channel_uri: &'a str,
    pub provider_id: Option<&'a str>,
    pub issued_at: String,
    pub renewal_due_at: String,
    pub expires_at: String,
    pub state: LifecycleState,
    /// Why the device left `active`, if it did.
    pub state_reason: Option<LeaveReason>,
    /// When it left `active`.
    pub state_since: Option<String>,
    /// The last wake-up outcome since the channel was issued (kept in
    /// memory: a restart forgets it); none until a push finished.
    pub last_push: Option<LastPushView>,
    /// The open PFN-replacement job; none while the channel is healthy.
    pub refresh_job: Option<RefreshSummary>,
    /// Set when refresh gave up: since when the device is unreachable.
    pub unreachable_since: Option<String>,
}

/// Final wake-up results, by the code the registry keeps.
pub const PUSH_RESULTS: &[&str] = &[
    "delivered",
    "channel_dead",
    "dropped",
    "attempts_exhausted",
    "retry_after_too_long",
    "token_rejected_twice",
    "domain_blocked",
    "bad_request",
    "method_not_allowed",
    "payload_too_large",
    "unexpected",
    "credential_throttled",
    "token_unavailable",
    "no_credentials",
    "bad_channel_uri",
    "connect_failed",
    "tls_failed",
    "timeout",
    "connection_lost",
    "protocol_error",
];

/// The registry code of a WNS outcome label: 0 for no answer, else one
/// more than its place in [`Outcome::LABELS`] (the classifier's own list).
pub fn outcome_code(label: Option<&str>) -> u8 {
    label.map_or(0, |l| label_code(&Outcome::LABELS, l) + 1)
}

fn outcome_label(code: u8) -> Option<&'static str> {
    code.checked_sub(1).map(|c| code_label(&Outcome::LABELS, c))
}

/// Code of a label in `table`; `table.len()` ("other") when absent.
pub fn label_code(table: &[&str], label: &str) -> u8 {
    table
        .iter()
        .position(|l| *l == label)
        .unwrap_or(table.len()) as u8
}

fn code_label(table: &[&'static str], code: u8) -> &'static str {
    table.get(usize::from(code)).copied().unwrap_or("other")
}

/// The last push, as callers see it.
#[derive(Debug, Serialize)]
pub struct LastPushView {
    pub at: String,
    pub result: &'static str,
    pub wns_outcome: Option<&'static str>,
    pub status: Option<u16>,
}

impl From<crate::registry::LastPush> for LastPushView {
    fn from(p: crate::registry::LastPush) -> Self {
        LastPushView {
            at: p.at.to_rfc3339(),
            result: code_label(PUSH_RESULTS, p.result),
            wns_outcome: outcome_label(p.outcome),
            status: (p.status != 0).then_some(p.status),
        }
    }
}

/// A device's open refresh job, in short (the SyncML is at
/// `GET /v1/devices/{id}/refresh`).
#[derive(Debug, Serialize)]
pub struct RefreshSummary {
    pub job_id: String,
    pub state: &'static str,
    pub attempts: u16,
    pub reason: LeaveReason,
    pub created_at: String,
    pub until: Option<String>,
}

impl From<crate::lifecycle::JobView> for RefreshSummary {
    fn from(v: crate::lifecycle::JobView) -> Self {
        RefreshSummary {
            job_id: v.job_id,
            state: v.state,
            attempts: v.attempts,
            reason: v.reason,
            created_at: v.created_at,
            until: v.until,
        }
    }
}

impl<'a> DeviceView<'a> {
    pub fn new(rec: &'a DeviceRecord, th: &Thresholds, now: UnixTime) -> DeviceView<'a> {
        let st = rec.state_at(th, now);
        DeviceView {
            device_id: rec.device_id.as_str(),
            pfn: rec.pfn.as_str(),
            channel_uri: rec.channel_uri.as_str(),
            provider_id: rec.provider_id.as_ref().map(|p| p.as_str()),
            issued_at: rec.issued_at.to_rfc3339(),
            renewal_due_at: th.renewal_due_at(rec.issued_at).to_rfc3339(),
            expires_at: th.expires_at(rec.issued_at).to_rfc3339(),
            state: st.state,
            state_reason: st.since.map(|(r, _)| r),
            state_since: st.since.map(|(_, t)| t.to_rfc3339()),
            last_push: None,
            refresh_job: None,
            unreachable_since: rec
                .refresh
                .filter(|m| m.state == crate::core::RefreshState::Unreachable)
                .map(|m| m.since.to_rfc3339()),
        }
    }

    /// Adds the device's last push.
    pub fn with_push(mut self, push: Option<crate::registry::LastPush>) -> Self {
        self.last_push = push.map(Into::into);
        self
    }

    /// Adds the device's open refresh job.
    pub fn with_job(mut self, job: Option<crate::lifecycle::JobView>) -> Self {
        self.refresh_job = job.map(Into::into);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_codes_round_trip_and_unknown_labels_read_other() {
        for table in [PUSH_RESULTS, &Outcome::LABELS[..]] {
            for (i, l) in table.iter().enumerate() {
                assert_eq!(label_code(table, l), i as u8);
                assert_eq!(code_label(table, i as u8), *l);
            }
            let other = label_code(table, "something_new");
            assert_eq!(code_label(table, other), "other");
        }
    }

    #[test]
    fn outcome_codes_round_trip_with_zero_for_no_answer() {
        assert_eq!(outcome_code(None), 0);
        assert_eq!(outcome_label(0), None);
        for l in Outcome::LABELS {
            assert_eq!(outcome_label(outcome_code(Some(l))), Some(l));
        }
    }
}
