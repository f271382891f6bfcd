//! Storage behind narrow interfaces. `local` holds the broker's own durable state in the node's
//! data directory; `meta` the device registry (SQLite or PostgreSQL); `cache` credentials,
//! device status and rate counters (in-process or Redis).
pub mod cache;
pub mod local;
pub mod meta;
pub mod timeseries;
