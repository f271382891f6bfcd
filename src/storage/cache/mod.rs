//! The node's cache: credentials and device identity, device status, latest values, rate
//! counters. In-process (`moka`) by default; Redis through `fred` when `cache.url` is set
//! (standalone `redis://`, Sentinel `redis-sentinel://`, Cluster `redis-cluster://`).
//!
//! The cache is never the source of truth: a Redis error is logged (once per minute) and
//! treated as a miss, so a Redis outage slows lookups down to the meta store but refuses nobody.
mod expiring;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;
use fred::types::Expiration;
use tokio::sync::mpsc;

pub use expiring::ExpiringMap;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache.url: {0}")]
    Config(String),
    #[error("cannot reach Redis: {0}")]
    Connect(String),
}

/// In-process entries carry their own expiry (moka's is per cache, ours per entry).
type LocalEntry = (Arc<str>, u64);

#[derive(Clone)]
pub enum Cache {
    Local(moka::sync::Cache<String, LocalEntry>),
    Redis(Arc<RedisCache>),
}

pub struct RedisCache {
    client: Client,
    builder: Builder,
    prefix: String,
    last_error_log: AtomicU64,
}

fn now_ms() -> u64 {
    crate::message::now_ms()
}

impl Cache {
    /// An in-process cache holding at most `capacity` entries.
    pub fn local(capacity: u64) -> Cache {
        Cache::Local(moka::sync::Cache::builder().max_capacity(capacity).time_to_idle(Duration::from_secs(3600)).build())
    }

