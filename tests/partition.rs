//! A network partition between two nodes, made by TCP proxies the test controls (each node
//! advertises its proxy, so all node-to-node traffic crosses one). Cutting black-holes the
//! links (sockets stay open, bytes stop): heartbeats time out, both sides keep serving their
//! own clients; after healing, the nodes redial, and routes and retained messages converge.
//! A persistent client connected through the split stays connected: the copy of its session
//! the other side adopted is merged into it.

use crate::common::cluster::TestCluster;
use std::net::SocketAddr;

use crate::common::cut::Cut;
use crate::common::*;
use thingsd::protocols::mqtt::*;

fn retained(topic: &str, pkid: u16, payload: &str) -> Packet {
    let Packet::Publish(mut p) = publish(topic, QoS::AtLeastOnce, pkid, payload) else { unreachable!() };
    p.retain = true;
    Packet::Publish(p)
}

async fn pub1(c: &mut Raw, p: Packet) {
    c.send(p).await;
    loop {
        match c.recv_app().await {
            Some(Packet::PubAck(_)) => return,
            Some(Packet::Publish(_)) => {}
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
}

async fn next_text(c: &mut Raw) -> (String, String) {
    let m = c.recv_publish().await;
    if m.qos != QoS::AtMostOnce {
        c.send(Packet::PubAck(Ack::new(m.pkid, 0))).await;
    }
    (m.topic.to_string(), String::from_utf8_lossy(&m.payload).into_owned())
}

/// The retained message a fresh subscriber of `topic` on `node` gets ("" for none).
async fn retained_at(addr: SocketAddr, topic: &str) -> String {
    let mut s = Raw::v5(addr, &format!("probe-{}", rand_id())).await;
    s.sub(topic, QoS::AtMostOnce).await;
    s.sync()
        .await
        .into_iter()
        .find_map(|p| match p {
            Packet::Publish(m) => Some(String::from_utf8_lossy(&m.payload).into_owned()),
            _ => None,
        })
        .unwrap_or_default()
}

fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_and_heal() {
    let proxies = [Cut::new().await, Cut::new().await];
    let adv: Vec<String> = proxies.iter().map(|p| p.addr.to_string()).collect();
    let adv2 = adv.clone();
    let mut c = TestCluster::start_some(2, 0, move |i| {
        format!("advertise = \"{}\"\nheartbeat_ms = 100\nheartbeat_timeout_ms = 1000\nredial_max_ms = 300\n", adv2[i])
    })
    .await;
    c.seeds = Some(vec![adv[0].clone()]);
    for (i, proxy) in proxies.iter().enumerate() {
        c.spawn(i).await;
        proxy.set_upstream(c.nodes[i].ready.cluster.unwrap());
    }
    c.wait_members(0, 2).await;
    c.wait_members(1, 2).await;
    let (a, b) = (c.mqtt(0), c.mqtt(1));

    let mut sa = Raw::v5(a, "sub-a").await;
    sa.sub("part/#", QoS::AtLeastOnce).await;
    let mut sb = Raw::v5(b, "sub-b").await;
    sb.sub("part/#", QoS::AtLeastOnce).await;
    // A persistent session on A (its replica is on B, which adopts it during the split).
    let mut dc = connect_packet(Protocol::V5, "dur-a", true);
    dc.props.session_expiry_interval = Some(3600);
    let (mut da, _) = Raw::session(a, dc).await;
    da.sub("part/#", QoS::AtLeastOnce).await;
    let mut pa = Raw::v5(a, "pub-a").await;
    let mut pb = Raw::v5(b, "pub-b").await;
    pub1(&mut pa, publish("part/x", QoS::AtLeastOnce, 1, "joined")).await;
    assert_eq!(next_text(&mut sa).await.1, "joined");
    assert_eq!(next_text(&mut sb).await.1, "joined");
    assert_eq!(next_text(&mut da).await.1, "joined");

    // Partition: each side finds the other silent and carries on alone.
    proxies[0].cut(true);
    proxies[1].cut(true);
    c.wait_members(0, 1).await;
    c.wait_members(1, 1).await;
    pub1(&mut pa, publish("part/x", QoS::AtLeastOnce, 2, "a-side")).await;
    assert_eq!(next_text(&mut sa).await.1, "a-side");
    pub1(&mut pb, publish("part/x", QoS::AtLeastOnce, 2, "b-side")).await;
    assert_eq!(next_text(&mut sb).await.1, "b-side");
    assert_eq!(next_text(&mut da).await.1, "a-side");
    // Conflicting retained writes (B's is later), and one write on each side only.
    pub1(&mut pa, retained("part/r", 3, "from-a")).await;
    next_text(&mut sa).await;
    pub1(&mut pb, retained("part/r", 3, "from-b")).await;
    next_text(&mut sb).await;
    pub1(&mut pa, retained("part/only-a", 4, "A")).await;
    next_text(&mut sa).await;
    pub1(&mut pb, retained("part/only-b", 4, "B")).await;
    next_text(&mut sb).await;
    assert_eq!(retained_at(b, "part/only-a").await, "", "B has not heard of A's write during the split");

    // Heal: links come back by themselves; routes and retained messages converge.
    proxies[0].cut(false);
    proxies[1].cut(false);
    c.wait_members(0, 2).await;
    c.wait_members(1, 2).await;
    for (addr, name) in [(a, "A"), (b, "B")] {
        let end = tokio::time::Instant::now() + DEADLINE;
        loop {
            let got = (retained_at(addr, "part/r").await, retained_at(addr, "part/only-a").await, retained_at(addr, "part/only-b").await);
            if got == ("from-b".to_string(), "A".to_string(), "B".to_string()) {
                break;
            }
            assert!(tokio::time::Instant::now() < end, "node {name} did not converge: {got:?}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    // Routes were re-exchanged on link-up (before the members were reported up).
    pub1(&mut pa, publish("part/x", QoS::AtLeastOnce, 5, "healed-a")).await;
    pub1(&mut pb, publish("part/x", QoS::AtLeastOnce, 6, "healed-b")).await;
    let mut on_a = vec![next_text(&mut sa).await.1, next_text(&mut sa).await.1];
    let mut on_b = vec![next_text(&mut sb).await.1, next_text(&mut sb).await.1];
    on_a.sort();
    on_b.sort();
    assert_eq!(on_a, vec!["healed-a", "healed-b"]);
    assert_eq!(on_b, vec!["healed-a", "healed-b"]);
    // The persistent client on A was never disconnected, and got what B's side kept for it
    // during the split (with repeats of what it already had: at least once).
    let mut on_d = std::collections::BTreeSet::new();
    while !["b-side", "healed-a", "healed-b"].iter().all(|t| on_d.contains(*t)) {
        match da.recv().await {
            Some(Packet::Publish(m)) => {
                if m.qos != QoS::AtMostOnce {
                    da.send(Packet::PubAck(Ack::new(m.pkid, 0))).await;
                }
                on_d.insert(String::from_utf8_lossy(&m.payload).into_owned());
            }
            Some(Packet::Disconnect(d)) => panic!("the persistent client was disconnected at the heal: {d:?} (got {on_d:?})"),
            Some(_) => {}
            None => panic!("the persistent client's connection was closed at the heal (got {on_d:?})"),
        }
    }
}
