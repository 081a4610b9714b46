//! Up next: what a listener will hear after what it hears now, best first.
//!
//! Not a system of the tick but a read of the world between ticks ([`crate::Engine::up_next`]):
//! it writes nothing (the `learn` policy's exploration is a keyed draw, not a step of the
//! seeded source), so asking every tick leaves the room's decisions as they were, which a
//! test holds replays to. The queue is, in order:
//!
//! 1. a switch that is decided and waits for a pause in what plays (`switch`);
//! 2. the utterance a switch cut, played on from the cut once the listener is done with what
//!    it switched to (`resume_cut`);
//! 3. the candidates of a full decision ranked by the policy's scorer for this listener, as
//!    the recommender would rank them if the listener were free now (`recommended`): the
//!    first is what a full decision now would pick.
//!
//! It is a forecast: an utterance that opens, a like, a skip or a new preference changes it.

use bevy_ecs::prelude::{Entity, World};

use encore_components::config::{EngineConfig, Policy};
use encore_components::ids::{PeerKey, UtteranceOrd};
use encore_components::learner::Learner;
use encore_components::listener::{History, ListenerSession, Route};
use encore_components::output::{UpNext, UpNextReason};
use encore_components::peer::{Affinity, Prefs};
use encore_components::resources::{Directory, Dominance, EngineClock, EngineRng};
use encore_components::utterance::{PacketBuffer, Utterance};

use crate::recommend::{Candidate, Listener, Rules, Scorer, candidate_pool, fifo, learned, loudest, ranked};
use crate::route::resumable;

/// The queues of `keys`, each at most `n` long, in the order of `keys`; `None` for a peer that
/// is not listening (or not in the room: no key). The pool is built and the policy's model read once for all of them.
pub fn up_next(world: &World, keys: &[Option<PeerKey>], n: usize) -> Vec<Option<Vec<UpNext>>> {
    let config = &world.resource::<EngineConfig>().recommender;
    let (clock, directory) = (world.resource::<EngineClock>(), world.resource::<Directory>());
    let dominance = world.resource::<Dominance>();
    let pool = candidate_pool(config, dominance, clock, directory, |entity| lookup(world, entity));
    match config.policy {
        Policy::Rules => queues(world, &Rules { config }, &pool, keys, n),
        Policy::Fifo => queues(world, &fifo::Fifo, &pool, keys, n),
        Policy::Loudest => queues(world, &loudest::Loudest { config }, &pool, keys, n),
        Policy::Learn => {
            let (learner, rng) = (world.resource::<Learner>(), world.resource::<EngineRng>());
            let scorer = learned::Learned::new(&config.learn, learner, rng, clock, &pool);
            queues(world, &scorer, &pool, keys, n)
        }
    }
}

fn lookup(world: &World, entity: Entity) -> Option<(&Utterance, &PacketBuffer)> {
    Some((world.get::<Utterance>(entity)?, world.get::<PacketBuffer>(entity)?))
}

fn queues<S: Scorer>(
    world: &World,
    scorer: &S,
    pool: &[Candidate],
    keys: &[Option<PeerKey>],
    n: usize,
) -> Vec<Option<Vec<UpNext>>> {
    keys.iter().map(|key| queue(world, scorer, pool, (*key)?, n)).collect()
}

