//! Alert rules end to end: MQTT telemetry → rule actor → alert raised after its duration →
//! webhook (HMAC-signed, retried), e-mail to a local SMTP sink and a command to the device →
//! acknowledged → cleared with hysteresis; no-data rules; a rule surviving a restart; and on a
//! cluster, a rule fed from another node and moving when its node is killed.
use crate::common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::common::platform::*;
use crate::common::{Raw, DEADLINE};
use hmac::Mac;
use serde_json::{json, Value};
use thingsd::protocols::mqtt::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

const SECRET: &str = "hook-secret";

/// A webhook receiver: answers 500 to the first `fail` requests, then 200; passes on
/// (signature header, body) of each request it accepted.
struct Hook {
    addr: SocketAddr,
    rx: mpsc::UnboundedReceiver<(Option<String>, Value)>,
    hits: Arc<AtomicUsize>,
}

async fn hook(fail: usize) -> Hook {
    let (tx, rx) = mpsc::unbounded_channel();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let (tx, h) = (tx.clone(), h.clone());
            async move {
                if h.fetch_add(1, Ordering::SeqCst) < fail {
                    return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                }
                let sig = headers.get("x-thingsd-signature").and_then(|v| v.to_str().ok()).map(str::to_string);
                let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
                mac.update(body.as_bytes());
                let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
                assert_eq!(sig.as_deref(), Some(want.as_str()), "webhook signature");
                let _ = tx.send((sig, serde_json::from_str(&body).unwrap()));
                axum::http::StatusCode::OK
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    Hook { addr, rx, hits }
}

impl Hook {
    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// The next notification with event `event` (others are skipped), within the deadline.
    async fn next(&mut self, event: &str) -> Value {
        let end = tokio::time::Instant::now() + DEADLINE * 2;
        loop {
            let (_, v) = tokio::time::timeout_at(end, self.rx.recv()).await.unwrap_or_else(|_| panic!("no {event} webhook")).unwrap();
            if v["event"] == event {
                return v;
            }
        }
    }
}

/// How a TLS sink speaks: STARTTLS offered in EHLO, or TLS from the first byte.
#[derive(Clone, Copy, PartialEq)]
enum SinkTls {
    StartTls,
    Implicit,
}

/// A local SMTP sink, with TLS when given a server config: passes on (DATA, whether it came over
/// TLS) for each message.
async fn smtp_sink_with(tls: Option<(SinkTls, Arc<rustls::ServerConfig>)>) -> (SocketAddr, mpsc::UnboundedReceiver<(String, bool)>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (tx, tls) = (tx.clone(), tls.clone());
            tokio::spawn(async move {
                let Some((mode, cfg)) = tls else {
                    smtp_dialog(&mut BufReader::new(s), true, false, false, &tx).await;
                    return;
                };
                let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                if mode == SinkTls::Implicit {
                    let Ok(t) = acceptor.accept(s).await else { return };
                    smtp_dialog(&mut BufReader::new(t), true, false, true, &tx).await;
                    return;
                }
                let mut plain = BufReader::new(s);
                if smtp_dialog(&mut plain, true, true, false, &tx).await {
                    let Ok(t) = acceptor.accept(plain.into_inner()).await else { return };
                    // After STARTTLS the client starts over with EHLO; no second greeting.
                    smtp_dialog(&mut BufReader::new(t), false, false, true, &tx).await;
                }
            });
        }
    });
    (addr, rx)
}

