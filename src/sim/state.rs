//! State shared by all worker threads ([`Shared`]), and each thread's view
//! of it ([`Worker`]): cached copies that are refreshed only when the
//! control API changed something, so the hot path reads no shared lock.

use super::behaviour::{identity_of_uri, Behaviour, Binding, Bindings};
use super::config::{AppCredential, SimConfig};
use super::faults::{Faults, Outage, SenderLimiter};
use super::hash::{hash64, BuildIdentity};
use super::stats::{Stats, ThreadCounters};
use super::token::{TokenInfo, TokenStore};
use parking_lot::{Mutex, RwLock};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Tokens a worker caches before starting its cache afresh.
pub(super) const WORKER_TOKEN_CACHE: usize = 1024;

/// Everything the worker threads share.
pub(crate) struct Shared {
    pub token_lifetime: Duration,
    pub apps: Vec<AppCredential>,
    pub max_concurrent_streams: u32,
    /// Bumped whenever faults or bindings change.
    generation: AtomicU64,
    /// The faults, and when they were set (outage windows count from
    /// there).
    faults: RwLock<(Faults, Instant)>,
    bindings: RwLock<Bindings>,
    limiter: Mutex<SenderLimiter>,
    pub tokens: TokenStore,
    pub stats: Stats,
}

impl Shared {
    pub(crate) fn new(cfg: &SimConfig) -> Shared {
        let mut limiter = SenderLimiter::default();
        limiter.set_rate(cfg.faults.sender_rate);
        Shared {
            token_lifetime: cfg.token_lifetime,
            apps: cfg.apps.clone(),
            max_concurrent_streams: cfg.max_concurrent_streams,
            generation: AtomicU64::new(1),
            faults: RwLock::new((cfg.faults, crate::clock::instant())),
            bindings: RwLock::new(Bindings::default()),
            limiter: Mutex::new(limiter),
            tokens: TokenStore::default(),
            stats: Stats::new(cfg.channel_stats),
        }
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The faults in force.
    pub(crate) fn faults(&self) -> Faults {
        self.faults.read().0
    }

    /// The faults in force and when they were set.
    fn faults_since(&self) -> (Faults, Instant) {
        *self.faults.read()
    }

    /// Replaces the faults in force; their outage windows count from now.
    pub(crate) fn set_faults(&self, f: Faults) -> Result<(), String> {
        f.validate()?;
        *self.faults.write() = (f, crate::clock::instant());
        self.limiter.lock().set_rate(f.sender_rate);
        self.bump();
        Ok(())
    }

    /// Binds a channel to a behaviour (and optionally to an app).
    pub(crate) fn set_behaviour(
        &self,
        channel_uri: &str,
        behaviour: Behaviour,
        app_sid: Option<String>,
    ) -> Result<(), String> {
        let identity = identity_of_uri(channel_uri)?;
        let hash = channel_hash_of_identity(identity);
        self.bindings.write().insert(
            hash,
            Binding {
                identity: identity.as_bytes().into(),
                behaviour,
                app_sid,
            },
        )?;
        self.bump();
        Ok(())
    }

    /// Forgets every binding.
    pub(crate) fn clear_behaviours(&self) {
        *self.bindings.write() = Bindings::default();
        self.bump();
    }

    /// Admits one push from `sender` under `sender_rate`, or answers the
    /// `Retry-After` seconds.
    pub(crate) fn admit_sender(&self, sender: &str) -> Result<(), u64> {
        self.limiter.lock().admit(sender, crate::clock::instant())
    }
}

/// The hash of a channel identity split as the push endpoint sees it:
/// authority, then path and query.
pub(crate) fn channel_hash(authority: &[u8], path_and_query: &[u8]) -> u64 {
    hash64(&[authority, path_and_query])
}

fn channel_hash_of_identity(identity: &str) -> u64 {
    let slash = identity.find('/').unwrap_or(identity.len());
    let (a, pq) = identity.split_at(slash);
    channel_hash(a.as_bytes(), pq.as_bytes())
}

/// A worker thread's cached view.
struct View {
    generation: u64,
    faults: Faults,
    /// When `faults` were set.
    since: Instant,
    has_bindings: bool,
    tokens: HashMap<u64, Arc<TokenInfo>, BuildIdentity>,
}

/// One worker thread's handle on the shared state. Lives in an `Rc` on that
/// thread.
pub(crate) struct Worker {
    pub shared: Arc<Shared>,
    pub counters: Arc<ThreadCounters>,
    /// `X-WNS-Debug-Trace` of this thread's answers: like WNS, it names the
    /// front end that answered, not the message (that is `X-WNS-Msg-ID`).
    pub debug_trace: http::HeaderValue,
    view: RefCell<View>,
}

impl Worker {
    pub(super) fn new(index: usize, shared: Arc<Shared>) -> Worker {
        let counters = shared.stats.register_thread();
        let view = View {
            generation: 0,
            faults: Faults::default(),
            since: crate::clock::instant(),
            has_bindings: false,
            tokens: HashMap::default(),
        };
        Worker {
            shared,
            counters,
            debug_trace: http::HeaderValue::from_str(&format!("WNSGATESIM{index:03}"))
                .expect("ASCII header value"),
            view: RefCell::new(view),
        }
    }

