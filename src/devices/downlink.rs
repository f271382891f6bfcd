//! Downlink: commands, attribute sets/gets and telemetry control from the platform to a
//! device, over whichever protocol it uses. Each is stored first (`pending`), then published
//! on the device's downlink topics (ThingsPanel and ThingsBoard styles; through its gateway for
//! a sub-device) and marked `sent` once a session took it; HTTP long polls and CoAP observers
//! take pending ones themselves. Queued commands go out when the device connects or
//! subscribes; unanswered ones expire.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use super::Devices;
use crate::cluster::wire::DeviceNotice;
use crate::message::Message;
use crate::protocols::mqtt::QoS;
use crate::storage::meta::{AttributeScope, Command, CommandKind, Device, MetaError, NewCommand};

/// A device asking whether downlinks wait for it, and where the checker answers.
pub(super) type PendingCheck = (Arc<str>, tokio::sync::oneshot::Sender<Option<bool>>);

/// A downlink request (admin API body).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DownlinkRequest {
    /// Command name (commands only).
    #[serde(default)]
    pub method: Option<String>,
    /// Command parameters, attribute values, telemetry control values, or `{"keys": [..]}`.
    #[serde(default)]
    pub params: Value,
    /// Lifetime while undelivered or unanswered (default `devices.command_ttl_secs`).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

impl Devices {
    /// Store a downlink and try to deliver it now.
    pub async fn send_downlink(&self, number: &str, kind: CommandKind, req: DownlinkRequest) -> Result<Command, MetaError> {
        let dev = self.meta.device(number).await?;
        let params = match (&req.params, kind) {
            (Value::Null, _) => json!({}),
            (p @ Value::Object(_), _) => p.clone(),
            (_, CommandKind::Command) => req.params.clone(),
            _ => return Err(MetaError::Invalid("params must be a JSON object".into())),
        };
        if kind == CommandKind::Command && req.method.as_deref().is_none_or(str::is_empty) {
            return Err(MetaError::Invalid("a command needs a method".into()));
        }
        let max = self.config.devices.max_payload;
        if params.to_string().len() > max {
            return Err(MetaError::Invalid(format!("params larger than {max} bytes")));
        }
        if kind == CommandKind::AttributeSet {
            if let Value::Object(m) = &params {
                self.meta.set_attributes(dev.id, AttributeScope::Shared, m).await?;
            }
        }
        let ttl = req.ttl_secs.unwrap_or(self.config.devices.command_ttl_secs).clamp(1, 365 * 86_400);
        let cmd = self
            .meta
            .create_command(&NewCommand {
                device_id: dev.id,
                message_id: super::random_hex(8),
                kind,
                method: req.method.clone(),
                payload: params,
                expires_ms: super::now_ms_i64() + ttl as i64 * 1000,
            })
            .await?;
        // Sent from the node the device is connected to: here, or (told below) another one.
        let gateway = match dev.gateway_id {
            Some(g) => Some(self.meta.device_by_id(g).await?.device_number),
            None => None,
        };
        if self.has_local(number) || gateway.as_deref().is_some_and(|g| self.has_local(g)) {
            // Through the per-device flush: queued ones first, never two senders at once.
            self.flush_pending(number).await;
        }
        // HTTP pollers and CoAP observers of the device, and other nodes' connections.
        self.wake(number);
        self.notify(DeviceNotice::Pending { device: number.to_string() }).await;
        if let Some(g) = gateway {
            self.notify(DeviceNotice::Pending { device: g }).await;
        }
        self.meta.command(cmd.id).await
    }

