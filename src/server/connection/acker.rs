//! QoS 1 acknowledgements that wait without stopping the read loop: for the message's copies
//! to be durable (replicated to backup nodes), and for a device's telemetry to be written.
//! Each is a short task that queues its PUBACK once its own waits are over and the one before
//! it has been queued, so they go out in the order their PUBLISHes came. A PINGRESP waits its
//! turn behind them too, but not for longer than half the keep-alive (the client must still
//! hear that the server is alive while storage is slow).
//!
//! Nothing is kept per connection while no acknowledgement waits (no task, no channel): a fleet
//! of devices that publish now and then pays only while a write is in progress.
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::actors::session::Outbound;
use crate::broker::Broker;
use crate::devices::{Devices, IngestError, Unstored};
use crate::message::Durable;
use crate::metrics::Metrics;
use crate::protocols::mqtt::{reason, Ack, Packet};

/// A connection's acknowledgements that wait.
#[derive(Default)]
pub(super) struct AckChain {
    /// Its sender is dropped once the last acknowledgement handed to a task has been queued.
    tail: Option<watch::Receiver<()>>,
    /// At most `mqtt.max_inflight` wait at once (then the read loop waits for room); made by
    /// the first one that waits.
    room: Option<Arc<Semaphore>>,
}

impl AckChain {
    /// Some acknowledgement is still waiting: anything answered now must go behind it.
    pub fn waiting(&self) -> bool {
        self.tail.as_ref().is_some_and(|t| t.has_changed().is_ok())
    }

    /// Room for one more, and the link to wait for (the previous one, if still waiting).
    async fn next(&mut self, cap: u16) -> Option<(OwnedSemaphorePermit, Option<watch::Receiver<()>>, watch::Sender<()>)> {
        let room = self.room.get_or_insert_with(|| Arc::new(Semaphore::new(cap.max(1) as usize))).clone();
        let permit = room.acquire_owned().await.ok()?;
        let prev = self.tail.take().filter(|t| t.has_changed().is_ok());
        let (me, tail) = watch::channel(());
        self.tail = Some(tail);
        Some((permit, prev, me))
    }
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
        let Some((permit, prev, me)) = chain.next(self.cap).await else { return };
        tokio::spawn(async move {
            // The write overlaps with the waits of the acknowledgements before this one.
            let stored = match held {
                // As long as it takes: holding the PUBACK is MQTT's own flow control (the
                // device's in-flight window fills and it stops), while disconnecting it would
                // make it log in again — more load on a node or store that is already behind.
                // Writers retry until the store takes the points; a connection that ends
                // meanwhile simply gets no PUBACK.
                Some(u) => Some(self.devices.stored(u, None).await),
                None => None,
            };
            if let Some(mut p) = prev {
                let _ = p.changed().await;
            }
            let code = match stored.map(|o| self.after_storage(o)) {
                None | Some(Ok(None)) => code,
                Some(Ok(Some(nack))) => nack,
                Some(Err(close)) => return self.close(close).await,
            };
            let ack = Ack::new(pkid, code);
            if let Some(d) = durable {
                Broker::wait_durable(&d).await;
                if d.refused() {
                    let out = refused_ack(Packet::PubAck(ack), self.v5, &self.broker);
                    if matches!(out, Outbound::Disconnect(_)) {
                        self.ends(reason::QUOTA_EXCEEDED);
                    }
                    let _ = self.tx.send(out).await;
                    return;
                }
            }
            let _ = self.tx.send(Outbound::Packet(Box::new(Packet::PubAck(ack)))).await;
            drop((me, permit));
        });
    }

    /// PINGRESP after the acknowledgements before it — or after `ping_within`, if they take
    /// longer; those after it still wait for all before.
    pub async fn ping(self, chain: &mut AckChain) {
        let Some((permit, prev, me)) = chain.next(self.cap).await else { return };
        tokio::spawn(async move {
            let Some(mut prev) = prev else {
                let _ = self.tx.send(Outbound::Packet(Box::new(Packet::PingResp))).await;
                return;
            };
            let in_turn = match self.ping_within {
                Some(w) => tokio::time::timeout(w, prev.changed()).await.is_ok(),
                None => {
                    let _ = prev.changed().await;
                    true
                }
            };
            let _ = self.tx.send(Outbound::Packet(Box::new(Packet::PingResp))).await;
            if !in_turn {
                let _ = prev.changed().await;
            }
            drop((me, permit));
        });
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
        let _ = self.end.compare_exchange(0, 0x100 | code as u16, Ordering::Relaxed, Ordering::Relaxed);
    }
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
