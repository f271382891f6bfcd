//! The embedded time-series store (the default): WAL, day partitions of compressed segments,
//! an in-memory chunk index, compaction, retention by whole partitions.
//!
//! Layout under its directory: `wal.log` holds accepted points not yet in a segment (framed
//! records with a CRC: a record torn by a crash is dropped at the next open, everything before
//! it is kept); `p{day}/seg-{n}.tss` are immutable segments, one per flush and day partition,
//! each a list of (device, key, chunk) with a CRC over the file. Segments are written to a
//! temporary name and renamed, so a crash never leaves a half segment under its real name; the
//! WAL is truncated only after the rename. Retention removes whole day partitions.
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::aggregate::buckets;
use super::chunk::{self, Values};
use super::{page_of, AggQuery, Bucket, Page, Point, RangeQuery, TimeSeriesStore, TsError, Value};

mod segment;
use segment::*;

const DAY_MS: i64 = 86_400_000;
const WAL_MAX_RECORD: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("time-series store I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("time-series store: {0}")]
    Corrupt(String),
}

/// One series: a device's key.
type SeriesKey = (i64, String);

/// One series' points of one value kind, as they go into a segment.
type Column = (SeriesKey, u8, Vec<i64>, Vec<Value>);

/// A segment file and where its chunks are: series → (value kind, offset, length).
struct Seg {
    path: PathBuf,
    chunks: std::collections::HashMap<SeriesKey, Vec<(u8, u64, u32)>>,
    /// Opened at the first query and kept (segments are immutable).
    file: std::sync::OnceLock<File>,
}

impl Seg {
    fn file(&self) -> std::io::Result<&File> {
        if let Some(f) = self.file.get() {
            return Ok(f);
        }
        let f = File::open(&self.path)?;
        Ok(self.file.get_or_init(|| f))
    }
}

pub struct EmbeddedStore {
    dir: PathBuf,
    wal: File,
    /// Accepted points not yet in a segment, per series (also in the WAL).
    buffer: std::collections::HashMap<SeriesKey, Vec<(i64, Value)>>,
    buffered: usize,
    /// Flush when this many points are buffered.
    flush_at: usize,
    /// When the oldest buffered point was accepted (a buffer older than the node's
    /// `segment_secs` becomes a segment, so a quiet node's WAL and memory stay small).
    oldest: Option<std::time::Instant>,
    /// Latest (ts, value) per series.
    latest: BTreeMap<SeriesKey, (i64, Value)>,
    next_segment: u64,
    /// Where each series' chunks are in each segment, per day partition (queries read only
    /// those bytes; each chunk carries its own checksum).
    index: BTreeMap<i64, Vec<Seg>>,
    /// fsync the WAL before a write returns (the acknowledgement then survives power loss).
    sync: bool,
}

/// A point as the WAL stores it: `Value` is untagged for JSON, which bincode cannot decode.
#[derive(serde::Serialize, serde::Deserialize)]
struct WalPoint {
    device_id: i64,
    key: String,
    ts: i64,
    value: WalValue,
}

#[derive(serde::Serialize, serde::Deserialize)]
enum WalValue {
    Number(f64),
    Bool(bool),
    Text(String),
    Json(String),
}

/// The same record, borrowed for writing (bincode writes `&str` as it writes `String`).
#[derive(serde::Serialize)]
struct WalPointRef<'a> {
    device_id: i64,
    key: &'a str,
    ts: i64,
    value: WalValueRef<'a>,
}

