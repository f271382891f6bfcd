//! An inbound PUBLISH as a pipeline of small steps, each returning `Result<_, Refusal>`:
//! resolve the topic alias → authorise (webhook or ACL) → device uplink (checked, stored,
//! answered) → the message → route and acknowledge. [`Conn::publish`] is the one place that
//! turns a refusal into the right PUBACK/PUBREC or DISCONNECT for the protocol version.
use super::*;
use crate::message::Durable;

/// Why a PUBLISH is not routed.
enum Refusal {
    /// A negative acknowledgement with this reason (5.0); 3.1.1, which has none, acknowledges
    /// and drops the message so the client does not resend it forever.
    Nack(u8),
    /// The connection ends with this reason: a protocol error, a topic 3.1.1 cannot refuse,
    /// or a busy store (the message stays unacknowledged and the device resends it).
    Close(u8),
}

/// A message that passed every check, ready to route.
struct Admitted {
    msg: Arc<Message>,
    /// The platform took it (a device's stored uplink): a success even without subscribers.
    taken: bool,
    /// Not a `$SYS` topic (clients may not inject broker statistics).
    routable: bool,
    /// Its telemetry, handed to the writers: the PUBACK waits until it is written.
    held: Option<crate::devices::Unstored>,
}

impl Conn {
    pub(super) async fn publish(&mut self, p: Publish) -> Option<WillAction> {
        Metrics::add(&self.broker.metrics.messages_received, 1);
        let (qos, pkid) = (p.qos, p.pkid);
        // Subscription changes other clients sent before this PUBLISH was read.
        let mark = self.broker.router.pending.mark();
        // No boxing on this path: one allocation per step would be paid by every PUBLISH.
        match self.admit_publish(p).await {
            Ok(a) => {
                self.broker.router.pending.settle(mark, &a.msg.topic).await;
                self.route(qos, pkid, a).await
            }
            Err(Refusal::Nack(code)) => {
                self.refuse(qos, pkid, code).await;
                None
            }
            Err(Refusal::Close(code)) => Some(self.close(code)),
        }
    }

    /// Every step before routing.
    async fn admit_publish(&mut self, p: Publish) -> Result<Admitted, Refusal> {
        let mut props = p.props.map(|b| *b);
        let topic = self.resolve_alias(p.topic, props.as_mut())?;
        let asked = self.authorise_publish(Asked { topic, payload: p.payload, qos: p.qos, retain: p.retain }).await?;
        let (taken, held) = self.device_uplink(&asked, &mut props).await?;
        Ok(self.message(asked, props, taken, held))
    }

    /// The topic, from the PUBLISH or its alias (5.0); a new alias is remembered.
    fn resolve_alias(&mut self, topic: String, props: Option<&mut Properties>) -> Result<String, Refusal> {
        match props.and_then(|pr| pr.topic_alias.take()) {
            None => Ok(topic),
            Some(a) if a > self.broker.config.mqtt.topic_alias_max => Err(Refusal::Close(reason::TOPIC_ALIAS_INVALID)),
            Some(a) if topic.is_empty() => self.aliases.get(&a).cloned().ok_or(Refusal::Close(reason::PROTOCOL_ERROR)),
            Some(a) => {
                self.aliases.insert(a, topic.clone());
                Ok(topic)
            }
        }
    }

    /// The webhook or the ACL (see [`authorise`]); a webhook may modify the message.
    async fn authorise_publish(&self, mut asked: Asked) -> Result<Asked, Refusal> {
        mount_in(&self.principal, &mut asked.topic);
        let v5 = self.protocol == Protocol::V5;
        let asker = Asker {
            broker: &self.broker,
            svc: &self.svc,
            principal: &self.principal,
            username: self.username.as_deref(),
            client: &self.shown,
            v5,
        };
        // Not boxed: `authorise` boxes the webhook call it may make, so its own future is small.
        match authorise(&asker, &mut asked).await {
            Ok(()) => Ok(asked),
            // 3.1.1 has no negative acknowledgement for a topic it cannot take.
            Err(code) if code == reason::TOPIC_NAME_INVALID && !v5 => Err(Refusal::Close(code)),
            Err(code) => Err(Refusal::Nack(code)),
        }
    }

