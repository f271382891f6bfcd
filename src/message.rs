//! Application messages as they travel between sessions, and per-subscriber deliveries.
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::protocols::mqtt::{Properties, QoS};

/// Wall-clock milliseconds since the Unix epoch (message expiry survives restarts).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A cluster-unique message id: a random per-process base plus a counter (used to recognise the
/// same message arriving by two paths during a session hand-over).
pub fn next_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static BASE: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    BASE.get_or_init(rand::random::<u64>).wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed))
}

/// One published application message, shared by every delivery of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Message {
    pub id: u64,
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Properties forwarded to subscribers (payload format, content type, response topic,
    /// correlation data, user properties); never topic alias or subscription identifiers.
    pub props: Option<Box<Properties>>,
    /// Absolute expiry (Unix ms) from the Message Expiry Interval.
    pub expires_at: Option<u64>,
    /// Client id of the publisher, for No Local.
    pub publisher: Option<Arc<str>>,
    /// A device's uplink that must not come back to that device's own sessions: ThingsBoard
    /// client attributes share their topic with shared-attribute updates, and its SDKs take
    /// an echo for an update. Node-local (not on the wire, not persisted).
    #[serde(skip)]
    pub not_to_own_device: bool,
}

impl Message {
    /// A message the node itself publishes ($SYS values, device status, downlinks, answers to
    /// devices): a fresh id, no publisher, no properties or expiry.
    pub fn from_node(topic: impl Into<Arc<str>>, payload: impl Into<Bytes>, qos: QoS, retain: bool) -> Message {
        Message {
            id: next_id(),
            topic: topic.into(),
            payload: payload.into(),
            qos,
            retain,
            props: None,
            expires_at: None,
            publisher: None,
            not_to_own_device: false,
        }
    }

    pub fn expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// Remaining expiry in whole seconds (rounded up), if the message has an expiry.
    pub fn remaining_expiry(&self, now: u64) -> Option<u32> {
        self.expires_at.map(|t| (t.saturating_sub(now).div_ceil(1000)).min(u32::MAX as u64) as u32)
    }
}

/// A message on its way to one subscriber, with that subscription's view of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivery {
    pub msg: Arc<Message>,
    /// min(publish QoS, granted QoS).
    pub qos: QoS,
    /// Retain flag as the subscriber sees it (Retain As Published, or a retained message at subscribe).
    pub retain: bool,
    pub sub_ids: Vec<u32>,
    /// Shared subscription (`$share/group/filter`) this delivery came through, if any.
    pub shared: Option<Arc<str>>,
    /// The publisher waiting for this delivery to be replicated (persistent sessions in a
    /// cluster); never stored or sent.
    #[serde(skip)]
    pub durable: Option<Arc<DurableToken>>,
    /// Its place in the session's queue (persistent sessions, and what spilled to disk), and
    /// whether the state store holds it. Node-local: a session that moves numbers it anew.
    #[serde(skip)]
    pub seq: u64,
    #[serde(skip)]
    pub stored: bool,
}

/// One copy a publisher waits for; dropping it (replicated, or not needing it, or discarded)
/// counts the copy as done, so no path can leave a publisher waiting.
#[derive(Debug)]
pub struct DurableToken(Arc<Durable>);

impl DurableToken {
    pub fn new(d: &Arc<Durable>) -> Arc<DurableToken> {
        d.add();
        Arc::new(DurableToken(d.clone()))
    }
}

impl DurableToken {
    /// This copy could not be stored (queue full, store failing): the publisher is answered
    /// "quota exceeded" (5.0) instead of success.
    pub fn refuse(&self) {
        self.0.refused.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for DurableToken {
    fn drop(&mut self) {
        self.0.done();
    }
}

/// A publisher's wait for its message to be durable: one count per copy still to be
/// replicated to a backup node (or acknowledged by the node that replicates it).
#[derive(Debug, Default)]
pub struct Durable {
    pending: std::sync::atomic::AtomicUsize,
    refused: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
    /// The publisher's connection, when it polls for this message (its ordered PUBACK queue):
    /// no `Notified` future, no task per message.
    waker: futures_util::task::AtomicWaker,
}

impl Durable {
    pub fn add(&self) {
        self.pending.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn done(&self) {
        if self.pending.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            self.notify.notify_waiters();
            self.waker.wake();
        }
    }

    /// Ready once every copy is durable; registers `cx`'s waker otherwise.
    pub fn poll_done(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.is_done() {
            return std::task::Poll::Ready(());
        }
        self.waker.register(cx.waker());
        if self.is_done() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }

    /// Some copy could not be stored (see `DurableToken::refuse`).
    pub fn refused(&self) -> bool {
        self.refused.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn is_done(&self) -> bool {
        self.pending.load(std::sync::atomic::Ordering::SeqCst) == 0
    }

    /// Wait until every copy is durable, at most `max`; false on timeout.
    pub async fn wait(&self, max: std::time::Duration) -> bool {
        tokio::time::timeout(max, async {
            loop {
                let n = self.notify.notified();
                if self.is_done() {
                    return;
                }
                n.await;
            }
        })
        .await
        .is_ok()
    }
}
