//! A lost node's ghost routes, and re-routing what was parked for it to the sessions adopted
//! from it (replicas themselves are `Replica` in `mod.rs`).
use super::*;

impl ClusterState {
    /// Lost nodes' sessions are adopted (every peer re-announced): drop their routes and
    /// re-route what was parked for them to the adopted sessions.
    pub(super) fn unghost(&mut self) {
        let ghosts = self.a.handle.ghosts.load_full();
        let parked_any = self.a.handle.parked.lock().map(|p| !p.is_empty()).unwrap_or(false);
        if ghosts.is_empty() && !parked_any {
            return;
        }
        for m in self.members.values_mut().filter(|m| m.ghost) {
            m.ghost = false;
            m.routes.clear();
        }
        self.a.handle.ghosts.store(Arc::new(HashMap::new()));
        self.set_routes();
        let parked: Vec<Parked> = self.a.handle.parked.lock().map(|mut p| std::mem::take(&mut *p)).unwrap_or_default();
        let n: usize = parked.iter().map(|p| p.forwards.len()).sum();
        if n > 0 {
            let lost: Vec<&Arc<str>> = ghosts.values().collect();
            tracing::info!(messages = n, ?lost, "re-routing messages that were on their way to a lost node");
        }
        for p in parked {
            let d2 = Arc::new(Durable::default());
            for f in &p.forwards {
                let scope = crate::actors::router::Scope::Reroute(&self.a.handle, &p.dead);
                self.a.broker.router.publish(f.msg.clone(), usize::MAX, scope, Some(&d2));
            }
            tokio::spawn(async move {
                d2.wait(Duration::from_secs(5)).await;
                for w in p.waiters {
                    w.done();
                }
            });
        }
    }
}
