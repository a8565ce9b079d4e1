//! Configuration: one TOML file, every key overridable by an environment
//! variable `WNSGATE_SECTION__KEY` (e.g. `WNSGATE_API__LISTEN`).
//!
//! [`Config`] is what the file says; [`Settings`] is the validated, resolved
//! form the rest of the program runs on (addresses parsed, durations in
//! seconds, secrets read from the environment or files). Every validation
//! error names the key at fault.

use crate::core::time::parse_duration_secs;
use crate::core::{Pfn, Thresholds, UriPolicy};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "WNSGATE_";

/// The configuration file, as written.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub api: ApiConfig,
    pub store: StoreConfig,
    pub server: ServerConfig,
    pub wns: WnsConfig,
    pub lifecycle: LifecycleConfig,
    pub refresh: RefreshConfig,
    pub log: LogConfig,
    /// Cluster mode on NATS JetStream; absent: the embedded store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// `IP:port` to listen on.
    pub listen: String,
    /// Bearer tokens accepted from MDM servers.
    pub tokens: Vec<Secret>,
    /// A file with one accepted bearer token per line (`#` comments allowed).
    pub tokens_file: Option<PathBuf>,
    /// Largest JSON request body, bytes.
    pub max_body_bytes: u64,
    /// Largest NDJSON import body, bytes.
    pub max_import_bytes: u64,
    /// Requests a shard serves at once before answering 503.
    pub max_inflight_per_shard: usize,
    /// Time allowed for a new connection's first byte, a request's headers,
    /// or each gap in its body, seconds.
    pub request_timeout_secs: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: "127.0.0.1:8080".into(),
            tokens: Vec::new(),
            tokens_file: None,
            max_body_bytes: 64 * 1024,
            max_import_bytes: 4 * 1024 * 1024 * 1024,
            max_inflight_per_shard: 8192,
            request_timeout_secs: 30,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub path: PathBuf,
    /// Block cache of the embedded store, MiB.
    pub cache_mb: u64,
    /// Submissions waiting for the group-commit thread before writes get 503.
    pub queue_capacity: usize,
    /// Most mutations written under one sync.
    pub max_batch_mutations: usize,
    /// The longest a write may expect to wait for the store, by its recent
    /// pace, before it is refused at once with 503 `store_overloaded`;
    /// 0 = no bound but `queue_capacity`.
    pub max_commit_wait_ms: u64,
    /// Shortest time between the starts of two syncs of the log, in
    /// microseconds: a write that comes sooner joins the next batch. Bounds
    /// syncs a second (1,000 at the default); 0 = a sync starts as soon
    /// as the last one ends.
    pub min_sync_interval_us: u64,
    /// Memtable size of the embedded store, MiB (applies when the store is
    /// created).
    pub memtable_mb: u64,
    /// Threads the embedded store uses for flushes and compaction; 0 = its
    /// default (min(cores, 4)).
    pub background_threads: usize,
    /// Partitions of new data (1 to 4096); 0 takes the data's own count,
    /// or 1024 for new data. Fixed when the data is created.
    pub partitions: u32,
    /// Log MiB since the last snapshot before the next is cut.
    pub snapshot_log_mb: u64,
    /// MiB a second a snapshot is written at; 0 = as fast as the disk
    /// takes it.
    pub snapshot_write_mb_per_s: u64,
    /// Size a log segment file grows to before the next starts, MiB.
    pub log_segment_mb: u64,
    /// Start even when stored data is damaged, losing what follows the
    /// damage (its log tail, or the rest of a partition's snapshot).
    pub accept_damage: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("./wnsgate-data"),
            cache_mb: 64,
            queue_capacity: crate::store::committer::QUEUE_SUBMISSIONS_DEFAULT,
            max_batch_mutations: crate::store::committer::BATCH_MUTATIONS_DEFAULT,
            max_commit_wait_ms: crate::store::committer::COMMIT_WAIT_MS_DEFAULT,
            min_sync_interval_us: crate::store::committer::SYNC_INTERVAL_US_DEFAULT,
            memtable_mb: 16,
            background_threads: 0,
            partitions: 0,
            snapshot_log_mb: crate::store::log_store::SNAPSHOT_LOG_BYTES_DEFAULT >> 20,
            snapshot_write_mb_per_s: crate::store::log_store::SNAPSHOT_BYTES_PER_SECOND_DEFAULT
                >> 20,
            log_segment_mb: crate::store::log_store::SEGMENT_BYTES_DEFAULT >> 20,
            accept_damage: false,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Shard threads; 0 means one per available core.
    pub shards: usize,
    /// Network backend of the shards: `auto`, `uring` or `epoll`.
    pub io: IoBackend,
}

/// Which network backend the shards run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IoBackend {
    /// The backend measured faster on this kind of machine (epoll today)
    /// when this build and kernel support both, else epoll.
    #[default]
    Auto,
    /// tokio-uring on io_uring; refuses to start when io_uring is unusable.
    Uring,
    /// tokio on epoll.
    Epoll,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WnsConfig {
    pub token_url: String,
    /// `host:port` to dial instead of each channel's host (SNI and
    /// `:authority` unchanged). Empty: dial the channel's host.
    pub connect_to: String,
    /// Extra trusted root certificates, PEM. Empty: none.
    pub ca_file: String,
    pub allowed_host_suffix: String,
    /// Longest channel URI accepted at registration, bytes.
    pub max_channel_uri_bytes: usize,
    /// How long WNS keeps an undelivered wake for an offline device
    /// (`X-WNS-TTL`), as a duration such as `1h`. Empty: WNS's default.
    pub ttl: String,
    /// Ask WNS for the device's connection status
    /// (`X-WNS-RequestForStatus: true`).
    pub request_for_status: bool,
    /// The time budget of one wake's retries, as a duration such as
    /// `60s`: no retry goes out later than this after the wake started.
    pub retry_window: String,
    /// Connection failures in a row (failed connects, connections that
    /// died unanswered) that open an authority's circuit breaker; 0 never
    /// opens it.
    pub breaker_failures: u32,
    /// How long an opened breaker stays open before a probe, a duration.
    pub breaker_open: String,
    /// The longest it stays open: each failed probe doubles the open
    /// time up to this, a duration.
    pub breaker_open_max: String,
    pub apps: Vec<WnsApp>,
}

