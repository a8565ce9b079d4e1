//! `wnsgate-load`: load generation against a running gateway.
//!
//! - `fleet`: print a synthetic fleet as NDJSON (for `wnsgate import` or
//!   `POST /v1/devices:import`);
//! - `put`: register devices one `PUT` at a time at a fixed rate over
//!   keep-alive connections and report the latency distribution, measured
//!   from each request's scheduled send time (no coordinated omission);
//! - `trivial-server`: the reference of performance.md P6, a hyper server
//!   on one current-thread runtime that answers every request with 202
//!   (HTTP/1.1 and h2c, the gateway's own builder).

use clap::{Parser, Subcommand};
use std::io::{BufWriter, Write};
use std::time::{Duration, Instant};
use wnsgate::client::Client;
use wnsgate::core::UnixTime;
use wnsgate::fleet::{self, AgeMix};

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
            load.run("put", move |client, c, k| {
                let i = (c + k * connections) % devices;
                let body = serde_json::json!({"pfn": fleet::DEMO_PFN, "channel_uri": fleet::channel_uri(i, k)});
                client.send_json("PUT", &format!("/v1/devices/{}/channel", fleet::device_id(i)), &body)
            })?
        }
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
            load.run("get", move |client, _, _| client.get(&path))?
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
    fn run<F>(&self, name: &str, request: F) -> anyhow::Result<()>
    where
        F: Fn(&mut Client, u64, u64) -> std::io::Result<wnsgate::client::HttpResponse>
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
        let total_per_conn = rate * self.duration / connections;
        let start = Instant::now() + Duration::from_millis(200);
        let threads: Vec<_> = (0..connections)
            .map(|c| {
                let url = self.url.clone();
                let token = self.token.clone();
                let request = request.clone();
                std::thread::spawn(move || -> anyhow::Result<(Vec<u32>, u64)> {
                    let mut client = Client::new(&url)?.with_token(token);
                    let mut lat_us = Vec::with_capacity(total_per_conn as usize);
                    let mut errors = 0;
                    let offset = per_conn.mul_f64(c as f64 / connections as f64);
                    for k in 0..total_per_conn {
                        let due = start + offset + per_conn.mul_f64(k as f64);
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        match request(&mut client, c, k) {
                            Ok(r) if r.status < 300 => {}
                            _ => errors += 1,
                        }
                        lat_us.push(due.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    }
                    Ok((lat_us, errors))
                })
            })
            .collect();
        let mut all = Vec::new();
        let mut errors = 0;
        for t in threads {
            let (l, e) = t
                .join()
                .map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
            all.extend(l);
            errors += e;
        }
        let elapsed = start.elapsed().as_secs_f64();
        all.sort_unstable();
        let pct = |p: f64| {
            all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0) as f64
                / 1000.0
        };
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
        Ok(())
    }
}
