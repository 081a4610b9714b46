//! Writing a scenario: the header, then one line per input.

use std::io::{self, Write};

use encore_systems::components::input::Input;

use super::{ScenarioHeader, event_line};

/// Writes a scenario: the header, then events.
pub struct ScenarioWriter<W: Write> {
    out: W,
}

impl<W: Write> ScenarioWriter<W> {
    pub fn new(mut out: W, header: &ScenarioHeader) -> io::Result<Self> {
        writeln!(out, "{}", header.to_line())?;
        Ok(ScenarioWriter { out })
    }

    pub fn event(&mut self, at_us: u64, tick: Option<u64>, input: &Input) -> io::Result<()> {
        writeln!(self.out, "{}", event_line(at_us, tick, input))
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}
