//! Replication without a network (issue 11, one room across nodes): an origin engine runs a
//! generated room; edge engines get the origin's speaker-side inputs at the ticks it consumed
//! them, with its eviction orders, plus listeners of their own that act differently. Their
//! utterances (ids, speakers, start and end, evictions) and buffers must be the origin's, tick
//! by tick. The edges take the origin's stream in the relay's wire form (src/relay/mod.rs: the
//! origin's `OriginLog` as text lines, parsed into a `Replica`), one of them joining 15 s into
//! the room from the log. docs/scaling.md, "One room across nodes", is the design this holds to.

use encore::Engine;
use encore::components::config::EngineConfig;
use encore::components::ids::Name;
use encore::components::input::Input;
use encore::components::output::Event;
use encore::components::replica::EvictOrder;
use encore::generate::{GenerateOptions, generate_events};
use encore::relay::{OriginLog, RelayLine, Replica};

/// What an origin's tick hands its edges: the speaker-side inputs it consumed, with the
/// arrival times it kept, and what its eviction removed.
#[derive(Default)]
pub struct TickRecord {
    inputs: Vec<(u64, Input)>,
    orders: Vec<EvictOrder>,
}

/// An engine's utterance events of one tick: what must be equal across origin and edges.
/// An eviction's `listeners` counts the node's own listeners and is left out.
pub fn utterance_events(events: &[Event]) -> Vec<Event> {
    events
        .iter()
        .filter_map(|event| match event {
            Event::UtteranceStart { .. } | Event::UtteranceEnd { .. } => Some(event.clone()),
            Event::Evict { utterance, bytes, buffer_bytes, whole, packets, .. } => Some(Event::Evict {
                utterance: utterance.clone(),
                bytes: *bytes,
                buffer_bytes: *buffer_bytes,
                whole: *whole,
                packets: *packets,
                listeners: 0,
            }),
            _ => None,
        })
        .collect()
}

pub struct Run {
    /// Per tick: the utterance events and the buffer's bytes at the end of it.
    pub ticks: Vec<(Vec<Event>, u64)>,
    records: Vec<TickRecord>,
    /// The origin's relay stream.
    pub log: OriginLog,
    sent: u64,
    routes: u64,
    cap: u64,
}

/// Runs `inputs` (arrival-ordered) through `engine` tick by tick up to `end_tick`. With
/// `replicated`, each tick first takes the origin's record of the same tick.
/// A live worker that falls behind: in three ticks of every ten it takes no input, and the
/// next tick takes what waited, with the arrival times it had (as `Room::push` does).
fn stalled(tick: u64) -> bool {
    tick % 10 >= 7
}

pub fn run(
    mut engine: Engine,
    inputs: &[(u64, Input)],
    replicated: Option<&[TickRecord]>,
    end_tick: u64,
    late: bool,
) -> Run {
    let tick_us = engine.tick_us();
    let mut next = inputs.iter().peekable();
    let mut out = Run {
        ticks: Vec::new(),
        records: Vec::new(),
        log: OriginLog::new(engine.config(), u64::MAX),
        sent: 0,
        routes: 0,
        cap: engine.buffer_cap(),
    };
    for tick in 0..end_tick {
        assert_eq!(engine.next_tick(), tick);
        let mut record = TickRecord::default();
        if let Some(records) = replicated
            && let Some(origin) = records.get(tick as usize)
        {
            // As the server's edge does: the origin's inputs first, at their own arrival
            // times; the edge's own come after them in the same tick.
            for (at_us, input) in &origin.inputs {
                let kept = engine.push(*at_us, input.clone());
                assert_eq!(kept, *at_us, "a replicated input keeps its arrival time");
            }
            engine.push_evict_orders(tick, &origin.orders);
        }
        while let Some((at_us, input)) =
            next.next_if(|(at_us, _)| at_us.div_ceil(tick_us) <= tick && !(late && stalled(tick)))
        {
            let kept = engine.push(*at_us, input.clone());
            if input.is_speaker_side() {
                record.inputs.push((kept, input.clone()));
            }
        }
        let output = engine.tick();
        record.orders = engine.evict_orders().to_vec();
        for (at_us, input) in &record.inputs {
            out.log.input(*at_us, tick, input);
        }
        out.log.ticked(tick, &record.orders);
        out.sent += output.packets.len() as u64;
        out.routes += output.events.iter().filter(|e| matches!(e, Event::Route { .. })).count() as u64;
        out.ticks.push((utterance_events(&output.events), engine.buffer_bytes()));
        out.cap = out.cap.max(engine.buffer_cap());
        assert!(engine.buffer_bytes() <= engine.buffer_cap(), "tick {tick}: over the cap");
        assert_eq!(engine.buffer_bytes(), engine.audit_buffer_bytes(), "tick {tick}: the ledger is off");
        engine.recycle(output);
        out.records.push(record);
    }
    out
}

