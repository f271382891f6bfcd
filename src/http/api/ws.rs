//! The live websocket `GET /api/v1/ws` (token in `Authorization` or, for browsers,
//! `?access_token=`): telemetry, attributes and events (`telemetry:read`), device status
//! (`device:read`) and alert changes (`alert:read`) of the caller's tenant, as JSON text
//! messages `{"type", "device", "ts", "data"}`. `?devices=a,b` (or a message
//! `{"devices": ["a", "b"]}`; `[]` for all) narrows it to some devices. A client that falls
//! behind gets `{"type": "lagged", "missed": n}`; when its session ends the socket closes
//! with code 4001.
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;

use super::{Caller, Q};
use crate::http::device_api::devices;
use crate::http::{ApiError, AppState};

pub fn routes() -> axum::Router<AppState> {
    axum::Router::new().route("/api/v1/ws", axum::routing::get(upgrade))
}

#[derive(Deserialize)]
struct WsParams {
    devices: Option<String>,
    access_token: Option<String>,
}

async fn upgrade(
    State(s): State<AppState>,
    c: Caller,
    Q(p): Q<WsParams>,
    headers: axum::http::HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let live = s.services.live.clone();
    let only: HashSet<String> =
        p.devices.as_deref().map(|d| d.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect()).unwrap_or_default();
    // The token this socket was opened with is checked again from time to time.
    let token = p.access_token.or_else(|| super::scope::bearer(&headers).map(str::to_string)).unwrap_or_default();
    Ok(ws.max_message_size(64 * 1024).on_upgrade(move |socket| serve(s, c, token, only, live, socket)))
}

async fn serve(
    s: AppState,
    c: Caller,
    token: String,
    mut only: HashSet<String>,
    live: std::sync::Arc<crate::live::Live>,
    mut socket: WebSocket,
) {
    let (mut rx, _watching) = live.watch();
    // Tenants of devices seen (bounded: cleared when it grows large).
    let mut tenants: HashMap<String, Option<i64>> = HashMap::new();
    let mut recheck = tokio::time::interval(Duration::from_secs(30));
    recheck.tick().await;
    let _ = socket.send(Message::Text(json!({"type": "hello", "user": c.0.username, "tenant_id": c.0.tenant}).to_string().into())).await;
    loop {
        tokio::select! {
            ev = rx.recv() => {
                let ev = match ev {
                    Ok(ev) => ev,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        if socket.send(Message::Text(json!({"type": "lagged", "missed": n}).to_string().into())).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Err(_) => return,
                };
                let perm = match ev.kind.as_str() {
                    "status" => "device:read",
                    "alert" => "alert:read",
                    _ => "telemetry:read",
                };
                if !c.0.can(perm) || (!only.is_empty() && !only.contains(&ev.device)) {
                    continue;
                }
                if !c.system() {
                    let tenant = match ev.tenant_id {
                        Some(t) => Some(t),
                        None => {
                            if tenants.len() > 100_000 {
                                tenants.clear();
                            }
                            match tenants.get(&ev.device) {
                                Some(t) => *t,
                                None => {
                                    let t = devices(&s).meta.device(&ev.device).await.ok().map(|d| d.tenant_id);
                                    tenants.insert(ev.device.clone(), t);
                                    t
                                }
                            }
                        }
                    };
                    if tenant.is_none_or(|t| !c.sees(t)) {
                        continue;
                    }
                }
                let Ok(text) = serde_json::to_string(&*ev) else { continue };
                if socket.send(Message::Text(text.into())).await.is_err() {
                    return;
                }
            }
            m = socket.recv() => match m {
                Some(Ok(Message::Text(t))) => {
                    #[derive(Deserialize)]
                    struct Filter { devices: Vec<String> }
                    match serde_json::from_str::<Filter>(&t) {
                        Ok(f) if f.devices.len() <= 10_000 => only = f.devices.into_iter().collect(),
                        _ => {
                            let e = json!({"type": "error", "error": {"code": "invalid", "message": "send {\"devices\": [\"number\", …]} ([] for all)"}});
                            if socket.send(Message::Text(e.to_string().into())).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
            _ = recheck.tick() => {
                // Logout, password change or a disabled user end the stream.
                let still = !token.is_empty() && matches!(Caller::of_token(&s, &token).await, Ok(Some(_)));
                if !token.is_empty() && !still {
                    let _ = socket.send(Message::Close(Some(CloseFrame { code: 4001, reason: "session ended".into() }))).await;
                    return;
                }
            }
        }
    }
}
