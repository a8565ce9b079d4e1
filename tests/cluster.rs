//! Cluster mode on a real 3-server NATS JetStream cluster, started by the
//! test: acknowledged registrations come back byte-exact after a SIGKILL,
//! from snapshots and log tails; writes go on while one NATS server is
//! down; three gateways share the partitions, answer for each other's
//! devices and take a killed one's partitions over; a paused gateway is
//! fenced, answers nothing from stale state, and rejoins; a bulk wake runs
//! on every gateway and survives the SIGKILL of one of them, with one
//! refresh job per dead channel, and the whole cluster restarts with
//! everything back.

// Measures its own waits and hang guards on the real clock; the rule that
// time is read only through `wnsgate::clock` (clippy.toml) is the gateway's.
#![allow(clippy::disallowed_methods)]

mod common;

use common::nats::NatsCluster;
use common::{channel_body, uri, Server};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// The lease time of the test gateways: a dead gateway's partitions move
/// after about this long.
const LEASE_TTL_SECS: u64 = 3;

/// The `[cluster]` section of a test gateway on `nats` as node `node`, as
/// environment overrides.
fn cluster_env(nats: &NatsCluster, node: &str) -> Vec<(&'static str, String)> {
    vec![
        ("WNSGATE_CLUSTER__NATS_URLS", nats.urls_toml()),
        ("WNSGATE_CLUSTER__NODE_ID", node.to_owned()),
        ("WNSGATE_CLUSTER__PARTITIONS", "16".into()),
        ("WNSGATE_CLUSTER__STREAM_COUNT", "2".into()),
        ("WNSGATE_CLUSTER__REPLICAS", "3".into()),
        ("WNSGATE_CLUSTER__LEASE_TTL", format!("{LEASE_TTL_SECS}s")),
    ]
}

/// A gateway in cluster mode on `nats`, as node `node`.
fn gateway(dir: &Path, nats: &NatsCluster, node: &str) -> Server {
    let env = cluster_env(nats, node);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Server::start(&dir.join(node), &env)
}

