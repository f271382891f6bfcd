//! What a device sends, whatever the protocol, becomes [`DeviceEvent`]s: telemetry,
//! attributes, events and responses, each with the device, its key/values, a timestamp and
//! the message id. This module maps MQTT topics (ThingsPanel and ThingsBoard styles) and
//! HTTP/CoAP resources to event kinds and checks payloads.
use std::sync::Arc;

use serde::Serialize;
use serde_json::{Map, Value};

use super::{Identity, ProductModel};
use crate::storage::meta::{Field, ThingModel};

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Telemetry,
    Attributes,
    Event,
    CommandResponse,
    AttributeSetResponse,
    /// The device asks for its attributes (ThingsBoard `attributes/request`).
    AttributeRequest,
    /// The device calls the platform (ThingsBoard client-side RPC, `rpc/request/{id}`):
    /// `getSessionLimits` is answered by the node; other methods go to platform services,
    /// which answer through the REST API.
    RpcRequest,
}

/// One message from one device (a gateway message becomes one event per device it carries).
#[derive(Debug, Clone, Serialize)]
pub struct DeviceEvent {
    pub device_id: i64,
    pub device_number: Arc<str>,
    pub kind: EventKind,
    pub values: Map<String, Value>,
    /// Unix milliseconds: the device's `ts` when it sent one, else the arrival time.
    pub ts: i64,
    pub message_id: Option<String>,
    pub protocol: &'static str,
}

/// Why a payload was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Reject {
    TooLarge(usize),
    Malformed(String),
    Model(String),
    UnknownSubDevice(String),
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reject::TooLarge(max) => write!(f, "payload larger than {max} bytes"),
            Reject::Malformed(m) => write!(f, "malformed payload: {m}"),
            Reject::Model(m) => write!(f, "does not match the thing model: {m}"),
            Reject::UnknownSubDevice(a) => write!(f, "no sub-device at address {a}"),
        }
    }
}

impl Reject {
    pub fn code(&self) -> &'static str {
        match self {
            Reject::TooLarge(_) => "payload_too_large",
            Reject::Malformed(_) => "malformed_payload",
            Reject::Model(_) => "thing_model_mismatch",
            Reject::UnknownSubDevice(_) => "unknown_sub_device",
        }
    }
}

/// What an uplink MQTT topic means. `None`: not a device uplink topic.
pub fn classify(topic: &str, number: &str) -> Option<(EventKind, bool, Option<String>)> {
    let l: Vec<&str> = topic.split('/').collect();
    let mid = |s: &str| Some(s.to_string());
    let (kind, gateway, id) = match l.as_slice() {
        [p @ ("devices" | "gateway"), "telemetry"] => (EventKind::Telemetry, *p == "gateway", None),
        [p @ ("devices" | "gateway"), "attributes", m] => (EventKind::Attributes, *p == "gateway", mid(m)),
        [p @ ("devices" | "gateway"), "event", m] => (EventKind::Event, *p == "gateway", mid(m)),
        [p @ ("devices" | "gateway"), "command", "response", m] => (EventKind::CommandResponse, *p == "gateway", mid(m)),
        [p @ ("devices" | "gateway"), "attributes", "set", "response", m] => (EventKind::AttributeSetResponse, *p == "gateway", mid(m)),
        ["v1", "devices", n, "telemetry"] if *n == number => (EventKind::Telemetry, false, None),
        ["v1", "devices", n, "attributes"] if *n == number => (EventKind::Attributes, false, None),
        ["v1", "devices", n, "attributes", "request", m] if *n == number => (EventKind::AttributeRequest, false, mid(m)),
        ["v1", "devices", n, "rpc", "response", m] if *n == number => (EventKind::CommandResponse, false, mid(m)),
        ["v1", "devices", n, "rpc", "request", m] if *n == number => (EventKind::RpcRequest, false, mid(m)),
        _ => return None,
    };
    Some((kind, gateway, id))
}

/// One message as it arrived, before it is checked.
pub struct Incoming<'a> {
    pub kind: EventKind,
    /// A gateway message (`gateway_data` / `sub_device_data`).
    pub gateway: bool,
    pub message_id: Option<String>,
    pub payload: &'a [u8],
    pub protocol: &'static str,
}

/// Key/value sets of one payload with their timestamps.
type Sets = Vec<(Map<String, Value>, i64)>;

