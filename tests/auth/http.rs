//! The axum pieces over real HTTP(S): the bearer extractor (401/503 with the JSON body), WS
//! tickets, client config, and dev mode's `/dev/keys` + `/dev/token` verified through a real fetch.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRef, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use encore::auth::{
    AuthConfig, AuthError, AuthMode, AuthOptions, AuthState, AuthUser, DevIssuer, ManualClock, Role, WS_TICKET_TTL,
};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::support::*;

/// The server-side state a real server would have, with auth reachable through `FromRef`.
#[derive(Clone)]
struct AppState {
    auth: AuthState,
    greeting: &'static str,
}

impl FromRef<AppState> for AuthState {
    fn from_ref(state: &AppState) -> AuthState {
        state.auth.clone()
    }
}

/// A handler of the server's own, protected by the extractor.
async fn rooms(State(state): State<AppState>, user: AuthUser) -> Json<Value> {
    Json(json!({ "greeting": state.greeting, "uid": user.uid, "may_publish": user.may_publish() }))
}

fn app(auth: AuthState) -> Router {
    Router::new()
        .route("/api/rooms", get(rooms))
        .merge(encore::auth::router(auth.clone()))
        .with_state(AppState { auth, greeting: "hello" })
}

struct Running {
    base: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Bind first (the dev verifier must know its own address), then build auth, then serve.
async fn serve_with(config: AuthConfig, clock: &ManualClock, dev: Option<Arc<DevIssuer>>) -> (Running, AuthState) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let options =
        AuthOptions { clock: clock.shared(), self_base_url: Some(base.clone()), dev_issuer: dev, ..Default::default() };
    let auth = AuthState::new(config, options).expect("auth state");
    let router = app(auth.clone());
    let task = tokio::spawn(async move {
        axum::serve(listener, router).await.expect("serve");
    });
    (Running { base, task }, auth)
}

/// A firebase-mode server whose keys come from a test key server.
async fn firebase_server(keys: &KeyServer, clock: &ManualClock) -> (Running, AuthState) {
    let mut config = AuthConfig::firebase(PROJECT);
    config.keys_url = Some(keys.url());
    config.web_api_key = Some("AIzaTestPublicKey".into());
    serve_with(config, clock, None).await
}

fn dev_issuer(clock: &ManualClock) -> Arc<DevIssuer> {
    Arc::new(DevIssuer::from_pkcs8_pem(&key_c().private_pem, 3600, clock.shared()).expect("dev issuer"))
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    json: Value,
}

async fn request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
    roots: &[CertificateDer<'static>],
) -> Reply {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).expect("root");
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("tls versions")
        .with_root_certificates(store)
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().build();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    let mut builder = axum::http::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, HeaderValue::from_str(value).expect("header value"));
    }
    let body = match body {
        Some(json) => {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
            Full::new(Bytes::from(json.to_string()))
        }
        None => Full::new(Bytes::new()),
    };
    let response = client.request(builder.body(body).expect("request")).await.expect("response");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.expect("body").to_bytes();
    let json = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
    };
    Reply { status, headers, json }
}

async fn get_json(url: &str, headers: &[(&str, &str)]) -> Reply {
    request(Method::GET, url, headers, None, &[]).await
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

// ---------------------------------------------------------------------------------------------
// The extractor

#[tokio::test]
async fn extractor_accepts_valid_bearer_token() {
    let keys = KeyServer::x509(&[key_a()], "max-age=3600").await;
    let clock = ManualClock::at_secs(NOW);
    let (server, _) = firebase_server(&keys, &clock).await;
    let token = rs256(key_a(), &claims_with(&[("role", json!("speaker"))]));
    let reply = get_json(&format!("{}/api/rooms", server.base), &[("authorization", &bearer(&token))]).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.json);
    assert_eq!(reply.json, json!({"greeting": "hello", "uid": "alice", "may_publish": true}));

    let reply =
        get_json(&format!("{}/api/whoami", server.base), &[("authorization", &format!("bearer {token}"))]).await;
    assert_eq!(reply.status, StatusCode::OK, "scheme is case-insensitive: {:?}", reply.json);
    assert_eq!(reply.json["uid"], "alice");
    assert_eq!(reply.json["roles"], json!(["speaker"]));
}

