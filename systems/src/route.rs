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

use encore_components::config::{EngineConfig, Policy};
use encore_components::ids::UtteranceId;
use encore_components::listener::{
    Cursor, CutPlace, History, ListenerSession, OutStreams, PendingSwitch, Playing, Route,
};
use encore_components::output::{Event, RouteReason};
use encore_components::peer::Prefs;
use encore_components::resources::{
    Choice, Counters, DecisionKind, Decisions, EngineClock, ListenOutcome, ListenOutcomes, Outputs, SwitchesDue,
    Verdict,
};
use encore_components::utterance::{Audience, BufferedPacket, PacketBuffer, Utterance};

use crate::playout::{catchup_bound_us, resume};
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

type Sessions<'w, 's> =
    Query<'w, 's, (&'static ListenerSession, &'static mut Route, &'static mut OutStreams, &'static mut History)>;
type Utterances<'w, 's> = Query<'w, 's, (&'static Utterance, &'static PacketBuffer, &'static mut Audience)>;

/// Where a new route starts, and what the `route` event says of it.
enum Target {
    /// The recommender's choice, from its first packet.
    Choice(Choice),
    /// Back to a cut utterance, from where it was cut.
    Cut(CutPlace),
}

#[allow(clippy::too_many_arguments)]
pub fn route(
    config: Res<EngineConfig>,
    clock: Res<EngineClock>,
    mut decisions: ResMut<Decisions>,
    mut due: ResMut<SwitchesDue>,
    mut outputs: ResMut<Outputs>,
    mut counters: ResMut<Counters>,
    mut outcomes: ResMut<ListenOutcomes>,
    mut sessions: Sessions,
    mut utterances: Utterances,
    prefs: Query<&Prefs>,
) {
    decisions.last_tick = decisions.list.len() as u64;
    let margin = switch_margin(&config.recommender);
    let mut router = Router {
        now: clock.now_us,
        catchup_bound: catchup_bound_us(&config),
        outputs: &mut outputs,
        counters: &mut counters,
        outcomes: &mut outcomes,
    };
    for decision in decisions.list.drain(..) {
        let Ok((listener, mut route, mut streams, mut history)) = sessions.get_mut(decision.session) else {
            bug(router.counters, "a decision names a session that lacks its components");
            continue;
        };
        if route.paused_since_us.is_some() && decision.kind == DecisionKind::NewUtterance {
            continue;
        }
        let reason = match decision.kind {
            DecisionKind::NewUtterance => match (&route.playing, &decision.choice, margin) {
                (None, _, _) => RouteReason::NewUtterance,
                (Some(playing), Some(choice), Some(margin))
                    if choice.score >= decision.rescored.unwrap_or(playing.score).saturating_add(margin) =>
                {
                    if config.playout.switch_wait_ms > 0 {
                        // Wait for a pause in what plays (play-out says when); a better
                        // switch decided meanwhile replaces this one.
                        if route.pending_switch.as_ref().is_none_or(|p| choice.score > p.choice.score) {
                            route.pending_switch =
                                Some(PendingSwitch { choice: choice.clone(), decided_us: clock.now_us });
                        }
                        continue;
                    }
                    RouteReason::Switch
                }
                _ => continue,
            },
            DecisionKind::Full(reason) => reason,
        };
        // A full decision (or a switch at once) supersedes a switch that waited.
        route.pending_switch = None;
        let target = match decision.kind {
            // Done with what a switch put in the place of the cut utterance: back to the cut.
            DecisionKind::Full(
                RouteReason::Finished | RouteReason::Skip | RouteReason::Muted | RouteReason::Evicted,
            ) => route
                .cut
                .take()
                .filter(|cut| {
                    let muted = prefs.get(listener.peer).is_ok_and(|p| p.mute.contains(&cut.speaker_name));
                    !muted && resumable(utterances.get(cut.utterance).ok().map(|(u, b, _)| (u, b)), cut)
                })
                .map(Target::Cut),
            DecisionKind::Full(_) => {
                route.cut = None;
                None
            }
            DecisionKind::NewUtterance => None,
        };
        let resume = target.is_some();
        let target = target.or_else(|| decision.choice.clone().map(Target::Choice));
        let (first, then) = if resume { (None, target) } else { (target, None) };
        // Back to a cut: two events, so the trace still says how the new one ended.
        router.reroute(
            listener,
            &mut route,
            &mut streams,
            &mut history,
            &mut utterances,
            verdict(decision.kind),
            decision.from.clone(),
            first,
            reason,
        );
        if then.is_some() {
            let ended = Verdict::Interrupted;
            let (s, h) = (&mut streams, &mut history);
            router.reroute(listener, &mut route, s, h, &mut utterances, ended, None, then, RouteReason::ResumeCut);
        }
    }
    // Switches whose pause (or wait's end) play-out found in the last tick.
    for (session, at_pause) in std::mem::take(&mut due.list) {
        let Ok((listener, mut route, mut streams, mut history)) = sessions.get_mut(session) else {
            // The listener left since.
            continue;
        };
        let Some(pending) = route.pending_switch.take() else { continue };
        if route.paused_since_us.is_some() || route.playing.is_none() {
            continue;
        }
        // Gone meanwhile (evicted): nothing to switch to; the listener plays on.
        let alive = utterances.get(pending.choice.utterance).is_ok_and(|(u, _, _)| u.ord == pending.choice.ord);
        if !alive {
            continue;
        }
        // `loudest` plays only what is live: it never goes back to a cut.
        let resume_cut = config.playout.resume_cut && config.recommender.policy != Policy::Loudest;
        route.cut = match (&route.playing, resume_cut) {
            (Some(playing), true) => Some(CutPlace {
                utterance: playing.utterance,
                id: playing.id.clone(),
                ord: playing.ord,
                speaker: playing.speaker,
                speaker_name: playing.speaker_name.clone(),
                score: playing.score,
                terms: playing.terms,
                audio: playing.audio,
                video: playing.video,
            }),
            _ => None,
        };
        let reason = if at_pause { RouteReason::SwitchAtPause } else { RouteReason::Switch };
        router.reroute(
            listener,
            &mut route,
            &mut streams,
            &mut history,
            &mut utterances,
            Verdict::Interrupted,
            None,
            Some(Target::Choice(pending.choice)),
            reason,
        );
    }
}

/// A cut utterance can be played on: it is still there (`found`, the entity it was cut in)
/// and has something left to play.
pub fn resumable(found: Option<(&Utterance, &PacketBuffer)>, cut: &CutPlace) -> bool {
    let Some((utterance, buffer)) = found else { return false };
    utterance.ord == cut.ord
        && (utterance.is_open() || resume(&buffer.audio.packets, &cut.audio) < buffer.audio.packets.len())
}

/// Where the cursor of a cut route stands in a buffer now (eviction may have trimmed it).
fn cursor_at(packets: &[BufferedPacket], cut: &Cursor, reshapes: u32) -> Cursor {
    Cursor { next: resume(packets, cut), last_ext_seq: cut.last_ext_seq, reshapes, ..Cursor::default() }
}

struct Router<'a> {
    now: u64,
    catchup_bound: u64,
    outputs: &'a mut Outputs,
    counters: &'a mut Counters,
    outcomes: &'a mut ListenOutcomes,
}

