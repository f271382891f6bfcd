//! The node's own durable state — persistent sessions, their queues (offline, and what a slow
//! subscriber has not taken yet), inbound QoS 2 packet ids, wills and retained messages — in an
//! embedded LSM store (fjall) under `data_dir/state`.
//!
//! Writes are incremental: a delivery queued for a session is one record, its acknowledgement
//! one tombstone, a subscription change one session record; nothing ever rewrites the whole
//! state. Records go to the store's journal buffer; one committer thread makes them as durable
//! as the configured mode asks (`written`: handed to the OS, survives a process crash;
//! `synced`: fdatasync, survives power loss) for every waiter at once (group commit), then
//! releases what waited: publishers' acknowledgements, PUBRECs, SUBACKs.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::Durability;
use crate::message::{Delivery, DurableToken, Message};
use crate::protocols::mqtt::{Protocol, SubOptions, Will};

/// Persistent state of one session: what travels to another node at a takeover and to its
/// backup node, and (without queue and inbound ids, which are records of their own) what the
/// store keeps per session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionSnapshot {
    pub client_id: String,
    pub protocol: Protocol,
    pub expiry_secs: u32,
    /// When the client went away (Unix ms); `None` if it was connected at snapshot time.
    pub disconnected_at_ms: Option<u64>,
    pub subscriptions: Vec<(String, SubOptions, Option<u32>)>,
    /// Outbound QoS 1/2 messages awaiting acknowledgement: (packet id, PUBREL sent, delivery).
    pub inflight: Vec<(u16, bool, Delivery)>,
    pub queue: Vec<Delivery>,
    /// Inbound QoS 2 packet ids received but not yet released.
    pub incoming_qos2: Vec<u16>,
    /// The will not yet published, and when it is due (Unix ms) if its delay is already running.
    /// A will of a client that was connected when the node stopped is due at restart (+ delay).
    pub will: Option<Will>,
    pub will_due_ms: Option<u64>,
}

/// Where a session restored from this node's store stands with its queue: the snapshot holds
/// the head (in order, in-flight first), the rest stays on disk.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueInfo {
    /// Records of the whole queue (head included) and their approximate size.
    pub count: usize,
    pub bytes: u64,
    /// Records only on disk, after the head.
    pub spilled: usize,
    /// The next sequence number to use.
    pub next_seq: u64,
}

/// An opened store, the sessions and the retained messages a previous run left.
pub type Opened = (Arc<StateStore>, Vec<Restored>, Vec<Message>);

/// A persistent session as a previous run left it.
pub struct Restored {
    pub snap: SessionSnapshot,
    pub queue: QueueInfo,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Store { path: String, message: String },
    #[error("{path}: record {key} cannot be read ({why}); the state store is damaged or from an incompatible version — move it away to start empty")]
    Corrupt { path: String, key: String, why: String },
}

/// A queued delivery as stored: its outbound packet id once it was sent as QoS 2 (0 = not
/// recorded) and whether its PUBREL went out.
#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    pkid: u16,
    released: bool,
    d: Delivery,
}

/// The same record, borrowed for writing (serialized exactly like `Entry`).
#[derive(Serialize)]
struct EntryRef<'a> {
    pkid: u16,
    released: bool,
    d: &'a Delivery,
}

/// A queue record's key and value.
fn entry_record(client: &str, d: &Delivery, pkid: u16, released: bool) -> (Vec<u8>, Vec<u8>) {
    (queue_key(client, d.seq), encode(&EntryRef { pkid, released, d }))
}

/// A queue record read back: its packet id, PUBREL flag and delivery (numbered and marked
/// stored); the key's last 8 bytes are the sequence number.
fn read_entry(k: &[u8], v: &[u8]) -> Result<(u16, bool, Delivery), String> {
    let seq = k.get(k.len().saturating_sub(8)..).and_then(|s| s.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0);
    let e: Entry = decode(v)?;
    let mut d = e.d;
    d.seq = seq;
    d.stored = true;
    Ok((e.pkid, e.released, d))
}

