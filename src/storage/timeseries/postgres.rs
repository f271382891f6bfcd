//! PostgreSQL time-series backend: `ts_points` partitioned by day on `ts` (native declarative
//! partitioning, created on demand; a TimescaleDB hypertable instead when that extension is
//! installed in the database), `ts_latest` with the latest value of every series. Batches go
//! in as one multi-row `INSERT … SELECT FROM UNNEST(arrays)` per table in one transaction
//! (idempotent: a repeated (device, key, ts) replaces the value). Retention drops whole
//! partitions. Aggregates run in SQL with the same bucket rules as the embedded store.
use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use chrono_tz::Tz;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Row};

use super::{AggQuery, Bucket, Func, Page, Point, RangeQuery, TimeSeriesStore, TsError, Value, Window, MAX_PAGE};

const DAY_MS: i64 = 86_400_000;
/// Rows per INSERT statement.
const CHUNK: usize = 10_000;

pub struct PgStore {
    pool: PgPool,
    /// Table name prefix: `ts_` (raw points) or `ts_rollup_` (hourly roll-ups).
    prefix: String,
    insert_points: String,
    upsert_latest: String,
    timescale: bool,
    /// Day partitions known to exist.
    parts: Mutex<HashSet<i64>>,
}

fn part_name(prefix: &str, day: i64) -> String {
    if day < 0 {
        format!("{prefix}points_pm{}", -day)
    } else {
        format!("{prefix}points_p{day}")
    }
}

fn day_of_name(prefix: &str, name: &str) -> Option<i64> {
    let d = name.strip_prefix(prefix)?.strip_prefix("points_p")?;
    match d.strip_prefix('m') {
        Some(neg) => neg.parse::<i64>().ok().map(|n| -n),
        None => d.parse().ok(),
    }
}

fn split(v: &Value) -> (i16, Option<f64>, Option<String>) {
    match v {
        Value::Number(x) => (0, Some(*x), None),
        Value::Bool(b) => (1, Some(*b as u8 as f64), None),
        Value::Text(s) => (2, None, Some(s.clone())),
        Value::Json(s) => (3, None, Some(s.clone())),
    }
}

fn join(kind: i16, num: Option<f64>, txt: Option<String>) -> Value {
    match kind {
        0 => Value::Number(num.unwrap_or(f64::NAN)),
        1 => Value::Bool(num.unwrap_or(0.0) != 0.0),
        3 => Value::Json(txt.unwrap_or_default()),
        _ => Value::Text(txt.unwrap_or_default()),
    }
}

fn point_of(r: &sqlx::postgres::PgRow) -> Result<Point, sqlx::Error> {
    Ok(Point {
        device_id: r.try_get("device_id")?,
        key: r.try_get("key")?,
        ts: r.try_get("ts")?,
        value: join(r.try_get("kind")?, r.try_get("num")?, r.try_get("txt")?),
    })
}

/// SQL for the start of the bucket holding `ts` (bigint ms), as `aggregate::bucket_start`.
/// `$tz` is the bind parameter holding the zone name.
pub fn bucket_sql(w: Window, tz: Tz, tz_param: &str) -> String {
    let local = "to_timestamp(ts / 1000.0)";
    match w {
        Window::Fixed(ms) if tz == Tz::UTC => format!("(ts - mod(mod(ts, {ms}) + {ms}, {ms}))"),
        Window::Fixed(ms) => {
            let off = format!("(round(extract(epoch from ({local} AT TIME ZONE {tz_param})) * 1000)::bigint - ts)");
            format!("(ts - mod(mod(ts + {off}, {ms}) + {ms}, {ms}))")
        }
        Window::Day | Window::Week | Window::Month => {
            let unit = match w {
                Window::Day => "day",
                Window::Week => "week",
                _ => "month",
            };
            format!("(round(extract(epoch from date_trunc('{unit}', {local}, {tz_param})) * 1000)::bigint)")
        }
    }
}