    /// Publish a downlink on the device's topics; true when a session of the device (or of its
    /// gateway) on this node took it. Platform services subscribed to the topics see it too,
    /// but only the device's own sessions make it `sent`.
    async fn dispatch(&self, dev: &Device, cmd: &Command) -> Result<bool, MetaError> {
        let Some(b) = self.broker() else { return Ok(false) };
        let mut out: Vec<(String, Value)> = Vec::new();
        let (n, mid, p) = (&dev.device_number, &cmd.message_id, &cmd.payload);
        let rpc = json!({"method": cmd.method, "params": p});
        match cmd.kind {
            CommandKind::Command => {
                out.push((format!("devices/command/{n}/{mid}"), rpc.clone()));
                out.push((format!("v1/devices/{n}/rpc/request/{mid}"), rpc.clone()));
            }
            CommandKind::AttributeSet => {
                out.push((format!("devices/attributes/set/{n}/{mid}"), p.clone()));
                out.push((format!("v1/devices/{n}/attributes"), p.clone()));
            }
            CommandKind::AttributeGet => out.push((
                format!("devices/attributes/get/{n}"),
                json!({"keys": p.get("keys").cloned().unwrap_or(json!([])), "message_id": mid}),
            )),
            CommandKind::TelemetryControl => out.push((format!("devices/telemetry/control/{n}"), p.clone())),
        }
        if let (Some(gw), Some(addr)) = (dev.gateway_id, &dev.sub_address) {
            if let Ok(g) = self.meta.device_by_id(gw).await {
                let g = &g.device_number;
                let wrap = |v: &Value| json!({"sub_device_data": {addr.as_str(): v}});
                let (topic, body) = match cmd.kind {
                    CommandKind::Command => (format!("gateway/command/{g}/{mid}"), wrap(&rpc)),
                    CommandKind::AttributeSet => (format!("gateway/attributes/set/{g}/{mid}"), wrap(p)),
                    CommandKind::AttributeGet => (
                        format!("gateway/attributes/get/{g}"),
                        wrap(&json!({"keys": p.get("keys").cloned().unwrap_or(json!([])), "message_id": mid})),
                    ),
                    CommandKind::TelemetryControl => (format!("gateway/telemetry/control/{g}"), wrap(p)),
                };
                out.push((topic, body));
            }
        }
        let gateway_number = match dev.gateway_id {
            Some(g) => Some(self.meta.device_by_id(g).await?.device_number),
            None => None,
        };
        let mine =
            |client: &str| super::device_of_session(client).is_some_and(|d| d == dev.device_number || gateway_number.as_deref() == Some(d));
        // Published only when the device will get it: a queued downlink is not shown to
        // platform services again at every flush attempt.
        let taken: usize = out.iter().map(|(topic, _)| b.router.local_subscribers(topic).iter().filter(|c| mine(c)).count()).sum();
        if taken == 0 {
            return Ok(false);
        }
        for (topic, body) in out {
            let mut msg = Message::from_node(topic, body.to_string(), QoS::AtLeastOnce, false);
            msg.expires_at = Some(cmd.expires_ms.max(0) as u64);
            publish_stored(&b, msg).await;
        }
        if self.meta.mark_sent(cmd.id).await? {
            self.metrics.commands_sent.fetch_add(1, Ordering::Relaxed);
        }
        Ok(true)
    }

    /// Deliver a device's (and its sub-devices') queued downlinks in order (it connected or
    /// subscribed, or one was queued). Flushes of one device run one after the other, so
    /// nothing is sent twice, and a caller returns once a round that started after its call
    /// has run (a new command is sent, or still pending, when the admin API answers).
    pub async fn flush_pending(&self, number: &str) {
        let lock = {
            let mut m = self.flushing.lock().unwrap_or_else(|e| e.into_inner());
            if m.len() > 10_000 {
                m.retain(|_, l| Arc::strong_count(l) > 1);
            }
            m.entry(Arc::from(number)).or_default().clone()
        };
        let _turn = lock.lock().await;
        self.flush_once(number).await;
    }

