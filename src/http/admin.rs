//! The admin REST API under `/api/v1/admin/…`: products, groups, devices, credentials,
//! downlink commands and attribute sets/gets, device status. Authenticated with an admin API
//! key (`Authorization: Bearer <key>` or `X-API-Key: <key>`); the first key is generated at
//! the first start and printed once. Users and roles come with the users issue.
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::device_api::devices;
use super::{ApiError, AppState};
use crate::devices::downlink::DownlinkRequest;
use crate::devices::{hash_password, random_token};
use crate::storage::meta::{CommandKind, CredentialKind, DeviceUpdate, MetaError, NewDevice, NewProduct};

type Body<T> = Result<Json<T>, JsonRejection>;
type Answer = Result<Json<Value>, ApiError>;

pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/api/v1/admin/tenants", get(list_tenants).post(create_tenant))
        .route("/api/v1/admin/products", get(list_products).post(create_product))
        .route("/api/v1/admin/products/{id}", get(get_product).put(update_product).delete(delete_product))
        .route("/api/v1/admin/groups", get(list_groups).post(create_group))
        .route("/api/v1/admin/groups/{id}", delete(delete_group))
        .route("/api/v1/admin/devices", get(list_devices).post(create_device))
        .route("/api/v1/admin/devices/{number}", get(get_device).patch(update_device).delete(delete_device))
        .route("/api/v1/admin/devices/{number}/credentials", get(list_credentials).post(add_credential))
        .route("/api/v1/admin/devices/{number}/credentials/{id}", delete(delete_credential))
        .route("/api/v1/admin/devices/{number}/commands", get(list_commands).post(send_command))
        .route("/api/v1/admin/devices/{number}/attributes", get(get_attributes).put(set_attributes))
        .route("/api/v1/admin/devices/{number}/attributes/get", post(request_attributes))
        .route("/api/v1/admin/devices/{number}/telemetry/control", post(telemetry_control))
        .route("/api/v1/admin/devices/{number}/status", get(status))
        .route("/api/v1/admin/commands/{id}", get(get_command))
        .merge(super::telemetry_api::routes())
        .route_layer(middleware::from_fn_with_state(state, require_key))
}

/// Every admin route needs a valid admin API key.
pub(super) async fn require_key(State(s): State<AppState>, req: Request, next: Next) -> Result<Response, ApiError> {
    let h = req.headers();
    let key = h
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| h.get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(str::trim)
        .unwrap_or("");
    if key.is_empty() {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "an admin API key is required (Authorization: Bearer <key>)"));
    }
    if !devices(&s)?.admin_key_valid(key).await? {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "invalid API key"));
    }
    Ok(next.run(req).await)
}

fn ok<T: serde::Serialize>(v: T) -> Answer {
    serde_json::to_value(v).map(Json).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}

#[derive(Deserialize)]
struct NameBody {
    name: String,
}

async fn list_tenants(State(s): State<AppState>) -> Answer {
    ok(devices(&s)?.meta.list_tenants().await?)
}

async fn create_tenant(State(s): State<AppState>, body: Body<NameBody>) -> Answer {
    let Json(b) = body?;
    ok(devices(&s)?.meta.create_tenant(&b.name).await?)
}

async fn list_products(State(s): State<AppState>) -> Answer {
    ok(devices(&s)?.meta.list_products().await?)
}

async fn create_product(State(s): State<AppState>, body: Body<NewProduct>) -> Answer {
    let Json(p) = body?;
    ok(devices(&s)?.meta.create_product(&p).await?)
}

async fn get_product(State(s): State<AppState>, Path(id): Path<i64>) -> Answer {
    ok(devices(&s)?.meta.product(id).await?)
}

async fn update_product(State(s): State<AppState>, Path(id): Path<i64>, body: Body<NewProduct>) -> Answer {
    let Json(p) = body?;
    let d = devices(&s)?;
    let p = d.meta.update_product(id, &p).await?;
    // Strictness and models are part of cached identities.
    d.product_changed(id).await;
    ok(p)
}

