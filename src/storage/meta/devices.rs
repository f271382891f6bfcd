//! Devices, device groups, credentials and attributes.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;

use super::{col_i64, col_json, col_opt_i64, col_opt_str, col_str, now_ms, ListQuery, Listing, MetaError, MetaStore, Page, Result};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Device {
    pub id: i64,
    pub tenant_id: i64,
    /// The device's unique number: its identity in topics and URLs.
    pub device_number: String,
    pub name: String,
    pub product_id: Option<i64>,
    pub group_id: Option<i64>,
    pub labels: BTreeMap<String, String>,
    /// The gateway this sub-device is reached through, and its address there.
    pub gateway_id: Option<i64>,
    pub sub_address: Option<String>,
    pub enabled: bool,
    pub created_ms: i64,
    pub updated_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewDevice {
    /// The owning tenant (default: the caller's; 1 in the system scope).
    #[serde(default)]
    pub tenant_id: Option<i64>,
    pub device_number: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub product_id: Option<i64>,
    #[serde(default)]
    pub group_id: Option<i64>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub gateway_id: Option<i64>,
    #[serde(default)]
    pub sub_address: Option<String>,
}

/// A partial update: absent fields keep their value.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceUpdate {
    pub name: Option<String>,
    pub product_id: Option<Option<i64>>,
    pub group_id: Option<Option<i64>>,
    pub labels: Option<BTreeMap<String, String>>,
    pub enabled: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Group {
    pub id: i64,
    pub tenant_id: i64,
    pub name: String,
    pub parent_id: Option<i64>,
}

/// How a device proves who it is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    /// An access token: the MQTT username (no password), the `{token}` of HTTP/CoAP URLs.
    Token,
    /// MQTT username + password (argon2 hash stored).
    Password,
    /// SHA-256 fingerprint (hex) of the client certificate presented on a TLS listener.
    X509,
}

impl CredentialKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::Token => "token",
            CredentialKind::Password => "password",
            CredentialKind::X509 => "x509",
        }
    }
    fn parse(s: &str) -> Result<CredentialKind> {
        Ok(match s {
            "token" => CredentialKind::Token,
            "password" => CredentialKind::Password,
            "x509" => CredentialKind::X509,
            _ => return Err(MetaError::Invalid(format!("unknown credential kind {s}"))),
        })
    }

    /// What is stored (and cached) for a credential a device presents: an access token only
    /// as its SHA-256 (tokens are 192-bit random, so a plain hash is enough, as for API
    /// keys), so neither the database, a backup nor a cache key holds a usable token.
    pub fn stored(self, presented: &str) -> std::borrow::Cow<'_, str> {
        match self {
            CredentialKind::Token => std::borrow::Cow::Owned(token_digest(presented)),
            _ => std::borrow::Cow::Borrowed(presented),
        }
    }
}

/// Prefix of a stored token digest (rows without it are plain tokens of an older build,
/// hashed at start-up by [`MetaStore::hash_plain_tokens`]).
const TOKEN_DIGEST: &str = "sha256:";

fn token_digest(token: &str) -> String {
    use sha2::Digest;
    format!("{TOKEN_DIGEST}{}", hex::encode(sha2::Sha256::digest(token.as_bytes())))
}

