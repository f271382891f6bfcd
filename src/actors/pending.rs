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
//! With no change in flight this is one atomic load.
//!
//! A ticket holds publishers back for at most [`MAX_WAIT`] from when it began, not per
//! publish: a SUBSCRIBE that an `auth_on_subscribe` webhook sits on (or a stuck session) then
//! delays the matching publishes read in its first second only, instead of every one of them
//! by a second for as long as the webhook takes.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::protocols::mqtt::topic;

/// How long a subscription change holds back the publishes that may match it, from when it
/// began (a stuck session or a slow webhook must not stall every publisher of the topic).
pub const MAX_WAIT: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct Pending {
    /// The number of the last ticket handed out.
    last: AtomicU64,
    /// Tickets not yet given back (the fast path reads only this).
    open: AtomicUsize,
    filters: Mutex<BTreeMap<u64, (Instant, Vec<String>)>>,
    done: tokio::sync::Notify,
    /// Publishes that waited for a change, and those that stopped waiting because the change
    /// outlived [`MAX_WAIT`] (`thingsd_mqtt_publish_subscribe_waits_total`).
    pub waited: AtomicU64,
    pub expired: AtomicU64,
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
        if let Some(e) = self.pending.filters.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&self.n) {
            e.1 = filters;
        }
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
        open.insert(n, (Instant::now(), filters));
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

    /// When the last change begun at or before `mark` that could match `topic` stops holding
    /// it back (`None`: none does).
    fn blocks(&self, mark: u64, t: &str, now: Instant) -> Option<Instant> {
        let open = self.filters.lock().unwrap_or_else(|e| e.into_inner());
        open.range(..=mark)
            .filter(|(_, (at, _))| now < *at + MAX_WAIT)
            .filter(|(_, (_, fs))| {
                fs.iter().any(|f| {
                    let f = topic::parse_shared(f).map_or(f.as_str(), |(_, f)| f);
                    topic::matches(f, t)
                })
            })
            .map(|(_, (at, _))| *at + MAX_WAIT)
            .max()
    }

    /// Wait until no change begun at or before `mark` that could match `topic` is in flight,
    /// or until such changes are older than [`MAX_WAIT`].
    pub async fn settle(&self, mark: u64, topic: &str) {
        if mark == 0 || self.open.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut counted = false;
        loop {
            let done = self.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            let Some(until) = self.blocks(mark, topic, Instant::now()) else { return };
            if !counted {
                counted = true;
                self.waited.fetch_add(1, Ordering::Relaxed);
            }
            if tokio::time::timeout_at(until, done).await.is_err() && self.blocks(mark, topic, Instant::now()).is_none() {
                self.expired.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
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
        let now = Instant::now();
        assert!(p.blocks(m, "c", now).is_none());
        assert!(p.blocks(m, "b", now).is_none());
        assert!(p.blocks(m, "a/x", now).is_some());
        // Older than MAX_WAIT, a change holds nothing back any more.
        assert!(p.blocks(m, "a/x", now + MAX_WAIT).is_none());
        let shared = p.begin(vec!["$share/g/s/#".into()]);
        assert!(p.blocks(p.mark(), "s/1", Instant::now()).is_some());
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

    #[tokio::test]
    async fn a_change_holds_publishes_back_for_max_wait_from_its_start_not_per_publish() {
        let p = Arc::new(Pending::default());
        let held = p.begin(vec!["#".into()]);
        let m = p.mark();
        p.settle(m, "any/topic").await;
        assert_eq!((p.waited.load(Ordering::Relaxed), p.expired.load(Ordering::Relaxed)), (1, 1));
        // The same change, still in flight, no longer holds anyone back.
        for _ in 0..100 {
            p.settle(p.mark(), "any/topic").await;
        }
        assert_eq!((p.waited.load(Ordering::Relaxed), p.expired.load(Ordering::Relaxed)), (1, 1));
        drop(held);
    }
}
