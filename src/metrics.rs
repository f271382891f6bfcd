//! Node-wide counters, read by `$SYS` topics (and later `/metrics`).
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Metrics {
    pub clients_connected: AtomicU64,
    pub connections_total: AtomicU64,
    pub messages_received: AtomicU64,
    pub messages_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub messages_dropped: AtomicU64,
    pub protocol_errors: AtomicU64,
    /// Messages discarded because their Message Expiry Interval passed before delivery.
    pub messages_expired: AtomicU64,
    /// HTTP requests by route template (never the raw path: bounded) and status.
    pub http_requests: std::sync::Mutex<std::collections::BTreeMap<(String, u16), u64>>,
}

impl Metrics {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}
