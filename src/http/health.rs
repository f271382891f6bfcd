//! `/health/live`, `/health/ready` and `/metrics` (Prometheus text format).
use super::{App, AppState};
use std::fmt::Write;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use super::ApiError;
use crate::metrics::Metrics;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/health/cluster", get(cluster))
        .route("/metrics", get(metrics))
}

/// Cluster membership as this node sees it (read-only; `members` includes this node).
async fn cluster(State(b): State<AppState>) -> Json<serde_json::Value> {
    match b.cluster.get() {
        None => Json(serde_json::json!({ "enabled": false, "node": b.config.node.name, "members": [] })),
        Some(c) => {
            let members = c.members().await;
            let up = members.iter().filter(|m| m.up).count();
            Json(serde_json::json!({ "enabled": true, "node": b.config.node.name, "up": up, "members": members }))
        }
    }
}

/// The process runs and answers.
async fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// The node accepts clients: its registry, retained store and every topic shard are running.
async fn ready(State(b): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let running = |s: Option<ractor::ActorStatus>| s == Some(ractor::ActorStatus::Running);
    let registry = running(b.registry().map(|r| r.get_status()));
    let retained = running(b.retained_actor.load_full().map(|r| r.get_status()));
    let shards = (0..b.router.shards.len()).all(|i| running(b.router.shard(i).map(|s| s.get_status())));
    // Devices cannot log in without the registry's database.
    let meta = tokio::time::timeout(std::time::Duration::from_secs(2), b.services.devices.meta.ping()).await.is_ok_and(|r| r.is_ok());
    // Telemetry cannot be acknowledged without its store.
    let tsdb = tokio::time::timeout(std::time::Duration::from_secs(2), b.services.telemetry.store.ping()).await.is_ok_and(|r| r.is_ok());
    let serving = b.serving.load(std::sync::atomic::Ordering::Relaxed);
    // In a cluster: a peer link came up (or no seed to join), or the join timeout passed
    // (then the node serves alone and says so).
    let (joined, alone) = match b.cluster.get() {
        None => (true, false),
        Some(c) if c.joined.load(std::sync::atomic::Ordering::Relaxed) => (true, false),
        Some(_) => {
            let waited = b.started.elapsed() >= std::time::Duration::from_secs(b.config.cluster.join_timeout_secs);
            (waited, waited)
        }
    };
    // At its connection limit the node takes no new clients: a balancer should send them
    // elsewhere (its connected clients stay).
    let room = b.metrics.clients_connected.load(std::sync::atomic::Ordering::Relaxed) < b.config.mqtt.max_connections as u64;
    if registry && retained && shards && meta && tsdb && serving && joined && room {
        Ok(Json(serde_json::json!({ "status": "ready", "cluster_standalone": alone })))
    } else {
        Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "not_ready",
            message: format!(
                "listeners up: {serving}, cluster joined: {joined}, below the connection limit: {room}, registry running: {registry}, retained store running: {retained}, all shards running: {shards}, meta store reachable: {meta}, time-series store reachable: {tsdb}"
            ),
        })
    }
}

/// One labelled family: `# HELP`, `# TYPE`, then a sample per (labels, value).
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: impl IntoIterator<Item = (String, u64)>) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, v) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {v}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    }
}

/// Escape a label value (backslash, quote, newline).
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

const PACKET_TYPES: [&str; 16] = [
    "reserved",
    "connect",
    "connack",
    "publish",
    "puback",
    "pubrec",
    "pubrel",
    "pubcomp",
    "subscribe",
    "suback",
    "unsubscribe",
    "unsuback",
    "pingreq",
    "pingresp",
    "disconnect",
    "auth",
];