/// One listener's queue.
fn queue<S: Scorer>(world: &World, scorer: &S, pool: &[Candidate], key: PeerKey, n: usize) -> Option<Vec<UpNext>> {
    let session = *world.resource::<Directory>().listeners.get(&key)?;
    let (session_of, route, history) =
        (world.get::<ListenerSession>(session)?, world.get::<Route>(session)?, world.get::<History>(session)?);
    let prefs = world.get::<Prefs>(session_of.peer);
    let listener = Listener { key, prefs, affinity: world.get::<Affinity>(session_of.peer), history };
    let now_us = world.resource::<EngineClock>().now_us;
    let item = |entity: Entity, ord: UtteranceOrd, reason: UpNextReason, score: i64| -> Option<UpNext> {
        let (utterance, _) = lookup(world, entity)?;
        (utterance.ord == ord).then(|| UpNext {
            id: utterance.id.clone(),
            live: utterance.is_open(),
            age_us: now_us.saturating_sub(utterance.started_us),
            reason,
            score,
        })
    };

    let mut queue = Vec::with_capacity(n);
    if let Some(pending) = &route.pending_switch {
        queue.extend(item(pending.choice.utterance, pending.choice.ord, UpNextReason::Switch, pending.choice.score));
    }
    if let Some(cut) = &route.cut {
        let muted = prefs.is_some_and(|p| p.mute.contains(&cut.speaker_name));
        if !muted && resumable(lookup(world, cut.utterance), cut) {
            queue.extend(item(cut.utterance, cut.ord, UpNextReason::ResumeCut, cut.score));
        }
    }
    queue.truncate(n);
    let skip: Vec<UtteranceOrd> = route.pending_switch.iter().map(|p| p.choice.ord).collect();
    let room = n - queue.len();
    if room > 0 {
        for choice in ranked(scorer, &listener, pool, &skip, room) {
            queue.extend(item(choice.utterance, choice.ord, UpNextReason::Recommended, choice.score));
        }
    }
    Some(queue)
}

#[cfg(test)]
mod tests {
    use encore_components::config::{EngineConfig, Policy};
    use encore_components::ids::Name;
    use encore_components::input::{FeedbackSignal, Input};
    use encore_components::output::{RouteReason, UpNext, UpNextReason};

    use crate::testkit::{Room, routes};

    /// Ticks the room to `until_us` one tick at a time, and after each tick asks `listener`'s
    /// queue (at most 5): by tick.
    fn queues(room: &mut Room, listener: &str, until_us: u64) -> Vec<(u64, Vec<UpNext>)> {
        let mut asked = Vec::new();
        while room.engine.next_tick_us() <= until_us {
            let at = room.engine.next_tick_us();
            room.run_until(at);
            let tick = room.engine.next_tick() - 1;
            asked.push((tick, room.engine.up_next(listener, 5).expect("listening")));
        }
        asked
    }

    fn ids(queue: &[UpNext]) -> Vec<(String, UpNextReason)> {
        queue.iter().map(|item| (item.id.to_string(), item.reason)).collect()
    }

    /// The queue as it stood after the tick before `tick`.
    fn before(asked: &[(u64, Vec<UpNext>)], tick: u64) -> &[UpNext] {
        &asked.iter().find(|(t, _)| *t + 1 == tick).expect("asked every tick").1
    }

    fn overlapping_room(policy: Policy) -> Room {
        let mut config = EngineConfig::default();
        config.recommender.policy = policy;
        let mut room = Room::new(config);
        for (name, track) in [("alice", "a1"), ("bob", "b1"), ("carol", "c1"), ("dave", "d1")] {
            room.speaker(name, track);
        }
        room.listener("lena");
        room.push(0, Input::Prefs { peer: Name::new("lena"), follow: vec![], mute: vec![Name::new("dave")] });
        room.talk("a1", 0, 3_000_000);
        room.talk("b1", 500_000, 1_500_000);
        room.talk("c1", 1_000_000, 2_000_000);
        room.talk("d1", 1_200_000, 2_200_000);
        room
    }

