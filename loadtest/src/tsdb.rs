//! `tsdb`: the embedded time-series store alone (no broker) on the telemetry issue's fleet:
//! 1,000 devices × 5 keys, a point every 10 s, 2,000 timestamps (10 million points) —
//! temperature and humidity random walks at 0.1 resolution, a voltage with 3 decimals of
//! noise, a door flag that rarely flips, a rising energy counter. Prints ingest points/s,
//! bytes per point on disk and query times. The store is work in progress (no aggregates yet).
use std::time::Instant;

use thingsd::storage::timeseries::embedded::EmbeddedStore;
use thingsd::storage::timeseries::{Point, Value};

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

fn dir_bytes(p: &std::path::Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let path = e.path();
            n += if path.is_dir() { dir_bytes(&path) } else { e.metadata().map(|m| m.len()).unwrap_or(0) };
        }
    }
    n
}

pub fn run(devices: usize, timestamps: usize) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("loadtest-tsdb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut store = EmbeddedStore::open(&dir, 1_000_000, false)?;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let start_ts: i64 = 1_700_000_000_000;
    let mut state: Vec<(f64, f64, f64, bool)> = (0..devices).map(|i| (20.0 + (i % 10) as f64, 50.0, 0.0, false)).collect();
    let total = devices * timestamps * 5;
    let mut gen_secs = 0.0;
    let t0 = Instant::now();
    for t in 0..timestamps {
        let g = Instant::now();
        let ts = start_ts + t as i64 * 10_000;
        let mut batch = Vec::with_capacity(devices * 5);
        for (d, s) in state.iter_mut().enumerate() {
            s.0 = ((s.0 + rng.step()) * 10.0).round() / 10.0;
            s.1 = (((s.1 + rng.step()) * 10.0).round() / 10.0).clamp(0.0, 100.0);
            s.2 += (rng.next() % 50) as f64 / 1000.0;
            if rng.next().is_multiple_of(500) {
                s.3 = !s.3;
            }
            let volt = ((230.0 + (rng.next() % 2000) as f64 / 1000.0 - 1.0) * 1000.0).round() / 1000.0;
            let id = d as i64;
            batch.push(Point { device_id: id, key: "temperature".into(), ts, value: Value::Number(s.0) });
            batch.push(Point { device_id: id, key: "humidity".into(), ts, value: Value::Number(s.1) });
            batch.push(Point { device_id: id, key: "voltage".into(), ts, value: Value::Number(volt) });
            batch.push(Point { device_id: id, key: "door".into(), ts, value: Value::Bool(s.3) });
            batch.push(Point { device_id: id, key: "energy".into(), ts, value: Value::Number((s.2 * 1000.0).round() / 1000.0) });
        }
        gen_secs += g.elapsed().as_secs_f64();
        store.write_batch(batch)?;
    }
    store.flush()?;
    let ingest = t0.elapsed().as_secs_f64() - gen_secs;
    let flushed_bytes = dir_bytes(&dir);
    let c = Instant::now();
    let compacted = store.compact()?;
    let compact_secs = c.elapsed().as_secs_f64();
    let bytes = dir_bytes(&dir);
    let q = Instant::now();
    let one = store.range(7, "temperature", start_ts, start_ts + timestamps as i64 * 10_000)?;
    let range_ms = q.elapsed().as_secs_f64() * 1000.0;
    let q = Instant::now();
    let mut hourly = 0;
    for d in 0..devices as i64 {
        let pts = store.range(d, "temperature", start_ts, start_ts + timestamps as i64 * 10_000)?;
        hourly +=
            thingsd::storage::timeseries::aggregate::by_window(&pts, 3_600_000, thingsd::storage::timeseries::aggregate::Func::Avg).len();
    }
    let all_hourly_ms = q.elapsed().as_secs_f64() * 1000.0;
    let q = Instant::now();
    let mut n = 0;
    for d in 0..devices as i64 {
        n += store.latest(d).len();
    }
    let latest_ms = q.elapsed().as_secs_f64() * 1000.0;
    let _ = std::fs::remove_dir_all(&dir);
    println!("\n== tsdb (embedded store, work in progress): {devices} devices x 5 keys x {timestamps} timestamps = {total} points");
    println!("ingest (store only, WAL without fsync): {:.0} points/s", total as f64 / ingest);
    println!("on disk after the flushes: {flushed_bytes} bytes = {:.3} bytes/point", flushed_bytes as f64 / total as f64);
    println!(
        "compaction of {compacted} partitions: {compact_secs:.2} s; on disk: {bytes} bytes = {:.3} bytes/point",
        bytes as f64 / total as f64
    );
    println!("raw range, one device's temperature, full range: {} points in {range_ms:.1} ms", one.len());
    println!("hourly average of temperature over all devices and the full range: {hourly} windows in {all_hourly_ms:.0} ms (per-series reads; no pre-aggregation yet)");
    println!("latest values of every device: {n} values in {latest_ms:.2} ms");
    Ok(())
}
