//! Framing and decoding with validation of every normative rule a receiver must check.
use bytes::{Buf, Bytes, BytesMut};

use super::props::{PropCtx, Properties};
use super::reason;
use super::topic;
use super::types::*;

/// Why a packet was refused; `code` is the 5.0 reason code to send in DISCONNECT/CONNACK.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg} (reason 0x{code:02X})")]
pub struct DecodeError {
    pub code: u8,
    pub msg: &'static str,
    /// Protocol level seen in a refused CONNECT, 0 otherwise.
    pub level: u8,
}

impl DecodeError {
    pub fn new(code: u8, msg: &'static str) -> DecodeError {
        DecodeError { code, msg, level: 0 }
    }
    pub fn malformed(msg: &'static str) -> DecodeError {
        DecodeError::new(reason::MALFORMED_PACKET, msg)
    }
    pub fn protocol(msg: &'static str) -> DecodeError {
        DecodeError::new(reason::PROTOCOL_ERROR, msg)
    }
}

/// Bounds-checked cursor over one packet's bytes.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub(crate) fn pos(&self) -> usize {
        self.pos
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::malformed("packet shorter than its fields"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(crate) fn varint(&mut self) -> Result<u32, DecodeError> {
        let mut value: u32 = 0;
        for i in 0..4 {
            let b = self.u8()?;
            value |= ((b & 0x7F) as u32) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::malformed("variable byte integer longer than 4 bytes"))
    }
    pub(crate) fn sub(&mut self, n: usize) -> Result<Reader<'a>, DecodeError> {
        Ok(Reader::new(self.take(n)?))
    }
    pub(crate) fn binary_slice(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u16()? as usize;
        self.take(n)
    }
    pub(crate) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        Ok(Bytes::copy_from_slice(self.binary_slice()?))
    }
    pub(crate) fn string(&mut self) -> Result<String, DecodeError> {
        let s = std::str::from_utf8(self.binary_slice()?).map_err(|_| DecodeError::malformed("invalid UTF-8 string"))?;
        if s.contains('\0') {
            return Err(DecodeError::malformed("U+0000 in UTF-8 string"));
        }
        Ok(s.to_owned())
    }
}

/// Parse a fixed header at the start of `buf`: (first byte, remaining length, header length).
/// `Ok(None)` means more bytes are needed.
pub fn parse_fixed_header(buf: &[u8]) -> Result<Option<(u8, usize, usize)>, DecodeError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let mut len: usize = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else { return Ok(None) };
        len |= ((b & 0x7F) as usize) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((buf[0], len, 2 + i)));
        }
    }
    Err(DecodeError::malformed("remaining length longer than 4 bytes"))
}

/// Take one complete packet off the front of `buf`, if there is one.
///
/// `protocol` is the session's version (use `V5` before CONNECT: CONNECT carries its own level).
/// A packet larger than `max_size` is refused from its header, before its body is buffered.
pub fn decode(buf: &mut BytesMut, protocol: Protocol, max_size: usize) -> Result<Option<Packet>, DecodeError> {
    let Some((first, len, hlen)) = parse_fixed_header(buf)? else { return Ok(None) };
    if hlen + len > max_size {
        return Err(DecodeError::new(reason::PACKET_TOO_LARGE, "packet exceeds maximum packet size"));
    }
    if buf.len() < hlen + len {
        return Ok(None);
    }
    buf.advance(hlen);
    let body = buf.split_to(len).freeze();
    decode_body(first, body, protocol).map(Some)
}

fn expect_flags(first: u8, flags: u8) -> Result<(), DecodeError> {
    if first & 0x0F != flags {
        return Err(DecodeError::malformed("invalid fixed header flags"));
    }
    Ok(())
}

fn finish(r: &Reader<'_>) -> Result<(), DecodeError> {
    if !r.is_empty() {
        return Err(DecodeError::malformed("trailing bytes after packet fields"));
    }
    Ok(())
}

fn pkid(r: &mut Reader<'_>) -> Result<u16, DecodeError> {
    let id = r.u16()?;
    if id == 0 {
        return Err(DecodeError::protocol("packet identifier 0"));
    }
    Ok(id)
}

