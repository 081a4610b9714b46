//! Every reject and accept case of issue 3, each its own test, against real RSA keys served over
//! real HTTP. Times come from a manual clock standing at `NOW`.

use encore::auth::{AuthError, CUSTOM_TOKEN_AUDIENCE, ManualClock, Role, Verifier, VerifierSettings};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};

use super::support::*;

/// A token the fixture's verifier must refuse with `$pattern`, whose `check()` is `$check`.
macro_rules! rejects {
    ($($name:ident: $token:expr => $pattern:pat, $check:literal;)*) => {$(
        #[tokio::test]
        async fn $name() {
            let fixture = Fixture::new().await;
            let token: String = $token;
            let result = fixture.verify(&token).await;
            match &result {
                Err(error @ $pattern) => {
                    assert_eq!(error.check(), $check, "{}: wrong check in {error}", stringify!($name));
                    assert!(!error.to_string().contains(&token) || token.is_empty(), "{}: message holds the token", stringify!($name));
                }
                other => panic!("{}: expected {}, got {other:?}", stringify!($name), stringify!($pattern)),
            }
        }
    )*};
}

fn segments(token: &str) -> Vec<String> {
    token.split('.').map(str::to_owned).collect()
}

fn es256_key() -> EncodingKey {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("ec key");
    EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).expect("ec encoding key")
}

fn header_a(alg: &str) -> Value {
    json!({"alg": alg, "kid": key_a().kid, "typ": "JWT"})
}

fn with_firebase(provider: &str, tenant: Option<&str>) -> Value {
    let mut firebase = json!({"identities": {}, "sign_in_provider": provider});
    if let Some(tenant) = tenant {
        firebase["tenant"] = json!(tenant);
    }
    firebase
}

