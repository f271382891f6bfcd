//! Broker webhooks in VerneMQ's shape against a real HTTP endpoint: auth hooks that allow,
//! deny, pass on (`next`) and modify (topic, payload, QoS; subscription topics), answers cached
//! by `cache-control: max-age` (publish answers whatever the payload, as VerneMQ's cache), an endpoint that hangs (the hook's failure policy answers), the
//! 3.1.1 and 5.0 hook names, notifications with VerneMQ's bodies, and a notification endpoint
//! that never answers without slowing the broker (its overflow is counted).
use crate::common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::platform::*;
use crate::common::{disconnect, Raw, DEADLINE};
use base64::Engine;
use serde_json::{json, Value};
use thingsd::protocols::mqtt::*;
use thingsd::webhooks::{OnFailure, WebhookConfig};

type Seen = Arc<Mutex<Vec<(String, Value)>>>;

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A webhook service: decides by username and topic, records every call.
async fn service() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let hooks = axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::Json<Value>| {
        let s = s.clone();
        async move {
            let hook = headers.get("vernemq-hook").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            let b = body.0;
            s.lock().unwrap().push((hook.clone(), b.clone()));
            let topic = b["topic"].as_str().unwrap_or("");
            let first_filter = b["topics"][0]["topic"].as_str().unwrap_or("");
            let mut cache = None;
            let answer = match hook.trim_end_matches("_m5") {
                "auth_on_register" => match b["username"].as_str() {
                    Some("denied") => json!({"result": {"error": "not_allowed"}}),
                    Some("hooked") => {
                        cache = Some("max-age=60");
                        json!({"result": "ok"})
                    }
                    _ => json!({"result": "next"}),
                },
                "auth_on_publish" if topic.starts_with("deny/") => json!({"result": {"error": "not_allowed"}}),
                "auth_on_publish" if topic.starts_with("rewrite/") => {
                    json!({"result": "ok", "modifiers": {"topic": "rewritten/x", "payload": b64("modified"), "qos": 0}})
                }
                "auth_on_publish" if topic.starts_with("cached/") => {
                    cache = Some("max-age=60");
                    json!({"result": "ok", "modifiers": {"payload": b64("first-answer"), "qos": 0}})
                }
                "auth_on_publish" if topic.starts_with("hang/") => {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    json!({"result": "ok"})
                }
                "auth_on_subscribe" if first_filter == "secret/#" => json!({"result": {"error": "not_allowed"}}),
                "auth_on_subscribe" if first_filter == "alias/#" => {
                    json!({"result": "ok", "topics": [{"topic": "rewritten2/#", "qos": 1}]})
                }
                _ => json!({"result": "next"}),
            };
            let mut r = axum::response::IntoResponse::into_response(axum::Json(answer));
            if let Some(c) = cache {
                r.headers_mut().insert("cache-control", c.parse().unwrap());
            }
            r
        }
    });
    // Never answers (a stuck notification endpoint).
    let slow = axum::routing::post(|| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        "late"
    });
    let app = axum::Router::new().route("/hooks", hooks).route("/slow", slow);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (format!("http://{addr}"), seen)
}

fn hook(name: &str, url: &str) -> WebhookConfig {
    WebhookConfig {
        hook: name.into(),
        endpoint: url.into(),
        timeout_ms: 500,
        on_failure: OnFailure::Deny,
        base64_payload: true,
        queue: 1000,
        batch: 8,
    }
}

