//! System 1, ingest: applies the tick's inputs in their total order (arrival time, then push
//! order), spawning and despawning peers, tracks and session sessions, and staging RTP
//! packets on their tracks. Input that names something unknown, breaks a rule or floods is
//! dropped and counted, never a panic.

use std::collections::btree_map::Entry;
use std::mem;

use bevy_ecs::prelude::{Entity, World};
use smallvec::SmallVec;

use encore_components::config::{EngineConfig, LimitsConfig};
use encore_components::ids::{MediaKind, Name, PeerKey, Role, UtteranceId};
use encore_components::input::{FeedbackSignal, Input, RtpIn};
use encore_components::listener::{History, ListenerSession, OutStream, OutStreams, PendingNacks, Route};
use encore_components::output::EndReason;
use encore_components::output::{DropCounts, Event, KeyframeReason, RouteReason};
use encore_components::peer::{Affinity, Peer, Prefs};
use encore_components::resources::{
    BufferLedger, Counters, DecisionNeed, DecisionQueue, Departures, Directory, EngineClock, EngineRng, ListenOutcome,
    ListenOutcomes, NackQueue, PendingInputs, TimedInput, Verdict,
};
use encore_components::track::{
    Incoming, KeyframeThrottle, PreRoll, Recording, RtpState, SpeechLevels, StagedPacket, Track, Voice,
};
use encore_components::utterance::{Audience, Utterance};

use crate::rtp::{FIRST_SEQ_CYCLE, FIRST_TS_CYCLE, unwrap_seq, unwrap_ts};
use crate::shared::{emit, request_keyframe, stop_playing, world_bug};

pub fn ingest(world: &mut World) {
    let mut items = mem::take(&mut world.resource_mut::<PendingInputs>().items);
    // Arrival time first, push order second: a total order, whatever order the network
    // tasks pushed in.
    items.sort_unstable_by_key(|item| (item.at_us, item.order));
    let config = world.resource::<EngineConfig>().clone();
    let clock = *world.resource::<EngineClock>();
    for TimedInput { at_us, input, .. } in items.drain(..) {
        // An input can never arrive after the tick that consumes it.
        let at_us = at_us.min(clock.now_us);
        apply(world, &config, &clock, at_us, input);
    }
    // Hand the emptied vector back so its capacity is reused.
    let mut pending = world.resource_mut::<PendingInputs>();
    if pending.items.is_empty() {
        pending.items = items;
    }
}

fn drop_input(world: &mut World, count: impl FnOnce(&mut DropCounts) -> &mut u64) {
    *count(&mut world.resource_mut::<Counters>().drops) += 1;
}

fn apply(world: &mut World, config: &EngineConfig, clock: &EngineClock, at_us: u64, input: Input) {
    match input {
        Input::Rtp { track, packet } => rtp(world, config, clock, at_us, &track, packet),
        Input::Join { peer, uid, roles } => join(world, peer, uid, roles),
        Input::Roles { peer, roles } => set_roles(world, &peer, roles),
        Input::Leave { peer } => leave(world, &peer),
        Input::Publish { peer, track, media, codec, clock_rate, ssrc } => {
            publish(world, config, &peer, track, media, codec, clock_rate, ssrc)
        }
        Input::Unpublish { track } => unpublish(world, &track),
        Input::Listen { peer } => listen(world, &config.limits, &peer),
        Input::Unlisten { peer } => unlisten(world, &peer),
        Input::Pause { peer } => pause(world, clock, &peer),
        Input::Resume { peer } => resume(world, clock, &peer),
        Input::Prefs { peer, follow, mute } => prefs(world, &peer, follow, mute),
        Input::Feedback { peer, utterance, signal } => feedback(world, config, &peer, utterance, signal),
        Input::Nack { peer, media, seqs } => nack(world, config, &peer, media, seqs),
        Input::KeyframeRequest { peer } => listener_keyframe_request(world, config, clock, &peer),
        Input::BufferShare { bytes } => world.resource_mut::<BufferLedger>().cap = bytes,
    }
}

fn peer_entity(world: &World, name: &str) -> Option<Entity> {
    world.resource::<Directory>().peers.get(name).copied()
}