rejects! {
    // Structure.
    empty_token: String::new() => AuthError::Malformed(_), "structure";
    two_segments: { let s = segments(&valid_token()); format!("{}.{}", s[0], s[1]) } => AuthError::Malformed(_), "structure";
    four_segments: format!("{}.extra", valid_token()) => AuthError::Malformed(_), "structure";
    bad_base64_header: { let s = segments(&valid_token()); format!("!!!.{}.{}", s[1], s[2]) } => AuthError::Malformed("header is not base64url"), "structure";
    bad_base64_payload: { let s = segments(&valid_token()); format!("{}.%%%.{}", s[0], s[2]) } => AuthError::Malformed("payload is not base64url"), "structure";
    bad_base64_signature: { let s = segments(&valid_token()); format!("{}.{}.***", s[0], s[1]) } => AuthError::Malformed("signature is not base64url"), "structure";
    padded_base64_header: { let s = segments(&valid_token()); format!("{}=.{}.{}", s[0], s[1], s[2]) } => AuthError::Malformed("header is not base64url"), "structure";
    header_not_json: { let s = segments(&valid_token()); format!("{}.{}.{}", URL_SAFE_NO_PAD.encode("not json"), s[1], s[2]) } => AuthError::Malformed("header is not JSON"), "structure";
    header_json_array: { let s = segments(&valid_token()); format!("{}.{}.{}", b64(&json!(["RS256"])), s[1], s[2]) } => AuthError::Malformed("header is not a JSON object"), "structure";
    payload_json_string: { let s = segments(&valid_token()); format!("{}.{}.{}", s[0], b64(&json!("alice")), s[2]) } => AuthError::Malformed("payload is not a JSON object"), "structure";
    payload_json_number: { let s = segments(&valid_token()); format!("{}.{}.{}", s[0], b64(&json!(42)), s[2]) } => AuthError::Malformed("payload is not a JSON object"), "structure";
    header_without_alg: jws(json!({"kid": key_a().kid}), &claims(), &key_a().encoding, Algorithm::RS256) => AuthError::Malformed("header has no \"alg\""), "structure";

    // Header: kid.
    no_kid: jws(json!({"alg": "RS256", "typ": "JWT"}), &claims(), &key_a().encoding, Algorithm::RS256) => AuthError::MissingKid(_), "kid";
    empty_kid: jws(json!({"alg": "RS256", "kid": ""}), &claims(), &key_a().encoding, Algorithm::RS256) => AuthError::MissingKid(_), "kid";
    numeric_kid: jws(json!({"alg": "RS256", "kid": 7}), &claims(), &key_a().encoding, Algorithm::RS256) => AuthError::MissingKid(_), "kid";
    unknown_kid: jws(json!({"alg": "RS256", "kid": "kid-nobody"}), &claims(), &key_a().encoding, Algorithm::RS256) => AuthError::UnknownKid { .. }, "kid";

    // Header: algorithm (never taken from the token).
    alg_none_outside_emulator: unsigned(&claims()) => AuthError::UnsignedToken, "alg";
    alg_none_with_kid_and_signature: { let s = segments(&valid_token()); format!("{}.{}.{}", b64(&header_a("none")), s[1], s[2]) } => AuthError::UnsignedToken, "alg";
    hs256_with_certificate_pem_as_secret: jws(header_a("HS256"), &claims(), &EncodingKey::from_secret(key_a().cert_pem.as_bytes()), Algorithm::HS256) => AuthError::WrongAlgorithm(_), "alg";
    rs384: jws(header_a("RS384"), &claims(), &key_a().encoding, Algorithm::RS384) => AuthError::WrongAlgorithm(_), "alg";
    ps256: jws(header_a("PS256"), &claims(), &key_a().encoding, Algorithm::PS256) => AuthError::WrongAlgorithm(_), "alg";
    es256: jws(header_a("ES256"), &claims(), &es256_key(), Algorithm::ES256) => AuthError::WrongAlgorithm(_), "alg";
    lowercase_rs256: jws(header_a("rs256"), &claims(), &key_a().encoding, Algorithm::RS256) => AuthError::WrongAlgorithm(_), "alg";

    // Signature.
    wrong_key: jws(header_a("RS256"), &claims(), &key_b().encoding, Algorithm::RS256) => AuthError::BadSignature, "signature";
    tampered_payload_escalated_role: {
        let s = segments(&valid_token());
        let escalated = b64(&Value::Object(claims_with(&[("role", json!("admin"))])));
        format!("{}.{}.{}", s[0], escalated, s[2])
    } => AuthError::BadSignature, "signature";
    stripped_signature: { let s = segments(&valid_token()); format!("{}.{}.", s[0], s[1]) } => AuthError::BadSignature, "signature";
    signature_of_another_token: {
        let other = segments(&rs256(key_a(), &claims_with(&[("sub", json!("mallory"))])));
        let s = segments(&valid_token());
        format!("{}.{}.{}", s[0], s[1], other[2])
    } => AuthError::BadSignature, "signature";

    // exp.
    expired: rs256(key_a(), &claims_with(&[("exp", json!(NOW - 3600))])) => AuthError::Expired { .. }, "exp";
    expired_just_beyond_skew: rs256(key_a(), &claims_with(&[("exp", json!(NOW - 30))])) => AuthError::Expired { .. }, "exp";
    missing_exp: rs256(key_a(), &claims_with(&[("exp", Value::Null)])) => AuthError::InvalidClaim { claim: "exp", .. }, "exp";
    non_numeric_exp: rs256(key_a(), &claims_with(&[("exp", json!((NOW + 3600).to_string()))])) => AuthError::InvalidClaim { claim: "exp", .. }, "exp";
    fractional_exp: rs256(key_a(), &claims_with(&[("exp", json!(NOW as f64 + 3600.5))])) => AuthError::InvalidClaim { claim: "exp", .. }, "exp";

    // iat and auth_time.
    iat_in_future_beyond_skew: rs256(key_a(), &claims_with(&[("iat", json!(NOW + 31))])) => AuthError::InvalidClaim { claim: "iat", .. }, "iat";
    auth_time_in_future_beyond_skew: rs256(key_a(), &claims_with(&[("auth_time", json!(NOW + 31))])) => AuthError::InvalidClaim { claim: "auth_time", .. }, "auth_time";
    missing_iat: rs256(key_a(), &claims_with(&[("iat", Value::Null)])) => AuthError::InvalidClaim { claim: "iat", .. }, "iat";
    missing_auth_time: rs256(key_a(), &claims_with(&[("auth_time", Value::Null)])) => AuthError::InvalidClaim { claim: "auth_time", .. }, "auth_time";
    non_numeric_iat: rs256(key_a(), &claims_with(&[("iat", json!("yesterday"))])) => AuthError::InvalidClaim { claim: "iat", .. }, "iat";
    nbf_in_future: rs256(key_a(), &claims_with(&[("nbf", json!(NOW + 600))])) => AuthError::InvalidClaim { claim: "nbf", .. }, "nbf";

    // aud.
    wrong_aud: rs256(key_a(), &claims_with(&[("aud", json!("someone-else"))])) => AuthError::InvalidClaim { claim: "aud", .. }, "aud";
    aud_array_containing_project: rs256(key_a(), &claims_with(&[("aud", json!([PROJECT]))])) => AuthError::InvalidClaim { claim: "aud", .. }, "aud";
    missing_aud: rs256(key_a(), &claims_with(&[("aud", Value::Null)])) => AuthError::InvalidClaim { claim: "aud", .. }, "aud";
    custom_token_audience: rs256(key_a(), &claims_with(&[("aud", json!(CUSTOM_TOKEN_AUDIENCE))])) => AuthError::CustomToken, "custom-token";
    custom_token_as_minted_by_admin_sdk: jws(
        json!({"alg": "RS256", "typ": "JWT"}),
        &claims_with(&[("aud", json!(CUSTOM_TOKEN_AUDIENCE)), ("iss", json!("svc@encore-test.iam.gserviceaccount.com")), ("uid", json!("alice"))]),
        &key_b().encoding,
        Algorithm::RS256,
    ) => AuthError::CustomToken, "custom-token";

    // iss.
    wrong_iss: rs256(key_a(), &claims_with(&[("iss", json!("https://securetoken.google.com/someone-else"))])) => AuthError::InvalidClaim { claim: "iss", .. }, "iss";
    session_cookie_iss: rs256(key_a(), &claims_with(&[("iss", json!("https://session.firebase.google.com/encore-test"))])) => AuthError::SessionCookie, "session-cookie";
    session_cookie_with_its_own_kid: jws(
        json!({"alg": "RS256", "kid": "session-cookie-kid"}),
        &claims_with(&[("iss", json!("https://session.firebase.google.com/encore-test"))]),
        &key_b().encoding,
        Algorithm::RS256,
    ) => AuthError::SessionCookie, "session-cookie";
    missing_iss: rs256(key_a(), &claims_with(&[("iss", Value::Null)])) => AuthError::InvalidClaim { claim: "iss", .. }, "iss";
    iss_with_trailing_slash: rs256(key_a(), &claims_with(&[("iss", json!(format!("{ISSUER}/")))])) => AuthError::InvalidClaim { claim: "iss", .. }, "iss";

    // sub.
    empty_sub: rs256(key_a(), &claims_with(&[("sub", json!(""))])) => AuthError::InvalidClaim { claim: "sub", .. }, "sub";
    sub_of_129_characters: rs256(key_a(), &claims_with(&[("sub", json!("u".repeat(129)))])) => AuthError::InvalidClaim { claim: "sub", .. }, "sub";
    numeric_sub: rs256(key_a(), &claims_with(&[("sub", json!(12345))])) => AuthError::InvalidClaim { claim: "sub", .. }, "sub";
    missing_sub: rs256(key_a(), &claims_with(&[("sub", Value::Null)])) => AuthError::InvalidClaim { claim: "sub", .. }, "sub";

    // Tenants (the fixture accepts no tenant).
    tenant_when_none_is_allowed: rs256(key_a(), &claims_with(&[("firebase", with_firebase("password", Some("tenant-1")))])) => AuthError::TenantMismatch(_), "tenant";
    firebase_claim_not_an_object: rs256(key_a(), &claims_with(&[("firebase", json!("password"))])) => AuthError::InvalidClaim { claim: "firebase", .. }, "firebase";
}

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

