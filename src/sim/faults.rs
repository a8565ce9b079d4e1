//! Injected faults: server errors, sender throttling, latency, connection
//! retirement, HTTP/2 behaviours a WNS front end may show (tiny flow
//! control windows, header table size changes, streams reset by code), and
//! outages in a window of time (connections reset before answering, or
//! refused). The decisions are plain functions of their inputs (a random
//! draw, the time since the faults were set, a request's place on its
//! connection) so they are tested without a socket.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Longest injectable latency, in milliseconds.
pub const MAX_LATENCY_MS: u64 = 60_000;

/// Senders (app SIDs) whose rate is tracked at once; beyond this the oldest
/// buckets are forgotten (a forgotten sender starts again with a full bucket).
pub const MAX_TRACKED_SENDERS: usize = 4096;

/// The largest flow control window HTTP/2 allows (RFC 9113 section 6.9.1).
pub const MAX_H2_WINDOW: u32 = (1 << 31) - 1;

/// `Retry-After` on injected 500 and 503 answers, in seconds.
pub const SERVER_ERROR_RETRY_AFTER_SECS: u64 = 1;

/// Latest end of an outage window, in milliseconds after the faults were
/// set: one day.
pub const MAX_WINDOW_END_MS: u64 = 86_400_000;

/// The faults in force. Every field off by default. Settable at start, by
/// [`SimHandle::set_faults`](super::SimHandle::set_faults) and by
/// `PUT /_sim/faults` (the whole object is replaced; missing fields are off).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Share of pushes (0.0..=1.0) answered 500 or 503 (half each) with
    /// `Retry-After: 1`.
    pub error_ratio: f64,
    /// Pushes per second one sender (app SID) may make; beyond it: 406 with
    /// `Retry-After`. A token bucket holding one second's worth.
    pub sender_rate: Option<u32>,
    /// Uniform per-push delay before answering, in milliseconds.
    pub latency_ms: Option<LatencyRange>,
    /// Retire a connection gracefully after this many requests on it: h2
    /// GOAWAY (streams already accepted are answered), HTTP/1.1
    /// `Connection: close` on the Nth answer.
    pub goaway_every: Option<u64>,
    /// Abruptly close a connection (TCP reset) when its Nth request arrives;
    /// that request and any other in flight stay unanswered.
    pub reset_every: Option<u64>,
    /// h2 only: refuse every Nth stream of a connection with RST_STREAM
    /// REFUSED_STREAM before reading it. The push is not processed (the
    /// channel does not see it); the connection goes on.
    pub refused_stream_every: Option<u64>,
    /// h2 only: process every Nth stream of a connection (the channel sees
    /// the push and the stats count its answer), then reset it with
    /// RST_STREAM INTERNAL_ERROR instead of answering: an answer lost
    /// after the work was done. The connection goes on. A stream that is
    /// also due a refusal is refused.
    pub internal_error_every: Option<u64>,
    /// h2 only: the SETTINGS_INITIAL_WINDOW_SIZE advertised (bytes, at
    /// least 1), so a stream may send only this much before the server
    /// has read it; the server opens the window again only by what it has
    /// read. Applies to connections opened after it is set.
    pub h2_stream_window: Option<u32>,
    /// h2 only: after every Nth stream of a connection, the server sends
    /// two SETTINGS frames before its next answer: SETTINGS_HEADER_TABLE_SIZE
    /// 0, then 4096. The client's next header block must signal both sizes,
    /// the smallest first (RFC 7541 section 4.2); one that does not is a
    /// compression error: the server counts it and drops the connection.
    /// Applies to connections opened after it is set.
    pub header_table_flip_every: Option<u64>,
    /// An outage: from `FROM` to `TO` milliseconds after the faults were
    /// set (at start for flags given then), every connection that carries
    /// a push is reset (TCP RST) after the push was read and processed
    /// (the channel counts it, as received) and before it is answered. A
    /// front end that dies with wakes it may have delivered. Token and
    /// control requests are served as usual.
    pub reset_window_ms: Option<WindowMs>,
    /// An outage: from `FROM` to `TO` milliseconds after the faults were
    /// set, connections are refused: each new one is reset (TCP RST) as
    /// soon as it is accepted, before TLS, and a request on a connection
    /// opened before is reset unread (token and control requests too: they
    /// share the port). Nothing is processed. Wins over
    /// `reset_window_ms` where both are in force.
    pub refuse_window_ms: Option<WindowMs>,
}

