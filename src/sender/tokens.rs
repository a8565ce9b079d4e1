//! WNS access tokens for one app credential, shared by every shard: one
//! refresh in flight at a time, refreshed ahead of expiry, invalidated once
//! on a 401. The decisions are [`TokenCache`]'s; this module only performs
//! the HTTPS exchange with the token endpoint.

use super::conn::{self, Conn, ConnError, Timeouts};
use super::tls::{self, Alpn};
use crate::config::Secret;
use crate::core::wns::token::{
    parse_token_response, token_request, TokenCacheConfig, TokenFlow, TokenPoll,
};
use crate::core::wns::{AccessToken, TokenCache, TokenError};
use bytes::Bytes;
use http::{HeaderValue, Uri};
use parking_lot::Mutex;
use rustls::ClientConfig;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// Where and how to ask for tokens.
#[derive(Clone)]
pub struct TokenEndpoint {
    uri: Uri,
    /// `host:port` to dial.
    dial: String,
    /// TLS server name.
    host: String,
    tls: Arc<ClientConfig>,
    timeouts: Timeouts,
}

impl TokenEndpoint {
    /// `url` is an `https://` URL (e.g. `https://login.live.com/accesstoken.srf`).
    pub fn new(
        url: &str,
        extra_ca: Option<&Path>,
        timeouts: Timeouts,
    ) -> anyhow::Result<TokenEndpoint> {
        let uri: Uri = url
            .parse()
            .map_err(|e| anyhow::anyhow!("wns.token_url: {url:?} is not a URL: {e}"))?;
        anyhow::ensure!(
            uri.scheme_str() == Some("https"),
            "wns.token_url: {url:?} must be https"
        );
        let host = uri
            .host()
            .ok_or_else(|| anyhow::anyhow!("wns.token_url: {url:?} has no host"))?
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let dial = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Ok(TokenEndpoint {
            uri,
            dial,
            host,
            tls: tls::client_config(extra_ca, Alpn::Http1Only)?,
            timeouts,
        })
    }

    /// One token request over a fresh HTTPS connection.
    async fn fetch(&self, body: String) -> Result<AccessToken, TokenError> {
        let transport = |e: ConnError| TokenError::Transport(e.to_string());
        let conn = conn::connect(&self.dial, &self.host, self.tls.clone(), &self.timeouts)
            .await
            .map_err(transport)?;
        let Conn::Http1(mut send) = conn else {
            return Err(TokenError::Transport(
                "the token endpoint did not speak HTTP/1.1".into(),
            ));
        };
        let headers = [(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static(crate::core::wns::token::FORM_CONTENT_TYPE),
        )];
        let reply = conn::post_http1(
            &mut send,
            &self.uri,
            &headers,
            Bytes::from(body),
            self.timeouts.request,
        )
        .await
        .map_err(transport)?;
        parse_token_response(reply.status, &reply.body)
    }
}

/// The token of one WNS app, shared by all shards.
pub struct TokenSource {
    pfn: String,
    flow: TokenFlow,
    client_id: String,
    secret: Secret,
    endpoint: TokenEndpoint,
    cache: Mutex<TokenCache>,
    changed: Notify,
}

impl TokenSource {
    pub fn new(
        pfn: &str,
        flow: TokenFlow,
        client_id: &str,
        secret: Secret,
        endpoint: TokenEndpoint,
    ) -> Arc<TokenSource> {
        Arc::new(TokenSource {
            pfn: pfn.to_owned(),
            flow,
            client_id: client_id.to_owned(),
            secret,
            endpoint,
            cache: Mutex::new(TokenCache::new(TokenCacheConfig::default())),
            changed: Notify::new(),
        })
    }

    pub fn pfn(&self) -> &str {
        &self.pfn
    }

    /// Refreshes started so far (one per expiry, plus one per accepted
    /// invalidation, plus retries after failures).
    pub fn refreshes_started(&self) -> u64 {
        self.cache.lock().refreshes_started()
    }

    /// A valid token: the cached one, or one fetched now (by this caller or
    /// by the one refresh already running). Fails when the endpoint refuses
    /// or cannot be reached, until the backoff allows the next attempt.
    pub async fn token(self: &Arc<Self>) -> Result<AccessToken, TokenError> {
        loop {
            let waiter = self.changed.notified();
            let poll = self.cache.lock().poll(crate::clock::monotonic_ms());
            match poll {
                TokenPoll::Ready(t) => return Ok(t),
                TokenPoll::ReadyRefreshDue(t, ticket) => {
                    let me = self.clone();
                    tokio::spawn(async move { me.refresh(ticket).await });
                    return Ok(t);
                }
                // Boxed: the refresh (connect, TLS, request) is a large
                // future that every caller of `token` would otherwise carry
                // inline, though nearly all return the cached token.
                TokenPoll::MustRefresh(ticket) => Box::pin(self.refresh(ticket)).await,
                TokenPoll::WaitForRefresh { until_ms } => {
                    let wait = until_ms.saturating_sub(crate::clock::monotonic_ms()).max(1);
                    let _ = tokio::time::timeout(Duration::from_millis(wait), waiter).await;
                }
                TokenPoll::Backoff { .. } => {
                    let err = self.cache.lock().last_error().cloned();
                    return Err(err.unwrap_or(TokenError::TimedOut));
                }
            }
        }
    }

    /// The cached token if it is valid, without waiting; starts the refresh
    /// when one is due. `None` when getting one means waiting (or failing):
    /// ask [`TokenSource::token`] then.
    pub fn try_token(self: &Arc<Self>) -> Option<AccessToken> {
        let poll = self.cache.lock().poll(crate::clock::monotonic_ms());
        match poll {
            TokenPoll::Ready(t) => Some(t),
            TokenPoll::ReadyRefreshDue(t, ticket) => {
                let me = self.clone();
                tokio::spawn(async move { me.refresh(ticket).await });
                Some(t)
            }
            TokenPoll::MustRefresh(ticket) => {
                // This caller was given the refresh: start it, for the
                // waiters in `token` to share.
                let me = self.clone();
                tokio::spawn(async move { me.refresh(ticket).await });
                None
            }
            TokenPoll::WaitForRefresh { .. } | TokenPoll::Backoff { .. } => None,
        }
    }

    /// After a 401 with `used`: forget it (only if still current), so the
    /// next [`TokenSource::token`] fetches a new one.
    pub fn invalidate(&self, used: &AccessToken) -> bool {
        self.cache.lock().invalidate(used)
    }

    async fn refresh(&self, ticket: crate::core::wns::token::RefreshTicket) {
        let req = token_request(&self.flow, &self.client_id, self.secret.expose());
        let result = tokio::time::timeout(
            self.endpoint.timeouts.connect
                + self.endpoint.timeouts.tls
                + self.endpoint.timeouts.request,
            self.endpoint.fetch(req.body),
        )
        .await
        .unwrap_or(Err(TokenError::TimedOut));
        let now = crate::clock::monotonic_ms();
        match result {
            Ok(token) => {
                metrics::counter!(crate::telemetry::metrics::WNS_TOKEN_REFRESHES, "result" => "ok")
                    .increment(1);
                self.cache.lock().on_refreshed(ticket, token, now);
            }
            Err(e) => {
                tracing::warn!(pfn = %self.pfn, error = %e, "WNS token refresh failed");
                metrics::counter!(crate::telemetry::metrics::WNS_TOKEN_REFRESHES, "result" => e.label()).increment(1);
                self.cache.lock().on_refresh_failed(ticket, now, e);
            }
        }
        self.changed.notify_waiters();
    }
}
