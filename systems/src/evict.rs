//! System 4, evict: holds the buffer's accounted bytes at or under the cap at the end of
//! every tick, whatever arrived.
//!
//! Order, cheapest loss first, each step only while still over:
//! 1. finished utterances nobody is playing, by predicted value (listeners that have not
//!    heard it; zero once it is older than the recommender's window), then age, then ordinal;
//! 2. the oldest packets of open utterances nobody is playing, largest first;
//! 3. the packets of played utterances that every one of their listeners has passed,
//!    largest first (nobody hears the difference now);
//! 4. finished utterances being played, by listeners playing, value, age, ordinal (their
//!    listeners are rerouted with reason `evicted`);
//! 5. the oldest packets of open utterances being played, largest first (a listener that
//!    had not reached the cut starts again from the new first packet: a clean cut-over,
//!    video from a key frame);
//! 6. the pre-roll rings of silent tracks;
//! 7. open utterances whole (a speaker still talking continues in a new utterance).
//!
//! Steps 1, 2 and 4 go down to [`headroom`] under the cap so they run in bursts, not every
//! tick; the others stop at the cap. A trimmed utterance gives back its vector's spare
//! capacity only when three quarters of it are unused, so a steady trim does not reallocate
//! every tick. Everything evicted is traced and counted.
//!
//! Every removal is also written down as an [`EvictOrder`] (`Evictions::made`). A replica
//! (an edge's engine, docs/scaling.md) applies its origin's orders of the tick first and
//! decides nothing itself: its listeners differ from the origin's, and choosing by them
//! would give it another buffer and, through step 7, other utterances. Only if it were still
//! over its cap after them (it cannot be while it follows its origin's inputs) does it fall
//! back to its own choice, since a cap is a cap.

use bevy_ecs::prelude::{Entity, World};

use encore_components::config::EngineConfig;
use encore_components::ids::UtteranceOrd;
use encore_components::listener::{ListenerSession, Route};
use encore_components::output::{Event, RouteReason};
use encore_components::replica::{EvictOrder, Evictions};
use encore_components::resources::{BufferLedger, Counters, DecisionNeed, DecisionQueue, Directory, EngineClock};
use encore_components::track::{PreRoll, Recording, Voice};
use encore_components::utterance::{Audience, PacketBuffer, Utterance};

use crate::accounting::{account, buffer_bytes, payload_bytes};
use crate::shared::{emit, stop_playing, world_bug};

/// How far under the cap whole-utterance eviction goes: 1/64 of the cap, at most 4 MiB.
pub fn headroom(cap: u64) -> u64 {
    (cap / 64).min(4 << 20)
}

struct Candidate {
    entity: Entity,
    ord: UtteranceOrd,
    open: bool,
    playing: u32,
    value: u64,
    started_us: u64,
    /// Opened this tick.
    fresh: bool,
}

pub fn evict(world: &mut World) {
    world.resource_mut::<Evictions>().made.clear();
    apply_origin_orders(world);
    let ledger = *world.resource::<BufferLedger>();
    if ledger.bytes <= ledger.cap {
        return;
    }
    let config = world.resource::<EngineConfig>().clone();
    let clock = *world.resource::<EngineClock>();
    let target = ledger.cap - headroom(ledger.cap);
    let candidates = candidates(world, &config, &clock);
    let (mut open, mut finished): (Vec<&Candidate>, Vec<&Candidate>) = candidates.iter().partition(|c| c.open);
    finished.sort_by_key(|c| (c.playing, c.value, c.started_us, c.ord));
    open.sort_by_key(|c| c.ord);
    let (unplayed_finished, played_finished): (Vec<&Candidate>, Vec<&Candidate>) =
        finished.into_iter().partition(|c| c.playing == 0);
    // An utterance that opened this tick is about to be routed to the idle listeners (the
    // router runs after this): it is treated as played, or they would lose its start.
    let (unplayed_open, played_open): (Vec<&Candidate>, Vec<&Candidate>) =
        open.into_iter().partition(|c| c.playing == 0 && !c.fresh);

    let played: Vec<&Candidate> = candidates.iter().filter(|c| c.playing > 0).collect();
    if evict_whole_until(world, &unplayed_finished, target)
        || trim_until(world, &clock, &unplayed_open, target, Trim::Front)
        || trim_until(world, &clock, &played, ledger.cap, Trim::PlayedByAll)
        || evict_whole_until(world, &played_finished, target)
        || trim_until(world, &clock, &played_open, ledger.cap, Trim::Front)
    {
        return;
    }
    let tracks: Vec<Entity> = world.resource::<Directory>().tracks.values().copied().collect();
    for track in tracks {
        if bytes(world) <= ledger.cap {
            return;
        }
        clear_preroll(world, track);
    }
    let all_open: Vec<&Candidate> = candidates.iter().filter(|c| c.open).collect();
    evict_whole_until(world, &all_open, ledger.cap);
}

