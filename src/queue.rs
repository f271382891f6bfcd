//! A bounded multi-producer, single-consumer queue that allocates nothing while it is empty: a
//! connection's outbound queue. tokio's `mpsc::channel` allocates its shared state and a first
//! block of 32 slots up front (~1.3 KiB for each idle connection); this one holds an empty
//! `VecDeque` until something is queued, and gives the memory back once a burst has drained.
//!
//! The API is the part of tokio's bounded channel the connection uses (same error types):
//! `try_send`, `send`, `reserve_owned`, `recv`, `try_recv`. Closing follows tokio: the receiver
//! sees the end once every sender is gone and the queue is empty; senders see `Closed` once
//! the receiver is gone (what was queued is dropped then).
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, Semaphore, TryAcquireError};

pub use tokio::sync::mpsc::error::{SendError, TryRecvError, TrySendError};

/// Queues that grew past this many slots are given back to the allocator when they drain.
const KEEP: usize = 64;

struct Inner<T> {
    items: Mutex<VecDeque<T>>,
    /// Free places; closed when the receiver is gone.
    room: Semaphore,
    /// A value was queued, or the last sender left.
    ready: Notify,
    senders: AtomicUsize,
}

pub struct Sender<T>(Arc<Inner<T>>);

pub struct Receiver<T>(Arc<Inner<T>>);

/// A place reserved in the queue: [`OwnedPermit::send`] fills it without waiting; dropping it
/// unused gives it back.
pub struct OwnedPermit<T>(Option<Sender<T>>);

/// A queue of at most `cap` values (at least one).
pub fn channel<T>(cap: usize) -> (Sender<T>, Receiver<T>) {
    let inner = Arc::new(Inner {
        items: Mutex::new(VecDeque::new()),
        room: Semaphore::new(cap.max(1)),
        ready: Notify::new(),
        senders: AtomicUsize::new(1),
    });
    (Sender(inner.clone()), Receiver(inner))
}

impl<T> Inner<T> {
    /// Queue a value a place was taken for.
    fn push(&self, t: T) {
        self.items.lock().unwrap_or_else(|e| e.into_inner()).push_back(t);
        self.ready.notify_one();
    }

    fn pop(&self) -> Option<T> {
        self.take(false)
    }

    /// The next value; when there is none, the buffer is given back (the receiver is about to
    /// wait: an idle connection then holds no queue memory, not even the slots of its CONNACK).
    fn pop_or_release(&self) -> Option<T> {
        self.take(true)
    }

    /// The next value. A queue left empty gives its buffer back when it grew past `KEEP`
    /// slots, or (`release`) when there was nothing to take.
    fn take(&self, release: bool) -> Option<T> {
        let mut q = self.items.lock().unwrap_or_else(|e| e.into_inner());
        let t = q.pop_front();
        let keep = if release && t.is_none() { 0 } else { KEEP };
        if q.is_empty() && q.capacity() > keep {
            *q = VecDeque::new();
        }
        let t = t?;
        drop(q);
        self.room.add_permits(1);
        Some(t)
    }
}

impl<T> Sender<T> {
    /// Queue `t` if there is room now.
    pub fn try_send(&self, t: T) -> Result<(), TrySendError<T>> {
        match self.0.room.try_acquire() {
            Ok(p) => {
                p.forget();
                self.0.push(t);
                Ok(())
            }
            Err(TryAcquireError::NoPermits) => Err(TrySendError::Full(t)),
            Err(TryAcquireError::Closed) => Err(TrySendError::Closed(t)),
        }
    }

    /// Queue `t`, waiting for room.
    pub async fn send(&self, t: T) -> Result<(), SendError<T>> {
        match self.0.room.acquire().await {
            Ok(p) => {
                p.forget();
                self.0.push(t);
                Ok(())
            }
            Err(_) => Err(SendError(t)),
        }
    }

    /// Wait for room and keep it for a value sent later (by whoever holds the permit).
    pub async fn reserve_owned(self) -> Result<OwnedPermit<T>, SendError<()>> {
        let taken = self.0.room.acquire().await.map(|p| p.forget()).is_ok();
        if taken {
            Ok(OwnedPermit(Some(self)))
        } else {
            Err(SendError(()))
        }
    }
}

impl<T> OwnedPermit<T> {
    /// Queue `t` in the reserved place; the sender comes back.
    pub fn send(mut self, t: T) -> Sender<T> {
        let tx = self.0.take().expect("a permit is sent once");
        if tx.0.room.is_closed() {
            drop(t); // the receiver is gone: as tokio, the value is dropped
        } else {
            tx.0.push(t);
        }
        tx
    }
}

