//! Who is calling and what they may see: the one place where tenant isolation is enforced.
//! Handlers never fetch tenant data from the meta store directly; they ask the [`Caller`],
//! which answers 404 for another tenant's objects (their existence is not revealed) and 403
//! for a missing permission.
use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::StatusCode;

use super::ListParams;
use crate::devices::Devices;
use crate::http::device_api::devices;
use crate::http::{ApiError, AppState};
use crate::storage::meta::{
    Alert, Channel, Command, Device, Group, ListQuery, MetaError, MetaStore, Package, Product, Role, StoredRule, Tenant, User,
};
use crate::users::{Principal, Users};

/// The authenticated caller of a request.
pub struct Caller(pub Principal);

pub(crate) fn users(s: &AppState) -> Arc<Users> {
    s.services.users.clone()
}

/// The bearer token of a request (`Authorization: Bearer …` or `X-API-Key`).
pub(crate) fn bearer(h: &axum::http::HeaderMap) -> Option<&str> {
    h.get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .or_else(|| h.get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, ApiError> {
        let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
        // Browsers cannot set headers on a websocket: `?access_token=` there.
        let from_query = parts.uri.query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("access_token="))).map(str::to_string);
        let Some(token) = bearer(&parts.headers).map(str::to_string).or(from_query) else {
            return Err(unauthorized("log in first: Authorization: Bearer <access token or API key>"));
        };
        Caller::of_token(s, &token).await?.ok_or_else(|| unauthorized("the token is invalid or expired, or its session has ended"))
    }
}

impl Caller {
    /// The caller a token stands for: a user's JWT (three dot-separated parts) or an API key.
    pub async fn of_token(s: &AppState, token: &str) -> Result<Option<Caller>, ApiError> {
        if token.len() > 4096 {
            return Ok(None);
        }
        if token.split('.').count() == 3 {
            return Ok(users(s).authenticate(token).await?.map(Caller));
        }
        Ok(devices(s).admin_key_valid(token).await?.then(|| Caller(Principal::api_key())))
    }

    /// 403 unless the caller holds `perm`.
    pub fn require(&self, perm: &str) -> Result<(), ApiError> {
        if self.0.can(perm) {
            Ok(())
        } else {
            Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", format!("this needs the {perm} permission")))
        }
    }

    /// Is tenant `t` within the caller's reach?
    pub fn sees(&self, t: i64) -> bool {
        self.0.tenant.is_none_or(|own| own == t)
    }

    /// The system scope (every tenant)?
    pub fn system(&self) -> bool {
        self.0.tenant.is_none()
    }

    fn hide<T>(&self, tenant: Option<i64>, what: String, v: T) -> Result<T, ApiError> {
        match (self.0.tenant, tenant) {
            (None, _) => Ok(v),
            (Some(own), Some(t)) if own == t => Ok(v),
            _ => Err(MetaError::NotFound(what).into()),
        }
    }

    /// The tenant a new object goes to: the caller's own, or (system scope) the one asked
    /// for, default 1.
    pub fn new_tenant(&self, asked: Option<i64>) -> Result<i64, ApiError> {
        match (self.0.tenant, asked) {
            (Some(own), None) => Ok(own),
            (Some(own), Some(t)) if t == own => Ok(own),
            (Some(_), Some(t)) => Err(MetaError::NotFound(format!("tenant {t}")).into()),
            (None, t) => Ok(t.unwrap_or(1)),
        }
    }

    /// A list query limited to what the caller sees, with `eq` filters.
    pub fn list(&self, p: &ListParams, eq: Vec<(&str, Option<i64>)>) -> ListQuery {
        let sort = p.sort.as_deref().filter(|s| !s.is_empty()).map(|s| match s.strip_prefix('-') {
            Some(c) => (c.to_string(), true),
            None => (s.to_string(), false),
        });
        ListQuery {
            tenant: self.0.tenant,
            eq: eq.into_iter().filter_map(|(c, v)| v.map(|v| (c.to_string(), v))).collect(),
            search: p.q.clone(),
            sort,
            limit: p.limit.unwrap_or(100),
            offset: p.offset.unwrap_or(0),
        }
    }

