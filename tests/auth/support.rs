//! Test fixtures: real RSA keys and self-signed certificates made here, an X.509 (or JWK) key map
//! served by a real HTTP server on 127.0.0.1 with a chosen Cache-Control, and token builders that
//! can produce every malformed shape the verifier must refuse.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use encore::auth::{AuthUser, KeySource, KeySourceOptions, KeysFormat, ManualClock, Verifier, VerifierSettings};
use jsonwebtoken::{Algorithm, EncodingKey};
use rsa::pkcs8::{EncodePrivateKey, LineEnding};
use rsa::traits::PublicKeyParts;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;

/// A fixed "now" for every test: 2027-01-15T08:00:00Z.
pub const NOW: i64 = 1_800_000_000;
pub const PROJECT: &str = "encore-test";
pub const ISSUER: &str = "https://securetoken.google.com/encore-test";

/// An RSA signing key with its self-signed certificate, as Google publishes them.
pub struct TestKey {
    pub kid: String,
    pub private_pem: String,
    pub cert_pem: String,
    pub n_b64: String,
    pub e_b64: String,
    pub encoding: EncodingKey,
}

fn make_key(kid: &str) -> TestKey {
    let mut rng = rsa::rand_core::OsRng;
    let private = rsa::RsaPrivateKey::new(&mut rng, 2048).expect("RSA keygen");
    let private_pem = private.to_pkcs8_pem(LineEnding::LF).expect("pkcs8").to_string();
    let key_pair =
        rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(&private_pem, &rcgen::PKCS_RSA_SHA256).expect("rcgen key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(rcgen::DnType::CommonName, format!("test signer {kid}"));
    let cert_pem = params.self_signed(&key_pair).expect("self-signed").pem();
    let public = private.to_public_key();
    TestKey {
        kid: kid.to_owned(),
        n_b64: URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
        e_b64: URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
        encoding: EncodingKey::from_rsa_pem(private_pem.as_bytes()).expect("encoding key"),
        private_pem,
        cert_pem,
    }
}

/// Three keys, generated once per test binary (RSA generation is the slow part).
pub static KEYS: LazyLock<[TestKey; 3]> = LazyLock::new(|| {
    std::thread::scope(|s| {
        let a = s.spawn(|| make_key("kid-a"));
        let b = s.spawn(|| make_key("kid-b"));
        let c = make_key("kid-c");
        [a.join().expect("key a"), b.join().expect("key b"), c]
    })
});

pub fn key_a() -> &'static TestKey {
    &KEYS[0]
}
pub fn key_b() -> &'static TestKey {
    &KEYS[1]
}
pub fn key_c() -> &'static TestKey {
    &KEYS[2]
}

// ---------------------------------------------------------------------------------------------
// Key server

struct KeyServerState {
    body: Mutex<String>,
    cache_control: Mutex<String>,
    up: AtomicBool,
    fetches: AtomicUsize,
    delay: Mutex<Duration>,
    age: Mutex<Option<u64>>,
}

/// A real HTTP server on 127.0.0.1 serving a key map at `/keys`, counting requests.
pub struct KeyServer {
    pub addr: std::net::SocketAddr,
    state: Arc<KeyServerState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KeyServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn x509_map(keys: &[&TestKey]) -> String {
    let map: Map<String, Value> = keys.iter().map(|k| (k.kid.clone(), json!(k.cert_pem))).collect();
    Value::Object(map).to_string()
}

pub fn jwk_set(keys: &[&TestKey]) -> String {
    let keys: Vec<Value> = keys
        .iter()
        .map(|k| json!({"kty": "RSA", "alg": "RS256", "use": "sig", "kid": k.kid, "n": k.n_b64, "e": k.e_b64}))
        .collect();
    json!({ "keys": keys }).to_string()
}

async fn serve_keys(State(state): State<Arc<KeyServerState>>) -> Response {
    state.fetches.fetch_add(1, Ordering::SeqCst);
    let delay = *state.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if !state.up.load(Ordering::SeqCst) {
        return (StatusCode::INTERNAL_SERVER_ERROR, "key server is down").into_response();
    }
    let body = state.body.lock().unwrap().clone();
    let cache_control = state.cache_control.lock().unwrap().clone();
    let mut response =
        ([(header::CONTENT_TYPE, "application/json".to_owned()), (header::CACHE_CONTROL, cache_control)], body)
            .into_response();
    if let Some(age) = *state.age.lock().unwrap() {
        response.headers_mut().insert(header::AGE, age.into());
    }
    response
}

impl KeyServer {
    /// Serve `body` at `/keys` with `cache_control`.
    pub async fn start(body: String, cache_control: &str) -> KeyServer {
        let state = Arc::new(KeyServerState {
            body: Mutex::new(body),
            cache_control: Mutex::new(cache_control.to_owned()),
            up: AtomicBool::new(true),
            fetches: AtomicUsize::new(0),
            delay: Mutex::new(Duration::ZERO),
            age: Mutex::new(None),
        });
        let app = Router::new().route("/keys", get(serve_keys)).with_state(state.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("key server");
        });
        KeyServer { addr, state, task }
    }

