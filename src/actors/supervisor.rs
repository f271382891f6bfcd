//! Root supervisor of a node: starts the cluster actor (when clustering is on), the topic
//! shards, retained store, session registry and `$SYS` publisher, and restarts any of them that
//! crashes (logging why). Shards and the retained store resume from the last snapshot they
//! published, so a restart loses no subscription; the cluster actor rebuilds its local routes
//! from the shards' snapshots and re-introduces itself to its peers.
use std::collections::HashMap;
use std::sync::Arc;

use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};

use super::inspect::Instrumented;
use super::registry::RegistryActor;
use super::retained::RetainedActor;
use super::shard::ShardActor;
use super::sys::SysActor;
use crate::broker::Broker;

pub struct SupervisorActor;

pub enum SupervisorMessage {}

#[derive(Clone, Copy, Debug)]
enum Child {
    Cluster,
    Shard(usize),
    Retained,
    Registry,
    Sys,
}

pub struct SupervisorState {
    broker: Arc<Broker>,
    children: HashMap<ActorId, Child>,
}

impl SupervisorState {
    async fn start(&mut self, me: ActorCell, child: Child) -> Result<(), ActorProcessingErr> {
        let b = self.broker.clone();
        let id = match child {
            Child::Cluster => {
                let args = b.cluster.get().and_then(|c| c.args(b.clone())).ok_or("cluster links not set up")?;
                let name = format!("cluster:{}", b.config.node.name);
                let (r, _) = Actor::spawn_linked(Some(name), Instrumented(crate::cluster::ClusterActor, "cluster"), args, me).await?;
                r.get_id()
            }
            Child::Shard(i) => {
                let (r, _) = Actor::spawn_linked(
                    Some(format!("shard:{i}")),
                    Instrumented(ShardActor, "shard"),
                    (b.router.snapshots[i].clone(), b.cluster.get().cloned()),
                    me,
                )
                .await?;
                let id = r.get_id();
                b.router.shards[i].store(Some(Arc::new(r)));
                id
            }
            Child::Retained => {
                let (r, _) = Actor::spawn_linked(
                    Some("retained:0".into()),
                    Instrumented(RetainedActor, "retained"),
                    (b.retained.clone(), b.state.clone()),
                    me,
                )
                .await?;
                let id = r.get_id();
                b.retained_actor.store(Some(Arc::new(r)));
                id
            }
            Child::Registry => {
                let (r, _) = Actor::spawn_linked(Some("registry:0".into()), Instrumented(RegistryActor, "registry"), b.clone(), me).await?;
                let id = r.get_id();
                b.registry.store(Some(Arc::new(r)));
                id
            }
            Child::Sys => {
                let (r, _) = Actor::spawn_linked(Some("sys:0".into()), Instrumented(SysActor, "sys"), b.clone(), me).await?;
                r.get_id()
            }
        };
        self.children.insert(id, child);
        Ok(())
    }
}

impl Actor for SupervisorActor {
    type Msg = SupervisorMessage;
    type State = SupervisorState;
    type Arguments = Arc<Broker>;

    async fn pre_start(&self, me: ActorRef<Self::Msg>, broker: Arc<Broker>) -> Result<Self::State, ActorProcessingErr> {
        let mut st = SupervisorState { broker, children: HashMap::new() };
        // First: shards announce the routes of restored sessions to it.
        if st.broker.cluster.get().is_some() {
            st.start(me.get_cell(), Child::Cluster).await?;
        }
        for i in 0..st.broker.router.snapshots.len() {
            st.start(me.get_cell(), Child::Shard(i)).await?;
        }
        st.start(me.get_cell(), Child::Retained).await?;
        st.start(me.get_cell(), Child::Registry).await?;
        st.start(me.get_cell(), Child::Sys).await?;
        Ok(st)
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(who, err) => {
                if let Some(child) = st.children.remove(&who.get_id()) {
                    tracing::error!(?child, error = %err, "actor crashed; restarting it");
                    super::inspect::restarted(&who.get_name().unwrap_or_default());
                    st.start(me.get_cell(), child).await?;
                }
            }
            SupervisionEvent::ActorTerminated(who, _, reason) => {
                if let Some(child) = st.children.remove(&who.get_id()) {
                    if reason.as_deref() == Some("killed") {
                        tracing::error!(?child, "actor was killed; restarting it");
                        super::inspect::restarted(&who.get_name().unwrap_or_default());
                        st.start(me.get_cell(), child).await?;
                    } else {
                        tracing::debug!(?child, ?reason, "actor stopped");
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl ractor::Message for SupervisorMessage {}