    pub async fn tenant(&self, meta: &MetaStore, id: i64) -> Result<Tenant, ApiError> {
        if !self.sees(id) {
            return Err(MetaError::NotFound(format!("tenant {id}")).into());
        }
        Ok(meta.tenant(id).await?)
    }

    pub async fn device(&self, d: &Devices, number: &str) -> Result<Device, ApiError> {
        let dev = d.meta.device(number).await?;
        self.hide(Some(dev.tenant_id), format!("device {number}"), dev)
    }

    pub async fn device_by_id(&self, d: &Devices, id: i64) -> Result<Device, ApiError> {
        let dev = d.meta.device_by_id(id).await?;
        self.hide(Some(dev.tenant_id), format!("device {id}"), dev)
    }

    pub async fn product(&self, meta: &MetaStore, id: i64) -> Result<Product, ApiError> {
        let p = meta.product(id).await?;
        self.hide(Some(p.tenant_id), format!("product {id}"), p)
    }

    pub async fn package(&self, meta: &MetaStore, id: i64) -> Result<Package, ApiError> {
        let p = meta.package(id).await?;
        self.hide(Some(p.tenant_id), format!("package {id}"), p)
    }

    pub async fn group(&self, meta: &MetaStore, id: i64) -> Result<Group, ApiError> {
        let g = meta.group(id).await?;
        self.hide(Some(g.tenant_id), format!("group {id}"), g)
    }

    pub async fn command(&self, d: &Devices, id: i64) -> Result<Command, ApiError> {
        let c = d.meta.command(id).await?;
        self.device_by_id(d, c.device_id).await.map_err(|_| MetaError::NotFound(format!("command {id}")))?;
        Ok(c)
    }

    /// A user: system users (no tenant) only for the system scope.
    pub async fn user(&self, meta: &MetaStore, id: i64) -> Result<User, ApiError> {
        let u = meta.user(id).await?;
        self.hide(u.tenant_id, format!("user {id}"), u)
    }

    pub async fn role(&self, meta: &MetaStore, id: i64) -> Result<Role, ApiError> {
        let r = meta.role(id).await?;
        self.hide(Some(r.tenant_id), format!("role {id}"), r)
    }

    pub async fn rule(&self, meta: &MetaStore, id: i64) -> Result<StoredRule, ApiError> {
        let r = meta.rule(id).await?;
        self.hide(Some(r.tenant_id), format!("alert rule {id}"), r)
    }

    pub async fn channel(&self, meta: &MetaStore, id: i64) -> Result<Channel, ApiError> {
        let c = meta.channel(id).await?;
        self.hide(Some(c.tenant_id), format!("channel {id}"), c)
    }

    pub async fn alert(&self, meta: &MetaStore, id: i64) -> Result<Alert, ApiError> {
        let a = meta.alert(id).await?;
        self.hide(Some(a.tenant_id), format!("alert {id}"), a)
    }

    /// Objects a new or changed object of tenant `t` refers to must be the same tenant's.
    pub async fn check_refs(
        &self,
        d: &Devices,
        t: i64,
        product: Option<i64>,
        group: Option<i64>,
        gateway: Option<i64>,
    ) -> Result<(), ApiError> {
        let other = |what: String| -> ApiError { MetaError::NotFound(what).into() };
        if let Some(p) = product {
            if self.product(&d.meta, p).await?.tenant_id != t {
                return Err(other(format!("product {p}")));
            }
        }
        if let Some(g) = group {
            if self.group(&d.meta, g).await?.tenant_id != t {
                return Err(other(format!("group {g}")));
            }
        }
        if let Some(g) = gateway {
            if self.device_by_id(d, g).await?.tenant_id != t {
                return Err(other(format!("device {g}")));
            }
        }
        Ok(())
    }

    /// Record a change in the audit log (best effort: a failure is logged, not returned).
    pub async fn audit(&self, meta: &MetaStore, tenant: Option<i64>, action: &str, target: String, detail: serde_json::Value) {
        if let Err(e) = meta.audit(tenant, &self.0.actor(), action, &target, &detail).await {
            tracing::warn!(error = %e, action, %target, "cannot write the audit log");
        }
    }
}
