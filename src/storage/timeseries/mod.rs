//! Time series (the telemetry issue). So far: points as the stores keep them (`point`, with
//! the flattening of device payloads), the embedded store's chunk codec (`chunk`) and a first
//! embedded store (`embedded`: WAL, day partitions, segments, range, latest, retention); the
//! store trait, aggregates, the PostgreSQL/TDengine backends and writer actors follow.
pub mod aggregate;
pub mod chunk;
pub mod embedded;
pub mod point;

pub use point::{flatten, Point, Value};
