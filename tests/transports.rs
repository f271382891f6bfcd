//! WebSocket (path /mqtt, subprotocol mqtt) and TLS listeners, with several listeners at once.

use std::sync::Arc;

use crate::common::*;
use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use thingsd::protocols::mqtt::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as Ws;

fn bytes_of(p: &Packet, protocol: Protocol) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode(p, protocol, &mut b);
    b.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_and_tls_listeners() {
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key, der) = tls_files(tmp.path());
    let node = start(|c| {
        c.listeners.tls = vec![tls_listener(cert, key)];
        // A second TCP listener: several of each kind may be configured.
        c.listeners.tcp.push(thingsd::config::TcpListenerConfig::new("127.0.0.1:0".parse().unwrap()));
    })
    .await;

    // WebSocket subscriber.
    let mut req = format!("ws://{}/mqtt", node.ws).into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let (mut ws, resp) = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(req)).await.unwrap().unwrap();
    assert_eq!(resp.headers().get("Sec-WebSocket-Protocol").unwrap(), "mqtt");
    ws.send(Ws::Binary(bytes_of(&connect5("ws-client", true), Protocol::V5).into())).await.unwrap();
    ws.send(Ws::Binary(bytes_of(&subscribe(1, "tr/#", QoS::AtMostOnce), Protocol::V5).into())).await.unwrap();
    let mut wbuf = BytesMut::new();
    let mut ws_next = async |ws: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>| loop {
        if let Some(p) = decode(&mut wbuf, Protocol::V5, usize::MAX).unwrap() {
            if !matches!(&p, Packet::Publish(x) if x.topic.starts_with("$SYS")) {
                return p;
            }
            continue;
        }
        if let Ws::Binary(b) = tokio::time::timeout(DEADLINE, ws.next()).await.unwrap().unwrap().unwrap() {
            wbuf.extend_from_slice(&b)
        }
    };
    assert!(matches!(ws_next(&mut ws).await, Packet::ConnAck(a) if a.code == 0));
    assert!(matches!(ws_next(&mut ws).await, Packet::SubAck(_)));

    // TLS publisher, verifying the server certificate.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(der)).unwrap();
    let cfg = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(node.tls.unwrap()).await.unwrap();
    let mut tls = connector.connect("localhost".try_into().unwrap(), tcp).await.unwrap();
    tls.write_all(&bytes_of(&connect4("tls-client", true), Protocol::V4)).await.unwrap();
    tls.write_all(&bytes_of(&publish("tr/tls", QoS::AtLeastOnce, 1, "over tls"), Protocol::V4)).await.unwrap();
    let mut tbuf = BytesMut::new();
    let mut acks = Vec::new();
    while acks.len() < 2 {
        if let Some(p) = decode(&mut tbuf, Protocol::V4, usize::MAX).unwrap() {
            acks.push(p);
            continue;
        }
        let n = tokio::time::timeout(DEADLINE, tls.read_buf(&mut tbuf)).await.unwrap().unwrap();
        assert!(n > 0, "TLS connection closed");
    }
    assert!(matches!(acks[0], Packet::ConnAck(ref a) if a.code == 0));
    assert!(matches!(acks[1], Packet::PubAck(ref a) if a.pkid == 1));
    let m = match ws_next(&mut ws).await {
        Packet::Publish(p) => p,
        other => panic!("{other:?}"),
    };
    assert_eq!((&*m.topic, &m.payload[..]), ("tr/tls", &b"over tls"[..]));

    // The wrong WebSocket path is refused at the handshake.
    let req = format!("ws://{}/elsewhere", node.ws).into_client_request().unwrap();
    assert!(tokio_tungstenite::connect_async(req).await.is_err());
    node.stop().await;
}
