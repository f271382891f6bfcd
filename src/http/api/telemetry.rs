//! Telemetry queries and policies: latest values, raw history with cursor pagination, window aggregates with
//! time-zone-aware calendar buckets (one device, or every device of a product), chart series
//! with a fixed number of points, CSV export; product and tenant policies (transform rules,
//! retention); maintenance on demand.
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono_tz::Tz;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{bad, Answer, Body, Caller, P, Q};
use crate::http::device_api::devices;
use crate::http::{ApiError, AppState};
use crate::storage::meta::{now_ms, MetaError, PolicyScope};
use crate::storage::timeseries::{self as ts, AggQuery, Cursor, Func, RangeQuery, TimeSeriesStore, Window};
use crate::telemetry::Telemetry;

const DAY_MS: i64 = 86_400_000;
/// Most rows one CSV export returns.
const MAX_EXPORT: usize = 1_000_000;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(latest))
        .routes(routes!(history))
        .routes(routes!(aggregate_device))
        .routes(routes!(chart))
        .routes(routes!(export))
        .routes(routes!(aggregate_product))
        .routes(routes!(latest_product))
        .routes(routes!(get_product_policy, put_product_policy))
        .routes(routes!(get_tenant_policy, put_tenant_policy))
        .routes(routes!(status))
        .routes(routes!(maintenance))
}

fn telemetry(s: &AppState) -> Result<std::sync::Arc<Telemetry>, ApiError> {
    devices(s)
        .telemetry
        .get()
        .cloned()
        .ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "telemetry is not running"))
}

/// The id of a device the caller may read telemetry of.
async fn device_id(s: &AppState, c: &Caller, number: &str) -> Result<i64, ApiError> {
    let dev = c.device(&devices(s), number).await?;
    c.require("telemetry:read")?;
    Ok(dev.id)
}

