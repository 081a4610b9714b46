//! Firebase ID token verification: the checks of firebase-admin's `verifyIdToken`, made stricter
//! where it is lax, done by hand on the decoded token.
//!
//! jsonwebtoken is used for one thing only, the RS256 signature check
//! (`jsonwebtoken::crypto::verify` with the algorithm fixed by us). Its `decode` with
//! `Validation` is deliberately not used: its defaults accept an `aud` array, a 60 s leeway, a
//! missing `iss`, and never look at `iat` or `sub` (docs/dependencies.md), and the emulator's `alg: none`
//! tokens cannot go through it at all. Parsing and every claim check live here, once, for all modes.
//!
//! Order of checks: structure; the refusals that recognise other Firebase credentials (custom
//! token, session cookie) so their messages are specific; the header (`alg`, `kid`); the key; the
//! signature; then the claims. Claims are only trusted after the signature, but they are checked
//! in full either way.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use encore_systems::components::Role;
use jsonwebtoken::Algorithm;
use serde::Serialize;
use serde_json::{Map, Value};
use tracing::debug;

use super::clock::SharedClock;
use super::error::{AuthError, clip};
use super::keys::KeySource;

/// The audience of Firebase custom tokens (what `createCustomToken` signs).
pub const CUSTOM_TOKEN_AUDIENCE: &str =
    "https://identitytoolkit.googleapis.com/google.identity.identitytoolkit.v1.IdentityToolkit";
/// ID tokens are issued by this prefix followed by the project id.
pub const ID_TOKEN_ISSUER_PREFIX: &str = "https://securetoken.google.com/";
/// Session cookies are issued by this prefix followed by the project id.
pub const SESSION_COOKIE_ISSUER_PREFIX: &str = "https://session.firebase.google.com/";
/// Longest `sub` Firebase allows (in UTF-16 code units, as the Admin SDK counts).
pub const MAX_UID_LEN: usize = 128;
/// Bigger than any real ID token by far; refuse before decoding anything.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Who a verified token says the caller is. Deserialize: a cluster ticket carries it through
/// Redis to the node that redeems it (src/cluster).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct AuthUser {
    /// The Firebase uid (`sub`).
    pub uid: String,
    /// From the `role`/`roles` custom claims, or the configured default. Sorted, never empty.
    pub roles: Vec<Role>,
    pub email: Option<String>,
    pub email_verified: bool,
    pub name: Option<String>,
    /// `firebase.sign_in_provider`: `password`, `anonymous`, `custom`, `google.com`, ...
    pub sign_in_provider: Option<String>,
    /// `firebase.tenant`, when the user belongs to an Identity Platform tenant.
    pub tenant: Option<String>,
    /// `iat`, `auth_time` and `exp`, in Unix seconds.
    pub issued_at: i64,
    pub auth_time: i64,
    pub expires_at: i64,
}

impl AuthUser {
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// Speakers and admins publish.
    pub fn may_publish(&self) -> bool {
        self.roles.iter().any(|r| r.may_publish())
    }

    /// Moderators and admins may mute or remove others.
    pub fn may_moderate(&self) -> bool {
        self.roles.iter().any(|r| matches!(r, Role::Moderator | Role::Admin))
    }
}

/// What a verifier checks tokens against.
#[derive(Debug, Clone)]
pub struct VerifierSettings {
    pub project_id: String,
    /// The one tenant accepted; `None` accepts only tokens without a tenant.
    pub tenant: Option<String>,
    pub skew_s: u64,
    pub default_role: Role,
}

impl VerifierSettings {
    pub fn new(project_id: impl Into<String>) -> Self {
        VerifierSettings { project_id: project_id.into(), tenant: None, skew_s: 30, default_role: Role::Listener }
    }
}

enum Signatures {
    /// RS256 against a key source (firebase and dev modes).
    Rs256(Arc<KeySource>),
    /// The Auth Emulator's unsigned tokens: `alg: none`, empty signature, nothing else.
    EmulatorUnsigned,
}

/// Verifies Firebase ID tokens. Cheap to share behind an `Arc`.
pub struct Verifier {
    settings: VerifierSettings,
    issuer: String,
    signatures: Signatures,
    clock: SharedClock,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match &self.signatures {
            Signatures::Rs256(_) => "rs256",
            Signatures::EmulatorUnsigned => "emulator-unsigned",
        };
        f.debug_struct("Verifier").field("settings", &self.settings).field("signatures", &mode).finish()
    }
}

