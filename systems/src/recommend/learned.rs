//! The `learn` policy: a score is the reward this listener is predicted to get from the
//! utterance (in thousandths: a listen-through is worth 700, a like 300 more), less the lag.
//! The learn system ([`crate::learn`]) keeps the model; here it is read.
//!
//! The terms:
//! - `room`: what listeners of the same taste group got from the speaker (the whole room's
//!   experience for a listener without a group yet), plus the verdict of listeners on this
//!   very utterance: how fast they skipped it against the room's skip rate, those of the same
//!   group counting double, at most `learn.utterance` either way: collaborative filtering over
//!   the room's listeners.
//! - `taste`: how the listener's own rewards from the speaker move that prediction (a
//!   Bayesian average: its own mean weighs as much as the group's after three utterances).
//! - `explore`: a draw from the engine's seeded source, one per listener, utterance and
//!   number of the speaker's utterances the listener judged, up to `learn.explore` divided by the
//!   square root of one plus the utterances of this speaker the listener has judged: a
//!   perturbed-mean bandit over speakers, so that a speaker heard little is tried again.
//! - `follow`: `learn.follow` for a followed speaker.
//! - `lag`: minus `learn.lag_per_s` per second the listener would be behind live.
//!
//! Candidates are the utterances that started within `learn.max_lag_ms`; a decision scores
//! at most `learn.candidates` of them, the freshest, and accepts nothing under `learn.accept_min`.

use encore_components::config::LearnConfig;
use encore_components::learner::{Group, Learner, Reward, SpeakerSlot, UtteranceVerdicts};
use encore_components::output::ScoreTerms;
use encore_components::resources::{EngineClock, EngineRng};
use encore_components::utterance::Utterance;

use super::{Candidate, Listener, Scorer, per_second};
use crate::learn::{REWARD_MAX, estimate, rate};

/// Names the exploration draws among the engine's keyed draws.
const EXPLORE_DRAW: u64 = 0x6578_706C_6F72_6500;

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
    now_ms: u64,
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
        clock: &EngineClock,
        pool: &[Candidate],
    ) -> Self {
        Learned {
            config,
            learner,
            rng,
            now_ms: clock.now_us / 1000,
            slots: pool.iter().map(|c| learner.slot(c.speaker)).collect(),
            verdicts: pool.iter().map(|c| learner.utterances.get(&c.ord)).collect(),
            caps: std::array::from_fn(|trials| explore_cap(config.explore, trials as u64)),
        }
    }

    /// What listeners said of the utterance: how fast they skipped it (skips per second heard)
    /// against the room's rate, group members counting double. Rates, not shares of listeners
    /// who finished: a short utterance is finished more often without being any better.
    fn verdict_term(&self, group: Group, verdicts: &UtteranceVerdicts) -> i64 {
        let room_heard_ms = self.learner.heard_ms;
        verdict_term(self.config.utterance, self.learner.skips, room_heard_ms, group, verdicts, self.now_ms)
    }

    /// What listeners of the listener's group got from the candidate's speaker (the prior),
    /// and what the listener itself got.
    fn prior_and_own(&self, listener: &Listener, index: usize) -> (i64, Reward) {
        let taste = self.learner.listener(listener.key);
        let group = taste.map_or(0, |t| t.group);
        match self.slots[index] {
            Some(slot) => (rate(self.learner, group, slot), taste.map_or(Reward::default(), |t| t.reward(slot))),
            None => (rate(self.learner, 0, SpeakerSlot::MAX), Reward::default()),
        }
    }

    fn explore_cap(&self, trials: u64) -> i64 {
        match self.caps.get(trials as usize) {
            Some(cap) => *cap,
            None => explore_cap(self.config.explore, trials),
        }
    }

    fn explore(&self, listener: &Listener, candidate: &Candidate, trials: u64) -> i64 {
        let cap = self.explore_cap(trials);
        if cap <= 0 {
            return 0;
        }
        // One draw per listener and utterance, drawn anew once the listener has judged
        // another utterance of the speaker: a decision does not flip between near-equal
        // candidates from one tick to the next, and what a listener will hear next can be
        // told before the decision ([`crate::up_next`]).
        let draw = self.rng.keyed([EXPLORE_DRAW ^ trials, listener.key.0 as u64, candidate.ord.0]);
        // Uniform in 0..=cap from the draw's top 32 bits, by a multiplication (no division).
        (((draw >> 32) * (cap as u64 + 1)) >> 32) as i64
    }
}

