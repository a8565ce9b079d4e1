//! A channel's lifecycle state, computed from its age and from what WNS said
//! about it, at a time the caller passes in.

use super::record::{DeadMark, RefreshMark, RefreshState};
use super::time::UnixTime;
use serde::Serialize;

/// The lifecycle state of a device's channel (the README's "Device lifecycle").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum LifecycleState {
    /// Younger than `renewal_due_after`.
    Active,
    /// Between `renewal_due_after` and `expire_after`, no new URI seen.
    RenewalDue,
    /// Older than `expire_after`, or WNS answered 404/410/403.
    Expired,
    /// A PFN-replacement job is queued or leased for the device.
    RefreshPending,
    /// Refresh attempts exhausted: needs a person.
    Unreachable,
}

impl LifecycleState {
    pub const ALL: [LifecycleState; 5] = [
        LifecycleState::Active,
        LifecycleState::RenewalDue,
        LifecycleState::Expired,
        LifecycleState::RefreshPending,
        LifecycleState::Unreachable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleState::Active => "active",
            LifecycleState::RenewalDue => "renewal_due",
            LifecycleState::Expired => "expired",
            LifecycleState::RefreshPending => "refresh_pending",
            LifecycleState::Unreachable => "unreachable",
        }
    }

    pub fn parse(s: &str) -> Option<LifecycleState> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// Why a channel was declared dead by WNS (stored with the device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadReason {
    /// WNS answered 404: channel unknown or malformed.
    Wns404,
    /// WNS answered 410: channel expired or revoked.
    Wns410,
    /// WNS answered 403: the credential's app does not own this channel.
    CredentialMismatch,
}

impl DeadReason {
    pub fn code(self) -> u8 {
        match self {
            DeadReason::Wns404 => 1,
            DeadReason::Wns410 => 2,
            DeadReason::CredentialMismatch => 3,
        }
    }

    pub fn from_code(c: u8) -> Option<DeadReason> {
        match c {
            1 => Some(DeadReason::Wns404),
            2 => Some(DeadReason::Wns410),
            3 => Some(DeadReason::CredentialMismatch),
            _ => None,
        }
    }
}

/// Why a device left `active`, as reported on the device record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaveReason {
    /// The channel grew old (renewal due, or expired by age).
    Age,
    Wns404,
    Wns410,
    CredentialMismatch,
}

impl From<DeadReason> for LeaveReason {
    fn from(r: DeadReason) -> Self {
        match r {
            DeadReason::Wns404 => LeaveReason::Wns404,
            DeadReason::Wns410 => LeaveReason::Wns410,
            DeadReason::CredentialMismatch => LeaveReason::CredentialMismatch,
        }
    }
}

/// Channel age thresholds, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub renewal_due_after: u32,
    pub expire_after: u32,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            renewal_due_after: 15 * 86_400,
            expire_after: 30 * 86_400,
        }
    }
}

/// A state with the reason and time the device left `active`, if it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateAt {
    pub state: LifecycleState,
    pub since: Option<(LeaveReason, UnixTime)>,
}

impl Thresholds {
    /// When a channel issued at `issued_at` becomes renewal-due.
    pub fn renewal_due_at(&self, issued_at: UnixTime) -> UnixTime {
        issued_at.saturating_add(u64::from(self.renewal_due_after))
    }

    /// When a channel issued at `issued_at` expires by age.
    pub fn expires_at(&self, issued_at: UnixTime) -> UnixTime {
        issued_at.saturating_add(u64::from(self.expire_after))
    }

    /// The state of a device at `now`: `unreachable` or `refresh_pending`
    /// when the refresh queue says so, else [`Thresholds::state_at`]. The
    /// reason and time the device left `active` are those of its channel.
    pub fn state_with_refresh(
        &self,
        issued_at: UnixTime,
        dead: Option<DeadMark>,
        refresh: Option<RefreshMark>,
        now: UnixTime,
    ) -> StateAt {
        let by_channel = self.state_at(issued_at, dead, now);
        match refresh {
            None => by_channel,
            Some(m) => StateAt {
                state: match m.state {
                    RefreshState::Pending => LifecycleState::RefreshPending,
                    RefreshState::Unreachable => LifecycleState::Unreachable,
                },
                since: by_channel.since,
            },
        }
    }

