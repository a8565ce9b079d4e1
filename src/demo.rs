//! `wnsgate demo`: the whole story on the embedded default, in one process.
//!
//! A WNS simulator and a gateway start on a temporary data directory; a
//! synthetic fleet registers through the real HTTP API (fresh channels,
//! channels past 15 days, channels past 30 days, and channels the simulator
//! answers 410 for); one bulk wake reaches every device over TLS; WNS's
//! answers mark dead channels; expiry is found both by age (the sweep) and
//! by WNS (410), each dead channel gets one refresh job, the simulated
//! devices check in, take their PFN-replacement SyncML and re-register a
//! fresh channel URI; a restart proves every record survived.

use crate::client::Client;
use crate::config::{Config, Settings};
use crate::core::{LifecycleState, Thresholds, UnixTime};
use crate::fleet::{self, AgeMix};
use anyhow::{ensure, Context};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Read;
use std::time::Duration;

/// One registration of the demo fleet. Channels past 30 days, and one in
/// fifty of the others, get tokens the simulator answers 410 for, as WNS
/// does for expired or revoked channels.
fn demo_line(i: u64, now: UnixTime) -> String {
    let issued = fleet::issued_at(i, now, AgeMix::default());
    let aged_out =
        Thresholds::default().state_at(issued, None, now).state == LifecycleState::Expired;
    let mut uri = fleet::channel_uri(i, 0);
    if aged_out || i % 50 == 7 {
        uri = uri.replacen("token=", "token=x410", 1);
    }
    let line = serde_json::json!({
        "device_id": fleet::device_id(i),
        "pfn": fleet::DEMO_PFN,
        "channel_uri": uri,
        "issued_at": issued.to_rfc3339(),
    });
    format!("{line}\n")
}

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
                self.buf
                    .extend_from_slice(demo_line(i, self.now).as_bytes());
            }
            self.next = end;
        }
        let k = (self.buf.len() - self.pos).min(out.len());
        out[..k].copy_from_slice(&self.buf[self.pos..self.pos + k]);
        self.pos += k;
        Ok(k)
    }
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let template =
        format!("{what:<11} [{{bar:40}}] {{pos}}/{{len}} devices {{per_sec}} eta {{eta}}");
    ProgressBar::new(len).with_style(
        ProgressStyle::with_template(&template)
            .expect("static template")
            .progress_chars("=> "),
    )
}

fn print_states(title: &str, stats: &serde_json::Value) {
    println!("{title}");
    for state in LifecycleState::ALL {
        let n = stats["by_state"][state.as_str()].as_u64().unwrap_or(0);
        println!("  {:<16} {n:>10}", state.as_str());
    }
}