/// Each refused Authorization shape answers 401, `WWW-Authenticate: Bearer ...` and the JSON body.
#[tokio::test]
async fn extractor_refuses_bad_authorization_headers() {
    let keys = KeyServer::x509(&[key_a()], "max-age=3600").await;
    let clock = ManualClock::at_secs(NOW);
    let (server, _) = firebase_server(&keys, &clock).await;
    let token = valid_token();
    let expired = rs256(key_a(), &claims_with(&[("exp", json!(NOW - 3600))]));
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, &'a str);
    let cases: Vec<Case> = vec![
        ("missing header", vec![], "argument-error"),
        ("missing Bearer prefix", vec![("authorization", token.clone())], "argument-error"),
        ("wrong prefix Basic", vec![("authorization", format!("Basic {token}"))], "argument-error"),
        ("wrong prefix Token", vec![("authorization", format!("Token {token}"))], "argument-error"),
        ("prefix without space", vec![("authorization", format!("Bearer{token}"))], "argument-error"),
        ("Bearer without token", vec![("authorization", "Bearer ".into())], "argument-error"),
        ("two tokens", vec![("authorization", format!("Bearer {token} {token}"))], "argument-error"),
        ("empty token", vec![("authorization", "Bearer".into())], "argument-error"),
        ("garbage token", vec![("authorization", "Bearer abc.def.ghi".into())], "argument-error"),
        ("expired token", vec![("authorization", bearer(&expired))], "id-token-expired"),
    ];
    for (name, headers, code) in cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let reply = get_json(&format!("{}/api/rooms", server.base), &headers).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{name}");
        let challenge = reply.headers.get(header::WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).unwrap_or_default();
        assert!(challenge.starts_with("Bearer"), "{name}: WWW-Authenticate {challenge:?}");
        assert_eq!(reply.json["error"]["code"], code, "{name}: {:?}", reply.json);
        let message = reply.json["error"]["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "{name}: no message");
        assert!(!message.contains(&token) && !message.contains(&expired), "{name}: token echoed");
    }
}

