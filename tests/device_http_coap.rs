//! The HTTP and CoAP device APIs over real sockets: reqwest, a CoAP client on coap-lite over
//! UDP, and Debian's `coap-client` (libcoap3).

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::platform::*;
use crate::common::DEADLINE;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};
use serde_json::{json, Value};
use tokio::net::UdpSocket;

async fn post(p: &Platform, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let r = p.http.post(format!("http://{}{path}", p.http_addr())).body(body).send().await.unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

async fn get(p: &Platform, path: &str) -> (u16, Value) {
    let r = p.http.get(format!("http://{}{path}", p.http_addr())).send().await.unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn http_device_api() {
    let p = Platform::start(None, |_| {}).await;
    let (_, token) = p.create_device("h-1", json!({})).await;
    let base = format!("/api/v1/{token}");

    assert_eq!(post(&p, &format!("{base}/telemetry"), r#"{"temp": 20.5}"#).await, (200, json!({})));
    let ts = thingsd::storage::meta::now_ms() - 3_600_000;
    assert_eq!(post(&p, &format!("{base}/telemetry"), format!(r#"[{{"ts": {ts}, "values": {{"temp": 1}}}}, {{"temp": 2}}]"#)).await.0, 200);
    // Bad input: a clear status and a JSON error body, nothing stored.
    let (s, e) = post(&p, &format!("{base}/telemetry"), "{not json").await;
    assert_eq!((s, e["error"]["code"].as_str()), (400, Some("malformed_payload")), "{e}");
    let (s, e) = post(&p, &format!("{base}/telemetry"), "[1, 2]").await;
    assert_eq!(s, 400, "{e}");
    let (s, e) = post(&p, &format!("{base}/telemetry"), format!(r#"{{"pad": "{}"}}"#, "x".repeat(70_000))).await;
    assert_eq!((s, e["error"]["code"].as_str()), (413, Some("payload_too_large")), "{e}");
    let (s, e) = post(&p, &format!("{base}/telemetry"), "x".repeat(300_000)).await;
    assert_eq!((s, e["error"]["code"].as_str()), (413, Some("payload_too_large")), "{e}");
    let (s, e) = post(&p, "/api/v1/nope/telemetry", "{}").await;
    assert_eq!((s, e["error"]["code"].as_str()), (401, Some("unauthorized")), "{e}");
    let (s, e) = get(&p, &format!("{base}/telemetry")).await;
    assert_eq!((s, e["error"]["code"].as_str()), (405, Some("method_not_allowed")), "{e}");
    let (s, e) = get(&p, "/api/v1/nothing/here/at/all").await;
    assert_eq!(s, 404, "{e}");

    // Attributes and events.
    assert_eq!(post(&p, &format!("{base}/attributes"), r#"{"fw": "2.0", "model": "x1"}"#).await.0, 200);
    let (s, a) = get(&p, &format!("{base}/attributes?keys=fw")).await;
    assert_eq!((s, a["client"].clone()), (200, json!({"fw": "2.0"})));
    assert_eq!(post(&p, &format!("{base}/events"), r#"{"method": "door_open", "params": {"n": 1}}"#).await.0, 200);
    assert_eq!(post(&p, &format!("{base}/events"), r#"{"params": {}}"#).await.0, 400);

    // RPC long poll: a command created while the device waits is answered at once.
    let (s, e) = get(&p, &format!("{base}/rpc?timeout=50")).await;
    assert_eq!((s, e["error"]["code"].as_str()), (408, Some("timeout")));
    let poll = {
        let (http, url) = (p.http.clone(), format!("http://{}{base}/rpc?timeout=8000", p.http_addr()));
        tokio::spawn(async move {
            let r = http.get(url).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        })
    };
    // The poll is waiting once the device shows a poller... there is no event for that, so the
    // command is created right away: whether before or during the poll, it must come back.
    let (_, cmd) = p.admin("POST", "/api/v1/devices/h-1/commands", Some(json!({"method": "reset", "params": {"hard": true}}))).await;
    let (s, got) = tokio::time::timeout(DEADLINE, poll).await.unwrap().unwrap();
    assert_eq!(s, 200, "{got}");
    assert_eq!(got["method"], "reset");
    assert_eq!(got["params"], json!({"hard": true}));
    assert_eq!(got["id"], cmd["message_id"]);
    p.wait_command(cmd["id"].as_i64().unwrap(), "sent").await;
    let id = got["id"].as_str().unwrap();
    assert_eq!(post(&p, &format!("{base}/rpc/{id}"), r#"{"result": 1, "error": "busy"}"#).await.0, 200);
    let done = p.wait_command(cmd["id"].as_i64().unwrap(), "failed").await;
    assert_eq!(done["response"]["error"], "busy");

    // A disabled device is refused with 403.
    let (s, _) = p.admin("PATCH", "/api/v1/devices/h-1", Some(json!({"enabled": false}))).await;
    assert_eq!(s, 200);
    let (s, e) = post(&p, &format!("{base}/telemetry"), "{}").await;
    assert_eq!((s, e["error"]["code"].as_str()), (403, Some("forbidden")));
    p.node.stop().await;
}

pub(crate) struct Coap {
    sock: UdpSocket,
    to: SocketAddr,
    mid: u16,
}

impl Coap {
    pub(crate) async fn new(to: SocketAddr) -> Coap {
        Coap { sock: UdpSocket::bind("127.0.0.1:0").await.unwrap(), to, mid: 100 }
    }

    pub(crate) fn request(&mut self, method: RequestType, path: &str, con: bool, payload: &str) -> Packet {
        let mut p = Packet::new();
        p.header.set_type(if con { MessageType::Confirmable } else { MessageType::NonConfirmable });
        p.header.code = MessageClass::Request(method);
        self.mid += 1;
        p.header.message_id = self.mid;
        p.set_token(self.mid.to_be_bytes().to_vec());
        for seg in path.trim_start_matches('/').split('/') {
            p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        p.payload = payload.as_bytes().to_vec();
        p
    }

    pub(crate) async fn send(&self, p: &Packet) {
        self.sock.send_to(&p.to_bytes().unwrap(), self.to).await.unwrap();
    }

    pub(crate) async fn recv(&self) -> Packet {
        let mut buf = vec![0u8; 65_535];
        let (n, _) = tokio::time::timeout(DEADLINE, self.sock.recv_from(&mut buf)).await.expect("CoAP answer in time").unwrap();
        Packet::from_bytes(&buf[..n]).expect("server sent a valid CoAP message")
    }

    pub(crate) async fn call(&mut self, method: RequestType, path: &str, con: bool, payload: &str) -> Packet {
        let req = self.request(method, path, con, payload);
        self.send(&req).await;
        let resp = self.recv().await;
        assert_eq!(resp.get_token(), req.get_token());
        if con {
            assert_eq!(resp.header.get_type(), MessageType::Acknowledgement);
            assert_eq!(resp.header.message_id, req.header.message_id);
        } else {
            assert_eq!(resp.header.get_type(), MessageType::NonConfirmable);
        }
        resp
    }
}

pub(crate) fn code(p: &Packet) -> ResponseType {
    match p.header.code {
        MessageClass::Response(r) => r,
        other => panic!("not a response: {other:?}"),
    }
}

fn body(p: &Packet) -> Value {
    serde_json::from_slice(&p.payload).unwrap_or(Value::Null)
}

#[tokio::test]
async fn coap_device_api() {
    let p = Platform::start(None, |_| {}).await;
    let (_, token) = p.create_device("c-1", json!({})).await;
    let mut c = Coap::new(p.node.coap.expect("coap listener")).await;
    let base = format!("api/v1/{token}");

    let r = c.call(RequestType::Post, &format!("{base}/telemetry"), true, r#"{"temp": 7}"#).await;
    assert_eq!(code(&r), ResponseType::Changed);
    // A retransmitted confirmable request gets the same answer (and is not applied twice).
    let dup = c.request(RequestType::Post, &format!("{base}/attributes"), true, r#"{"boots": 1}"#);
    c.send(&dup).await;
    let first = c.recv().await;
    c.send(&dup).await;
    let second = c.recv().await;
    assert_eq!(first, second);
    assert_eq!(code(&first), ResponseType::Changed);
    let r = c.call(RequestType::Post, &format!("{base}/telemetry"), false, r#"{"temp": 8}"#).await;
    assert_eq!(code(&r), ResponseType::Changed);
    let r = c.call(RequestType::Post, &format!("{base}/telemetry"), true, "nope").await;
    assert_eq!(code(&r), ResponseType::BadRequest);
    assert_eq!(body(&r)["error"]["code"], "malformed_payload");
    let r = c.call(RequestType::Post, "api/v1/wrong-token/telemetry", true, "{}").await;
    assert_eq!(code(&r), ResponseType::Unauthorized);
    let r = c.call(RequestType::Get, &format!("{base}/telemetry"), true, "").await;
    assert_eq!(code(&r), ResponseType::MethodNotAllowed);
    let r = c.call(RequestType::Get, "elsewhere", true, "").await;
    assert_eq!(code(&r), ResponseType::NotFound);
    let r = c.call(RequestType::Get, &format!("{base}/attributes"), true, "").await;
    assert_eq!(code(&r), ResponseType::Content);
    assert_eq!(body(&r)["client"]["boots"], 1);
    // Garbage is ignored; the server keeps serving.
    c.sock.send_to(&[0xff, 0x00], c.to).await.unwrap();

    // Observe rpc: commands are pushed as confirmable notifications.
    let mut reg = c.request(RequestType::Get, &format!("{base}/rpc"), true, "");
    reg.set_observe_value(0);
    c.send(&reg).await;
    let ack = c.recv().await;
    assert_eq!(code(&ack), ResponseType::Content);
    assert!(ack.get_observe_value().is_some(), "registration accepted");
    let (_, cmd) = p.admin("POST", "/api/v1/devices/c-1/commands", Some(json!({"method": "ping", "params": {"n": 3}}))).await;
    let note = c.recv().await;
    assert_eq!(note.header.get_type(), MessageType::Confirmable);
    assert_eq!(note.get_token(), reg.get_token());
    assert_eq!(body(&note)["method"], "ping");
    let mut a = Packet::new();
    a.header.set_type(MessageType::Acknowledgement);
    a.header.message_id = note.header.message_id;
    c.send(&a).await;
    p.wait_command(cmd["id"].as_i64().unwrap(), "sent").await;
    let id = body(&note)["id"].as_str().unwrap().to_string();
    let r = c.call(RequestType::Post, &format!("{base}/rpc/{id}"), true, r#"{"result": 0}"#).await;
    assert_eq!(code(&r), ResponseType::Changed);
    p.wait_command(cmd["id"].as_i64().unwrap(), "acknowledged").await;
    // Deregister (Observe: 1, same token): later commands are no longer pushed here.
    let mut dereg = c.request(RequestType::Get, &format!("{base}/rpc"), true, "");
    dereg.set_token(reg.get_token().to_vec());
    dereg.set_observe_value(1);
    c.send(&dereg).await;
    assert_eq!(code(&c.recv().await), ResponseType::Content);

    // Observe attributes: shared attributes set by the platform are pushed.
    let mut areg = c.request(RequestType::Get, &format!("{base}/attributes"), true, "");
    areg.set_observe_value(0);
    c.send(&areg).await;
    let first = c.recv().await;
    assert_eq!((code(&first), first.get_observe_value().is_some()), (ResponseType::Content, true));
    let (_, set) = p.admin("PUT", "/api/v1/devices/c-1/attributes", Some(json!({"params": {"interval": 15}}))).await;
    let note = c.recv().await;
    assert_eq!(note.get_token(), areg.get_token());
    assert_eq!(body(&note), json!({"interval": 15}));
    let mut a = Packet::new();
    a.header.set_type(MessageType::Acknowledgement);
    a.header.message_id = note.header.message_id;
    c.send(&a).await;
    p.wait_command(set["id"].as_i64().unwrap(), "sent").await;
    // An RST to a notification ends the observation.
    let (_, set2) = p.admin("PUT", "/api/v1/devices/c-1/attributes", Some(json!({"params": {"interval": 16}}))).await;
    let note = c.recv().await;
    let mut rst = Packet::new();
    rst.header.set_type(MessageType::Reset);
    rst.header.message_id = note.header.message_id;
    c.send(&rst).await;
    // Still pending (the device refused it); the HTTP API can fetch it instead.
    let (s, got) = get(&p, &format!("/api/v1/{token}/rpc?timeout=5000")).await;
    assert_eq!((s, got["id"].clone()), (200, set2["message_id"].clone()));

    // Debian's coap-client: a POST, a GET, and an observation that receives a queued command.
    let url = |res: &str| format!("coap://{}/api/v1/{token}/{res}", c.to);
    let out = tokio::process::Command::new("coap-client-notls")
        .args(["-m", "post", "-t", "json", "-e", r#"{"temp": 9}"#, &url("telemetry")])
        .output()
        .await
        .expect("coap-client-notls is required (Debian package libcoap3-bin; scripts/test installs it)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = tokio::process::Command::new("coap-client-notls").args(["-m", "get", &url("attributes")]).output().await.unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"boots\":1"), "{:?}", out);
    let (_, queued) = p.admin("POST", "/api/v1/devices/c-1/commands", Some(json!({"method": "led", "params": {"on": true}}))).await;
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new("coap-client-notls").args(["-m", "get", "-s", "3", &url("rpc")]).output(),
    )
    .await
    .expect("coap-client ends after its 3 s observation")
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"method\":\"led\""), "observer got: {text:?} {:?}", String::from_utf8_lossy(&out.stderr));
    p.wait_command(queued["id"].as_i64().unwrap(), "sent").await;
    p.node.stop().await;
}

/// Devices without a connection (HTTP, CoAP) show online while they report, and go offline
/// once they have not reported for `devices.report_online_secs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_and_coap_devices_are_online_while_they_report() {
    let p = Platform::start(None, |c| c.devices.report_online_secs = 1).await;
    let (_, th) = p.create_device("rep-h", json!({})).await;
    let (_, tc) = p.create_device("rep-c", json!({})).await;
    let status = |n: &'static str| {
        let p = &p;
        async move { p.admin("GET", &format!("/api/v1/devices/{n}/status"), None).await.1 }
    };
    let online = |n: &'static str, want: bool| {
        let status = &status;
        async move {
            let end = tokio::time::Instant::now() + DEADLINE;
            loop {
                let s = status(n).await;
                if s["online"] == want {
                    return s;
                }
                assert!(tokio::time::Instant::now() < end, "{n} never became online={want}: {s}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(status("rep-h").await["online"], false, "not online before it reports");
    assert_eq!(post(&p, &format!("/api/v1/{th}/telemetry"), r#"{"t": 1}"#).await.0, 200);
    online("rep-h", true).await;
    let mut c = Coap::new(p.node.coap.expect("coap listener")).await;
    let r = c.call(RequestType::Post, &format!("api/v1/{tc}/telemetry"), true, r#"{"t": 2}"#).await;
    assert_eq!(code(&r), ResponseType::Changed);
    online("rep-c", true).await;
    // Silent for longer than the window: offline; a new report brings it back.
    let off = online("rep-h", false).await;
    assert!(off["last_seen"].as_u64().is_some(), "{off}");
    online("rep-c", false).await;
    assert_eq!(post(&p, &format!("/api/v1/{th}/telemetry"), r#"{"t": 3}"#).await.0, 200);
    online("rep-h", true).await;
}
