//! What the cluster actor handles: frames from other nodes, and requests from this node.
use std::sync::Arc;

use ractor::message::{BoxedDowncastErr, SerializedMessage};
use ractor::RpcReplyPort;

use super::*;

pub enum ClusterMessage {
    /// A frame from another node (or to it, when sent to a remote actor).
    Wire(Vec<u8>),
    Local(Local),
}

impl ractor::Message for ClusterMessage {
    fn serializable() -> bool {
        true
    }
    fn serialize(self) -> Result<SerializedMessage, BoxedDowncastErr> {
        match self {
            ClusterMessage::Wire(args) => Ok(SerializedMessage::Cast { variant: "w".into(), args, metadata: None }),
            ClusterMessage::Local(_) => Err(BoxedDowncastErr),
        }
    }
    fn deserialize(m: SerializedMessage) -> Result<Self, BoxedDowncastErr> {
        match m {
            SerializedMessage::Cast { args, .. } => Ok(ClusterMessage::Wire(args)),
            _ => Err(BoxedDowncastErr),
        }
    }
}

/// The registry's answer to a registrar's `HandOver`: the session's state, `None` when it had
/// none to give (no session here, or Clean Start), `Err` when it did not answer in time (the
/// session stays here and the claim is refused).
pub struct HandOverAnswer {
    pub client: Arc<str>,
    pub gen: u64,
    pub registrar: String,
    pub clean: bool,
    pub state: Result<Option<Box<SessionSnapshot>>, ()>,
}

pub enum Local {
    /// The heartbeat tick, with when it was queued (see `ClusterState::heard`).
    Tick(Instant),
    /// Route changes and retained updates are queued in `Cluster::outbox`: take them all.
    Outbox,
    /// Broadcast a device notice.
    Notice(wire::DeviceNotice),
    Dialed {
        addr: String,
        ok: bool,
    },
    /// Say goodbye to every peer (graceful leave).
    Leave(RpcReplyPort<()>),
    /// A graceful stop begins: tell the peers (`Body::Draining`) before connections close.
    Drain(RpcReplyPort<()>),
    Members(RpcReplyPort<Vec<MemberInfo>>),
    /// A client connects here: ask its registrar (replies with generation and handed-over state).
    Claim {
        client: Arc<str>,
        clean: bool,
        reply: RpcReplyPort<Claimed>,
    },
    ClaimDone {
        client: Arc<str>,
        gen: u64,
    },
    /// The new session's routes are in place: tell the previous owner to flush and let go.
    Release {
        client: Arc<str>,
        gen: u64,
        to: String,
    },
    /// The registry's answer to a registrar's `HandOver`.
    HandedOver(HandOverAnswer),
    BackupState {
        to: Arc<str>,
        client: Arc<str>,
        state: Box<SessionSnapshot>,
    },
    BackupAppend {
        to: Arc<str>,
        client: Arc<str>,
        deliveries: Vec<Delivery>,
        tokens: Vec<Arc<DurableToken>>,
    },
    BackupDrop {
        to: Arc<str>,
        client: Arc<str>,
    },
    /// A moving session's last deliveries, for its new owner.
    Flush {
        client: Arc<str>,
        gen: u64,
        to: String,
        deliveries: Vec<Delivery>,
    },
    /// Reply once every live peer has processed everything it sent us before now.
    Barrier(RpcReplyPort<()>),
    /// Sessions this node owns (sent to their registrars after membership changes).
    Owned(Vec<(Arc<str>, u64)>, Option<RpcReplyPort<()>>),
    Disowned {
        client: Arc<str>,
        gen: u64,
    },
    /// Send a frame to a node (from a task).
    Send {
        to: String,
        body: Box<Body>,
    },
    /// An operator's request for another node (JSON of `ops::Query`); the reply is its JSON answer.
    Admin {
        to: String,
        req: String,
        reply: RpcReplyPort<Result<String, String>>,
    },
    /// Dial this address (an operator's `cluster join`); also ends a `leave`.
    Join(String),
    /// Leave the cluster for good (an operator's `cluster leave`): peers adopt this node's
    /// sessions and stop dialling it; this node forgets its peers and runs alone.
    Depart(RpcReplyPort<usize>),
}
