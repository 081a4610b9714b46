//! The public keys tokens are checked against: fetched over HTTP(S), cached for the `max-age` they
//! are served with, refreshed by one request at a time.
//!
//! Rules, in the order a lookup meets them:
//! - Fresh cache (inside `max-age`): a known `kid` is answered from memory. An unknown `kid` may
//!   mean Google rotated its keys, so it triggers a refresh, but only if no fetch was attempted in
//!   the last [`KeySourceOptions::unknown_kid_interval`] (one minute): a stream of garbage `kid`s
//!   must not turn into a stream of requests to Google.
//! - Stale or empty cache: refresh. If that fails, the stale keys stay usable for
//!   [`KeySourceOptions::stale_grace`] after they went stale (bounded grace); past that, or with
//!   nothing ever fetched, callers get [`AuthError::KeysUnavailable`] (HTTP 503).
//! - Single flight: a refresh holds an async lock; whoever waited on it finds the attempt counter
//!   moved and uses the result instead of fetching again, so a thousand concurrent verifications
//!   against a cold cache make one request.
//! - After a failed fetch, no new attempt for [`KeySourceOptions::failure_backoff`]: with the key
//!   server down, requests fail fast instead of queueing behind timeouts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::http::{HeaderMap, Request, StatusCode, Uri, header};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::DecodingKey;
use rustls::pki_types::CertificateDer;
use tracing::{debug, info, warn};

use super::clock::SharedClock;
use super::config::KeysFormat;
use super::error::{AuthError, clip};

/// Google's X.509 map of the keys that sign Firebase ID tokens.
pub const GOOGLE_X509_URL: &str =
    "https://www.googleapis.com/robot/v1/metadata/x509/securetoken@system.gserviceaccount.com";
/// The same keys as a JWK set.
pub const GOOGLE_JWK_URL: &str =
    "https://www.googleapis.com/service_accounts/v1/jwk/securetoken@system.gserviceaccount.com";

/// A key document larger than this is not a key document.
const MAX_BODY_BYTES: usize = 1 << 20;

/// How a [`KeySource`] fetches and caches.
#[derive(Debug, Clone)]
pub struct KeySourceOptions {
    pub url: String,
    pub format: KeysFormat,
    /// Stale keys stay usable this long past their `max-age` while refreshes fail.
    pub stale_grace: Duration,
    /// An unknown `kid` triggers a refresh only if the last fetch attempt is at least this old.
    pub unknown_kid_interval: Duration,
    /// After a failed fetch, no new attempt for this long.
    pub failure_backoff: Duration,
    /// Cache lifetime when the response has no usable `Cache-Control: max-age`.
    pub default_max_age: Duration,
    /// Upper bound on any `max-age`, so a misconfigured mirror cannot pin keys for months.
    pub max_max_age: Duration,
    /// Whole-request timeout (connect, headers, body).
    pub fetch_timeout: Duration,
    /// Extra trust anchors besides the webpki roots, e.g. the server's own self-signed
    /// certificate when dev mode fetches `/dev/keys` from itself over HTTPS.
    pub extra_root_certs: Vec<CertificateDer<'static>>,
}

impl KeySourceOptions {
    pub fn new(url: impl Into<String>, format: KeysFormat) -> Self {
        KeySourceOptions {
            url: url.into(),
            format,
            stale_grace: Duration::from_secs(3600),
            unknown_kid_interval: Duration::from_secs(60),
            failure_backoff: Duration::from_secs(5),
            default_max_age: Duration::from_secs(60),
            max_max_age: Duration::from_secs(86_400),
            fetch_timeout: Duration::from_secs(10),
            extra_root_certs: Vec::new(),
        }
    }
}

/// Why a key source could not be built.
#[derive(Debug, thiserror::Error)]
pub enum KeySourceError {
    #[error("keys URL {url:?} is invalid: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("extra root certificate rejected: {0}")]
    BadRootCert(String),
    #[error("TLS client setup failed: {0}")]
    Tls(String),
}

/// Why one fetch failed. Only ever logged and summarised; never shown with key material.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("request failed: {0}")]
    Request(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("HTTP status {0}")]
    Status(StatusCode),
    #[error("body unreadable or larger than {MAX_BODY_BYTES} bytes: {0}")]
    Body(String),
    #[error("not a key document: {0}")]
    Parse(String),
}

type HttpClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// The current keys, by `kid`.
#[derive(Default)]
struct KeySet {
    keys: HashMap<String, Arc<DecodingKey>>,
}

#[derive(Default)]
struct CacheState {
    keys: Arc<KeySet>,
    /// The keys are fresh before this instant (Unix ms).
    fresh_until_ms: i64,
    /// The instant the last fetch attempt finished, successful or not.
    last_attempt_ms: Option<i64>,
    last_attempt_failed: bool,
    /// Counts finished fetch attempts: the single-flight generation.
    attempts: u64,
    last_error: Option<String>,
}

impl CacheState {
    fn is_fresh(&self, now_ms: i64) -> bool {
        !self.keys.keys.is_empty() && now_ms < self.fresh_until_ms
    }

    /// The keys callers may use now: fresh ones, or stale ones inside the grace period.
    fn usable(&self, now_ms: i64, grace: Duration) -> Option<&Arc<KeySet>> {
        let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
        let usable = !self.keys.keys.is_empty() && now_ms < self.fresh_until_ms.saturating_add(grace_ms);
        usable.then_some(&self.keys)
    }
}

/// A cached, self-refreshing set of public keys. Share it (`Arc`) between verifiers.
pub struct KeySource {
    options: KeySourceOptions,
    uri: Uri,
    client: HttpClient,
    clock: SharedClock,
    state: Mutex<CacheState>,
    /// Held for the duration of a fetch; the single-flight gate.
    refresh_gate: tokio::sync::Mutex<()>,
    fetches: AtomicU64,
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySource").field("url", &self.options.url).field("format", &self.options.format).finish()
    }
}