/// One SMTP conversation until QUIT, the end of input, or STARTTLS (returns true: the caller
/// switches the stream to TLS).
async fn smtp_dialog<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    greet: bool,
    offer_starttls: bool,
    secure: bool,
    tx: &mpsc::UnboundedSender<(String, bool)>,
) -> bool {
    if greet && s.get_mut().write_all(b"220 sink ESMTP\r\n").await.is_err() {
        return false;
    }
    let mut line = String::new();
    loop {
        line.clear();
        if s.read_line(&mut line).await.unwrap_or(0) == 0 {
            return false;
        }
        let cmd = line.trim_end().to_ascii_uppercase();
        let answer: &[u8] = if cmd.starts_with("EHLO") && offer_starttls {
            b"250-sink\r\n250 STARTTLS\r\n"
        } else if cmd.starts_with("STARTTLS") && offer_starttls {
            let _ = s.get_mut().write_all(b"220 go ahead\r\n").await;
            return true;
        } else if cmd.starts_with("DATA") {
            let _ = s.get_mut().write_all(b"354 go on\r\n").await;
            let mut data = String::new();
            loop {
                line.clear();
                if s.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return false;
                }
                if line.trim_end() == "." {
                    break;
                }
                data.push_str(line.trim_end());
                data.push('\n');
            }
            let _ = tx.send((data, secure));
            b"250 queued\r\n"
        } else if cmd.starts_with("QUIT") {
            let _ = s.get_mut().write_all(b"221 bye\r\n").await;
            return false;
        } else {
            b"250 ok\r\n"
        };
        if s.get_mut().write_all(answer).await.is_err() {
            return false;
        }
    }
}

fn fast(c: &mut thingsd::config::Config) {
    c.alerts.tick_ms = 100;
    c.alerts.reconcile_ms = 200;
    // The test's webhook and SMTP sinks listen on loopback, which channels may not reach by default.
    c.alerts.allowed_networks = vec!["127.0.0.0/8".parse().unwrap()];
}

/// Wait until rule `id`'s actor runs on the node at `addr`.
async fn rule_running(http: &reqwest::Client, addr: SocketAddr, id: i64) {
    poll_admin(http, addr, &format!("/admin/v1/actors/alert:{id}"), |v| {
        v.get("error").is_none() && v["actors"].as_array().is_none_or(|a| !a.is_empty())
    })
    .await;
}

async fn open_alerts(http: &reqwest::Client, addr: SocketAddr, rule: i64) -> Vec<Value> {
    let (s, v) = admin(http, addr, "GET", &format!("/api/v1/alerts?rule_id={rule}&open=1"), None).await;
    assert_eq!(s, 200, "{v}");
    v["items"].as_array().unwrap().clone()
}

