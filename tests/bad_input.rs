//! Malformed and hostile input: the offender is closed with the right reason, everyone else is served.

use std::time::Duration;

use crate::common::*;
use thingsd::protocols::mqtt::*;
use tokio::io::AsyncWriteExt;

/// A healthy client must still get a round trip after the abuse.
async fn still_serving(node: &Node) {
    let mut s = Raw::v5(node.tcp, "healthy-sub").await;
    s.sub("ok/#", QoS::AtLeastOnce).await;
    let mut p = Raw::v4(node.tcp, "healthy-pub").await;
    p.send(publish("ok/1", QoS::AtLeastOnce, 1, "fine")).await;
    assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
    assert_eq!(&s.recv_publish().await.payload[..], b"fine");
}

async fn after_connect5(node: &Node, bytes: &[u8]) -> Vec<Packet> {
    let mut c = Raw::v5(node.tcp, "bad").await;
    c.send_bytes(bytes).await;
    c.until_closed().await
}

fn last_reason(seen: &[Packet]) -> Option<u8> {
    match seen.last() {
        Some(Packet::Disconnect(d)) => Some(d.code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_close_with_reason() {
    let node = start(|c| c.mqtt.max_packet_size = 4096).await;
    let cases: Vec<(&str, Vec<u8>, u8)> = vec![
        ("reserved packet type 0", vec![0x00, 0x00], reason::MALFORMED_PACKET),
        ("SUBSCRIBE with flags 0", vec![0x80, 0x06, 0, 1, 0, 1, b'a', 0], reason::MALFORMED_PACKET),
        ("PUBLISH QoS 3", vec![0x36, 0x05, 0, 1, b'a', 0, 1], reason::MALFORMED_PACKET),
        ("PUBLISH DUP on QoS 0", vec![0x38, 0x04, 0, 1, b'a', 0], reason::MALFORMED_PACKET),
        ("wildcard in topic name", vec![0x30, 0x04, 0, 1, b'#', 0], reason::TOPIC_NAME_INVALID),
        ("packet id 0", vec![0x32, 0x06, 0, 1, b'a', 0, 0, 0], reason::PROTOCOL_ERROR),
        ("invalid UTF-8 topic", vec![0x30, 0x05, 0, 2, 0xC3, 0x28, 0], reason::MALFORMED_PACKET),
        ("U+0000 in topic", vec![0x30, 0x05, 0, 2, b'a', 0, 0], reason::MALFORMED_PACKET),
        ("remaining length of 5 bytes", vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], reason::MALFORMED_PACKET),
        ("oversized packet", vec![0x30, 0xFF, 0xFF, 0x03], reason::PACKET_TOO_LARGE),
        ("subscription option reserved bits", vec![0x82, 0x07, 0, 1, 0, 0, 1, b'a', 0xC0], reason::MALFORMED_PACKET),
        ("SUBSCRIBE without filters", vec![0x82, 0x03, 0, 1, 0], reason::PROTOCOL_ERROR),
        ("UNSUBSCRIBE without filters", vec![0xA2, 0x03, 0, 1, 0], reason::PROTOCOL_ERROR),
        ("property not allowed in PUBLISH", vec![0x30, 0x07, 0, 1, b'a', 2, 0x11, 0, 0], reason::PROTOCOL_ERROR),
        ("duplicate property", vec![0x30, 0x08, 0, 1, b'a', 4, 0x01, 0, 0x01, 0], reason::PROTOCOL_ERROR),
        ("unknown property", vec![0x30, 0x06, 0, 1, b'a', 2, 0x7F, 0], reason::MALFORMED_PACKET),
        ("PINGREQ with a body", vec![0xC0, 0x01, 0], reason::MALFORMED_PACKET),
        ("server-only CONNACK from client", vec![0x20, 0x03, 0, 0, 0], reason::PROTOCOL_ERROR),
        ("trailing bytes in PUBACK-less field", vec![0xE0, 0x04, 0, 0, 0, 0], reason::MALFORMED_PACKET),
    ];
    for (what, bytes, want) in cases {
        eprintln!("case: {what}");
        let seen = after_connect5(&node, &bytes).await;
        assert_eq!(last_reason(&seen), Some(want), "{what}: {seen:?}");
    }
    // 3.1.1: a plain close.
    let mut c = Raw::v4(node.tcp, "bad4").await;
    c.send_bytes(&[0x82, 0x06, 0, 1, 0, 1, b'a', 0x04]).await;
    assert!(c.until_closed().await.is_empty());
    // Bad CONNECTs: reserved flag, will QoS without will flag, password without user name (3.1.1).
    for bytes in [
        vec![0x10, 0x0d, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x03, 0, 60, 0, 0, 0],
        vec![0x10, 0x0d, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x0A, 0, 60, 0, 0, 0],
        vec![0x10, 0x0c, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x42, 0, 60, 0, 0],
        vec![0x10, 0x0c, 0, 4, b'M', b'Q', b'X', b'X', 4, 0x02, 0, 60, 0, 0],
    ] {
        let mut c = Raw::connect(node.tcp).await;
        c.send_bytes(&bytes).await;
        let seen = c.until_closed().await;
        assert!(!seen.iter().any(|p| matches!(p, Packet::ConnAck(a) if a.code == 0)), "{bytes:?} accepted");
    }
    // 5.0 CONNECT with a duplicate property: CONNACK 0x82, then close.
    let mut c = Raw::connect(node.tcp).await;
    c.send_bytes(&[0x10, 0x12, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 4, 0x17, 1, 0x17, 1, 0, 1, b'x']).await;
    let seen = c.until_closed().await;
    assert!(matches!(seen.as_slice(), [Packet::ConnAck(a)] if a.code == reason::PROTOCOL_ERROR), "{seen:?}");
    // First packet not CONNECT.
    let mut c = Raw::connect(node.tcp).await;
    c.send(Packet::PingReq).await;
    assert!(c.until_closed().await.is_empty());
    still_serving(&node).await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_truncation_never_hurt_others() {
    let node = start(|c| c.mqtt.connect_timeout_secs = 2).await;
    // Deterministic pseudo-random garbage, before and after CONNECT.
    let mut seed: u64 = 0x9E3779B97F4A7C15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..200 {
        let len = (next() % 64) as usize + 1;
        let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let mut c = if i % 2 == 0 { Raw::connect(node.tcp).await } else { Raw::v5(node.tcp, &format!("g{i}")).await };
        c.send_bytes(&bytes).await;
        let _ = c.stream.shutdown().await; // truncated whatever was in flight
        let _ = c.until_closed().await;
    }
    // A truncated packet followed by silence: the keep-alive/connect timer closes it.
    let mut c = Raw::connect(node.tcp).await;
    c.send_bytes(&[0x10, 0x20, 0, 4, b'M']).await;
    assert!(c.until_closed().await.is_empty());
    still_serving(&node).await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_silent_sockets() {
    let node = start(|c| c.mqtt.connect_timeout_secs = 2).await;
    let mut socks = Vec::new();
    for _ in 0..1000 {
        socks.push(tokio::net::TcpStream::connect(node.tcp).await.unwrap());
    }
    // Others are served while the silent sockets wait for their timeout.
    still_serving(&node).await;
    // Every silent socket is closed by the server (read returns 0) within the deadline.
    let closed = futures_util::future::join_all(socks.into_iter().map(|mut s| async move {
        let mut b = [0u8; 1];
        matches!(tokio::time::timeout(Duration::from_secs(10), tokio::io::AsyncReadExt::read(&mut s, &mut b)).await, Ok(Ok(0)) | Ok(Err(_)))
    }))
    .await;
    assert_eq!(closed.iter().filter(|c| **c).count(), 1000);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_subscriber_is_bounded_and_does_not_stall_others() {
    let node = start(|c| {
        c.mqtt.max_queued = 50;
        c.mqtt.max_inflight = 10;
        c.mqtt.outbound_queue = 32;
        c.mqtt.slow_subscriber_ms = 300;
    })
    .await;
    // A subscriber that never reads its socket.
    let mut stuck = Raw::v4(node.tcp, "stuck").await;
    stuck.sub("flood/#", QoS::AtLeastOnce).await;
    let mut healthy = Raw::v5(node.tcp, "healthy").await;
    healthy.sub("flood/#", QoS::AtMostOnce).await;
    let mut p = Raw::v4(node.tcp, "flooder").await;
    let payload = "x".repeat(2000);
    let total = 3000u16;
    let reader = tokio::spawn(async move {
        let mut n = 0u32;
        while n < total as u32 {
            match tokio::time::timeout(std::time::Duration::from_secs(5), healthy.recv_app()).await.unwrap_or(None) {
                Some(Packet::Publish(_)) => n += 1,
                Some(_) => {}
                None => break,
            }
        }
        n
    });
    for i in 1..=total {
        p.send(publish("flood/x", QoS::AtLeastOnce, i, &payload)).await;
    }
    // Every publish is acknowledged: the stuck subscriber paused the publisher once, then was
    // marked slow and its queue went on growing on disk (bounded by queue_max_*), rather
    // than blocking everyone.
    let mut acked = 0;
    while acked < total {
        match p.recv().await {
            Some(Packet::PubAck(_)) => acked += 1,
            Some(_) => {}
            None => panic!("publisher was disconnected"),
        }
    }
    assert_eq!(tokio::time::timeout(DEADLINE, reader).await.unwrap().unwrap(), total as u32, "healthy subscriber got everything");
    drop(stuck);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_disconnects_with_0x8b() {
    let node = start(|_| {}).await;
    let mut c = Raw::v5(node.tcp, "bye").await;
    let stop = tokio::spawn(node.stop());
    let seen = c.until_closed().await;
    assert!(matches!(seen.last(), Some(Packet::Disconnect(d)) if d.code == reason::SERVER_SHUTTING_DOWN), "{seen:?}");
    stop.await.unwrap();
}
