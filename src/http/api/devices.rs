//! Products (thing models), device groups, devices, credentials, attributes, downlink
//! commands and device status.
use crate::storage::meta::{Command, Credential, Device, Group, Page, Product};
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{bad, created, created_from, ok, Answer, Body, Caller, ListParams, Made, P, Q};
use crate::devices::downlink::DownlinkRequest;
use crate::devices::{hash_password, random_token};
use crate::http::device_api::devices;
use crate::http::{ApiError, AppState};
use crate::storage::meta::{CommandKind, CredentialKind, DeviceUpdate, MetaError, NewDevice, NewProduct};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_products, create_product))
        .routes(routes!(get_product, update_product, delete_product))
        .routes(routes!(list_groups, create_group))
        .routes(routes!(get_group, delete_group))
        .routes(routes!(list_devices, create_device))
        .routes(routes!(get_device, update_device, delete_device))
        .routes(routes!(list_credentials, add_credential))
        .routes(routes!(delete_credential))
        .routes(routes!(list_commands, send_command))
        .routes(routes!(get_attributes, set_attributes))
        .routes(routes!(request_attributes))
        .routes(routes!(telemetry_control))
        .routes(routes!(status))
        .routes(routes!(get_command))
        .routes(routes!(answer_rpc))
        .routes(routes!(claim_device))
        .routes(routes!(summary))
}

#[utoipa::path(get, path = "/products", tag = "devices", params(ListParams), responses((status = 200, description = "a page of products", body = Page<Product>)))]
async fn list_products(State(s): State<AppState>, c: Caller, Q(p): Q<ListParams>) -> Answer {
    c.require("product:read")?;
    ok(devices(&s).meta.products_page(&c.list(&p, vec![])).await?)
}

#[utoipa::path(post, path = "/products", tag = "devices", request_body = NewProduct, responses((status = 201, description = "the product", body = Product)))]
async fn create_product(State(s): State<AppState>, c: Caller, Body(mut p): Body<NewProduct>) -> Made {
    c.require("product:write")?;
    let d = devices(&s);
    let t = c.new_tenant(p.tenant_id)?;
    c.tenant(&d.meta, t).await?;
    p.tenant_id = Some(t);
    let prod = d.meta.create_product(&p).await?;
    c.audit(&d.meta, Some(prod.tenant_id), "create", format!("product:{}", prod.id), json!({"name": prod.name})).await;
    created(prod)
}

#[utoipa::path(get, path = "/products/{id}", tag = "devices", params(("id" = i64, Path)), responses((status = 200, description = "the product", body = Product), (status = 404, description = "no such product")))]
async fn get_product(State(s): State<AppState>, c: Caller, P(id): P<i64>) -> Answer {
    let p = c.product(&devices(&s).meta, id).await?;
    c.require("product:read")?;
    ok(p)
}

#[utoipa::path(put, path = "/products/{id}", tag = "devices", params(("id" = i64, Path)), request_body = NewProduct, responses((status = 200, description = "the product", body = Product)))]
async fn update_product(State(s): State<AppState>, c: Caller, P(id): P<i64>, Body(p): Body<NewProduct>) -> Answer {
    let d = devices(&s);
    let old = c.product(&d.meta, id).await?;
    c.require("product:write")?;
    let p = d.meta.update_product(id, &p).await?;
    // Strictness and models are part of cached identities.
    d.product_changed(id).await;
    c.audit(&d.meta, Some(old.tenant_id), "update", format!("product:{id}"), json!({"name": p.name})).await;
    ok(p)
}