impl Router<'_> {
    /// Takes the listener off what it plays (its outcome told to the learn system) and onto
    /// `target`, or idle; one `route` event says so.
    #[allow(clippy::too_many_arguments)]
    fn reroute(
        &mut self,
        listener: &ListenerSession,
        route: &mut Route,
        streams: &mut OutStreams,
        history: &mut History,
        utterances: &mut Utterances,
        ended: Verdict,
        from: Option<UtteranceId>,
        target: Option<Target>,
        reason: RouteReason,
    ) {
        let now = self.now;
        let from = match route.playing.take() {
            Some(playing) => {
                self.outcomes.list.push(ListenOutcome {
                    listener: listener.key,
                    speaker: playing.speaker,
                    utterance: playing.ord,
                    verdict: ended,
                    heard_us: now.saturating_sub(playing.start_us),
                });
                match utterances.get_mut(playing.utterance) {
                    Ok((_, _, mut audience)) => audience.playing = audience.playing.saturating_sub(1),
                    Err(_) => bug(self.counters, "a listener played an utterance that is gone"),
                }
                Some(playing.id)
            }
            None => from,
        };
        let mut lag_us = None;
        let mut live = false;
        let mut score = None;
        let mut terms = None;
        if let Some(target) = target {
            let entity = match &target {
                Target::Choice(choice) => choice.utterance,
                Target::Cut(cut) => cut.utterance,
            };
            let Ok((utterance, buffer, mut audience)) = utterances.get_mut(entity) else {
                bug(self.counters, "the router was given an utterance that is gone");
                return;
            };
            audience.playing += 1;
            let lag = now.saturating_sub(utterance.started_us);
            lag_us = Some(lag);
            live = utterance.is_open();
            let playing = match target {
                Target::Choice(choice) => {
                    if history.heard.insert(choice.ord) {
                        audience.heard += 1;
                    }
                    let origin_media_us = [buffer.audio.packets.first(), buffer.video.packets.first()]
                        .into_iter()
                        .flatten()
                        .map(|p| p.media_us)
                        .min()
                        .unwrap_or(utterance.started_us);
                    // Live means live: a route at the live edge (behind only by the pre-roll)
                    // catches up; one that starts further behind is time-shifted and keeps the
                    // original pace.
                    let catchup_us = if live && lag <= self.catchup_bound { self.catchup_bound } else { 0 };
                    score = Some(choice.score);
                    terms = Some(choice.terms);
                    Playing {
                        utterance: choice.utterance,
                        id: choice.id,
                        ord: choice.ord,
                        speaker: utterance.speaker,
                        speaker_name: utterance.speaker_name.clone(),
                        start_us: now,
                        origin_media_us,
                        catchup_us,
                        score: choice.score,
                        terms: choice.terms,
                        audio: Cursor::default(),
                        video: Cursor::default(),
                        video_needs_keyframe: true,
                    }
                }
                Target::Cut(cut) => {
                    // From the packet after the last one sent, due now, at the original pace
                    // (it is behind live by what played meanwhile); video from a key frame.
                    let audio = cursor_at(&buffer.audio.packets, &cut.audio, buffer.reshapes);
                    let origin_media_us = buffer
                        .audio
                        .packets
                        .get(audio.next)
                        .or(buffer.audio.packets.last())
                        .map_or(utterance.started_us, |p| p.media_us);
                    let video_skip = buffer.video.packets.partition_point(|p| p.media_us < origin_media_us);
                    let video = Cursor {
                        next: video_skip,
                        last_ext_seq: video_skip.checked_sub(1).map(|i| buffer.video.packets[i].ext_seq),
                        reshapes: buffer.reshapes,
                        ..Cursor::default()
                    };
                    score = Some(cut.score);
                    terms = Some(cut.terms);
                    Playing {
                        utterance: cut.utterance,
                        id: cut.id,
                        ord: cut.ord,
                        speaker: cut.speaker,
                        speaker_name: cut.speaker_name,
                        start_us: now,
                        origin_media_us,
                        catchup_us: 0,
                        score: cut.score,
                        terms: cut.terms,
                        audio,
                        video,
                        video_needs_keyframe: true,
                    }
                }
            };
            self.outcomes.list.push(ListenOutcome {
                listener: listener.key,
                speaker: utterance.speaker,
                utterance: playing.ord,
                verdict: Verdict::Started,
                heard_us: 0,
            });
            route.playing = Some(playing);
            streams.audio.rebase = true;
            streams.video.rebase = true;
        }
        let to = route.playing.as_ref().map(|p| p.id.clone());
        if from.is_none() && to.is_none() {
            return;
        }
        self.outputs.out.events.push(Event::Route {
            listener: listener.name.clone(),
            from,
            to,
            reason,
            score,
            terms,
            lag_us,
            live,
        });
    }
}