/// SQL for an aggregate over `num` (NULL for text/JSON) ordered by `ts`.
pub fn func_sql(f: Func) -> &'static str {
    match f {
        Func::Avg => "avg(num)",
        Func::Min => "min(num)",
        Func::Max => "max(num)",
        Func::Sum => "sum(num)",
        Func::Count => "count(*)::float8",
        Func::First => "(array_agg(num ORDER BY ts) FILTER (WHERE num IS NOT NULL))[1]",
        Func::Last => "(array_agg(num ORDER BY ts DESC) FILTER (WHERE num IS NOT NULL))[1]",
        Func::Diff => {
            "((array_agg(num ORDER BY ts DESC) FILTER (WHERE num IS NOT NULL))[1] - (array_agg(num ORDER BY ts) FILTER (WHERE num IS NOT NULL))[1])"
        }
    }
}

impl PgStore {
    /// Connect and create the tables (idempotent; nodes starting together serialise on an
    /// advisory lock).
    pub async fn open(url: &str, max_connections: u32) -> Result<PgStore, TsError> {
        PgStore::open_prefixed(url, max_connections, "ts_").await
    }

    /// The same over tables named `{prefix}points` and `{prefix}latest` (letters and `_` only).
    pub async fn open_prefixed(url: &str, max_connections: u32, prefix: &str) -> Result<PgStore, TsError> {
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            return Err(TsError::BadQuery(format!("bad table prefix {prefix:?}")));
        }
        let p = prefix;
        let pool = PgPoolOptions::new().max_connections(max_connections.max(1)).connect(url).await?;
        let timescale: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')").fetch_one(&pool).await?;
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(7158234)").execute(&mut *tx).await?;
        let cols =
            "device_id BIGINT NOT NULL, key TEXT NOT NULL, ts BIGINT NOT NULL, kind SMALLINT NOT NULL, num DOUBLE PRECISION, txt TEXT";
        let points = if timescale {
            format!("CREATE TABLE IF NOT EXISTS {p}points ({cols}, PRIMARY KEY (device_id, key, ts))")
        } else {
            format!("CREATE TABLE IF NOT EXISTS {p}points ({cols}, PRIMARY KEY (device_id, key, ts)) PARTITION BY RANGE (ts)")
        };
        sqlx::query(AssertSqlSafe(points)).execute(&mut *tx).await?;
        sqlx::query(AssertSqlSafe(format!("CREATE TABLE IF NOT EXISTS {p}latest ({cols}, PRIMARY KEY (device_id, key))")))
            .execute(&mut *tx)
            .await?;
        if timescale {
            sqlx::query(AssertSqlSafe(format!("SELECT create_hypertable('{p}points', by_range('ts', 86400000), if_not_exists => true)")))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(PgStore {
            pool,
            prefix: p.to_string(),
            insert_points: INSERT_POINTS.replace("ts_points", &format!("{p}points")),
            upsert_latest: UPSERT_LATEST.replace("ts_latest", &format!("{p}latest")),
            timescale,
            parts: Mutex::new(HashSet::new()),
        })
    }

    async fn ensure_partitions(&self, days: impl Iterator<Item = i64>) -> Result<(), TsError> {
        if self.timescale {
            return Ok(());
        }
        let missing: Vec<i64> = {
            let known = self.parts.lock().unwrap_or_else(|p| p.into_inner());
            days.filter(|d| !known.contains(d)).collect::<HashSet<_>>().into_iter().collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(7158235)").execute(&mut *tx).await?;
        for d in &missing {
            let sql = format!(
                "CREATE TABLE IF NOT EXISTS {} PARTITION OF {}points FOR VALUES FROM ({}) TO ({})",
                part_name(&self.prefix, *d),
                self.prefix,
                d * DAY_MS,
                (d + 1) * DAY_MS
            );
            sqlx::query(AssertSqlSafe(sql)).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        self.parts.lock().unwrap_or_else(|p| p.into_inner()).extend(missing);
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), TsError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn partitions(&self) -> Result<Vec<(i64, String)>, TsError> {
        let rows = sqlx::query(
            "SELECT c.relname::text AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = $1",
        )
        .bind(format!("{}points", self.prefix))
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::new();
        for r in rows {
            let name: String = r.try_get("name")?;
            if let Some(d) = day_of_name(&self.prefix, &name) {
                out.push((d, name));
            }
        }
        Ok(out)
    }
}

/// Column arrays of a batch for `UNNEST`.
#[derive(Default)]
struct Cols {
    device: Vec<i64>,
    key: Vec<String>,
    ts: Vec<i64>,
    kind: Vec<i16>,
    num: Vec<Option<f64>>,
    txt: Vec<Option<String>>,
}

impl Cols {
    fn push(&mut self, device: i64, key: &str, ts: i64, v: &Value) {
        let (k, n, t) = split(v);
        self.device.push(device);
        self.key.push(key.to_string());
        self.ts.push(ts);
        self.kind.push(k);
        self.num.push(n);
        self.txt.push(t);
    }

    async fn insert(self, tx: &mut sqlx::PgConnection, sql: &str) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(sql))
            .bind(self.device)
            .bind(self.key)
            .bind(self.ts)
            .bind(self.kind)
            .bind(self.num)
            .bind(self.txt)
            .execute(tx)
            .await?;
        Ok(())
    }
}

