//! Schema migrations, one list per backend, applied in order at start-up and recorded in
//! `schema_migrations`. On PostgreSQL an advisory lock keeps nodes starting together from
//! migrating twice.
use super::{now_ms, Backend, MetaStore, Result};

const SQLITE: &[&str] = &[
    r#"
CREATE TABLE tenants (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, created_ms INTEGER NOT NULL);
CREATE TABLE products (id INTEGER PRIMARY KEY AUTOINCREMENT, tenant_id INTEGER NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
  name TEXT NOT NULL, strict INTEGER NOT NULL DEFAULT 0, model TEXT NOT NULL, created_ms INTEGER NOT NULL, UNIQUE (tenant_id, name));
CREATE TABLE device_groups (id INTEGER PRIMARY KEY AUTOINCREMENT, tenant_id INTEGER NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
  name TEXT NOT NULL, parent_id INTEGER REFERENCES device_groups(id) ON DELETE SET NULL, created_ms INTEGER NOT NULL, UNIQUE (tenant_id, name));
CREATE TABLE devices (id INTEGER PRIMARY KEY AUTOINCREMENT, tenant_id INTEGER NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
  device_number TEXT NOT NULL UNIQUE, name TEXT NOT NULL, product_id INTEGER REFERENCES products(id) ON DELETE SET NULL,
  group_id INTEGER REFERENCES device_groups(id) ON DELETE SET NULL, labels TEXT NOT NULL DEFAULT '{}',
  gateway_id INTEGER REFERENCES devices(id) ON DELETE SET NULL, sub_address TEXT, enabled INTEGER NOT NULL DEFAULT 1,
  created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL, UNIQUE (gateway_id, sub_address));
CREATE TABLE credentials (id INTEGER PRIMARY KEY AUTOINCREMENT, device_id INTEGER NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
  kind TEXT NOT NULL, identity TEXT NOT NULL, secret TEXT, created_ms INTEGER NOT NULL, UNIQUE (kind, identity));
CREATE TABLE attributes (device_id INTEGER NOT NULL REFERENCES devices(id) ON DELETE CASCADE, scope TEXT NOT NULL, key TEXT NOT NULL,
  value TEXT NOT NULL, updated_ms INTEGER NOT NULL, PRIMARY KEY (device_id, scope, key));
CREATE TABLE commands (id INTEGER PRIMARY KEY AUTOINCREMENT, device_id INTEGER NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
  message_id TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, method TEXT, payload TEXT NOT NULL, status TEXT NOT NULL,
  created_ms INTEGER NOT NULL, expires_ms INTEGER NOT NULL, sent_ms INTEGER, done_ms INTEGER, response TEXT);
CREATE INDEX commands_open ON commands (device_id, status);
CREATE TABLE api_keys (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, key_hash TEXT NOT NULL UNIQUE, created_ms INTEGER NOT NULL);
INSERT INTO tenants (name, created_ms) VALUES ('default', 0)
"#,
    r#"
CREATE TABLE telemetry_policies (scope TEXT NOT NULL, scope_id INTEGER NOT NULL, rules TEXT NOT NULL DEFAULT '[]',
  raw_days INTEGER NOT NULL DEFAULT 0, updated_ms INTEGER NOT NULL, PRIMARY KEY (scope, scope_id))
"#,
    r#"
CREATE TABLE roles (id INTEGER PRIMARY KEY AUTOINCREMENT, tenant_id INTEGER NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
  name TEXT NOT NULL, permissions TEXT NOT NULL, created_ms INTEGER NOT NULL, UNIQUE (tenant_id, name));
CREATE TABLE users (id INTEGER PRIMARY KEY AUTOINCREMENT, tenant_id INTEGER REFERENCES tenants(id) ON DELETE CASCADE,
  username TEXT NOT NULL UNIQUE, password_hash TEXT NOT NULL, role TEXT NOT NULL, role_id INTEGER REFERENCES roles(id),
  disabled INTEGER NOT NULL DEFAULT 0, revoked_before_ms INTEGER NOT NULL DEFAULT 0, created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL);
CREATE TABLE audit_log (id INTEGER PRIMARY KEY AUTOINCREMENT, tenant_id INTEGER, actor TEXT NOT NULL, action TEXT NOT NULL,
  target TEXT NOT NULL, detail TEXT NOT NULL, at_ms INTEGER NOT NULL);
CREATE INDEX audit_tenant ON audit_log (tenant_id, id);
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)
"#,
    r#"