/// Runs the demonstration with a fleet of `devices`.
pub fn run(devices: u64) -> anyhow::Result<()> {
    ensure!(devices > 0, "--devices must be at least 1");
    let dir = tempfile::tempdir().context("cannot create a temporary data directory")?;
    let sim = crate::sim::start(crate::sim::SimConfig::default())
        .context("cannot start the WNS simulator")?;
    let apps = format!(
        "[{{pfn = \"{}\", package_sid = \"ms-app://S-1-15-2-2026\", client_secret = \"demo-secret\"}}]",
        fleet::DEMO_PFN
    );
    let env = vec![
        ("WNSGATE_API__LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
        (
            "WNSGATE_STORE__PATH".to_owned(),
            dir.path().display().to_string(),
        ),
        ("WNSGATE_LOG__LEVEL".to_owned(), "warn".to_owned()),
        ("WNSGATE_WNS__TOKEN_URL".to_owned(), sim.token_url()),
        ("WNSGATE_WNS__CONNECT_TO".to_owned(), sim.addr.to_string()),
        (
            "WNSGATE_WNS__CA_FILE".to_owned(),
            sim.ca_pem_path.display().to_string(),
        ),
        ("WNSGATE_WNS__APPS".to_owned(), apps),
        (
            "WNSGATE_REFRESH__SWEEP_INTERVAL".to_owned(),
            "1s".to_owned(),
        ),
        (
            "WNSGATE_REFRESH__JOBS_PER_SECOND".to_owned(),
            "1000".to_owned(),
        ),
        (
            "WNSGATE_REFRESH__PROVIDER_ID".to_owned(),
            "Contoso-MDM".to_owned(),
        ),
    ];
    let settings = Settings::resolve(&Config::load(None, env)?)?;
    crate::telemetry::logging::init(settings.log.format, &settings.log.level);

    println!(
        "wnsgate demo: {devices} synthetic devices, data in {}",
        dir.path().display()
    );
    println!("WNS simulator on {} (TLS; h2 and HTTP/1.1)", sim.addr);
    let running = crate::server::start(settings.clone())?;
    let url = format!("http://{}", running.local_addr);
    println!(
        "gateway listening on {url} with {} shard(s)",
        settings.shard_count()
    );

    // Register the fleet.
    let now = running.gateway.now();
    let mut client = Client::new(&url)?.with_timeout(Duration::from_secs(600));
    let line_len = demo_line(0, now).len() as u64;
    let mut reader = FleetReader {
        next: 0,
        n: devices,
        now,
        buf: Vec::new(),
        pos: 0,
    };
    let progress = bar(devices, "registering");
    let t = crate::clock::instant();
    let resp = client.request_streaming(
        "POST",
        "/v1/devices:import",
        "application/x-ndjson",
        &mut reader,
        &mut |sent| progress.set_position((sent / line_len).min(devices)),
    )?;
    progress.finish_and_clear();
    let import_secs = t.elapsed().as_secs_f64();
    ensure!(
        resp.status == 200,
        "import failed: {} {}",
        resp.status,
        resp.text()
    );
    let accepted = resp.json()["accepted"].as_u64().unwrap_or(0);
    ensure!(
        accepted == devices,
        "the gateway accepted {accepted} of {devices} devices"
    );
    println!(
        "registered {accepted} devices durably in {import_secs:.2} s ({:.0} devices/s, fsync'd group commits)",
        accepted as f64 / import_secs
    );
    print_states(
        "lifecycle states by channel age:",
        &client.get("/v1/stats")?.json(),
    );

    // The expiry sweep finds the channels past 30 days and opens their jobs.
    let t = crate::clock::instant();
    loop {
        let st = client.get("/v1/stats")?.json();
        if st["by_state"]["expired"].as_u64() == Some(0) {
            break;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(60),
            "the expiry sweep did not finish within 60 s: {st}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let by_age = opened_by(&mut client, "age")?;
    println!(
        "expiry sweep: {by_age} channels past 30 days found by age in {:.2} s, one refresh job each",
        t.elapsed().as_secs_f64()
    );

    // Wake everyone.
    let t = crate::clock::instant();
    let job = client.send_json("POST", "/v1/pushes", &serde_json::json!({"all": true}))?;
    ensure!(
        job.status == 202,
        "bulk wake refused: {} {}",
        job.status,
        job.text()
    );
    let job_id = job.json()["job_id"].as_str().unwrap_or_default().to_owned();
    let progress = bar(devices, "waking");
    let done = loop {
        let p = client.get(&format!("/v1/pushes/{job_id}"))?.json();
        progress.set_position(p["done"].as_u64().unwrap_or(0));
        if p["state"] == "done" {
            break p;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    progress.finish_and_clear();
    let wake_secs = t.elapsed().as_secs_f64();
    let woken = done["done"].as_u64().unwrap_or(0);
    println!(
        "woke {woken} devices through WNS in {wake_secs:.2} s ({:.0} pushes/s): {} received, {} found dead (410), {} dropped, {} throttled, {} failed",
        woken as f64 / wake_secs,
        done["received"],
        done["expired"],
        done["dropped"],
        done["throttled"],
        done["failed"],
    );
    let st = sim.stats();
    println!(
        "the simulator saw {} pushes to {} distinct channels (at most {} per channel) and issued {} access token(s)",
        st.pushes_total, st.distinct_channels, st.max_pushes_per_channel, st.tokens_issued
    );
    print_states(
        "lifecycle states after the wake (WNS verdicts included):",
        &client.get("/v1/stats")?.json(),
    );

    let by_wns = opened_by(&mut client, "wns_410")?;
    println!("refresh jobs: {by_age} opened by age, {by_wns} opened by WNS 410 answers");
    let dead = client
        .get(&format!("/v1/devices/{}", fleet::device_id(7)))?
        .json();
    println!(
        "a device WNS declared dead, with its refresh job:\n{}",
        serde_json::to_string_pretty(&dead)?
    );
    let lease = serde_json::json!({"max": 5, "lease_seconds": 60});
    let leased = retry_503(|| client.send_json("POST", "/v1/refresh:lease", &lease))?;
    ensure!(
        leased.status == 200,
        "lease refused: {} {}",
        leased.status,
        leased.text()
    );
    println!(
        "an MDM server leasing jobs gets the oldest expiry first: {} job(s), the first for {} (expired {})",
        leased.json()["jobs"].as_array().map_or(0, Vec::len),
        leased.json()["jobs"][0]["device_id"],
        leased.json()["jobs"][0]["expired_at"],
    );

    // The devices check in: each takes its SyncML and re-registers.
    let pending = client.get("/v1/stats")?.json()["by_state"]["refresh_pending"]
        .as_u64()
        .unwrap_or(0);
    let t = crate::clock::instant();
    let renewed = check_in_all(&mut client, pending)?;
    let renew_secs = t.elapsed().as_secs_f64();
    println!(
        "{renewed} devices checked in, ran their PFN replacement and registered a fresh channel URI in {renew_secs:.2} s ({:.0} devices/s)",
        renewed as f64 / renew_secs
    );
    let final_stats = client.get("/v1/stats")?.json();
    print_states(
        "lifecycle states after the devices re-registered:",
        &final_stats,
    );
    ensure!(
        final_stats["by_state"]["refresh_pending"].as_u64() == Some(0)
            && final_stats["refresh_queue"]["queued"].as_u64() == Some(0),
        "refresh jobs left open: {final_stats}"
    );
    let sample = client
        .get(&format!("/v1/devices/{}", fleet::device_id(7)))?
        .json();
    ensure!(
        sample["state"] == "active" && sample["channel_uri"] != dead["channel_uri"],
        "device 7 did not come back: {sample}"
    );

    // Restart on the same data.
    println!("restarting the gateway on the same data directory...");
    running.shutdown();
    let t = crate::clock::instant();
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
        .get(&format!("/v1/devices/{}", fleet::device_id(7)))?
        .json();
    ensure!(
        again == sample || again["channel_uri"] == sample["channel_uri"],
        "device 7 changed across the restart"
    );
    ensure!(
        again["state"] == sample["state"],
        "the state of device 7 changed across the restart"
    );
    println!("ready again after {restart_secs:.2} s with all {devices} devices, byte-exact");
    running.shutdown();
    sim.shutdown();
    println!(
        "summary: {devices} registered at {:.0}/s, woken at {:.0}/s; {by_age} channels expired by age and {by_wns} found dead by WNS, each given one refresh job; {renewed} devices re-registered; restart {restart_secs:.2} s",
        devices as f64 / import_secs,
        woken as f64 / wake_secs,
    );
    Ok(())
}

/// `wnsgate_refresh_jobs_opened_total{reason}` from `/metrics`.
fn opened_by(client: &mut Client, reason: &str) -> anyhow::Result<u64> {
    let text = client.get("/metrics")?.text();
    let key = format!("wnsgate_refresh_jobs_opened_total{{reason=\"{reason}\"}} ");
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64))
}

/// Every `refresh_pending` device opens a session: the MDM server asks for
/// its job (`GET /v1/devices/{id}/refresh`), runs the SyncML, and the device
/// registers a fresh channel URI. Devices come back concurrently, as a
/// fleet does, over 16 connections. Returns how many came back.
fn check_in_all(client: &mut Client, pending: u64) -> anyhow::Result<u64> {
    // Collect the ids first: re-registered devices leave the state, which
    // would shift the pages under the cursor.
    let mut ids = Vec::with_capacity(pending as usize);
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            None => "/v1/devices?state=refresh_pending&limit=1000".to_owned(),
            Some(c) => format!("/v1/devices?state=refresh_pending&limit=1000&cursor={c}"),
        };
        let page = client.get(&path)?.json();
        for d in page["devices"].as_array().into_iter().flatten() {
            ids.push(d["device_id"].as_str().unwrap_or_default().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let progress = bar(ids.len() as u64, "checking in");
    let base = client.base_url();
    let chunk = ids.len().div_ceil(16).max(1);
    let renewed = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| -> anyhow::Result<()> {
        let workers: Vec<_> = ids
            .chunks(chunk)
            .map(|part| {
                let (base, progress, renewed) = (&base, &progress, &renewed);
                s.spawn(move || -> anyhow::Result<()> {
                    let mut c = Client::new(base)?.with_timeout(Duration::from_secs(60));
                    for id in part {
                        let job = retry_503(|| c.get(&format!("/v1/devices/{id}/refresh")))?;
                        ensure!(
                            job.status == 200 && job.json()["syncml"].as_str().is_some(),
                            "no refresh job for {id}: {} {}",
                            job.status,
                            job.text()
                        );
                        let seed = id.bytes().fold(0u64, |h, b| fleet::mix(h ^ u64::from(b)));
                        let body = serde_json::json!({"pfn": fleet::DEMO_PFN, "channel_uri": fleet::channel_uri(seed, 1)});
                        let put = retry_503(|| {
                            c.send_json("PUT", &format!("/v1/devices/{id}/channel"), &body)
                        })?;
                        ensure!(put.status == 200, "re-registration of {id} failed: {}", put.text());
                        renewed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        progress.inc(1);
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a check-in worker panicked"))??;
        }
        Ok(())
    })?;
    progress.finish_and_clear();
    Ok(renewed.into_inner())
}

/// Sends a request again, as an MDM server does, while the gateway answers
/// 503 (its store is not keeping up for a moment): every 100 ms, for up to
/// 60 s in all.
fn retry_503(
    mut send: impl FnMut() -> std::io::Result<crate::client::HttpResponse>,
) -> std::io::Result<crate::client::HttpResponse> {
    let deadline = crate::clock::instant() + Duration::from_secs(60);
    loop {
        let r = send()?;
        if r.status != 503 || crate::clock::instant() >= deadline {
            return Ok(r);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