/// What an outage window does at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outage {
    /// Connections carrying pushes are reset after reading them, before
    /// answering.
    ResetAfterRead,
    /// Connections are refused, and requests reset unread.
    Refuse,
}

impl Faults {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.error_ratio) {
            return Err("error_ratio must be within 0.0..=1.0".to_owned());
        }
        if self.sender_rate == Some(0) {
            return Err("sender_rate must be at least 1".to_owned());
        }
        if self.goaway_every == Some(0) || self.reset_every == Some(0) {
            return Err("goaway_every and reset_every must be at least 1".to_owned());
        }
        if self.refused_stream_every == Some(0)
            || self.internal_error_every == Some(0)
            || self.header_table_flip_every == Some(0)
        {
            return Err(
                "refused_stream_every, internal_error_every and header_table_flip_every must be at least 1"
                    .to_owned(),
            );
        }
        if self.h2_stream_window == Some(0) || self.h2_stream_window > Some(MAX_H2_WINDOW) {
            return Err(format!("h2_stream_window must be 1..={MAX_H2_WINDOW}"));
        }
        if let Some(l) = self.latency_ms {
            l.validate()?;
        }
        for w in [self.reset_window_ms, self.refuse_window_ms]
            .into_iter()
            .flatten()
        {
            w.validate()?;
        }
        Ok(())
    }

    /// Whether an outage window is set at all (so the clock needs reading).
    pub fn has_outage(&self) -> bool {
        self.reset_window_ms.is_some() || self.refuse_window_ms.is_some()
    }

    /// The outage in force `since_set` after the faults were set, if any.
    pub fn outage_at(&self, since_set: Duration) -> Option<Outage> {
        let ms = u64::try_from(since_set.as_millis()).unwrap_or(u64::MAX);
        if self.refuse_window_ms.is_some_and(|w| w.contains(ms)) {
            Some(Outage::Refuse)
        } else if self.reset_window_ms.is_some_and(|w| w.contains(ms)) {
            Some(Outage::ResetAfterRead)
        } else {
            None
        }
    }

    /// Whether a push is answered with an injected server error, given a
    /// uniform draw in `0.0..1.0` for the ratio and a coin for 500 vs 503.
    pub fn server_error(&self, draw: f64, coin: bool) -> Option<ServerError> {
        if draw < self.error_ratio {
            Some(if coin {
                ServerError::Internal
            } else {
                ServerError::Unavailable
            })
        } else {
            None
        }
    }
}

/// An injected server failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerError {
    /// 500.
    Internal,
    /// 503.
    Unavailable,
}

/// An inclusive range of milliseconds, written `MIN-MAX` (or `N` for a fixed
/// delay).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LatencyRange {
    /// Shortest delay.
    pub min_ms: u64,
    /// Longest delay.
    pub max_ms: u64,
}

impl LatencyRange {
    fn validate(&self) -> Result<(), String> {
        if self.min_ms > self.max_ms {
            return Err("latency MIN must not exceed MAX".to_owned());
        }
        if self.max_ms > MAX_LATENCY_MS {
            return Err(format!("latency must not exceed {MAX_LATENCY_MS} ms"));
        }
        Ok(())
    }

    /// The delay for a uniform draw in `0.0..1.0`.
    pub fn pick(&self, draw: f64) -> Duration {
        let span = (self.max_ms - self.min_ms) as f64;
        let ms = self.min_ms + ((span + 1.0) * draw).floor().min(span) as u64;
        Duration::from_millis(ms)
    }
}

impl std::str::FromStr for LatencyRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let num = |t: &str| {
            t.trim()
                .parse::<u64>()
                .map_err(|_| format!("bad latency {s:?}: expected MIN-MAX in milliseconds"))
        };
        let r = match s.split_once('-') {
            Some((a, b)) => LatencyRange {
                min_ms: num(a)?,
                max_ms: num(b)?,
            },
            None => {
                let v = num(s)?;
                LatencyRange {
                    min_ms: v,
                    max_ms: v,
                }
            }
        };
        r.validate()?;
        Ok(r)
    }
}

