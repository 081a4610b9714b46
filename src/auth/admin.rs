//! Managing roles: the `role` custom claim, set and read, the way the Firebase Admin SDK's
//! `setCustomUserClaims` / `getUser` / `listUsers` do, behind one API ([`ClaimsAdmin`]) with three
//! backends chosen by `auth.mode`:
//!
//! - `firebase`: the Identity Toolkit REST API (`accounts:lookup`, `accounts:update`,
//!   `accounts:batchGet`), authenticated with a service account as the Admin SDK is: an RS256
//!   assertion signed with the account's key is exchanged at its `token_uri` for an access token
//!   (the OAuth 2.0 JWT-bearer grant, RFC 7523), which is cached until shortly before it expires
//!   ([`ServiceAccountCredential`]).
//! - `firebase-emulator`: the same REST calls to the Auth Emulator, which takes the fixed admin
//!   token `Bearer owner`.
//! - `dev`: the dev issuer's role table ([`DevRoles`]), which `/dev/token` reads at every mint.
//!
//! Setting a role reads the user's custom claims, replaces `role` (and drops `roles`, the array
//! form, which would otherwise keep granting what the admin just took away), keeps every other
//! claim, refuses a result over Firebase's 1 000-byte limit, and writes the whole object back.
//! Every operation returns what it did ([`RoleChange`]), so a caller learns that uid X is now
//! role Y (e.g. to notify X's live sessions).
//!
//! Secrets: the service account's key, the assertions and the access tokens are never logged,
//! never put in an error, and never leave this module except as a request header (marked
//! sensitive). [`ServiceAccount`] and [`AccessToken`] print redacted.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use encore_systems::components::Role;
use http_body_util::{BodyExt, Full, Limited};
use hyper::http::{Method, Request, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use serde_json::{Map, Value, json};
use tracing::{debug, info, warn};

use super::clock::SharedClock;
use super::config::{AuthConfig, AuthMode, validate_https_url};
use super::dev::{DevIssuerError, DevRoles};
use super::error::clip;
use super::keys::{error_chain, http_client};
use super::verify::{MAX_UID_LEN, claimed_roles};

/// The one OAuth scope asked for. Identity Toolkit's `accounts:lookup`, `accounts:update` and
/// `accounts:batchGet` accept any of `identitytoolkit`, `firebase` or `cloud-platform`; the Admin
/// SDK asks for five (`cloud-platform`, `firebase.database`, `firebase.messaging`,
/// `identitytoolkit`, `userinfo.email`) because it serves every Firebase product. Encore only
/// manages users, so its tokens can do nothing else, whatever the service account's IAM roles.
pub const IDENTITY_TOOLKIT_SCOPE: &str = "https://www.googleapis.com/auth/identitytoolkit";
/// The OAuth 2.0 JWT-bearer grant type (RFC 7523 §2.1).
pub const JWT_BEARER_GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Where the Identity Toolkit API lives.
pub const GOOGLE_IDENTITY_TOOLKIT_URL: &str = "https://identitytoolkit.googleapis.com";
/// Firebase's limit on a user's serialized custom claims.
pub const MAX_CLAIMS_BYTES: usize = 1000;
/// Google refuses assertions that live longer than an hour.
const ASSERTION_LIFETIME_S: i64 = 3600;
/// A cached access token is replaced this long before it expires (or at half its life when that
/// is shorter), so a request never leaves with a token about to die on the way.
const REFRESH_MARGIN_S: i64 = 300;
/// Longest lifetime believed from a token endpoint (Google's are an hour).
const MAX_TOKEN_LIFETIME_S: i64 = 86_400;
/// The Auth Emulator's admin credential: a fixed, public string, not a secret.
const EMULATOR_ADMIN_TOKEN: &str = "owner";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
const MAX_TOKEN_RESPONSE_BYTES: usize = 64 * 1024;
/// A `batchGet` page of 1 000 users is a few hundred KiB.
const MAX_API_RESPONSE_BYTES: usize = 16 << 20;
/// `accounts:batchGet` page size (its maximum).
const PAGE_SIZE: u32 = 1000;
/// A bound on `list_roles`, so a misbehaving server cannot page forever (10 million users).
const MAX_PAGES: usize = 10_000;
/// A service account file larger than this is not a service account file.
const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;

/// Why a role could not be read or set. Messages never hold a key, an assertion or a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    #[error("uid must be 1 to {MAX_UID_LEN} characters without control characters")]
    InvalidUid,

    #[error("{0}")]
    UnknownRole(String),

    #[error("bad request: {0}")]
    BadRequest(String),

    #[error("{0}")]
    Forbidden(String),

    #[error("no user with uid {0:?}")]
    UserNotFound(String),

    #[error(
        "custom claims of {uid:?} would be {bytes} bytes with the new role, over Firebase's \
         {MAX_CLAIMS_BYTES}-byte limit; remove other claims first"
    )]
    ClaimsTooLarge { uid: String, bytes: usize },

    #[error("stored custom claims of {uid:?} are not a JSON object: {reason}")]
    InvalidClaims { uid: String, reason: String },

    #[error(
        "no service account to manage roles with: set auth.service_account_file, \
         ENCORE_SERVICE_ACCOUNT_FILE or GOOGLE_APPLICATION_CREDENTIALS"
    )]
    NotConfigured,

    #[error("service account file {path}: {reason}")]
    CredentialFile { path: String, reason: String },

    #[error(
        "service account file {path} is readable by others (mode {mode:03o}); it holds a private \
         key: run `chmod 600 {path}`"
    )]
    InsecureCredentialFile { path: String, mode: u32 },

    #[error("access token exchange at {token_uri} failed: {reason}")]
    TokenExchange { token_uri: String, reason: String },

    #[error("{operation}: the service account lacks permission ({message}); grant it Firebase Authentication Admin")]
    InsufficientPermission { operation: &'static str, message: String },

    #[error("{operation}: HTTP {status}: {message}")]
    Upstream { operation: &'static str, status: u16, message: String },

    #[error("{operation}: {reason}")]
    Unavailable { operation: &'static str, reason: String },

    #[error("dev mode: {0}")]
    Dev(String),

    #[error("invalid admin setting: {0}")]
    Setting(String),
}

impl AdminError {
    /// A stable, machine-readable code, in the style of the Admin SDK's `auth/...` codes.
    pub fn code(&self) -> &'static str {
        match self {
            AdminError::InvalidUid => "invalid-uid",
            AdminError::UnknownRole(_) => "invalid-role",
            AdminError::BadRequest(_) => "invalid-argument",
            AdminError::Forbidden(_) => "forbidden",
            AdminError::UserNotFound(_) => "user-not-found",
            AdminError::ClaimsTooLarge { .. } => "claims-too-large",
            AdminError::InvalidClaims { .. } => "invalid-claims",
            AdminError::NotConfigured => "admin-not-configured",
            AdminError::CredentialFile { .. } => "invalid-credential",
            AdminError::InsecureCredentialFile { .. } => "insecure-credential-file",
            AdminError::TokenExchange { .. } => "token-exchange-failed",
            AdminError::InsufficientPermission { .. } => "insufficient-permission",
            AdminError::Upstream { .. } => "upstream-error",
            AdminError::Unavailable { .. } => "upstream-unavailable",
            AdminError::Dev(_) => "internal-error",
            AdminError::Setting(_) => "invalid-configuration",
        }
    }

    /// The HTTP status: 4xx for the caller's mistakes, 5xx for ours or Google's.
    pub fn status(&self) -> StatusCode {
        match self {
            AdminError::InvalidUid
            | AdminError::UnknownRole(_)
            | AdminError::BadRequest(_)
            | AdminError::ClaimsTooLarge { .. } => StatusCode::BAD_REQUEST,
            AdminError::Forbidden(_) => StatusCode::FORBIDDEN,
            AdminError::UserNotFound(_) => StatusCode::NOT_FOUND,
            AdminError::NotConfigured | AdminError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            AdminError::InvalidClaims { .. }
            | AdminError::TokenExchange { .. }
            | AdminError::InsufficientPermission { .. }
            | AdminError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            AdminError::CredentialFile { .. }
            | AdminError::InsecureCredentialFile { .. }
            | AdminError::Dev(_)
            | AdminError::Setting(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<DevIssuerError> for AdminError {
    fn from(error: DevIssuerError) -> Self {
        AdminError::Dev(error.to_string())
    }
}

/// `{"error":{"code","message"}}`, never cached.
impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code(), "message": self.to_string() } });
        let mut response = (self.status(), Json(body)).into_response();
        response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if self.status() == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        response
    }
}

