//! Persistent sessions: QoS throughput to a persistent subscriber (every message stored before
//! it is acknowledged, in thingsd), and restart at scale (N persistent sessions with
//! subscriptions and queued messages, the node killed with SIGKILL and started again: time
//! until a restored session is served, RSS, and whether the queued messages are there).
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::{brokers, client, merge, Opts, Row, IDLE};

/// 1 -> 1 like `pubsub`, the subscriber a persistent session (3.1.1, clean session 0).
pub async fn pubsub(o: &Opts, b: &brokers::Broker) -> anyhow::Result<Row> {
    let base = Instant::now();
    let mut s = client::connect(b.addr, None, "lt-psub", false).await?;
    client::subscribe(&mut s, "bench/p", o.qos).await?;
    let p = client::connect(b.addr, None, "lt-ppub", true).await?;
    let rx = tokio::spawn(client::receive(s, o.messages, IDLE, base));
    let start = Instant::now();
    client::publish_all(p, 0, "bench/p", o.qos, o.messages, o.window, o.payload, base).await?;
    Ok(merge(vec![(rx.await??, o.messages)], &b.name, start))
}

const QUEUED: u64 = 3;

/// `o.connections` persistent sessions (each subscribed to `rs/all` and its own `rs/{k}`,
/// then away), `QUEUED` messages queued for each, SIGKILL, start again.
pub async fn restart(o: &Opts, b: &mut brokers::Broker) -> anyhow::Result<Row> {
    let n = o.connections;
    let start = Instant::now();
    let mut i = 0usize;
    let mut failed = 0usize;
    while i < n {
        let batch: Vec<_> = (i..(i + 200).min(n))
            .map(|k| {
                let src: IpAddr = format!("127.0.0.{}", 2 + k % 200).parse().unwrap();
                let (addr, qos) = (b.addr, o.qos);
                tokio::spawn(async move {
                    let mut s = client::connect(addr, Some(src), &format!("rs-{k}"), false).await?;
                    client::subscribe(&mut s, "rs/all", qos).await?;
                    client::subscribe(&mut s, &format!("rs/{k}"), qos).await?;
                    anyhow::Ok(())
                })
            })
            .collect();
        for t in batch {
            if !matches!(t.await, Ok(Ok(()))) {
                failed += 1;
            }
        }
        i += 200;
    }
    let made = start.elapsed();
    let p = client::connect(b.addr, None, "rs-pub", true).await?;
    let queued_at = Instant::now();
    client::publish_all(p, 0, "rs/all", o.qos, QUEUED, 1, o.payload, Instant::now()).await?;
    let queued = queued_at.elapsed();
    let rss_before = b.rss_kib().unwrap_or(0);
    let du_before = dir_kib(&b.dir);
    b.kill().await;
    let t0 = Instant::now();
    b.start_again().await?;
    // Served: a restored session's CONNECT is answered (listeners accept only once every
    // session is restored).
    // One CONNECT, answered when the node serves (a second one would take the session over).
    let mut first = tokio::time::timeout(Duration::from_secs(600), client::connect(b.addr, None, "rs-0", false))
        .await
        .context("not serving 10 minutes after the restart")??;
    let ready = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = b.rss_kib().unwrap_or(0);
    // The queued messages are there: the first session's, and a sample of others.
    let mut lost = 0u64;
    let got = client::receive_n(&mut first, QUEUED, Duration::from_secs(5)).await.context("first session")?;
    lost += QUEUED.saturating_sub(got);
    for k in (1..n).step_by((n / 50).max(1)) {
        let mut s = client::connect(b.addr, None, &format!("rs-{k}"), false).await?;
        lost += QUEUED.saturating_sub(client::receive_n(&mut s, QUEUED, Duration::from_secs(5)).await?);
    }
    Ok(Row {
        broker: b.name.clone(),
        rate: n as f64 / made.as_secs_f64(),
        p50: f64::NAN,
        p99: f64::NAN,
        max: f64::NAN,
        lost,
        dup: 0,
        extra: format!(
            "{n} sessions ({failed} failed) made in {made:.1?}, {QUEUED} queued each in {queued:.1?}; state on disk {du_before} KiB; \
             RSS before the kill {rss_before} KiB; after SIGKILL serving again in {ready:.2?}, RSS {rss_after} KiB"
        ),
    })
}

fn dir_kib(dir: &std::path::Path) -> u64 {
    fn walk(p: &std::path::Path) -> u64 {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.flatten()
                    .map(|e| match e.metadata() {
                        Ok(m) if m.is_dir() => walk(&e.path()),
                        Ok(m) => m.len(),
                        Err(_) => 0,
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(&dir.join("data").join("state")) / 1024
}
