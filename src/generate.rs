//! A synthetic room: speakers talking in talk-spurts and pauses, listeners with preferences
//! who skip and like, and a network that loses, reorders and duplicates a few packets.
//!
//! Talk follows the P.59 model of [`crate::talk`], the same as the load generator's. Audio is
//! 20 ms Opus packets with the RFC 6464 level; in pauses two speakers in three use DTX (a
//! 3-byte packet every 400 ms), the others send small comfort-noise packets at dither levels. Odd-numbered
//! speakers set the V flag like Chromium; even ones never do, like aiortc. Everything comes
//! from one seeded generator: the same options give the same file.

use encore_systems::components::config::EngineConfig;
use encore_systems::components::ids::{MediaKind, Name, Role};
use encore_systems::components::input::{FeedbackSignal, Input, RtpIn};
use std::io::{self, Write};

use crate::scenario::{ScenarioHeader, ScenarioWriter, filler_payload};
use crate::talk::{self, FRAME_US, SeededRng, TalkSpurts};

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub speakers: u32,
    pub listeners: u32,
    pub seconds: u64,
    pub seed: u64,
    pub video: bool,
    /// Loss, reordering, duplication and jitter on the publishers' packets.
    pub network_faults: bool,
    /// Listeners follow and mute at random and skip and like at random times. Without, they
    /// only join, listen and (a few) leave: `encore eval`'s simulated audiences act for them.
    pub scripted_listeners: bool,
    pub config: EngineConfig,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            speakers: 3,
            listeners: 5,
            seconds: 30,
            seed: 1,
            video: false,
            network_faults: true,
            scripted_listeners: true,
            config: EngineConfig::default(),
        }
    }
}

struct Events {
    list: Vec<(u64, u64, Input)>,
}

impl Events {
    fn push(&mut self, at_us: u64, input: Input) {
        let order = self.list.len() as u64;
        self.list.push((at_us, order, input));
    }
}

/// The name of the i-th speaker (from 0): `s01`, `s02`, ...
pub fn speaker_name(i: u32) -> String {
    format!("s{:02}", i + 1)
}

/// The name of the i-th listener (from 0): `l0001`, `l0002`, ...
pub fn listener_name(i: u32) -> String {
    format!("l{:04}", i + 1)
}

/// Writes a generated scenario.
pub fn generate<W: Write>(options: &GenerateOptions, out: W) -> io::Result<()> {
    let (header, events) = generate_events(options);
    let mut writer = ScenarioWriter::new(io::BufWriter::new(out), &header)?;
    for (at, input) in &events {
        writer.event(*at, None, input)?;
    }
    writer.flush()
}

/// A generated room in memory: its header and its inputs with their arrival times, in order.
pub fn generate_events(options: &GenerateOptions) -> (ScenarioHeader, Vec<(u64, Input)>) {
    let mut rng = SeededRng::new(options.seed);
    let end_us = options.seconds * 1_000_000;
    let mut events = Events { list: Vec::new() };

    for i in 0..options.speakers {
        let name = speaker_name(i);
        let at = i as u64 * 1_000;
        events.push(at, Input::Join { peer: Name::from(name.as_str()), uid: None, roles: vec![Role::Speaker] });
        events.push(
            at,
            Input::Publish {
                peer: Name::from(name.as_str()),
                track: Name::from(format!("{name}.mic")),
                media: MediaKind::Audio,
                codec: "opus".into(),
                clock_rate: 48_000,
                ssrc: rng.next_u64() as u32,
            },
        );
        if options.video {
            events.push(
                at,
                Input::Publish {
                    peer: Name::from(name.as_str()),
                    track: Name::from(format!("{name}.cam")),
                    media: MediaKind::Video,
                    codec: "vp8".into(),
                    clock_rate: 90_000,
                    ssrc: rng.next_u64() as u32,
                },
            );
        }
        // Every other speaker also listens (and never hears itself).
        if i % 2 == 0 {
            events.push(at + 500, Input::Listen { peer: Name::from(name.as_str()) });
        }
    }
    for i in 0..options.speakers {
        talk(&mut rng, &mut events, options, i, end_us);
        if options.video {
            camera(&mut rng, &mut events, options, i, end_us);
        }
    }
    for i in 0..options.listeners {
        listener(&mut rng, &mut events, options, i, end_us);
    }

    events.list.sort_by_key(|(at, order, _)| (*at, *order));
    let mut header = ScenarioHeader::new(options.config.clone());
    header.name = Some(format!(
        "generated-s{}-l{}-{}s-seed{}{}",
        options.speakers,
        options.listeners,
        options.seconds,
        options.seed,
        if options.video { "-video" } else { "" }
    ));
    header.description = Some("encore scenario generate: P.59 talk-spurts, listeners with preferences".into());
    (header, events.list.into_iter().map(|(at, _, input)| (at, input)).collect())
}

