//! Operator endpoints over HTTP: liveness, readiness, Prometheus metrics, JSON errors.

use crate::common::*;
use thingsd::protocols::mqtt::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics() {
    let node = start(|_| {}).await;
    let http = node.http.expect("HTTP listener");
    let (status, body) = http_get(http, "/health/live").await;
    assert_eq!((status, body.contains("\"ok\"")), (200, true), "{body}");
    let (status, body) = http_get(http, "/health/ready").await;
    assert_eq!((status, body.contains("\"ready\"")), (200, true), "{body}");

    let mut s = Raw::v5(node.tcp, "metrics-sub").await;
    s.sub("m/#", QoS::AtLeastOnce).await;
    let mut p = Raw::v5(node.tcp, "metrics-pub").await;
    p.send(publish("m/1", QoS::AtLeastOnce, 1, "x")).await;
    assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
    s.recv_publish().await;
    let (status, body) = http_get(http, "/metrics").await;
    assert_eq!(status, 200);
    let value = |name: &str| -> u64 {
        body.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{body}"))
    };
    assert!(value("thingsd_clients_connected") >= 2);
    assert!(value("thingsd_messages_received_total") >= 1);
    assert!(value("thingsd_messages_sent_total") >= 1);
    assert!(body.contains("# TYPE thingsd_bytes_received_total counter"));

    let (status, body) = http_get(http, "/no/such/thing").await;
    assert_eq!(status, 404);
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON error body");
    assert_eq!(v["error"]["code"], "not_found");
    // Requests by route template and status (unmatched paths share one label).
    let (_, body) = http_get(http, "/metrics").await;
    assert!(body.contains("thingsd_http_requests_total{route=\"/health/live\",status=\"200\"} 1"), "{body}");
    assert!(body.contains("thingsd_http_requests_total{route=\"/metrics\",status=\"200\"} 1"), "{body}");
    assert!(body.contains("thingsd_http_requests_total{route=\"unmatched\",status=\"404\"} 1"), "{body}");
    node.stop().await;
}

/// A client that sends an over-large body without waiting (no `Expect: 100-continue`) reads
/// the 413 and its JSON error: the node stops reading the request, answers, then keeps
/// draining what the client still sends for a bounded time before closing (a lingering
/// close), instead of closing on unread data — which makes the kernel answer with a reset
/// that can destroy the 413 before the client reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_large_body_gets_a_readable_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let p = crate::common::platform::Platform::start(None, |_| {}).await;
    let http = p.http_addr();
    // The REST API takes 1 MiB; send 32 MiB, 20 times, each on its own connection.
    for round in 0..20 {
        let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
        let head = format!(
            "POST /api/v1/tenants HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            crate::common::platform::ADMIN_KEY,
            32 << 20
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let (mut r, mut w) = s.into_split();
        // Send the whole body (as a client does that does not read while it writes)...
        let writer = tokio::spawn(async move {
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..512 {
                if w.write_all(&chunk).await.is_err() {
                    return false;
                }
            }
            true
        });
        let sent = tokio::time::timeout(DEADLINE, writer).await.expect("the upload ends").unwrap();
        // ...then read the answer.
        let mut answer = Vec::new();
        let read = tokio::time::timeout(DEADLINE, r.read_to_end(&mut answer)).await.expect("the answer ends");
        let text = String::from_utf8_lossy(&answer);
        // Clients that write the whole request before reading (most HTTP libraries) report a
        // failed write as the request's error: the body must be taken (and dropped) to the end.
        assert!(
            sent && text.starts_with("HTTP/1.1 413") && text.contains("payload_too_large"),
            "round {round}: sent all: {sent}, read: {read:?}, answer: {text:?}"
        );
    }
    p.node.stop().await;
}
