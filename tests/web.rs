//! The web console end to end in a real browser: `tests/web/console.mjs` drives Debian's
//! Chromium with playwright-core against a node started here. Screenshots of every page are
//! written to `target/console-screenshots/` (with `UPDATE_SCREENSHOTS=1`, to `docs/screenshots/`,
//! which the README links).

use crate::common::platform::*;
use serde_json::json;

fn ready() -> bool {
    // Spawning is enough to know the program is there (`mosquitto_pub --help` exits 1).
    let have = |c: &str, a: &str| std::process::Command::new(c).arg(a).output().is_ok();
    let root = env!("CARGO_MANIFEST_DIR");
    let ok = have("node", "--version")
        && std::path::Path::new("/usr/bin/chromium").exists()
        && std::path::Path::new(&format!("{root}/tests/web/node_modules/playwright-core")).exists()
        && have("mosquitto_pub", "--help");
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("the console test needs node, /usr/bin/chromium, mosquitto_pub and tests/web/node_modules (scripts/test installs them)");
        }
        eprintln!("SKIPPED: node, chromium, mosquitto_pub or tests/web/node_modules missing (run scripts/test)");
    }
    ok
}

#[tokio::test(flavor = "multi_thread")]
async fn console_in_chromium() {
    if !ready() {
        return;
    }
    let p = Platform::start(None, |c| c.alerts.reconcile_ms = 200).await;
    let a = p.http_addr();
    // Another tenant with its own user and device.
    let (s, t) = p.admin("POST", "/api/v1/tenants", Some(json!({"name": "other"}))).await;
    assert_eq!(s, 201, "{t}");
    let (s, v) = p
        .admin(
            "POST",
            "/api/v1/users",
            Some(json!({"username": "other-user", "password": "other-pass-1", "role": "tenant_admin", "tenant_id": t["id"]})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = p.admin("POST", "/api/v1/devices", Some(json!({"device_number": "other-dev", "tenant_id": t["id"]}))).await;
    assert_eq!(s, 201, "{v}");
    let root = env!("CARGO_MANIFEST_DIR");
    let shots = if std::env::var("UPDATE_SCREENSHOTS").is_ok() {
        format!("{root}/docs/screenshots")
    } else {
        format!("{root}/target/console-screenshots")
    };
    let out = tokio::process::Command::new("node")
        .arg(format!("{root}/tests/web/console.mjs"))
        .env("BASE", format!("http://{a}"))
        .env("MQTT_PORT", p.node.tcp.port().to_string())
        .env("ROOT_USER", ROOT_USER)
        .env("ROOT_PASSWORD", ROOT_PASSWORD)
        .env("OTHER_USER", "other-user")
        .env("OTHER_PASSWORD", "other-pass-1")
        .env("SHOTS", &shots)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(240), out).await.expect("the browser test finishes").unwrap();
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "console test failed:\n{text}");
    for page in [
        "login",
        "dashboard",
        "products",
        "devices",
        "device-live",
        "device",
        "alerts",
        "rule-editor",
        "users",
        "cluster",
        "device-phone",
        "other-tenant",
    ] {
        assert!(std::path::Path::new(&format!("{shots}/{page}.png")).exists(), "no screenshot of {page}");
    }
    p.node.stop().await;
}
