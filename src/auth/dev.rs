//! Dev mode's token issuer: a Firebase-shaped issuer for project `encore-dev`, living inside the
//! server. It makes an RSA key at start, wraps it in a self-signed certificate, publishes the
//! certificate as an X.509 map (Google's format) at `/dev/keys`, and mints RS256 ID tokens on
//! `POST /dev/token`. The server verifies those tokens with the very same verifier and key cache
//! as in firebase mode, fetching `/dev/keys` over real HTTP, so development exercises the
//! production path end to end. The server keeps the key in its data folder
//! ([`DEV_KEY_FILE`], readable by its owner only), like its TLS certificate, so a restart does
//! not invalidate the tokens its users hold; the key id is derived from the key, so it is the
//! same after a restart too.
//!
//! Dev mode's stand-in for custom claims is [`DevRoles`]: the role an admin set for a uid, which
//! every later `/dev/token` for that uid carries.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use encore_systems::components::Role;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::pkcs8::{EncodePrivateKey, LineEnding};
use serde_json::{Value, json};

use super::clock::SharedClock;
use super::verify::{ID_TOKEN_ISSUER_PREFIX, MAX_UID_LEN};

/// The project dev tokens are issued for.
pub const DEV_PROJECT_ID: &str = "encore-dev";
/// The file a server's dev role table lives in, inside its data folder.
pub const DEV_ROLES_FILE: &str = "dev-roles.json";
/// The file a server's dev signing key (PKCS#8 PEM) lives in, inside its data folder.
pub const DEV_KEY_FILE: &str = "dev-signing-key.pem";
/// RSA modulus size, as Google's signing keys.
const RSA_BITS: usize = 2048;

/// Why the dev issuer could not be made or could not mint.
#[derive(Debug, thiserror::Error)]
pub enum DevIssuerError {
    #[error("RSA key generation failed: {0}")]
    KeyGen(String),
    #[error("self-signed certificate failed: {0}")]
    Certificate(String),
    #[error("token signing failed: {0}")]
    Sign(String),
    #[error("invalid dev token request: {0}")]
    BadRequest(String),
    #[error("dev role store {path}: {reason}")]
    RoleStore { path: String, reason: String },
    #[error("dev signing key {path}: {source}")]
    KeyFile { path: String, source: std::io::Error },
}

/// The in-process issuer of dev tokens.
pub struct DevIssuer {
    kid: String,
    encoding_key: EncodingKey,
    certificate_pem: String,
    ttl_s: u64,
    clock: SharedClock,
}

impl std::fmt::Debug for DevIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("DevIssuer").field("kid", &self.kid).field("ttl_s", &self.ttl_s).finish()
    }
}

impl DevIssuer {
    /// Make a fresh RSA-2048 key and its self-signed certificate. CPU-bound (a fraction of a
    /// second to a few seconds): call it at start, or from `spawn_blocking`.
    pub fn generate(ttl_s: u64, clock: SharedClock) -> Result<Self, DevIssuerError> {
        let mut rng = rsa::rand_core::OsRng;
        let private = rsa::RsaPrivateKey::new(&mut rng, RSA_BITS).map_err(|e| DevIssuerError::KeyGen(e.to_string()))?;
        let pkcs8_pem = private.to_pkcs8_pem(LineEnding::LF).map_err(|e| DevIssuerError::KeyGen(e.to_string()))?;
        Self::from_pkcs8_pem(&pkcs8_pem, ttl_s, clock)
    }

    /// The issuer of the key kept at `path`, made and saved there (mode 0600) on first use.
    pub fn load_or_generate(path: &Path, ttl_s: u64, clock: SharedClock) -> Result<Self, DevIssuerError> {
        let failed = |source| DevIssuerError::KeyFile { path: path.display().to_string(), source };
        match std::fs::read_to_string(path) {
            Ok(pem) => Self::from_pkcs8_pem(&pem, ttl_s, clock),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let mut rng = rsa::rand_core::OsRng;
                let private =
                    rsa::RsaPrivateKey::new(&mut rng, RSA_BITS).map_err(|e| DevIssuerError::KeyGen(e.to_string()))?;
                let pem = private.to_pkcs8_pem(LineEnding::LF).map_err(|e| DevIssuerError::KeyGen(e.to_string()))?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(failed)?;
                }
                write_private(path, pem.as_bytes()).map_err(failed)?;
                Self::from_pkcs8_pem(&pem, ttl_s, clock)
            }
            Err(error) => Err(failed(error)),
        }
    }

    /// An issuer for an existing RSA private key (PKCS#8 PEM), e.g. one a test generated once.
    pub fn from_pkcs8_pem(pkcs8_pem: &str, ttl_s: u64, clock: SharedClock) -> Result<Self, DevIssuerError> {
        let key_pair = rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(pkcs8_pem, &rcgen::PKCS_RSA_SHA256)
            .map_err(|e| DevIssuerError::Certificate(e.to_string()))?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
            .map_err(|e| DevIssuerError::Certificate(e.to_string()))?;
        params.distinguished_name.push(rcgen::DnType::CommonName, "encore-dev token signer");
        let certificate = params.self_signed(&key_pair).map_err(|e| DevIssuerError::Certificate(e.to_string()))?;
        let encoding_key =
            EncodingKey::from_rsa_pem(pkcs8_pem.as_bytes()).map_err(|e| DevIssuerError::KeyGen(e.to_string()))?;
        // The key id names the key: the same key (a restart) gives the same id, so tokens minted
        // before a restart still find their key.
        let digest = ring::digest::digest(&ring::digest::SHA256, key_pair.public_key_raw());
        let kid = digest.as_ref()[..20].iter().map(|b| format!("{b:02x}")).collect();
        Ok(DevIssuer { kid, encoding_key, certificate_pem: certificate.pem(), ttl_s, clock })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    /// The X.509 map served at `/dev/keys`: `{"<kid>": "<PEM certificate>"}`.
    pub fn x509_map(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(self.kid.clone(), self.certificate_pem.clone())])
    }

    /// Mint an ID token for `uid` with the given roles (none: the verifier's default applies).
    /// Returns the token and its lifetime in seconds.
    pub fn mint(&self, uid: &str, roles: &[Role], email: Option<&str>) -> Result<(String, u64), DevIssuerError> {
        if uid.is_empty() || uid.encode_utf16().count() > MAX_UID_LEN || uid.chars().any(char::is_control) {
            return Err(DevIssuerError::BadRequest(format!(
                "uid must be 1 to {MAX_UID_LEN} characters without control characters"
            )));
        }
        let now = self.clock.now_s();
        let exp = now.saturating_add(i64::try_from(self.ttl_s).unwrap_or(i64::MAX));
        let mut claims = json!({
            "iss": format!("{ID_TOKEN_ISSUER_PREFIX}{DEV_PROJECT_ID}"),
            "aud": DEV_PROJECT_ID,
            "auth_time": now,
            "user_id": uid,
            "sub": uid,
            "iat": now,
            "exp": exp,
            "firebase": { "identities": {}, "sign_in_provider": "custom" },
        });
        if let Value::Object(map) = &mut claims {
            match roles {
                [] => {}
                [one] => {
                    map.insert("role".into(), json!(one.as_str()));
                }
                many => {
                    map.insert("roles".into(), json!(many.iter().map(|r| r.as_str()).collect::<Vec<_>>()));
                }
            }
            if let Some(email) = email {
                map.insert("email".into(), json!(email));
                map.insert("email_verified".into(), json!(false));
            }
        }
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &self.encoding_key)
            .map_err(|e| DevIssuerError::Sign(e.to_string()))?;
        Ok((token, self.ttl_s))
    }
}