async fn delete_product(State(s): State<AppState>, Path(id): Path<i64>) -> Answer {
    let d = devices(&s)?;
    d.meta.delete_product(id).await?;
    d.product_changed(id).await;
    ok(json!({"deleted": id}))
}

#[derive(Deserialize)]
struct GroupBody {
    name: String,
    #[serde(default = "one")]
    tenant_id: i64,
    #[serde(default)]
    parent_id: Option<i64>,
}

fn one() -> i64 {
    1
}

async fn list_groups(State(s): State<AppState>) -> Answer {
    ok(devices(&s)?.meta.list_groups().await?)
}

async fn create_group(State(s): State<AppState>, body: Body<GroupBody>) -> Answer {
    let Json(g) = body?;
    ok(devices(&s)?.meta.create_group(g.tenant_id, &g.name, g.parent_id).await?)
}

async fn delete_group(State(s): State<AppState>, Path(id): Path<i64>) -> Answer {
    devices(&s)?.meta.delete_group(id).await?;
    ok(json!({"deleted": id}))
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    after: i64,
    #[serde(default = "hundred")]
    limit: i64,
    group_id: Option<i64>,
    product_id: Option<i64>,
}

fn hundred() -> i64 {
    100
}

async fn list_devices(State(s): State<AppState>, Query(q): Query<ListQuery>) -> Answer {
    let list = devices(&s)?.meta.list_devices(q.after, q.limit, q.group_id, q.product_id).await?;
    let next = list.last().map(|d| d.id);
    ok(json!({"devices": list, "next_after": next}))
}

/// A new device gets an access token at once (shown in this answer).
async fn create_device(State(s): State<AppState>, body: Body<NewDevice>) -> Answer {
    let Json(n) = body?;
    let d = devices(&s)?;
    let dev = d.meta.create_device(&n).await?;
    let token = random_token();
    d.meta.add_credential(dev.id, CredentialKind::Token, &token, None).await?;
    if dev.gateway_id.is_some() {
        d.changed(&dev, false).await;
    }
    ok(json!({"device": dev, "access_token": token}))
}

async fn get_device(State(s): State<AppState>, Path(number): Path<String>) -> Answer {
    let d = devices(&s)?;
    let dev = d.meta.device(&number).await?;
    let status = d.status(&number).await;
    ok(json!({"device": dev, "status": status}))
}

async fn update_device(State(s): State<AppState>, Path(number): Path<String>, body: Body<DeviceUpdate>) -> Answer {
    let Json(u) = body?;
    let d = devices(&s)?;
    let dev = d.meta.update_device(&number, &u).await?;
    // A disabled device is disconnected everywhere at once.
    d.changed(&dev, !dev.enabled).await;
    ok(dev)
}

async fn delete_device(State(s): State<AppState>, Path(number): Path<String>) -> Answer {
    let dev = devices(&s)?.remove_device(&number).await?;
    ok(json!({"deleted": dev.device_number}))
}

async fn list_credentials(State(s): State<AppState>, Path(number): Path<String>) -> Answer {
    let d = devices(&s)?;
    let dev = d.meta.device(&number).await?;
    ok(d.meta.credentials(dev.id).await?)
}

#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum CredentialBody {
    Token {
        #[serde(default)]
        token: Option<String>,
    },
    Password {
        username: String,
        password: String,
    },
    X509 {
        #[serde(default)]
        fingerprint: Option<String>,
        #[serde(default)]
        certificate_pem: Option<String>,
    },
}

