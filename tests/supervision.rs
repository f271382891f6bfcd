//! A crashed or killed shard / retained store is restarted by the root supervisor and resumes
//! from the snapshot it last published: no subscription or retained message is lost.

use crate::common::*;
use bytes::Bytes;
use thingsd::protocols::mqtt::*;

fn ids(names: &[String]) -> Vec<Option<ractor::ActorId>> {
    names.iter().map(|n| ractor::registry::where_is(n.clone()).map(|c| c.get_id())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_children_restart_with_their_state() {
    let node = start(|c| c.mqtt.shards = 4).await;
    let mut s = Raw::v5(node.tcp, "sup-sub").await;
    s.sub("sup/#", QoS::AtLeastOnce).await;
    s.sub("+/wild", QoS::AtLeastOnce).await;
    let mut p = Raw::v5(node.tcp, "sup-pub").await;
    p.send(Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: true,
        topic: "keep/me".into(),
        pkid: 1,
        props: None,
        payload: Bytes::from_static(b"r"),
    }))
    .await;
    assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));

    let names: Vec<String> = (0..=4).map(|i| format!("shard:{i}")).chain(["retained:0".to_string()]).collect();
    let before = ids(&names);
    assert!(before.iter().all(|i| i.is_some()), "children are registered by name: {before:?}");
    for n in &names {
        ractor::registry::where_is(n.clone()).unwrap().kill();
    }
    eventually("all children restarted under new ids", || {
        let now = ids(&names);
        now.iter().zip(&before).all(|(a, b)| a.is_some() && a != b)
    })
    .await;

    // Existing subscriptions survived the restart of their shards.
    p.send(publish("sup/x", QoS::AtLeastOnce, 2, "after")).await;
    p.send(publish("any/wild", QoS::AtLeastOnce, 3, "wild")).await;
    let a = s.recv_publish().await;
    let b = s.recv_publish().await;
    assert_eq!((&a.payload[..], &b.payload[..]), (&b"after"[..], &b"wild"[..]));
    // The retained set survived the restart of its store.
    let mut r = Raw::v5(node.tcp, "sup-reader").await;
    r.sub("keep/#", QoS::AtMostOnce).await;
    assert_eq!(&r.recv_publish().await.payload[..], b"r");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_restart_restores_sessions_and_a_dead_session_closes_its_connection() {
    let node = start(|_| {}).await;
    let mut cp = connect_packet(Protocol::V5, "adopted", true);
    cp.props.session_expiry_interval = Some(600);
    let (mut a, _) = Raw::session(node.tcp, cp.clone()).await;
    a.sub("adopt/#", QoS::AtLeastOnce).await;
    a.send(disconnect()).await;
    a.until_closed().await;

    let before = ids(&["registry:0".to_string()]);
    ractor::registry::where_is("registry:0".to_string()).unwrap().kill();
    eventually("registry restarted", || {
        let now = ids(&["registry:0".to_string()]);
        now[0].is_some() && now != before
    })
    .await;
    cp.clean_start = false;
    // While the registry restarts, a CONNECT may be refused with 0x88 (Server unavailable):
    // clients retry, and so does this test.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let ack = loop {
        let (_a, ack) = Raw::session(node.tcp, cp.clone()).await;
        if ack.code != reason::SERVER_UNAVAILABLE || tokio::time::Instant::now() > deadline {
            break ack;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(ack.code, 0);
    assert!(ack.session_present, "the restarted registry restored the persistent session from the store");

    // A session actor that dies takes its connection down (5.0: DISCONNECT 0x80)...
    let mut v = Raw::v5(node.tcp, "victim").await;
    ractor::registry::where_is("session:victim".to_string()).unwrap().kill();
    v.send(Packet::PingReq).await;
    let seen = v.until_closed().await;
    assert!(matches!(seen.last(), Some(Packet::Disconnect(d)) if d.code == reason::UNSPECIFIED_ERROR), "{seen:?}");
    // ...and the client can connect again.
    let _again = Raw::v5(node.tcp, "victim").await;
    node.stop().await;
}

/// The cluster actor is supervised too: killed, it comes back and rebuilds the node's routes
/// from the shards (what it announces to peers), and SUBSCRIBE keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_cluster_actor_restarts_with_the_routes() {
    let node = start(|c| {
        c.cluster.enabled = true;
        c.cluster.listen = "127.0.0.1:0".parse().unwrap();
    })
    .await;
    let mut s = Raw::v5(node.tcp, "cl-sub").await;
    s.sub("one/#", QoS::AtLeastOnce).await;
    s.sub("$share/g/two", QoS::AtLeastOnce).await;
    let name = "cluster:thingsd-1".to_string();
    let before = ractor::registry::where_is(name.clone()).expect("cluster actor registered").get_id();
    ractor::registry::where_is(name.clone()).unwrap().kill();
    eventually("cluster actor restarted", || ractor::registry::where_is(name.clone()).is_some_and(|c| c.get_id() != before)).await;
    let http = node.http.unwrap();
    let routes = || async {
        let (_, body) = http_get(http, "/health/cluster").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["members"][0]["routes"].as_u64().unwrap_or(0)
    };
    assert_eq!(routes().await, 2, "routes rebuilt from the shards");
    assert_eq!(s.sub("three", QoS::AtLeastOnce).await, vec![1]);
    assert_eq!(routes().await, 3);
    node.stop().await;
}

