//! Per-session load gauge shared with publishers: how many deliveries wait in the session's
//! mailbox and queue. Publishers pause reading from their socket while an online subscriber is
//! above the high-water mark (backpressure instead of dropping acknowledged messages); a
//! subscriber that does not drain in time is marked slow and stops exerting backpressure.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use ractor::ActorRef;
use tokio::sync::Notify;

use super::session::SessionMessage;
use crate::message::Delivery;

/// Publishers a session's progress below its low-water mark lets go on at once.
const WAKE_AT_ONCE: usize = 4;

/// One publisher waiting (counted while it waits, however the wait ends).
struct Waiting<'a>(&'a AtomicUsize);
impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Default)]
pub struct Load {
    /// The session has a live connection.
    pub online: AtomicBool,
    /// The session outlives its connection (its QoS>0 deliveries are replicated in a cluster).
    pub persistent: AtomicBool,
    /// Set when the session was adopted from a lost node's replica: messages that were on
    /// their way to that node are re-routed to exactly these sessions.
    pub adopted_from: std::sync::OnceLock<Arc<str>>,
    /// Deliveries handed to the session but not yet handled (the length of `inbox`).
    pub mailbox: AtomicUsize,
    /// The session's delivery inbox: publishers push, the session drains it in batches. One
    /// `Drain` message is in the actor mailbox while `scheduled` is set, instead of one per message.
    inbox: Mutex<VecDeque<Delivery>>,
    scheduled: AtomicBool,
    /// Deliveries in the session's pending queue.
    pub pending: AtomicUsize,
    /// Set by a publisher that timed out waiting; cleared when the queue drains.
    pub slow: AtomicBool,
    /// Publishers waiting for this session to drain.
    pub waiters: AtomicUsize,
    pub drained: Notify,
}

/// Deliveries waiting in every session's pending queue on this node (`/metrics`).
pub static QUEUED: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

impl Drop for Load {
    fn drop(&mut self) {
        QUEUED.fetch_sub(*self.pending.get_mut() as i64, Ordering::Relaxed);
    }
}

impl Load {
    /// The session's pending queue length (kept in the node-wide total as well).
    pub fn set_pending(&self, n: usize) {
        let old = self.pending.swap(n, Ordering::Relaxed);
        if old != n {
            QUEUED.fetch_add(n as i64 - old as i64, Ordering::Relaxed);
        }
    }

    /// Hand a delivery to the session; wakes it if it was idle. False if the session is gone or
    /// its inbox already holds `cap` deliveries (a session stuck in a long operation while
    /// publishers no longer wait for it: the delivery is dropped rather than growing memory).
    pub fn push(&self, session: &ActorRef<SessionMessage>, d: Delivery, cap: usize) -> bool {
        match self.inbox.lock() {
            Ok(q) if q.len() >= cap => {
                // Not taken: the publisher must not count this copy as delivered.
                if let Some(t) = &d.durable {
                    t.refuse();
                }
                return false;
            }
            Ok(mut q) => {
                q.push_back(d);
                // Counted under the lock, so `take` never subtracts an item not yet counted.
                self.mailbox.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => return false,
        }
        // Not counted for the inspector (`cast`, not `tell`): this is the fan-out hot path, and
        // what waits here shows as the session's queue, not its mailbox.
        if !self.scheduled.swap(true, Ordering::AcqRel) && session.cast(SessionMessage::Drain).is_err() {
            return false;
        }
        true
    }

    /// Take every queued delivery (called by the session on `Drain`).
    pub fn take(&self) -> VecDeque<Delivery> {
        // Clear the flag first: a push after this point schedules another Drain.
        self.scheduled.store(false, Ordering::Release);
        match self.inbox.lock() {
            Ok(mut q) => {
                let batch = std::mem::take(&mut *q);
                self.mailbox.fetch_sub(batch.len(), Ordering::Relaxed);
                batch
            }
            Err(_) => VecDeque::new(),
        }
    }

    pub fn depth(&self) -> usize {
        self.mailbox.load(Ordering::Relaxed) + self.pending.load(Ordering::Relaxed)
    }

    /// Whether a publisher should wait for this session.
    pub fn congested(&self, high: usize) -> bool {
        self.online.load(Ordering::Relaxed) && !self.slow.load(Ordering::Relaxed) && self.depth() > high
    }

    /// Whether publishers wait for this session (it reports its progress then).
    pub fn pressed(&self) -> bool {
        self.waiters.load(Ordering::Acquire) > 0
    }

    /// Called by the session after it made progress. Below `low`, a few of the waiting
    /// publishers go on (in the order they came): each usually has a read buffer of messages
    /// to refill the room with, and waking a hundred at once made a hundred wake-ups, checks
    /// and re-waits for every turn of a fan-in's subscriber. While anything is queued the
    /// session has turns to come (and wakes a few more at each); with nothing queued, all go.
    pub fn progressed(&self, pending: usize, low: usize) {
        self.set_pending(pending);
        let depth = self.depth();
        if depth <= low {
            self.slow.store(false, Ordering::Relaxed);
            match self.waiters.load(Ordering::Acquire) {
                0 => {}
                _ if depth == 0 => self.drained.notify_waiters(),
                n => (0..n.min(WAKE_AT_ONCE)).for_each(|_| self.drained.notify_one()),
            }
        }
    }

    /// Wait until the depth is at most `high`, the session goes offline, or `max_wait` passes
    /// (then the session is marked slow). Returns false on timeout.
    pub async fn wait_below(&self, high: usize, max_wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + max_wait;
        self.waiters.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.waiters);
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.congested(high) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                if self.congested(high) {
                    self.slow.store(true, Ordering::Relaxed);
                    tracing::info!("slow subscriber: stops exerting backpressure");
                    return false;
                }
                return true;
            }
        }
    }
}