/// Decode a packet body whose fixed header byte is `first`.
pub fn decode_body(first: u8, body: Bytes, protocol: Protocol) -> Result<Packet, DecodeError> {
    let v5 = protocol == Protocol::V5;
    let mut r = Reader::new(&body);
    let r = &mut r;
    let packet = match first >> 4 {
        1 => {
            expect_flags(first, 0)?;
            Packet::Connect(Box::new(connect(r)?))
        }
        2 => {
            expect_flags(first, 0)?;
            let flags = r.u8()?;
            if flags & 0xFE != 0 {
                return Err(DecodeError::malformed("CONNACK reserved flags"));
            }
            let code = r.u8()?;
            let props = if v5 && !r.is_empty() { Properties::decode(r, PropCtx::ConnAck)? } else { Properties::default() };
            Packet::ConnAck(ConnAck { session_present: flags & 1 == 1, code, props })
        }
        3 => return publish(first, &body, v5),
        4 => {
            expect_flags(first, 0)?;
            Packet::PubAck(ack(r, v5)?)
        }
        5 => {
            expect_flags(first, 0)?;
            Packet::PubRec(ack(r, v5)?)
        }
        6 => {
            expect_flags(first, 2)?;
            Packet::PubRel(ack(r, v5)?)
        }
        7 => {
            expect_flags(first, 0)?;
            Packet::PubComp(ack(r, v5)?)
        }
        8 => {
            expect_flags(first, 2)?;
            Packet::Subscribe(subscribe(r, v5)?)
        }
        9 => {
            expect_flags(first, 0)?;
            let pkid = pkid(r)?;
            let props = if v5 { Properties::decode(r, PropCtx::SubAck)? } else { Properties::default() };
            let codes = body[r.pos()..].to_vec();
            return Ok(Packet::SubAck(SubAck { pkid, codes, props }));
        }
        10 => {
            expect_flags(first, 2)?;
            let pkid = pkid(r)?;
            let props = if v5 { Properties::decode(r, PropCtx::Unsubscribe)? } else { Properties::default() };
            let mut filters = Vec::new();
            while !r.is_empty() {
                let f = r.string()?;
                // An empty filter is malformed; other invalid filters get UNSUBACK 0x8F (session).
                if f.is_empty() {
                    return Err(DecodeError::protocol("empty topic filter"));
                }
                filters.push(f);
            }
            if filters.is_empty() {
                return Err(DecodeError::protocol("UNSUBSCRIBE without topic filters"));
            }
            Packet::Unsubscribe(Unsubscribe { pkid, filters, props })
        }
        11 => {
            expect_flags(first, 0)?;
            let pkid = pkid(r)?;
            let props = if v5 { Properties::decode(r, PropCtx::UnsubAck)? } else { Properties::default() };
            let codes = body[r.pos()..].to_vec();
            return Ok(Packet::UnsubAck(UnsubAck { pkid, codes, props }));
        }
        12 => {
            expect_flags(first, 0)?;
            Packet::PingReq
        }
        13 => {
            expect_flags(first, 0)?;
            Packet::PingResp
        }
        14 => {
            expect_flags(first, 0)?;
            let (code, props) = if v5 && !r.is_empty() {
                let code = r.u8()?;
                let props = if r.is_empty() { Properties::default() } else { Properties::decode(r, PropCtx::Disconnect)? };
                (code, props)
            } else {
                (0, Properties::default())
            };
            Packet::Disconnect(Disconnect { code, props })
        }
        15 if v5 => {
            expect_flags(first, 0)?;
            let (code, props) = if r.is_empty() {
                (0, Properties::default())
            } else {
                let code = r.u8()?;
                let props = if r.is_empty() { Properties::default() } else { Properties::decode(r, PropCtx::Auth)? };
                (code, props)
            };
            Packet::Auth(Auth { code, props })
        }
        _ => return Err(DecodeError::malformed("reserved packet type")),
    };
    finish(r)?;
    Ok(packet)
}

fn ack(r: &mut Reader<'_>, v5: bool) -> Result<Ack, DecodeError> {
    let pkid = pkid(r)?;
    let mut a = Ack::new(pkid, 0);
    if v5 && !r.is_empty() {
        a.code = r.u8()?;
        if !r.is_empty() {
            a.props = Properties::decode(r, PropCtx::Ack)?;
        }
    }
    Ok(a)
}

fn publish(first: u8, body: &Bytes, v5: bool) -> Result<Packet, DecodeError> {
    let dup = first & 0x08 != 0;
    let qos = QoS::from_u8((first >> 1) & 0x03).ok_or(DecodeError::malformed("PUBLISH with QoS 3"))?;
    let retain = first & 0x01 != 0;
    if dup && qos == QoS::AtMostOnce {
        return Err(DecodeError::malformed("DUP set on QoS 0 PUBLISH"));
    }
    let mut r = Reader::new(body);
    let topic = r.string()?;
    if !topic::valid_topic_name_or_empty(&topic) {
        return Err(DecodeError::new(reason::TOPIC_NAME_INVALID, "invalid topic name"));
    }
    let pkid = if qos == QoS::AtMostOnce { 0 } else { pkid(&mut r)? };
    let props = if v5 {
        let p = Properties::decode(&mut r, PropCtx::Publish)?;
        if p.is_empty() {
            None
        } else {
            Some(Box::new(p))
        }
    } else {
        None
    };
    let payload = body.slice(r.pos()..);
    if let Some(p) = &props {
        if p.payload_format_indicator == Some(1) && std::str::from_utf8(&payload).is_err() {
            return Err(DecodeError::new(reason::PAYLOAD_FORMAT_INVALID, "payload is not UTF-8 as its format indicator says"));
        }
    }
    if topic.is_empty() && props.as_ref().and_then(|p| p.topic_alias).is_none() {
        return Err(DecodeError::protocol("empty topic name without topic alias"));
    }
    Ok(Packet::Publish(Publish { dup, qos, retain, topic, pkid, props, payload }))
}

