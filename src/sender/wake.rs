//! Waking one device: token, request, answer, retry, as the core decides.
//!
//! [`WnsSender`] is shared by all shards. It owns one [`TokenSource`] per
//! configured app (PFN), one throttle per credential, and one set of
//! connection pools per shard and authority, so a shard's pushes travel on
//! connections that shard's runtime drives.

use super::conn::{ConnError, Protocol, Reply, Timeouts, REFUSED_STREAM};
use super::pool::{AuthorityPool, PoolLimits};
use super::tls::{self, Alpn};
use super::tokens::{TokenEndpoint, TokenSource};
use crate::clock::monotonic_ms;
use crate::config::{resolve_secret, Settings};
use crate::core::wns::request::{new_cv_header, write_wake_headers, MAX_WAKE_HEADERS, WAKE_BODY};
use crate::core::wns::retry::{
    CredentialSignal, CredentialThrottle, Decision, PushAttempt, RetryPolicy,
};
use crate::core::wns::token::TokenFlow;
use crate::core::wns::AccessToken;
use crate::core::wns::{classify, Outcome, PushResult, WnsMeta};
use crate::core::{ChannelUri, DeadReason, UnixTime};
use crate::telemetry::metrics as m;
use anyhow::Context;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use metrics::{Counter, Gauge, Histogram};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

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
}

/// How far one wake got: the core's attempt state, and the resends of
/// requests that got no answer (which do not count as attempts).
#[derive(Debug, Default)]
pub(super) struct Tries {
    pub(super) attempt: PushAttempt,
    pub(super) lost: u32,
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
    /// Per shard: pools by authority.
    pools: Vec<Mutex<HashMap<String, Arc<AuthorityPool>>>>,
    /// `X-WNS-TTL` to send, seconds (`wns.ttl`).
    ttl_secs: Option<u32>,
    /// Send `X-WNS-RequestForStatus: true` (`wns.request_for_status`).
    request_status: bool,
    metrics: OnceLock<SenderMetrics>,
}

impl WnsSender {
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
            policy: RetryPolicy::default(),
            pools: (0..shards.max(1))
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
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
        let pool = Arc::new(AuthorityPool::new(
            authority,
            &dial,
            self.tls.clone(),
            self.limits,
            self.timeouts,
        ));
        pools.insert(authority.to_owned(), pool.clone());
        pool
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
            .attempts(shard, uri, pfn, tries, wait, &mut answered)
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

