//! MQTT 5.0 behaviour, packet by packet, against a node on loopback.

use std::time::Duration;

use crate::common::*;
use bytes::Bytes;
use thingsd::protocols::mqtt::*;

fn props() -> Properties {
    Properties::default()
}

fn pub_with(topic: &str, qos: QoS, pkid: u16, payload: &str, p: Properties) -> Packet {
    publish_props(topic, qos, pkid, payload, Some(p))
}

fn sub_opts(pkid: u16, filter: &str, o: SubOptions, p: Properties) -> Packet {
    Packet::Subscribe(Subscribe { pkid, filters: vec![(filter.into(), o)], props: p })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_rules() {
    let node = start(|_| {}).await;
    // CONNACK advertises limits; an empty client id gets an assigned one.
    let (_c, ack) = Raw::session(node.tcp, connect_packet(Protocol::V5, "", true)).await;
    assert_eq!(ack.code, 0);
    assert!(ack.props.assigned_client_identifier.as_deref().is_some_and(|s| !s.is_empty()));
    assert_eq!(ack.props.receive_maximum, Some(128));
    assert_eq!(ack.props.maximum_packet_size, Some(1024 * 1024));
    assert!(ack.props.topic_alias_maximum.is_some());

    // 3.1.1: empty id needs clean session.
    let (_c, ack) = Raw::session(node.tcp, connect_packet(Protocol::V4, "", false)).await;
    assert_eq!(ack.code, 2);
    let (_c, ack) = Raw::session(node.tcp, connect_packet(Protocol::V4, "", true)).await;
    assert_eq!(ack.code, 0);

    // Unsupported protocol levels.
    let mut r = Raw::connect(node.tcp).await;
    r.send_bytes(&[0x10, 0x0c, 0, 4, b'M', b'Q', b'T', b'T', 3, 2, 0, 60, 0, 0]).await;
    let mut got = vec![0u8; 4];
    tokio::io::AsyncReadExt::read_exact(&mut r.stream, &mut got).await.unwrap();
    assert_eq!(got, [0x20, 2, 0, 1]);
    let mut r = Raw::connect(node.tcp).await;
    r.send_bytes(&[0x10, 0x0c, 0, 4, b'M', b'Q', b'T', b'T', 6, 2, 0, 60, 0, 0]).await;
    match r.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, reason::UNSUPPORTED_PROTOCOL_VERSION),
        other => panic!("{other:?}"),
    }

    // A second CONNECT is a protocol error.
    let mut c = Raw::v5(node.tcp, "twice").await;
    c.send(connect5("twice", true)).await;
    let seen = c.until_closed().await;
    assert!(matches!(seen.last(), Some(Packet::Disconnect(d)) if d.code == reason::PROTOCOL_ERROR), "{seen:?}");

    // Server Keep Alive when the configured ceiling is below the client's keep-alive.
    node.stop().await;
    let node = start(|c| c.mqtt.max_keepalive_secs = 30).await;
    let (_c, ack) = Raw::session(node.tcp, connect_packet(Protocol::V5, "ka-cap", true)).await;
    assert_eq!(ack.props.server_keep_alive, Some(30));
    // Enhanced auth is refused cleanly; a stray AUTH is a protocol error.
    let mut cp = connect_packet(Protocol::V5, "auth", true);
    cp.props.authentication_method = Some("SCRAM-SHA-1".into());
    let (mut c, ack) = Raw::session(node.tcp, cp).await;
    assert_eq!(ack.code, reason::BAD_AUTHENTICATION_METHOD);
    assert!(c.until_closed().await.is_empty());
    let mut c = Raw::v5(node.tcp, "auth2").await;
    c.send(Packet::Auth(Auth { code: 0x18, props: props() })).await;
    assert!(matches!(c.until_closed().await.last(), Some(Packet::Disconnect(d)) if d.code == reason::PROTOCOL_ERROR));

    // Takeover: the old connection gets 0x8E.
    let mut old = Raw::v5(node.tcp, "dup-id").await;
    let _new = Raw::v5(node.tcp, "dup-id").await;
    let seen = old.until_closed().await;
    assert!(matches!(seen.last(), Some(Packet::Disconnect(d)) if d.code == reason::SESSION_TAKEN_OVER), "{seen:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_and_connect_timeout() {
    let node = start(|c| c.mqtt.connect_timeout_secs = 1).await;
    let mut cp = connect_packet(Protocol::V5, "ka", true);
    cp.keep_alive = 1;
    let (mut c, _) = Raw::session(node.tcp, cp).await;
    let started = std::time::Instant::now();
    let seen = c.until_closed().await;
    assert!(matches!(seen.last(), Some(Packet::Disconnect(d)) if d.code == reason::KEEP_ALIVE_TIMEOUT), "{seen:?}");
    assert!(started.elapsed() >= Duration::from_millis(1400), "closed before 1.5x keep-alive");

    // A client that keeps talking stays past 1.5x its keep-alive; once silent, it is closed
    // 1.5x after its last packet, not earlier.
    let mut cp = connect_packet(Protocol::V5, "ka-busy", true);
    cp.keep_alive = 1;
    let (mut c, _) = Raw::session(node.tcp, cp).await;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.send(Packet::PingReq).await;
        assert!(matches!(c.recv().await, Some(Packet::PingResp)), "still connected past 1.5x keep-alive while pinging");
    }
    let last = std::time::Instant::now();
    let seen = c.until_closed().await;
    assert!(matches!(seen.last(), Some(Packet::Disconnect(d)) if d.code == reason::KEEP_ALIVE_TIMEOUT), "{seen:?}");
    assert!(last.elapsed() >= Duration::from_millis(1400), "closed before 1.5x keep-alive after its last packet");

    let mut silent = Raw::connect(node.tcp).await;
    assert!(silent.until_closed().await.is_empty());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_levels_and_downgrade() {
    let node = start(|_| {}).await;
    let mut s = Raw::v5(node.tcp, "sub").await;
    assert_eq!(s.sub("q/2", QoS::ExactlyOnce).await, vec![2]);
    assert_eq!(s.sub("q/0", QoS::AtMostOnce).await, vec![0]);
    let mut p = Raw::v5(node.tcp, "pub").await;

    p.send(publish("q/2", QoS::AtLeastOnce, 1, "one")).await;
    assert!(matches!(p.recv().await, Some(Packet::PubAck(a)) if a.pkid == 1 && a.code == 0));
    let m = s.recv_publish().await;
    assert_eq!((m.qos, &m.payload[..]), (QoS::AtLeastOnce, &b"one"[..]));
    s.send(Packet::PubAck(Ack::new(m.pkid, 0))).await;

    // QoS 2 in, exactly once even when the publisher retransmits before PUBREL.
    p.send(publish("q/2", QoS::ExactlyOnce, 2, "two")).await;
    assert!(matches!(p.recv().await, Some(Packet::PubRec(a)) if a.pkid == 2));
    let mut dup = publish("q/2", QoS::ExactlyOnce, 2, "two");
    if let Packet::Publish(x) = &mut dup {
        x.dup = true;
    }
    p.send(dup).await;
    assert!(matches!(p.recv().await, Some(Packet::PubRec(a)) if a.pkid == 2));
    p.send(Packet::PubRel(Ack::new(2, 0))).await;
    assert!(matches!(p.recv().await, Some(Packet::PubComp(a)) if a.pkid == 2 && a.code == 0));
    // QoS 2 out: PUBLISH, PUBREC, PUBREL, PUBCOMP.
    let m = s.recv_publish().await;
    assert_eq!((m.qos, &m.payload[..]), (QoS::ExactlyOnce, &b"two"[..]));
    s.send(Packet::PubRec(Ack::new(m.pkid, 0))).await;
    assert!(matches!(s.recv_app().await, Some(Packet::PubRel(a)) if a.pkid == m.pkid));
    s.send(Packet::PubComp(Ack::new(m.pkid, 0))).await;

    // Downgrade to the subscription's QoS.
    p.send(publish("q/0", QoS::ExactlyOnce, 3, "down")).await;
    let m = s.recv_publish().await;
    assert_eq!((m.qos, &m.payload[..]), (QoS::AtMostOnce, &b"down"[..]));
    // The retransmitted QoS 2 message was not delivered twice: the next message is the marker.
    p.send(publish("q/2", QoS::AtMostOnce, 0, "marker")).await;
    assert_eq!(&s.recv_publish().await.payload[..], b"marker");

    // No subscribers: 0x10 on PUBACK.
    p.send(publish("nobody/home", QoS::AtLeastOnce, 9, "x")).await;
    let acks = p.sync().await;
    assert!(acks.iter().any(|a| matches!(a, Packet::PubAck(a) if a.pkid == 9 && a.code == reason::NO_MATCHING_SUBSCRIBERS)), "{acks:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_redelivery_queue_and_window() {
    // Two queued messages in memory, the rest on disk; the whole queue holds 7.
    let node = start(|c| {
        c.mqtt.max_queued = 2;
        c.mqtt.queue_max_messages = 7;
    })
    .await;
    let mut cp = connect_packet(Protocol::V5, "durable", true);
    cp.props.session_expiry_interval = Some(600);
    cp.props.receive_maximum = Some(2);
    let (mut s, ack) = Raw::session(node.tcp, cp.clone()).await;
    assert!(!ack.session_present);
    s.sub("d/#", QoS::AtLeastOnce).await;
    let mut p = Raw::v5(node.tcp, "pubd").await;
    for i in 1..=3u16 {
        p.send(publish("d/x", QoS::AtLeastOnce, i, &format!("m{i}"))).await;
        assert!(matches!(p.recv().await, Some(Packet::PubAck(a)) if a.pkid == i && a.code == 0));
    }
    // Receive Maximum 2: only two arrive until one is acknowledged.
    let a = s.recv_publish().await;
    let b = s.recv_publish().await;
    assert_eq!((&a.payload[..], &b.payload[..]), (&b"m1"[..], &b"m2"[..]));
    assert!(tokio::time::timeout(Duration::from_millis(300), s.recv_app()).await.is_err(), "window of 2 exceeded");
    s.send(Packet::PubAck(Ack::new(a.pkid, 0))).await;
    let c = s.recv_publish().await;
    assert_eq!(&c.payload[..], b"m3");
    // Leave m2 and m3 unacknowledged and drop the connection.
    drop(s);
    // While offline: 7 more; the queue (m2 and m3 in flight, then five) is full after m8,
    // so m9 and m10 are refused to their publisher (0x97), not acknowledged and dropped.
    for i in 4..=10u16 {
        p.send(publish("d/x", QoS::AtLeastOnce, i, &format!("m{i}"))).await;
        let want = if i <= 8 { 0 } else { reason::QUOTA_EXCEEDED };
        let got = p.recv().await;
        assert!(matches!(&got, Some(Packet::PubAck(a)) if a.pkid == i && a.code == want), "m{i}: {got:?}");
    }
    let mut cp2 = cp.clone();
    cp2.clean_start = false;
    cp2.props.receive_maximum = Some(100);
    let (mut s, ack) = Raw::session(node.tcp, cp2).await;
    assert!(ack.session_present);
    let r1 = s.recv_publish().await;
    let r2 = s.recv_publish().await;
    assert!(r1.dup && r2.dup, "redelivery carries DUP");
    assert_eq!((r1.pkid, r2.pkid), (b.pkid, c.pkid), "same packet ids on redelivery");
    let mut rest = Vec::new();
    for _ in 0..5 {
        let m = s.recv_publish().await;
        assert!(!m.dup);
        s.send(Packet::PubAck(Ack::new(m.pkid, 0))).await;
        rest.push(String::from_utf8(m.payload.to_vec()).unwrap());
    }
    assert_eq!(rest, ["m4", "m5", "m6", "m7", "m8"]);
    s.send(Packet::PubAck(Ack::new(r1.pkid, 0))).await;
    s.send(Packet::PubAck(Ack::new(r2.pkid, 0))).await;
    assert!(!s.sync().await.iter().any(|p| matches!(p, Packet::Publish(_))), "nothing beyond the bound");
    // Clean start discards the session.
    drop(s);
    let (_s, ack) = Raw::session(node.tcp, cp).await;
    assert!(!ack.session_present);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_and_options() {
    let node = start(|_| {}).await;
    let mut p = Raw::v5(node.tcp, "rp").await;
    let set = |topic: &str, payload: &str| {
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: true,
            topic: topic.into(),
            pkid: 1,
            props: None,
            payload: Bytes::copy_from_slice(payload.as_bytes()),
        })
    };
    p.send(set("r/a", "first")).await;
    p.recv().await;
    p.send(set("r/a", "second")).await;
    p.recv().await;
    p.send(set("r/b", "bee")).await;
    p.recv().await;
    p.send(set("r/b", "")).await; // delete
    p.recv().await;

    let mut s = Raw::v5(node.tcp, "rs").await;
    s.sub("r/#", QoS::AtLeastOnce).await;
    let m = s.recv_publish().await;
    assert!(m.retain);
    assert_eq!((&*m.topic, &m.payload[..]), ("r/a", &b"second"[..]));
    s.send(Packet::PubAck(Ack::new(m.pkid, 0))).await;
    // Live messages have retain cleared unless Retain As Published.
    p.send(set("r/a", "live")).await;
    p.recv().await;
    let m = s.recv_publish().await;
    assert!(!m.retain);

    let mut s2 = Raw::v5(node.tcp, "rs2").await;
    let rap = SubOptions { qos: QoS::AtMostOnce, no_local: false, retain_as_published: true, retain_handling: RetainHandling::DoNotSend };
    s2.send(sub_opts(3, "r/a", rap, props())).await;
    assert!(matches!(s2.recv_app().await, Some(Packet::SubAck(_))));
    p.send(set("r/a", "rap")).await;
    p.recv().await;
    let m = s2.recv_publish().await; // not the stored one (DoNotSend), the live one with retain kept
    assert!(m.retain);
    assert_eq!(&m.payload[..], b"rap");

    // SendIfNew: a repeated subscription does not resend.
    let ifnew =
        SubOptions { qos: QoS::AtMostOnce, no_local: false, retain_as_published: false, retain_handling: RetainHandling::SendIfNew };
    let mut s3 = Raw::v5(node.tcp, "rs3").await;
    s3.send(sub_opts(4, "r/a", ifnew, props())).await;
    assert!(matches!(s3.recv_app().await, Some(Packet::SubAck(_))));
    assert_eq!(&s3.recv_publish().await.payload[..], b"rap");
    s3.send(sub_opts(5, "r/a", ifnew, props())).await;
    assert!(matches!(s3.recv_app().await, Some(Packet::SubAck(_))));
    p.send(publish("r/a", QoS::AtMostOnce, 0, "marker")).await;
    assert_eq!(&s3.recv_publish().await.payload[..], b"marker");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wills() {
    let node = start(|_| {}).await;
    let mut w = Raw::v5(node.tcp, "watcher").await;
    w.sub("will/#", QoS::AtLeastOnce).await;
    let with_will = |id: &str, delay: Option<u32>, expiry: u32| {
        let mut c = connect_packet(Protocol::V5, id, true);
        let wp = Properties { will_delay_interval: delay, user_properties: vec![("k".into(), "v".into())], ..Properties::default() };
        c.will = Some(Will {
            topic: format!("will/{id}"),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: false,
            props: wp,
        });
        c.props.session_expiry_interval = Some(expiry);
        c
    };
    // Abnormal close: will published.
    let (c, _) = Raw::session(node.tcp, with_will("a", None, 0)).await;
    drop(c);
    let m = w.recv_publish().await;
    assert_eq!(&*m.topic, "will/a");
    assert_eq!(m.props().user_properties, vec![("k".to_string(), "v".to_string())]);
    w.send(Packet::PubAck(Ack::new(m.pkid, 0))).await;
    // Normal DISCONNECT: no will.
    let (mut c, _) = Raw::session(node.tcp, with_will("b", None, 0)).await;
    c.send(disconnect()).await;
    assert!(c.until_closed().await.is_empty());
    // DISCONNECT with 0x04: will published.
    let (mut c, _) = Raw::session(node.tcp, with_will("c", None, 0)).await;
    c.send(Packet::Disconnect(Disconnect { code: reason::DISCONNECT_WITH_WILL, props: props() })).await;
    c.until_closed().await;
    let m = w.recv_publish().await;
    assert_eq!(&*m.topic, "will/c", "no will for b, will for c");
    w.send(Packet::PubAck(Ack::new(m.pkid, 0))).await;
    // Delayed will, reconnect in time: none. Then a delayed will that fires when the session expires (1s).
    let (c, _) = Raw::session(node.tcp, with_will("d", Some(100), 100)).await;
    drop(c);
    let mut again = with_will("d", Some(100), 100);
    again.clean_start = false;
    again.will = None;
    let (mut c, ack) = Raw::session(node.tcp, again).await;
    assert!(ack.session_present);
    c.send(disconnect()).await;
    let (c, _) = Raw::session(node.tcp, with_will("e", Some(100), 1)).await;
    drop(c);
    let m = w.recv_publish().await;
    assert_eq!(&*m.topic, "will/e", "delayed will of d must not fire; e fires at session expiry");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_changes_at_disconnect() {
    let node = start(|_| {}).await;
    // 0 at CONNECT, non-zero at DISCONNECT: protocol error.
    let (mut c, _) = Raw::session(node.tcp, connect_packet(Protocol::V5, "x1", true)).await;
    let mut dp = props();
    dp.session_expiry_interval = Some(30);
    c.send(Packet::Disconnect(Disconnect { code: 0, props: dp })).await;
    assert!(matches!(c.until_closed().await.last(), Some(Packet::Disconnect(d)) if d.code == reason::PROTOCOL_ERROR));
    // Non-zero at CONNECT, 0 at DISCONNECT: the session ends.
    let mut cp = connect_packet(Protocol::V5, "x2", true);
    cp.props.session_expiry_interval = Some(300);
    let (mut c, _) = Raw::session(node.tcp, cp.clone()).await;
    let mut dp = props();
    dp.session_expiry_interval = Some(0);
    c.send(Packet::Disconnect(Disconnect { code: 0, props: dp })).await;
    c.until_closed().await;
    cp.clean_start = false;
    let (_c, ack) = Raw::session(node.tcp, cp).await;
    assert!(!ack.session_present);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_expiry() {
    let node = start(|_| {}).await;
    let mut cp = connect_packet(Protocol::V5, "exp-sub", true);
    cp.props.session_expiry_interval = Some(300);
    let (mut s, _) = Raw::session(node.tcp, cp.clone()).await;
    s.sub("e/#", QoS::AtLeastOnce).await;
    drop(s);
    let mut p = Raw::v5(node.tcp, "exp-pub").await;
    let mut short = props();
    short.message_expiry_interval = Some(1);
    p.send(pub_with("e/1", QoS::AtLeastOnce, 1, "short", short)).await;
    let mut long = props();
    long.message_expiry_interval = Some(100);
    p.send(pub_with("e/2", QoS::AtLeastOnce, 2, "long", long)).await;
    p.sync().await;
    // Expiry is about elapsed time, so this test waits it out.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    cp.clean_start = false;
    let (mut s, _) = Raw::session(node.tcp, cp).await;
    let m = s.recv_publish().await;
    assert_eq!(&m.payload[..], b"long", "the expired message was dropped");
    let left = m.props().message_expiry_interval.unwrap();
    assert!((97..100).contains(&left), "remaining expiry forwarded: {left}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_aliases_both_ways() {
    let node = start(|c| c.mqtt.topic_alias_max = 4).await;
    let mut cp = connect_packet(Protocol::V5, "alias-sub", true);
    cp.props.topic_alias_maximum = Some(5);
    let (mut s, _) = Raw::session(node.tcp, cp).await;
    s.sub("al/#", QoS::AtMostOnce).await;
    let mut p = Raw::v5(node.tcp, "alias-pub").await;
    let mut a = props();
    a.topic_alias = Some(1);
    p.send(pub_with("al/long/topic", QoS::AtMostOnce, 0, "1", a.clone())).await;
    p.send(pub_with("", QoS::AtMostOnce, 0, "2", a)).await;
    let m1 = s.recv_publish().await;
    let m2 = s.recv_publish().await;
    assert_eq!(&*m1.topic, "al/long/topic");
    let out_alias = m1.props().topic_alias.expect("server assigns an outbound alias");
    assert_eq!((&*m2.topic, m2.props().topic_alias), ("", Some(out_alias)), "second delivery uses the alias alone");
    assert_eq!(&m2.payload[..], b"2");
    // Unknown alias with empty topic: protocol error; alias above maximum: 0x94.
    let mut bad = props();
    bad.topic_alias = Some(3);
    p.send(pub_with("", QoS::AtMostOnce, 0, "x", bad)).await;
    assert!(matches!(p.until_closed().await.last(), Some(Packet::Disconnect(d)) if d.code == reason::PROTOCOL_ERROR));
    let mut p = Raw::v5(node.tcp, "alias-pub2").await;
    let mut big = props();
    big.topic_alias = Some(9);
    p.send(pub_with("al/x", QoS::AtMostOnce, 0, "x", big)).await;
    assert!(matches!(p.until_closed().await.last(), Some(Packet::Disconnect(d)) if d.code == reason::TOPIC_ALIAS_INVALID));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_ids_no_local_and_properties() {
    let node = start(|_| {}).await;
    let mut c = Raw::v5(node.tcp, "self").await;
    let mut sp = props();
    sp.subscription_identifiers = vec![42];
    c.send(sub_opts(1, "x/+", SubOptions::qos(QoS::AtMostOnce), sp)).await;
    c.recv_app().await;
    let nl =
        SubOptions { qos: QoS::AtMostOnce, no_local: true, retain_as_published: false, retain_handling: RetainHandling::SendAtSubscribe };
    c.send(sub_opts(2, "own", nl, props())).await;
    c.recv_app().await;
    let mut pp = props();
    pp.user_properties = vec![("a".into(), "1".into()), ("a".into(), "2".into())];
    pp.response_topic = Some("reply/here".into());
    pp.correlation_data = Some(Bytes::from_static(b"\x00\x01corr"));
    pp.content_type = Some("text/plain".into());
    pp.payload_format_indicator = Some(1);
    c.send(publish("own", QoS::AtMostOnce, 0, "not to me")).await;
    c.send(pub_with("x/y", QoS::AtMostOnce, 0, "hi", pp.clone())).await;
    let m = c.recv_publish().await;
    assert_eq!(&*m.topic, "x/y", "No Local suppressed the own publish");
    let got = m.props();
    assert_eq!(got.subscription_identifiers, vec![42]);
    assert_eq!(got.user_properties, pp.user_properties);
    assert_eq!(got.response_topic, pp.response_topic);
    assert_eq!(got.correlation_data, pp.correlation_data);
    assert_eq!(got.content_type, pp.content_type);
    assert_eq!(got.payload_format_indicator, Some(1));
    // Invalid payload for its format indicator: 0x99.
    let mut bad = props();
    bad.payload_format_indicator = Some(1);
    c.send_bytes(&{
        let mut b = bytes::BytesMut::new();
        encode(&pub_with("x/y", QoS::AtMostOnce, 0, "", bad), Protocol::V5, &mut b);
        // Patch in a non-UTF-8 payload byte.
        b[1] += 1;
        b.extend_from_slice(&[0xFF]);
        b
    })
    .await;
    assert!(matches!(c.until_closed().await.last(), Some(Packet::Disconnect(d)) if d.code == reason::PAYLOAD_FORMAT_INVALID));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscriptions() {
    let node = start(|_| {}).await;
    let mut a = Raw::v5(node.tcp, "m-a").await;
    let mut b = Raw::v5(node.tcp, "m-b").await;
    assert_eq!(a.sub("$share/g/s/+", QoS::AtLeastOnce).await, vec![1]);
    assert_eq!(b.sub("$share/g/s/+", QoS::AtLeastOnce).await, vec![1]);
    let mut p = Raw::v5(node.tcp, "s-pub").await;
    for i in 1..=10u16 {
        p.send(publish("s/t", QoS::AtLeastOnce, i, &format!("{i}"))).await;
        assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
    }
    // Each message goes to exactly one member; round-robin splits them.
    let mut got_a = Vec::new();
    for _ in 0..5 {
        let m = a.recv_publish().await;
        got_a.push(m);
    }
    let mut got_b = Vec::new();
    for _ in 0..5 {
        let m = b.recv_publish().await;
        b.send(Packet::PubAck(Ack::new(m.pkid, 0))).await;
        got_b.push(String::from_utf8(m.payload.to_vec()).unwrap());
    }
    // a leaves without acknowledging: its five go to b.
    drop(a);
    let mut again = Vec::new();
    for _ in 0..5 {
        let m = b.recv_publish().await;
        b.send(Packet::PubAck(Ack::new(m.pkid, 0))).await;
        again.push(String::from_utf8(m.payload.to_vec()).unwrap());
    }
    let mut all: Vec<String> = got_b.into_iter().chain(again).collect();
    all.sort_by_key(|s| s.parse::<u32>().unwrap());
    assert_eq!(all, (1..=10).map(|i| i.to_string()).collect::<Vec<_>>());
    // Unsubscribing an invalid filter: UNSUBACK 0x8F; one never subscribed: 0x11.
    let mut u = Raw::v5(node.tcp, "m-u").await;
    u.send(Packet::Unsubscribe(Unsubscribe { pkid: 4, filters: vec!["a/#/b".into(), "never".into()], props: props() })).await;
    assert!(
        matches!(u.recv_app().await, Some(Packet::UnsubAck(x)) if x.codes == vec![reason::TOPIC_FILTER_INVALID, reason::NO_SUBSCRIPTION_EXISTED])
    );
    // Invalid shared filters and No Local on a shared subscription.
    let mut c = Raw::v5(node.tcp, "m-c").await;
    assert_eq!(c.sub("$share/g+/x", QoS::AtMostOnce).await, vec![reason::TOPIC_FILTER_INVALID]);
    let nl =
        SubOptions { qos: QoS::AtMostOnce, no_local: true, retain_as_published: false, retain_handling: RetainHandling::SendAtSubscribe };
    c.send(sub_opts(9, "$share/g/x", nl, props())).await;
    assert!(matches!(c.until_closed().await.last(), Some(Packet::Disconnect(d)) if d.code == reason::PROTOCOL_ERROR));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_packet_sizes() {
    let node = start(|c| {
        c.mqtt.max_packet_size = 1000;
        c.mqtt.max_subscriptions_per_session = 2;
        c.mqtt.max_connections = 4;
        c.mqtt.max_topic_levels = 4;
    })
    .await;
    let mut cp = connect_packet(Protocol::V5, "small", true);
    cp.props.maximum_packet_size = Some(100);
    let (mut s, _) = Raw::session(node.tcp, cp).await;
    s.sub("big/#", QoS::AtMostOnce).await;
    assert_eq!(s.sub("two", QoS::AtMostOnce).await, vec![0]);
    assert_eq!(s.sub("three", QoS::AtMostOnce).await, vec![reason::QUOTA_EXCEEDED]);
    assert_eq!(s.sub("a/b/c/d/e", QoS::AtMostOnce).await, vec![reason::TOPIC_FILTER_INVALID]);
    let mut p = Raw::v5(node.tcp, "bigpub").await;
    p.send(publish("big/1", QoS::AtMostOnce, 0, &"x".repeat(500))).await;
    p.send(publish("big/2", QoS::AtMostOnce, 0, "small")).await;
    assert_eq!(&s.recv_publish().await.payload[..], b"small", "message above the client's maximum was not sent");
    // Over the server's maximum packet size: 0x95.
    p.send(publish("big/3", QoS::AtMostOnce, 0, &"x".repeat(2000))).await;
    assert!(matches!(p.until_closed().await.last(), Some(Packet::Disconnect(d)) if d.code == reason::PACKET_TOO_LARGE));
    // Topic with too many levels: 0x90 on the PUBACK.
    let mut p = Raw::v5(node.tcp, "deep").await;
    p.send(publish("a/b/c/d/e", QoS::AtLeastOnce, 5, "x")).await;
    assert!(matches!(p.recv().await, Some(Packet::PubAck(a)) if a.code == reason::TOPIC_NAME_INVALID));
    node.stop().await;
    // Connection limit: connections that closed a moment ago may still be counted, so the
    // accepted ones retry until admitted; the refusal is then deterministic.
    let node = start(|c| c.mqtt.max_connections = 2).await;
    let mut live = Vec::new();
    for id in ["one", "two"] {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let (r, ack) = Raw::session(node.tcp, connect_packet(Protocol::V5, id, true)).await;
            if ack.code == 0 {
                live.push(r);
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "never admitted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let (mut over, ack) = Raw::session(node.tcp, connect_packet(Protocol::V5, "three", true)).await;
    assert_eq!(ack.code, reason::QUOTA_EXCEEDED);
    assert!(over.until_closed().await.is_empty());
    let (_over4, ack) = Raw::session(node.tcp, connect_packet(Protocol::V4, "four", true)).await;
    assert_eq!(ack.code, 3, "3.1.1 gets Server unavailable");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sys_topics_and_dollar_rules() {
    let node = start(|_| {}).await;
    let mut c = Raw::v5(node.tcp, "sys").await;
    c.sub("$SYS/broker/uptime", QoS::AtMostOnce).await;
    let m = loop {
        match c.recv().await {
            Some(Packet::Publish(p)) if &*p.topic == "$SYS/broker/uptime" => break p,
            Some(_) => continue,
            None => panic!("closed"),
        }
    };
    assert!(String::from_utf8_lossy(&m.payload).ends_with("seconds"));
    let mut w = Raw::v5(node.tcp, "wild").await;
    w.sub("#", QoS::AtMostOnce).await;
    w.sub("+/broker/#", QoS::AtMostOnce).await;
    let mut p = Raw::v5(node.tcp, "marker-pub").await;
    // $SYS updates every second; two updates pass before the marker only if the wildcard leaked them.
    c.recv().await;
    p.send(publish("after/sys", QoS::AtMostOnce, 0, "m")).await;
    let got = w.recv().await;
    assert!(matches!(&got, Some(Packet::Publish(x)) if &*x.topic == "after/sys"), "{got:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_connects_with_one_client_id_leave_one_connection() {
    let node = start(|_| {}).await;
    let addr = node.tcp;
    let clients = futures_util::future::join_all((0..20).map(|i| async move {
        let mut c = connect_packet(if i % 2 == 0 { Protocol::V5 } else { Protocol::V4 }, "same-id", i % 3 == 0);
        c.keep_alive = 0;
        Raw::session(addr, c).await
    }))
    .await;
    // Every connection got a CONNACK; then all but one are closed (5.0 ones with 0x8E). Wait for
    // 19 closes (each bounded by the deadline), then release the survivor.
    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    for (mut c, ack) in clients {
        assert_eq!(ack.code, 0);
        let mut stop = stop_tx.subscribe();
        let done = done_tx.clone();
        tokio::spawn(async move {
            tokio::select! {
                seen = c.until_closed() => { let _ = done.send(Err(seen)); }
                _ = stop.recv() => { let _ = done.send(Ok(c)); }
            }
        });
    }
    let mut v5_closes = Vec::new();
    for _ in 0..19 {
        match tokio::time::timeout(DEADLINE, done_rx.recv()).await.expect("19 connections closed in time").unwrap() {
            Err(seen) => v5_closes.push(seen),
            Ok(_) => unreachable!("released before the stop signal"),
        }
    }
    for seen in &v5_closes {
        if let Some(Packet::Disconnect(d)) = seen.last() {
            assert_eq!(d.code, reason::SESSION_TAKEN_OVER);
        }
    }
    stop_tx.send(()).unwrap();
    let mut survivor = match tokio::time::timeout(DEADLINE, done_rx.recv()).await.unwrap().unwrap() {
        Ok(c) => c,
        Err(seen) => panic!("the last connection was closed too: {seen:?}"),
    };
    assert_eq!(survivor.sub("still/here", QoS::AtMostOnce).await, vec![0], "the survivor is fully usable");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_qos2_publisher_loses_nothing_to_a_small_queue() {
    let node = start(|c| c.mqtt.max_queued = 40).await;
    let mut s = Raw::v4(node.tcp, "q2-sub").await;
    s.sub("q2/#", QoS::ExactlyOnce).await;
    let mut p = Raw::v4(node.tcp, "q2-pub").await;
    let total: u16 = 3000;
    // The publisher pipelines everything and answers PUBRECs as they come.
    let publisher = tokio::spawn(async move {
        for i in 1..=total {
            p.send(publish("q2/x", QoS::ExactlyOnce, i, &i.to_string())).await;
        }
        let mut done = 0;
        while done < total {
            match p.recv().await {
                Some(Packet::PubRec(a)) => p.send(Packet::PubRel(Ack::new(a.pkid, 0))).await,
                Some(Packet::PubComp(_)) => done += 1,
                Some(_) => {}
                None => panic!("publisher closed"),
            }
        }
    });
    let mut seen = vec![false; total as usize + 1];
    let mut got = 0;
    while got < total {
        match s.recv_app().await {
            Some(Packet::Publish(m)) => {
                let n: usize = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
                assert!(!seen[n], "duplicate {n}");
                seen[n] = true;
                got += 1;
                s.send(Packet::PubRec(Ack::new(m.pkid, 0))).await;
            }
            Some(Packet::PubRel(a)) => s.send(Packet::PubComp(Ack::new(a.pkid, 0))).await,
            Some(_) => {}
            None => panic!("subscriber closed"),
        }
    }
    tokio::time::timeout(DEADLINE, publisher).await.unwrap().unwrap();
    node.stop().await;
}

/// A client that writes without reading stops being read, and loses nothing. It subscribes to
/// its own topic and pipelines 2,000 QoS 1 publishes of 32 KiB (64 MiB, more than the socket
/// buffers between it and the node hold) without reading: its deliveries back up (its receive
/// buffer is kept small), the outbound queue fills with them and the PUBACKs, and the node
/// stops reading it — its one task keeps writing while a packet's handling waits for room in
/// that queue. When the client reads again, every PUBACK (in order) and every message arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_is_paused_and_loses_nothing() {
    use std::sync::atomic::{AtomicU16, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = start(|_| {}).await;
    // A small receive buffer (no autotuning): what the client does not read backs up at once.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(64 * 1024).unwrap();
    let stream = sock.connect(node.tcp).await.unwrap();
    let (mut c, ack) = Raw::session_on(stream, connect_packet(Protocol::V4, "self-loop", true)).await;
    assert_eq!(ack.code, 0);
    c.sub("loop/#", QoS::AtLeastOnce).await;
    let (total, size) = (2000u16, 32 * 1024);
    let (mut rd, mut wr) = c.stream.into_split();
    let written = std::sync::Arc::new(AtomicU16::new(0));
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<u16>();
    let w = written.clone();
    let writer = tokio::spawn(async move {
        let payload = "x".repeat(size);
        let mut b = bytes::BytesMut::new();
        for i in 1..=total {
            encode(&publish("loop/x", QoS::AtLeastOnce, i, &payload), Protocol::V4, &mut b);
            wr.write_all(&b).await.unwrap();
            b.clear();
            w.store(i, Ordering::Relaxed);
        }
        while let Some(pkid) = ack_rx.recv().await {
            encode(&Packet::PubAck(Ack::new(pkid, 0)), Protocol::V4, &mut b);
            wr.write_all(&b).await.unwrap();
            b.clear();
        }
    });
    // Read once the client has written everything, or has been held up (the node stopped
    // reading it) for half a second.
    let mut last = (0, tokio::time::Instant::now());
    loop {
        let n = written.load(Ordering::Relaxed);
        if n == total || (n == last.0 && last.1.elapsed() > Duration::from_millis(500)) {
            break;
        }
        if n != last.0 {
            last = (n, tokio::time::Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (mut acked, mut got, mut buf) = (0u16, 0u16, bytes::BytesMut::new());
    let read_all = async {
        loop {
            while let Some(p) = decode(&mut buf, Protocol::V4, usize::MAX).expect("a valid packet") {
                match p {
                    Packet::PubAck(a) => {
                        acked += 1;
                        assert_eq!(a.pkid, acked, "PUBACKs in order");
                    }
                    Packet::Publish(m) => {
                        assert_eq!(m.payload.len(), size);
                        got += 1;
                        ack_tx.send(m.pkid).unwrap();
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            if acked == total && got == total {
                break;
            }
            assert!(rd.read_buf(&mut buf).await.unwrap() > 0, "the node closed the connection");
        }
    };
    let done = tokio::time::timeout(Duration::from_secs(60), read_all).await;
    assert!(done.is_ok(), "every PUBACK and message within a minute: {acked} PUBACKs, {got} messages");
    drop(ack_tx);
    writer.await.unwrap();
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_maximum_is_enforced_for_5_0_qos2() {
    let node = start(|c| c.mqtt.max_inflight = 5).await;
    let mut p = Raw::v5(node.tcp, "greedy").await;
    for i in 1..=8u16 {
        p.send(publish("rm/x", QoS::ExactlyOnce, i, "x")).await;
    }
    let seen = p.until_closed().await;
    assert_eq!(seen.iter().filter(|x| matches!(x, Packet::PubRec(_))).count(), 5, "{seen:?}");
    assert!(matches!(seen.last(), Some(Packet::Disconnect(d)) if d.code == reason::RECEIVE_MAXIMUM_EXCEEDED), "{seen:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_rate_limit_refuses_with_0x9f() {
    // 2 per second with a burst of 2 (the readiness probe took one). 20 back-to-back CONNECTs
    // would need ~9 s to all pass, so some are refused on any machine; refused ones are closed.
    let node = start(|c| c.mqtt.max_connect_rate = 2).await;
    let mut codes = Vec::new();
    for i in 0..20 {
        let (mut c, ack) = Raw::session(node.tcp, connect_packet(Protocol::V5, &format!("rate-{i}"), true)).await;
        if ack.code == reason::CONNECTION_RATE_EXCEEDED {
            assert!(c.until_closed().await.is_empty());
        }
        codes.push(ack.code);
    }
    assert!(codes.iter().all(|c| *c == 0 || *c == reason::CONNECTION_RATE_EXCEEDED), "{codes:?}");
    assert!(codes.iter().filter(|c| **c == reason::CONNECTION_RATE_EXCEEDED).count() >= 10, "{codes:?}");
    assert_eq!(codes[0], 0, "the burst admits the first");
    node.stop().await;
}

/// Packets are processed in order: a PUBLISH sent right behind a SUBSCRIBE (without waiting for
/// the SUBACK) is matched against that subscription — the Paho suites' No Local and
/// request/response tests do this — and one behind an UNSUBSCRIBE is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_behind_a_subscribe_sees_it() {
    let node = start(|_| {}).await;
    let mut other = Raw::v5(node.tcp, "order-other").await;
    for i in 0..30u16 {
        let topic = format!("order/{i}");
        let mut c = Raw::v5(node.tcp, &format!("order-{i}")).await;
        // One write: SUBSCRIBE (No Local on the second filter), then PUBLISHes of its own.
        let mut b = bytes::BytesMut::new();
        let no_local = SubOptions { no_local: true, ..SubOptions::qos(QoS::AtLeastOnce) };
        let sub = Subscribe {
            pkid: 1,
            filters: vec![(topic.clone(), SubOptions::qos(QoS::AtLeastOnce)), (format!("{topic}/nl"), no_local)],
            props: Properties::default(),
        };
        encode(&Packet::Subscribe(sub), Protocol::V5, &mut b);
        encode(&publish(&topic, QoS::AtMostOnce, 0, "own"), Protocol::V5, &mut b);
        encode(&publish(&format!("{topic}/nl"), QoS::AtMostOnce, 0, "own-nl"), Protocol::V5, &mut b);
        c.send_bytes(&b).await;
        let mut got = Vec::new();
        let mut subacked = false;
        while got.len() < 2 {
            match c.recv_app().await {
                Some(Packet::Publish(m)) => got.push(String::from_utf8_lossy(&m.payload).into_owned()),
                Some(Packet::SubAck(_)) => {
                    // Then (after the SUBACK) someone else, on the No Local filter: that one
                    // arrives, its own did not.
                    subacked = true;
                    other.send(publish(&format!("{topic}/nl"), QoS::AtMostOnce, 0, "theirs")).await;
                }
                x => panic!("round {i}: {x:?} (subacked {subacked}, got {got:?})"),
            }
        }
        // Two publishers: either order. Its own message on the No Local filter never comes.
        got.sort();
        assert_eq!(got, ["own", "theirs"], "round {i}");
        // An UNSUBSCRIBE and a PUBLISH right behind it: not delivered.
        let mut b = bytes::BytesMut::new();
        encode(
            &Packet::Unsubscribe(Unsubscribe { pkid: 2, filters: vec![topic.clone()], props: Properties::default() }),
            Protocol::V5,
            &mut b,
        );
        encode(&publish(&topic, QoS::AtMostOnce, 0, "after"), Protocol::V5, &mut b);
        c.send_bytes(&b).await;
        let rest = c.sync().await;
        assert!(!rest.iter().any(|p| matches!(p, Packet::Publish(_))), "round {i}: {rest:?}");
    }
    node.stop().await;
}

/// A lingering close: the server that ends a connection with a reason (here Receive Maximum
/// exceeded) keeps reading what the client still sends for a moment, so a client that goes on
/// publishing for a little while after the DISCONNECT gets no reset (a broken pipe) and reads
/// the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_still_writing_reads_the_disconnect_reason() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = start(|c| c.mqtt.max_inflight = 5).await;
    let p = Raw::v5(node.tcp, "still-writing").await;
    let (mut rd, mut wr) = p.stream.into_split();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    // Eight QoS 2 publishes (three beyond Receive Maximum), then more, 2 KiB a millisecond,
    // until told to stop.
    let writer = tokio::spawn(async move {
        let mut b = bytes::BytesMut::new();
        for i in 1..=8u16 {
            encode(&publish("lc/x", QoS::ExactlyOnce, i, "x"), Protocol::V5, &mut b);
        }
        wr.write_all(&b).await?;
        let filler = "y".repeat(2000);
        while !stop2.load(Ordering::Relaxed) {
            b.clear();
            encode(&publish("lc/y", QoS::AtMostOnce, 0, &filler), Protocol::V5, &mut b);
            wr.write_all(&b).await?;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        wr.shutdown().await
    });
    let mut got = bytes::BytesMut::new();
    let mut seen = Vec::new();
    while !seen.iter().any(|p| matches!(p, Packet::Disconnect(_))) {
        match tokio::time::timeout(DEADLINE, rd.read_buf(&mut got)).await.expect("the server answers") {
            Ok(0) => panic!("closed without a DISCONNECT: {seen:?}"),
            Ok(_) => {}
            Err(e) => panic!("reset before the DISCONNECT: {e} ({seen:?})"),
        }
        while let Some(p) = decode(&mut got, Protocol::V5, usize::MAX).unwrap() {
            seen.push(p);
        }
    }
    assert!(matches!(seen.last(), Some(Packet::Disconnect(d)) if d.code == reason::RECEIVE_MAXIMUM_EXCEEDED), "{seen:?}");
    // The client goes on writing for a moment (its publishes were in flight), then stops.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap().expect("the client's writes after the DISCONNECT were not refused by a reset");
    node.stop().await;
}

/// PUBACKs go out in the PUBLISHes' order whichever way each waits: a message with a
/// subscriber waits for its copy to be taken (the connection's ordered queue), one without is
/// answered 0x10 at once unless older ones still wait; a PINGREQ pipelined among them is
/// answered behind the PUBACKs before it. All of it written in one go, before reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubacks_keep_the_publishes_order_across_their_waits() {
    let node = start(|_| {}).await;
    let mut sub = Raw::v5(node.tcp, "order-sub").await;
    sub.sub("order/with", QoS::AtLeastOnce).await;
    let mut c = Raw::v5(node.tcp, "order-pub").await;
    let (total, ping_after) = (400u16, 200u16);
    // Runs of subscribed and unsubscribed topics, of growing length.
    let subscribed = |i: u16| ((i as f64).sqrt() as u16).is_multiple_of(2);
    let mut b = bytes::BytesMut::new();
    for i in 1..=total {
        let topic = if subscribed(i) { "order/with" } else { "order/without" };
        encode(&publish(topic, QoS::AtLeastOnce, i, "m"), Protocol::V5, &mut b);
        if i == ping_after {
            encode(&Packet::PingReq, Protocol::V5, &mut b);
        }
    }
    c.send_bytes(&b).await;
    let (mut next, mut pinged) = (1u16, false);
    while next <= total {
        match c.recv().await.expect("the connection stays open") {
            Packet::PubAck(a) => {
                assert_eq!(a.pkid, next, "PUBACKs in the PUBLISHes' order");
                assert_eq!(a.code, if subscribed(next) { 0 } else { reason::NO_MATCHING_SUBSCRIBERS }, "PUBACK {next}");
                next += 1;
            }
            Packet::PingResp => {
                assert_eq!(next, ping_after + 1, "PINGRESP right behind the PUBACKs before it");
                pinged = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(pinged, "PINGRESP");
    // A client that sends DISCONNECT right behind its PUBLISHes still reads every PUBACK.
    let mut bye = Raw::v5(node.tcp, "order-bye").await;
    let mut b = bytes::BytesMut::new();
    for i in 1..=50u16 {
        encode(&publish("order/with", QoS::AtLeastOnce, i, "m"), Protocol::V5, &mut b);
    }
    encode(&disconnect(), Protocol::V5, &mut b);
    bye.send_bytes(&b).await;
    let mut acked = 0u16;
    while let Some(p) = bye.recv().await {
        match p {
            Packet::PubAck(a) => {
                acked += 1;
                assert_eq!((a.pkid, a.code), (acked, 0), "PUBACKs in order before the close");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(acked, 50, "every PUBACK before the close");
    // The subscriber got every message that had a subscriber.
    let expected = (1..=total).filter(|i| subscribed(*i)).count() + 50;
    let mut got = 0;
    while got < expected {
        match sub.recv().await.expect("subscriber connected") {
            Packet::Publish(p) => {
                got += 1;
                sub.send(Packet::PubAck(Ack::new(p.pkid, 0))).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
