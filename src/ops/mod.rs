//! Operations: what `thingsctl` and `/admin/v1/…` ask a node. A [`Query`] is answered by
//! [`local`] on the node itself; [`gather`] asks every live member (or one named node) over
//! the cluster links (`Body::Admin`, JSON inside the versioned wire frame) and collects the
//! answers, with one error entry per node that could not answer — a partial view is always
//! labelled as such.
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::ActorRef;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::actors::inspect::{self, Tell};
use crate::actors::registry::RegistryMessage;
use crate::actors::session::{SessionInfo, SessionMessage};
use crate::broker::Broker;
use crate::message::{now_ms, Message};
use crate::protocols::mqtt::{topic, QoS};
use crate::services::Services;

pub use crate::actors::trace;

/// How long a node waits for another's answer.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound of rows one node returns for a list.
pub const MAX_LIMIT: usize = 100_000;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Query {
    /// This node: version, uptime, counts, its view of the members.
    Node,
    Sessions {
        client: Option<String>,
        state: Option<String>,
        limit: usize,
    },
    /// A session by client id (`device` picks one when several devices use the same client id).
    Session {
        client: String,
        device: Option<String>,
    },
    Kick {
        client: String,
        device: Option<String>,
        discard: bool,
    },
    Subscriptions {
        client: Option<String>,
        filter: Option<String>,
        limit: usize,
    },
    Routes,
    Retained {
        filter: Option<String>,
        limit: usize,
    },
    RetainedDelete {
        topic: String,
    },
    Actors {
        kind: Option<String>,
    },
    Actor {
        name: String,
    },
    Tree {
        max_children: usize,
    },
    Metrics,
    TraceStart {
        id: u64,
        client: String,
    },
    TraceStop {
        id: u64,
    },
    Join {
        addr: String,
    },
    Depart,
    /// The node's broker webhooks and their counters.
    Webhooks,
}

pub use crate::actors::inspect::glob;
pub use crate::actors::session::display_client;

/// Why a query has no answer, by kind, so each interface can say it properly (HTTP: 400,
/// 409, 404, 503, 502). Crosses the cluster as JSON (`kind`, `message`); a node of an older
/// build answers a bare string, read as [`OpsError::Peer`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", content = "message", rename_all = "snake_case")]
pub enum OpsError {
    /// The query is wrong (a state, topic or filter that is not one).
    #[error("{0}")]
    Invalid(String),
    /// More than one session matches: the caller must say which.
    #[error("{0}")]
    Ambiguous(String),
    /// No such node in this cluster.
    #[error("{0}")]
    NotFound(String),
    /// The node cannot answer now (clustering off, an actor not running or not answering).
    #[error("{0}")]
    Unavailable(String),
    /// Another node could not be asked, or failed.
    #[error("{0}")]
    Peer(String),
}

impl OpsError {
    /// An error as another node sent it.
    pub fn from_peer(body: &str) -> OpsError {
        serde_json::from_str(body).unwrap_or_else(|_| OpsError::Peer(body.to_string()))
    }

    /// As it crosses the cluster.
    pub fn to_wire(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| self.to_string())
    }
}

fn invalid(m: impl Into<String>) -> OpsError {
    OpsError::Invalid(m.into())
}

fn unavailable(m: impl Into<String>) -> OpsError {
    OpsError::Unavailable(m.into())
}

/// The answer of one node.
#[derive(Debug, Serialize)]
pub struct NodeAnswer {
    pub node: String,
    #[serde(skip)]
    pub result: Result<Value, OpsError>,
    /// Round trip of the request over the cluster link (0 for the node that answered).
    pub rtt_ms: f64,
}

