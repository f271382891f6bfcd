//! The node's shared context: configuration, counters, and the read side of the actors'
//! snapshots (subscription index, retained set) that the hot path uses without round-trips.
use crate::actors::inspect::Tell;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::{ArcSwap, ArcSwapOption};
use ractor::ActorRef;

use crate::actors::load::Load;
use crate::actors::registry::RegistryMessage;
use crate::actors::retained::{RetainedMessage, RetainedSet};
use crate::actors::router::{Router, Scope};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::message::{Durable, Message};
use crate::metrics::Metrics;
use crate::protocols::mqtt::QoS;
use crate::storage::state::{Restored, StateStore};

/// Everything a connection or actor of this node shares.
/// How often `Broker::watch_lag` measures the runtime's lateness.
const LAG_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

pub struct Broker {
    pub config: Arc<Config>,
    pub metrics: Metrics,
    pub router: Router,
    pub retained: Arc<ArcSwap<RetainedSet>>,
    pub retained_actor: ArcSwapOption<ActorRef<RetainedMessage>>,
    pub registry: ArcSwapOption<ActorRef<RegistryMessage>>,
    /// The node's durable state (sessions, queues, retained messages).
    pub state: Arc<StateStore>,
    /// What the state store held at start, until the registry restores it.
    pub restored: std::sync::Mutex<Vec<Restored>>,
    /// Set when clustering is enabled.
    pub cluster: std::sync::OnceLock<Arc<Cluster>>,
    pub started: Instant,
    /// Live packet traces (`thingsctl trace`).
    pub tracer: crate::actors::trace::Tracer,
    /// Every listener accepts (set once start-up is complete).
    pub serving: std::sync::atomic::AtomicBool,
    connect_bucket: std::sync::Mutex<(f64, Instant)>,
    /// When `watch_lag` last ran (µs since `started`).
    lag_tick_us: std::sync::atomic::AtomicU64,
    /// CONNECTs in progress per source address (`mqtt.max_pending_connects_per_address`).
    pub pending_by_address: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, u32>>,
}

impl Broker {
    pub fn new(config: Arc<Config>, state: Arc<StateStore>, restored: Vec<Restored>) -> Broker {
        let shards = config.mqtt.shards.max(1);
        let started = Instant::now();
        let connect_rate = config.mqtt.max_connect_rate as f64;
        let cluster = std::sync::OnceLock::new();
        if config.cluster.enabled {
            let _ = cluster.set(Arc::new(Cluster::new(&config.node.name)));
        }
        Broker {
            cluster,
            router: Router::new(shards, (config.mqtt.max_queued * 4).max(1024)),
            config,
            metrics: Metrics::default(),
            retained: Arc::new(ArcSwap::from_pointee(RetainedSet::default())),
            retained_actor: ArcSwapOption::empty(),
            registry: ArcSwapOption::empty(),
            state,
            restored: std::sync::Mutex::new(restored),
            started,
            tracer: Default::default(),
            serving: Default::default(),
            // The bucket starts full: a burst of `rate` connects, then `rate` per second.
            connect_bucket: std::sync::Mutex::new((connect_rate, started)),
            lag_tick_us: std::sync::atomic::AtomicU64::new(0),
            pending_by_address: Default::default(),
        }
    }

