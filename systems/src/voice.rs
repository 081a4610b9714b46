//! System 2, voice: voice activity per audio track from the RFC 6464 audio level, with onset
//! and hang-over hysteresis.
//!
//! A packet is voiced when its level is at most `vad.level_threshold` (0 is loudest), or at
//! most `vad.voice_flag_level_threshold` when the sender set the V flag. The flag is only
//! ever evidence for voice: some senders never set it (aiortc), and real silence arrives at
//! levels around 90, not 127. Without the extension, a packet is voiced when its payload is
//! larger than `vad.dtx_max_bytes` (Opus DTX and comfort noise are 1 to 3 bytes).
//!
//! Speech starts (onset) when voiced packets have kept coming for `vad.onset_ms`, with no
//! unvoiced packet and no gap over [`RUN_GAP_US`] between them; it ends (offset) when no
//! voiced packet arrived for `vad.hangover_ms`. The changes are placed between the tick's
//! packets (`Incoming::changes`) so segmentation knows which packets belong where.

use bevy_ecs::prelude::{Query, Res};

use encore_components::config::{EngineConfig, VadConfig};
use encore_components::resources::EngineClock;
use encore_components::track::{Incoming, StagedPacket, Voice, VoiceChange};

/// A pause this long between voiced packets breaks a run that has not reached onset yet.
pub const RUN_GAP_US: u64 = 100_000;

pub fn is_voiced(packet: &StagedPacket, vad: &VadConfig) -> bool {
    match packet.audio_level {
        Some(level) => {
            level <= vad.level_threshold || (packet.voice == Some(true) && level <= vad.voice_flag_level_threshold)
        }
        None => packet.payload.len() > vad.dtx_max_bytes,
    }
}

