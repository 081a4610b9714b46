//! The registry of open signaling sessions: who is connected, and a way to reach them.
//!
//! Sessions come and go at the edge, so they are held in a `slotmap`: a [`SessionKey`] is a
//! generational handle, and a key kept past its session's end (in a task that outlived it, say)
//! finds nothing rather than a newer session that took the same slot. Shutdown waits on the
//! count; anything that must reach a user's sessions (a role changed, a quota to check) finds
//! them by uid.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use slotmap::{SlotMap, new_key_type};
use tokio::sync::{mpsc, watch};

use encore_systems::components::ids::Role;

use crate::protocol::Notice;

/// How long a role an admin set overrides the one in a user's older tokens: a Firebase ID
/// token lives an hour, plus the verifier's leeway.
const ROLE_OVERRIDE_S: i64 = 3600 + 300;

new_key_type! {
    /// A session's handle: valid while the session is open, never again after.
    pub struct SessionKey;
}

struct Entry {
    uid: String,
    notices: mpsc::Sender<Notice>,
}

/// Every open session.
pub struct Sessions {
    slots: Mutex<SlotMap<SessionKey, Entry>>,
    open: watch::Sender<usize>,
    /// Roles admins set, by uid, with when (Unix seconds): a token issued before still
    /// carries the old role, and must not bring it back.
    changed_roles: Mutex<BTreeMap<String, (Vec<Role>, i64)>>,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            slots: Mutex::new(SlotMap::with_key()),
            open: watch::channel(0).0,
            changed_roles: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Sessions {
    fn slots(&self) -> std::sync::MutexGuard<'_, SlotMap<SessionKey, Entry>> {
        // The map holds plain data: a panic elsewhere leaves it usable.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a session, unless `uid` holds `limit` sessions already (0: no limit); it
    /// stays registered until [`Sessions::close`]. The count and the insertion are one step,
    /// so two upgrades at once cannot both pass.
    pub fn try_open(&self, uid: &str, limit: usize, notices: mpsc::Sender<Notice>) -> Option<SessionKey> {
        let mut slots = self.slots();
        if limit != 0 && slots.values().filter(|entry| entry.uid == uid).count() >= limit {
            return None;
        }
        let key = slots.insert(Entry { uid: uid.to_owned(), notices });
        self.open.send_replace(slots.len());
        Some(key)
    }

    pub fn close(&self, key: SessionKey) {
        let mut slots = self.slots();
        slots.remove(key);
        self.open.send_replace(slots.len());
    }

    /// Sessions open now.
    pub fn count(&self) -> usize {
        self.slots().len()
    }

    /// The open sessions of one user.
    pub fn of_uid(&self, uid: &str) -> Vec<SessionKey> {
        self.slots().iter().filter(|(_, entry)| entry.uid == uid).map(|(key, _)| key).collect()
    }

    /// Queues a notice for a session; false when the session is gone (or its queue is full).
    pub fn notify(&self, key: SessionKey, notice: Notice) -> bool {
        let Some(sender) = self.slots().get(key).map(|entry| entry.notices.clone()) else { return false };
        sender.try_send(notice).is_ok()
    }

    /// An admin gave `uid`'s account `roles` at `now_s`: tokens issued until then carry the
    /// old roles, and [`Sessions::account_roles`] corrects them for as long as they can live.
    pub fn roles_changed(&self, uid: &str, roles: Vec<Role>, now_s: i64) {
        let mut changed = self.changed_roles.lock().unwrap_or_else(|p| p.into_inner());
        changed.retain(|_, (_, at)| *at > now_s - ROLE_OVERRIDE_S);
        changed.insert(uid.to_owned(), (roles, now_s));
    }

    /// The account roles of a token's holder: an admin's change made at or after the token
    /// was issued wins over the token's claim (the same second counts: the new token carries
    /// the new role anyway).
    pub fn account_roles(&self, uid: &str, token_roles: &[Role], issued_at_s: i64) -> Vec<Role> {
        let changed = self.changed_roles.lock().unwrap_or_else(|p| p.into_inner());
        match changed.get(uid) {
            Some((roles, at)) if issued_at_s <= *at => roles.clone(),
            _ => token_roles.to_vec(),
        }
    }

    /// Waits until every session has closed, at most `timeout`; true when they all did.
    pub async fn closed(&self, timeout: Duration) -> bool {
        let mut open = self.open.subscribe();
        tokio::time::timeout(timeout, open.wait_for(|n| *n == 0)).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_outliving_its_session_never_reaches_the_next_one_in_its_slot() {
        let sessions = Sessions::default();
        let (tx, mut rx) = mpsc::channel(4);
        let old = sessions.try_open("ann", 0, tx.clone()).unwrap();
        sessions.close(old);
        let new = sessions.try_open("bob", 0, tx).unwrap();
        assert!(!sessions.notify(old, Notice::Removed { by: "x".into() }), "the old key is stale");
        assert!(rx.try_recv().is_err());
        assert!(sessions.notify(new, Notice::Removed { by: "x".into() }));
        assert_eq!(sessions.of_uid("bob"), vec![new]);
        assert!(sessions.of_uid("ann").is_empty());
        assert_eq!(sessions.count(), 1);
    }

    #[test]
    fn an_admins_role_change_wins_over_tokens_issued_before_it_only() {
        let sessions = Sessions::default();
        let token = [Role::Speaker];
        assert_eq!(sessions.account_roles("ann", &token, 100), vec![Role::Speaker]);
        sessions.roles_changed("ann", vec![Role::Listener], 200);
        assert_eq!(sessions.account_roles("ann", &token, 150), vec![Role::Listener], "an older token");
        assert_eq!(sessions.account_roles("ann", &token, 200), vec![Role::Listener], "the same second");
        assert_eq!(sessions.account_roles("ann", &token, 201), vec![Role::Speaker], "a newer token says");
        assert_eq!(sessions.account_roles("bob", &token, 150), vec![Role::Speaker], "per user");
        // An hour and more later, old tokens are dead: the change is forgotten.
        sessions.roles_changed("bob", vec![Role::Admin], 200 + ROLE_OVERRIDE_S);
        assert_eq!(sessions.account_roles("ann", &token, 150), vec![Role::Speaker]);
    }

    #[test]
    fn a_user_at_its_limit_gets_no_more_sessions_until_one_closes() {
        let sessions = Sessions::default();
        let (tx, _rx) = mpsc::channel(4);
        let first = sessions.try_open("ann", 2, tx.clone()).expect("one");
        sessions.try_open("ann", 2, tx.clone()).expect("two");
        assert!(sessions.try_open("ann", 2, tx.clone()).is_none(), "three is over the limit");
        assert!(sessions.try_open("bob", 2, tx.clone()).is_some(), "the limit is per user");
        sessions.close(first);
        assert!(sessions.try_open("ann", 2, tx.clone()).is_some());
        assert!(sessions.try_open("ann", 0, tx).is_some(), "0 is no limit");
    }
}
