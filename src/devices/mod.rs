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

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, Notify};
use tokio_util::sync::CancellationToken;

use crate::actors::session::Outbound;
use crate::broker::Broker;
use crate::cluster::wire::DeviceNotice;
use crate::config::{Config, ServiceAccount};
use crate::live::Live;
use crate::storage::cache::Cache;
use crate::storage::meta::{CredentialKind, Device, MetaError, MetaStore, ThingModel};

pub mod acl;
mod auth;
mod claim;
pub mod downlink;
mod events;
pub mod ota;
mod status;
pub mod uplink;

pub use acl::Acl;
pub use auth::{hash_password, verify_password, AuthError, Credentials};
pub use events::{IngestError, ReplyTo, Unstored};
pub use uplink::{DeviceEvent, EventKind, Reject};

/// Failed logins per source address: (count, window start).
pub(crate) type Failures = Mutex<HashMap<IpAddr, (u32, Instant)>>;

/// A sub-device as its gateway's identity carries it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubDevice {
    pub address: String,
    pub device_id: i64,
    pub device_number: Arc<str>,
    pub model: Option<ProductModel>,
}

/// A device's product's thing model as payload checks use it. A strict product refuses keys
/// the model does not describe and values out of range; every product refuses a described
/// key's value of the wrong type (its count, sum and average would not agree otherwise).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProductModel {
    /// The product (0 in identities cached by builds before it was kept here).
    #[serde(default)]
    pub id: i64,
    pub strict: bool,
    pub model: ThingModel,
}

/// A device as authentication, ACL and payload checks need it (cached by credential).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Identity {
    pub device_id: i64,
    pub device_number: Arc<str>,
    pub enabled: bool,
    /// argon2 hash when the credential is a password.
    pub secret: Option<String>,
    /// The product's thing model (a device without a product has none). Required when read
    /// from the cache: an entry of an older build is read again from the registry.
    pub model: Option<ProductModel>,
    /// Its sub-devices (a gateway has at least one, or is marked by `gateway`).
    pub gateway: bool,
    pub subs: Vec<SubDevice>,
}

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
    products: moka::sync::Cache<i64, Option<ProductModel>>,
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

/// The cache key of a credential.
fn cred_key(kind: CredentialKind, identity: &str) -> String {
    format!("cred:{}:{identity}", kind.as_str())
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
        let d = Arc::new(Devices {
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

    /// The identity behind a credential (cached).
    pub async fn identity(&self, kind: CredentialKind, id: &str) -> Result<Option<Arc<Identity>>, MetaError> {
        // Cached under what is stored (a token's digest), never the token itself.
        let key = cred_key(kind, &kind.stored(id));
        if let Some(v) = self.cache.get(&key).await {
            if let Ok(i) = serde_json::from_str::<Identity>(&v) {
                self.note_product(&i);
                return Ok(Some(Arc::new(i)));
            }
        }
        let Some((cred, dev)) = self.meta.find_credential(kind, id).await? else { return Ok(None) };
        let ident = self.build_identity(&dev, cred.secret).await?;
        if let Ok(v) = serde_json::to_string(&ident) {
            self.cache.set(&key, &v, self.ttl).await;
        }
        self.note_product(&ident);
        Ok(Some(Arc::new(ident)))
    }

    /// A device changed (here or on another node): if it moved to another product, its
    /// telemetry rules follow at once, not when telemetry's product cache expires.
    fn note_device_product(&self, d: &Device) {
        if let Some(t) = self.telemetry.get() {
            t.note_product(d.id, d.product_id);
        }
    }

    /// Tell telemetry which product a device that logged in belongs to, so its first message
    /// does not read the device again (a fleet's first telemetry round would read every one).
    fn note_product(&self, i: &Identity) {
        let product = match &i.model {
            Some(m) if m.id == 0 => return,
            Some(m) => Some(m.id),
            None => None,
        };
        if let Some(t) = self.telemetry.get() {
            t.note_product(i.device_id, product);
        }
    }

    async fn product_model(&self, product: Option<i64>) -> Result<Option<ProductModel>, MetaError> {
        let Some(p) = product else { return Ok(None) };
        if let Some(m) = self.products.get(&p) {
            return Ok(m);
        }
        let m = match self.meta.product(p).await {
            Ok(pr) => Some(ProductModel { id: p, strict: pr.strict, model: pr.model }),
            Err(MetaError::NotFound(_)) => None,
            Err(e) => return Err(e),
        };
        self.products.insert(p, m.clone());
        Ok(m)
    }

    async fn build_identity(&self, dev: &Device, secret: Option<String>) -> Result<Identity, MetaError> {
        let mut subs = Vec::new();
        for s in self.meta.sub_devices(dev.id).await? {
            subs.push(SubDevice {
                address: s.sub_address.clone().unwrap_or_default(),
                device_id: s.id,
                device_number: Arc::from(s.device_number.as_str()),
                model: self.product_model(s.product_id).await?,
            });
        }
        let gateway = !subs.is_empty() || dev.labels.get("gateway").is_some_and(|v| v == "true");
        Ok(Identity {
            device_id: dev.id,
            device_number: Arc::from(dev.device_number.as_str()),
            enabled: dev.enabled,
            secret,
            model: self.product_model(dev.product_id).await?,
            gateway,
            subs,
        })
    }

    /// The identity of a device by number (for the HTTP/CoAP paths that already know it).
    pub async fn identity_of(&self, dev: &Device) -> Result<Arc<Identity>, MetaError> {
        Ok(Arc::new(self.build_identity(dev, None).await?))
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
        self.cache.del(&keys).await;
        self.verified.invalidate_all();
    }

    /// Delete a device: its connections are closed everywhere and its cached identities dropped.
    pub async fn remove_device(&self, number: &str) -> Result<Device, MetaError> {
        let dev = self.meta.device(number).await?;
        let keys = self.cred_keys(dev.id).await?;
        let dev = self.meta.delete_device(number).await?;
        self.cache.del(&keys).await;
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
        self.cache.del(&keys).await;
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
                    self.cache.del(&keys).await;
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
