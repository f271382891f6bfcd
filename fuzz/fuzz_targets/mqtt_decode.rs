//! Feed arbitrary bytes to the MQTT decoder/validator as both 3.1.1 and 5.0. It must never
//! panic, and whatever it accepts must re-encode to bytes that decode to the same packet.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use thingsd::protocols::mqtt::{decode, encode, topic, Packet, Protocol};

fuzz_target!(|data: &[u8]| {
    for protocol in [Protocol::V4, Protocol::V5] {
        let mut buf = BytesMut::from(data);
        while let Ok(Some(p)) = decode(&mut buf, protocol, 1 << 20) {
            let proto = match &p {
                Packet::Connect(c) => c.protocol,
                _ => protocol,
            };
            let mut out = BytesMut::new();
            encode(&p, proto, &mut out);
            let again = decode(&mut out, proto, usize::MAX).expect("re-encoded packet decodes").expect("complete");
            // 3.1.1 CONNACK/SUBACK codes are mapped on encode, so compare only where lossless.
            if !matches!(p, Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_)) {
                assert_eq!(p, again);
            }
            if let Packet::Subscribe(s) = &p {
                for (f, _) in &s.filters {
                    if topic::valid_filter(f) && topic::parse_shared(f).is_none() {
                        let _ = topic::matches(f, "a/b/c");
                    }
                }
            }
        }
    }
});
