//! The time-series conformance suite: one scenario run against every backend — the embedded
//! store, a real PostgreSQL (started by scripts/test; required in CI) and TDengine (only when
//! `TAOS_DSN` points at a server: none can be installed on these machines). Each backend's
//! answers are checked against values computed here from the generated data, then against
//! each other.
use crate::common;

use std::collections::BTreeMap;

use chrono_tz::Tz;
use thingsd::storage::timeseries::embedded::{EmbeddedStore, Shared};
use thingsd::storage::timeseries::postgres::PgStore;
use thingsd::storage::timeseries::tdengine::TdStore;
use thingsd::storage::timeseries::*;

/// 2026-03-28T00:00:00Z: the data spans the night Europe/Berlin moves to summer time.
const T0: i64 = 1_774_656_000_000;
const STEP: i64 = 600_000;
const N: i64 = 3 * 144;
const H: i64 = 3_600_000;
const DEVICES: [i64; 3] = [1, 2, 3];

fn temp(d: i64, i: i64) -> f64 {
    // A deterministic walk at 0.1 resolution.
    ((200 + d * 10 + (i * 7 + d) % 23 - 11) as f64) / 10.0
}

/// Every point as the store must return it (after the overwrites below).
fn dataset() -> Vec<Point> {
    let mut v = Vec::new();
    for d in DEVICES {
        for i in 0..N {
            let ts = T0 + i * STEP;
            let p = |k: &str, value| Point { device_id: d, key: k.into(), ts, value };
            v.push(p("temp", Value::Number(temp(d, i))));
            v.push(p("env.hum", Value::Number((40 + i % 7) as f64)));
            if i % 6 == 0 {
                v.push(p("door", Value::Bool(i % 12 == 0)));
                v.push(p("mode", Value::Text(if i % 18 == 0 { "eco, quiet".into() } else { "say \"hi\"".into() })));
            }
            if i % 72 == 0 {
                v.push(p("cfg", Value::Json(format!("[{i},{d}]"))));
            }
        }
    }
    v
}

fn expected_range(all: &[Point], d: i64, keys: &[&str], from: i64, to: i64) -> Vec<Point> {
    let mut v: Vec<Point> = all
        .iter()
        .filter(|p| p.device_id == d && p.ts >= from && p.ts < to && (keys.is_empty() || keys.contains(&p.key.as_str())))
        .cloned()
        .collect();
    v.sort_by(|a, b| (a.ts, &a.key).cmp(&(b.ts, &b.key)));
    v
}

