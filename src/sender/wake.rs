//! Waking one device: token, request, answer, retry, as the core decides.
//!
//! [`WnsSender`] is shared by all shards. It owns one [`TokenSource`] per
//! configured app (PFN), one throttle per credential, and one set of
//! connection pools per shard and authority, so a shard's pushes travel on
//! connections that shard's runtime drives.

use super::conn::{ConnError, Protocol, Timeouts};
use super::pool::{AuthorityPool, PoolLimits};
use super::tls::{self, Alpn};
use super::tokens::{monotonic_ms, TokenEndpoint, TokenSource};
use crate::config::{resolve_secret, Settings};
use crate::core::wns::request::{new_cv_header, write_wake_headers, WAKE_BODY};
use crate::core::wns::retry::{
    CredentialSignal, CredentialThrottle, Decision, PushAttempt, RetryPolicy,
};
use crate::core::wns::token::TokenFlow;
use crate::core::wns::{classify, WnsMeta};
use crate::core::{ChannelUri, DeadReason, UnixTime};
use crate::telemetry::metrics as m;
use anyhow::Context;
use bytes::Bytes;
use http::{HeaderMap, Uri};
use parking_lot::Mutex;
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Times one push may be re-sent because its connection died before
/// answering; these resends do not count as attempts.
pub const MAX_LOST_RESENDS: u32 = 3;

/// What became of one wake-up.
#[derive(Debug, Clone, Serialize)]
pub struct WakeReport {
    /// `delivered`, a final failure label, `channel_dead`, or a transport
    /// failure label.
    pub result: &'static str,
    /// The last WNS outcome seen (`received`, `dropped`, `channel_expired`, ...).
    pub wns_outcome: Option<&'static str>,
    /// The last HTTP status from WNS.
    pub status: Option<u16>,
    pub msg_id: Option<String>,
    pub debug_trace: Option<String>,
    pub ms_cv: Option<String>,
    pub device_connection: Option<&'static str>,
    pub error_description: Option<String>,
    /// Set when WNS declared the channel dead.
    #[serde(skip)]
    pub dead: Option<DeadReason>,
    pub attempts: u32,
    pub protocol: Option<&'static str>,
    /// When the last answer arrived.
    pub at: String,
    /// Why the push got no WNS answer, when it did not.
    pub error: Option<String>,
}

impl WakeReport {
    fn failed(result: &'static str, error: String, attempts: u32, now: UnixTime) -> WakeReport {
        WakeReport {
            result,
            wns_outcome: None,
            status: None,
            msg_id: None,
            debug_trace: None,
            ms_cv: None,
            device_connection: None,
            error_description: None,
            dead: None,
            attempts,
            protocol: None,
            at: now.to_rfc3339(),
            error: Some(error),
        }
    }

    pub fn delivered(&self) -> bool {
        self.result == "delivered"
    }
}

