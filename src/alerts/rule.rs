//! What a rule says and how a device's state is judged against it: comparisons on telemetry
//! and attribute values (`= != > < >= <= between in`), rates of change, no data for N seconds,
//! offline for N seconds, combined with `all`/`any`; a duration the condition must hold; a
//! separate clear condition for hysteresis. Pure functions of the state: unit-tested here.
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A rule as stored (`alert_rules.spec`) and given to the API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Which devices: `{"device": "th-1"}`, `{"group": 3}` or `{"product": 2}`.
    pub target: Target,
    /// Raised when this holds for `duration_secs`.
    pub condition: Expr,
    #[serde(default)]
    pub duration_secs: u64,
    /// Cleared when this holds (default: when `condition` no longer holds). A clear condition
    /// apart from the raise condition is hysteresis: raise above 80, clear below 75.
    #[serde(default)]
    pub clear: Option<Expr>,
    #[serde(default = "default_severity")]
    pub severity: Severity,
    /// Notification channels told of raise, acknowledge and clear.
    #[serde(default)]
    pub channels: Vec<i64>,
    /// A command sent to the device when the alert is raised.
    #[serde(default)]
    pub command: Option<CommandAction>,
    /// Message template: `{device}`, `{rule}`, `{value:KEY}`.
    #[serde(default)]
    pub message: Option<String>,
}

fn default_severity() -> Severity {
    Severity::Major
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Critical,
    Major,
    Minor,
    Warning,
    Info,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Major => "major",
            Severity::Minor => "minor",
            Severity::Warning => "warning",
            Severity::Info => "info",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Target {
    Device(String),
    Group(i64),
    Product(i64),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CommandAction {
    pub method: String,
    #[serde(default)]
    pub params: Value,
}

/// A condition.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Expr {
    All {
        all: Vec<Expr>,
    },
    Any {
        any: Vec<Expr>,
    },
    /// `value` of `key` (or its change per `rate_per_secs` seconds) compared with `value`.
    Compare {
        key: String,
        op: Op,
        value: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rate_per_secs: Option<u64>,
    },
    /// No message from the device for this long.
    NoData {
        no_data_secs: u64,
    },
    /// The device has been offline for this long.
    Offline {
        offline_secs: u64,
    },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Op {
    #[serde(rename = "=")]
    Eq,
    #[serde(rename = "!=")]
    Ne,
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = "between")]
    Between,
    #[serde(rename = "in")]
    In,
}

impl RuleSpec {
    /// Check what serde cannot: operand shapes, sizes.
    pub fn validate(&self) -> Result<(), String> {
        self.condition.validate(0)?;
        if let Some(c) = &self.clear {
            c.validate(0)?;
        }
        if self.duration_secs > 30 * 86_400 {
            return Err("duration_secs is at most 30 days".into());
        }
        if self.channels.len() > 32 {
            return Err("at most 32 channels per rule".into());
        }
        Ok(())
    }

    /// The keys the rule reads: its conditions' and its message template's (`{value:KEY}`).
    /// A device's state keeps only these, and events without any of them pass the rule by.
    pub fn keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        self.condition.collect_keys(&mut keys);
        if let Some(c) = &self.clear {
            c.collect_keys(&mut keys);
        }
        let mut t = self.message.as_deref().unwrap_or("");
        while let Some(i) = t.find("{value:") {
            let rest = &t[i + 7..];
            let Some(j) = rest.find('}') else { break };
            keys.push(rest[..j].to_string());
            t = &rest[j..];
        }
        keys.sort();
        keys.dedup();
        keys
    }

    /// Does every message of a device matter, whatever it holds (no-data and offline
    /// conditions count from the device's last message)?
    pub fn every_message(&self) -> bool {
        self.condition.timed() || self.clear.as_ref().is_some_and(Expr::timed)
    }

    /// Does the rule need a periodic look at time (durations, no data, offline)?
    pub fn timed(&self) -> bool {
        self.duration_secs > 0 || self.condition.timed() || self.clear.as_ref().is_some_and(Expr::timed)
    }
}

impl Expr {
    fn validate(&self, depth: usize) -> Result<(), String> {
        if depth > 8 {
            return Err("conditions nest at most 8 deep".into());
        }
        match self {
            Expr::All { all: v } | Expr::Any { any: v } => {
                if v.is_empty() || v.len() > 32 {
                    return Err("all/any take 1..32 conditions".into());
                }
                v.iter().try_for_each(|e| e.validate(depth + 1))
            }
            Expr::Compare { key, op, value, rate_per_secs } => {
                if key.is_empty() || key.len() > 128 {
                    return Err("key must have 1..128 characters".into());
                }
                match op {
                    Op::Between => match value.as_array().map(|a| a.as_slice()) {
                        Some([a, b]) if a.is_number() && b.is_number() => {}
                        _ => return Err("between takes [low, high]".into()),
                    },
                    Op::In if !value.is_array() => return Err("in takes a list".into()),
                    Op::Gt | Op::Lt | Op::Ge | Op::Le if !value.is_number() => return Err(format!("{op:?} takes a number")),
                    _ => {}
                }
                if rate_per_secs == &Some(0) {
                    return Err("rate_per_secs must be positive".into());
                }
                Ok(())
            }
            Expr::NoData { no_data_secs: s } | Expr::Offline { offline_secs: s } if *s == 0 => Err("seconds must be positive".into()),
            _ => Ok(()),
        }
    }

