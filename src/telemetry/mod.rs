//! Telemetry: device events become points (flattened, transformed by their product's rules),
//! are handed to writer actors (sharded by device) with back-pressure, and are stored in the
//! node's time-series store; the latest value of every key is kept hot. Queries go to the
//! store (`query`), maintenance (retention, compaction) runs in `maintenance`.
pub mod maintenance;
pub mod rollup;
pub mod rules;
pub mod writer;

use crate::actors::inspect::Tell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use ractor::ActorRef;
use serde_json::{json, Map, Value as Json};
use tokio::sync::Semaphore;

use crate::config::{Config, Durability};
use crate::storage::cache::{Cache, ExpiringMap};
use crate::storage::meta::{MetaError, MetaStore, PolicyScope};
use crate::storage::timeseries::{embedded, flatten, postgres, tdengine, Point, TimeSeriesStore, Tsdb, Value};
use rules::{Rule, RuleSet};
use writer::WriterMessage;

/// How long a device's noted product is trusted without reading the device again (changes
/// made through the API update it at once; this bounds what a missed notice can cost).
const PRODUCT_TTL: Duration = Duration::from_secs(600);

/// Devices must wait: the writers' queues are full (the store is slow or down).
#[derive(Debug, thiserror::Error)]
#[error("telemetry store busy: try again")]
pub struct Busy;

/// Why a message's telemetry was not stored.
#[derive(Debug, thiserror::Error)]
pub enum NotStored {
    /// No room, or the write did not finish within `telemetry.ack_timeout_ms`: send again
    /// (writes are idempotent per device, key and time).
    #[error(transparent)]
    Busy(#[from] Busy),
    /// The store refuses these points for their content; sending them again cannot succeed.
    #[error("{0}")]
    Refused(String),
}

#[derive(Default)]
pub struct TelemetryMetrics {
    pub points: AtomicU64,
    pub batches: AtomicU64,
    pub write_errors: AtomicU64,
    pub busy: AtomicU64,
    /// Writes a device stopped waiting for (`ack_timeout_ms`): answered busy, still queued.
    pub ack_timeouts: AtomicU64,
    /// Points the store refused for their content (refused to their devices, or dropped and
    /// logged under durability `accepted`, where the device had its answer already).
    pub refused_points: AtomicU64,
    pub skipped_keys: AtomicU64,
    /// Store write latency histogram: counts per upper bound of `LATENCY_BOUNDS` (+Inf last).
    pub latency: [AtomicU64; 9],
    pub latency_sum_us: AtomicU64,
    /// Batch size histogram per upper bound of `BATCH_BOUNDS` (+Inf last).
    pub batch_sizes: [AtomicU64; 6],
}

pub const LATENCY_BOUNDS: [f64; 8] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];
pub const BATCH_BOUNDS: [f64; 5] = [10.0, 100.0, 1000.0, 10_000.0, 100_000.0];

