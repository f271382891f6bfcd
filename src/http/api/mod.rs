//! The REST API for people and applications under `/api/v1/…`: sign-in and sessions, tenants,
//! users, roles and the audit log; products, groups, devices, credentials, attributes and
//! commands; telemetry; alert rules, alerts and notification channels. Every handler is
//! annotated for the OpenAPI document served at `/api/openapi.json`: routes are registered
//! from the same annotations, so the document cannot drift from the router.
//!
//! Callers authenticate with `Authorization: Bearer <token>`: a user's access token (JWT from
//! `/api/v1/auth/login`) or an admin API key (the system scope). What a caller may see is
//! decided in one place, [`scope`]: handlers fetch tenant data only through it.
use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;

use super::{ApiError, AppState};

mod alerts;
mod auth;
mod devices;
mod import;
mod ota;
mod people;
pub mod scope;
mod telemetry;
mod ws;

pub use scope::Caller;

pub type Answer = Result<Json<Value>, ApiError>;

#[derive(OpenApi)]
#[openapi(
    info(title = "thingsd REST API", description = "Devices, telemetry, alerts, users and tenants of a thingsd cluster."),
    modifiers(&Security),
    security(("bearer" = [])),
    tags(
        (name = "auth", description = "Sign-in, sessions"),
        (name = "people", description = "Tenants, users, roles, audit log"),
        (name = "devices", description = "Products, groups, devices, credentials, attributes, commands"),
        (name = "telemetry", description = "Latest values, history, aggregates, export, policies"),
        (name = "alerts", description = "Alert rules, alerts, notification channels"),
    )
)]
struct Doc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let c = openapi.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
        );
    }
}

/// The API router (paths relative to `/api/v1`) and its OpenAPI document (with the prefix);
/// package uploads take up to `max_package` bytes.
pub fn routes(max_package: usize) -> (axum::Router<AppState>, utoipa::openapi::OpenApi) {
    let api = OpenApiRouter::<AppState>::new()
        .merge(auth::routes())
        .merge(people::routes())
        .merge(devices::routes())
        .merge(import::routes())
        .merge(telemetry::routes())
        .merge(alerts::routes())
        .merge(ota::routes(max_package));
    let (router, mut doc) = OpenApiRouter::with_openapi(Doc::openapi()).nest("/api/v1", api).split_for_parts();
    describe_errors(&mut doc);
    (router.merge(ws::routes()), doc)
}

/// Every operation answers its errors with one body, `{"error": {"code", "message"}}`
/// (`ApiError`): described once as the `Error` schema and each operation's `default` response.
fn describe_errors(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    let text = |d: &str| ObjectBuilder::new().schema_type(Type::String).description(Some(d));
    let vocabulary: Vec<String> = crate::http::error::CODES.iter().map(|(c, d)| format!("`{c}`: {d}")).collect();
    let code = ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(crate::http::error::CODES.iter().map(|(c, _)| *c)))
        .description(Some(format!("a stable machine-readable code, one of: {}", vocabulary.join("; "))));
    let inner = ObjectBuilder::new()
        .property("code", code)
        .required("code")
        .property("message", text("what went wrong, for people"))
        .required("message");
    let error = ObjectBuilder::new().property("error", inner).required("error");
    doc.components.get_or_insert_with(Default::default).schemas.insert("Error".into(), error.into());
    let response = ResponseBuilder::new()
        .description("an error, with the HTTP status that says which kind")
        .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name("Error"))).build())
        .build();
    for item in doc.paths.paths.values_mut() {
        let ops = [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch];
        for op in ops.into_iter().flatten() {
            op.responses.responses.entry("default".into()).or_insert_with(|| response.clone().into());
        }
    }
}

/// A JSON body whose rejection is an [`ApiError`] (400 `invalid_json` with the reason).
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = ApiError;
    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let Json(v) = Json::<T>::from_request(req, state).await?;
        Ok(Body(v))
    }
}

/// Query parameters whose rejection is an [`ApiError`].
pub struct Q<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Q<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| Q(v))
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid", e.body_text()))
    }
}

/// Path parameters whose rejection is an [`ApiError`].
pub struct P<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for P<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| P(v))
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid", e.body_text()))
    }
}

/// Paging, sorting and search of every list: `?limit=50&offset=100&sort=-created_ms&q=pump`.
/// Lists answer `{ "items": [...], "total", "limit", "offset" }`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Rows per page (1..1000, default 100).
    pub limit: Option<i64>,
    /// Rows to skip.
    pub offset: Option<i64>,
    /// Sort column; a leading `-` sorts descending.
    pub sort: Option<String>,
    /// Case-insensitive substring of the searchable columns (names).
    pub q: Option<String>,
}

pub fn ok<T: serde::Serialize>(v: T) -> Answer {
    serde_json::to_value(v).map(Json).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))
}

/// A create's answer: 201 Created with the new object.
pub type Made = Result<(StatusCode, Json<Value>), ApiError>;

pub fn created<T: serde::Serialize>(v: T) -> Made {
    ok(v).map(created_from)
}

/// An answer's body as a 201 Created.
pub fn created_from(body: Json<Value>) -> (StatusCode, Json<Value>) {
    (StatusCode::CREATED, body)
}

pub fn bad(m: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid", m)
}