#[derive(serde::Serialize)]
enum WalValueRef<'a> {
    Number(f64),
    Bool(bool),
    Text(&'a str),
    Json(&'a str),
}

impl<'a> From<&'a Point> for WalPointRef<'a> {
    fn from(p: &'a Point) -> WalPointRef<'a> {
        let value = match &p.value {
            Value::Number(n) => WalValueRef::Number(*n),
            Value::Bool(b) => WalValueRef::Bool(*b),
            Value::Text(s) => WalValueRef::Text(s),
            Value::Json(s) => WalValueRef::Json(s),
        };
        WalPointRef { device_id: p.device_id, key: &p.key, ts: p.ts, value }
    }
}

impl From<WalPoint> for Point {
    fn from(w: WalPoint) -> Point {
        let value = match w.value {
            WalValue::Number(n) => Value::Number(n),
            WalValue::Bool(b) => Value::Bool(b),
            WalValue::Text(s) => Value::Text(s),
            WalValue::Json(s) => Value::Json(s),
        };
        Point { device_id: w.device_id, key: w.key, ts: w.ts, value }
    }
}

fn bincode_cfg() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<WAL_MAX_RECORD>()
}

fn partition_of(ts: i64) -> i64 {
    ts.div_euclid(DAY_MS)
}

fn kind_of(v: &Value) -> u8 {
    match v {
        Value::Number(_) => 0,
        Value::Bool(_) => 1,
        Value::Text(_) => 2,
        Value::Json(_) => 3,
    }
}

impl EmbeddedStore {
    /// Open (or create) the store in `dir`, replaying the WAL.
    pub fn open(dir: &Path, flush_at: usize, sync: bool) -> Result<EmbeddedStore, StoreError> {
        fs::create_dir_all(dir)?;
        let mut s = EmbeddedStore {
            dir: dir.to_path_buf(),
            wal: OpenOptions::new().create(true).append(true).open(dir.join("wal.log"))?,
            buffer: std::collections::HashMap::new(),
            buffered: 0,
            oldest: None,
            flush_at: flush_at.max(1),
            latest: BTreeMap::new(),
            next_segment: 0,
            index: BTreeMap::new(),
            sync,
        };
        for (day, segs) in s.partitions()? {
            for seg in segs {
                s.next_segment = s.next_segment.max(segment_number(&seg) + 1);
                let b = fs::read(&seg)?;
                let indexed = index_bytes(&seg, &b)?;
                for (key, ts, vals) in decode_chunks(&indexed, &b, |_, _| true)? {
                    s.note_latest_chunk(key, &ts, &vals);
                }
                s.index.entry(day).or_default().push(indexed);
            }
        }
        let (points, good_len) = replay(&dir.join("wal.log"))?;
        // Cut a torn tail so new records follow the last good one.
        s.wal.set_len(good_len)?;
        for p in points {
            s.insert(p);
        }
        Ok(s)
    }

    fn note_latest_chunk(&mut self, key: SeriesKey, ts: &[i64], vals: &[Value]) {
        for (t, v) in ts.iter().zip(vals) {
            self.note_latest(&key, *t, v);
        }
    }

    fn note_latest(&mut self, key: &SeriesKey, ts: i64, v: &Value) {
        match self.latest.get_mut(key) {
            Some((t, _)) if *t > ts => {}
            Some(e) => *e = (ts, v.clone()),
            None => {
                self.latest.insert(key.clone(), (ts, v.clone()));
            }
        }
    }

    fn insert(&mut self, p: Point) {
        let key = (p.device_id, p.key);
        self.note_latest(&key, p.ts, &p.value);
        self.buffer.entry(key).or_default().push((p.ts, p.value));
        self.oldest.get_or_insert_with(std::time::Instant::now);
        self.buffered += 1;
    }

