//! Downlink to devices: commands, attribute sets/gets and telemetry control, tracked from
//! `pending` to `sent` to `acknowledged` / `failed` / `expired`.
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;

use super::{col_i64, col_json, col_opt_i64, col_opt_str, col_str, now_ms, MetaError, MetaStore, Result};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    Command,
    AttributeSet,
    AttributeGet,
    TelemetryControl,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CommandStatus {
    Pending,
    Sent,
    Acknowledged,
    Failed,
    Expired,
}

macro_rules! str_enum {
    ($t:ty { $($v:ident => $s:literal),* }) => {
        impl $t {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$v => $s),* }
            }
            pub fn parse(s: &str) -> Result<Self> {
                match s { $($s => Ok(Self::$v),)* _ => Err(MetaError::Invalid(format!("unknown value {s}"))) }
            }
        }
    };
}
str_enum!(CommandKind { Command => "command", AttributeSet => "attribute_set", AttributeGet => "attribute_get", TelemetryControl => "telemetry_control" });
str_enum!(CommandStatus { Pending => "pending", Sent => "sent", Acknowledged => "acknowledged", Failed => "failed", Expired => "expired" });

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Command {
    pub id: i64,
    pub device_id: i64,
    /// Carried in the downlink topic / message; the device's response names it.
    pub message_id: String,
    pub kind: CommandKind,
    pub method: Option<String>,
    pub payload: serde_json::Value,
    pub status: CommandStatus,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub sent_ms: Option<i64>,
    pub done_ms: Option<i64>,
    pub response: Option<serde_json::Value>,
}

pub struct NewCommand {
    pub device_id: i64,
    pub message_id: String,
    pub kind: CommandKind,
    pub method: Option<String>,
    pub payload: serde_json::Value,
    pub expires_ms: i64,
}

fn command(r: &AnyRow) -> Result<Command> {
    Ok(Command {
        id: col_i64(r, "id")?,
        device_id: col_i64(r, "device_id")?,
        message_id: col_str(r, "message_id")?,
        kind: CommandKind::parse(&col_str(r, "kind")?)?,
        method: col_opt_str(r, "method")?,
        payload: col_json(r, "payload")?,
        status: CommandStatus::parse(&col_str(r, "status")?)?,
        created_ms: col_i64(r, "created_ms")?,
        expires_ms: col_i64(r, "expires_ms")?,
        sent_ms: col_opt_i64(r, "sent_ms")?,
        done_ms: col_opt_i64(r, "done_ms")?,
        response: col_opt_str(r, "response")?.map(|s| serde_json::from_str(&s).unwrap_or(serde_json::Value::String(s))),
    })
}

