//! Alerting: rules are shared out over the live nodes by rendezvous hash, so each runs on
//! exactly one node (as that node sees the membership) and moves when its node dies; the
//! node runs an actor per rule it owns (`actor.rs`). Every node looks at its own devices'
//! events, finds the rules that watch the device (by device, group or product) and hands the
//! values to the rule's owner — locally, or over the cluster link. Notifications (webhooks
//! signed with HMAC-SHA256, e-mail over SMTP, a command to the device) are sent by a
//! bounded queue off the rule actors, with retries and backoff (`notify.rs`).
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use ractor::{Actor, ActorRef};
use tokio::sync::mpsc;

use crate::broker::Broker;
use crate::devices::{DeviceEvent, Devices, EventKind};
use crate::storage::meta::{Alert, MetaError, StoredRule};

mod actor;
pub mod notify;
pub mod rule;

pub use actor::{Ev, LoadedRule, RuleMessage};
pub use rule::RuleSpec;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeKind {
    Raised,
    Acknowledged,
    Cleared,
}

impl NoticeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NoticeKind::Raised => "alert.raised",
            NoticeKind::Acknowledged => "alert.acknowledged",
            NoticeKind::Cleared => "alert.cleared",
        }
    }
}

/// A notification to send.
pub struct Notice {
    pub kind: NoticeKind,
    pub alert: Alert,
    pub rule: Arc<LoadedRule>,
}

/// A round's events for the rules one peer runs: each event once, with those rules' ids.
type PeerEvents = Vec<(Arc<Ev>, Vec<i64>)>;

/// Most device events handed to the rules in one round.
const BATCH: usize = 256;

#[derive(Default)]
struct Index {
    rules: HashMap<i64, Arc<LoadedRule>>,
    by_device: HashMap<String, Vec<i64>>,
    by_group: HashMap<i64, Vec<i64>>,
    by_product: HashMap<i64, Vec<i64>>,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct AlertMetrics {
    pub raised: AtomicU64,
    pub cleared: AtomicU64,
    pub notifications_sent: AtomicU64,
    pub notifications_failed: AtomicU64,
    /// Notifications dropped because the queue was full.
    pub notifications_dropped: AtomicU64,
    /// Events for rules that were moving between nodes.
    pub events_dropped: AtomicU64,
}

pub struct Alerts {
    pub devices: Arc<Devices>,
    /// Live events for API websockets (alert changes).
    live: Arc<crate::live::Live>,
    broker: Weak<Broker>,
    me: Arc<str>,
    index: ArcSwap<Index>,
    running: Mutex<HashMap<i64, (ActorRef<RuleMessage>, i64)>>,
    /// Rules whose actor is starting (loading its devices and open alerts): their events wait
    /// here and are handed over, in order, before any later one (locked with `running`).
    starting: Mutex<HashMap<i64, Vec<Arc<Ev>>>>,
    /// Group and product of each device (for matching events to rules).
    placement: moka::sync::Cache<i64, (Option<i64>, Option<i64>)>,
    notices: mpsc::Sender<Notice>,
    pub metrics: AlertMetrics,
    config: crate::config::AlertsConfig,
    /// Wakes the reconciler at once (a rule changed here).
    wake: tokio::sync::Notify,
    stopped: std::sync::atomic::AtomicBool,
    /// What the last complete reconcile saw: the rules' fingerprint and the live members.
    /// Unchanged, a round reads nothing else (at most `FULL_RELOAD` apart).
    seen: Mutex<Option<Seen>>,
}

/// The enabled rules' fingerprint and the sorted live peers, and when they were read.
type Seen = ((i64, i64, i64), Vec<Arc<str>>, std::time::Instant);

/// A full re-read of the rules at least this often, whatever the fingerprint says.
const FULL_RELOAD: Duration = Duration::from_secs(60);

/// Events kept for one starting rule at most.
const STARTING_MAX: usize = 10_000;

impl Alerts {
    /// Start sharing out the rules, following device events and sending notifications.
    pub fn start(broker: &Arc<Broker>, devices: Arc<Devices>, live: Arc<crate::live::Live>) -> Arc<Alerts> {
        let config = broker.config.alerts.clone();
        let (tx, rx) = mpsc::channel(config.notify_queue.max(1));
        let a = Arc::new(Alerts {
            devices,
            live,
            broker: Arc::downgrade(broker),
            me: Arc::from(broker.config.node.name.as_str()),
            index: ArcSwap::from_pointee(Index::default()),
            starting: Mutex::default(),
            running: Mutex::default(),
            // A device moved to another group or product reaches group/product rules within
            // this time (devices move rarely; a lookup per device per minute is cheap).
            placement: moka::sync::Cache::builder().max_capacity(1_000_000).time_to_live(Duration::from_secs(60)).build(),
            notices: tx,
            metrics: AlertMetrics::default(),
            config,
            wake: tokio::sync::Notify::new(),
            stopped: Default::default(),
            seen: Mutex::default(),
        });
        notify::spawn(&a, rx);
        if a.config.enabled {
            Alerts::spawn_reconciler(&a);
            Alerts::spawn_follower(&a);
        }
        a
    }

