//! The cluster wire codec: the one place that knows how node-to-node messages look as bytes.
//!
//! A frame is `"TD"` · wire version (u16 LE) · sender name (u16 LE length + UTF-8) · body
//! (bincode 2, standard config, length-limited). The header is version-independent, so a node
//! can always say *who* speaks an incompatible version before refusing it. Decoding never
//! panics: every failure is a [`WireError`] that the caller logs and drops.
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::message::{Delivery, Message};
use crate::storage::state::SessionSnapshot;

/// Bump on any incompatible change of [`Body`] (and keep the old decoder while both exist).
pub const VERSION: u16 = 1;
const MAGIC: [u8; 2] = *b"TD";
/// Upper bound of one decoded frame body; the senders batch below it.
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WireError {
    #[error("frame too short or not a thingsd cluster frame")]
    NotAFrame,
    #[error("node {from:?} speaks cluster wire version {version}; this node speaks {VERSION}")]
    Version { from: String, version: u16 },
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
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Forward {
    pub msg: Arc<Message>,
    pub shared: Vec<Arc<str>>,
    /// A re-routed message that was on its way to this (lost) node: only sessions adopted
    /// from it receive it.
    pub adopted_from: Option<Arc<str>>,
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

pub fn encode(from: &str, body: &Body) -> Vec<u8> {
    let name = &from.as_bytes()[..from.len().min(u16::MAX as usize)];
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(name);
    // Encoding our own types into a Vec cannot fail (no limit is hit below MAX_FRAME in practice;
    // if it ever is, the peer gets an empty body and logs it).
    if let Err(e) = bincode::serde::encode_into_std_write(body, &mut out, config()) {
        tracing::error!(error = %e, "cannot encode cluster frame");
    }
    out
}

/// Decode a frame: the sender's name and the body.
pub fn decode(b: &[u8]) -> Result<(String, Body), WireError> {
    if b.len() < 6 || b[..2] != MAGIC {
        return Err(WireError::NotAFrame);
    }
    let version = u16::from_le_bytes([b[2], b[3]]);
    let n = u16::from_le_bytes([b[4], b[5]]) as usize;
    let name = b.get(6..6 + n).ok_or(WireError::NotAFrame)?;
    let from = String::from_utf8_lossy(name).into_owned();
    if version != VERSION {
        return Err(WireError::Version { from, version });
    }
    let rest = &b[6 + n..];
    match bincode::serde::decode_from_slice::<Body, _>(rest, config()) {
        Ok((body, used)) if used == rest.len() => Ok((from, body)),
        Ok(_) => Err(WireError::Body { from, reason: "trailing bytes".into() }),
        Err(e) => Err(WireError::Body { from, reason: e.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let body = Body::Routes { reset: true, add: vec![(Arc::from("a/+"), true)], del: vec![], ack: Some(7) };
        let (from, back) = decode(&encode("n1", &body)).unwrap();
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
            let (_, back) = decode(&encode("n1", &Body::Device(n.clone()))).unwrap();
            assert!(matches!(back, Body::Device(b) if b == n));
        }
    }

    #[test]
    fn admin_frames_round_trip() {
        let (_, back) = decode(&encode("n1", &Body::Admin { id: 3, req: "{\"op\":\"node\"}".into() })).unwrap();
        assert!(matches!(back, Body::Admin { id: 3, req } if req.contains("node")));
        let (_, back) = decode(&encode("n1", &Body::AdminReply { id: 3, ok: false, body: "no".into() })).unwrap();
        assert!(matches!(back, Body::AdminReply { id: 3, ok: false, body } if body == "no"));
        let (_, back) =
            decode(&encode("n1", &Body::AlertEvent { rule: 4, device_id: 2, device: "d".into(), values: "{}".into(), ts: 5 })).unwrap();
        assert!(matches!(back, Body::AlertEvent { rule: 4, device_id: 2, ts: 5, .. }));
        let (_, back) = decode(&encode("n1", &Body::AlertEvents { events: "[]".into() })).unwrap();
        assert!(matches!(back, Body::AlertEvents { events } if events == "[]"));
        let (_, back) = decode(&encode("n1", &Body::Trace { id: 9, events: vec!["{}".into()] })).unwrap();
        assert!(matches!(back, Body::Trace { id: 9, events } if events.len() == 1));
    }

    #[test]
    fn other_version_is_named() {
        let mut f = encode("n9", &Body::Heartbeat { incarnation: 1 });
        f[2] = 2;
        assert_eq!(decode(&f).unwrap_err(), WireError::Version { from: "n9".into(), version: 2 });
    }

    #[test]
    fn truncated_and_garbage_are_errors() {
        let f = encode("n1", &Body::Hello { incarnation: 1, addr: "x".into(), members: vec![("a".into(), "b".into())], reply: false });
        for i in 0..f.len() {
            assert!(decode(&f[..i]).is_err());
        }
        assert!(decode(b"").is_err());
        assert!(decode(b"TD\x01\x00\xff\xff").is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5_000))]
        /// Arbitrary bytes (with a valid header, so the body decoder is reached) never panic.
        #[test]
        fn random_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut f = encode("n1", &Body::LeaveAck(1));
            f.truncate(8);
            f.extend_from_slice(&body);
            let _ = decode(&f);
        }
    }
}
