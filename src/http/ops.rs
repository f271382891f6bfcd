//! The operators' API under `/admin/v1/…` (what `thingsctl` calls). Every call works on any
//! node and answers for the whole cluster unless `?node=` names one; nodes that could not
//! answer are listed in `errors`, so a partial answer is never mistaken for a whole one.
//! For the system scope only: an admin API key, or a system administrator's access token.
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query as Q, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::broker::Broker;
use crate::ops::{self, gather, NodeAnswer, OpsError, Query};

type Answer = Result<Json<Value>, ApiError>;

pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/admin/v1/cluster", get(cluster_status))
        .route("/admin/v1/cluster/join", post(cluster_join))
        .route("/admin/v1/cluster/leave", post(cluster_leave))
        .route("/admin/v1/sessions", get(sessions))
        .route("/admin/v1/sessions/{*client}", get(session).delete(kick))
        .route("/admin/v1/subscriptions", get(subscriptions))
        .route("/admin/v1/routes", get(routes_list))
        .route("/admin/v1/retained", get(retained).delete(retained_delete))
        .route("/admin/v1/actors", get(actors))
        .route("/admin/v1/actors/tree", get(tree))
        .route("/admin/v1/actors/{*name}", get(actor))
        .route("/admin/v1/metrics", get(metrics))
        .route("/admin/v1/trace/{*client}", get(trace))
        .route("/admin/v1/webhooks", get(webhooks))
        .route_layer(middleware::from_fn_with_state(state, require_operator))
}

/// Operators' calls reach every tenant's sessions: the system scope only.
async fn require_operator(State(s): State<AppState>, req: axum::extract::Request, next: middleware::Next) -> Result<Response, ApiError> {
    let (mut parts, body) = req.into_parts();
    let c = <super::api::Caller as axum::extract::FromRequestParts<AppState>>::from_request_parts(&mut parts, &s).await?;
    if !c.system() {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "the operators' API is for the system scope"));
    }
    c.require("tenant:manage")?;
    Ok(next.run(axum::extract::Request::from_parts(parts, body)).await)
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Params {
    node: Option<String>,
    client: Option<String>,
    device: Option<String>,
    state: Option<String>,
    filter: Option<String>,
    topic: Option<String>,
    kind: Option<String>,
    sort: Option<String>,
    limit: Option<String>,
    discard: Option<String>,
    secs: Option<String>,
    max_children: Option<String>,
}

impl Params {
    fn num(v: &Option<String>, name: &str, default: usize) -> Result<usize, ApiError> {
        match v.as_deref() {
            None | Some("") => Ok(default),
            Some(s) => s.parse().map_err(|_| bad(format!("{name} must be a non-negative integer"))),
        }
    }
    fn limit(&self) -> Result<usize, ApiError> {
        Ok(Self::num(&self.limit, "limit", 100)?.clamp(1, ops::MAX_LIMIT))
    }
    fn flag(v: &Option<String>) -> bool {
        matches!(v.as_deref(), Some("true" | "1" | "yes"))
    }
}

fn bad(m: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid", m)
}

async fn ask(b: &AppState, q: Query, node: Option<&str>) -> Result<Vec<NodeAnswer>, ApiError> {
    gather(&b.broker, &b.services, &q, node).await.map_err(ApiError::from)
}

