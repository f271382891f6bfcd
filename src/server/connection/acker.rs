//! QoS 1 acknowledgements that wait without stopping the read loop: for the message's copies
//! to be durable (replicated to backup nodes), and for a device's telemetry to be written.
//! They go out in the order their PUBLISHes came; a PINGRESP waits its turn behind them, but
//! not for longer than half the keep-alive while storage is slow (the client must still hear
//! that the server is alive).
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::actors::session::Outbound;
use crate::broker::Broker;
use crate::devices::{Devices, IngestError, Unstored};
use crate::message::Durable;
use crate::metrics::Metrics;
use crate::protocols::mqtt::{reason, Ack, Packet};

/// A PUBACK (or PINGRESP) waiting its turn.
pub(super) struct AckJob {
    pub packet: Packet,
    /// The message's copies still being replicated.
    pub durable: Option<Arc<Durable>>,
    /// The message's telemetry, handed to the writers and not yet written.
    pub held: Option<Unstored>,
    pub at: Instant,
}

impl AckJob {
    pub fn new(packet: Packet, durable: Option<Arc<Durable>>, held: Option<Unstored>) -> AckJob {
        AckJob { packet, durable, held, at: Instant::now() }
    }
}

/// What the acknowledging task needs of its connection.
pub(super) struct Acker {
    pub tx: crate::queue::Sender<Outbound>,
    pub v5: bool,
    pub broker: Arc<Broker>,
    pub devices: Arc<Devices>,
    /// Longest a PUBACK waits for its telemetry to be written.
    pub stored_within: Duration,
    /// Longest a PINGRESP waits behind telemetry still being written (half the keep-alive).
    pub ping_within: Option<Duration>,
    /// Why the connection ends (see `Conn::end`): a busy store's DISCONNECT is recorded here.
    pub end: Arc<AtomicU16>,
}

impl Acker {
    /// Start the task; acknowledgements are sent to it in order (at most `cap` waiting).
    pub fn start(self, cap: usize) -> mpsc::Sender<AckJob> {
        let (atx, arx) = mpsc::channel(cap.max(1));
        tokio::spawn(self.run(arx, cap.max(1)));
        atx
    }

    async fn run(self, mut rx: mpsc::Receiver<AckJob>, cap: usize) {
        // Jobs read while the first one waits for its telemetry.
        let mut queue: VecDeque<AckJob> = VecDeque::new();
        loop {
            let job = match queue.pop_front() {
                Some(j) => j,
                None => match rx.recv().await {
                    Some(j) => j,
                    None => return,
                },
            };
            let AckJob { mut packet, durable, held, .. } = job;
            if let Some(u) = held {
                let stored = self.devices.stored(u, self.stored_within);
                let Some(outcome) = self.wait_reading(stored, &mut rx, &mut queue, cap).await else { return };
                match self.after_storage(packet, outcome) {
                    Ok(p) => packet = p,
                    Err(close) => {
                        let _ = self.tx.send(close).await;
                        return;
                    }
                }
            }
            if let Some(d) = durable {
                Broker::wait_durable(&d).await;
                if d.refused() {
                    let out = refused_ack(packet, self.v5, &self.broker);
                    let close = matches!(out, Outbound::Disconnect(_));
                    if close {
                        self.ends(reason::QUOTA_EXCEEDED);
                    }
                    if self.tx.send(out).await.is_err() || close {
                        return;
                    }
                    continue;
                }
            }
            if self.tx.send(Outbound::Packet(Box::new(packet))).await.is_err() {
                return;
            }
        }
    }

    /// Wait for `stored` while taking in the jobs that come meanwhile (up to `cap`); a
    /// PINGRESP among them that has waited `ping_within` is sent at once. `None`: the
    /// connection is gone.
    async fn wait_reading(
        &self,
        stored: impl std::future::Future<Output = Result<(), IngestError>>,
        rx: &mut mpsc::Receiver<AckJob>,
        queue: &mut VecDeque<AckJob>,
        cap: usize,
    ) -> Option<Result<(), IngestError>> {
        let mut stored = std::pin::pin!(stored);
        let mut open = true;
        loop {
            let ping = queue.iter().position(|j| matches!(j.packet, Packet::PingResp));
            let due = ping.zip(self.ping_within).map(|(i, w)| queue[i].at + w);
            tokio::select! {
                biased;
                r = &mut stored => return Some(r),
                j = rx.recv(), if open && queue.len() < cap => match j {
                    Some(j) => queue.push_back(j),
                    // The connection ended: what was handed over is still written.
                    None => open = false,
                },
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    if let Some(i) = ping {
                        queue.remove(i);
                    }
                    if self.tx.send(Outbound::Packet(Box::new(Packet::PingResp))).await.is_err() {
                        return None;
                    }
                }
            }
        }
    }

    /// The PUBACK to send once the telemetry's writes are over, or the DISCONNECT that ends a
    /// device's connection unacknowledged (it sends the message again when it reconnects).
    fn after_storage(&self, packet: Packet, outcome: Result<(), IngestError>) -> Result<Packet, Outbound> {
        let pkid = match &packet {
            Packet::PubAck(a) => a.pkid,
            _ => return Ok(packet),
        };
        // 3.1.1 has no negative acknowledgement: refused content is acknowledged and dropped.
        let nack = |code: u8| Ok(Packet::PubAck(Ack::new(pkid, if self.v5 { code } else { reason::SUCCESS })));
        match outcome {
            Ok(()) => Ok(packet),
            Err(IngestError::Busy) => {
                tracing::warn!("telemetry storage busy: disconnecting the device unacknowledged (it resends)");
                self.ends(reason::SERVER_BUSY);
                Err(Outbound::Disconnect(reason::SERVER_BUSY))
            }
            // Logged once by the writer that tried it.
            Err(IngestError::Refused(_)) => nack(reason::PAYLOAD_FORMAT_INVALID),
            Err(e) => {
                tracing::error!(error = %e, "cannot store a device message");
                nack(reason::UNSPECIFIED_ERROR)
            }
        }
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
