//! Aggregates by time window over a series' points: avg, min, max, sum, count, first, last,
//! diff (last − first). Fixed UTC windows aligned to the epoch for now (calendar, time-zone
//! aware buckets come with the query API). Non-numeric values count but do not add.
use serde::{Deserialize, Serialize};

use super::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Func {
    Avg,
    Min,
    Max,
    Sum,
    Count,
    First,
    Last,
    Diff,
}

#[derive(Default, Clone, Copy)]
struct Acc {
    count: u64,
    n: u64,
    sum: f64,
    min: f64,
    max: f64,
    first: Option<f64>,
    last: Option<f64>,
}

impl Acc {
    fn add(&mut self, v: &Value) {
        self.count += 1;
        let x = match v {
            Value::Number(x) => *x,
            Value::Bool(b) => *b as u8 as f64,
            _ => return,
        };
        if self.n == 0 {
            (self.min, self.max) = (x, x);
        }
        self.n += 1;
        self.sum += x;
        self.min = self.min.min(x);
        self.max = self.max.max(x);
        self.first.get_or_insert(x);
        self.last = Some(x);
    }

    fn result(&self, f: Func) -> Option<f64> {
        if f == Func::Count {
            return Some(self.count as f64);
        }
        if self.n == 0 {
            return None;
        }
        Some(match f {
            Func::Avg => self.sum / self.n as f64,
            Func::Min => self.min,
            Func::Max => self.max,
            Func::Sum => self.sum,
            Func::First => self.first.unwrap_or(f64::NAN),
            Func::Last => self.last.unwrap_or(f64::NAN),
            Func::Diff => self.last.unwrap_or(0.0) - self.first.unwrap_or(0.0),
            Func::Count => unreachable!("handled above"),
        })
    }
}

/// (window start, value) per non-empty window of `window_ms`, from time-ordered points.
pub fn by_window(points: &[(i64, Value)], window_ms: i64, f: Func) -> Vec<(i64, f64)> {
    let w = window_ms.max(1);
    let mut out = Vec::new();
    let mut cur: Option<(i64, Acc)> = None;
    for (t, v) in points {
        let start = t.div_euclid(w) * w;
        match &mut cur {
            Some((s, acc)) if *s == start => acc.add(v),
            _ => {
                if let Some((s, acc)) = cur.take() {
                    out.extend(acc.result(f).map(|r| (s, r)));
                }
                let mut acc = Acc::default();
                acc.add(v);
                cur = Some((start, acc));
            }
        }
    }
    if let Some((s, acc)) = cur {
        out.extend(acc.result(f).map(|r| (s, r)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_and_functions() {
        let pts: Vec<(i64, Value)> =
            [(0, 1.0), (10, 3.0), (59, 2.0), (60, 10.0), (185, 7.0)].into_iter().map(|(t, v)| (t, Value::Number(v))).collect();
        let at = |f| by_window(&pts, 60, f);
        assert_eq!(at(Func::Avg), vec![(0, 2.0), (60, 10.0), (180, 7.0)]);
        assert_eq!(at(Func::Min)[0], (0, 1.0));
        assert_eq!(at(Func::Max)[0], (0, 3.0));
        assert_eq!(at(Func::Sum)[0], (0, 6.0));
        assert_eq!(at(Func::Count)[0], (0, 3.0));
        assert_eq!(at(Func::First)[0], (0, 1.0));
        assert_eq!(at(Func::Last)[0], (0, 2.0));
        assert_eq!(at(Func::Diff)[0], (0, 1.0));
        let text = vec![(0, Value::Text("a".into())), (1, Value::Bool(true))];
        assert_eq!(by_window(&text, 60, Func::Count), vec![(0, 2.0)]);
        assert_eq!(by_window(&text, 60, Func::Avg), vec![(0, 1.0)]);
        assert_eq!(by_window(&[(-1, Value::Number(1.0))], 60, Func::Avg), vec![(-60, 1.0)], "windows align below zero too");
        assert!(by_window(&[], 60, Func::Avg).is_empty());
    }
}