    fn timed(&self) -> bool {
        match self {
            Expr::All { all: v } | Expr::Any { any: v } => v.iter().any(Expr::timed),
            Expr::NoData { .. } | Expr::Offline { .. } => true,
            Expr::Compare { .. } => false,
        }
    }

    fn collect_keys(&self, out: &mut Vec<String>) {
        match self {
            Expr::All { all: v } | Expr::Any { any: v } => v.iter().for_each(|e| e.collect_keys(out)),
            Expr::Compare { key, .. } => out.push(key.clone()),
            Expr::NoData { .. } | Expr::Offline { .. } => {}
        }
    }

    pub fn needs_status(&self) -> bool {
        match self {
            Expr::All { all: v } | Expr::Any { any: v } => v.iter().any(Expr::needs_status),
            Expr::Offline { .. } => true,
            _ => false,
        }
    }

    /// Judge the state at `now`: None when a key it reads has never been seen.
    pub fn eval(&self, st: &DeviceState, now: i64) -> Option<bool> {
        match self {
            Expr::All { all } => {
                let mut unknown = false;
                for e in all {
                    match e.eval(st, now) {
                        Some(false) => return Some(false),
                        None => unknown = true,
                        Some(true) => {}
                    }
                }
                if unknown {
                    None
                } else {
                    Some(true)
                }
            }
            Expr::Any { any } => {
                let mut unknown = false;
                for e in any {
                    match e.eval(st, now) {
                        Some(true) => return Some(true),
                        None => unknown = true,
                        Some(false) => {}
                    }
                }
                if unknown {
                    None
                } else {
                    Some(false)
                }
            }
            Expr::Compare { key, op, value, rate_per_secs } => Some(match rate_per_secs {
                Some(per) => compare(&Value::from(st.rate(key)? * *per as f64), *op, value),
                None => compare(st.value(key)?, *op, value),
            }),
            Expr::NoData { no_data_secs } => Some(now - st.last_seen >= *no_data_secs as i64 * 1000),
            Expr::Offline { offline_secs } => Some(st.offline_since.is_some_and(|t| now - t >= *offline_secs as i64 * 1000)),
        }
    }
}

fn num(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::Bool(b) => Some(*b as u8 as f64),
        _ => None,
    }
}

