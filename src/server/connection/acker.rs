//! QoS 1 acknowledgements that wait without stopping the read loop: for the message's copies
//! to be taken by its subscribers' sessions (stored, for persistent ones; replicated to backup
//! nodes in a cluster), and for a device's telemetry to be written. They go out in the order
//! their PUBLISHes came.
//!
//! A PUBACK that waits only for its message's copies is kept in the connection's own ordered
//! queue ([`AckChain::push`]) and sent by its packet loop once the copies are taken (the
//! [`Durable`] wakes the connection): no task per message. One that waits for a telemetry
//! write is a short task that queues its PUBACK once its write is over and the ones before
//! it have been queued (the queue's waiting PUBACKs go with the first such task). A PINGRESP
//! waits its turn behind them too, but not for longer than half the keep-alive (the client
//! must still hear that the server is alive while storage is slow).
//!
//! Nothing is kept per connection while no acknowledgement waits (no task, no channel, no
//! queue buffer): a fleet of devices that publish now and then pays only while a write is in
//! progress.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::actors::session::Outbound;
use crate::broker::Broker;
use crate::devices::{Devices, IngestError, Unstored};
use crate::message::Durable;
use crate::metrics::Metrics;
use crate::protocols::mqtt::{reason, Ack, Packet};

/// Longest a PUBACK waits for its message's copies (then it is sent anyway, and logged).
pub(super) const DURABLE_WAIT: Duration = Duration::from_secs(5);

/// A PUBACK in the connection's queue: sent once `durable` is done (or `since` is
/// `DURABLE_WAIT` old).
pub(super) struct Queued {
    pkid: u16,
    code: u8,
    durable: Option<Arc<Durable>>,
    since: Instant,
}

impl Queued {
    /// The packet to send (see [`answer`]).
    pub(super) fn outbound(self, v5: bool, broker: &Broker, end: &AtomicU16) -> Outbound {
        answer(self.pkid, self.code, self.durable.as_deref(), v5, broker, end)
    }

    /// Wait (bounded by `DURABLE_WAIT` from when it was queued) for its copies.
    async fn settle(&self) {
        if let Some(d) = &self.durable {
            let _ = tokio::time::timeout_at(self.since + DURABLE_WAIT, std::future::poll_fn(|cx| d.poll_done(cx))).await;
        }
    }
}

/// The answer to a QoS 1 PUBLISH whose wait is over: its PUBACK, or the refusal when some copy
/// could not be taken (a DISCONNECT in 3.1.1, recorded as why the connection ends).
pub(super) fn answer(pkid: u16, code: u8, durable: Option<&Durable>, v5: bool, broker: &Broker, end: &AtomicU16) -> Outbound {
    match durable {
        Some(d) if !d.is_done() => {
            tracing::warn!("replication to backup nodes timed out; acknowledging anyway");
            Outbound::PubAck(pkid, code)
        }
        Some(d) if d.refused() => {
            let out = refused_ack(Packet::PubAck(Ack::new(pkid, code)), v5, broker);
            if matches!(out, Outbound::Disconnect(_)) {
                ends(end, reason::QUOTA_EXCEEDED);
            }
            out
        }
        _ => Outbound::PubAck(pkid, code),
    }
}

/// A connection's acknowledgements that wait.
#[derive(Default)]
pub(super) struct AckChain {
    /// Its sender is dropped once the last acknowledgement handed to a task has been queued.
    tail: Option<watch::Receiver<()>>,
    /// At most `mqtt.max_inflight` tasks wait at once (then the read loop waits for room);
    /// made by the first one that waits.
    room: Option<Arc<Semaphore>>,
    /// PUBACKs waiting only for their copies, in order; never non-empty while a task waits
    /// (the first task takes them along).
    queued: VecDeque<Queued>,
}

impl AckChain {
    /// Some acknowledgement is still waiting: anything answered now must go behind it.
    pub fn waiting(&self) -> bool {
        self.chained() || !self.queued.is_empty()
    }

    /// A task's acknowledgement is still waiting (new ones must be tasks too, behind it).
    pub fn chained(&self) -> bool {
        self.tail.as_ref().is_some_and(|t| t.has_changed().is_ok())
    }