CREATE TABLE channels (id INTEGER PRIMARY KEY AUTOINCREMENT, tenant_id INTEGER NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
  name TEXT NOT NULL, kind TEXT NOT NULL, config TEXT NOT NULL, created_ms INTEGER NOT NULL, UNIQUE (tenant_id, name));
CREATE TABLE alert_rules (id INTEGER PRIMARY KEY AUTOINCREMENT, tenant_id INTEGER NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
  name TEXT NOT NULL, enabled INTEGER NOT NULL DEFAULT 1, spec TEXT NOT NULL, created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
  UNIQUE (tenant_id, name));
CREATE TABLE alerts (id INTEGER PRIMARY KEY AUTOINCREMENT, tenant_id INTEGER NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
  rule_id INTEGER NOT NULL REFERENCES alert_rules(id) ON DELETE CASCADE, rule_name TEXT NOT NULL,
  device_id INTEGER NOT NULL REFERENCES devices(id) ON DELETE CASCADE, device_number TEXT NOT NULL, severity TEXT NOT NULL,
  status TEXT NOT NULL, message TEXT NOT NULL, since_ms INTEGER NOT NULL, raised_ms INTEGER NOT NULL, acked_ms INTEGER, acked_by TEXT,
  cleared_ms INTEGER, open INTEGER);
CREATE UNIQUE INDEX alerts_open ON alerts (rule_id, device_id, open);
CREATE INDEX alerts_tenant ON alerts (tenant_id, id)
"#,
    r#"
CREATE TABLE ota_packages (id INTEGER PRIMARY KEY AUTOINCREMENT, tenant_id INTEGER NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
  kind TEXT NOT NULL, title TEXT NOT NULL, version TEXT NOT NULL, size INTEGER NOT NULL, checksum TEXT NOT NULL,
  checksum_algorithm TEXT NOT NULL, data BLOB NOT NULL, created_ms INTEGER NOT NULL, UNIQUE (tenant_id, kind, title, version))
"#,
];

const POSTGRES: &[&str] = &[
    r#"
CREATE TABLE tenants (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, name TEXT NOT NULL UNIQUE, created_ms BIGINT NOT NULL);
CREATE TABLE products (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, tenant_id BIGINT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
  name TEXT NOT NULL, strict BIGINT NOT NULL DEFAULT 0, model TEXT NOT NULL, created_ms BIGINT NOT NULL, UNIQUE (tenant_id, name));
CREATE TABLE device_groups (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, tenant_id BIGINT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
  name TEXT NOT NULL, parent_id BIGINT REFERENCES device_groups(id) ON DELETE SET NULL, created_ms BIGINT NOT NULL, UNIQUE (tenant_id, name));
CREATE TABLE devices (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, tenant_id BIGINT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
  device_number TEXT NOT NULL UNIQUE, name TEXT NOT NULL, product_id BIGINT REFERENCES products(id) ON DELETE SET NULL,
  group_id BIGINT REFERENCES device_groups(id) ON DELETE SET NULL, labels TEXT NOT NULL DEFAULT '{}',
  gateway_id BIGINT REFERENCES devices(id) ON DELETE SET NULL, sub_address TEXT, enabled BIGINT NOT NULL DEFAULT 1,
  created_ms BIGINT NOT NULL, updated_ms BIGINT NOT NULL, UNIQUE (gateway_id, sub_address));
CREATE TABLE credentials (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
  kind TEXT NOT NULL, identity TEXT NOT NULL, secret TEXT, created_ms BIGINT NOT NULL, UNIQUE (kind, identity));
CREATE TABLE attributes (device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE, scope TEXT NOT NULL, key TEXT NOT NULL,
  value TEXT NOT NULL, updated_ms BIGINT NOT NULL, PRIMARY KEY (device_id, scope, key));
CREATE TABLE commands (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
  message_id TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, method TEXT, payload TEXT NOT NULL, status TEXT NOT NULL,
  created_ms BIGINT NOT NULL, expires_ms BIGINT NOT NULL, sent_ms BIGINT, done_ms BIGINT, response TEXT);
CREATE INDEX commands_open ON commands (device_id, status);
CREATE TABLE api_keys (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, name TEXT NOT NULL, key_hash TEXT NOT NULL UNIQUE, created_ms BIGINT NOT NULL);
INSERT INTO tenants (name, created_ms) VALUES ('default', 0)
"#,
    r#"
CREATE TABLE telemetry_policies (scope TEXT NOT NULL, scope_id BIGINT NOT NULL, rules TEXT NOT NULL DEFAULT '[]',
  raw_days BIGINT NOT NULL DEFAULT 0, updated_ms BIGINT NOT NULL, PRIMARY KEY (scope, scope_id))
"#,
    r#"
CREATE TABLE roles (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, tenant_id BIGINT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
  name TEXT NOT NULL, permissions TEXT NOT NULL, created_ms BIGINT NOT NULL, UNIQUE (tenant_id, name));
CREATE TABLE users (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, tenant_id BIGINT REFERENCES tenants(id) ON DELETE CASCADE,
  username TEXT NOT NULL UNIQUE, password_hash TEXT NOT NULL, role TEXT NOT NULL, role_id BIGINT REFERENCES roles(id),
  disabled BIGINT NOT NULL DEFAULT 0, revoked_before_ms BIGINT NOT NULL DEFAULT 0, created_ms BIGINT NOT NULL, updated_ms BIGINT NOT NULL);
CREATE TABLE audit_log (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, tenant_id BIGINT, actor TEXT NOT NULL, action TEXT NOT NULL,
  target TEXT NOT NULL, detail TEXT NOT NULL, at_ms BIGINT NOT NULL);
CREATE INDEX audit_tenant ON audit_log (tenant_id, id);
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)
"#,
    r#"
