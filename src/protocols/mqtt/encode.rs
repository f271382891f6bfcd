//! Encoding of every packet for 3.1.1 or 5.0 (properties are dropped on 3.1.1).
use bytes::{BufMut, BytesMut};

use super::props::Properties;
use super::reason;
use super::types::*;

pub(crate) fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

pub(crate) fn put_varint(buf: &mut BytesMut, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        buf.put_u8(b);
        if n == 0 {
            break;
        }
    }
}

pub(crate) fn put_str(buf: &mut BytesMut, s: &str) {
    put_bin(buf, s.as_bytes());
}

pub(crate) fn put_bin(buf: &mut BytesMut, b: &[u8]) {
    buf.put_u16(b.len() as u16);
    buf.put_slice(b);
}

fn header(buf: &mut BytesMut, first: u8, len: usize) {
    buf.reserve(len + 5);
    buf.put_u8(first);
    put_varint(buf, len);
}

fn props_len(p: &Properties, v5: bool) -> usize {
    if v5 {
        p.full_len()
    } else {
        0
    }
}

/// Size in bytes of `p` once encoded, so a sender can honour the peer's Maximum Packet Size.
pub fn publish_len(protocol: Protocol, topic_len: usize, qos: QoS, props: &Properties, payload_len: usize) -> usize {
    let len = publish_body_len(protocol == Protocol::V5, topic_len, qos, props, payload_len);
    1 + varint_len(len) + len
}

fn publish_body_len(v5: bool, topic_len: usize, qos: QoS, props: &Properties, payload_len: usize) -> usize {
    2 + topic_len + if qos == QoS::AtMostOnce { 0 } else { 2 } + props_len(props, v5) + payload_len
}

/// A PUBACK without properties (the broker's own answer to a QoS 1 PUBLISH): no `Packet`
/// built for it.
pub fn encode_puback(buf: &mut BytesMut, pkid: u16, code: u8, protocol: Protocol) {
    if protocol == Protocol::V5 && code != 0 {
        header(buf, 0x40, 3);
        buf.put_u16(pkid);
        buf.put_u8(code);
    } else {
        header(buf, 0x40, 2);
        buf.put_u16(pkid);
    }
}

fn ack(buf: &mut BytesMut, first: u8, a: &Ack, v5: bool) {
    if v5 && (a.code != 0 || !a.props.is_empty()) {
        let pl = if a.props.is_empty() { 0 } else { a.props.full_len() };
        header(buf, first, 3 + pl);
        buf.put_u16(a.pkid);
        buf.put_u8(a.code);
        if pl > 0 {
            a.props.encode(buf);
        }
    } else {
        header(buf, first, 2);
        buf.put_u16(a.pkid);
    }
}

