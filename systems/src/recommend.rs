//! System 5, recommend: picks what each listener that needs a decision should hear.
//!
//! A listener needs a decision when it subscribed, finished its utterance, skipped it, lost
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
use encore_components::output::{RouteReason, ScoreTerms};
use encore_components::peer::{Affinity, Prefs};
use encore_components::resources::{
    Choice, Clock, Decision, DecisionKind, DecisionNeed, DecisionQueue, Decisions, Directory, NewUtterances,
};
use encore_components::utterance::{PacketBuffer, Utterance};
use encore_components::viewer::{History, Playing, Route, ViewerSession};

/// What a candidate is, independent of the listener.
pub struct Candidate {
    pub entity: Entity,
    pub ord: UtteranceOrd,
    pub id: UtteranceId,
    pub speaker: PeerKey,
    pub speaker_name: Name,
    /// Terms that do not depend on the listener: live, lag, freshness, blip.
    pub terms: ScoreTerms,
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

/// The best of `candidates` for a listener, ties to the smaller utterance id.
fn best<'a>(
    config: &RecommenderConfig,
    listener: PeerKey,
    prefs: Option<&Prefs>,
    affinity: Option<&Affinity>,
    history: &History,
    candidates: impl Iterator<Item = &'a Candidate>,
) -> Option<Choice> {
    let mut best: Option<Choice> = None;
    for candidate in candidates {
        let Some(terms) = score(config, listener, prefs, affinity, history, candidate) else { continue };
        let total = terms.total();
        let better = match &best {
            None => true,
            Some(b) => total > b.score || (total == b.score && candidate.id < b.id),
        };
        if better {
            best = Some(Choice {
                utterance: candidate.entity,
                ord: candidate.ord,
                id: candidate.id.clone(),
                score: total,
                terms,
            });
        }
    }
    best.filter(|choice| choice.score >= config.accept_min)
}

/// True when the listener has sent every packet of a finished utterance, or the utterance
/// is gone.
fn finished(playing: &Playing, utterances: &Query<(&Utterance, &PacketBuffer)>) -> bool {
    let Ok((utterance, buffer)) = utterances.get(playing.utterance) else { return true };
    if utterance.is_open() {
        return false;
    }
    let done = |packets: &[encore_components::utterance::BufferedPacket], last: Option<u64>| {
        packets.last().is_none_or(|p| last.is_some_and(|last| last >= p.ext_seq))
    };
    done(&buffer.audio.packets, playing.audio.last_ext_seq)
        && (done(&buffer.video.packets, playing.video.last_ext_seq) || playing.video_needs_keyframe)
}

