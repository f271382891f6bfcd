//! The whole-file snapshots (`sessions.bin`, `retained.bin`) that versions before the state
//! store wrote: imported once into the store, then renamed `*.imported`.
use std::path::Path;

use super::state::{SessionSnapshot, StateError, StateStore};
use crate::message::Message;

const MAGIC: &[u8; 8] = b"THNGSD03";

fn read_file<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, StateError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StateError::Io { path: path.display().to_string(), source }),
    };
    let fmt = || StateError::Corrupt {
        path: path.display().to_string(),
        key: "(whole file)".into(),
        why: "not a thingsd data file or from an incompatible version".into(),
    };
    let body = bytes.strip_prefix(MAGIC.as_slice()).ok_or_else(fmt)?;
    let (v, _) = bincode::serde::decode_from_slice(body, bincode::config::standard()).map_err(|_| fmt())?;
    Ok(Some(v))
}

fn done(path: &Path) -> Result<(), StateError> {
    std::fs::rename(path, path.with_extension("bin.imported")).map_err(|source| StateError::Io { path: path.display().to_string(), source })
}

/// Import what an older version left in `dir`, if anything.
pub(super) fn import(dir: &Path, store: &StateStore) -> Result<(), StateError> {
    let sessions_file = dir.join("sessions.bin");
    let retained_file = dir.join("retained.bin");
    let mut imported = false;
    if let Some(sessions) = read_file::<Vec<SessionSnapshot>>(&sessions_file)? {
        for s in &sessions {
            store.put_session(s);
            let mut seq = 0;
            for (pkid, released, d) in &s.inflight {
                seq += 1;
                let mut d = d.clone();
                d.seq = seq;
                // Only QoS 2 packet ids are kept (QoS 1 ones are sent again under a new id).
                let pkid = if d.qos == crate::protocols::mqtt::QoS::ExactlyOnce { *pkid } else { 0 };
                store.put_entry(&s.client_id, &d, pkid, *released);
            }
            for d in &s.queue {
                seq += 1;
                let mut d = d.clone();
                d.seq = seq;
                store.put_entry(&s.client_id, &d, 0, false);
            }
            for id in &s.incoming_qos2 {
                store.add_qos2(&s.client_id, *id);
            }
        }
        tracing::info!(sessions = sessions.len(), "imported persistent sessions from sessions.bin");
        imported = true;
    }
    if let Some(retained) = read_file::<Vec<Message>>(&retained_file)? {
        for m in &retained {
            store.put_retained(m);
        }
        tracing::info!(retained = retained.len(), "imported retained messages from retained.bin");
        imported = true;
    }
    if imported {
        store.sync_now()?;
        for f in [&sessions_file, &retained_file] {
            if f.exists() {
                done(f)?;
            }
        }
    }
    Ok(())
}
