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
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Start a node on free ports in `dir`; `env` adds or overrides settings.
pub async fn spawn(dir: &std::path::Path, env: &[(&str, String)]) -> Proc {
    let (port, http) = (free_port(), free_port());
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_thingsd"));
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
    loop {
        let l = tokio::time::timeout(DEADLINE, lines.next_line()).await.expect("ready line in time").unwrap().expect("thingsd exited");
        if l.contains("thingsd ready") {
            break;
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Proc { child, addr: format!("127.0.0.1:{port}").parse().unwrap(), http: format!("127.0.0.1:{http}").parse().unwrap() }
}