/// Ask `node` (or every member, this one included) the query. Members that are down are
/// listed with an error. Err: `node` is not a member.
pub async fn gather(b: &Arc<Broker>, svc: &Arc<Services>, q: &Query, node: Option<&str>) -> Result<Vec<NodeAnswer>, OpsError> {
    let me = b.config.node.name.clone();
    let members = match b.cluster.get() {
        Some(c) => c.members().await,
        None => vec![],
    };
    let targets: Vec<(String, bool)> = match node {
        Some(n) if n == me => vec![(me.clone(), true)],
        Some(n) => match members.iter().find(|m| m.name == n) {
            Some(m) => vec![(m.name.clone(), m.up)],
            None => return Err(OpsError::NotFound(format!("no node named {n:?} in this cluster"))),
        },
        None => {
            let mut t = vec![(me.clone(), true)];
            t.extend(members.iter().filter(|m| m.name != me).map(|m| (m.name.clone(), m.up)));
            t
        }
    };
    let req = serde_json::to_string(q).map_err(|e| invalid(e.to_string()))?;
    let asks = targets.into_iter().map(|(name, up)| {
        let (b, svc, req, me) = (b.clone(), svc.clone(), req.clone(), me.clone());
        async move {
            let t = Instant::now();
            let result = if name == me {
                local(&b, &svc, q.clone(), None).await
            } else if !up {
                Err(OpsError::Peer("node is down".into()))
            } else {
                match b.cluster.get() {
                    Some(c) => match c.admin(&name, req, PEER_TIMEOUT).await {
                        Ok(s) => serde_json::from_str(&s).map_err(|e| OpsError::Peer(e.to_string())),
                        Err(e) => Err(OpsError::from_peer(&e)),
                    },
                    None => Err(unavailable("clustering is off")),
                }
            };
            let rtt_ms = if name == me { 0.0 } else { t.elapsed().as_secs_f64() * 1e3 };
            NodeAnswer { node: name, result, rtt_ms }
        }
    });
    Ok(futures_util::future::join_all(asks).await)
}

/// A request from node `from` (JSON), answered here.
pub async fn answer(b: &Arc<Broker>, svc: &Services, from: &str, req: &str) -> Result<Value, OpsError> {
    let q: Query = serde_json::from_str(req).map_err(|e| invalid(format!("bad request: {e}")))?;
    local(b, svc, q, Some(from)).await
}

async fn sessions_matching(b: &Broker, pattern: Option<String>) -> Result<Vec<crate::actors::registry::Listed>, OpsError> {
    let r = b.registry().ok_or_else(|| unavailable("registry not running"))?;
    match r.ask(|reply| RegistryMessage::List(pattern, reply), Some(PEER_TIMEOUT)).await {
        Ok(ractor::rpc::CallResult::Success(v)) => Ok(v),
        _ => Err(unavailable("the registry did not answer")),
    }
}

async fn info(s: &ActorRef<SessionMessage>) -> Option<SessionInfo> {
    match s.ask(SessionMessage::Info, Some(Duration::from_secs(5))).await {
        Ok(ractor::rpc::CallResult::Success(i)) => Some(i),
        _ => None,
    }
}

fn session_json(node: &str, key: &str, i: &SessionInfo, full: bool) -> Value {
    let (device, client) = display_client(key);
    let mut v = json!({
        "client_id": client, "device": device, "node": node, "connected": i.connected,
        "protocol": i.protocol, "peer": i.peer, "connected_at_ms": i.connected_at_ms,
        "disconnected_at_ms": i.disconnected_at_ms, "expiry_secs": i.expiry_secs,
        "subscriptions": i.subscriptions.len(), "inflight": i.inflight, "queued": i.queued,
    });
    if full {
        v["subscriptions"] = json!(i.subscriptions);
        v["will"] = json!(i.will);
        v["generation"] = json!(i.generation);
        v["backup"] = json!(i.backup);
    }
    v
}

/// The one session here for `client` (and `device`): exact key, or client id part.
async fn find_session(b: &Broker, client: &str, device: Option<&str>) -> Result<Option<(Arc<str>, ActorRef<SessionMessage>)>, OpsError> {
    let literal = !client.contains(['*', '?']);
    let all = sessions_matching(b, literal.then(|| client.to_string())).await?;
    let mut hits: Vec<_> = all
        .into_iter()
        .filter(|(k, _, _)| {
            let (d, c) = display_client(k);
            (&**k == client || c == client) && device.is_none_or(|want| d == Some(want))
        })
        .map(|(k, s, _)| (k, s))
        .collect();
    match hits.len() {
        0 => Ok(None),
        1 => Ok(hits.pop()),
        n => Err(OpsError::Ambiguous(format!("{n} devices use client id {client:?} on this node; name the device"))),
    }
}

fn node_status(b: &Broker) -> Value {
    let m = &b.metrics;
    json!({
        "node": b.config.node.name,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": b.started.elapsed().as_secs(),
        "started_ms": now_ms().saturating_sub(b.started.elapsed().as_millis() as u64),
        "clients_connected": m.clients_connected.load(Relaxed),
        "subscriptions": b.subscription_count(),
        "retained": b.retained.load().len(),
        "actors": inspect::total(),
        "cluster": b.cluster.get().is_some(),
    })
}

