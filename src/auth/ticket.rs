//! Single-use WebSocket tickets.
//!
//! Browsers cannot set headers on a WebSocket, and an ID token must never travel in a URL (URLs end
//! up in logs and histories). So a browser first calls `POST /api/ws-ticket` with its bearer token
//! and gets a random, short-lived, single-use ticket; it puts that on the WSS URL, and the upgrade
//! redeems it for the [`AuthUser`] verified when the ticket was issued. A leaked ticket is worth
//! nothing once used or after 30 s.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tracing::debug;

use super::clock::SharedClock;
use super::error::AuthError;
use super::verify::AuthUser;

/// How long a ticket stays redeemable.
pub const WS_TICKET_TTL: Duration = Duration::from_secs(30);
/// Outstanding tickets beyond this are refused (memory bound under a flood of issues).
const MAX_OUTSTANDING: usize = 100_000;
/// Expired tickets are swept when the store grows past this.
const SWEEP_AT: usize = 1024;

/// A ticket as returned to the client.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuedTicket {
    pub ticket: String,
    /// Seconds until it can no longer be redeemed.
    pub expires_in: u64,
}

struct Pending {
    user: AuthUser,
    expires_ms: i64,
}

/// Issued, not yet redeemed tickets.
pub struct TicketStore {
    clock: SharedClock,
    ttl: Duration,
    pending: Mutex<HashMap<String, Pending>>,
}

impl std::fmt::Debug for TicketStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the tickets themselves.
        f.debug_struct("TicketStore").field("ttl", &self.ttl).field("outstanding", &self.lock().len()).finish()
    }
}

impl TicketStore {
    pub fn new(clock: SharedClock) -> Self {
        Self::with_ttl(clock, WS_TICKET_TTL)
    }

    pub fn with_ttl(clock: SharedClock, ttl: Duration) -> Self {
        TicketStore { clock, ttl, pending: Mutex::new(HashMap::new()) }
    }

    /// A new ticket standing for `user`.
    pub fn issue(&self, user: AuthUser) -> Result<IssuedTicket, AuthError> {
        let mut bytes = [0u8; 32];
        // 256 bits from the OS: unguessable, and the map lookup needs no constant-time compare.
        // Without OS randomness no ticket can be issued safely: a 503, like a full store.
        getrandom::fill(&mut bytes).map_err(|_| AuthError::TicketsExhausted)?;
        let ticket = URL_SAFE_NO_PAD.encode(bytes);
        let now = self.clock.now_ms();
        let expires_ms = now.saturating_add(i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX));
        let mut pending = self.lock();
        if pending.len() >= SWEEP_AT {
            pending.retain(|_, p| p.expires_ms > now);
        }
        if pending.len() >= MAX_OUTSTANDING {
            return Err(AuthError::TicketsExhausted);
        }
        debug!(uid = %user.uid, ttl_s = self.ttl.as_secs(), "WebSocket ticket issued");
        pending.insert(ticket.clone(), Pending { user, expires_ms });
        Ok(IssuedTicket { ticket, expires_in: self.ttl.as_secs() })
    }

    /// Redeem `ticket` once: the user it was issued for, or [`AuthError::InvalidTicket`] if it is
    /// unknown, already used, or expired. An expired ticket is consumed too.
    pub fn redeem(&self, ticket: &str) -> Result<AuthUser, AuthError> {
        let now = self.clock.now_ms();
        let taken = self.lock().remove(ticket);
        match taken {
            Some(p) if now < p.expires_ms => {
                debug!(uid = %p.user.uid, "WebSocket ticket redeemed");
                Ok(p.user)
            }
            Some(p) => {
                debug!(uid = %p.user.uid, "WebSocket ticket expired");
                Err(AuthError::InvalidTicket)
            }
            None => Err(AuthError::InvalidTicket),
        }
    }

    /// Tickets issued and not yet redeemed (expired ones included until swept).
    pub fn outstanding(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Pending>> {
        self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
