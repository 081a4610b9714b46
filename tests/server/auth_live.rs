//! Auth over a real server: roles enforced on signaling, single-use tickets that expire, sessions
//! closed when their token expires without `reauth`, and logs free of tokens.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use encore::protocol::{Done, ErrorCode, Notice, Reauthed, Request};

use encore::auth::{Clock, DevIssuer, ManualClock};
use encore::client::{ClientError, ClientTls, Publisher, Signaling, dev_token, get, ws_ticket};

use super::support::{start_server, temp_dir};

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_trying_to_publish_gets_forbidden() {
    let server = start_server("auth-forbidden", |_| {}, None).await;
    let lea = server.client("lea", "listener").await;
    lea.join("auth", "lea").await.unwrap();
    let refused = lea.request::<Done>(Request::Publish { offer: "v=0".into() }).await.unwrap_err();
    assert_eq!(refused.refusal(), Some(ErrorCode::Forbidden), "{refused}");
    assert!(refused.to_string().contains("listener"), "{refused}");
    let refused = lea.request::<Done>(Request::MutePeer { peer: "sam".into() }).await.unwrap_err();
    assert_eq!(refused.refusal(), Some(ErrorCode::Forbidden), "{refused}");
    // A speaker may publish.
    let sam = server.client("sam", "speaker").await;
    sam.join("auth", "sam").await.unwrap();
    let publisher = Publisher::start(&sam, false, 7).await.expect("a speaker publishes");
    publisher.close().await;
    // The room API wants a token; healthz does not.
    let (status, _) = get(&server.tls, &format!("{}/api/rooms", server.base), None).await.unwrap();
    assert_eq!(status, 401);
    let (status, _) = get(&server.tls, &format!("{}/healthz", server.base), None).await.unwrap();
    assert_eq!(status, 200);
    let token = server.token("adm", "admin").await;
    let (status, rooms) = get(&server.tls, &format!("{}/api/rooms", server.base), Some(&token)).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(rooms["rooms"][0]["id"], "auth");
    let (status, room) = get(&server.tls, &format!("{}/api/rooms/auth", server.base), Some(&token)).await.unwrap();
    assert_eq!(status, 200, "{room}");
    let peers: Vec<&str> = room["peers"].as_array().unwrap().iter().filter_map(|p| p["peer"].as_str()).collect();
    assert_eq!(peers, ["lea", "sam"]);
    assert_eq!(room["peers"][1]["uid"], "sam");
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_works_once_and_not_after_thirty_seconds() {
    let clock = ManualClock::at_secs(unix_now());
    let server = start_server("auth-ticket", |_| {}, Some(clock.shared())).await;
    let token = server.token("tia", "listener").await;
    let ticket = ws_ticket(&server.tls, &server.base, &token).await.unwrap();
    let session =
        Signaling::connect(&server.tls, &server.base, None, Some(&ticket)).await.expect("a fresh ticket works");
    assert_eq!(session.welcome.uid, "tia");
    let again =
        Signaling::connect(&server.tls, &server.base, None, Some(&ticket)).await.err().expect("a ticket works once");
    assert!(again.to_string().contains("401"), "{again}");
    // The body says so in the protocol's words, with the auth layer's reason beside them.
    match &again {
        ClientError::UpgradeRefused { status: 401, refusal: Some(refusal) } => {
            assert_eq!(refusal.error.code, ErrorCode::Unauthorized);
            assert_eq!(refusal.error.auth_code.as_deref(), Some("invalid-ticket"));
        }
        other => panic!("a refused upgrade, with its body: {other:?}"),
    }
    let late = ws_ticket(&server.tls, &server.base, &token).await.unwrap();
    clock.advance(Duration::from_secs(31));
    let refused = Signaling::connect(&server.tls, &server.base, None, Some(&late)).await.err().expect("tickets expire");
    assert!(refused.to_string().contains("401"), "{refused}");
    let refused = Signaling::connect(&server.tls, &server.base, None, Some("made-up")).await.err().unwrap();
    assert!(refused.to_string().contains("401"), "{refused}");
    server.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_warned_then_closed_when_its_token_expires_without_reauth() {
    let clock = ManualClock::at_secs(unix_now());
    let issuer = Arc::new(DevIssuer::generate(3600, clock.shared()).unwrap());
    let dir = temp_dir("auth-expiry");
    let mut config = encore::config::ServerConfig::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.server.data_dir = dir.join("data");
    config.media.bind_ip = "127.0.0.1".parse().unwrap();
    config.metrics.listen = None;
    let options = encore::server::StartOptions { clock: Some(clock.shared()), dev_issuer: Some(issuer) };
    let server = encore::server::start(config, options).await.unwrap();
    let tls = ClientTls::trusting(&dir.join("data/tls/cert.pem")).unwrap();
    let token = dev_token(&tls, &server.url, "eve", "listener").await.unwrap();
    let session = Signaling::connect(&tls, &server.url, Some(&token), None).await.unwrap();
    let deadline = session.welcome.session_expires_at;
    assert_eq!(deadline, clock.now_s() + 3600 + 60, "the token's expiry plus the grace");

    // Ten seconds before the deadline the session is warned; a reauth extends it.
    clock.advance(Duration::from_secs(3650));
    let warned = session.notification(Duration::from_secs(5)).await.expect("a warning");
    assert!(matches!(warned, Notice::SessionExpiring { .. }), "{warned:?}");
    let fresh = dev_token(&tls, &server.url, "eve", "listener").await.unwrap();
    let extended: Reauthed = session.request(Request::Reauth { token: fresh }).await.unwrap();
    assert!(extended.session_expires_at > deadline);
    // Another uid's token is no reauth.
    let other = dev_token(&tls, &server.url, "mallory", "listener").await.unwrap();
    let refused = session.request::<Reauthed>(Request::Reauth { token: other }).await.unwrap_err();
    assert_eq!(refused.refusal(), Some(ErrorCode::Unauthorized), "{refused}");
    clock.advance(Duration::from_secs(3000));
    session.request::<Done>(Request::Ping).await.expect("still open after the reauth");

    // Past the new deadline without another reauth: closed with 4001.
    clock.advance(Duration::from_secs(700));
    let mut closed = None;
    for _ in 0..50 {
        if let Some(code) = session.close_code() {
            closed = Some(code);
            break;
        }
        let _ = session.notification(Duration::from_millis(200)).await;
    }
    assert_eq!(closed.as_ref().map(|(code, _)| *code), Some(4001), "{closed:?}");
    server.shutdown().await;
}

/// The whole life of a real `encore serve` process at trace level, in JSON, then its logs are
/// searched for the credentials it handled, and for the structured events of its life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_logs_of_a_whole_server_run_contain_no_token() {
    let dir = temp_dir("auth-logs");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log_path = dir.join("server.log");
    let record = dir.join("record");
    let mut child = Command::new(env!("CARGO_BIN_EXE_encore"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir.join("data"))
        .arg("--record")
        .arg(&record)
        // The client's tasks keep its WebSocket open after it is dropped: a short drain.
        .args(["--metrics-listen", "127.0.0.1:0", "--log-format", "json", "--drain-timeout-s", "1"])
        .env("ENCORE_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let base = format!("https://127.0.0.1:{port}");
    let cert = dir.join("data/tls/cert.pem");
    let mut ready = false;
    for _ in 0..300 {
        if cert.exists()
            && let Ok(tls) = ClientTls::trusting(&cert)
            && get(&tls, &format!("{base}/healthz"), None).await.is_ok_and(|(status, _)| status == 200)
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ready, "the server did not come up");
    let tls = ClientTls::trusting(&cert).unwrap();
    let token = dev_token(&tls, &base, "tom", "speaker").await.unwrap();
    let ticket = ws_ticket(&tls, &base, &token).await.unwrap();
    let session = Arc::new(Signaling::connect(&tls, &base, None, Some(&ticket)).await.unwrap());
    session.join("logs", "tom").await.unwrap();
    session.request::<Reauthed>(Request::Reauth { token: token.clone() }).await.unwrap();
    let publisher = Publisher::start(&session, false, 3).await.unwrap();
    publisher.close().await;
    let bogus = format!("{}x", &token[..token.len() - 1]);
    assert!(Signaling::connect(&tls, &base, Some(&bogus), None).await.is_err());
    let (status, _) = get(&tls, &format!("{base}/api/rooms"), Some(&bogus)).await.unwrap();
    assert_eq!(status, 401);
    drop(session);

    // SIGTERM: a drain (1 s), then a graceful stop, with the recording flushed.
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "the server did not stop cleanly: {status:?}");
    let mut log = String::new();
    std::fs::File::open(&log_path).unwrap().read_to_string(&mut log).unwrap();
    assert!(log.contains("session opened"), "the log is too quiet to mean anything");
    let mut messages = std::collections::BTreeSet::new();
    for line in log.lines() {
        let event: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if let Some(message) = event["message"].as_str() {
            messages.insert(message.to_owned());
        }
    }
    for event in
        ["room created", "peer joined", "transport connected", "peer left", "room closed", "draining", "drain over"]
    {
        assert!(messages.contains(event), "no {event:?} event in the log; events: {messages:?}");
    }
    for (what, secret) in [("token", token.as_str()), ("ticket", ticket.as_str()), ("bogus token", bogus.as_str())] {
        assert!(!log.contains(secret), "the log holds a {what}");
        // Nor a recognisable part of it (a JWT's signature, the ticket's middle).
        let part = &secret[secret.len() / 2..secret.len() / 2 + 16];
        assert!(!log.contains(part), "the log holds part of a {what}");
    }
    let scenario = std::fs::read_dir(&record)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".scenario.jsonl"))
        .expect("a recording");
    let text = std::fs::read_to_string(&scenario).unwrap();
    assert!(text.lines().count() > 2, "the recording was flushed at shutdown");
    let (_, mut reader) = encore::scenario::ScenarioReader::open(&scenario).unwrap();
    while let Some(event) = reader.next_event() {
        event.expect("every recorded line reads back");
    }
}

/// A restart keeps the dev signing key (in the data folder, like the certificate): tokens minted
/// before it open sessions after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_tokens_outlive_a_restart_of_the_server() {
    let dir = temp_dir("auth-restart");
    let start = || {
        let mut config = encore::config::ServerConfig::default();
        config.server.listen = "127.0.0.1:0".parse().unwrap();
        config.server.data_dir = dir.join("data");
        config.media.bind_ip = "127.0.0.1".parse().unwrap();
        config.metrics.listen = None;
        encore::server::start(config, encore::server::StartOptions::default())
    };
    let first = start().await.unwrap();
    let tls = ClientTls::trusting(&dir.join("data/tls/cert.pem")).unwrap();
    let token = dev_token(&tls, &first.url, "ray", "speaker").await.unwrap();
    first.shutdown().await;
    let key = dir.join("data").join(encore::auth::DEV_KEY_FILE);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the dev signing key is for its owner's eyes only: {mode:o}");
    }
    let second = start().await.unwrap();
    let session = Signaling::connect(&tls, &second.url, Some(&token), None).await.expect("the old token still works");
    assert_eq!(session.welcome.uid, "ray");
    second.shutdown().await;
}
