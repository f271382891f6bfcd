//! Claiming, as ThingsBoard devices do it: the device offers itself with a secret (its own SDK
//! over MQTT, or HTTP), a user of another tenant who knows the secret claims it through the
//! REST API, and the device moves to that tenant. The secret never reaches subscribers, a
//! wrong secret reveals nothing, an offer is taken once, and five wrong secrets end it.
use crate::common::disconnect;
use crate::common::platform::*;
use serde_json::json;
use thingsd::protocols::mqtt::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_offers_itself_and_another_tenant_claims_it() {
    claiming(None).await;
}

/// The same with the offers in Redis (taken with GETDEL, shared by every node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claiming_with_offers_in_redis() {
    let Some(redis) = crate::common::backends::redis() else { return };
    claiming(Some(redis)).await;
}

async fn claiming(redis: Option<String>) {
    let p = Platform::start(None, |c| {
        if let Some(r) = redis {
            c.cache.url = r;
            c.cache.prefix = format!("t{:x}:", rand::random::<u32>());
        }
    })
    .await;
    let a = p.http_addr();
    let (_, buyer) = p.admin("POST", "/api/v1/tenants", Some(json!({"name": "buyer"}))).await;
    let user = json!({"username": "buyer-admin", "password": "buyer-password", "role": "tenant_admin", "tenant_id": buyer["id"]});
    assert_eq!(p.admin("POST", "/api/v1/users", Some(user)).await.0, 201);
    let token = login_user(&p.http, a, "buyer-admin", "buyer-password").await["access_token"].as_str().unwrap().to_string();
    let (_, prod) = p.admin("POST", "/api/v1/products", Some(json!({"name": "factory"}))).await;
    let (_, dev_token) = p.create_device("cl-1", json!({"product_id": prod["id"]})).await;
    let claim = |secret: &str| {
        let (http, token, body) = (p.http.clone(), token.clone(), json!({"secret_key": secret}));
        async move { call(&http, a, &token, "POST", "/api/v1/devices/cl-1/claim", Some(body)).await }
    };
    // Nothing offered: the same 404 as for a device that does not exist.
    let (s, v) = claim("s3cret").await;
    assert_eq!((s, v["error"]["code"].as_str()), (404, Some("not_found")), "{v}");
    assert_eq!(call(&p.http, a, &token, "POST", "/api/v1/devices/nope/claim", Some(json!({"secret_key": "s3cret"}))).await.0, 404);

    // A platform service listening to every ThingsBoard topic of every device.
    let mut svc = service(p.node.tcp).await;
    assert_eq!(sub(&mut svc, "v1/devices/#").await, [1]);
    // ThingsBoard's SDK offers the device (QoS 1: acknowledged once recorded), then reports.
    let script = r#"
import sys
from tb_device_mqtt import TBDeviceMqttClient
c = TBDeviceMqttClient("127.0.0.1", port=int(sys.argv[1]), username=sys.argv[2])
c.connect()
import time
end = time.time() + 30
while not (c.is_connected() and c.rate_limits_received):
    if time.time() > end: print("FAIL connect"); sys.exit(1)
    time.sleep(0.05)
rc = c.claim("s3cret", 60000).get()
if rc != 0: print("FAIL claim", rc); sys.exit(1)
if c.send_telemetry({"after_claim": 1}).get() != 0: print("FAIL telemetry"); sys.exit(1)
c.disconnect()
print("OK offered")
"#;
    let out =
        tokio::process::Command::new("python3").args(["-c", script, &p.node.tcp.port().to_string(), &dev_token]).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("OK offered"), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // The service hears the SDK's session-limits call and the telemetry sent after the claim
    // request, but never the claim request (it carries the secret).
    loop {
        let m = svc.recv_publish().await;
        assert!(!m.topic.ends_with("/claim"), "the claim request was routed: {:?}", json_of(&m));
        if m.topic == "v1/devices/cl-1/telemetry" {
            break;
        }
    }

    // A wrong secret: the same 404; the rightful claim still works after it.
    assert_eq!(claim("guess").await.0, 404);
    let (s, dev) = claim("s3cret").await;
    assert_eq!(s, 200, "{dev}");
    assert_eq!((dev["tenant_id"].clone(), dev["product_id"].clone()), (buyer["id"].clone(), json!(null)), "{dev}");
    assert_eq!(claim("s3cret").await.0, 404, "an offer is taken once");
    // The buyer owns it now; the device still logs in with its token.
    assert_eq!(call(&p.http, a, &token, "GET", "/api/v1/devices/cl-1", None).await.0, 200);
    let mut d = device(p.node.tcp, Protocol::V4, "cl-1-again", &dev_token).await;
    d.send(disconnect()).await;

    // Offered over HTTP this time; five wrong secrets end the offer.
    let url = format!("http://{a}/api/v1/{dev_token}/claim");
    let r = p.http.post(&url).json(&json!({"secretKey": "second", "durationMs": 60000})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let again = |secret: &str| {
        let (http, body) = (p.http.clone(), json!({"secret_key": secret}));
        async move { admin(&http, a, "POST", "/api/v1/devices/cl-1/claim", Some(body)).await.0 }
    };
    for _ in 0..5 {
        assert_eq!(again("wrong").await, 404);
    }
    assert_eq!(again("second").await, 404, "the offer ended after five wrong secrets");
    // A malformed offer is refused with a JSON error.
    let r = p.http.post(&url).json(&json!({"secretKey": 5})).send().await.unwrap();
    assert_eq!(r.status(), 400);
    p.node.stop().await;
}
