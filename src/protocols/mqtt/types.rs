//! Typed MQTT packets shared by 3.1.1 and 5.0; `Properties` are empty on 3.1.1.
use bytes::Bytes;

use super::props::Properties;

/// Protocol level from CONNECT: 4 is MQTT 3.1.1, 5 is MQTT 5.0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Protocol {
    V4,
    V5,
}

/// Quality of service level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    /// Parse a 2-bit QoS value; 3 is invalid.
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// Last will carried in CONNECT.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub props: Properties,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Connect {
    pub protocol: Protocol,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub client_id: String,
    pub will: Option<Will>,
    pub username: Option<String>,
    pub password: Option<Bytes>,
    pub props: Properties,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConnAck {
    pub session_present: bool,
    /// 5.0 reason code; mapped to a 3.1.1 return code when encoded for 3.1.1.
    pub code: u8,
    pub props: Properties,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    pub topic: String,
    pub pkid: u16,
    pub props: Option<Box<Properties>>,
    pub payload: Bytes,
}

impl Publish {
    /// Properties of this publish, or the empty set.
    pub fn props(&self) -> &Properties {
        self.props.as_deref().unwrap_or(Properties::empty())
    }
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP share one shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Ack {
    pub pkid: u16,
    pub code: u8,
    pub props: Properties,
}

impl Ack {
    pub fn new(pkid: u16, code: u8) -> Ack {
        Ack { pkid, code, props: Properties::default() }
    }
}

/// 5.0 Retain Handling option of a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RetainHandling {
    SendAtSubscribe = 0,
    SendIfNew = 1,
    DoNotSend = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SubOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: RetainHandling,
}

impl SubOptions {
    pub fn qos(qos: QoS) -> SubOptions {
        SubOptions { qos, no_local: false, retain_as_published: false, retain_handling: RetainHandling::SendAtSubscribe }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Subscribe {
    pub pkid: u16,
    pub filters: Vec<(String, SubOptions)>,
    pub props: Properties,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SubAck {
    pub pkid: u16,
    pub codes: Vec<u8>,
    pub props: Properties,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Unsubscribe {
    pub pkid: u16,
    pub filters: Vec<String>,
    pub props: Properties,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UnsubAck {
    pub pkid: u16,
    pub codes: Vec<u8>,
    pub props: Properties,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Disconnect {
    pub code: u8,
    pub props: Properties,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Auth {
    pub code: u8,
    pub props: Properties,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(Ack),
    PubRec(Ack),
    PubRel(Ack),
    PubComp(Ack),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Auth),
}

impl Packet {
    /// The MQTT control packet type (1 CONNECT … 15 AUTH).
    pub fn type_code(&self) -> usize {
        match self {
            Packet::Connect(_) => 1,
            Packet::ConnAck(_) => 2,
            Packet::Publish(_) => 3,
            Packet::PubAck(_) => 4,
            Packet::PubRec(_) => 5,
            Packet::PubRel(_) => 6,
            Packet::PubComp(_) => 7,
            Packet::Subscribe(_) => 8,
            Packet::SubAck(_) => 9,
            Packet::Unsubscribe(_) => 10,
            Packet::UnsubAck(_) => 11,
            Packet::PingReq => 12,
            Packet::PingResp => 13,
            Packet::Disconnect(_) => 14,
            Packet::Auth(_) => 15,
        }
    }

    /// Short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "CONNECT",
            Packet::ConnAck(_) => "CONNACK",
            Packet::Publish(_) => "PUBLISH",
            Packet::PubAck(_) => "PUBACK",
            Packet::PubRec(_) => "PUBREC",
            Packet::PubRel(_) => "PUBREL",
            Packet::PubComp(_) => "PUBCOMP",
            Packet::Subscribe(_) => "SUBSCRIBE",
            Packet::SubAck(_) => "SUBACK",
            Packet::Unsubscribe(_) => "UNSUBSCRIBE",
            Packet::UnsubAck(_) => "UNSUBACK",
            Packet::PingReq => "PINGREQ",
            Packet::PingResp => "PINGRESP",
            Packet::Disconnect(_) => "DISCONNECT",
            Packet::Auth(_) => "AUTH",
        }
    }
}