    /// A device's message on one of its uplink topics is checked, stored and answered by the
    /// platform; `Ok((true, _))` when it was, with its telemetry still being written (QoS 1).
    /// Subscribers (platform services) learn which device sent any message of a device.
    async fn device_uplink(
        &mut self,
        asked: &Asked,
        props: &mut Option<Properties>,
    ) -> Result<(bool, Option<crate::devices::Unstored>), Refusal> {
        let Some(ident) = self.identity.as_ref().map(|i| i.load_full()) else { return Ok((false, None)) };
        let (mut taken, mut held) = (false, None);
        if let Some((kind, req, index)) = crate::devices::ota::chunk_request(&asked.topic, &ident.device_number) {
            // Boxed, as the claim below: rare paths whose futures would otherwise size (and be
            // copied into) every PUBLISH's handling.
            Box::pin(self.ota_chunk(&ident, kind, req, index, &asked.payload)).await?;
            taken = true;
        } else if is_claim(&asked.topic, &ident.device_number) {
            match Box::pin(self.svc.devices.offer_claim(&ident, &asked.payload)).await {
                Ok(()) => taken = true,
                Err(crate::storage::meta::MetaError::Invalid(why)) => {
                    tracing::info!(device = %ident.device_number, %why, "claim request refused");
                    return Err(Refusal::Nack(reason::PAYLOAD_FORMAT_INVALID));
                }
                Err(e) => {
                    tracing::warn!(device = %ident.device_number, error = %e, "cannot record a claim request");
                    return Err(Refusal::Nack(reason::UNSPECIFIED_ERROR));
                }
            }
        } else if let Some((kind, gateway, mid)) = uplink::classify(&asked.topic, &ident.device_number) {
            taken = true;
            let m = uplink::Incoming { kind, gateway, message_id: mid, payload: &asked.payload, protocol: "mqtt" };
            held = Box::pin(self.uplink(&ident, m, asked.qos == QoS::AtLeastOnce, props.as_ref())).await?;
        }
        props.get_or_insert_with(Properties::default).user_properties.push(("device_number".into(), ident.device_number.to_string()));
        Ok((taken, held))
    }

    /// The routed message: expiry from the interval the client set, subscription ids cleared,
    /// the `on_publish` webhook told.
    fn message(&self, asked: Asked, mut props: Option<Properties>, taken: bool, held: Option<crate::devices::Unstored>) -> Admitted {
        let v5 = self.protocol == Protocol::V5;
        let Asked { topic, payload, qos, retain } = asked;
        let expires_at = props.as_mut().and_then(|pr| pr.message_expiry_interval.take()).map(|s| now_ms() + s as u64 * 1000);
        if let Some(pr) = props.as_mut() {
            pr.subscription_identifiers.clear();
        }
        let props = props.filter(|pr| !pr.is_empty()).map(Box::new);
        // A device's claim request carries its secret: for the platform only, never routed.
        let secret = taken && self.principal.device().is_some_and(|i| is_claim(&topic, &i.device_number));
        let routable = !topic.starts_with("$SYS") && !secret;
        // Taken, on `v1/devices/{its number}/attributes`: a ThingsBoard device's own client
        // attributes, which must not come back to it as if they were a shared-attribute update;
        // on `…/rpc/request/{id}`: its own call to the platform, not a server-side RPC to it.
        let not_to_own_device =
            taken && topic.starts_with("v1/devices/") && (topic.ends_with("/attributes") || topic.contains("/rpc/request/"));
        if let Some(h) = self.svc.hooks.as_ref() {
            h.notify("on_publish", v5, || {
                let pl = h.payload("on_publish", v5, &payload);
                crate::webhooks::body::publish(self.username.as_deref(), &self.shown, qos as u8, &topic, pl, retain, v5)
            });
        }
        let msg = Arc::new(Message {
            id: crate::message::next_id(),
            topic: Arc::from(topic),
            payload,
            qos,
            retain,
            props,
            expires_at,
            publisher: Some(self.client_id.clone()),
            not_to_own_device,
        });
        Admitted { msg, taken, routable, held }
    }

    /// Retain, route and acknowledge as the client's QoS asks. QoS 2 goes through the session,
    /// which owns the exactly-once state.
    async fn route(&mut self, qos: QoS, pkid: u16, a: Admitted) -> Option<WillAction> {
        let Admitted { msg, taken, routable, held } = a;
        if msg.retain && routable {
            self.broker.retain(msg.clone()).await;
        }
        match qos {
            QoS::AtMostOnce => {
                if routable {
                    self.broker.publish_with_backpressure(msg).await;
                }
            }
            QoS::AtLeastOnce => {
                let (n, durable) = if routable { self.broker.publish_routed(msg).await } else { (0, None) };
                // A device's uplink the platform took has a receiver: a success, not 0x10.
                let code =
                    if n == 0 && self.protocol == Protocol::V5 && !taken { reason::NO_MATCHING_SUBSCRIBERS } else { reason::SUCCESS };
                self.puback(pkid, code, durable, held).await;
            }
            QoS::ExactlyOnce => {
                // Through the session even when not routable: it owns the exactly-once state.
                let Some(reply) = self.reply().await else { return Some(WillAction::Publish) };
                let max = self.broker.config.mqtt.max_queued;
                let sem = self.qos2_routing.get_or_insert_with(|| Arc::new(tokio::sync::Semaphore::new((max / 4).clamp(1, 32)))).clone();
                let Ok(routing) = sem.acquire_owned().await else { return Some(WillAction::Publish) };
                let topic = msg.topic.clone();
                self.tell(SessionMessage::InboundQos2 { pkid, msg, taken, reply, _routing: routing });
                // The session routes it (it owns exactly-once); pacing is the connection's job.
                self.broker.pace(&topic).await;
            }
        }
        None
    }

