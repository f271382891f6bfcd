//! Writer actors (`writer:{n}`): devices are spread over them by id; each batches what it is
//! sent and writes it to the store. Batching is group commit: a write takes everything queued
//! behind it (up to `batch_points`), so a quiet node writes at once and a busy one writes big
//! batches. A failed write is retried with backoff, never dropped; meanwhile the writer's
//! queue fills and devices wait (see `Telemetry::accept`). Acknowledgements are released after
//! the write unless durability is `accepted`. A batch the store refuses for its content (not
//! because it is down) is split by message until the refused messages are found: they are
//! refused to their devices with the store's reason, the rest is stored — one poison point
//! never wedges a writer.
use crate::actors::inspect::Tell;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::Telemetry;
use crate::config::Durability;
use crate::storage::timeseries::{Point, TimeSeriesStore};

/// Who waits for a message's points to be written: told `Err(reason)` when the store refuses them.
pub type Waiter = oneshot::Sender<Result<(), String>>;

pub enum WriterMessage {
    /// Points of one message, the queue room they hold, and who waits for the write (told
    /// the store's reason when it refuses them).
    Write(Vec<Point>, OwnedSemaphorePermit, Option<Waiter>),
    /// Write what is buffered.
    Commit,
    /// Write what is buffered and answer (shutdown).
    Flush(RpcReplyPort<()>),
}

impl ractor::Message for WriterMessage {}

pub struct WriterActor;

pub struct WriterArgs {
    pub telemetry: std::sync::Weak<Telemetry>,
    pub batch_points: usize,
    pub durability: Durability,
}

pub struct WriterState {
    args: WriterArgs,
    buf: Vec<Point>,
    held: Vec<OwnedSemaphorePermit>,
    /// Per message in `buf`: where its points end, and who waits for them.
    msgs: Vec<(usize, Option<Waiter>)>,
    commit_queued: bool,
}

impl Actor for WriterActor {
    type Msg = WriterMessage;
    type State = WriterState;
    type Arguments = WriterArgs;

    async fn pre_start(&self, _me: ActorRef<WriterMessage>, args: WriterArgs) -> Result<WriterState, ActorProcessingErr> {
        Ok(WriterState { args, buf: Vec::new(), held: Vec::new(), msgs: Vec::new(), commit_queued: false })
    }

    async fn handle(&self, me: ActorRef<WriterMessage>, msg: WriterMessage, st: &mut WriterState) -> Result<(), ActorProcessingErr> {
        match msg {
            WriterMessage::Write(points, permit, done) => {
                st.buf.extend(points);
                st.held.push(permit);
                let done = match done {
                    Some(done) if st.args.durability == Durability::Accepted => {
                        let _ = done.send(Ok(()));
                        None
                    }
                    other => other,
                };
                st.msgs.push((st.buf.len(), done));
                if st.buf.len() >= st.args.batch_points {
                    st.commit().await;
                } else if !st.commit_queued {
                    // Behind whatever is queued already: those points join this write.
                    st.commit_queued = true;
                    let _ = me.tell(WriterMessage::Commit);
                }
            }
            WriterMessage::Commit => {
                st.commit_queued = false;
                st.commit().await;
            }
            WriterMessage::Flush(reply) => {
                st.commit().await;
                let _ = reply.send(());
            }
        }
        Ok(())
    }
}

impl WriterState {
    async fn commit(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let Some(t) = self.args.telemetry.upgrade() else { return };
        let points = std::mem::take(&mut self.buf);
        let mut msgs = std::mem::take(&mut self.msgs);
        // Ranges of messages still to write: all of them, split in halves while the store
        // refuses a range for its content.
        let mut todo = vec![(0, msgs.len())];
        let mut refused: Vec<(usize, String)> = Vec::new();
        while let Some((a, b)) = todo.pop() {
            let from = if a == 0 { 0 } else { msgs[a - 1].0 };
            let to = msgs[b - 1].0;
            match write_retrying(&t, &points[from..to]).await {
                Ok(()) => {}
                Err(why) if b - a == 1 => refused.push((a, why)),
                Err(_) => {
                    let mid = a + (b - a) / 2;
                    todo.push((mid, b));
                    todo.push((a, mid));
                }
            }
        }
        let mut stored = Vec::with_capacity(points.len());
        let mut start = 0;
        let mut bad = refused.into_iter().peekable();
        for (i, (end, done)) in msgs.iter_mut().enumerate() {
            let outcome = match bad.next_if(|(j, _)| *j == i) {
                Some((_, why)) => {
                    let n = *end - start;
                    t.metrics.refused_points.fetch_add(n as u64, Ordering::Relaxed);
                    let device = points.get(start).map_or(0, |p| p.device_id);
                    tracing::warn!(device_id = device, points = n, reason = %why, "the time-series store refused a message's points; the rest of the batch is stored");
                    Err(why)
                }
                None => {
                    stored.extend_from_slice(&points[start..*end]);
                    Ok(())
                }
            };
            start = *end;
            if let Some(w) = done.take() {
                let _ = w.send(outcome);
            }
        }
        t.note_latest(&stored);
        if t.rollup.is_some() {
            t.touched.note(&stored);
        }
        self.held.clear();
    }
}

/// Write `points`, retrying with backoff while the store fails (it is down or slow; devices
/// wait meanwhile); `Err` only when the store refuses them for their content.
async fn write_retrying(t: &Telemetry, points: &[Point]) -> Result<(), String> {
    let n = points.len();
    let mut backoff = Duration::from_millis(50);
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        // One copy per attempt: the writer keeps the batch to split it if the store refuses
        // part of it, and to note the latest values once it is stored.
        match t.store.write_batch(points.to_vec()).await {
            Ok(()) => {
                t.metrics.observe_write(n, started.elapsed());
                if failures > 0 {
                    tracing::info!(points = n, attempts = failures + 1, "time-series write succeeded after retries");
                }
                return Ok(());
            }
            Err(crate::storage::timeseries::TsError::Refused(why)) => return Err(why),
            Err(e) => {
                t.metrics.write_errors.fetch_add(1, Ordering::Relaxed);
                if failures == 0 || failures.is_power_of_two() {
                    tracing::error!(error = %e, points = n, attempt = failures + 1, "time-series write failed; retrying (devices wait meanwhile)");
                }
                failures += 1;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Spawn `n` writers named `writer:{i}`.
pub async fn spawn(t: &Arc<Telemetry>, n: usize) -> anyhow::Result<Vec<ActorRef<WriterMessage>>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        out.push(spawn_one(t, i).await?);
    }
    Ok(out)
}

/// Start writer `i` (also to replace one that died).
pub async fn spawn_one(t: &Telemetry, i: usize) -> anyhow::Result<ActorRef<WriterMessage>> {
    let c = &t.config.telemetry;
    let args = WriterArgs { telemetry: t.me.clone(), batch_points: c.batch_points.max(1), durability: c.durability };
    let (a, _) = Actor::spawn(Some(format!("writer:{i}")), crate::actors::inspect::Instrumented(WriterActor, "writer"), args).await?;
    Ok(a)
}
