//! Broker webhooks in the shape of VerneMQ's `vmq_webhooks` plugin, so existing webhook
//! services work unchanged: a JSON POST with a `vernemq-hook: <name>` header to each endpoint
//! configured for the hook, MQTT 3.1.1 clients calling `<hook>` and 5.0 clients `<hook>_m5`.
//!
//! - `auth_on_register`, `auth_on_publish`, `auth_on_subscribe` are asked in configuration
//!   order before the built-in credential and ACL checks: `{"result": "ok"}` allows (with
//!   `modifiers` rewriting the topic, payload, QoS or retain flag of a publish, or `topics`
//!   rewriting a subscription, QoS 128 refusing one filter), `{"result": "next"}` passes to the
//!   next endpoint and finally the built-in checks, `{"result": {"error": …}}` refuses. An
//!   endpoint that fails or times out counts as its `on_failure` policy (`deny`, `next` or
//!   `allow`). Answers with `cache-control: max-age=N` are reused for N seconds.
//! - `on_register`, `on_publish`, `on_subscribe`, `on_unsubscribe`, `on_deliver`,
//!   `on_client_offline`, `on_client_gone` are notifications: queued per endpoint (bounded;
//!   overflow is counted, never waited for) and sent by a worker in batches of concurrent
//!   requests, so a slow endpoint never slows the broker.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;

pub use crate::config::{OnFailure, WebhookConfig};

pub const AUTH_HOOKS: &[&str] = &["auth_on_register", "auth_on_publish", "auth_on_subscribe"];
pub const NOTIFY_HOOKS: &[&str] =
    &["on_register", "on_publish", "on_subscribe", "on_unsubscribe", "on_deliver", "on_client_offline", "on_client_gone"];

/// What the auth hooks decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Allowed, with the endpoint's answer (its `modifiers`/`topics`).
    Ok(Value),
    /// No endpoint decided: the built-in checks do.
    Next,
    /// Refused, with the endpoint's error.
    Error(String),
}

/// Counters per hook name, for `/metrics`.
#[derive(Default)]
pub struct HookCounts {
    pub calls: AtomicU64,
    pub failures: AtomicU64,
    pub cache_hits: AtomicU64,
    pub dropped: AtomicU64,
}

struct Endpoint {
    config: WebhookConfig,
    /// Notifications: the worker's queue.
    queue: Option<mpsc::Sender<bytes::Bytes>>,
    counts: Arc<HookCounts>,
}

pub struct Webhooks {
    by_hook: HashMap<String, Vec<Arc<Endpoint>>>,
    http: reqwest::Client,
    cache: moka::sync::Cache<String, (Verdict, Instant)>,
}

impl Webhooks {
    /// Check the configuration and start a worker per notification endpoint.
    pub fn start(list: &[WebhookConfig]) -> anyhow::Result<Option<Arc<Webhooks>>> {
        if list.is_empty() {
            return Ok(None);
        }
        let http = reqwest::Client::builder().pool_max_idle_per_host(64).build()?;
        let mut by_hook: HashMap<String, Vec<Arc<Endpoint>>> = HashMap::new();
        for c in list {
            let base = c.hook.strip_suffix("_m5").unwrap_or(&c.hook);
            anyhow::ensure!(
                !(c.hook.ends_with("_m5") && matches!(base, "on_client_offline" | "on_client_gone")),
                "webhooks: {} has no _m5 variant (use {base} for every protocol version)",
                c.hook
            );
            let auth = AUTH_HOOKS.contains(&base);
            anyhow::ensure!(auth || NOTIFY_HOOKS.contains(&base), "webhooks: unknown hook {:?}", c.hook);
            let url = reqwest::Url::parse(&c.endpoint).map_err(|e| anyhow::anyhow!("webhooks {}: endpoint: {e}", c.hook))?;
            anyhow::ensure!(matches!(url.scheme(), "http" | "https"), "webhooks {}: endpoint must be http(s)", c.hook);
            let counts = Arc::new(HookCounts::default());
            let queue = (!auth).then(|| {
                let (tx, rx) = mpsc::channel(c.queue.max(1));
                tokio::spawn(worker(http.clone(), c.clone(), rx, counts.clone()));
                tx
            });
            by_hook.entry(c.hook.clone()).or_default().push(Arc::new(Endpoint { config: c.clone(), queue, counts }));
        }
        let cache = moka::sync::Cache::builder().max_capacity(100_000).build();
        Ok(Some(Arc::new(Webhooks { by_hook, http, cache })))
    }

    fn name(hook: &str, v5: bool) -> String {
        if v5 {
            format!("{hook}_m5")
        } else {
            hook.to_string()
        }
    }

    /// Is any endpoint configured for `hook` (for this protocol version)?
    pub fn has(&self, hook: &str, v5: bool) -> bool {
        self.by_hook.contains_key(&Webhooks::name(hook, v5))
    }

