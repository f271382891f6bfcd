//! Alert rules, alerts (active, acknowledged, history) and notification channels.
use crate::storage::meta::{Alert, Page};
use axum::extract::State;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{bad, created, created_from, ok, Answer, Body, Caller, ListParams, Made, P, Q};
use crate::alerts::rule::Target;
use crate::alerts::{Alerts, RuleSpec};
use crate::http::device_api::devices;
use crate::http::{ApiError, AppState};
use crate::storage::meta::{Channel, MetaError, StoredRule};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_rules, create_rule))
        .routes(routes!(get_rule, update_rule, delete_rule))
        .routes(routes!(list_alerts))
        .routes(routes!(get_alert))
        .routes(routes!(ack_alert))
        .routes(routes!(list_channels, create_channel))
        .routes(routes!(get_channel, update_channel, delete_channel))
}

fn alerts(s: &AppState) -> std::sync::Arc<Alerts> {
    s.services.alerts.clone()
}

/// A rule: `{"name", "enabled", "tenant_id", "target": {"device"|"group"|"product": …},
/// "condition": …, "duration_secs", "clear": …, "severity", "channels": [ids], "command":
/// {"method", "params"}, "message"}`. Conditions: `{"key", "op", "value"}` with op one of
/// `= != > < >= <= between in` (optional `rate_per_secs` compares the change per that many
/// seconds), `{"no_data_secs"}`, `{"offline_secs"}`, `{"all": [...]}`, `{"any": [...]}`.
#[derive(Deserialize, ToSchema)]
struct RuleBody {
    name: String,
    #[serde(default = "yes")]
    enabled: bool,
    tenant_id: Option<i64>,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    spec: Value,
}

fn yes() -> bool {
    true
}

/// Parse and check a rule for tenant `t`: its target and channels must be the tenant's.
async fn check_rule(s: &AppState, c: &Caller, t: i64, b: &RuleBody) -> Result<Value, ApiError> {
    if b.name.trim().is_empty() || b.name.len() > 128 {
        return Err(bad("name must have 1..128 characters"));
    }
    let spec: RuleSpec = serde_json::from_value(b.spec.clone()).map_err(|e| bad(format!("rule: {e}")))?;
    spec.validate().map_err(bad)?;
    let d = devices(s);
    let owned = match &spec.target {
        Target::Device(n) => c.device(&d, n).await?.tenant_id,
        Target::Group(g) => c.group(&d.meta, *g).await?.tenant_id,
        Target::Product(p) => c.product(&d.meta, *p).await?.tenant_id,
    };
    if owned != t {
        return Err(MetaError::NotFound("the rule's target".into()).into());
    }
    for ch in &spec.channels {
        if c.channel(&d.meta, *ch).await?.tenant_id != t {
            return Err(MetaError::NotFound(format!("channel {ch}")).into());
        }
    }
    serde_json::to_value(&spec).map_err(|e| bad(e.to_string()))
}

fn with_node(s: &AppState, r: StoredRule) -> Answer {
    let node = alerts(s).owner_of(r.id);
    let mut v = serde_json::to_value(r).map_err(|e| bad(e.to_string()))?;
    v["node"] = json!(node);
    Ok(axum::Json(v))
}

#[utoipa::path(get, path = "/alert-rules", tag = "alerts", params(ListParams), responses((status = 200, description = "a page of rules", body = Page<StoredRule>)))]
async fn list_rules(State(s): State<AppState>, c: Caller, Q(p): Q<ListParams>) -> Answer {
    c.require("alert:read")?;
    ok(devices(&s).meta.rules_page(&c.list(&p, vec![])).await?)
}

#[utoipa::path(post, path = "/alert-rules", tag = "alerts", request_body = RuleBody, responses((status = 201, description = "the rule and the node it runs on")))]
async fn create_rule(State(s): State<AppState>, c: Caller, Body(b): Body<RuleBody>) -> Made {
    c.require("alert:write")?;
    let t = c.new_tenant(b.tenant_id)?;
    let d = devices(&s);
    c.tenant(&d.meta, t).await?;
    let spec = check_rule(&s, &c, t, &b).await?;
    let r = d.meta.create_rule(t, &b.name, b.enabled, &spec).await?;
    alerts(&s).changed();
    c.audit(&d.meta, Some(t), "create", format!("alert-rule:{}", r.id), json!({"name": r.name})).await;
    with_node(&s, r).map(created_from)
}

