//! MQTT 5.0 properties: one struct, decoded with a per-packet allow-list and duplicate checks.
use bytes::{BufMut, Bytes, BytesMut};

use super::decode::{DecodeError, Reader};
use super::encode::{put_bin, put_str, put_varint, varint_len};

/// All 5.0 properties; absent ones are `None` or empty.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Properties {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub subscription_identifiers: Vec<u32>,
    pub session_expiry_interval: Option<u32>,
    pub assigned_client_identifier: Option<String>,
    pub server_keep_alive: Option<u16>,
    pub authentication_method: Option<String>,
    pub authentication_data: Option<Bytes>,
    pub request_problem_information: Option<u8>,
    pub will_delay_interval: Option<u32>,
    pub request_response_information: Option<u8>,
    pub response_information: Option<String>,
    pub server_reference: Option<String>,
    pub reason_string: Option<String>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub topic_alias: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    pub user_properties: Vec<(String, String)>,
    pub maximum_packet_size: Option<u32>,
    pub wildcard_subscription_available: Option<u8>,
    pub subscription_identifier_available: Option<u8>,
    pub shared_subscription_available: Option<u8>,
}

/// Where a property set appears; decides which identifiers are allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PropCtx {
    Connect,
    ConnAck,
    Publish,
    Will,
    Ack,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    Disconnect,
    Auth,
}

const KNOWN: [u8; 27] = [
    0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x11, 0x12, 0x13, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1A, 0x1C, 0x1F, 0x21, 0x22, 0x23, 0x24, 0x25,
    0x26, 0x27, 0x28, 0x29, 0x2A,
];

static EMPTY: std::sync::OnceLock<Properties> = std::sync::OnceLock::new();

fn allowed(id: u8, ctx: PropCtx) -> bool {
    use PropCtx::*;
    match id {
        0x01 | 0x02 | 0x03 | 0x08 | 0x09 => matches!(ctx, Publish | Will),
        0x0B => matches!(ctx, Publish | Subscribe),
        0x11 => matches!(ctx, Connect | ConnAck | Disconnect),
        0x12 | 0x13 | 0x1A | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => ctx == ConnAck,
        0x15 | 0x16 => matches!(ctx, Connect | ConnAck | Auth),
        0x17 | 0x19 => ctx == Connect,
        0x18 => ctx == Will,
        0x1C => matches!(ctx, ConnAck | Disconnect),
        0x1F => matches!(ctx, ConnAck | Ack | SubAck | UnsubAck | Disconnect | Auth),
        0x21 | 0x22 | 0x27 => matches!(ctx, Connect | ConnAck),
        0x23 => ctx == Publish,
        0x26 => true,
        _ => false,
    }
}

fn set_once<T>(slot: &mut Option<T>, v: T) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::protocol("duplicate property"));
    }
    *slot = Some(v);
    Ok(())
}

fn bool_byte(r: &mut Reader<'_>) -> Result<u8, DecodeError> {
    let v = r.u8()?;
    if v > 1 {
        return Err(DecodeError::protocol("property value must be 0 or 1"));
    }
    Ok(v)
}