/// Wait until the service saw a call of `hook` matching `f`; returns its body.
async fn saw(seen: &Seen, hook: &str, f: impl Fn(&Value) -> bool) -> Value {
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some((_, b)) = seen.lock().unwrap().iter().find(|(h, b)| h == hook && f(b)) {
            return b.clone();
        }
        assert!(
            tokio::time::Instant::now() < end,
            "no {hook} call seen; calls: {:?}",
            seen.lock().unwrap().iter().map(|(h, _)| h.clone()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn count(seen: &Seen, hook: &str, user: &str) -> usize {
    seen.lock().unwrap().iter().filter(|(h, b)| h == hook && b["username"] == user).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_hooks_allow_deny_modify_and_notify() {
    let (url, seen) = service().await;
    let u = format!("{url}/hooks");
    let p = Platform::start(None, |c| {
        c.webhooks = [
            "auth_on_register",
            "auth_on_register_m5",
            "auth_on_publish_m5",
            "auth_on_subscribe_m5",
            "on_register_m5",
            "on_publish_m5",
            "on_subscribe_m5",
            "on_unsubscribe_m5",
            "on_deliver_m5",
            "on_client_gone",
            "on_client_offline",
        ]
        .iter()
        .map(|h| hook(h, &u))
        .collect();
    })
    .await;
    let addr = p.node.tcp;

    // Register: denied by the hook; admitted by it (answer cached: asked once for two logins);
    // `next` falls through to the device registry (a device's token works, nonsense does not).
    assert_eq!(login(addr, Protocol::V5, "c-denied", Some("denied"), Some("pw")).await.1, reason::NOT_AUTHORIZED);
    let (mut sub1, code) = login(addr, Protocol::V5, "c-hooked", Some("hooked"), Some("pw")).await;
    assert_eq!(code, 0);
    let (_again, code) = login(addr, Protocol::V5, "c-hooked-2", Some("hooked"), Some("pw")).await;
    assert_eq!(code, 0);
    let body = saw(&seen, "auth_on_register_m5", |b| b["username"] == "hooked").await;
    assert_eq!((body["password"].as_str(), body["clean_start"].as_bool(), body["mountpoint"].as_str()), (Some("pw"), Some(true), Some("")));
    assert_eq!(body["peer_addr"], "127.0.0.1");
    // The second login differs only in client id: a different request, asked again; the
    // third repeats the second (from a new source port): cached.
    let (_third, code) = login(addr, Protocol::V5, "c-hooked-2", Some("hooked"), Some("pw")).await;
    assert_eq!(code, 0);
    assert_eq!(count(&seen, "auth_on_register_m5", "hooked"), 2, "a cached answer is not asked again");
    let (_, token) = p.create_device("wh-dev", json!({})).await;
    assert_eq!(login(addr, Protocol::V5, "c-dev", Some(&token), None).await.1, 0);
    assert_eq!(login(addr, Protocol::V5, "c-nobody", Some("nobody"), Some("x")).await.1, reason::BAD_USERNAME_OR_PASSWORD);
    // 3.1.1 clients call the hook without the _m5 suffix.
    let (_v4, code) = login(addr, Protocol::V4, "c-v4", Some("hooked"), Some("pw")).await;
    assert_eq!(code, 0);
    let v4 = saw(&seen, "auth_on_register", |b| b["client_id"] == "c-v4").await;
    assert_eq!(v4["clean_session"], true);

    // Subscribe: passed on (allowed), refused, rewritten.
    assert_eq!(sub1.sub("rewritten/#", QoS::AtLeastOnce).await, vec![1]);
    assert_eq!(sub1.sub("secret/#", QoS::AtLeastOnce).await, vec![reason::NOT_AUTHORIZED]);
    assert_eq!(sub1.sub("alias/#", QoS::AtMostOnce).await, vec![1], "rewritten to rewritten2/# at QoS 1");

    // Publish: modified (topic, payload, QoS), refused, and an endpoint that hangs (deny).
    let (mut pubr, _) = login(addr, Protocol::V5, "c-pub", Some("hooked"), Some("pw")).await;
    assert_eq!(pub1(&mut pubr, "rewrite/in", 1, "orig").await, 0);
    let m = sub1.recv_publish().await;
    assert_eq!((m.topic.as_str(), &m.payload[..], m.qos), ("rewritten/x", &b"modified"[..], QoS::AtMostOnce));
    assert_eq!(pub1(&mut pubr, "deny/x", 2, "no").await, reason::NOT_AUTHORIZED);
    let t0 = tokio::time::Instant::now();
    assert_eq!(pub1(&mut pubr, "hang/x", 3, "slow").await, reason::NOT_AUTHORIZED);
    assert!(t0.elapsed() < Duration::from_secs(5), "the hook's timeout answered");
    // `next` for other topics: the built-in checks (unrestricted for a webhook-admitted client).
    assert_eq!(pub1(&mut pubr, "rewritten2/a", 4, "plain").await, 0);
    let m = sub1.recv_publish().await;
    assert_eq!((m.topic.as_str(), &m.payload[..]), ("rewritten2/a", &b"plain"[..]));

    // A cached publish answer stands for any payload (VerneMQ's cache key leaves the payload
    // out); its payload modifier is not reused, its other modifiers are.
    assert_eq!(sub1.sub("cached/#", QoS::AtLeastOnce).await, vec![1]);
    assert_eq!(pub1(&mut pubr, "cached/x", 5, "one").await, 0);
    let m = sub1.recv_publish().await;
    assert_eq!((&m.payload[..], m.qos), (&b"first-answer"[..], QoS::AtMostOnce));
    assert_eq!(pub1(&mut pubr, "cached/x", 6, "two").await, 0);
    let m = sub1.recv_publish().await;
    assert_eq!((&m.payload[..], m.qos), (&b"two"[..], QoS::AtMostOnce), "cached: QoS modified, payload not");
    let asked = seen.lock().unwrap().iter().filter(|(h, b)| h == "auth_on_publish_m5" && b["topic"] == "cached/x").count();
    assert_eq!(asked, 1, "the second PUBLISH was answered from the cache");

    // Notifications, in VerneMQ's shapes.
    let r = saw(&seen, "on_register_m5", |b| b["client_id"] == "c-hooked").await;
    assert_eq!((r["username"].as_str(), r["mountpoint"].as_str()), (Some("hooked"), Some("")));
    let pb = saw(&seen, "on_publish_m5", |b| b["topic"] == "rewritten/x").await;
    assert_eq!(
        (pb["payload"].as_str(), pb["qos"].as_u64(), pb["client_id"].as_str()),
        (Some(b64("modified").as_str()), Some(0), Some("c-pub"))
    );
    let sb = saw(&seen, "on_subscribe_m5", |b| b["topics"][0]["topic"] == "rewritten2/#").await;
    assert_eq!(sb["topics"][0]["qos"], 1);
    let dl = saw(&seen, "on_deliver_m5", |b| b["topic"] == "rewritten2/a").await;
    assert_eq!((dl["client_id"].as_str(), dl["payload"].as_str()), (Some("c-hooked"), Some(b64("plain").as_str())));
    sub1.send(Packet::Unsubscribe(Unsubscribe { pkid: 9, filters: vec!["rewritten/#".into()], props: Properties::default() })).await;
    saw(&seen, "on_unsubscribe_m5", |b| b["topics"][0] == "rewritten/#").await;
    sub1.send(disconnect()).await;
    saw(&seen, "on_client_gone", |b| b["client_id"] == "c-hooked").await;
    // A session that outlives its connection goes offline instead.
    let mut c = common::connect_packet(Protocol::V5, "c-persist", false);
    c.username = Some("hooked".into());
    c.password = Some(bytes::Bytes::from_static(b"pw"));
    c.props.session_expiry_interval = Some(600);
    let (mut keep, ack) = Raw::session(addr, c).await;
    assert_eq!(ack.code, 0);
    keep.send(disconnect()).await;
    saw(&seen, "on_client_offline", |b| b["client_id"] == "c-persist").await;

    // Operators see the hooks and their counters.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_thingsctl"))
        .args(["--url", &format!("http://{}", p.http_addr()), "--key", ADMIN_KEY, "--json", "webhooks", "list"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let publish =
        v["items"].as_array().unwrap().iter().find(|i| i["hook"] == "auth_on_publish_m5").expect("auth_on_publish_m5 listed").clone();
    assert!(publish["requests"].as_u64().unwrap() >= 4 && publish["failures"].as_u64().unwrap() >= 1, "{publish}");
    assert_eq!(publish["on_failure"], "deny");
    p.node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stuck_notification_endpoint_never_slows_the_broker() {
    let (url, _seen) = service().await;
    let p = Platform::start(None, |c| {
        c.listeners.tcp[0].allow_anonymous = true;
        let mut h = hook("on_deliver_m5", &format!("{url}/slow"));
        h.queue = 5;
        h.batch = 2;
        h.timeout_ms = 60_000;
        c.webhooks = vec![h];
    })
    .await;
    let mut s = Raw::v5(p.node.tcp, "slow-sub").await;
    assert_eq!(s.sub("load/#", QoS::AtMostOnce).await, vec![0]);
    let mut pb = Raw::v5(p.node.tcp, "slow-pub").await;
    for i in 0..200 {
        pb.send(common::publish("load/x", QoS::AtMostOnce, 0, &i.to_string())).await;
    }
    for i in 0..200 {
        let m = s.recv_publish().await;
        assert_eq!(&m.payload[..], i.to_string().as_bytes());
    }
    let (_, text) = common::http_get(p.http_addr(), "/metrics").await;
    let dropped: HashMap<String, f64> = text
        .lines()
        .filter(|l| l.starts_with("thingsd_webhook_dropped_total{"))
        .filter_map(|l| l.rsplit_once(' ').map(|(k, v)| (k.to_string(), v.parse().unwrap())))
        .collect();
    let n: f64 = dropped.values().sum();
    assert!(n >= 190.0, "overflow is counted: {dropped:?}");
    p.node.stop().await;
}

/// A SUBSCRIBE the node has read is matched by other clients' publishes read after it, even
/// before it is granted (Paho's No Local test publishes from one client right after another
/// subscribed, without waiting for the SUBACK). The `auth_on_subscribe` endpoint holds the
/// SUBSCRIBE: while it does, a matching QoS 1 publish from another client waits for it (and is
/// then delivered, PUBACK 0x00, not 0x10), and a publish on another topic does not wait.
#[tokio::test(flavor = "multi_thread")]
async fn a_publish_read_after_another_clients_subscribe_waits_for_it() {
    let (p, mut called, release) = gated("auth_on_subscribe_m5", |_| {}).await;
    let mut sub = Raw::v5(p.node.tcp, "gate-sub").await;
    let mut publisher = Raw::v5(p.node.tcp, "gate-pub").await;
    for i in 1..=3u16 {
        let topic = format!("gate/{i}");
        sub.send(Packet::Subscribe(Subscribe {
            pkid: i,
            filters: vec![(topic.clone(), SubOptions::qos(QoS::AtLeastOnce))],
            props: Properties::default(),
        }))
        .await;
        // The node has read it: the webhook is asked.
        let asked = tokio::time::timeout(DEADLINE, called.recv()).await.expect("auth_on_subscribe called").unwrap();
        assert_eq!(asked, topic);
        // Another topic is not held back by the SUBSCRIBE in flight.
        publisher.send(common::publish("elsewhere", QoS::AtLeastOnce, 100 + i, "other")).await;
        match publisher.recv_app().await {
            Some(Packet::PubAck(a)) => assert_eq!((a.pkid, a.code), (100 + i, reason::NO_MATCHING_SUBSCRIBERS)),
            x => panic!("round {i}: {x:?}"),
        }
        // The topic it subscribes to waits for it.
        publisher.send(common::publish(&topic, QoS::AtLeastOnce, i, "behind the subscribe")).await;
        // Released once the node has read that PUBLISH (unheld, it would be routed at once).
        let end = tokio::time::Instant::now() + DEADLINE;
        while qos1_publishes_read(&p).await < 2.0 * i as f64 {
            assert!(tokio::time::Instant::now() < end, "the PUBLISH was not read");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        release.add_permits(1);
        match publisher.recv_app().await {
            Some(Packet::PubAck(a)) => assert_eq!((a.pkid, a.code), (i, reason::SUCCESS), "round {i}: the publish missed the subscription"),
            x => panic!("round {i}: {x:?}"),
        }
        assert!(matches!(sub.recv_app().await, Some(Packet::SubAck(a)) if a.codes == vec![1]));
        let m = sub.recv_publish().await;
        assert_eq!((&m.topic[..], &m.payload[..]), (&topic[..], &b"behind the subscribe"[..]));
    }
    p.node.stop().await;
}

type Gate = (Platform, tokio::sync::mpsc::UnboundedReceiver<String>, Arc<tokio::sync::Semaphore>);

/// A node (anonymous clients allowed, `tweak` applied) whose `hook` endpoint reports each call
/// (a SUBSCRIBE's first filter; "" for a login) and answers "ok" only when the test adds a
/// permit to the semaphore. The node's readiness probe has already logged in through it.
async fn gated(hook_name: &str, tweak: impl FnOnce(&mut thingsd::config::Config)) -> Gate {
    let (called_tx, mut called) = tokio::sync::mpsc::unbounded_channel::<String>();
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let r = release.clone();
    let gate = axum::routing::post(move |body: axum::Json<Value>| {
        let (tx, r) = (called_tx.clone(), r.clone());
        async move {
            let _ = tx.send(body.0["topics"][0]["topic"].as_str().unwrap_or("").to_string());
            r.acquire().await.unwrap().forget();
            axum::Json(json!({"result": "ok"}))
        }
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/gate", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, axum::Router::new().route("/gate", gate)).await.unwrap() });
    let login = hook_name.starts_with("auth_on_register");
    if login {
        release.add_permits(1);
    }
    let p = Platform::start(None, |c| {
        c.listeners.tcp[0].allow_anonymous = true;
        let mut h = hook(hook_name, &url);
        h.timeout_ms = 60_000;
        c.webhooks = vec![h];
        tweak(c);
    })
    .await;
    if login {
        tokio::time::timeout(DEADLINE, called.recv()).await.expect("the readiness probe's login").unwrap();
    }
    (p, called, release)
}

/// A client whose SUBSCRIBE to `#` a slow (or hostile) `auth_on_subscribe` endpoint sits on
/// cannot slow everyone else's publishing: the SUBSCRIBE holds matching publishes back for at
/// most a second from when it was read, not each publish by a second for as long as the
/// webhook takes. While the endpoint still holds it, another client's 50 QoS 1 publishes are
/// all acknowledged, and the node counts one publish held back (released by the deadline).
#[tokio::test(flavor = "multi_thread")]
async fn a_subscribe_held_by_a_slow_webhook_delays_other_publishers_once() {
    let (p, mut called, release) = gated("auth_on_subscribe_m5", |_| {}).await;
    let mut sub = Raw::v5(p.node.tcp, "slow-sub").await;
    let mut publisher = Raw::v5(p.node.tcp, "busy-pub").await;
    sub.send(Packet::Subscribe(Subscribe {
        pkid: 1,
        filters: vec![("#".into(), SubOptions::qos(QoS::AtLeastOnce))],
        props: Properties::default(),
    }))
    .await;
    assert_eq!(tokio::time::timeout(DEADLINE, called.recv()).await.expect("auth_on_subscribe called").unwrap(), "#");
    for i in 1..=50u16 {
        publisher.send(common::publish(&format!("busy/{i}"), QoS::AtLeastOnce, i, "x")).await;
        match publisher.recv_app().await {
            Some(Packet::PubAck(a)) => assert_eq!(a.pkid, i),
            x => panic!("publish {i}: {x:?}"),
        }
    }
    let (_, text) = common::http_get(p.http_addr(), "/metrics").await;
    let waits = |o: &str| -> f64 {
        let key = format!("thingsd_mqtt_publish_subscribe_waits_total{{outcome=\"{o}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(key.as_str())).and_then(|v| v.trim().parse().ok()).expect("waits counted")
    };
    assert_eq!((waits("waited"), waits("expired")), (1.0, 1.0), "only the first publish was held back");
    // The webhook answers at last: the subscription is granted and works.
    release.add_permits(1);
    assert!(matches!(sub.recv_app().await, Some(Packet::SubAck(a)) if a.codes == vec![1]));
    publisher.send(common::publish("busy/after", QoS::AtLeastOnce, 51, "y")).await;
    let m = sub.recv_publish().await;
    assert_eq!(&m.topic[..], "busy/after");
    p.node.stop().await;
}

/// CONNECTs in progress are bounded (`mqtt.max_pending_connects`): while an `auth_on_register`
/// endpoint sits on two logins, a third client is answered at once with CONNACK 0x89 Server
/// busy (it backs off) instead of queueing; once the two are admitted there is room again.
#[tokio::test(flavor = "multi_thread")]
async fn logins_in_progress_are_bounded_with_server_busy() {
    let (p, mut called, release) = gated("auth_on_register_m5", |c| c.mqtt.max_pending_connects = 2).await;
    let addr = p.node.tcp;
    let held: Vec<_> = (0..2)
        .map(|i| tokio::spawn(async move { Raw::session(addr, common::connect_packet(Protocol::V5, &format!("held-{i}"), true)).await }))
        .collect();
    for _ in 0..2 {
        tokio::time::timeout(DEADLINE, called.recv()).await.expect("auth_on_register called").unwrap();
    }
    let (_busy, ack) = Raw::session(addr, common::connect_packet(Protocol::V5, "third", true)).await;
    assert_eq!(ack.code, reason::SERVER_BUSY);
    release.add_permits(2);
    for h in held {
        let (_r, ack) = h.await.unwrap();
        assert_eq!(ack.code, reason::SUCCESS);
    }
    release.add_permits(1);
    let (_r, ack) = Raw::session(addr, common::connect_packet(Protocol::V5, "third", true)).await;
    assert_eq!(ack.code, reason::SUCCESS, "room again once the others were admitted");
    let (_, text) = common::http_get(p.http_addr(), "/metrics").await;
    assert!(text.contains("thingsd_connects_pending 0"), "{text}");
    p.node.stop().await;
}

/// One source address cannot hold every CONNECT slot (`mqtt.max_pending_connects_per_address`):
/// while the `auth_on_register` endpoint sits on two logins from 127.0.0.1, a third from there
/// is answered 0x89 at once, but a client from 127.0.0.2 is still admitted to authentication
/// (the node-wide bound, 8, is not reached). When the logins finish the address has its share back.
#[tokio::test(flavor = "multi_thread")]
async fn one_address_cannot_hold_every_login_slot() {
    let (p, mut called, release) = gated("auth_on_register_m5", |c| {
        c.mqtt.max_pending_connects = 8;
        c.mqtt.max_pending_connects_per_address = 2;
    })
    .await;
    let addr = p.node.tcp;
    let (one, two): (std::net::IpAddr, std::net::IpAddr) = ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
    let login = move |src, id: &str| {
        let c = common::connect_packet(Protocol::V5, id, true);
        tokio::spawn(async move { Raw::session_from(addr, src, c).await })
    };
    let held: Vec<_> = (0..2).map(|i| login(one, &format!("held-{i}"))).collect();
    for _ in 0..2 {
        tokio::time::timeout(DEADLINE, called.recv()).await.expect("auth_on_register called").unwrap();
    }
    let (_busy, ack) = Raw::session_from(addr, one, common::connect_packet(Protocol::V5, "third", true)).await;
    assert_eq!(ack.code, reason::SERVER_BUSY, "127.0.0.1 holds its share");
    let other = login(two, "elsewhere");
    tokio::time::timeout(DEADLINE, called.recv()).await.expect("127.0.0.2 reaches authentication").unwrap();
    release.add_permits(3);
    for h in held.into_iter().chain([other]) {
        let (_r, ack) = h.await.unwrap();
        assert_eq!(ack.code, reason::SUCCESS);
    }
    release.add_permits(1);
    let (_r, ack) = Raw::session_from(addr, one, common::connect_packet(Protocol::V5, "third", true)).await;
    assert_eq!(ack.code, reason::SUCCESS, "the address has its share back");
    let (_, text) = common::http_get(p.http_addr(), "/metrics").await;
    assert!(text.contains("thingsd_connects_pending 0"), "{text}");
    p.node.stop().await;
}

/// `thingsd_mqtt_publish_received_total{qos="1"}` of the node.
async fn qos1_publishes_read(p: &Platform) -> f64 {
    let (_, text) = common::http_get(p.http_addr(), "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix("thingsd_mqtt_publish_received_total{qos=\"1\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}
