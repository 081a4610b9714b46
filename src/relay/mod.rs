//! The origin → edge relay of one room (issue 11), without its transport: what an origin
//! writes for its edges, and how an edge runs the room's engine on it.
//!
//! The relay stream is JSON Lines, one source of truth with the scenario format: it opens
//! with the scenario header (the origin engine's whole configuration, which the edge's
//! engine is built from: two nodes with different voice or buffer settings would cut other
//! utterances), and an input line is the scenario's event line with its `tick` (what a live
//! recording writes, docs/scenario-format.md), limited to the speaker side
//! (`Input::is_speaker_side`); two more kinds carry what the origin's tick decided besides
//! its inputs:
//!
//! ```text
//! {"encore_scenario":1,"tick_ms":10,"config":{...}}
//! {"at_us":1000,"tick":1,"kind":"join","peer":"s01","roles":["speaker"]}
//! {"kind":"evict","tick":700,"order":{"kind":"trim","utterance":"s01#4","audio":12,"video":0}}
//! {"kind":"through","tick":700}
//! ```
//!
//! `through` says the origin's engine has run tick `tick` (or passed over it, quiet): every
//! line of that tick and of those before it has been written. An edge runs a tick only once
//! it holds a `through` at or past it, so it runs a fixed, short delay behind its origin.
//! docs/scaling.md has the design and why each part replicates or not.

pub mod quic;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use encore_systems::Engine;
use encore_systems::components::TickOutput;
use encore_systems::components::config::EngineConfig;
use encore_systems::components::input::Input;
use encore_systems::components::replica::EvictOrder;

use crate::scenario::{ScenarioHeader, event_line, parse_event};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RelayError {
    #[error("bad relay line: {0}")]
    BadLine(String),
    #[error("a relay input line has no `tick`")]
    NoTick,
    #[error("relay line for tick {tick}, which this edge has already run (next is {next})")]
    Stale { tick: u64, next: u64 },
    #[error("a `{0}` input is the origin's to take: an edge takes only its listeners' inputs")]
    SpeakerSideOnEdge(&'static str),
    #[error("a `{0}` input is not replicated: it stays on the node of its listener")]
    ListenerSide(&'static str),
    #[error("bad relay header: {0}")]
    BadHeader(String),
    #[error("a relay header for another engine configuration than this replica's")]
    ConfigMismatch,
    #[error("an edge's own peer must be named `<name>@<edge>` (origin names never hold `@`), not `{0}`")]
    LocalName(String),
    #[error("the room's relay log passed {max_bytes} bytes and is no longer kept: a new edge cannot start")]
    LogTruncated { max_bytes: u64 },
}

impl RelayError {
    /// A stable code for logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            RelayError::BadLine(_) => "relay-bad-line",
            RelayError::NoTick => "relay-no-tick",
            RelayError::Stale { .. } => "relay-stale",
            RelayError::SpeakerSideOnEdge(_) => "relay-speaker-side-on-edge",
            RelayError::ListenerSide(_) => "relay-listener-side",
            RelayError::LogTruncated { .. } => "relay-log-truncated",
            RelayError::LocalName(_) => "relay-local-name",
            RelayError::BadHeader(_) => "relay-bad-header",
            RelayError::ConfigMismatch => "relay-config-mismatch",
        }
    }
}

/// One line of the relay stream.
#[derive(Clone, Debug, PartialEq)]
pub enum RelayLine {
    /// The stream's first line: the scenario header with the origin engine's configuration.
    Header(Box<ScenarioHeader>),
    /// A speaker-side input as the origin's engine consumed it: its kept arrival time and
    /// the tick that applied it.
    Input { at_us: u64, tick: u64, input: Input },
    /// One removal of the origin's evict system in tick `tick`, in order.
    Evict { tick: u64, order: EvictOrder },
    /// The origin's engine is past tick `tick`.
    Through { tick: u64 },
}

