//! The session registrar: each client id's registrar node (rendezvous hash over live members)
//! serialises claims, hands out growing generations, and directs hand-overs; after membership
//! changes, owners re-announce their sessions and unknown client ids wait for that.
use super::*;
use crate::actors::inspect::Tell;

impl ClusterState {
    /// The registrar of `client`: rendezvous hash over this node and its live peers.
    pub(super) fn registrar_of(&self, client: &str) -> Arc<str> {
        let score = |n: &str| rendezvous(n, client);
        let mut best = (score(self.me()), self.a.handle.name.clone());
        for m in self.members.values().filter(|m| m.up) {
            let sc = score(&m.name);
            if sc > best.0 || (sc == best.0 && m.name > best.1) {
                best = (sc, m.name.clone());
            }
        }
        best.1
    }

    /// The node the (dead) `owner` chose as backup for `client`: the best of the others alive.
    pub(super) fn backup_candidate(&self, client: &str, owner: &str) -> Option<Arc<str>> {
        let mut live: Vec<Arc<str>> = self.members.values().filter(|m| m.up).map(|m| m.name.clone()).collect();
        live.push(self.a.handle.name.clone());
        live.into_iter().filter(|n| &**n != owner).max_by_key(|n| rendezvous(n, client))
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
            reg.owner.replace(claimant.clone())
        };
        let gen = self.registrar[&client].gen;
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
        self.settling = self.members.values().filter(|m| m.up).map(|m| m.name.clone()).collect();
        self.settling.insert(self.a.handle.name.clone());
        self.settle_until = Instant::now() + Duration::from_secs(1);
        let (broker, handle) = (self.a.broker.clone(), self.a.handle.clone());
        tokio::spawn(async move {
            let Some(r) = broker.registry() else { return };
            if let Ok(ractor::rpc::CallResult::Success(list)) = r.ask(RegistryMessage::Owned, Some(Duration::from_secs(10))).await {
                handle.cast(Local::Owned(list));
            }
        });
    }
}
