//! Aggregates by time window over a series' points: avg, min, max, sum, count, first, last,
//! diff (last − first). Non-numeric values count but do not add; booleans add as 0/1.
//!
//! Windows ([`Window`]): fixed sizes (`30s`, `5m`, `1h`, `6h`) are aligned to the wall clock of
//! the query's time zone (an hour bucket in Asia/Kolkata starts at :30 UTC), and calendar units
//! (`1d`, `1w` from Monday, `1mo`) start at local midnight, so a day bucket in Europe/Berlin is
//! 23 or 25 hours long on DST days. Every backend buckets by these rules ([`bucket_start`];
//! PostgreSQL evaluates the same formula in SQL).
use chrono::{Datelike, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
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

impl std::str::FromStr for Func {
    type Err = String;
    fn from_str(s: &str) -> Result<Func, String> {
        serde_json::from_value(serde_json::Value::String(s.to_ascii_lowercase()))
            .map_err(|_| format!("unknown function {s:?}: avg, min, max, sum, count, first, last or diff"))
    }
}

impl Func {
    pub fn name(self) -> &'static str {
        match self {
            Func::Avg => "avg",
            Func::Min => "min",
            Func::Max => "max",
            Func::Sum => "sum",
            Func::Count => "count",
            Func::First => "first",
            Func::Last => "last",
            Func::Diff => "diff",
        }
    }
}

/// A bucket size: a fixed number of milliseconds, or a calendar unit in the query's zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Fixed(i64),
    Day,
    Week,
    Month,
}

/// Smallest window and most buckets a query may ask for.
pub const MIN_WINDOW_MS: i64 = 1_000;

impl std::str::FromStr for Window {
    type Err = String;
    /// `30s`, `5m`, `1h`, `12h` (fixed); `1d`, `1w`, `1mo` (calendar).
    fn from_str(s: &str) -> Result<Window, String> {
        let bad = || format!("bad window {s:?}: a number and s, m or h (e.g. 15m, 1h), or 1d, 1w, 1mo");
        match s {
            "1d" => return Ok(Window::Day),
            "1w" => return Ok(Window::Week),
            "1mo" => return Ok(Window::Month),
            _ => {}
        }
        let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let (n, unit) = s.split_at(split);
        let n: i64 = n.parse().map_err(|_| bad())?;
        let ms = match unit {
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return Err(bad()),
        };
        let w = n.checked_mul(ms).filter(|w| (MIN_WINDOW_MS..=366 * 86_400_000).contains(w)).ok_or_else(bad)?;
        Ok(Window::Fixed(w))
    }
}

/// Offset of `tz` from UTC at `ts` (ms).
pub fn offset_ms(ts: i64, tz: Tz) -> i64 {
    use chrono::Offset;
    match Utc.timestamp_millis_opt(ts).single() {
        Some(t) => t.with_timezone(&tz).offset().fix().local_minus_utc() as i64 * 1000,
        None => 0,
    }
}

/// The start (UTC ms) of the bucket holding `ts`.
pub fn bucket_start(ts: i64, w: Window, tz: Tz) -> i64 {
    if let Window::Fixed(ms) = w {
        let off = offset_ms(ts, tz);
        return ts - (ts + off).rem_euclid(ms);
    }
    let Some(t) = Utc.timestamp_millis_opt(ts).single() else { return ts };
    let local = t.with_timezone(&tz).date_naive();
    let day = match w {
        Window::Week => local - chrono::Days::new(local.weekday().num_days_from_monday() as u64),
        Window::Month => local.with_day(1).unwrap_or(local),
        _ => local,
    };
    let midnight = day.and_time(NaiveTime::MIN);
    match tz.from_local_datetime(&midnight).earliest() {
        Some(m) => m.timestamp_millis(),
        // Midnight skipped by a DST change: the bucket starts when the day does.
        None => tz.from_local_datetime(&(midnight + chrono::Duration::hours(1))).earliest().map_or(ts, |m| m.timestamp_millis()),
    }
}