/// Turn one payload into events for `who` (and, for gateway messages, its sub-devices).
pub fn parse(who: &Identity, m: Incoming<'_>, cfg: &crate::config::DevicesConfig, now: i64) -> Result<Vec<DeviceEvent>, Reject> {
    let Incoming { kind, gateway, message_id, payload, protocol } = m;
    let max = cfg.max_payload;
    let secs = |s: u64| i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX);
    let w = Window { now, lo: now.saturating_sub(secs(cfg.ts_max_age_secs)), hi: now.saturating_add(secs(cfg.ts_max_ahead_secs)) };
    if payload.len() > max {
        return Err(Reject::TooLarge(max));
    }
    let v: Value = if payload.is_empty() && kind == EventKind::AttributeRequest {
        Value::Object(Map::new())
    } else {
        serde_json::from_slice(payload).map_err(|e| Reject::Malformed(e.to_string()))?
    };
    let event = |id: i64, number: &Arc<str>, values: Map<String, Value>, ts: i64| DeviceEvent {
        device_id: id,
        device_number: number.clone(),
        kind,
        values,
        ts,
        message_id: message_id.clone(),
        protocol,
    };
    if !gateway {
        let mut out = Vec::new();
        for (values, ts) in body(kind, v, &w)? {
            check(who, kind, &values)?;
            out.push(event(who.device_id, &who.device_number, values, ts));
        }
        return Ok(out);
    }
    // {"gateway_data": {...}, "sub_device_data": {"<address>": {...}, ...}}
    let Value::Object(mut top) = v else { return Err(Reject::Malformed("expected a JSON object".into())) };
    let mut out = Vec::new();
    if let Some(g) = top.remove("gateway_data") {
        for (values, ts) in body(kind, g, &w)? {
            check(who, kind, &values)?;
            out.push(event(who.device_id, &who.device_number, values, ts));
        }
    }
    if let Some(subs) = top.remove("sub_device_data") {
        let Value::Object(subs) = subs else { return Err(Reject::Malformed("sub_device_data must be an object".into())) };
        for (addr, data) in subs {
            let Some(sub) = who.subs.iter().find(|s| s.address == addr) else { return Err(Reject::UnknownSubDevice(addr)) };
            for (values, ts) in body(kind, data, &w)? {
                check_model(sub.model.as_deref(), kind, &values)?;
                out.push(event(sub.device_id, &sub.device_number, values, ts));
            }
        }
    }
    if out.is_empty() {
        return Err(Reject::Malformed("expected gateway_data or sub_device_data".into()));
    }
    Ok(out)
}

/// The key/value sets of one payload: an object, `{"ts": .., "values": {..}}`, or an array of either.
fn body(kind: EventKind, v: Value, w: &Window) -> Result<Sets, Reject> {
    let now = w.now;
    match v {
        Value::Array(items) if kind == EventKind::Telemetry => {
            if items.len() > 1000 {
                return Err(Reject::Malformed("more than 1000 entries".into()));
            }
            let mut out = Vec::with_capacity(items.len());
            for i in items {
                out.extend(body(kind, i, w)?);
            }
            Ok(out)
        }
        Value::Object(mut m) => {
            if kind == EventKind::Telemetry {
                // A `ts` that is not integer milliseconds is an error, never a value named "ts".
                let ts = m.get("ts").map(|t| ts_ok(t, w)).transpose()?;
                if let (Some(ts), Some(Value::Object(values))) = (ts, m.get("values")) {
                    if m.len() == 2 {
                        return Ok(vec![(values.clone(), ts)]);
                    }
                }
                // A flat object may carry its own time: {"ts": 1700000000000, "temp": 21}.
                if let Some(ts) = ts {
                    m.remove("ts");
                    if m.is_empty() {
                        return Err(Reject::Malformed("no values".into()));
                    }
                    return Ok(vec![(m, ts)]);
                }
                if m.is_empty() {
                    return Err(Reject::Malformed("no values".into()));
                }
            }
            let ts = match kind {
                EventKind::Event | EventKind::CommandResponse | EventKind::AttributeSetResponse => {
                    m.get("ts").map(|t| ts_ok(t, w)).transpose()?.unwrap_or(now)
                }
                _ => now,
            };
            if kind == EventKind::Event || kind == EventKind::RpcRequest {
                // ThingsPanel events and ThingsBoard RPC: {"method": "...", "params": {...}}
                if !m.get("method").is_some_and(Value::is_string) {
                    return Err(Reject::Malformed(format!(
                        "{} needs a string \"method\"",
                        if kind == EventKind::Event { "an event" } else { "an RPC request" }
                    )));
                }
                m.entry("params").or_insert_with(|| Value::Object(Map::new()));
            }
            Ok(vec![(m, ts)])
        }
        _ => Err(Reject::Malformed("expected a JSON object".into())),
    }
}