/// Append the encoding of `packet` for `protocol` to `buf`.
pub fn encode(packet: &Packet, protocol: Protocol, buf: &mut BytesMut) {
    let v5 = protocol == Protocol::V5;
    match packet {
        Packet::Connect(c) => encode_connect(c, buf),
        Packet::ConnAck(c) => {
            header(buf, 0x20, 2 + props_len(&c.props, v5));
            buf.put_u8(c.session_present as u8);
            buf.put_u8(if v5 { c.code } else { reason::connack_v4(c.code) });
            if v5 {
                c.props.encode(buf);
            }
        }
        Packet::Publish(p) => {
            encode_publish(buf, protocol, p.dup, p.qos, p.retain, &p.topic, p.pkid, p.props(), &p.payload);
        }
        Packet::PubAck(a) => ack(buf, 0x40, a, v5),
        Packet::PubRec(a) => ack(buf, 0x50, a, v5),
        Packet::PubRel(a) => ack(buf, 0x62, a, v5),
        Packet::PubComp(a) => ack(buf, 0x70, a, v5),
        Packet::Subscribe(s) => {
            let len = 2 + props_len(&s.props, v5) + s.filters.iter().map(|(f, _)| 3 + f.len()).sum::<usize>();
            header(buf, 0x82, len);
            buf.put_u16(s.pkid);
            if v5 {
                s.props.encode(buf);
            }
            for (f, o) in &s.filters {
                put_str(buf, f);
                let mut b = o.qos as u8;
                if v5 {
                    b |= (o.no_local as u8) << 2 | (o.retain_as_published as u8) << 3 | (o.retain_handling as u8) << 4;
                }
                buf.put_u8(b);
            }
        }
        Packet::SubAck(s) => {
            header(buf, 0x90, 2 + props_len(&s.props, v5) + s.codes.len());
            buf.put_u16(s.pkid);
            if v5 {
                s.props.encode(buf);
                buf.put_slice(&s.codes);
            } else {
                for c in &s.codes {
                    buf.put_u8(if *c <= 2 { *c } else { 0x80 });
                }
            }
        }
        Packet::Unsubscribe(u) => {
            let len = 2 + props_len(&u.props, v5) + u.filters.iter().map(|f| 2 + f.len()).sum::<usize>();
            header(buf, 0xA2, len);
            buf.put_u16(u.pkid);
            if v5 {
                u.props.encode(buf);
            }
            for f in &u.filters {
                put_str(buf, f);
            }
        }
        Packet::UnsubAck(u) => {
            if v5 {
                header(buf, 0xB0, 2 + u.props.full_len() + u.codes.len());
                buf.put_u16(u.pkid);
                u.props.encode(buf);
                buf.put_slice(&u.codes);
            } else {
                header(buf, 0xB0, 2);
                buf.put_u16(u.pkid);
            }
        }
        Packet::PingReq => buf.put_slice(&[0xC0, 0]),
        Packet::PingResp => buf.put_slice(&[0xD0, 0]),
        Packet::Disconnect(d) => {
            if v5 && (d.code != 0 || !d.props.is_empty()) {
                header(buf, 0xE0, 1 + d.props.full_len());
                buf.put_u8(d.code);
                d.props.encode(buf);
            } else {
                buf.put_slice(&[0xE0, 0]);
            }
        }
        Packet::Auth(a) => {
            if v5 {
                header(buf, 0xF0, 1 + a.props.full_len());
                buf.put_u8(a.code);
                a.props.encode(buf);
            }
        }
    }
}

/// CONNECT, in the protocol version it names.
fn encode_connect(c: &Connect, buf: &mut BytesMut) {
    let v5 = c.protocol == Protocol::V5;
    let mut len = 2 + 4 + 1 + 1 + 2 + props_len(&c.props, v5) + 2 + c.client_id.len();
    if let Some(w) = &c.will {
        len += props_len(&w.props, v5) + 2 + w.topic.len() + 2 + w.payload.len();
    }
    len += c.username.as_ref().map_or(0, |u| 2 + u.len());
    len += c.password.as_ref().map_or(0, |p| 2 + p.len());
    header(buf, 0x10, len);
    put_str(buf, "MQTT");
    buf.put_u8(if v5 { 5 } else { 4 });
    let mut flags = 0u8;
    if c.clean_start {
        flags |= 0x02;
    }
    if let Some(w) = &c.will {
        flags |= 0x04 | ((w.qos as u8) << 3);
        if w.retain {
            flags |= 0x20;
        }
    }
    if c.password.is_some() {
        flags |= 0x40;
    }
    if c.username.is_some() {
        flags |= 0x80;
    }
    buf.put_u8(flags);
    buf.put_u16(c.keep_alive);
    if v5 {
        c.props.encode(buf);
    }
    put_str(buf, &c.client_id);
    if let Some(w) = &c.will {
        if v5 {
            w.props.encode(buf);
        }
        put_str(buf, &w.topic);
        put_bin(buf, &w.payload);
    }
    if let Some(u) = &c.username {
        put_str(buf, u);
    }
    if let Some(p) = &c.password {
        put_bin(buf, p);
    }
}

/// Encode a PUBLISH from its parts (lets a sender avoid building a `Publish`); returns its size.
#[allow(clippy::too_many_arguments)]
pub fn encode_publish(
    buf: &mut BytesMut,
    protocol: Protocol,
    dup: bool,
    qos: QoS,
    retain: bool,
    topic: &str,
    pkid: u16,
    props: &Properties,
    payload: &[u8],
) -> usize {
    let v5 = protocol == Protocol::V5;
    let mut first = 0x30 | ((qos as u8) << 1);
    if dup {
        first |= 0x08;
    }
    if retain {
        first |= 0x01;
    }
    let len = publish_body_len(v5, topic.len(), qos, props, payload.len());
    header(buf, first, len);
    put_str(buf, topic);
    if qos != QoS::AtMostOnce {
        buf.put_u16(pkid);
    }
    if v5 {
        props.encode(buf);
    }
    buf.put_slice(payload);
    1 + varint_len(len) + len
}
