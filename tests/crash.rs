//! SIGKILL at an arbitrary moment loses no acknowledged registration.

mod common;

use common::{channel_body, uri, Server};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Per device: every URI sent, in order, and how many of them were acked.
type Log = HashMap<String, (Vec<String>, usize)>;

#[test]
fn every_acknowledged_registration_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &[]);
    let url = server.url();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (url, stop, acked) = (url.clone(), stop.clone(), acked.clone());
            std::thread::spawn(move || {
                let mut c = wnsgate::client::Client::new(&url)
                    .unwrap()
                    .with_timeout(Duration::from_secs(5));
                let mut log: Log = HashMap::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Every third write updates an earlier device with a new URI.
                    let dev = if i % 3 == 2 {
                        format!("w{w}-{}", i / 2)
                    } else {
                        format!("w{w}-{i}")
                    };
                    let u = uri(&format!("{dev}-gen{i}"));
                    let entry = log.entry(dev.clone()).or_default();
                    entry.0.push(u.clone());
                    match c.send_json(
                        "PUT",
                        &format!("/v1/devices/{dev}/channel"),
                        &channel_body(&u),
                    ) {
                        Ok(r) if r.status == 200 || r.status == 201 => {
                            entry.1 = entry.0.len();
                            acked.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => panic!("unexpected answer {}: {}", r.status, r.text()),
                        Err(_) => break, // the server died mid-request
                    }
                    i += 1;
                }
                log
            })
        })
        .collect();
    while acked.load(Ordering::Relaxed) < 400 {
        std::thread::sleep(Duration::from_millis(5));
    }
    server.kill();
    stop.store(true, Ordering::Relaxed);
    let logs: Vec<Log> = writers.into_iter().map(|w| w.join().unwrap()).collect();

    let server = Server::start(&data, &[]);
    let mut c = server.client();
    let mut checked = 0;
    for log in &logs {
        for (dev, (sent, acked_n)) in log {
            let r = c.get(&format!("/v1/devices/{dev}")).unwrap();
            if *acked_n == 0 {
                // Never acknowledged: may or may not be there, but if it is,
                // it holds a URI that was sent for it.
                if r.status == 200 {
                    let got = r.json()["channel_uri"].as_str().unwrap().to_owned();
                    assert!(sent.contains(&got));
                }
                continue;
            }
            assert_eq!(
                r.status, 200,
                "acknowledged device {dev} is missing after SIGKILL"
            );
            let got = r.json()["channel_uri"].as_str().unwrap().to_owned();
            // The last acknowledged URI, or one sent after it whose answer was lost.
            assert!(
                sent[acked_n - 1..].contains(&got),
                "{dev}: {got} is older than the last acknowledged URI"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 300,
        "only {checked} acknowledged devices checked"
    );
}
