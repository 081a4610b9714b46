//! Scenario files: the engine's inputs as JSON Lines, read and written by the same code in
//! the CLI, the tests and the live recorder. The format is documented in
//! `docs/scenario-format.md`.
//!
//! A scenario is a header line, `{"encore_scenario":1,"tick_ms":10,"config":{...}}`, then
//! one event per line with a non-decreasing `at_us` and a `kind`. A line that does not
//! parse or breaks the format is an error naming the file and the line: replay stops
//! there rather than run something other than what was recorded.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;
use serde_json::{Map, Value};

use encore_systems::components::config::EngineConfig;
use encore_systems::components::ids::{MediaKind, Name, Role, UtteranceId};
use encore_systems::components::input::{FeedbackSignal, Input, RtpIn};

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
            Some(value) => serde_json::from_value(value).map_err(|e| format!("bad config: {e}"))?,
            None => EngineConfig::default(),
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

/// The bytes that stand in for an `rtp` event's payload when only its `size` is given.
pub fn filler_payload(seq: u16, size: usize) -> Arc<[u8]> {
    (0..size).map(|i| (seq as usize * 31 + i * 7) as u8).collect()
}

#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum Body {
    Join {
        peer: String,
        #[serde(default)]
        uid: Option<String>,
        #[serde(default)]
        roles: Vec<Role>,
    },
    Leave {
        peer: String,
    },
    Publish {
        peer: String,
        track: String,
        media: MediaKind,
        codec: String,
        clock_rate: u32,
        ssrc: u32,
    },
    Unpublish {
        track: String,
    },
    Subscribe {
        peer: String,
    },
    Unsubscribe {
        peer: String,
    },
    Rtp {
        track: String,
        seq: u16,
        ts: u32,
        #[serde(default)]
        marker: bool,
        #[serde(default)]
        size: Option<usize>,
        #[serde(default)]
        audio_level: Option<u8>,
        #[serde(default)]
        voice: Option<bool>,
        #[serde(default)]
        keyframe: bool,
        #[serde(default)]
        payload: Option<String>,
    },
    Prefs {
        #[serde(default)]
        peer: String,
        #[serde(default)]
        follow: Vec<String>,
        #[serde(default)]
        mute: Vec<String>,
    },
    Feedback {
        peer: String,
        #[serde(default)]
        utterance: Option<UtteranceId>,
        signal: FeedbackSignal,
    },
    Nack {
        peer: String,
        media: MediaKind,
        seqs: Vec<u16>,
    },
    KeyframeRequest {
        peer: String,
    },
}

/// Generator events: one line that stands for many `rtp` events of a track, so that
/// hand-written scenarios stay short and readable. Their packets continue the track's
/// sequence numbers, and their timestamps follow the engine time of the packet.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum Generator {
    /// Voiced audio packets every `frame_ms` for `duration_ms`.
    Talk {
        track: String,
        duration_ms: u64,
        #[serde(default = "defaults::talk_level")]
        level: u8,
        #[serde(default)]
        voice: Option<bool>,
        #[serde(default = "defaults::talk_size")]
        size: usize,
        #[serde(default = "defaults::frame_ms")]
        frame_ms: u64,
        /// Packet indices (from 0) the network loses.
        #[serde(default)]
        lose: Vec<u32>,
        /// Packet indices that arrive twice (the copy 1 ms later).
        #[serde(default)]
        duplicate: Vec<u32>,
        /// `[index, ms]`: the packet arrives this much late, after later ones.
        #[serde(default)]
        late: Vec<(u32, u64)>,
    },
    /// Silence: comfort-noise packets every `frame_ms` at a dither level, or with `dtx`
    /// one 3-byte packet at level 127 every 400 ms.
    Silence {
        track: String,
        duration_ms: u64,
        #[serde(default = "defaults::silence_level")]
        level: u8,
        #[serde(default = "defaults::silence_size")]
        size: usize,
        #[serde(default)]
        dtx: bool,
        #[serde(default = "defaults::frame_ms")]
        frame_ms: u64,
    },
    /// Video frames at `fps`, one packet each (key frames `keyframe_packets`), with a key
    /// frame at `keyframe_at_ms` (from the start of the event) and then every
    /// `keyframe_every_ms` (0: never again).
    Video {
        track: String,
        duration_ms: u64,
        #[serde(default = "defaults::fps")]
        fps: u64,
        #[serde(default = "defaults::video_size")]
        size: usize,
        #[serde(default)]
        keyframe_at_ms: u64,
        #[serde(default)]
        keyframe_every_ms: u64,
        #[serde(default = "defaults::keyframe_packets")]
        keyframe_packets: u32,
    },
}

