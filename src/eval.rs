//! `encore eval`: the recommender measured in closed loop, the way recommender systems are
//! evaluated with simulated users (RecSim): generated rooms run through the real engine, in
//! process, with simulated listeners who react to what the engine routes to them.
//!
//! The rooms are [`crate::generate`]'s (P.59 talk, a network with faults) without scripted
//! listeners. Each listener of a room has hidden tastes: an affinity in -1..1 to each
//! speaker, drawn around the centre of one of a few taste clusters, plus a speaker's general
//! appeal; each utterance has a hidden quality. What a listener hears is what the engine's
//! `route` events say; how it reacts goes back into the engine as the inputs the server sends:
//! a `feedback` skip when its patience runs out (the skip hazard grows with dislike and with
//! the lag behind live, and each listener has its own patience), a `feedback` like now and then
//! after hearing an utterance it enjoyed to the end, and at the start a `prefs` following its
//! favourite speaker (some listeners) or muting the one it likes least (a few).
//!
//! Figures per run: listen-through (share of started utterances heard to the end, among those
//! whose end came before the run's), mean affinity of what was heard (weighted by time), skips
//! and likes per listener-minute, mean and 95th-percentile lag behind live (weighted by time:
//! the start of an utterance heard minus the utterance's start), the share of listening that
//! was live, the share of its time a listener spent hearing something, coverage (share of
//! utterances that some simulated listener started), speaker fairness (Gini coefficient of the
//! speakers' listening time), and recommender decisions per second of engine time. Policies
//! are compared on the same rooms, audiences and seeds; everything comes from seeded sources,
//! so the same options give the same figures, byte for byte.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use encore_systems::Engine;
use encore_systems::components::config::{EngineConfig, Policy};
use encore_systems::components::ids::{Name, UtteranceId};
use encore_systems::components::input::{FeedbackSignal, Input};
use encore_systems::components::output::{Event, RouteReason};
use encore_systems::components::rng::SplitMix64;

use crate::generate::{GenerateOptions, generate_events, listener_name, speaker_name};
use crate::talk::SeededRng;

/// Speakers by listeners.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct RoomSize {
    pub speakers: u32,
    pub listeners: u32,
}

impl FromStr for RoomSize {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("a room size is SPEAKERSxLISTENERS (6x50), got {text:?}");
        let (speakers, listeners) = text.split_once(['x', 'X']).ok_or_else(bad)?;
        let speakers: u32 = speakers.trim().parse().map_err(|_| bad())?;
        let listeners: u32 = listeners.trim().replace('_', "").parse().map_err(|_| bad())?;
        if speakers == 0 || listeners == 0 || speakers > 99 || listeners > 9999 {
            return Err(format!("{text}: 1 to 99 speakers and 1 to 9999 listeners"));
        }
        Ok(RoomSize { speakers, listeners })
    }
}

impl fmt::Display for RoomSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&format!("{}x{}", self.speakers, self.listeners))
    }
}

/// The simulated audience's hidden model. Rates are per second. `encore eval --audience FILE`
/// reads one from TOML (any key; the others keep their defaults).
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AudienceModel {
    /// Taste clusters: each has its own centre of affinities to the speakers.
    pub clusters: u32,
    /// How far a listener's affinity strays from its cluster's centre (the spread of a sum of
    /// three uniform draws).
    pub taste_noise: f64,
    /// A speaker's general appeal to everyone is uniform in plus or minus this.
    pub appeal: f64,
    /// An utterance's quality is uniform in plus or minus this (added to the affinity).
    pub quality: f64,
    /// Skip hazard of an utterance enjoyed fully, heard live.
    pub base_hazard: f64,
    /// Added at complete dislike, growing with the square of dislike ((1 - enjoyment) / 2).
    pub dislike_hazard: f64,
    /// Added per second of lag behind live.
    pub lag_hazard: f64,
    /// A listener's patience divides its hazard; uniform in this range.
    pub patience: (f64, f64),
    /// Seconds before a skip can come.
    pub reaction_s: f64,
    /// Chance of a like after an utterance heard to the end, times the enjoyment when positive.
    pub like_chance: f64,
    /// Chance that a listener follows its favourite speaker, and mutes its least liked.
    pub follow_chance: f64,
    pub mute_chance: f64,
}

