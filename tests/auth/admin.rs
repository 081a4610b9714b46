//! Managing roles (issue 14): the service account's token exchange against a local server that
//! checks the assertion as Google's token endpoint does, the Identity Toolkit calls against a fake
//! of the API (claims merged, limits, errors), the key file rules, and `PUT /api/users/{uid}/role`
//! plus `encore admin` over a real dev-mode server.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use encore::auth::admin::{IDENTITY_TOOLKIT_SCOPE, JWT_BEARER_GRANT_TYPE, MAX_CLAIMS_BYTES};
use encore::auth::{
    AdminError, AuthConfig, AuthOptions, AuthSetupError, AuthState, ClaimsAdmin, Clock, FirebaseAdminOptions,
    ManualClock, Role, ServiceAccount, ServiceAccountCredential, UserRoles, parse_role,
};
use encore::client::{Publisher, Signaling, get, put};
use encore::protocol::{Done, ErrorCode, Request};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::support::*;
use crate::server::support::{start_server, temp_dir};

pub const CLIENT_EMAIL: &str = "encore-admin@encore-test.iam.gserviceaccount.com";

// ---------------------------------------------------------------------------------------------
// A fake of Google: the OAuth token endpoint and the Identity Toolkit API, on 127.0.0.1

#[derive(Default)]
struct User {
    email: Option<String>,
    custom_attributes: Option<String>,
}

struct GoogleState {
    token_uri: String,
    public_key: DecodingKey,
    kid: String,
    clock: ManualClock,
    expires_in: Mutex<i64>,
    exchanges: AtomicUsize,
    /// Every assertion received and every access token issued (the log test looks for them).
    assertions: Mutex<Vec<String>>,
    issued: Mutex<Vec<String>>,
    /// Tokens the API accepts (revoking empties it).
    valid: Mutex<Vec<String>>,
    refuse_grants: AtomicBool,
    users: Mutex<BTreeMap<String, User>>,
    /// The bodies of `accounts:update` calls, in order.
    updates: Mutex<Vec<Value>>,
    api_calls: AtomicUsize,
}

/// Google, as far as `ClaimsAdmin` can tell: `POST /token` checks the assertion (RS256 signature
/// with the service account's public key, `iss`, `scope`, `aud`, `iat`, `exp`, the grant type)
/// and issues access tokens; `/v1/projects/encore-test/...` checks them and serves
/// `accounts:lookup`, `accounts:update` and `accounts:batchGet` (two users a page, whatever
/// `maxResults` asks, so paging is exercised).
pub struct FakeGoogle {
    pub addr: std::net::SocketAddr,
    state: Arc<GoogleState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeGoogle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn oauth_error(description: &str) -> Response {
    (StatusCode::BAD_REQUEST, axum::Json(json!({"error": "invalid_grant", "error_description": description})))
        .into_response()
}

fn b64_json(segment: &str) -> Option<Value> {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(segment).ok()?).ok()
}

async fn token_endpoint(State(state): State<Arc<GoogleState>>, Form(form): Form<HashMap<String, String>>) -> Response {
    state.exchanges.fetch_add(1, Ordering::SeqCst);
    if form.get("grant_type").map(String::as_str) != Some(JWT_BEARER_GRANT_TYPE) {
        return (StatusCode::BAD_REQUEST, axum::Json(json!({"error": "unsupported_grant_type"}))).into_response();
    }
    let Some(assertion) = form.get("assertion") else { return oauth_error("no assertion") };
    state.assertions.lock().unwrap().push(assertion.clone());
    if state.refuse_grants.load(Ordering::SeqCst) {
        return oauth_error("Invalid JWT Signature.");
    }
    let parts: Vec<&str> = assertion.split('.').collect();
    let [head, payload, signature] = parts[..] else { return oauth_error("not a JWT") };
    let (Some(head_json), Some(claims)) = (b64_json(head), b64_json(payload)) else {
        return oauth_error("undecodable JWT");
    };
    if head_json["alg"] != "RS256" || head_json["kid"] != state.kid.as_str() {
        return oauth_error("bad header");
    }
    let signed = format!("{head}.{payload}");
    if !jsonwebtoken::crypto::verify(signature, signed.as_bytes(), &state.public_key, Algorithm::RS256).unwrap_or(false)
    {
        return oauth_error("Invalid JWT Signature.");
    }
    let now = state.clock.now_s();
    let (iat, exp) = (claims["iat"].as_i64().unwrap_or(0), claims["exp"].as_i64().unwrap_or(0));
    let checks = [
        ("iss", claims["iss"] == CLIENT_EMAIL),
        ("scope", claims["scope"] == IDENTITY_TOOLKIT_SCOPE),
        ("aud", claims["aud"] == state.token_uri.as_str()),
        ("iat", (iat - now).abs() <= 60),
        ("exp", exp > now && exp > iat && exp - iat <= 3600),
    ];
    if let Some((claim, _)) = checks.iter().find(|(_, ok)| !ok) {
        return oauth_error(&format!("Invalid JWT: bad {claim}"));
    }
    let token = format!("ya29.fake-{}-{}", state.exchanges.load(Ordering::SeqCst), now);
    state.issued.lock().unwrap().push(token.clone());
    state.valid.lock().unwrap().push(token.clone());
    let expires_in = *state.expires_in.lock().unwrap();
    axum::Json(json!({"access_token": token, "expires_in": expires_in, "token_type": "Bearer"})).into_response()
}

