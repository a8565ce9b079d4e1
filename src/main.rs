//! The `wnsgate` command line.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use wnsgate::config::{Config, IoBackend, LogFormat, Settings};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    },
    /// Validate a configuration file (and the environment overrides) without starting.
    CheckConfig {
        /// The file; without it, the defaults plus the environment are checked.
        file: Option<PathBuf>,
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
    },
    /// Run a self-contained demonstration on a temporary data directory.
    Demo {
        /// Devices in the synthetic fleet.
        #[arg(long, default_value_t = 100_000)]
        devices: u64,
    },
    /// Run a WNS simulator (token and push endpoints, scripted behaviours, faults).
    Sim(wnsgate::sim::cli::SimArgs),
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
        } => {
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
            load_settings(config.as_deref(), overrides).and_then(wnsgate::cli::serve)
        }
        Cmd::CheckConfig { file } => load_settings(file.as_deref(), Vec::new()).map(|s| {
            println!(
                "configuration OK: listen {}, data {}, {} API token(s), {} WNS app(s)",
                s.listen,
                s.store.path.display(),
                s.tokens.len(),
                s.known_pfns.len()
            );
        }),
        Cmd::Import { file, url, token } => wnsgate::cli::import(&file, &url, token),
        Cmd::Demo { devices } => wnsgate::demo::run(devices),
        Cmd::Sim(args) => wnsgate::sim::cli::run(args),
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