impl KeySource {
    pub fn new(options: KeySourceOptions, clock: SharedClock) -> Result<Self, KeySourceError> {
        let uri: Uri = options.url.parse().map_err(|e: hyper::http::uri::InvalidUri| KeySourceError::BadUrl {
            url: options.url.clone(),
            reason: e.to_string(),
        })?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(KeySourceError::BadUrl {
                url: options.url.clone(),
                reason: "expected an http(s) URL with a host".into(),
            });
        }
        let client = http_client(&options.extra_root_certs)?;
        Ok(KeySource {
            options,
            uri,
            client,
            clock,
            state: Mutex::new(CacheState::default()),
            refresh_gate: tokio::sync::Mutex::new(()),
            fetches: AtomicU64::new(0),
        })
    }

    pub fn url(&self) -> &str {
        &self.options.url
    }

    /// Fetch attempts made so far (for metrics and tests).
    pub fn fetch_count(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// The key for `kid`, refreshing the cache if the rules above allow.
    pub async fn key(&self, kid: &str) -> Result<Arc<DecodingKey>, AuthError> {
        let now = self.clock.now_ms();
        let (fresh, known, generation, may_refresh_for_kid) = {
            let state = self.lock();
            let interval_ms = i64::try_from(self.options.unknown_kid_interval.as_millis()).unwrap_or(i64::MAX);
            let may = state.last_attempt_ms.is_none_or(|at| now.saturating_sub(at) >= interval_ms);
            (state.is_fresh(now), state.keys.keys.get(kid).cloned(), state.attempts, may)
        };
        match (fresh, known) {
            (true, Some(key)) => return Ok(key),
            (true, None) if !may_refresh_for_kid => {
                debug!(kid = %clip(kid), "unknown kid; key refresh rate-limited");
            }
            (true, None) => {
                debug!(kid = %clip(kid), "unknown kid; refreshing keys");
                self.refresh(generation).await;
            }
            (false, _) => self.refresh(generation).await,
        }

        let now = self.clock.now_ms();
        let state = self.lock();
        match state.usable(now, self.options.stale_grace) {
            Some(keys) => keys.keys.get(kid).cloned().ok_or_else(|| AuthError::UnknownKid { kid: clip(kid) }),
            None => Err(AuthError::KeysUnavailable(match &state.last_error {
                Some(error) => format!("fetching {} failed: {error}", self.options.url),
                None => format!("no keys fetched yet from {}", self.options.url),
            })),
        }
    }

    /// Whether keys are usable now, fetching them if the cache is empty or stale (for readiness
    /// probes; the same single-flight and back-off rules apply).
    pub async fn ready(&self) -> Result<(), AuthError> {
        let now = self.clock.now_ms();
        let (fresh, generation) = {
            let state = self.lock();
            (state.is_fresh(now), state.attempts)
        };
        if !fresh {
            self.refresh(generation).await;
        }
        let now = self.clock.now_ms();
        let state = self.lock();
        match state.usable(now, self.options.stale_grace) {
            Some(keys) if !keys.keys.is_empty() => Ok(()),
            _ => Err(AuthError::KeysUnavailable(match &state.last_error {
                Some(error) => format!("fetching {} failed: {error}", self.options.url),
                None => format!("no keys fetched yet from {}", self.options.url),
            })),
        }
    }

    /// Fetch now unless another caller already did since `seen_generation` or a recent failure
    /// says to wait.
    async fn refresh(&self, seen_generation: u64) {
        let _gate = self.refresh_gate.lock().await;
        {
            let state = self.lock();
            if state.attempts != seen_generation {
                return; // someone fetched while we queued: use their result
            }
            let backoff_ms = i64::try_from(self.options.failure_backoff.as_millis()).unwrap_or(i64::MAX);
            if let (true, Some(at)) = (state.last_attempt_failed, state.last_attempt_ms)
                && self.clock.now_ms().saturating_sub(at) < backoff_ms
            {
                return;
            }
        }

        self.fetches.fetch_add(1, Ordering::Relaxed);
        let result = tokio::time::timeout(self.options.fetch_timeout, self.fetch())
            .await
            .unwrap_or(Err(FetchError::Timeout(self.options.fetch_timeout)));
        crate::metrics::auth_key_fetch(result.is_ok());
        let now = self.clock.now_ms();
        let mut state = self.lock();
        state.attempts += 1;
        state.last_attempt_ms = Some(now);
        match result {
            Ok((keys, max_age)) => {
                info!(url = %self.options.url, keys = keys.keys.len(), max_age_s = max_age.as_secs(), "public keys refreshed");
                state.keys = Arc::new(keys);
                state.fresh_until_ms = now.saturating_add(i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX));
                state.last_attempt_failed = false;
                state.last_error = None;
            }
            Err(error) => {
                let stale_keys = state.keys.keys.len();
                warn!(url = %self.options.url, %error, stale_keys, "public key refresh failed");
                state.last_attempt_failed = true;
                state.last_error = Some(error.to_string());
            }
        }
    }

    async fn fetch(&self) -> Result<(KeySet, Duration), FetchError> {
        let request = Request::get(self.uri.clone())
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, concat!("encore/", env!("CARGO_PKG_VERSION")))
            .body(Empty::<Bytes>::new())
            .map_err(|e| FetchError::Request(e.to_string()))?;
        let response = self.client.request(request).await.map_err(|e| FetchError::Request(error_chain(&e)))?;
        if response.status() != StatusCode::OK {
            return Err(FetchError::Status(response.status()));
        }
        let max_age = cache_lifetime(response.headers(), self.options.default_max_age, self.options.max_max_age);
        let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|e| FetchError::Body(e.to_string()))?
            .to_bytes();
        let keys = match self.options.format {
            KeysFormat::X509 => parse_x509_map(&body)?,
            KeysFormat::Jwk => parse_jwk_set(&body)?,
        };
        Ok((keys, max_age))
    }

    fn lock(&self) -> MutexGuard<'_, CacheState> {
        // The state is plain data updated in one assignment block; a panic elsewhere cannot leave
        // it half-written, so a poisoned lock is still safe to use.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The auth module's one HTTPS client recipe (rustls with ring, webpki roots plus `extra_roots`,