/// Exposure, in milliseconds, that an utterance is given at the room's skip rate before its
/// own verdicts count (a prior): two seconds.
pub const VERDICT_PRIOR_MS: u128 = 2_000;

/// `utterance * (H - h) / (H + h)`, `H` the room's skips per millisecond heard, `h` the
/// utterance's with [`VERDICT_PRIOR_MS`] at `H`: within `±utterance`, 0 when the utterance is
/// skipped as fast as the room's average, positive when more slowly.
pub fn verdict_term(
    utterance: i64,
    room_skips: u64,
    room_heard_ms: u64,
    group: Group,
    verdicts: &UtteranceVerdicts,
    now_ms: u64,
) -> i64 {
    let mine = if group == 0 { verdicts.all } else { verdicts.group(group) };
    let skips = mine.skipped as u128;
    let heard = mine.exposure_ms(now_ms) as u128;
    let (room_skips, room_heard) = (room_skips as u128, room_heard_ms.max(1) as u128);
    // H - h and H + h over a common denominator: (Rk e - k Re) and (Rk e + 2 Rk P + k Re).
    let (plus, minus) = (room_skips * heard, skips * room_heard);
    let sum = plus + 2 * room_skips * VERDICT_PRIOR_MS + minus;
    if sum == 0 {
        return 0;
    }
    // Both scaled to 32 bits, so that the division is a 64-bit one.
    let shift = (128 - sum.leading_zeros()).saturating_sub(32);
    let difference = (plus >> shift) as i64 - (minus >> shift) as i64;
    utterance * difference / ((sum >> shift) as i64).max(1)
}