/// Dev mode's custom claims: the role set per uid by an admin (`encore admin set-role`, `PUT
/// /api/users/{uid}/role`). `POST /dev/token` puts it in every token it mints for that uid, in
/// place of whatever role the request asked for, as a real custom claim outranks whatever a client
/// would like to be.
///
/// With a file (`<data_dir>/dev-roles.json` for a server), the roles live there: every read loads
/// the file and every write replaces it (written aside, then renamed, so a reader never sees half a
/// file). That is what lets `encore admin`, another process, change the roles of a running dev
/// server, and what keeps them across restarts, like Firebase keeps claims. Without a file (auth
/// tests), they live in memory. Two processes writing at the same instant may lose one write;
/// this is a development tool, not a database.
#[derive(Debug)]
pub struct DevRoles {
    file: Option<PathBuf>,
    /// The roles when there is no file; with a file, only a lock that orders this process's
    /// read-modify-write cycles.
    memory: Mutex<BTreeMap<String, Role>>,
}

/// The file's shape: `{"roles": {"<uid>": "<role>"}}`.
#[derive(serde::Serialize, serde::Deserialize, Default)]
struct DevRolesFile {
    #[serde(default)]
    roles: BTreeMap<String, Role>,
}

impl DevRoles {
    /// Roles kept in memory, for as long as the process lives.
    pub fn in_memory() -> Self {
        DevRoles { file: None, memory: Mutex::new(BTreeMap::new()) }
    }

    /// Roles kept in `path` (created at the first write).
    pub fn with_file(path: impl Into<PathBuf>) -> Self {
        DevRoles { file: Some(path.into()), memory: Mutex::new(BTreeMap::new()) }
    }

    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// The role set for `uid`, if any.
    pub fn get(&self, uid: &str) -> Result<Option<Role>, DevIssuerError> {
        Ok(self.all()?.get(uid).copied())
    }

    /// Every role set, by uid.
    pub fn all(&self) -> Result<BTreeMap<String, Role>, DevIssuerError> {
        let memory = self.lock();
        match &self.file {
            Some(path) => load(path),
            None => Ok(memory.clone()),
        }
    }

    /// Set `uid`'s role; returns the one it replaced.
    pub fn set(&self, uid: &str, role: Role) -> Result<Option<Role>, DevIssuerError> {
        let mut memory = self.lock();
        match &self.file {
            Some(path) => {
                let mut roles = load(path)?;
                let previous = roles.insert(uid.to_owned(), role);
                store(path, roles)?;
                Ok(previous)
            }
            None => Ok(memory.insert(uid.to_owned(), role)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Role>> {
        // A map updated by single inserts cannot be left half-written by a panic.
        self.memory.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn role_store_error(path: &Path, reason: impl std::fmt::Display) -> DevIssuerError {
    DevIssuerError::RoleStore { path: path.display().to_string(), reason: reason.to_string() }
}

fn load(path: &Path) -> Result<BTreeMap<String, Role>, DevIssuerError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str::<DevRolesFile>(&text)
            .map(|file| file.roles)
            .map_err(|e| role_store_error(path, format!("not a roles file ({e}); fix or delete it"))),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(error) => Err(role_store_error(path, error)),
    }
}

fn store(path: &Path, roles: BTreeMap<String, Role>) -> Result<(), DevIssuerError> {
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| role_store_error(path, e))?;
    }
    let text = serde_json::to_string_pretty(&DevRolesFile { roles }).map_err(|e| role_store_error(path, e))?;
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".{}.tmp", std::process::id()));
    let aside = PathBuf::from(aside);
    std::fs::write(&aside, text + "\n").map_err(|e| role_store_error(&aside, e))?;
    std::fs::rename(&aside, path).map_err(|e| role_store_error(path, e))
}

/// Writes a file only its owner may read (a private key).
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}