    pub fn has_queued(&self) -> bool {
        !self.queued.is_empty()
    }

    /// When the oldest queued PUBACK stops waiting for its copies.
    pub fn deadline(&self) -> Option<Instant> {
        self.queued.front().map(|q| q.since + DURABLE_WAIT)
    }

    /// Ready once the oldest queued PUBACK's copies are taken (pending while none is queued).
    pub fn head_done(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| match self.queued.front() {
            None => std::task::Poll::Pending,
            Some(Queued { durable: None, .. }) => std::task::Poll::Ready(()),
            Some(Queued { durable: Some(d), .. }) => d.poll_done(cx),
        })
    }

    /// The oldest queued PUBACK, if its wait is over (copies taken, or `now` past its bound).
    pub fn pop_ready(&mut self, now: Instant) -> Option<Queued> {
        let q = self.queued.front()?;
        if q.durable.as_ref().is_some_and(|d| !d.is_done()) && now < q.since + DURABLE_WAIT {
            return None;
        }
        let q = self.queued.pop_front();
        if self.queued.is_empty() {
            // A connection that publishes now and then keeps no buffer between its bursts.
            self.queued = VecDeque::new();
        }
        q
    }

    /// Queue a PUBACK behind the ones waiting; true if the queue is at `cap` (the caller
    /// waits for its head before reading more).
    pub fn push(&mut self, pkid: u16, code: u8, durable: Option<Arc<Durable>>, cap: u16) -> bool {
        self.queued.push_back(Queued { pkid, code, durable, since: Instant::now() });
        self.queued.len() >= cap.max(1) as usize
    }

    /// Wait until the oldest queued PUBACK may go (see `pop_ready`).
    pub async fn head_settled(&self) {
        if let Some(q) = self.queued.front() {
            q.settle().await;
        }
    }

    /// Room for one more task, the queued PUBACKs to send before it, and the link to wait
    /// for (the previous task, if still waiting).
    async fn next(&mut self, cap: u16) -> Option<(OwnedSemaphorePermit, Before, watch::Sender<()>)> {
        let room = self.room.get_or_insert_with(|| Arc::new(Semaphore::new(cap.max(1) as usize))).clone();
        let permit = room.acquire_owned().await.ok()?;
        let prev = self.tail.take().filter(|t| t.has_changed().is_ok());
        let (me, tail) = watch::channel(());
        self.tail = Some(tail);
        Some((permit, Before { queued: std::mem::take(&mut self.queued), prev }, me))
    }
}

/// What a task's acknowledgement goes behind: the queued PUBACKs it took along, then the
/// previous task's.
struct Before {
    queued: VecDeque<Queued>,
    prev: Option<watch::Receiver<()>>,
}

/// What an acknowledging task needs of its connection.
pub(super) struct AckCtx {
    pub tx: crate::queue::Sender<Outbound>,
    pub v5: bool,
    pub broker: Arc<Broker>,
    pub devices: Arc<Devices>,
    /// Longest a PINGRESP waits behind acknowledgements (half the keep-alive; none: no limit).
    pub ping_within: Option<Duration>,
    /// Why the connection ends (see `Conn::end`): a DISCONNECT sent from here is recorded.
    pub end: Arc<AtomicU16>,
    pub cap: u16,
}

impl AckCtx {
    /// PUBACK `pkid` with `code` once `held` is written and `durable` replicated, after the
    /// ones before it.
    pub async fn ack(self, chain: &mut AckChain, pkid: u16, code: u8, durable: Option<Arc<Durable>>, held: Option<Unstored>) {
        let Some((permit, before, me)) = chain.next(self.cap).await else { return };
        tokio::spawn(async move {
            // The write overlaps with the waits of the acknowledgements before this one.
            let stored = async {
                match held {
                    // As long as it takes: holding the PUBACK is MQTT's own flow control (the
                    // device's in-flight window fills and it stops), while disconnecting it
                    // would make it log in again — more load on a node or store that is
                    // already behind. Writers retry until the store takes the points; a
                    // connection that ends meanwhile simply gets no PUBACK.
                    Some(u) => Some(self.devices.stored(u, None).await),
                    None => None,
                }
            };
            let (stored, ()) = tokio::join!(stored, self.behind(before));
            let code = match stored.map(|o| self.after_storage(o)) {
                None | Some(Ok(None)) => code,
                Some(Ok(Some(nack))) => nack,
                Some(Err(close)) => return self.close(close).await,
            };
            // From here on it is a queued one: its copies (waited for at most `DURABLE_WAIT`
            // more, as before the write), or their refusal.
            let q = Queued { pkid, code, durable, since: Instant::now() };
            q.settle().await;
            let _ = self.tx.send(q.outbound(self.v5, &self.broker, &self.end)).await;
            drop((me, permit));
        });
    }

