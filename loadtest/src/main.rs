//! thingsd load generator: publish/subscribe, fan-in, fan-out and idle-connection scenarios,
//! run against thingsd and (with --compare) Mosquitto or rumqttd in the same run.
mod brokers;
mod client;
mod devices;
mod drain;
mod fleet;
mod hooks;
mod httptel;
mod persist;
mod rumq;
mod tsdb;

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
    /// Runs of each broker (alternating), reported by the median rate.
    repeat: usize,
    /// fleet: nodes, telemetry period, commands sent, Redis.
    nodes: usize,
    period: u64,
    /// drain/drainkill: seconds between the last session made and the stop.
    pause: u64,
    commands: usize,
    redis: Option<String>,
    /// PostgreSQL for the time-series scenarios' PostgreSQL runs (or $TEST_PG_URL).
    pg: Option<String>,
    /// Alert rules on the telemetry scenario's product, one run per count.
    rules: Vec<usize>,
    /// httptelemetry: devices, keep-alive connections, points in all, samples per request.
    devices: usize,
    http_connections: usize,
    points: u64,
    samples: usize,
}

const USAGE: &str = "usage: loadtest [--broker thingsd|HOST:PORT] [--compare mosquitto,rumqttd] [--scenario pubsub,fanin,rqpubsub,rqfanin,fleet,fanout,idle,persistent,restart,cluster,takeover,substorm,drain,drainkill,killowner,devices,tsdb,telemetry,httptelemetry,webhooks,inspect]
                [--qos 0|1|2] [--messages N] [--publishers N] [--subscribers N] [--connections N] [--payload BYTES] [--window N] [--repeat N  (runs per broker, alternating; the median is reported)]
                [--pg postgres://…  (tsdb/telemetry also on PostgreSQL; default $TEST_PG_URL)]
                [--rules 0,10,100  (telemetry: alert rules on the devices' product, a run per count)]
                [--devices N --http-connections N --points N --samples N  (httptelemetry: 1000, 16, 10M, 100 of 10 keys)]
                [--devices N --nodes N --period SECS --commands N --redis redis://…  (fleet: 1000, 3, 10, 1000, $TEST_REDIS_URL; needs --pg)]
                [--pause SECS  (drain, drainkill: wait after the last session was made before stopping node A; 0)]";

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
        repeat: 1,
        nodes: 3,
        period: 10,
        pause: 0,
        commands: 1000,
        redis: std::env::var("TEST_REDIS_URL").ok().filter(|u| !u.is_empty()),
        pg: std::env::var("TEST_PG_URL").ok().filter(|u| !u.is_empty()),
        rules: vec![0],
        devices: 1000,
        http_connections: 16,
        points: 10_000_000,
        samples: 100,
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
            "--repeat" => o.repeat = val()?.parse::<usize>()?.max(1),
            "--nodes" => o.nodes = val()?.parse()?,
            "--period" => o.period = val()?.parse()?,
            "--pause" => o.pause = val()?.parse()?,
            "--commands" => o.commands = val()?.parse()?,
            "--redis" => o.redis = Some(val()?),
            "--pg" => o.pg = Some(val()?),
            "--devices" => o.devices = val()?.parse()?,
            "--http-connections" => o.http_connections = val()?.parse()?,
            "--points" => o.points = val()?.parse()?,
            "--samples" => o.samples = val()?.parse()?,
            "--rules" => o.rules = val()?.split(',').map(|n| n.trim().parse()).collect::<Result<_, _>>()?,
            _ => bail!("unknown argument {a}\n{USAGE}"),
        }
    }
    // The inspector's cost: the same node with per-actor statistics on and off, same run.
    if o.scenarios.iter().any(|s| s == "inspect") {
        o.scenarios = vec!["pubsub".into(), "fanin".into(), "fanout".into()];
        o.brokers = vec!["thingsd".into(), "thingsd-nostats".into()];
    }
    if o.scenarios == ["all"] {
        o.scenarios = vec!["pubsub".into(), "fanin".into(), "fanout".into(), "idle".into()];
    }
    Ok(o)
}

// The one unsafe block of the workspace: two libc calls on a local struct.
#[allow(unsafe_code)]
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
    let before = b.settled_rss_kib().await.unwrap_or(0);
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
    // What the node gives back once they are gone: RSS after 20 s (sessions expire at once,
    // the allocator returns what it can).
    tokio::time::sleep(Duration::from_secs(20)).await;
    let gone = b.rss_kib().unwrap_or(0);
    Ok(Row {
        broker: b.name.clone(),
        rate: n as f64 / took,
        p50: f64::NAN,
        p99: f64::NAN,
        max: f64::NAN,
        lost: failed as u64,
        dup: 0,
        extra: format!("{n} connections, RSS {before} -> {after} KiB = {per:.2} KiB/connection, {gone} KiB 20 s after they left"),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("fleet-worker") {
        raise_fd_limit();
        return fleet::worker(&args[1..]).await;
    }
    let r = run().await;
    brokers::clean_scratch(r.is_ok());
    r
}

async fn run() -> anyhow::Result<()> {
    let o = parse()?;
    let fds = raise_fd_limit();
    println!(
        "loadtest: brokers {:?}, scenarios {:?}, QoS {}, payload {} B, open-file limit {fds}",
        o.brokers, o.scenarios, o.qos as u8, o.payload
    );
    for sc in &o.scenarios {
        if sc == "tsdb" {
            tsdb::run(1000, 2000, o.pg.clone()).await?;
            continue;
        }
        if sc == "telemetry" {
            devices::telemetry(o.publishers, o.messages, o.window, o.pg.clone(), &o.rules).await?;
            continue;
        }
        if sc == "httptelemetry" {
            let h = httptel::Opts { devices: o.devices, connections: o.http_connections, points: o.points, samples: o.samples, keys: 10 };
            httptel::run(&h).await?;
            continue;
        }
        if sc == "fleet" {
            let f = fleet::Opts {
                nodes: o.nodes.max(2),
                devices: o.devices,
                period: Duration::from_secs(o.period.max(1)),
                commands: o.commands,
                pg: o.pg.clone().context("fleet needs PostgreSQL: --pg or $TEST_PG_URL")?,
                redis: o.redis.clone().context("fleet needs Redis: --redis or $TEST_REDIS_URL")?,
            };
            fleet::run(&f).await?;
            continue;
        }
        if sc == "webhooks" {
            hooks::run(&o).await?;
            continue;
        }
        if sc == "devices" {
            devices::run(o.connections, o.publishers, o.messages, o.window, o.qos).await?;
            continue;
        }
        if let Some(r) = cluster_scenario(&o, sc).await? {
            r.print();
            continue;
        }
        let mut runs: Vec<Vec<Row>> = o.brokers.iter().map(|_| Vec::new()).collect();
        for round in 0..o.repeat {
            for (k, name) in o.brokers.iter().enumerate() {
                if let Some(r) = run_one(&o, sc, name).await? {
                    if o.repeat > 1 {
                        println!("  run {}: {name} {:.0}/s {}", round + 1, r.rate, r.extra);
                    }
                    runs[k].push(r);
                }
            }
        }
        // The run with the median rate of each broker.
        let rows: Vec<Row> = runs
            .into_iter()
            .filter(|r| !r.is_empty())
            .map(|mut r| {
                r.sort_by(|a, b| a.rate.total_cmp(&b.rate));
                let mid = r.len() / 2;
                r.swap_remove(mid)
            })
            .collect();
        let what = match sc.as_str() {
            "pubsub" => format!("1 -> 1, {} messages", o.messages),
            "fanin" => format!("{} -> 1, {} messages", o.publishers, o.messages),
            "rqpubsub" => format!("1 -> 1 through rumqttc clients, {} messages", o.messages),
            "rqfanin" => format!("{} -> 1 through rumqttc clients, {} messages", o.publishers, o.messages),
            "persistent" => format!("1 -> 1 persistent subscriber, {} messages", o.messages),
            "restart" => format!("{} persistent sessions, restarted after SIGKILL (rate: sessions made per second)", o.connections),
            "fanout" => format!("1 -> {}, {} deliveries", o.subscribers, (o.messages / o.subscribers as u64).max(1) * o.subscribers as u64),
            _ => format!("{} idle connections", o.connections),
        };
        println!("\n== {sc}: {what}, QoS {}", o.qos as u8);
        if sc == "idle" || sc == "restart" {
            println!("{:<12} {:>12} {:>8}  detail", "broker", "conn/s", "failed");
            for r in &rows {
                println!("{:<12} {:>12.0} {:>8}  {}", r.broker, r.rate, r.lost, r.extra);
            }
        } else {
            println!("{:<12} {:>12} {:>9} {:>9} {:>9} {:>8} {:>6}", "broker", "msgs/s", "p50 ms", "p99 ms", "max ms", "lost", "dup");
            for r in &rows {
                println!(
                    "{:<12} {:>12.0} {:>9.2} {:>9.2} {:>9.2} {:>8} {:>6}  {}",
                    r.broker, r.rate, r.p50, r.p99, r.max, r.lost, r.dup, r.extra
                );
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

/// One run of a broker scenario on a freshly started broker; `None` when it could not run.
async fn run_one(o: &Opts, sc: &str, name: &str) -> anyhow::Result<Option<Row>> {
    let max_conns = o.connections.max(o.publishers + o.subscribers) + 10;
    let mut b = match brokers::start(name, max_conns).await {
        Ok(b) => b,
        Err(e) => {
            println!("  {name}: cannot start: {e:#}");
            return Ok(None);
        }
    };
    let cpu_before = b.pid().map(brokers::cpu_secs);
    let r = match sc {
        "pubsub" => pubsub(o, &b).await,
        "fanin" => fanin(o, &b).await,
        "rqpubsub" => rumq::pubsub(o, &b).await,
        "rqfanin" => rumq::fanin(o, &b).await,
        "fanout" => fanout(o, &b).await,
        "idle" => idle(o, &b).await,
        "persistent" => persist::pubsub(o, &b).await,
        "restart" => persist::restart(o, &mut b).await,
        other => {
            b.stop().await;
            bail!("unknown scenario {other}")
        }
    };
    // The broker's CPU per delivered message: on a machine the generator shares, the rate is
    // partly the generator's; this is the broker's own cost.
    let cpu = b.pid().map(brokers::cpu_secs).zip(cpu_before).map(|(a, z)| a - z);
    b.stop().await;
    let expected = match sc {
        "fanin" | "rqfanin" => o.messages / o.publishers as u64 * o.publishers as u64,
        "fanout" => (o.messages / o.subscribers as u64).max(1) * o.subscribers as u64,
        _ => o.messages,
    };
    match r {
        Ok(mut r) => {
            if let (Some(c), true) = (cpu, r.extra.is_empty() && r.rate.is_finite()) {
                let delivered = expected.saturating_sub(r.lost).max(1);
                r.extra = format!("broker CPU {:.2} µs per delivered message", c * 1e6 / delivered as f64);
            }
            Ok(Some(r))
        }
        Err(e) => {
            println!("  {name}: scenario failed: {e:#}");
            Ok(None)
        }
    }
}

/// Figures of one cluster scenario, printed as a small table.
struct ClusterReport {
    title: String,
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl ClusterReport {
    fn print(&self) {
        println!("\n== {}", self.title);
        println!("{:<26} {:>12} {:>9} {:>9} {:>9} {:>8} {:>6}", "setup", "msgs/s", "p50 ms", "p99 ms", "max ms", "lost", "dup");
        for r in &self.rows {
            println!("{:<26} {:>12.0} {:>9.2} {:>9.2} {:>9.2} {:>8} {:>6}", r.broker, r.rate, r.p50, r.p99, r.max, r.lost, r.dup);
        }
        for n in &self.notes {
            println!("{n}");
        }
    }
}

/// 1 -> 1 between two given addresses (publisher on `from`, subscriber on `to`).
async fn pubsub_between(o: &Opts, from: std::net::SocketAddr, to: std::net::SocketAddr, label: &str) -> anyhow::Result<Row> {
    pubsub_between_as(o, from, to, label, true).await
}

/// Same, the subscriber's session persistent unless `clean` (its messages are replicated to a
/// backup node before each PUBACK).
async fn pubsub_between_as(
    o: &Opts,
    from: std::net::SocketAddr,
    to: std::net::SocketAddr,
    label: &str,
    clean: bool,
) -> anyhow::Result<Row> {
    let base = Instant::now();
    let mut s = client::connect(to, None, &format!("lt-sub-{label}"), clean).await?;
    client::subscribe(&mut s, &format!("bench/{label}"), o.qos).await?;
    let p = client::connect(from, None, &format!("lt-pub-{label}"), true).await?;
    let rx = tokio::spawn(client::receive(s, o.messages, IDLE, base));
    let start = Instant::now();
    client::publish_all(p, 0, &format!("bench/{label}"), o.qos, o.messages, o.window, o.payload, base).await?;
    Ok(merge(vec![(rx.await??, o.messages)], label, start))
}

/// `cluster`: cross-node 1 -> 1 on a 2-node cluster, against thingsd single-node in the same run.
/// `takeover`: CONNECT -> CONNACK time when the session lives on the other node.
/// `substorm`: a burst of clients subscribing on one node of three (route announcements).
/// `drain` / `drainkill`: a node of three with N persistent sessions stops (SIGTERM / SIGKILL); its clients reconnect to the others.
/// `killowner`: queued QoS 1 messages of a persistent session survive SIGKILL of its node.
async fn cluster_scenario(o: &Opts, sc: &str) -> anyhow::Result<Option<ClusterReport>> {
    match sc {
        "cluster" => {
            let single = brokers::start("thingsd", 100).await?;
            let mut one = pubsub_between(o, single.addr, single.addr, "single").await?;
            one.broker = "thingsd, one node".into();
            single.stop().await;
            let nodes = brokers::start_cluster(2, 100).await?;
            let mut cross = pubsub_between(o, nodes[0].addr, nodes[1].addr, "cross").await?;
            cross.broker = "thingsd, node A -> node B".into();
            let mut local = pubsub_between(o, nodes[0].addr, nodes[0].addr, "local").await?;
            local.broker = "thingsd cluster, same node".into();
            let mut durable = pubsub_between_as(o, nodes[0].addr, nodes[1].addr, "durable", false).await?;
            durable.broker = "A -> B, persistent sub".into();
            let ratio = cross.rate / one.rate;
            for n in nodes {
                n.stop().await;
            }
            Ok(Some(ClusterReport {
                title: format!("cluster: 1 -> 1 across nodes, {} messages, QoS {}", o.messages, o.qos as u8),
                notes: vec![format!("ratio cross-node / single node: {ratio:.2}")],
                rows: vec![one, local, cross, durable],
            }))
        }
        "substorm" => {
            // N clients connect to node A at once (200 at a time) and each subscribes to its own
            // topic: every SUBSCRIBE is a new route that both other nodes must acknowledge
            // before its SUBACK — what a fleet reconnecting after a failover costs the cluster.
            let n = o.connections;
            let nodes = brokers::start_cluster(3, n).await?;
            let cpu = |nodes: &[brokers::Broker]| nodes.iter().map(|b| b.pid().map_or(0.0, brokers::cpu_secs)).collect::<Vec<_>>();
            let before = cpu(&nodes);
            let a = nodes[0].addr;
            let start = Instant::now();
            let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(200));
            let tasks: Vec<_> = (0..n)
                .map(|i| {
                    let gate = gate.clone();
                    tokio::spawn(async move {
                        let _p = gate.acquire_owned().await?;
                        let src: std::net::IpAddr = format!("127.0.0.{}", 2 + i % 200).parse()?;
                        let t = Instant::now();
                        let mut s = client::connect(a, Some(src), &format!("lt-storm-{i}"), true).await?;
                        client::subscribe(&mut s, &format!("storm/{i}"), QoS::AtLeastOnce).await?;
                        anyhow::Ok((s, t.elapsed().as_micros() as u32))
                    })
                })
                .collect();
            let mut conns = Vec::with_capacity(n);
            let mut times = Vec::with_capacity(n);
            for t in tasks {
                let (s, us) = t.await??;
                conns.push(s);
                times.push(us);
            }
            let took = start.elapsed().as_secs_f64();
            let spent: Vec<f64> = cpu(&nodes).iter().zip(&before).map(|(x, y)| x - y).collect();
            // Every route reached node B: one message to each of 100 spread topics, published
            // on node B, arrives.
            let mut p = client::connect(nodes[1].addr, None, "lt-storm-pub", true).await?;
            let probe: Vec<usize> = (0..100).map(|k| k * n / 100).collect();
            let mut lost = 0;
            for &i in &probe {
                client::publish_one(&mut p, &format!("storm/{i}"), QoS::AtLeastOnce, (i % 60000 + 1) as u16, b"probe").await?;
            }
            for &i in &probe {
                if !client::received_within(&mut conns[i], Duration::from_secs(5)).await {
                    lost += 1;
                }
            }
            for b in nodes {
                b.stop().await;
            }
            let mut v = times.clone();
            Ok(Some(ClusterReport {
                title: format!("substorm: {n} clients connect to node A of 3 and each subscribes to its own topic (200 at a time)"),
                rows: vec![Row {
                    broker: "CONNECT + SUBSCRIBE".into(),
                    rate: n as f64 / took,
                    p50: pct(&mut v, 0.5),
                    p99: pct(&mut v, 0.99),
                    max: pct(&mut v, 1.0),
                    lost,
                    dup: 0,
                    extra: String::new(),
                }],
                notes: vec![
                    "(msgs/s column: clients subscribed per second; lost: of 100 probes published on node B)".into(),
                    format!(
                        "{took:.1} s; node CPU during the storm: A {:.1} s, B {:.1} s, C {:.1} s ({:.0} µs per subscription on each peer)",
                        spent[0],
                        spent[1],
                        spent[2],
                        (spent[1] + spent[2]) / 2.0 / n as f64 * 1e6
                    ),
                ],
            }))
        }
        "drain" | "drainkill" => Ok(Some(drain::run(o, sc == "drainkill").await?)),
        "takeover" => {
            let nodes = brokers::start_cluster(3, 100).await?;
            let rounds = 200;
            let mut times = Vec::with_capacity(rounds);
            let mut old: Option<tokio::net::TcpStream> = None;
            for i in 0..rounds {
                let t = Instant::now();
                let s = client::connect(nodes[i % 3].addr, None, "lt-hopper", false).await?;
                times.push(t.elapsed().as_micros() as u32);
                drop(old.replace(s));
            }
            for n in nodes {
                n.stop().await;
            }
            let mut v = times.clone();
            Ok(Some(ClusterReport {
                title: format!("takeover: {rounds} CONNECTs of one persistent client id, each on the next of 3 nodes"),
                rows: vec![Row {
                    broker: "CONNECT -> CONNACK".into(),
                    rate: rounds as f64 / (times.iter().map(|t| *t as f64).sum::<f64>() / 1e6),
                    p50: pct(&mut v, 0.5),
                    p99: pct(&mut v, 0.99),
                    max: pct(&mut v, 1.0),
                    lost: 0,
                    dup: 0,
                    extra: String::new(),
                }],
                notes: vec!["(msgs/s column: takeovers per second, sequential)".into()],
            }))
        }
        "killowner" => {
            let mut nodes = brokers::start_cluster(3, 100).await?;
            let q = o.messages.min(1000);
            // A persistent subscriber on node C, offline; QoS 1 messages published on node A.
            let mut s = client::connect(nodes[2].addr, None, "lt-durable", false).await?;
            client::subscribe(&mut s, "bench/durable", thingsd::protocols::mqtt::QoS::AtLeastOnce).await?;
            drop(s);
            tokio::time::sleep(Duration::from_millis(200)).await; // the broker notices the close
            let base = Instant::now();
            let p = client::connect(nodes[0].addr, None, "lt-durable-pub", true).await?;
            client::publish_all(p, 0, "bench/durable", thingsd::protocols::mqtt::QoS::AtLeastOnce, q, 1, o.payload, base).await?;
            nodes[2].kill().await;
            let s = client::connect(nodes[1].addr, None, "lt-durable", false).await?;
            let r = client::receive(s, q, IDLE, base).await?;
            let got = r.unique();
            for n in nodes {
                n.stop().await;
            }
            Ok(Some(ClusterReport {
                title: format!(
                    "killowner: {q} acknowledged QoS 1 messages queued for an offline persistent session; its node is SIGKILLed"
                ),
                rows: vec![Row {
                    broker: "reconnect on another node".into(),
                    rate: f64::NAN,
                    p50: f64::NAN,
                    p99: f64::NAN,
                    max: f64::NAN,
                    lost: q.saturating_sub(got),
                    dup: r.dups,
                    extra: String::new(),
                }],
                notes: vec![format!("received {got} of {q}")],
            }))
        }
        _ => Ok(None),
    }
}
