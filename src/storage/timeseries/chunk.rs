//! One series' points as a compressed, checksummed chunk: the unit the embedded store writes,
//! reads and drops.
//!
//! Layout (little endian): `TSC1` · kind u8 · count u32 · ts_len u32 · timestamps · values ·
//! crc32 of everything before it. Timestamps (ms) and numbers are compressed by `pco` (delta
//! encoding and its float-multiplier detection suit telemetry: a random walk at 0.1 resolution
//! costs well under a byte per point); booleans and string dictionary indices are `pco` u32
//! columns (a flag that rarely flips costs next to nothing); strings are dictionary-encoded.
//! Decoding checks the checksum first and never panics: a chunk torn by a crash is an error.
use pco::standalone::{simple_compress, simple_decompress};
use pco::ChunkConfig;

/// How hard to compress: `Fast` for fresh segments (they are rewritten by compaction),
/// `Small` for compacted ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Fast,
    Small,
}

fn compress<T: pco::data_types::Number>(v: &[T], level: Level) -> Result<Vec<u8>, ChunkError> {
    let cfg = match level {
        Level::Fast => ChunkConfig::default().with_compression_level(2),
        Level::Small => ChunkConfig::default(),
    };
    simple_compress(v, &cfg).map_err(|e| corrupt(e.to_string()))
}

const MAGIC: &[u8; 4] = b"TSC1";
/// Most points in one chunk (bounds what decoding allocates).
pub const MAX_POINTS: usize = 1 << 20;

/// The values of one chunk: one type per chunk (a series whose type changes starts a new one).
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    Number(Vec<f64>),
    Bool(Vec<bool>),
    /// Strings, and JSON values kept as their text.
    Text(Vec<String>),
}

