//! The REST API for people: sign-in, sessions and their revocation, rate limits, roles and
//! permissions, tenant isolation checked over every route of the OpenAPI document, the
//! document kept in sync with the committed `docs/openapi.json`, and a schemathesis fuzz run.
use crate::common;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::common::platform::*;
use serde_json::{json, Value};

async fn start() -> Platform {
    Platform::start(None, |c| {
        c.alerts.reconcile_ms = 200;
        c.api.login_fail_limit_account = 3;
        c.api.login_fail_limit_address = 1000;
    })
    .await
}

async fn login_status(p: &Platform, user: &str, pw: &str) -> (u16, Value) {
    let r = p
        .http
        .post(format!("http://{}/api/v1/auth/login", p.http_addr()))
        .json(&json!({"username": user, "password": pw}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn login_refresh_logout_and_limits() {
    let p = start().await;
    let a = p.http_addr();
    // Wrong passwords: 401 with a JSON error; an unknown user looks the same.
    let (s, v) = login_status(&p, ROOT_USER, "wrong-password").await;
    assert_eq!((s, v["error"]["code"].as_str()), (401, Some("unauthorized")), "{v}");
    let (s, _) = login_status(&p, "nobody-here", "wrong-password").await;
    assert_eq!(s, 401);
    // A user with a bad password three times is locked out for the window, even with the right one.
    let (s, v) = call(
        &p.http,
        a,
        ADMIN_KEY,
        "POST",
        "/api/v1/users",
        Some(json!({"username": "victim", "password": "victim-pass-1", "role": "tenant_user"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    for _ in 0..3 {
        assert_eq!(login_status(&p, "victim", "nope-nope-nope").await.0, 401);
    }
    let (s, v) = login_status(&p, "victim", "victim-pass-1").await;
    assert_eq!((s, v["error"]["code"].as_str()), (429, Some("rate_limited")), "{v}");

    // Tokens: the access token works, the refresh token rotates and is good once.
    let t = login_user(&p.http, a, ROOT_USER, ROOT_PASSWORD).await;
    let access = t["access_token"].as_str().unwrap().to_string();
    let (s, me) = call(&p.http, a, &access, "GET", "/api/v1/auth/me", None).await;
    assert_eq!((s, me["username"].as_str(), me["role"].as_str()), (200, Some(ROOT_USER), Some("system_admin")), "{me}");
    let refresh = t["refresh_token"].as_str().unwrap().to_string();
    let r = p.http.post(format!("http://{a}/api/v1/auth/refresh")).json(&json!({"refresh_token": refresh})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let t2: Value = r.json().await.unwrap();
    let access2 = t2["access_token"].as_str().unwrap().to_string();
    assert_ne!(t2["refresh_token"], t["refresh_token"]);
    // Using the old refresh token again ends the session (it was copied): both tokens stop working.
    let r = p.http.post(format!("http://{a}/api/v1/auth/refresh")).json(&json!({"refresh_token": refresh})).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(call(&p.http, a, &access2, "GET", "/api/v1/auth/me", None).await.0, 401);

    // Logout ends one session; a password change ends them all.
    let s1 = login_user(&p.http, a, ROOT_USER, ROOT_PASSWORD).await["access_token"].as_str().unwrap().to_string();
    let s2 = login_user(&p.http, a, ROOT_USER, ROOT_PASSWORD).await["access_token"].as_str().unwrap().to_string();
    assert_eq!(call(&p.http, a, &s1, "POST", "/api/v1/auth/logout", None).await.0, 200);
    assert_eq!(call(&p.http, a, &s1, "GET", "/api/v1/auth/me", None).await.0, 401);
    assert_eq!(call(&p.http, a, &s2, "GET", "/api/v1/auth/me", None).await.0, 200);
    let (s, v) = call(
        &p.http,
        a,
        &s2,
        "PUT",
        "/api/v1/auth/password",
        Some(json!({"current_password": ROOT_PASSWORD, "new_password": "root-password-2"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(call(&p.http, a, &s2, "GET", "/api/v1/auth/me", None).await.0, 401);
    assert_eq!(login_status(&p, ROOT_USER, ROOT_PASSWORD).await.0, 401);
    login_user(&p.http, a, ROOT_USER, "root-password-2").await;

    // Garbage tokens and bodies: clear JSON errors.
    assert_eq!(call(&p.http, a, "a.b.c", "GET", "/api/v1/devices", None).await.0, 401);
    let r =
        p.http.post(format!("http://{a}/api/v1/auth/login")).header("content-type", "application/json").body("{nope").send().await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_json");
    // Oversized bodies are refused before they are read.
    let big = "x".repeat(2 << 20);
    // (On its own connection: the server closes it rather than read the rest of the body.)
    let r = client()
        .post(format!("http://{a}/api/v1/tenants"))
        .bearer_auth(ADMIN_KEY)
        .header("content-type", "application/json")
        .body(format!("{{\"name\":\"{big}\"}}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);

    // The audit log saw the logins and the user creation.
    let (s, log) = call(&p.http, a, ADMIN_KEY, "GET", "/api/v1/audit?limit=100", None).await;
    assert_eq!(s, 200);
    let actions: Vec<(String, String)> = log["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["action"].as_str().unwrap().into(), e["actor"].as_str().unwrap().into()))
        .collect();
    assert!(actions.contains(&("create".into(), "api-key".into())), "{actions:?}");
    assert!(actions.contains(&("password".into(), format!("user:{ROOT_USER}"))), "{actions:?}");
    p.node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn roles_permissions_lists() {
    let p = start().await;
    let a = p.http_addr();
    let (_, t) = call(&p.http, a, ADMIN_KEY, "POST", "/api/v1/tenants", Some(json!({"name": "acme"}))).await;
    let tid = t["id"].as_i64().unwrap();
    let (s, v) = call(
        &p.http,
        a,
        ADMIN_KEY,
        "POST",
        "/api/v1/users",
        Some(json!({"username": "acme-admin", "password": "acme-pass-1", "role": "tenant_admin", "tenant_id": tid})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let admin = login_user(&p.http, a, "acme-admin", "acme-pass-1").await["access_token"].as_str().unwrap().to_string();
    // A tenant admin cannot make system admins, nor grant what it does not hold.
    let (s, _) = call(
        &p.http,
        a,
        &admin,
        "POST",
        "/api/v1/users",
        Some(json!({"username": "sneaky", "password": "sneaky-pass", "role": "system_admin"})),
    )
    .await;
    assert_eq!(s, 400);
    let (s, _) = call(&p.http, a, &admin, "POST", "/api/v1/roles", Some(json!({"name": "boss", "permissions": ["tenant:manage"]}))).await;
    assert_eq!(s, 403);
    // A custom role with read-only device access.
    let (s, role) =
        call(&p.http, a, &admin, "POST", "/api/v1/roles", Some(json!({"name": "viewer", "permissions": ["device:read"]}))).await;
    assert_eq!((s, role["tenant_id"].as_i64()), (201, Some(tid)), "{role}");
    let (s, v) = call(
        &p.http,
        a,
        &admin,
        "POST",
        "/api/v1/users",
        Some(json!({"username": "viewer1", "password": "viewer-pass", "role": "custom", "role_id": role["id"]})),
    )
    .await;
    assert_eq!((s, v["tenant_id"].as_i64()), (201, Some(tid)), "{v}");
    let viewer_id = v["id"].clone();
    let viewer = login_user(&p.http, a, "viewer1", "viewer-pass").await["access_token"].as_str().unwrap().to_string();
    for i in 0..5 {
        let (s, v) = call(
            &p.http,
            a,
            &admin,
            "POST",
            "/api/v1/devices",
            Some(json!({"device_number": format!("acme-{i}"), "name": format!("pump {}", 4 - i)})),
        )
        .await;
        assert_eq!((s, v["device"]["tenant_id"].as_i64()), (201, Some(tid)), "{v}");
    }
    let (s, v) = call(&p.http, a, &viewer, "GET", "/api/v1/devices?sort=-name&limit=2&offset=1&q=PUMP", None).await;
    assert_eq!(s, 200, "{v}");
    let names: Vec<&str> = v["items"].as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap()).collect();
    assert_eq!((names, v["total"].as_i64()), (vec!["pump 3", "pump 2"], Some(5)));
    let (s, v) = call(&p.http, a, &viewer, "GET", "/api/v1/devices?sort=secret", None).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("invalid")), "{v}");
    let (s, v) = call(&p.http, a, &viewer, "GET", "/api/v1/devices?limit=abc", None).await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("invalid")), "{v}");
    // Read-only: writing is forbidden (403), reading another's credentials is allowed by device:read.
    let (s, v) = call(&p.http, a, &viewer, "POST", "/api/v1/devices", Some(json!({"device_number": "v-1"}))).await;
    assert_eq!((s, v["error"]["code"].as_str()), (403, Some("forbidden")), "{v}");
    assert_eq!(call(&p.http, a, &viewer, "GET", "/api/v1/users", None).await.0, 403);
    // Changing the role takes effect at once (the cached principal is dropped).
    let (s, _) = call(
        &p.http,
        a,
        &admin,
        "PUT",
        &format!("/api/v1/roles/{}", role["id"]),
        Some(json!({"name": "viewer", "permissions": ["device:read", "device:write"]})),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(call(&p.http, a, &viewer, "POST", "/api/v1/devices", Some(json!({"device_number": "v-1"}))).await.0, 201);
    // Disabling a user ends its sessions.
    let (s, _) = call(&p.http, a, &admin, "PATCH", &format!("/api/v1/users/{viewer_id}"), Some(json!({"disabled": true}))).await;
    assert_eq!(s, 200);
    assert_eq!(call(&p.http, a, &viewer, "GET", "/api/v1/devices", None).await.0, 401);
    p.node.stop().await;
}

/// A valid body for each request schema (a new route with a new body needs one here).
fn sample(schema: &str) -> Value {
    match schema {
        "TenantBody" => json!({"name": "renamed"}),
        "NewProduct" => json!({"name": "p-x"}),
        "GroupBody" => json!({"name": "g-x"}),
        "NewDevice" => json!({"device_number": "x-1"}),
        "DeviceUpdate" => json!({"name": "x"}),
        "CredentialBody" => json!({"kind": "token"}),
        "DownlinkRequest" => json!({"method": "reboot", "params": {}}),
        "PolicyBody" => json!({"raw_days": 3}),
        "NewUserBody" => json!({"username": "x-user", "password": "x-password", "role": "tenant_user"}),
        "UserUpdate" => json!({"disabled": true}),
        "RoleBody" => json!({"name": "x", "permissions": []}),
        "PasswordBody" => json!({"current_password": "a", "new_password": "bbbbbbbbbb"}),
        "LoginBody" => json!({"username": "a", "password": "b"}),
        "RefreshBody" => json!({"refresh_token": "a.b"}),
        "RuleBody" => json!({"name": "r", "target": {"device": "x"}, "condition": {"key": "t", "op": ">", "value": 1}}),
        "ChannelBody" => json!({"name": "c", "kind": "webhook", "config": {"url": "http://127.0.0.1:9/"}}),
        "AckBody" => json!({}),
        "AssignBody" => json!({"package_id": 1}),
        "ClaimBody" => json!({"secret_key": "x"}),
        other => panic!("tests/api.rs has no sample body for request schema {other}: add one"),
    }
}

/// Every route of the OpenAPI document, called by tenant A's administrator with tenant B's
/// object ids: each answers 404 (writes and deletes included), and B's objects are intact
/// afterwards. Lists answer only A's rows.
#[tokio::test(flavor = "multi_thread")]
async fn tenant_isolation_over_every_route() {
    let p = start().await;
    let a = p.http_addr();
    let http = &p.http;
    let sys = |m: &'static str, path: String, body: Option<Value>| async move {
        let (s, v) = call(http, a, ADMIN_KEY, m, &path, body).await;
        // Every POST here creates an object: 201.
        assert_eq!(s, if m == "POST" { 201 } else { 200 }, "{m} {path}: {v}");
        v
    };
    let ta = sys("POST", "/api/v1/tenants".into(), Some(json!({"name": "tenant-a"}))).await["id"].as_i64().unwrap();
    let tb = sys("POST", "/api/v1/tenants".into(), Some(json!({"name": "tenant-b"}))).await["id"].as_i64().unwrap();
    sys(
        "POST",
        "/api/v1/users".into(),
        Some(json!({"username": "admin-a", "password": "password-a", "role": "tenant_admin", "tenant_id": ta})),
    )
    .await;
    let ub = sys(
        "POST",
        "/api/v1/users".into(),
        Some(json!({"username": "admin-b", "password": "password-b", "role": "tenant_admin", "tenant_id": tb})),
    )
    .await["id"]
        .clone();
    let pb = sys("POST", "/api/v1/products".into(), Some(json!({"name": "prod-b", "tenant_id": tb}))).await["id"].clone();
    let gb = sys("POST", "/api/v1/groups".into(), Some(json!({"name": "group-b", "tenant_id": tb}))).await["id"].clone();
    let token_b =
        sys("POST", "/api/v1/devices".into(), Some(json!({"device_number": "dev-b", "tenant_id": tb, "product_id": pb, "group_id": gb})))
            .await["access_token"]
            .as_str()
            .unwrap()
            .to_string();
    let rb = sys("POST", "/api/v1/roles".into(), Some(json!({"name": "role-b", "permissions": ["device:read"], "tenant_id": tb}))).await
        ["id"]
        .clone();
    let cb = sys("POST", "/api/v1/devices/dev-b/commands".into(), Some(json!({"method": "reboot", "params": {}}))).await["id"].clone();
    // A device's commands are a page like every list.
    let page = sys("GET", "/api/v1/devices/dev-b/commands?limit=1".into(), None).await;
    assert_eq!((page["items"][0]["id"].clone(), page["total"].as_i64(), page["limit"].as_i64()), (cb.clone(), Some(1), Some(1)), "{page}");
    let credb = sys("GET", "/api/v1/devices/dev-b/credentials".into(), None).await[0]["id"].clone();
    // A firmware package of tenant B (the body is the image itself).
    let pkgb = {
        let url = format!("http://{a}/api/v1/ota/packages?kind=firmware&title=fw-b&version=1&tenant_id={tb}");
        let r = http.post(url).bearer_auth(ADMIN_KEY).body(vec![7u8; 100]).send().await.unwrap();
        assert_eq!(r.status(), 201);
        r.json::<Value>().await.unwrap()["id"].clone()
    };
    let mut ids: BTreeMap<&str, Value> = BTreeMap::from([
        ("tenants", json!(tb)),
        ("products", pb.clone()),
        ("groups", gb.clone()),
        ("users", ub.clone()),
        ("roles", rb.clone()),
        ("commands", cb.clone()),
        ("credentials", credb.clone()),
        ("packages", pkgb.clone()),
        // A client-side RPC request id of B's device (the device decides it; none need wait).
        ("rpc", json!("1")),
    ]);
    // Alert objects of tenant B: a channel, a rule, and an alert the rule raised.
    {
        let ch = sys(
            "POST",
            "/api/v1/channels".into(),
            Some(json!({"name": "ch-b", "kind": "webhook", "config": {"url": "http://127.0.0.1:9/"}, "tenant_id": tb})),
        )
        .await["id"]
            .clone();
        let rule = sys(
            "POST",
            "/api/v1/alert-rules".into(),
            Some(json!({"name": "rule-b", "tenant_id": tb, "target": {"device": "dev-b"}, "condition": {"key": "t", "op": ">", "value": 1}, "channels": [ch]})),
        )
        .await["id"]
            .clone();
        ids.insert("channels", ch);
        ids.insert("alert-rules", rule.clone());
        let path = format!("/api/v1/alerts?rule_id={rule}");
        let end = tokio::time::Instant::now() + common::DEADLINE;
        let alert = loop {
            // The device reports over HTTP until the rule (starting in the background) raises.
            let r = http.post(format!("http://{a}/api/v1/{token_b}/telemetry")).json(&json!({"t": 5})).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let v = sys("GET", path.clone(), None).await;
            if let Some(x) = v["items"].as_array().and_then(|i| i.first()) {
                break x["id"].clone();
            }
            assert!(tokio::time::Instant::now() < end, "tenant B's rule raised no alert");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        ids.insert("alerts", alert);
    }
    let token_a = login_user(http, a, "admin-a", "password-a").await["access_token"].as_str().unwrap().to_string();

    let (_, doc) = call(http, a, ADMIN_KEY, "GET", "/api/openapi.json", None).await;
    let mut checked = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let with_body = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                .as_str()
                .map(|r| sample(r.rsplit('/').next().unwrap()))
                // A body of any JSON (no schema): an empty object reaches the handler.
                .or_else(|| op["requestBody"].is_object().then(|| json!({})));
            // Required query parameters get a value, so the request reaches the handler.
            let query: Vec<String> = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["in"] == "query" && p["required"] == true)
                .map(|p| format!("{}=1", p["name"].as_str().unwrap()))
                .collect();
            let q = if query.is_empty() { String::new() } else { format!("?{}", query.join("&")) };
            if !path.contains('{') {
                if method == "get" {
                    let (s, v) = call(http, a, &token_a, "GET", &format!("{path}{q}"), None).await;
                    assert_ne!(s, 404, "GET {path} is not routed: {v}");
                    if let Some(items) = v["items"].as_array() {
                        for it in items {
                            assert!(it.get("tenant_id").is_none_or(|t| t == &json!(ta)), "GET {path} as tenant A shows {it}");
                        }
                    }
                }
                continue;
            }
            // Fill the path: `{number}` is B's device, `{id}` the id of the collection it follows.
            let mut concrete = Vec::new();
            let segs: Vec<&str> = path.split('/').collect();
            for (i, seg) in segs.iter().enumerate() {
                concrete.push(match *seg {
                    "{number}" => "dev-b".to_string(),
                    "{id}" => {
                        let coll = segs[i - 1];
                        let v = ids.get(coll).unwrap_or_else(|| panic!("no tenant-B object for {{id}} after /{coll}/ in {path}: add one"));
                        v.to_string().trim_matches('"').to_string()
                    }
                    s => s.to_string(),
                });
            }
            let url = format!("{}{q}", concrete.join("/"));
            let (s, v) = call(http, a, &token_a, &method.to_uppercase(), &url, with_body).await;
            assert_eq!((s, v["error"]["code"].as_str()), (404, Some("not_found")), "{} {url} as tenant A: {v}", method.to_uppercase());
            assert!(!v["error"]["message"].as_str().unwrap_or("").starts_with("no resource"), "{url} is not routed");
            checked += 1;
        }
    }
    assert!(checked >= 30, "only {checked} routes with tenant objects were checked");
    // B's objects are all still there, unchanged.
    assert_eq!(sys("GET", "/api/v1/devices/dev-b".into(), None).await["device"]["name"], "dev-b");
    assert_eq!(sys("GET", format!("/api/v1/products/{pb}"), None).await["name"], "prod-b");
    assert_eq!(sys("GET", format!("/api/v1/users/{ub}"), None).await["disabled"], false);
    assert_eq!(sys("GET", format!("/api/v1/roles/{rb}"), None).await["permissions"], json!(["device:read"]));
    assert_eq!(sys("GET", format!("/api/v1/tenants/{tb}"), None).await["name"], "tenant-b");
    assert_eq!(sys("GET", format!("/api/v1/ota/packages/{pkgb}"), None).await["title"], "fw-b");
    assert_eq!(sys("GET", "/api/v1/devices/dev-b/credentials".into(), None).await.as_array().unwrap().len(), 1);
    assert_eq!(sys("GET", format!("/api/v1/alerts/{}", ids["alerts"]), None).await["status"], "active");
    assert_eq!(sys("GET", format!("/api/v1/alert-rules/{}", ids["alert-rules"]), None).await["name"], "rule-b");
    // Creating objects that point at B's from A is refused the same way.
    let (s, _) = call(http, a, &token_a, "POST", "/api/v1/devices", Some(json!({"device_number": "sneak", "product_id": pb}))).await;
    assert_eq!(s, 404);
    let (s, _) = call(http, a, &token_a, "POST", "/api/v1/devices", Some(json!({"device_number": "sneak", "tenant_id": tb}))).await;
    assert_eq!(s, 404);
    // The operators' API is for the system scope only.
    assert_eq!(call(http, a, &token_a, "GET", "/admin/v1/sessions", None).await.0, 403);
    p.node.stop().await;
}

/// The served document equals `docs/openapi.json` (regenerate with `UPDATE_OPENAPI=1`).
#[tokio::test(flavor = "multi_thread")]
async fn openapi_document_is_committed() {
    let p = start().await;
    let r = p.http.get(format!("http://{}/api/openapi.json", p.http_addr())).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let served: Value = r.json().await.unwrap();
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    if std::env::var("UPDATE_OPENAPI").is_ok() {
        std::fs::write(&file, serde_json::to_string_pretty(&served).unwrap() + "\n").unwrap();
    }
    let committed: Value = serde_json::from_str(&std::fs::read_to_string(&file).expect("docs/openapi.json")).unwrap();
    assert!(
        committed == served,
        "docs/openapi.json is out of date: run UPDATE_OPENAPI=1 cargo nextest run -E 'test(openapi_document_is_committed)'"
    );
    assert_eq!(served["openapi"].as_str().map(|v| v.starts_with("3.")), Some(true));
    // Client generators name methods by operation id: each must be unique.
    let mut ids = std::collections::BTreeMap::<String, Vec<String>>::new();
    for (path, ops) in served["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            if let Some(id) = op["operationId"].as_str() {
                ids.entry(id.to_string()).or_default().push(format!("{method} {path}"));
            }
        }
    }
    let twice: Vec<_> = ids.iter().filter(|(_, at)| at.len() > 1).collect();
    assert!(twice.is_empty(), "operation ids used more than once: {twice:?}");
    // Every operation describes its error body.
    for (path, ops) in served["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            assert!(op["responses"]["default"].is_object(), "{method} {path} describes no error response");
        }
    }
    // The document is valid OpenAPI, as client generators read it.
    match std::process::Command::new("openapi-spec-validator").arg(&file).output() {
        Ok(o) => assert!(
            o.status.success(),
            "openapi-spec-validator: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(_) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("openapi-spec-validator is required in CI (scripts/test installs it)")
        }
        Err(_) => eprintln!(
            "SKIPPED the validator part: openapi-spec-validator is not installed (pip install openapi-spec-validator; scripts/test does)"
        ),
    }
    p.node.stop().await;
}

fn schemathesis() -> Option<String> {
    for c in ["st", "schemathesis"] {
        if std::process::Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()) {
            return Some(c.into());
        }
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("schemathesis is required in CI (scripts/test installs it)");
    }
    eprintln!("SKIPPED: schemathesis is not installed (pip install schemathesis; scripts/test does)");
    None
}

/// Property-based fuzzing of every operation in the document: no answer is a server error.
#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_no_server_errors() {
    let Some(st) = schemathesis() else { return };
    let p = start().await;
    let a: SocketAddr = p.http_addr();
    let out = tokio::process::Command::new(st)
        .args(["run", &format!("http://{a}/api/openapi.json"), "--checks", "not_a_server_error", "--max-examples", "25", "--workers", "1"])
        .args(["-H", &format!("Authorization: Bearer {ADMIN_KEY}")])
        .env("NO_COLOR", "1")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(600), out).await.expect("schemathesis finishes").unwrap();
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "schemathesis found failures:\n{text}");
    // It did exercise the API: every documented operation was selected and fuzzed.
    let ops: usize = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Operations:").and_then(|r| r.split_whitespace().next()).and_then(|n| n.parse().ok()))
        .unwrap_or(0);
    assert!(ops >= 60, "schemathesis ran {ops} operations:\n{text}");
    p.node.stop().await;
}

/// The live websocket streams what the user's tenant may see, and nothing of other tenants.
#[tokio::test(flavor = "multi_thread")]
async fn websocket_streams_the_tenants_own_devices() {
    use futures_util::StreamExt;
    let p = start().await;
    let a = p.http_addr();
    let http = &p.http;
    let (_, ta) = call(http, a, ADMIN_KEY, "POST", "/api/v1/tenants", Some(json!({"name": "live-a"}))).await;
    let (_, tb) = call(http, a, ADMIN_KEY, "POST", "/api/v1/tenants", Some(json!({"name": "live-b"}))).await;
    let (s, _) = call(
        http,
        a,
        ADMIN_KEY,
        "POST",
        "/api/v1/users",
        Some(json!({"username": "live-user", "password": "live-pass-1", "role": "tenant_user", "tenant_id": ta["id"]})),
    )
    .await;
    assert_eq!(s, 201);
    let (_, da) =
        call(http, a, ADMIN_KEY, "POST", "/api/v1/devices", Some(json!({"device_number": "live-a1", "tenant_id": ta["id"]}))).await;
    let (_, db) =
        call(http, a, ADMIN_KEY, "POST", "/api/v1/devices", Some(json!({"device_number": "live-b1", "tenant_id": tb["id"]}))).await;
    let token = login_user(http, a, "live-user", "live-pass-1").await["access_token"].as_str().unwrap().to_string();
    // Without a token: refused before the upgrade.
    assert!(tokio_tungstenite::connect_async(format!("ws://{a}/api/v1/ws")).await.is_err());
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{a}/api/v1/ws?access_token={token}")).await.unwrap();
    async fn next<
        S: futures_util::Stream<Item = Result<tokio_tungstenite::tungstenite::Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
    >(
        ws: &mut S,
    ) -> Value {
        loop {
            let m = tokio::time::timeout(common::DEADLINE, ws.next()).await.expect("a websocket message").unwrap().unwrap();
            if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
                return serde_json::from_str::<Value>(&t).unwrap();
            }
        }
    }
    assert_eq!(next(&mut ws).await["type"], "hello");
    for (dev, v) in [(&db, 1), (&da, 2)] {
        let r = http
            .post(format!("http://{a}/api/v1/{}/telemetry", dev["access_token"].as_str().unwrap()))
            .json(&json!({"temp": v}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // B's reading (and B coming online) came first and was not shown; A's status (online,
    // it reports over HTTP) may come before its reading.
    let ev = loop {
        let ev = next(&mut ws).await;
        assert_eq!(ev["device"].as_str(), Some("live-a1"), "{ev}");
        if ev["type"] != "status" {
            break ev;
        }
    };
    assert_eq!((ev["type"].as_str(), ev["data"]["temp"].as_i64()), (Some("telemetry"), Some(2)), "{ev}");
    p.node.stop().await;
}

async fn login_from(p: &Platform, forwarded: &str, user: &str, pw: &str) -> u16 {
    let r = p.http.post(format!("http://{}/api/v1/auth/login", p.http_addr())).header("x-forwarded-for", forwarded);
    r.json(&json!({"username": user, "password": pw})).send().await.unwrap().status().as_u16()
}

/// Behind a trusted reverse proxy the login limit per address counts the client named by
/// X-Forwarded-For (right-most untrusted hop), and the audit log records it.
#[tokio::test(flavor = "multi_thread")]
async fn trusted_proxies_name_the_client() {
    let p = Platform::start(None, |c| {
        c.api.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
        c.api.login_fail_limit_address = 2;
        c.api.login_fail_limit_account = 100;
    })
    .await;
    // Two failures from one client behind the proxy: that client is limited…
    assert_eq!(login_from(&p, "198.51.100.1", "u1", "wrong-password").await, 401);
    assert_eq!(login_from(&p, "198.51.100.1", "u2", "wrong-password").await, 401);
    assert_eq!(login_from(&p, "198.51.100.1", ROOT_USER, ROOT_PASSWORD).await, 429);
    // …a forged left part does not move it off its address (the proxy appended the real one)…
    assert_eq!(login_from(&p, "203.0.113.50, 198.51.100.1", ROOT_USER, ROOT_PASSWORD).await, 429);
    // …while another client behind the same proxy still logs in, and is audited by its address.
    assert_eq!(login_from(&p, "198.51.100.2, 127.0.0.1", ROOT_USER, ROOT_PASSWORD).await, 200);
    let (s, log) = call(&p.http, p.http_addr(), ADMIN_KEY, "GET", "/api/v1/audit?q=login&limit=10", None).await;
    assert_eq!(s, 200, "{log}");
    let froms: Vec<&str> = log["items"].as_array().unwrap().iter().filter_map(|e| e["detail"]["from"].as_str()).collect();
    assert!(froms.contains(&"198.51.100.2") && !froms.contains(&"203.0.113.50"), "{log}");
    p.node.stop().await;
}

/// Without trusted proxies the header is the client's own word and is ignored.
#[tokio::test(flavor = "multi_thread")]
async fn forwarded_headers_from_untrusted_peers_are_ignored() {
    let p = Platform::start(None, |c| {
        c.api.login_fail_limit_address = 2;
        c.api.login_fail_limit_account = 100;
    })
    .await;
    assert_eq!(login_from(&p, "198.51.100.1", "u1", "wrong-password").await, 401);
    assert_eq!(login_from(&p, "198.51.100.2", "u2", "wrong-password").await, 401);
    assert_eq!(login_from(&p, "198.51.100.3", ROOT_USER, ROOT_PASSWORD).await, 429, "a new header does not escape the limit");
    p.node.stop().await;
}

/// CORS: preflights from an allowed origin are answered; others get no CORS headers.
#[tokio::test(flavor = "multi_thread")]
async fn cors_follows_the_configuration() {
    let p = Platform::start(None, |c| c.api.cors_origins = vec!["https://console.example".into()]).await;
    let a = p.http_addr();
    let pre = |origin: &'static str| {
        p.http
            .request(reqwest::Method::OPTIONS, format!("http://{a}/api/v1/devices"))
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "authorization")
            .send()
    };
    let r = pre("https://console.example").await.unwrap();
    assert_eq!(r.headers().get("access-control-allow-origin").and_then(|v| v.to_str().ok()), Some("https://console.example"));
    let r = pre("https://evil.example").await.unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    p.node.stop().await;
}

/// Two nodes sharing PostgreSQL and Redis: a token from one works on the other, and a logout
/// on either ends the session on both at once.
#[tokio::test(flavor = "multi_thread")]
async fn sessions_are_shared_and_revoked_across_nodes() {
    let Some(pg) = common::backends::postgres().await else { return };
    let Some(redis) = common::backends::redis() else { return };
    let prefix = format!("s{:x}:", rand::random::<u32>());
    let cl = common::cluster::TestCluster::start_some(2, 2, move |_| {
        format!(
            "\n[meta]\nurl = \"{pg}\"\n\n[cache]\nurl = \"{redis}\"\nprefix = \"{prefix}\"\n\n[devices]\nadmin_key = \"{ADMIN_KEY}\"\n\n[api]\nadmin_user = \"{ROOT_USER}\"\nadmin_password = \"{ROOT_PASSWORD}\"\n"
        )
    })
    .await;
    let http = client();
    let (n1, n2) = (cl.http(0), cl.http(1));
    let t = login_user(&http, n1, ROOT_USER, ROOT_PASSWORD).await;
    let token = t["access_token"].as_str().unwrap();
    assert_eq!(call(&http, n2, token, "GET", "/api/v1/auth/me", None).await.0, 200, "one signing secret for both nodes");
    assert_eq!(call(&http, n2, token, "POST", "/api/v1/auth/logout", None).await.0, 200);
    assert_eq!(call(&http, n1, token, "GET", "/api/v1/auth/me", None).await.0, 401, "logged out everywhere");
    let r = http.post(format!("http://{n1}/api/v1/auth/refresh")).json(&json!({"refresh_token": t["refresh_token"]})).send().await.unwrap();
    assert_eq!(r.status(), 401);

    // A websocket on node 2 sees a device reporting to node 1.
    use futures_util::StreamExt;
    let (_, dev) = call(&http, n1, ADMIN_KEY, "POST", "/api/v1/devices", Some(json!({"device_number": "x-node-1"}))).await;
    let dev_token = dev["access_token"].as_str().unwrap().to_string();
    let token = login_user(&http, n2, ROOT_USER, ROOT_PASSWORD).await["access_token"].as_str().unwrap().to_string();
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{n2}/api/v1/ws?access_token={token}")).await.unwrap();
    let end = tokio::time::Instant::now() + common::DEADLINE;
    'wait: loop {
        // Node 1 streams to node 2 once it has heard node 2 ask: report until it shows.
        let r = http.post(format!("http://{n1}/api/v1/{dev_token}/telemetry")).json(&json!({"t": 1})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        while let Ok(Some(Ok(m))) = tokio::time::timeout(std::time::Duration::from_millis(200), ws.next()).await {
            if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "telemetry" && v["device"] == "x-node-1" {
                    break 'wait;
                }
            }
        }
        assert!(tokio::time::Instant::now() < end, "node 2's websocket never saw node 1's device");
    }
}

/// The first start creates the system administrator and prints its password once; a restart
/// prints nothing (the password stays what it was).
#[tokio::test(flavor = "multi_thread")]
async fn first_start_prints_the_admin_password_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = common::process::spawn(dir.path(), &[]).await;
    let line = n.wait_log("with the admin password", |l| l.contains("web/API user \"admin\" password (shown once")).await;
    let pw = line.rsplit(' ').next().unwrap().to_string();
    let http = client();
    let t = login_user(&http, n.http, "admin", &pw).await;
    assert_eq!(t["user"]["role"], "system_admin");
    n.child.kill().await.unwrap();
    let n = common::process::spawn(dir.path(), &[]).await;
    assert!(!n.log.lock().unwrap().iter().any(|l| l.contains("password (shown once")), "printed again");
    login_user(&http, n.http, "admin", &pw).await;
}