/// A role name as an admin typed it: exactly one of the project's role names.
pub fn parse_role(text: &str) -> Result<Role, AdminError> {
    text.parse::<Role>().map_err(AdminError::UnknownRole)
}

/// The uid rules of Firebase (1 to 128 UTF-16 units) and of the dev issuer (no control characters).
fn check_uid(uid: &str) -> Result<(), AdminError> {
    if uid.is_empty() || uid.encode_utf16().count() > MAX_UID_LEN || uid.chars().any(char::is_control) {
        return Err(AdminError::InvalidUid);
    }
    Ok(())
}

/// What [`ClaimsAdmin::set_role`] did: `uid` now has `role`; `previous` is what its claims
/// granted before (empty: no role claim, so the default role applied).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoleChange {
    pub uid: String,
    pub role: Role,
    pub previous: Vec<Role>,
}

/// A user's role claims: `roles` is what the `role`/`roles` claims grant, sorted; empty when
/// they grant nothing (the verifier then applies `auth.default_role`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserRoles {
    pub uid: String,
    pub roles: Vec<Role>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
}

/// The new `customAttributes` for a user whose current ones are `existing`: `role` set, `roles`
/// dropped, everything else kept in its order. Also returns the roles granted before.
fn merge_role_claim(uid: &str, existing: Option<&str>, role: Role) -> Result<(String, Vec<Role>), AdminError> {
    let mut claims: Map<String, Value> = match existing.map(str::trim) {
        None | Some("") => Map::new(),
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => map,
            Ok(_) => return Err(AdminError::InvalidClaims { uid: uid.to_owned(), reason: "not an object".into() }),
            Err(e) => return Err(AdminError::InvalidClaims { uid: uid.to_owned(), reason: e.to_string() }),
        },
    };
    let previous = claimed_roles(&claims, uid);
    claims.remove("roles");
    claims.insert("role".into(), Value::String(role.as_str().to_owned()));
    let text = Value::Object(claims).to_string();
    if text.len() > MAX_CLAIMS_BYTES {
        return Err(AdminError::ClaimsTooLarge { uid: uid.to_owned(), bytes: text.len() });
    }
    Ok((text, previous))
}