    async fn flush_once(&self, number: &str) {
        let r: Result<(), MetaError> = async {
            // The usual answer: nothing is waiting for it or its sub-devices (asked for many
            // devices in one query; a failed check was logged once for all of them).
            if !self.pending_check(number).await.unwrap_or(false) {
                return Ok(());
            }
            let dev = self.meta.device(number).await?;
            let mut devs = vec![dev.clone()];
            devs.extend(self.meta.sub_devices(dev.id).await?);
            for d in devs {
                for c in self.meta.pending_commands(d.id).await? {
                    if !self.dispatch(&d, &c).await? {
                        break;
                    }
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = r {
            if !matches!(e, MetaError::NotFound(_)) {
                tracing::warn!(device = number, error = %e, "cannot deliver queued downlinks");
            }
        }
    }

    /// Whether device `number` (or one of its sub-devices) has pending downlinks: asked of the
    /// meta store together with whatever other devices ask meanwhile, so a fleet reconnecting
    /// after a failover costs a few queries, not one per device (and one pool connection
    /// each). None if the meta store could not answer.
    async fn pending_check(&self, number: &str) -> Option<bool> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.pending_checks.send((Arc::from(number), tx)).await.ok()?;
        rx.await.ok()?
    }

    /// Answer `pending_check`s in batches of up to 500 devices, one query each.
    pub(super) fn spawn_pending_checker(me: &Arc<Devices>, mut rx: tokio::sync::mpsc::Receiver<PendingCheck>) {
        let weak = Arc::downgrade(me);
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while rx.recv_many(&mut batch, 500).await > 0 {
                let Some(d) = weak.upgrade() else { return };
                let numbers: Vec<&str> = batch.iter().map(|(n, _)| &**n).collect();
                let found = d.meta.pending_among(&numbers).await;
                if let Err(e) = &found {
                    tracing::warn!(devices = batch.len(), error = %e, "cannot check for queued downlinks");
                }
                for (n, tx) in batch.drain(..) {
                    let _ = tx.send(found.as_ref().ok().map(|f| f.contains(&*n)));
                }
            }
        });
    }

    /// The oldest pending downlink of a device, marked sent (HTTP long poll).
    pub async fn take_pending(&self, device_id: i64) -> Result<Option<Command>, MetaError> {
        self.take_pending_of(
            device_id,
            &[CommandKind::Command, CommandKind::AttributeSet, CommandKind::AttributeGet, CommandKind::TelemetryControl],
        )
        .await
    }

    /// The oldest pending downlink of one of `kinds`, marked sent (CoAP observers).
    pub async fn take_pending_of(&self, device_id: i64, kinds: &[CommandKind]) -> Result<Option<Command>, MetaError> {
        for c in self.meta.pending_commands(device_id).await?.into_iter().filter(|c| kinds.contains(&c.kind)) {
            if self.meta.mark_sent(c.id).await? {
                self.metrics.commands_sent.fetch_add(1, Ordering::Relaxed);
                return self.meta.command(c.id).await.map(Some);
            }
        }
        Ok(None)
    }

    /// The oldest pending downlink of one of `kinds`, left pending (a CoAP observer marks it
    /// sent once the device acknowledged the notification).
    pub async fn peek_pending_of(&self, device_id: i64, kinds: &[CommandKind]) -> Result<Option<Command>, MetaError> {
        Ok(self.meta.pending_commands(device_id).await?.into_iter().find(|c| kinds.contains(&c.kind)))
    }

    /// A downlink was delivered by another path (CoAP notification acknowledged).
    pub async fn delivered(&self, id: i64) -> Result<(), MetaError> {
        if self.meta.mark_sent(id).await? {
            self.metrics.commands_sent.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Wait (bounded) for a downlink for the device; `None` on timeout.
    pub async fn poll_pending(&self, device_id: i64, number: &str, wait: Duration) -> Result<Option<Command>, MetaError> {
        let deadline = tokio::time::Instant::now() + wait;
        let notify = self.waiter(number);
        loop {
            let woken = notify.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if let Some(c) = self.take_pending(device_id).await? {
                return Ok(Some(c));
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return Ok(None);
            }
        }
    }
}

/// How a downlink looks to HTTP and CoAP devices.
pub fn as_rpc(c: &Command) -> Value {
    json!({"id": c.message_id, "kind": c.kind, "method": c.method, "params": c.payload})
}

/// Expire unanswered downlinks every second (on every node; the update is idempotent).
pub(super) fn spawn_expiry(d: &Arc<Devices>) {
    let me = Arc::downgrade(d);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Some(d) = me.upgrade() else { return };
            if d.meta.is_closed() {
                return; // the node is stopping
            }
            match d.meta.expire_commands().await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(expired = n, "downlinks expired"),
                Err(e) => tracing::warn!(error = %e, "cannot expire downlinks"),
            }
        }
    });
}

/// Publish a platform message (QoS 1) and wait until the copies queued for persistent sessions
/// are stored.
pub(super) async fn publish_stored(b: &crate::broker::Broker, msg: Message) {
    let (_, durable) = b.publish_routed(Arc::new(msg)).await;
    if let Some(d) = durable {
        crate::broker::Broker::wait_durable(&d).await;
    }
}
