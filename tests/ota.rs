//! Firmware over the air, as ThingsBoard devices do it: a package uploaded through the REST
//! API (larger than the API's usual body limit), announced to a device, downloaded by
//! ThingsBoard's own SDK in chunks over MQTT and checked against its SHA-256, the device's
//! progress visible in the API; chunks over HTTP; packages isolated per tenant.
use crate::common;
use crate::common::platform::*;
use serde_json::{json, Value};
use sha2::Digest;
use thingsd::protocols::mqtt::{Packet, Protocol, QoS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_ota_with_the_thingsboard_sdk_on_sqlite() {
    firmware_ota(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_ota_with_the_thingsboard_sdk_on_postgres() {
    let Some(url) = common::backends::postgres().await else { return };
    firmware_ota(Some(url)).await;
}

/// Upload raw bytes as a package; (status, body).
async fn upload(p: &Platform, query: &str, data: Vec<u8>) -> (u16, Value) {
    let url = format!("http://{}/api/v1/ota/packages?{query}", p.http_addr());
    let r = p.http.post(url).bearer_auth(ADMIN_KEY).header("content-type", "application/octet-stream").body(data).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn firmware_ota(meta: Option<String>) {
    let ok = std::process::Command::new("python3").args(["-c", "import tb_device_mqtt"]).status().map(|s| s.success()).unwrap_or(false);
    assert!(ok, "ThingsBoard's tb-mqtt-client is required (pip install tb-mqtt-client==1.13.14 mmh3; scripts/test installs it)");
    let p = Platform::start(meta, |_| {}).await;
    // 1.5 MiB: more than the REST API's default 1 MiB body limit, less than the package limit.
    let image: Vec<u8> = (0..1_500_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let digest = hex::encode(sha2::Sha256::digest(&image));
    let (s, pkg) = upload(&p, "kind=firmware&title=tb-fw&version=1.2.0", image.clone()).await;
    assert_eq!(s, 201, "{pkg}");
    assert_eq!(
        (pkg["size"].as_u64(), pkg["checksum"].as_str(), pkg["checksum_algorithm"].as_str()),
        (Some(1_500_000), Some(digest.as_str()), Some("SHA256"))
    );
    // A version is immutable: the same title and version again is a conflict.
    assert_eq!(upload(&p, "kind=firmware&title=tb-fw&version=1.2.0", vec![1, 2, 3]).await.0, 409);
    assert_eq!(upload(&p, "kind=firmware&title=a/b&version=1", vec![1]).await.0, 400, "a title with a slash");
    assert_eq!(upload(&p, "kind=firmware&title=empty&version=1", vec![]).await.0, 400, "an empty package");
    let (s, page) = p.admin("GET", "/api/v1/ota/packages", None).await;
    assert_eq!((s, page["total"].as_i64(), page["items"][0]["title"].as_str()), (200, Some(1), Some("tb-fw")), "{page}");
    let (_, token) = p.create_device("ota-1", json!({})).await;

    // Nothing announced: HTTP chunks are refused.
    let fw = |q: &str| format!("http://{}/api/v1/{token}/firmware?{q}", p.http_addr());
    assert_eq!(p.http.get(fw("size=10&chunk=0")).send().await.unwrap().status(), 404);

    // The SDK connects and waits; then the package is announced to it.
    let dir = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/paho/tb_ota.py");
    let mut child = tokio::process::Command::new("python3")
        .arg(script)
        // 256 KiB chunks: six requests. (tb-mqtt-client 1.13.0 cannot send any chunk request —
        // its rate limiter tries to parse the request's payload as JSON; 1.13.14 can.)
        .args([p.node.tcp.port().to_string(), token.clone(), "262144".into(), digest.clone()])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    let ready = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        use tokio::io::AsyncBufReadExt;
        let mut line = String::new();
        while out.read_line(&mut line).await.unwrap() > 0 {
            seen.push_str(&line);
            if line.starts_with("READY") || line.starts_with("FAIL") {
                return line.starts_with("READY");
            }
            line.clear();
        }
        false
    })
    .await;
    assert_eq!(ready, Ok(true), "the SDK did not get ready: {seen}");
    let (s, cmd) = p.admin("POST", "/api/v1/devices/ota-1/ota", Some(json!({"package_id": pkg["id"]}))).await;
    assert_eq!((s, cmd["kind"].as_str()), (200, Some("attribute_set")), "{cmd}");
    let (_, attrs) = p.admin("GET", "/api/v1/devices/ota-1/attributes", None).await;
    assert_eq!((attrs["shared"]["fw_version"].as_str(), attrs["shared"]["fw_size"].as_i64()), (Some("1.2.0"), Some(1_500_000)), "{attrs}");
    let done = tokio::time::timeout(std::time::Duration::from_secs(150), async {
        use tokio::io::AsyncReadExt;
        let mut rest = String::new();
        out.read_to_string(&mut rest).await.unwrap();
        (child.wait().await.unwrap(), rest)
    })
    .await
    .expect("the SDK script ends");
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = e.read_to_string(&mut err).await;
    }
    assert!(done.0.success() && done.1.contains("OK tb ota"), "{seen}{}\n{err}", done.1);
    assert!(done.1.contains("VERSION 1.2.0"), "{}", done.1);

    // The device's progress, from what it reported.
    let end = tokio::time::Instant::now() + common::DEADLINE;
    let status = loop {
        let (_, v) = p.admin("GET", "/api/v1/devices/ota-1/ota", None).await;
        if v["firmware"]["state"] == "UPDATED" {
            break v;
        }
        assert!(tokio::time::Instant::now() < end, "the device's OTA status never showed UPDATED: {v}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let f = &status["firmware"];
    assert_eq!(
        (f["assigned"]["version"].as_str(), f["current"]["version"].as_str(), f["current"]["title"].as_str()),
        (Some("1.2.0"), Some("1.2.0"), Some("tb-fw")),
        "{status}"
    );

    // HTTP chunks: ThingsBoard's query, checked against the announced title and version.
    let r = p.http.get(fw("title=tb-fw&version=1.2.0&size=1000&chunk=2")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(&r.bytes().await.unwrap()[..], &image[2000..3000]);
    assert_eq!(p.http.get(fw("title=tb-fw&version=9.9&size=1000&chunk=0")).send().await.unwrap().status(), 404, "another version");
    let past = p.http.get(fw("size=1000000&chunk=5")).send().await.unwrap();
    assert_eq!((past.status().as_u16(), past.bytes().await.unwrap().len()), (200, 0), "past the end: empty");
    let bad = p.http.get(fw("size=abc")).send().await.unwrap();
    assert_eq!(bad.status(), 400);
    assert!(bad.json::<Value>().await.unwrap()["error"]["code"].is_string(), "a JSON error");
    // The whole image through the admin API.
    let url = format!("http://{}/api/v1/ota/packages/{}/data", p.http_addr(), pkg["id"]);
    let all = p.http.get(url).bearer_auth(ADMIN_KEY).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(hex::encode(sha2::Sha256::digest(&all)), digest);

    // Software packages the same way (`sw_*` attributes, `/software`).
    let app: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    let (s, sw) = upload(&p, "kind=software&title=app&version=3", app.clone()).await;
    assert_eq!(s, 201, "{sw}");
    assert_eq!(p.admin("POST", "/api/v1/devices/ota-1/ota", Some(json!({"package_id": sw["id"]}))).await.0, 200);
    let (_, attrs) = p.admin("GET", "/api/v1/devices/ota-1/attributes", None).await;
    assert_eq!((attrs["shared"]["sw_title"].as_str(), attrs["shared"]["fw_title"].as_str()), (Some("app"), Some("tb-fw")), "{attrs}");
    let url = format!("http://{}/api/v1/{token}/software?size=100&chunk=1", p.http_addr());
    assert_eq!(&p.http.get(url).send().await.unwrap().bytes().await.unwrap()[..], &app[100..200]);
    let (_, st) = p.admin("GET", "/api/v1/devices/ota-1/ota", None).await;
    assert_eq!(st["software"]["assigned"]["version"], "3", "{st}");

    // A product-wide announcement reaches each of its devices.
    let (_, prod) = p.admin("POST", "/api/v1/products", Some(json!({"name": "meters"}))).await;
    for n in ["ota-p1", "ota-p2"] {
        p.create_device(n, json!({"product_id": prod["id"]})).await;
    }
    let (s, v) = p.admin("POST", &format!("/api/v1/products/{}/ota", prod["id"]), Some(json!({"package_id": pkg["id"]}))).await;
    assert_eq!((s, v["devices"].as_u64()), (200, Some(2)), "{v}");
    let (_, attrs) = p.admin("GET", "/api/v1/devices/ota-p2/attributes", None).await;
    assert_eq!(attrs["shared"]["fw_title"], "tb-fw", "{attrs}");

    // Packages stay in their tenant: announcing one to another tenant's device is a 404.
    let (_, other) = p.admin("POST", "/api/v1/tenants", Some(json!({"name": "elsewhere"}))).await;
    p.create_device("ota-x", json!({"tenant_id": other["id"]})).await;
    let (s, _) = p.admin("POST", "/api/v1/devices/ota-x/ota", Some(json!({"package_id": pkg["id"]}))).await;
    assert_eq!(s, 404, "another tenant's package");
    // A device with nothing announced asks over MQTT: refused (0x83), no answer.
    let (_, none_token) = p.create_device("ota-none", json!({})).await;
    let mut d = device(p.node.tcp, Protocol::V5, "ota-none-c", &none_token).await;
    d.send(common::publish("v2/fw/request/1/chunk/0", QoS::AtLeastOnce, 1, "")).await;
    match d.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.code, 0x83, "nothing announced"),
        other => panic!("expected a PUBACK, got {other:?}"),
    }
    d.send(common::disconnect()).await;

    // Deleted: chunks are refused from then on.
    let (s, _) = p.admin("DELETE", &format!("/api/v1/ota/packages/{}", pkg["id"]), None).await;
    assert_eq!(s, 200);
    assert_eq!(p.http.get(fw("size=1000&chunk=0")).send().await.unwrap().status(), 404);
    p.node.stop().await;
}
