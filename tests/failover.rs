//! Three nodes under a live QoS 1 stream at ~1,000 msg/s: the subscriber's node is killed and
//! the client reconnects to a survivor; then a subscriber is away for 5 s. Every acknowledged
//! message arrives, in order, and the reconnect after the kill is answered at once.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::cluster::TestCluster;
use crate::common::*;
use thingsd::cluster::rendezvous;
use thingsd::protocols::mqtt::*;

const RATE_PER_MS: u64 = 1; // ~1,000 messages per second

fn durable(id: &str, clean: bool) -> Connect {
    let mut cp = connect_packet(Protocol::V5, id, clean);
    cp.props.session_expiry_interval = Some(3600);
    cp
}

/// Publish `n` QoS 1 messages ("0".."n-1") at about 1,000 per second, pipelined; returns how
/// many were acknowledged with success. Runs until every PUBACK is in.
async fn stream(mut p: Raw, topic: &'static str, n: u32, progress: Arc<AtomicU32>) -> u32 {
    let start = Instant::now();
    let mut acked = 0;
    let mut sent = 0;
    while acked < n {
        let due = (start.elapsed().as_millis() as u64 * RATE_PER_MS).min(n as u64) as u32;
        while sent < due && sent - acked < 500 {
            p.send(publish(topic, QoS::AtLeastOnce, (sent % 60000 + 1) as u16, &sent.to_string())).await;
            sent += 1;
        }
        match tokio::time::timeout(Duration::from_millis(1), p.recv_app()).await {
            Ok(Some(Packet::PubAck(a))) => {
                assert!(a.code < 0x80, "PUBACK {a:?}");
                acked += 1;
                progress.store(acked, Ordering::Relaxed);
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("publisher closed"),
            Err(_) => {}
        }
    }
    acked
}

/// Read until every number below `n` (those in `seen` aside) arrived; QoS 1 redeliveries
/// after a failover may repeat some. Returns how many arrived ahead of an older one (a copy
/// that was on its way to the lost node and was re-routed after newer ones).
async fn receive(s: &mut Raw, n: u32, seen: &mut Vec<bool>) -> u32 {
    seen.resize(n as usize, false);
    let mut missing = seen.iter().filter(|x| !**x).count();
    let mut reordered = 0;
    let mut highest: Option<u32> = None;
    while missing > 0 {
        let m = match tokio::time::timeout(DEADLINE / 2, s.recv_app()).await {
            Ok(Some(Packet::Publish(m))) => m,
            Ok(Some(_)) => continue,
            other => {
                let lost: Vec<usize> = seen.iter().enumerate().filter(|(_, x)| !**x).map(|(i, _)| i).take(20).collect();
                panic!("{missing} never arrived ({other:?}), e.g. {lost:?}");
            }
        };
        s.send(Packet::PubAck(Ack::new(m.pkid, 0))).await;
        let v: u32 = String::from_utf8_lossy(&m.payload).parse().unwrap();
        assert!(v < n, "unexpected message {v}");
        if !seen[v as usize] {
            seen[v as usize] = true;
            missing -= 1;
            if highest.is_some_and(|h| v < h) {
                reordered += 1;
            }
            highest = highest.max(Some(v));
        }
    }
    reordered
}

/// Reconnect with the session to `addr` until accepted; returns the connection and how long the
/// successful CONNECT took to be answered.
async fn reconnect(addr: std::net::SocketAddr, id: &str) -> (Raw, Duration) {
    let end = Instant::now() + DEADLINE * 2;
    loop {
        let t = Instant::now();
        if let Some(mut r) = Raw::try_connect(addr).await {
            r.send(Packet::Connect(Box::new(durable(id, false)))).await;
            if let Some(Packet::ConnAck(a)) = r.recv().await {
                if a.code == 0 {
                    assert!(a.session_present, "the session survived its node");
                    return (r, t.elapsed());
                }
            }
        }
        assert!(Instant::now() < end, "no survivor accepted the session");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_stream_survives_the_subscribers_node_and_an_absence() {
    let mut c = TestCluster::start(3).await;
    let n: u32 = 5000;
    // A client id whose registrar is node 3 too: the node that dies holds both the session
    // and the registrar's record of it, the case where a survivor knows nothing of the client.
    let id = (0..)
        .map(|i| format!("live-sub-{i}"))
        .find(|id| ["node1", "node2"].iter().all(|n| rendezvous(n, id) < rendezvous("node3", id)))
        .unwrap();
    let id = id.as_str();
    // The subscriber on node 3, the publisher on node 1.
    let (mut s, _) = Raw::session(c.mqtt(2), durable(id, true)).await;
    assert_eq!(s.sub("live/#", QoS::AtLeastOnce).await, vec![1]);
    let p = Raw::v5(c.mqtt(0), "live-pub").await;
    let progress = Arc::new(AtomicU32::new(0));
    let publisher = tokio::spawn(stream(p, "live/x", n, progress.clone()));
    // A second into the stream, node 3 dies with the subscriber's session on it.
    let mut seen = Vec::new();
    assert_eq!(receive(&mut s, 1000, &mut seen).await, 0, "in order before the failover");
    let killed = Instant::now();
    c.kill(2).await;
    drop(s);
    let (mut s, connack) = reconnect(c.mqtt(1), id).await;
    let since_kill = killed.elapsed();
    let reordered = receive(&mut s, n, &mut seen).await;
    assert_eq!(tokio::time::timeout(DEADLINE * 3, publisher).await.unwrap().unwrap(), n, "every message acknowledged");
    println!(
        "failover: CONNACK {connack:?} after the successful CONNECT, {since_kill:?} after the kill; {reordered} of {n} re-routed behind newer ones"
    );

    // Away for 5 s while 5,000 more arrive (more than the 1,000 a session keeps in memory).
    s.send(disconnect()).await;
    s.until_closed().await;
    let p = Raw::v5(c.mqtt(0), "away-pub").await;
    let publisher = tokio::spawn(stream(p, "live/y", n, Arc::new(AtomicU32::new(0))));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (mut s, _) = reconnect(c.mqtt(0), id).await;
    assert_eq!(receive(&mut s, n, &mut Vec::new()).await, 0, "in order after an absence");
    assert_eq!(tokio::time::timeout(DEADLINE * 3, publisher).await.unwrap().unwrap(), n);

    // A SUBACK is kept through a crash at once: 20 persistent sessions subscribe on node 2 and
    // node 2 is killed right after the last SUBACK (well within the periodic persist). Node 1
    // holds every session — Session Present — and routes to it.
    let mut subs = Vec::new();
    for i in 0..20 {
        let (mut r, _) = Raw::session(c.mqtt(1), durable(&format!("crash-sub-{i}"), true)).await;
        assert_eq!(r.sub(&format!("crash/{i}"), QoS::AtLeastOnce).await, vec![1]);
        subs.push(r);
    }
    c.kill(1).await;
    drop(subs);
    let mut p = Raw::v5(c.mqtt(0), "crash-pub").await;
    for i in 0..20u16 {
        let id = format!("crash-sub-{i}");
        let (mut r, _) = reconnect(c.mqtt(0), &id).await;
        p.send(publish(&format!("crash/{i}"), QoS::AtLeastOnce, i + 1, "after")).await;
        match tokio::time::timeout(DEADLINE, r.recv_app()).await {
            Ok(Some(Packet::Publish(m))) => assert_eq!(&m.payload[..], b"after", "{id}"),
            other => panic!("{id}: the subscription did not survive its node: {other:?}"),
        }
    }
}

/// A node stops gracefully (SIGTERM, a rolling upgrade's step) with 300 persistent sessions;
/// every client reconnects at once to one of the two others. Each finds its session (Session
/// Present) with its subscription routed: the stopping node hands them over live, and those
/// whose clients come late are adopted from their replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_nodes_sessions_move_with_their_clients() {
    let mut c = TestCluster::start(3).await;
    let n = 300;
    let mut conns = Vec::new();
    for i in 0..n {
        let (mut r, _) = Raw::session(c.mqtt(0), durable(&format!("drain-{i}"), true)).await;
        assert_eq!(r.sub(&format!("drain/{i}"), QoS::AtLeastOnce).await, vec![1]);
        conns.push(r);
    }
    let targets = [c.mqtt(1), c.mqtt(2)];
    let back: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut r)| {
            tokio::spawn(async move {
                r.until_closed().await;
                reconnect(targets[i % 2], &format!("drain-{i}")).await.0
            })
        })
        .collect();
    c.stop(0).await;
    let mut moved = Vec::with_capacity(n);
    for b in back {
        moved.push(b.await.unwrap());
    }
    let mut p = Raw::v5(c.mqtt(1), "drain-pub").await;
    for (i, r) in moved.iter_mut().enumerate() {
        p.send(publish(&format!("drain/{i}"), QoS::AtLeastOnce, (i + 1) as u16, "moved")).await;
        match tokio::time::timeout(DEADLINE, r.recv_app()).await {
            Ok(Some(Packet::Publish(m))) => assert_eq!(&m.payload[..], b"moved"),
            other => panic!("drain-{i}: its subscription did not move with it: {other:?}"),
        }
    }
}

