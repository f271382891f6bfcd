//! `tsdb`: the time-series stores alone (no broker), through the same interface the node
//! uses, on the telemetry issue's fleet: 1,000 devices × 5 keys, a point every 10 s, 2,000
//! timestamps (10 million points) — temperature and humidity random walks at 0.1 resolution,
//! a voltage with noise in its third decimal, a door flag that rarely flips, a rising energy
//! counter. Prints the data's information content, ingest points/s, bytes per point on disk
//! and query times, for the embedded store and (with `--pg` or $TEST_PG_URL) PostgreSQL in
//! the same run, with the ratios.
use std::sync::Arc;
use std::time::Instant;

use chrono_tz::Tz;
use thingsd::storage::timeseries::embedded::{EmbeddedStore, Shared};
use thingsd::storage::timeseries::postgres::PgStore;
use thingsd::storage::timeseries::{AggQuery, Func, Point, RangeQuery, TimeSeriesStore, Tsdb, Value, Window};

/// xorshift64*: deterministic data without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn step(&mut self) -> f64 {
        [-0.1, 0.0, 0.1][(self.next() % 3) as usize]
    }
}

const START: i64 = 1_700_000_000_000;
/// Voltage noise: 11 values of the third decimal; energy: 5 increments.
const VOLT_STEPS: u64 = 11;
const ENERGY_STEPS: u64 = 5;
const FLIP: u64 = 500;

/// The information content of one point (bits), from the generator's choices.
fn entropy_bits() -> f64 {
    let p = 1.0 / FLIP as f64;
    let door = -(p * p.log2() + (1.0 - p) * (1.0 - p).log2());
    (2.0 * 3f64.log2() + (VOLT_STEPS as f64).log2() + door + (ENERGY_STEPS as f64).log2()) / 5.0
}

/// One timestamp's points of every device.
fn batch(t: usize, state: &mut [(f64, f64, f64, bool)], rng: &mut Rng) -> Vec<Point> {
    let ts = START + t as i64 * 10_000;
    let mut batch = Vec::with_capacity(state.len() * 5);
    for (d, s) in state.iter_mut().enumerate() {
        s.0 = ((s.0 + rng.step()) * 10.0).round() / 10.0;
        s.1 = (((s.1 + rng.step()) * 10.0).round() / 10.0).clamp(0.0, 100.0);
        s.2 = ((s.2 + (rng.next() % ENERGY_STEPS) as f64 / 1000.0) * 1000.0).round() / 1000.0;
        if rng.next().is_multiple_of(FLIP) {
            s.3 = !s.3;
        }
        let volt = ((230.0 + ((rng.next() % VOLT_STEPS) as f64 - 5.0) / 1000.0) * 1000.0).round() / 1000.0;
        let id = d as i64;
        let p = |key: &str, value| Point { device_id: id, key: key.into(), ts, value };
        batch.push(p("temperature", Value::Number(s.0)));
        batch.push(p("humidity", Value::Number(s.1)));
        batch.push(p("voltage", Value::Number(volt)));
        batch.push(p("door", Value::Bool(s.3)));
        batch.push(p("energy", Value::Number(s.2)));
    }
    batch
}

struct Figures {
    ingest: f64,
    bytes_per_point: f64,
    one_raw_ms: f64,
    one_hourly_ms: f64,
    all_hourly_ms: f64,
    latest_ms: f64,
}