/// The device platform's counters and the telemetry store's histograms.
fn platform_metrics(metric: &mut impl FnMut(&str, &str, &str, u64), hist: &mut String, svc: &crate::services::Services) {
    let d = &svc.devices;
    use std::sync::atomic::Ordering::Relaxed;
    let dm = &d.metrics;
    let counters = [
        ("thingsd_device_auth_ok_total", "Successful device/service logins (all protocols).", &dm.auth_ok),
        ("thingsd_device_auth_failed_total", "Refused logins: bad or missing credentials, disabled devices.", &dm.auth_failed),
        ("thingsd_device_auth_rate_limited_total", "Logins refused because the address failed too often.", &dm.auth_rate_limited),
        ("thingsd_acl_denied_total", "PUBLISH and SUBSCRIBE requests denied by the ACL.", &dm.acl_denied),
        ("thingsd_device_events_total", "Device messages accepted (telemetry, attributes, events, responses).", &dm.events),
        (
            "thingsd_device_payload_rejected_total",
            "Device payloads refused (malformed, too large, not in the thing model).",
            &dm.payload_rejected,
        ),
        ("thingsd_downlinks_sent_total", "Commands and attribute sets handed to devices.", &dm.commands_sent),
    ];
    for (name, help, c) in counters {
        metric(name, "counter", help, c.load(Relaxed));
    }
    if let Some(t) = d.telemetry.get() {
        let tm = &t.metrics;
        let counters = [
            ("thingsd_telemetry_points_written_total", "Telemetry points written to the time-series store.", &tm.points),
            ("thingsd_telemetry_batches_written_total", "Writes to the time-series store.", &tm.batches),
            ("thingsd_telemetry_write_errors_total", "Failed store writes (retried; nothing is dropped).", &tm.write_errors),
            ("thingsd_telemetry_busy_total", "Telemetry refused for lack of room in the writers' queues (HTTP 503, MQTT 0x89).", &tm.busy),
            (
                "thingsd_telemetry_ack_timeouts_total",
                "Telemetry writes that outlasted telemetry.ack_timeout_ms: answered busy (HTTP 503, MQTT 0x89), written later.",
                &tm.ack_timeouts,
            ),
            (
                "thingsd_telemetry_refused_points_total",
                "Points the time-series store refused for their content (the rest of their batch is stored).",
                &tm.refused_points,
            ),
            ("thingsd_telemetry_skipped_keys_total", "Keys not stored: longer than 255 bytes.", &tm.skipped_keys),
        ];
        for (name, help, c) in counters {
            metric(name, "counter", help, c.load(Relaxed));
        }
        histogram(
            hist,
            "thingsd_telemetry_write_seconds",
            "Time-series store write latency.",
            &crate::telemetry::LATENCY_BOUNDS,
            &tm.latency,
            Some(tm.latency_sum_us.load(Relaxed) as f64 / 1e6),
        );
        histogram(
            hist,
            "thingsd_telemetry_batch_points",
            "Points per store write.",
            &crate::telemetry::BATCH_BOUNDS,
            &tm.batch_sizes,
            None,
        );
    }
}