fn api_error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({"error": {"code": status.as_u16(), "message": message}}))).into_response()
}

fn user_json(uid: &str, user: &User) -> Value {
    let mut value = json!({"localId": uid});
    if let Some(email) = &user.email {
        value["email"] = json!(email);
    }
    if let Some(attributes) = &user.custom_attributes {
        value["customAttributes"] = json!(attributes);
    }
    value
}

async fn identity_toolkit(
    State(state): State<Arc<GoogleState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    state.api_calls.fetch_add(1, Ordering::SeqCst);
    let bearer =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if !bearer.is_some_and(|token| state.valid.lock().unwrap().iter().any(|valid| valid == token)) {
        return api_error(StatusCode::UNAUTHORIZED, "Request had invalid authentication credentials.");
    }
    let Some(operation) = uri.path().strip_prefix(&format!("/v1/projects/{PROJECT}/")) else {
        return api_error(StatusCode::NOT_FOUND, "no such project");
    };
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut users = state.users.lock().unwrap();
    match (method, operation) {
        (Method::POST, "accounts:lookup") => {
            let found: Vec<Value> = request["localId"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|uid| uid.as_str())
                .filter_map(|uid| users.get(uid).map(|user| user_json(uid, user)))
                .collect();
            // Google answers `{}` when no user matches.
            if found.is_empty() { axum::Json(json!({})) } else { axum::Json(json!({ "users": found })) }.into_response()
        }
        (Method::POST, "accounts:update") => {
            state.updates.lock().unwrap().push(request.clone());
            let Some(user) = request["localId"].as_str().and_then(|uid| users.get_mut(uid)) else {
                return api_error(StatusCode::BAD_REQUEST, "USER_NOT_FOUND");
            };
            user.custom_attributes = request["customAttributes"].as_str().map(str::to_owned);
            axum::Json(json!({"localId": request["localId"]})).into_response()
        }
        (Method::GET, "accounts:batchGet") => {
            let query: Query<HashMap<String, String>> = Query::try_from_uri(&uri).expect("query");
            let start: usize = query.get("nextPageToken").map_or(0, |token| {
                token
                    .strip_prefix("page/")
                    .and_then(|n| n.strip_suffix("="))
                    .and_then(|n| n.parse().ok())
                    .expect("our token")
            });
            let page: Vec<Value> = users.iter().skip(start).take(2).map(|(uid, user)| user_json(uid, user)).collect();
            let mut answer = json!({ "users": page });
            if start + 2 < users.len() {
                // Characters that must be encoded in a query, as Google's opaque tokens have.
                answer["nextPageToken"] = json!(format!("page/{}=", start + 2));
            }
            axum::Json(answer).into_response()
        }
        _ => api_error(StatusCode::NOT_FOUND, "no such method"),
    }
}

