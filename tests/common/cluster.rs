//! A real multi-process cluster on loopback, laid out like `thingsd dev-cluster` (same config
//! writer and ready-line parser): every node binds port 0 (on restarts too); node 1 is every
//! other node's seed.
use std::net::SocketAddr;
use std::process::Stdio;

use thingsd::dev::{write_config, Ready};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::{http_get, DEADLINE};

pub struct NodeProc {
    pub name: String,
    pub ready: Ready,
    pub child: Option<tokio::process::Child>,
}

/// The nodes' log filter when their log is echoed into the test's output: `TEST_NODE_LOG`, or
/// under nextest (which shows a test's output only when it fails) the cluster's hand-over and
/// membership steps, so a failed cluster test says where the time went.
fn node_log() -> Option<String> {
    match std::env::var("TEST_NODE_LOG") {
        Ok(v) if v == "off" => None,
        Ok(v) => Some(v),
        Err(_) if std::env::var_os("NEXTEST").is_some() => {
            Some("warn,thingsd=info,thingsd::cluster=debug,thingsd::actors::session::lifecycle=debug".into())
        }
        Err(_) => None,
    }
}

pub struct TestCluster {
    pub nodes: Vec<NodeProc>,
    pub dir: tempfile::TempDir,
    extra: Box<dyn Fn(usize) -> String + Send>,
    /// Seeds for every node instead of node 1's address (e.g. a proxy in front of it).
    pub seeds: Option<Vec<String>>,
    /// Extra environment for node i (e.g. `THINGSD_CLUSTER__COOKIE`).
    pub env: std::collections::HashMap<usize, Vec<(String, String)>>,
}

impl TestCluster {
    /// Start `n` nodes; returns once each sees all others up.
    pub async fn start(n: usize) -> TestCluster {
        Self::start_some(n, n, |_| String::new()).await
    }

    /// Room for `total` nodes, the first `n` started; `extra(i)` (TOML) is appended to node i's
    /// config (0-based).
    pub async fn start_some(total: usize, n: usize, extra: impl Fn(usize) -> String + Send + 'static) -> TestCluster {
        Self::start_env(total, n, extra, Default::default()).await
    }

    /// As [`TestCluster::start_some`], with extra environment for node i (`env[&i]`).
    pub async fn start_env(
        total: usize,
        n: usize,
        extra: impl Fn(usize) -> String + Send + 'static,
        env: std::collections::HashMap<usize, Vec<(String, String)>>,
    ) -> TestCluster {
        let nodes = (0..total).map(|i| NodeProc { name: format!("node{}", i + 1), ready: Ready::default(), child: None }).collect();
        let mut c = TestCluster { nodes, dir: tempfile::tempdir().unwrap(), extra: Box::new(extra), seeds: None, env };
        for i in 0..n {
            c.spawn(i).await;
        }
        for i in 0..n {
            c.wait_members(i, n).await;
        }
        c
    }

    fn write(&self, i: usize) -> std::path::PathBuf {
        let seeds: Vec<String> = match (&self.seeds, i) {
            (Some(s), _) => s.clone(),
            (None, 0) => vec![],
            (None, _) => vec![self.nodes[0].ready.cluster.expect("node1 started first").to_string()],
        };
        // Port 0 everywhere, restarts included: a port pinned from the previous run may have
        // been handed to another test meanwhile (peers learn the new address when it rejoins).
        let path = write_config(self.dir.path(), i + 1, &seeds, Ready::default()).unwrap();
        let add = (self.extra)(i);
        if !add.is_empty() {
            let mut text = std::fs::read_to_string(&path).unwrap();
            text.push_str(&add);
            std::fs::write(&path, text).unwrap();
        }
        path
    }

    /// Start node `i` (again) and wait for its ready line.
    pub async fn spawn(&mut self, i: usize) {
        let config = self.write(i);
        let log = node_log();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_thingsd"))
            .arg("--config")
            .arg(&config)
            .envs(self.env.get(&i).cloned().unwrap_or_default())
            .env("NO_COLOR", "1")
            .env("RUST_LOG", log.clone().unwrap_or_else(|| "warn,thingsd=info".into()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start thingsd");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = loop {
            let l = tokio::time::timeout(DEADLINE, lines.next_line()).await.expect("ready line in time").unwrap().expect("thingsd exited");
            if let Some(r) = Ready::parse(&l) {
                break r;
            }
        };
        let name = self.nodes[i].name.clone();
        let echo = log.is_some();
        tokio::spawn(async move {
            while let Ok(Some(l)) = lines.next_line().await {
                if echo {
                    eprintln!("[{name}] {l}");
                }
            }
        });
        let node = &mut self.nodes[i];
        node.ready = ready;
        node.child = Some(child);
    }

    /// SIGKILL node `i` and wait for it to be gone.
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            c.start_kill().unwrap();
            c.wait().await.unwrap();
        }
    }

    /// SIGTERM node `i` (graceful leave) and wait for it to exit.
    pub async fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let pid = c.id().unwrap();
            std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().unwrap();
            tokio::time::timeout(std::time::Duration::from_secs(30), c.wait()).await.expect("node exits after SIGTERM").unwrap();
        }
    }

    /// Members node `i` reports up (itself included).
    pub async fn members_up(&self, i: usize) -> usize {
        let (status, body) = http_get(self.http(i), "/health/cluster").await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["up"].as_u64().unwrap_or(0) as usize
    }

    /// Wait until node `i` sees exactly `n` members up.
    pub async fn wait_members(&self, i: usize, n: usize) {
        let end = tokio::time::Instant::now() + DEADLINE * 2;
        loop {
            let up = self.members_up(i).await;
            if up == n {
                return;
            }
            assert!(tokio::time::Instant::now() < end, "{} sees {up} members up, expected {n}", self.nodes[i].name);
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    pub fn mqtt(&self, i: usize) -> SocketAddr {
        self.nodes[i].ready.mqtt.expect("node started")
    }

    pub fn http(&self, i: usize) -> SocketAddr {
        self.nodes[i].ready.http.expect("node started")
    }
}
