//! Telemetry end to end: devices publish over MQTT and HTTP, the product's rules transform the
//! values, the acknowledgement means stored (queried right after it, no polling), queries over
//! the admin API, restart; back-pressure when the store stalls (PostgreSQL behind a proxy the
//! test cuts); kill -9 loses no acknowledged point.
use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::platform::*;
use crate::common::*;
use serde_json::{json, Value};
use thingsd::protocols::mqtt::*;

pub(crate) async fn history(p: &Platform, number: &str, query: &str) -> Value {
    let (s, v) = p.admin("GET", &format!("/api/v1/devices/{number}/telemetry/history?{query}"), None).await;
    assert_eq!(s, 200, "{v}");
    v
}

pub(crate) fn values_of(v: &Value, key: &str) -> Vec<(i64, Value)> {
    v["points"].as_array().unwrap().iter().filter(|p| p["key"] == key).map(|p| (p["ts"].as_i64().unwrap(), p["value"].clone())).collect()
}

/// A connected device moved to another product: its next message goes through the new
/// product's telemetry rules, without reconnecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_moved_to_another_product_gets_its_rules_at_once() {
    let p = Platform::start(None, |_| {}).await;
    let mut ids = Vec::new();
    for (name, to) in [("moves-a", "from_a"), ("moves-b", "from_b")] {
        let (s, prod) = p.admin("POST", "/api/v1/products", Some(json!({"tenant_id": 1, "name": name, "strict": false}))).await;
        assert_eq!(s, 201, "{prod}");
        let id = prod["id"].as_i64().unwrap();
        let rules = json!([{"op": "rename", "from": "t", "to": to}]);
        let (s, v) = p.admin("PUT", &format!("/api/v1/products/{id}/telemetry-policy"), Some(json!({"rules": rules}))).await;
        assert_eq!(s, 200, "{v}");
        ids.push(id);
    }
    let (_, token) = p.create_device("mover-1", json!({"product_id": ids[0]})).await;
    let mut d = device(p.node.tcp, Protocol::V5, "mover-1", &token).await;
    let t0 = (thingsd::storage::meta::now_ms() - 3_600_000) / 60_000 * 60_000;
    assert!(ok(pub1(&mut d, "devices/telemetry", 1, &format!(r#"{{"ts": {t0}, "t": 1}}"#)).await));
    let (s, v) = p.admin("PATCH", "/api/v1/devices/mover-1", Some(json!({"product_id": ids[1]}))).await;
    assert_eq!(s, 200, "{v}");
    assert!(ok(pub1(&mut d, "devices/telemetry", 2, &format!(r#"{{"ts": {}, "t": 2}}"#, t0 + 60_000)).await));
    let h = history(&p, "mover-1", &format!("from={t0}&to={}", t0 + 120_000)).await;
    assert_eq!(values_of(&h, "from_a"), vec![(t0, json!(1.0))], "{h}");
    assert_eq!(values_of(&h, "from_b"), vec![(t0 + 60_000, json!(2.0))], "the new product's rules: {h}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_to_store_with_rules_queries_and_restart() {
    let p = Platform::start(None, |_| {}).await;
    let (s, prod) = p.admin("POST", "/api/v1/products", Some(json!({"tenant_id": 1, "name": "thermo", "strict": false}))).await;
    assert_eq!(s, 201, "{prod}");
    let pid = prod["id"].as_i64().unwrap();

    // Rules are checked when saved; the refusal names the rule.
    for (bad, why) in [
        (json!([{"op": "derive", "key": "x", "expr": "temp +* 2"}]), "rule 0"),
        (json!([{"op": "scale", "key": "t"}, {"op": "convert", "key": "t", "from": "C", "to": "kPa"}]), "rule 1"),
        (json!([{"op": "explode", "key": "t"}]), "rules"),
    ] {
        let (s, v) = p.admin("PUT", &format!("/api/v1/products/{pid}/telemetry-policy"), Some(json!({"rules": bad}))).await;
        assert_eq!(s, 400, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(why), "{v}");
    }
    let rules = json!([
        {"op": "rename", "from": "t", "to": "temp"},
        {"op": "convert", "key": "tf", "from": "F", "to": "C"},
        {"op": "drop_out_of_range", "key": "hum", "min": 0, "max": 100},
        {"op": "derive", "key": "power", "expr": "volt * amp"}
    ]);
    let (s, v) = p.admin("PUT", &format!("/api/v1/products/{pid}/telemetry-policy"), Some(json!({"rules": rules, "raw_days": 30}))).await;
    assert_eq!(s, 200, "{v}");
    let (_, got) = p.admin("GET", &format!("/api/v1/products/{pid}/telemetry-policy"), None).await;
    assert_eq!(got["raw_days"], 30);
    let (s, _) = p.admin("PUT", "/api/v1/products/999/telemetry-policy", Some(json!({"rules": []}))).await;
    assert_eq!(s, 404);

    let (_, token) = p.create_device("th-1", json!({"product_id": pid})).await;
    let mut d = device(p.node.tcp, Protocol::V5, "th-1", &token).await;
    // Flat with rules applied; nested (dotted keys); a batch with explicit times; every type.
    // Recent (a product policy keeps 30 days), on a whole minute.
    let t0 = (thingsd::storage::meta::now_ms() - 7_200_000) / 60_000 * 60_000;
    assert!(ok(pub1(
        &mut d,
        "devices/telemetry",
        1,
        &format!(r#"{{"ts": {t0}, "t": 100, "tf": 212, "hum": 140, "volt": 230, "amp": 0.5}}"#)
    )
    .await));
    // Acknowledged means stored: queried at once.
    let h = history(&p, "th-1", &format!("from={t0}&to={}", t0 + 1)).await;
    let keys: BTreeSet<&str> = h["points"].as_array().unwrap().iter().map(|p| p["key"].as_str().unwrap()).collect();
    assert_eq!(keys, BTreeSet::from(["amp", "power", "temp", "tf", "volt"]), "renamed, out-of-range dropped, derived: {h}");
    assert_eq!(values_of(&h, "temp"), vec![(t0, json!(100.0))]);
    assert_eq!(values_of(&h, "tf"), vec![(t0, json!(100.0))], "212 °F");
    assert_eq!(values_of(&h, "power"), vec![(t0, json!(115.0))]);
    let batch = json!([
        {"ts": t0 + 60_000, "values": {"temp": 20.5, "env": {"co2": 600}, "door": true, "mode": "eco", "list": [1, 2]}},
        {"ts": t0 + 120_000, "values": {"temp": 21.5, "door": false}}
    ]);
    assert!(ok(pub1(&mut d, "devices/telemetry", 2, &batch.to_string()).await));
    let h = history(&p, "th-1", &format!("from={t0}&to={}&keys=temp,env.co2,door,mode,list", t0 + 180_000)).await;
    assert_eq!(values_of(&h, "temp"), vec![(t0, json!(100.0)), (t0 + 60_000, json!(20.5)), (t0 + 120_000, json!(21.5))]);
    assert_eq!(values_of(&h, "env.co2"), vec![(t0 + 60_000, json!(600.0))]);
    assert_eq!(values_of(&h, "door"), vec![(t0 + 60_000, json!(true)), (t0 + 120_000, json!(false))]);
    assert_eq!(values_of(&h, "mode"), vec![(t0 + 60_000, json!("eco"))]);
    assert_eq!(values_of(&h, "list"), vec![(t0 + 60_000, json!("[1,2]"))]);

    // HTTP device API: 200 means stored too.
    let r = p
        .http
        .post(format!("http://{}/api/v1/{token}/telemetry", p.http_addr()))
        .body(format!(r#"{{"ts": {}, "temp": 30}}"#, t0 + 180_000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Pagination: two keys per page, cursors until the end.
    let mut all = Vec::new();
    let mut cursor = String::new();
    loop {
        let v = history(&p, "th-1", &format!("from={t0}&to={}&keys=temp,door&limit=2{cursor}", t0 + 240_000)).await;
        all.extend(v["points"].as_array().unwrap().iter().map(|p| (p["ts"].as_i64().unwrap(), p["key"].as_str().unwrap().to_string())));
        match v["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={}", urlencode(c)),
            None => break,
        }
    }
    assert_eq!(all.len(), 6, "{all:?}");
    assert!(all.windows(2).all(|w| w[0] < w[1]), "ordered by time and key: {all:?}");

    // Latest, aggregates, chart, CSV.
    let (_, latest) = p.admin("GET", "/api/v1/devices/th-1/telemetry/latest", None).await;
    assert_eq!(latest["temp"], json!({"ts": t0 + 180_000, "value": 30.0}));
    assert_eq!(latest["door"]["value"], json!(false));
    let (s, agg) = p
        .admin(
            "GET",
            &format!("/api/v1/devices/th-1/telemetry/aggregate?key=temp&from={t0}&to={}&window=1h&fn=max&tz=Europe/Berlin", t0 + 240_000),
            None,
        )
        .await;
    assert_eq!(s, 200, "{agg}");
    let total: f64 = agg["buckets"].as_array().unwrap().iter().map(|b| b["value"].as_f64().unwrap()).fold(f64::MIN, f64::max);
    assert_eq!(total, 100.0);
    let (s, fleet) = p
        .admin(
            "GET",
            &format!("/api/v1/products/{pid}/telemetry/aggregate?key=temp&from={t0}&to={}&window=1d&fn=count", t0 + 240_000),
            None,
        )
        .await;
    assert_eq!(s, 200, "{fleet}");
    let counted: f64 = fleet["devices"]["th-1"].as_array().unwrap().iter().map(|b| b["value"].as_f64().unwrap()).sum();
    assert_eq!(counted, 4.0, "{fleet}");
    let (_, chart) =
        p.admin("GET", &format!("/api/v1/devices/th-1/telemetry/chart?key=temp&from={t0}&to={}&points=2", t0 + 240_000), None).await;
    assert_eq!(chart["points"], json!([[t0, 60.25], [t0 + 120_000, 25.75]]));
    let csv = p
        .http
        .get(format!("http://{}/api/v1/devices/th-1/telemetry/export.csv?keys=mode,temp&from={t0}&to={}", p.http_addr(), t0 + 100_000))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(csv.headers()["content-type"], "text/csv; charset=utf-8");
    assert_eq!(csv.text().await.unwrap(), format!("ts,key,value\n{t0},temp,100\n{},mode,eco\n{},temp,20.5\n", t0 + 60_000, t0 + 60_000));

    // Bad queries: JSON errors.
    for q in ["window=7x", "fn=median", "tz=Mars/Base", "from=10&to=5", "from=abc"] {
        let (s, v) = p.admin("GET", &format!("/api/v1/devices/th-1/telemetry/aggregate?key=temp&{q}"), None).await;
        assert_eq!(s, 400, "{q}: {v}");
        assert!(v["error"]["code"].is_string());
    }
    let (s, _) = p.admin("GET", "/api/v1/devices/nope/telemetry/latest", None).await;
    assert_eq!(s, 404);
    let (s, st) = p.admin("GET", "/api/v1/telemetry/status", None).await;
    assert_eq!((s, st["store"].as_str()), (200, Some("embedded")), "{st}");
    // Retention: a point older than the product's 30 days goes at the next maintenance run.
    let old = t0 - 40 * 86_400_000;
    let r = p
        .http
        .post(format!("http://{}/api/v1/{token}/telemetry", p.http_addr()))
        .body(format!(r#"{{"ts": {old}, "temp": 1}}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(values_of(&history(&p, "th-1", &format!("from={old}&to={}&keys=temp", old + 1)).await, "temp").len(), 1);
    let (s, rep) = p.admin("POST", "/api/v1/telemetry/maintenance", None).await;
    assert_eq!(s, 200, "{rep}");
    assert!(rep["points_deleted"].as_u64().unwrap() >= 1, "{rep}");
    assert!(values_of(&history(&p, "th-1", &format!("from={old}&to={}&keys=temp", old + 1)).await, "temp").is_empty());
    // Hourly roll-ups of completed hours (those that ended over an hour ago) answer like raw.
    assert!(rep["hours_rolled_up"].as_i64().unwrap() >= 24, "{rep}");
    let h = 3_600_000;
    let rolled_to = (thingsd::storage::meta::now_ms() - h) / h * h;
    let (from, to) = (t0 / h * h, rolled_to);
    if to > from {
        for f in ["avg", "max", "count", "sum"] {
            let path =
                |src: &str| format!("/api/v1/devices/th-1/telemetry/aggregate?key=temp&from={from}&to={to}&window=1h&fn={f}&source={src}");
            let (s1, raw) = p.admin("GET", &path("raw"), None).await;
            let (s2, rolled) = p.admin("GET", &path("rollup"), None).await;
            assert_eq!((s1, s2), (200, 200), "{rolled}");
            assert_eq!(raw["buckets"], rolled["buckets"], "{f}");
            assert!(!raw["buckets"].as_array().unwrap().is_empty());
        }
    }
    let (s, v) = p.admin("GET", "/api/v1/devices/th-1/telemetry/aggregate?key=temp&window=1h&source=rollup&tz=Asia/Kolkata", None).await;
    assert_eq!(s, 400, "half-hour zones are not answered from hourly roll-ups: {v}");
    let (s, _) = p.admin("GET", "/api/v1/devices/th-1/telemetry/aggregate?key=temp&window=15m&source=rollup", None).await;
    assert_eq!(s, 400);

    // A writer that dies is replaced: the next message is stored and acknowledged.
    for w in ["writer:0", "writer:1"] {
        let cell = ractor::registry::where_is(w.to_string()).expect("writer registered");
        cell.kill();
        let end = tokio::time::Instant::now() + DEADLINE;
        while ractor::registry::where_is(w.to_string()).is_some_and(|c| c.get_id() == cell.get_id()) {
            assert!(tokio::time::Instant::now() < end, "writer did not stop");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert!(ok(pub1(&mut d, "devices/telemetry", 3, &format!(r#"{{"ts": {}, "after_kill": 1}}"#, t0 + 200_000)).await));
    let h = history(&p, "th-1", &format!("from={t0}&to={}&keys=after_kill", t0 + 240_000)).await;
    assert_eq!(values_of(&h, "after_kill").len(), 1, "{h}");

    // Prometheus: points written, and the write-latency histogram is consistent.
    let m = p.http.get(format!("http://{}/metrics", p.http_addr())).send().await.unwrap().text().await.unwrap();
    let val = |name: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(val("thingsd_telemetry_points_written_total") >= 13.0, "{m}");
    assert_eq!(val("thingsd_telemetry_write_seconds_count"), val("thingsd_telemetry_batches_written_total"));
    assert!(m.contains("thingsd_telemetry_write_seconds_bucket{le=\"+Inf\"}"));

    // A graceful restart keeps everything (the WAL and segments are reopened).
    d.send(disconnect()).await;
    let dir = p.node.dir.clone();
    let guard = p.node.stop().await;
    let node = start_in(dir, |c| configure(c, None)).await;
    let p = Platform { node, http: client() };
    let h = history(&p, "th-1", &format!("from={t0}&to={}&keys=temp", t0 + 240_000)).await;
    assert_eq!(values_of(&h, "temp").len(), 4, "{h}");
    drop(guard);
}

/// Success, or success with no subscribers (5.0).
fn ok(code: u8) -> bool {
    code == 0 || code == reason::NO_MATCHING_SUBSCRIBERS
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(
            |b| {
                if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            },
        )
        .collect()
}

/// The store stalls (PostgreSQL behind a cut link): accepted points are held, not lost;
/// once the writers' queue is full HTTP answers 503 with Retry-After and MQTT holds the
/// PUBACK back; after healing everything acknowledged is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_pressure_when_the_store_stalls() {
    let Some(pg) = common::backends::postgres().await else { return };
    let (proxy, ts_url) = common::cut::in_front_of_postgres(&pg).await;
    let p = Platform::start(None, |c| {
        c.telemetry.store = ts_url.clone();
        c.telemetry.writers = 1;
        c.telemetry.writer_queue = 4;
        c.telemetry.wait_ms = 300;
        // Held requests wait for the stalled store through the whole test (the deadline on a
        // write is tested in security::a_poison_point_never_wedges_a_writer).
        c.telemetry.ack_timeout_ms = 60_000;
    })
    .await;
    let (_, token) = p.create_device("bp-1", json!({})).await;
    let post = |i: i64| {
        let http = client();
        let url = format!("http://{}/api/v1/{token}/telemetry", p.http_addr());
        async move {
            let r = http
                .post(url)
                .body(format!(r#"{{"ts": {}, "n": {i}}}"#, 1_790_000_000_000i64 + i))
                .timeout(Duration::from_secs(30))
                .send()
                .await;
            r.map(|r| (r.status().as_u16(), r.headers().get("retry-after").map(|h| h.to_str().unwrap().to_string())))
        }
    };
    assert_eq!(post(0).await.unwrap().0, 200);

    proxy.cut(true);
    // Accepted while there is room (each waits for its write: durability = written); then
    // the queue (4 points) is full and a request is refused after wait_ms with 503.
    let mut held = Vec::new();
    for i in 1..=20 {
        let mut h = tokio::spawn(post(i));
        match tokio::time::timeout(Duration::from_secs(1), &mut h).await {
            Err(_) => held.push(h),
            Ok(r) => {
                let (s, retry) = r.unwrap().unwrap();
                assert_eq!((s, retry.as_deref()), (503, Some("1")), "a request during the stall is held or refused");
                break;
            }
        }
    }
    assert_eq!(held.len(), 4, "the writer queue holds 4 points");
    assert!(held.iter().all(|h| !h.is_finished()), "accepted requests wait for the stalled store");
    // MQTT: the PUBACK is held back while the store stalls.
    let mut d = device(p.node.tcp, Protocol::V5, "bp-1", &token).await;
    d.send(publish("devices/telemetry", QoS::AtLeastOnce, 7, r#"{"ts": 1790000000500, "n": 500}"#)).await;
    assert!(tokio::time::timeout(Duration::from_millis(500), d.recv_app()).await.is_err(), "no PUBACK while the store stalls");

    // Not ready while the store does not answer (load balancers stop sending devices here).
    let ready = |http: reqwest::Client, addr: std::net::SocketAddr| async move {
        let r = http.get(format!("http://{addr}/health/ready")).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    let (s, body) = ready(client(), p.http_addr()).await;
    assert_eq!(s, 503, "{body}");
    assert!(body.contains("time-series store reachable: false"), "{body}");

    proxy.cut(false);
    for h in held {
        assert_eq!(h.await.unwrap().unwrap().0, 200, "held requests complete once the store is back");
    }
    match d.recv_app().await {
        Some(Packet::PubAck(a)) => assert!(a.pkid == 7 && ok(a.code), "{a:?}"),
        other => panic!("expected the PUBACK after healing: {other:?}"),
    }
    let h = history(&p, "bp-1", "from=1790000000000&to=1790000001000&keys=n&limit=1000").await;
    let stored: BTreeSet<i64> = values_of(&h, "n").iter().map(|(_, v)| v.as_f64().unwrap() as i64).collect();
    for n in [0, 1, 2, 3, 4, 500] {
        assert!(stored.contains(&n), "acknowledged point {n} stored: {stored:?}");
    }
    let (_, m) = p.admin("GET", "/api/v1/telemetry/status", None).await;
    assert_eq!(m["store"], "postgres");
    let end = tokio::time::Instant::now() + DEADLINE;
    while ready(client(), p.http_addr()).await.0 != 200 {
        assert!(tokio::time::Instant::now() < end, "ready again once the store answers");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// kill -9 while a device publishes: every point acknowledged before the kill is there after
/// the restart (embedded store, durability `written`: the WAL write precedes the PUBACK).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_point() {
    let tmp = tempfile::tempdir().unwrap();
    // Small segments: flushes happen while points arrive.
    let env = [("THINGSD_DEVICES__ADMIN_KEY", ADMIN_KEY.to_string()), ("THINGSD_TELEMETRY__SEGMENT_POINTS", "200".to_string())];
    let spawn = |dir: std::path::PathBuf| {
        let env = env.clone();
        async move { common::process::spawn(&dir, &env).await }
    };
    let mut node = spawn(tmp.path().to_path_buf()).await;
    let http = client();
    let (_, token) = create_device(&http, node.http, "k9-1", json!({})).await;
    let mut d = device(node.addr, Protocol::V4, "k9-1", &token).await;
    let t0 = 1_790_000_000_000i64;
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(-1));
    let a2 = acked.clone();
    let publisher = tokio::spawn(async move {
        for i in 0..100_000i64 {
            let pkid = (i % 60_000 + 1) as u16;
            d.send(publish("devices/telemetry", QoS::AtLeastOnce, pkid, &format!(r#"{{"ts": {}, "n": {i}, "m": {i}}}"#, t0 + i))).await;
            match tokio::time::timeout(DEADLINE, d.recv_app()).await {
                Ok(Some(Packet::PubAck(a))) if a.pkid == pkid && a.code == 0 => a2.store(i, std::sync::atomic::Ordering::SeqCst),
                _ => return,
            }
        }
    });
    // Kill mid-stream, after enough points for several segment flushes.
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    while acked.load(std::sync::atomic::Ordering::SeqCst) < 1500 {
        assert!(tokio::time::Instant::now() < end, "publishing too slow");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    node.child.start_kill().unwrap();
    node.child.wait().await.unwrap();
    let _ = publisher.await;
    let last = acked.load(std::sync::atomic::Ordering::SeqCst);
    let node = spawn(tmp.path().to_path_buf()).await;
    let mut got = BTreeSet::new();
    let mut cursor = String::new();
    loop {
        let (s, v) = admin(
            &http,
            node.http,
            "GET",
            &format!("/api/v1/devices/k9-1/telemetry/history?from={t0}&to={}&keys=n&limit=10000{cursor}", t0 + 200_000),
            None,
        )
        .await;
        assert_eq!(s, 200, "{v}");
        got.extend(values_of(&v, "n").iter().map(|(_, v)| v.as_f64().unwrap() as i64));
        match v["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={}", urlencode(c)),
            None => break,
        }
    }
    eprintln!("got {} points, first {:?}, last {:?}", got.len(), got.iter().next(), got.iter().last());
    let missing: Vec<i64> = (0..=last).filter(|i| !got.contains(i)).take(10).collect();
    assert!(missing.is_empty(), "acknowledged points lost after kill -9 (last acked {last}): {missing:?}");
}

/// Fleet questions in one call each: a key's hourly mean over every device of a product (one
/// combined series, not one per device to add up), and the latest value of a key on each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn product_wide_aggregate_and_latest() {
    let p = Platform::start(None, |_| {}).await;
    let (s, prod) = p.admin("POST", "/api/v1/products", Some(json!({"name": "fleet", "strict": false}))).await;
    assert_eq!(s, 201, "{prod}");
    let pid = prod["id"].as_i64().unwrap();
    // One whole hour two hours ago: samples at its 10th, 20th and 30th minute.
    let hour = (thingsd::storage::meta::now_ms() - 7_200_000) / 3_600_000 * 3_600_000;
    let at = |m: i64| hour + m * 60_000;
    let mut tokens = Vec::new();
    for n in ["pw-1", "pw-2", "pw-3"] {
        tokens.push(p.create_device(n, json!({"product_id": pid})).await.1);
    }
    let (_, other) = p.create_device("pw-other", json!({})).await; // not of the product
    for (token, body) in [
        (&tokens[0], json!([{"ts": at(10), "values": {"temp": 10}}, {"ts": at(20), "values": {"temp": 20}}])),
        (&tokens[1], json!([{"ts": at(30), "values": {"temp": 30}}])),
        (&tokens[2], json!([{"ts": at(30), "values": {"hum": 40}}])),
        (&other, json!([{"ts": at(30), "values": {"temp": 1000}}])),
    ] {
        let r = p.http.post(format!("http://{}/api/v1/{token}/telemetry", p.http_addr())).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let range = format!("key=temp&window=1h&from={}&to={}", hour, hour + 3_600_000);
    let agg = |q: String| {
        let p = &p;
        async move { p.admin("GET", &format!("/api/v1/products/{pid}/telemetry/aggregate?{q}"), None).await }
    };
    for (func, want) in [("avg", 20.0), ("min", 10.0), ("max", 30.0), ("sum", 60.0), ("count", 3.0)] {
        let (s, v) = agg(format!("{range}&fn={func}&combine=true")).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["buckets"], json!([{"start": hour, "value": want, "devices": 2}]), "{func}: {v}");
    }
    let (s, v) = agg(format!("{range}&fn=last&combine=true")).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("invalid")), "{v}");
    // Without combine: one series per device, as before.
    let (_, v) = agg(format!("{range}&fn=avg")).await;
    assert_eq!(v["devices"], json!({"pw-1": [{"start": hour, "value": 15.0}], "pw-2": [{"start": hour, "value": 30.0}]}), "{v}");
    let (s, v) = p.admin("GET", &format!("/api/v1/products/{pid}/telemetry/latest?key=temp"), None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["devices"], json!({"pw-1": {"ts": at(20), "value": 20.0}, "pw-2": {"ts": at(30), "value": 30.0}}), "{v}");
}

/// History back-filled after its hours were rolled up (a device that was offline for days,
/// an import of old readings) gets its roll-ups at the next maintenance run: `source=rollup`
/// answers it like raw points do, not an empty list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_filled_history_is_rolled_up() {
    let p = Platform::start(None, |_| {}).await;
    let (_, token) = p.create_device("bf-1", json!({})).await;
    let h = 3_600_000;
    let now = thingsd::storage::meta::now_ms();
    // A first run: its window is the last two days; the watermark moves past them.
    let (s, rep) = p.admin("POST", "/api/v1/telemetry/maintenance", None).await;
    assert_eq!(s, 200, "{rep}");
    // Ten days ago (before the window) and five hours ago (inside the rolled-up window).
    for base in [(now - 10 * 86_400_000) / h * h, (now - 5 * h) / h * h] {
        let body = json!([{"ts": base + 60_000, "values": {"temp": 10}}, {"ts": base + 120_000, "values": {"temp": 30}}]);
        let r = p.http.post(format!("http://{}/api/v1/{token}/telemetry", p.http_addr())).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let (s, rep) = p.admin("POST", "/api/v1/telemetry/maintenance", None).await;
    assert_eq!(s, 200, "{rep}");
    for f in ["avg", "min", "max", "count", "sum"] {
        let path = |src: &str| {
            format!(
                "/api/v1/devices/bf-1/telemetry/aggregate?key=temp&from={}&to={}&window=1h&fn={f}&source={src}",
                now - 11 * 86_400_000,
                now
            )
        };
        let (_, raw) = p.admin("GET", &path("raw"), None).await;
        let (s, rolled) = p.admin("GET", &path("rollup"), None).await;
        assert_eq!(s, 200, "{rolled}");
        assert_eq!(raw["buckets"].as_array().map(Vec::len), Some(2), "{raw}");
        assert_eq!(rolled["buckets"], raw["buckets"], "{f}: roll-ups of back-filled hours");
    }
}
