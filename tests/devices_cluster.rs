//! Devices on a two-node cluster sharing one PostgreSQL: a device connected to node 2 is
//! online, commandable, disabled and revoked through node 1's admin API — with the in-process
//! cache (invalidated over the cluster links) and with Redis. And a cluster of two wire
//! versions (a rolling upgrade half done).
use crate::common;
use crate::common::{connect_packet, Raw};

use crate::common::cluster::TestCluster;
use crate::common::platform::*;
use serde_json::json;
use thingsd::protocols::mqtt::*;

#[tokio::test]
async fn devices_across_nodes_in_process_cache() {
    let Some(pg) = common::backends::postgres().await else { return };
    across_nodes(pg, None).await;
}

#[tokio::test]
async fn devices_across_nodes_redis_cache() {
    let Some(pg) = common::backends::postgres().await else { return };
    let Some(redis) = common::backends::redis() else { return };
    across_nodes(pg, Some(redis)).await;
}

async fn across_nodes(pg: String, redis: Option<String>) {
    let cache = match redis {
        Some(r) => format!("\n[cache]\nurl = \"{r}\"\nprefix = \"c{:x}:\"\n", rand::random::<u32>()),
        None => String::new(),
    };
    let cl = TestCluster::start_some(2, 2, move |_| format!("\n[meta]\nurl = \"{pg}\"\n\n[devices]\nadmin_key = \"{ADMIN_KEY}\"\n{cache}"))
        .await;
    let http = client();
    let n1 = cl.http(0);
    let (_, t1) = create_device(&http, n1, "cd-1", json!({})).await;
    let (_, t2) = create_device(&http, n1, "cd-2", json!({})).await;

    // Connected to node 2: online as node 1 sees it, and commandable through node 1.
    let mut d1 = device(cl.mqtt(1), Protocol::V5, "c", &t1).await;
    assert_eq!(sub(&mut d1, "devices/command/cd-1/+").await, [1]);
    wait_online(&http, n1, "cd-1", true).await;
    let (s, cmd) = admin(&http, n1, "POST", "/api/v1/devices/cd-1/commands", Some(json!({"method": "hello", "params": {}}))).await;
    assert_eq!(s, 201, "{cmd}");
    let mid = cmd["message_id"].as_str().unwrap();
    let c = next_on(&mut d1, &format!("devices/command/cd-1/{mid}")).await;
    assert_eq!(json_of(&c)["method"], "hello");
    // Accepted: the platform consumed it, so it is a success (0x00) although no MQTT client
    // subscribes to responses here (not 0x10, which device SDKs log as a failure).
    assert_eq!(pub1(&mut d1, &format!("devices/command/response/{mid}"), 1, r#"{"result": 0}"#).await, reason::SUCCESS);
    wait_command(&http, n1, cmd["id"].as_i64().unwrap(), "acknowledged").await;

    // Revoking a credential on node 1 closes the device on node 2, whose cache had it.
    let mut d2 = device(cl.mqtt(1), Protocol::V5, "c", &t2).await;
    d2.sync().await;
    let (_, creds) = admin(&http, n1, "GET", "/api/v1/devices/cd-2/credentials", None).await;
    let id = creds[0]["id"].as_i64().unwrap();
    let (s, _) = admin(&http, n1, "DELETE", &format!("/api/v1/devices/cd-2/credentials/{id}"), None).await;
    assert_eq!(s, 200);
    assert_kicked(&mut d2).await;
    assert_eq!(login(cl.mqtt(1), Protocol::V5, "c", Some(&t2), None).await.1, reason::BAD_USERNAME_OR_PASSWORD);

    // Disabling on node 1 disconnects on node 2 at once, and node 2 refuses it after.
    let (s, _) = admin(&http, n1, "PATCH", "/api/v1/devices/cd-1", Some(json!({"enabled": false}))).await;
    assert_eq!(s, 200);
    assert_kicked(&mut d1).await;
    assert_eq!(login(cl.mqtt(1), Protocol::V5, "c", Some(&t1), None).await.1, reason::NOT_AUTHORIZED);
    wait_online(&http, n1, "cd-1", false).await;
}

/// The node's view of the cluster: member name → the wire version it writes to that member.
async fn wire_versions(cl: &TestCluster, i: usize) -> std::collections::BTreeMap<String, u64> {
    let (status, body) = common::http_get(cl.http(i), "/health/cluster").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["members"].as_array().unwrap().iter().map(|m| (m["name"].as_str().unwrap().to_string(), m["wire"].as_u64().unwrap())).collect()
}

/// A rolling upgrade half done: nodes 1 and 2 speak every wire version up to this build's
/// newest, node 3 only version 1 (`cluster.wire_version = 1`: it writes and reads exactly what the build before version 2
/// did, and refuses version 2). Each link agrees on the newest version both ends speak; what
/// version 2 adds works between nodes 1 and 2 (a device's own client attributes do not come
/// back to its session on another node); a persistent session hops across every link with a
/// QoS 1 stream flowing and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_of_wire_versions_1_and_2() {
    let Some(pg) = common::backends::postgres().await else { return };
    let env = [(2, vec![("THINGSD_CLUSTER__WIRE_VERSION".to_string(), "1".to_string())])].into_iter().collect();
    let hash = thingsd::devices::hash_password(SVC_PASS.as_bytes());
    let config = move |_| {
        format!(
            "\n[meta]\nurl = \"{pg}\"\n\n[devices]\nadmin_key = \"{ADMIN_KEY}\"\n\n[[devices.services]]\nusername = \"{SVC_USER}\"\n\
             password_hash = \"{hash}\"\npublish = []\nsubscribe = [\"v1/#\"]\n"
        )
    };
    let mut cl = TestCluster::start_env(3, 3, config, env).await;
    let v = thingsd::cluster::wire::VERSION as u64;
    agreed(&cl, [[v, v, 1], [v, v, 1], [1, 1, 1]]).await;

    // Version 2 (or newer) between nodes 1 and 2: a ThingsBoard device with a session on each; its client
    // attributes from node 1 reach a platform service on node 2 but not its own session there,
    // whose first message on its attribute topic is the platform's update.
    let http = client();
    let (_, token) = create_device(&http, cl.http(0), "wv-1", json!({})).await;
    let mut mine_b = device(cl.mqtt(1), Protocol::V5, "wv-b", &token).await;
    assert_eq!(sub(&mut mine_b, "v1/devices/me/attributes").await, [1]);
    let mut svc = service(cl.mqtt(1)).await;
    assert_eq!(sub(&mut svc, "v1/devices/wv-1/attributes").await, [1]);
    let mut mine_a = device(cl.mqtt(0), Protocol::V5, "wv-a", &token).await;
    assert_eq!(pub1(&mut mine_a, "v1/devices/me/attributes", 3, r#"{"fw_version": "2"}"#).await, 0);
    assert_eq!(json_of(&next_on(&mut svc, "v1/devices/wv-1/attributes").await), json!({"fw_version": "2"}));
    let (s, _) = admin(&http, cl.http(0), "PUT", "/api/v1/devices/wv-1/attributes", Some(json!({"params": {"interval": 7}}))).await;
    assert_eq!(s, 200);
    let got = mine_b.recv_publish().await;
    assert_eq!((got.topic.as_str(), json_of(&got)), ("v1/devices/me/attributes", json!({"interval": 7})));

    // Every link, both versions: a persistent session hops 3 → 1 → 3 → 2 → 1 → 3 while node 2
    // publishes a QoS 1 stream to it.
    let addrs = [cl.mqtt(0), cl.mqtt(1), cl.mqtt(2)];
    let hopper = |clean: bool| {
        let mut cp = connect_packet(Protocol::V5, "wv-hopper", clean);
        cp.props.session_expiry_interval = Some(600);
        cp
    };
    let (mut s, _) = Raw::session(addrs[2], hopper(true)).await;
    assert_eq!(s.sub("wv/#", QoS::AtLeastOnce).await, [1]);
    const N: u32 = 600;
    let publisher = tokio::spawn(async move {
        let mut p = Raw::v5(addrs[1], "wv-pub").await;
        for i in 0..N {
            assert_eq!(pub1(&mut p, "wv/t", (i % 60000 + 1) as u16, &i.to_string()).await, 0);
        }
    });
    let mut seen = std::collections::BTreeSet::new();
    let mut order: Vec<u32> = Vec::new();
    for (hop, next) in [0usize, 2, 1, 0, 2].into_iter().enumerate() {
        while seen.len() < (hop + 1) * N as usize / 6 {
            let m = s.recv_publish().await;
            let v: u32 = String::from_utf8_lossy(&m.payload).parse().unwrap();
            if seen.insert(v) {
                order.push(v);
            }
            s.send(Packet::PubAck(Ack::new(m.pkid, 0))).await;
        }
        let (again, ack) = Raw::session(addrs[next], hopper(false)).await;
        assert!(ack.code == 0 && ack.session_present, "hop {hop} to node {}: {ack:?}", next + 1);
        let mut old = std::mem::replace(&mut s, again);
        for p in old.until_closed().await {
            if let Packet::Publish(m) = p {
                let v: u32 = String::from_utf8_lossy(&m.payload).parse().unwrap();
                if seen.insert(v) {
                    order.push(v);
                }
            }
        }
    }
    while seen.len() < N as usize {
        let m = s.recv_publish().await;
        let v: u32 = String::from_utf8_lossy(&m.payload).parse().unwrap();
        if seen.insert(v) {
            order.push(v);
        }
        s.send(Packet::PubAck(Ack::new(m.pkid, 0))).await;
    }
    publisher.await.unwrap();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "in publish order across both versions");

    // Node 2 comes back speaking only version 1 (a downgrade), node 3 then with both (its
    // upgrade): every link agrees again, and no peer writes a newer version to the downgraded node.
    let cap = vec![("THINGSD_CLUSTER__WIRE_VERSION".to_string(), "1".to_string())];
    cl.env.insert(1, cap);
    cl.stop(1).await;
    cl.spawn(1).await;
    cl.env.remove(&2);
    cl.stop(2).await;
    cl.spawn(2).await;
    for i in 0..3 {
        cl.wait_members(i, 3).await;
    }
    agreed(&cl, [[v, 1, v], [1, 1, 1], [v, 1, v]]).await;
    let mut sub2 = Raw::v5(cl.mqtt(1), "wv-sub2").await;
    assert_eq!(sub2.sub("wv/after", QoS::AtLeastOnce).await, [1]);
    let mut p1 = Raw::v5(cl.mqtt(0), "wv-pub1").await;
    assert_eq!(pub1(&mut p1, "wv/after", 1, "across the downgraded link").await, 0);
    assert_eq!(&sub2.recv_publish().await.payload[..], b"across the downgraded link");
}

/// Poll until node i writes wire version `want[i][j]` to node j (itself: the newest it speaks);
/// versions are agreed after the introductions (Hello, then Versions).
async fn agreed(cl: &TestCluster, want: [[u64; 3]; 3]) {
    let want: Vec<std::collections::BTreeMap<String, u64>> =
        want.iter().map(|row| row.iter().enumerate().map(|(j, v)| (format!("node{}", j + 1), *v)).collect()).collect();
    let end = tokio::time::Instant::now() + common::DEADLINE;
    loop {
        let mut seen = Vec::new();
        for i in 0..3 {
            seen.push(wire_versions(cl, i).await);
        }
        if seen == want {
            return;
        }
        assert!(tokio::time::Instant::now() < end, "wire versions as nodes 1, 2, 3 see them: {seen:?}, expected {want:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
