//! Transform and cleaning rules of a product, applied to a device's key/values before they are
//! stored: rename, scale/offset, unit conversion, clamp or drop out-of-range values, drop keys,
//! and derived keys computed from an expression over other keys (`exmex`: arithmetic and math
//! functions only, no user code is run). Rules are checked when saved ([`RuleSet::compile`])
//! and the reason of a refusal names the rule.
use std::collections::BTreeMap;

use exmex::prelude::*;
use serde::{Deserialize, Serialize};

use crate::storage::timeseries::Value;

/// Most rules per product, and the longest expression.
pub const MAX_RULES: usize = 100;
pub const MAX_EXPR: usize = 1000;

/// One rule as declared (JSON: `{"op": "scale", "key": "t", "factor": 0.1}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Rule {
    Rename {
        from: String,
        to: String,
    },
    /// value × factor + offset.
    Scale {
        key: String,
        #[serde(default = "one")]
        factor: f64,
        #[serde(default)]
        offset: f64,
    },
    /// Between units of one dimension (see [`UNITS`]).
    Convert {
        key: String,
        from: String,
        to: String,
    },
    /// Out-of-range values become the bound.
    Clamp {
        key: String,
        min: f64,
        max: f64,
    },
    /// Out-of-range values are dropped (not stored).
    DropOutOfRange {
        key: String,
        min: f64,
        max: f64,
    },
    DropKey {
        key: String,
    },
    /// A new key from numeric keys, e.g. `"power": "voltage * current"`; dotted keys in braces:
    /// `{env.hum} / 100`. Skipped for a message that lacks one of the keys.
    Derive {
        key: String,
        expr: String,
    },
}

fn one() -> f64 {
    1.0
}

/// Units and their (dimension, factor to the dimension's base, offset to it).
pub const UNITS: &[(&str, &str, f64, f64)] = &[
    ("C", "temperature", 1.0, 0.0),
    ("K", "temperature", 1.0, -273.15),
    ("F", "temperature", 5.0 / 9.0, -32.0 * 5.0 / 9.0),
    ("Pa", "pressure", 1.0, 0.0),
    ("hPa", "pressure", 100.0, 0.0),
    ("kPa", "pressure", 1000.0, 0.0),
    ("bar", "pressure", 100_000.0, 0.0),
    ("psi", "pressure", 6894.757293168, 0.0),
    ("mm", "length", 0.001, 0.0),
    ("cm", "length", 0.01, 0.0),
    ("m", "length", 1.0, 0.0),
    ("km", "length", 1000.0, 0.0),
    ("in", "length", 0.0254, 0.0),
    ("ft", "length", 0.3048, 0.0),
    ("W", "power", 1.0, 0.0),
    ("kW", "power", 1000.0, 0.0),
    ("Wh", "energy", 1.0, 0.0),
    ("kWh", "energy", 1000.0, 0.0),
    ("J", "energy", 1.0 / 3600.0, 0.0),
    ("mA", "current", 0.001, 0.0),
    ("A", "current", 1.0, 0.0),
    ("mV", "voltage", 0.001, 0.0),
    ("V", "voltage", 1.0, 0.0),
];

fn unit(u: &str) -> Option<(&'static str, f64, f64)> {
    UNITS.iter().find(|(n, ..)| *n == u).map(|(_, d, f, o)| (*d, *f, *o))
}

enum Step {
    Rename(String, String),
    Linear(String, f64, f64),
    Clamp(String, f64, f64),
    DropOut(String, f64, f64),
    DropKey(String),
    Derive(String, Box<FlatEx<f64>>, Vec<String>),
}

/// A product's rules, checked and ready to apply.
pub struct RuleSet {
    steps: Vec<Step>,
}

fn key_ok(i: usize, k: &str) -> Result<(), String> {
    if k.is_empty() || k.len() > crate::storage::timeseries::point::MAX_KEY {
        return Err(format!("rule {i}: keys must be 1..{} bytes", crate::storage::timeseries::point::MAX_KEY));
    }
    Ok(())
}

fn finite(i: usize, what: &str, v: f64) -> Result<(), String> {
    if !v.is_finite() {
        return Err(format!("rule {i}: {what} must be a finite number"));
    }
    Ok(())
}

