//! `[auth]` configuration: mode, project, keys, times. Validated up front, with errors that name the
//! offending key, so a misconfigured server refuses to start instead of refusing every user.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use encore_systems::components::Role;
use serde::{Deserialize, Serialize};

use super::dev::DEV_PROJECT_ID;
use super::keys::{GOOGLE_JWK_URL, GOOGLE_X509_URL};

/// Largest clock skew we tolerate between us and the token issuer.
pub const MAX_SKEW_S: u64 = 300;

/// Where tokens come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMode {
    /// The server issues its own Firebase-shaped RS256 tokens for project `encore-dev`.
    #[default]
    Dev,
    /// Real Firebase ID tokens, verified against Google's public keys.
    Firebase,
    /// The Firebase Auth Emulator's unsigned tokens. Never chosen implicitly.
    FirebaseEmulator,
}

impl AuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::Dev => "dev",
            AuthMode::Firebase => "firebase",
            AuthMode::FirebaseEmulator => "firebase-emulator",
        }
    }
}

impl fmt::Display for AuthMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AuthMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "dev" => Ok(AuthMode::Dev),
            "firebase" => Ok(AuthMode::Firebase),
            "firebase-emulator" => Ok(AuthMode::FirebaseEmulator),
            other => Err(format!("unknown auth mode {other:?} (expected dev, firebase or firebase-emulator)")),
        }
    }
}

/// The shape of the public-key document at `keys_url`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeysFormat {
    /// `{"<kid>": "-----BEGIN CERTIFICATE-----..."}`, Google's default endpoint.
    #[default]
    X509,
    /// `{"keys": [{"kty":"RSA","kid",...,"n","e"}]}`.
    Jwk,
}

/// The `[auth]` section of the server config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `dev` (default), `firebase` or `firebase-emulator`. Env: `ENCORE_AUTH_MODE`.
    #[serde(default)]
    pub mode: AuthMode,
    /// Firebase project id; required in `firebase` and `firebase-emulator` modes, `encore-dev` (or
    /// absent) in `dev`. Env: `ENCORE_FIREBASE_PROJECT_ID`.
    #[serde(default)]
    pub project_id: Option<String>,
    /// The one Identity Platform tenant accepted; absent means only non-tenant users. Env:
    /// `ENCORE_FIREBASE_TENANT`.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Where the public keys are fetched (firebase mode); Google's endpoint when absent. Env:
    /// `ENCORE_FIREBASE_KEYS_URL`.
    #[serde(default)]
    pub keys_url: Option<String>,
    /// `x509` (default) or `jwk`.
    #[serde(default)]
    pub keys_format: KeysFormat,
    /// Tolerated clock skew in seconds (default 30, at most 300).
    #[serde(default = "default_skew_s")]
    pub skew_s: u64,
    /// Role given to a token without a recognised `role`/`roles` claim (default listener).
    #[serde(default = "default_role")]
    pub default_role: Role,
    /// How long a signaling session may outlive its token without a `reauth` (default 60 s).
    #[serde(default = "default_session_grace_s")]
    pub session_grace_s: u64,
    /// How long stale keys stay usable when refreshing them fails (default 3600 s).
    #[serde(default = "default_keys_grace_s")]
    pub keys_grace_s: u64,
    /// Public web API key handed to the page by `GET /api/client-config`. Env: `ENCORE_FIREBASE_API_KEY`.
    #[serde(default)]
    pub web_api_key: Option<String>,
    /// `host:port` of the Auth Emulator for the page (firebase-emulator mode only; default
    /// 127.0.0.1:9099). Env: `FIREBASE_AUTH_EMULATOR_HOST`, read only once the mode is explicitly
    /// firebase-emulator.
    #[serde(default)]
    pub emulator_host: Option<String>,
    /// Lifetime of tokens minted by `POST /dev/token` (dev mode; default 3600 s like Firebase's).
    #[serde(default = "default_dev_token_ttl_s")]
    pub dev_token_ttl_s: u64,
    /// A Google service account key file (JSON), used only to manage roles (`encore admin`,
    /// `PUT /api/users/{uid}/role`) in firebase mode. Env: `ENCORE_SERVICE_ACCOUNT_FILE`, else
    /// `GOOGLE_APPLICATION_CREDENTIALS` (firebase mode only, and only when this key is unset).
    #[serde(default)]
    pub service_account_file: Option<PathBuf>,
}

fn default_skew_s() -> u64 {
    30
}
fn default_role() -> Role {
    Role::Listener
}
fn default_session_grace_s() -> u64 {
    60
}
fn default_keys_grace_s() -> u64 {
    3600
}
fn default_dev_token_ttl_s() -> u64 {
    3600
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::Dev,
            project_id: None,
            tenant: None,
            keys_url: None,
            keys_format: KeysFormat::X509,
            skew_s: default_skew_s(),
            default_role: default_role(),
            session_grace_s: default_session_grace_s(),
            keys_grace_s: default_keys_grace_s(),
            web_api_key: None,
            emulator_host: None,
            dev_token_ttl_s: default_dev_token_ttl_s(),
            service_account_file: None,
        }
    }
}