/// [`gateway`], sending its wakes to the simulator `sim`, checkpointing
/// bulk wakes every second and leasing refresh jobs unpaced.
fn gateway_with_sim(
    dir: &Path,
    nats: &NatsCluster,
    node: &str,
    sim: &wnsgate::sim::SimHandle,
) -> Server {
    let mut env = cluster_env(nats, node);
    env.push(("WNSGATE_CLUSTER__CHECKPOINT_EVERY", "1s".into()));
    env.push(("WNSGATE_REFRESH__JOBS_PER_SECOND", "10000".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    common::start_for_sim(sim, &dir.join(node), &env, Server::start)
}

/// Waits (at most `limit`) until `gw` knows bulk wake `id`.
fn wait_known(gw: &Server, id: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let r = gw.client().get(&format!("/v1/pushes/{id}")).unwrap();
        if r.status == 200 {
            return;
        }
        assert!(Instant::now() < deadline, "{}: {}", r.status, r.text());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (at most 30 s) until every one of `gws` serves some partitions
/// and together they serve all 16, each once.
fn wait_balanced(gws: &[&Server]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let owned: Vec<f64> = gws
            .iter()
            .map(|g| metric(g, "wnsgate_cluster_partitions_owned"))
            .collect();
        if owned.iter().all(|&n| n > 0.0) && owned.iter().sum::<f64>() == 16.0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "partitions never settled: {owned:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `GET /v1/devices/{id}`, sent again on 503 (a partition moving) for up
/// to 30 s.
fn get_settled(gw: &Server, id: &str) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = gw.client().get(&format!("/v1/devices/{id}")).expect("GET");
        if r.status != 503 || Instant::now() >= deadline {
            return (r.status, r.text());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn signal(gw: &Server, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &gw.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
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

/// Every device's JSON body as the gateway answers it (a 503 while a
/// partition moves is asked again, as a client does).
fn bodies(gw: &Server, ids: &[String]) -> BTreeMap<String, String> {
    ids.iter()
        .map(|id| {
            let (status, body) = get_settled(gw, id);
            assert_eq!(status, 200, "{id}: {body}");
            (id.clone(), body)
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
fn three_gateways_share_the_partitions_and_take_over_a_killed_one() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(dir.path(), 3);
    let gws = [
        gateway(dir.path(), &nats, "gw-0"),
        gateway(dir.path(), &nats, "gw-1"),
        gateway(dir.path(), &nats, "gw-2"),
    ];
    wait_balanced(&[&gws[0], &gws[1], &gws[2]]);
    // An import through one gateway sends each other gateway its devices;
    // the report counts them all and names bad lines by the caller's
    // numbering.
    let mut ndjson = String::new();
    for i in 0..60 {
        ndjson.push_str(
            &serde_json::json!({"device_id": format!("imp-{i:03}"), "pfn": common::PFN,
                "channel_uri": uri(&format!("i{i}"))})
            .to_string(),
        );
        ndjson.push('\n');
        if i == 41 {
            ndjson.push_str("{\"device_id\": \"bad\"}\n");
        }
    }
    let r = gws[1]
        .client()
        .request(
            "POST",
            "/v1/devices:import",
            Some("application/x-ndjson"),
            ndjson.as_bytes(),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let report = r.json();
    assert_eq!(report["accepted"].as_u64(), Some(60), "{report}");
    assert_eq!(report["rejected"].as_u64(), Some(1), "{report}");
    assert_eq!(report["errors"][0]["line"].as_u64(), Some(43), "{report}");
    let imported: Vec<String> = (0..60).map(|i| format!("imp-{i:03}")).collect();
    assert_eq!(bodies(&gws[2], &imported).len(), 60);
    // Any gateway takes any registration: calls for another's partition
    // are forwarded to it.
    let ids: Vec<String> = (0..120).map(|i| format!("dev-{i:04}")).collect();
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(put(&gws[i % 3], id, &format!("a{i}")), 201, "{id}");
    }
    let seen = bodies(&gws[0], &ids);
    for gw in &gws[1..] {
        assert_eq!(bodies(gw, &ids), seen, "every gateway answers the same");
    }
    assert!(metric(&gws[0], "wnsgate_cluster_forwarded_total") > 0.0);
    // A listing from any node pages through the whole fleet, each device
    // once, in the same order.
    let mut orders = Vec::new();
    for gw in &gws {
        let mut seen_ids: Vec<String> = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..1000 {
            let path = match &cursor {
                Some(c) => format!("/v1/devices?limit=7&cursor={c}"),
                None => "/v1/devices?limit=7".to_owned(),
            };
            let page = gw.client().get(&path).unwrap();
            assert_eq!(page.status, 200, "{}", page.text());
            let page = page.json();
            let devices = page["devices"].as_array().unwrap();
            assert!(devices.len() <= 7);
            seen_ids.extend(
                devices
                    .iter()
                    .map(|d| d["device_id"].as_str().unwrap().to_owned()),
            );
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
        }
        let mut sorted = seen_ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), seen_ids.len(), "a device listed twice");
        assert_eq!(seen_ids.len(), 180);
        orders.push(seen_ids);
    }
    assert!(
        orders.windows(2).all(|w| w[0] == w[1]),
        "every node lists in the same order"
    );
    // Stats from any node cover the whole fleet, and say what each holds.
    for gw in &gws {
        let stats = gw.client().get("/v1/stats").unwrap().json();
        assert_eq!(stats["devices"].as_u64(), Some(180), "{stats}");
        let nodes = stats["nodes"].as_object().expect("nodes");
        assert_eq!(nodes.len(), 3, "{stats}");
        let held: u64 = nodes.values().map(|n| n["devices"].as_u64().unwrap()).sum();
        assert_eq!(held, 180);
        assert!(
            nodes.values().all(|n| n["devices"].as_u64() < Some(180)),
            "{stats}"
        );
    }
    // gw-1 dies; the others take its partitions over within about the
    // lease time, and nothing acknowledged is lost.
    let [g0, g1, g2] = gws;
    g1.kill();
    let started = Instant::now();
    for id in &ids {
        let (status, body) = get_settled(&g0, id);
        assert_eq!(status, 200, "{id}: {body}");
        assert_eq!(&body, &seen[id], "{id} after the takeover");
    }
    let took = started.elapsed();
    println!(
        "every device answered again {:.1} s after the kill",
        took.as_secs_f64()
    );
    for (i, id) in ids.iter().enumerate().step_by(7) {
        assert_eq!(put(&g2, id, &format!("b{i}")), 200, "{id}");
    }
    wait_balanced(&[&g0, &g2]);
    let stats = g2.client().get("/v1/stats").unwrap().json();
    assert_eq!(stats["devices"].as_u64(), Some(180), "{stats}");
    let after = bodies(&g2, &ids);
    assert_eq!(bodies(&g0, &ids), after);
    assert_eq!(
        after.values().filter(|b| b.contains("token=b")).count(),
        ids.len().div_ceil(7)
    );
}

#[test]
fn a_paused_gateway_is_fenced_answers_nothing_stale_and_rejoins() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(dir.path(), 3);
    let first = gateway(dir.path(), &nats, "gw-1");
    let second = gateway(dir.path(), &nats, "gw-2");
    wait_balanced(&[&first, &second]);
    let ids: Vec<String> = (0..40).map(|i| format!("dev-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(put(&first, id, &format!("a{i}")), 201);
    }
    // gw-1 stops (SIGSTOP) until its leases lapse and gw-2 holds every
    // partition; then every device is changed through gw-2.
    signal(&first, "-STOP");
    std::thread::sleep(Duration::from_secs(LEASE_TTL_SECS * 2 + 1));
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(put(&second, id, &format!("b{i}")), 200, "{id}");
    }
    let fresh = bodies(&second, &ids);
    // gw-1 wakes up. Whatever it answers, it is never its stale copy: a
    // 503 while it learns where the partitions went, or the fresh record.
    signal(&first, "-CONT");
    for id in &ids {
        let r = first.client().get(&format!("/v1/devices/{id}")).unwrap();
        assert!(
            r.status == 503 || (r.status == 200 && r.text() == fresh[id]),
            "{id}: {} {}",
            r.status,
            r.text()
        );
    }
    // Its writes never land on top of gw-2's: each is refused or goes to
    // the partition's owner.
    let r = first
        .client()
        .send_json(
            "PUT",
            "/v1/devices/dev-0/channel",
            &channel_body(&uri("late")),
        )
        .unwrap();
    assert!(
        r.status == 503 || r.status == 200,
        "{} {}",
        r.status,
        r.text()
    );
    // It rejoins: the partitions spread over both again, and both answer
    // the same.
    wait_balanced(&[&first, &second]);
    let mut now = bodies(&second, &ids);
    if r.status == 200 {
        now.remove("dev-0");
    }
    let mut seen = bodies(&first, &ids);
    if r.status == 200 {
        seen.remove("dev-0");
    } else {
        assert_eq!(seen["dev-0"], fresh["dev-0"]);
    }
    assert_eq!(seen, now);
    for (id, body) in &now {
        assert_eq!(body, &fresh[id], "{id}");
    }
}

/// Below the leases, JetStream itself refuses a stale writer: a node that
/// serves a partition another node has appended to since it loaded it
/// gets its append refused (the expected last subject sequence), stops
/// writing that partition, and nothing it sent lands.
#[test]
fn jetstream_refuses_an_append_from_a_writer_that_lost_the_partition() {
    use wnsgate::config::{ClusterSettings, NatsAuth};
    use wnsgate::core::{ChannelUri, DeviceId, DeviceRecord, Pfn, UnixTime, UriPolicy};
    use wnsgate::store::{Mutation, Store, StoreError};
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsCluster::start(dir.path(), 1);
    let settings = |node: &str| ClusterSettings {
        nats_urls: vec![format!("nats://127.0.0.1:{}", nats.nodes[0].port)],
        auth: NatsAuth::None,
        tls_ca_file: None,
        node_id: node.to_owned(),
        advertise_url: None,
        partitions: Some(wnsgate::core::Partitioning::new(4).unwrap()),
        replicas: 1,
        stream_count: 1,
        lease_ttl: Duration::from_secs(30),
        checkpoint_every: Duration::from_secs(2),
    };
    let record = |token: &str| DeviceRecord {
        device_id: DeviceId::parse("dev-1").unwrap(),
        pfn: Pfn::parse(common::PFN).unwrap(),
        channel_uri: ChannelUri::parse(&uri(token), &UriPolicy::default()).unwrap(),
        provider_id: None,
        issued_at: UnixTime(1_800_000_000),
        dead: None,
        refresh: None,
    };
    let part = wnsgate::core::Partitioning::new(4).unwrap().of("dev-1");
    // Node a takes every partition and writes the device.
    let a = wnsgate::cluster::JetStreamStore::open(&settings("a"), "http://127.0.0.1:1", 1 << 30)
        .unwrap();
    let reg_a = wnsgate::registry::Registry::new();
    a.load(1, &reg_a).unwrap();
    a.apply(&[Mutation::Put(record("from-a"))]).unwrap();
    // Node b, wrongly believing the partition is its own, loads and writes it.
    let b = wnsgate::cluster::JetStreamStore::open(&settings("b"), "http://127.0.0.1:2", 1 << 30)
        .unwrap();
    let reg_b = wnsgate::registry::Registry::new();
    b.serve_without_lease(part, &reg_b).unwrap();
    assert_eq!(
        reg_b.get("dev-1").unwrap().channel_uri.as_str(),
        uri("from-a"),
        "b loaded what a wrote"
    );
    b.apply(&[Mutation::Put(record("from-b"))]).unwrap();
    // a's next append to that partition is refused by JetStream.
    let refused = a.apply(&[Mutation::Put(record("stale-a"))]);
    assert!(
        matches!(refused, Err(StoreError::NotOwner(_))),
        "{refused:?}"
    );
    assert_eq!(a.fenced_partitions(), vec![part]);
    assert!(!a.writable());
    // And stays refused, without reaching JetStream again.
    assert!(matches!(
        a.apply(&[Mutation::Put(record("stale-a-2"))]),
        Err(StoreError::NotOwner(_))
    ));
    // What the partition holds is b's write: a third reader sees it.
    let c = wnsgate::cluster::JetStreamStore::open(&settings("c"), "http://127.0.0.1:3", 1 << 30)
        .unwrap();
    let reg_c = wnsgate::registry::Registry::new();
    c.serve_without_lease(part, &reg_c).unwrap();
    assert_eq!(
        reg_c.get("dev-1").unwrap().channel_uri.as_str(),
        uri("from-b")
    );
}

/// A bulk wake of 20,000 devices started on one gateway runs on all
/// three, each over the partitions it owns, at the job's pace shared
/// between them, while registrations stream in. One gateway is killed
/// (SIGKILL) in the middle: the others take its partitions and go on from
/// its last checkpoint.
/// - Every acknowledged registration is there, as acknowledged.
/// - Every device is woken at least once and at most twice, and the job,
///   read from any survivor, counts each once.
/// - The channels WNS declared dead have exactly one refresh job each,
///   leased through one gateway from all of them, and completed through a
///   gateway that does not serve the job's device.
/// - After a restart of the whole cluster (gateways and NATS), the
///   devices, the refresh jobs and the finished job are all there.
#[test]
fn a_bulk_wake_runs_on_every_gateway_and_survives_the_sigkill_of_one() {
    use std::sync::atomic::{AtomicBool, Ordering};
    const DEVICES: u64 = 20_000;
    // Every 50th channel answers 410.
    const DEAD: u64 = DEVICES / 50;
    let dir = tempfile::tempdir().unwrap();
    let mut nats = NatsCluster::start(dir.path(), 3);
    let sim = wnsgate::sim::start(wnsgate::sim::SimConfig::default()).unwrap();
    let names = ["gw-0", "gw-1", "gw-2"];
    let mut gws: Vec<Server> = names
        .iter()
        .map(|n| gateway_with_sim(dir.path(), &nats, n, &sim))
        .collect();
    wait_balanced(&[&gws[0], &gws[1], &gws[2]]);
    let token = |i: u64| {
        if i.is_multiple_of(50) {
            format!("x410bw{i}")
        } else {
            format!("AwYAAADbw{i}")
        }
    };
    let list = (0..DEVICES).map(|i| (format!("bw-{i:05}"), token(i)));
    assert_eq!(
        common::import_tokens(&gws[0], "db5.notify.windows.com", list),
        DEVICES
    );
    let r = gws[0]
        .client()
        .send_json(
            "POST",
            "/v1/pushes",
            &serde_json::json!({"all": true, "rate_per_second": 4000}),
        )
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    let job = r.json();
    assert_eq!(
        job["expected_total"], DEVICES,
        "counted on every node: {job}"
    );
    let id = job["job_id"].as_str().unwrap().to_owned();
    // Registrations stream in through a survivor, for every partition.
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let mut client = gws[1].client();
        std::thread::spawn(move || {
            let mut acked: BTreeMap<String, String> = BTreeMap::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                let (id, u) = (format!("put-{i:05}"), uri(&format!("p{i}")));
                let r = client.send_json(
                    "PUT",
                    &format!("/v1/devices/{id}/channel"),
                    &channel_body(&u),
                );
                if let Ok(r) = r {
                    if r.status == 200 || r.status == 201 {
                        acked.insert(id, u);
                    }
                }
                i += 1;
            }
            (acked, i)
        })
    };
    // Every gateway runs it.
    for gw in &gws[1..] {
        wait_known(gw, &id, Duration::from_secs(30));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    // Killed once a good part is done, with more to go.
    loop {
        let v = gws[0]
            .client()
            .get(&format!("/v1/pushes/{id}"))
            .unwrap()
            .json();
        if v["done"].as_u64().unwrap_or(0) >= DEVICES / 3 {
            break;
        }
        assert!(Instant::now() < deadline, "{v}");
        std::thread::sleep(Duration::from_millis(20));
    }
    gws.pop().unwrap().kill();
    let before = sim.stats().pushes_total;
    assert!(before < DEVICES, "killed before the end: {before}");
    let done = common::wait_job(&gws[0], &id, Duration::from_secs(120));
    assert_eq!(done["state"], "done", "{done}");
    stop.store(true, Ordering::Release);
    // A registration whose answer was lost (a 503 while its partition
    // moved, after the write reached JetStream) may be there too.
    let (acked, attempted) = writer.join().unwrap();
    assert!(
        acked.len() > 100,
        "{} registrations acknowledged",
        acked.len()
    );
    // The job selects devices registered while it runs too, when its walk
    // reaches them: `extra` of those registered meanwhile.
    // The other nodes' shares arrive with their last checkpoints: the
    // total is read once it holds still.
    let mut total = done["total"].as_u64().unwrap();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(500));
        let v = gws[0]
            .client()
            .get(&format!("/v1/pushes/{id}"))
            .unwrap()
            .json();
        let now = v["total"].as_u64().unwrap();
        if now == total {
            break;
        }
        total = now;
    }
    let extra = total - DEVICES;
    assert!(extra <= attempted, "{done}");
    let st = sim.stats();
    assert_eq!(st.delivered_channels, DEVICES - DEAD + extra, "{st:?}");
    assert!(st.max_pushes_per_channel <= 2, "{st:?}");
    // Each device counted once, read from either survivor (the other's
    // share as its last checkpoint says, so wait for it to settle).
    let settled = |gw: &Server| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = gw.client().get(&format!("/v1/pushes/{id}")).unwrap().json();
            // A dead channel marked before the kill and woken again after
            // it is skipped the second time.
            let dead = v["expired"].as_u64().unwrap_or(0) + v["skipped_dead"].as_u64().unwrap_or(0);
            if v["state"] == "done"
                && v["received"] == DEVICES - DEAD + extra
                && dead == DEAD
                && v["total"] == DEVICES + extra
            {
                return;
            }
            assert!(Instant::now() < deadline, "{v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    gws.iter().for_each(settled);
    // The failures of both survivors, paged through one of them: dead
    // channels only, each once (the killed node's went with it).
    let mut failed = std::collections::BTreeSet::new();
    let mut cursor = String::new();
    loop {
        let path = format!("/v1/pushes/{id}/failures?limit=37{cursor}");
        let v = gws[1].client().get(&path).unwrap().json();
        for f in v["failures"].as_array().unwrap() {
            let dev = f["device_id"].as_str().unwrap().to_owned();
            assert_eq!(f["result"], "channel_dead", "{f}");
            assert!(failed.insert(dev.clone()), "{dev} listed twice");
        }
        match v["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    assert!(
        !failed.is_empty() && failed.len() as u64 <= DEAD,
        "{failed:?}"
    );
    // Every acknowledged registration, as acknowledged.
    let check_acked = |gw: &Server| {
        for (dev, u) in &acked {
            let (status, body) = get_settled(gw, dev);
            assert_eq!(status, 200, "{dev}: {body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["channel_uri"], u.as_str(), "{dev}");
        }
    };
    check_acked(&gws[0]);
    // One refresh job per dead channel, across the takeover.
    let queued = |gw: &Server| {
        let stats = gw.client().get("/v1/stats").unwrap().json();
        let q = &stats["refresh_queue"];
        q["queued"].as_u64().unwrap() + q["leased"].as_u64().unwrap()
    };
    assert_eq!(queued(&gws[1]), DEAD);
    // One lease through one gateway hands out every node's jobs.
    let r = gws[1]
        .client()
        .send_json(
            "POST",
            "/v1/refresh:lease",
            &serde_json::json!({"max": 1000}),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let leased = r.json()["jobs"].as_array().unwrap().clone();
    let devices: std::collections::BTreeSet<&str> = leased
        .iter()
        .map(|j| j["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(devices.len() as u64, DEAD, "{leased:?}");
    assert!(devices.iter().all(|d| d
        .trim_start_matches("bw-")
        .parse::<u64>()
        .unwrap()
        .is_multiple_of(50)));
    // Any gateway answers for any job: the id names its partition.
    for job in leased.iter().take(20) {
        let jid = job["job_id"].as_str().unwrap();
        for gw in &gws {
            let r = gw.client().get(&format!("/v1/refresh/{jid}")).unwrap();
            assert_eq!(r.status, 200, "{jid}: {}", r.text());
        }
    }
    let jid = leased[0]["job_id"].as_str().unwrap();
    let r = gws[0]
        .client()
        .send_json(
            "POST",
            &format!("/v1/refresh/{jid}:complete"),
            &serde_json::json!({"outcome": "failed"}),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    eprintln!(
        "{before} pushes before the kill, {} in all for {DEVICES} devices; {} registrations acknowledged meanwhile",
        st.pushes_total,
        acked.len()
    );
    // The whole cluster restarts: everything comes back.
    for gw in gws.drain(..) {
        assert!(gw.terminate().success());
    }
    for i in 0..3 {
        nats.stop(i);
    }
    for i in 0..3 {
        nats.restart(i);
    }
    let gws: Vec<Server> = names
        .iter()
        .map(|n| gateway_with_sim(dir.path(), &nats, n, &sim))
        .collect();
    wait_balanced(&[&gws[0], &gws[1], &gws[2]]);
    let stats = gws[2].client().get("/v1/stats").unwrap().json();
    let devices = stats["devices"].as_u64().unwrap();
    assert!(
        (DEVICES + acked.len() as u64..=DEVICES + attempted).contains(&devices),
        "{} acknowledged of {attempted}: {stats}",
        acked.len()
    );
    assert_eq!(queued(&gws[2]), DEAD);
    check_acked(&gws[2]);
    for gw in &gws {
        wait_known(gw, &id, Duration::from_secs(10));
        settled(gw);
    }
}
