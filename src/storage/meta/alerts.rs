//! Alert rules, alerts (active, acknowledged, cleared: one row per occurrence, kept as history)
//! and notification channels. At most one open alert per rule and device: a partial unique
//! index makes that hold even when two nodes briefly both run a rule.
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;

use super::{col_i64, col_json, col_opt_i64, col_opt_str, col_str, now_ms, ListQuery, Listing, MetaError, MetaStore, Page, Result};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Channel {
    pub id: i64,
    pub tenant_id: i64,
    pub name: String,
    /// `webhook` (`url`, optional `secret`, `headers`), `email` (`smtp_host`, `smtp_port`,
    /// `from`, `to`, optional `username`, `password`, `tls`, `ca_pem`, `accept_invalid_certs`).
    pub kind: String,
    #[schema(value_type = Object)]
    pub config: serde_json::Value,
    pub created_ms: i64,
}

/// A stored rule; `spec` is the rule itself (see `alerts::RuleSpec`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct StoredRule {
    pub id: i64,
    pub tenant_id: i64,
    pub name: String,
    pub enabled: bool,
    #[schema(value_type = Object)]
    pub spec: serde_json::Value,
    pub created_ms: i64,
    pub updated_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Alert {
    pub id: i64,
    pub tenant_id: i64,
    pub rule_id: i64,
    pub rule_name: String,
    pub device_id: i64,
    pub device_number: String,
    pub severity: String,
    /// `active`, `acknowledged` or `cleared`.
    pub status: String,
    pub message: String,
    /// When the condition started to hold, and when the alert was raised (after the duration).
    pub since_ms: i64,
    pub raised_ms: i64,
    pub acked_ms: Option<i64>,
    pub acked_by: Option<String>,
    pub cleared_ms: Option<i64>,
}

fn channel(r: &AnyRow) -> Result<Channel> {
    Ok(Channel {
        id: col_i64(r, "id")?,
        tenant_id: col_i64(r, "tenant_id")?,
        name: col_str(r, "name")?,
        kind: col_str(r, "kind")?,
        config: col_json(r, "config")?,
        created_ms: col_i64(r, "created_ms")?,
    })
}

fn rule(r: &AnyRow) -> Result<StoredRule> {
    Ok(StoredRule {
        id: col_i64(r, "id")?,
        tenant_id: col_i64(r, "tenant_id")?,
        name: col_str(r, "name")?,
        enabled: col_i64(r, "enabled")? != 0,
        spec: col_json(r, "spec")?,
        created_ms: col_i64(r, "created_ms")?,
        updated_ms: col_i64(r, "updated_ms")?,
    })
}

fn alert(r: &AnyRow) -> Result<Alert> {
    Ok(Alert {
        id: col_i64(r, "id")?,
        tenant_id: col_i64(r, "tenant_id")?,
        rule_id: col_i64(r, "rule_id")?,
        rule_name: col_str(r, "rule_name")?,
        device_id: col_i64(r, "device_id")?,
        device_number: col_str(r, "device_number")?,
        severity: col_str(r, "severity")?,
        status: col_str(r, "status")?,
        message: col_str(r, "message")?,
        since_ms: col_i64(r, "since_ms")?,
        raised_ms: col_i64(r, "raised_ms")?,
        acked_ms: col_opt_i64(r, "acked_ms")?,
        acked_by: col_opt_str(r, "acked_by")?,
        cleared_ms: col_opt_i64(r, "cleared_ms")?,
    })
}

pub(crate) const CHANNELS: Listing = Listing {
    table: "channels",
    tenant_column: Some("tenant_id"),
    columns: &["id", "name", "created_ms", "tenant_id"],
    search: &["name", "kind"],
};
pub(crate) const RULES: Listing = Listing {
    table: "alert_rules",
    tenant_column: Some("tenant_id"),
    columns: &["id", "name", "enabled", "created_ms", "updated_ms", "tenant_id"],
    search: &["name"],
};
pub(crate) const ALERTS: Listing = Listing {
    table: "alerts",
    tenant_column: Some("tenant_id"),
    columns: &["id", "rule_id", "device_id", "raised_ms", "cleared_ms", "acked_ms", "since_ms", "open", "tenant_id"],
    search: &["device_number", "rule_name", "severity", "status"],
};

