//! System 3, segment: turns each audio track's packets into utterances.
//!
//! An utterance opens at a voice onset with the pre-roll: the track's packets that arrived
//! from `preroll_ms` before the first voiced packet of the run. It takes every packet of the
//! track until it closes: at the offset (reason `silence`), when the track is unpublished or
//! its peer leaves, or at `max_utterance_ms` after its first packet (`max_duration`), where a
//! talk that goes on continues at once as the speaker's next utterance (its start event
//! names the one it `continues`). The speaker's video joins the open utterance from a key
//! frame, and every opening asks the speaker's video tracks for one.
//!
//! Tracks are walked in name order (audio first, then video, then departing tracks), so
//! utterances open in a stable order.

use std::collections::VecDeque;
use std::mem;

use bevy_ecs::prelude::{Entity, Local, World};

use encore_components::config::EngineConfig;
use encore_components::ids::{MediaKind, Name, PeerKey, UtteranceId, UtteranceOrd};
use encore_components::output::{EndReason, Event, KeyframeReason};
use encore_components::peer::Peer;
use encore_components::resources::{
    BufferLedger, ClosedUtterances, Counters, Departures, Directory, EngineClock, NewUtterances,
};
use encore_components::track::{Incoming, PreRoll, Recording, StagedPacket, Track, Voice, VoiceChange};
use encore_components::utterance::{Audience, BufferedPacket, MediaAnchor, MediaBuffer, PacketBuffer, Utterance};

use crate::accounting::{account, buffer_bytes, payload_bytes, preroll_bytes};
use crate::rtp::ticks_to_us;
use crate::shared::{emit, request_keyframe, world_bug};

/// A media timestamp that strays further than this from the packet's arrival re-anchors the
/// media clock (a publisher restarted its timestamps), so play-out never stalls on it.
pub const MAX_MEDIA_DRIFT_US: i64 = 1_000_000;

/// Extra history the pre-roll ring keeps beyond the pre-roll and the onset time.
const RING_MARGIN_US: u64 = 100_000;

#[derive(Default)]
pub struct Scratch {
    audio: Vec<Entity>,
    video: Vec<Entity>,
    departing: Vec<(Name, Entity, EndReason)>,
}

pub fn segment(world: &mut World, mut scratch: Local<Scratch>) {
    let config = world.resource::<EngineConfig>().clone();
    let clock = *world.resource::<EngineClock>();
    let Scratch { audio, video, departing } = &mut *scratch;
    audio.clear();
    video.clear();
    for entity in world.resource::<Directory>().tracks.values().copied() {
        match world.get::<Track>(entity).map(|t| t.media) {
            Some(MediaKind::Audio) => audio.push(entity),
            Some(MediaKind::Video) => video.push(entity),
            None => {}
        }
    }
    departing.clear();
    departing.append(&mut world.resource_mut::<Departures>().tracks);
    departing.sort_by(|a, b| a.0.cmp(&b.0));

    for &track in audio.iter() {
        segment_audio(world, &config, &clock, track);
    }
    for &track in video.iter() {
        place_video(world, track);
    }
    for &(_, track, reason) in departing.iter() {
        match world.get::<Track>(track).map(|t| t.media) {
            Some(MediaKind::Audio) => {
                segment_audio(world, &config, &clock, track);
                end_audio_track(world, &config, &clock, track, reason);
            }
            Some(MediaKind::Video) => place_video(world, track),
            None => {}
        }
        world.despawn(track);
    }
}

struct TrackInfo {
    entity: Entity,
    name: Name,
    speaker: Name,
    speaker_key: PeerKey,
    uid: Option<String>,
    clock_rate: u32,
}

fn track_info(world: &World, entity: Entity) -> Option<TrackInfo> {
    let track = world.get::<Track>(entity)?;
    Some(TrackInfo {
        entity,
        name: track.name.clone(),
        speaker: track.speaker.clone(),
        speaker_key: track.peer_key,
        uid: track.uid.clone(),
        clock_rate: track.clock_rate,
    })
}

