//! `webhooks`: what VerneMQ-shaped broker webhooks cost on the publish path. The fan-in
//! scenario (`--publishers` anonymous clients → 1 subscriber) runs on a fresh thingsd node per
//! configuration: no webhooks; `on_publish` (a notification, sent off the publish path in
//! batches); `auth_on_publish` (asked before every PUBLISH is accepted), without and with
//! `cache-control: max-age` on its answers (a cached answer stands for the client, topic, QoS
//! and retain flag whatever the payload, as in VerneMQ). The endpoint is a minimal keep-alive HTTP server in this
//! process answering `{"result": "ok"}` at once, so the figures are thingsd's own cost of a
//! hook, not a slow endpoint's.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::{brokers, Opts, Row};

/// Answer every POST with `{"result":"ok"}`; count them.
async fn endpoint() -> anyhow::Result<(std::net::SocketAddr, Arc<AtomicU64>)> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            let h = h.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(s);
                let mut line = String::new();
                loop {
                    // Request line and headers; a path ending in `/cached` gets a cacheable answer.
                    let mut len = 0usize;
                    let mut cached = false;
                    let mut first = true;
                    loop {
                        line.clear();
                        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let t = line.trim_end();
                        if t.is_empty() {
                            break;
                        }
                        if std::mem::take(&mut first) {
                            cached = t.split(' ').nth(1).is_some_and(|p| p.ends_with("/cached"));
                            continue;
                        }
                        if let Some((k, v)) = t.split_once(':') {
                            if k.eq_ignore_ascii_case("content-length") {
                                len = v.trim().parse().unwrap_or(0);
                            }
                        }
                    }
                    let mut body = vec![0u8; len.min(16 << 20)];
                    if r.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    h.fetch_add(1, Ordering::Relaxed);
                    // One write (two would meet Nagle and delayed ACKs: 40 ms a request).
                    let answer = "{\"result\":\"ok\"}";
                    let cache = if cached { "cache-control: max-age=300\r\n" } else { "" };
                    let out = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{cache}content-length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    if r.get_mut().write_all(out.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok((addr, hits))
}

pub async fn run(o: &Opts) -> anyhow::Result<()> {
    let (addr, hits) = endpoint().await?;
    let url = format!("http://{addr}/hook");
    let configs: [(&str, String); 4] = [
        ("no webhooks", String::new()),
        ("on_publish", format!(r#"[{{hook="on_publish", endpoint="{url}"}}]"#)),
        ("auth_on_publish", format!(r#"[{{hook="auth_on_publish", endpoint="{url}"}}]"#)),
        ("auth_on_publish cached", format!(r#"[{{hook="auth_on_publish", endpoint="{url}/cached"}}]"#)),
    ];
    println!("\n== webhooks: fan-in {} -> 1, {} messages, QoS {}, endpoint answering at once", o.publishers, o.messages, o.qos as u8);
    println!("{:<24} {:>12} {:>9} {:>9} {:>8} {:>12} {:>12}", "webhooks", "msgs/s", "p50 ms", "p99 ms", "lost", "hook calls", "vs none");
    let mut base: Option<f64> = None;
    for (name, hooks) in configs {
        let env = if hooks.is_empty() { vec![] } else { vec![("THINGSD_WEBHOOKS", hooks)] };
        let (mut b, _http) = brokers::start_platform(o.publishers + 10, &env).await.context("start thingsd")?;
        b.name = name.to_string();
        let before = hits.load(Ordering::Relaxed);
        let r: anyhow::Result<Row> = crate::fanin(o, &b).await;
        // Notifications may still be on their way: give the queue a moment to drain.
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut calls = hits.load(Ordering::Relaxed) - before;
        while name == "on_publish" && calls < o.messages && std::time::Instant::now() < end {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            calls = hits.load(Ordering::Relaxed) - before;
        }
        b.stop().await;
        let r = r?;
        let ratio = match base {
            None => {
                base = Some(r.rate);
                "1.00x".to_string()
            }
            Some(x) => format!("{:.2}x", r.rate / x),
        };
        println!("{:<24} {:>12.0} {:>9.2} {:>9.2} {:>8} {:>12} {:>12}", name, r.rate, r.p50, r.p99, r.lost, calls, ratio);
    }
    println!("(on_publish: one request per notification, sent concurrently off the publish path; a full queue drops and counts them)");
    Ok(())
}