/// What raising an alert found.
pub enum Raised {
    New(Alert),
    /// An open alert of this rule and device was there already (another node raised it).
    Existing(Alert),
}

impl MetaStore {
    pub async fn create_channel(&self, tenant_id: i64, name: &str, kind: &str, config: &serde_json::Value) -> Result<Channel> {
        let id: i64 =
            sqlx::query_scalar("INSERT INTO channels (tenant_id, name, kind, config, created_ms) VALUES ($1, $2, $3, $4, $5) RETURNING id")
                .bind(tenant_id)
                .bind(name)
                .bind(kind)
                .bind(config.to_string())
                .bind(now_ms())
                .fetch_one(self.pool())
                .await
                .map_err(|e| MetaError::unique(e, format!("channel {name} exists")))?;
        self.channel(id).await
    }

    pub async fn channel(&self, id: i64) -> Result<Channel> {
        let r = sqlx::query("SELECT * FROM channels WHERE id = $1").bind(id).fetch_optional(self.pool()).await?;
        channel(&r.ok_or_else(|| MetaError::NotFound(format!("channel {id}")))?)
    }

    pub async fn channels_page(&self, q: &ListQuery) -> Result<Page<Channel>> {
        self.page(&CHANNELS, q, channel).await
    }

    pub async fn update_channel(&self, id: i64, name: &str, kind: &str, config: &serde_json::Value) -> Result<Channel> {
        let n = sqlx::query("UPDATE channels SET name = $1, kind = $2, config = $3 WHERE id = $4")
            .bind(name)
            .bind(kind)
            .bind(config.to_string())
            .bind(id)
            .execute(self.pool())
            .await
            .map_err(|e| MetaError::unique(e, format!("channel {name} exists")))?
            .rows_affected();
        if n == 0 {
            return Err(MetaError::NotFound(format!("channel {id}")));
        }
        self.channel(id).await
    }

    pub async fn delete_channel(&self, id: i64) -> Result<()> {
        self.delete_row("channels", id, "channel").await
    }

