//! The cluster wire codec: the one place that knows how node-to-node messages look as bytes.
//!
//! A frame is `"TD"` · wire version (u16 LE) · sender name (u16 LE length + UTF-8) · body
//! (bincode 2, standard config, length-limited). The header is version-independent, so a node
//! can always say *who* speaks an incompatible version before refusing it. Decoding never
//! panics: every failure is a [`WireError`] that the caller logs and drops.
//!
//! **Versions.** A build speaks every version in [`OLDEST`]`..=`[`VERSION`] (capped by
//! `cluster.wire_version`), so builds N-1 and N form one cluster and a rolling upgrade never
//! has two nodes that cannot talk. Each link starts at [`OLDEST`]; a node that speaks more
//! says so with [`Body::Versions`] after each `Hello`, and both ends then write the highest
//! version both speak (per peer; a frame is read at the version its header names). A
//! build that speaks only version 1 does not know `Versions`: it drops that one frame (its log
//! says "undecodable cluster frame" once per introduction) and is written to at version 1.
//! Layout changes between versions live here, keyed on [`writing`]:
//!
//! | version | change |
//! |---|---|
//! | 1 | the first |
//! | 2 | a forwarded publish carries its "not to its own device" mark, so a device's client attributes and its own RPC requests do not come back to its sessions on other nodes; `Versions` |
//! | 3 | `Draining`: a node about to stop says so before it closes its connections (no layout change; sent only to peers at version 3) |
//! | 4 | `HandOverFailed`, `ClaimRefused`: a session that did not answer its hand-over in time stays with its owner and the claim is refused (sent only to peers at version 4; version-3 peers hear "no state", as before) |
use std::cell::Cell;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::message::{Delivery, Message};
use crate::storage::state::SessionSnapshot;

/// The newest wire version this build speaks. Bump on any incompatible change of [`Body`],
/// keep writing and reading the previous one (see the table above), and raise [`OLDEST`] only
/// once no supported build needs it.
pub const VERSION: u16 = 4;
/// The oldest wire version this build still speaks (the previous build's newest).
pub const OLDEST: u16 = 1;
const MAGIC: [u8; 2] = *b"TD";
/// Upper bound of one decoded frame body; the senders batch below it.
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

thread_local! {
    /// The version the frame being encoded or decoded on this thread is written in.
    static AT: Cell<u16> = const { Cell::new(VERSION) };
}

/// The wire version of the frame being encoded or decoded (for version-dependent layouts).
pub fn writing() -> u16 {
    AT.with(|c| c.get())
}

fn at<T>(version: u16, f: impl FnOnce() -> T) -> T {
    let prev = AT.with(|c| c.replace(version));
    let out = f();
    AT.with(|c| c.set(prev));
    out
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WireError {
    #[error("frame too short or not a thingsd cluster frame")]
    NotAFrame,
    #[error("node {from:?} writes cluster wire version {version}; this node speaks {OLDEST} to {newest}")]
    Version { from: String, version: u16, newest: u16 },
    #[error("undecodable frame from {from:?}: {reason}")]
    Body { from: String, reason: String },
}

/// Hybrid logical clock timestamp: wall-clock ms, a logical counter, and the node as tiebreak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct Hlc {
    pub ms: u64,
    pub counter: u32,
    pub node: u64,
}

/// A publish forwarded to a node with matching routes; `shared` names the `$share/…` groups
/// that node was chosen to serve for this message (its non-shared subscribers always get it).
/// From version 2 on, it also carries `msg.not_to_own_device` (which `Message` itself never
/// writes: it is not stored).
#[derive(Debug, Clone)]
pub struct Forward {
    pub msg: Arc<Message>,
    pub shared: Vec<Arc<str>>,
    /// A re-routed message that was on its way to this (lost) node: only sessions adopted
    /// from it receive it.
    pub adopted_from: Option<Arc<str>>,
}

const FORWARD_FIELDS: [&str; 4] = ["msg", "shared", "adopted_from", "not_to_own_device"];

fn forward_fields() -> &'static [&'static str] {
    &FORWARD_FIELDS[..if writing() >= 2 { 4 } else { 3 }]
}

impl Serialize for Forward {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let fields = forward_fields();
        let mut st = s.serialize_struct("Forward", fields.len())?;
        st.serialize_field(fields[0], &*self.msg)?;
        st.serialize_field(fields[1], &self.shared)?;
        st.serialize_field(fields[2], &self.adopted_from)?;
        if fields.len() > 3 {
            st.serialize_field(fields[3], &self.msg.not_to_own_device)?;
        }
        st.end()
    }
}

