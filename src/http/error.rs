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
        let mut r = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
        }
        r
    }
}

impl From<crate::devices::IngestError> for ApiError {
    fn from(e: crate::devices::IngestError) -> ApiError {
        match e {
            crate::devices::IngestError::Meta(m) => m.into(),
            crate::devices::IngestError::Busy => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "busy", "telemetry storage is busy; retry after the Retry-After seconds")
            }
            crate::devices::IngestError::Refused(why) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "refused_by_store",
                format!("the time-series store refuses these values: {why}"),
            ),
        }
    }
}

impl From<crate::storage::timeseries::TsError> for ApiError {
    fn from(e: crate::storage::timeseries::TsError) -> ApiError {
        match e {
            crate::storage::timeseries::TsError::BadQuery(m) => ApiError::new(StatusCode::BAD_REQUEST, "invalid", m),
            other => {
                tracing::error!(error = %other, "time-series store error");
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the time-series store is unavailable")
            }
        }
    }
}

impl From<MetaError> for ApiError {
    fn from(e: MetaError) -> ApiError {
        match e {
            MetaError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("{m} not found")),
            MetaError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            MetaError::Invalid(m) => ApiError::new(StatusCode::BAD_REQUEST, "invalid", m),
            // Input the database refused (PostgreSQL's data exceptions and integrity
            // violations: a NUL in a string, a number out of range, a dangling reference) is
            // the caller's mistake, not an outage.
            MetaError::Db(sqlx::Error::Database(d)) if d.code().is_some_and(|c| c.starts_with("22") || c.starts_with("23")) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid", format!("the database refused the input: {}", d.message()))
            }
            MetaError::Db(e) => {
                tracing::error!(error = %e, "meta store error");
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the device registry is unavailable")
            }
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> ApiError {
        match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", e.body_text()),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", e.body_text())
            }
            _ => ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", e.body_text()),
        }
    }
}

pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError { status: StatusCode::NOT_FOUND, code: "not_found", message: format!("no resource at {}", uri.path()) }
}

pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", format!("{method} is not allowed on {}", uri.path()))
}
