//! A node with the device platform on: credentials required on its MQTT TCP listener, CoAP on,
//! a known admin API key and a service account; helpers for the admin API and device clients.
use std::net::SocketAddr;

use serde_json::{json, Value};
use thingsd::config::{CoapListenerConfig, Config, ServiceAccount};
use thingsd::protocols::mqtt::*;

use super::{connect_packet, Node, Raw, DEADLINE};

pub const ADMIN_KEY: &str = "test-admin-key-0123456789abcdef";
/// The first system administrator of a test node (REST API user).
pub const ROOT_USER: &str = "root";
pub const ROOT_PASSWORD: &str = "root-password-1";
pub const SVC_USER: &str = "platform-svc";
pub const SVC_PASS: &str = "svc-password-1";

pub struct Platform {
    pub node: Node,
    pub http: reqwest::Client,
}

/// Configure a node for device tests: `meta_url` (None = SQLite in the data dir).
pub fn configure(c: &mut Config, meta_url: Option<String>) {
    c.listeners.tcp[0].allow_anonymous = false;
    c.listeners.coap = vec![CoapListenerConfig { bind: "127.0.0.1:0".parse().unwrap() }];
    c.devices.admin_key = ADMIN_KEY.into();
    c.api.admin_user = ROOT_USER.into();
    c.api.admin_password = ROOT_PASSWORD.into();
    c.devices.services = vec![ServiceAccount {
        username: SVC_USER.into(),
        password_hash: thingsd::devices::hash_password(SVC_PASS.as_bytes()),
        publish: vec!["#".into()],
        subscribe: vec!["devices/#".into(), "gateway/#".into(), "v1/#".into()],
    }];
    if let Some(u) = meta_url {
        c.meta.url = u;
    }
}

impl Platform {
    pub async fn start(meta_url: Option<String>, tweak: impl FnOnce(&mut Config)) -> Platform {
        let node = super::start(|c| {
            configure(c, meta_url);
            tweak(c);
        })
        .await;
        Platform { node, http: client() }
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.node.http.expect("http listener")
    }

    pub async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        admin(&self.http, self.http_addr(), method, path, body).await
    }

    /// Create a device (extra fields merged into the body); returns (device, access token).
    pub async fn create_device(&self, number: &str, extra: Value) -> (Value, String) {
        create_device(&self.http, self.http_addr(), number, extra).await
    }

    /// Wait until a command reaches `status` (polling the admin API, with the deadline).
    pub async fn wait_command(&self, id: i64, status: &str) -> Value {
        wait_command(&self.http, self.http_addr(), id, status).await
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(DEADLINE).build().unwrap()
}

pub async fn admin(http: &reqwest::Client, addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    call(http, addr, ADMIN_KEY, method, path, body).await
}

/// A REST call with `token` (an API key or a user's access token): status and JSON body.
pub async fn call(http: &reqwest::Client, addr: SocketAddr, token: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let url = format!("http://{addr}{path}");
    let mut req = http.request(method.parse().unwrap(), url).bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("admin API answers");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

pub async fn create_device(http: &reqwest::Client, addr: SocketAddr, number: &str, extra: Value) -> (Value, String) {
    let mut body = json!({"device_number": number});
    if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
        b.extend(e);
    }
    let (s, v) = admin(http, addr, "POST", "/api/v1/devices", Some(body)).await;
    assert_eq!(s, 201, "create device {number}: {v}");
    (v["device"].clone(), v["access_token"].as_str().unwrap().to_string())
}

