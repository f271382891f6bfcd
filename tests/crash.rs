//! kill -9 of a node process right after the last acknowledgement: everything acknowledged is
//! there after the restart (the state store's default durability, `written`).

use std::collections::BTreeSet;

use crate::common::*;
use bytes::Bytes;
use thingsd::protocols::mqtt::*;

async fn spawn_node(dir: &std::path::Path, env: &[(&str, String)]) -> process::Proc {
    let mut all = vec![("THINGSD_LISTENERS__HTTP", "[]".to_string())];
    all.extend(env.iter().cloned());
    process::spawn(dir, &all).await
}

/// Publish `n` messages `{prefix}{i}` at `qos` pipelined, completing each exchange; returns the
/// reason codes of the acknowledgements (PUBACK, or PUBREC for QoS 2).
async fn publish_all(p: &mut Raw, topic: &str, qos: QoS, prefix: &str, n: u16) -> Vec<u8> {
    for i in 1..=n {
        p.send(publish(topic, qos, i, &format!("{prefix}{i}"))).await;
    }
    let mut codes = Vec::new();
    let mut done = 0;
    while done < n {
        match p.recv().await {
            Some(Packet::PubAck(a)) => {
                codes.push(a.code);
                done += 1;
            }
            Some(Packet::PubRec(a)) => {
                codes.push(a.code);
                p.send(Packet::PubRel(Ack::new(a.pkid, 0))).await;
            }
            Some(Packet::PubComp(_)) => done += 1,
            Some(_) => {}
            None => panic!("publisher closed"),
        }
    }
    codes
}

/// Read and acknowledge PUBLISHes until `want` distinct payloads arrived; returns them in
/// arrival order per topic prefix (duplicates of QoS 1 redeliveries allowed, not counted).
async fn receive_all(s: &mut Raw, want: usize) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    while seen.len() < want {
        match s.recv_app().await {
            Some(Packet::Publish(m)) => {
                let text = String::from_utf8(m.payload.to_vec()).unwrap();
                match m.qos {
                    QoS::AtLeastOnce => s.send(Packet::PubAck(Ack::new(m.pkid, 0))).await,
                    QoS::ExactlyOnce => s.send(Packet::PubRec(Ack::new(m.pkid, 0))).await,
                    QoS::AtMostOnce => {}
                }
                if seen.insert(text.clone()) {
                    order.push(text);
                }
            }
            Some(Packet::PubRel(a)) => s.send(Packet::PubComp(Ack::new(a.pkid, 0))).await,
            Some(_) => {}
            None => panic!("subscriber closed after {} of {want}", seen.len()),
        }
    }
    order
}

fn in_order(got: &[String], prefix: &str, n: u16) {
    let mine: Vec<&String> = got.iter().filter(|g| g.starts_with(prefix)).collect();
    let want: Vec<String> = (1..=n).map(|i| format!("{prefix}{i}")).collect();
    assert_eq!(mine.len(), want.len(), "{prefix}: {} of {n}", mine.len());
    assert!(mine.iter().zip(&want).all(|(a, b)| *a == b), "{prefix}: out of order");
}

