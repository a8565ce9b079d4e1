//! Starting a real `wnsgate serve` process on an ephemeral loopback port
//! with its own data directory, for the integration tests.

// Measures its own waits and hang guards on the real clock; the rule that
// time is read only through `wnsgate::clock` (clippy.toml) is the gateway's.
#![allow(clippy::disallowed_methods)]
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use wnsgate::client::Client;

pub mod nats;

pub const PFN: &str = "Contoso.MDM_8wekyb3d8bbwe";

pub fn uri(token: &str) -> String {
    format!("https://db5.notify.windows.com/?token={token}")
}

/// The network backend every test gateway runs (`uring`, `epoll`, `auto`),
/// from `WNSGATE_TEST_IO`; unset means the gateway's default. Tests that
/// choose a backend themselves pass `WNSGATE_SERVER__IO`, which wins.
pub fn test_io() -> Option<String> {
    std::env::var("WNSGATE_TEST_IO")
        .ok()
        .filter(|v| !v.is_empty())
}

/// A gateway process. Killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: String,
    pub data: PathBuf,
    pub stderr_log: PathBuf,
}

impl Server {
    /// Starts `wnsgate serve` on `data` with extra environment variables and
    /// waits until `/readyz` answers 200.
    pub fn start(data: &Path, env: &[(&str, &str)]) -> Server {
        let server = Server::launch(data, env);
        server.wait_ready();
        server
    }

    /// Starts `wnsgate serve` like [`Server::start`] but sends it no
    /// request: returns once it prints its address, which it does once
    /// ready. No shard has served a request when this returns.
    pub fn launch(data: &Path, env: &[(&str, &str)]) -> Server {
        let stderr_log = data.with_extension("stderr.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wnsgate"));
        cmd.args(["serve", "--listen", "127.0.0.1:0"]);
        if !env.iter().any(|(k, _)| *k == "WNSGATE_SERVER__SHARDS") {
            cmd.args(["--shards", "2"]);
        }
        cmd.arg("--data")
            .arg(data)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_log).expect("stderr log"));
        // Unoptimised builds on a shared CI machine can take tens of
        // milliseconds per group commit, well past the default bound on a
        // write's expected wait: tests that are not about shedding load must
        // not see 503 store_overloaded. The bound itself is tested in
        // store::committer, and measured by loadtest/registry.sh.
        if !env
            .iter()
            .any(|(k, _)| *k == "WNSGATE_STORE__MAX_COMMIT_WAIT_MS")
        {
            cmd.env("WNSGATE_STORE__MAX_COMMIT_WAIT_MS", "2000");
        }
        // A gateway refuses registrations for a PFN with no [[wns.apps]]
        // entry. Tests that bring no app of their own get one for [`PFN`]
        // whose token endpoint refuses connections at once: its wakes end
        // token_unavailable, without reaching out of the machine.
        if !env.iter().any(|(k, _)| *k == "WNSGATE_WNS__APPS") {
            cmd.env("WNSGATE_WNS__APPS", default_apps());
            if !env.iter().any(|(k, _)| *k == "WNSGATE_WNS__TOKEN_URL") {
                cmd.env("WNSGATE_WNS__TOKEN_URL", "https://127.0.0.1:9/token");
            }
        }
        if let Some(io) = test_io() {
            if !env.iter().any(|(k, _)| *k == "WNSGATE_SERVER__IO") {
                cmd.env("WNSGATE_SERVER__IO", io);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start wnsgate");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(a) = line.strip_prefix("listening on http://") {
                        break a.trim().to_owned();
                    }
                }
                _ => {
                    let log = std::fs::read_to_string(&stderr_log).unwrap_or_default();
                    panic!("wnsgate exited before listening: {log}");
                }
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            addr,
            data: data.to_owned(),
            stderr_log,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn client(&self) -> Client {
        Client::new(&self.url()).expect("client")
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut c) = Client::new(&self.url()) {
                if let Ok(r) = c.get("/readyz") {
                    if r.status == 200 {
                        return;
                    }
                }
            }
            assert!(Instant::now() < deadline, "gateway not ready within 60 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id() as i32;
        unsafe_kill(pid, 15);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not stop within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unsafe_kill(pid: i32, sig: i32) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success());
}

/// `[[wns.apps]]` with one app for [`PFN`], as an environment override.
pub fn default_apps() -> String {
    format!("[{{pfn = \"{PFN}\", package_sid = \"ms-app://S-1-15-2-7\", client_secret = \"test-secret\"}}]")
}

/// A registration body.
pub fn channel_body(uri: &str) -> serde_json::Value {
    serde_json::json!({ "pfn": PFN, "channel_uri": uri })
}

/// A WNS simulator with `cfg`, and a gateway process configured to send to
/// it (token URL, connect-to, CA, one app for [`PFN`]).
pub fn start_with_sim(
    cfg: wnsgate::sim::SimConfig,
) -> (tempfile::TempDir, wnsgate::sim::SimHandle, Server) {
    start_with_sim_env(cfg, &[])
}

/// [`start_with_sim`] with extra environment variables for the gateway.
pub fn start_with_sim_env(
    cfg: wnsgate::sim::SimConfig,
    extra: &[(&str, &str)],
) -> (tempfile::TempDir, wnsgate::sim::SimHandle, Server) {
    with_sim(cfg, extra, Server::start)
}

/// [`start_with_sim_env`], with the gateway started by [`Server::launch`]:
/// no request reaches it before the test's own.
pub fn launch_with_sim_env(
    cfg: wnsgate::sim::SimConfig,
    extra: &[(&str, &str)],
) -> (tempfile::TempDir, wnsgate::sim::SimHandle, Server) {
    with_sim(cfg, extra, Server::launch)
}

