//! Sending what alerts do: a JSON POST to webhook channels (signed `X-Thingsd-Signature:
//! sha256=<hex HMAC of the body>` when the channel has a secret), e-mail through SMTP
//! (`lettre`; STARTTLS or implicit TLS with rustls), and the rule's command to the device. A
//! bounded queue feeds one dispatcher; each delivery runs in its own task (at most 64 at once)
//! with retries and exponential backoff, so a slow endpoint delays nobody else.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};

use super::{Alerts, Notice, NoticeKind};
use crate::devices::downlink::DownlinkRequest;
use crate::storage::meta::{Channel, CommandKind};

/// Check a channel's kind and configuration (API input).
pub fn validate(kind: &str, config: &Value) -> Result<(), String> {
    let s = |k: &str| config.get(k).and_then(Value::as_str);
    match kind {
        "webhook" => {
            let url = s("url").ok_or("a webhook channel needs config.url")?;
            let u = reqwest::Url::parse(url).map_err(|e| format!("config.url: {e}"))?;
            if !matches!(u.scheme(), "http" | "https") {
                return Err("config.url must be http or https".into());
            }
            Ok(())
        }
        "email" => {
            s("smtp_host").ok_or("an email channel needs config.smtp_host")?;
            s("from")
                .ok_or("an email channel needs config.from")?
                .parse::<lettre::message::Mailbox>()
                .map_err(|e| format!("config.from: {e}"))?;
            let to = config.get("to").and_then(Value::as_array).filter(|t| !t.is_empty()).ok_or("config.to must list addresses")?;
            for t in to {
                t.as_str().ok_or("config.to holds strings")?.parse::<lettre::message::Mailbox>().map_err(|e| format!("config.to: {e}"))?;
            }
            smtp_tls(config)?;
            Ok(())
        }
        _ => Err("kind is webhook or email".into()),
    }
}

pub(super) fn spawn(a: &Arc<Alerts>, mut rx: mpsc::Receiver<Notice>) {
    let weak = Arc::downgrade(a);
    let limit = Arc::new(Semaphore::new(64));
    let guard = Arc::new(Guard(a.config.allowed_networks.clone()));
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(a.config.notify_timeout_secs.max(1)))
        .redirect(reqwest::redirect::Policy::none())
        .dns_resolver(guard)
        .build()
    {
        Ok(c) => c,
        Err(e) => return tracing::error!(error = %e, "cannot build the alert webhook client; webhook channels are off"),
    };
    tokio::spawn(async move {
        while let Some(n) = rx.recv().await {
            let Some(a) = weak.upgrade() else { return };
            let n = Arc::new(n);
            if n.kind == NoticeKind::Raised {
                if let Some(cmd) = n.rule.spec.command.clone() {
                    let req = DownlinkRequest { method: Some(cmd.method), params: cmd.params, ttl_secs: None };
                    if let Err(e) = a.devices.send_downlink(&n.alert.device_number, CommandKind::Command, req).await {
                        tracing::warn!(alert = n.alert.id, error = %e, "alert command not sent");
                    }
                }
            }
            for &ch in &n.rule.spec.channels {
                let channel = match a.devices.meta.channel(ch).await {
                    Ok(c) if c.tenant_id == n.rule.tenant_id => c,
                    Ok(_) | Err(_) => {
                        tracing::warn!(rule = n.rule.id, channel = ch, "alert channel does not exist");
                        continue;
                    }
                };
                let Ok(permit) = limit.clone().acquire_owned().await else { return };
                let (a, n, http) = (a.clone(), n.clone(), http.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    deliver(&a, &http, &channel, &n).await;
                });
            }
        }
    });
}

/// The JSON every channel is told.
pub fn body(n: &Notice) -> Value {
    json!({"event": n.kind.as_str(), "alert": n.alert, "rule": {"id": n.rule.id, "name": n.rule.name}})
}

