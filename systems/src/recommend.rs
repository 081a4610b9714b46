//! System 6, recommend: picks what each listener that needs a decision should hear.
//!
//! A listener needs a decision when it subscribed, finished its utterance (play-out notices
//! when it sends the last packet of a closed utterance; this system when an utterance
//! closes after its listeners caught up), skipped it, lost
//! it to eviction, muted its speaker, changed preferences or gave feedback while idle (a
//! *full* decision over every candidate), or when an utterance opened this tick (a decision
//! over the new utterances only: an idle listener has already turned the older ones down).
//! Under the `loudest` policy a change of dominant speaker also offers the dominant speaker's
//! open utterance to everyone, as an utterance that opened. Everyone else costs nothing this
//! tick.
//!
//! A candidate's score is a sum of named integer terms ([`ScoreTerms`]), some the same for
//! every listener (computed once per tick, and the order in which candidates are scanned),
//! some the listener's own. `recommender.policy` says which:
//!
//! - `rules`: `base`; `follow` when the listener follows the speaker;
//!   `affinity` learnt from likes and skips; `live` while the speaker still talks; `lag`,
//!   minus `lag_per_s` per second the listener would be behind live; `freshness`, minus
//!   `freshness_per_s` per second since it ended; `blip`, minus `blip` for a finished
//!   utterance shorter than `blip_ms`.
//! - `fifo` ([`fifo`]): the oldest unheard utterance first; a busy listener never switches.
//! - `loudest` ([`loudest`]): the dominant speaker's live utterance, else the freshest live one.
//! - `learn` ([`learned`], the default): the reward predicted by the learn system's model, less the lag.
//!
//! Muted speakers, the listener's own voice and what it has heard are never candidates. Higher
//! scores win; ties go to the smaller utterance id. Candidates are the `max_candidates`
//! newest utterances that started within `window_ms` (for `learn`, within `learn.max_lag_ms`).

pub mod fifo;
pub mod learned;
pub mod loudest;

use std::collections::BTreeMap;

use bevy_ecs::prelude::{Entity, Query, Res, ResMut};

use encore_components::config::{EngineConfig, Policy, RecommenderConfig};
use encore_components::ids::{Name, PeerKey, UtteranceId, UtteranceOrd};
use encore_components::learner::Learner;
use encore_components::listener::{History, ListenerSession, Route};
use encore_components::output::{RouteReason, ScoreTerms};
use encore_components::peer::{Affinity, Prefs};
use encore_components::resources::{
    Choice, ClosedUtterances, Counters, Decision, DecisionKind, DecisionNeed, DecisionQueue, Decisions, Directory,
    Dominance, EngineClock, EngineRng, NewUtterances, RecommenderCounts,
};
use encore_components::utterance::{PacketBuffer, Utterance};

use crate::playout::route_finished;
use crate::shared::bug;

/// What a candidate is, independent of the listener.
pub struct Candidate {
    pub entity: Entity,
    pub ord: UtteranceOrd,
    pub id: UtteranceId,
    pub speaker: PeerKey,
    pub speaker_name: Name,
    /// Terms that do not depend on the listener (for `rules`: live, lag, freshness, blip).
    pub terms: ScoreTerms,
    /// Their sum: the candidate's score for a listener whose own terms are all zero.
    pub base_total: i64,
}

impl Candidate {
    pub fn new(entity: Entity, ord: UtteranceOrd, utterance: &Utterance, terms: ScoreTerms) -> Self {
        Candidate {
            entity,
            ord,
            id: utterance.id.clone(),
            speaker: utterance.speaker,
            speaker_name: utterance.speaker_name.clone(),
            terms,
            base_total: terms.total(),
        }
    }
}

/// What a listener brings to its decision.
#[derive(Clone, Copy)]
pub struct Listener<'a> {
    pub key: PeerKey,
    pub prefs: Option<&'a Prefs>,
    pub affinity: Option<&'a Affinity>,
    pub history: &'a History,
}

impl Listener<'_> {
    /// Never a candidate: its own voice, what it heard, a speaker it muted.
    pub fn excludes(&self, candidate: &Candidate) -> bool {
        candidate.speaker == self.key
            || self.history.heard.contains(&candidate.ord)
            || self.prefs.is_some_and(|p| p.mute.contains(&candidate.speaker_name))
    }

    pub fn follows(&self, speaker: &Name) -> bool {
        self.prefs.is_some_and(|p| p.follow.contains(speaker))
    }
}

