//! Cluster mode's durable state on a real 3-server NATS JetStream cluster,
//! started by the test: acknowledged registrations come back byte-exact
//! after a SIGKILL, from snapshots and log tails; writes go on while one
//! NATS server is down; a second writer fences the first.

// Measures its own waits and hang guards on the real clock; the rule that
// time is read only through `wnsgate::clock` (clippy.toml) is the gateway's.
#![allow(clippy::disallowed_methods)]

mod common;

use common::nats::NatsCluster;
use common::{channel_body, uri, Server};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// A gateway in cluster mode on `nats`, as node `node`.
fn gateway(dir: &Path, nats: &NatsCluster, node: &str) -> Server {
    let urls = nats.urls_toml();
    Server::start(
        &dir.join(node),
        &[
            ("WNSGATE_CLUSTER__NATS_URLS", urls.as_str()),
            ("WNSGATE_CLUSTER__NODE_ID", node),
            ("WNSGATE_CLUSTER__PARTITIONS", "16"),
            ("WNSGATE_CLUSTER__STREAM_COUNT", "2"),
            ("WNSGATE_CLUSTER__REPLICAS", "3"),
        ],
    )
}

/// `PUT /v1/devices/{id}`; a 503 is sent again, as a client does, for up
/// to 30 s. Answers the final status.
fn put(gw: &Server, id: &str, token: &str) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = gw
            .client()
            .send_json(
                "PUT",
                &format!("/v1/devices/{id}/channel"),
                &channel_body(&uri(token)),
            )
            .expect("PUT");
        if r.status != 503 || Instant::now() >= deadline {
            return r.status;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every device's JSON body as the gateway answers it.
fn bodies(gw: &Server, ids: &[String]) -> BTreeMap<String, String> {
    let mut c = gw.client();
    ids.iter()
        .map(|id| {
            let r = c.get(&format!("/v1/devices/{id}")).expect("GET");
            assert_eq!(r.status, 200, "{id}: {}", r.text());
            (id.clone(), r.text())
        })
        .collect()
}

fn metric(gw: &Server, name: &str) -> f64 {
    let text = gw.client().get("/metrics").expect("metrics").text();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn acknowledged_registrations_come_back_byte_exact_from_snapshots_and_log_tails() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(dir.path(), 3);
    let gw = gateway(dir.path(), &nats, "gw-1");
    let ids: Vec<String> = (0..300).map(|i| format!("dev-{i:04}")).collect();
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(put(&gw, id, &format!("a{i}")), 201, "{}", gw.stderr());
    }
    // A snapshot of every partition, then more writes on top of it: a
    // restart loads both.
    let r = gw
        .client()
        .request("POST", "/v1/store:snapshot", None, b"")
        .expect("snapshot");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["devices"].as_u64(), Some(300), "{}", r.text());
    for (i, id) in ids.iter().enumerate().step_by(3) {
        assert_eq!(put(&gw, id, &format!("b{i}")), 200);
    }
    let gone = &ids[1];
    assert_eq!(
        gw.client()
            .request("DELETE", &format!("/v1/devices/{gone}"), None, b"")
            .unwrap()
            .status,
        204
    );
    let before = bodies(&gw, &ids[2..]);
    gw.kill();

    let gw = gateway(dir.path(), &nats, "gw-1");
    assert_eq!(bodies(&gw, &ids[2..]), before);
    assert_eq!(
        gw.client()
            .get(&format!("/v1/devices/{gone}"))
            .unwrap()
            .status,
        404
    );
    assert_eq!(
        gw.client().get("/v1/stats").unwrap().json()["devices"].as_u64(),
        Some(299)
    );
    let log = gw.stderr();
    assert!(
        log.contains("replayed_batches"),
        "the ready line says what was replayed: {log}"
    );
}

#[test]
fn writes_go_on_while_one_nats_server_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = NatsCluster::start(dir.path(), 3);
    let gw = gateway(dir.path(), &nats, "gw-1");
    for i in 0..50 {
        assert_eq!(put(&gw, &format!("before-{i}"), &format!("t{i}")), 201);
    }
    // The server the gateway most likely talks to, and a stream leader.
    nats.kill(0);
    let mut ids = Vec::new();
    for i in 0..100 {
        let id = format!("during-{i}");
        let status = put(&gw, &id, &format!("t{i}"));
        assert_eq!(status, 201, "{id}: {}\n{}", gw.stderr(), nats.logs());
        ids.push(id);
    }
    let during = bodies(&gw, &ids);
    assert_eq!(
        gw.client().get("/readyz").unwrap().status,
        200,
        "two of three NATS servers are a quorum"
    );
    gw.kill();
    nats.restart(0);
    let gw = gateway(dir.path(), &nats, "gw-1");
    assert_eq!(bodies(&gw, &ids), during);
    assert_eq!(
        gw.client().get("/v1/stats").unwrap().json()["devices"].as_u64(),
        Some(150)
    );
}

#[test]
fn a_second_writer_fences_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(dir.path(), 3);
    let first = gateway(dir.path(), &nats, "gw-1");
    for i in 0..20 {
        assert_eq!(put(&first, &format!("dev-{i}"), &format!("a{i}")), 201);
    }
    // A second node loads the same partitions and writes one of them.
    let second = gateway(dir.path(), &nats, "gw-2");
    assert_eq!(put(&second, "dev-0", "from-second"), 200);
    // The first node's next write to that partition is refused by
    // JetStream: it answers 503 and stops claiming readiness, and it never
    // overwrites what the second wrote.
    let r = first
        .client()
        .send_json(
            "PUT",
            "/v1/devices/dev-0/channel",
            &channel_body(&uri("stale")),
        )
        .unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        r.text().contains("another node"),
        "the error says why: {}",
        r.text()
    );
    assert_eq!(first.client().get("/readyz").unwrap().status, 503);
    assert!(
        metric(
            &first,
            "wnsgate_cluster_append_errors_total{reason=\"fenced\"}"
        ) >= 1.0
    );
    assert!(metric(&first, "wnsgate_cluster_append_seconds_count") >= 20.0);
    // The first node still holds its stale view of the device in memory; a
    // restart loads what the cluster holds.
    first.kill();
    let again = gateway(dir.path(), &nats, "gw-1");
    let dev0 = again.client().get("/v1/devices/dev-0").unwrap().json();
    assert_eq!(
        dev0["channel_uri"].as_str(),
        Some(uri("from-second").as_str())
    );
}
