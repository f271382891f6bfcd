//! The cache against the Redis topologies `cache.url` accepts: standalone, Sentinel and
//! Cluster, each started here from Debian's redis-server on free loopback ports.
use crate::common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use thingsd::storage::cache::Cache;

/// Child processes killed when the test ends, whatever happens.
struct Procs(Vec<Child>);
impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn redis_server() -> Option<&'static str> {
    let found = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"].into_iter().find(|p| std::path::Path::new(p).exists());
    if found.is_none() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("redis-server is required in CI (Debian package redis-server; scripts/test installs it)");
        }
        eprintln!("SKIPPED: redis-server is not installed (scripts/test installs it)");
    }
    found
}

/// A free port whose cluster bus port (+10000) is free too.
fn free_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p < 55_000 && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
}

fn spawn(bin: &str, args: &[String]) -> Child {
    Command::new(bin).args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start redis-server")
}

async fn wait_port(port: u16) {
    let end = tokio::time::Instant::now() + common::DEADLINE;
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(tokio::time::Instant::now() < end, "redis on {port} did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn base_args(port: u16, dir: &std::path::Path) -> Vec<String> {
    ["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", &dir.display().to_string()]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// What the device layer needs from the cache: TTL'd values, deletes, and notices between nodes.
async fn exercise(url: &str) {
    let a = tokio::time::timeout(common::DEADLINE, Cache::redis(url, "t:")).await.expect("connects in time").expect("connects");
    let b = Cache::redis(url, "t:").await.unwrap();
    let mut rx = b.subscribe("notices").await.expect("subscribed");
    for k in 0..20 {
        a.set(&format!("cred:token:{k}"), &format!("v{k}"), Duration::from_secs(60)).await;
    }
    for k in 0..20 {
        assert_eq!(b.get(&format!("cred:token:{k}")).await.as_deref(), Some(format!("v{k}").as_str()), "key {k} (keys spread over slots)");
    }
    let keys: Vec<String> = (0..20).map(|k| format!("cred:token:{k}")).collect();
    a.del(&keys).await;
    assert_eq!(b.get("cred:token:3").await, None);
    a.set("short", "x", Duration::from_millis(50)).await;
    let end = tokio::time::Instant::now() + common::DEADLINE;
    while b.get("short").await.is_some() {
        assert!(tokio::time::Instant::now() < end, "TTL never expired the key");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A subscription is live once a publish reaches it; publish until one does (bounded).
    let got = tokio::time::timeout(common::DEADLINE, async {
        loop {
            a.publish("notices", "hello").await;
            if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
                return m;
            }
        }
    })
    .await
    .expect("a notice arrives");
    assert_eq!(got, "hello");
    assert!(a.ping().await);
}

#[tokio::test]
async fn standalone_sentinel_and_cluster_urls() {
    let Some(bin) = redis_server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut procs = Procs(vec![]);

    // Standalone.
    let master = free_port();
    procs.0.push(spawn(bin, &base_args(master, dir.path())));
    wait_port(master).await;
    exercise(&format!("redis://127.0.0.1:{master}/0")).await;

    // Sentinel in front of that server.
    let sport = free_port();
    let conf = dir.path().join("sentinel.conf");
    std::fs::write(&conf, format!("port {sport}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {master} 1\nsentinel down-after-milliseconds mymaster 5000\n")).unwrap();
    procs.0.push(spawn(bin, &[conf.display().to_string(), "--sentinel".into()]));
    wait_port(sport).await;
    exercise(&format!("redis-sentinel://127.0.0.1:{sport}/0?sentinelServiceName=mymaster")).await;

    // A three-master Redis Cluster.
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    for p in &ports {
        let d = dir.path().join(format!("c{p}"));
        std::fs::create_dir_all(&d).unwrap();
        let mut args = base_args(*p, &d);
        args.extend(["--cluster-enabled".into(), "yes".into(), "--cluster-config-file".into(), d.join("nodes.conf").display().to_string()]);
        procs.0.push(spawn(bin, &args));
    }
    for p in &ports {
        wait_port(*p).await;
    }
    let mut create = vec!["--cluster".to_string(), "create".into()];
    create.extend(ports.iter().map(|p| format!("127.0.0.1:{p}")));
    create.extend(["--cluster-replicas".into(), "0".into(), "--cluster-yes".into()]);
    let out = tokio::process::Command::new("redis-cli").args(&create).output().await.expect("redis-cli (Debian redis-tools)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let end = tokio::time::Instant::now() + common::DEADLINE;
    loop {
        let info = tokio::process::Command::new("redis-cli").args(["-p", &ports[0].to_string(), "cluster", "info"]).output().await.unwrap();
        if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
            break;
        }
        assert!(tokio::time::Instant::now() < end, "the Redis cluster never became ok");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    exercise(&format!("redis-cluster://127.0.0.1:{}?node=127.0.0.1:{}&node=127.0.0.1:{}", ports[0], ports[1], ports[2])).await;
}