impl Default for WnsConfig {
    fn default() -> Self {
        WnsConfig {
            token_url: "https://login.live.com/accesstoken.srf".into(),
            connect_to: String::new(),
            ca_file: String::new(),
            allowed_host_suffix: "notify.windows.com".into(),
            max_channel_uri_bytes: crate::core::channel_uri::DEFAULT_MAX_URI_LEN,
            ttl: String::new(),
            request_for_status: false,
            retry_window: "60s".into(),
            breaker_failures: 3,
            breaker_open: "1s".into(),
            breaker_open_max: "5s".into(),
            apps: Vec::new(),
        }
    }
}

/// One WNS app credential (one per PFN).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WnsApp {
    pub pfn: String,
    pub package_sid: String,
    pub client_secret: Secret,
    /// Name of an environment variable holding the client secret.
    pub client_secret_env: String,
    /// A file holding the client secret.
    pub client_secret_file: String,
    /// Entra (Azure AD) tenant: set it to use the Entra token flow instead
    /// of the classic login.live.com one.
    pub entra_tenant: String,
    /// Client id for the token request; empty means `package_sid` (the
    /// classic flow's client id). Entra apps use their application id.
    pub client_id: String,
    /// Token endpoint of this app; empty means `wns.token_url` for the
    /// classic flow and the tenant's Entra endpoint for the Entra flow.
    pub token_url: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LifecycleConfig {
    pub renewal_due_after: String,
    pub expire_after: String,
    /// Send one wake to each device that becomes `renewal_due`, so the MDM
    /// server gets a session in which to read the renewed channel URI.
    pub nudge_renewal_due: bool,
    /// Pace of those nudge wakes.
    pub nudge_per_second: u64,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        LifecycleConfig {
            renewal_due_after: "15d".into(),
            expire_after: "30d".into(),
            nudge_renewal_due: false,
            nudge_per_second: 20,
        }
    }
}

/// The refresh queue: PFN-replacement jobs for devices whose channel died.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RefreshConfig {
    /// DMClient provider id used in the SyncML when the device was
    /// registered without one. Set it to your MDM's provider id.
    pub provider_id: String,
    /// `same`: send the device's PFN again; `rotate`: the next configured
    /// WNS app's PFN on each attempt.
    pub pfn_choice: String,
    /// `replace` (the node was set at enrollment) or `add`.
    pub pfn_verb: String,
    /// How long after a delivery to wait for a new channel URI.
    pub confirm_within: String,
    /// Retry backoff: first wait and cap (doubles per attempt, jittered).
    pub backoff_base: String,
    pub backoff_cap: String,
    /// Deliveries before a device is given up as `unreachable`.
    pub max_attempts: u64,
    /// Time since the job opened after which it is given up.
    pub give_up_after: String,
    /// Lease length when the caller gives none, and the longest granted.
    pub default_lease: String,
    pub max_lease: String,
    /// Pace of lease and webhook hand-outs, and leased jobs at most at once.
    pub jobs_per_second: u64,
    pub max_outstanding: u64,
    /// How often expiry is swept and leases and deliveries are checked.
    pub sweep_interval: String,
    /// Devices examined per sweep step (one store read and one batch).
    pub sweep_batch: u64,
    /// Optional: POST due jobs to this http:// URL.
    pub webhook_url: String,
    /// HMAC-SHA256 key for the `X-Wnsgate-Signature` header; one of the
    /// three when `webhook_url` is set.
    pub webhook_secret: Secret,
    pub webhook_secret_env: String,
    pub webhook_secret_file: String,
    /// Timeout of one webhook call.
    pub webhook_timeout: String,
}

impl Default for RefreshConfig {
    fn default() -> Self {
        RefreshConfig {
            provider_id: "wnsgate".into(),
            pfn_choice: "same".into(),
            pfn_verb: "replace".into(),
            confirm_within: "1d".into(),
            backoff_base: "1h".into(),
            backoff_cap: "1d".into(),
            max_attempts: 5,
            give_up_after: "14d".into(),
            default_lease: "5m".into(),
            max_lease: "1h".into(),
            jobs_per_second: 50,
            max_outstanding: 1000,
            sweep_interval: "60s".into(),
            sweep_batch: 1024,
            webhook_url: String::new(),
            webhook_secret: Secret::default(),
            webhook_secret_env: String::new(),
            webhook_secret_file: String::new(),
            webhook_timeout: "10s".into(),
        }
    }
}

/// The validated refresh settings.
#[derive(Debug, Clone)]
pub struct RefreshSettings {
    pub policy: crate::core::refresh::RefreshPolicy,
    pub provider_id: crate::core::ProviderId,
    pub rotate_pfn: bool,
    pub verb_add: bool,
    pub sweep_interval_secs: u32,
    pub sweep_batch: usize,
    pub webhook: Option<WebhookSettings>,
}

/// Where and how due jobs are posted, when a webhook is configured.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub url: String,
    pub secret: Secret,
    pub timeout_secs: u32,
}

