//! A token from the real Firebase Auth Emulator, verified by the real verifier in
//! firebase-emulator mode. Needs the emulator: `scripts/emulator-e2e.sh` signs a user up, sets the
//! custom claim `role: speaker`, signs in again and runs this test with the token in
//! `ENCORE_EMULATOR_ID_TOKEN` (an environment variable, so it appears in no command line or log).

use encore::auth::{AuthConfig, AuthError, AuthOptions, AuthState, Role};

#[tokio::test]
#[ignore = "needs the Firebase Auth Emulator; run by scripts/emulator-e2e.sh"]
async fn emulator_token_verifies_as_speaker() {
    let token = std::env::var("ENCORE_EMULATOR_ID_TOKEN").expect("ENCORE_EMULATOR_ID_TOKEN (run scripts/emulator-e2e.sh)");
    let project = std::env::var("ENCORE_EMULATOR_PROJECT").unwrap_or_else(|_| "demo-encore".into());
    let uid = std::env::var("ENCORE_EMULATOR_UID").expect("ENCORE_EMULATOR_UID");

    // Real clock: the emulator stamped the token with real times.
    let emulator = AuthState::new(AuthConfig::emulator(&project), AuthOptions::default()).expect("emulator auth");
    let user = emulator.verify(&token).await.unwrap_or_else(|e| panic!("emulator token refused: {e}"));
    assert_eq!(user.uid, uid);
    assert_eq!(user.roles, vec![Role::Speaker], "custom claim role: speaker");
    assert_eq!(user.sign_in_provider.as_deref(), Some("password"));
    assert!(user.may_publish());

    // The same unsigned token is worthless outside emulator mode, before any key is fetched.
    let mut config = AuthConfig::firebase(&project);
    config.keys_url = Some("http://127.0.0.1:9/keys".into());
    let firebase = AuthState::new(config, AuthOptions::default()).expect("firebase auth");
    assert_eq!(firebase.verify(&token).await, Err(AuthError::UnsignedToken));
}