/// On a replica, applies the origin's orders for this tick, in the origin's order. An order
/// naming an utterance or track the replica does not hold is skipped (it cannot happen
/// while the replica follows its origin; the trace then shows the divergence).
fn apply_origin_orders(world: &mut World) {
    let tick = world.resource::<EngineClock>().tick;
    let orders = {
        let mut evictions = world.resource_mut::<Evictions>();
        let Some(replica) = evictions.replica.as_mut() else { return };
        // Orders of ticks already run (none, unless the host skipped ticks) are stale.
        let later = replica.split_off(&(tick + 1));
        let mut due = std::mem::replace(replica, later);
        due.remove(&tick).unwrap_or_default()
    };
    if orders.is_empty() {
        return;
    }
    let clock = *world.resource::<EngineClock>();
    for order in orders {
        match order {
            EvictOrder::Whole { utterance } => {
                if let Some(entity) = utterance_entity(world, &utterance) {
                    evict_whole(world, entity);
                }
            }
            EvictOrder::Trim { utterance, audio, video } => {
                if let Some(entity) = utterance_entity(world, &utterance) {
                    cut(world, &clock, entity, audio as usize, video as usize);
                }
            }
            EvictOrder::PreRoll { track } => {
                if let Some(entity) = world.resource::<Directory>().tracks.get(&track).copied() {
                    clear_preroll(world, entity);
                }
            }
        }
    }
}

fn utterance_entity(world: &World, id: &encore_components::ids::UtteranceId) -> Option<Entity> {
    let directory = world.resource::<Directory>();
    let ord = directory.utterance_ids.get(id)?;
    directory.utterances.get(ord).copied()
}

