//! `wnsgate demo`: a gateway on a temporary data directory, a synthetic
//! fleet registered through the real HTTP API, lifecycle states computed,
//! a restart that proves every acknowledged registration survived.

use crate::client::Client;
use crate::config::{Config, Settings};
use crate::core::UnixTime;
use crate::fleet::{self, AgeMix};
use anyhow::{ensure, Context};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Read;
use std::time::Instant;

/// Streams the NDJSON lines of devices `0..n` without holding them all.
struct FleetReader {
    next: u64,
    n: u64,
    now: UnixTime,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for FleetReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() && self.next < self.n {
            self.buf.clear();
            self.pos = 0;
            let end = (self.next + 1024).min(self.n);
            for i in self.next..end {
                self.buf.extend_from_slice(
                    fleet::ndjson_line(i, self.now, AgeMix::default()).as_bytes(),
                );
            }
            self.next = end;
        }
        let k = (self.buf.len() - self.pos).min(out.len());
        out[..k].copy_from_slice(&self.buf[self.pos..self.pos + k]);
        self.pos += k;
        Ok(k)
    }
}

/// Runs the demonstration with a fleet of `devices`.
pub fn run(devices: u64) -> anyhow::Result<()> {
    ensure!(devices > 0, "--devices must be at least 1");
    let dir = tempfile::tempdir().context("cannot create a temporary data directory")?;
    let env = vec![
        ("WNSGATE_API__LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
        (
            "WNSGATE_STORE__PATH".to_owned(),
            dir.path().display().to_string(),
        ),
        ("WNSGATE_LOG__LEVEL".to_owned(), "warn".to_owned()),
    ];
    let settings = Settings::resolve(&Config::load(None, env)?)?;
    crate::telemetry::logging::init(settings.log.format, &settings.log.level);

    println!(
        "wnsgate demo: {devices} synthetic devices, data in {}",
        dir.path().display()
    );
    let running = crate::server::start(settings.clone())?;
    let url = format!("http://{}", running.local_addr);
    println!(
        "gateway listening on {url} with {} shard(s)",
        settings.shard_count()
    );

    let now = running.gateway.now();
    let mut client = Client::new(&url)?.with_timeout(std::time::Duration::from_secs(600));
    let bar = ProgressBar::new(devices).with_style(
        ProgressStyle::with_template(
            "registering [{bar:40}] {pos}/{len} devices {per_sec} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    let line_len = fleet::ndjson_line(0, now, AgeMix::default()).len() as u64;
    let mut reader = FleetReader {
        next: 0,
        n: devices,
        now,
        buf: Vec::new(),
        pos: 0,
    };
    let t = Instant::now();
    let resp = client.request_streaming(
        "POST",
        "/v1/devices:import",
        "application/x-ndjson",
        &mut reader,
        &mut |sent| bar.set_position((sent / line_len).min(devices)),
    )?;
    bar.finish_and_clear();
    let import_secs = t.elapsed().as_secs_f64();
    ensure!(
        resp.status == 200,
        "import failed: {} {}",
        resp.status,
        resp.text()
    );
    let report = resp.json();
    let accepted = report["accepted"].as_u64().unwrap_or(0);
    ensure!(
        accepted == devices,
        "the gateway accepted {accepted} of {devices} devices: {report}"
    );
    println!(
        "registered {accepted} devices durably in {import_secs:.2} s ({:.0} devices/s, fsync'd group commits)",
        accepted as f64 / import_secs
    );

    let stats = client.get("/v1/stats")?.json();
    println!("lifecycle states now:");
    for (state, n) in stats["by_state"].as_object().into_iter().flatten() {
        println!("  {state:<16} {n:>10}");
    }

    let sample = client
        .get(&format!("/v1/devices/{}", fleet::device_id(0)))?
        .json();
    println!(
        "one device record:\n{}",
        serde_json::to_string_pretty(&sample)?
    );

    println!("restarting the gateway on the same data directory...");
    running.shutdown();
    let t = Instant::now();
    let running = crate::server::start(settings)?;
    let restart_secs = t.elapsed().as_secs_f64();
    let mut client = Client::new(&format!("http://{}", running.local_addr))?;
    let after = client.get("/v1/stats")?.json();
    ensure!(
        after["devices"].as_u64() == Some(devices),
        "after restart the gateway holds {} devices, expected {devices}",
        after["devices"]
    );
    let again = client
        .get(&format!("/v1/devices/{}", fleet::device_id(0)))?
        .json();
    ensure!(
        again["channel_uri"] == sample["channel_uri"],
        "device 0 changed across the restart"
    );
    println!("ready again after {restart_secs:.2} s with all {devices} devices, byte-exact");
    running.shutdown();
    println!(
        "summary: {devices} registered at {:.0}/s, restart {restart_secs:.2} s",
        devices as f64 / import_secs
    );
    Ok(())
}