/// Answer a query on this node. `origin`: the node that asked (None: this node's own API).
pub async fn local(b: &Arc<Broker>, svc: &Services, q: Query, origin: Option<&str>) -> Result<Value, OpsError> {
    let node = b.config.node.name.as_str();
    match q {
        Query::Node => node_answer(b).await,
        Query::Sessions { client, state, limit } => sessions_answer(b, client, state, limit).await,
        Query::Session { client, device } => match find_session(b, &client, device.as_deref()).await? {
            Some((k, s)) => Ok(info(&s).await.map(|i| session_json(node, &k, &i, true)).unwrap_or(Value::Null)),
            None => Ok(Value::Null),
        },
        Query::Kick { client, device, discard } => match find_session(b, &client, device.as_deref()).await? {
            Some((_, s)) => match s.ask(|reply| SessionMessage::Kick { discard, reply }, Some(Duration::from_secs(5))).await {
                Ok(ractor::rpc::CallResult::Success(had)) => Ok(json!({ "node": node, "disconnected": had, "discarded": discard })),
                _ => Err(unavailable("the session did not answer")),
            },
            None => Ok(Value::Null),
        },
        Query::Subscriptions { client, filter, limit } => subscriptions_answer(b, client, filter, limit),
        Query::Routes => routes_answer(b).await,
        Query::Retained { filter, limit } => retained_answer(b, filter, limit),
        Query::RetainedDelete { topic: t } => {
            if !topic::valid_topic_name(&t) {
                return Err(invalid(format!("{t:?} is not a valid topic name")));
            }
            let existed = b.retained.load().get(&t).is_some();
            if existed {
                // An empty retained message deletes (and is replicated as a tombstone).
                b.retain(Arc::new(Message::from_node(t.as_str(), bytes::Bytes::new(), QoS::AtMostOnce, true))).await;
            }
            Ok(json!({ "topic": t, "deleted": existed }))
        }
        Query::Actors { kind } => {
            let items: Vec<_> = inspect::list(node).into_iter().filter(|a| kind.as_deref().is_none_or(|k| a.kind == k)).collect();
            Ok(json!({ "items": items }))
        }
        Query::Actor { name } => Ok(inspect::show(node, &name).map(|a| json!(a)).unwrap_or(Value::Null)),
        Query::Tree { max_children } => Ok(json!({ "node": node, "roots": inspect::tree(max_children.clamp(1, 10_000)) })),
        Query::Metrics => Ok(summary(b, svc)),
        Query::Webhooks => Ok(webhooks_answer(b, svc)),
        Query::TraceStart { id, client } => trace_start(b, id, client, origin),
        Query::TraceStop { id } => {
            b.tracer.remove(id);
            Ok(json!({ "node": node, "stopped": id }))
        }
        Query::Join { addr } => {
            let c = b.cluster.get().ok_or_else(|| unavailable("clustering is off on this node (cluster.enabled = false)"))?;
            c.join(addr.clone());
            Ok(json!({ "node": node, "joining": addr }))
        }
        Query::Depart => {
            let c = b.cluster.get().ok_or_else(|| unavailable("clustering is off on this node"))?;
            let peers = c.depart().await;
            Ok(json!({ "node": node, "left": true, "peers_notified": peers }))
        }
    }
}

/// This node's status, session count and (in a cluster) members.
async fn node_answer(b: &Arc<Broker>) -> Result<Value, OpsError> {
    let mut v = node_status(b);
    let sessions = match b.registry() {
        Some(r) => match r.ask(RegistryMessage::Count, Some(PEER_TIMEOUT)).await {
            Ok(ractor::rpc::CallResult::Success(n)) => Some(n),
            _ => None,
        },
        None => None,
    };
    v["sessions"] = json!(sessions);
    if let Some(c) = b.cluster.get() {
        v["members"] = json!(c.members().await);
    }
    Ok(v)
}

/// Sessions whose client id matches, by state, sorted, at most `limit`.
async fn sessions_answer(b: &Arc<Broker>, client: Option<String>, state: Option<String>, limit: usize) -> Result<Value, OpsError> {
    let node = b.config.node.name.as_str();
    let limit = limit.clamp(1, MAX_LIMIT);
    let want = match state.as_deref() {
        None | Some("all") => None,
        Some("connected") => Some(true),
        Some("offline") | Some("disconnected") => Some(false),
        Some(s) => return Err(invalid(format!("state {s:?}: use connected, offline or all"))),
    };
    // The registry knows which sessions are connected: only the ones shown are asked.
    let mut all = sessions_matching(b, client).await?;
    all.retain(|(_, _, online)| want.is_none_or(|w| w == *online));
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let truncated = all.len() > limit;
    all.truncate(limit);
    let infos = futures_util::future::join_all(all.iter().map(|(_, s, _)| info(s))).await;
    // A session that ended (or changed state) between the list and its answer is left out.
    let items: Vec<Value> = all
        .iter()
        .zip(infos)
        .filter_map(|((k, _, _), i)| i.filter(|i| want.is_none_or(|w| w == i.connected)).map(|i| session_json(node, k, &i, false)))
        .collect();
    Ok(json!({ "items": items, "truncated": truncated }))
}

