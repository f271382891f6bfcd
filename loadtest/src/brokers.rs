//! Start the brokers under test as child processes on free loopback ports.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::process::{Child, Command};

/// Node CPU seconds (user + system) from /proc.
pub fn cpu_secs(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit_once(')').map_or("", |x| x.1);
    let f: Vec<&str> = after.split_whitespace().collect();
    // /proc reports in USER_HZ, which Linux fixes at 100 for user space.
    let tick = 100.0;
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / tick
}

pub struct Broker {
    pub name: String,
    pub addr: SocketAddr,
    child: Option<Child>,
    pub dir: PathBuf,
    /// How it was started (thingsd): to start it again on the same port and data directory.
    restart: Option<(String, usize)>,
}

impl Broker {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Resident set size of the broker process in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
    }

    /// RSS once the broker's start-up allocations are done (two readings 0.5 s apart within
    /// 256 KiB, at most 10 s): a reading taken right after the port opens varied by 40 MB
    /// between runs of one build, which moved a per-connection figure by 2 KiB.
    pub async fn settled_rss_kib(&self) -> Option<u64> {
        let mut last = self.rss_kib()?;
        for _ in 0..20 {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let now = self.rss_kib()?;
            if now.abs_diff(last) < 256 {
                return Some(now);
            }
            last = now;
        }
        Some(last)
    }

    pub async fn stop(mut self) {
        self.kill().await;
    }

    /// SIGKILL, and wait for the process to be gone.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    /// Start the (killed) broker again on its port and data directory; returns once it accepts.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        let (kind, max_conns) = self.restart.clone().context("this broker cannot be restarted")?;
        let b = start_at(&kind, max_conns, self.addr.port(), self.dir.clone()).await?;
        self.child = b.child;
        Ok(())
    }
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Scratch directories of this run (brokers' data, node logs, HAProxy and worker logs).
static SCRATCH: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn scratch(name: &str) -> anyhow::Result<PathBuf> {
    let name: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    let d = std::env::temp_dir().join(format!("loadtest-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    SCRATCH.lock().unwrap().push(d.clone());
    Ok(d)
}

/// After a run: remove its scratch directories if it succeeded (unless `LOADTEST_KEEP` is set);
/// after a failure keep them and say where the logs are.
pub fn clean_scratch(ok: bool) {
    let dirs = std::mem::take(&mut *SCRATCH.lock().unwrap());
    if ok && std::env::var_os("LOADTEST_KEEP").is_none() {
        for d in dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    } else {
        for d in dirs {
            eprintln!("loadtest: kept {}", d.display());
        }
    }
}

async fn wait_ready(addr: SocketAddr) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("broker at {addr} did not start listening")
}

fn thingsd_binary() -> anyhow::Result<PathBuf> {
    // Another build to measure (an older commit, say) with this generator.
    if let Some(p) = std::env::var_os("LOADTEST_THINGSD") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let p = exe.parent().context("exe dir")?.join("thingsd");
    if !p.exists() {
        bail!("{} not found: build it with `cargo build --release --workspace`", p.display());
    }
    Ok(p)
}

/// Start `kind` ("thingsd", "thingsd=PATH", "mosquitto", "rumqttd") or connect to `host:port`.
/// A thingsd kind may end in `@accepted`, `@written` or `@synced`: its state store's durability.
pub async fn start(kind: &str, max_conns: usize) -> anyhow::Result<Broker> {
    if let Ok(addr) = kind.parse::<SocketAddr>() {
        return Ok(Broker { name: kind.into(), addr, child: None, dir: PathBuf::new(), restart: None });
    }
    start_at(kind, max_conns, free_port()?, scratch(kind)?).await
}

async fn start_at(kind: &str, max_conns: usize, port: u16, dir: PathBuf) -> anyhow::Result<Broker> {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let (base, durability) = match kind.split_once('@') {
        Some((b, d)) => (b, Some(d)),
        None => (kind, None),
    };
    let mut cmd = match base {
        // thingsd-nostats: the same node with the actor inspector's per-message statistics off,
        // to measure what the instrumentation costs (`--scenario inspect`).
        // thingsd=PATH: another build of thingsd (an earlier commit's), to compare two builds
        // in the same run: `--compare thingsd=/tmp/thingsd-before`.
        k if k == "thingsd" || k == "thingsd-nostats" || k.starts_with("thingsd=") => {
            let bin = match k.strip_prefix("thingsd=") {
                Some(path) => PathBuf::from(path),
                None => thingsd_binary()?,
            };
            let mut c = Command::new(bin);
            c.env("THINGSD_NODE__ACTOR_STATS", (base != "thingsd-nostats").to_string());
            if let Some(d) = durability {
                c.env("THINGSD_NODE__DURABILITY", d);
            }
            c.env("THINGSD_LISTENERS__TCP", format!("[{{bind=\"127.0.0.1:{port}\", allow_anonymous=true}}]"))
                .env("THINGSD_LISTENERS__WS", "[]")
                .env("THINGSD_LISTENERS__COAP", "[]")
                .env("THINGSD_LISTENERS__HTTP", "[]")
                .env("THINGSD_NODE__DATA_DIR", dir.join("data").display().to_string())
                .env("THINGSD_MQTT__MAX_CONNECTIONS", (max_conns + 100).to_string())
                .env("THINGSD_LOG__LEVEL", "warn")
                .current_dir(&dir);
            c
        }
        "mosquitto" => {
            let conf = dir.join("mosquitto.conf");
            std::fs::write(
                &conf,
                format!(
                    "listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 100000\nmax_inflight_messages 100\nmax_connections -1\npersistence false\nlog_dest none\n"
                ),
            )?;
            let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
                .into_iter()
                .find(|p| std::path::Path::new(p).exists())
                .context("mosquitto not installed (apt-get install mosquitto)")?;
            let mut c = Command::new(bin);
            c.arg("-c").arg(conf);
            c
        }
        "rumqttd" => {
            let conf = dir.join("rumqttd.toml");
            std::fs::write(
                &conf,
                format!(
                    r#"id = 0

[router]
id = 0
max_connections = {mc}
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 0
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 20480
    max_inflight_count = 100
    dynamic_filters = true
"#,
                    mc = max_conns + 100
                ),
            )?;
            let home = std::env::var("HOME").unwrap_or_default();
            let bin = [format!("{home}/.cargo/bin/rumqttd"), "rumqttd".into()]
                .into_iter()
                .find(|p| std::path::Path::new(p).exists() || p == "rumqttd")
                .unwrap_or_default();
            let mut c = Command::new(bin);
            c.arg("-c").arg(conf).arg("-q");
            c
        }
        other => bail!("unknown broker {other}"),
    };
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).kill_on_drop(true);
    let child = cmd.spawn().with_context(|| format!("start {kind}"))?;
    wait_ready(addr).await?;
    let restart = base.starts_with("thingsd").then(|| (kind.to_string(), max_conns));
    Ok(Broker { name: kind.into(), addr, child: Some(child), dir, restart })
}

/// The admin API key the `devices` scenario configures.
pub const ADMIN_KEY: &str = "loadtest-admin-key-0123456789";

/// A thingsd node with its HTTP admin API on (for creating devices): (broker, HTTP address).
/// Its MQTT listener also admits anonymous clients (the scenario's subscriber and its
/// anonymous comparison publishers); devices log in with their tokens.
pub async fn start_platform(max_conns: usize, extra_env: &[(&str, String)]) -> anyhow::Result<(Broker, SocketAddr)> {
    let (port, hport) = (free_port()?, free_port()?);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let dir = scratch("platform")?;
    let mut c = Command::new(thingsd_binary()?);
    c.env("THINGSD_LISTENERS__TCP", format!("[{{bind=\"127.0.0.1:{port}\", allow_anonymous=true}}]"))
        .env("THINGSD_LISTENERS__WS", "[]")
        .env("THINGSD_LISTENERS__COAP", "[]")
        .env("THINGSD_LISTENERS__HTTP", format!("[{{bind=\"127.0.0.1:{hport}\"}}]"))
        .env("THINGSD_DEVICES__ADMIN_KEY", ADMIN_KEY)
        .env("THINGSD_DEVICES__AUTH_FAIL_LIMIT", "0")
        .env("THINGSD_NODE__DATA_DIR", dir.join("data").display().to_string())
        .env("THINGSD_MQTT__MAX_CONNECTIONS", (max_conns + 100).to_string())
        .env("THINGSD_LOG__LEVEL", "warn")
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in extra_env {
        c.env(k, v);
    }
    let child = c.spawn().context("start thingsd")?;
    wait_ready(addr).await?;
    Ok((Broker { name: "thingsd".into(), addr, child: Some(child), dir, restart: None }, format!("127.0.0.1:{hport}").parse()?))
}

/// A local thingsd cluster of `n` nodes (same layout as `thingsd dev-cluster`); returns once
/// every node has logged all its peers up. Brokers are named `thingsd-A`, `thingsd-B`, ….
pub async fn start_cluster(n: usize, max_conns: usize) -> anyhow::Result<Vec<Broker>> {
    Ok(start_cluster_with(n, max_conns, &[]).await?.into_iter().map(|n| n.broker).collect())
}

/// A node of a local cluster and the listeners it reported.
pub struct ClusterNode {
    pub broker: Broker,
    pub ready: thingsd::dev::Ready,
    /// Cluster members this node sees up (its log's member up/down lines).
    pub up: tokio::sync::watch::Receiver<usize>,
    index: usize,
    env: Vec<(String, String)>,
}

type Started = (Child, thingsd::dev::Ready, tokio::sync::watch::Receiver<usize>);

/// Start one node from `config` and wait for its `thingsd ready` line; its log lines (from
/// the first) count the cluster members it sees up.
async fn spawn_node(exe: &std::path::Path, config: &std::path::Path, env: &[(String, String)]) -> anyhow::Result<Started> {
    use thingsd::dev::Ready;
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = Command::new(exe)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", std::env::var("LOADTEST_NODE_LOG").unwrap_or_else(|_| "warn,thingsd=info".into()))
        .env("NO_COLOR", "1")
        .env("THINGSD_NODE__PERSIST_INTERVAL_MS", "1000")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let (tx, rx) = tokio::sync::watch::channel(0usize);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    // The node's log, kept beside its config (`node{i}.toml` -> `node{i}.log`, appended). Every
    // line counts, those before the ready line too: a node may see its peers up before it is
    // ready to serve.
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(config.with_extension("log"))?;
    tokio::spawn(async move {
        use std::io::Write;
        let mut up = 0usize;
        let mut ready_tx = Some(ready_tx);
        while let Ok(Some(l)) = lines.next_line().await {
            let _ = writeln!(log, "{l}");
            if let Some(r) = ready_tx.is_some().then(|| Ready::parse(&l)).flatten() {
                if let Some(t) = ready_tx.take() {
                    let _ = t.send(r);
                }
            } else if l.contains("cluster member up") {
                up += 1;
                let _ = tx.send(up);
            } else if l.contains("cluster member down") {
                up = up.saturating_sub(1);
                let _ = tx.send(up);
            }
        }
    });
    let ready = tokio::time::timeout(Duration::from_secs(30), ready_rx).await?.context("node exited before it was ready")?;
    Ok((child, ready, rx))
}

/// `start_cluster` with extra `THINGSD_*` settings for every node.
pub async fn start_cluster_with(n: usize, max_conns: usize, extra_env: &[(&str, String)]) -> anyhow::Result<Vec<ClusterNode>> {
    use thingsd::dev::{write_config, Ready};
    let dir = scratch("cluster")?;
    let exe = thingsd_binary()?;
    let mut nodes: Vec<ClusterNode> = Vec::new();
    let mut seeds: Vec<String> = Vec::new();
    let mut env: Vec<(String, String)> = extra_env.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    env.push(("THINGSD_MQTT__MAX_CONNECTIONS".into(), (max_conns + 100).to_string()));
    for i in 1..=n {
        let config = write_config(&dir, i, &seeds, Ready::default())?;
        let (child, ready, up) = spawn_node(&exe, &config, &env).await?;
        if seeds.is_empty() {
            seeds.push(ready.cluster.context("cluster address")?.to_string());
        }
        // A restart binds the same ports (HAProxy and the other nodes know them).
        write_config(&dir, i, &seeds[..usize::from(i > 1)], ready)?;
        let mut own = env.clone();
        for (k, v) in own.iter_mut() {
            if k == "THINGSD_LISTENERS__TCP" {
                let mut l = vec![format!(r#"{{bind="{}", allow_anonymous=true}}"#, ready.mqtt.context("mqtt address")?)];
                if let Some(p) = ready.mqtt_proxy {
                    l.push(format!(r#"{{bind="{p}", proxy_protocol=true}}"#));
                }
                *v = format!("[{}]", l.join(", "));
            }
        }
        let name = format!("thingsd-{}", (b'A' + i as u8 - 1) as char);
        let addr = ready.mqtt.context("mqtt address")?;
        let broker = Broker { name, addr, child: Some(child), dir: dir.clone(), restart: None };
        nodes.push(ClusterNode { broker, ready, up, index: i, env: own });
    }
    for node in &mut nodes {
        tokio::time::timeout(Duration::from_secs(30), node.up.wait_for(|up| *up + 1 >= n)).await.context("cluster did not form")??;
    }
    Ok(nodes)
}

impl ClusterNode {
    /// SIGTERM (a graceful stop: the node leaves the cluster, its sessions move) and wait for
    /// the process to exit (SIGKILL after 60 s). Returns how long it took to exit, if it ran.
    pub async fn terminate(&mut self) -> Option<Duration> {
        let mut c = self.broker.child.take()?;
        let t = Instant::now();
        if let Some(pid) = c.id() {
            let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
        }
        if tokio::time::timeout(Duration::from_secs(60), c.wait()).await.is_err() {
            eprintln!("loadtest: {} did not stop within 60 s of SIGTERM: killed", self.broker.name);
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
        Some(t.elapsed())
    }

    /// Stop the node gracefully (SIGTERM: it leaves the cluster, its sessions move), unless it
    /// is already gone, and start it again from the same data directory and ports — on `exe`
    /// if given (a rolling upgrade), else the same build. Returns once it sees `members` others.
    pub async fn restart(&mut self, exe: Option<&std::path::Path>, members: usize) -> anyhow::Result<()> {
        self.terminate().await;
        let exe = match exe {
            Some(e) => e.to_path_buf(),
            None => thingsd_binary()?,
        };
        let config = self.broker.dir.join(format!("node{}.toml", self.index));
        let (child, ready, up) = spawn_node(&exe, &config, &self.env).await?;
        self.broker.child = Some(child);
        self.ready = ready;
        self.up = up;
        if tokio::time::timeout(Duration::from_secs(20), self.up.wait_for(|up| *up >= members)).await.is_err() {
            bail!("{} did not rejoin within 20 s: it sees {} of {members} other members", self.broker.name, *self.up.borrow());
        }
        Ok(())
    }
}