/// Roles as a peer holds them: sorted, once each, a listener when none is named.
fn role_set(roles: Vec<Role>) -> SmallVec<[Role; 2]> {
    let mut roles: SmallVec<[Role; 2]> = roles.into_iter().collect();
    roles.sort_unstable();
    roles.dedup();
    if roles.is_empty() {
        roles.push(Role::Listener);
    }
    roles
}

fn join(world: &mut World, name: Name, uid: Option<String>, roles: Vec<Role>) {
    if name.as_str().is_empty() || peer_entity(world, name.as_str()).is_some() {
        let invalid = name.as_str().is_empty();
        return drop_input(world, |d| if invalid { &mut d.invalid } else { &mut d.duplicate_peer });
    }
    let roles = role_set(roles);
    let key = PeerKey(world.resource::<Directory>().peer_names.len() as u32);
    let peer = Peer { key, name: name.clone(), uid, roles, tracks: SmallVec::new(), session: None };
    let entity = world.spawn((peer, Prefs::default(), Affinity::default())).id();
    let mut directory = world.resource_mut::<Directory>();
    directory.peer_names.push(name.clone());
    directory.peers.insert(name, entity);
}

fn set_roles(world: &mut World, name: &str, roles: Vec<Role>) {
    let Some(entity) = peer_entity(world, name) else {
        return drop_input(world, |d| &mut d.unknown_peer);
    };
    let Some(mut peer) = world.get_mut::<Peer>(entity) else {
        return world_bug(world, "a peer in the directory has no Peer");
    };
    peer.roles = role_set(roles);
    if peer.may_publish() {
        return;
    }
    // Demoted: what it publishes ends now, as if it had unpublished.
    let tracks = std::mem::take(&mut peer.tracks);
    for track in tracks {
        end_track(world, track, EndReason::Unpublished);
    }
}

fn leave(world: &mut World, name: &str) {
    let Some(entity) = peer_entity(world, name) else {
        return drop_input(world, |d| &mut d.unknown_peer);
    };
    let Some(peer) = world.get::<Peer>(entity).cloned() else {
        return world_bug(world, "a peer in the directory has no Peer");
    };
    for track in peer.tracks.iter().copied() {
        end_track(world, track, EndReason::Left);
    }
    if let Some(session) = peer.session {
        end_listening(world, session);
    }
    world.resource_mut::<Directory>().peers.remove(name);
    world.despawn(entity);
}

/// Takes a track out of the directory and hands it to segmentation, which closes its
/// utterance and despawns it.
fn end_track(world: &mut World, track: Entity, reason: EndReason) {
    let Some(name) = world.get::<Track>(track).map(|t| t.name.clone()) else {
        return world_bug(world, "a peer's track has no Track");
    };
    world.resource_mut::<Directory>().tracks.remove(name.as_str());
    world.resource_mut::<Departures>().tracks.push((name, track, reason));
}

#[allow(clippy::too_many_arguments)]
fn publish(
    world: &mut World,
    config: &EngineConfig,
    peer_name: &str,
    name: Name,
    media: MediaKind,
    codec: String,
    clock_rate: u32,
    ssrc: u32,
) {
    let Some(peer_entity) = peer_entity(world, peer_name) else {
        return drop_input(world, |d| &mut d.unknown_peer);
    };
    let Some(peer) = world.get::<Peer>(peer_entity) else {
        return world_bug(world, "a peer in the directory has no Peer");
    };
    if !peer.may_publish() {
        return drop_input(world, |d| &mut d.forbidden);
    }
    if clock_rate == 0 || name.as_str().is_empty() {
        return drop_input(world, |d| &mut d.invalid);
    }
    if world.resource::<Directory>().tracks.contains_key(name.as_str()) {
        return drop_input(world, |d| &mut d.duplicate_track);
    }
    let track = Track {
        name: name.clone(),
        peer: peer_entity,
        peer_key: peer.key,
        speaker: peer.name.clone(),
        uid: peer.uid.clone(),
        media,
        codec,
        clock_rate,
        ssrc,
    };
    let window_words = (config.limits.reorder_window as usize).div_ceil(64);
    let rtp_state = RtpState { received: vec![0; window_words], ..RtpState::default() };
    let mut spawned = world.spawn((track, rtp_state, Incoming::default()));
    match media {
        MediaKind::Audio => {
            spawned.insert((Voice::default(), PreRoll::default(), Recording::default(), SpeechLevels::default()))
        }
        MediaKind::Video => spawned.insert(KeyframeThrottle::default()),
    };
    let entity = spawned.id();
    if let Some(mut peer) = world.get_mut::<Peer>(peer_entity) {
        peer.tracks.push(entity);
    }
    world.resource_mut::<Directory>().tracks.insert(name, entity);
}

