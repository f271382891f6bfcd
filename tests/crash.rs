//! kill -9 of a node process: what reached the data directory survives (the README's promise
//! that a crash loses at most the last persist interval).

use crate::common::*;
use thingsd::protocols::mqtt::*;

async fn spawn_node(dir: &std::path::Path) -> process::Proc {
    process::spawn(dir, &[("THINGSD_LISTENERS__HTTP", "[]".into()), ("THINGSD_NODE__PERSIST_INTERVAL_MS", "100".into())]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_keeps_what_was_persisted() {
    let tmp = tempfile::tempdir().unwrap();
    let mut node = spawn_node(tmp.path()).await;
    let mut cp = connect_packet(Protocol::V5, "crash-sub", true);
    cp.props.session_expiry_interval = Some(3600);
    let (mut s, _) = Raw::session(node.addr, cp.clone()).await;
    s.sub("crash/#", QoS::AtLeastOnce).await;
    s.send(disconnect()).await;
    s.until_closed().await;
    let mut p = Raw::v5(node.addr, "crash-pub").await;
    for i in 1..=3u16 {
        p.send(publish("crash/t", QoS::AtLeastOnce, i, &format!("payload-{i}-marker"))).await;
        assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
    }
    // Wait (event, not time) until the periodic persister has written the queued messages.
    let file = tmp.path().join("sessions.bin");
    eventually("queued messages persisted", || {
        std::fs::read(&file).map(|b| b.windows(16).any(|w| w == b"payload-3-marker")).unwrap_or(false)
    })
    .await;
    node.child.start_kill().unwrap(); // SIGKILL: no graceful shutdown
    node.child.wait().await.unwrap();

    let node = spawn_node(tmp.path()).await;
    cp.clean_start = false;
    let (mut s, ack) = Raw::session(node.addr, cp).await;
    assert!(ack.session_present);
    for i in 1..=3 {
        let m = s.recv_publish().await;
        assert_eq!(String::from_utf8(m.payload.to_vec()).unwrap(), format!("payload-{i}-marker"));
        s.send(Packet::PubAck(Ack::new(m.pkid, 0))).await;
    }
}