impl TelemetryMetrics {
    fn observe_write(&self, n: usize, took: Duration) {
        self.points.fetch_add(n as u64, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        let s = took.as_secs_f64();
        let i = LATENCY_BOUNDS.iter().position(|b| s <= *b).unwrap_or(LATENCY_BOUNDS.len());
        self.latency[i].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        let i = BATCH_BOUNDS.iter().position(|b| n as f64 <= *b).unwrap_or(BATCH_BOUNDS.len());
        self.batch_sizes[i].fetch_add(1, Ordering::Relaxed);
    }
}

pub struct Telemetry {
    pub store: Tsdb,
    /// Hourly roll-ups (not with TDengine).
    pub rollup: Option<Tsdb>,
    pub config: Arc<Config>,
    meta: MetaStore,
    cache: Cache,
    /// Writer shards: the actor (replaced if it dies) and its queue's room.
    writers: OnceLock<Vec<WriterSlot>>,
    /// Itself, for the writers it spawns.
    me: std::sync::Weak<Telemetry>,
    respawn: tokio::sync::Mutex<()>,
    /// Compiled rules per product (other nodes pick up a change within their TTL).
    rules: moka::sync::Cache<i64, Arc<RuleSet>>,
    /// Device → product as its last login (or a read of the device) found it, trusted for
    /// `PRODUCT_TTL`: points are checked against the product's rules without reading the
    /// device again. A plain map, not a moka entry per connected device.
    products: ExpiringMap<i64, Option<i64>>,
    /// Products whose rules could not be read, warned about in the last minute (a database
    /// outage is logged once a minute per product, not once per message).
    rules_unreadable: crate::metrics::OncePer<i64>,
    /// Latest value of every key per device (also written to the shared cache).
    hot: moka::sync::Cache<i64, Arc<std::sync::Mutex<LatestOf>>>,
    /// Bounds the background tasks that copy latest values to the shared cache.
    cache_writes: Arc<Semaphore>,
    pub metrics: TelemetryMetrics,
    pub maintenance: OnceLock<ActorRef<maintenance::MaintenanceMessage>>,
    /// Which devices stored numeric points in which hours (what the next roll-up run asks).
    pub touched: rollup::Touched,
    pub last_report: std::sync::Mutex<Option<maintenance::Report>>,
}

/// One message's telemetry: a device's values at one time.
pub struct Sample<'a> {
    pub device_id: i64,
    pub ts: i64,
    pub values: &'a Map<String, Json>,
}

/// Points handed to the writers, not yet known to be written: [`Accepted::written`] waits.
#[must_use = "the points are queued; whether they were written is only known by waiting"]
pub struct Accepted(Vec<tokio::sync::oneshot::Receiver<Result<(), String>>>);

impl Accepted {
    /// Wait for the writes, at most `ack` (`None`: as long as they take — writers retry until
    /// the store takes the points): a store that hangs or keeps failing answers "busy" (the
    /// points stay queued and are written when it recovers; the device's resend overwrites
    /// them). A writer that dies first drops the waiter: busy too, so the device sends again.
    pub async fn written(self, t: &Telemetry, ack: Option<Duration>) -> Result<(), NotStored> {
        let all = futures_util::future::join_all(self.0);
        let outcome = match ack {
            Some(ack) => tokio::time::timeout(ack, all).await,
            None => Ok(all.await),
        };
        match outcome {
            Ok(outcomes) => {
                let mut busy = false;
                for o in outcomes {
                    match o {
                        Ok(Ok(())) => {}
                        Ok(Err(why)) => return Err(NotStored::Refused(why)),
                        Err(_) => busy = true,
                    }
                }
                if busy {
                    return Err(Busy.into());
                }
                Ok(())
            }
            Err(_) => {
                t.metrics.ack_timeouts.fetch_add(1, Ordering::Relaxed);
                Err(Busy.into())
            }
        }
    }
}

/// A writer shard: the actor (swapped when replaced) and its queue's room.
type WriterSlot = (arc_swap::ArcSwap<ActorRef<WriterMessage>>, Arc<Semaphore>);
/// A device's latest (ts, value) per key.
type LatestOf = BTreeMap<String, (i64, Value)>;

const RULES_TTL: Duration = Duration::from_secs(30);

/// The roll-up store next to the raw one: `data_dir/tsdb-rollup`, or `ts_rollup_*` tables.
pub async fn open_rollup_store(config: &Config, raw: &Tsdb) -> anyhow::Result<Option<Tsdb>> {
    Ok(match raw {
        Tsdb::Embedded(_) => Some(open_embedded(config, "tsdb-rollup", 100_000).await?),
        Tsdb::Postgres(_) => Some(Tsdb::Postgres(Arc::new(
            postgres::PgStore::open_prefixed(&config.telemetry.store, 2, "ts_rollup_").await.context("open the roll-up tables")?,
        ))),
        Tsdb::Tdengine(_) => None,
    })
}

