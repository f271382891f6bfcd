//! The threat model, attacked through the node's real interfaces (ARCHITECTURE.md, "Threat
//! model"): what a device, a tenant user and a stranger on the network may not do. Each test
//! is one finding of the security review; each failed on the build before it.
use crate::common;

use crate::common::platform::*;
use crate::common::*;
use serde_json::{json, Value};
use thingsd::protocols::mqtt::*;

/// CONNECT with a will; returns the CONNACK code (and the client when admitted).
async fn connect_with_will(
    addr: std::net::SocketAddr,
    protocol: Protocol,
    token: &str,
    topic: &str,
    payload: &str,
    retain: bool,
) -> (Raw, u8) {
    let mut c = connect_packet(protocol, "will-client", true);
    c.username = Some(token.into());
    c.will = Some(Will {
        topic: topic.into(),
        payload: bytes::Bytes::copy_from_slice(payload.as_bytes()),
        qos: QoS::AtLeastOnce,
        retain,
        props: Properties::default(),
    });
    let (r, a) = Raw::session(addr, c).await;
    (r, a.code)
}

/// A will must pass every check a PUBLISH passes, at CONNECT: a device cannot forge another
/// device's command, status or `$SYS` through its will, in either protocol version.
#[tokio::test]
async fn wills_pass_the_publish_checks_at_connect() {
    let p = Platform::start(None, |_| {}).await;
    let tcp = p.node.tcp;
    let (_, ta) = p.create_device("will-a", json!({})).await;
    let (_, tb) = p.create_device("will-b", json!({})).await;
    let mut b = device(tcp, Protocol::V5, "b", &tb).await;
    assert_eq!(sub(&mut b, "devices/command/will-b/+").await, [1]);
    let mut svc = service(tcp).await;
    assert_eq!(sub(&mut svc, "devices/#").await, [1]);

    for (topic, retain) in [("devices/command/will-b/evil", false), ("devices/status/will-b", true), ("$SYS/forged/x", false)] {
        let (_, code) = connect_with_will(tcp, Protocol::V5, &ta, topic, r#"{"online":false}"#, retain).await;
        assert_eq!(code, reason::NOT_AUTHORIZED, "5.0 will on {topic}");
        let (_, code) = connect_with_will(tcp, Protocol::V4, &ta, topic, r#"{"online":false}"#, retain).await;
        assert_eq!(code, 5, "3.1.1 will on {topic}");
    }
    // A topic deeper than mqtt.max_topic_levels is refused as a topic (0x90), never stored.
    let deep = vec!["a"; 40].join("/");
    assert_eq!(connect_with_will(tcp, Protocol::V5, &ta, &deep, "x", false).await.1, reason::TOPIC_NAME_INVALID);
    // A will on its own uplink topic must carry a payload that topic accepts.
    assert_eq!(connect_with_will(tcp, Protocol::V5, &ta, "devices/event/1", "not json", false).await.1, reason::PAYLOAD_FORMAT_INVALID);

    // An allowed will is kept and fires, marked with its device.
    let (mut a, code) = connect_with_will(tcp, Protocol::V5, &ta, "devices/event/7", r#"{"method":"gone","params":{}}"#, false).await;
    assert_eq!(code, 0);
    let _ = a.sync().await;
    drop(a); // the socket drops without DISCONNECT: the will fires
    let w = next_on(&mut svc, "devices/event/7").await;
    assert_eq!(json_of(&w)["method"], "gone");
    assert!(w.props.expect("properties").user_properties.contains(&("device_number".into(), "will-a".into())));

    // Nothing forged reached device B or the service: a PING round trip shows B's queue empty.
    let seen = b.sync().await;
    assert!(!seen.iter().any(|p| matches!(p, Packet::Publish(x) if x.topic.contains("evil"))), "forged command delivered: {seen:?}");
    let status = p.admin("GET", "/api/v1/devices/will-b/status", None).await.1;
    assert_eq!(status["online"], true, "B's status was forged: {status}");
}

/// Topics of tens of thousands of levels are refused before any trie walks them, and the node
/// keeps serving (and restarts) with no hostile entry.
#[tokio::test]
async fn deep_topics_never_reach_the_tries() {
    let n = common::start(|_| {}).await;
    let deep = vec!["a"; 20_000].join("/");
    let mut c = Raw::v5(n.tcp, "deep").await;
    let mut pkt = publish(&deep, QoS::AtLeastOnce, 1, "x");
    if let Packet::Publish(p) = &mut pkt {
        p.retain = true;
    }
    c.send(pkt).await;
    match c.recv_app().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.code, reason::TOPIC_NAME_INVALID),
        other => panic!("expected PUBACK 0x90, got {other:?}"),
    }
    // 3.1.1 has no negative PUBACK: the connection is closed instead.
    let mut c4 = Raw::v4(n.tcp, "deep4").await;
    c4.send(publish(&deep, QoS::AtLeastOnce, 1, "x")).await;
    assert!(!c4.until_closed().await.iter().any(|p| matches!(p, Packet::PubAck(_))));
    let mut c = Raw::v5(n.tcp, "deep-will").await;
    let mut conn = connect_packet(Protocol::V5, "deep-will-2", true);
    conn.will = Some(Will { topic: deep.clone(), payload: "x".into(), qos: QoS::AtMostOnce, retain: true, props: Properties::default() });
    assert_eq!(Raw::session(n.tcp, conn).await.1.code, reason::TOPIC_NAME_INVALID);
    // Everyone else is served; "#" sees no deep retained message.
    assert_eq!(c.sub("#", QoS::AtMostOnce).await, [0]);
    let seen = c.sync().await;
    assert!(!seen.iter().any(|p| matches!(p, Packet::Publish(x) if x.topic.len() > 100)), "{seen:?}");
    let dir = n.stop().await;
    let n = common::start_in(dir.as_ref().unwrap().path().to_path_buf(), |_| {}).await;
    Raw::v5(n.tcp, "after-restart").await;
}

/// Nobody grants a role — built-in or custom — whose permissions they do not all hold, and
/// nobody changes a user who holds more than they do. Tried for every permission.
#[tokio::test]
async fn roles_cannot_be_escalated_inside_a_tenant() {
    let p = Platform::start(None, |_| {}).await;
    let (http, addr) = (&p.http, p.http_addr());
    let (s, t) = p.admin("POST", "/api/v1/tenants", Some(json!({"name": "acme"}))).await;
    assert_eq!(s, 201, "{t}");
    let tenant = t["id"].as_i64().unwrap();
    let role = |name: &str, perms: Vec<&str>| json!({"name": name, "permissions": perms, "tenant_id": tenant});
    let (s, um) = p.admin("POST", "/api/v1/roles", Some(role("user-managers", vec!["user:manage"]))).await;
    assert_eq!(s, 201, "{um}");
    let user = |name: &str, role: &str, role_id: Option<i64>| json!({"username": name, "password": "long-password-1", "role": role, "role_id": role_id, "tenant_id": tenant});
    let (s, mgr) = p.admin("POST", "/api/v1/users", Some(user("mgr", "custom", um["id"].as_i64()))).await;
    assert_eq!(s, 201, "{mgr}");
    let (s, boss) = p.admin("POST", "/api/v1/users", Some(user("boss", "tenant_admin", None))).await;
    assert_eq!(s, 201, "{boss}");
    let tok = login_user(http, addr, "mgr", "long-password-1").await["access_token"].as_str().unwrap().to_string();
    let me = mgr["id"].as_i64().unwrap();

    for builtin in ["tenant_admin", "tenant_user", "system_admin"] {
        let (s, v) = call(http, addr, &tok, "POST", "/api/v1/users", Some(user(&format!("x-{builtin}"), builtin, None))).await;
        assert!(s == 403 || s == 400, "granting {builtin}: {s} {v}");
        let (s, v) = call(http, addr, &tok, "PATCH", &format!("/api/v1/users/{me}"), Some(json!({"role": builtin}))).await;
        assert!(s == 403 || s == 400, "giving itself {builtin}: {s} {v}");
    }
    let (_, perms) = p.admin("GET", "/api/v1/permissions", None).await;
    for perm in perms["permissions"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()) {
        if perm == "user:manage" || perm == "tenant:manage" {
            continue; // held; tenant:manage is no custom role's
        }
        let (s, r) = p.admin("POST", "/api/v1/roles", Some(role(&format!("r-{perm}"), vec![perm, "user:manage"]))).await;
        assert_eq!(s, 201, "{r}");
        let rid = r["id"].as_i64();
        let (s, v) =
            call(http, addr, &tok, "POST", "/api/v1/users", Some(user(&format!("u-{}", perm.replace(':', "-")), "custom", rid))).await;
        assert_eq!(s, 403, "granting a role with {perm}: {v}");
        let (s, v) = call(http, addr, &tok, "PATCH", &format!("/api/v1/users/{me}"), Some(json!({"role": "custom", "role_id": rid}))).await;
        assert_eq!(s, 403, "giving itself a role with {perm}: {v}");
    }
    // What it holds, it may grant.
    let (s, v) = call(http, addr, &tok, "POST", "/api/v1/users", Some(user("peer", "custom", um["id"].as_i64()))).await;
    assert_eq!(s, 201, "{v}");
    // A tenant admin's account cannot be taken over by setting its password, or disabled.
    let boss_id = boss["id"].as_i64().unwrap();
    for change in [json!({"password": "taken-over-1"}), json!({"disabled": true})] {
        let (s, v) = call(http, addr, &tok, "PATCH", &format!("/api/v1/users/{boss_id}"), Some(change)).await;
        assert_eq!(s, 403, "{v}");
    }
    let (s, v) = call(http, addr, &tok, "DELETE", &format!("/api/v1/users/{boss_id}"), None).await;
    assert_eq!(s, 403, "{v}");
    login_user(http, addr, "boss", "long-password-1").await;
}

/// `device:read` shows credentials by kind, id, creation and a short fingerprint: the token
/// appears once, at creation, and is stored (database, cache keys) only as a digest.
#[tokio::test]
async fn device_tokens_are_shown_once_and_stored_as_digests() {
    let redis = common::backends::redis();
    let prefix = format!("t{:x}:", rand::random::<u32>());
    let p = Platform::start(None, |c| {
        if let Some(r) = &redis {
            c.cache.url = r.clone();
            c.cache.prefix = prefix.clone();
        }
    })
    .await;
    let (_, token) = p.create_device("tok-1", json!({})).await;
    // It works (and is cached).
    let mut d = device(p.node.tcp, Protocol::V5, "t", &token).await;
    assert!([0, reason::NO_MATCHING_SUBSCRIBERS].contains(&pub1(&mut d, "devices/telemetry", 1, r#"{"t": 1}"#).await));
    let (s, rotated) = p.admin("POST", "/api/v1/devices/tok-1/credentials", Some(json!({"kind": "token"}))).await;
    assert_eq!(s, 201, "{rotated}");
    let second = rotated["access_token"].as_str().unwrap().to_string();
    device(p.node.tcp, Protocol::V4, "t2", &second).await;

    let (s, list) = p.admin("GET", "/api/v1/devices/tok-1/credentials", None).await;
    assert_eq!(s, 200);
    let text = list.to_string();
    for t in [&token, &second] {
        assert!(!text.contains(t.as_str()), "a token is readable: {text}");
    }
    for c in list.as_array().unwrap() {
        assert_eq!(c["kind"], "token");
        assert_eq!(c["label"].as_str().unwrap().len(), 12, "{c}");
        assert!(c.get("identity").is_none() && c.get("secret").is_none(), "{c}");
    }
    let db = std::fs::read(p.node.dir.join("meta.db")).unwrap();
    for t in [&token, &second] {
        assert!(!db.windows(t.len()).any(|w| w == t.as_bytes()), "the meta store holds a token");
    }
    if let Some(url) = &redis {
        let out = std::process::Command::new("redis-cli")
            .args(["-u", url, "--scan", "--pattern", &format!("{prefix}*")])
            .output()
            .expect("redis-cli");
        let keys = String::from_utf8_lossy(&out.stdout);
        assert!(keys.contains("cred:token:"), "the identity is cached in Redis: {keys}");
        for t in [&token, &second] {
            assert!(!keys.contains(t.as_str()), "a Redis key holds a token: {keys}");
        }
    }
}

/// Device numbers are one namespace for the platform (they are topic names). Another tenant's
/// number answers exactly as one's own taken number, and reads of it as a missing device.
#[tokio::test]
async fn device_numbers_do_not_tell_tenants_apart() {
    let p = Platform::start(None, |_| {}).await;
    let (http, addr) = (&p.http, p.http_addr());
    let mut toks = Vec::new();
    for name in ["ta", "tb"] {
        let (_, t) = p.admin("POST", "/api/v1/tenants", Some(json!({"name": name}))).await;
        let body =
            json!({"username": format!("{name}-admin"), "password": "long-password-1", "role": "tenant_admin", "tenant_id": t["id"]});
        assert_eq!(p.admin("POST", "/api/v1/users", Some(body)).await.0, 201);
        toks.push(login_user(http, addr, &format!("{name}-admin"), "long-password-1").await["access_token"].as_str().unwrap().to_string());
    }
    let create = |tok: String| {
        let http = http.clone();
        async move { call(&http, addr, &tok, "POST", "/api/v1/devices", Some(json!({"device_number": "thermo-1"}))).await }
    };
    assert_eq!(create(toks[0].clone()).await.0, 201);
    let own = create(toks[0].clone()).await;
    let other = create(toks[1].clone()).await;
    assert_eq!(own.0, 409);
    assert_eq!(own, other, "tenant B learns more than tenant A would");
    let missing = call(http, addr, &toks[1], "GET", "/api/v1/devices/no-such-device", None).await;
    let theirs = call(http, addr, &toks[1], "GET", "/api/v1/devices/thermo-1", None).await;
    assert_eq!(theirs.0, 404);
    assert_eq!(theirs.1["error"]["code"], missing.1["error"]["code"]);
}

/// A deleted device's persistent sessions end with it: a new device given the same number
/// does not inherit its subscriptions or queue.
#[tokio::test]
async fn a_deleted_device_leaves_no_session_behind() {
    let p = Platform::start(None, |_| {}).await;
    let (_, t1) = p.create_device("reused-1", json!({})).await;
    let persistent = |token: &str| {
        let mut c = connect_packet(Protocol::V5, "fw", false);
        c.username = Some(token.into());
        c.props.session_expiry_interval = Some(3600);
        c
    };
    let (mut d, a) = Raw::session(p.node.tcp, persistent(&t1)).await;
    assert_eq!(a.code, 0);
    assert_eq!(sub(&mut d, "devices/command/reused-1/+").await, [1]);
    d.send(disconnect()).await;
    assert_eq!(p.admin("DELETE", "/api/v1/devices/reused-1", None).await.0, 200);
    let (_, t2) = p.create_device("reused-1", json!({})).await;
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (mut d2, a) = Raw::session(p.node.tcp, persistent(&t2)).await;
        assert_eq!(a.code, 0);
        if !a.session_present {
            break;
        }
        d2.send(disconnect()).await;
        assert!(tokio::time::Instant::now() < end, "the new device inherited the deleted one's session");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The first admin API key is printed on stdout once and never written into the log.
#[tokio::test(flavor = "multi_thread")]
async fn the_first_admin_key_is_never_logged() {
    let dir = tempfile::tempdir().unwrap();
    let n = common::process::spawn(dir.path(), &[]).await;
    let line = n.wait_log("with the admin key", |l| l.contains("admin API key (shown once")).await;
    let key = line.rsplit(' ').next().unwrap().to_string();
    assert!(key.starts_with("thk_"), "{line}");
    let log = n.log.lock().unwrap().clone();
    let with_key: Vec<&String> = log.iter().filter(|l| l.contains(&key)).collect();
    assert_eq!(with_key, vec![&line], "the key appears in a log line");
}

/// A cluster listener other hosts can reach refuses the shipped cookie and short ones; a
/// stranger on the cluster port cannot announce a large frame before authenticating.
#[tokio::test(flavor = "multi_thread")]
async fn cluster_port_refuses_weak_cookies_and_unauthenticated_large_frames() {
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let refused = |env: Vec<(&'static str, String)>| async move {
        let dir = tempfile::tempdir().unwrap();
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_thingsd"));
        c.env("THINGSD_NODE__DATA_DIR", dir.path()).env("THINGSD_LISTENERS__TCP", "[]").env("THINGSD_LISTENERS__WS", "[]");
        c.env("THINGSD_LISTENERS__HTTP", "[]").env("THINGSD_LISTENERS__COAP", "[]").env("THINGSD_CLUSTER__ENABLED", "true");
        c.env("THINGSD_CLUSTER__ADVERTISE", "127.0.0.1:1");
        for (k, v) in env {
            c.env(k, v);
        }
        let out = tokio::time::timeout(DEADLINE, c.kill_on_drop(true).output()).await.expect("exits in time").unwrap();
        assert!(!out.status.success(), "started anyway");
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout)
    };
    let err = refused(vec![("THINGSD_CLUSTER__LISTEN", format!("0.0.0.0:{}", free()))]).await;
    assert!(err.contains("cluster.cookie is the shipped default"), "{err}");
    let err =
        refused(vec![("THINGSD_CLUSTER__LISTEN", format!("127.0.0.1:{}", free())), ("THINGSD_CLUSTER__COOKIE", "short".into())]).await;
    assert!(err.contains("at least 16 characters"), "{err}");

    let port = free();
    let dir = tempfile::tempdir().unwrap();
    let env = [("THINGSD_CLUSTER__ENABLED", "true".to_string()), ("THINGSD_CLUSTER__LISTEN", format!("127.0.0.1:{port}"))];
    let n = common::process::spawn(dir.path(), &env).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(&(1u64 << 20).to_be_bytes()).await.unwrap();
    s.write_all(&[0u8; 1024]).await.unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(DEADLINE, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the node waited for a 1 MiB unauthenticated frame");
    // And it still serves.
    Raw::v5(n.addr, "still-here").await;
}

/// A device's timestamp is integer Unix milliseconds inside the window around now (default: a
/// year back, a day ahead); anything else is a 400, never a value named "ts".
#[tokio::test]
async fn device_timestamps_are_bounded_and_typed() {
    let p = Platform::start(None, |_| {}).await;
    let (_, token) = p.create_device("ts-1", json!({})).await;
    let url = format!("http://{}/api/v1/{token}/telemetry", p.http_addr());
    let now = thingsd::storage::meta::now_ms();
    let post = |body: String| {
        let (http, url) = (p.http.clone(), url.clone());
        async move {
            let r = http.post(url).body(body).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    for bad in [
        r#"{"ts": "1790000000000", "t": 1}"#.to_string(),
        format!(r#"{{"ts": {}.5, "t": 1}}"#, now),
        format!(r#"{{"ts": {}, "t": 1}}"#, now - 400 * 86_400_000),
        format!(r#"{{"ts": {}, "t": 1}}"#, now + 2 * 86_400_000),
        r#"{"ts": 9223372036854775807, "values": {"t": 1}}"#.to_string(),
    ] {
        let (s, v) = post(bad.clone()).await;
        assert_eq!(s, 400, "{bad}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("ts"), "{v}");
    }
    assert_eq!(post(format!(r#"{{"ts": {}, "t": 1}}"#, now - 86_400_000)).await.0, 200);
    let (_, latest) = p.admin("GET", "/api/v1/devices/ts-1/telemetry/latest", None).await;
    assert!(latest.get("ts").is_none(), "a key named ts was stored: {latest}");
}

/// Extreme ranges are a 400, never an overflow (a panic, or a division by zero) in the node.
#[tokio::test]
async fn extreme_query_ranges_are_refused() {
    let p = Platform::start(None, |_| {}).await;
    let (_, token) = p.create_device("range-1", json!({})).await;
    let r = p.http.post(format!("http://{}/api/v1/{token}/telemetry", p.http_addr())).body(r#"{"t": 1}"#).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (min, max) = (i64::MIN, i64::MAX);
    for q in [
        format!("chart?key=t&from={min}&to={max}"),
        format!("chart?key=t&from={min}&to={max}&points=100000"),
        format!("chart?key=t&to={min}"),
        format!("history?keys=t&from={min}&to={max}"),
        format!("aggregate?key=t&from={min}&to={max}&window=1m&fn=avg"),
    ] {
        let (s, v) = p.admin("GET", &format!("/api/v1/devices/range-1/telemetry/{q}"), None).await;
        assert_eq!(s, 400, "{q}: {v}");
        assert!(v["error"]["message"].is_string(), "{v}");
    }
    // The node is still there.
    let (s, _) = p.admin("GET", "/api/v1/devices/range-1/telemetry/latest", None).await;
    assert_eq!(s, 200);
}

/// Failed logins lock an account only for the address they came from: a stranger cannot keep
/// `root` out. The counters keep their expiry in Redis (one script).
#[tokio::test]
async fn a_stranger_cannot_lock_an_account_for_everyone() {
    let redis = common::backends::redis();
    let prefix = format!("t{:x}:", rand::random::<u32>());
    let p = Platform::start(None, |c| {
        c.api.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
        if let Some(r) = &redis {
            c.cache.url = r.clone();
            c.cache.prefix = prefix.clone();
        }
    })
    .await;
    let url = format!("http://{}/api/v1/auth/login", p.http_addr());
    let login = |from: &'static str, password: &'static str| {
        let (http, url) = (p.http.clone(), url.clone());
        async move {
            let r = http
                .post(url)
                .header("x-forwarded-for", from)
                .json(&json!({"username": ROOT_USER, "password": password}))
                .send()
                .await
                .unwrap();
            r.status().as_u16()
        }
    };
    let mut locked = false;
    for _ in 0..10 {
        match login("203.0.113.7", "wrong-password").await {
            401 => {}
            429 => {
                locked = true;
                break;
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert!(locked, "the stranger was never limited");
    assert_eq!(login("203.0.113.7", ROOT_PASSWORD).await, 429, "the stranger's address stays locked out of the account");
    // The owner, elsewhere, logs in.
    assert_eq!(login("198.51.100.20", ROOT_PASSWORD).await, 200, "the account is locked for everyone");
    if let Some(url) = &redis {
        // Every counter has an expiry.
        let out = std::process::Command::new("redis-cli")
            .args(["-u", url, "--scan", "--pattern", &format!("{prefix}loginfail*")])
            .output()
            .expect("redis-cli");
        let keys = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(!keys.trim().is_empty(), "no login counters in Redis");
        for k in keys.lines().filter(|k| !k.is_empty()) {
            let ttl = std::process::Command::new("redis-cli").args(["-u", url, "pttl", k]).output().unwrap();
            let ttl: i64 = String::from_utf8_lossy(&ttl.stdout).trim().parse().unwrap();
            assert!(ttl > 0, "{k} has no expiry ({ttl})");
        }
    }
}

/// CoAP failures (UDP: the source address can be forged) never lock that address out of MQTT
/// or HTTP, and an unauthenticated CoAP source gets no answer larger than its request.
#[tokio::test]
async fn coap_failures_stay_on_coap_and_do_not_amplify() {
    use coap_lite::{RequestType, ResponseType};
    let p = Platform::start(None, |_| {}).await;
    let (_, token) = p.create_device("coap-1", json!({})).await;
    let mut c = crate::device_http_coap::Coap::new(p.node.coap.expect("coap listener")).await;
    let mut limited = false;
    for i in 0..30 {
        let bad = format!("/api/v1/not-a-token-{i}/telemetry");
        let r = c.call(RequestType::Post, &bad, true, "{}").await;
        // The request is at least: header 4, token 2, each path segment and its option byte
        // (the slashes count those), payload marker and "{}".
        let sent = 4 + 2 + bad.len() + 3;
        assert!(r.to_bytes().unwrap().len() <= sent, "a {}-byte answer to a {sent}-byte request", r.to_bytes().unwrap().len());
        match crate::device_http_coap::code(&r) {
            ResponseType::Unauthorized => {}
            ResponseType::TooManyRequests => limited = true,
            other => panic!("{other:?}"),
        }
    }
    assert!(limited, "CoAP failures were never limited");
    // The same address still logs in over MQTT and posts over HTTP.
    device(p.node.tcp, Protocol::V5, "after-coap", &token).await;
    let r = p.http.post(format!("http://{}/api/v1/{token}/telemetry", p.http_addr())).body(r#"{"t": 1}"#).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

/// Alert channels cannot reach loopback, private or metadata addresses unless an operator
/// allows them (`alerts.allowed_networks`): by address, by a name resolving there, or by a
/// redirect from an allowed endpoint.
#[tokio::test(flavor = "multi_thread")]
async fn alert_channels_cannot_reach_internal_addresses() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let p = Platform::start(None, |c| {
        c.alerts.tick_ms = 100;
        c.alerts.reconcile_ms = 200;
        c.alerts.notify_attempts = 1;
    })
    .await;
    // An "internal service" on loopback counts every connection it gets.
    let internal = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = internal.local_addr().unwrap().port();
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = internal.accept().await {
            h.fetch_add(1, Ordering::SeqCst);
            drop(s);
        }
    });
    let channels = [
        json!({"name": "by-address", "kind": "webhook", "config": {"url": format!("http://127.0.0.1:{port}/x")}}),
        json!({"name": "by-name", "kind": "webhook", "config": {"url": format!("http://localhost:{port}/x")}}),
        json!({"name": "metadata", "kind": "webhook", "config": {"url": "http://169.254.169.254/latest/meta-data/"}}),
        json!({"name": "mail", "kind": "email", "config": {"smtp_host": "localhost", "smtp_port": port, "tls": "none", "from": "a@example.com", "to": ["b@example.com"]}}),
    ];
    let mut ids = Vec::new();
    for c in channels {
        let (s, v) = p.admin("POST", "/api/v1/channels", Some(c)).await;
        assert_eq!(s, 201, "{v}");
        ids.push(v["id"].clone());
    }
    let (_, token) = p.create_device("ssrf-1", json!({})).await;
    let rule = json!({"name": "any", "target": {"device": "ssrf-1"}, "condition": {"key": "t", "op": ">", "value": 0}, "channels": ids});
    let (s, r) = p.admin("POST", "/api/v1/alert-rules", Some(rule)).await;
    assert_eq!(s, 201, "{r}");
    let rid = r["id"].as_i64().unwrap();
    poll_admin(&p.http, p.http_addr(), &format!("/admin/v1/actors/alert:{rid}"), |v| {
        v.get("error").is_none() && v["actors"].as_array().is_none_or(|a| !a.is_empty())
    })
    .await;
    let url = format!("http://{}/api/v1/{token}/telemetry", p.http_addr());
    // Every channel tried, and failed: the failures are counted.
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        assert_eq!(p.http.post(&url).body(r#"{"t": 1}"#).send().await.unwrap().status().as_u16(), 200);
        let m = p.http.get(format!("http://{}/metrics", p.http_addr())).send().await.unwrap().text().await.unwrap();
        let failed = m
            .lines()
            .find(|l| l.starts_with("thingsd_alert_notifications_total{outcome=\"failed\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0);
        if failed >= 4 {
            break;
        }
        assert!(tokio::time::Instant::now() < end, "the channels were not all tried: {failed} failures");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0, "a notification reached the internal service");
}

/// A node that crashes does not leave its devices "online" forever: a survivor marks them
/// offline (so `offline_secs` rules fire), and a device that reconnects is online again.
#[tokio::test(flavor = "multi_thread")]
async fn a_crashed_nodes_devices_go_offline() {
    let Some(pg) = common::backends::postgres().await else { return };
    let mut cl = crate::common::cluster::TestCluster::start_some(2, 2, move |_| {
        format!("\n[meta]\nurl = \"{pg}\"\n\n[devices]\nadmin_key = \"{ADMIN_KEY}\"\n")
    })
    .await;
    let http = client();
    let n1 = cl.http(0);
    let (_, t) = create_device(&http, n1, "crash-1", json!({})).await;
    let mut d = device(cl.mqtt(1), Protocol::V5, "c", &t).await;
    d.sync().await;
    wait_online(&http, n1, "crash-1", true).await;
    cl.kill(1).await;
    wait_online(&http, n1, "crash-1", false).await;
    let _d = device(cl.mqtt(0), Protocol::V5, "c", &t).await;
    wait_online(&http, n1, "crash-1", true).await;
}

/// A session belongs to the principal that made it: another service account reusing its
/// client id starts clean and receives nothing of it.
#[tokio::test]
async fn sessions_are_bound_to_their_principal() {
    let p = Platform::start(None, |c| {
        c.devices.services.push(thingsd::config::ServiceAccount {
            username: "other-svc".into(),
            password_hash: thingsd::devices::hash_password(b"other-password-1"),
            publish: vec!["#".into()],
            subscribe: vec!["devices/#".into()],
        });
    })
    .await;
    let persistent = |user: &str, pass: &str| {
        let mut c = connect_packet(Protocol::V5, "shared-id", false);
        c.username = Some(user.into());
        c.password = Some(bytes::Bytes::copy_from_slice(pass.as_bytes()));
        c.props.session_expiry_interval = Some(3600);
        c
    };
    let (mut a, ack) = Raw::session(p.node.tcp, persistent(SVC_USER, SVC_PASS)).await;
    assert_eq!(ack.code, 0);
    assert_eq!(sub(&mut a, "devices/#").await, [1]);
    a.send(disconnect()).await;
    let (_, token) = p.create_device("bound-1", json!({})).await;
    let (mut b, ack) = Raw::session(p.node.tcp, persistent("other-svc", "other-password-1")).await;
    assert_eq!(ack.code, 0);
    assert!(!ack.session_present, "another principal inherited the session");
    let mut d = device(p.node.tcp, Protocol::V5, "bound-dev", &token).await;
    assert!([0, reason::NO_MATCHING_SUBSCRIBERS].contains(&pub1(&mut d, "devices/telemetry", 1, r#"{"t": 1}"#).await));
    let seen = b.sync().await;
    assert!(!seen.iter().any(|p| matches!(p, Packet::Publish(_))), "it received the other's subscription: {seen:?}");
    // The owner gets its own session back.
    let (_, ack) = Raw::session(p.node.tcp, persistent(SVC_USER, SVC_PASS)).await;
    assert!(ack.session_present);
}

/// WebSocket frames and messages are bounded by `mqtt.max_packet_size` before CONNECT: a
/// stranger cannot make the node buffer a 64 MiB message (tungstenite's own default).
#[tokio::test]
async fn websocket_messages_are_bounded_before_connect() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::Message;
    let n = common::start(|c| {
        c.mqtt.max_packet_size = 64 * 1024;
        // Only the bound may end it: not the wait for CONNECT.
        c.mqtt.connect_timeout_secs = 120;
    })
    .await;
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{}/mqtt", n.ws)).unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    // One message in unfinished fragments: the node must give up once it passes the bound,
    // not wait for the rest.
    let chunk = vec![0u8; 32 * 1024];
    let mut sent = 0;
    let closed = tokio::time::timeout(DEADLINE, async {
        for i in 0..64 {
            let op = if i == 0 { OpCode::Data(Data::Binary) } else { OpCode::Data(Data::Continue) };
            if ws.send(Message::Frame(Frame::message(chunk.clone(), op, false))).await.is_err() {
                return true;
            }
            sent += chunk.len();
        }
        // Everything sent (2 MiB, far past the bound): the node must have closed by now.
        matches!(ws.next().await, None | Some(Err(_)) | Some(Ok(Message::Close(_))))
    })
    .await;
    assert_eq!(closed, Ok(true), "the node kept buffering a WebSocket message ({sent} bytes sent)");
    // Others are served.
    Raw::v5(n.tcp, "after-ws").await;
}

/// A device may hold `mqtt.max_sessions_per_principal` sessions on a node: a new client id
/// beyond it ends the device's longest-disconnected session, and is refused (0x97) while all
/// of them are connected. Random client ids cannot fill a node's memory and disk.
#[tokio::test]
async fn sessions_per_device_are_capped() {
    let p = Platform::start(None, |c| c.mqtt.max_sessions_per_principal = 2).await;
    let (_, token) = p.create_device("capped-1", json!({})).await;
    let (_, other) = p.create_device("capped-2", json!({})).await;
    let tcp = p.node.tcp;
    let persistent = |id: &str, token: &str| {
        let mut c = connect_packet(Protocol::V5, id, false);
        c.username = Some(token.into());
        c.props.session_expiry_interval = Some(3600);
        c
    };
    // Polls until the CONNECT gets `code` (a disconnect reaches the session asynchronously).
    let until = |id: &'static str, code: u8| {
        let c = persistent(id, &token);
        async move {
            tokio::time::timeout(DEADLINE, async {
                loop {
                    let (r, ack) = Raw::session(tcp, c.clone()).await;
                    if ack.code == code {
                        return (r, ack);
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("{id} never got CONNACK {code:#x}"))
        }
    };
    let (mut a, ack) = Raw::session(tcp, persistent("cap-a", &token)).await;
    assert_eq!(ack.code, 0);
    assert_eq!(sub(&mut a, "v1/devices/me/attributes").await, [1]);
    let (_b, ack) = Raw::session(tcp, persistent("cap-b", &token)).await;
    assert_eq!(ack.code, 0);
    let (_, ack) = Raw::session(tcp, persistent("cap-c", &token)).await;
    assert_eq!(ack.code, reason::QUOTA_EXCEEDED, "a third connected session was let in");
    // Another device is not affected.
    let (_, ack) = Raw::session(tcp, persistent("cap-c", &other)).await;
    assert_eq!(ack.code, 0);
    // Once `a` is away, `c` takes its place and `a`'s session is gone.
    a.send(disconnect()).await;
    let (mut c, _) = until("cap-c", 0).await;
    let (_, ack) = Raw::session(tcp, persistent("cap-a", &token)).await;
    assert_eq!(ack.code, reason::QUOTA_EXCEEDED, "cap-a's session still existed beside two others");
    c.send(disconnect()).await;
    let (_, ack) = until("cap-a", 0).await;
    assert!(!ack.session_present, "the session that made way came back");
}

/// One device may hold `devices.coap_max_observations` CoAP observations: registering more
/// (new tokens, new source ports) ends its oldest, so a device cannot fill the node's table.
#[tokio::test]
async fn coap_observations_per_device_are_capped() {
    use crate::device_http_coap::{code, Coap};
    use coap_lite::{MessageType, RequestType, ResponseType};
    let p = Platform::start(None, |c| c.devices.coap_max_observations = 2).await;
    let (_, token) = p.create_device("observer-1", json!({})).await;
    let mut c = Coap::new(p.node.coap.expect("coap listener")).await;
    let path = format!("api/v1/{token}/rpc");
    let mut tokens = vec![];
    for _ in 0..3 {
        let mut reg = c.request(RequestType::Get, &path, true, "");
        reg.set_observe_value(0);
        c.send(&reg).await;
        let ack = c.recv().await;
        assert_eq!((code(&ack), ack.get_token()), (ResponseType::Content, reg.get_token()));
        tokens.push(reg.get_token().to_vec());
    }
    p.admin("POST", "/api/v1/devices/observer-1/commands", Some(json!({"method": "ping"}))).await;
    // Notifications are not acknowledged, so every live observation sends its own and then
    // retransmits it (after 2 s): once both newer ones have retransmitted, the oldest would
    // long have sent its first.
    let mut seen = [0usize; 3];
    while seen[1] < 2 || seen[2] < 2 {
        let n = c.recv().await;
        assert_eq!(n.header.get_type(), MessageType::Confirmable);
        let i = tokens.iter().position(|t| t.as_slice() == n.get_token()).expect("a notification for a registered token");
        seen[i] += 1;
    }
    assert_eq!(seen[0], 0, "the oldest observation outlived the cap: {seen:?}");
}

/// A channel's header values are secrets like its `secret`: readers see `********`, and saving
/// back what was read keeps the real values (the webhook still sends them).
#[tokio::test]
async fn alert_channel_headers_are_redacted_for_readers() {
    let p = Platform::start(None, |c| {
        c.alerts.tick_ms = 100;
        c.alerts.reconcile_ms = 200;
        c.alerts.allowed_networks = vec!["127.0.0.0/8".parse().unwrap()];
    })
    .await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Option<String>>();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::to_string));
                axum::http::StatusCode::OK
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    let config = json!({"url": hook, "secret": "sig-secret-1", "headers": {"X-Api-Key": "hdr-secret-1"}});
    let (s, ch) = p.admin("POST", "/api/v1/channels", Some(json!({"name": "keyed", "kind": "webhook", "config": config}))).await;
    assert_eq!(s, 201, "{ch}");
    let id = ch["id"].as_i64().unwrap();
    // A reader (alert:read) sees neither secret.
    let (s, _) =
        p.admin("POST", "/api/v1/users", Some(json!({"username": "reader", "password": "reader-pw-1", "role": "tenant_user"}))).await;
    assert_eq!(s, 201);
    let reader = login_user(&p.http, p.http_addr(), "reader", "reader-pw-1").await["access_token"].as_str().unwrap().to_string();
    let (s, shown) = call(&p.http, p.http_addr(), &reader, "GET", &format!("/api/v1/channels/{id}"), None).await;
    assert_eq!(s, 200, "{shown}");
    let (_, listed) = call(&p.http, p.http_addr(), &reader, "GET", "/api/v1/channels", None).await;
    for body in [&ch, &shown, &listed] {
        let text = body.to_string();
        assert!(!text.contains("hdr-secret-1") && !text.contains("sig-secret-1"), "a secret is shown: {text}");
    }
    assert_eq!(shown["config"]["headers"]["X-Api-Key"], "********");
    // Saved back as read: the stored values stay.
    let (s, v) = p
        .admin("PUT", &format!("/api/v1/channels/{id}"), Some(json!({"name": "keyed", "kind": "webhook", "config": shown["config"]})))
        .await;
    assert_eq!(s, 200, "{v}");
    let (_, token) = p.create_device("keyed-1", json!({})).await;
    let rule = json!({"name": "any", "target": {"device": "keyed-1"}, "condition": {"key": "t", "op": ">", "value": 0}, "channels": [id]});
    let (s, r) = p.admin("POST", "/api/v1/alert-rules", Some(rule)).await;
    assert_eq!(s, 201, "{r}");
    let rid = r["id"].as_i64().unwrap();
    poll_admin(&p.http, p.http_addr(), &format!("/admin/v1/actors/alert:{rid}"), |v| {
        v.get("error").is_none() && v["actors"].as_array().is_none_or(|a| !a.is_empty())
    })
    .await;
    let url = format!("http://{}/api/v1/{token}/telemetry", p.http_addr());
    assert_eq!(p.http.post(&url).body(r#"{"t": 1}"#).send().await.unwrap().status().as_u16(), 200);
    let got = tokio::time::timeout(DEADLINE, rx.recv()).await.expect("the webhook was called").unwrap();
    assert_eq!(got.as_deref(), Some("hdr-secret-1"));
}

/// A described key's value of the wrong type is refused even by a non-strict product (its
/// count, sum and average would not agree otherwise); keys the model does not describe pass.
#[tokio::test]
async fn values_keep_the_thing_models_types() {
    let p = Platform::start(None, |_| {}).await;
    let model = json!({"telemetry": [{"key": "temp", "type": "number"}], "attributes": [{"key": "fw", "type": "string"}]});
    let (s, prod) = p.admin("POST", "/api/v1/products", Some(json!({"name": "loose", "strict": false, "model": model}))).await;
    assert_eq!(s, 201, "{prod}");
    let (_, token) = p.create_device("typed-1", json!({"product_id": prod["id"]})).await;
    let url = |what: &str| format!("http://{}/api/v1/{token}/{what}", p.http_addr());
    let post = |what: &'static str, body: &'static str| {
        let (http, url) = (p.http.clone(), url(what));
        async move {
            let r = http.post(url).body(body).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    for (what, bad) in [("telemetry", r#"{"temp": "hot"}"#), ("telemetry", r#"{"temp": true, "x": 1}"#), ("attributes", r#"{"fw": 2}"#)] {
        let (s, v) = post(what, bad).await;
        assert_eq!(s, 400, "{bad}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("expected"), "{v}");
    }
    assert_eq!(post("telemetry", r#"{"temp": 21.5, "undescribed": "any"}"#).await.0, 200);
    assert_eq!(post("attributes", r#"{"fw": "1.2", "other": 3}"#).await.0, 200);
    // Over MQTT 5.0 the same value is refused with 0x99, and nothing of it is stored.
    let mut d = device(p.node.tcp, Protocol::V5, "typed", &token).await;
    d.send(publish("devices/telemetry", QoS::AtLeastOnce, 3, r#"{"temp": "cold"}"#)).await;
    match d.recv_app().await {
        Some(Packet::PubAck(a)) => assert_eq!((a.pkid, a.code), (3, reason::PAYLOAD_FORMAT_INVALID)),
        other => panic!("expected a PUBACK: {other:?}"),
    }
    let h = crate::telemetry::history(&p, "typed-1", "keys=temp&limit=100").await;
    let temps = crate::telemetry::values_of(&h, "temp");
    assert_eq!(temps.len(), 1, "{h}");
    assert_eq!(temps[0].1, json!(21.5));
}

/// A connected device's payloads are checked against its product's model as it is now: moved
/// to a product without a model, then back, then with its product's model changed, each next
/// message follows the new model — without reconnecting (the connection kept the model it read
/// at login before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_device_follows_its_products_model_at_once() {
    let p = Platform::start(None, |_| {}).await;
    let typed = |t: &str| json!({"telemetry": [{"key": "temp", "type": t}]});
    let (s, a) = p.admin("POST", "/api/v1/products", Some(json!({"name": "typed", "strict": false, "model": typed("number")}))).await;
    assert_eq!(s, 201, "{a}");
    let (s, b) = p.admin("POST", "/api/v1/products", Some(json!({"name": "untyped", "strict": false}))).await;
    assert_eq!(s, 201, "{b}");
    let (_, token) = p.create_device("follows-1", json!({"product_id": a["id"]})).await;
    let mut d = device(p.node.tcp, Protocol::V5, "follows", &token).await;
    let mut pkid = 0u16;
    let mut cold = async |d: &mut Raw| {
        pkid += 1;
        d.send(publish("devices/telemetry", QoS::AtLeastOnce, pkid, r#"{"temp": "cold"}"#)).await;
        match d.recv_app().await {
            Some(Packet::PubAck(a)) if a.pkid == pkid => a.code,
            other => panic!("expected the PUBACK of {pkid}: {other:?}"),
        }
    };
    assert_eq!(cold(&mut d).await, reason::PAYLOAD_FORMAT_INVALID, "a string where the model says number");
    let moved = |to: &Value| json!({"product_id": to["id"]});
    let (s, v) = p.admin("PATCH", "/api/v1/devices/follows-1", Some(moved(&b))).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(cold(&mut d).await, reason::SUCCESS, "moved to a product without a model");
    let (s, v) = p.admin("PATCH", "/api/v1/devices/follows-1", Some(moved(&a))).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(cold(&mut d).await, reason::PAYLOAD_FORMAT_INVALID, "back on the typed product");
    let path = format!("/api/v1/products/{}", a["id"]);
    let (s, v) = p.admin("PUT", &path, Some(json!({"name": "typed", "strict": false, "model": typed("string")}))).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(cold(&mut d).await, reason::SUCCESS, "the product's model now says string");
}

/// A point the store refuses for its content (PostgreSQL refuses a NUL in text) is refused to
/// its device with the store's reason while the rest of its batch is stored: one poison point
/// never wedges a writer. A store that stops answering gets devices a busy answer after
/// `telemetry.ack_timeout_ms` instead of a request that hangs; the point is written later.
/// An MQTT device's PUBACK is held instead, its connection served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_point_never_wedges_a_writer() {
    let Some(pg) = common::backends::postgres().await else { return };
    let (proxy, ts_url) = common::cut::in_front_of_postgres(&pg).await;
    let p = Platform::start(None, |c| {
        c.telemetry.store = ts_url.clone();
        c.telemetry.writers = 1;
        c.telemetry.ack_timeout_ms = 1_000;
    })
    .await;
    let mut tokens = vec![];
    for i in 0..4 {
        tokens.push(p.create_device(&format!("poison-{i}"), json!({})).await.1);
    }
    let post = |token: &str, body: String| {
        let (http, url) = (p.http.clone(), format!("http://{}/api/v1/{token}/telemetry", p.http_addr()));
        async move {
            let r = http.post(url).body(body).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let ts = thingsd::storage::meta::now_ms() - 60_000;
    // Sent together, so the writer takes poison and good points in the same batches.
    let mut sent = vec![];
    for round in 0..5i64 {
        for (i, t) in tokens.iter().enumerate() {
            let body = if i == 0 {
                format!(r#"{{"ts": {}, "s": "bad\u0000{round}"}}"#, ts + round)
            } else {
                format!(r#"{{"ts": {}, "n": {round}}}"#, ts + round)
            };
            sent.push((i, tokio::spawn(post(t, body))));
        }
    }
    for (i, h) in sent {
        let (s, v) = h.await.unwrap();
        if i == 0 {
            assert_eq!(s, 422, "{v}");
            assert_eq!(v["error"]["code"], "refused_by_store", "{v}");
        } else {
            assert_eq!(s, 200, "a good point beside a poison one: {v}");
        }
    }
    let range = format!("from={}&to={}&keys=n&limit=100", ts, ts + 10);
    for i in 1..4 {
        let h = crate::telemetry::history(&p, &format!("poison-{i}"), &range).await;
        assert_eq!(crate::telemetry::values_of(&h, "n").len(), 5, "poison-{i}: {h}");
    }
    // MQTT 5.0: the refused message gets 0x99; the device stays connected and is served.
    let mut d = device(p.node.tcp, Protocol::V5, "poison", &tokens[0]).await;
    d.send(publish("devices/telemetry", QoS::AtLeastOnce, 5, r#"{"s": "nul\u0000"}"#)).await;
    match d.recv_app().await {
        Some(Packet::PubAck(a)) => assert_eq!((a.pkid, a.code), (5, reason::PAYLOAD_FORMAT_INVALID)),
        other => panic!("expected a PUBACK: {other:?}"),
    }
    d.send(publish("devices/telemetry", QoS::AtLeastOnce, 6, r#"{"s": "fine"}"#)).await;
    match d.recv_app().await {
        Some(Packet::PubAck(a)) => assert_eq!((a.pkid, a.code), (6, 0)),
        other => panic!("expected a PUBACK: {other:?}"),
    }

    // The store stops answering: the device hears 503 after about ack_timeout_ms, not never.
    proxy.cut(true);
    let started = std::time::Instant::now();
    let (s, v) = post(&tokens[1], format!(r#"{{"ts": {}, "n": 99}}"#, ts + 9)).await;
    assert_eq!(s, 503, "{v}");
    assert!(started.elapsed() < std::time::Duration::from_secs(8), "answered after {:?}", started.elapsed());
    proxy.cut(false);
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let h = crate::telemetry::history(&p, "poison-1", &range).await;
        if crate::telemetry::values_of(&h, "n").iter().any(|(_, v)| v.as_f64() == Some(99.0)) {
            break;
        }
        assert!(tokio::time::Instant::now() < end, "the timed-out point is written once the store is back: {h}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // MQTT holds the PUBACK while the store does not answer, well past `ack_timeout_ms`,
    // instead of disconnecting the device (which would log in again: more load on a store
    // that is behind). The connection is served meanwhile: a second PUBLISH is read, a
    // PINGREQ is answered within half the keep-alive; the PUBACKs come, in order, once the
    // points are written.
    let mut c = connect_packet(Protocol::V4, "held", true);
    (c.keep_alive, c.username) = (4, Some(tokens[2].clone()));
    let (mut h, ack) = Raw::session(p.node.tcp, c).await;
    assert_eq!(ack.code, 0);
    proxy.cut(true);
    for (pkid, n) in [(1u16, 41), (2, 42)] {
        h.send(publish("v1/devices/me/telemetry", QoS::AtLeastOnce, pkid, &format!(r#"{{"ts": {}, "n": {n}}}"#, ts + n - 40))).await;
    }
    // Refused at once (not JSON; 3.1.1 acknowledges and drops it), but answered in its turn.
    h.send(publish("v1/devices/me/telemetry", QoS::AtLeastOnce, 3, "not json")).await;
    h.send(Packet::PingReq).await;
    match h.recv_app().await {
        Some(Packet::PingResp) => {}
        other => panic!("the keep-alive is answered while the writes wait, before their PUBACKs: {other:?}"),
    }
    proxy.cut(false);
    let mut acked = vec![];
    while acked.len() < 3 {
        match h.recv_app().await {
            Some(Packet::PubAck(a)) => acked.push((a.pkid, a.code)),
            // Kept alive while the writer reconnects.
            Some(Packet::PingResp) => h.send(Packet::PingReq).await,
            other => panic!("expected the held PUBACKs: {other:?}"),
        }
    }
    assert_eq!(acked, [(1, 0), (2, 0), (3, 0)], "acknowledged in the PUBLISHes' order");
    let h = crate::telemetry::history(&p, "poison-2", &range).await;
    let n: Vec<f64> = crate::telemetry::values_of(&h, "n").iter().filter_map(|(_, v)| v.as_f64()).collect();
    assert!(n.contains(&41.0) && n.contains(&42.0), "acknowledged means stored: {h}");
}

/// A device that keeps making client-side RPC calls cannot fill the shared cache: beyond 100
/// per `devices.command_ttl_secs` each call is answered with an error at once and not kept
/// (a service's answer to it finds nothing); another device is not affected; and a device can
/// answer only its own requests' topics (it cannot even subscribe to another's responses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_side_rpc_is_bounded_per_device() {
    let p = Platform::start(None, |_| {}).await;
    let (_, token) = p.create_device("rpc-flood", json!({})).await;
    let (_, other) = p.create_device("rpc-calm", json!({})).await;
    let mut d = device(p.node.tcp, Protocol::V5, "rpc-flood-c", &token).await;
    assert_eq!(sub(&mut d, "v1/devices/me/rpc/response/+").await, [1]);
    assert_eq!(sub(&mut d, "v1/devices/rpc-calm/rpc/response/+").await, [0x87], "another device's responses");
    for i in 1..=101 {
        assert_eq!(pub1(&mut d, &format!("v1/devices/me/rpc/request/{i}"), 1, r#"{"method": "getTime", "params": {}}"#).await, 0);
    }
    let refused = next_on(&mut d, "v1/devices/me/rpc/response/101").await;
    assert!(json_of(&refused)["error"].as_str().is_some_and(|e| e.contains("too many")), "{}", json_of(&refused));
    let (s, _) = p.admin("POST", "/api/v1/devices/rpc-flood/rpc/101/response", Some(json!({"t": 1}))).await;
    assert_eq!(s, 404, "the refused call was not kept");
    let (s, _) = p.admin("POST", "/api/v1/devices/rpc-flood/rpc/100/response", Some(json!({"t": 1}))).await;
    assert_eq!(s, 200, "the hundredth was");
    let mut c = device(p.node.tcp, Protocol::V5, "rpc-calm-c", &other).await;
    assert_eq!(pub1(&mut c, "v1/devices/me/rpc/request/1", 1, r#"{"method": "getTime"}"#).await, 0);
    let (s, _) = p.admin("POST", "/api/v1/devices/rpc-calm/rpc/1/response", Some(json!({"t": 1}))).await;
    assert_eq!(s, 200, "another device is not limited");
}