impl Default for AudienceModel {
    fn default() -> Self {
        AudienceModel {
            clusters: 4,
            taste_noise: 0.2,
            appeal: 0.25,
            quality: 0.25,
            base_hazard: 0.03,
            dislike_hazard: 1.5,
            lag_hazard: 0.03,
            patience: (0.6, 1.6),
            reaction_s: 0.3,
            like_chance: 0.5,
            follow_chance: 0.25,
            mute_chance: 0.1,
        }
    }
}

impl AudienceModel {
    /// A model the simulation can run: positive patience and hazards, chances in 0..1.
    pub fn validate(&self) -> Result<(), String> {
        let unit = |x: f64| (0.0..=1.0).contains(&x);
        if self.clusters == 0 || self.clusters > 1000 {
            return Err("audience: clusters must be 1 to 1000".into());
        }
        if !(self.patience.0 > 0.0 && self.patience.1 >= self.patience.0) {
            return Err("audience: patience must be a range of positive numbers".into());
        }
        if !(self.base_hazard > 0.0 && self.dislike_hazard >= 0.0 && self.lag_hazard >= 0.0 && self.reaction_s >= 0.0) {
            return Err("audience: base_hazard must be positive, the other hazards and reaction_s not negative".into());
        }
        if !(unit(self.like_chance) && unit(self.follow_chance) && unit(self.mute_chance)) {
            return Err("audience: like_chance, follow_chance and mute_chance are chances, 0 to 1".into());
        }
        if !(self.taste_noise >= 0.0 && self.appeal >= 0.0 && self.quality >= 0.0) {
            return Err("audience: taste_noise, appeal and quality must not be negative".into());
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct EvalOptions {
    pub sizes: Vec<RoomSize>,
    pub seeds: Vec<u64>,
    pub seconds: u64,
    pub policies: Vec<Policy>,
    pub audience: AudienceModel,
    /// The engine's configuration; each run sets its policy. Its own policy is the default.
    pub config: EngineConfig,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            sizes: vec![
                RoomSize { speakers: 6, listeners: 50 },
                RoomSize { speakers: 10, listeners: 500 },
                RoomSize { speakers: 30, listeners: 2000 },
            ],
            seeds: vec![1, 2, 3],
            seconds: 180,
            policies: Policy::ALL.to_vec(),
            audience: AudienceModel::default(),
            config: EngineConfig::default(),
        }
    }
}

/// The figures of a run, or their mean over runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Figures {
    /// Share of started utterances heard to the end (0..1).
    pub listen_through: f64,
    /// Mean hidden affinity (-1..1) of the speakers heard, weighted by listening time.
    pub mean_affinity: f64,
    pub skips_per_listener_minute: f64,
    pub likes_per_listener_minute: f64,
    /// Lag behind live of what was heard, weighted by listening time.
    pub mean_lag_ms: f64,
    pub p95_lag_ms: f64,
    /// Share of listening time on utterances that were live when they started playing.
    pub live_share: f64,
    /// Share of listeners' time spent hearing something.
    pub listening_share: f64,
    /// Share of the room's utterances that some simulated listener started.
    pub coverage: f64,
    /// Gini coefficient of listening time over speakers (0: equal, 1: one speaker has it all).
    pub speaker_gini: f64,
    /// Share of started utterances the engine interrupted with a switch.
    pub switched: f64,
    /// Mean hidden quality (-0.25..0.25) of the utterances heard, weighted by time.
    pub mean_quality: f64,
    /// Mean length of the utterances started, in seconds (a policy that favours short ones
    /// gets more listen-through for it).
    pub mean_length_s: f64,
    /// Recommender decisions per second of engine time.
    pub decisions_per_s: f64,
}

impl Figures {
    fn mean(all: &[Figures]) -> Figures {
        let n = all.len().max(1) as f64;
        let sum = |f: fn(&Figures) -> f64| round(all.iter().map(f).sum::<f64>() / n, 4);
        Figures {
            listen_through: sum(|f| f.listen_through),
            mean_affinity: sum(|f| f.mean_affinity),
            skips_per_listener_minute: sum(|f| f.skips_per_listener_minute),
            likes_per_listener_minute: sum(|f| f.likes_per_listener_minute),
            mean_lag_ms: round(all.iter().map(|f| f.mean_lag_ms).sum::<f64>() / n, 1),
            p95_lag_ms: round(all.iter().map(|f| f.p95_lag_ms).sum::<f64>() / n, 1),
            live_share: sum(|f| f.live_share),
            listening_share: sum(|f| f.listening_share),
            coverage: sum(|f| f.coverage),
            speaker_gini: sum(|f| f.speaker_gini),
            switched: sum(|f| f.switched),
            mean_quality: sum(|f| f.mean_quality),
            mean_length_s: sum(|f| f.mean_length_s),
            decisions_per_s: round(all.iter().map(|f| f.decisions_per_s).sum::<f64>() / n, 1),
        }
    }
}

fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    let rounded = (value * scale).round() / scale;
    if rounded == 0.0 { 0.0 } else { rounded }
}

/// One run's figures with its room.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Run {
    pub speakers: u32,
    pub listeners: u32,
    pub seed: u64,
    #[serde(flatten)]
    pub figures: Figures,
}

/// A policy's figures: their mean over every run (each room and seed weighs the same), and
/// each run's.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PolicyReport {
    #[serde(flatten)]
    pub mean: Figures,
    pub runs: Vec<Run>,
}

/// What `encore eval --json` prints.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub default_policy: Policy,
    pub policies: BTreeMap<Policy, PolicyReport>,
}

/// Runs every policy on every room and seed. `progress` hears of each run as it ends.
pub fn evaluate(options: &EvalOptions, mut progress: impl FnMut(Policy, RoomSize, u64, &Figures)) -> Report {
    let mut policies = BTreeMap::new();
    for policy in &options.policies {
        let mut runs = Vec::new();
        for size in &options.sizes {
            for seed in &options.seeds {
                let figures = run(options, *policy, *size, *seed);
                progress(*policy, *size, *seed, &figures);
                runs.push(Run { speakers: size.speakers, listeners: size.listeners, seed: *seed, figures });
            }
        }
        let mean = Figures::mean(&runs.iter().map(|r| r.figures).collect::<Vec<_>>());
        policies.insert(*policy, PolicyReport { mean, runs });
    }
    Report { default_policy: options.config.recommender.policy, policies }
}

/// What a simulated listener is hearing.
struct Current {
    utterance: UtteranceId,
    speaker: usize,
    start_us: u64,
    lag_us: u64,
    live: bool,
    enjoyment: f64,
    quality: f64,
    /// The pending skip, by its key in the queue.
    skip: Option<(u64, u64)>,
}

/// A simulated listener.
struct Member {
    name: Name,
    affinity: Vec<f64>,
    patience: f64,
    current: Option<Current>,
}

/// What a run adds up.
#[derive(Default)]
struct Tally {
    finished: u64,
    skipped: u64,
    switched: u64,
    /// Routes ended otherwise (eviction, mute).
    other: u64,
    likes: u64,
    listen_us: u64,
    live_us: u64,
    affinity_us: f64,
    lag_weighted: u128,
    /// Listening time by lag, in 100 ms steps.
    lag_hist: BTreeMap<u64, u64>,
    session_us: u64,
    by_speaker_us: Vec<u64>,
    started: BTreeSet<UtteranceId>,
    /// Starts of each utterance by simulated listeners.
    starts: BTreeMap<UtteranceId, u64>,
    lengths_us: HashMap<UtteranceId, u64>,
    quality_us: f64,
    utterances: u64,
}

struct Simulation<'a> {
    model: &'a AudienceModel,
    rng: SeededRng,
    seed: u64,
    members: Vec<Member>,
    by_name: HashMap<Name, usize>,
    speakers: HashMap<Name, usize>,
    /// Inputs the audience will send: (at_us, order) -> input.
    pending: BTreeMap<(u64, u64), Input>,
    next_order: u64,
    tally: Tally,
}

