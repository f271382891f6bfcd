//! The platform above the broker core, wired once by `server::run`: the stores it opens
//! (the one place that picks backends from the configuration) and the services built on them.
//! Each consumer is handed what it uses — a connection its device platform and webhooks, the
//! HTTP application the whole set — instead of finding features through the broker.
use std::sync::Arc;

use anyhow::Context;

use crate::alerts::Alerts;
use crate::config::Config;
use crate::devices::Devices;
use crate::live::Live;
use crate::storage::cache::Cache;
use crate::storage::meta::MetaStore;
use crate::storage::timeseries::Tsdb;
use crate::telemetry::Telemetry;
use crate::users::Users;
use crate::webhooks::Webhooks;

/// The node's backends, opened from the configuration.
pub struct Stores {
    /// Devices, people, rules (SQLite in the data directory, or PostgreSQL).
    pub meta: MetaStore,
    /// Credentials, statuses, sessions of people (in-process, or Redis).
    pub cache: Cache,
    /// Telemetry (embedded, PostgreSQL or TDengine) and its hourly roll-ups.
    pub tsdb: Tsdb,
    pub rollup: Option<Tsdb>,
}

impl Stores {
    pub async fn open(config: &Config) -> anyhow::Result<Stores> {
        let url = if config.meta.url.is_empty() {
            std::fs::create_dir_all(&config.node.data_dir).with_context(|| format!("create {}", config.node.data_dir.display()))?;
            MetaStore::sqlite_url(&config.node.data_dir)
        } else {
            config.meta.url.clone()
        };
        let meta =
            MetaStore::open(&url).await.with_context(|| format!("open the meta store {}", crate::config::mask_url_password(&url)))?;
        if config.cluster.enabled && meta.backend() == crate::storage::meta::Backend::Sqlite {
            tracing::warn!("clustering with an SQLite meta store: every node has its own device registry; use PostgreSQL (meta.url) so nodes share one");
        }
        let cache = if config.cache.url.is_empty() {
            Cache::local(config.cache.capacity)
        } else {
            Cache::redis(&config.cache.url, &config.cache.prefix).await.context("connect the cache")?
        };
        if config.cluster.enabled && config.cache.url.is_empty() {
            tracing::warn!("clustering without Redis (cache.url): people's sessions live on the node that made them, so a token works only there and a logout ends it only there; configure cache.url");
        }
        let tsdb = crate::telemetry::open_store(config).await?;
        if config.cluster.enabled && matches!(tsdb, Tsdb::Embedded(_)) {
            tracing::warn!("clustering with the embedded time-series store: each node keeps the telemetry of the devices connected to it; use PostgreSQL or TDengine (telemetry.store) so every node sees all of it");
        }
        let rollup = crate::telemetry::open_rollup_store(config, &tsdb).await?;
        Ok(Stores { meta, cache, tsdb, rollup })
    }
}

/// The services of the device platform, for the consumers that use them.
pub struct Services {
    pub devices: Arc<Devices>,
    pub telemetry: Arc<Telemetry>,
    pub users: Arc<Users>,
    pub alerts: Arc<Alerts>,
    /// Broker webhooks, when any are configured.
    pub hooks: Option<Arc<Webhooks>>,
    /// Live events for API websockets.
    pub live: Arc<Live>,
}
