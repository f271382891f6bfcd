//! Devices over MQTT: authentication, the per-device ACL, ThingsPanel and ThingsBoard topics,
//! payload checks against the thing model, downlink (online, queued, expired), gateways, status,
//! disabling — on both meta backends (SQLite; PostgreSQL started by scripts/test).
use crate::common;

use crate::common::platform::*;
use crate::common::*;
use serde_json::json;
use thingsd::protocols::mqtt::*;

#[tokio::test]
async fn mqtt_devices_on_sqlite() {
    mqtt_devices(None).await;
}

#[tokio::test]
async fn mqtt_devices_on_postgres() {
    let Some(url) = common::backends::postgres().await else { return };
    mqtt_devices(Some(url)).await;
}

async fn mqtt_devices(meta: Option<String>) {
    let p = Platform::start(meta, |_| {}).await;
    let tcp = p.node.tcp;

    // The admin API wants its key.
    let resp = p.http.get(format!("http://{}/api/v1/devices", p.http_addr())).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    let (s, v) = p.admin("POST", "/api/v1/devices", Some(json!({"device_number": 5}))).await;
    assert_eq!(s, 400, "{v}");
    assert!(v["error"]["message"].is_string());

    let (s, product) = p
        .admin(
            "POST",
            "/api/v1/products",
            Some(json!({"name": "thermo", "strict": true, "model": {
                "telemetry": [{"key": "temp", "type": "number", "min": -40.0, "max": 85.0}],
                "attributes": [{"key": "fw", "type": "string"}],
                "events": [{"identifier": "alarm", "params": [{"key": "level", "type": "integer"}]}]
            }})),
        )
        .await;
    assert_eq!(s, 201, "{product}");
    let (_, ta) = p.create_device("dev-a", json!({"product_id": product["id"]})).await;
    let (_, tb) = p.create_device("dev-b", json!({})).await;

    // Wrong or missing credentials.
    assert_eq!(login(tcp, Protocol::V5, "x", Some("not-a-token"), None).await.1, reason::BAD_USERNAME_OR_PASSWORD);
    assert_eq!(login(tcp, Protocol::V4, "x", Some("not-a-token"), None).await.1, 4);
    assert_eq!(login(tcp, Protocol::V5, "x", None, None).await.1, reason::NOT_AUTHORIZED);
    assert_eq!(login(tcp, Protocol::V4, "x", None, None).await.1, 5);
    assert_eq!(login(tcp, Protocol::V5, "x", Some(SVC_USER), Some("wrong")).await.1, reason::BAD_USERNAME_OR_PASSWORD);

    // A platform service sees what devices send.
    let mut svc = service(tcp).await;
    assert_eq!(sub(&mut svc, "devices/#").await, [1]);
    assert_eq!(sub(&mut svc, "v1/#").await, [1]);

    let mut a = device(tcp, Protocol::V5, "esp32", &ta).await;
    let st = next_on(&mut svc, "devices/status/dev-a").await;
    assert_eq!(json_of(&st)["online"], true);

    // ACL: own downlink topics only.
    assert_eq!(sub(&mut a, "devices/command/dev-a/+").await, [1]);
    assert_eq!(sub(&mut a, "devices/attributes/response/dev-a/+").await, [1]);
    assert_eq!(sub(&mut a, "devices/event/response/dev-a/+").await, [1]);
    for f in ["devices/command/dev-b/+", "devices/command/+/+", "devices/#", "#", "devices/telemetry", "$share/g/devices/command/+/+"] {
        assert_eq!(sub(&mut a, f).await, [reason::NOT_AUTHORIZED], "{f}");
    }

    // Telemetry reaches the service, marked with the device.
    assert_eq!(pub1(&mut a, "devices/telemetry", 1, r#"{"temp": 21.5}"#).await, 0);
    let t = next_on(&mut svc, "devices/telemetry").await;
    assert_eq!(json_of(&t)["temp"], 21.5);
    let props = t.props.expect("user property");
    assert!(props.user_properties.contains(&("device_number".to_string(), "dev-a".to_string())));

    // Another device's topics, bad payloads: refused with a reason, the device stays connected.
    assert_eq!(pub1(&mut a, "devices/command/dev-b/1", 2, "{}").await, reason::NOT_AUTHORIZED);
    assert_eq!(pub1(&mut a, "v1/devices/dev-b/telemetry", 3, r#"{"temp": 1}"#).await, reason::NOT_AUTHORIZED);
    assert_eq!(pub1(&mut a, "devices/telemetry", 4, "not json").await, reason::PAYLOAD_FORMAT_INVALID);
    assert_eq!(pub1(&mut a, "devices/telemetry", 5, r#"{"temp": "hot"}"#).await, reason::PAYLOAD_FORMAT_INVALID);
    assert_eq!(pub1(&mut a, "devices/telemetry", 6, r#"{"humidity": 3}"#).await, reason::PAYLOAD_FORMAT_INVALID);
    assert_eq!(pub1(&mut a, "devices/telemetry", 7, r#"{"temp": 200}"#).await, reason::PAYLOAD_FORMAT_INVALID);
    let big = format!(r#"{{"temp": 1, "pad": "{}"}}"#, "x".repeat(70_000));
    assert_eq!(pub1(&mut a, "devices/telemetry", 8, &big).await, reason::QUOTA_EXCEEDED);
    // MQTT 5.0: a device that names a response topic is told why.
    let props = Properties {
        response_topic: Some("devices/event/response/dev-a/err".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"c-7")),
        ..Properties::default()
    };
    a.send(publish_props("devices/telemetry", QoS::AtLeastOnce, 13, "[", Some(props))).await;
    let mut acked = false;
    let mut told = None;
    while !(acked && told.is_some()) {
        match a.recv_app().await {
            Some(Packet::PubAck(x)) if x.pkid == 13 => {
                assert_eq!(x.code, reason::PAYLOAD_FORMAT_INVALID);
                acked = true;
            }
            Some(Packet::Publish(e)) if e.topic == "devices/event/response/dev-a/err" => {
                if e.qos == QoS::AtLeastOnce {
                    a.send(Packet::PubAck(Ack::new(e.pkid, 0))).await;
                }
                told = Some(e);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let told = told.unwrap();
    assert_eq!(json_of(&told)["error"]["code"], "malformed_payload");
    assert_eq!(told.props.and_then(|p| p.correlation_data).as_deref(), Some(&b"c-7"[..]));
    a.sync().await;
    let (_, m) = p.admin("GET", "/metrics", None).await;
    let m = m.as_str().unwrap_or_default().to_string();
    assert!(m.contains("thingsd_device_payload_rejected_total 6"), "{m}");
    assert!(m.contains("thingsd_acl_denied_total 8"), "{m}");

    // Attributes are stored and answered on the ThingsPanel response topic; events too.
    assert_eq!(pub1(&mut a, "devices/attributes/m1", 9, r#"{"fw": "1.2"}"#).await, 0);
    let r = next_on(&mut a, "devices/attributes/response/dev-a/m1").await;
    assert_eq!(json_of(&r)["result"], 0);
    let (_, attrs) = p.admin("GET", "/api/v1/devices/dev-a/attributes", None).await;
    assert_eq!(attrs["client"]["fw"], "1.2");
    assert_eq!(pub1(&mut a, "devices/event/m2", 10, r#"{"method": "alarm", "params": {"level": 2}}"#).await, 0);
    assert_eq!(json_of(&next_on(&mut a, "devices/event/response/dev-a/m2").await)["method"], "alarm");
    assert_eq!(pub1(&mut a, "devices/event/m3", 11, r#"{"method": "nope"}"#).await, reason::PAYLOAD_FORMAT_INVALID);

    // A command to an online device: sent, answered, acknowledged with the response stored.
    let (s, cmd) = p.admin("POST", "/api/v1/devices/dev-a/commands", Some(json!({"method": "reboot", "params": {"delay": 1}}))).await;
    assert_eq!(s, 201, "{cmd}");
    assert_eq!(cmd["status"], "sent");
    let mid = cmd["message_id"].as_str().unwrap().to_string();
    let c = next_on(&mut a, &format!("devices/command/dev-a/{mid}")).await;
    assert_eq!(json_of(&c), json!({"method": "reboot", "params": {"delay": 1}}));
    assert_eq!(pub1(&mut a, &format!("devices/command/response/{mid}"), 12, r#"{"result": 0, "message": "rebooting"}"#).await, 0);
    let done = p.wait_command(cmd["id"].as_i64().unwrap(), "acknowledged").await;
    assert_eq!(done["response"]["message"], "rebooting");

    // Device B: MQTT 3.1.1, ThingsBoard topics, the same client id as A (own namespace: A stays).
    let mut b = device(tcp, Protocol::V4, "esp32", &tb).await;
    a.sync().await;
    assert_eq!(sub(&mut b, "v1/devices/me/rpc/request/+").await, [1]);
    assert_eq!(sub(&mut b, "v1/devices/dev-a/rpc/request/+").await, [0x80]);
    // 3.1.1 has no negative PUBACK: the denied message is acknowledged and dropped.
    assert_eq!(pub1(&mut b, "devices/command/dev-a/9", 1, "{}").await, 0);
    let ts = thingsd::storage::meta::now_ms() - 3_600_000;
    assert_eq!(pub1(&mut b, "v1/devices/me/telemetry", 2, &format!(r#"{{"ts": {ts}, "values": {{"temp": 3}}}}"#)).await, 0);
    // The next thing the service sees from B is its telemetry (under its own number), not the denied one.
    loop {
        let t = next_with_prefix(&mut svc, "").await;
        assert_ne!(t.topic, "devices/command/dev-a/9", "a denied publish was routed");
        if t.topic == "v1/devices/dev-b/telemetry" {
            break;
        }
    }
    let (s, cmd) = p.admin("POST", "/api/v1/devices/dev-b/commands", Some(json!({"method": "blink", "params": {}}))).await;
    assert_eq!(s, 201);
    let mid = cmd["message_id"].as_str().unwrap().to_string();
    let c = next_on(&mut b, &format!("v1/devices/me/rpc/request/{mid}")).await;
    assert_eq!(json_of(&c)["method"], "blink");
    assert_eq!(pub1(&mut b, &format!("v1/devices/me/rpc/response/{mid}"), 3, r#"{"ok": true}"#).await, 0);
    p.wait_command(cmd["id"].as_i64().unwrap(), "acknowledged").await;

    // Offline: queued, delivered when B comes back and subscribes.
    b.send(disconnect()).await;
    assert!(b.until_closed().await.is_empty());
    // The status worker publishes B's online status after its CONNACK: the service may read it
    // only now, before the offline one (seen once in a full run). Nothing else may come first.
    loop {
        let st = json_of(&next_on(&mut svc, "devices/status/dev-b").await);
        if st["online"] == false {
            break;
        }
        assert_eq!(st["online"], true, "{st}");
    }
    let (_, queued) = p.admin("POST", "/api/v1/devices/dev-b/commands", Some(json!({"method": "later", "params": {"n": 1}}))).await;
    assert_eq!(queued["status"], "pending");
    let (_, expiring) = p.admin("POST", "/api/v1/devices/dev-b/commands", Some(json!({"method": "soon", "ttl_secs": 1}))).await;
    p.wait_command(expiring["id"].as_i64().unwrap(), "expired").await;
    let mut b = device(tcp, Protocol::V4, "esp32", &tb).await;
    assert_eq!(sub(&mut b, "v1/devices/me/rpc/request/+").await, [1]);
    let mid = queued["message_id"].as_str().unwrap();
    let c = next_on(&mut b, &format!("v1/devices/me/rpc/request/{mid}")).await;
    assert_eq!(json_of(&c)["method"], "later");
    p.wait_command(queued["id"].as_i64().unwrap(), "sent").await;
    let (_, status) = p.admin("GET", "/api/v1/devices/dev-b/status", None).await;
    assert_eq!(status["online"], true, "{status}");

    // Shared attributes set by the platform reach a ThingsBoard device on v1/devices/me/attributes.
    assert_eq!(sub(&mut b, "v1/devices/me/attributes").await, [1]);
    let (s, _) = p.admin("PUT", "/api/v1/devices/dev-b/attributes", Some(json!({"params": {"interval": 30}}))).await;
    assert_eq!(s, 200);
    assert_eq!(json_of(&next_on(&mut b, "v1/devices/me/attributes").await), json!({"interval": 30}));
    // ... and the device can read them back (ThingsBoard attribute request).
    assert_eq!(sub(&mut b, "v1/devices/me/attributes/response/+").await, [1]);
    assert_eq!(pub1(&mut b, "v1/devices/me/attributes/request/7", 4, r#"{"sharedKeys": "interval"}"#).await, 0);
    assert_eq!(json_of(&next_on(&mut b, "v1/devices/me/attributes/response/7").await)["shared"]["interval"], 30);

    // Disabling a device disconnects it at once (0x98) and keeps it out.
    let (s, _) = p.admin("PATCH", "/api/v1/devices/dev-a", Some(json!({"enabled": false}))).await;
    assert_eq!(s, 200);
    assert_kicked(&mut a).await;
    assert_eq!(login(tcp, Protocol::V5, "esp32", Some(&ta), None).await.1, reason::NOT_AUTHORIZED);
    let st = next_on(&mut svc, "devices/status/dev-a").await;
    assert_eq!(json_of(&st)["online"], false);
    b.sync().await;
    p.node.stop().await;
}

#[tokio::test]
async fn gateways_passwords_and_rate_limits() {
    let p = Platform::start(None, |c| c.devices.auth_fail_limit = 4).await;
    let tcp = p.node.tcp;
    let (gw, tg) = p.create_device("gw-1", json!({})).await;
    p.create_device("sensor-7", json!({"gateway_id": gw["id"], "sub_address": "modbus-7"})).await;
    p.create_device("other", json!({})).await;

    let mut svc = service(tcp).await;
    assert_eq!(sub(&mut svc, "gateway/#").await, [1]);
    let mut g = device(tcp, Protocol::V5, "gw", &tg).await;
    // A gateway subscribes to its own and its sub-devices' downlink, nobody else's.
    assert_eq!(sub(&mut g, "gateway/command/gw-1/+").await, [1]);
    assert_eq!(sub(&mut g, "devices/command/sensor-7/+").await, [1]);
    assert_eq!(sub(&mut g, "devices/command/other/+").await, [reason::NOT_AUTHORIZED]);
    let body = r#"{"gateway_data": {"temp": 1}, "sub_device_data": {"modbus-7": {"temp": 2}}}"#;
    assert_eq!(pub1(&mut g, "gateway/telemetry", 1, body).await, 0);
    assert_eq!(json_of(&next_on(&mut svc, "gateway/telemetry").await)["sub_device_data"]["modbus-7"]["temp"], 2);
    assert_eq!(
        pub1(&mut g, "gateway/telemetry", 2, r#"{"sub_device_data": {"modbus-9": {"temp": 2}}}"#).await,
        reason::PAYLOAD_FORMAT_INVALID
    );

    // A command for the sub-device goes through its gateway.
    let (_, cmd) = p.admin("POST", "/api/v1/devices/sensor-7/commands", Some(json!({"method": "open", "params": {"valve": 1}}))).await;
    let mid = cmd["message_id"].as_str().unwrap();
    let c = next_on(&mut g, &format!("gateway/command/gw-1/{mid}")).await;
    assert_eq!(json_of(&c)["sub_device_data"]["modbus-7"]["method"], "open");

    // Username + password credentials (argon2), wrong password refused.
    let (s, v) = p
        .admin(
            "POST",
            "/api/v1/devices/other/credentials",
            Some(json!({"kind": "password", "username": "other-user", "password": "correct horse"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    assert!(v["credential"].get("secret").is_none(), "hashes are never returned");
    let (mut o, code) = login(tcp, Protocol::V5, "o", Some("other-user"), Some("correct horse")).await;
    assert_eq!(code, 0);
    o.sync().await;
    let (s, v) = p
        .admin("POST", "/api/v1/devices/other/credentials", Some(json!({"kind": "password", "username": "u2", "password": "short"})))
        .await;
    assert_eq!(s, 400, "{v}");

    // Failed logins from one address are rate-limited (0x9F), even with right credentials after.
    // (The harness's readiness probe, without credentials, was this address's first failure.)
    for _ in 0..3 {
        assert_eq!(login(tcp, Protocol::V5, "o2", Some("other-user"), Some("wrong horse")).await.1, reason::BAD_USERNAME_OR_PASSWORD);
    }
    assert_eq!(login(tcp, Protocol::V5, "o2", Some("other-user"), Some("correct horse")).await.1, reason::CONNECTION_RATE_EXCEEDED);
    assert_eq!(login(tcp, Protocol::V4, "o2", Some("other-user"), Some("correct horse")).await.1, 3);
    // Connected clients are not affected.
    o.sync().await;
    g.sync().await;
    p.node.stop().await;
}

/// `mosquitto_pub` of one QoS 1 telemetry message with `user` as the token (async: the node
/// runs on the test's runtime).
async fn mosquitto_pub(port: u16, version: &str, user: &str, msg: &str) -> std::process::Output {
    let port = port.to_string();
    tokio::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-V", version, "-q", "1", "-u", user, "-t", "devices/telemetry", "-m", msg])
        .output()
        .await
        .expect("mosquitto_pub is required (Debian package mosquitto-clients; scripts/test installs it)")
}

#[tokio::test]
async fn mosquitto_clients_with_tokens_and_redis_cache() {
    mosquitto_clients_with_tokens(common::backends::redis()).await;
}

/// Without Redis the node keeps identities in process, shared with the connections that logged
/// in with them: a revoked token must leave that map too.
#[tokio::test]
async fn mosquitto_clients_with_tokens_and_the_in_process_cache() {
    mosquitto_clients_with_tokens(None).await;
}

async fn mosquitto_clients_with_tokens(redis: Option<String>) {
    let p = Platform::start(None, |c| {
        if let Some(r) = &redis {
            c.cache.url = r.clone();
            c.cache.prefix = format!("t{:x}:", rand::random::<u32>());
        }
    })
    .await;
    let tcp = p.node.tcp;
    let (_, token) = p.create_device("mq-1", json!({})).await;
    let mut svc = service(tcp).await;
    assert_eq!(sub(&mut svc, "devices/telemetry").await, [1]);
    for v in ["mqttv311", "mqttv5"] {
        let out = mosquitto_pub(tcp.port(), v, &token, r#"{"t":1}"#).await;
        assert!(out.status.success(), "{v}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(json_of(&next_on(&mut svc, "devices/telemetry").await)["t"], 1);
        let bad = mosquitto_pub(tcp.port(), v, "wrong", "{}").await;
        assert!(!bad.status.success(), "{v}: a wrong token must be refused");
    }
    // Revoking the token (cached in Redis when configured) keeps the device out at once.
    let (_, creds) = p.admin("GET", "/api/v1/devices/mq-1/credentials", None).await;
    let id = creds[0]["id"].as_i64().unwrap();
    let mut d = device(tcp, Protocol::V5, "mq", &token).await;
    let (s, _) = p.admin("DELETE", &format!("/api/v1/devices/mq-1/credentials/{id}"), None).await;
    assert_eq!(s, 200);
    assert_kicked(&mut d).await;
    assert_eq!(login(tcp, Protocol::V5, "mq", Some(&token), None).await.1, reason::BAD_USERNAME_OR_PASSWORD);
    p.node.stop().await;
}

/// A TLS MQTT 5.0 exchange: send `packets`, return the first `n` packets the server answers.
async fn tls_exchange(cfg: rustls::ClientConfig, addr: std::net::SocketAddr, packets: &[Packet], n: usize) -> Vec<Packet> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = connector.connect("localhost".try_into().unwrap(), tcp).await.expect("TLS handshake");
    let mut out = bytes::BytesMut::new();
    for p in packets {
        encode(p, Protocol::V5, &mut out);
    }
    tls.write_all(&out).await.unwrap();
    let mut buf = bytes::BytesMut::new();
    let mut got = Vec::new();
    while got.len() < n {
        if let Some(p) = decode(&mut buf, Protocol::V5, usize::MAX).unwrap() {
            got.push(p);
            continue;
        }
        let r = tokio::time::timeout(DEADLINE, tls.read_buf(&mut buf)).await.expect("answer in time").unwrap();
        if r == 0 {
            break;
        }
    }
    got
}

#[tokio::test]
async fn client_certificates_identify_devices() {
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key, server_der) = tls_files(tmp.path());
    // A CA for devices and one device certificate it signed.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(vec![]).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let ca_path = tmp.path().join("devices-ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let dev_key = rcgen::KeyPair::generate().unwrap();
    let dev_cert = rcgen::CertificateParams::new(vec!["x-1".into()]).unwrap().signed_by(&dev_key, &ca, &ca_key).unwrap();

    let p = Platform::start(None, |c| {
        let mut l = tls_listener(cert, key);
        l.allow_anonymous = false;
        l.client_ca = Some(ca_path);
        c.listeners.tls = vec![l];
    })
    .await;
    let tls_addr = p.node.tls.expect("tls listener");
    p.create_device("x-1", json!({})).await;
    let (s, v) = p.admin("POST", "/api/v1/devices/x-1/credentials", Some(json!({"kind": "x509", "certificate_pem": dev_cert.pem()}))).await;
    assert_eq!(s, 201, "{v}");

    thingsd::server::install_crypto();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(server_der)).unwrap();
    let with_cert = rustls::ClientConfig::builder()
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(vec![dev_cert.der().clone()], rustls::pki_types::PrivateKeyDer::try_from(dev_key.serialize_der()).unwrap())
        .unwrap();
    let sub = |f: &str| {
        Packet::Subscribe(Subscribe { pkid: 1, filters: vec![(f.into(), SubOptions::qos(QoS::AtLeastOnce))], props: Properties::default() })
    };
    let got = tls_exchange(with_cert, tls_addr, &[connect5("cert-dev", true), sub("devices/command/x-1/+")], 2).await;
    assert!(matches!(&got[0], Packet::ConnAck(a) if a.code == 0), "{got:?}");
    assert!(matches!(&got[1], Packet::SubAck(s) if s.codes == [1]), "the certificate made it device x-1: {got:?}");

    // Without a certificate (and without a token) the same listener refuses.
    let without = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let got = tls_exchange(without, tls_addr, &[connect5("anon", true)], 1).await;
    assert!(matches!(&got[0], Packet::ConnAck(a) if a.code == reason::NOT_AUTHORIZED), "{got:?}");
    p.node.stop().await;
}

/// The inspector names a device's session actor `session:{device}/{client id}` and finds it by
/// that name (its registered name holds a U+0000 that no operator can type).
#[tokio::test]
async fn the_inspector_names_device_sessions() {
    let p = Platform::start(None, |_| {}).await;
    let (_, token) = p.create_device("insp-1", json!({})).await;
    let _d = device(p.node.tcp, Protocol::V5, "insp-c", &token).await;
    let (s, v) = p.admin("GET", "/admin/v1/actors/session:insp-1%2Finsp-c", None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!((v["name"].as_str(), v["kind"].as_str()), (Some("session:insp-1/insp-c"), Some("session")), "{v}");
    let (_, all) = p.admin("GET", "/admin/v1/actors?kind=session", None).await;
    let text = all.to_string();
    assert!(text.contains("session:insp-1/insp-c") && !text.contains("\\u0000"), "{all}");
}

/// A ThingsBoard device's own client attributes (`v1/devices/me/attributes`, the topic it also
/// subscribes to for shared-attribute updates) do not come back to it; platform services still
/// receive them, and a real shared-attribute update still reaches the device.
#[tokio::test]
async fn client_attributes_do_not_echo_to_their_device() {
    let p = Platform::start(None, |_| {}).await;
    let (_, token) = p.create_device("echo-1", json!({})).await;
    let mut svc = service(p.node.tcp).await;
    assert_eq!(sub(&mut svc, "v1/#").await, [1]);
    for protocol in [Protocol::V4, Protocol::V5] {
        let mut d = device(p.node.tcp, protocol, "echo-c", &token).await;
        assert_eq!(sub(&mut d, "v1/devices/me/attributes").await, [1]);
        let mine = json!({"fw_version": format!("{protocol:?}")});
        assert_eq!(pub1(&mut d, "v1/devices/me/attributes", 3, &mine.to_string()).await, 0);
        // (The service also sees the platform's updates on this topic.)
        while json_of(&next_on(&mut svc, "v1/devices/echo-1/attributes").await) != mine {}
        // The first thing the device hears on its attribute topic is the platform's update.
        let (s, _) = p.admin("PUT", "/api/v1/devices/echo-1/attributes", Some(json!({"params": {"interval": 5}}))).await;
        assert_eq!(s, 200);
        let got = d.recv_publish().await;
        assert_eq!((got.topic.as_str(), json_of(&got)), ("v1/devices/me/attributes", json!({"interval": 5})), "{protocol:?}");
        d.send(disconnect()).await;
    }
}

/// ThingsBoard's own device SDK (tb-mqtt-client, MQTT 5.0): its automatic getSessionLimits is
/// answered (it holds its publishes back until it is), its telemetry is acknowledged as a
/// success, and a client-side RPC reaches a platform service, which answers it through the
/// REST API — once — without the call coming back to the device as a server-side RPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thingsboard_sdk_client_side_rpc_and_session_limits() {
    let ok = std::process::Command::new("python3").args(["-c", "import tb_device_mqtt"]).status().map(|s| s.success()).unwrap_or(false);
    assert!(ok, "ThingsBoard's tb-mqtt-client is required (pip install tb-mqtt-client==1.13.14 mmh3; scripts/test installs it)");
    let p = Platform::start(None, |_| {}).await;
    let (_, token) = p.create_device("tb-sdk-1", json!({})).await;
    let mut svc = service(p.node.tcp).await;
    assert_eq!(sub(&mut svc, "v1/devices/+/rpc/request/+").await, [1]);
    let (s, body) = p.admin("POST", "/api/v1/devices/tb-sdk-1/rpc/7/response", Some(json!({"time": 1}))).await;
    assert_eq!((s, body["error"]["code"].as_str()), (404, Some("not_found")), "no such request: {body}");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/paho/tb_sdk.py");
    let child = tokio::process::Command::new("python3")
        .arg(script)
        .arg(p.node.tcp.port().to_string())
        .arg(&token)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // The service hears the device's calls; it answers getCurrentTime.
    let id = loop {
        let m = tokio::time::timeout(std::time::Duration::from_secs(60), svc.recv_publish()).await.expect("the device's RPC request");
        assert!(m.topic.starts_with("v1/devices/tb-sdk-1/rpc/request/"), "{}", m.topic);
        let v = json_of(&m);
        if v["method"] == "getCurrentTime" {
            assert_eq!(v["params"], json!({"tz": "UTC"}));
            break m.topic.rsplit('/').next().unwrap().to_string();
        }
    };
    let path = format!("/api/v1/devices/tb-sdk-1/rpc/{id}/response");
    let (s, body) = p.admin("POST", &path, Some(json!({"time": 1700000000000i64, "tz": "UTC"}))).await;
    assert_eq!(s, 200, "{body}");
    let (s, _) = p.admin("POST", &path, Some(json!({"time": 2}))).await;
    assert_eq!(s, 404, "a request is answered once");
    let out =
        tokio::time::timeout(std::time::Duration::from_secs(90), child.wait_with_output()).await.expect("the SDK script ends").unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("OK tb sdk"), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
}

/// Devices by the thousand: one import call (JSON or CSV) creates each row on its own, reports
/// the rows it could not create with their error, and returns every new device's token once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_import_json_and_csv_with_per_row_errors() {
    let p = Platform::start(None, |_| {}).await;
    p.create_device("imp-taken", json!({})).await;
    let mut rows: Vec<serde_json::Value> =
        (0..1000).map(|i| json!({"device_number": format!("imp-{i}"), "name": format!("meter {i}")})).collect();
    rows.push(json!({"device_number": "imp-taken"}));
    rows.push(json!({"name": "no number"}));
    rows.push(json!({"device_number": "imp-bad-product", "product_id": 999}));
    let (s, v) = p.admin("POST", "/api/v1/devices/import", Some(json!(rows))).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!((v["created"].as_u64(), v["failed"].as_u64()), (Some(1000), Some(3)), "{}", v["errors"]);
    let codes: Vec<(u64, &str)> =
        v["errors"].as_array().unwrap().iter().map(|e| (e["row"].as_u64().unwrap(), e["code"].as_str().unwrap())).collect();
    assert_eq!(codes, [(1001, "conflict"), (1002, "invalid"), (1003, "not_found")], "{}", v["errors"]);
    // The tokens work: a device of the import logs in.
    let last = &v["devices"][999];
    assert_eq!(last["device_number"], "imp-999");
    let mut d = device(p.node.tcp, Protocol::V4, "imp-999-c", last["access_token"].as_str().unwrap()).await;
    d.send(disconnect()).await;
    let (_, all) = p.admin("GET", "/api/v1/devices?limit=1&q=imp-", None).await;
    assert_eq!(all["total"].as_i64(), Some(1001), "{all}");

    // CSV, as spreadsheets export it.
    let csv = "device_number,name,product_id\r\ncsv-1,\"Pump, north\",\ncsv-2,plain,\ncsv-1,again,\n";
    let url = format!("http://{}/api/v1/devices/import", p.http_addr());
    let r = p.http.post(&url).bearer_auth(ADMIN_KEY).header("content-type", "text/csv").body(csv).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!((v["created"].as_u64(), v["errors"][0]["row"].as_u64()), (Some(2), Some(3)), "{v}");
    let (_, dev) = p.admin("GET", "/api/v1/devices/csv-1", None).await;
    assert_eq!(dev["device"]["name"], "Pump, north", "{dev}");
    let r =
        p.http.post(&url).bearer_auth(ADMIN_KEY).header("content-type", "text/csv").body("number,colour\nx,red\n").send().await.unwrap();
    assert_eq!(r.status(), 400);
    // Bounded: more rows than an import holds is refused before any is created.
    let many: Vec<serde_json::Value> = (0..10_001).map(|i| json!({"device_number": format!("m{i}")})).collect();
    let (s, v) = p.admin("POST", "/api/v1/devices/import", Some(json!(many))).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("invalid")), "{v}");
}

/// A CONNECT writes no last-seen and no status copy to the cache (the retained status message
/// is the status; a connected device is seen now): a reconnect storm costs Redis nothing per
/// device. The disconnect records when the device was last seen, in Redis for every node.
#[tokio::test]
async fn a_connect_writes_no_last_seen_and_a_disconnect_does() {
    let Some(url) = common::backends::redis() else { return };
    let prefix = format!("t{:x}:", rand::random::<u32>());
    let p = Platform::start(None, |c| {
        c.cache.url = url.clone();
        c.cache.prefix = prefix.clone();
    })
    .await;
    let keys = |pattern: String| {
        let out = std::process::Command::new("redis-cli").args(["-u", &url, "--scan", "--pattern", &pattern]).output().expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.is_empty()).map(String::from).collect::<Vec<_>>()
    };
    let status = || async { p.admin("GET", "/api/v1/devices/ls-1/status", None).await.1 };
    let until = |want: bool| async move {
        let end = tokio::time::Instant::now() + DEADLINE;
        loop {
            let s = status().await;
            if s["online"] == want {
                return s;
            }
            assert!(tokio::time::Instant::now() < end, "never online={want}: {s}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    let (_, token) = p.create_device("ls-1", json!({})).await;
    let mut d = device(p.node.tcp, Protocol::V5, "ls", &token).await;
    let on = until(true).await;
    assert!(on["last_seen"].as_u64().is_some(), "a connected device is seen now: {on}");
    assert_eq!(keys(format!("{prefix}seen:*")), Vec::<String>::new(), "a CONNECT wrote a last-seen");
    assert_eq!(keys(format!("{prefix}status:*")), Vec::<String>::new(), "the status is the retained message, not a cache key");
    d.send(Packet::Disconnect(Disconnect { code: 0, props: Properties::default() })).await;
    let off = until(false).await;
    let seen = off["last_seen"].as_u64().expect("last seen after the disconnect");
    assert_eq!(keys(format!("{prefix}seen:*")), vec![format!("{prefix}seen:ls-1")], "the disconnect records last-seen in Redis");
    let out = std::process::Command::new("redis-cli").args(["-u", &url, "get", &format!("{prefix}seen:ls-1")]).output().unwrap();
    let stored: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("a time in ms");
    assert!(seen >= stored, "the API's last-seen ({seen}) is at least the recorded one ({stored})");
    p.node.stop().await;
}