fn subscribe(r: &mut Reader<'_>, v5: bool) -> Result<Subscribe, DecodeError> {
    let pkid = pkid(r)?;
    let props = if v5 { Properties::decode(r, PropCtx::Subscribe)? } else { Properties::default() };
    let mut filters = Vec::new();
    while !r.is_empty() {
        let f = r.string()?;
        let o = r.u8()?;
        let reserved = if v5 { 0xC0 } else { 0xFC };
        if o & reserved != 0 {
            return Err(DecodeError::malformed("reserved subscription option bits set"));
        }
        let qos = QoS::from_u8(o & 0x03).ok_or(DecodeError::malformed("subscription QoS 3"))?;
        let retain_handling = match (o >> 4) & 0x03 {
            0 => RetainHandling::SendAtSubscribe,
            1 => RetainHandling::SendIfNew,
            2 => RetainHandling::DoNotSend,
            _ => return Err(DecodeError::protocol("retain handling 3")),
        };
        let opts = SubOptions { qos, no_local: o & 0x04 != 0, retain_as_published: o & 0x08 != 0, retain_handling };
        // An invalid filter is refused per entry in SUBACK (0x8F / 0x80) by the session, not here.
        if opts.no_local && f.starts_with("$share/") {
            return Err(DecodeError::protocol("No Local on a shared subscription"));
        }
        filters.push((f, opts));
    }
    if filters.is_empty() {
        return Err(DecodeError::protocol("SUBSCRIBE without topic filters"));
    }
    Ok(Subscribe { pkid, filters, props })
}

fn connect(r: &mut Reader<'_>) -> Result<Connect, DecodeError> {
    let name = r.binary_slice()?;
    let level = r.u8()?;
    let protocol = match (name, level) {
        (b"MQTT", 4) => Protocol::V4,
        (b"MQTT", 5) => Protocol::V5,
        (b"MQTT", _) | (b"MQIsdp", _) => {
            return Err(DecodeError { code: reason::UNSUPPORTED_PROTOCOL_VERSION, msg: "unsupported protocol level", level })
        }
        _ => return Err(DecodeError::protocol("unknown protocol name")),
    };
    // Errors past this point carry the level, so a 5.0 client can be told why in a CONNACK.
    connect_body(r, protocol).map_err(|mut e| {
        e.level = level;
        e
    })
}

fn connect_body(r: &mut Reader<'_>, protocol: Protocol) -> Result<Connect, DecodeError> {
    let v5 = protocol == Protocol::V5;
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::malformed("CONNECT reserved flag set"));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(DecodeError::malformed("will QoS/retain set without will flag"));
    }
    let will_qos = QoS::from_u8(will_qos).ok_or(DecodeError::malformed("will QoS 3"))?;
    if !v5 && password_flag && !username_flag {
        return Err(DecodeError::malformed("password flag without user name flag"));
    }
    let keep_alive = r.u16()?;
    let props = if v5 { Properties::decode(r, PropCtx::Connect)? } else { Properties::default() };
    let client_id = r.string()?;
    let will = if will_flag {
        let wprops = if v5 { Properties::decode(r, PropCtx::Will)? } else { Properties::default() };
        let topic = r.string()?;
        if !topic::valid_topic_name(&topic) {
            return Err(DecodeError::new(reason::TOPIC_NAME_INVALID, "invalid will topic"));
        }
        let payload = r.binary()?;
        if wprops.payload_format_indicator == Some(1) && std::str::from_utf8(&payload).is_err() {
            return Err(DecodeError::new(reason::PAYLOAD_FORMAT_INVALID, "will payload is not UTF-8"));
        }
        Some(Will { topic, payload, qos: will_qos, retain: will_retain, props: wprops })
    } else {
        None
    };
    let username = if username_flag { Some(r.string()?) } else { None };
    let password = if password_flag { Some(r.binary()?) } else { None };
    Ok(Connect { protocol, clean_start, keep_alive, client_id, will, username, password, props })
}
