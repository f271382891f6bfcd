//! Shared test helpers: start a node on port 0, a raw MQTT client built on our codec for exact
//! packet-level assertions, and rumqttc helpers. Every wait has a deadline.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use thingsd::config::{Config, TcpListenerConfig, TlsListenerConfig, WsListenerConfig};
use thingsd::protocols::mqtt::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

pub const DEADLINE: Duration = Duration::from_secs(10);

/// A node running in this process on loopback ports chosen by the OS.
pub struct Node {
    pub tcp: SocketAddr,
    pub ws: SocketAddr,
    pub tls: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    pub coap: Option<SocketAddr>,
    pub dir: PathBuf,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _tmp: Option<tempfile::TempDir>,
}

pub fn test_config(dir: &std::path::Path) -> Config {
    let mut c = Config::default();
    c.node.data_dir = dir.to_path_buf();
    c.node.persist_interval_ms = 50;
    // The broker tests use anonymous clients; the device tests use a listener without.
    let mut tcp = TcpListenerConfig::new("127.0.0.1:0".parse().unwrap());
    tcp.allow_anonymous = true;
    c.listeners.tcp = vec![tcp];
    c.listeners.ws =
        vec![WsListenerConfig { bind: "127.0.0.1:0".parse().unwrap(), path: "/mqtt".into(), proxy_protocol: false, allow_anonymous: true }];
    c.listeners.coap = vec![];
    c.listeners.tls = vec![];
    c.listeners.http = vec![TcpListenerConfig::new("127.0.0.1:0".parse().unwrap())];
    c.mqtt.sys_interval_secs = 1;
    c
}

/// Start a node with `tweak` applied to a loopback test config; a fresh data directory.
pub async fn start(tweak: impl FnOnce(&mut Config)) -> Node {
    let tmp = tempfile::tempdir().unwrap();
    let mut n = start_in(tmp.path().to_path_buf(), tweak).await;
    n._tmp = Some(tmp);
    n
}

/// Start a node on an existing data directory (for restart tests).
pub async fn start_in(dir: PathBuf, tweak: impl FnOnce(&mut Config)) -> Node {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let mut cfg = test_config(&dir);
    tweak(&mut cfg);
    let bound = thingsd::server::bind(&cfg).await.expect("bind");
    let addrs = bound.addrs();
    let http = bound.http_addrs().first().copied();
    let coap = bound.coap_addrs().first().copied();
    let tls = if cfg.listeners.tls.is_empty() { None } else { addrs.last().copied() };
    let shutdown = CancellationToken::new();
    let ntcp = cfg.listeners.tcp.len();
    let task = tokio::spawn(thingsd::server::run(bound, cfg, shutdown.clone()));
    let ws = addrs[ntcp];
    // Ready when a client gets a CONNACK.
    let ready = match Raw::try_connect(addrs[0]).await {
        Some(mut c) => {
            c.send(connect5("readiness-probe", true)).await;
            let ok = matches!(c.recv().await, Some(Packet::ConnAck(_)));
            c.send(Packet::Disconnect(Disconnect { code: 0, props: Properties::default() })).await;
            ok
        }
        None => false,
    };
    if !ready {
        // Say why: the node's own error if it stopped.
        match tokio::time::timeout(DEADLINE, task).await {
            Ok(r) => panic!("node did not become ready: {r:?}"),
            Err(_) => panic!("node did not become ready (still running)"),
        }
    }
    Node { tcp: addrs[0], ws, tls, http, coap, dir, shutdown, task, _tmp: None }
}

impl Node {
    /// Graceful stop; returns the data directory's temp guard so a restart can reuse it.
    pub async fn stop(mut self) -> Option<tempfile::TempDir> {
        self.shutdown.cancel();
        let task = std::mem::replace(&mut self.task, tokio::spawn(async { Ok(()) }));
        tokio::time::timeout(Duration::from_secs(30), task).await.expect("node stops in time").unwrap().unwrap();
        self._tmp.take()
    }
}

