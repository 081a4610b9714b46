//! Headless replay: a scenario through the engine as fast as it goes.

use std::io::{self, BufRead, Write};
use std::time::{Duration, Instant};

use encore_systems::components::TickOutput;
use encore_systems::components::output::Event;
use encore_systems::{Engine, EngineError};

use crate::scenario::{ScenarioError, ScenarioEvent, ScenarioHeader, ScenarioReader};
use crate::trace::TraceWriter;
use encore_systems::stats::STATS_INTERVAL_US;

/// Sees a replay go by: every input as it is pushed, every tick's output.
pub trait ReplayObserver {
    fn input(&mut self, _event: &ScenarioEvent) {}
    fn tick(&mut self, engine: &Engine, output: &TickOutput) -> io::Result<()>;
    fn finish(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Watches nothing.
pub struct NoObserver;

impl ReplayObserver for NoObserver {
    fn tick(&mut self, _: &Engine, _: &TickOutput) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write> ReplayObserver for TraceWriter<W> {
    fn tick(&mut self, engine: &Engine, output: &TickOutput) -> io::Result<()> {
        TraceWriter::tick(self, engine, output)
    }

    fn finish(&mut self) -> io::Result<()> {
        self.flush()
    }
}

/// How replay moves the engine's clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ticking {
    /// Every tick runs, quiet or not.
    EveryTick,
    /// A quiet engine passes over the ticks where nothing is due (as the server's rooms
    /// sleep): the same trace, fewer ticks.
    SkipQuiet,
}

/// How long replay goes on after the last input, at most, waiting for the room to go quiet.
pub const DEFAULT_DRAIN_US: u64 = 60_000_000;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("writing the trace: {0}")]
    Trace(#[from] std::io::Error),
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReplaySummary {
    pub ticks: u64,
    pub engine_us: u64,
    pub inputs: u64,
    pub utterances: u64,
    pub route_changes: u64,
    pub evictions: u64,
    pub peak_buffer_bytes: u64,
    pub buffer_cap_bytes: u64,
    pub sent_packets: u64,
    pub retransmitted: u64,
    pub dropped: u64,
    pub wall: Duration,
}

impl ReplaySummary {
    /// Engine time over wall time.
    pub fn speed(&self) -> f64 {
        self.engine_us as f64 / 1e6 / self.wall.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for ReplaySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "engine time    {:.2} s in {} ticks", self.engine_us as f64 / 1e6, self.ticks)?;
        writeln!(f, "inputs         {}", self.inputs)?;
        writeln!(f, "utterances     {}", self.utterances)?;
        writeln!(f, "route changes  {}", self.route_changes)?;
        writeln!(f, "evictions      {}", self.evictions)?;
        writeln!(f, "peak buffer    {} bytes (cap {})", self.peak_buffer_bytes, self.buffer_cap_bytes)?;
        writeln!(f, "sent packets   {} (+{} retransmitted)", self.sent_packets, self.retransmitted)?;
        writeln!(f, "dropped inputs {}", self.dropped)?;
        write!(f, "replay speed   {:.1}x real time ({:.3} s wall)", self.speed(), self.wall.as_secs_f64())
    }
}

/// Runs every event of `reader` through a fresh engine, writing the trace to `trace`.
/// After the last input, replay ends at the first stats tick (a whole second) at which the
/// room is quiet (no open utterance, nobody playing), at the header's `end_us` if it has
/// one, and at most `drain_us` after the last input.
pub fn replay<R: BufRead, W: Write>(
    header: &ScenarioHeader,
    reader: &mut ScenarioReader<R>,
    trace: Option<&mut TraceWriter<W>>,
    drain_us: u64,
) -> Result<ReplaySummary, ReplayError> {
    match trace {
        Some(trace) => replay_observed(header, reader, trace, drain_us, Ticking::SkipQuiet),
        None => replay_observed(header, reader, &mut NoObserver, drain_us, Ticking::SkipQuiet),
    }
}

/// [`replay`], with an observer of every input and tick.
pub fn replay_observed<R: BufRead>(
    header: &ScenarioHeader,
    reader: &mut ScenarioReader<R>,
    observer: &mut impl ReplayObserver,
    drain_us: u64,
    ticking: Ticking,
) -> Result<ReplaySummary, ReplayError> {
    let started = Instant::now();
    let mut engine = Engine::new(header.config.clone())?;
    // Nothing here reads payloads; sharing them costs a reference count per packet.
    engine.set_payloads(false);
    let tick_us = engine.tick_us();
    let mut summary = ReplaySummary { buffer_cap_bytes: engine.buffer_cap(), ..ReplaySummary::default() };
    let mut next = reader.next_event().transpose()?;
    let mut last_input_us = 0;
    loop {
        if ticking == Ticking::SkipQuiet {
            // The next tick anything can happen at: something due, the next input, the end.
            let until = match &next {
                Some(event) => event.tick_for(tick_us),
                None => match header.end_us {
                    Some(end_us) => end_us.div_ceil(tick_us),
                    None => (last_input_us + drain_us).div_ceil(tick_us),
                },
            };
            let target = engine.next_due_tick().min(until);
            engine.skip_to(target);
        }
        let tick = engine.next_tick();
        while let Some(event) = next.take_if(|event| event.tick_for(tick_us) <= tick) {
            last_input_us = event.at_us;
            summary.inputs += 1;
            observer.input(&event);
            engine.push(event.at_us, event.input);
            next = reader.next_event().transpose()?;
        }
        let output = engine.tick();
        let now_us = output.now_us;
        for event in &output.events {
            match event {
                Event::UtteranceStart { .. } => summary.utterances += 1,
                Event::Route { .. } => summary.route_changes += 1,
                Event::Evict { .. } => summary.evictions += 1,
                _ => {}
            }
        }
        for packet in &output.packets {
            if packet.retransmit {
                summary.retransmitted += 1;
            } else {
                summary.sent_packets += 1;
            }
        }
        observer.tick(&engine, &output)?;
        // Give the vectors back so the next tick reuses them.
        engine.recycle(output);
        summary.peak_buffer_bytes = summary.peak_buffer_bytes.max(engine.buffer_bytes());
        summary.ticks += 1;
        summary.engine_us = now_us;
        if next.is_none() {
            let ended = match header.end_us {
                Some(end_us) => now_us >= end_us,
                // Quiet rooms end on a stats tick, so the trace's last stats line counts
                // everything.
                None => now_us >= last_input_us + drain_us || (now_us % STATS_INTERVAL_US == 0 && engine.is_quiet()),
            };
            if ended {
                break;
            }
        }
    }
    summary.dropped = engine.counters().drops.total();
    summary.wall = started.elapsed();
    observer.finish()?;
    Ok(summary)
}