#[tokio::test]
async fn exp_equal_to_now_at_zero_skew() {
    let fixture = Fixture::with(&[key_a()], "max-age=3600", |s| s.skew_s = 0).await;
    let result = fixture.verify(&rs256(key_a(), &claims_with(&[("exp", json!(NOW))]))).await;
    assert!(matches!(result, Err(AuthError::Expired { exp: NOW, now: NOW, skew_s: 0 })), "{result:?}");
    // One second later than now is still valid at zero skew.
    let ok = fixture.verify(&rs256(key_a(), &claims_with(&[("exp", json!(NOW + 1))]))).await;
    assert!(ok.is_ok(), "{ok:?}");
}

#[tokio::test]
async fn iat_and_auth_time_one_second_in_future_at_zero_skew() {
    let fixture = Fixture::with(&[key_a()], "max-age=3600", |s| s.skew_s = 0).await;
    for claim in ["iat", "auth_time"] {
        let result = fixture.verify(&rs256(key_a(), &claims_with(&[(claim, json!(NOW + 1))]))).await;
        assert!(matches!(&result, Err(AuthError::InvalidClaim { claim: c, .. }) if *c == claim), "{claim}: {result:?}");
    }
}

#[tokio::test]
async fn wrong_tenant() {
    let fixture = Fixture::with(&[key_a()], "max-age=3600", |s| s.tenant = Some("tenant-1".into())).await;
    let token = rs256(key_a(), &claims_with(&[("firebase", with_firebase("password", Some("tenant-2")))]));
    let result = fixture.verify(&token).await;
    assert!(matches!(&result, Err(AuthError::TenantMismatch(m)) if m.contains("tenant-2")), "{result:?}");
    assert_eq!(result.unwrap_err().code(), "mismatching-tenant-id");
}