fn segment_audio(world: &mut World, config: &EngineConfig, clock: &EngineClock, entity: Entity) {
    let Some(mut incoming) = world.get_mut::<Incoming>(entity) else {
        return world_bug(world, "an audio track has no Incoming");
    };
    if incoming.packets.is_empty() && incoming.changes.is_empty() {
        // Nothing arrived: only the maximum length can end the utterance now.
        check_max_duration(world, config, clock, entity);
        return;
    }
    let packets = mem::take(&mut incoming.packets);
    let changes = mem::take(&mut incoming.changes);
    let Some(info) = track_info(world, entity) else {
        return world_bug(world, "an audio track has no Track");
    };
    let max_us = config.max_utterance_ms * 1000;
    let mut changes = changes.iter().copied().peekable();
    let count = packets.len();
    let mut packets = packets.into_iter();
    for index in 0..=count {
        while let Some(VoiceChange::Offset { at_us, .. }) =
            changes.next_if(|c| matches!(c, VoiceChange::Offset { before, .. } if *before == index))
        {
            if let Some(utterance) = recording(world, entity).utterance {
                close(world, config, entity, utterance, EndReason::Silence, at_us);
            }
            set_continues(world, entity, None);
        }
        let Some(packet) = packets.next() else { break };
        let current = recording(world, entity);
        match (current.utterance, current.continues) {
            (Some(utterance), _) => {
                let started = world.get::<Utterance>(utterance).map_or(0, |u| u.started_us);
                if packet.arrival_us >= started + max_us {
                    let id = close(world, config, entity, utterance, EndReason::MaxDuration, started + max_us);
                    open(world, config, clock, &info, started + max_us, vec![packet], id);
                } else {
                    append(world, utterance, MediaKind::Audio, info.clock_rate, packet);
                }
            }
            (None, Some((previous, ended_us))) => {
                open(world, config, clock, &info, ended_us.min(packet.arrival_us), vec![packet], Some(previous));
            }
            (None, None) => push_preroll(world, config, entity, packet),
        }
        if let Some(VoiceChange::Onset { run_start_us, .. }) =
            changes.next_if(|c| matches!(c, VoiceChange::Onset { after, .. } if *after == index))
        {
            let from_us = run_start_us.saturating_sub(config.preroll_ms * 1000);
            let preroll = take_preroll(world, entity, from_us);
            let started = preroll.first().map_or(run_start_us, |p| p.arrival_us);
            open(world, config, clock, &info, started, preroll, None);
        }
    }
    refresh_preroll_bytes(world, entity);
    check_max_duration(world, config, clock, entity);
}

fn recording(world: &World, entity: Entity) -> Recording {
    world.get::<Recording>(entity).cloned().unwrap_or_default()
}

fn set_continues(world: &mut World, entity: Entity, continues: Option<(UtteranceId, u64)>) {
    if let Some(mut recording) = world.get_mut::<Recording>(entity) {
        recording.continues = continues;
    }
}

/// Closes the utterance at the maximum length even when no packet arrived this tick; a
/// speaker still talking continues in a new utterance with the next packet.
fn check_max_duration(world: &mut World, config: &EngineConfig, clock: &EngineClock, entity: Entity) {
    let Some(utterance) = recording(world, entity).utterance else { return };
    let Some(started) = world.get::<Utterance>(utterance).map(|u| u.started_us) else {
        return world_bug(world, "a track records into an utterance that is gone");
    };
    let limit = started + config.max_utterance_ms * 1000;
    if clock.now_us < limit {
        return;
    }
    let id = close(world, config, entity, utterance, EndReason::MaxDuration, limit);
    let speaking = world.get::<Voice>(entity).is_some_and(|v| v.speaking);
    if speaking && let Some(id) = id {
        set_continues(world, entity, Some((id, limit)));
    }
}

fn push_preroll(world: &mut World, config: &EngineConfig, entity: Entity, packet: StagedPacket) {
    let keep_us = config.preroll_ms * 1000 + config.vad.onset_ms * 1000 + RING_MARGIN_US;
    let Some(mut ring) = world.get_mut::<PreRoll>(entity) else {
        return world_bug(world, "an audio track has no PreRoll");
    };
    let newest = packet.arrival_us;
    ring.packets.push_back(packet);
    while ring.packets.front().is_some_and(|p| p.arrival_us + keep_us < newest) {
        ring.packets.pop_front();
    }
}