/// The roles granted by stored `customAttributes` (unreadable claims grant nothing, as in a token).
fn roles_of_attributes(uid: &str, attributes: Option<&str>) -> Vec<Role> {
    match attributes.map(serde_json::from_str::<Value>) {
        Some(Ok(Value::Object(claims))) => claimed_roles(&claims, uid),
        _ => Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// Service account credentials

/// A Google service account key file: who we are (`client_email`), what signs (`private_key`),
/// where tokens come from (`token_uri`). Prints without its key.
pub struct ServiceAccount {
    client_email: String,
    private_key_id: Option<String>,
    token_uri: String,
    project_id: Option<String>,
    key: EncodingKey,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("client_email", &self.client_email)
            .field("token_uri", &self.token_uri)
            .field("project_id", &self.project_id)
            .field("private_key", &"<redacted>")
            .finish()
    }
}

impl ServiceAccount {
    /// Read a key file. Refused when its permissions let anyone but its owner read it (a private
    /// key must not be), when it is not a service account, or when its key or `token_uri` is
    /// unusable. The file is opened once and its permissions taken from the open file, so what is
    /// checked is what is read.
    pub fn from_file(path: &Path) -> Result<Self, AdminError> {
        use std::io::Read as _;
        let shown = path.display().to_string();
        let file_error = |reason: String| AdminError::CredentialFile { path: shown.clone(), reason };
        let file = std::fs::File::open(path).map_err(|e| file_error(e.to_string()))?;
        let metadata = file.metadata().map_err(|e| file_error(e.to_string()))?;
        if !metadata.is_file() {
            return Err(file_error("not a regular file".into()));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = metadata.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(AdminError::InsecureCredentialFile { path: shown, mode });
            }
        }
        let mut text = String::new();
        file.take(MAX_KEY_FILE_BYTES + 1).read_to_string(&mut text).map_err(|e| file_error(e.to_string()))?;
        if text.len() as u64 > MAX_KEY_FILE_BYTES {
            return Err(file_error(format!("larger than {MAX_KEY_FILE_BYTES} bytes")));
        }
        Self::parse(&text).map_err(file_error)
    }

    /// A key file's JSON, given in full (e.g. from a secret store).
    pub fn from_json(text: &str) -> Result<Self, AdminError> {
        Self::parse(text).map_err(|reason| AdminError::CredentialFile { path: "(JSON given in full)".into(), reason })
    }

    /// Fields are read one by one so that no error message can quote the file (serde's messages
    /// quote the values they choke on, and one of them is the key).
    fn parse(text: &str) -> Result<Self, String> {
        let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(text) else {
            return Err("not a JSON object (expected a service account key file from the Google Cloud console)".into());
        };
        let string = |name: &str| -> Result<Option<String>, String> {
            match fields.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(text)) if !text.is_empty() => Ok(Some(text.clone())),
                Some(_) => Err(format!("\"{name}\" must be a non-empty string")),
            }
        };
        let required = |name: &str| string(name)?.ok_or_else(|| format!("\"{name}\" is missing"));
        if string("type")?.is_some_and(|kind| kind != "service_account") {
            return Err("\"type\" must be \"service_account\"".into());
        }
        let client_email = required("client_email")?;
        let token_uri = required("token_uri")?;
        // The signed assertion goes to token_uri: never in clear text over a network.
        validate_https_url("token_uri", &token_uri).map_err(|e| format!("\"token_uri\": {}", e.message))?;
        let key = EncodingKey::from_rsa_pem(required("private_key")?.as_bytes())
            .map_err(|e| format!("\"private_key\" is not an RSA private key in PEM form ({e})"))?;
        Ok(ServiceAccount {
            client_email,
            private_key_id: string("private_key_id")?,
            token_uri,
            project_id: string("project_id")?,
            key,
        })
    }

    pub fn client_email(&self) -> &str {
        &self.client_email
    }

    pub fn token_uri(&self) -> &str {
        &self.token_uri
    }

    pub fn project_id(&self) -> Option<&str> {
        self.project_id.as_deref()
    }
}

/// An OAuth 2.0 access token. Prints redacted; [`AccessToken::secret`] is the only way to it.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken(Arc<str>);

