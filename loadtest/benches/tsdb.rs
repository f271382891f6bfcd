//! Criterion benchmarks of the embedded store's parts on the fleet's series shapes:
//! chunk encode/decode (fast and compaction levels), a 10,000-point write, one series' full
//! range and its hourly average. `cargo bench -p loadtest --bench tsdb`.
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use thingsd::storage::timeseries::aggregate::{buckets, Func, Window};
use thingsd::storage::timeseries::chunk::{decode, encode, Level, Values};
use thingsd::storage::timeseries::embedded::EmbeddedStore;
use thingsd::storage::timeseries::{Point, Value};

const START: i64 = 1_700_000_000_000;

fn walk(n: usize) -> (Vec<i64>, Vec<f64>) {
    let mut x = 20.0f64;
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut ts = Vec::with_capacity(n);
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        x = ((x + [-0.1, 0.0, 0.1][(s % 3) as usize]) * 10.0).round() / 10.0;
        ts.push(START + i as i64 * 10_000);
        v.push(x);
    }
    (ts, v)
}

fn chunks(c: &mut Criterion) {
    let (ts, v) = walk(2000);
    let vals = Values::Number(v);
    let mut g = c.benchmark_group("chunk (2,000-point random walk)");
    g.throughput(Throughput::Elements(2000));
    for level in [Level::Fast, Level::Small] {
        g.bench_function(format!("encode {level:?}"), |b| b.iter(|| encode(black_box(&ts), black_box(&vals), level).unwrap()));
    }
    let enc = encode(&ts, &vals, Level::Small).unwrap();
    println!("compacted chunk: {:.3} bytes/point", enc.len() as f64 / 2000.0);
    g.bench_function("decode", |b| b.iter(|| decode(black_box(&enc)).unwrap()));
    g.finish();
}

fn store(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut s = EmbeddedStore::open(dir.path(), 500_000, false).unwrap();
    let mut t = 0i64;
    let mut g = c.benchmark_group("embedded store");
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("write_batch 10,000 points (1,000 devices x 5 keys x 2 timestamps)", |b| {
        b.iter(|| {
            let mut batch = Vec::with_capacity(10_000);
            for _ in 0..2 {
                for d in 0..1000 {
                    for k in ["temperature", "humidity", "voltage", "door", "energy"] {
                        batch.push(Point { device_id: d, key: k.into(), ts: START + t * 10_000, value: Value::Number(d as f64) });
                    }
                }
                t += 1;
            }
            s.write_batch(batch).unwrap();
        })
    });
    g.finish();
    s.flush().unwrap();
    s.compact().unwrap();
    let end = START + t * 10_000;
    let n = s.range(7, "temperature", START, end).unwrap().len() as u64;
    let mut g = c.benchmark_group("one series");
    g.throughput(Throughput::Elements(n));
    g.bench_function("range, full", |b| b.iter(|| s.range(7, "temperature", START, end).unwrap()));
    let pts = s.range(7, "temperature", START, end).unwrap();
    g.bench_function("hourly average (UTC)", |b| {
        b.iter(|| buckets(black_box(&pts), Window::Fixed(3_600_000), chrono_tz::Tz::UTC, Func::Avg))
    });
    let berlin: chrono_tz::Tz = "Europe/Berlin".parse().unwrap();
    g.bench_function("daily average (Europe/Berlin)", |b| b.iter(|| buckets(black_box(&pts), Window::Day, berlin, Func::Avg)));
    g.finish();
}

criterion_group!(benches, chunks, store);
criterion_main!(benches);