#[allow(clippy::too_many_arguments)]
pub fn recommend(
    config: Res<EngineConfig>,
    clock: Res<Clock>,
    directory: Res<Directory>,
    new_utterances: Res<NewUtterances>,
    mut queue: ResMut<DecisionQueue>,
    mut decisions: ResMut<Decisions>,
    viewers: Query<(&ViewerSession, &Route, &History)>,
    peers: Query<(Option<&Prefs>, Option<&Affinity>)>,
    utterances: Query<(&Utterance, &PacketBuffer)>,
) {
    let rules = &config.recommender;
    decisions.list.clear();

    // Routes that ran out need a full decision.
    for (key, viewer) in directory.viewers.iter() {
        let Ok((_, route, _)) = viewers.get(*viewer) else { continue };
        if let Some(playing) = &route.playing
            && finished(playing, &utterances)
        {
            queue
                .needs
                .entry(*key)
                .or_insert(DecisionNeed { reason: RouteReason::Finished, from: Some(playing.id.clone()) });
        }
    }

    let candidate = |ord: &UtteranceOrd, entity: &Entity| -> Option<Candidate> {
        let (utterance, buffer) = utterances.get(*entity).ok()?;
        if !utterance.is_open() && buffer.audio.packets.is_empty() {
            return None;
        }
        Some(Candidate {
            entity: *entity,
            ord: *ord,
            id: utterance.id.clone(),
            speaker: utterance.speaker,
            speaker_name: utterance.speaker_name.clone(),
            terms: utterance_terms(rules, utterance, clock.now_us),
        })
    };

    let needs = std::mem::take(&mut queue.needs);
    if !needs.is_empty() {
        let oldest_us = clock.now_us.saturating_sub(rules.window_ms * 1000);
        let pool: Vec<Candidate> = directory
            .utterances
            .iter()
            .rev()
            .filter_map(|(ord, entity)| candidate(ord, entity))
            .filter(|c| utterances.get(c.entity).is_ok_and(|(u, _)| u.started_us >= oldest_us))
            .take(rules.max_candidates)
            .collect();
        for (key, need) in needs.iter() {
            let Some(viewer) = directory.viewers.get(key).copied() else { continue };
            let Ok((session, _, history)) = viewers.get(viewer) else { continue };
            let (prefs, affinity) = peers.get(session.peer).unwrap_or((None, None));
            decisions.list.push(Decision {
                viewer,
                listener: *key,
                kind: DecisionKind::Full(need.reason),
                from: need.from.clone(),
                choice: best(rules, *key, prefs, affinity, history, pool.iter()),
            });
        }
    }

    if new_utterances.opened.is_empty() {
        return;
    }
    let fresh: Vec<Candidate> =
        new_utterances.opened.iter().filter_map(|(ord, entity)| candidate(ord, entity)).collect();
    let mut merged = Vec::with_capacity(decisions.list.len() + directory.viewers.len());
    let mut full = std::mem::take(&mut decisions.list).into_iter().peekable();
    for (key, viewer) in directory.viewers.iter() {
        if let Some(decision) = full.next_if(|d| d.listener == *key) {
            merged.push(decision);
            continue;
        }
        let Ok((session, _, history)) = viewers.get(*viewer) else { continue };
        let (prefs, affinity) = peers.get(session.peer).unwrap_or((None, None));
        if let Some(choice) = best(rules, *key, prefs, affinity, history, fresh.iter()) {
            merged.push(Decision {
                viewer: *viewer,
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
    use crate::testkit::Room;

    fn utterance(started_us: u64, ended_us: Option<u64>) -> Utterance {
        Utterance {
            id: "s#1".parse().unwrap(),
            ord: UtteranceOrd(0),
            speaker: PeerKey(0),
            speaker_name: Name::new("s"),
            uid: None,
            track: Entity::PLACEHOLDER,
            track_name: Name::new("t"),
            started_us,
            opened_us: started_us,
            ended_us,
            end_reason: None,
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
        let make = |speaker: u32, name: &str, ord: u64| Candidate {
            entity: Entity::PLACEHOLDER,
            ord: UtteranceOrd(ord),
            id: format!("{name}#1").parse().unwrap(),
            speaker: PeerKey(speaker),
            speaker_name: Name::new(name),
            terms: ScoreTerms { base: 1000, ..ScoreTerms::default() },
        };
        let candidates = [make(1, "a", 0), make(2, "b", 1), make(3, "c", 2), make(9, "me", 3)];
        let prefs = Prefs { follow: [Name::new("c")].into(), mute: [Name::new("b")].into() };
        let mut history = History::default();
        let choice = best(&rules, PeerKey(9), Some(&prefs), None, &history, candidates.iter()).unwrap();
        assert_eq!(choice.id.to_string(), "c#1");
        assert_eq!(choice.score, 2000);
        history.heard.insert(UtteranceOrd(2));
        let choice = best(&rules, PeerKey(9), Some(&prefs), None, &history, candidates.iter()).unwrap();
        assert_eq!(choice.id.to_string(), "a#1", "b is muted, c heard, me is the listener");
        history.heard.insert(UtteranceOrd(0));
        assert!(best(&rules, PeerKey(9), Some(&prefs), None, &history, candidates.iter()).is_none());
    }

    #[test]
    fn ties_go_to_the_smaller_utterance_id() {
        let rules = RecommenderConfig::default();
        let make = |name: &str, ord: u64| Candidate {
            entity: Entity::PLACEHOLDER,
            ord: UtteranceOrd(ord),
            id: format!("{name}#1").parse().unwrap(),
            speaker: PeerKey(ord as u32),
            speaker_name: Name::new(name),
            terms: ScoreTerms { base: 1000, ..ScoreTerms::default() },
        };
        let candidates = [make("zed", 0), make("amy", 1)];
        let choice = best(&rules, PeerKey(99), None, None, &History::default(), candidates.iter()).unwrap();
        assert_eq!(choice.id.to_string(), "amy#1");
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
        let routes: Vec<_> = trace.iter().filter(|l| l.contains(r#""kind":"route""#)).collect();
        assert!(routes[0].contains(r#""to":"alice#1""#) && routes[0].contains("new_utterance"), "{routes:?}");
        assert!(routes[1].contains(r#""from":"alice#1","to":"bob#1""#) && routes[1].contains("finished"), "{routes:?}");
    }
}
