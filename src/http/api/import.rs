//! Bulk device creation: `POST /api/v1/devices/import` with a JSON array of device objects
//! (as `POST /devices` takes them) or CSV (`Content-Type: text/csv`, a header row naming the
//! columns). Each row is created on its own (a few at a time): a bad row is reported with its
//! error and the others are created; every created device gets an access token, shown once in
//! the answer.
use std::collections::HashSet;
use std::sync::Mutex;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use futures_util::StreamExt;
use serde_json::{json, Value};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{bad, ok, Answer, Caller};
use crate::devices::random_token;
use crate::http::device_api::devices;
use crate::http::{ApiError, AppState};
use crate::storage::meta::{CredentialKind, Device, NewDevice};

/// Rows one import may hold.
pub const MAX_ROWS: usize = 10_000;

/// Rows of one import created at once.
const IMPORT_CONCURRENCY: usize = 8;
/// An import that created this many devices refreshes the tables' statistics.
const ANALYZE_AFTER: usize = 1000;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(import_devices))
}

/// What a new device refers to: its tenant, product, group and gateway.
type Refs = (i64, Option<i64>, Option<i64>, Option<i64>);

/// Create a device in the caller's scope with a fresh access token (one `POST /devices`).
pub(super) async fn make_device(s: &AppState, c: &Caller, n: NewDevice) -> Result<(Device, String), ApiError> {
    make_checked(s, c, n, None).await
}

/// Check that the caller may create a device in tenant `t` referring to those objects.
async fn check_refs(s: &AppState, c: &Caller, (t, product, group, gateway): Refs) -> Result<(), ApiError> {
    let d = devices(s);
    c.tenant(&d.meta, t).await?;
    c.check_refs(&d, t, product, group, gateway).await
}

/// As `make_device`; an import passes the references that passed their checks so far (rows
/// of one import mostly share a tenant and product: checked once, not once per row). A failed
/// check is made again for the next row that needs it (it may have been a passing outage).
async fn make_checked(
    s: &AppState,
    c: &Caller,
    mut n: NewDevice,
    passed: Option<&Mutex<HashSet<Refs>>>,
) -> Result<(Device, String), ApiError> {
    c.require("device:write")?;
    let d = devices(s);
    let t = c.new_tenant(n.tenant_id)?;
    let refs = (t, n.product_id, n.group_id, n.gateway_id);
    if !passed.is_some_and(|p| p.lock().is_ok_and(|p| p.contains(&refs))) {
        check_refs(s, c, refs).await?;
        if let Some(Ok(mut p)) = passed.map(Mutex::lock) {
            p.insert(refs);
        }
    }
    n.tenant_id = Some(t);
    let dev = d.meta.create_device(&n).await?;
    let token = random_token();
    d.meta.add_credential(dev.id, CredentialKind::Token, &token, None).await?;
    if dev.gateway_id.is_some() {
        d.changed(&dev, false).await;
    }
    Ok((dev, token))
}

/// Create many devices at once (JSON array or CSV with a header row: `device_number`, `name`,
/// `product_id`, `group_id`, `tenant_id`, `gateway_id`, `sub_address`); at most 10,000 rows.
/// Answers which rows were created (with their access tokens) and why the others were not.
#[utoipa::path(post, path = "/devices/import", tag = "devices", request_body(content = Vec<NewDevice>, description = "a JSON array of devices, or text/csv with a header row", content_type = "application/json"), responses((status = 200, description = "`{created, failed, devices: [{row, device_number, access_token}], errors: [{row, device_number, code, message}]}`")))]
async fn import_devices(State(s): State<AppState>, c: Caller, headers: HeaderMap, body: Bytes) -> Answer {
    c.require("device:write")?;
    let csv = headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|t| t.starts_with("text/csv"));
    let rows: Vec<Value> = if csv { csv_rows(&body)? } else { json_rows(&body)? };
    if rows.len() > MAX_ROWS {
        return Err(bad(format!("{} rows: an import holds at most {MAX_ROWS}", rows.len())));
    }
    // Rows are created a few at a time (each is a handful of queries: a large import is bound
    // by round trips, not by the database). A number seen earlier in the import waits for the
    // concurrent pass, so the first row with it is the one created, as one at a time would.
    let passed = Mutex::new(HashSet::new());
    let mut seen = HashSet::new();
    let (mut first, mut again) = (Vec::new(), Vec::new());
    for (i, row) in rows.into_iter().enumerate() {
        // Rows count from 1 (CSV: the first row after the header).
        let number = row.get("device_number").and_then(Value::as_str).unwrap_or("").to_string();
        if seen.insert(number.clone()) {
            first.push((i, number, row));
        } else {
            again.push((i, number, row));
        }
    }
    let one = |(i, number, row): (usize, String, Value)| {
        let (s, c, passed) = (&s, &c, &passed);
        async move {
            let outcome = match serde_json::from_value::<NewDevice>(row) {
                Ok(n) => make_checked(s, c, n, Some(passed)).await,
                Err(e) => Err(bad(format!("row {}: {e}", i + 1))),
            };
            (i, number, outcome)
        }
    };
    let mut outcomes: Vec<_> = futures_util::stream::iter(first).map(one).buffered(IMPORT_CONCURRENCY).collect().await;
    for row in again {
        outcomes.push(one(row).await);
    }
    outcomes.sort_by_key(|(i, _, _)| *i);
    let (mut made, mut errors) = (Vec::new(), Vec::new());
    for (i, number, outcome) in outcomes {
        match outcome {
            Ok((dev, token)) => made.push(json!({"row": i + 1, "device_number": dev.device_number, "access_token": token})),
            Err(e) => errors.push(json!({"row": i + 1, "device_number": number, "code": e.code, "message": e.message})),
        }
    }
    let d = devices(&s);
    if made.len() >= ANALYZE_AFTER {
        if let Err(e) = d.meta.analyze_devices().await {
            tracing::warn!(error = %e, "cannot refresh the device tables' statistics after an import");
        }
    }
    c.audit(&d.meta, None, "import", "devices".to_string(), json!({"created": made.len(), "failed": errors.len()})).await;
    ok(json!({"created": made.len(), "failed": errors.len(), "devices": made, "errors": errors}))
}

