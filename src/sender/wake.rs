//! Waking one device: token, request, answer, retry, as the core decides.
//!
//! [`WnsSender`] is shared by all shards. It owns one [`TokenSource`] per
//! configured app (PFN), one throttle per credential, one
//! [`AuthorityHealth`] per WNS authority (its circuit breaker, and the
//! back-off level of each credential sending to it), and one set of
//! connection pools per shard and authority, so a shard's pushes travel on
//! connections that shard's runtime drives.
//!
//! A wake waits before a retry (the back-off, a credential pause, its
//! authority's breaker) within `wns.retry_window` of its start; the waits
//! are timers of the wake's own future, so a bulk wake's task goes on with
//! its other wakes meanwhile.

use super::conn::{ConnError, Protocol, Reply, Timeouts, REFUSED_STREAM};
use super::health::{AuthorityHealth, HealthView};
use super::pool::{AuthorityPool, PoolLimits};
use super::tls::{self, Alpn};
use super::tokens::{TokenEndpoint, TokenSource};
use crate::clock::monotonic_ms;
use crate::config::{resolve_secret, Settings};
use crate::core::wns::request::{new_cv_header, write_wake_headers, MAX_WAKE_HEADERS, WAKE_BODY};
use crate::core::wns::retry::{
    CredentialSignal, CredentialThrottle, Decision, NoAnswer, PushAttempt, Resend, RetryContext,
    RetryPolicy,
};
use crate::core::wns::token::TokenFlow;
use crate::core::wns::{classify, Outcome, PushResult, WnsMeta};
use crate::core::wns::{AccessToken, TokenError};
use crate::core::wns::{Admit, BreakerPolicy};
use crate::core::{ChannelUri, DeadReason, UnixTime};
use crate::telemetry::metrics as m;
use anyhow::Context;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use metrics::{Counter, Gauge, Histogram};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// What became of one wake-up.
///
/// The diagnostic headers (`X-WNS-Msg-ID`, `X-WNS-Debug-Trace`, `MS-CV`,
/// ...) stay in the answer's header map and are read when the report is
/// logged or serialized, so a bulk wake that only counts results copies
/// no header text.
#[derive(Debug, Clone)]
pub struct WakeReport {
    /// How the wake ended.
    pub result: PushResult,
    /// The last WNS outcome seen (`received`, `dropped`, `channel_expired`, ...).
    pub wns_outcome: Option<Outcome>,
    /// The last HTTP status from WNS.
    pub status: Option<u16>,
    /// The headers of the last WNS answer.
    reply: Option<HeaderMap>,
    /// Set when WNS declared the channel dead.
    pub dead: Option<DeadReason>,
    pub attempts: u32,
    pub protocol: Option<&'static str>,
    /// When the last answer arrived.
    pub at: UnixTime,
    /// Why the push got no WNS answer, when it did not.
    pub error: Option<String>,
}

impl WakeReport {
    fn failed(result: PushResult, error: String, attempts: u32, now: UnixTime) -> WakeReport {
        WakeReport {
            result,
            wns_outcome: None,
            status: None,
            reply: None,
            dead: None,
            attempts,
            protocol: None,
            at: now,
            error: Some(error),
        }
    }

    /// The report of a wake WNS answered with `outcome` (HTTP `status`) at
    /// `at`, after one attempt, ending as `result`; without the answer's
    /// headers. For transports other than [`WnsSender`], such as tests'
    /// stand-ins.
    pub fn answered(
        result: PushResult,
        outcome: Outcome,
        status: u16,
        dead: Option<DeadReason>,
        at: UnixTime,
    ) -> WakeReport {
        WakeReport {
            result,
            wns_outcome: Some(outcome),
            status: Some(status),
            reply: None,
            dead,
            attempts: 1,
            protocol: Some("h2"),
            at,
            error: None,
        }
    }

    pub fn delivered(&self) -> bool {
        self.result == PushResult::Delivered
    }

    /// The diagnostic headers of the last WNS answer (empty without one).
    pub fn meta(&self) -> WnsMeta {
        self.reply
            .as_ref()
            .map(WnsMeta::from_headers)
            .unwrap_or_default()
    }
}

/// Metric handles of the wake path, resolved once: looking a labelled
/// series up in the recorder on every push costs more than the rest of
/// the bookkeeping together.
struct SenderMetrics {
    inflight: Gauge,
    latency: Histogram,
    duration: Histogram,
    /// `wnsgate_wns_responses_total` by outcome and status label, created
    /// on first use so the scrape only shows pairs that happened.
    responses: Box<[OnceLock<Counter>]>,
    /// `wnsgate_pushes_total` by result code, created on first use.
    pushes: [OnceLock<Counter>; PushResult::ALL.len()],
}