/// An edge through the relay's wire form: the origin's log as text lines, parsed, into a
/// [`Replica`] with the edge's own audience. The edge starts at origin tick `start`: before
/// it, it takes the log from the room's start (joining mid-room); its own audience arrives
/// from then on.
fn run_edge(
    config: &EngineConfig,
    log: &OriginLog,
    audience: &[(u64, Input)],
    start: u64,
    end_tick: u64,
    late: bool,
) -> Run {
    let lines: Vec<RelayLine> =
        log.since(0).expect("kept").iter().map(|text| RelayLine::parse(text).expect("a relay line")).collect();
    let mut lines = lines.into_iter().peekable();
    // The edge's engine is built from the stream's header: the origin's configuration.
    let header = lines.next().expect("a header");
    let mut replica = Replica::from_header(&header).expect("a good header");
    assert_eq!(replica.engine().config(), config);
    let tick_us = replica.engine().tick_us();
    // Its audience arrives once it runs: their times move on by its start.
    let mut local = audience.iter().map(|(at_us, input)| (at_us + start * tick_us, input)).peekable();
    let mut out = Run {
        ticks: Vec::new(),
        records: Vec::new(),
        log: OriginLog::new(config, 0),
        sent: 0,
        routes: 0,
        cap: replica.engine().buffer_cap(),
    };
    for tick in 0..end_tick {
        // Live, an edge holds the origin's lines up to the tick the origin ran last; a late
        // one holds the whole log up to its start.
        let held = tick.max(start);
        while let Some(line) = lines.next_if(|line| line.tick() <= held) {
            replica.line(line).expect("in order");
        }
        while let Some((at_us, input)) = local.next_if(|(at_us, _)| at_us.div_ceil(tick_us) <= tick) {
            // Behind a late origin, the edge's own inputs are stamped when it takes them, at
            // its tick's time: later than the origin's inputs of the same tick.
            let at_us = if late { tick * tick_us } else { at_us };
            replica.local(at_us, input.clone()).expect("a listener's input");
        }
        let output = replica.tick().expect("the origin is past this tick");
        let engine = replica.engine();
        out.sent += output.packets.len() as u64;
        out.routes += output.events.iter().filter(|e| matches!(e, Event::Route { .. })).count() as u64;
        out.ticks.push((utterance_events(&output.events), engine.buffer_bytes()));
        out.cap = out.cap.max(engine.buffer_cap());
        assert!(engine.buffer_bytes() <= engine.buffer_cap(), "tick {tick}: over the cap");
        assert_eq!(engine.buffer_bytes(), engine.audit_buffer_bytes(), "tick {tick}: the ledger is off");
        replica.recycle(output);
    }
    out
}

fn rename(name: &Name, edge: &str) -> Name {
    Name::from(format!("{name}@{edge}"))
}

