//! `wnsgate-load`: load generation against a running gateway.
//!
//! - `fleet`: print a synthetic fleet as NDJSON (for `wnsgate import` or
//!   `POST /v1/devices:import`);
//! - `register`: register a synthetic fleet through `POST
//!   /v1/devices:import` in batches, with a progress bar;
//! - `put`: register devices one `PUT` at a time at a fixed rate over
//!   keep-alive connections and report the latency distribution, measured
//!   from each request's scheduled send time (no coordinated omission);
//! - `get`: the same for a `GET` (the reference: no store work);
//! - `push`: wake synthetic devices one at a time at a fixed rate
//!   (`POST /v1/devices/{id}/push?wait=true`) and report latency
//!   percentiles and results;
//! - `bulk`: wake the synthetic fleet with bulk wakes (`POST /v1/pushes`),
//!   follow them (`GET /v1/pushes/{id}`) with a progress bar, and report
//!   pushes per second and outcomes;
//! - `forget`: delete the synthetic devices again.
//!
//! Synthetic device `i` is always the same id and channel URI
//! (`wnsgate::fleet`), so `register`, `push`, `bulk` and `forget` given the
//! same `--devices` and `--start` work on the same devices.
//! - `trivial-server`: the reference of P6 in `docs/performance.md`, a hyper server
//!   on one current-thread runtime that answers every request with 202
//!   (HTTP/1.1 and h2c, the gateway's own builder).

// Measures its own waits and hang guards on the real clock; the rule that
// time is read only through `wnsgate::clock` (clippy.toml) is the gateway's.
#![allow(clippy::disallowed_methods)]

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wnsgate::client::{Client, HttpResponse};
use wnsgate::core::UnixTime;
use wnsgate::fleet::{self, AgeMix};

