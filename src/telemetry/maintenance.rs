//! The telemetry maintenance actor (`telemetry:maintenance`): on a schedule, applies retention
//! (the node default drops whole partitions; tenant and product policies that keep data for a
//! shorter time delete their devices' older points) and compacts the embedded store.
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::Telemetry;
use crate::storage::meta::{now_ms, PolicyScope};
use crate::storage::timeseries::{TimeSeriesStore, Tsdb};

const DAY_MS: i64 = 86_400_000;

/// What the last run did (for `/metrics` and the admin API).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Report {
    pub ran_ms: i64,
    pub hours_rolled_up: i64,
    pub rollup_partitions_dropped: u64,
    pub partitions_dropped: u64,
    pub points_deleted: u64,
    pub compacted: u64,
    pub disk_bytes_before: u64,
    pub disk_bytes_after: u64,
}

pub static RUNS: AtomicU64 = AtomicU64::new(0);

pub enum MaintenanceMessage {
    Tick,
    /// Turn embedded buffers older than `telemetry.segment_secs` into segments.
    Age,
    /// Run now and answer with the report (admin API, tests).
    RunNow(RpcReplyPort<Result<Report, String>>),
}

impl ractor::Message for MaintenanceMessage {}

pub struct MaintenanceActor;

/// The service it maintains (weak: the actor does not keep telemetry alive at shutdown).
pub type MaintenanceState = Weak<Telemetry>;

impl Actor for MaintenanceActor {
    type Msg = MaintenanceMessage;
    type State = MaintenanceState;
    type Arguments = Weak<Telemetry>;

    async fn pre_start(&self, me: ActorRef<MaintenanceMessage>, t: Weak<Telemetry>) -> Result<Weak<Telemetry>, ActorProcessingErr> {
        if let Some(tt) = t.upgrade() {
            let every = Duration::from_secs(tt.config.telemetry.maintenance_secs.max(1));
            me.send_interval(every, || MaintenanceMessage::Tick);
            let age = tt.config.telemetry.segment_secs;
            if age > 0 {
                me.send_interval(Duration::from_secs(age.div_ceil(4).max(1)), || MaintenanceMessage::Age);
            }
        }
        Ok(t)
    }

    async fn handle(
        &self,
        _me: ActorRef<MaintenanceMessage>,
        msg: MaintenanceMessage,
        t: &mut Weak<Telemetry>,
    ) -> Result<(), ActorProcessingErr> {
        let Some(t) = t.upgrade() else { return Ok(()) };
        if let MaintenanceMessage::Age = msg {
            let age = Duration::from_secs(t.config.telemetry.segment_secs);
            for store in std::iter::once(&t.store).chain(t.rollup.as_ref()) {
                if let Tsdb::Embedded(emb) = store {
                    if let Err(e) = emb.flush_aged(age).await {
                        tracing::error!(error = %e, "turning buffered points into a segment failed; they stay in the WAL");
                    }
                }
            }
            return Ok(());
        }
        let r = run(&t).await;
        if let Err(e) = &r {
            tracing::error!(error = %e, "telemetry maintenance failed; retrying at the next run");
        }
        if let MaintenanceMessage::RunNow(reply) = msg {
            let _ = reply.send(r);
        }
        Ok(())
    }
}

pub async fn spawn(t: &Arc<Telemetry>) -> anyhow::Result<()> {
    let (a, _) = Actor::spawn(
        Some("telemetry:maintenance".into()),
        crate::actors::inspect::Instrumented(MaintenanceActor, "telemetry"),
        Arc::downgrade(t),
    )
    .await?;
    let _ = t.maintenance.set(a);
    Ok(())
}

/// One run: roll-ups (before raw points can expire), retention, then compaction.
pub async fn run(t: &Telemetry) -> Result<Report, String> {
    let s = &t.store;
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let mut r = Report { ran_ms: now_ms(), disk_bytes_before: s.disk_bytes().await.map_err(|x| e(&x))?, ..Report::default() };
    let now = now_ms();
    r.hours_rolled_up = super::rollup::run(t).await?;
    if let (Some(ru), days @ 1..) = (&t.rollup, t.config.telemetry.rollup_days as i64) {
        r.rollup_partitions_dropped = ru.apply_retention(now - days * DAY_MS).await.map_err(|x| e(&x))?;
    }
    let default_days = t.config.telemetry.retention_days as i64;
    let policies = t.meta.retention_policies().await.map_err(|x| e(&x))?;
    let longest = policies.iter().map(|p| p.2).max().unwrap_or(0);
    // Whole partitions go only when nothing keeps data longer (0 = forever).
    if default_days > 0 {
        let keep = default_days.max(longest);
        r.partitions_dropped = s.apply_retention(now - keep * DAY_MS).await.map_err(|x| e(&x))?;
    }
    let mut covered: HashSet<i64> = HashSet::new();
    // Products first: a product's policy wins over its tenant's.
    let mut ordered = policies.clone();
    ordered.sort_by_key(|p| p.0 == PolicyScope::Tenant);
    for (scope, id, days) in ordered {
        let devices: Vec<i64> =
            t.meta.policy_devices(scope, id).await.map_err(|x| e(&x))?.into_iter().filter(|d| covered.insert(*d)).collect();
        if devices.is_empty() || (default_days > 0 && days >= default_days.max(longest)) {
            continue;
        }
        r.points_deleted += s.delete_before(&devices, now - days * DAY_MS).await.map_err(|x| e(&x))?;
    }
    // Devices under the node default while some policy keeps longer.
    if default_days > 0 && longest > default_days {
        let mut rest = Vec::new();
        let mut after = 0;
        loop {
            let page = t.meta.list_devices(after, 1000, None, None).await.map_err(|x| e(&x))?;
            let Some(last) = page.last() else { break };
            after = last.id;
            rest.extend(page.iter().map(|d| d.id).filter(|d| !covered.contains(d)));
        }
        if !rest.is_empty() {
            r.points_deleted += s.delete_before(&rest, now - default_days * DAY_MS).await.map_err(|x| e(&x))?;
        }
    }
    for store in std::iter::once(s).chain(t.rollup.as_ref()) {
        if let Tsdb::Embedded(emb) = store {
            r.compacted += emb.compact().await.map_err(|x| e(&x))? as u64;
        }
    }
    r.disk_bytes_after = s.disk_bytes().await.map_err(|x| e(&x))?;
    RUNS.fetch_add(1, Ordering::Relaxed);
    tracing::info!(?r, "telemetry maintenance");
    *t.last_report.lock().unwrap_or_else(|p| p.into_inner()) = Some(r.clone());
    Ok(r)
}
