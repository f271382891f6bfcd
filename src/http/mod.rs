//! HTTP interface of a node: health and Prometheus metrics for operators and load balancers,
//! the device HTTP API (`/api/v1/{token}/…`) and the admin API (`/api/v1/admin/…`).
//! One file per resource; handlers turn requests into calls on the broker and the device
//! platform and own no state.
use std::sync::Arc;

use axum::Router;

use crate::broker::Broker;

mod admin;
mod device_api;
mod error;
mod health;
mod telemetry_api;

pub use error::ApiError;

/// What every handler gets: the node's broker (and through it the device platform).
pub type AppState = Arc<Broker>;

/// The node's HTTP application. Request bodies are bounded by the device payload limit
/// (plus room for JSON framing).
pub fn app(broker: Arc<Broker>) -> Router {
    let limit = broker.config.devices.max_payload.saturating_mul(2).max(64 * 1024);
    Router::new()
        .merge(health::routes())
        .merge(admin::routes(broker.clone()))
        .merge(device_api::routes())
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .with_state(broker)
}