impl SenderMetrics {
    fn new() -> SenderMetrics {
        SenderMetrics {
            inflight: metrics::gauge!(m::WNS_INFLIGHT),
            latency: metrics::histogram!(m::WNS_LATENCY),
            duration: metrics::histogram!(m::PUSH_DURATION),
            responses: (0..Outcome::LABELS.len() * m::STATUS_LABELS.len())
                .map(|_| OnceLock::new())
                .collect(),
            pushes: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    fn response(&self, outcome: &Outcome, status: u16) -> &Counter {
        let (o, st) = (outcome.index(), m::status_index(status));
        self.responses[o * m::STATUS_LABELS.len() + st].get_or_init(|| {
            metrics::counter!(m::WNS_RESPONSES, "outcome" => outcome.label(), "status" => m::STATUS_LABELS[st])
        })
    }

    fn push(&self, result: PushResult) {
        self.pushes[usize::from(result.code())]
            .get_or_init(|| metrics::counter!(m::PUSHES, "result" => result.label()))
            .increment(1);
    }
}

pub(super) struct App {
    pub(super) tokens: Arc<TokenSource>,
    throttle: Mutex<CredentialThrottle>,
    /// Its place in `[[wns.apps]]`: its back-off gate at each authority.
    index: usize,
}

/// How far one wake got: the core's attempt state (answered requests,
/// resends of requests that got no answer), and how it would end if it
/// were retried no more.
#[derive(Debug, Default)]
pub(super) struct Tries {
    pub(super) attempt: PushAttempt,
    /// The last failure, as the wake's report were it the last.
    last: Option<Box<WakeReport>>,
}

impl Tries {
    pub(super) fn new() -> Tries {
        Tries::default()
    }
}

/// What follows one request's result.
pub(super) enum Step {
    Done(WakeReport),
    /// Send again, after waiting this long if given.
    Again(Option<Duration>),
}

/// The times of one request: when its wake started, when it was sent,
/// when its result came.
#[derive(Debug, Clone, Copy)]
pub(super) struct Times {
    pub(super) started: Instant,
    pub(super) sent: Instant,
    pub(super) got: Instant,
}

/// Why a wait for a retry ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waited {
    /// Its time came.
    Done,
    /// The authority's breaker changed state: look again now.
    Changed,
    /// The gateway is shutting down and retries have stopped.
    Stopping,
}

fn no_credentials(pfn: &str, now: UnixTime) -> WakeReport {
    WakeReport::failed(
        PushResult::NoCredentials,
        format!("no [[wns.apps]] entry for pfn {pfn}"),
        0,
        now,
    )
}

fn bad_channel_uri(now: UnixTime) -> WakeReport {
    WakeReport::failed(
        PushResult::BadChannelUri,
        "the channel URI does not parse".into(),
        0,
        now,
    )
}

/// The WNS sender shared by all shards.
pub struct WnsSender {
    apps: HashMap<String, App>,
    tls: Arc<rustls::ClientConfig>,
    connect_to: Option<String>,
    limits: PoolLimits,
    timeouts: Timeouts,
    policy: RetryPolicy,
    breaker: BreakerPolicy,
    /// Per shard: pools by authority.
    pools: Vec<Mutex<HashMap<String, Arc<AuthorityPool>>>>,
    /// By authority, shared by every shard's pool for it.
    healths: Mutex<HashMap<String, Arc<AuthorityHealth>>>,
    /// [`monotonic_ms`] after which no retry starts or waits: set when the
    /// gateway shuts down; `u64::MAX` until then.
    retries_until_ms: AtomicU64,
    /// Notified when `retries_until_ms` is set.
    stop: Notify,
    /// `X-WNS-TTL` to send, seconds (`wns.ttl`).
    ttl_secs: Option<u32>,
    /// Send `X-WNS-RequestForStatus: true` (`wns.request_for_status`).
    request_status: bool,
    metrics: OnceLock<SenderMetrics>,
}

impl WnsSender {
    /// Fetches one access token for each `[[wns.apps]]` entry, in the
    /// order of the file: its PFN and how long the token is valid, or why
    /// none was had (`check-config --probe-wns`).
    pub async fn probe_tokens(&self) -> Vec<(String, Result<Duration, TokenError>)> {
        let mut apps: Vec<&App> = self.apps.values().collect();
        apps.sort_by_key(|a| a.index);
        let mut probed = Vec::with_capacity(apps.len());
        for app in apps {
            let got = app.tokens.token().await.map(|t| t.lifetime());
            probed.push((app.tokens.pfn().to_owned(), got));
        }
        probed
    }