#[utoipa::path(get, path = "/alert-rules/{id}", tag = "alerts", params(("id" = i64, Path)), responses((status = 200, description = "the rule and the node it runs on"), (status = 404, description = "no such rule")))]
async fn get_rule(State(s): State<AppState>, c: Caller, P(id): P<i64>) -> Answer {
    let r = c.rule(&devices(&s).meta, id).await?;
    c.require("alert:read")?;
    with_node(&s, r)
}

#[utoipa::path(put, path = "/alert-rules/{id}", tag = "alerts", params(("id" = i64, Path)), request_body = RuleBody, responses((status = 200, description = "the rule")))]
async fn update_rule(State(s): State<AppState>, c: Caller, P(id): P<i64>, Body(b): Body<RuleBody>) -> Answer {
    let old = c.rule(&devices(&s).meta, id).await?;
    c.require("alert:write")?;
    let spec = check_rule(&s, &c, old.tenant_id, &b).await?;
    let d = devices(&s);
    let r = d.meta.update_rule(id, &b.name, b.enabled, &spec).await?;
    alerts(&s).changed();
    c.audit(&d.meta, Some(old.tenant_id), "update", format!("alert-rule:{id}"), json!({"name": r.name, "enabled": r.enabled})).await;
    with_node(&s, r)
}

#[utoipa::path(delete, path = "/alert-rules/{id}", tag = "alerts", params(("id" = i64, Path)), responses((status = 200, description = "deleted, with its alerts")))]
async fn delete_rule(State(s): State<AppState>, c: Caller, P(id): P<i64>) -> Answer {
    let old = c.rule(&devices(&s).meta, id).await?;
    c.require("alert:write")?;
    let d = devices(&s);
    d.meta.delete_rule(id).await?;
    alerts(&s).changed();
    c.audit(&d.meta, Some(old.tenant_id), "delete", format!("alert-rule:{id}"), json!({"name": old.name})).await;
    ok(json!({"deleted": id}))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct AlertFilter {
    rule_id: Option<i64>,
    device_id: Option<i64>,
    /// 1: open alerts only (active or acknowledged).
    open: Option<i64>,
}

/// Alerts, newest first unless sorted otherwise: open ones (`open=1`) and the history.
#[utoipa::path(get, path = "/alerts", tag = "alerts", params(ListParams, AlertFilter), responses((status = 200, description = "a page of alerts", body = Page<Alert>)))]
async fn list_alerts(State(s): State<AppState>, c: Caller, Q(mut p): Q<ListParams>, Q(f): Q<AlertFilter>) -> Answer {
    c.require("alert:read")?;
    if p.sort.is_none() {
        p.sort = Some("-id".into());
    }
    let q = c.list(&p, vec![("rule_id", f.rule_id), ("device_id", f.device_id), ("open", f.open)]);
    ok(devices(&s).meta.alerts_page(&q).await?)
}

#[utoipa::path(get, path = "/alerts/{id}", tag = "alerts", params(("id" = i64, Path)), responses((status = 200, description = "the alert", body = Alert), (status = 404, description = "no such alert")))]
async fn get_alert(State(s): State<AppState>, c: Caller, P(id): P<i64>) -> Answer {
    let a = c.alert(&devices(&s).meta, id).await?;
    c.require("alert:read")?;
    ok(a)
}

/// Acknowledge an active alert (it stays open until its condition clears).
#[utoipa::path(post, path = "/alerts/{id}/ack", tag = "alerts", params(("id" = i64, Path)), responses((status = 200, description = "the alert", body = Alert), (status = 409, description = "not active")))]
async fn ack_alert(State(s): State<AppState>, c: Caller, P(id): P<i64>) -> Answer {
    let a = c.alert(&devices(&s).meta, id).await?;
    c.require("alert:ack")?;
    let d = devices(&s);
    let Some(acked) = d.meta.ack_alert(id, &c.0.actor()).await? else {
        return Err(MetaError::Conflict(format!("alert {id} is {}, not active", a.status)).into());
    };
    alerts(&s).acknowledged(acked.clone());
    c.audit(&d.meta, Some(a.tenant_id), "ack", format!("alert:{id}"), json!({})).await;
    ok(acked)
}

/// A notification channel: `webhook` (`config`: `url`, optional `secret` for the
/// `X-Thingsd-Signature` HMAC, `headers`) or `email` (`smtp_host`, `smtp_port`, `from`, `to`,
/// optional `username`, `password`, `tls` = `opportunistic` (default) | `starttls` | `tls` |
/// `none`, `ca_pem`, `accept_invalid_certs`).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ChannelBody {
    name: String,
    kind: String,
    #[schema(value_type = Object)]
    config: Value,
    tenant_id: Option<i64>,
}