fn persistent(protocol: Protocol, id: &str) -> Connect {
    let mut c = connect_packet(protocol, id, protocol == Protocol::V5);
    if protocol == Protocol::V5 {
        c.props.session_expiry_interval = Some(3600);
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_right_after_the_last_acknowledgement_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut node = spawn_node(tmp.path(), &[]).await;
    let n: u16 = 1000;
    // Offline persistent subscribers, 5.0 and 3.1.1, granted QoS 2.
    for proto in [Protocol::V5, Protocol::V4] {
        let id = if proto == Protocol::V5 { "off5" } else { "off4" };
        let (mut s, _) = Raw::session(node.addr, persistent(proto, id)).await;
        assert_eq!(s.sub("k/#", QoS::ExactlyOnce).await, vec![2]);
        s.send(disconnect()).await;
        s.until_closed().await;
    }
    // Online but slow: connected, Receive Maximum 1, never reads.
    let mut slow = persistent(Protocol::V5, "slow5");
    slow.props.receive_maximum = Some(1);
    let (mut slow_conn, _) = Raw::session(node.addr, slow.clone()).await;
    assert_eq!(slow_conn.sub("k/#", QoS::AtLeastOnce).await, vec![1]);

    let mut p5 = Raw::v5(node.addr, "pub5").await;
    let mut p4 = Raw::v4(node.addr, "pub4").await;
    let codes = publish_all(&mut p5, "k/one", QoS::AtLeastOnce, "a", n).await;
    assert!(codes.iter().all(|c| *c == 0), "5.0 QoS 1 acknowledged as stored");
    publish_all(&mut p4, "k/two", QoS::ExactlyOnce, "b", n).await;
    // Retained: one set, one set then deleted.
    for (i, (topic, body)) in [("r/keep", "keep"), ("r/gone", "x"), ("r/gone", "")].into_iter().enumerate() {
        p5.send(Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: true,
            topic: topic.into(),
            pkid: 5000 + i as u16,
            props: None,
            payload: Bytes::from(body.to_string()),
        }))
        .await;
        assert!(matches!(p5.recv().await, Some(Packet::PubAck(_))));
    }
    // At once after the last acknowledgement: SIGKILL, no graceful shutdown.
    node.child.start_kill().unwrap();
    node.child.wait().await.unwrap();
    drop(slow_conn);

    let node = spawn_node(tmp.path(), &[]).await;
    for (proto, id) in [(Protocol::V5, "off5"), (Protocol::V4, "off4"), (Protocol::V5, "slow5")] {
        let mut c = if id == "slow5" { slow.clone() } else { persistent(proto, id) };
        c.clean_start = false;
        let (mut s, ack) = Raw::session(node.addr, c).await;
        assert!(ack.session_present, "{id}: session restored");
        let got = receive_all(&mut s, 2 * n as usize).await;
        in_order(&got, "a", n);
        in_order(&got, "b", n);
        // Nothing more than what was published.
        assert!(s.sync().await.iter().all(|p| !matches!(p, Packet::Publish(m) if !m.topic.starts_with("$SYS"))), "{id}: extra messages");
    }
    let mut r = Raw::v5(node.addr, "retained-reader").await;
    r.sub("r/#", QoS::AtLeastOnce).await;
    let m = r.recv_publish().await;
    assert_eq!((&*m.topic, &m.payload[..]), ("r/keep", &b"keep"[..]));
    r.send(Packet::PubAck(Ack::new(m.pkid, 0))).await;
    let rest = r.sync().await;
    assert!(!rest.iter().any(|p| matches!(p, Packet::Publish(_))), "the deleted retained message stays deleted: {rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_state_store_refuses_to_start_and_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    let node = spawn_node(tmp.path(), &[]).await;
    let (mut s, _) = Raw::session(node.addr, persistent(Protocol::V5, "keeps")).await;
    s.sub("x/#", QoS::AtLeastOnce).await;
    drop(s);
    drop(node);
    // Overwrite the store's own files with garbage (the journal keeps its tail checks; the
    // version marker and manifests are what a torn copy or a foreign file damages).
    let state = tmp.path().join("state");
    let mut damaged = 0;
    for e in walk(&state) {
        let name = e.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        if !name.ends_with(".lock") && std::fs::metadata(&e).map(|m| m.len() > 0).unwrap_or(false) {
            std::fs::write(&e, b"not a state store file at all, garbage garbage garbage").unwrap();
            damaged += 1;
        }
    }
    assert!(damaged > 0, "no store files found in {}", state.display());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_thingsd"))
        .env("THINGSD_NODE__DATA_DIR", tmp.path())
        .env("THINGSD_LISTENERS__TCP", "[{bind=\"127.0.0.1:0\", allow_anonymous=true}]")
        .env("THINGSD_LISTENERS__WS", "[]")
        .env("THINGSD_LISTENERS__HTTP", "[]")
        .env("THINGSD_LISTENERS__COAP", "[]")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(!out.status.success(), "started on a damaged store");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&state.display().to_string()), "the error names the store: {text}");
    assert!(!text.contains("thingsd ready"), "{text}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