/// Most device ids one bulk wake may list (the API's limit).
const MAX_JOB_IDS: u64 = 100_000;
/// Bulk wakes the API runs at once.
const MAX_RUNNING_JOBS: usize = 8;
// The same allocator as the gateway, so the reference server is comparable.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "wnsgate-load",
    about = "Load generation against a wnsgate deployment"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print devices [start, start+devices) of the synthetic fleet as NDJSON.
    Fleet {
        #[arg(long)]
        devices: u64,
        #[arg(long, default_value_t = 0)]
        start: u64,
    },
    /// PUT registrations at a fixed rate and report latency percentiles.
    Put {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        #[arg(long, env = "WNSGATE_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Requests per second, all connections together.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Seconds to run.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Keep-alive connections.
        #[arg(long, default_value_t = 32)]
        connections: u64,
        /// Device ids used (cycled).
        #[arg(long, default_value_t = 100_000)]
        devices: u64,
    },
    /// Register synthetic devices [start, start+devices) through the NDJSON
    /// import, in batches, with a progress bar.
    Register {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        #[arg(long, env = "WNSGATE_TOKEN", hide_env_values = true)]
        token: Option<String>,
        #[arg(long)]
        devices: u64,
        #[arg(long, default_value_t = 0)]
        start: u64,
        /// PFN to register the devices with (one of the gateway's [[wns.apps]]).
        #[arg(long, default_value = fleet::DEMO_PFN)]
        pfn: String,
        /// Devices per import request.
        #[arg(long, default_value_t = 50_000)]
        batch: u64,
    },
    /// Wake synthetic devices one at a time at a fixed rate and report
    /// latency percentiles (to the final result with --wait, the default;
    /// to the 202 without) and results.
    Push {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        #[arg(long, env = "WNSGATE_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Wakes per second, all connections together.
        #[arg(long, default_value_t = 100)]
        rate: u64,
        /// Seconds to run.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Keep-alive connections (each has one wake outstanding at a time).
        #[arg(long, default_value_t = 32)]
        connections: u64,
        /// Synthetic devices to wake (cycled), from --start.
        #[arg(long, default_value_t = 10_000)]
        devices: u64,
        #[arg(long, default_value_t = 0)]
        start: u64,
        /// Wait for each wake's final result (?wait=true).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        wait: bool,
    },
    /// Wake synthetic devices [start, start+devices) with bulk wakes of up
    /// to 100,000 ids each, follow them to the end, report pushes/s.
    Bulk {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        #[arg(long, env = "WNSGATE_TOKEN", hide_env_values = true)]
        token: Option<String>,
        #[arg(long, default_value_t = 10_000)]
        devices: u64,
        #[arg(long, default_value_t = 0)]
        start: u64,
        /// Pacing of each bulk wake (rate_per_second); unpaced without.
        #[arg(long)]
        rate: Option<u32>,
        /// Wake every registered device instead ({"all": true}): only on a
        /// gateway that holds nothing but the synthetic fleet.
        #[arg(long)]
        all: bool,
    },
    /// Delete synthetic devices [start, start+devices).
    Forget {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        #[arg(long, env = "WNSGATE_TOKEN", hide_env_values = true)]
        token: Option<String>,
        #[arg(long)]
        devices: u64,
        #[arg(long, default_value_t = 0)]
        start: u64,
        #[arg(long, default_value_t = 16)]
        connections: u64,
    },
    /// GET a path at a fixed rate and report latency percentiles (the
    /// reference for `put`: same tool, same rate, no store work).
    Get {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        #[arg(long, env = "WNSGATE_TOKEN", hide_env_values = true)]
        token: Option<String>,
        #[arg(long, default_value = "/healthz")]
        path: String,
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        duration: u64,
        #[arg(long, default_value_t = 32)]
        connections: u64,
    },
    /// Answer every request with 202 and an empty body (the load tools'
    /// reference); prints `listening on http://ADDR`.
    TrivialServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Fleet { devices, start } => {
            let now = UnixTime(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_secs() as u32,
            );
            let mut out = BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
            for i in start..start + devices {
                out.write_all(fleet::ndjson_line(i, now, AgeMix::default()).as_bytes())?;
            }
            out.flush()?;
        }
        Cmd::Put {
            url,
            token,
            rate,
            duration,
            connections,
            devices,
        } => {
            let load = Load {
                url,
                token,
                rate,
                duration,
                connections,
            };
            load.run("put", Some(by_result), move |client, c, k| {
                let i = (c + k * connections) % devices;
                let body = serde_json::json!({"pfn": fleet::DEMO_PFN, "channel_uri": fleet::channel_uri(i, k)});
                client.send_json("PUT", &format!("/v1/devices/{}/channel", fleet::device_id(i)), &body)
            })?
        }
        Cmd::Register {
            url,
            token,
            devices,
            start,
            pfn,
            batch,
        } => register(&url, token, start, devices, &pfn, batch)?,
        Cmd::Push {
            url,
            token,
            rate,
            duration,
            connections,
            devices,
            start,
            wait,
        } => {
            anyhow::ensure!(devices > 0, "--devices must be positive");
            let load = Load {
                url,
                token,
                rate,
                duration,
                connections,
            };
            let path_end = if wait { "/push?wait=true" } else { "/push" };
            load.run("push", Some(by_result), move |client, c, k| {
                let i = start + (c + k * connections) % devices;
                let path = format!("/v1/devices/{}{path_end}", fleet::device_id(i));
                client.request("POST", &path, None, b"")
            })?
        }
        Cmd::Bulk {
            url,
            token,
            devices,
            start,
            rate,
            all,
        } => bulk(&url, token, start, devices, rate, all)?,
        Cmd::Forget {
            url,
            token,
            devices,
            start,
            connections,
        } => forget(&url, token, start, devices, connections)?,
        Cmd::Get {
            url,
            token,
            path,
            rate,
            duration,
            connections,
        } => {
            let load = Load {
                url,
                token,
                rate,
                duration,
                connections,
            };
            load.run("get", None, move |client, _, _| client.get(&path))?
        }
        Cmd::TrivialServer { listen } => trivial_server(listen)?,
    }
    Ok(())
}

/// Serves 202 to everything until killed.
fn trivial_server(listen: std::net::SocketAddr) -> anyhow::Result<()> {
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        println!("listening on http://{}", listener.local_addr()?);
        let builder = wnsgate::shard::serve::http_builder(Duration::from_secs(30));
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let svc = service_fn(|_req| async {
                let mut resp = hyper::Response::new(http_body_util::Empty::<bytes::Bytes>::new());
                *resp.status_mut() = hyper::StatusCode::ACCEPTED;
                Ok::<_, std::convert::Infallible>(resp)
            });
            let conn = builder
                .serve_connection(TokioIo::new(stream), svc)
                .into_owned();
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    })
}

/// A fixed-rate load over keep-alive connections.
struct Load {
    url: String,
    token: Option<String>,
    rate: u64,
    duration: u64,
    connections: u64,
}