/// The two kinds that are not inputs (serde form of their lines).
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum Mark {
    Evict { tick: u64, order: EvictOrder },
    Through { tick: u64 },
}

impl RelayLine {
    pub fn to_line(&self) -> String {
        let mark = match self {
            RelayLine::Header(header) => return header.to_line(),
            RelayLine::Input { at_us, tick, input } => return event_line(*at_us, Some(*tick), input),
            RelayLine::Evict { tick, order } => Mark::Evict { tick: *tick, order: order.clone() },
            RelayLine::Through { tick } => Mark::Through { tick: *tick },
        };
        // Both are plain data: serialising cannot fail.
        serde_json::to_string(&mark).unwrap_or_default()
    }

    pub fn parse(text: &str) -> Result<RelayLine, RelayError> {
        let value: Value = serde_json::from_str(text).map_err(|e| RelayError::BadLine(e.to_string()))?;
        if value.get("encore_scenario").is_some() {
            return ScenarioHeader::parse(text).map(|h| RelayLine::Header(Box::new(h))).map_err(RelayError::BadHeader);
        }
        let mark = matches!(value.get("kind"), Some(Value::String(kind)) if kind == "evict" || kind == "through");
        if mark {
            return match serde_json::from_value::<Mark>(value).map_err(|e| RelayError::BadLine(e.to_string()))? {
                Mark::Evict { tick, order } => Ok(RelayLine::Evict { tick, order }),
                Mark::Through { tick } => Ok(RelayLine::Through { tick }),
            };
        }
        let event = parse_event(text).map_err(RelayError::BadLine)?;
        let tick = event.tick.ok_or(RelayError::NoTick)?;
        if !event.input.is_speaker_side() {
            return Err(RelayError::ListenerSide(event.input.kind()));
        }
        Ok(RelayLine::Input { at_us: event.at_us, tick, input: event.input })
    }

    /// The tick the line belongs to (the header: before the first).
    pub fn tick(&self) -> u64 {
        match self {
            RelayLine::Header(_) => 0,
            RelayLine::Input { tick, .. } | RelayLine::Evict { tick, .. } | RelayLine::Through { tick } => *tick,
        }
    }
}

/// An origin room's relay stream, kept from the room's start so that an edge that starts
/// late replays it all (docs/scaling.md, "Joining mid-room"), up to `max_bytes`; past that
/// nothing more is kept and no new edge can start (the ones streaming go on).
pub struct OriginLog {
    lines: Vec<Arc<str>>,
    bytes: u64,
    max_bytes: u64,
    truncated: bool,
    /// Lines dropped from the front (only once truncated).
    dropped: usize,
}

impl OriginLog {
    /// A room's log, opening with its engine's configuration.
    pub fn new(config: &EngineConfig, max_bytes: u64) -> Self {
        let mut log = OriginLog { lines: Vec::new(), bytes: 0, max_bytes, truncated: false, dropped: 0 };
        log.write(RelayLine::Header(Box::new(ScenarioHeader::new(config.clone()))));
        log
    }

    /// An input the origin's engine took (with the time `Engine::push` kept and the tick it
    /// goes to); the listener side is left out.
    pub fn input(&mut self, at_us: u64, tick: u64, input: &Input) {
        if input.is_speaker_side() {
            self.write(RelayLine::Input { at_us, tick, input: input.clone() });
        }
    }

    /// The origin's engine ran tick `tick` and evicted `orders` (`Engine::evict_orders`).
    pub fn ticked(&mut self, tick: u64, orders: &[EvictOrder]) {
        for order in orders {
            self.write(RelayLine::Evict { tick, order: order.clone() });
        }
        self.write(RelayLine::Through { tick });
    }

    fn write(&mut self, line: RelayLine) {
        let text: Arc<str> = line.to_line().into();
        self.bytes += text.len() as u64 + 1;
        self.lines.push(text);
        if self.bytes > self.max_bytes && !self.truncated {
            self.truncated = true;
        }
    }