impl<'de> Deserialize<'de> for Forward {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields(usize);
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = Forward;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "a forwarded publish of {} fields", self.0)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Forward, A::Error> {
                let short = |i: usize| serde::de::Error::invalid_length(i, &"a whole forwarded publish");
                let mut msg: Message = seq.next_element()?.ok_or_else(|| short(0))?;
                let shared = seq.next_element()?.ok_or_else(|| short(1))?;
                let adopted_from = seq.next_element()?.ok_or_else(|| short(2))?;
                if self.0 > 3 {
                    msg.not_to_own_device = seq.next_element()?.ok_or_else(|| short(3))?;
                }
                Ok(Forward { msg: Arc::new(msg), shared, adopted_from })
            }
        }
        let fields = forward_fields();
        d.deserialize_struct("Forward", fields, Fields(fields.len()))
    }
}

/// One retained topic's state; `msg: None` is a deletion (kept as a tombstone for convergence).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetainedEntry {
    pub topic: Arc<str>,
    pub hlc: Hlc,
    pub msg: Option<Arc<Message>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Body {
    /// Sent when a peer appears (and answered once): who I am, where I listen, whom I know.
    Hello {
        incarnation: u64,
        addr: String,
        members: Vec<(String, String)>,
        reply: bool,
    },
    Heartbeat {
        incarnation: u64,
    },
    /// Route changes of the sender: (key, a persistent session subscribes). `reset` replaces
    /// everything known of the sender; `ack` asks for a [`Body::RouteAck`] once applied.
    Routes {
        reset: bool,
        add: Vec<(Arc<str>, bool)>,
        del: Vec<Arc<str>>,
        ack: Option<u64>,
    },
    RouteAck(u64),
    /// Forwarded publishes. The receiver answers [`Body::ForwardAck`] once they are routed,
    /// congested subscribers have caught up (bounded) and every copy for a persistent session
    /// is on its backup node: flow control and durability in one.
    Publish {
        batch: Vec<Forward>,
        ack: u64,
    },
    ForwardAck(u64),
    Retained(Vec<RetainedEntry>),
    /// (topic, clock) of every retained entry and tombstone the sender has; the receiver answers
    /// with the entries the sender lacks or has older (both sides send one on link-up).
    RetainedDigest(Vec<(Arc<str>, Hlc)>),
    /// The sender is leaving the cluster on purpose (its sessions' replicas are fresh); the
    /// receiver answers `LeaveAck` and then treats it as down (adopting its sessions).
    Leave {
        ack: u64,
    },
    LeaveAck(u64),
    /// Registrar → announcer: another live node owns this client's session; drop your copy.
    NotYours {
        client: Arc<str>,
    },

    // Session ownership. Every client id has a registrar node (rendezvous hash over live
    // members) that serialises connects for it and hands out growing generations.
    /// A client connects on the sender: who owned its session?
    Claim {
        client: Arc<str>,
        req: u64,
        clean: bool,
    },
    /// Registrar → claimant: the new generation, the previous owner (if another node) and the
    /// session state it handed over.
    Claimed {
        client: Arc<str>,
        req: u64,
        gen: u64,
        from: Option<String>,
        state: Option<Box<SessionSnapshot>>,
    },
    /// Claimant → registrar: the hand-over is complete; the next claim may proceed.
    ClaimDone {
        client: Arc<str>,
        gen: u64,
    },
    /// Registrar → previous owner: close the client, give its state up (keep buffering
    /// deliveries until `Release`).
    HandOver {
        client: Arc<str>,
        gen: u64,
        to: String,
        clean: bool,
    },
    /// Previous owner → registrar.
    /// `moving`: the state comes from a live session that buffers until `Release` (not from a replica).
    HandedOver {
        client: Arc<str>,
        gen: u64,
        state: Option<Box<SessionSnapshot>>,
        moving: bool,
    },
    /// New owner → previous owner: my routes are in place everywhere.
    Release {
        client: Arc<str>,
        gen: u64,
    },
    /// Previous owner → new owner: what arrived for the client during the hand-over, in order.
    Flush {
        client: Arc<str>,
        gen: u64,
        deliveries: Vec<Delivery>,
    },
    /// Owner → registrar (after membership changes): these sessions live on the sender.
    Owned(Vec<(Arc<str>, u64)>),
    /// Owner → registrar: the session ended.
    Disowned {
        client: Arc<str>,
        gen: u64,
    },

    // Durable sessions: each persistent session's owner keeps a replica on one backup node.
    /// Full state (replaces the replica and its log).
    BackupState {
        client: Arc<str>,
        state: Box<SessionSnapshot>,
    },
    /// Deliveries since the last state; answer `BackupAck(ack)` once stored.
    BackupAppend {
        client: Arc<str>,
        deliveries: Vec<Delivery>,
        ack: u64,
    },
    BackupAck(u64),
    BackupDrop {
        client: Arc<str>,
    },
    /// The device registry changed (appended variant: an older node logs and drops it).
    Device(DeviceNotice),
    /// An operator's request (JSON of `ops::Query`), answered with `AdminReply`.
    Admin {
        id: u64,
        req: String,
    },
    /// The answer (JSON) or an error message.
    AdminReply {
        id: u64,
        ok: bool,
        body: String,
    },
    /// The sender leaves the cluster for good (operator): stop dialling it. Followed by `Leave`.
    Departed,
    /// Packets of a traced client, for the trace `id` the receiver started (JSON lines).
    Trace {
        id: u64,
        events: Vec<String>,
    },
    /// A device's values for alert rule `rule`, which runs on the receiver (JSON object).
    AlertEvent {
        rule: i64,
        device_id: i64,
        device: String,
        values: String,
        ts: i64,
    },
    /// The sender has websocket clients: send it live events for a while.
    LiveWant,
    /// A live event (JSON of `live::LiveEvent`).
    Live {
        event: String,
    },
    /// Devices' values for alert rules that run on the receiver, one frame per round: a JSON
    /// array of `{"rules": [ids], "device_id", "device", "values": {…}, "ts"}`. (Nodes of the
    /// build before this variant send `AlertEvent`, which is still understood.)
    AlertEvents {
        events: String,
    },
    /// The wire versions the sender speaks (sent after each `Hello` by nodes that speak more
    /// than version 1; written at the oldest version the link may be at).
    Versions {
        oldest: u16,
        newest: u16,
    },
    /// Version 3: the sender stops soon (a graceful stop). It is no longer a registrar, a
    /// backup or an owner of new work, but it still hands its sessions over as their clients
    /// reconnect elsewhere; `Leave` follows. The receiver answers `LeaveAck`.
    Draining {
        ack: u64,
    },
    /// Version 4: previous owner → registrar: the session did not answer the `HandOver` in
    /// time and stays with the sender, state and all (the claim is refused).
    HandOverFailed {
        client: Arc<str>,
        gen: u64,
    },
    /// Version 4: registrar → claimant: the previous owner kept the session; the claim is
    /// refused (the connecting client is told to retry) and nothing changed hands.
    ClaimRefused {
        client: Arc<str>,
        req: u64,
    },
}