/// Each kind of failure as the HTTP status that says it.
impl From<OpsError> for ApiError {
    fn from(e: OpsError) -> ApiError {
        let (status, code) = match &e {
            OpsError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
            OpsError::Ambiguous(_) => (StatusCode::CONFLICT, "ambiguous"),
            OpsError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            OpsError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            OpsError::Peer(_) => (StatusCode::BAD_GATEWAY, "node_error"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

fn errors(answers: &[NodeAnswer]) -> Value {
    json!(answers
        .iter()
        .filter_map(|a| a.result.as_ref().err().map(|e| json!({ "node": a.node, "error": e.to_string() })))
        .collect::<Vec<_>>())
}

/// Merge each node's `items` (sorted by `key`, cut at `limit`).
fn merged(answers: Vec<NodeAnswer>, key: impl Fn(&Value) -> String, limit: usize) -> Value {
    let errs = errors(&answers);
    let mut truncated = false;
    let mut items = Vec::new();
    for a in answers {
        if let Ok(v) = a.result {
            truncated |= v["truncated"].as_bool().unwrap_or(false);
            if let Some(Value::Array(list)) = v.get("items").cloned() {
                items.extend(list);
            }
        }
    }
    items.sort_by_key(|v| key(v));
    if items.len() > limit {
        items.truncate(limit);
        truncated = true;
    }
    json!({ "items": items, "truncated": truncated, "errors": errs })
}

/// Every node's broker webhooks (configured per node) with their counters.
async fn webhooks(State(b): State<AppState>, Q(p): Q<Params>) -> Answer {
    let answers = ask(&b, Query::Webhooks, p.node.as_deref()).await?;
    let key = |v: &Value| {
        format!(
            "{}\u{0}{}\u{0}{}",
            v["node"].as_str().unwrap_or(""),
            v["hook"].as_str().unwrap_or(""),
            v["endpoint"].as_str().unwrap_or("")
        )
    };
    Ok(Json(merged(answers, key, usize::MAX)))
}

async fn cluster_status(State(b): State<AppState>, Q(p): Q<Params>) -> Answer {
    let answers = ask(&b, Query::Node, p.node.as_deref()).await?;
    let members = match b.cluster.get() {
        Some(c) => c.members().await,
        None => vec![],
    };
    let nodes: Vec<Value> = answers
        .iter()
        .map(|a| {
            let m = members.iter().find(|m| m.name == a.node);
            let mut v = match &a.result {
                Ok(v) => v.clone(),
                Err(e) => json!({ "node": a.node, "error": e.to_string() }),
            };
            if let Some(o) = v.as_object_mut() {
                o.remove("members");
                o.insert(
                    "state".into(),
                    json!(if a.result.is_ok() {
                        "up"
                    } else if m.is_some_and(|m| m.up) {
                        "unreachable"
                    } else {
                        "down"
                    }),
                );
                o.insert("addr".into(), json!(m.map(|m| m.addr.clone())));
                o.insert(
                    "rtt_ms".into(),
                    json!(if a.node == b.config.node.name { None } else { Some((a.rtt_ms * 1000.0).round() / 1000.0) }),
                );
            }
            v
        })
        .collect();
    Ok(Json(json!({
        "answered_by": b.config.node.name,
        "cluster": b.cluster.get().is_some(),
        "nodes": nodes,
        "errors": errors(&answers),
    })))
}

#[derive(Deserialize)]
struct JoinBody {
    seed: String,
}

async fn cluster_join(State(b): State<AppState>, Q(p): Q<Params>, body: Result<Json<JoinBody>, JsonRejection>) -> Answer {
    let Json(j) = body?;
    if j.seed.trim().is_empty() || !j.seed.contains(':') {
        return Err(bad("seed must be host:port of a cluster node"));
    }
    let node = p.node.clone().unwrap_or_else(|| b.config.node.name.clone());
    one(ask(&b, Query::Join { addr: j.seed.trim().to_string() }, Some(&node)).await?)
}

#[derive(Deserialize)]
struct LeaveBody {
    node: String,
}

async fn cluster_leave(State(b): State<AppState>, body: Result<Json<LeaveBody>, JsonRejection>) -> Answer {
    let Json(l) = body?;
    one(ask(&b, Query::Depart, Some(&l.node)).await?)
}

/// The answer of the one node asked (its error as a 502 naming it).
fn one(mut answers: Vec<NodeAnswer>) -> Answer {
    match answers.pop() {
        Some(NodeAnswer { result: Ok(v), .. }) => Ok(Json(v)),
        Some(NodeAnswer { node, result: Err(e), .. }) => Err(ApiError::new(StatusCode::BAD_GATEWAY, "node_error", format!("{node}: {e}"))),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such node")),
    }
}

async fn sessions(State(b): State<AppState>, Q(p): Q<Params>) -> Answer {
    let limit = p.limit()?;
    let q = Query::Sessions { client: p.client.clone(), state: p.state.clone(), limit };
    let answers = ask(&b, q, p.node.as_deref()).await?;
    if let Some(e) = answers.iter().find_map(|a| a.result.as_ref().err().filter(|e| matches!(e, OpsError::Invalid(_)))) {
        return Err(e.clone().into());
    }
    Ok(Json(merged(answers, |v| format!("{}\u{0}{}", v["client_id"].as_str().unwrap_or(""), v["node"].as_str().unwrap_or("")), limit)))
}

/// The first node's non-null answer (a client's session lives on one node), else 404.
fn found(answers: Vec<NodeAnswer>, what: &str) -> Answer {
    let errs = errors(&answers);
    if let Some(e) = answers.iter().find_map(|a| a.result.as_ref().err().filter(|e| matches!(e, OpsError::Ambiguous(_)))) {
        return Err(e.clone().into());
    }
    match answers.into_iter().find_map(|a| a.result.ok().filter(|v| !v.is_null())) {
        Some(mut v) => {
            v["errors"] = errs;
            Ok(Json(v))
        }
        None if errs.as_array().is_some_and(|e| !e.is_empty()) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found on the nodes that answered (some did not: {errs})"),
        )),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("{what} not found"))),
    }
}