    /// A QoS 1 PUBACK, in the PUBLISHes' order (see [`super::acker`]): at once when nothing
    /// waits; in the connection's queue while the message's copies are being taken; a task
    /// while a telemetry write is in progress.
    async fn puback(&mut self, pkid: u16, code: u8, durable: Option<Arc<Durable>>, held: Option<crate::devices::Unstored>) {
        if held.is_some() || self.held_acks.chained() {
            let c = self.ack_ctx();
            c.ack(&mut self.held_acks, pkid, code, durable, held).await;
            return;
        }
        if durable.as_ref().is_some_and(|d| !d.is_done()) || self.held_acks.has_queued() {
            if self.held_acks.push(pkid, code, durable, self.broker.config.mqtt.max_inflight) {
                // As many wait as the client may have in flight: read no more until the oldest goes.
                self.held_acks.head_settled().await;
                self.send_ready_acks().await;
            }
            return;
        }
        let v5 = self.protocol == Protocol::V5;
        let _ = self.tx.send(super::acker::answer(pkid, code, durable.as_deref(), v5, &self.broker, &self.end)).await;
    }

    /// The connection ends (a client's DISCONNECT right behind its PUBLISHes, say): the
    /// PUBACKs still waiting for their copies go out once they may, bounded in time — as a
    /// task's would have — unless nothing more can be written.
    pub(super) async fn last_acks(&mut self, cancel: &CancellationToken) {
        let all = async {
            while self.held_acks.has_queued() && !cancel.is_cancelled() {
                self.held_acks.head_settled().await;
                if !self.send_ready_acks().await {
                    return; // the socket is gone
                }
            }
        };
        let _ = tokio::time::timeout(super::acker::DURABLE_WAIT, all).await;
    }

    /// Queue the PUBACKs whose wait is over, oldest first (see `acker::AckChain::pop_ready`).
    /// False if nothing more can be written.
    pub(super) async fn send_ready_acks(&mut self) -> bool {
        let (now, v5) = (tokio::time::Instant::now(), self.protocol == Protocol::V5);
        while let Some(q) = self.held_acks.pop_ready(now) {
            if self.tx.send(q.outbound(v5, &self.broker, &self.end)).await.is_err() {
                return false;
            }
        }
        true
    }

    /// What a QoS 1 acknowledgement that waits needs (see [`super::acker`]).
    pub(super) fn ack_ctx(&self) -> super::acker::AckCtx {
        super::acker::AckCtx {
            tx: self.tx.clone(),
            v5: self.protocol == Protocol::V5,
            broker: self.broker.clone(),
            devices: self.svc.devices.clone(),
            ping_within: (self.keep_alive > 0).then(|| Duration::from_millis(self.keep_alive as u64 * 500)),
            end: self.end.clone(),
            cap: self.broker.config.mqtt.max_inflight,
        }
    }

