//! Replication of a room's speaker side to another engine (an edge node's): what crosses
//! from the origin's engine to a replica besides the inputs themselves.
//!
//! A replica consumes the origin's speaker-side inputs at the ticks the origin consumed them
//! ([`Input::is_speaker_side`](crate::input::Input::is_speaker_side)), so its voice detection
//! and segmentation see exactly what the origin's saw. Eviction is the one decision of the
//! speaker side that listeners influence (what is being played, what is still wanted), and a
//! replica has other listeners than its origin: so the origin's evict system writes down
//! each thing it removed as an [`EvictOrder`], and a replica's evict system applies the
//! origin's orders of the tick instead of choosing by its own listeners. The buffer, the
//! utterance ids and their start and end then stay the origin's. docs/scaling.md has the
//! whole design.

use std::collections::BTreeMap;

use bevy_ecs::prelude::Resource;
use serde::{Deserialize, Serialize};

use crate::ids::{Name, UtteranceId};

/// One removal the evict system made, in a form another engine in the same state applies
/// exactly. The serde form is the relay's wire form (docs/scaling.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum EvictOrder {
    /// The utterance went whole.
    Whole { utterance: UtteranceId },
    /// The oldest `audio` audio and `video` video packets of the utterance went.
    Trim { utterance: UtteranceId, audio: u32, video: u32 },
    /// The pre-roll ring of a silent audio track was emptied.
    PreRoll { track: Name },
}

/// The evict system's record of the tick and, on a replica, the origin's orders to apply.
#[derive(Resource, Clone, Debug, Default)]
pub struct Evictions {
    /// What this tick's eviction removed, in order (every engine keeps it: an origin does
    /// not know in advance that an edge will subscribe).
    pub made: Vec<EvictOrder>,
    /// `Some` on a replica: the origin's orders by the tick that made them. The evict
    /// system takes the current tick's and decides nothing itself while they suffice.
    pub replica: Option<BTreeMap<u64, Vec<EvictOrder>>>,
}
