//! Scenario files: the engine's inputs as JSON Lines, read and written by the same code in
//! the CLI, the tests and the live recorder. The format is documented in
//! `docs/scenario-format.md`.
//!
//! A scenario is a header line, `{"encore_scenario":1,"tick_ms":10,"config":{...}}`, then
//! one event per line with a non-decreasing `at_us` and a `kind`. An event line is an
//! [`Input`] in its serde form (derived once, in the engine's components) plus its `at_us`
//! and, in live recordings, the `tick` that consumed it; or a generator line
//! ([`generators`]). A line that does not parse or breaks the format is an error naming the
//! file and the line: replay stops there rather than run something other than what was
//! recorded.

pub mod generators;
mod reader;
mod writer;

use std::io;

use serde::Deserialize;
use serde_json::{Map, Value};

use encore_systems::components::config::{EngineConfig, PlayoutConfig, Policy};
use encore_systems::components::input::Input;

pub use encore_systems::components::input::filler_payload;
pub use reader::ScenarioReader;
pub use writer::ScenarioWriter;

use generators::{GENERATOR_KINDS, Generator};

pub const SCENARIO_VERSION: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{path}:{line}: {message}")]
    Line { path: String, line: usize, message: String },
    #[error("{path}: the file is empty; a scenario starts with a header line")]
    Empty { path: String },
}

/// The first line of a scenario.
#[derive(Clone, Debug, PartialEq)]
pub struct ScenarioHeader {
    pub tick_ms: u64,
    /// The engine configuration: defaults overridden by the header's `config`.
    pub config: EngineConfig,
    pub name: Option<String>,
    pub description: Option<String>,
    /// Run at least until this engine time, even when the room is quiet earlier.
    pub end_us: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    encore_scenario: u64,
    tick_ms: Option<u64>,
    #[serde(default)]
    config: Option<Value>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    end_us: Option<u64>,
}

/// A configuration written before a setting existed ran, and replays with, the behaviour from
/// before it: without `recommender.policy` the `rules` policy, without `playout`
/// [`PlayoutConfig::LEGACY`] (pauses kept, switches at once).
fn fill_legacy_defaults(config: &mut Value) {
    let Value::Object(config) = config else { return };
    if !config.contains_key("playout")
        && let Ok(legacy) = serde_json::to_value(PlayoutConfig::LEGACY)
    {
        config.insert("playout".to_owned(), legacy);
    }
    let recommender = config.entry("recommender").or_insert_with(|| Value::Object(Default::default()));
    if let Value::Object(recommender) = recommender {
        recommender.entry("policy").or_insert_with(|| Value::from(Policy::Rules.as_str()));
    }
}

impl ScenarioHeader {
    pub fn new(config: EngineConfig) -> Self {
        ScenarioHeader { tick_ms: config.tick_ms, config, name: None, description: None, end_us: None }
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let raw: RawHeader = serde_json::from_str(text).map_err(|e| format!("bad header: {e}"))?;
        if raw.encore_scenario != SCENARIO_VERSION {
            return Err(format!(
                "unsupported scenario version {} (this build reads version {SCENARIO_VERSION})",
                raw.encore_scenario
            ));
        }
        let mut config: EngineConfig = match raw.config {
            Some(mut value) => {
                fill_legacy_defaults(&mut value);
                serde_json::from_value(value).map_err(|e| format!("bad config: {e}"))?
            }
            None => {
                let mut config = EngineConfig::default();
                config.recommender.policy = Policy::Rules;
                config.playout = PlayoutConfig::LEGACY;
                config
            }
        };
        if let Some(tick_ms) = raw.tick_ms {
            config.tick_ms = tick_ms;
        }
        config.validate().map_err(|e| e.to_string())?;
        Ok(ScenarioHeader {
            tick_ms: config.tick_ms,
            config,
            name: raw.name,
            description: raw.description,
            end_us: raw.end_us,
        })
    }