async fn wait_open(http: &reqwest::Client, addr: SocketAddr, rule: i64, n: usize) -> Vec<Value> {
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let v = open_alerts(http, addr, rule).await;
        if v.len() == n {
            return v;
        }
        assert!(tokio::time::Instant::now() < end, "rule {rule} has {} open alerts, expected {n}: {v:?}", v.len());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn telemetry(d: &mut Raw, pkid: u16, v: Value) {
    // 0x10 "no matching subscribers" is success too.
    let code = pub1(d, "devices/telemetry", pkid, &v.to_string()).await;
    assert!(code == 0 || code == reason::NO_MATCHING_SUBSCRIBERS, "PUBACK {code:#x}");
}

#[tokio::test(flavor = "multi_thread")]
async fn alert_lifecycle_with_duration_hysteresis_and_notifications() {
    let p = Platform::start(None, fast).await;
    let (a, http) = (p.http_addr(), &p.http);
    let mut hook = hook(2).await;
    let (smtp, mut mail) = smtp_sink_with(None).await;
    let (_, token) = p.create_device("al-1", json!({})).await;
    let (s, wh) = p
        .admin(
            "POST",
            "/api/v1/channels",
            Some(json!({"name": "ops-hook", "kind": "webhook", "config": {"url": hook.url(), "secret": SECRET}})),
        )
        .await;
    assert_eq!(s, 201, "{wh}");
    assert_eq!(wh["config"]["secret"], "********", "secrets are not shown");
    let (s, em) = p.admin("POST", "/api/v1/channels", Some(json!({"name": "ops-mail", "kind": "email", "config": {"smtp_host": "127.0.0.1", "smtp_port": smtp.port(), "from": "thingsd@example.com", "to": ["oncall@example.com"]}}))).await;
    assert_eq!(s, 201, "{em}");
    // Bad rules are refused with the reason.
    let (s, v) = p
        .admin(
            "POST",
            "/api/v1/alert-rules",
            Some(json!({"name": "bad", "target": {"device": "al-1"}, "condition": {"key": "temp", "op": "between", "value": 3}})),
        )
        .await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("invalid")), "{v}");
    let rule = json!({
        "name": "hot", "severity": "critical", "target": {"device": "al-1"},
        "condition": {"key": "temp", "op": ">", "value": 80}, "duration_secs": 2,
        "clear": {"key": "temp", "op": "<", "value": 75},
        "channels": [wh["id"], em["id"]], "command": {"method": "fan_on", "params": {"speed": 3}},
        "message": "{device} is hot: {value:temp}"
    });
    let (s, r) = p.admin("POST", "/api/v1/alert-rules", Some(rule)).await;
    assert_eq!(s, 201, "{r}");
    let rid = r["id"].as_i64().unwrap();
    rule_running(http, a, rid).await;

    let mut d = device(p.node.tcp, Protocol::V5, "al-1", &token).await;
    assert_eq!(sub(&mut d, "devices/command/al-1/+").await, vec![1]);
    telemetry(&mut d, 1, json!({"temp": 85})).await;
    let raised = wait_open(http, a, rid, 1).await.remove(0);
    assert_eq!((raised["status"].as_str(), raised["severity"].as_str()), (Some("active"), Some("critical")));
    assert_eq!(raised["message"], "al-1 is hot: 85");
    // Raised only once the condition held for the duration.
    let held = raised["raised_ms"].as_i64().unwrap() - raised["since_ms"].as_i64().unwrap();
    assert!(held >= 2000, "raised after {held} ms");
    // Notified: the webhook (after two failed attempts, retried), the e-mail, the device's command.
    let n = hook.next("alert.raised").await;
    assert_eq!(n["alert"]["id"], raised["id"]);
    assert!(hook.hits.load(Ordering::SeqCst) >= 3);
    let (m, _) = tokio::time::timeout(DEADLINE, mail.recv()).await.expect("an e-mail").unwrap();
    assert!(m.contains("Subject: [critical] hot on al-1: raised"), "{m}");
    let cmd = next_with_prefix(&mut d, "devices/command/al-1/").await;
    assert_eq!(json_of(&cmd)["method"], "fan_on");

    // More hot readings: still one alert (no storm). 78 is not below the clear threshold.
    telemetry(&mut d, 2, json!({"temp": 95})).await;
    telemetry(&mut d, 3, json!({"temp": 78})).await;
    let t_cool = thingsd::storage::meta::now_ms();
    assert_eq!(wait_open(http, a, rid, 1).await[0]["id"], raised["id"]);

    // Acknowledge (a tenant user may: alert:ack), then cool down: cleared, kept in history.
    let (s, _) =
        p.admin("POST", "/api/v1/users", Some(json!({"username": "watcher", "password": "watcher-pw", "role": "tenant_user"}))).await;
    assert_eq!(s, 201);
    let watcher = login_user(http, a, "watcher", "watcher-pw").await["access_token"].as_str().unwrap().to_string();
    let (s, v) = call(
        http,
        a,
        &watcher,
        "POST",
        "/api/v1/alert-rules",
        Some(json!({"name": "x", "target": {"device": "al-1"}, "condition": {"no_data_secs": 5}})),
    )
    .await;
    assert_eq!((s, v["error"]["code"].as_str()), (403, Some("forbidden")));
    let (s, acked) = call(http, a, &watcher, "POST", &format!("/api/v1/alerts/{}/ack", raised["id"]), None).await;
    assert_eq!((s, acked["status"].as_str(), acked["acked_by"].as_str()), (200, Some("acknowledged"), Some("user:watcher")), "{acked}");
    assert_eq!(call(http, a, &watcher, "POST", &format!("/api/v1/alerts/{}/ack", raised["id"]), None).await.0, 409);
    hook.next("alert.acknowledged").await;
    telemetry(&mut d, 4, json!({"temp": 70})).await;
    wait_open(http, a, rid, 0).await;
    let (_, cleared) = p.admin("GET", &format!("/api/v1/alerts/{}", raised["id"]), None).await;
    assert_eq!(cleared["status"], "cleared");
    assert!(cleared["cleared_ms"].as_i64().unwrap() >= t_cool, "cleared by 78, inside the hysteresis band");
    hook.next("alert.cleared").await;
    let (_, hist) = p.admin("GET", &format!("/api/v1/alerts?rule_id={rid}"), None).await;
    assert_eq!(hist["total"], 1);

    // No data: a silent device raises after the time, and its next message clears it.
    let (s, r2) = p
        .admin(
            "POST",
            "/api/v1/alert-rules",
            Some(json!({"name": "silent", "target": {"device": "al-1"}, "condition": {"no_data_secs": 1}, "channels": [wh["id"]]})),
        )
        .await;
    assert_eq!(s, 201, "{r2}");
    let r2 = r2["id"].as_i64().unwrap();
    wait_open(http, a, r2, 1).await;
    telemetry(&mut d, 5, json!({"temp": 71})).await;
    wait_open(http, a, r2, 0).await;

    // Offline for a second: raised after the device goes away, cleared when it is back.
    let (s, r3) = p
        .admin("POST", "/api/v1/alert-rules", Some(json!({"name": "gone", "target": {"device": "al-1"}, "condition": {"offline_secs": 1}})))
        .await;
    assert_eq!(s, 201, "{r3}");
    let r3 = r3["id"].as_i64().unwrap();
    rule_running(http, a, r3).await;
    let t_off = thingsd::storage::meta::now_ms();
    d.send(common::disconnect()).await;
    drop(d);
    wait_online(http, a, "al-1", false).await;
    let off = wait_open(http, a, r3, 1).await.remove(0);
    let after = off["raised_ms"].as_i64().unwrap() - t_off;
    assert!(after >= 1000, "raised {after} ms after the device left");
    let _d = device(p.node.tcp, Protocol::V5, "al-1", &token).await;
    wait_open(http, a, r3, 0).await;
    p.node.stop().await;
}