/// A node whose runtime is behind (`mqtt.overload_lag_ms`) answers new CONNECTs 0x89 Server
/// busy at once and goes on serving the connections it has; caught up, it admits again. The
/// runtime is stalled for a second by blocking both its worker threads while a client (on a
/// thread of its own) connects: the node handles that CONNECT the moment it runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_node_refuses_new_connections_and_serves_its_own() {
    use std::io::{Read, Write};
    let node = start(|c| c.mqtt.overload_lag_ms = 300).await;
    let mut kept = Raw::v5(node.tcp, "kept").await;
    assert_eq!(kept.sub("overload/#", QoS::AtLeastOnce).await, [1]);

    let gate = std::sync::Arc::new(std::sync::Barrier::new(3));
    let stalls: Vec<_> = (0..2)
        .map(|_| {
            let g = gate.clone();
            tokio::spawn(async move {
                g.wait();
                std::thread::sleep(std::time::Duration::from_secs(1));
            })
        })
        .collect();
    let (addr, g) = (node.tcp, gate.clone());
    let client = std::thread::spawn(move || {
        g.wait();
        // Both workers are blocked now: the kernel takes the connection and its CONNECT.
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut out = bytes::BytesMut::new();
        encode(&connect5("late", true), Protocol::V5, &mut out);
        s.write_all(&out).unwrap();
        let mut buf = bytes::BytesMut::new();
        loop {
            if let Some(p) = decode(&mut buf, Protocol::V5, usize::MAX).unwrap() {
                return p;
            }
            let mut chunk = [0u8; 256];
            let n = s.read(&mut chunk).expect("a CONNACK within the deadline");
            assert!(n > 0, "closed without a CONNACK");
            buf.extend_from_slice(&chunk[..n]);
        }
    });
    for s in stalls {
        s.await.unwrap();
    }
    let answer = tokio::task::spawn_blocking(move || client.join().unwrap()).await.unwrap();
    assert!(matches!(&answer, Packet::ConnAck(a) if a.code == reason::SERVER_BUSY), "{answer:?}");

    // The connection it had is served.
    kept.send(publish("overload/a", QoS::AtLeastOnce, 1, "x")).await;
    let mut got = (false, false);
    while got != (true, true) {
        match kept.recv_app().await {
            Some(Packet::PubAck(a)) if a.pkid == 1 => got.0 = true,
            Some(Packet::Publish(p)) if &p.topic[..] == "overload/a" => got.1 = true,
            Some(_) => {}
            None => panic!("the kept connection was closed"),
        }
    }
    // Caught up: new connections are admitted again (the refusal lasts about as long as the stall).
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (_c, ack) = Raw::session(node.tcp, connect_packet(Protocol::V5, "later", true)).await;
        if ack.code == 0 {
            break;
        }
        assert_eq!(ack.code, reason::SERVER_BUSY);
        assert!(tokio::time::Instant::now() < deadline, "still refusing after the node caught up");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (_, text) = http_get(node.http.unwrap(), "/metrics").await;
    assert!(text.contains("thingsd_scheduler_lag_seconds "), "{text}");
    let busy = format!(r#"thingsd_mqtt_connacks_total{{reason="{}",code="137"}} "#, reason::name(reason::SERVER_BUSY));
    assert!(text.lines().any(|l| l.starts_with(&busy) && l[busy.len()..].parse::<u64>().is_ok_and(|n| n >= 1)), "{text}");
    node.stop().await;
}