/// Evicts the candidates in order until the buffer is at or under `target`; true when it is.
fn evict_whole_until(world: &mut World, candidates: &[&Candidate], target: u64) -> bool {
    for candidate in candidates {
        if bytes(world) <= target {
            return true;
        }
        evict_whole(world, candidate.entity);
    }
    bytes(world) <= target
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Trim {
    /// From the front, as far as needed.
    Front,
    /// From the front, only what every listener playing it has passed.
    PlayedByAll,
}

/// Trims the largest of the candidates, again and again, until the buffer is at or under
/// `cap` or nothing more can go; true when under.
fn trim_until(world: &mut World, clock: &EngineClock, candidates: &[&Candidate], cap: u64, mode: Trim) -> bool {
    let mut exhausted: Vec<Entity> = Vec::new();
    loop {
        let over = bytes(world).saturating_sub(cap);
        if over == 0 {
            return true;
        }
        let largest = candidates
            .iter()
            .filter(|c| !exhausted.contains(&c.entity))
            .filter_map(|c| {
                let buffer = world.get::<PacketBuffer>(c.entity)?;
                let empty = buffer.audio.packets.is_empty() && buffer.video.packets.is_empty();
                (!empty).then_some((buffer.bytes, std::cmp::Reverse(c.ord), c.entity))
            })
            .max();
        let Some((_, _, entity)) = largest else { return false };
        let limits = match mode {
            Trim::Front => None,
            Trim::PlayedByAll => Some(passed_by_all(world, entity)),
        };
        if trim(world, clock, entity, over, limits) == 0 {
            exhausted.push(entity);
        }
    }
}

/// How many audio and video packets at the front of an utterance every listener playing it
/// has already passed.
fn passed_by_all(world: &World, entity: Entity) -> (usize, usize) {
    let Some(buffer) = world.get::<PacketBuffer>(entity) else {
        debug_assert!(false, "an utterance in the directory has no PacketBuffer");
        return (0, 0);
    };
    let listeners = listeners_of(world, entity);
    if listeners.is_empty() {
        return (0, 0);
    }
    let mut limits = (buffer.audio.packets.len(), buffer.video.packets.len());
    for session in listeners {
        // listeners_of gives only sessions playing this utterance.
        let Some(playing) = world.get::<Route>(session).and_then(|r| r.playing.as_ref()) else {
            debug_assert!(false, "a listener of an utterance plays nothing");
            continue;
        };
        let passed = |packets: &[encore_components::utterance::BufferedPacket], last: Option<u64>| {
            last.map_or(0, |last| packets.partition_point(|p| p.ext_seq <= last))
        };
        limits.0 = limits.0.min(passed(&buffer.audio.packets, playing.audio.last_ext_seq));
        limits.1 = limits.1.min(passed(&buffer.video.packets, playing.video.last_ext_seq));
    }
    limits
}

fn bytes(world: &World) -> u64 {
    world.resource::<BufferLedger>().bytes
}

fn candidates(world: &World, config: &EngineConfig, clock: &EngineClock) -> Vec<Candidate> {
    let directory = world.resource::<Directory>();
    let listeners = directory.listeners.len() as u64;
    let window_us = config.recommender.window_ms * 1000;
    directory
        .utterances
        .iter()
        .filter_map(|(ord, entity)| {
            let utterance = world.get::<Utterance>(*entity)?;
            let audience = world.get::<Audience>(*entity).copied().unwrap_or_default();
            let in_window = utterance.started_us + window_us >= clock.now_us;
            Some(Candidate {
                entity: *entity,
                ord: *ord,
                open: utterance.is_open(),
                playing: audience.playing,
                value: if in_window { listeners.saturating_sub(audience.heard as u64) } else { 0 },
                started_us: utterance.started_us,
                fresh: utterance.opened_us == clock.now_us,
            })
        })
        .collect()
}

/// Listeners playing `utterance`, in key order.
fn listeners_of(world: &World, utterance: Entity) -> Vec<Entity> {
    if world.get::<Audience>(utterance).is_none_or(|a| a.playing == 0) {
        return Vec::new();
    }
    world
        .resource::<Directory>()
        .listeners
        .values()
        .copied()
        .filter(|session| {
            world.get::<Route>(*session).and_then(|r| r.playing.as_ref()).is_some_and(|p| p.utterance == utterance)
        })
        .collect()
}

fn evict_whole(world: &mut World, entity: Entity) {
    let Some(utterance) = world.get::<Utterance>(entity).cloned() else {
        return world_bug(world, "an utterance in the directory has no Utterance");
    };
    let (freed, packets) = world
        .get::<PacketBuffer>(entity)
        .map_or((0, 0), |b| (b.bytes, (b.audio.packets.len() + b.video.packets.len()) as u64));
    let listeners = listeners_of(world, entity);
    for session in listeners.iter().copied() {
        let Some(key) = world.get::<ListenerSession>(session).map(|s| s.key) else {
            world_bug(world, "a session in the directory has no ListenerSession");
            continue;
        };
        let from = stop_playing(world, session);
        world.resource_mut::<DecisionQueue>().needs.insert(key, DecisionNeed { reason: RouteReason::Evicted, from });
    }
    if utterance.is_open()
        && let Some(mut recording) = world.get_mut::<Recording>(utterance.track)
        && recording.utterance == Some(entity)
    {
        recording.utterance = None;
        let speaking = world.get::<Voice>(utterance.track).is_some_and(|v| v.speaking);
        if speaking {
            let now = world.resource::<EngineClock>().now_us;
            if let Some(mut recording) = world.get_mut::<Recording>(utterance.track) {
                recording.continues = Some((utterance.id.clone(), now));
            }
        }
    }
    let mut directory = world.resource_mut::<Directory>();
    directory.utterances.remove(&utterance.ord);
    directory.utterance_ids.remove(&utterance.id);
    let mut ledger = world.resource_mut::<BufferLedger>();
    account(&mut ledger, freed, 0);
    let buffer_bytes = ledger.bytes;
    let mut counters = world.resource_mut::<Counters>();
    counters.evicted_utterances += 1;
    counters.evicted_bytes += freed;
    world.resource_mut::<Evictions>().made.push(EvictOrder::Whole { utterance: utterance.id.clone() });
    emit(
        world,
        Event::Evict {
            utterance: utterance.id,
            bytes: freed,
            buffer_bytes,
            whole: true,
            packets,
            listeners: listeners.len() as u64,
        },
    );
    world.despawn(entity);
}

/// Removes the oldest packets of an utterance, enough to free `need` bytes (within `limits`
/// of audio and video packets, when given), and cuts its listeners over to the new first
/// packet. Returns the packets removed.
fn trim(world: &mut World, clock: &EngineClock, entity: Entity, need: u64, limits: Option<(usize, usize)>) -> u64 {
    let Some(buffer) = world.get::<PacketBuffer>(entity) else {
        world_bug(world, "an utterance in the directory has no PacketBuffer");
        return 0;
    };
    let (audio_limit, video_limit) = limits.unwrap_or((usize::MAX, usize::MAX));
    let mut freed = 0;
    let mut audio_cut = 0;
    while freed < need && audio_cut < buffer.audio.packets.len().min(audio_limit) {
        freed += payload_bytes(buffer.audio.packets[audio_cut].payload.len());
        audio_cut += 1;
    }
    let cut_media_us = buffer.audio.packets.get(audio_cut).map_or(u64::MAX, |p| p.media_us);
    let video = &buffer.video.packets;
    let mut video_cut = video.partition_point(|p| p.media_us < cut_media_us);
    if limits.is_none() {
        // Video must start at a key frame: drop up to the next one.
        while video_cut < video.len() && !video[video_cut].keyframe {
            video_cut += 1;
        }
    }
    let video_cut = video_cut.min(video_limit);
    cut(world, clock, entity, audio_cut, video_cut)
}

/// Removes the first `audio_cut` audio and `video_cut` video packets of an utterance (what
/// [`trim`] chose, or an origin's order on a replica) and cuts its listeners over to the new
/// first packet. Returns the packets removed.
fn cut(world: &mut World, clock: &EngineClock, entity: Entity, audio_cut: usize, video_cut: usize) -> u64 {
    let Some(mut buffer) = world.get_mut::<PacketBuffer>(entity) else {
        world_bug(world, "an utterance in the directory has no PacketBuffer");
        return 0;
    };
    let before = buffer.bytes;
    // An order from an origin is applied as far as this buffer goes.
    let audio_cut = audio_cut.min(buffer.audio.packets.len());
    let video_cut = video_cut.min(buffer.video.packets.len());
    let removed = (audio_cut + video_cut) as u64;
    if removed == 0 {
        return 0;
    }
    // The newest packet removed from each media: a listener that had not sent it loses
    // something and is cut over.
    let audio_removed = audio_cut.checked_sub(1).map(|i| buffer.audio.packets[i].ext_seq);
    let video_removed = video_cut.checked_sub(1).map(|i| buffer.video.packets[i].ext_seq);
    drain_front(&mut buffer.audio, audio_cut);
    drain_front(&mut buffer.video, video_cut);
    buffer.reshapes = buffer.reshapes.wrapping_add(1);
    buffer.bytes = buffer_bytes(&buffer);
    let after = buffer.bytes;
    let new_origin =
        [buffer.audio.packets.first(), buffer.video.packets.first()].into_iter().flatten().map(|p| p.media_us).min();
    let id = world.get::<Utterance>(entity).map(|u| u.id.clone());

    let mut cut_over = 0;
    for session in listeners_of(world, entity) {
        let Some(mut route) = world.get_mut::<Route>(session) else {
            world_bug(world, "a session in the directory has no Route");
            continue;
        };
        let Some(playing) = route.playing.as_mut() else {
            debug_assert!(false, "a listener of an utterance plays nothing");
            continue;
        };
        let behind = |last: Option<u64>, removed: Option<u64>| match (last, removed) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(last), Some(removed)) => last < removed,
        };
        let audio_behind = behind(playing.audio.last_ext_seq, audio_removed);
        if behind(playing.video.last_ext_seq, video_removed) {
            playing.video_needs_keyframe = true;
        }
        if audio_behind && let Some(origin) = new_origin {
            playing.start_us = clock.now_us;
            playing.origin_media_us = origin;
            playing.audio = Default::default();
            playing.video = Default::default();
            playing.video_needs_keyframe = true;
            cut_over += 1;
            if let Some(mut streams) = world.get_mut::<encore_components::listener::OutStreams>(session) {
                streams.audio.rebase = true;
                streams.video.rebase = true;
            }
        }
    }
    let mut ledger = world.resource_mut::<BufferLedger>();
    account(&mut ledger, before, after);
    let buffer_bytes = ledger.bytes;
    world.resource_mut::<Counters>().trimmed_packets += removed;
    if let Some(id) = id {
        world.resource_mut::<Evictions>().made.push(EvictOrder::Trim {
            utterance: id.clone(),
            audio: audio_cut as u32,
            video: video_cut as u32,
        });
        emit(
            world,
            Event::Evict {
                utterance: id,
                bytes: before.saturating_sub(after),
                buffer_bytes,
                whole: false,
                packets: removed,
                listeners: cut_over,
            },
        );
    }
    removed
}