impl Simulation<'_> {
    fn schedule(&mut self, at_us: u64, input: Input) -> (u64, u64) {
        let key = (at_us, self.next_order);
        self.next_order += 1;
        self.pending.insert(key, input);
        key
    }

    /// The hidden quality of an utterance: the same for everyone, from the seed and its id.
    fn quality(&self, id: &UtteranceId) -> f64 {
        let text = id.to_string();
        let hash = text.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01B3));
        let unit = (SplitMix64::new(self.seed ^ hash).next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        (unit * 2.0 - 1.0) * self.model.quality
    }

    fn close(&mut self, member: usize, now_us: u64, reason: Option<RouteReason>) {
        let Some(current) = self.members[member].current.take() else { return };
        if let Some(key) = current.skip {
            self.pending.remove(&key);
        }
        let heard_us = now_us.saturating_sub(current.start_us);
        let t = &mut self.tally;
        t.listen_us += heard_us;
        if current.live {
            t.live_us += heard_us;
        }
        t.affinity_us += self.members[member].affinity[current.speaker] * heard_us as f64;
        t.quality_us += current.quality * heard_us as f64;
        t.lag_weighted += current.lag_us as u128 * heard_us as u128;
        *t.lag_hist.entry(current.lag_us / 100_000).or_default() += heard_us;
        t.by_speaker_us[current.speaker] += heard_us;
        match reason {
            Some(RouteReason::Finished) => {
                t.finished += 1;
                let chance = self.model.like_chance * current.enjoyment.max(0.0);
                if self.rng.chance(chance) {
                    let delay_us = self.rng.range(200_000, 2_000_000);
                    let input = Input::Feedback {
                        peer: self.members[member].name.clone(),
                        utterance: Some(current.utterance),
                        signal: FeedbackSignal::Like,
                    };
                    self.tally.likes += 1;
                    self.schedule(now_us + delay_us, input);
                }
            }
            Some(RouteReason::Skip) => t.skipped += 1,
            Some(RouteReason::Switch | RouteReason::SwitchAtPause) => t.switched += 1,
            // Stopped listening, or the run ended: its end is unknown.
            Some(RouteReason::StoppedListening) | None => {}
            Some(_) => t.other += 1,
        }
    }

    fn start(&mut self, member: usize, now_us: u64, utterance: UtteranceId, lag_us: u64, live: bool) {
        let Some(speaker) = self.speakers.get(&utterance.speaker).copied() else { return };
        self.tally.started.insert(utterance.clone());
        *self.tally.starts.entry(utterance.clone()).or_default() += 1;
        let quality = self.quality(&utterance);
        let m = &self.members[member];
        let enjoyment = (m.affinity[speaker] + quality).clamp(-1.0, 1.0);
        let dislike = (1.0 - enjoyment) / 2.0;
        let model = self.model;
        let hazard =
            (model.base_hazard + model.dislike_hazard * dislike * dislike + model.lag_hazard * lag_us as f64 / 1e6)
                / m.patience;
        let wait_us = (model.reaction_s * 1e6) as u64 + self.rng.exp_us(1e6 / hazard);
        let input =
            Input::Feedback { peer: m.name.clone(), utterance: Some(utterance.clone()), signal: FeedbackSignal::Skip };
        let skip = Some(self.schedule(now_us + wait_us, input));
        self.members[member].current =
            Some(Current { utterance, speaker, start_us: now_us, lag_us, live, enjoyment, quality, skip });
    }

    fn observe(&mut self, now_us: u64, events: &[Event]) {
        for event in events {
            match event {
                Event::UtteranceStart { .. } => self.tally.utterances += 1,
                Event::UtteranceEnd { utterance, duration_us, .. } => {
                    self.tally.lengths_us.insert(utterance.clone(), *duration_us);
                }
                Event::Route { listener, to, reason, lag_us, live, .. } => {
                    let Some(member) = self.by_name.get(listener).copied() else { continue };
                    self.close(member, now_us, Some(*reason));
                    if let Some(to) = to {
                        self.start(member, now_us, to.clone(), lag_us.unwrap_or(0), *live);
                    }
                }
                _ => {}
            }
        }
    }
}