fn unpublish(world: &mut World, name: &str) {
    let Some(track) = world.resource::<Directory>().tracks.get(name).copied() else {
        return drop_input(world, |d| &mut d.unknown_track);
    };
    if let Some(peer) = world.get::<Track>(track).map(|t| t.peer)
        && let Some(mut peer) = world.get_mut::<Peer>(peer)
    {
        peer.tracks.retain(|t| *t != track);
    }
    end_track(world, track, EndReason::Unpublished);
}

fn new_stream(rng: &mut EngineRng, limits: &LimitsConfig, media: MediaKind) -> OutStream {
    let ssrc = (rng.next_u64() as u32).max(1);
    let bits = rng.next_u64();
    OutStream {
        media,
        ssrc,
        clock_rate: match media {
            MediaKind::Audio => 48_000,
            MediaKind::Video => 90_000,
        },
        last_seq: bits as u16,
        last_ts: (bits >> 16) as u32,
        last_send_us: None,
        ts_offset: 0,
        source: None,
        rebase: true,
        // Allocated when the stream sends its first packet: many listeners never do.
        history: Vec::new(),
        retransmit_credit: limits.retransmit_burst.saturating_mul(100),
    }
}

fn listen(world: &mut World, limits: &LimitsConfig, name: &str) {
    let Some(peer_entity) = peer_entity(world, name) else {
        return drop_input(world, |d| &mut d.unknown_peer);
    };
    let Some(peer) = world.get::<Peer>(peer_entity) else {
        return world_bug(world, "a peer in the directory has no Peer");
    };
    if peer.session.is_some() {
        return drop_input(world, |d| &mut d.invalid);
    }
    if !peer.may_listen() {
        return drop_input(world, |d| &mut d.forbidden);
    }
    let listener = ListenerSession { key: peer.key, name: peer.name.clone(), peer: peer_entity };
    let key = peer.key;
    let mut rng = world.resource_mut::<EngineRng>();
    let streams = OutStreams {
        audio: new_stream(&mut rng, limits, MediaKind::Audio),
        video: new_stream(&mut rng, limits, MediaKind::Video),
    };
    let session = world.spawn((listener, Route::default(), streams, History::default(), PendingNacks::default())).id();
    if let Some(mut peer) = world.get_mut::<Peer>(peer_entity) {
        peer.session = Some(session);
    }
    world.resource_mut::<Directory>().listeners.insert(key, session);
    world
        .resource_mut::<DecisionQueue>()
        .needs
        .insert(key, DecisionNeed { reason: RouteReason::StartedListening, from: None });
}

fn unlisten(world: &mut World, name: &str) {
    let Some(peer_entity) = peer_entity(world, name) else {
        return drop_input(world, |d| &mut d.unknown_peer);
    };
    match world.get::<Peer>(peer_entity).and_then(|p| p.session) {
        Some(session) => end_listening(world, session),
        None => drop_input(world, |d| &mut d.not_listening),
    }
}

