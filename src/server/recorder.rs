//! Recording a live room: its inputs as a scenario, each with the tick that consumed it, and
//! its trace beside it. `encore replay` of the scenario reaches the same decisions, even when
//! the live worker was late, because replay applies every input in its recorded tick.

use std::fs::File;
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};

use encore_systems::Engine;
use encore_systems::components::TickOutput;
use encore_systems::components::config::EngineConfig;
use encore_systems::components::input::Input;

use crate::scenario::{ScenarioHeader, ScenarioWriter};
use crate::trace::TraceWriter;

pub struct Recorder {
    scenario: ScenarioWriter<BufWriter<File>>,
    trace: TraceWriter<BufWriter<File>>,
    pub scenario_path: PathBuf,
    pub trace_path: PathBuf,
}

impl Recorder {
    /// Starts `<dir>/<room>-<stamp>.scenario.jsonl` and `.trace.jsonl`.
    pub fn create(dir: &Path, room: &str, stamp: &str, config: &EngineConfig) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let base = format!("{room}-{stamp}");
        let scenario_path = dir.join(format!("{base}.scenario.jsonl"));
        let trace_path = dir.join(format!("{base}.trace.jsonl"));
        let mut header = ScenarioHeader::new(config.clone());
        header.name = Some(base);
        header.description = Some(format!("recorded live by encore serve, room {room}"));
        let scenario = ScenarioWriter::new(BufWriter::new(File::create(&scenario_path)?), &header)?;
        let trace = TraceWriter::new(BufWriter::new(File::create(&trace_path)?), &header, false)?;
        Ok(Recorder { scenario, trace, scenario_path, trace_path })
    }

    pub fn input(&mut self, at_us: u64, tick: u64, input: &Input) -> io::Result<()> {
        self.scenario.event(at_us, Some(tick), input)
    }

    pub fn tick(&mut self, engine: &Engine, output: &TickOutput) -> io::Result<()> {
        self.trace.tick(engine, output)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.scenario.flush()?;
        self.trace.flush()
    }
}