/// One room, one seed, one policy.
pub fn run(options: &EvalOptions, policy: Policy, size: RoomSize, seed: u64) -> Figures {
    let mut config = options.config.clone();
    config.recommender.policy = policy;
    let generate = GenerateOptions {
        speakers: size.speakers,
        listeners: size.listeners,
        seconds: options.seconds,
        seed,
        video: false,
        network_faults: true,
        scripted_listeners: false,
        config: config.clone(),
    };
    let (_, room) = generate_events(&generate);
    let end_us = options.seconds * 1_000_000;
    let model = &options.audience;

    // The hidden tastes, from their own seeded source.
    let mut rng = SeededRng::new(seed ^ 0xA5A5_5A5A_0F0F_F0F0);
    let speakers = size.speakers as usize;
    let clusters = model.clusters.max(1) as usize;
    let centres: Vec<Vec<f64>> =
        (0..clusters).map(|_| (0..speakers).map(|_| rng.unit() * 2.0 - 1.0).collect()).collect();
    let appeal: Vec<f64> = (0..speakers).map(|_| (rng.unit() * 2.0 - 1.0) * model.appeal).collect();
    let mut members = Vec::new();
    for i in 0..size.listeners {
        let cluster = rng.range(0, clusters as u64) as usize;
        let affinity = (0..speakers)
            .map(|s| {
                let noise = (rng.unit() + rng.unit() + rng.unit() - 1.5) * model.taste_noise;
                (centres[cluster][s] + appeal[s] + noise).clamp(-1.0, 1.0)
            })
            .collect();
        let patience = model.patience.0 + rng.unit() * (model.patience.1 - model.patience.0);
        members.push(Member { name: Name::from(listener_name(i)), affinity, patience, current: None });
    }
    let by_name = members.iter().enumerate().map(|(i, m)| (m.name.clone(), i)).collect();
    let speaker_names = (0..size.speakers).map(|i| (Name::from(speaker_name(i)), i as usize)).collect();
    let mut sim = Simulation {
        model,
        rng,
        seed,
        members,
        by_name,
        speakers: speaker_names,
        pending: BTreeMap::new(),
        next_order: 0,
        tally: Tally { by_speaker_us: vec![0; speakers], ..Tally::default() },
    };

    // Sessions, and the preferences a listener states when it starts listening.
    let mut listening_since: HashMap<Name, u64> = HashMap::new();
    for (at_us, input) in &room {
        match input {
            Input::Listen { peer } if sim.by_name.contains_key(peer) => {
                listening_since.insert(peer.clone(), *at_us);
                let member = &sim.members[sim.by_name[peer]];
                let order = |a: &(usize, &f64), b: &(usize, &f64)| a.1.total_cmp(b.1).then(b.0.cmp(&a.0));
                let favourite = member.affinity.iter().enumerate().max_by(order).map(|(s, _)| s);
                let least = member.affinity.iter().enumerate().min_by(order).map(|(s, _)| s);
                let follow: Vec<Name> = favourite
                    .filter(|_| sim.rng.chance(model.follow_chance))
                    .map(|s| Name::from(speaker_name(s as u32)))
                    .into_iter()
                    .collect();
                let mute: Vec<Name> = least
                    .filter(|s| Some(*s) != favourite && sim.rng.chance(model.mute_chance))
                    .map(|s| Name::from(speaker_name(s as u32)))
                    .into_iter()
                    .collect();
                if !follow.is_empty() || !mute.is_empty() {
                    sim.schedule(at_us + 50_000, Input::Prefs { peer: peer.clone(), follow, mute });
                }
            }
            Input::Leave { peer } => {
                if let Some(since) = listening_since.remove(peer) {
                    sim.tally.session_us += at_us.saturating_sub(since);
                }
            }
            _ => {}
        }
    }
    sim.tally.session_us += listening_since.values().map(|since| end_us.saturating_sub(*since)).sum::<u64>();

    let mut engine = Engine::new(config).expect("a valid configuration");
    engine.set_payloads(false);
    let mut room = room.into_iter().peekable();
    let mut now_us = 0;
    while engine.next_tick_us() < end_us {
        let tick_us = engine.next_tick_us();
        while let Some((at_us, input)) = room.next_if(|(at_us, _)| *at_us <= tick_us) {
            engine.push(at_us, input);
        }
        while let Some(entry) = sim.pending.first_entry() {
            if entry.key().0 > tick_us {
                break;
            }
            let ((at_us, _), input) = entry.remove_entry();
            engine.push(at_us, input);
        }
        let output = engine.tick();
        now_us = output.now_us;
        sim.observe(now_us, &output.events);
        engine.recycle(output);
    }
    for member in 0..sim.members.len() {
        sim.close(member, now_us, None);
    }
    let decisions = engine.recommender_counts().decisions;
    figures(&sim.tally, decisions, end_us)
}

fn figures(t: &Tally, decisions: u64, end_us: u64) -> Figures {
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let ended = (t.finished + t.skipped + t.switched + t.other) as f64;
    let minutes = t.session_us as f64 / 60e6;
    let listen = t.listen_us as f64;
    // The 95th percentile of lag over listening time.
    let mut p95 = 0;
    let mut seen = 0;
    for (step, us) in &t.lag_hist {
        seen += us;
        p95 = *step;
        if seen as f64 >= 0.95 * listen {
            break;
        }
    }
    Figures {
        listen_through: round(ratio(t.finished as f64, ended), 4),
        mean_affinity: round(ratio(t.affinity_us, listen), 4),
        skips_per_listener_minute: round(ratio(t.skipped as f64, minutes), 4),
        likes_per_listener_minute: round(ratio(t.likes as f64, minutes), 4),
        mean_lag_ms: round(ratio(t.lag_weighted as f64, listen) / 1000.0, 1),
        p95_lag_ms: (p95 * 100 + 50) as f64,
        live_share: round(ratio(t.live_us as f64, listen), 4),
        listening_share: round(ratio(listen, t.session_us as f64), 4),
        coverage: round(ratio(t.started.len() as f64, t.utterances as f64), 4),
        speaker_gini: round(gini(&t.by_speaker_us), 4),
        switched: round(ratio(t.switched as f64, ended), 4),
        mean_quality: round(ratio(t.quality_us, listen), 4),
        mean_length_s: {
            let (mut sum, mut count) = (0u64, 0u64);
            for (id, starts) in &t.starts {
                if let Some(length) = t.lengths_us.get(id) {
                    sum += length * starts;
                    count += starts;
                }
            }
            round(ratio(sum as f64, count as f64) / 1e6, 3)
        },
        decisions_per_s: round(decisions as f64 / (end_us as f64 / 1e6), 1),
    }
}

