//! The `wnsgate` command line.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use wnsgate::config::{Config, IoBackend, LogFormat, Settings};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long mimalloc keeps freed memory before handing it back to the OS,
/// in milliseconds (its default is 10).
///
/// A bulk wake frees and reallocates the same few megabytes (store pages,
/// wakes in flight, h2 frames) continuously. With the default, those
/// pages went back to the kernel between bursts and came back as fresh
/// zeroed pages: about one page fault per three pushes. A second keeps
/// them through a job and still returns them soon after it.
const ALLOCATOR_PURGE_DELAY_MS: std::ffi::c_long = 1000;

/// `mi_option_purge_delay` in mimalloc's `mi_option_t` (the same value in
/// the v2 and v3 headers bundled by libmimalloc-sys 0.1.49).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

extern "C" {
    /// mimalloc's option setter; linked from libmimalloc-sys.
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
    /// mimalloc's collection: with `force`, frees what every heap holds
    /// unused, abandoned heaps of finished threads included.
    fn mi_collect(force: bool);
}

fn tune_allocator() {
    // SAFETY: mi_option_set only stores an option value; any value is
    // valid for purge_delay (-1 disables purging, 0 purges at once).
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, ALLOCATOR_PURGE_DELAY_MS) };
    // The store load at start runs on scan threads that end with it.
    let _ = wnsgate::server::AFTER_LOAD.set(|| {
        // SAFETY: mi_collect only walks mimalloc's own heaps.
        unsafe { mi_collect(true) }
    });
}