/// The version to write to a peer that said it speaks `(oldest, newest)`, given that this node
/// speaks `OLDEST..=newest`; `None` when the two ranges do not meet. (A peer that never said
/// speaks only version 1: links start at `OLDEST`.)
pub fn agree(newest: u16, (oldest_t, newest_t): (u16, u16)) -> Option<u16> {
    let v = newest.min(newest_t);
    (v >= OLDEST.max(oldest_t)).then_some(v)
}

/// What one node tells the others about devices (also sent over Redis pub/sub as JSON).
/// Externally tagged: bincode cannot decode internally tagged enums.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum DeviceNotice {
    /// A device or its credentials changed: drop cached identities; `kick` closes its connections.
    Changed { device: String, kick: bool },
    /// These credential cache keys are gone.
    Forget { keys: Vec<String> },
    /// A downlink is queued for the device: wake its HTTP long polls and CoAP observers.
    Pending { device: String },
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

/// A frame written in wire `version` (one the receiving peer speaks: see [`agree`]).
pub fn encode(version: u16, from: &str, body: &Body) -> Vec<u8> {
    let name = &from.as_bytes()[..from.len().min(u16::MAX as usize)];
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(name);
    // Encoding our own types into a Vec cannot fail (no limit is hit below MAX_FRAME in practice;
    // if it ever is, the peer gets an empty body and logs it).
    if let Err(e) = at(version, || bincode::serde::encode_into_std_write(body, &mut out, config())) {
        tracing::error!(error = %e, "cannot encode cluster frame");
    }
    out
}