impl RuleSet {
    /// Check and prepare rules; the error says which rule is wrong and why.
    pub fn compile(rules: &[Rule]) -> Result<RuleSet, String> {
        if rules.len() > MAX_RULES {
            return Err(format!("at most {MAX_RULES} rules per product"));
        }
        let mut steps = Vec::with_capacity(rules.len());
        for (i, r) in rules.iter().enumerate() {
            let step = match r {
                Rule::Rename { from, to } => {
                    key_ok(i, from)?;
                    key_ok(i, to)?;
                    if from == to {
                        return Err(format!("rule {i}: rename to the same key"));
                    }
                    Step::Rename(from.clone(), to.clone())
                }
                Rule::Scale { key, factor, offset } => {
                    key_ok(i, key)?;
                    finite(i, "factor", *factor)?;
                    finite(i, "offset", *offset)?;
                    Step::Linear(key.clone(), *factor, *offset)
                }
                Rule::Convert { key, from, to } => {
                    key_ok(i, key)?;
                    let (Some((df, ff, of)), Some((dt, ft, ot))) = (unit(from), unit(to)) else {
                        return Err(format!(
                            "rule {i}: unknown unit (known: {})",
                            UNITS.iter().map(|u| u.0).collect::<Vec<_>>().join(", ")
                        ));
                    };
                    if df != dt {
                        return Err(format!("rule {i}: cannot convert {df} ({from}) to {dt} ({to})"));
                    }
                    // base = v·ff + of; v' = (base − ot) / ft.
                    Step::Linear(key.clone(), ff / ft, (of - ot) / ft)
                }
                Rule::Clamp { key, min, max } | Rule::DropOutOfRange { key, min, max } => {
                    key_ok(i, key)?;
                    finite(i, "min", *min)?;
                    finite(i, "max", *max)?;
                    if min > max {
                        return Err(format!("rule {i}: min is above max"));
                    }
                    match r {
                        Rule::Clamp { .. } => Step::Clamp(key.clone(), *min, *max),
                        _ => Step::DropOut(key.clone(), *min, *max),
                    }
                }
                Rule::DropKey { key } => {
                    key_ok(i, key)?;
                    Step::DropKey(key.clone())
                }
                Rule::Derive { key, expr } => {
                    key_ok(i, key)?;
                    if expr.len() > MAX_EXPR {
                        return Err(format!("rule {i}: expressions are limited to {MAX_EXPR} characters"));
                    }
                    let parsed = FlatEx::<f64>::parse(expr).map_err(|e| format!("rule {i}: {e}"))?;
                    // Variables come in alphabetical order; `{a.b}` names the key `a.b`.
                    let vars: Vec<String> =
                        parsed.var_names().iter().map(|v| v.trim_start_matches('{').trim_end_matches('}').to_string()).collect();
                    Step::Derive(key.clone(), Box::new(parsed), vars)
                }
            };
            steps.push(step);
        }
        Ok(RuleSet { steps })
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Apply in order to one message's key/values.
    pub fn apply(&self, values: &mut BTreeMap<String, Value>) {
        let num = |values: &BTreeMap<String, Value>, k: &str| match values.get(k) {
            Some(Value::Number(n)) => Some(*n),
            _ => None,
        };
        for s in &self.steps {
            match s {
                Step::Rename(from, to) => {
                    if let Some(v) = values.remove(from) {
                        values.insert(to.clone(), v);
                    }
                }
                Step::Linear(k, f, o) => {
                    if let Some(n) = num(values, k) {
                        values.insert(k.clone(), Value::Number(n * f + o));
                    }
                }
                Step::Clamp(k, min, max) => {
                    if let Some(n) = num(values, k) {
                        values.insert(k.clone(), Value::Number(n.clamp(*min, *max)));
                    }
                }
                Step::DropOut(k, min, max) => {
                    if num(values, k).is_some_and(|n| n < *min || n > *max) {
                        values.remove(k);
                    }
                }
                Step::DropKey(k) => {
                    values.remove(k);
                }
                Step::Derive(k, expr, vars) => {
                    let args: Option<Vec<f64>> = vars.iter().map(|v| num(values, v)).collect();
                    if let Some(r) = args.and_then(|a| expr.eval(&a).ok()).filter(|r| r.is_finite()) {
                        values.insert(k.clone(), Value::Number(r));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(j: &str) -> Vec<Rule> {
        serde_json::from_str(j).unwrap()
    }

    fn vals(pairs: &[(&str, Value)]) -> BTreeMap<String, Value> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    #[test]
    fn rules_apply_in_order() {
        let rs = RuleSet::compile(&rules(
            r#"[
            {"op": "rename", "from": "t", "to": "temp_f"},
            {"op": "convert", "key": "temp_f", "from": "F", "to": "C"},
            {"op": "rename", "from": "temp_f", "to": "temp"},
            {"op": "scale", "key": "raw", "factor": 0.1, "offset": -1},
            {"op": "clamp", "key": "hum", "min": 0, "max": 100},
            {"op": "drop_out_of_range", "key": "volt", "min": 0, "max": 400},
            {"op": "drop_key", "key": "debug"},
            {"op": "derive", "key": "power", "expr": "volt * {amp.rms}"},
            {"op": "derive", "key": "missing", "expr": "nope + 1"}
        ]"#,
        ))
        .unwrap();
        let mut v = vals(&[
            ("t", Value::Number(212.0)),
            ("raw", Value::Number(50.0)),
            ("hum", Value::Number(130.0)),
            ("volt", Value::Number(230.0)),
            ("amp.rms", Value::Number(2.0)),
            ("debug", Value::Text("x".into())),
            ("door", Value::Bool(true)),
        ]);
        rs.apply(&mut v);
        let Value::Number(t) = v["temp"] else { panic!() };
        assert!((t - 100.0).abs() < 1e-9, "{t}");
        assert_eq!(v["raw"], Value::Number(4.0));
        assert_eq!(v["hum"], Value::Number(100.0));
        assert_eq!(v["power"], Value::Number(460.0));
        assert_eq!(v["door"], Value::Bool(true));
        assert!(!v.contains_key("debug") && !v.contains_key("missing") && !v.contains_key("t"));
        let mut v = vals(&[("volt", Value::Number(900.0))]);
        rs.apply(&mut v);
        assert!(v.is_empty(), "out of range dropped: {v:?}");
    }

    #[test]
    fn unit_conversions() {
        for (from, to, x, want) in [
            ("C", "F", 100.0, 212.0),
            ("K", "C", 0.0, -273.15),
            ("kWh", "Wh", 1.5, 1500.0),
            ("psi", "kPa", 1.0, 6.894757293168),
            ("in", "cm", 1.0, 2.54),
        ] {
            let rs = RuleSet::compile(&[Rule::Convert { key: "x".into(), from: from.into(), to: to.into() }]).unwrap();
            let mut v = vals(&[("x", Value::Number(x))]);
            rs.apply(&mut v);
            let Value::Number(got) = v["x"] else { panic!() };
            assert!((got - want).abs() < 1e-9, "{from}->{to}: {got} != {want}");
        }
    }

    #[test]
    fn bad_rules_are_refused_with_the_reason() {
        let cases = [
            (r#"[{"op": "convert", "key": "x", "from": "C", "to": "bar"}]"#, "cannot convert"),
            (r#"[{"op": "convert", "key": "x", "from": "C", "to": "parsec"}]"#, "unknown unit"),
            (r#"[{"op": "clamp", "key": "x", "min": 5, "max": 1}]"#, "min is above max"),
            (r#"[{"op": "rename", "from": "a", "to": "a"}]"#, "same key"),
            (r#"[{"op": "derive", "key": "y", "expr": "x + * 2"}]"#, "rule 0"),
            (r#"[{"op": "scale", "key": "", "factor": 2}]"#, "keys must be"),
        ];
        for (j, why) in cases {
            let err = RuleSet::compile(&rules(j)).err().unwrap_or_else(|| panic!("{j} was accepted"));
            assert!(err.contains(why), "{j}: {err}");
        }
        assert!(serde_json::from_str::<Vec<Rule>>(r#"[{"op": "eval", "code": "rm -rf /"}]"#).is_err());
        assert!(RuleSet::compile(&vec![Rule::DropKey { key: "k".into() }; MAX_RULES + 1]).is_err());
    }
}