#[utoipa::path(delete, path = "/products/{id}", tag = "devices", params(("id" = i64, Path)), responses((status = 200, description = "deleted")))]
async fn delete_product(State(s): State<AppState>, c: Caller, P(id): P<i64>) -> Answer {
    let d = devices(&s);
    let old = c.product(&d.meta, id).await?;
    c.require("product:write")?;
    d.meta.delete_product(id).await?;
    d.product_changed(id).await;
    c.audit(&d.meta, Some(old.tenant_id), "delete", format!("product:{id}"), json!({"name": old.name})).await;
    ok(json!({"deleted": id}))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct GroupBody {
    name: String,
    tenant_id: Option<i64>,
    parent_id: Option<i64>,
}

#[utoipa::path(get, path = "/groups", tag = "devices", params(ListParams), responses((status = 200, description = "a page of groups", body = Page<Group>)))]
async fn list_groups(State(s): State<AppState>, c: Caller, Q(p): Q<ListParams>) -> Answer {
    c.require("device:read")?;
    ok(devices(&s).meta.groups_page(&c.list(&p, vec![])).await?)
}

#[utoipa::path(post, path = "/groups", tag = "devices", request_body = GroupBody, responses((status = 201, description = "the group", body = Group)))]
async fn create_group(State(s): State<AppState>, c: Caller, Body(g): Body<GroupBody>) -> Made {
    c.require("device:write")?;
    let d = devices(&s);
    let t = c.new_tenant(g.tenant_id)?;
    c.tenant(&d.meta, t).await?;
    if let Some(parent) = g.parent_id {
        if c.group(&d.meta, parent).await?.tenant_id != t {
            return Err(MetaError::NotFound(format!("group {parent}")).into());
        }
    }
    let group = d.meta.create_group(t, &g.name, g.parent_id).await?;
    c.audit(&d.meta, Some(t), "create", format!("group:{}", group.id), json!({"name": group.name})).await;
    created(group)
}

#[utoipa::path(get, path = "/groups/{id}", tag = "devices", params(("id" = i64, Path)), responses((status = 200, description = "the group", body = Group), (status = 404, description = "no such group")))]
async fn get_group(State(s): State<AppState>, c: Caller, P(id): P<i64>) -> Answer {
    let g = c.group(&devices(&s).meta, id).await?;
    c.require("device:read")?;
    ok(g)
}

#[utoipa::path(delete, path = "/groups/{id}", tag = "devices", params(("id" = i64, Path)), responses((status = 200, description = "deleted")))]
async fn delete_group(State(s): State<AppState>, c: Caller, P(id): P<i64>) -> Answer {
    let d = devices(&s);
    let g = c.group(&d.meta, id).await?;
    c.require("device:write")?;
    d.meta.delete_group(id).await?;
    c.audit(&d.meta, Some(g.tenant_id), "delete", format!("group:{id}"), json!({"name": g.name})).await;
    ok(json!({"deleted": id}))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct DeviceFilter {
    product_id: Option<i64>,
    group_id: Option<i64>,
    gateway_id: Option<i64>,
    tenant_id: Option<i64>,
}

/// Devices, with their product, group or gateway as filters (`sort`: device_number, name,
/// created_ms, …; `q` searches number and name).
#[utoipa::path(get, path = "/devices", tag = "devices", params(ListParams, DeviceFilter), responses((status = 200, description = "a page of devices")))]
async fn list_devices(State(s): State<AppState>, c: Caller, Q(p): Q<ListParams>, Q(f): Q<DeviceFilter>) -> Answer {
    c.require("device:read")?;
    let eq = vec![("product_id", f.product_id), ("group_id", f.group_id), ("gateway_id", f.gateway_id), ("tenant_id", f.tenant_id)];
    let d = devices(&s);
    let page = d.meta.devices_page(&c.list(&p, eq)).await?;
    // Each row says whether the device is online (from the replicated status; no I/O).
    let items: Vec<serde_json::Value> = page
        .items
        .iter()
        .map(|dev| {
            let mut v = json!(dev);
            v["online"] = json!(d.presence(&dev.device_number).online);
            v
        })
        .collect();
    ok(json!({"items": items, "total": page.total, "limit": page.limit, "offset": page.offset}))
}

/// What the dashboard shows: devices (and how many are online), products, open alerts.
#[utoipa::path(get, path = "/summary", tag = "devices", responses((status = 200, description = "counts for the caller's tenant")))]
async fn summary(State(s): State<AppState>, c: Caller) -> Answer {
    c.require("device:read")?;
    let d = devices(&s);
    let numbers = d.meta.device_numbers(c.0.tenant).await?;
    let online = numbers.iter().filter(|n| d.presence(n).online).count();
    let one = ListParams { limit: Some(1), ..Default::default() };
    let products = d.meta.products_page(&c.list(&one, vec![])).await?.total;
    let open = if c.0.can("alert:read") { Some(d.meta.alerts_page(&c.list(&one, vec![("open", Some(1))])).await?.total) } else { None };
    ok(
        json!({"devices": {"total": numbers.len(), "online": online, "offline": numbers.len() - online}, "products": products, "open_alerts": open}),
    )
}

/// Create a device; its first access token is in this answer (and only here).
#[utoipa::path(post, path = "/devices", tag = "devices", request_body = NewDevice, responses((status = 201, description = "the device and its access token")))]
async fn create_device(State(s): State<AppState>, c: Caller, Body(n): Body<NewDevice>) -> Made {
    let (dev, token) = super::import::make_device(&s, &c, n).await?;
    let d = devices(&s);
    c.audit(&d.meta, Some(dev.tenant_id), "create", format!("device:{}", dev.device_number), json!({"name": dev.name})).await;
    created(json!({"device": dev, "access_token": token}))
}

#[utoipa::path(get, path = "/devices/{number}", tag = "devices", params(("number" = String, Path)), responses((status = 200, description = "the device and its status"), (status = 404, description = "no such device")))]
async fn get_device(State(s): State<AppState>, c: Caller, P(number): P<String>) -> Answer {
    let d = devices(&s);
    let dev = c.device(&d, &number).await?;
    c.require("device:read")?;
    let status = d.status(&number).await;
    ok(json!({"device": dev, "status": status}))
}

#[utoipa::path(patch, path = "/devices/{number}", tag = "devices", params(("number" = String, Path)), request_body = DeviceUpdate, responses((status = 200, description = "the device", body = Device)))]
async fn update_device(State(s): State<AppState>, c: Caller, P(number): P<String>, Body(u): Body<DeviceUpdate>) -> Answer {
    let d = devices(&s);
    let old = c.device(&d, &number).await?;
    c.require("device:write")?;
    c.check_refs(&d, old.tenant_id, u.product_id.flatten(), u.group_id.flatten(), None).await?;
    let dev = d.meta.update_device(&number, &u).await?;
    // A disabled device is disconnected everywhere at once.
    d.changed(&dev, !dev.enabled).await;
    c.audit(&d.meta, Some(dev.tenant_id), "update", format!("device:{number}"), json!(u)).await;
    ok(dev)
}

#[utoipa::path(delete, path = "/devices/{number}", tag = "devices", params(("number" = String, Path)), responses((status = 200, description = "deleted")))]
async fn delete_device(State(s): State<AppState>, c: Caller, P(number): P<String>) -> Answer {
    let d = devices(&s);
    let old = c.device(&d, &number).await?;
    c.require("device:write")?;
    let dev = d.remove_device(&number).await?;
    c.audit(&d.meta, Some(old.tenant_id), "delete", format!("device:{number}"), json!({})).await;
    ok(json!({"deleted": dev.device_number}))
}

#[utoipa::path(get, path = "/devices/{number}/credentials", tag = "devices", params(("number" = String, Path)), responses((status = 200, description = "the device's credentials (no secrets)", body = Vec<Credential>)))]
async fn list_credentials(State(s): State<AppState>, c: Caller, P(number): P<String>) -> Answer {
    let d = devices(&s);
    let dev = c.device(&d, &number).await?;
    c.require("device:read")?;
    ok(d.meta.credentials(dev.id).await?)
}

/// A credential to add: an access token (generated when absent), a username and password,
/// or an X.509 certificate (its SHA-256 fingerprint, or the PEM).
#[derive(Deserialize, ToSchema)]
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

#[utoipa::path(post, path = "/devices/{number}/credentials", tag = "devices", params(("number" = String, Path)), request_body = CredentialBody, responses((status = 201, description = "the credential")))]
async fn add_credential(State(s): State<AppState>, c: Caller, P(number): P<String>, Body(b): Body<CredentialBody>) -> Made {
    let d = devices(&s);
    let dev = c.device(&d, &number).await?;
    c.require("device:write")?;
    let answer = match b {
        CredentialBody::Token { token } => {
            let token = token.unwrap_or_else(random_token);
            if token.len() < 16 {
                return Err(bad("access tokens need at least 16 characters"));
            }
            let cred = d.meta.add_credential(dev.id, CredentialKind::Token, &token, None).await?;
            json!({"credential": cred, "access_token": token})
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
                        .ok_or_else(|| bad("certificate_pem holds no PEM certificate"))?;
                    crate::devices::sha256_hex(der.as_ref())
                }
                _ => return Err(bad("give either fingerprint or certificate_pem")),
            };
            if fp.len() != 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad("fingerprint must be a SHA-256 hex digest"));
            }
            json!({"credential": d.meta.add_credential(dev.id, CredentialKind::X509, &fp, None).await?})
        }
    };
    c.audit(&d.meta, Some(dev.tenant_id), "create", format!("device:{number}/credential"), json!({"id": answer["credential"]["id"]})).await;
    created(answer)
}

