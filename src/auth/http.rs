//! The axum side: the [`AuthUser`] extractor and the auth routes.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRef, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use encore_systems::components::Role;
use serde::Deserialize;
use serde_json::json;
use tracing::{info, warn};

use super::error::AuthError;
use super::state::AuthState;
use super::verify::AuthUser;

/// `AuthUser` as a handler argument: the request's bearer token, verified. Refusals answer 401
/// (`WWW-Authenticate: Bearer`, JSON error body) or 503 when no keys are available.
impl<S> FromRequestParts<S> for AuthUser
where
    AuthState: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = AuthError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let auth = AuthState::from_ref(state);
        auth.authenticate(&parts.headers).await.inspect_err(|error| {
            info!(
                method = %parts.method,
                path = parts.uri.path(),
                status = error.status().as_u16(),
                code = error.code(),
                check = error.check(),
                %error,
                "request refused by auth"
            );
        })
    }
}

/// The auth routes, to merge into the server's router:
/// - `POST /api/ws-ticket` (Bearer): a single-use WebSocket ticket, `{ticket, expiresIn}`.
/// - `GET /api/client-config`: mode, project id, public web API key, emulator host.
/// - `GET /api/whoami` (Bearer): the verified [`AuthUser`].
/// - dev mode only: `GET /dev/keys` (the X.509 map) and `POST /dev/token {uid, role}`.
pub fn router<S>(state: AuthState) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    let mut router = Router::new()
        .route("/api/ws-ticket", post(ws_ticket))
        .route("/api/client-config", get(client_config))
        .route("/api/whoami", get(whoami));
    if state.dev_issuer().is_some() {
        router = router.route("/dev/keys", get(dev_keys)).route("/dev/token", post(dev_token));
    }
    router.with_state(state)
}

fn no_store(mut response: Response) -> Response {
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `{"error":{"code","message"}}` for refusals that are not about a credential.
fn json_error(status: StatusCode, code: &str, message: &str) -> Response {
    no_store((status, Json(json!({ "error": { "code": code, "message": message } }))).into_response())
}

async fn ws_ticket(State(auth): State<AuthState>, user: AuthUser) -> Response {
    match auth.issue_ticket(user) {
        Ok(ticket) => no_store(Json(ticket).into_response()),
        Err(error) => error.into_response(),
    }
}

async fn client_config(State(auth): State<AuthState>) -> Response {
    Json(auth.client_config()).into_response()
}

async fn whoami(user: AuthUser) -> Response {
    no_store(Json(user).into_response())
}

async fn dev_keys(State(auth): State<AuthState>) -> Response {
    let Some(dev) = auth.dev_issuer() else {
        return json_error(StatusCode::NOT_FOUND, "not-found", "dev mode is off");
    };
    let mut response = Json(dev.x509_map()).into_response();
    // The key lives as long as the process; an hour is what Google's own map roughly gets.
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=3600"));
    response
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DevTokenRequest {
    uid: String,
    #[serde(default)]
    role: Option<Role>,
    #[serde(default)]
    roles: Vec<Role>,
    #[serde(default)]
    email: Option<String>,
}

async fn dev_token(State(auth): State<AuthState>, body: Result<Json<DevTokenRequest>, JsonRejection>) -> Response {
    let Some(dev) = auth.dev_issuer() else {
        return json_error(StatusCode::NOT_FOUND, "not-found", "dev mode is off");
    };
    let request = match body {
        Ok(Json(request)) => request,
        Err(rejection) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "argument-error",
                &format!(
                    "expected {{\"uid\": string, \"role\": speaker|listener|moderator|admin}}: {}",
                    rejection.body_text()
                ),
            );
        }
    };
    let mut roles = request.roles;
    roles.extend(request.role);
    roles.sort();
    roles.dedup();
    // A role set by an admin is dev mode's custom claim: it wins over the role asked for, as a
    // real claim wins over whatever a client would like to be.
    let set_by_admin = match auth.dev_roles().map(|table| table.get(&request.uid)).transpose() {
        Ok(role) => role.flatten(),
        Err(error) => {
            warn!(uid = %request.uid, %error, "dev role table unreadable");
            return json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal-error", &error.to_string());
        }
    };
    if let Some(role) = set_by_admin {
        roles = vec![role];
    }
    match dev.mint(&request.uid, &roles, request.email.as_deref()) {
        Ok((token, expires_in)) => {
            info!(uid = %request.uid, ?roles, set_by_admin = set_by_admin.is_some(), expires_in, "dev token minted");
            no_store(Json(json!({ "idToken": token, "expiresIn": expires_in, "uid": request.uid })).into_response())
        }
        Err(error) => json_error(StatusCode::BAD_REQUEST, "argument-error", &error.to_string()),
    }
}