    pub async fn x509(keys: &[&TestKey], cache_control: &str) -> KeyServer {
        Self::start(x509_map(keys), cache_control).await
    }

    pub fn url(&self) -> String {
        format!("http://{}/keys", self.addr)
    }

    pub fn set_x509(&self, keys: &[&TestKey]) {
        *self.state.body.lock().unwrap() = x509_map(keys);
    }

    pub fn set_up(&self, up: bool) {
        self.state.up.store(up, Ordering::SeqCst);
    }

    pub fn set_delay(&self, delay: Duration) {
        *self.state.delay.lock().unwrap() = delay;
    }

    pub fn set_age(&self, age: Option<u64>) {
        *self.state.age.lock().unwrap() = age;
    }

    pub fn fetches(&self) -> usize {
        self.state.fetches.load(Ordering::SeqCst)
    }
}

/// A loopback URL where nothing listens (connection refused).
pub async fn dead_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("http://{addr}/keys")
}

// ---------------------------------------------------------------------------------------------
// Verifier fixture

pub struct Fixture {
    pub server: KeyServer,
    pub clock: ManualClock,
    pub keys: Arc<KeySource>,
    pub verifier: Verifier,
}

impl Fixture {
    /// Key A served with a one-hour max-age; project `encore-test`; skew 30 s.
    pub async fn new() -> Fixture {
        Self::with(&[key_a()], "public, max-age=3600", |_| {}).await
    }

    pub async fn with(keys: &[&TestKey], cache_control: &str, tune: impl FnOnce(&mut VerifierSettings)) -> Fixture {
        let server = KeyServer::x509(keys, cache_control).await;
        Self::over(server, KeysFormat::X509, tune)
    }

    pub fn over(server: KeyServer, format: KeysFormat, tune: impl FnOnce(&mut VerifierSettings)) -> Fixture {
        let clock = ManualClock::at_secs(NOW);
        let keys =
            Arc::new(KeySource::new(KeySourceOptions::new(server.url(), format), clock.shared()).expect("key source"));
        let mut settings = VerifierSettings::new(PROJECT);
        tune(&mut settings);
        let verifier = Verifier::new(settings, keys.clone(), clock.shared());
        Fixture { server, clock, keys, verifier }
    }

    pub async fn verify(&self, token: &str) -> Result<AuthUser, encore::auth::AuthError> {
        self.verifier.verify(token).await
    }
}

// ---------------------------------------------------------------------------------------------
// Tokens

/// The claims of a valid ID token for `alice`, signed in with a password.
pub fn claims() -> Map<String, Value> {
    let Value::Object(map) = json!({
        "iss": ISSUER,
        "aud": PROJECT,
        "auth_time": NOW - 300,
        "user_id": "alice",
        "sub": "alice",
        "iat": NOW - 60,
        "exp": NOW + 3540,
        "email": "alice@example.com",
        "email_verified": true,
        "firebase": { "identities": { "email": ["alice@example.com"] }, "sign_in_provider": "password" },
    }) else {
        unreachable!()
    };
    map
}

/// Valid claims with changes: `set` entries replace, `Value::Null` removes.
pub fn claims_with(changes: &[(&str, Value)]) -> Map<String, Value> {
    let mut map = claims();
    for (name, value) in changes {
        if value.is_null() {
            map.remove(*name);
        } else {
            map.insert((*name).to_owned(), value.clone());
        }
    }
    map
}

pub fn b64(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

/// A compact JWS with exactly this header, signed with `key` under `alg`.
pub fn jws(header: Value, claims: &Map<String, Value>, key: &EncodingKey, alg: Algorithm) -> String {
    let signing_input = format!("{}.{}", b64(&header), b64(&Value::Object(claims.clone())));
    let signature = jsonwebtoken::crypto::sign(signing_input.as_bytes(), key, alg).expect("sign");
    format!("{signing_input}.{signature}")
}

/// RS256 with `key`, header `{alg, kid, typ}`.
pub fn rs256(key: &TestKey, claims: &Map<String, Value>) -> String {
    jws(json!({"alg": "RS256", "kid": key.kid, "typ": "JWT"}), claims, &key.encoding, Algorithm::RS256)
}

/// A valid token for alice signed with key A.
pub fn valid_token() -> String {
    rs256(key_a(), &claims())
}

/// `alg: none`, as the Auth Emulator issues: `header.payload.` with an empty signature.
pub fn unsigned(claims: &Map<String, Value>) -> String {
    format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT"})), b64(&Value::Object(claims.clone())))
}