/// Ends a listener session: the listener's route goes idle (traced) and the entity goes.
fn end_listening(world: &mut World, session: Entity) {
    let Some(listener) = world.get::<ListenerSession>(session).cloned() else {
        return world_bug(world, "a peer's session has no ListenerSession");
    };
    if let Some(playing) = world.get::<Route>(session).and_then(|r| r.playing.as_ref()) {
        let outcome = ListenOutcome {
            listener: listener.key,
            speaker: playing.speaker,
            utterance: playing.ord,
            verdict: Verdict::Interrupted,
            heard_us: world.resource::<EngineClock>().now_us.saturating_sub(playing.start_us),
        };
        world.resource_mut::<ListenOutcomes>().list.push(outcome);
    }
    if let Some(from) = stop_playing(world, session) {
        emit(
            world,
            Event::Route {
                listener: listener.name.clone(),
                from: Some(from),
                to: None,
                reason: RouteReason::StoppedListening,
                score: None,
                terms: None,
                lag_us: None,
                live: false,
            },
        );
    }
    if let Some(mut peer) = world.get_mut::<Peer>(listener.peer) {
        peer.session = None;
    }
    world.resource_mut::<Directory>().listeners.remove(&listener.key);
    world.resource_mut::<DecisionQueue>().needs.remove(&listener.key);
    world.despawn(session);
}

/// How long a pause holds a listener's position. A minute: past it the room has moved on
/// (the recommender's window is two), and a resumed listener is better served by a fresh
/// choice than by stale speech; meanwhile the held utterance counts as being played, so
/// eviction takes it only after what nobody plays.
pub const MAX_PAUSE_HOLD_US: u64 = 60_000_000;

/// A listener pauses: play-out sends it nothing and its position waits (route system: it
/// takes no new utterance meanwhile). Pausing twice is pausing once.
fn pause(world: &mut World, clock: &EngineClock, name: &str) {
    let Some(peer_entity) = peer_entity(world, name) else {
        return drop_input(world, |d| &mut d.unknown_peer);
    };
    let Some((session, _)) = session_of(world, peer_entity) else {
        return drop_input(world, |d| &mut d.not_listening);
    };
    let Some(mut route) = world.get_mut::<Route>(session) else {
        return world_bug(world, "a session has no Route");
    };
    route.paused_since_us.get_or_insert(clock.now_us);
    // A switch that waited for a pause in what plays has no moment now: after the resume
    // the listener continues where it was, and a new decision will come if one is due.
    route.pending_switch = None;
}

/// A listener resumes: its stream continues from where it paused, the pace moved on by the
/// time it waited, and the next packet starts a new segment (the timestamp gap of the time
/// that passed, the next sequence number: no loss to report). An idle listener, or one whose
/// pause outlasted [`MAX_PAUSE_HOLD_US`], gets a full decision instead (reason `resumed`).
fn resume(world: &mut World, clock: &EngineClock, name: &str) {
    let Some(peer_entity) = peer_entity(world, name) else {
        return drop_input(world, |d| &mut d.unknown_peer);
    };
    let Some((session, key)) = session_of(world, peer_entity) else {
        return drop_input(world, |d| &mut d.not_listening);
    };
    let Some(mut route) = world.get_mut::<Route>(session) else {
        return world_bug(world, "a session has no Route");
    };
    let Some(since) = route.paused_since_us.take() else { return };
    let now = clock.now_us;
    let released = match route.playing.as_mut() {
        None => None,
        Some(playing) if now - since > MAX_PAUSE_HOLD_US => Some(playing.id.clone()),
        Some(playing) => {
            // Routed during the pause (a skip, or a reroute after an eviction), the route
            // waited only since it began.
            playing.start_us += now - since.max(playing.start_us);
            // Behind live by the pause now: time-shifted, so paced, with no catch-up left.
            playing.catchup_us = 0;
            if let Some(mut streams) = world.get_mut::<OutStreams>(session) {
                streams.audio.rebase = true;
                streams.video.rebase = true;
            }
            return;
        }
    };
    need_decision(world, key, DecisionNeed { reason: RouteReason::Resumed, from: released });
}

fn session_of(world: &World, peer_entity: Entity) -> Option<(Entity, PeerKey)> {
    let peer = world.get::<Peer>(peer_entity)?;
    Some((peer.session?, peer.key))
}

/// Queues a full decision, keeping the first reason given this tick.
fn need_decision(world: &mut World, key: PeerKey, need: DecisionNeed) {
    if let Entry::Vacant(slot) = world.resource_mut::<DecisionQueue>().needs.entry(key) {
        slot.insert(need);
    }
}

