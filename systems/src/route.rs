//! System 6, route: applies the recommender's decisions.
//!
//! An idle listener takes its choice at once: for an utterance that opened this tick that
//! is the same tick, so it hears the speaker from the first (pre-roll) packet. A busy
//! listener leaves its utterance for a new one only when the new score beats the one it
//! plays by `switch_margin` (hysteresis); otherwise it hears the new one later, from the
//! buffer. A full decision (finished, skip, evicted, muted, ...) always takes the listener
//! off what it played. Every change is a `route` event with its reason and score.
//!
//! A paused listener takes no new utterance: its position waits for it (an idle one gets
//! a full decision when it resumes). What the listener asks for itself (a skip, a mute,
//! new preferences) and eviction still apply; the new route waits for the resume too.

use bevy_ecs::prelude::{Query, Res, ResMut};

use encore_components::config::EngineConfig;
use encore_components::listener::{Cursor, History, ListenerSession, OutStreams, Playing, Route};
use encore_components::output::{Event, RouteReason};
use encore_components::resources::{
    Counters, DecisionKind, Decisions, EngineClock, ListenOutcome, ListenOutcomes, Outputs, Verdict,
};
use encore_components::utterance::{Audience, PacketBuffer, Utterance};

use crate::playout::catchup_bound_us;
use crate::recommend::switch_margin;
use crate::shared::bug;

/// What taking a listener off its utterance for this reason says about the utterance.
fn verdict(kind: DecisionKind) -> Verdict {
    match kind {
        DecisionKind::Full(RouteReason::Finished) => Verdict::Finished,
        DecisionKind::Full(RouteReason::Skip) => Verdict::Skipped,
        DecisionKind::Full(RouteReason::Muted) => Verdict::Muted,
        _ => Verdict::Interrupted,
    }
}

#[allow(clippy::type_complexity, clippy::too_many_arguments)]
pub fn route(
    config: Res<EngineConfig>,
    clock: Res<EngineClock>,
    mut decisions: ResMut<Decisions>,
    mut outputs: ResMut<Outputs>,
    mut counters: ResMut<Counters>,
    mut outcomes: ResMut<ListenOutcomes>,
    mut sessions: Query<(&ListenerSession, &mut Route, &mut OutStreams, &mut History)>,
    mut utterances: Query<(&Utterance, &PacketBuffer, &mut Audience)>,
) {
    decisions.last_tick = decisions.list.len() as u64;
    let margin = switch_margin(&config.recommender);
    let catchup_bound = catchup_bound_us(&config);
    for decision in decisions.list.drain(..) {
        let Ok((listener, mut route, mut streams, mut history)) = sessions.get_mut(decision.session) else {
            bug(&mut counters, "a decision names a session that lacks its components");
            continue;
        };
        if route.paused_since_us.is_some() && decision.kind == DecisionKind::NewUtterance {
            continue;
        }
        let current = route.playing.as_ref().map(|p| (p.utterance, p.id.clone(), p.score));
        let reason = match decision.kind {
            DecisionKind::NewUtterance => match (&current, &decision.choice, margin) {
                (None, _, _) => RouteReason::NewUtterance,
                (Some((_, _, playing_score)), Some(choice), Some(margin))
                    if choice.score >= decision.rescored.unwrap_or(*playing_score).saturating_add(margin) =>
                {
                    RouteReason::Switch
                }
                _ => continue,
            },
            DecisionKind::Full(reason) => reason,
        };
        if let Some(playing) = &route.playing {
            outcomes.list.push(ListenOutcome {
                listener: listener.key,
                speaker: playing.speaker,
                utterance: playing.ord,
                verdict: verdict(decision.kind),
                heard_us: clock.now_us.saturating_sub(playing.start_us),
            });
        }
        let from = match current {
            Some((entity, id, _)) => {
                route.playing = None;
                match utterances.get_mut(entity) {
                    Ok((_, _, mut audience)) => audience.playing = audience.playing.saturating_sub(1),
                    Err(_) => bug(&mut counters, "a listener played an utterance that is gone"),
                }
                Some(id)
            }
            None => decision.from,
        };
        let mut lag_us = None;
        let mut live = false;
        if let Some(choice) = &decision.choice {
            let Ok((utterance, buffer, mut audience)) = utterances.get_mut(choice.utterance) else {
                bug(&mut counters, "the recommender chose an utterance that is gone");
                continue;
            };
            let origin_media_us = [buffer.audio.packets.first(), buffer.video.packets.first()]
                .into_iter()
                .flatten()
                .map(|p| p.media_us)
                .min()
                .unwrap_or(utterance.started_us);
            audience.playing += 1;
            if history.heard.insert(choice.ord) {
                audience.heard += 1;
            }
            outcomes.list.push(ListenOutcome {
                listener: listener.key,
                speaker: utterance.speaker,
                utterance: choice.ord,
                verdict: Verdict::Started,
                heard_us: 0,
            });
            let lag = clock.now_us.saturating_sub(utterance.started_us);
            lag_us = Some(lag);
            live = utterance.is_open();
            // Live means live: a route at the live edge (behind only by the pre-roll) catches
            // up; one that starts further behind is time-shifted and keeps the original pace.
            let catchup_us = if live && lag <= catchup_bound { catchup_bound } else { 0 };
            route.playing = Some(Playing {
                utterance: choice.utterance,
                id: choice.id.clone(),
                ord: choice.ord,
                speaker: utterance.speaker,
                speaker_name: utterance.speaker_name.clone(),
                start_us: clock.now_us,
                origin_media_us,
                catchup_us,
                score: choice.score,
                terms: choice.terms,
                audio: Cursor::default(),
                video: Cursor::default(),
                video_needs_keyframe: true,
            });
            streams.audio.rebase = true;
            streams.video.rebase = true;
        }
        let to = route.playing.as_ref().map(|p| p.id.clone());
        if from.is_none() && to.is_none() {
            continue;
        }
        outputs.out.events.push(Event::Route {
            listener: listener.name.clone(),
            from,
            to,
            reason,
            score: decision.choice.as_ref().map(|c| c.score),
            terms: decision.choice.as_ref().map(|c| c.terms),
            lag_us,
            live,
        });
    }
}