const RECORD_VERSION: u8 = 1;

/// What waits for the next commit: a publisher's copy, or a one-shot signal (true = durable).
pub enum Waiter {
    Token(Arc<DurableToken>),
    Signal(tokio::sync::oneshot::Sender<bool>),
}

#[derive(Default)]
struct Pending {
    waiters: Vec<Waiter>,
    dirty: bool,
    stop: bool,
}

struct Committer {
    pending: Mutex<Pending>,
    wake: Condvar,
}

pub struct StateStore {
    path: PathBuf,
    db: Database,
    meta: Keyspace,
    queue: Keyspace,
    qos2: Keyspace,
    retained: Keyspace,
    mode: Durability,
    commit: Arc<Committer>,
    /// A write failed (logged once): later writes are refused until one succeeds.
    failing: AtomicBool,
    /// Commits done (group commits), for `/metrics`.
    pub commits: Arc<AtomicU64>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn client_prefix(client: &str) -> Vec<u8> {
    let b = client.as_bytes();
    let mut k = Vec::with_capacity(2 + b.len() + 8);
    k.extend_from_slice(&(b.len().min(u16::MAX as usize) as u16).to_be_bytes());
    k.extend_from_slice(&b[..b.len().min(u16::MAX as usize)]);
    k
}

fn queue_key(client: &str, seq: u64) -> Vec<u8> {
    let mut k = client_prefix(client);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn qos2_key(client: &str, pkid: u16) -> Vec<u8> {
    let mut k = client_prefix(client);
    k.extend_from_slice(&pkid.to_be_bytes());
    k
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![RECORD_VERSION];
    // Encoding plain data into a Vec does not fail; an empty record would be refused at load.
    let _ = bincode::serde::encode_into_std_write(v, &mut out, bincode::config::standard());
    out
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    match bytes.split_first() {
        Some((&RECORD_VERSION, body)) => {
            bincode::serde::decode_from_slice(body, bincode::config::standard()).map(|(v, _)| v).map_err(|e| e.to_string())
        }
        Some((v, _)) => Err(format!("record version {v}")),
        None => Err("empty record".into()),
    }
}

/// The approximate bytes a queued delivery holds (payload, topic, overhead).
pub fn delivery_bytes(d: &Delivery) -> u64 {
    (d.msg.payload.len() + d.msg.topic.len() + 64) as u64
}

/// The most a keyspace keeps in memory before it is written to a table on disk.
const MEMTABLE: u64 = 8 << 20;
/// The retained keyspace's: its writes are mostly devices' status messages (~650 bytes each
/// in a memtable, a few dozen on disk), one per login and logout — a fleet's reconnect storm
/// filled 8 MiB of memtable that nothing reads (reads go to the retained trie in memory).
const RETAINED_MEMTABLE: u64 = 2 << 20;

impl StateStore {
    /// Open (creating) the store in `dir/state`, importing the whole-file snapshots of older
    /// versions once. A damaged store is an error naming it, never an empty start.
    pub fn open(dir: &Path, mode: Durability, interval: Duration, head: usize) -> Result<Opened, StateError> {
        std::fs::create_dir_all(dir).map_err(|source| StateError::Io { path: dir.display().to_string(), source })?;
        let path = dir.join("state");
        let err = |e: fjall::Error| StateError::Store { path: path.display().to_string(), message: e.to_string() };
        let db = Database::builder(&path).worker_threads(1).cache_size(16 << 20).open().map_err(err)?;
        // 8 MiB memtables (2 MiB for retained messages), not fjall's 64 MiB: four keyspaces
        // could otherwise hold 256 MiB of written state in memory until it is flushed.
        let opts = |size: u64| move || KeyspaceCreateOptions::default().manual_journal_persist(true).max_memtable_size(size);
        let ks = |name: &str| db.keyspace(name, opts(if name == "retained" { RETAINED_MEMTABLE } else { MEMTABLE })).map_err(err);
        let store = StateStore {
            meta: ks("sessions")?,
            queue: ks("queue")?,
            qos2: ks("qos2")?,
            retained: ks("retained")?,
            db: db.clone(),
            path: path.clone(),
            mode,
            commit: Arc::new(Committer { pending: Mutex::new(Pending::default()), wake: Condvar::new() }),
            failing: AtomicBool::new(false),
            commits: Arc::new(AtomicU64::new(0)),
            thread: Mutex::new(None),
        };
        super::state_legacy::import(dir, &store)?;
        let retained = store.load_retained()?;
        let sessions = store.sessions(head)?;
        let store = Arc::new(store);
        let s = store.clone();
        let t = std::thread::Builder::new()
            .name("state-commit".into())
            .spawn(move || s.run_committer(interval))
            .map_err(|source| StateError::Io { path: path.display().to_string(), source })?;
        if let Ok(mut h) = store.thread.lock() {
            *h = Some(t);
        }
        Ok((store, sessions, retained))
    }

    pub fn mode(&self) -> Durability {
        self.mode
    }

    fn corrupt(&self, key: &[u8], why: String) -> StateError {
        StateError::Corrupt { path: self.path.display().to_string(), key: String::from_utf8_lossy(key).into_owned(), why }
    }

    fn load_retained(&self) -> Result<Vec<Message>, StateError> {
        let mut out = Vec::new();
        for kv in self.retained.iter() {
            let (k, v) = kv.into_inner().map_err(|e| self.corrupt(b"retained", e.to_string()))?;
            out.push(decode(&v).map_err(|why| self.corrupt(&k, why))?);
        }
        Ok(out)
    }

    /// Every stored session with the head of its queue (`head` records at most beyond the
    /// in-flight ones) and its inbound QoS 2 ids.
    pub fn sessions(&self, head: usize) -> Result<Vec<Restored>, StateError> {
        let mut out = Vec::new();
        for kv in self.meta.iter() {
            let (k, v) = kv.into_inner().map_err(|e| self.corrupt(b"sessions", e.to_string()))?;
            let snap: SessionSnapshot = decode(&v).map_err(|why| self.corrupt(&k, why))?;
            out.push(self.with_queue(snap, head)?);
        }
        Ok(out)
    }

    /// Fill a stored session's in-flight window, the first `head` queued records and its
    /// inbound ids from the store; count the rest.
    pub fn with_queue(&self, mut snap: SessionSnapshot, head: usize) -> Result<Restored, StateError> {
        let prefix = client_prefix(&snap.client_id);
        let mut q = QueueInfo { next_seq: 1, ..QueueInfo::default() };
        for kv in self.queue.prefix(&prefix) {
            let (k, v) = kv.into_inner().map_err(|e| self.corrupt(&prefix, e.to_string()))?;
            let (pkid, released, d) = read_entry(&k, &v).map_err(|why| self.corrupt(&k, why))?;
            q.count += 1;
            q.bytes += delivery_bytes(&d);
            q.next_seq = q.next_seq.max(d.seq + 1);
            if pkid != 0 && snap.queue.is_empty() {
                snap.inflight.push((pkid, released, d));
            } else if snap.queue.len() < head {
                snap.queue.push(d);
            } else {
                q.spilled += 1;
            }
        }
        for kv in self.qos2.prefix(&prefix) {
            let k = kv.key().map_err(|e| self.corrupt(&prefix, e.to_string()))?;
            if let Some(id) = k.get(prefix.len()..).and_then(|s| s.try_into().ok()).map(u16::from_be_bytes) {
                snap.incoming_qos2.push(id);
            }
        }
        Ok(Restored { snap, queue: q })
    }

    /// Up to `limit` queued records of `client` after sequence `after`, in order.
    pub fn read_queue(&self, client: &str, after: u64, limit: usize) -> Vec<Delivery> {
        let from = queue_key(client, after.saturating_add(1));
        let mut to = client_prefix(client);
        to.extend_from_slice(&u64::MAX.to_be_bytes());
        let mut out = Vec::new();
        for kv in self.queue.range(from..=to).take(limit) {
            let Ok((k, v)) = kv.into_inner() else { break };
            match read_entry(&k, &v) {
                Ok((_, _, d)) => out.push(d),
                Err(why) => {
                    tracing::error!(path = %self.path.display(), client_id = %client, key = ?&k[..], %why, "unreadable queued message skipped")
                }
            }
        }
        out
    }

    fn result(&self, what: &str, r: fjall::Result<()>) -> bool {
        match r {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(path = %self.path.display(), "state store writes again");
                }
                true
            }
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(path = %self.path.display(), error = %e, what, "state store write failed; acknowledgements that need it are refused");
                }
                false
            }
        }
    }

    /// Store a session's own record (everything but its queue and inbound ids).
    pub fn put_session(&self, snap: &SessionSnapshot) -> bool {
        let slim = SessionSnapshot { inflight: Vec::new(), queue: Vec::new(), incoming_qos2: Vec::new(), ..snap.clone() };
        self.result("session", self.meta.insert(snap.client_id.as_bytes(), encode(&slim)))
    }

    /// Forget a session: its record, queue and inbound ids.
    pub fn remove_session(&self, client: &str) {
        let prefix = client_prefix(client);
        let mut batch = self.db.batch();
        batch.remove(&self.meta, client.as_bytes());
        for ks in [&self.queue, &self.qos2] {
            for k in ks.prefix(&prefix).filter_map(|kv| kv.key().ok()) {
                batch.remove(ks, k);
            }
        }
        self.result("remove session", batch.commit());
        self.mark_dirty();
    }

    /// Writes collected by one actor turn, committed together (one journal write).
    pub fn batch(self: &Arc<Self>) -> Batch {
        Batch { inner: self.db.batch(), waiters: Vec::new(), store: self.clone() }
    }

    /// Write a batch, then let its waiters wait for the next group commit (refused at once if
    /// the write failed).
    pub fn commit(&self, b: Batch) -> bool {
        let Batch { inner, waiters, .. } = b;
        let ok = inner.is_empty() || self.result("batch", inner.commit());
        for w in waiters {
            if ok {
                self.after_commit(w);
            } else {
                release(w, false);
            }
        }
        if ok && !self.waits() {
            self.mark_dirty();
        }
        ok
    }

    /// Append (or rewrite, with its packet id) a queued delivery.
    pub fn put_entry(&self, client: &str, d: &Delivery, pkid: u16, released: bool) -> bool {
        let (k, v) = entry_record(client, d, pkid, released);
        self.result("queue", self.queue.insert(k, v))
    }

    pub fn add_qos2(&self, client: &str, pkid: u16) -> bool {
        self.result("qos2", self.qos2.insert(qos2_key(client, pkid), []))
    }

    pub fn remove_qos2(&self, client: &str, pkid: u16) {
        self.result("qos2", self.qos2.remove(qos2_key(client, pkid)));
        self.mark_dirty();
    }

    /// Set (empty payload: delete) the retained message of a topic.
    pub fn put_retained(&self, m: &Message) -> bool {
        let r = if m.payload.is_empty() {
            self.retained.remove(m.topic.as_bytes())
        } else {
            self.retained.insert(m.topic.as_bytes(), encode(m))
        };
        self.result("retained", r)
    }

    /// Make everything written so far durable now (synced), on this thread.
    pub fn sync_now(&self) -> Result<(), StateError> {
        self.db
            .persist(PersistMode::SyncAll)
            .map_err(|e| StateError::Store { path: self.path.display().to_string(), message: e.to_string() })
    }

    pub fn remove_retained(&self, topic: &str) {
        self.result("retained", self.retained.remove(topic.as_bytes()));
        self.mark_dirty();
    }

    /// Whether acknowledgements wait for the committer.
    pub fn waits(&self) -> bool {
        self.mode != Durability::Accepted
    }

    /// Release `w` once what was written before is durable (at once in mode `accepted`).
    pub fn after_commit(&self, w: Waiter) {
        if !self.waits() {
            release(w, true);
            self.mark_dirty();
            return;
        }
        if let Ok(mut p) = self.commit.pending.lock() {
            p.waiters.push(w);
            p.dirty = true;
        }
        self.commit.wake.notify_one();
    }

    /// Wait until what was written before is durable; false if the store failed.
    pub async fn committed(&self) -> bool {
        if !self.waits() {
            self.mark_dirty();
            return true;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.after_commit(Waiter::Signal(tx));
        rx.await.unwrap_or(false)
    }

    fn mark_dirty(&self) {
        if let Ok(mut p) = self.commit.pending.lock() {
            p.dirty = true;
        }
    }

    /// Flush and stop the committer (at shutdown); waits for it.
    pub fn close(&self) {
        let _ = self.db.persist(PersistMode::SyncAll);
        if let Ok(mut p) = self.commit.pending.lock() {
            p.stop = true;
        }
        self.commit.wake.notify_one();
        if let Some(t) = self.thread.lock().ok().and_then(|mut h| h.take()) {
            let _ = t.join();
        }
    }

    /// The committer: one persist for everything that waits, then release it all. Writes no
    /// one waits for (mode `accepted`, tombstones) are persisted at least every `interval`.
    fn run_committer(self: Arc<Self>, interval: Duration) {
        let mode = match self.mode {
            Durability::Synced => PersistMode::SyncData,
            _ => PersistMode::Buffer,
        };
        loop {
            let (waiters, stop) = {
                let Ok(mut p) = self.commit.pending.lock() else { return };
                if p.waiters.is_empty() && !p.stop {
                    p = match self.commit.wake.wait_timeout(p, interval) {
                        Ok((p, _)) => p,
                        Err(_) => return,
                    };
                }
                if !p.dirty && p.waiters.is_empty() && !p.stop {
                    continue;
                }
                p.dirty = false;
                (std::mem::take(&mut p.waiters), p.stop)
            };
            let ok = self.result("commit", self.db.persist(mode));
            self.commits.fetch_add(1, Ordering::Relaxed);
            for w in waiters {
                release(w, ok);
            }
            if stop {
                return;
            }
        }
    }
}

