//! Time series (the telemetry issue). So far: the embedded store's chunk codec; the store
//! trait, the embedded/PostgreSQL/TDengine backends, writer actors and queries follow.
pub mod chunk;
