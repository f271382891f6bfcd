//! Segment files and the WAL on disk: building (and compacting) segments, writing them under a
//! temporary name then renaming, reading and indexing them with their CRC checked, and
//! replaying the WAL up to its first torn record.
use super::*;

/// A planned merge of one partition's segments.
pub(super) struct Compaction {
    pub(super) dir: PathBuf,
    pub(super) part: i64,
    pub(super) segs: Vec<PathBuf>,
    pub(super) number: u64,
}

impl Compaction {
    /// Read, merge and write the merged segment (no store state touched): its path and bytes
    /// (None when nothing is kept), and how many points were left out.
    pub(super) fn build(&self, keep: impl Fn(&SeriesKey, i64) -> bool) -> Result<Built, StoreError> {
        let mut merged: BTreeMap<(SeriesKey, u8), BTreeMap<i64, Value>> = BTreeMap::new();
        let mut dropped = 0u64;
        for seg in &self.segs {
            for (key, ts, vals) in read_segment(seg, |_, _| true)? {
                for (t, v) in ts.into_iter().zip(vals) {
                    if keep(&key, t) {
                        merged.entry((key.clone(), kind_of(&v))).or_default().insert(t, v);
                    } else {
                        dropped += 1;
                    }
                }
            }
        }
        let entries: Vec<Column> =
            merged.into_iter().map(|((key, kind), pts)| (key, kind, pts.keys().copied().collect(), pts.into_values().collect())).collect();
        if entries.is_empty() {
            return Ok((None, dropped));
        }
        let bytes = encode_segment(entries, chunk::Level::Small)?;
        let path = persist_segment(&self.dir, self.part, self.number, &bytes)?;
        Ok((Some((path, bytes)), dropped))
    }
}

/// A segment file's bytes: `TSS1`, entry count, (device, kind, key, chunk)…, CRC.
pub(super) fn encode_segment(entries: Vec<Column>, level: chunk::Level) -> Result<Vec<u8>, StoreError> {
    let mut file = Vec::new();
    file.extend_from_slice(b"TSS1");
    file.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for ((device, key), kind, ts, vals) in entries {
        let chunk = chunk::encode(&ts, &to_values(kind, vals), level).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        file.extend_from_slice(&device.to_le_bytes());
        file.push(kind);
        file.extend_from_slice(&(key.len() as u32).to_le_bytes());
        file.extend_from_slice(key.as_bytes());
        file.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
        file.extend_from_slice(&chunk);
    }
    file.extend_from_slice(&crc32fast::hash(&file).to_le_bytes());
    Ok(file)
}

/// Write segment `number` of partition `part` under `dir` (tmp + fsync + rename + dir fsync).
pub(super) fn persist_segment(dir: &Path, part: i64, number: u64, bytes: &[u8]) -> Result<PathBuf, StoreError> {
    let pdir = dir.join(format!("p{part}"));
    fs::create_dir_all(&pdir)?;
    let name = pdir.join(format!("seg-{number}.tss"));
    let tmp = name.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, &name)?;
    File::open(&pdir)?.sync_all()?;
    Ok(name)
}

pub(super) fn segment_number(p: &Path) -> u64 {
    p.file_stem().and_then(|f| f.to_str()).and_then(|f| f.strip_prefix("seg-")).and_then(|n| n.parse().ok()).unwrap_or(0)
}

pub(super) fn to_values(kind: u8, vals: Vec<Value>) -> Values {
    match kind {
        0 => Values::Number(vals.into_iter().map(|v| if let Value::Number(n) = v { n } else { f64::NAN }).collect()),
        1 => Values::Bool(vals.into_iter().map(|v| matches!(v, Value::Bool(true))).collect()),
        _ => Values::Text(vals.into_iter().map(|v| if let Value::Text(s) | Value::Json(s) = v { s } else { String::new() }).collect()),
    }
}

pub(super) fn from_values(kind: u8, v: Values) -> Vec<Value> {
    match v {
        Values::Number(v) => v.into_iter().map(Value::Number).collect(),
        Values::Bool(v) => v.into_iter().map(Value::Bool).collect(),
        Values::Text(v) if kind == 3 => v.into_iter().map(Value::Json).collect(),
        Values::Text(v) => v.into_iter().map(Value::Text).collect(),
    }
}

type SegmentEntry = (SeriesKey, Vec<i64>, Vec<Value>);