    /// The lines from the `from`-th on (an edge's position), or why not.
    pub fn since(&self, from: usize) -> Result<&[Arc<str>], RelayError> {
        if self.truncated && from < self.dropped {
            return Err(RelayError::LogTruncated { max_bytes: self.max_bytes });
        }
        Ok(self.lines.get(from - self.dropped..).unwrap_or_default())
    }

    /// The lines every edge has been given (those before `upto`) may go once the log no
    /// longer serves new edges; until then they are the log.
    pub fn release(&mut self, upto: usize) {
        if self.truncated && upto > self.dropped {
            let n = (upto - self.dropped).min(self.lines.len());
            self.bytes -= self.lines.drain(..n).map(|l| l.len() as u64 + 1).sum::<u64>();
            self.dropped += n;
        }
    }

    pub fn len(&self) -> usize {
        self.dropped + self.lines.len()
    }

    /// The log passed its bound: it no longer serves new edges from the start.
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// What an edge holds of its origin's stream and has not applied yet: the replicated inputs
/// and eviction orders by tick, and how far the origin is. [`Replica`] drives an engine with
/// it; the server's edge room does the same on its worker, between its own commands.
#[derive(Debug, Default)]
pub struct ReplicaQueue {
    inputs: BTreeMap<u64, Vec<(u64, Input)>>,
    orders: BTreeMap<u64, Vec<EvictOrder>>,
    /// The last tick the origin is known to be past.
    through: Option<u64>,
}

impl ReplicaQueue {
    /// Takes one line of the origin's stream for `engine` (the replica). Lines must come in
    /// the origin's order.
    pub fn line(&mut self, engine: &Engine, line: RelayLine) -> Result<(), RelayError> {
        if let RelayLine::Header(header) = &line {
            // Again at a resumption from the start: it must be the same room's.
            return match header.config == *engine.config() {
                true => Ok(()),
                false => Err(RelayError::ConfigMismatch),
            };
        }
        let next = engine.next_tick();
        if line.tick() < next {
            return Err(RelayError::Stale { tick: line.tick(), next });
        }
        match line {
            RelayLine::Input { at_us, tick, input } => self.inputs.entry(tick).or_default().push((at_us, input)),
            RelayLine::Evict { tick, order } => self.orders.entry(tick).or_default().push(order),
            RelayLine::Through { tick } => self.through = Some(self.through.map_or(tick, |t| t.max(tick))),
            RelayLine::Header(_) => {}
        }
        Ok(())
    }

    /// Whether the origin is past tick `next`: a replica may run it.
    pub fn ready(&self, next: u64) -> bool {
        self.through.is_some_and(|through| through >= next)
    }

    /// The last tick the origin is known to be past.
    pub fn through(&self) -> Option<u64> {
        self.through
    }

    /// The origin's inputs of tick `tick`, with their arrival times, in the origin's order: a
    /// replica pushes them first in the tick ([`Engine::push_replicated`]).
    pub fn take_inputs(&mut self, tick: u64) -> Vec<(u64, Input)> {
        self.inputs.remove(&tick).unwrap_or_default()
    }

