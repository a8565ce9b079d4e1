//! The JSON shape of a device record (product.md, `GET /v1/devices/{id}`).

use crate::core::lifecycle::LeaveReason;
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
    /// The last wake-up outcome; none until a push was sent.
    pub last_push: Option<()>,
    /// The open PFN-replacement job; none while the channel is healthy.
    pub refresh_job: Option<RefreshSummary>,
    /// Set when refresh gave up: since when the device is unreachable.
    pub unreachable_since: Option<String>,
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

    /// Adds the device's open refresh job.
    pub fn with_job(mut self, job: Option<crate::lifecycle::JobView>) -> Self {
        self.refresh_job = job.map(Into::into);
        self
    }
}