#[tokio::test]
async fn no_tenant_when_one_is_configured() {
    let fixture = Fixture::with(&[key_a()], "max-age=3600", |s| s.tenant = Some("tenant-1".into())).await;
    let result = fixture.verify(&valid_token()).await;
    assert!(matches!(result, Err(AuthError::TenantMismatch(_))), "{result:?}");
}

#[tokio::test]
async fn expired_token_has_the_admin_sdk_code() {
    let fixture = Fixture::new().await;
    let error = fixture.verify(&rs256(key_a(), &claims_with(&[("exp", json!(NOW - 3600))]))).await.unwrap_err();
    assert_eq!(error.code(), "id-token-expired");
    assert_eq!(error.status(), axum::http::StatusCode::UNAUTHORIZED);
    assert!(error.to_string().contains("expired"), "{error}");
}

// ---------------------------------------------------------------------------------------------
// Emulator mode

fn emulator(clock: &ManualClock) -> Verifier {
    Verifier::emulator(VerifierSettings::new(PROJECT), clock.shared())
}

#[tokio::test]
async fn emulator_accepts_unsigned_emulator_token() {
    let clock = ManualClock::at_secs(NOW);
    let claims = claims_with(&[("role", json!("speaker")), ("firebase", with_firebase("password", None))]);
    let user = emulator(&clock).verify(&unsigned(&claims)).await.expect("emulator token");
    assert_eq!(user.uid, "alice");
    assert_eq!(user.roles, vec![Role::Speaker]);
}

#[tokio::test]
async fn emulator_rejects_alg_none_with_a_signature() {
    let clock = ManualClock::at_secs(NOW);
    let token = format!("{}{}", unsigned(&claims()), URL_SAFE_NO_PAD.encode(b"not empty"));
    let result = emulator(&clock).verify(&token).await;
    assert!(matches!(result, Err(AuthError::NotAnEmulatorToken(_))), "{result:?}");
}

#[tokio::test]
async fn emulator_rejects_signed_rs256_token() {
    let clock = ManualClock::at_secs(NOW);
    let result = emulator(&clock).verify(&valid_token()).await;
    assert!(matches!(result, Err(AuthError::NotAnEmulatorToken(_))), "{result:?}");
}