mod defaults {
    pub fn talk_level() -> u8 {
        30
    }
    pub fn talk_size() -> usize {
        120
    }
    pub fn frame_ms() -> u64 {
        20
    }
    pub fn silence_level() -> u8 {
        95
    }
    pub fn silence_size() -> usize {
        12
    }
    pub fn fps() -> u64 {
        30
    }
    pub fn video_size() -> usize {
        1000
    }
    pub fn keyframe_packets() -> u32 {
        3
    }
}

/// Where a track's generated packets stand.
#[derive(Clone, Copy, Debug)]
struct TrackCounter {
    next_seq: u16,
    ts_base: u32,
}

/// A stable start for a track's numbers, from its name (FNV-1a).
fn track_counter(track: &str) -> TrackCounter {
    let hash = track.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    TrackCounter { next_seq: hash as u16, ts_base: (hash >> 16) as u32 }
}

fn expand(
    generator: Generator,
    at_us: u64,
    counters: &mut std::collections::HashMap<String, TrackCounter>,
) -> Result<Vec<ScenarioEvent>, String> {
    let mut events = Vec::new();
    let packet = |counter: &mut TrackCounter, t: u64, clock_rate: u64, size: usize| {
        let seq = counter.next_seq;
        counter.next_seq = seq.wrapping_add(1);
        let ts = counter.ts_base.wrapping_add((t as u128 * clock_rate as u128 / 1_000_000) as u32);
        RtpIn {
            seq,
            ts,
            marker: false,
            payload: filler_payload(seq, size),
            audio_level: None,
            voice: None,
            keyframe: false,
        }
    };
    let check_size = |size: usize| {
        if size == 0 || size > MAX_SCENARIO_PAYLOAD {
            Err(format!("size must be between 1 and {MAX_SCENARIO_PAYLOAD}"))
        } else {
            Ok(())
        }
    };
    match generator {
        Generator::Talk { track, duration_ms, level, voice, size, frame_ms, lose, duplicate, late } => {
            check_size(size)?;
            if frame_ms == 0 || level > 127 {
                return Err("frame_ms must be positive and level at most 127".into());
            }
            let counter = counters.entry(track.clone()).or_insert_with(|| track_counter(&track));
            let name = Name::from(track.as_str());
            for (index, offset) in (0..duration_ms * 1000).step_by(frame_ms as usize * 1000).enumerate() {
                let index = index as u32;
                let t = at_us + offset;
                let mut rtp = packet(counter, t, 48_000, size);
                rtp.audio_level = Some(level);
                rtp.voice = voice;
                rtp.marker = index == 0;
                if lose.contains(&index) {
                    continue;
                }
                let delay = late.iter().find(|(i, _)| *i == index).map_or(0, |(_, ms)| ms * 1000);
                let input = Input::Rtp { track: name.clone(), packet: rtp };
                if duplicate.contains(&index) {
                    events.push(ScenarioEvent { at_us: t + delay + 1_000, tick: None, input: input.clone() });
                }
                events.push(ScenarioEvent { at_us: t + delay, tick: None, input });
            }
        }
        Generator::Silence { track, duration_ms, level, size, dtx, frame_ms } => {
            check_size(size)?;
            if frame_ms == 0 || level > 127 {
                return Err("frame_ms must be positive and level at most 127".into());
            }
            let counter = counters.entry(track.clone()).or_insert_with(|| track_counter(&track));
            let name = Name::from(track.as_str());
            let (step_us, level, size) = if dtx { (400_000, 127, 3) } else { (frame_ms * 1000, level, size) };
            for offset in (0..duration_ms * 1000).step_by(step_us as usize) {
                let mut rtp = packet(counter, at_us + offset, 48_000, size);
                rtp.audio_level = Some(level);
                events.push(ScenarioEvent {
                    at_us: at_us + offset,
                    tick: None,
                    input: Input::Rtp { track: name.clone(), packet: rtp },
                });
            }
        }
        Generator::Video { track, duration_ms, fps, size, keyframe_at_ms, keyframe_every_ms, keyframe_packets } => {
            check_size(size)?;
            if fps == 0 || fps > 120 || keyframe_packets == 0 {
                return Err("fps must be between 1 and 120 and keyframe_packets positive".into());
            }
            let counter = counters.entry(track.clone()).or_insert_with(|| track_counter(&track));
            let name = Name::from(track.as_str());
            let frame_us = 1_000_000 / fps;
            let mut next_key_us = keyframe_at_ms * 1000;
            for offset in (0..duration_ms * 1000).step_by(frame_us as usize) {
                let key = offset >= next_key_us;
                if key {
                    next_key_us =
                        if keyframe_every_ms == 0 { u64::MAX } else { next_key_us + keyframe_every_ms * 1000 };
                }
                let packets = if key { keyframe_packets } else { 1 };
                for p in 0..packets {
                    let mut rtp = packet(counter, at_us + offset, 90_000, size);
                    rtp.keyframe = key && p == 0;
                    rtp.marker = p + 1 == packets;
                    events.push(ScenarioEvent {
                        at_us: at_us + offset,
                        tick: None,
                        input: Input::Rtp { track: name.clone(), packet: rtp },
                    });
                }
            }
        }
    }
    Ok(events)
}

