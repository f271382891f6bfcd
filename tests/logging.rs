//! JSON logs: one object per line, and a connection's lines carry its span (peer, node,
//! client id) — what a log pipeline filters on.

use crate::common::*;
use thingsd::protocols::mqtt::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_connection_span() {
    let tmp = tempfile::tempdir().unwrap();
    let node = process::spawn(tmp.path(), &[("THINGSD_LOG__FORMAT", "json".into()), ("THINGSD_NODE__NAME", "log-node".into())]).await;
    let ready = node.wait_log("ready", |l| l.contains("thingsd ready")).await;
    let v: serde_json::Value = serde_json::from_str(&ready).unwrap_or_else(|e| panic!("not JSON ({e}): {ready}"));
    assert_eq!(v["level"], "INFO");
    // A refused login is logged once, inside the connection's span.
    let mut c = connect_packet(Protocol::V5, "json-log-client", true);
    c.username = Some("no-such-token".into());
    let (_r, ack) = Raw::session(node.addr, c).await;
    assert_ne!(ack.code, 0);
    let line = node.wait_log("for the refused CONNECT", |l| l.contains("CONNECT refused")).await;
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["span"]["client_id"], "json-log-client", "{line}");
    assert_eq!(v["span"]["node"], "log-node", "{line}");
    assert!(v["span"]["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{line}");
    assert_eq!(v["fields"]["username"], "no-such-token", "{line}");
}

/// A node whose open-file limit is below `mqtt.max_connections` says so once at start and caps
/// client connections under the limit: the clients beyond it get CONNACK 0x97 (quota
/// exceeded) — not an accept loop failing with EMFILE — and the node keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_capped_below_the_open_file_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let limit = 600u64;
    let fit = (limit - thingsd::net::RESERVED_FILES) as usize;
    let node = process::spawn_under(&["prlimit", &format!("--nofile={limit}:{limit}"), "--"], tmp.path(), &[]).await;
    let line = node.wait_log("about the open-file limit", |l| l.contains("open-file limit allows")).await;
    assert!(line.contains(&format!("using={fit}")) && line.contains("configured=100000"), "{line}");
    let mut admitted = Vec::new();
    let mut refused = 0;
    for i in 0..fit + 20 {
        let (r, ack) = Raw::session(node.addr, connect_packet(Protocol::V5, &format!("fd-{i}"), true)).await;
        match ack.code {
            0 => admitted.push(r),
            reason::QUOTA_EXCEEDED => refused += 1,
            c => panic!("client {i}: CONNACK {c:#x}"),
        }
    }
    assert_eq!((admitted.len(), refused), (fit, 20));
    // Full, the node is not ready for new clients (a balancer sends them elsewhere), and the
    // 20 refusals were logged once.
    let (status, body) = http_get(node.http, "/health/ready").await;
    assert!(status == 503 && body.contains("below the connection limit: false"), "{status} {body}");
    assert_eq!(node.log.lock().unwrap().iter().filter(|l| l.contains("connection limit reached")).count(), 1);
    // One leaves: another client gets in.
    admitted.pop();
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (r, ack) = Raw::session(node.addr, connect_packet(Protocol::V5, "fd-late", true)).await;
        if ack.code == 0 {
            admitted.push(r);
            break;
        }
        assert!(tokio::time::Instant::now() < end, "a freed slot is never reused");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(!node.log.lock().unwrap().iter().any(|l| l.contains("accept failed")), "no accept failed for lack of descriptors");
    admitted.pop();
    let end = tokio::time::Instant::now() + DEADLINE;
    while http_get(node.http, "/health/ready").await.0 != 200 {
        assert!(tokio::time::Instant::now() < end, "ready again once there is room");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
