//! Engine benchmarks, printed as figures (`cargo bench`). Machines are shared and noisy:
//! read the figures as orders of magnitude, and compare ratios within one run.
//!
//! 1. forwarding cost: one speaker talking without a pause to N live listeners; engine
//!    time per forwarded packet (goal: at most 200 ns);
//! 2. tick time at 50 speakers x 2 000 listeners (generated P.59 room): p50, p99 and max
//!    (goal: p99 at most 1 ms at a 10 ms tick), with the default recommender policy and then
//!    with each of the others;
//! 3. replay speed without packets at 10 speakers x 1 000 listeners (goal: at least 200x
//!    real time), both from parsed inputs and from the scenario text;
//! 4. memory: a room that fills a 256 MiB buffer with video; the process's resident size
//!    against the buffer's own count and the cap.
//!
//! `cargo bench -- forward` (or `ticks`, `replay`, `memory`) runs one of them; `ticks-learn`
//! (or another policy) only that policy's tick figures.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use encore::Engine;
use encore::components::config::{EngineConfig, Policy};
use encore::components::ids::{MediaKind, Name, Role};
use encore::components::input::{Input, RtpIn};
use encore::generate::{GenerateOptions, generate_in_memory};
use encore::replay::{DEFAULT_DRAIN_US, NoObserver, Ticking, replay_observed};
use encore::scenario::{ScenarioEvent, ScenarioReader};

fn main() {
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let wanted = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    if wanted("forward") {
        forward(1_000);
    }
    // `ticks` runs the default policy, then the others; `ticks-learn` (say) only that one.
    let default = EngineConfig::default().recommender.policy;
    let others = Policy::ALL.into_iter().filter(|p| *p != default);
    for policy in std::iter::once(default).chain(others) {
        if wanted(&format!("ticks-{policy}")) {
            ticks(50, 2_000, 30, policy);
        }
    }
    if wanted("replay") {
        replay_speed(10, 1_000, 60);
    }
    if wanted("memory") {
        memory(256 << 20);
    }
}

fn join_speaker(engine: &mut Engine, name: &str, media: MediaKind) {
    engine.push(0, Input::Join { peer: Name::new(name), uid: None, roles: vec![Role::Speaker] });
    let (track, clock_rate, codec) = match media {
        MediaKind::Audio => (format!("{name}.mic"), 48_000, "opus"),
        MediaKind::Video => (format!("{name}.cam"), 90_000, "vp8"),
    };
    engine.push(
        0,
        Input::Publish {
            peer: Name::new(name),
            track: Name::from(track),
            media,
            codec: codec.into(),
            clock_rate,
            ssrc: 1,
        },
    );
}

fn join_listener(engine: &mut Engine, name: &str) {
    engine.push(0, Input::Join { peer: Name::new(name), uid: None, roles: vec![Role::Listener] });
    engine.push(0, Input::Listen { peer: Name::new(name) });
}

fn forward(listeners: usize) {
    let mut engine = Engine::new(EngineConfig::default()).expect("default config");
    join_speaker(&mut engine, "alice", MediaKind::Audio);
    for i in 0..listeners {
        join_listener(&mut engine, &format!("l{i:05}"));
    }
    let track = Name::new("alice.mic");
    let payload: Arc<[u8]> = Arc::from(vec![7u8; 120]);
    let seconds = 14; // one utterance, under the 15 s maximum
    let mut sent = 0u64;
    let mut busy = Duration::ZERO;
    for tick in 0..seconds * 100 {
        let now = tick * 10_000;
        if tick % 2 == 0 {
            let packet = RtpIn {
                seq: (tick / 2) as u16,
                ts: (tick / 2 * 960) as u32,
                marker: false,
                payload: payload.clone(),
                audio_level: Some(30),
                voice: Some(true),
                keyframe: false,
            };
            engine.push(now, Input::Rtp { track: track.clone(), packet });
        }
        let started = Instant::now();
        let output = engine.tick();
        busy += started.elapsed();
        sent += output.packets.len() as u64;
        black_box(&output.packets);
    }
    println!(
        "forward: 1 speaker -> {listeners} live listeners, {seconds} s: {sent} packets forwarded, {:.0} ns of engine time per forwarded packet (goal <= 200)",
        busy.as_nanos() as f64 / sent.max(1) as f64
    );
}

