//! Fault injection for the tests (never set in production): conditions that are rare and
//! timing-dependent in the field, made deterministic so a multi-process test can check what
//! the node does about them. Each fault is read from the environment once and fires once
//! (outside the `THINGSD_` prefix, which is configuration).
//!
//! - `FAULT_HANDOVER_DELAY_MS=N`: the first session asked to hand itself over to
//!   another node waits N ms before it answers (a session or registry too busy to answer in
//!   time).
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

fn once(cell: &'static OnceLock<AtomicU64>, var: &str) -> Option<Duration> {
    let ms =
        cell.get_or_init(|| AtomicU64::new(std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(0))).swap(0, Ordering::Relaxed);
    (ms > 0).then(|| {
        tracing::warn!(fault = var, ms, "fault injection: delaying");
        Duration::from_millis(ms)
    })
}

/// `FAULT_HANDOVER_DELAY_MS`, the first time it is asked (then `None`).
pub fn handover_delay() -> Option<Duration> {
    static CELL: OnceLock<AtomicU64> = OnceLock::new();
    once(&CELL, "FAULT_HANDOVER_DELAY_MS")
}
