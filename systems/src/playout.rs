//! System 7, play out: sends each listener the packets that are due, at the pace they came.
//!
//! Packet k of the utterance a listener plays is due at `start_us + (media_us_k -
//! origin_media_us) - ahead_us`, where `media_us` is the packet's RTP timestamp on the engine
//! clock (anchored at the media's first packet), `start_us` the tick the route began and
//! `ahead_us` how far the media has caught up: the utterance replays at its original pace,
//! never in a burst, and a live one waits at its newest packet for the next.
//!
//! Live means live: a route that starts at the live edge of an open utterance (routed at its
//! onset, behind only by the pre-roll and the onset) would stay that far behind for the whole
//! utterance at the original pace. While its utterance is open it catches up instead: besides
//! what is due, each tick sends up to [`CATCHUP_PACKETS_PER_TICK`] packets per media ahead of
//! their time, never more than the route's `catchup_us` ahead in all ([`catchup_bound_us`]),
//! and every packet sent ahead moves the media's pace forward by as much, so what follows keeps
//! the original spacing from there. Once at the newest packet, each new one goes out in the
//! tick it arrives. Nothing is dropped: the pre-roll is all sent, only sooner. A route that
//! starts further behind (time-shifted, or a busy listener's late switch) stays paced.
//!
//! Each listener has one outgoing stream per media with a stable SSRC. Sequence numbers
//! advance by exactly one per packet sent. At a switch (or a cut-over) the new source's
//! timestamps are offset so that its first packet lands `elapsed` after the last one sent
//! (at least 20 ms), with the marker bit on audio; within a source, a timestamp never goes
//! below the last one sent. Video starts at a key frame. Listeners go in key order.

use bevy_ecs::prelude::{Query, Res, ResMut};

use encore_components::config::EngineConfig;
use encore_components::ids::MediaKind;
use encore_components::listener::{Cursor, ListenerSession, OutStream, OutStreams, Playing, Route, SentRecord};
use encore_components::output::RouteReason;
use encore_components::output::SendPacket;
use encore_components::resources::{
    Counters, DecisionNeed, DecisionQueue, Directory, EngineClock, Outputs, SwitchesDue,
};
use encore_components::utterance::{BufferedPacket, PacketBuffer, Utterance};

use crate::rtp::{ts_after, us_to_ticks};
use crate::shared::bug;

/// Smallest timestamp step at a switch: one 20 ms frame.
pub const MIN_SWITCH_STEP_US: u64 = 20_000;

/// Packets per media a catching-up route may send ahead of their time in one tick (on top of
/// the ones due). At onset a live route is behind by the pre-roll and the onset, 13 20 ms
/// packets with the defaults (about 2 KB): twelve ahead and the one due send them all in the
/// onset tick, so the first voiced packet leaves in the tick its onset is detected (the 40 ms
/// of onset detection are then the whole delay the engine adds; the goal is 60 ms).
/// Any more would only matter for a longer configured pre-roll, which then spreads over ticks
/// (up to 2 s, 100 packets: nine ticks) instead of going out as one burst.
pub const CATCHUP_PACKETS_PER_TICK: usize = 12;

/// What a live route may be behind at its start beyond the pre-roll and the onset, and still
/// catch up: the tick in which it was routed and the publisher's arrival jitter.
pub const CATCHUP_SLACK_US: u64 = 100_000;

/// The most a live route may run ahead of its pace, and the most it may be behind its
/// utterance's first packet at its start to catch up at all: the pre-roll, the onset and
/// [`CATCHUP_SLACK_US`] (340 ms with the defaults). A route further behind is time-shifted
/// and stays paced.
pub fn catchup_bound_us(config: &EngineConfig) -> u64 {
    (config.preroll_ms + config.vad.onset_ms) * 1000 + CATCHUP_SLACK_US
}

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
    if stream.history.len() != history_len {
        let empty = SentRecord {
            ord: playing.ord,
            ext_seq: 0,
            ts: 0,
            seq: seq.wrapping_add(1),
            marker: false,
            resent_us: None,
        };
        stream.history = vec![empty; history_len];
    }
    stream.history[seq as usize % history_len] =
        SentRecord { ord: playing.ord, ext_seq: packet.ext_seq, ts, seq, marker, resent_us: None };
    (seq, ts, marker)
}