impl Values {
    pub fn len(&self) -> usize {
        match self {
            Values::Number(v) => v.len(),
            Values::Bool(v) => v.len(),
            Values::Text(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn kind(&self) -> u8 {
        match self {
            Values::Number(_) => 0,
            Values::Bool(_) => 1,
            Values::Text(_) => 2,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ChunkError {
    #[error("timestamps and values differ in length ({0} vs {1})")]
    Lengths(usize, usize),
    #[error("too many points in one chunk ({0})")]
    TooMany(usize),
    #[error("corrupt chunk: {0}")]
    Corrupt(String),
}

fn corrupt(m: impl Into<String>) -> ChunkError {
    ChunkError::Corrupt(m.into())
}

fn put_u32(out: &mut Vec<u8>, v: usize) {
    out.extend_from_slice(&(v as u32).to_le_bytes());
}

/// Encode points (timestamps in ms, not necessarily sorted; kept in the given order).
pub fn encode(ts: &[i64], values: &Values, level: Level) -> Result<Vec<u8>, ChunkError> {
    if ts.len() != values.len() {
        return Err(ChunkError::Lengths(ts.len(), values.len()));
    }
    if ts.len() > MAX_POINTS {
        return Err(ChunkError::TooMany(ts.len()));
    }
    let mut out = Vec::with_capacity(64 + ts.len());
    out.extend_from_slice(MAGIC);
    out.push(values.kind());
    put_u32(&mut out, ts.len());
    let t = compress(ts, level)?;
    put_u32(&mut out, t.len());
    out.extend_from_slice(&t);
    match values {
        Values::Number(v) => out.extend_from_slice(&compress(v, level)?),
        Values::Bool(v) => out.extend_from_slice(&compress(&v.iter().map(|b| *b as u32).collect::<Vec<_>>(), level)?),
        Values::Text(v) => {
            let mut dict: Vec<&str> = Vec::new();
            let mut index = std::collections::HashMap::new();
            let ids: Vec<u32> = v
                .iter()
                .map(|s| {
                    *index.entry(s.as_str()).or_insert_with(|| {
                        dict.push(s);
                        dict.len() as u32 - 1
                    })
                })
                .collect();
            put_u32(&mut out, dict.len());
            for s in &dict {
                put_u32(&mut out, s.len());
                out.extend_from_slice(s.as_bytes());
            }
            out.extend_from_slice(&compress(&ids, level)?);
        }
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ChunkError> {
        if self.b.len() < n {
            return Err(corrupt("truncated"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }

    fn u32(&mut self) -> Result<usize, ChunkError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
}

/// Decode a chunk: (timestamps, values).
pub fn decode(b: &[u8]) -> Result<(Vec<i64>, Values), ChunkError> {
    if b.len() < MAGIC.len() + 1 + 4 + 4 + 4 || &b[..4] != MAGIC {
        return Err(corrupt("not a chunk"));
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) {
        return Err(corrupt("checksum mismatch"));
    }
    let mut r = Reader { b: &body[4..] };
    let kind = r.take(1)?[0];
    let count = r.u32()?;
    if count > MAX_POINTS {
        return Err(ChunkError::TooMany(count));
    }
    let tlen = r.u32()?;
    let ts: Vec<i64> = simple_decompress(r.take(tlen)?).map_err(|e| corrupt(e.to_string()))?;
    let values = match kind {
        0 => Values::Number(simple_decompress(r.b).map_err(|e| corrupt(e.to_string()))?),
        1 => Values::Bool(simple_decompress::<u32>(r.b).map_err(|e| corrupt(e.to_string()))?.into_iter().map(|x| x != 0).collect()),
        2 => {
            let n = r.u32()?;
            if n > count {
                return Err(corrupt("dictionary larger than the chunk"));
            }
            let mut dict = Vec::with_capacity(n);
            for _ in 0..n {
                let len = r.u32()?;
                let s = std::str::from_utf8(r.take(len)?).map_err(|_| corrupt("string is not UTF-8"))?;
                dict.push(s.to_string());
            }
            let ids: Vec<u32> = simple_decompress(r.b).map_err(|e| corrupt(e.to_string()))?;
            let mut out = Vec::with_capacity(ids.len());
            for i in ids {
                out.push(dict.get(i as usize).cloned().ok_or_else(|| corrupt("dictionary index out of range"))?);
            }
            Values::Text(out)
        }
        k => return Err(corrupt(format!("unknown value kind {k}"))),
    };
    if ts.len() != count || values.len() != count {
        return Err(corrupt("column lengths disagree"));
    }
    Ok((ts, values))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn round_trips_every_kind() {
        let ts: Vec<i64> = (0..500).map(|i| 1_700_000_000_000 + i * 10_000).collect();
        for v in [
            Values::Number((0..500).map(|i| (i as f64 * 0.1).sin()).collect()),
            Values::Bool((0..500).map(|i| i % 97 == 0).collect()),
            Values::Text((0..500).map(|i| ["open", "closed", "{\"a\":1}"][i % 3].to_string()).collect()),
        ] {
            let b = encode(&ts, &v, Level::Small).unwrap();
            assert_eq!(decode(&b).unwrap(), (ts.clone(), v));
        }
        let empty = encode(&[], &Values::Number(vec![]), Level::Fast).unwrap();
        assert_eq!(decode(&empty).unwrap(), (vec![], Values::Number(vec![])));
        assert_eq!(encode(&[1], &Values::Bool(vec![]), Level::Fast), Err(ChunkError::Lengths(1, 0)));
    }

    /// Telemetry-like series: a temperature random walk at 0.1 resolution every 10 s.
    #[test]
    fn a_random_walk_costs_under_a_byte_per_point() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut t = 21.0f64;
        let n = 2000;
        let ts: Vec<i64> = (0..n).map(|i| 1_700_000_000_000 + i * 10_000).collect();
        let v: Vec<f64> = (0..n)
            .map(|_| {
                t += [-0.1, 0.0, 0.1][rng.gen_range(0..3)];
                (t * 10.0).round() / 10.0
            })
            .collect();
        let b = encode(&ts, &Values::Number(v), Level::Small).unwrap();
        let per_point = b.len() as f64 / n as f64;
        println!("random walk: {} bytes for {n} points = {per_point:.3} bytes/point", b.len());
        assert!(per_point < 1.0, "{per_point} bytes/point");
    }

    #[test]
    fn torn_and_flipped_chunks_are_errors() {
        let ts: Vec<i64> = (0..100).collect();
        let b = encode(&ts, &Values::Text((0..100).map(|i| format!("s{}", i % 7)).collect()), Level::Fast).unwrap();
        for cut in 0..b.len() {
            assert!(decode(&b[..cut]).is_err(), "a chunk cut at {cut} decoded");
        }
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x40;
            assert!(decode(&c).is_err(), "a flipped byte at {i} went unnoticed");
        }
    }

    proptest! {
        #[test]
        fn numbers_round_trip(ts in proptest::collection::vec(any::<i64>(), 0..200), seed: u64) {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let v: Vec<f64> = ts.iter().map(|_| rng.gen::<f64>() * 1e6 - 5e5).collect();
            let b = encode(&ts, &Values::Number(v.clone()), Level::Fast).unwrap();
            prop_assert_eq!(decode(&b).unwrap(), (ts, Values::Number(v)));
        }

        /// Arbitrary bytes (even with a valid checksum) never panic the decoder.
        #[test]
        fn garbage_never_panics(mut body in proptest::collection::vec(any::<u8>(), 0..400), kind in 0u8..4) {
            let mut b = b"TSC1".to_vec();
            b.push(kind);
            b.append(&mut body);
            let crc = crc32fast::hash(&b);
            b.extend_from_slice(&crc.to_le_bytes());
            let _ = decode(&b);
        }
    }
}