    /// The node that runs rule `id`: rendezvous hash over this node and its live peers.
    pub fn owner_of(&self, id: i64) -> Arc<str> {
        match self.broker.upgrade().and_then(|b| b.cluster.get().cloned()) {
            Some(c) => c.owner_of(&format!("alert:{id}")),
            None => self.me.clone(),
        }
    }

    /// A rule changed here: re-read the rules now rather than at the next round.
    pub fn changed(&self) {
        self.wake.notify_one();
    }

    fn spawn_reconciler(me: &Arc<Alerts>) {
        let weak = Arc::downgrade(me);
        let every = Duration::from_millis(me.config.reconcile_ms.max(100));
        tokio::spawn(async move {
            loop {
                let Some(a) = weak.upgrade() else { return };
                if a.stopped.load(Ordering::Relaxed) {
                    return;
                }
                if let Err(e) = a.reconcile().await {
                    tracing::warn!(error = %e, "cannot load the alert rules; retrying");
                }
                let wait = tokio::time::sleep(every);
                tokio::select! {
                    _ = wait => {}
                    _ = a.wake.notified() => {}
                }
            }
        });
    }

    /// The live peers, sorted (what rule ownership depends on besides the rules).
    fn peers(&self) -> Vec<Arc<str>> {
        let mut p = match self.broker.upgrade().and_then(|b| b.cluster.get().cloned()) {
            Some(c) => c.live_peers().to_vec(),
            None => Vec::new(),
        };
        p.sort();
        p
    }

    /// Load the enabled rules, index them, and run the ones this node owns — unless neither
    /// the rules (their fingerprint, one aggregate query) nor the live members changed since
    /// the last complete round.
    async fn reconcile(self: &Arc<Self>) -> Result<(), MetaError> {
        let fingerprint = self.devices.meta.enabled_rules_fingerprint().await?;
        let peers = self.peers();
        {
            let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if seen.as_ref().is_some_and(|(f, p, at)| *f == fingerprint && *p == peers && at.elapsed() < FULL_RELOAD) {
                return Ok(());
            }
        }
        let mut complete = true;
        let stored = self.devices.meta.enabled_rules().await?;
        let previous = self.index.load_full();
        let mut idx = Index::default();
        for r in stored {
            // Unchanged rules are not parsed again.
            let rule: Arc<LoadedRule> = match previous.rules.get(&r.id).filter(|p| p.updated_ms == r.updated_ms) {
                Some(p) => p.clone(),
                None => match load(&r) {
                    Some(rule) => Arc::new(rule),
                    None => continue,
                },
            };
            let id = rule.id;
            match &rule.spec.target {
                rule::Target::Device(n) => idx.by_device.entry(n.clone()).or_default().push(id),
                rule::Target::Group(g) => idx.by_group.entry(*g).or_default().push(id),
                rule::Target::Product(p) => idx.by_product.entry(*p).or_default().push(id),
            }
            idx.rules.insert(id, rule);
        }
        let mine: HashMap<i64, Arc<LoadedRule>> =
            idx.rules.iter().filter(|(id, _)| self.owner_of(**id) == self.me).map(|(id, r)| (*id, r.clone())).collect();
        self.index.store(Arc::new(idx));
        let (stop, start): (Vec<ActorRef<RuleMessage>>, Vec<Arc<LoadedRule>>) = {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            let mut stop = Vec::new();
            running.retain(|id, (a, updated)| {
                let keep = mine.get(id).is_some_and(|r| r.updated_ms == *updated);
                if !keep {
                    stop.push(a.clone());
                }
                keep
            });
            let start = mine.values().filter(|r| !running.contains_key(&r.id)).cloned().collect();
            (stop, start)
        };
        for a in stop {
            let _ = a.stop_and_wait(None, Some(Duration::from_secs(5))).await;
        }
        for rule in start {
            let (id, updated) = (rule.id, rule.updated_ms);
            self.starting.lock().unwrap_or_else(|e| e.into_inner()).insert(id, Vec::new());
            let args = actor::RuleArgs { rule, alerts: self.clone(), tick: Duration::from_millis(self.config.tick_ms.max(10)) };
            match Actor::spawn(Some(format!("alert:{id}")), crate::actors::inspect::Instrumented(actor::RuleActor, "alert"), args).await {
                Ok((a, _)) => {
                    tracing::info!(rule = id, "alert rule runs on this node");
                    let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
                    let waited = self.starting.lock().unwrap_or_else(|e| e.into_inner()).remove(&id).unwrap_or_default();
                    if !waited.is_empty() {
                        let _ = a.cast(RuleMessage::Events(waited));
                    }
                    running.insert(id, (a, updated));
                }
                Err(e) => {
                    // Retried next round (which is not skipped: the round is not complete).
                    complete = false;
                    self.starting.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                    tracing::warn!(rule = id, error = %e, "cannot start an alert rule; retrying")
                }
            }
        }
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = complete.then(|| (fingerprint, peers, std::time::Instant::now()));
        Ok(())
    }

