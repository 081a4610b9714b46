//! The `learn` policy: a score is the reward this listener is predicted to get from the
//! utterance (in thousandths: a listen-through is worth 700, a like 300 more), less the lag.
//! The learn system ([`crate::learn`]) keeps the model; here it is read.
//!
//! The terms:
//! - `room`: what listeners of the same taste group got from the speaker (the whole room's
//!   experience for a listener without a group yet), plus the verdicts of listeners on this
//!   very utterance, those of the same group counting double, at most `learn.utterance` either
//!   way: collaborative filtering over the room's listeners.
//! - `taste`: how the listener's own rewards from the speaker move that prediction (a
//!   Bayesian average: its own mean weighs as much as the group's after three utterances).
//! - `explore`: a draw from the engine's seeded source, up to `learn.explore` divided by the
//!   square root of one plus the utterances of this speaker the listener has judged: a
//!   perturbed-mean bandit over speakers, so that a speaker heard little is tried again.
//! - `follow`: `learn.follow` for a followed speaker.
//! - `lag`: minus `learn.lag_per_s` per second the listener would be behind live.
//!
//! Candidates are the utterances that started within `learn.max_lag_ms`; a decision scores
//! at most [`LIMIT`] of them, the freshest, and accepts nothing under `learn.accept_min`.

use encore_components::config::LearnConfig;
use encore_components::learner::{Group, Learner, Reward, SpeakerSlot, UtteranceVerdicts, Verdicts};
use encore_components::output::ScoreTerms;
use encore_components::resources::EngineRng;
use encore_components::utterance::Utterance;

use super::{Candidate, Listener, Scorer, per_second};
use crate::learn::{REWARD_MAX, estimate, rate};

/// Candidates scored per decision at most: the freshest (the lag term orders them).
pub const LIMIT: usize = 32;
/// Exploration caps are tabled for this many trials (beyond, computed).
const CAPS: usize = 64;

/// The listener-independent term: the lag.
pub fn terms(config: &LearnConfig, utterance: &Utterance, now_us: u64) -> ScoreTerms {
    ScoreTerms {
        lag: -per_second(config.lag_per_s, now_us.saturating_sub(utterance.started_us)),
        ..ScoreTerms::default()
    }
}

/// The learnt model, read for one pool of candidates.
pub struct Learned<'a> {
    config: &'a LearnConfig,
    learner: &'a Learner,
    rng: &'a EngineRng,
    tick: u64,
    /// By pool index: the speaker's slot and the verdicts on the utterance so far.
    slots: Vec<Option<SpeakerSlot>>,
    verdicts: Vec<Option<&'a UtteranceVerdicts>>,
    /// The exploration cap by trials.
    caps: [i64; CAPS],
}

/// `explore / sqrt(1 + trials)`.
fn explore_cap(explore: i64, trials: u64) -> i64 {
    let root_milli = (1_000_000u64.saturating_mul(trials.saturating_add(1))).isqrt().max(1) as i64;
    explore * 1000 / root_milli
}

impl<'a> Learned<'a> {
    pub fn new(
        config: &'a LearnConfig,
        learner: &'a Learner,
        rng: &'a EngineRng,
        tick: u64,
        pool: &[Candidate],
    ) -> Self {
        Learned {
            config,
            learner,
            rng,
            tick,
            slots: pool.iter().map(|c| learner.slot(c.speaker)).collect(),
            verdicts: pool.iter().map(|c| learner.utterances.get(&c.ord)).collect(),
            caps: std::array::from_fn(|trials| explore_cap(config.explore, trials as u64)),
        }
    }

    /// What listeners said of the utterance: group members' verdicts count double.
    fn verdict_term(&self, group: Group, verdicts: &UtteranceVerdicts) -> i64 {
        let mine = if group == 0 { Verdicts::default() } else { verdicts.group(group) };
        let all = verdicts.all;
        let positive = |v: Verdicts| v.finished as i64 + v.liked as i64;
        let pos = positive(all) + positive(mine);
        let neg = all.skipped as i64 + mine.skipped as i64;
        self.config.utterance * (pos - neg) / (pos + neg + 4)
    }

    fn explore(&self, listener: &Listener, candidate: &Candidate, trials: u64) -> i64 {
        let cap = match self.caps.get(trials as usize) {
            Some(cap) => *cap,
            None => explore_cap(self.config.explore, trials),
        };
        if cap <= 0 {
            return 0;
        }
        let draw = self.rng.keyed([self.tick, listener.key.0 as u64, candidate.ord.0]);
        (draw % (cap as u64 + 1)) as i64
    }
}

