//! People: users (with their password hash and role), custom roles, the audit log and the
//! node-wide settings (the API's signing secret).
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;

use super::{col_i64, col_json, col_opt_i64, col_str, now_ms, ListQuery, Listing, MetaError, MetaStore, Page, Result};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct User {
    pub id: i64,
    /// None: a system user (sees every tenant).
    pub tenant_id: Option<i64>,
    pub username: String,
    /// `system_admin`, `tenant_admin`, `tenant_user`, or `custom` (with `role_id`).
    pub role: String,
    pub role_id: Option<i64>,
    pub disabled: bool,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// Sessions started before this instant are revoked (logout everywhere, password change).
    #[serde(skip)]
    pub revoked_before_ms: i64,
    #[serde(skip)]
    pub password_hash: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Role {
    pub id: i64,
    pub tenant_id: i64,
    pub name: String,
    pub permissions: Vec<String>,
    pub created_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct AuditEntry {
    pub id: i64,
    pub tenant_id: Option<i64>,
    /// Who: `user:<name>` or `api-key`.
    pub actor: String,
    /// What: `create`, `update`, `delete`, `login`, …
    pub action: String,
    /// On what: `device:th-1`, `user:7`, …
    pub target: String,
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
    pub at_ms: i64,
}

/// A user to create (the hash is made by the caller).
pub struct NewUser<'a> {
    pub tenant_id: Option<i64>,
    pub username: &'a str,
    pub password_hash: &'a str,
    pub role: &'a str,
    pub role_id: Option<i64>,
}

fn user(r: &AnyRow) -> Result<User> {
    Ok(User {
        id: col_i64(r, "id")?,
        tenant_id: col_opt_i64(r, "tenant_id")?,
        username: col_str(r, "username")?,
        role: col_str(r, "role")?,
        role_id: col_opt_i64(r, "role_id")?,
        disabled: col_i64(r, "disabled")? != 0,
        created_ms: col_i64(r, "created_ms")?,
        updated_ms: col_i64(r, "updated_ms")?,
        revoked_before_ms: col_i64(r, "revoked_before_ms")?,
        password_hash: col_str(r, "password_hash")?,
    })
}

fn role(r: &AnyRow) -> Result<Role> {
    Ok(Role {
        id: col_i64(r, "id")?,
        tenant_id: col_i64(r, "tenant_id")?,
        name: col_str(r, "name")?,
        permissions: col_json(r, "permissions")?,
        created_ms: col_i64(r, "created_ms")?,
    })
}

fn audit(r: &AnyRow) -> Result<AuditEntry> {
    Ok(AuditEntry {
        id: col_i64(r, "id")?,
        tenant_id: col_opt_i64(r, "tenant_id")?,
        actor: col_str(r, "actor")?,
        action: col_str(r, "action")?,
        target: col_str(r, "target")?,
        detail: col_json(r, "detail")?,
        at_ms: col_i64(r, "at_ms")?,
    })
}

pub(crate) const USERS: Listing = Listing {
    table: "users",
    tenant_column: Some("tenant_id"),
    columns: &["id", "username", "role", "role_id", "disabled", "created_ms", "tenant_id"],
    search: &["username"],
};
pub(crate) const ROLES: Listing =
    Listing { table: "roles", tenant_column: Some("tenant_id"), columns: &["id", "name", "created_ms", "tenant_id"], search: &["name"] };
pub(crate) const AUDIT: Listing = Listing {
    table: "audit_log",
    tenant_column: Some("tenant_id"),
    columns: &["id", "at_ms", "tenant_id"],
    search: &["actor", "action", "target"],
};

pub fn valid_username(s: &str) -> bool {
    (3..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@+".contains(&b))
}

impl MetaStore {
    pub async fn create_user(&self, u: &NewUser<'_>) -> Result<User> {
        if !valid_username(u.username) {
            return Err(MetaError::Invalid("username must be 3..64 of A-Z a-z 0-9 - _ . @ +".into()));
        }
        let now = now_ms();
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO users (tenant_id, username, password_hash, role, role_id, disabled, revoked_before_ms, created_ms, updated_ms) \
             VALUES ($1, $2, $3, $4, $5, 0, 0, $6, $6) RETURNING id",
        )
        .bind(u.tenant_id)
        .bind(u.username)
        .bind(u.password_hash)
        .bind(u.role)
        .bind(u.role_id)
        .bind(now)
        .fetch_one(self.pool())
        .await
        .map_err(|e| MetaError::unique(e, format!("user {} exists", u.username)))?;
        self.user(id).await
    }

    pub async fn user(&self, id: i64) -> Result<User> {
        let r = sqlx::query("SELECT * FROM users WHERE id = $1").bind(id).fetch_optional(self.pool()).await?;
        user(&r.ok_or_else(|| MetaError::NotFound(format!("user {id}")))?)
    }

    pub async fn user_by_name(&self, username: &str) -> Result<Option<User>> {
        let r = sqlx::query("SELECT * FROM users WHERE username = $1").bind(username).fetch_optional(self.pool()).await?;
        r.as_ref().map(user).transpose()
    }

    pub async fn user_count(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM users").fetch_one(self.pool()).await?)
    }

    pub async fn list_users(&self, q: &ListQuery) -> Result<Page<User>> {
        self.page(&USERS, q, user).await
    }

    /// Change role, disabled flag or password hash (None: unchanged); `revoke` ends the
    /// user's sessions.
    pub async fn update_user(
        &self,
        id: i64,
        role: Option<(&str, Option<i64>)>,
        disabled: Option<bool>,
        password_hash: Option<&str>,
        revoke: bool,
    ) -> Result<User> {
        let u = self.user(id).await?;
        let now = now_ms();
        let (role, role_id) = role.map(|(r, i)| (r.to_string(), i)).unwrap_or((u.role.clone(), u.role_id));
        sqlx::query(
            "UPDATE users SET role = $1, role_id = $2, disabled = $3, password_hash = $4, revoked_before_ms = $5, updated_ms = $6 WHERE id = $7",
        )
        .bind(role)
        .bind(role_id)
        .bind(disabled.unwrap_or(u.disabled) as i64)
        .bind(password_hash.unwrap_or(&u.password_hash))
        .bind(if revoke { now } else { u.revoked_before_ms })
        .bind(now)
        .bind(id)
        .execute(self.pool())
        .await
        .map_err(|e| MetaError::unique(e, "user update"))?;
        self.user(id).await
    }

    pub async fn delete_user(&self, id: i64) -> Result<()> {
        self.delete_row("users", id, "user").await
    }

    pub async fn create_role(&self, tenant_id: i64, name: &str, permissions: &[String]) -> Result<Role> {
        if name.trim().is_empty() || name.len() > 64 {
            return Err(MetaError::Invalid("role name must have 1..64 characters".into()));
        }
        let perms = serde_json::to_string(permissions).map_err(|e| MetaError::Invalid(e.to_string()))?;
        let id: i64 =
            sqlx::query_scalar("INSERT INTO roles (tenant_id, name, permissions, created_ms) VALUES ($1, $2, $3, $4) RETURNING id")
                .bind(tenant_id)
                .bind(name)
                .bind(perms)
                .bind(now_ms())
                .fetch_one(self.pool())
                .await
                .map_err(|e| MetaError::unique(e, format!("role {name} exists")))?;
        self.role(id).await
    }

    pub async fn role(&self, id: i64) -> Result<Role> {
        let r = sqlx::query("SELECT * FROM roles WHERE id = $1").bind(id).fetch_optional(self.pool()).await?;
        role(&r.ok_or_else(|| MetaError::NotFound(format!("role {id}")))?)
    }

    pub async fn list_roles(&self, q: &ListQuery) -> Result<Page<Role>> {
        self.page(&ROLES, q, role).await
    }

    pub async fn update_role(&self, id: i64, name: &str, permissions: &[String]) -> Result<Role> {
        let perms = serde_json::to_string(permissions).map_err(|e| MetaError::Invalid(e.to_string()))?;
        let n = sqlx::query("UPDATE roles SET name = $1, permissions = $2 WHERE id = $3")
            .bind(name)
            .bind(perms)
            .bind(id)
            .execute(self.pool())
            .await
            .map_err(|e| MetaError::unique(e, format!("role {name} exists")))?
            .rows_affected();
        if n == 0 {
            return Err(MetaError::NotFound(format!("role {id}")));
        }
        self.role(id).await
    }

    pub async fn delete_role(&self, id: i64) -> Result<()> {
        let used: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE role_id = $1").bind(id).fetch_one(self.pool()).await?;
        if used > 0 {
            return Err(MetaError::Conflict(format!("role {id} is held by {used} user(s)")));
        }
        self.delete_row("roles", id, "role").await
    }

    pub async fn audit(&self, tenant_id: Option<i64>, actor: &str, action: &str, target: &str, detail: &serde_json::Value) -> Result<()> {
        sqlx::query("INSERT INTO audit_log (tenant_id, actor, action, target, detail, at_ms) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(tenant_id)
            .bind(actor)
            .bind(action)
            .bind(target)
            .bind(detail.to_string())
            .bind(now_ms())
            .execute(self.pool())
            .await?;
        Ok(())
    }

    pub async fn list_audit(&self, q: &ListQuery) -> Result<Page<AuditEntry>> {
        self.page(&AUDIT, q, audit).await
    }

    pub async fn setting(&self, key: &str) -> Result<Option<String>> {
        Ok(sqlx::query_scalar("SELECT value FROM settings WHERE key = $1").bind(key).fetch_optional(self.pool()).await?)
    }

    /// Store `value` under `key` unless one is there; returns the stored value (nodes starting
    /// together agree on the first writer's).
    pub async fn setting_or_insert(&self, key: &str, value: &str) -> Result<String> {
        let _ = sqlx::query("INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
            .bind(key)
            .bind(value)
            .execute(self.pool())
            .await?;
        self.setting(key).await?.ok_or_else(|| MetaError::NotFound(format!("setting {key}")))
    }
}
