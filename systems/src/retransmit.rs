//! System 8, retransmit: answers listeners' NACKs from the buffer, within bounds.
//!
//! A NACK names sequence numbers of the listener's own stream. The stream remembers the
//! last `limits.nack_history` packets it sent (utterance and source packet); a remembered
//! packet still in the buffer goes out again with exactly the header it had. Anything else
//! (too old, evicted, never sent) is counted as unserved.
//!
//! A listener that NACKs what it just received must not turn the buffer into an amplifier,
//! so three bounds hold, each counted in `nack_refused` when it refuses:
//! - a sequence number named again before the last NACK was served goes out once (ingest
//!   deduplicates the pending list);
//! - a packet goes out again at most once per `limits.nack_resend_interval_ms` (a round trip,
//!   about: the copy in flight is not worth doubling);
//! - the stream's retransmissions are paid from a credit that each packet sent earns a share
//!   of (`limits.retransmit_percent`), up to a burst (`limits.retransmit_burst`): a genuine
//!   loss burst is served at once, a listener NACKing everything gets at most that share
//!   more than its stream.

use bevy_ecs::prelude::{Query, Res, ResMut};

use encore_components::config::EngineConfig;
use encore_components::ids::MediaKind;
use encore_components::listener::{ListenerSession, OutStreams, PendingNacks};
use encore_components::output::SendPacket;
use encore_components::resources::{Counters, Directory, EngineClock, NackQueue, Outputs};
use encore_components::utterance::{PacketBuffer, Utterance};

use crate::shared::bug;

/// What one retransmission costs of a stream's credit (the credit is in hundredths).
const RETRANSMIT_COST: u32 = 100;

