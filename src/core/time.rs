//! Whole-second UTC timestamps, as stored in the registry and the store.

use std::fmt;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Seconds since the Unix epoch, UTC. Four bytes: valid until 2106.
///
/// Sub-second precision of incoming RFC 3339 times is dropped (truncated):
/// channel lifetimes are measured in days.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct UnixTime(pub u32);

/// Why an RFC 3339 timestamp was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    #[error("not an RFC 3339 timestamp (expected e.g. 2026-11-25T10:00:00Z)")]
    Syntax,
    #[error("timestamp outside the supported range 1970-01-01 to 2106-02-07")]
    Range,
}

impl UnixTime {
    pub const MAX: UnixTime = UnixTime(u32::MAX);

    /// Parses an RFC 3339 timestamp (any offset), truncating fractions.
    pub fn parse_rfc3339(s: &str) -> Result<UnixTime, TimeError> {
        let t = OffsetDateTime::parse(s, &Rfc3339).map_err(|_| TimeError::Syntax)?;
        Self::from_secs_i64(t.unix_timestamp()).ok_or(TimeError::Range)
    }

    /// Converts seconds since the epoch, if in range.
    pub fn from_secs_i64(secs: i64) -> Option<UnixTime> {
        u32::try_from(secs).ok().map(UnixTime)
    }

    /// The time as seconds since the epoch.
    pub fn secs(self) -> u32 {
        self.0
    }

    /// Adds a number of seconds, saturating at [`UnixTime::MAX`].
    pub fn saturating_add(self, secs: u64) -> UnixTime {
        UnixTime(u32::try_from(u64::from(self.0).saturating_add(secs)).unwrap_or(u32::MAX))
    }

    /// Seconds from `earlier` to `self`, zero when `earlier` is later.
    pub fn saturating_since(self, earlier: UnixTime) -> u32 {
        self.0.saturating_sub(earlier.0)
    }

    /// RFC 3339 in UTC with a `Z` suffix and no fraction.
    pub fn to_rfc3339(self) -> String {
        let t = OffsetDateTime::from_unix_timestamp(i64::from(self.0))
            .expect("every u32 second count is a valid date");
        let (y, mo, d) = (t.year(), u8::from(t.month()), t.day());
        let (h, mi, s) = (t.hour(), t.minute(), t.second());
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
    }
}

impl fmt::Display for UnixTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

/// Parses a duration written as a number with a unit suffix: `30d`, `12h`,
/// `90m`, `45s`, or a bare number of seconds. Used by configuration.
pub fn parse_duration_secs(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'd') => (&s[..i], 86_400),
        (i, 'h') => (&s[..i], 3_600),
        (i, 'm') => (&s[..i], 60),
        (i, 's') => (&s[..i], 1),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_rfc3339() {
        let t = UnixTime::parse_rfc3339("2026-11-25T10:00:00Z").unwrap();
        assert_eq!(t.0, 1_795_600_800);
        assert_eq!(t.to_rfc3339(), "2026-11-25T10:00:00Z");
        let off = UnixTime::parse_rfc3339("2026-11-25T12:00:00.987+02:00").unwrap();
        assert_eq!(off, t);
    }

    #[test]
    fn rejects_bad_times() {
        assert_eq!(UnixTime::parse_rfc3339("yesterday"), Err(TimeError::Syntax));
        assert_eq!(
            UnixTime::parse_rfc3339("2026-13-01T00:00:00Z"),
            Err(TimeError::Syntax)
        );
        assert_eq!(
            UnixTime::parse_rfc3339("1969-12-31T23:59:59Z"),
            Err(TimeError::Range)
        );
        assert_eq!(
            UnixTime::parse_rfc3339("2200-01-01T00:00:00Z"),
            Err(TimeError::Range)
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_secs("15d"), Some(15 * 86_400));
        assert_eq!(parse_duration_secs("2h"), Some(7_200));
        assert_eq!(parse_duration_secs("90"), Some(90));
        assert_eq!(parse_duration_secs("x"), None);
        assert_eq!(parse_duration_secs(""), None);
    }
}