/// Decode a frame written in any version from [`OLDEST`] to `newest` (this node's
/// `cluster.wire_version`): the sender's name and the body.
pub fn decode(b: &[u8], newest: u16) -> Result<(String, Body), WireError> {
    if b.len() < 6 || b[..2] != MAGIC {
        return Err(WireError::NotAFrame);
    }
    let version = u16::from_le_bytes([b[2], b[3]]);
    let n = u16::from_le_bytes([b[4], b[5]]) as usize;
    let name = b.get(6..6 + n).ok_or(WireError::NotAFrame)?;
    let from = String::from_utf8_lossy(name).into_owned();
    if !(OLDEST..=newest).contains(&version) {
        return Err(WireError::Version { from, version, newest });
    }
    let rest = &b[6 + n..];
    match at(version, || bincode::serde::decode_from_slice::<Body, _>(rest, config())) {
        Ok((body, used)) if used == rest.len() => Ok((from, body)),
        Ok(_) => Err(WireError::Body { from, reason: "trailing bytes".into() }),
        Err(e) => Err(WireError::Body { from, reason: e.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn enc(body: &Body) -> Vec<u8> {
        encode(VERSION, "n1", body)
    }

    fn dec(b: &[u8]) -> Result<(String, Body), WireError> {
        decode(b, VERSION)
    }

    #[test]
    fn round_trip() {
        let body = Body::Routes { reset: true, add: vec![(Arc::from("a/+"), true)], del: vec![], ack: Some(7) };
        let (from, back) = dec(&enc(&body)).unwrap();
        assert_eq!(from, "n1");
        assert!(matches!(back, Body::Routes { reset: true, ack: Some(7), .. }));
    }

    #[test]
    fn device_notices_round_trip() {
        for n in [
            DeviceNotice::Changed { device: "d-1".into(), kick: true },
            DeviceNotice::Forget { keys: vec!["cred:token:x".into()] },
            DeviceNotice::Pending { device: "d-2".into() },
        ] {
            let (_, back) = dec(&enc(&Body::Device(n.clone()))).unwrap();
            assert!(matches!(back, Body::Device(b) if b == n));
        }
    }

    #[test]
    fn admin_frames_round_trip() {
        let (_, back) = dec(&enc(&Body::Admin { id: 3, req: "{\"op\":\"node\"}".into() })).unwrap();
        assert!(matches!(back, Body::Admin { id: 3, req } if req.contains("node")));
        let (_, back) = dec(&enc(&Body::AdminReply { id: 3, ok: false, body: "no".into() })).unwrap();
        assert!(matches!(back, Body::AdminReply { id: 3, ok: false, body } if body == "no"));
        let (_, back) = dec(&enc(&Body::AlertEvent { rule: 4, device_id: 2, device: "d".into(), values: "{}".into(), ts: 5 })).unwrap();
        assert!(matches!(back, Body::AlertEvent { rule: 4, device_id: 2, ts: 5, .. }));
        let (_, back) = dec(&enc(&Body::AlertEvents { events: "[]".into() })).unwrap();
        assert!(matches!(back, Body::AlertEvents { events } if events == "[]"));
        let (_, back) = dec(&enc(&Body::Trace { id: 9, events: vec!["{}".into()] })).unwrap();
        assert!(matches!(back, Body::Trace { id: 9, events } if events.len() == 1));
    }

    #[test]
    fn other_version_is_named() {
        let f = encode(VERSION + 1, "n9", &Body::Heartbeat { incarnation: 1 });
        assert_eq!(dec(&f).unwrap_err(), WireError::Version { from: "n9".into(), version: VERSION + 1, newest: VERSION });
        let f = encode(0, "n9", &Body::Heartbeat { incarnation: 1 });
        assert!(matches!(dec(&f), Err(WireError::Version { version: 0, .. })));
        // A node capped at version 1 (`cluster.wire_version = 1`) refuses version 2, as the
        // builds before version 2 do.
        let f = encode(2, "n9", &Body::Heartbeat { incarnation: 1 });
        assert!(matches!(decode(&f, 1), Err(WireError::Version { version: 2, newest: 1, .. })));
        assert!(decode(&f, 2).is_ok());
    }

    fn forward(own: bool) -> Body {
        let mut m = Message::from_node("v1/devices/d1/attributes", &b"{\"a\":1}"[..], crate::protocols::mqtt::QoS::AtLeastOnce, false);
        m.id = 77;
        m.publisher = Some(Arc::from("d1\0c"));
        m.not_to_own_device = own;
        Body::Publish { batch: vec![Forward { msg: Arc::new(m), shared: vec![Arc::from("g")], adopted_from: None }], ack: 5 }
    }

    fn own_mark(b: &Body) -> bool {
        match b {
            Body::Publish { batch, .. } => batch[0].msg.not_to_own_device,
            _ => panic!("not a publish"),
        }
    }

    /// Version 1 as the builds before version 2 wrote it (bytes taken from that codec): this
    /// build writes exactly those bytes at version 1, and reads them.
    #[test]
    fn version_1_is_byte_for_byte_the_released_one() {
        const RELEASED: &str =
            "5444010002006e3104014d1876312f646576696365732f64312f61747472696275746573077b2261223a317d010000000104643100630101670005";
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        assert_eq!(hex(&encode(1, "n1", &forward(true))), RELEASED);
        let bytes: Vec<u8> = (0..RELEASED.len()).step_by(2).map(|i| u8::from_str_radix(&RELEASED[i..i + 2], 16).unwrap()).collect();
        let (from, body) = decode(&bytes, VERSION).unwrap();
        assert_eq!(from, "n1");
        assert!(matches!(&body, Body::Publish { batch, ack: 5 } if batch[0].msg.id == 77 && &*batch[0].shared[0] == "g"));
        assert!(!own_mark(&body), "version 1 does not carry the mark");
        // Bodies without a forward are the same in both versions, past the header.
        let hb = Body::Heartbeat { incarnation: 9 };
        assert_eq!(encode(1, "n1", &hb)[4..], encode(2, "n1", &hb)[4..]);
    }

    #[test]
    fn version_2_carries_the_own_device_mark() {
        for own in [true, false] {
            let (_, body) = decode(&encode(2, "n1", &forward(own)), VERSION).unwrap();
            assert_eq!(own_mark(&body), own);
        }
        // Read at the version its header names: a version-1 frame is not read as version 2.
        let (_, body) = decode(&encode(1, "n1", &forward(true)), VERSION).unwrap();
        assert!(!own_mark(&body));
        let mut f = encode(2, "n1", &forward(true));
        f[2] = 1;
        assert!(matches!(decode(&f, VERSION), Err(WireError::Body { .. })), "a version-2 body under a version-1 header is trailing bytes");
    }

    #[test]
    fn versions_are_agreed_per_peer() {
        let (_, back) = decode(&encode(OLDEST, "n1", &Body::Versions { oldest: 1, newest: 2 }), VERSION).unwrap();
        assert!(matches!(back, Body::Versions { oldest: 1, newest: 2 }));
        assert_eq!(agree(2, (1, 1)), Some(1), "a peer that speaks only version 1");
        assert_eq!(agree(2, (1, 2)), Some(2));
        assert_eq!(agree(2, (1, 3)), Some(2));
        assert_eq!(agree(1, (1, 2)), Some(1), "capped by cluster.wire_version");
        assert_eq!(agree(2, (3, 4)), None, "no version in common");
    }

    #[test]
    fn version_4_hand_over_refusals_round_trip() {
        let (_, back) = decode(&encode(4, "n1", &Body::HandOverFailed { client: Arc::from("c\u{0}1"), gen: 9 }), VERSION).unwrap();
        assert!(matches!(back, Body::HandOverFailed { client, gen: 9 } if &*client == "c\u{0}1"));
        let (_, back) = decode(&encode(4, "n1", &Body::ClaimRefused { client: Arc::from("c"), req: 3 }), VERSION).unwrap();
        assert!(matches!(back, Body::ClaimRefused { client, req: 3 } if &*client == "c"));
    }

    #[test]
    fn truncated_and_garbage_are_errors() {
        let f = enc(&Body::Hello { incarnation: 1, addr: "x".into(), members: vec![("a".into(), "b".into())], reply: false });
        for i in 0..f.len() {
            assert!(dec(&f[..i]).is_err());
        }
        assert!(dec(b"").is_err());
        assert!(dec(b"TD\x01\x00\xff\xff").is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5_000))]
        /// Arbitrary bytes (with a valid header, so the body decoder is reached) never panic.
        #[test]
        fn random_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            for v in OLDEST..=VERSION {
                let mut f = encode(v, "n1", &Body::LeaveAck(1));
                f.truncate(8);
                f.extend_from_slice(&body);
                let _ = dec(&f);
            }
        }
    }
}
