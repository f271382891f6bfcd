//! Storage behind narrow interfaces. `state` holds the broker's own durable state (sessions,
//! offline queues, retained messages) in the node's data directory; `meta` the device registry (SQLite or PostgreSQL); `cache` credentials,
//! device status and rate counters (in-process or Redis).
pub mod cache;
pub mod meta;
pub mod state;
mod state_legacy;
pub mod timeseries;

use serde::{Deserialize, Serialize};

/// When something is acknowledged: a device's telemetry (MQTT PUBACK, HTTP 200, CoAP 2.04)
/// by the time-series store, a message for a persistent session by the state store.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Once queued in a writer: fastest; a crash loses what was queued (at most
    /// `writer_queue` points per writer).
    Accepted,
    /// Once the store took the batch (embedded: in its write-ahead log; PostgreSQL:
    /// committed): a process crash loses nothing acknowledged; power loss can lose the last
    /// moments the OS had not written (embedded).
    Written,
    /// As `written`, and the embedded store's log is fsynced first: power loss loses nothing
    /// acknowledged.
    Synced,
}