/// Self-signed certificate for `localhost` in `dir`: (cert path, key path, cert DER).
pub fn tls_files(dir: &std::path::Path) -> (PathBuf, PathBuf, Vec<u8>) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    (cert, key, ck.cert.der().to_vec())
}

pub fn tls_listener(cert: PathBuf, key: PathBuf) -> TlsListenerConfig {
    TlsListenerConfig { bind: "127.0.0.1:0".parse().unwrap(), cert, key, proxy_protocol: false, allow_anonymous: true, client_ca: None }
}

pub fn connect_packet(protocol: Protocol, id: &str, clean: bool) -> Connect {
    Connect {
        protocol,
        clean_start: clean,
        keep_alive: 60,
        client_id: id.into(),
        will: None,
        username: None,
        password: None,
        props: Properties::default(),
    }
}

pub fn connect5(id: &str, clean: bool) -> Packet {
    Packet::Connect(Box::new(connect_packet(Protocol::V5, id, clean)))
}

pub fn connect4(id: &str, clean: bool) -> Packet {
    Packet::Connect(Box::new(connect_packet(Protocol::V4, id, clean)))
}

pub fn publish(topic: &str, qos: QoS, pkid: u16, payload: &str) -> Packet {
    publish_props(topic, qos, pkid, payload, None)
}

pub fn publish_props(topic: &str, qos: QoS, pkid: u16, payload: &str, props: Option<Properties>) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        pkid,
        props: props.map(Box::new),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
    })
}

pub fn subscribe(pkid: u16, filter: &str, qos: QoS) -> Packet {
    Packet::Subscribe(Subscribe { pkid, filters: vec![(filter.into(), SubOptions::qos(qos))], props: Properties::default() })
}

pub fn disconnect() -> Packet {
    Packet::Disconnect(Disconnect { code: 0, props: Properties::default() })
}

