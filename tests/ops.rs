//! Operators: `thingsctl` run as a process against a real 3-node cluster (every command, table
//! and JSON), the cluster-wide admin API behind it, the actor inspector, live traces, kicks,
//! join/leave of a fourth node, readiness that waits for the cluster, and `/metrics` parsed
//! with a Prometheus text parser. One cluster for the whole file (started once).

use std::process::Stdio;
use std::time::Duration;

use crate::common::cluster::TestCluster;
use crate::common::platform::ADMIN_KEY;
use crate::common::{http_get, publish, subscribe, Raw, DEADLINE};
use serde_json::Value;
use thingsd::protocols::mqtt::*;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Run thingsctl against `http`; (exit code, stdout, stderr).
async fn ctl_with(http: std::net::SocketAddr, key: &str, args: &[&str]) -> (i32, String, String) {
    let out = tokio::time::timeout(
        DEADLINE * 3,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_thingsctl"))
            .arg("--url")
            .arg(format!("http://{http}"))
            .arg("--key")
            .arg(key)
            .args(args)
            .env_remove("THINGSCTL_URL")
            .env_remove("THINGSCTL_KEY")
            .output(),
    )
    .await
    .expect("thingsctl finishes")
    .expect("run thingsctl");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

async fn ctl(cl: &TestCluster, args: &[&str]) -> String {
    let (code, out, err) = ctl_with(cl.http(0), ADMIN_KEY, args).await;
    assert_eq!(code, 0, "thingsctl {args:?} failed: {err}\n{out}");
    out
}

async fn ctl_json(cl: &TestCluster, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = ctl(cl, &a).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("thingsctl {args:?} --json: {e}: {out}"))
}