/// An edge's own audience: the listeners of another generated room over the same speakers
/// (other seed: other joins, preferences, skips, likes, pauses, leaves), renamed into the
/// edge's namespace so they never take an origin peer's name.
pub fn edge_audience(options: &GenerateOptions, seed: u64, edge: &str) -> Vec<(u64, Input)> {
    let (_, events) = generate_events(&GenerateOptions { seed, ..options.clone() });
    let is_listener = |peer: &Name| peer.starts_with('l');
    events
        .into_iter()
        .filter_map(|(at_us, input)| {
            let input = match input {
                Input::Join { peer, uid, roles } if is_listener(&peer) => {
                    Input::Join { peer: rename(&peer, edge), uid, roles }
                }
                Input::Leave { peer } if is_listener(&peer) => Input::Leave { peer: rename(&peer, edge) },
                input if input.is_speaker_side() => return None,
                Input::Listen { peer } if is_listener(&peer) => Input::Listen { peer: rename(&peer, edge) },
                Input::Unlisten { peer } if is_listener(&peer) => Input::Unlisten { peer: rename(&peer, edge) },
                Input::Pause { peer } if is_listener(&peer) => Input::Pause { peer: rename(&peer, edge) },
                Input::Resume { peer } if is_listener(&peer) => Input::Resume { peer: rename(&peer, edge) },
                Input::Prefs { peer, follow, mute } if is_listener(&peer) => {
                    Input::Prefs { peer: rename(&peer, edge), follow, mute }
                }
                Input::Feedback { peer, utterance, signal } if is_listener(&peer) => {
                    Input::Feedback { peer: rename(&peer, edge), utterance, signal }
                }
                Input::Nack { peer, media, seqs } if is_listener(&peer) => {
                    Input::Nack { peer: rename(&peer, edge), media, seqs }
                }
                Input::KeyframeRequest { peer } if is_listener(&peer) => {
                    Input::KeyframeRequest { peer: rename(&peer, edge) }
                }
                _ => return None,
            };
            Some((at_us, input))
        })
        .collect()
}

struct Outcome {
    origin: Run,
    edges: Vec<Run>,
}

/// An origin and two edges with audiences of their own (edge `b` larger than the origin's).
fn replicate(options: &GenerateOptions, origin_extra: &[(u64, Input)], replica: bool, late: bool) -> Outcome {
    let (_, mut origin_inputs) = generate_events(options);
    origin_inputs.extend_from_slice(origin_extra);
    origin_inputs.sort_by_key(|(at_us, _)| *at_us);
    let end_tick = (options.seconds * 1_000_000 + 2_000_000) / options.config.tick_us();
    let origin = run(Engine::new(options.config.clone()).expect("valid"), &origin_inputs, None, end_tick, late);
    let audiences = [
        edge_audience(options, options.seed + 100, "a"),
        edge_audience(
            &GenerateOptions { listeners: options.listeners * 3, ..options.clone() },
            options.seed + 200,
            "b",
        ),
    ];
    let edges = audiences
        .iter()
        .enumerate()
        .map(|(e, audience)| {
            if replica {
                // Edge b starts 15 s into the room, from the log.
                let start = if e == 1 { 15_000_000 / options.config.tick_us() } else { 0 };
                run_edge(&options.config, &origin.log, audience, start, end_tick, late)
            } else {
                // The same inputs straight into an engine that chooses its own evictions.
                let engine = Engine::new(options.config.clone()).expect("valid");
                run(engine, audience, Some(&origin.records), end_tick, false)
            }
        })
        .collect();
    Outcome { origin, edges }
}

fn assert_same_utterances(outcome: &Outcome) {
    let orders: Vec<&EvictOrder> = outcome.origin.records.iter().flat_map(|r| &r.orders).collect();
    let prerolls = orders.iter().filter(|o| matches!(o, EvictOrder::PreRoll { .. })).count();
    let events: usize = outcome.origin.ticks.iter().map(|(events, _)| events.len()).sum();
    println!(
        "origin: {events} utterance events, {} whole and {} partial evictions, {prerolls} pre-roll orders; \
         sent to listeners: origin {}, edges {:?}; relay stream {} lines, {} bytes",
        count(&outcome.origin, true),
        count(&outcome.origin, false),
        outcome.origin.sent,
        outcome.edges.iter().map(|edge| edge.sent).collect::<Vec<_>>(),
        outcome.origin.log.len(),
        outcome.origin.log.bytes(),
    );
    for (e, edge) in outcome.edges.iter().enumerate() {
        assert!(edge.sent > 0 && edge.routes > 0, "edge {e}'s own listeners hear nothing");
        assert_ne!(edge.sent, outcome.origin.sent, "edge {e}'s listeners should differ from the origin's");
        assert_eq!(edge.ticks.len(), outcome.origin.ticks.len());
        for (tick, (origin, edge)) in outcome.origin.ticks.iter().zip(&edge.ticks).enumerate() {
            assert_eq!(origin, edge, "edge {e}, tick {tick}: utterance events or buffer bytes differ");
        }
    }
}

