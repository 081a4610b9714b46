//! [`AuthState`]: everything the server needs for auth, built once from [`AuthConfig`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, header};
use rustls::pki_types::CertificateDer;
use serde::Serialize;
use tracing::{info, warn};

use super::admin::{AdminError, ClaimsAdmin};
use super::clock::{SharedClock, SystemClock};
use super::config::{AuthConfig, AuthConfigError, AuthMode, KeysFormat};
use super::dev::{DEV_PROJECT_ID, DevIssuer, DevIssuerError, DevRoles};
use super::error::AuthError;
use super::keys::{KeySource, KeySourceError, KeySourceOptions};
use super::ticket::{IssuedTicket, TicketStore};
use super::verify::{AuthUser, Verifier, VerifierSettings};

/// Runtime facts the config file cannot know.
#[derive(Clone)]
pub struct AuthOptions {
    /// The clock for token times, key caching and tickets.
    pub clock: SharedClock,
    /// How this server reaches itself, e.g. `https://127.0.0.1:8443`. Required in dev mode: the
    /// verifier fetches `{self_base_url}/dev/keys` over real HTTP(S), like it fetches Google's.
    pub self_base_url: Option<String>,
    /// Trust anchors added to the webpki roots for key fetches, e.g. the server's own self-signed
    /// certificate so dev mode can fetch `/dev/keys` from itself over HTTPS.
    pub extra_root_certs: Vec<CertificateDer<'static>>,
    /// A dev issuer made in advance (tests reuse one key; RSA generation costs time). `None`
    /// makes a fresh key in dev mode.
    pub dev_issuer: Option<Arc<DevIssuer>>,
    /// Where dev mode keeps the roles admins set (a server: `<data_dir>/dev-roles.json`, shared
    /// with `encore admin`). `None` keeps them in memory.
    pub dev_roles_file: Option<PathBuf>,
    /// Where dev mode keeps its signing key across restarts (none: a new key in memory).
    pub dev_key_file: Option<PathBuf>,
    /// Unredeemed WebSocket tickets one user may hold (0: no limit).
    pub tickets_per_user: usize,
}

impl Default for AuthOptions {
    fn default() -> Self {
        AuthOptions {
            clock: Arc::new(SystemClock),
            self_base_url: None,
            extra_root_certs: Vec::new(),
            dev_issuer: None,
            dev_roles_file: None,
            dev_key_file: None,
            tickets_per_user: crate::config::LimitsSection::default().tickets_per_user,
        }
    }
}