/// A raw MQTT client on our own codec, for exact packet-level assertions.
pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
    pub protocol: Protocol,
    /// Packets read while waiting for something else (see `keep`), handed out first.
    kept: std::collections::VecDeque<Packet>,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        let stream = tokio::time::timeout(DEADLINE, TcpStream::connect(addr)).await.expect("connect in time").expect("connect");
        stream.set_nodelay(true).unwrap();
        Raw { stream, buf: BytesMut::new(), protocol: Protocol::V5, kept: Default::default() }
    }

    /// Connect, or `None` if the address refuses (for retries against something starting).
    pub async fn try_connect(addr: SocketAddr) -> Option<Raw> {
        let stream = tokio::time::timeout(DEADLINE, TcpStream::connect(addr)).await.ok()?.ok()?;
        stream.set_nodelay(true).ok()?;
        Some(Raw { stream, buf: BytesMut::new(), protocol: Protocol::V5, kept: Default::default() })
    }

    /// Connect from source address `src` (a loopback address other than 127.0.0.1 is another client
    /// to the node's per-address limits).
    pub async fn connect_from(addr: SocketAddr, src: std::net::IpAddr) -> Raw {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(src, 0)).unwrap();
        let stream = tokio::time::timeout(DEADLINE, sock.connect(addr)).await.expect("connect in time").expect("connect");
        stream.set_nodelay(true).unwrap();
        Raw { stream, buf: BytesMut::new(), protocol: Protocol::V5, kept: Default::default() }
    }

    /// Connect and complete the CONNECT/CONNACK exchange; returns the CONNACK.
    pub async fn session(addr: SocketAddr, c: Connect) -> (Raw, ConnAck) {
        Raw::connect(addr).await.connack(c).await
    }

    /// `session` from source address `src`.
    pub async fn session_from(addr: SocketAddr, src: std::net::IpAddr, c: Connect) -> (Raw, ConnAck) {
        Raw::connect_from(addr, src).await.connack(c).await
    }

    /// CONNECT over a stream the test set up itself (socket options), returning the CONNACK.
    pub async fn session_on(stream: TcpStream, c: Connect) -> (Raw, ConnAck) {
        Raw { stream, buf: BytesMut::new(), protocol: Protocol::V5, kept: Default::default() }.connack(c).await
    }

    /// Send CONNECT, read its CONNACK.
    async fn connack(mut self, c: Connect) -> (Raw, ConnAck) {
        self.protocol = c.protocol;
        self.send(Packet::Connect(Box::new(c))).await;
        match self.recv().await {
            Some(Packet::ConnAck(a)) => (self, a),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub async fn v5(addr: SocketAddr, id: &str) -> Raw {
        let (r, a) = Raw::session(addr, connect_packet(Protocol::V5, id, true)).await;
        assert_eq!(a.code, 0);
        r
    }

    pub async fn v4(addr: SocketAddr, id: &str) -> Raw {
        let (r, a) = Raw::session(addr, connect_packet(Protocol::V4, id, true)).await;
        assert_eq!(a.code, 0);
        r
    }

    pub async fn send(&mut self, p: Packet) {
        let mut b = BytesMut::new();
        encode(&p, self.protocol, &mut b);
        self.send_bytes(&b).await;
    }

    pub async fn send_bytes(&mut self, b: &[u8]) {
        let _ = self.stream.write_all(b).await;
    }

    /// Next packet, `None` when the server closed the connection. Panics after the deadline.
    pub async fn recv(&mut self) -> Option<Packet> {
        if let Some(p) = self.kept.pop_front() {
            return Some(p);
        }
        tokio::time::timeout(DEADLINE, self.recv_inner()).await.expect("packet or close within deadline")
    }

    async fn recv_inner(&mut self) -> Option<Packet> {
        loop {
            if let Some(p) = decode(&mut self.buf, self.protocol, usize::MAX).expect("server sent a valid packet") {
                return Some(p);
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Keep a packet read too early (an answer that overtook an acknowledgement): the next
    /// `recv` returns it.
    pub fn keep(&mut self, p: Packet) {
        self.kept.push_back(p);
    }

    /// Next packet that is not a PUBLISH on `$SYS`.
    pub async fn recv_app(&mut self) -> Option<Packet> {
        loop {
            match self.recv().await {
                Some(Packet::Publish(p)) if p.topic.starts_with("$SYS") => continue,
                other => return other,
            }
        }
    }

    pub async fn recv_publish(&mut self) -> Publish {
        match self.recv_app().await {
            Some(Packet::Publish(p)) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Read until the server closes; returns what it sent before closing.
    pub async fn until_closed(&mut self) -> Vec<Packet> {
        let mut seen = Vec::new();
        while let Some(p) = self.recv().await {
            seen.push(p);
        }
        seen
    }

    /// Subscribe to one filter and wait for the SUBACK; returns its reason codes.
    pub async fn sub(&mut self, filter: &str, qos: QoS) -> Vec<u8> {
        self.send(subscribe(7, filter, qos)).await;
        match self.recv_app().await {
            Some(Packet::SubAck(s)) => s.codes,
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// Round-trip a PINGREQ: everything the server queued before it has been read once this returns
    /// (the caller must handle intervening packets; they are returned).
    pub async fn sync(&mut self) -> Vec<Packet> {
        self.send(Packet::PingReq).await;
        let mut before = Vec::new();
        loop {
            match self.recv().await {
                Some(Packet::PingResp) => return before,
                Some(Packet::Publish(p)) if p.topic.starts_with("$SYS") => {}
                Some(p) => before.push(p),
                None => panic!("closed while syncing"),
            }
        }
    }
}

/// Wait for a condition with a deadline (polling), for effects that have no acknowledgement.
pub async fn eventually<F: FnMut() -> bool>(what: &str, mut f: F) {
    let end = tokio::time::Instant::now() + DEADLINE;
    while tokio::time::Instant::now() < end {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A plain HTTP/1.1 GET over a fresh connection: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::time::timeout(DEADLINE, TcpStream::connect(addr)).await.unwrap().unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut raw)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}
pub mod backends;
pub mod cluster;
pub mod cut;
pub mod platform;
pub mod process;