fn with_sim(
    cfg: wnsgate::sim::SimConfig,
    extra: &[(&str, &str)],
    start: fn(&Path, &[(&str, &str)]) -> Server,
) -> (tempfile::TempDir, wnsgate::sim::SimHandle, Server) {
    let dir = tempfile::tempdir().expect("temp dir");
    let s = wnsgate::sim::start(cfg).expect("start the simulator");
    let gw = start_for_sim(&s, &dir.path().join("data"), extra, start);
    (dir, s, gw)
}

/// A gateway on `data` sending to the simulator `s` (token URL,
/// connect-to, CA, one app for [`PFN`]), started by `start`: again after a
/// kill, on the same data.
pub fn start_for_sim(
    s: &wnsgate::sim::SimHandle,
    data: &Path,
    extra: &[(&str, &str)],
    start: fn(&Path, &[(&str, &str)]) -> Server,
) -> Server {
    let apps = format!("[{{pfn = \"{PFN}\", package_sid = \"ms-app://S-1-15-2-7\", client_secret = \"sim-secret\"}}]");
    let (token_url, connect_to, ca) = (
        s.token_url(),
        s.addr.to_string(),
        s.ca_pem_path.display().to_string(),
    );
    let mut env = vec![
        ("WNSGATE_WNS__TOKEN_URL", token_url.as_str()),
        ("WNSGATE_WNS__CONNECT_TO", connect_to.as_str()),
        ("WNSGATE_WNS__CA_FILE", ca.as_str()),
        ("WNSGATE_WNS__APPS", apps.as_str()),
    ];
    env.extend_from_slice(extra);
    start(data, &env)
}

/// Registers `(device_id, channel token)` pairs through the NDJSON import
/// and returns how many were accepted.
pub fn import_tokens(
    gw: &Server,
    host: &str,
    devices: impl Iterator<Item = (String, String)>,
) -> u64 {
    let mut body = String::new();
    for (id, token) in devices {
        let line = serde_json::json!({"device_id": id, "pfn": PFN, "channel_uri": format!("https://{host}/?token={token}")});
        body.push_str(&line.to_string());
        body.push('\n');
    }
    let r = gw
        .client()
        .request(
            "POST",
            "/v1/devices:import",
            Some("application/x-ndjson"),
            body.as_bytes(),
        )
        .expect("import");
    r.json()["accepted"].as_u64().unwrap_or(0)
}

/// Polls a bulk wake until it is done or cancelled (at most `limit`).
/// `POST /v1/devices/{id}/push?wait=true`, which must answer 200 (within
/// two minutes: a wake may wait out its retries); answers the result.
pub fn push_wait(gw: &Server, id: &str) -> serde_json::Value {
    let r = gw
        .client()
        .with_timeout(Duration::from_secs(120))
        .request(
            "POST",
            &format!("/v1/devices/{id}/push?wait=true"),
            None,
            b"",
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

pub fn wait_job(gw: &Server, id: &str, limit: Duration) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        let v = gw
            .client()
            .get(&format!("/v1/pushes/{id}"))
            .expect("job")
            .json();
        if v["state"] == "done" || v["state"] == "cancelled" {
            return v;
        }
        assert!(Instant::now() < deadline, "bulk wake did not finish: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One HTTP/1.1 keep-alive connection that is never re-opened (unlike
/// [`Client`], which re-opens a connection the server closed): every
/// request a test sends through it reaches the same shard. Panics when the
/// server closes it.
pub struct OneConnection {
    conn: BufReader<TcpStream>,
}

impl OneConnection {
    pub fn open(addr: &str) -> OneConnection {
        let s = TcpStream::connect(addr).expect("connect to the gateway");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.set_nodelay(true).unwrap();
        OneConnection {
            conn: BufReader::new(s),
        }
    }

    /// Sends one request and reads its answer: (status, body). The
    /// gateway's answers all carry `Content-Length`.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> (u16, Vec<u8>) {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: gateway\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(ct) = content_type {
            head.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        head.push_str("\r\n");
        let w = self.conn.get_mut();
        w.write_all(head.as_bytes()).expect("send the request head");
        w.write_all(body).expect("send the request body");
        let mut line = String::new();
        self.read_line(&mut line);
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line {line:?}"));
        let mut len = None;
        loop {
            line.clear();
            self.read_line(&mut line);
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':').expect("header line");
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                len = Some(value.parse::<usize>().expect("Content-Length"));
            }
            if name.eq_ignore_ascii_case("connection") {
                assert!(
                    !value.eq_ignore_ascii_case("close"),
                    "the gateway closes the connection after {method} {path}"
                );
            }
        }
        let mut body = vec![0; len.expect("a Content-Length header")];
        self.conn
            .read_exact(&mut body)
            .expect("read the answer body");
        (status, body)
    }

    /// A request with a JSON body (none for `Value::Null`); the answer
    /// parsed as JSON.
    pub fn json(
        &mut self,
        method: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let (status, body) = if body.is_null() {
            self.request(method, path, None, b"")
        } else {
            let bytes = serde_json::to_vec(body).unwrap();
            self.request(method, path, Some("application/json"), &bytes)
        };
        let v = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        (status, v)
    }

    fn read_line(&mut self, line: &mut String) {
        let n = self.conn.read_line(line).expect("read the answer");
        assert!(n > 0, "the gateway closed the connection");
    }
}