/// Why auth could not be set up. The server should refuse to start.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error(transparent)]
    Config(#[from] AuthConfigError),
    #[error("auth key source: {0}")]
    Keys(#[from] KeySourceError),
    #[error("dev token issuer: {0}")]
    Dev(#[from] DevIssuerError),
    #[error("dev mode needs AuthOptions::self_base_url (the server's own address) to fetch /dev/keys")]
    MissingSelfUrl,
    #[error("role admin: {0}")]
    Admin(#[from] AdminError),
}

/// `GET /api/client-config`: what the web page needs to sign in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientConfig {
    pub mode: AuthMode,
    pub project_id: String,
    /// The public web API key (not a secret; it identifies the project to Identity Toolkit).
    pub api_key: Option<String>,
    pub tenant_id: Option<String>,
    /// `host:port` of the Auth Emulator, in firebase-emulator mode.
    pub emulator_host: Option<String>,
    /// Where dev mode mints tokens, in dev mode.
    pub dev_token_path: Option<String>,
}

struct Inner {
    config: AuthConfig,
    verifier: Verifier,
    tickets: TicketStore,
    dev: Option<Arc<DevIssuer>>,
    dev_roles: Option<Arc<DevRoles>>,
    admin: Option<ClaimsAdmin>,
    clock: SharedClock,
}

/// Shared auth state: the verifier, the ticket store, and in dev mode the issuer. Clone freely.
/// Give it to [`super::router`], and make it reachable from the server's state with
/// `axum::extract::FromRef` so handlers can take an [`AuthUser`] argument.
#[derive(Clone)]
pub struct AuthState {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AuthState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthState")
            .field("mode", &self.inner.config.mode)
            .field("verifier", &self.inner.verifier)
            .finish()
    }
}

impl AuthState {
    /// Validate `config` and build the pieces for its mode. In dev mode this generates an RSA key
    /// unless `options.dev_issuer` brings one (CPU-bound; call at start).
    pub fn new(config: AuthConfig, options: AuthOptions) -> Result<Self, AuthSetupError> {
        config.validate()?;
        let clock = options.clock.clone();
        let settings = VerifierSettings {
            project_id: config.effective_project_id().to_owned(),
            tenant: config.tenant.clone(),
            skew_s: config.skew_s,
            default_role: config.default_role,
        };
        let key_options = |url: String, format: KeysFormat| {
            let mut key_options = KeySourceOptions::new(url, format);
            key_options.stale_grace = Duration::from_secs(config.keys_grace_s);
            key_options.extra_root_certs = options.extra_root_certs.clone();
            key_options
        };

        let (verifier, dev) = match config.mode {
            AuthMode::Dev => {
                let base = options.self_base_url.as_deref().ok_or(AuthSetupError::MissingSelfUrl)?;
                let dev = match options.dev_issuer.clone() {
                    Some(dev) => dev,
                    None => Arc::new(match &options.dev_key_file {
                        Some(path) => DevIssuer::load_or_generate(path, config.dev_token_ttl_s, clock.clone())?,
                        None => DevIssuer::generate(config.dev_token_ttl_s, clock.clone())?,
                    }),
                };
                let url = format!("{}/dev/keys", base.trim_end_matches('/'));
                let keys = Arc::new(KeySource::new(key_options(url.clone(), KeysFormat::X509), clock.clone())?);
                warn!(
                    project = DEV_PROJECT_ID,
                    keys_url = %url,
                    "AUTH IS IN DEV MODE: anyone who can reach POST /dev/token can mint a token for any uid and role. \
                     Never expose this server; set auth.mode = \"firebase\" for real users."
                );
                (Verifier::new(settings, keys, clock.clone()), Some(dev))
            }
            AuthMode::Firebase => {
                let url = config.effective_keys_url().to_owned();
                let keys = Arc::new(KeySource::new(key_options(url.clone(), config.keys_format), clock.clone())?);
                info!(project = %settings.project_id, tenant = ?settings.tenant, keys_url = %url, "auth: verifying Firebase ID tokens");
                (Verifier::new(settings, keys, clock.clone()), None)
            }
            AuthMode::FirebaseEmulator => {
                warn!(
                    project = %settings.project_id,
                    emulator_host = ?config.effective_emulator_host(),
                    "AUTH IS IN FIREBASE-EMULATOR MODE: unsigned (alg none) tokens are accepted. \
                     Never use this with real users."
                );
                (Verifier::emulator(settings, clock.clone()), None)
            }
        };
        let dev_roles = dev.as_ref().map(|_| {
            Arc::new(match &options.dev_roles_file {
                Some(path) => DevRoles::with_file(path),
                None => DevRoles::in_memory(),
            })
        });
        // A service account file is read now: a bad or world-readable one stops the start, not
        // the first promotion.
        let admin = ClaimsAdmin::from_config(&config, dev_roles.clone(), clock.clone())?;
        let tickets = TicketStore::new(clock.clone(), options.tickets_per_user);
        Ok(AuthState { inner: Arc::new(Inner { config, verifier, tickets, dev, dev_roles, admin, clock }) })
    }

    /// The auth clock's time in Unix seconds (sessions expire by it).
    pub fn now_s(&self) -> i64 {
        self.inner.clock.now_s()
    }

    pub fn config(&self) -> &AuthConfig {
        &self.inner.config
    }

    pub fn mode(&self) -> AuthMode {
        self.inner.config.mode
    }

    pub fn verifier(&self) -> &Verifier {
        &self.inner.verifier
    }

    pub fn tickets(&self) -> &TicketStore {
        &self.inner.tickets
    }

    pub fn dev_issuer(&self) -> Option<&Arc<DevIssuer>> {
        self.inner.dev.as_ref()
    }

    /// Dev mode's role table (what `/dev/token` puts in tokens), in dev mode.
    pub fn dev_roles(&self) -> Option<&Arc<DevRoles>> {
        self.inner.dev_roles.as_ref()
    }

    /// The role admin of this mode; [`AdminError::NotConfigured`] in firebase mode without a
    /// service account.
    pub fn admin(&self) -> Result<&ClaimsAdmin, AdminError> {
        self.inner.admin.as_ref().ok_or(AdminError::NotConfigured)
    }

    /// Verify an ID token.
    pub async fn verify(&self, token: &str) -> Result<AuthUser, AuthError> {
        self.inner.verifier.verify(token).await
    }

    /// Verify the `Authorization: Bearer <token>` of a request.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<AuthUser, AuthError> {
        let token = bearer_token(headers).inspect_err(|error| {
            crate::metrics::auth_verification(crate::metrics::Credential::IdToken, Err(error));
        })?;
        self.verify(token).await
    }

    /// Authenticate a WebSocket upgrade: the `ticket` from its URL if there is one (browsers),
    /// otherwise its `Authorization` header (other clients).
    pub async fn authenticate_upgrade(&self, headers: &HeaderMap, ticket: Option<&str>) -> Result<AuthUser, AuthError> {
        match ticket {
            Some(ticket) => self.redeem_ticket(ticket),
            None => self.authenticate(headers).await,
        }
    }

    /// A single-use ticket for `user`, redeemable for [`super::WS_TICKET_TTL`].
    pub fn issue_ticket(&self, user: AuthUser) -> Result<IssuedTicket, AuthError> {
        self.inner.tickets.issue(user)
    }

    /// Redeem a WebSocket ticket (once).
    pub fn redeem_ticket(&self, ticket: &str) -> Result<AuthUser, AuthError> {
        let result = self.inner.tickets.redeem(ticket);
        crate::metrics::auth_verification(crate::metrics::Credential::Ticket, result.as_ref().map(|_| ()));
        result
    }

    /// A `reauth` on a live session: the new token must verify and belong to the same uid.
    pub async fn reauthenticate(&self, current: &AuthUser, token: &str) -> Result<AuthUser, AuthError> {
        let fresh = self.verify(token).await?;
        if fresh.uid != current.uid {
            return Err(AuthError::claim("sub", "reauth token is for a different user than the session"));
        }
        Ok(fresh)
    }

    /// The Unix second after which a session of `user` must be closed unless it re-authenticated:
    /// the token's `exp` plus `auth.session_grace_s`.
    pub fn session_deadline_s(&self, user: &AuthUser) -> i64 {
        let grace = i64::try_from(self.inner.config.session_grace_s).unwrap_or(i64::MAX);
        user.expires_at.saturating_add(grace)
    }

    pub fn client_config(&self) -> ClientConfig {
        let config = &self.inner.config;
        ClientConfig {
            mode: config.mode,
            project_id: config.effective_project_id().to_owned(),
            api_key: config.web_api_key.clone(),
            tenant_id: config.tenant.clone(),
            emulator_host: config.effective_emulator_host().map(str::to_owned),
            dev_token_path: self.inner.dev.as_ref().map(|_| "/dev/token".to_owned()),
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header. The scheme is case-insensitive
/// (RFC 7235); exactly one header, one scheme, one token.
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, AuthError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next().ok_or(AuthError::MissingAuthorization)?;
    if values.next().is_some() {
        return Err(AuthError::BadAuthorization("more than one Authorization header"));
    }
    let text = value.to_str().map_err(|_| AuthError::BadAuthorization("header is not visible ASCII"))?;
    let Some((scheme, token)) = text.split_once(' ') else {
        return Err(AuthError::BadAuthorization("expected a scheme, a space and a token"));
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::BadAuthorization("scheme is not Bearer"));
    }
    let token = token.trim_matches(' ');
    if token.is_empty() {
        return Err(AuthError::BadAuthorization("no token after `Bearer`"));
    }
    if token.contains(char::is_whitespace) {
        return Err(AuthError::BadAuthorization("more than one token after `Bearer`"));
    }
    Ok(token)
}