/// A session's writes of one turn: queue records and their removals, and the publishers'
/// tokens that wait for them.
pub struct Batch {
    inner: fjall::OwnedWriteBatch,
    waiters: Vec<Waiter>,
    store: Arc<StateStore>,
}

impl Batch {
    pub fn put_entry(&mut self, client: &str, d: &Delivery, pkid: u16, released: bool) {
        let (k, v) = entry_record(client, d, pkid, released);
        self.inner.insert(&self.store.queue, k, v);
    }

    pub fn remove_entry(&mut self, client: &str, seq: u64) {
        self.inner.remove(&self.store.queue, queue_key(client, seq));
    }

    /// Released once this batch is committed.
    pub fn wait(&mut self, w: Waiter) {
        self.waiters.push(w);
    }

    pub fn is_empty(&self) -> bool {
        self.inner.is_empty() && self.waiters.is_empty()
    }
}

fn release(w: Waiter, ok: bool) {
    match w {
        Waiter::Token(t) => {
            if !ok {
                t.refuse();
            }
        }
        Waiter::Signal(tx) => {
            let _ = tx.send(ok);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::mqtt::QoS;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Clone)]
    enum Op {
        Append(u8),
        Ack(usize),
        Reopen,
        Drop,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u8..3).prop_map(Op::Append),
            3 => (0usize..64).prop_map(Op::Ack),
            1 => Just(Op::Reopen),
            1 => (0u8..3).prop_map(|_| Op::Drop),
        ]
    }

    fn delivery(seq: u64, body: &str) -> Delivery {
        let m = Message::from_node(format!("t/{seq}"), body.to_string(), QoS::AtLeastOnce, false);
        Delivery {
            msg: Arc::new(m),
            qos: QoS::AtLeastOnce,
            retain: false,
            sub_ids: vec![],
            shared: None,
            durable: None,
            seq,
            stored: false,
        }
    }

    fn session(client: &str) -> SessionSnapshot {
        SessionSnapshot {
            client_id: client.into(),
            protocol: Protocol::V5,
            expiry_secs: 60,
            disconnected_at_ms: None,
            subscriptions: vec![],
            inflight: vec![],
            queue: vec![],
            incoming_qos2: vec![],
            will: None,
            will_due_ms: None,
        }
    }

    fn open(dir: &Path) -> (Arc<StateStore>, Vec<Restored>) {
        let (s, r, _) = StateStore::open(dir, Durability::Written, Duration::from_millis(10), 4).unwrap();
        (s, r)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        /// Three sessions' queues (client ids that prefix one another) against a model: what
        /// was appended and not acknowledged comes back in order, after reopening too, and a
        /// dropped session takes only its own records.
        #[test]
        fn queues_agree_with_a_model(ops in proptest::collection::vec(op(), 1..60)) {
            let dir = tempfile::tempdir().unwrap();
            let clients = ["a", "a\0b", "ab"];
            let mut model: Vec<BTreeMap<u64, String>> = vec![BTreeMap::new(); 3];
            let mut next = 1u64;
            let (mut store, _) = open(dir.path());
            for (i, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Append(c) => {
                        let c = c as usize;
                        if model[c].is_empty() {
                            store.put_session(&session(clients[c]));
                        }
                        let body = format!("m{i}");
                        prop_assert!(store.put_entry(clients[c], &delivery(next, &body), 0, false));
                        model[c].insert(next, body);
                        next += 1;
                    }
                    Op::Ack(k) => {
                        let c = k % 3;
                        if let Some(&seq) = model[c].keys().nth(k / 3 % model[c].len().max(1)) {
                            let mut b = store.batch();
                            b.remove_entry(clients[c], seq);
                            prop_assert!(store.commit(b));
                            model[c].remove(&seq);
                        }
                    }
                    Op::Reopen => {
                        store.close();
                        drop(store);
                        let (s, restored) = open(dir.path());
                        store = s;
                        for r in restored {
                            let c = clients.iter().position(|x| *x == r.snap.client_id).unwrap();
                            prop_assert_eq!(r.queue.count, model[c].len());
                            prop_assert_eq!(r.snap.queue.len() + r.queue.spilled, model[c].len());
                            let head: Vec<String> = r.snap.queue.iter().map(|d| String::from_utf8(d.msg.payload.to_vec()).unwrap()).collect();
                            let want: Vec<String> = model[c].values().take(4).cloned().collect();
                            prop_assert_eq!(head, want);
                            prop_assert!(r.queue.next_seq > model[c].keys().last().copied().unwrap_or(0));
                        }
                    }
                    Op::Drop => {
                        let c = i % 3;
                        store.remove_session(clients[c]);
                        model[c].clear();
                    }
                }
                for c in 0..3 {
                    let got: Vec<(u64, String)> = store
                        .read_queue(clients[c], 0, usize::MAX)
                        .into_iter()
                        .map(|d| (d.seq, String::from_utf8(d.msg.payload.to_vec()).unwrap()))
                        .collect();
                    let want: Vec<(u64, String)> = model[c].iter().map(|(k, v)| (*k, v.clone())).collect();
                    prop_assert_eq!(got, want);
                }
            }
        }
    }
}