impl RefreshConfig {
    fn resolve(&self) -> Result<RefreshSettings, ConfigError> {
        let d = |k: &str, v: &str| duration_key(&format!("refresh.{k}"), v);
        let count = |k: &str, v: u64, max: u64| {
            if v == 0 || v > max {
                Err(invalid(
                    &format!("refresh.{k}"),
                    format!("must be between 1 and {max}"),
                ))
            } else {
                Ok(v)
            }
        };
        let policy = crate::core::refresh::RefreshPolicy {
            confirm_within: d("confirm_within", &self.confirm_within)?,
            backoff_base: d("backoff_base", &self.backoff_base)?,
            backoff_cap: d("backoff_cap", &self.backoff_cap)?,
            max_attempts: count("max_attempts", self.max_attempts, 1000)? as u16,
            give_up_after: d("give_up_after", &self.give_up_after)?,
            default_lease: d("default_lease", &self.default_lease)?,
            max_lease: d("max_lease", &self.max_lease)?,
            jobs_per_second: count("jobs_per_second", self.jobs_per_second, 1_000_000)? as u32,
            max_outstanding: count("max_outstanding", self.max_outstanding, 10_000_000)? as u32,
        };
        if policy.default_lease > policy.max_lease {
            return Err(invalid(
                "refresh.default_lease",
                "must not be longer than refresh.max_lease",
            ));
        }
        let provider_id = crate::core::ProviderId::parse(self.provider_id.trim())
            .map_err(|e| invalid("refresh.provider_id", e.to_string()))?;
        let rotate_pfn = match self.pfn_choice.as_str() {
            "same" => false,
            "rotate" => true,
            _ => return Err(invalid("refresh.pfn_choice", "must be same or rotate")),
        };
        let verb_add = match self.pfn_verb.as_str() {
            "replace" => false,
            "add" => true,
            _ => return Err(invalid("refresh.pfn_verb", "must be replace or add")),
        };
        let webhook = if self.webhook_url.is_empty() {
            None
        } else {
            let url = self.webhook_url.trim();
            if !url.starts_with("http://") || url.parse::<http::Uri>().is_err() {
                return Err(invalid(
                    "refresh.webhook_url",
                    "must be an http:// URL (for https, put a TLS proxy in front of the endpoint)",
                ));
            }
            let secret = secret_from(
                "refresh.webhook_secret",
                &self.webhook_secret,
                &self.webhook_secret_env,
                &self.webhook_secret_file,
            )?;
            Some(WebhookSettings {
                url: url.to_owned(),
                secret,
                timeout_secs: d("webhook_timeout", &self.webhook_timeout)?,
            })
        };
        Ok(RefreshSettings {
            policy,
            provider_id,
            rotate_pfn,
            verb_add,
            sweep_interval_secs: d("sweep_interval", &self.sweep_interval)?,
            sweep_batch: count("sweep_batch", self.sweep_batch, 1_000_000)? as usize,
            webhook,
        })
    }
}

/// A secret from exactly one of an inline value, an environment variable or
/// a file; `key` names the inline key in errors.
fn secret_from(key: &str, inline: &Secret, env: &str, file: &str) -> Result<Secret, ConfigError> {
    let sources = [!inline.0.is_empty(), !env.is_empty(), !file.is_empty()];
    match sources.iter().filter(|s| **s).count() {
        1 => {}
        0 => {
            return Err(invalid(
                key,
                format!("set one of {key}, {key}_env or {key}_file"),
            ))
        }
        _ => {
            return Err(invalid(
                key,
                format!("set only one of {key}, {key}_env or {key}_file"),
            ))
        }
    }
    if !inline.0.is_empty() {
        return Ok(inline.clone());
    }
    if !env.is_empty() {
        return std::env::var(env)
            .ok()
            .filter(|v| !v.is_empty())
            .map(Secret)
            .ok_or_else(|| {
                invalid(
                    &format!("{key}_env"),
                    format!("environment variable {env} is not set"),
                )
            });
    }
    std::fs::read_to_string(file)
        .map(|s| Secret(s.trim().to_owned()))
        .map_err(|e| invalid(&format!("{key}_file"), format!("cannot read {file}: {e}")))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `wnsgate=debug`. `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A string that is never printed: `Debug` and `Display` show `***`.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

/// A configuration problem, naming the key and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("config file {path}: {msg}")]
    Parse { path: String, msg: String },
    #[error("environment variable {var}: {msg}")]
    Env { var: String, msg: String },
    #[error("{key}: {msg}")]
    Invalid { key: String, msg: String },
}

fn invalid(key: &str, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        msg: msg.into(),
    }
}

impl Config {
    /// Reads `path` (if given), then applies `WNSGATE_*` overrides from `env`.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let (mut table, origin) = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|err| ConfigError::Read {
                    path: p.to_owned(),
                    err,
                })?;
                let t: toml::Table =
                    text.parse()
                        .map_err(|e: toml::de::Error| ConfigError::Parse {
                            path: p.display().to_string(),
                            msg: e.to_string(),
                        })?;
                (t, p.display().to_string())
            }
            None => (toml::Table::new(), "(defaults)".to_owned()),
        };
        let defaults = toml::Table::try_from(Config::default()).expect("defaults serialize");
        // (variable, dotted key) of every override applied, to name the
        // variable when its value turns out to be wrong.
        let mut applied: Vec<(String, String)> = Vec::new();
        for (var, value) in env {
            let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if !rest.contains("__") {
                continue;
            }
            let keys: Vec<String> = rest.split("__").map(|k| k.to_ascii_lowercase()).collect();
            apply_override(&mut table, &defaults, &keys, &value).map_err(|msg| {
                ConfigError::Env {
                    var: var.clone(),
                    msg,
                }
            })?;
            applied.push((var, keys.join(".")));
        }
        toml::Value::Table(table).try_into::<Config>().map_err(|e| {
            let msg = e.to_string();
            let from_env = applied.iter().rev().find(|(_, key)| names_key(&msg, key));
            match from_env {
                Some((var, _)) => ConfigError::Env {
                    var: var.clone(),
                    msg,
                },
                None => ConfigError::Parse { path: origin, msg },
            }
        })
    }
}

/// Whether serde's error `msg` is about the dotted `key`: a wrong value is
/// reported "in `section.key`", an unknown key (or an unknown section on
/// the way to it) as "unknown field `name`", followed by "in `section`"
/// below the top level.
fn names_key(msg: &str, key: &str) -> bool {
    if msg.contains(&format!("`{key}`")) {
        return true;
    }
    let parts: Vec<&str> = key.split('.').collect();
    (0..parts.len()).any(|i| {
        let section = parts[..i].join(".");
        msg.contains(&format!("unknown field `{}`", parts[i]))
            && if section.is_empty() {
                !msg.contains("in `")
            } else {
                msg.contains(&format!("in `{section}`"))
            }
    })
}

