//! thingsd load generator: publish/subscribe, fan-in, fan-out and idle-connection scenarios,
//! run against thingsd and (with --compare) Mosquitto or rumqttd in the same run.
mod brokers;
mod client;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use thingsd::protocols::mqtt::QoS;

#[derive(Clone)]
struct Opts {
    brokers: Vec<String>,
    scenarios: Vec<String>,
    qos: QoS,
    messages: u64,
    publishers: usize,
    subscribers: usize,
    connections: usize,
    payload: usize,
    window: usize,
}

const USAGE: &str = "usage: loadtest [--broker thingsd|HOST:PORT] [--compare mosquitto,rumqttd] [--scenario pubsub,fanin,fanout,idle]
                [--qos 0|1|2] [--messages N] [--publishers N] [--subscribers N] [--connections N] [--payload BYTES] [--window N]";

fn parse() -> anyhow::Result<Opts> {
    let mut o = Opts {
        brokers: vec!["thingsd".into()],
        scenarios: vec!["pubsub".into()],
        qos: QoS::AtLeastOnce,
        messages: 200_000,
        publishers: 100,
        subscribers: 100,
        connections: 19_000,
        payload: 64,
        window: 100,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value\n{USAGE}"));
        match a.as_str() {
            "--broker" => o.brokers[0] = val()?,
            "--compare" => o.brokers.extend(val()?.split(',').map(String::from)),
            "--scenario" => o.scenarios = val()?.split(',').map(String::from).collect(),
            "--qos" => o.qos = QoS::from_u8(val()?.parse()?).context("qos 0..2")?,
            "--messages" => o.messages = val()?.parse()?,
            "--publishers" => o.publishers = val()?.parse()?,
            "--subscribers" => o.subscribers = val()?.parse()?,
            "--connections" => o.connections = val()?.parse()?,
            "--payload" => o.payload = val()?.parse()?,
            "--window" => o.window = val()?.parse()?,
            _ => bail!("unknown argument {a}\n{USAGE}"),
        }
    }
    if o.scenarios == ["all"] {
        o.scenarios = vec!["pubsub".into(), "fanin".into(), "fanout".into(), "idle".into()];
    }
    Ok(o)
}

fn raise_fd_limit() -> u64 {
    unsafe {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
            return r.rlim_cur;
        }
    }
    0
}

struct Row {
    broker: String,
    rate: f64,
    p50: f64,
    p99: f64,
    max: f64,
    lost: u64,
    dup: u64,
    extra: String,
}

fn pct(v: &mut [u32], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i] as f64 / 1000.0
}

/// One result row from what the subscribers saw, each with how many messages it expected.
fn merge(rows: Vec<(client::Received, u64)>, broker: &str, start: Instant) -> Row {
    let mut all = client::Received::default();
    let mut expected = 0;
    let mut unique = 0;
    for (r, e) in rows {
        expected += e;
        unique += r.unique();
        all.dups += r.dups;
        all.latencies_us.extend(r.latencies_us);
        all.last_at = all.last_at.max(r.last_at);
    }
    let secs = all.last_at.map(|t| t.duration_since(start).as_secs_f64()).unwrap_or(f64::NAN);
    Row {
        broker: broker.into(),
        rate: unique as f64 / secs,
        p50: pct(&mut all.latencies_us, 0.5),
        p99: pct(&mut all.latencies_us, 0.99),
        max: pct(&mut all.latencies_us, 1.0),
        lost: expected.saturating_sub(unique),
        dup: all.dups,
        extra: String::new(),
    }
}

const IDLE: Duration = Duration::from_secs(5);

async fn pubsub(o: &Opts, b: &brokers::Broker) -> anyhow::Result<Row> {
    let base = Instant::now();
    let mut s = client::connect(b.addr, None, "lt-sub", true).await?;
    client::subscribe(&mut s, "bench/1", o.qos).await?;
    let p = client::connect(b.addr, None, "lt-pub", true).await?;
    let expected = o.messages;
    let rx = tokio::spawn(client::receive(s, expected, IDLE, base));
    let start = Instant::now();
    client::publish_all(p, 0, "bench/1", o.qos, o.messages, o.window, o.payload, base).await?;
    Ok(merge(vec![(rx.await??, expected)], &b.name, start))
}

async fn fanin(o: &Opts, b: &brokers::Broker) -> anyhow::Result<Row> {
    let base = Instant::now();
    let mut s = client::connect(b.addr, None, "lt-sub", true).await?;
    client::subscribe(&mut s, "bench/#", o.qos).await?;
    let per = o.messages / o.publishers as u64;
    let mut pubs = Vec::new();
    for i in 0..o.publishers {
        pubs.push(client::connect(b.addr, None, &format!("lt-pub-{i}"), true).await?);
    }
    let expected = per * o.publishers as u64;
    let rx = tokio::spawn(client::receive(s, expected, IDLE, base));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, p) in pubs.into_iter().enumerate() {
        let (qos, window, payload) = (o.qos, o.window, o.payload);
        tasks.push(tokio::spawn(
            async move { client::publish_all(p, i as u32, &format!("bench/{i}"), qos, per, window, payload, base).await },
        ));
    }
    for t in tasks {
        t.await??;
    }
    Ok(merge(vec![(rx.await??, expected)], &b.name, start))
}

