//! `thingsd dev-cluster`: a local N-node cluster on loopback, for trying the cluster (README)
//! and for the cluster tests, which use the same config writer and ready-line parser.
//!
//! Every node binds port 0 (no port is guessed in advance); node 1 starts first and the others
//! are seeded with its cluster address, as read from its ready line (members are gossiped).
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Addresses a node printed on its `thingsd ready` line.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ready {
    pub mqtt: Option<SocketAddr>,
    /// An MQTT listener expecting the PROXY protocol (behind a load balancer).
    pub mqtt_proxy: Option<SocketAddr>,
    pub ws: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    pub cluster: Option<SocketAddr>,
    pub coap: Option<SocketAddr>,
}

impl Ready {
    /// Parse the listener addresses from a `thingsd ready` log line (`None` for other lines).
    pub fn parse(line: &str) -> Option<Ready> {
        if !line.contains("thingsd ready") {
            return None;
        }
        let mut r = Ready::default();
        for tok in line.split(['"', ' ', ',', '[', ']']) {
            let Some((scheme, addr)) = tok.split_once("://") else { continue };
            let Ok(a) = addr.trim_end_matches("/mqtt").parse::<SocketAddr>() else { continue };
            match scheme {
                "mqtt" => r.mqtt = r.mqtt.or(Some(a)),
                "mqtt+proxy" => r.mqtt_proxy = r.mqtt_proxy.or(Some(a)),
                "ws" => r.ws = r.ws.or(Some(a)),
                "http" => r.http = r.http.or(Some(a)),
                "cluster" => r.cluster = r.cluster.or(Some(a)),
                "coap" => r.coap = r.coap.or(Some(a)),
                _ => {}
            }
        }
        Some(r)
    }
}

/// Write `node{i}.toml` in `dir`: loopback listeners on `ports` (0 = any free port: MQTT, WS,
/// HTTP, cluster), its own data directory, clustering on with `seeds`.
pub fn write_config(dir: &Path, i: usize, seeds: &[String], ports: Ready) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let port = |a: Option<SocketAddr>| a.map_or(0, |a| a.port());
    let name = format!("node{i}");
    let data = dir.join(format!("{name}-data"));
    let seeds: Vec<String> = seeds.iter().map(|s| format!("\"{s}\"")).collect();
    let text = format!(
        "# written by `thingsd dev-cluster`\n[node]\nname = \"{name}\"\ndata_dir = \"{data}\"\npersist_interval_ms = 100\n\n\
         [[listeners.tcp]]\nbind = \"127.0.0.1:{mqtt}\"\nallow_anonymous = true\n\n[[listeners.ws]]\nbind = \"127.0.0.1:{ws}\"\npath = \"/mqtt\"\nallow_anonymous = true\n\n\
         [[listeners.http]]\nbind = \"127.0.0.1:{http}\"\n\n[[listeners.coap]]\nbind = \"127.0.0.1:{coap}\"\n\n\
         [cluster]\nenabled = true\nlisten = \"127.0.0.1:{cl}\"\nseeds = [{seeds}]\ncookie = \"dev-cluster-loopback-only\"\n",
        data = data.display(),
        mqtt = port(ports.mqtt),
        ws = port(ports.ws),
        http = port(ports.http),
        cl = port(ports.cluster),
        coap = port(ports.coap),
        seeds = seeds.join(", "),
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// `thingsd dev-cluster [--nodes N] [--dir DIR]`: start N nodes, print where they listen, and
/// stop them all (SIGTERM: graceful leave) on Ctrl-C.
pub fn main(args: &[String]) -> anyhow::Result<()> {
    let mut nodes = 3usize;
    let mut dir = PathBuf::from("dev-cluster");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--nodes" | "-n" => nodes = it.next().and_then(|v| v.parse().ok()).filter(|n| (1..=32).contains(n)).context("--nodes 1..32")?,
            "--dir" => dir = it.next().map(PathBuf::from).context("--dir DIR")?,
            other => anyhow::bail!("dev-cluster: unknown argument {other}"),
        }
    }
    let exe = std::env::current_exe().context("find the thingsd binary")?;
    let mut children = Vec::new();
    let mut seeds: Vec<String> = Vec::new();
    let mut table = Vec::new();
    for i in 1..=nodes {
        let config = write_config(&dir, i, &seeds, Ready::default())?;
        let mut child = std::process::Command::new(&exe)
            .arg("--config")
            .arg(&config)
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("start node{i}"))?;
        let mut lines = std::io::BufReader::new(child.stdout.take().context("node stdout")?).lines();
        let ready = loop {
            let line = lines.next().context("node exited before it was ready")??;
            println!("[node{i}] {line}");
            if let Some(r) = Ready::parse(&line) {
                break r;
            }
        };
        // Keep echoing the node's log, prefixed.
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                println!("[node{i}] {l}");
            }
        });
        if let Some(c) = ready.cluster.filter(|_| seeds.is_empty()) {
            seeds.push(c.to_string());
        }
        table.push((i, ready, config));
        children.push(child);
    }
    println!();
    for (i, r, config) in &table {
        let show = |a: Option<SocketAddr>| a.map_or("-".to_string(), |a| a.to_string());
        println!(
            "node{i}: mqtt {}  ws {}  http {}  cluster {}  ({})",
            show(r.mqtt),
            show(r.ws),
            show(r.http),
            show(r.cluster),
            config.display()
        );
    }
    if let (Some((_, a, _)), Some((_, b, _))) = (table.first(), table.last()) {
        if let (Some(a), Some(b)) = (a.mqtt, b.mqtt) {
            println!(
                "\nTry it:\n  mosquitto_sub -h 127.0.0.1 -p {} -t 'demo/#' -v &\n  mosquitto_pub -h 127.0.0.1 -p {} -t demo/hello -m 'across nodes'\nCtrl-C stops every node.",
                b.port(),
                a.port()
            );
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let _ = tokio::signal::ctrl_c().await;
    });
    for c in &children {
        let _ = std::process::Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
    }
    for mut c in children {
        let _ = c.wait();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ready_line() {
        let l = r#"2026-11-25T16:17:20Z  INFO thingsd ready node=n1 listeners=["cluster://127.0.0.1:11370", "mqtt://127.0.0.1:11883", "ws://127.0.0.1:8083/mqtt", "http://127.0.0.1:8080"] restored_sessions=0"#;
        let r = Ready::parse(l).unwrap();
        assert_eq!(r.cluster.unwrap().port(), 11370);
        assert_eq!(r.mqtt.unwrap().port(), 11883);
        assert_eq!(r.ws.unwrap().port(), 8083);
        assert_eq!(r.http.unwrap().port(), 8080);
        assert!(Ready::parse("something else").is_none());
    }
}
