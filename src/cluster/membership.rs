//! Membership: introductions (Hello), resolving peers' actors to names, members going up and
//! down (links, route tables, events, adoption of a lost node's sessions), heartbeats and
//! redialling with back-off.
use super::*;
use crate::actors::inspect::Tell;

impl ClusterState {
    /// The members as this node sees them, itself included, by name.
    pub(super) fn members_info(&self) -> Vec<MemberInfo> {
        let mut v: Vec<MemberInfo> = self
            .members
            .values()
            .map(|m| MemberInfo {
                name: m.name.to_string(),
                addr: m.addr.clone(),
                up: m.up,
                routes: m.routes.len(),
                replicas: self.replicas.values().filter(|r| r.owner == m.name).count(),
                wire: m.wire.load(Ordering::Relaxed),
                idx: m.idx,
            })
            .collect();
        v.push(MemberInfo {
            name: self.me().to_string(),
            addr: self.a.advertise.clone(),
            up: true,
            routes: self.local_routes.len(),
            replicas: self.replicas.len(),
            wire: self.newest(),
            idx: 0,
        });
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub(super) fn hello(&self, reply: bool) -> Body {
        let mut members: Vec<(String, String)> =
            self.members.values().filter(|m| m.up && !m.addr.is_empty()).map(|m| (m.name.to_string(), m.addr.clone())).collect();
        members.push((self.me().to_string(), self.a.advertise.clone()));
        Body::Hello { incarnation: self.incarnation, addr: self.a.advertise.clone(), members, reply }
    }

    /// Introduce this node to `peer`: `Hello`, then (from wire version 2 on) the versions it
    /// speaks, so the peer may write to it in the newest both speak.
    pub(super) fn introduce(&self, peer: &str, reply: bool) {
        self.send(peer, &self.hello(reply));
        if self.newest() >= 2 {
            self.send(peer, &Body::Versions { oldest: wire::OLDEST, newest: self.newest() });
        }
    }

    /// `peer` said which wire versions it speaks: write to it in the newest both speak.
    pub(super) fn versions(&mut self, peer: &str, oldest: u16, newest: u16) {
        let mine = self.newest();
        let Some(v) = wire::agree(mine, (oldest, newest)) else {
            let o = wire::OLDEST;
            return self.refuse(format!("node {peer:?} speaks cluster wire versions {oldest} to {newest}; this node speaks {o} to {mine}"));
        };
        let m = self.member_mut(peer);
        if m.wire.swap(v, Ordering::Relaxed) != v {
            tracing::info!(peer, version = v, "cluster wire version agreed");
        }
    }

    /// A peer speaks no wire version this node speaks: said once per reason.
    pub(super) fn refuse(&mut self, why: String) {
        if !self.refused.contains(&why) {
            tracing::error!("refusing cluster peer: {why}");
            self.refused.insert(why);
        }
    }

    /// `peer` is another process than the one versions were agreed with (it restarted):
    /// write to it in the oldest version until it says otherwise (as when it goes down).
    pub(super) fn forget_versions(&mut self, peer: &str) {
        if let Some(m) = self.members.get(peer) {
            m.wire.store(wire::OLDEST, Ordering::Relaxed);
        }
    }

    /// Map the remote actors of the cluster group to node names (via the NodeServer's sessions).
    pub(super) async fn resolve_cells(&mut self) {
        if self.departed {
            return;
        }
        let sessions = match self.a.node_server.ask(NodeServerMessage::GetSessions, Some(Duration::from_secs(2))).await {
            Ok(ractor::rpc::CallResult::Success(s)) => s,
            _ => return,
        };
        for cell in ractor::pg::get_members(&GROUP.to_string()) {
            let ractor::ActorId::Remote { node_id, .. } = cell.get_id() else { continue };
            let Some(name) = sessions.get(&node_id).and_then(|s| s.peer_name.as_ref()).map(|n| peer_name(&n.name)) else {
                tracing::debug!(node_id, "cluster actor of a session without a peer name");
                continue;
            };
            let fresh = {
                let m = self.member_mut(&name);
                let fresh = m.cell.as_ref().map(|c| c.get_id()) != Some(cell.get_id());
                m.cell = Some(cell.clone());
                fresh
            };
            tracing::debug!(peer = %name, node_id, fresh, "resolved a peer's cluster actor");
            if fresh {
                self.introduce(&name, true);
            }
        }
    }

    pub(super) fn set_routes(&self) {
        let mut root = RouteNode::default();
        for m in self.members.values().filter(|m| m.up || m.ghost) {
            for (k, durable) in &m.routes {
                root.insert(k, m.idx, *durable);
            }
        }
        self.a.handle.routes.store(Arc::new(root));
    }

    pub(super) fn up(&mut self, name: &str) {
        self.a.handle.joined.store(true, Ordering::Relaxed);
        let me = self.me().to_string();
        let (cell, idx, addr, version) = {
            let heard = self.heard;
            let m = self.member_mut(name);
            m.last_seen = heard;
            if m.up {
                return;
            }
            let Some(cell) = m.cell.clone() else {
                tracing::debug!(peer = name, "peer introduced itself but its cluster actor is not resolved");
                return;
            };
            m.up = true;
            m.ghost = false;
            m.draining = false;
            (cell, m.idx, m.addr.clone(), m.wire.clone())
        };
        let min = Duration::from_millis(self.cfg().redial_min_ms);
        if let Some(d) = self.dials.get_mut(&addr) {
            d.backoff = min;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let link = Arc::new(Link {
            name: Arc::from(name),
            tx,
            depth: Arc::new(AtomicUsize::new(0)),
            drained: Arc::new(Notify::new()),
            unacked: Default::default(),
            in_flight: AtomicUsize::new(0),
            credit: Notify::new(),
            closed: Default::default(),
            batch_max: self.a.broker.high_water(),
            cap: self.cfg().max_forward_queue.max(1),
            dropped: self.a.handle.forward_dropped.clone(),
            parked: self.a.handle.parked.clone(),
            wire: version,
        });
        tokio::spawn(forward_loop(Arc::from(me.as_str()), cell.clone(), rx, link.clone()));
        let mut links = HashMap::clone(&self.a.handle.links.load());
        links.insert(idx, link);
        self.a.handle.links.store(Arc::new(links));
        self.publish_peers(None);
        tracing::info!(peer = name, %addr, "cluster member up");
        let _ = self.a.handle.events.send(ClusterEvent::MemberUp { name: Arc::from(name), addr });
        // Full state for the newcomer: our routes (replacing whatever it had) and retained digest.
        let add: Vec<(Arc<str>, bool)> = self.local_routes.iter().map(|(k, d)| (k.clone(), *d)).collect();
        self.send(name, &Body::Routes { reset: true, add, del: vec![], ack: None });
        self.send(name, &Body::RetainedDigest(self.digest()));
        self.announce_owned();
    }

    /// `gone`: the member that just went down (its replicas are gone even if it is back before
    /// a session looks).
    pub(super) fn publish_peers(&self, gone: Option<&str>) {
        // Draining members are not chosen as backups or owners (`Cluster::backup_for`, `owner_of`).
        let peers: Vec<Arc<str>> = self.members.values().filter(|m| m.up && !m.draining).map(|m| m.name.clone()).collect();
        self.a.handle.peers.store(Arc::new(peers));
        // Replicas follow: a session whose backup left (or drains, or was outranked by a node
        // that came up, restarted and empty) sends its state to its new backup.
        if let Some(r) = self.a.broker.registry() {
            let _ = r.tell(RegistryMessage::PeersChanged(gone.map(Arc::from)));
        }
    }

    pub(super) fn down(&mut self, name: &str, reason: &str) {
        let Some(m) = self.members.get_mut(name) else { return };
        if !m.up {
            return;
        }
        m.up = false;
        m.lost_at = Some(Instant::now());
        m.wire.store(wire::OLDEST, Ordering::Relaxed);
        // Its routes stand (as a ghost) until the sessions it had are adopted elsewhere;
        // publishes for it meanwhile are parked and re-routed then.
        m.ghost = !m.routes.is_empty();
        let (idx, ghost) = (m.idx, m.ghost);
        if ghost {
            let mut g = HashMap::clone(&self.a.handle.ghosts.load());
            g.insert(idx, Arc::from(name));
            self.a.handle.ghosts.store(Arc::new(g));
        }
        let mut links = HashMap::clone(&self.a.handle.links.load());
        if let Some(l) = links.remove(&idx) {
            l.close();
        }
        self.a.handle.links.store(Arc::new(links));
        self.set_routes();
        let done: Vec<u64> = self
            .pending
            .iter_mut()
            .filter_map(|(seq, p)| {
                p.waiting.remove(name);
                p.waiting.is_empty().then_some(*seq)
            })
            .collect();
        for s in done {
            if let Some(p) = self.pending.remove(&s) {
                p.answer();
            }
        }
        // Claims waiting on the dead node's hand-over go to its backup (replica) instead.
        let mut stuck = Vec::new();
        for (c, r) in self.registrar.iter_mut() {
            if r.waiting.as_ref().is_some_and(|(_, _, prev)| &**prev == name) {
                if let Some((claimant, req, _)) = r.waiting.take() {
                    stuck.push((c.clone(), claimant, req, r.gen));
                }
            }
        }
        for (client, claimant, req, gen) in stuck {
            match self.backup_candidate(&client, name) {
                Some(b) => {
                    if let Some(r) = self.registrar.get_mut(&client) {
                        r.waiting = Some((claimant.clone(), req, b.clone()));
                    }
                    self.to(&b, &Body::HandOver { client, gen, to: claimant.to_string(), clean: false });
                }
                None => self.to(&claimant, &Body::Claimed { client, req, gen, from: None, state: None }),
            }
        }
        self.publish_peers(Some(name));
        self.backup_waits.retain(|_, (n, _, _)| &**n != name);
        // Our claims that the dead node was to answer: ask the new registrar.
        let reissue: Vec<u64> = self.claims.iter().filter(|(_, c)| &*c.registrar == name).map(|(r, _)| *r).collect();
        for req in reissue {
            let (client, clean) = match self.claims.get(&req) {
                Some(c) => (c.client.clone(), c.clean),
                None => continue,
            };
            let registrar = self.registrar_of(&client);
            if let Some(c) = self.claims.get_mut(&req) {
                c.registrar = registrar.clone();
            }
            self.to(&registrar, &Body::Claim { client, req, clean });
        }
        // Sessions of the lost node we hold replicas of come alive here (subscribed, queueing),
        // before our re-announcement tells their registrars.
        let orphans: Vec<Arc<str>> = self.replicas.iter().filter(|(_, r)| &*r.owner == name).map(|(c, _)| c.clone()).collect();
        if !orphans.is_empty() {
            tracing::info!(peer = name, sessions = orphans.len(), "adopting the lost node's sessions from their replicas");
            if let Some(reg) = self.a.broker.registry() {
                for c in orphans {
                    if let Some(r) = self.replicas.remove(&c) {
                        let _ = reg.tell(RegistryMessage::Adopt(r.into_snapshot(), Arc::from(name)));
                    }
                }
            }
        }
        self.announce_owned();
        tracing::warn!(peer = name, reason, "cluster member down");
        let _ = self.a.handle.events.send(ClusterEvent::MemberDown { name: Arc::from(name), reason: reason.to_string() });
    }

    pub(super) fn on_tick(&mut self, queued: Instant) {
        let now = Instant::now();
        let interval = Duration::from_millis(self.cfg().heartbeat_ms.max(10));
        let stalled = mailbox_tick(&mut self.heard, queued, interval);
        if !stalled.is_zero() {
            // This process did not run its timers (stopped, or starved of CPU): nothing could
            // be heard meanwhile, so the silence does not count against the peers.
            for m in self.members.values_mut() {
                m.last_seen += stalled;
            }
        }
        let late: Vec<u64> = self.admin.iter().filter(|(_, (_, t))| *t <= now).map(|(id, _)| *id).collect();
        for id in late {
            if let Some((reply, _)) = self.admin.remove(&id) {
                let _ = reply.send(Err("the node did not answer in time".into()));
            }
        }
        let timeout = Duration::from_millis(self.cfg().heartbeat_timeout_ms);
        self.send_each(&Body::Heartbeat { incarnation: self.incarnation }, |_| true);
        let silent: Vec<Arc<str>> =
            self.members.values().filter(|m| m.up && silent(self.heard, m.last_seen, timeout)).map(|m| m.name.clone()).collect();
        for name in silent {
            self.down(&name, "heartbeat timeout");
            // Reset the link: a half-open connection would otherwise never be redialled.
            if let Some(m) = self.members.get_mut(&name) {
                m.cell = None;
            }
            let ns = self.a.node_server.clone();
            tokio::spawn(async move {
                if let Ok(ractor::rpc::CallResult::Success(s)) = ns.ask(NodeServerMessage::GetSessions, Some(Duration::from_secs(2))).await
                {
                    for info in s.values() {
                        if info.peer_name.as_ref().is_some_and(|n| peer_name(&n.name) == *name) {
                            info.actor.stop(Some("heartbeat timeout".into()));
                        }
                    }
                }
            });
        }
        // Route acknowledgements that did not come in time: answer anyway (the peer is slow or
        // about to be marked down), so a SUBSCRIBE is never stuck.
        let late: Vec<u64> = self.pending.iter().filter(|(_, p)| p.deadline <= now).map(|(s, _)| *s).collect();
        for s in late {
            if let Some(p) = self.pending.remove(&s) {
                tracing::warn!(peers = ?p.waiting, changes = p.replies.len(), "route acknowledgement timed out");
                p.answer();
            }
        }
        // Claims whose registrar never answered: serve the client here without remote state.
        let late: Vec<u64> = self.claims.iter().filter(|(_, c)| c.deadline <= now).map(|(r, _)| *r).collect();
        for r in late {
            if let Some(c) = self.claims.remove(&r) {
                tracing::warn!(client_id = %c.client, "session registrar did not answer; serving the client without cluster state");
                let _ = c.reply.send(Claimed::default());
            }
        }
        // Registrar: claims held past their time (a claimant died mid-way, or the previous
        // owner never answered: refused, it may still hold the state) let the next one go.
        let expired: Vec<Arc<str>> =
            self.registrar.iter().filter(|(_, r)| r.busy_until.is_some_and(|t| t <= now)).map(|(c, _)| c.clone()).collect();
        for c in expired {
            if let Some((claimant, req, prev)) = self.registrar.get_mut(&c).and_then(|r| r.waiting.take()) {
                tracing::warn!(client = %c, previous = %prev, "hand-over not answered in time; claim refused");
                self.refuse_claim(&claimant, c.clone(), req);
            }
            self.next_claim(&c);
        }
        self.tombstones.retain(|_, (_, at)| now.duration_since(*at) < TOMBSTONE_TTL);
        let parked_any = self.a.handle.parked.lock().map(|p| !p.is_empty()).unwrap_or(false);
        if now >= self.settle_until
            && (!self.deferred.is_empty() || !self.settling.is_empty() || !self.a.handle.ghosts.load().is_empty() || parked_any)
        {
            self.settled();
        }
        let before = self.backup_waits.len();
        self.backup_waits.retain(|_, (_, _, t)| *t > now);
        if self.backup_waits.len() < before {
            tracing::warn!(appends = before - self.backup_waits.len(), "backup node did not acknowledge in time");
        }
        self.redial(now);
    }

    /// Leave the cluster for good: peers adopt this node's sessions (`Leave`) and forget its
    /// address (`Departed`); this node drops the replicas it held for them and the routes it
    /// knew, stops dialling and closes its links once they acknowledged (bounded).
    pub(super) async fn depart(&mut self, reply: RpcReplyPort<usize>) {
        self.broadcast(&Body::Departed);
        let (tx, rx) = ractor::concurrency::oneshot();
        let peers = self.broadcast_acked(|ack| Body::Leave { ack }, vec![tx.into()]);
        tracing::info!(peers, "departing from the cluster (operator)");
        self.departed = true;
        self.dials.clear();
        self.replicas.clear();
        for m in self.members.values_mut() {
            m.routes.clear();
        }
        let ns = self.a.node_server.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), rx).await;
            let _ = reply.send(peers);
            // The operator's answer may still have to travel over a link (asked through
            // another node): close them a moment later.
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Ok(ractor::rpc::CallResult::Success(sessions)) =
                ns.ask(NodeServerMessage::GetSessions, Some(Duration::from_secs(2))).await
            {
                for s in sessions.values() {
                    s.actor.stop(Some("departed".into()));
                }
            }
        });
    }

    pub(super) fn redial(&mut self, now: Instant) {
        let connected: HashSet<&str> = self.members.values().filter(|m| m.cell.is_some()).map(|m| m.addr.as_str()).collect();
        let (min, max) = (self.cfg().redial_min_ms.max(1), self.cfg().redial_max_ms.max(1));
        let mut to_dial = Vec::new();
        for (addr, d) in self.dials.iter_mut() {
            if connected.contains(addr.as_str()) || d.inflight || d.next_at > now {
                continue;
            }
            d.inflight = true;
            let base = d.backoff.as_millis().clamp(min as u128, max as u128) as u64;
            d.backoff = Duration::from_millis((base * 2).min(max));
            let jitter = rand::thread_rng().gen_range(0..=base / 2);
            d.next_at = now + Duration::from_millis(base + jitter);
            to_dial.push(addr.clone());
        }
        for addr in to_dial {
            let ns = self.a.node_server.clone();
            let tls = self.a.tls.clone();
            let me = self.a.handle.actor();
            tokio::spawn(async move {
                let r = net::dial(&ns, &addr, tls.as_ref()).await;
                if let Err(e) = &r {
                    tracing::debug!(%addr, error = %e, "cluster dial failed");
                }
                if let Some(me) = me {
                    let _ = me.tell(ClusterMessage::Local(Local::Dialed { addr, ok: r.is_ok() }));
                }
            });
        }
    }
}