    /// The request, answer and retry loop of [`WnsSender::wake`].
    async fn attempts(
        &self,
        shard: usize,
        uri: &ChannelUri,
        pfn: &str,
        mut tries: Tries,
        mut wait: Option<Duration>,
        answered: &mut Option<Instant>,
    ) -> WakeReport {
        let now = &crate::clock::now;
        let Some(app) = self.apps.get(pfn) else {
            return no_credentials(pfn, now());
        };
        let pool = self.pool(shard, uri.host());
        let target = uri.path_and_query();
        if !pool.accepts(target) {
            return bad_channel_uri(now());
        }
        let body = Bytes::from_static(WAKE_BODY);
        let mut headers = Vec::with_capacity(MAX_WAKE_HEADERS);
        loop {
            if let Some(wait) = wait.take() {
                // Boxed: rare, and every wake in flight would otherwise
                // carry the timer inline.
                Box::pin(tokio::time::sleep(wait)).await;
            }
            if let Some(wait) = self.credential_wait(app) {
                if wait > self.policy.max_retry_after {
                    return WakeReport::failed(
                        PushResult::CredentialThrottled,
                        "the credential is paused by WNS".into(),
                        tries.attempt.attempts(),
                        now(),
                    );
                }
                Box::pin(tokio::time::sleep(wait)).await;
            }
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
            let result = pool.post(target, &headers, body.clone()).await;
            let got = crate::clock::instant();
            match self.judge(app, &mut tries, &token, result, (sent, got), answered, now) {
                Step::Done(report) => return report,
                Step::Again(w) => wait = w,
            }
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

    /// What follows the result of one request sent at `sent` with `token`
    /// and ended by `got`: the final report, or another try (after a
    /// wait). Sets `answered` when WNS answered.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn judge(
        &self,
        app: &App,
        tries: &mut Tries,
        token: &AccessToken,
        result: Result<(Reply, Protocol), ConnError>,
        (sent, got): (Instant, Instant),
        answered: &mut Option<Instant>,
        now: &impl Fn() -> UnixTime,
    ) -> Step {
        let met = self.metrics();
        let (reply, protocol) = match result {
            Ok(r) => r,
            Err(e) if resend_allowed(&e, tries) => {
                tries.lost += 1;
                let reason = resend_reason(&e);
                metrics::counter!(m::WNS_RESENDS, "reason" => reason).increment(1);
                if e.may_have_been_processed() {
                    // WNS may have taken the first: the device may be
                    // woken twice. Harmless, and counted.
                    metrics::counter!(m::PUSH_POSSIBLE_DUPLICATES, "reason" => reason).increment(1);
                }
                return Step::Again(None);
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
        *answered = Some(got);
        met.latency.record(got.duration_since(sent).as_secs_f64());
        let at = now();
        let outcome = classify::outcome(reply.status, &reply.headers, at);
        met.response(&outcome, reply.status).increment(1);
        let verdict = tries.attempt.on_outcome(
            &outcome,
            &self.policy,
            crate::core::wns::RetryContext {
                elapsed: std::time::Duration::ZERO,
                level: tries.attempt.attempts() + 1,
                jitter: crate::clock::random::<u64>(),
            },
        );
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

/// The resend rule for a request that got no answer.
///
/// - Safe to resend: the server never processed it (a failed connect or
///   TLS handshake, a stream refused with REFUSED_STREAM, a stream above a
///   GOAWAY's last stream id, a request never written).
/// - Maybe processed (a stream reset with INTERNAL_ERROR, CANCEL or any
///   other code, a connection lost after the request was written): resent
///   too, since a raw wake is a shoulder tap that a device answers by
///   checking in, so a duplicate costs one more OMA-DM session while a
///   lost wake leaves the device unmanaged until it polls. Each such
///   resend is counted in `wnsgate_push_possible_duplicates_total`.
/// - Not resent: a timeout (the server was seen alive and did not answer
///   in time) and a protocol error.
///
/// Both kinds of resend share one budget per wake, [`LOST_RESENDS_MAX`]:
/// when a front end resets its connections, the resent requests land on
/// others that may be reset soon after, and a smaller budget for the maybe
/// processed left devices unwoken.
///
/// [`LOST_RESENDS_MAX`]: super::limits::LOST_RESENDS_MAX
fn resend_allowed(e: &ConnError, tries: &Tries) -> bool {
    e.is_retryable_elsewhere() && tries.lost < super::limits::LOST_RESENDS_MAX
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
        ConnError::Connect(..) => PushResult::ConnectFailed,
        ConnError::Tls(..) => PushResult::TlsFailed,
        ConnError::Timeout(_) => PushResult::Timeout,
        ConnError::Unprocessed(_) | ConnError::Reset(_) | ConnError::Lost(_) => {
            PushResult::ConnectionLost
        }
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
            ConnError::Timeout("WNS request"),
            ConnError::Protocol("bad frame".into()),
        ]
    }

    #[test]
    fn requests_without_an_answer_are_resent_up_to_the_lost_budget() {
        // Never processed, then maybe processed.
        for (i, e) in errors().into_iter().take(8).enumerate() {
            assert_eq!(e.may_have_been_processed(), i >= 4, "{e}");
            let mut tries = Tries::new();
            let mut resends = 0;
            while resend_allowed(&e, &tries) {
                tries.lost += 1;
                resends += 1;
            }
            assert_eq!(resends, LOST_RESENDS_MAX, "{e}");
        }
    }

    #[test]
    fn timeouts_and_protocol_errors_are_final() {
        for e in errors().into_iter().skip(8) {
            assert!(!resend_allowed(&e, &Tries::new()), "{e}");
            assert!(!e.may_have_been_processed(), "{e}");
        }
    }

    #[test]
    fn resend_reasons_name_the_stream_or_the_connection() {
        let reasons: Vec<&str> = errors().iter().take(8).map(resend_reason).collect();
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
}
