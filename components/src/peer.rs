//! The Peer entity: one per client in the room.

use std::collections::{BTreeMap, BTreeSet};

use bevy_ecs::prelude::{Component, Entity};
use smallvec::SmallVec;

use crate::ids::{Name, PeerKey, Role};

#[derive(Component, Clone, Debug)]
pub struct Peer {
    pub key: PeerKey,
    pub name: Name,
    /// Firebase uid, when the peer signed in.
    pub uid: Option<String>,
    pub roles: SmallVec<[Role; 2]>,
    /// Tracks it publishes, in publish order.
    pub tracks: SmallVec<[Entity; 2]>,
    /// Its listener session while it listens.
    pub session: Option<Entity>,
}

impl Peer {
    pub fn may_publish(&self) -> bool {
        self.roles.iter().any(|role| role.may_publish())
    }

    pub fn may_listen(&self) -> bool {
        self.roles.iter().any(|role| role.may_listen())
    }
}

/// Whom the peer follows and mutes, by name (a followed peer may join later).
#[derive(Component, Clone, Debug, Default)]
pub struct Prefs {
    pub follow: BTreeSet<Name>,
    pub mute: BTreeSet<Name>,
}

/// Affinity to speakers learnt from feedback (likes raise it, skips lower it).
#[derive(Component, Clone, Debug, Default)]
pub struct Affinity {
    pub by_speaker: BTreeMap<Name, i64>,
}