#[utoipa::path(delete, path = "/devices/{number}/credentials/{id}", tag = "devices", params(("number" = String, Path), ("id" = i64, Path)), responses((status = 200, description = "deleted")))]
async fn delete_credential(State(s): State<AppState>, c: Caller, P((number, id)): P<(String, i64)>) -> Answer {
    let d = devices(&s);
    let dev = c.device(&d, &number).await?;
    c.require("device:write")?;
    let cred = d.meta.delete_credential(dev.id, id).await?;
    // Connections that logged in with it are closed: the credential no longer holds.
    d.forget_credential(&dev, cred.kind, &cred.identity, true).await;
    c.audit(&d.meta, Some(dev.tenant_id), "delete", format!("device:{number}/credential:{id}"), json!({})).await;
    ok(json!({"deleted": id}))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct LimitQuery {
    /// Newest first, at most this many (default 100, at most 1000).
    limit: Option<i64>,
    /// Skip this many (default 0).
    offset: Option<i64>,
}

#[utoipa::path(get, path = "/devices/{number}/commands", tag = "devices", params(("number" = String, Path), LimitQuery), responses((status = 200, description = "the device's commands, newest first: `{items, total, limit, offset}`", body = crate::storage::meta::Page<Command>)))]
async fn list_commands(State(s): State<AppState>, c: Caller, P(number): P<String>, Q(q): Q<LimitQuery>) -> Answer {
    let d = devices(&s);
    let dev = c.device(&d, &number).await?;
    c.require("device:read")?;
    ok(d.meta.device_commands(dev.id, q.limit.unwrap_or(100), q.offset.unwrap_or(0)).await?)
}

/// Send a command; follow its status at `/commands/{id}`.
#[utoipa::path(post, path = "/devices/{number}/commands", tag = "devices", params(("number" = String, Path)), request_body = DownlinkRequest, responses((status = 201, description = "the command", body = Command)))]
async fn send_command(State(s): State<AppState>, c: Caller, P(number): P<String>, Body(r): Body<DownlinkRequest>) -> Made {
    downlink(&s, &c, &number, CommandKind::Command, r).await.map(created_from)
}

async fn downlink(s: &AppState, c: &Caller, number: &str, kind: CommandKind, r: DownlinkRequest) -> Answer {
    let d = devices(s);
    let dev = c.device(&d, number).await?;
    c.require("device:command")?;
    let cmd = d.send_downlink(number, kind, r).await?;
    c.audit(&d.meta, Some(dev.tenant_id), kind.as_str(), format!("device:{number}"), json!({"command": cmd.id})).await;
    ok(cmd)
}

#[utoipa::path(get, path = "/devices/{number}/attributes", tag = "devices", params(("number" = String, Path)), responses((status = 200, description = "client, shared and server attributes")))]
async fn get_attributes(State(s): State<AppState>, c: Caller, P(number): P<String>) -> Answer {
    let d = devices(&s);
    let dev = c.device(&d, &number).await?;
    c.require("device:read")?;
    ok(d.attributes_doc(dev.id, &[]).await?)
}

/// Set shared attributes on the device (stored, and sent to it as an attribute set).
#[utoipa::path(put, path = "/devices/{number}/attributes", tag = "devices", params(("number" = String, Path)), request_body = DownlinkRequest, responses((status = 200, description = "the attribute-set command")))]
async fn set_attributes(State(s): State<AppState>, c: Caller, P(number): P<String>, Body(r): Body<DownlinkRequest>) -> Answer {
    downlink(&s, &c, &number, CommandKind::AttributeSet, r).await
}

/// Ask the device to report attributes (`params: {"keys": [..]}`).
#[utoipa::path(post, path = "/devices/{number}/attributes/get", tag = "devices", params(("number" = String, Path)), request_body = DownlinkRequest, responses((status = 200, description = "the attribute-get command")))]
async fn request_attributes(State(s): State<AppState>, c: Caller, P(number): P<String>, Body(r): Body<DownlinkRequest>) -> Answer {
    downlink(&s, &c, &number, CommandKind::AttributeGet, r).await
}

/// Telemetry control values sent to the device.
#[utoipa::path(post, path = "/devices/{number}/telemetry/control", tag = "devices", params(("number" = String, Path)), request_body = DownlinkRequest, responses((status = 200, description = "the control command")))]
async fn telemetry_control(State(s): State<AppState>, c: Caller, P(number): P<String>, Body(r): Body<DownlinkRequest>) -> Answer {
    downlink(&s, &c, &number, CommandKind::TelemetryControl, r).await
}

#[utoipa::path(get, path = "/devices/{number}/status", operation_id = "device_status", tag = "devices", params(("number" = String, Path)), responses((status = 200, description = "online state and last activity")))]
async fn status(State(s): State<AppState>, c: Caller, P(number): P<String>) -> Answer {
    let d = devices(&s);
    c.device(&d, &number).await?;
    c.require("device:read")?;
    ok(d.status(&number).await)
}

/// Answer a device's client-side RPC (ThingsBoard `v1/devices/me/rpc/request/{id}`): the body
/// is published to the device on `v1/devices/me/rpc/response/{id}`. A request waits
/// `devices.command_ttl_secs`; it is answered once.
#[utoipa::path(post, path = "/devices/{number}/rpc/{id}/response", tag = "devices", params(("number" = String, Path), ("id" = String, Path, description = "the request id from the device's topic")), request_body = serde_json::Value, responses((status = 200, description = "sent to the device"), (status = 404, description = "no such request waiting (unknown, answered, or expired)")))]
async fn answer_rpc(
    State(s): State<AppState>,
    c: Caller,
    P((number, id)): P<(String, String)>,
    Body(r): Body<serde_json::Value>,
) -> Answer {
    let d = devices(&s);
    let dev = c.device(&d, &number).await?;
    c.require("device:command")?;
    if !d.answer_rpc(&dev.device_number, &id, &r).await? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no RPC request {id} of device {number} is waiting (unknown, answered, or expired)"),
        ));
    }
    c.audit(&d.meta, Some(dev.tenant_id), "rpc_response", format!("device:{number}"), json!({"request": id})).await;
    ok(json!({"sent": true}))
}