/// A policy's part of a decision: the listener's own terms.
pub trait Scorer {
    /// The most the listener's own terms can add to a candidate's `base_total`: the scan of a
    /// pool sorted by [`sort_pool`] stops at the first candidate that could not win with it.
    fn bound(&self, listener: &Listener) -> i64;
    /// The most the listener's own terms can add to the pool's `index`-th candidate, at most
    /// [`Scorer::bound`] and cheaper to know than the terms themselves: a busy listener is not
    /// scored at all on the utterances that opened when none of them could move it.
    fn bound_on(&self, listener: &Listener, _index: usize, _candidate: &Candidate) -> i64 {
        self.bound(listener)
    }
    /// Adds the listener's own terms for the pool's `index`-th candidate.
    fn personal(&self, listener: &Listener, index: usize, candidate: &Candidate, terms: &mut ScoreTerms);
    /// The lowest score an idle listener accepts.
    fn accept_min(&self) -> i64;
    /// The most candidates scored for one listener (the best-placed ones).
    fn limit(&self) -> usize {
        usize::MAX
    }
}

/// Orders a pool best first for a listener whose own terms are zero: higher score, then
/// smaller id. [`best`] relies on it to stop early.
pub fn sort_pool(pool: &mut [Candidate]) {
    pool.sort_by(|a, b| b.base_total.cmp(&a.base_total).then_with(|| a.id.cmp(&b.id)));
}

/// How long a policy looks back, and which utterances it considers at all.
fn window_us(config: &RecommenderConfig) -> u64 {
    match config.policy {
        Policy::Learn => config.window_ms.min(config.learn.max_lag_ms) * 1000,
        _ => config.window_ms * 1000,
    }
}

/// The listener-independent terms of an utterance for the configured policy at `now_us`;
/// `None` when the policy never offers it.
pub fn pool_terms(
    config: &RecommenderConfig,
    dominance: &Dominance,
    utterance: &Utterance,
    now_us: u64,
) -> Option<ScoreTerms> {
    match config.policy {
        Policy::Rules => Some(utterance_terms(config, utterance, now_us)),
        Policy::Fifo => Some(fifo::terms(utterance, now_us)),
        Policy::Loudest => loudest::terms(config, dominance, utterance, now_us),
        Policy::Learn => Some(learned::terms(&config.learn, utterance, now_us)),
    }
}

/// An utterance as a candidate for the configured policy at `now_us`: `None` when the policy
/// never offers it, or when it closed with nothing left in its buffer.
pub fn candidate_of(
    config: &RecommenderConfig,
    dominance: &Dominance,
    now_us: u64,
    ord: UtteranceOrd,
    entity: Entity,
    (utterance, buffer): (&Utterance, &PacketBuffer),
) -> Option<Candidate> {
    if !utterance.is_open() && buffer.audio.packets.is_empty() {
        return None;
    }
    let terms = pool_terms(config, dominance, utterance, now_us)?;
    Some(Candidate::new(entity, ord, utterance, terms))
}

/// Every candidate of a full decision at the clock's time, sorted by [`sort_pool`]: the
/// `max_candidates` newest utterances that started within the policy's window. `lookup`
/// reads an utterance (a query in a system, the world in a read between ticks).
pub fn candidate_pool<'u>(
    config: &RecommenderConfig,
    dominance: &Dominance,
    clock: &EngineClock,
    directory: &Directory,
    lookup: impl Fn(Entity) -> Option<(&'u Utterance, &'u PacketBuffer)>,
) -> Vec<Candidate> {
    let oldest_us = clock.now_us.saturating_sub(window_us(config));
    let mut pool: Vec<Candidate> = directory
        .utterances
        .iter()
        .rev()
        .filter_map(|(ord, entity)| Some((*ord, *entity, lookup(*entity)?)))
        .filter(|(_, _, (utterance, _))| utterance.started_us >= oldest_us)
        .filter_map(|(ord, entity, found)| candidate_of(config, dominance, clock.now_us, ord, entity, found))
        .take(config.max_candidates)
        .collect();
    sort_pool(&mut pool);
    pool
}