fn parsed(options: &GenerateOptions) -> (EngineConfig, Vec<ScenarioEvent>) {
    let bytes = generate_in_memory(options);
    let (header, mut reader) = ScenarioReader::new("generated".into(), bytes.as_slice()).expect("generated scenario");
    let mut events = Vec::new();
    while let Some(event) = reader.next_event() {
        events.push(event.expect("generated event"));
    }
    (header.config, events)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ticks(speakers: u32, listeners: u32, seconds: u64, policy: Policy) {
    let options = GenerateOptions { speakers, listeners, seconds, seed: 42, ..GenerateOptions::default() };
    let (mut config, events) = parsed(&options);
    config.recommender.policy = policy;
    let mut engine = Engine::new(config).expect("config");
    let tick_us = engine.tick_us();
    let mut times = Vec::new();
    let mut cpu_times = Vec::new();
    let mut sent = 0u64;
    let mut events = events.into_iter().peekable();
    for tick in 0..seconds * 1_000_000 / tick_us {
        while let Some(event) = events.next_if(|e| e.tick_for(tick_us) <= tick) {
            engine.push(event.at_us, event.input);
        }
        let (started, cpu_started) = (Instant::now(), thread_cpu());
        let output = engine.tick();
        times.push(started.elapsed());
        cpu_times.push(thread_cpu().saturating_sub(cpu_started));
        sent += output.packets.len() as u64;
    }
    // The first seconds fill the room; measure the steady state.
    let steady = |times: &[Duration]| {
        let mut steady = times[times.len() / 5..].to_vec();
        steady.sort();
        steady
    };
    let (wall, cpu) = (steady(&times), steady(&cpu_times));
    let decisions = engine.recommender_counts();
    println!(
        "ticks [{policy}]: {speakers} speakers x {listeners} listeners, {seconds} s, {sent} packets sent ({:.0}/s), {} decisions ({} candidates scored): tick p50 {:?}, p99 {:?}, max {:?}; thread CPU p50 {:?}, p99 {:?} (goal p99 <= 1 ms at a 10 ms tick)",
        sent as f64 / seconds as f64,
        decisions.decisions,
        decisions.scored,
        percentile(&wall, 0.5),
        percentile(&wall, 0.99),
        wall.last().copied().unwrap_or_default(),
        percentile(&cpu, 0.5),
        percentile(&cpu, 0.99),
    );
}

/// The CPU time this thread has used: unlike wall time, other work on a shared machine does
/// not add to it (only to the caches it shares).
fn thread_cpu() -> Duration {
    let mut time = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut time) } == 0;
    if ok { Duration::new(time.tv_sec as u64, time.tv_nsec as u32) } else { Duration::ZERO }
}

fn replay_speed(speakers: u32, listeners: u32, seconds: u64) {
    let options = GenerateOptions { speakers, listeners, seconds, seed: 7, ..GenerateOptions::default() };
    let (config, events) = parsed(&options);
    let count = events.len();
    let mut engine = Engine::new(config).expect("config");
    engine.set_payloads(false);
    let tick_us = engine.tick_us();
    let started = Instant::now();
    let mut events = events.into_iter().peekable();
    let mut sent = 0u64;
    while events.peek().is_some() || !engine.is_quiet() {
        let tick = engine.next_tick();
        while let Some(event) = events.next_if(|e| e.tick_for(tick_us) <= tick) {
            engine.push(event.at_us, event.input);
        }
        sent += engine.tick().packets.len() as u64;
    }
    let wall = started.elapsed();
    let engine_s = engine.next_tick_us() as f64 / 1e6;
    println!(
        "replay: {speakers} speakers x {listeners} listeners, {count} inputs, {sent} packets: {engine_s:.0} s of engine time in {:.2} s, {:.0}x real time from parsed inputs (goal >= 200x)",
        wall.as_secs_f64(),
        engine_s / wall.as_secs_f64()
    );
    let bytes = generate_in_memory(&options);
    let (header, mut reader) = ScenarioReader::new("generated".into(), bytes.as_slice()).expect("scenario");
    let summary =
        replay_observed(&header, &mut reader, &mut NoObserver, DEFAULT_DRAIN_US, Ticking::SkipQuiet).expect("replay");
    println!(
        "replay: the same from its {} MB of scenario text (parsing included): {:.0}x real time",
        bytes.len() / 1_000_000,
        summary.speed()
    );
}