/// An embedded store in `data_dir/{name}` (fsynced WAL under `synced` durability).
async fn open_embedded(config: &Config, name: &str, segment_points: usize) -> anyhow::Result<Tsdb> {
    let dir = config.node.data_dir.join(name);
    let sync = config.telemetry.durability == Durability::Synced;
    let d = dir.clone();
    let s = tokio::task::spawn_blocking(move || embedded::EmbeddedStore::open(&d, segment_points, sync))
        .await?
        .with_context(|| format!("open the embedded time-series store in {}", dir.display()))?;
    Ok(Tsdb::Embedded(Arc::new(embedded::Shared::new(s))))
}

/// Open the configured store.
pub async fn open_store(config: &Config) -> anyhow::Result<Tsdb> {
    let t = &config.telemetry;
    let url = t.store.as_str();
    let masked = crate::config::mask_url_password(url);
    Ok(if url.is_empty() || url == "embedded" {
        open_embedded(config, "tsdb", t.segment_points).await?
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let conns = (t.writers as u32 + 4).max(4);
        Tsdb::Postgres(Arc::new(postgres::PgStore::open(url, conns).await.with_context(|| format!("open the time-series store {masked}"))?))
    } else if url.starts_with("taos") {
        let keep = if t.retention_days == 0 { 36_500 } else { t.retention_days };
        Tsdb::Tdengine(Arc::new(tdengine::TdStore::open(url, keep).await.with_context(|| format!("open the time-series store {masked}"))?))
    } else {
        anyhow::bail!("telemetry.store must be empty (embedded), postgres://… or taos+ws://…, not {masked:?}");
    })
}

impl Telemetry {
    /// Start the writers and the maintenance actor over stores the node opened
    /// (`services::Stores`).
    pub async fn start(
        config: Arc<Config>,
        meta: MetaStore,
        cache: Cache,
        store: Tsdb,
        rollup: Option<Tsdb>,
    ) -> anyhow::Result<Arc<Telemetry>> {
        let t = Arc::new_cyclic(|me| Telemetry {
            me: me.clone(),
            respawn: tokio::sync::Mutex::new(()),
            store,
            rollup,
            meta,
            cache,
            writers: OnceLock::new(),
            rules: moka::sync::Cache::builder().max_capacity(100_000).time_to_live(RULES_TTL).build(),
            products: ExpiringMap::new(2_000_000, PRODUCT_TTL),
            rules_unreadable: crate::metrics::OncePer::new(10_000, Duration::from_secs(60)),
            hot: moka::sync::Cache::builder().max_capacity(1_000_000).build(),
            cache_writes: Arc::new(Semaphore::new(64)),
            metrics: TelemetryMetrics::default(),
            maintenance: OnceLock::new(),
            touched: rollup::Touched::default(),
            last_report: std::sync::Mutex::new(None),
            config: config.clone(),
        });
        let c = &config.telemetry;
        let n = c.writers.clamp(1, 64);
        let refs = writer::spawn(&t, n).await?;
        let queue = c.writer_queue.clamp(1, Semaphore::MAX_PERMITS);
        let _ = t.writers.set(refs.into_iter().map(|r| (arc_swap::ArcSwap::from_pointee(r), Arc::new(Semaphore::new(queue)))).collect());
        maintenance::spawn(&t).await?;
        tracing::info!(store = t.store.name(), writers = n, durability = ?c.durability, "telemetry ready");
        Ok(t)
    }