#[allow(clippy::too_many_arguments)]
pub fn play_out(
    clock: Res<EngineClock>,
    config: Res<EngineConfig>,
    directory: Res<Directory>,
    mut outputs: ResMut<Outputs>,
    mut counters: ResMut<Counters>,
    mut queue: ResMut<DecisionQueue>,
    mut due: ResMut<SwitchesDue>,
    mut sessions: Query<(&ListenerSession, &mut Route, &mut OutStreams)>,
    utterances: Query<(&Utterance, &PacketBuffer)>,
) {
    let now = clock.now_us;
    let history_len = config.limits.nack_history as usize;
    let credit_per_packet = config.limits.retransmit_percent;
    let credit_cap = config.limits.retransmit_burst.saturating_mul(100);
    let payloads = outputs.payloads;
    let max_pause_us = config.playout.max_pause_ms * 1000;
    let switch_pause_us = config.playout.switch_pause_ms * 1000;
    let switch_wait_us = config.playout.switch_wait_ms * 1000;
    for session in directory.listeners.values() {
        let Ok((listener, mut route, mut streams)) = sessions.get_mut(*session) else {
            bug(&mut counters, "a session in the directory lacks its components");
            continue;
        };
        if route.paused_since_us.is_some() {
            // Paused: the position waits (the resume moves the pace on by the pause).
            continue;
        }
        let route = &mut *route;
        let Some(playing) = route.playing.as_mut() else { continue };
        let Ok((utterance, buffer)) = utterances.get(playing.utterance) else {
            bug(&mut counters, "a listener plays an utterance that is gone");
            continue;
        };
        for media in [MediaKind::Audio, MediaKind::Video] {
            let packets = match media {
                MediaKind::Audio => &buffer.audio.packets,
                MediaKind::Video => &buffer.video.packets,
            };
            let cursor = match media {
                MediaKind::Audio => playing.audio,
                MediaKind::Video => playing.video,
            };
            // A live route may still catch up: it sends what it has, not only what is due.
            let catching_up = utterance.is_open() && cursor.ahead_us < playing.catchup_us;
            if cursor.reshapes == buffer.reshapes {
                // Early, or caught up with a live utterance that got nothing new: the
                // listener costs nothing this tick.
                let early = cursor.next_due_us.is_some_and(|due| due > now) && !catching_up;
                let caught_up = cursor.last_ext_seq.is_some() && cursor.next == packets.len();
                if early || caught_up {
                    continue;
                }
            }
            let mut index = if cursor.reshapes == buffer.reshapes { cursor.next } else { resume(packets, &cursor) };
            let mut last = cursor.last_ext_seq;
            let mut next_due_us = None;
            let mut ahead_us = cursor.ahead_us;
            let mut sent_ahead = 0;
            let mut silent_since_us = cursor.silent_since_us;
            // A time-shifted audio-only route shortens long pauses (see the module doc).
            let shorten = media == MediaKind::Audio
                && max_pause_us > 0
                && playing.catchup_us == 0
                && buffer.video.packets.is_empty();
            while let Some(packet) = packets.get(index) {
                if media == MediaKind::Audio {
                    if packet.voiced {
                        silent_since_us = None;
                    } else {
                        let since = *silent_since_us.get_or_insert(packet.media_us);
                        if shorten && packet.media_us >= since + max_pause_us {
                            // Silence past the pause's bound: drop it when what follows is
                            // already here (or nothing will follow), and let the next packet
                            // take its slot, on the pace and in the timestamps.
                            let next = packets.get(index + 1);
                            if next.is_some() || !utterance.is_open() {
                                if let Some(next) = next {
                                    ahead_us += next.media_us.saturating_sub(packet.media_us);
                                    let stream = streams.get_mut(media);
                                    if stream.source == Some(playing.ord) && !stream.rebase {
                                        stream.ts_offset =
                                            stream.ts_offset.wrapping_sub(next.ts.wrapping_sub(packet.ts));
                                    }
                                }
                                index += 1;
                                last = Some(packet.ext_seq);
                                counters.pause_dropped += 1;
                                continue;
                            }
                        }
                    }
                }
                let paced = (playing.start_us + packet.media_us).saturating_sub(playing.origin_media_us);
                let due = paced.saturating_sub(ahead_us);
                if due > now {
                    // Ahead of its time: only a live route catching up sends it, within
                    // both bounds, and its pace moves forward by as much.
                    let early_by = paced - now;
                    let may =
                        utterance.is_open() && sent_ahead < CATCHUP_PACKETS_PER_TICK && early_by <= playing.catchup_us;
                    if !may {
                        next_due_us = Some(due);
                        break;
                    }
                    sent_ahead += 1;
                    ahead_us = ahead_us.max(early_by);
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
                stream.retransmit_credit = (stream.retransmit_credit + credit_per_packet).min(credit_cap);
                outputs.out.packets.push(SendPacket {
                    listener: listener.key,
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
            let cursor = Cursor {
                next: index,
                last_ext_seq: last,
                next_due_us,
                reshapes: buffer.reshapes,
                ahead_us,
                silent_since_us,
            };
            match media {
                MediaKind::Audio => playing.audio = cursor,
                MediaKind::Video => playing.video = cursor,
            }
        }
        if route_finished(utterance, buffer, playing) {
            queue
                .needs
                .entry(listener.key)
                .or_insert(DecisionNeed { reason: RouteReason::Finished, from: Some(playing.id.clone()) });
        } else if let Some(pending) = &route.pending_switch {
            // A switch waits for a pause in what the listener hears: silent audio sent for
            // `switch_pause_ms` of media time, or the end of its wait.
            let last_sent = playing.audio.next.checked_sub(1).and_then(|i| buffer.audio.packets.get(i));
            let at_pause = playing
                .audio
                .silent_since_us
                .zip(last_sent)
                .is_some_and(|(since, last)| last.media_us >= since + switch_pause_us);
            if at_pause || now >= pending.decided_us + switch_wait_us {
                due.list.push((*session, at_pause));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::ingest::MAX_PAUSE_HOLD_US;
    use crate::testkit::{Room, route, routes, starts};
    use encore_components::config::EngineConfig;
    use encore_components::ids::Name;
    use encore_components::input::Input;

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
    fn an_idle_listener_routed_at_onset_catches_up_to_the_live_edge_within_the_bound() {
        let mut room = Room::new(EngineConfig::default());
        room.speaker("alice", "a1");
        room.listener("lena");
        // 200 ms of silence to fill the pre-roll, then speech from 1.0 s: onset at 1.04 s.
        room.silence("a1", 0, 1_000_000);
        room.talk("a1", 1_000_000, 3_000_000);
        let trace = room.run_until(3_500_000);
        let onset_us = starts(&trace)[0].0 * 10_000;
        assert_eq!(onset_us, 1_040_000);
        let audio: Vec<(u64, &SendPacket)> =
            room.sent.iter().filter(|(_, p)| p.media == MediaKind::Audio).map(|(at, p)| (*at, p)).collect();
        // The packet's arrival, from its source timestamp (the testkit sends ts = at * 48 kHz).
        let first_ts = audio[0].1.ts;
        let arrived_us = |p: &SendPacket| 800_000 + u64::from(p.ts.wrapping_sub(first_ts)) * 1000 / 48;
        // Nothing is dropped: the whole pre-roll (800-1000 ms) goes out, first, in the onset tick.
        assert_eq!(audio[0].0, onset_us);
        assert_eq!(audio.iter().filter(|(_, p)| arrived_us(p) < 1_000_000).count(), 10);
        assert_eq!(audio.len(), 110, "every packet from 0.8 s to 3.0 s");
        // One continuous stream: seq + 1 and one 20 ms frame per packet, a catch-up or not.
        for pair in audio.windows(2) {
            assert_eq!(pair[1].1.seq, pair[0].1.seq.wrapping_add(1));
            assert_eq!(pair[1].1.ts.wrapping_sub(pair[0].1.ts), 960);
        }
        // Never more than the bound ahead per tick, plus the one due.
        let mut per_tick = BTreeMap::new();
        for (at, _) in &audio {
            *per_tick.entry(*at).or_insert(0usize) += 1;
        }
        assert!(per_tick.values().all(|n| *n <= CATCHUP_PACKETS_PER_TICK + 1), "{per_tick:?}");
        assert!(per_tick.values().any(|n| *n > 2), "no catch-up: {per_tick:?}");
        // The live edge in the onset tick (the next packet arrives two ticks later); from then
        // on every packet goes out in the tick it arrives.
        let live_from = audio.iter().position(|(at, p)| *at == arrived_us(p)).unwrap();
        assert!(audio[live_from].0 <= onset_us + 20_000, "live from {}", audio[live_from].0);
        assert!(audio[live_from..].iter().all(|(at, p)| *at == arrived_us(p)));
        // The first voiced packet (sent at 1.0 s) leaves in the onset tick: all 13 there are do.
        let first_voiced = audio.iter().find(|(_, p)| arrived_us(p) == 1_000_000).unwrap();
        assert_eq!(first_voiced.0, onset_us);
        assert_eq!(per_tick[&onset_us], 13);
    }

    #[test]
    fn a_late_route_to_a_live_utterance_stays_paced() {
        let mut room = Room::new(EngineConfig::default());
        room.speaker("alice", "a1");
        room.speaker("bob", "b1");
        room.listener("lena");
        // lena is busy with alice when bob starts; she hears bob from 1.5 s, 1 s behind him,
        // while he still talks: time-shifted, at his pace, no catch-up.
        room.talk("a1", 0, 1_500_000);
        room.talk("b1", 500_000, 3_000_000);
        room.run_until(5_000_000);
        let bob_ord = room.engine.utterance_ord(&"bob#1".parse().unwrap()).unwrap();
        let bob: Vec<u64> = room.sent.iter().filter(|(_, p)| p.utterance == bob_ord).map(|(at, _)| *at).collect();
        assert!(bob.len() > 100);
        assert!(bob.windows(2).all(|w| w[1] >= w[0] + 20_000), "a burst: {bob:?}");
    }

    /// bob's utterance (0.5-3.38 s) has a 360 ms pause inside and a 380 ms silent tail: lena,
    /// busy with alice, hears it time-shifted with each pause cut to `max_pause_ms` (250 ms).
    fn room_with_a_paused_speaker(config: EngineConfig) -> (Room, Vec<(u64, SendPacket)>) {
        let mut room = Room::new(config);
        room.speaker("alice", "a1");
        room.speaker("bob", "b1");
        room.listener("lena");
        room.talk("a1", 0, 2_000_000);
        room.talk("b1", 500_000, 1_500_000);
        room.silence("b1", 1_500_000, 1_860_000);
        room.talk("b1", 1_860_000, 3_000_000);
        room.silence("b1", 3_000_000, 3_600_000);
        room.run_until(8_000_000);
        let bob_ord = room.engine.utterance_ord(&"bob#1".parse().unwrap()).unwrap();
        let bob = room.sent.iter().filter(|(_, p)| p.utterance == bob_ord).map(|(at, p)| (*at, p.clone())).collect();
        (room, bob)
    }

    #[test]
    fn a_time_shifted_route_shortens_long_pauses_and_keeps_its_stream_continuous() {
        let (mut room, bob) = room_with_a_paused_speaker(EngineConfig::default());
        let buffered = room.buffer_of("bob#1").audio.packets;
        let silent = |p: &SendPacket| p.audio_level == Some(100);
        // The inner pause (18 packets, 360 ms) keeps 250 ms (13 packets), and so does the
        // tail (19 packets until the offset, 400 ms after the last voiced one).
        let dropped = buffered.len() - bob.len();
        assert_eq!(dropped, 5 + 6, "{} buffered, {} sent", buffered.len(), bob.len());
        let runs: Vec<usize> = bob.split(|(_, p)| !silent(p)).map(|run| run.len()).filter(|n| *n > 0).collect();
        assert_eq!(runs, vec![13, 13], "silent runs as sent");
        // Every word is there, and one continuous stream: seq + 1, one 20 ms frame per packet,
        // one packet per 20 ms of the clock (the pace moved up, it did not burst).
        assert_eq!(bob.iter().filter(|(_, p)| !silent(p)).count(), buffered.iter().filter(|p| p.voiced).count());
        for pair in bob.windows(2) {
            assert_eq!(pair[1].1.seq, pair[0].1.seq.wrapping_add(1));
            assert_eq!(pair[1].1.ts.wrapping_sub(pair[0].1.ts), 960);
            assert_eq!(pair[1].0 - pair[0].0, 20_000, "{:?} then {:?}", pair[0], pair[1]);
        }
        // 11 packets fewer: lena is done with bob 220 ms sooner than with the pauses whole.
        let mut whole = EngineConfig::default();
        whole.playout.max_pause_ms = 0;
        let (_, kept) = room_with_a_paused_speaker(whole);
        assert_eq!(kept.len(), buffered.len());
        assert_eq!(kept.last().unwrap().0 - bob.last().unwrap().0, 220_000);
    }

    #[test]
    fn a_live_route_keeps_its_pauses() {
        let mut room = Room::new(EngineConfig::default());
        room.speaker("bob", "b1");
        room.listener("lena");
        room.talk("b1", 500_000, 1_500_000);
        room.silence("b1", 1_500_000, 1_860_000);
        room.talk("b1", 1_860_000, 3_000_000);
        room.run_until(5_000_000);
        let buffered = room.buffer_of("bob#1").audio.packets.len();
        assert_eq!(room.sent.len(), buffered, "live: nothing dropped");
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
    fn a_paused_listener_continues_from_where_it_paused_with_no_gap_in_its_stream() {
        let mut room = Room::new(EngineConfig::default());
        room.speaker("alice", "a1");
        room.speaker("bob", "b1");
        room.listener("lena");
        room.talk("a1", 0, 3_000_000);
        // bob talks while lena is paused: she takes him only after alice, from the buffer.
        room.talk("b1", 1_500_000, 2_000_000);
        let lena = || Name::new("lena");
        room.push(1_000_000, Input::Pause { peer: lena() });
        room.push(2_500_000, Input::Resume { peer: lena() });
        let trace = room.run_until(8_000_000);
        let alice_ord = room.engine.utterance_ord(&"alice#1".parse().unwrap()).unwrap();
        let alice_packets = room.buffer_of("alice#1").audio.packets.len();
        let audio: Vec<(u64, &SendPacket)> =
            room.sent.iter().filter(|(_, p)| p.media == MediaKind::Audio).map(|(at, p)| (*at, p)).collect();
        // Nothing while paused.
        assert!(audio.iter().all(|(at, _)| *at < 1_000_000 || *at >= 2_500_000));
        // Every packet of alice's utterance, each once and in order: the position waited.
        let alice: Vec<u16> = audio.iter().filter(|(_, p)| p.utterance == alice_ord).map(|(_, p)| p.src_seq).collect();
        assert_eq!(alice.len(), alice_packets);
        assert!(alice.windows(2).all(|w| w[1] == w[0].wrapping_add(1)), "{alice:?}");
        // One stream: the next sequence number after the pause, and a timestamp gap of the
        // time that passed, marked, like a switch.
        for pair in audio.windows(2) {
            assert_eq!(pair[1].1.seq, pair[0].1.seq.wrapping_add(1));
        }
        let resumed = audio.iter().position(|(at, _)| *at >= 2_500_000).unwrap();
        let (before, after) = (audio[resumed - 1], audio[resumed]);
        assert_eq!(after.0, 2_500_000, "the resume tick sends");
        assert!(after.1.marker);
        assert_eq!(u64::from(after.1.ts.wrapping_sub(before.1.ts)), (after.0 - before.0) * 48 / 1000);
        // The rest at the original pace: alice's last packet 1.5 s (the pause) after it would have gone.
        let last_alice = audio.iter().rfind(|(_, p)| p.utterance == alice_ord).unwrap().0;
        assert!((4_400_000..=4_600_000).contains(&last_alice), "{last_alice}");
        // No route changed during the pause; bob#1 came after alice#1.
        let lena_routes = routes(&trace, "lena");
        assert!(lena_routes.iter().all(|(tick, ..)| *tick < 100 || *tick >= 250), "{lena_routes:?}");
        assert_eq!(lena_routes[1].2.as_deref(), Some("bob#1"));
        assert_eq!(lena_routes[1].3, RouteReason::Finished);
    }

    #[test]
    fn a_resume_after_the_hold_or_while_idle_is_a_fresh_decision() {
        let mut room = Room::new(EngineConfig::default());
        room.speaker("alice", "a1");
        room.speaker("bob", "b1");
        room.listener("lena");
        room.listener("max");
        room.talk("a1", 0, 2_000_000);
        room.talk("b1", 5_000_000, 6_000_000);
        // lena pauses in alice#1 for longer than a pause holds a position.
        room.push(1_000_000, Input::Pause { peer: Name::new("lena") });
        let resume_us = 1_000_000 + MAX_PAUSE_HOLD_US + 10_000;
        room.push(resume_us, Input::Resume { peer: Name::new("lena") });
        // max pauses while idle, and bob talks meanwhile: on resume he gets bob#1.
        room.push(4_000_000, Input::Pause { peer: Name::new("max") });
        room.push(7_000_000, Input::Resume { peer: Name::new("max") });
        let trace = room.run_until(resume_us + 100_000);
        let lena = routes(&trace, "lena");
        let resume_tick = resume_us / 10_000;
        // Released: bob#1 is a minute old by then, and nothing else is worth hearing.
        assert_eq!(lena.last().unwrap(), &route(resume_tick, Some("alice#1"), None, RouteReason::Resumed));
        let max = routes(&trace, "max");
        let after_alice: Vec<_> = max.iter().filter(|(tick, ..)| *tick > 400).cloned().collect();
        assert_eq!(
            after_alice,
            vec![
                route(700, None, Some("bob#1"), RouteReason::Resumed),
                route(799, Some("bob#1"), None, RouteReason::Finished)
            ]
        );
    }

    #[test]
    fn a_paused_position_evicted_meanwhile_is_rerouted_at_once_with_its_reason() {
        let mut room = Room::new(EngineConfig::default());
        room.speaker("alice", "a1");
        room.listener("lena");
        room.talk("a1", 0, 2_000_000);
        room.push(1_000_000, Input::Pause { peer: Name::new("lena") });
        // The room's share shrinks to almost nothing: the paused position's utterance goes.
        room.push(3_000_000, Input::BufferShare { bytes: 2_000 });
        room.push(4_000_000, Input::Resume { peer: Name::new("lena") });
        let trace = room.run_until(5_000_000);
        let lena = routes(&trace, "lena");
        assert_eq!(lena.last().unwrap(), &route(300, Some("alice#1"), None, RouteReason::Evicted));
        assert!(room.sent.iter().all(|(at, _)| *at < 1_000_000), "sent after the pause");
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
                voiced: false,
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

/// The rewriter alone, step by step on one stream, as mediasoup tests its `SeqManager`: each
/// row sends one packet and says what the listener must see.
#[cfg(test)]
mod rewrite_table {
    use bevy_ecs::prelude::Entity;
    use encore_components::ids::{MediaKind, Name, PeerKey, UtteranceOrd};
    use encore_components::listener::{OutStream, Playing};
    use encore_components::utterance::BufferedPacket;

    use super::rewrite;

    /// One packet: from utterance `ord`, with source `ts` and `marker`, sent at `now_us`,
    /// after a cut-over when `cut` (eviction's `rebase`); then the header it must get.
    struct Row {
        ord: u64,
        ts: u32,
        marker: bool,
        now_us: u64,
        cut: bool,
        expect: (u16, u32, bool),
    }

    fn row(ord: u64, ts: u32, now_us: u64, expect: (u16, u32, bool)) -> Row {
        Row { ord, ts, marker: false, now_us, cut: false, expect }
    }

    fn stream(media: MediaKind, last_seq: u16, last_ts: u32) -> OutStream {
        OutStream {
            media,
            ssrc: 1,
            clock_rate: if media == MediaKind::Audio { 48_000 } else { 90_000 },
            last_seq,
            last_ts,
            last_send_us: None,
            ts_offset: 0,
            source: None,
            rebase: true,
            history: Vec::new(),
            retransmit_credit: 0,
        }
    }

    fn run(mut stream: OutStream, rows: &[Row]) {
        for (i, row) in rows.iter().enumerate() {
            let playing = Playing {
                utterance: Entity::PLACEHOLDER,
                id: "s#1".parse().unwrap(),
                ord: UtteranceOrd(row.ord),
                speaker: PeerKey(0),
                speaker_name: Name::new("s"),
                start_us: 0,
                origin_media_us: 0,
                catchup_us: 0,
                score: 0,
                terms: Default::default(),
                audio: Default::default(),
                video: Default::default(),
                video_needs_keyframe: false,
            };
            let packet = BufferedPacket {
                ext_seq: i as u64,
                ext_ts: row.ts as u64,
                seq: i as u16,
                ts: row.ts,
                media_us: 0,
                marker: row.marker,
                keyframe: false,
                audio_level: None,
                voiced: false,
                payload: std::sync::Arc::from(vec![]),
            };
            stream.rebase |= row.cut;
            let got = rewrite(&mut stream, &playing, &packet, row.now_us, 16);
            assert_eq!(got, row.expect, "row {i}");
            let record = stream.history[got.0 as usize % 16];
            assert_eq!((record.seq, record.ts, record.marker), got, "row {i}: the NACK history has it");
        }
    }

    #[test]
    fn within_a_source_numbers_follow_the_source() {
        run(
            stream(MediaKind::Audio, 99, 5_000),
            &[
                // The first packet starts at the stream's random initial values, marked.
                row(0, 70_000, 0, (100, 5_000, true)),
                row(0, 70_960, 20_000, (101, 5_960, false)),
                // A gap in the source (DTX) is a gap in the stream's timestamps.
                row(0, 72_880, 40_000, (102, 7_880, false)),
                // A source timestamp going back never takes the stream's back.
                row(0, 72_000, 60_000, (103, 7_880, false)),
            ],
        );
    }

    #[test]
    fn sequence_numbers_and_timestamps_wrap() {
        run(
            stream(MediaKind::Audio, 65_534, u32::MAX - 959),
            &[
                row(0, 10, 0, (65_535, u32::MAX - 959, true)),
                row(0, 970, 20_000, (0, 0, false)),
                row(0, 1_930, 40_000, (1, 960, false)),
            ],
        );
        // The source's timestamps wrap, not the stream's.
        run(
            stream(MediaKind::Audio, 0, 1_000),
            &[row(0, u32::MAX - 479, 0, (1, 1_000, true)), row(0, 480, 20_000, (2, 1_960, false))],
        );
    }

    #[test]
    fn a_switch_leaves_the_time_that_passed_and_at_least_one_frame() {
        run(
            stream(MediaKind::Audio, 9, 0),
            &[
                row(0, 1_000, 0, (10, 0, true)),
                row(0, 1_960, 20_000, (11, 960, false)),
                // Another utterance 500 ms later: 24 000 ticks of 48 kHz after the last.
                row(1, 900_000, 520_000, (12, 24_960, true)),
                row(1, 900_960, 540_000, (13, 25_920, false)),
                // Back to the first 5 ms later: still one 20 ms frame forward, never less.
                row(0, 2_920, 545_000, (14, 26_880, true)),
            ],
        );
    }

    #[test]
    fn a_cut_over_inside_an_utterance_rebases_like_a_switch() {
        run(
            stream(MediaKind::Audio, 0, 0),
            &[
                row(3, 0, 0, (1, 0, true)),
                row(3, 960, 20_000, (2, 960, false)),
                // Eviction cut the front: the cursor jumps 2 s of source ahead, 100 ms later.
                Row { ord: 3, ts: 96_960, marker: false, now_us: 120_000, cut: true, expect: (3, 5_760, true) },
                row(3, 97_920, 140_000, (4, 6_720, false)),
            ],
        );
    }

    #[test]
    fn video_keeps_its_own_markers_at_a_switch() {
        run(
            stream(MediaKind::Video, 0, 0),
            &[
                Row { ord: 0, ts: 3_000, marker: true, now_us: 0, cut: false, expect: (1, 0, true) },
                row(0, 6_000, 33_333, (2, 3_000, false)),
                // A switch 1 s later: 90 000 ticks, and the marker stays the source's.
                row(1, 50, 1_033_333, (3, 93_000, false)),
            ],
        );
    }
}