impl TryFrom<String> for LatencyRange {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<LatencyRange> for String {
    fn from(r: LatencyRange) -> String {
        format!("{}-{}", r.min_ms, r.max_ms)
    }
}

/// A window of time in milliseconds after the faults were set, written
/// `FROM-TO` (`TO` excluded), or `N` for `0-N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WindowMs {
    /// First millisecond in the window.
    pub from_ms: u64,
    /// First millisecond after it.
    pub to_ms: u64,
}

impl WindowMs {
    fn validate(&self) -> Result<(), String> {
        if self.from_ms >= self.to_ms {
            return Err("an outage window's FROM must be below its TO".to_owned());
        }
        if self.to_ms > MAX_WINDOW_END_MS {
            return Err(format!(
                "an outage window must end within {MAX_WINDOW_END_MS} ms"
            ));
        }
        Ok(())
    }

    /// Whether millisecond `ms` falls in the window.
    pub fn contains(&self, ms: u64) -> bool {
        (self.from_ms..self.to_ms).contains(&ms)
    }

    /// How long the window lasts.
    pub fn len(&self) -> Duration {
        Duration::from_millis(self.to_ms.saturating_sub(self.from_ms))
    }

    /// Whether the window lasts no time (never, once validated).
    pub fn is_empty(&self) -> bool {
        self.to_ms <= self.from_ms
    }
}

impl std::str::FromStr for WindowMs {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let num = |t: &str| {
            t.trim().parse::<u64>().map_err(|_| {
                format!("bad outage window {s:?}: expected FROM-TO in milliseconds, or N for 0-N")
            })
        };
        let w = match s.split_once('-') {
            Some((a, b)) => WindowMs {
                from_ms: num(a)?,
                to_ms: num(b)?,
            },
            None => WindowMs {
                from_ms: 0,
                to_ms: num(s)?,
            },
        };
        w.validate()?;
        Ok(w)
    }
}

impl TryFrom<String> for WindowMs {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<WindowMs> for String {
    fn from(w: WindowMs) -> String {
        format!("{}-{}", w.from_ms, w.to_ms)
    }
}

/// A token bucket: `rate` tokens per second, holding at most `rate`.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u32, now: Instant) -> TokenBucket {
        TokenBucket {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            at: now,
        }
    }

    /// Takes one token, or says how long until one is available.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

/// Per-sender token buckets for `sender_rate`.
#[derive(Debug, Default)]
pub struct SenderLimiter {
    rate: Option<u32>,
    buckets: HashMap<String, TokenBucket>,
}

impl SenderLimiter {
    /// Applies a new rate, forgetting all buckets when it changed.
    pub fn set_rate(&mut self, rate: Option<u32>) {
        if self.rate != rate {
            self.rate = rate;
            self.buckets.clear();
        }
    }

    /// Admits one push from `sender`, or answers the `Retry-After` in whole
    /// seconds (at least 1).
    pub fn admit(&mut self, sender: &str, now: Instant) -> Result<(), u64> {
        let Some(rate) = self.rate else {
            return Ok(());
        };
        if !self.buckets.contains_key(sender) && self.buckets.len() >= MAX_TRACKED_SENDERS {
            self.buckets.clear();
        }
        let bucket = self
            .buckets
            .entry(sender.to_owned())
            .or_insert_with(|| TokenBucket::new(rate, now));
        bucket
            .take(now)
            .map_err(|wait| wait.as_secs_f64().ceil().max(1.0) as u64)
    }
}

/// What a connection does when it has taken its `n`th request (1-based),
/// under the faults in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnAction {
    /// Serve it.
    Serve,
    /// Serve it, and retire the connection gracefully.
    ServeThenGoAway,
    /// Drop the connection now, without answering.
    Reset,
}

/// Decides the connection-level fault for the `n`th request (1-based).
/// A reset wins over a GOAWAY that falls on the same request; a GOAWAY is
/// only sent once per connection.
pub fn conn_action(faults: &Faults, n: u64, goaway_sent: bool) -> ConnAction {
    if faults.reset_every.is_some_and(|k| n.is_multiple_of(k)) {
        return ConnAction::Reset;
    }
    if !goaway_sent && faults.goaway_every.is_some_and(|k| n >= k) {
        return ConnAction::ServeThenGoAway;
    }
    ConnAction::Serve
}

