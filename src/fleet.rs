//! Synthetic fleets: realistic device ids and channel URIs for the demo, the
//! load tests and the benchmarks. Deterministic: device `i` of a fleet is
//! always the same.

use crate::core::UnixTime;

/// WNS front-end hosts seen in real channel URIs.
pub const HOSTS: &[&str] = &[
    "db5",
    "bn1",
    "hk2",
    "am3p",
    "cloud",
    "wns2-by3p",
    "sg2p",
    "ch1",
];
/// The PFN the synthetic fleet registers with.
pub const DEMO_PFN: &str = "Contoso.MDM_8wekyb3d8bbwe";

/// A 64-bit mix of `x` (splitmix64).
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The lowercase UUID device id of device `i` (36 characters).
pub fn device_id(i: u64) -> String {
    let a = mix(i);
    let b = mix(i ^ 0xA5A5_A5A5_A5A5_A5A5);
    let h = format!("{a:016x}{b:016x}");
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// A channel URI of real length (about 190 bytes) for device `i`, with the
/// URL-escaped base64 characters real tokens carry.
pub fn channel_uri(i: u64, generation: u64) -> String {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let host = HOSTS[(mix(i) % HOSTS.len() as u64) as usize];
    let mut token = String::with_capacity(160);
    token.push_str("AwYAAAD");
    let mut state = mix(i.wrapping_mul(31).wrapping_add(generation));
    while token.len() < 145 {
        state = mix(state);
        match state % 23 {
            0 => token.push_str("%2b"),
            1 => token.push_str("%2f"),
            _ => token.push(B64[(state >> 8) as usize % B64.len()] as char),
        }
    }
    token.push_str("%3d");
    format!("https://{host}.notify.windows.com/?token={token}")
}

/// The age profile of a synthetic fleet, in shares of 100.
#[derive(Debug, Clone, Copy)]
pub struct AgeMix {
    /// Channels 0 to 14 days old.
    pub fresh: u64,
    /// Channels 15 to 29 days old.
    pub renewal_due: u64,
    /// Channels 31 to 60 days old.
    pub expired: u64,
}

impl Default for AgeMix {
    fn default() -> Self {
        AgeMix {
            fresh: 70,
            renewal_due: 20,
            expired: 10,
        }
    }
}

/// When device `i`'s channel was issued, relative to `now`, following `mix`.
pub fn issued_at(i: u64, now: UnixTime, ages: AgeMix) -> UnixTime {
    const DAY: u64 = 86_400;
    let r = mix(i ^ 0x5151) % (ages.fresh + ages.renewal_due + ages.expired).max(1);
    let jitter = mix(i ^ 0x7777) % (DAY * 13);
    let age = if r < ages.fresh {
        jitter + 3_600
    } else if r < ages.fresh + ages.renewal_due {
        15 * DAY + 3_600 + jitter
    } else {
        31 * DAY + jitter * 2
    };
    UnixTime(
        now.secs()
            .saturating_sub(age.min(u64::from(u32::MAX)) as u32),
    )
}

/// One NDJSON registration line for device `i` (with a trailing newline).
pub fn ndjson_line(i: u64, now: UnixTime, ages: AgeMix) -> String {
    format!(
        "{{\"device_id\":\"{}\",\"pfn\":\"{}\",\"channel_uri\":\"{}\",\"issued_at\":\"{}\"}}\n",
        device_id(i),
        DEMO_PFN,
        channel_uri(i, 0),
        issued_at(i, now, ages)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{ChannelUri, DeviceId, UriPolicy};

    #[test]
    fn synthetic_devices_are_valid_and_realistic() {
        for i in 0..2_000 {
            let id = device_id(i);
            assert_eq!(id.len(), 36);
            DeviceId::parse(&id).unwrap();
            let uri = channel_uri(i, 0);
            assert!((180..=200).contains(&uri.len()), "{}", uri.len());
            ChannelUri::parse(&uri, &UriPolicy::default()).unwrap();
        }
        assert_ne!(device_id(1), device_id(2));
        assert_ne!(channel_uri(1, 0), channel_uri(1, 1));
    }

    #[test]
    fn ages_follow_the_mix() {
        let now = UnixTime(1_800_000_000);
        let th = crate::core::Thresholds::default();
        let mut counts = [0u32; 5];
        for i in 0..10_000 {
            let st = th
                .state_at(issued_at(i, now, AgeMix::default()), None, now)
                .state;
            counts[st as usize] += 1;
        }
        assert!((6_500..7_500).contains(&counts[0]), "{counts:?}");
        assert!((1_500..2_500).contains(&counts[1]), "{counts:?}");
        assert!((700..1_300).contains(&counts[2]), "{counts:?}");
    }
}
