//! The one error type of the HTTP API: `{ "error": { "code", "message" } }` with a status.
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::storage::meta::MetaError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}

impl From<MetaError> for ApiError {
    fn from(e: MetaError) -> ApiError {
        match e {
            MetaError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, "not_found", m),
            MetaError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            MetaError::Invalid(m) => ApiError::new(StatusCode::BAD_REQUEST, "invalid", m),
            MetaError::Db(e) => {
                tracing::error!(error = %e, "meta store error");
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the device registry is unavailable")
            }
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", e.body_text())
    }
}

pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError { status: StatusCode::NOT_FOUND, code: "not_found", message: format!("no resource at {}", uri.path()) }
}

pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", format!("{method} is not allowed on {}", uri.path()))
}
