//! Each device's product as its last login (or a read of the device) found it, kept for
//! `TTL`: telemetry checks a device's points against its product's rules without reading the
//! device again. A plain sharded map with an expiry per entry: a moka entry cost ~180 bytes
//! of every connected device for an 8-byte key and a 16-byte value.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::message::now_ms;

/// How long a device's product is trusted without reading the device again (changes made
/// through the API update it at once; this bounds what a missed notice can cost).
const TTL: Duration = Duration::from_secs(600);
const SHARDS: usize = 16;

type Shard = HashMap<i64, (Option<i64>, u64), foldhash::fast::RandomState>;

pub(super) struct Products {
    shards: Box<[Mutex<Shard>]>,
    /// Entries a shard holds before it drops its expired ones (and, still full, all).
    per_shard: usize,
}

impl Products {
    pub(super) fn new(capacity: usize) -> Products {
        Products { shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(), per_shard: capacity.div_ceil(SHARDS).max(1) }
    }

    fn shard(&self, device: i64) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[device.rem_euclid(SHARDS as i64) as usize].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The product noted for `device` (`Some(None)`: it has none), unless unknown or expired.
    pub(super) fn get(&self, device: i64) -> Option<Option<i64>> {
        let now = now_ms();
        self.shard(device).get(&device).filter(|(_, until)| *until > now).map(|(p, _)| *p)
    }

    pub(super) fn insert(&self, device: i64, product: Option<i64>) {
        let now = now_ms();
        let mut s = self.shard(device);
        if s.len() >= self.per_shard && !s.contains_key(&device) {
            s.retain(|_, (_, until)| *until > now);
            if s.len() >= self.per_shard {
                s.clear(); // a cache: what is dropped is read again when needed
            }
        }
        s.insert(device, (product, now + TTL.as_millis() as u64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noted_products_are_found_and_a_full_shard_makes_room() {
        let p = Products::new(32);
        p.insert(7, Some(3));
        p.insert(8, None);
        assert_eq!(p.get(7), Some(Some(3)));
        assert_eq!(p.get(8), Some(None), "a device without a product is known too");
        assert_eq!(p.get(9), None);
        for d in 0..1_000 {
            p.insert(d, Some(d));
        }
        assert!(p.shards.iter().all(|s| s.lock().unwrap().len() <= 2), "bounded per shard");
        assert_eq!(p.get(999), Some(Some(999)), "the newest entry stays");
    }
}
