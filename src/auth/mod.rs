//! Authentication: Firebase ID tokens, verified as the Firebase Admin SDK does (and stricter), with
//! roles from custom claims.
//!
//! # Design
//!
//! - [`Verifier`] checks one token: structure, then refusal of the other Firebase credentials
//!   (custom tokens, session cookies), then the header (`alg` must be RS256, chosen by us and never
//!   by the token; `kid` required), the key, the RS256 signature (jsonwebtoken's crypto only), and
//!   every claim by hand: `aud` is the project id as a string, `iss` is
//!   `https://securetoken.google.com/<project>`, `sub` is 1..=128 characters, `exp`, `iat` and
//!   `auth_time` are integers inside a configurable skew, `firebase.tenant` matches. The output is
//!   an [`AuthUser`] with the uid and [`Role`]s from the `role`/`roles` claims.
//! - [`KeySource`] fetches the public keys (Google's X.509 map by default, a JWK set as an option)
//!   and caches them for their `Cache-Control: max-age`, with single-flight refresh, a bounded
//!   grace period on failed refreshes, and at most one refresh a minute on unknown `kid`s. With no
//!   keys at all, verification fails with [`AuthError::KeysUnavailable`] (HTTP 503).
//! - Three modes ([`AuthMode`]): `dev` (the server is its own Firebase-shaped issuer, see
//!   [`DevIssuer`], and verifies its tokens through the same HTTP key fetch as production),
//!   `firebase`, and `firebase-emulator` (unsigned emulator tokens, explicit config only).
//! - Time is injected ([`Clock`]), so expiry, key caching and tickets are tested without sleeping.
//! - Errors are typed ([`AuthError`]) with Admin-SDK-like codes, and no token, signature or ticket
//!   is ever logged or put in an error.
//! - Roles are managed as well as read: [`ClaimsAdmin`] sets and reads the `role` custom claim
//!   through the Identity Toolkit API as a service account (JWT-bearer grant, token cached), the
//!   Auth Emulator, or dev mode's role table ([`DevRoles`]). See `admin.rs`.
//!
//! # Mounting
//!
//! ```ignore
//! let auth = AuthState::new(config, AuthOptions { self_base_url: Some(url), ..Default::default() })?;
//! let app = Router::new()
//!     .route("/api/rooms", get(rooms))          // handlers take `user: AuthUser`
//!     .merge(encore::auth::router(auth.clone()))
//!     .with_state(ServerState { auth, .. });    // with `AuthState: FromRef<ServerState>`
//! // WebSocket upgrade: auth.authenticate_upgrade(&headers, query.ticket.as_deref()).await
//! ```
//!
//! See docs/auth.md for the modes, config keys, error codes and the ticket flow.

pub mod admin;
mod clock;
mod config;
pub mod dev;
mod error;
mod http;
pub mod keys;
mod state;
mod ticket;
mod verify;

pub use admin::{
    AccessToken, AdminError, ClaimsAdmin, FirebaseAdminOptions, RoleChange, ServiceAccount, ServiceAccountCredential,
    UserRoles, parse_role,
};
pub use clock::{Clock, ManualClock, SharedClock, SystemClock};
pub use config::{AuthConfig, AuthConfigError, AuthMode, DEFAULT_EMULATOR_HOST, KeysFormat, MAX_SKEW_S};
pub use dev::{DEV_KEY_FILE, DEV_PROJECT_ID, DEV_ROLES_FILE, DevIssuer, DevIssuerError, DevRoles};
pub use encore_systems::components::Role;
pub use error::AuthError;
pub use http::router;
pub use keys::{GOOGLE_JWK_URL, GOOGLE_X509_URL, KeySource, KeySourceError, KeySourceOptions};
pub use state::{AuthOptions, AuthSetupError, AuthState, ClientConfig, bearer_token};
pub use ticket::{IssuedTicket, TicketStore, WS_TICKET_TTL};
pub use verify::{
    AuthUser, CUSTOM_TOKEN_AUDIENCE, ID_TOKEN_ISSUER_PREFIX, MAX_UID_LEN, SESSION_COOKIE_ISSUER_PREFIX, Verifier,
    VerifierSettings,
};
