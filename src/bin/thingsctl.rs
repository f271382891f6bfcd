//! thingsctl: the operator's command line for a thingsd cluster. It talks to any node's admin
//! API (`/admin/v1/…`, `/api/v1/…`) with the admin API key; every command answers for the
//! whole cluster unless `--node` names one node. Human tables by default, `--json` for scripts.
//! Exit status: 0 done, 1 the node refused or could not be reached, 2 bad usage.
use std::io::Write;
use std::process::ExitCode;

use serde_json::{json, Value};

const USAGE: &str = "usage: thingsctl [--url URL] [--key KEY] [--json] [--node NODE] <command>

Connection: --url (or THINGSCTL_URL, default http://127.0.0.1:8080), --key (or THINGSCTL_KEY).

Commands:
  cluster status                      members, state, uptime, version, link round trip
  cluster join <seed host:port>       make the node (--node, default the one asked) dial a seed
  cluster leave <node>                the node leaves the cluster (its sessions move to the others)
  sessions list [--client PATTERN] [--state connected|offline] [--limit N]
  sessions show <client id> [--device NUMBER]
  sessions kick <client id> [--device NUMBER] [--discard]
  subscriptions list [--client PATTERN] [--filter PATTERN] [--limit N]
  routes list                         filter -> nodes (with --node: that node's whole table)
  retained list [--filter MQTT-FILTER] [--limit N]
  retained delete <topic>
  actors list [--kind KIND] [--sort name|kind|node|mailbox|handled|mean_us|max_us|restarts|age_secs] [--limit N]
  actors tree [--max-children N]
  actors show <name>
  trace <client id> [--secs N]        stream the client's packets until Ctrl-C (or N seconds)
  devices list [--limit N]            devices show <number>
  webhooks list                       broker webhooks per node: endpoint, policy, requests, failures, drops
  metrics                             key counters per node and for the cluster";

struct Ctl {
    url: String,
    key: String,
    json: bool,
    node: Option<String>,
    opts: Vec<(String, String)>,
    flags: Vec<String>,
    http: reqwest::Client,
}

enum Fail {
    Usage(String),
    Error(String),
}

type Res = Result<(), Fail>;

fn main() -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("thingsctl: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(std::env::args().skip(1).collect())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail::Usage(m)) => {
            eprintln!("thingsctl: {m}\n\n{USAGE}");
            ExitCode::from(2)
        }
        Err(Fail::Error(m)) => {
            eprintln!("thingsctl: {m}");
            ExitCode::from(1)
        }
    }
}

/// Options taking a value; everything else starting with `--` is a flag.
const VALUED: &[&str] = &["url", "key", "node", "client", "state", "limit", "device", "filter", "kind", "sort", "max-children", "secs"];