    fn view(&self) -> std::cell::RefMut<'_, View> {
        let mut v = self.view.borrow_mut();
        let g = self.shared.generation.load(Ordering::Acquire);
        if v.generation != g {
            v.generation = g;
            (v.faults, v.since) = self.shared.faults_since();
            v.has_bindings = !self.shared.bindings.read().is_empty();
        }
        v
    }

    /// The faults in force.
    pub(super) fn faults(&self) -> Faults {
        self.view().faults
    }

    /// The outage in force now, if the faults set one (the clock is read
    /// only then).
    pub(super) fn outage(&self) -> Option<Outage> {
        let v = self.view();
        if !v.faults.has_outage() {
            return None;
        }
        v.faults
            .outage_at(crate::clock::instant().saturating_duration_since(v.since))
    }

    /// Whether any channel is bound through the control API.
    pub(super) fn has_bindings(&self) -> bool {
        self.view().has_bindings
    }

    /// The binding of a channel, if any (cheap when there are none).
    pub(super) fn binding(
        &self,
        hash: u64,
        authority: &[u8],
        path_and_query: &[u8],
    ) -> Option<Binding> {
        if !self.view().has_bindings {
            return None;
        }
        let bindings = self.shared.bindings.read();
        bindings.get(hash, authority, path_and_query).cloned()
    }

    /// The issued token with this text, if any (expired or not).
    pub(super) fn token(&self, token: &[u8]) -> Option<Arc<TokenInfo>> {
        let hash = hash64(&[token]);
        let mut v = self.view();
        if let Some(t) = v.tokens.get(&hash).filter(|t| t.token.as_bytes() == token) {
            return Some(t.clone());
        }
        let t = self.shared.tokens.lookup(hash, token)?;
        if v.tokens.len() >= WORKER_TOKEN_CACHE {
            v.tokens.clear();
        }
        v.tokens.insert(hash, t.clone());
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_uri_and_request_hash_alike() {
        let id = identity_of_uri("https://db5.notify.windows.com/?token=abc").unwrap();
        assert_eq!(
            channel_hash_of_identity(id),
            channel_hash(b"db5.notify.windows.com", b"/?token=abc")
        );
    }

    #[test]
    fn workers_see_changes_to_faults_and_bindings() {
        let shared = Arc::new(Shared::new(&SimConfig::default()));
        let w = Worker::new(0, shared.clone());
        assert_eq!(w.faults(), Faults::default());
        let f = Faults {
            error_ratio: 0.5,
            ..Faults::default()
        };
        shared.set_faults(f).unwrap();
        assert_eq!(w.faults(), f);
        let (a, pq) = (&b"db5.notify.windows.com"[..], &b"/?token=abc"[..]);
        let h = channel_hash(a, pq);
        assert!(w.binding(h, a, pq).is_none());
        shared
            .set_behaviour(
                "https://db5.notify.windows.com/?token=abc",
                Behaviour::Dropped,
                None,
            )
            .unwrap();
        assert_eq!(w.binding(h, a, pq).unwrap().behaviour, Behaviour::Dropped);
        shared.clear_behaviours();
        assert!(w.binding(h, a, pq).is_none());
    }
}
