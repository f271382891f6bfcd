//! Telemetry points as the stores keep them: (device, key, ts) → a typed value. Device
//! payloads become points here: nested objects are flattened with dotted keys, numbers stay
//! numbers, booleans booleans, strings strings, arrays and null-free JSON their JSON text.
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

/// A stored value keeps the type the device sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    Number(f64),
    Bool(bool),
    Text(String),
    /// Arrays (and anything else structured) as JSON text.
    Json(String),
}

/// One measurement of one key of one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub device_id: i64,
    pub key: String,
    /// Unix milliseconds.
    pub ts: i64,
    pub value: Value,
}

/// Longest flattened key and deepest nesting kept (deeper levels stay as JSON text).
pub const MAX_KEY: usize = 255;
const MAX_DEPTH: usize = 8;

/// Points of one key/value set: `{"a": 1, "b": {"c": true}}` → `a`, `b.c`. Nulls are skipped (no
/// measurement); keys longer than [`MAX_KEY`] are skipped and counted in the return value.
pub fn flatten(device_id: i64, ts: i64, values: &Map<String, Json>, out: &mut Vec<Point>) -> usize {
    let mut skipped = 0;
    walk(device_id, ts, "", values, 0, out, &mut skipped);
    skipped
}

fn walk(device_id: i64, ts: i64, prefix: &str, m: &Map<String, Json>, depth: usize, out: &mut Vec<Point>, skipped: &mut usize) {
    for (k, v) in m {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        if key.is_empty() || key.len() > MAX_KEY {
            *skipped += 1;
            continue;
        }
        let value = match v {
            Json::Null => continue,
            Json::Object(inner) if depth + 1 < MAX_DEPTH => {
                walk(device_id, ts, &key, inner, depth + 1, out, skipped);
                continue;
            }
            Json::Number(n) => match n.as_f64() {
                Some(f) if f.is_finite() => Value::Number(f),
                _ => Value::Json(n.to_string()),
            },
            Json::Bool(b) => Value::Bool(*b),
            Json::String(s) => Value::Text(s.clone()),
            other => Value::Json(other.to_string()),
        };
        out.push(Point { device_id, key, ts, value });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_objects_become_dotted_keys_and_types_stay() {
        let m: Map<String, Json> = serde_json::from_str(
            r#"{"temp": 21.5, "on": true, "mode": "eco", "env": {"hum": 40, "air": {"co2": 600}}, "list": [1, 2], "gone": null}"#,
        )
        .unwrap();
        let mut out = Vec::new();
        assert_eq!(flatten(7, 1000, &m, &mut out), 0);
        let got: Vec<(&str, &Value)> = out.iter().map(|p| (p.key.as_str(), &p.value)).collect();
        assert_eq!(
            got,
            vec![
                ("env.air.co2", &Value::Number(600.0)),
                ("env.hum", &Value::Number(40.0)),
                ("list", &Value::Json("[1,2]".into())),
                ("mode", &Value::Text("eco".into())),
                ("on", &Value::Bool(true)),
                ("temp", &Value::Number(21.5)),
            ]
        );
        assert!(out.iter().all(|p| p.device_id == 7 && p.ts == 1000));
    }

    #[test]
    fn overlong_keys_and_deep_nesting_are_bounded() {
        let long = "k".repeat(300);
        let m: Map<String, Json> = serde_json::from_str(&format!(r#"{{"{long}": 1, "ok": 2}}"#)).unwrap();
        let mut out = Vec::new();
        assert_eq!(flatten(1, 0, &m, &mut out), 1);
        assert_eq!(out.len(), 1);
        let deep: Map<String, Json> = serde_json::from_str(r#"{"a":{"b":{"c":{"d":{"e":{"f":{"g":{"h":{"i":1}}}}}}}}}"#).unwrap();
        out.clear();
        flatten(1, 0, &deep, &mut out);
        assert_eq!(out.len(), 1);
        assert!(matches!(&out[0].value, Value::Json(_)), "beyond the depth bound the rest stays JSON: {out:?}");
    }
}