/// GET an admin resource until `done` holds for it (with the deadline); returns it.
pub async fn poll_admin(http: &reqwest::Client, addr: SocketAddr, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (_, v) = admin(http, addr, "GET", path, None).await;
        if done(&v) {
            return v;
        }
        assert!(tokio::time::Instant::now() < end, "{path} never reached the expected state: {v}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

pub async fn wait_command(http: &reqwest::Client, addr: SocketAddr, id: i64, status: &str) -> Value {
    poll_admin(http, addr, &format!("/api/v1/commands/{id}"), |c| c["status"] == status).await
}

/// Wait until `addr`'s node reports the device `online` (or not).
pub async fn wait_online(http: &reqwest::Client, addr: SocketAddr, number: &str, online: bool) {
    poll_admin(http, addr, &format!("/api/v1/devices/{number}/status"), |s| s["online"] == online).await;
}

/// The server closed the client after DISCONNECT 0x98 (administrative action).
pub async fn assert_kicked(r: &mut Raw) {
    let closed = r.until_closed().await;
    assert!(closed.iter().any(|p| matches!(p, Packet::Disconnect(d) if d.code == reason::ADMINISTRATIVE_ACTION)), "{closed:?}");
}

/// CONNECT with credentials; returns the client and the CONNACK code.
pub async fn login(addr: SocketAddr, protocol: Protocol, client_id: &str, user: Option<&str>, pass: Option<&str>) -> (Raw, u8) {
    let mut c = connect_packet(protocol, client_id, true);
    c.username = user.map(str::to_string);
    c.password = pass.map(|p| bytes::Bytes::copy_from_slice(p.as_bytes()));
    let (r, a) = Raw::session(addr, c).await;
    (r, a.code)
}

/// A device logged in with its token (asserts success).
pub async fn device(addr: SocketAddr, protocol: Protocol, client_id: &str, token: &str) -> Raw {
    let (r, code) = login(addr, protocol, client_id, Some(token), None).await;
    assert_eq!(code, 0, "device login with its token");
    r
}

/// The platform's service account (asserts success).
pub async fn service(addr: SocketAddr) -> Raw {
    let (r, code) = login(addr, Protocol::V5, "svc", Some(SVC_USER), Some(SVC_PASS)).await;
    assert_eq!(code, 0, "service login");
    r
}

/// Next PUBLISH on `topic` (others are skipped; QoS 1 ones acknowledged).
pub async fn next_on(r: &mut Raw, topic: &str) -> Publish {
    loop {
        let p = r.recv_publish().await;
        if p.qos == QoS::AtLeastOnce {
            r.send(Packet::PubAck(Ack::new(p.pkid, 0))).await;
        }
        if p.topic == topic {
            return p;
        }
    }
}

/// Next PUBLISH whose topic starts with `prefix`.
pub async fn next_with_prefix(r: &mut Raw, prefix: &str) -> Publish {
    loop {
        let p = r.recv_publish().await;
        if p.qos == QoS::AtLeastOnce {
            r.send(Packet::PubAck(Ack::new(p.pkid, 0))).await;
        }
        if p.topic.starts_with(prefix) {
            return p;
        }
    }
}

/// Publish and return the PUBACK's reason code.
pub async fn pub1(r: &mut Raw, topic: &str, pkid: u16, payload: &str) -> u8 {
    r.send(super::publish(topic, QoS::AtLeastOnce, pkid, payload)).await;
    let mut early = Vec::new();
    loop {
        match r.recv_app().await {
            Some(Packet::PubAck(a)) if a.pkid == pkid => {
                for p in early {
                    r.keep(p);
                }
                return a.code;
            }
            // An answer may overtake the acknowledgement (it comes from the device's session,
            // the PUBACK once every subscriber took the message): kept for the caller.
            Some(p @ Packet::Publish(_)) => early.push(p),
            Some(_) => {}
            None => panic!("closed while waiting for PUBACK {pkid}"),
        }
    }
}

pub fn json_of(p: &Publish) -> Value {
    serde_json::from_slice(&p.payload).unwrap_or_else(|e| panic!("payload of {} is not JSON ({e}): {:?}", p.topic, p.payload))
}

/// SUBSCRIBE one filter at QoS 1; the SUBACK codes (publishes arriving meanwhile are acknowledged and skipped).
pub async fn sub(r: &mut Raw, filter: &str) -> Vec<u8> {
    r.send(super::subscribe(11, filter, QoS::AtLeastOnce)).await;
    loop {
        match r.recv_app().await {
            Some(Packet::SubAck(s)) => return s.codes,
            Some(Packet::Publish(p)) => {
                if p.qos == QoS::AtLeastOnce {
                    r.send(Packet::PubAck(Ack::new(p.pkid, 0))).await;
                }
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }
}

/// Log a user in; returns the token answer (asserts success).
pub async fn login_user(http: &reqwest::Client, addr: SocketAddr, user: &str, password: &str) -> Value {
    let r =
        http.post(format!("http://{addr}/api/v1/auth/login")).json(&json!({"username": user, "password": password})).send().await.unwrap();
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "login {user}: {v}");
    v
}