CREATE TABLE channels (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, tenant_id BIGINT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
  name TEXT NOT NULL, kind TEXT NOT NULL, config TEXT NOT NULL, created_ms BIGINT NOT NULL, UNIQUE (tenant_id, name));
CREATE TABLE alert_rules (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, tenant_id BIGINT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
  name TEXT NOT NULL, enabled BIGINT NOT NULL DEFAULT 1, spec TEXT NOT NULL, created_ms BIGINT NOT NULL, updated_ms BIGINT NOT NULL,
  UNIQUE (tenant_id, name));
CREATE TABLE alerts (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, tenant_id BIGINT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
  rule_id BIGINT NOT NULL REFERENCES alert_rules(id) ON DELETE CASCADE, rule_name TEXT NOT NULL,
  device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE, device_number TEXT NOT NULL, severity TEXT NOT NULL,
  status TEXT NOT NULL, message TEXT NOT NULL, since_ms BIGINT NOT NULL, raised_ms BIGINT NOT NULL, acked_ms BIGINT, acked_by TEXT,
  cleared_ms BIGINT, open BIGINT);
CREATE UNIQUE INDEX alerts_open ON alerts (rule_id, device_id, open);
CREATE INDEX alerts_tenant ON alerts (tenant_id, id)
"#,
    r#"
CREATE TABLE ota_packages (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, tenant_id BIGINT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
  kind TEXT NOT NULL, title TEXT NOT NULL, version TEXT NOT NULL, size BIGINT NOT NULL, checksum TEXT NOT NULL,
  checksum_algorithm TEXT NOT NULL, data BYTEA NOT NULL, created_ms BIGINT NOT NULL, UNIQUE (tenant_id, kind, title, version))
"#,
];

const LOCK_KEY: i64 = 0x7468_696e_6773; // "things"

pub(super) async fn run(store: &MetaStore) -> Result<()> {
    let list = match store.backend {
        Backend::Sqlite => SQLITE,
        Backend::Postgres => POSTGRES,
    };
    let mut conn = store.pool.acquire().await?;
    if store.backend == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_lock($1)").bind(LOCK_KEY).execute(&mut *conn).await?;
    }
    let result = async {
        sqlx::query("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_ms BIGINT NOT NULL)")
            .execute(&mut *conn)
            .await?;
        let done: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM schema_migrations").fetch_one(&mut *conn).await?;
        let done = done.unwrap_or(0);
        if done > list.len() as i64 {
            return Err(super::MetaError::Invalid(format!(
                "the meta database is at schema version {done}, newer than this binary's {}; upgrade thingsd",
                list.len()
            )));
        }
        for (i, sql) in list.iter().enumerate().skip(done as usize) {
            let version = i as i64 + 1;
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            // Statements one by one: not every driver runs a multi-statement string in a prepared query.
            for stmt in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                sqlx::query(stmt).execute(&mut *tx).await?;
            }
            sqlx::query("INSERT INTO schema_migrations (version, applied_ms) VALUES ($1, $2)")
                .bind(version)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            tracing::info!(version, backend = ?store.backend, "meta store migrated");
        }
        Ok(())
    }
    .await;
    if store.backend == Backend::Postgres {
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)").bind(LOCK_KEY).execute(&mut *conn).await;
    }
    result
}
