//! The learning recommender's model: what each listener got from each speaker (a bandit arm
//! per speaker), the same summed over taste groups and over the room, and the room's verdicts
//! on each recent utterance. The learn system writes it; the recommend system reads it.
//!
//! Everything is an integer: rewards are in thousandths (a listen-through is worth 700, a like
//! 300 more, a skip what was heard before it, up to 350), counts are counts. Vectors are
//! indexed by our own ordinals (peer keys, speaker slots, group numbers), maps are ordered.

use std::collections::{BTreeMap, BTreeSet};

use bevy_ecs::prelude::Resource;
use smallvec::SmallVec;

use crate::ids::{PeerKey, UtteranceOrd};

/// The slot of a speaker in the model's vectors, given in the order speakers were first heard
/// of.
pub type SpeakerSlot = u32;

/// A taste group: 0 for listeners without a favourite yet, else 1 + the slot of the speaker
/// the group's listeners like best.
pub type Group = u32;

/// The rewards a listener (or a group, or the room) got from one speaker's utterances.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reward {
    /// Sum of the rewards, in thousandths.
    pub sum: u64,
    /// Utterances finished, skipped or muted (likes add reward, not trials).
    pub trials: u64,
}

impl Reward {
    pub fn add(&mut self, other: Reward) {
        self.sum += other.sum;
        self.trials += other.trials;
    }

    pub fn remove(&mut self, other: Reward) {
        self.sum = self.sum.saturating_sub(other.sum);
        self.trials = self.trials.saturating_sub(other.trials);
    }

    /// `self` without `other` (a total without one of its parts).
    pub fn without(self, other: Reward) -> Reward {
        Reward { sum: self.sum.saturating_sub(other.sum), trials: self.trials.saturating_sub(other.trials) }
    }
}

/// Rewards and their mean (with a prior), kept up to date as rewards come in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rated {
    pub reward: Reward,
    /// The mean reward per trial, in thousandths, with the prior's pseudo-trials.
    pub rate: i64,
}

/// One listener's model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListenerTaste {
    /// By speaker slot (shorter than the slot count: the rest are empty).
    pub by_speaker: Vec<Reward>,
    /// Its taste group; its rewards are part of that group's sums.
    pub group: Group,
    /// The utterance it plays, the group it was in when it started, and when (ms): its
    /// exposure is counted there until it stops.
    pub playing: Option<(UtteranceOrd, Group, u64)>,
}

impl ListenerTaste {
    pub fn reward(&self, slot: SpeakerSlot) -> Reward {
        self.by_speaker.get(slot as usize).copied().unwrap_or_default()
    }
}

/// Listeners' verdicts on one utterance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Verdicts {
    pub finished: u32,
    pub liked: u32,
    pub skipped: u32,
    /// Milliseconds of it heard by those who no longer play it.
    pub heard_ms: u64,
    /// Listeners playing it now, and the sum of the engine times (ms) at which they started:
    /// with `heard_ms`, its exposure at `now` is `heard_ms + playing * now - since_ms`, the
    /// time its skips are counted against.
    pub playing: u32,
    pub since_ms: u64,
}

impl Verdicts {
    /// Milliseconds heard by every listener so far, those still playing it included.
    pub fn exposure_ms(&self, now_ms: u64) -> u64 {
        (self.heard_ms + self.playing as u64 * now_ms).saturating_sub(self.since_ms)
    }
}

/// The verdicts on one utterance: everyone's, and each taste group's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UtteranceVerdicts {
    pub all: Verdicts,
    /// By group, sorted by group.
    pub by_group: SmallVec<[(Group, Verdicts); 4]>,
}

impl UtteranceVerdicts {
    pub fn group(&self, group: Group) -> Verdicts {
        match self.by_group.binary_search_by_key(&group, |(g, _)| *g) {
            Ok(i) => self.by_group[i].1,
            Err(_) => Verdicts::default(),
        }
    }

    pub fn group_mut(&mut self, group: Group) -> &mut Verdicts {
        let i = match self.by_group.binary_search_by_key(&group, |(g, _)| *g) {
            Ok(i) => i,
            Err(i) => {
                self.by_group.insert(i, (group, Verdicts::default()));
                i
            }
        };
        &mut self.by_group[i].1
    }
}

/// The learning recommender's model of the room.
#[derive(Resource, Clone, Debug, Default)]
pub struct Learner {
    /// Speaker slot by peer key (`None`: not heard of as a speaker).
    pub slots: Vec<Option<SpeakerSlot>>,
    /// Speakers with a slot.
    pub speakers: u32,
    /// By peer key.
    pub listeners: Vec<ListenerTaste>,
    /// By group, then speaker slot: the sum of the group's listeners' rewards (group 0, the
    /// listeners without a favourite, has none: the room stands for it).
    pub groups: Vec<Vec<Rated>>,
    /// By speaker slot: everyone's rewards.
    pub room: Vec<Rated>,
    /// The verdicts on recent utterances.
    pub utterances: BTreeMap<UtteranceOrd, UtteranceVerdicts>,
    /// Every skip and every millisecond heard of a finished or skipped utterance, in the room:
    /// the room's skip rate, which an utterance's is compared with.
    pub skips: u64,
    pub heard_ms: u64,
    /// Listeners whose group is to be looked at again, in key order.
    pub regroup: BTreeSet<PeerKey>,
    /// When the verdicts of utterances no longer in the buffer are next forgotten.
    pub next_prune_us: u64,
}

impl Learner {
    pub fn slot(&self, speaker: PeerKey) -> Option<SpeakerSlot> {
        self.slots.get(speaker.0 as usize).copied().flatten()
    }

    pub fn listener(&self, key: PeerKey) -> Option<&ListenerTaste> {
        self.listeners.get(key.0 as usize)
    }
}
