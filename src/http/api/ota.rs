//! Over-the-air update packages: upload, list, download and delete firmware and software
//! images, announce one to a device or to every device of a product, and read a device's
//! update progress.
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{created, ok, Answer, Body, Caller, ListParams, Made, P, Q};
use crate::http::device_api::devices;
use crate::http::{ApiError, AppState};
use crate::storage::meta::{Package, PackageKind, Page};

/// Routes; the upload takes bodies up to `devices.ota_max_package_bytes`.
pub fn routes(max_package: usize) -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_packages, upload_package))
        .layer(axum::extract::DefaultBodyLimit::max(max_package))
        .routes(routes!(get_package, delete_package))
        .routes(routes!(package_data))
        .routes(routes!(device_ota, assign_to_device))
        .routes(routes!(assign_to_product))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct UploadParams {
    /// `firmware` (announced through `fw_*` attributes) or `software` (`sw_*`).
    kind: PackageKind,
    /// The package's title (1–128 printable characters, no slashes).
    title: String,
    /// Its version; a title's version never changes its bytes.
    version: String,
    /// The tenant it belongs to (system scope only; default the caller's).
    tenant_id: Option<i64>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct AssignBody {
    /// The package to announce.
    package_id: i64,
}

#[utoipa::path(get, path = "/ota/packages", tag = "ota", params(ListParams), responses((status = 200, description = "a page of packages, newest first", body = Page<Package>)))]
async fn list_packages(State(s): State<AppState>, c: Caller, Q(p): Q<ListParams>) -> Answer {
    c.require("product:read")?;
    ok(devices(&s).meta.packages_page(c.0.tenant, p.limit.unwrap_or(100), p.offset.unwrap_or(0)).await?)
}

/// Upload a package: the body is the image itself (any content type). Its size and SHA-256
/// are computed here; `(tenant, kind, title, version)` is unique (409 when taken).
#[utoipa::path(post, path = "/ota/packages", tag = "ota", params(UploadParams), request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the image"), responses((status = 201, description = "the package", body = Package), (status = 409, description = "that title and version exist"), (status = 413, description = "larger than devices.ota_max_package_bytes")))]
async fn upload_package(State(s): State<AppState>, c: Caller, Q(u): Q<UploadParams>, data: Bytes) -> Made {
    c.require("product:write")?;
    let d = devices(&s);
    let t = c.new_tenant(u.tenant_id)?;
    c.tenant(&d.meta, t).await?;
    let p = d.meta.create_package(t, u.kind, &u.title, &u.version, &data).await?;
    c.audit(
        &d.meta,
        Some(t),
        "create",
        format!("package:{}", p.id),
        json!({"kind": p.kind, "title": p.title, "version": p.version, "size": p.size}),
    )
    .await;
    created(p)
}

#[utoipa::path(get, path = "/ota/packages/{id}", tag = "ota", params(("id" = i64, Path)), responses((status = 200, description = "the package", body = Package), (status = 404, description = "no such package")))]
async fn get_package(State(s): State<AppState>, c: Caller, P(id): P<i64>) -> Answer {
    let p = c.package(&devices(&s).meta, id).await?;
    c.require("product:read")?;
    ok(p)
}

/// Delete a package. Devices it was announced to keep their attributes; their chunk
/// requests are refused from now on.
#[utoipa::path(delete, path = "/ota/packages/{id}", tag = "ota", params(("id" = i64, Path)), responses((status = 200, description = "deleted")))]
async fn delete_package(State(s): State<AppState>, c: Caller, P(id): P<i64>) -> Answer {
    let d = devices(&s);
    let p = c.package(&d.meta, id).await?;
    c.require("product:write")?;
    d.meta.delete_package(id).await?;
    d.package_deleted(id);
    c.audit(&d.meta, Some(p.tenant_id), "delete", format!("package:{id}"), json!({"title": p.title, "version": p.version})).await;
    ok(json!({"deleted": id}))
}

/// The package's bytes.
#[utoipa::path(get, path = "/ota/packages/{id}/data", tag = "ota", params(("id" = i64, Path)), responses((status = 200, description = "the image", content_type = "application/octet-stream", body = Vec<u8>), (status = 404, description = "no such package")))]
async fn package_data(State(s): State<AppState>, c: Caller, P(id): P<i64>) -> Result<axum::response::Response, ApiError> {
    let d = devices(&s);
    let p = c.package(&d.meta, id).await?;
    c.require("product:read")?;
    let data = d.package_bytes(p.id).await?;
    let name = format!("attachment; filename=\"{}-{}.bin\"", p.title.replace('"', ""), p.version.replace('"', ""));
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, "application/octet-stream".to_string()), (header::CONTENT_DISPOSITION, name)], data)
        .into_response())
}

