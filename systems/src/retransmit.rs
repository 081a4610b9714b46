//! System 8, retransmit: answers listeners' NACKs from the buffer.
//!
//! A NACK names sequence numbers of the listener's own stream. The stream remembers the
//! last `limits.nack_history` packets it sent (utterance and source packet); a remembered
//! packet still in the buffer goes out again with exactly the header it had. Anything else
//! (too old, evicted, never sent) is counted as unserved.

use bevy_ecs::prelude::{Query, Res, ResMut};

use encore_components::ids::MediaKind;
use encore_components::listener::{ListenerSession, OutStreams, PendingNacks};
use encore_components::output::SendPacket;
use encore_components::resources::{Counters, Directory, NackQueue, Outputs};
use encore_components::utterance::{PacketBuffer, Utterance};

use crate::shared::bug;

pub fn retransmit(
    directory: Res<Directory>,
    mut queue: ResMut<NackQueue>,
    mut outputs: ResMut<Outputs>,
    mut counters: ResMut<Counters>,
    mut sessions: Query<(&ListenerSession, &mut PendingNacks, &OutStreams)>,
    utterances: Query<(&Utterance, &PacketBuffer)>,
) {
    let payloads = outputs.payloads;
    for key in std::mem::take(&mut queue.listeners) {
        // The listener may have left since its NACK was queued.
        let Some(session) = directory.listeners.get(&key) else { continue };
        let Ok((listener, mut pending, streams)) = sessions.get_mut(*session) else {
            bug(&mut counters, "a session in the directory lacks its components");
            continue;
        };
        if pending.seqs.is_empty() {
            continue;
        }
        for (media, seq) in pending.seqs.drain(..) {
            let stream = streams.get(media);
            let record = match stream.history.len() {
                0 => None,
                len => Some(stream.history[seq as usize % len]).filter(|r| r.seq == seq),
            };
            let found = record.and_then(|record| {
                let (utterance, buffer) = utterances.get(*directory.utterances.get(&record.ord)?).ok()?;
                let packets = match media {
                    MediaKind::Audio => &buffer.audio.packets,
                    MediaKind::Video => &buffer.video.packets,
                };
                let index = packets.binary_search_by_key(&record.ext_seq, |p| p.ext_seq).ok()?;
                Some((record, utterance.ord, &packets[index]))
            });
            let Some((record, id, packet)) = found else {
                counters.nack_unserved += 1;
                continue;
            };
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
}
