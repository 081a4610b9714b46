//! Shared helpers: replaying scenario files and generated rooms into traces.

use std::path::{Path, PathBuf};

use encore::generate::{GenerateOptions, generate_in_memory};
use encore::replay::{DEFAULT_DRAIN_US, ReplaySummary, Ticking, replay, replay_observed};
use encore::scenario::ScenarioReader;
use encore::trace::TraceWriter;

pub fn scenarios_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios")
}

/// Every hand-made scenario, in name order.
pub fn scenario_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(scenarios_dir())
        .expect("scenarios/ exists")
        .map(|entry| entry.expect("readable entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "jsonl"))
        .collect();
    files.sort();
    files
}

/// Replays a scenario file and returns its trace.
pub fn replay_file(path: &Path, packets: bool) -> (String, ReplaySummary) {
    let (header, mut reader) = ScenarioReader::open(path).unwrap_or_else(|e| panic!("{e}"));
    let mut trace = TraceWriter::new(Vec::new(), &header, packets).expect("writing to memory");
    let summary = replay(&header, &mut reader, Some(&mut trace), DEFAULT_DRAIN_US).unwrap_or_else(|e| panic!("{e}"));
    (String::from_utf8(trace.into_inner()).expect("traces are UTF-8"), summary)
}

/// Replays scenario bytes with packets, moving the clock as `ticking` says; returns the trace
/// and the ticks run.
pub fn replay_ticking(name: &str, bytes: &[u8], ticking: Ticking) -> (String, u64) {
    let (header, mut reader) = ScenarioReader::new(name.into(), bytes).unwrap_or_else(|e| panic!("{e}"));
    let mut trace = TraceWriter::new(Vec::new(), &header, true).expect("writing to memory");
    let summary =
        replay_observed(&header, &mut reader, &mut trace, DEFAULT_DRAIN_US, ticking).unwrap_or_else(|e| panic!("{e}"));
    (String::from_utf8(trace.into_inner()).expect("traces are UTF-8"), summary.ticks)
}

/// Replays scenario bytes and returns the trace.
pub fn replay_bytes(name: &str, bytes: &[u8], packets: bool) -> String {
    let (header, mut reader) = ScenarioReader::new(name.into(), bytes).unwrap_or_else(|e| panic!("{e}"));
    let mut trace = TraceWriter::new(Vec::new(), &header, packets).expect("writing to memory");
    replay(&header, &mut reader, Some(&mut trace), DEFAULT_DRAIN_US).unwrap_or_else(|e| panic!("{e}"));
    String::from_utf8(trace.into_inner()).expect("traces are UTF-8")
}

pub fn generated(options: &GenerateOptions) -> Vec<u8> {
    generate_in_memory(options)
}

/// The trace's lines parsed as JSON, header excluded.
pub fn lines(trace: &str) -> Vec<serde_json::Value> {
    trace.lines().skip(1).map(|line| serde_json::from_str(line).expect("trace lines are JSON")).collect()
}