impl<T> Drop for OwnedPermit<T> {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            tx.0.room.add_permits(1);
        }
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.0.senders.fetch_add(1, Ordering::Relaxed);
        Sender(self.0.clone())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        if self.0.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.ready.notify_one();
        }
    }
}

impl<T> Receiver<T> {
    /// The next value; `None` once every sender is gone and nothing is left.
    pub async fn recv(&mut self) -> Option<T> {
        loop {
            if let Some(t) = self.0.pop_or_release() {
                return Some(t);
            }
            if self.0.senders.load(Ordering::Acquire) == 0 {
                // A value queued just before the last sender left is still delivered.
                return self.0.pop();
            }
            // `notify_one` keeps a wake-up for a receiver that is not waiting yet: a value
            // queued between the checks above and this line is not missed.
            self.0.ready.notified().await;
        }
    }

    /// Refuse more values (senders, also those waiting for room, see `Closed`) and drop
    /// what is queued, as dropping the receiver would.
    pub fn close(&mut self) {
        self.0.room.close();
        let left = std::mem::take(&mut *self.0.items.lock().unwrap_or_else(|e| e.into_inner()));
        drop(left);
    }

    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        match self.0.pop() {
            Some(t) => Ok(t),
            None if self.0.senders.load(Ordering::Acquire) == 0 => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.close();
    }
}

/// The vendored ractor's actor ports follow the same design; that crate's own tests do not build
/// here (it is published without its dev-dependencies), so its unit tests run with ours.
#[cfg(test)]
#[path = "../vendor/ractor/src/concurrency/lazy_port.rs"]
mod ractor_lazy_port;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn bounded_in_order_and_closes_like_tokio() {
        let (tx, mut rx) = channel::<u32>(2);
        tx.try_send(1).unwrap();
        tx.send(2).await.unwrap();
        assert!(matches!(tx.try_send(3), Err(TrySendError::Full(3))));
        // A sender waiting for room gets it when the receiver takes a value.
        let t2 = tx.clone();
        let waiting = tokio::spawn(async move { t2.send(3).await });
        assert_eq!(rx.recv().await, Some(1));
        tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap().unwrap();
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.try_recv(), Ok(3));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        // A reserved place: filled later, or given back when dropped.
        let p = tx.clone().reserve_owned().await.unwrap();
        let q = tx.clone().reserve_owned().await.unwrap();
        assert!(matches!(tx.try_send(9), Err(TrySendError::Full(9))));
        drop(q);
        tx.try_send(4).unwrap();
        p.send(5);
        assert_eq!((rx.recv().await, rx.recv().await), (Some(4), Some(5)));
        // The last sender leaving ends the receiver after what is left.
        tx.try_send(6).unwrap();
        drop(tx);
        assert_eq!(rx.recv().await, Some(6));
        assert_eq!(rx.recv().await, None);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));
    }

    #[tokio::test]
    async fn a_waiting_receiver_holds_no_buffer() {
        let capacity = |rx: &Receiver<u32>| rx.0.items.lock().unwrap().capacity();
        let (tx, mut rx) = channel::<u32>(8);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(rx.recv().await, Some(2));
        assert!(capacity(&rx) > 0, "kept while values come and go");
        // Nothing queued: the receiver waits, and gives the buffer back first.
        tokio::select! { biased; _ = rx.recv() => panic!("nothing was sent"), _ = std::future::ready(()) => {} }
        assert_eq!(capacity(&rx), 0);
        tx.try_send(3).unwrap();
        assert_eq!(rx.recv().await, Some(3));
    }

    #[tokio::test]
    async fn senders_see_a_gone_receiver() {
        let (tx, rx) = channel::<Arc<()>>(4);
        let kept = Arc::new(());
        tx.try_send(kept.clone()).unwrap();
        let p = tx.clone().reserve_owned().await.unwrap();
        drop(rx);
        assert_eq!(Arc::strong_count(&kept), 1, "what was queued is dropped with the receiver");
        assert!(matches!(tx.try_send(kept.clone()), Err(TrySendError::Closed(_))));
        assert!(tx.send(kept.clone()).await.is_err());
        assert!(tx.clone().reserve_owned().await.is_err());
        p.send(kept.clone());
        assert_eq!(Arc::strong_count(&kept), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_producers_nothing_lost() {
        let (tx, mut rx) = channel::<(u32, u32)>(8);
        let mut tasks = Vec::new();
        for p in 0..4 {
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..5_000 {
                    tx.send((p, i)).await.unwrap();
                }
            }));
        }
        drop(tx);
        let mut next = [0u32; 4];
        while let Some((p, i)) = rx.recv().await {
            assert_eq!(i, next[p as usize], "each producer's values in order");
            next[p as usize] += 1;
        }
        assert_eq!(next, [5_000; 4]);
        for t in tasks {
            t.await.unwrap();
        }
    }
}
