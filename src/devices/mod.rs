//! The device platform on top of the broker: the registry (meta store + cache), who a client
//! is (authentication) and what it may touch (ACL), device messages as events, downlink
//! commands, and online status.
//!
//! One `Devices` per node, reached through `Broker::devices`. Identities are cached (in-process
//! or Redis) by credential; a change to a device or its credentials deletes its cache entries
//! and tells every other node (over the cluster links, and over Redis pub/sub when Redis is
//! configured), which disconnect the device at once when it was disabled or deleted.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, Notify};
use tokio_util::sync::CancellationToken;

use crate::actors::session::Outbound;
use crate::broker::Broker;
use crate::cluster::wire::DeviceNotice;
use crate::config::{Config, ServiceAccount};
use crate::live::Live;
use crate::storage::cache::{Cache, ExpiringMap};
use crate::storage::meta::{CredentialKind, Device, MetaError, MetaStore};

pub mod acl;
mod auth;
mod claim;
pub mod downlink;
mod events;
mod identity;
pub mod ota;
mod status;
pub mod uplink;

pub use acl::Acl;
pub use auth::{hash_password, verify_password, AuthError, Credentials};
pub use events::{IngestError, ReplyTo, Unstored};
use identity::cred_key;
pub use identity::{Identity, ProductModel, SubDevice};
pub use uplink::{DeviceEvent, EventKind, Reject};

/// Failed logins per source address: (count, window start).
pub(crate) type Failures = Mutex<HashMap<IpAddr, (u32, Instant)>>;

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub enum Principal {
    /// No credentials, on a listener that allows it: unrestricted.
    Anonymous,
    /// Admitted by an `auth_on_register` webhook: its publishes and subscriptions are for the
    /// auth webhooks to judge (unrestricted without them).
    External,
    Service(Arc<Acl>),
    Device(Arc<Identity>, Arc<Acl>),
}

