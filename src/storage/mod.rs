//! Storage behind traits. `local` holds the broker's own durable state in the node's data directory;
//! device metadata, time series and cache backends come with the platform issues.
pub mod local;