    /// Stop every rule actor (node shutdown); their names are free when this returns.
    pub async fn shutdown(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        let all: Vec<ActorRef<RuleMessage>> = self.running.lock().unwrap_or_else(|e| e.into_inner()).drain().map(|(_, (a, _))| a).collect();
        for a in all {
            let _ = a.stop_and_wait(None, Some(Duration::from_secs(5))).await;
        }
    }

    /// Follow this node's device events and hand them to the rules that watch the device.
    fn spawn_follower(me: &Arc<Alerts>) {
        let weak = Arc::downgrade(me);
        let mut rx = me.devices.events.subscribe();
        use tokio::sync::broadcast::error::{RecvError, TryRecvError};
        // Counted and logged only when rules could have missed something.
        let lagged = |weak: &Weak<Alerts>, n: u64| {
            if let Some(a) = weak.upgrade().filter(|a| !a.index.load().rules.is_empty()) {
                a.metrics.events_dropped.fetch_add(n, Ordering::Relaxed);
                tracing::warn!(missed = n, "alert rules fell behind the device events");
            }
        };
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(BATCH);
            loop {
                match rx.recv().await {
                    Ok(ev) => batch.push(ev),
                    Err(RecvError::Lagged(n)) => {
                        lagged(&weak, n);
                        continue;
                    }
                    Err(RecvError::Closed) => return,
                }
                // Under load, what queued meanwhile goes in the same round: one message per
                // rule per round instead of one per rule per event.
                while batch.len() < BATCH {
                    match rx.try_recv() {
                        Ok(ev) => batch.push(ev),
                        Err(TryRecvError::Lagged(n)) => lagged(&weak, n),
                        Err(_) => break,
                    }
                }
                let Some(a) = weak.upgrade() else { return };
                a.dispatch(&batch).await;
                batch.clear();
            }
        });
    }

    async fn dispatch(&self, batch: &[Arc<DeviceEvent>]) {
        let idx = self.index.load();
        if idx.rules.is_empty() {
            return;
        }
        let mut local: HashMap<i64, Vec<Arc<Ev>>> = HashMap::new();
        let mut remote: HashMap<Arc<str>, PeerEvents> = HashMap::new();
        let mut owners: HashMap<i64, Arc<str>> = HashMap::new();
        let mut ids: Vec<i64> = Vec::new();
        for ev in batch.iter().filter(|ev| matches!(ev.kind, EventKind::Telemetry | EventKind::Attributes)) {
            ids.clear();
            ids.extend(idx.by_device.get(&*ev.device_number).into_iter().flatten());
            if !idx.by_group.is_empty() || !idx.by_product.is_empty() {
                let (g, p) = match self.placement.get(&ev.device_id) {
                    Some(x) => x,
                    None => match self.devices.meta.device_by_id(ev.device_id).await {
                        Ok(d) => {
                            self.placement.insert(d.id, (d.group_id, d.product_id));
                            (d.group_id, d.product_id)
                        }
                        Err(_) => (None, None),
                    },
                };
                ids.extend(g.and_then(|g| idx.by_group.get(&g)).into_iter().flatten());
                ids.extend(p.and_then(|p| idx.by_product.get(&p)).into_iter().flatten());
            }
            let mut e: Option<Arc<Ev>> = None;
            for id in &ids {
                if !idx.rules.get(id).is_some_and(|r| r.wants(&ev.values)) {
                    continue;
                }
                let e = e.get_or_insert_with(|| {
                    Arc::new(Ev { device_id: ev.device_id, device: ev.device_number.clone(), values: ev.values.clone(), ts: ev.ts })
                });
                let owner = owners.entry(*id).or_insert_with(|| self.owner_of(*id));
                if *owner == self.me {
                    local.entry(*id).or_default().push(e.clone());
                } else {
                    // Per peer: each event once, with the rules of that peer it concerns.
                    let list = remote.entry(owner.clone()).or_default();
                    match list.last_mut() {
                        Some((last, rules)) if Arc::ptr_eq(last, e) => rules.push(*id),
                        _ => list.push((e.clone(), vec![*id])),
                    }
                }
            }
        }
        for (id, evs) in local {
            self.local_events(id, evs);
        }
        if remote.is_empty() {
            return;
        }
        let Some(c) = self.broker.upgrade().and_then(|b| b.cluster.get().cloned()) else { return };
        for (owner, list) in remote {
            // Frames of at most ~4 MiB of JSON (a round holds up to BATCH events).
            let mut frame = String::from("[");
            for (e, rules) in list {
                let item =
                    serde_json::json!({"rules": rules, "device_id": e.device_id, "device": &*e.device, "values": &e.values, "ts": e.ts});
                if frame.len() > 1 {
                    frame.push(',');
                }
                frame.push_str(&item.to_string());
                if frame.len() > 4 << 20 {
                    frame.push(']');
                    c.send(&owner, crate::cluster::wire::Body::AlertEvents { events: std::mem::replace(&mut frame, String::from("[")) });
                }
            }
            if frame.len() > 1 {
                frame.push(']');
                c.send(&owner, crate::cluster::wire::Body::AlertEvents { events: frame });
            }
        }
    }

    /// A round of values another node handed over for rules that run here.
    pub fn remote_events(&self, json: &str) {
        #[derive(serde::Deserialize)]
        struct Item {
            rules: Vec<i64>,
            device_id: i64,
            device: String,
            values: serde_json::Map<String, serde_json::Value>,
            ts: i64,
        }
        let items: Vec<Item> = match serde_json::from_str(json) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable alert events from a peer; dropped");
                return;
            }
        };
        let mut per_rule: HashMap<i64, Vec<Arc<Ev>>> = HashMap::new();
        for it in items {
            let e = Arc::new(Ev { device_id: it.device_id, device: Arc::from(it.device), values: it.values, ts: it.ts });
            for r in it.rules {
                per_rule.entry(r).or_default().push(e.clone());
            }
        }
        for (id, evs) in per_rule {
            self.local_events(id, evs);
        }
    }

    fn local_events(&self, rule: i64, evs: Vec<Arc<Ev>>) {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        match running.get(&rule) {
            Some((a, _)) => {
                let _ = a.cast(RuleMessage::Events(evs));
            }
            None => {
                let mut starting = self.starting.lock().unwrap_or_else(|e| e.into_inner());
                match starting.get_mut(&rule).filter(|w| w.len() + evs.len() <= STARTING_MAX) {
                    Some(waiting) => waiting.extend(evs),
                    None => {
                        self.metrics.events_dropped.fetch_add(evs.len() as u64, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    /// Values another node handed over for a rule that runs here.
    pub fn remote_event(&self, rule: i64, device_id: i64, device: &str, values: &str, ts: i64) {
        let Ok(serde_json::Value::Object(values)) = serde_json::from_str(values) else { return };
        self.local_events(rule, vec![Arc::new(Ev { device_id, device: Arc::from(device), values, ts })]);
    }

    /// Queue notifications of an alert change (dropped and counted when the queue is full).
    pub fn notify(&self, kind: NoticeKind, alert: Alert, rule: &Arc<LoadedRule>) {
        match kind {
            NoticeKind::Raised => self.metrics.raised.fetch_add(1, Ordering::Relaxed),
            NoticeKind::Cleared => self.metrics.cleared.fetch_add(1, Ordering::Relaxed),
            NoticeKind::Acknowledged => 0,
        };
        if self.live.watched() {
            let data = serde_json::json!({"event": kind.as_str(), "alert": alert});
            self.live.publish(crate::live::LiveEvent {
                kind: "alert".into(),
                device: alert.device_number.clone(),
                tenant_id: Some(alert.tenant_id),
                ts: crate::storage::meta::now_ms(),
                data,
            });
        }
        if self.notices.try_send(Notice { kind, alert, rule: rule.clone() }).is_err() {
            self.metrics.notifications_dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("alert notification queue full; a notification was dropped");
        }
    }

    /// Acknowledged through the API: tell the rule's channels.
    pub fn acknowledged(&self, alert: Alert) {
        if let Some(rule) = self.index.load().rules.get(&alert.rule_id).cloned() {
            self.notify(NoticeKind::Acknowledged, alert, &rule);
        }
    }

    /// Which node runs each rule, and the rules running here.
    pub fn running(&self) -> Vec<i64> {
        let mut v: Vec<i64> = self.running.lock().unwrap_or_else(|e| e.into_inner()).keys().copied().collect();
        v.sort_unstable();
        v
    }
}

/// A stored rule as it runs (None when its spec no longer parses: logged).
pub fn load(r: &StoredRule) -> Option<LoadedRule> {
    match serde_json::from_value::<RuleSpec>(r.spec.clone()) {
        Ok(spec) => Some(LoadedRule::new(r.id, r.tenant_id, r.name.clone(), spec, r.updated_ms)),
        Err(e) => {
            tracing::warn!(rule = r.id, error = %e, "stored alert rule does not parse; skipped");
            None
        }
    }
}