async fn add_credential(State(s): State<AppState>, Path(number): Path<String>, body: Body<CredentialBody>) -> Answer {
    let Json(b) = body?;
    let d = devices(&s)?;
    let dev = d.meta.device(&number).await?;
    let answer = match b {
        CredentialBody::Token { token } => {
            let token = token.unwrap_or_else(random_token);
            let c = d.meta.add_credential(dev.id, CredentialKind::Token, &token, None).await?;
            json!({"credential": c, "access_token": token})
        }
        CredentialBody::Password { username, password } => {
            if password.len() < 8 {
                return Err(MetaError::Invalid("passwords need at least 8 characters".into()).into());
            }
            let pw = password.into_bytes();
            let hash = tokio::task::spawn_blocking(move || hash_password(&pw))
                .await
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
            json!({"credential": d.meta.add_credential(dev.id, CredentialKind::Password, &username, Some(&hash)).await?})
        }
        CredentialBody::X509 { fingerprint, certificate_pem } => {
            let fp = match (fingerprint, certificate_pem) {
                (Some(f), None) => f.to_ascii_lowercase().replace(':', ""),
                (None, Some(pem)) => {
                    let der = rustls_pemfile::certs(&mut pem.as_bytes())
                        .next()
                        .and_then(Result::ok)
                        .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "invalid", "certificate_pem holds no PEM certificate"))?;
                    crate::devices::sha256_hex(der.as_ref())
                }
                _ => return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid", "give either fingerprint or certificate_pem")),
            };
            if fp.len() != 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid", "fingerprint must be a SHA-256 hex digest"));
            }
            json!({"credential": d.meta.add_credential(dev.id, CredentialKind::X509, &fp, None).await?})
        }
    };
    ok(answer)
}

async fn delete_credential(State(s): State<AppState>, Path((number, id)): Path<(String, i64)>) -> Answer {
    let d = devices(&s)?;
    let dev = d.meta.device(&number).await?;
    let c = d.meta.delete_credential(dev.id, id).await?;
    // Connections that logged in with it are closed: the credential no longer holds.
    d.forget_credential(&dev, c.kind, &c.identity, true).await;
    ok(json!({"deleted": id}))
}

#[derive(Deserialize)]
struct LimitQuery {
    #[serde(default = "hundred")]
    limit: i64,
}

async fn list_commands(State(s): State<AppState>, Path(number): Path<String>, Query(q): Query<LimitQuery>) -> Answer {
    let d = devices(&s)?;
    let dev = d.meta.device(&number).await?;
    ok(d.meta.device_commands(dev.id, q.limit).await?)
}

async fn send_command(State(s): State<AppState>, Path(number): Path<String>, body: Body<DownlinkRequest>) -> Answer {
    let Json(r) = body?;
    ok(devices(&s)?.send_downlink(&number, CommandKind::Command, r).await?)
}

async fn get_attributes(State(s): State<AppState>, Path(number): Path<String>) -> Answer {
    let d = devices(&s)?;
    let dev = d.meta.device(&number).await?;
    ok(d.attributes_doc(dev.id, &[]).await?)
}

/// Set shared attributes on the device (stored, and sent to it as an attribute set).
async fn set_attributes(State(s): State<AppState>, Path(number): Path<String>, body: Body<DownlinkRequest>) -> Answer {
    let Json(r) = body?;
    ok(devices(&s)?.send_downlink(&number, CommandKind::AttributeSet, r).await?)
}

async fn request_attributes(State(s): State<AppState>, Path(number): Path<String>, body: Body<DownlinkRequest>) -> Answer {
    let Json(r) = body?;
    ok(devices(&s)?.send_downlink(&number, CommandKind::AttributeGet, r).await?)
}

async fn telemetry_control(State(s): State<AppState>, Path(number): Path<String>, body: Body<DownlinkRequest>) -> Answer {
    let Json(r) = body?;
    ok(devices(&s)?.send_downlink(&number, CommandKind::TelemetryControl, r).await?)
}

async fn status(State(s): State<AppState>, Path(number): Path<String>) -> Answer {
    let d = devices(&s)?;
    d.meta.device(&number).await?;
    ok(d.status(&number).await)
}

async fn get_command(State(s): State<AppState>, Path(id): Path<i64>) -> Answer {
    ok(devices(&s)?.meta.command(id).await?)
}
