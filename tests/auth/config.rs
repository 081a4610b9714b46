//! `[auth]` config: defaults, validation errors that name the key, env overlay, and the refusal to
//! mix dev with firebase.

use encore::auth::{AuthConfig, AuthConfigError, AuthMode, AuthOptions, AuthSetupError, AuthState, KeysFormat, Role};

fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
    move |name| vars.iter().find(|(n, _)| *n == name).map(|(_, v)| (*v).to_owned())
}

fn key_of(result: Result<(), AuthConfigError>) -> &'static str {
    result.expect_err("config should be refused").key
}

#[test]
fn defaults_are_dev_with_30s_skew_and_listener() {
    let config: AuthConfig = toml::from_str("").expect("empty section");
    assert_eq!(config, AuthConfig::default());
    assert_eq!(config.mode, AuthMode::Dev);
    assert_eq!(config.skew_s, 30);
    assert_eq!(config.default_role, Role::Listener);
    assert_eq!(config.keys_format, KeysFormat::X509);
    assert_eq!(config.effective_project_id(), "encore-dev");
    config.validate().expect("defaults are valid");
}

#[test]
fn parses_a_firebase_section() {
    let config: AuthConfig = toml::from_str(
        r#"
        mode = "firebase"
        project_id = "my-project"
        tenant = "tenant-1"
        keys_url = "https://keys.example.com/x509"
        keys_format = "jwk"
        skew_s = 300
        default_role = "speaker"
        session_grace_s = 120
        web_api_key = "AIzaPublic"
        "#,
    )
    .expect("toml");
    config.validate().expect("valid");
    assert_eq!(config.mode, AuthMode::Firebase);
    assert_eq!(config.keys_format, KeysFormat::Jwk);
    assert_eq!(config.default_role, Role::Speaker);
    assert_eq!(config.effective_keys_url(), "https://keys.example.com/x509");
}

#[test]
fn unknown_keys_are_refused() {
    let error = toml::from_str::<AuthConfig>("mode = \"firebase\"\nprojectid = \"x\"").expect_err("unknown key");
    assert!(error.to_string().contains("projectid"), "{error}");
    let error = toml::from_str::<AuthConfig>("mode = \"prod\"").expect_err("unknown mode");
    assert!(error.to_string().contains("prod"), "{error}");
}

#[test]
fn skew_is_at_most_300_seconds() {
    let mut config = AuthConfig::firebase("my-project");
    config.skew_s = 300;
    config.validate().expect("300 is the maximum");
    config.skew_s = 301;
    let error = config.validate().expect_err("301");
    assert_eq!(error.key, "auth.skew_s");
    assert!(error.to_string().starts_with("auth.skew_s: "), "{error}");
}

#[test]
fn firebase_needs_a_project_id() {
    let config = AuthConfig { mode: AuthMode::Firebase, ..Default::default() };
    assert_eq!(key_of(config.validate()), "auth.project_id");
    let config = AuthConfig { mode: AuthMode::FirebaseEmulator, ..Default::default() };
    assert_eq!(key_of(config.validate()), "auth.project_id");
    let config = AuthConfig::firebase("My Project/evil");
    assert_eq!(key_of(config.validate()), "auth.project_id");
}

#[test]
fn dev_and_firebase_cannot_be_enabled_together() {
    let mut config = AuthConfig { project_id: Some("my-project".into()), ..Default::default() };
    let error = config.validate().expect_err("dev + project");
    assert_eq!(error.key, "auth.project_id");
    assert!(error.message.contains("dev and firebase cannot be enabled together"), "{error}");
    config.project_id = Some("encore-dev".into());
    config.validate().expect("dev's own project is fine");
    for (key, config) in [
        ("auth.keys_url", AuthConfig { keys_url: Some("https://keys.example.com".into()), ..Default::default() }),
        ("auth.tenant", AuthConfig { tenant: Some("t".into()), ..Default::default() }),
        ("auth.web_api_key", AuthConfig { web_api_key: Some("k".into()), ..Default::default() }),
    ] {
        assert_eq!(key_of(config.validate()), key);
    }
}

#[test]
fn env_project_without_env_mode_is_refused() {
    // A production deployment that set its project but forgot the mode must not run in dev.
    let mut config = AuthConfig::default();
    config.apply_env(env(&[("ENCORE_FIREBASE_PROJECT_ID", "my-project")])).expect("env");
    assert_eq!(key_of(config.validate()), "auth.project_id");
}

#[test]
fn env_overlays_the_file() {
    let mut config = AuthConfig::default();
    config
        .apply_env(env(&[
            ("ENCORE_AUTH_MODE", "firebase"),
            ("ENCORE_FIREBASE_PROJECT_ID", "my-project"),
            ("ENCORE_FIREBASE_KEYS_URL", "http://127.0.0.1:8080/keys"),
            ("ENCORE_FIREBASE_TENANT", "tenant-1"),
        ]))
        .expect("env");
    config.validate().expect("valid");
    assert_eq!(config.mode, AuthMode::Firebase);
    assert_eq!(config.effective_project_id(), "my-project");
    assert_eq!(config.effective_keys_url(), "http://127.0.0.1:8080/keys");
    assert_eq!(config.tenant.as_deref(), Some("tenant-1"));

    let mut config = AuthConfig::default();
    let error = config.apply_env(env(&[("ENCORE_AUTH_MODE", "production")])).expect_err("bad mode");
    assert_eq!(error.key, "auth.mode");
}

