//! Typed auth errors with Admin-SDK-like codes.
//!
//! Every rejection names the check that failed (`check()`), carries a code a client can branch on
//! (`code()`), and maps to an HTTP status (`status()`): 503 when no keys are available (the server,
//! not the token, is at fault), 401 for everything about the credential itself. No variant holds a
//! token, a signature or a ticket, so an error can always be logged and returned as it is.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Why a credential was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no credentials: send `Authorization: Bearer <Firebase ID token>`")]
    MissingAuthorization,

    #[error("Authorization header is not `Bearer <token>`: {0}")]
    BadAuthorization(&'static str),

    #[error("ID token is malformed: {0}")]
    Malformed(&'static str),

    #[error(
        "expected a Firebase ID token but was given a custom token; exchange it for an ID token \
         (signInWithCustomToken) first"
    )]
    CustomToken,

    #[error(
        "expected a Firebase ID token but was given a session cookie; session cookies are not \
         accepted here"
    )]
    SessionCookie,

    #[error("ID token is unsigned (alg \"none\"); unsigned tokens are accepted only in firebase-emulator mode")]
    UnsignedToken,

    #[error("ID token header alg is {0:?}; only RS256 is accepted")]
    WrongAlgorithm(String),

    #[error("firebase-emulator mode accepts only unsigned emulator tokens: {0}")]
    NotAnEmulatorToken(&'static str),

    #[error("ID token header has no usable \"kid\": {0}")]
    MissingKid(&'static str),

    #[error(
        "ID token \"kid\" {kid:?} does not match any current public key; the token is probably \
         stale, get a fresh one"
    )]
    UnknownKid { kid: String },

    #[error("ID token signature is invalid")]
    BadSignature,

    #[error("ID token claim \"{claim}\" is invalid: {reason}")]
    InvalidClaim { claim: &'static str, reason: String },

    #[error("ID token has expired (exp {exp} <= now {now} - skew {skew_s} s); get a fresh token")]
    Expired { exp: i64, now: i64, skew_s: u64 },

    #[error("ID token tenant does not match: {0}")]
    TenantMismatch(String),

    #[error("no public keys are available to verify ID tokens ({0}); try again shortly")]
    KeysUnavailable(String),

    #[error("WebSocket ticket is unknown, already used, or expired")]
    InvalidTicket,

    #[error("too many outstanding WebSocket tickets; try again shortly")]
    TicketsExhausted,

    /// A cluster ticket (from another node's `redirect`) cannot be checked: Redis is out.
    #[error("the cluster's ticket store is unreachable; try again shortly")]
    TicketStoreUnavailable,

    #[error(
        "this user holds {limit} unredeemed WebSocket tickets already (limits.tickets_per_user); use one or wait for them to expire"
    )]
    TooManyTickets { limit: usize },
}

impl AuthError {
    /// The machine-readable code, in the style of the Firebase Admin SDK's `auth/...` codes.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Expired { .. } => "id-token-expired",
            AuthError::TenantMismatch(_) => "mismatching-tenant-id",
            AuthError::KeysUnavailable(_) => "keys-unavailable",
            AuthError::InvalidTicket => "invalid-ticket",
            AuthError::TicketsExhausted => "tickets-exhausted",
            AuthError::TicketStoreUnavailable => "ticket-store-unavailable",
            AuthError::TooManyTickets { .. } => "too-many-tickets",
            // The Admin SDK reports every other verification failure as `argument-error`.
            _ => "argument-error",
        }
    }

    /// The check that failed, as a short stable name for logs and metrics.
    pub fn check(&self) -> &'static str {
        match self {
            AuthError::MissingAuthorization | AuthError::BadAuthorization(_) => "authorization-header",
            AuthError::Malformed(_) => "structure",
            AuthError::CustomToken => "custom-token",
            AuthError::SessionCookie => "session-cookie",
            AuthError::UnsignedToken | AuthError::WrongAlgorithm(_) => "alg",
            AuthError::NotAnEmulatorToken(_) => "emulator-token",
            AuthError::MissingKid(_) | AuthError::UnknownKid { .. } => "kid",
            AuthError::BadSignature => "signature",
            AuthError::InvalidClaim { claim, .. } => claim,
            AuthError::Expired { .. } => "exp",
            AuthError::TenantMismatch(_) => "tenant",
            AuthError::KeysUnavailable(_) => "keys",
            AuthError::InvalidTicket
            | AuthError::TicketsExhausted
            | AuthError::TooManyTickets { .. }
            | AuthError::TicketStoreUnavailable => "ticket",
        }
    }

    /// The HTTP status this error maps to.
    pub fn status(&self) -> StatusCode {
        match self {
            AuthError::KeysUnavailable(_) | AuthError::TicketsExhausted | AuthError::TicketStoreUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            AuthError::TooManyTickets { .. } => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    pub(crate) fn claim(claim: &'static str, reason: impl Into<String>) -> Self {
        AuthError::InvalidClaim { claim, reason: reason.into() }
    }
}

/// `{"error":{"code","message"}}`, with `WWW-Authenticate: Bearer` on a 401 (RFC 6750 §3) and
/// `Retry-After` on a 503 and a 429.
impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = json!({ "error": { "code": self.code(), "message": self.to_string() } });
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if status == StatusCode::UNAUTHORIZED {
            // No error attribute when no credential was offered at all (RFC 6750 §3.1).
            let challenge = match self {
                AuthError::MissingAuthorization => "Bearer realm=\"encore\"",
                _ => "Bearer realm=\"encore\", error=\"invalid_token\"",
            };
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        } else if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        } else if status == StatusCode::TOO_MANY_REQUESTS {
            // The longest a held ticket can take to expire.
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("30"));
        }
        response
    }
}

/// Attacker-controlled text (a `kid`, an `alg`, an `aud`) quoted in a message: cut to a length that
/// keeps messages and logs readable.
pub(crate) fn clip(text: &str) -> String {
    const MAX: usize = 64;
    if text.chars().count() <= MAX {
        text.to_owned()
    } else {
        let mut out: String = text.chars().take(MAX).collect();
        out.push('…');
        out
    }
}
