//! `devices`: what the device platform costs on top of the broker, on one node in one run.
//!
//! - CONNECT rate of N devices logging in with their access tokens, first with a cold identity
//!   cache (each login reads the meta store), then again with a warm one, against N anonymous
//!   clients on the same node.
//! - Uplink: P devices publish JSON telemetry on `devices/telemetry` (ACL check, JSON parse,
//!   device event, user property) against P anonymous clients publishing the same payloads on
//!   plain topics; one subscriber counts what arrives.
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use thingsd::protocols::mqtt::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{brokers, client, merge, Row};

/// One admin API call over a fresh HTTP/1.1 connection: the JSON answer.
async fn request(http: SocketAddr, method: &str, path: &str, body: &str) -> anyhow::Result<serde_json::Value> {
    let mut s = TcpStream::connect(http).await?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        brokers::ADMIN_KEY,
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out);
    let (head, json) = text.split_once("\r\n\r\n").context("no HTTP body")?;
    if !(head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.1 201")) {
        bail!("admin API: {head} {json}");
    }
    Ok(serde_json::from_str(json)?)
}

pub async fn post(http: SocketAddr, path: &str, body: &str) -> anyhow::Result<serde_json::Value> {
    request(http, "POST", path, body).await
}

async fn get(http: SocketAddr, path: &str) -> anyhow::Result<serde_json::Value> {
    request(http, "GET", path, "").await
}

/// Connect `n` clients (200 at a time over 127.0.0.x sources); `tokens[k]` logs client k in.
async fn connect_all(addr: SocketAddr, n: usize, prefix: &str, tokens: Option<&[String]>) -> anyhow::Result<(Vec<TcpStream>, f64)> {
    let start = Instant::now();
    let mut conns = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let batch: Vec<_> = (i..(i + 200).min(n))
            .map(|k| {
                let src: std::net::IpAddr = format!("127.0.0.{}", 2 + k % 200).parse().unwrap();
                let id = format!("{prefix}-{k}");
                let user = tokens.map(|t| t[k].clone());
                tokio::spawn(async move { client::connect_as(addr, Some(src), &id, true, user.as_deref()).await })
            })
            .collect();
        for t in batch {
            conns.push(t.await??);
        }
        i += 200;
    }
    Ok((conns, n as f64 / start.elapsed().as_secs_f64()))
}

/// P publishers (streams with their topics) → one subscriber of `filter`: messages/s.
async fn uplink(
    addr: SocketAddr,
    pubs: Vec<(TcpStream, String)>,
    filter: &str,
    qos: QoS,
    per: u64,
    window: usize,
    name: &str,
) -> anyhow::Result<Row> {
    let base = Instant::now();
    let mut s = client::connect(addr, None, &format!("lt-sub-{name}"), true).await?;
    client::subscribe(&mut s, filter, qos).await?;
    let expected = per * pubs.len() as u64;
    let rx = tokio::spawn(client::receive(s, expected, Duration::from_secs(5), base));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, (p, topic)) in pubs.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move { client::publish_all(p, i as u32, &topic, qos, per, window, client::JSON, base).await }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(merge(vec![(rx.await??, expected)], name, start))
}