/// The margin a busy listener's new choice must beat what it plays by, or `None` when the
/// policy never switches mid-utterance.
pub fn switch_margin(config: &RecommenderConfig) -> Option<i64> {
    match config.policy {
        Policy::Rules => Some(config.switch_margin),
        Policy::Fifo => None,
        Policy::Loudest => Some(loudest::SWITCH_MARGIN),
        Policy::Learn => Some(config.learn.switch_margin),
    }
}

/// The `rules` policy's listener-independent terms of an utterance at `now_us`.
pub fn utterance_terms(config: &RecommenderConfig, utterance: &Utterance, now_us: u64) -> ScoreTerms {
    let lag_us = now_us.saturating_sub(utterance.started_us);
    let mut terms = ScoreTerms {
        base: config.base,
        live: if utterance.is_open() { config.live } else { 0 },
        lag: -per_second(config.lag_per_s, lag_us),
        ..ScoreTerms::default()
    };
    if let Some(ended_us) = utterance.ended_us {
        terms.freshness = -per_second(config.freshness_per_s, now_us.saturating_sub(ended_us));
        if ended_us - utterance.started_us < config.blip_ms * 1000 {
            terms.blip = -config.blip;
        }
    }
    terms
}

pub fn per_second(rate: i64, us: u64) -> i64 {
    (rate as i128 * us as i128 / 1_000_000).min(i64::MAX as i128) as i64
}

/// The `rules` policy: follow and affinity are the listener's own terms.
pub struct Rules<'a> {
    pub config: &'a RecommenderConfig,
}

impl Scorer for Rules<'_> {
    fn bound(&self, listener: &Listener) -> i64 {
        let follows = listener.prefs.is_some_and(|p| !p.follow.is_empty());
        let max_affinity = listener.affinity.and_then(|a| a.by_speaker.values().copied().max()).unwrap_or(0).max(0);
        (if follows { self.config.follow } else { 0 }) + max_affinity
    }

    fn personal(&self, listener: &Listener, _: usize, candidate: &Candidate, terms: &mut ScoreTerms) {
        if listener.follows(&candidate.speaker_name) {
            terms.follow = self.config.follow;
        }
        terms.affinity =
            listener.affinity.and_then(|a| a.by_speaker.get(&candidate.speaker_name)).copied().unwrap_or(0);
    }

    fn accept_min(&self) -> i64 {
        self.config.accept_min
    }
}

/// The best of `pool` (sorted by [`sort_pool`]) for a listener, ties to the smaller
/// utterance id; `None` when nothing scores `accept_min`. The scan stops at the first
/// candidate that could not beat the best so far even with the listener's own terms at their
/// bound, or after the policy's limit of scored candidates. Counts the candidates scored.
pub fn best<S: Scorer>(scorer: &S, listener: &Listener, pool: &[Candidate], scored: &mut u64) -> Option<Choice> {
    let bound = scorer.bound(listener);
    let limit = scorer.limit();
    let mut count = 0;
    let mut best: Option<(i64, &Candidate, ScoreTerms)> = None;
    for (index, candidate) in pool.iter().enumerate() {
        if let Some((score, _, _)) = &best
            && candidate.base_total + bound < *score
        {
            break;
        }
        if count >= limit {
            break;
        }
        if listener.excludes(candidate) {
            continue;
        }
        count += 1;
        let mut terms = candidate.terms;
        scorer.personal(listener, index, candidate, &mut terms);
        let total = terms.total();
        let better = match &best {
            None => true,
            Some((score, chosen, _)) => total > *score || (total == *score && candidate.id < chosen.id),
        };
        if better {
            best = Some((total, candidate, terms));
        }
    }
    *scored += count as u64;
    let (score, candidate, terms) = best?;
    (score >= scorer.accept_min()).then(|| Choice {
        utterance: candidate.entity,
        ord: candidate.ord,
        id: candidate.id.clone(),
        score,
        terms,
    })
}

