//! The HTTP side of the server: the demo page, health, the room API, the auth routes, and the
//! WebSocket upgrade (signaling.rs takes it from there).

use std::sync::atomic::Ordering;

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRef, Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use serde::{Deserialize, Serialize};
use serde_json::json;

use encore_systems::RoomView;

use super::AppState;
use super::signaling::ws_upgrade;
use crate::auth::{AdminError, AuthState, AuthUser, Role, parse_role};

impl FromRef<AppState> for AuthState {
    fn from_ref(app: &AppState) -> AuthState {
        app.auth.clone()
    }
}

pub fn router(app: AppState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/app.js", get(app_js))
        .route("/style.css", get(style_css))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/rooms", get(rooms))
        .route("/api/rooms/{id}", get(room))
        .route("/api/users/{uid}/role", put(set_user_role))
        .route("/ws", get(ws_upgrade))
        .merge(crate::auth::router(app.auth.clone()))
        .with_state(app)
}

/// The metrics endpoint's own router (plain HTTP, on `metrics.listen`): `GET /metrics` in the
/// Prometheus text format, version 0.0.4.
pub fn metrics_router() -> Router {
    Router::new().route("/metrics", get(metrics))
}

async fn metrics() -> Response {
    let mut response = crate::metrics::render().into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", include_str!("../../static/index.html"))
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", include_str!("../../static/app.js"))
}

async fn style_css() -> Response {
    asset("text/css; charset=utf-8", include_str!("../../static/style.css"))
}

/// Alive: the process answers. No token needed.
async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// Ready for traffic: not draining or stopping, and the auth keys can be had (in dev mode they
/// come from this very server).
async fn readyz(State(app): State<AppState>) -> Response {
    if app.stopping.load(Ordering::Relaxed) {
        let status = if app.rooms.draining() { "draining" } else { "stopping" };
        let body = json!({"status": status, "rooms": app.rooms.count()});
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    match app.auth.verifier().keys_ready().await {
        Ok(()) => Json(json!({"status": "ready", "rooms": app.rooms.list().rooms.len()})).into_response(),
        Err(error) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "not ready", "reason": error.to_string()})))
                .into_response()
        }
    }
}

/// `GET /api/rooms`: every room with its buffer and its share, and the budget they share.
async fn rooms(State(app): State<AppState>, _user: AuthUser) -> Response {
    Json(app.rooms.list()).into_response()
}

/// `GET /api/rooms/{id}`: peers, tracks, the utterances in the buffer, each listener's route.
#[derive(Serialize)]
struct RoomJson {
    id: String,
    now_ms: u64,
    buffer_bytes: u64,
    buffer_cap_bytes: u64,
    peers: Vec<PeerJson>,
    tracks: Vec<TrackJson>,
    utterances: Vec<UtteranceJson>,
}

#[derive(Serialize)]
struct PeerJson {
    peer: String,
    uid: Option<String>,
    roles: Vec<String>,
    listening: bool,
    playing: Option<String>,
    lag_ms: Option<u64>,
    follow: Vec<String>,
    mute: Vec<String>,
}

#[derive(Serialize)]
struct TrackJson {
    track: String,
    peer: String,
    media: &'static str,
    codec: String,
}

#[derive(Serialize)]
struct UtteranceJson {
    utterance: String,
    uid: Option<String>,
    started_ms: u64,
    ended_ms: Option<u64>,
    bytes: u64,
    listeners: u32,
}

fn room_json(id: &str, view: RoomView) -> RoomJson {
    RoomJson {
        id: id.to_owned(),
        now_ms: view.now_us / 1000,
        buffer_bytes: view.buffer_bytes,
        buffer_cap_bytes: view.buffer_cap_bytes,
        peers: view
            .peers
            .into_iter()
            .map(|p| PeerJson {
                peer: p.name.to_string(),
                uid: p.uid,
                roles: p.roles,
                listening: p.listening,
                playing: p.playing.map(|u| u.to_string()),
                lag_ms: p.lag_us.map(|us| us / 1000),
                follow: p.follow.iter().map(|n| n.to_string()).collect(),
                mute: p.mute.iter().map(|n| n.to_string()).collect(),
            })
            .collect(),
        tracks: view
            .tracks
            .into_iter()
            .map(|t| TrackJson {
                track: t.name.to_string(),
                peer: t.peer.to_string(),
                media: t.media.as_str(),
                codec: t.codec,
            })
            .collect(),
        utterances: view
            .utterances
            .into_iter()
            .map(|u| UtteranceJson {
                utterance: u.id.to_string(),
                uid: u.uid,
                started_ms: u.started_us / 1000,
                ended_ms: u.ended_us.map(|us| us / 1000),
                bytes: u.bytes,
                listeners: u.playing,
            })
            .collect(),
    }
}

async fn room(State(app): State<AppState>, _user: AuthUser, Path(id): Path<String>) -> Response {
    match app.rooms.view(&id).await {
        Some(view) => Json(room_json(&id, view)).into_response(),
        None => {
            (StatusCode::NOT_FOUND, Json(json!({"error": {"code": "not_found", "message": format!("no room {id:?}")}})))
                .into_response()
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleRequest {
    role: String,
}

/// `PUT /api/users/{uid}/role` `{"role": "speaker"}`, for admins: sets the user's `role` claim
/// (auth::admin does the work, in whichever backend the mode has) and answers `{"uid", "role"}`.
/// The change applies at once: the rooms the user is in give its peers the new role (a
/// demoted speaker stops publishing) and tell everyone there (`role_changed`, reason
/// `account`; the user's page then refreshes its token), and tokens issued before the change
/// no longer carry the old role on this server.
async fn set_user_role(
    State(app): State<AppState>,
    user: AuthUser,
    Path(uid): Path<String>,
    body: Result<Json<RoleRequest>, JsonRejection>,
) -> Response {
    let result = async {
        let roles = app.sessions.account_roles(&user.uid, &user.roles, user.issued_at);
        if !roles.contains(&Role::Admin) {
            return Err(AdminError::Forbidden("only an admin may change roles".into()));
        }
        let Json(request) = body.map_err(|rejection| {
            AdminError::BadRequest(format!("expected {{\"role\": \"speaker\"}}: {}", rejection.body_text()))
        })?;
        let role = parse_role(&request.role)?;
        app.auth.admin()?.set_role(&uid, role).await
    }
    .await;
    match result {
        Ok(change) => {
            let roles = vec![change.role];
            app.sessions.roles_changed(&change.uid, roles.clone(), app.auth.now_s());
            app.rooms.account_roles(&change.uid, &roles);
            tracing::info!(by = %user.uid, uid = %change.uid, role = change.role.as_str(), "role changed over HTTP");
            let mut response = Json(json!({"uid": change.uid, "role": change.role})).into_response();
            response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(error) => {
            // Debug-quoted: the uid comes from the URL, and must not forge log lines.
            tracing::info!(by = %user.uid, uid = ?uid, code = error.code(), %error, "role change refused");
            error.into_response()
        }
    }
}
