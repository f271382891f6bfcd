//! The live websocket `/api/v1/ws`.
use crate::http::AppState;

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
}