impl FakeGoogle {
    pub async fn start(clock: &ManualClock) -> FakeGoogle {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(GoogleState {
            token_uri: format!("http://{addr}/token"),
            public_key: DecodingKey::from_rsa_components(&key_a().n_b64, &key_a().e_b64).expect("public key"),
            kid: key_a().kid.clone(),
            clock: clock.clone(),
            expires_in: Mutex::new(3599),
            exchanges: AtomicUsize::new(0),
            assertions: Mutex::default(),
            issued: Mutex::default(),
            valid: Mutex::default(),
            refuse_grants: AtomicBool::new(false),
            users: Mutex::default(),
            updates: Mutex::default(),
            api_calls: AtomicUsize::new(0),
        });
        let app =
            Router::new().route("/token", post(token_endpoint)).fallback(identity_toolkit).with_state(state.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("fake google");
        });
        FakeGoogle { addr, state, task }
    }

    pub fn token_uri(&self) -> String {
        self.state.token_uri.clone()
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The service account key file's JSON, key A, tokens from this server.
    pub fn service_account_json(&self) -> String {
        json!({
            "type": "service_account",
            "project_id": PROJECT,
            "private_key_id": key_a().kid,
            "private_key": key_a().private_pem,
            "client_email": CLIENT_EMAIL,
            "client_id": "1234567890",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri(),
        })
        .to_string()
    }

    /// A `ClaimsAdmin` in firebase mode talking to this server.
    pub fn admin(&self, clock: &ManualClock) -> ClaimsAdmin {
        let account = ServiceAccount::from_json(&self.service_account_json()).expect("service account");
        let mut options = FirebaseAdminOptions::new(PROJECT);
        options.identity_toolkit_url = self.base();
        ClaimsAdmin::firebase(account, options, clock.shared()).expect("admin")
    }

    pub fn add_user(&self, uid: &str, email: Option<&str>, custom_attributes: Option<&str>) {
        let user = User { email: email.map(str::to_owned), custom_attributes: custom_attributes.map(str::to_owned) };
        self.state.users.lock().unwrap().insert(uid.to_owned(), user);
    }

    pub fn custom_attributes(&self, uid: &str) -> Option<String> {
        self.state.users.lock().unwrap().get(uid).and_then(|user| user.custom_attributes.clone())
    }

    pub fn exchanges(&self) -> usize {
        self.state.exchanges.load(Ordering::SeqCst)
    }

    pub fn api_calls(&self) -> usize {
        self.state.api_calls.load(Ordering::SeqCst)
    }

    pub fn updates(&self) -> Vec<Value> {
        self.state.updates.lock().unwrap().clone()
    }

    pub fn assertions(&self) -> Vec<String> {
        self.state.assertions.lock().unwrap().clone()
    }

    pub fn issued(&self) -> Vec<String> {
        self.state.issued.lock().unwrap().clone()
    }

    pub fn set_refuse_grants(&self, refuse: bool) {
        self.state.refuse_grants.store(refuse, Ordering::SeqCst);
    }

    /// Every access token issued so far stops working.
    pub fn revoke_all(&self) {
        self.state.valid.lock().unwrap().clear();
    }
}

/// A key file in a fresh folder, with these permissions.
pub fn key_file(json: &str, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let path = temp_dir("admin-key").join("service-account.json");
    std::fs::write(&path, json).expect("write key file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    path
}

// ---------------------------------------------------------------------------------------------
// The token exchange

#[tokio::test]
async fn the_token_exchange_is_signed_as_google_wants_cached_then_refreshed() {
    let clock = ManualClock::at_secs(NOW);
    let google = FakeGoogle::start(&clock).await;
    let account = ServiceAccount::from_json(&google.service_account_json()).expect("service account");
    assert_eq!(account.client_email(), CLIENT_EMAIL);
    assert!(!format!("{account:?}").contains("PRIVATE KEY"), "Debug shows no key: {account:?}");
    let credential = ServiceAccountCredential::new(account, clock.shared()).expect("credential");

    let first = credential.access_token().await.expect("the fake token endpoint accepts the assertion");
    assert_eq!(google.exchanges(), 1);
    assert_eq!(credential.exchange_count(), 1);
    assert_eq!(format!("{first:?}"), "AccessToken(<redacted>)");

    // The assertion as sent: RS256 with the key id, the five claims, an hour at most.
    let assertion = google.assertions().pop().expect("an assertion");
    let mut parts = assertion.split('.');
    let head = b64_json(parts.next().unwrap()).unwrap();
    let claims = b64_json(parts.next().unwrap()).unwrap();
    assert_eq!(head["alg"], "RS256");
    assert_eq!(head["kid"], key_a().kid.as_str());
    assert_eq!(claims["iss"], CLIENT_EMAIL);
    assert_eq!(claims["aud"], google.token_uri().as_str());
    assert_eq!(claims["scope"], "https://www.googleapis.com/auth/identitytoolkit");
    assert_eq!(claims["iat"], NOW);
    assert_eq!(claims["exp"], NOW + 3600);

    // Cached: no new exchange while the token is fresh, even 54 minutes on.
    assert_eq!(credential.access_token().await.unwrap(), first);
    clock.advance(Duration::from_secs(3599 - 300 - 1));
    assert_eq!(credential.access_token().await.unwrap(), first);
    assert_eq!(google.exchanges(), 1);

    // Five minutes before it expires, it is replaced.
    clock.advance(Duration::from_secs(1));
    let second = credential.access_token().await.unwrap();
    assert_ne!(second, first);
    assert_eq!(google.exchanges(), 2);
    // And a token long expired is too.
    clock.advance(Duration::from_secs(7200));
    let third = credential.access_token().await.unwrap();
    assert_ne!(third, second);
    assert_eq!(google.exchanges(), 3);
    let claims = b64_json(google.assertions().pop().unwrap().split('.').nth(1).unwrap()).unwrap();
    assert_eq!(claims["iat"], NOW + 3599 - 300 + 7200, "each assertion is made at the clock's now");
}

#[tokio::test]
async fn concurrent_callers_share_one_exchange() {
    let clock = ManualClock::at_secs(NOW);
    let google = FakeGoogle::start(&clock).await;
    let account = ServiceAccount::from_json(&google.service_account_json()).unwrap();
    let credential = Arc::new(ServiceAccountCredential::new(account, clock.shared()).unwrap());
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let credential = credential.clone();
            tokio::spawn(async move { credential.access_token().await })
        })
        .collect();
    let mut tokens = Vec::new();
    for call in calls {
        tokens.push(call.await.unwrap().unwrap());
    }
    assert!(tokens.windows(2).all(|pair| pair[0] == pair[1]));
    assert_eq!(google.exchanges(), 1);
}