#[tokio::test]
async fn extractor_refuses_two_authorization_headers() {
    let keys = KeyServer::x509(&[key_a()], "max-age=3600").await;
    let clock = ManualClock::at_secs(NOW);
    let (server, _) = firebase_server(&keys, &clock).await;
    let token = valid_token();
    let reply = get_json(
        &format!("{}/api/rooms", server.base),
        &[("authorization", &bearer(&token)), ("authorization", &bearer(&token))],
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(reply.json["error"]["message"].as_str().unwrap_or_default().contains("more than one"));
}

#[tokio::test]
async fn extractor_answers_503_when_there_are_no_keys() {
    let keys = KeyServer::x509(&[key_a()], "max-age=3600").await;
    keys.set_up(false);
    let clock = ManualClock::at_secs(NOW);
    let (server, _) = firebase_server(&keys, &clock).await;
    let reply = get_json(&format!("{}/api/rooms", server.base), &[("authorization", &bearer(&valid_token()))]).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", reply.json);
    assert_eq!(reply.json["error"]["code"], "keys-unavailable");
    assert!(reply.headers.get(header::RETRY_AFTER).is_some());
    assert!(reply.headers.get(header::WWW_AUTHENTICATE).is_none(), "not a credential problem");
}

// ---------------------------------------------------------------------------------------------
// WebSocket tickets

async fn issue_ticket(server: &Running, token: &str) -> String {
    let reply = request(
        Method::POST,
        &format!("{}/api/ws-ticket", server.base),
        &[("authorization", &bearer(token))],
        None,
        &[],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.json);
    assert_eq!(reply.json["expiresIn"], 30);
    assert_eq!(reply.headers.get(header::CACHE_CONTROL).and_then(|v| v.to_str().ok()), Some("no-store"));
    reply.json["ticket"].as_str().expect("ticket").to_owned()
}

#[tokio::test]
async fn ticket_works_once() {
    let keys = KeyServer::x509(&[key_a()], "max-age=3600").await;
    let clock = ManualClock::at_secs(NOW);
    let (server, auth) = firebase_server(&keys, &clock).await;
    let ticket = issue_ticket(&server, &rs256(key_a(), &claims_with(&[("role", json!("speaker"))]))).await;
    assert!(ticket.len() >= 43, "256-bit ticket");
    let user = auth.redeem_ticket(&ticket).expect("first use");
    assert_eq!(user.uid, "alice");
    assert_eq!(user.roles, vec![Role::Speaker]);
    assert_eq!(auth.redeem_ticket(&ticket), Err(AuthError::InvalidTicket), "second use");
    assert_eq!(auth.tickets().outstanding(), 0);
}

#[tokio::test]
async fn ticket_expires_after_30_seconds() {
    let keys = KeyServer::x509(&[key_a()], "max-age=3600").await;
    let clock = ManualClock::at_secs(NOW);
    let (server, auth) = firebase_server(&keys, &clock).await;
    assert_eq!(WS_TICKET_TTL, Duration::from_secs(30));
    let early = issue_ticket(&server, &valid_token()).await;
    let late = issue_ticket(&server, &valid_token()).await;
    clock.advance(Duration::from_millis(29_999));
    auth.redeem_ticket(&early).expect("just inside 30 s");
    clock.advance(Duration::from_millis(1));
    let error = auth.redeem_ticket(&late).expect_err("at 30 s");
    assert_eq!(error, AuthError::InvalidTicket);
    assert_eq!(error.code(), "invalid-ticket");
    assert_eq!(error.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn ticket_needs_a_bearer_token() {
    let keys = KeyServer::x509(&[key_a()], "max-age=3600").await;
    let clock = ManualClock::at_secs(NOW);
    let (server, auth) = firebase_server(&keys, &clock).await;
    let reply = request(Method::POST, &format!("{}/api/ws-ticket", server.base), &[], None, &[]).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(auth.tickets().outstanding(), 0);
    assert_eq!(auth.redeem_ticket("made-up-ticket"), Err(AuthError::InvalidTicket));
}

#[tokio::test]
async fn upgrade_takes_a_ticket_or_a_header() {
    let keys = KeyServer::x509(&[key_a()], "max-age=3600").await;
    let clock = ManualClock::at_secs(NOW);
    let (server, auth) = firebase_server(&keys, &clock).await;
    let ticket = issue_ticket(&server, &valid_token()).await;
    let no_headers = HeaderMap::new();
    assert_eq!(auth.authenticate_upgrade(&no_headers, Some(&ticket)).await.expect("ticket").uid, "alice");
    assert_eq!(auth.authenticate_upgrade(&no_headers, Some(&ticket)).await, Err(AuthError::InvalidTicket));
    let mut headers = HeaderMap::new();
    headers.insert(header::AUTHORIZATION, HeaderValue::from_str(&bearer(&valid_token())).expect("value"));
    assert_eq!(auth.authenticate_upgrade(&headers, None).await.expect("header").uid, "alice");
    assert_eq!(auth.authenticate_upgrade(&no_headers, None).await, Err(AuthError::MissingAuthorization));
}

#[tokio::test]
async fn reauth_and_session_deadline() {
    let keys = KeyServer::x509(&[key_a()], "max-age=3600").await;
    let clock = ManualClock::at_secs(NOW);
    let (_server, auth) = firebase_server(&keys, &clock).await;
    let user = auth.verify(&valid_token()).await.expect("token");
    assert_eq!(auth.session_deadline_s(&user), NOW + 3540 + 60, "exp + default grace 60 s");
    clock.advance(Duration::from_secs(3000));
    let fresh = rs256(key_a(), &claims_with(&[("iat", json!(NOW + 3000)), ("exp", json!(NOW + 6600))]));
    let renewed = auth.reauthenticate(&user, &fresh).await.expect("reauth");
    assert_eq!(renewed.expires_at, NOW + 6600);
    let bob =
        rs256(key_a(), &claims_with(&[("sub", json!("bob")), ("iat", json!(NOW + 3000)), ("exp", json!(NOW + 6600))]));
    let error = auth.reauthenticate(&user, &bob).await.expect_err("another user");
    assert_eq!(error.check(), "sub");
}

// ---------------------------------------------------------------------------------------------
// Client config

#[tokio::test]
async fn client_config_firebase() {
    let keys = KeyServer::x509(&[key_a()], "max-age=3600").await;
    let clock = ManualClock::at_secs(NOW);
    let (server, _) = firebase_server(&keys, &clock).await;
    let reply = get_json(&format!("{}/api/client-config", server.base), &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.json,
        json!({"mode": "firebase", "projectId": PROJECT, "apiKey": "AIzaTestPublicKey", "tenantId": null, "emulatorHost": null, "devTokenPath": null})
    );
    let dev = request(Method::POST, &format!("{}/dev/token", server.base), &[], Some(json!({"uid": "x"})), &[]).await;
    assert_eq!(dev.status, StatusCode::NOT_FOUND, "no dev routes in firebase mode");
}

#[tokio::test]
async fn client_config_emulator() {
    let clock = ManualClock::at_secs(NOW);
    let (server, auth) = serve_with(AuthConfig::emulator("demo-encore"), &clock, None).await;
    assert_eq!(auth.mode(), AuthMode::FirebaseEmulator);
    let reply = get_json(&format!("{}/api/client-config", server.base), &[]).await;
    assert_eq!(reply.json["mode"], "firebase-emulator");
    assert_eq!(reply.json["projectId"], "demo-encore");
    assert_eq!(reply.json["emulatorHost"], "127.0.0.1:9099");
    // An emulator token works through the same extractor.
    let mut claims = claims();
    claims.insert("aud".into(), json!("demo-encore"));
    claims.insert("iss".into(), json!("https://securetoken.google.com/demo-encore"));
    let reply =
        get_json(&format!("{}/api/whoami", server.base), &[("authorization", &bearer(&unsigned(&claims)))]).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.json);
    assert_eq!(reply.json["uid"], "alice");
}

// ---------------------------------------------------------------------------------------------
// Dev mode

#[tokio::test]
async fn dev_mode_mints_and_verifies_through_dev_keys() {
    let clock = ManualClock::at_secs(NOW);
    let (server, auth) = serve_with(AuthConfig::default(), &clock, Some(dev_issuer(&clock))).await;
    let config = get_json(&format!("{}/api/client-config", server.base), &[]).await;
    assert_eq!(config.json["mode"], "dev");
    assert_eq!(config.json["projectId"], "encore-dev");
    assert_eq!(config.json["devTokenPath"], "/dev/token");

    let keys = get_json(&format!("{}/dev/keys", server.base), &[]).await;
    assert_eq!(keys.status, StatusCode::OK);
    assert_eq!(keys.headers.get(header::CACHE_CONTROL).and_then(|v| v.to_str().ok()), Some("public, max-age=3600"));
    let map = keys.json.as_object().expect("x509 map");
    assert_eq!(map.len(), 1);
    assert!(map.values().all(|pem| pem.as_str().is_some_and(|p| p.starts_with("-----BEGIN CERTIFICATE-----"))));

    let minted = request(
        Method::POST,
        &format!("{}/dev/token", server.base),
        &[],
        Some(json!({"uid": "bob", "role": "speaker"})),
        &[],
    )
    .await;
    assert_eq!(minted.status, StatusCode::OK, "{:?}", minted.json);
    assert_eq!(minted.json["expiresIn"], 3600);
    let token = minted.json["idToken"].as_str().expect("idToken").to_owned();

    let me = get_json(&format!("{}/api/whoami", server.base), &[("authorization", &bearer(&token))]).await;
    assert_eq!(me.status, StatusCode::OK, "{:?}", me.json);
    assert_eq!(me.json["uid"], "bob");
    assert_eq!(me.json["roles"], json!(["speaker"]));
    assert_eq!(me.json["expires_at"], NOW + 3600);
    let fetched = auth.verifier().key_source().expect("key source").fetch_count();
    assert_eq!(fetched, 1, "verified by fetching /dev/keys over HTTP");

    // A dev token is still subject to every check: an hour later it has expired.
    clock.advance(Duration::from_secs(3600 + 30));
    let me = get_json(&format!("{}/api/whoami", server.base), &[("authorization", &bearer(&token))]).await;
    assert_eq!(me.status, StatusCode::UNAUTHORIZED);
    assert_eq!(me.json["error"]["code"], "id-token-expired");
}

#[tokio::test]
async fn dev_token_refuses_bad_requests() {
    let clock = ManualClock::at_secs(NOW);
    let (server, _) = serve_with(AuthConfig::default(), &clock, Some(dev_issuer(&clock))).await;
    let url = format!("{}/dev/token", server.base);
    for (name, body) in [
        ("unknown role", json!({"uid": "bob", "role": "wizard"})),
        ("missing uid", json!({"role": "speaker"})),
        ("empty uid", json!({"uid": ""})),
        ("129-character uid", json!({"uid": "u".repeat(129)})),
        ("unknown field", json!({"uid": "bob", "admin": true})),
    ] {
        let reply = request(Method::POST, &url, &[], Some(body), &[]).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{name}: {:?}", reply.json);
        assert_eq!(reply.json["error"]["code"], "argument-error", "{name}");
    }
    let no_role = request(Method::POST, &url, &[], Some(json!({"uid": "carol"})), &[]).await;
    let token = no_role.json["idToken"].as_str().expect("token").to_owned();
    let me = get_json(&format!("{}/api/whoami", server.base), &[("authorization", &bearer(&token))]).await;
    assert_eq!(me.json["roles"], json!(["listener"]), "default role");
}

/// Dev mode as `encore serve` runs it: HTTPS with a self-signed certificate, a fresh RSA key,
/// and the verifier fetching `/dev/keys` from the server itself, trusting that certificate.
#[tokio::test]
async fn dev_mode_over_https_with_fresh_key() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).expect("server cert");
    let cert_der = tls.cert.der().clone();
    let rustls_config =
        axum_server::tls_rustls::RustlsConfig::from_der(vec![cert_der.to_vec()], tls.signing_key.serialize_der())
            .await
            .expect("tls");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let base = format!("https://{}", listener.local_addr().expect("addr"));
    let options = AuthOptions {
        self_base_url: Some(base.clone()),
        extra_root_certs: vec![cert_der.clone()],
        ..Default::default()
    };
    let auth = tokio::task::spawn_blocking(move || AuthState::new(AuthConfig::default(), options))
        .await
        .expect("join")
        .expect("dev auth with a fresh key");
    let server = axum_server::from_tcp_rustls(listener, rustls_config).expect("server");
    let router = app(auth.clone());
    let task = tokio::spawn(async move {
        let _ = server.serve(router.into_make_service()).await;
    });
    let _running = Running { base: base.clone(), task };

    let roots = [cert_der];
    let minted = request(
        Method::POST,
        &format!("{base}/dev/token"),
        &[],
        Some(json!({"uid": "dana", "role": "moderator"})),
        &roots,
    )
    .await;
    assert_eq!(minted.status, StatusCode::OK, "{:?}", minted.json);
    let token = minted.json["idToken"].as_str().expect("token").to_owned();
    let me =
        request(Method::GET, &format!("{base}/api/whoami"), &[("authorization", &bearer(&token))], None, &roots).await;
    assert_eq!(me.status, StatusCode::OK, "{:?}", me.json);
    assert_eq!(me.json["uid"], "dana");
    assert_eq!(me.json["roles"], json!(["moderator"]));
}
