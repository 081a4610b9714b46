//! Headless replay: a scenario through the engine as fast as it goes.

use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use encore_systems::components::output::Event;
use encore_systems::{Engine, EngineError};

use crate::scenario::{ScenarioError, ScenarioHeader, ScenarioReader};
use crate::trace::TraceWriter;

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
/// Replay ends after the last input once the room is quiet (no open utterance, nobody
/// playing), at the header's `end_us` if it has one, and at most `drain_us` after the last
/// input.
pub fn replay<R: BufRead, W: Write>(
    header: &ScenarioHeader,
    reader: &mut ScenarioReader<R>,
    mut trace: Option<&mut TraceWriter<W>>,
    drain_us: u64,
) -> Result<ReplaySummary, ReplayError> {
    let started = Instant::now();
    let mut engine = Engine::new(header.config.clone())?;
    let tick_us = engine.tick_us();
    let mut summary = ReplaySummary { buffer_cap_bytes: engine.buffer_cap(), ..ReplaySummary::default() };
    let mut next = reader.next_event().transpose()?;
    let mut last_input_us = 0;
    loop {
        let tick = engine.next_tick();
        while let Some(event) = next.take_if(|event| event.tick_for(tick_us) <= tick) {
            last_input_us = event.at_us;
            summary.inputs += 1;
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
        let output = std::mem::take(output);
        if let Some(trace) = trace.as_deref_mut() {
            trace.tick(&engine, &output)?;
        }
        // Give the vectors back so the next tick reuses them.
        *engine.last_output() = output;
        summary.peak_buffer_bytes = summary.peak_buffer_bytes.max(engine.buffer_bytes());
        summary.ticks += 1;
        summary.engine_us = now_us;
        if next.is_none() {
            let ended = match header.end_us {
                Some(end_us) => now_us >= end_us,
                None => now_us >= last_input_us + drain_us || engine.is_quiet(),
            };
            if ended {
                break;
            }
        }
    }
    summary.dropped = engine.counters().drops.total();
    summary.wall = started.elapsed();
    if let Some(trace) = trace {
        trace.flush()?;
    }
    Ok(summary)
}