/// Liveness in mailbox time. `heard` is when the last tick handled was queued: the mailbox is
/// first in, first out, so every frame handled after that tick arrived after it, and a peer's
/// silence is measured from there to the next tick's queueing — this node's own backlog (a
/// burst of route or session frames on a busy machine) never makes a peer whose heartbeats
/// wait in the queue look silent. Returns how long this process did not queue ticks at all
/// (beyond two intervals): a stall during which no peer could be heard either.
fn mailbox_tick(heard: &mut Instant, queued: Instant, interval: Duration) -> Duration {
    let gap = queued.saturating_duration_since(*heard);
    *heard = (*heard).max(queued);
    gap.saturating_sub(interval * 2)
}

/// A peer last heard at `last_seen` (mailbox time) is silent at the tick `heard`.
fn silent(heard: Instant, last_seen: Instant, timeout: Duration) -> bool {
    heard.saturating_duration_since(last_seen) > timeout
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(500);
    const TIMEOUT: Duration = Duration::from_secs(5);

    #[test]
    fn a_backlogged_mailbox_does_not_make_a_live_peer_silent() {
        let t0 = Instant::now();
        let mut heard = t0;
        // The peer's frame handled right after the tick queued at t0. Then ticks queued every
        // 500 ms for 4 s while this node is busy with one long frame, the peer's heartbeats
        // queued between them, all handled 8 s later, in order: each heartbeat is heard at the
        // tick before it, never 5 s after it.
        let mut last_seen = t0;
        for i in 1..=8 {
            let queued = t0 + TICK * i;
            assert!(mailbox_tick(&mut heard, queued, TICK).is_zero());
            assert!(!silent(heard, last_seen, TIMEOUT), "tick {i}");
            last_seen = heard; // the heartbeat queued after this tick
        }
    }

    #[test]
    fn a_silent_peer_is_still_found() {
        let t0 = Instant::now();
        let mut heard = t0;
        let last_seen = t0;
        let mut found = None;
        for i in 1..=12 {
            mailbox_tick(&mut heard, t0 + TICK * i, TICK);
            if found.is_none() && silent(heard, last_seen, TIMEOUT) {
                found = Some(i);
            }
        }
        assert_eq!(found, Some(11), "first tick more than 5 s after the last frame");
    }

    #[test]
    fn a_stopped_process_credits_its_peers_with_the_stall() {
        let t0 = Instant::now();
        let mut heard = t0;
        // No tick queued for 7 s (SIGSTOP, or no CPU): the next one reports the stall beyond
        // two intervals, which the caller adds to every peer's last-heard time.
        let stalled = mailbox_tick(&mut heard, t0 + Duration::from_secs(7), TICK);
        assert_eq!(stalled, Duration::from_secs(6));
        assert!(!silent(heard, t0 + stalled, TIMEOUT));
        // A regular tick right after reports none.
        assert!(mailbox_tick(&mut heard, t0 + Duration::from_millis(7500), TICK).is_zero());
    }
}