struct Stream {
    seq: u16,
    ts_base: u32,
    clock_rate: u64,
}

impl Stream {
    fn new(rng: &mut SeededRng, clock_rate: u64) -> Self {
        Stream { seq: rng.next_u64() as u16, ts_base: rng.next_u64() as u32, clock_rate }
    }

    fn ts(&self, at_us: u64) -> u32 {
        self.ts_base.wrapping_add((at_us * self.clock_rate / 1_000_000) as u32)
    }

    fn next_seq(&mut self) -> u16 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }
}

/// Sends one packet through the faulty network: maybe lost, maybe late (reordered), maybe
/// twice, always with a little jitter.
fn send(rng: &mut SeededRng, events: &mut Events, faults: bool, sent_us: u64, track: &Name, packet: RtpIn) {
    let mut at = sent_us;
    if faults {
        if rng.chance(0.005) {
            return;
        }
        at += rng.range(0, 4_000);
        if rng.chance(0.003) {
            // Overtaken by the next packet or two.
            at += 25_000;
        }
        if rng.chance(0.003) {
            events.push(at + 1_000, Input::Rtp { track: track.clone(), packet: packet.clone() });
        }
    }
    events.push(at, Input::Rtp { track: track.clone(), packet });
}

fn talk(rng: &mut SeededRng, events: &mut Events, options: &GenerateOptions, i: u32, end_us: u64) {
    let track = Name::from(format!("{}.mic", speaker_name(i)));
    let mut stream = Stream::new(rng, 48_000);
    let dtx = !i.is_multiple_of(3);
    let sets_voice_flag = i % 2 == 1;
    let mut spurts = TalkSpurts::new();
    let mut t = 0;
    while t < end_us {
        let phase = spurts.next_phase(rng);
        let phase_end = t + phase.length_us;
        let mut first = true;
        while t < phase_end.min(end_us) {
            let seq = stream.next_seq();
            let (level, size, step) = match (phase.talking, dtx) {
                (true, _) => {
                    let (level, size) = talk::voiced_frame(rng);
                    (level, size, FRAME_US)
                }
                // DTX: one 3-byte packet every 400 ms of the pause.
                (false, true) => (127, 3, 400_000),
                (false, false) => {
                    let (level, size) = talk::comfort_noise_frame(rng);
                    (level, size, FRAME_US)
                }
            };
            let packet = RtpIn {
                seq,
                ts: stream.ts(t),
                marker: phase.talking && first,
                payload: filler_payload(seq, size),
                audio_level: Some(level),
                voice: sets_voice_flag.then_some(phase.talking),
                keyframe: false,
            };
            send(rng, events, options.network_faults, t, &track, packet);
            first = false;
            t += step;
        }
        // A DTX interval may overshoot the pause: speech resumes on the frame grid.
        t = phase_end;
    }
}

fn camera(rng: &mut SeededRng, events: &mut Events, options: &GenerateOptions, i: u32, end_us: u64) {
    let track = Name::from(format!("{}.cam", speaker_name(i)));
    let mut stream = Stream::new(rng, 90_000);
    let frame_us = 33_333;
    let mut frame = 0u64;
    let mut t = rng.range(0, frame_us);
    while t < end_us {
        let keyframe = frame.is_multiple_of(60);
        let packets = if keyframe { 3 } else { 1 };
        for p in 0..packets {
            let seq = stream.next_seq();
            let size = if keyframe { 1100 } else { rng.range(700, 1100) as usize };
            let packet = RtpIn {
                seq,
                ts: stream.ts(t),
                marker: p + 1 == packets,
                payload: filler_payload(seq, size),
                audio_level: None,
                voice: None,
                keyframe: keyframe && p == 0,
            };
            send(rng, events, options.network_faults, t, &track, packet);
        }
        frame += 1;
        t += frame_us;
    }
}