#[allow(clippy::too_many_arguments)]
pub fn retransmit(
    clock: Res<EngineClock>,
    config: Res<EngineConfig>,
    directory: Res<Directory>,
    mut queue: ResMut<NackQueue>,
    mut outputs: ResMut<Outputs>,
    mut counters: ResMut<Counters>,
    mut sessions: Query<(&ListenerSession, &mut PendingNacks, &mut OutStreams)>,
    utterances: Query<(&Utterance, &PacketBuffer)>,
) {
    let payloads = outputs.payloads;
    let interval_us = config.limits.nack_resend_interval_ms * 1000;
    for key in std::mem::take(&mut queue.listeners) {
        // The listener may have left since its NACK was queued.
        let Some(session) = directory.listeners.get(&key) else { continue };
        let Ok((listener, mut pending, mut streams)) = sessions.get_mut(*session) else {
            bug(&mut counters, "a session in the directory lacks its components");
            continue;
        };
        if pending.seqs.is_empty() {
            continue;
        }
        for (media, seq) in pending.seqs.drain(..) {
            let stream = streams.get_mut(media);
            let len = stream.history.len();
            let slot = (len > 0).then(|| seq as usize % len).filter(|slot| stream.history[*slot].seq == seq);
            let found = slot.and_then(|slot| {
                let record = stream.history[slot];
                let (utterance, buffer) = utterances.get(*directory.utterances.get(&record.ord)?).ok()?;
                let packets = match media {
                    MediaKind::Audio => &buffer.audio.packets,
                    MediaKind::Video => &buffer.video.packets,
                };
                let index = packets.binary_search_by_key(&record.ext_seq, |p| p.ext_seq).ok()?;
                Some((slot, record, utterance.ord, &packets[index]))
            });
            let Some((slot, record, id, packet)) = found else {
                counters.nack_unserved += 1;
                continue;
            };
            if record.resent_us.is_some_and(|at| clock.now_us < at + interval_us) {
                counters.nack_refused.too_soon += 1;
                continue;
            }
            if stream.retransmit_credit < RETRANSMIT_COST {
                counters.nack_refused.over_budget += 1;
                continue;
            }
            stream.retransmit_credit -= RETRANSMIT_COST;
            stream.history[slot].resent_us = Some(clock.now_us);
            outputs.out.packets.push(SendPacket {
                listener: listener.key,
                media,
                utterance: id,
                src_seq: packet.seq,
                seq: record.seq,
                ts: record.ts,
                ssrc: stream.ssrc,
                marker: record.marker,
                retransmit: true,
                keyframe: packet.keyframe,
                audio_level: packet.audio_level,
                payload: payloads.then(|| packet.payload.clone()),
            });
            counters.retransmitted += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::Room;
    use encore_components::config::EngineConfig;
    use encore_components::ids::Name;
    use encore_components::input::Input;

    #[test]
    fn a_nack_is_served_with_the_same_header_and_unknown_ones_are_counted() {
        let mut room = Room::new(EngineConfig::default());
        room.speaker("alice", "a1");
        room.listener("lena");
        room.talk("a1", 0, 1_000_000);
        room.run_until(500_000);
        let first = room.sent.iter().find(|(_, p)| p.media == MediaKind::Audio).unwrap().1.clone();
        let bogus = first.seq.wrapping_sub(1000);
        room.push(
            500_000,
            Input::Nack { peer: Name::new("lena"), media: MediaKind::Audio, seqs: vec![first.seq, bogus] },
        );
        room.run_until(510_000);
        let resent: Vec<_> = room.sent.iter().filter(|(_, p)| p.retransmit).collect();
        assert_eq!(resent.len(), 1);
        let again = &resent[0].1;
        assert_eq!((again.seq, again.ts, again.ssrc, again.marker), (first.seq, first.ts, first.ssrc, first.marker));
        assert_eq!(again.payload, first.payload);
        assert_eq!(room.engine.counters().nack_unserved, 1);
    }

    fn lena_nacks(room: &mut Room, at_us: u64, seqs: Vec<u16>) {
        room.push(at_us, Input::Nack { peer: Name::new("lena"), media: MediaKind::Audio, seqs });
    }

    fn resent(room: &Room) -> usize {
        room.sent.iter().filter(|(_, p)| p.retransmit).count()
    }

    #[test]
    fn a_seq_named_twice_before_it_is_served_goes_out_once() {
        let mut room = Room::new(EngineConfig::default());
        room.speaker("alice", "a1");
        room.listener("lena");
        room.talk("a1", 0, 1_000_000);
        room.run_until(500_000);
        let seq = room.sent.iter().find(|(_, p)| p.media == MediaKind::Audio).unwrap().1.seq;
        lena_nacks(&mut room, 500_000, vec![seq, seq]);
        lena_nacks(&mut room, 500_000, vec![seq]);
        room.run_until(510_000);
        assert_eq!(resent(&room), 1);
        assert_eq!(room.engine.counters().nack_refused.duplicate, 2);
    }

    #[test]
    fn a_packet_goes_out_again_at_most_once_per_resend_interval() {
        let mut room = Room::new(EngineConfig::default());
        room.speaker("alice", "a1");
        room.listener("lena");
        room.talk("a1", 0, 2_000_000);
        room.run_until(500_000);
        let seq = room.sent.iter().find(|(_, p)| p.media == MediaKind::Audio).unwrap().1.seq;
        // Every tick for 150 ms: the first NACK and the one 100 ms later are served.
        for at in (500_000..650_000).step_by(10_000) {
            lena_nacks(&mut room, at, vec![seq]);
            room.run_until(at + 10_000);
        }
        assert_eq!(resent(&room), 2);
        assert_eq!(room.engine.counters().nack_refused.too_soon, 13);
    }

    #[test]
    fn a_listener_nacking_everything_gets_at_most_its_share_more_than_its_stream() {
        let mut room = Room::new(EngineConfig::default());
        room.speaker("alice", "a1");
        room.listener("lena");
        room.talk("a1", 0, 10_000_000);
        // Lena NACKs every packet she got, every tick, for eight seconds.
        let mut at = 200_000;
        while at < 8_200_000 {
            let seqs: Vec<u16> = room
                .sent
                .iter()
                .filter(|(_, p)| p.media == MediaKind::Audio && !p.retransmit)
                .rev()
                .take(64)
                .map(|(_, p)| p.seq)
                .collect();
            if !seqs.is_empty() {
                lena_nacks(&mut room, at, seqs);
            }
            room.run_until(at + 10_000);
            at += 10_000;
        }
        let original = room.sent.iter().filter(|(_, p)| !p.retransmit).count();
        let limits = EngineConfig::default().limits;
        let bound = original * limits.retransmit_percent as usize / 100 + limits.retransmit_burst as usize;
        assert!(resent(&room) <= bound, "{} retransmissions for {original} packets (bound {bound})", resent(&room));
        assert!(resent(&room) >= bound * 9 / 10, "the share is used: {} of {bound}", resent(&room));
        let refused = room.engine.counters().nack_refused;
        assert!(refused.over_budget > 0 && refused.too_soon > 0, "{refused:?}");
    }
}