/// What an h2 connection does with its `n`th stream (1-based), under the
/// faults in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamAction {
    /// Serve it.
    Serve,
    /// Reset it with REFUSED_STREAM without reading it.
    Refuse,
    /// Serve it, then reset it with INTERNAL_ERROR instead of answering.
    ServeThenReset,
}

/// Decides the stream-level fault for the `n`th stream (1-based) of an h2
/// connection. A refusal wins over an internal error on the same stream.
pub fn stream_action(faults: &Faults, n: u64) -> StreamAction {
    if faults
        .refused_stream_every
        .is_some_and(|k| n.is_multiple_of(k))
    {
        return StreamAction::Refuse;
    }
    if faults
        .internal_error_every
        .is_some_and(|k| n.is_multiple_of(k))
    {
        return StreamAction::ServeThenReset;
    }
    StreamAction::Serve
}

/// Whether the server flips the header table size (see
/// [`Faults::header_table_flip_every`]) after the `n`th stream (1-based)
/// of a connection.
pub fn flips_table_after(faults: &Faults, n: u64) -> bool {
    faults
        .header_table_flip_every
        .is_some_and(|k| n.is_multiple_of(k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_parses_ranges_and_single_values() {
        assert_eq!(
            "5-20".parse::<LatencyRange>(),
            Ok(LatencyRange {
                min_ms: 5,
                max_ms: 20
            })
        );
        assert_eq!(
            "7".parse::<LatencyRange>(),
            Ok(LatencyRange {
                min_ms: 7,
                max_ms: 7
            })
        );
        assert!("20-5".parse::<LatencyRange>().is_err());
        assert!("a-b".parse::<LatencyRange>().is_err());
        assert!("0-60001".parse::<LatencyRange>().is_err());
    }

    #[test]
    fn latency_pick_covers_the_inclusive_range() {
        let r = LatencyRange {
            min_ms: 10,
            max_ms: 12,
        };
        assert_eq!(r.pick(0.0), Duration::from_millis(10));
        assert_eq!(r.pick(0.5), Duration::from_millis(11));
        assert_eq!(r.pick(0.999_999), Duration::from_millis(12));
    }

    #[test]
    fn server_error_follows_the_ratio_and_the_coin() {
        let f = Faults {
            error_ratio: 0.25,
            ..Faults::default()
        };
        assert_eq!(f.server_error(0.1, true), Some(ServerError::Internal));
        assert_eq!(f.server_error(0.1, false), Some(ServerError::Unavailable));
        assert_eq!(f.server_error(0.25, true), None);
        assert_eq!(Faults::default().server_error(0.0, true), None);
    }

    #[test]
    fn bucket_allows_a_burst_then_the_rate() {
        let t0 = crate::clock::instant();
        let mut b = TokenBucket::new(2, t0);
        assert!(b.take(t0).is_ok());
        assert!(b.take(t0).is_ok());
        let wait = b.take(t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert!(b.take(t0 + Duration::from_millis(500)).is_ok());
        assert!(b.take(t0 + Duration::from_millis(500)).is_err());
    }

    #[test]
    fn limiter_is_per_sender_and_answers_whole_seconds() {
        let t0 = crate::clock::instant();
        let mut l = SenderLimiter::default();
        assert_eq!(l.admit("a", t0), Ok(()));
        l.set_rate(Some(1));
        assert_eq!(l.admit("a", t0), Ok(()));
        assert_eq!(l.admit("a", t0), Err(1));
        assert_eq!(l.admit("b", t0), Ok(()));
        l.set_rate(None);
        assert_eq!(l.admit("a", t0), Ok(()));
    }

    #[test]
    fn conn_action_resets_every_nth_and_goes_away_once() {
        let f = Faults {
            goaway_every: Some(3),
            reset_every: Some(4),
            ..Faults::default()
        };
        assert_eq!(conn_action(&f, 1, false), ConnAction::Serve);
        assert_eq!(conn_action(&f, 3, false), ConnAction::ServeThenGoAway);
        assert_eq!(conn_action(&f, 3, true), ConnAction::Serve);
        assert_eq!(conn_action(&f, 4, true), ConnAction::Reset);
        assert_eq!(
            conn_action(&Faults::default(), 1000, false),
            ConnAction::Serve
        );
    }

    #[test]
    fn stream_action_refuses_every_nth_and_fails_every_mth_after_serving() {
        let f = Faults {
            refused_stream_every: Some(5),
            internal_error_every: Some(7),
            ..Faults::default()
        };
        let actions: Vec<StreamAction> = (1..=35).map(|n| stream_action(&f, n)).collect();
        let at = |a| {
            (1..=35u64)
                .filter(|&n| actions[n as usize - 1] == a)
                .collect::<Vec<_>>()
        };
        assert_eq!(at(StreamAction::Refuse), [5, 10, 15, 20, 25, 30, 35]);
        assert_eq!(at(StreamAction::ServeThenReset), [7, 14, 21, 28]);
        assert_eq!(stream_action(&Faults::default(), 35), StreamAction::Serve);
        assert!(!flips_table_after(&f, 7));
        let flips = Faults {
            header_table_flip_every: Some(3),
            ..Faults::default()
        };
        assert!(flips_table_after(&flips, 3) && flips_table_after(&flips, 6));
        assert!(!flips_table_after(&flips, 4));
    }

    #[test]
    fn stream_faults_are_validated() {
        for bad in [
            r#"{"refused_stream_every":0}"#,
            r#"{"internal_error_every":0}"#,
            r#"{"header_table_flip_every":0}"#,
            r#"{"h2_stream_window":0}"#,
            r#"{"h2_stream_window":2147483648}"#,
        ] {
            let f: Faults = serde_json::from_str(bad).unwrap();
            assert!(f.validate().is_err(), "{bad}");
        }
        let f: Faults =
            serde_json::from_str(r#"{"h2_stream_window":2,"refused_stream_every":5}"#).unwrap();
        assert_eq!(f.validate(), Ok(()));
    }

    #[test]
    fn outage_windows_parse_and_apply_to_their_milliseconds() {
        assert_eq!(
            "2000".parse::<WindowMs>(),
            Ok(WindowMs {
                from_ms: 0,
                to_ms: 2000
            })
        );
        let w: WindowMs = "500-2500".parse().unwrap();
        assert_eq!(w.len(), Duration::from_millis(2000));
        assert!(!w.contains(499) && w.contains(500) && w.contains(2499) && !w.contains(2500));
        for bad in ["", "5-5", "9-1", "a", "0-86400001"] {
            assert!(bad.parse::<WindowMs>().is_err(), "{bad:?}");
        }
        let f = Faults {
            reset_window_ms: Some("0-3000".parse().unwrap()),
            refuse_window_ms: Some("1000-2000".parse().unwrap()),
            ..Faults::default()
        };
        assert!(f.has_outage() && !Faults::default().has_outage());
        let at = |ms| f.outage_at(Duration::from_millis(ms));
        assert_eq!(at(0), Some(Outage::ResetAfterRead));
        assert_eq!(at(1000), Some(Outage::Refuse));
        assert_eq!(at(1999), Some(Outage::Refuse));
        assert_eq!(at(2000), Some(Outage::ResetAfterRead));
        assert_eq!(at(3000), None);
        assert_eq!(Faults::default().outage_at(Duration::ZERO), None);
        let json = serde_json::to_string(&f).unwrap();
        assert!(json.contains(r#""reset_window_ms":"0-3000""#), "{json}");
        assert_eq!(serde_json::from_str::<Faults>(&json).unwrap(), f);
        assert!(serde_json::from_str::<Faults>(r#"{"refuse_window_ms":"3-1"}"#).is_err());
    }

    #[test]
    fn faults_json_round_trips_and_rejects_unknown_fields() {
        let f: Faults =
            serde_json::from_str(r#"{"error_ratio":0.1,"latency_ms":"1-5","goaway_every":10}"#)
                .unwrap();
        assert_eq!(f.latency_ms.unwrap().max_ms, 5);
        let back: Faults = serde_json::from_str(&serde_json::to_string(&f).unwrap()).unwrap();
        assert_eq!(back, f);
        assert!(serde_json::from_str::<Faults>(r#"{"error_rate":0.1}"#).is_err());
        assert!(serde_json::from_str::<Faults>(r#"{"latency_ms":"9-1"}"#).is_err());
    }
}