/// The `n` best of `pool` (sorted by [`sort_pool`]) for a listener, best first, ties to the
/// smaller utterance id, each scoring at least `accept_min`; never one of `skip`. The same
/// candidates [`best`] weighs (the policy's limit of them, in pool order) without its early
/// stop, so the first is [`best`]'s choice whenever `skip` is empty.
pub fn ranked<S: Scorer>(
    scorer: &S,
    listener: &Listener,
    pool: &[Candidate],
    skip: &[UtteranceOrd],
    n: usize,
) -> Vec<Choice> {
    let mut scored: Vec<Choice> = pool
        .iter()
        .enumerate()
        .filter(|(_, candidate)| !listener.excludes(candidate))
        .take(scorer.limit())
        .filter(|(_, candidate)| !skip.contains(&candidate.ord))
        .filter_map(|(index, candidate)| {
            let mut terms = candidate.terms;
            scorer.personal(listener, index, candidate, &mut terms);
            let score = terms.total();
            (score >= scorer.accept_min()).then(|| Choice {
                utterance: candidate.entity,
                ord: candidate.ord,
                id: candidate.id.clone(),
                score,
                terms,
            })
        })
        .collect();
    scored.sort_by(|a, b| b.score.cmp(&a.score).then_with(|| a.id.cmp(&b.id)));
    scored.truncate(n);
    scored
}

pub type Sessions<'w, 's> = Query<'w, 's, (&'static ListenerSession, &'static Route, &'static History)>;
pub type Peers<'w, 's> = Query<'w, 's, (Option<&'static Prefs>, Option<&'static Affinity>)>;

/// One tick's decisions with a policy's scorers: full decisions over the pool for the
/// listeners in need, then decisions over the fresh utterances for everyone else.
struct Round<'w, 's, 'q> {
    directory: &'q Directory,
    sessions: &'q Sessions<'w, 's>,
    peers: &'q Peers<'w, 's>,
    counters: &'q mut Counters,
    counts: &'q mut RecommenderCounts,
    /// What a busy listener's new choice must beat what it plays by (`None`: it never switches).
    margin: Option<i64>,
    /// The present score of the utterance a busy listener plays, for policies whose scores
    /// change while it plays (`loudest`: the dominant speaker changes); others compare with
    /// the score it was chosen with.
    rescore: Option<&'q dyn Fn(Entity) -> Option<i64>>,
}

impl<'q> Round<'_, '_, 'q> {
    /// The listener of a session, and the utterance it plays with the score it was chosen with.
    fn listener(&mut self, session: Entity) -> Option<(Listener<'q>, Option<(Entity, i64)>)> {
        let sessions: &'q Sessions = self.sessions;
        let Ok((listener, route, history)) = sessions.get(session) else {
            bug(self.counters, "a session in the directory lacks its components");
            return None;
        };
        let (prefs, affinity) = self.peers.get(listener.peer).unwrap_or((None, None));
        let playing = route.playing.as_ref().map(|p| (p.utterance, p.score));
        Some((Listener { key: listener.key, prefs, affinity, history }, playing))
    }

    fn full<S: Scorer>(
        &mut self,
        scorer: &S,
        pool: &[Candidate],
        needs: &BTreeMap<PeerKey, DecisionNeed>,
        out: &mut Vec<Decision>,
    ) {
        for (key, need) in needs.iter() {
            let Some(session) = self.directory.listeners.get(key).copied() else {
                bug(self.counters, "a decision is needed for a listener that left");
                continue;
            };
            let Some((listener, _)) = self.listener(session) else { continue };
            let choice = best(scorer, &listener, pool, &mut self.counts.scored);
            self.counts.decisions += 1;
            self.counts.full += 1;
            out.push(Decision {
                session,
                listener: *key,
                kind: DecisionKind::Full(need.reason),
                from: need.from.clone(),
                choice,
                rescored: None,
            });
        }
    }