/// MQTT packets, bytes and PUBLISHes by type and QoS; CONNACK and disconnect reasons.
fn mqtt_families(out: &mut String, m: &Metrics) {
    use crate::protocols::mqtt::reason;
    let by_type =
        |c: &crate::metrics::Counts<16>| c.nonzero().map(|(i, n)| (format!("type=\"{}\"", PACKET_TYPES[i]), n)).collect::<Vec<_>>();
    family(
        out,
        "thingsd_messages_dropped_by_reason_total",
        "counter",
        "Deliveries not kept for a subscriber, by reason (refused_* and store_failed were refused to their publisher, not lost).",
        crate::metrics::Dropped::ALL
            .iter()
            .map(|(d, name)| (format!("reason=\"{name}\""), m.dropped.0[*d as usize].load(std::sync::atomic::Ordering::Relaxed))),
    );
    family(out, "thingsd_mqtt_packets_received_total", "counter", "MQTT packets read from clients, by type.", by_type(&m.packets_in));
    family(out, "thingsd_mqtt_packets_sent_total", "counter", "MQTT packets written to clients, by type.", by_type(&m.packets_out));
    family(
        out,
        "thingsd_mqtt_packet_bytes_received_total",
        "counter",
        "Bytes of MQTT packets read, by type (CONNECT not included).",
        by_type(&m.packet_bytes_in),
    );
    family(out, "thingsd_mqtt_packet_bytes_sent_total", "counter", "Bytes of MQTT packets written, by type.", by_type(&m.packet_bytes_out));
    let by_qos = |c: &crate::metrics::Counts<3>| {
        c.0.iter().enumerate().map(|(q, n)| (format!("qos=\"{q}\""), n.load(std::sync::atomic::Ordering::Relaxed))).collect::<Vec<_>>()
    };
    family(out, "thingsd_mqtt_publish_received_total", "counter", "PUBLISH packets read from clients, by QoS.", by_qos(&m.publish_in));
    family(out, "thingsd_mqtt_publish_sent_total", "counter", "PUBLISH packets written to clients, by QoS.", by_qos(&m.publish_out));
    family(
        out,
        "thingsd_mqtt_connacks_total",
        "counter",
        "CONNACKs sent, by reason (success or why the connection was refused).",
        m.connacks.nonzero().map(|(c, n)| (format!("reason=\"{}\",code=\"{c}\"", reason::name(c as u8)), n)),
    );
    let mut disc: Vec<(String, u64)> =
        m.disconnects_client.nonzero().map(|(c, n)| (format!("by=\"client\",reason=\"{}\"", reason::name(c as u8)), n)).collect();
    disc.extend(m.disconnects_server.nonzero().map(|(c, n)| (format!("by=\"server\",reason=\"{}\"", reason::name(c as u8)), n)));
    disc.push(("by=\"network\",reason=\"connection_lost\"".into(), Metrics::get(&m.connections_lost)));
    family(
        out,
        "thingsd_mqtt_disconnects_total",
        "counter",
        "Connections ended: by the client's DISCONNECT, by the server (reason sent), or lost.",
        disc,
    );
}

