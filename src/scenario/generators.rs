//! Generator lines: one line of a hand-written scenario that stands for many `rtp` inputs of
//! a track (`talk`, `silence`, `video`), so that scenarios stay short and readable. The
//! reader expands them as it goes; nothing else knows about them.

use std::collections::HashMap;

use serde::Deserialize;

use encore_systems::components::ids::Name;
use encore_systems::components::input::{Input, MAX_LINE_PAYLOAD, RtpIn, filler_payload};

use super::ScenarioEvent;

/// The kinds of line that are generators, not inputs.
pub const GENERATOR_KINDS: [&str; 3] = ["talk", "silence", "video"];

/// Generator events: one line that stands for many `rtp` events of a track, so that
/// hand-written scenarios stay short and readable. Their packets continue the track's
/// sequence numbers, and their timestamps follow the engine time of the packet.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Generator {
    /// Voiced audio packets every `frame_ms` for `duration_ms`.
    Talk {
        track: String,
        duration_ms: u64,
        #[serde(default = "defaults::talk_level")]
        level: u8,
        #[serde(default)]
        voice: Option<bool>,
        #[serde(default = "defaults::talk_size")]
        size: usize,
        #[serde(default = "defaults::frame_ms")]
        frame_ms: u64,
        /// Packet indices (from 0) the network loses.
        #[serde(default)]
        lose: Vec<u32>,
        /// Packet indices that arrive twice (the copy 1 ms later).
        #[serde(default)]
        duplicate: Vec<u32>,
        /// `[index, ms]`: the packet arrives this much late, after later ones.
        #[serde(default)]
        late: Vec<(u32, u64)>,
    },
    /// Silence: comfort-noise packets every `frame_ms` at a dither level, or with `dtx`
    /// one 3-byte packet at level 127 every 400 ms.
    Silence {
        track: String,
        duration_ms: u64,
        #[serde(default = "defaults::silence_level")]
        level: u8,
        #[serde(default = "defaults::silence_size")]
        size: usize,
        #[serde(default)]
        dtx: bool,
        #[serde(default = "defaults::frame_ms")]
        frame_ms: u64,
    },
    /// Video frames at `fps`, one packet each (key frames `keyframe_packets`), with a key
    /// frame at `keyframe_at_ms` (from the start of the event) and then every
    /// `keyframe_every_ms` (0: never again).
    Video {
        track: String,
        duration_ms: u64,
        #[serde(default = "defaults::fps")]
        fps: u64,
        #[serde(default = "defaults::video_size")]
        size: usize,
        #[serde(default)]
        keyframe_at_ms: u64,
        #[serde(default)]
        keyframe_every_ms: u64,
        #[serde(default = "defaults::keyframe_packets")]
        keyframe_packets: u32,
    },
}

mod defaults {
    pub fn talk_level() -> u8 {
        30
    }
    pub fn talk_size() -> usize {
        120
    }
    pub fn frame_ms() -> u64 {
        20
    }
    pub fn silence_level() -> u8 {
        95
    }
    pub fn silence_size() -> usize {
        12
    }
    pub fn fps() -> u64 {
        30
    }
    pub fn video_size() -> usize {
        1000
    }
    pub fn keyframe_packets() -> u32 {
        3
    }
}

/// Where a track's generated packets stand.
#[derive(Clone, Copy, Debug)]
pub struct TrackCounter {
    pub next_seq: u16,
    pub ts_base: u32,
}

/// A stable start for a track's numbers, from its name (FNV-1a).
pub fn track_counter(track: &str) -> TrackCounter {
    let hash = track.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    TrackCounter { next_seq: hash as u16, ts_base: (hash >> 16) as u32 }
}

