//! Frames of the platform's features from other nodes, handed to the services that own them.
use std::sync::{Arc, Weak};

use crate::broker::Broker;
use crate::cluster::wire::Body;
use crate::cluster::Features;
use crate::services::Services;

/// Frames of the platform's features from other nodes (operators' queries, live and alert
/// events), registered with the cluster at start-up (`Cluster::on_features`).
pub struct FeatureFrames {
    pub broker: Weak<Broker>,
    pub services: Weak<Services>,
}

impl Features for FeatureFrames {
    fn frame(&self, from: Arc<str>, body: Body) {
        let (Some(b), Some(svc)) = (self.broker.upgrade(), self.services.upgrade()) else { return };
        match body {
            Body::Admin { id, req } => {
                tokio::spawn(async move {
                    let body = match crate::ops::answer(&b, &svc, &from, &req).await {
                        Ok(v) => Body::AdminReply { id, ok: true, body: v.to_string() },
                        Err(e) => Body::AdminReply { id, ok: false, body: e.to_wire() },
                    };
                    if let Some(c) = b.cluster.get() {
                        c.send(&from, body);
                    }
                });
            }
            Body::LiveWant => svc.live.peer_wants(&from),
            Body::Live { event } => svc.live.from_peer(&event),
            Body::AlertEvent { rule, device_id, device, values, ts } => svc.alerts.remote_event(rule, device_id, &device, &values, ts),
            Body::AlertEvents { events } => svc.alerts.remote_events(&events),
            other => tracing::debug!(frame = ?std::mem::discriminant(&other), "not a feature frame"),
        }
    }
}
