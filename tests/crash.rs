//! kill -9 of a node process: what reached the data directory survives (the README's promise
//! that a crash loses at most the last persist interval).
mod common;

use std::process::Stdio;

use common::*;
use thingsd::protocols::mqtt::*;
use tokio::io::{AsyncBufReadExt, BufReader};

struct Proc {
    child: tokio::process::Child,
    addr: std::net::SocketAddr,
}

async fn spawn_node(dir: &std::path::Path) -> Proc {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_thingsd"))
        .env("THINGSD_LISTENERS__TCP", format!("[{{bind=\"127.0.0.1:{port}\", allow_anonymous=true}}]"))
        .env("THINGSD_LISTENERS__WS", "[]")
        .env("THINGSD_LISTENERS__HTTP", "[]")
        .env("THINGSD_NODE__DATA_DIR", dir.display().to_string())
        .env("THINGSD_NODE__PERSIST_INTERVAL_MS", "100")
        .env("THINGSD_LOG__LEVEL", "info")
        .env("NO_COLOR", "1")
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start thingsd");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let l = tokio::time::timeout(DEADLINE, lines.next_line()).await.expect("ready line in time").unwrap().expect("thingsd exited");
        if l.contains("thingsd ready") {
            break;
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Proc { child, addr: format!("127.0.0.1:{port}").parse().unwrap() }
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