    fn fresh<S: Scorer>(&mut self, scorer: &S, fresh: &[Candidate], decisions: &mut Vec<Decision>) {
        let directory: &'q Directory = self.directory;
        let mut merged = Vec::with_capacity(decisions.len() + directory.listeners.len());
        let mut full = std::mem::take(decisions).into_iter().peekable();
        for (key, session) in directory.listeners.iter() {
            if let Some(decision) = full.next_if(|d| d.listener == *key) {
                merged.push(decision);
                continue;
            }
            let Some((listener, playing)) = self.listener(*session) else { continue };
            if let Some((_, playing_score)) = playing {
                let Some(margin) = self.margin else { continue };
                // Nothing fresh could score enough to take the listener off what it plays: the
                // router would turn any choice down, so none is made.
                let top = fresh
                    .iter()
                    .enumerate()
                    .map(|(i, c)| c.base_total.saturating_add(scorer.bound_on(&listener, i, c)))
                    .max()
                    .unwrap_or(i64::MIN);
                if self.rescore.is_none() && top < playing_score.saturating_add(margin) {
                    continue;
                }
            }
            let choice = best(scorer, &listener, fresh, &mut self.counts.scored);
            self.counts.decisions += 1;
            if let Some(choice) = choice {
                let rescored = playing.zip(self.rescore).and_then(|((utterance, _), rescore)| rescore(utterance));
                merged.push(Decision {
                    session: *session,
                    listener: *key,
                    kind: DecisionKind::NewUtterance,
                    from: None,
                    choice: Some(choice),
                    rescored,
                });
            }
        }
        merged.extend(full);
        *decisions = merged;
    }
}

#[allow(clippy::too_many_arguments)]
pub fn recommend(
    config: Res<EngineConfig>,
    clock: Res<EngineClock>,
    directory: Res<Directory>,
    new_utterances: Res<NewUtterances>,
    closed: Res<ClosedUtterances>,
    dominance: Res<Dominance>,
    learner: Res<Learner>,
    rng: Res<EngineRng>,
    mut queue: ResMut<DecisionQueue>,
    mut decisions: ResMut<Decisions>,
    mut counters: ResMut<Counters>,
    mut counts: ResMut<RecommenderCounts>,
    sessions: Sessions,
    peers: Peers,
    utterances: Query<(&Utterance, &PacketBuffer)>,
) {
    let rules = &config.recommender;
    decisions.list.clear();

    // Listeners that had sent everything of an utterance that closed this tick are done
    // (play-out queues those that send the last packet of a closed one).
    if !closed.closed.is_empty() {
        for (key, session) in directory.listeners.iter() {
            let Ok((_, route, _)) = sessions.get(*session) else {
                bug(&mut counters, "a session in the directory lacks its components");
                continue;
            };
            let Some(playing) = &route.playing else { continue };
            if !closed.closed.contains(&playing.ord) {
                continue;
            }
            let done = utterances.get(playing.utterance).ok().is_none_or(|(u, b)| route_finished(u, b, playing));
            if done {
                queue
                    .needs
                    .entry(*key)
                    .or_insert(DecisionNeed { reason: RouteReason::Finished, from: Some(playing.id.clone()) });
            }
        }
    }

    let lookup = |entity: Entity| utterances.get(entity).ok();
    let candidate = |ord: &UtteranceOrd, entity: &Entity| -> Option<Candidate> {
        candidate_of(rules, &dominance, clock.now_us, *ord, *entity, lookup(*entity)?)
    };

    let needs = std::mem::take(&mut queue.needs);
    let pool =
        if needs.is_empty() { Vec::new() } else { candidate_pool(rules, &dominance, &clock, &directory, lookup) };

    // The utterances offered to everyone: those that opened, and under `loudest` the dominant
    // speaker's open ones when the dominant speaker changed.
    let mut fresh: Vec<Candidate> =
        new_utterances.opened.iter().filter_map(|(ord, entity)| candidate(ord, entity)).collect();
    if rules.policy == Policy::Loudest && dominance.changed {
        loudest::add_dominant_utterances(&dominance, &directory, &utterances, &mut fresh, |ord, entity| {
            candidate(ord, entity)
        });
    }
    sort_pool(&mut fresh);

    let rescore_loudest = |utterance: Entity| -> Option<i64> {
        let (utterance, _) = utterances.get(utterance).ok()?;
        Some(loudest::rescore(rules, &dominance, utterance, clock.now_us))
    };
    let mut round = Round {
        directory: &directory,
        sessions: &sessions,
        peers: &peers,
        counters: &mut counters,
        counts: &mut counts,
        margin: switch_margin(rules),
        rescore: (rules.policy == Policy::Loudest).then_some(&rescore_loudest as &dyn Fn(Entity) -> Option<i64>),
    };
    let mut list = std::mem::take(&mut decisions.list);
    match rules.policy {
        Policy::Rules => {
            let scorer = Rules { config: rules };
            decide(&mut round, &scorer, &scorer, &pool, &needs, &fresh, &mut list);
        }
        Policy::Fifo => decide(&mut round, &fifo::Fifo, &fifo::Fifo, &pool, &needs, &fresh, &mut list),
        Policy::Loudest => {
            let scorer = loudest::Loudest { config: rules };
            decide(&mut round, &scorer, &scorer, &pool, &needs, &fresh, &mut list);
        }
        Policy::Learn => {
            let on_pool = learned::Learned::new(&rules.learn, &learner, &rng, &clock, &pool);
            let on_fresh = learned::Learned::new(&rules.learn, &learner, &rng, &clock, &fresh);
            decide(&mut round, &on_pool, &on_fresh, &pool, &needs, &fresh, &mut list);
        }
    }
    decisions.list = list;
}