/// Metrics with labels: packets by type and QoS, CONNACK and disconnect reasons, routes,
/// cluster links, actors.
async fn labelled(out: &mut String, b: &App) {
    mqtt_families(out, &b.metrics);
    let pending = &b.router.pending;
    family(
        out,
        "thingsd_mqtt_publish_subscribe_waits_total",
        "counter",
        "Publishes held back by another client's SUBSCRIBE in flight that could match them: all of them, and those released because the SUBSCRIBE took longer than a second (a slow webhook or session).",
        [
            ("outcome=\"waited\"".to_string(), pending.waited.load(std::sync::atomic::Ordering::Relaxed)),
            ("outcome=\"expired\"".to_string(), pending.expired.load(std::sync::atomic::Ordering::Relaxed)),
        ],
    );
    let per: std::collections::BTreeMap<&str, (u64, u64)> = crate::actors::inspect::counts().into_iter().collect();
    family(out, "thingsd_actors", "gauge", "Live actors by kind.", per.iter().map(|(k, (n, _))| (format!("kind=\"{}\"", esc(k)), *n)));
    family(
        out,
        "thingsd_actor_mailbox_messages",
        "gauge",
        "Messages waiting in actor mailboxes, by actor kind.",
        per.iter().map(|(k, (_, q))| (format!("kind=\"{}\"", esc(k)), *q)),
    );
    let mut local = Vec::new();
    for snap in &b.router.snapshots {
        snap.load().route_keys(&mut Vec::new(), &mut local);
    }
    let mut routes = vec![("scope=\"local\"".to_string(), local.len() as u64)];
    if let Some(c) = b.cluster.get() {
        let mut remote = Vec::new();
        c.routes.load().entries(&mut Vec::new(), &mut remote);
        routes.push(("scope=\"remote\"".into(), remote.len() as u64));
        let members = c.members().await;
        let links = c.links.load();
        family(
            out,
            "thingsd_cluster_peer_up",
            "gauge",
            "Cluster members as this node sees them: 1 linked and up, 0 down.",
            members.iter().filter(|p| p.name != b.config.node.name).map(|p| (format!("peer=\"{}\"", esc(&p.name)), p.up as u64)),
        );
        family(
            out,
            "thingsd_cluster_link_queue",
            "gauge",
            "Forwards queued for each peer's link.",
            links.values().map(|l| (format!("peer=\"{}\"", esc(&l.name)), l.depth() as u64)),
        );
    }
    family(out, "thingsd_routes", "gauge", "Route keys: this node's subscriptions (local) and other nodes' (remote).", routes);
    {
        let t = &b.services.telemetry;
        family(
            out,
            "thingsd_telemetry_queue_points",
            "gauge",
            "Telemetry points accepted and waiting for a writer.",
            [("".to_string(), t.queued_points())],
        );
    }
    if let Some(h) = b.services.hooks.as_ref() {
        use std::sync::atomic::Ordering::Relaxed;
        let counts = h.counts();
        let label = |hook: &str, url: &str| format!("hook=\"{}\",endpoint=\"{}\"", esc(hook), esc(url));
        for (name, help, get) in [
            ("thingsd_webhook_requests_total", "Webhook requests sent, by hook and endpoint.", 0),
            ("thingsd_webhook_failures_total", "Webhook requests that failed or timed out.", 1),
            ("thingsd_webhook_cache_hits_total", "Auth webhook answers reused (cache-control max-age).", 2),
            ("thingsd_webhook_dropped_total", "Notifications dropped because the endpoint's queue was full.", 3),
        ] {
            family(
                out,
                name,
                "counter",
                help,
                counts.iter().map(|(hook, url, c)| {
                    let v = [&c.calls, &c.failures, &c.cache_hits, &c.dropped][get].load(Relaxed);
                    (label(hook, url), v)
                }),
            );
        }
    }
    {
        let a = &b.services.alerts;
        use std::sync::atomic::Ordering::Relaxed;
        let m = &a.metrics;
        family(
            out,
            "thingsd_alerts_raised_total",
            "counter",
            "Alerts raised by rules running on this node.",
            [(String::new(), m.raised.load(Relaxed))],
        );
        family(
            out,
            "thingsd_alerts_cleared_total",
            "counter",
            "Alerts cleared by rules running on this node.",
            [(String::new(), m.cleared.load(Relaxed))],
        );
        family(
            out,
            "thingsd_alert_notifications_total",
            "counter",
            "Alert notifications by outcome.",
            [
                ("outcome=\"sent\"".to_string(), m.notifications_sent.load(Relaxed)),
                ("outcome=\"failed\"".to_string(), m.notifications_failed.load(Relaxed)),
                ("outcome=\"dropped\"".to_string(), m.notifications_dropped.load(Relaxed)),
            ],
        );
        family(out, "thingsd_alert_rules_running", "gauge", "Alert rule actors on this node.", [(String::new(), a.running().len() as u64)]);
    }
}

/// A Prometheus histogram from per-bucket counts (the last count is the +Inf bucket).
fn histogram(out: &mut String, name: &str, help: &str, bounds: &[f64], counts: &[std::sync::atomic::AtomicU64], sum: Option<f64>) {
    use std::sync::atomic::Ordering::Relaxed;
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut cum = 0;
    for (i, c) in counts.iter().enumerate() {
        cum += c.load(Relaxed);
        match bounds.get(i) {
            Some(b) => writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}"),
            None => writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cum}"),
        }
        .ok();
    }
    let _ = writeln!(out, "{name}_sum {}\n{name}_count {cum}", sum.unwrap_or(0.0));
}