impl AccessToken {
    pub fn secret(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessToken(<redacted>)")
    }
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

struct CachedToken {
    token: AccessToken,
    /// Use it until this instant (Unix ms), then exchange a new assertion.
    refresh_at_ms: i64,
}

/// Access tokens for a service account: the JWT-bearer grant, cached. One exchange at a time:
/// callers who find the cache stale while an exchange is in flight wait for it and share its
/// token.
pub struct ServiceAccountCredential {
    account: ServiceAccount,
    token_uri: Uri,
    client: HttpClient,
    clock: SharedClock,
    cache: Mutex<Option<CachedToken>>,
    exchange_gate: tokio::sync::Mutex<()>,
    exchanges: AtomicU64,
}

impl std::fmt::Debug for ServiceAccountCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccountCredential").field("account", &self.account).finish()
    }
}

impl ServiceAccountCredential {
    pub fn new(account: ServiceAccount, clock: SharedClock) -> Result<Self, AdminError> {
        let token_uri: Uri = account.token_uri.parse().map_err(|e: hyper::http::uri::InvalidUri| {
            AdminError::TokenExchange { token_uri: account.token_uri.clone(), reason: e.to_string() }
        })?;
        let client = http_client(&[])
            .map_err(|e| AdminError::TokenExchange { token_uri: account.token_uri.clone(), reason: e.to_string() })?;
        Ok(ServiceAccountCredential {
            account,
            token_uri,
            client,
            clock,
            cache: Mutex::new(None),
            exchange_gate: tokio::sync::Mutex::new(()),
            exchanges: AtomicU64::new(0),
        })
    }

    pub fn account(&self) -> &ServiceAccount {
        &self.account
    }

    /// Assertions exchanged so far (for tests and metrics).
    pub fn exchange_count(&self) -> u64 {
        self.exchanges.load(Ordering::Relaxed)
    }

    /// A valid access token: the cached one while it is fresh, otherwise a new one.
    pub async fn access_token(&self) -> Result<AccessToken, AdminError> {
        if let Some(token) = self.cached() {
            return Ok(token);
        }
        let _gate = self.exchange_gate.lock().await;
        // Whoever held the gate before us may have just refreshed it.
        if let Some(token) = self.cached() {
            return Ok(token);
        }
        let sent_at_ms = self.clock.now_ms();
        self.exchanges.fetch_add(1, Ordering::Relaxed);
        let (token, expires_in) = tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(sent_at_ms.div_euclid(1000)))
            .await
            .unwrap_or_else(|_| Err(self.exchange_error(format!("timed out after {REQUEST_TIMEOUT:?}"))))?;
        // Counted from when the request left, not when the answer came: never later than Google.
        let usable_s = expires_in - REFRESH_MARGIN_S.min(expires_in / 2);
        let refresh_at_ms = sent_at_ms.saturating_add(usable_s.saturating_mul(1000));
        debug!(client_email = %self.account.client_email, expires_in, "service account access token obtained");
        *self.lock() = Some(CachedToken { token: token.clone(), refresh_at_ms });
        Ok(token)
    }

    /// Forget `token` if it is the cached one (the API refused it: revoked, or the clock lied).
    pub fn invalidate(&self, token: &AccessToken) {
        let mut cache = self.lock();
        if cache.as_ref().is_some_and(|cached| &cached.token == token) {
            *cache = None;
        }
    }

    fn cached(&self) -> Option<AccessToken> {
        let now = self.clock.now_ms();
        self.lock().as_ref().filter(|cached| now < cached.refresh_at_ms).map(|cached| cached.token.clone())
    }

    fn lock(&self) -> MutexGuard<'_, Option<CachedToken>> {
        // Replaced in one assignment: a panic elsewhere cannot leave it half-written.
        self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn exchange_error(&self, reason: impl Into<String>) -> AdminError {
        AdminError::TokenExchange { token_uri: self.account.token_uri.clone(), reason: reason.into() }
    }

    /// The signed assertion of RFC 7523 §3, as Google's token endpoint wants it.
    fn assertion(&self, now_s: i64) -> Result<String, AdminError> {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = self.account.private_key_id.clone();
        let claims = json!({
            "iss": self.account.client_email,
            "scope": IDENTITY_TOOLKIT_SCOPE,
            "aud": self.account.token_uri,
            "iat": now_s,
            "exp": now_s + ASSERTION_LIFETIME_S,
        });
        jsonwebtoken::encode(&header, &claims, &self.account.key)
            .map_err(|e| self.exchange_error(format!("signing the assertion failed: {e}")))
    }

    /// One exchange: POST the assertion, read `access_token` and `expires_in`.
    async fn exchange(&self, now_s: i64) -> Result<(AccessToken, i64), AdminError> {
        let assertion = self.assertion(now_s)?;
        let form = format!("grant_type={}&assertion={}", form_encode(JWT_BEARER_GRANT_TYPE), form_encode(&assertion));
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.token_uri.clone())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, concat!("encore/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| self.exchange_error(e.to_string()))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| self.exchange_error(format!("request failed: {}", error_chain(&e))))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_TOKEN_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| self.exchange_error(format!("answer unreadable: {e}")))?
            .to_bytes();
        let answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if !status.is_success() {
            // RFC 6749 §5.2: `error` and `error_description`; the body holds nothing secret, but
            // only those two fields are quoted.
            let field = |name: &str| answer.get(name).and_then(Value::as_str).map(clip_long);
            let reason = match (field("error"), field("error_description")) {
                (Some(error), Some(description)) => format!("HTTP {}: {error}: {description}", status.as_u16()),
                (Some(error), None) => format!("HTTP {}: {error}", status.as_u16()),
                _ => format!("HTTP {}", status.as_u16()),
            };
            return Err(self.exchange_error(reason));
        }
        if let Some(kind) = answer.get("token_type").and_then(Value::as_str)
            && !kind.eq_ignore_ascii_case("bearer")
        {
            return Err(self.exchange_error(format!("token_type is {:?}, expected Bearer", clip(kind))));
        }
        let token = match answer.get("access_token") {
            // It goes into a header: visible ASCII, no spaces.
            Some(Value::String(token)) if !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic()) => token,
            _ => return Err(self.exchange_error("the answer has no usable access_token")),
        };
        let expires_in = match answer.get("expires_in").and_then(Value::as_i64) {
            Some(seconds) if seconds > 0 => seconds.min(MAX_TOKEN_LIFETIME_S),
            _ => return Err(self.exchange_error("the answer has no positive expires_in")),
        };
        Ok((AccessToken(Arc::from(token.as_str())), expires_in))
    }
}