    /// Encode a payload as the endpoints of `hook` expect it.
    pub fn payload(&self, hook: &str, v5: bool, p: &[u8]) -> Value {
        let b64 = self.by_hook.get(&Webhooks::name(hook, v5)).and_then(|e| e.first()).is_none_or(|e| e.config.base64_payload);
        if b64 {
            json!(base64::engine::general_purpose::STANDARD.encode(p))
        } else {
            json!(String::from_utf8_lossy(p))
        }
    }

    /// Decode a payload modifier.
    pub fn decode_payload(&self, hook: &str, v5: bool, v: &str) -> Option<bytes::Bytes> {
        let b64 = self.by_hook.get(&Webhooks::name(hook, v5)).and_then(|e| e.first()).is_none_or(|e| e.config.base64_payload);
        if b64 {
            base64::engine::general_purpose::STANDARD.decode(v).ok().map(bytes::Bytes::from)
        } else {
            Some(bytes::Bytes::copy_from_slice(v.as_bytes()))
        }
    }

    /// Ask the endpoints of an auth hook in order; the first that is not `next` decides.
    pub async fn auth(&self, hook: &str, v5: bool, mut body: Value) -> Verdict {
        let name = Webhooks::name(hook, v5);
        let Some(list) = self.by_hook.get(&name) else { return Verdict::Next };
        // The cache key leaves out the client's source port (new on every connection) and, as
        // VerneMQ's does, the payload: a cached `auth_on_publish` answer stands for the client,
        // topic, QoS and retain flag whatever the payload.
        let mut set_aside = Vec::new();
        if let Some(o) = body.as_object_mut() {
            for k in ["peer_port", "payload"] {
                if let Some(v) = o.remove(k) {
                    set_aside.push((k, v));
                }
            }
        }
        let key = body.to_string();
        if let Some(o) = body.as_object_mut() {
            o.extend(set_aside.into_iter().map(|(k, v)| (k.to_string(), v)));
        }
        // The request body is written only when an endpoint is really asked.
        let mut text = None;
        for e in list {
            let v = self.ask(&name, e, &body, &mut text, &key).await;
            if v != Verdict::Next {
                return v;
            }
        }
        Verdict::Next
    }

