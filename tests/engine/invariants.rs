//! The engine's invariants, checked tick by tick over generated rooms with random seeds and
//! small buffer caps, under the default recommender policy and one other:
//! - the buffer never holds more than its cap at the end of a tick, and its ledger matches a
//!   recount;
//! - no utterance lasts longer than the maximum;
//! - per outgoing stream: one SSRC, sequence numbers up by exactly one per new packet,
//!   timestamps never backwards;
//! - a listener never receives its own voice or a speaker it muted;
//! - an idle listener is routed in the tick an utterance it can hear opens (unless paused);
//! - a paused listener is sent nothing new;
//! - audio goes out at its pace: a time-shifted route never runs ahead of it (by its outgoing
//!   timestamps against the clock) and gets at most two packets a tick; a live route that
//!   started at the live edge may catch up, at most `CATCHUP_PACKETS_PER_TICK` more a tick
//!   while its utterance is open and never more than `catchup_bound_us` ahead in all.

use std::collections::{BTreeMap, BTreeSet};
use std::io;

use encore::Engine;
use encore::components::TickOutput;
use encore::components::config::Policy;
use encore::components::ids::{MediaKind, PeerKey};
use encore::components::input::Input;
use encore::components::output::Event;
use encore::generate::GenerateOptions;
use encore::replay::{DEFAULT_DRAIN_US, ReplayObserver, Ticking, replay_observed};
use encore::scenario::{ScenarioEvent, ScenarioReader};
use encore_systems::playout::{CATCHUP_PACKETS_PER_TICK, catchup_bound_us};

use super::support::generated;

#[derive(Default)]
struct Checker {
    cap: u64,
    max_utterance_us: u64,
    tick_us: u64,
    catchup_bound_us: u64,
    pending: Vec<Input>,
    listening: BTreeSet<String>,
    paused: BTreeSet<String>,
    mutes: BTreeMap<String, BTreeSet<String>>,
    /// What each listener plays, and whether its route may catch up (live at the live edge).
    playing: BTreeMap<String, (String, bool)>,
    open: BTreeSet<String>,
    streams: BTreeMap<(PeerKey, MediaKind), (u32, u16, u32)>,
    /// Per listener's audio: the timestamp and time of the segment's first packet (reset at
    /// every marked packet: a switch or a cut-over), to measure how far ahead of pace it runs.
    segments: BTreeMap<PeerKey, (u32, u64)>,
    violations: Vec<String>,
    ticks: u64,
    sends: u64,
    onsets_checked: u64,
    evictions: u64,
    catchup_ticks: u64,
}

fn speaker_of(utterance: &str) -> &str {
    utterance.rsplit_once('#').map_or(utterance, |(speaker, _)| speaker)
}

impl Checker {
    fn fail(&mut self, tick: u64, what: String) {
        if self.violations.len() < 20 {
            self.violations.push(format!("tick {tick}: {what}"));
        }
    }
}

impl ReplayObserver for Checker {
    fn input(&mut self, event: &ScenarioEvent) {
        self.pending.push(event.input.clone());
    }

