//! System 7, play out: sends each listener the packets that are due, at the pace they came.
//!
//! Packet k of the utterance a listener plays is due at `start_us + (media_us_k -
//! origin_media_us)`, where `media_us` is the packet's RTP timestamp on the engine clock
//! (anchored at the media's first packet) and `start_us` the tick the route began: the
//! utterance replays at its original pace, never in a burst, and a live one waits at its
//! newest packet for the next.
//!
//! Each listener has one outgoing stream per media with a stable SSRC. Sequence numbers
//! advance by exactly one per packet sent. At a switch (or a cut-over) the new source's
//! timestamps are offset so that its first packet lands `elapsed` after the last one sent
//! (at least 20 ms), with the marker bit on audio; within a source, a timestamp never goes
//! below the last one sent. Video starts at a key frame. Listeners go in key order.

use bevy_ecs::prelude::{Query, Res, ResMut};

use encore_components::ids::MediaKind;
use encore_components::output::RouteReason;
use encore_components::output::SendPacket;
use encore_components::resources::{Clock, Counters, DecisionNeed, DecisionQueue, Directory, Outputs};
use encore_components::utterance::{BufferedPacket, PacketBuffer, Utterance};
use encore_components::viewer::{Cursor, OutStream, OutStreams, Playing, Route, SentRecord, ViewerSession};

use crate::rtp::{ts_after, us_to_ticks};

/// Smallest timestamp step at a switch: one 20 ms frame.
pub const MIN_SWITCH_STEP_US: u64 = 20_000;

/// True when the listener has sent every packet of a closed utterance (video counts as done
/// while it waits for a key frame that will not come).
pub fn route_finished(utterance: &Utterance, buffer: &PacketBuffer, playing: &Playing) -> bool {
    if utterance.is_open() {
        return false;
    }
    let done = |packets: &[BufferedPacket], last: Option<u64>| {
        packets.last().is_none_or(|p| last.is_some_and(|last| last >= p.ext_seq))
    };
    done(&buffer.audio.packets, playing.audio.last_ext_seq)
        && (playing.video_needs_keyframe || done(&buffer.video.packets, playing.video.last_ext_seq))
}

/// The index of the first packet after the cursor, trusting its hint when it still holds.
pub fn resume(packets: &[BufferedPacket], cursor: &Cursor) -> usize {
    let Some(last) = cursor.last_ext_seq else { return 0 };
    let hint = cursor.next;
    if hint > 0
        && hint <= packets.len()
        && packets[hint - 1].ext_seq == last
        && packets.get(hint).is_none_or(|p| p.ext_seq > last)
    {
        return hint;
    }
    packets.partition_point(|p| p.ext_seq <= last)
}

/// Rewrites one packet's header for the stream and records it for NACKs.
#[allow(clippy::too_many_arguments)]
pub fn rewrite(
    stream: &mut OutStream,
    playing: &Playing,
    packet: &BufferedPacket,
    now_us: u64,
    history_len: usize,
) -> (u16, u32, bool) {
    let mut marker = packet.marker;
    if stream.rebase || stream.source != Some(playing.ord) {
        let out_ts = match stream.last_send_us {
            // The first packet of the stream starts at its random initial timestamp.
            None => stream.last_ts,
            Some(last_send_us) => {
                let elapsed = now_us.saturating_sub(last_send_us).max(MIN_SWITCH_STEP_US);
                stream.last_ts.wrapping_add(us_to_ticks(elapsed, stream.clock_rate) as u32)
            }
        };
        stream.ts_offset = out_ts.wrapping_sub(packet.ts);
        stream.source = Some(playing.ord);
        stream.rebase = false;
        if stream.media == MediaKind::Audio {
            marker = true;
        }
    }
    let mut ts = packet.ts.wrapping_add(stream.ts_offset);
    if stream.last_send_us.is_some() && ts_after(stream.last_ts, ts) {
        ts = stream.last_ts;
    }
    let seq = stream.last_seq.wrapping_add(1);
    stream.last_seq = seq;
    stream.last_ts = ts;
    stream.last_send_us = Some(now_us);
    stream.sent += 1;
    if stream.history.len() != history_len {
        let empty = SentRecord { ord: playing.ord, ext_seq: 0, ts: 0, seq: seq.wrapping_add(1), marker: false };
        stream.history = vec![empty; history_len];
    }
    stream.history[seq as usize % history_len] =
        SentRecord { ord: playing.ord, ext_seq: packet.ext_seq, ts, seq, marker };
    (seq, ts, marker)
}