/// The start of the bucket after the one starting at `start`.
fn next_start(start: i64, w: Window, tz: Tz) -> i64 {
    const HOUR: i64 = 3_600_000;
    match w {
        // A DST change inside a fixed bucket moves the alignment: re-derive from the zone.
        Window::Fixed(ms) if tz == Tz::UTC => start + ms,
        Window::Fixed(ms) => bucket_start(start + ms, w, tz).max(start + 1).min(start + ms),
        // Days are 23 to 25 hours: 26 hours on is inside the next day; likewise weeks, months.
        Window::Day => bucket_start(start + 26 * HOUR, w, tz),
        Window::Week => bucket_start(start + 7 * 24 * HOUR + 2 * HOUR, w, tz),
        Window::Month => bucket_start(start + 32 * 24 * HOUR, w, tz),
    }
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
        let Some(x) = super::numeric(v) else { return };
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

/// (window start, value) per non-empty window of `window_ms` (UTC), from time-ordered points.
pub fn by_window(points: &[(i64, Value)], window_ms: i64, f: Func) -> Vec<(i64, f64)> {
    buckets(points, Window::Fixed(window_ms.max(1)), Tz::UTC, f)
}

/// (bucket start, value) per non-empty bucket, from time-ordered points.
pub fn buckets(points: &[(i64, Value)], w: Window, tz: Tz, f: Func) -> Vec<(i64, f64)> {
    let mut out = Vec::new();
    let mut cur: Option<(i64, Acc)> = None;
    // The current bucket's [start, end): the zone arithmetic runs once per bucket, not per point.
    let mut span = (i64::MAX, i64::MIN);
    for (t, v) in points {
        if *t < span.0 || *t >= span.1 {
            let s = bucket_start(*t, w, tz);
            span = (s, next_start(s, w, tz).max(*t + 1));
        }
        let start = span.0;
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

    #[test]
    fn zones_and_calendar_buckets() {
        use chrono::TimeZone;
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        let kolkata: Tz = "Asia/Kolkata".parse().unwrap();
        let ms = |y, mo, d, h, mi| Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap().timestamp_millis();
        // Hour buckets in +05:30 start at :30 UTC.
        assert_eq!(bucket_start(ms(2026, 1, 5, 10, 10), Window::Fixed(3_600_000), kolkata), ms(2026, 1, 5, 9, 30));
        // A Berlin day starts at 23:00 UTC in winter, 22:00 in summer; the DST day has 23 hours.
        assert_eq!(bucket_start(ms(2026, 1, 5, 22, 59), Window::Day, berlin), ms(2026, 1, 4, 23, 0));
        assert_eq!(bucket_start(ms(2026, 1, 5, 23, 0), Window::Day, berlin), ms(2026, 1, 5, 23, 0));
        let dst_day = bucket_start(ms(2026, 3, 29, 12, 0), Window::Day, berlin);
        assert_eq!(dst_day, ms(2026, 3, 28, 23, 0));
        assert_eq!(bucket_start(ms(2026, 3, 29, 22, 30), Window::Day, berlin) - dst_day, 23 * 3_600_000);
        // Weeks start on Monday, months on the 1st (local).
        assert_eq!(bucket_start(ms(2026, 1, 8, 12, 0), Window::Week, berlin), ms(2026, 1, 4, 23, 0));
        assert_eq!(bucket_start(ms(2026, 3, 1, 0, 30), Window::Month, berlin), ms(2026, 2, 28, 23, 0));
        assert_eq!("15m".parse::<Window>(), Ok(Window::Fixed(900_000)));
        assert_eq!("1mo".parse::<Window>(), Ok(Window::Month));
        for bad in ["", "0s", "1", "5x", "2d", "99999999999h", "1ms"] {
            assert!(bad.parse::<Window>().is_err(), "{bad}");
        }
        assert_eq!("AVG".parse::<Func>(), Ok(Func::Avg));
        assert!("median".parse::<Func>().is_err());
    }
}