/// `application/x-www-form-urlencoded` for one value: everything but RFC 3986's unreserved
/// characters percent-encoded.
fn form_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Upstream messages quoted in errors: longer than `clip`, still bounded.
fn clip_long(text: &str) -> String {
    const MAX: usize = 200;
    if text.chars().count() <= MAX { text.to_owned() } else { text.chars().take(MAX).collect::<String>() + "…" }
}

// ---------------------------------------------------------------------------------------------
// The Identity Toolkit REST API (Google's, or the emulator's)

enum RestAuth {
    ServiceAccount(Box<ServiceAccountCredential>),
    /// The Auth Emulator's `Bearer owner`.
    EmulatorOwner,
}

struct IdentityToolkit {
    /// `{root}/v1/projects/{project}` (with `/tenants/{tenant}` for a tenant).
    base: String,
    auth: RestAuth,
    client: HttpClient,
}

/// One user as `accounts:lookup` and `accounts:batchGet` return them (the fields used here).
struct Account {
    uid: String,
    email: Option<String>,
    custom_attributes: Option<String>,
}

impl Account {
    fn from_json(value: &Value) -> Option<Account> {
        let text = |name: &str| value.get(name).and_then(Value::as_str).map(str::to_owned);
        Some(Account { uid: text("localId")?, email: text("email"), custom_attributes: text("customAttributes") })
    }
}

