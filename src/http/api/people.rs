//! Tenants, users, roles and the audit log.
use crate::storage::meta::{AuditEntry, Page, Role, Tenant, User};
use axum::extract::State;
use serde::Deserialize;
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::scope::users;
use super::{bad, created, ok, Answer, Body, Caller, ListParams, Made, P, Q};
use crate::http::device_api::devices;
use crate::http::AppState;
use crate::storage::meta::{MetaError, NewUser};
use crate::users::{builtin, check_password, hash, CUSTOM, PERMISSIONS, SYSTEM_ADMIN};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_tenants, create_tenant))
        .routes(routes!(get_tenant, rename_tenant, delete_tenant))
        .routes(routes!(list_users, create_user))
        .routes(routes!(get_user, update_user, delete_user))
        .routes(routes!(list_roles, create_role))
        .routes(routes!(get_role, update_role, delete_role))
        .routes(routes!(permissions))
        .routes(routes!(audit_log))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct TenantBody {
    name: String,
}

/// Tenants the caller sees (its own; every one in the system scope).
#[utoipa::path(get, path = "/tenants", tag = "people", params(ListParams), responses((status = 200, description = "a page of tenants", body = Page<Tenant>)))]
async fn list_tenants(State(s): State<AppState>, c: Caller, Q(p): Q<ListParams>) -> Answer {
    ok(devices(&s).meta.tenants_page(&c.list(&p, vec![])).await?)
}

/// Create a tenant (system scope).
#[utoipa::path(post, path = "/tenants", tag = "people", request_body = TenantBody, responses((status = 201, description = "the tenant", body = Tenant)))]
async fn create_tenant(State(s): State<AppState>, c: Caller, Body(b): Body<TenantBody>) -> Made {
    c.require("tenant:manage")?;
    let d = devices(&s);
    let t = d.meta.create_tenant(&b.name).await?;
    c.audit(&d.meta, Some(t.id), "create", format!("tenant:{}", t.id), json!({"name": t.name})).await;
    created(t)
}

#[utoipa::path(get, path = "/tenants/{id}", tag = "people", params(("id" = i64, Path)), responses((status = 200, description = "the tenant", body = Tenant), (status = 404, description = "no such tenant")))]
async fn get_tenant(State(s): State<AppState>, c: Caller, P(id): P<i64>) -> Answer {
    ok(c.tenant(&devices(&s).meta, id).await?)
}

#[utoipa::path(put, path = "/tenants/{id}", tag = "people", params(("id" = i64, Path)), request_body = TenantBody, responses((status = 200, description = "the tenant", body = Tenant)))]
async fn rename_tenant(State(s): State<AppState>, c: Caller, P(id): P<i64>, Body(b): Body<TenantBody>) -> Answer {
    let d = devices(&s);
    c.tenant(&d.meta, id).await?;
    c.require("tenant:manage")?;
    let t = d.meta.rename_tenant(id, &b.name).await?;
    c.audit(&d.meta, Some(id), "update", format!("tenant:{id}"), json!({"name": t.name})).await;
    ok(t)
}