    /// The origin's eviction orders of tick `tick`: a replica gives them to its engine last,
    /// before running the tick ([`Engine::push_evict_orders`]).
    pub fn take_orders(&mut self, tick: u64) -> Vec<EvictOrder> {
        self.orders.remove(&tick).unwrap_or_default()
    }
}

/// An edge's own peers are named `<name>@<edge>`: a room's peer names keep only letters,
/// digits, `-`, `_` and `.` (the room's `unique_name`), so no origin peer, present or future,
/// can take an edge peer's name (its replicated `join` would be dropped as a duplicate, and
/// the edge would lose a speaker). And they cannot publish: a listener invited to speak goes
/// to the origin. So an edge takes only its listeners' inputs, and its peers' `join` and
/// `leave`.
pub fn check_local(input: &Input) -> Result<(), RelayError> {
    if input.is_speaker_side() && !matches!(input, Input::Join { .. } | Input::Leave { .. }) {
        return Err(RelayError::SpeakerSideOnEdge(input.kind()));
    }
    if let Input::Join { peer, .. } = input
        && !peer.contains('@')
    {
        return Err(RelayError::LocalName(peer.to_string()));
    }
    Ok(())
}

/// An edge's copy of a room: the engine as a replica, fed the origin's lines and its own
/// listeners' inputs, ticking only as far as the origin has.
pub struct Replica {
    engine: Engine,
    queue: ReplicaQueue,
    /// The edge's own listeners' inputs since the last tick, with their arrival times.
    local: Vec<(u64, Input)>,
}

impl Replica {
    /// A replica built from the stream's first line, the origin's header.
    pub fn from_header(line: &RelayLine) -> Result<Self, RelayError> {
        let engine = engine_from_header(line)?;
        Ok(Self::new(engine))
    }

    pub fn new(mut engine: Engine) -> Self {
        engine.set_replica();
        Replica { engine, queue: ReplicaQueue::default(), local: Vec::new() }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Takes one line of the origin's stream. Lines must come in the origin's order.
    pub fn line(&mut self, line: RelayLine) -> Result<(), RelayError> {
        self.queue.line(&self.engine, line)
    }

    /// An input of one of the edge's own listeners ([`check_local`]); it applies in the next
    /// tick run.
    pub fn local(&mut self, at_us: u64, input: Input) -> Result<(), RelayError> {
        check_local(&input)?;
        self.local.push((at_us, input));
        Ok(())
    }

    /// Whether the origin is past the next tick: [`Replica::tick`] would run it.
    pub fn ready(&self) -> bool {
        self.queue.ready(self.engine.next_tick())
    }

    /// Runs the next tick if the origin is past it: the origin's inputs of the tick at their
    /// own arrival times, the edge's own after them, and the origin's orders.
    pub fn tick(&mut self) -> Option<TickOutput> {
        if !self.ready() {
            return None;
        }
        let tick = self.engine.next_tick();
        for (at_us, input) in self.queue.take_inputs(tick) {
            self.engine.push_replicated(at_us, input);
        }
        for (at_us, input) in self.local.drain(..) {
            self.engine.push(at_us, input);
        }
        self.engine.push_evict_orders(tick, &self.queue.take_orders(tick));
        Some(self.engine.tick())
    }

    pub fn recycle(&mut self, output: TickOutput) {
        self.engine.recycle(output);
    }
}

/// The engine a stream's first line (the origin's header) describes, as a replica.
pub fn engine_from_header(line: &RelayLine) -> Result<Engine, RelayError> {
    let RelayLine::Header(header) = line else {
        return Err(RelayError::BadHeader("the stream must open with the scenario header".into()));
    };
    let mut engine = Engine::new(header.config.clone()).map_err(|e| RelayError::BadHeader(e.to_string()))?;
    engine.set_replica();
    Ok(engine)
}

#[cfg(test)]
mod tests {
    use super::*;
    use encore_systems::components::config::EngineConfig;
    use encore_systems::components::ids::{Name, Role};

