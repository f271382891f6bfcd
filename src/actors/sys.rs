//! Publishes `$SYS/broker/...` statistics as retained messages at a configurable interval, and
//! (in a cluster) membership changes as they happen: it subscribes to the cluster's events.
use crate::actors::inspect::Tell;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::broker::Broker;
use crate::message::Message;
use crate::metrics::Metrics;
use crate::protocols::mqtt::QoS;

pub struct SysActor;

pub enum SysMessage {
    Tick,
    Cluster(crate::cluster::ClusterEvent),
}

/// What `$SYS` reports on: the broker's counters and snapshots.
pub type SysState = Arc<Broker>;

impl Actor for SysActor {
    type Msg = SysMessage;
    type State = SysState;
    type Arguments = Arc<Broker>;

    async fn pre_start(&self, me: ActorRef<Self::Msg>, broker: Arc<Broker>) -> Result<Self::State, ActorProcessingErr> {
        let secs = broker.config.mqtt.sys_interval_secs;
        if secs > 0 {
            let _ = me.tell(SysMessage::Tick);
            me.send_interval(Duration::from_secs(secs), || SysMessage::Tick);
        }
        if let Some(c) = broker.cluster.get() {
            let mut events = c.events.subscribe();
            let me = me.clone();
            tokio::spawn(async move {
                loop {
                    match events.recv().await {
                        Ok(e) => {
                            if me.tell(SysMessage::Cluster(e)).is_err() {
                                return;
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(_) => return,
                    }
                }
            });
        }
        Ok(broker)
    }

    async fn handle(&self, _me: ActorRef<Self::Msg>, msg: Self::Msg, b: &mut Self::State) -> Result<(), ActorProcessingErr> {
        if let SysMessage::Cluster(e) = msg {
            let text = match &e {
                crate::cluster::ClusterEvent::MemberUp { name, addr } => format!("up {name} {addr}"),
                crate::cluster::ClusterEvent::MemberDown { name, reason } => format!("down {name} {reason}"),
            };
            sys(b, "$SYS/broker/cluster/events", text, false).await;
            cluster_members(b).await;
            return Ok(());
        }
        cluster_members(b).await;
        let m = &b.metrics;
        let subs = b.subscription_count();
        let retained = b.retained.load().len();
        let stats: Vec<(&str, String)> = vec![
            ("$SYS/broker/version", format!("thingsd {}", env!("CARGO_PKG_VERSION"))),
            ("$SYS/broker/uptime", format!("{} seconds", b.started.elapsed().as_secs())),
            ("$SYS/broker/clients/connected", Metrics::get(&m.clients_connected).to_string()),
            ("$SYS/broker/clients/total", Metrics::get(&m.connections_total).to_string()),
            ("$SYS/broker/messages/received", Metrics::get(&m.messages_received).to_string()),
            ("$SYS/broker/messages/sent", Metrics::get(&m.messages_sent).to_string()),
            ("$SYS/broker/messages/dropped", Metrics::get(&m.messages_dropped).to_string()),
            ("$SYS/broker/bytes/received", Metrics::get(&m.bytes_received).to_string()),
            ("$SYS/broker/bytes/sent", Metrics::get(&m.bytes_sent).to_string()),
            ("$SYS/broker/subscriptions/count", subs.to_string()),
            ("$SYS/broker/retained messages/count", retained.to_string()),
        ];
        for (topic, value) in stats {
            sys(b, topic, value, true).await;
        }
        Ok(())
    }
}

/// Publish one `$SYS` value on this node (retained when `retain`).
async fn sys(b: &Broker, topic: &str, value: String, retain: bool) {
    let msg = Arc::new(Message::from_node(topic, value, QoS::AtMostOnce, retain));
    if retain {
        b.retain(msg.clone()).await;
    }
    b.publish(msg);
}

/// `$SYS/broker/cluster/members`: the members this node sees up, comma-separated.
async fn cluster_members(b: &Broker) {
    if let Some(c) = b.cluster.get() {
        let mut up: Vec<String> = c.members().await.into_iter().filter(|m| m.up).map(|m| m.name).collect();
        up.sort();
        sys(b, "$SYS/broker/cluster/members", up.join(","), true).await;
    }
}

impl ractor::Message for SysMessage {}