pub async fn run(devices: usize, publishers: usize, messages: u64, window: usize, qos: QoS) -> anyhow::Result<()> {
    let devices = devices.max(publishers);
    let (b, http) = brokers::start_platform(devices * 2 + 10, &[]).await?;
    let t0 = Instant::now();
    let mut tokens = Vec::with_capacity(devices);
    for k in 0..devices {
        let v = post(http, "/api/v1/devices", &format!(r#"{{"device_number":"lt-dev-{k}"}}"#)).await?;
        tokens.push(v["access_token"].as_str().context("access_token")?.to_string());
    }
    let created = devices as f64 / t0.elapsed().as_secs_f64();

    // Token logins first: the node's first fill is of authenticated device connections, and
    // its RSS per connection is measured there (every device: identity, ACL, status, session).
    let before = b.settled_rss_kib().await.unwrap_or(0);
    let (cold, cold_rate) = connect_all(b.addr, devices, "lt-dev", Some(&tokens)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = b.rss_kib().unwrap_or(0);
    let per_device = after.saturating_sub(before) as f64 / devices.max(1) as f64;
    drop(cold);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (anon, anon_rate) = connect_all(b.addr, devices, "lt-anon", None).await?;
    drop(anon);
    // The broker notices the closed sockets; give it a moment so the warm round is not a takeover storm.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (warm, warm_rate) = connect_all(b.addr, devices, "lt-dev", Some(&tokens)).await?;

    let per = messages / publishers as u64;
    let dev_pubs: Vec<_> = warm.into_iter().take(publishers).map(|s| (s, "devices/telemetry".to_string())).collect();
    let dev = uplink(b.addr, dev_pubs, "devices/telemetry", qos, per, window, "device uplink").await?;
    let (anon, _) = connect_all(b.addr, publishers, "lt-plain", None).await?;
    let plain_pubs: Vec<_> = anon.into_iter().enumerate().map(|(i, s)| (s, format!("plain/{i}/telemetry"))).collect();
    let plain = uplink(b.addr, plain_pubs, "plain/+/telemetry", qos, per, window, "plain topic").await?;
    b.stop().await;

    println!("\n== devices: {devices} devices (admin API create {created:.0}/s), QoS {}", qos as u8);
    println!("{:<28} {:>12}", "login", "connects/s");
    println!("{:<28} {:>12.0}", "anonymous", anon_rate);
    println!("{:<28} {:>12.0}", "token, cold cache (SQLite)", cold_rate);
    println!("{:<28} {:>12.0}", "token, warm cache", warm_rate);
    println!("ratio warm-token/anonymous: {:.2}x; cold/anonymous: {:.2}x", warm_rate / anon_rate, cold_rate / anon_rate);
    println!("RSS per device connection (first fill, token logins): {before} -> {after} KiB = {per_device:.2} KiB");
    println!(
        "\n{:<16} {:>12} {:>9} {:>9} {:>9} {:>8} {:>6}   ({publishers} publishers x {per} JSON messages)",
        "uplink", "msgs/s", "p50 ms", "p99 ms", "max ms", "lost", "dup"
    );
    for r in [&dev, &plain] {
        println!("{:<16} {:>12.0} {:>9.2} {:>9.2} {:>9.2} {:>8} {:>6}", r.broker, r.rate, r.p50, r.p99, r.max, r.lost, r.dup);
    }
    println!("ratio device uplink/plain topic: {:.2}x", dev.rate / plain.rate);
    Ok(())
}

/// `telemetry`: devices over MQTT → stored, end to end. P devices publish M messages of the
/// five fleet keys each (QoS 1, window W); a PUBACK means the points are in the store
/// (durability `written`), so the time until the last PUBACK is the time to store them all.
/// Run on the embedded store and, when a PostgreSQL URL is given, on PostgreSQL; once per
/// count in `rules`: that many alert rules on the devices' product (every reading is evaluated
/// by every rule; none fires), the rate with rules against the rate without as a ratio.
pub async fn telemetry(publishers: usize, messages: u64, window: usize, pg: Option<String>, rules: &[usize]) -> anyhow::Result<()> {
    let per = (messages / publishers as u64).max(1);
    let mut stores = vec![("embedded".to_string(), String::new())];
    if let Some(u) = pg {
        stores.push(("postgres".into(), u));
    }
    println!("\n== telemetry end to end: {publishers} devices x {per} messages x 5 keys over MQTT (QoS 1, window {window}) -> stored");
    println!("{:<10} {:>6} {:>12} {:>14} {:>12} {:>14}", "store", "rules", "msgs/s", "points/s", "stored?", "vs 0 rules");
    for (name, url) in stores {
        let mut without = None;
        for &n_rules in rules {
            let rate = telemetry_run(publishers, per, window, &name, &url, n_rules).await?;
            let base = *without.get_or_insert(if n_rules == 0 { rate.0 } else { f64::NAN });
            let ratio = if base.is_nan() { "-".to_string() } else { format!("{:.2}x", rate.0 / base) };
            println!("{:<10} {:>6} {:>12.0} {:>14.0} {:>12} {:>14}", name, n_rules, rate.0, rate.0 * 5.0, rate.1, ratio);
        }
    }
    Ok(())
}

/// One telemetry run on a fresh node: (msgs/s, whether the spot check found every point).
async fn telemetry_run(
    publishers: usize,
    per: u64,
    window: usize,
    store: &str,
    url: &str,
    n_rules: usize,
) -> anyhow::Result<(f64, String)> {
    let mut env = vec![("THINGSD_TELEMETRY__STORE", url.to_string())];
    if store == "postgres" {
        env.push(("THINGSD_TELEMETRY__WRITERS", "4".to_string()));
    }
    let (b, http) = brokers::start_platform(publishers + 10, &env).await?;
    let product = post(http, "/api/v1/products", r#"{"name":"lt-fleet"}"#).await?;
    let pid = product["id"].as_i64().context("product id")?;
    let mut tokens = Vec::with_capacity(publishers);
    for k in 0..publishers {
        let v = post(http, "/api/v1/devices", &format!(r#"{{"device_number":"lt-tel-{k}","product_id":{pid}}}"#)).await?;
        tokens.push(v["access_token"].as_str().context("access_token")?.to_string());
    }
    // Rules of the shapes people write: thresholds, some with a duration and a clear
    // condition, a range, a rate of change; none is met by the fleet's readings.
    for r in 0..n_rules {
        let spec = match r % 4 {
            0 => serde_json::json!({"key": "voltage", "op": ">", "value": 1e9}),
            1 => serde_json::json!({"key": "temperature", "op": "between", "value": [1e6, 2e6]}),
            2 => serde_json::json!({"all": [{"key": "current", "op": ">", "value": 1e9}, {"key": "power", "op": "<", "value": -1e9}]}),
            _ => serde_json::json!({"key": "energy", "op": "<", "value": -1e9}),
        };
        let mut rule = serde_json::json!({"name": format!("lt-rule-{r}"), "target": {"product": pid}, "condition": spec});
        if r % 2 == 1 {
            rule["duration_secs"] = 60.into();
            rule["clear"] = serde_json::json!({"key": "voltage", "op": "<", "value": 0});
        }
        post(http, "/api/v1/alert-rules", &rule.to_string()).await?;
    }
    // The rules' actors run before the clock starts.
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let running = match n_rules {
            0 => 0,
            _ => get(http, "/admin/v1/actors?kind=alert&limit=100000").await?["items"].as_array().map_or(0, |l| l.len()),
        };
        if running >= n_rules {
            break;
        }
        if Instant::now() > end {
            bail!("{running} of {n_rules} alert rules running after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (conns, _) = connect_all(b.addr, publishers, "lt-tel", Some(&tokens)).await?;
    let base = Instant::now();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, s) in conns.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            client::publish_all(s, i as u32, "devices/telemetry", QoS::AtLeastOnce, per, window, client::TELEMETRY, base).await
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    let msgs = per * publishers as u64;
    // Spot check: the last device's history holds every point it sent.
    let h = get(
        http,
        &format!(
            "/api/v1/devices/lt-tel-{}/telemetry/history?keys=voltage&from=1700000000000&to=1800000000000&limit=10000",
            publishers - 1
        ),
    )
    .await?;
    let n = h["points"].as_array().map_or(0, |a| a.len()) as u64;
    let stored = if n == per.min(10_000) { "yes".to_string() } else { format!("{n} of {per}") };
    b.stop().await;
    Ok((msgs as f64 / secs, stored))
}