#[utoipa::path(get, path = "/commands/{id}", tag = "devices", params(("id" = i64, Path)), responses((status = 200, description = "the command and its status", body = Command), (status = 404, description = "no such command")))]
async fn get_command(State(s): State<AppState>, c: Caller, P(id): P<i64>) -> Answer {
    let d = devices(&s);
    let cmd = c.command(&d, id).await?;
    c.require("device:read")?;
    ok(cmd)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ClaimBody {
    /// The secret the device offered itself with (`secretKey`; empty when it gave none).
    #[serde(default)]
    secret_key: String,
    /// The tenant to claim it for (system scope only; default the caller's).
    tenant_id: Option<i64>,
}

/// Claim a device that offered itself (ThingsBoard `v1/devices/me/claim`) with its secret: it
/// moves to the caller's tenant (without its product and group) and reconnects there. 404 for
/// an unknown device, no offer, an expired one or the wrong secret alike; five wrong secrets
/// end an offer.
#[utoipa::path(post, path = "/devices/{number}/claim", tag = "devices", params(("number" = String, Path)), request_body = ClaimBody, responses((status = 200, description = "the device, now the caller's", body = Device), (status = 404, description = "nothing to claim with that secret")))]
async fn claim_device(State(s): State<AppState>, c: Caller, P(number): P<String>, Body(b): Body<ClaimBody>) -> Answer {
    c.require("device:write")?;
    let d = devices(&s);
    let t = c.new_tenant(b.tenant_id)?;
    c.tenant(&d.meta, t).await?;
    let Some(dev) = d.claim(&number, &b.secret_key, t).await? else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no device {number} to claim with that secret")));
    };
    c.audit(&d.meta, Some(t), "claim", format!("device:{number}"), json!({})).await;
    ok(dev)
}
