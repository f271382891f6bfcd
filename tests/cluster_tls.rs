//! Node links over mutually authenticated TLS (certificates signed by a cluster CA), and the
//! cookie: a node with another cookie never joins.

use crate::common::cluster::TestCluster;
use crate::common::*;
use thingsd::protocols::mqtt::*;

/// A CA and a node certificate it signs (for 127.0.0.1 and localhost), as PEM files.
fn cluster_pki(dir: &std::path::Path) -> String {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let node_key = KeyPair::generate().unwrap();
    let node =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap().signed_by(&node_key, &ca, &ca_key).unwrap();
    let (c, k, a) = (dir.join("node.pem"), dir.join("node.key"), dir.join("ca.pem"));
    std::fs::write(&c, node.pem()).unwrap();
    std::fs::write(&k, node_key.serialize_pem()).unwrap();
    std::fs::write(&a, ca.pem()).unwrap();
    format!("tls_cert = \"{}\"\ntls_key = \"{}\"\ntls_ca = \"{}\"\n", c.display(), k.display(), a.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_links_and_cookie() {
    let pki = tempfile::tempdir().unwrap();
    let tls = cluster_pki(pki.path());
    let mut c = TestCluster::start_some(3, 2, move |_| tls.clone()).await;
    let mut s = Raw::v5(c.mqtt(1), "tls-sub").await;
    s.sub("tls/#", QoS::AtLeastOnce).await;
    let mut p = Raw::v5(c.mqtt(0), "tls-pub").await;
    p.send(publish("tls/x", QoS::AtLeastOnce, 1, "over TLS")).await;
    assert!(matches!(p.recv_app().await, Some(Packet::PubAck(_))));
    let m = s.recv_publish().await;
    assert_eq!(&m.payload[..], b"over TLS");

    // Node 3 has the cluster's certificates but another cookie.
    c.env.insert(2, vec![("THINGSD_CLUSTER__COOKIE".into(), "not-the-cluster-cookie".into())]);
    c.spawn(2).await;
    // It dials node 1 and fails authentication; give it a few redial rounds, then check that
    // nobody counts it as a member.
    for _ in 0..10 {
        assert_eq!(c.members_up(2).await, 1, "a node with another cookie joined");
        assert_eq!(c.members_up(0).await, 2);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Garbage on the cluster port (a huge length prefix ractor_cluster would allocate, random
/// bytes, a truncated frame) closes that connection only; the node keeps its members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_port_survives_garbage() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = TestCluster::start(2).await;
    let port = c.nodes[0].ready.cluster.unwrap();
    let mut huge = (1u64 << 62).to_be_bytes().to_vec();
    huge.extend_from_slice(&[0u8; 64]);
    let mut trunc = 100u64.to_be_bytes().to_vec();
    trunc.extend_from_slice(b"short");
    for bytes in [huge, (0..255u8).collect::<Vec<u8>>(), trunc, vec![0xff; 4096]] {
        let mut s = tokio::net::TcpStream::connect(port).await.unwrap();
        let _ = s.write_all(&bytes).await;
        let _ = s.shutdown().await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut sink)).await.expect("the node closes the connection");
    }
    assert_eq!(c.members_up(0).await, 2);
    let mut s = Raw::v5(c.mqtt(1), "g-sub").await;
    s.sub("g/#", QoS::AtMostOnce).await;
    let mut p = Raw::v5(c.mqtt(0), "g-pub").await;
    p.send(publish("g/x", QoS::AtLeastOnce, 1, "still here")).await;
    assert!(matches!(p.recv_app().await, Some(Packet::PubAck(_))));
    assert_eq!(&s.recv_publish().await.payload[..], b"still here");
}