/// Sets `keys` in `table` to `raw`, typed like the default value at the same
/// place (a string default keeps the text as is; anything else is read as a
/// TOML value, so `WNSGATE_API__TOKENS='["a","b"]'` works).
fn apply_override(
    table: &mut toml::Table,
    defaults: &toml::Table,
    keys: &[String],
    raw: &str,
) -> Result<(), String> {
    let (last, parents) = keys.split_last().ok_or("empty key")?;
    let mut t = table;
    let mut d = Some(defaults);
    for k in parents {
        d = d.and_then(|d| d.get(k)).and_then(|v| v.as_table());
        let entry = t
            .entry(k.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry
            .as_table_mut()
            .ok_or_else(|| format!("{k} is not a section"))?;
    }
    let default = d.and_then(|d| d.get(last));
    let value = match default {
        Some(toml::Value::String(_)) => toml::Value::String(raw.to_owned()),
        _ => match format!("v = {raw}").parse::<toml::Table>() {
            Ok(mut parsed) => parsed.remove("v").ok_or("no value")?,
            Err(_) => toml::Value::String(raw.to_owned()),
        },
    };
    t.insert(last.clone(), value);
    Ok(())
}

/// The validated configuration the program runs on.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub tokens: Vec<Secret>,
    pub max_body_bytes: u64,
    pub max_import_bytes: u64,
    pub max_inflight_per_shard: usize,
    pub request_timeout_secs: u64,
    pub store: StoreConfig,
    pub shards: usize,
    pub io: IoBackend,
    pub uri_policy: UriPolicy,
    pub thresholds: Thresholds,
    /// PFNs of the configured WNS apps; registrations must name one of
    /// them (with none configured, every registration is refused).
    pub known_pfns: Vec<String>,
    pub wns: WnsConfig,
    /// `wns.ttl` in seconds, when set.
    pub wns_ttl_secs: Option<u32>,
    /// `wns.retry_window`.
    pub wns_retry_window: std::time::Duration,
    /// `wns.breaker_failures`, `wns.breaker_open` and
    /// `wns.breaker_open_max`.
    pub wns_breaker: crate::core::wns::BreakerPolicy,
    pub refresh: RefreshSettings,
    /// Nudge wakes per second for devices turning `renewal_due`; `None`
    /// when nudges are off.
    pub nudge_per_second: Option<u32>,
    pub log: LogConfig,
    /// Cluster mode, when the `[cluster]` section is there.
    pub cluster: Option<ClusterSettings>,
}

impl Settings {
    /// Validates `cfg`, reading token and secret files and environment
    /// variables it points to.
    pub fn resolve(cfg: &Config) -> Result<Settings, ConfigError> {
        let listen: SocketAddr = cfg.api.listen.parse().map_err(|_| {
            invalid(
                "api.listen",
                format!(
                    "{:?} is not an IP:port address (e.g. 127.0.0.1:8080 or [::1]:8080)",
                    cfg.api.listen
                ),
            )
        })?;

        let mut tokens: Vec<Secret> = cfg
            .api
            .tokens
            .iter()
            .filter(|t| !t.0.is_empty())
            .cloned()
            .collect();
        if let Some(path) = &cfg.api.tokens_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                invalid(
                    "api.tokens_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            tokens.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(|l| Secret(l.to_owned())),
            );
        }
        if let Some(short) = tokens.iter().find(|t| t.0.len() < 16) {
            let _ = short;
            return Err(invalid(
                "api.tokens",
                "every bearer token must be at least 16 characters",
            ));
        }
        if !listen.ip().is_loopback() && tokens.is_empty() {
            return Err(invalid(
                "api.listen",
                format!(
                    "{listen} is reachable from other hosts but no API tokens are configured; \
                     set api.tokens or api.tokens_file (or WNSGATE_API__TOKENS), or listen on 127.0.0.1"
                ),
            ));
        }
        if cfg.api.max_body_bytes == 0 || cfg.api.max_import_bytes == 0 {
            return Err(invalid(
                "api.max_body_bytes",
                "body limits must be positive",
            ));
        }
        if cfg.api.max_inflight_per_shard == 0 {
            return Err(invalid("api.max_inflight_per_shard", "must be positive"));
        }
        if cfg.api.request_timeout_secs == 0 {
            return Err(invalid("api.request_timeout_secs", "must be positive"));
        }
        if cfg.store.path.as_os_str().is_empty() {
            return Err(invalid("store.path", "must not be empty"));
        }
        if cfg.store.partitions != 0 {
            crate::core::Partitioning::new(cfg.store.partitions)
                .map_err(|e| invalid("store.partitions", e.to_string()))?;
        }
        if cfg.store.snapshot_log_mb == 0 {
            return Err(invalid("store.snapshot_log_mb", "must be positive"));
        }
        if cfg.store.min_sync_interval_us > 100_000 {
            return Err(invalid(
                "store.min_sync_interval_us",
                "at most 100000 (0.1 s): every write may wait this long for its sync",
            ));
        }
        if cfg.store.log_segment_mb == 0 {
            return Err(invalid("store.log_segment_mb", "must be positive"));
        }
        if cfg.store.queue_capacity == 0 || cfg.store.max_batch_mutations == 0 {
            return Err(invalid(
                "store.queue_capacity",
                "queue capacity and batch size must be positive",
            ));
        }