    /// Builds the sender from the settings: one token source per
    /// `[[wns.apps]]`, TLS with `wns.ca_file`, pools for `shards` shards.
    pub fn new(settings: &Settings, shards: usize) -> anyhow::Result<WnsSender> {
        let ca = (!settings.wns.ca_file.is_empty()).then(|| Path::new(&settings.wns.ca_file));
        let timeouts = Timeouts::default();
        let mut apps = HashMap::new();
        for (i, app) in settings.wns.apps.iter().enumerate() {
            let secret = resolve_secret(&format!("wns.apps[{i}]"), app)?;
            let flow = if app.entra_tenant.is_empty() {
                TokenFlow::Classic
            } else {
                TokenFlow::Entra {
                    tenant: app.entra_tenant.clone(),
                }
            };
            let url = match (&flow, app.token_url.as_str()) {
                (_, url) if !url.is_empty() => url.to_owned(),
                (TokenFlow::Classic, _) => settings.wns.token_url.clone(),
                (TokenFlow::Entra { .. }, _) => flow.endpoint(),
            };
            let client_id = if app.client_id.is_empty() {
                &app.package_sid
            } else {
                &app.client_id
            };
            let endpoint =
                TokenEndpoint::new(&url, ca, timeouts).with_context(|| format!("wns.apps[{i}]"))?;
            let tokens = TokenSource::new(&app.pfn, flow, client_id, secret, endpoint);
            apps.insert(
                app.pfn.clone(),
                App {
                    tokens,
                    throttle: Mutex::new(CredentialThrottle::new()),
                    index: i,
                },
            );
        }
        let connect_to = Some(settings.wns.connect_to.trim().to_owned()).filter(|s| !s.is_empty());
        Ok(WnsSender {
            apps,
            tls: tls::client_config(ca, Alpn::H2AndHttp1).context("WNS TLS configuration")?,
            connect_to,
            limits: PoolLimits::default(),
            timeouts,
            policy: RetryPolicy {
                window: settings.wns_retry_window,
                max_unanswered_resends: super::limits::LOST_RESENDS_MAX,
                ..RetryPolicy::default()
            },
            breaker: BreakerPolicy {
                probe_timeout: Duration::from_millis(
                    super::limits::CONNECT_MS_MAX
                        + super::limits::TLS_HANDSHAKE_MS_MAX
                        + super::limits::REQUEST_MS_MAX,
                ),
                ..settings.wns_breaker
            },
            pools: (0..shards.max(1))
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            healths: Mutex::new(HashMap::new()),
            retries_until_ms: AtomicU64::new(u64::MAX),
            stop: Notify::new(),
            ttl_secs: settings.wns_ttl_secs,
            request_status: settings.wns.request_for_status,
            metrics: OnceLock::new(),
        })
    }

    pub(super) fn pool(&self, shard: usize, authority: &str) -> Arc<AuthorityPool> {
        let mut pools = self.pools[shard % self.pools.len()].lock();
        if let Some(p) = pools.get(authority) {
            return p.clone();
        }
        let dial = self
            .connect_to
            .clone()
            .unwrap_or_else(|| format!("{authority}:443"));
        let pool = Arc::new(AuthorityPool::with_health(
            authority,
            &dial,
            self.tls.clone(),
            self.limits,
            self.timeouts,
            self.health(authority),
        ));
        pools.insert(authority.to_owned(), pool.clone());
        pool
    }

    /// The health of `authority`, made on first use.
    fn health(&self, authority: &str) -> Arc<AuthorityHealth> {
        self.healths
            .lock()
            .entry(authority.to_owned())
            .or_insert_with(|| {
                Arc::new(AuthorityHealth::new(
                    authority,
                    self.apps.len(),
                    self.breaker,
                    self.policy.clone(),
                ))
            })
            .clone()
    }

    /// The circuit breaker of every WNS authority woken so far, by
    /// authority, for `GET /v1/stats`.
    pub fn breakers(&self) -> BTreeMap<String, HealthView> {
        let now = monotonic_ms();
        self.healths
            .lock()
            .iter()
            .map(|(a, h)| (a.clone(), h.view(now)))
            .collect()
    }

    /// The retry policy in force (`wns.retry_window` and the budgets).
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// Shutdown: no wake starts or goes on waiting for a retry after
    /// `within` from now; one whose wait would end later ends then with
    /// its last failure, so that its result is kept.
    pub fn stop_retrying_within(&self, within: Duration) {
        let until = monotonic_ms().saturating_add(within.as_millis() as u64);
        self.retries_until_ms.fetch_min(until, Ordering::AcqRel);
        self.stop.notify_waiters();
    }

    fn metrics(&self) -> &SenderMetrics {
        self.metrics.get_or_init(SenderMetrics::new)
    }

    /// Counts a wake in flight (until [`WnsSender::finished`]).
    pub(super) fn begun(&self) {
        self.metrics().inflight.increment(1.0);
    }

    /// The app configured for `pfn`.
    pub(super) fn app(&self, pfn: &str) -> Option<&App> {
        self.apps.get(pfn)
    }