impl IdentityToolkit {
    fn new(root: &str, project: &str, tenant: Option<&str>, auth: RestAuth) -> Result<Self, AdminError> {
        let mut base = format!("{}/v1/projects/{project}", root.trim_end_matches('/'));
        if let Some(tenant) = tenant {
            base.push_str(&format!("/tenants/{tenant}"));
        }
        let _: Uri = base
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| AdminError::Setting(format!("{base:?} is not a URL: {e}")))?;
        let client = http_client(&[]).map_err(|e| AdminError::Setting(e.to_string()))?;
        Ok(IdentityToolkit { base, auth, client })
    }

    async fn lookup(&self, uid: &str) -> Result<Account, AdminError> {
        let answer =
            self.call("accounts:lookup", Method::POST, "accounts:lookup", Some(json!({ "localId": [uid] }))).await?;
        answer
            .get("users")
            .and_then(Value::as_array)
            .and_then(|users| users.iter().filter_map(Account::from_json).find(|account| account.uid == uid))
            .ok_or_else(|| AdminError::UserNotFound(uid.to_owned()))
    }

    async fn update(&self, uid: &str, custom_attributes: &str) -> Result<(), AdminError> {
        let body = json!({ "localId": uid, "customAttributes": custom_attributes });
        self.call("accounts:update", Method::POST, "accounts:update", Some(body)).await.map(drop)
    }

    /// One page of users, and the token of the next page (none at the end).
    async fn batch_get(&self, page: Option<&str>) -> Result<(Vec<Account>, Option<String>), AdminError> {
        let mut path = format!("accounts:batchGet?maxResults={PAGE_SIZE}");
        if let Some(token) = page {
            path.push_str(&format!("&nextPageToken={}", form_encode(token)));
        }
        let answer = self.call("accounts:batchGet", Method::GET, &path, None).await?;
        let users = answer
            .get("users")
            .and_then(Value::as_array)
            .map(|users| users.iter().filter_map(Account::from_json).collect());
        let next =
            answer.get("nextPageToken").and_then(Value::as_str).filter(|token| !token.is_empty()).map(str::to_owned);
        Ok((users.unwrap_or_default(), next))
    }

    /// One API call with a fresh (or cached) bearer token. A 401 with a cached token drops it and
    /// tries once more with a new one: the token may have been revoked before its time.
    async fn call(
        &self,
        operation: &'static str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, AdminError> {
        let url = format!("{}/{path}", self.base);
        for attempt in 0..2 {
            let token = match &self.auth {
                RestAuth::ServiceAccount(credential) => Some(credential.access_token().await?),
                RestAuth::EmulatorOwner => None,
            };
            let bearer = token.as_ref().map_or(EMULATOR_ADMIN_TOKEN, AccessToken::secret);
            let mut authorization = HeaderValue::from_str(&format!("Bearer {bearer}")).map_err(|_| {
                AdminError::Unavailable { operation, reason: "access token is not a header value".into() }
            })?;
            // Keeps it out of hyper's and anyone's debug output.
            authorization.set_sensitive(true);
            let mut request = Request::builder()
                .method(method.clone())
                .uri(&url)
                .header(header::AUTHORIZATION, authorization)
                .header(header::ACCEPT, "application/json")
                .header(header::USER_AGENT, concat!("encore/", env!("CARGO_PKG_VERSION")));
            if body.is_some() {
                request = request.header(header::CONTENT_TYPE, "application/json");
            }
            let payload = body.as_ref().map_or_else(Bytes::new, |body| Bytes::from(body.to_string()));
            let request = request
                .body(Full::new(payload))
                .map_err(|e| AdminError::Unavailable { operation, reason: e.to_string() })?;
            let (status, answer) =
                tokio::time::timeout(REQUEST_TIMEOUT, self.send(operation, request)).await.unwrap_or_else(|_| {
                    Err(AdminError::Unavailable { operation, reason: format!("timed out after {REQUEST_TIMEOUT:?}") })
                })?;
            if status.is_success() {
                return Ok(answer);
            }
            if let (StatusCode::UNAUTHORIZED, 0, RestAuth::ServiceAccount(credential), Some(token)) =
                (status, attempt, &self.auth, &token)
            {
                warn!(operation, "access token refused; exchanging a new one");
                credential.invalidate(token);
                continue;
            }
            return Err(upstream_error(operation, status, &answer));
        }
        Err(AdminError::Upstream { operation, status: 401, message: "the access token was refused twice".into() })
    }

    async fn send(
        &self,
        operation: &'static str,
        request: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Value), AdminError> {
        let response = self.client.request(request).await.map_err(|e| AdminError::Unavailable {
            operation,
            reason: format!("request failed: {}", error_chain(&e)),
        })?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_API_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| AdminError::Unavailable { operation, reason: format!("answer unreadable: {e}") })?
            .to_bytes();
        match serde_json::from_slice(&body) {
            Ok(answer) => Ok((status, answer)),
            Err(_) if !status.is_success() => Ok((status, Value::Null)),
            Err(e) => Err(AdminError::Upstream {
                operation,
                status: status.as_u16(),
                message: format!("answer is not JSON: {e}"),
            }),
        }
    }
}

/// Google's error shape: `{"error": {"code", "message", "status"}}`; `message` is an upper-case
/// reason such as `USER_NOT_FOUND`, sometimes followed by ` : details`.
fn upstream_error(operation: &'static str, status: StatusCode, answer: &Value) -> AdminError {
    let message = answer
        .pointer("/error/message")
        .and_then(Value::as_str)
        .map(clip_long)
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_owned());
    if message.starts_with("USER_NOT_FOUND") {
        return AdminError::UserNotFound(String::new());
    }
    if status == StatusCode::FORBIDDEN {
        return AdminError::InsufficientPermission { operation, message };
    }
    AdminError::Upstream { operation, status: status.as_u16(), message }
}

// ---------------------------------------------------------------------------------------------
// The admin

enum Backend {
    Rest(Box<IdentityToolkit>),
    Dev(Arc<DevRoles>),
}

/// Options of the firebase backend the config file does not hold.
#[derive(Debug, Clone)]
pub struct FirebaseAdminOptions {
    pub project_id: String,
    pub tenant: Option<String>,
    /// Google's by default; tests point it at a local server.
    pub identity_toolkit_url: String,
}

impl FirebaseAdminOptions {
    pub fn new(project_id: impl Into<String>) -> Self {
        FirebaseAdminOptions {
            project_id: project_id.into(),
            tenant: None,
            identity_toolkit_url: GOOGLE_IDENTITY_TOOLKIT_URL.to_owned(),
        }
    }
}

/// Reads and sets the `role` custom claim, in whichever backend the mode calls for.
pub struct ClaimsAdmin {
    mode: AuthMode,
    backend: Backend,
}

impl std::fmt::Debug for ClaimsAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimsAdmin").field("mode", &self.mode).finish()
    }
}

