//! `fleet`: a device fleet on a cluster behind HAProxy, as operators run it — PostgreSQL meta
//! and telemetry stores, Redis cache, every device logging in with its own token through the
//! load balancer, publishing telemetry (QoS 1) every `--period` seconds and subscribed to its
//! command topic. Measured: time to connect the fleet, commands sent through the REST API to
//! random devices (delivery p50/p99), then `kill -9` of one node: time until every device is
//! connected again through HAProxy; the node started again, then a rolling restart (or, with
//! `LOADTEST_THINGSD_UPGRADE=path`, a rolling upgrade onto that build) with the fleet
//! connected; finally every acknowledged point is counted in PostgreSQL (acknowledged = stored:
//! none may be missing). RSS per node at each step.
//!
//! The devices live in worker processes (`loadtest fleet-worker`, this binary), each with its
//! own HAProxy in front of every node: a process may hold 20,000 open files here and HAProxy
//! needs two per device, so one worker and one HAProxy carry at most [`PER_WORKER`] devices
//! and a 95,000-device fleet runs on eleven of each. Workers report their counts on stdout
//! every 200 ms and take `publish` / `quiet` / `stop` on stdin.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::BytesMut;
use thingsd::protocols::mqtt::{decode, encode, Ack, Packet, Protocol, Publish, QoS};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use crate::{brokers, client, devices, pct};

pub struct Opts {
    pub nodes: usize,
    pub devices: usize,
    pub period: Duration,
    pub commands: usize,
    pub pg: String,
    pub redis: String,
}

/// Devices per worker process (and per HAProxy process: two descriptors per device);
/// `LOADTEST_FLEET_PER_WORKER` sets fewer (the test spreads its small fleet over three).
const PER_WORKER: usize = 9_000;

fn per_worker() -> usize {
    std::env::var("LOADTEST_FLEET_PER_WORKER")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| (1..=PER_WORKER).contains(n))
        .unwrap_or(PER_WORKER)
}

/// What every device task of a worker reports.
struct Fleet {
    connected: AtomicUsize,
    /// Telemetry messages acknowledged (PUBACK) — each one point in the store.
    acked: AtomicU64,
    reconnects: AtomicU64,
    /// Command delivery latencies (µs), from the REST call to the device, not yet reported.
    commands: Mutex<Vec<u32>>,
    publishing: AtomicBool,
    stop: AtomicBool,
    dials: tokio::sync::Semaphore,
}

/// Logins (TCP connect, CONNECT, CONNACK) in flight at once per worker process.
const DIALS: usize = 200;

impl Default for Fleet {
    fn default() -> Self {
        Fleet {
            connected: AtomicUsize::new(0),
            acked: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            commands: Mutex::new(Vec::new()),
            publishing: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            dials: tokio::sync::Semaphore::new(DIALS),
        }
    }
}

/// The coordinator's view of its workers: each one's last report, and every command latency.
struct Workers {
    connected: Vec<AtomicUsize>,
    acked: Vec<AtomicU64>,
    reconnects: Vec<AtomicU64>,
    commands: Mutex<Vec<u32>>,
    control: Vec<tokio::sync::Mutex<tokio::process::ChildStdin>>,
}

impl Workers {
    fn connected(&self) -> usize {
        self.connected.iter().map(|c| c.load(Relaxed)).sum()
    }
    fn acked(&self) -> u64 {
        self.acked.iter().map(|c| c.load(Relaxed)).sum()
    }
    fn reconnects(&self) -> u64 {
        self.reconnects.iter().map(|c| c.load(Relaxed)).sum()
    }
    /// Tell every worker `publish`, `quiet` or `stop`.
    async fn tell(&self, what: &str) {
        for c in &self.control {
            let _ = c.lock().await.write_all(format!("{what}\n").as_bytes()).await;
        }
    }
}