fn decide<A: Scorer, B: Scorer>(
    round: &mut Round,
    on_pool: &A,
    on_fresh: &B,
    pool: &[Candidate],
    needs: &BTreeMap<PeerKey, DecisionNeed>,
    fresh: &[Candidate],
    list: &mut Vec<Decision>,
) {
    if !needs.is_empty() {
        round.full(on_pool, pool, needs, list);
    }
    if !fresh.is_empty() {
        round.fresh(on_fresh, fresh, list);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{Room, routes};

    pub(crate) fn utterance(started_us: u64, ended_us: Option<u64>) -> Utterance {
        Utterance {
            id: "s#1".parse().unwrap(),
            ord: UtteranceOrd(0),
            speaker: PeerKey(0),
            speaker_name: Name::new("s"),
            uid: None,
            track: Entity::PLACEHOLDER,
            started_us,
            opened_us: started_us,
            ended_us,
        }
    }

    fn rules_best(
        rules: &RecommenderConfig,
        key: PeerKey,
        prefs: Option<&Prefs>,
        affinity: Option<&Affinity>,
        history: &History,
        pool: &[Candidate],
    ) -> Option<Choice> {
        let listener = Listener { key, prefs, affinity, history };
        best(&Rules { config: rules }, &listener, pool, &mut 0)
    }

    #[test]
    fn terms_reward_live_and_penalise_lag_staleness_and_blips() {
        let rules = RecommenderConfig::default();
        let live = utterance_terms(&rules, &utterance(0, None), 500_000);
        assert_eq!((live.base, live.live, live.lag, live.freshness, live.blip), (1000, 300, -20, 0, 0));
        let blip = utterance_terms(&rules, &utterance(0, Some(300_000)), 10_300_000);
        assert_eq!((blip.live, blip.lag, blip.freshness, blip.blip), (0, -412, -200, -500));
    }

    #[test]
    fn muted_own_and_heard_are_never_candidates_and_follow_wins() {
        let rules = RecommenderConfig::default();
        let make = |speaker: u32, name: &str, ord: u64| candidate(speaker, name, ord, 1000);
        let mut candidates = [make(1, "a", 0), make(2, "b", 1), make(3, "c", 2), make(9, "me", 3)];
        sort_pool(&mut candidates);
        let prefs = Prefs { follow: [Name::new("c")].into(), mute: [Name::new("b")].into() };
        let mut history = History::default();
        let choice = rules_best(&rules, PeerKey(9), Some(&prefs), None, &history, &candidates).unwrap();
        assert_eq!(choice.id.to_string(), "c#1");
        assert_eq!(choice.score, 2000);
        history.heard.insert(UtteranceOrd(2));
        let choice = rules_best(&rules, PeerKey(9), Some(&prefs), None, &history, &candidates).unwrap();
        assert_eq!(choice.id.to_string(), "a#1", "b is muted, c heard, me is the listener");
        history.heard.insert(UtteranceOrd(0));
        assert!(rules_best(&rules, PeerKey(9), Some(&prefs), None, &history, &candidates).is_none());
    }

    #[test]
    fn ties_go_to_the_smaller_utterance_id() {
        let rules = RecommenderConfig::default();
        let mut candidates = [candidate(0, "zed", 0, 1000), candidate(1, "amy", 1, 1000)];
        sort_pool(&mut candidates);
        let choice = rules_best(&rules, PeerKey(99), None, None, &History::default(), &candidates).unwrap();
        assert_eq!(choice.id.to_string(), "amy#1");
    }

    pub(crate) fn candidate(speaker: u32, name: &str, ord: u64, base: i64) -> Candidate {
        let terms = ScoreTerms { base, ..ScoreTerms::default() };
        Candidate {
            entity: Entity::PLACEHOLDER,
            ord: UtteranceOrd(ord),
            id: format!("{name}#1").parse().unwrap(),
            speaker: PeerKey(speaker),
            speaker_name: Name::new(name),
            terms,
            base_total: terms.total(),
        }
    }

    /// A full scan of the pool: every candidate scored, the best kept.
    pub(crate) fn full_scan<S: Scorer>(scorer: &S, listener: &Listener, pool: &[Candidate]) -> Option<(i64, String)> {
        pool.iter()
            .enumerate()
            .filter(|(_, c)| !listener.excludes(c))
            .map(|(i, c)| {
                let mut terms = c.terms;
                scorer.personal(listener, i, c, &mut terms);
                (terms.total(), c)
            })
            .max_by(|(sa, a), (sb, b)| sa.cmp(sb).then_with(|| b.id.cmp(&a.id)))
            .filter(|(s, _)| *s >= scorer.accept_min())
            .map(|(s, c)| (s, c.id.to_string()))
    }

    /// Random pools, preferences and histories for the bounded-scan checks.
    pub(crate) struct Draws(pub(crate) u64);

    impl Draws {
        pub(crate) fn next(&mut self, n: u64) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }

        pub(crate) fn pool(&mut self) -> Vec<Candidate> {
            let names = ["a", "b", "c", "d", "e"];
            let mut pool: Vec<Candidate> = (0..20)
                .map(|i| {
                    let speaker = self.next(5) as u32;
                    let mut c = candidate(speaker, names[speaker as usize], i, 1000 - self.next(1500) as i64);
                    c.id = format!("{}#{}", names[speaker as usize], i + 1).parse().unwrap();
                    c
                })
                .collect();
            sort_pool(&mut pool);
            pool
        }

        pub(crate) fn prefs(&mut self) -> Prefs {
            let names = ["a", "b", "c", "d", "e"];
            Prefs {
                follow: (0..self.next(3)).map(|_| Name::new(names[self.next(5) as usize])).collect(),
                mute: (0..self.next(2)).map(|_| Name::new(names[self.next(5) as usize])).collect(),
            }
        }

        pub(crate) fn history(&mut self) -> History {
            History { heard: (0..self.next(6)).map(|_| UtteranceOrd(self.next(20))).collect() }
        }
    }

    /// The early stop never changes the answer: against a full scan over random pools and
    /// listeners.
    #[test]
    fn the_bounded_scan_picks_what_a_full_scan_picks() {
        let rules = RecommenderConfig::default();
        let mut draws = Draws(0x1234_5678);
        let names = ["a", "b", "c", "d", "e"];
        for _ in 0..500 {
            let pool = draws.pool();
            let prefs = draws.prefs();
            let affinity = Affinity {
                by_speaker: (0..draws.next(4))
                    .map(|_| (Name::new(names[draws.next(5) as usize]), draws.next(2400) as i64 - 1200))
                    .collect(),
            };
            let history = draws.history();
            let listener = Listener {
                key: PeerKey(draws.next(6) as u32),
                prefs: Some(&prefs),
                affinity: Some(&affinity),
                history: &history,
            };
            let scorer = Rules { config: &rules };
            let fast = best(&scorer, &listener, &pool, &mut 0).map(|c| (c.score, c.id.to_string()));
            assert_eq!(fast, full_scan(&scorer, &listener, &pool));
        }
    }

    #[test]
    fn a_busy_listener_hears_the_overlapping_utterance_afterwards() {
        let mut room = Room::new(EngineConfig::default());
        room.speaker("alice", "a1");
        room.speaker("bob", "b1");
        room.listener("lena");
        room.talk("a1", 0, 2_000_000);
        room.talk("b1", 1_000_000, 2_500_000);
        let trace = room.run_until(6_000_000);
        let lena: Vec<_> = routes(&trace, "lena").into_iter().map(|(_, from, to, reason)| (from, to, reason)).collect();
        let some = |id: &str| Some(id.to_owned());
        assert_eq!(lena[0], (None, some("alice#1"), RouteReason::NewUtterance), "{lena:?}");
        assert_eq!(lena[1], (some("alice#1"), some("bob#1"), RouteReason::Finished), "{lena:?}");
    }
}
