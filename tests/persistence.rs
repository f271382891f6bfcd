//! Retained messages and persistent sessions survive a restart of the node.

use crate::common::*;
use bytes::Bytes;
use thingsd::protocols::mqtt::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_retained_and_sessions() {
    let node = start(|_| {}).await;
    let mut cp5 = connect_packet(Protocol::V5, "keep5", true);
    cp5.props.session_expiry_interval = Some(3600);
    let (mut s, _) = Raw::session(node.tcp, cp5.clone()).await;
    s.sub("pers/#", QoS::AtLeastOnce).await;
    s.send(disconnect()).await;
    s.until_closed().await;
    let (mut s4, _) = Raw::session(node.tcp, connect_packet(Protocol::V4, "keep4", false)).await;
    s4.sub("pers/#", QoS::ExactlyOnce).await;
    s4.send(disconnect()).await;
    s4.until_closed().await;

    let mut p = Raw::v5(node.tcp, "pub").await;
    p.send(Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: true,
        topic: "keep/x".into(),
        pkid: 1,
        props: None,
        payload: Bytes::from_static(b"stay"),
    }))
    .await;
    assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
    for i in 2..=4u16 {
        p.send(publish("pers/a", QoS::ExactlyOnce, i, &format!("q{i}"))).await;
        assert!(matches!(p.recv().await, Some(Packet::PubRec(_))));
        p.send(Packet::PubRel(Ack::new(i, 0))).await;
        assert!(matches!(p.recv().await, Some(Packet::PubComp(_))));
    }
    p.send(disconnect()).await;
    // Connected at shutdown, with a delayed retained will: it must fire after the restart.
    let mut wc = connect_packet(Protocol::V5, "will-across", true);
    wc.props.session_expiry_interval = Some(3600);
    let wp = Properties { will_delay_interval: Some(2), ..Properties::default() };
    wc.will =
        Some(Will { topic: "wills/across".into(), payload: Bytes::from_static(b"gone"), qos: QoS::AtLeastOnce, retain: true, props: wp });
    let (_will_client, _) = Raw::session(node.tcp, wc).await;
    let dir = node.dir.clone();
    let guard = node.stop().await;

    let node = start_in(dir, |_| {}).await;
    let mut cp = cp5.clone();
    cp.clean_start = false;
    let (mut s, ack) = Raw::session(node.tcp, cp).await;
    assert!(ack.session_present, "5.0 session restored");
    let mut got = Vec::new();
    for _ in 0..3 {
        let m = s.recv_publish().await;
        assert_eq!(m.qos, QoS::AtLeastOnce);
        s.send(Packet::PubAck(Ack::new(m.pkid, 0))).await;
        got.push(String::from_utf8(m.payload.to_vec()).unwrap());
    }
    assert_eq!(got, ["q2", "q3", "q4"]);
    let (mut s4, ack) = Raw::session(node.tcp, connect_packet(Protocol::V4, "keep4", false)).await;
    assert!(ack.session_present, "3.1.1 persistent session restored");
    let m = s4.recv_publish().await;
    assert_eq!((m.qos, &m.payload[..]), (QoS::ExactlyOnce, &b"q2"[..]));
    // Subscriptions were restored too: a new publish reaches the restored session.
    let mut p = Raw::v5(node.tcp, "pub2").await;
    p.send(publish("pers/b", QoS::AtMostOnce, 0, "live")).await;
    loop {
        let m = s.recv_publish().await;
        if &m.payload[..] == b"live" {
            break;
        }
    }
    let mut w = Raw::v5(node.tcp, "will-watcher").await;
    w.sub("wills/#", QoS::AtLeastOnce).await;
    let m = w.recv_publish().await;
    assert_eq!((&*m.topic, &m.payload[..]), ("wills/across", &b"gone"[..]), "the delayed will survived the restart");
    let mut r = Raw::v5(node.tcp, "reader").await;
    r.sub("keep/#", QoS::AtMostOnce).await;
    let m = r.recv_publish().await;
    assert_eq!((&*m.topic, &m.payload[..], m.retain), ("keep/x", &b"stay"[..], true));
    node.stop().await;
    drop(guard);
}
