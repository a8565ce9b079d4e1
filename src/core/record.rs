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

/// Where a device stands in the refresh queue, kept on the device so that
/// its state is known without the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefreshState {
    /// A PFN-replacement job is open for the device.
    Pending,
    /// Refresh attempts were exhausted: a person must look.
    Unreachable,
}

impl RefreshState {
    pub fn code(self) -> u8 {
        match self {
            RefreshState::Pending => 1,
            RefreshState::Unreachable => 2,
        }
    }

    pub fn from_code(c: u8) -> Option<RefreshState> {
        match c {
            1 => Some(RefreshState::Pending),
            2 => Some(RefreshState::Unreachable),
            _ => None,
        }
    }
}

/// The device's refresh state, since when, and the job it belongs to (the
/// open job while `Pending`; the job that gave up for `Unreachable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RefreshMark {
    pub state: RefreshState,
    pub since: UnixTime,
    pub job: u64,
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
    /// Set while a refresh job is open, or once refresh gave up; cleared by
    /// a new registration.
    pub refresh: Option<RefreshMark>,
}

impl DeviceRecord {
    /// The lifecycle state at `now`: the refresh state when there is one,
    /// else the state by WNS verdict and age.
    pub fn state_at(&self, th: &Thresholds, now: UnixTime) -> StateAt {
        th.state_with_refresh(self.issued_at, self.dead, self.refresh, now)
    }
}

/// What a caller asks to register for one device, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub device_id: DeviceId,
    pub pfn: Pfn,
    pub channel_uri: ChannelUri,
    pub provider_id: Option<ProviderId>,
    /// When the device obtained the URI, if the caller knows.
    pub issued_at: Option<UnixTime>,
}

/// The record that results from registering `reg` over `existing` at `now`.
///
/// - A new channel URI starts a new life: `issued_at` is the given time or
///   `now`, and any WNS verdict is cleared.
/// - The same channel URI again is idempotent: it keeps the known issue time
///   (unless a time is given) and keeps a WNS verdict, because a URI that
///   WNS declared dead does not come back to life by being reported again.
pub fn merge_registration(
    existing: Option<&DeviceRecord>,
    reg: Registration,
    now: UnixTime,
) -> DeviceRecord {
    match existing {
        Some(old) if old.channel_uri == reg.channel_uri => DeviceRecord {
            issued_at: reg.issued_at.unwrap_or(old.issued_at),
            dead: old.dead,
            refresh: old.refresh,
            device_id: reg.device_id,
            pfn: reg.pfn,
            channel_uri: reg.channel_uri,
            provider_id: reg.provider_id,
        },
        _ => DeviceRecord {
            issued_at: reg.issued_at.unwrap_or(now),
            dead: None,
            refresh: None,
            device_id: reg.device_id,
            pfn: reg.pfn,
            channel_uri: reg.channel_uri,
            provider_id: reg.provider_id,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{DeadReason, UriPolicy};

    fn reg(uri: &str, issued: Option<u32>) -> Registration {
        Registration {
            device_id: DeviceId::parse("dev-1").unwrap(),
            pfn: Pfn::parse("Contoso.MDM_8wekyb3d8bbwe").unwrap(),
            channel_uri: ChannelUri::parse(uri, &UriPolicy::default()).unwrap(),
            provider_id: None,
            issued_at: issued.map(UnixTime),
        }
    }

    const A: &str = "https://db5.notify.windows.com/?token=AAA";
    const B: &str = "https://db5.notify.windows.com/?token=BBB";

    #[test]
    fn new_device_and_new_uri_start_fresh() {
        let now = UnixTime(1_000_000);
        let r = merge_registration(None, reg(A, None), now);
        assert_eq!(r.issued_at, now);
        let mut old = r.clone();
        old.dead = Some(DeadMark {
            reason: DeadReason::Wns410,
            at: UnixTime(999),
        });
        let r2 = merge_registration(Some(&old), reg(B, Some(500_000)), now);
        assert_eq!(r2.issued_at, UnixTime(500_000));
        assert_eq!(r2.dead, None);
        assert_eq!(r2.refresh, None);
        assert_eq!(r2.channel_uri.as_str(), B);
    }

    #[test]
    fn same_uri_is_idempotent_and_keeps_verdict() {
        let mut old = merge_registration(None, reg(A, Some(100)), UnixTime(200));
        old.dead = Some(DeadMark {
            reason: DeadReason::Wns404,
            at: UnixTime(150),
        });
        old.refresh = Some(RefreshMark {
            state: RefreshState::Pending,
            since: UnixTime(160),
            job: 7,
        });
        let again = merge_registration(Some(&old), reg(A, None), UnixTime(10_000));
        assert_eq!(again.issued_at, UnixTime(100));
        assert_eq!(again.dead, old.dead);
        assert_eq!(again.refresh, old.refresh);
        let with_time = merge_registration(Some(&old), reg(A, Some(120)), UnixTime(10_000));
        assert_eq!(with_time.issued_at, UnixTime(120));
    }
}