async fn run(args: Vec<String>) -> Res {
    let mut words = Vec::new();
    let mut opts = Vec::new();
    let mut flags = Vec::new();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        if a == "-h" || a == "--help" || a == "help" {
            println!("{USAGE}");
            return Ok(());
        }
        if let Some(name) = a.strip_prefix("--") {
            let (name, inline) = match name.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (name.to_string(), None),
            };
            if VALUED.contains(&name.as_str()) {
                let v = match inline {
                    Some(v) => v,
                    None => it.next().ok_or_else(|| Fail::Usage(format!("--{name} needs a value")))?,
                };
                opts.push((name, v));
            } else if ["json", "discard"].contains(&name.as_str()) {
                flags.push(name);
            } else {
                return Err(Fail::Usage(format!("unknown option --{name}")));
            }
        } else {
            words.push(a);
        }
    }
    let get = |n: &str| opts.iter().rev().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let url = get("url").or_else(|| std::env::var("THINGSCTL_URL").ok()).unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let key = get("key").or_else(|| std::env::var("THINGSCTL_KEY").ok()).unwrap_or_default();
    let http =
        reqwest::Client::builder().connect_timeout(std::time::Duration::from_secs(5)).build().map_err(|e| Fail::Error(e.to_string()))?;
    let ctl = Ctl {
        url: url.trim_end_matches('/').to_string(),
        key,
        json: flags.iter().any(|f| f == "json"),
        node: get("node"),
        opts,
        flags,
        http,
    };
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    match w.as_slice() {
        ["cluster", "status"] => ctl.cluster_status().await,
        ["cluster", "join", seed] => ctl.post("/admin/v1/cluster/join", &ctl.with_node(&[]), json!({ "seed": seed })).await,
        ["cluster", "leave", node] => ctl.post("/admin/v1/cluster/leave", &[], json!({ "node": node })).await,
        ["sessions", "list"] => ctl.sessions_list().await,
        ["sessions", "show", client] => ctl.session_show(client).await,
        ["sessions", "kick", client] => ctl.kick(client).await,
        ["subscriptions", "list"] => ctl.subscriptions().await,
        ["routes", "list"] => ctl.routes().await,
        ["retained", "list"] => ctl.retained().await,
        ["retained", "delete", topic] => ctl.retained_delete(topic).await,
        ["actors", "list"] => ctl.actors().await,
        ["actors", "tree"] => ctl.tree().await,
        ["actors", "show", name] => ctl.actor(name).await,
        ["trace", client] => ctl.trace(client).await,
        ["metrics"] => ctl.metrics().await,
        ["webhooks", "list"] => {
            let v = ctl.get("/admin/v1/webhooks", &ctl.with_node(&[])).await?;
            ctl.items(
                &v,
                &["NODE", "HOOK", "ENDPOINT", "ON_FAILURE", "REQUESTS", "FAILURES", "CACHE_HITS", "DROPPED"],
                &["node", "hook", "endpoint", "on_failure", "requests", "failures", "cache_hits", "dropped"],
            )
        }
        ["devices", "list"] => ctl.devices().await,
        ["devices", "show", n] => {
            let v = ctl.get(&format!("/api/v1/devices/{}", enc(n)), &[]).await?;
            ctl.print_kv(&v)
        }
        [] => Err(Fail::Usage("no command".into())),
        _ => Err(Fail::Usage(format!("unknown command: {}", words.join(" ")))),
    }
}

/// Percent-encode a path segment (client ids may hold `/`, spaces, anything).
fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.into(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.1}"),
            _ => n.to_string(),
        },
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        Value::Object(_) => v.to_string(),
    }
}

/// Print rows under headers, columns padded to their widest cell.
fn table(out: &mut impl Write, headers: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells.iter().enumerate().map(|(i, c)| format!("{c:<width$}", width = w[i])).collect::<Vec<_>>().join("  ").trim_end().to_string()
    };
    let _ = writeln!(out, "{}", line(headers.to_vec()));
    for r in rows {
        let _ = writeln!(out, "{}", line(r.iter().map(String::as_str).collect()));
    }
}