    fn tick(&mut self, engine: &Engine, output: &TickOutput) -> io::Result<()> {
        let tick = output.tick;
        self.ticks += 1;
        // Who was idle when the tick began, before its inputs.
        let idle_before: BTreeSet<String> =
            self.listening.iter().filter(|l| !self.playing.contains_key(*l)).cloned().collect();
        for input in std::mem::take(&mut self.pending) {
            match input {
                Input::Listen { peer } => {
                    self.listening.insert(peer.to_string());
                }
                Input::Unlisten { peer } | Input::Leave { peer } => {
                    self.listening.remove(peer.as_str());
                    self.playing.remove(peer.as_str());
                    self.paused.remove(peer.as_str());
                }
                Input::Pause { peer } if self.listening.contains(peer.as_str()) => {
                    self.paused.insert(peer.to_string());
                }
                Input::Resume { peer } => {
                    self.paused.remove(peer.as_str());
                }
                Input::Prefs { peer, mute, .. } => {
                    self.mutes.insert(peer.to_string(), mute.iter().map(|m| m.to_string()).collect());
                }
                _ => {}
            }
        }

        let bytes = engine.buffer_bytes();
        if bytes > self.cap {
            self.fail(tick, format!("buffer {bytes} over the cap {}", self.cap));
        }
        if tick.is_multiple_of(100) && engine.audit_buffer_bytes() != bytes {
            let audit = engine.audit_buffer_bytes();
            self.fail(tick, format!("ledger says {bytes}, a recount {audit}"));
        }

        let mut routed_now = BTreeSet::new();
        let mut evicted_now = BTreeSet::new();
        let mut opened = Vec::new();
        for event in &output.events {
            match event {
                Event::UtteranceEnd { utterance, duration_us, .. } => {
                    self.open.remove(&utterance.to_string());
                    if *duration_us > self.max_utterance_us {
                        self.fail(tick, format!("{utterance} lasted {duration_us} us"));
                    }
                }
                Event::UtteranceStart { utterance, speaker, .. } => {
                    self.open.insert(utterance.to_string());
                    opened.push((utterance.to_string(), speaker.to_string()))
                }
                Event::Evict { utterance, .. } => {
                    self.evictions += 1;
                    evicted_now.insert(utterance.to_string());
                }
                Event::Route { listener, to, live, lag_us, .. } => match to {
                    Some(to) => {
                        routed_now.insert(listener.to_string());
                        let catchup = *live && lag_us.is_some_and(|lag| lag <= self.catchup_bound_us);
                        self.playing.insert(listener.to_string(), (to.to_string(), catchup));
                    }
                    None => {
                        self.playing.remove(listener.as_str());
                    }
                },
                Event::Stats(stats) if stats.buffer_peak_bytes > self.cap => {
                    self.fail(tick, format!("stats peak {} over the cap", stats.buffer_peak_bytes));
                }
                _ => {}
            }
        }
        for (utterance, speaker) in &opened {
            if evicted_now.contains(utterance) {
                continue;
            }
            for listener in &idle_before {
                let can_hear = self.listening.contains(listener)
                    && !self.paused.contains(listener)
                    && listener != speaker
                    && !self.mutes.get(listener).is_some_and(|m| m.contains(speaker));
                if can_hear {
                    self.onsets_checked += 1;
                    if !routed_now.contains(listener) {
                        self.fail(tick, format!("idle {listener} not routed when {utterance} opened"));
                    }
                }
            }
        }

        let mut audio_per_listener: BTreeMap<PeerKey, u32> = BTreeMap::new();
        for packet in &output.packets {
            let listener = engine.peer_name(packet.listener).map(|n| n.to_string()).unwrap_or_default();
            let utterance = engine.utterance_id(packet.utterance).map(|id| id.to_string()).unwrap_or_default();
            let speaker = speaker_of(&utterance).to_owned();
            if speaker == listener {
                self.fail(tick, format!("{listener} was sent its own voice"));
            }
            if self.mutes.get(&listener).is_some_and(|m| m.contains(&speaker)) {
                self.fail(tick, format!("{listener} was sent {speaker}, whom it muted"));
            }
            if packet.retransmit {
                continue;
            }
            if self.paused.contains(&listener) {
                self.fail(tick, format!("{listener} was sent a packet while paused"));
            }
            self.sends += 1;
            if packet.media == MediaKind::Audio {
                let catching_up = self.playing.get(&listener).is_some_and(|(u, catchup)| *catchup && u == &utterance);
                *audio_per_listener.entry(packet.listener).or_default() += 1;
                // How far ahead of its pace the segment runs: the audio its timestamps
                // advanced over the time that passed. A paced route may be up to a tick
                // late at the segment's first packet, so a tick (and a microsecond of
                // rounding per conversion) is allowed; a catching-up route the bound as well.
                if packet.marker || !self.segments.contains_key(&packet.listener) {
                    self.segments.insert(packet.listener, (packet.ts, output.now_us));
                }
                let (ts0, at0) = self.segments[&packet.listener];
                let advanced_us = u64::from(packet.ts.wrapping_sub(ts0)) * 1000 / 48;
                let ahead_us = advanced_us.saturating_sub(output.now_us - at0);
                let allowed_us = self.tick_us + 1000 + if catching_up { self.catchup_bound_us } else { 0 };
                if ahead_us > allowed_us {
                    self.fail(tick, format!("{listener} {utterance} {ahead_us} us ahead of its pace"));
                }
            }
            let key = (packet.listener, packet.media);
            if let Some((ssrc, seq, ts)) = self.streams.get(&key).copied() {
                if ssrc != packet.ssrc {
                    self.fail(tick, format!("{listener} {:?} changed ssrc", packet.media));
                }
                if packet.seq != seq.wrapping_add(1) {
                    self.fail(tick, format!("{listener} {:?} seq {} after {seq}", packet.media, packet.seq));
                }
                if ts.wrapping_sub(packet.ts) < 0x8000_0000 && ts != packet.ts {
                    self.fail(tick, format!("{listener} {:?} ts {} went back from {ts}", packet.media, packet.ts));
                }
            }
            self.streams.insert(key, (packet.ssrc, packet.seq, packet.ts));
        }
        for (key, count) in audio_per_listener {
            let listener = engine.peer_name(key).map(|n| n.to_string()).unwrap_or_default();
            let catching_up = self
                .playing
                .get(&listener)
                .is_some_and(|(utterance, catchup)| *catchup && self.open.contains(utterance));
            let bound = if catching_up { 2 + CATCHUP_PACKETS_PER_TICK as u32 } else { 2 };
            if count > 2 {
                self.catchup_ticks += 1;
            }
            if count > bound {
                self.fail(tick, format!("{count} audio packets to listener {listener} in one tick (bound {bound})"));
            }
        }
        Ok(())
    }
}

