//! The `Engine` facade: push inputs, tick, read outputs.

use bevy_ecs::prelude::World;
use bevy_ecs::schedule::Schedule;

use encore_components::config::{EngineConfig, EngineConfigError, Policy};
use encore_components::ids::{MediaKind, Name, PeerKey, UtteranceId, UtteranceOrd};
use encore_components::input::Input;
use encore_components::learner::Learner;
use encore_components::listener::{ListenerSession, Route};
use encore_components::output::{TickOutput, UpNext};
use encore_components::peer::{Peer, Prefs};
use encore_components::replica::{EvictOrder, Evictions};
use encore_components::resources::{
    BufferLedger, ClosedUtterances, Counters, DecisionQueue, Decisions, Departures, Directory, Dominance, EngineClock,
    EngineRng, ListenOutcomes, NackQueue, NewUtterances, Outputs, PendingInputs, RecommenderCounts, SwitchesDue,
    TimedInput,
};
use encore_components::track::{PreRoll, SpeechLevels, Track, Voice};
use encore_components::utterance::{Audience, PacketBuffer, Utterance};

use crate::accounting::buffer_bytes;
use crate::schedule::build_schedule;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Config(#[from] EngineConfigError),
    #[error("the engine schedule does not build: {0}")]
    Schedule(String),
}

/// One room's engine. Not thread-safe by design: one worker owns it.
pub struct Engine {
    pub(crate) world: World,
    schedule: Schedule,
    next_tick: u64,
    tick_us: u64,
    /// The arrival time of the last input pushed (inputs never go back in time).
    last_at_us: u64,
    /// Vectors handed back by [`Engine::recycle`], for the next tick to fill.
    spare: TickOutput,
    /// [`Engine::is_quiet`] as of the last tick or push, once asked (hosts ask often).
    quiet: Option<bool>,
}