    /// Sends one wake-up to `uri` with the credentials of `pfn`, retrying
    /// as the core decides, and reports the final result.
    pub async fn wake(&self, shard: usize, uri: &ChannelUri, pfn: &str) -> WakeReport {
        let started = crate::clock::instant();
        self.begun();
        self.wake_on(shard, uri, pfn, Tries::new(), None, started)
            .await
    }

    /// Goes on with a wake already counted in flight since `started`:
    /// first waits `wait`, then sends (again) and follows the answers.
    pub(super) async fn wake_on(
        &self,
        shard: usize,
        uri: &ChannelUri,
        pfn: &str,
        tries: Tries,
        wait: Option<Duration>,
        started: Instant,
    ) -> WakeReport {
        let mut answered = None;
        let report = self
            .attempts(shard, uri, pfn, tries, wait, started, &mut answered)
            .await;
        self.finished(uri, pfn, &report, started, answered);
        report
    }

    /// Counts a wake's final result (it leaves the in-flight gauge) and
    /// logs it. `answered`: when its last answer came, if one did.
    pub(super) fn finished(
        &self,
        uri: &ChannelUri,
        pfn: &str,
        report: &WakeReport,
        started: Instant,
        answered: Option<Instant>,
    ) {
        let met = self.metrics();
        met.inflight.decrement(1.0);
        met.push(report.result);
        let end = answered.unwrap_or_else(crate::clock::instant);
        met.duration
            .record(end.duration_since(started).as_secs_f64());
        log_final(uri, pfn, report);
    }

    /// The request, answer and retry loop of [`WnsSender::wake`]: before
    /// each send, the back-off, the credential's pause and the
    /// authority's breaker, each waited for within the wake's window.
    #[allow(clippy::too_many_arguments)]
    async fn attempts(
        &self,
        shard: usize,
        uri: &ChannelUri,
        pfn: &str,
        mut tries: Tries,
        mut wait: Option<Duration>,
        started: Instant,
        answered: &mut Option<Instant>,
    ) -> WakeReport {
        let now = &crate::clock::now;
        let Some(app) = self.apps.get(pfn) else {
            return no_credentials(pfn, now());
        };
        let pool = self.pool(shard, uri.host());
        let health = pool.health();
        let target = uri.path_and_query();
        if !pool.accepts(target) {
            return bad_channel_uri(now());
        }
        let window_end = started + self.policy.window;
        let body = Bytes::from_static(WAKE_BODY);
        let mut headers = Vec::with_capacity(MAX_WAKE_HEADERS);
        loop {
            if let Some(wait) = wait.take() {
                // Boxed: rare, and every wake in flight would otherwise
                // carry the timer inline. The breaker closing ends the
                // wait early: the authority answers again.
                let until = crate::clock::instant() + wait;
                if Box::pin(self.pause(health, until, true)).await == Waited::Stopping {
                    return self.stopped(&mut tries, health, now());
                }
            }
            if let Some(wait) = self.credential_wait(app) {
                let until = crate::clock::instant().checked_add(wait);
                if wait > self.policy.max_retry_after || until.is_none_or(|u| u > window_end) {
                    return WakeReport::failed(
                        PushResult::CredentialThrottled,
                        "the credential is paused by WNS past the retry window".into(),
                        tries.attempt.attempts(),
                        now(),
                    );
                }
                let until = until.unwrap_or(window_end);
                if Box::pin(self.pause(health, until, false)).await == Waited::Stopping {
                    return self.stopped(&mut tries, health, now());
                }
            }
            let probe = match Box::pin(self.admission(health, window_end)).await {
                Ok(probe) => probe,
                Err(Waited::Stopping) => return self.stopped(&mut tries, health, now()),
                Err(_) => return self.window_ran_out(&mut tries, health, now()),
            };
            // Whatever becomes of it, a probe's end lets the breaker
            // admit another when no verdict came of it.
            let _probe = probe.then(|| ProbeEnds(health));
            let token = match app.tokens.token().await {
                Ok(t) => t,
                Err(e) => {
                    return WakeReport::failed(
                        PushResult::TokenUnavailable,
                        e.to_string(),
                        tries.attempt.attempts(),
                        now(),
                    )
                }
            };
            self.write_headers(&mut headers, &token, body.len());
            *answered = None;
            let sent = crate::clock::instant();
            let result = pool.send(target, &headers, body.clone(), probe).await;
            let got = crate::clock::instant();
            let times = Times { started, sent, got };
            match self.judge(
                app, health, &mut tries, &token, result, times, answered, now,
            ) {
                Step::Done(report) => return report,
                Step::Again(w) => wait = w,
            }
        }
    }