impl MetaStore {
    pub async fn create_command(&self, c: &NewCommand) -> Result<Command> {
        let now = now_ms();
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO commands (device_id, message_id, kind, method, payload, status, created_ms, expires_ms) \
             VALUES ($1, $2, $3, $4, $5, 'pending', $6, $7) RETURNING id",
        )
        .bind(c.device_id)
        .bind(&c.message_id)
        .bind(c.kind.as_str())
        .bind(c.method.as_deref())
        .bind(c.payload.to_string())
        .bind(now)
        .bind(c.expires_ms)
        .fetch_one(self.pool())
        .await
        .map_err(|e| MetaError::unique(e, format!("message id {}", c.message_id)))?;
        self.command(id).await
    }

    pub async fn command(&self, id: i64) -> Result<Command> {
        let r = sqlx::query("SELECT * FROM commands WHERE id = $1").bind(id).fetch_optional(self.pool()).await?;
        command(&r.ok_or_else(|| MetaError::NotFound(format!("command {id}")))?)
    }

    pub async fn command_by_message(&self, device_id: i64, message_id: &str) -> Result<Option<Command>> {
        let r = sqlx::query("SELECT * FROM commands WHERE device_id = $1 AND message_id = $2")
            .bind(device_id)
            .bind(message_id)
            .fetch_optional(self.pool())
            .await?;
        r.as_ref().map(command).transpose()
    }

    /// Commands of a device, newest first.
    pub async fn device_commands(&self, device_id: i64, limit: i64, offset: i64) -> Result<super::Page<Command>> {
        let (limit, offset) = (limit.clamp(1, 1000), offset.max(0));
        let rows = sqlx::query("SELECT * FROM commands WHERE device_id = $1 ORDER BY id DESC LIMIT $2 OFFSET $3")
            .bind(device_id)
            .bind(limit)
            .bind(offset)
            .fetch_all(self.pool())
            .await?;
        let total: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM commands WHERE device_id = $1").bind(device_id).fetch_one(self.pool()).await?;
        Ok(super::Page { items: rows.iter().map(command).collect::<Result<_>>()?, total, limit, offset })
    }

    /// Which of `numbers` have an unexpired pending command for themselves or their
    /// sub-devices (one query for many devices: see `Devices::pending_check`).
    pub async fn pending_among(&self, numbers: &[&str]) -> Result<std::collections::HashSet<String>> {
        if numbers.is_empty() {
            return Ok(Default::default());
        }
        let list = |from: usize| (from..from + numbers.len()).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ");
        let sql = format!(
            "SELECT d.device_number FROM devices d JOIN commands c ON c.device_id = d.id \
             WHERE c.status = 'pending' AND c.expires_ms > $1 AND d.device_number IN ({}) \
             UNION SELECT g.device_number FROM devices g JOIN devices s ON s.gateway_id = g.id JOIN commands c ON c.device_id = s.id \
             WHERE c.status = 'pending' AND c.expires_ms > $1 AND g.device_number IN ({})",
            list(2),
            list(2 + numbers.len())
        );
        let mut q = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql)).bind(now_ms());
        for n in numbers.iter().chain(numbers) {
            q = q.bind(*n);
        }
        Ok(q.fetch_all(self.pool()).await?.into_iter().collect())
    }

    /// Unexpired pending commands of a device, oldest first.
    pub async fn pending_commands(&self, device_id: i64) -> Result<Vec<Command>> {
        let rows =
            sqlx::query("SELECT * FROM commands WHERE device_id = $1 AND status = 'pending' AND expires_ms > $2 ORDER BY id LIMIT 100")
                .bind(device_id)
                .bind(now_ms())
                .fetch_all(self.pool())
                .await?;
        rows.iter().map(command).collect()
    }

    /// pending → sent. False if it was no longer pending (another node or poller sent it).
    pub async fn mark_sent(&self, id: i64) -> Result<bool> {
        let n = sqlx::query("UPDATE commands SET status = 'sent', sent_ms = $1 WHERE id = $2 AND status = 'pending'")
            .bind(now_ms())
            .bind(id)
            .execute(self.pool())
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    /// Record the device's response: pending/sent → acknowledged or failed.
    pub async fn complete_command(
        &self,
        device_id: i64,
        message_id: &str,
        ok: bool,
        response: &serde_json::Value,
    ) -> Result<Option<Command>> {
        let status = if ok { CommandStatus::Acknowledged } else { CommandStatus::Failed };
        let n = sqlx::query(
            "UPDATE commands SET status = $1, done_ms = $2, response = $3, sent_ms = COALESCE(sent_ms, $2) \
             WHERE device_id = $4 AND message_id = $5 AND status IN ('pending', 'sent')",
        )
        .bind(status.as_str())
        .bind(now_ms())
        .bind(response.to_string())
        .bind(device_id)
        .bind(message_id)
        .execute(self.pool())
        .await?
        .rows_affected();
        if n == 0 {
            return Ok(None);
        }
        self.command_by_message(device_id, message_id).await
    }

    /// Commands without an answer past their expiry become `expired`; returns how many.
    pub async fn expire_commands(&self) -> Result<u64> {
        let now = now_ms();
        Ok(sqlx::query("UPDATE commands SET status = 'expired', done_ms = $1 WHERE (status = 'pending' OR (status = 'sent' AND kind <> 'telemetry_control')) AND expires_ms <= $1")
            .bind(now)
            .execute(self.pool())
            .await?
            .rows_affected())
    }
}
