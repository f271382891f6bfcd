//! TDengine backend over the `taos` WebSocket connector (`taos+ws://user:pass@host:6041/db`).
//!
//! Model: a super table `t_{product}` per product with a tag `device`; a sub-table per device
//! (created by schemaless ingestion, named from the tags); one column per key *and value
//! kind*: `n_…` numbers, `b_…` booleans, `s_…` strings, `j_…` JSON text, so a key that changes
//! type never conflicts. Key names are encoded into TDengine's case-insensitive identifiers
//! (`[a-z0-9]` kept, every other byte `_xx` hex), so `Env.Temp` and `env.temp` stay apart;
//! keys whose column name would exceed 64 bytes are refused. Points go in as InfluxDB line
//! protocol (ms precision), one line per (device, ts). Retention is the database's `KEEP`.
//! Aggregates use `INTERVAL` with `PARTITION BY device`.
//!
//! Not verified against a server: none can be installed on the machines this was built on.
//! The statement and line generation is unit-tested; the conformance suite runs against a
//! server only when `TAOS_DSN` is set.
use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;

use taos::{AsyncFetchable, AsyncQueryable, AsyncTBuilder};

use super::{AggQuery, Bucket, Func, Page, Point, RangeQuery, TimeSeriesStore, TsError, Value, Window, MAX_PAGE};

const MAX_COLUMN: usize = 64;

pub struct TdStore {
    taos: taos::Taos,
    db: String,
    /// Device → product (the super table); the telemetry service fills it.
    products: RwLock<HashMap<i64, i64>>,
}

fn err(e: impl std::fmt::Display) -> TsError {
    TsError::Db(format!("tdengine: {e}"))
}

/// Column name of a key of a value kind, or None when it would be too long.
pub fn column(kind: char, key: &str) -> Option<String> {
    let mut c = String::with_capacity(key.len() + 2);
    c.push(kind);
    c.push('_');
    for b in key.bytes() {
        if b.is_ascii_lowercase() || b.is_ascii_digit() {
            c.push(b as char);
        } else {
            c.push_str(&format!("_{b:02x}"));
        }
    }
    (c.len() <= MAX_COLUMN).then_some(c)
}

/// The key and kind of a column name (inverse of [`column`]).
pub fn key_of(column: &str) -> Option<(char, String)> {
    let mut chars = column.chars();
    let kind = chars.next().filter(|k| "nbsj".contains(*k))?;
    let rest = column.get(2..).filter(|_| column.as_bytes().get(1) == Some(&b'_'))?;
    let b = rest.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'_' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some((kind, String::from_utf8(out).ok()?))
}