fn resident() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kib| kib.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn memory(cap: u64) {
    let (baseline, _) = resident();
    let config = EngineConfig { buffer_max_bytes: cap, ..EngineConfig::default() };
    let mut engine = Engine::new(config).expect("config");
    let speakers = 20;
    for s in 0..speakers {
        join_speaker(&mut engine, &format!("s{s:02}"), MediaKind::Audio);
        join_speaker_video(&mut engine, &format!("s{s:02}"));
    }
    join_listener(&mut engine, "lena");
    let mut peak_buffer = 0;
    let mut seq = vec![0u16; speakers * 2];
    // 20 speakers, each talking (audio every 20 ms) with a 3 Mbit/s camera (1 200-byte
    // packets, 30 frames of 10 packets a second): about 9 MB of buffer per second.
    for tick in 0..6_000u64 {
        let now = tick * 10_000;
        for s in 0..speakers {
            let name = format!("s{s:02}");
            if tick % 2 == 0 {
                let i = s * 2;
                seq[i] = seq[i].wrapping_add(1);
                let packet = RtpIn {
                    seq: seq[i],
                    ts: (now * 48 / 1000) as u32,
                    marker: false,
                    payload: Arc::from(vec![1u8; 120]),
                    audio_level: Some(30),
                    voice: None,
                    keyframe: false,
                };
                engine.push(now, Input::Rtp { track: Name::from(format!("{name}.mic")), packet });
            }
            for p in 0..3 {
                let i = s * 2 + 1;
                seq[i] = seq[i].wrapping_add(1);
                let packet = RtpIn {
                    seq: seq[i],
                    ts: (now * 90 / 1000) as u32,
                    marker: p == 2,
                    payload: Arc::from(vec![2u8; 1_200]),
                    audio_level: None,
                    voice: None,
                    keyframe: tick % 100 == 0 && p == 0,
                };
                engine.push(now, Input::Rtp { track: Name::from(format!("{name}.cam")), packet });
            }
        }
        engine.tick();
        peak_buffer = peak_buffer.max(engine.buffer_bytes());
    }
    let (rss, hwm) = resident();
    let buffer = engine.buffer_bytes();
    let grown = rss.saturating_sub(baseline);
    println!(
        "memory: cap {} MiB; buffer at the end {:.1} MiB (peak {:.1} MiB); resident grew {:.1} MiB over a {:.1} MiB baseline: accounted/actual {:.3}; peak resident {:.1} MiB = {:.2}x the cap",
        cap >> 20,
        buffer as f64 / 1048576.0,
        peak_buffer as f64 / 1048576.0,
        grown as f64 / 1048576.0,
        baseline as f64 / 1048576.0,
        buffer as f64 / grown.max(1) as f64,
        hwm as f64 / 1048576.0,
        hwm as f64 / cap as f64
    );
}

fn join_speaker_video(engine: &mut Engine, name: &str) {
    engine.push(
        0,
        Input::Publish {
            peer: Name::new(name),
            track: Name::from(format!("{name}.cam")),
            media: MediaKind::Video,
            codec: "vp8".into(),
            clock_rate: 90_000,
            ssrc: 2,
        },
    );
}
