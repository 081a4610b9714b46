//! Dev mode's token issuer: a Firebase-shaped issuer for project `encore-dev`, living inside the
//! server. It makes an RSA key at start, wraps it in a self-signed certificate, publishes the
//! certificate as an X.509 map (Google's format) at `/dev/keys`, and mints RS256 ID tokens on
//! `POST /dev/token`. The server verifies those tokens with the very same verifier and key cache
//! as in firebase mode, fetching `/dev/keys` over real HTTP, so development exercises the
//! production path end to end. The key lives only in memory and dies with the process.

use std::collections::BTreeMap;

use encore_systems::components::Role;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::pkcs8::{EncodePrivateKey, LineEnding};
use serde_json::{Value, json};

use super::clock::SharedClock;
use super::verify::{ID_TOKEN_ISSUER_PREFIX, MAX_UID_LEN};

/// The project dev tokens are issued for.
pub const DEV_PROJECT_ID: &str = "encore-dev";
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
        let mut kid_bytes = [0u8; 20];
        getrandom::fill(&mut kid_bytes).map_err(|e| DevIssuerError::KeyGen(e.to_string()))?;
        let kid = kid_bytes.iter().map(|b| format!("{b:02x}")).collect();
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
