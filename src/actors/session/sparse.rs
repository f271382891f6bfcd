//! Session fields most sessions never use, allocated on first use: a session's state lives in
//! its actor's task for the session's whole life, and its size sets the task's (tokio
//! allocates the task in 128-byte steps). Same methods as the collections they stand for.
use std::collections::HashSet;
use std::sync::Arc;

use crate::message::{Delivery, DurableToken};

/// Packet ids of QoS 2 publishes received and not yet released (QoS 2 publishers only).
#[derive(Default)]
#[allow(clippy::box_collection)] // the point: 8 bytes in the session's state, not a set's 48
pub(super) struct PacketIds(Option<Box<HashSet<u16>>>);

impl PacketIds {
    pub(super) fn contains(&self, id: &u16) -> bool {
        self.0.as_ref().is_some_and(|s| s.contains(id))
    }

    pub(super) fn insert(&mut self, id: u16) -> bool {
        self.0.get_or_insert_with(Box::default).insert(id)
    }

    /// Removes `id`; the set is freed once empty.
    pub(super) fn remove(&mut self, id: &u16) -> bool {
        let Some(s) = self.0.as_mut() else { return false };
        let had = s.remove(id);
        if s.is_empty() {
            self.0 = None;
        }
        had
    }

    pub(super) fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |s| s.len())
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &u16> {
        self.0.iter().flat_map(|s| s.iter())
    }
}

impl FromIterator<u16> for PacketIds {
    fn from_iter<I: IntoIterator<Item = u16>>(it: I) -> Self {
        let s: HashSet<u16> = it.into_iter().collect();
        PacketIds((!s.is_empty()).then(|| Box::new(s)))
    }
}

/// This turn's QoS>0 deliveries still to append to the backup node, with their publishers'
/// wait tokens (persistent sessions in a cluster only).
#[derive(Default)]
pub(super) struct ToBackup(Option<Box<Batch>>);

#[derive(Default)]
struct Batch {
    deliveries: Vec<Delivery>,
    tokens: Vec<Arc<DurableToken>>,
}

impl ToBackup {
    pub(super) fn push(&mut self, d: Delivery, token: Option<Arc<DurableToken>>) {
        let b = self.0.get_or_insert_with(Box::default);
        b.deliveries.push(d);
        b.tokens.extend(token);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|b| b.deliveries.is_empty() && b.tokens.is_empty())
    }

    /// The deliveries and tokens, leaving nothing allocated.
    pub(super) fn take(&mut self) -> (Vec<Delivery>, Vec<Arc<DurableToken>>) {
        self.0.take().map(|b| (b.deliveries, b.tokens)).unwrap_or_default()
    }

    pub(super) fn clear(&mut self) {
        self.0 = None;
    }
}
