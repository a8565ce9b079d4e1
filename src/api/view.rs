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
    pub refresh_job: Option<()>,
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
        }
    }
}