    #[test]
    fn the_head_of_the_queue_is_what_the_listener_hears_next() {
        for policy in [Policy::Rules, Policy::Learn, Policy::Fifo] {
            let mut room = overlapping_room(policy);
            let asked = queues(&mut room, "lena", 10_000_000);
            let lena = routes(&room.trace, "lena");
            // alice from her onset; bob's and carol's wait in the buffer and follow.
            let heard: Vec<_> = lena.iter().filter_map(|(_, _, to, _)| to.clone()).collect();
            assert_eq!(heard.len(), 3, "{policy}: {lena:?}");
            assert_eq!(heard[0], "alice#1");
            let mut next_ones = 0;
            for (tick, _, to, reason) in &lena[1..] {
                let Some(to) = to else { continue };
                assert_eq!(*reason, RouteReason::Finished, "{policy}");
                let queue = before(&asked, *tick);
                assert_eq!(queue[0].id.to_string(), *to, "{policy}: queue {:?}", ids(queue));
                assert_eq!(queue[0].reason, UpNextReason::Recommended);
                next_ones += 1;
            }
            assert_eq!(next_ones, 2, "{policy}");
            // While alice plays and the others have ended: both others, never alice (playing),
            // never dave (muted), never lena's own voice; best first, each once.
            let (_, queue) = asked.iter().find(|(tick, _)| *tick == 280).expect("tick 280");
            let mut queued: Vec<String> = queue.iter().map(|item| item.id.to_string()).collect();
            assert!(queue.windows(2).all(|w| w[0].score >= w[1].score), "{policy}: {:?}", ids(queue));
            queued.sort();
            assert_eq!(queued, ["bob#1", "carol#1"], "{policy}");
            assert!(queue.iter().all(|item| !item.live && item.age_us > 0));
            // Once everything was heard, nothing is left to come.
            assert!(asked.last().expect("asked").1.is_empty(), "{policy}");
        }
    }

    #[test]
    fn a_waiting_switch_comes_first_and_then_the_cut_utterance() {
        // lena hears alice and follows carol, who starts at 1.0 s; alice pauses from 1.2 s.
        let mut config = EngineConfig::default();
        config.recommender.policy = Policy::Rules;
        let mut room = Room::new(config);
        room.speaker("alice", "a1");
        room.speaker("carol", "c1");
        room.listener("lena");
        room.push(0, Input::Prefs { peer: Name::new("lena"), follow: vec![Name::new("carol")], mute: vec![] });
        room.talk("a1", 0, 1_200_000);
        room.silence("a1", 1_200_000, 1_500_000);
        room.talk("a1", 1_500_000, 3_000_000);
        room.talk("c1", 1_000_000, 2_000_000);
        let asked = queues(&mut room, "lena", 8_000_000);
        let lena = routes(&room.trace, "lena");
        let switch = lena.iter().find(|(_, _, _, r)| *r == RouteReason::SwitchAtPause).expect("a switch").0;
        let resume = lena.iter().find(|(_, _, _, r)| *r == RouteReason::ResumeCut).expect("a resume").0;
        // Between carol's onset and the switch: carol, waiting for a pause.
        let waiting = before(&asked, switch);
        assert_eq!(ids(waiting)[0], ("carol#1".to_owned(), UpNextReason::Switch));
        assert!(waiting[0].live);
        // While carol plays: back to alice where she was cut.
        let (_, cut) = asked.iter().find(|(tick, _)| *tick == switch).expect("asked");
        assert_eq!(ids(cut), [("alice#1".to_owned(), UpNextReason::ResumeCut)]);
        assert_eq!(ids(before(&asked, resume)), [("alice#1".to_owned(), UpNextReason::ResumeCut)]);
        // A peer that is not in the room has no queue.
        assert!(room.engine.up_next("nobody", 5).is_none());
    }

    #[test]
    fn asking_every_tick_changes_no_decision() {
        for policy in Policy::ALL {
            let run = |ask: bool| {
                let mut room = overlapping_room(policy);
                room.listener("liv");
                room.push(
                    1_600_000,
                    Input::Feedback { peer: Name::new("liv"), utterance: None, signal: FeedbackSignal::Like },
                );
                room.push(
                    2_100_000,
                    Input::Feedback { peer: Name::new("lena"), utterance: None, signal: FeedbackSignal::Skip },
                );
                let mut asked = 0;
                while room.engine.next_tick_us() <= 12_000_000 {
                    let at = room.engine.next_tick_us();
                    room.run_until(at);
                    if ask {
                        for listener in ["lena", "liv"] {
                            asked += room.engine.up_next(listener, 3).expect("listening").len();
                        }
                    }
                }
                (format!("{:?}", room.trace), format!("{:?}", room.sent), asked)
            };
            let (trace, sent, _) = run(false);
            let (asked_trace, asked_sent, asked) = run(true);
            assert!(asked > 0, "{policy}: the queues were never asked anything");
            assert!(trace == asked_trace, "{policy}: asking changed a decision");
            assert!(sent == asked_sent, "{policy}: asking changed a packet");
        }
    }
}