#[tokio::test]
async fn a_refused_exchange_is_a_typed_error_without_the_assertion() {
    let clock = ManualClock::at_secs(NOW);
    let google = FakeGoogle::start(&clock).await;
    google.set_refuse_grants(true);
    let admin = google.admin(&clock);
    google.add_user("alice", None, None);
    let error = admin.get_role("alice").await.unwrap_err();
    assert_eq!(error.code(), "token-exchange-failed", "{error}");
    assert_eq!(error.status(), StatusCode::BAD_GATEWAY);
    let message = error.to_string();
    assert!(message.contains("invalid_grant") && message.contains("Invalid JWT Signature"), "{message}");
    let assertion = google.assertions().pop().unwrap();
    assert!(!message.contains(&assertion) && !message.contains(assertion.split('.').nth(2).unwrap()));
    assert_eq!(google.api_calls(), 0, "no API call without a token");

    // Another key under the same key id: the signature does not verify.
    google.set_refuse_grants(false);
    let mut forged: Value = serde_json::from_str(&google.service_account_json()).unwrap();
    forged["private_key"] = json!(key_b().private_pem);
    let account = ServiceAccount::from_json(&forged.to_string()).unwrap();
    let mut options = FirebaseAdminOptions::new(PROJECT);
    options.identity_toolkit_url = google.base();
    let admin = ClaimsAdmin::firebase(account, options, clock.shared()).unwrap();
    let error = admin.get_role("alice").await.unwrap_err();
    assert!(error.to_string().contains("Invalid JWT Signature"), "{error}");

    // A clock an hour off makes an assertion Google refuses (iat), as the real endpoint would.
    let skewed = ManualClock::at_secs(NOW + 3600);
    let admin = google.admin(&skewed);
    let error = admin.get_role("alice").await.unwrap_err();
    assert!(error.to_string().contains("bad iat"), "{error}");
}

// ---------------------------------------------------------------------------------------------
// The Identity Toolkit calls