    /// Waits until `until`, at most until retries stop (shutdown); with
    /// `on_change`, also until the authority's breaker changes state.
    async fn pause(&self, health: &AuthorityHealth, until: Instant, on_change: bool) -> Waited {
        loop {
            let stop = self.stop.notified();
            let changed = health.changed();
            let (end, stopping) = match self.retries_until() {
                Some(s) if s <= until => (s, true),
                _ => (until, false),
            };
            tokio::select! {
                biased;
                // Retries stop from some time on: wait again, up to then.
                _ = stop => continue,
                _ = changed, if on_change => return Waited::Changed,
                _ = tokio::time::sleep_until(end.into()) => {
                    return if stopping { Waited::Stopping } else { Waited::Done };
                }
            }
        }
    }

    /// Waits for the authority's breaker to admit this wake, at most
    /// until `window_end`: `Ok(true)` when it goes as the breaker's probe,
    /// `Ok(false)` when the breaker is closed; `Err(Waited::Done)` when the
    /// window ran out first, `Err(Waited::Stopping)` at shutdown.
    async fn admission(
        &self,
        health: &AuthorityHealth,
        window_end: Instant,
    ) -> Result<bool, Waited> {
        loop {
            let ms = monotonic_ms();
            let until_ms = match health.admit(ms) {
                Admit::Go => return Ok(false),
                Admit::Probe => return Ok(true),
                Admit::Wait { until_ms } => until_ms,
            };
            let now = crate::clock::instant();
            if now >= window_end {
                return Err(Waited::Done);
            }
            let until = now
                .checked_add(Duration::from_millis(until_ms.saturating_sub(ms)))
                .map_or(window_end, |u| u.min(window_end));
            match self.pause(health, until, true).await {
                Waited::Stopping => return Err(Waited::Stopping),
                Waited::Done | Waited::Changed => {}
            }
        }
    }

    /// When retries stop (shutdown), if they do.
    fn retries_until(&self) -> Option<Instant> {
        let until = self.retries_until_ms.load(Ordering::Acquire);
        (until != u64::MAX).then(|| {
            let now_ms = monotonic_ms();
            crate::clock::instant() + Duration::from_millis(until.saturating_sub(now_ms))
        })
    }

    /// The report of a wake whose window ran out while it waited to be
    /// sent (again): its authority's breaker stayed open.
    fn window_ran_out(
        &self,
        tries: &mut Tries,
        health: &AuthorityHealth,
        now: UnixTime,
    ) -> WakeReport {
        let why = format!(
            "no retry within wns.retry_window ({} s): the circuit breaker of {} stayed {}",
            self.policy.window.as_secs(),
            health.authority(),
            health.state().label(),
        );
        give_up(tries, PushResult::RetryWindowExhausted, why, now)
    }

    /// The report of a wake whose wait was cut short by the shutdown.
    fn stopped(&self, tries: &mut Tries, health: &AuthorityHealth, now: UnixTime) -> WakeReport {
        match tries.last.take() {
            Some(last) => {
                let mut r = *last;
                let why = "not retried: the gateway is shutting down";
                r.error = Some(match (r.error.take(), r.wns_outcome) {
                    (Some(e), _) => format!("{why}; last: {e}"),
                    (None, Some(o)) => format!("{why}; last: WNS answered {}", o.label()),
                    (None, None) => why.to_owned(),
                });
                r.at = now;
                r
            }
            None => WakeReport::failed(
                PushResult::ConnectFailed,
                format!(
                    "not sent: the gateway is shutting down while the circuit breaker of {} is {}",
                    health.authority(),
                    health.state().label()
                ),
                tries.attempt.attempts(),
                now,
            ),
        }
    }

    /// The headers of one wake request sent with `token`.
    pub(super) fn write_headers(
        &self,
        headers: &mut Vec<(HeaderName, HeaderValue)>,
        token: &AccessToken,
        body_len: usize,
    ) {
        let mut cv = new_cv_header(crate::clock::random::<u128>());
        // Unique per request: never worth a place in the peer's HPACK
        // table, where it would only push out entries that repeat.
        cv.set_sensitive(true);
        write_wake_headers(
            headers,
            token,
            self.ttl_secs,
            self.request_status,
            cv,
            body_len,
        );
    }