/// A token split and decoded, not yet trusted.
struct Decoded<'t> {
    header: Map<String, Value>,
    payload: Map<String, Value>,
    signing_input: &'t str,
    signature_b64: &'t str,
}

impl Verifier {
    /// A verifier of RS256 tokens signed by keys from `keys`.
    pub fn new(settings: VerifierSettings, keys: Arc<KeySource>, clock: SharedClock) -> Self {
        let issuer = format!("{ID_TOKEN_ISSUER_PREFIX}{}", settings.project_id);
        Verifier { settings, issuer, signatures: Signatures::Rs256(keys), clock }
    }

    /// A verifier of the Firebase Auth Emulator's unsigned tokens. Every claim is still checked.
    pub fn emulator(settings: VerifierSettings, clock: SharedClock) -> Self {
        let issuer = format!("{ID_TOKEN_ISSUER_PREFIX}{}", settings.project_id);
        Verifier { settings, issuer, signatures: Signatures::EmulatorUnsigned, clock }
    }

    pub fn settings(&self) -> &VerifierSettings {
        &self.settings
    }

    /// The key source, when tokens are signed.
    pub fn key_source(&self) -> Option<&Arc<KeySource>> {
        match &self.signatures {
            Signatures::Rs256(keys) => Some(keys),
            Signatures::EmulatorUnsigned => None,
        }
    }

    /// Verify `token` at the clock's current time.
    /// Whether tokens can be verified now (the keys are at hand or can be fetched).
    pub async fn keys_ready(&self) -> Result<(), AuthError> {
        match self.key_source() {
            Some(keys) => keys.ready().await,
            None => Ok(()),
        }
    }

    pub async fn verify(&self, token: &str) -> Result<AuthUser, AuthError> {
        let result = self.verify_inner(token).await;
        crate::metrics::auth_verification(crate::metrics::Credential::IdToken, result.as_ref().map(|_| ()));
        // Fields only: never the token, and nothing from it that was not checked.
        match &result {
            Ok(user) => debug!(uid = %user.uid, roles = ?user.roles, exp = user.expires_at, "ID token verified"),
            Err(error) => debug!(code = error.code(), check = error.check(), %error, "ID token rejected"),
        }
        result
    }

    async fn verify_inner(&self, token: &str) -> Result<AuthUser, AuthError> {
        let decoded = decode(token)?;
        refuse_other_credentials(&decoded.payload)?;
        let alg = match decoded.header.get("alg") {
            Some(Value::String(alg)) => alg.as_str(),
            Some(_) => return Err(AuthError::Malformed("header \"alg\" is not a string")),
            None => return Err(AuthError::Malformed("header has no \"alg\"")),
        };

        match &self.signatures {
            Signatures::EmulatorUnsigned => {
                if alg != "none" {
                    return Err(AuthError::NotAnEmulatorToken("header alg must be \"none\""));
                }
                if !decoded.signature_b64.is_empty() {
                    return Err(AuthError::NotAnEmulatorToken("an unsigned token must have an empty signature"));
                }
            }
            Signatures::Rs256(keys) => {
                // The algorithm is ours, never the token's: anything but RS256 stops here, before
                // a key is even looked up.
                if alg.eq_ignore_ascii_case("none") {
                    return Err(AuthError::UnsignedToken);
                }
                if alg != "RS256" {
                    return Err(AuthError::WrongAlgorithm(clip(alg)));
                }
                let kid = match decoded.header.get("kid") {
                    Some(Value::String(kid)) if !kid.is_empty() => kid.as_str(),
                    Some(Value::String(_)) => return Err(AuthError::MissingKid("\"kid\" is empty")),
                    Some(_) => return Err(AuthError::MissingKid("\"kid\" is not a string")),
                    None => return Err(AuthError::MissingKid("no \"kid\" in the header")),
                };
                let key = keys.key(kid).await?;
                let valid = jsonwebtoken::crypto::verify(
                    decoded.signature_b64,
                    decoded.signing_input.as_bytes(),
                    &key,
                    Algorithm::RS256,
                )
                .unwrap_or(false);
                if !valid {
                    return Err(AuthError::BadSignature);
                }
            }
        }

        self.check_claims(&decoded.payload)
    }

