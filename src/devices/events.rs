//! What happens to a device event: attributes are stored, responses complete their command,
//! ThingsPanel devices get their `…/response/…` answers, and every event is broadcast to the
//! node's consumers.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::uplink::{response_ok, DeviceEvent, EventKind};
use super::Devices;
use crate::live::LiveEvent;
use crate::storage::meta::{AttributeScope, MetaError};
use crate::telemetry::Sample;

/// A message the platform answers a device with.
pub struct Answer {
    pub topic: String,
    pub payload: Value,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// Telemetry storage has no room within the wait: nothing of this message was taken
    /// that is not safe to send again (writes are idempotent per device, key and time).
    #[error("telemetry storage busy")]
    Busy,
    /// The store refused the message's points for their content (the reason says which).
    #[error("telemetry refused by the store: {0}")]
    Refused(String),
}

impl From<crate::telemetry::NotStored> for IngestError {
    fn from(e: crate::telemetry::NotStored) -> Self {
        match e {
            crate::telemetry::NotStored::Busy(_) => IngestError::Busy,
            crate::telemetry::NotStored::Refused(why) => IngestError::Refused(why),
        }
    }
}

/// Telemetry handed to the writers whose writes are still to be waited for
/// ([`Devices::stored`]), with its events (broadcast once stored).
#[must_use = "the telemetry is queued; its events are broadcast once it is stored"]
pub struct Unstored {
    accepted: Option<crate::telemetry::Accepted>,
    events: Vec<DeviceEvent>,
}

/// Where MQTT answers go: the topic family the device used (`devices` or `gateway`) and the
/// number of the device on the session (a gateway is answered once per message, under its own
/// number, whatever sub-devices the message carried).
pub struct ReplyTo<'a> {
    pub family: &'static str,
    pub number: &'a str,
}

/// Client-side RPC requests a device may make per `devices.command_ttl_secs` (beyond, each is
/// answered with an error at once and not kept).
const RPC_PER_DEVICE: u64 = 100;

/// Where a waiting client-side RPC request is kept in the cache.
fn rpc_key(number: &str, id: &str) -> String {
    format!("rpc:{number}:{id}")
}

impl Devices {
    /// Feed this node's device events (telemetry, attributes, events) to the live stream
    /// while websocket clients watch.
    pub(super) fn feed_live(me: &Arc<Devices>) {
        let (live, mut rx) = (Arc::downgrade(&me.live), me.events.subscribe());
        tokio::spawn(async move {
            loop {
                let ev: Arc<DeviceEvent> = match rx.recv().await {
                    Ok(e) => e,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                };
                let Some(l) = live.upgrade() else { return };
                let kind = match ev.kind {
                    EventKind::Telemetry => "telemetry",
                    EventKind::Attributes => "attributes",
                    EventKind::Event => "event",
                    EventKind::RpcRequest => "rpc_request",
                    _ => continue,
                };
                if l.watched() {
                    l.publish(LiveEvent {
                        kind: kind.into(),
                        device: ev.device_number.to_string(),
                        tenant_id: None,
                        ts: ev.ts,
                        data: Value::Object(ev.values.clone()),
                    });
                }
            }
        });
    }

    /// Apply and broadcast events; returns the MQTT answers to publish (ThingsPanel responses,
    /// ThingsBoard attribute responses) when `reply` says where (MQTT only).
    /// Telemetry is stored before this returns (waiting at most `wait` for room in the
    /// writers' queues, then `Busy`; at most `telemetry.ack_timeout_ms` for the writes).
    pub async fn ingest(&self, events: Vec<DeviceEvent>, reply: Option<ReplyTo<'_>>, wait: Duration) -> Result<Vec<Answer>, IngestError> {
        let (answers, unstored) = self.ingest_held(events, reply, wait).await?;
        if let Some(u) = unstored {
            self.stored(u, Some(self.ack_timeout())).await?;
        }
        Ok(answers)
    }