fn check(options: GenerateOptions) -> Checker {
    let bytes = generated(&options);
    let (header, mut reader) = ScenarioReader::new("generated".into(), bytes.as_slice()).expect("valid scenario");
    let mut checker = Checker {
        cap: header.config.buffer_max_bytes,
        max_utterance_us: header.config.max_utterance_ms * 1000,
        tick_us: header.config.tick_ms * 1000,
        catchup_bound_us: catchup_bound_us(&header.config),
        ..Checker::default()
    };
    replay_observed(&header, &mut reader, &mut checker, DEFAULT_DRAIN_US, Ticking::EveryTick).expect("replays");
    checker
}

#[test]
fn invariants_hold_over_generated_rooms_with_random_seeds_and_small_caps() {
    // Seeds from a fixed list, so a failure names its seed and reproduces.
    let caps = [24_000, 60_000, 250_000, 2_000_000];
    let mut totals = (0, 0, 0, 0);
    for seed in 1..=12u64 {
        let mut options = GenerateOptions {
            speakers: 2 + (seed % 4) as u32,
            listeners: 3 + (seed * 7 % 9) as u32,
            seconds: 25 + seed % 3 * 10,
            seed,
            video: seed % 3 == 0,
            ..GenerateOptions::default()
        };
        options.config.buffer_max_bytes = caps[(seed % 4) as usize];
        options.config.max_utterance_ms = if seed % 2 == 0 { 15_000 } else { 3_000 };
        // The invariant is about the utterances a recommender accepts: the learning one may turn
        // one down (it predicts little of it), so here it accepts everything. Every room also
        // runs under one of the other policies.
        options.config.recommender.learn.accept_min = i64::MIN;
        let other = [Policy::Fifo, Policy::Loudest, Policy::Rules][(seed % 3) as usize];
        for policy in [options.config.recommender.policy, other] {
            options.config.recommender.policy = policy;
            let checker = check(options.clone());
            assert!(checker.violations.is_empty(), "seed {seed} ({options:?}): {:#?}", checker.violations);
            assert!(checker.sends > 0, "seed {seed}, {policy}: nothing was sent");
            totals.0 += checker.onsets_checked;
            totals.1 += checker.evictions;
            totals.2 += checker.ticks;
            totals.3 += checker.catchup_ticks;
        }
    }
    // The checks did bite: idle listeners met onsets, and small caps forced evictions.
    assert!(totals.0 > 50, "only {} idle-listener onsets checked", totals.0);
    assert!(totals.1 > 10, "only {} evictions", totals.1);
    assert!(totals.3 > 50, "only {} ticks of catch-up", totals.3);
}
