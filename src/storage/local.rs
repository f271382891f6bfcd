//! The node's data directory: retained messages and persistent sessions, written atomically
//! (temp file, fsync, rename) by the persister every `persist_interval_ms` and at shutdown.
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::message::{Delivery, Message};
use crate::protocols::mqtt::{Protocol, SubOptions, Will};

const MAGIC: &[u8; 8] = b"THNGSD03";

/// Persistent state of one session, as stored on disk.
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

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: not a thingsd data file or from an incompatible version")]
    Format { path: String },
}

/// An opened store with the sessions and retained messages a previous run left.
pub type Opened = (Arc<LocalStore>, Vec<SessionSnapshot>, Vec<Message>);

/// The data directory and the latest persistent state handed to it.
pub struct LocalStore {
    dir: PathBuf,
    sessions: Mutex<HashMap<String, SessionSnapshot>>,
    sessions_dirty: AtomicBool,
    retained_version: AtomicU64,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.display().to_string(), source }
}

fn read_file<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    let fmt = || StoreError::Format { path: path.display().to_string() };
    let body = bytes.strip_prefix(MAGIC.as_slice()).ok_or_else(fmt)?;
    let (v, _) = bincode::serde::decode_from_slice(body, bincode::config::standard()).map_err(|_| fmt())?;
    Ok(Some(v))
}

fn write_file<T: Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let body = bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map_err(|e| io_err(path)(std::io::Error::other(e.to_string())))?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(MAGIC).and_then(|_| f.write_all(&body)).and_then(|_| f.sync_all()).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

impl LocalStore {
    /// Open (creating) the data directory and load what a previous run left.
    pub fn open(dir: &Path) -> Result<Opened, StoreError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let sessions: Vec<SessionSnapshot> = read_file(&dir.join("sessions.bin"))?.unwrap_or_default();
        let retained: Vec<Message> = read_file(&dir.join("retained.bin"))?.unwrap_or_default();
        let store = LocalStore {
            dir: dir.to_path_buf(),
            sessions: Mutex::new(sessions.iter().map(|s| (s.client_id.clone(), s.clone())).collect()),
            sessions_dirty: AtomicBool::new(false),
            retained_version: AtomicU64::new(0),
        };
        Ok((Arc::new(store), sessions, retained))
    }

    /// The latest snapshot of every persistent session.
    pub fn sessions(&self) -> Vec<SessionSnapshot> {
        self.sessions.lock().map(|m| m.values().cloned().collect()).unwrap_or_default()
    }

    pub fn put_session(&self, snap: SessionSnapshot) {
        if let Ok(mut m) = self.sessions.lock() {
            m.insert(snap.client_id.clone(), snap);
            self.sessions_dirty.store(true, Ordering::Release);
        }
    }

    pub fn remove_session(&self, client_id: &str) {
        if let Ok(mut m) = self.sessions.lock() {
            if m.remove(client_id).is_some() {
                self.sessions_dirty.store(true, Ordering::Release);
            }
        }
    }

    /// Write whatever changed since the last flush; `retained` is only called when the retained
    /// set moved past the version on disk.
    pub fn flush(&self, retained: impl FnOnce() -> Vec<Arc<Message>>, retained_version: u64) -> Result<(), StoreError> {
        if self.sessions_dirty.swap(false, Ordering::AcqRel) {
            let all: Vec<SessionSnapshot> = match self.sessions.lock() {
                Ok(m) => m.values().cloned().collect(),
                Err(_) => Vec::new(),
            };
            if let Err(e) = write_file(&self.dir.join("sessions.bin"), &all) {
                self.sessions_dirty.store(true, Ordering::Release);
                return Err(e);
            }
        }
        if self.retained_version.load(Ordering::Acquire) != retained_version {
            let msgs = retained();
            let all: Vec<&Message> = msgs.iter().map(|m| &**m).collect();
            write_file(&self.dir.join("retained.bin"), &all)?;
            self.retained_version.store(retained_version, Ordering::Release);
        }
        Ok(())
    }

    /// Mark the retained set as already on disk at `version` (after loading it).
    pub fn set_retained_version(&self, version: u64) {
        self.retained_version.store(version, Ordering::Release);
    }
}