/// Microseconds since the Unix epoch: command send and receive times across processes.
fn epoch_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// `loadtest fleet-worker LB PERIOD_MS TOKENS_FILE`: run the devices listed in the file
/// (`k<TAB>token` per line) against the balancer at LB until told `stop` (or stdin closes).
pub async fn worker(args: &[String]) -> anyhow::Result<()> {
    let [lb, period_ms, tokens] = args else { bail!("usage: loadtest fleet-worker LB PERIOD_MS TOKENS_FILE") };
    let lb: SocketAddr = lb.parse()?;
    let period = Duration::from_millis(period_ms.parse()?);
    let f = Arc::new(Fleet::default());
    let mut tasks = Vec::new();
    for (i, line) in std::fs::read_to_string(tokens)?.lines().enumerate() {
        let (k, token) = line.split_once('\t').context("k<TAB>token")?;
        tasks.push(tokio::spawn(device(k.parse()?, lb, token.to_string(), f.clone(), period)));
        if i % 500 == 499 {
            tokio::task::yield_now().await;
        }
    }
    let report = {
        let f = f.clone();
        tokio::spawn(async move {
            let mut out = tokio::io::stdout();
            loop {
                let lat: Vec<u32> = std::mem::take(&mut *f.commands.lock().unwrap());
                let mut text = String::new();
                for l in lat {
                    text += &format!("C {l}\n");
                }
                text += &format!("S {} {} {}\n", f.connected.load(Relaxed), f.acked.load(Relaxed), f.reconnects.load(Relaxed));
                if out.write_all(text.as_bytes()).await.is_err() || out.flush().await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(l)) = lines.next_line().await {
        match l.trim() {
            "publish" => f.publishing.store(true, Relaxed),
            "quiet" => f.publishing.store(false, Relaxed),
            "stop" => break,
            _ => {}
        }
    }
    f.stop.store(true, Relaxed);
    // One last report after stopping.
    tokio::time::sleep(Duration::from_millis(300)).await;
    report.abort();
    for t in tasks {
        t.abort();
    }
    Ok(())
}

/// Start the workers (and one HAProxy each) for `tokens`, reading their reports.
async fn start_workers(
    dir: &std::path::Path,
    backends: &[(SocketAddr, SocketAddr)],
    tokens: Vec<String>,
    period: Duration,
) -> anyhow::Result<(Arc<Workers>, Vec<tokio::process::Child>)> {
    let per = per_worker();
    let n = tokens.len().div_ceil(per).max(1);
    let mut procs = Vec::new();
    let mut control = Vec::new();
    let mut outs = Vec::new();
    let mut lbs = Vec::new();
    for w in 0..n {
        let (lb_proc, lb) = haproxy(dir, w, backends, per + 100).await?;
        procs.push(lb_proc);
        lbs.push(lb);
    }
    for (w, lb) in lbs.into_iter().enumerate() {
        // Wait for this balancer's health checks before its devices dial.
        until(Duration::from_secs(20), "HAProxy up", || std::net::TcpStream::connect(lb).is_ok()).await?;
        let file = dir.join(format!("tokens-{w}.txt"));
        let list: String = tokens.iter().enumerate().skip(w * per).take(per).map(|(k, t)| format!("{k}\t{t}\n")).collect();
        std::fs::write(&file, list)?;
        let mut child = Command::new(std::env::current_exe()?)
            .arg("fleet-worker")
            .arg(lb.to_string())
            .arg(period.as_millis().to_string())
            .arg(&file)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(dir.join(format!("worker-{w}.log")))?)
            .kill_on_drop(true)
            .spawn()
            .context("start a fleet worker")?;
        control.push(tokio::sync::Mutex::new(child.stdin.take().context("worker stdin")?));
        outs.push(child.stdout.take().context("worker stdout")?);
        procs.push(child);
    }
    let ws = Arc::new(Workers {
        connected: (0..n).map(|_| AtomicUsize::new(0)).collect(),
        acked: (0..n).map(|_| AtomicU64::new(0)).collect(),
        reconnects: (0..n).map(|_| AtomicU64::new(0)).collect(),
        commands: Mutex::new(Vec::new()),
        control,
    });
    for (w, out) in outs.into_iter().enumerate() {
        let ws = ws.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(out).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                let mut it = l.split(' ');
                match (it.next(), it.next(), it.next(), it.next()) {
                    (Some("C"), Some(us), None, None) => {
                        if let Ok(us) = us.parse() {
                            ws.commands.lock().unwrap().push(us);
                        }
                    }
                    (Some("S"), Some(c), Some(a), Some(r)) => {
                        ws.connected[w].store(c.parse().unwrap_or(0), Relaxed);
                        ws.acked[w].store(a.parse().unwrap_or(0), Relaxed);
                        ws.reconnects[w].store(r.parse().unwrap_or(0), Relaxed);
                    }
                    _ => {}
                }
            }
        });
    }
    Ok((ws, procs))
}