/// Subscriptions from the shard snapshots, filtered by client and filter globs.
fn subscriptions_answer(b: &Arc<Broker>, client: Option<String>, filter: Option<String>, limit: usize) -> Result<Value, OpsError> {
    let node = b.config.node.name.as_str();
    let limit = limit.clamp(1, MAX_LIMIT);
    let mut items = Vec::new();
    let mut truncated = false;
    for snap in &b.router.snapshots {
        let root = snap.load();
        root.each(&mut Vec::new(), &mut |f, key, sub, group| {
            let (device, cid) = display_client(key);
            if client.as_deref().is_some_and(|p| !glob(p, cid) && !glob(p, key)) || filter.as_deref().is_some_and(|p| !glob(p, f)) {
                return;
            }
            if items.len() >= limit {
                truncated = true;
                return;
            }
            items.push(json!({
                "node": node, "client_id": cid, "device": device, "filter": f, "qos": sub.opts.qos as u8,
                "shared_group": group.and_then(|g| g.strip_prefix("$share/")).and_then(|g| g.split('/').next()),
                "no_local": sub.opts.no_local, "retain_as_published": sub.opts.retain_as_published,
                "online": sub.load.online.load(Relaxed),
            }));
        });
    }
    items.sort_by(|a, b| (a["filter"].as_str(), a["client_id"].as_str()).cmp(&(b["filter"].as_str(), b["client_id"].as_str())));
    Ok(json!({ "items": items, "truncated": truncated }))
}

/// Route keys: this node's, and other nodes' as the route table has them.
async fn routes_answer(b: &Arc<Broker>) -> Result<Value, OpsError> {
    let node = b.config.node.name.as_str();
    let mut local_keys = Vec::new();
    for snap in &b.router.snapshots {
        snap.load().route_keys(&mut Vec::new(), &mut local_keys);
    }
    let mut local: Vec<String> = local_keys.into_iter().map(|(k, _)| k.to_string()).collect();
    local.sort();
    local.dedup();
    let mut remote = Vec::new();
    if let Some(c) = b.cluster.get() {
        let names: std::collections::HashMap<u32, String> = c.members().await.into_iter().map(|m| (m.idx, m.name)).collect();
        let mut entries = Vec::new();
        c.routes.load().entries(&mut Vec::new(), &mut entries);
        entries.sort();
        for (f, nodes) in entries {
            let nodes: Vec<&str> = nodes.iter().map(|i| names.get(i).map_or("?", |s| s.as_str())).collect();
            remote.push(json!({ "filter": f, "nodes": nodes }));
        }
    }
    Ok(json!({ "node": node, "local": local, "remote": remote }))
}

/// Retained messages matching a filter (payloads cut at 64 bytes).
fn retained_answer(b: &Arc<Broker>, filter: Option<String>, limit: usize) -> Result<Value, OpsError> {
    let node = b.config.node.name.as_str();
    let limit = limit.clamp(1, MAX_LIMIT);
    let set = b.retained.load();
    let mut msgs = match &filter {
        Some(f) => {
            if !topic::valid_filter(f) {
                return Err(invalid(format!("{f:?} is not a valid topic filter")));
            }
            set.matching(f)
        }
        None => set.messages(),
    };
    msgs.sort_by(|a, b| a.topic.cmp(&b.topic));
    let truncated = msgs.len() > limit;
    let items: Vec<Value> = msgs
        .iter()
        .take(limit)
        .map(|m| {
            json!({
                "topic": &*m.topic, "qos": m.qos as u8, "payload_len": m.payload.len(),
                "payload": String::from_utf8_lossy(&m.payload[..m.payload.len().min(64)]),
                "expires_at_ms": m.expires_at,
            })
        })
        .collect();
    Ok(json!({ "node": node, "items": items, "total": msgs.len(), "truncated": truncated }))
}

