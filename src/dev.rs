//! `thingsd dev-cluster`: a local N-node cluster on free loopback ports, for trying the cluster
//! and for the cluster tests (which use `--write-only` and start the nodes themselves).
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Ports of one node of a dev cluster.
#[derive(Debug, Clone)]
pub struct DevNode {
    pub name: String,
    pub config: PathBuf,
    pub mqtt: u16,
    pub ws: u16,
    pub http: u16,
    pub cluster: u16,
}

/// Write `nodes` configs (`node1.toml`…) into `dir`, each with free ports, all seeded with every other node.
pub fn write_configs(dir: &Path, nodes: usize) -> anyhow::Result<Vec<DevNode>> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    // Hold every listener until all ports are chosen so no two nodes get the same one.
    let held: Vec<Vec<TcpListener>> =
        (0..nodes).map(|_| (0..4).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<Result<Vec<_>, _>>()).collect::<Result<_, _>>()?;
    let ports: Vec<Vec<u16>> = held.iter().map(|v| v.iter().map(|l| l.local_addr().map(|a| a.port()).unwrap_or(0)).collect()).collect();
    drop(held);
    let mut out = Vec::new();
    for i in 0..nodes {
        let p = &ports[i];
        let name = format!("node{}", i + 1);
        let seeds: Vec<String> = (0..nodes).filter(|j| *j != i).map(|j| format!("\"127.0.0.1:{}\"", ports[j][3])).collect();
        let data = dir.join(format!("{name}-data"));
        let text = format!(
            "# dev-cluster node {n} of {nodes}\n[node]\nname = \"{name}\"\ndata_dir = \"{data}\"\npersist_interval_ms = 100\n\n\
             [[listeners.tcp]]\nbind = \"127.0.0.1:{mqtt}\"\n\n[[listeners.ws]]\nbind = \"127.0.0.1:{ws}\"\npath = \"/mqtt\"\n\n\
             [[listeners.http]]\nbind = \"127.0.0.1:{http}\"\n\n\
             [cluster]\nenabled = true\nlisten = \"127.0.0.1:{cl}\"\nseeds = [{seeds}]\ncookie = \"dev-cluster\"\n",
            n = i + 1,
            data = data.display(),
            mqtt = p[0],
            ws = p[1],
            http = p[2],
            cl = p[3],
            seeds = seeds.join(", "),
        );
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, text).with_context(|| format!("write {}", config.display()))?;
        out.push(DevNode { name, config, mqtt: p[0], ws: p[1], http: p[2], cluster: p[3] });
    }
    Ok(out)
}

/// `thingsd dev-cluster [--nodes N] [--dir DIR] [--write-only]`.
pub fn main(args: &[String]) -> anyhow::Result<()> {
    let mut nodes = 3usize;
    let mut dir = PathBuf::from("dev-cluster");
    let mut write_only = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--nodes" | "-n" => nodes = it.next().and_then(|v| v.parse().ok()).filter(|n| (1..=32).contains(n)).context("--nodes 1..32")?,
            "--dir" => dir = it.next().map(PathBuf::from).context("--dir DIR")?,
            "--write-only" => write_only = true,
            other => anyhow::bail!("dev-cluster: unknown argument {other}"),
        }
    }
    let list = write_configs(&dir, nodes)?;
    for n in &list {
        println!("{}: mqtt 127.0.0.1:{}  ws ws://127.0.0.1:{}/mqtt  http http://127.0.0.1:{}  config {}", n.name, n.mqtt, n.ws, n.http, n.cluster_display());
    }
    if write_only {
        return Ok(());
    }
    let exe = std::env::current_exe().context("find the thingsd binary")?;
    let mut children = Vec::new();
    for n in &list {
        children.push(std::process::Command::new(&exe).arg("--config").arg(&n.config).spawn().with_context(|| format!("start {}", n.name))?);
    }
    if let (Some(a), Some(b)) = (list.first(), list.last()) {
        println!(
            "\nTry it:  mosquitto_sub -p {} -t 'demo/#' -v &   mosquitto_pub -p {} -t demo/hello -m 'across nodes'\nCtrl-C stops every node.",
            b.mqtt, a.mqtt
        );
    }
    // Stop the nodes when we are interrupted (they get SIGTERM: graceful leave).
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

impl DevNode {
    fn cluster_display(&self) -> String {
        format!("{} (cluster 127.0.0.1:{})", self.config.display(), self.cluster)
    }
}
