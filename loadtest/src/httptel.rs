//! `httptelemetry`: telemetry over the HTTP device API into the embedded store, end to end.
//!
//! D devices, C keep-alive HTTP/1.1 connections; each request posts one device's array of S
//! samples of K keys (`[{"ts":…, "values":{…}}, …]`), and its 200 means the points are stored
//! (durability `written`). Reports points/s, the node's CPU per point, its RSS at the end and
//! after the WAL drained into segments, and how many points the node wrote (stored =
//! acknowledged, from `/metrics`).
use std::net::SocketAddr;
use std::time::Instant;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::brokers;

pub struct Opts {
    pub devices: usize,
    pub connections: usize,
    pub points: u64,
    pub samples: usize,
    pub keys: usize,
}

/// A keep-alive HTTP/1.1 connection: POST a body, read the status and the body.
struct Conn(BufReader<TcpStream>);

impl Conn {
    async fn open(http: SocketAddr) -> anyhow::Result<Conn> {
        let s = TcpStream::connect(http).await?;
        s.set_nodelay(true)?;
        Ok(Conn(BufReader::new(s)))
    }

    async fn call(&mut self, method: &str, path: &str, auth: Option<&str>, body: &str) -> anyhow::Result<(u16, String)> {
        let auth = auth.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let s = self.0.get_mut();
        s.write_all(req.as_bytes()).await?;
        s.write_all(body.as_bytes()).await?;
        let mut line = String::new();
        self.0.read_line(&mut line).await?;
        let status: u16 = line.split_whitespace().nth(1).context("no HTTP status")?.parse()?;
        let mut len = 0usize;
        loop {
            line.clear();
            if self.0.read_line(&mut line).await? == 0 {
                bail!("connection closed in the headers");
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse()?;
                }
            }
        }
        let mut b = vec![0; len];
        self.0.read_exact(&mut b).await?;
        Ok((status, String::from_utf8_lossy(&b).into_owned()))
    }
}

/// A counter's value from a Prometheus text page.
fn counter(page: &str, name: &str) -> Option<f64> {
    page.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' ')).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

pub async fn run(o: &Opts) -> anyhow::Result<()> {
    let (b, http) = brokers::start_platform(10, &[]).await?;
    let pid = b.pid().context("node pid")?;
    let mut admin = Conn::open(http).await?;
    let key = Some(brokers::ADMIN_KEY);
    let mut tokens = Vec::with_capacity(o.devices);
    for k in 0..o.devices {
        let (st, body) = admin.call("POST", "/api/v1/devices", key, &format!(r#"{{"device_number":"lt-http-{k}"}}"#)).await?;
        if st / 100 != 2 {
            bail!("create device: {st} {body}");
        }
        let v: serde_json::Value = serde_json::from_str(&body)?;
        tokens.push(v["access_token"].as_str().context("access_token")?.to_string());
    }
    let per_req = (o.samples * o.keys) as u64;
    let requests = o.points.div_ceil(per_req);
    println!(
        "\n== telemetry over HTTP: {} devices, {} connections, {requests} requests of {} samples x {} keys ({} points) -> stored",
        o.devices,
        o.connections,
        o.samples,
        o.keys,
        requests * per_req
    );
    let rss0 = b.rss_kib().unwrap_or(0);
    let cpu0 = crate::brokers::cpu_secs(pid);
    // Samples one second apart, ending about now (the node refuses far-off timestamps).
    let t0 = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64
        - (requests as i64 / o.devices as i64 + 1) * o.samples as i64 * 1000;
    let start = Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let tokens = std::sync::Arc::new(tokens);
    let mut tasks = Vec::new();
    for _ in 0..o.connections {
        let (next, tokens) = (next.clone(), tokens.clone());
        let (samples, keys) = (o.samples, o.keys);
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::open(http).await?;
            let mut busy = 0u64;
            loop {
                let r = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if r >= requests {
                    return anyhow::Ok(busy);
                }
                let dev = (r as usize) % tokens.len();
                // Each device's samples continue where its previous request ended.
                let base = t0 + (r / tokens.len() as u64) as i64 * samples as i64 * 1000;
                let mut body = String::with_capacity(samples * keys * 24);
                body.push('[');
                for s in 0..samples {
                    if s > 0 {
                        body.push(',');
                    }
                    body.push_str(&format!(r#"{{"ts":{},"values":{{"#, base + s as i64 * 1000));
                    for k in 0..keys {
                        if k > 0 {
                            body.push(',');
                        }
                        body.push_str(&format!(r#""k{k}":{}.{}"#, (r + s as u64) % 1000, k));
                    }
                    body.push_str("}}");
                }
                body.push(']');
                let path = format!("/api/v1/{}/telemetry", tokens[dev]);
                loop {
                    let (st, text) = c.call("POST", &path, None, &body).await?;
                    match st {
                        200 => break,
                        503 | 429 => busy += 1, // busy: send the same request again
                        _ => bail!("telemetry POST: {st} {text}"),
                    }
                }
            }
        }));
    }
    let mut busy = 0;
    for t in tasks {
        busy += t.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = crate::brokers::cpu_secs(pid) - cpu0;
    let rss_end = b.rss_kib().unwrap_or(0);
    let sent = requests * per_req;
    let (_, page) = admin.call("GET", "/metrics", None, "").await?;
    let written = counter(&page, "thingsd_telemetry_points_written_total").unwrap_or(f64::NAN);
    // The WAL drains into segments on its own (by time): RSS once it has.
    let mut rss_later = rss_end;
    for _ in 0..30 {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        rss_later = b.rss_kib().unwrap_or(0);
    }
    println!("{:<28} {:>14}", "points acknowledged", sent);
    println!("{:<28} {:>14}", "points written (/metrics)", written);
    println!("{:<28} {:>14.0}", "points/s", sent as f64 / secs);
    println!("{:<28} {:>14.3}", "node CPU us per point", cpu * 1e6 / sent as f64);
    println!("{:<28} {:>14}", "busy answers (resent)", busy);
    println!("{:<28} {:>14.1}", "node RSS before (MB)", rss0 as f64 / 1024.0);
    println!("{:<28} {:>14.1}", "node RSS at the end (MB)", rss_end as f64 / 1024.0);
    println!("{:<28} {:>14.1}", "node RSS 30 s later (MB)", rss_later as f64 / 1024.0);
    b.stop().await;
    Ok(())
}