pub fn detect_voice(
    config: Res<EngineConfig>,
    clock: Res<EngineClock>,
    mut tracks: Query<(&mut Incoming, &mut Voice)>,
) {
    let onset_us = config.vad.onset_ms * 1000;
    let hangover_us = config.vad.hangover_ms * 1000;
    for (mut incoming, mut voice) in &mut tracks {
        let Incoming { packets, changes } = &mut *incoming;
        changes.clear();
        for (index, packet) in packets.iter_mut().enumerate() {
            let arrival = packet.arrival_us;
            if voice.speaking
                && let Some(last) = voice.last_voiced_us
                && arrival >= last + hangover_us
            {
                voice.speaking = false;
                changes.push(VoiceChange::Offset { before: index, at_us: last + hangover_us });
            }
            packet.voiced = is_voiced(packet, &config.vad);
            if packet.voiced {
                if !voice.speaking {
                    if voice.last_voiced_us.is_some_and(|last| arrival > last + RUN_GAP_US) {
                        voice.run_start_us = None;
                    }
                    let start = *voice.run_start_us.get_or_insert(arrival);
                    if arrival.saturating_sub(start) >= onset_us {
                        voice.speaking = true;
                        voice.run_start_us = None;
                        changes.push(VoiceChange::Onset { after: index, run_start_us: start });
                    }
                }
                voice.last_voiced_us = Some(arrival);
            } else if !voice.speaking {
                voice.run_start_us = None;
            }
        }
        if voice.speaking
            && let Some(last) = voice.last_voiced_us
            && clock.now_us >= last + hangover_us
        {
            voice.speaking = false;
            changes.push(VoiceChange::Offset { before: packets.len(), at_us: last + hangover_us });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bevy_ecs::prelude::World;
    use bevy_ecs::system::RunSystemOnce;

    use super::*;

    fn packet(arrival_us: u64, level: Option<u8>, voice: Option<bool>, size: usize) -> StagedPacket {
        StagedPacket {
            ext_seq: arrival_us / 20_000,
            ext_ts: arrival_us / 20_000 * 960,
            seq: 0,
            ts: 0,
            arrival_us,
            marker: false,
            keyframe: false,
            audio_level: level,
            voice,
            voiced: false,
            payload: Arc::from(vec![0u8; size]),
        }
    }

    /// Runs the system over ticks of 10 ms, feeding each packet in the tick that covers its
    /// arrival, and returns every change with the tick it happened in.
    fn run(packets: Vec<StagedPacket>, until_us: u64) -> Vec<(u64, VoiceChange)> {
        let mut world = World::new();
        world.insert_resource(EngineConfig::default());
        let track = world.spawn((Incoming::default(), Voice::default())).id();
        let mut changes = Vec::new();
        let mut now = 0;
        let mut rest = packets.into_iter().peekable();
        while now <= until_us {
            world.insert_resource(EngineClock { tick: now / 10_000, now_us: now, tick_us: 10_000 });
            let mut incoming = world.get_mut::<Incoming>(track).unwrap();
            incoming.packets.clear();
            while let Some(p) = rest.next_if(|p| p.arrival_us <= now) {
                incoming.packets.push(p);
            }
            world.run_system_once(detect_voice).unwrap();
            changes.extend(world.get::<Incoming>(track).unwrap().changes.iter().map(|c| (now, *c)));
            now += 10_000;
        }
        changes
    }

    fn talk(from_us: u64, to_us: u64, level: u8, voice: Option<bool>) -> Vec<StagedPacket> {
        (from_us..to_us).step_by(20_000).map(|t| packet(t, Some(level), voice, 80)).collect()
    }

    #[test]
    fn onset_after_forty_ms_of_voice_and_offset_after_the_hangover() {
        let mut packets = talk(0, 100_000, 93, None);
        packets.extend(talk(100_000, 1_000_000, 30, None));
        packets.extend(talk(1_000_000, 2_000_000, 93, None));
        let changes = run(packets, 2_000_000);
        assert_eq!(
            changes,
            vec![
                (140_000, VoiceChange::Onset { after: 0, run_start_us: 100_000 }),
                // Last voiced packet at 980 ms; 400 ms later the utterance ends.
                (1_380_000, VoiceChange::Offset { before: 0, at_us: 1_380_000 }),
            ]
        );
    }

    #[test]
    fn dither_level_silence_without_v_flag_is_not_voice() {
        // aiortc: silence at level 93 and never a V flag.
        assert!(run(talk(0, 2_000_000, 93, None), 2_000_000).is_empty());
        // A loud-ish level with V set counts, the same level without it does not.
        assert!(!run(talk(0, 500_000, 65, Some(true)), 600_000).is_empty());
        assert!(run(talk(0, 500_000, 65, Some(false)), 600_000).is_empty());
    }

    #[test]
    fn a_single_click_does_not_open_an_utterance() {
        let mut packets = talk(0, 200_000, 100, None);
        packets.push(packet(200_000, Some(10), None, 80));
        packets.extend(talk(220_000, 600_000, 100, None));
        assert!(run(packets, 600_000).is_empty());
    }

    #[test]
    fn without_the_extension_dtx_packets_are_silence() {
        let speech: Vec<_> = (0..500_000).step_by(20_000).map(|t| packet(t, None, None, 90)).collect();
        let mut packets = speech;
        // DTX: a 1-byte packet every 400 ms.
        packets.extend((500_000..3_000_000).step_by(400_000).map(|t| packet(t, None, None, 1)));
        let changes = run(packets, 3_000_000);
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(matches!(changes[0].1, VoiceChange::Onset { run_start_us: 0, .. }));
        assert!(matches!(changes[1].1, VoiceChange::Offset { at_us: 880_000, .. }));
    }

    #[test]
    fn the_hangover_bridges_short_pauses() {
        let mut packets = talk(0, 500_000, 30, None);
        packets.extend(talk(500_000, 800_000, 110, None));
        packets.extend(talk(800_000, 1_200_000, 30, None));
        let changes = run(packets, 2_000_000);
        assert_eq!(changes.len(), 2, "one onset and one offset: {changes:?}");
    }
}
