//! Frames from other nodes, as the cluster actor handles them.
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

impl ClusterState {
    pub(super) async fn on_frame(&mut self, bytes: Vec<u8>) {
        let (from, body) = match wire::decode(&bytes, self.newest()) {
            Ok(x) => x,
            Err(e @ wire::WireError::Version { .. }) => return self.refuse(e.to_string()),
            Err(e) => {
                tracing::warn!(error = %e, "dropping undecodable cluster frame");
                return;
            }
        };
        if let Some(m) = self.members.get_mut(from.as_str()) {
            m.last_seen = self.heard;
        }
        match body {
            b @ (Body::Publish { .. }
            | Body::ForwardAck(..)
            | Body::Hello { .. }
            | Body::Heartbeat { .. }
            | Body::Routes { .. }
            | Body::RouteAck(..)
            | Body::Retained(..)
            | Body::RetainedDigest(..)
            | Body::Leave { .. }
            | Body::Departed
            | Body::LeaveAck(..)
            | Body::Versions { .. }
            | Body::Draining { .. }) => self.on_links(from, b).await,
            b @ (Body::NotYours { .. }
            | Body::Claim { .. }
            | Body::Claimed { .. }
            | Body::ClaimDone { .. }
            | Body::HandOver { .. }
            | Body::HandedOver { .. }
            | Body::HandOverFailed { .. }
            | Body::ClaimRefused { .. }
            | Body::Release { .. }
            | Body::Flush { .. }
            | Body::Owned(..)
            | Body::Disowned { .. }) => self.on_sessions(from, b).await,
            b @ (Body::BackupState { .. } | Body::BackupAppend { .. } | Body::BackupAck(..) | Body::BackupDrop { .. }) => {
                self.on_replicas(from, b).await
            }
            Body::AdminReply { id, ok, body } => {
                if let Some((reply, _)) = self.admin.remove(&id) {
                    let _ = reply.send(if ok { Ok(body) } else { Err(body) });
                }
            }
            Body::Trace { id, events } => self.a.broker.tracer.deliver(id, events),
            feature @ (Body::Admin { .. } | Body::LiveWant | Body::Live { .. } | Body::AlertEvent { .. } | Body::AlertEvents { .. }) => {
                if let Some(f) = self.a.handle.features.get() {
                    f.frame(Arc::from(from.as_str()), feature);
                }
            }
            Body::Device(n) => {
                let _ = self.a.handle.notices.send(n);
            }
        }
    }

