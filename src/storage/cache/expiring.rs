//! A bounded in-process map whose entries expire one by one: for what the node notes about
//! every connected device (its identity, its product). A plain sharded `HashMap` with an
//! expiry per entry: a moka entry costs ~180 bytes of bookkeeping (access-order deques, timer
//! nodes, a frequency sketch) on top of its key and value, which at 100k devices is what the
//! entries themselves cost. What a full shard drops is read again when needed.
use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::message::now_ms;

const SHARDS: usize = 16;

type Shard<K, V> = HashMap<K, (V, u64), foldhash::fast::RandomState>;

pub struct ExpiringMap<K, V> {
    shards: Box<[Mutex<Shard<K, V>>]>,
    /// Picks a key's shard (seeded apart from the shards' own hashers).
    pick: foldhash::fast::RandomState,
    /// Entries a shard holds before it drops its expired ones (and, still full, a quarter).
    per_shard: usize,
    ttl_ms: u64,
}

impl<K: Hash + Eq, V: Clone> ExpiringMap<K, V> {
    /// At most about `capacity` entries, each kept for `ttl` after it was inserted.
    pub fn new(capacity: usize, ttl: Duration) -> ExpiringMap<K, V> {
        ExpiringMap {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            pick: foldhash::fast::RandomState::default(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            ttl_ms: ttl.as_millis().try_into().unwrap_or(u64::MAX),
        }
    }

    fn shard<Q: Hash + ?Sized>(&self, k: &Q) -> MutexGuard<'_, Shard<K, V>> {
        let i = (self.pick.hash_one(k) >> 32) as usize % SHARDS;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The value of `k`, unless unknown or expired.
    pub fn get<Q>(&self, k: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let now = now_ms();
        let mut s = self.shard(k);
        match s.get(k) {
            Some((v, until)) if *until > now => Some(v.clone()),
            Some(_) => {
                s.remove(k);
                None
            }
            None => None,
        }
    }

    pub fn insert(&self, k: K, v: V) {
        let now = now_ms();
        let mut s = self.shard(&k);
        if s.len() >= self.per_shard && !s.contains_key(&k) {
            s.retain(|_, (_, until)| *until > now);
            if s.len() >= self.per_shard {
                // Still full of live entries: a quarter goes (in the table's own order, which
                // does not follow insertion), so a full cache does not pay this at every insert.
                let (quarter, mut seen) = ((self.per_shard / 4).max(1), 0);
                s.retain(|_, _| {
                    seen += 1;
                    seen > quarter
                });
            }
        }
        s.insert(k, (v, now.saturating_add(self.ttl_ms)));
    }

    pub fn remove<Q>(&self, k: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shard(k).remove(k);
    }

    pub fn clear(&self) {
        for s in self.shards.iter() {
            s.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }

    /// Entries held, expired ones not yet dropped included.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_found_until_they_expire_and_a_full_shard_makes_room() {
        let m = ExpiringMap::new(32, Duration::from_secs(60));
        m.insert(7i64, Some(3i64));
        m.insert(8, None);
        assert_eq!(m.get(&7), Some(Some(3)));
        assert_eq!(m.get(&8), Some(None), "a noted absence is found too");
        assert_eq!(m.get(&9), None);
        m.remove(&7);
        assert_eq!(m.get(&7), None);
        for k in 0..1_000 {
            m.insert(k, Some(k));
        }
        assert!(m.shards.iter().all(|s| s.lock().unwrap().len() <= 2), "bounded per shard");
        assert_eq!(m.get(&999), Some(Some(999)), "the newest entry stays");
        m.clear();
        assert!(m.is_empty());

        let short = ExpiringMap::new(32, Duration::ZERO);
        short.insert("k".to_string(), 1u8);
        assert_eq!(short.get("k"), None, "expired at once");
        assert_eq!(short.len(), 0, "and dropped when found expired");
    }
}