fn listener(rng: &mut SeededRng, events: &mut Events, options: &GenerateOptions, i: u32, end_us: u64) {
    let name = Name::from(listener_name(i));
    let early_window = (end_us / 10).clamp(1, 10_000_000);
    let join_us = if rng.chance(0.05) { rng.range(0, end_us.max(1)) } else { rng.range(0, early_window) };
    events.push(join_us, Input::Join { peer: name.clone(), uid: None, roles: vec![Role::Listener] });
    events.push(join_us + 50_000, Input::Listen { peer: name.clone() });
    if !options.scripted_listeners {
        if rng.chance(0.03) {
            let leave_us = join_us + rng.range(1, end_us.max(2));
            if leave_us < end_us {
                events.push(leave_us, Input::Leave { peer: name });
            }
        }
        return;
    }
    let speakers = options.speakers.max(1) as u64;
    let mut follow = Vec::new();
    let follows = match rng.range(0, 10) {
        0..5 => 0,
        5..8 => 1,
        _ => 2,
    };
    for _ in 0..follows.min(options.speakers) {
        let speaker = Name::from(speaker_name(rng.range(0, speakers) as u32));
        if !follow.contains(&speaker) {
            follow.push(speaker);
        }
    }
    let mut mute = Vec::new();
    if options.speakers > 1 && rng.chance(0.1) {
        let speaker = Name::from(speaker_name(rng.range(0, speakers) as u32));
        if !follow.contains(&speaker) {
            mute.push(speaker);
        }
    }
    if !follow.is_empty() || !mute.is_empty() {
        events.push(join_us + 100_000, Input::Prefs { peer: name.clone(), follow, mute });
    }
    let leave_us = rng.chance(0.03).then(|| join_us + rng.range(1, end_us.max(2)));
    let active_until = leave_us.unwrap_or(end_us).min(end_us);
    let mut t = join_us + 1_000_000 + rng.exp_us(25_000_000.0);
    while t < active_until {
        events.push(t, Input::Feedback { peer: name.clone(), utterance: None, signal: FeedbackSignal::Skip });
        t += rng.exp_us(25_000_000.0).max(1_000_000);
    }
    let mut t = join_us + 1_000_000 + rng.exp_us(40_000_000.0);
    while t < active_until {
        events.push(t, Input::Feedback { peer: name.clone(), utterance: None, signal: FeedbackSignal::Like });
        t += rng.exp_us(40_000_000.0).max(1_000_000);
    }
    if let Some(leave_us) = leave_us.filter(|t| *t < end_us) {
        events.push(leave_us, Input::Leave { peer: name });
    }
}

/// A room generated in memory (for tests and benchmarks): the header and the events.
pub fn generate_in_memory(options: &GenerateOptions) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = generate(options, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::ScenarioReader;

    #[test]
    fn the_same_options_give_the_same_bytes_and_another_seed_does_not() {
        let options = GenerateOptions { seconds: 10, ..GenerateOptions::default() };
        let a = generate_in_memory(&options);
        assert_eq!(a, generate_in_memory(&options));
        assert_ne!(a, generate_in_memory(&GenerateOptions { seed: 2, ..options }));
    }

    #[test]
    fn unscripted_listeners_only_join_listen_and_leave() {
        let options = GenerateOptions { seconds: 60, listeners: 40, scripted_listeners: false, ..Default::default() };
        let (_, events) = generate_events(&options);
        assert!(events.windows(2).all(|w| w[0].0 <= w[1].0), "in time order");
        let kinds: std::collections::BTreeSet<&str> = events.iter().map(|(_, input)| input.kind()).collect();
        assert_eq!(kinds, ["join", "leave", "listen", "publish", "rtp"].into());
        // The speakers talk as they would with scripted listeners.
        let talk = |options: &GenerateOptions| {
            let (_, events) = generate_events(options);
            events.into_iter().filter(|(_, input)| input.kind() == "rtp").map(|(at, _)| at).collect::<Vec<_>>()
        };
        assert_eq!(talk(&options), talk(&GenerateOptions { scripted_listeners: true, ..options.clone() }));
    }

    #[test]
    fn the_output_is_a_valid_scenario_with_p59_like_talk() {
        let options = GenerateOptions { speakers: 4, listeners: 10, seconds: 120, video: true, ..Default::default() };
        let bytes = generate_in_memory(&options);
        let (header, mut reader) = ScenarioReader::new("generated".into(), bytes.as_slice()).unwrap();
        assert!(header.name.unwrap().contains("video"));
        let mut voiced = 0u64;
        let mut audio = 0u64;
        while let Some(event) = reader.next_event() {
            if let Input::Rtp { track, packet } = event.unwrap().input
                && track.ends_with(".mic")
            {
                audio += 1;
                voiced += u64::from(packet.audio_level.is_some_and(|l| l < 50));
            }
        }
        // P.59: talk about 1.0 / (1.0 + 1.6) of the time, plus long turns.
        let talk_share = voiced as f64 * 0.02 / (4.0 * 120.0);
        assert!((0.3..0.6).contains(&talk_share), "talk share {talk_share}");
        assert!(audio > voiced);
    }
}