    /// How long a device waits for its points to be written before it is answered busy
    /// (`telemetry.ack_timeout_ms`).
    pub fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.config.telemetry.ack_timeout_ms.max(1))
    }

    /// [`ingest`](Self::ingest), except that the writes of the message's last telemetry are
    /// not waited for: its points are the writers' when this returns, and [`Self::stored`]
    /// waits for them (then broadcasts those events). An MQTT connection holds the PUBACK
    /// on it while it goes on reading the device's packets.
    pub async fn ingest_held(
        &self,
        events: Vec<DeviceEvent>,
        reply: Option<ReplyTo<'_>>,
        wait: Duration,
    ) -> Result<(Vec<Answer>, Option<Unstored>), IngestError> {
        let mut answers: Vec<Answer> = Vec::new();
        let mut answered = false;
        // Telemetry waits here and is stored in one hand-over (a request's array, a gateway's
        // devices) before the next event of another kind, so events keep their order.
        let mut telemetry: Vec<DeviceEvent> = Vec::new();
        for ev in events {
            if ev.kind == EventKind::Telemetry {
                telemetry.push(ev);
                continue;
            }
            if let Some(u) = self.hand_over_telemetry(&mut telemetry, wait).await? {
                self.stored(u, Some(self.ack_timeout())).await?;
            }
            let answer = reply.as_ref().filter(|_| !answered);
            if let Some(a) = self.apply(&ev, answer).await? {
                // A ThingsPanel message is answered once; ThingsBoard requests each.
                answered |= !matches!(ev.kind, EventKind::AttributeRequest | EventKind::RpcRequest);
                answers.push(a);
            }
            self.done(ev).await;
        }
        Ok((answers, self.hand_over_telemetry(&mut telemetry, wait).await?))
    }

    /// Hand the telemetry events gathered so far to the writers (all of them, one hand-over
    /// per writer); `None` when there were none.
    async fn hand_over_telemetry(&self, events: &mut Vec<DeviceEvent>, wait: Duration) -> Result<Option<Unstored>, IngestError> {
        if events.is_empty() {
            return Ok(None);
        }
        let accepted = match self.telemetry.get() {
            Some(t) => {
                let samples: Vec<Sample> = events.iter().map(|e| Sample { device_id: e.device_id, ts: e.ts, values: &e.values }).collect();
                Some(t.hand_over_all(&samples, wait).await.map_err(IngestError::from)?)
            }
            None => None,
        };
        Ok(Some(Unstored { accepted, events: std::mem::take(events) }))
    }

    /// Wait (at most `ack`, if given) for handed-over telemetry to be written, then broadcast
    /// its events.
    pub async fn stored(&self, u: Unstored, ack: Option<Duration>) -> Result<(), IngestError> {
        if let (Some(t), Some(a)) = (self.telemetry.get(), u.accepted) {
            a.written(t, ack).await?;
        }
        for ev in u.events {
            self.done(ev).await;
        }
        Ok(())
    }

    /// An event was applied: the device was seen, consumers hear of it.
    async fn done(&self, ev: DeviceEvent) {
        self.seen(&ev.device_number).await;
        self.metrics.events.fetch_add(1, Ordering::Relaxed);
        // Nobody listening is fine: consumers subscribe when they start.
        let _ = self.events.send(Arc::new(ev));
    }

    /// Apply one event that is not telemetry; the answer to publish, if the device gets one.
    async fn apply(&self, ev: &DeviceEvent, answer: Option<&ReplyTo<'_>>) -> Result<Option<Answer>, IngestError> {
        Ok(match ev.kind {
            EventKind::Attributes => {
                self.meta.set_attributes(ev.device_id, AttributeScope::Client, &ev.values).await?;
                match (answer, &ev.message_id) {
                    (Some(r), Some(mid)) => Some(Answer {
                        topic: format!("{}/attributes/response/{}/{mid}", r.family, r.number),
                        payload: json!({"result": 0, "message": "success", "ts": ev.ts / 1000}),
                    }),
                    _ => None,
                }
            }
            EventKind::CommandResponse | EventKind::AttributeSetResponse => {
                if let Some(mid) = &ev.message_id {
                    let ok = response_ok(&ev.values);
                    if self.meta.complete_command(ev.device_id, mid, ok, &Value::Object(ev.values.clone())).await?.is_none() {
                        tracing::debug!(device = %ev.device_number, message_id = %mid, "response to an unknown or finished command");
                    }
                }
                None
            }
            EventKind::Event => match (answer, &ev.message_id) {
                (Some(r), Some(mid)) => Some(Answer {
                    topic: format!("{}/event/response/{}/{mid}", r.family, r.number),
                    payload: json!({"result": 0, "message": "success", "ts": ev.ts / 1000, "method": ev.values.get("method")}),
                }),
                _ => None,
            },
            EventKind::AttributeRequest => {
                let keys = |k: &str| -> Vec<String> {
                    ev.values
                        .get(k)
                        .and_then(Value::as_str)
                        .map(|s| s.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect())
                        .unwrap_or_default()
                };
                let client = self.meta.attributes(ev.device_id, AttributeScope::Client, &keys("clientKeys")).await?;
                let shared = self.meta.attributes(ev.device_id, AttributeScope::Shared, &keys("sharedKeys")).await?;
                match (answer, &ev.message_id) {
                    (Some(_), Some(mid)) => Some(Answer {
                        topic: format!("v1/devices/{}/attributes/response/{mid}", ev.device_number),
                        payload: json!({"client": client, "shared": shared}),
                    }),
                    _ => None,
                }
            }
            EventKind::RpcRequest => self.rpc_request(ev, answer.is_some()).await,
            EventKind::Telemetry => None,
        })
    }

    /// A ThingsBoard client-side RPC: `getSessionLimits` is answered here (the SDKs ask it at
    /// every connect and wait for it before they publish); any other method is kept for
    /// `devices.command_ttl_secs` for platform services, which hear of it (live stream,
    /// webhooks, an MQTT subscription to `v1/devices/+/rpc/request/+`) and answer it through
    /// `POST /api/v1/devices/{number}/rpc/{id}/response`.
    async fn rpc_request(&self, ev: &DeviceEvent, mqtt: bool) -> Option<Answer> {
        let mid = ev.message_id.as_deref()?;
        let method = ev.values.get("method").and_then(Value::as_str).unwrap_or("");
        let respond =
            |payload: Value| mqtt.then(|| Answer { topic: format!("v1/devices/{}/rpc/response/{mid}", ev.device_number), payload });
        if method == "getSessionLimits" {
            let c = &self.config;
            // No per-device rate limits here: empty limits (the SDKs read them as none).
            return respond(json!({
                "maxPayloadSize": c.devices.max_payload,
                "maxInflightMessages": c.mqtt.max_inflight,
                "rateLimits": {"messages": "", "telemetryMessages": "", "telemetryDataPoints": ""},
            }));
        }
        let ttl = Duration::from_secs(self.config.devices.command_ttl_secs.max(1));
        // Bounded per device: a device that keeps calling cannot fill the cache.
        if self.cache.incr(&format!("rpcn:{}", ev.device_number), ttl).await > RPC_PER_DEVICE {
            tracing::debug!(device = %ev.device_number, "client-side RPC refused: too many in the window");
            return respond(
                json!({"error": format!("too many client-side RPC requests: at most {RPC_PER_DEVICE} per devices.command_ttl_secs")}),
            );
        }
        let pending = json!({"method": method, "params": ev.values.get("params"), "ts": ev.ts});
        self.cache.set(&rpc_key(&ev.device_number, mid), &pending.to_string(), ttl).await;
        None
    }

    /// Answer a device's client-side RPC `id` (a platform service's answer): published on
    /// `v1/devices/{number}/rpc/response/{id}`. `Ok(false)`: no such request is waiting
    /// (never made, answered already, or older than `devices.command_ttl_secs`).
    pub async fn answer_rpc(&self, number: &str, id: &str, response: &Value) -> Result<bool, MetaError> {
        let body = response.to_string();
        if body.len() > self.config.devices.max_payload {
            return Err(MetaError::Invalid(format!("response larger than {} bytes", self.config.devices.max_payload)));
        }
        // Taken in one step: of two services answering at once, one gets the request.
        if self.cache.take(&rpc_key(number, id)).await.is_none() {
            return Ok(false);
        }
        if let Some(b) = self.broker() {
            let msg = crate::message::Message::from_node(
                format!("v1/devices/{number}/rpc/response/{id}"),
                body,
                crate::protocols::mqtt::QoS::AtLeastOnce,
                false,
            );
            super::downlink::publish_stored(&b, msg).await;
        }
        Ok(true)
    }

    /// Attributes of a device for the device APIs: `{"client": {..}, "shared": {..}}`.
    pub async fn attributes_doc(&self, device_id: i64, keys: &[String]) -> Result<Value, MetaError> {
        let client = self.meta.attributes(device_id, AttributeScope::Client, keys).await?;
        let shared = self.meta.attributes(device_id, AttributeScope::Shared, keys).await?;
        Ok(json!({"client": client, "shared": shared}))
    }
}
