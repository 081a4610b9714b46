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

/// The tickets, and how many each user holds (to refuse a user past its limit without a scan).
#[derive(Default)]
struct Tickets {
    pending: HashMap<String, Pending>,
    per_uid: HashMap<String, usize>,
}

impl Tickets {
    fn insert(&mut self, ticket: String, pending: Pending) {
        *self.per_uid.entry(pending.user.uid.clone()).or_insert(0) += 1;
        self.pending.insert(ticket, pending);
    }

    fn remove(&mut self, ticket: &str) -> Option<Pending> {
        let pending = self.pending.remove(ticket)?;
        self.uncount(&pending.user.uid);
        Some(pending)
    }

    fn uncount(&mut self, uid: &str) {
        if let Some(count) = self.per_uid.get_mut(uid) {
            *count -= 1;
            if *count == 0 {
                self.per_uid.remove(uid);
            }
        }
    }

    /// Drops the expired tickets.
    fn sweep(&mut self, now_ms: i64) {
        let expired: Vec<String> =
            self.pending.iter().filter(|(_, p)| p.expires_ms <= now_ms).map(|(t, _)| t.clone()).collect();
        for ticket in expired {
            self.remove(&ticket);
        }
    }

    fn held_by(&self, uid: &str) -> usize {
        self.per_uid.get(uid).copied().unwrap_or(0)
    }
}

/// Issued, not yet redeemed tickets.
pub struct TicketStore {
    clock: SharedClock,
    ttl: Duration,
    /// Unredeemed tickets one user may hold (0: no limit).
    per_user: usize,
    tickets: Mutex<Tickets>,
}

impl std::fmt::Debug for TicketStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the tickets themselves.
        f.debug_struct("TicketStore").field("ttl", &self.ttl).field("outstanding", &self.lock().pending.len()).finish()
    }
}

impl TicketStore {
    /// Tickets that live [`WS_TICKET_TTL`], at most `per_user` unredeemed per user (0: no limit).
    pub fn new(clock: SharedClock, per_user: usize) -> Self {
        Self::with_ttl(clock, WS_TICKET_TTL, per_user)
    }

    pub fn with_ttl(clock: SharedClock, ttl: Duration, per_user: usize) -> Self {
        TicketStore { clock, ttl, per_user, tickets: Mutex::new(Tickets::default()) }
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
        let mut tickets = self.lock();
        if tickets.pending.len() >= SWEEP_AT {
            tickets.sweep(now);
        }
        if self.per_user != 0 && tickets.held_by(&user.uid) >= self.per_user {
            // Some may have expired unswept: look again after a sweep (only a user at its
            // limit pays for it).
            tickets.sweep(now);
            if tickets.held_by(&user.uid) >= self.per_user {
                crate::metrics::quota_refused(crate::metrics::Quota::Tickets);
                return Err(AuthError::TooManyTickets { limit: self.per_user });
            }
        }
        if tickets.pending.len() >= MAX_OUTSTANDING {
            return Err(AuthError::TicketsExhausted);
        }
        debug!(uid = %user.uid, ttl_s = self.ttl.as_secs(), "WebSocket ticket issued");
        tickets.insert(ticket.clone(), Pending { user, expires_ms });
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
        self.lock().pending.len()
    }

    fn lock(&self) -> MutexGuard<'_, Tickets> {
        self.tickets.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::clock::ManualClock;

    fn user(uid: &str) -> AuthUser {
        AuthUser {
            uid: uid.to_owned(),
            roles: vec![crate::auth::Role::Listener],
            email: None,
            email_verified: false,
            name: None,
            sign_in_provider: None,
            tenant: None,
            issued_at: 0,
            auth_time: 0,
            expires_at: 0,
        }
    }

    #[test]
    fn a_user_holds_at_most_its_limit_of_unredeemed_tickets() {
        let clock = ManualClock::at_secs(1_000);
        let store = TicketStore::with_ttl(clock.shared(), Duration::from_secs(30), 3);
        let tickets: Vec<IssuedTicket> = (0..3).map(|_| store.issue(user("ann")).expect("under the limit")).collect();
        let refused = store.issue(user("ann")).unwrap_err();
        assert!(matches!(refused, AuthError::TooManyTickets { limit: 3 }), "{refused:?}");
        assert_eq!(refused.status(), axum::http::StatusCode::TOO_MANY_REQUESTS);
        store.issue(user("bob")).expect("the limit is per user");
        // Redeeming one frees its place; so does expiry.
        store.redeem(&tickets[0].ticket).expect("redeemed");
        store.issue(user("ann")).expect("a place was freed");
        assert!(store.issue(user("ann")).is_err());
        clock.advance(Duration::from_secs(31));
        store.issue(user("ann")).expect("the old ones expired");
        assert_eq!(store.outstanding(), 1, "expired tickets were swept");
    }
}
