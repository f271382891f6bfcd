//! Monitoring as operators run it: `/metrics` passes `promtool check metrics`; the shipped
//! Prometheus alerting rules pass `promtool check rules`, name only metrics a node exposes, and
//! load into a real Prometheus that scrapes a live node and evaluates every rule without error;
//! the Grafana dashboard queries only metrics a node exposes. (Debian's `prometheus` package,
//! installed by scripts/test.)
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use crate::common::platform::*;
use crate::common::*;
use serde_json::{json, Value};
use thingsd::protocols::mqtt::*;

fn deploy(file: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(file).display().to_string()
}

/// `thingsd_…` names a text mentions.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("thingsd_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

async fn run(cmd: &str, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use tokio::io::AsyncWriteExt;
    let mut c = tokio::process::Command::new(cmd);
    c.args(args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).stdin(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap_or_else(|e| panic!("{cmd}: {e} (Debian's prometheus package; scripts/test installs it)"));
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).await.unwrap();
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await.unwrap().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_a_node_and_loads_the_alerting_rules() {
    // Clustered and with a webhook, so the cluster and webhook families are on the page too.
    let p = Platform::start(None, |c| {
        c.cluster.enabled = true;
        c.cluster.listen = "127.0.0.1:0".parse().unwrap();
        c.webhooks = vec![thingsd::webhooks::WebhookConfig {
            hook: "on_client_offline".into(),
            endpoint: "http://127.0.0.1:9/hooks".into(),
            timeout_ms: 500,
            on_failure: thingsd::webhooks::OnFailure::Allow,
            base64_payload: true,
            queue: 100,
            batch: 8,
        }];
    })
    .await;
    // Some traffic, so counters and histograms have samples.
    let (_, token) = p.create_device("mon-1", json!({})).await;
    let mut d = device(p.node.tcp, Protocol::V5, "mon-1", &token).await;
    assert_eq!(pub1(&mut d, "devices/telemetry", 1, r#"{"t": 1}"#).await, 0);
    let page = p.http.get(format!("http://{}/metrics", p.http_addr())).send().await.unwrap().text().await.unwrap();

    let (ok, out) = run("promtool", &["check", "metrics"], Some(&page)).await;
    assert!(ok && out.trim().is_empty(), "promtool check metrics: {out}");
    let rules = deploy("prometheus/thingsd-alerts.yml");
    let (ok, out) = run("promtool", &["check", "rules", &rules], None).await;
    assert!(ok, "promtool check rules: {out}");

    // Every metric the rules and the dashboard query exists on a node (a renamed metric
    // would leave a rule or a panel silently empty).
    let exposed = metric_names(&page);
    let dashboard = std::fs::read_to_string(deploy("grafana/thingsd-dashboard.json")).unwrap();
    let parsed: Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    assert!(parsed["panels"].as_array().is_some_and(|p| p.len() >= 10), "dashboard panels");
    for (what, text) in [("rules", std::fs::read_to_string(&rules).unwrap()), ("dashboard", dashboard)] {
        let missing: Vec<String> = metric_names(&text).difference(&exposed).cloned().collect();
        assert!(missing.is_empty(), "the {what} query metrics no node exposes: {missing:?}");
    }

    // A real Prometheus: scrapes the node every second and evaluates the rules.
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [\"{rules}\"]\nscrape_configs:\n  - job_name: thingsd\n    static_configs: [{{targets: [\"{}\"]}}]\n",
            p.http_addr()
        ),
    )
    .unwrap();
    let _prom = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus (Debian's prometheus package; scripts/test installs it)");
    let api = |path: &str| {
        let (http, url) = (p.http.clone(), format!("http://127.0.0.1:{port}/api/v1/{path}"));
        async move {
            match http.get(url).send().await {
                Ok(r) => r.json::<Value>().await.unwrap_or(Value::Null),
                Err(_) => Value::Null,
            }
        }
    };
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let up = api("query?query=up%7Bjob%3D%22thingsd%22%7D").await;
        let uptime = api("query?query=thingsd_uptime_seconds").await;
        let groups = api("rules").await;
        let rules: Vec<&Value> =
            groups["data"]["groups"].as_array().into_iter().flatten().flat_map(|g| g["rules"].as_array().into_iter().flatten()).collect();
        let scraped = up["data"]["result"][0]["value"][1] == "1" && uptime["data"]["result"].as_array().is_some_and(|r| !r.is_empty());
        let evaluated = rules.len() >= 13 && rules.iter().all(|r| r["health"] == "ok");
        if scraped && evaluated {
            let bad: Vec<&Value> = rules.iter().filter(|r| r["state"] == "firing" && r["name"] != "ThingsdRestarted").copied().collect();
            assert!(bad.is_empty(), "a healthy node fires alerts: {bad:?}");
            break;
        }
        assert!(tokio::time::Instant::now() < end, "Prometheus did not scrape the node and evaluate the rules: up {up}, rules {groups}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    d.send(disconnect()).await;
}
