//! Interoperability with real third-party clients: rumqttc (3.1.1 and 5.0) and the
//! mosquitto_pub / mosquitto_sub command-line tools.

use std::process::Stdio;
use std::time::Duration;

use crate::common::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

fn v4_client(node: &Node, id: &str, clean: bool) -> (rumqttc::AsyncClient, mpsc::UnboundedReceiver<rumqttc::Event>) {
    let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", node.tcp.port());
    o.set_clean_session(clean);
    o.set_keep_alive(Duration::from_secs(30));
    let (c, mut el) = rumqttc::AsyncClient::new(o, 100);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(e) = el.poll().await {
            if tx.send(e).is_err() {
                break;
            }
        }
    });
    (c, rx)
}

async fn next_v4_publish(rx: &mut mpsc::UnboundedReceiver<rumqttc::Event>) -> rumqttc::Publish {
    loop {
        match tokio::time::timeout(DEADLINE, rx.recv()).await.expect("event in time").expect("event loop alive") {
            rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) if !p.topic.starts_with("$SYS") => return p,
            _ => {}
        }
    }
}

async fn wait_v4<F: Fn(&rumqttc::Packet) -> bool>(rx: &mut mpsc::UnboundedReceiver<rumqttc::Event>, f: F) {
    loop {
        if let rumqttc::Event::Incoming(p) = tokio::time::timeout(DEADLINE, rx.recv()).await.expect("event in time").expect("alive") {
            if f(&p) {
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_v4_qos_retained_will_and_persistent_session() {
    use rumqttc::{LastWill, QoS};
    let node = start(|_| {}).await;
    let (sub, mut srx) = v4_client(&node, "r4-sub", false);
    sub.subscribe("r4/#", QoS::ExactlyOnce).await.unwrap();
    wait_v4(&mut srx, |p| matches!(p, rumqttc::Packet::SubAck(_))).await;
    let (p, mut prx) = v4_client(&node, "r4-pub", true);
    for (i, q) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce].into_iter().enumerate() {
        p.publish(format!("r4/{i}"), q, false, format!("m{i}")).await.unwrap();
        let m = next_v4_publish(&mut srx).await;
        assert_eq!((m.qos, &m.payload[..]), (q, format!("m{i}").as_bytes()));
    }
    p.publish("r4/keep", QoS::AtLeastOnce, true, "retained").await.unwrap();
    next_v4_publish(&mut srx).await;
    wait_v4(&mut prx, |p| matches!(p, rumqttc::Packet::PubAck(_))).await;
    let (late, mut lrx) = v4_client(&node, "r4-late", true);
    late.subscribe("r4/keep", QoS::AtMostOnce).await.unwrap();
    let m = next_v4_publish(&mut lrx).await;
    assert!(m.retain);
    // Will on abnormal close.
    let mut o = rumqttc::MqttOptions::new("r4-will", "127.0.0.1", node.tcp.port());
    o.set_last_will(LastWill::new("r4/will", "bye", QoS::AtLeastOnce, false));
    let (_wc, mut wel) = rumqttc::AsyncClient::new(o, 10);
    loop {
        if let rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) = wel.poll().await.unwrap() {
            break;
        }
    }
    drop(wel); // socket dropped without DISCONNECT
    let m = next_v4_publish(&mut srx).await;
    assert_eq!((&*m.topic, &m.payload[..]), ("r4/will", &b"bye"[..]));
    // Persistent session: messages published while the subscriber is away arrive on return.
    // Gone for sure before the next message: a client still reading would take (and
    // acknowledge) it on its old connection. Its event loop ends once the DISCONNECT is out.
    sub.disconnect().await.unwrap();
    while tokio::time::timeout(DEADLINE, srx.recv()).await.expect("the old event loop ends").is_some() {}
    let (p2, mut p2rx) = v4_client(&node, "r4-pub2", true);
    let (probe, mut probe_rx) = v4_client(&node, "r4-probe", true);
    probe.subscribe("r4/offline", QoS::AtLeastOnce).await.unwrap();
    wait_v4(&mut probe_rx, |p| matches!(p, rumqttc::Packet::SubAck(_))).await;
    p2.publish("r4/offline", QoS::AtLeastOnce, false, "while away").await.unwrap();
    wait_v4(&mut p2rx, |p| matches!(p, rumqttc::Packet::PubAck(_))).await;
    next_v4_publish(&mut probe_rx).await;
    let (_sub, mut srx) = v4_client(&node, "r4-sub", false);
    loop {
        let m = next_v4_publish(&mut srx).await;
        if &m.payload[..] == b"while away" {
            break;
        }
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_v5_roundtrip_with_properties() {
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let node = start(|_| {}).await;
    let mut o = MqttOptions::new("r5-sub", "127.0.0.1", node.tcp.port());
    o.set_keep_alive(Duration::from_secs(30));
    let (sub, mut sel) = AsyncClient::new(o, 100);
    let mut o = MqttOptions::new("r5-pub", "127.0.0.1", node.tcp.port());
    o.set_keep_alive(Duration::from_secs(30));
    let (p, mut pel) = AsyncClient::new(o, 100);
    tokio::spawn(async move { while pel.poll().await.is_ok() {} });
    sub.subscribe("r5/#", QoS::AtLeastOnce).await.unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = tokio::time::timeout(DEADLINE, sel.poll()).await.unwrap().unwrap() {
            break;
        }
    }
    let props = PublishProperties {
        response_topic: Some("r5/reply".into()),
        user_properties: vec![("k".into(), "v".into())],
        ..Default::default()
    };
    p.publish_with_properties("r5/x", QoS::ExactlyOnce, false, "hello5", props).await.unwrap();
    let m = loop {
        if let Event::Incoming(Packet::Publish(m)) = tokio::time::timeout(DEADLINE, sel.poll()).await.unwrap().unwrap() {
            break m;
        }
    };
    assert_eq!((&m.topic[..], &m.payload[..], m.qos), (&b"r5/x"[..], &b"hello5"[..], QoS::AtLeastOnce));
    let got = m.properties.unwrap();
    assert_eq!(got.response_topic.as_deref(), Some("r5/reply"));
    assert_eq!(got.user_properties, vec![("k".to_string(), "v".to_string())]);
    node.stop().await;
}

fn have(cmd: &str) -> bool {
    std::process::Command::new("sh").arg("-c").arg(format!("command -v {cmd}")).output().map(|o| o.status.success()).unwrap_or(false)
}

async fn mosquitto_sub(node: &Node, args: &[&str]) -> (tokio::process::Child, tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) {
    assert!(have("mosquitto_sub"), "mosquitto_sub is required (Debian package mosquitto-clients; .ci/run installs it)");
    let port = node.tcp.port().to_string();
    // stdbuf: mosquitto_sub block-buffers stdout into a pipe; we need each line as it happens.
    let mut child = Command::new("stdbuf")
        .args(["-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", &port, "-d", "-W", "20"])
        .args(args)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // -d prints protocol events; the SUBACK line means the subscription is in place.
    loop {
        let l = tokio::time::timeout(DEADLINE, lines.next_line()).await.expect("SUBACK in time").unwrap().expect("mosquitto_sub output");
        if l.contains("SUBACK") {
            break;
        }
    }
    (child, lines)
}

async fn mosquitto_pub(node: &Node, args: &[&str]) {
    assert!(have("mosquitto_pub"), "mosquitto_pub is required (Debian package mosquitto-clients; .ci/run installs it)");
    let port = node.tcp.port().to_string();
    let st = tokio::time::timeout(DEADLINE, Command::new("mosquitto_pub").args(["-h", "127.0.0.1", "-p", &port]).args(args).status())
        .await
        .unwrap()
        .unwrap();
    assert!(st.success(), "mosquitto_pub {args:?} failed");
}

async fn next_message(lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> String {
    loop {
        let l = tokio::time::timeout(DEADLINE, lines.next_line()).await.expect("line in time").unwrap().expect("output");
        if !l.starts_with("Client ") && !l.starts_with("Subscribed ") {
            return l;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_cli_v311_and_v5() {
    let node = start(|_| {}).await;
    for (ver, qos) in [("mqttv311", "0"), ("mqttv311", "1"), ("mqttv311", "2"), ("mqttv5", "1"), ("mqttv5", "2")] {
        let (mut child, mut lines) = mosquitto_sub(&node, &["-V", ver, "-q", qos, "-t", "cli/#", "-v", "-C", "1"]).await;
        mosquitto_pub(&node, &["-V", ver, "-q", qos, "-t", &format!("cli/{ver}/{qos}"), "-m", "hello there"]).await;
        assert_eq!(next_message(&mut lines).await, format!("cli/{ver}/{qos} hello there"));
        let st = tokio::time::timeout(DEADLINE, child.wait()).await.unwrap().unwrap();
        assert!(st.success());
    }
    // Retained via the CLI, read back by a later subscriber.
    mosquitto_pub(&node, &["-t", "cli/retained", "-m", "kept", "-r", "-q", "1"]).await;
    let (_c, mut lines) = mosquitto_sub(&node, &["-t", "cli/retained", "-v", "-C", "1"]).await;
    assert_eq!(next_message(&mut lines).await, "cli/retained kept");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_python_interop() {
    let ok = std::process::Command::new("python3").args(["-c", "import paho.mqtt"]).status().map(|s| s.success()).unwrap_or(false);
    assert!(ok, "Python paho-mqtt is required (pip install paho-mqtt; scripts/test installs it)");
    let node = start(|_| {}).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/paho/interop.py");
    let out = tokio::time::timeout(Duration::from_secs(60), Command::new("python3").arg(script).arg(node.tcp.port().to_string()).output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("OK paho interop"), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    node.stop().await;
}