/// Drops the first `count` packets and gives spare capacity back when most of it is unused.
fn drain_front(media: &mut encore_components::utterance::MediaBuffer, count: usize) {
    if count > 0 {
        let freed: u64 = media.packets[..count].iter().map(|p| payload_bytes(p.payload.len())).sum();
        media.payload_bytes -= freed;
        media.packets.drain(..count);
        let len = media.packets.len();
        if media.packets.capacity() > 4 * len.max(16) {
            media.packets.shrink_to(2 * len.max(16));
        }
    }
}

fn clear_preroll(world: &mut World, track: Entity) {
    // Video tracks have no ring.
    let Some(mut ring) = world.get_mut::<PreRoll>(track) else { return };
    let freed = ring.bytes;
    let packets = ring.packets.len() as u64;
    *ring = PreRoll::default();
    account(&mut world.resource_mut::<BufferLedger>(), freed, 0);
    world.resource_mut::<Counters>().trimmed_packets += packets;
    if packets > 0 || freed > 0 {
        let name = world.get::<encore_components::track::Track>(track).map(|t| t.name.clone());
        match name {
            Some(track) => world.resource_mut::<Evictions>().made.push(EvictOrder::PreRoll { track }),
            None => world_bug(world, "a track in the directory has no Track"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{Room, ends, evictions};
    use encore_components::output::EndReason;

    fn small_cap(bytes: u64) -> EngineConfig {
        EngineConfig { buffer_max_bytes: bytes, ..EngineConfig::default() }
    }

    #[test]
    fn headroom_is_a_sixty_fourth_capped_at_four_mib() {
        assert_eq!(headroom(64_000), 1_000);
        assert_eq!(headroom(1_000_000_000), 4 << 20);
    }

    #[test]
    fn finished_utterances_go_first_and_the_cap_holds_every_tick() {
        let mut room = Room::new(small_cap(100_000));
        room.speaker("alice", "a1");
        room.listener("lena");
        for i in 0..8u64 {
            room.talk("a1", i * 2_000_000, i * 2_000_000 + 1_200_000);
        }
        let trace = room.run_until(17_000_000);
        assert!(room.max_buffer_bytes <= 100_000, "peak {}", room.max_buffer_bytes);
        let evictions = evictions(&trace);
        assert!(!evictions.is_empty());
        assert!(evictions.iter().all(|(_, whole, _)| *whole), "{evictions:?}");
        assert_eq!(room.engine.buffer_bytes(), room.engine.audit_buffer_bytes());
    }

    #[test]
    fn an_open_utterance_over_the_cap_is_trimmed_from_the_front() {
        // A 10 s monologue (about 500 packets of 160 bytes) into a 60 kB buffer.
        let mut room = Room::new(small_cap(60_000));
        room.speaker("bob", "b1");
        room.talk("b1", 0, 10_000_000);
        let trace = room.run_until(11_000_000);
        assert!(room.max_buffer_bytes <= 60_000);
        assert!(evictions(&trace).iter().any(|(_, whole, _)| !whole));
        let ends = ends(&trace);
        assert_eq!(ends.len(), 1);
        assert_eq!(ends[0].2, EndReason::Silence, "the utterance survives its trimming: {ends:?}");
        assert_eq!(room.engine.buffer_bytes(), room.engine.audit_buffer_bytes());
    }

    fn replica(cap: u64) -> Room {
        let mut room = Room::new(small_cap(cap));
        room.engine.set_replica();
        room
    }

    #[test]
    fn a_replica_applies_its_origins_orders_and_its_own_listeners_follow_them() {
        let mut room = replica(1_000_000_000);
        room.speaker("alice", "a1");
        room.listener("lena");
        room.talk("a1", 0, 3_000_000);
        room.run_until(1_000_000);
        let before = room.buffer_of("alice#1");
        let tick = room.engine.next_tick();
        let trim = EvictOrder::Trim { utterance: "alice#1".parse().unwrap(), audio: 10, video: 0 };
        room.engine.push_evict_orders(tick, &[trim]);
        room.run_until(1_100_000);
        assert_eq!(room.buffer_of("alice#1").audio.packets[0].ext_seq, before.audio.packets[10].ext_seq);
        let evicted = evictions(&room.trace);
        assert_eq!(evicted.len(), 1, "the replica evicts what it is told, nothing else: {evicted:?}");
        assert!(!evicted[0].1);

        let tick = room.engine.next_tick();
        room.engine.push_evict_orders(tick, &[EvictOrder::Whole { utterance: "alice#1".parse().unwrap() }]);
        let trace = room.run_until(1_200_000);
        assert!(evictions(&trace).iter().any(|(_, whole, _)| *whole));
        let rerouted = crate::testkit::routes(&trace, "lena");
        assert!(rerouted.iter().any(|route| route.3 == RouteReason::Evicted), "{rerouted:?}");
        assert_eq!(room.engine.buffer_bytes(), room.engine.audit_buffer_bytes());
    }

    #[test]
    fn orders_for_what_a_replica_does_not_hold_are_skipped() {
        let mut room = replica(1_000_000_000);
        room.speaker("alice", "a1");
        room.talk("a1", 0, 500_000);
        room.engine.push_evict_orders(
            3,
            &[
                EvictOrder::Whole { utterance: "nobody#1".parse().unwrap() },
                EvictOrder::Trim { utterance: "alice#9".parse().unwrap(), audio: 5, video: 5 },
                EvictOrder::PreRoll { track: "x9".into() },
            ],
        );
        let trace = room.run_until(1_000_000);
        assert!(evictions(&trace).is_empty());
        assert_eq!(room.engine.buffer_bytes(), room.engine.audit_buffer_bytes());
    }

    #[test]
    fn a_replica_without_orders_still_holds_its_cap() {
        // Cannot happen while it follows its origin; if it ever did, a cap is still a cap.
        let mut room = replica(60_000);
        room.speaker("bob", "b1");
        room.talk("b1", 0, 10_000_000);
        let trace = room.run_until(11_000_000);
        assert!(room.max_buffer_bytes <= 60_000);
        assert!(!evictions(&trace).is_empty());
    }

    #[test]
    fn every_removal_is_written_down_as_an_order() {
        let mut room = Room::new(small_cap(60_000));
        room.speaker("bob", "b1");
        room.talk("b1", 0, 10_000_000);
        let mut orders = Vec::new();
        while room.engine.next_tick_us() <= 10_000_000 {
            let until = room.engine.next_tick_us();
            room.run_until(until);
            orders.extend(room.engine.evict_orders().iter().cloned());
        }
        let trims = evictions(&room.trace).iter().filter(|(_, whole, _)| !whole).count();
        assert!(trims > 0);
        assert_eq!(orders.iter().filter(|o| matches!(o, EvictOrder::Trim { .. })).count(), trims);
    }
}