/// The Gini coefficient of a distribution (0 when everyone has the same).
pub fn gini(values: &[u64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let n = sorted.len() as f64;
    let total: f64 = sorted.iter().map(|v| *v as f64).sum();
    if sorted.is_empty() || total == 0.0 {
        return 0.0;
    }
    let weighted: f64 = sorted.iter().enumerate().map(|(i, v)| (i as f64 + 1.0) * *v as f64).sum();
    (2.0 * weighted) / (n * total) - (n + 1.0) / n
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<8} {:<9} {:>7} {:>7} {:>7} {:>7} {:>8} {:>8} {:>6} {:>7} {:>7} {:>6} {:>7} {:>9}",
            "policy",
            "room",
            "listen",
            "affin.",
            "skips",
            "likes",
            "lag",
            "lag p95",
            "live",
            "hearing",
            "cover.",
            "gini",
            "switch",
            "decisions"
        )?;
        writeln!(
            f,
            "{:<8} {:<9} {:>7} {:>7} {:>7} {:>7} {:>8} {:>8} {:>6} {:>7} {:>7} {:>6} {:>7} {:>9}",
            "", "", "through", "", "/l.min", "/l.min", "mean s", "s", "share", "share", "", "", "share", "per s"
        )?;
        for (policy, report) in &self.policies {
            let mut sizes: Vec<(u32, u32)> = report.runs.iter().map(|r| (r.speakers, r.listeners)).collect();
            sizes.dedup();
            let mut rows: Vec<(String, Figures)> = sizes
                .iter()
                .map(|(s, l)| {
                    let runs: Vec<Figures> = report
                        .runs
                        .iter()
                        .filter(|r| (r.speakers, r.listeners) == (*s, *l))
                        .map(|r| r.figures)
                        .collect();
                    (format!("{s}x{l}"), Figures::mean(&runs))
                })
                .collect();
            if rows.len() > 1 {
                rows.push(("all".into(), report.mean));
            }
            let name = if *policy == self.default_policy { format!("{policy}*") } else { policy.to_string() };
            for (room, x) in rows {
                writeln!(
                    f,
                    "{:<8} {:<9} {:>7.3} {:>7.3} {:>7.2} {:>7.2} {:>8.2} {:>8.1} {:>6.2} {:>7.2} {:>7.2} {:>6.2} {:>7.3} {:>9.0}",
                    name,
                    room,
                    x.listen_through,
                    x.mean_affinity,
                    x.skips_per_listener_minute,
                    x.likes_per_listener_minute,
                    x.mean_lag_ms / 1000.0,
                    x.p95_lag_ms / 1000.0,
                    x.live_share,
                    x.listening_share,
                    x.coverage,
                    x.speaker_gini,
                    x.switched,
                    x.decisions_per_s,
                )?;
            }
        }
        write!(f, "* the default policy; figures are means over the runs (each room and seed weighs the same)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_sizes_read_as_speakers_by_listeners() {
        assert_eq!("30x2000".parse(), Ok(RoomSize { speakers: 30, listeners: 2000 }));
        assert_eq!("6X50".parse(), Ok(RoomSize { speakers: 6, listeners: 50 }));
        assert_eq!("30x2_000".parse::<RoomSize>().map(|s| s.listeners), Ok(2000));
        assert!("30".parse::<RoomSize>().is_err());
        assert!("0x5".parse::<RoomSize>().is_err());
    }

    #[test]
    fn gini_is_zero_for_equal_shares_and_near_one_for_one_winner() {
        assert_eq!(gini(&[5, 5, 5, 5]), 0.0);
        assert!((gini(&[0, 0, 0, 100]) - 0.75).abs() < 1e-9);
        assert_eq!(gini(&[]), 0.0);
    }
}
