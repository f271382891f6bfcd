//! thingsd as a child process (kill -9 tests): free ports, a data directory, extra settings as
//! THINGSD_* variables; ready when it prints its ready line.
use std::net::SocketAddr;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};

use super::DEADLINE;

pub struct Proc {
    pub child: tokio::process::Child,
    /// MQTT (TCP) and, unless `THINGSD_LISTENERS__HTTP` is overridden, HTTP.
    pub addr: SocketAddr,
    pub http: SocketAddr,
    /// Its standard output so far (log lines).
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Proc {
    /// Wait (with the deadline) for a log line that `f` accepts; returns it.
    pub async fn wait_log(&self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let end = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(l) = self.log.lock().unwrap().iter().find(|l| f(l)) {
                return l.clone();
            }
            assert!(tokio::time::Instant::now() < end, "no log line {what}: {:?}", self.log.lock().unwrap());
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Start a node on free ports in `dir`; `env` adds or overrides settings.
pub async fn spawn(dir: &std::path::Path, env: &[(&str, String)]) -> Proc {
    spawn_under(&[], dir, env).await
}

/// `spawn`, with the node's command line behind `wrapper` (e.g. `prlimit --nofile=…`).
pub async fn spawn_under(wrapper: &[&str], dir: &std::path::Path, env: &[(&str, String)]) -> Proc {
    let (port, http) = (free_port(), free_port());
    let mut cmd = match wrapper.split_first() {
        Some((exe, args)) => {
            let mut c = tokio::process::Command::new(exe);
            c.args(args).arg(env!("CARGO_BIN_EXE_thingsd"));
            c
        }
        None => tokio::process::Command::new(env!("CARGO_BIN_EXE_thingsd")),
    };
    cmd.env("THINGSD_LISTENERS__TCP", format!("[{{bind=\"127.0.0.1:{port}\", allow_anonymous=true}}]"))
        .env("THINGSD_LISTENERS__WS", "[]")
        .env("THINGSD_LISTENERS__HTTP", format!("[{{bind=\"127.0.0.1:{http}\"}}]"))
        .env("THINGSD_LISTENERS__COAP", "[]")
        .env("THINGSD_NODE__DATA_DIR", dir.display().to_string())
        .env("THINGSD_LOG__LEVEL", "info")
        .env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.current_dir(dir).stdout(Stdio::piped()).stderr(Stdio::null()).kill_on_drop(true).spawn().expect("start thingsd");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    loop {
        let l = tokio::time::timeout(DEADLINE, lines.next_line()).await.expect("ready line in time").unwrap().expect("thingsd exited");
        let ready = l.contains("thingsd ready");
        log.lock().unwrap().push(l);
        if ready {
            break;
        }
    }
    let keep = log.clone();
    tokio::spawn(async move {
        while let Ok(Some(l)) = lines.next_line().await {
            let mut v = keep.lock().unwrap();
            if v.len() < 100_000 {
                v.push(l);
            }
        }
    });
    Proc { child, addr: format!("127.0.0.1:{port}").parse().unwrap(), http: format!("127.0.0.1:{http}").parse().unwrap(), log }
}
