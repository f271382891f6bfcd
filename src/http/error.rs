//! The one error type of the HTTP API: `{ "error": { "code", "message" } }` with a status.
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::storage::meta::MetaError;

/// Every error code the HTTP APIs answer with (`{"error": {"code", "message"}}`), and what it
/// means: the one vocabulary, listed in the OpenAPI document's `Error` schema. A code outside
/// it fails a debug build's assertion in [`ApiError::new`].
pub const CODES: &[(&str, &str)] = &[
    ("invalid", "the request is not valid (a field, a value, a query parameter)"),
    ("invalid_json", "the body is not the JSON the operation takes"),
    ("unsupported_media_type", "the body's content type is not accepted"),
    ("payload_too_large", "the body (or a device payload) is larger than allowed"),
    ("bad_body", "the body could not be read"),
    ("malformed_payload", "a device payload that is not the JSON its topic or path takes"),
    ("thing_model_mismatch", "a device value the product's thing model refuses (type, range, unknown key)"),
    ("unknown_sub_device", "a gateway reported for a device that is not its sub-device"),
    ("refused_by_store", "the time-series store refuses these values (e.g. text it cannot hold)"),
    ("unauthorized", "no or wrong credentials"),
    ("session_ended", "the login session ended (logged out, expired, password changed); log in again"),
    ("forbidden", "authenticated, but without the permission this needs"),
    ("not_found", "no such object (or not in the caller's tenant)"),
    ("method_not_allowed", "the path exists, the method does not"),
    ("conflict", "the object exists already or the change conflicts with the current state"),
    ("ambiguous", "a name matches more than one object; be more specific"),
    ("timeout", "nothing arrived within the wait the request asked for"),
    ("rate_limited", "too many requests or failed logins; retry later"),
    ("busy", "the node is busy (e.g. telemetry storage); retry after Retry-After"),
    ("unavailable", "a store or service the node depends on is unavailable"),
    ("not_ready", "the node is not ready (starting, or a dependency is down)"),
    ("node_error", "another node of the cluster failed to answer"),
    ("internal", "an unexpected error, logged by the node"),
];

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        debug_assert!(CODES.iter().any(|(c, _)| *c == code), "error code {code:?} is not in http::error::CODES");
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
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", e.body_text()),
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
