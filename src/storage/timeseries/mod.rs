//! Time series: one interface ([`TimeSeriesStore`]) over three backends — the embedded store
//! (default; compressed per-series chunks in the data directory), PostgreSQL (time-partitioned
//! tables) and TDengine (super table per product, schemaless ingestion). [`Tsdb`] is the one
//! the node opens from `[telemetry] store`. Queries take the same arguments everywhere and the
//! conformance suite (tests/timeseries.rs) checks that the backends answer alike.
pub mod aggregate;
pub mod chunk;
pub mod embedded;
pub mod point;
pub mod postgres;
pub mod tdengine;

use std::future::Future;
use std::sync::Arc;

use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

pub use aggregate::{Func, Window};
pub use point::{flatten, Point, Value};

#[derive(Debug, thiserror::Error)]
pub enum TsError {
    #[error(transparent)]
    Embedded(#[from] embedded::StoreError),
    #[error("time-series database: {0}")]
    Db(String),
    #[error("{0}")]
    BadQuery(String),
    /// The store refuses the points for what they contain (not because it is down): writing
    /// them again cannot succeed.
    #[error("the time-series store refuses this data: {0}")]
    Refused(String),
}

impl From<sqlx::Error> for TsError {
    fn from(e: sqlx::Error) -> TsError {
        // SQLSTATE class 22 is "data exception" (a NUL in text, an out-of-range number...).
        if let sqlx::Error::Database(d) = &e {
            if d.code().is_some_and(|c| c.starts_with("22")) {
                return TsError::Refused(d.message().to_string());
            }
        }
        TsError::Db(e.to_string())
    }
}

/// Where a page of history ends: the next page starts after this (ts, key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub ts: i64,
    pub key: String,
}

/// Raw history of one device: `keys` (empty = all) in `[from, to)`, ordered by (ts, key).
#[derive(Debug, Clone)]
pub struct RangeQuery {
    pub device_id: i64,
    pub keys: Vec<String>,
    pub from: i64,
    pub to: i64,
    pub limit: usize,
    pub after: Option<Cursor>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub points: Vec<Point>,
    /// Set when more points follow.
    pub next: Option<Cursor>,
}

/// One key of some devices aggregated into buckets.
#[derive(Debug, Clone)]
pub struct AggQuery {
    pub devices: Vec<i64>,
    pub key: String,
    pub from: i64,
    pub to: i64,
    pub window: Window,
    pub tz: Tz,
    pub func: Func,
}

/// One bucket of one device: start (UTC ms) and the aggregate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bucket {
    pub device_id: i64,
    pub start: i64,
    pub value: f64,
}

/// Largest page and most buckets one query returns.
pub const MAX_PAGE: usize = 10_000;
pub const MAX_BUCKETS: i64 = 100_000;

impl AggQuery {
    pub fn check(&self) -> Result<(), TsError> {
        if self.to <= self.from {
            return Err(TsError::BadQuery("`to` must be after `from`".into()));
        }
        if let Window::Fixed(w) = self.window {
            let span = self.to.checked_sub(self.from).ok_or_else(|| TsError::BadQuery("the range is too large".into()))?;
            if w <= 0 || span / w > MAX_BUCKETS {
                return Err(TsError::BadQuery(format!("more than {MAX_BUCKETS} buckets: use a larger window")));
            }
        }
        Ok(())
    }
}

/// The operations every backend provides. Writes are idempotent per (device, key, ts): a later
/// write of the same timestamp replaces the value.
pub trait TimeSeriesStore: Send + Sync {
    /// Store points; when this returns they survive a process crash (and, with the embedded
    /// store's `sync` durability, power loss).
    fn write_batch(&self, points: Vec<Point>) -> impl Future<Output = Result<(), TsError>> + Send;
    /// Make buffered points durable in their final form (segments, committed rows).
    fn flush(&self) -> impl Future<Output = Result<(), TsError>> + Send;
    /// The latest value of every key of each device.
    fn latest(&self, devices: &[i64]) -> impl Future<Output = Result<Vec<Point>, TsError>> + Send;
    fn range(&self, q: &RangeQuery) -> impl Future<Output = Result<Page, TsError>> + Send;
    fn aggregate(&self, q: &AggQuery) -> impl Future<Output = Result<Vec<Bucket>, TsError>> + Send;
    /// Remove everything older than `cutoff` (whole partitions where the backend has them);
    /// returns the partitions (or rows) removed.
    fn apply_retention(&self, cutoff: i64) -> impl Future<Output = Result<u64, TsError>> + Send;
    /// Remove the points of some devices older than `cutoff` (a product kept shorter than the
    /// store's default).
    fn delete_before(&self, devices: &[i64], cutoff: i64) -> impl Future<Output = Result<u64, TsError>> + Send;
    /// Bytes the store occupies (data directory, or tables and indexes).
    fn disk_bytes(&self) -> impl Future<Output = Result<u64, TsError>> + Send;
}

/// The store a node runs with.
#[derive(Clone)]
pub enum Tsdb {
    Embedded(Arc<embedded::Shared>),
    Postgres(Arc<postgres::PgStore>),
    Tdengine(Arc<tdengine::TdStore>),
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Tsdb::Embedded($s) => $e,
            Tsdb::Postgres($s) => $e,
            Tsdb::Tdengine($s) => $e,
        }
    };
}

