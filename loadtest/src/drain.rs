//! `drain` / `drainkill`: a node of three holding N persistent sessions stops — gracefully
//! (SIGTERM, a rolling upgrade's step) or by SIGKILL — and every client reconnects at once to
//! one of the two other nodes, as devices behind a load balancer do. Measures how long the
//! node takes to stop, how long until every client is back with its session (Session Present,
//! its subscription still routed), each reconnect's CONNECT → CONNACK, and the survivors' CPU.
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use thingsd::protocols::mqtt::QoS;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::{brokers, client, pct, ClusterReport, Opts, Row};

/// How long a client keeps trying to reconnect before the run gives up on it.
const GIVE_UP: Duration = Duration::from_secs(180);

/// One client's way back: when its connection closed and when it was back (since the stop
/// began), its last CONNECT → CONNACK, Session Present, refused or failed attempts.
struct Back {
    closed: Duration,
    back: Duration,
    connect: Duration,
    present: bool,
    retries: u32,
    /// Why the first failed attempt failed, if one did.
    why: Option<String>,
    stream: TcpStream,
}

fn source(i: usize) -> IpAddr {
    format!("127.0.0.{}", 2 + i % 200).parse().expect("loopback address")
}

/// Wait until the server closes `s` (EOF, reset, or a DISCONNECT followed by the close).
async fn closed(mut s: TcpStream) {
    let mut buf = [0u8; 256];
    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
}

