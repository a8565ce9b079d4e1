//! The JSON shape of a device record (`GET /v1/devices/{id}`, the README's API).

use crate::core::lifecycle::LeaveReason;
use crate::core::wns::PushResult;
use crate::core::{DeviceRecord, LifecycleState, Thresholds, UnixTime};
use crate::sender::wake::WakeReport;
use serde::Serialize;

/// A device record as API callers see it.
#[derive(Debug, Serialize)]
pub(crate) struct DeviceView<'a> {
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

/// The last push, as callers see it.
#[derive(Debug, Serialize)]
pub(crate) struct LastPushView {
    pub at: String,
    pub result: &'static str,
    pub wns_outcome: Option<&'static str>,
    pub status: Option<u16>,
}

impl From<crate::registry::LastPush> for LastPushView {
    fn from(p: crate::registry::LastPush) -> Self {
        LastPushView {
            at: p.at.to_rfc3339(),
            result: p.result().map_or("other", |r| r.label()),
            wns_outcome: p.outcome_label(),
            status: (p.status != 0).then_some(p.status),
        }
    }
}

/// A device's open refresh job, in short (the SyncML is at
/// `GET /v1/devices/{id}/refresh`).
#[derive(Debug, Serialize)]
pub(crate) struct RefreshSummary {
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
    pub(crate) fn new(rec: &'a DeviceRecord, th: &Thresholds, now: UnixTime) -> DeviceView<'a> {
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
    pub(crate) fn with_push(mut self, push: Option<crate::registry::LastPush>) -> Self {
        self.last_push = push.map(Into::into);
        self
    }

    /// Adds the device's open refresh job.
    pub(crate) fn with_job(mut self, job: Option<crate::lifecycle::JobView>) -> Self {
        self.refresh_job = job.map(Into::into);
        self
    }
}

/// A wake's final result as `?wait=true` answers show it.
#[derive(Serialize)]
pub(crate) struct ReportView<'a> {
    pub result: PushResult,
    pub wns_outcome: Option<&'static str>,
    pub status: Option<u16>,
    pub msg_id: Option<String>,
    pub debug_trace: Option<String>,
    pub ms_cv: Option<String>,
    pub device_connection: Option<&'static str>,
    pub error_description: Option<String>,
    pub attempts: u32,
    pub protocol: Option<&'static str>,
    pub at: String,
    pub error: Option<&'a str>,
}

impl<'a> From<&'a WakeReport> for ReportView<'a> {
    fn from(r: &'a WakeReport) -> ReportView<'a> {
        let meta = r.meta();
        ReportView {
            result: r.result,
            wns_outcome: r.wns_outcome.map(|o| o.label()),
            status: r.status,
            msg_id: meta.msg_id,
            debug_trace: meta.debug_trace,
            ms_cv: meta.ms_cv,
            device_connection: meta.device_connection.map(|d| d.as_str()),
            error_description: meta.error_description,
            attempts: r.attempts,
            protocol: r.protocol,
            at: r.at.to_rfc3339(),
            error: r.error.as_deref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::wns::Outcome;
    use crate::registry::LastPush;

    #[test]
    fn last_push_shows_the_labels_of_its_codes() {
        for r in PushResult::ALL {
            for o in [None, Some(Outcome::Received), Some(Outcome::DomainBlocked)] {
                let p = LastPush::new(crate::core::UnixTime(1), r, o.as_ref(), Some(200));
                let v = LastPushView::from(p);
                assert_eq!(v.result, r.label());
                assert_eq!(v.wns_outcome, o.map(|o| o.label()));
            }
        }
        let unknown = LastPush {
            at: crate::core::UnixTime(1),
            result: 200,
            outcome: 200,
            status: 0,
        };
        let v = LastPushView::from(unknown);
        assert_eq!(
            (v.result, v.wns_outcome, v.status),
            ("other", Some("other"), None)
        );
    }

    #[test]
    fn outcome_codes_are_zero_for_no_answer_and_one_past_the_label() {
        assert_eq!(LastPush::outcome_code(None), 0);
        let throttled = Outcome::SenderThrottled { retry_after: None };
        assert_eq!(
            LastPush::outcome_code(Some(&throttled)),
            throttled.index() as u8 + 1
        );
        for (i, label) in Outcome::LABELS.iter().enumerate() {
            let p = LastPush {
                at: crate::core::UnixTime(0),
                result: 0,
                outcome: i as u8 + 1,
                status: 0,
            };
            assert_eq!(p.outcome_label(), Some(*label));
        }
    }
}