    /// Accept points: logged to the WAL (synced when configured), then buffered; a full buffer
    /// is flushed to segments.
    pub fn write_batch(&mut self, points: Vec<Point>) -> Result<(), StoreError> {
        if points.is_empty() {
            return Ok(());
        }
        let wal: Vec<WalPointRef> = points.iter().map(WalPointRef::from).collect();
        let body = bincode::serde::encode_to_vec(&wal, bincode_cfg()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut rec = Vec::with_capacity(body.len() + 8);
        rec.extend_from_slice(&(body.len() as u32).to_le_bytes());
        rec.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        rec.extend_from_slice(&body);
        self.wal.write_all(&rec)?;
        if self.sync {
            self.wal.sync_data()?;
        }
        for p in points {
            self.insert(p);
        }
        if self.buffered >= self.flush_at {
            self.flush()?;
        }
        Ok(())
    }

    /// Write the buffer as segments (one per day partition) and empty the WAL.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        if self.buffered == 0 {
            return Ok(());
        }
        let mut by_part: BTreeMap<i64, Vec<Column>> = BTreeMap::new();
        for (key, pts) in std::mem::take(&mut self.buffer) {
            // One chunk per (partition, value kind) of the series.
            let mut groups: BTreeMap<(i64, u8), (Vec<i64>, Vec<Value>)> = BTreeMap::new();
            for (ts, v) in pts {
                let g = groups.entry((partition_of(ts), kind_of(&v))).or_default();
                g.0.push(ts);
                g.1.push(v);
            }
            for ((part, kind), (ts, vals)) in groups {
                by_part.entry(part).or_default().push((key.clone(), kind, ts, vals));
            }
        }
        for (part, entries) in by_part {
            self.write_segment(part, entries, chunk::Level::Fast)?;
        }
        // Everything buffered is in segments now.
        self.wal.set_len(0)?;
        self.wal.sync_all()?;
        self.buffered = 0;
        self.oldest = None;
        Ok(())
    }

    /// Flush the buffer if its oldest point was accepted at least `age` ago; whether it did.
    pub fn flush_if_older(&mut self, age: std::time::Duration) -> Result<bool, StoreError> {
        if self.oldest.is_none_or(|t| t.elapsed() < age) {
            return Ok(false);
        }
        self.flush()?;
        Ok(true)
    }

    /// Write one segment of partition `part` (tmp + rename + directory sync); returns its path.
    fn write_segment(&mut self, part: i64, entries: Vec<Column>, level: chunk::Level) -> Result<PathBuf, StoreError> {
        let file = encode_segment(entries, level)?;
        let name = persist_segment(&self.dir, part, self.next_segment, &file)?;
        self.next_segment += 1;
        // Indexed from the bytes just written (no read back).
        self.index.entry(part).or_default().push(index_bytes(&name, &file)?);
        Ok(name)
    }

    /// Merge every partition's segments into one (one chunk per series and value kind, so
    /// chunks are long and compress well); returns how many partitions were compacted. Crash
    /// safe: the merged segment is renamed into place before the old ones are removed, and a
    /// point present twice reads once (same timestamp, same value). `Shared::compact` does the
    /// same without holding the store while it merges.
    pub fn compact(&mut self) -> Result<usize, StoreError> {
        let plan = self.plan_compaction()?;
        let n = plan.len();
        for c in plan {
            let built = c.build(|_, _| true)?;
            self.install(&c, built.0)?;
        }
        Ok(n)
    }

    /// Partitions worth compacting, each with a segment number reserved now, so segments
    /// flushed while it merges rank above the merged one (later writes keep winning).
    fn plan_compaction(&mut self) -> Result<Vec<Compaction>, StoreError> {
        let mut out = Vec::new();
        for (part, segs) in self.partitions()? {
            if segs.len() >= 2 {
                out.push(Compaction { dir: self.dir.clone(), part, segs, number: self.next_segment });
                self.next_segment += 1;
            }
        }
        Ok(out)
    }

    /// Swap a built merge in: index the new segment, forget and delete the merged ones.
    fn install(&mut self, c: &Compaction, built: Option<(PathBuf, Vec<u8>)>) -> Result<(), StoreError> {
        let seg = built.map(|(path, bytes)| index_bytes(&path, &bytes)).transpose()?;
        let list = self.index.entry(c.part).or_default();
        list.retain(|s| !c.segs.contains(&s.path));
        if let Some(seg) = seg {
            list.push(seg);
            // Query order is write order: by segment number.
            list.sort_by_key(|s| segment_number(&s.path));
        }
        for seg in &c.segs {
            fs::remove_file(seg)?;
        }
        Ok(())
    }

    /// Remove the points of `devices` older than `cutoff` (rewrites the partitions that hold
    /// some); returns how many points went.
    pub fn delete_before(&mut self, devices: &[i64], cutoff: i64) -> Result<u64, StoreError> {
        let set: std::collections::HashSet<i64> = devices.iter().copied().collect();
        self.flush()?;
        let mut removed = 0u64;
        for (part, segs) in self.partitions()? {
            if part * DAY_MS >= cutoff {
                continue;
            }
            let holds = self.index.get(&part).is_some_and(|l| l.iter().any(|s| s.chunks.keys().any(|(d, _)| set.contains(d))));
            if holds {
                removed += self.rewrite(part, &segs, |(d, _), ts| !set.contains(d) || ts >= cutoff)?;
            }
        }
        self.latest.retain(|(d, _), (t, _)| !set.contains(d) || *t >= cutoff);
        Ok(removed)
    }

    /// Replace partition `part`'s segments by one holding the points `keep` selects; returns
    /// how many points were left out.
    fn rewrite(&mut self, part: i64, segs: &[PathBuf], keep: impl Fn(&SeriesKey, i64) -> bool) -> Result<u64, StoreError> {
        let c = Compaction { dir: self.dir.clone(), part, segs: segs.to_vec(), number: self.next_segment };
        self.next_segment += 1;
        let (built, dropped) = c.build(keep)?;
        self.install(&c, built)?;
        Ok(dropped)
    }

    /// Bytes of segments and WAL.
    pub fn disk_bytes(&self) -> Result<u64, StoreError> {
        fn walk(p: &Path) -> std::io::Result<u64> {
            let mut n = 0;
            for e in fs::read_dir(p)? {
                let e = e?;
                let m = e.metadata()?;
                n += if m.is_dir() { walk(&e.path())? } else { m.len() };
            }
            Ok(n)
        }
        Ok(walk(&self.dir)?)
    }

    /// Keys of a device that have points (or had, until retention).
    pub fn keys_of(&self, device_id: i64) -> Vec<String> {
        self.latest.range((device_id, String::new())..).take_while(|((d, _), _)| *d == device_id).map(|((_, k), _)| k.clone()).collect()
    }

    /// Day partitions (day number, segment files) in order.
    fn partitions(&self) -> Result<Vec<(i64, Vec<PathBuf>)>, StoreError> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir)? {
            let e = e?;
            let name = e.file_name();
            let Some(day) = name.to_str().and_then(|n| n.strip_prefix('p')).and_then(|d| d.parse::<i64>().ok()) else { continue };
            let mut segs: Vec<PathBuf> = fs::read_dir(e.path())?
                .filter_map(|x| x.ok().map(|x| x.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "tss"))
                .collect();
            // Write order (later segments win for the same timestamp): by number, not by name.
            segs.sort_by_key(|p| segment_number(p));
            out.push((day, segs));
        }
        out.sort_by_key(|(d, _)| *d);
        Ok(out)
    }

    /// Points of one series in `[from, to)`, by time; a later write of the same timestamp wins.
    pub fn range(&self, device_id: i64, key: &str, from: i64, to: i64) -> Result<Vec<(i64, Value)>, StoreError> {
        use std::os::unix::fs::FileExt;
        if to <= from {
            return Ok(vec![]);
        }
        // Sources in write order (partitions, their segments, then the buffer); each chunk is
        // sorted. One source needs no merging; several are merged by a stable sort, the last
        // write of a timestamp winning.
        let mut out: Vec<(i64, Value)> = Vec::new();
        let mut sources = 0;
        let series = (device_id, key.to_string());
        let mut b = Vec::new();
        for (_, segs) in self.index.range(from.div_euclid(DAY_MS)..=(to - 1).div_euclid(DAY_MS)) {
            for seg in segs {
                let Some(chunks) = seg.chunks.get(&series) else { continue };
                let f = seg.file()?;
                for (kind, off, len) in chunks {
                    b.resize(*len as usize, 0);
                    f.read_exact_at(&mut b, *off)?;
                    let (ts, vals) = chunk::decode(&b).map_err(|e| StoreError::Corrupt(format!("{}: {e}", seg.path.display())))?;
                    sources += 1;
                    out.extend(ts.into_iter().zip(from_values(*kind, vals)).filter(|(t, _)| *t >= from && *t < to));
                }
            }
        }
        if let Some(buf) = self.buffer.get(&series) {
            sources += 2;
            out.extend(buf.iter().filter(|(t, _)| *t >= from && *t < to).cloned());
        }
        if sources > 1 || !out.windows(2).all(|w| w[0].0 < w[1].0) {
            out.sort_by_key(|(t, _)| *t);
            // Keep the last of equal timestamps.
            let mut merged: Vec<(i64, Value)> = Vec::with_capacity(out.len());
            for p in out {
                match merged.last_mut() {
                    Some(last) if last.0 == p.0 => *last = p,
                    _ => merged.push(p),
                }
            }
            out = merged;
        }
        Ok(out)
    }

    /// The latest value of every key of a device.
    pub fn latest(&self, device_id: i64) -> Vec<(String, i64, Value)> {
        self.latest
            .range((device_id, String::new())..)
            .take_while(|((d, _), _)| *d == device_id)
            .map(|((_, k), (t, v))| (k.clone(), *t, v.clone()))
            .collect()
    }

    /// Drop every day partition that ends before `cutoff` (ms); returns how many.
    pub fn apply_retention(&mut self, cutoff: i64) -> Result<usize, StoreError> {
        let mut n = 0;
        for (day, _) in self.partitions()? {
            if (day + 1) * DAY_MS <= cutoff {
                fs::remove_dir_all(self.dir.join(format!("p{day}")))?;
                self.index.remove(&day);
                n += 1;
            }
        }
        self.latest.retain(|_, (t, _)| *t >= cutoff);
        Ok(n)
    }
}

