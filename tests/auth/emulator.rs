//! Tokens from the real Firebase Auth Emulator, verified by the real verifier in
//! firebase-emulator mode. Needs the emulator: `scripts/emulator-e2e.sh` signs a user up and in
//! (a token without a role claim, `ENCORE_EMULATOR_LISTENER_TOKEN`), sets the claim
//! `role: speaker` with `encore admin set-role`, signs in again and runs this test with the new
//! token in `ENCORE_EMULATOR_ID_TOKEN` (environment variables, so tokens appear in no command line
//! or log). The test verifies both, then on a real server in firebase-emulator mode the first is
//! refused publishing and the second joins a room as a speaker and publishes.

use encore::auth::{AuthConfig, AuthError, AuthOptions, AuthState, Role};

use encore::protocol::{Done, ErrorCode, Request};

#[tokio::test]
#[ignore = "needs the Firebase Auth Emulator; run by scripts/emulator-e2e.sh"]
async fn emulator_tokens_carry_the_role_set_by_encore_admin() {
    let token =
        std::env::var("ENCORE_EMULATOR_ID_TOKEN").expect("ENCORE_EMULATOR_ID_TOKEN (run scripts/emulator-e2e.sh)");
    let before = std::env::var("ENCORE_EMULATOR_LISTENER_TOKEN").expect("ENCORE_EMULATOR_LISTENER_TOKEN");
    let project = std::env::var("ENCORE_EMULATOR_PROJECT").unwrap_or_else(|_| "demo-encore".into());
    let uid = std::env::var("ENCORE_EMULATOR_UID").expect("ENCORE_EMULATOR_UID");

    // Real clock: the emulator stamped the token with real times.
    let emulator = AuthState::new(AuthConfig::emulator(&project), AuthOptions::default()).expect("emulator auth");
    let user = emulator.verify(&token).await.unwrap_or_else(|e| panic!("emulator token refused: {e}"));
    assert_eq!(user.uid, uid);
    assert_eq!(user.roles, vec![Role::Speaker], "custom claim role: speaker, set by encore admin");
    assert_eq!(user.sign_in_provider.as_deref(), Some("password"));
    assert!(user.may_publish());
    let listener = emulator.verify(&before).await.unwrap_or_else(|e| panic!("first emulator token refused: {e}"));
    assert_eq!(listener.uid, uid);
    assert_eq!(listener.roles, vec![Role::Listener], "no role claim yet: the default role");

    // The same unsigned token is worthless outside emulator mode, before any key is fetched.
    let mut config = AuthConfig::firebase(&project);
    config.keys_url = Some("http://127.0.0.1:9/keys".into());
    let firebase = AuthState::new(config, AuthOptions::default()).expect("firebase auth");
    assert_eq!(firebase.verify(&token).await, Err(AuthError::UnsignedToken));

    // A real server in firebase-emulator mode: the token joins a room and publishes.
    let dir = crate::server::support::temp_dir("emulator");
    let mut config = encore::config::ServerConfig::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.server.data_dir = dir.join("data");
    config.media.bind_ip = "127.0.0.1".parse().unwrap();
    config.metrics.listen = None;
    config.auth = AuthConfig::emulator(&project);
    let server =
        encore::server::start(config, encore::server::StartOptions::default()).await.expect("the server starts");
    let tls = encore::client::ClientTls::trusting(&dir.join("data/tls/cert.pem")).unwrap();
    // The token from before the claim was set: a listener, refused publishing.
    let early = encore::client::Signaling::connect(&tls, &server.url, Some(&before), None).await.expect("a session");
    assert_eq!(early.welcome.roles, vec![Role::Listener]);
    early.join("emulator", "early").await.expect("join");
    let refused = early.request::<Done>(Request::Publish { offer: "v=0".into() }).await.unwrap_err();
    assert_eq!(refused.refusal(), Some(ErrorCode::Forbidden), "{refused}");
    // The token from after: a speaker.
    let session = std::sync::Arc::new(
        encore::client::Signaling::connect(&tls, &server.url, Some(&token), None)
            .await
            .expect("the emulator token opens a session"),
    );
    assert_eq!(session.welcome.uid, uid.as_str());
    assert_eq!(session.welcome.roles, vec![Role::Speaker]);
    let joined = session.join("emulator", "speaker").await.expect("join");
    assert_eq!(joined.roles, vec![Role::Speaker]);
    let publisher = encore::client::Publisher::start(&session, false, 9).await.expect("a speaker publishes");
    publisher.close().await;
    server.shutdown().await;
}