fn uptime(secs: &Value) -> String {
    let s = secs.as_u64().unwrap_or(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

impl Ctl {
    fn opt(&self, n: &str) -> Option<String> {
        self.opts.iter().rev().find(|(k, _)| k == n).map(|(_, v)| v.clone())
    }

    fn flag(&self, n: &str) -> bool {
        self.flags.iter().any(|f| f == n)
    }

    /// Query parameters from the named options, plus `node`.
    fn with_node(&self, names: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut q: Vec<(String, String)> = names.iter().filter_map(|(opt, param)| self.opt(opt).map(|v| (param.to_string(), v))).collect();
        if let Some(n) = &self.node {
            q.push(("node".into(), n.clone()));
        }
        q
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response, Fail> {
        if self.key.is_empty() {
            return Err(Fail::Error("no admin API key: pass --key or set THINGSCTL_KEY".into()));
        }
        let r = rb.bearer_auth(&self.key).send().await.map_err(|e| {
            let why = if e.is_connect() {
                "cannot connect"
            } else if e.is_timeout() {
                "timed out"
            } else {
                "request failed"
            };
            Fail::Error(format!("{why}: {} ({e})", self.url))
        })?;
        if r.status().is_success() {
            return Ok(r);
        }
        let status = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        let msg = body["error"]["message"].as_str().map(str::to_string).unwrap_or_else(|| status.to_string());
        Err(Fail::Error(match status.as_u16() {
            401 => format!("the node refused the admin API key: {msg}"),
            _ => format!("{} {msg}", status.as_u16()),
        }))
    }

    async fn get(&self, path: &str, q: &[(String, String)]) -> Result<Value, Fail> {
        let r = self.send(self.http.get(format!("{}{path}", self.url)).query(q)).await?;
        let v: Value = r.json().await.map_err(|e| Fail::Error(format!("bad answer: {e}")))?;
        warn(&v);
        Ok(v)
    }

    async fn post(&self, path: &str, q: &[(String, String)], body: Value) -> Res {
        let r = self.send(self.http.post(format!("{}{path}", self.url)).query(q).json(&body)).await?;
        let v: Value = r.json().await.map_err(|e| Fail::Error(format!("bad answer: {e}")))?;
        self.print_kv(&v)
    }

    fn print_json(&self, v: &Value) -> Res {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        Ok(())
    }

    fn print_kv(&self, v: &Value) -> Res {
        if self.json {
            return self.print_json(v);
        }
        let mut out = std::io::stdout().lock();
        for (k, x) in v.as_object().into_iter().flatten() {
            if k != "errors" {
                let _ = writeln!(out, "{k}: {}", cell(x));
            }
        }
        Ok(())
    }

    fn items(&self, v: &Value, headers: &[&str], cols: &[&str]) -> Res {
        if self.json {
            return self.print_json(v);
        }
        let rows: Vec<Vec<String>> =
            v["items"].as_array().into_iter().flatten().map(|i| cols.iter().map(|c| cell(&i[*c])).collect()).collect();
        table(&mut std::io::stdout().lock(), headers, &rows);
        if v["truncated"].as_bool() == Some(true) {
            eprintln!("(more rows exist: raise --limit or filter)");
        }
        Ok(())
    }

    async fn cluster_status(&self) -> Res {
        let v = self.get("/admin/v1/cluster", &self.with_node(&[])).await?;
        if self.json {
            return self.print_json(&v);
        }
        let rows: Vec<Vec<String>> = v["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| {
                vec![
                    cell(&n["node"]),
                    cell(&n["state"]),
                    cell(&n["addr"]),
                    cell(&n["version"]),
                    if n["uptime_secs"].is_null() { "-".into() } else { uptime(&n["uptime_secs"]) },
                    cell(&n["clients_connected"]),
                    cell(&n["sessions"]),
                    cell(&n["subscriptions"]),
                    match n["rtt_ms"].as_f64() {
                        Some(ms) => format!("{ms:.2}ms"),
                        None => "-".into(),
                    },
                ]
            })
            .collect();
        println!("answered by {}", cell(&v["answered_by"]));
        table(
            &mut std::io::stdout().lock(),
            &["NODE", "STATE", "CLUSTER ADDR", "VERSION", "UPTIME", "CLIENTS", "SESSIONS", "SUBS", "RTT"],
            &rows,
        );
        Ok(())
    }

    async fn sessions_list(&self) -> Res {
        let q = self.with_node(&[("client", "client"), ("state", "state"), ("limit", "limit")]);
        let v = self.get("/admin/v1/sessions", &q).await?;
        self.items(
            &v,
            &["CLIENT ID", "DEVICE", "NODE", "CONNECTED", "PROTOCOL", "PEER", "SUBS", "INFLIGHT", "QUEUED", "EXPIRY"],
            &["client_id", "device", "node", "connected", "protocol", "peer", "subscriptions", "inflight", "queued", "expiry_secs"],
        )
    }

    async fn session_show(&self, client: &str) -> Res {
        let v = self.get(&format!("/admin/v1/sessions/{}", enc(client)), &self.with_node(&[("device", "device")])).await?;
        if self.json {
            return self.print_json(&v);
        }
        for k in [
            "client_id",
            "device",
            "node",
            "connected",
            "protocol",
            "peer",
            "connected_at_ms",
            "disconnected_at_ms",
            "expiry_secs",
            "inflight",
            "queued",
            "will",
            "generation",
            "backup",
        ] {
            println!("{k}: {}", cell(&v[k]));
        }
        let rows: Vec<Vec<String>> = v["subscriptions"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                vec![cell(&s["filter"]), cell(&s["qos"]), cell(&s["no_local"]), cell(&s["retain_as_published"]), cell(&s["identifier"])]
            })
            .collect();
        println!("subscriptions:");
        table(&mut std::io::stdout().lock(), &["FILTER", "QOS", "NO LOCAL", "RAP", "ID"], &rows);
        Ok(())
    }

    async fn kick(&self, client: &str) -> Res {
        let mut q = self.with_node(&[("device", "device")]);
        if self.flag("discard") {
            q.push(("discard".into(), "true".into()));
        }
        let r = self.send(self.http.delete(format!("{}/admin/v1/sessions/{}", self.url, enc(client))).query(&q)).await?;
        let v: Value = r.json().await.map_err(|e| Fail::Error(format!("bad answer: {e}")))?;
        if self.json {
            return self.print_json(&v);
        }
        match v["disconnected"].as_bool() {
            Some(true) => println!("{client}: disconnected on {}", cell(&v["node"])),
            _ => println!("{client}: not connected (session on {})", cell(&v["node"])),
        }
        if v["discarded"].as_bool() == Some(true) {
            println!("{client}: session discarded");
        }
        Ok(())
    }

    async fn subscriptions(&self) -> Res {
        let v =
            self.get("/admin/v1/subscriptions", &self.with_node(&[("client", "client"), ("filter", "filter"), ("limit", "limit")])).await?;
        self.items(
            &v,
            &["FILTER", "CLIENT ID", "DEVICE", "NODE", "QOS", "SHARED GROUP", "ONLINE"],
            &["filter", "client_id", "device", "node", "qos", "shared_group", "online"],
        )
    }

    async fn routes(&self) -> Res {
        let v = self.get("/admin/v1/routes", &self.with_node(&[])).await?;
        if self.json {
            return self.print_json(&v);
        }
        if self.node.is_some() {
            let mut rows: Vec<Vec<String>> = v["local"].as_array().into_iter().flatten().map(|f| vec![cell(f), cell(&v["node"])]).collect();
            rows.extend(v["remote"].as_array().into_iter().flatten().map(|r| vec![cell(&r["filter"]), cell(&r["nodes"])]));
            table(&mut std::io::stdout().lock(), &["FILTER", "NODES"], &rows);
            return Ok(());
        }
        self.items(&v, &["FILTER", "NODES"], &["filter", "nodes"])
    }

    async fn retained(&self) -> Res {
        let v = self.get("/admin/v1/retained", &self.with_node(&[("filter", "filter"), ("limit", "limit")])).await?;
        self.items(&v, &["TOPIC", "QOS", "BYTES", "PAYLOAD"], &["topic", "qos", "payload_len", "payload"])
    }

    async fn retained_delete(&self, topic: &str) -> Res {
        let q = vec![("topic".to_string(), topic.to_string())];
        let r = self.send(self.http.delete(format!("{}/admin/v1/retained", self.url)).query(&q)).await?;
        let v: Value = r.json().await.map_err(|e| Fail::Error(format!("bad answer: {e}")))?;
        if self.json {
            return self.print_json(&v);
        }
        println!("{topic}: {}", if v["deleted"].as_bool() == Some(true) { "deleted" } else { "no retained message" });
        Ok(())
    }

    async fn actors(&self) -> Res {
        let v = self.get("/admin/v1/actors", &self.with_node(&[("kind", "kind"), ("sort", "sort"), ("limit", "limit")])).await?;
        self.items(
            &v,
            &["NAME", "KIND", "NODE", "MAILBOX", "HANDLED", "MEAN µs", "MAX µs", "RESTARTS", "AGE s"],
            &["name", "kind", "node", "mailbox", "handled", "mean_us", "max_us", "restarts", "age_secs"],
        )
    }

    async fn tree(&self) -> Res {
        let v = self.get("/admin/v1/actors/tree", &self.with_node(&[("max-children", "max_children")])).await?;
        if self.json {
            return self.print_json(&v);
        }
        fn walk(n: &Value, prefix: &str, last: bool, out: &mut String) {
            let kind = n["kind"].as_str().filter(|k| !k.is_empty()).map(|k| format!(" ({k})")).unwrap_or_default();
            out.push_str(&format!("{prefix}{}{}{kind}\n", if last { "└─ " } else { "├─ " }, cell(&n["name"])));
            let kids = n["children"].as_array().cloned().unwrap_or_default();
            let next = format!("{prefix}{}", if last { "   " } else { "│  " });
            for (i, k) in kids.iter().enumerate() {
                walk(k, &next, i + 1 == kids.len(), out);
            }
        }
        let mut out = String::new();
        for node in v["nodes"].as_array().into_iter().flatten() {
            out.push_str(&format!("{}\n", cell(&node["node"])));
            let roots = node["roots"].as_array().cloned().unwrap_or_default();
            for (i, r) in roots.iter().enumerate() {
                walk(r, "", i + 1 == roots.len(), &mut out);
            }
        }
        print!("{out}");
        Ok(())
    }

    async fn actor(&self, name: &str) -> Res {
        let v = self.get(&format!("/admin/v1/actors/{}", enc(name)), &self.with_node(&[])).await?;
        self.print_kv(&v)
    }

    async fn metrics(&self) -> Res {
        let v = self.get("/admin/v1/metrics", &self.with_node(&[])).await?;
        if self.json {
            return self.print_json(&v);
        }
        let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
        let keys: Vec<String> = v["total"].as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
        let mut headers = vec!["METRIC".to_string()];
        headers.extend(nodes.iter().map(|n| cell(&n["node"])));
        headers.push("TOTAL".into());
        let rows: Vec<Vec<String>> = keys
            .iter()
            .map(|k| {
                let mut r = vec![k.clone()];
                r.extend(nodes.iter().map(|n| cell(&n[k])));
                r.push(cell(&v["total"][k]));
                r
            })
            .collect();
        let h: Vec<&str> = headers.iter().map(String::as_str).collect();
        table(&mut std::io::stdout().lock(), &h, &rows);
        Ok(())
    }

    async fn devices(&self) -> Res {
        let q: Vec<(String, String)> = self.opt("limit").map(|l| vec![("limit".to_string(), l)]).unwrap_or_default();
        let v = self.get("/api/v1/devices", &q).await?;
        if self.json {
            return self.print_json(&v);
        }
        let rows: Vec<Vec<String>> = v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| vec![cell(&d["device_number"]), cell(&d["name"]), cell(&d["product_id"]), cell(&d["enabled"])])
            .collect();
        table(&mut std::io::stdout().lock(), &["NUMBER", "NAME", "PRODUCT", "ENABLED"], &rows);
        Ok(())
    }

    /// Stream the trace's NDJSON lines: raw with --json, one readable line per packet otherwise.
    async fn trace(&self, client: &str) -> Res {
        let mut q = vec![];
        if let Some(s) = self.opt("secs") {
            q.push(("secs".to_string(), s));
        }
        let mut r = self.send(self.http.get(format!("{}/admin/v1/trace/{}", self.url, enc(client))).query(&q)).await?;
        let mut buf = Vec::new();
        let mut out = std::io::stdout();
        loop {
            let chunk = tokio::select! {
                c = r.chunk() => c.map_err(|e| Fail::Error(format!("trace stream broke: {e}")))?,
                _ = tokio::signal::ctrl_c() => return Ok(()),
            };
            let Some(chunk) = chunk else { return Ok(()) };
            buf.extend_from_slice(&chunk);
            while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                if self.json {
                    let _ = writeln!(out, "{text}");
                } else if let Ok(v) = serde_json::from_str::<Value>(&text) {
                    let _ = writeln!(out, "{}", human(&v));
                }
                let _ = out.flush();
            }
        }
    }
}

