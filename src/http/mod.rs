//! HTTP interface of a node: health and Prometheus metrics for operators and load balancers,
//! the device HTTP API (`/api/v1/{token}/…`), the REST API for people and applications
//! (`/api/v1/…`, described at `/api/openapi.json`) and the operators' API (`/admin/v1/…`).
//! One file per resource; handlers turn requests into calls on the broker and the device
//! platform and own no state.
use std::sync::Arc;

use axum::Router;

use crate::broker::Broker;
use crate::services::Services;

pub mod api;
mod device_api;
mod error;
pub mod forwarded;
mod health;
pub mod linger;
mod ops;
mod web;

pub use error::ApiError;

/// What every handler gets: the broker core and the platform's services.
pub struct App {
    pub broker: Arc<Broker>,
    pub services: Arc<Services>,
}

/// Handlers read the broker core's configuration and counters through the application.
impl std::ops::Deref for App {
    type Target = Broker;
    fn deref(&self) -> &Broker {
        &self.broker
    }
}

pub type AppState = Arc<App>;

/// The node's HTTP application. Request bodies are bounded: device uploads by the device
/// payload limit (plus room for JSON framing), the REST API by `api.max_body_bytes`.
pub fn app(broker: Arc<Broker>, services: Arc<Services>) -> Router {
    let state: AppState = Arc::new(App { broker: broker.clone(), services });
    let device_limit = broker.config.devices.max_payload.saturating_mul(2).max(64 * 1024);
    let (api, doc) = api::routes(broker.config.devices.ota_max_package_bytes);
    let doc = Arc::new(doc.to_pretty_json().unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}")));
    let api = api
        .route(
            "/api/openapi.json",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move { ([(axum::http::header::CONTENT_TYPE, "application/json")], doc.as_str().to_owned()) }
            }),
        )
        .layer(axum::extract::DefaultBodyLimit::max(broker.config.api.max_body_bytes));
    let mut app = Router::new()
        .merge(health::routes())
        .merge(web::routes())
        .merge(ops::routes(state.clone()))
        .merge(device_api::routes().layer(axum::extract::DefaultBodyLimit::max(device_limit)))
        .merge(api)
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), count_request));
    if let Some(cors) = cors(&broker.config.api.cors_origins) {
        app = app.layer(cors);
    }
    if !broker.config.api.trusted_proxies.is_empty() {
        let trusted = Arc::new(broker.config.api.trusted_proxies.clone());
        app = app.layer(axum::middleware::from_fn(move |req, next| forwarded::rewrite(trusted.clone(), req, next)));
    }
    app.with_state(state)
}

/// CORS for browser applications on other origins (`api.cors_origins`; `*` = any).
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, Any, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let layer = CorsLayer::new()
        .allow_methods(Any)
        .allow_headers([axum::http::header::AUTHORIZATION, axum::http::header::CONTENT_TYPE, "x-api-key".parse().ok()?])
        .max_age(std::time::Duration::from_secs(3600));
    Some(if origins.iter().any(|o| o == "*") {
        layer.allow_origin(Any)
    } else {
        let list: Vec<axum::http::HeaderValue> = origins.iter().filter_map(|o| o.parse().ok()).collect();
        layer.allow_origin(AllowOrigin::list(list))
    })
}

/// Count every request by its route template (`/api/v1/admin/devices/{number}`; unmatched
/// paths as `unmatched`, so the label set stays bounded) and status.
async fn count_request(
    axum::extract::State(b): axum::extract::State<AppState>,
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