impl Scorer for Learned<'_> {
    fn bound(&self, listener: &Listener) -> i64 {
        let follows = listener.prefs.is_some_and(|p| !p.follow.is_empty());
        REWARD_MAX + self.config.utterance + self.config.explore + if follows { self.config.follow.max(0) } else { 0 }
    }

    /// The listener's terms with the verdict and the exploration at their largest: the
    /// estimate from the same model, without the draw.
    fn bound_on(&self, listener: &Listener, index: usize, candidate: &Candidate) -> i64 {
        let (prior, own) = self.prior_and_own(listener, index);
        let verdict = if self.verdicts[index].is_some() { self.config.utterance } else { 0 };
        let explore = self.explore_cap(own.trials).max(0);
        let follow = if listener.follows(&candidate.speaker_name) { self.config.follow.max(0) } else { 0 };
        estimate(own, prior) + verdict + explore + follow
    }

    fn personal(&self, listener: &Listener, index: usize, candidate: &Candidate, terms: &mut ScoreTerms) {
        if listener.follows(&candidate.speaker_name) {
            terms.follow = self.config.follow;
        }
        let (prior, own) = self.prior_and_own(listener, index);
        let group = self.learner.listener(listener.key).map_or(0, |t| t.group);
        terms.room = prior + self.verdicts[index].map_or(0, |v| self.verdict_term(group, v));
        terms.taste = estimate(own, prior) - prior;
        terms.explore = self.explore(listener, candidate, own.trials);
    }

    fn accept_min(&self) -> i64 {
        self.config.accept_min
    }

    fn limit(&self) -> usize {
        self.config.candidates
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recommend::tests::{Draws, full_scan};
    use crate::recommend::{best, ranked};
    use encore_components::ids::PeerKey;
    use encore_components::learner::{ListenerTaste, Verdicts};
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
    fn an_utterance_skipped_faster_than_the_room_loses_and_a_short_one_gains_nothing_for_being_short() {
        let verdicts = |finished: u32, skipped: u32, heard_ms: u64| UtteranceVerdicts {
            all: Verdicts { finished, skipped, heard_ms, ..Verdicts::default() },
            ..UtteranceVerdicts::default()
        };
        // The room: one skip per 10 s heard.
        let term = |v: &UtteranceVerdicts| verdict_term(300, 100, 1_000_000, 0, v, 0);
        assert_eq!(term(&verdicts(0, 0, 0)), 0, "nothing known: nothing");
        assert!(term(&verdicts(0, 5, 5_000)) < -200, "skipped at once by five");
        // Ten listeners finished a 1 s utterance, ten a 4 s one: neither was skipped, the long
        // one was heard longer without a skip, so it is the better bet.
        let short = term(&verdicts(10, 0, 10_000));
        let long = term(&verdicts(10, 0, 40_000));
        assert!(0 < short && short < long, "{short} {long}");
        assert!(term(&verdicts(0, 0, 1_000_000_000)) <= 300);
        assert_eq!(verdict_term(300, 0, 0, 0, &verdicts(3, 0, 3_000), 0), 0, "no skip in the room yet");
        // Listeners still playing it count for what they heard so far.
        let playing = UtteranceVerdicts {
            all: Verdicts { playing: 10, since_ms: 10 * 1_000, ..Verdicts::default() },
            ..UtteranceVerdicts::default()
        };
        assert_eq!(verdict_term(300, 100, 1_000_000, 0, &playing, 5_000), term(&verdicts(0, 0, 40_000)));
    }

    #[test]
    fn a_listener_who_skips_a_speaker_is_offered_another_first() {
        use crate::testkit::{Room, routes};
        use encore_components::config::EngineConfig;
        use encore_components::input::{FeedbackSignal, Input};
        use encore_components::output::RouteReason;

        let mut config = EngineConfig::default();
        config.recommender.policy = encore_components::config::Policy::Learn;
        let mut room = Room::new(config);
        room.speaker("alice", "a1");
        room.speaker("bob", "b1");
        room.listener("lena");
        let skip = |at| (at, Input::Feedback { peer: "lena".into(), utterance: None, signal: FeedbackSignal::Skip });
        room.talk("a1", 0, 1_000_000);
        let (at, input) = skip(500_000);
        room.push(at, input);
        room.talk("a1", 2_000_000, 3_000_000);
        let (at, input) = skip(2_500_000);
        room.push(at, input);
        // Both start together: lena, idle, takes bob's.
        room.talk("a1", 5_000_000, 6_000_000);
        room.talk("b1", 5_000_000, 6_000_000);
        let trace = room.run_until(6_500_000);
        let lena: Vec<_> = routes(&trace, "lena").into_iter().map(|(_, _, to, reason)| (to, reason)).collect();
        let some = |id: &str| Some(id.to_owned());
        assert_eq!(
            lena,
            vec![
                (some("alice#1"), RouteReason::NewUtterance),
                (None, RouteReason::Skip),
                (some("alice#2"), RouteReason::NewUtterance),
                (None, RouteReason::Skip),
                (some("bob#1"), RouteReason::NewUtterance),
                // And alice#3, now behind live too, is not worth it.
                (None, RouteReason::Finished),
            ]
        );
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
        let scorer = Learned::new(&config, &learner, &rng, &EngineClock::default(), &pool);
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
        // A limit over the pools' 20, so that the full scan sees what the bounded one may.
        let config = LearnConfig { candidates: 32, ..LearnConfig::default() };
        let rng = EngineRng::new(3);
        let mut draws = Draws(0xABCD);
        for round in 0..300 {
            let pool = draws.pool();
            let prefs: Prefs = draws.prefs();
            let history = draws.history();
            let listener =
                Listener { key: PeerKey(draws.next(3) as u32), prefs: Some(&prefs), affinity: None, history: &history };
            let clock = EngineClock { tick: round, ..EngineClock::default() };
            let scorer = Learned::new(&config, &learner, &rng, &clock, &pool);
            // The limit lets every candidate of these pools through: 20 each.
            assert!(pool.len() <= config.candidates);
            let fast = best(&scorer, &listener, &pool, &mut 0).map(|c| (c.score, c.id.to_string()));
            assert_eq!(fast, full_scan(&scorer, &listener, &pool), "round {round}");
            // The head of the ranking (the listener's queue of what comes next) is that choice.
            let head = ranked(&scorer, &listener, &pool, &[], 3).first().map(|c| (c.score, c.id.to_string()));
            assert_eq!(head, fast, "round {round}");
            // The bound on one candidate holds what scoring it adds, within the general bound.
            for (index, candidate) in pool.iter().enumerate() {
                let mut terms = candidate.terms;
                scorer.personal(&listener, index, candidate, &mut terms);
                let own = terms.total() - candidate.base_total;
                let bound = scorer.bound_on(&listener, index, candidate);
                assert!(own <= bound && bound <= scorer.bound(&listener), "round {round}: {own} {bound}");
            }
        }
    }
}