        let renewal = duration_key(
            "lifecycle.renewal_due_after",
            &cfg.lifecycle.renewal_due_after,
        )?;
        let expire = duration_key("lifecycle.expire_after", &cfg.lifecycle.expire_after)?;
        if expire <= renewal {
            return Err(invalid(
                "lifecycle.expire_after",
                "must be longer than lifecycle.renewal_due_after",
            ));
        }

        let suffix = cfg.wns.allowed_host_suffix.trim().to_ascii_lowercase();
        if suffix.is_empty() || suffix.starts_with('.') || suffix.contains(['/', ':', '@']) {
            return Err(invalid(
                "wns.allowed_host_suffix",
                "must be a host name such as notify.windows.com",
            ));
        }
        if !(64..=65_535).contains(&cfg.wns.max_channel_uri_bytes) {
            return Err(invalid(
                "wns.max_channel_uri_bytes",
                "must be between 64 and 65535",
            ));
        }

        let wns_ttl_secs = match cfg.wns.ttl.trim() {
            "" => None,
            ttl => Some(duration_key("wns.ttl", ttl)?),
        };
        let (wns_retry_window, wns_breaker) = wns_retries(&cfg.wns)?;

        let mut known_pfns = Vec::new();
        for (i, app) in cfg.wns.apps.iter().enumerate() {
            let key = format!("wns.apps[{i}]");
            Pfn::parse(&app.pfn).map_err(|e| invalid(&format!("{key}.pfn"), e.to_string()))?;
            if !app.entra_tenant.is_empty()
                && !app
                    .entra_tenant
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'))
            {
                return Err(invalid(
                    &format!("{key}.entra_tenant"),
                    "must be a tenant id or domain name",
                ));
            }
            if !app.token_url.is_empty() && !app.token_url.starts_with("https://") {
                return Err(invalid(
                    &format!("{key}.token_url"),
                    "must be an https:// URL",
                ));
            }
            if !app.package_sid.starts_with("ms-app://") {
                return Err(invalid(
                    &format!("{key}.package_sid"),
                    "must start with ms-app://",
                ));
            }
            resolve_secret(&key, app)?;
            if known_pfns.contains(&app.pfn) {
                return Err(invalid(
                    &format!("{key}.pfn"),
                    format!("{} is configured twice", app.pfn),
                ));
            }
            known_pfns.push(app.pfn.clone());
        }
        if !cfg.wns.ca_file.is_empty() {
            let path = Path::new(&cfg.wns.ca_file);
            if !path.is_file() {
                return Err(invalid(
                    "wns.ca_file",
                    format!("{} is not a readable file", cfg.wns.ca_file),
                ));
            }
            std::fs::read(path).map_err(|e| {
                invalid(
                    "wns.ca_file",
                    format!("cannot read {}: {e}", cfg.wns.ca_file),
                )
            })?;
        }

        Ok(Settings {
            listen,
            tokens,
            max_body_bytes: cfg.api.max_body_bytes,
            max_import_bytes: cfg.api.max_import_bytes,
            max_inflight_per_shard: cfg.api.max_inflight_per_shard,
            request_timeout_secs: cfg.api.request_timeout_secs,
            store: cfg.store.clone(),
            shards: cfg.server.shards,
            io: cfg.server.io,
            uri_policy: UriPolicy {
                allowed_host_suffix: suffix,
                max_len: cfg.wns.max_channel_uri_bytes,
            },
            thresholds: Thresholds {
                renewal_due_after: renewal,
                expire_after: expire,
            },
            known_pfns,
            wns: cfg.wns.clone(),
            wns_ttl_secs,
            wns_retry_window,
            wns_breaker,
            refresh: cfg.refresh.resolve()?,
            nudge_per_second: match (
                cfg.lifecycle.nudge_renewal_due,
                cfg.lifecycle.nudge_per_second,
            ) {
                (false, _) => None,
                (true, n @ 1..=100_000) => Some(n as u32),
                (true, _) => {
                    return Err(invalid(
                        "lifecycle.nudge_per_second",
                        "must be between 1 and 100000",
                    ))
                }
            },
            log: cfg.log.clone(),
            cluster: cfg
                .cluster
                .as_ref()
                .map(|c| c.resolve(listen))
                .transpose()?,
        })
    }

    /// Shard threads to run.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

/// Longest `wns.retry_window`, `wns.breaker_open` and
/// `wns.breaker_open_max`: an hour.
pub const WNS_RETRY_DURATION_MAX_SECS: u32 = 3_600;
/// Largest `wns.breaker_failures`.
pub const WNS_BREAKER_FAILURES_MAX: u32 = 1_000;

/// The retry window and the breaker policy of `[wns]`.
fn wns_retries(
    wns: &WnsConfig,
) -> Result<(std::time::Duration, crate::core::wns::BreakerPolicy), ConfigError> {
    use std::time::Duration;
    let bounded = |key: &str, s: &str| {
        let secs = duration_key(key, s)?;
        if secs > WNS_RETRY_DURATION_MAX_SECS {
            return Err(invalid(
                key,
                format!("{s:?} is longer than {WNS_RETRY_DURATION_MAX_SECS}s"),
            ));
        }
        Ok(Duration::from_secs(u64::from(secs)))
    };
    let window = bounded("wns.retry_window", &wns.retry_window)?;
    if wns.breaker_failures > WNS_BREAKER_FAILURES_MAX {
        return Err(invalid(
            "wns.breaker_failures",
            format!("must be between 0 (never open) and {WNS_BREAKER_FAILURES_MAX}"),
        ));
    }
    let open_for = bounded("wns.breaker_open", &wns.breaker_open)?;
    let open_for_max = bounded("wns.breaker_open_max", &wns.breaker_open_max)?;
    if open_for_max < open_for {
        return Err(invalid(
            "wns.breaker_open_max",
            "must not be shorter than wns.breaker_open",
        ));
    }
    Ok((
        window,
        crate::core::wns::BreakerPolicy {
            failures_to_open: wns.breaker_failures,
            open_for,
            open_for_max,
            ..Default::default()
        },
    ))
}