/// The embedded store shared by writer actors and queries: file work runs on the blocking
/// pool; queries share a read lock, writes take the write lock.
pub struct Shared {
    inner: std::sync::Arc<std::sync::RwLock<EmbeddedStore>>,
}

impl Shared {
    pub fn new(s: EmbeddedStore) -> Shared {
        Shared { inner: std::sync::Arc::new(std::sync::RwLock::new(s)) }
    }

    async fn write<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut EmbeddedStore) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, TsError> {
        let s = self.inner.clone();
        let r = tokio::task::spawn_blocking(move || f(&mut s.write().unwrap_or_else(|p| p.into_inner())))
            .await
            .map_err(|e| TsError::Db(format!("store task: {e}")))?;
        Ok(r?)
    }

    async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&EmbeddedStore) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, TsError> {
        let s = self.inner.clone();
        let r = tokio::task::spawn_blocking(move || f(&s.read().unwrap_or_else(|p| p.into_inner())))
            .await
            .map_err(|e| TsError::Db(format!("store task: {e}")))?;
        Ok(r?)
    }

    /// Turn a buffer older than `age` into segments (the maintenance actor asks periodically).
    pub async fn flush_aged(&self, age: std::time::Duration) -> Result<bool, TsError> {
        self.write(move |s| s.flush_if_older(age)).await
    }

    /// Merge each partition's segments (the maintenance actor runs this periodically). The
    /// store is locked only to plan and to swap each merged segment in; reads and writes go on
    /// while it merges.
    pub async fn compact(&self) -> Result<usize, TsError> {
        let plan = self.write(|s| s.plan_compaction()).await?;
        let n = plan.len();
        for c in plan {
            let c = std::sync::Arc::new(c);
            let c2 = c.clone();
            let built = tokio::task::spawn_blocking(move || c2.build(|_, _| true))
                .await
                .map_err(|e| TsError::Db(format!("compaction task: {e}")))??;
            self.write(move |s| s.install(&c, built.0)).await?;
        }
        Ok(n)
    }
}

