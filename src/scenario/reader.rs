//! Reading a scenario: the header, then its events in order, generator lines expanded.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use super::generators::{TrackCounter, expand};
use super::{Line, ScenarioError, ScenarioEvent, ScenarioHeader, parse_line};

/// Streams a scenario's events, checking the format as it goes and expanding generator
/// lines. Events come out in the order of their arrival time, then of the file.
pub struct ScenarioReader<R> {
    path: String,
    lines: R,
    line_no: usize,
    tick_us: u64,
    last_at_us: u64,
    last_tick: u64,
    buffer: String,
    eof: bool,
    /// Events read but not yet given out, by (arrival, order in the file).
    queue: BTreeMap<(u64, u64), ScenarioEvent>,
    produced: u64,
    counters: HashMap<String, TrackCounter>,
}

impl ScenarioReader<BufReader<File>> {
    /// Opens a scenario file and reads its header.
    pub fn open(path: &Path) -> Result<(ScenarioHeader, Self), ScenarioError> {
        let display = path.display().to_string();
        let file = File::open(path).map_err(|source| ScenarioError::Io { path: display.clone(), source })?;
        ScenarioReader::new(display, BufReader::new(file))
    }
}

impl<R: BufRead> ScenarioReader<R> {
    /// Reads the header from `lines`; `path` names the source in errors.
    pub fn new(path: String, mut lines: R) -> Result<(ScenarioHeader, Self), ScenarioError> {
        let mut buffer = String::new();
        let mut line_no = 0;
        loop {
            buffer.clear();
            line_no += 1;
            let read =
                lines.read_line(&mut buffer).map_err(|source| ScenarioError::Io { path: path.clone(), source })?;
            if read == 0 {
                return Err(ScenarioError::Empty { path });
            }
            if !buffer.trim().is_empty() {
                break;
            }
        }
        let header = ScenarioHeader::parse(buffer.trim()).map_err(|message| ScenarioError::Line {
            path: path.clone(),
            line: line_no,
            message,
        })?;
        let tick_us = header.config.tick_us();
        let reader = ScenarioReader {
            path,
            lines,
            line_no,
            tick_us,
            last_at_us: 0,
            last_tick: 0,
            buffer,
            eof: false,
            queue: Default::default(),
            produced: 0,
            counters: Default::default(),
        };
        Ok((header, reader))
    }

    /// The next event, `None` at the end.
    pub fn next_event(&mut self) -> Option<Result<ScenarioEvent, ScenarioError>> {
        loop {
            // Lines come in arrival order and generate nothing earlier than their own time,
            // so a queued event is final once the file has reached its time.
            if let Some((&(at_us, _), _)) = self.queue.first_key_value()
                && (self.eof || self.last_at_us >= at_us)
            {
                return self.queue.pop_first().map(|(_, event)| Ok(event));
            }
            if self.eof {
                return None;
            }
            if let Err(error) = self.read_line() {
                self.eof = true;
                return Some(Err(error));
            }
        }
    }

    /// Reads the next non-empty line into the queue (or notes the end of the file).
    fn read_line(&mut self) -> Result<(), ScenarioError> {
        loop {
            self.buffer.clear();
            self.line_no += 1;
            let read = self
                .lines
                .read_line(&mut self.buffer)
                .map_err(|source| ScenarioError::Io { path: self.path.clone(), source })?;
            if read == 0 {
                self.eof = true;
                return Ok(());
            }
            let text = self.buffer.trim();
            if text.is_empty() {
                continue;
            }
            let events = parse_line(text).and_then(|line| self.accept(line));
            let events = events.map_err(|message| ScenarioError::Line {
                path: self.path.clone(),
                line: self.line_no,
                message,
            })?;
            for event in events {
                self.queue.insert((event.at_us, self.produced), event);
                self.produced += 1;
            }
            return Ok(());
        }
    }

    fn accept(&mut self, line: Line) -> Result<Vec<ScenarioEvent>, String> {
        let (at_us, tick) = match &line {
            Line::Event(event) => (event.at_us, event.tick),
            Line::Generator(at_us, tick, _) => (*at_us, *tick),
        };
        if at_us < self.last_at_us {
            return Err(format!("`at_us` goes backwards: {at_us} after {}", self.last_at_us));
        }
        if let Some(recorded) = tick
            && recorded * self.tick_us < at_us
        {
            return Err(format!("tick {recorded} runs before the event arrived at {at_us} us"));
        }
        let effective = tick.unwrap_or_else(|| at_us.div_ceil(self.tick_us));
        if effective < self.last_tick {
            return Err(format!("tick {effective} goes backwards (after tick {})", self.last_tick));
        }
        self.last_at_us = at_us;
        self.last_tick = effective;
        match line {
            Line::Event(event) => Ok(vec![event]),
            Line::Generator(_, Some(_), _) => Err("a generator event cannot carry a recorded `tick`".into()),
            Line::Generator(at_us, None, generator) => expand(generator, at_us, &mut self.counters),
        }
    }
}
