//! Codec properties: every packet we can encode decodes back to itself, for both versions.
use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::*;

fn topic_s() -> impl Strategy<Value = String> {
    "[a-z0-9/$ü]{1,20}".prop_filter("valid topic", |t| topic::valid_topic_name(t))
}

fn props_s(publish: bool) -> impl Strategy<Value = Properties> {
    (
        proptest::option::of(0u8..=1),
        proptest::option::of(any::<u32>()),
        proptest::option::of("[a-z/]{0,10}"),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)),
        proptest::collection::vec(("[a-z]{0,5}", "\\PC{0,5}"), 0..3),
        proptest::option::of(1u16..),
    )
        .prop_map(move |(pf, exp, ct, corr, up, alias)| Properties {
            payload_format_indicator: if publish { pf } else { None },
            message_expiry_interval: if publish { exp } else { None },
            content_type: if publish { ct } else { None },
            correlation_data: if publish { corr.map(Bytes::from) } else { None },
            user_properties: up,
            topic_alias: if publish { alias } else { None },
            ..Properties::default()
        })
}

fn qos_s() -> impl Strategy<Value = QoS> {
    prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce), Just(QoS::ExactlyOnce)]
}

fn roundtrip(p: &Packet, protocol: Protocol) -> Packet {
    let mut b = BytesMut::new();
    encode(p, protocol, &mut b);
    let out = decode(&mut b, protocol, usize::MAX).expect("decodes").expect("complete");
    assert!(b.is_empty(), "exactly one packet");
    out
}

proptest! {
    #[test]
    fn publish_roundtrip(t in topic_s(), q in qos_s(), retain: bool, dup: bool, pkid in 1u16.., payload in proptest::collection::vec(any::<u8>(), 0..200), props in props_s(true), v5: bool) {
        let protocol = if v5 { Protocol::V5 } else { Protocol::V4 };
        let props = if v5 && !props.is_empty() && (props.payload_format_indicator != Some(1) || std::str::from_utf8(&payload).is_ok()) { Some(Box::new(props)) } else { None };
        let p = Packet::Publish(Publish { dup: dup && q != QoS::AtMostOnce, qos: q, retain, topic: t, pkid: if q == QoS::AtMostOnce { 0 } else { pkid }, props, payload: Bytes::from(payload) });
        prop_assert_eq!(roundtrip(&p, protocol), p);
    }

    #[test]
    fn subscribe_roundtrip(filters in proptest::collection::vec(("[a-z+#/]{1,12}".prop_filter("valid", |f| topic::valid_filter(f)), qos_s(), any::<bool>(), any::<bool>(), 0u8..3), 1..5), pkid in 1u16.., v5: bool) {
        let protocol = if v5 { Protocol::V5 } else { Protocol::V4 };
        let filters = filters.into_iter().map(|(f, q, nl, rap, rh)| {
            let rh = match rh { 0 => RetainHandling::SendAtSubscribe, 1 => RetainHandling::SendIfNew, _ => RetainHandling::DoNotSend };
            (f, if v5 { SubOptions { qos: q, no_local: nl, retain_as_published: rap, retain_handling: rh } } else { SubOptions::qos(q) })
        }).collect();
        let p = Packet::Subscribe(Subscribe { pkid, filters, props: Properties::default() });
        prop_assert_eq!(roundtrip(&p, protocol), p);
    }

    #[test]
    fn connect_roundtrip(id in "[a-zA-Z0-9-]{0,23}", clean: bool, ka: u16, user in proptest::option::of("[a-z]{1,8}"), pass in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)), will in proptest::option::of((topic_s(), qos_s(), any::<bool>())), expiry in proptest::option::of(any::<u32>()), v5: bool) {
        let protocol = if v5 { Protocol::V5 } else { Protocol::V4 };
        let mut props = Properties::default();
        if v5 { props.session_expiry_interval = expiry; }
        let password = if user.is_some() || v5 { pass.map(Bytes::from) } else { None };
        let will = will.map(|(topic, qos, retain)| Will { topic, payload: Bytes::from_static(b"bye"), qos, retain, props: Properties::default() });
        let p = Packet::Connect(Box::new(Connect { protocol, clean_start: clean, keep_alive: ka, client_id: id, will, username: user, password, props }));
        prop_assert_eq!(roundtrip(&p, protocol), p);
    }

    #[test]
    fn decoder_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300), v5: bool) {
        let protocol = if v5 { Protocol::V5 } else { Protocol::V4 };
        let mut b = BytesMut::from(&data[..]);
        while let Ok(Some(_)) = decode(&mut b, protocol, 1 << 16) {}
    }
}

#[test]
fn acks_and_control_roundtrip() {
    for protocol in [Protocol::V4, Protocol::V5] {
        for p in [
            Packet::PubAck(Ack::new(7, 0)),
            Packet::PubRec(Ack::new(8, 0)),
            Packet::PubRel(Ack::new(9, 0)),
            Packet::PubComp(Ack::new(10, 0)),
            Packet::PingReq,
            Packet::PingResp,
            Packet::Unsubscribe(Unsubscribe { pkid: 3, filters: vec!["a/+".into(), "#".into()], props: Properties::default() }),
            Packet::Disconnect(Disconnect { code: 0, props: Properties::default() }),
        ] {
            assert_eq!(roundtrip(&p, protocol), p);
        }
    }
    let p = Packet::PubAck(Ack::new(7, reason::NO_MATCHING_SUBSCRIBERS));
    assert_eq!(roundtrip(&p, Protocol::V5), p);
    let p = Packet::Auth(Auth { code: 0x18, props: Properties::default() });
    assert_eq!(roundtrip(&p, Protocol::V5), p);
}

#[test]
fn v4_rejects_auth_packet_and_large_header_before_body() {
    let mut b = BytesMut::from(&[0xF0u8, 0][..]);
    assert_eq!(decode(&mut b, Protocol::V4, 100).unwrap_err().code, reason::MALFORMED_PACKET);
    // Only the header has arrived; the size check fires without waiting for 16 KB of body.
    let mut b = BytesMut::from(&[0x30u8, 0x80, 0x80, 0x01][..]);
    assert_eq!(decode(&mut b, Protocol::V5, 1000).unwrap_err().code, reason::PACKET_TOO_LARGE);
}

#[test]
fn the_bare_puback_encodes_as_the_packet_does() {
    for protocol in [Protocol::V4, Protocol::V5] {
        for (pkid, code) in [(1u16, 0u8), (65535, 0), (7, reason::NO_MATCHING_SUBSCRIBERS), (8, reason::QUOTA_EXCEEDED)] {
            let (mut bare, mut full) = (BytesMut::new(), BytesMut::new());
            encode_puback(&mut bare, pkid, code, protocol);
            encode(&Packet::PubAck(Ack::new(pkid, code)), protocol, &mut full);
            assert_eq!(bare, full, "{protocol:?} {pkid} {code}");
        }
    }
}
