//! The device record: what the gateway knows about one device.

use super::channel_uri::ChannelUri;
use super::ids::{DeviceId, Pfn, ProviderId};
use super::lifecycle::{DeadReason, StateAt, Thresholds};
use super::time::UnixTime;

/// A WNS verdict that the channel is dead, and when it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeadMark {
    pub reason: DeadReason,
    pub at: UnixTime,
}

/// One device's channel registration, fully decoded.
///
/// The registry keeps a compact encoding of this; the store keeps a
/// self-describing one. Both round-trip every field exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub device_id: DeviceId,
    pub pfn: Pfn,
    pub channel_uri: ChannelUri,
    pub provider_id: Option<ProviderId>,
    pub issued_at: UnixTime,
    /// Set when WNS declared the channel dead; cleared by a new registration.
    pub dead: Option<DeadMark>,
}

impl DeviceRecord {
    /// The lifecycle state at `now`.
    pub fn state_at(&self, th: &Thresholds, now: UnixTime) -> StateAt {
        th.state_at(self.issued_at, self.dead, now)
    }
}