/// A CA and a server certificate it signed for 127.0.0.1: (CA PEM, server config).
fn relay_tls() -> (String, Arc<rustls::ServerConfig>) {
    thingsd::server::install_crypto();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(vec![]).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".into()]).unwrap().signed_by(&key, &ca, &ca_key).unwrap();
    let cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap())
        .unwrap();
    (ca.pem(), Arc::new(cfg))
}

async fn notifications(addr: SocketAddr, outcome: &str) -> u64 {
    let (_, text) = common::http_get(addr, "/metrics").await;
    let want = format!("thingsd_alert_notifications_total{{outcome=\"{outcome}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(want.as_str())).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// E-mail channels over TLS: STARTTLS when the relay offers it (the default), implicit TLS,
/// a relay's certificate checked against the channel's CA; a relay that does not offer
/// STARTTLS when it is required, or whose certificate nobody vouches for, gets nothing.
#[tokio::test(flavor = "multi_thread")]
async fn email_over_tls() {
    let p = Platform::start(None, |c| {
        fast(c);
        c.alerts.notify_attempts = 1;
    })
    .await;
    let a = p.http_addr();
    let (ca_pem, tls) = relay_tls();
    let (starttls, mut starttls_mail) = smtp_sink_with(Some((SinkTls::StartTls, tls.clone()))).await;
    let (implicit, mut implicit_mail) = smtp_sink_with(Some((SinkTls::Implicit, tls))).await;
    let (plain, mut plain_mail) = smtp_sink_with(None).await;
    let channel = |name: &str, port: u16, extra: Value| {
        let mut config = json!({"smtp_host": "127.0.0.1", "smtp_port": port, "from": "thingsd@example.com", "to": ["oncall@example.com"]});
        config.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        json!({"name": name, "kind": "email", "config": config})
    };
    // Bad TLS settings are refused with the reason.
    for bad in [json!({"tls": "sometimes"}), json!({"ca_pem": "not a certificate"}), json!({"accept_invalid_certs": "yes"})] {
        let (s, v) = p.admin("POST", "/api/v1/channels", Some(channel("bad", 25, bad))).await;
        assert_eq!((s, v["error"]["code"].as_str()), (400, Some("invalid")), "{v}");
    }
    let mut ids = vec![];
    for ch in [
        channel("opportunistic", starttls.port(), json!({"ca_pem": ca_pem})),
        channel("implicit", implicit.port(), json!({"tls": "tls", "ca_pem": ca_pem})),
        channel("required-but-not-offered", plain.port(), json!({"tls": "starttls", "ca_pem": ca_pem})),
        channel("unknown-ca", starttls.port(), json!({"tls": "starttls"})),
    ] {
        let (s, v) = p.admin("POST", "/api/v1/channels", Some(ch)).await;
        assert_eq!(s, 201, "{v}");
        ids.push(v["id"].clone());
    }
    let (_, token) = p.create_device("al-tls", json!({})).await;
    let (s, r) = p
        .admin(
            "POST",
            "/api/v1/alert-rules",
            Some(json!({"name": "hot", "target": {"device": "al-tls"}, "condition": {"key": "t", "op": ">", "value": 1}, "channels": ids})),
        )
        .await;
    assert_eq!(s, 201, "{r}");
    let rid = r["id"].as_i64().unwrap();
    rule_running(&p.http, a, rid).await;
    let mut d = device(p.node.tcp, Protocol::V5, "al-tls", &token).await;
    telemetry(&mut d, 1, json!({"t": 5})).await;
    wait_open(&p.http, a, rid, 1).await;

    let (m, secure) = tokio::time::timeout(DEADLINE, starttls_mail.recv()).await.expect("an e-mail after STARTTLS").unwrap();
    assert!(secure && m.contains("Subject: [major] hot on al-tls: raised"), "{secure} {m}");
    let (m, secure) = tokio::time::timeout(DEADLINE, implicit_mail.recv()).await.expect("an e-mail over TLS").unwrap();
    assert!(secure && m.contains("al-tls"), "{m}");
    // The other two fail (one attempt each here) and send nothing.
    let end = tokio::time::Instant::now() + DEADLINE;
    while notifications(a, "failed").await < 2 {
        assert!(tokio::time::Instant::now() < end, "the two refused deliveries were not counted as failed");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // A delivery counts as sent once the relay's session is over, a moment after the sink
    // has the mail.
    while notifications(a, "sent").await < 2 {
        assert!(tokio::time::Instant::now() < end, "the two deliveries were not counted as sent");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(notifications(a, "sent").await, 2);
    assert!(plain_mail.try_recv().is_err(), "nothing sent in the clear when STARTTLS is required");
    assert!(starttls_mail.try_recv().is_err(), "nothing sent to a relay whose certificate is not trusted");
    p.node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn open_alerts_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        common::start_in(dir.path().to_path_buf(), |c| {
            configure(c, None);
            fast(c);
        })
    };
    let node = start().await;
    let http = client();
    let a = node.http.unwrap();
    let (_, token) = create_device(&http, a, "al-r", json!({})).await;
    let (s, r) = admin(
        &http,
        a,
        "POST",
        "/api/v1/alert-rules",
        Some(json!({"name": "hot", "target": {"device": "al-r"}, "condition": {"key": "t", "op": ">=", "value": 50}})),
    )
    .await;
    assert_eq!(s, 201, "{r}");
    let rid = r["id"].as_i64().unwrap();
    rule_running(&http, a, rid).await;
    let mut d = device(node.tcp, Protocol::V5, "al-r", &token).await;
    telemetry(&mut d, 1, json!({"t": 55})).await;
    let before = wait_open(&http, a, rid, 1).await;
    drop(d);
    node.stop().await;

    let node = start().await;
    let a = node.http.unwrap();
    rule_running(&http, a, rid).await;
    assert_eq!(wait_open(&http, a, rid, 1).await[0]["id"], before[0]["id"]);
    let mut d = device(node.tcp, Protocol::V5, "al-r", &token).await;
    // The restarted rule knows its open alert: a higher reading raises nothing new, a low one clears it.
    telemetry(&mut d, 1, json!({"t": 60})).await;
    telemetry(&mut d, 2, json!({"t": 10})).await;
    wait_open(&http, a, rid, 0).await;
    let (_, hist) = admin(&http, a, "GET", &format!("/api/v1/alerts?rule_id={rid}"), None).await;
    assert_eq!(hist["total"], 1);
    node.stop().await;
}

/// Three nodes on one PostgreSQL: the rule runs on one node, is fed by a device on another,
/// and moves when its node is killed (the new owner clears the alert the old one raised).
#[tokio::test(flavor = "multi_thread")]
async fn rule_moves_when_its_node_is_killed() {
    let Some(pg) = common::backends::postgres().await else { return };
    let mut hook = hook(0).await;
    let mut cl = common::cluster::TestCluster::start_some(3, 3, move |_| {
        format!("\n[meta]\nurl = \"{pg}\"\n\n[devices]\nadmin_key = \"{ADMIN_KEY}\"\n\n[alerts]\ntick_ms = 100\nreconcile_ms = 200\nallowed_networks = [\"127.0.0.0/8\"]\n")
    })
    .await;
    let http = client();
    let n1 = cl.http(0);
    let (_, token) = create_device(&http, n1, "mv-1", json!({})).await;
    let (s, ch) = admin(
        &http,
        n1,
        "POST",
        "/api/v1/channels",
        Some(json!({"name": "h", "kind": "webhook", "config": {"url": hook.url(), "secret": SECRET}})),
    )
    .await;
    assert_eq!(s, 201, "{ch}");
    let (s, r) = admin(
        &http,
        n1,
        "POST",
        "/api/v1/alert-rules",
        Some(
            json!({"name": "hot", "target": {"device": "mv-1"}, "condition": {"key": "t", "op": ">", "value": 50}, "channels": [ch["id"]]}),
        ),
    )
    .await;
    assert_eq!(s, 201, "{r}");
    let rid = r["id"].as_i64().unwrap();
    let owner = r["node"].as_str().unwrap().to_string();
    let oi = cl.nodes.iter().position(|n| n.name == owner).expect("the owner is a node");
    let other = (oi + 1) % 3;
    rule_running(&http, cl.http(oi), rid).await;
    // The device is on another node: its values travel to the rule's node.
    let mut d = device(cl.mqtt(other), Protocol::V5, "mv-1", &token).await;
    telemetry(&mut d, 1, json!({"t": 70})).await;
    let raised = hook.next("alert.raised").await;
    assert_eq!(raised["alert"]["device_number"], "mv-1");

    cl.kill(oi).await;
    cl.wait_members(other, 2).await;
    let new_owner =
        common::platform::poll_admin(&http, cl.http(other), &format!("/api/v1/alert-rules/{rid}"), |v| v["node"] != json!(owner)).await
            ["node"]
            .as_str()
            .unwrap()
            .to_string();
    let ni = cl.nodes.iter().position(|n| n.name == new_owner).unwrap();
    rule_running(&http, cl.http(ni), rid).await;
    telemetry(&mut d, 2, json!({"t": 20})).await;
    let cleared = hook.next("alert.cleared").await;
    assert_eq!(cleared["alert"]["id"], raised["alert"]["id"]);
    telemetry(&mut d, 3, json!({"t": 90})).await;
    let again = hook.next("alert.raised").await;
    assert_ne!(again["alert"]["id"], raised["alert"]["id"]);
}