/// Latest value of every key.
#[utoipa::path(get, path = "/devices/{number}/telemetry/latest", tag = "telemetry", params(("number" = String, Path)), responses((status = 200, description = "latest values")))]
async fn latest(State(s): State<AppState>, c: Caller, P(number): P<String>) -> Answer {
    let id = device_id(&s, &c, &number).await?;
    Ok(Json(telemetry(&s)?.latest(id).await?))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct HistoryParams {
    /// Comma-separated keys (default: all).
    keys: Option<String>,
    /// Unix milliseconds (default: a day before `to`).
    from: Option<String>,
    /// Unix milliseconds (default: now).
    to: Option<String>,
    /// Points per page (default 1000).
    limit: Option<String>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// A time range as query parameters (strings: numbers are parsed here, with clear errors).
struct RangeParams<'a> {
    from: &'a Option<String>,
    to: &'a Option<String>,
}

impl RangeParams<'_> {
    fn parse(&self) -> Result<(i64, i64), ApiError> {
        let num = |v: &Option<String>, n: &str| -> Result<Option<i64>, ApiError> {
            v.as_deref().map(|x| x.parse::<i64>().map_err(|_| bad(format!("`{n}` must be Unix milliseconds")))).transpose()
        };
        // Defaults: the last day.
        let to = num(self.to, "to")?.unwrap_or_else(|| now_ms() + 1);
        let from = num(self.from, "from")?.unwrap_or(to.saturating_sub(DAY_MS));
        if from >= to {
            return Err(bad("`from` must be before `to` (Unix milliseconds)"));
        }
        // Every later step divides or buckets `to - from`: it must be representable.
        if to.checked_sub(from).is_none() {
            return Err(bad("the range from `from` to `to` is too large"));
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

/// Raw points, paged by cursor.
#[utoipa::path(get, path = "/devices/{number}/telemetry/history", tag = "telemetry", params(("number" = String, Path), HistoryParams), responses((status = 200, description = "points and the next cursor")))]
async fn history(State(s): State<AppState>, c: Caller, P(number): P<String>, Q(p): Q<HistoryParams>) -> Answer {
    let device_id = device_id(&s, &c, &number).await?;
    let (from, to) = RangeParams { from: &p.from, to: &p.to }.parse()?;
    let after = p.cursor.as_deref().map(cursor_of).transpose()?;
    let limit: usize = p.limit.as_deref().unwrap_or("1000").parse().map_err(|_| bad("`limit` must be a number"))?;
    let q = RangeQuery { device_id, keys: keys(&p.keys), from, to, limit: limit.clamp(1, ts::MAX_PAGE), after };
    let page = telemetry(&s)?.store.range(&q).await?;
    let points: Vec<Value> = page.points.iter().map(|p| json!({"ts": p.ts, "key": p.key, "value": p.value})).collect();
    Ok(Json(json!({"points": points, "next_cursor": page.next.map(|c| format!("{}:{}", c.ts, c.key))})))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct AggParams {
    key: String,
    /// Unix milliseconds (default: a day before `to`).
    from: Option<String>,
    /// Unix milliseconds (default: now).
    to: Option<String>,
    /// Bucket width: `1m`, `15m`, `1h`, `1d`, `1w`, `1mo` (default 1h).
    window: Option<String>,
    /// avg, min, max, sum, count, first, last (default avg).
    #[serde(rename = "fn")]
    func: Option<String>,
    /// IANA time zone of calendar buckets (default UTC).
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
        let (from, to) = RangeParams { from: &self.from, to: &self.to }.parse()?;
        let window: Window = self.window.as_deref().unwrap_or("1h").parse().map_err(bad)?;
        let func: Func = self.func.as_deref().unwrap_or("avg").parse().map_err(bad)?;
        let tz: Tz =
            self.tz.as_deref().unwrap_or("UTC").parse().map_err(|_| bad("unknown time zone (an IANA name such as Europe/Berlin)"))?;
        Ok(AggQuery { devices, key: self.key.clone(), from, to, window, tz, func })
    }
}

/// Window aggregates of one key of one device.
#[utoipa::path(get, path = "/devices/{number}/telemetry/aggregate", tag = "telemetry", params(("number" = String, Path), AggParams), responses((status = 200, description = "buckets")))]
async fn aggregate_device(State(s): State<AppState>, c: Caller, P(number): P<String>, Q(p): Q<AggParams>) -> Answer {
    let id = device_id(&s, &c, &number).await?;
    let b = p.run(&*telemetry(&s)?, &p.query(vec![id])?).await?;
    let buckets: Vec<Value> = b.iter().map(|b| json!({"start": b.start, "value": b.value})).collect();
    Ok(Json(json!({"device": number, "key": p.key, "buckets": buckets})))
}

/// The product's devices: id → number.
async fn product_devices(s: &AppState, c: &Caller, product: i64) -> Result<std::collections::HashMap<i64, String>, ApiError> {
    let d = devices(s);
    c.product(&d.meta, product).await?;
    c.require("telemetry:read")?;
    let mut numbers = std::collections::HashMap::new();
    let mut after = 0;
    loop {
        let page = d.meta.list_devices(after, 1000, None, Some(product)).await?;
        let Some(last) = page.last() else { break };
        after = last.id;
        numbers.extend(page.into_iter().map(|d| (d.id, d.device_number)));
    }
    Ok(numbers)
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct Across {
    /// `true`: one series over all the product's devices (avg, min, max, sum or count of
    /// every point in each window) instead of one per device.
    combine: Option<bool>,
}

/// Window aggregates of one key over every device of a product: per device, or combined into
/// one series (`combine=true`).
#[utoipa::path(get, path = "/products/{id}/telemetry/aggregate", tag = "telemetry", params(("id" = i64, Path), AggParams, Across), responses((status = 200, description = "buckets per device, or one combined series")))]
async fn aggregate_product(State(s): State<AppState>, c: Caller, P(product): P<i64>, Q(p): Q<AggParams>, Q(a): Q<Across>) -> Answer {
    let numbers = product_devices(&s, &c, product).await?;
    let q = p.query(numbers.keys().copied().collect())?;
    let t = telemetry(&s)?;
    if a.combine.unwrap_or(false) {
        let buckets = combined(&p, &t, q).await?;
        return Ok(Json(json!({"product": product, "key": p.key, "fn": p.func.as_deref().unwrap_or("avg"), "buckets": buckets})));
    }
    let b = p.run(&t, &q).await?;
    let mut by: std::collections::BTreeMap<&str, Vec<Value>> = std::collections::BTreeMap::new();
    for x in &b {
        if let Some(n) = numbers.get(&x.device_id) {
            by.entry(n.as_str()).or_default().push(json!({"start": x.start, "value": x.value}));
        }
    }
    Ok(Json(json!({"product": product, "key": p.key, "devices": by})))
}

/// One series over every device of `q`: each window's avg (sum of sums over sum of counts),
/// min, max, sum or count of all their points, and how many devices had points in it.
async fn combined(p: &AggParams, t: &Telemetry, q: AggQuery) -> Result<Vec<Value>, ApiError> {
    use std::collections::BTreeMap;
    let per = |func: Func| {
        let mut q = q.clone();
        q.func = func;
        async move { p.run(t, &q).await }
    };
    // start → (value, devices)
    let mut out: BTreeMap<i64, (f64, u64)> = BTreeMap::new();
    match q.func {
        Func::Avg => {
            let (sums, counts) = (per(Func::Sum).await?, per(Func::Count).await?);
            let mut acc: BTreeMap<i64, (f64, f64, u64)> = BTreeMap::new();
            for b in &sums {
                let e = acc.entry(b.start).or_default();
                e.0 += b.value;
                e.2 += 1;
            }
            for b in &counts {
                acc.entry(b.start).or_default().1 += b.value;
            }
            for (start, (sum, n, devs)) in acc {
                if n > 0.0 {
                    out.insert(start, (sum / n, devs));
                }
            }
        }
        f @ (Func::Min | Func::Max | Func::Sum | Func::Count) => {
            for b in per(f).await? {
                let e = out.entry(b.start).or_insert((b.value, 0));
                e.0 = match (f, e.1) {
                    (_, 0) => b.value,
                    (Func::Min, _) => e.0.min(b.value),
                    (Func::Max, _) => e.0.max(b.value),
                    _ => e.0 + b.value,
                };
                e.1 += 1;
            }
        }
        _ => return Err(bad("combine=true works with fn avg, min, max, sum or count")),
    }
    Ok(out.into_iter().map(|(start, (value, devices))| json!({"start": start, "value": value, "devices": devices})).collect())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct LatestKey {
    /// The key whose latest value each device reports.
    key: String,
}

/// The latest value of one key on every device of a product (devices without it left out).
#[utoipa::path(get, path = "/products/{id}/telemetry/latest", tag = "telemetry", params(("id" = i64, Path), LatestKey), responses((status = 200, description = "device number → {ts, value}")))]
async fn latest_product(State(s): State<AppState>, c: Caller, P(product): P<i64>, Q(k): Q<LatestKey>) -> Answer {
    let numbers = product_devices(&s, &c, product).await?;
    let ids: Vec<i64> = numbers.keys().copied().collect();
    let mut by = serde_json::Map::new();
    for (d, ts, value) in telemetry(&s)?.latest_of_key(&ids, &k.key).await? {
        if let Some(n) = numbers.get(&d) {
            by.insert(n.clone(), json!({"ts": ts, "value": value}));
        }
    }
    Ok(Json(json!({"product": product, "key": k.key, "devices": by})))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ChartParams {
    key: String,
    from: Option<String>,
    to: Option<String>,
    /// Points wanted (default 200).
    points: Option<String>,
}

/// A chart series: at most `points` points (min/max-preserving downsampling).
#[utoipa::path(get, path = "/devices/{number}/telemetry/chart", tag = "telemetry", params(("number" = String, Path), ChartParams), responses((status = 200, description = "[ts, value] pairs")))]
async fn chart(State(s): State<AppState>, c: Caller, P(number): P<String>, Q(p): Q<ChartParams>) -> Answer {
    let id = device_id(&s, &c, &number).await?;
    let (from, to) = RangeParams { from: &p.from, to: &p.to }.parse()?;
    let n: i64 = p.points.as_deref().unwrap_or("200").parse().map_err(|_| bad("`points` must be a number"))?;
    let t = telemetry(&s)?;
    let b = ts::downsample(&t.store, id, &p.key, from, to, n).await?;
    let points: Vec<Value> = b.iter().map(|b| json!([b.start, b.value])).collect();
    Ok(Json(json!({"key": p.key, "points": points})))
}

/// Raw points as CSV.
#[utoipa::path(get, path = "/devices/{number}/telemetry/export.csv", tag = "telemetry", params(("number" = String, Path), HistoryParams), responses((status = 200, description = "CSV", content_type = "text/csv")))]
async fn export(State(s): State<AppState>, c: Caller, P(number): P<String>, Q(p): Q<HistoryParams>) -> Result<Response, ApiError> {
    let device_id = device_id(&s, &c, &number).await?;
    let (from, to) = RangeParams { from: &p.from, to: &p.to }.parse()?;
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

#[derive(Deserialize, ToSchema)]
struct PolicyBody {
    /// Transform rules (products only).
    #[schema(value_type = Vec<Object>)]
    #[serde(default = "empty_rules")]
    rules: Value,
    /// Days raw points are kept (0: the node default).
    #[serde(default)]
    raw_days: i64,
}

fn empty_rules() -> Value {
    json!([])
}

async fn get_policy(s: &AppState, scope: PolicyScope, id: i64) -> Answer {
    let p = devices(s).meta.policy(scope, id).await?;
    Ok(Json(p.map_or_else(|| json!({"scope": scope, "scope_id": id, "rules": [], "raw_days": 0}), |p| json!(p))))
}

#[utoipa::path(get, path = "/products/{id}/telemetry-policy", tag = "telemetry", params(("id" = i64, Path)), responses((status = 200, description = "the product's policy")))]
async fn get_product_policy(State(s): State<AppState>, c: Caller, P(id): P<i64>) -> Answer {
    c.product(&devices(&s).meta, id).await?;
    c.require("telemetry:read")?;
    get_policy(&s, PolicyScope::Product, id).await
}

#[utoipa::path(get, path = "/tenants/{id}/telemetry-policy", tag = "telemetry", params(("id" = i64, Path)), responses((status = 200, description = "the tenant's policy")))]
async fn get_tenant_policy(State(s): State<AppState>, c: Caller, P(id): P<i64>) -> Answer {
    c.tenant(&devices(&s).meta, id).await?;
    c.require("telemetry:read")?;
    get_policy(&s, PolicyScope::Tenant, id).await
}

/// Transform rules and raw retention of a product's telemetry.
#[utoipa::path(put, path = "/products/{id}/telemetry-policy", tag = "telemetry", params(("id" = i64, Path)), request_body = PolicyBody, responses((status = 200, description = "the policy")))]
async fn put_product_policy(State(s): State<AppState>, c: Caller, P(id): P<i64>, Body(b): Body<PolicyBody>) -> Answer {
    let d = devices(&s);
    let prod = c.product(&d.meta, id).await?;
    c.require("telemetry:manage")?;
    let p = telemetry(&s)?.set_product_policy(id, b.rules, b.raw_days).await?;
    c.audit(&d.meta, Some(prod.tenant_id), "update", format!("product:{id}/telemetry-policy"), json!({"raw_days": b.raw_days})).await;
    Ok(Json(json!(p)))
}

/// Raw retention of a tenant's telemetry.
#[utoipa::path(put, path = "/tenants/{id}/telemetry-policy", tag = "telemetry", params(("id" = i64, Path)), request_body = PolicyBody, responses((status = 200, description = "the policy")))]
async fn put_tenant_policy(State(s): State<AppState>, c: Caller, P(id): P<i64>, Body(b): Body<PolicyBody>) -> Answer {
    let d = devices(&s);
    c.tenant(&d.meta, id).await?;
    c.require("telemetry:manage")?;
    if b.rules.as_array().is_some_and(|r| !r.is_empty()) {
        return Err(MetaError::Invalid("transform rules belong to products".into()).into());
    }
    let p = d.meta.set_policy(PolicyScope::Tenant, id, &json!([]), b.raw_days).await?;
    c.audit(&d.meta, Some(id), "update", format!("tenant:{id}/telemetry-policy"), json!({"raw_days": b.raw_days})).await;
    Ok(Json(json!(p)))
}

/// The telemetry store's state (system scope).
#[utoipa::path(get, path = "/telemetry/status", operation_id = "telemetry_status", tag = "telemetry", responses((status = 200, description = "store, durability, disk use, last maintenance")))]
async fn status(State(s): State<AppState>, c: Caller) -> Answer {
    c.require("tenant:manage")?;
    let t = telemetry(&s)?;
    let last = t.last_report.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(Json(json!({
        "store": t.store.name(),
        "durability": t.config.telemetry.durability,
        "disk_bytes": t.store.disk_bytes().await?,
        "last_maintenance": last,
    })))
}

/// Run retention and compaction now (system scope).
#[utoipa::path(post, path = "/telemetry/maintenance", tag = "telemetry", responses((status = 200, description = "what was done")))]
async fn maintenance(State(s): State<AppState>, c: Caller) -> Answer {
    c.require("tenant:manage")?;
    let r = telemetry(&s)?.maintain_now().await.map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e))?;
    Ok(Json(json!(r)))
}