    /// Links and membership: forwarded publishes and their acknowledgements, hello, heartbeats, routes, retained messages, leaving.
    async fn on_links(&mut self, from: String, body: Body) {
        match body {
            Body::Publish { batch, ack } => {
                let c = &self.a.handle;
                c.received.fetch_add(batch.len() as u64, Ordering::Relaxed);
                // Acknowledge once subscribers kept up (bounded) and persistent copies are on
                // their backups; the sender keeps only a few frames unacknowledged.
                let durable = Arc::new(Durable::default());
                let broker = self.a.broker.clone();
                let high = broker.high_water();
                let mut worst: Option<Arc<crate::actors::load::Load>> = None;
                for f in batch {
                    let scope = crate::actors::router::Scope::Remote { shared: &f.shared, adopted_from: f.adopted_from.as_deref() };
                    let (_, w) = broker.router.publish(f.msg, high, scope, Some(&durable));
                    if let Some(w) = w.filter(|w| worst.as_ref().is_none_or(|x| x.depth() < w.depth())) {
                        worst = Some(w);
                    }
                }
                let handle = self.a.handle.clone();
                if worst.is_none() && durable.is_done() {
                    self.to(&from, &Body::ForwardAck(ack));
                } else {
                    tokio::spawn(async move {
                        broker.wait_for(worst).await;
                        durable.wait(Duration::from_secs(5)).await;
                        handle.cast(Local::Send { to: from, body: Box::new(Body::ForwardAck(ack)) });
                    });
                }
            }
            Body::ForwardAck(seq) => {
                let idx = self.members.get(from.as_str()).map(|m| m.idx);
                if let Some(l) = idx.and_then(|i| self.a.handle.link(i)) {
                    l.acked(seq);
                }
            }
            Body::Hello { incarnation, addr, members, reply } => {
                tracing::debug!(peer = %from, incarnation, reply, cell = ?self.members.get(from.as_str()).and_then(|m| m.cell.as_ref()).map(|c| c.get_id()), "hello");
                if self.members.get(from.as_str()).and_then(|m| m.cell.as_ref()).is_none() {
                    self.resolve_cells().await;
                }
                let restarted = {
                    let m = self.member_mut(&from);
                    let restarted = m.incarnation != 0 && m.incarnation != incarnation;
                    m.incarnation = incarnation;
                    m.addr = addr;
                    restarted
                };
                if restarted {
                    self.forget_versions(&from);
                    self.down(&from, "restarted");
                }
                for (name, addr) in members {
                    if name != *self.me() && addr != self.a.advertise {
                        self.dials.entry(addr).or_insert(Dial { next_at: Instant::now(), backoff: Duration::ZERO, inflight: false });
                    }
                }
                if reply {
                    self.introduce(&from, false);
                }
                self.up(&from);
            }
            Body::Heartbeat { incarnation } => {
                let known = self.members.get(from.as_str()).map(|m| (m.up, m.incarnation));
                match known {
                    Some((true, inc)) if inc == incarnation => {}
                    known => {
                        if known.is_some_and(|(_, inc)| inc != 0 && inc != incarnation) {
                            self.forget_versions(&from);
                        }
                        // A peer we consider down (or do not know yet) is alive: (re)introduce us.
                        if self.members.get(from.as_str()).and_then(|m| m.cell.as_ref()).is_none() {
                            self.resolve_cells().await;
                        }
                        self.introduce(&from, true);
                    }
                }
            }
            Body::Routes { reset, add, del, ack } => {
                self.peer_routes(&from, reset, add, del);
                if let Some(seq) = ack {
                    self.send(&from, &Body::RouteAck(seq));
                }
            }
            Body::RouteAck(seq) => self.peer_acked(seq, &from),
            Body::Retained(entries) => self.apply_retained(entries),
            Body::RetainedDigest(theirs) => {
                let theirs: HashMap<Arc<str>, Hlc> = theirs.into_iter().collect();
                let mine = self.digest();
                let newer: Vec<RetainedEntry> =
                    mine.into_iter().filter(|(t, h)| theirs.get(t).is_none_or(|th| th < h)).filter_map(|(t, _)| self.entry(&t)).collect();
                for chunk in newer.chunks(256) {
                    self.send(&from, &Body::Retained(chunk.to_vec()));
                }
            }
            Body::Leave { ack } => {
                self.send(&from, &Body::LeaveAck(ack));
                self.down(&from, "left the cluster");
            }
            Body::Departed => {
                if let Some(m) = self.members.get(from.as_str()) {
                    tracing::info!(node = %from, "node departs from the cluster (operator); no longer dialled");
                    let addr = m.addr.clone();
                    self.dials.remove(&addr);
                }
            }
            Body::LeaveAck(seq) => self.peer_acked(seq, &from),
            Body::Versions { oldest, newest } => self.versions(&from, oldest, newest),
            Body::Draining { ack } => {
                self.send(&from, &Body::LeaveAck(ack));
                self.draining(&from);
            }
            other => tracing::debug!(frame = ?std::mem::discriminant(&other), "not a frame of this family"),
        }
    }