/// Poll `f` (a JSON command) until `done` accepts its answer.
async fn until(cl: &TestCluster, args: &[&str], what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let end = tokio::time::Instant::now() + DEADLINE * 2;
    loop {
        let v = ctl_json(cl, args).await;
        if done(&v) {
            return v;
        }
        assert!(tokio::time::Instant::now() < end, "timed out waiting for {what}: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn items(v: &Value) -> Vec<Value> {
    v["items"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thingsctl_against_a_three_node_cluster() {
    let mut cl = TestCluster::start_some(4, 3, |_| format!("\n[devices]\nadmin_key = \"{ADMIN_KEY}\"\n")).await;

    // Keys: wrong key and unreachable node are errors with a clear message and exit status 1.
    let (code, _, err) = ctl_with(cl.http(0), "wrong-key", &["cluster", "status"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("refused the admin API key"), "{err}");
    let (code, _, err) = ctl_with("127.0.0.1:1".parse().unwrap(), ADMIN_KEY, &["cluster", "status"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot connect"), "{err}");
    let (code, _, err) = ctl_with(cl.http(0), ADMIN_KEY, &["sessions", "frobnicate"]).await;
    assert_eq!(code, 2, "{err}");
    // Bad parameters: 400 with the reason, never a partial answer.
    for (args, why) in [
        (&["sessions", "list", "--limit", "many"][..], "limit must be"),
        (&["sessions", "list", "--state", "sleepy"][..], "use connected, offline or all"),
        (&["actors", "list", "--sort", "colour"][..], "cannot sort by"),
        (&["actors", "list", "--node", "node9"][..], "no node named"),
    ] {
        let (code, _, err) = ctl_with(cl.http(0), ADMIN_KEY, args).await;
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
    }

    // cluster status: every node up, with version and uptime; link round trips to the others.
    let table = ctl(&cl, &["cluster", "status"]).await;
    assert!(table.starts_with("answered by node1"), "{table}");
    for n in ["node1", "node2", "node3"] {
        assert!(table.lines().any(|l| l.starts_with(n) && l.contains(" up ") && l.contains(env!("CARGO_PKG_VERSION"))), "{n}: {table}");
    }
    let st = ctl_json(&cl, &["cluster", "status"]).await;
    let nodes = st["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{st}");
    assert!(nodes.iter().all(|n| n["state"] == "up"), "{st}");
    assert!(nodes.iter().filter(|n| n["node"] != "node1").all(|n| n["rtt_ms"].as_f64().is_some()), "{st}");

    // Actors: counted per node; a session actor appears when a client connects to node 2.
    let sessions_before = items(&ctl_json(&cl, &["actors", "list", "--kind", "session"]).await).len();
    let mut c1 = Raw::v5(cl.mqtt(1), "ops-c1").await;
    c1.send(subscribe(1, "ops/in/#", QoS::AtLeastOnce)).await;
    assert!(matches!(c1.recv().await, Some(Packet::SubAck(_))));
    let acts = ctl_json(&cl, &["actors", "list", "--kind", "session"]).await;
    assert_eq!(items(&acts).len(), sessions_before + 1, "{acts}");
    let mine = items(&acts).into_iter().find(|a| a["name"] == "session:ops-c1").expect("the client's session actor");
    assert_eq!(mine["node"], "node2");
    assert!(mine["handled"].as_u64().unwrap() >= 2, "attach and subscribe were handled: {mine}");
    let table = ctl(&cl, &["actors", "list", "--sort", "handled", "--limit", "5"]).await;
    assert!(table.starts_with("NAME"), "{table}");
    assert_eq!(table.lines().count(), 6, "{table}");
    let all = ctl_json(&cl, &["actors", "list"]).await;
    for kind in ["supervisor", "registry", "shard", "retained", "cluster", "writer", "session"] {
        assert!(items(&all).iter().any(|a| a["kind"] == kind), "no {kind} actor: {all}");
    }
    for n in ["node1", "node2", "node3"] {
        assert!(items(&all).iter().any(|a| a["node"] == n && a["kind"] == "registry"), "{n}");
    }
    let one = ctl_json(&cl, &["actors", "show", "registry:0", "--node", "node3"]).await;
    assert_eq!(one["node"], "node3");
    assert_eq!(one["parent"], "supervisor:node3");
    let tree = ctl(&cl, &["actors", "tree", "--node", "node2"]).await;
    assert!(
        tree.contains("supervisor:node2 (supervisor)") && tree.contains("registry:0 (registry)") && tree.contains("session:ops-c1"),
        "{tree}"
    );
    let (code, _, err) = ctl_with(cl.http(0), ADMIN_KEY, &["actors", "show", "nope:1"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("not found"), "{err}");

    // Sessions and subscriptions, whichever node is asked.
    let s = ctl_json(&cl, &["sessions", "list", "--client", "ops-*"]).await;
    let row = items(&s).into_iter().find(|r| r["client_id"] == "ops-c1").expect("listed");
    assert_eq!((row["node"].as_str(), row["connected"].as_bool(), row["protocol"].as_str()), (Some("node2"), Some(true), Some("5.0")));
    let table = ctl(&cl, &["sessions", "list", "--state", "connected"]).await;
    assert!(table.lines().any(|l| l.starts_with("ops-c1") && l.contains("node2")), "{table}");
    assert!(items(&ctl_json(&cl, &["sessions", "list", "--state", "offline", "--client", "ops-c1"]).await).is_empty());
    // Listing by state reads the registry's connected flags: a connected session is not asked
    // (its actor handles no message) when only offline ones are listed.
    let handled = |v: &Value| v["handled"].as_u64().expect("handled count");
    let before = handled(&ctl_json(&cl, &["actors", "show", "session:ops-c1", "--node", "node2"]).await);
    for _ in 0..3 {
        let _ = ctl_json(&cl, &["sessions", "list", "--state", "offline"]).await;
    }
    assert_eq!(handled(&ctl_json(&cl, &["actors", "show", "session:ops-c1", "--node", "node2"]).await), before);
    let show = ctl_json(&cl, &["sessions", "show", "ops-c1"]).await;
    assert_eq!(show["subscriptions"][0]["filter"], "ops/in/#");
    assert!(show["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{show}");
    let text = ctl(&cl, &["sessions", "show", "ops-c1"]).await;
    assert!(text.contains("node: node2") && text.contains("ops/in/#"), "{text}");
    let subs = ctl_json(&cl, &["subscriptions", "list", "--filter", "ops/*"]).await;
    assert_eq!(items(&subs).len(), 1, "{subs}");
    assert_eq!(items(&subs)[0]["client_id"], "ops-c1");
    let routes = ctl_json(&cl, &["routes", "list"]).await;
    let r = items(&routes).into_iter().find(|r| r["filter"] == "ops/in/#").expect("route");
    assert_eq!(r["nodes"], serde_json::json!(["node2"]));
    let table = ctl(&cl, &["routes", "list", "--node", "node3"]).await;
    assert!(table.lines().any(|l| l.starts_with("ops/in/#") && l.contains("node2")), "node3 knows node2's route: {table}");

    // Retained: listed (replicated), deleted cluster-wide.
    let mut p = Raw::v5(cl.mqtt(2), "ops-pub").await;
    let mut keep = publish("ops/state/a", QoS::AtLeastOnce, 1, "on");
    if let Packet::Publish(x) = &mut keep {
        x.retain = true;
    }
    p.send(keep).await;
    assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
    until(&cl, &["retained", "list", "--filter", "ops/#"], "retained replicated to node1", |v| items(v).len() == 1).await;
    let table = ctl(&cl, &["retained", "list", "--filter", "ops/#"]).await;
    assert!(table.lines().any(|l| l.starts_with("ops/state/a") && l.ends_with("on")), "{table}");
    assert!(ctl(&cl, &["retained", "delete", "ops/state/a"]).await.contains("deleted"));
    let (code, _, err) = ctl_with(cl.http(0), ADMIN_KEY, &["retained", "list", "--filter", "a/#/b"]).await;
    assert_eq!(code, 1, "{err}");
    let (code, out, err) = ctl_with(cl.http(2), ADMIN_KEY, &["retained", "list", "--filter", "ops/#", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let end = tokio::time::Instant::now() + DEADLINE;
    let mut out = out;
    while !items(&serde_json::from_str(&out).unwrap()).is_empty() {
        assert!(tokio::time::Instant::now() < end, "deletion reaches node3: {out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        out = ctl_with(cl.http(2), ADMIN_KEY, &["retained", "list", "--filter", "ops/#", "--json"]).await.1;
    }

    // Trace through node 1 of a client on node 2: its packets, in and out, live.
    let mut trace = tokio::process::Command::new(env!("CARGO_BIN_EXE_thingsctl"))
        .args(["--url", &format!("http://{}", cl.http(0)), "--key", ADMIN_KEY, "--json", "trace", "ops-c1", "--secs", "30"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(trace.stdout.take().unwrap()).lines();
    let head: Value = serde_json::from_str(&tokio::time::timeout(DEADLINE, lines.next_line()).await.unwrap().unwrap().unwrap()).unwrap();
    assert_eq!(head["trace"], "ops-c1");
    assert_eq!(head["nodes"].as_array().unwrap().len(), 3, "{head}");
    p.send(publish("ops/in/x", QoS::AtLeastOnce, 2, "traced-payload")).await;
    c1.send(publish("ops/out", QoS::AtMostOnce, 0, "from-c1")).await;
    let (mut saw_out, mut saw_in) = (false, false);
    while !(saw_out && saw_in) {
        let l = tokio::time::timeout(DEADLINE, lines.next_line()).await.expect("trace line in time").unwrap().expect("trace runs");
        let v: Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["client_id"], "ops-c1", "{v}");
        assert_eq!(v["node"], "node2", "{v}");
        saw_out |= v["dir"] == "out" && v["type"] == "PUBLISH" && v["topic"] == "ops/in/x" && v["payload"] == "traced-payload";
        saw_in |= v["dir"] == "in" && v["type"] == "PUBLISH" && v["topic"] == "ops/out";
    }
    trace.kill().await.unwrap();

    // Kick: the client gets DISCONNECT 0x98 from node 2, asked through node 1.
    let out = ctl(&cl, &["sessions", "kick", "ops-c1"]).await;
    assert!(out.contains("disconnected on node2"), "{out}");
    let closed = c1.until_closed().await;
    assert!(closed.iter().any(|p| matches!(p, Packet::Disconnect(d) if d.code == reason::ADMINISTRATIVE_ACTION)), "{closed:?}");
    let (code, _, err) = ctl_with(cl.http(0), ADMIN_KEY, &["sessions", "show", "nobody-here"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("404") && err.contains("not found"), "{err}");

    // metrics: per node and totals.
    let m = ctl_json(&cl, &["metrics"]).await;
    assert_eq!(m["nodes"].as_array().unwrap().len(), 3);
    assert!(m["total"]["messages_received"].as_u64().unwrap() >= 3, "{m}");
    let table = ctl(&cl, &["metrics"]).await;
    assert!(table.starts_with("METRIC") && table.contains("TOTAL") && table.contains("clients_connected"), "{table}");

    // /metrics of node 2, parsed: packets by type and QoS, the kick by reason, actors by kind.
    let (status, body) = http_get(cl.http(1), "/metrics").await;
    assert_eq!(status, 200);
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text format");
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    assert!(value("thingsd_mqtt_packets_received_total", &[("type", "subscribe")]) >= 1.0);
    assert!(value("thingsd_mqtt_publish_sent_total", &[("qos", "1")]) >= 1.0);
    assert!(value("thingsd_mqtt_publish_received_total", &[("qos", "0")]) >= 1.0);
    assert!(value("thingsd_mqtt_disconnects_total", &[("by", "server"), ("reason", "administrative_action")]) >= 1.0);
    assert!(value("thingsd_mqtt_connacks_total", &[("reason", "success")]) >= 1.0);
    assert!(value("thingsd_actors", &[("kind", "registry")]) == 1.0);
    assert_eq!(value("thingsd_cluster_peer_up", &[("peer", "node1")]), 1.0);
    assert!(value("thingsd_routes", &[("scope", "remote")]) >= 0.0);
    for s in &scrape.samples {
        assert!(s.metric.starts_with("thingsd_"), "{}", s.metric);
    }
    // Every family is typed, and counters end in _total (histogram parts aside).
    for line in body.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut w = line.split_whitespace().skip(2);
        let (name, kind) = (w.next().unwrap(), w.next().unwrap());
        if kind == "counter" {
            assert!(name.ends_with("_total"), "{name}");
        }
    }

    // A fourth node whose seed is wrong is not ready (cluster not joined) until an operator
    // has it join through thingsctl; then it leaves again.
    cl.seeds = Some(vec!["127.0.0.1:1".into()]);
    cl.env.insert(3, vec![("THINGSD_CLUSTER__JOIN_TIMEOUT_SECS".into(), "3600".into())]);
    cl.spawn(3).await;
    let (status, body) = http_get(cl.http(3), "/health/ready").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("cluster joined: false"), "{body}");
    let seed = cl.nodes[0].ready.cluster.unwrap().to_string();
    let (code, out, err) = ctl_with(cl.http(3), ADMIN_KEY, &["cluster", "join", &seed]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("joining"), "{out}");
    cl.wait_members(0, 4).await;
    cl.wait_members(3, 4).await;
    let (status, body) = http_get(cl.http(3), "/health/ready").await;
    assert_eq!(status, 200, "{body}");
    let st = ctl_json(&cl, &["cluster", "status"]).await;
    assert_eq!(st["nodes"].as_array().unwrap().len(), 4, "{st}");
    let out = ctl(&cl, &["cluster", "leave", "node4"]).await;
    assert!(out.contains("left: yes"), "{out}");
    cl.wait_members(0, 3).await;
    cl.wait_members(1, 3).await;
    // It stays gone (nobody redials it) and runs alone.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(cl.members_up(0).await, 3);
    assert_eq!(cl.members_up(3).await, 1);
    let st = ctl_json(&cl, &["cluster", "status"]).await;
    assert!(st["nodes"].as_array().unwrap().iter().any(|n| n["node"] == "node4" && n["state"] == "down"), "{st}");
    let (code, _, err) = ctl_with(cl.http(0), ADMIN_KEY, &["cluster", "join", "no-port"]).await;
    assert_eq!(code, 1, "{err}");
}
