//! Over-the-air update packages (firmware and software images): uploaded through the admin
//! API, kept with their SHA-256, assigned to devices through `fw_*` / `sw_*` shared attributes
//! and served to devices in chunks.
use serde::Serialize;
use sqlx::any::AnyRow;

use super::{col_i64, col_str, now_ms, MetaError, MetaStore, Result};

/// Firmware (`fw_*` attributes, `v2/fw/…`) or software (`sw_*`, `v2/sw/…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PackageKind {
    Firmware,
    Software,
}

impl PackageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PackageKind::Firmware => "firmware",
            PackageKind::Software => "software",
        }
    }

    /// The attribute and topic prefix ThingsBoard uses: `fw` or `sw`.
    pub fn prefix(self) -> &'static str {
        match self {
            PackageKind::Firmware => "fw",
            PackageKind::Software => "sw",
        }
    }

    pub fn from_prefix(p: &str) -> Option<PackageKind> {
        match p {
            "fw" => Some(PackageKind::Firmware),
            "sw" => Some(PackageKind::Software),
            _ => None,
        }
    }

    fn parse(s: &str) -> Result<PackageKind> {
        match s {
            "firmware" => Ok(PackageKind::Firmware),
            "software" => Ok(PackageKind::Software),
            _ => Err(MetaError::Invalid(format!("unknown package kind {s:?}"))),
        }
    }
}

/// A package's description (its bytes are read separately).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Package {
    pub id: i64,
    pub tenant_id: i64,
    pub kind: PackageKind,
    pub title: String,
    pub version: String,
    /// Bytes.
    pub size: i64,
    /// Hex digest of the bytes, by `checksum_algorithm`.
    pub checksum: String,
    /// Always `SHA256` here (what ThingsBoard's SDKs verify by default).
    pub checksum_algorithm: String,
    pub created_ms: i64,
}

fn package(r: &AnyRow) -> Result<Package> {
    Ok(Package {
        id: col_i64(r, "id")?,
        tenant_id: col_i64(r, "tenant_id")?,
        kind: PackageKind::parse(&col_str(r, "kind")?)?,
        title: col_str(r, "title")?,
        version: col_str(r, "version")?,
        size: col_i64(r, "size")?,
        checksum: col_str(r, "checksum")?,
        checksum_algorithm: col_str(r, "checksum_algorithm")?,
        created_ms: col_i64(r, "created_ms")?,
    })
}

/// The columns of a [`Package`] (its bytes are read apart).
macro_rules! columns {
    ($p:literal) => {
        concat!(
            $p,
            "id, ",
            $p,
            "tenant_id, ",
            $p,
            "kind, ",
            $p,
            "title, ",
            $p,
            "version, ",
            $p,
            "size, ",
            $p,
            "checksum, ",
            $p,
            "checksum_algorithm, ",
            $p,
            "created_ms"
        )
    };
}

/// Titles and versions name files on devices and travel in topics and attributes: printable,
/// no slashes, at most 128 characters.
fn valid_name(what: &str, s: &str) -> Result<()> {
    let ok = !s.is_empty() && s.chars().count() <= 128 && s.chars().all(|c| !c.is_control() && c != '/' && c != '\\');
    if ok {
        Ok(())
    } else {
        Err(MetaError::Invalid(format!("{what} must be 1 to 128 printable characters without slashes")))
    }
}

impl MetaStore {
    /// Store a package; the checksum is computed here. Titles and versions are unique per
    /// tenant and kind (a version, once published, never changes its bytes).
    pub async fn create_package(&self, tenant_id: i64, kind: PackageKind, title: &str, version: &str, data: &[u8]) -> Result<Package> {
        use sha2::Digest;
        valid_name("title", title)?;
        valid_name("version", version)?;
        if data.is_empty() {
            return Err(MetaError::Invalid("the package is empty".into()));
        }
        let checksum = hex::encode(sha2::Sha256::digest(data));
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO ota_packages (tenant_id, kind, title, version, size, checksum, checksum_algorithm, data, created_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, 'SHA256', $7, $8) RETURNING id",
        )
        .bind(tenant_id)
        .bind(kind.as_str())
        .bind(title)
        .bind(version)
        .bind(data.len() as i64)
        .bind(&checksum)
        .bind(data)
        .bind(now_ms())
        .fetch_one(self.pool())
        .await
        .map_err(|e| MetaError::unique(e, format!("{} {title} {version}", kind.as_str())))?;
        self.package(id).await
    }

    pub async fn package(&self, id: i64) -> Result<Package> {
        let r =
            sqlx::query(concat!("SELECT ", columns!(""), " FROM ota_packages WHERE id = $1")).bind(id).fetch_optional(self.pool()).await?;
        package(&r.ok_or_else(|| MetaError::NotFound(format!("package {id}")))?)
    }

    /// The package of the device's tenant a device was told about (its `fw_title`/`fw_version`
    /// or `sw_*`).
    pub async fn package_for_device(&self, device_id: i64, kind: PackageKind, title: &str, version: &str) -> Result<Option<Package>> {
        let r = sqlx::query(concat!(
            "SELECT ",
            columns!("p."),
            " FROM ota_packages p JOIN devices d ON d.tenant_id = p.tenant_id \
             WHERE d.id = $1 AND p.kind = $2 AND p.title = $3 AND p.version = $4"
        ))
        .bind(device_id)
        .bind(kind.as_str())
        .bind(title)
        .bind(version)
        .fetch_optional(self.pool())
        .await?;
        r.as_ref().map(package).transpose()
    }

    /// A package's bytes.
    pub async fn package_data(&self, id: i64) -> Result<Vec<u8>> {
        let d: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT data FROM ota_packages WHERE id = $1").bind(id).fetch_optional(self.pool()).await?;
        d.ok_or_else(|| MetaError::NotFound(format!("package {id}")))
    }

    /// Packages of tenant `tenant` (every tenant's with `None`), newest first.
    pub async fn packages_page(&self, tenant: Option<i64>, limit: i64, offset: i64) -> Result<super::Page<Package>> {
        let (limit, offset) = (limit.clamp(1, 1000), offset.max(0));
        let (rows, total): (Vec<AnyRow>, i64) = match tenant {
            None => (
                sqlx::query(concat!("SELECT ", columns!(""), " FROM ota_packages ORDER BY id DESC LIMIT $1 OFFSET $2"))
                    .bind(limit)
                    .bind(offset)
                    .fetch_all(self.pool())
                    .await?,
                sqlx::query_scalar("SELECT COUNT(*) FROM ota_packages").fetch_one(self.pool()).await?,
            ),
            Some(t) => (
                sqlx::query(concat!(
                    "SELECT ",
                    columns!(""),
                    " FROM ota_packages WHERE tenant_id = $1 ORDER BY id DESC LIMIT $2 OFFSET $3"
                ))
                .bind(t)
                .bind(limit)
                .bind(offset)
                .fetch_all(self.pool())
                .await?,
                sqlx::query_scalar("SELECT COUNT(*) FROM ota_packages WHERE tenant_id = $1").bind(t).fetch_one(self.pool()).await?,
            ),
        };
        Ok(super::Page { items: rows.iter().map(package).collect::<Result<_>>()?, total, limit, offset })
    }

    pub async fn delete_package(&self, id: i64) -> Result<()> {
        let n = sqlx::query("DELETE FROM ota_packages WHERE id = $1").bind(id).execute(self.pool()).await?.rows_affected();
        if n == 0 {
            return Err(MetaError::NotFound(format!("package {id}")));
        }
        Ok(())
    }
}