    fn check_claims(&self, claims: &Map<String, Value>) -> Result<AuthUser, AuthError> {
        let project = &self.settings.project_id;
        match claims.get("aud") {
            Some(Value::String(aud)) if aud == project => {}
            Some(Value::String(aud)) => {
                return Err(AuthError::claim("aud", format!("expected {project:?}, got {:?}", clip(aud))));
            }
            Some(Value::Array(_)) => {
                return Err(AuthError::claim("aud", "must be the project id as a string, got an array"));
            }
            Some(_) => return Err(AuthError::claim("aud", "must be a string")),
            None => return Err(AuthError::claim("aud", "missing")),
        }
        match claims.get("iss") {
            Some(Value::String(iss)) if *iss == self.issuer => {}
            Some(Value::String(iss)) => {
                return Err(AuthError::claim("iss", format!("expected {:?}, got {:?}", self.issuer, clip(iss))));
            }
            Some(_) => return Err(AuthError::claim("iss", "must be a string")),
            None => return Err(AuthError::claim("iss", "missing")),
        }
        let uid = match claims.get("sub") {
            Some(Value::String(sub)) if sub.is_empty() => return Err(AuthError::claim("sub", "is empty")),
            Some(Value::String(sub)) if sub.encode_utf16().count() > MAX_UID_LEN => {
                return Err(AuthError::claim("sub", format!("is longer than {MAX_UID_LEN} characters")));
            }
            Some(Value::String(sub)) => sub.clone(),
            Some(_) => return Err(AuthError::claim("sub", "must be a string")),
            None => return Err(AuthError::claim("sub", "missing")),
        };

        let now = self.clock.now_s();
        let skew = i64::try_from(self.settings.skew_s).unwrap_or(i64::MAX);
        let exp = integer_claim(claims, "exp")?;
        let iat = integer_claim(claims, "iat")?;
        let auth_time = integer_claim(claims, "auth_time")?;
        if exp <= now.saturating_sub(skew) {
            return Err(AuthError::Expired { exp, now, skew_s: self.settings.skew_s });
        }
        let latest = now.saturating_add(skew);
        if iat > latest {
            return Err(AuthError::claim("iat", format!("is in the future ({iat} > now {now} + skew {skew} s)")));
        }
        if auth_time > latest {
            return Err(AuthError::claim(
                "auth_time",
                format!("is in the future ({auth_time} > now {now} + skew {skew} s)"),
            ));
        }
        // Firebase never sets nbf, but a token that carries one gets it honoured.
        if claims.contains_key("nbf") {
            let nbf = integer_claim(claims, "nbf")?;
            if nbf > latest {
                return Err(AuthError::claim("nbf", format!("is in the future ({nbf} > now {now} + skew {skew} s)")));
            }
        }

        let firebase = match claims.get("firebase") {
            None => None,
            Some(Value::Object(firebase)) => Some(firebase),
            Some(_) => return Err(AuthError::claim("firebase", "must be an object")),
        };
        let tenant = match firebase.and_then(|f| f.get("tenant")) {
            None => None,
            Some(Value::String(tenant)) => Some(tenant.clone()),
            Some(_) => return Err(AuthError::claim("firebase.tenant", "must be a string")),
        };
        match (&tenant, &self.settings.tenant) {
            (None, None) => {}
            (Some(t), Some(configured)) if t == configured => {}
            (Some(t), None) => {
                return Err(AuthError::TenantMismatch(format!(
                    "token is for tenant {:?}, but no tenant is accepted",
                    clip(t)
                )));
            }
            (Some(t), Some(configured)) => {
                return Err(AuthError::TenantMismatch(format!(
                    "token is for tenant {:?}, expected {configured:?}",
                    clip(t)
                )));
            }
            (None, Some(configured)) => {
                return Err(AuthError::TenantMismatch(format!("token has no tenant, expected {configured:?}")));
            }
        }
        let sign_in_provider =
            firebase.and_then(|f| f.get("sign_in_provider")).and_then(Value::as_str).map(str::to_owned);

        let string = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_owned);
        Ok(AuthUser {
            roles: roles_from_claims(claims, self.settings.default_role, &uid),
            uid,
            email: string("email"),
            email_verified: claims.get("email_verified").and_then(Value::as_bool).unwrap_or(false),
            name: string("name"),
            sign_in_provider,
            tenant,
            issued_at: iat,
            auth_time,
            expires_at: exp,
        })
    }
}