#[derive(Parser)]
#[command(
    name = "wnsgate",
    version,
    about = "Push gateway for Windows device management (WNS wake-ups for OMA-DM servers)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway.
    Serve {
        /// TOML configuration file; every key can also be set as WNSGATE_SECTION__KEY.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Address to listen on (overrides api.listen).
        #[arg(long)]
        listen: Option<String>,
        /// Data directory (overrides store.path).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Shard threads (overrides server.shards; 0 = one per core).
        #[arg(long)]
        shards: Option<usize>,
        /// Network backend (overrides server.io).
        #[arg(long, value_enum)]
        io: Option<IoBackend>,
        /// Log format (overrides log.format).
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
        /// Start even when stored data is damaged, losing what follows the
        /// damage (sets store.accept_damage for this start).
        #[arg(long)]
        accept_damage: bool,
    },
    /// Convert a data directory written by wnsgate 0.x (the fjall store)
    /// now, with a progress bar and a count check; `serve` also does it on
    /// its first start. The old files are kept until you remove them.
    Migrate {
        /// TOML configuration file (store.path, store.partitions).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Data directory (overrides store.path).
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// Validate a configuration file (and the environment overrides) without starting.
    CheckConfig {
        /// The file; without it, the defaults plus the environment are checked.
        file: Option<PathBuf>,
        /// Also fetch an access token for each [[wns.apps]] entry from its
        /// token endpoint (needs network access to it).
        #[arg(long)]
        probe_wns: bool,
    },
    /// Register devices from an NDJSON file through a running gateway's API.
    Import {
        /// NDJSON file, one registration per line: {"device_id","pfn","channel_uri","issued_at"?,"provider_id"?}.
        file: PathBuf,
        /// The gateway's base URL.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Bearer token (or set WNSGATE_TOKEN).
        #[arg(long, env = "WNSGATE_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Exit 0 even when the gateway rejected lines (they are still
        /// listed). Without it, rejected lines make the exit status 1.
        #[arg(long)]
        warn_only: bool,
    },
    /// Run a self-contained demonstration on a temporary data directory.
    Demo {
        /// Devices in the synthetic fleet.
        #[arg(long, default_value_t = 100_000)]
        devices: u64,
    },
    /// Run a WNS simulator (token and push endpoints, scripted behaviours, faults).
    Sim(wnsgate::sim::cli::SimArgs),
    /// Probe a running gateway's /readyz (or --path) and exit 0 when it
    /// answers 200: a health check for images without curl.
    Health {
        /// Configuration file whose api.listen is probed (0.0.0.0 and [::]
        /// are probed on loopback); WNSGATE_API__LISTEN applies too.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Base URL to probe instead of api.listen.
        #[arg(long)]
        url: Option<String>,
        /// Path to probe.
        #[arg(long, default_value = "/readyz")]
        path: String,
    },
    /// Print the version.
    Version,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Serve {
            config,
            listen,
            data,
            shards,
            io,
            log_format,
            accept_damage,
        } => {
            tune_allocator();
            let mut overrides: Vec<(String, String)> = Vec::new();
            if let Some(v) = listen {
                overrides.push(("WNSGATE_API__LISTEN".into(), v));
            }
            if let Some(v) = data {
                overrides.push(("WNSGATE_STORE__PATH".into(), v.display().to_string()));
            }
            if let Some(v) = shards {
                overrides.push(("WNSGATE_SERVER__SHARDS".into(), v.to_string()));
            }
            if let Some(v) = io {
                overrides.push(("WNSGATE_SERVER__IO".into(), enum_name(&v)));
            }
            if let Some(v) = log_format {
                overrides.push(("WNSGATE_LOG__FORMAT".into(), enum_name(&v)));
            }
            if accept_damage {
                overrides.push(("WNSGATE_STORE__ACCEPT_DAMAGE".into(), "true".into()));
            }
            load_settings(config.as_deref(), overrides)
                .and_then(|s| wnsgate::cli::serve(s, config.as_deref()))
        }
        Cmd::CheckConfig { file, probe_wns } => load_settings(file.as_deref(), Vec::new())
            .and_then(|s| {
                let notes = wnsgate::server::preflight(&s)?;
                println!(
                    "configuration OK: listen {}, data {}, {} API token(s), {} WNS app(s)",
                    s.listen,
                    s.store.path.display(),
                    s.tokens.len(),
                    s.known_pfns.len()
                );
                if let Some(c) = &s.cluster {
                    println!(
                        "cluster mode: NATS {}, node {}, advertised as {}, partitions {}, {} replica(s), {} stream(s), lease_ttl {:?}, checkpoint_every {:?}",
                        c.nats_urls.join(","),
                        c.node_id,
                        c.advertise_url.as_deref().unwrap_or("(the API's address)"),
                        c.partitions
                            .map_or_else(|| "(the cluster's own)".to_owned(), |p| p.count().to_string()),
                        c.replicas,
                        c.stream_count,
                        c.lease_ttl,
                        c.checkpoint_every
                    );
                }
                for note in notes {
                    println!("note: {note}");
                }
                if probe_wns {
                    wnsgate::cli::probe_wns(&s)?;
                }
                Ok(())
            }),
        Cmd::Import {
            file,
            url,
            token,
            warn_only,
        } => match wnsgate::cli::import(&file, &url, token) {
            Ok(rejected) if rejected > 0 && !warn_only => {
                eprintln!(
                    "wnsgate: the gateway rejected {rejected} line(s) (listed above); \
                     --warn-only exits 0 all the same"
                );
                return ExitCode::from(1);
            }
            other => other.map(|_| ()),
        },
        Cmd::Migrate { config, data } => {
            let overrides = data
                .map(|v| ("WNSGATE_STORE__PATH".to_owned(), v.display().to_string()))
                .into_iter()
                .collect();
            load_settings(config.as_deref(), overrides).and_then(|s| wnsgate::cli::migrate(&s))
        }
        Cmd::Demo { devices } => wnsgate::demo::run(devices),
        Cmd::Sim(args) => wnsgate::sim::cli::run(args),
        Cmd::Health { config, url, path } => {
            health_url(config.as_deref(), url).and_then(|url| wnsgate::cli::health(&url, &path))
        }
        Cmd::Version => {
            println!("wnsgate {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wnsgate: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn enum_name<T: clap::ValueEnum>(v: &T) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_owned())
        .unwrap_or_default()
}

fn load_settings(
    file: Option<&std::path::Path>,
    overrides: Vec<(String, String)>,
) -> anyhow::Result<Settings> {
    let env = std::env::vars().chain(overrides);
    let cfg = Config::load(file, env)?;
    Ok(Settings::resolve(&cfg)?)
}

/// The base URL `wnsgate health` probes: `--url`, or api.listen from the
/// configuration with an unspecified address replaced by loopback.
fn health_url(file: Option<&std::path::Path>, url: Option<String>) -> anyhow::Result<String> {
    if let Some(url) = url {
        return Ok(url);
    }
    let cfg = Config::load(file, std::env::vars())?;
    let mut addr: std::net::SocketAddr = cfg
        .api
        .listen
        .parse()
        .map_err(|_| anyhow::anyhow!("api.listen: {:?} is not an IP:port", cfg.api.listen))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Ok(format!("http://{addr}"))
}