#[cfg(test)]
mod tests {
    use crate::testkit::{Room, route, routes};
    use encore_components::config::{EngineConfig, PlayoutConfig, Policy};
    use encore_components::ids::MediaKind;
    use encore_components::ids::Name;
    use encore_components::input::{FeedbackSignal, Input};
    use encore_components::output::RouteReason;

    #[test]
    fn a_busy_listener_switches_only_past_the_margin() {
        // The rules policy: following is worth 1000, the margin 800. Switches at once.
        let mut config = EngineConfig::default();
        config.recommender.policy = Policy::Rules;
        config.playout = PlayoutConfig::LEGACY;
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

    /// lena hears alice; carol, whom lena follows, starts at 1.0 s while alice still talks.
    fn room_with_a_followed_speaker(alice: &[(u64, u64, bool)]) -> Room {
        let mut config = EngineConfig::default();
        config.recommender.policy = Policy::Rules;
        let mut room = Room::new(config);
        room.speaker("alice", "a1");
        room.speaker("carol", "c1");
        room.listener("lena");
        room.push(0, Input::Prefs { peer: Name::new("lena"), follow: vec![Name::new("carol")], mute: vec![] });
        for (from, to, voiced) in alice {
            match voiced {
                true => room.talk("a1", *from, *to),
                false => room.silence("a1", *from, *to),
            }
        }
        room.talk("c1", 1_000_000, 2_000_000);
        room
    }

    /// The source sequence numbers of one utterance as sent to the listener, in order.
    fn sent_of(room: &mut Room, id: &str) -> Vec<u16> {
        let ord = room.engine.utterance_ord(&id.parse().unwrap()).unwrap();
        room.sent
            .iter()
            .filter(|(_, p)| p.utterance == ord && p.media == MediaKind::Audio)
            .map(|(_, p)| p.src_seq)
            .collect()
    }

    #[test]
    fn a_switch_waits_for_a_pause_and_the_cut_utterance_resumes_where_it_was_cut() {
        // alice pauses from 1.2 s to 1.5 s: the switch to carol, decided at her onset
        // (1.04 s), waits for 200 ms of that pause.
        let mut room = room_with_a_followed_speaker(&[
            (0, 1_200_000, true),
            (1_200_000, 1_500_000, false),
            (1_500_000, 3_000_000, true),
        ]);
        let trace = room.run_until(8_000_000);
        let lena = routes(&trace, "lena");
        let some = |id: &str| Some(id.to_owned());
        let steps: Vec<_> = lena.iter().map(|(_, from, to, reason)| (from.clone(), to.clone(), *reason)).collect();
        assert_eq!(
            steps,
            vec![
                (None, some("alice#1"), RouteReason::NewUtterance),
                (some("alice#1"), some("carol#1"), RouteReason::SwitchAtPause),
                (some("carol#1"), None, RouteReason::Finished),
                (None, some("alice#1"), RouteReason::ResumeCut),
                (some("alice#1"), None, RouteReason::Finished),
            ]
        );
        // The switch came once 200 ms of the pause had played (packets of 1.20-1.40 s sent in
        // the ticks they arrived), a tick later: not in the middle of a word.
        assert_eq!(lena[1].0, 141, "{lena:?}");
        // alice's utterance is heard whole and in order, each packet once: up to the cut,
        // then on from the packet after it, with only her silent tail shortened.
        let alice = sent_of(&mut room, "alice#1");
        let buffered = room.buffer_of("alice#1").audio.packets;
        assert!(alice.windows(2).all(|w| w[1] == w[0].wrapping_add(1)), "{alice:?}");
        let voiced: Vec<u16> = buffered.iter().filter(|p| p.voiced).map(|p| p.seq).collect();
        assert!(voiced.iter().all(|seq| alice.contains(seq)), "a word was lost");
        assert_eq!(alice.first(), buffered.first().map(|p| p.seq).as_ref());
    }

    #[test]
    fn without_a_pause_a_switch_happens_when_its_wait_ends_and_a_skip_of_the_new_one_resumes_the_cut() {
        let mut room = room_with_a_followed_speaker(&[(0, 6_000_000, true)]);
        // lena skips carol soon after the switch: back to alice.
        room.push(
            3_300_000,
            Input::Feedback { peer: Name::new("lena"), utterance: None, signal: FeedbackSignal::Skip },
        );
        let trace = room.run_until(9_000_000);
        let lena = routes(&trace, "lena");
        let reasons: Vec<_> = lena.iter().map(|(_, _, to, reason)| (to.clone(), *reason)).collect();
        let some = |id: &str| Some(id.to_owned());
        assert_eq!(
            reasons,
            vec![
                (some("alice#1"), RouteReason::NewUtterance),
                (some("carol#1"), RouteReason::Switch),
                (None, RouteReason::Skip),
                (some("alice#1"), RouteReason::ResumeCut),
                (None, RouteReason::Finished),
            ]
        );
        // Decided at carol's onset (1.04 s), no pause in alice: at the 2 s bound.
        assert_eq!(lena[1].0, 305, "{lena:?}");
        assert_eq!((lena[2].0, lena[3].0), (330, 330), "the skip applies at once");
        let alice = sent_of(&mut room, "alice#1");
        assert!(alice.windows(2).all(|w| w[1] == w[0].wrapping_add(1)), "{alice:?}");
        assert_eq!(alice.len(), room.buffer_of("alice#1").audio.packets.len());
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