    /// The state of a channel at `now`, from its age and any WNS verdict.
    ///
    /// A WNS verdict wins over age; among ages, expiry wins over renewal.
    pub fn state_at(&self, issued_at: UnixTime, dead: Option<DeadMark>, now: UnixTime) -> StateAt {
        if let Some(d) = dead {
            return StateAt {
                state: LifecycleState::Expired,
                since: Some((d.reason.into(), d.at)),
            };
        }
        let expires = self.expires_at(issued_at);
        if now >= expires {
            return StateAt {
                state: LifecycleState::Expired,
                since: Some((LeaveReason::Age, expires)),
            };
        }
        let due = self.renewal_due_at(issued_at);
        if now >= due {
            return StateAt {
                state: LifecycleState::RenewalDue,
                since: Some((LeaveReason::Age, due)),
            };
        }
        StateAt {
            state: LifecycleState::Active,
            since: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DAY: u32 = 86_400;

    #[test]
    fn ages_through_the_states() {
        let th = Thresholds::default();
        let t0 = UnixTime(1_700_000_000);
        let at = |d: u32| th.state_at(t0, None, UnixTime(t0.0 + d));
        assert_eq!(at(0).state, LifecycleState::Active);
        assert_eq!(at(15 * DAY - 1).state, LifecycleState::Active);
        assert_eq!(at(15 * DAY).state, LifecycleState::RenewalDue);
        assert_eq!(
            at(15 * DAY).since,
            Some((LeaveReason::Age, UnixTime(t0.0 + 15 * DAY)))
        );
        assert_eq!(at(30 * DAY - 1).state, LifecycleState::RenewalDue);
        assert_eq!(at(30 * DAY).state, LifecycleState::Expired);
        assert_eq!(
            at(30 * DAY).since,
            Some((LeaveReason::Age, UnixTime(t0.0 + 30 * DAY)))
        );
    }

    #[test]
    fn wns_verdict_wins() {
        let th = Thresholds::default();
        let t0 = UnixTime(1_700_000_000);
        let dead = DeadMark {
            reason: DeadReason::Wns410,
            at: UnixTime(t0.0 + 100),
        };
        let s = th.state_at(t0, Some(dead), UnixTime(t0.0 + 200));
        assert_eq!(s.state, LifecycleState::Expired);
        assert_eq!(s.since, Some((LeaveReason::Wns410, UnixTime(t0.0 + 100))));
    }

    #[test]
    fn refresh_state_wins_and_keeps_the_channel_reason() {
        let th = Thresholds::default();
        let t0 = UnixTime(1_700_000_000);
        let now = UnixTime(t0.0 + 31 * DAY);
        for (st, want) in [
            (RefreshState::Pending, LifecycleState::RefreshPending),
            (RefreshState::Unreachable, LifecycleState::Unreachable),
        ] {
            let mark = RefreshMark {
                state: st,
                since: now,
                job: 1,
            };
            let s = th.state_with_refresh(t0, None, Some(mark), now);
            assert_eq!(s.state, want);
            assert_eq!(s.since, Some((LeaveReason::Age, UnixTime(t0.0 + 30 * DAY))));
        }
        assert_eq!(
            th.state_with_refresh(t0, None, None, now),
            th.state_at(t0, None, now)
        );
    }

    #[test]
    fn state_names_round_trip() {
        for s in LifecycleState::ALL {
            assert_eq!(LifecycleState::parse(s.as_str()), Some(s));
        }
        assert_eq!(LifecycleState::parse("zombie"), None);
        for r in [
            DeadReason::Wns404,
            DeadReason::Wns410,
            DeadReason::CredentialMismatch,
        ] {
            assert_eq!(DeadReason::from_code(r.code()), Some(r));
        }
    }

    proptest! {
        #[test]
        fn state_is_monotonic_in_time(issued in 0u32..2_000_000_000, a in 0u32..100*DAY, b in 0u32..100*DAY,
                                      due in 1u32..40*DAY, extra in 0u32..40*DAY) {
            let th = Thresholds { renewal_due_after: due, expire_after: due + extra };
            let (early, late) = (a.min(b), a.max(b));
            let s1 = th.state_at(UnixTime(issued), None, UnixTime(issued.saturating_add(early))).state;
            let s2 = th.state_at(UnixTime(issued), None, UnixTime(issued.saturating_add(late))).state;
            prop_assert!(s1 <= s2);
        }
    }
}