async fn session(State(b): State<AppState>, Path(client): Path<String>, Q(p): Q<Params>) -> Answer {
    let answers = ask(&b, Query::Session { client: client.clone(), device: p.device.clone() }, p.node.as_deref()).await?;
    found(answers, &format!("session {client:?}"))
}

async fn kick(State(b): State<AppState>, Path(client): Path<String>, Q(p): Q<Params>) -> Answer {
    let q = Query::Kick { client: client.clone(), device: p.device.clone(), discard: Params::flag(&p.discard) };
    found(ask(&b, q, p.node.as_deref()).await?, &format!("session {client:?}"))
}

async fn subscriptions(State(b): State<AppState>, Q(p): Q<Params>) -> Answer {
    let limit = p.limit()?;
    let q = Query::Subscriptions { client: p.client.clone(), filter: p.filter.clone(), limit };
    let answers = ask(&b, q, p.node.as_deref()).await?;
    Ok(Json(merged(
        answers,
        |v| {
            format!(
                "{}\u{0}{}\u{0}{}",
                v["filter"].as_str().unwrap_or(""),
                v["client_id"].as_str().unwrap_or(""),
                v["node"].as_str().unwrap_or("")
            )
        },
        limit,
    )))
}

/// Without `node`: every node's own routes, grouped filter → nodes. With it: that node's
/// whole table (its own routes and what it knows of the others').
async fn routes_list(State(b): State<AppState>, Q(p): Q<Params>) -> Answer {
    let answers = ask(&b, Query::Routes, p.node.as_deref()).await?;
    if p.node.is_some() {
        return one(answers);
    }
    let errs = errors(&answers);
    let mut by: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for a in &answers {
        if let Ok(v) = &a.result {
            for f in v["local"].as_array().into_iter().flatten().filter_map(|f| f.as_str()) {
                by.entry(f.to_string()).or_default().push(a.node.clone());
            }
        }
    }
    let items: Vec<Value> = by
        .into_iter()
        .map(|(f, mut n)| {
            n.sort();
            json!({ "filter": f, "nodes": n })
        })
        .collect();
    Ok(Json(json!({ "items": items, "errors": errs })))
}

/// Retained messages are replicated to every node: one node answers (this one, or `node`).
async fn retained(State(b): State<AppState>, Q(p): Q<Params>) -> Answer {
    let q = Query::Retained { filter: p.filter.clone(), limit: p.limit()? };
    let node = p.node.clone().unwrap_or_else(|| b.config.node.name.clone());
    match ask(&b, q, Some(&node)).await?.pop().map(|a| a.result) {
        Some(Ok(v)) => Ok(Json(v)),
        Some(Err(e)) => Err(e.into()),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such node")),
    }
}

async fn retained_delete(State(b): State<AppState>, Q(p): Q<Params>) -> Answer {
    let topic = p.topic.clone().ok_or_else(|| bad("topic is required"))?;
    Ok(Json(ops::local(&b.broker, &b.services, Query::RetainedDelete { topic }, None).await?))
}

async fn actors(State(b): State<AppState>, Q(p): Q<Params>) -> Answer {
    let limit = Params::num(&p.limit, "limit", 10_000)?.clamp(1, ops::MAX_LIMIT);
    let answers = ask(&b, Query::Actors { kind: p.kind.clone() }, p.node.as_deref()).await?;
    let sort = p.sort.clone().unwrap_or_else(|| "name".into());
    let key: Box<dyn Fn(&Value) -> String> = match sort.as_str() {
        "name" => Box::new(|v: &Value| format!("{}\u{0}{}", v["name"].as_str().unwrap_or(""), v["node"].as_str().unwrap_or(""))),
        // Descending numeric sorts: largest first (zero-padded inverse).
        "mailbox" | "handled" | "mean_us" | "max_us" | "restarts" | "age_secs" => {
            let f = sort.clone();
            Box::new(move |v: &Value| format!("{:020.3}", 1e15 - v[&f].as_f64().unwrap_or(0.0)))
        }
        "kind" | "node" => {
            let f = sort.clone();
            Box::new(move |v: &Value| format!("{}\u{0}{}", v[&f].as_str().unwrap_or(""), v["name"].as_str().unwrap_or("")))
        }
        other => {
            return Err(bad(format!("cannot sort by {other:?}: name, kind, node, mailbox, handled, mean_us, max_us, restarts, age_secs")))
        }
    };
    Ok(Json(merged(answers, key, limit)))
}