#[tokio::test]
async fn set_role_merges_the_role_and_keeps_every_other_claim() {
    let clock = ManualClock::at_secs(NOW);
    let google = FakeGoogle::start(&clock).await;
    google.add_user(
        "alice",
        Some("alice@example.com"),
        Some(r#"{"tier":"gold","roles":["speaker","moderator"],"n":3}"#),
    );
    google.add_user("bob", None, None);
    let admin = google.admin(&clock);

    let before = admin.get_role("alice").await.expect("lookup");
    assert_eq!(
        before,
        UserRoles {
            uid: "alice".into(),
            roles: vec![Role::Speaker, Role::Moderator],
            email: Some("alice@example.com".into())
        }
    );

    let change = admin.set_role("alice", Role::Listener).await.expect("set-role");
    assert_eq!(change.uid, "alice");
    assert_eq!(change.role, Role::Listener, "the caller learns the new role");
    assert_eq!(change.previous, vec![Role::Speaker, Role::Moderator]);
    let updates = google.updates();
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0]["localId"], "alice");
    // Other claims kept, in order; `roles` dropped (it would keep granting speaker); `role` set.
    assert_eq!(updates[0]["customAttributes"], r#"{"tier":"gold","n":3,"role":"listener"}"#);
    assert_eq!(admin.get_role("alice").await.unwrap().roles, vec![Role::Listener]);

    // A user without claims gets just the role.
    let change = admin.set_role("bob", Role::Admin).await.unwrap();
    assert!(change.previous.is_empty());
    assert_eq!(google.custom_attributes("bob").as_deref(), Some(r#"{"role":"admin"}"#));
    assert_eq!(google.exchanges(), 1, "one access token for all of it");
}

#[tokio::test]
async fn claims_over_1000_bytes_unknown_users_roles_and_uids_are_refused_before_any_write() {
    let clock = ManualClock::at_secs(NOW);
    let google = FakeGoogle::start(&clock).await;
    // 990 bytes of other claims: with `"role":"moderator"` it would pass the limit.
    let big = format!(r#"{{"bio":"{}"}}"#, "x".repeat(990 - 10));
    assert_eq!(big.len(), 990);
    google.add_user("carol", None, Some(&big));
    let admin = google.admin(&clock);
    let error = admin.set_role("carol", Role::Moderator).await.unwrap_err();
    assert_eq!(error.code(), "claims-too-large");
    assert_eq!(error.status(), StatusCode::BAD_REQUEST);
    assert!(error.to_string().contains(&MAX_CLAIMS_BYTES.to_string()), "{error}");
    assert!(google.updates().is_empty(), "nothing written");
    assert_eq!(google.custom_attributes("carol").as_deref(), Some(big.as_str()));

    let error = admin.set_role("nobody", Role::Speaker).await.unwrap_err();
    assert_eq!(error, AdminError::UserNotFound("nobody".into()));
    assert_eq!(error.status(), StatusCode::NOT_FOUND);

    let calls = google.api_calls();
    let error = parse_role("superuser").unwrap_err();
    assert_eq!(error.code(), "invalid-role");
    assert!(error.to_string().contains("speaker, listener, moderator or admin"), "{error}");
    assert_eq!(parse_role("Speaker").unwrap_err().code(), "invalid-role", "canonical names only");
    for uid in ["", "a\u{7}b", &"u".repeat(129)] {
        assert_eq!(admin.set_role(uid, Role::Speaker).await.unwrap_err(), AdminError::InvalidUid);
    }
    assert_eq!(google.api_calls(), calls, "refused before any request");
    assert!(google.updates().is_empty());
}

#[tokio::test]
async fn list_roles_pages_through_batch_get() {
    let clock = ManualClock::at_secs(NOW);
    let google = FakeGoogle::start(&clock).await;
    google.add_user("u1", Some("u1@example.com"), Some(r#"{"role":"speaker"}"#));
    google.add_user("u2", None, None);
    google.add_user("u3", None, Some(r#"{"roles":["admin","nonsense"]}"#));
    google.add_user("u4", None, Some(r#"{"tier":"gold"}"#));
    google.add_user("u5", None, Some(r#"{"role":"MODERATOR"}"#));
    let admin = google.admin(&clock);
    let users = admin.list_roles().await.expect("list");
    let summary: Vec<(&str, Vec<Role>)> = users.iter().map(|u| (u.uid.as_str(), u.roles.clone())).collect();
    assert_eq!(
        summary,
        vec![("u1", vec![Role::Speaker]), ("u3", vec![Role::Admin]), ("u5", vec![Role::Moderator])],
        "users whose claims grant a role, read as the verifier reads them"
    );
    assert_eq!(users[0].email.as_deref(), Some("u1@example.com"));
    assert_eq!(google.api_calls(), 3, "three pages of two");
}

#[tokio::test]
async fn a_revoked_access_token_is_replaced_once() {
    let clock = ManualClock::at_secs(NOW);
    let google = FakeGoogle::start(&clock).await;
    google.add_user("dan", None, None);
    let admin = google.admin(&clock);
    admin.get_role("dan").await.unwrap();
    google.revoke_all();
    admin.set_role("dan", Role::Speaker).await.expect("a new token after the 401");
    assert_eq!(google.exchanges(), 2);
}

// ---------------------------------------------------------------------------------------------
// The key file

#[tokio::test]
async fn a_key_file_readable_by_others_is_refused_with_the_fix() {
    let clock = ManualClock::at_secs(NOW);
    let google = FakeGoogle::start(&clock).await;
    for mode in [0o644, 0o640, 0o604, 0o660] {
        let path = key_file(&google.service_account_json(), mode);
        let error = ServiceAccount::from_file(&path).unwrap_err();
        assert_eq!(error.code(), "insecure-credential-file", "{mode:o}");
        let message = error.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains(&format!("chmod 600 {}", path.display())), "{message}");
        assert!(!message.contains("PRIVATE KEY"), "{message}");

        // The server refuses to start with it.
        let mut config = AuthConfig::firebase(PROJECT);
        config.keys_url = Some("http://127.0.0.1:9/keys".into());
        config.service_account_file = Some(path.clone());
        let refused = AuthState::new(config, AuthOptions { clock: clock.shared(), ..Default::default() }).unwrap_err();
        assert!(matches!(refused, AuthSetupError::Admin(AdminError::InsecureCredentialFile { .. })), "{refused}");
    }
    for mode in [0o600, 0o400] {
        let path = key_file(&google.service_account_json(), mode);
        let account = ServiceAccount::from_file(&path).expect("an owner-only key file");
        assert_eq!(account.token_uri(), google.token_uri());
    }
    let missing = ServiceAccount::from_file(Path::new("/nonexistent/sa.json")).unwrap_err();
    assert_eq!(missing.code(), "invalid-credential");
    let not_json = key_file("-----BEGIN PRIVATE KEY-----\nabc\n", 0o600);
    let error = ServiceAccount::from_file(&not_json).unwrap_err();
    assert!(error.to_string().contains("not a JSON object") && !error.to_string().contains("abc"), "{error}");
}

#[tokio::test]
async fn firebase_mode_without_a_service_account_cannot_manage_roles() {
    let clock = ManualClock::at_secs(NOW);
    let mut config = AuthConfig::firebase(PROJECT);
    config.keys_url = Some("http://127.0.0.1:9/keys".into());
    let auth = AuthState::new(config.clone(), AuthOptions { clock: clock.shared(), ..Default::default() }).unwrap();
    let error = auth.admin().unwrap_err();
    assert_eq!(error, AdminError::NotConfigured);
    assert_eq!(error.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(error.to_string().contains("GOOGLE_APPLICATION_CREDENTIALS"), "{error}");

    // With one, the admin is the service account's.
    let google = FakeGoogle::start(&clock).await;
    config.service_account_file = Some(key_file(&google.service_account_json(), 0o600));
    let auth = AuthState::new(config, AuthOptions { clock: clock.shared(), ..Default::default() }).unwrap();
    let admin = auth.admin().expect("an admin");
    assert_eq!(admin.credential().map(|c| c.account().client_email()), Some(CLIENT_EMAIL));
}

// ---------------------------------------------------------------------------------------------
// Over a real server in dev mode: the HTTP route, the dev role table, `encore admin`

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_promotes_a_listener_over_http_and_the_next_token_may_publish() {
    let server = start_server("admin-put", |_| {}, None).await;
    let url = |uid: &str| format!("{}/api/users/{uid}/role", server.base);

    // A listener may not publish.
    let lea = server.client("lea", "listener").await;
    lea.join("admin", "lea").await.unwrap();
    let refused = lea.request::<Done>(Request::Publish { offer: "v=0".into() }).await.unwrap_err();
    assert_eq!(refused.refusal(), Some(ErrorCode::Forbidden), "{refused}");

    // No token: 401; a speaker or a moderator: 403; nothing changes.
    let (status, body) = put(&server.tls, &url("lea"), None, json!({"role": "speaker"})).await.unwrap();
    assert_eq!(status, 401, "{body}");
    for role in ["speaker", "moderator"] {
        let token = server.token(&format!("not-admin-{role}"), role).await;
        let (status, body) = put(&server.tls, &url("lea"), Some(&token), json!({"role": "speaker"})).await.unwrap();
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["error"]["code"], "forbidden");
    }
    // An admin with a bad request: 400 with a code.
    let admin = server.token("ada", "admin").await;
    let (status, body) = put(&server.tls, &url("lea"), Some(&admin), json!({"role": "superuser"})).await.unwrap();
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid-role")), "{body}");
    let (status, body) = put(&server.tls, &url("lea"), Some(&admin), json!({"rôle": "speaker"})).await.unwrap();
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid-argument")), "{body}");
    let token = server.token("lea", "listener").await;
    let (_, me) = get(&server.tls, &format!("{}/api/whoami", server.base), Some(&token)).await.unwrap();
    assert_eq!(me["roles"], json!(["listener"]), "nothing changed yet");

    // An admin promotes lea.
    let (status, body) = put(&server.tls, &url("lea"), Some(&admin), json!({"role": "speaker"})).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"uid": "lea", "role": "speaker"}));

    // Her next dev token carries the role, whatever role it asks for, and it is enforced.
    let token = server.token("lea", "listener").await;
    let (_, me) = get(&server.tls, &format!("{}/api/whoami", server.base), Some(&token)).await.unwrap();
    assert_eq!(me["roles"], json!(["speaker"]));
    let lea_again = Arc::new(Signaling::connect(&server.tls, &server.base, Some(&token), None).await.unwrap());
    assert_eq!(lea_again.welcome.roles, vec![Role::Speaker]);
    lea_again.join("admin", "lea-2").await.unwrap();
    let publisher = Publisher::start(&lea_again, false, 11).await.expect("the promoted listener publishes");
    publisher.close().await;

    // And demoted again.
    let (status, _) = put(&server.tls, &url("lea"), Some(&admin), json!({"role": "listener"})).await.unwrap();
    assert_eq!(status, 200);
    let token = server.token("lea", "speaker").await;
    let (_, me) = get(&server.tls, &format!("{}/api/whoami", server.base), Some(&token)).await.unwrap();
    assert_eq!(me["roles"], json!(["listener"]));

    // The table is in the data folder, where `encore admin` finds it.
    let table = std::fs::read_to_string(server.data_dir.join("dev-roles.json")).expect("the dev role table");
    assert_eq!(serde_json::from_str::<Value>(&table).unwrap(), json!({"roles": {"lea": "listener"}}));
    server.server.shutdown().await;
}

fn encore_admin(data_dir: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_encore"))
        .arg("admin")
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        // Dev mode by default; keep the caller's environment from choosing another.
        .env_remove("ENCORE_AUTH_MODE")
        .env_remove("ENCORE_FIREBASE_PROJECT_ID")
        .env_remove("ENCORE_SERVICE_ACCOUNT_FILE")
        .output()
        .expect("run encore admin")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encore_admin_sets_a_role_that_a_running_dev_server_then_issues() {
    let server = start_server("admin-cli", |_| {}, None).await;
    let run = |args: &[&str]| {
        let output = encore_admin(&server.data_dir, args);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "encore admin {args:?}: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    };
    let stdout = run(&["set-role", "--uid", "carl", "--role", "moderator"]);
    assert!(stdout.contains("carl: role moderator (was no role claim)"), "{stdout}");
    let token = server.token("carl", "listener").await;
    let (_, me) = get(&server.tls, &format!("{}/api/whoami", server.base), Some(&token)).await.unwrap();
    assert_eq!(me["roles"], json!(["moderator"]), "the running server reads the table at each mint");

    let stdout = run(&["set-role", "--uid", "carl", "--role", "admin", "--json"]);
    assert_eq!(
        serde_json::from_str::<Value>(&stdout).unwrap(),
        json!({"uid": "carl", "role": "admin", "previous": ["moderator"]})
    );
    let stdout = run(&["get-role", "--uid", "carl", "--json"]);
    assert_eq!(serde_json::from_str::<Value>(&stdout).unwrap(), json!({"uid": "carl", "roles": ["admin"]}));
    run(&["set-role", "--uid", "dina", "--role", "speaker"]);
    let stdout = run(&["list-roles"]);
    assert_eq!(stdout, "carl\tadmin\t-\ndina\tspeaker\t-\n");
    let stdout = run(&["get-role", "--uid", "nobody"]);
    assert_eq!(stdout, "nobody\tlistener (no role claim: the default)\t-\n");

    let output = encore_admin(&server.data_dir, &["set-role", "--uid", "carl", "--role", "root"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unknown role \"root\""), "{stderr}");
    server.server.shutdown().await;
}