/// A configuration error, naming the key at fault (`auth.skew_s: ...`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct AuthConfigError {
    pub key: &'static str,
    pub message: String,
}

fn err(key: &'static str, message: impl Into<String>) -> AuthConfigError {
    AuthConfigError { key, message: message.into() }
}

/// Default emulator address (the one `firebase emulators:start` uses).
pub const DEFAULT_EMULATOR_HOST: &str = "127.0.0.1:9099";

impl AuthConfig {
    /// A `firebase` config for `project_id` with every other key at its default.
    pub fn firebase(project_id: &str) -> Self {
        AuthConfig { mode: AuthMode::Firebase, project_id: Some(project_id.to_owned()), ..Default::default() }
    }

    /// A `firebase-emulator` config for `project_id`.
    pub fn emulator(project_id: &str) -> Self {
        AuthConfig { mode: AuthMode::FirebaseEmulator, project_id: Some(project_id.to_owned()), ..Default::default() }
    }

    /// Overlay the environment (`ENCORE_AUTH_MODE`, `ENCORE_FIREBASE_PROJECT_ID`,
    /// `ENCORE_FIREBASE_KEYS_URL`, `ENCORE_FIREBASE_TENANT`, `ENCORE_FIREBASE_API_KEY`,
    /// `ENCORE_SERVICE_ACCOUNT_FILE`, `FIREBASE_AUTH_EMULATOR_HOST` only when the mode is already
    /// firebase-emulator, and `GOOGLE_APPLICATION_CREDENTIALS` only in firebase mode with no
    /// service account file set otherwise). `env` is a lookup so tests need not touch the process
    /// environment. Call [`AuthConfig::validate`] after.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), AuthConfigError> {
        if let Some(mode) = env("ENCORE_AUTH_MODE") {
            self.mode = mode.parse().map_err(|m| err("auth.mode", format!("from ENCORE_AUTH_MODE: {m}")))?;
        }
        if let Some(project) = env("ENCORE_FIREBASE_PROJECT_ID") {
            self.project_id = Some(project);
        }
        if let Some(url) = env("ENCORE_FIREBASE_KEYS_URL") {
            self.keys_url = Some(url);
        }
        if let Some(tenant) = env("ENCORE_FIREBASE_TENANT") {
            self.tenant = Some(tenant);
        }
        if let Some(key) = env("ENCORE_FIREBASE_API_KEY") {
            self.web_api_key = Some(key);
        }
        if let Some(path) = env("ENCORE_SERVICE_ACCOUNT_FILE") {
            self.service_account_file = Some(PathBuf::from(path));
        } else if let Some(path) = env("GOOGLE_APPLICATION_CREDENTIALS")
            && self.mode == AuthMode::Firebase
            && self.service_account_file.is_none()
        {
            // The Google-wide convention comes last: a setting made for Encore wins over one made
            // for every Google client on the machine. Outside firebase mode it is ignored, so a
            // developer's own credentials never stop a dev or emulator server from starting.
            self.service_account_file = Some(PathBuf::from(path));
        }
        if let Some(host) = env("FIREBASE_AUTH_EMULATOR_HOST") {
            if self.mode == AuthMode::FirebaseEmulator {
                self.emulator_host.get_or_insert(host);
            } else {
                // The Admin SDKs switch to unsigned tokens on this variable alone; we never do.
                tracing::warn!(
                    mode = %self.mode,
                    "FIREBASE_AUTH_EMULATOR_HOST is set but ignored: emulator tokens are accepted only with auth.mode = \"firebase-emulator\""
                );
            }
        }
        Ok(())
    }

    /// Check every key, and the combinations. The first problem found is returned.
    pub fn validate(&self) -> Result<(), AuthConfigError> {
        if self.skew_s > MAX_SKEW_S {
            return Err(err("auth.skew_s", format!("must be at most {MAX_SKEW_S} seconds, got {}", self.skew_s)));
        }
        if self.session_grace_s > 86_400 {
            return Err(err(
                "auth.session_grace_s",
                format!("must be at most 86400 seconds, got {}", self.session_grace_s),
            ));
        }
        if self.keys_grace_s > 86_400 {
            return Err(err("auth.keys_grace_s", format!("must be at most 86400 seconds, got {}", self.keys_grace_s)));
        }
        if let Some(tenant) = &self.tenant
            && (tenant.is_empty() || tenant.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(err("auth.tenant", "must be a non-empty tenant id without spaces"));
        }
        match self.mode {
            AuthMode::Dev => {
                // Dev mode mints tokens for anyone who asks; combining it with real Firebase
                // settings would most likely be a production server that forgot to set its mode.
                let conflict = [
                    ("auth.project_id", self.project_id.as_deref().is_some_and(|p| p != DEV_PROJECT_ID)),
                    ("auth.tenant", self.tenant.is_some()),
                    ("auth.keys_url", self.keys_url.is_some()),
                    ("auth.web_api_key", self.web_api_key.is_some()),
                    ("auth.emulator_host", self.emulator_host.is_some()),
                    ("auth.service_account_file", self.service_account_file.is_some()),
                ];
                if let Some((key, _)) = conflict.iter().find(|(_, set)| *set) {
                    return Err(err(
                        key,
                        "is a firebase setting, but auth.mode is \"dev\" (which issues its own tokens for \
                         project encore-dev); dev and firebase cannot be enabled together: set \
                         auth.mode = \"firebase\" (or ENCORE_AUTH_MODE=firebase), or remove this setting",
                    ));
                }
                if !(60..=86_400).contains(&self.dev_token_ttl_s) {
                    return Err(err(
                        "auth.dev_token_ttl_s",
                        format!("must be 60..=86400 seconds, got {}", self.dev_token_ttl_s),
                    ));
                }
            }
            AuthMode::Firebase | AuthMode::FirebaseEmulator => {
                let project = self.project_id.as_deref().ok_or_else(|| {
                    err(
                        "auth.project_id",
                        format!("is required in {} mode (or set ENCORE_FIREBASE_PROJECT_ID)", self.mode),
                    )
                })?;
                validate_project_id(project)?;
                if self.mode == AuthMode::Firebase {
                    if let Some(url) = &self.keys_url {
                        validate_keys_url(url)?;
                    }
                    if self.emulator_host.is_some() {
                        return Err(err("auth.emulator_host", "is only valid with auth.mode = \"firebase-emulator\""));
                    }
                } else if self.keys_url.is_some() {
                    return Err(err(
                        "auth.keys_url",
                        "is not used in firebase-emulator mode (emulator tokens are unsigned)",
                    ));
                } else if self.service_account_file.is_some() {
                    return Err(err(
                        "auth.service_account_file",
                        "is not used in firebase-emulator mode (the emulator takes its `Bearer owner` admin token)",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The project tokens must be issued for.
    pub fn effective_project_id(&self) -> &str {
        match self.mode {
            AuthMode::Dev => DEV_PROJECT_ID,
            _ => self.project_id.as_deref().unwrap_or_default(),
        }
    }

    /// The keys URL used in firebase mode.
    pub fn effective_keys_url(&self) -> &str {
        match (&self.keys_url, self.keys_format) {
            (Some(url), _) => url,
            (None, KeysFormat::X509) => GOOGLE_X509_URL,
            (None, KeysFormat::Jwk) => GOOGLE_JWK_URL,
        }
    }

    /// The emulator host the page should talk to (firebase-emulator mode).
    pub fn effective_emulator_host(&self) -> Option<&str> {
        match self.mode {
            AuthMode::FirebaseEmulator => Some(self.emulator_host.as_deref().unwrap_or(DEFAULT_EMULATOR_HOST)),
            _ => None,
        }
    }
}

fn validate_project_id(project: &str) -> Result<(), AuthConfigError> {
    // The project id is spliced into the expected issuer URL; keep it to what GCP allows.
    let ok = !project.is_empty()
        && project.len() <= 64
        && project.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(err(
            "auth.project_id",
            format!("{project:?} is not a Firebase project id (lowercase letters, digits, '-')"),
        ))
    }
}

/// Keys fetched over plain HTTP could be swapped by anyone on the path, which would let them mint
/// tokens; plain http is therefore allowed only to a loopback host (tests, a local mirror).
pub(crate) fn validate_keys_url(url: &str) -> Result<(), AuthConfigError> {
    validate_https_url("auth.keys_url", url)
}

/// An `https://` URL, or plain `http://` to a loopback host only. Used for every URL auth sends
/// credentials to or trusts answers from (keys, the service account's token endpoint).
pub(crate) fn validate_https_url(key: &'static str, url: &str) -> Result<(), AuthConfigError> {
    let uri: axum::http::Uri = url.parse().map_err(|e| err(key, format!("{url:?} is not a URL: {e}")))?;
    let host = uri.host().ok_or_else(|| err(key, format!("{url:?} has no host")))?;
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if is_loopback_host(host) => Ok(()),
        Some("http") => Err(err(key, format!("{url:?} must use https (plain http only to a loopback host)"))),
        _ => Err(err(key, format!("{url:?} must be an https URL"))),
    }
}

fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}