#[cfg(test)]
mod tests {
    use crate::testkit::{Room, route, routes};
    use encore_components::config::EngineConfig;
    use encore_components::ids::Name;
    use encore_components::input::{FeedbackSignal, Input};
    use encore_components::output::RouteReason;

    #[test]
    fn a_busy_listener_switches_only_past_the_margin() {
        // The rules policy: following is worth 1000, the margin 800.
        let mut config = EngineConfig::default();
        config.recommender.policy = encore_components::config::Policy::Rules;
        let mut room = Room::new(config);
        room.speaker("alice", "a1");
        room.speaker("bob", "b1");
        room.speaker("carol", "c1");
        room.listener("lena");
        room.push(0, Input::Prefs { peer: Name::new("lena"), follow: vec![Name::new("carol")], mute: vec![] });
        room.talk("a1", 0, 3_000_000);
        // bob is no better than alice: no switch; carol is followed: a switch.
        room.talk("b1", 500_000, 1_500_000);
        room.talk("c1", 1_000_000, 2_000_000);
        let trace = room.run_until(2_500_000);
        let lena: Vec<_> = routes(&trace, "lena").into_iter().map(|(_, from, to, reason)| (from, to, reason)).collect();
        let some = |id: &str| Some(id.to_owned());
        assert_eq!(
            lena,
            vec![
                (None, some("alice#1"), RouteReason::NewUtterance),
                (some("alice#1"), some("carol#1"), RouteReason::Switch),
                // bob#1 waited in the buffer and comes after carol's.
                (some("carol#1"), some("bob#1"), RouteReason::Finished),
            ]
        );
    }

    #[test]
    fn a_skip_reroutes_at_once_and_idle_goes_to_null() {
        let mut room = Room::new(EngineConfig::default());
        room.speaker("alice", "a1");
        room.listener("lena");
        room.talk("a1", 0, 3_000_000);
        room.push(
            1_000_000,
            Input::Feedback { peer: Name::new("lena"), utterance: None, signal: FeedbackSignal::Skip },
        );
        let trace = room.run_until(1_100_000);
        let lena = routes(&trace, "lena");
        assert_eq!(lena.len(), 2, "{lena:?}");
        // The skip applies in the tick it arrives.
        assert_eq!(lena[1], route(100, Some("alice#1"), None, RouteReason::Skip));
    }

    #[test]
    fn a_route_says_whether_its_utterance_is_live() {
        let mut room = Room::new(EngineConfig::default());
        room.speaker("alice", "a1");
        room.speaker("bob", "b1");
        room.listener("lena");
        room.talk("a1", 0, 2_000_000);
        room.talk("b1", 500_000, 1_000_000);
        let trace = room.run_until(4_000_000);
        let lives: Vec<_> = trace
            .iter()
            .filter_map(|(_, e)| match e {
                encore_components::output::Event::Route { to: Some(to), live, .. } => Some((to.to_string(), *live)),
                _ => None,
            })
            .collect();
        // alice is heard live; bob's finished while lena listened to alice.
        assert_eq!(lives, vec![("alice#1".to_owned(), true), ("bob#1".to_owned(), false)]);
    }
}