/// Largest payload a scenario line may carry or ask for.
const MAX_SCENARIO_PAYLOAD: usize = 65_535;

fn body_to_input(body: Body) -> Result<Input, String> {
    let name = |text: String| Name::from(text);
    Ok(match body {
        Body::Join { peer, uid, roles } => Input::Join { peer: name(peer), uid, roles },
        Body::Leave { peer } => Input::Leave { peer: name(peer) },
        Body::Publish { peer, track, media, codec, clock_rate, ssrc } => {
            Input::Publish { peer: name(peer), track: name(track), media, codec, clock_rate, ssrc }
        }
        Body::Unpublish { track } => Input::Unpublish { track: name(track) },
        Body::Subscribe { peer } => Input::Subscribe { peer: name(peer) },
        Body::Unsubscribe { peer } => Input::Unsubscribe { peer: name(peer) },
        Body::Rtp { track, seq, ts, marker, size, audio_level, voice, keyframe, payload } => {
            let payload: Arc<[u8]> = match (payload, size) {
                (Some(text), size) => {
                    let bytes = BASE64.decode(text.as_bytes()).map_err(|e| format!("bad base64 payload: {e}"))?;
                    if size.is_some_and(|size| size != bytes.len()) {
                        return Err(format!(
                            "size {} does not match the payload's {} bytes",
                            size.unwrap_or(0),
                            bytes.len()
                        ));
                    }
                    Arc::from(bytes)
                }
                (None, Some(size)) if size <= MAX_SCENARIO_PAYLOAD => filler_payload(seq, size),
                (None, Some(size)) => return Err(format!("size {size} is over {MAX_SCENARIO_PAYLOAD}")),
                (None, None) => return Err("an rtp event needs `size` or `payload`".into()),
            };
            Input::Rtp { track: name(track), packet: RtpIn { seq, ts, marker, payload, audio_level, voice, keyframe } }
        }
        Body::Prefs { peer, follow, mute } => Input::Prefs {
            peer: name(peer),
            follow: follow.into_iter().map(Name::from).collect(),
            mute: mute.into_iter().map(Name::from).collect(),
        },
        Body::Feedback { peer, utterance, signal } => Input::Feedback { peer: name(peer), utterance, signal },
        Body::Nack { peer, media, seqs } => Input::Nack { peer: name(peer), media, seqs },
        Body::KeyframeRequest { peer } => Input::KeyframeRequest { peer: name(peer) },
    })
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
    let kind = match map.get("kind") {
        Some(Value::String(kind)) => kind.clone(),
        Some(_) => return Err("`kind` must be a string".into()),
        None => return Err("missing `kind`".into()),
    };
    if matches!(kind.as_str(), "talk" | "silence" | "video") {
        let generator: Generator = serde_json::from_value(Value::Object(map)).map_err(|e| e.to_string())?;
        return Ok(Line::Generator(at_us, tick, generator));
    }
    let body: Body = serde_json::from_value(Value::Object(map)).map_err(|e| {
        let text = e.to_string();
        if text.starts_with("unknown variant") {
            format!("{text}; generator kinds: `talk`, `silence`, `video`")
        } else {
            text
        }
    })?;
    Ok(Line::Event(ScenarioEvent { at_us, tick, input: body_to_input(body)? }))
}

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
    queue: std::collections::BTreeMap<(u64, u64), ScenarioEvent>,
    produced: u64,
    counters: std::collections::HashMap<String, TrackCounter>,
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