/// Takes the ring's packets that arrived at or after `from_us`, in sequence order, and
/// empties the ring.
fn take_preroll(world: &mut World, entity: Entity, from_us: u64) -> Vec<StagedPacket> {
    let Some(mut ring) = world.get_mut::<PreRoll>(entity) else {
        world_bug(world, "an audio track has no PreRoll");
        return Vec::new();
    };
    let mut packets: Vec<StagedPacket> = ring.packets.drain(..).filter(|p| p.arrival_us >= from_us).collect();
    packets.sort_by_key(|p| p.ext_seq);
    packets
}

/// Brings the ring's accounted bytes, and the ledger, up to date.
fn refresh_preroll_bytes(world: &mut World, entity: Entity) {
    let Some(mut ring) = world.get_mut::<PreRoll>(entity) else {
        return world_bug(world, "an audio track has no PreRoll");
    };
    if ring.packets.is_empty() && ring.packets.capacity() > 64 {
        ring.packets = VecDeque::new();
    }
    let before = ring.bytes;
    ring.bytes = preroll_bytes(&ring);
    let after = ring.bytes;
    account(&mut world.resource_mut::<BufferLedger>(), before, after);
}

fn open(
    world: &mut World,
    config: &EngineConfig,
    clock: &EngineClock,
    info: &TrackInfo,
    started_us: u64,
    packets: Vec<StagedPacket>,
    continues: Option<UtteranceId>,
) -> Entity {
    let mut directory = world.resource_mut::<Directory>();
    let count = directory.utterance_counts.entry(info.speaker.clone()).or_insert(0);
    *count += 1;
    let id = UtteranceId { speaker: info.speaker.clone(), n: *count };
    let ord = UtteranceOrd(directory.next_utterance_ord);
    directory.next_utterance_ord += 1;
    let utterance = Utterance {
        id: id.clone(),
        ord,
        speaker: info.speaker_key,
        speaker_name: info.speaker.clone(),
        uid: info.uid.clone(),
        track: info.entity,
        started_us,
        opened_us: clock.now_us,
        ended_us: None,
    };
    let mut buffer = PacketBuffer::default();
    buffer.audio.packets.reserve(packets.len().max(64));
    for packet in packets {
        append_to(&mut buffer, MediaKind::Audio, info.clock_rate, packet);
    }
    buffer.bytes = buffer_bytes(&buffer);
    let bytes = buffer.bytes;
    let entity = world.spawn((utterance, buffer, Audience::default())).id();
    let mut directory = world.resource_mut::<Directory>();
    directory.utterances.insert(ord, entity);
    directory.utterance_ids.insert(id.clone(), ord);
    account(&mut world.resource_mut::<BufferLedger>(), 0, bytes);
    world.resource_mut::<NewUtterances>().opened.push((ord, entity));
    if let Some(mut recording) = world.get_mut::<Recording>(info.entity) {
        recording.utterance = Some(entity);
        recording.continues = None;
    }
    emit(
        world,
        Event::UtteranceStart {
            utterance: id,
            speaker: info.speaker.clone(),
            uid: info.uid.clone(),
            track: info.name.clone(),
            started_us,
            continues,
        },
    );
    request_keyframe(world, config, clock, info.speaker.as_str(), KeyframeReason::Onset);
    entity
}

/// Closes an utterance and returns its id.
fn close(
    world: &mut World,
    config: &EngineConfig,
    track: Entity,
    entity: Entity,
    reason: EndReason,
    at_us: u64,
) -> Option<UtteranceId> {
    if let Some(mut recording) = world.get_mut::<Recording>(track)
        && recording.utterance == Some(entity)
    {
        recording.utterance = None;
    }
    let (bytes, packets) = world
        .get::<PacketBuffer>(entity)
        .map_or((0, 0), |b| (b.bytes, (b.audio.packets.len() + b.video.packets.len()) as u64));
    let mut utterance = world.get_mut::<Utterance>(entity)?;
    if !utterance.is_open() {
        return None;
    }
    let ended_us = at_us.clamp(utterance.started_us, utterance.started_us + config.max_utterance_ms * 1000);
    utterance.ended_us = Some(ended_us);
    let event = Event::UtteranceEnd {
        utterance: utterance.id.clone(),
        duration_us: ended_us - utterance.started_us,
        bytes,
        packets,
        reason,
    };
    let id = utterance.id.clone();
    let ord = utterance.ord;
    world.resource_mut::<ClosedUtterances>().closed.push(ord);
    emit(world, event);
    Some(id)
}