fn playing_id(world: &World, session: Entity) -> Option<(UtteranceId, Name)> {
    let playing = world.get::<Route>(session)?.playing.as_ref()?;
    Some((playing.id.clone(), playing.speaker_name.clone()))
}

fn prefs(world: &mut World, name: &str, follow: Vec<Name>, mute: Vec<Name>) {
    let Some(peer_entity) = peer_entity(world, name) else {
        return drop_input(world, |d| &mut d.unknown_peer);
    };
    let prefs = Prefs { follow: follow.into_iter().collect(), mute: mute.into_iter().collect() };
    let Some((session, key)) = session_of(world, peer_entity) else {
        world.entity_mut(peer_entity).insert(prefs);
        return;
    };
    match playing_id(world, session) {
        // A listener never hears a speaker it muted: reroute now.
        Some((id, speaker)) if prefs.mute.contains(&speaker) => {
            need_decision(world, key, DecisionNeed { reason: RouteReason::Muted, from: Some(id) })
        }
        Some(_) => {}
        None => need_decision(world, key, DecisionNeed { reason: RouteReason::Prefs, from: None }),
    }
    world.entity_mut(peer_entity).insert(prefs);
}

fn feedback(
    world: &mut World,
    config: &EngineConfig,
    name: &str,
    utterance: Option<UtteranceId>,
    signal: FeedbackSignal,
) {
    let Some(peer_entity) = peer_entity(world, name) else {
        return drop_input(world, |d| &mut d.unknown_peer);
    };
    let Some((session, key)) = session_of(world, peer_entity) else {
        return drop_input(world, |d| &mut d.not_listening);
    };
    let current = playing_id(world, session);
    let Some(id) = utterance.or_else(|| current.as_ref().map(|(id, _)| id.clone())) else {
        return drop_input(world, |d| &mut d.unknown_utterance);
    };
    let directory = world.resource::<Directory>();
    let known = directory.utterance_ids.get(&id).and_then(|ord| Some((*ord, *directory.utterances.get(ord)?)));
    if !directory.utterance_existed(&id) {
        // Never existed: the speaker's counter never reached it.
        return drop_input(world, |d| &mut d.unknown_utterance);
    }
    // Feedback on an evicted utterance still teaches the affinity to its speaker.
    let limit = config.recommender.affinity_limit;
    let delta = match signal {
        FeedbackSignal::Skip => -config.recommender.skip,
        FeedbackSignal::Like => config.recommender.like,
    };
    if let Some(mut affinity) = world.get_mut::<Affinity>(peer_entity) {
        let value = affinity.by_speaker.entry(id.speaker.clone()).or_insert(0);
        *value = (*value + delta).clamp(-limit, limit);
    }
    // For the learning recommender: a like, or a skip of an utterance not playing (route
    // reports the skip of the one playing, with how much was heard).
    let playing_it = current.as_ref().is_some_and(|(current_id, _)| *current_id == id);
    let verdict = match signal {
        FeedbackSignal::Like => Some(Verdict::Liked),
        FeedbackSignal::Skip => (!playing_it).then_some(Verdict::Skipped),
    };
    if let Some(verdict) = verdict
        && let Some((ord, utterance_entity)) = known
        && let Some(speaker) = world.get::<Utterance>(utterance_entity).map(|u| u.speaker)
    {
        let outcome = ListenOutcome { listener: key, speaker, utterance: ord, verdict, heard_us: 0 };
        world.resource_mut::<ListenOutcomes>().list.push(outcome);
    }
    if signal != FeedbackSignal::Skip {
        return;
    }
    if let Some((ord, utterance_entity)) = known
        && let Some(mut history) = world.get_mut::<History>(session)
        && history.heard.insert(ord)
        && let Some(mut audience) = world.get_mut::<Audience>(utterance_entity)
    {
        audience.heard += 1;
    }
    match current {
        Some((current_id, _)) if current_id == id => {
            need_decision(world, key, DecisionNeed { reason: RouteReason::Skip, from: Some(id) })
        }
        Some(_) => {}
        None => need_decision(world, key, DecisionNeed { reason: RouteReason::Feedback, from: None }),
    }
}