const INSERT_POINTS: &str = "INSERT INTO ts_points (device_id, key, ts, kind, num, txt) \
    SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::bigint[], $4::smallint[], $5::float8[], $6::text[]) \
    ON CONFLICT (device_id, key, ts) DO UPDATE SET kind = EXCLUDED.kind, num = EXCLUDED.num, txt = EXCLUDED.txt";
const UPSERT_LATEST: &str = "INSERT INTO ts_latest (device_id, key, ts, kind, num, txt) \
    SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::bigint[], $4::smallint[], $5::float8[], $6::text[]) \
    ON CONFLICT (device_id, key) DO UPDATE SET ts = EXCLUDED.ts, kind = EXCLUDED.kind, num = EXCLUDED.num, txt = EXCLUDED.txt \
    WHERE ts_latest.ts <= EXCLUDED.ts";

impl TimeSeriesStore for PgStore {
    async fn write_batch(&self, points: Vec<Point>) -> Result<(), TsError> {
        if points.is_empty() {
            return Ok(());
        }
        // One row per (device, key, ts), the last write winning (a statement may not touch a
        // row twice), and the latest point per series.
        let mut rows: BTreeMap<(i64, &str, i64), &Value> = BTreeMap::new();
        let mut latest: BTreeMap<(i64, &str), (i64, &Value)> = BTreeMap::new();
        for p in &points {
            rows.insert((p.device_id, &p.key, p.ts), &p.value);
            let l = latest.entry((p.device_id, &p.key)).or_insert((p.ts, &p.value));
            if p.ts >= l.0 {
                *l = (p.ts, &p.value);
            }
        }
        self.ensure_partitions(rows.keys().map(|(_, _, ts)| ts.div_euclid(DAY_MS))).await?;
        let mut tx = self.pool.begin().await?;
        let rows: Vec<_> = rows.into_iter().collect();
        for chunk in rows.chunks(CHUNK) {
            let mut c = Cols::default();
            for ((d, k, ts), v) in chunk {
                c.push(*d, k, *ts, v);
            }
            c.insert(&mut tx, &self.insert_points).await?;
        }
        let latest: Vec<_> = latest.into_iter().collect();
        for chunk in latest.chunks(CHUNK) {
            let mut c = Cols::default();
            for ((d, k), (ts, v)) in chunk {
                c.push(*d, k, *ts, v);
            }
            c.insert(&mut tx, &self.upsert_latest).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn flush(&self) -> Result<(), TsError> {
        Ok(())
    }

    async fn latest(&self, devices: &[i64]) -> Result<Vec<Point>, TsError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT device_id, key, ts, kind, num, txt FROM {}latest WHERE device_id = ANY($1) ORDER BY device_id, key COLLATE \"C\"",
            self.prefix
        )))
        .bind(devices.to_vec())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(point_of).collect::<Result<_, _>>()?)
    }

    async fn range(&self, q: &RangeQuery) -> Result<Page, TsError> {
        let limit = q.limit.clamp(1, MAX_PAGE);
        let (after_ts, after_key) = q.after.as_ref().map_or((i64::MIN, String::new()), |c| (c.ts, c.key.clone()));
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT device_id, key, ts, kind, num, txt FROM {}points \
             WHERE device_id = $1 AND ts >= $2 AND ts < $3 AND (cardinality($4::text[]) = 0 OR key = ANY($4)) \
             AND (ts > $5 OR (ts = $5 AND key COLLATE \"C\" > $6)) \
             ORDER BY ts, key COLLATE \"C\" LIMIT $7",
            self.prefix
        )))
        .bind(q.device_id)
        .bind(q.from)
        .bind(q.to)
        .bind(q.keys.clone())
        .bind(after_ts)
        .bind(after_key)
        .bind(limit as i64 + 1)
        .fetch_all(&self.pool)
        .await?;
        let points = rows.iter().map(point_of).collect::<Result<Vec<_>, _>>()?;
        // Already sorted and past the cursor: page_of only cuts.
        Ok(super::page_of(points, &RangeQuery { after: None, ..q.clone() }))
    }

    async fn aggregate(&self, q: &AggQuery) -> Result<Vec<Bucket>, TsError> {
        let sql = format!(
            "SELECT device_id, start, {f} AS value FROM (SELECT device_id, {b} AS start, ts, num FROM {p}points \
             WHERE device_id = ANY($1) AND key = $2 AND ts >= $3 AND ts < $4) x \
             GROUP BY device_id, start {having} ORDER BY device_id, start",
            f = func_sql(q.func),
            b = bucket_sql(q.window, q.tz, "$5::text"),
            having = if q.func == Func::Count { "" } else { "HAVING count(num) > 0" },
            p = self.prefix,
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(q.devices.clone())
            .bind(&q.key)
            .bind(q.from)
            .bind(q.to)
            .bind(q.tz.name())
            .fetch_all(&self.pool)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(Bucket { device_id: r.try_get("device_id")?, start: r.try_get("start")?, value: r.try_get("value")? });
        }
        Ok(out)
    }

    async fn apply_retention(&self, cutoff: i64) -> Result<u64, TsError> {
        let mut n = 0;
        if self.timescale {
            sqlx::query(AssertSqlSafe(format!("SELECT drop_chunks('{}points', older_than => $1::bigint)", self.prefix)))
                .bind(cutoff.div_euclid(DAY_MS) * DAY_MS)
                .execute(&self.pool)
                .await?;
        } else {
            for (day, name) in self.partitions().await? {
                if (day + 1) * DAY_MS <= cutoff {
                    sqlx::query(AssertSqlSafe(format!("DROP TABLE IF EXISTS {name}"))).execute(&self.pool).await?;
                    self.parts.lock().unwrap_or_else(|p| p.into_inner()).remove(&day);
                    n += 1;
                }
            }
        }
        sqlx::query(AssertSqlSafe(format!("DELETE FROM {}latest WHERE ts < $1", self.prefix))).bind(cutoff).execute(&self.pool).await?;
        Ok(n)
    }

    async fn delete_before(&self, devices: &[i64], cutoff: i64) -> Result<u64, TsError> {
        let p = &self.prefix;
        let r = sqlx::query(AssertSqlSafe(format!("DELETE FROM {p}points WHERE device_id = ANY($1) AND ts < $2")))
            .bind(devices.to_vec())
            .bind(cutoff)
            .execute(&self.pool)
            .await?;
        sqlx::query(AssertSqlSafe(format!("DELETE FROM {p}latest WHERE device_id = ANY($1) AND ts < $2")))
            .bind(devices.to_vec())
            .bind(cutoff)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected())
    }

    async fn disk_bytes(&self) -> Result<u64, TsError> {
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT (coalesce(sum(pg_total_relation_size(c.oid)), 0) + pg_total_relation_size('{p}latest'))::bigint \
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = '{p}points'",
            p = self.prefix
        )))
        .fetch_one(&self.pool)
        .await?;
        Ok(n as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_round_trip() {
        for d in [-3, 0, 20_000] {
            assert_eq!(day_of_name("ts_", &part_name("ts_", d)), Some(d));
            assert_eq!(day_of_name("ts_rollup_", &part_name("ts_rollup_", d)), Some(d));
        }
        assert_eq!(day_of_name("ts_", "ts_latest"), None);
        assert_eq!(day_of_name("ts_", "ts_rollup_points_p3"), None);
        assert!(bucket_sql(Window::Fixed(60_000), Tz::UTC, "$5").contains("mod(ts, 60000)"));
        assert!(bucket_sql(Window::Day, "Europe/Berlin".parse().unwrap(), "$5").contains("date_trunc('day'"));
    }
}
