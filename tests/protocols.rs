//! HTTP/2 (h2c, prior knowledge) on the API port, and overload behaviour.

mod common;

use bytes::Bytes;
use common::{channel_body, uri, Server};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

#[test]
fn serves_http2_prior_knowledge_with_many_streams() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("data"), &[]);
    let addr = s.addr.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let mut tasks = Vec::new();
        for i in 0..200 {
            let mut sender = sender.clone();
            tasks.push(tokio::spawn(async move {
                let body = serde_json::to_vec(&channel_body(&uri(&format!("h2-{i}")))).unwrap();
                let req = http::Request::put(format!("http://gw/v1/devices/h2-{i}/channel"))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap();
                let resp = sender.send_request(req).await.unwrap();
                assert_eq!(resp.version(), http::Version::HTTP_2);
                let status = resp.status();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    assert_eq!(s.client().get("/v1/stats").unwrap().json()["devices"], 200);
}

#[test]
fn a_shard_at_its_request_limit_answers_503_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(
        &dir.path().join("data"),
        &[
            ("WNSGATE_API__MAX_INFLIGHT_PER_SHARD", "1"),
            ("WNSGATE_SERVER__SHARDS", "1"),
        ],
    );
    // Hold one request open: headers sent, body not yet.
    let mut held = TcpStream::connect(&s.addr).unwrap();
    held.write_all(b"PUT /v1/devices/held/channel HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let r = s.client().get("/v1/stats").unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "overloaded");
    assert_eq!(r.header("retry-after"), Some("1"));
    // Finishing the held request frees the slot.
    let body = serde_json::to_vec(&channel_body(&uri("held"))).unwrap();
    let mut padded = body.clone();
    padded.resize(200, b' ');
    held.write_all(&padded).unwrap();
    let mut buf = [0u8; 512];
    let n = held.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 201"));
    assert_eq!(s.client().get("/v1/stats").unwrap().status, 200);
}

#[test]
fn a_stalled_body_times_out_with_408() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(
        &dir.path().join("data"),
        &[("WNSGATE_API__REQUEST_TIMEOUT_SECS", "1")],
    );
    let mut c = TcpStream::connect(&s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(
        b"PUT /v1/devices/slow/channel HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"pfn\"",
    )
    .unwrap();
    let mut buf = [0u8; 512];
    let n = c.read(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("body_timeout"), "{text}");
}

#[test]
fn a_connection_that_sends_nothing_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(
        &dir.path().join("data"),
        &[("WNSGATE_API__REQUEST_TIMEOUT_SECS", "1")],
    );
    let mut silent = TcpStream::connect(&s.addr).unwrap();
    // A guard so a regression fails instead of hanging; the server closes
    // the connection at its 1 s request timeout.
    silent
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 64];
    match silent.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the server to close the connection, got {other:?}"),
    }
    // A client that does speak still gets served on a fresh connection.
    assert_eq!(s.client().get("/v1/stats").unwrap().status, 200);
}

#[test]
fn concurrent_imports_are_bounded_with_429() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("data"), &[]);
    let held: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut c = TcpStream::connect(&s.addr).unwrap();
            c.write_all(b"POST /v1/devices:import HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n")
                .unwrap();
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let line = serde_json::json!({"device_id": "i1", "pfn": common::PFN, "channel_uri": uri("i1")})
        .to_string();
    let r = s
        .client()
        .request(
            "POST",
            "/v1/devices:import",
            Some("application/x-ndjson"),
            line.as_bytes(),
        )
        .unwrap();
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "too_many_imports");
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    let r = s
        .client()
        .request(
            "POST",
            "/v1/devices:import",
            Some("application/x-ndjson"),
            line.as_bytes(),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["accepted"], 1);
}
