//! Subscription changes in flight. A SUBSCRIBE travels from its connection through the session
//! actor to a shard actor before publishers can see it in the shard's snapshot, while a PUBLISH
//! is matched by its own connection at once. So a PUBLISH that another client sent right after
//! a SUBSCRIBE (without waiting for the SUBACK: Paho's No Local and request/response suites do)
//! could overtake it and miss the new subscriber.
//!
//! Each SUBSCRIBE and UNSUBSCRIBE takes a [`Ticket`] (numbered, naming its filters) when its
//! connection has read and authorised it; the ticket is given back when the session has
//! applied the change. A publisher notes [`Pending::mark`] when it reads its PUBLISH and, before
//! routing, waits for the tickets numbered up to that mark *whose filters match its topic*
//! (bounded by [`MAX_WAIT`]). With no change in flight this is one atomic load.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::protocols::mqtt::topic;

/// The longest a publish waits for a subscription change (a stuck session must not stall
/// every publisher of the topic).
pub const MAX_WAIT: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct Pending {
    /// The number of the last ticket handed out.
    last: AtomicU64,
    /// Tickets not yet given back (the fast path reads only this).
    open: AtomicUsize,
    filters: Mutex<BTreeMap<u64, Vec<String>>>,
    done: tokio::sync::Notify,
}

/// A subscription change in flight; dropping it says the change is applied (or abandoned).
pub struct Ticket {
    pending: Arc<Pending>,
    n: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let p = &self.pending;
        p.filters.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.n);
        p.open.fetch_sub(1, Ordering::SeqCst);
        p.done.notify_waiters();
    }
}

impl Ticket {
    /// The change turned out to touch these filters (a webhook rewrote them).
    pub fn refilter(&self, filters: Vec<String>) {
        self.pending.filters.lock().unwrap_or_else(|e| e.into_inner()).insert(self.n, filters);
    }
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ticket({})", self.n)
    }
}

impl Pending {
    /// A change of these filters (shared subscriptions included) starts.
    pub fn begin(self: &Arc<Self>, filters: Vec<String>) -> Ticket {
        let mut open = self.filters.lock().unwrap_or_else(|e| e.into_inner());
        let n = self.last.fetch_add(1, Ordering::SeqCst) + 1;
        open.insert(n, filters);
        self.open.fetch_add(1, Ordering::SeqCst);
        Ticket { pending: self.clone(), n }
    }

    /// Noted when a PUBLISH is read: the changes begun before it (0 = none in flight).
    pub fn mark(&self) -> u64 {
        if self.open.load(Ordering::SeqCst) == 0 {
            0
        } else {
            self.last.load(Ordering::SeqCst)
        }
    }

    /// Whether a change begun at or before `mark` and matching `topic` is still in flight.
    fn blocks(&self, mark: u64, t: &str) -> bool {
        let open = self.filters.lock().unwrap_or_else(|e| e.into_inner());
        open.range(..=mark).any(|(_, fs)| {
            fs.iter().any(|f| {
                let f = topic::parse_shared(f).map_or(f.as_str(), |(_, f)| f);
                topic::matches(f, t)
            })
        })
    }

    /// Wait (at most [`MAX_WAIT`]) until no change begun at or before `mark` that could
    /// match `topic` is in flight.
    pub async fn settle(&self, mark: u64, topic: &str) {
        if mark == 0 || self.open.load(Ordering::SeqCst) == 0 {
            return;
        }
        let _ = tokio::time::timeout(MAX_WAIT, async {
            loop {
                let done = self.done.notified();
                tokio::pin!(done);
                done.as_mut().enable();
                if !self.blocks(mark, topic) {
                    return;
                }
                done.await;
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_publish_waits_only_for_earlier_matching_changes() {
        let p = Arc::new(Pending::default());
        assert_eq!(p.mark(), 0);
        let a = p.begin(vec!["a/+".into()]);
        let m = p.mark();
        let _later = p.begin(vec!["b".into()]);
        // Unrelated topic, and a change begun after the mark: no wait.
        assert!(!p.blocks(m, "c"));
        assert!(!p.blocks(m, "b"));
        assert!(p.blocks(m, "a/x"));
        let shared = p.begin(vec!["$share/g/s/#".into()]);
        assert!(p.blocks(p.mark(), "s/1"));
        drop(shared);
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move { p.settle(m, "a/x").await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(a);
        tokio::time::timeout(Duration::from_millis(500), waiter).await.expect("woken by the ticket's return").unwrap();
    }
}
