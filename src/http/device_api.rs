//! The HTTP device API (ThingsBoard-compatible paths): a device authenticates with its
//! access token in the URL.
//!
//! - `POST /api/v1/{token}/telemetry` — `{"k": v}`, `{"ts": ms, "values": {..}}` or an array
//! - `POST /api/v1/{token}/attributes`, `GET /api/v1/{token}/attributes?keys=a,b`
//! - `POST /api/v1/{token}/events` — `{"method": "...", "params": {..}}`
//! - `GET /api/v1/{token}/rpc?timeout=ms` — long poll for the next downlink (408 on timeout)
//! - `POST /api/v1/{token}/rpc/{id}` — the device's response to downlink `id`
//! - `POST /api/v1/{token}/claim` — `{"secretKey": "...", "durationMs": n}`: offer the device for claiming
//! - `GET /api/v1/{token}/firmware?title=&version=&size=&chunk=` (and `/software`) — a chunk of
//!   the package announced to the device (`size` bytes, chunk number `chunk`; no `size`: all)
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, AppState};
use crate::devices::{downlink, uplink, AuthError, Devices, EventKind, Identity};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/{token}/telemetry", post(telemetry))
        .route("/api/v1/{token}/attributes", post(post_attributes).get(get_attributes))
        .route("/api/v1/{token}/events", post(events))
        .route("/api/v1/{token}/rpc", get(rpc_poll))
        .route("/api/v1/{token}/rpc/{id}", post(rpc_response))
        .route("/api/v1/{token}/claim", post(claim))
        .route("/api/v1/{token}/firmware", get(firmware))
        .route("/api/v1/{token}/software", get(software))
}

/// The device offers itself for claiming (see `devices::claim`).
async fn claim(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(token): Path<String>,
    body: RawBody,
) -> Result<Json<Value>, ApiError> {
    let (d, ident) = auth(&s, peer, &token).await?;
    d.offer_claim(&ident, &read(body)?).await?;
    Ok(Json(json!({})))
}

/// Which chunk of an OTA package a device asks for (ThingsBoard's query).
#[derive(Deserialize)]
struct ChunkQuery {
    title: Option<String>,
    version: Option<String>,
    #[serde(default)]
    size: usize,
    #[serde(default)]
    chunk: u64,
}

async fn firmware(
    s: State<AppState>,
    peer: ConnectInfo<SocketAddr>,
    token: Path<String>,
    q: super::api::Q<ChunkQuery>,
) -> axum::response::Response {
    package_chunk(s, peer, token, q, crate::storage::meta::PackageKind::Firmware).await
}

async fn software(
    s: State<AppState>,
    peer: ConnectInfo<SocketAddr>,
    token: Path<String>,
    q: super::api::Q<ChunkQuery>,
) -> axum::response::Response {
    package_chunk(s, peer, token, q, crate::storage::meta::PackageKind::Software).await
}

/// A chunk of the package announced to the device; 404 when none is, or when `title` /
/// `version` name another one.
async fn package_chunk(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(token): Path<String>,
    super::api::Q(q): super::api::Q<ChunkQuery>,
    kind: crate::storage::meta::PackageKind,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let answer = async {
        let (d, ident) = auth(&s, peer, &token).await?;
        let named = |asked: &Option<String>, has: &str| asked.as_deref().is_none_or(|a| a == has);
        let p = match d.announced_package(ident.device_id, kind).await? {
            Some(p) if named(&q.title, &p.title) && named(&q.version, &p.version) => p,
            _ => {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("no such {} announced to this device", kind.as_str()),
                ))
            }
        };
        let chunk = d.package_chunk(&p, q.chunk, q.size).await?;
        Ok::<_, ApiError>(([(axum::http::header::CONTENT_TYPE, "application/octet-stream")], chunk).into_response())
    };
    answer.await.unwrap_or_else(IntoResponse::into_response)
}

pub(super) fn devices(s: &AppState) -> Arc<Devices> {
    s.services.devices.clone()
}

