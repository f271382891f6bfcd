//! Time series (the telemetry issue). So far: points as the stores keep them (`point`, with
//! the flattening of device payloads) and the embedded store's chunk codec (`chunk`); the store
//! trait, the embedded/PostgreSQL/TDengine backends, writer actors and queries follow.
pub mod chunk;
pub mod point;

pub use point::{flatten, Point, Value};