/// One trace line for people: time, node, direction, packet and its fields.
fn human(v: &Value) -> String {
    if let Some(c) = v.get("trace") {
        return format!("tracing {} on {}", cell(c), cell(&v["nodes"]));
    }
    if let Some(d) = v.get("dropped") {
        return format!("({} trace lines dropped: the client is faster than this terminal)", cell(d));
    }
    let ms = v["ts_ms"].as_u64().unwrap_or(0);
    let t = format!("{:02}:{:02}:{:02}.{:03}", (ms / 3_600_000) % 24, (ms / 60_000) % 60, (ms / 1000) % 60, ms % 1000);
    let arrow = if v["dir"] == "in" { "<-" } else { "->" };
    let mut s = format!("{t} {} {} {arrow} {}", cell(&v["node"]), cell(&v["client_id"]), cell(&v["type"]));
    for (k, x) in v.as_object().into_iter().flatten() {
        if !["ts_ms", "node", "client_id", "dir", "type"].contains(&k.as_str()) {
            s.push_str(&format!(" {k}={}", cell(x)));
        }
    }
    s
}

/// Nodes that did not answer: said on stderr (the answer is partial).
fn warn(v: &Value) {
    for e in v["errors"].as_array().into_iter().flatten() {
        eprintln!("warning: node {} did not answer: {}", cell(&e["node"]), cell(&e["error"]));
    }
}