async fn auth(s: &AppState, peer: SocketAddr, token: &str) -> Result<(Arc<Devices>, Arc<Identity>), ApiError> {
    let d = devices(s);
    match d.authenticate_token(peer.ip(), token).await {
        Ok(i) => {
            d.reported(&i.device_number).await;
            Ok((d, i))
        }
        Err(AuthError::BadCredentials) => Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "unknown access token")),
        Err(AuthError::NotAuthorized) => Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "device disabled")),
        Err(AuthError::RateLimited) => {
            Err(ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "too many failed logins from this address"))
        }
        Err(AuthError::Unavailable) => {
            Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the device registry is unavailable"))
        }
    }
}

/// A request body, or the JSON error for one that is too large or unreadable.
type RawBody = Result<Bytes, BytesRejection>;

/// The body, or its rejection as a JSON error (413 `payload_too_large`, else `bad_body`).
fn read(body: RawBody) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        let status = e.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE { "payload_too_large" } else { "bad_body" };
        ApiError::new(status, code, e.body_text())
    })
}

async fn uplink(
    s: &AppState,
    peer: SocketAddr,
    token: &str,
    kind: EventKind,
    mid: Option<String>,
    body: RawBody,
) -> Result<Json<Value>, ApiError> {
    let (d, ident) = auth(s, peer, token).await?;
    let body = read(body)?;
    let now = crate::message::now_ms() as i64;
    let m = uplink::Incoming { kind, gateway: false, message_id: mid, payload: &body, protocol: "http" };
    match uplink::parse(&ident, m, &d.config.devices, now) {
        Err(why) => {
            d.rejected(&ident.device_number, "http", &why);
            let status = match why {
                uplink::Reject::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
                _ => StatusCode::BAD_REQUEST,
            };
            Err(ApiError::new(status, why.code(), why.to_string()))
        }
        Ok(events) => {
            d.ingest(events, None, std::time::Duration::from_millis(d.config.telemetry.wait_ms)).await?;
            Ok(Json(json!({})))
        }
    }
}

async fn telemetry(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(token): Path<String>,
    body: RawBody,
) -> Result<Json<Value>, ApiError> {
    uplink(&s, peer, &token, EventKind::Telemetry, None, body).await
}

async fn post_attributes(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(token): Path<String>,
    body: RawBody,
) -> Result<Json<Value>, ApiError> {
    uplink(&s, peer, &token, EventKind::Attributes, None, body).await
}

async fn events(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(token): Path<String>,
    body: RawBody,
) -> Result<Json<Value>, ApiError> {
    uplink(&s, peer, &token, EventKind::Event, None, body).await
}

async fn rpc_response(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((token, id)): Path<(String, String)>,
    body: RawBody,
) -> Result<Json<Value>, ApiError> {
    uplink(&s, peer, &token, EventKind::CommandResponse, Some(id), body).await
}

#[derive(Deserialize)]
struct KeysQuery {
    #[serde(default)]
    keys: Option<String>,
}

async fn get_attributes(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(token): Path<String>,
    Query(q): Query<KeysQuery>,
) -> Result<Json<Value>, ApiError> {
    let (d, ident) = auth(&s, peer, &token).await?;
    let keys: Vec<String> = q.keys.unwrap_or_default().split(',').map(str::trim).filter(|k| !k.is_empty()).map(str::to_string).collect();
    Ok(Json(d.attributes_doc(ident.device_id, &keys).await?))
}

#[derive(Deserialize)]
struct PollQuery {
    /// Milliseconds to wait (default 30 s, capped by `devices.max_poll_secs`).
    #[serde(default)]
    timeout: Option<u64>,
}

async fn rpc_poll(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(token): Path<String>,
    Query(q): Query<PollQuery>,
) -> Result<Json<Value>, ApiError> {
    let (d, ident) = auth(&s, peer, &token).await?;
    let max = Duration::from_secs(d.config.devices.max_poll_secs.max(1));
    let wait = Duration::from_millis(q.timeout.unwrap_or(30_000)).min(max);
    match d.poll_pending(ident.device_id, &ident.device_number, wait).await? {
        Some(c) => Ok(Json(downlink::as_rpc(&c))),
        None => Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, "timeout", "no command within the timeout")),
    }
}
