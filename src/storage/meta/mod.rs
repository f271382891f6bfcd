//! Device metadata: tenants, products (thing models), device groups, devices, credentials,
//! attributes, downlink commands and admin API keys.
//!
//! One set of repositories serves both backends: queries go through `sqlx`'s Any driver with
//! `$n` placeholders (which SQLite accepts too) and only portable column types (BIGINT, TEXT,
//! DOUBLE; booleans as 0/1, times as Unix milliseconds, JSON as TEXT). The schema differs per
//! backend only where SQL does (identity columns), so each has its own migrations.
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, ConnectOptions, Row};

mod alerts;
mod commands;
mod devices;
mod migrations;
mod ota;
mod products;
mod telemetry;
mod users;

pub use alerts::{Alert, Channel, Raised, StoredRule};
pub use commands::{Command, CommandKind, CommandStatus, NewCommand};
pub use devices::{AttributeScope, Credential, CredentialKind, Device, DeviceUpdate, Group, NewDevice};
pub use ota::{Package, PackageKind};
pub use products::{DataType, Definition, Field, NewProduct, Product, Tenant, ThingModel};
pub use telemetry::{Policy, PolicyScope};
pub use users::{valid_username, AuditEntry, NewUser, Role, User};

/// What a repository call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("meta store unavailable: {0}")]
    Db(#[from] sqlx::Error),
}

impl MetaError {
    /// Map a unique-constraint violation to `Conflict` with `what`, anything else unchanged.
    fn unique(e: sqlx::Error, what: impl Into<String>) -> MetaError {
        match &e {
            sqlx::Error::Database(d) if d.is_unique_violation() => MetaError::Conflict(what.into()),
            sqlx::Error::Database(d) if d.is_foreign_key_violation() => {
                MetaError::Invalid(format!("{} refers to something that does not exist", what.into()))
            }
            _ => MetaError::Db(e),
        }
    }
}

pub type Result<T> = std::result::Result<T, MetaError>;

/// Which database a store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The meta store: a connection pool and the repositories (methods grouped by entity in the
/// submodules).
#[derive(Clone)]
pub struct MetaStore {
    pool: AnyPool,
    backend: Backend,
}

pub fn now_ms() -> i64 {
    crate::message::now_ms() as i64
}

impl MetaStore {
    /// Open `url` (`sqlite://path` or `postgres://…`), creating an SQLite file if needed, and
    /// run the migrations.
    pub async fn open(url: &str) -> Result<MetaStore> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            return Err(MetaError::Invalid(format!("meta.url must start with sqlite: or postgres://, not {url:?}")));
        };
        let opts = AnyConnectOptions::from_str(url)?.disable_statement_logging();
        let mut pool = AnyPoolOptions::new().acquire_timeout(Duration::from_secs(5));
        pool = match backend {
            // One writer at a time is SQLite's model; WAL lets readers run beside it.
            Backend::Sqlite => pool.max_connections(4).after_connect(|conn, _| {
                Box::pin(async move {
                    for p in [
                        "PRAGMA journal_mode = WAL",
                        "PRAGMA busy_timeout = 5000",
                        "PRAGMA foreign_keys = ON",
                        "PRAGMA synchronous = NORMAL",
                        // 1 MiB of page cache per connection, not SQLite's 2 MiB: the file's
                        // pages are in the OS page cache as well, and a fleet's cold logins
                        // filled all four connections' caches (~1 KiB per device at 5,000).
                        "PRAGMA cache_size = -1024",
                    ] {
                        sqlx::query(p).execute(&mut *conn).await?;
                    }
                    Ok(())
                })
            }),
            Backend::Postgres => pool.max_connections(16),
        };
        let pool = pool.connect_with(opts).await?;
        let store = MetaStore { pool, backend };
        migrations::run(&store).await?;
        Ok(store)
    }

    /// The SQLite URL of the embedded default: a file in the data directory.
    pub fn sqlite_url(dir: &std::path::Path) -> String {
        format!("sqlite://{}?mode=rwc", dir.join("meta.db").display())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// A round trip to the database (readiness checks).
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Refresh the planner's statistics of the device tables after many rows arrived at once
    /// (a bulk import): until autovacuum gets to them, PostgreSQL plans every login's lookup
    /// from an empty table's statistics.
    pub async fn analyze_devices(&self) -> Result<()> {
        let sql = match self.backend() {
            Backend::Postgres => "ANALYZE devices, credentials",
            Backend::Sqlite => "ANALYZE",
        };
        sqlx::query(sql).execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Closed by the node's shutdown (background tasks stop instead of logging failures).
    pub fn is_closed(&self) -> bool {
        self.pool.is_closed()
    }
}

/// Column helpers: the Any driver decodes only a few types, so rows are read by name here.
pub(crate) fn col_i64(r: &AnyRow, c: &str) -> Result<i64> {
    Ok(r.try_get::<i64, _>(c)?)
}
pub(crate) fn col_opt_i64(r: &AnyRow, c: &str) -> Result<Option<i64>> {
    Ok(r.try_get::<Option<i64>, _>(c)?)
}
pub(crate) fn col_str(r: &AnyRow, c: &str) -> Result<String> {
    Ok(r.try_get::<String, _>(c)?)
}
pub(crate) fn col_opt_str(r: &AnyRow, c: &str) -> Result<Option<String>> {
    Ok(r.try_get::<Option<String>, _>(c)?)
}
pub(crate) fn col_json<T: serde::de::DeserializeOwned>(r: &AnyRow, c: &str) -> Result<T> {
    let s = col_str(r, c)?;
    serde_json::from_str(&s).map_err(|e| MetaError::Invalid(format!("stored {c} is not valid JSON: {e}")))
}

/// One page of a list: which rows (filters, search, sort) and where the page starts.
/// Column names come from the repository's own allow-lists, never from the caller.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Only rows of this tenant (None: every tenant; the system scope).
    pub tenant: Option<i64>,
    /// `column = value` filters (columns from the repository's allow-list).
    pub eq: Vec<(String, i64)>,
    /// Case-insensitive substring of the repository's search columns.
    pub search: Option<String>,
    /// Sort column and descending?
    pub sort: Option<(String, bool)>,
    pub limit: i64,
    pub offset: i64,
}