    /// Store the telemetry of one or many messages (one request's array, a gateway's devices):
    /// rules, flattening, then one hand-over per writer, waiting for room at most `wait` and,
    /// unless durability is `accepted`, for the writes (at most `telemetry.ack_timeout_ms`).
    /// Succeeds when every point is stored; `Busy` or `Refused` otherwise (some points may be
    /// stored: sending everything again is safe, writes are idempotent per device, key and time).
    pub async fn accept_all(&self, samples: &[Sample<'_>], wait: Duration) -> Result<(), NotStored> {
        let ack = Duration::from_millis(self.config.telemetry.ack_timeout_ms.max(1));
        self.hand_over_all(samples, wait).await?.written(self, Some(ack)).await
    }

    /// The first half of [`accept_all`](Self::accept_all): the points are the writers' when
    /// this returns (each writer is sent its devices' points in one message); the returned
    /// [`Accepted`] waits for the writes. A caller that has more to do meanwhile (an MQTT
    /// connection reading the device's next packets) waits for it later.
    pub async fn hand_over_all(&self, samples: &[Sample<'_>], wait: Duration) -> Result<Accepted, NotStored> {
        let Some(writers) = self.writers.get() else { return Err(Busy.into()) };
        let mut by_shard: Vec<Vec<Point>> = (0..writers.len()).map(|_| Vec::new()).collect();
        let mut rules: Option<(i64, Option<Arc<RuleSet>>)> = None;
        for s in samples {
            let shard = s.device_id.rem_euclid(writers.len() as i64) as usize;
            let out = &mut by_shard[shard];
            let from = out.len();
            let skipped = flatten(s.device_id, s.ts, s.values, out);
            if skipped > 0 {
                self.metrics.skipped_keys.fetch_add(skipped as u64, Ordering::Relaxed);
            }
            // Consecutive samples are mostly one device's: its rules are looked up once.
            let rs = match &rules {
                Some((d, rs)) if *d == s.device_id => rs.clone(),
                _ => {
                    let rs = self.rules_of_device(s.device_id).await;
                    rules = Some((s.device_id, rs.clone()));
                    rs
                }
            };
            if let Some(rs) = rs {
                let mut m: BTreeMap<String, Value> = out.drain(from..).map(|p| (p.key, p.value)).collect();
                rs.apply(&mut m);
                out.extend(m.into_iter().map(|(key, value)| Point { device_id: s.device_id, key, ts: s.ts, value }));
            }
        }
        let deadline = tokio::time::Instant::now() + wait;
        let mut pending = Vec::new();
        for (shard, points) in by_shard.into_iter().enumerate() {
            if points.is_empty() {
                continue;
            }
            pending.push(self.hand_over(shard, points, deadline).await?);
        }
        Ok(Accepted(pending))
    }

    /// Give one writer `points`, waiting for room in its queue until `deadline`; the receiver
    /// is told the write's outcome.
    async fn hand_over(
        &self,
        shard: usize,
        points: Vec<Point>,
        deadline: tokio::time::Instant,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<(), String>>, NotStored> {
        let Some(writers) = self.writers.get() else { return Err(Busy.into()) };
        let (w, room) = &writers[shard];
        let want = (points.len() as u32).min(self.config.telemetry.writer_queue.clamp(1, Semaphore::MAX_PERMITS) as u32);
        let permit = match tokio::time::timeout_at(deadline, room.clone().acquire_many_owned(want)).await {
            Ok(Ok(p)) => p,
            _ => {
                self.metrics.busy.fetch_add(1, Ordering::Relaxed);
                return Err(Busy.into());
            }
        };
        let (done, written) = tokio::sync::oneshot::channel();
        let msg = WriterMessage::Write(points, permit, Some(done));
        if let Err(ractor::MessagingErr::SendErr(msg)) = w.load().tell(msg) {
            // The writer died (a bug, logged by ractor): start a new one and hand it over.
            let fresh = self.replace_writer(shard).await.ok_or(Busy)?;
            fresh.tell(msg).map_err(|_| Busy)?;
        }
        Ok(written)
    }

    /// Points accepted and not yet taken by a writer (the queues' used room).
    pub fn queued_points(&self) -> u64 {
        let cap = self.config.telemetry.writer_queue.clamp(1, Semaphore::MAX_PERMITS) as u64;
        self.writers.get().map_or(0, |w| w.iter().map(|(_, room)| cap.saturating_sub(room.available_permits() as u64)).sum())
    }

    async fn replace_writer(&self, shard: usize) -> Option<ActorRef<WriterMessage>> {
        let _one = self.respawn.lock().await;
        let slot = &self.writers.get()?[shard].0;
        let cur = slot.load_full();
        if !matches!(cur.get_status(), ractor::ActorStatus::Stopped | ractor::ActorStatus::Stopping) {
            return Some((*cur).clone());
        }
        // Its name is free once it has stopped.
        for _ in 0..100 {
            match writer::spawn_one(self, shard).await {
                Ok(a) => {
                    tracing::error!(shard, "telemetry writer died; replaced");
                    crate::actors::inspect::restarted(&format!("writer:{shard}"));
                    slot.store(Arc::new(a.clone()));
                    return Some(a);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        None
    }

    /// Run retention and compaction now.
    pub async fn maintain_now(&self) -> Result<maintenance::Report, String> {
        let Some(m) = self.maintenance.get() else { return maintenance::run(self).await };
        match m.ask(maintenance::MaintenanceMessage::RunNow, Some(Duration::from_secs(600))).await {
            Ok(ractor::rpc::CallResult::Success(r)) => r,
            _ => Err("maintenance actor did not answer".into()),
        }
    }

    /// Write everything queued (graceful shutdown) and make the store durable.
    pub async fn shutdown(&self) {
        if let Some(m) = self.maintenance.get() {
            m.stop(None);
        }
        for (w, _) in self.writers.get().into_iter().flatten() {
            let w = w.load_full();
            let _ = w.ask(WriterMessage::Flush, Some(Duration::from_secs(60))).await;
            w.stop(None);
        }
        for s in std::iter::once(&self.store).chain(self.rollup.as_ref()) {
            if let Err(e) = s.flush().await {
                tracing::error!(error = %e, "time-series flush at shutdown failed (the embedded store replays its WAL at the next start)");
            }
        }
    }

    /// A device's product as its login found it (see `Devices::identity`).
    pub fn note_product(&self, device_id: i64, product: Option<i64>) {
        self.products.insert(device_id, product);
        if let Tsdb::Tdengine(td) = &self.store {
            td.note_product(device_id, product.unwrap_or(0));
        }
    }

    pub async fn product_of(&self, device_id: i64) -> Option<i64> {
        if let Some(p) = self.products.get(&device_id) {
            return p;
        }
        match self.meta.device_by_id(device_id).await {
            Ok(d) => {
                self.note_product(device_id, d.product_id);
                d.product_id
            }
            Err(_) => None,
        }
    }

    async fn rules_of_device(&self, device_id: i64) -> Option<Arc<RuleSet>> {
        let product = self.product_of(device_id).await?;
        if let Some(r) = self.rules.get(&product) {
            return (!r.is_empty()).then_some(r);
        }
        let rs = match self.meta.policy(PolicyScope::Product, product).await {
            Ok(Some(p)) => match serde_json::from_value::<Vec<Rule>>(p.rules).map_err(|e| e.to_string()).and_then(|r| RuleSet::compile(&r))
            {
                Ok(rs) => rs,
                Err(e) => {
                    tracing::error!(product, error = %e, "stored telemetry rules do not compile; storing values untransformed");
                    RuleSet::compile(&[]).ok()?
                }
            },
            Ok(None) => RuleSet::compile(&[]).ok()?,
            // Meta store down: do not cache the miss.
            Err(e) => {
                if self.rules_unreadable.first(product) {
                    tracing::warn!(product, error = %e, "cannot read telemetry rules (logged once a minute per product)");
                }
                return None;
            }
        };
        let rs = Arc::new(rs);
        self.rules.insert(product, rs.clone());
        (!rs.is_empty()).then_some(rs)
    }

    /// Check and save a product's rules and retention; they apply to the next message.
    pub async fn set_product_policy(&self, product: i64, rules: Json, raw_days: i64) -> Result<crate::storage::meta::Policy, MetaError> {
        let parsed: Vec<Rule> = serde_json::from_value(rules.clone()).map_err(|e| MetaError::Invalid(format!("rules: {e}")))?;
        RuleSet::compile(&parsed).map_err(MetaError::Invalid)?;
        let p = self.meta.set_policy(PolicyScope::Product, product, &rules, raw_days).await?;
        self.rules.invalidate(&product);
        Ok(p)
    }

    /// After a write: the latest values, in memory and (in the background, best effort) in
    /// the shared cache for other nodes.
    fn note_latest(&self, points: &[Point]) {
        let mut by_dev: BTreeMap<i64, Vec<&Point>> = BTreeMap::new();
        for p in points {
            by_dev.entry(p.device_id).or_default().push(p);
        }
        let mut docs = Vec::new();
        for (d, pts) in by_dev {
            // Updated in place: a write no longer copies the device's whole map.
            let entry = self.hot.get_with(d, Default::default);
            let mut m = entry.lock().unwrap_or_else(|e| e.into_inner());
            for p in pts {
                match m.get_mut(&p.key) {
                    Some(e) if e.0 > p.ts => {}
                    Some(e) => *e = (p.ts, p.value.clone()),
                    None => {
                        m.insert(p.key.clone(), (p.ts, p.value.clone()));
                    }
                }
            }
            if self.cache.is_redis() {
                docs.push((d, latest_doc(&m)));
            }
        }
        if docs.is_empty() {
            return;
        }
        let Ok(permit) = self.cache_writes.clone().try_acquire_owned() else { return };
        let cache = self.cache.clone();
        tokio::spawn(async move {
            for (d, doc) in docs {
                cache.set(&format!("latest:{d}"), &doc.to_string(), Duration::from_secs(7 * 86_400)).await;
            }
            drop(permit);
        });
    }

    /// Latest values of a device: the shared cache (Redis: written by whichever node the
    /// device is on), this node's memory, or the store.
    pub async fn latest(&self, device_id: i64) -> Result<Json, crate::storage::timeseries::TsError> {
        if self.cache.is_redis() {
            if let Some(doc) = self.cache.get(&format!("latest:{device_id}")).await.and_then(|s| serde_json::from_str(&s).ok()) {
                return Ok(doc);
            }
        }
        if let Some(m) = self.hot.get(&device_id) {
            return Ok(latest_doc(&m.lock().unwrap_or_else(|e| e.into_inner())));
        }
        let pts = self.store.latest(&[device_id]).await?;
        let m: BTreeMap<String, (i64, Value)> = pts.into_iter().map(|p| (p.key, (p.ts, p.value))).collect();
        Ok(latest_doc(&m))
    }
}

impl Telemetry {
    /// The latest (ts, value) of `key` on each of `devices` that has it: from the shared cache
    /// when there is one (written by whichever node each device is on; 32 reads at a time),
    /// else from the store in one call.
    pub async fn latest_of_key(&self, devices: &[i64], key: &str) -> Result<Vec<(i64, i64, Json)>, crate::storage::timeseries::TsError> {
        use futures_util::StreamExt;
        if !self.cache.is_redis() {
            let pts = self.store.latest(devices).await?;
            return Ok(pts.into_iter().filter(|p| p.key == key).map(|p| (p.device_id, p.ts, json!(p.value))).collect());
        }
        let docs: Vec<_> = futures_util::stream::iter(devices.iter().copied())
            .map(|d| async move { (d, self.latest(d).await) })
            .buffer_unordered(32)
            .collect()
            .await;
        let mut out = Vec::new();
        for (d, doc) in docs {
            if let Some(v) = doc?.get(key) {
                out.push((d, v["ts"].as_i64().unwrap_or(0), v["value"].clone()));
            }
        }
        Ok(out)
    }
}

fn latest_doc(m: &BTreeMap<String, (i64, Value)>) -> Json {
    Json::Object(m.iter().map(|(k, (ts, v))| (k.clone(), json!({"ts": ts, "value": v}))).collect())
}