    /// Take one token from the node's CONNECT rate bucket; false when the rate is exceeded.
    /// Measure, every 100 ms, how late the runtime wakes a timer: a node whose tasks wait
    /// that long for their turn is behind on everything (acknowledgements, keep-alives, its
    /// cluster links). Runs until the broker is dropped.
    pub fn watch_lag(me: &Arc<Broker>) {
        let weak = Arc::downgrade(me);
        tokio::spawn(async move {
            loop {
                let asked = tokio::time::Instant::now() + LAG_EVERY;
                tokio::time::sleep_until(asked).await;
                let late = tokio::time::Instant::now().saturating_duration_since(asked);
                let Some(b) = weak.upgrade() else { return };
                b.metrics.scheduler_lag_us.store(late.as_micros() as u64, Ordering::Relaxed);
                b.lag_tick_us.store(b.started.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
        });
    }

    /// The node is too far behind to take on new connections (`mqtt.overload_lag_ms`): the
    /// ones it has come first. Behind now (the watcher itself has not run for that long, as
    /// when the process was stopped or starved), or lately: a timer late by L leaves about L
    /// of work piled up, so the node refuses for L after it.
    pub fn overloaded(&self) -> bool {
        let limit = self.config.mqtt.overload_lag_ms.saturating_mul(1000);
        if limit == 0 {
            return false;
        }
        let since = (self.started.elapsed().as_micros() as u64).saturating_sub(self.lag_tick_us.load(Ordering::Relaxed));
        let lag = self.metrics.scheduler_lag_us.load(Ordering::Relaxed);
        since >= limit + LAG_EVERY.as_micros() as u64 || (lag >= limit && since < lag)
    }

    pub fn admit_connect(&self) -> bool {
        let rate = self.config.mqtt.max_connect_rate as f64;
        if rate == 0.0 {
            return true;
        }
        let Ok(mut b) = self.connect_bucket.lock() else { return true };
        let now = Instant::now();
        let (tokens, last) = *b;
        let tokens = (tokens + now.duration_since(last).as_secs_f64() * rate).min(rate);
        if tokens >= 1.0 {
            *b = (tokens - 1.0, now);
            true
        } else {
            *b = (tokens, now);
            false
        }
    }

    /// Subscriptions on this node (each shared-group member counted), from the shard snapshots.
    pub fn subscription_count(&self) -> usize {
        self.router.snapshots.iter().map(|s| s.load().count()).sum()
    }

    pub fn registry(&self) -> Option<Arc<ActorRef<RegistryMessage>>> {
        self.registry.load_full()
    }

    /// Store (or delete, on an empty payload) a retained message; returns once the retained
    /// store has applied it, so a later SUBSCRIBE from anyone sees it.
    pub async fn retain(&self, msg: Arc<Message>) {
        self.retain_all(vec![msg]).await;
    }

    /// `retain` for several messages at once (in order): one update of the retained store, one
    /// wait for the state store's commit, one cluster announcement for all of them.
    pub async fn retain_all(&self, msgs: Vec<Arc<Message>>) {
        if msgs.is_empty() {
            return;
        }
        let for_cluster = msgs.clone();
        let applied = match self.retained_actor.load_full() {
            Some(r) => matches!(
                r.ask(|reply| RetainedMessage::Set(msgs, reply), Some(std::time::Duration::from_secs(5))).await,
                Ok(ractor::rpc::CallResult::Success(()))
            ),
            None => false,
        };
        if !applied {
            // Only while the retained store restarts; the messages are still routed to subscribers.
            let topic = &for_cluster[0].topic;
            tracing::warn!(%topic, count = for_cluster.len(), "retained store unavailable; retained update not applied");
        } else {
            // Acknowledged only once the retained set's change is durable.
            if for_cluster.iter().any(|m| !m.topic.starts_with("$SYS")) {
                self.state.committed().await;
            }
            if let Some(c) = self.cluster.get() {
                for m in for_cluster {
                    c.retained_changed(m);
                }
            }
        }
    }

    /// Queue depth above which an online subscriber pauses its publishers: below the point
    /// where its queue would start dropping.
    pub fn high_water(&self) -> usize {
        let m = &self.config.mqtt;
        m.backpressure_high_water.min(m.max_queued / 2).max(1)
    }

    /// Route a message to every matching subscriber; returns how many sessions it was given to.
    pub fn publish(&self, msg: Arc<Message>) -> usize {
        self.router.publish(msg, usize::MAX, self.scope(), None).0
    }

    /// Route without waiting; in a cluster, a QoS>0 message also returns what its
    /// acknowledgement must wait for (see `publish_routed`).
    pub fn publish_durable(&self, msg: Arc<Message>) -> (usize, Option<Arc<Durable>>) {
        let durable = self.durable_for(&msg);
        let n = self.router.publish(msg, usize::MAX, self.scope(), durable.as_ref()).0;
        (n, durable)
    }

    /// What a QoS>0 message's acknowledgement waits for: each subscriber's copy taken into its
    /// queue (stored, for persistent sessions, under the state store's durability), and in a
    /// cluster on backup nodes and remote nodes.
    fn durable_for(&self, msg: &Message) -> Option<Arc<Durable>> {
        (msg.qos != QoS::AtMostOnce).then(|| Arc::new(Durable::default()))
    }

    /// Publishes from this node's clients reach the cluster; `$SYS` stays on its node.
    fn scope(&self) -> Scope<'_> {
        match self.cluster.get() {
            Some(c) => Scope::Cluster(c),
            None => Scope::Local,
        }
    }

    /// Route, then wait (bounded) while an online subscriber is congested: a fast publisher is
    /// slowed to its subscribers' pace instead of overflowing their queues. In a cluster, also
    /// wait until the message is durable (see `publish_routed`).
    pub async fn publish_with_backpressure(&self, msg: Arc<Message>) -> usize {
        let (n, durable) = self.publish_routed(msg).await;
        if let Some(d) = durable {
            Broker::wait_durable(&d).await;
        }
        n
    }

    /// Route with backpressure; in a cluster, a QoS>0 message also returns what its
    /// acknowledgement must wait for: every persistent session's copy on that session's backup
    /// node, and forwarded copies acknowledged by their nodes (which includes their backups).
    pub async fn publish_routed(&self, msg: Arc<Message>) -> (usize, Option<Arc<Durable>>) {
        let high = self.high_water();
        let durable = self.durable_for(&msg);
        let (n, worst) = self.router.publish(msg, high, self.scope(), durable.as_ref());
        self.wait_for(worst).await;
        if let Some(c) = self.cluster.get() {
            // Queued for a peer beyond the high-water mark: the publisher waits, as for a local
            // congested subscriber (frames in flight are bounded separately).
            c.pace(high, std::time::Duration::from_millis(self.config.mqtt.slow_subscriber_ms)).await;
        }
        (n, durable)
    }

    /// Wait (bounded) for a message to be durable; a timeout is logged and the caller goes on.
    pub async fn wait_durable(d: &Durable) {
        if !d.wait(std::time::Duration::from_secs(5)).await {
            tracing::warn!("replication to backup nodes timed out; acknowledging anyway");
        }
    }

    /// Wait (bounded) while an online subscriber of `topic` is congested.
    pub async fn pace(&self, topic: &str) {
        let worst = self.router.congested(topic, self.high_water());
        self.wait_for(worst).await;
    }

    pub async fn wait_for(&self, worst: Option<Arc<Load>>) {
        if let Some(load) = worst {
            load.wait_below(self.high_water(), std::time::Duration::from_millis(self.config.mqtt.slow_subscriber_ms)).await;
        }
    }
}