fn check_channel(b: &ChannelBody) -> Result<(), ApiError> {
    if b.name.trim().is_empty() || b.name.len() > 128 {
        return Err(bad("name must have 1..128 characters"));
    }
    crate::alerts::notify::validate(&b.kind, &b.config).map_err(bad)
}

/// What a secret of a channel reads as.
const HIDDEN: &str = "********";

/// Channels are shown without their secrets: `secret`, `password` and every header value
/// (headers carry API keys and bearer tokens).
fn redacted(mut c: Channel) -> Channel {
    for k in ["secret", "password"] {
        if let Some(v) = c.config.get_mut(k) {
            *v = json!(HIDDEN);
        }
    }
    if let Some(h) = c.config.get_mut("headers").and_then(Value::as_object_mut) {
        h.values_mut().for_each(|v| *v = json!(HIDDEN));
    }
    c
}

/// An update that sends a secret back as shown keeps the stored one, so a client may save
/// what it read.
fn keep_hidden(new: &mut Value, old: &Value) {
    let hidden = json!(HIDDEN);
    for k in ["secret", "password"] {
        if let (true, Some(o)) = (new.get(k) == Some(&hidden), old.get(k)) {
            new[k] = o.clone();
        }
    }
    let old_headers = old.get("headers").and_then(Value::as_object);
    if let (Some(h), Some(oh)) = (new.get_mut("headers").and_then(Value::as_object_mut), old_headers) {
        for (name, v) in h.iter_mut() {
            if *v == hidden {
                if let Some(o) = oh.get(name) {
                    *v = o.clone();
                }
            }
        }
    }
}

#[utoipa::path(get, path = "/channels", tag = "alerts", params(ListParams), responses((status = 200, description = "a page of channels", body = Page<Channel>)))]
async fn list_channels(State(s): State<AppState>, c: Caller, Q(p): Q<ListParams>) -> Answer {
    c.require("alert:read")?;
    let mut page = devices(&s).meta.channels_page(&c.list(&p, vec![])).await?;
    page.items = page.items.into_iter().map(redacted).collect();
    ok(page)
}

#[utoipa::path(post, path = "/channels", tag = "alerts", request_body = ChannelBody, responses((status = 201, description = "the channel", body = Channel)))]
async fn create_channel(State(s): State<AppState>, c: Caller, Body(b): Body<ChannelBody>) -> Made {
    c.require("channel:manage")?;
    check_channel(&b)?;
    let t = c.new_tenant(b.tenant_id)?;
    let d = devices(&s);
    c.tenant(&d.meta, t).await?;
    let ch = d.meta.create_channel(t, &b.name, &b.kind, &b.config).await?;
    c.audit(&d.meta, Some(t), "create", format!("channel:{}", ch.id), json!({"name": ch.name, "kind": ch.kind})).await;
    created(redacted(ch))
}

#[utoipa::path(get, path = "/channels/{id}", tag = "alerts", params(("id" = i64, Path)), responses((status = 200, description = "the channel", body = Channel), (status = 404, description = "no such channel")))]
async fn get_channel(State(s): State<AppState>, c: Caller, P(id): P<i64>) -> Answer {
    let ch = c.channel(&devices(&s).meta, id).await?;
    c.require("alert:read")?;
    ok(redacted(ch))
}

#[utoipa::path(put, path = "/channels/{id}", tag = "alerts", params(("id" = i64, Path)), request_body = ChannelBody, responses((status = 200, description = "the channel", body = Channel)))]
async fn update_channel(State(s): State<AppState>, c: Caller, P(id): P<i64>, Body(mut b): Body<ChannelBody>) -> Answer {
    let old = c.channel(&devices(&s).meta, id).await?;
    c.require("channel:manage")?;
    keep_hidden(&mut b.config, &old.config);
    check_channel(&b)?;
    let d = devices(&s);
    let ch = d.meta.update_channel(id, &b.name, &b.kind, &b.config).await?;
    c.audit(&d.meta, Some(old.tenant_id), "update", format!("channel:{id}"), json!({"name": ch.name})).await;
    ok(redacted(ch))
}

#[utoipa::path(delete, path = "/channels/{id}", tag = "alerts", params(("id" = i64, Path)), responses((status = 200, description = "deleted")))]
async fn delete_channel(State(s): State<AppState>, c: Caller, P(id): P<i64>) -> Answer {
    let old = c.channel(&devices(&s).meta, id).await?;
    c.require("channel:manage")?;
    let d = devices(&s);
    d.meta.delete_channel(id).await?;
    c.audit(&d.meta, Some(old.tenant_id), "delete", format!("channel:{id}"), json!({"name": old.name})).await;
    ok(json!({"deleted": id}))
}
