//! Telemetry queries and policies on the admin API (the users issue puts the same behind user
//! permissions): latest values, raw history with cursor pagination, window aggregates with
//! time-zone-aware calendar buckets (one device, or every device of a product), chart series
//! with a fixed number of points, CSV export; product and tenant policies (transform rules,
//! retention); maintenance on demand.
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono_tz::Tz;
use serde::Deserialize;
use serde_json::{json, Value};

use super::device_api::devices;
use super::{ApiError, AppState};
use crate::storage::meta::{now_ms, MetaError, PolicyScope};
use crate::storage::timeseries::{self as ts, AggQuery, Cursor, Func, RangeQuery, TimeSeriesStore, Window};
use crate::telemetry::Telemetry;

type Answer = Result<Json<Value>, ApiError>;

const DAY_MS: i64 = 86_400_000;
/// Most rows one CSV export returns.
const MAX_EXPORT: usize = 1_000_000;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/admin/devices/{number}/telemetry/latest", get(latest))
        .route("/api/v1/admin/devices/{number}/telemetry/history", get(history))
        .route("/api/v1/admin/devices/{number}/telemetry/aggregate", get(aggregate_device))
        .route("/api/v1/admin/devices/{number}/telemetry/chart", get(chart))
        .route("/api/v1/admin/devices/{number}/telemetry/export.csv", get(export))
        .route("/api/v1/admin/products/{id}/telemetry/aggregate", get(aggregate_product))
        .route("/api/v1/admin/products/{id}/telemetry-policy", get(get_product_policy).put(put_product_policy))
        .route("/api/v1/admin/tenants/{id}/telemetry-policy", get(get_tenant_policy).put(put_tenant_policy))
        .route("/api/v1/admin/telemetry/status", get(status))
        .route("/api/v1/admin/telemetry/maintenance", post(maintenance))
}

fn telemetry(s: &AppState) -> Result<std::sync::Arc<Telemetry>, ApiError> {
    devices(s)?
        .telemetry
        .get()
        .cloned()
        .ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "telemetry is not running"))
}

fn bad(m: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid", m)
}

async fn device_id(s: &AppState, number: &str) -> Result<i64, ApiError> {
    Ok(devices(s)?.meta.device(number).await?.id)
}

async fn latest(State(s): State<AppState>, Path(number): Path<String>) -> Answer {
    let id = device_id(&s, &number).await?;
    Ok(Json(telemetry(&s)?.latest(id).await?))
}