/// plain http allowed for loopback test servers), for any request body type: the key cache sends
/// none, the admin module sends forms and JSON.
pub(crate) fn http_client<B>(
    extra_roots: &[CertificateDer<'static>],
) -> Result<Client<HttpsConnector<HttpConnector>, B>, KeySourceError>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra_roots {
        roots.add(cert.clone()).map_err(|e| KeySourceError::BadRootCert(e.to_string()))?;
    }
    // The provider is named explicitly: the process-wide default may not be installed yet when
    // auth is built, and it must be ring, never aws-lc (docs/dependencies.md).
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| KeySourceError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().build();
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `max-age` minus `Age`, clamped to `[0, max]`; `no-store`/`no-cache` mean zero; absent means
/// `default`.
pub(crate) fn cache_lifetime(headers: &HeaderMap, default: Duration, max: Duration) -> Duration {
    let mut max_age: Option<u64> = None;
    let mut no_cache = false;
    for value in headers.get_all(header::CACHE_CONTROL) {
        let Ok(text) = value.to_str() else { continue };
        for directive in text.split(',') {
            let directive = directive.trim();
            let (name, arg) = match directive.split_once('=') {
                Some((name, arg)) => (name.trim(), Some(arg.trim().trim_matches('"'))),
                None => (directive, None),
            };
            if name.eq_ignore_ascii_case("max-age") {
                if let Some(seconds) = arg.and_then(|a| a.parse::<u64>().ok()) {
                    max_age.get_or_insert(seconds);
                }
            } else if name.eq_ignore_ascii_case("no-store") || name.eq_ignore_ascii_case("no-cache") {
                no_cache = true;
            }
        }
    }
    if no_cache {
        return Duration::ZERO;
    }
    let Some(max_age) = max_age else { return default.min(max) };
    let age =
        headers.get(header::AGE).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0);
    Duration::from_secs(max_age.saturating_sub(age)).min(max)
}

/// `{"<kid>": "<PEM certificate>"}`. Entries that are not RSA certificates are skipped (and
/// logged); a document with no usable key is an error, so a broken mirror cannot wipe the cache.
fn parse_x509_map(body: &[u8]) -> Result<KeySet, FetchError> {
    let map: HashMap<String, String> = serde_json::from_slice(body)
        .map_err(|e| FetchError::Parse(format!("expected a JSON object of kid to PEM: {e}")))?;
    let mut keys = HashMap::new();
    for (kid, pem) in map {
        match DecodingKey::from_rsa_pem(pem.as_bytes()) {
            Ok(key) => {
                keys.insert(kid, Arc::new(key));
            }
            Err(error) => warn!(kid = %clip(&kid), %error, "skipping key: not an RSA certificate"),
        }
    }
    non_empty(keys)
}

/// `{"keys": [{"kty": "RSA", "kid", "n", "e", ...}]}`. Only RSA signing keys usable with RS256.
fn parse_jwk_set(body: &[u8]) -> Result<KeySet, FetchError> {
    let doc: serde_json::Value = serde_json::from_slice(body).map_err(|e| FetchError::Parse(e.to_string()))?;
    let list = doc
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or_else(|| FetchError::Parse("expected a JSON object with a \"keys\" array".into()))?;
    let mut keys = HashMap::new();
    for jwk in list {
        let field = |name: &str| jwk.get(name).and_then(|v| v.as_str());
        let (Some(kid), Some("RSA"), Some(n), Some(e)) = (field("kid"), field("kty"), field("n"), field("e")) else {
            warn!(kid = ?field("kid").map(clip), "skipping JWK: not an RSA key with kid, n and e");
            continue;
        };
        if field("alg").is_some_and(|alg| alg != "RS256") || field("use").is_some_and(|u| u != "sig") {
            warn!(kid = %clip(kid), "skipping JWK: not an RS256 signing key");
            continue;
        }
        match DecodingKey::from_rsa_components(n, e) {
            Ok(key) => {
                keys.insert(kid.to_owned(), Arc::new(key));
            }
            Err(error) => warn!(kid = %clip(kid), %error, "skipping JWK: bad modulus or exponent"),
        }
    }
    non_empty(keys)
}

fn non_empty(keys: HashMap<String, Arc<DecodingKey>>) -> Result<KeySet, FetchError> {
    if keys.is_empty() {
        Err(FetchError::Parse("no usable RSA key in the document".into()))
    } else {
        Ok(KeySet { keys })
    }
}
