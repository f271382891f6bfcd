// thingsd patch: an actor's input ports (messages, supervision events) as an unbounded MPSC
// queue that allocates nothing until something is queued. tokio's unbounded channel allocates
// its shared state and a first block of 32 slots when it is created (~0.6 KiB per port): most
// of what an idle actor costs. Same surface as the tokio types it replaces (`send`, `recv`,
// `try_recv`, `close`, tokio's error types); `recv` is cancel safe (the value stays queued
// until a poll takes it). The receiver's waker is kept under the queue's lock: a waiting
// `recv` holds no `Notified` future (two of them, ~180 bytes, sat in every idle actor's task).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

pub(crate) use tokio::sync::mpsc::error::{SendError, TryRecvError};

/// Queues that grew past this many slots are given back to the allocator when they drain.
const KEEP: usize = 32;

struct State<T> {
    items: VecDeque<T>,
    closed: bool,
    /// The receiver waiting for a value (one receiver: the actor).
    waker: Option<Waker>,
}

struct Inner<T> {
    state: Mutex<State<T>>,
    senders: AtomicUsize,
}

/// The sending half (ractor keeps one per actor; it may be cloned).
pub(crate) struct LazySender<T>(Arc<Inner<T>>);

/// The receiving half.
pub(crate) struct LazyReceiver<T>(Arc<Inner<T>>);

/// An unbounded queue.
pub(crate) fn lazy_unbounded<T>() -> (LazySender<T>, LazyReceiver<T>) {
    let inner =
        Arc::new(Inner { state: Mutex::new(State { items: VecDeque::new(), closed: false, waker: None }), senders: AtomicUsize::new(1) });
    (LazySender(inner.clone()), LazyReceiver(inner))
}

impl<T> Inner<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pop(&self) -> Option<T> {
        let mut s = self.lock();
        let t = s.items.pop_front()?;
        if s.items.is_empty() && s.items.capacity() > KEEP {
            s.items = VecDeque::new();
        }
        Some(t)
    }

    /// Wake the waiting receiver (outside the lock).
    fn wake(&self) {
        let w = self.lock().waker.take();
        if let Some(w) = w {
            w.wake();
        }
    }
}

impl<T> LazySender<T> {
    /// Queue `t`; fails (giving it back) once the receiver is closed or gone.
    pub(crate) fn send(&self, t: T) -> Result<(), SendError<T>> {
        let waiting = {
            let mut s = self.0.lock();
            if s.closed {
                return Err(SendError(t));
            }
            s.items.push_back(t);
            s.waker.take()
        };
        if let Some(w) = waiting {
            w.wake();
        }
        Ok(())
    }
}

impl<T> Clone for LazySender<T> {
    fn clone(&self) -> Self {
        self.0.senders.fetch_add(1, Ordering::Relaxed);
        LazySender(self.0.clone())
    }
}

impl<T> Drop for LazySender<T> {
    fn drop(&mut self) {
        if self.0.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.wake();
        }
    }
}

impl<T> LazyReceiver<T> {
    /// The next value; `None` once closed (or every sender is gone) and nothing is left.
    #[allow(dead_code)] // the actor's ports are polled (`poll_recv`); the tests use this
    pub(crate) async fn recv(&mut self) -> Option<T> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// A value, the end, or the waker kept for the next `send` (the check and the waker's
    /// registration happen under one lock: a value queued meanwhile is not missed; the last
    /// sender's drop decrements before it takes the waker).
    pub(crate) fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut s = self.0.lock();
        if let Some(t) = s.items.pop_front() {
            if s.items.is_empty() && s.items.capacity() > KEEP {
                s.items = VecDeque::new();
            }
            return Poll::Ready(Some(t));
        }
        if s.closed || self.0.senders.load(Ordering::Acquire) == 0 {
            return Poll::Ready(None);
        }
        match &mut s.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    pub(crate) fn try_recv(&mut self) -> Result<T, TryRecvError> {
        match self.0.pop() {
            Some(t) => Ok(t),
            None if self.0.lock().closed || self.0.senders.load(Ordering::Acquire) == 0 => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }

    /// Refuse further sends; what is queued can still be received.
    pub(crate) fn close(&mut self) {
        self.0.lock().closed = true;
    }
}

impl<T> Drop for LazyReceiver<T> {
    fn drop(&mut self) {
        let left = {
            let mut s = self.0.lock();
            s.closed = true;
            std::mem::take(&mut s.items)
        };
        drop(left);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn in_order_close_and_senders_gone() {
        let (tx, mut rx) = lazy_unbounded::<u32>();
        for i in 0..100 {
            tx.send(i).unwrap();
        }
        for i in 0..100 {
            assert_eq!(rx.recv().await, Some(i));
        }
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        let waiter = tokio::spawn(async move {
            let v = rx.recv().await;
            (v, rx)
        });
        tokio::task::yield_now().await;
        tx.send(7).unwrap();
        let (v, mut rx) = waiter.await.unwrap();
        assert_eq!(v, Some(7));
        tx.send(8).unwrap();
        rx.close();
        assert!(tx.send(9).is_err());
        assert_eq!(rx.recv().await, Some(8));
        assert_eq!(rx.recv().await, None);
        let (tx, mut rx) = lazy_unbounded::<u32>();
        tx.send(1).unwrap();
        drop(tx);
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_receiver_is_woken_by_a_send_and_by_the_last_sender_going() {
        for _ in 0..100 {
            let (tx, mut rx) = lazy_unbounded::<u32>();
            let tx2 = tx.clone();
            let waiter = tokio::spawn(async move {
                let first = rx.recv().await;
                let end = rx.recv().await;
                (first, end)
            });
            tokio::task::yield_now().await;
            tx.send(5).unwrap();
            drop(tx);
            tokio::task::yield_now().await;
            drop(tx2);
            let got = tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await;
            assert_eq!(got.expect("woken").unwrap(), (Some(5), None));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_senders_nothing_lost() {
        let (tx, mut rx) = lazy_unbounded::<(u32, u32)>();
        let mut tasks = Vec::new();
        for p in 0..4 {
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..10_000 {
                    tx.send((p, i)).unwrap();
                    if i % 100 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            }));
        }
        drop(tx);
        let mut next = [0u32; 4];
        while let Some((p, i)) = rx.recv().await {
            assert_eq!(i, next[p as usize]);
            next[p as usize] += 1;
        }
        assert_eq!(next, [10_000; 4]);
    }
}
