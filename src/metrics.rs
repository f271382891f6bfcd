//! Node-wide counters, read by `$SYS` topics (and later `/metrics`).
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Metrics {
    pub clients_connected: AtomicU64,
    pub connections_total: AtomicU64,
    /// CONNECTs being authenticated and attached right now (`mqtt.max_pending_connects`).
    pub connects_pending: AtomicU64,
    /// How late (µs) the runtime last ran a timer (`Broker::watch_lag`): how far behind the
    /// node's tasks are.
    pub scheduler_lag_us: AtomicU64,
    pub messages_received: AtomicU64,
    pub messages_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub messages_dropped: AtomicU64,
    /// Deliveries not kept for a subscriber, by `Dropped` reason.
    pub dropped: Counts<{ Dropped::ALL.len() }>,
    /// Messages whose publisher was refused (PUBACK/PUBREC 0x97, or a 3.1.1 publisher
    /// disconnected unacknowledged) because a subscriber's queue could not take them.
    pub publishes_refused: AtomicU64,
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

/// A log line that may repeat thousands of times a second (refusals in a reconnect storm):
/// `hit` says whether to log now — at most once per `every` — and how many were left unlogged
/// since the last time.
pub struct LogEvery(std::sync::Mutex<Option<(std::time::Instant, u64)>>);

impl LogEvery {
    pub const fn new() -> Self {
        LogEvery(std::sync::Mutex::new(None))
    }

    pub fn hit(&self, every: std::time::Duration) -> Option<u64> {
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *last {
            Some((at, n)) if at.elapsed() < every => {
                *n += 1;
                None
            }
            other => {
                let skipped = other.map_or(0, |(_, n)| n);
                *other = Some((std::time::Instant::now(), 0));
                Some(skipped)
            }
        }
    }
}

/// Says yes once per key per period (for at most `keys` keys at a time): a log line per device
/// or product, not per event.
pub struct OncePer<K>(moka::sync::Cache<K, ()>);

impl<K: std::hash::Hash + Eq + Send + Sync + 'static> OncePer<K> {
    pub fn new(keys: u64, period: std::time::Duration) -> Self {
        OncePer(moka::sync::Cache::builder().max_capacity(keys).time_to_live(period).build())
    }

    /// Whether `key` was not seen in the period (and now is).
    pub fn first(&self, key: K) -> bool {
        self.0.entry(key).or_insert(()).is_fresh()
    }
}

impl Default for LogEvery {
    fn default() -> Self {
        Self::new()
    }
}

/// Why a delivery was not kept for its subscriber (`thingsd_messages_dropped_by_reason_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Larger than the client's Maximum Packet Size (5.0: discarded as if delivered).
    TooLargeForClient = 0,
    /// The oldest queued message, made room for a new one (`mqtt.queue_full = "drop_oldest"`).
    QueueFullOldest = 1,
    /// A QoS 0 message while the session's queue was full or had spilled to disk.
    Qos0QueueFull = 2,
    /// Beyond the bound of a session moving between nodes.
    HandoverFull = 3,
    /// Refused (`mqtt.queue_full = "refuse"`): the publisher was told (0x97) or not acknowledged.
    RefusedQueueFull = 4,
    /// The state store could not write it: the publisher was refused.
    StoreFailed = 5,
}

impl Dropped {
    pub const ALL: [(Dropped, &'static str); 6] = [
        (Dropped::TooLargeForClient, "too_large_for_client"),
        (Dropped::QueueFullOldest, "queue_full_oldest"),
        (Dropped::Qos0QueueFull, "qos0_queue_full"),
        (Dropped::HandoverFull, "handover_full"),
        (Dropped::RefusedQueueFull, "refused_queue_full"),
        (Dropped::StoreFailed, "store_failed"),
    ];
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
    /// Count a delivery not kept; reasons that lose a message also count in `messages_dropped`.
    pub fn dropped(&self, why: Dropped) {
        self.dropped.add(why as usize, 1);
        if !matches!(why, Dropped::RefusedQueueFull | Dropped::StoreFailed) {
            self.messages_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}
