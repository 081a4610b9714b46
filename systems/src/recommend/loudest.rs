//! The `loudest` policy, a baseline: what an SFU that follows the active speaker gives (as
//! apps do with mediasoup's ActiveSpeakerObserver or Janus's talking events). Only live
//! utterances are candidates; the dominant speaker's (from the dominant-speaker system)
//! scores `dominant` (2000) more than the others, which rank by `lag` as under `rules`. A
//! busy listener switches to the dominant speaker's utterance when one opens or when the
//! dominant speaker changes (its present score, not the one it was chosen with, is what a
//! new choice must beat by 1000).

use bevy_ecs::prelude::{Entity, Query};

use encore_components::config::RecommenderConfig;
use encore_components::ids::UtteranceOrd;
use encore_components::output::ScoreTerms;
use encore_components::resources::{Directory, Dominance};
use encore_components::utterance::{PacketBuffer, Utterance};

use super::{Candidate, Listener, Scorer, per_second};

/// The dominant speaker's bonus.
pub const DOMINANT: i64 = 2000;
/// What a new choice must beat the present score of what a busy listener plays by.
pub const SWITCH_MARGIN: i64 = 1000;

/// Live utterances only: `base`, `dominant` for the dominant speaker's, and `lag`.
pub fn terms(
    config: &RecommenderConfig,
    dominance: &Dominance,
    utterance: &Utterance,
    now_us: u64,
) -> Option<ScoreTerms> {
    utterance.is_open().then(|| score_terms(config, dominance, utterance, now_us))
}

fn score_terms(config: &RecommenderConfig, dominance: &Dominance, utterance: &Utterance, now_us: u64) -> ScoreTerms {
    let dominant = dominance.speaker.as_ref().is_some_and(|(key, _)| *key == utterance.speaker);
    ScoreTerms {
        base: config.base,
        dominant: if dominant { DOMINANT } else { 0 },
        lag: -per_second(config.lag_per_s, now_us.saturating_sub(utterance.started_us)),
        ..ScoreTerms::default()
    }
}

/// The present score of an utterance a listener plays (live or not).
pub fn rescore(config: &RecommenderConfig, dominance: &Dominance, utterance: &Utterance, now_us: u64) -> i64 {
    score_terms(config, dominance, utterance, now_us).total()
}

/// Adds the dominant speaker's open utterances that are not there yet (it changed this tick).
pub fn add_dominant_utterances(
    dominance: &Dominance,
    directory: &Directory,
    utterances: &Query<(&Utterance, &PacketBuffer)>,
    fresh: &mut Vec<Candidate>,
    candidate: impl Fn(&UtteranceOrd, &Entity) -> Option<Candidate>,
) {
    let Some((speaker, _)) = &dominance.speaker else { return };
    // Open utterances are among the newest: one per track at most.
    for (ord, entity) in directory.utterances.iter().rev().take(directory.tracks.len().max(1) * 4) {
        let Ok((utterance, _)) = utterances.get(*entity) else { continue };
        if utterance.speaker == *speaker
            && utterance.is_open()
            && !fresh.iter().any(|c| c.ord == *ord)
            && let Some(c) = candidate(ord, entity)
        {
            fresh.push(c);
        }
    }
}

/// No term of the listener's own.
pub struct Loudest<'a> {
    pub config: &'a RecommenderConfig,
}

impl Scorer for Loudest<'_> {
    fn bound(&self, _: &Listener) -> i64 {
        0
    }

    fn personal(&self, _: &Listener, _: usize, _: &Candidate, _: &mut ScoreTerms) {}

    fn accept_min(&self) -> i64 {
        self.config.accept_min
    }
}

#[cfg(test)]
mod tests {
    use encore_components::config::{EngineConfig, Policy};
    use encore_components::output::RouteReason;

    use crate::testkit::{Room, routes};

    #[test]
    fn listeners_follow_the_dominant_speaker_live_and_never_hear_the_past() {
        let mut config = EngineConfig::default();
        config.recommender.policy = Policy::Loudest;
        let mut room = Room::new(config);
        room.speaker("alice", "a1");
        room.speaker("bob", "b1");
        room.listener("lena");
        // Alice talks; bob starts while she still talks, then talks on alone.
        room.sound("a1", 0, 200_000, 95);
        room.talk("a1", 200_000, 2_500_000);
        room.sound("a1", 2_500_000, 8_000_000, 95);
        room.sound("b1", 0, 1_500_000, 95);
        room.talk("b1", 1_500_000, 4_500_000);
        room.sound("b1", 4_500_000, 8_000_000, 95);
        let trace = room.run_until(8_000_000);
        let lena: Vec<_> = routes(&trace, "lena").into_iter().map(|(_, _, to, reason)| (to, reason)).collect();
        let some = |id: &str| Some(id.to_owned());
        assert_eq!(lena[0], (some("alice#1"), RouteReason::NewUtterance), "{lena:?}");
        // Bob takes over the room, and lena is switched to him, live, at alice's next pause.
        assert_eq!(lena[1], (some("bob#1"), RouteReason::SwitchAtPause), "{lena:?}");
        assert_eq!(lena.len(), 3, "alice#1 is never resumed: {lena:?}");
        assert_eq!(lena[2], (None, RouteReason::Finished));
    }
}