impl TimeSeriesStore for Shared {
    async fn write_batch(&self, points: Vec<Point>) -> Result<(), TsError> {
        self.write(move |s| s.write_batch(points)).await
    }
    async fn flush(&self) -> Result<(), TsError> {
        self.write(|s| s.flush()).await
    }
    async fn latest(&self, devices: &[i64]) -> Result<Vec<Point>, TsError> {
        let devices = devices.to_vec();
        self.read(move |s| {
            Ok(devices
                .iter()
                .flat_map(|d| s.latest(*d).into_iter().map(move |(key, ts, value)| Point { device_id: *d, key, ts, value }))
                .collect())
        })
        .await
    }
    async fn range(&self, q: &RangeQuery) -> Result<Page, TsError> {
        let q = q.clone();
        self.read(move |s| {
            let keys = if q.keys.is_empty() { s.keys_of(q.device_id) } else { q.keys.clone() };
            let mut pts = Vec::new();
            for k in keys {
                for (ts, value) in s.range(q.device_id, &k, q.from, q.to)? {
                    pts.push(Point { device_id: q.device_id, key: k.clone(), ts, value });
                }
            }
            Ok(page_of(pts, &q))
        })
        .await
    }
    async fn aggregate(&self, q: &AggQuery) -> Result<Vec<Bucket>, TsError> {
        let q = q.clone();
        self.read(move |s| {
            // Devices split over the cores (each series is read and bucketed independently).
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(q.devices.len().div_ceil(64)).max(1);
            let per = q.devices.len().div_ceil(threads).max(1);
            let parts: Vec<Result<Vec<Bucket>, StoreError>> = std::thread::scope(|sc| {
                let handles: Vec<_> = q
                    .devices
                    .chunks(per)
                    .map(|devs| {
                        let q = &q;
                        sc.spawn(move || {
                            let mut out = Vec::new();
                            for d in devs {
                                let pts = s.range(*d, &q.key, q.from, q.to)?;
                                out.extend(buckets(&pts, q.window, q.tz, q.func).into_iter().map(|(start, value)| Bucket {
                                    device_id: *d,
                                    start,
                                    value,
                                }));
                            }
                            Ok(out)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err(StoreError::Corrupt("aggregate worker panicked".into()))))
                    .collect()
            });
            let mut out = Vec::new();
            for p in parts {
                out.extend(p?);
            }
            Ok(out)
        })
        .await
    }
    async fn apply_retention(&self, cutoff: i64) -> Result<u64, TsError> {
        self.write(move |s| s.apply_retention(cutoff).map(|n| n as u64)).await
    }
    async fn delete_before(&self, devices: &[i64], cutoff: i64) -> Result<u64, TsError> {
        let devices = devices.to_vec();
        self.write(move |s| s.delete_before(&devices, cutoff)).await
    }
    async fn disk_bytes(&self) -> Result<u64, TsError> {
        self.read(|s| s.disk_bytes()).await
    }
}

/// A built merge: the new segment's path and bytes (None when nothing is kept), and how many
/// points were left out.
type Built = (Option<(PathBuf, Vec<u8>)>, u64);

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(device: i64, key: &str, ts: i64, v: Value) -> Point {
        Point { device_id: device, key: key.into(), ts, value: v }
    }

    #[test]
    fn an_old_buffer_becomes_a_segment_however_small() {
        let dir = tempfile::tempdir().unwrap();
        let day = 1_700_000_000_000 / DAY_MS * DAY_MS;
        let mut s = EmbeddedStore::open(dir.path(), 1_000_000, false).unwrap();
        assert!(!s.flush_if_older(std::time::Duration::ZERO).unwrap(), "nothing buffered: nothing to flush");
        s.write_batch(vec![pt(1, "temp", day + 1, Value::Number(1.0)), pt(1, "temp", day + 2, Value::Number(2.0))]).unwrap();
        assert!(!s.flush_if_older(std::time::Duration::from_secs(3600)).unwrap(), "younger than the age: kept buffered");
        assert_eq!(s.partitions().unwrap().len(), 0);
        assert!(s.flush_if_older(std::time::Duration::ZERO).unwrap());
        assert_eq!(s.partitions().unwrap().len(), 1, "two points became a segment");
        assert_eq!(fs::metadata(dir.path().join("wal.log")).unwrap().len(), 0, "and left the WAL");
        assert_eq!(s.range(1, "temp", day, day + 10).unwrap().len(), 2);
        assert!(!s.flush_if_older(std::time::Duration::ZERO).unwrap(), "an empty buffer has no age");
    }

    #[test]
    fn write_flush_read_latest_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let day = 1_700_000_000_000 / DAY_MS * DAY_MS;
        {
            let mut s = EmbeddedStore::open(dir.path(), 1000, false).unwrap();
            let mut batch = Vec::new();
            for i in 0..1500 {
                batch.push(pt(1, "temp", day + i * 60_000, Value::Number(20.0 + (i % 10) as f64 / 10.0)));
                batch.push(pt(2, "door", day + i * 60_000, Value::Bool(i % 100 == 0)));
            }
            batch.push(pt(1, "mode", day + 5, Value::Text("eco".into())));
            batch.push(pt(1, "list", day + 6, Value::Json("[1,2]".into())));
            s.write_batch(batch).unwrap();
            // 1,500 minutes cross into the next day: two partitions.
            assert_eq!(s.partitions().unwrap().len(), 2);
            s.write_batch(vec![pt(1, "temp", day + 10, Value::Number(99.0))]).unwrap(); // overwrite, still buffered
            let r = s.range(1, "temp", day, day + 3 * 60_000).unwrap();
            assert_eq!(r.iter().map(|(t, _)| *t - day).collect::<Vec<_>>(), [0, 10, 60_000, 120_000]);
            assert_eq!(r[1].1, Value::Number(99.0));
            let latest = s.latest(1);
            assert_eq!(latest.iter().map(|(k, ..)| k.as_str()).collect::<Vec<_>>(), ["list", "mode", "temp"]);
        }
        // Reopen: segments and the WAL (the unflushed overwrite) are back.
        let s = EmbeddedStore::open(dir.path(), 1000, false).unwrap();
        let r = s.range(1, "temp", day, day + 20).unwrap();
        assert_eq!(r, vec![(day, Value::Number(20.0)), (day + 10, Value::Number(99.0))]);
        assert_eq!(s.range(2, "door", day, day + DAY_MS * 2).unwrap().len(), 1500);
        assert_eq!(s.range(1, "list", day, day + 10).unwrap(), vec![(day + 6, Value::Json("[1,2]".into()))]);
        assert!(s.range(1, "temp", day + 10, day).unwrap().is_empty(), "an empty or reversed range");
        // Compaction keeps every point and the later write of a timestamp.
        let mut s = s;
        s.write_batch(vec![pt(1, "temp", day, Value::Number(-1.0))]).unwrap();
        s.flush().unwrap();
        assert!(s.compact().unwrap() >= 1);
        assert!(s.partitions().unwrap().iter().all(|(_, segs)| segs.len() == 1));
        let r = s.range(1, "temp", day, day + 20).unwrap();
        assert_eq!(r, vec![(day, Value::Number(-1.0)), (day + 10, Value::Number(99.0))]);
        assert_eq!(s.range(2, "door", day, day + DAY_MS * 2).unwrap().len(), 1500);
        let l = s.latest(1);
        assert_eq!(l.iter().find(|(k, ..)| k == "temp").map(|(_, t, _)| *t), Some(day + 1499 * 60_000));
    }

