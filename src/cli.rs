//! The commands behind `wnsgate serve`, `wnsgate import`,
//! `wnsgate health`, `wnsgate migrate` and `wnsgate check-config --probe-wns`.

use crate::client::Client;
use crate::config::Settings;
use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::Path;
use std::sync::mpsc;

/// Runs the gateway until SIGTERM or SIGINT, then shuts down cleanly
/// (see [`crate::server::Running::shutdown`]) and returns. A second signal
/// during shutdown exits at once with status 130; a shutdown that takes
/// longer than [`crate::server::SHUTDOWN_LIMIT`] exits with status 1.
/// `config` is the file the settings came from, for the start-up log.
pub fn serve(settings: Settings, config: Option<&Path>) -> anyhow::Result<()> {
    crate::telemetry::logging::init(settings.log.format, &settings.log.level);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %config.map_or("(none: defaults and WNSGATE_* variables)".into(), |p| p.display().to_string()),
        "starting"
    );
    let first_signal = spawn_signal_watcher()?;
    let running = crate::server::start(settings)?;
    println!("listening on http://{}", running.local_addr);
    let _ = first_signal.recv();
    tracing::info!(
        "shutting down: finishing wake-ups and requests in flight, then flushing the store"
    );
    spawn_shutdown_watchdog(crate::server::SHUTDOWN_LIMIT)?;
    running.shutdown();
    Ok(())
}

/// Exits the process with status 1 if shutdown is still running after
/// `limit`, so a stuck drain never keeps a service manager waiting.
fn spawn_shutdown_watchdog(limit: std::time::Duration) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("wnsgate-shutdown-limit".into())
        .spawn(move || {
            std::thread::sleep(limit);
            eprintln!(
                "wnsgate: shutdown took longer than {} s, exiting now",
                limit.as_secs()
            );
            std::process::exit(1);
        })
        .context("cannot start the shutdown watchdog")?;
    Ok(())
}

/// A thread that reports the first SIGTERM/SIGINT and exits the process on
/// the second.
fn spawn_signal_watcher() -> anyhow::Result<mpsc::Receiver<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = mpsc::channel();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("cannot start the signal watcher")?;
    let (mut term, mut int) = rt.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        ))
    })?;
    std::thread::Builder::new()
        .name("wnsgate-signals".into())
        .spawn(move || {
            rt.block_on(async move {
                let mut seen = 0;
                loop {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                    seen += 1;
                    if seen == 1 {
                        let _ = tx.send(());
                    } else {
                        eprintln!("wnsgate: second signal, exiting now");
                        std::process::exit(130);
                    }
                }
            })
        })?;
    Ok(rx)
}

/// Streams an NDJSON file to a gateway's `POST /v1/devices:import`, with a
/// progress bar, and prints the gateway's report. Returns how many lines
/// the gateway rejected.
pub fn import(file: &Path, url: &str, token: Option<String>) -> anyhow::Result<u64> {
    let mut f =
        std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut client = Client::new(url)?
        .with_token(token)
        .with_timeout(std::time::Duration::from_secs(300));
    let bar = ProgressBar::new(size).with_style(
        ProgressStyle::with_template(
            "{spinner} importing [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    let started = crate::clock::instant();
    let resp = client
        .request_streaming(
            "POST",
            "/v1/devices:import",
            "application/x-ndjson",
            &mut f,
            &mut |n| bar.set_position(n),
        )
        .with_context(|| format!("import to {url} failed"))?;
    bar.finish_and_clear();
    let body = resp.json();
    if resp.status != 200 {
        anyhow::bail!("gateway answered {}: {}", resp.status, resp.text());
    }
    let accepted = body["accepted"].as_u64().unwrap_or(0);
    let rejected = body["rejected"].as_u64().unwrap_or(0);
    let secs = started.elapsed().as_secs_f64();
    println!(
        "imported {accepted} devices, rejected {rejected} lines, in {secs:.1} s ({:.0} devices/s)",
        accepted as f64 / secs.max(1e-9)
    );
    if let Some(errors) = body["errors"].as_array() {
        for e in errors.iter().take(20) {
            println!(
                "  line {}: {} ({})",
                e["line"],
                e["message"].as_str().unwrap_or(""),
                e["code"].as_str().unwrap_or("")
            );
        }
        if errors.len() > 20 || body["errors_truncated"].as_bool() == Some(true) {
            println!("  ...");
        }
    }
    Ok(rejected)
}

/// `GET base_url + path` with a short timeout; Ok when the answer is 200.
pub fn health(base_url: &str, path: &str) -> anyhow::Result<()> {
    let mut client = Client::new(base_url)?.with_timeout(std::time::Duration::from_secs(3));
    let resp = client
        .get(path)
        .with_context(|| format!("{base_url}{path}: no answer"))?;
    anyhow::ensure!(
        resp.status == 200,
        "{base_url}{path} answered {}: {}",
        resp.status,
        resp.text().trim()
    );
    println!("{base_url}{path}: {}", resp.text().trim());
    Ok(())
}

/// `wnsgate migrate`: converts a 0.x (fjall) data directory, with a
/// progress bar, and says which old files may now be removed.
pub fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let data = &settings.store.path;
    if !crate::migrate::needed(data) {
        println!(
            "nothing to convert in {}: it holds no 0.x store, or it was converted already",
            data.display()
        );
        return Ok(());
    }
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "converting {bar:40} {pos}/{len} devices ({per_sec}, {eta} left)",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let done = crate::migrate::migrate(data, &settings.store, threads, &|n, total| {
        bar.set_length(total.max(n));
        bar.set_position(n);
    })?;
    bar.finish_and_clear();
    println!(
        "converted {} devices and {} refresh jobs in {:.1} s into a {} MB snapshot (counts checked)",
        done.devices,
        done.jobs,
        done.seconds,
        done.snapshot_bytes / 1_000_000
    );
    let old = crate::migrate::leftovers(data);
    if !old.is_empty() {
        println!(
            "the 0.x files are kept and no longer read; once satisfied, remove them: cd {} && rm -r {}",
            data.display(),
            old.join(" ")
        );
    }
    Ok(())
}

/// `check-config --probe-wns`: fetches an access token for every
/// `[[wns.apps]]` entry from its token endpoint, printing one line per app.
/// Fails when any app got none, or when no app is configured: a wrong
/// secret or an unreachable endpoint shows here instead of at the first
/// wake.
pub fn probe_wns(settings: &Settings) -> anyhow::Result<()> {
    anyhow::ensure!(
        !settings.wns.apps.is_empty(),
        "--probe-wns: no [[wns.apps]] is configured, so there is no credential to probe"
    );
    let sender = crate::sender::wake::WnsSender::new(settings, 1)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start a runtime for the probe")?;
    let probed = rt.block_on(sender.probe_tokens());
    let mut failed = 0;
    for (pfn, got) in probed {
        match got {
            Ok(lifetime) => println!(
                "wns app {pfn}: token OK (valid for {} s)",
                lifetime.as_secs()
            ),
            Err(e) => {
                failed += 1;
                println!("wns app {pfn}: no token: {e}");
            }
        }
    }
    anyhow::ensure!(
        failed == 0,
        "--probe-wns: {failed} WNS app(s) got no token (listed above)"
    );
    Ok(())
}