    /// What follows the result of one request sent with `token`: the
    /// final report, or another try (after a wait). Sets `answered` when
    /// WNS answered. Feeds the back-off gate of the app at the request's
    /// authority (`health`): a failure worth backing off for raises it, an
    /// answer that is not one ends its episode.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn judge(
        &self,
        app: &App,
        health: &AuthorityHealth,
        tries: &mut Tries,
        token: &AccessToken,
        result: Result<(Reply, Protocol), ConnError>,
        times: Times,
        answered: &mut Option<Instant>,
        now: &impl Fn() -> UnixTime,
    ) -> Step {
        let met = self.metrics();
        let elapsed = times.got.saturating_duration_since(times.started);
        let (reply, protocol) = match result {
            Ok(r) => r,
            // Never tried: the loop waits for the breaker, no budget spent.
            Err(ConnError::CircuitOpen(_)) => return Step::Again(None),
            Err(e) if e.is_retryable_elsewhere() => {
                let why = if e.is_connection_failure() {
                    NoAnswer::ConnectionFailed
                } else {
                    NoAnswer::Retired
                };
                let level = match why {
                    NoAnswer::ConnectionFailed => health.gate_failure(app.index, monotonic_ms()),
                    NoAnswer::Retired => 0,
                };
                let ctx = RetryContext {
                    elapsed,
                    level,
                    jitter: crate::clock::random::<u64>(),
                };
                let attempts = tries.attempt.attempts() + 1;
                let wait = match tries.attempt.on_no_answer(why, &self.policy, ctx) {
                    Resend::Now => None,
                    Resend::After(wait) => Some(wait),
                    Resend::Exhausted => {
                        return Step::Done(WakeReport::failed(
                            transport_result(&e),
                            e.to_string(),
                            attempts,
                            now(),
                        ))
                    }
                    Resend::WindowExhausted => {
                        let why = format!(
                            "no retry within wns.retry_window ({} s); last: {e}",
                            self.policy.window.as_secs()
                        );
                        return Step::Done(WakeReport::failed(
                            PushResult::RetryWindowExhausted,
                            why,
                            attempts,
                            now(),
                        ));
                    }
                };
                let reason = resend_reason(&e);
                metrics::counter!(m::WNS_RESENDS, "reason" => reason).increment(1);
                if e.may_have_been_processed() {
                    // WNS may have taken the first: the device may be
                    // woken twice. Harmless, and counted.
                    metrics::counter!(m::PUSH_POSSIBLE_DUPLICATES, "reason" => reason).increment(1);
                }
                tries.last = Some(Box::new(WakeReport::failed(
                    transport_result(&e),
                    e.to_string(),
                    attempts,
                    now(),
                )));
                return Step::Again(wait);
            }
            Err(e) => {
                return Step::Done(WakeReport::failed(
                    transport_result(&e),
                    e.to_string(),
                    tries.attempt.attempts() + 1,
                    now(),
                ))
            }
        };
        *answered = Some(times.got);
        met.latency
            .record(times.got.duration_since(times.sent).as_secs_f64());
        let at = now();
        let outcome = classify::outcome(reply.status, &reply.headers, at);
        met.response(&outcome, reply.status).increment(1);
        let level = match outcome {
            Outcome::ServerError { .. } | Outcome::SenderThrottled { .. } => {
                health.gate_failure(app.index, monotonic_ms())
            }
            _ => {
                health.gate_success(app.index);
                0
            }
        };
        let ctx = RetryContext {
            elapsed,
            level,
            jitter: crate::clock::random::<u64>(),
        };
        let verdict = tries.attempt.on_outcome(&outcome, &self.policy, ctx);
        match verdict.credential {
            Some(CredentialSignal::Throttle { pause }) => {
                app.throttle
                    .lock()
                    .on_sender_throttled(monotonic_ms(), pause);
            }
            Some(CredentialSignal::Blocked) => {
                tracing::error!(
                    pfn = app.tokens.pfn(),
                    "WNS answered 410 Domain Blocked: pushes for this app are stopped"
                );
                app.throttle.lock().on_blocked();
            }
            None => {}
        }
        let (result, dead) = match verdict.decision {
            Decision::Delivered => (PushResult::Delivered, None),
            Decision::Failed(f) => (PushResult::from_failure(f), None),
            Decision::ChannelDead(reason) => (PushResult::ChannelDead, Some(reason)),
            Decision::RefreshTokenThenRetry => {
                app.tokens.invalidate(token);
                metrics::counter!(m::WNS_RESENDS, "reason" => "token_rejected").increment(1);
                return Step::Again(None);
            }
            Decision::RetryAfter(wait) => {
                metrics::counter!(m::WNS_RESENDS, "reason" => outcome.label()).increment(1);
                tries.last = Some(Box::new(WakeReport {
                    result: PushResult::AttemptsExhausted,
                    wns_outcome: Some(outcome),
                    status: Some(reply.status),
                    reply: Some(reply.headers),
                    dead: None,
                    attempts: tries.attempt.attempts(),
                    protocol: Some(protocol.label()),
                    at,
                    error: None,
                }));
                return Step::Again(Some(wait));
            }
        };
        Step::Done(WakeReport {
            result,
            wns_outcome: Some(outcome),
            status: Some(reply.status),
            reply: Some(reply.headers),
            dead,
            attempts: tries.attempt.attempts(),
            protocol: Some(protocol.label()),
            at,
            error: None,
        })
    }