impl ClaimsAdmin {
    /// The admin `config` calls for: in dev mode `dev_roles`' (required there), in emulator mode
    /// the emulator's, in firebase mode the service account's; `None` in firebase mode without a
    /// service account (roles can then only be read from tokens, not managed).
    pub fn from_config(
        config: &AuthConfig,
        dev_roles: Option<Arc<DevRoles>>,
        clock: SharedClock,
    ) -> Result<Option<Self>, AdminError> {
        match config.mode {
            AuthMode::Dev => {
                let roles = dev_roles.ok_or_else(|| AdminError::Dev("no dev role store".into()))?;
                Ok(Some(Self::dev(roles)))
            }
            AuthMode::FirebaseEmulator => {
                let host = config.effective_emulator_host().unwrap_or(super::config::DEFAULT_EMULATOR_HOST);
                Self::emulator(host, config.effective_project_id(), config.tenant.as_deref()).map(Some)
            }
            AuthMode::Firebase => {
                let Some(path) = &config.service_account_file else { return Ok(None) };
                let account = ServiceAccount::from_file(path)?;
                let project = config.effective_project_id();
                if let Some(own) = account.project_id()
                    && own != project
                {
                    // Legitimate (one project's account granted rights on another), but worth a word.
                    warn!(service_account_project = own, project, "the service account belongs to another project");
                }
                let mut options = FirebaseAdminOptions::new(project);
                options.tenant = config.tenant.clone();
                Self::firebase(account, options, clock).map(Some)
            }
        }
    }

    /// Google's Identity Toolkit, as `account`.
    pub fn firebase(
        account: ServiceAccount,
        options: FirebaseAdminOptions,
        clock: SharedClock,
    ) -> Result<Self, AdminError> {
        validate_https_url("identity_toolkit_url", &options.identity_toolkit_url)
            .map_err(|e| AdminError::Setting(e.to_string()))?;
        info!(client_email = %account.client_email(), project = %options.project_id, "managing roles as a service account");
        let credential = ServiceAccountCredential::new(account, clock)?;
        let api = IdentityToolkit::new(
            &options.identity_toolkit_url,
            &options.project_id,
            options.tenant.as_deref(),
            RestAuth::ServiceAccount(Box::new(credential)),
        )?;
        Ok(ClaimsAdmin { mode: AuthMode::Firebase, backend: Backend::Rest(Box::new(api)) })
    }

    /// The Auth Emulator at `host` (`host:port`), which takes `Bearer owner`.
    pub fn emulator(host: &str, project_id: &str, tenant: Option<&str>) -> Result<Self, AdminError> {
        let root = format!("http://{host}/identitytoolkit.googleapis.com");
        let api = IdentityToolkit::new(&root, project_id, tenant, RestAuth::EmulatorOwner)?;
        Ok(ClaimsAdmin { mode: AuthMode::FirebaseEmulator, backend: Backend::Rest(Box::new(api)) })
    }

    /// The dev issuer's role table.
    pub fn dev(roles: Arc<DevRoles>) -> Self {
        ClaimsAdmin { mode: AuthMode::Dev, backend: Backend::Dev(roles) }
    }

    /// Which backend this is (named after the mode that chose it).
    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// The service account's credential, in firebase mode.
    pub fn credential(&self) -> Option<&ServiceAccountCredential> {
        match &self.backend {
            Backend::Rest(api) => match &api.auth {
                RestAuth::ServiceAccount(credential) => Some(credential),
                RestAuth::EmulatorOwner => None,
            },
            Backend::Dev(_) => None,
        }
    }

    /// Give `uid` the role `role`: the `role` claim set (the `roles` array dropped), every other
    /// claim kept. Takes effect in the user's next ID token (sign-in or refresh).
    pub async fn set_role(&self, uid: &str, role: Role) -> Result<RoleChange, AdminError> {
        check_uid(uid)?;
        let previous = match &self.backend {
            Backend::Rest(api) => {
                let account = api.lookup(uid).await.map_err(|e| with_uid(e, uid))?;
                let (attributes, previous) = merge_role_claim(uid, account.custom_attributes.as_deref(), role)?;
                api.update(uid, &attributes).await.map_err(|e| with_uid(e, uid))?;
                previous
            }
            Backend::Dev(roles) => roles.set(uid, role)?.into_iter().collect(),
        };
        info!(uid, role = role.as_str(), ?previous, backend = %self.mode, "role claim set");
        Ok(RoleChange { uid: uid.to_owned(), role, previous })
    }

    /// The roles `uid`'s claims grant now.
    pub async fn get_role(&self, uid: &str) -> Result<UserRoles, AdminError> {
        check_uid(uid)?;
        match &self.backend {
            Backend::Rest(api) => {
                let account = api.lookup(uid).await.map_err(|e| with_uid(e, uid))?;
                let roles = roles_of_attributes(uid, account.custom_attributes.as_deref());
                Ok(UserRoles { uid: account.uid, roles, email: account.email })
            }
            Backend::Dev(roles) => {
                Ok(UserRoles { uid: uid.to_owned(), roles: roles.get(uid)?.into_iter().collect(), email: None })
            }
        }
    }