async fn tree(State(b): State<AppState>, Q(p): Q<Params>) -> Answer {
    let max_children = Params::num(&p.max_children, "max_children", 50)?;
    let answers = ask(&b, Query::Tree { max_children }, p.node.as_deref()).await?;
    let errs = errors(&answers);
    let nodes: Vec<Value> = answers.into_iter().filter_map(|a| a.result.ok()).collect();
    Ok(Json(json!({ "nodes": nodes, "errors": errs })))
}

async fn actor(State(b): State<AppState>, Path(name): Path<String>, Q(p): Q<Params>) -> Answer {
    let answers = ask(&b, Query::Actor { name: name.clone() }, p.node.as_deref()).await?;
    found(answers, &format!("actor {name:?}"))
}

async fn metrics(State(b): State<AppState>, Q(p): Q<Params>) -> Answer {
    let answers = ask(&b, Query::Metrics, p.node.as_deref()).await?;
    let errs = errors(&answers);
    let nodes: Vec<Value> = answers.into_iter().filter_map(|a| a.result.ok()).collect();
    // Cluster totals of every numeric counter (uptime excluded).
    let mut total = serde_json::Map::new();
    for n in &nodes {
        for (k, v) in n.as_object().into_iter().flatten() {
            if let (Some(x), false) = (v.as_u64(), k == "uptime_secs") {
                let e = total.entry(k.clone()).or_insert(json!(0u64));
                *e = json!(e.as_u64().unwrap_or(0) + x);
            }
        }
    }
    Ok(Json(json!({ "nodes": nodes, "total": total, "errors": errs })))
}

/// Stops the trace everywhere when the HTTP response ends (client gone or deadline).
struct TraceGuard {
    b: Arc<Broker>,
    id: u64,
    peers: Vec<String>,
}

impl Drop for TraceGuard {
    fn drop(&mut self) {
        self.b.tracer.remove(self.id);
        if let Some(c) = self.b.cluster.get().cloned() {
            let (peers, id) = (std::mem::take(&mut self.peers), self.id);
            tokio::spawn(async move {
                let req = serde_json::to_string(&Query::TraceStop { id }).unwrap_or_default();
                for p in peers {
                    let _ = c.admin(&p, req.clone(), Duration::from_secs(5)).await;
                }
            });
        }
    }
}

/// `GET /admin/v1/trace/{client}`: the client's packets as NDJSON, live, from every node,
/// until the caller hangs up (or `secs` pass). The first line says where the trace runs.
async fn trace(State(b): State<AppState>, Path(client): Path<String>, Q(p): Q<Params>) -> Result<Response, ApiError> {
    let secs = Params::num(&p.secs, "secs", 0)?;
    let id = b.tracer.new_id();
    let (tx, rx, dropped) = ops::trace::channel();
    b.tracer.add(&client, id, tx.clone(), dropped.clone());
    b.tracer.listen(id, tx, dropped.clone());
    let mut nodes = vec![b.config.node.name.clone()];
    let mut errs = Vec::new();
    let mut peers = Vec::new();
    if let Some(c) = b.cluster.get() {
        let req = serde_json::to_string(&Query::TraceStart { id, client: client.clone() }).unwrap_or_default();
        for m in c.members().await.into_iter().filter(|m| m.up && m.name != b.config.node.name) {
            match c.admin(&m.name, req.clone(), ops::PEER_TIMEOUT).await {
                Ok(_) => {
                    nodes.push(m.name.clone());
                    peers.push(m.name);
                }
                Err(e) => errs.push(json!({ "node": m.name, "error": e })),
            }
        }
    }
    let guard = TraceGuard { b: b.broker.clone(), id, peers };
    let head = json!({ "trace": client, "nodes": nodes, "errors": errs }).to_string() + "\n";
    let deadline = (secs > 0).then(|| tokio::time::Instant::now() + Duration::from_secs(secs as u64));
    let stream =
        futures_util::stream::unfold((Some(head), rx, guard, dropped, deadline), |(head, mut rx, guard, dropped, deadline)| async move {
            if let Some(h) = head {
                return Some((Ok::<_, std::convert::Infallible>(Bytes::from(h)), (None, rx, guard, dropped, deadline)));
            }
            let d = dropped.swap(0, std::sync::atomic::Ordering::Relaxed);
            if d > 0 {
                let line = json!({ "dropped": d }).to_string() + "\n";
                return Some((Ok(Bytes::from(line)), (None, rx, guard, dropped, deadline)));
            }
            let next = match deadline {
                Some(t) => tokio::time::timeout_at(t, rx.recv()).await.ok().flatten(),
                None => rx.recv().await,
            };
            next.map(|line| (Ok(Bytes::from(line + "\n")), (None, rx, guard, dropped, deadline)))
        });
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson"), (header::CACHE_CONTROL, "no-cache")], Body::from_stream(stream)).into_response())
}
