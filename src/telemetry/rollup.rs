//! Hourly roll-ups: for every numeric series, each completed UTC hour becomes four points in
//! a second store (`{key}|count`, `|sum`, `|min`, `|max` at the hour's start), kept for
//! `telemetry.rollup_days` (0 = forever) — longer than raw points, so year-long charts stay
//! answerable after raw retention. The maintenance actor rolls up hours that ended more than
//! an hour ago (late points within that hour are included), from a watermark kept in the
//! roll-up store itself. Queries with `source=rollup` combine the hourly parts into any window
//! of whole hours or calendar unit (avg, min, max, sum, count), in zones whose offset is whole
//! hours. A run asks only the devices that stored points in an hour (`Touched`), except for
//! hours that began before the node started; hours that get points after they were rolled up
//! (back-filled history) are rolled up again at the next run. Embedded and PostgreSQL stores; not TDengine (it has its own downsampling).
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

/// Most device-hours remembered (about 40 B each); beyond, the hours known so far are
/// forgotten and rolled up over every device, as after a restart.
const MAX_TOUCHED: usize = 2_000_000;

/// Which devices have numeric points in which hours, noted as points are stored, so a run
/// rolls up only the devices that reported in an hour instead of asking every device of the
/// fleet (and rolls up again the hours that got points after they were rolled up: back-filled
/// history, devices that were offline for hours). Kept in memory: for hours that began before
/// the node started (`complete_from`) it is not known who wrote points, so a run rolls those
/// up over every device; late points stored before a restart are forgotten (see README).
pub struct Touched {
    inner: std::sync::Mutex<TouchedInner>,
}

struct TouchedInner {
    hours: BTreeMap<i64, std::collections::HashSet<i64>>,
    len: usize,
    /// Hours from this one on are fully known.
    complete_from: i64,
}

impl Default for Touched {
    fn default() -> Self {
        Touched::since(now_ms())
    }
}

/// What one run rolls up.
#[derive(Debug, Default, PartialEq)]
struct Plan {
    /// Hours before the window that got points after they were rolled up, with their devices.
    late: Vec<(i64, Vec<i64>)>,
    /// Hours of the window nobody knows the writers of: rolled up over every device.
    full: Option<(i64, i64)>,
    /// Hours of the window with the devices that wrote in them.
    known: Vec<(i64, Vec<i64>)>,
}

impl Touched {
    /// Knowledge starting at `start` (ms): complete from the next whole hour.
    fn since(start: i64) -> Touched {
        let complete_from = (start + HOUR - 1).div_euclid(HOUR) * HOUR;
        Touched { inner: std::sync::Mutex::new(TouchedInner { hours: BTreeMap::new(), len: 0, complete_from }) }
    }

    /// Note the device-hours of stored numeric points (one entry per device and hour).
    pub fn note(&self, points: &[Point]) {
        let mut last = None;
        let mut pairs = points
            .iter()
            .filter(|p| numeric(&p.value).is_some())
            .map(|p| (p.device_id, p.ts.div_euclid(HOUR) * HOUR))
            .filter(|pair| last.replace(*pair) != Some(*pair))
            .peekable();
        if pairs.peek().is_none() {
            return;
        }
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (device, hour) in pairs {
            if m.hours.entry(hour).or_default().insert(device) {
                m.len += 1;
            }
        }
        if m.len > MAX_TOUCHED {
            tracing::warn!(
                max = MAX_TOUCHED,
                "too many device-hours waiting for their roll-up: forgotten; the hours until now are rolled up over every device, back-filled older hours keep their old roll-up"
            );
            m.hours.clear();
            m.len = 0;
            m.complete_from = (now_ms() + HOUR - 1).div_euclid(HOUR) * HOUR;
        }
    }

    /// Take what a run over the window [from, to) rolls up; later hours stay.
    fn plan(&self, from: i64, to: i64) -> Plan {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let later = m.hours.split_off(&to.max(from));
        let taken = std::mem::replace(&mut m.hours, later);
        m.len = m.hours.values().map(|d| d.len()).sum();
        let mut plan = Plan::default();
        let known_from = m.complete_from.max(from);
        if to > from && known_from > from {
            plan.full = Some((from, known_from.min(to)));
        }
        for (hour, devices) in taken {
            let mut devices: Vec<i64> = devices.into_iter().collect();
            devices.sort_unstable();
            if hour < from {
                plan.late.push((hour, devices));
            } else if hour >= known_from {
                plan.known.push((hour, devices));
            }
        }
        plan
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
    let plan = t.touched.plan(from, to);
    let mut hours = plan.late.len() as i64;
    // Late points first, then the window: hours nobody knows the writers of over every device,
    // the others over the devices that wrote in them.
    for (hour, devices) in plan.late.iter().chain(&plan.known) {
        for chunk in devices.chunks(500) {
            let mut out = Vec::new();
            for d in chunk {
                out.extend(roll_device(t, *d, *hour, hour + HOUR).await.map_err(e)?);
            }
            r.write_batch(out).await.map_err(e)?;
        }
    }
    if let Some((a, b)) = plan.full {
        let mut after = 0;
        loop {
            let devices = t.meta.list_devices(after, 500, None, None).await.map_err(|x| x.to_string())?;
            let Some(last) = devices.last() else { break };
            after = last.id;
            let mut out = Vec::new();
            for d in &devices {
                out.extend(roll_device(t, d.id, a, b).await.map_err(e)?);
            }
            r.write_batch(out).await.map_err(e)?;
        }
    }
    if to > from {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(device_id: i64, ts: i64) -> Point {
        Point { device_id, key: "t".into(), ts, value: Value::Number(1.0) }
    }

    #[test]
    fn a_run_asks_only_the_devices_that_wrote_in_an_hour() {
        // The node started at 10:30: hours from 11:00 on are fully known.
        let t = Touched::since(10 * HOUR + HOUR / 2);
        let text = Point { value: Value::Text("x".into()), ..pt(9, 12 * HOUR) };
        t.note(&[pt(1, 12 * HOUR), pt(1, 12 * HOUR + 5), pt(2, 12 * HOUR + 9), pt(3, 11 * HOUR), text, pt(4, 3 * HOUR), pt(5, 14 * HOUR)]);
        // Window 10:00..13:00 (watermark at 10:00): 10:00 began before the start, so every
        // device; 11:00 and 12:00 only their writers; 03:00 is late; 14:00 waits.
        let plan = t.plan(10 * HOUR, 13 * HOUR);
        assert_eq!(
            plan,
            Plan {
                late: vec![(3 * HOUR, vec![4])],
                full: Some((10 * HOUR, 11 * HOUR)),
                known: vec![(11 * HOUR, vec![3]), (12 * HOUR, vec![1, 2])],
            }
        );
        // The next run: only the hour that waited, and a point back-filled into a rolled hour.
        t.note(&[pt(6, 12 * HOUR)]);
        let plan = t.plan(13 * HOUR, 15 * HOUR);
        assert_eq!(plan, Plan { late: vec![(12 * HOUR, vec![6])], full: None, known: vec![(14 * HOUR, vec![5])] });
        assert_eq!(t.plan(15 * HOUR, 16 * HOUR), Plan::default());
    }
}