async fn fanout(o: &Opts, b: &brokers::Broker) -> anyhow::Result<Row> {
    let base = Instant::now();
    let per = (o.messages / o.subscribers as u64).max(1);
    let mut rxs = Vec::new();
    for i in 0..o.subscribers {
        let mut s = client::connect(b.addr, None, &format!("lt-sub-{i}"), true).await?;
        client::subscribe(&mut s, "bench/fan", o.qos).await?;
        rxs.push(s);
    }
    let p = client::connect(b.addr, None, "lt-pub", true).await?;
    let tasks: Vec<_> = rxs.into_iter().map(|s| tokio::spawn(client::receive(s, per, IDLE, base))).collect();
    let start = Instant::now();
    client::publish_all(p, 0, "bench/fan", o.qos, per, o.window, o.payload, base).await?;
    let mut rows = Vec::new();
    for t in tasks {
        rows.push((t.await??, per));
    }
    Ok(merge(rows, &b.name, start))
}

async fn idle(o: &Opts, b: &brokers::Broker) -> anyhow::Result<Row> {
    let before = b.rss_kib().unwrap_or(0);
    let start = Instant::now();
    let mut conns = Vec::with_capacity(o.connections);
    let mut failed = 0usize;
    let mut i = 0usize;
    while i < o.connections {
        let batch: Vec<_> = (i..(i + 200).min(o.connections))
            .map(|k| {
                // Spread over 127.0.0.x sources so no single source runs out of ephemeral ports.
                let src: IpAddr = format!("127.0.0.{}", 2 + k % 200).parse().unwrap();
                let addr = b.addr;
                tokio::spawn(async move { client::connect(addr, Some(src), &format!("idle-{k}"), true).await })
            })
            .collect();
        for t in batch {
            match t.await? {
                Ok(s) => conns.push(s),
                Err(_) => failed += 1,
            }
        }
        i += 200;
    }
    let took = start.elapsed().as_secs_f64();
    // Let the broker settle its allocations before reading RSS.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = b.rss_kib().unwrap_or(0);
    let n = conns.len();
    let per = (after.saturating_sub(before)) as f64 / n.max(1) as f64;
    drop(conns);
    Ok(Row {
        broker: b.name.clone(),
        rate: n as f64 / took,
        p50: f64::NAN,
        p99: f64::NAN,
        max: f64::NAN,
        lost: failed as u64,
        dup: 0,
        extra: format!("{n} connections, RSS {before} -> {after} KiB = {per:.2} KiB/connection"),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let o = parse()?;
    let fds = raise_fd_limit();
    println!(
        "loadtest: brokers {:?}, scenarios {:?}, QoS {}, payload {} B, open-file limit {fds}",
        o.brokers, o.scenarios, o.qos as u8, o.payload
    );
    for sc in &o.scenarios {
        let mut rows = Vec::new();
        for name in &o.brokers {
            let max_conns = o.connections.max(o.publishers + o.subscribers) + 10;
            let b = match brokers::start(name, max_conns).await {
                Ok(b) => b,
                Err(e) => {
                    println!("  {name}: cannot start: {e:#}");
                    continue;
                }
            };
            let r = match sc.as_str() {
                "pubsub" => pubsub(&o, &b).await,
                "fanin" => fanin(&o, &b).await,
                "fanout" => fanout(&o, &b).await,
                "idle" => idle(&o, &b).await,
                other => bail!("unknown scenario {other}"),
            };
            b.stop().await;
            match r {
                Ok(r) => rows.push(r),
                Err(e) => println!("  {name}: scenario failed: {e:#}"),
            }
        }
        let what = match sc.as_str() {
            "pubsub" => format!("1 -> 1, {} messages", o.messages),
            "fanin" => format!("{} -> 1, {} messages", o.publishers, o.messages),
            "fanout" => format!("1 -> {}, {} deliveries", o.subscribers, (o.messages / o.subscribers as u64).max(1) * o.subscribers as u64),
            _ => format!("{} idle connections", o.connections),
        };
        println!("\n== {sc}: {what}, QoS {}", o.qos as u8);
        if sc == "idle" {
            println!("{:<12} {:>12} {:>8}  detail", "broker", "conn/s", "failed");
            for r in &rows {
                println!("{:<12} {:>12.0} {:>8}  {}", r.broker, r.rate, r.lost, r.extra);
            }
        } else {
            println!("{:<12} {:>12} {:>9} {:>9} {:>9} {:>8} {:>6}", "broker", "msgs/s", "p50 ms", "p99 ms", "max ms", "lost", "dup");
            for r in &rows {
                println!("{:<12} {:>12.0} {:>9.2} {:>9.2} {:>9.2} {:>8} {:>6}", r.broker, r.rate, r.p50, r.p99, r.max, r.lost, r.dup);
            }
        }
        if let Some(first) = rows.first() {
            for r in rows.iter().skip(1) {
                println!("ratio {}/{}: {:.2}x", first.broker, r.broker, first.rate / r.rate);
            }
        }
    }
    Ok(())
}
