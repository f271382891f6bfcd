//! A real multi-process cluster on loopback: configs written by `thingsd dev-cluster
//! --write-only` (the same command users run), one `thingsd` process per node.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};

use super::{http_get, DEADLINE};

pub struct NodeProc {
    pub name: String,
    pub config: PathBuf,
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
    pub child: Option<tokio::process::Child>,
}

pub struct TestCluster {
    pub nodes: Vec<NodeProc>,
    pub dir: tempfile::TempDir,
}

fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_thingsd")
}

impl TestCluster {
    /// Write `n` node configs and start every node; returns once each sees all others up.
    pub async fn start(n: usize) -> TestCluster {
        Self::start_with(n, |_| String::new()).await
    }

    /// Like `start`, appending `extra(i)` (TOML) to node i's config.
    pub async fn start_with(n: usize, extra: impl Fn(usize) -> String) -> TestCluster {
        Self::start_some(n, n, extra).await
    }

    /// Write configs for `total` nodes (all seeded with each other) but start only the first `n`.
    pub async fn start_some(total: usize, n: usize, extra: impl Fn(usize) -> String) -> TestCluster {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(exe())
            .args(["dev-cluster", "--write-only", "--nodes", &total.to_string(), "--dir"])
            .arg(dir.path())
            .output()
            .expect("run thingsd dev-cluster");
        assert!(out.status.success(), "dev-cluster failed: {}", String::from_utf8_lossy(&out.stderr));
        let mut nodes = Vec::new();
        for i in 0..total {
            let config = dir.path().join(format!("node{}.toml", i + 1));
            let add = extra(i);
            if !add.is_empty() {
                let mut text = std::fs::read_to_string(&config).unwrap();
                text.push_str(&add);
                std::fs::write(&config, text).unwrap();
            }
            let c = thingsd::config::Config::load(Some(&config)).expect("dev-cluster config loads");
            nodes.push(NodeProc {
                name: c.node.name.clone(),
                config,
                mqtt: c.listeners.tcp[0].bind,
                http: c.listeners.http[0].bind,
                child: None,
            });
        }
        let mut c = TestCluster { nodes, dir };
        for i in 0..n {
            c.spawn(i).await;
        }
        for i in 0..n {
            c.wait_members(i, n).await;
        }
        c
    }

    /// Start node `i` (again) and wait for its ready line.
    pub async fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let mut child = tokio::process::Command::new(exe())
            .arg("--config")
            .arg(&node.config)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", std::env::var("THINGSD_TEST_LOG").unwrap_or_else(|_| "warn,thingsd=info".into()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start thingsd");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        loop {
            let l = tokio::time::timeout(DEADLINE, lines.next_line()).await.expect("ready line in time").unwrap().expect("thingsd exited");
            if l.contains("thingsd ready") {
                break;
            }
        }
        let name = node.name.clone();
        tokio::spawn(async move {
            while let Ok(Some(l)) = lines.next_line().await {
                if std::env::var("THINGSD_TEST_LOG").is_ok() {
                    eprintln!("[{name}] {l}");
                }
            }
        });
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
        let (status, body) = http_get(self.nodes[i].http, "/health/cluster").await;
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
        self.nodes[i].mqtt
    }
}