    /// Every user whose claims grant a role, by uid (users without one have the default role).
    pub async fn list_roles(&self) -> Result<Vec<UserRoles>, AdminError> {
        match &self.backend {
            Backend::Rest(api) => {
                let mut users = BTreeMap::new();
                let mut page: Option<String> = None;
                for _ in 0..MAX_PAGES {
                    let (accounts, next) = api.batch_get(page.as_deref()).await?;
                    for account in accounts {
                        let roles = roles_of_attributes(&account.uid, account.custom_attributes.as_deref());
                        if !roles.is_empty() {
                            users.insert(
                                account.uid.clone(),
                                UserRoles { uid: account.uid, roles, email: account.email },
                            );
                        }
                    }
                    match next {
                        Some(token) if page.as_deref() != Some(token.as_str()) => page = Some(token),
                        _ => return Ok(users.into_values().collect()),
                    }
                }
                Err(AdminError::Upstream {
                    operation: "accounts:batchGet",
                    status: 200,
                    message: format!("still paging after {MAX_PAGES} pages"),
                })
            }
            Backend::Dev(roles) => Ok(roles
                .all()?
                .into_iter()
                .map(|(uid, role)| UserRoles { uid, roles: vec![role], email: None })
                .collect()),
        }
    }
}

/// `USER_NOT_FOUND` answers do not say whom; the caller knows.
fn with_uid(error: AdminError, uid: &str) -> AdminError {
    match error {
        AdminError::UserNotFound(_) => AdminError::UserNotFound(uid.to_owned()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_keeps_other_claims_and_drops_the_roles_array() {
        let (text, previous) =
            merge_role_claim("u", Some(r#"{"tier":"gold","roles":["admin","speaker"],"n":1}"#), Role::Listener)
                .unwrap();
        assert_eq!(text, r#"{"tier":"gold","n":1,"role":"listener"}"#);
        assert_eq!(previous, vec![Role::Speaker, Role::Admin]);
        let (text, previous) = merge_role_claim("u", None, Role::Speaker).unwrap();
        assert_eq!(text, r#"{"role":"speaker"}"#);
        assert!(previous.is_empty());
        let (text, _) = merge_role_claim("u", Some(r#"{"role":"Listener"}"#), Role::Admin).unwrap();
        assert_eq!(text, r#"{"role":"admin"}"#);
    }

    #[test]
    fn merging_refuses_more_than_1000_bytes_and_claims_that_are_not_an_object() {
        let around = merge_role_claim("u", Some(r#"{"pad":""}"#), Role::Admin).unwrap().0.len();
        let fits = format!(r#"{{"pad":"{}"}}"#, "x".repeat(MAX_CLAIMS_BYTES - around));
        let (text, _) = merge_role_claim("u", Some(&fits), Role::Admin).unwrap();
        assert_eq!(text.len(), MAX_CLAIMS_BYTES);
        let over = format!(r#"{{"pad":"{}"}}"#, "x".repeat(MAX_CLAIMS_BYTES - around + 1));
        let error = merge_role_claim("u", Some(&over), Role::Admin).unwrap_err();
        assert_eq!(error, AdminError::ClaimsTooLarge { uid: "u".into(), bytes: MAX_CLAIMS_BYTES + 1 });
        assert_eq!(error.code(), "claims-too-large");
        for bad in ["[1]", "\"role\"", "{"] {
            assert_eq!(merge_role_claim("u", Some(bad), Role::Admin).unwrap_err().code(), "invalid-claims", "{bad}");
        }
    }

    #[test]
    fn roles_and_uids_are_checked() {
        assert_eq!(parse_role("speaker"), Ok(Role::Speaker));
        assert_eq!(parse_role("superuser").unwrap_err().code(), "invalid-role");
        assert!(check_uid("alice").is_ok());
        assert_eq!(check_uid(""), Err(AdminError::InvalidUid));
        assert_eq!(check_uid("a\nb"), Err(AdminError::InvalidUid));
        assert_eq!(check_uid(&"x".repeat(129)), Err(AdminError::InvalidUid));
    }

    #[test]
    fn form_encoding_leaves_only_unreserved_characters() {
        assert_eq!(form_encode(JWT_BEARER_GRANT_TYPE), "urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer");
        assert_eq!(form_encode("a.b_c-d~e"), "a.b_c-d~e");
        assert_eq!(form_encode("a b+/="), "a%20b%2B%2F%3D");
    }

    #[test]
    fn service_account_json_errors_never_quote_the_file() {
        let secret = "-----BEGIN PRIVATE KEY-----\nTOPSECRET\n-----END PRIVATE KEY-----\n";
        let cases = [
            json!({"type": "service_account", "client_email": "a@b", "token_uri": "https://t", "private_key": secret}),
            json!({"client_email": secret, "token_uri": 5, "private_key": secret}),
            json!({"type": secret, "client_email": "a@b"}),
            json!([secret]),
        ];
        for case in cases {
            let error = ServiceAccount::from_json(&case.to_string()).unwrap_err();
            assert_eq!(error.code(), "invalid-credential");
            assert!(!error.to_string().contains("TOPSECRET"), "{error}");
        }
        let error = ServiceAccount::from_json("{\"private_key\": \"TOPSECRET").unwrap_err();
        assert!(!error.to_string().contains("TOPSECRET"), "{error}");
        let plain = json!({"client_email": "a@b", "token_uri": "http://example.com/token", "private_key": secret});
        assert!(ServiceAccount::from_json(&plain.to_string()).unwrap_err().to_string().contains("https"));
    }
}