/// The series chunks of a segment file that `want` selects (the file is checked against its
/// CRC first; unselected chunks are skipped without decoding).
pub(super) fn read_segment(path: &Path, want: impl Fn(i64, &str) -> bool) -> Result<Vec<SegmentEntry>, StoreError> {
    let b = fs::read(path)?;
    let seg = index_bytes(path, &b)?;
    decode_chunks(&seg, &b, want)
}

/// Decode the selected chunks of an indexed segment from its bytes.
pub(super) fn decode_chunks(seg: &Seg, b: &[u8], want: impl Fn(i64, &str) -> bool) -> Result<Vec<SegmentEntry>, StoreError> {
    let mut out = Vec::new();
    for ((device, key), list) in &seg.chunks {
        if !want(*device, key) {
            continue;
        }
        for (kind, off, len) in list {
            let bytes = &b[*off as usize..*off as usize + *len as usize];
            let (ts, vals) = chunk::decode(bytes).map_err(|e| StoreError::Corrupt(format!("{}: {e}", seg.path.display())))?;
            out.push(((*device, key.clone()), ts, from_values(*kind, vals)));
        }
    }
    Ok(out)
}

/// Where the chunks of segment `path` (whose bytes are `b`) are; the file's checksum is
/// verified here, once.
pub(super) fn index_bytes(path: &Path, b: &[u8]) -> Result<Seg, StoreError> {
    let bad = |m: &str| StoreError::Corrupt(format!("{}: {m}", path.display()));
    if b.len() < 12 || &b[..4] != b"TSS1" {
        return Err(bad("not a segment"));
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) {
        return Err(bad("checksum mismatch"));
    }
    let u32_at = |at: usize| -> Result<usize, StoreError> {
        body.get(at..at + 4).map(|x| u32::from_le_bytes([x[0], x[1], x[2], x[3]]) as usize).ok_or_else(|| bad("truncated"))
    };
    let n = u32_at(4)?;
    let mut at = 8usize;
    let mut chunks: std::collections::HashMap<SeriesKey, Vec<(u8, u64, u32)>> = std::collections::HashMap::new();
    for _ in 0..n {
        let d = body.get(at..at + 8).ok_or_else(|| bad("truncated"))?;
        let device = i64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
        let kind = *body.get(at + 8).ok_or_else(|| bad("truncated"))?;
        let klen = u32_at(at + 9)?;
        let key = body.get(at + 13..at + 13 + klen).ok_or_else(|| bad("truncated"))?;
        let key = std::str::from_utf8(key).map_err(|_| bad("key is not UTF-8"))?.to_string();
        let clen = u32_at(at + 13 + klen)?;
        let off = at + 17 + klen;
        if off + clen > body.len() {
            return Err(bad("truncated"));
        }
        chunks.entry((device, key)).or_default().push((kind, off as u64, clen as u32));
        at = off + clen;
    }
    Ok(Seg { path: path.to_path_buf(), chunks, file: std::sync::OnceLock::new() })
}

/// Points of every intact WAL record, and the length up to the last intact one.
pub(super) fn replay(path: &Path) -> Result<(Vec<Point>, u64), StoreError> {
    let mut b = Vec::new();
    File::open(path)?.read_to_end(&mut b)?;
    let mut points = Vec::new();
    let mut at = 0usize;
    while b.len() - at >= 8 {
        let len = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize;
        let crc = u32::from_le_bytes([b[at + 4], b[at + 5], b[at + 6], b[at + 7]]);
        if len > WAL_MAX_RECORD || b.len() - at - 8 < len {
            break;
        }
        let body = &b[at + 8..at + 8 + len];
        if crc32fast::hash(body) != crc {
            break;
        }
        match bincode::serde::decode_from_slice::<Vec<WalPoint>, _>(body, bincode_cfg()) {
            Ok((p, _)) => points.extend(p.into_iter().map(Point::from)),
            // An intact record this build cannot read is not a torn write: refuse to open
            // rather than cut it (and everything after it) away.
            Err(e) => return Err(StoreError::Corrupt(format!("{}: unreadable WAL record at byte {at}: {e}", path.display()))),
        }
        at += 8 + len;
    }
    if at < b.len() {
        tracing::warn!(path = %path.display(), dropped_bytes = b.len() - at, "time-series WAL ends in a torn record (crash mid-write); keeping everything before it");
    }
    Ok((points, at as u64))
}
