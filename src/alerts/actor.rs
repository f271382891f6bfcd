//! One actor per alert rule (`alert:{id}`), on the node that owns the rule. It keeps what its
//! conditions need per device (latest values, rates, last seen, offline since, since when the
//! condition holds) and raises and clears the rule's alerts: one open alert per rule and
//! device. Open alerts are read back from the meta store when the actor starts, so a rule
//! that restarts or moves to another node goes on clearing what it raised.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::{Map, Value};

use super::rule::{DeviceState, RuleSpec, Target};
use super::{Alerts, NoticeKind};
use crate::storage::meta::{now_ms, Alert, Raised};

/// A rule as its actor runs it.
#[derive(Debug, Clone)]
pub struct LoadedRule {
    pub id: i64,
    pub tenant_id: i64,
    pub name: String,
    pub spec: RuleSpec,
    pub updated_ms: i64,
    /// The keys it reads (`RuleSpec::keys`), and whether every message matters.
    pub keys: Arc<[String]>,
    pub every_message: bool,
}

impl LoadedRule {
    pub fn new(id: i64, tenant_id: i64, name: String, spec: RuleSpec, updated_ms: i64) -> LoadedRule {
        let (keys, every_message) = (spec.keys().into(), spec.every_message());
        LoadedRule { id, tenant_id, name, spec, updated_ms, keys, every_message }
    }

    /// Does a message with these values concern the rule?
    pub fn wants(&self, values: &Map<String, Value>) -> bool {
        self.every_message || self.keys.iter().any(|k| values.contains_key(k))
    }
}

/// Values a device reported.
#[derive(Debug, Clone)]
pub struct Ev {
    pub device_id: i64,
    pub device: Arc<str>,
    pub values: Map<String, Value>,
    pub ts: i64,
}

pub enum RuleMessage {
    /// Values of the rule's devices, oldest first (batched under load).
    Events(Vec<Arc<Ev>>),
    /// Look at the clock (durations, no data, offline).
    Tick,
}

impl ractor::Message for RuleMessage {}

pub struct RuleActor;

pub struct RuleArgs {
    pub rule: Arc<LoadedRule>,
    pub alerts: Arc<Alerts>,
    pub tick: Duration,
}

pub struct RuleState {
    rule: Arc<LoadedRule>,
    alerts: Arc<Alerts>,
    devices: HashMap<i64, (Arc<str>, DeviceState)>,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

/// Most devices one rule follows (a group or product target beyond this is cut, and logged).
const MAX_DEVICES: usize = 100_000;

impl Actor for RuleActor {
    type Msg = RuleMessage;
    type State = RuleState;
    type Arguments = RuleArgs;

    async fn pre_start(&self, me: ActorRef<RuleMessage>, a: RuleArgs) -> Result<RuleState, ActorProcessingErr> {
        let now = now_ms();
        let mut devices: HashMap<i64, (Arc<str>, DeviceState)> = HashMap::new();
        let fresh = || DeviceState::new(a.rule.keys.clone(), now);
        // The devices it watches start as "seen now": no-data conditions count from here.
        let meta = &a.alerts.devices.meta;
        let (group, product) = match &a.rule.spec.target {
            Target::Device(n) => {
                if let Ok(d) = meta.device(n).await {
                    devices.insert(d.id, (Arc::from(d.device_number.as_str()), fresh()));
                }
                (None, None)
            }
            Target::Group(g) => (Some(*g), None),
            Target::Product(p) => (None, Some(*p)),
        };
        if group.is_some() || product.is_some() {
            let mut after = 0;
            while devices.len() < MAX_DEVICES {
                let page = meta.list_devices(after, 1000, group, product).await?;
                let Some(last) = page.last() else { break };
                after = last.id;
                for d in page.into_iter().filter(|d| d.tenant_id == a.rule.tenant_id) {
                    devices.insert(d.id, (Arc::from(d.device_number.as_str()), fresh()));
                }
            }
        }
        for open in meta.open_alerts(a.rule.id).await? {
            let e = devices.entry(open.device_id).or_insert_with(|| (Arc::from(open.device_number.as_str()), fresh()));
            e.1.alert = Some(open.id);
        }
        let ticker = a.rule.spec.timed().then(|| me.send_interval(a.tick, || RuleMessage::Tick));
        Ok(RuleState { rule: a.rule, alerts: a.alerts, devices, ticker })
    }

    async fn post_stop(&self, _me: ActorRef<RuleMessage>, st: &mut RuleState) -> Result<(), ActorProcessingErr> {
        if let Some(t) = st.ticker.take() {
            t.abort();
        }
        Ok(())
    }

