//! Sign-in: `POST /auth/login` (username + password → access and refresh tokens),
//! `POST /auth/refresh`, `POST /auth/logout`, `GET /auth/me`, `PUT /auth/password`.
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::scope::users;
use super::{ok, Answer, Body, Caller};
use crate::http::{ApiError, AppState};
use crate::users::{check_password, hash, LoginError};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(login))
        .routes(routes!(refresh))
        .routes(routes!(logout))
        .routes(routes!(me))
        .routes(routes!(change_password))
}

impl From<LoginError> for ApiError {
    fn from(e: LoginError) -> ApiError {
        match e {
            LoginError::Wrong => ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()),
            LoginError::Expired => ApiError::new(StatusCode::UNAUTHORIZED, "session_ended", e.to_string()),
            LoginError::Limited(_) | LoginError::Busy => ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", e.to_string()),
            LoginError::Meta(m) => m.into(),
        }
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    username: String,
    password: String,
}

/// Log in with a password.
#[utoipa::path(post, path = "/auth/login", tag = "auth", security(()), request_body = LoginBody,
    responses((status = 200, description = "tokens", body = crate::users::Tokens), (status = 401, description = "wrong username or password"), (status = 429, description = "too many failures")))]
async fn login(State(s): State<AppState>, ConnectInfo(peer): ConnectInfo<SocketAddr>, Body(b): Body<LoginBody>) -> Answer {
    let u = users(&s);
    if b.username.len() > 256 || b.password.len() > 1024 {
        return Err(LoginError::Wrong.into());
    }
    let tokens = u.login(&b.username, &b.password, peer.ip()).await;
    match &tokens {
        Ok(t) => {
            let _ = u
                .meta
                .audit(
                    t.user.tenant_id,
                    &format!("user:{}", t.user.username),
                    "login",
                    &format!("user:{}", t.user.id),
                    &json!({"from": peer.ip().to_string()}),
                )
                .await;
        }
        Err(LoginError::Wrong) => tracing::info!(user = %b.username, from = %peer.ip(), "failed login"),
        Err(LoginError::Limited(_)) => tracing::warn!(user = %b.username, from = %peer.ip(), "login rate-limited"),
        Err(_) => {}
    }
    ok(tokens?)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RefreshBody {
    refresh_token: String,
}

/// Exchange a refresh token for new tokens (each refresh token is good once).
#[utoipa::path(post, path = "/auth/refresh", tag = "auth", security(()), request_body = RefreshBody,
    responses((status = 200, description = "tokens", body = crate::users::Tokens), (status = 401, description = "the session has ended")))]
async fn refresh(State(s): State<AppState>, Body(b): Body<RefreshBody>) -> Answer {
    if b.refresh_token.len() > 512 {
        return Err(LoginError::Expired.into());
    }
    ok(users(&s).refresh(&b.refresh_token).await?)
}

/// End this session on every node.
#[utoipa::path(post, path = "/auth/logout", tag = "auth", responses((status = 200, description = "logged out")))]
async fn logout(State(s): State<AppState>, c: Caller) -> Answer {
    if let Some(sid) = &c.0.session {
        users(&s).logout(sid).await;
    }
    ok(json!({"logged_out": true}))
}

/// Who am I: user, tenant, role and permissions.
#[utoipa::path(get, path = "/auth/me", tag = "auth", responses((status = 200, description = "the caller")))]
async fn me(c: Caller) -> Answer {
    ok(&c.0)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PasswordBody {
    current_password: String,
    new_password: String,
}

/// Change my password: every session of mine ends, on every node.
#[utoipa::path(put, path = "/auth/password", tag = "auth", request_body = PasswordBody,
    responses((status = 200, description = "changed; log in again"), (status = 401, description = "wrong current password")))]
async fn change_password(State(s): State<AppState>, c: Caller, Body(b): Body<PasswordBody>) -> Answer {
    let Some(uid) = c.0.user_id else {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid", "API keys have no password"));
    };
    check_password(&b.new_password)?;
    let u = users(&s);
    let user = u.meta.user(uid).await?;
    let (pw, phc) = (b.current_password.into_bytes(), user.password_hash.clone());
    if !tokio::task::spawn_blocking(move || crate::devices::verify_password(&pw, &phc)).await.unwrap_or(false) {
        return Err(LoginError::Wrong.into());
    }
    let h = hash(b.new_password).await;
    u.meta.update_user(uid, None, None, Some(&h), true).await?;
    u.forget(&[uid]).await;
    c.audit(&u.meta, user.tenant_id, "password", format!("user:{uid}"), json!({})).await;
    ok(json!({"changed": true}))
}
