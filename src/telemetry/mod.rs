//! The telemetry pipeline (the telemetry issue, in progress): device events → flattened points
//! → per-product transform and cleaning rules → writer actors → the time-series store. So far:
//! the rules (`rules.rs`).
pub mod rules;