    /// Connect to Redis at `url`; keys are prefixed with `prefix`.
    pub async fn redis(url: &str, prefix: &str) -> Result<Cache, CacheError> {
        let config = Config::from_url(url).map_err(|e| CacheError::Config(e.to_string()))?;
        let mut builder = Builder::from_config(config);
        builder
            .with_performance_config(|p| p.default_command_timeout = Duration::from_secs(2))
            .with_connection_config(|c| c.connection_timeout = Duration::from_secs(5))
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2));
        let client = builder.build().map_err(|e| CacheError::Config(e.to_string()))?;
        tokio::time::timeout(Duration::from_secs(10), client.init())
            .await
            .map_err(|_| CacheError::Connect(format!("{url}: timed out")))?
            .map_err(|e| CacheError::Connect(format!("{url}: {e}")))?;
        Ok(Cache::Redis(Arc::new(RedisCache { client, builder, prefix: prefix.into(), last_error_log: AtomicU64::new(0) })))
    }

    pub fn is_redis(&self) -> bool {
        matches!(self, Cache::Redis(_))
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Cache::Local(_) => "in-process",
            Cache::Redis(_) => "redis",
        }
    }

    pub async fn get(&self, key: &str) -> Option<String> {
        match self {
            Cache::Local(c) => match c.get(key) {
                Some((v, exp)) if exp > now_ms() => Some(v.to_string()),
                Some(_) => {
                    c.invalidate(key);
                    None
                }
                None => None,
            },
            Cache::Redis(r) => match r.client.get::<Option<String>, _>(r.key(key)).await {
                Ok(v) => v,
                Err(e) => {
                    r.log(&e);
                    None
                }
            },
        }
    }

    pub async fn set(&self, key: &str, value: &str, ttl: Duration) {
        match self {
            Cache::Local(c) => c.insert(key.to_string(), (Arc::from(value), now_ms() + ttl.as_millis() as u64)),
            Cache::Redis(r) => {
                let ex = Expiration::PX(ttl.as_millis().max(1) as i64);
                if let Err(e) = r.client.set::<(), _, _>(r.key(key), value, Some(ex), None, false).await {
                    r.log(&e);
                }
            }
        }
    }

    pub async fn del(&self, keys: &[String]) {
        if keys.is_empty() {
            return;
        }
        match self {
            Cache::Local(c) => keys.iter().for_each(|k| c.invalidate(k)),
            Cache::Redis(r) => {
                let ks: Vec<String> = keys.iter().map(|k| r.key(k)).collect();
                // One DEL per key: in Redis Cluster keys of one command must share a slot.
                for k in ks {
                    if let Err(e) = r.client.del::<i64, _>(k).await {
                        r.log(&e);
                    }
                }
            }
        }
    }

    /// Read and delete `key` in one step (GETDEL): of callers racing for an entry, one gets it.
    pub async fn take(&self, key: &str) -> Option<String> {
        match self {
            Cache::Local(c) => match c.remove(key) {
                Some((v, exp)) if exp > now_ms() => Some(v.to_string()),
                _ => None,
            },
            Cache::Redis(r) => match r.client.getdel::<Option<String>, _>(r.key(key)).await {
                Ok(v) => v,
                Err(e) => {
                    r.log(&e);
                    None
                }
            },
        }
    }

    /// Add one to the counter `key` (created with `window` to live: a fixed-window rate
    /// counter); returns the new count. A Redis error counts as 0 (never locks anyone out).
    pub async fn incr(&self, key: &str, window: Duration) -> u64 {
        match self {
            Cache::Local(c) => {
                let now = now_ms();
                let e = c.entry(key.to_string()).and_upsert_with(|old| match old.map(|e| e.into_value()) {
                    Some((v, exp)) if exp > now => (Arc::from((v.parse::<u64>().unwrap_or(0) + 1).to_string()), exp),
                    _ => (Arc::from("1"), now + window.as_millis() as u64),
                });
                e.into_value().0.parse().unwrap_or(0)
            }
            Cache::Redis(r) => {
                // One script, so the counter can never be left without its expiry (an INCR
                // followed by a lost PEXPIRE would count, and lock, forever); a key found
                // without one gets it.
                const INCR_WINDOW: &str = "local n = redis.call('INCR', KEYS[1]) \
                    if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end return n";
                let k = r.key(key);
                let ms = window.as_millis().clamp(1, i64::MAX as u128) as i64;
                match r.client.eval::<u64, _, _, _>(INCR_WINDOW, vec![k], vec![ms]).await {
                    Ok(n) => n,
                    Err(e) => {
                        r.log(&e);
                        0
                    }
                }
            }
        }
    }

    /// Broadcast `msg` to every node subscribed to `channel` (Redis only; no-op in-process).
    pub async fn publish(&self, channel: &str, msg: &str) {
        if let Cache::Redis(r) = self {
            if let Err(e) = r.client.publish::<i64, _, _>(r.key(channel), msg).await {
                r.log(&e);
            }
        }
    }

    /// Messages published on `channel` by any node (Redis only). Resubscribes after reconnects.
    pub async fn subscribe(&self, channel: &str) -> Option<mpsc::Receiver<String>> {
        let Cache::Redis(r) = self else { return None };
        let sub = match r.builder.build_subscriber_client() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot create the Redis subscriber");
                return None;
            }
        };
        if let Err(e) = sub.init().await {
            tracing::error!(error = %e, "cannot connect the Redis subscriber");
            return None;
        }
        // Resubscribes after reconnects; runs as long as the client.
        drop(sub.manage_subscriptions());
        let name = r.key(channel);
        if let Err(e) = sub.subscribe(name.clone()).await {
            tracing::error!(error = %e, "cannot subscribe to Redis channel");
            return None;
        }
        let (tx, rx) = mpsc::channel(1024);
        let mut msgs = sub.message_rx();
        tokio::spawn(async move {
            let _keep = sub;
            loop {
                match msgs.recv().await {
                    Ok(m) if *m.channel == *name => {
                        if let Some(s) = m.value.as_string() {
                            if tx.send(s).await.is_err() {
                                return;
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => tracing::warn!(missed = n, "Redis notifications lagged"),
                    Err(_) => return,
                }
            }
        });
        Some(rx)
    }

    /// Round trip to the backend (readiness).
    pub async fn ping(&self) -> bool {
        match self {
            Cache::Local(_) => true,
            Cache::Redis(r) => r.client.ping::<String>(None).await.is_ok(),
        }
    }
}

impl RedisCache {
    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }

    fn log(&self, e: &fred::error::Error) {
        let now = now_ms();
        let last = self.last_error_log.load(Ordering::Relaxed);
        if now.saturating_sub(last) > 60_000
            && self.last_error_log.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            tracing::warn!(error = %e, "Redis cache unavailable; using the meta store directly");
        }
    }
}