/// Configured webhook endpoints and their counters.
fn webhooks_answer(b: &Arc<Broker>, svc: &Services) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    let me = &b.config.node.name;
    let items: Vec<Value> = b
        .config
        .webhooks
        .iter()
        .map(|c| {
            let counts = svc.hooks.as_ref().and_then(|h| h.counts().into_iter().find(|(hk, url, _)| *hk == c.hook && *url == c.endpoint));
            let n = |f: fn(&crate::webhooks::HookCounts) -> u64| counts.as_ref().map_or(0, |(_, _, x)| f(x));
            json!({
                "node": me, "hook": c.hook, "endpoint": c.endpoint, "timeout_ms": c.timeout_ms, "on_failure": c.on_failure,
                "requests": n(|x| x.calls.load(Relaxed)), "failures": n(|x| x.failures.load(Relaxed)),
                "cache_hits": n(|x| x.cache_hits.load(Relaxed)), "dropped": n(|x| x.dropped.load(Relaxed)),
            })
        })
        .collect();
    json!({ "items": items })
}

/// Start tracing a client here for the node that asked; lines go to it in batches.
fn trace_start(b: &Arc<Broker>, id: u64, client: String, origin: Option<&str>) -> Result<Value, OpsError> {
    let node = b.config.node.name.as_str();
    let origin = origin.ok_or_else(|| invalid("a trace is started through /admin/v1/trace"))?.to_string();
    let cluster = b.cluster.get().cloned().ok_or_else(|| unavailable("clustering is off"))?;
    let (tx, mut rx, dropped) = trace::channel();
    b.tracer.add(&client, id, tx, dropped.clone());
    // Forward this node's lines to the asking node in batches, until the trace stops
    // (the sink is removed and the channel closes) or the asking node is gone.
    let tracer = b.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                first = rx.recv() => {
                    let Some(first) = first else { break };
                    let mut events = vec![first];
                    while events.len() < 500 {
                        match rx.try_recv() {
                            Ok(e) => events.push(e),
                            Err(_) => break,
                        }
                    }
                    let d = dropped.swap(0, Relaxed);
                    if d > 0 {
                        events.push(json!({ "dropped": d }).to_string());
                    }
                    cluster.send(&origin, crate::cluster::wire::Body::Trace { id, events });
                }
                _ = tick.tick() => {
                    if !cluster.peer_names().iter().any(|p| **p == *origin) {
                        tracer.tracer.remove(id);
                        break;
                    }
                }
            }
        }
    });
    Ok(json!({ "node": node, "tracing": client }))
}

/// The key counters of this node (`thingsctl metrics`).
pub fn summary(b: &Broker, svc: &Services) -> Value {
    let m = &b.metrics;
    let g = |c: &std::sync::atomic::AtomicU64| c.load(Relaxed);
    let mut v = json!({
        "node": b.config.node.name,
        "uptime_secs": b.started.elapsed().as_secs(),
        "clients_connected": g(&m.clients_connected),
        "connections_total": g(&m.connections_total),
        "messages_received": g(&m.messages_received),
        "messages_sent": g(&m.messages_sent),
        "messages_dropped": g(&m.messages_dropped),
        "messages_expired": g(&m.messages_expired),
        "bytes_received": g(&m.bytes_received),
        "bytes_sent": g(&m.bytes_sent),
        "protocol_errors": g(&m.protocol_errors),
        "queued": crate::actors::load::QUEUED.load(Relaxed).max(0),
        "retained": b.retained.load().len(),
        "subscriptions": b.subscription_count(),
        "actors": inspect::total(),
    });
    if let Some(c) = b.cluster.get() {
        v["cluster_forwarded"] = json!(c.forwarded.load(Relaxed));
        v["cluster_received"] = json!(c.received.load(Relaxed));
        v["cluster_peers_up"] = json!(c.links.load().len());
    }
    {
        let t = &svc.telemetry;
        v["telemetry_points_written"] = json!(t.metrics.points.load(Relaxed));
        v["telemetry_busy"] = json!(t.metrics.busy.load(Relaxed));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("*", "anything"));
        assert!(glob("sensor-*", "sensor-17"));
        assert!(!glob("sensor-*", "pump-1"));
        assert!(glob("s?n*r-1", "sensor-1"));
        assert!(glob("*-1", "a-b-1"));
        assert!(!glob("a", "ab"));
        assert!(glob("", ""));
        assert!(glob("é*", "élan"));
    }

    #[test]
    fn device_sessions_show_their_client_id() {
        assert_eq!(display_client("d-1\0esp32"), (Some("d-1"), "esp32"));
        assert_eq!(display_client("plain"), (None, "plain"));
    }

    #[test]
    fn queries_are_json_with_an_op() {
        let q = Query::Sessions { client: Some("a*".into()), state: None, limit: 10 };
        let s = serde_json::to_string(&q).unwrap();
        assert!(s.contains("\"op\":\"sessions\""));
        assert!(matches!(serde_json::from_str::<Query>(&s).unwrap(), Query::Sessions { limit: 10, .. }));
    }
}