    pub async fn create_rule(&self, tenant_id: i64, name: &str, enabled: bool, spec: &serde_json::Value) -> Result<StoredRule> {
        let now = now_ms();
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO alert_rules (tenant_id, name, enabled, spec, created_ms, updated_ms) VALUES ($1, $2, $3, $4, $5, $5) RETURNING id",
        )
        .bind(tenant_id)
        .bind(name)
        .bind(enabled as i64)
        .bind(spec.to_string())
        .bind(now)
        .fetch_one(self.pool())
        .await
        .map_err(|e| MetaError::unique(e, format!("rule {name} exists")))?;
        self.rule(id).await
    }

    pub async fn rule(&self, id: i64) -> Result<StoredRule> {
        let r = sqlx::query("SELECT * FROM alert_rules WHERE id = $1").bind(id).fetch_optional(self.pool()).await?;
        rule(&r.ok_or_else(|| MetaError::NotFound(format!("alert rule {id}")))?)
    }

    pub async fn rules_page(&self, q: &ListQuery) -> Result<Page<StoredRule>> {
        self.page(&RULES, q, rule).await
    }

    /// Every enabled rule (what the nodes share out).
    pub async fn enabled_rules(&self) -> Result<Vec<StoredRule>> {
        let rows = sqlx::query("SELECT * FROM alert_rules WHERE enabled = 1 ORDER BY id").fetch_all(self.pool()).await?;
        rows.iter().map(rule).collect()
    }

    /// A fingerprint of the enabled rules — (count, sum of ids, sum of update times) — that
    /// changes whenever one is created, changed, enabled, disabled or deleted (updates stamp the
    /// current time), read without reading the rules.
    pub async fn enabled_rules_fingerprint(&self) -> Result<(i64, i64, i64)> {
        let r = sqlx::query(
            "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(id), 0) AS BIGINT) AS ids, CAST(COALESCE(SUM(updated_ms), 0) AS BIGINT) AS upd \
             FROM alert_rules WHERE enabled = 1",
        )
        .fetch_one(self.pool())
        .await?;
        Ok((super::col_i64(&r, "n")?, super::col_i64(&r, "ids")?, super::col_i64(&r, "upd")?))
    }

    pub async fn update_rule(&self, id: i64, name: &str, enabled: bool, spec: &serde_json::Value) -> Result<StoredRule> {
        let n = sqlx::query("UPDATE alert_rules SET name = $1, enabled = $2, spec = $3, updated_ms = $4 WHERE id = $5")
            .bind(name)
            .bind(enabled as i64)
            .bind(spec.to_string())
            .bind(now_ms())
            .bind(id)
            .execute(self.pool())
            .await
            .map_err(|e| MetaError::unique(e, format!("rule {name} exists")))?
            .rows_affected();
        if n == 0 {
            return Err(MetaError::NotFound(format!("alert rule {id}")));
        }
        self.rule(id).await
    }

    pub async fn delete_rule(&self, id: i64) -> Result<()> {
        self.delete_row("alert_rules", id, "alert rule").await
    }

    /// Open an alert unless one of this rule and device is open.
    pub async fn raise_alert(&self, a: &Alert) -> Result<Raised> {
        let r = sqlx::query_scalar::<_, i64>(
            "INSERT INTO alerts (tenant_id, rule_id, rule_name, device_id, device_number, severity, status, message, since_ms, raised_ms, open) \
             VALUES ($1, $2, $3, $4, $5, $6, 'active', $7, $8, $9, 1) RETURNING id",
        )
        .bind(a.tenant_id)
        .bind(a.rule_id)
        .bind(&a.rule_name)
        .bind(a.device_id)
        .bind(&a.device_number)
        .bind(&a.severity)
        .bind(&a.message)
        .bind(a.since_ms)
        .bind(a.raised_ms)
        .fetch_one(self.pool())
        .await;
        match r {
            Ok(id) => Ok(Raised::New(self.alert(id).await?)),
            Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
                let open = self.open_alerts(a.rule_id).await?;
                open.into_iter()
                    .find(|x| x.device_id == a.device_id)
                    .map(Raised::Existing)
                    .ok_or_else(|| MetaError::Conflict("alert raced with its clearing".into()))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn alert(&self, id: i64) -> Result<Alert> {
        let r = sqlx::query("SELECT * FROM alerts WHERE id = $1").bind(id).fetch_optional(self.pool()).await?;
        alert(&r.ok_or_else(|| MetaError::NotFound(format!("alert {id}")))?)
    }

    /// Open (active or acknowledged) alerts of a rule.
    pub async fn open_alerts(&self, rule_id: i64) -> Result<Vec<Alert>> {
        let rows = sqlx::query("SELECT * FROM alerts WHERE rule_id = $1 AND open = 1").bind(rule_id).fetch_all(self.pool()).await?;
        rows.iter().map(alert).collect()
    }

    /// Alerts, filtered by `status` (`open` = active or acknowledged) besides the list query.
    pub async fn alerts_page(&self, q: &ListQuery) -> Result<Page<Alert>> {
        self.page(&ALERTS, q, alert).await
    }

    /// Acknowledge an open alert (None when it was not open).
    pub async fn ack_alert(&self, id: i64, by: &str) -> Result<Option<Alert>> {
        let n = sqlx::query("UPDATE alerts SET status = 'acknowledged', acked_ms = $1, acked_by = $2 WHERE id = $3 AND status = 'active'")
            .bind(now_ms())
            .bind(by)
            .bind(id)
            .execute(self.pool())
            .await?
            .rows_affected();
        Ok(if n == 0 { None } else { Some(self.alert(id).await?) })
    }

    /// Clear an open alert (None when it was not open).
    pub async fn clear_alert(&self, id: i64) -> Result<Option<Alert>> {
        let n = sqlx::query("UPDATE alerts SET status = 'cleared', cleared_ms = $1, open = NULL WHERE id = $2 AND open = 1")
            .bind(now_ms())
            .bind(id)
            .execute(self.pool())
            .await?
            .rows_affected();
        Ok(if n == 0 { None } else { Some(self.alert(id).await?) })
    }
}