async fn metrics(State(b): State<AppState>) -> impl IntoResponse {
    let m = &b.metrics;
    let mut out = String::new();
    let mut hist = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, v: u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    };
    metric("thingsd_clients_connected", "gauge", "MQTT clients connected now.", Metrics::get(&m.clients_connected));
    metric("thingsd_connections_total", "counter", "MQTT connections accepted (CONNECT processed).", Metrics::get(&m.connections_total));
    let _ = writeln!(
        hist,
        "# HELP thingsd_scheduler_lag_seconds How late the runtime last woke a timer (beyond mqtt.overload_lag_ms: new connections refused, CONNACK 0x89).\n# TYPE thingsd_scheduler_lag_seconds gauge\nthingsd_scheduler_lag_seconds {}",
        Metrics::get(&m.scheduler_lag_us) as f64 / 1e6
    );
    metric(
        "thingsd_connects_pending",
        "gauge",
        "CONNECTs being authenticated and attached now (beyond mqtt.max_pending_connects: CONNACK 0x89).",
        Metrics::get(&m.connects_pending),
    );
    metric("thingsd_messages_received_total", "counter", "PUBLISH packets received from clients.", Metrics::get(&m.messages_received));
    metric("thingsd_messages_sent_total", "counter", "PUBLISH packets sent to clients.", Metrics::get(&m.messages_sent));
    metric(
        "thingsd_messages_dropped_total",
        "counter",
        "Messages dropped by queue bounds or client packet-size limits.",
        Metrics::get(&m.messages_dropped),
    );
    metric(
        "thingsd_publishes_refused_total",
        "counter",
        "Publishes refused (0x97, or a 3.1.1 publisher disconnected unacknowledged) because a subscriber's queue could not take them.",
        Metrics::get(&m.publishes_refused),
    );
    metric(
        "thingsd_state_commits_total",
        "counter",
        "Group commits of the node's state store.",
        b.state.commits.load(std::sync::atomic::Ordering::Relaxed),
    );
    metric("thingsd_bytes_received_total", "counter", "Bytes read from MQTT clients.", Metrics::get(&m.bytes_received));
    metric("thingsd_bytes_sent_total", "counter", "Bytes written to MQTT clients.", Metrics::get(&m.bytes_sent));
    metric(
        "thingsd_protocol_errors_total",
        "counter",
        "Connections closed for malformed or invalid packets.",
        Metrics::get(&m.protocol_errors),
    );
    if let Some(c) = b.cluster.get() {
        use std::sync::atomic::Ordering::Relaxed;
        metric("thingsd_cluster_forwarded_total", "counter", "Publishes forwarded to other nodes.", c.forwarded.load(Relaxed));
        metric("thingsd_cluster_received_total", "counter", "Publishes received from other nodes.", c.received.load(Relaxed));
        metric(
            "thingsd_cluster_forward_dropped_total",
            "counter",
            "Forwards nobody waited for, dropped at a peer's full queue (cluster.max_forward_queue).",
            c.forward_dropped.load(Relaxed),
        );
        metric("thingsd_cluster_peers_up", "gauge", "Other nodes with a live link.", c.links.load().len() as u64);
    }
    platform_metrics(&mut metric, &mut hist, &b.services);
    metric("thingsd_retained_messages", "gauge", "Retained messages stored.", b.retained.load().len() as u64);
    metric(
        "thingsd_messages_expired_total",
        "counter",
        "Messages discarded: their expiry interval passed before delivery.",
        Metrics::get(&m.messages_expired),
    );
    metric(
        "thingsd_session_queued_messages",
        "gauge",
        "Deliveries waiting in sessions' pending queues (offline or beyond the in-flight window).",
        crate::actors::load::QUEUED.load(std::sync::atomic::Ordering::Relaxed).max(0) as u64,
    );
    metric(
        "thingsd_subscriptions",
        "gauge",
        "Subscriptions on this node (shared-group members counted each).",
        b.subscription_count() as u64,
    );
    let mut lab = String::new();
    labelled(&mut lab, &b).await;
    metric("thingsd_uptime_seconds", "gauge", "Seconds since the node started.", b.started.elapsed().as_secs());
    out.push_str(&lab);
    out.push_str(&hist);
    if let Ok(reqs) = m.http_requests.lock() {
        let _ = writeln!(
            out,
            "# HELP thingsd_http_requests_total HTTP requests by route and status.\n# TYPE thingsd_http_requests_total counter"
        );
        for ((route, status), n) in reqs.iter() {
            let _ = writeln!(
                out,
                "thingsd_http_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                route.replace('\\', "\\\\").replace('"', "\\\"")
            );
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