#[allow(clippy::too_many_arguments)]
pub fn play_out(
    clock: Res<Clock>,
    config: Res<encore_components::config::EngineConfig>,
    directory: Res<Directory>,
    mut outputs: ResMut<Outputs>,
    mut counters: ResMut<Counters>,
    mut queue: ResMut<DecisionQueue>,
    mut viewers: Query<(&ViewerSession, &mut Route, &mut OutStreams)>,
    utterances: Query<(&Utterance, &PacketBuffer)>,
) {
    let now = clock.now_us;
    let history_len = config.limits.nack_history as usize;
    let payloads = outputs.payloads;
    for viewer in directory.viewers.values() {
        let Ok((session, mut route, mut streams)) = viewers.get_mut(*viewer) else { continue };
        let Some(playing) = route.playing.as_mut() else { continue };
        let Ok((utterance, buffer)) = utterances.get(playing.utterance) else { continue };
        for media in [MediaKind::Audio, MediaKind::Video] {
            let packets = match media {
                MediaKind::Audio => &buffer.audio.packets,
                MediaKind::Video => &buffer.video.packets,
            };
            let cursor = match media {
                MediaKind::Audio => playing.audio,
                MediaKind::Video => playing.video,
            };
            if cursor.reshapes == buffer.reshapes {
                // Early, or caught up with a live utterance that got nothing new: the
                // listener costs nothing this tick.
                let early = cursor.next_due_us.is_some_and(|due| due > now);
                let caught_up = cursor.last_ext_seq.is_some() && cursor.next == packets.len();
                if early || caught_up {
                    continue;
                }
            }
            let mut index = if cursor.reshapes == buffer.reshapes { cursor.next } else { resume(packets, &cursor) };
            let mut last = cursor.last_ext_seq;
            let mut next_due_us = None;
            while let Some(packet) = packets.get(index) {
                let due = (playing.start_us + packet.media_us).saturating_sub(playing.origin_media_us);
                if due > now {
                    next_due_us = Some(due);
                    break;
                }
                index += 1;
                last = Some(packet.ext_seq);
                if media == MediaKind::Video && playing.video_needs_keyframe {
                    if !packet.keyframe {
                        continue;
                    }
                    playing.video_needs_keyframe = false;
                }
                let stream = streams.get_mut(media);
                let (seq, ts, marker) = rewrite(stream, playing, packet, now, history_len);
                outputs.out.packets.push(SendPacket {
                    listener: session.listener,
                    media,
                    utterance: utterance.ord,
                    src_seq: packet.seq,
                    seq,
                    ts,
                    ssrc: stream.ssrc,
                    marker,
                    retransmit: false,
                    keyframe: packet.keyframe,
                    audio_level: packet.audio_level,
                    payload: payloads.then(|| packet.payload.clone()),
                });
                counters.sent += 1;
            }
            let cursor = Cursor { next: index, last_ext_seq: last, next_due_us, reshapes: buffer.reshapes };
            match media {
                MediaKind::Audio => playing.audio = cursor,
                MediaKind::Video => playing.video = cursor,
            }
        }
        if route_finished(utterance, buffer, playing) {
            queue
                .needs
                .entry(session.listener)
                .or_insert(DecisionNeed { reason: RouteReason::Finished, from: Some(playing.id.clone()) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::Room;
    use encore_components::config::EngineConfig;

    #[test]
    fn a_buffered_utterance_goes_out_at_its_original_pace() {
        let mut room = Room::new(EngineConfig::default());
        room.speaker("alice", "a1");
        room.speaker("bob", "b1");
        room.listener("lena");
        room.talk("a1", 0, 2_000_000);
        room.talk("b1", 500_000, 1_500_000);
        room.run_until(6_000_000);
        let bob_ord = room.engine.utterance_ord(&"bob#1".parse().unwrap()).unwrap();
        let bob: Vec<_> = room.sent.iter().filter(|(_, p)| p.utterance == bob_ord).collect();
        assert!(bob.len() > 40);
        // One 20 ms packet per two 10 ms ticks: never two in one tick.
        for pair in bob.windows(2) {
            assert!(pair[1].0 > pair[0].0, "burst: {:?} then {:?}", pair[0], pair[1]);
        }
    }

    #[test]
    fn sequence_numbers_are_continuous_and_a_switch_leaves_a_timestamp_gap_of_the_time_passed() {
        let mut room = Room::new(EngineConfig::default());
        room.speaker("alice", "a1");
        room.listener("lena");
        room.talk("a1", 0, 1_000_000);
        room.talk("a1", 3_000_000, 4_000_000);
        room.run_until(6_000_000);
        let audio: Vec<_> = room.sent.iter().filter(|(_, p)| p.media == MediaKind::Audio).collect();
        for pair in audio.windows(2) {
            assert_eq!(pair[1].1.seq, pair[0].1.seq.wrapping_add(1));
        }
        let gap = audio.windows(2).find(|w| w[0].1.utterance != w[1].1.utterance).unwrap();
        let elapsed_us = gap[1].0 - gap[0].0;
        let ts_gap = gap[1].1.ts.wrapping_sub(gap[0].1.ts) as u64;
        assert_eq!(ts_gap, elapsed_us * 48 / 1000, "{gap:?}");
        assert!(gap[1].1.marker);
    }

    #[test]
    fn resume_trusts_a_valid_hint_and_searches_otherwise() {
        let packets: Vec<BufferedPacket> = [10u64, 11, 13, 14]
            .iter()
            .map(|s| BufferedPacket {
                ext_seq: *s,
                ext_ts: 0,
                seq: 0,
                ts: 0,
                media_us: 0,
                marker: false,
                keyframe: false,
                audio_level: None,
                payload: std::sync::Arc::from(vec![]),
            })
            .collect();
        let at = |next, last| Cursor { next, last_ext_seq: last, ..Cursor::default() };
        assert_eq!(resume(&packets, &at(0, None)), 0);
        assert_eq!(resume(&packets, &at(2, Some(11))), 2);
        // A late packet (12) went in before the hint: the search finds the right place.
        assert_eq!(resume(&packets, &at(3, Some(11))), 2);
        assert_eq!(resume(&packets, &at(9, Some(14))), 4);
    }
}
