//! Per-session load gauge shared with publishers: how many deliveries wait in the session's
//! mailbox and queue. Publishers pause reading from their socket while an online subscriber is
//! above the high-water mark (backpressure instead of dropping acknowledged messages); a
//! subscriber that does not drain in time is marked slow and stops exerting backpressure.
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct Load {
    /// The session has a live connection.
    pub online: AtomicBool,
    /// Deliveries cast to the session but not yet handled.
    pub mailbox: AtomicUsize,
    /// Deliveries in the session's pending queue.
    pub pending: AtomicUsize,
    /// Set by a publisher that timed out waiting; cleared when the queue drains.
    pub slow: AtomicBool,
    /// A publisher is (or was) waiting for this session to drain.
    pub pressure: AtomicBool,
    pub drained: Notify,
}

impl Load {
    pub fn depth(&self) -> usize {
        self.mailbox.load(Ordering::Relaxed) + self.pending.load(Ordering::Relaxed)
    }

    /// Whether a publisher should wait for this session.
    pub fn congested(&self, high: usize) -> bool {
        self.online.load(Ordering::Relaxed) && !self.slow.load(Ordering::Relaxed) && self.depth() > high
    }

    /// Called by the session after it made progress.
    pub fn progressed(&self, pending: usize, low: usize) {
        self.pending.store(pending, Ordering::Relaxed);
        if self.depth() <= low {
            self.slow.store(false, Ordering::Relaxed);
            if self.pressure.swap(false, Ordering::AcqRel) {
                self.drained.notify_waiters();
            }
        }
    }

    /// Wait until the depth is at most `high`, the session goes offline, or `max_wait` passes
    /// (then the session is marked slow). Returns false on timeout.
    pub async fn wait_below(&self, high: usize, max_wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + max_wait;
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.pressure.store(true, Ordering::Release);
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
