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