/// Replicas of node `owner`'s sessions that node `i` holds (its `/health/cluster`).
async fn replicas_of(c: &TestCluster, i: usize, owner: &str) -> u64 {
    let (status, body) = http_get(c.http(i), "/health/cluster").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["members"].as_array().unwrap().iter().find(|m| m["name"] == owner).map_or(0, |m| m["replicas"].as_u64().unwrap_or(0))
}

/// Replicas of node 1's sessions on nodes 2 and 3.
async fn held_elsewhere(c: &TestCluster) -> u64 {
    replicas_of(c, 1, "node1").await + replicas_of(c, 2, "node1").await
}

/// A rolling restart of the other two nodes (kill -9 and start, one at a time: a restarted
/// node holds no replicas) under an idle persistent session with queued messages, then its
/// own node dies. The session's replica follows the membership changes to a live backup, so
/// the client reconnecting to a survivor gets every acknowledged message; 300 other clients of
/// that node, reconnecting all at once, each find their session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_sessions_replica_outlives_a_rolling_restart_and_then_its_node() {
    let mut c = TestCluster::start(3).await;
    let (mut s, _) = Raw::session(c.mqtt(0), durable("rolled", true)).await;
    assert_eq!(s.sub("roll/#", QoS::AtLeastOnce).await, vec![1]);
    s.send(disconnect()).await;
    s.until_closed().await;
    let mut p = Raw::v5(c.mqtt(0), "roll-pub").await;
    const Q: u32 = 10;
    for i in 0..Q {
        p.send(publish("roll/x", QoS::AtLeastOnce, (i + 1) as u16, &i.to_string())).await;
        assert!(matches!(p.recv_app().await, Some(Packet::PubAck(a)) if a.code == 0));
    }
    drop(p);
    // One replica, on node 2 or node 3, before anything restarts.
    let end = Instant::now() + DEADLINE * 2;
    while held_elsewhere(&c).await != 1 {
        assert!(Instant::now() < end, "the session was never replicated");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in [1, 2] {
        c.kill(i).await;
        c.wait_members(0, 2).await;
        c.spawn(i).await;
        for j in 0..3 {
            c.wait_members(j, 3).await;
        }
    }
    // Nothing about the session changed since: its replica moves only with the membership.
    let end = Instant::now() + DEADLINE * 2;
    loop {
        let held = held_elsewhere(&c).await;
        if held == 1 {
            break;
        }
        assert!(Instant::now() < end, "after the rolling restart {held} nodes hold the idle session's replica");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // 300 more sessions on node 1, subscribed and replicated; then node 1 dies and every
    // client reconnects at once to node 2 or 3: each finds its session, routed — also those
    // whose registrar was node 1 and that no node has announced yet (their backup is asked).
    const N: usize = 300;
    let mut conns = Vec::with_capacity(N);
    for i in 0..N {
        let (mut r, _) = Raw::session(c.mqtt(0), durable(&format!("storm-{i}"), true)).await;
        assert_eq!(r.sub(&format!("storm/{i}"), QoS::AtLeastOnce).await, vec![1]);
        conns.push(r);
    }
    let end = Instant::now() + DEADLINE * 2;
    while held_elsewhere(&c).await != 1 + N as u64 {
        assert!(Instant::now() < end, "the sessions were never all replicated");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.kill(0).await;
    drop(conns);
    let targets = [c.mqtt(1), c.mqtt(2)];
    let back: Vec<_> = (0..N).map(|i| tokio::spawn(async move { reconnect(targets[i % 2], &format!("storm-{i}")).await.0 })).collect();
    let (mut s, _) = reconnect(c.mqtt(1), "rolled").await;
    let mut seen = Vec::new();
    assert_eq!(receive(&mut s, Q, &mut seen).await, 0, "every acknowledged message, in order");
    let mut p = Raw::v5(c.mqtt(2), "storm-pub").await;
    for (i, b) in back.into_iter().enumerate() {
        let mut r = b.await.unwrap();
        p.send(publish(&format!("storm/{i}"), QoS::AtLeastOnce, (i + 1) as u16, "after")).await;
        match tokio::time::timeout(DEADLINE, r.recv_app()).await {
            Ok(Some(Packet::Publish(m))) => assert_eq!(&m.payload[..], b"after"),
            other => panic!("storm-{i}: its subscription did not survive its node: {other:?}"),
        }
    }
}