fn duration_key(key: &str, s: &str) -> Result<u32, ConfigError> {
    parse_duration_secs(s)
        .filter(|&v| v > 0)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| {
            invalid(
                key,
                format!("{s:?} is not a duration such as 15d, 36h, 90m or 3600s"),
            )
        })
}

/// The client secret of `app`, from exactly one of its three sources.
pub fn resolve_secret(key: &str, app: &WnsApp) -> Result<Secret, ConfigError> {
    let sources = [
        !app.client_secret.0.is_empty(),
        !app.client_secret_env.is_empty(),
        !app.client_secret_file.is_empty(),
    ];
    match sources.iter().filter(|s| **s).count() {
        0 => {
            return Err(invalid(
                &format!("{key}.client_secret"),
                "set one of client_secret, client_secret_env or client_secret_file",
            ))
        }
        1 => {}
        _ => {
            return Err(invalid(
                &format!("{key}.client_secret"),
                "set only one of client_secret, client_secret_env or client_secret_file",
            ))
        }
    }
    if !app.client_secret.0.is_empty() {
        return Ok(app.client_secret.clone());
    }
    if !app.client_secret_env.is_empty() {
        return std::env::var(&app.client_secret_env)
            .ok()
            .filter(|v| !v.is_empty())
            .map(Secret)
            .ok_or_else(|| {
                invalid(
                    &format!("{key}.client_secret_env"),
                    format!("environment variable {} is not set", app.client_secret_env),
                )
            });
    }
    let secret = std::fs::read_to_string(&app.client_secret_file)
        .map(|s| Secret(s.trim().to_owned()))
        .map_err(|e| {
            invalid(
                &format!("{key}.client_secret_file"),
                format!("cannot read {}: {e}", app.client_secret_file),
            )
        })?;
    if secret.0.is_empty() {
        return Err(invalid(
            &format!("{key}.client_secret_file"),
            format!("{} is empty", app.client_secret_file),
        ));
    }
    Ok(secret)
}

/// The `[cluster]` section: cluster mode on NATS JetStream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// NATS servers to connect to (`nats://host:port` or `tls://host:port`);
    /// the client learns the rest of the cluster from them.
    pub nats_urls: Vec<String>,
    /// A NATS credentials file (user JWT and nkey seed).
    pub credentials_file: String,
    /// A NATS token (or `token_env`, `token_file`); at most one of these
    /// and `credentials_file`.
    pub token: Secret,
    pub token_env: String,
    pub token_file: String,
    /// A CA certificate (PEM) that NATS servers' TLS certificates chain to;
    /// set, the connection must be TLS.
    pub tls_ca_file: String,
    /// This node's name in the cluster, unique among its nodes; empty: the
    /// host name.
    pub node_id: String,
    /// How the other nodes reach this node's API (`http://host:port`);
    /// empty: `http://<api.listen's IP, or the host name when that is
    /// 0.0.0.0 or ::>:<the API's port>`.
    pub advertise_url: String,
    /// Partitions of new data (1 to 4096); 0 takes the cluster's own count,
    /// or 1024 for new data. Fixed when the data is created.
    pub partitions: u32,
    /// Copies JetStream keeps of every stream (1 to 5; 3 survives the loss
    /// of one NATS server).
    pub replicas: u32,
    /// JetStream streams the partition logs are spread over (each is one
    /// Raft group); fixed when the data is created.
    pub stream_count: u32,
    /// How long a node's hold on its partitions (and its heartbeat) lasts
    /// without renewal; renewed every third of it. A dead node's partitions
    /// move after about this long.
    pub lease_ttl: String,
    /// How often a running bulk wake records how far it got; a node that
    /// takes over its partitions goes on from there, so a device may be
    /// woken twice across a failover, at most this long's worth.
    pub checkpoint_every: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nats_urls: vec!["nats://127.0.0.1:4222".into()],
            credentials_file: String::new(),
            token: Secret::default(),
            token_env: String::new(),
            token_file: String::new(),
            tls_ca_file: String::new(),
            node_id: String::new(),
            advertise_url: String::new(),
            partitions: 0,
            replicas: 3,
            stream_count: 4,
            lease_ttl: "10s".into(),
            checkpoint_every: "2s".into(),
        }
    }
}

/// How a node authenticates to NATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsAuth {
    None,
    Token(Secret),
    CredentialsFile(PathBuf),
}

/// `[cluster]`, validated.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub nats_urls: Vec<String>,
    pub auth: NatsAuth,
    pub tls_ca_file: Option<PathBuf>,
    pub node_id: String,
    /// `None`: `http://<listen IP, or the host name when that is 0.0.0.0
    /// or ::>:<the port bound>`, known once the API listens.
    pub advertise_url: Option<String>,
    /// `None`: the cluster's own count (or the default for new data).
    pub partitions: Option<crate::core::Partitioning>,
    pub replicas: usize,
    pub stream_count: u16,
    pub lease_ttl: std::time::Duration,
    pub checkpoint_every: std::time::Duration,
}

