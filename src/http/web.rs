//! The web console, served by every node at `/`: a single page (hash routes) over the REST
//! API, its assets compiled into the binary (nothing is fetched at run time). Charts use uPlot
//! (MIT, vendored in `web/vendor/`).
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::AppState;

const FILES: &[(&str, &str, &[u8])] = &[
    ("app.js", "text/javascript; charset=utf-8", include_bytes!("../../web/app.js")),
    ("app.css", "text/css; charset=utf-8", include_bytes!("../../web/app.css")),
    ("uPlot.iife.min.js", "text/javascript; charset=utf-8", include_bytes!("../../web/vendor/uPlot.iife.min.js")),
    ("uPlot.min.css", "text/css; charset=utf-8", include_bytes!("../../web/vendor/uPlot.min.css")),
];

pub fn routes() -> Router<AppState> {
    Router::new().route("/", get(index)).route("/assets/{file}", get(asset))
}

async fn index() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], include_str!("../../web/index.html"))
}

async fn asset(axum::extract::Path(file): axum::extract::Path<String>) -> axum::response::Response {
    match FILES.iter().find(|(name, _, _)| *name == file) {
        Some((_, mime, body)) => ([(header::CONTENT_TYPE, *mime), (header::CACHE_CONTROL, "no-cache")], *body).into_response(),
        None => super::error::not_found(axum::http::Uri::from_static("/assets")).await.into_response(),
    }
}