/// The node's clock and the span of device timestamps it accepts around it.
struct Window {
    now: i64,
    lo: i64,
    hi: i64,
}

/// A device's own timestamp: integer Unix milliseconds within the window around now.
fn ts_ok(ts: &Value, w: &Window) -> Result<i64, Reject> {
    let Some(ts) = ts.as_i64() else {
        return Err(Reject::Malformed(format!("ts {ts} is not integer Unix milliseconds")));
    };
    if (w.lo..=w.hi).contains(&ts) {
        Ok(ts)
    } else {
        Err(Reject::Malformed(format!(
            "ts {ts} is outside the accepted window ({} .. {} Unix ms; devices.ts_max_age_secs / ts_max_ahead_secs)",
            w.lo, w.hi
        )))
    }
}

fn check(who: &Identity, kind: EventKind, values: &Map<String, Value>) -> Result<(), Reject> {
    check_model(who.model.as_deref(), kind, values)
}

/// Values against the product's thing model: all of it for a strict product; only the types
/// of the keys it describes otherwise.
fn check_model(m: Option<&ProductModel>, kind: EventKind, values: &Map<String, Value>) -> Result<(), Reject> {
    let Some(ProductModel { strict, model: m, .. }) = m else { return Ok(()) };
    let fields = |fields: &[Field], values: &Map<String, Value>| {
        if *strict { ThingModel::check(fields, values) } else { ThingModel::check_types(fields, values) }.map_err(Reject::Model)
    };
    match kind {
        EventKind::Telemetry => fields(&m.telemetry, values),
        EventKind::Attributes => fields(&m.attributes, values),
        EventKind::Event => {
            let method = values.get("method").and_then(Value::as_str).unwrap_or("");
            let Some(def) = m.events.iter().find(|e| e.identifier == method) else {
                return if *strict { Err(Reject::Model(format!("{method}: no such event"))) } else { Ok(()) };
            };
            match values.get("params") {
                Some(Value::Object(p)) => fields(&def.params, p),
                _ => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

/// A response's success flag: ThingsPanel's `"result": 0` (0 = success), else success.
pub fn response_ok(values: &Map<String, Value>) -> bool {
    match values.get("result") {
        Some(Value::Number(n)) => n.as_i64() == Some(0),
        Some(Value::Bool(b)) => *b,
        _ => !values.contains_key("error"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ident(strict: Option<ThingModel>) -> Identity {
        Identity {
            device_id: 1,
            device_number: Arc::from("d1"),
            enabled: true,
            secret: None,
            model: strict.map(|model| Arc::new(ProductModel { id: 1, strict: true, model })),
            gateway: true,
            subs: vec![super::super::SubDevice { address: "a1".into(), device_id: 2, device_number: Arc::from("s1"), model: None }],
            derived: Default::default(),
        }
    }

    /// The node's clock in these tests (2024-01-01).
    const NOW: i64 = 1_704_067_200_000;

    fn parse1(kind: EventKind, gateway: bool, payload: &str) -> Result<Vec<DeviceEvent>, Reject> {
        parse(
            &ident(None),
            Incoming { kind, gateway, message_id: Some("m".into()), payload: payload.as_bytes(), protocol: "test" },
            &crate::config::DevicesConfig { max_payload: 1024, ..Default::default() },
            NOW,
        )
    }

    #[test]
    fn topics() {
        assert_eq!(classify("devices/telemetry", "d1"), Some((EventKind::Telemetry, false, None)));
        assert_eq!(classify("gateway/attributes/9", "d1"), Some((EventKind::Attributes, true, Some("9".into()))));
        assert_eq!(classify("devices/command/response/9", "d1"), Some((EventKind::CommandResponse, false, Some("9".into()))));
        assert_eq!(classify("v1/devices/d1/rpc/response/4", "d1"), Some((EventKind::CommandResponse, false, Some("4".into()))));
        assert_eq!(classify("v1/devices/d2/telemetry", "d1"), None);
        assert_eq!(classify("devices/telemetry/extra", "d1"), None);
        assert_eq!(classify("sensors/x", "d1"), None);
    }

    #[test]
    fn payload_shapes() {
        let e = parse1(EventKind::Telemetry, false, r#"{"t": 1}"#).unwrap();
        assert_eq!((e.len(), e[0].ts, e[0].device_number.as_ref()), (1, NOW, "d1"));
        let e = parse1(EventKind::Telemetry, false, r#"[{"ts": 1700000000100, "values": {"t": 1}}, {"t": 2}]"#).unwrap();
        assert_eq!((e[0].ts, e[1].ts), (1_700_000_000_100, NOW));
        let e = parse1(EventKind::Telemetry, false, r#"{"ts": 1700000000000, "t": 1}"#).unwrap();
        assert_eq!(
            (e[0].ts, e[0].values.keys().map(String::as_str).collect::<Vec<_>>()),
            (1_700_000_000_000, vec!["t"]),
            "a flat object's own ts"
        );
        assert!(matches!(parse1(EventKind::Telemetry, false, r#"{"ts": -5, "t": 1}"#), Err(Reject::Malformed(_))));
        assert!(matches!(parse1(EventKind::Telemetry, false, r#"{"ts": 1700000000000}"#), Err(Reject::Malformed(_))));
        // Outside the window (more than a year back, more than a day ahead), or not integer ms.
        for bad in [
            r#"{"ts": 5, "t": 1}"#,
            r#"{"ts": 1600000000000, "t": 1}"#,
            r#"{"ts": 1704240000001, "t": 1}"#,
            r#"{"ts": 1700000000000.5, "t": 1}"#,
            r#"{"ts": "1700000000000", "t": 1}"#,
            r#"{"ts": 1e300, "values": {"t": 1}}"#,
            r#"[{"ts": 9223372036854775807, "values": {"t": 1}}]"#,
        ] {
            assert!(matches!(parse1(EventKind::Telemetry, false, bad), Err(Reject::Malformed(_))), "{bad}");
        }
        let e = parse1(EventKind::Telemetry, true, r#"{"gateway_data": {"t": 1}, "sub_device_data": {"a1": {"t": 2}}}"#).unwrap();
        assert_eq!(e.iter().map(|e| e.device_number.to_string()).collect::<Vec<_>>(), ["d1", "s1"]);
        assert!(matches!(parse1(EventKind::Telemetry, true, r#"{"sub_device_data": {"zz": {"t": 2}}}"#), Err(Reject::UnknownSubDevice(_))));
        assert!(matches!(parse1(EventKind::Telemetry, false, "{}"), Err(Reject::Malformed(_))));
        assert!(matches!(parse1(EventKind::Telemetry, false, "3"), Err(Reject::Malformed(_))));
        assert!(matches!(parse1(EventKind::Event, false, r#"{"params": {}}"#), Err(Reject::Malformed(_))));
        assert!(matches!(parse1(EventKind::Telemetry, false, &"x".repeat(2000)), Err(Reject::TooLarge(1024))));
        assert!(parse1(EventKind::AttributeRequest, false, "").is_ok());
        assert!(response_ok(json_map(r#"{"result": 0}"#)));
        assert!(!response_ok(json_map(r#"{"result": 1}"#)));
        assert!(!response_ok(json_map(r#"{"error": "x"}"#)));
        assert!(response_ok(json_map(r#"{"ok": true}"#)));
    }

    fn json_map(s: &str) -> &'static Map<String, Value> {
        Box::leak(Box::new(serde_json::from_str(s).unwrap()))
    }

    proptest! {
        /// Whatever a device sends, parsing answers (events or a reason) and never panics.
        #[test]
        fn never_panics(payload in proptest::collection::vec(any::<u8>(), 0..300), kind in 0u8..6, gateway: bool) {
            let kind = [EventKind::Telemetry, EventKind::Attributes, EventKind::Event, EventKind::CommandResponse, EventKind::AttributeSetResponse, EventKind::AttributeRequest][kind as usize];
            let _ = parse(&ident(Some(ThingModel::default())), Incoming { kind, gateway, message_id: None, payload: &payload, protocol: "test" }, &crate::config::DevicesConfig { max_payload: 256, ..Default::default() }, NOW);
        }
    }
}