struct App {
    tokens: Arc<TokenSource>,
    throttle: Mutex<CredentialThrottle>,
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
        })
    }

    fn pool(&self, shard: usize, authority: &str) -> Arc<AuthorityPool> {
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

    /// Sends one wake-up to `uri` with the credentials of `pfn`, retrying
    /// as the core decides, and reports the final result. `now` gives wall
    /// time for `Retry-After` dates and the report.
    pub async fn wake(
        &self,
        shard: usize,
        uri: &ChannelUri,
        pfn: &str,
        now: impl Fn() -> UnixTime,
    ) -> WakeReport {
        let started = Instant::now();
        let Some(app) = self.apps.get(pfn) else {
            return WakeReport::failed(
                "no_credentials",
                format!("no [[wns.apps]] entry for pfn {pfn}"),
                0,
                now(),
            );
        };
        let Ok(target) = Uri::try_from(uri.as_str()) else {
            return WakeReport::failed(
                "bad_channel_uri",
                "the channel URI does not parse".into(),
                0,
                now(),
            );
        };
        let pool = self.pool(shard, uri.host());
        let body = Bytes::from_static(WAKE_BODY);
        let mut attempt = PushAttempt::new();
        let mut lost = 0;
        metrics::gauge!(m::WNS_INFLIGHT).increment(1.0);
        let report = loop {
            if let Some(wait) = self.credential_wait(app) {
                if wait > self.policy.max_retry_after {
                    break WakeReport::failed(
                        "credential_throttled",
                        "the credential is paused by WNS".into(),
                        attempt.attempts(),
                        now(),
                    );
                }
                tokio::time::sleep(wait).await;
            }
            let token = match app.tokens.token().await {
                Ok(t) => t,
                Err(e) => {
                    break WakeReport::failed(
                        "token_unavailable",
                        e.to_string(),
                        attempt.attempts(),
                        now(),
                    )
                }
            };
            let mut headers = HeaderMap::with_capacity(8);
            let cv = new_cv_header(rand::random::<u128>());
            write_wake_headers(&mut headers, &token, None, false, cv, body.len());
            let sent = Instant::now();
            let (reply, protocol) = match pool.post(target.clone(), headers, body.clone()).await {
                Ok(r) => r,
                Err(e) if e.is_retryable_elsewhere() && lost < MAX_LOST_RESENDS => {
                    lost += 1;
                    metrics::counter!(m::WNS_RESENDS, "reason" => "connection_lost").increment(1);
                    continue;
                }
                Err(e) => {
                    break WakeReport::failed(
                        transport_label(&e),
                        e.to_string(),
                        attempt.attempts() + 1,
                        now(),
                    )
                }
            };
            metrics::histogram!(m::WNS_LATENCY).record(sent.elapsed().as_secs_f64());
            let classified = classify(reply.status, &reply.headers, now());
            let label = classified.outcome.label();
            metrics::counter!(m::WNS_RESPONSES, "outcome" => label, "status" => m::status_label(reply.status)).increment(1);
            let verdict =
                attempt.on_outcome(&classified.outcome, &self.policy, rand::random::<u64>());
            match verdict.credential {
                Some(CredentialSignal::Throttle { pause }) => {
                    app.throttle
                        .lock()
                        .on_sender_throttled(monotonic_ms(), pause);
                }
                Some(CredentialSignal::Blocked) => {
                    tracing::error!(
                        pfn,
                        "WNS answered 410 Domain Blocked: pushes for this app are stopped"
                    );
                    app.throttle.lock().on_blocked();
                }
                None => {}
            }
            let done = |result: &'static str, dead: Option<DeadReason>| {
                report_from(
                    result,
                    label,
                    reply.status,
                    classified.meta.clone(),
                    dead,
                    attempt.attempts(),
                    protocol,
                    now(),
                )
            };
            match verdict.decision {
                Decision::Delivered => break done("delivered", None),
                Decision::Failed(f) => break done(f.label(), None),
                Decision::ChannelDead(reason) => break done("channel_dead", Some(reason)),
                Decision::RefreshTokenThenRetry => {
                    app.tokens.invalidate(&token);
                    metrics::counter!(m::WNS_RESENDS, "reason" => "token_rejected").increment(1);
                }
                Decision::RetryAfter(wait) => {
                    metrics::counter!(m::WNS_RESENDS, "reason" => label).increment(1);
                    tokio::time::sleep(wait).await;
                }
            }
        };
        metrics::gauge!(m::WNS_INFLIGHT).decrement(1.0);
        metrics::counter!(m::PUSHES, "result" => report.result).increment(1);
        metrics::histogram!(m::PUSH_DURATION).record(started.elapsed().as_secs_f64());
        report
    }

    /// How long the credential is paused for, if it is.
    fn credential_wait(&self, app: &App) -> Option<Duration> {
        let t = app.throttle.lock();
        if t.is_blocked() {
            return Some(Duration::MAX);
        }
        let now = monotonic_ms();
        t.is_paused(now)
            .then(|| Duration::from_millis(t.ready_at().saturating_sub(now)))
    }
}

#[allow(clippy::too_many_arguments)]
fn report_from(
    result: &'static str,
    outcome: &'static str,
    status: u16,
    meta: WnsMeta,
    dead: Option<DeadReason>,
    attempts: u32,
    protocol: Protocol,
    now: UnixTime,
) -> WakeReport {
    WakeReport {
        result,
        wns_outcome: Some(outcome),
        status: Some(status),
        msg_id: meta.msg_id,
        debug_trace: meta.debug_trace,
        ms_cv: meta.ms_cv,
        device_connection: meta.device_connection.map(|d| d.as_str()),
        error_description: meta.error_description,
        dead,
        attempts,
        protocol: Some(protocol.label()),
        at: now.to_rfc3339(),
        error: None,
    }
}

fn transport_label(e: &ConnError) -> &'static str {
    match e {
        ConnError::Connect(..) => "connect_failed",
        ConnError::Tls(..) => "tls_failed",
        ConnError::Timeout(_) => "timeout",
        ConnError::Lost(_) => "connection_lost",
        ConnError::Protocol(_) => "protocol_error",
    }
}