#[tokio::test]
async fn emulator_still_checks_claims() {
    let clock = ManualClock::at_secs(NOW);
    let verifier = emulator(&clock);
    let cases: [(&str, Value, &str); 5] = [
        ("aud", json!("other-project"), "aud"),
        ("iss", json!("https://securetoken.google.com/other-project"), "iss"),
        ("sub", json!(""), "sub"),
        ("exp", json!(NOW - 3600), "exp"),
        ("iat", json!(NOW + 3600), "iat"),
    ];
    for (claim, value, check) in cases {
        let result = verifier.verify(&unsigned(&claims_with(&[(claim, value)]))).await;
        match result {
            Err(error) => assert_eq!(error.check(), check, "{claim}: {error}"),
            Ok(user) => panic!("{claim}: emulator accepted a bad claim for {}", user.uid),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Accept

#[tokio::test]
async fn accepts_valid_token_uid_is_sub() {
    let fixture = Fixture::new().await;
    let user = fixture.verify(&valid_token()).await.expect("valid token");
    assert_eq!(user.uid, "alice");
    assert_eq!(user.roles, vec![Role::Listener], "no role claim: the default");
    assert_eq!(user.email.as_deref(), Some("alice@example.com"));
    assert!(user.email_verified);
    assert_eq!(user.sign_in_provider.as_deref(), Some("password"));
    assert_eq!((user.issued_at, user.auth_time, user.expires_at), (NOW - 60, NOW - 300, NOW + 3540));
    assert_eq!(user.tenant, None);
}

#[tokio::test]
async fn accepts_128_character_sub() {
    let fixture = Fixture::new().await;
    let uid = "u".repeat(128);
    let user = fixture.verify(&rs256(key_a(), &claims_with(&[("sub", json!(uid))]))).await.expect("128-char sub");
    assert_eq!(user.uid, uid);
}

#[tokio::test]
async fn accepts_role_claim() {
    let fixture = Fixture::new().await;
    let user = fixture.verify(&rs256(key_a(), &claims_with(&[("role", json!("speaker"))]))).await.expect("role");
    assert_eq!(user.roles, vec![Role::Speaker]);
    assert!(user.may_publish());
    assert!(!user.may_moderate());
}

#[tokio::test]
async fn accepts_roles_array_merged_with_role() {
    let fixture = Fixture::new().await;
    let token = rs256(
        key_a(),
        &claims_with(&[("role", json!("speaker")), ("roles", json!(["moderator", "speaker", "wizard", 7]))]),
    );
    let user = fixture.verify(&token).await.expect("roles");
    assert_eq!(user.roles, vec![Role::Speaker, Role::Moderator], "unknown and non-string entries ignored");
    assert!(user.may_moderate());
}

#[tokio::test]
async fn unknown_role_falls_back_to_default() {
    let fixture = Fixture::with(&[key_a()], "max-age=3600", |s| s.default_role = Role::Speaker).await;
    let user = fixture.verify(&rs256(key_a(), &claims_with(&[("role", json!("superuser"))]))).await.expect("token");
    assert_eq!(user.roles, vec![Role::Speaker]);
}

#[tokio::test]
async fn accepts_admin_role() {
    let fixture = Fixture::new().await;
    let user = fixture.verify(&rs256(key_a(), &claims_with(&[("roles", json!(["admin"]))]))).await.expect("admin");
    assert_eq!(user.roles, vec![Role::Admin]);
    assert!(user.may_publish() && user.may_moderate());
}

#[tokio::test]
async fn accepts_sign_in_providers_password_anonymous_custom() {
    let fixture = Fixture::new().await;
    for provider in ["password", "anonymous", "custom"] {
        let mut claims = claims_with(&[("firebase", with_firebase(provider, None))]);
        if provider == "anonymous" {
            claims.remove("email");
            claims.remove("email_verified");
        }
        let user = fixture.verify(&rs256(key_a(), &claims)).await.unwrap_or_else(|e| panic!("{provider}: {e}"));
        assert_eq!(user.sign_in_provider.as_deref(), Some(provider));
    }
}

#[tokio::test]
async fn accepts_configured_tenant() {
    let fixture = Fixture::with(&[key_a()], "max-age=3600", |s| s.tenant = Some("tenant-1".into())).await;
    let token = rs256(key_a(), &claims_with(&[("firebase", with_firebase("password", Some("tenant-1")))]));
    let user = fixture.verify(&token).await.expect("tenant token");
    assert_eq!(user.tenant.as_deref(), Some("tenant-1"));
}

#[tokio::test]
async fn accepts_either_of_two_keys_in_the_map() {
    let fixture = Fixture::with(&[key_a(), key_b()], "max-age=3600", |_| {}).await;
    fixture.verify(&rs256(key_a(), &claims())).await.expect("key a");
    fixture.verify(&rs256(key_b(), &claims())).await.expect("key b");
    assert_eq!(fixture.server.fetches(), 1, "one fetch serves both keys");
}

#[tokio::test]
async fn accepts_times_inside_the_skew() {
    let fixture = Fixture::new().await; // skew 30 s
    let token = rs256(
        key_a(),
        &claims_with(&[("exp", json!(NOW - 29)), ("iat", json!(NOW + 30)), ("auth_time", json!(NOW + 30))]),
    );
    let user = fixture.verify(&token).await.expect("inside skew");
    assert_eq!(user.expires_at, NOW - 29);
}

#[tokio::test]
async fn accepts_new_kid_after_rotation() {
    // Keys cached for an hour; Google adds key B. A token signed with B arrives after the
    // unknown-kid interval: one refresh picks B up before the cache would have expired.
    let fixture = Fixture::new().await;
    fixture.verify(&rs256(key_a(), &claims())).await.expect("key a");
    fixture.server.set_x509(&[key_a(), key_b()]);
    fixture.clock.advance(std::time::Duration::from_secs(61));
    let user = fixture.verify(&rs256(key_b(), &claims())).await.expect("rotated-in key b");
    assert_eq!(user.uid, "alice");
    assert_eq!(fixture.server.fetches(), 2);
}

#[tokio::test]
async fn accepts_jwk_form() {
    let server = KeyServer::start(jwk_set(&[key_a(), key_b()]), "max-age=600").await;
    let fixture = Fixture::over(server, encore::auth::KeysFormat::Jwk, |_| {});
    fixture.verify(&rs256(key_a(), &claims())).await.expect("jwk key a");
    fixture.verify(&rs256(key_b(), &claims())).await.expect("jwk key b");
    let wrong = fixture.verify(&jws(header_a("RS256"), &claims(), &key_c().encoding, Algorithm::RS256)).await;
    assert!(matches!(wrong, Err(AuthError::BadSignature)), "{wrong:?}");
}