    #[test]
    fn lines_read_back_as_written() {
        let lines = [
            RelayLine::Header(Box::new(ScenarioHeader::new(EngineConfig::default()))),
            RelayLine::Input {
                at_us: 1000,
                tick: 1,
                input: Input::Join { peer: Name::new("s01"), uid: None, roles: vec![Role::Speaker] },
            },
            RelayLine::Evict {
                tick: 700,
                order: EvictOrder::Trim { utterance: "s01#4".parse().unwrap(), audio: 12, video: 0 },
            },
            RelayLine::Through { tick: 700 },
        ];
        let texts: Vec<String> = lines.iter().map(RelayLine::to_line).collect();
        assert!(texts[0].starts_with(r#"{"encore_scenario":1,"tick_ms":10,"config":{"#), "{}", texts[0]);
        assert_eq!(texts[1], r#"{"at_us":1000,"tick":1,"kind":"join","peer":"s01","roles":["speaker"]}"#);
        assert_eq!(
            texts[2],
            r#"{"kind":"evict","tick":700,"order":{"kind":"trim","utterance":"s01#4","audio":12,"video":0}}"#
        );
        assert_eq!(texts[3], r#"{"kind":"through","tick":700}"#);
        for (line, text) in lines.iter().zip(&texts) {
            assert_eq!(&RelayLine::parse(text).unwrap(), line);
        }
    }

    #[test]
    fn bad_lines_are_refused_with_their_cause() {
        let cases = [
            ("not json", "relay-bad-line"),
            (r#"{"at_us":1,"kind":"leave","peer":"a"}"#, "relay-no-tick"),
            (r#"{"at_us":1,"tick":1,"kind":"listen","peer":"a"}"#, "relay-listener-side"),
            (r#"{"kind":"through","tick":1,"extra":2}"#, "relay-bad-line"),
            (r#"{"kind":"evict","tick":1,"order":{"kind":"whole","utterance":"nobody"}}"#, "relay-bad-line"),
        ];
        for (text, code) in cases {
            assert_eq!(RelayLine::parse(text).unwrap_err().code(), code, "{text}");
        }
    }

    #[test]
    fn a_replica_ticks_only_as_far_as_its_origin_and_refuses_the_past_and_speakers() {
        let header = RelayLine::Header(Box::new(ScenarioHeader::new(EngineConfig::default())));
        let mut replica = Replica::from_header(&header).unwrap();
        replica.line(header).unwrap();
        let other = EngineConfig { seed: 99, ..EngineConfig::default() };
        let other = RelayLine::Header(Box::new(ScenarioHeader::new(other)));
        assert_eq!(replica.line(other).unwrap_err().code(), "relay-config-mismatch");
        assert!(Replica::from_header(&RelayLine::Through { tick: 0 }).is_err());
        assert!(replica.tick().is_none(), "nothing from the origin yet");
        replica.line(RelayLine::Through { tick: 1 }).unwrap();
        assert!(replica.tick().is_some() && replica.tick().is_some() && replica.tick().is_none());
        assert_eq!(replica.line(RelayLine::Through { tick: 0 }).unwrap_err().code(), "relay-stale");
        let publish = Input::Unpublish { track: Name::new("t") };
        assert_eq!(replica.local(0, publish).unwrap_err().code(), "relay-speaker-side-on-edge");
        let join = |name: &str| Input::Join { peer: Name::new(name), uid: None, roles: vec![] };
        assert_eq!(replica.local(0, join("s01")).unwrap_err().code(), "relay-local-name");
        replica.local(0, join("lena@edge-1")).unwrap();
    }

    #[test]
    fn the_log_serves_late_edges_until_it_passes_its_bound() {
        let config = EngineConfig::default();
        let header_bytes = ScenarioHeader::new(config.clone()).to_line().len() as u64 + 1;
        let mut log = OriginLog::new(&config, header_bytes + 200);
        assert_eq!(log.len(), 1, "the header opens the log");
        log.input(5, 1, &Input::Listen { peer: Name::new("l") });
        assert_eq!(log.len(), 1, "the listener side is not relayed");
        log.input(5, 1, &Input::Leave { peer: Name::new("s01") });
        log.ticked(1, &[]);
        assert_eq!(log.since(0).unwrap().len(), 3);
        for tick in 2..10 {
            log.ticked(tick, &[]);
        }
        assert!(log.bytes() > header_bytes + 200);
        assert_eq!(log.since(0).unwrap().len(), 11, "kept until an edge has them all");
        log.release(5);
        assert_eq!(log.since(0).unwrap_err().code(), "relay-log-truncated");
        assert_eq!(log.since(5).unwrap().len(), 6);
        assert_eq!(log.len(), 11);
    }
}