impl Properties {
    /// The shared empty property set.
    pub fn empty() -> &'static Properties {
        EMPTY.get_or_init(Properties::default)
    }

    pub fn is_empty(&self) -> bool {
        self == Properties::empty()
    }

    /// Decode a property block (length prefix included) for packet context `ctx`.
    pub(crate) fn decode(r: &mut Reader<'_>, ctx: PropCtx) -> Result<Properties, DecodeError> {
        let len = r.varint()? as usize;
        let mut sub = r.sub(len)?;
        let mut p = Properties::default();
        while !sub.is_empty() {
            let id = sub.varint()?;
            let id = u8::try_from(id).map_err(|_| DecodeError::malformed("unknown property identifier"))?;
            if !KNOWN.contains(&id) {
                return Err(DecodeError::malformed("unknown property identifier"));
            }
            if !allowed(id, ctx) {
                return Err(DecodeError::protocol("property not allowed in this packet"));
            }
            let r = &mut sub;
            match id {
                0x01 => set_once(&mut p.payload_format_indicator, bool_byte(r)?)?,
                0x02 => set_once(&mut p.message_expiry_interval, r.u32()?)?,
                0x03 => set_once(&mut p.content_type, r.string()?)?,
                0x08 => {
                    let t = r.string()?;
                    if !super::topic::valid_topic_name(&t) {
                        return Err(DecodeError::protocol("response topic must be a valid topic name"));
                    }
                    set_once(&mut p.response_topic, t)?
                }
                0x09 => set_once(&mut p.correlation_data, r.binary()?)?,
                0x0B => {
                    let v = r.varint()?;
                    if v == 0 {
                        return Err(DecodeError::protocol("subscription identifier 0"));
                    }
                    if ctx == PropCtx::Subscribe && !p.subscription_identifiers.is_empty() {
                        return Err(DecodeError::protocol("duplicate subscription identifier"));
                    }
                    p.subscription_identifiers.push(v);
                }
                0x11 => set_once(&mut p.session_expiry_interval, r.u32()?)?,
                0x12 => set_once(&mut p.assigned_client_identifier, r.string()?)?,
                0x13 => set_once(&mut p.server_keep_alive, r.u16()?)?,
                0x15 => set_once(&mut p.authentication_method, r.string()?)?,
                0x16 => set_once(&mut p.authentication_data, r.binary()?)?,
                0x17 => set_once(&mut p.request_problem_information, bool_byte(r)?)?,
                0x18 => set_once(&mut p.will_delay_interval, r.u32()?)?,
                0x19 => set_once(&mut p.request_response_information, bool_byte(r)?)?,
                0x1A => set_once(&mut p.response_information, r.string()?)?,
                0x1C => set_once(&mut p.server_reference, r.string()?)?,
                0x1F => set_once(&mut p.reason_string, r.string()?)?,
                0x21 => {
                    let v = r.u16()?;
                    if v == 0 {
                        return Err(DecodeError::protocol("receive maximum 0"));
                    }
                    set_once(&mut p.receive_maximum, v)?
                }
                0x22 => set_once(&mut p.topic_alias_maximum, r.u16()?)?,
                0x23 => {
                    let v = r.u16()?;
                    if v == 0 {
                        return Err(DecodeError::new(super::reason::TOPIC_ALIAS_INVALID, "topic alias 0"));
                    }
                    set_once(&mut p.topic_alias, v)?
                }
                0x24 => set_once(&mut p.maximum_qos, bool_byte(r)?)?,
                0x25 => set_once(&mut p.retain_available, bool_byte(r)?)?,
                0x26 => {
                    let k = r.string()?;
                    let v = r.string()?;
                    p.user_properties.push((k, v));
                }
                0x27 => {
                    let v = r.u32()?;
                    if v == 0 {
                        return Err(DecodeError::protocol("maximum packet size 0"));
                    }
                    set_once(&mut p.maximum_packet_size, v)?
                }
                0x28 => set_once(&mut p.wildcard_subscription_available, bool_byte(r)?)?,
                0x29 => set_once(&mut p.subscription_identifier_available, bool_byte(r)?)?,
                0x2A => set_once(&mut p.shared_subscription_available, bool_byte(r)?)?,
                _ => return Err(DecodeError::malformed("unknown property identifier")),
            }
        }
        Ok(p)
    }

    /// Encoded size of the property block without its length prefix.
    pub(crate) fn body_len(&self) -> usize {
        let s = |o: &Option<String>| o.as_ref().map_or(0, |v| 3 + v.len());
        let b = |o: &Option<Bytes>| o.as_ref().map_or(0, |v| 3 + v.len());
        let n1 = |o: &Option<u8>| o.map_or(0, |_| 2);
        let n2 = |o: &Option<u16>| o.map_or(0, |_| 3);
        let n4 = |o: &Option<u32>| o.map_or(0, |_| 5);
        n1(&self.payload_format_indicator)
            + n4(&self.message_expiry_interval)
            + s(&self.content_type)
            + s(&self.response_topic)
            + b(&self.correlation_data)
            + self.subscription_identifiers.iter().map(|v| 1 + varint_len(*v as usize)).sum::<usize>()
            + n4(&self.session_expiry_interval)
            + s(&self.assigned_client_identifier)
            + n2(&self.server_keep_alive)
            + s(&self.authentication_method)
            + b(&self.authentication_data)
            + n1(&self.request_problem_information)
            + n4(&self.will_delay_interval)
            + n1(&self.request_response_information)
            + s(&self.response_information)
            + s(&self.server_reference)
            + s(&self.reason_string)
            + n2(&self.receive_maximum)
            + n2(&self.topic_alias_maximum)
            + n2(&self.topic_alias)
            + n1(&self.maximum_qos)
            + n1(&self.retain_available)
            + self.user_properties.iter().map(|(k, v)| 5 + k.len() + v.len()).sum::<usize>()
            + n4(&self.maximum_packet_size)
            + n1(&self.wildcard_subscription_available)
            + n1(&self.subscription_identifier_available)
            + n1(&self.shared_subscription_available)
    }

    /// Encoded size including the length prefix.
    pub(crate) fn full_len(&self) -> usize {
        let n = self.body_len();
        n + varint_len(n)
    }

    pub(crate) fn encode(&self, buf: &mut BytesMut) {
        put_varint(buf, self.body_len());
        let u8p = |buf: &mut BytesMut, id: u8, o: Option<u8>| {
            if let Some(v) = o {
                buf.put_u8(id);
                buf.put_u8(v);
            }
        };
        let u16p = |buf: &mut BytesMut, id: u8, o: Option<u16>| {
            if let Some(v) = o {
                buf.put_u8(id);
                buf.put_u16(v);
            }
        };
        let u32p = |buf: &mut BytesMut, id: u8, o: Option<u32>| {
            if let Some(v) = o {
                buf.put_u8(id);
                buf.put_u32(v);
            }
        };
        let strp = |buf: &mut BytesMut, id: u8, o: &Option<String>| {
            if let Some(v) = o {
                buf.put_u8(id);
                put_str(buf, v);
            }
        };
        let binp = |buf: &mut BytesMut, id: u8, o: &Option<Bytes>| {
            if let Some(v) = o {
                buf.put_u8(id);
                put_bin(buf, v);
            }
        };
        u8p(buf, 0x01, self.payload_format_indicator);
        u32p(buf, 0x02, self.message_expiry_interval);
        strp(buf, 0x03, &self.content_type);
        strp(buf, 0x08, &self.response_topic);
        binp(buf, 0x09, &self.correlation_data);
        for v in &self.subscription_identifiers {
            buf.put_u8(0x0B);
            put_varint(buf, *v as usize);
        }
        u32p(buf, 0x11, self.session_expiry_interval);
        strp(buf, 0x12, &self.assigned_client_identifier);
        u16p(buf, 0x13, self.server_keep_alive);
        strp(buf, 0x15, &self.authentication_method);
        binp(buf, 0x16, &self.authentication_data);
        u8p(buf, 0x17, self.request_problem_information);
        u32p(buf, 0x18, self.will_delay_interval);
        u8p(buf, 0x19, self.request_response_information);
        strp(buf, 0x1A, &self.response_information);
        strp(buf, 0x1C, &self.server_reference);
        strp(buf, 0x1F, &self.reason_string);
        u16p(buf, 0x21, self.receive_maximum);
        u16p(buf, 0x22, self.topic_alias_maximum);
        u16p(buf, 0x23, self.topic_alias);
        u8p(buf, 0x24, self.maximum_qos);
        u8p(buf, 0x25, self.retain_available);
        for (k, v) in &self.user_properties {
            buf.put_u8(0x26);
            put_str(buf, k);
            put_str(buf, v);
        }
        u32p(buf, 0x27, self.maximum_packet_size);
        u8p(buf, 0x28, self.wildcard_subscription_available);
        u8p(buf, 0x29, self.subscription_identifier_available);
        u8p(buf, 0x2A, self.shared_subscription_available);
    }
}
