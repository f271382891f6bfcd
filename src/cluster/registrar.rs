//! The session registrar: each client id's registrar node (rendezvous hash over live members)
//! serialises claims, hands out growing generations, and directs hand-overs; after membership
//! changes, owners re-announce their sessions and unknown client ids wait for that.
use super::*;
use crate::actors::inspect::Tell;

/// How long claims of unknown client ids wait for the live nodes' announcements at most (and
/// messages parked for a lost node wait to be re-routed: longer holds them behind newer ones).
const SETTLE: Duration = Duration::from_secs(1);
/// How long after a node is lost a client id nobody announced may have been one of its
/// sessions (its backup is asked before the client is served without state).
const LOST_WINDOW: Duration = Duration::from_secs(30);

impl ClusterState {
    /// The registrar of `client`: rendezvous hash over this node and its live peers.
    /// Draining members (and this node, when it drains) are not candidates; with no other
    /// candidate this node answers for itself.
    pub(super) fn registrar_of(&self, client: &str) -> Arc<str> {
        let score = |n: &str| rendezvous(n, client);
        let mut best: Option<(u64, Arc<str>)> = (!self.draining).then(|| (score(self.me()), self.a.handle.name.clone()));
        for m in self.members.values().filter(|m| m.up && !m.draining) {
            let sc = score(&m.name);
            if best.as_ref().is_none_or(|(b, n)| sc > *b || (sc == *b && m.name > *n)) {
                best = Some((sc, m.name.clone()));
            }
        }
        best.map_or_else(|| self.a.handle.name.clone(), |b| b.1)
    }

    /// The node the (dead) `owner` chose as backup for `client`: the best of the others alive
    /// (draining nodes keep no replicas).
    pub(super) fn backup_candidate(&self, client: &str, owner: &str) -> Option<Arc<str>> {
        let mut live: Vec<Arc<str>> = self.members.values().filter(|m| m.up && !m.draining).map(|m| m.name.clone()).collect();
        if !self.draining {
            live.push(self.a.handle.name.clone());
        }
        live.into_iter().filter(|n| &**n != owner).max_by_key(|n| rendezvous(n, client))
    }

    /// This node stops soon: tell the peers that speak version 3 (`Draining`, acknowledged),
    /// then announce its sessions to their registrars among the others — in that order, so
    /// each peer settles on the new registrars before the announcement arrives. The caller
    /// closes the connections after the acknowledgements: reconnecting clients find their
    /// registrars elsewhere, which hand their sessions over from here.
    pub(super) fn drain(&mut self, reply: RpcReplyPort<()>) {
        self.draining = true;
        self.a.handle.draining.store(true, Ordering::Relaxed);
        let (acked, acks) = ractor::concurrency::oneshot();
        let (sent, announced) = ractor::concurrency::oneshot();
        let peers = self.send_acked(|ack| Body::Draining { ack }, vec![acked.into()], |m| m.up && m.wire.load(Ordering::Relaxed) >= 3);
        self.announce_owned_then(Some(sent.into()));
        tracing::info!(peers, "draining: this node's sessions move to the others as their clients reconnect");
        // Answered once the peers know and the sessions' new registrars were told.
        tokio::spawn(async move {
            let _ = acks.await;
            let _ = announced.await;
            let _ = reply.send(());
        });
    }

    /// `peer` drains (`Body::Draining`): it keeps its sessions and links until it leaves, but
    /// registrars, backups and other owners are chosen among the rest from now on.
    pub(super) fn draining(&mut self, peer: &str) {
        let Some(m) = self.members.get_mut(peer).filter(|m| m.up && !m.draining) else { return };
        m.draining = true;
        tracing::info!(peer, "cluster member draining (stopping)");
        self.publish_peers(None);
        self.announce_owned();
    }

    pub(super) fn is_live(&self, node: &str) -> bool {
        node == self.me() || self.members.get(node).is_some_and(|m| m.up)
    }

    /// Registrar: process (or queue) a claim of `client` by `claimant`.
    pub(super) fn on_claim(&mut self, claimant: Arc<str>, client: Arc<str>, req: u64, clean: bool) {
        self.claim_at(claimant, client, req, clean, true)
    }

    pub(super) fn claim_at(&mut self, claimant: Arc<str>, client: Arc<str>, req: u64, clean: bool, may_defer: bool) {
        let now = Instant::now();
        // A client id we have no entry for, while membership is settling or while we do not
        // even consider ourselves its registrar (our view lags the claimant's): wait (bounded).
        let unknown = !self.registrar.contains_key(&client);
        let lagging = *self.registrar_of(&client) != *self.me();
        if unknown && lagging && self.deferred.is_empty() {
            self.settle_until = self.settle_until.max(now + Duration::from_secs(1));
        }
        if may_defer && unknown && (!self.settling.is_empty() || lagging) && now < self.settle_until {
            tracing::debug!(%client, %claimant, waiting_for = ?self.settling, "claim deferred until peers re-announce");
            self.deferred.push((claimant, client, req, clean));
            return;
        }
        let live_prev = {
            let reg = self.registrar.entry(client.clone()).or_default();
            if reg.busy_until.is_some_and(|t| t > now) {
                reg.queue.push_back((claimant, req, clean));
                return;
            }
            reg.gen += 1;
            reg.busy_until = Some(now + CLAIM_HOLD);
            reg.waiting = None;
            reg.before = reg.owner.replace(claimant.clone());
            reg.before.clone()
        };
        let gen = self.registrar[&client].gen;
        // A client id nobody announced, shortly after a node was lost: it may have been one of
        // that node's sessions, whose backup (adopting it) has not announced it yet. Its backup
        // is asked; a new client id costs one round trip there.
        let live_prev = live_prev.or_else(|| self.recently_lost(now));
        // A dead owner's session lives on in its backup's replica: ask that node instead (it may
        // be the claimant itself).
        let (target, via_replica) = match live_prev {
            Some(p) if !self.is_live(&p) => (self.backup_candidate(&client, &p), true),
            other => (other, false),
        };
        tracing::debug!(%client, %claimant, ?target, via_replica, gen, "claim");
        match target.filter(|p| via_replica || *p != claimant) {
            Some(prev) => {
                if let Some(reg) = self.registrar.get_mut(&client) {
                    reg.waiting = Some((claimant.clone(), req, prev.clone()));
                }
                self.to(&prev, &Body::HandOver { client, gen, to: claimant.to_string(), clean });
            }
            None => self.to(&claimant, &Body::Claimed { client, req, gen, from: None, state: None }),
        }
    }