fn kind_char(v: &Value) -> char {
    match v {
        Value::Number(_) => 'n',
        Value::Bool(_) => 'b',
        Value::Text(_) => 's',
        Value::Json(_) => 'j',
    }
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Line-protocol lines for points (one per device and timestamp; numbers as DOUBLE, `t`/`f`,
/// quoted strings); points whose key cannot be a column are returned apart.
pub fn lines(points: &[Point], product_of: impl Fn(i64) -> i64) -> (Vec<String>, Vec<&Point>) {
    let mut rows: BTreeMap<(i64, i64), Vec<(String, String)>> = BTreeMap::new();
    let mut refused = Vec::new();
    for p in points {
        let Some(col) = column(kind_char(&p.value), &p.key) else {
            refused.push(p);
            continue;
        };
        let v = match &p.value {
            Value::Number(x) if x.is_finite() => format!("{x:?}"),
            Value::Number(_) => {
                refused.push(p);
                continue;
            }
            Value::Bool(b) => if *b { "t" } else { "f" }.to_string(),
            Value::Text(s) | Value::Json(s) => quote(s),
        };
        let fields = rows.entry((p.device_id, p.ts)).or_default();
        // A later write of the same key and time replaces the earlier one.
        fields.retain(|(c, _)| *c != col);
        fields.push((col, v));
    }
    let out = rows
        .into_iter()
        .map(|((device, ts), fields)| {
            let f: Vec<String> = fields.into_iter().map(|(c, v)| format!("{c}={v}")).collect();
            format!("t_{},device={device} {} {ts}", product_of(device), f.join(","))
        })
        .collect();
    (out, refused)
}

/// The aggregate statement of `q` over super table `t_{product}` for column `col`.
pub fn aggregate_sql(q: &AggQuery, product: i64, col: &str) -> String {
    let f = match q.func {
        Func::Avg => format!("AVG(`{col}`)"),
        Func::Min => format!("MIN(`{col}`)"),
        Func::Max => format!("MAX(`{col}`)"),
        Func::Sum => format!("SUM(`{col}`)"),
        Func::Count => format!("COUNT(`{col}`)"),
        Func::First => format!("FIRST(`{col}`)"),
        Func::Last => format!("LAST(`{col}`)"),
        Func::Diff => format!("LAST(`{col}`) - FIRST(`{col}`)"),
    };
    let interval = match q.window {
        Window::Fixed(ms) => format!("INTERVAL({ms}a)"),
        Window::Day => "INTERVAL(1d)".into(),
        Window::Week => "INTERVAL(1w)".into(),
        Window::Month => "INTERVAL(1n)".into(),
    };
    let devices: Vec<String> = q.devices.iter().map(|d| format!("'{d}'")).collect();
    format!(
        "SELECT _wstart, device, {f} FROM t_{product} WHERE device IN ({}) AND ts >= {} AND ts < {} PARTITION BY device {interval}",
        devices.join(","),
        q.from,
        q.to
    )
}

impl TdStore {
    /// Connect (`taos+ws://…/db`), create the database (ms precision, `KEEP` days) if needed.
    pub async fn open(dsn: &str, keep_days: u32) -> Result<TdStore, TsError> {
        let parsed = taos::Dsn::try_from(dsn).map_err(err)?;
        let db = parsed.subject.clone().filter(|s| !s.is_empty()).unwrap_or_else(|| "thingsd".into());
        if !db.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(TsError::BadQuery(format!("tdengine database name {db:?}: letters, digits and _ only")));
        }
        let taos = taos::TaosBuilder::from_dsn(dsn).map_err(err)?.build().await.map_err(err)?;
        taos.exec(format!("CREATE DATABASE IF NOT EXISTS {db} PRECISION 'ms' KEEP {}", keep_days.max(1))).await.map_err(err)?;
        taos.exec(format!("USE {db}")).await.map_err(err)?;
        Ok(TdStore { taos, db, products: RwLock::new(HashMap::new()) })
    }

    pub async fn ping(&self) -> Result<(), TsError> {
        self.taos.exec("SELECT SERVER_VERSION()").await.map_err(err)?;
        Ok(())
    }

    pub fn note_product(&self, device: i64, product: i64) {
        self.products.write().unwrap_or_else(|p| p.into_inner()).insert(device, product);
    }

    fn product_of(&self, device: i64) -> i64 {
        self.products.read().unwrap_or_else(|p| p.into_inner()).get(&device).copied().unwrap_or(0)
    }

    async fn rows(&self, sql: String) -> Result<(Vec<String>, Vec<Vec<taos::Value>>), TsError> {
        let mut rs = match self.taos.query(sql).await {
            Ok(rs) => rs,
            // A product with no data yet has no super table.
            Err(e) if e.to_string().contains("Table does not exist") => return Ok((vec![], vec![])),
            Err(e) => return Err(err(e)),
        };
        let names = rs.fields().iter().map(|f| f.name().to_string()).collect();
        let rows = rs.to_records().await.map_err(err)?;
        Ok((names, rows))
    }
}

fn ms_of(v: &taos::Value) -> Option<i64> {
    match v {
        taos::Value::Timestamp(t) => Some(t.cast_precision(taos::Precision::Millisecond).as_raw_i64()),
        taos::Value::BigInt(n) => Some(*n),
        _ => None,
    }
}

fn value_of(kind: char, v: &taos::Value) -> Option<Value> {
    use taos::Value as T;
    Some(match (kind, v) {
        (_, T::Null(_)) => return None,
        ('n', T::Double(x)) => Value::Number(*x),
        ('n', T::Float(x)) => Value::Number(*x as f64),
        ('n', T::BigInt(x)) => Value::Number(*x as f64),
        ('b', T::Bool(b)) => Value::Bool(*b),
        ('s', T::VarChar(s) | T::NChar(s)) => Value::Text(s.clone()),
        ('j', T::VarChar(s) | T::NChar(s)) => Value::Json(s.clone()),
        _ => return None,
    })
}

fn f64_of(v: &taos::Value) -> Option<f64> {
    use taos::Value as T;
    match v {
        T::Double(x) => Some(*x),
        T::Float(x) => Some(*x as f64),
        T::BigInt(x) => Some(*x as f64),
        T::Int(x) => Some(*x as f64),
        T::UBigInt(x) => Some(*x as f64),
        T::Bool(b) => Some(*b as u8 as f64),
        _ => None,
    }
}

impl TimeSeriesStore for TdStore {
    async fn write_batch(&self, points: Vec<Point>) -> Result<(), TsError> {
        let (data, refused) = lines(&points, |d| self.product_of(d));
        if !refused.is_empty() {
            tracing::warn!(count = refused.len(), first = %refused[0].key, "keys too long for a TDengine column (or not finite): not stored");
        }
        if data.is_empty() {
            return Ok(());
        }
        let sml = taos::taos_query::common::SmlDataBuilder::default()
            .protocol(taos::taos_query::common::SchemalessProtocol::Line)
            .precision(taos::taos_query::common::SchemalessPrecision::Millisecond)
            .data(data)
            .build()
            .map_err(err)?;
        self.taos.put(&sml).await.map_err(err)
    }

    async fn flush(&self) -> Result<(), TsError> {
        Ok(())
    }

    async fn latest(&self, devices: &[i64]) -> Result<Vec<Point>, TsError> {
        let mut out = Vec::new();
        for d in devices {
            let (names, rows) = self.rows(format!("SELECT LAST_ROW(*) FROM t_{} WHERE device = '{d}'", self.product_of(*d))).await?;
            let Some(row) = rows.first() else { continue };
            let ts = names.iter().position(|n| n.contains("ts")).and_then(|i| ms_of(&row[i])).unwrap_or(0);
            for (n, v) in names.iter().zip(row) {
                let col = n.trim_start_matches("last_row(").trim_end_matches(')');
                if let Some((kind, key)) = key_of(col) {
                    if let Some(value) = value_of(kind, v) {
                        out.push(Point { device_id: *d, key, ts, value });
                    }
                }
            }
        }
        out.sort_by(|a, b| (a.device_id, &a.key).cmp(&(b.device_id, &b.key)));
        Ok(out)
    }

    async fn range(&self, q: &RangeQuery) -> Result<Page, TsError> {
        let limit = q.limit.clamp(1, MAX_PAGE);
        let from = q.after.as_ref().map_or(q.from, |c| c.ts.max(q.from));
        let sql = format!(
            "SELECT * FROM t_{} WHERE device = '{}' AND ts >= {from} AND ts < {} ORDER BY ts LIMIT {}",
            self.product_of(q.device_id),
            q.device_id,
            q.to,
            limit + 1
        );
        let (names, rows) = self.rows(sql).await?;
        let mut pts = Vec::new();
        for row in rows {
            let Some(ts) = row.first().and_then(ms_of) else { continue };
            for (n, v) in names.iter().zip(&row) {
                if let Some((kind, key)) = key_of(n) {
                    if !q.keys.is_empty() && !q.keys.contains(&key) {
                        continue;
                    }
                    if let Some(value) = value_of(kind, v) {
                        pts.push(Point { device_id: q.device_id, key, ts, value });
                    }
                }
            }
        }
        Ok(super::page_of(pts, q))
    }

    async fn aggregate(&self, q: &AggQuery) -> Result<Vec<Bucket>, TsError> {
        let mut by_product: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
        for d in &q.devices {
            by_product.entry(self.product_of(*d)).or_default().push(*d);
        }
        let Some(col) = column('n', &q.key) else { return Err(TsError::BadQuery("key too long".into())) };
        let mut out = Vec::new();
        for (product, devices) in by_product {
            let sub = AggQuery { devices, ..q.clone() };
            let (_, rows) = self.rows(aggregate_sql(&sub, product, &col)).await?;
            for r in rows {
                let (Some(start), Some(dev), Some(value)) = (r.first().and_then(ms_of), r.get(1), r.get(2).and_then(f64_of)) else {
                    continue;
                };
                let device_id = match dev {
                    taos::Value::VarChar(s) | taos::Value::NChar(s) => s.parse().unwrap_or(0),
                    other => f64_of(other).unwrap_or(0.0) as i64,
                };
                out.push(Bucket { device_id, start, value });
            }
        }
        Ok(out)
    }

    async fn apply_retention(&self, cutoff: i64) -> Result<u64, TsError> {
        let days = ((crate::storage::meta::now_ms() - cutoff) / 86_400_000).max(1);
        self.taos.exec(format!("ALTER DATABASE {} KEEP {days}", self.db)).await.map_err(err)?;
        Ok(0)
    }

    async fn delete_before(&self, devices: &[i64], cutoff: i64) -> Result<u64, TsError> {
        let mut n = 0;
        for d in devices {
            let sql = format!("DELETE FROM t_{} WHERE device = '{d}' AND ts < {cutoff}", self.product_of(*d));
            n += self.taos.exec(sql).await.map_err(err)? as u64;
        }
        Ok(n)
    }

    async fn disk_bytes(&self) -> Result<u64, TsError> {
        // TDengine reports sizes per vnode (SHOW {db}.DISK_INFO, 3.1+); not summed here.
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_encode_keys_reversibly_and_case_apart() {
        for key in ["temp", "env.Temp", "a_b", "ünï", "x-1 y"] {
            let c = column('n', key).unwrap();
            assert!(c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'), "{c}");
            assert_eq!(key_of(&c), Some(('n', key.to_string())));
        }
        assert_ne!(column('n', "Temp"), column('n', "temp"));
        assert_eq!(column('n', &"k".repeat(62)).map(|c| c.len()), Some(64));
        assert_eq!(column('n', &"k".repeat(63)), None);
        assert_eq!(key_of("ts"), None);
        assert_eq!(key_of("device"), None);
    }

    #[test]
    fn line_protocol_groups_by_device_and_time() {
        let p = |d, k: &str, ts, v| Point { device_id: d, key: k.into(), ts, value: v };
        let pts = vec![
            p(1, "temp", 1000, Value::Number(21.5)),
            p(1, "door", 1000, Value::Bool(true)),
            p(1, "mode", 1000, Value::Text("say \"hi\"\\".into())),
            p(2, "temp", 1000, Value::Number(3.0)),
            p(1, "temp", 1000, Value::Number(22.0)),
            p(1, &"k".repeat(100), 1000, Value::Number(1.0)),
        ];
        let (lines, refused) = lines(&pts, |d| d * 10);
        assert_eq!(refused.len(), 1);
        assert_eq!(
            lines,
            vec![
                r#"t_10,device=1 b_door=t,s_mode="say \"hi\"\\",n_temp=22.0 1000"#.to_string(),
                "t_20,device=2 n_temp=3.0 1000".to_string()
            ]
        );
    }

    #[test]
    fn aggregate_statements() {
        let q = AggQuery {
            devices: vec![1, 2],
            key: "temp".into(),
            from: 0,
            to: 3_600_000,
            window: Window::Fixed(60_000),
            tz: chrono_tz::Tz::UTC,
            func: Func::Diff,
        };
        assert_eq!(
            aggregate_sql(&q, 7, "n_temp"),
            "SELECT _wstart, device, LAST(`n_temp`) - FIRST(`n_temp`) FROM t_7 WHERE device IN ('1','2') AND ts >= 0 AND ts < 3600000 PARTITION BY device INTERVAL(60000a)"
        );
        assert!(aggregate_sql(&AggQuery { window: Window::Month, func: Func::Avg, ..q }, 7, "n_temp").ends_with("INTERVAL(1n)"));
    }
}