    async fn handle(&self, _me: ActorRef<RuleMessage>, msg: RuleMessage, st: &mut RuleState) -> Result<(), ActorProcessingErr> {
        let now = now_ms();
        match msg {
            RuleMessage::Events(evs) => {
                for ev in evs {
                    if st.devices.len() >= MAX_DEVICES && !st.devices.contains_key(&ev.device_id) {
                        continue;
                    }
                    let e =
                        st.devices.entry(ev.device_id).or_insert_with(|| (ev.device.clone(), DeviceState::new(st.rule.keys.clone(), now)));
                    e.1.update(&ev.values, ev.ts, now);
                    e.1.offline_since = None;
                    st.judge(ev.device_id, now).await;
                }
            }
            RuleMessage::Tick => {
                if st.rule.spec.condition.needs_status() || st.rule.spec.clear.as_ref().is_some_and(|c| c.needs_status()) {
                    for (number, d) in st.devices.values_mut() {
                        let s = st.alerts.devices.presence(number);
                        d.offline_since = if s.online { None } else { Some(d.offline_since.or(s.since.map(|t| t as i64)).unwrap_or(now)) };
                    }
                }
                let ids: Vec<i64> = st.devices.keys().copied().collect();
                for id in ids {
                    st.judge(id, now).await;
                }
            }
        }
        Ok(())
    }
}

impl RuleState {
    /// Raise or clear the alert of one device as its state now says.
    async fn judge(&mut self, device_id: i64, now: i64) {
        let spec = &self.rule.spec;
        let Some((number, d)) = self.devices.get_mut(&device_id) else { return };
        let holds = spec.condition.eval(d, now);
        match d.alert {
            None => {
                if holds != Some(true) {
                    d.pending_since = None;
                    return;
                }
                let since = *d.pending_since.get_or_insert(now);
                if now - since < spec.duration_secs as i64 * 1000 {
                    return;
                }
                let message = render(spec.message.as_deref(), &self.rule.name, number, d);
                let a = Alert {
                    id: 0,
                    tenant_id: self.rule.tenant_id,
                    rule_id: self.rule.id,
                    rule_name: self.rule.name.clone(),
                    device_id,
                    device_number: number.to_string(),
                    severity: spec.severity.as_str().into(),
                    status: "active".into(),
                    message,
                    since_ms: since,
                    raised_ms: now,
                    acked_ms: None,
                    acked_by: None,
                    cleared_ms: None,
                };
                match self.alerts.devices.meta.raise_alert(&a).await {
                    Ok(Raised::New(a)) => {
                        tracing::info!(rule = self.rule.id, device = %number, alert = a.id, "alert raised");
                        d.alert = Some(a.id);
                        d.pending_since = None;
                        self.alerts.notify(NoticeKind::Raised, a, &self.rule);
                    }
                    Ok(Raised::Existing(a)) => d.alert = Some(a.id),
                    // Tried again at the next event or tick.
                    Err(e) => tracing::warn!(rule = self.rule.id, device = %number, error = %e, "cannot raise an alert"),
                }
            }
            Some(id) => {
                let clear = match &spec.clear {
                    Some(c) => c.eval(d, now) == Some(true),
                    None => holds == Some(false),
                };
                if !clear {
                    return;
                }
                match self.alerts.devices.meta.clear_alert(id).await {
                    Ok(cleared) => {
                        d.alert = None;
                        d.pending_since = None;
                        if let Some(a) = cleared {
                            tracing::info!(rule = self.rule.id, device = %number, alert = a.id, "alert cleared");
                            self.alerts.notify(NoticeKind::Cleared, a, &self.rule);
                        }
                    }
                    Err(e) => tracing::warn!(rule = self.rule.id, device = %number, error = %e, "cannot clear an alert"),
                }
            }
        }
    }
}

/// The alert's message: the rule's template with `{device}`, `{rule}` and `{value:KEY}`.
fn render(template: Option<&str>, rule: &str, device: &str, d: &DeviceState) -> String {
    let Some(t) = template else { return format!("{rule} on {device}") };
    let mut out = t.replace("{device}", device).replace("{rule}", rule);
    while let Some(i) = out.find("{value:") {
        let Some(j) = out[i..].find('}') else { break };
        let key = out[i + 7..i + j].to_string();
        let v = d.value(&key).map(|v| v.to_string()).unwrap_or_else(|| "?".into());
        out.replace_range(i..i + j + 1, &v);
    }
    out.chars().take(1024).collect()
}