    /// PINGRESP after the acknowledgements before it — or after `ping_within`, if they take
    /// longer; those after it still wait for all before.
    pub async fn ping(self, chain: &mut AckChain) {
        let Some((permit, before, me)) = chain.next(self.cap).await else { return };
        tokio::spawn(async move {
            let behind = self.behind(before);
            tokio::pin!(behind);
            let in_turn = match self.ping_within {
                Some(w) => tokio::time::timeout(w, &mut behind).await.is_ok(),
                None => {
                    behind.as_mut().await;
                    true
                }
            };
            let _ = self.tx.send(Outbound::Packet(Box::new(Packet::PingResp))).await;
            if !in_turn {
                behind.await;
            }
            drop((me, permit));
        });
    }

    /// Send the queued PUBACKs taken along (each once its copies are taken), then wait for
    /// the previous task's.
    async fn behind(&self, before: Before) {
        for q in before.queued {
            q.settle().await;
            let _ = self.tx.send(q.outbound(self.v5, &self.broker, &self.end)).await;
        }
        if let Some(mut p) = before.prev {
            let _ = p.changed().await;
        }
    }

    /// Once the telemetry's writes are over: the PUBACK's reason code if it is not the one
    /// routing gave, or `Err` with the reason to end a device's connection unacknowledged (it
    /// sends the message again when it reconnects).
    fn after_storage(&self, outcome: Result<(), IngestError>) -> Result<Option<u8>, u8> {
        // 3.1.1 has no negative acknowledgement: refused content is acknowledged and dropped.
        let nack = |code: u8| Ok(Some(if self.v5 { code } else { reason::SUCCESS }));
        match outcome {
            Ok(()) => Ok(None),
            Err(IngestError::Busy) => {
                tracing::warn!("telemetry storage busy: disconnecting the device unacknowledged (it resends)");
                Err(reason::SERVER_BUSY)
            }
            // Logged once by the writer that tried it.
            Err(IngestError::Refused(_)) => nack(reason::PAYLOAD_FORMAT_INVALID),
            Err(e) => {
                tracing::error!(error = %e, "cannot store a device message");
                nack(reason::UNSPECIFIED_ERROR)
            }
        }
    }

    async fn close(&self, code: u8) {
        self.ends(code);
        let _ = self.tx.send(Outbound::Disconnect(code)).await;
    }

    /// The server closes the connection with `code` (unless something else decided first).
    fn ends(&self, code: u8) {
        ends(&self.end, code);
    }
}

fn ends(end: &AtomicU16, code: u8) {
    let _ = end.compare_exchange(0, 0x100 | code as u16, Ordering::Relaxed, Ordering::Relaxed);
}

/// A QoS 1 message some subscriber's queue could not keep: PUBACK 0x97 (5.0), or (3.1.1,
/// which has no negative acknowledgement) the connection closes without one, so the client
/// sends the message again after it reconnects.
pub(super) fn refused_ack(p: Packet, v5: bool, broker: &Broker) -> Outbound {
    Metrics::add(&broker.metrics.publishes_refused, 1);
    match p {
        Packet::PubAck(a) if v5 => Outbound::Packet(Box::new(Packet::PubAck(Ack::new(a.pkid, reason::QUOTA_EXCEEDED)))),
        _ => {
            tracing::info!("a subscriber's queue could not take a message; 3.1.1 publisher disconnected unacknowledged");
            Outbound::Disconnect(reason::QUOTA_EXCEEDED)
        }
    }
}