/// Reconnect `id` (persistent session) to `to`, retrying refused or failed attempts with a
/// capped exponential back-off, like a device SDK.
async fn reconnect(to: SocketAddr, src: IpAddr, id: &str, t0: Instant) -> anyhow::Result<(Duration, bool, u32, Option<String>, TcpStream)> {
    let mut retries = 0;
    let mut backoff = Duration::from_millis(100);
    let mut why = None;
    loop {
        let t = Instant::now();
        match tokio::time::timeout(Duration::from_secs(30), client::connect_session(to, Some(src), id, false, None)).await {
            Ok(Ok((s, present))) => return Ok((t.elapsed(), present, retries, why, s)),
            _ if t0.elapsed() > GIVE_UP => anyhow::bail!("{id} not back after {GIVE_UP:?}"),
            r => {
                why.get_or_insert_with(|| match r {
                    Ok(Err(e)) => format!("{e:#}").chars().take(60).collect(),
                    _ => "no CONNACK within 30 s".into(),
                });
                retries += 1;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// The node's CONNACK counts by reason (its Prometheus endpoint), without the successes.
async fn refusals(http: Option<SocketAddr>) -> String {
    use tokio::io::AsyncWriteExt;
    let Some(addr) = http else { return String::new() };
    let mut body = String::new();
    if let Ok(mut s) = TcpStream::connect(addr).await {
        let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: node\r\n\r\n").await;
        let _ = s.read_to_string(&mut body).await;
    }
    let lines: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("thingsd_mqtt_connacks_total{") && !l.contains("reason=\"success\""))
        .map(|l| l.trim_start_matches("thingsd_mqtt_connacks_total"))
        .collect();
    lines.join(" ")
}

pub async fn run(o: &Opts, kill: bool) -> anyhow::Result<ClusterReport> {
    let n = o.connections;
    let mut nodes = brokers::start_cluster_with(3, n, &[]).await?;
    let a = nodes[0].broker.addr;
    let others = [nodes[1].broker.addr, nodes[2].broker.addr];
    // Fill node A: persistent sessions, each subscribed to its own topic (a device's commands).
    let gate = Arc::new(tokio::sync::Semaphore::new(200));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let gate = gate.clone();
            tokio::spawn(async move {
                let _p = gate.acquire_owned().await?;
                let mut s = client::connect(a, Some(source(i)), &format!("lt-drain-{i}"), false).await?;
                client::subscribe(&mut s, &format!("drain/{i}"), QoS::AtLeastOnce).await?;
                anyhow::Ok(s)
            })
        })
        .collect();
    let mut conns = Vec::with_capacity(n);
    for t in tasks {
        conns.push(t.await??);
    }
    tokio::time::sleep(Duration::from_secs(o.pause)).await;
    let cpu = |nodes: &[brokers::ClusterNode]| nodes.iter().map(|b| b.broker.pid().map_or(0.0, brokers::cpu_secs)).collect::<Vec<_>>();
    let before = cpu(&nodes);
    // The stop: every client waits for its connection to close, then reconnects to B or C.
    let t0 = Instant::now();
    let backs: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            tokio::spawn(async move {
                closed(s).await;
                let closed = t0.elapsed();
                let (connect, present, retries, why, stream) = reconnect(others[i % 2], source(i), &format!("lt-drain-{i}"), t0).await?;
                anyhow::Ok(Back { closed, back: t0.elapsed(), connect, present, retries, why, stream })
            })
        })
        .collect();
    let stopped = if kill {
        nodes[0].broker.kill().await;
        t0.elapsed()
    } else {
        nodes[0].terminate().await.context("node A was not running")?
    };
    let mut back = Vec::with_capacity(n);
    for t in backs {
        back.push(t.await??);
    }
    let all_back = t0.elapsed();
    let spent: Vec<f64> = cpu(&nodes).iter().zip(&before).map(|(x, y)| x - y).collect();
    let refused = [refusals(nodes[1].ready.http).await, refusals(nodes[2].ready.http).await];
    // Every session kept its subscription: one message to each of 100 spread topics,
    // published on node B, reaches its client wherever it reconnected.
    let mut p = client::connect(others[0], None, "lt-drain-pub", true).await?;
    let probe: Vec<usize> = (0..100).map(|k| k * n / 100).collect();
    for &i in &probe {
        client::publish_one(&mut p, &format!("drain/{i}"), QoS::AtLeastOnce, (i % 60000 + 1) as u16, b"probe").await?;
    }
    let mut lost = 0;
    for &i in &probe {
        if !client::received_within(&mut back[i].stream, Duration::from_secs(5)).await {
            lost += 1;
        }
    }
    for node in nodes.into_iter().skip(1) {
        node.broker.stop().await;
    }
    let us = |d: Duration| d.as_micros() as u32;
    let mut connect: Vec<u32> = back.iter().map(|b| us(b.connect)).collect();
    let mut gone: Vec<u32> = back.iter().map(|b| us(b.closed)).collect();
    let mut returned: Vec<u32> = back.iter().map(|b| us(b.back)).collect();
    let present = back.iter().filter(|b| b.present).count();
    let retries: u32 = back.iter().map(|b| b.retries).sum();
    let mut whys: std::collections::BTreeMap<&str, usize> = Default::default();
    for w in back.iter().filter_map(|b| b.why.as_deref()) {
        *whys.entry(w).or_default() += 1;
    }
    let mut whys: Vec<(&str, usize)> = whys.into_iter().collect();
    whys.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    whys.truncate(3);
    let slow = back.iter().filter(|b| b.connect >= Duration::from_secs(10)).count();
    // A few client ids of each kind, to look them up in the nodes' logs (`LOADTEST_KEEP=1`).
    let some = |f: &dyn Fn(&Back) -> bool| {
        back.iter().enumerate().filter(|(_, b)| f(b)).take(3).map(|(i, _)| format!("lt-drain-{i}")).collect::<Vec<_>>()
    };
    let (fresh_ids, slow_ids) = (some(&|b| !b.present), some(&|b| b.connect >= Duration::from_secs(10)));
    let row = |name: &str, v: &mut Vec<u32>| Row {
        broker: name.into(),
        rate: f64::NAN,
        p50: pct(v, 0.5),
        p99: pct(v, 0.99),
        max: pct(v, 1.0),
        lost: 0,
        dup: 0,
        extra: String::new(),
    };
    let mut rows = vec![
        row("CONNECT -> CONNACK", &mut connect),
        row("closed (since the stop)", &mut gone),
        row("back (since the stop)", &mut returned),
    ];
    rows[0].lost = lost;
    let how = if kill { "SIGKILL" } else { "SIGTERM" };
    Ok(ClusterReport {
        title: format!(
            "{}: {n} persistent sessions on node A of 3; {how} {} s after the last SUBACK, every client reconnects to B or C",
            if kill { "drainkill" } else { "drain" },
            o.pause
        ),
        rows,
        notes: vec![
            format!("(lost: of 100 probes published on node B after all were back; times in ms)"),
            format!(
                "node A exited {:.1} s after {how}; all {n} back after {:.1} s; Session Present {present} of {n}; {retries} refused or failed attempts; {slow} CONNACKs took 10 s or more",
                stopped.as_secs_f64(),
                all_back.as_secs_f64()
            ),
            format!("CPU of the survivors from the stop until all were back: B {:.1} s, C {:.1} s", spent[1], spent[2]),
            format!("e.g. without their session: {fresh_ids:?}; slow: {slow_ids:?}"),
            format!("first failed attempt of a client, most common: {whys:?}"),
            format!("CONNACK refusals: B {}; C {}", refused[0], refused[1]),
        ],
    })
}
