//! The checks a client's message passes before it is routed, retained or kept as a will:
//! topic depth, then the `auth_on_publish` webhook or the principal's ACL; for a will also
//! no `$` topic and, for a device, a payload its uplink topic accepts.
use super::*;

/// What a client asks the broker to publish: a PUBLISH, or the will of its CONNECT. Both pass
/// the same checks ([`authorise`]), so a will can never reach a topic its client could not
/// publish on.
pub(super) struct Asked {
    pub(super) topic: String,
    pub(super) payload: bytes::Bytes,
    pub(super) qos: QoS,
    pub(super) retain: bool,
}

/// Who asks, as hooks and the ACL see it.
pub(super) struct Asker<'a> {
    pub(super) broker: &'a Broker,
    pub(super) svc: &'a Services,
    pub(super) principal: &'a Principal,
    pub(super) username: Option<&'a str>,
    pub(super) client: &'a str,
    pub(super) v5: bool,
}

/// Rewrite ThingsBoard's `v1/devices/me/…` to the device's own `v1/devices/{number}/…`
/// (and back on the way out, in the writer), so devices cannot see each other's `me`.
/// ThingsBoard's OTA topics `v2/fw/…` and `v2/sw/…` go under the same prefix
/// (`v1/devices/{number}/v2/fw/…`). Its SDKs subscribe to `v2/fw/response/+` and expect
/// `v2/fw/response/{request}/chunk/{index}` on it (ThingsBoard does not match that filter level
/// by level), so that filter is widened to `…/response/#`.
pub(super) fn mount_in(principal: &Principal, t: &mut String) {
    if let Some(i) = principal.device() {
        if let Some(rest) = t.strip_prefix("v1/devices/me/") {
            *t = format!("v1/devices/{}/{rest}", i.device_number);
        } else if t.starts_with("v2/fw/") || t.starts_with("v2/sw/") {
            let widened = t.strip_suffix("/response/+").map(|p| format!("{p}/response/#"));
            *t = format!("v1/devices/{}/{}", i.device_number, widened.as_deref().unwrap_or(t));
        }
    }
}

pub(super) fn count_denied(svc: &Services) {
    svc.devices.metrics.acl_denied.fetch_add(1, Ordering::Relaxed);
}

/// The checks every client message passes before it is routed, retained or kept as a will:
/// the topic's depth (before anything walks it), then the `auth_on_publish` webhook (which may
/// modify the message) or else the principal's ACL. `Err(reason)` refuses it.
pub(super) async fn authorise(a: &Asker<'_>, m: &mut Asked) -> Result<(), u8> {
    let max_levels = a.broker.config.mqtt.max_topic_levels;
    if topic::levels(&m.topic) > max_levels {
        tracing::info!(levels = topic::levels(&m.topic), max_levels, "topic too deep; refused");
        return Err(reason::TOPIC_NAME_INVALID);
    }
    if let Some(h) = a.svc.hooks.as_ref().filter(|h| h.has("auth_on_publish", a.v5)) {
        let body = crate::webhooks::body::publish(
            a.username,
            a.client,
            m.qos as u8,
            &m.topic,
            h.payload("auth_on_publish", a.v5, &m.payload),
            m.retain,
            a.v5,
        );
        match Box::pin(h.auth("auth_on_publish", a.v5, body)).await {
            Verdict::Ok(answer) => {
                if let Some(mods) = answer.get("modifiers").filter(|m| m.is_object()) {
                    if let Err(why) = modified(h, a.v5, mods, &mut m.topic, &mut m.payload, &mut m.qos, &mut m.retain) {
                        tracing::warn!(error = %why, "auth_on_publish webhook answered unusable modifiers; refusing the message");
                        return Err(reason::IMPLEMENTATION_SPECIFIC);
                    }
                    if topic::levels(&m.topic) > max_levels {
                        tracing::warn!("auth_on_publish webhook answered a topic deeper than mqtt.max_topic_levels; refusing the message");
                        return Err(reason::TOPIC_NAME_INVALID);
                    }
                }
                return Ok(());
            }
            Verdict::Next => {}
            Verdict::Error(e) => {
                tracing::info!(topic = %m.topic, error = %e, "message denied by webhook");
                count_denied(a.svc);
                return Err(reason::NOT_AUTHORIZED);
            }
        }
    }
    if a.principal.acl().is_some_and(|acl| !acl.may_publish(&m.topic)) {
        tracing::info!(topic = %m.topic, "message denied by ACL");
        count_denied(a.svc);
        return Err(reason::NOT_AUTHORIZED);
    }
    Ok(())
}

/// A CONNECT's will, checked now as its PUBLISH would be when it fires: the same
/// [`authorise`] step, no `$` topic, and for a device a payload its uplink topic accepts. The
/// will kept is the one authorised (a webhook may have modified it), marked with the device.
pub(super) async fn admit_will(a: &Asker<'_>, w: &mut crate::protocols::mqtt::Will) -> Result<(), u8> {
    let mut m = Asked { topic: std::mem::take(&mut w.topic), payload: w.payload.clone(), qos: w.qos, retain: w.retain };
    mount_in(a.principal, &mut m.topic);
    authorise(a, &mut m).await?;
    // Clients never publish on the server's own `$` topics (`$SYS`, …).
    if m.topic.starts_with('$') {
        tracing::info!(topic = %m.topic, "will on a $ topic refused");
        count_denied(a.svc);
        return Err(reason::NOT_AUTHORIZED);
    }
    if let (Some(ident), Some(d)) = (a.principal.device(), Some(&a.svc.devices)) {
        if let Some((kind, gateway, mid)) = uplink::classify(&m.topic, &ident.device_number) {
            let incoming = uplink::Incoming { kind, gateway, message_id: mid, payload: &m.payload, protocol: "mqtt" };
            if let Err(why) = uplink::parse(ident, incoming, &d.config.devices, now_ms() as i64) {
                tracing::info!(topic = %m.topic, error = %why, "will payload refused");
                return Err(match why {
                    uplink::Reject::TooLarge(_) => reason::PACKET_TOO_LARGE,
                    _ => reason::PAYLOAD_FORMAT_INVALID,
                });
            }
        }
        w.props.user_properties.push(("device_number".into(), ident.device_number.to_string()));
    }
    (w.topic, w.payload, w.qos, w.retain) = (m.topic, m.payload, m.qos, m.retain);
    Ok(())
}

/// Apply an `auth_on_publish` answer's modifiers (topic, payload, qos, retain).
pub(super) fn modified(
    h: &crate::webhooks::Webhooks,
    v5: bool,
    m: &serde_json::Value,
    topic: &mut String,
    payload: &mut bytes::Bytes,
    qos: &mut QoS,
    retain: &mut bool,
) -> Result<(), String> {
    if let Some(t) = m.get("topic") {
        let t = t.as_str().ok_or("topic is not a string")?;
        if !crate::protocols::mqtt::topic::valid_topic_name(t) {
            return Err(format!("{t:?} is not a topic name"));
        }
        *topic = t.to_string();
    }
    if let Some(p) = m.get("payload") {
        *payload = h.decode_payload("auth_on_publish", v5, p.as_str().ok_or("payload is not a string")?).ok_or("payload is not base64")?;
    }
    if let Some(q) = m.get("qos") {
        *qos = q.as_u64().and_then(|q| QoS::from_u8(q.min(255) as u8)).ok_or("qos is 0, 1 or 2")?;
    }
    if let Some(r) = m.get("retain") {
        *retain = r.as_bool().ok_or("retain is a boolean")?;
    }
    Ok(())
}