    /// Session directory and hand-over: claims at the registrar, hand-overs, releases, flushes, ownership.
    async fn on_sessions(&mut self, from: String, body: Body) {
        match body {
            Body::NotYours { client } => {
                if let Some(r) = self.a.broker.registry() {
                    let _ = r.tell(RegistryMessage::Discard(client));
                }
            }
            Body::Claim { client, req, clean } => self.on_claim(Arc::from(from.as_str()), client, req, clean),
            Body::Claimed { client: _, req, gen, from: prev, state } => {
                if let Some(c) = self.claims.remove(&req) {
                    let _ = c.reply.send(Claimed { gen, from: prev, state, refused: false });
                }
            }
            Body::ClaimRefused { client, req } => {
                if let Some(c) = self.claims.remove(&req) {
                    tracing::info!(%client, "claim refused: the previous owner kept the session");
                    let _ = c.reply.send(Claimed { refused: true, ..Claimed::default() });
                }
            }
            Body::HandOverFailed { client, gen } => {
                let waiting = self.registrar.get_mut(&client).filter(|r| r.gen == gen).and_then(|r| r.waiting.take());
                if let Some((claimant, req, _)) = waiting {
                    self.refuse_claim(&claimant, client.clone(), req);
                    self.next_claim(&client);
                }
            }
            Body::ClaimDone { client, gen } => {
                if self.registrar.get(&client).is_some_and(|r| r.gen == gen) {
                    self.next_claim(&client);
                }
            }
            Body::HandOver { client, gen, to, clean } => {
                let registrar = from.clone();
                let (broker, handle) = (self.a.broker.clone(), self.a.handle.clone());
                // Not answered in time: the session keeps its state here (it sees the closed
                // reply port) and the claim is refused.
                tokio::spawn(async move {
                    let state = match broker.registry() {
                        Some(r) => match r
                            .ask(
                                |reply| RegistryMessage::HandOver { client: client.clone(), gen, to, clean, reply },
                                Some(Duration::from_secs(5)),
                            )
                            .await
                        {
                            Ok(ractor::rpc::CallResult::Success(s)) => Ok(s),
                            _ => Err(()),
                        },
                        None => Err(()),
                    };
                    handle.handed_over(HandOverAnswer { client, gen, registrar, clean, state });
                });
            }
            Body::HandedOver { client, gen, state, moving } => {
                tracing::debug!(%client, gen, current = ?self.registrar.get(&client).map(|r| (r.gen, r.waiting.is_some())), "handed over");
                let waiting = self.registrar.get_mut(&client).filter(|r| r.gen == gen).and_then(|r| r.waiting.take());
                if let Some((claimant, req, _)) = waiting {
                    let prev = moving.then(|| from.clone());
                    self.to(&claimant, &Body::Claimed { client, req, gen, from: prev, state });
                }
            }
            Body::Release { client, gen } => {
                if let Some(r) = self.a.broker.registry() {
                    let _ = r.tell(RegistryMessage::Release { client, gen });
                }
            }
            Body::Flush { client, gen, deliveries } => {
                if let Some(r) = self.a.broker.registry() {
                    let _ = r.tell(RegistryMessage::Flush { client, gen, deliveries });
                }
            }
            Body::Owned(entries) => {
                let owner: Arc<str> = Arc::from(from.as_str());
                let settled = self.settling.remove(from.as_str()) && self.settling.is_empty();
                for (client, gen) in entries {
                    let live = |n: &Arc<str>| &**n == self.me() || self.members.get(n).is_some_and(|m| m.up);
                    let current = self.registrar.get(&client).and_then(|r| r.owner.clone());
                    let current_live = current.as_ref().is_some_and(live);
                    let reg = self.registrar.entry(client.clone()).or_default();
                    // A claim is being handed over from this very node (e.g. the session it just
                    // adopted): the hand-over supersedes its announcement.
                    if reg.waiting.as_ref().is_some_and(|(_, _, prev)| **prev == *owner) {
                        continue;
                    }
                    if reg.owner.is_none() || reg.gen < gen || !current_live {
                        reg.owner = Some(owner.clone());
                        reg.gen = reg.gen.max(gen);
                        // A live copy elsewhere lost to a newer generation: it goes.
                        if let Some(old) = current.filter(|o| current_live && **o != *owner) {
                            self.to(&old, &Body::NotYours { client });
                        }
                    } else if current.as_deref() != Some(&*owner) && reg.busy_until.is_none() {
                        // A stale copy (e.g. restored from disk by a node that came back after its
                        // sessions were adopted elsewhere): one owner at a time.
                        self.to(&from, &Body::NotYours { client });
                    }
                }
                if settled {
                    self.settled();
                }
            }
            Body::Disowned { client, gen } => {
                let gone = self
                    .registrar
                    .get(&client)
                    .is_some_and(|r| r.gen == gen && r.busy_until.is_none() && r.owner.as_deref() == Some(from.as_str()));
                if gone {
                    self.registrar.remove(&client);
                }
            }
            other => tracing::debug!(frame = ?std::mem::discriminant(&other), "not a frame of this family"),
        }
    }

    /// Replicas of persistent sessions owned by other nodes.
    async fn on_replicas(&mut self, from: String, body: Body) {
        match body {
            Body::BackupState { client, state } => {
                let owner: Arc<str> = Arc::from(from.as_str());
                self.replicas.insert(client, Replica { owner, state, log: Vec::new() });
            }
            Body::BackupAppend { client, deliveries, ack } => {
                // Bounded like the session's own queue (a refresh of the full state resets it).
                let cap = self.a.broker.config.mqtt.queue_max_messages.max(1024);
                if let Some(r) = self.replicas.get_mut(&client).filter(|r| *r.owner == *from) {
                    let room = cap.saturating_sub(r.log.len());
                    r.log.extend(deliveries.into_iter().take(room));
                }
                self.to(&from, &Body::BackupAck(ack));
            }
            Body::BackupAck(seq) => {
                self.backup_waits.remove(&seq);
            }
            Body::BackupDrop { client } => {
                if self.replicas.get(&client).is_some_and(|r| *r.owner == *from) {
                    self.replicas.remove(&client);
                }
            }
            other => tracing::debug!(frame = ?std::mem::discriminant(&other), "not a frame of this family"),
        }
    }
}

impl ClusterState {
    /// A live peer's route changes (`reset`: its whole table, on link-up).
    fn peer_routes(&mut self, from: &str, reset: bool, add: Vec<(Arc<str>, bool)>, del: Vec<Arc<str>>) {
        let Some(m) = self.members.get_mut(from).filter(|m| m.up) else { return };
        if reset {
            m.routes.clear();
            for k in del {
                m.routes.remove(&k);
            }
            m.routes.extend(add);
            self.set_routes();
            return;
        }
        // A few changes go into the published trie as they are: rebuilding it from every
        // member's routes made each of a fleet's SUBSCRIBEs cost O(all routes) here, so route
        // acknowledgements and claims timed out.
        let idx = m.idx;
        let mut root = super::routes::RouteNode::clone(&self.a.handle.routes.load());
        for k in del {
            if m.routes.remove(&k).is_some() {
                root.remove(&k, idx);
            }
        }
        for (k, durable) in add {
            root.insert(&k, idx, durable);
            m.routes.insert(k, durable);
        }
        self.a.handle.routes.store(Arc::new(root));
    }
}
