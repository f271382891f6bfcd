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
mod ops;
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
        .merge(ops::routes(broker.clone()))
        .merge(device_api::routes())
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(broker.clone(), count_request))
        .with_state(broker)
}

/// Count every request by its route template (`/api/v1/admin/devices/{number}`; unmatched
/// paths as `unmatched`, so the label set stays bounded) and status.
async fn count_request(
    axum::extract::State(b): axum::extract::State<Arc<Broker>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = req.extensions().get::<axum::extract::MatchedPath>().map_or("unmatched", |m| m.as_str()).to_string();
    let resp = next.run(req).await;
    if let Ok(mut m) = b.metrics.http_requests.lock() {
        *m.entry((route, resp.status().as_u16())).or_default() += 1;
    }
    resp
}
