//! Telemetry policies: a product's transform rules and raw-data retention, and a tenant's
//! retention (a product's own retention wins; 0 = the node's default).
use serde::{Deserialize, Serialize};

use super::{col_i64, col_str, now_ms, MetaError, MetaStore, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyScope {
    Tenant,
    Product,
}

impl PolicyScope {
    fn as_str(self) -> &'static str {
        match self {
            PolicyScope::Tenant => "tenant",
            PolicyScope::Product => "product",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub scope: PolicyScope,
    pub scope_id: i64,
    /// Transform rules (JSON list, checked by the telemetry service before it is saved).
    pub rules: serde_json::Value,
    /// Days raw points are kept; 0 = the node's default.
    pub raw_days: i64,
    pub updated_ms: i64,
}

impl MetaStore {
    pub async fn policy(&self, scope: PolicyScope, id: i64) -> Result<Option<Policy>> {
        let r = sqlx::query("SELECT rules, raw_days, updated_ms FROM telemetry_policies WHERE scope = $1 AND scope_id = $2")
            .bind(scope.as_str())
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        let Some(r) = r else { return Ok(None) };
        Ok(Some(Policy {
            scope,
            scope_id: id,
            rules: serde_json::from_str(&col_str(&r, "rules")?).map_err(|e| MetaError::Invalid(e.to_string()))?,
            raw_days: col_i64(&r, "raw_days")?,
            updated_ms: col_i64(&r, "updated_ms")?,
        }))
    }

    pub async fn set_policy(&self, scope: PolicyScope, id: i64, rules: &serde_json::Value, raw_days: i64) -> Result<Policy> {
        if !(0..=36_500).contains(&raw_days) {
            return Err(MetaError::Invalid("raw_days must be 0 (default) to 36500".into()));
        }
        let exists = match scope {
            PolicyScope::Product => sqlx::query("SELECT 1 FROM products WHERE id = $1"),
            PolicyScope::Tenant => sqlx::query("SELECT 1 FROM tenants WHERE id = $1"),
        }
        .bind(id)
        .fetch_optional(self.pool())
        .await?
        .is_some();
        if !exists {
            return Err(MetaError::NotFound(format!("{} {id}", scope.as_str())));
        }
        let now = now_ms();
        sqlx::query(
            "INSERT INTO telemetry_policies (scope, scope_id, rules, raw_days, updated_ms) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (scope, scope_id) DO UPDATE SET rules = excluded.rules, raw_days = excluded.raw_days, updated_ms = excluded.updated_ms",
        )
        .bind(scope.as_str())
        .bind(id)
        .bind(rules.to_string())
        .bind(raw_days)
        .bind(now)
        .execute(self.pool())
        .await?;
        Ok(Policy { scope, scope_id: id, rules: rules.clone(), raw_days, updated_ms: now })
    }

    /// Every policy with its own retention.
    pub async fn retention_policies(&self) -> Result<Vec<(PolicyScope, i64, i64)>> {
        let rows = sqlx::query("SELECT scope, scope_id, raw_days FROM telemetry_policies WHERE raw_days > 0 ORDER BY scope, scope_id")
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| {
                let scope = if col_str(r, "scope")? == "tenant" { PolicyScope::Tenant } else { PolicyScope::Product };
                Ok((scope, col_i64(r, "scope_id")?, col_i64(r, "raw_days")?))
            })
            .collect()
    }

    /// Ids of the devices a policy covers (a tenant's: only those whose product has no
    /// retention of its own).
    pub async fn policy_devices(&self, scope: PolicyScope, id: i64) -> Result<Vec<i64>> {
        let rows = match scope {
            PolicyScope::Product => sqlx::query("SELECT id FROM devices WHERE product_id = $1 ORDER BY id").bind(id),
            PolicyScope::Tenant => sqlx::query(
                "SELECT id FROM devices WHERE tenant_id = $1 AND (product_id IS NULL OR product_id NOT IN \
                 (SELECT scope_id FROM telemetry_policies WHERE scope = 'product' AND raw_days > 0)) ORDER BY id",
            )
            .bind(id),
        }
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(|r| col_i64(r, "id")).collect()
    }
}