fn json_rows(body: &[u8]) -> Result<Vec<Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(rows)) => Ok(rows),
        Ok(_) => Err(bad("expected a JSON array of devices (or text/csv)")),
        Err(e) => Err(bad(format!("invalid JSON: {e}"))),
    }
}

/// CSV rows as JSON objects keyed by the header; numeric columns become numbers, empty cells
/// are left out.
fn csv_rows(body: &[u8]) -> Result<Vec<Value>, ApiError> {
    let text = std::str::from_utf8(body).map_err(|_| bad("CSV must be UTF-8"))?;
    let mut records = parse_csv(text).map_err(bad)?.into_iter();
    let header: Vec<String> =
        records.next().ok_or_else(|| bad("empty CSV: a header row is needed"))?.into_iter().map(|h| h.trim().to_string()).collect();
    const COLUMNS: [&str; 7] = ["device_number", "name", "product_id", "group_id", "tenant_id", "gateway_id", "sub_address"];
    if let Some(h) = header.iter().find(|h| !COLUMNS.contains(&h.as_str())) {
        return Err(bad(format!("unknown CSV column {h:?} (known: {})", COLUMNS.join(", "))));
    }
    if !header.iter().any(|h| h == "device_number") {
        return Err(bad("the CSV header needs a device_number column"));
    }
    let mut out = Vec::new();
    for rec in records {
        if rec.len() == 1 && rec[0].trim().is_empty() {
            continue; // a blank line
        }
        let mut m = serde_json::Map::new();
        for (h, v) in header.iter().zip(rec) {
            let v = v.trim();
            if v.is_empty() {
                continue;
            }
            let numeric = h.ends_with("_id");
            m.insert(
                h.clone(),
                match (numeric, v.parse::<i64>()) {
                    (true, Ok(n)) => json!(n),
                    _ => json!(v),
                },
            );
        }
        out.push(Value::Object(m));
        if out.len() > MAX_ROWS {
            break; // refused by the caller; no need to read further
        }
    }
    Ok(out)
}

/// RFC 4180 records: fields separated by commas, quoted with `"` (a doubled `""` inside),
/// records by CRLF or LF.
fn parse_csv(text: &str) -> Result<Vec<Vec<String>>, String> {
    let (mut records, mut rec, mut field) = (Vec::new(), Vec::new(), String::new());
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(ch) = chars.next() {
        match (quoted, ch) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => rec.push(std::mem::take(&mut field)),
            (false, '\r') if chars.peek() == Some(&'\n') => {}
            (false, '\n') => {
                rec.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut rec));
            }
            (false, c) => field.push(c),
        }
    }
    if quoted {
        return Err("unterminated quoted CSV field".into());
    }
    if !field.is_empty() || !rec.is_empty() {
        rec.push(field);
        records.push(rec);
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_commas_and_line_ends() {
        let r = parse_csv("device_number,name\r\nd-1,\"Pump, north\"\nd-2,\"say \"\"hi\"\"\"\n").unwrap();
        assert_eq!(r, vec![vec!["device_number", "name"], vec!["d-1", "Pump, north"], vec!["d-2", "say \"hi\""]]);
        assert!(parse_csv("a\n\"open").is_err());
        let rows = csv_rows(b"device_number,product_id\nx-1,7\nx-2,\n").unwrap();
        assert_eq!(rows, vec![json!({"device_number": "x-1", "product_id": 7}), json!({"device_number": "x-2"})]);
        assert!(csv_rows(b"device_number,colour\nx,red\n").is_err());
    }
}
