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
    /// MQTT packets and bytes by control packet type (index 1..=15), read and written.
    pub packets_in: Counts<16>,
    pub packets_out: Counts<16>,
    pub packet_bytes_in: Counts<16>,
    pub packet_bytes_out: Counts<16>,
    /// PUBLISH packets by QoS, read and written.
    pub publish_in: Counts<3>,
    pub publish_out: Counts<3>,
    /// CONNACKs sent, by reason code.
    pub connacks: Counts<256>,
    /// Connections closed: by the client's DISCONNECT (its reason code), by the server
    /// (the reason it sent or would have sent), or lost (socket closed or failed without DISCONNECT).
    pub disconnects_client: Counts<256>,
    pub disconnects_server: Counts<256>,
    pub connections_lost: AtomicU64,
    /// HTTP requests by route template (never the raw path: bounded) and status.
    pub http_requests: std::sync::Mutex<std::collections::BTreeMap<(String, u16), u64>>,
}

/// A fixed set of counters indexed by a small code.
#[derive(Debug)]
pub struct Counts<const N: usize>(pub [AtomicU64; N]);

impl<const N: usize> Default for Counts<N> {
    fn default() -> Self {
        Counts(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl<const N: usize> Counts<N> {
    #[inline]
    pub fn add(&self, i: usize, n: u64) {
        if let Some(c) = self.0.get(i) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }
    /// (index, count) of the non-zero counters.
    pub fn nonzero(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.0.iter().enumerate().map(|(i, c)| (i, c.load(Ordering::Relaxed))).filter(|(_, n)| *n > 0)
    }
}

impl Metrics {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}