/// The host's name, for a default node id and advertised address.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl ClusterConfig {
    fn resolve(&self, listen: SocketAddr) -> Result<ClusterSettings, ConfigError> {
        if self.nats_urls.is_empty() {
            return Err(invalid(
                "cluster.nats_urls",
                "name at least one NATS server",
            ));
        }
        for url in &self.nats_urls {
            let ok = ["nats://", "tls://"].iter().any(|s| {
                url.strip_prefix(s)
                    .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'))
            });
            if !ok {
                return Err(invalid(
                    "cluster.nats_urls",
                    format!("{url:?} is not nats://host:port or tls://host:port"),
                ));
            }
        }
        let token_set =
            !self.token.0.is_empty() || !self.token_env.is_empty() || !self.token_file.is_empty();
        let auth = match (token_set, self.credentials_file.is_empty()) {
            (true, false) => {
                return Err(invalid(
                    "cluster.credentials_file",
                    "set a credentials file or a token, not both",
                ))
            }
            (true, true) => NatsAuth::Token(secret_from(
                "cluster.token",
                &self.token,
                &self.token_env,
                &self.token_file,
            )?),
            (false, false) => {
                let path = PathBuf::from(&self.credentials_file);
                std::fs::read(&path).map_err(|e| {
                    invalid(
                        "cluster.credentials_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                NatsAuth::CredentialsFile(path)
            }
            (false, true) => NatsAuth::None,
        };
        let tls_ca_file = if self.tls_ca_file.is_empty() {
            None
        } else {
            let path = PathBuf::from(&self.tls_ca_file);
            std::fs::read(&path).map_err(|e| {
                invalid(
                    "cluster.tls_ca_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            Some(path)
        };
        let node_id = if self.node_id.is_empty() {
            host_name()
        } else {
            self.node_id.clone()
        };
        let node_ok = (1..=64).contains(&node_id.len())
            && node_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !node_ok {
            return Err(invalid(
                "cluster.node_id",
                format!("{node_id:?} must be 1 to 64 letters, digits, '-' or '_'"),
            ));
        }
        let _ = listen;
        let advertise_url = if self.advertise_url.is_empty() {
            None
        } else {
            let u = self.advertise_url.trim_end_matches('/');
            let ok = ["http://", "https://"].iter().any(|s| {
                u.strip_prefix(s)
                    .is_some_and(|r| !r.is_empty() && !r.contains('/'))
            });
            if !ok {
                return Err(invalid(
                    "cluster.advertise_url",
                    format!("{:?} is not http://host:port", self.advertise_url),
                ));
            }
            Some(u.to_owned())
        };
        let partitions = match self.partitions {
            0 => None,
            n => Some(
                crate::core::Partitioning::new(n)
                    .map_err(|e| invalid("cluster.partitions", e.to_string()))?,
            ),
        };
        if !(1..=5).contains(&self.replicas) {
            return Err(invalid("cluster.replicas", "must be 1 to 5"));
        }
        let max_streams = partitions.map_or(64, |p| u32::from(p.count()).min(64));
        if !(1..=max_streams).contains(&self.stream_count) {
            return Err(invalid(
                "cluster.stream_count",
                format!("must be 1 to {max_streams} (and at most the partition count)"),
            ));
        }
        let lease_ttl = duration_key("cluster.lease_ttl", &self.lease_ttl)?;
        if !(2..=300).contains(&lease_ttl) {
            return Err(invalid("cluster.lease_ttl", "must be 2s to 5m"));
        }
        let checkpoint_every = duration_key("cluster.checkpoint_every", &self.checkpoint_every)?;
        if !(1..=300).contains(&checkpoint_every) {
            return Err(invalid("cluster.checkpoint_every", "must be 1s to 5m"));
        }
        Ok(ClusterSettings {
            lease_ttl: std::time::Duration::from_secs(u64::from(lease_ttl)),
            checkpoint_every: std::time::Duration::from_secs(u64::from(checkpoint_every)),
            nats_urls: self.nats_urls.clone(),
            auth,
            tls_ca_file,
            node_id,
            advertise_url,
            partitions,
            replicas: self.replicas as usize,
            stream_count: self.stream_count as u16,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let s = Settings::resolve(&Config::load(None, env(&[])).unwrap()).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.store.path, PathBuf::from("./wnsgate-data"));
        assert_eq!(s.thresholds, Thresholds::default());
        assert_eq!(s.uri_policy.allowed_host_suffix, "notify.windows.com");
        assert!(s.tokens.is_empty());
    }

    #[test]
    fn file_then_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[api]\nlisten = \"127.0.0.1:9000\"\n[store]\npath = \"/tmp/x\"\n[lifecycle]\nexpire_after = \"20d\"\n",
        )
        .unwrap();
        let cfg = Config::load(
            Some(&path),
            env(&[
                ("WNSGATE_API__LISTEN", "0.0.0.0:9001"),
                ("WNSGATE_API__TOKENS", r#"["0123456789abcdef0123"]"#),
                ("WNSGATE_STORE__QUEUE_CAPACITY", "12"),
                ("WNSGATE_UNRELATED", "x"),
                ("OTHER__THING", "y"),
            ]),
        )
        .unwrap();
        let s = Settings::resolve(&cfg).unwrap();
        assert_eq!(s.listen.to_string(), "0.0.0.0:9001");
        assert_eq!(s.tokens.len(), 1);
        assert_eq!(s.store.queue_capacity, 12);
        assert_eq!(s.store.path, PathBuf::from("/tmp/x"));
        assert_eq!(s.thresholds.expire_after, 20 * 86_400);
    }

    #[test]
    fn wns_request_options() {
        let s = Settings::resolve(&Config::load(None, env(&[])).unwrap()).unwrap();
        assert_eq!(s.wns_ttl_secs, None);
        assert!(!s.wns.request_for_status);
        let cfg = Config::load(
            None,
            env(&[
                ("WNSGATE_WNS__TTL", "2h"),
                ("WNSGATE_WNS__REQUEST_FOR_STATUS", "true"),
            ]),
        )
        .unwrap();
        let s = Settings::resolve(&cfg).unwrap();
        assert_eq!(s.wns_ttl_secs, Some(7200));
        assert!(s.wns.request_for_status);
    }

    #[test]
    fn wns_retry_window_and_breaker() {
        use std::time::Duration;
        let s = Settings::resolve(&Config::load(None, env(&[])).unwrap()).unwrap();
        assert_eq!(s.wns_retry_window, Duration::from_secs(60));
        assert_eq!(s.wns_breaker, crate::core::wns::BreakerPolicy::default());
        let cfg = Config::load(
            None,
            env(&[
                ("WNSGATE_WNS__RETRY_WINDOW", "5s"),
                ("WNSGATE_WNS__BREAKER_FAILURES", "0"),
                ("WNSGATE_WNS__BREAKER_OPEN", "2s"),
                ("WNSGATE_WNS__BREAKER_OPEN_MAX", "1m"),
            ]),
        )
        .unwrap();
        let s = Settings::resolve(&cfg).unwrap();
        assert_eq!(s.wns_retry_window, Duration::from_secs(5));
        assert_eq!(s.wns_breaker.failures_to_open, 0);
        assert_eq!(s.wns_breaker.open_for, Duration::from_secs(2));
        assert_eq!(s.wns_breaker.open_for_max, Duration::from_secs(60));
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("WNSGATE_API__LISTEN", "localhost")], "api.listen"),
            (&[("WNSGATE_API__LISTEN", "0.0.0.0:8080")], "no API tokens"),
            (
                &[("WNSGATE_LIFECYCLE__EXPIRE_AFTER", "10d")],
                "lifecycle.expire_after",
            ),
            (
                &[("WNSGATE_LIFECYCLE__RENEWAL_DUE_AFTER", "soon")],
                "lifecycle.renewal_due_after",
            ),
            (
                &[("WNSGATE_WNS__CA_FILE", "/nonexistent.pem")],
                "wns.ca_file",
            ),
            (&[("WNSGATE_WNS__TTL", "a while")], "wns.ttl"),
            (&[("WNSGATE_WNS__TTL", "0s")], "wns.ttl"),
            (&[("WNSGATE_WNS__TTL", "200000d")], "wns.ttl"),
            (&[("WNSGATE_WNS__RETRY_WINDOW", "soon")], "wns.retry_window"),
            (&[("WNSGATE_WNS__RETRY_WINDOW", "0s")], "wns.retry_window"),
            (&[("WNSGATE_WNS__RETRY_WINDOW", "2h")], "wns.retry_window"),
            (
                &[("WNSGATE_WNS__BREAKER_FAILURES", "1001")],
                "wns.breaker_failures",
            ),
            (
                &[("WNSGATE_WNS__BREAKER_FAILURES", "-1")],
                "WNSGATE_WNS__BREAKER_FAILURES",
            ),
            (&[("WNSGATE_WNS__BREAKER_OPEN", "0s")], "wns.breaker_open"),
            (
                &[("WNSGATE_WNS__BREAKER_OPEN", "10s")],
                "wns.breaker_open_max",
            ),
            (
                &[("WNSGATE_WNS__BREAKER_OPEN_MAX", "a minute")],
                "wns.breaker_open_max",
            ),
            (
                &[("WNSGATE_WNS__REQUEST_FOR_STATUS", "maybe")],
                "WNSGATE_WNS__REQUEST_FOR_STATUS",
            ),
            (&[("WNSGATE_API__TOKENS", r#"["short"]"#)], "16 characters"),
            (&[("WNSGATE_SERVER__IO", "fastest")], "WNSGATE_SERVER__IO"),
            (
                &[("WNSGATE_STORE__CACHE_MB", "lots")],
                "WNSGATE_STORE__CACHE_MB",
            ),
            (
                &[(
                    "WNSGATE_WNS__APPS",
                    r#"[{pfn = "Contoso.MDM_8wekyb3d8bbwe", package_sid = "ms-app://S-1", client_secret = "s", entra_tenant = "a/b"}]"#,
                )],
                "wns.apps[0].entra_tenant",
            ),
        ];
        for (vars, want) in cases {
            let err = Config::load(None, env(vars))
                .map_err(|e| e.to_string())
                .and_then(|c| Settings::resolve(&c).map_err(|e| e.to_string()))
                .unwrap_err();
            assert!(err.contains(want), "{vars:?}: {err}");
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[api]\nlisen = \"127.0.0.1:9000\"\n").unwrap();
        let err = Config::load(Some(&path), env(&[])).unwrap_err().to_string();
        assert!(err.contains("lisen"), "{err}");
    }

    #[test]
    fn an_unknown_key_from_the_environment_names_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[api]\nlisten = \"127.0.0.1:9000\"\n").unwrap();
        for file in [None, Some(path.as_path())] {
            let err = Config::load(file, env(&[("WNSGATE_API__LISTN", "127.0.0.1:1")]))
                .unwrap_err()
                .to_string();
            assert!(err.contains("WNSGATE_API__LISTN"), "{err}");
            assert!(!err.contains("config file"), "{err}");
        }
        let err = Config::load(None, env(&[("WNSGATE_NOPE__X", "1")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("WNSGATE_NOPE__X"), "{err}");
        // The same typo in the file is still the file's.
        std::fs::write(&path, "[api]\nlistn = \"127.0.0.1:9000\"\n").unwrap();
        let err = Config::load(Some(&path), env(&[("WNSGATE_API__LISTEN", "127.0.0.1:1")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("c.toml") && !err.contains("WNSGATE_"), "{err}");
    }

    #[test]
    fn secrets_resolve_and_never_print() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "from-file\n").unwrap();
        let mut app = WnsApp {
            pfn: "Contoso.MDM_8wekyb3d8bbwe".into(),
            package_sid: "ms-app://S-1-15-2-1".into(),
            client_secret_file: file.display().to_string(),
            ..WnsApp::default()
        };
        assert_eq!(resolve_secret("k", &app).unwrap().expose(), "from-file");
        app.client_secret = Secret("inline-secret".into());
        assert!(resolve_secret("k", &app)
            .unwrap_err()
            .to_string()
            .contains("only one"));
        assert!(!format!("{app:?}").contains("inline-secret"));
    }
}