fn end_audio_track(world: &mut World, config: &EngineConfig, clock: &EngineClock, entity: Entity, reason: EndReason) {
    if let Some(utterance) = recording(world, entity).utterance {
        close(world, config, entity, utterance, reason, clock.now_us);
    }
    let freed = world.get::<PreRoll>(entity).map_or(0, |ring| ring.bytes);
    account(&mut world.resource_mut::<BufferLedger>(), freed, 0);
}

/// Appends one packet to an utterance in the world and keeps the ledger true.
fn append(world: &mut World, entity: Entity, media: MediaKind, clock_rate: u32, packet: StagedPacket) {
    let Some(mut buffer) = world.get_mut::<PacketBuffer>(entity) else {
        return world_bug(world, "a track records into an utterance without a PacketBuffer");
    };
    let before = buffer.bytes;
    append_to(&mut buffer, media, clock_rate, packet);
    buffer.bytes = buffer_bytes(&buffer);
    let after = buffer.bytes;
    account(&mut world.resource_mut::<BufferLedger>(), before, after);
}

/// Places a packet in its media buffer, in sequence order, with its media time.
pub fn append_to(buffer: &mut PacketBuffer, media: MediaKind, clock_rate: u32, packet: StagedPacket) {
    let target: &mut MediaBuffer = match media {
        MediaKind::Audio => &mut buffer.audio,
        MediaKind::Video => &mut buffer.video,
    };
    let anchor =
        *target.anchor.get_or_insert(MediaAnchor { ext_ts: packet.ext_ts, arrival_us: packet.arrival_us, clock_rate });
    let mut media_us = media_time(&anchor, packet.ext_ts);
    if (media_us - packet.arrival_us as i64).abs() > MAX_MEDIA_DRIFT_US {
        let anchor = MediaAnchor { ext_ts: packet.ext_ts, arrival_us: packet.arrival_us, clock_rate };
        target.anchor = Some(anchor);
        media_us = packet.arrival_us as i64;
    }
    target.payload_bytes += payload_bytes(packet.payload.len());
    let buffered = BufferedPacket {
        ext_seq: packet.ext_seq,
        ext_ts: packet.ext_ts,
        seq: packet.seq,
        ts: packet.ts,
        media_us: media_us.max(0) as u64,
        marker: packet.marker,
        keyframe: packet.keyframe,
        audio_level: packet.audio_level,
        voiced: packet.voiced,
        payload: packet.payload,
    };
    match target.packets.last() {
        Some(last) if last.ext_seq > buffered.ext_seq => {
            let at = target.packets.partition_point(|p| p.ext_seq < buffered.ext_seq);
            target.packets.insert(at, buffered);
            buffer.reshapes = buffer.reshapes.wrapping_add(1);
        }
        _ => target.packets.push(buffered),
    }
}

fn media_time(anchor: &MediaAnchor, ext_ts: u64) -> i64 {
    let delta = ext_ts as i64 - anchor.ext_ts as i64;
    let delta_us = ticks_to_us(delta.unsigned_abs(), anchor.clock_rate) as i64;
    anchor.arrival_us as i64 + if delta < 0 { -delta_us } else { delta_us }
}

/// Puts a video track's packets of this tick into its speaker's open utterance, from a key
/// frame on.
fn place_video(world: &mut World, entity: Entity) {
    let Some(mut incoming) = world.get_mut::<Incoming>(entity) else {
        return world_bug(world, "a video track has no Incoming");
    };
    if incoming.packets.is_empty() {
        return;
    }
    let packets = mem::take(&mut incoming.packets);
    let Some((peer, clock_rate)) = world.get::<Track>(entity).map(|t| (t.peer, t.clock_rate)) else {
        return world_bug(world, "a video track has no Track");
    };
    let Some(utterance) = open_utterance_of(world, peer) else {
        world.resource_mut::<Counters>().video_unbuffered += packets.len() as u64;
        return;
    };
    let mut unbuffered = 0;
    for packet in packets {
        let Some(mut buffer) = world.get_mut::<PacketBuffer>(utterance) else {
            return world_bug(world, "an open utterance has no PacketBuffer");
        };
        if buffer.video_track != Some(entity) {
            // Video starts at a key frame, and one track feeds an utterance.
            if !packet.keyframe || buffer.video_track.is_some() {
                unbuffered += 1;
                continue;
            }
            buffer.video_track = Some(entity);
        }
        append(world, utterance, MediaKind::Video, clock_rate, packet);
    }
    world.resource_mut::<Counters>().video_unbuffered += unbuffered;
}