/// Serialises an input as a scenario line. `rtp` payloads equal to the filler of their size
/// are written as `size` only.
pub fn event_line(at_us: u64, tick: Option<u64>, input: &Input) -> String {
    let mut map = Map::new();
    map.insert("at_us".into(), at_us.into());
    if let Some(tick) = tick {
        map.insert("tick".into(), tick.into());
    }
    map.insert("kind".into(), input.kind().into());
    let names = |names: &[Name]| Value::Array(names.iter().map(|n| Value::from(n.as_str())).collect());
    let mut put = |key: &str, value: Value| {
        map.insert(key.into(), value);
    };
    match input {
        Input::Join { peer, uid, roles } => {
            put("peer", peer.as_str().into());
            if let Some(uid) = uid {
                put("uid", uid.as_str().into());
            }
            put("roles", Value::Array(roles.iter().map(|r| Value::from(r.as_str())).collect()));
        }
        Input::Leave { peer } | Input::Subscribe { peer } | Input::Unsubscribe { peer } => {
            put("peer", peer.as_str().into())
        }
        Input::KeyframeRequest { peer } => put("peer", peer.as_str().into()),
        Input::Publish { peer, track, media, codec, clock_rate, ssrc } => {
            put("peer", peer.as_str().into());
            put("track", track.as_str().into());
            put("media", media.as_str().into());
            put("codec", codec.as_str().into());
            put("clock_rate", (*clock_rate).into());
            put("ssrc", (*ssrc).into());
        }
        Input::Unpublish { track } => put("track", track.as_str().into()),
        Input::Rtp { track, packet } => {
            put("track", track.as_str().into());
            put("seq", packet.seq.into());
            put("ts", packet.ts.into());
            put("marker", packet.marker.into());
            put("size", packet.payload.len().into());
            if let Some(level) = packet.audio_level {
                put("audio_level", level.into());
            }
            if let Some(voice) = packet.voice {
                put("voice", voice.into());
            }
            if packet.keyframe {
                put("keyframe", true.into());
            }
            if *packet.payload != *filler_payload(packet.seq, packet.payload.len()) {
                put("payload", BASE64.encode(&packet.payload).into());
            }
        }
        Input::Prefs { peer, follow, mute } => {
            put("peer", peer.as_str().into());
            put("follow", names(follow));
            put("mute", names(mute));
        }
        Input::Feedback { peer, utterance, signal } => {
            put("peer", peer.as_str().into());
            if let Some(utterance) = utterance {
                put("utterance", utterance.to_string().into());
            }
            put("signal", serde_json::to_value(signal).unwrap_or(Value::Null));
        }
        Input::Nack { peer, media, seqs } => {
            put("peer", peer.as_str().into());
            put("media", media.as_str().into());
            put("seqs", Value::Array(seqs.iter().map(|s| Value::from(*s)).collect()));
        }
    }
    Value::Object(map).to_string()
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Vec<ScenarioEvent>, ScenarioError> {
        let (_, mut reader) = ScenarioReader::new("test.jsonl".into(), text.as_bytes())?;
        let mut events = Vec::new();
        while let Some(event) = reader.next_event() {
            events.push(event?);
        }
        Ok(events)
    }

    #[test]
    fn every_kind_round_trips_through_its_line() {
        let inputs = vec![
            Input::Join { peer: "a".into(), uid: Some("u1".into()), roles: vec![Role::Speaker] },
            Input::Publish {
                peer: "a".into(),
                track: "a.mic".into(),
                media: MediaKind::Audio,
                codec: "opus".into(),
                clock_rate: 48_000,
                ssrc: 7,
            },
            Input::Rtp {
                track: "a.mic".into(),
                packet: RtpIn {
                    seq: 65_535,
                    ts: 4_000_000_000,
                    marker: true,
                    payload: filler_payload(65_535, 3),
                    audio_level: Some(30),
                    voice: Some(true),
                    keyframe: false,
                },
            },
            Input::Rtp {
                track: "a.mic".into(),
                packet: RtpIn {
                    seq: 1,
                    ts: 2,
                    marker: false,
                    payload: Arc::from(vec![1u8, 2, 3]),
                    audio_level: None,
                    voice: None,
                    keyframe: true,
                },
            },
            Input::Subscribe { peer: "a".into() },
            Input::Prefs { peer: "a".into(), follow: vec!["b".into()], mute: vec!["c".into()] },
            Input::Feedback { peer: "a".into(), utterance: Some("b#2".parse().unwrap()), signal: FeedbackSignal::Skip },
            Input::Feedback { peer: "a".into(), utterance: None, signal: FeedbackSignal::Like },
            Input::Nack { peer: "a".into(), media: MediaKind::Audio, seqs: vec![1, 2] },
            Input::KeyframeRequest { peer: "a".into() },
            Input::Unsubscribe { peer: "a".into() },
            Input::Unpublish { track: "a.mic".into() },
            Input::Leave { peer: "a".into() },
        ];
        for (i, input) in inputs.iter().enumerate() {
            let line = event_line(i as u64 * 10, (i % 2 == 0).then_some(i as u64), input);
            let event = parse_event(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(&event.input, input, "{line}");
        }
    }

    #[test]
    fn format_errors_name_the_file_and_line() {
        let header = r#"{"encore_scenario":1,"tick_ms":10}"#;
        let cases = [
            ("{not json", "not JSON"),
            (r#"{"at_us":5,"kind":"dance","peer":"a"}"#, "unknown variant `dance`"),
            (r#"{"at_us":5,"kind":"join"}"#, "missing field `peer`"),
            (r#"{"at_us":5,"kind":"join","peer":"a","colour":"red"}"#, "unknown field `colour`"),
            (r#"{"kind":"join","peer":"a"}"#, "missing `at_us`"),
            (r#"{"at_us":-1,"kind":"join","peer":"a"}"#, "non-negative"),
            (r#"{"at_us":5,"kind":"rtp","track":"t","seq":70000,"ts":1,"size":3}"#, "70000"),
            (r#"{"at_us":5,"kind":"rtp","track":"t","seq":1,"ts":1}"#, "needs `size` or `payload`"),
            (r#"{"at_us":5,"kind":"rtp","track":"t","seq":1,"ts":1,"payload":"!!"}"#, "base64"),
            (r#"[1,2]"#, "must be a JSON object"),
        ];
        for (line, expected) in cases {
            let text = format!("{header}\n{{\"at_us\":1,\"kind\":\"leave\",\"peer\":\"x\"}}\n{line}\n");
            let err = read(&text).unwrap_err().to_string();
            assert!(err.starts_with("test.jsonl:3: "), "{line}: {err}");
            assert!(err.contains(expected), "{line}: {err}");
        }
    }

    #[test]
    fn time_may_not_go_backwards() {
        let text = "{\"encore_scenario\":1}\n{\"at_us\":50,\"kind\":\"leave\",\"peer\":\"x\"}\n\n{\"at_us\":40,\"kind\":\"leave\",\"peer\":\"x\"}\n";
        let err = read(text).unwrap_err().to_string();
        assert!(err.starts_with("test.jsonl:4: `at_us` goes backwards"), "{err}");
    }

    #[test]
    fn the_header_is_checked() {
        for (header, expected) in [
            (r#"{"encore_scenario":2}"#, "unsupported scenario version 2"),
            (r#"{"encore_scenario":1,"config":{"buffer_max":1}}"#, "unknown field `buffer_max`"),
            (r#"{"encore_scenario":1,"tick_ms":0}"#, "tick_ms"),
            (r#"{"scenario":1}"#, "bad header"),
        ] {
            let err = read(&format!("{header}\n")).unwrap_err().to_string();
            assert!(err.starts_with("test.jsonl:1: ") && err.contains(expected), "{header}: {err}");
        }
        assert!(matches!(read(""), Err(ScenarioError::Empty { .. })));
    }

    #[test]
    fn generator_lines_expand_in_time_order_with_continuing_numbers() {
        let text = r#"{"encore_scenario":1}
{"at_us":0,"kind":"talk","track":"a","duration_ms":100,"lose":[1],"duplicate":[2],"late":[[0,50]]}
{"at_us":30000,"kind":"leave","peer":"x"}
{"at_us":100000,"kind":"silence","track":"a","duration_ms":800,"dtx":true}
"#;
        let first_seq = track_counter("a").next_seq;
        let summary: Vec<(u64, String)> = read(text)
            .unwrap()
            .iter()
            .map(|e| match &e.input {
                Input::Rtp { packet, .. } => {
                    let n = packet.seq.wrapping_sub(first_seq);
                    (
                        e.at_us,
                        format!("rtp {n} level {} size {}", packet.audio_level.unwrap_or(0), packet.payload.len()),
                    )
                }
                other => (e.at_us, other.kind().to_string()),
            })
            .collect();
        let expected = [
            (30_000, "leave"),
            (40_000, "rtp 2 level 30 size 120"),
            (41_000, "rtp 2 level 30 size 120"),
            (50_000, "rtp 0 level 30 size 120"),
            (60_000, "rtp 3 level 30 size 120"),
            (80_000, "rtp 4 level 30 size 120"),
            (100_000, "rtp 5 level 127 size 3"),
            (500_000, "rtp 6 level 127 size 3"),
        ];
        let expected: Vec<(u64, String)> = expected.iter().map(|(t, s)| (*t, s.to_string())).collect();
        assert_eq!(summary, expected);
    }

    #[test]
    fn generator_lines_are_checked_like_any_other() {
        let header = r#"{"encore_scenario":1}"#;
        for (line, expected) in [
            (r#"{"at_us":0,"kind":"talk","track":"a"}"#, "missing field `duration_ms`"),
            (r#"{"at_us":0,"kind":"talk","track":"a","duration_ms":10,"level":200}"#, "level at most 127"),
            (r#"{"at_us":0,"kind":"video","track":"v","duration_ms":10,"fps":0}"#, "fps"),
            (r#"{"at_us":0,"tick":3,"kind":"silence","track":"a","duration_ms":10}"#, "recorded `tick`"),
        ] {
            let err = read(&format!("{header}\n{line}\n")).unwrap_err().to_string();
            assert!(err.starts_with("test.jsonl:2: ") && err.contains(expected), "{line}: {err}");
        }
    }

    #[test]
    fn events_go_to_the_first_tick_at_or_after_their_arrival_unless_recorded() {
        let event = |at_us, tick| ScenarioEvent { at_us, tick, input: Input::Leave { peer: "x".into() } };
        assert_eq!(event(0, None).tick_for(10_000), 0);
        assert_eq!(event(1, None).tick_for(10_000), 1);
        assert_eq!(event(10_000, None).tick_for(10_000), 1);
        assert_eq!(event(10_001, Some(7)).tick_for(10_000), 7);
    }
}
