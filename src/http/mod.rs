//! HTTP interface of a node. Today: health and Prometheus metrics for operators and load
//! balancers; the REST API and web console join here (one file per resource).
use std::sync::Arc;

use axum::Router;

use crate::broker::Broker;

mod error;
mod health;

pub use error::ApiError;

/// The node's HTTP application.
pub fn app(broker: Arc<Broker>) -> Router {
    Router::new().merge(health::routes()).fallback(error::not_found).with_state(broker)
}