fn nack(world: &mut World, config: &EngineConfig, name: &str, media: MediaKind, seqs: Vec<u16>) {
    let Some(peer_entity) = peer_entity(world, name) else {
        return drop_input(world, |d| &mut d.unknown_peer);
    };
    let Some((session, key)) = session_of(world, peer_entity) else {
        return drop_input(world, |d| &mut d.not_listening);
    };
    if seqs.is_empty() || seqs.len() > config.limits.max_nack_seqs {
        return drop_input(world, |d| &mut d.invalid);
    }
    if let Some(mut pending) = world.get_mut::<PendingNacks>(session) {
        let room = (config.limits.max_nack_seqs * 4).saturating_sub(pending.seqs.len());
        if room < seqs.len() {
            return drop_input(world, |d| &mut d.flood);
        }
        let before = pending.seqs.len() + seqs.len();
        pending.seqs.extend(seqs.into_iter().map(|seq| (media, seq)));
        // A sequence number named twice before the retransmit system runs goes out once.
        pending.seqs.sort_unstable();
        pending.seqs.dedup();
        let duplicates = (before - pending.seqs.len()) as u64;
        world.resource_mut::<Counters>().nack_refused.duplicate += duplicates;
        world.resource_mut::<NackQueue>().listeners.insert(key);
    }
}

/// A listener's PLI: only a live utterance can answer it with a fresh key frame.
fn listener_keyframe_request(world: &mut World, config: &EngineConfig, clock: &EngineClock, name: &str) {
    let Some(peer_entity) = peer_entity(world, name) else {
        return drop_input(world, |d| &mut d.unknown_peer);
    };
    let Some((session, _)) = session_of(world, peer_entity) else {
        return drop_input(world, |d| &mut d.not_listening);
    };
    let Some(utterance) = world.get::<Route>(session).and_then(|r| r.playing.as_ref()).map(|p| p.utterance) else {
        return;
    };
    let Some(speaker) = world.get::<Utterance>(utterance).filter(|u| u.is_open()).map(|u| u.speaker_name.clone())
    else {
        return;
    };
    request_keyframe(world, config, clock, &speaker, KeyframeReason::Listener);
}

fn rtp(world: &mut World, config: &EngineConfig, clock: &EngineClock, at_us: u64, name: &str, packet: RtpIn) {
    let Some(track) = world.resource::<Directory>().tracks.get(name).copied() else {
        return drop_input(world, |d| &mut d.unknown_track);
    };
    if packet.payload.len() > config.limits.max_payload_bytes {
        return drop_input(world, |d| &mut d.oversize);
    }
    if packet.audio_level.is_some_and(|level| level > 127) {
        return drop_input(world, |d| &mut d.invalid);
    }
    let Some(mut state) = world.get_mut::<RtpState>(track) else {
        return world_bug(world, "a track in the directory has no RtpState");
    };
    if state.counted_tick != clock.tick {
        state.counted_tick = clock.tick;
        state.packets_this_tick = 0;
    }
    if state.packets_this_tick >= config.limits.max_packets_per_track_per_tick {
        return drop_input(world, |d| &mut d.flood);
    }
    let window = config.limits.reorder_window as u64;
    let (ext_seq, ext_ts) = match state.highest_ext_seq {
        None => {
            let ext_seq = FIRST_SEQ_CYCLE + packet.seq as u64;
            let ext_ts = FIRST_TS_CYCLE + packet.ts as u64;
            state.highest_ext_seq = Some(ext_seq);
            state.highest_ext_ts = ext_ts;
            mark_received(&mut state.received, ext_seq);
            (ext_seq, ext_ts)
        }
        Some(highest) => {
            let Some(ext_seq) = unwrap_seq(highest, packet.seq) else {
                return drop_input(world, |d| &mut d.too_late);
            };
            let ext_ts = unwrap_ts(state.highest_ext_ts, packet.ts);
            if ext_seq > highest {
                let bits = state.received.len() as u64 * 64;
                if ext_seq - highest >= bits {
                    state.received.fill(0);
                } else {
                    for gone in highest + 1..ext_seq {
                        clear_received(&mut state.received, gone);
                    }
                }
                mark_received(&mut state.received, ext_seq);
                state.highest_ext_seq = Some(ext_seq);
                state.highest_ext_ts = ext_ts;
            } else if highest - ext_seq >= window {
                return drop_input(world, |d| &mut d.too_late);
            } else if is_received(&state.received, ext_seq) {
                return drop_input(world, |d| &mut d.duplicate_packet);
            } else {
                mark_received(&mut state.received, ext_seq);
            }
            (ext_seq, ext_ts)
        }
    };
    state.packets_this_tick += 1;
    let staged = StagedPacket {
        ext_seq,
        ext_ts,
        seq: packet.seq,
        ts: packet.ts,
        arrival_us: at_us,
        marker: packet.marker,
        keyframe: packet.keyframe,
        audio_level: packet.audio_level,
        voice: packet.voice,
        voiced: false,
        payload: packet.payload,
    };
    match world.get_mut::<Incoming>(track) {
        Some(mut incoming) => incoming.packets.push(staged),
        None => world_bug(world, "a track in the directory has no Incoming"),
    }
}