/// Where the device stands: per kind, the package announced to it, what it reports running
/// and its last `fw_state` / `sw_state`.
#[utoipa::path(get, path = "/devices/{number}/ota", tag = "ota", params(("number" = String, Path)), responses((status = 200, description = "firmware and software: assigned, current, state")))]
async fn device_ota(State(s): State<AppState>, c: Caller, P(number): P<String>) -> Answer {
    let d = devices(&s);
    let dev = c.device(&d, &number).await?;
    c.require("device:read")?;
    ok(d.ota_status(dev.id).await?)
}

/// Announce a package to the device: its `fw_*` (or `sw_*`) shared attributes are set and
/// sent to it; a ThingsBoard SDK then downloads it in chunks and reports `fw_state`.
#[utoipa::path(post, path = "/devices/{number}/ota", tag = "ota", params(("number" = String, Path)), request_body = AssignBody, responses((status = 200, description = "the attribute-set command")))]
async fn assign_to_device(State(s): State<AppState>, c: Caller, P(number): P<String>, Body(b): Body<AssignBody>) -> Answer {
    let d = devices(&s);
    let dev = c.device(&d, &number).await?;
    c.require("device:command")?;
    let p = package_of(&c, &d.meta, b.package_id, dev.tenant_id).await?;
    let cmd = d.assign_package(&dev.device_number, &p).await?;
    c.audit(&d.meta, Some(dev.tenant_id), "ota", format!("device:{number}"), json!({"package": p.id, "command": cmd.id})).await;
    ok(cmd)
}

/// Announce a package to every device of the product (one attribute set each, in this
/// request).
#[utoipa::path(post, path = "/products/{id}/ota", tag = "ota", params(("id" = i64, Path)), request_body = AssignBody, responses((status = 200, description = "how many devices it was announced to")))]
async fn assign_to_product(State(s): State<AppState>, c: Caller, P(id): P<i64>, Body(b): Body<AssignBody>) -> Answer {
    let d = devices(&s);
    let prod = c.product(&d.meta, id).await?;
    c.require("device:command")?;
    let p = package_of(&c, &d.meta, b.package_id, prod.tenant_id).await?;
    let mut n = 0usize;
    loop {
        let q = ListParams { limit: Some(1000), offset: Some(n as i64), sort: Some("id".into()), q: None };
        let page = d.meta.devices_page(&c.list(&q, vec![("product_id", Some(id))])).await?;
        for dev in &page.items {
            d.assign_package(&dev.device_number, &p).await?;
        }
        n += page.items.len();
        if page.items.len() < 1000 {
            break;
        }
    }
    c.audit(&d.meta, Some(prod.tenant_id), "ota", format!("product:{id}"), json!({"package": p.id, "devices": n})).await;
    ok(json!({"package_id": p.id, "devices": n}))
}

/// Package `id` as the caller sees it, and only of `tenant` (a package is announced only to
/// its own tenant's devices): else 404.
async fn package_of(c: &Caller, meta: &crate::storage::meta::MetaStore, id: i64, tenant: i64) -> Result<Package, ApiError> {
    let p = c.package(meta, id).await?;
    if p.tenant_id != tenant {
        return Err(crate::storage::meta::MetaError::NotFound(format!("package {id}")).into());
    }
    Ok(p)
}
