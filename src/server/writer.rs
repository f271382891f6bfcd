//! Write half of a connection, driven by the connection's own task: drains the bounded
//! outbound queue to the socket in batches, applying outbound topic aliases (5.0).
use std::collections::HashMap;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::actors::session::{OutPublish, Outbound};
use crate::broker::Broker;
use crate::metrics::Metrics;
use crate::protocols::mqtt::{encode, encode_puback, encode_publish, Ack, Disconnect, Packet, Properties, Protocol};

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

/// The write half of a connection, driven by the connection's own task (one task per
/// connection instead of two): [`Out::step`] writes some of what is queued and is cancel safe,
/// so the packet loop can select on it next to reading, and keep writing while it waits for a
/// packet's handling (which may wait for room in this very queue).
pub struct Out<W> {
    wr: W,
    rx: crate::queue::Receiver<Outbound>,
    /// Encoded packets; `buf[off..]` is still to be written.
    buf: BytesMut,
    off: usize,
    /// Bytes were written since the last flush (TLS keeps some until flushed).
    unflushed: bool,
    /// A DISCONNECT is in `buf`: shut the socket down once it is written.
    close: bool,
    /// The socket failed, was shut down, or the queue closed: nothing more is written.
    pub done: bool,
    protocol: Protocol,
    aliases: Aliases,
    broker: Arc<Broker>,
    hooks: Option<Arc<crate::webhooks::Webhooks>>,
    mount: Option<Arc<str>>,
    client: Arc<str>,
    username: Option<Arc<str>>,
}

impl<W: AsyncWrite + Unpin> Out<W> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        wr: W,
        rx: crate::queue::Receiver<Outbound>,
        protocol: Protocol,
        client_alias_max: u16,
        broker: Arc<Broker>,
        hooks: Option<Arc<crate::webhooks::Webhooks>>,
        mount: Option<Arc<str>>,
        (client, username): (Arc<str>, Option<Arc<str>>),
    ) -> Self {
        let aliases = Aliases { max: client_alias_max, map: HashMap::new() };
        Out {
            wr,
            rx,
            buf: BytesMut::new(),
            off: 0,
            unflushed: false,
            close: false,
            done: false,
            protocol,
            aliases,
            broker,
            hooks,
            mount,
            client,
            username,
        }
    }

    /// Write some of what is queued (waiting for something to be queued when nothing is);
    /// false once nothing more will be written (see `done`). Cancel safe: what was taken
    /// from the queue stays in `buf` until written.
    pub async fn step(&mut self) -> bool {
        if self.done {
            return false;
        }
        if self.off == self.buf.len() {
            if self.unflushed {
                if self.wr.flush().await.is_err() {
                    return self.end();
                }
                self.unflushed = false;
            }
            if self.close {
                let _ = self.wr.shutdown().await;
                return self.end();
            }
            self.buf.clear();
            self.off = 0;
            if self.buf.capacity() > 4 * BATCH {
                self.buf = BytesMut::new();
            }
            let Some(first) = self.rx.recv().await else {
                let _ = self.wr.shutdown().await;
                return self.end();
            };
            self.fill(first);
        }
        match self.wr.write(&self.buf[self.off..]).await {
            Ok(0) | Err(_) => self.end(),
            Ok(n) => {
                self.off += n;
                self.unflushed = true;
                true
            }
        }
    }

    /// Nothing more is written; those waiting for room in the queue are told it closed.
    fn end(&mut self) -> bool {
        self.done = true;
        self.rx.close();
        false
    }

    /// Write what is queued until the queue closes or a DISCONNECT is written (bounded by
    /// the caller in time), then shut the socket down.
    pub async fn finish(&mut self) {
        while self.step().await {}
    }

    /// Encode `next` and whatever else is queued, up to a batch, into `buf`.
    fn fill(&mut self, mut next: Outbound) {
        let (broker, protocol) = (&*self.broker, self.protocol);
        let m = &broker.metrics;
        let buf = &mut self.buf;
        let mut sent = 0u64;
        loop {
            let before = buf.len();
            match next {
                Outbound::Packet(p) => {
                    encode(&p, protocol, buf);
                    out(broker, &self.client, &p, buf.len() - before, protocol);
                }
                Outbound::PubAck(pkid, code) => {
                    encode_puback(buf, pkid, code, protocol);
                    if broker.tracer.on() {
                        out(broker, &self.client, &Packet::PubAck(Ack::new(pkid, code)), buf.len() - before, protocol);
                    } else {
                        m.packets_out.add(4, 1);
                        m.packet_bytes_out.add(4, (buf.len() - before) as u64);
                    }
                }
                Outbound::Publish(p) => {
                    sent += 1;
                    if let Some(h) = self.hooks.as_ref() {
                        let v5 = protocol == Protocol::V5;
                        h.notify("on_deliver", v5, || {
                            let pl = h.payload("on_deliver", v5, &p.msg.payload);
                            let user = self.username.as_deref();
                            crate::webhooks::body::deliver(user, &self.client, &p.msg.topic, pl, p.qos as u8, p.retain, v5)
                        });
                    }
                    m.publish_out.add(p.qos as usize, 1);
                    if broker.tracer.on() {
                        broker.tracer.publish_out(&broker.config.node.name, &self.client, &p);
                    }
                    encode_out(buf, p, protocol, &mut self.aliases, self.mount.as_ref());
                    m.packets_out.add(3, 1);
                    m.packet_bytes_out.add(3, (buf.len() - before) as u64);
                }
                Outbound::Disconnect(code) => {
                    if protocol == Protocol::V5 {
                        let p = Packet::Disconnect(Disconnect { code, props: Properties::default() });
                        encode(&p, protocol, buf);
                        out(broker, &self.client, &p, buf.len() - before, protocol);
                    }
                    self.close = true;
                    break;
                }
            }
            if buf.len() >= BATCH {
                break;
            }
            match self.rx.try_recv() {
                Ok(o) => next = o,
                Err(_) => break,
            }
        }
        Metrics::add(&m.messages_sent, sent);
        Metrics::add(&m.bytes_sent, buf.len() as u64);
    }
}
