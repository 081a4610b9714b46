//! Trace files: what the engine decided, as JSON Lines (documented in
//! `docs/trace-format.md`). The first line is `{"encore_trace":1,...}`; then, tick by tick,
//! the tick's events in the order they were made, then (with `packets`) one `send` line per
//! packet sent. Every line starts with `tick` and `at_us`.

use std::fmt::Write as _;
use std::io::{self, Write};

use serde_json::{Map, Value};

use encore_systems::Engine;
use encore_systems::components::output::{Event, SendPacket, TickOutput};

use crate::scenario::ScenarioHeader;

pub const TRACE_VERSION: u64 = 1;

/// The header line (without a newline).
pub fn header_line(header: &ScenarioHeader) -> String {
    let mut map = Map::new();
    map.insert("encore_trace".into(), TRACE_VERSION.into());
    if let Some(name) = &header.name {
        map.insert("scenario".into(), name.clone().into());
    }
    map.insert("tick_ms".into(), header.tick_ms.into());
    map.insert("config".into(), serde_json::to_value(&header.config).unwrap_or(Value::Null));
    Value::Object(map).to_string()
}

/// One event as a trace line (without a newline).
pub fn event_line(tick: u64, at_us: u64, event: &Event) -> String {
    let json = serde_json::to_string(event).unwrap_or_else(|e| format!(r#"{{"kind":"unserialisable","error":"{e}"}}"#));
    // `json` is an object: splice the tick and time in front of its fields.
    format!(r#"{{"tick":{tick},"at_us":{at_us},{}"#, &json[1..])
}

/// One sent packet as a trace line (without a newline).
pub fn send_line(out: &mut String, tick: u64, at_us: u64, listener: &str, utterance: &str, packet: &SendPacket) {
    let _ = write!(
        out,
        r#"{{"tick":{tick},"at_us":{at_us},"kind":"send","listener":{},"media":"{}","utterance":{},"src_seq":{},"seq":{},"ts":{},"ssrc":{},"marker":{},"keyframe":{},"retransmit":{}}}"#,
        Value::from(listener),
        packet.media.as_str(),
        Value::from(utterance),
        packet.src_seq,
        packet.seq,
        packet.ts,
        packet.ssrc,
        packet.marker,
        packet.keyframe,
        packet.retransmit,
    );
}

/// Writes a trace, tick by tick.
pub struct TraceWriter<W: Write> {
    out: W,
    packets: bool,
    line: String,
}

impl<W: Write> TraceWriter<W> {
    pub fn new(mut out: W, header: &ScenarioHeader, packets: bool) -> io::Result<Self> {
        writeln!(out, "{}", header_line(header))?;
        Ok(TraceWriter { out, packets, line: String::new() })
    }

    pub fn tick(&mut self, engine: &Engine, output: &TickOutput) -> io::Result<()> {
        for event in &output.events {
            writeln!(self.out, "{}", event_line(output.tick, output.now_us, event))?;
        }
        if self.packets {
            for packet in &output.packets {
                let listener = engine.peer_name(packet.listener).map_or("?", |n| n.as_str());
                let utterance = engine.utterance_id(packet.utterance).map(|id| id.to_string()).unwrap_or_default();
                self.line.clear();
                send_line(&mut self.line, output.tick, output.now_us, listener, &utterance, packet);
                self.line.push('\n');
                self.out.write_all(self.line.as_bytes())?;
            }
        }
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}
