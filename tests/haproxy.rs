//! HAProxy (Debian's) in front of three nodes, configured by the shipped `deploy/haproxy.cfg`
//! (addresses substituted): clients connect through it with PROXY v2, a node is killed, the
//! subscriber reconnects through HAProxy to another node and loses no acknowledged message.
//! `deploy/nginx.conf` is syntax-checked by nginx itself.

use std::process::Stdio;

use crate::common::cluster::TestCluster;
use crate::common::*;
use thingsd::protocols::mqtt::*;

/// A free port for HAProxy/nginx to bind, from below the kernel's ephemeral range: HAProxy
/// binds with SO_REUSEPORT, so a port the kernel might hand to another test's port-0 listener
/// could end up shared with it.
fn free_port() -> u16 {
    let range: Vec<u16> = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .map(|s| s.split_whitespace().filter_map(|v| v.parse::<u16>().ok()).collect())
        .unwrap_or_default();
    let low = range.first().copied().unwrap_or(32768).max(2048);
    for _ in 0..1000 {
        let p = 1024 + (rand::random::<u16>() % (low - 1024));
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
    panic!("no free port below the ephemeral range");
}

/// A tool the test needs: present, or (outside CI) a clear skip; in CI its absence fails.
fn tool(path: &str) -> bool {
    if std::path::Path::new(path).exists() {
        return true;
    }
    assert!(
        std::env::var("CI").is_err(),
        "{path} is missing; scripts/test installs it (apt-get install haproxy nginx-light libnginx-mod-stream)"
    );
    eprintln!("SKIPPED: {path} not installed (scripts/test installs it); this test did not run");
    false
}

fn text(p: &Publish) -> String {
    String::from_utf8_lossy(&p.payload).into_owned()
}

async fn clients_connected(c: &TestCluster, i: usize) -> u64 {
    let (_, body) = http_get(c.http(i), "/metrics").await;
    body.lines().find_map(|l| l.strip_prefix("thingsd_clients_connected ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_in_front_of_three_nodes_survives_a_node_kill() {
    if !tool("/usr/sbin/haproxy") || !tool("/usr/sbin/nginx") {
        return;
    }
    let proxy_listener = |_| "\n[[listeners.tcp]]\nbind = \"127.0.0.1:0\"\nproxy_protocol = true\nallow_anonymous = true\n".to_string();
    let mut c = TestCluster::start_some(3, 3, proxy_listener).await;
    let tmp = tempfile::tempdir().unwrap();

    // The shipped configs with this cluster's addresses.
    let (front, api) = (free_port(), free_port());
    let mut cfg = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/haproxy.cfg")).unwrap();
    let mut ngx = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx.conf")).unwrap();
    // This machine allows 20,000 open files per process; the shipped maxconn needs more. And
    // no SO_REUSEPORT here: a port clash must fail loudly, not share another test's port.
    cfg = cfg.replace("maxconn 200000", "maxconn 4000\n    noreuseport");
    cfg = cfg.replace("bind :1883", &format!("bind 127.0.0.1:{front}")).replace("bind :8080", &format!("bind 127.0.0.1:{api}"));
    ngx = ngx
        .replace("listen 1883;", &format!("listen 127.0.0.1:{};", free_port()))
        .replace("listen 8080;", &format!("listen 127.0.0.1:{};", free_port()));
    for i in 0..3 {
        let (mqtt, http) = (c.nodes[i].ready.mqtt_proxy.expect("proxy listener"), c.http(i));
        let name = format!("thingsd-{}", i + 1);
        cfg = cfg
            .replace(&format!("{name}:1884 send-proxy-v2 check port 8080"), &format!("{mqtt} send-proxy-v2 check port {}", http.port()))
            .replace(&format!("{name}:8080 check"), &format!("{http} check"));
        ngx = ngx.replace(&format!("{name}:1884"), &mqtt.to_string()).replace(&format!("{name}:8080"), &http.to_string());
    }
    assert!(!cfg.contains("thingsd-1:") && !ngx.contains("thingsd-1:"), "every address substituted");
    let cfg_path = tmp.path().join("haproxy.cfg");
    std::fs::write(&cfg_path, &cfg).unwrap();
    let ngx_path = tmp.path().join("nginx.conf");
    std::fs::write(&ngx_path, &ngx).unwrap();
    let check = std::process::Command::new("/usr/sbin/nginx")
        .args(["-t", "-c"])
        .arg(&ngx_path)
        .args(["-g", &format!("pid {}/nginx.pid; error_log stderr;", tmp.path().display())])
        .output()
        .unwrap();
    assert!(check.status.success(), "nginx -t: {}", String::from_utf8_lossy(&check.stderr));
    let check = std::process::Command::new("/usr/sbin/haproxy").arg("-c").arg("-f").arg(&cfg_path).output().unwrap();
    assert!(check.status.success(), "haproxy -c: {}", String::from_utf8_lossy(&check.stderr));
    let mut haproxy = tokio::process::Command::new("/usr/sbin/haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&cfg_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lb: std::net::SocketAddr = format!("127.0.0.1:{front}").parse().unwrap();

    // A proxy listener refuses a client that does not send the PROXY header.
    let mut direct = Raw::connect(c.nodes[0].ready.mqtt_proxy.unwrap()).await;
    direct.send(connect5("no-header", true)).await;
    assert!(direct.until_closed().await.is_empty(), "no CONNACK without a PROXY header");

    // Connect through HAProxy (its health checks may still be coming up: retry, bounded).
    let persistent = |clean: bool| {
        let mut cp = connect_packet(Protocol::V5, "ha-sub", clean);
        cp.props.session_expiry_interval = Some(3600);
        cp
    };
    let connect = |cp: Connect| async move {
        let end = tokio::time::Instant::now() + DEADLINE * 2;
        loop {
            if let Some(mut raw) = Raw::try_connect(lb).await {
                raw.protocol = cp.protocol;
                raw.send(Packet::Connect(Box::new(cp.clone()))).await;
                if let Some(Packet::ConnAck(a)) = raw.recv().await {
                    return (raw, a);
                }
            }
            assert!(tokio::time::Instant::now() < end, "no node answered through HAProxy");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    let (mut s, _) = connect(persistent(true)).await;
    s.sub("ha/#", QoS::AtLeastOnce).await;
    let mut holder = None;
    for i in 0..3 {
        if clients_connected(&c, i).await == 1 {
            holder = Some(i);
        }
    }
    let holder = holder.expect("the subscriber is on one node");
    let (mut p, _) = connect(connect_packet(Protocol::V5, "ha-pub", true)).await;
    for i in 0..100u16 {
        p.send(publish("ha/t", QoS::AtLeastOnce, i + 1, &i.to_string())).await;
        assert!(matches!(p.recv_app().await, Some(Packet::PubAck(_))));
    }
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 100 {
        let m = s.recv_publish().await;
        seen.insert(text(&m).parse::<u16>().unwrap());
        s.send(Packet::PubAck(Ack::new(m.pkid, 0))).await;
    }
    // The subscriber's node dies; the publisher (on another node, leastconn) goes on.
    c.kill(holder).await;
    assert!(s.until_closed().await.iter().all(|p| !matches!(p, Packet::ConnAck(_))));
    let mut publisher_alive = true;
    for i in 100..200u16 {
        p.send(publish("ha/t", QoS::AtLeastOnce, i + 1, &i.to_string())).await;
        match p.recv_app().await {
            Some(Packet::PubAck(_)) => {}
            _ => {
                publisher_alive = false; // its node was the one killed: nothing more is acknowledged
                break;
            }
        }
    }
    assert!(publisher_alive, "leastconn put the publisher on another node");
    let (mut s, ack) = connect(persistent(false)).await;
    assert_eq!(ack.code, 0);
    assert!(ack.session_present, "the session survived its node, reached through HAProxy");
    let mut order = Vec::new();
    while seen.len() < 200 {
        let m = s.recv_publish().await;
        let v = text(&m).parse::<u16>().unwrap();
        if seen.insert(v) {
            order.push(v);
        }
        s.send(Packet::PubAck(Ack::new(m.pkid, 0))).await;
    }
    assert!(order.windows(2).all(|w| w[0] < w[1]), "new messages in order");
    haproxy.start_kill().unwrap();
}