impl Load {
    /// Runs `request(client, connection, k)` for the k-th request of each
    /// connection, on schedule, and prints the latency distribution
    /// measured from each request's scheduled time.
    ///
    /// Answers of 300 and above count as errors. With `classify`, a second
    /// line breaks the answers down by what it names them.
    fn run<F>(
        &self,
        name: &str,
        classify: Option<fn(&HttpResponse) -> String>,
        request: F,
    ) -> anyhow::Result<()>
    where
        F: Fn(&mut Client, u64, u64) -> std::io::Result<HttpResponse>
            + Send
            + Sync
            + Clone
            + 'static,
    {
        let (rate, connections) = (self.rate, self.connections);
        anyhow::ensure!(
            rate > 0 && connections > 0,
            "rate and connections must be positive"
        );
        let per_conn = Duration::from_secs_f64(connections as f64 / rate as f64);
        // rate x duration requests in all; the first `total % connections`
        // connections send one more than the others.
        let total = rate * self.duration;
        let per_conn_count = move |c: u64| total / connections + u64::from(c < total % connections);
        let start = Instant::now() + Duration::from_millis(200);
        let sent = Arc::new(AtomicU64::new(0));
        let bar = progress_bar(
            total,
            "{spinner} {msg} [{bar:40}] {pos}/{len} {per_sec} eta {eta}",
        );
        bar.set_message(name.to_owned());
        let threads: Vec<_> = (0..connections)
            .map(|c| {
                let url = self.url.clone();
                let token = self.token.clone();
                let request = request.clone();
                let sent = sent.clone();
                type Tally = (Vec<u32>, u64, BTreeMap<String, u64>, Vec<u32>);
                std::thread::spawn(move || -> anyhow::Result<Tally> {
                    let mut client = Client::new(&url)?.with_token(token);
                    let count = per_conn_count(c);
                    let mut lat_us = Vec::with_capacity(count as usize);
                    let mut errors = 0;
                    let mut kinds = BTreeMap::new();
                    // Latencies of the answers that were not 2xx.
                    let mut refused_us = Vec::new();
                    let offset = per_conn.mul_f64(c as f64 / connections as f64);
                    for k in 0..count {
                        let due = start + offset + per_conn.mul_f64(k as f64);
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        let (kind, ok) = match request(&mut client, c, k) {
                            Ok(r) => {
                                if r.status >= 300 {
                                    errors += 1;
                                }
                                (
                                    classify.map_or_else(|| r.status.to_string(), |f| f(&r)),
                                    r.status < 300,
                                )
                            }
                            Err(e) => {
                                errors += 1;
                                (format!("transport error ({})", e.kind()), false)
                            }
                        };
                        *kinds.entry(kind).or_insert(0) += 1;
                        let us = due.elapsed().as_micros().min(u32::MAX as u128) as u32;
                        if ok {
                            lat_us.push(us);
                        } else {
                            refused_us.push(us);
                        }
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok((lat_us, errors, kinds, refused_us))
                })
            })
            .collect();
        while !threads.iter().all(|t| t.is_finished()) {
            bar.set_position(sent.load(Ordering::Relaxed));
            std::thread::sleep(Duration::from_millis(100));
        }
        bar.finish_and_clear();
        let mut ok = Vec::new();
        let mut refused = Vec::new();
        let mut errors = 0;
        let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
        for t in threads {
            let (l, e, k, r) = t
                .join()
                .map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
            ok.extend(l);
            refused.extend(r);
            errors += e;
            for (kind, n) in k {
                *kinds.entry(kind).or_insert(0) += n;
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        ok.sort_unstable();
        refused.sort_unstable();
        let mut all: Vec<u32> = ok.iter().chain(&refused).copied().collect();
        all.sort_unstable();
        let pct_of = |v: &[u32], p: f64| {
            v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0) as f64
                / 1000.0
        };
        let pct = |p: f64| pct_of(&all, p);
        println!(
            "{name}: {} requests in {elapsed:.1} s ({:.0}/s, target {rate}/s), errors {errors}, latency ms p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}",
            all.len(),
            all.len() as f64 / elapsed,
            pct(0.50),
            pct(0.90),
            pct(0.99),
            pct(0.999),
            all.last().copied().unwrap_or(0) as f64 / 1000.0
        );
        if !refused.is_empty() {
            println!(
                "{name} split: {} accepted, latency ms p50 {:.2} p99 {:.2} max {:.2}; {} not accepted, latency ms p50 {:.2} p99 {:.2} max {:.2}",
                ok.len(),
                pct_of(&ok, 0.50),
                pct_of(&ok, 0.99),
                ok.last().copied().unwrap_or(0) as f64 / 1000.0,
                refused.len(),
                pct_of(&refused, 0.50),
                pct_of(&refused, 0.99),
                refused.last().copied().unwrap_or(0) as f64 / 1000.0,
            );
        }
        if classify.is_some() {
            let breakdown: Vec<String> = kinds.iter().map(|(k, n)| format!("{k}: {n}")).collect();
            println!("{name} answers: {}", breakdown.join(", "));
        }
        Ok(())
    }
}

/// A wake answer named by its final result (`?wait=true`), or by its
/// status and error code otherwise.
fn by_result(r: &HttpResponse) -> String {
    let v = r.json();
    if let Some(result) = v["result"].as_str() {
        return result.to_owned();
    }
    match v["error"]["code"].as_str() {
        Some(code) => format!("{} {code}", r.status),
        None if r.status == 202 => "accepted".to_owned(),
        None => r.status.to_string(),
    }
}

fn progress_bar(len: u64, template: &str) -> ProgressBar {
    ProgressBar::new(len).with_style(
        ProgressStyle::with_template(template)
            .expect("static template")
            .progress_chars("=> "),
    )
}

fn client(url: &str, token: Option<String>) -> anyhow::Result<Client> {
    Ok(Client::new(url)?
        .with_token(token)
        .with_timeout(Duration::from_secs(300)))
}

/// `register`: NDJSON imports of `batch` devices each.
fn register(
    url: &str,
    token: Option<String>,
    start: u64,
    devices: u64,
    pfn: &str,
    batch: u64,
) -> anyhow::Result<()> {
    anyhow::ensure!(batch > 0, "--batch must be positive");
    let mut c = client(url, token)?;
    let now = UnixTime(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs() as u32,
    );
    let bar = progress_bar(
        devices,
        "{spinner} registering [{bar:40}] {pos}/{len} {per_sec} eta {eta}",
    );
    let started = Instant::now();
    let (mut accepted, mut rejected) = (0u64, 0u64);
    let mut first_error = None;
    let mut i = start;
    while i < start + devices {
        let end = (i + batch).min(start + devices);
        let mut body = String::with_capacity(((end - i) * 260) as usize);
        for d in i..end {
            let line = fleet::ndjson_line(d, now, AgeMix::default());
            body.push_str(&line.replacen(fleet::DEMO_PFN, pfn, 1));
        }
        let r = c.request(
            "POST",
            "/v1/devices:import",
            Some("application/x-ndjson"),
            body.as_bytes(),
        )?;
        anyhow::ensure!(
            r.status == 200,
            "import answered {}: {}",
            r.status,
            r.text()
        );
        let v = r.json();
        accepted += v["accepted"].as_u64().unwrap_or(0);
        rejected += v["rejected"].as_u64().unwrap_or(0);
        if first_error.is_none() {
            first_error = v["errors"].get(0).map(|e| e.to_string());
        }
        i = end;
        bar.set_position(i - start);
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "register: {accepted} devices accepted, {rejected} rejected in {secs:.1} s ({:.0} devices/s, durable)",
        accepted as f64 / secs.max(1e-9)
    );
    if let Some(e) = first_error {
        println!("register: first rejection: {e}");
    }
    anyhow::ensure!(rejected == 0, "some registrations were rejected");
    Ok(())
}

/// Counters of one bulk wake, as `GET /v1/pushes/{id}` reports them.
const JOB_COUNTS: [&str; 7] = [
    "received",
    "dropped",
    "throttled",
    "expired",
    "failed",
    "not_sent",
    "skipped_dead",
];

/// `bulk`: bulk wakes of at most [`MAX_JOB_IDS`] ids, at most
/// [`MAX_RUNNING_JOBS`] at once, followed to the end.
fn bulk(
    url: &str,
    token: Option<String>,
    start: u64,
    devices: u64,
    rate: Option<u32>,
    all: bool,
) -> anyhow::Result<()> {
    let mut c = client(url, token)?;
    let mut bodies: Vec<serde_json::Value> = if all {
        vec![serde_json::json!({"all": true})]
    } else {
        (start..start + devices)
            .step_by(MAX_JOB_IDS as usize)
            .map(|from| {
                let ids: Vec<String> = (from..(from + MAX_JOB_IDS).min(start + devices))
                    .map(fleet::device_id)
                    .collect();
                serde_json::json!({ "device_ids": ids })
            })
            .collect()
    };
    if let Some(r) = rate {
        for b in &mut bodies {
            b["rate_per_second"] = r.into();
        }
    }
    bodies.reverse();
    let bar = progress_bar(
        if all { 0 } else { devices },
        "{spinner} waking [{bar:40}] {pos}/{len} {per_sec} eta {eta} {msg}",
    );
    let started = Instant::now();
    let mut running: Vec<String> = Vec::new();
    let mut finished: Vec<serde_json::Value> = Vec::new();
    while !bodies.is_empty() || !running.is_empty() {
        while running.len() < MAX_RUNNING_JOBS {
            let Some(body) = bodies.pop() else { break };
            let r = c.send_json("POST", "/v1/pushes", &body)?;
            match r.status {
                202 => running.push(
                    r.json()["job_id"]
                        .as_str()
                        .ok_or_else(|| anyhow::anyhow!("no job_id in {}", r.text()))?
                        .to_owned(),
                ),
                429 => {
                    bodies.push(body);
                    break;
                }
                s => anyhow::bail!("POST /v1/pushes answered {s}: {}", r.text()),
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        let (mut done, mut total) = (0, 0);
        let mut still = Vec::new();
        for id in running.drain(..) {
            let r = c.get(&format!("/v1/pushes/{id}"))?;
            anyhow::ensure!(r.status == 200, "GET /v1/pushes/{id} answered {}", r.status);
            let v = r.json();
            if v["state"] == "done" || v["state"] == "cancelled" {
                finished.push(v);
            } else {
                done += v["done"].as_u64().unwrap_or(0);
                total += v["total"].as_u64().unwrap_or(0);
                still.push(id);
            }
        }
        running = still;
        let finished_done: u64 = finished
            .iter()
            .map(|v| v["done"].as_u64().unwrap_or(0))
            .sum();
        let finished_total: u64 = finished
            .iter()
            .map(|v| v["total"].as_u64().unwrap_or(0))
            .sum();
        if all {
            bar.set_length(total + finished_total);
        }
        bar.set_position(done + finished_done);
        bar.set_message(format!("{} job(s) running", running.len()));
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let sum = |k: &str| {
        finished
            .iter()
            .map(|v| v[k].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    let done = sum("done");
    // Devices skipped for a dead channel count as done but were not pushed.
    let pushed = done - sum("skipped_dead");
    let counts: Vec<String> = JOB_COUNTS
        .iter()
        .map(|k| format!("{k} {}", sum(k)))
        .collect();
    println!(
        "bulk: {done} of {} devices woken in {secs:.1} s ({:.0} pushes/s) by {} job(s){}: {}",
        sum("total"),
        pushed as f64 / secs.max(1e-9),
        finished.len(),
        rate.map_or(String::new(), |r| format!(" paced at {r}/s each")),
        counts.join(", ")
    );
    Ok(())
}

/// `forget`: `DELETE /v1/devices/{id}` for every synthetic device.
fn forget(
    url: &str,
    token: Option<String>,
    start: u64,
    devices: u64,
    connections: u64,
) -> anyhow::Result<()> {
    anyhow::ensure!(connections > 0, "--connections must be positive");
    let bar = progress_bar(
        devices,
        "{spinner} forgetting [{bar:40}] {pos}/{len} {per_sec}",
    );
    let next = Arc::new(AtomicU64::new(start));
    let deleted = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..connections)
        .map(|_| {
            let (next, deleted) = (next.clone(), deleted.clone());
            let mut c = client(url, token.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                let c = c.as_mut().map_err(|e| anyhow::anyhow!("{e}"))?;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= start + devices {
                        return Ok(());
                    }
                    let r = c.request(
                        "DELETE",
                        &format!("/v1/devices/{}", fleet::device_id(i)),
                        None,
                        b"",
                    )?;
                    anyhow::ensure!(
                        matches!(r.status, 204 | 404),
                        "DELETE answered {}: {}",
                        r.status,
                        r.text()
                    );
                    if r.status == 204 {
                        deleted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    while !threads.iter().all(|t| t.is_finished()) {
        bar.set_position(
            next.load(Ordering::Relaxed)
                .saturating_sub(start)
                .min(devices),
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    bar.finish_and_clear();
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a thread panicked"))??;
    }
    println!(
        "forget: {} synthetic devices deleted",
        deleted.load(Ordering::Relaxed)
    );
    Ok(())
}