    /// How long the credential is paused for, if it is.
    pub(super) fn credential_wait(&self, app: &App) -> Option<Duration> {
        let t = app.throttle.lock();
        if t.is_blocked() {
            return Some(Duration::MAX);
        }
        if t.ready_at() == 0 {
            // Never throttled: no need to read the clock.
            return None;
        }
        let now = monotonic_ms();
        t.is_paused(now)
            .then(|| Duration::from_millis(t.ready_at().saturating_sub(now)))
    }
}

/// Ends the probe a wake was admitted as, when dropped (see
/// [`AuthorityHealth::probe_ended`]).
struct ProbeEnds<'a>(&'a AuthorityHealth);

impl Drop for ProbeEnds<'_> {
    fn drop(&mut self) {
        self.0.probe_ended();
    }
}

/// The report of a wake that stops retrying as `result`, for `why`: its
/// last failure (WNS's last answer, if any) with the reason added.
fn give_up(tries: &mut Tries, result: PushResult, why: String, now: UnixTime) -> WakeReport {
    match tries.last.take() {
        Some(last) => {
            let mut r = *last;
            let error = match (r.error.take(), r.wns_outcome) {
                (Some(e), _) => format!("{why}; last: {e}"),
                (None, Some(o)) => format!("{why}; last: WNS answered {}", o.label()),
                (None, None) => why,
            };
            r.result = result;
            r.error = Some(error);
            r.at = now;
            r
        }
        None => WakeReport::failed(result, why, tries.attempt.attempts(), now),
    }
}

/// Logs a wake's final result at debug level: the diagnostics Microsoft
/// support asks for, with the channel URI redacted (its token is a
/// credential for that device) and never the access token.
fn log_final(uri: &ChannelUri, pfn: &str, report: &WakeReport) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let meta = report.meta();
    tracing::debug!(
        channel = %uri.redacted(),
        pfn,
        result = report.result.label(),
        outcome = report.wns_outcome.map_or("none", |o| o.label()),
        status = report.status.unwrap_or(0),
        msg_id = meta.msg_id.as_deref().unwrap_or(""),
        debug_trace = meta.debug_trace.as_deref().unwrap_or(""),
        ms_cv = meta.ms_cv.as_deref().unwrap_or(""),
        attempts = report.attempts,
        error = report.error.as_deref().unwrap_or(""),
        "WNS wake finished"
    );
}

/// The `reason` label of a resend after `e` (in `wnsgate_wns_resends_total`,
/// and in `wnsgate_push_possible_duplicates_total` when it may be one).
fn resend_reason(e: &ConnError) -> &'static str {
    match e {
        ConnError::Reset(code) if *code == REFUSED_STREAM => "stream_refused",
        ConnError::Reset(_) => "stream_reset",
        _ => "connection_lost",
    }
}

