//! Writer actors (`writer:{n}`): devices are spread over them by id; each batches what it is
//! sent and writes it to the store. Batching is group commit: a write takes everything queued
//! behind it (up to `batch_points`), so a quiet node writes at once and a busy one writes big
//! batches. A failed write is retried with backoff, never dropped; meanwhile the writer's
//! queue fills and devices wait (see `Telemetry::accept`). Acknowledgements are released after
//! the write unless durability is `accepted`.
use crate::actors::inspect::Tell;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::Telemetry;
use crate::config::Durability;
use crate::storage::timeseries::{Point, TimeSeriesStore};

pub enum WriterMsg {
    /// Points of one message, the queue room they hold, and who waits for the write.
    Write(Vec<Point>, OwnedSemaphorePermit, Option<oneshot::Sender<()>>),
    /// Write what is buffered.
    Commit,
    /// Write what is buffered and answer (shutdown).
    Flush(RpcReplyPort<()>),
}

impl ractor::Message for WriterMsg {}

pub struct Writer;

pub struct WriterArgs {
    pub telemetry: std::sync::Weak<Telemetry>,
    pub batch_points: usize,
    pub durability: Durability,
}

pub struct WriterState {
    args: WriterArgs,
    buf: Vec<Point>,
    held: Vec<OwnedSemaphorePermit>,
    waiting: Vec<oneshot::Sender<()>>,
    commit_queued: bool,
}

impl Actor for Writer {
    type Msg = WriterMsg;
    type State = WriterState;
    type Arguments = WriterArgs;

    async fn pre_start(&self, _me: ActorRef<WriterMsg>, args: WriterArgs) -> Result<WriterState, ActorProcessingErr> {
        Ok(WriterState { args, buf: Vec::new(), held: Vec::new(), waiting: Vec::new(), commit_queued: false })
    }

    async fn handle(&self, me: ActorRef<WriterMsg>, msg: WriterMsg, st: &mut WriterState) -> Result<(), ActorProcessingErr> {
        match msg {
            WriterMsg::Write(points, permit, done) => {
                st.buf.extend(points);
                st.held.push(permit);
                if let Some(done) = done {
                    if st.args.durability == Durability::Accepted {
                        let _ = done.send(());
                    } else {
                        st.waiting.push(done);
                    }
                }
                if st.buf.len() >= st.args.batch_points {
                    st.commit().await;
                } else if !st.commit_queued {
                    // Behind whatever is queued already: those points join this write.
                    st.commit_queued = true;
                    let _ = me.tell(WriterMsg::Commit);
                }
            }
            WriterMsg::Commit => {
                st.commit_queued = false;
                st.commit().await;
            }
            WriterMsg::Flush(reply) => {
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
        let n = points.len();
        let mut backoff = Duration::from_millis(50);
        let mut failures = 0u32;
        loop {
            let started = Instant::now();
            match t.store.write_batch(points.clone()).await {
                Ok(()) => {
                    t.metrics.observe_write(n, started.elapsed());
                    break;
                }
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
        if failures > 0 {
            tracing::info!(points = n, attempts = failures + 1, "time-series write succeeded after retries");
        }
        t.note_latest(&points);
        for w in self.waiting.drain(..) {
            let _ = w.send(());
        }
        self.held.clear();
    }
}

/// Spawn `n` writers named `writer:{i}`.
pub async fn spawn(t: &Arc<Telemetry>, n: usize) -> anyhow::Result<Vec<ActorRef<WriterMsg>>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        out.push(spawn_one(t, i).await?);
    }
    Ok(out)
}

/// Start writer `i` (also to replace one that died).
pub async fn spawn_one(t: &Telemetry, i: usize) -> anyhow::Result<ActorRef<WriterMsg>> {
    let c = &t.config.telemetry;
    let args = WriterArgs { telemetry: t.me.clone(), batch_points: c.batch_points.max(1), durability: c.durability };
    let (a, _) = Actor::spawn(Some(format!("writer:{i}")), crate::actors::inspect::Instrumented(Writer, "writer"), args).await?;
    Ok(a)
}