impl Tsdb {
    /// The store answers (a round trip for the database backends).
    pub async fn ping(&self) -> Result<(), TsError> {
        match self {
            Tsdb::Embedded(_) => Ok(()),
            Tsdb::Postgres(p) => p.ping().await,
            Tsdb::Tdengine(t) => t.ping().await,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Tsdb::Embedded(_) => "embedded",
            Tsdb::Postgres(_) => "postgres",
            Tsdb::Tdengine(_) => "tdengine",
        }
    }
}

impl TimeSeriesStore for Tsdb {
    async fn write_batch(&self, points: Vec<Point>) -> Result<(), TsError> {
        each!(self, s => s.write_batch(points).await)
    }
    async fn flush(&self) -> Result<(), TsError> {
        each!(self, s => s.flush().await)
    }
    async fn latest(&self, devices: &[i64]) -> Result<Vec<Point>, TsError> {
        each!(self, s => s.latest(devices).await)
    }
    async fn range(&self, q: &RangeQuery) -> Result<Page, TsError> {
        each!(self, s => s.range(q).await)
    }
    async fn aggregate(&self, q: &AggQuery) -> Result<Vec<Bucket>, TsError> {
        q.check()?;
        let mut out = each!(self, s => s.aggregate(q).await)?;
        out.sort_by_key(|b| (b.device_id, b.start));
        Ok(out)
    }
    async fn apply_retention(&self, cutoff: i64) -> Result<u64, TsError> {
        each!(self, s => s.apply_retention(cutoff).await)
    }
    async fn delete_before(&self, devices: &[i64], cutoff: i64) -> Result<u64, TsError> {
        each!(self, s => s.delete_before(devices, cutoff).await)
    }
    async fn disk_bytes(&self) -> Result<u64, TsError> {
        each!(self, s => s.disk_bytes().await)
    }
}

/// A chart series: at most `points` buckets (averages; booleans as the share of `true`) of
/// equal width over `[from, to)`, aligned to `from`. Computed from raw history, so it is the
/// same on every backend.
pub async fn downsample<S: TimeSeriesStore>(
    s: &S,
    device_id: i64,
    key: &str,
    from: i64,
    to: i64,
    points: i64,
) -> Result<Vec<Bucket>, TsError> {
    if to <= from || !(1..=MAX_BUCKETS).contains(&points) {
        return Err(TsError::BadQuery(format!("need from < to and 1..={MAX_BUCKETS} points")));
    }
    let w = to
        .checked_sub(from)
        .and_then(|span| span.checked_add(points - 1))
        .ok_or_else(|| TsError::BadQuery("the range is too large".into()))?
        / points;
    let mut q = RangeQuery { device_id, keys: vec![key.to_string()], from, to, limit: MAX_PAGE, after: None };
    let mut acc: std::collections::BTreeMap<i64, (f64, u64)> = std::collections::BTreeMap::new();
    loop {
        let page = s.range(&q).await?;
        for p in &page.points {
            let Some(x) = numeric(&p.value) else { continue };
            let e = acc.entry(from + (p.ts - from) / w * w).or_insert((0.0, 0));
            e.0 += x;
            e.1 += 1;
        }
        match page.next {
            Some(c) => q.after = Some(c),
            None => break,
        }
    }
    Ok(acc.into_iter().map(|(start, (sum, n))| Bucket { device_id, start, value: sum / n as f64 }).collect())
}

/// History as CSV (`ts,key,value`, RFC 4180 quoting), every page of the query up to `max` rows.
pub async fn export_csv<S: TimeSeriesStore>(s: &S, q: &RangeQuery, out: &mut String, max: usize) -> Result<usize, TsError> {
    let mut q = q.clone();
    q.limit = MAX_PAGE;
    out.push_str("ts,key,value\n");
    let mut n = 0;
    loop {
        let page = s.range(&q).await?;
        for p in &page.points {
            let v = match &p.value {
                Value::Number(x) => x.to_string(),
                Value::Bool(b) => b.to_string(),
                Value::Text(t) | Value::Json(t) => t.clone(),
            };
            out.push_str(&format!("{},{},{}\n", p.ts, csv_field(&p.key), csv_field(&v)));
            n += 1;
            if n >= max {
                return Ok(n);
            }
        }
        match page.next {
            Some(c) => q.after = Some(c),
            None => return Ok(n),
        }
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Sort, cut at the cursor and page: the shared tail of every backend's `range`.
pub(crate) fn page_of(mut points: Vec<Point>, q: &RangeQuery) -> Page {
    points.sort_by(|a, b| (a.ts, &a.key).cmp(&(b.ts, &b.key)));
    if let Some(c) = &q.after {
        points.retain(|p| (p.ts, p.key.as_str()) > (c.ts, c.key.as_str()));
    }
    let limit = q.limit.clamp(1, MAX_PAGE);
    let next = (points.len() > limit).then(|| {
        points.truncate(limit);
        let last = &points[limit - 1];
        Cursor { ts: last.ts, key: last.key.clone() }
    });
    Page { points, next }
}

/// Numeric view of a value for aggregates (None: counted, not added).
pub(crate) fn numeric(v: &Value) -> Option<f64> {
    match v {
        Value::Number(x) => Some(*x),
        Value::Bool(b) => Some(*b as u8 as f64),
        _ => None,
    }
}
