//! A full disk, at the process level: writes answer 503
//! `store_unavailable` and readiness fails, reads keep working, and both
//! come back on their own once there is room; nothing acknowledged is lost.
//!
//! Needs root to mount a small tmpfs (CI runs as root); skipped otherwise.

// Measures its own waits and hang guards on the real clock; the rule that
// time is read only through `wnsgate::clock` (clippy.toml) is the gateway's.
#![allow(clippy::disallowed_methods)]

mod common;

use common::{channel_body, uri, Server};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};
use wnsgate::client::{Client, HttpResponse};

/// Size of the tmpfs: room for the state file, the LOCK file, the
/// snapshots directory and a log segment holding the writes below.
const TMPFS_SIZE: &str = "1m";

/// Unmounts the tmpfs when the test ends, however it ends.
struct Unmount<'a>(&'a Path);

impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.0).status();
    }
}

/// A channel URI of about 1 KiB, so each write takes a visible share of
/// the tmpfs.
fn long_uri(dev: &str, generation: u32) -> String {
    uri(&format!("{dev}-gen{generation}-{}", "x".repeat(1_000)))
}

fn put(c: &mut Client, dev: &str, u: &str) -> HttpResponse {
    let started = Instant::now();
    let r = c
        .send_json(
            "PUT",
            &format!("/v1/devices/{dev}/channel"),
            &channel_body(u),
        )
        .unwrap_or_else(|e| panic!("PUT {dev}: no answer ({e}): did the gateway crash or hang?"));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "PUT {dev} took {:?}",
        started.elapsed()
    );
    r
}

fn error_code(r: &HttpResponse) -> String {
    r.json()["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Polls `/readyz` until it answers `status`, for at most `limit`.
fn wait_readyz(c: &mut Client, status: u16, limit: Duration) -> HttpResponse {
    let deadline = Instant::now() + limit;
    loop {
        let r = c.get("/readyz").expect("GET /readyz");
        if r.status == status {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still answers {} after {limit:?}: {}",
            r.status,
            r.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Fills the file system holding `path` with a file there, until a write
/// fails for lack of room.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).expect("create the filler");
    let chunk = vec![0xA5u8; 4096];
    loop {
        match f.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("filling the tmpfs: {e}"),
        }
    }
    // Whatever fits of a page less.
    let mut byte = [0u8; 1];
    while f.write(&byte).unwrap_or(0) == 1 {
        byte[0] = byte[0].wrapping_add(1);
    }
}

/// With the disk full: an update of `before-0` answers 503
/// `store_unavailable`, and `/readyz` answers 503 `store_unavailable` right
/// after it and goes on doing so across several of the store's probes
/// (one a second) while the disk stays full.
fn expect_unready(c: &mut Client, generation: &mut u32) {
    *generation += 1;
    let r = put(c, "before-0", &long_uri("before-0", *generation));
    assert_eq!(r.status, 503, "an update on a full disk: {}", r.text());
    assert_eq!(error_code(&r), "store_unavailable", "{}", r.text());
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        let r = c.get("/readyz").expect("GET /readyz");
        assert_eq!(r.status, 503, "/readyz on a full disk: {}", r.text());
        assert_eq!(error_code(&r), "store_unavailable", "{}", r.text());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_full_disk_fails_writes_keeps_reads_and_recovers_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    // The data directory is the mount point: the gateway's stderr log
    // (next to it, `data.stderr.log`) stays off the tmpfs.
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={TMPFS_SIZE}"), "tmpfs"])
        .arg(&data)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here (not root)");
        return;
    }
    let _unmount = Unmount(&data);

    let server = Server::start(&data, &[]);
    let mut c = server.client().with_timeout(Duration::from_secs(15));
    // Device -> its acknowledged URI.
    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    for i in 0..8 {
        let dev = format!("before-{i}");
        let u = long_uri(&dev, 0);
        let r = put(&mut c, &dev, &u);
        assert_eq!(r.status, 201, "{}", r.text());
        acked.insert(dev, u);
    }

    // Generations of `before-0` sent while the disk is full.
    let mut generation = 0;
    let filler = data.join("filler");
    fill(&filler);

    // The last page of the log segment may still have room for a write or
    // two; one of a few at most must fail, cleanly.
    let mut refused = None;
    for i in 0..16 {
        let dev = format!("full-{i}");
        let u = long_uri(&dev, 0);
        let r = put(&mut c, &dev, &u);
        match r.status {
            201 => {
                acked.insert(dev, u);
            }
            503 => {
                assert_eq!(error_code(&r), "store_unavailable", "{}", r.text());
                refused = Some(dev);
                break;
            }
            s => panic!("PUT {dev} on a full disk answered {s}: {}", r.text()),
        }
    }
    let refused = refused.expect("no write failed on a full disk");
    // An update of an existing device fails the same way, and readiness
    // fails with it.
    expect_unready(&mut c, &mut generation);

    // Reads keep working, and show nothing of the failed writes.
    for (dev, u) in &acked {
        let r = c.get(&format!("/v1/devices/{dev}")).unwrap();
        assert_eq!(r.status, 200, "GET {dev} on a full disk: {}", r.text());
        assert_eq!(
            r.json()["channel_uri"].as_str(),
            Some(u.as_str()),
            "GET {dev} on a full disk"
        );
    }
    let r = c.get(&format!("/v1/devices/{refused}")).unwrap();
    assert_eq!(r.status, 404, "the refused write is visible: {}", r.text());

    // Room again: the background probe finds it, with no write from us.
    expect_unready(&mut c, &mut generation);
    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    wait_readyz(&mut c, 200, Duration::from_secs(10));
    eprintln!(
        "full disk: {} writes acknowledged before it filled, {refused} refused with 503; \
         ready again {:.2} s after the room came back, with no restart",
        acked.len(),
        freed.elapsed().as_secs_f64()
    );
    for i in 0..4 {
        let dev = format!("after-{i}");
        let u = long_uri(&dev, 0);
        let r = put(&mut c, &dev, &u);
        assert_eq!(r.status, 201, "PUT {dev} once there is room: {}", r.text());
        acked.insert(dev, u);
    }
    let u = long_uri("before-0", generation + 1);
    let r = put(&mut c, "before-0", &u);
    assert_eq!(r.status, 200, "{}", r.text());
    acked.insert("before-0".into(), u);

    server.kill();
    let server = Server::start(&data, &[]);
    let mut c = server.client();
    for (dev, u) in &acked {
        let r = c.get(&format!("/v1/devices/{dev}")).unwrap();
        assert_eq!(r.status, 200, "{dev} is missing after a restart");
        assert_eq!(
            r.json()["channel_uri"].as_str(),
            Some(u.as_str()),
            "{dev} after a restart"
        );
    }
    let r = c.get(&format!("/v1/devices/{refused}")).unwrap();
    assert_eq!(
        r.status,
        404,
        "the refused write came back after a restart: {}",
        r.text()
    );
    server.kill();
}