    /// The wire version `node` is written to (this node: its newest).
    pub(super) fn wire_of(&self, node: &str) -> u16 {
        if node == self.me() {
            return self.newest();
        }
        self.members.get(node).map_or(wire::OLDEST, |m| m.wire.load(Ordering::Relaxed))
    }

    /// Previous owner: this node's answer to a registrar's `HandOver`. No live session here: a
    /// replica of a lost owner's session serves instead. Not answered in time: the session
    /// stays here and the claim is refused (a version-3 registrar hears "no state", as it did
    /// from its own build).
    pub(super) fn handed_over(&mut self, answer: HandOverAnswer) {
        let HandOverAnswer { client, gen, registrar, clean, state } = answer;
        let Ok(state) = state else {
            tracing::warn!(%client, gen, "hand-over not answered in time; the session stays on this node");
            if self.wire_of(&registrar) >= 4 {
                self.to(&registrar, &Body::HandOverFailed { client, gen });
            } else {
                self.to(&registrar, &Body::HandedOver { client, gen, state: None, moving: false });
            }
            return;
        };
        let moving = state.is_some();
        // Only a lost owner's replica stands in for its session: a live owner has the real one
        // (the registrar did not know it yet), which keeps its replica here.
        let replica = match self.replicas.get(&client) {
            Some(r) if !self.is_live(&r.owner) => self.replicas.remove(&client),
            _ => None,
        };
        tracing::debug!(%client, has_state = state.is_some(), replica = ?replica.as_ref().map(|r| (r.log.len(), r.state.queue.len(), r.state.inflight.len(), r.state.subscriptions.len())), "hand-over answer");
        let state = match (state, replica) {
            (Some(s), _) => Some(s),
            (None, Some(r)) if !clean => Some(r.into_snapshot()),
            _ => None,
        };
        self.to(&registrar, &Body::HandedOver { client, gen, state, moving });
    }

    /// Registrar: the previous owner kept `client`'s session (or never answered): the owner
    /// stays what it was and the claimant is refused. A claimant of version 3 does not know
    /// refusals: it is told "no previous state", as its own build would have.
    pub(super) fn refuse_claim(&mut self, claimant: &Arc<str>, client: Arc<str>, req: u64) {
        let v4 = self.wire_of(claimant) >= 4;
        let Some(reg) = self.registrar.get_mut(&client) else { return };
        if v4 {
            reg.owner = reg.before.take();
            self.to(claimant, &Body::ClaimRefused { client, req });
        } else {
            let gen = reg.gen;
            self.to(claimant, &Body::Claimed { client, req, gen, from: None, state: None });
        }
    }

    /// The member lost most recently, within `LOST_WINDOW`, and not back.
    fn recently_lost(&self, now: Instant) -> Option<Arc<str>> {
        let lost = self.members.values().filter(|m| !m.up).filter_map(|m| Some((m.lost_at?, m)));
        let (_, m) = lost.filter(|(t, _)| now.duration_since(*t) < LOST_WINDOW).max_by_key(|(t, _)| *t)?;
        Some(m.name.clone())
    }

    /// Registrar: the claim of `client` finished (or timed out); start the next queued one.
    pub(super) fn next_claim(&mut self, client: &Arc<str>) {
        let next = self.registrar.get_mut(client).and_then(|reg| {
            reg.busy_until = None;
            reg.waiting = None;
            reg.queue.pop_front()
        });
        if let Some((claimant, req, clean)) = next {
            self.on_claim(claimant, client.clone(), req, clean);
        }
    }

    /// Run the claims that waited for re-announcements.
    pub(super) fn settled(&mut self) {
        self.unghost();
        self.settling.clear();
        for (claimant, client, req, clean) in std::mem::take(&mut self.deferred) {
            self.claim_at(claimant, client, req, clean, false);
        }
    }

    /// After a membership change registrars move: tell each one which sessions live here.
    pub(super) fn announce_owned(&mut self) {
        self.announce_owned_then(None);
    }

    /// `announce_owned`; `sent` is answered once the announcements left (or could not be made).
    /// Claims of client ids a registrar does not know wait (bounded by `SETTLE`) until every
    /// live node announced.
    pub(super) fn announce_owned_then(&mut self, sent: Option<RpcReplyPort<()>>) {
        self.settling = self.members.values().filter(|m| m.up).map(|m| m.name.clone()).collect();
        self.settling.insert(self.a.handle.name.clone());
        self.settle_until = Instant::now() + SETTLE;
        let (broker, handle) = (self.a.broker.clone(), self.a.handle.clone());
        tokio::spawn(async move {
            let Some(r) = broker.registry() else { return };
            if let Ok(ractor::rpc::CallResult::Success(list)) = r.ask(RegistryMessage::Owned, Some(Duration::from_secs(10))).await {
                handle.cast(Local::Owned(list, sent));
            }
        });
    }
}