fn count(run: &Run, whole: bool) -> usize {
    run.ticks
        .iter()
        .flat_map(|(events, _)| events)
        .filter(|e| matches!(e, Event::Evict { whole: w, .. } if *w == whole))
        .count()
}

pub fn options(seed: u64, cap: u64) -> GenerateOptions {
    GenerateOptions {
        speakers: 4,
        listeners: 6,
        seconds: 40,
        seed,
        video: true,
        config: EngineConfig { buffer_max_bytes: cap, ..EngineConfig::default() },
        ..GenerateOptions::default()
    }
}

#[test]
fn edges_with_their_own_listeners_make_the_origins_utterances() {
    for seed in [1, 2] {
        let outcome = replicate(&options(seed, EngineConfig::default().buffer_max_bytes), &[], true, false);
        let starts =
            outcome.origin.ticks.iter().flat_map(|(e, _)| e).filter(|e| matches!(e, Event::UtteranceStart { .. }));
        assert!(starts.count() > 20, "seed {seed}: the room should talk");
        assert_same_utterances(&outcome);
    }
}

#[test]
fn edges_follow_the_origins_evictions_under_a_small_cap_and_a_changing_share() {
    // A buffer far too small for 40 s of four speakers with video: every eviction step runs
    // (whole utterances, trims of played and unplayed ones, pre-roll rings); then the
    // origin's share shrinks and grows again mid-room.
    let shares =
        [(12_000_000, Input::BufferShare { bytes: 150_000 }), (25_000_000, Input::BufferShare { bytes: 400_000 })];
    let outcome = replicate(&options(3, 300_000), &shares, true, false);
    assert!(count(&outcome.origin, true) > 5 && count(&outcome.origin, false) > 5, "the cap should bite");
    assert_eq!(outcome.origin.cap, 400_000);
    assert_same_utterances(&outcome);
}

#[test]
fn an_edge_that_chose_its_own_evictions_would_diverge() {
    // Why eviction replicates as the origin's orders: the same inputs with the edge choosing
    // by its own listeners give another buffer, and with it other evictions.
    let outcome = replicate(&options(3, 300_000), &[], false, false);
    let diverged = outcome
        .edges
        .iter()
        .any(|edge| outcome.origin.ticks.iter().zip(&edge.ticks).any(|(origin, edge)| origin != edge));
    assert!(diverged, "the edges' own eviction happened to agree: this test no longer shows the need");
}

#[test]
fn edges_follow_the_origin_down_to_its_pre_roll_rings() {
    // A cap so small that whole open utterances and the silent tracks' pre-roll rings go
    // too (steps 6 and 7): a speaker still talking continues in a new utterance, on the
    // edges as on the origin.
    let outcome = replicate(&GenerateOptions { video: false, ..options(4, 6_000) }, &[], true, false);
    let prerolls = outcome.origin.records.iter().flat_map(|r| &r.orders);
    assert!(prerolls.filter(|o| matches!(o, EvictOrder::PreRoll { .. })).count() > 0);
    assert_same_utterances(&outcome);
}

#[test]
fn edges_follow_an_origin_whose_worker_falls_behind() {
    // The origin takes inputs ticks after they arrived, keeping their arrival times; the
    // edges stamp their own listeners' inputs at the tick, later than those. A replica that
    // held the origin's times to its own last input (`Engine::push`) would move speakers'
    // packets later and open utterances at other times.
    for cap in [EngineConfig::default().buffer_max_bytes, 300_000] {
        let outcome = replicate(&options(5, cap), &[], true, true);
        assert_same_utterances(&outcome);
    }
}
