//! Devices on a two-node cluster sharing one PostgreSQL: a device connected to node 2 is
//! online, commandable, disabled and revoked through node 1's admin API — with the in-process
//! cache (invalidated over the cluster links) and with Redis.
use crate::common;

use crate::common::cluster::TestCluster;
use crate::common::platform::*;
use serde_json::json;
use thingsd::protocols::mqtt::*;

#[tokio::test]
async fn devices_across_nodes_in_process_cache() {
    let Some(pg) = common::backends::postgres().await else { return };
    across_nodes(pg, None).await;
}

#[tokio::test]
async fn devices_across_nodes_redis_cache() {
    let Some(pg) = common::backends::postgres().await else { return };
    let Some(redis) = common::backends::redis() else { return };
    across_nodes(pg, Some(redis)).await;
}

async fn across_nodes(pg: String, redis: Option<String>) {
    let cache = match redis {
        Some(r) => format!("\n[cache]\nurl = \"{r}\"\nprefix = \"c{:x}:\"\n", rand::random::<u32>()),
        None => String::new(),
    };
    let cl = TestCluster::start_some(2, 2, move |_| format!("\n[meta]\nurl = \"{pg}\"\n\n[devices]\nadmin_key = \"{ADMIN_KEY}\"\n{cache}"))
        .await;
    let http = client();
    let n1 = cl.http(0);
    let (_, t1) = create_device(&http, n1, "cd-1", json!({})).await;
    let (_, t2) = create_device(&http, n1, "cd-2", json!({})).await;

    // Connected to node 2: online as node 1 sees it, and commandable through node 1.
    let mut d1 = device(cl.mqtt(1), Protocol::V5, "c", &t1).await;
    assert_eq!(sub(&mut d1, "devices/command/cd-1/+").await, [1]);
    wait_online(&http, n1, "cd-1", true).await;
    let (s, cmd) = admin(&http, n1, "POST", "/api/v1/devices/cd-1/commands", Some(json!({"method": "hello", "params": {}}))).await;
    assert_eq!(s, 201, "{cmd}");
    let mid = cmd["message_id"].as_str().unwrap();
    let c = next_on(&mut d1, &format!("devices/command/cd-1/{mid}")).await;
    assert_eq!(json_of(&c)["method"], "hello");
    // Accepted: the platform consumed it, so it is a success (0x00) although no MQTT client
    // subscribes to responses here (not 0x10, which device SDKs log as a failure).
    assert_eq!(pub1(&mut d1, &format!("devices/command/response/{mid}"), 1, r#"{"result": 0}"#).await, reason::SUCCESS);
    wait_command(&http, n1, cmd["id"].as_i64().unwrap(), "acknowledged").await;

    // Revoking a credential on node 1 closes the device on node 2, whose cache had it.
    let mut d2 = device(cl.mqtt(1), Protocol::V5, "c", &t2).await;
    d2.sync().await;
    let (_, creds) = admin(&http, n1, "GET", "/api/v1/devices/cd-2/credentials", None).await;
    let id = creds[0]["id"].as_i64().unwrap();
    let (s, _) = admin(&http, n1, "DELETE", &format!("/api/v1/devices/cd-2/credentials/{id}"), None).await;
    assert_eq!(s, 200);
    assert_kicked(&mut d2).await;
    assert_eq!(login(cl.mqtt(1), Protocol::V5, "c", Some(&t2), None).await.1, reason::BAD_USERNAME_OR_PASSWORD);

    // Disabling on node 1 disconnects on node 2 at once, and node 2 refuses it after.
    let (s, _) = admin(&http, n1, "PATCH", "/api/v1/devices/cd-1", Some(json!({"enabled": false}))).await;
    assert_eq!(s, 200);
    assert_kicked(&mut d1).await;
    assert_eq!(login(cl.mqtt(1), Protocol::V5, "c", Some(&t1), None).await.1, reason::NOT_AUTHORIZED);
    wait_online(&http, n1, "cd-1", false).await;
}