fn transport_result(e: &ConnError) -> PushResult {
    match e {
        ConnError::Connect(..) | ConnError::CircuitOpen(_) => PushResult::ConnectFailed,
        ConnError::Tls(..) => PushResult::TlsFailed,
        ConnError::Timeout(_) => PushResult::Timeout,
        ConnError::Unprocessed(_)
        | ConnError::Unwritten(_)
        | ConnError::Reset(_)
        | ConnError::Lost(_) => PushResult::ConnectionLost,
        ConnError::Protocol(_) => PushResult::ProtocolError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sender::limits::LOST_RESENDS_MAX;

    const INTERNAL_ERROR: u32 = 0x2;
    const CANCEL: u32 = 0x8;

    fn errors() -> Vec<ConnError> {
        vec![
            ConnError::Connect("db5".into(), "refused".into()),
            ConnError::Tls("db5".into(), "bad certificate".into()),
            ConnError::Unprocessed("above the last stream id of a GOAWAY".into()),
            ConnError::Reset(REFUSED_STREAM),
            ConnError::Reset(INTERNAL_ERROR),
            ConnError::Reset(CANCEL),
            ConnError::Reset(0xff),
            ConnError::Lost("the server closed the connection".into()),
            ConnError::Unwritten("connection reset by peer".into()),
            ConnError::Timeout("WNS request"),
            ConnError::Protocol("bad frame".into()),
        ]
    }

    #[test]
    fn requests_without_an_answer_are_resent_up_to_the_lost_budget() {
        // (maybe processed, a connection failure: resent after a back-off)
        let expected = [
            (false, true),
            (false, true),
            (false, false),
            (false, false),
            (true, false),
            (true, false),
            (true, false),
            (true, true),
            (false, true),
        ];
        let policy = RetryPolicy {
            max_unanswered_resends: LOST_RESENDS_MAX,
            ..RetryPolicy::default()
        };
        for (e, (maybe, connection)) in errors().into_iter().zip(expected) {
            assert!(e.is_retryable_elsewhere(), "{e}");
            assert_eq!(e.may_have_been_processed(), maybe, "{e}");
            assert_eq!(e.is_connection_failure(), connection, "{e}");
            let why = if connection {
                NoAnswer::ConnectionFailed
            } else {
                NoAnswer::Retired
            };
            let mut tries = Tries::new();
            let mut resends = 0;
            loop {
                let ctx = RetryContext {
                    elapsed: Duration::ZERO,
                    level: 1,
                    jitter: 0,
                };
                match tries.attempt.on_no_answer(why, &policy, ctx) {
                    Resend::Now => assert!(!connection, "{e}"),
                    Resend::After(_) => assert!(connection, "{e}"),
                    Resend::Exhausted => break,
                    Resend::WindowExhausted => panic!("{e}: no window ran out"),
                }
                resends += 1;
            }
            assert_eq!(resends, LOST_RESENDS_MAX, "{e}");
        }
    }

    #[test]
    fn timeouts_and_protocol_errors_are_final() {
        for e in errors().into_iter().skip(9) {
            assert!(!e.is_retryable_elsewhere(), "{e}");
            assert!(!e.may_have_been_processed(), "{e}");
        }
        assert!(!ConnError::CircuitOpen("db5".into()).is_retryable_elsewhere());
    }

    #[test]
    fn resend_reasons_name_the_stream_or_the_connection() {
        let reasons: Vec<&str> = errors().iter().take(9).map(resend_reason).collect();
        assert_eq!(
            reasons,
            [
                "connection_lost",
                "connection_lost",
                "connection_lost",
                "stream_refused",
                "stream_reset",
                "stream_reset",
                "stream_reset",
                "connection_lost",
                "connection_lost",
            ]
        );
        assert_eq!(
            ConnError::Reset(INTERNAL_ERROR).to_string(),
            "stream reset by the server (INTERNAL_ERROR)"
        );
        assert_eq!(
            ConnError::Reset(0xff).to_string(),
            "stream reset by the server (code 0xff)"
        );
    }

    fn sender() -> WnsSender {
        let settings = Settings::resolve(&crate::config::Config::default()).unwrap();
        WnsSender::new(&settings, 1).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn at_shutdown_a_wait_for_a_retry_ends_when_retries_stop_not_before() {
        let s = Arc::new(sender());
        let health = s.health("db5.notify.windows.com");
        let t0 = crate::clock::instant();
        let secs = |t: Instant| t.duration_since(t0).as_secs();
        // Retries stop 8 s from 1 s on, while a 60 s wait is under way: it
        // ends then, not at once.
        let waiting = {
            let (s, h) = (s.clone(), health.clone());
            tokio::spawn(async move { s.pause(&h, t0 + Duration::from_secs(60), true).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        s.stop_retrying_within(Duration::from_secs(8));
        assert_eq!(waiting.await.unwrap(), Waited::Stopping);
        assert_eq!(secs(crate::clock::instant()), 9);
        // Once they stopped, no wait goes on.
        let later = crate::clock::instant() + Duration::from_secs(1);
        assert_eq!(s.pause(&health, later, false).await, Waited::Stopping);
        assert_eq!(secs(crate::clock::instant()), 9);
        // A wait that ends before retries stop is not cut short; one that
        // would end later ends when they stop.
        let s = sender();
        let t = crate::clock::instant();
        s.stop_retrying_within(Duration::from_secs(8));
        let until = t + Duration::from_secs(2);
        assert_eq!(s.pause(&health, until, false).await, Waited::Done);
        assert_eq!(secs(crate::clock::instant()), 11);
        let until = t + Duration::from_secs(30);
        assert_eq!(s.pause(&health, until, false).await, Waited::Stopping);
        assert_eq!(secs(crate::clock::instant()), 17);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_for_a_retry_ends_when_the_breaker_changes() {
        let s = Arc::new(sender());
        let health = s.health("db5.notify.windows.com");
        let t0 = crate::clock::instant();
        let waiting = {
            let (s, h) = (s.clone(), health.clone());
            tokio::spawn(async move { s.pause(&h, t0 + Duration::from_secs(20), true).await })
        };
        tokio::time::sleep(Duration::from_secs(3)).await;
        for _ in 0..3 {
            health.on_connection_failed(monotonic_ms(), "refused");
        }
        assert_eq!(waiting.await.unwrap(), Waited::Changed);
        assert_eq!(crate::clock::instant().duration_since(t0).as_secs(), 3);
        // Open: a new wake waits for the breaker, then goes as its probe.
        let window_end = crate::clock::instant() + Duration::from_secs(60);
        assert_eq!(s.admission(&health, window_end).await, Ok(true));
        assert_eq!(crate::clock::instant().duration_since(t0).as_secs(), 4);
        // Half-open, its probe out: another wake waits; the window runs out.
        let short = crate::clock::instant() + Duration::from_secs(2);
        assert_eq!(s.admission(&health, short).await, Err(Waited::Done));
        assert_eq!(crate::clock::instant().duration_since(t0).as_secs(), 6);
    }
}