/// A fresh database for this run on the PostgreSQL server of `url`.
async fn fresh_database(url: &str) -> anyhow::Result<String> {
    use sqlx::Executor;
    let name = format!("lt_fleet_{}", std::process::id());
    let admin = sqlx::PgPool::connect(url).await.context("PostgreSQL (--pg or $TEST_PG_URL)")?;
    admin.execute(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name}"))).await?;
    admin.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).await?;
    let (base, _) = url.rsplit_once('/').context("a PostgreSQL URL ends with /database")?;
    let query = url.split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
    Ok(format!("{base}/{name}{query}"))
}

/// HAProxy in front of the nodes' PROXY-protocol listeners, health-checked on /health/ready
/// (`maxconn` clients: it needs two descriptors for each; its log goes to `haproxy.log`).
async fn haproxy(
    dir: &std::path::Path,
    w: usize,
    backends: &[(SocketAddr, SocketAddr)],
    maxconn: usize,
) -> anyhow::Result<(tokio::process::Child, SocketAddr)> {
    let front = brokers::free_port()?;
    // Each balancer dials the nodes from its own loopback address: HAProxy binds its source
    // port before connecting, so all of them on 127.0.0.1 would share its ~28,000 ports.
    let src = 1 + w % 250;
    let mut cfg = format!(
        "global\n    maxconn {maxconn}\n    noreuseport\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 15m\n    timeout server 15m\n\
         frontend mqtt\n    bind 127.0.0.1:{front}\n    default_backend nodes\nbackend nodes\n    balance leastconn\n    option httpchk GET /health/ready\n    default-server inter 500ms fall 2 rise 2 source 127.0.{src}.1\n"
    );
    for (i, (mqtt, http)) in backends.iter().enumerate() {
        cfg += &format!("    server n{i} {mqtt} send-proxy-v2 check port {}\n", http.port());
    }
    let path = dir.join(format!("haproxy-{w}.cfg"));
    std::fs::write(&path, cfg)?;
    let child = Command::new("/usr/sbin/haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("haproxy-{w}.log")))?)
        .kill_on_drop(true)
        .spawn()
        .context("start /usr/sbin/haproxy (apt-get install haproxy)")?;
    Ok((child, format!("127.0.0.1:{front}").parse()?))
}

/// One device: connect through the balancer (again, with back-off, whenever the connection
/// is lost), subscribe to its commands, publish telemetry every `period`; messages not yet
/// acknowledged when the connection drops are sent again on the next one.
async fn device(k: usize, lb: SocketAddr, token: String, f: Arc<Fleet>, period: Duration) {
    let id = format!("fl-{k}");
    let src: std::net::IpAddr = format!("127.0.0.{}", 2 + k % 200).parse().unwrap();
    let mut seq = 0u64;
    let mut unacked: HashMap<u16, Publish> = HashMap::new();
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    while !f.stop.load(Relaxed) {
        // At most `DIALS` logins in flight per worker: devices queue for a turn, as a fleet's
        // reconnects spread out in the field, instead of every socket dialling at once.
        let turn = f.dials.acquire().await;
        let attempt = client::connect_as(lb, Some(src), &id, true, Some(&token)).await;
        drop(turn);
        let mut s = match attempt {
            Ok(s) => s,
            Err(_) => {
                // Jittered back-off, so a fleet does not come back in lockstep.
                let jitter = Duration::from_micros((k as u64 * 7919) % 1000 * backoff.as_micros() as u64 / 1000);
                tokio::time::sleep(backoff / 2 + jitter / 2).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        if client::subscribe(&mut s, &format!("devices/command/{id}/+"), QoS::AtLeastOnce).await.is_err() {
            continue;
        }
        if !first {
            f.reconnects.fetch_add(1, Relaxed);
        }
        first = false;
        f.connected.fetch_add(1, Relaxed);
        let (mut rd, mut wr) = s.into_split();
        let mut out = BytesMut::new();
        // What the last connection left unacknowledged goes first (a QoS 1 resend).
        for p in unacked.values() {
            encode(&Packet::Publish(Publish { dup: true, ..p.clone() }), Protocol::V4, &mut out);
        }
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period.mul_f64((k % 1000) as f64 / 1000.0), period);
        let mut buf = BytesMut::new();
        let mut pkid = 0u16;
        'conn: loop {
            if !out.is_empty() {
                if wr.write_all(&out).await.is_err() {
                    break;
                }
                out.clear();
            }
            tokio::select! {
                _ = tick.tick() => {
                    if f.stop.load(Relaxed) {
                        break;
                    }
                    if f.publishing.load(Relaxed) && unacked.len() < 100 {
                        pkid = pkid % 60_000 + 1;
                        while unacked.contains_key(&pkid) {
                            pkid = pkid % 60_000 + 1;
                        }
                        // One point per message, its own time: ms since the run began.
                        let ts = thingsd::message::now_ms() as i64 / 1000 * 1000 + (seq % 1000) as i64;
                        let body = format!(r#"{{"ts":{ts},"values":{{"temp":{}}}}}"#, seq % 50);
                        seq += 1;
                        let p = Publish { dup: false, qos: QoS::AtLeastOnce, retain: false, topic: "devices/telemetry".into(), pkid, props: None, payload: body.into() };
                        encode(&Packet::Publish(p.clone()), Protocol::V4, &mut out);
                        unacked.insert(pkid, p);
                    }
                }
                r = rd.read_buf(&mut buf) => {
                    match r {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    loop {
                        match decode(&mut buf, Protocol::V4, usize::MAX) {
                            Ok(Some(Packet::PubAck(a))) => {
                                if unacked.remove(&a.pkid).is_some() {
                                    f.acked.fetch_add(1, Relaxed);
                                }
                            }
                            Ok(Some(Packet::Publish(p))) => {
                                if let Some(sent) = serde_json::from_slice::<serde_json::Value>(&p.payload).ok().and_then(|v| v["params"]["t"].as_u64()) {
                                    let lat = epoch_us().saturating_sub(sent);
                                    f.commands.lock().unwrap().push(lat.min(u32::MAX as u64) as u32);
                                }
                                if p.qos == QoS::AtLeastOnce {
                                    encode(&Packet::PubAck(Ack::new(p.pkid, 0)), Protocol::V4, &mut out);
                                }
                            }
                            Ok(Some(_)) => {}
                            Ok(None) => break,
                            Err(_) => break 'conn,
                        }
                    }
                }
            }
        }
        f.connected.fetch_sub(1, Relaxed);
    }
}

/// Wait (bounded) until `cond` holds, polling every 50 ms; the time it took.
/// Restart node `i` (SIGTERM, same ports and data) and wait until it sees every other node up
/// and every other node sees it (their logs' member up/down lines), 20 s at most.
async fn restart(nodes: &mut [brokers::ClusterNode], i: usize, exe: Option<&std::path::Path>) -> anyhow::Result<()> {
    let others = nodes.len() - 1;
    nodes[i].restart(exe, others).await?;
    for (j, n) in nodes.iter_mut().enumerate() {
        if tokio::time::timeout(Duration::from_secs(20), n.up.wait_for(|up| *up >= others)).await.is_err() {
            bail!("node {} does not see node {} back within 20 s ({} of {others} members up)", j + 1, i + 1, *n.up.borrow());
        }
    }
    Ok(())
}

/// Wait until every device is connected, or until the count has not grown for `stall` (e.g.
/// the nodes left are full: their connection caps refuse the rest), at most `limit`.
async fn reconnected(f: &Workers, devices: usize, stall: Duration, limit: Duration) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let (mut best, mut since) = (f.connected(), Instant::now());
    while f.connected() < devices {
        let now = f.connected();
        if now > best {
            (best, since) = (now, Instant::now());
        }
        if since.elapsed() > stall || t.elapsed() > limit {
            bail!("{now} of {devices} connected; no more for {:.0} s", since.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(t.elapsed())
}

async fn until(limit: Duration, what: &str, cond: impl Fn() -> bool) -> anyhow::Result<Duration> {
    let t = Instant::now();
    while !cond() {
        if t.elapsed() > limit {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(t.elapsed())
}

pub async fn run(o: &Opts) -> anyhow::Result<()> {
    let db = fresh_database(&o.pg).await?;
    let env = [
        ("THINGSD_META__URL", db.clone()),
        ("THINGSD_TELEMETRY__STORE", db.clone()),
        ("THINGSD_CACHE__URL", o.redis.clone()),
        ("THINGSD_DEVICES__ADMIN_KEY", brokers::ADMIN_KEY.to_string()),
        ("THINGSD_DEVICES__AUTH_FAIL_LIMIT", "0".to_string()),
        (
            "THINGSD_LISTENERS__TCP",
            r#"[{bind="127.0.0.1:0", allow_anonymous=true}, {bind="127.0.0.1:0", proxy_protocol=true}]"#.to_string(),
        ),
    ];
    let mut nodes = brokers::start_cluster_with(o.nodes, o.devices + 100, &env).await?;
    let backends: Vec<(SocketAddr, SocketAddr)> =
        nodes.iter().map(|n| (n.ready.mqtt_proxy.expect("proxy listener"), n.ready.http.expect("http listener"))).collect();
    let dir = nodes[0].broker.dir.clone();
    let https: Vec<SocketAddr> = backends.iter().map(|b| b.1).collect();

    // The fleet: one product, devices imported 5,000 at a time.
    let product = devices::post(https[0], "/api/v1/products", r#"{"name":"fleet"}"#).await?;
    let pid = product["id"].as_i64().context("product id")?;
    let mut tokens = Vec::with_capacity(o.devices);
    let t = Instant::now();
    for chunk in (0..o.devices).collect::<Vec<_>>().chunks(5000) {
        let rows: Vec<_> = chunk.iter().map(|k| serde_json::json!({"device_number": format!("fl-{k}"), "product_id": pid})).collect();
        match devices::post(https[0], "/api/v1/devices/import", &serde_json::to_string(&rows)?).await {
            Ok(v) => {
                for d in v["devices"].as_array().context("import answer")? {
                    tokens.push(d["access_token"].as_str().context("access_token")?.to_string());
                }
            }
            // A build from before bulk import (an upgrade's starting point): one call each.
            Err(e) if e.to_string().contains("405 Method Not Allowed") => {
                for r in &rows {
                    let d = devices::post(https[0], "/api/v1/devices", &r.to_string()).await?;
                    tokens.push(d["access_token"].as_str().context("access_token")?.to_string());
                }
            }
            Err(e) => return Err(e),
        }
    }
    anyhow::ensure!(tokens.len() == o.devices, "imported {} of {}", tokens.len(), o.devices);
    let imported = t.elapsed();

    // The workers (one HAProxy each) connect the fleet.
    let t = Instant::now();
    let (f, procs) = start_workers(&dir, &backends, tokens, o.period).await?;
    let connect_time = until(Duration::from_secs(600), "fleet connected", || f.connected() == o.devices).await?;
    let rss = |nodes: &[brokers::ClusterNode]| {
        nodes.iter().map(|n| n.broker.rss_kib().map_or("-".into(), |r| format!("{} MB", r / 1024))).collect::<Vec<_>>().join(", ")
    };
    println!(
        "\n== fleet: {} devices on {} nodes through HAProxy ({} generator processes, one HAProxy each; PostgreSQL meta + telemetry, Redis cache), telemetry every {:?}",
        o.devices,
        o.nodes,
        f.control.len(),
        o.period
    );
    println!("import (admin API, 5,000 per call): {:.1} s", imported.as_secs_f64());
    println!(
        "fleet connected (token login + SUBSCRIBE): {:.1} s = {:.0} devices/s; RSS per node: {}",
        connect_time.as_secs_f64(),
        o.devices as f64 / connect_time.as_secs_f64(),
        rss(&nodes)
    );
    let _ = t;

    // Telemetry for two periods, then commands to random devices through every node's API.
    f.tell("publish").await;
    tokio::time::sleep(o.period * 2).await;
    println!("telemetry acknowledged after {:?}: {}; RSS per node: {}", o.period * 2, f.acked(), rss(&nodes));
    let mut sent = 0;
    let t = Instant::now();
    for i in 0..o.commands {
        let k = (i * 7919 + 13) % o.devices;
        let body = format!(r#"{{"method":"ping","params":{{"t":{}}},"ttl_secs":600}}"#, epoch_us());
        if devices::post(https[i % https.len()], &format!("/api/v1/devices/fl-{k}/commands"), &body).await.is_ok() {
            sent += 1;
        }
    }
    let sending = t.elapsed();
    let _ = until(Duration::from_secs(30), "commands delivered", || f.commands.lock().unwrap().len() >= sent).await;
    let mut lat = f.commands.lock().unwrap().clone();
    println!(
        "commands: {sent} sent in {:.1} s, {} delivered, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        sending.as_secs_f64(),
        lat.len(),
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99),
        pct(&mut lat, 1.0)
    );

    // kill -9 of the last node (not the seed): its devices come back through HAProxy.
    let victim = nodes.len() - 1;
    let before = f.reconnects();
    nodes[victim].broker.kill().await;
    let t = Instant::now();
    let _ = until(Duration::from_secs(10), "devices notice", || f.connected() < o.devices).await;
    let back = reconnected(&f, o.devices, Duration::from_secs(20), Duration::from_secs(300)).await;
    let moved = f.reconnects() - before;
    match back {
        Ok(_) => println!(
            "kill -9 of node {}: {moved} devices reconnected through HAProxy, all connected again {:.1} s after the kill; RSS of the survivors: {}",
            victim + 1,
            t.elapsed().as_secs_f64(),
            rss(&nodes[..victim])
        ),
        Err(e) => {
            // The nodes inherit this process's open-file limit, so their connection caps.
            let room = thingsd::net::connections_that_fit().map(|fit| fit * victim);
            let why = match room {
                Some(room) if room < o.devices => format!(" (the survivors hold at most {room}: connection caps below the open-file limit)"),
                _ => String::new(),
            };
            println!(
                "kill -9 of node {}: {moved} devices reconnected through HAProxy, then {e}{why}; RSS of the survivors: {}",
                victim + 1,
                rss(&nodes[..victim])
            )
        }
    }
    tokio::time::sleep(o.period).await;

    // The killed node comes back (same data directory and ports) and rejoins; then a rolling
    // restart of every node with the fleet connected — onto LOADTEST_THINGSD_UPGRADE if set
    // (an upgrade: the nodes not yet restarted run the older build, the wire versions meet).
    let t = Instant::now();
    match restart(&mut nodes, victim, None).await {
        Ok(()) => println!("node {} started again and rejoined in {:.1} s", victim + 1, t.elapsed().as_secs_f64()),
        Err(e) => println!("node {} started again: {e:#}", victim + 1),
    }
    let upgrade = std::env::var_os("LOADTEST_THINGSD_UPGRADE").map(std::path::PathBuf::from);
    let what = if upgrade.is_some() { "rolling upgrade" } else { "rolling restart" };
    for i in 0..o.nodes {
        let before = f.reconnects();
        let t = Instant::now();
        if let Err(e) = restart(&mut nodes, i, upgrade.as_deref()).await {
            println!("{what}, node {}: {e:#}", i + 1);
            continue;
        }
        let rejoined = t.elapsed();
        match until(Duration::from_secs(300), "fleet reconnected", || f.connected() == o.devices).await {
            Ok(_) => println!(
                "{what}, node {}: SIGTERM -> rejoined {:.1} s; {} devices moved, all connected {:.1} s after the SIGTERM",
                i + 1,
                rejoined.as_secs_f64(),
                f.reconnects() - before,
                t.elapsed().as_secs_f64()
            ),
            Err(e) => println!("{what}, node {}: {e} ({} of {} connected)", i + 1, f.connected(), o.devices),
        }
    }
    println!("RSS per node after the {what}: {}", rss(&nodes));

    // Stop publishing, let acknowledgements drain, then count what is stored.
    f.tell("quiet").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    f.tell("stop").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let acked = f.acked();
    let pool = sqlx::PgPool::connect(&db).await?;
    let (stored,): (i64,) = sqlx::query_as("SELECT count(*) FROM ts_points WHERE key = 'temp'").fetch_one(&pool).await?;
    println!(
        "telemetry: {acked} messages acknowledged, {stored} points stored ({}); {} reconnects in all",
        if stored as u64 >= acked { "none lost".to_string() } else { format!("{} LOST", acked - stored as u64) },
        f.reconnects()
    );
    for mut p in procs {
        let _ = p.start_kill();
    }
    for n in nodes {
        n.broker.stop().await;
    }
    pool.close().await;
    drop_database(&o.pg).await
}

/// Remove this run's database.
async fn drop_database(url: &str) -> anyhow::Result<()> {
    use sqlx::Executor;
    let admin = sqlx::PgPool::connect(url).await?;
    admin.execute(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS lt_fleet_{} WITH (FORCE)", std::process::id()))).await?;
    Ok(())
}
