//! Tokens never appear in logs: drive the auth paths (accepted and refused tokens, tickets, dev
//! mode, the emulator, managing roles as a service account) with every event captured at TRACE,
//! then search the capture for tokens, tickets, assertions, access tokens and the private key.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, header};
use encore::auth::{AuthConfig, AuthOptions, AuthState, DevIssuer, ManualClock, Role};
use serde_json::json;
use tokio::net::TcpListener;

use super::support::*;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

async fn serve(auth: AuthState, listener: TcpListener) -> tokio::task::JoinHandle<()> {
    let router = encore::auth::router::<()>(auth);
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    })
}

fn headers(token: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {token}")).expect("header"));
    headers
}

/// The capture runs in a child process of its own (this test binary, re-run on just the test
/// below): tracing caches per-callsite interest process-wide, and with the other tests hitting the
/// same callsites on other threads, a thread-scoped subscriber can miss events. Alone in its
/// process, with a global subscriber, nothing is missed. Once per log format, through the
/// server's own subscriber (`encore::logging`).
#[test]
fn captured_logs_contain_no_token() {
    for format in ["text", "json"] {
        let exe = std::env::current_exe().expect("test binary");
        let output = std::process::Command::new(exe)
            .args(["--exact", "auth::logs::log_capture_child", "--ignored", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, format)
            .output()
            .expect("run child");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("1 passed"),
            "log capture child ({format}) failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Set to the log format the child captures in.
const CHILD_ENV: &str = "ENCORE_AUTH_LOG_CAPTURE_CHILD";

#[tokio::test(flavor = "current_thread")]
#[ignore = "run by captured_logs_contain_no_token in a process of its own"]
async fn log_capture_child() {
    let Some(format) = std::env::var(CHILD_ENV).ok() else { return };
    let format: encore::logging::LogFormat = format.parse().expect("text or json");
    let capture = Capture::default();
    let filter = tracing_subscriber::EnvFilter::new("trace");
    let subscriber = encore::logging::subscriber(format, filter, capture.clone(), false);
    tracing::subscriber::set_global_default(subscriber).expect("the child process has no subscriber yet");

    let clock = ManualClock::at_secs(NOW);
    let mut secrets: Vec<String> = Vec::new();

    // Firebase mode, keys over HTTP.
    let keys = KeyServer::x509(&[key_a()], "max-age=60").await;
    let mut config = AuthConfig::firebase(PROJECT);
    config.keys_url = Some(keys.url());
    let auth = AuthState::new(config, AuthOptions { clock: clock.shared(), ..Default::default() }).expect("auth");
    let good = rs256(key_a(), &claims_with(&[("role", json!("speaker"))]));
    let bad = [
        rs256(key_a(), &claims_with(&[("exp", json!(NOW - 3600))])),
        rs256(key_a(), &claims_with(&[("aud", json!("other"))])),
        rs256(key_a(), &claims_with(&[("sub", json!(""))])),
        jws(
            json!({"alg": "RS256", "kid": "kid-unknown"}),
            &claims(),
            &key_a().encoding,
            jsonwebtoken::Algorithm::RS256,
        ),
        jws(json!({"alg": "RS256", "kid": key_a().kid}), &claims(), &key_b().encoding, jsonwebtoken::Algorithm::RS256),
        unsigned(&claims()),
        format!("{good}.x"),
    ];
    let user = auth.authenticate(&headers(&good)).await.expect("good token");
    assert_eq!(user.roles, vec![Role::Speaker]);
    for token in &bad {
        assert!(auth.authenticate(&headers(token)).await.is_err());
    }
    secrets.push(good.clone());
    secrets.extend(bad.iter().cloned());

    // Tickets.
    let ticket = auth.issue_ticket(user.clone()).expect("ticket").ticket;
    auth.redeem_ticket(&ticket).expect("redeem");
    assert!(auth.redeem_ticket(&ticket).is_err());
    secrets.push(ticket);

    // Key refresh failure and recovery.
    keys.set_up(false);
    clock.advance(Duration::from_secs(61));
    let _ = auth.verify(&good).await;

    // Dev mode over real HTTP, tokens minted by POST /dev/token.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let dev = Arc::new(DevIssuer::from_pkcs8_pem(&key_c().private_pem, 3600, clock.shared()).expect("dev"));
    let options = AuthOptions {
        clock: clock.shared(),
        self_base_url: Some(base.clone()),
        dev_issuer: Some(dev.clone()),
        ..Default::default()
    };
    let dev_auth = AuthState::new(AuthConfig::default(), options).expect("dev auth");
    let server = serve(dev_auth.clone(), listener).await;
    let (dev_token, _) = dev.mint("erin", &[Role::Admin], Some("erin@example.com")).expect("mint");
    dev_auth.authenticate(&headers(&dev_token)).await.expect("dev token");
    secrets.push(dev_token);
    server.abort();

    // Managing roles as a service account: an exchange, API calls, a revoked token replaced, a
    // refused exchange. The assertions and access tokens are what the fake Google saw and issued.
    let google = super::admin::FakeGoogle::start(&clock).await;
    google.add_user("alice", Some("alice@example.com"), Some(r#"{"tier":"gold"}"#));
    let mut config = AuthConfig::firebase(PROJECT);
    config.keys_url = Some(keys.url());
    config.service_account_file = Some(super::admin::key_file(&google.service_account_json(), 0o600));
    AuthState::new(config, AuthOptions { clock: clock.shared(), ..Default::default() }).expect("auth");
    let admin = google.admin(&clock);
    admin.set_role("alice", Role::Speaker).await.expect("set-role");
    google.revoke_all();
    admin.get_role("alice").await.expect("a new token after the 401");
    google.revoke_all();
    google.set_refuse_grants(true);
    assert!(admin.get_role("alice").await.is_err(), "the new exchange is refused");
    assert!(google.assertions().len() >= 3 && google.issued().len() >= 2);
    secrets.extend(google.assertions());
    secrets.extend(google.issued());
    let dev_admin = dev_auth.admin().expect("dev admin");
    dev_admin.set_role("erin", Role::Speaker).await.expect("dev set-role");

    // Emulator mode.
    let emulator =
        AuthState::new(AuthConfig::emulator(PROJECT), AuthOptions { clock: clock.shared(), ..Default::default() })
            .expect("emulator");
    let emulator_token = unsigned(&claims());
    emulator.authenticate(&headers(&emulator_token)).await.expect("emulator token");
    let signed_for_emulator = format!("{emulator_token}c2ln");
    assert!(emulator.authenticate(&headers(&signed_for_emulator)).await.is_err());
    secrets.push(emulator_token);
    secrets.push(signed_for_emulator);

    let log = String::from_utf8(capture.0.lock().unwrap().clone()).expect("utf-8 log");
    if format == encore::logging::LogFormat::Json {
        for line in log.lines() {
            let event: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert!(event["message"].is_string() && event["level"].is_string(), "{line}");
        }
    }
    // The capture worked: the paths above did log.
    for expected in [
        "ID token verified",
        "ID token rejected",
        "public keys refreshed",
        "public key refresh failed",
        "DEV MODE",
        "FIREBASE-EMULATOR MODE",
        "managing roles as a service account",
        "service account access token obtained",
        "role claim set",
        "access token refused",
    ] {
        assert!(log.contains(expected), "log lacks {expected:?}:\n{log}");
    }
    // Not a line of the service account's private key.
    for line in key_a().private_pem.lines().filter(|line| !line.starts_with("-----") && line.len() >= 16) {
        assert!(!log.contains(line), "a line of the private key appears in the log");
    }
    for secret in &secrets {
        assert!(!log.contains(secret.as_str()), "a token or ticket appears in the log");
        // No part that identifies a token either: its signature, or its payload.
        let mut parts = secret.split('.');
        let (_header, payload, signature) = (parts.next(), parts.next(), parts.next());
        for part in [payload, signature].into_iter().flatten().filter(|p| p.len() >= 16) {
            assert!(!log.contains(part), "a token segment appears in the log");
        }
    }
}
