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