/// The open utterance of the peer's first audio track that has one.
fn open_utterance_of(world: &World, peer: Entity) -> Option<Entity> {
    world.get::<Peer>(peer)?.tracks.iter().find_map(|track| world.get::<Recording>(*track)?.utterance)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{Room, ends, starts};
    use encore_components::input::Input;

    #[test]
    fn an_utterance_keeps_its_preroll_and_closes_after_the_hangover() {
        let mut room = Room::new(EngineConfig::default());
        room.speaker("alice", "a1");
        room.silence("a1", 0, 1_000_000);
        room.talk("a1", 1_000_000, 2_000_000);
        room.silence("a1", 2_000_000, 3_000_000);
        let trace = room.run_until(3_000_000);
        // First voiced packet at 1.0 s: the pre-roll starts 200 ms earlier; onset after
        // 40 ms of voice, in the tick of 1.04 s.
        assert_eq!(starts(&trace), vec![(104, "alice#1".to_owned(), 800_000, None)]);
        // Last voiced packet at 1.98 s, hang-over 400 ms: 2.38 s - 0.8 s.
        assert_eq!(ends(&trace), vec![("alice#1".to_owned(), 1_580_000, EndReason::Silence)]);
    }

    #[test]
    fn a_long_talk_is_cut_at_the_maximum_and_continues() {
        let mut room = Room::new(EngineConfig::default());
        room.speaker("bob", "b1");
        room.talk("b1", 0, 20_000_000);
        let trace = room.run_until(21_000_000);
        let ends = ends(&trace);
        assert_eq!(ends.len(), 2, "{ends:?}");
        assert_eq!(ends[0], ("bob#1".to_owned(), 15_000_000, EndReason::MaxDuration));
        let starts = starts(&trace);
        assert_eq!((starts[1].1.as_str(), starts[1].2), ("bob#2", 15_000_000));
        assert_eq!(starts[1].3.as_deref(), Some("bob#1"), "bob#2 continues bob#1");
    }

    #[test]
    fn unpublishing_and_leaving_close_with_their_reasons() {
        let mut room = Room::new(EngineConfig::default());
        room.speaker("carol", "c1");
        room.speaker("dave", "d1");
        room.talk("c1", 0, 3_000_000);
        room.talk("d1", 0, 3_000_000);
        room.push(1_000_000, Input::Unpublish { track: Name::new("c1") });
        room.push(1_500_000, Input::Leave { peer: Name::new("dave") });
        let trace = room.run_until(3_000_000);
        let reasons: Vec<_> = ends(&trace).into_iter().map(|(id, _, reason)| (id, reason)).collect();
        assert_eq!(
            reasons,
            vec![("carol#1".to_owned(), EndReason::Unpublished), ("dave#1".to_owned(), EndReason::Left)]
        );
        assert_eq!(room.engine.buffer_bytes(), room.engine.audit_buffer_bytes());
    }

    #[test]
    fn video_joins_the_utterance_from_a_key_frame() {
        let mut room = Room::new(EngineConfig::default());
        room.speaker("erin", "e1");
        room.video("erin", "e1v");
        room.talk("e1", 0, 1_000_000);
        // Delta frames first, a key frame at 300 ms.
        room.video_frames("e1v", 0, 1_000_000, 300_000);
        let trace = room.run_until(2_000_000);
        let requests: Vec<_> = trace
            .iter()
            .filter_map(|(_, e)| match e {
                Event::KeyframeRequest { track, reason } => Some((track.to_string(), *reason)),
                _ => None,
            })
            .collect();
        assert_eq!(requests, vec![("e1v".to_owned(), KeyframeReason::Onset)]);
        let buffer = room.buffer_of("erin#1");
        let first = buffer.video.packets.first().expect("video was buffered");
        assert!(first.keyframe);
        assert_eq!(first.media_us, 333_330, "frame 10, the first at or after 300 ms");
    }
}
