//! The sender's connections and token handling against the WNS simulator,
//! over real TLS.

// Measures its own waits and hang guards on the real clock; the rule that
// time is read only through `wnsgate::clock` (clippy.toml) is the gateway's.
#![allow(clippy::disallowed_methods)]

use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wnsgate::config::Secret;
use wnsgate::core::wns::request::{new_cv, wake_headers, WAKE_BODY};
use wnsgate::core::wns::token::TokenFlow;
use wnsgate::sender::conn::Timeouts;
use wnsgate::sender::pool::{AuthorityPool, PoolLimits};
use wnsgate::sender::tls::{client_config, Alpn};
use wnsgate::sender::tokens::{TokenEndpoint, TokenSource};
use wnsgate::sim::{self, SimConfig};

/// The path and query of the channel
/// `https://db5.notify.windows.com/?token=AwYAAADsender%2btest%3d`, as the
/// pool takes them.
const CHANNEL_PATH: &str = "/?token=AwYAAADsender%2btest%3d";

fn headers_for(
    token: &wnsgate::core::wns::AccessToken,
    i: u64,
) -> Vec<(http::HeaderName, http::HeaderValue)> {
    wake_headers(
        token,
        None,
        false,
        &new_cv(u128::from(i) << 64 | 7),
        WAKE_BODY.len(),
    )
}

fn start_sim(lifetime: Duration, mode: sim::Mode) -> sim::SimHandle {
    sim::start(SimConfig {
        token_lifetime: lifetime,
        mode,
        ..SimConfig::default()
    })
    .expect("start the simulator")
}

fn token_source(s: &sim::SimHandle) -> Arc<TokenSource> {
    let endpoint =
        TokenEndpoint::new(&s.token_url(), Some(&s.ca_pem_path), Timeouts::default()).unwrap();
    TokenSource::new(
        "Contoso.MDM_8wekyb3d8bbwe",
        TokenFlow::Classic,
        "ms-app://S-1-15-2-1",
        Secret("secret".into()),
        endpoint,
    )
}

/// A pool for `db5.notify.windows.com` that dials the simulator.
fn pool_to(s: &sim::SimHandle) -> AuthorityPool {
    let tls = client_config(Some(&s.ca_pem_path), Alpn::H2AndHttp1).unwrap();
    AuthorityPool::new(
        "db5.notify.windows.com",
        &s.addr.to_string(),
        tls,
        PoolLimits::default(),
        Timeouts::default(),
    )
}

/// Tokens that live one second, pushes every 10 ms from 4 tasks for 12 s:
/// the pushes go out under many successive tokens, none fails for a stale
/// one, and the simulator issues about one token per expiry, not one per
/// push. (How many pushes fit in the 12 s depends on the machine; how many
/// tokens they went out under does not, beyond one push a second.)
#[test]
fn token_renewal_across_many_expiries() {
    let s = start_sim(Duration::from_secs(1), sim::Mode::Tls);
    let tokens = token_source(&s);
    let pool = Arc::new(pool_to(&s));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let run = Duration::from_secs(12);
    let (pushes, failures, used) = rt.block_on(async {
        let started = Instant::now();
        let mut tasks = Vec::new();
        for t in 0..4u64 {
            let (tokens, pool) = (tokens.clone(), pool.clone());
            tasks.push(tokio::spawn(async move {
                let (mut n, mut failed) = (0u64, Vec::new());
                let mut used = std::collections::HashSet::new();
                while started.elapsed() < run {
                    let token = tokens.token().await.expect("a token");
                    used.insert(token.secret().to_owned());
                    let (reply, _) = pool
                        .post(
                            CHANNEL_PATH,
                            &headers_for(&token, t * 1_000_000 + n),
                            Bytes::from_static(WAKE_BODY),
                        )
                        .await
                        .expect("an answer");
                    if reply.status != 200 {
                        failed.push(reply.status);
                    }
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                (n, failed, used)
            }));
        }
        let mut total = 0;
        let mut failures = Vec::new();
        let mut used = std::collections::HashSet::new();
        for t in tasks {
            let (n, f, u) = t.await.unwrap();
            total += n;
            failures.extend(f);
            used.extend(u);
        }
        (total, failures, used)
    });
    let stats = s.stats();
    assert!(
        used.len() >= 8,
        "{pushes} pushes under only {} tokens",
        used.len()
    );
    assert!(failures.is_empty(), "pushes failed with {failures:?}");
    // Refreshed at 80% of a 1 s life over 12 s: about 15 tokens.
    assert!(
        (10..=20).contains(&stats.tokens_issued),
        "{} tokens issued for {pushes} pushes over {run:?}",
        stats.tokens_issued
    );
    assert_eq!(stats.tokens_issued, tokens.refreshes_started());
}

/// The pool speaks h2 when offered and HTTP/1.1 against an h1-only server.
#[test]
fn pools_speak_h2_or_http1_as_the_server_chooses() {
    for (mode, want) in [(sim::Mode::Tls, "h2"), (sim::Mode::H1, "http1")] {
        let s = start_sim(Duration::from_secs(3600), mode);
        let tokens = token_source(&s);
        let pool = pool_to(&s);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let token = tokens.token().await.unwrap();
            for i in 0..20 {
                let (reply, proto) = pool
                    .post(
                        CHANNEL_PATH,
                        &headers_for(&token, i),
                        Bytes::from_static(WAKE_BODY),
                    )
                    .await
                    .unwrap();
                assert_eq!(reply.status, 200);
                assert_eq!(proto.label(), want);
                let status = reply
                    .headers
                    .get("x-wns-status")
                    .and_then(|v| v.to_str().ok());
                assert_eq!(status, Some("received"));
            }
        });
        assert_eq!(s.stats().pushes_total, 20);
    }
}

/// A stream the server resets, refused or after processing it, fails that
/// request alone: the pool keeps its one connection and sends the next
/// requests on it.
#[test]
fn a_reset_stream_leaves_its_connection_in_the_pool() {
    let s = start_sim(Duration::from_secs(3600), sim::Mode::Tls);
    let tokens = token_source(&s);
    let pool = pool_to(&s);
    s.set_faults(sim::Faults {
        refused_stream_every: Some(2),
        internal_error_every: Some(3),
        ..sim::Faults::default()
    })
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let results = rt.block_on(async {
        let token = tokens.token().await.unwrap();
        let mut results = Vec::new();
        for i in 0..7 {
            let r = pool
                .post(
                    CHANNEL_PATH,
                    &headers_for(&token, i),
                    Bytes::from_static(WAKE_BODY),
                )
                .await;
            results.push(match r {
                Ok((reply, _)) => format!("{}", reply.status),
                Err(e) => {
                    assert!(e.is_retryable_elsewhere(), "{e}");
                    format!("{e} (maybe processed: {})", e.may_have_been_processed())
                }
            });
        }
        results
    });
    let refused = "stream reset by the server (REFUSED_STREAM) (maybe processed: false)";
    let internal = "stream reset by the server (INTERNAL_ERROR) (maybe processed: true)";
    assert_eq!(
        results,
        ["200", refused, internal, refused, "200", refused, "200"]
    );
    assert_eq!(pool.open_connections(), (1, 0));
    let st = s.stats();
    assert_eq!(st.h2_connections, 1, "{st:?}");
    assert_eq!((st.streams_refused, st.streams_reset), (3, 1), "{st:?}");
}
