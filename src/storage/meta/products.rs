//! Tenants and products (device templates) with their thing model.
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;

use super::{col_i64, col_json, col_str, now_ms, ListQuery, Listing, MetaError, MetaStore, Page, Result};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Tenant {
    pub id: i64,
    pub name: String,
    pub created_ms: i64,
}

/// Value type of a thing-model field.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    Number,
    Integer,
    Boolean,
    String,
    Object,
}

/// One telemetry key, attribute or parameter: type, unit and (for numbers) range.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Field {
    pub key: String,
    #[serde(rename = "type")]
    pub data_type: DataType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

/// An event or command: an identifier and its parameters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Definition {
    pub identifier: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub params: Vec<Field>,
}

/// What devices of a product report and accept.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(default)]
pub struct ThingModel {
    pub telemetry: Vec<Field>,
    pub attributes: Vec<Field>,
    pub events: Vec<Definition>,
    pub commands: Vec<Definition>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Product {
    pub id: i64,
    pub tenant_id: i64,
    pub name: String,
    /// Reject telemetry and attributes that the model does not describe (or of the wrong type
    /// or outside the range).
    pub strict: bool,
    pub model: ThingModel,
    pub created_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewProduct {
    /// The owning tenant (default: the caller's; 1 in the system scope).
    #[serde(default)]
    pub tenant_id: Option<i64>,
    pub name: String,
    #[serde(default)]
    pub strict: bool,
    #[serde(default)]
    pub model: ThingModel,
}

impl Field {
    /// Check one value against the field: its type and range.
    pub fn check(&self, v: &serde_json::Value) -> std::result::Result<(), String> {
        self.check_type(v)?;
        if let Some(x) = v.as_f64() {
            if self.min.is_some_and(|m| x < m) || self.max.is_some_and(|m| x > m) {
                return Err(format!("{}: {x} is outside [{}, {}]", self.key, fmt_bound(self.min), fmt_bound(self.max)));
            }
        }
        Ok(())
    }

    /// Check one value's type against the field (what every product enforces, strict or not:
    /// a key's values must aggregate as one type).
    pub fn check_type(&self, v: &serde_json::Value) -> std::result::Result<(), String> {
        use serde_json::Value as V;
        let ok = match (self.data_type, v) {
            (DataType::Number, V::Number(_)) => true,
            (DataType::Integer, V::Number(n)) => n.is_i64() || n.is_u64(),
            (DataType::Boolean, V::Bool(_)) => true,
            (DataType::String, V::String(_)) => true,
            (DataType::Object, V::Object(_) | V::Array(_)) => true,
            _ => false,
        };
        if !ok {
            return Err(format!("{}: expected {:?}, got {}", self.key, self.data_type, type_name(v)).to_lowercase());
        }
        Ok(())
    }
}

fn fmt_bound(b: Option<f64>) -> String {
    b.map_or("-".into(), |b| b.to_string())
}

fn type_name(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

impl ThingModel {
    /// Check key/values against `fields`: every key must be described, of its type and range.
    pub fn check(fields: &[Field], values: &serde_json::Map<String, serde_json::Value>) -> std::result::Result<(), String> {
        for (k, v) in values {
            match fields.iter().find(|f| &f.key == k) {
                Some(f) => f.check(v)?,
                None => return Err(format!("{k}: not in the product's thing model")),
            }
        }
        Ok(())
    }

    /// Check the types of the keys `fields` describes; other keys pass (a non-strict product).
    pub fn check_types(fields: &[Field], values: &serde_json::Map<String, serde_json::Value>) -> std::result::Result<(), String> {
        for (k, v) in values {
            if let Some(f) = fields.iter().find(|f| &f.key == k) {
                f.check_type(v)?;
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        for f in self.telemetry.iter().chain(&self.attributes) {
            if f.key.is_empty() || f.key.len() > 128 {
                return Err(MetaError::Invalid("thing model keys must be 1..128 characters".into()));
            }
            if let (Some(a), Some(b)) = (f.min, f.max) {
                if a > b {
                    return Err(MetaError::Invalid(format!("{}: min is above max", f.key)));
                }
            }
        }
        Ok(())
    }
}

pub(crate) const PRODUCTS: Listing = Listing {
    table: "products",
    tenant_column: Some("tenant_id"),
    columns: &["id", "name", "strict", "created_ms", "tenant_id"],
    search: &["name"],
};
pub(crate) const TENANTS: Listing =
    Listing { table: "tenants", tenant_column: Some("id"), columns: &["id", "name", "created_ms"], search: &["name"] };

fn tenant(r: &AnyRow) -> Result<Tenant> {
    Ok(Tenant { id: col_i64(r, "id")?, name: col_str(r, "name")?, created_ms: col_i64(r, "created_ms")? })
}

fn product(r: &AnyRow) -> Result<Product> {
    Ok(Product {
        id: col_i64(r, "id")?,
        tenant_id: col_i64(r, "tenant_id")?,
        name: col_str(r, "name")?,
        strict: col_i64(r, "strict")? != 0,
        model: col_json(r, "model")?,
        created_ms: col_i64(r, "created_ms")?,
    })
}

impl MetaStore {
    pub async fn create_tenant(&self, name: &str) -> Result<Tenant> {
        if name.trim().is_empty() {
            return Err(MetaError::Invalid("tenant name is empty".into()));
        }
        let now = now_ms();
        let id: i64 = sqlx::query_scalar("INSERT INTO tenants (name, created_ms) VALUES ($1, $2) RETURNING id")
            .bind(name)
            .bind(now)
            .fetch_one(self.pool())
            .await
            .map_err(|e| MetaError::unique(e, format!("tenant {name} exists")))?;
        Ok(Tenant { id, name: name.into(), created_ms: now })
    }

    pub async fn list_tenants(&self) -> Result<Vec<Tenant>> {
        let rows = sqlx::query("SELECT id, name, created_ms FROM tenants ORDER BY id").fetch_all(self.pool()).await?;
        rows.iter()
            .map(|r| Ok(Tenant { id: col_i64(r, "id")?, name: col_str(r, "name")?, created_ms: col_i64(r, "created_ms")? }))
            .collect()
    }

    pub async fn tenant(&self, id: i64) -> Result<Tenant> {
        let r = sqlx::query("SELECT * FROM tenants WHERE id = $1").bind(id).fetch_optional(self.pool()).await?;
        tenant(&r.ok_or_else(|| MetaError::NotFound(format!("tenant {id}")))?)
    }

    pub async fn tenants_page(&self, q: &ListQuery) -> Result<Page<Tenant>> {
        self.page(&TENANTS, q, tenant).await
    }

    pub async fn rename_tenant(&self, id: i64, name: &str) -> Result<Tenant> {
        if name.trim().is_empty() {
            return Err(MetaError::Invalid("tenant name is empty".into()));
        }
        let n = sqlx::query("UPDATE tenants SET name = $1 WHERE id = $2")
            .bind(name)
            .bind(id)
            .execute(self.pool())
            .await
            .map_err(|e| MetaError::unique(e, format!("tenant {name} exists")))?
            .rows_affected();
        if n == 0 {
            return Err(MetaError::NotFound(format!("tenant {id}")));
        }
        self.tenant(id).await
    }

    /// Delete a tenant and everything it owns (cascades).
    pub async fn delete_tenant(&self, id: i64) -> Result<()> {
        self.delete_row("tenants", id, "tenant").await
    }

    pub async fn products_page(&self, q: &ListQuery) -> Result<Page<Product>> {
        self.page(&PRODUCTS, q, product).await
    }

    pub async fn create_product(&self, p: &NewProduct) -> Result<Product> {
        if p.name.trim().is_empty() {
            return Err(MetaError::Invalid("product name is empty".into()));
        }
        p.model.validate()?;
        let now = now_ms();
        let model = serde_json::to_string(&p.model).map_err(|e| MetaError::Invalid(e.to_string()))?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO products (tenant_id, name, strict, model, created_ms) VALUES ($1, $2, $3, $4, $5) RETURNING id",
        )
        .bind(p.tenant_id.unwrap_or(1))
        .bind(&p.name)
        .bind(p.strict as i64)
        .bind(model)
        .bind(now)
        .fetch_one(self.pool())
        .await
        .map_err(|e| MetaError::unique(e, format!("product {}", p.name)))?;
        Ok(Product {
            id,
            tenant_id: p.tenant_id.unwrap_or(1),
            name: p.name.clone(),
            strict: p.strict,
            model: p.model.clone(),
            created_ms: now,
        })
    }

    pub async fn product(&self, id: i64) -> Result<Product> {
        let r = sqlx::query("SELECT * FROM products WHERE id = $1").bind(id).fetch_optional(self.pool()).await?;
        product(&r.ok_or_else(|| MetaError::NotFound(format!("product {id}")))?)
    }

    pub async fn list_products(&self) -> Result<Vec<Product>> {
        let rows = sqlx::query("SELECT * FROM products ORDER BY id").fetch_all(self.pool()).await?;
        rows.iter().map(product).collect()
    }

    pub async fn update_product(&self, id: i64, p: &NewProduct) -> Result<Product> {
        p.model.validate()?;
        let model = serde_json::to_string(&p.model).map_err(|e| MetaError::Invalid(e.to_string()))?;
        let n = sqlx::query("UPDATE products SET name = $1, strict = $2, model = $3 WHERE id = $4")
            .bind(&p.name)
            .bind(p.strict as i64)
            .bind(model)
            .bind(id)
            .execute(self.pool())
            .await
            .map_err(|e| MetaError::unique(e, format!("product {}", p.name)))?
            .rows_affected();
        if n == 0 {
            return Err(MetaError::NotFound(format!("product {id}")));
        }
        self.product(id).await
    }

    pub async fn delete_product(&self, id: i64) -> Result<()> {
        self.delete_row("products", id, "product").await
    }
}
