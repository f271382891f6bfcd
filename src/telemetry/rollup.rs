//! Hourly roll-ups: for every numeric series, each completed UTC hour becomes four points in
//! a second store (`{key}|count`, `|sum`, `|min`, `|max` at the hour's start), kept for
//! `telemetry.rollup_days` (0 = forever) — longer than raw points, so year-long charts stay
//! answerable after raw retention. The maintenance actor rolls up hours that ended more than
//! an hour ago (late points within that hour are included), from a watermark kept in the
//! roll-up store itself. Queries with `source=rollup` combine the hourly parts into any window
//! of whole hours or calendar unit (avg, min, max, sum, count), in zones whose offset is whole
//! hours. Embedded and PostgreSQL stores; not TDengine (it has its own downsampling).
use std::collections::BTreeMap;

use super::Telemetry;
use crate::storage::meta::now_ms;
use crate::storage::timeseries::aggregate::{bucket_start, offset_ms};
use crate::storage::timeseries::{numeric, AggQuery, Bucket, Func, Point, RangeQuery, TimeSeriesStore, TsError, Value, Window, MAX_PAGE};

const HOUR: i64 = 3_600_000;
/// The watermark's series in the roll-up store (device 0 is never a real device).
const MARK_KEY: &str = "__rolled_up_to";
/// Most hours one run rolls up (the rest follow at the next runs).
const MAX_HOURS_PER_RUN: i64 = 24 * 7;
/// A fresh store starts rolling up this far back.
const FIRST_LOOKBACK: i64 = 2 * 24 * HOUR;
const PARTS: [&str; 4] = ["count", "sum", "min", "max"];

#[derive(Default, Clone, Copy)]
struct Part {
    count: f64,
    sum: f64,
    min: f64,
    max: f64,
}

impl Part {
    fn add(&mut self, x: f64) {
        if self.count == 0.0 {
            (self.min, self.max) = (x, x);
        }
        self.count += 1.0;
        self.sum += x;
        self.min = self.min.min(x);
        self.max = self.max.max(x);
    }

    fn merge(&mut self, o: &Part) {
        if o.count == 0.0 {
            return;
        }
        if self.count == 0.0 {
            *self = *o;
            return;
        }
        self.count += o.count;
        self.sum += o.sum;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
    }
}

/// Roll up the completed hours since the watermark; returns the hours rolled up.
pub async fn run(t: &Telemetry) -> Result<i64, String> {
    let Some(r) = &t.rollup else { return Ok(0) };
    let e = |x: TsError| x.to_string();
    let end = (now_ms() - HOUR).div_euclid(HOUR) * HOUR;
    let mark = r.latest(&[0]).await.map_err(e)?.into_iter().find(|p| p.key == MARK_KEY).and_then(|p| numeric(&p.value)).map(|v| v as i64);
    let from = mark.unwrap_or(end - FIRST_LOOKBACK);
    let to = end.min(from + MAX_HOURS_PER_RUN * HOUR);
    if to <= from {
        return Ok(0);
    }
    let mut after = 0;
    loop {
        let devices = t.meta.list_devices(after, 500, None, None).await.map_err(|x| x.to_string())?;
        let Some(last) = devices.last() else { break };
        after = last.id;
        let mut out = Vec::new();
        for d in &devices {
            // Numeric series of the device (its latest values name its keys).
            let keys: Vec<String> =
                t.store.latest(&[d.id]).await.map_err(e)?.into_iter().filter(|p| numeric(&p.value).is_some()).map(|p| p.key).collect();
            for key in keys {
                let mut hours: BTreeMap<i64, Part> = BTreeMap::new();
                let mut q = RangeQuery { device_id: d.id, keys: vec![key.clone()], from, to, limit: MAX_PAGE, after: None };
                loop {
                    let page = t.store.range(&q).await.map_err(e)?;
                    for p in &page.points {
                        if let Some(x) = numeric(&p.value) {
                            hours.entry(p.ts.div_euclid(HOUR) * HOUR).or_default().add(x);
                        }
                    }
                    match page.next {
                        Some(c) => q.after = Some(c),
                        None => break,
                    }
                }
                for (ts, part) in hours {
                    for (name, v) in PARTS.iter().zip([part.count, part.sum, part.min, part.max]) {
                        out.push(Point { device_id: d.id, key: format!("{key}|{name}"), ts, value: Value::Number(v) });
                    }
                }
            }
        }
        r.write_batch(out).await.map_err(e)?;
    }
    r.write_batch(vec![Point { device_id: 0, key: MARK_KEY.into(), ts: to, value: Value::Number(to as f64) }]).await.map_err(e)?;
    r.flush().await.map_err(e)?;
    Ok((to - from) / HOUR)
}

/// An aggregate answered from roll-ups.
pub async fn aggregate(t: &Telemetry, q: &AggQuery) -> Result<Vec<Bucket>, TsError> {
    let Some(r) = &t.rollup else { return Err(TsError::BadQuery("this store keeps no roll-ups".into())) };
    if let Window::Fixed(w) = q.window {
        if w % HOUR != 0 {
            return Err(TsError::BadQuery("roll-ups answer windows of whole hours (1h, 6h, 1d, 1w, 1mo)".into()));
        }
    }
    if offset_ms(q.from, q.tz) % HOUR != 0 {
        return Err(TsError::BadQuery("roll-ups are hourly in UTC: use a zone whose offset is whole hours".into()));
    }
    if !matches!(q.func, Func::Avg | Func::Min | Func::Max | Func::Sum | Func::Count) {
        return Err(TsError::BadQuery("roll-ups keep count, sum, min and max: avg, min, max, sum or count".into()));
    }
    q.check()?;
    let keys: Vec<String> = PARTS.iter().map(|p| format!("{}|{p}", q.key)).collect();
    let mut out = Vec::new();
    for d in &q.devices {
        let mut hours: BTreeMap<i64, [f64; 4]> = BTreeMap::new();
        let mut rq = RangeQuery { device_id: *d, keys: keys.clone(), from: q.from, to: q.to, limit: MAX_PAGE, after: None };
        loop {
            let page = r.range(&rq).await?;
            for p in &page.points {
                let Some(i) = keys.iter().position(|k| *k == p.key) else { continue };
                hours.entry(p.ts).or_insert([0.0, 0.0, f64::NAN, f64::NAN])[i] = numeric(&p.value).unwrap_or(f64::NAN);
            }
            match page.next {
                Some(c) => rq.after = Some(c),
                None => break,
            }
        }
        let mut buckets: BTreeMap<i64, Part> = BTreeMap::new();
        for (ts, [count, sum, min, max]) in hours {
            buckets.entry(bucket_start(ts, q.window, q.tz)).or_default().merge(&Part { count, sum, min, max });
        }
        for (start, p) in buckets {
            if p.count == 0.0 {
                continue;
            }
            let value = match q.func {
                Func::Avg => p.sum / p.count,
                Func::Min => p.min,
                Func::Max => p.max,
                Func::Sum => p.sum,
                _ => p.count,
            };
            out.push(Bucket { device_id: *d, start, value });
        }
    }
    Ok(out)
}