    async fn ask(&self, name: &str, e: &Endpoint, body: &Value, text: &mut Option<String>, key: &str) -> Verdict {
        let key = format!("{}\n{name}\n{key}", e.config.endpoint);
        if let Some((v, until)) = self.cache.get(&key) {
            if until > Instant::now() {
                e.counts.cache_hits.fetch_add(1, Ordering::Relaxed);
                return v;
            }
            self.cache.invalidate(&key);
        }
        e.counts.calls.fetch_add(1, Ordering::Relaxed);
        let sent = self
            .http
            .post(&e.config.endpoint)
            .timeout(Duration::from_millis(e.config.timeout_ms.max(1)))
            .header("content-type", "application/json")
            .header("vernemq-hook", name)
            .body(text.get_or_insert_with(|| body.to_string()).clone())
            .send()
            .await;
        let answer = match sent {
            Ok(r) if r.status().is_success() => {
                let max_age = r
                    .headers()
                    .get("cache-control")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.split(',').find_map(|d| d.trim().strip_prefix("max-age=")?.parse::<u64>().ok()));
                match r.bytes().await.ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok()).and_then(verdict) {
                    Some(v) => Ok((v, max_age)),
                    None => Err("unreadable answer".to_string()),
                }
            }
            Ok(r) => Err(format!("HTTP {}", r.status())),
            Err(err) if err.is_timeout() => Err("timed out".into()),
            Err(err) => Err(err.to_string()),
        };
        match answer {
            Ok((v, max_age)) => {
                if let Some(s) = max_age.filter(|s| *s > 0) {
                    // A payload modifier belongs to the payload it was given for: not cached
                    // (VerneMQ drops it the same way).
                    let mut cached = v.clone();
                    if let Verdict::Ok(a) = &mut cached {
                        if let Some(m) = a.get_mut("modifiers").and_then(Value::as_object_mut) {
                            m.remove("payload");
                        }
                    }
                    self.cache.insert(key, (cached, Instant::now() + Duration::from_secs(s.min(86_400))));
                }
                v
            }
            Err(why) => {
                e.counts.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(hook = name, endpoint = %e.config.endpoint, error = %why, policy = ?e.config.on_failure, "webhook failed");
                match e.config.on_failure {
                    OnFailure::Deny => Verdict::Error(format!("webhook {name} failed: {why}")),
                    OnFailure::Next => Verdict::Next,
                    OnFailure::Allow => Verdict::Ok(json!({})),
                }
            }
        }
    }

    /// Queue a notification for every endpoint of `hook` (the body is built only if any).
    pub fn notify(&self, hook: &str, v5: bool, body: impl FnOnce() -> Value) {
        let Some(list) = self.by_hook.get(&Webhooks::name(hook, v5)) else { return };
        // Serialised once; every endpoint shares the bytes.
        let body = bytes::Bytes::from(body().to_string());
        for e in list {
            if let Some(q) = &e.queue {
                if q.try_send(body.clone()).is_err() {
                    e.counts.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// (hook, endpoint, counters) of every endpoint.
    pub fn counts(&self) -> Vec<(String, String, Arc<HookCounts>)> {
        let mut v: Vec<_> = self
            .by_hook
            .iter()
            .flat_map(|(h, l)| l.iter().map(move |e| (h.clone(), e.config.endpoint.clone(), e.counts.clone())))
            .collect();
        v.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        v
    }
}

/// VerneMQ's answers: `{"result": "ok"}`, `{"result": "next"}`, `{"result": {"error": …}}`.
fn verdict(v: Value) -> Option<Verdict> {
    match &v["result"] {
        Value::String(s) if s == "ok" => Some(Verdict::Ok(v)),
        Value::String(s) if s == "next" => Some(Verdict::Next),
        Value::Object(o) if o.contains_key("error") => {
            Some(Verdict::Error(o["error"].as_str().map(str::to_string).unwrap_or_else(|| o["error"].to_string())))
        }
        _ => None,
    }
}

/// Send an endpoint's notifications: up to `batch` requests in flight at once, a new one
/// starting as soon as any finishes (a slow request holds up only its own slot).
async fn worker(http: reqwest::Client, c: WebhookConfig, rx: mpsc::Receiver<bytes::Bytes>, counts: Arc<HookCounts>) {
    let name = c.hook.clone();
    let timeout = Duration::from_millis(c.timeout_ms.max(1));
    let queued = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
    queued
        .map(|body| {
            let (http, name, url, counts) = (http.clone(), name.clone(), c.endpoint.clone(), counts.clone());
            async move {
                counts.calls.fetch_add(1, Ordering::Relaxed);
                let r = http
                    .post(&url)
                    .timeout(timeout)
                    .header("content-type", "application/json")
                    .header("vernemq-hook", &name)
                    .body(body)
                    .send()
                    .await;
                if !r.is_ok_and(|r| r.status().is_success()) {
                    counts.failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .buffer_unordered(c.batch.max(1))
        .for_each(|()| async {})
        .await;
}

/// Shapes of the request bodies (VerneMQ's field names).
pub mod body {
    use serde_json::{json, Value};

    pub fn register(
        peer: std::net::SocketAddr,
        username: Option<&str>,
        password: Option<&[u8]>,
        client_id: &str,
        clean: bool,
        v5: bool,
    ) -> Value {
        let mut b = json!({
            "peer_addr": peer.ip().to_string(), "peer_port": peer.port(), "mountpoint": "",
            "username": username, "password": password.map(String::from_utf8_lossy), "client_id": client_id,
        });
        if v5 {
            b["clean_start"] = json!(clean);
            b["properties"] = json!({});
        } else {
            b["clean_session"] = json!(clean);
        }
        b
    }

    pub fn registered(peer: std::net::SocketAddr, username: Option<&str>, client_id: &str, v5: bool) -> Value {
        let mut b = json!({"peer_addr": peer.ip().to_string(), "peer_port": peer.port(), "username": username, "mountpoint": "", "client_id": client_id});
        if v5 {
            b["properties"] = json!({});
        }
        b
    }

    pub fn publish(username: Option<&str>, client_id: &str, qos: u8, topic: &str, payload: Value, retain: bool, v5: bool) -> Value {
        let mut b = json!({"username": username, "client_id": client_id, "mountpoint": "", "qos": qos, "topic": topic, "payload": payload, "retain": retain});
        if v5 {
            b["properties"] = json!({});
        }
        b
    }

    pub fn subscribe(username: Option<&str>, client_id: &str, topics: Vec<(String, u8)>, v5: bool) -> Value {
        let t: Vec<Value> = topics.into_iter().map(|(t, q)| json!({"topic": t, "qos": q})).collect();
        let mut b = json!({"username": username, "client_id": client_id, "mountpoint": "", "topics": t});
        if v5 {
            b["properties"] = json!({});
        }
        b
    }

    pub fn unsubscribe(username: Option<&str>, client_id: &str, topics: &[String], v5: bool) -> Value {
        let mut b = json!({"username": username, "client_id": client_id, "mountpoint": "", "topics": topics});
        if v5 {
            b["properties"] = json!({});
        }
        b
    }

    pub fn deliver(username: Option<&str>, client_id: &str, topic: &str, payload: Value, qos: u8, retain: bool, v5: bool) -> Value {
        let mut b = json!({"username": username, "client_id": client_id, "mountpoint": "", "topic": topic, "payload": payload, "qos": qos, "retain": retain});
        if v5 {
            b["properties"] = json!({});
        }
        b
    }

    pub fn client(client_id: &str) -> Value {
        json!({"client_id": client_id, "mountpoint": ""})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vernemq_answers() {
        assert_eq!(verdict(json!({"result": "next"})), Some(Verdict::Next));
        assert!(
            matches!(verdict(json!({"result": "ok", "modifiers": {"topic": "x"}})), Some(Verdict::Ok(v)) if v["modifiers"]["topic"] == "x")
        );
        assert_eq!(verdict(json!({"result": {"error": "not_allowed"}})), Some(Verdict::Error("not_allowed".into())));
        assert_eq!(verdict(json!({"result": 5})), None);
        assert_eq!(verdict(json!("ok")), None);
    }
}