async fn measure(store: &Tsdb, devices: usize, timestamps: usize, maintain: Option<&Shared>) -> anyhow::Result<Figures> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut state: Vec<(f64, f64, f64, bool)> = (0..devices).map(|i| (20.0 + (i % 10) as f64, 50.0, 0.0, false)).collect();
    let total = (devices * timestamps * 5) as f64;
    let mut gen_secs = 0.0;
    let t0 = Instant::now();
    // The writers' shape: batches of 10,000 points.
    for t in (0..timestamps).step_by(2) {
        let g = Instant::now();
        let mut b = batch(t, &mut state, &mut rng);
        if t + 1 < timestamps {
            b.extend(batch(t + 1, &mut state, &mut rng));
        }
        gen_secs += g.elapsed().as_secs_f64();
        store.write_batch(b).await?;
    }
    store.flush().await?;
    let ingest = total / (t0.elapsed().as_secs_f64() - gen_secs);
    if let Some(s) = maintain {
        s.compact().await?;
    }
    let bytes = store.disk_bytes().await? as f64;
    let end = START + timestamps as i64 * 10_000;
    let all: Vec<i64> = (0..devices as i64).collect();
    let hourly = |devices: Vec<i64>| AggQuery {
        devices,
        key: "temperature".into(),
        from: START,
        to: end,
        window: Window::Fixed(3_600_000),
        tz: Tz::UTC,
        func: Func::Avg,
    };
    // Best of three (the first run also warms caches).
    let mut best = [f64::MAX; 4];
    for _ in 0..3 {
        let q = Instant::now();
        let r = store
            .range(&RangeQuery { device_id: 7, keys: vec!["temperature".into()], from: START, to: end, limit: 10_000, after: None })
            .await?;
        anyhow::ensure!(r.points.len() == timestamps, "one series: {} points", r.points.len());
        best[0] = best[0].min(q.elapsed().as_secs_f64() * 1000.0);
        let q = Instant::now();
        store.aggregate(&hourly(vec![7])).await?;
        best[1] = best[1].min(q.elapsed().as_secs_f64() * 1000.0);
        let q = Instant::now();
        let b = store.aggregate(&hourly(all.clone())).await?;
        anyhow::ensure!(b.len() >= devices * (timestamps / 360), "all devices: {} buckets", b.len());
        best[2] = best[2].min(q.elapsed().as_secs_f64() * 1000.0);
        let q = Instant::now();
        let l = store.latest(&all).await?;
        anyhow::ensure!(l.len() == devices * 5, "latest: {} values", l.len());
        best[3] = best[3].min(q.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(Figures {
        ingest,
        bytes_per_point: bytes / total,
        one_raw_ms: best[0],
        one_hourly_ms: best[1],
        all_hourly_ms: best[2],
        latest_ms: best[3],
    })
}

pub async fn run(devices: usize, timestamps: usize, pg: Option<String>) -> anyhow::Result<()> {
    let total = devices * timestamps * 5;
    let dir = std::env::temp_dir().join(format!("loadtest-tsdb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let shared = Arc::new(Shared::new(EmbeddedStore::open(&dir, 500_000, false)?));
    let emb = measure(&Tsdb::Embedded(shared.clone()), devices, timestamps, Some(&shared)).await?;
    drop(shared);
    let _ = std::fs::remove_dir_all(&dir);
    let pgf = match pg {
        Some(url) => {
            // A fresh database for the run.
            let name = format!("loadtest_{}", std::process::id());
            let admin = sqlx::PgPool::connect(&url).await?;
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&admin).await?;
            let (prefix, _) = url.rsplit_once('/').unwrap_or((&url, ""));
            let store = PgStore::open(&format!("{prefix}/{name}"), 8).await?;
            let f = measure(&Tsdb::Postgres(Arc::new(store)), devices, timestamps, None).await;
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))).execute(&admin).await?;
            Some(f?)
        }
        None => None,
    };
    println!("\n== tsdb: {devices} devices x 5 keys x {timestamps} timestamps = {total} points");
    println!("information content of the data: {:.3} bytes/point", entropy_bits() / 8.0);
    println!("{:<34} {:>14} {:>14} {:>10}", "", "embedded", "postgres", "emb/pg");
    let row = |name: &str, e: f64, p: Option<f64>, fmt: &dyn Fn(f64) -> String, higher_better: bool| {
        let (ps, ratio) = match p {
            Some(p) => (fmt(p), format!("{:.1}x", if higher_better { e / p } else { p / e })),
            None => ("-".into(), "-".into()),
        };
        println!("{name:<34} {:>14} {ps:>14} {ratio:>10}", fmt(e));
    };
    let int = |v: f64| format!("{v:.0}");
    let ms = |v: f64| format!("{v:.1} ms");
    let bpp = |v: f64| format!("{v:.3}");
    row("ingest, store only (points/s)", emb.ingest, pgf.as_ref().map(|f| f.ingest), &int, true);
    row("bytes/point on disk", emb.bytes_per_point, pgf.as_ref().map(|f| f.bytes_per_point), &bpp, false);
    row("one device, raw full range", emb.one_raw_ms, pgf.as_ref().map(|f| f.one_raw_ms), &ms, false);
    row("one device, hourly avg", emb.one_hourly_ms, pgf.as_ref().map(|f| f.one_hourly_ms), &ms, false);
    row("all devices, hourly avg", emb.all_hourly_ms, pgf.as_ref().map(|f| f.all_hourly_ms), &ms, false);
    row("latest of every device", emb.latest_ms, pgf.as_ref().map(|f| f.latest_ms), &ms, false);
    println!("(ratios: how many times better the embedded store is; embedded bytes after compaction, WAL without fsync)");
    Ok(())
}