    #[test]
    fn writes_during_a_compaction_keep_winning() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = EmbeddedStore::open(dir.path(), 1, false).unwrap();
        s.write_batch(vec![pt(1, "a", 10, Value::Number(1.0))]).unwrap();
        s.write_batch(vec![pt(1, "a", 20, Value::Number(2.0))]).unwrap();
        let plan = s.plan_compaction().unwrap();
        assert_eq!(plan.len(), 1);
        // While it merges (outside the store), a new write overwrites a merged point.
        s.write_batch(vec![pt(1, "a", 10, Value::Number(9.0))]).unwrap();
        let built = plan[0].build(|_, _| true).unwrap();
        s.install(&plan[0], built.0).unwrap();
        assert_eq!(s.range(1, "a", 0, 100).unwrap(), vec![(10, Value::Number(9.0)), (20, Value::Number(2.0))]);
        assert_eq!(s.partitions().unwrap()[0].1.len(), 2, "the merged segment and the one written meanwhile");
        drop(s);
        let s = EmbeddedStore::open(dir.path(), 1, false).unwrap();
        assert_eq!(s.range(1, "a", 0, 100).unwrap(), vec![(10, Value::Number(9.0)), (20, Value::Number(2.0))], "after a restart too");
    }

    #[test]
    fn a_torn_wal_record_loses_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = EmbeddedStore::open(dir.path(), 1_000_000, false).unwrap();
            s.write_batch(vec![pt(1, "a", 1, Value::Number(1.0))]).unwrap();
            s.write_batch(vec![pt(1, "a", 2, Value::Number(2.0))]).unwrap();
        }
        // A crash in the middle of the third record.
        let wal = dir.path().join("wal.log");
        let mut b = fs::read(&wal).unwrap();
        let keep = b.len();
        b.extend_from_slice(&[40, 0, 0, 0, 1, 2, 3, 4, 9, 9]);
        fs::write(&wal, &b).unwrap();
        let mut s = EmbeddedStore::open(dir.path(), 1_000_000, false).unwrap();
        assert_eq!(fs::metadata(&wal).unwrap().len() as usize, keep, "the torn tail is cut");
        assert_eq!(s.range(1, "a", 0, 10).unwrap().len(), 2);
        s.write_batch(vec![pt(1, "a", 3, Value::Number(3.0))]).unwrap();
        drop(s);
        let s = EmbeddedStore::open(dir.path(), 1_000_000, false).unwrap();
        assert_eq!(s.range(1, "a", 0, 10).unwrap().len(), 3);
    }

    #[test]
    fn a_corrupt_segment_is_an_error_not_a_panic_and_retention_drops_days() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = EmbeddedStore::open(dir.path(), 1, false).unwrap();
        for d in 0..3 {
            s.write_batch(vec![pt(1, "a", d * DAY_MS + 5, Value::Number(d as f64))]).unwrap();
        }
        assert_eq!(s.partitions().unwrap().len(), 3);
        assert_eq!(s.apply_retention(2 * DAY_MS).unwrap(), 2);
        assert_eq!(s.range(1, "a", 0, 3 * DAY_MS).unwrap(), vec![(2 * DAY_MS + 5, Value::Number(2.0))]);
        let seg = s.partitions().unwrap()[0].1[0].clone();
        let mut b = fs::read(&seg).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 1;
        fs::write(&seg, &b).unwrap();
        assert!(matches!(s.range(1, "a", 0, 3 * DAY_MS), Err(StoreError::Corrupt(_))));
    }
}