/// Delete a tenant and everything it owns.
#[utoipa::path(delete, path = "/tenants/{id}", tag = "people", params(("id" = i64, Path)), responses((status = 200, description = "deleted")))]
async fn delete_tenant(State(s): State<AppState>, c: Caller, P(id): P<i64>) -> Answer {
    let d = devices(&s);
    c.tenant(&d.meta, id).await?;
    c.require("tenant:manage")?;
    if id == 1 {
        return Err(bad("the default tenant cannot be deleted"));
    }
    d.meta.delete_tenant(id).await?;
    c.audit(&d.meta, None, "delete", format!("tenant:{id}"), json!({})).await;
    ok(json!({"deleted": id}))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct UserFilter {
    tenant_id: Option<i64>,
    role_id: Option<i64>,
}

#[utoipa::path(get, path = "/users", tag = "people", params(ListParams, UserFilter), responses((status = 200, description = "a page of users", body = Page<User>)))]
async fn list_users(State(s): State<AppState>, c: Caller, Q(p): Q<ListParams>, Q(f): Q<UserFilter>) -> Answer {
    c.require("user:read")?;
    let u = users(&s);
    ok(u.meta.list_users(&c.list(&p, vec![("tenant_id", f.tenant_id), ("role_id", f.role_id)])).await?)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NewUserBody {
    username: String,
    password: String,
    /// `system_admin` (system scope only), `tenant_admin`, `tenant_user` or `custom` with `role_id`.
    role: String,
    role_id: Option<i64>,
    /// The user's tenant (system scope; default: the caller's). Ignored for `system_admin`.
    tenant_id: Option<i64>,
}

/// The permissions `role` (with `role_id`) stands for, once the caller may give it to a user
/// of `tenant`: nobody grants a role (built-in or custom) whose permissions they do not all
/// hold, so no permission can be reached by handing oneself, or a puppet account, a role.
async fn grantable(
    c: &Caller,
    meta: &crate::storage::meta::MetaStore,
    role: &str,
    role_id: Option<i64>,
    tenant: Option<i64>,
) -> Result<(), crate::http::ApiError> {
    let perms: Vec<String> = match (role, role_id) {
        (SYSTEM_ADMIN, _) if !c.system() => return Err(MetaError::Invalid("only the system scope grants system_admin".into()).into()),
        (r, None) if r != CUSTOM => match builtin(r) {
            Some(list) => list.into_iter().map(String::from).collect(),
            None => return Err(bad("role is system_admin, tenant_admin, tenant_user, or custom with role_id")),
        },
        (CUSTOM, Some(id)) => {
            let role = c.role(meta, id).await?;
            if Some(role.tenant_id) != tenant {
                return Err(MetaError::NotFound(format!("role {id}")).into());
            }
            role.permissions
        }
        _ => return Err(bad("role is system_admin, tenant_admin, tenant_user, or custom with role_id")),
    };
    holds_all(c, &perms)
}

/// 403 unless the caller holds every one of `perms`.
fn holds_all(c: &Caller, perms: &[String]) -> Result<(), crate::http::ApiError> {
    perms.iter().try_for_each(|p| c.require(p))
}

/// A user may be changed (role, password, disabled, deleted) only by a caller holding every
/// permission that user holds: setting a tenant admin's password would otherwise hand its
/// account to anyone with `user:manage`.
async fn manageable(c: &Caller, u: &crate::users::Users, user: &crate::storage::meta::User) -> Result<(), crate::http::ApiError> {
    if c.0.user_id == Some(user.id) {
        return Ok(());
    }
    holds_all(c, &u.permissions_of(user).await?)
}

#[utoipa::path(post, path = "/users", tag = "people", request_body = NewUserBody, responses((status = 201, description = "the user", body = User)))]
async fn create_user(State(s): State<AppState>, c: Caller, Body(b): Body<NewUserBody>) -> Made {
    c.require("user:manage")?;
    check_password(&b.password)?;
    let u = users(&s);
    let tenant = if b.role == SYSTEM_ADMIN { None } else { Some(c.new_tenant(b.tenant_id)?) };
    if let Some(t) = tenant {
        c.tenant(&u.meta, t).await?;
    }
    grantable(&c, &u.meta, &b.role, b.role_id, tenant).await?;
    let h = hash(b.password).await;
    let user = u
        .meta
        .create_user(&NewUser { tenant_id: tenant, username: &b.username, password_hash: &h, role: &b.role, role_id: b.role_id })
        .await?;
    c.audit(&u.meta, tenant, "create", format!("user:{}", user.id), json!({"username": user.username, "role": user.role})).await;
    created(user)
}

#[utoipa::path(get, path = "/users/{id}", tag = "people", params(("id" = i64, Path)), responses((status = 200, description = "the user", body = User), (status = 404, description = "no such user")))]
async fn get_user(State(s): State<AppState>, c: Caller, P(id): P<i64>) -> Answer {
    let u = users(&s);
    let user = c.user(&u.meta, id).await?;
    if c.0.user_id != Some(id) {
        c.require("user:read")?;
    }
    ok(user)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct UserUpdate {
    role: Option<String>,
    role_id: Option<i64>,
    disabled: Option<bool>,
    /// Set a new password (the user's sessions end).
    password: Option<String>,
}

#[utoipa::path(patch, path = "/users/{id}", tag = "people", params(("id" = i64, Path)), request_body = UserUpdate, responses((status = 200, description = "the user", body = User)))]
async fn update_user(State(s): State<AppState>, c: Caller, P(id): P<i64>, Body(b): Body<UserUpdate>) -> Answer {
    let u = users(&s);
    let user = c.user(&u.meta, id).await?;
    c.require("user:manage")?;
    manageable(&c, &u, &user).await?;
    if let Some(r) = &b.role {
        grantable(&c, &u.meta, r, b.role_id, user.tenant_id).await?;
        if (r == SYSTEM_ADMIN) != user.tenant_id.is_none() {
            return Err(bad("system_admin is for system users (no tenant) only"));
        }
    }
    let h = match b.password {
        Some(p) => {
            check_password(&p)?;
            Some(hash(p).await)
        }
        None => None,
    };
    // Disabling or a new password ends the user's sessions everywhere.
    let revoke = h.is_some() || b.disabled == Some(true);
    let role = b.role.as_deref().map(|r| (r, if r == CUSTOM { b.role_id } else { None }));
    let updated = u.meta.update_user(id, role, b.disabled, h.as_deref(), revoke).await?;
    u.forget(&[id]).await;
    c.audit(
        &u.meta,
        user.tenant_id,
        "update",
        format!("user:{id}"),
        json!({"role": updated.role, "disabled": updated.disabled, "password": revoke}),
    )
    .await;
    ok(updated)
}

#[utoipa::path(delete, path = "/users/{id}", tag = "people", params(("id" = i64, Path)), responses((status = 200, description = "deleted")))]
async fn delete_user(State(s): State<AppState>, c: Caller, P(id): P<i64>) -> Answer {
    let u = users(&s);
    let user = c.user(&u.meta, id).await?;
    c.require("user:manage")?;
    manageable(&c, &u, &user).await?;
    if c.0.user_id == Some(id) {
        return Err(bad("you cannot delete yourself"));
    }
    u.meta.delete_user(id).await?;
    u.forget(&[id]).await;
    c.audit(&u.meta, user.tenant_id, "delete", format!("user:{id}"), json!({"username": user.username})).await;
    ok(json!({"deleted": id}))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RoleBody {
    name: String,
    /// Permissions from `GET /permissions`.
    permissions: Vec<String>,
    /// The role's tenant (system scope; default: the caller's).
    tenant_id: Option<i64>,
}

fn check_permissions(c: &Caller, perms: &[String]) -> Result<(), crate::http::ApiError> {
    for p in perms {
        if !PERMISSIONS.contains(&p.as_str()) {
            return Err(bad(format!("unknown permission {p:?}; see GET /api/v1/permissions")));
        }
        // Nobody hands out more than they hold.
        c.require(p)?;
    }
    if perms.iter().any(|p| p == "tenant:manage") {
        return Err(bad("tenant:manage belongs to system administrators"));
    }
    Ok(())
}

#[utoipa::path(get, path = "/roles", tag = "people", params(ListParams), responses((status = 200, description = "a page of custom roles", body = Page<Role>)))]
async fn list_roles(State(s): State<AppState>, c: Caller, Q(p): Q<ListParams>) -> Answer {
    c.require("user:read")?;
    ok(users(&s).meta.list_roles(&c.list(&p, vec![])).await?)
}

#[utoipa::path(post, path = "/roles", tag = "people", request_body = RoleBody, responses((status = 201, description = "the role", body = Role)))]
async fn create_role(State(s): State<AppState>, c: Caller, Body(b): Body<RoleBody>) -> Made {
    c.require("role:manage")?;
    check_permissions(&c, &b.permissions)?;
    let u = users(&s);
    let t = c.new_tenant(b.tenant_id)?;
    c.tenant(&u.meta, t).await?;
    let r = u.meta.create_role(t, &b.name, &b.permissions).await?;
    c.audit(&u.meta, Some(t), "create", format!("role:{}", r.id), json!({"name": r.name, "permissions": r.permissions})).await;
    created(r)
}

#[utoipa::path(get, path = "/roles/{id}", tag = "people", params(("id" = i64, Path)), responses((status = 200, description = "the role", body = Role), (status = 404, description = "no such role")))]
async fn get_role(State(s): State<AppState>, c: Caller, P(id): P<i64>) -> Answer {
    let r = c.role(&users(&s).meta, id).await?;
    c.require("user:read")?;
    ok(r)
}

#[utoipa::path(put, path = "/roles/{id}", tag = "people", params(("id" = i64, Path)), request_body = RoleBody, responses((status = 200, description = "the role", body = Role)))]
async fn update_role(State(s): State<AppState>, c: Caller, P(id): P<i64>, Body(b): Body<RoleBody>) -> Answer {
    let u = users(&s);
    let old = c.role(&u.meta, id).await?;
    c.require("role:manage")?;
    check_permissions(&c, &b.permissions)?;
    let r = u.meta.update_role(id, &b.name, &b.permissions).await?;
    // Holders get the new permissions on their next request.
    u.forget(&u.holders(id).await?).await;
    c.audit(&u.meta, Some(old.tenant_id), "update", format!("role:{id}"), json!({"name": r.name, "permissions": r.permissions})).await;
    ok(r)
}

#[utoipa::path(delete, path = "/roles/{id}", tag = "people", params(("id" = i64, Path)), responses((status = 200, description = "deleted"), (status = 409, description = "still held")))]
async fn delete_role(State(s): State<AppState>, c: Caller, P(id): P<i64>) -> Answer {
    let u = users(&s);
    let r = c.role(&u.meta, id).await?;
    c.require("role:manage")?;
    u.meta.delete_role(id).await?;
    c.audit(&u.meta, Some(r.tenant_id), "delete", format!("role:{id}"), json!({"name": r.name})).await;
    ok(json!({"deleted": id}))
}

/// Every permission, and the built-in roles' sets.
#[utoipa::path(get, path = "/permissions", tag = "people", responses((status = 200, description = "permissions and built-in roles")))]
async fn permissions(_c: Caller) -> Answer {
    let roles: serde_json::Map<String, serde_json::Value> =
        ["system_admin", "tenant_admin", "tenant_user"].iter().map(|r| (r.to_string(), json!(builtin(r)))).collect();
    ok(json!({"permissions": PERMISSIONS, "roles": roles}))
}

/// Who changed what, when (newest first by default).
#[utoipa::path(get, path = "/audit", tag = "people", params(ListParams), responses((status = 200, description = "a page of audit entries", body = Page<AuditEntry>)))]
async fn audit_log(State(s): State<AppState>, c: Caller, Q(mut p): Q<ListParams>) -> Answer {
    c.require("audit:read")?;
    if p.sort.is_none() {
        p.sort = Some("-id".into());
    }
    ok(devices(&s).meta.list_audit(&c.list(&p, vec![])).await?)
}
