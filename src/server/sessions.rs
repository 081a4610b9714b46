//! The registry of open signaling sessions: who is connected, and a way to reach them.
//!
//! Sessions come and go at the edge, so they are held in a `slotmap`: a [`SessionKey`] is a
//! generational handle, and a key kept past its session's end (in a task that outlived it, say)
//! finds nothing rather than a newer session that took the same slot. Shutdown waits on the
//! count; anything that must reach a user's sessions (a role changed, a quota to check) finds
//! them by uid.

use std::sync::Mutex;
use std::time::Duration;

use slotmap::{SlotMap, new_key_type};
use tokio::sync::{mpsc, watch};

use crate::protocol::Notice;

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
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions { slots: Mutex::new(SlotMap::with_key()), open: watch::channel(0).0 }
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