/// A read-only picture of the room, for APIs and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomView {
    pub now_us: u64,
    pub buffer_bytes: u64,
    pub buffer_cap_bytes: u64,
    pub peers: Vec<PeerView>,
    pub tracks: Vec<TrackView>,
    pub utterances: Vec<UtteranceView>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerView {
    pub name: Name,
    pub uid: Option<String>,
    pub roles: Vec<String>,
    pub listening: bool,
    pub playing: Option<UtteranceId>,
    /// How far behind live the listener hears what it plays.
    pub lag_us: Option<u64>,
    pub follow: Vec<Name>,
    pub mute: Vec<Name>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrackView {
    pub name: Name,
    pub peer: Name,
    pub media: MediaKind,
    pub codec: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UtteranceView {
    pub id: UtteranceId,
    pub uid: Option<String>,
    pub started_us: u64,
    pub ended_us: Option<u64>,
    pub bytes: u64,
    pub playing: u32,
}

impl Engine {
    pub fn new(config: EngineConfig) -> Result<Self, EngineError> {
        config.validate()?;
        let tick_us = config.tick_us();
        let mut world = World::new();
        world.insert_resource(EngineClock { tick: 0, now_us: 0, tick_us });
        world.insert_resource(BufferLedger {
            bytes: 0,
            cap: config.buffer_max_bytes,
            added: 0,
            peak_since_stats: 0,
            next_stats_us: crate::stats::STATS_INTERVAL_US,
        });
        world.insert_resource(EngineRng::new(config.seed));
        world.insert_resource(config);
        world.init_resource::<PendingInputs>();
        world.init_resource::<Directory>();
        world.init_resource::<Counters>();
        world.init_resource::<DecisionQueue>();
        world.init_resource::<Decisions>();
        world.init_resource::<SwitchesDue>();
        world.init_resource::<Departures>();
        world.init_resource::<NewUtterances>();
        world.init_resource::<NackQueue>();
        world.init_resource::<ClosedUtterances>();
        world.init_resource::<Outputs>();
        world.init_resource::<Dominance>();
        world.init_resource::<ListenOutcomes>();
        world.init_resource::<RecommenderCounts>();
        world.init_resource::<Learner>();
        world.init_resource::<Evictions>();
        let mut schedule = build_schedule();
        schedule.initialize(&mut world).map_err(|e| EngineError::Schedule(e.to_string(schedule.graph(), &world)))?;
        Ok(Engine { world, schedule, next_tick: 0, tick_us, last_at_us: 0, spare: TickOutput::default(), quiet: None })
    }

    /// Queues an input for the next tick and returns the arrival time the engine gives it.
    ///
    /// `at_us` is when the input arrived, on the engine clock. Time never goes back and an
    /// input never arrives after the tick that applies it, so the engine holds `at_us` to
    /// `last pushed ..= next_tick_us()`: an input stamped earlier than the one before (two
    /// network tasks racing to a channel) counts as arriving with it; one stamped in the
    /// future counts as arriving now. A recorder writes the returned time, so a replay
    /// pushes exactly what the live engine saw. The next tick applies its inputs in order
    /// of arrival time, then of pushing: a total order.
    pub fn push(&mut self, at_us: u64, input: Input) -> u64 {
        let at_us = self.arrival_us(at_us);
        self.last_at_us = at_us;
        self.enqueue(at_us, input)
    }

    /// Puts an input, with the arrival time kept for it, in the next tick's queue.
    fn enqueue(&mut self, at_us: u64, input: Input) -> u64 {
        self.quiet = Some(false);
        let mut pending = self.world.resource_mut::<PendingInputs>();
        let order = pending.next_order;
        pending.next_order += 1;
        pending.items.push(TimedInput { at_us, order, input });
        at_us
    }

    /// Queues an origin's speaker-side input on a replica with the arrival time the origin's
    /// engine kept for it, exactly (held only to the next tick's time). [`Engine::push`]
    /// would hold it to the last input pushed, and an edge's own listener pushed a moment
    /// before could then move a speaker's packet later than the origin saw it: its media
    /// time and an utterance's start come from that arrival. The tick applies its inputs in
    /// order of arrival time, so origin and replica apply the speaker side in the same order.
    pub fn push_replicated(&mut self, at_us: u64, input: Input) -> u64 {
        let at_us = at_us.min(self.next_tick_us());
        self.last_at_us = self.last_at_us.max(at_us);
        self.enqueue(at_us, input)
    }

    /// The arrival time [`Engine::push`] would give an input stamped `at_us` now (for a
    /// recorder that writes the input before pushing it).
    pub fn arrival_us(&self, at_us: u64) -> u64 {
        at_us.max(self.last_at_us).min(self.next_tick_us())
    }

    /// Runs one tick at time `next_tick() * tick_us` and returns what it produced. Hand the
    /// output back with [`Engine::recycle`] once done with it, and the next tick reuses its
    /// vectors instead of allocating.
    pub fn tick(&mut self) -> TickOutput {
        let tick = self.next_tick;
        let now_us = tick * self.tick_us;
        *self.world.resource_mut::<EngineClock>() = EngineClock { tick, now_us, tick_us: self.tick_us };
        self.world.resource_mut::<NewUtterances>().opened.clear();
        self.world.resource_mut::<ClosedUtterances>().closed.clear();
        let mut out = std::mem::take(&mut self.spare);
        out.tick = tick;
        out.now_us = now_us;
        out.events.clear();
        out.packets.clear();
        self.world.resource_mut::<Outputs>().out = out;
        self.schedule.run(&mut self.world);
        self.next_tick += 1;
        self.quiet = None;
        std::mem::take(&mut self.world.resource_mut::<Outputs>().out)
    }

    /// Gives a tick's output back so the next tick fills the same vectors.
    pub fn recycle(&mut self, output: TickOutput) {
        self.spare = output;
    }

    /// Whether sent packets carry their payload (default yes). Headless replay turns it off:
    /// nothing reads the bytes, and sharing them costs a reference count per packet.
    pub fn set_payloads(&mut self, payloads: bool) {
        self.world.resource_mut::<Outputs>().payloads = payloads;
    }

    /// Makes this engine a replica of another (an edge node's copy of an origin's room): its
    /// evict system applies the orders given to [`Engine::push_evict_orders`] instead of
    /// choosing by its own listeners. Feed it the origin's speaker-side inputs
    /// ([`Input::is_speaker_side`]) at the ticks the origin consumed them, and its own
    /// listeners' inputs; its utterances and buffer are then the origin's (docs/scaling.md).
    pub fn set_replica(&mut self) {
        let mut evictions = self.world.resource_mut::<Evictions>();
        if evictions.replica.is_none() {
            evictions.replica = Some(Default::default());
        }
    }

    pub fn is_replica(&self) -> bool {
        self.world.resource::<Evictions>().replica.is_some()
    }

    /// Queues the origin's eviction orders of its tick `tick` (from its
    /// [`Engine::evict_orders`] after that tick) for this replica's tick of the same number.
    /// Ignored unless [`Engine::set_replica`] was called.
    pub fn push_evict_orders(&mut self, tick: u64, orders: &[EvictOrder]) {
        if orders.is_empty() {
            return;
        }
        self.quiet = Some(false);
        if let Some(replica) = self.world.resource_mut::<Evictions>().replica.as_mut() {
            replica.entry(tick).or_default().extend_from_slice(orders);
        }
    }

    /// What the last tick's eviction removed, in order: what a replica of this engine needs
    /// besides its speaker-side inputs.
    pub fn evict_orders(&self) -> &[EvictOrder] {
        &self.world.resource::<Evictions>().made
    }

    /// The number of the tick the next call to [`Engine::tick`] runs.
    pub fn next_tick(&self) -> u64 {
        self.next_tick
    }

    /// Engine time of the next tick.
    pub fn next_tick_us(&self) -> u64 {
        self.next_tick * self.tick_us
    }

    pub fn tick_us(&self) -> u64 {
        self.tick_us
    }

    pub fn config(&self) -> &EngineConfig {
        self.world.resource::<EngineConfig>()
    }

    pub fn buffer_bytes(&self) -> u64 {
        self.world.resource::<BufferLedger>().bytes
    }

    pub fn buffer_cap(&self) -> u64 {
        self.world.resource::<BufferLedger>().cap
    }

    /// Bytes that ever came into the buffer (it only grows): how much a room wants to keep.
    pub fn buffer_added_bytes(&self) -> u64 {
        self.world.resource::<BufferLedger>().added
    }

    pub fn counters(&self) -> Counters {
        *self.world.resource::<Counters>()
    }

    /// The recommender's decisions (listeners scored) in the last tick.
    pub fn decisions_last_tick(&self) -> u64 {
        self.world.resource::<Decisions>().last_tick
    }

    /// The recommender's decisions and scored candidates since the start.
    pub fn recommender_counts(&self) -> RecommenderCounts {
        *self.world.resource::<RecommenderCounts>()
    }

    /// The dominant speaker, as last decided (while the detector runs: the `loudest` policy or
    /// `dominant_speaker.events`).
    pub fn dominant_speaker(&self) -> Option<&Name> {
        self.world.resource::<Dominance>().speaker.as_ref().map(|(_, name)| name)
    }

    /// The name of a peer key (keys are never reused, so this works after it left).
    pub fn peer_name(&self, key: PeerKey) -> Option<&Name> {
        self.world.resource::<Directory>().peer_names.get(key.0 as usize)
    }

    /// The id of an utterance still in the buffer.
    pub fn utterance_id(&self, ord: UtteranceOrd) -> Option<UtteranceId> {
        let entity = self.world.resource::<Directory>().utterances.get(&ord)?;
        Some(self.world.get::<Utterance>(*entity)?.id.clone())
    }

    /// The ordinal of an utterance still in the buffer.
    pub fn utterance_ord(&self, id: &UtteranceId) -> Option<UtteranceOrd> {
        self.world.resource::<Directory>().utterance_ids.get(id).copied()
    }

    /// Whether an utterance with this id was ever opened here (it may be evicted since).
    pub fn utterance_existed(&self, id: &UtteranceId) -> bool {
        self.world.resource::<Directory>().utterance_existed(id)
    }

    /// What a peer hears, as of the last tick: `None` when it is not listening (or not in
    /// the room), `Some(None)` when it listens to nothing right now.
    pub fn listening(&self, peer: &str) -> Option<Option<UtteranceId>> {
        let entity = self.world.resource::<Directory>().peers.get(peer)?;
        let session = self.world.get::<Peer>(*entity)?.session?;
        let route = self.world.get::<Route>(session)?;
        Some(route.playing.as_ref().map(|p| p.id.clone()))
    }

    /// What a listening peer will hear after what it hears now, best first and at most `n`,
    /// as of the last tick: a waiting switch, the utterance a switch cut, then what the
    /// recommender ranks highest for it now ([`crate::up_next`]). `None` when the peer is
    /// not listening. A read: asking changes no decision.
    pub fn up_next(&self, peer: &str, n: usize) -> Option<Vec<UpNext>> {
        self.up_next_of(&[peer], n).pop().flatten()
    }

    /// [`Engine::up_next`] for several peers at once, in their order: the candidates are
    /// gathered once for all of them.
    pub fn up_next_of(&self, peers: &[&str], n: usize) -> Vec<Option<Vec<UpNext>>> {
        let keys: Vec<Option<PeerKey>> = peers.iter().map(|peer| self.peer_key(peer)).collect();
        crate::up_next::up_next(&self.world, &keys, n)
    }

    /// The key of a peer in the room.
    pub fn peer_key(&self, name: &str) -> Option<PeerKey> {
        let entity = self.world.resource::<Directory>().peers.get(name)?;
        Some(self.world.get::<Peer>(*entity)?.key)
    }

    /// Nothing left to do: no input waiting, no utterance open, nobody playing, no speaker
    /// mid-talk, no decision or NACK waiting. A quiet engine's ticks change nothing but the
    /// clock until an input arrives or the next stats line is due ([`Engine::next_due_tick`]).
    pub fn is_quiet(&mut self) -> bool {
        if let Some(quiet) = self.quiet {
            return quiet;
        }
        let quiet = self.compute_quiet();
        self.quiet = Some(quiet);
        quiet
    }

    fn compute_quiet(&mut self) -> bool {
        if !self.world.resource::<PendingInputs>().items.is_empty()
            || self.world.resource::<Evictions>().replica.as_ref().is_some_and(|orders| !orders.is_empty())
            || !self.world.resource::<DecisionQueue>().needs.is_empty()
            || !self.world.resource::<NackQueue>().listeners.is_empty()
            || !self.world.resource::<Departures>().tracks.is_empty()
        {
            return false;
        }
        // What the learn and dominant-speaker systems still have to do in ticks to come.
        if !self.world.resource::<ListenOutcomes>().list.is_empty()
            || !self.world.resource::<Learner>().regroup.is_empty()
        {
            return false;
        }
        let config = self.world.resource::<EngineConfig>();
        if config.dominant_speaker.events() || config.recommender.policy == Policy::Loudest {
            // The detector pushes silence into every level history while nothing arrives; a
            // decision can change only while some history still holds a sound.
            let sounding =
                self.world.query::<&SpeechLevels>().iter(&self.world).any(|l| l.levels.iter().any(|v| *v > 0));
            if sounding {
                return false;
            }
        }
        let open = self.world.query::<&Utterance>().iter(&self.world).any(|u| u.is_open());
        let playing = self.world.query::<&Route>().iter(&self.world).any(|r| r.playing.is_some());
        let speaking = self.world.query::<&Voice>().iter(&self.world).any(|v| v.speaking);
        !open && !playing && !speaking
    }

    /// The first tick that can do anything unless an input arrives first: the next tick
    /// while the engine is busy; for a quiet one, the tick of the next stats line. A host
    /// with many idle rooms sleeps until then ([`Engine::skip_to`]) instead of ticking.
    pub fn next_due_tick(&mut self) -> u64 {
        if !self.is_quiet() {
            return self.next_tick;
        }
        let stats_us = self.world.resource::<BufferLedger>().next_stats_us;
        stats_us.div_ceil(self.tick_us).max(self.next_tick)
    }

    /// Passes over ticks where nothing is due, so the next [`Engine::tick`] runs `tick`. The
    /// decisions are those of ticking through them one by one (a test replays both ways to
    /// the same trace). Skipping a tick that something is due at is a bug: it asserts in
    /// debug builds, and release builds count it and do not skip.
    pub fn skip_to(&mut self, tick: u64) {
        if tick <= self.next_tick {
            return;
        }
        if tick > self.next_due_tick() {
            crate::shared::world_bug(&mut self.world, "skipping ticks that have work due");
            return;
        }
        self.next_tick = tick;
    }

    /// Recomputes the buffer's bytes from every utterance and pre-roll ring in the
    /// directory, for checking the ledger.
    pub fn audit_buffer_bytes(&self) -> u64 {
        let directory = self.world.resource::<Directory>();
        let utterances: u64 =
            directory.utterances.values().filter_map(|e| self.world.get::<PacketBuffer>(*e)).map(buffer_bytes).sum();
        let rings: u64 = directory
            .tracks
            .values()
            .filter_map(|e| self.world.get::<PreRoll>(*e))
            .map(crate::accounting::preroll_bytes)
            .sum();
        utterances + rings
    }

    /// The room as it stands, every list in a stable order.
    pub fn view(&mut self) -> RoomView {
        let world = &self.world;
        let directory = world.resource::<Directory>();
        let mut peers: Vec<PeerView> = directory
            .peers
            .values()
            .filter_map(|entity| {
                let peer = world.get::<Peer>(*entity)?;
                let prefs = world.get::<Prefs>(*entity);
                let session =
                    peer.session.and_then(|v| Some((world.get::<ListenerSession>(v)?, world.get::<Route>(v)?)));
                let playing = session.and_then(|(_, route)| route.playing.as_ref());
                let lag_us = playing.and_then(|p| {
                    let started = world.get::<Utterance>(p.utterance)?.started_us;
                    Some(p.start_us.saturating_sub(started))
                });
                Some(PeerView {
                    name: peer.name.clone(),
                    uid: peer.uid.clone(),
                    roles: peer.roles.iter().map(|r| r.as_str().to_owned()).collect(),
                    listening: session.is_some(),
                    playing: playing.map(|p| p.id.clone()),
                    lag_us,
                    follow: prefs.map(|p| p.follow.iter().cloned().collect()).unwrap_or_default(),
                    mute: prefs.map(|p| p.mute.iter().cloned().collect()).unwrap_or_default(),
                })
            })
            .collect();
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        let tracks = directory
            .tracks
            .values()
            .filter_map(|entity| {
                let track = world.get::<Track>(*entity)?;
                Some(TrackView {
                    name: track.name.clone(),
                    peer: track.speaker.clone(),
                    media: track.media,
                    codec: track.codec.clone(),
                })
            })
            .collect();
        let utterances = directory
            .utterances
            .values()
            .filter_map(|entity| {
                let utterance = world.get::<Utterance>(*entity)?;
                Some(UtteranceView {
                    id: utterance.id.clone(),
                    uid: utterance.uid.clone(),
                    started_us: utterance.started_us,
                    ended_us: utterance.ended_us,
                    bytes: world.get::<PacketBuffer>(*entity)?.bytes,
                    playing: world.get::<Audience>(*entity)?.playing,
                })
            })
            .collect();
        let ledger = world.resource::<BufferLedger>();
        RoomView {
            now_us: self.next_tick.saturating_sub(1) * self.tick_us,
            buffer_bytes: ledger.bytes,
            buffer_cap_bytes: ledger.cap,
            peers,
            tracks,
            utterances,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_builds_with_ambiguity_detection_as_an_error() {
        let engine = Engine::new(EngineConfig::default());
        assert!(engine.is_ok());
    }

    #[test]
    fn a_replicated_input_keeps_its_arrival_time_after_a_later_local_one() {
        let mut engine = Engine::new(EngineConfig::default()).unwrap();
        let tick_us = engine.tick_us();
        engine.tick();
        engine.tick();
        // A local listener's input stamped at the tick's time, then an origin's input that
        // arrived earlier at the origin.
        assert_eq!(engine.push(2 * tick_us, Input::Listen { peer: Name::new("edge.l") }), 2 * tick_us);
        assert_eq!(engine.push_replicated(tick_us + 5, Input::Leave { peer: Name::new("s") }), tick_us + 5);
        // Never later than the tick that applies it; and a local input after it is held
        // to the latest time pushed, as always.
        assert_eq!(engine.push_replicated(9 * tick_us, Input::Leave { peer: Name::new("t") }), 2 * tick_us);
        assert_eq!(engine.push(0, Input::Listen { peer: Name::new("edge.m") }), 2 * tick_us);
    }

    #[test]
    fn an_invalid_configuration_is_refused_with_its_key() {
        let err = Engine::new(EngineConfig { tick_ms: 0, ..EngineConfig::default() }).err().unwrap();
        assert!(err.to_string().contains("tick_ms"), "{err}");
    }

    #[test]
    fn two_unordered_systems_touching_the_same_data_are_an_error() {
        use bevy_ecs::prelude::ResMut;
        use bevy_ecs::schedule::{LogLevel, ScheduleBuildSettings};
        fn a(mut c: ResMut<Counters>) {
            c.sent += 1;
        }
        fn b(mut c: ResMut<Counters>) {
            c.sent += 2;
        }
        let mut world = World::new();
        world.init_resource::<Counters>();
        let mut schedule = Schedule::default();
        schedule.set_build_settings(ScheduleBuildSettings {
            ambiguity_detection: LogLevel::Error,
            ..ScheduleBuildSettings::default()
        });
        schedule.add_systems((a, b));
        assert!(schedule.initialize(&mut world).is_err());
    }

    #[test]
    fn the_decisions_of_the_last_tick_are_counted_for_metrics() {
        let mut engine = Engine::new(EngineConfig::default()).unwrap();
        for peer in ["a", "b"] {
            engine.push(0, Input::Join { peer: Name::new(peer), uid: None, roles: vec![] });
            engine.push(0, Input::Listen { peer: Name::new(peer) });
        }
        engine.tick();
        assert_eq!(engine.decisions_last_tick(), 2, "two listeners started listening: each is scored");
        engine.tick();
        assert_eq!(engine.decisions_last_tick(), 0, "nobody needs a decision");
    }

    #[test]
    fn time_advances_by_the_tick_and_nothing_else() {
        let mut engine = Engine::new(EngineConfig::default()).unwrap();
        assert_eq!(engine.tick().now_us, 0);
        assert_eq!(engine.tick().now_us, 10_000);
        assert_eq!(engine.next_tick(), 2);
    }

    #[test]
    fn pushed_inputs_never_go_back_in_time_nor_arrive_after_their_tick() {
        let mut engine = Engine::new(EngineConfig::default()).unwrap();
        let leave = || Input::Leave { peer: Name::new("ghost") };
        engine.tick();
        // The next tick runs at 10 ms.
        assert_eq!(engine.push(4_000, leave()), 4_000);
        assert_eq!(engine.push(3_000, leave()), 4_000, "earlier than the one before: arrives with it");
        assert_eq!(engine.push(25_000, leave()), 10_000, "from the future: arrives in the tick that applies it");
        engine.tick();
        assert_eq!(engine.push(0, leave()), 10_000);
        assert_eq!(engine.counters().drops.unknown_peer, 3);
    }

    #[test]
    fn a_recycled_output_lends_its_vectors_to_the_next_tick() {
        let mut engine = Engine::new(EngineConfig::default()).unwrap();
        let mut output = engine.tick();
        output.events.reserve(1000);
        let capacity = output.events.capacity();
        engine.recycle(output);
        let next = engine.tick();
        assert!(next.events.capacity() >= capacity);
        assert_eq!(next.tick, 1);
    }
}