/// Aggregate by hand over explicit bucket boundaries.
fn expected_agg(all: &[Point], devices: &[i64], key: &str, bounds: &[i64], f: Func) -> Vec<Bucket> {
    let mut out = Vec::new();
    for d in devices {
        for w in bounds.windows(2) {
            let pts: Vec<&Point> = all.iter().filter(|p| p.device_id == *d && p.key == key && p.ts >= w[0] && p.ts < w[1]).collect();
            let mut sorted = pts.clone();
            sorted.sort_by_key(|p| p.ts);
            let nums: Vec<f64> = sorted
                .iter()
                .filter_map(|p| match p.value {
                    Value::Number(x) => Some(x),
                    Value::Bool(b) => Some(b as u8 as f64),
                    _ => None,
                })
                .collect();
            let value = match f {
                Func::Count if !pts.is_empty() => Some(pts.len() as f64),
                Func::Count => None,
                _ if nums.is_empty() => None,
                Func::Avg => Some(nums.iter().sum::<f64>() / nums.len() as f64),
                Func::Sum => Some(nums.iter().sum()),
                Func::Min => nums.iter().copied().reduce(f64::min),
                Func::Max => nums.iter().copied().reduce(f64::max),
                Func::First => nums.first().copied(),
                Func::Last => nums.last().copied(),
                Func::Diff => Some(nums[nums.len() - 1] - nums[0]),
            };
            if let Some(value) = value {
                out.push(Bucket { device_id: *d, start: w[0], value });
            }
        }
    }
    out
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

fn assert_buckets(what: &str, got: &[Bucket], want: &[Bucket]) {
    assert_eq!(got.len(), want.len(), "{what}: bucket count\n got {got:?}\nwant {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!(g.device_id == w.device_id && g.start == w.start && close(g.value, w.value), "{what}: got {g:?}, want {w:?}");
    }
}

/// What a backend answered, for comparing backends with each other.
#[derive(Debug)]
struct Answers {
    pages: Vec<Point>,
    aggs: Vec<Vec<Bucket>>,
    latest: Vec<Point>,
    csv: String,
}

async fn scenario(s: &Tsdb) -> Answers {
    let name = s.name();
    let all = dataset();
    // Written in three batches, the middle one out of order; then overwrites of existing points.
    let mut shuffled = all.clone();
    let third = shuffled.len() / 3;
    shuffled[third..2 * third].reverse();
    for chunk in shuffled.chunks(third + 1) {
        s.write_batch(chunk.to_vec()).await.unwrap();
    }
    let mut all = all;
    let over = vec![
        Point { device_id: 1, key: "temp".into(), ts: T0 + 5 * STEP, value: Value::Number(99.5) },
        Point { device_id: 2, key: "temp".into(), ts: T0, value: Value::Number(-3.25) },
    ];
    for o in &over {
        for p in all.iter_mut() {
            if (p.device_id, &p.key, p.ts) == (o.device_id, &o.key, o.ts) {
                p.value = o.value.clone();
            }
        }
    }
    s.write_batch(over).await.unwrap();
    s.flush().await.unwrap();
    let end = T0 + N * STEP;

    // Latest of every key; unknown devices have none.
    let latest = s.latest(&[1, 2, 3, 99]).await.unwrap();
    let mut want_latest: BTreeMap<(i64, String), Point> = BTreeMap::new();
    for p in &all {
        let e = want_latest.entry((p.device_id, p.key.clone())).or_insert_with(|| p.clone());
        if p.ts >= e.ts {
            *e = p.clone();
        }
    }
    let mut got_latest = latest.clone();
    got_latest.sort_by(|a, b| (a.device_id, &a.key).cmp(&(b.device_id, &b.key)));
    assert_eq!(got_latest, want_latest.into_values().collect::<Vec<_>>(), "{name}: latest");

    // Paged history of every key, then a key subset of a sub-range ([from, to)).
    let mut pages = Vec::new();
    let mut q = RangeQuery { device_id: 1, keys: vec![], from: T0, to: end, limit: 100, after: None };
    let mut n_pages = 0;
    loop {
        let p = s.range(&q).await.unwrap();
        assert!(p.points.len() <= 100, "{name}: page size");
        n_pages += 1;
        pages.extend(p.points);
        match p.next {
            Some(c) => q.after = Some(c),
            None => break,
        }
    }
    assert_eq!(pages, expected_range(&all, 1, &[], T0, end), "{name}: all pages of device 1");
    assert!(n_pages > 10, "{name}: paged");
    let sub = s
        .range(&RangeQuery {
            device_id: 2,
            keys: vec!["temp".into(), "door".into()],
            from: T0 + 6 * STEP,
            to: T0 + 18 * STEP,
            limit: 1000,
            after: None,
        })
        .await
        .unwrap();
    assert_eq!(sub.points, expected_range(&all, 2, &["temp", "door"], T0 + 6 * STEP, T0 + 18 * STEP), "{name}: key subset, [from, to)");
    assert!(sub.next.is_none());
    let none = s.range(&RangeQuery { device_id: 99, keys: vec![], from: T0, to: end, limit: 10, after: None }).await.unwrap();
    assert!(none.points.is_empty() && none.next.is_none(), "{name}: unknown device");

    // Aggregates: every function over hourly UTC buckets of two devices.
    let mut aggs = Vec::new();
    let hours: Vec<i64> = (0..=N * STEP / H).map(|h| T0 + h * H).collect();
    for f in [Func::Avg, Func::Min, Func::Max, Func::Sum, Func::Count, Func::First, Func::Last, Func::Diff] {
        let q = AggQuery { devices: vec![1, 2], key: "temp".into(), from: T0, to: end, window: Window::Fixed(H), tz: Tz::UTC, func: f };
        let got = s.aggregate(&q).await.unwrap();
        assert_buckets(&format!("{name}: hourly {f:?}"), &got, &expected_agg(&all, &[1, 2], "temp", &hours, f));
        aggs.push(got);
    }
    // Calendar days in Berlin: 23:00Z in winter, 22:00Z from the DST day (23 hours long) on.
    let berlin: Tz = "Europe/Berlin".parse().unwrap();
    let days = [T0 - H, T0 + 23 * H, T0 + 46 * H, T0 + 70 * H, T0 + 94 * H];
    let q = AggQuery { devices: vec![3], key: "env.hum".into(), from: T0, to: end, window: Window::Day, tz: berlin, func: Func::Avg };
    let got = s.aggregate(&q).await.unwrap();
    let mut want = expected_agg(&all, &[3], "env.hum", &days, Func::Avg);
    // The first bucket starts before `from` (its start is still the local midnight).
    assert_buckets(&format!("{name}: Berlin days"), &got, &want);
    aggs.push(got);
    // Hours in +05:30 start at :30 UTC.
    let kolkata: Tz = "Asia/Kolkata".parse().unwrap();
    let q = AggQuery {
        devices: vec![1],
        key: "door".into(),
        from: T0,
        to: T0 + 6 * H,
        window: Window::Fixed(H),
        tz: kolkata,
        func: Func::Count,
    };
    let got = s.aggregate(&q).await.unwrap();
    let halves: Vec<i64> = (0..=7).map(|h| T0 - H / 2 + h * H).collect();
    let clipped: Vec<Point> = all.iter().filter(|p| p.ts < T0 + 6 * H).cloned().collect();
    want = expected_agg(&clipped, &[1], "door", &halves, Func::Count);
    assert_buckets(&format!("{name}: Kolkata hours"), &got, &want);
    aggs.push(got);
    // Text counts but has no average.
    let q = AggQuery { devices: vec![1], key: "mode".into(), from: T0, to: end, window: Window::Day, tz: Tz::UTC, func: Func::Avg };
    assert!(s.aggregate(&q).await.unwrap().is_empty(), "{name}: no average of text");
    let bad = AggQuery { devices: vec![1], key: "temp".into(), from: end, to: T0, window: Window::Day, tz: Tz::UTC, func: Func::Avg };
    assert!(matches!(s.aggregate(&bad).await, Err(TsError::BadQuery(_))), "{name}: reversed range refused");

    // A chart series of 10 points over the whole range.
    let chart = downsample(s, 2, "temp", T0, end, 10).await.unwrap();
    assert_eq!(chart.len(), 10, "{name}: chart points");
    let w = (end - T0) / 10;
    let bounds: Vec<i64> = (0..=10).map(|i| T0 + i * w).collect();
    assert_buckets(&format!("{name}: chart"), &chart, &expected_agg(&all, &[2], "temp", &bounds, Func::Avg));
    aggs.push(chart);

    // CSV with quoting.
    let mut csv = String::new();
    let q = RangeQuery { device_id: 1, keys: vec!["mode".into()], from: T0, to: T0 + 19 * STEP, limit: 5, after: None };
    assert_eq!(export_csv(s, &q, &mut csv, 1000).await.unwrap(), 4);
    assert_eq!(
        csv,
        format!(
            "ts,key,value\n{},mode,\"eco, quiet\"\n{},mode,\"say \"\"hi\"\"\"\n{},mode,\"say \"\"hi\"\"\"\n{},mode,\"eco, quiet\"\n",
            T0,
            T0 + 6 * STEP,
            T0 + 12 * STEP,
            T0 + 18 * STEP
        ),
        "{name}: CSV"
    );

    // A product policy: device 3's points before the second day go.
    let cut = T0 + 24 * H;
    assert!(s.delete_before(&[3], cut).await.unwrap() > 0, "{name}: delete_before removes points");
    let left =
        s.range(&RangeQuery { device_id: 3, keys: vec!["temp".into()], from: T0, to: end, limit: 10_000, after: None }).await.unwrap();
    assert_eq!(left.points, expected_range(&all, 3, &["temp"], cut, end), "{name}: device 3 after delete_before");
    let d2 = s.range(&RangeQuery { device_id: 2, keys: vec!["temp".into()], from: T0, to: cut, limit: 10_000, after: None }).await.unwrap();
    assert_eq!(d2.points.len(), 144, "{name}: other devices untouched");

    // Retention: the first day partition goes as a whole.
    assert!(s.disk_bytes().await.unwrap() > 0 || name == "tdengine");
    if name != "tdengine" {
        assert!(s.apply_retention(cut).await.unwrap() >= 1, "{name}: a partition dropped");
        let after = s.range(&RangeQuery { device_id: 1, keys: vec![], from: T0, to: end, limit: 10_000, after: None }).await.unwrap();
        assert_eq!(after.points, expected_range(&all, 1, &[], cut, end), "{name}: retention");
    }
    Answers { pages, aggs, latest: got_latest, csv }
}

fn same(a: &Answers, b: &Answers, what: &str) {
    assert_eq!(a.pages, b.pages, "{what}: history differs");
    assert_eq!(a.latest, b.latest, "{what}: latest differs");
    assert_eq!(a.csv, b.csv, "{what}: CSV differs");
    assert_eq!(a.aggs.len(), b.aggs.len());
    for (x, y) in a.aggs.iter().zip(&b.aggs) {
        assert_buckets(what, x, y);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_answers_alike() {
    let dir = tempfile::tempdir().unwrap();
    let emb = Tsdb::Embedded(std::sync::Arc::new(Shared::new(EmbeddedStore::open(dir.path(), 1000, false).unwrap())));
    let reference = scenario(&emb).await;

    if let Some(url) = common::backends::postgres().await {
        let pg = Tsdb::Postgres(std::sync::Arc::new(PgStore::open(&url, 4).await.expect("open the PostgreSQL store")));
        let got = scenario(&pg).await;
        same(&reference, &got, "postgres vs embedded");
        // Opening again over existing tables is fine.
        PgStore::open(&url, 2).await.expect("reopen");
        // The roll-up tables (another prefix in the same database) behave the same.
        let rollup =
            Tsdb::Postgres(std::sync::Arc::new(PgStore::open_prefixed(&url, 2, "ts_rollup_").await.expect("open the roll-up tables")));
        same(&reference, &scenario(&rollup).await, "postgres roll-up tables vs embedded");
    }

    match std::env::var("TAOS_DSN") {
        Ok(dsn) if !dsn.is_empty() => {
            let td = TdStore::open(&dsn, 3650).await.expect("connect to TAOS_DSN");
            for d in DEVICES {
                td.note_product(d, 1);
            }
            let got = scenario(&Tsdb::Tdengine(std::sync::Arc::new(td))).await;
            same(&reference, &got, "tdengine vs embedded");
        }
        _ => eprintln!(
            "SKIPPED the TDengine part: TAOS_DSN is not set. No TDengine server can be installed on the machines this suite runs on, \
             so the TDengine backend is NOT verified here (its line protocol and SQL generation are unit-tested); set \
             TAOS_DSN=taos+ws://root:taosdata@host:6041/thingsd_test to run it."
        ),
    }
}