impl Principal {
    pub fn acl(&self) -> Option<&Acl> {
        match self {
            Principal::Anonymous | Principal::External => None,
            Principal::Service(a) | Principal::Device(_, a) => Some(a),
        }
    }
    pub fn device(&self) -> Option<&Arc<Identity>> {
        match self {
            Principal::Device(i, _) => Some(i),
            _ => None,
        }
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct DeviceMetrics {
    pub auth_ok: AtomicU64,
    pub auth_failed: AtomicU64,
    pub auth_rate_limited: AtomicU64,
    pub acl_denied: AtomicU64,
    pub events: AtomicU64,
    pub payload_rejected: AtomicU64,
    pub commands_sent: AtomicU64,
}

/// How to close one local connection of a device, and its identity as the connection checks
/// payloads with it (replaced when the device or its product changes: a strict model, or a
/// move to another product, applies at once, not at the next login).
#[derive(Clone)]
pub struct Kick {
    pub tx: Option<crate::queue::Sender<Outbound>>,
    pub cancel: CancellationToken,
    pub identity: Option<Arc<arc_swap::ArcSwap<Identity>>>,
}

/// A device's local connections by id.
type Kicks = Vec<(u64, Kick)>;

pub struct Devices {
    pub meta: MetaStore,
    /// Live events for API websockets (device statuses).
    pub live: Arc<Live>,
    pub cache: Cache,
    pub metrics: DeviceMetrics,
    pub config: Arc<Config>,
    broker: Weak<Broker>,
    ttl: Duration,
    /// Local connections (MQTT, HTTP polls, CoAP observers) per device number.
    /// A list, not a map: a device almost always has one (a map allocates four slots).
    conns: Mutex<HashMap<Arc<str>, Kicks>>,
    /// Failed logins per source address: (count, window start).
    failures: Failures,
    /// The same for CoAP (UDP) sources, kept apart: see `authenticate_token_udp`.
    udp_failures: Failures,
    /// Identities by credential when the cache is in-process: the very `Arc<Identity>` the
    /// device's connections check with, not a JSON copy beside a parsed one per connection.
    /// With Redis the identity is shared as JSON there (`cache`) and this is `None`.
    identities: Option<ExpiringMap<[u8; 32], Arc<Identity>>>,
    /// Passwords verified recently (argon2 is deliberately slow; reconnect storms are not).
    verified: moka::sync::Cache<[u8; 32], ()>,
    /// Wakes HTTP long polls and CoAP observers of a device when a command is queued.
    waiters: Mutex<HashMap<Arc<str>, Arc<Notify>>>,
    /// Every device event, for in-process consumers (telemetry, alerts, live views).
    pub events: broadcast::Sender<Arc<DeviceEvent>>,
    /// Where telemetry is stored (set once at start-up).
    pub telemetry: std::sync::OnceLock<Arc<crate::telemetry::Telemetry>>,
    services: Vec<(ServiceAccount, Arc<Acl>)>,
    /// Last time a bad payload was logged, per device (at most once a minute each).
    bad_log: crate::metrics::OncePer<Arc<str>>,
    /// Last activity per device: throttles the writes to Redis; without Redis, the record.
    seen_local: moka::sync::Cache<Arc<str>, u64>,
    /// Product models by id, for identities built on a cold cache (a fleet's logins would
    /// otherwise read the same product once per device). Cleared on any product or device
    /// change notice; 30 s at most.
    products: moka::sync::Cache<i64, Option<Arc<ProductModel>>>,
    /// Status changes waiting for the status worker: the latest per device (online, when).
    status_queue: Mutex<HashMap<Arc<str>, (bool, u64)>>,
    /// Devices that reported over HTTP or CoAP on this node, and when they last did.
    reporting: Mutex<HashMap<Arc<str>, u64>>,
    status_wake: Arc<Notify>,
    /// One downlink flush at a time per device.
    flushing: Mutex<HashMap<Arc<str>, Arc<tokio::sync::Mutex<()>>>>,
    /// Devices asking whether downlinks wait for them (see `pending_check`).
    pending_checks: tokio::sync::mpsc::Sender<downlink::PendingCheck>,
    /// OTA package bytes recently served, by package id (packages never change; 64 MiB).
    packages: moka::sync::Cache<i64, bytes::Bytes>,
}

/// Session key of a device's MQTT client id: devices live in their own client-id namespace
/// (two devices with the same client id do not take each other's session over). U+0000 cannot
/// occur in an MQTT string, so no client can forge it.
pub fn session_key(number: &str, client_id: &str) -> Arc<str> {
    Arc::from(format!("{number}\u{0}{client_id}"))
}

/// The device number of a session key made by [`session_key`].
pub fn device_of_session(key: &str) -> Option<&str> {
    key.split_once('\u{0}').map(|(d, _)| d)
}

impl Devices {
    /// Start the device platform over the node's stores: create the first admin API key if
    /// there is none (printed once), and start listening for other nodes' notices.
    pub async fn start(broker: &Arc<Broker>, meta: MetaStore, cache: Cache, live: Arc<Live>) -> anyhow::Result<Arc<Devices>> {
        let config = broker.config.clone();
        let mut services = Vec::new();
        for s in &config.devices.services {
            anyhow::ensure!(
                argon2::PasswordHash::new(&s.password_hash).is_ok(),
                "devices.services {}: password_hash is not an argon2 PHC string",
                s.username
            );
            services.push((s.clone(), Arc::new(Acl::rules(s.publish.clone(), s.subscribe.clone()))));
        }
        let (pending_checks, checks) = tokio::sync::mpsc::channel(4096);
        let identities = match cache {
            Cache::Local(_) => Some(ExpiringMap::new(
                config.cache.capacity.try_into().unwrap_or(usize::MAX),
                Duration::from_secs(config.cache.ttl_secs.max(1)),
            )),
            Cache::Redis(_) => None,
        };
        let d = Arc::new(Devices {
            identities,
            pending_checks,
            meta,
            cache,
            metrics: DeviceMetrics::default(),
            ttl: Duration::from_secs(config.cache.ttl_secs.max(1)),
            config,
            broker: Arc::downgrade(broker),
            live,
            conns: Mutex::default(),
            failures: Mutex::default(),
            udp_failures: Mutex::default(),
            verified: moka::sync::Cache::builder().max_capacity(100_000).time_to_live(Duration::from_secs(600)).build(),
            waiters: Mutex::default(),
            events: broadcast::channel(4096).0,
            telemetry: std::sync::OnceLock::new(),
            services,
            bad_log: crate::metrics::OncePer::new(100_000, Duration::from_secs(60)),
            // An hour, as the in-process cache kept its copy: an offline device's retained
            // status carries when it went offline (`status` takes the later of the two).
            seen_local: moka::sync::Cache::builder().max_capacity(1_000_000).time_to_idle(Duration::from_secs(3600)).build(),
            products: moka::sync::Cache::builder().max_capacity(10_000).time_to_live(Duration::from_secs(30)).build(),
            status_queue: Mutex::default(),
            reporting: Mutex::default(),
            status_wake: Arc::new(Notify::new()),
            flushing: Mutex::default(),
            packages: ota::package_cache(),
        });
        Devices::spawn_status_worker(&d);
        Devices::spawn_pending_checker(&d, checks);
        Devices::spawn_report_sweeper(&d);
        Devices::feed_live(&d);
        d.bootstrap_admin_key().await?;
        let hashed = d.meta.hash_plain_tokens().await?;
        if hashed > 0 {
            tracing::info!(tokens = hashed, "stored access tokens of an older build as digests");
        }
        d.listen_for_notices().await;
        Devices::watch_members(&d);
        downlink::spawn_expiry(&d);
        tracing::info!(meta = ?d.meta.backend(), cache = d.cache.kind(), "device registry ready");
        Ok(d)
    }

    pub fn broker(&self) -> Option<Arc<Broker>> {
        self.broker.upgrade()
    }

    async fn bootstrap_admin_key(&self) -> anyhow::Result<()> {
        if self.meta.api_key_count().await? > 0 {
            return Ok(());
        }
        let given = &self.config.devices.admin_key;
        if !given.is_empty() {
            anyhow::ensure!(given.len() >= 16, "devices.admin_key must have at least 16 characters");
            self.meta.add_api_key("configured", &sha256_hex(given.as_bytes())).await?;
            tracing::info!("stored the configured admin API key (devices.admin_key)");
            return Ok(());
        }
        let key = format!("thk_{}", random_hex(24));
        self.meta.add_api_key("bootstrap", &sha256_hex(key.as_bytes())).await?;
        // Printed once, on stdout: the only time the key is shown.
        println!("thingsd: admin API key (shown once, store it now): {key}");
        // On stdout only: logs are shipped and kept where secrets must not be.
        tracing::warn!("created the first admin API key; it was printed on stdout (only now), never logged");
        Ok(())
    }

    /// Is this an admin API key? (Hashes are compared; keys are never stored.)
    pub async fn admin_key_valid(&self, key: &str) -> Result<bool, MetaError> {
        let h = sha256_hex(key.as_bytes());
        let ck = format!("apikey:{h}");
        if self.cache.get(&ck).await.is_some() {
            return Ok(true);
        }
        let ok = self.meta.api_key_exists(&h).await?;
        if ok {
            self.cache.set(&ck, "1", Duration::from_secs(60)).await;
        }
        Ok(ok)
    }

    /// A device or its credentials changed: drop cached identities everywhere; `kick`
    /// disconnects its connections on every node (disabled or deleted devices).
    pub async fn changed(&self, dev: &Device, kick: bool) {
        self.forget(dev).await;
        self.note_device_product(dev);
        self.refresh_identity(dev).await;
        if let Some(gw) = dev.gateway_id {
            // A gateway's identity lists its sub-devices.
            if let Ok(g) = self.meta.device_by_id(gw).await {
                self.forget(&g).await;
                self.refresh_identity(&g).await;
                self.notify(DeviceNotice::Changed { device: g.device_number.clone(), kick: false }).await;
            }
        }
        if kick {
            self.kick_local(&dev.device_number);
        }
        self.notify(DeviceNotice::Changed { device: dev.device_number.clone(), kick }).await;
    }

    /// The device's connections on this node check its payloads with its identity as it is
    /// now (product, model, sub-devices): read once for all of them.
    async fn refresh_identity(&self, dev: &Device) {
        let live: Vec<_> = match self.conns.lock() {
            Ok(m) => m.get(&*dev.device_number).map(|c| c.iter().filter_map(|(_, k)| k.identity.clone()).collect()).unwrap_or_default(),
            Err(_) => return,
        };
        if live.is_empty() {
            return;
        }
        match self.build_identity(dev, None).await {
            Ok(now) => {
                let now = Arc::new(now);
                for slot in live {
                    // The credential's secret stays as the login read it.
                    let mut i = (*now).clone();
                    i.secret = slot.load().secret.clone();
                    slot.store(Arc::new(i));
                }
            }
            Err(e) => {
                tracing::warn!(device = %dev.device_number, error = %e, "cannot re-read a connected device's identity; it applies at its next login")
            }
        }
    }

    /// Cache keys of a device's credentials.
    async fn cred_keys(&self, device_id: i64) -> Result<Vec<String>, MetaError> {
        Ok(self.meta.credentials(device_id).await?.iter().map(|c| cred_key(c.kind, &c.identity)).collect())
    }

    async fn forget(&self, dev: &Device) {
        let keys: Vec<String> = match self.cred_keys(dev.id).await {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list credentials to invalidate; cached entries expire by TTL");
                vec![]
            }
        };
        self.uncache(&keys).await;
        self.verified.invalidate_all();
    }

    /// Delete a device: its connections are closed everywhere and its cached identities dropped.
    pub async fn remove_device(&self, number: &str) -> Result<Device, MetaError> {
        let dev = self.meta.device(number).await?;
        let keys = self.cred_keys(dev.id).await?;
        let dev = self.meta.delete_device(number).await?;
        self.uncache(&keys).await;
        self.verified.invalidate_all();
        self.notify(DeviceNotice::Forget { keys }).await;
        self.changed(&dev, true).await;
        self.end_sessions(&dev.device_number);
        Ok(dev)
    }

    /// End a deleted device's sessions on this node (subscriptions, queues, wills): the
    /// number may be given to a new device, which must not inherit them.
    fn end_sessions(&self, number: &str) {
        if let Some(r) = self.broker().and_then(|b| b.registry()) {
            let _ = crate::actors::inspect::Tell::tell(&*r, crate::actors::registry::RegistryMessage::DiscardDevice(Arc::from(number)));
        }
    }

    /// A product changed (strictness, model): devices of it re-read their identity.
    pub async fn product_changed(&self, product_id: i64) {
        self.products.invalidate(&product_id);
        let mut after = 0;
        loop {
            match self.meta.list_devices(after, 1000, None, Some(product_id)).await {
                Ok(list) if !list.is_empty() => {
                    after = list.last().map_or(after, |d| d.id);
                    for d in &list {
                        self.changed(d, false).await;
                    }
                }
                Ok(_) => return,
                Err(e) => return tracing::warn!(error = %e, "cannot invalidate a product's devices; cached entries expire by TTL"),
            }
        }
    }

    /// Credentials deleted: their cache keys (the rows are gone, so they are named here).
    pub async fn forget_credential(&self, dev: &Device, kind: CredentialKind, identity: &str, kick: bool) {
        let keys = vec![cred_key(kind, identity)];
        self.uncache(&keys).await;
        self.notify(DeviceNotice::Forget { keys }).await;
        self.changed(dev, kick).await;
    }

    /// Tell the other nodes (cluster links; Redis pub/sub when configured).
    async fn notify(&self, n: DeviceNotice) {
        if let Some(c) = self.broker().and_then(|b| b.cluster.get().cloned()) {
            c.device_notice(n.clone());
        }
        if let Ok(s) = serde_json::to_string(&n) {
            self.cache.publish("notices", &s).await;
        }
    }

    async fn listen_for_notices(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        if let Some(c) = self.broker().and_then(|b| b.cluster.get().cloned()) {
            let mut rx = c.notices.subscribe();
            let me = me.clone();
            tokio::spawn(async move {
                loop {
                    match rx.recv().await {
                        Ok(n) => match me.upgrade() {
                            Some(d) => d.on_notice(n).await,
                            None => return,
                        },
                        Err(broadcast::error::RecvError::Lagged(k)) => {
                            tracing::warn!(missed = k, "device notices lagged; dropping the whole identity cache");
                            if let Some(d) = me.upgrade() {
                                if let Cache::Local(c) = &d.cache {
                                    c.invalidate_all();
                                }
                                if let Some(local) = &d.identities {
                                    local.clear();
                                }
                            }
                        }
                        Err(_) => return,
                    }
                }
            });
        }
        if let Some(mut rx) = self.cache.subscribe("notices").await {
            tokio::spawn(async move {
                while let Some(s) = rx.recv().await {
                    let Some(d) = me.upgrade() else { return };
                    match serde_json::from_str::<DeviceNotice>(&s) {
                        Ok(n) => d.on_notice(n).await,
                        Err(e) => tracing::warn!(error = %e, "undecodable device notice on Redis"),
                    }
                }
            });
        }
    }

    async fn on_notice(&self, n: DeviceNotice) {
        match n {
            DeviceNotice::Changed { device, kick } => {
                let now = self.meta.device(&device).await;
                self.verified.invalidate_all();
                // It may be one of a changed product's devices.
                self.products.invalidate_all();
                if let Ok(d) = &now {
                    if let Cache::Local(_) = self.cache {
                        self.forget(d).await;
                    }
                    self.note_device_product(d);
                    self.refresh_identity(d).await;
                }
                if kick {
                    self.kick_local(&device);
                    // Deleted (not only disabled): its sessions here end too.
                    if matches!(now, Err(MetaError::NotFound(_))) {
                        self.end_sessions(&device);
                    }
                }
            }
            DeviceNotice::Forget { keys } => {
                if let Cache::Local(_) = self.cache {
                    self.uncache(&keys).await;
                }
                self.verified.invalidate_all();
            }
            DeviceNotice::Pending { device } => {
                self.wake(&device);
                if self.has_local(&device) {
                    self.flush_pending(&device).await;
                }
            }
        }
    }

    /// Close every local connection of a device (MQTT 5: DISCONNECT 0x98 administrative action).
    pub fn kick_local(&self, number: &str) {
        let conns = self.conns.lock().map(|mut m| m.remove(number)).unwrap_or_default();
        if let Some(conns) = conns {
            tracing::info!(device = number, connections = conns.len(), "device disabled or removed: disconnecting");
            for (_, k) in conns {
                // DISCONNECT first (the writer closes after it); cut the socket if the queue is full.
                let queued =
                    k.tx.as_ref()
                        .is_some_and(|tx| tx.try_send(Outbound::Disconnect(crate::protocols::mqtt::reason::ADMINISTRATIVE_ACTION)).is_ok());
                if !queued {
                    k.cancel.cancel();
                }
            }
        }
        self.wake(number);
    }

    /// Register a live local connection of a device; returns whether it is the first.
    pub(crate) fn register(&self, number: &Arc<str>, id: u64, k: Kick) -> bool {
        let mut m = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let e = m.entry(number.clone()).or_default();
        match e.iter_mut().find(|(i, _)| *i == id) {
            Some(slot) => slot.1 = k,
            None => {
                e.reserve_exact(1);
                e.push((id, k));
            }
        }
        e.len() == 1
    }

    /// Forget a local connection; returns whether the device has no other local connection.
    pub(crate) fn unregister(&self, number: &str, id: u64) -> bool {
        let mut m = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        match m.get_mut(number) {
            Some(e) => {
                e.retain(|(i, _)| *i != id);
                if e.is_empty() {
                    m.remove(number);
                    true
                } else {
                    false
                }
            }
            None => true,
        }
    }

    /// Does the device have a live MQTT connection on this node?
    pub(crate) fn has_local(&self, number: &str) -> bool {
        self.conns.lock().map(|m| m.contains_key(number)).unwrap_or(false)
    }

    pub(crate) fn waiter(&self, number: &str) -> Arc<Notify> {
        let mut m = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() > 10_000 {
            m.retain(|_, n| Arc::strong_count(n) > 1);
        }
        m.entry(Arc::from(number)).or_insert_with(|| Arc::new(Notify::new())).clone()
    }

    fn wake(&self, number: &str) {
        if let Some(n) = self.waiters.lock().ok().and_then(|m| m.get(number).cloned()) {
            n.notify_waiters();
        }
    }

    /// Log a refused payload at most once a minute per device; always counted.
    pub fn rejected(&self, number: &Arc<str>, protocol: &str, why: &Reject) {
        self.metrics.payload_rejected.fetch_add(1, Ordering::Relaxed);
        if self.bad_log.first(number.clone()) {
            tracing::warn!(device = %number, protocol, error = %why, "refused a device payload (logged once a minute per device)");
        }
    }
}

/// A new access token (128 bits, URL- and MQTT-username-safe).
pub use crate::secrets::{random_hex, random_token, sha256_hex};

pub(crate) fn now_ms_i64() -> i64 {
    crate::message::now_ms() as i64
}