    /// Answer a PUBLISH that is not routed: the reason code in 5.0; in 3.1.1 (which has no
    /// negative acknowledgement) the message is dropped but still acknowledged, so the client
    /// does not resend it forever.
    async fn refuse(&mut self, qos: QoS, pkid: u16, code: u8) {
        let code = if self.protocol == Protocol::V5 { code } else { reason::SUCCESS };
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.puback(pkid, code, None, None).await,
            // 3.1.1: the PUBREL that follows is answered by the session (PUBCOMP).
            QoS::ExactlyOnce => self.send(Packet::PubRec(Ack::new(pkid, code))).await,
        }
    }

    /// A device's uplink message: checked, turned into events and applied. `hold` (QoS 1):
    /// its telemetry's writes are not waited for here but returned, for the PUBACK to wait
    /// on while the connection goes on reading (the device's in-flight window is the brake).
    async fn uplink(
        &mut self,
        ident: &Arc<crate::devices::Identity>,
        m: uplink::Incoming<'_>,
        hold: bool,
        props: Option<&Properties>,
    ) -> Result<Option<crate::devices::Unstored>, Refusal> {
        let d = self.svc.devices.clone();
        let gateway = m.gateway;
        let events = match uplink::parse(ident, m, &d.config.devices, now_ms() as i64) {
            Ok(events) => events,
            Err(why) => {
                d.rejected(&ident.device_number, "mqtt", &why);
                // MQTT 5.0: the device may have asked for answers on a response topic.
                if let Some(rt) = props.and_then(|p| p.response_topic.clone()) {
                    if self.principal.acl().is_some_and(|a| a.may_subscribe(&rt)) {
                        let body = serde_json::json!({"error": {"code": why.code(), "message": why.to_string()}});
                        self.answer(rt, body, props.and_then(|p| p.correlation_data.clone()));
                    }
                }
                return Err(Refusal::Nack(match why {
                    uplink::Reject::TooLarge(_) => reason::QUOTA_EXCEEDED,
                    _ => reason::PAYLOAD_FORMAT_INVALID,
                }));
            }
        };
        let reply_to = crate::devices::ReplyTo { family: if gateway { "gateway" } else { "devices" }, number: &ident.device_number };
        // MQTT devices wait longer: holding the acknowledgement back is the protocol's own flow control.
        let wait = std::time::Duration::from_millis(d.config.telemetry.wait_ms.saturating_mul(10));
        let ingested = match d.ingest_held(events, Some(reply_to), wait).await {
            Ok((answers, unstored)) => {
                for a in answers {
                    self.answer(a.topic, a.payload, None);
                }
                match unstored {
                    Some(u) if !hold => d.stored(u, Some(d.ack_timeout())).await.map(|()| None),
                    u => Ok(u),
                }
            }
            Err(e) => Err(e),
        };
        match ingested {
            Ok(held) => Ok(held),
            Err(crate::devices::IngestError::Busy) => {
                tracing::warn!(device = %ident.device_number, "telemetry storage busy: disconnecting the device unacknowledged (it resends)");
                // Not acknowledged: the device sends it again when it reconnects.
                Err(Refusal::Close(reason::SERVER_BUSY))
            }
            // Logged once by the writer that tried it.
            Err(crate::devices::IngestError::Refused(_)) => Err(Refusal::Nack(reason::PAYLOAD_FORMAT_INVALID)),
            Err(e) => {
                tracing::error!(error = %e, "cannot store a device message");
                Err(Refusal::Nack(reason::UNSPECIFIED_ERROR))
            }
        }
    }

    /// A device asks for a chunk of the package announced to it (ThingsBoard OTA): answered on
    /// `v2/{fw|sw}/response/{request}/chunk/{index}`. Nothing announced: refused (0x83), no
    /// answer (an empty one would make the SDKs ask again forever).
    async fn ota_chunk(
        &self,
        ident: &crate::devices::Identity,
        kind: crate::storage::meta::PackageKind,
        req: &str,
        index: u64,
        payload: &[u8],
    ) -> Result<(), Refusal> {
        let Some(size) = crate::devices::ota::asked_size(payload) else {
            return Err(Refusal::Nack(reason::PAYLOAD_FORMAT_INVALID));
        };
        match self.svc.devices.announced_chunk(ident.device_id, kind, index, size).await {
            Ok(chunk) => {
                let topic = format!("v1/devices/{}/v2/{}/response/{req}/chunk/{index}", ident.device_number, kind.prefix());
                self.broker.publish(Arc::new(Message::from_node(topic, chunk, QoS::AtLeastOnce, false)));
                Ok(())
            }
            Err(crate::storage::meta::MetaError::NotFound(what)) => {
                tracing::debug!(device = %ident.device_number, "OTA chunk asked for, but no {what}");
                Err(Refusal::Nack(reason::IMPLEMENTATION_SPECIFIC))
            }
            Err(e) => {
                tracing::warn!(device = %ident.device_number, error = %e, "cannot read an OTA package");
                Err(Refusal::Nack(reason::UNSPECIFIED_ERROR))
            }
        }
    }

    /// Publish a platform answer to the device (QoS 1, routed like any message).
    fn answer(&self, topic: String, body: serde_json::Value, correlation: Option<bytes::Bytes>) {
        let mut msg = Message::from_node(topic, body.to_string(), QoS::AtLeastOnce, false);
        msg.props = correlation.map(|c| Box::new(Properties { correlation_data: Some(c), ..Properties::default() }));
        self.broker.publish(Arc::new(msg));
    }
}

/// `v1/devices/{number}/claim`: the device offers itself for claiming (ThingsBoard).
fn is_claim(topic: &str, number: &str) -> bool {
    topic.strip_prefix("v1/devices/").and_then(|r| r.strip_suffix("/claim")) == Some(number)
}