/// Split into three segments and decode header and payload as JSON objects. Errors say which part
/// is wrong, never what it contained.
fn decode(token: &str) -> Result<Decoded<'_>, AuthError> {
    if token.is_empty() {
        return Err(AuthError::Malformed("token is empty"));
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::Malformed("token is longer than 16384 bytes"));
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed("expected three dot-separated segments (header.payload.signature)"));
    };
    let header = json_object(header, "header")?;
    let payload = json_object(payload, "payload")?;
    // Decoded here only to classify garbage as malformed; the signature check decodes it again.
    URL_SAFE_NO_PAD.decode(signature).map_err(|_| AuthError::Malformed("signature is not base64url"))?;
    let signing_input = &token[..token.len() - signature.len() - 1];
    Ok(Decoded { header, payload, signing_input, signature_b64: signature })
}

fn json_object(segment: &str, what: &'static str) -> Result<Map<String, Value>, AuthError> {
    let (not_base64, not_json, not_object) = match what {
        "header" => ("header is not base64url", "header is not JSON", "header is not a JSON object"),
        _ => ("payload is not base64url", "payload is not JSON", "payload is not a JSON object"),
    };
    let bytes = URL_SAFE_NO_PAD.decode(segment).map_err(|_| AuthError::Malformed(not_base64))?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(AuthError::Malformed(not_object)),
        Err(_) => Err(AuthError::Malformed(not_json)),
    }
}

/// Custom tokens and session cookies are Firebase credentials too, but not ID tokens; say so
/// rather than failing on their unknown `kid`. Looked at before any key, like the Admin SDK does.
fn refuse_other_credentials(payload: &Map<String, Value>) -> Result<(), AuthError> {
    if payload.get("aud").and_then(Value::as_str) == Some(CUSTOM_TOKEN_AUDIENCE) {
        return Err(AuthError::CustomToken);
    }
    if payload.get("iss").and_then(Value::as_str).is_some_and(|iss| iss.starts_with(SESSION_COOKIE_ISSUER_PREFIX)) {
        return Err(AuthError::SessionCookie);
    }
    Ok(())
}

fn integer_claim(claims: &Map<String, Value>, name: &'static str) -> Result<i64, AuthError> {
    match claims.get(name) {
        // `as_i64` is None for floats and for integers beyond i64: both refused.
        Some(value @ Value::Number(_)) => value.as_i64().ok_or_else(|| AuthError::claim(name, "must be an integer")),
        Some(_) => Err(AuthError::claim(name, "must be an integer (seconds since 1970)")),
        None => Err(AuthError::claim(name, "missing")),
    }
}

/// Roles from the custom claims `role` (a string) and `roles` (an array of strings), merged.
/// Unknown names grant nothing and are skipped; with no known role, the default applies.
pub(crate) fn roles_from_claims(claims: &Map<String, Value>, default: Role, uid: &str) -> Vec<Role> {
    let mut roles = claimed_roles(claims, uid);
    if roles.is_empty() {
        roles.push(default);
    }
    roles
}

/// The roles the `role`/`roles` claims grant, sorted and deduplicated, without the default: empty
/// when the claims grant none. The admin module reads stored claims with the same rules.
pub(crate) fn claimed_roles(claims: &Map<String, Value>, uid: &str) -> Vec<Role> {
    let mut names: Vec<&str> = Vec::new();
    match claims.get("role") {
        Some(Value::String(name)) => names.push(name),
        Some(_) => debug!(uid, "ignoring non-string \"role\" claim"),
        None => {}
    }
    match claims.get("roles") {
        Some(Value::Array(items)) => {
            for item in items {
                match item.as_str() {
                    Some(name) => names.push(name),
                    None => debug!(uid, "ignoring non-string entry in \"roles\" claim"),
                }
            }
        }
        Some(_) => debug!(uid, "ignoring non-array \"roles\" claim"),
        None => {}
    }
    let mut roles: Vec<Role> = Vec::new();
    for name in names {
        match name.trim().to_ascii_lowercase().parse::<Role>() {
            Ok(role) => roles.push(role),
            Err(_) => debug!(uid, role = %clip(name), "ignoring unknown role"),
        }
    }
    roles.sort();
    roles.dedup();
    roles
}