    /// The header line (without a newline). The whole effective configuration is written, so
    /// a recording replays the same whatever the defaults of a later build.
    pub fn to_line(&self) -> String {
        let mut map = Map::new();
        map.insert("encore_scenario".into(), SCENARIO_VERSION.into());
        map.insert("tick_ms".into(), self.tick_ms.into());
        if let Some(name) = &self.name {
            map.insert("name".into(), name.clone().into());
        }
        if let Some(description) = &self.description {
            map.insert("description".into(), description.clone().into());
        }
        if let Some(end_us) = self.end_us {
            map.insert("end_us".into(), end_us.into());
        }
        map.insert("config".into(), serde_json::to_value(&self.config).unwrap_or(Value::Null));
        Value::Object(map).to_string()
    }
}

/// One input with its arrival time and, in live recordings, the tick that consumed it.
#[derive(Clone, Debug, PartialEq)]
pub struct ScenarioEvent {
    pub at_us: u64,
    pub tick: Option<u64>,
    pub input: Input,
}

impl ScenarioEvent {
    /// The tick that applies this input: the recorded one, or the first tick at or after its
    /// arrival.
    pub fn tick_for(&self, tick_us: u64) -> u64 {
        self.tick.unwrap_or_else(|| self.at_us.div_ceil(tick_us))
    }
}

/// What one line holds: an input, or a generator of inputs.
enum Line {
    Event(ScenarioEvent),
    Generator(u64, Option<u64>, Generator),
}

/// Parses one event line (not the header). Generator lines (`talk`, `silence`, `video`) are
/// refused here: [`ScenarioReader`] expands them.
pub fn parse_event(text: &str) -> Result<ScenarioEvent, String> {
    match parse_line(text)? {
        Line::Event(event) => Ok(event),
        Line::Generator(..) => Err("a generator event stands for many inputs; read it with ScenarioReader".into()),
    }
}

fn parse_line(text: &str) -> Result<Line, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(mut map) = value else {
        return Err("an event must be a JSON object".into());
    };
    let at_us = match map.remove("at_us") {
        Some(Value::Number(n)) => n.as_u64().ok_or("`at_us` must be a non-negative integer")?,
        Some(_) => return Err("`at_us` must be a non-negative integer".into()),
        None => return Err("missing `at_us`".into()),
    };
    let tick = match map.remove("tick") {
        None => None,
        Some(Value::Number(n)) => Some(n.as_u64().ok_or("`tick` must be a non-negative integer")?),
        Some(_) => return Err("`tick` must be a non-negative integer".into()),
    };
    let generator = match map.get("kind") {
        Some(Value::String(kind)) => GENERATOR_KINDS.contains(&kind.as_str()),
        Some(_) => return Err("`kind` must be a string".into()),
        None => return Err("missing `kind`".into()),
    };
    if generator {
        let generator: Generator = serde_json::from_value(Value::Object(map)).map_err(|e| e.to_string())?;
        return Ok(Line::Generator(at_us, tick, generator));
    }
    let input: Input = serde_json::from_value(Value::Object(map)).map_err(|e| {
        let text = e.to_string();
        if text.starts_with("unknown variant") {
            format!("{text}; generator kinds: `talk`, `silence`, `video`")
        } else {
            text
        }
    })?;
    Ok(Line::Event(ScenarioEvent { at_us, tick, input }))
}

/// An input as a scenario line: `at_us`, `tick` (when recorded), then the input's own
/// fields. `rtp` payloads equal to the filler of their size are written as `size` only.
pub fn event_line(at_us: u64, tick: Option<u64>, input: &Input) -> String {
    let mut map = Map::new();
    map.insert("at_us".into(), at_us.into());
    if let Some(tick) = tick {
        map.insert("tick".into(), tick.into());
    }
    match serde_json::to_value(input) {
        Ok(Value::Object(fields)) => map.extend(fields),
        // An input always serialises as an object: the derive says so.
        other => unreachable!("an input serialised as {other:?}"),
    }
    Value::Object(map).to_string()
}

#[cfg(test)]
mod tests;