#[test]
fn emulator_host_variable_alone_never_enables_the_emulator() {
    let mut config = AuthConfig::firebase("my-project");
    config.apply_env(env(&[("FIREBASE_AUTH_EMULATOR_HOST", "127.0.0.1:9099")])).expect("env");
    assert_eq!(config.mode, AuthMode::Firebase);
    assert_eq!(config.emulator_host, None);
    assert_eq!(config.effective_emulator_host(), None);

    let mut config = AuthConfig::emulator("demo-encore");
    config.apply_env(env(&[("FIREBASE_AUTH_EMULATOR_HOST", "127.0.0.1:9199")])).expect("env");
    config.validate().expect("valid");
    assert_eq!(config.effective_emulator_host(), Some("127.0.0.1:9199"));
}

#[test]
fn keys_url_must_be_https_except_on_loopback() {
    for (url, ok) in [
        ("https://www.googleapis.com/robot/v1/metadata/x509/securetoken@system.gserviceaccount.com", true),
        ("http://127.0.0.1:9000/keys", true),
        ("http://localhost:9000/keys", true),
        ("http://[::1]:9000/keys", true),
        ("http://keys.example.com/keys", false),
        ("ftp://keys.example.com/keys", false),
        ("not a url", false),
    ] {
        let mut config = AuthConfig::firebase("my-project");
        config.keys_url = Some(url.into());
        match config.validate() {
            Ok(()) => assert!(ok, "{url} accepted"),
            Err(error) => {
                assert!(!ok, "{url} refused: {error}");
                assert_eq!(error.key, "auth.keys_url");
            }
        }
    }
    let mut config = AuthConfig::emulator("demo-encore");
    config.keys_url = Some("https://keys.example.com".into());
    assert_eq!(key_of(config.validate()), "auth.keys_url");
}

#[test]
fn auth_state_refuses_invalid_config_and_dev_without_its_own_address() {
    let config = AuthConfig { skew_s: 1000, ..AuthConfig::firebase("my-project") };
    match AuthState::new(config, AuthOptions::default()) {
        Err(AuthSetupError::Config(error)) => assert_eq!(error.key, "auth.skew_s"),
        other => panic!("expected a config error, got {other:?}"),
    }
    match AuthState::new(AuthConfig::default(), AuthOptions::default()) {
        Err(AuthSetupError::MissingSelfUrl) => {}
        other => panic!("expected MissingSelfUrl, got {other:?}"),
    }
}

#[test]
fn the_service_account_file_comes_from_the_config_then_encore_then_google_variables() {
    use std::path::PathBuf;
    let file: AuthConfig = toml::from_str(
        "mode = \"firebase\"\nproject_id = \"my-project\"\nservice_account_file = \"/etc/encore/sa.json\"",
    )
    .expect("toml");
    file.validate().expect("valid");
    assert_eq!(file.service_account_file, Some(PathBuf::from("/etc/encore/sa.json")));

    // ENCORE_SERVICE_ACCOUNT_FILE overrides the file, as every ENCORE_ variable does.
    let mut config = file.clone();
    let vars = [("ENCORE_SERVICE_ACCOUNT_FILE", "/run/secrets/sa.json"), ("GOOGLE_APPLICATION_CREDENTIALS", "/g.json")];
    config.apply_env(env(&vars)).expect("env");
    assert_eq!(config.service_account_file, Some(PathBuf::from("/run/secrets/sa.json")));
    // GOOGLE_APPLICATION_CREDENTIALS only fills a gap: the file's setting wins over it...
    let mut config = file.clone();
    config.apply_env(env(&[("GOOGLE_APPLICATION_CREDENTIALS", "/g.json")])).expect("env");
    assert_eq!(config.service_account_file, Some(PathBuf::from("/etc/encore/sa.json")));
    // ...and it is used when nothing else is set.
    let mut config = AuthConfig::firebase("my-project");
    config.apply_env(env(&[("GOOGLE_APPLICATION_CREDENTIALS", "/g.json")])).expect("env");
    assert_eq!(config.service_account_file, Some(PathBuf::from("/g.json")));

    // Outside firebase mode a developer's Google credentials change nothing (and stop nothing).
    for mut config in [AuthConfig::default(), AuthConfig::emulator("demo-encore")] {
        config.apply_env(env(&[("GOOGLE_APPLICATION_CREDENTIALS", "/g.json")])).expect("env");
        assert_eq!(config.service_account_file, None);
        config.validate().expect("still valid");
    }
    // Set explicitly there, it is refused, naming the key.
    let config = AuthConfig { service_account_file: Some("/sa.json".into()), ..Default::default() };
    assert_eq!(key_of(config.validate()), "auth.service_account_file");
    let config = AuthConfig { service_account_file: Some("/sa.json".into()), ..AuthConfig::emulator("demo-encore") };
    assert_eq!(key_of(config.validate()), "auth.service_account_file");
}