impl Scorer for Learned<'_> {
    fn bound(&self, listener: &Listener) -> i64 {
        let follows = listener.prefs.is_some_and(|p| !p.follow.is_empty());
        REWARD_MAX + self.config.utterance + self.config.explore + if follows { self.config.follow.max(0) } else { 0 }
    }

    fn personal(&self, listener: &Listener, index: usize, candidate: &Candidate, terms: &mut ScoreTerms) {
        if listener.follows(&candidate.speaker_name) {
            terms.follow = self.config.follow;
        }
        let taste = self.learner.listener(listener.key);
        let group = taste.map_or(0, |t| t.group);
        let (prior, own) = match self.slots[index] {
            Some(slot) => (rate(self.learner, group, slot), taste.map_or(Reward::default(), |t| t.reward(slot))),
            None => (rate(self.learner, 0, SpeakerSlot::MAX), Reward::default()),
        };
        terms.room = prior + self.verdicts[index].map_or(0, |v| self.verdict_term(group, v));
        terms.taste = estimate(own, prior) - prior;
        terms.explore = self.explore(listener, candidate, own.trials);
    }

    fn accept_min(&self) -> i64 {
        self.config.accept_min
    }

    fn limit(&self) -> usize {
        LIMIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recommend::best;
    use crate::recommend::tests::{Draws, full_scan};
    use encore_components::ids::PeerKey;
    use encore_components::learner::ListenerTaste;
    use encore_components::peer::Prefs;

    /// A model where listener 0 loved speaker 1 and group 2's listeners love speaker 3.
    fn model() -> Learner {
        let mut learner = Learner::default();
        for speaker in 0..5u32 {
            crate::learn::slot_for(&mut learner, PeerKey(speaker));
        }
        let taste = ListenerTaste {
            by_speaker: vec![Reward::default(), Reward { sum: 3000, trials: 3 }],
            ..ListenerTaste::default()
        };
        learner.listeners = vec![taste.clone(), taste];
        learner.listeners[1].by_speaker = vec![Reward { sum: 0, trials: 4 }];
        learner
    }

    #[test]
    fn explore_caps_shrink_with_the_square_root_of_trials() {
        assert_eq!(explore_cap(150, 0), 150);
        assert_eq!(explore_cap(150, 3), 75);
        assert_eq!(explore_cap(150, 99), 15);
    }

    #[test]
    fn own_rewards_move_the_prediction_and_the_terms_sum_to_the_score() {
        let learner = model();
        let config = LearnConfig { explore: 0, ..LearnConfig::default() };
        let rng = EngineRng::new(1);
        let mut draws = Draws(7);
        let pool = draws.pool();
        let scorer = Learned::new(&config, &learner, &rng, 0, &pool);
        let history = Default::default();
        let listener = Listener { key: PeerKey(0), prefs: None, affinity: None, history: &history };
        let index = pool.iter().position(|c| c.speaker == PeerKey(1)).unwrap();
        let mut terms = pool[index].terms;
        scorer.personal(&listener, index, &pool[index], &mut terms);
        assert_eq!(terms.room, 500, "nobody's rewards in the room yet: the prior");
        // Three utterances worth 1000 each against three pseudo-trials at 500: 750.
        assert_eq!(terms.taste, 250, "{terms:?}");
        assert_eq!(terms.total(), pool[index].base_total + terms.room + terms.taste);
    }

    /// The early stop and the limit never change the answer within the limit: against a full
    /// scan of the pools the limit lets through.
    #[test]
    fn the_bounded_scan_picks_what_a_full_scan_picks() {
        let learner = model();
        let config = LearnConfig::default();
        let rng = EngineRng::new(3);
        let mut draws = Draws(0xABCD);
        for round in 0..300 {
            let pool = draws.pool();
            let prefs: Prefs = draws.prefs();
            let history = draws.history();
            let listener =
                Listener { key: PeerKey(draws.next(3) as u32), prefs: Some(&prefs), affinity: None, history: &history };
            let scorer = Learned::new(&config, &learner, &rng, round, &pool);
            // The candidates a limit of LIMIT lets through: 20 per pool, all of them.
            assert!(pool.len() <= LIMIT);
            let fast = best(&scorer, &listener, &pool, &mut 0).map(|c| (c.score, c.id.to_string()));
            assert_eq!(fast, full_scan(&scorer, &listener, &pool), "round {round}");
        }
    }
}
