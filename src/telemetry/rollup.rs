//! Hourly roll-ups: for every numeric series, each completed UTC hour becomes four points in
//! a second store (`{key}|count`, `|sum`, `|min`, `|max` at the hour's start), kept for
//! `telemetry.rollup_days` (0 = forever) — longer than raw points, so year-long charts stay
//! answerable after raw retention. The maintenance actor rolls up hours that ended more than
//! an hour ago (late points within that hour are included), from a watermark kept in the
//! roll-up store itself. Queries with `source=rollup` combine the hourly parts into any window
//! of whole hours or calendar unit (avg, min, max, sum, count), in zones whose offset is whole
//! hours. Hours that get points after they were rolled up (back-filled history) are rolled
//! up again at the next run. Embedded and PostgreSQL stores; not TDengine (it has its own downsampling).
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

/// Most device-hours of late points remembered for the next run (beyond, they are logged).
const MAX_LATE: usize = 1_000_000;

/// Hours that received points after the run that rolled them up could have seen them
/// (back-filled history, devices that were offline for hours): the next run rolls them up
/// again. Kept in memory: a restart forgets them (see README).
#[derive(Default)]
pub struct Late {
    hours: std::sync::Mutex<BTreeMap<i64, std::collections::HashSet<i64>>>,
    len: std::sync::atomic::AtomicUsize,
}

impl Late {
    /// Note the hours of stored numeric points in hours a run may have rolled up already
    /// (ended more than an hour ago); a live device's points are younger and cost nothing.
    pub fn note(&self, points: &[Point]) {
        use std::sync::atomic::Ordering::Relaxed;
        let recent = (now_ms() - HOUR).div_euclid(HOUR) * HOUR;
        let mut late = points.iter().filter(|p| p.ts < recent && numeric(&p.value).is_some()).peekable();
        if late.peek().is_none() {
            return;
        }
        let mut m = self.hours.lock().unwrap_or_else(|e| e.into_inner());
        for p in late {
            if self.len.load(Relaxed) >= MAX_LATE {
                tracing::warn!(max = MAX_LATE, "too many back-filled device-hours waiting for their roll-up; older ones stay without one");
                return;
            }
            if m.entry(p.ts.div_euclid(HOUR) * HOUR).or_default().insert(p.device_id) {
                self.len.fetch_add(1, Relaxed);
            }
        }
    }

    fn take(&self) -> BTreeMap<i64, std::collections::HashSet<i64>> {
        let m = std::mem::take(&mut *self.hours.lock().unwrap_or_else(|e| e.into_inner()));
        self.len.store(0, std::sync::atomic::Ordering::Relaxed);
        m
    }
}

/// Roll up the completed hours since the watermark, and the earlier hours that received late
/// points; returns the hours rolled up.
pub async fn run(t: &Telemetry) -> Result<i64, String> {
    let Some(r) = &t.rollup else { return Ok(0) };
    let e = |x: TsError| x.to_string();
    let end = (now_ms() - HOUR).div_euclid(HOUR) * HOUR;
    let mark = r.latest(&[0]).await.map_err(e)?.into_iter().find(|p| p.key == MARK_KEY).and_then(|p| numeric(&p.value)).map(|v| v as i64);
    let from = mark.unwrap_or(end - FIRST_LOOKBACK);
    let to = end.min(from + MAX_HOURS_PER_RUN * HOUR);
    let mut hours = 0;
    // Late points first: only the hours before the window below (it covers the rest).
    for (hour, devices) in t.late.take().into_iter().filter(|(h, _)| *h < from) {
        for d in devices {
            r.write_batch(roll_device(t, d, hour, hour + HOUR).await.map_err(e)?).await.map_err(e)?;
        }
        hours += 1;
    }
    if to > from {
        let mut after = 0;
        loop {
            let devices = t.meta.list_devices(after, 500, None, None).await.map_err(|x| x.to_string())?;
            let Some(last) = devices.last() else { break };
            after = last.id;
            let mut out = Vec::new();
            for d in &devices {
                out.extend(roll_device(t, d.id, from, to).await.map_err(e)?);
            }
            r.write_batch(out).await.map_err(e)?;
        }
        r.write_batch(vec![Point { device_id: 0, key: MARK_KEY.into(), ts: to, value: Value::Number(to as f64) }]).await.map_err(e)?;
        hours += (to - from) / HOUR;
    }
    r.flush().await.map_err(e)?;
    Ok(hours)
}

/// The roll-up points of one device's numeric series over the whole hours in [from, to).
async fn roll_device(t: &Telemetry, device: i64, from: i64, to: i64) -> Result<Vec<Point>, TsError> {
    let mut out = Vec::new();
    // Numeric series of the device (its latest values name its keys).
    let keys: Vec<String> = t.store.latest(&[device]).await?.into_iter().filter(|p| numeric(&p.value).is_some()).map(|p| p.key).collect();
    for key in keys {
        let mut hours: BTreeMap<i64, Part> = BTreeMap::new();
        let mut q = RangeQuery { device_id: device, keys: vec![key.clone()], from, to, limit: MAX_PAGE, after: None };
        loop {
            let page = t.store.range(&q).await?;
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
                out.push(Point { device_id: device, key: format!("{key}|{name}"), ts, value: Value::Number(v) });
            }
        }
    }
    Ok(out)
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