/// How the API shows a credential: never a token, not even its full digest.
fn public_label(kind: CredentialKind, identity: &str) -> String {
    match kind {
        // A short fingerprint tells two tokens apart without helping anyone guess one.
        CredentialKind::Token => identity.strip_prefix(TOKEN_DIGEST).unwrap_or(identity).chars().take(12).collect(),
        CredentialKind::Password | CredentialKind::X509 => identity.to_string(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Credential {
    pub id: i64,
    pub device_id: i64,
    pub kind: CredentialKind,
    /// What is stored: a token's digest, the username, or the certificate fingerprint.
    #[serde(skip_serializing, default)]
    pub identity: String,
    /// Tokens: the first 12 hex digits of their SHA-256 (the token itself is shown once, when
    /// made); passwords: the username; certificates: the SHA-256 fingerprint.
    #[serde(default)]
    pub label: String,
    /// argon2 hash (passwords only); never returned by the API.
    #[serde(skip_serializing, default)]
    pub secret: Option<String>,
    pub created_ms: i64,
}

/// Attributes reported by the device (`client`) or set by the platform (`shared`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AttributeScope {
    Client,
    Shared,
}

impl AttributeScope {
    pub fn as_str(self) -> &'static str {
        match self {
            AttributeScope::Client => "client",
            AttributeScope::Shared => "shared",
        }
    }
}

pub(crate) const DEVICES: Listing = Listing {
    table: "devices",
    tenant_column: Some("tenant_id"),
    columns: &["id", "device_number", "name", "product_id", "group_id", "gateway_id", "enabled", "created_ms", "updated_ms", "tenant_id"],
    search: &["device_number", "name"],
};
pub(crate) const GROUPS: Listing = Listing {
    table: "device_groups",
    tenant_column: Some("tenant_id"),
    columns: &["id", "name", "parent_id", "created_ms", "tenant_id"],
    search: &["name"],
};

fn group(r: &AnyRow) -> Result<Group> {
    Ok(Group {
        id: col_i64(r, "id")?,
        tenant_id: col_i64(r, "tenant_id")?,
        name: col_str(r, "name")?,
        parent_id: col_opt_i64(r, "parent_id")?,
    })
}

fn device(r: &AnyRow) -> Result<Device> {
    Ok(Device {
        id: col_i64(r, "id")?,
        tenant_id: col_i64(r, "tenant_id")?,
        device_number: col_str(r, "device_number")?,
        name: col_str(r, "name")?,
        product_id: col_opt_i64(r, "product_id")?,
        group_id: col_opt_i64(r, "group_id")?,
        labels: col_json(r, "labels")?,
        gateway_id: col_opt_i64(r, "gateway_id")?,
        sub_address: col_opt_str(r, "sub_address")?,
        enabled: col_i64(r, "enabled")? != 0,
        created_ms: col_i64(r, "created_ms")?,
        updated_ms: col_i64(r, "updated_ms")?,
    })
}

fn credential(r: &AnyRow) -> Result<Credential> {
    let kind = CredentialKind::parse(&col_str(r, "kind")?)?;
    let identity = col_str(r, "identity")?;
    Ok(Credential {
        id: col_i64(r, "id")?,
        device_id: col_i64(r, "device_id")?,
        kind,
        label: public_label(kind, &identity),
        identity,
        secret: col_opt_str(r, "secret")?,
        created_ms: col_i64(r, "created_ms")?,
    })
}

/// Device numbers travel in topics and URLs: keep them to a safe alphabet.
pub fn valid_device_number(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

impl MetaStore {
    pub async fn create_device(&self, d: &NewDevice) -> Result<Device> {
        if !valid_device_number(&d.device_number) {
            return Err(MetaError::Invalid("device_number must be 1..128 of A-Z a-z 0-9 - _ . :".into()));
        }
        if d.gateway_id.is_some() != d.sub_address.is_some() {
            return Err(MetaError::Invalid("a sub-device needs both gateway_id and sub_address".into()));
        }
        if let Some(g) = d.gateway_id {
            let gw = self.device_by_id(g).await?;
            if gw.gateway_id.is_some() {
                return Err(MetaError::Invalid("a sub-device cannot be a gateway".into()));
            }
        }
        let now = now_ms();
        let name = if d.name.is_empty() { d.device_number.clone() } else { d.name.clone() };
        let labels = serde_json::to_string(&d.labels).map_err(|e| MetaError::Invalid(e.to_string()))?;
        let row = sqlx::query(
            "INSERT INTO devices (tenant_id, device_number, name, product_id, group_id, labels, gateway_id, sub_address, enabled, created_ms, updated_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 1, $9, $9) RETURNING *",
        )
        .bind(d.tenant_id.unwrap_or(1))
        .bind(&d.device_number)
        .bind(&name)
        .bind(d.product_id)
        .bind(d.group_id)
        .bind(labels)
        .bind(d.gateway_id)
        .bind(d.sub_address.as_deref())
        .bind(now)
        .fetch_one(self.pool())
        .await
        .map_err(|e| MetaError::unique(e, format!("device number {} (or its gateway address) is not available: numbers are unique across the platform", d.device_number)))?;
        device(&row)
    }

    pub async fn device_by_id(&self, id: i64) -> Result<Device> {
        let r = sqlx::query("SELECT * FROM devices WHERE id = $1").bind(id).fetch_optional(self.pool()).await?;
        device(&r.ok_or_else(|| MetaError::NotFound(format!("device {id}")))?)
    }

    pub async fn device(&self, number: &str) -> Result<Device> {
        let r = sqlx::query("SELECT * FROM devices WHERE device_number = $1").bind(number).fetch_optional(self.pool()).await?;
        device(&r.ok_or_else(|| MetaError::NotFound(format!("device {number}")))?)
    }

    /// Devices in id order after `after` (keyset pagination), optionally of one group/product.
    pub async fn list_devices(&self, after: i64, limit: i64, group: Option<i64>, product: Option<i64>) -> Result<Vec<Device>> {
        let rows = sqlx::query(
            "SELECT * FROM devices WHERE id > $1 AND ($2 = 0 OR group_id = $2) AND ($3 = 0 OR product_id = $3) ORDER BY id LIMIT $4",
        )
        .bind(after)
        .bind(group.unwrap_or(0))
        .bind(product.unwrap_or(0))
        .bind(limit.clamp(1, 1000))
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(device).collect()
    }

    pub async fn sub_devices(&self, gateway_id: i64) -> Result<Vec<Device>> {
        let rows = sqlx::query("SELECT * FROM devices WHERE gateway_id = $1 ORDER BY id").bind(gateway_id).fetch_all(self.pool()).await?;
        rows.iter().map(device).collect()
    }

    pub async fn update_device(&self, number: &str, u: &DeviceUpdate) -> Result<Device> {
        let d = self.device(number).await?;
        let labels = match &u.labels {
            Some(l) => l.clone(),
            None => d.labels.clone(),
        };
        let labels = serde_json::to_string(&labels).map_err(|e| MetaError::Invalid(e.to_string()))?;
        sqlx::query(
            "UPDATE devices SET name = $1, product_id = $2, group_id = $3, labels = $4, enabled = $5, updated_ms = $6 WHERE id = $7",
        )
        .bind(u.name.clone().unwrap_or(d.name))
        .bind(u.product_id.unwrap_or(d.product_id))
        .bind(u.group_id.unwrap_or(d.group_id))
        .bind(labels)
        .bind(u.enabled.unwrap_or(d.enabled) as i64)
        .bind(now_ms())
        .bind(d.id)
        .execute(self.pool())
        .await
        .map_err(|e| MetaError::unique(e, "device update"))?;
        self.device_by_id(d.id).await
    }

    /// Move a device to another tenant (claiming): its product and group stay behind.
    pub async fn move_device(&self, id: i64, tenant_id: i64) -> Result<Device> {
        sqlx::query("UPDATE devices SET tenant_id = $1, product_id = NULL, group_id = NULL, updated_ms = $2 WHERE id = $3")
            .bind(tenant_id)
            .bind(now_ms())
            .bind(id)
            .execute(self.pool())
            .await
            .map_err(|e| MetaError::unique(e, "device move"))?;
        self.device_by_id(id).await
    }

    pub async fn delete_device(&self, number: &str) -> Result<Device> {
        let d = self.device(number).await?;
        sqlx::query("DELETE FROM devices WHERE id = $1").bind(d.id).execute(self.pool()).await?;
        Ok(d)
    }

    pub async fn create_group(&self, tenant_id: i64, name: &str, parent_id: Option<i64>) -> Result<Group> {
        if name.trim().is_empty() {
            return Err(MetaError::Invalid("group name is empty".into()));
        }
        let id: i64 =
            sqlx::query_scalar("INSERT INTO device_groups (tenant_id, name, parent_id, created_ms) VALUES ($1, $2, $3, $4) RETURNING id")
                .bind(tenant_id)
                .bind(name)
                .bind(parent_id)
                .bind(now_ms())
                .fetch_one(self.pool())
                .await
                .map_err(|e| MetaError::unique(e, format!("group {name}")))?;
        Ok(Group { id, tenant_id, name: name.into(), parent_id })
    }

    pub async fn list_groups(&self) -> Result<Vec<Group>> {
        let rows = sqlx::query("SELECT * FROM device_groups ORDER BY id").fetch_all(self.pool()).await?;
        rows.iter().map(group).collect()
    }

    pub async fn group(&self, id: i64) -> Result<Group> {
        let r = sqlx::query("SELECT * FROM device_groups WHERE id = $1").bind(id).fetch_optional(self.pool()).await?;
        group(&r.ok_or_else(|| MetaError::NotFound(format!("group {id}")))?)
    }

    pub async fn groups_page(&self, q: &ListQuery) -> Result<Page<Group>> {
        self.page(&GROUPS, q, group).await
    }

    /// Device numbers of a tenant (every tenant's with None).
    pub async fn device_numbers(&self, tenant: Option<i64>) -> Result<Vec<String>> {
        let rows: Vec<String> = match tenant {
            Some(t) => sqlx::query_scalar("SELECT device_number FROM devices WHERE tenant_id = $1").bind(t).fetch_all(self.pool()).await?,
            None => sqlx::query_scalar("SELECT device_number FROM devices").fetch_all(self.pool()).await?,
        };
        Ok(rows)
    }

    pub async fn devices_page(&self, q: &ListQuery) -> Result<Page<Device>> {
        self.page(&DEVICES, q, device).await
    }

    pub async fn delete_group(&self, id: i64) -> Result<()> {
        self.delete_row("device_groups", id, "group").await
    }

    /// Add a credential. `secret` is the argon2 hash for passwords (hashed by the caller).
    pub async fn add_credential(&self, device_id: i64, kind: CredentialKind, identity: &str, secret: Option<&str>) -> Result<Credential> {
        if identity.is_empty() || identity.len() > 512 {
            return Err(MetaError::Invalid("credential identity must be 1..512 bytes".into()));
        }
        let identity = &*kind.stored(identity);
        let now = now_ms();
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO credentials (device_id, kind, identity, secret, created_ms) VALUES ($1, $2, $3, $4, $5) RETURNING id",
        )
        .bind(device_id)
        .bind(kind.as_str())
        .bind(identity)
        .bind(secret)
        .bind(now)
        .fetch_one(self.pool())
        .await
        .map_err(|e| MetaError::unique(e, format!("a {} credential with that identity exists", kind.as_str())))?;
        Ok(Credential {
            id,
            device_id,
            kind,
            label: public_label(kind, identity),
            identity: identity.into(),
            secret: secret.map(str::to_string),
            created_ms: now,
        })
    }

    pub async fn credentials(&self, device_id: i64) -> Result<Vec<Credential>> {
        let rows = sqlx::query("SELECT * FROM credentials WHERE device_id = $1 ORDER BY id").bind(device_id).fetch_all(self.pool()).await?;
        rows.iter().map(credential).collect()
    }

    /// The credential with this kind and identity (as the device presents it), and its device.
    pub async fn find_credential(&self, kind: CredentialKind, identity: &str) -> Result<Option<(Credential, Device)>> {
        let Some(r) = sqlx::query("SELECT * FROM credentials WHERE kind = $1 AND identity = $2")
            .bind(kind.as_str())
            .bind(&*kind.stored(identity))
            .fetch_optional(self.pool())
            .await?
        else {
            return Ok(None);
        };
        let c = credential(&r)?;
        let d = self.device_by_id(c.device_id).await?;
        Ok(Some((c, d)))
    }

    pub async fn delete_credential(&self, device_id: i64, id: i64) -> Result<Credential> {
        let r = sqlx::query("SELECT * FROM credentials WHERE id = $1 AND device_id = $2")
            .bind(id)
            .bind(device_id)
            .fetch_optional(self.pool())
            .await?;
        let c = credential(&r.ok_or_else(|| MetaError::NotFound(format!("credential {id}")))?)?;
        sqlx::query("DELETE FROM credentials WHERE id = $1").bind(id).execute(self.pool()).await?;
        Ok(c)
    }

    /// Upsert attributes of one scope.
    pub async fn set_attributes(
        &self,
        device_id: i64,
        scope: AttributeScope,
        values: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<()> {
        let now = now_ms();
        let mut tx = self.pool().begin().await?;
        for (k, v) in values {
            sqlx::query(
                "INSERT INTO attributes (device_id, scope, key, value, updated_ms) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (device_id, scope, key) DO UPDATE SET value = excluded.value, updated_ms = excluded.updated_ms",
            )
            .bind(device_id)
            .bind(scope.as_str())
            .bind(k)
            .bind(v.to_string())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Attributes of one scope (all keys when `keys` is empty).
    pub async fn attributes(
        &self,
        device_id: i64,
        scope: AttributeScope,
        keys: &[String],
    ) -> Result<serde_json::Map<String, serde_json::Value>> {
        let rows = sqlx::query("SELECT key, value FROM attributes WHERE device_id = $1 AND scope = $2 ORDER BY key")
            .bind(device_id)
            .bind(scope.as_str())
            .fetch_all(self.pool())
            .await?;
        let mut out = serde_json::Map::new();
        for r in &rows {
            let k = col_str(r, "key")?;
            if keys.is_empty() || keys.contains(&k) {
                out.insert(k, col_json(r, "value")?);
            }
        }
        Ok(out)
    }

    /// Replace the plain tokens an older build stored by their digests (idempotent; run at
    /// start-up, by every node of a cluster alike). Returns how many were hashed.
    pub async fn hash_plain_tokens(&self) -> Result<u64> {
        let rows: Vec<(i64, String)> =
            sqlx::query_as("SELECT id, identity FROM credentials WHERE kind = 'token' AND identity NOT LIKE 'sha256:%'")
                .fetch_all(self.pool())
                .await?;
        let mut n = 0;
        for (id, token) in rows {
            let r = sqlx::query("UPDATE credentials SET identity = $1 WHERE id = $2 AND identity = $3")
                .bind(token_digest(&token))
                .bind(id)
                .bind(&token)
                .execute(self.pool())
                .await?;
            n += r.rows_affected();
        }
        Ok(n)
    }

    /// Store the hash of an admin API key.
    pub async fn add_api_key(&self, name: &str, key_hash: &str) -> Result<()> {
        sqlx::query("INSERT INTO api_keys (name, key_hash, created_ms) VALUES ($1, $2, $3)")
            .bind(name)
            .bind(key_hash)
            .bind(now_ms())
            .execute(self.pool())
            .await
            .map_err(|e| MetaError::unique(e, "api key"))?;
        Ok(())
    }

    pub async fn api_key_count(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM api_keys").fetch_one(self.pool()).await?)
    }

    pub async fn api_key_exists(&self, key_hash: &str) -> Result<bool> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_keys WHERE key_hash = $1").bind(key_hash).fetch_one(self.pool()).await?;
        Ok(n > 0)
    }
}