fn eq(a: &Value, b: &Value) -> bool {
    match (num(a), num(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

pub fn compare(v: &Value, op: Op, operand: &Value) -> bool {
    match op {
        Op::Eq => eq(v, operand),
        Op::Ne => !eq(v, operand),
        Op::In => operand.as_array().is_some_and(|l| l.iter().any(|x| eq(v, x))),
        Op::Between => match (num(v), operand.as_array().map(|a| a.as_slice())) {
            (Some(x), Some([lo, hi])) => num(lo).zip(num(hi)).is_some_and(|(lo, hi)| lo <= x && x <= hi),
            _ => false,
        },
        Op::Gt | Op::Lt | Op::Ge | Op::Le => match (num(v), num(operand)) {
            (Some(x), Some(y)) => match op {
                Op::Gt => x > y,
                Op::Lt => x < y,
                Op::Ge => x >= y,
                _ => x <= y,
            },
            _ => false,
        },
    }
}

/// What a rule knows of one device: the latest value (and rate of change) of each key the
/// rule reads, in slots parallel to the rule's sorted keys.
#[derive(Debug, Clone, Default)]
pub struct DeviceState {
    keys: Arc<[String]>,
    /// Latest value and its time per key.
    values: Vec<Option<(Value, i64)>>,
    /// Latest change per second of numeric keys.
    rates: Vec<Option<f64>>,
    pub last_seen: i64,
    pub offline_since: Option<i64>,
    /// When the condition started to hold (not yet raised).
    pub pending_since: Option<i64>,
    /// The open alert of this device, and when its condition started to hold.
    pub alert: Option<i64>,
}

impl DeviceState {
    /// A device first seen at `now`, for a rule reading `keys` (sorted: `RuleSpec::keys`).
    pub fn new(keys: Arc<[String]>, now: i64) -> DeviceState {
        let n = keys.len();
        DeviceState { keys, values: vec![None; n], rates: vec![None; n], last_seen: now, ..Default::default() }
    }

    fn slot(&self, key: &str) -> Option<usize> {
        self.keys.binary_search_by(|k| k.as_str().cmp(key)).ok()
    }

    /// The latest value of `key`.
    pub fn value(&self, key: &str) -> Option<&Value> {
        self.values.get(self.slot(key)?)?.as_ref().map(|(v, _)| v)
    }

    fn rate(&self, key: &str) -> Option<f64> {
        *self.rates.get(self.slot(key)?)?
    }

    /// Take in the values reported at `ts` (those of the rule's keys).
    pub fn update(&mut self, values: &serde_json::Map<String, Value>, ts: i64, now: i64) {
        for (i, k) in self.keys.iter().enumerate() {
            let Some(v) = values.get(k) else { continue };
            match &mut self.values[i] {
                Some((old, t0)) => {
                    if let (Some(x), Some(x0)) = (num(v), num(old)) {
                        if ts > *t0 {
                            self.rates[i] = Some((x - x0) / ((ts - *t0) as f64 / 1000.0));
                        }
                    }
                    *old = v.clone();
                    *t0 = ts;
                }
                empty => *empty = Some((v.clone(), ts)),
            }
        }
        self.last_seen = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: Value) -> RuleSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn parses_and_judges() {
        let r = spec(
            json!({"target": {"group": 3}, "condition": {"all": [{"key": "t", "op": ">", "value": 80}, {"any": [{"key": "mode", "op": "in", "value": ["a", "b"]}, {"key": "h", "op": "between", "value": [1, 2]}]}]}, "duration_secs": 5}),
        );
        r.validate().unwrap();
        assert!(r.timed() && !r.every_message());
        let keys = r.keys();
        assert_eq!(keys, ["h", "mode", "t"]);
        let mut st = DeviceState::new(keys.into(), 0);
        assert_eq!(r.condition.eval(&st, 0), None);
        st.update(json!({"t": 81, "mode": "b", "other": 1}).as_object().unwrap(), 1000, 1000);
        assert_eq!(r.condition.eval(&st, 1000), Some(true));
        assert_eq!(st.value("other"), None, "only what the rule reads is kept");
        st.update(json!({"t": 80}).as_object().unwrap(), 2000, 2000);
        assert_eq!(r.condition.eval(&st, 2000), Some(false));
        assert_eq!(st.value("mode"), Some(&json!("b")), "a key not in the message keeps its value");
        st.update(json!({"t": 90, "mode": "c", "h": 1.5}).as_object().unwrap(), 3000, 3000);
        assert_eq!(r.condition.eval(&st, 3000), Some(true));
        // The message template's keys and the clear condition's are read too; no-data rules
        // want every message.
        let r = spec(json!({"target": {"device": "x"}, "condition": {"any": [{"no_data_secs": 5}, {"key": "a", "op": ">", "value": 1}]},
            "clear": {"key": "b", "op": "<", "value": 0}, "message": "{device}: {value:c} and {value:a} {value:"}));
        assert_eq!(r.keys(), ["a", "b", "c"]);
        assert!(r.every_message());
    }

    #[test]
    fn rates_no_data_offline() {
        let rate: Expr = serde_json::from_value(json!({"key": "t", "op": ">", "value": 5, "rate_per_secs": 60})).unwrap();
        let mut st = DeviceState::new(vec!["t".to_string()].into(), 0);
        st.update(json!({"t": 10}).as_object().unwrap(), 0, 0);
        assert_eq!(rate.eval(&st, 0), None);
        st.update(json!({"t": 10.05}).as_object().unwrap(), 1000, 1000);
        assert_eq!(rate.eval(&st, 1000), Some(false)); // 3 per minute
        st.update(json!({"t": 10.2}).as_object().unwrap(), 2000, 2000);
        assert_eq!(rate.eval(&st, 2000), Some(true)); // 9 per minute
        let quiet: Expr = serde_json::from_value(json!({"no_data_secs": 10})).unwrap();
        assert_eq!(quiet.eval(&st, 11_999), Some(false));
        assert_eq!(quiet.eval(&st, 12_000), Some(true));
        let off: Expr = serde_json::from_value(json!({"offline_secs": 5})).unwrap();
        assert_eq!(off.eval(&st, 0), Some(false));
        st.offline_since = Some(100);
        assert_eq!(off.eval(&st, 5_100), Some(true));
    }

    #[test]
    fn refuses_bad_rules() {
        for bad in [
            json!({"target": {"device": "x"}, "condition": {"key": "t", "op": ">", "value": "hot"}}),
            json!({"target": {"device": "x"}, "condition": {"key": "t", "op": "between", "value": [1]}}),
            json!({"target": {"device": "x"}, "condition": {"all": []}}),
            json!({"target": {"device": "x"}, "condition": {"no_data_secs": 0}}),
        ] {
            assert!(spec(bad.clone()).validate().is_err(), "{bad}");
        }
        assert!(serde_json::from_value::<RuleSpec>(json!({"target": {"planet": 1}, "condition": {"no_data_secs": 1}})).is_err());
        assert!(serde_json::from_value::<RuleSpec>(json!({"target": {"device": "x"}, "condition": {"key": "t", "op": "~", "value": 1}}))
            .is_err());
    }
}
