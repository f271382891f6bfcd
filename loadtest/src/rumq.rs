//! The second generator: the 1 -> 1 and fan-in scenarios driven through rumqttc, a common
//! MQTT client library (the independent measurement used rumqttc clients), so our own
//! pipelining client (`client.rs`) is not the only judge. Same payload (publisher, sequence,
//! send time), same loss, duplicate and latency accounting; each client is rumqttc's own
//! event loop with `--window` messages in flight.
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet};
use thingsd::protocols::mqtt::QoS;

use crate::client::{payload, Received};
use crate::{brokers, merge, Opts, Row, IDLE};

fn qos(q: QoS) -> rumqttc::QoS {
    match q {
        QoS::AtMostOnce => rumqttc::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
    }
}

fn client(addr: SocketAddr, id: &str, window: usize) -> (AsyncClient, EventLoop) {
    let mut m = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    m.set_keep_alive(Duration::from_secs(60)).set_inflight(window.clamp(1, u16::MAX as usize) as u16);
    m.set_max_packet_size(1 << 20, 1 << 20);
    AsyncClient::new(m, window.max(10))
}

/// Poll until the CONNACK.
async fn connected(ev: &mut EventLoop) -> anyhow::Result<()> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ev.poll()).await.context("CONNACK timed out")?? {
            Event::Incoming(Packet::ConnAck(a)) if a.code == rumqttc::ConnectReturnCode::Success => return Ok(()),
            Event::Incoming(Packet::ConnAck(a)) => bail!("CONNACK {:?}", a.code),
            _ => {}
        }
    }
}

/// `publishers` clients, each sending `per` messages on `bench/{i}`, to one subscriber on
/// `filter`.
async fn run(o: &Opts, b: &brokers::Broker, publishers: usize, filter: &str) -> anyhow::Result<Row> {
    let base = Instant::now();
    let (sub, mut sev) = client(b.addr, "rq-sub", o.window);
    connected(&mut sev).await?;
    sub.subscribe(filter, qos(o.qos)).await?;
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = sev.poll().await? {
            break;
        }
    }
    let per = o.messages / publishers as u64;
    let expected = per * publishers as u64;
    let rx = tokio::spawn(async move {
        let mut r = Received { latencies_us: Vec::with_capacity(expected as usize), ..Default::default() };
        while r.count - r.dups < expected {
            match tokio::time::timeout(IDLE, sev.poll()).await {
                Err(_) | Ok(Err(_)) => break,
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => r.record(&p.payload, base),
                Ok(Ok(_)) => {}
            }
        }
        drop(sub);
        r
    });
    let mut pubs = Vec::with_capacity(publishers);
    for i in 0..publishers {
        let (c, mut ev) = client(b.addr, &format!("rq-pub-{i}"), o.window);
        connected(&mut ev).await?;
        pubs.push((c, ev));
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, (c, mut ev)) in pubs.into_iter().enumerate() {
        let (q, size) = (o.qos, o.payload);
        // The event loop sends and counts acknowledgements; the task feeds it.
        let acks = tokio::spawn(async move {
            let mut done = 0u64;
            while q == QoS::AtMostOnce || done < per {
                match tokio::time::timeout(IDLE, ev.poll()).await {
                    Err(_) | Ok(Err(_)) => break,
                    Ok(Ok(Event::Incoming(Packet::PubAck(_)))) | Ok(Ok(Event::Incoming(Packet::PubComp(_)))) => done += 1,
                    Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_)))) if q == QoS::AtMostOnce => {
                        done += 1;
                        if done == per {
                            break;
                        }
                    }
                    Ok(Ok(_)) => {}
                }
            }
            done
        });
        tasks.push(tokio::spawn(async move {
            let topic = format!("bench/{i}");
            for seq in 0..per {
                c.publish_bytes(topic.as_str(), qos(q), false, payload(i as u32, seq, base, size)).await?;
            }
            let done = acks.await?;
            let _ = c.disconnect().await;
            anyhow::ensure!(done == per, "publisher {i}: {done} of {per} acknowledged");
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(merge(vec![(rx.await?, expected)], &b.name, start))
}

/// 1 -> 1 through rumqttc.
pub async fn pubsub(o: &Opts, b: &brokers::Broker) -> anyhow::Result<Row> {
    run(o, b, 1, "bench/0").await
}

/// `--publishers` -> 1 through rumqttc.
pub async fn fanin(o: &Opts, b: &brokers::Broker) -> anyhow::Result<Row> {
    run(o, b, o.publishers, "bench/#").await
}
