//! System 5, recommend: picks what each listener that needs a decision should hear.
//!
//! A listener needs a decision when it subscribed, finished its utterance (play-out notices
//! when it sends the last packet of a closed utterance; this system when an utterance
//! closes after its listeners caught up), skipped it, lost
//! it to eviction, muted its speaker, changed preferences or gave feedback while idle (a
//! *full* decision over every candidate), or when an utterance opened this tick (a decision
//! over the new utterances only: an idle listener has already turned the older ones down).
//! Everyone else costs nothing this tick.
//!
//! The score of a candidate is a sum of named integer terms ([`ScoreTerms`]):
//! `base`; `follow` when the listener follows the speaker; `affinity` learnt from likes and
//! skips; `live` while the speaker still talks; `lag`, minus `lag_per_s` per second the
//! listener would be behind live; `freshness`, minus `freshness_per_s` per second since it
//! ended; `blip`, minus `blip` for a finished utterance shorter than `blip_ms`. Muted
//! speakers, the listener's own voice and what it has heard are never candidates. Higher
//! scores win; ties go to the smaller utterance id. Candidates are the `max_candidates`
//! newest utterances that started within `window_ms`.

use bevy_ecs::prelude::{Entity, Query, Res, ResMut};

use encore_components::config::{EngineConfig, RecommenderConfig};
use encore_components::ids::{Name, PeerKey, UtteranceId, UtteranceOrd};
use encore_components::listener::{History, ListenerSession, Route};
use encore_components::output::{RouteReason, ScoreTerms};
use encore_components::peer::{Affinity, Prefs};
use encore_components::resources::{
    Choice, ClosedUtterances, Counters, Decision, DecisionKind, DecisionNeed, DecisionQueue, Decisions, Directory,
    EngineClock, NewUtterances,
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
    /// Terms that do not depend on the listener: live, lag, freshness, blip.
    pub terms: ScoreTerms,
    /// Their sum: the candidate's score for a listener with no preference or affinity.
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

/// Orders a pool best first for a listener without preferences: higher score, then smaller
/// id. [`best`] relies on it to stop early.
pub fn sort_pool(pool: &mut [Candidate]) {
    pool.sort_by(|a, b| b.base_total.cmp(&a.base_total).then_with(|| a.id.cmp(&b.id)));
}

/// The listener-independent terms of an utterance at `now_us`.
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

fn per_second(rate: i64, us: u64) -> i64 {
    (rate as i128 * us as i128 / 1_000_000).min(i64::MAX as i128) as i64
}

/// Scores one candidate for one listener; `None` when it is not a candidate for them.
pub fn score(
    config: &RecommenderConfig,
    listener: PeerKey,
    prefs: Option<&Prefs>,
    affinity: Option<&Affinity>,
    history: &History,
    candidate: &Candidate,
) -> Option<ScoreTerms> {
    if candidate.speaker == listener || history.heard.contains(&candidate.ord) {
        return None;
    }
    if prefs.is_some_and(|p| p.mute.contains(&candidate.speaker_name)) {
        return None;
    }
    let mut terms = candidate.terms;
    if prefs.is_some_and(|p| p.follow.contains(&candidate.speaker_name)) {
        terms.follow = config.follow;
    }
    terms.affinity = affinity.and_then(|a| a.by_speaker.get(&candidate.speaker_name)).copied().unwrap_or(0);
    Some(terms)
}

/// The best of `pool` (sorted by [`sort_pool`]) for a listener, ties to the smaller
/// utterance id. The listener's own terms (follow, affinity) add at most `follow` (if it
/// follows anyone) plus its largest positive affinity, so the scan stops at the first
/// candidate that could not beat the best so far even with them.
fn best(
    config: &RecommenderConfig,
    listener: PeerKey,
    prefs: Option<&Prefs>,
    affinity: Option<&Affinity>,
    history: &History,
    pool: &[Candidate],
) -> Option<Choice> {
    let follows = prefs.is_some_and(|p| !p.follow.is_empty());
    let max_affinity = affinity.and_then(|a| a.by_speaker.values().copied().max()).unwrap_or(0).max(0);
    let max_personal = if follows { config.follow } else { 0 } + max_affinity;
    let mut best: Option<(i64, &Candidate, ScoreTerms)> = None;
    for candidate in pool {
        if let Some((score, _, _)) = &best
            && candidate.base_total + max_personal < *score
        {
            break;
        }
        let Some(terms) = score(config, listener, prefs, affinity, history, candidate) else { continue };
        let total = terms.total();
        let better = match &best {
            None => true,
            Some((score, chosen, _)) => total > *score || (total == *score && candidate.id < chosen.id),
        };
        if better {
            best = Some((total, candidate, terms));
        }
    }
    let (score, candidate, terms) = best?;
    (score >= config.accept_min).then(|| Choice {
        utterance: candidate.entity,
        ord: candidate.ord,
        id: candidate.id.clone(),
        score,
        terms,
    })
}

#[allow(clippy::too_many_arguments)]
pub fn recommend(
    config: Res<EngineConfig>,
    clock: Res<EngineClock>,
    directory: Res<Directory>,
    new_utterances: Res<NewUtterances>,
    closed: Res<ClosedUtterances>,
    mut queue: ResMut<DecisionQueue>,
    mut decisions: ResMut<Decisions>,
    mut counters: ResMut<Counters>,
    sessions: Query<(&ListenerSession, &Route, &History)>,
    peers: Query<(Option<&Prefs>, Option<&Affinity>)>,
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

    let candidate = |ord: &UtteranceOrd, entity: &Entity| -> Option<Candidate> {
        let (utterance, buffer) = utterances.get(*entity).ok()?;
        if !utterance.is_open() && buffer.audio.packets.is_empty() {
            return None;
        }
        Some(Candidate::new(*entity, *ord, utterance, utterance_terms(rules, utterance, clock.now_us)))
    };

    let needs = std::mem::take(&mut queue.needs);
    if !needs.is_empty() {
        let oldest_us = clock.now_us.saturating_sub(rules.window_ms * 1000);
        let mut pool: Vec<Candidate> = directory
            .utterances
            .iter()
            .rev()
            .filter_map(|(ord, entity)| candidate(ord, entity))
            .filter(|c| utterances.get(c.entity).is_ok_and(|(u, _)| u.started_us >= oldest_us))
            .take(rules.max_candidates)
            .collect();
        sort_pool(&mut pool);
        for (key, need) in needs.iter() {
            let Some(session) = directory.listeners.get(key).copied() else {
                bug(&mut counters, "a decision is needed for a listener that left");
                continue;
            };
            let Ok((listener, _, history)) = sessions.get(session) else {
                bug(&mut counters, "a session in the directory lacks its components");
                continue;
            };
            let (prefs, affinity) = peers.get(listener.peer).unwrap_or((None, None));
            decisions.list.push(Decision {
                session,
                listener: *key,
                kind: DecisionKind::Full(need.reason),
                from: need.from.clone(),
                choice: best(rules, *key, prefs, affinity, history, &pool),
            });
        }
    }

    if new_utterances.opened.is_empty() {
        return;
    }
    let mut fresh: Vec<Candidate> =
        new_utterances.opened.iter().filter_map(|(ord, entity)| candidate(ord, entity)).collect();
    sort_pool(&mut fresh);
    let mut merged = Vec::with_capacity(decisions.list.len() + directory.listeners.len());
    let mut full = std::mem::take(&mut decisions.list).into_iter().peekable();
    for (key, session) in directory.listeners.iter() {
        if let Some(decision) = full.next_if(|d| d.listener == *key) {
            merged.push(decision);
            continue;
        }
        let Ok((listener, _, history)) = sessions.get(*session) else {
            bug(&mut counters, "a session in the directory lacks its components");
            continue;
        };
        let (prefs, affinity) = peers.get(listener.peer).unwrap_or((None, None));
        if let Some(choice) = best(rules, *key, prefs, affinity, history, &fresh) {
            merged.push(Decision {
                session: *session,
                listener: *key,
                kind: DecisionKind::NewUtterance,
                from: None,
                choice: Some(choice),
            });
        }
    }
    merged.extend(full);
    decisions.list = merged;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{Room, routes};

    fn utterance(started_us: u64, ended_us: Option<u64>) -> Utterance {
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
        let choice = best(&rules, PeerKey(9), Some(&prefs), None, &history, &candidates).unwrap();
        assert_eq!(choice.id.to_string(), "c#1");
        assert_eq!(choice.score, 2000);
        history.heard.insert(UtteranceOrd(2));
        let choice = best(&rules, PeerKey(9), Some(&prefs), None, &history, &candidates).unwrap();
        assert_eq!(choice.id.to_string(), "a#1", "b is muted, c heard, me is the listener");
        history.heard.insert(UtteranceOrd(0));
        assert!(best(&rules, PeerKey(9), Some(&prefs), None, &history, &candidates).is_none());
    }

    #[test]
    fn ties_go_to_the_smaller_utterance_id() {
        let rules = RecommenderConfig::default();
        let mut candidates = [candidate(0, "zed", 0, 1000), candidate(1, "amy", 1, 1000)];
        sort_pool(&mut candidates);
        let choice = best(&rules, PeerKey(99), None, None, &History::default(), &candidates).unwrap();
        assert_eq!(choice.id.to_string(), "amy#1");
    }

    fn candidate(speaker: u32, name: &str, ord: u64, base: i64) -> Candidate {
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

    /// The early stop never changes the answer: against a full scan over random pools and
    /// listeners.
    #[test]
    fn the_bounded_scan_picks_what_a_full_scan_picks() {
        let rules = RecommenderConfig::default();
        let mut state = 0x1234_5678_u64;
        let mut next = move |n: u64| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) % n
        };
        for _ in 0..500 {
            let names = ["a", "b", "c", "d", "e"];
            let mut pool: Vec<Candidate> = (0..20)
                .map(|i| {
                    let speaker = next(5) as u32;
                    let mut c = candidate(speaker, names[speaker as usize], i, 1000 - next(1500) as i64);
                    c.id = format!("{}#{}", names[speaker as usize], i + 1).parse().unwrap();
                    c
                })
                .collect();
            sort_pool(&mut pool);
            let prefs = Prefs {
                follow: (0..next(3)).map(|_| Name::new(names[next(5) as usize])).collect(),
                mute: (0..next(2)).map(|_| Name::new(names[next(5) as usize])).collect(),
            };
            let affinity = Affinity {
                by_speaker: (0..next(4))
                    .map(|_| (Name::new(names[next(5) as usize]), next(2400) as i64 - 1200))
                    .collect(),
            };
            let history = History { heard: (0..next(6)).map(|_| UtteranceOrd(next(20))).collect() };
            let listener = PeerKey(next(6) as u32);
            let full = pool
                .iter()
                .filter_map(|c| {
                    score(&rules, listener, Some(&prefs), Some(&affinity), &history, c).map(|t| (t.total(), c))
                })
                .max_by(|(sa, a), (sb, b)| sa.cmp(sb).then_with(|| b.id.cmp(&a.id)))
                .filter(|(s, _)| *s >= rules.accept_min)
                .map(|(s, c)| (s, c.id.clone()));
            let fast = best(&rules, listener, Some(&prefs), Some(&affinity), &history, &pool).map(|c| (c.score, c.id));
            assert_eq!(fast, full);
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