/// A page of rows and how many match in all.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub total: i64,
    pub limit: i64,
    pub offset: i64,
}

/// How a table is listed: its sortable/filterable columns and the columns searched.
pub(crate) struct Listing {
    pub table: &'static str,
    pub tenant_column: Option<&'static str>,
    pub columns: &'static [&'static str],
    pub search: &'static [&'static str],
}

impl MetaStore {
    /// Rows of `l.table` matching `q`, and the total count.
    pub(crate) async fn list_rows(&self, l: &Listing, q: &ListQuery) -> Result<(Vec<AnyRow>, i64)> {
        let mut filter = String::from(" WHERE 1 = 1");
        let mut ints: Vec<i64> = Vec::new();
        let mut n = 0;
        let mut next = || {
            n += 1;
            n
        };
        if let (Some(t), Some(c)) = (q.tenant, l.tenant_column) {
            filter.push_str(&format!(" AND {c} = ${}", next()));
            ints.push(t);
        }
        for (c, v) in &q.eq {
            let Some(c) = l.columns.iter().find(|x| **x == c) else {
                return Err(MetaError::Invalid(format!("cannot filter on {c}; filters: {}", l.columns.join(", "))));
            };
            filter.push_str(&format!(" AND {c} = ${}", next()));
            ints.push(*v);
        }
        let search = q.search.as_ref().filter(|s| !s.is_empty() && !l.search.is_empty()).map(|s| {
            let escaped = s.to_lowercase().replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
            format!("%{escaped}%")
        });
        if search.is_some() {
            let i = next();
            let ors: Vec<String> = l.search.iter().map(|c| format!("LOWER({c}) LIKE ${i} ESCAPE '\\'")).collect();
            filter.push_str(&format!(" AND ({})", ors.join(" OR ")));
        }
        let order = match &q.sort {
            Some((c, desc)) => {
                let Some(c) = l.columns.iter().find(|x| **x == c) else {
                    return Err(MetaError::Invalid(format!("cannot sort by {c}; sortable: {}", l.columns.join(", "))));
                };
                format!(" ORDER BY {c} {}, id {}", if *desc { "DESC" } else { "ASC" }, if *desc { "DESC" } else { "ASC" })
            }
            None => " ORDER BY id ASC".to_string(),
        };
        let count_sql = format!("SELECT COUNT(*) FROM {}{filter}", l.table);
        let (limit_at, offset_at) = (next(), next());
        let rows_sql = format!("SELECT * FROM {}{filter}{order} LIMIT ${limit_at} OFFSET ${offset_at}", l.table);
        let mut count = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(count_sql));
        let mut rows = sqlx::query(sqlx::AssertSqlSafe(rows_sql));
        for v in &ints {
            count = count.bind(*v);
            rows = rows.bind(*v);
        }
        if let Some(s) = &search {
            count = count.bind(s.clone());
            rows = rows.bind(s.clone());
        }
        let total = count.fetch_one(&self.pool).await?;
        let rows = rows.bind(q.limit.clamp(1, 1000)).bind(q.offset.max(0)).fetch_all(&self.pool).await?;
        Ok((rows, total))
    }

    /// Delete row `id` of `table` (a table name from our code, never from input); `NotFound`
    /// ("{what} {id}") when there is none.
    pub(crate) async fn delete_row(&self, table: &'static str, id: i64, what: &str) -> Result<()> {
        let sql = format!("DELETE FROM {table} WHERE id = $1");
        let n = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).execute(&self.pool).await?.rows_affected();
        if n == 0 {
            return Err(MetaError::NotFound(format!("{what} {id}")));
        }
        Ok(())
    }

    /// `list_rows` decoded into a page.
    pub(crate) async fn page<T>(&self, l: &Listing, q: &ListQuery, f: impl Fn(&AnyRow) -> Result<T>) -> Result<Page<T>> {
        let (rows, total) = self.list_rows(l, q).await?;
        let items = rows.iter().map(f).collect::<Result<Vec<T>>>()?;
        Ok(Page { items, total, limit: q.limit.clamp(1, 1000), offset: q.offset.max(0) })
    }
}