async fn deliver(a: &Alerts, http: &reqwest::Client, ch: &Channel, n: &Notice) {
    let attempts = a.config.notify_attempts.max(1);
    let mut wait = Duration::from_millis(500);
    for attempt in 1..=attempts {
        let r = match ch.kind.as_str() {
            "webhook" => webhook(http, ch, n, &a.config.allowed_networks).await,
            "email" => email(ch, n, Duration::from_secs(a.config.notify_timeout_secs.max(1)), &a.config.allowed_networks).await,
            other => Err((format!("unknown channel kind {other}"), false)),
        };
        match r {
            Ok(()) => {
                a.metrics.notifications_sent.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err((e, retry)) if retry && attempt < attempts => {
                tracing::debug!(channel = ch.id, attempt, error = %e, "notification failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
            Err((e, _)) => {
                a.metrics.notifications_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(channel = ch.id, alert = n.alert.id, attempts = attempt, error = %e, "alert notification failed");
                return;
            }
        }
    }
}

/// Signature of `body` with `secret`: `sha256=<hex>`.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// POST the notice; Err((why, worth retrying)).
async fn webhook(http: &reqwest::Client, ch: &Channel, n: &Notice, allow: &[IpNet]) -> Result<(), (String, bool)> {
    let url = ch.config.get("url").and_then(Value::as_str).ok_or(("no url".to_string(), false))?;
    // A name is checked by the client's resolver (`Guard`) when it connects; an address in the
    // URL never reaches a resolver, so it is checked here.
    let parsed = reqwest::Url::parse(url).map_err(|e| (format!("url: {e}"), false))?;
    let literal = parsed.host_str().and_then(|h| h.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().ok());
    if let Some(ip) = literal.filter(|ip| !reachable(*ip, allow)) {
        return Err((format!("{ip} is not a public address (alerts.allowed_networks)"), false));
    }
    let payload = body(n).to_string();
    let mut req = http
        .post(url)
        .header("content-type", "application/json")
        .header("x-thingsd-event", n.kind.as_str())
        .header("x-thingsd-delivery", format!("{}-{}", n.alert.id, n.kind.as_str()));
    if let Some(secret) = ch.config.get("secret").and_then(Value::as_str) {
        req = req.header("x-thingsd-signature", sign(secret, payload.as_bytes()));
    }
    if let Some(h) = ch.config.get("headers").and_then(Value::as_object) {
        for (k, v) in h {
            if let Some(v) = v.as_str() {
                req = req.header(k.as_str(), v);
            }
        }
    }
    match req.body(payload).send().await {
        Ok(r) if r.status().is_success() => Ok(()),
        // Client errors will not go away by retrying (except timeouts and rate limits).
        Ok(r) => Err((format!("HTTP {}", r.status()), r.status().is_server_error() || matches!(r.status().as_u16(), 408 | 429))),
        Err(e) => Err((e.to_string(), true)),
    }
}

/// How an e-mail channel talks to its relay: `config.tls` is `opportunistic` (the default:
/// STARTTLS when the relay offers it), `starttls` (required), `tls` (implicit TLS, usually port
/// 465) or `none` (plain SMTP, e.g. a local relay). The relay's certificate is checked against
/// the system's CA store, or `config.ca_pem` (a PEM CA for a private relay);
/// `config.accept_invalid_certs = true` turns the check off (self-signed relays).
fn smtp_tls(c: &Value) -> Result<lettre::transport::smtp::client::Tls, String> {
    use lettre::transport::smtp::client::{Certificate, CertificateStore, Tls, TlsParameters};
    let mode = c.get("tls").map(|v| v.as_str().ok_or("config.tls is a string")).transpose()?.unwrap_or("opportunistic");
    let insecure = match c.get("accept_invalid_certs") {
        None => false,
        Some(v) => v.as_bool().ok_or("config.accept_invalid_certs is true or false")?,
    };
    if mode == "none" {
        return Ok(Tls::None);
    }
    let host = c.get("smtp_host").and_then(Value::as_str).unwrap_or_default();
    let mut p = TlsParameters::builder(host.to_string());
    if let Some(pem) = c.get("ca_pem") {
        let pem = pem.as_str().ok_or("config.ca_pem is a PEM string")?;
        let found = rustls_pemfile::certs(&mut pem.as_bytes()).collect::<Result<Vec<_>, _>>().map_err(|e| format!("config.ca_pem: {e}"))?;
        if found.is_empty() {
            return Err("config.ca_pem holds no PEM certificate".into());
        }
        p = p.certificate_store(CertificateStore::None);
        for der in found {
            p = p.add_root_certificate(Certificate::from_der(der.to_vec()).map_err(|e| format!("config.ca_pem: {e}"))?);
        }
    }
    if insecure {
        p = p.dangerous_accept_invalid_certs(true);
    }
    let params = || p.build_rustls().map_err(|e| format!("TLS: {e}"));
    Ok(match mode {
        "opportunistic" => Tls::Opportunistic(params()?),
        "starttls" => Tls::Required(params()?),
        "tls" => Tls::Wrapper(params()?),
        _ => return Err("config.tls is none, opportunistic, starttls or tls".into()),
    })
}

async fn email(ch: &Channel, n: &Notice, timeout: Duration, allow: &[IpNet]) -> Result<(), (String, bool)> {
    use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
    let c = &ch.config;
    let s = |k: &str| c.get(k).and_then(Value::as_str);
    let bad = |e: String| (e, false);
    let host = s("smtp_host").ok_or_else(|| bad("no smtp_host".into()))?;
    let port = c.get("smtp_port").and_then(Value::as_u64).unwrap_or(25) as u16;
    let a = &n.alert;
    let mut m = Message::builder().from(s("from").unwrap_or_default().parse().map_err(|e| bad(format!("from: {e}")))?).subject(format!(
        "[{}] {} on {}: {}",
        a.severity,
        a.rule_name,
        a.device_number,
        n.kind.as_str().trim_start_matches("alert.")
    ));
    for t in c.get("to").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
        m = m.to(t.parse().map_err(|e| bad(format!("to: {e}")))?);
    }
    let text = format!(
        "{}\n\nrule: {} (#{})\ndevice: {}\nseverity: {}\nstatus: {}\nsince: {} ms\n\n{}",
        a.message,
        a.rule_name,
        a.rule_id,
        a.device_number,
        a.severity,
        a.status,
        a.since_ms,
        serde_json::to_string_pretty(&body(n)).unwrap_or_default()
    );
    let msg = m.body(text).map_err(|e| bad(e.to_string()))?;
    let tls = smtp_tls(c).map_err(bad)?;
    // Connect to an address checked now (the TLS parameters still name the host), so the
    // name cannot resolve to something else between the check and the connection.
    let addrs: Vec<IpAddr> =
        tokio::net::lookup_host((host, port)).await.map_err(|e| (format!("{host}: {e}"), true))?.map(|a| a.ip()).collect();
    let ip = addrs
        .iter()
        .copied()
        .find(|ip| reachable(*ip, allow))
        .ok_or_else(|| bad(format!("{host} resolves to no public address ({addrs:?}; alerts.allowed_networks)")))?;
    let mut t = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(ip.to_string()).port(port).timeout(Some(timeout)).tls(tls);
    if let (Some(u), Some(p)) = (s("username"), s("password")) {
        t = t.credentials(lettre::transport::smtp::authentication::Credentials::new(u.into(), p.into()));
    }
    t.build().send(msg).await.map(|_| ()).map_err(|e| (e.to_string(), !e.is_permanent()))
}

use crate::config::IpNet;
use std::net::IpAddr;

/// May a notification connect to `ip`? Public addresses: yes; loopback, private, link-local
/// (cloud metadata lives there), shared (100.64/10), unique-local, unspecified, multicast and
/// documentation ranges only inside `alerts.allowed_networks`.
pub fn reachable(ip: IpAddr, allow: &[IpNet]) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let internal = match ip {
        IpAddr::V4(v) => {
            let o = v.octets();
            v.is_loopback()
                || v.is_private()
                || v.is_link_local()
                || v.is_unspecified()
                || v.is_broadcast()
                || v.is_multicast()
                || v.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || o[0] >= 240
        }
        IpAddr::V6(v) => {
            let s = v.segments();
            v.is_loopback() || v.is_unspecified() || v.is_multicast() || (s[0] & 0xfe00) == 0xfc00 || (s[0] & 0xffc0) == 0xfe80
        }
    };
    !internal || allow.iter().any(|n| n.contains(ip))
}

/// The webhook client's resolver: a name resolves only to addresses [`reachable`] allows,
/// checked at connect time, so DNS rebinding cannot point a channel inside.
struct Guard(Vec<IpNet>);

impl reqwest::dns::Resolve for Guard {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.0.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let all: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let ok: Vec<std::net::SocketAddr> = all.iter().copied().filter(|a| reachable(a.ip(), &allow)).collect();
            if ok.is_empty() {
                let why = format!("{host} resolves to no public address ({all:?}; alerts.allowed_networks)");
                return Err(why.into());
            }
            Ok(Box::new(ok.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod guard_tests {
    use super::*;

    #[test]
    fn internal_addresses_need_the_allow_list() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(!reachable(ip, &[]), "{ip}");
        }
        for ip in ["93.184.216.34", "8.8.8.8", "2606:4700::1111"] {
            assert!(reachable(ip.parse().unwrap(), &[]), "{ip}");
        }
        assert!(reachable("127.0.0.1".parse().unwrap(), &["127.0.0.0/8".parse().unwrap()]));
    }
}