pub fn expand(
    generator: Generator,
    at_us: u64,
    counters: &mut HashMap<String, TrackCounter>,
) -> Result<Vec<ScenarioEvent>, String> {
    let mut events = Vec::new();
    let packet = |counter: &mut TrackCounter, t: u64, clock_rate: u64, size: usize| {
        let seq = counter.next_seq;
        counter.next_seq = seq.wrapping_add(1);
        let ts = counter.ts_base.wrapping_add((t as u128 * clock_rate as u128 / 1_000_000) as u32);
        RtpIn {
            seq,
            ts,
            marker: false,
            payload: filler_payload(seq, size),
            audio_level: None,
            voice: None,
            keyframe: false,
        }
    };
    let check_size = |size: usize| {
        if size == 0 || size > MAX_LINE_PAYLOAD {
            Err(format!("size must be between 1 and {MAX_LINE_PAYLOAD}"))
        } else {
            Ok(())
        }
    };
    match generator {
        Generator::Talk { track, duration_ms, level, voice, size, frame_ms, lose, duplicate, late } => {
            check_size(size)?;
            if frame_ms == 0 || level > 127 {
                return Err("frame_ms must be positive and level at most 127".into());
            }
            let counter = counters.entry(track.clone()).or_insert_with(|| track_counter(&track));
            let name = Name::from(track.as_str());
            for (index, offset) in (0..duration_ms * 1000).step_by(frame_ms as usize * 1000).enumerate() {
                let index = index as u32;
                let t = at_us + offset;
                let mut rtp = packet(counter, t, 48_000, size);
                rtp.audio_level = Some(level);
                rtp.voice = voice;
                rtp.marker = index == 0;
                if lose.contains(&index) {
                    continue;
                }
                let delay = late.iter().find(|(i, _)| *i == index).map_or(0, |(_, ms)| ms * 1000);
                let input = Input::Rtp { track: name.clone(), packet: rtp };
                if duplicate.contains(&index) {
                    events.push(ScenarioEvent { at_us: t + delay + 1_000, tick: None, input: input.clone() });
                }
                events.push(ScenarioEvent { at_us: t + delay, tick: None, input });
            }
        }
        Generator::Silence { track, duration_ms, level, size, dtx, frame_ms } => {
            check_size(size)?;
            if frame_ms == 0 || level > 127 {
                return Err("frame_ms must be positive and level at most 127".into());
            }
            let counter = counters.entry(track.clone()).or_insert_with(|| track_counter(&track));
            let name = Name::from(track.as_str());
            let (step_us, level, size) = if dtx { (400_000, 127, 3) } else { (frame_ms * 1000, level, size) };
            for offset in (0..duration_ms * 1000).step_by(step_us as usize) {
                let mut rtp = packet(counter, at_us + offset, 48_000, size);
                rtp.audio_level = Some(level);
                events.push(ScenarioEvent {
                    at_us: at_us + offset,
                    tick: None,
                    input: Input::Rtp { track: name.clone(), packet: rtp },
                });
            }
        }
        Generator::Video { track, duration_ms, fps, size, keyframe_at_ms, keyframe_every_ms, keyframe_packets } => {
            check_size(size)?;
            if fps == 0 || fps > 120 || keyframe_packets == 0 {
                return Err("fps must be between 1 and 120 and keyframe_packets positive".into());
            }
            let counter = counters.entry(track.clone()).or_insert_with(|| track_counter(&track));
            let name = Name::from(track.as_str());
            let frame_us = 1_000_000 / fps;
            let mut next_key_us = keyframe_at_ms * 1000;
            for offset in (0..duration_ms * 1000).step_by(frame_us as usize) {
                let key = offset >= next_key_us;
                if key {
                    next_key_us =
                        if keyframe_every_ms == 0 { u64::MAX } else { next_key_us + keyframe_every_ms * 1000 };
                }
                let packets = if key { keyframe_packets } else { 1 };
                for p in 0..packets {
                    let mut rtp = packet(counter, at_us + offset, 90_000, size);
                    rtp.keyframe = key && p == 0;
                    rtp.marker = p + 1 == packets;
                    events.push(ScenarioEvent {
                        at_us: at_us + offset,
                        tick: None,
                        input: Input::Rtp { track: name.clone(), packet: rtp },
                    });
                }
            }
        }
    }
    Ok(events)
}
