//! Writer half of a connection: drains the bounded outbound queue to the socket in batches,
//! applying outbound topic aliases (5.0).
use std::collections::HashMap;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::actors::session::{OutPublish, Outbound};
use crate::broker::Broker;
use crate::metrics::Metrics;
use crate::protocols::mqtt::{encode, encode_publish, Disconnect, Packet, Properties, Protocol};

const BATCH: usize = 64 * 1024;

struct Aliases {
    max: u16,
    map: HashMap<Arc<str>, u16>,
}

impl Aliases {
    /// (alias, whether the topic must still be sent).
    fn lookup(&mut self, topic: &Arc<str>) -> Option<(u16, bool)> {
        if self.max == 0 {
            return None;
        }
        if let Some(a) = self.map.get(topic) {
            return Some((*a, false));
        }
        let next = self.map.len() as u16 + 1;
        if next > self.max {
            return None;
        }
        self.map.insert(topic.clone(), next);
        Some((next, true))
    }
}

/// `v1/devices/{number}/…` back to the `v1/devices/me/…` the device subscribed to
/// (`…/v2/fw/…` and `…/v2/sw/…` back to `v2/…`).
fn mount_out(topic: &Arc<str>, mount: Option<&Arc<str>>) -> Arc<str> {
    match mount.and_then(|m| topic.strip_prefix(&**m)) {
        Some(rest) if rest.starts_with("v2/") => Arc::from(rest),
        Some(rest) => Arc::from(format!("v1/devices/me/{rest}")),
        None => topic.clone(),
    }
}

fn encode_out(buf: &mut BytesMut, p: OutPublish, protocol: Protocol, aliases: &mut Aliases, mount: Option<&Arc<str>>) {
    let topic = mount_out(&p.msg.topic, mount);
    let alias = if protocol == Protocol::V5 { aliases.lookup(&topic) } else { None };
    match alias {
        None => encode_publish(
            buf,
            protocol,
            p.dup,
            p.qos,
            p.retain,
            &topic,
            p.pkid,
            p.props.as_deref().unwrap_or(Properties::empty()),
            &p.msg.payload,
        ),
        Some((a, send_topic)) => {
            let mut props = p.props.map(|b| *b).unwrap_or_default();
            props.topic_alias = Some(a);
            let topic: &str = if send_topic { &topic } else { "" };
            encode_publish(buf, protocol, p.dup, p.qos, p.retain, topic, p.pkid, &props, &p.msg.payload)
        }
    };
}

/// Count (and trace) a control packet written to the client.
fn out(b: &Broker, client: &str, p: &Packet, bytes: usize, protocol: Protocol) {
    let m = &b.metrics;
    m.packets_out.add(p.type_code(), 1);
    m.packet_bytes_out.add(p.type_code(), bytes as u64);
    if let Packet::ConnAck(a) = p {
        m.connacks.add(a.code as usize, 1);
    }
    if b.tracer.on() {
        b.tracer.packet(&b.config.node.name, client, "out", p, protocol);
    }
}

/// Run until the queue closes, a DISCONNECT is written, the socket fails or `cancel` fires.
#[allow(clippy::too_many_arguments)]
pub async fn run<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: crate::queue::Receiver<Outbound>,
    protocol: Protocol,
    client_alias_max: u16,
    cancel: CancellationToken,
    broker: Arc<Broker>,
    hooks: Option<Arc<crate::webhooks::Webhooks>>,
    mount: Option<Arc<str>>,
    (client, username): (Arc<str>, Option<Arc<str>>),
) {
    let mut buf = BytesMut::new();
    let mut aliases = Aliases { max: client_alias_max, map: HashMap::new() };
    let m = &broker.metrics;
    'outer: loop {
        let first = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            o = rx.recv() => o,
        };
        let Some(mut next) = first else { break };
        let mut close = false;
        let mut sent = 0u64;
        loop {
            let before = buf.len();
            match next {
                Outbound::Packet(p) => {
                    encode(&p, protocol, &mut buf);
                    out(&broker, &client, &p, buf.len() - before, protocol);
                }
                Outbound::Publish(p) => {
                    sent += 1;
                    if let Some(h) = hooks.as_ref() {
                        let v5 = protocol == Protocol::V5;
                        h.notify("on_deliver", v5, || {
                            let pl = h.payload("on_deliver", v5, &p.msg.payload);
                            crate::webhooks::body::deliver(username.as_deref(), &client, &p.msg.topic, pl, p.qos as u8, p.retain, v5)
                        });
                    }
                    m.publish_out.add(p.qos as usize, 1);
                    if broker.tracer.on() {
                        broker.tracer.publish_out(&broker.config.node.name, &client, &p);
                    }
                    encode_out(&mut buf, p, protocol, &mut aliases, mount.as_ref());
                    m.packets_out.add(3, 1);
                    m.packet_bytes_out.add(3, (buf.len() - before) as u64);
                }
                Outbound::Disconnect(code) => {
                    if protocol == Protocol::V5 {
                        let p = Packet::Disconnect(Disconnect { code, props: Properties::default() });
                        encode(&p, protocol, &mut buf);
                        out(&broker, &client, &p, buf.len() - before, protocol);
                    }
                    close = true;
                    break;
                }
            }
            if buf.len() >= BATCH {
                break;
            }
            match rx.try_recv() {
                Ok(o) => next = o,
                Err(_) => break,
            }
        }
        Metrics::add(&m.messages_sent, sent);
        Metrics::add(&m.bytes_sent, buf.len() as u64);
        if wr.write_all(&buf).await.is_err() || wr.flush().await.is_err() {
            break 'outer;
        }
        buf.clear();
        if buf.capacity() > 4 * BATCH {
            buf = BytesMut::new();
        }
        if close {
            break;
        }
    }
    let _ = wr.flush().await;
    let _ = wr.shutdown().await;
    cancel.cancel();
}
