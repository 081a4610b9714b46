//! Same scenario, same binary: the same trace, byte for byte, run after run and whatever
//! thread runs it.

use std::collections::BTreeSet;
use std::thread;

use encore::Engine;
use encore::components::{Input, Policy, TickOutput};
use encore::generate::GenerateOptions;
use encore::replay::{DEFAULT_DRAIN_US, ReplayObserver, Ticking, replay_observed};
use encore::scenario::{ScenarioEvent, ScenarioReader};
use encore::trace::TraceWriter;

use super::support::{generated, replay_bytes, replay_file, replay_ticking, scenario_files};

#[test]
fn every_scenario_replays_to_byte_identical_traces_with_packets() {
    for path in scenario_files() {
        let (first, _) = replay_file(&path, true);
        let (second, _) = replay_file(&path, true);
        assert!(first == second, "{} replayed differently", path.display());
        assert!(first.contains(r#""kind":"send""#), "{} sent nothing", path.display());
    }
}

#[test]
fn replays_on_other_threads_at_once_match_the_one_on_this_thread() {
    let options =
        GenerateOptions { speakers: 4, listeners: 12, seconds: 30, seed: 7, video: true, ..Default::default() };
    let scenario = generated(&options);
    let here = replay_bytes("generated", &scenario, true);
    let others: Vec<String> = thread::scope(|scope| {
        let handles: Vec<_> = (0..4).map(|_| scope.spawn(|| replay_bytes("generated", &scenario, true))).collect();
        handles.into_iter().map(|h| h.join().expect("replay thread")).collect()
    });
    for other in others {
        assert!(other == here, "a replay on another thread differed");
    }
}

/// A quiet room passes over the ticks where nothing is due (the server's idle rooms sleep):
/// its decisions must be those of ticking through them, packet for packet.
#[test]
fn skipping_quiet_ticks_gives_the_trace_of_ticking_every_tick() {
    let mut inputs: Vec<(String, Vec<u8>)> = scenario_files()
        .into_iter()
        .map(|path| (path.display().to_string(), std::fs::read(&path).expect("scenario file")))
        .collect();
    // Generated rooms under every policy, with dominant-speaker events: the learn and
    // dominant-speaker systems have work of their own that a skip must not pass over.
    for policy in Policy::ALL {
        let mut options = GenerateOptions { speakers: 3, listeners: 5, seconds: 40, seed: 11, ..Default::default() };
        options.config.recommender.policy = policy;
        options.config.dominant_speaker.events = Some(true);
        inputs.push((format!("generated ({policy})"), generated(&options)));
    }
    let mut skipped_somewhere = false;
    for (name, bytes) in &inputs {
        let (every, every_ticks) = replay_ticking(name, bytes, Ticking::EveryTick);
        let (skip, skip_ticks) = replay_ticking(name, bytes, Ticking::SkipQuiet);
        if every != skip {
            let at = every.lines().zip(skip.lines()).position(|(a, b)| a != b);
            let line = |trace: &str| at.and_then(|i| trace.lines().nth(i)).unwrap_or("(ended)").to_owned();
            panic!(
                "{name}: the traces part at line {at:?}:\n every tick: {}\n skip quiet: {}",
                line(&every),
                line(&skip)
            );
        }
        assert!(skip_ticks <= every_ticks, "{name}");
        skipped_somewhere |= skip_ticks < every_ticks;
    }
    assert!(skipped_somewhere, "no scenario had a quiet stretch to skip");
}

/// Asks every listener's queue of what comes next after every tick, and writes the trace.
struct AskingObserver {
    trace: TraceWriter<Vec<u8>>,
    listeners: BTreeSet<String>,
    queued: usize,
    heads: usize,
}

impl ReplayObserver for AskingObserver {
    fn input(&mut self, event: &ScenarioEvent) {
        if let Input::Listen { peer } = &event.input {
            self.listeners.insert(peer.to_string());
        }
    }

    fn tick(&mut self, engine: &Engine, output: &TickOutput) -> std::io::Result<()> {
        for listener in &self.listeners {
            if let Some(queue) = engine.up_next(listener, 5) {
                self.queued += queue.len();
                self.heads += usize::from(!queue.is_empty());
            }
        }
        ReplayObserver::tick(&mut self.trace, engine, output)
    }

    fn finish(&mut self) -> std::io::Result<()> {
        ReplayObserver::finish(&mut self.trace)
    }
}

/// The queue of what a listener will hear next is a read: asking every listener's after every
/// tick leaves the trace byte for byte as it was, under every policy.
#[test]
fn asking_what_comes_next_every_tick_changes_nothing() {
    for policy in Policy::ALL {
        let mut options = GenerateOptions { speakers: 4, listeners: 8, seconds: 30, seed: 5, ..Default::default() };
        options.config.recommender.policy = policy;
        let name = format!("generated ({policy})");
        let bytes = generated(&options);
        let (plain, _) = replay_ticking(&name, &bytes, Ticking::EveryTick);
        let (header, mut reader) = ScenarioReader::new(name.clone(), &bytes[..]).expect("scenario");
        let trace = TraceWriter::new(Vec::new(), &header, true).expect("writing to memory");
        let mut asking = AskingObserver { trace, listeners: BTreeSet::new(), queued: 0, heads: 0 };
        replay_observed(&header, &mut reader, &mut asking, DEFAULT_DRAIN_US, Ticking::EveryTick).expect("replay");
        assert!(asking.heads > 1000 && asking.queued > asking.heads, "{name}: {} {}", asking.heads, asking.queued);
        let asked = String::from_utf8(asking.trace.into_inner()).expect("UTF-8");
        assert!(asked == plain, "{name}: asking what comes next changed the trace");
    }
}