#[derive(Deserialize)]
struct HistoryParams {
    keys: Option<String>,
    #[serde(flatten)]
    range: RangeParams,
    limit: Option<String>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

// serde(flatten) with numbers in query strings needs explicit string parsing.
#[derive(Deserialize)]
struct RangeParams {
    from: Option<String>,
    to: Option<String>,
}

impl RangeParams {
    fn parse(&self) -> Result<(i64, i64), ApiError> {
        let num = |v: &Option<String>, n: &str| -> Result<Option<i64>, ApiError> {
            v.as_deref().map(|x| x.parse::<i64>().map_err(|_| bad(format!("`{n}` must be Unix milliseconds")))).transpose()
        };
        // Defaults: the last day.
        let to = num(&self.to, "to")?.unwrap_or_else(|| now_ms() + 1);
        let from = num(&self.from, "from")?.unwrap_or(to - DAY_MS);
        if from >= to {
            return Err(bad("`from` must be before `to` (Unix milliseconds)"));
        }
        Ok((from, to))
    }
}

fn keys(k: &Option<String>) -> Vec<String> {
    k.as_deref().map(|k| k.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect()).unwrap_or_default()
}

fn cursor_of(c: &str) -> Result<Cursor, ApiError> {
    let (ts, key) = c.split_once(':').ok_or_else(|| bad("bad cursor"))?;
    Ok(Cursor { ts: ts.parse().map_err(|_| bad("bad cursor"))?, key: key.to_string() })
}

async fn history(State(s): State<AppState>, Path(number): Path<String>, Query(p): Query<HistoryParams>) -> Answer {
    let device_id = device_id(&s, &number).await?;
    let (from, to) = p.range.parse()?;
    let after = p.cursor.as_deref().map(cursor_of).transpose()?;
    let limit: usize = p.limit.as_deref().unwrap_or("1000").parse().map_err(|_| bad("`limit` must be a number"))?;
    let q = RangeQuery { device_id, keys: keys(&p.keys), from, to, limit: limit.clamp(1, ts::MAX_PAGE), after };
    let page = telemetry(&s)?.store.range(&q).await?;
    let points: Vec<Value> = page.points.iter().map(|p| json!({"ts": p.ts, "key": p.key, "value": p.value})).collect();
    Ok(Json(json!({"points": points, "next_cursor": page.next.map(|c| format!("{}:{}", c.ts, c.key))})))
}

#[derive(Deserialize)]
struct AggParams {
    key: String,
    #[serde(flatten)]
    range: RangeParams,
    window: Option<String>,
    #[serde(rename = "fn")]
    func: Option<String>,
    tz: Option<String>,
    /// `raw` (default) or `rollup` (hourly roll-ups, kept longer than raw points).
    source: Option<String>,
}

impl AggParams {
    async fn run(&self, t: &Telemetry, q: &AggQuery) -> Result<Vec<ts::Bucket>, ApiError> {
        match self.source.as_deref().unwrap_or("raw") {
            "raw" => Ok(t.store.aggregate(q).await?),
            "rollup" => Ok(crate::telemetry::rollup::aggregate(t, q).await?),
            _ => Err(bad("source is raw or rollup")),
        }
    }
}

impl AggParams {
    fn query(&self, devices: Vec<i64>) -> Result<AggQuery, ApiError> {
        let (from, to) = self.range.parse()?;
        let window: Window = self.window.as_deref().unwrap_or("1h").parse().map_err(bad)?;
        let func: Func = self.func.as_deref().unwrap_or("avg").parse().map_err(bad)?;
        let tz: Tz =
            self.tz.as_deref().unwrap_or("UTC").parse().map_err(|_| bad("unknown time zone (an IANA name such as Europe/Berlin)"))?;
        Ok(AggQuery { devices, key: self.key.clone(), from, to, window, tz, func })
    }
}

async fn aggregate_device(State(s): State<AppState>, Path(number): Path<String>, Query(p): Query<AggParams>) -> Answer {
    let id = device_id(&s, &number).await?;
    let b = p.run(&*telemetry(&s)?, &p.query(vec![id])?).await?;
    let buckets: Vec<Value> = b.iter().map(|b| json!({"start": b.start, "value": b.value})).collect();
    Ok(Json(json!({"device": number, "key": p.key, "buckets": buckets})))
}

async fn aggregate_product(State(s): State<AppState>, Path(product): Path<i64>, Query(p): Query<AggParams>) -> Answer {
    let d = devices(&s)?;
    d.meta.product(product).await?;
    let mut numbers = std::collections::HashMap::new();
    let mut after = 0;
    loop {
        let page = d.meta.list_devices(after, 1000, None, Some(product)).await?;
        let Some(last) = page.last() else { break };
        after = last.id;
        numbers.extend(page.into_iter().map(|d| (d.id, d.device_number)));
    }
    let q = p.query(numbers.keys().copied().collect())?;
    let b = p.run(&*telemetry(&s)?, &q).await?;
    let mut by: std::collections::BTreeMap<&str, Vec<Value>> = std::collections::BTreeMap::new();
    for x in &b {
        if let Some(n) = numbers.get(&x.device_id) {
            by.entry(n.as_str()).or_default().push(json!({"start": x.start, "value": x.value}));
        }
    }
    Ok(Json(json!({"product": product, "key": p.key, "devices": by})))
}

#[derive(Deserialize)]
struct ChartParams {
    key: String,
    #[serde(flatten)]
    range: RangeParams,
    points: Option<String>,
}

async fn chart(State(s): State<AppState>, Path(number): Path<String>, Query(p): Query<ChartParams>) -> Answer {
    let id = device_id(&s, &number).await?;
    let (from, to) = p.range.parse()?;
    let n: i64 = p.points.as_deref().unwrap_or("200").parse().map_err(|_| bad("`points` must be a number"))?;
    let t = telemetry(&s)?;
    let b = ts::downsample(&t.store, id, &p.key, from, to, n).await?;
    let points: Vec<Value> = b.iter().map(|b| json!([b.start, b.value])).collect();
    Ok(Json(json!({"key": p.key, "points": points})))
}

async fn export(State(s): State<AppState>, Path(number): Path<String>, Query(p): Query<HistoryParams>) -> Result<Response, ApiError> {
    let device_id = device_id(&s, &number).await?;
    let (from, to) = p.range.parse()?;
    let t = telemetry(&s)?;
    let q = RangeQuery { device_id, keys: keys(&p.keys), from, to, limit: ts::MAX_PAGE, after: None };
    let mut out = String::new();
    let n = ts::export_csv(&t.store, &q, &mut out, MAX_EXPORT).await?;
    let mut r =
        ([(header::CONTENT_TYPE, "text/csv; charset=utf-8"), (header::CONTENT_DISPOSITION, "attachment; filename=\"telemetry.csv\"")], out)
            .into_response();
    if n >= MAX_EXPORT {
        r.headers_mut().insert("x-truncated", axum::http::HeaderValue::from_static("true"));
    }
    Ok(r)
}

#[derive(Deserialize)]
struct PolicyBody {
    #[serde(default = "empty_rules")]
    rules: Value,
    #[serde(default)]
    raw_days: i64,
}

fn empty_rules() -> Value {
    json!([])
}

async fn get_policy(s: &AppState, scope: PolicyScope, id: i64) -> Answer {
    let p = devices(s)?.meta.policy(scope, id).await?;
    Ok(Json(p.map_or_else(|| json!({"scope": scope, "scope_id": id, "rules": [], "raw_days": 0}), |p| json!(p))))
}

async fn get_product_policy(State(s): State<AppState>, Path(id): Path<i64>) -> Answer {
    get_policy(&s, PolicyScope::Product, id).await
}

async fn get_tenant_policy(State(s): State<AppState>, Path(id): Path<i64>) -> Answer {
    get_policy(&s, PolicyScope::Tenant, id).await
}

async fn put_product_policy(
    State(s): State<AppState>,
    Path(id): Path<i64>,
    body: Result<Json<PolicyBody>, axum::extract::rejection::JsonRejection>,
) -> Answer {
    let Json(b) = body?;
    Ok(Json(json!(telemetry(&s)?.set_product_policy(id, b.rules, b.raw_days).await?)))
}

async fn put_tenant_policy(
    State(s): State<AppState>,
    Path(id): Path<i64>,
    body: Result<Json<PolicyBody>, axum::extract::rejection::JsonRejection>,
) -> Answer {
    let Json(b) = body?;
    if b.rules.as_array().is_some_and(|r| !r.is_empty()) {
        return Err(MetaError::Invalid("transform rules belong to products".into()).into());
    }
    Ok(Json(json!(devices(&s)?.meta.set_policy(PolicyScope::Tenant, id, &json!([]), b.raw_days).await?)))
}

async fn status(State(s): State<AppState>) -> Answer {
    let t = telemetry(&s)?;
    let last = t.last_report.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(Json(json!({
        "store": t.store.name(),
        "durability": t.config.telemetry.durability,
        "disk_bytes": t.store.disk_bytes().await?,
        "last_maintenance": last,
    })))
}

async fn maintenance(State(s): State<AppState>) -> Answer {
    let r = telemetry(&s)?.maintain_now().await.map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e))?;
    Ok(Json(json!(r)))
}