fn bit(received: &[u64], ext_seq: u64) -> (usize, u64) {
    let bits = received.len() as u64 * 64;
    let index = ext_seq % bits;
    ((index / 64) as usize, 1 << (index % 64))
}

fn mark_received(received: &mut [u64], ext_seq: u64) {
    let (word, mask) = bit(received, ext_seq);
    received[word] |= mask;
}

fn clear_received(received: &mut [u64], ext_seq: u64) {
    let (word, mask) = bit(received, ext_seq);
    received[word] &= !mask;
}

fn is_received(received: &[u64], ext_seq: u64) -> bool {
    let (word, mask) = bit(received, ext_seq);
    received[word] & mask != 0
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::testkit::{Room, ends, starts};

    fn rtp(track: &str, seq: u16, size: usize, level: Option<u8>) -> Input {
        Input::Rtp {
            track: Name::new(track),
            packet: RtpIn {
                seq,
                ts: u32::from(seq) * 960,
                marker: false,
                payload: Arc::from(vec![0u8; size]),
                audio_level: level,
                voice: None,
                keyframe: false,
            },
        }
    }

    #[test]
    fn bad_input_is_dropped_by_cause_and_nothing_panics() {
        let mut room = Room::new(EngineConfig::default());
        room.speaker("alice", "a1");
        room.listener("lena");
        let at = 10_000;
        room.push(at, Input::Join { peer: Name::new("alice"), uid: None, roles: vec![] });
        room.push(at, Input::Join { peer: Name::new(""), uid: None, roles: vec![] });
        room.push(at, Input::Leave { peer: Name::new("ghost") });
        room.push(at, Input::Unpublish { track: Name::new("nope") });
        room.push(at, Input::Listen { peer: Name::new("lena") });
        room.push(
            at,
            Input::Publish {
                peer: Name::new("lena"),
                track: Name::new("l1"),
                media: MediaKind::Audio,
                codec: "opus".into(),
                clock_rate: 48_000,
                ssrc: 1,
            },
        );
        room.push(
            at,
            Input::Publish {
                peer: Name::new("alice"),
                track: Name::new("a1"),
                media: MediaKind::Audio,
                codec: "opus".into(),
                clock_rate: 48_000,
                ssrc: 1,
            },
        );
        room.push(at, rtp("zz", 1, 10, Some(30)));
        room.push(at, rtp("a1", 2, 5000, Some(30)));
        room.push(at, rtp("a1", 3, 10, Some(200)));
        room.push(
            at,
            Input::Feedback {
                peer: Name::new("lena"),
                utterance: Some("alice#7".parse().unwrap()),
                signal: FeedbackSignal::Like,
            },
        );
        room.push(at, Input::Nack { peer: Name::new("alice"), media: MediaKind::Audio, seqs: vec![1] });
        room.push(at, Input::Nack { peer: Name::new("lena"), media: MediaKind::Audio, seqs: vec![] });
        room.run_until(20_000);
        let drops = room.engine.counters().drops;
        assert_eq!(drops.duplicate_peer, 1);
        assert_eq!(drops.invalid, 4, "empty name, second subscribe, level 200, empty NACK");
        assert_eq!(drops.unknown_peer, 1);
        assert_eq!(drops.unknown_track, 2);
        assert_eq!(drops.forbidden, 1);
        assert_eq!(drops.duplicate_track, 1);
        assert_eq!(drops.oversize, 1);
        assert_eq!(drops.unknown_utterance, 1);
        assert_eq!(drops.not_listening, 1);
    }

    #[test]
    fn duplicates_and_stale_packets_are_told_from_late_ones() {
        let mut room = Room::new(EngineConfig::default());
        room.speaker("alice", "a1");
        for seq in [100u16, 101, 103, 101, 102, 65_000] {
            room.push(10_000, rtp("a1", seq, 50, Some(30)));
        }
        // Across the 16-bit wrap: 65535 then 0 are new packets.
        room.run_until(10_000);
        let drops = room.engine.counters().drops;
        assert_eq!(drops.duplicate_packet, 1, "101 twice");
        assert_eq!(drops.too_late, 1, "65000 is far behind 103");
        let mut room = Room::new(EngineConfig::default());
        room.speaker("bob", "b1");
        for seq in [65_534u16, 65_535, 0, 1] {
            room.push(10_000, rtp("b1", seq, 50, Some(30)));
        }
        room.run_until(10_000);
        assert_eq!(room.engine.counters().drops.total(), 0, "the wrap is not a drop");
    }

    #[test]
    fn a_flood_from_one_track_is_cut_and_the_others_pass() {
        let mut config = EngineConfig::default();
        config.limits.max_packets_per_track_per_tick = 5;
        let mut room = Room::new(config);
        room.speaker("alice", "a1");
        room.speaker("bob", "b1");
        for seq in 0..20u16 {
            room.push(10_000, rtp("a1", seq, 50, Some(30)));
        }
        room.push(10_000, rtp("b1", 1, 50, Some(30)));
        room.run_until(10_000);
        assert_eq!(room.engine.counters().drops.flood, 15);
        assert_eq!(room.engine.counters().drops.total(), 15, "bob's packet passed");
    }

    #[test]
    fn roles_change_in_the_room_a_demoted_speaker_loses_its_tracks_and_a_promoted_listener_publishes() {
        let mut room = Room::new(EngineConfig::default());
        room.speaker("alice", "a1");
        room.listener("lena");
        room.talk("a1", 0, 1_000_000);
        // Alice is moved to the audience mid-sentence: her utterance closes there.
        room.push(500_000, Input::Roles { peer: Name::new("alice"), roles: vec![Role::Listener] });
        // Lena accepts an invitation to speak, then publishes; Alice's publishing again is refused.
        room.push(600_000, Input::Roles { peer: Name::new("lena"), roles: vec![Role::Listener, Role::Speaker] });
        let publish = |peer: &str, track: &str| Input::Publish {
            peer: Name::new(peer),
            track: Name::new(track),
            media: MediaKind::Audio,
            codec: "opus".into(),
            clock_rate: 48_000,
            ssrc: 2,
        };
        room.push(610_000, publish("lena", "l1"));
        room.push(620_000, publish("alice", "a2"));
        room.talk("l1", 700_000, 1_500_000);
        room.push(700_000, Input::Roles { peer: Name::new("nobody"), roles: vec![] });
        let trace = room.run_until(2_500_000);
        let ends = ends(&trace);
        assert_eq!(
            ends.first().map(|(id, _, reason)| (id.as_str(), *reason)),
            Some(("alice#1", EndReason::Unpublished))
        );
        assert!(starts(&trace).iter().any(|(_, id, _, _)| id == "lena#1"), "lena spoke: {:?}", starts(&trace));
        let drops = room.engine.counters().drops;
        assert_eq!(drops.forbidden, 1, "alice may not publish again");
        assert_eq!(drops.unknown_peer, 1);
        // Alice's packets after the demotion name a track that is gone.
        assert!(drops.unknown_track > 0);
    }
}
